//! Glass-to-glass latency through the sandcast WebRTC gateway.
//!
//! An Xvfb display shows `bench/latency/clock.html` in Chromium (the
//! "remote" page); the sandcast media pipeline captures and encodes the
//! display; the gateway sends it to a headless Chromium viewer that reads the
//! clock from every decoded frame (`bench/latency/decode.js`) and reports
//! now − drawn time. Both browsers run on this host, so they share a clock.
//!
//! ```text
//! cd bench/latency/harness && cargo run --release -- [seconds] [runs]
//! cd bench/latency/harness && cargo run --release -- idle [seconds]
//! ```
//!
//! Prints p50/p95 per run and the median over runs. `idle` shows a page
//! that never changes and reports the CPU this process (capture, encode
//! and gateway) uses while a viewer stays connected.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use sandcast_media::xvfb::Xvfb;
use sandcast_media::{VideoPipeline, VideoSettings};
use sandcast_proto::{Codec, VideoControl};
use sandcast_webrtc::{Gateway, GatewayConfig, GatewayEvent, ViewerOptions};
use serde_json::{Value, json};
use tower_http::services::ServeDir;

const W: u32 = 1280;
const H: u32 = 720;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../..")
}

/// Kills and reaps a child on drop, so no browser outlives the run.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn offer(
    State(gw): State<Gateway>,
    Path(session): Path<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let sdp = body["sdp"].as_str().unwrap_or_default();
    match gw
        .accept_offer(&session, sdp, ViewerOptions::default())
        .await
    {
        Ok(a) => (
            StatusCode::OK,
            Json(json!({"type": "answer", "sdp": a.sdp})),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let idle = args.first().is_some_and(|a| a == "idle");
    if idle {
        args.remove(0);
    }
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(15);
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);

    let gw = Gateway::start(GatewayConfig {
        udp_bind: "127.0.0.1:0".parse()?,
        public_ips: vec!["127.0.0.1".parse()?],
        ..Default::default()
    })
    .await?;
    let app = Router::new()
        .route("/api/webrtc/session/{id}/offer", post(offer))
        .with_state(gw.clone())
        .nest_service("/viewer", ServeDir::new(root().join("viewer/src")))
        .nest_service("/bench", ServeDir::new(root().join("bench/latency")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let xvfb = Xvfb::start(W, H)?;
    let profile = std::env::temp_dir().join(format!("sandcast-latency-{}", std::process::id()));
    let _remote = Reaped(
        Command::new("/usr/bin/chromium")
            .env("DISPLAY", xvfb.display())
            .args([
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--kiosk",
                "--window-position=0,0",
                &format!("--window-size={W},{H}"),
                &format!("--user-data-dir={}", profile.display()),
                &if idle {
                    format!("{base}/bench/static.html")
                } else {
                    format!("{base}/bench/clock.html")
                },
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );

    let (pipeline, mut frames) = VideoPipeline::spawn(
        xvfb.display(),
        VideoSettings {
            codec: Codec::H264,
            bitrate_bps: 2_500_000,
            max_fps: 60,
        },
    )?;
    let pipeline = std::sync::Arc::new(pipeline);
    let gw_frames = gw.clone();
    tokio::spawn(async move {
        while let Some(f) = frames.next().await {
            gw_frames.push_frame("bench", f);
        }
    });
    let mut events = gw.events();
    let p2 = pipeline.clone();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            match e {
                GatewayEvent::KeyFrameWanted { .. } => p2.control(VideoControl::KeyFrame),
                GatewayEvent::VideoWanted { bitrate_bps, .. } => {
                    p2.control(VideoControl::Bitrate { bitrate_bps });
                    p2.control(VideoControl::KeyFrame);
                }
                GatewayEvent::Bitrate { bps, .. } => {
                    p2.control(VideoControl::Bitrate { bitrate_bps: bps })
                }
                _ => {}
            }
        }
    });

    if idle {
        return measure_idle(&base, seconds, &pipeline).await;
    }

    let mut p50s = Vec::new();
    let mut p95s = Vec::new();
    for run in 1..=runs {
        let out = tokio::time::timeout(
            Duration::from_secs(seconds + 60),
            tokio::process::Command::new("node")
                .arg(root().join("bench/latency/webrtc-measure.mjs"))
                .arg(&base)
                .arg(seconds.to_string())
                .kill_on_drop(true)
                .output(),
        )
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .ok_or_else(|| {
                format!(
                    "no result from the viewer: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let v: Value = serde_json::from_str(line)?;
        if v["ok"] != true {
            return Err(format!("viewer failed: {}", v["error"]).into());
        }
        let r = &v["result"];
        println!(
            "run {run}: samples {} p50 {} ms p95 {} ms (fps {:.1}, decode {:.1} ms)",
            r["samples"],
            r["p50"],
            r["p95"],
            r["fps"].as_f64().unwrap_or(0.0),
            r["decodeMs"].as_f64().unwrap_or(0.0)
        );
        p50s.push(r["p50"].as_f64().unwrap_or(f64::NAN));
        p95s.push(r["p95"].as_f64().unwrap_or(f64::NAN));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "median of {runs} runs: p50 {} ms, p95 {} ms; pipeline {:?}",
        median(&mut p50s),
        median(&mut p95s),
        pipeline.stats()
    );
    let _ = std::fs::remove_dir_all(&profile);
    Ok(())
}

/// CPU time of this process so far (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 after ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // USER_HZ is 100 on every Linux this runs on.
    let hz = 100u64;
    Duration::from_millis(ticks * 1000 / hz)
}

async fn measure_idle(
    base: &str,
    seconds: u64,
    pipeline: &VideoPipeline,
) -> Result<(), Box<dyn std::error::Error>> {
    let viewer = tokio::process::Command::new("node")
        .arg(root().join("bench/latency/webrtc-measure.mjs"))
        .arg(base)
        .arg((seconds + 10).to_string())
        .arg("hold")
        .kill_on_drop(true)
        .output();
    let sampler = async {
        // Skip connection set-up and the first key frame.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (c0, t0, s0) = (cpu_time(), std::time::Instant::now(), pipeline.stats());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (c1, t1, s1) = (cpu_time(), std::time::Instant::now(), pipeline.stats());
        let share = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64() * 100.0;
        println!(
            "idle: {share:.2} % of one core for capture + encode + gateway over {seconds} s \
             ({} frames encoded, {} bytes)",
            s1.frames_encoded - s0.frames_encoded,
            s1.bytes - s0.bytes
        );
    };
    let (out, ()) = tokio::join!(viewer, sampler);
    let out = out?;
    println!("viewer: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

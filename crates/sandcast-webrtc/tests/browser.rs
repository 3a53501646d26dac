//! End to end in headless Chromium: the gateway, a small signaling and
//! static-file server on 127.0.0.1, frames encoded with openh264 from a
//! synthetic moving pattern, and `viewer/src/webrtc.js` in a real browser.
//!
//! Every scenario runs in a network namespace of its own (see `in_netns`),
//! so test traffic never leaves it. Needs root (unshare, TAP, nftables),
//! `/usr/bin/chromium`, `ip`, `nft`, and `npm install` in `tests/browser`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use openh264::OpenH264API;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, FrameType};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use sandcast_proto::{Codec, InputEvent, VideoFrame, VideoHeader};
use sandcast_webrtc::{
    Gateway, GatewayConfig, GatewayEvent, ViewerMessage, ViewerOptions, ViewerState,
};
use serde_json::{Value, json};
use tower_http::services::ServeDir;

const W: usize = 640;
const H: usize = 360;
/// Colour of the left half of every synthetic frame.
const COLOUR: [u8; 3] = [200, 40, 40];

/// Chromium instances share two cores with everything else: one at a time.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

enum Feed {
    Start,
    KeyFrame,
    Stop,
}

/// Encodes a moving pattern at 30 fps while the gateway wants video.
fn spawn_feeder(gw: Gateway, session: &'static str) -> std::sync::mpsc::Sender<Feed> {
    let (tx, rx) = std::sync::mpsc::channel::<Feed>();
    std::thread::spawn(move || {
        let cfg = EncoderConfig::new()
            .bitrate(BitRate::from_bps(1_500_000))
            .max_frame_rate(FrameRate::from_hz(30.0))
            .skip_frames(false);
        let mut enc = Encoder::with_api_config(OpenH264API::from_source(), cfg).unwrap();
        let mut rgb = vec![0u8; W * H * 3];
        let mut running = false;
        let mut seq = 0u32;
        loop {
            let msg = if running {
                match rx.recv_timeout(Duration::from_millis(33)) {
                    Ok(m) => Some(m),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(_) => return,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                }
            };
            match msg {
                Some(Feed::Start) => {
                    running = true;
                    enc.force_intra_frame();
                }
                Some(Feed::KeyFrame) => enc.force_intra_frame(),
                Some(Feed::Stop) => running = false,
                None => {}
            }
            if !running {
                continue;
            }
            // Left half solid colour; right half grey with a white bar moving.
            let bar = (seq as usize * 8) % (W / 2);
            for y in 0..H {
                for x in 0..W {
                    let px = if x < W / 2 {
                        COLOUR
                    } else if (x - W / 2) / 32 == bar / 32 {
                        [255, 255, 255]
                    } else {
                        [60, 60, 60]
                    };
                    rgb[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&px);
                }
            }
            let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(&rgb, (W, H)));
            let bs = enc.encode(&yuv).unwrap();
            let keyframe = matches!(bs.frame_type(), FrameType::IDR | FrameType::I);
            let data = bs.to_vec();
            if data.is_empty() {
                continue;
            }
            seq += 1;
            let capture_us = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64;
            gw.push_frame(
                session,
                VideoFrame {
                    header: VideoHeader {
                        codec: Codec::H264,
                        keyframe,
                        width: W as u16,
                        height: H as u16,
                        seq,
                        capture_us,
                    },
                    data: Bytes::from(data),
                },
            );
        }
    });
    tx
}

struct Harness {
    base: String,
    events: Arc<Mutex<Vec<GatewayEvent>>>,
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
            StatusCode::from_u16(e.http_status()).unwrap(),
            Json(json!({"error": e.to_string()})),
        ),
    }
}

async fn start(advertise_udp: bool) -> Harness {
    let gw = Gateway::start(GatewayConfig {
        udp_bind: "127.0.0.1:0".parse().unwrap(),
        tcp_bind: Some("127.0.0.1:0".parse().unwrap()),
        public_ips: vec!["127.0.0.1".parse().unwrap()],
        advertise_udp,
        ..Default::default()
    })
    .await
    .unwrap();
    let feeder = spawn_feeder(gw.clone(), "s1");
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut rx = gw.events().unwrap();
    let (gw2, ev2) = (gw.clone(), events.clone());
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match &e {
                GatewayEvent::VideoWanted { .. } => {
                    let _ = feeder.send(Feed::Start);
                }
                GatewayEvent::KeyFrameWanted { .. } => {
                    let _ = feeder.send(Feed::KeyFrame);
                }
                GatewayEvent::VideoUnwanted { .. } => {
                    let _ = feeder.send(Feed::Stop);
                }
                GatewayEvent::ViewerState {
                    session,
                    state: ViewerState::Connected,
                    ..
                } => {
                    gw2.send_to_viewers(
                        session,
                        ViewerMessage::DisplaySize {
                            width: W as u32,
                            height: H as u32,
                        },
                    );
                }
                // Acknowledge what reached the server, with the sender's counters,
                // so the page can wait for delivery instead of sleeping.
                GatewayEvent::Input {
                    session,
                    viewer,
                    event,
                } => {
                    let counters = gw2.viewer_counters(*viewer).await;
                    let ev = match event {
                        InputEvent::PointerMove { x, y } => {
                            json!({"kind": "pointer_move", "x": x, "y": y}).to_string()
                        }
                        other => format!("{other:?}"),
                    };
                    ack(&gw2, session, ev, counters);
                }
                GatewayEvent::Clipboard { session, text } => {
                    let ev = json!({"kind": "clipboard", "text": text}).to_string();
                    ack(&gw2, session, ev, None);
                }
                GatewayEvent::Resize {
                    session,
                    width,
                    height,
                } => {
                    // Field order as the page's JSON.stringify writes it.
                    let ev = format!(r#"{{"kind":"resize","width":{width},"height":{height}}}"#);
                    ack(&gw2, session, ev, None);
                }
                _ => {}
            }
            ev2.lock().unwrap().push(e);
        }
    });

    let app = Router::new()
        .route("/api/webrtc/session/{id}/offer", post(offer))
        .with_state(gw.clone())
        .nest_service("/viewer", ServeDir::new(root().join("viewer/src")))
        .nest_service("/test", ServeDir::new(root().join("tests/browser")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // Keep the gateway alive as long as the server task holds its handle.
    Harness {
        base: format!("http://{addr}"),
        events,
    }
}

fn ack(
    gw: &Gateway,
    session: &str,
    event: String,
    counters: Option<sandcast_webrtc::ViewerCounters>,
) {
    let reason = json!({"event": event, "counters": counters}).to_string();
    gw.send_to_viewers(
        session,
        ViewerMessage::SessionState {
            state: "ack".into(),
            reason: Some(reason),
        },
    );
}

async fn run_page(h: &Harness, scenario: &str) -> Value {
    let _one = BROWSER.lock().await;
    let script = root().join("tests/browser/webrtc-e2e.mjs");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(&h.base)
            .arg(scenario)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("browser scenario finished in time")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result from the page\nstdout: {stdout}\nstderr: {stderr}"));
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v["ok"], true,
        "scenario {scenario} failed: {}\nstderr: {stderr}",
        v["error"]
    );
    v["result"].clone()
}

fn close(a: u64, b: u8) -> bool {
    a.abs_diff(u64::from(b)) <= 30
}

fn assert_colour(rgb: &Value) {
    let px: Vec<u64> = rgb
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        close(px[0], COLOUR[0]) && close(px[1], COLOUR[1]) && close(px[2], COLOUR[2]),
        "decoded pixel {px:?} is not the synthetic colour {COLOUR:?}"
    );
}

#[test]
fn video_plays_and_input_reaches_the_server() {
    in_netns(false, || async {
        let h = start(true).await;
        let r = run_page(&h, "play").await;
        assert!(r["frames"].as_u64().unwrap() >= 30, "{r}");
        assert_colour(&r["rgb"]);
        assert_eq!(r["size"], json!([W, H]));
        assert_eq!(r["protocol"], "udp", "{r}");
        // viewer/src/stats.js reads the inbound stream.
        let stats = &r["stats"];
        assert_eq!(stats["codec"], "video/H264", "{r}");
        assert!(stats["framesDecoded"].as_u64().unwrap() >= 30, "{r}");
        assert!(stats["decodeMs"].as_f64().is_some(), "{r}");
        assert_eq!(stats["width"], W, "{r}");
        assert_eq!(r["control"], json!({"kind": "control", "granted": true}));
        let ev = h.events.lock().unwrap().clone();
        assert!(ev.iter().any(|e| matches!(e,
            GatewayEvent::Input { session, event: InputEvent::PointerMove { x: 123, y: 45 }, .. } if session == "s1")));
        assert!(ev.iter().any(|e| matches!(e,
            GatewayEvent::Clipboard { text, .. } if text == "hello from the viewer")));
        assert!(ev.iter().any(|e| matches!(
            e,
            GatewayEvent::Resize {
                width: 800,
                height: 600,
                ..
            }
        )));
        assert!(
            ev.iter()
                .any(|e| matches!(e, GatewayEvent::KeyFrameWanted { .. }))
        );
        // The page closed its connection: the viewer is gone and video stops.
        wait_for(&h, |e| matches!(e, GatewayEvent::VideoUnwanted { .. })).await;
    });
}

#[test]
fn two_viewers_watch_one_session_and_only_the_first_controls() {
    in_netns(false, || async {
        let h = start(true).await;
        let r = run_page(&h, "two").await;
        for i in 0..2 {
            assert!(r["frames"][i].as_u64().unwrap() >= 20, "{r}");
            assert_colour(&r["rgb"][i]);
        }
        assert_eq!(r["control"][0]["granted"], true);
        assert_eq!(r["control"][1]["granted"], false);
        let ev = h.events.lock().unwrap().clone();
        assert!(ev.iter().any(|e| matches!(
            e,
            GatewayEvent::Input {
                event: InputEvent::PointerMove { x: 8, y: 8 },
                ..
            }
        )));
        assert!(
            !ev.iter().any(|e| matches!(
                e,
                GatewayEvent::Input {
                    event: InputEvent::PointerMove { x: 7, y: 7 },
                    ..
                }
            )),
            "input from the watching viewer must not reach the session"
        );
        let viewers: std::collections::HashSet<_> = ev
            .iter()
            .filter_map(|e| match e {
                GatewayEvent::ViewerState {
                    viewer,
                    state: ViewerState::Connected,
                    ..
                } => Some(*viewer),
                _ => None,
            })
            .collect();
        assert_eq!(viewers.len(), 2);
    });
}

#[test]
fn garbage_and_codecless_offers_get_clear_errors() {
    in_netns(false, || async {
        let h = start(true).await;
        let r = run_page(&h, "bad").await;
        assert_eq!(r["garbage"]["status"], 400, "{r}");
        assert!(
            r["garbage"]["text"].as_str().unwrap().contains("bad SDP"),
            "{r}"
        );
        assert_eq!(r["nocodec"]["status"], 400, "{r}");
        let text = r["nocodec"]["text"].as_str().unwrap();
        assert!(
            text.contains("no usable video codec") && text.contains("VP9"),
            "{r}"
        );
        assert!(r["framesAfter"].as_u64().unwrap() >= 10);
    });
}

#[test]
fn oversized_and_flooding_messages_are_dropped_and_counted() {
    in_netns(false, || async {
        let h = start(true).await;
        let r = run_page(&h, "abuse").await;
        let c = &r["ack"]["counters"];
        assert!(c["messages_oversized"].as_u64().unwrap() >= 1, "{r}");
        assert!(c["messages_rate_limited"].as_u64().unwrap() >= 1, "{r}");
        // Oversized, two malformed and the rate-limited part of the flood.
        assert!(
            c["messages_dropped"].as_u64().unwrap()
                >= 3 + c["messages_rate_limited"].as_u64().unwrap(),
            "{r}"
        );
        assert!(r["framesAfterFlood"].as_u64().unwrap() >= 10, "{r}");
    });
}

#[test]
fn ice_tcp_carries_the_session_when_no_udp_candidate_is_offered() {
    in_netns(false, || async {
        // The gateway advertises only its passive TCP candidate, so Chromium has
        // no UDP path and must connect with an active ICE-TCP candidate.
        let h = start(false).await;
        let r = run_page(&h, "play").await;
        assert_eq!(r["protocol"], "tcp", "{r}");
        assert!(r["frames"].as_u64().unwrap() >= 30, "{r}");
        assert_colour(&r["rgb"]);
    });
}

async fn wait_for(h: &Harness, f: impl Fn(&GatewayEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        if h.events.lock().unwrap().iter().any(&f) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `f` on a thread of its own in a fresh network namespace: loopback,
/// a TAP device (Chromium gathers no candidates with loopback alone, and
/// this kernel has no dummy or veth links) and, with `block_udp`, an
/// nftables rule dropping every UDP packet. Every socket and process of the
/// scenario lives there, so no test traffic leaves it, and it all goes away
/// with the thread.
fn in_netns<F, Fut, T>(block_udp: bool, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which creates every
        // socket and child process of the scenario and then ends.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            std::io::Error::last_os_error()
        );
        let sh = |cmd: &str, args: &[&str], stdin: Option<&str>| {
            use std::io::Write;
            let mut child = std::process::Command::new(cmd)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
            if let Some(text) = stdin {
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            }
            drop(child.stdin.take());
            assert!(child.wait().unwrap().success(), "{cmd} {args:?} failed");
        };
        sh("ip", &["link", "set", "lo", "up"], None);
        let _tap = open_tap("sc0");
        sh("ip", &["addr", "add", "10.213.0.1/24", "dev", "sc0"], None);
        sh("ip", &["link", "set", "sc0", "up"], None);
        sh("ip", &["route", "add", "default", "dev", "sc0"], None);
        if block_udp {
            sh(
                "nft",
                &["-f", "-"],
                Some(
                    "table inet sandcast_test {\n chain input {\n  type filter hook input priority 0;\n  meta l4proto udp drop\n }\n}\n",
                ),
            );
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

#[test]
fn ice_tcp_takes_over_when_udp_is_blocked() {
    // The gateway advertises UDP and TCP; with UDP dropped, Chromium's UDP
    // checks die and ICE must settle on TCP.
    let r = in_netns(true, || async {
        let h = start(true).await;
        run_page(&h, "play").await
    });
    assert_eq!(r["protocol"], "tcp", "{r}");
    assert!(r["frames"].as_u64().unwrap() >= 30, "{r}");
    assert_colour(&r["rgb"]);
}

/// Creates a TAP device in the current network namespace and keeps it
/// attached while the returned file is open.
fn open_tap(name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // struct ifreq: 16-byte name, then the flags (short) of the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `ifr` is sized for.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

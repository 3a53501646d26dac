//! Time from `Backend::start` to the agent's `ready`, cold boot and snapshot
//! restore, and the resident memory of each Firecracker process.
//!
//! ```text
//! SANDCAST_FIRECRACKER=/usr/local/bin/firecracker \
//! SANDCAST_FC_KERNEL=/var/lib/sandcast/vmlinux \
//! SANDCAST_FC_IMAGE=/var/lib/sandcast/image \
//! SANDCAST_BENCH_RUNS=20 \
//! cargo bench -p sandcast-firecracker --bench time_to_ready
//! ```
//!
//! It needs a KVM host that can boot a guest, a Firecracker v1.16.1 binary, a
//! guest kernel and a browser image built with the real agent. Where those are
//! missing it says so and measures only the backend's own share (namespace,
//! cgroup, writable drive, API calls) against the Firecracker double, which
//! is labelled as such: it is not a boot time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandcast_backend::{AgentToken, Backend, LaunchSpec, Limits, NetworkPolicy, SessionId};
use sandcast_firecracker::{FirecrackerBackend, FirecrackerConfig};
use sandcast_proto::{BrowserConfig, Message, SessionConfig, encode_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

async fn read_message(s: &mut UnixStream) -> Option<Message> {
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut frame).await.ok()?;
        if frame.first() == Some(&1) {
            return serde_json::from_slice(&frame[1..]).ok();
        }
    }
}

/// Plays the server's part until the agent is ready (or, with the double,
/// until it has said hello).
async fn until_ready(
    listener: &UnixListener,
    id: &str,
    token: &AgentToken,
    full: bool,
) -> Result<(), String> {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .map_err(|_| "the agent did not connect within 60 s".to_owned())?
        .map_err(|e| e.to_string())?;
    match read_message(&mut s).await {
        Some(Message::Hello(_)) => {}
        other => return Err(format!("expected hello, got {other:?}")),
    }
    if !full {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let config = SessionConfig {
        session_id: id.to_owned(),
        width: 1280,
        height: 720,
        start_url: "about:blank".into(),
        kiosk: true,
        launch: None,
        launch_once: false,
        browser: BrowserConfig {
            binary: "/usr/bin/chromium".into(),
            extra_args: Vec::new(),
            policy: None,
        },
        restart: Default::default(),
        max_fps: 30,
        h264_tuning: sandcast_proto::H264Tuning::default(),
        server_time_ms: now,
        agent_token: Some(token.clone()),
        pause_unwatched_ms: 0,
        transfers: true,
        display_max: None,
        keyboard_layout: None,
    };
    for m in [
        Message::Welcome {
            protocol: sandcast_proto::PROTOCOL_VERSION,
        },
        Message::Config(Box::new(config)),
    ] {
        s.write_all(&encode_message(&m))
            .await
            .map_err(|e| e.to_string())?;
    }
    loop {
        match read_message(&mut s).await {
            Some(Message::Ready) => return Ok(()),
            Some(Message::Fatal { reason }) => return Err(reason),
            Some(_) => {}
            None => return Err("the agent closed the channel before ready".into()),
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

async fn run(
    backend: &FirecrackerBackend,
    dir: &Path,
    slug: &str,
    label: &str,
    runs: usize,
    full: bool,
) {
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for i in 0..runs {
        let id = SessionId::new(format!("bench-{slug}-{i}-{}", std::process::id())).unwrap();
        let session_dir = dir.join(id.as_str());
        std::fs::create_dir_all(&session_dir).unwrap();
        let spec = LaunchSpec {
            id: id.clone(),
            agent_socket: backend.agent_socket(&id, &session_dir),
            session_dir: session_dir.clone(),
            agent_binary: PathBuf::new(),
            limits: Limits::default(),
            network: NetworkPolicy {
                egress: sandcast_backend::Egress::Internet,
            },
            agent_token: Some(AgentToken::new(format!("bench-token-{i}"))),
            home: None,
        };
        let listener = UnixListener::bind(&spec.agent_socket).unwrap();
        let t = Instant::now();
        let instance = backend.start(&spec).await.expect("start");
        until_ready(
            &listener,
            id.as_str(),
            spec.agent_token.as_ref().unwrap(),
            full,
        )
        .await
        .expect("ready");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if let Some(kib) = instance.pid().and_then(rss_kib) {
            rss.push(kib as f64 / 1024.0);
        }
        instance.stop(Duration::from_secs(2)).await.unwrap();
        let _ = std::fs::remove_dir_all(&session_dir);
    }
    println!(
        "{label}: median {:.1} ms over {runs} runs (min {:.1}, max {:.1}); VMM process RSS median {:.1} MiB",
        median(times.clone()),
        times.iter().cloned().fold(f64::INFINITY, f64::min),
        times.iter().cloned().fold(0.0, f64::max),
        median(rss)
    );
}

fn real_prerequisites() -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let bin = std::env::var_os("SANDCAST_FIRECRACKER")
        .map(PathBuf::from)
        .ok_or("SANDCAST_FIRECRACKER (the firecracker binary) is not set")?;
    sandcast_firecracker::kvm::probe(Path::new("/dev/kvm"))?;
    let kernel = std::env::var_os("SANDCAST_FC_KERNEL")
        .map(PathBuf::from)
        .ok_or("SANDCAST_FC_KERNEL (a vmlinux) is not set")?;
    let image = std::env::var_os("SANDCAST_FC_IMAGE")
        .map(PathBuf::from)
        .ok_or("SANDCAST_FC_IMAGE (a browser image directory) is not set")?;
    Ok((bin, kernel, image))
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("SANDCAST_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("sc-fc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    match real_prerequisites() {
        Ok((bin, kernel, image)) => {
            let mut cfg = FirecrackerConfig {
                firecracker_bin: bin,
                kernel,
                rootfs: image.join("rootfs.ext4"),
                runtime_dir: dir.join("run"),
                ..FirecrackerConfig::default()
            };
            let cold = FirecrackerBackend::new(cfg.clone()).unwrap();
            run(&cold, &dir, "cold", "cold boot to ready", runs, true).await;
            cfg.snapshot_dir = Some(dir.join("snapshot"));
            let warm = FirecrackerBackend::new(cfg).unwrap();
            let t = Instant::now();
            warm.build_snapshot().await.expect("snapshot");
            println!(
                "snapshot built in {:.0} ms",
                t.elapsed().as_secs_f64() * 1000.0
            );
            run(&warm, &dir, "warm", "snapshot restore to ready", runs, true).await;
        }
        Err(why) => {
            println!("time_to_ready: CANNOT BOOT A MICROVM HERE: {why}.");
            println!(
                "Measuring only the backend's own share against the Firecracker double (not a boot time):"
            );
            let double = env!("CARGO_BIN_EXE_firecracker-double");
            let kernel = dir.join("vmlinux");
            std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00").unwrap();
            let rootfs = dir.join("rootfs.ext4");
            std::fs::File::create(&rootfs)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
            let mut cfg = FirecrackerConfig {
                firecracker_bin: double.into(),
                kernel,
                rootfs,
                probe_kvm: false,
                runtime_dir: dir.join("run"),
                ..FirecrackerConfig::default()
            };
            let cold = FirecrackerBackend::new(cfg.clone()).unwrap();
            run(
                &cold,
                &dir,
                "dcold",
                "double: start to agent hello, boot path",
                runs,
                false,
            )
            .await;
            cfg.snapshot_dir = Some(dir.join("snapshot"));
            let warm = FirecrackerBackend::new(cfg).unwrap();
            warm.build_snapshot().await.expect("snapshot");
            run(
                &warm,
                &dir,
                "dwarm",
                "double: start to agent hello, restore path",
                runs,
                false,
            )
            .await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

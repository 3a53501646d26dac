//! Latency of the agent's media paths, end to end through a real agent, Xvfb
//! and Chromium, with this program acting as the server on a Unix socket:
//!
//! - `video start`: `Video Start` sent → first key frame read on the video
//!   connection (includes opening that connection and the first encode);
//! - `resize`: `Resize` sent → `DisplaySize` read (RandR resize of the
//!   display and of the browser window);
//! - `resize to key frame`: `Resize` sent → first key frame of the new size.
//!
//! Run with `cargo bench -p sandcast-agent --bench media` (add
//! `--profile dev` for a quick run: dependencies are optimised there too);
//! it prints the median and the 95th percentile of each over `ROUNDS`
//! rounds.
//!
//! Measured at 1280x720 on the 2-core test machine under a load average of
//! about 12 (other builds), two runs: video start median 35-48 ms, resize
//! median 16-20 ms, resize to key frame median 44-63 ms; the 95th
//! percentiles (74-546 ms) are dominated by that load.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sandcast_proto::{
    BrowserConfig, Codec, Frame, FrameCodec, Message, PROTOCOL_VERSION, RestartPolicy, Role,
    SessionConfig, VideoControl,
};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

const ROUNDS: usize = 20;

type Channel = Framed<UnixStream, FrameCodec>;

async fn accept(listener: &UnixListener, want: Role) -> Channel {
    let (s, _) = listener.accept().await.unwrap();
    let mut framed = Framed::new(s, FrameCodec);
    match framed.next().await.unwrap().unwrap() {
        Frame::Message(Message::Hello(h)) => assert_eq!(h.role, want),
        other => panic!("expected hello, got {other:?}"),
    }
    framed
        .send(Message::Welcome {
            protocol: PROTOCOL_VERSION,
        })
        .await
        .unwrap();
    framed
}

async fn until(control: &mut Channel, mut pred: impl FnMut(&Message) -> bool) {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), control.next())
            .await
            .expect("timed out waiting for the agent")
            .expect("agent closed the control connection")
            .unwrap();
        if let Frame::Message(m) = frame
            && pred(&m)
        {
            return;
        }
    }
}

async fn key_frame_of(video: &mut Channel, size: (u16, u16)) {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), video.next())
            .await
            .expect("no video frame")
            .expect("video connection closed")
            .unwrap();
        if let Frame::Video(f) = frame
            && f.header.keyframe
            && (f.header.width, f.header.height) == size
        {
            return;
        }
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p95 = samples[(samples.len() * 95 / 100).min(samples.len() - 1)];
    println!(
        "{name:>20}: median {:.2} ms, p95 {:.2} ms over {} rounds",
        median.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3,
        samples.len()
    );
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("sc-agent-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let agent_bin = env!("CARGO_BIN_EXE_sandcast-agent");
    let mut agent = tokio::process::Command::new(agent_bin)
        .arg("--connect")
        .arg(format!("unix:{}", sock.display()))
        .env("HOME", &dir)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{agent_bin}: {e}"));
    let mut control = accept(&listener, Role::Control).await;
    control
        .send(Message::Config(Box::new(SessionConfig {
            session_id: "bench".into(),
            width: 1280,
            height: 720,
            start_url: "data:text/html,<body style='background:%23ddd'><h1>sandcast</h1>".into(),
            kiosk: true,
            launch: None,
            launch_once: false,
            browser: BrowserConfig {
                binary: "/usr/bin/chromium".into(),
                extra_args: vec![],
                policy: None,
            },
            restart: RestartPolicy::default(),
            max_fps: 60,
            h264_tuning: sandcast_proto::H264Tuning::default(),
            server_time_ms: 0,
            agent_token: None,
            pause_unwatched_ms: 0,
            transfers: true,
            display_max: None,
            keyboard_layout: None,
        })))
        .await
        .unwrap();
    until(&mut control, |m| matches!(m, Message::Ready)).await;

    let mut start = Vec::new();
    let mut resize = Vec::new();
    let mut resize_key = Vec::new();
    let sizes = [(1280u32, 720u32), (1024, 768)];
    let mut size = sizes[0];
    for round in 0..ROUNDS {
        let t = Instant::now();
        control
            .send(Message::Video(VideoControl::Start {
                codec: Codec::H264,
                bitrate_bps: 2_500_000,
            }))
            .await
            .unwrap();
        let mut video = accept(&listener, Role::Video).await;
        key_frame_of(&mut video, (size.0 as u16, size.1 as u16)).await;
        start.push(t.elapsed());

        size = sizes[(round + 1) % 2];
        let t = Instant::now();
        control
            .send(Message::Resize {
                width: size.0,
                height: size.1,
            })
            .await
            .unwrap();
        until(&mut control, |m| {
            *m == Message::DisplaySize {
                width: size.0,
                height: size.1,
            }
        })
        .await;
        resize.push(t.elapsed());
        key_frame_of(&mut video, (size.0 as u16, size.1 as u16)).await;
        resize_key.push(t.elapsed());

        control
            .send(Message::Video(VideoControl::Stop))
            .await
            .unwrap();
        // The agent closes the connection on Stop.
        while let Some(Ok(_)) = video.next().await {}
    }
    report("video start", start);
    report("resize", resize);
    report("resize to key frame", resize_key);
    control.send(Message::Shutdown).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), agent.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

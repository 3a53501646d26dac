//! The agent against a test server on a Unix socket, with real Xvfb,
//! Chromium and x11vnc on the host: readiness, restart after a crash, the VNC
//! stream and a clean shutdown.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sandcast_proto::{
    BrowserConfig, ChildReport, ChildState, Frame, FrameCodec, Message, RestartPolicy, Role,
    SessionConfig, StreamTarget,
};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

mod common;
use common::Harness;

fn config(url: &str) -> SessionConfig {
    SessionConfig {
        session_id: "agent-test".into(),
        width: 800,
        height: 600,
        start_url: url.into(),
        kiosk: false,
        launch: None,
        launch_once: false,
        browser: BrowserConfig {
            binary: "/usr/bin/chromium".into(),
            extra_args: vec![],
            policy: None,
        },
        restart: RestartPolicy {
            initial_backoff_ms: 50,
            max_backoff_ms: 500,
            crash_loop_restarts: 3,
            crash_loop_window_ms: 30_000,
        },
        max_fps: 60,
        h264_tuning: sandcast_proto::H264Tuning::default(),
        server_time_ms: 0,
        agent_token: None,
        pause_unwatched_ms: 0,
        transfers: true,
        display_max: None,
        keyboard_layout: None,
    }
}

/// Reads messages until `pred` picks one, keeping child reports seen on the way.
async fn until<T>(
    framed: &mut Framed<UnixStream, FrameCodec>,
    reports: &mut Vec<ChildReport>,
    mut pred: impl FnMut(&Message) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, framed.next())
            .await
            .expect("timed out waiting for the agent")
            .expect("agent closed the connection")
            .unwrap();
        let Frame::Message(msg) = frame else { continue };
        if let Message::Child(r) = &msg {
            reports.push(r.clone());
        }
        if let Some(t) = pred(&msg) {
            return t;
        }
    }
}

/// A process's niceness, field 19 of /proc/PID/stat.
fn niceness(pid: u32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it do not.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(16).unwrap().parse().unwrap()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test]
async fn supervises_display_browser_and_vnc() {
    let mut h = Harness::new("sup");
    let control = h.accept_raw(Role::Control).await;
    let mut framed = Framed::new(control, FrameCodec);
    framed
        .send(Message::Config(Box::new(config(
            "data:text/html,<h1>hello</h1>",
        ))))
        .await
        .unwrap();
    let mut reports = Vec::new();
    until(&mut framed, &mut reports, |m| {
        matches!(m, Message::Ready).then_some(())
    })
    .await;
    let running = |reports: &[ChildReport], name: &str| {
        reports
            .iter()
            .rev()
            .find(|r| r.name == name)
            .filter(|r| r.state == ChildState::Running)
            .and_then(|r| r.pid)
    };
    for name in ["xvfb", "browser", "vnc"] {
        assert!(
            running(&reports, name).is_some(),
            "{name} not running: {reports:?}"
        );
    }
    let browser = running(&reports, "browser").unwrap();
    let xvfb = running(&reports, "xvfb").unwrap();
    // The browser yields the CPU to the display and the video pipeline.
    assert_eq!(niceness(browser), 10, "children::BROWSER_NICENESS");
    assert_eq!(niceness(xvfb), niceness(std::process::id()));
    assert_eq!(
        niceness(running(&reports, "vnc").unwrap()),
        niceness(std::process::id())
    );

    // The VNC server is reachable only through a stream the agent opens.
    framed
        .send(Message::OpenStream {
            id: 1,
            target: StreamTarget::Vnc,
        })
        .await
        .unwrap();
    let mut stream = h.accept_raw(Role::Stream { id: 1 }).await;
    let mut banner = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert!(banner.starts_with(b"RFB 003."), "{banner:?}");
    drop(stream);

    // A killed browser is reported with its signal and comes back.
    unsafe { libc::kill(browser as i32, libc::SIGKILL) };
    let exit = until(&mut framed, &mut reports, |m| match m {
        Message::Child(r) if r.name == "browser" && r.state == ChildState::Restarting => {
            Some(r.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(exit.last_exit.unwrap().signal, Some(libc::SIGKILL));
    assert_eq!(exit.restarts, 1);
    let back = until(&mut framed, &mut reports, |m| match m {
        Message::Child(r) if r.name == "browser" && r.state == ChildState::Running => r.pid,
        _ => None,
    })
    .await;
    assert_ne!(back, browser);

    // Shutdown stops every child and the agent itself.
    framed.send(Message::Shutdown).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), h.agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    for pid in [back, xvfb] {
        assert!(!alive(pid), "pid {pid} still alive");
    }
}

#[tokio::test]
async fn a_browser_that_cannot_start_is_a_crash_loop_and_fatal() {
    let mut h = Harness::new("loop");
    let control = h.accept_raw(Role::Control).await;
    let mut framed = Framed::new(control, FrameCodec);
    let mut cfg = config("about:blank");
    cfg.browser.binary = "/bin/false".into();
    framed.send(Message::Config(Box::new(cfg))).await.unwrap();
    let mut reports = Vec::new();
    let reason = until(&mut framed, &mut reports, |m| match m {
        Message::Fatal { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("browser is in a crash loop"), "{reason}");
    assert!(reason.contains("exit code 1"), "{reason}");
    assert!(
        reports
            .iter()
            .any(|r| r.name == "browser" && r.state == ChildState::CrashLoop)
    );
    let status = tokio::time::timeout(Duration::from_secs(20), h.agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// A local web server that answers every request with a small page and
/// sends each request's path to the returned channel.
async fn page_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let mut lines = tokio::io::BufReader::new(rd).lines();
                let Ok(Some(first)) = lines.next_line().await else {
                    return;
                };
                let path = first.split(' ').nth(1).unwrap_or_default().to_string();
                let _ = tx.send(path);
                let body = "<title>signed in</title>ok";
                let _ = wr
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_launch_command_opens_urls_in_the_session_browser_and_its_exit_ends_it() {
    let (port, mut hits) = page_server().await;
    let mut h = Harness::new("launch");
    let control = h.accept_raw(Role::Control).await;
    let mut framed = Framed::new(control, FrameCodec);
    let mut cfg = config("about:blank");
    // Python's webbrowser (through $BROWSER), xdg-open from PATH, then a
    // URL the opener refuses, whose failure is the command's exit code.
    cfg.launch = Some(vec![
        "sh".into(),
        "-c".into(),
        format!(
            "python3 -c 'import sys, webbrowser; sys.exit(0 if webbrowser.open(sys.argv[1]) else 9)' \
               http://127.0.0.1:{port}/python || exit 20
             xdg-open http://127.0.0.1:{port}/xdg || exit 21
             xdg-open 'javascript:alert(1)'"
        ),
    ]);
    cfg.launch_once = true;
    framed.send(Message::Config(Box::new(cfg))).await.unwrap();
    let mut reports = Vec::new();
    let exit = until(&mut framed, &mut reports, |m| match m {
        Message::LaunchEnded { exit } => Some(*exit),
        _ => None,
    })
    .await;
    assert_eq!(
        exit.code,
        Some(4),
        "xdg-open's refusal of javascript: {reports:?}"
    );
    let mut seen = Vec::new();
    while !(seen.contains(&"/python".to_string()) && seen.contains(&"/xdg".to_string())) {
        let path = tokio::time::timeout(Duration::from_secs(30), hits.recv())
            .await
            .expect("the browser did not load the opened pages")
            .unwrap();
        seen.push(path);
    }
    let last = reports.iter().rev().find(|r| r.name == "launch").unwrap();
    assert_eq!(
        last.state,
        ChildState::Stopped,
        "not restarted: {reports:?}"
    );
    // The scripts live only as long as the agent.
    let scripts = h.dir.join(".sandcast-open");
    assert!(scripts.join("bin/xdg-open").exists());
    framed.send(Message::Shutdown).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), h.agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!scripts.exists(), "{} left behind", scripts.display());
}

#[tokio::test]
async fn the_agent_stops_everything_when_the_server_goes_away() {
    let mut h = Harness::new("gone");
    let control = h.accept_raw(Role::Control).await;
    let mut framed = Framed::new(control, FrameCodec);
    framed
        .send(Message::Config(Box::new(config("about:blank"))))
        .await
        .unwrap();
    let mut reports = Vec::new();
    let xvfb = until(&mut framed, &mut reports, |m| match m {
        Message::Child(r) if r.name == "xvfb" && r.state == ChildState::Running => r.pid,
        _ => None,
    })
    .await;
    drop(framed);
    tokio::time::timeout(Duration::from_secs(20), h.agent.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!alive(xvfb), "Xvfb {xvfb} outlived the agent");
}

/// Waits (up to 5 s) until `pid` is stopped (`T`) or not: a signal takes
/// effect shortly after it is sent.
async fn wait_stopped(pid: u32, stopped: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while (proc_state(pid) == 'T') != stopped {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// The process state letter of `pid` (`T` when stopped).
fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|rest| rest.trim_start().chars().next())
        .unwrap_or('?')
}

/// Tells the agent whether someone watches and waits for the browser's
/// report that follows: paused when nobody does, running when someone does.
async fn watch(
    framed: &mut Framed<UnixStream, FrameCodec>,
    reports: &mut Vec<ChildReport>,
    watched: bool,
) {
    framed.send(Message::Watched { watched }).await.unwrap();
    let want = if watched {
        ChildState::Running
    } else {
        ChildState::Paused
    };
    until(framed, reports, |m| match m {
        Message::Child(r) if r.name == "browser" && r.state == want => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn an_unwatched_browser_is_paused_and_a_viewer_resumes_it() {
    let h = Harness::new("pause");
    let control = h.accept_raw(Role::Control).await;
    let mut framed = Framed::new(control, FrameCodec);
    let config = SessionConfig {
        pause_unwatched_ms: 300,
        ..config("data:text/html,<h1>hello</h1>")
    };
    framed
        .send(Message::Config(Box::new(config)))
        .await
        .unwrap();
    let mut reports = Vec::new();
    until(&mut framed, &mut reports, |m| {
        matches!(m, Message::Ready).then_some(())
    })
    .await;
    // Ready and the browser's Running report travel separately.
    let seen = reports
        .iter()
        .rev()
        .find(|r| r.name == "browser" && r.state == ChildState::Running)
        .and_then(|r| r.pid);
    let browser = match seen {
        Some(pid) => pid,
        None => {
            until(&mut framed, &mut reports, |m| match m {
                Message::Child(r) if r.name == "browser" && r.state == ChildState::Running => r.pid,
                _ => None,
            })
            .await
        }
    };
    // Until the server says nobody watches, nothing is paused.
    assert_ne!(proc_state(browser), 'T');
    watch(&mut framed, &mut reports, false).await;
    assert!(
        wait_stopped(browser, true).await,
        "the paused browser still runs"
    );
    watch(&mut framed, &mut reports, true).await;
    assert_ne!(
        proc_state(browser),
        'T',
        "the watched browser is still stopped"
    );
    // Paused again, a shutdown still ends it at once (SIGCONT before SIGTERM).
    watch(&mut framed, &mut reports, false).await;
    framed.send(Message::Shutdown).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(browser) {
        assert!(
            Instant::now() < deadline,
            "the paused browser survived the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

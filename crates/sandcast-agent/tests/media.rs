//! The agent's media paths against a test server on a Unix socket, with real
//! Xvfb, Chromium and x11vnc: video on its own connection at the session's
//! size and after a resize, input reaching a page, the clipboard both ways
//! and refused input counted in the stats.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use openh264::decoder::Decoder;
use openh264::formats::YUVSource;
use sandcast_proto::{
    BrowserConfig, ChildState, Codec, Frame, InputEvent, Message, PointerButton, RestartPolicy,
    Role, SessionConfig, VideoControl, VideoFrame,
};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{AtomEnum, ConnectionExt as _};

mod common;
use common::{Channel, Harness};

/// The control connection with the configuration sent; waits for Ready and
/// returns every message seen on the way.
async fn ready(h: &Harness, config: SessionConfig) -> (Channel, Vec<Message>) {
    let mut control = h.accept(Role::Control).await;
    control
        .send(Message::Config(Box::new(config)))
        .await
        .unwrap();
    let mut seen = Vec::new();
    until(&mut control, &mut seen, |m| {
        matches!(m, Message::Ready).then_some(())
    })
    .await;
    (control, seen)
}

fn config(width: u32, height: u32, html: &str) -> SessionConfig {
    SessionConfig {
        session_id: "agent-media-test".into(),
        width,
        height,
        start_url: data_url(html),
        kiosk: true,
        launch: None,
        launch_once: false,
        browser: BrowserConfig {
            binary: "/usr/bin/chromium".into(),
            extra_args: vec![],
            policy: None,
        },
        restart: RestartPolicy::default(),
        max_fps: 30,
        h264_tuning: sandcast_proto::H264Tuning::default(),
        server_time_ms: 0,
        agent_token: None,
        pause_unwatched_ms: 0,
        transfers: true,
        display_max: None,
        keyboard_layout: None,
    }
}

/// A `data:` URL of `html`, every byte but letters and digits escaped.
fn data_url(html: &str) -> String {
    let mut url = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        if b.is_ascii_alphanumeric() {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    url
}

/// Reads control messages until `pred` picks one; keeps all of them.
async fn until<T>(
    control: &mut Channel,
    seen: &mut Vec<Message>,
    mut pred: impl FnMut(&Message) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, control.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the agent; seen {seen:?}"))
            .unwrap_or_else(|| panic!("agent closed the control connection; seen {seen:?}"))
            .unwrap();
        let Frame::Message(msg) = frame else { continue };
        seen.push(msg.clone());
        if let Some(t) = pred(&msg) {
            return t;
        }
    }
}

async fn next_video(video: &mut Channel) -> VideoFrame {
    match tokio::time::timeout(Duration::from_secs(30), video.next())
        .await
        .expect("no video frame within 30 s")
        .expect("video connection closed")
        .unwrap()
    {
        Frame::Video(f) => f,
        other => panic!("expected a video frame, got {other:?}"),
    }
}

/// Microseconds since the Unix epoch, the clock of `capture_us`.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// NAL unit types in an Annex B byte stream.
fn nal_types(data: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 3 < data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            types.push(data[i + 3] & 0x1f);
            i += 3;
        } else {
            i += 1;
        }
    }
    types
}

/// Reads and decodes frames up to the next key frame captured after
/// `after_us`; returns it with its decoded size.
async fn next_key_frame(
    video: &mut Channel,
    dec: &mut Decoder,
    after_us: u64,
) -> (VideoFrame, Option<(usize, usize)>) {
    loop {
        let f = next_video(video).await;
        let size = decoded_size(dec, &f);
        if f.header.keyframe && f.header.capture_us > after_us {
            return (f, size);
        }
    }
}

/// Decodes `frame` and returns the picture's size.
fn decoded_size(dec: &mut Decoder, frame: &VideoFrame) -> Option<(usize, usize)> {
    dec.decode(&frame.data)
        .expect("the frame decodes")
        .map(|yuv| yuv.dimensions())
}

#[tokio::test]
async fn video_starts_at_the_session_size_and_follows_a_resize() {
    let h = Harness::new("video");
    let (mut control, mut seen) = ready(
        &h,
        config(
            800,
            600,
            "<body style='margin:0;background:rgb(0,160,0)'>video</body>",
        ),
    )
    .await;
    // The display was sized before anything ran on it.
    assert!(
        seen.contains(&Message::DisplaySize {
            width: 800,
            height: 600
        }),
        "{seen:?}"
    );

    control
        .send(Message::Video(VideoControl::Start {
            codec: Codec::H264,
            bitrate_bps: 2_000_000,
        }))
        .await
        .unwrap();
    let mut video = h.accept(Role::Video).await;
    let first = next_video(&mut video).await;
    assert_eq!(first.header.codec, Codec::H264);
    assert!(first.header.keyframe, "{:?}", first.header);
    assert_eq!((first.header.width, first.header.height), (800, 600));
    let types = nal_types(&first.data);
    assert!(
        types.contains(&7) && types.contains(&5),
        "SPS and IDR: {types:?}"
    );
    let mut dec = Decoder::new().unwrap();
    assert_eq!(decoded_size(&mut dec, &first), Some((800, 600)));

    control
        .send(Message::Resize {
            width: 1024,
            height: 768,
        })
        .await
        .unwrap();
    until(&mut control, &mut seen, |m| {
        (*m == Message::DisplaySize {
            width: 1024,
            height: 768,
        })
        .then_some(())
    })
    .await;
    // The first frame at the new size is a key frame (the encoder restarts),
    // so a viewer can decode it; frames captured just before the resize may
    // still arrive at the old size first.
    let first_new = loop {
        let f = next_video(&mut video).await;
        let size = decoded_size(&mut dec, &f);
        if (f.header.width, f.header.height) == (1024, 768) {
            break (f, size);
        }
        assert_eq!((f.header.width, f.header.height), (800, 600));
    };
    assert!(first_new.0.header.keyframe, "{:?}", first_new.0.header);
    assert_eq!(first_new.1, Some((1024, 768)));

    // The static page sends nothing more unless a key frame is asked for.
    let asked_at = now_us();
    control
        .send(Message::Video(VideoControl::KeyFrame))
        .await
        .unwrap();
    let (key, size) = next_key_frame(&mut video, &mut dec, asked_at).await;
    assert_eq!((key.header.width, key.header.height), (1024, 768));
    assert_eq!(size, Some((1024, 768)));

    // A display that dies comes back at the size the viewer chose, and the
    // video follows it onto the new display on the same connection.
    let xvfb = seen
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::Child(r) if r.name == "xvfb" && r.state == ChildState::Running => r.pid,
            _ => None,
        })
        .expect("Xvfb runs");
    let killed_at = now_us();
    // SAFETY: a plain signal to the agent's Xvfb, a process this test started.
    unsafe { libc::kill(xvfb as i32, libc::SIGKILL) };
    until(&mut control, &mut seen, |m| match m {
        Message::Child(r) if r.name == "xvfb" && r.state == ChildState::Running => {
            (r.pid != Some(xvfb)).then_some(())
        }
        _ => None,
    })
    .await;
    let (key, size) = next_key_frame(&mut video, &mut dec, killed_at).await;
    assert_eq!((key.header.width, key.header.height), (1024, 768));
    assert_eq!(size, Some((1024, 768)));
    let resized_again = seen
        .iter()
        .rev()
        .take_while(|m| !matches!(m, Message::Child(r) if r.name == "xvfb" && r.pid == Some(xvfb)));
    assert!(
        resized_again.into_iter().any(|m| *m
            == Message::DisplaySize {
                width: 1024,
                height: 768
            }),
        "{seen:?}"
    );

    // Stop closes the video connection; the session goes on.
    control
        .send(Message::Video(VideoControl::Stop))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match video.next().await {
                Some(Ok(Frame::Video(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the video connection stayed open after Stop");
    assert!(end.is_none(), "{end:?}");
    control.send(Message::Ping { seq: 9 }).await.unwrap();
    until(&mut control, &mut seen, |m| {
        matches!(m, Message::Pong { seq: 9 }).then_some(())
    })
    .await;
}

/// The browser's pid from its Running report, seen already or still to
/// come: Ready and the child reports travel separately, in either order.
async fn browser_pid(control: &mut Channel, seen: &mut Vec<Message>) -> u32 {
    let running = |m: &Message| match m {
        Message::Child(r) if r.name == "browser" && r.state == ChildState::Running => r.pid,
        _ => None,
    };
    match seen.iter().rev().find_map(running) {
        Some(pid) => pid,
        None => until(control, seen, running).await,
    }
}

/// The display the browser runs on, from its environment.
fn display_of(pid: u32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"DISPLAY="))
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .expect("the browser has DISPLAY")
}

/// Titles (`_NET_WM_NAME`, else `WM_NAME`) of the display's top-level windows.
fn titles(display: &str) -> Vec<String> {
    let (conn, screen) = x11rb::connect(Some(display)).unwrap();
    let root = conn.setup().roots[screen].root;
    let net_wm_name = conn
        .intern_atom(false, b"_NET_WM_NAME")
        .unwrap()
        .reply()
        .unwrap()
        .atom;
    let mut out = Vec::new();
    for w in conn.query_tree(root).unwrap().reply().unwrap().children {
        for atom in [net_wm_name, AtomEnum::WM_NAME.into()] {
            if let Ok(p) = conn
                .get_property(false, w, atom, AtomEnum::ANY, 0, 1024)
                .unwrap()
                .reply()
                && !p.value.is_empty()
            {
                out.push(String::from_utf8_lossy(&p.value).into_owned());
                break;
            }
        }
    }
    out
}

/// Polls the window titles until one starts with `prefix`.
async fn wait_title(display: &str, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = titles(display);
        if t.iter().any(|t| t.starts_with(prefix)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no window titled {prefix:?}: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key(code: &str, key: &str, down: bool) -> Message {
    Message::Input(InputEvent::Key {
        code: code.into(),
        key: key.into(),
        down,
    })
}

async fn ctrl(control: &mut Channel, code: &str, k: &str) {
    for m in [
        key("ControlLeft", "Control", true),
        key(code, k, true),
        key(code, k, false),
        key("ControlLeft", "Control", false),
    ] {
        control.send(m).await.unwrap();
    }
}

#[tokio::test]
async fn input_and_clipboard_reach_the_page_and_bad_input_is_counted() {
    let h = Harness::new("input");
    let html = "<title>ready</title><body style='margin:0'>\
        <input id=i style='position:absolute;left:0;top:0;width:100%;height:100%'>\
        <script>\
        const i = document.getElementById('i');\
        i.addEventListener('mousedown', () => {\
          if (document.title === 'ready') document.title = 'clicked';\
        });\
        i.addEventListener('keydown', e => { document.title = 'key ' + e.key; });\
        i.addEventListener('input', () => { document.title = 'value ' + i.value; });\
        </script></body>";
    let (mut control, mut seen) = ready(&h, config(800, 600, html)).await;
    let browser = browser_pid(&mut control, &mut seen).await;
    let display = display_of(browser);
    wait_title(&display, "ready").await;

    // Chromium drops input that comes before it is ready, so click until
    // the page answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for m in [
            Message::Input(InputEvent::PointerMove { x: 400, y: 300 }),
            Message::Input(InputEvent::PointerButton {
                button: PointerButton::Left,
                down: true,
            }),
            Message::Input(InputEvent::PointerButton {
                button: PointerButton::Left,
                down: false,
            }),
        ] {
            control.send(m).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if titles(&display).iter().any(|t| t.starts_with("clicked")) {
            break;
        }
        assert!(Instant::now() < deadline, "the page never saw a click");
    }
    control.send(key("KeyQ", "q", true)).await.unwrap();
    control.send(key("KeyQ", "q", false)).await.unwrap();
    wait_title(&display, "value q").await;

    // Server to session: the clipboard is set before the paste that
    // follows it is typed.
    control
        .send(Message::Clipboard {
            text: "from the server ✓".into(),
        })
        .await
        .unwrap();
    ctrl(&mut control, "KeyA", "a").await;
    ctrl(&mut control, "KeyV", "v").await;
    wait_title(&display, "value from the server ✓").await;

    // Session to server: a copy in the page.
    control
        .send(Message::Input(InputEvent::Text {
            text: " and back".into(),
        }))
        .await
        .unwrap();
    wait_title(&display, "value from the server ✓ and back").await;
    ctrl(&mut control, "KeyA", "a").await;
    ctrl(&mut control, "KeyC", "c").await;
    let copied = until(&mut control, &mut seen, |m| match m {
        Message::Clipboard { text } => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(copied, "from the server ✓ and back");

    // Out of range: dropped, counted, and the session goes on.
    control
        .send(Message::Input(InputEvent::PointerMove { x: -5, y: 10 }))
        .await
        .unwrap();
    let stats = until(&mut control, &mut seen, |m| match m {
        Message::Stats(s) if s.input_dropped > 0 => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(stats.input_dropped, 1, "{stats:?}");
    // The copy left everything selected: the next key replaces it.
    control.send(key("KeyZ", "z", true)).await.unwrap();
    control.send(key("KeyZ", "z", false)).await.unwrap();
    wait_title(&display, "value z").await;
}

/// Another client of `display` takes the CLIPBOARD (again each second, in
/// case the agent was not watching yet) and serves `text` as UTF8_STRING to
/// every request until `done` is set, as a browser would after a copy. The
/// session's own Chromium asks for TARGETS too when the owner changes; those
/// requests are refused, not answered with the text, and do not end the
/// serving (the agent's request may come after them).
fn copy_in_session(display: &str, text: Vec<u8>, done: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    use x11rb::protocol::Event;
    use x11rb::protocol::xproto::{
        CreateWindowAux, EventMask, PropMode, SELECTION_NOTIFY_EVENT, SelectionNotifyEvent,
        WindowClass,
    };
    use x11rb::wrapper::ConnectionExt as _;
    let (conn, screen) = x11rb::connect(Some(display)).unwrap();
    let root = conn.setup().roots[screen].root;
    let atom = |name: &[u8]| conn.intern_atom(false, name).unwrap().reply().unwrap().atom;
    let (clipboard, utf8) = (atom(b"CLIPBOARD"), atom(b"UTF8_STRING"));
    let win = conn.generate_id().unwrap();
    conn.create_window(
        0,
        win,
        root,
        0,
        0,
        1,
        1,
        0,
        WindowClass::INPUT_ONLY,
        0,
        &CreateWindowAux::new(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !done.load(Ordering::Relaxed) {
        conn.set_selection_owner(win, clipboard, x11rb::CURRENT_TIME)
            .unwrap();
        conn.flush().unwrap();
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && !done.load(Ordering::Relaxed) {
            match conn.poll_for_event().unwrap() {
                Some(Event::SelectionRequest(req)) => {
                    let served = req.target == utf8;
                    if served {
                        conn.change_property8(
                            PropMode::REPLACE,
                            req.requestor,
                            req.property,
                            req.target,
                            &text,
                        )
                        .unwrap();
                    }
                    let ev = SelectionNotifyEvent {
                        response_type: SELECTION_NOTIFY_EVENT,
                        sequence: 0,
                        time: req.time,
                        requestor: req.requestor,
                        selection: req.selection,
                        target: req.target,
                        property: if served { req.property } else { x11rb::NONE },
                    };
                    conn.send_event(false, req.requestor, EventMask::NO_EVENT, ev)
                        .unwrap();
                    conn.flush().unwrap();
                }
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

#[tokio::test]
async fn a_media_warning_reaches_the_server_as_a_log_line() {
    let h = Harness::new("tracing");
    let (mut control, mut seen) = ready(&h, config(640, 480, "<title>ready</title>")).await;
    let browser = browser_pid(&mut control, &mut seen).await;
    let display = display_of(browser);
    // A copy in the session over the limit: the clipboard code refuses it
    // with a `tracing` warning, which only the agent's subscriber carries to
    // the server.
    let len = sandcast_proto::MAX_TEXT_LEN + 1000;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let owner = std::thread::spawn({
        let done = done.clone();
        move || copy_in_session(&display, vec![b'a'; len], &done)
    });
    let line = until(&mut control, &mut seen, |m| match m {
        Message::Log(l) if l.line.contains("clipboard text too long") => Some(l.clone()),
        _ => None,
    })
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    owner.join().unwrap();
    assert!(
        line.line
            .starts_with("WARN sandcast_media::clipboard: clipboard text too long"),
        "{line:?}"
    );
    assert!(line.line.contains(&format!("len={len}")), "{line:?}");
    // The text itself never reaches the server.
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, Message::Clipboard { text } if text.len() >= len)),
        "the over-long copy was sent"
    );
}

//! End to end with a real Chromium on a real Xvfb: the browser follows a
//! resize, and injected keys, text and clicks reach a page.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandcast_media::xvfb::Xvfb;
use sandcast_media::{Capture, CaptureMethod, InputInjector, resize_display};
use sandcast_proto::{InputEvent, PointerButton};

/// Chromium in its own process group, killed with the group on drop.
struct Browser {
    child: Child,
    _profile: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    fn start(display: &str, width: u32, height: u32, html: &str) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "sandcast-media-chromium-{}-{}",
            std::process::id(),
            display.trim_start_matches(':')
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let page = profile.join("page.html");
        std::fs::write(&page, format!("<!doctype html><meta charset=utf-8>{html}")).unwrap();
        let url = format!("file://{}", page.display());
        let child = Command::new("/usr/bin/chromium")
            .args([
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-gpu",
                "--window-position=0,0",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.display()),
                &format!("--app={url}"),
            ])
            .env("DISPLAY", display)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/bin/chromium");
        Browser {
            child,
            _profile: TempDir(profile),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signals our own child's process group, which we created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn pixel(cap: &mut Capture, x: u32, y: u32) -> u32 {
    let f = cap.grab().unwrap();
    let i = (y * f.stride + x * 4) as usize;
    u32::from_le_bytes(f.bgra[i..i + 4].try_into().unwrap()) & 0xff_ffff
}

/// Writes the screen as a PPM file, for looking at a failure.
fn dump(cap: &mut Capture, path: &str) {
    let f = cap.grab().unwrap();
    let mut out = format!("P6 {} {} 255\n", f.width, f.height).into_bytes();
    for px in f.bgra.chunks(4) {
        out.extend_from_slice(&[px[2], px[1], px[0]]);
    }
    let _ = std::fs::write(path, out);
}

/// Polls the screen for up to `within` until (x, y) has `rgb`.
fn poll_pixel(cap: &mut Capture, x: u32, y: u32, rgb: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pixel(cap, x, y) == rgb {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Polls the screen until (x, y) has `rgb`.
fn wait_for_pixel(cap: &mut Capture, x: u32, y: u32, rgb: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cap.size().0 > x && cap.size().1 > y && pixel(cap, x, y) == rgb {
            return;
        }
        if Instant::now() >= deadline {
            dump(cap, "/tmp/sandcast-media-chromium-failure.ppm");
            panic!(
                "timed out waiting for {what}; screen in /tmp/sandcast-media-chromium-failure.ppm"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        cap.refresh_size().unwrap();
    }
}

#[test]
fn chromium_follows_a_resize() {
    let x = Xvfb::start(1920, 1080).unwrap();
    let _b = Browser::start(
        x.display(),
        1920,
        1080,
        "<body style='margin:0;background:#00ff00'></body>",
    );
    let mut cap = Capture::open(x.display(), CaptureMethod::Shm).unwrap();
    wait_for_pixel(&mut cap, 1900, 1060, 0x00ff00, "the page at 1920x1080");
    assert_eq!(resize_display(x.display(), 1280, 720).unwrap(), (1280, 720));
    cap.refresh_size().unwrap();
    assert_eq!(cap.size(), (1280, 720));
    wait_for_pixel(&mut cap, 1270, 710, 0x00ff00, "the page at 1280x720");
    // Growing again: the new area must be painted by the browser.
    assert_eq!(resize_display(x.display(), 1600, 900).unwrap(), (1600, 900));
    wait_for_pixel(&mut cap, 1590, 890, 0x00ff00, "the page at 1600x900");
}

#[test]
fn keys_text_and_clicks_reach_a_page() {
    let x = Xvfb::start(800, 600).unwrap();
    // Grey until the input is clicked (Chromium drops input that comes
    // before it is ready, so the test clicks until the page answers), red
    // once the input holds exactly what was typed, blue on a right click
    // after that.
    let html = "<body style='margin:0;background:#808080'>\
        <input id=i style='position:absolute;left:0;top:200px;width:600px;height:200px'>\
        <script>\
        const i = document.getElementById('i');\
        i.addEventListener('mousedown', () => {\
          if (i.value === '') document.body.style.background = '#ffffff';\
        });\
        i.addEventListener('input', () => {\
          if (i.value === 'aB ä€ж!') document.body.style.background = '#ff0000';\
        });\
        document.addEventListener('contextmenu', e => {\
          e.preventDefault();\
          if (i.value === 'aB ä€ж!') document.body.style.background = '#0000ff';\
        });\
        </script></body>";
    let _b = Browser::start(x.display(), 800, 600, html);
    let mut cap = Capture::open(x.display(), CaptureMethod::Shm).unwrap();
    wait_for_pixel(&mut cap, 750, 150, 0x808080, "the page");
    let mut inj = InputInjector::connect(x.display()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        inj.apply(&InputEvent::PointerMove { x: 300, y: 330 })
            .unwrap();
        for down in [true, false] {
            inj.apply(&InputEvent::PointerButton {
                button: PointerButton::Left,
                down,
            })
            .unwrap();
        }
        if poll_pixel(&mut cap, 750, 150, 0xffffff, Duration::from_millis(500)) {
            break;
        }
        assert!(Instant::now() < deadline, "the page never saw a click");
    }
    let key = |code: &str, key: &str, down| InputEvent::Key {
        code: code.into(),
        key: key.into(),
        down,
    };
    inj.apply(&key("KeyA", "a", true)).unwrap();
    inj.apply(&key("KeyA", "a", false)).unwrap();
    inj.apply(&key("ShiftLeft", "Shift", true)).unwrap();
    inj.apply(&key("KeyB", "B", true)).unwrap();
    inj.apply(&key("KeyB", "B", false)).unwrap();
    inj.apply(&key("ShiftLeft", "Shift", false)).unwrap();
    // Pasted or composed text, with characters no US key has.
    inj.apply(&InputEvent::Text {
        text: " ä€ж".into(),
    })
    .unwrap();
    // A key by the character the viewer's layout produced.
    inj.apply(&key("Digit1", "!", true)).unwrap();
    inj.apply(&key("Digit1", "!", false)).unwrap();
    wait_for_pixel(&mut cap, 750, 150, 0xff0000, "the typed text to match");
    inj.apply(&InputEvent::PointerMove { x: 700, y: 540 })
        .unwrap();
    for down in [true, false] {
        inj.apply(&InputEvent::PointerButton {
            button: PointerButton::Right,
            down,
        })
        .unwrap();
    }
    wait_for_pixel(&mut cap, 750, 150, 0x0000ff, "the right click");
    assert_eq!(inj.dropped(), 0);
}

#[test]
fn clipboard_round_trips_with_chromium() {
    let x = Xvfb::start(800, 600).unwrap();
    // Grey until the input is clicked, red once a paste put the viewer's
    // text in it.
    let html = "<body style='margin:0;background:#808080'>\
        <input id=i style='position:absolute;left:0;top:200px;width:600px;height:200px'>\
        <script>\
        const i = document.getElementById('i');\
        i.addEventListener('mousedown', () => {\
          if (i.value === '') document.body.style.background = '#ffffff';\
        });\
        i.addEventListener('input', () => {\
          if (i.value === 'from the viewer ✓') document.body.style.background = '#ff0000';\
        });\
        </script></body>";
    let _b = Browser::start(x.display(), 800, 600, html);
    let mut cap = Capture::open(x.display(), CaptureMethod::Shm).unwrap();
    wait_for_pixel(&mut cap, 750, 150, 0x808080, "the page");
    let mut inj = InputInjector::connect(x.display()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        inj.apply(&InputEvent::PointerMove { x: 300, y: 330 })
            .unwrap();
        for down in [true, false] {
            inj.apply(&InputEvent::PointerButton {
                button: PointerButton::Left,
                down,
            })
            .unwrap();
        }
        if poll_pixel(&mut cap, 750, 150, 0xffffff, Duration::from_millis(500)) {
            break;
        }
        assert!(Instant::now() < deadline, "the page never saw a click");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let clip = sandcast_media::Clipboard::spawn(x.display(), move |t| {
        let _ = tx.send(t);
    })
    .unwrap();
    let key = |code: &str, key: &str, down| InputEvent::Key {
        code: code.into(),
        key: key.into(),
        down,
    };
    let ctrl = |inj: &mut InputInjector, code: &str, k: &str| {
        inj.apply(&key("ControlLeft", "Control", true)).unwrap();
        inj.apply(&key(code, k, true)).unwrap();
        inj.apply(&key(code, k, false)).unwrap();
        inj.apply(&key("ControlLeft", "Control", false)).unwrap();
    };
    // Viewer to session: set, then Ctrl+V in the page.
    clip.set("from the viewer ✓").unwrap();
    ctrl(&mut inj, "KeyV", "v");
    wait_for_pixel(&mut cap, 750, 150, 0xff0000, "the pasted text");
    // Session to viewer: change the text, select all, Ctrl+C.
    inj.apply(&InputEvent::Text {
        text: " and back".into(),
    })
    .unwrap();
    ctrl(&mut inj, "KeyA", "a");
    ctrl(&mut inj, "KeyC", "c");
    let copied = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the copy in Chromium reached the callback");
    assert_eq!(copied, "from the viewer ✓ and back");
}

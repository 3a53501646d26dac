//! What the agent runs: command lines for the display, the browser, the VNC
//! server and the launch command, and how each is known to be ready.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use sandcast_proto::SessionConfig;
use tokio::io::AsyncReadExt;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{AtomEnum, ConnectionExt, EventMask, MapState};

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Program path or name.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Niceness the process starts with (0 = the agent's own).
    pub niceness: i32,
}

/// Niceness of the browser. A page that animates without pause makes an
/// unthrottled browser draw as fast as the CPU allows; at the same priority
/// it takes the CPU from the display server and the video pipeline, whose
/// work is bounded by the frame rate and sits on the path of every frame a
/// viewer sees. Ahead of it, they take what they need and the browser gets
/// the rest; with the CPU free it changes nothing. Measured through the
/// real viewer (docs/benchmarks.md): the encode of a change went from about
/// 9 to 6 ms, glass to glass from 29 to 25 ms at the median.
pub const BROWSER_NICENESS: i32 = 10;

/// The size Xvfb starts at: the largest a viewer may resize the session to
/// (`display_max`, at most what sandcast sets), never below the session's
/// own size.
pub fn xvfb_size(config: &SessionConfig) -> (u32, u32) {
    let most = sandcast_media::MAX_DISPLAY_SIZE;
    let (w, h) = config.display_max.unwrap_or(most);
    (
        w.max(config.width).min(most.0),
        h.max(config.height).min(most.1),
    )
}

/// Xvfb at `size` (see [`xvfb_size`]); it writes its display number to
/// `display_fd`. The agent shrinks it to the session's size at once.
pub fn xvfb(display_fd: i32, (w, h): (u32, u32)) -> Command {
    // Xvfb's RandR cannot grow the screen past its start size, so it starts
    // at the largest size a viewer may resize to; its framebuffer is that
    // size whatever is in use.
    Command {
        program: "Xvfb".into(),
        args: vec![
            "-displayfd".into(),
            display_fd.to_string(),
            "-screen".into(),
            "0".into(),
            format!("{w}x{h}x24"),
            "-nolisten".into(),
            "tcp".into(),
            "-noreset".into(),
            "-dpi".into(),
            "96".into(),
            "+extension".into(),
            "RANDR".into(),
            // Nothing in a session draws with OpenGL on the X server (the
            // browser runs with --disable-gpu); without GLX, Xvfb does not
            // load Mesa: 20 MiB less a session (docs/benchmarks.md).
            "-extension".into(),
            "GLX".into(),
        ],
        niceness: 0,
    }
}

/// The browser, on the start URL, filling the display, its DevTools server
/// on `devtools_port` of the session's own loopback.
pub fn browser(
    config: &SessionConfig,
    profile_dir: &Path,
    own_sandbox: bool,
    devtools_port: u16,
) -> Command {
    let mut args = vec![
        format!("--user-data-dir={}", profile_dir.display()),
        "--no-first-run".into(),
        "--no-default-browser-check".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        // What a session does not need, for memory (docs/benchmarks.md,
        // "Density"): the omnibox popup as a WebUI page (a renderer process
        // of its own; the native popup is used instead), a spare renderer
        // kept for the next navigation, and the network service's own
        // process (it runs in the browser's: the session is the sandbox
        // around both).
        "--disable-features=Translate,MediaRouter,WebUIOmniboxPopup,WebUIOmniboxFullPopup,\
         WebUIOmniboxAimPopup,SpareRendererForSitePerProcess"
            .into(),
        "--enable-features=NetworkServiceInProcess2".into(),
        "--password-store=basic".into(),
        "--noerrdialogs".into(),
        "--hide-crash-restore-bubble".into(),
        "--disable-session-crashed-bubble".into(),
        // Xvfb has no GPU; say so rather than let Chromium probe and log.
        "--disable-gpu".into(),
        "--window-position=0,0".into(),
        format!("--window-size={},{}", config.width, config.height),
        "--start-maximized".into(),
        // The agent's own DevTools conversation is on descriptors 3 and 4,
        // which only it holds (see `devtools`).
        "--remote-debugging-pipe".into(),
        // Automation clients reach the browser through this port, which
        // Chromium binds to 127.0.0.1 of the session's own network
        // namespace (or microVM): only the agent's tunnel, opened on the
        // server's request, leads there from outside. Session code could
        // use it too, but it can already ptrace the browser; web pages
        // cannot (Chromium refuses WebSockets with an Origin and checks Host).
        format!("--remote-debugging-port={devtools_port}"),
    ];
    if !own_sandbox {
        // The session itself is the sandbox; Chromium's own needs nested user
        // namespaces, which the sandbox backend's seccomp filter denies (and
        // some hosts forbid): see docs/security.md for the trade-off.
        args.push("--no-sandbox".into());
    }
    if config.kiosk {
        args.push("--kiosk".into());
    }
    args.extend(config.browser.extra_args.iter().cloned());
    args.push(config.start_url.clone());
    Command {
        program: config.browser.binary.clone(),
        args,
        niceness: BROWSER_NICENESS,
    }
}

/// Gives `display` the keyboard layout `value` (`de`, `us(intl)`) with
/// `setxkbmap`, part of Xvfb's own packages; an error says what failed.
pub async fn set_keyboard_layout(display: &str, value: &str) -> anyhow::Result<()> {
    let layout = sandcast_proto::KeyboardLayout::parse(value)?;
    let out = tokio::process::Command::new("setxkbmap")
        .arg("-display")
        .arg(display)
        .args(layout.setxkbmap_args())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running setxkbmap for keyboard layout {layout}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "setxkbmap could not set keyboard layout {layout} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// x11vnc on the display, tuned for latency: it waits 1 ms between screen
/// polls and defers updates 1 ms (its defaults of 20 ms double the latency),
/// and never naps when idle. It listens on the session's own loopback only.
pub fn vnc(display: &str, port: u16) -> Command {
    Command {
        program: "x11vnc".into(),
        args: [
            "-display",
            display,
            "-rfbport",
            &port.to_string(),
            "-localhost",
            "-forever",
            "-shared",
            "-nopw",
            "-noipv6",
            "-wait",
            "1",
            "-defer",
            "1",
            "-nonap",
            "-xkb",
            "-noxrecord",
            "-nowf",
            "-noscr",
            "-cursor",
            "arrow",
        ]
        .map(String::from)
        .to_vec(),
        niceness: 0,
    }
}

/// The operator's launch command, as given.
pub fn launch(argv: &[String]) -> Option<Command> {
    let (program, args) = argv.split_first()?;
    Some(Command {
        program: program.clone(),
        args: args.to_vec(),
        niceness: 0,
    })
}

/// Whether this kernel lets us make a user namespace, which Chromium's own
/// sandbox needs. Asked of `unshare(1)` so the agent stays single-threaded-safe.
pub async fn user_namespaces_work() -> bool {
    tokio::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A free TCP port on the loopback, for the VNC server.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until the VNC server on `port` greets with its RFB banner.
pub async fn wait_vnc(port: u16) -> anyhow::Result<()> {
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let mut banner = [0u8; 12];
            if s.read_exact(&mut banner).await.is_ok() && banner.starts_with(b"RFB ") {
                return Ok(());
            }
        }
        // Polling a condition: x11vnc gives no other signal of readiness.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until a mapped top-level window whose `WM_CLASS` names `class` is on
/// the display: the browser has drawn its first window. Event driven: it
/// watches the root window's substructure rather than polling.
///
/// Chromium still drops XTest input for a short while after this (its
/// renderer is not yet attached). The closest X-visible sign is the window
/// title: `""`, then `Untitled - Chromium`, then the page's title once the
/// navigation commits; but the placeholder is localised and a page may
/// never set a title, and damage or expose counts vary by page, so
/// readiness means "window mapped". A person's first input comes later than
/// that; tests retry their first click until the page answers.
pub fn wait_window_blocking(display: &str, class: &str) -> anyhow::Result<()> {
    let (conn, screen) = x11rb::connect(Some(display))
        .with_context(|| format!("connecting to display {display}"))?;
    let root = conn.setup().roots[screen].root;
    conn.change_window_attributes(
        root,
        &x11rb::protocol::xproto::ChangeWindowAttributesAux::new()
            .event_mask(EventMask::SUBSTRUCTURE_NOTIFY | EventMask::PROPERTY_CHANGE),
    )?
    .check()?;
    let class = class.to_ascii_lowercase();
    loop {
        if has_window(&conn, root, &class)? {
            return Ok(());
        }
        match conn.wait_for_event()? {
            Event::MapNotify(_) | Event::ConfigureNotify(_) | Event::PropertyNotify(_) => {}
            _ => continue,
        }
    }
}

fn has_window(conn: &impl Connection, root: u32, class: &str) -> anyhow::Result<bool> {
    let tree = conn.query_tree(root)?.reply()?;
    for w in tree.children {
        let Ok(attrs) = conn.get_window_attributes(w)?.reply() else {
            continue;
        };
        if attrs.map_state != MapState::VIEWABLE {
            continue;
        }
        let Ok(geo) = conn.get_geometry(w)?.reply() else {
            continue;
        };
        if geo.width < 100 || geo.height < 100 {
            continue;
        }
        let Ok(prop) = conn
            .get_property(false, w, AtomEnum::WM_CLASS, AtomEnum::STRING, 0, 256)?
            .reply()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&prop.value).to_ascii_lowercase();
        if text
            .split('\0')
            .any(|part| !part.is_empty() && part.contains(class))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The name a browser binary's windows carry in `WM_CLASS`.
pub fn window_class(binary: &str) -> String {
    let base = Path::new(binary)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Debian's wrapper script and the real binary share the class.
    base.trim_end_matches("-browser").to_string()
}

/// Reads Xvfb's display number from the pipe it was given with `-displayfd`.
pub async fn read_display(mut pipe: tokio::fs::File) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = pipe.read(&mut byte).await?;
        if n == 0 {
            bail!("Xvfb closed its display pipe without naming a display");
        }
        if byte[0] == b'\n' {
            break;
        }
        buf.push(byte[0]);
        if buf.len() > 16 {
            bail!("Xvfb wrote a bad display number");
        }
    }
    let n: u32 = String::from_utf8_lossy(&buf)
        .trim()
        .parse()
        .context("Xvfb wrote a bad display number")?;
    Ok(format!(":{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcast_proto::{BrowserConfig, RestartPolicy};

    fn config() -> SessionConfig {
        SessionConfig {
            session_id: "s1".into(),
            width: 1280,
            height: 720,
            start_url: "https://example.org/".into(),
            kiosk: true,
            launch: None,
            launch_once: false,
            browser: BrowserConfig {
                binary: "/usr/bin/chromium".into(),
                extra_args: vec!["--lang=de".into()],
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
        }
    }

    #[test]
    fn browser_command_line() {
        let cmd = browser(&config(), Path::new("/tmp/p"), false, 9333);
        assert_eq!(cmd.program, "/usr/bin/chromium");
        assert!(cmd.args.contains(&"--remote-debugging-pipe".to_string()));
        assert!(
            cmd.args
                .contains(&"--remote-debugging-port=9333".to_string())
        );
        assert!(cmd.args.contains(&"--no-sandbox".to_string()));
        assert!(cmd.args.contains(&"--kiosk".to_string()));
        assert!(cmd.args.contains(&"--window-size=1280,720".to_string()));
        assert!(cmd.args.contains(&"--user-data-dir=/tmp/p".to_string()));
        // Operator flags come after ours so they win; the URL comes last.
        let n = cmd.args.len();
        assert_eq!(cmd.args[n - 2], "--lang=de");
        assert_eq!(cmd.args[n - 1], "https://example.org/");
        let own = browser(&config(), Path::new("/tmp/p"), true, 9333);
        assert!(!own.args.contains(&"--no-sandbox".to_string()));
    }

    #[test]
    fn xvfb_command_line() {
        let x = xvfb(5, xvfb_size(&config()));
        assert_eq!(x.args[..2], ["-displayfd", "5"]);
        assert!(x.args.contains(&"3840x2160x24".to_string()));
    }

    #[test]
    fn xvfb_starts_at_the_largest_size_a_viewer_may_ask_for() {
        // No maximum given: the largest sandcast sets.
        assert_eq!(xvfb_size(&config()), (3840, 2160));
        let mut c = config();
        c.display_max = Some((2560, 1600));
        assert_eq!(xvfb_size(&c), (2560, 1600));
        assert!(
            xvfb(5, xvfb_size(&c))
                .args
                .contains(&"2560x1600x24".to_string())
        );
        // Never below the session's own size, never above the largest.
        c.width = 3000;
        c.height = 1200;
        assert_eq!(xvfb_size(&c), (3000, 1600));
        c.display_max = Some((9999, 9999));
        assert_eq!(xvfb_size(&c), (3840, 2160));
    }

    #[test]
    fn vnc_command_line_is_tuned_for_latency() {
        let v = vnc(":3", 5901);
        let line = v.args.join(" ");
        assert!(
            line.contains("-display :3 -rfbport 5901 -localhost"),
            "{line}"
        );
        assert!(line.contains("-wait 1 -defer 1 -nonap"), "{line}");
    }

    #[test]
    fn launch_splits_argv() {
        assert_eq!(launch(&[]), None);
        let cmd = launch(&["xterm".into(), "-e".into(), "top".into()]).unwrap();
        assert_eq!(cmd.program, "xterm");
        assert_eq!(cmd.args, ["-e", "top"]);
    }

    #[test]
    fn window_classes() {
        assert_eq!(window_class("/usr/bin/chromium"), "chromium");
        assert_eq!(window_class("chromium-browser"), "chromium");
        assert_eq!(
            window_class("/opt/google/chrome/google-chrome"),
            "google-chrome"
        );
    }
}

//! Sessions through the real server, sandbox and agent, seen in headless
//! Chromium viewers: noVNC and WebRTC, input, resize, two viewers,
//! isolation of the page and of viewer tokens.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sandcast_e2e::{
    LOCAL_PASTE, REMOTE_COPY, Server, ServerOptions, child, children_running, clipboard_page,
    clipboard_page_copying, colours, data_url, find_session_process, input_page, input_steps,
    run_browser, run_viewer, wait_no_leftovers, with_query,
};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// Creates a session showing `page` and waits until it is ready.
fn ready_session(s: &Server, page: &str) -> (String, Value) {
    let created =
        s.create(&json!({ "start_url": page, "kiosk": true, "width": 1280, "height": 720 }));
    let id = created["id"].as_str().expect("id").to_string();
    s.wait_state(&id, "ready", READY);
    (id, created)
}

/// Deletes the session and asserts nothing of it is left on the host.
fn delete_clean(s: &Server, id: &str) {
    let stopped = s.delete(id);
    assert_eq!(stopped["state"], "stopped", "{stopped:#}");
    let left = wait_no_leftovers(id, Duration::from_secs(15));
    assert!(
        left.is_empty(),
        "session {id} left behind:\n{}",
        left.join("\n")
    );
}

/// [`input_steps`], then `more`.
fn input_steps_then(more: Value) -> Value {
    let mut steps = input_steps();
    let list = steps.as_array_mut().expect("an array");
    list.extend(more.as_array().expect("an array").iter().cloned());
    steps
}

#[test]
fn novnc_lifecycle_shows_the_page_takes_input_and_leaves_nothing() {
    let s = Server::start_default();
    let created = s
        .create(&json!({ "start_url": input_page(), "kiosk": true, "width": 1280, "height": 720 }));
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "starting", "{created:#}");
    let token = created["viewer_token"].as_str().expect("viewer_token");
    let url = created["viewer_url"].as_str().expect("viewer_url");
    assert!(
        url.starts_with(&format!("{}/viewer/{id}", s.base))
            && url.ends_with(&format!("#token={token}")),
        "viewer_url {url:?}"
    );
    assert!(
        created["expires_at"]
            .as_str()
            .is_some_and(|t| t.contains('T')),
        "{created:#}"
    );

    let ready = s.wait_state(&id, "ready", READY);
    assert!(
        children_running(&ready),
        "ready with children not running: {ready:#}"
    );
    assert!(ready["ready_at"].is_string(), "{ready:#}");
    for (name, hint) in [("xvfb", "Xvfb"), ("browser", "chrom"), ("vnc", "x11vnc")] {
        let pid = child(&ready, name).unwrap()["pid"].as_i64().unwrap() as i32;
        assert!(
            find_session_process(&id, pid, hint).is_some(),
            "{name} pid {pid} is no {hint} process of session {id}"
        );
    }

    let view = run_viewer(&json!({
        "url": with_query(url, "mode=vnc"),
        "kind": "canvas",
        "mode": "vnc",
        "steps": input_steps(),
    }));
    eprintln!("noVNC steps: {}", view["steps"]);

    let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None);
    assert_eq!(logs.status, 200, "{logs:?}");
    assert!(
        logs.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{:?}",
        logs.headers
    );
    assert!(
        logs.body.lines().any(|l| l.contains("browser")),
        "no browser lines in the session log:\n{}",
        logs.body
    );
    assert!(
        !logs.body.contains(token),
        "the session log holds the viewer token"
    );
    assert!(
        !s.logs().contains(token),
        "the server logged a viewer token"
    );

    delete_clean(&s, &id);
    let state = s.raw(
        "GET",
        &format!("/viewer/{id}/state"),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    );
    if state.status == 200 {
        assert_eq!(state.json()["state"], "stopped", "{}", state.body);
    }
}

#[test]
fn webrtc_two_viewers_see_the_page_and_input_changes_it() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &input_page());
    let mut steps = input_steps();
    steps.as_array_mut().unwrap().push(json!({ "stats": true }));
    let view = run_viewer(&json!({
        "url": created["viewer_url"],
        "kind": "video",
        "mode": "webrtc",
        "viewers": 2,
        "steps": steps,
    }));
    eprintln!("WebRTC steps: {}", view["steps"]);
    for st in view["steps"][5]["stats"].as_array().unwrap() {
        assert!(st["framesDecoded"].as_u64().unwrap_or(0) > 0, "{st}");
        assert_eq!(st["localProtocol"], "udp", "{st}");
    }
    delete_clean(&s, &id);
}

/// A browser that stops itself before it starts: `chromium` in a directory
/// the sandbox shows (the session sees the host's root read-only, with its
/// own /tmp, /var/tmp, /run and /home), removed at the end.
struct HeldBrowser {
    dir: std::path::PathBuf,
}

impl HeldBrowser {
    fn new() -> HeldBrowser {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::path::PathBuf::from(format!("/srv/sandcast-e2e-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("chromium");
        std::fs::write(
            &bin,
            "#!/bin/sh\nkill -STOP $$\nexec /usr/bin/chromium \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        HeldBrowser { dir }
    }

    fn binary(&self) -> String {
        self.dir.join("chromium").to_str().unwrap().to_string()
    }
}

impl Drop for HeldBrowser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a viewer scenario on a thread of its own and returns once it has
/// created `signal` (its `signal` step), which says it `reached` a point.
fn viewer_until(
    scenario: Value,
    signal: &std::path::Path,
    reached: &str,
) -> std::thread::JoinHandle<Value> {
    let viewer = std::thread::spawn(move || run_viewer(&scenario));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !signal.exists() {
        assert!(
            !viewer.is_finished(),
            "the viewer ended before it {reached}: {:?}",
            viewer.join()
        );
        assert!(Instant::now() < deadline, "the viewer never {reached}");
        std::thread::sleep(Duration::from_millis(20));
    }
    viewer
}

/// The process state letter of `pid` (`T` when stopped).
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn a_viewer_connects_over_webrtc_while_the_session_starts() {
    let held = HeldBrowser::new();
    let s = Server::start(ServerOptions {
        browser_binary: Some(held.binary()),
        ..Default::default()
    });
    let created = s
        .create(&json!({ "start_url": input_page(), "kiosk": true, "width": 1280, "height": 720 }));
    let id = created["id"].as_str().unwrap().to_string();
    // The session cannot become ready until its browser is let go.
    let deadline = Instant::now() + READY;
    let browser = loop {
        let stopped = sandcast_e2e::session_processes(&id)
            .into_iter()
            .find(|p| p.cmdline.contains(&held.binary()) && proc_state(p.pid) == Some('T'));
        if let Some(p) = stopped {
            break p;
        }
        assert!(Instant::now() < deadline, "the held browser never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(s.session(&id)["state"], "starting");

    let signal = s.data_dir().join("viewer-connected");
    let scenario = json!({
        "url": with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc"),
        "kind": "video",
        "steps": [
            { "expectStatus": { "state": "starting", "connected": true, "mode": "webrtc" }, "timeoutMs": 30000 },
            { "signal": signal },
            { "expect": colours::START, "timeoutMs": 40000 },
            { "expectStatus": { "state": "ready", "connected": true } },
        ],
    });
    let viewer = viewer_until(scenario, &signal, "connected");
    // Connected, and the session still starting: the browser is held.
    assert_eq!(s.session(&id)["state"], "starting");
    assert_eq!(proc_state(browser.pid), Some('T'));
    // SAFETY: a plain signal to a process of this test's session.
    assert_eq!(unsafe { libc::kill(browser.pid, libc::SIGCONT) }, 0);
    let view = viewer.join().expect("the viewer thread");
    eprintln!("early viewer steps: {}", view["steps"]);
    delete_clean(&s, &id);
}

/// The value of the series `name{labels}` in a metrics text.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_operator_sees_each_sessions_video_in_the_metrics() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &input_page());
    let dir = tempfile::tempdir().unwrap();
    let (watching, done) = (dir.path().join("watching"), dir.path().join("done"));
    let scenario = json!({
        "url": with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc"),
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            { "signal": watching },
            { "waitFile": done, "timeoutMs": 60000 },
        ],
    });
    let viewer = viewer_until(scenario, &watching, "showed the page");
    let with_key = s.api("GET", "/metrics", None);
    assert_eq!(with_key.status, 200);
    let text = with_key.body.clone();
    let session = format!("{{session=\"{id}\"}}");
    assert_eq!(
        series(&text, &format!("sandcast_session_viewers{session}")),
        Some(1.0),
        "{text}"
    );
    let viewer_line = text
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "sandcast_viewer_frames_sent_total{{session=\"{id}\",viewer="
            ))
        })
        .unwrap_or_else(|| panic!("no viewer series in {text}"));
    let labels = &viewer_line[viewer_line.find('{').unwrap()..=viewer_line.find('}').unwrap()];
    let frames = series(&text, &format!("sandcast_viewer_frames_sent_total{labels}")).unwrap();
    let keys = series(
        &text,
        &format!("sandcast_viewer_key_frames_sent_total{labels}"),
    )
    .unwrap();
    let bytes = series(&text, &format!("sandcast_viewer_sent_bytes_total{labels}")).unwrap();
    assert!(frames >= 1.0 && keys >= 1.0 && keys <= frames, "{text}");
    assert!(bytes > 1000.0, "{text}");
    assert!(
        series(&text, &format!("sandcast_viewer_rtt_seconds{labels}")).is_some(),
        "{text}"
    );
    assert!(
        series(&text, &format!("sandcast_viewer_loss_ratio{labels}")).is_some(),
        "{text}"
    );
    assert!(
        series(
            &text,
            &format!("sandcast_viewer_target_bitrate_bps{labels}")
        )
        .unwrap()
            > 0.0,
        "{text}"
    );
    // The agent's own counts come every few seconds (when they changed).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = s.api("GET", "/metrics", None).body;
        let encoded = series(
            &text,
            &format!("sandcast_session_frames_encoded_total{session}"),
        );
        let spent = series(&text, &format!("sandcast_session_encode_seconds{session}"));
        if encoded.is_some_and(|n| n >= 1.0) && spent.is_some_and(|t| t > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's counts never came: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Session ids are not for a scrape without the key.
    let open = s.raw("GET", "/metrics", &[], None);
    assert_eq!(open.status, 200);
    let open = open.body;
    assert!(
        open.contains("sandcast_sessions{state=\"ready\"} 1"),
        "{open}"
    );
    assert!(!open.contains(&id), "{open}");

    std::fs::write(&done, b"").unwrap();
    viewer.join().expect("the viewer thread");
    delete_clean(&s, &id);
    let text = s.api("GET", "/metrics", None).body;
    assert!(
        !text.contains(&id),
        "an ended session's series stay: {text}"
    );
}

/// A server with WebRTC turned off, and a ready session on the input page.
fn without_webrtc() -> (Server, String, Value) {
    let s = Server::start(ServerOptions {
        webrtc: "enabled = false".into(),
        ..Default::default()
    });
    let (id, created) = ready_session(&s, &input_page());
    (s, id, created)
}

/// A viewer in auto mode shows the page in `mode`, takes a click, and its
/// status has `status`.
fn falls_back_to(url: &str, mode: &str, chromium_args: Value, status: Value) {
    let view = run_viewer(&json!({
        "url": url,
        "kind": "canvas",
        "mode": mode,
        "chromiumArgs": chromium_args,
        "steps": [
            { "expect": colours::START, "timeoutMs": 40000 },
            { "click": true },
            { "expect": colours::CLICKED },
            { "expectStatus": status },
        ],
    }));
    eprintln!("fallback to {mode}: {}", view["steps"][0]["samples"][0]);
}

#[test]
fn without_webrtc_the_viewer_falls_back_to_the_websocket_stream_by_itself() {
    let (s, id, created) = without_webrtc();
    // Auto mode (no ?mode=): WebRTC cannot connect, so the viewer must switch
    // to the video stream on the server's own port, and type through it.
    falls_back_to(
        created["viewer_url"].as_str().unwrap(),
        "ws",
        json!([]),
        json!({ "mode": "ws", "connected": true }),
    );
    delete_clean(&s, &id);
}

#[test]
fn without_webrtc_or_webcodecs_the_viewer_falls_back_to_novnc() {
    let (s, id, created) = without_webrtc();
    // Opened by another name than 127.0.0.1 over plain HTTP, the viewer page
    // is not a secure context: the browser gives it no WebCodecs, as on a
    // plain-HTTP server reached from another machine.
    let url = created["viewer_url"]
        .as_str()
        .unwrap()
        .replace("127.0.0.1", "sandcast.test");
    assert!(url.contains("sandcast.test"), "{url}");
    falls_back_to(
        &url,
        "vnc",
        json!(["--host-resolver-rules=MAP sandcast.test 127.0.0.1"]),
        json!({ "mode": "vnc", "secureContext": false }),
    );
    delete_clean(&s, &id);
}

#[test]
fn the_websocket_stream_connects_while_the_session_starts_and_is_a_viewer() {
    let s = Server::start_default();
    // The viewer opens right after the POST, as a user's would, with the
    // stream forced: it connects while the session starts.
    let created = s
        .create(&json!({ "start_url": input_page(), "kiosk": true, "width": 1280, "height": 720 }));
    let id = created["id"].as_str().unwrap().to_string();
    let url = with_query(created["viewer_url"].as_str().unwrap(), "mode=ws");
    let dir = tempfile::tempdir().unwrap();
    let shown = dir.path().join("shown");
    let done = dir.path().join("done");
    let viewer = viewer_until(
        json!({
            "url": url,
            "kind": "canvas",
            "mode": "ws",
            "steps": input_steps_then(json!([
                { "stats": true },
                { "signal": shown.to_str().unwrap() },
                { "waitFile": done.to_str().unwrap(), "timeoutMs": 30000 },
            ])),
        }),
        &shown,
        "showed the page",
    );
    // It counts as a viewer: the session says so, and is not idle.
    let session = s.session(&id);
    assert_eq!(session["viewers"], 1, "{session:#}");
    std::fs::write(&done, b"").unwrap();
    let view = viewer.join().expect("the viewer thread");
    let stats = &view["steps"][5]["stats"][0];
    assert_eq!(stats["mode"], "ws", "{stats:#}");
    assert_eq!(stats["protocol"], "websocket", "{stats:#}");
    assert!(
        stats["codec"]
            .as_str()
            .is_some_and(|c| c.starts_with("avc1")),
        "{stats:#}"
    );
    // The viewer left: the count goes back (the socket's end reaches the
    // session's task a moment later).
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.session(&id)["viewers"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the stream's viewer is still counted: {:#}",
            s.session(&id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !s.logs().contains(created["viewer_token"].as_str().unwrap()),
        "the server logged a viewer token"
    );
    delete_clean(&s, &id);
}

/// An nftables table that drops packets to some ports on this host
/// (`("udp", 3478)`), removed on drop.
struct PortBlock(String);

impl PortBlock {
    fn ports(ports: &[(&str, u16)]) -> PortBlock {
        let table = format!("sce2e_block_{}", ports[0].1);
        let drops: String = ports
            .iter()
            .map(|(proto, port)| format!("  {proto} dport {port} drop\n"))
            .collect();
        let rules = format!(
            "table inet {table} {{\n chain input {{\n  type filter hook input priority -50;\n{drops} }}\n}}\n"
        );
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft refused {rules}");
        PortBlock(table)
    }
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .status();
    }
}

/// The gateway's UDP and ICE-TCP ports, from the keyed health.
fn gateway_ports(s: &Server) -> (u16, u16) {
    let health: Value = s.api("GET", "/api/health", None).json();
    let port = |v: &Value| -> Option<u16> { v.as_str()?.rsplit(':').next()?.parse().ok() };
    let udp = port(&health["webrtc"]["udp"][0])
        .unwrap_or_else(|| panic!("no gateway UDP port in /health: {health}"));
    let tcp = port(&health["webrtc"]["tcp"])
        .unwrap_or_else(|| panic!("no gateway ICE-TCP port in /health: {health}"));
    (udp, tcp)
}

#[test]
fn with_udp_blocked_webrtc_runs_over_ice_tcp() {
    let s = Server::start_default();
    let (udp, _) = gateway_ports(&s);
    let _block = PortBlock::ports(&[("udp", udp)]);
    let (id, created) = ready_session(&s, &input_page());
    let view = run_viewer(&json!({
        "url": created["viewer_url"],
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            { "click": true },
            { "expect": colours::CLICKED },
            { "stats": true },
        ],
    }));
    let st = &view["steps"][3]["stats"][0];
    eprintln!("stats with UDP blocked: {st}");
    assert_eq!(st["localProtocol"], "tcp", "{st}");
    assert!(st["framesDecoded"].as_u64().unwrap_or(0) > 0, "{st}");
    delete_clean(&s, &id);
}

#[test]
fn with_only_the_http_port_reachable_the_viewer_streams_over_the_websocket() {
    let s = Server::start_default();
    let (udp, tcp) = gateway_ports(&s);
    // A corporate network: UDP and the ICE-TCP port blocked, HTTP passes.
    let _block = PortBlock::ports(&[("udp", udp), ("tcp", tcp)]);
    let (id, created) = ready_session(&s, &input_page());
    let view = run_viewer(&json!({
        "url": with_query(created["viewer_url"].as_str().unwrap(), "webrtc-timeout=3000"),
        "kind": "canvas",
        "mode": "ws",
        "steps": input_steps_then(json!([
            { "expectStatus": { "mode": "ws", "path": "WebRTC did not connect within 3 s" } },
        ])),
    }));
    eprintln!("only HTTP: {}", view["steps"][5]["got"]);
    delete_clean(&s, &id);
}

#[test]
fn webrtc_viewer_resize_resizes_the_remote_display() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &input_page());
    let view = run_viewer(&json!({
        "url": created["viewer_url"],
        "kind": "video",
        "mode": "webrtc",
        "viewport": [1280, 800],
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            { "resize": [900, 640] },
            { "expectResized": { "max": [900, 640] } },
            { "expect": colours::START },
        ],
    }));
    let last = &view["steps"][2]["sample"];
    let (w, h) = (
        last["width"].as_u64().unwrap(),
        last["height"].as_u64().unwrap(),
    );
    let got = s.wait_session(&id, Duration::from_secs(10), "the video's size", |v| {
        (v["width"] == w && v["height"] == h).then_some(true)
    });
    assert_eq!(
        (got["width"].as_u64(), got["height"].as_u64()),
        (Some(w), Some(h))
    );
    delete_clean(&s, &id);
}

#[test]
fn webrtc_clipboard_round_trips_both_ways() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &clipboard_page());
    let view = run_viewer(&json!({
        "url": created["viewer_url"],
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            // Session to viewer: the page copies on a click.
            { "click": true },
            { "expect": colours::CLICKED },
            { "expectRemoteClipboard": REMOTE_COPY },
            // Viewer to session: Ctrl+V in the viewer pastes the viewer's text
            // into the page's text area.
            { "copyLocal": LOCAL_PASTE },
            { "paste": true },
            { "expect": colours::TYPED },
        ],
    }));
    eprintln!("clipboard steps: {}", view["steps"]);
    delete_clean(&s, &id);
}

/// The agent's own warnings (here: the clipboard code refusing a copy over
/// the limit) reach the session's log, where the operator reads them.
#[test]
fn an_agent_warning_shows_in_the_session_log() {
    let s = Server::start_default();
    let len = 70_000;
    let (id, created) = ready_session(&s, &clipboard_page_copying(&format!("'a'.repeat({len})")));
    run_viewer(&json!({
        "url": created["viewer_url"],
        "kind": "video",
        "mode": "webrtc",
        "steps": [
            { "expect": colours::START, "timeoutMs": 30000 },
            // The page copies 70,000 characters on the click.
            { "click": true },
            { "expect": colours::CLICKED },
        ],
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let logs = s.api("GET", &format!("/api/sessions/{id}/logs"), None);
        assert_eq!(logs.status, 200, "{logs:?}");
        if let Some(l) = logs
            .body
            .lines()
            .find(|l| l.contains("clipboard text too long"))
        {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no clipboard warning in the session log:\n{}",
            logs.body
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        line.contains("WARN sandcast_media::clipboard") && line.contains(&format!("len={len}")),
        "{line}"
    );
    delete_clean(&s, &id);
}

/// A TCP listener on every host address that answers HTTP 200 and counts
/// connections: any connection from a session is an isolation failure.
struct Canary {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Canary {
    fn start() -> Canary {
        let l = TcpListener::bind("0.0.0.0:0").expect("bind canary");
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = c.read(&mut buf);
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Canary { port, hits }
    }
}

/// The host's IPv4 addresses (all interfaces).
fn host_ipv4() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.position(|w| w == "inet")?;
            it.next()?.split('/').next().map(String::from)
        })
        .collect()
}

/// A page that requests every URL in its fragment (JSON list), then turns
/// teal when none answered, magenta when one did (grey while trying).
fn probe_page() -> String {
    data_url(
        "<!doctype html><html><head><style>html,body{margin:0;height:100%;background:#808080}</style></head><body><script>\
         const urls=JSON.parse(decodeURIComponent(location.hash.slice(1)));const reached=[];\
         const tries=urls.map(u=>u.startsWith('ws')\
           ?new Promise(r=>{try{const w=new WebSocket(u);const t=setTimeout(()=>{w.close();r()},4000);\
              w.onopen=()=>{reached.push(u);clearTimeout(t);r()};w.onerror=()=>{clearTimeout(t);r()}}catch(e){r()}})\
           :fetch(u,{mode:'no-cors',cache:'no-store',signal:AbortSignal.timeout(4000)}).then(()=>reached.push(u),()=>{}));\
         Promise.all(tries).then(()=>{document.title='reached:'+JSON.stringify(reached);\
           document.body.style.background=reached.length?'#c000c0':'#00c0c0'});\
         </script></body></html>",
    )
}

#[test]
fn a_session_cannot_reach_the_host_and_tokens_open_only_their_session() {
    let s = Server::start_default();
    let canary = Canary::start();
    // Session A first: B probes its viewer tunnel with its token.
    let (a, created_a) = ready_session(&s, "about:blank");
    let token_a = created_a["viewer_token"].as_str().unwrap().to_string();

    let api = s.port;
    let mut urls = vec![
        format!("http://127.0.0.1:{api}/health"),
        format!("http://localhost:{api}/health"),
        format!("ws://127.0.0.1:{api}/viewer/{a}/vnc?token={token_a}"),
    ];
    for ip in host_ipv4() {
        urls.push(format!("http://{ip}:{}/", canary.port));
    }
    let fragment = |u: &[String]| {
        let j = serde_json::to_string(u).unwrap();
        j.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };

    // Control: the same page, run on the host itself, does reach the server.
    let control_urls = vec![
        format!("http://127.0.0.1:{api}/health"),
        format!("http://127.0.0.1:{}/", canary.port),
    ];
    let control = run_browser(
        "e2e-viewer.mjs",
        &json!({ "control": format!("{}#{}", probe_page(), fragment(&control_urls)), "expect": "#c000c0" }),
    );
    assert!(
        control["ok"] == true,
        "the probe page does not reach the host even from the host: {control:#}"
    );
    assert!(
        canary.hits.load(Ordering::SeqCst) >= 1,
        "control never reached the canary"
    );
    let before = canary.hits.load(Ordering::SeqCst);

    let (b, created_b) = ready_session(&s, &format!("{}#{}", probe_page(), fragment(&urls)));
    let token_b = created_b["viewer_token"].as_str().unwrap().to_string();
    let view = run_viewer(&json!({
        "url": with_query(created_b["viewer_url"].as_str().unwrap(), "mode=vnc"),
        "kind": "canvas",
        "mode": "vnc",
        "steps": [{ "expect": "#00c0c0", "tolerance": 40, "timeoutMs": 40000 }],
    }));
    eprintln!("probe targets {urls:?}; viewer {}", view["steps"]);
    assert_eq!(
        canary.hits.load(Ordering::SeqCst),
        before,
        "a session connected to the host"
    );

    // Viewer tokens: each opens its own session only.
    let state = |id: &str, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        s.raw("GET", &format!("/viewer/{id}/state"), &h, None)
    };
    let own = state(&b, Some(&token_b));
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(own.json()["id"], b.as_str());
    assert_eq!(own.json()["state"], "ready");
    for (what, r) in [
        ("A's token on B", state(&b, Some(&token_a))),
        ("no token", state(&b, None)),
        ("wrong token", state(&b, Some("not-a-token"))),
        ("B's token on A", state(&a, Some(&token_b))),
    ] {
        assert!(matches!(r.status, 401 | 403), "{what}: {r:?}");
        assert!(r.json()["error"].is_string(), "{what}: {}", r.body);
        assert!(
            !r.body.contains("\"children\""),
            "{what} leaked the state: {}",
            r.body
        );
    }
    let unknown = state("no-such-session-1234", Some(&token_a));
    assert!(matches!(unknown.status, 401 | 403 | 404), "{unknown:?}");

    assert_eq!(
        s.ws_handshake(&format!("/viewer/{b}/vnc?token={token_b}")),
        101
    );
    for (what, path) in [
        ("A's token", format!("/viewer/{b}/vnc?token={token_a}")),
        ("no token", format!("/viewer/{b}/vnc")),
        ("wrong token", format!("/viewer/{b}/vnc?token=x{token_b}")),
    ] {
        let code = s.ws_handshake(&path);
        assert!(
            matches!(code, 401 | 403),
            "VNC WebSocket of B with {what}: {code}"
        );
    }
    let offer = s.raw(
        "POST",
        &format!("/api/webrtc/session/{b}/offer"),
        &[
            ("authorization", &format!("Bearer {token_a}")),
            ("content-type", "application/json"),
        ],
        Some(br#"{"type":"offer","sdp":"v=0\r\n"}"#),
    );
    assert!(
        matches!(offer.status, 401 | 403),
        "offer for B with A's token: {offer:?}"
    );

    // B first: its page's URL names A, so B's browser mentions A's id.
    delete_clean(&s, &b);
    delete_clean(&s, &a);
}

/// A raw client of a session's WebSocket video stream with `token`.
fn video_socket(
    s: &Server,
    id: &str,
    token: &str,
) -> Result<
    tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    tungstenite::Error,
> {
    let (ws, _) = tungstenite::connect(format!(
        "ws://127.0.0.1:{}/viewer/{id}/video?token={token}",
        s.port
    ))?;
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    Ok(ws)
}

/// The HTTP status of a refused WebSocket upgrade, and its body.
fn refused(r: Result<impl std::fmt::Debug, tungstenite::Error>) -> (u16, String) {
    match r {
        Err(tungstenite::Error::Http(res)) => (
            res.status().as_u16(),
            String::from_utf8_lossy(res.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected a refused upgrade, got {other:?}"),
    }
}

#[test]
fn the_video_socket_sends_documented_frames_bounds_its_viewers_and_ends_on_revocation() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &input_page());
    let token = created["viewer_token"].as_str().unwrap();

    let mut ws = video_socket(&s, &id, token).expect("the video socket opens");
    let m = loop {
        if let tungstenite::Message::Binary(m) = ws.read().expect("a frame") {
            break m;
        }
    };
    assert!(m.len() > 22, "a frame of {} bytes", m.len());
    assert_eq!(m[0], 1, "H.264 without WebRTC viewers");
    assert_eq!(m[1] & 1, 1, "the stream starts at a key frame");
    let size = (
        u16::from_be_bytes([m[2], m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    );
    assert_eq!(size, (1280, 720));
    let capture_us = u64::from_be_bytes(m[10..18].try_into().unwrap());
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    assert!(
        capture_us <= now_us + 1_000_000 && now_us - capture_us < 60_000_000,
        "capture time {capture_us} µs, now {now_us} µs"
    );
    assert_eq!(&m[18..22], &[0, 0, 0, 1], "Annex B: a start code first");
    assert_eq!(s.session(&id)["viewers"], 1);
    // The operator sees what the stream sent (counted as it is sent).
    let metrics = s.api("GET", "/metrics", None).body;
    let sent = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "sandcast_stream_frames_sent_total{{session=\"{id}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no stream frames in /metrics:\n{metrics}"));
    assert!(sent >= 1, "{sent} frames sent");
    assert!(
        metrics.contains(&format!(
            "sandcast_stream_freezes_total{{session=\"{id}\"}} 0"
        )),
        "{metrics}"
    );

    // As many as WebRTC allows a session; one more is refused, saying why.
    let mut more: Vec<_> = (1..16)
        .map(|_| video_socket(&s, &id, token).expect("a viewer within the limit"))
        .collect();
    let (status, body) = refused(video_socket(&s, &id, token));
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("most viewers on the video stream allowed (16)"),
        "{body}"
    );
    // A slot is free again once the server has seen a viewer go.
    drop(more.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let extra = loop {
        match video_socket(&s, &id, token) {
            Ok(w) => break w,
            Err(e) => {
                assert!(Instant::now() < deadline, "no slot came free: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    drop(extra);

    let (status, body) = refused(video_socket(&s, &id, "not-a-token"));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token"), "{body}");

    // A view token watches the stream; revoking it closes the socket.
    drop(more);
    let view = s.api(
        "POST",
        &format!("/api/sessions/{id}/tokens"),
        Some(&json!({"role": "view"}).to_string()),
    );
    assert_eq!(view.status, 201, "{view:?}");
    let view = view.json();
    let mut watcher =
        video_socket(&s, &id, view["token"].as_str().unwrap()).expect("a view token's stream");
    assert!(
        matches!(watcher.read(), Ok(tungstenite::Message::Binary(_))),
        "a view token gets the frames"
    );
    let r = s.api(
        "DELETE",
        &format!("/api/sessions/{id}/tokens/{}", view["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    let revoked = Instant::now();
    loop {
        match watcher.read() {
            Ok(tungstenite::Message::Binary(_)) => {}
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "still open after the revocation"
        );
    }

    drop(ws);
    delete_clean(&s, &id);
    let (status, body) = refused(video_socket(&s, &id, token));
    assert!(status == 409 || status == 401, "{status} {body}");
}

#[test]
fn a_viewer_asking_for_a_display_past_the_maximum_gets_the_maximum() {
    let s = Server::start_default();
    let (id, created) = ready_session(&s, &input_page());
    let token = created["viewer_token"].as_str().unwrap();
    let mut video = video_socket(&s, &id, token).expect("the video socket opens");
    let (mut input, _) = tungstenite::connect(format!(
        "ws://127.0.0.1:{}/viewer/{id}/input?token={token}",
        s.port
    ))
    .expect("the input socket opens");
    // 3840x2160 is within what the protocol takes; the server's default
    // `session.max_width/max_height` (2560x1600) is what Xvfb can hold.
    input
        .send(tungstenite::Message::text(
            json!({"kind": "resize", "width": 3840, "height": 2160}).to_string(),
        ))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no frame at the maximum size");
        let Ok(tungstenite::Message::Binary(m)) = video.read() else {
            continue;
        };
        let size = (
            u16::from_be_bytes([m[2], m[3]]),
            u16::from_be_bytes([m[4], m[5]]),
        );
        assert!(size.0 <= 2560 && size.1 <= 1600, "a frame of {size:?}");
        if size == (2560, 1600) {
            break;
        }
    }
    let session = s.session(&id);
    assert_eq!(
        (&session["width"], &session["height"]),
        (&json!(2560), &json!(1600)),
        "{session:#}"
    );
    drop(input);
    drop(video);
    delete_clean(&s, &id);
}

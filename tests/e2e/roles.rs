//! Tokens with roles, through the real server, a real session and real
//! headless-Chromium viewers: a `view` token's viewers (WebRTC and noVNC)
//! see the page, but their clicks, keys, clipboard and resize (through the
//! page, and sent as they are on the input socket) never reach it, which
//! the page itself records; a `control` token's viewer's input does.
//! Revoking the view token disconnects its viewers within a second. An
//! expired token, an automation token and another session's token open no
//! viewer route; the tokens API refuses bad input with the field named.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandcast_e2e::{Server, data_url, run_browser, run_viewer, wait_no_leftovers, with_query};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// The session's display; the view viewers ask for smaller ones.
const WIDTH: u64 = 1280;
const HEIGHT: u64 = 720;

/// What the view viewers put on their clipboard; it must never arrive.
const VIEW_CLIP: &str = "VIEWCLIP";

/// Green, a focused text area; it records what reaches it (`down` for a
/// mouse button, `k:<key>` for a key, `v:<value>` when the text area
/// changes, `s:<w>x<h>` when the window's size changes) and turns blue on
/// a mouse button. F8 copies `log:` and the record to the session's
/// clipboard, which the viewers mirror.
fn recording_page() -> String {
    data_url(
        "<!doctype html><html><head><meta charset=utf-8><title>roles</title>\
         <style>html,body{margin:0;height:100%;background:#00c000}</style></head><body>\
         <textarea id=t autofocus style=\"position:absolute;left:0;top:0;width:300px;height:40px\"></textarea><script>\
         const t=document.getElementById('t');const log=[];\
         const copy=v=>{document.addEventListener('copy',c=>{c.clipboardData.setData('text/plain',v);c.preventDefault()},{once:true});document.execCommand('copy')};\
         addEventListener('mousedown',e=>{e.preventDefault();t.focus();log.push('down');document.body.style.background='#0000c0'});\
         addEventListener('keydown',e=>{if(e.key==='F8'){e.preventDefault();copy('log:'+log.join('|'));return}log.push('k:'+e.key)});\
         t.addEventListener('input',()=>log.push('v:'+t.value));\
         addEventListener('resize',()=>log.push('s:'+innerWidth+'x'+innerHeight));\
         </script></body></html>",
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits for a viewer script to create `path` (its `signal` step); a
/// script that ends first fails the test with what it saw.
fn wait_file(
    path: &Path,
    viewer: std::thread::JoinHandle<Value>,
    timeout: Duration,
) -> std::thread::JoinHandle<Value> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if viewer.is_finished() {
            let r = viewer.join().unwrap();
            panic!("the viewer ended before {}: {r:#}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    viewer
}

fn new_token(s: &Server, id: &str, body: Value) -> Value {
    let r = s.api(
        "POST",
        &format!("/api/sessions/{id}/tokens"),
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 201, "POST tokens {body}: {r:?}");
    r.json()
}

fn state_with(s: &Server, id: &str, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    s.raw(
        "GET",
        &format!("/viewer/{id}/state"),
        &[("authorization", auth.as_str())],
        None,
    )
    .status
}

/// A view viewer's scenario: it sees the page, tries everything, says so
/// (`done`), then waits to be disconnected and refused.
fn view_viewer(url: String, mode: &'static str, done: std::path::PathBuf) -> Value {
    let kind = if mode == "vnc" { "canvas" } else { "video" };
    let input = |v: Value| Value::String(v.to_string());
    run_browser(
        "e2e-viewer.mjs",
        &json!({
            "url": with_query(&url, &format!("mode={mode}")),
            "kind": kind, "mode": mode, "timeoutMs": 150000,
            "steps": [
                { "expect": "#00c000", "timeoutMs": 40000 },
                { "expectStatus": { "role": "view", "control": false, "connected": true } },
                { "watchDisconnect": true },
                { "click": true },
                { "type": "hi" },
                { "copyLocal": VIEW_CLIP },
                { "press": "Control+KeyV" },
                // As they are, on the input socket, with the view token.
                { "rawInput": [
                    input(json!({ "kind": "pointer_button", "button": "left", "down": true })),
                    input(json!({ "kind": "pointer_button", "button": "left", "down": false })),
                    input(json!({ "kind": "text", "text": "raw" })),
                    input(json!({ "kind": "clipboard", "text": VIEW_CLIP })),
                    input(json!({ "kind": "resize", "width": 640, "height": 480 })),
                ] },
                { "resize": [700, 500] },
                { "signal": done.to_str().unwrap() },
                { "expectDisconnected": true, "timeoutMs": 120000 },
                { "expectStatus": { "state": "unauthorised" }, "timeoutMs": 20000 },
            ],
        }),
    )
}

fn step<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"].get(key).is_some()))
        .unwrap_or_else(|| panic!("no {key} step in {r:#}"))
}

#[test]
fn a_view_token_watches_a_control_token_drives_and_revoking_disconnects() {
    let s = Server::start_default();
    let created = s.create(&json!({
        "start_url": recording_page(), "kiosk": true, "width": WIDTH, "height": HEIGHT,
    }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);

    let view = new_token(&s, &id, json!({ "role": "view" }));
    assert_eq!(view["role"], "view");
    assert_eq!(view["expires_at"], Value::Null);
    let view_url = view["viewer_url"].as_str().unwrap().to_string();
    assert!(view_url.ends_with(&format!(
        "/viewer/{id}#token={}",
        view["token"].as_str().unwrap()
    )));
    let control = new_token(&s, &id, json!({ "role": "control", "ttl_seconds": 600 }));
    assert!(control["expires_at"].is_string());

    // Two view viewers at once, over WebRTC and over noVNC.
    let dir = tempfile::tempdir().unwrap();
    let viewers: Vec<_> = ["webrtc", "vnc"]
        .into_iter()
        .map(|mode| {
            let done = dir.path().join(mode);
            let url = view_url.clone();
            let d = done.clone();
            (
                mode,
                done,
                std::thread::spawn(move || view_viewer(url, mode, d)),
            )
        })
        .collect();
    let viewers: Vec<_> = viewers
        .into_iter()
        .map(|(mode, done, viewer)| (mode, wait_file(&done, viewer, Duration::from_secs(120))))
        .collect();
    // Nothing they did changed the display.
    let session = s.session(&id);
    assert_eq!(
        (session["width"].as_u64(), session["height"].as_u64()),
        (Some(WIDTH), Some(HEIGHT)),
        "a view viewer resized the session: {session}"
    );

    // The control viewer finds the page as it was, and its input arrives.
    let r = run_viewer(&json!({
        "url": with_query(control["viewer_url"].as_str().unwrap(), "mode=webrtc"),
        "kind": "video", "mode": "webrtc", "viewport": [WIDTH, HEIGHT],
        "steps": [
            { "expect": "#00c000", "timeoutMs": 40000 },
            { "expectStatus": { "role": "control" } },
            { "click": true },
            { "expect": "#0000c0", "timeoutMs": 20000 },
            // Pastes the session's clipboard: never what a view viewer sent.
            { "press": "Control+KeyV" },
            { "type": "ok" },
            { "press": "F8" },
            { "expectRemoteClipboardPrefix": "log:", "timeoutMs": 20000 },
        ],
    }));
    let log = step(&r, "expectRemoteClipboardPrefix")["got"]
        .as_str()
        .unwrap()
        .to_string();
    let entries: Vec<&str> = log.trim_start_matches("log:").split('|').collect();
    eprintln!("the page received: {entries:?}");
    assert_eq!(
        entries.iter().filter(|e| **e == "down").count(),
        1,
        "only the control viewer's click: {entries:?}"
    );
    for want in ["k:o", "k:k", "v:ok"] {
        assert!(entries.contains(&want), "{want} missing: {entries:?}");
    }
    for e in &entries {
        assert!(
            !matches!(*e, "k:h" | "k:i") && !e.contains(VIEW_CLIP) && !e.contains("raw"),
            "a view viewer's input reached the page: {e} in {entries:?}"
        );
        if let Some(size) = e.strip_prefix("s:") {
            let w: u64 = size.split('x').next().unwrap().parse().unwrap();
            assert!(
                w > 1000,
                "a view viewer's resize reached the page: {e} in {entries:?}"
            );
        }
    }

    // Revoking the view token disconnects both view viewers within 1 s.
    let list = s
        .api("GET", &format!("/api/sessions/{id}/tokens"), None)
        .json();
    let listed = list["tokens"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|t| t.get("token").is_none() && t["active"] == true)
    );
    let revoked_at = now_ms();
    let r = s.api(
        "DELETE",
        &format!("/api/sessions/{id}/tokens/{}", view["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(r.status, 204, "{r:?}");
    for (mode, viewer) in viewers {
        let r = viewer.join().unwrap();
        assert!(r["ok"] == true, "{mode} view viewer: {r:#}");
        let at = step(&r, "expectDisconnected")["got"]["at"]
            .as_u64()
            .unwrap();
        let ms = at.saturating_sub(revoked_at);
        eprintln!("{mode} view viewer disconnected {ms} ms after the revocation");
        assert!(
            ms < 1000,
            "{mode}: disconnected {ms} ms after the revocation"
        );
    }
    assert_eq!(state_with(&s, &id, view["token"].as_str().unwrap()), 401);
    assert_eq!(state_with(&s, &id, control["token"].as_str().unwrap()), 200);
    let list = s
        .api("GET", &format!("/api/sessions/{id}/tokens"), None)
        .json();
    let v = &list["tokens"][0];
    assert_eq!((&v["id"], &v["active"]), (&view["id"], &json!(false)));
    assert!(v["revoked_at"].is_string());

    // A token's expiry disconnects its viewer too, within 1 s of it.
    let before = now_ms();
    let brief = new_token(&s, &id, json!({ "role": "view", "ttl_seconds": 15 }));
    let after = now_ms();
    let r = run_viewer(&json!({
        "url": with_query(brief["viewer_url"].as_str().unwrap(), "mode=webrtc"),
        "kind": "video", "mode": "webrtc", "timeoutMs": 60000,
        "steps": [
            { "expect": "#0000c0", "timeoutMs": 12000 },
            { "watchDisconnect": true },
            { "expectDisconnected": true, "timeoutMs": 30000 },
            { "expectStatus": { "state": "unauthorised" }, "timeoutMs": 20000 },
        ],
    }));
    let at = step(&r, "expectDisconnected")["got"]["at"]
        .as_u64()
        .unwrap();
    let (earliest, latest) = (before + 15_000, after + 15_000);
    eprintln!(
        "the expired token's viewer disconnected {} ms after its expiry",
        at.saturating_sub(latest)
    );
    assert!(
        at + 50 >= earliest && at < latest + 1000,
        "disconnected at {at}, the token expired between {earliest} and {latest}"
    );

    assert_eq!(s.delete(&id)["state"], "stopped");
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "session {id} left behind: {left:?}");
}

#[test]
fn expired_automation_and_other_sessions_tokens_open_no_viewer() {
    let s = Server::start_default();
    let page = data_url("<body style='background:#00c000'>");
    let a = s.create(&json!({ "start_url": page }));
    let b = s.create(&json!({ "start_url": page }));
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    s.wait_state(a_id, "ready", READY);
    let path = format!("/api/sessions/{a_id}/tokens");

    // Bad input names the field; no API key, no tokens.
    for (body, field) in [
        (json!({ "role": "admin" }), "role"),
        (json!({}), "role"),
        (json!({ "role": "view", "ttl_seconds": 0 }), "ttl_seconds"),
        (json!({ "role": "view", "ttl_seconds": "1" }), "ttl_seconds"),
    ] {
        let r = s.api("POST", &path, Some(&body.to_string()));
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert_eq!(r.json()["detail"]["field"], field, "{body}");
    }
    let r = s.raw(
        "POST",
        &path,
        &[
            ("content-type", "application/json"),
            (
                "authorization",
                &format!("Bearer {}", a["viewer_token"].as_str().unwrap()),
            ),
        ],
        Some(br#"{"role":"view"}"#),
    );
    assert_eq!(r.status, 401, "a viewer token makes no tokens: {r:?}");
    let r = s.api(
        "POST",
        "/api/sessions/0123456789abcdef01234567/tokens",
        Some(r#"{"role":"view"}"#),
    );
    assert_eq!(r.status, 404);
    let r = s.api("DELETE", &format!("{path}/0123456789abcdef"), None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["detail"]["token_id"], "0123456789abcdef");

    // An automation token: no viewer URL, no viewer route.
    let auto = new_token(&s, a_id, json!({ "role": "automation" }));
    assert!(auto.get("viewer_url").is_none(), "{auto}");
    let auto_token = auto["token"].as_str().unwrap();
    assert_eq!(state_with(&s, a_id, auto_token), 401);
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{a_id}/vnc?token={auto_token}")),
        401
    );
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{a_id}/input?token={auto_token}")),
        401
    );
    let auth = format!("Bearer {auto_token}");
    let r = s.raw(
        "POST",
        &format!("/api/webrtc/session/{a_id}/offer"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/sdp"),
        ],
        Some(b"v=0"),
    );
    assert_eq!(r.status, 401, "{r:?}");

    // A's tokens open nothing of B.
    let view = new_token(&s, a_id, json!({ "role": "view" }));
    let view_token = view["token"].as_str().unwrap();
    assert_eq!(state_with(&s, a_id, view_token), 200);
    assert_eq!(state_with(&s, b_id, view_token), 401);
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{b_id}/vnc?token={view_token}")),
        401
    );
    assert_eq!(
        state_with(&s, b_id, a["viewer_token"].as_str().unwrap()),
        401
    );

    // A view token uploads nothing; it may download.
    // (Refused before its body is read, the connection may be closed
    // after the answer: not one for the client to reuse.)
    let r = s.raw(
        "PUT",
        &format!("/viewer/{a_id}/uploads/x.txt?token={view_token}"),
        &[("connection", "close")],
        Some(b"x"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = s.raw(
        "GET",
        &format!("/viewer/{a_id}/downloads/none.txt?token={view_token}"),
        &[],
        None,
    );
    assert!(
        ![401, 403].contains(&r.status),
        "a view token may download (there is no such file): {r:?}"
    );

    // Nor does it read another viewer's offer or answer (its addresses).
    let auth = format!("Bearer {view_token}");
    for what in ["offer", "answer"] {
        let r = s.raw(
            "GET",
            &format!("/api/webrtc/session/{a_id}/{what}"),
            &[("authorization", auth.as_str())],
            None,
        );
        assert_eq!(r.status, 403, "{what}: {r:?}");
    }

    // An expired token is refused (it opened the session until then).
    let short = new_token(&s, a_id, json!({ "role": "control", "ttl_seconds": 1 }));
    let short_token = short["token"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let st = state_with(&s, a_id, short_token);
        if seen.last() != Some(&st) {
            seen.push(st);
        }
        if st == 401 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, [200, 401], "the 1 s token over time");
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{a_id}/input?token={short_token}")),
        401
    );

    // An ended session gets no more tokens; its tokens go with it.
    assert_eq!(s.delete(b_id)["state"], "stopped");
    let r = s.api(
        "POST",
        &format!("/api/sessions/{b_id}/tokens"),
        Some(r#"{"role":"view"}"#),
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(s.delete(a_id)["state"], "stopped");
}

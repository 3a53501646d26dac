//! The warm pool (`[session] pool_size`): a create that fits a pooled
//! session is ready without starting a browser, shows its page and takes
//! input like a fresh session, and keeps nothing of its warm-up (one tab,
//! no back history); the pool refills; a request it does not fit starts
//! cold; nothing of either is left when the server stops.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use sandcast_e2e::{
    Server, ServerOptions, input_page, input_steps, processes, run_viewer, with_query,
};
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const READY: Duration = Duration::from_secs(40);

type Ws = WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Pooled sessions ready to be claimed, as `/metrics` says.
fn pool_ready(s: &Server) -> u64 {
    let auth = format!("Bearer {}", s.api_key);
    let m = s.raw("GET", "/metrics", &[("authorization", &auth)], None);
    let line = m
        .body
        .lines()
        .find(|l| l.starts_with("sandcast_pool_sessions{state=\"ready\"}"))
        .unwrap_or_else(|| panic!("/metrics lacks the pool:\n{}", m.body))
        .to_string();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn wait_pool_ready(s: &Server, n: u64) {
    let t0 = Instant::now();
    while pool_ready(s) < n {
        assert!(
            t0.elapsed() < READY,
            "the pool had no ready session within {READY:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a browser of this server's sessions is stopped (paused, as an
/// unwatched session's is).
fn a_browser_is_paused(s: &Server) -> bool {
    let cgroup = format!("sandcast-e2e/{}/", s.instance());
    processes().iter().any(|p| {
        p.cgroup.contains(&cgroup)
            && p.comm.starts_with("chrom")
            && std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                .ok()
                .and_then(|st| st.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                .unwrap_or(false)
    })
}

/// The session's browser through the server's DevTools endpoint.
fn devtools(s: &Server, id: &str) -> Ws {
    let mut req = format!("ws://127.0.0.1:{}/api/sessions/{id}/cdp", s.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", s.api_key).parse().unwrap(),
    );
    let (ws, _) = tungstenite::connect(req).expect("DevTools connection");
    if let tungstenite::stream::MaybeTlsStream::Plain(t) = ws.get_ref() {
        t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    ws
}

fn call(ws: &mut Ws, id: i64, method: &str, params: Value, session: Option<&str>) -> Value {
    let mut msg = json!({"id": id, "method": method, "params": params});
    if let Some(s) = session {
        msg["sessionId"] = json!(s);
    }
    ws.send(Message::text(msg.to_string())).unwrap();
    loop {
        if let Message::Text(t) = ws.read().expect("reading the DevTools connection") {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }
}

/// The browser's page tabs (their URLs), and the back history's length of
/// the one page there should be.
fn tabs_and_history(s: &Server, id: &str) -> (Vec<String>, i64) {
    let mut ws = devtools(s, id);
    let targets = call(&mut ws, 1, "Target.getTargets", json!({}), None);
    let pages: Vec<&Value> = targets["targetInfos"]
        .as_array()
        .unwrap()
        .iter()
        // The browser's own WebUI (its omnibox popup) is a page too.
        .filter(|t| t["type"] == "page" && !t["url"].as_str().unwrap().starts_with("chrome://"))
        .collect();
    let urls = pages
        .iter()
        .map(|t| t["url"].as_str().unwrap().to_string())
        .collect();
    let attached = call(
        &mut ws,
        2,
        "Target.attachToTarget",
        json!({"targetId": pages[0]["targetId"], "flatten": true}),
        None,
    );
    let session = attached["sessionId"].as_str().unwrap().to_string();
    let history = call(
        &mut ws,
        3,
        "Runtime.evaluate",
        json!({"expression": "history.length", "returnByValue": true}),
        Some(&session),
    );
    (urls, history["result"]["value"].as_i64().unwrap())
}

fn session_log(s: &Server, id: &str) -> String {
    let r = s.api("GET", &format!("/api/sessions/{id}/logs"), None);
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

#[test]
fn a_claimed_session_is_ready_at_once_and_like_a_fresh_one() {
    let mut s = Server::start(ServerOptions {
        session: "pool_size = 1\npool_kiosk = true\npause_unwatched_seconds = 1".into(),
        ..Default::default()
    });
    wait_pool_ready(&s, 1);
    // The pooled browser waits paused; the claim must wake it.
    let t0 = Instant::now();
    while !a_browser_is_paused(&s) {
        assert!(t0.elapsed() < READY, "the pooled browser was never paused");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        s.session_ids().is_empty(),
        "a pooled session is nobody's: not listed"
    );

    let page = input_page();
    let t0 = Instant::now();
    let created = s.create(&json!({ "start_url": page, "kiosk": true }));
    let id = created["id"].as_str().unwrap().to_string();
    let ready = s.wait_state(&id, "ready", READY);
    eprintln!("claimed: POST to ready seen {:?}", t0.elapsed());
    assert!(
        session_log(&s, &id).contains("claimed from the warm pool"),
        "{ready:#}"
    );
    // Nothing of the warm-up: one tab, on the start page, no back entry.
    let (tabs, history) = tabs_and_history(&s, &id);
    assert_eq!(
        tabs,
        std::slice::from_ref(&page),
        "the claimed session's tabs"
    );
    assert_eq!(history, 1, "the claimed session's history");
    // Shown and typed into through the real viewer.
    let view = run_viewer(&json!({
        "url": with_query(created["viewer_url"].as_str().unwrap(), "mode=webrtc"),
        "kind": "video",
        "mode": "webrtc",
        "steps": input_steps(),
    }));
    assert_eq!(view["ok"], true, "{view:#}");

    // The pool refills; a request it does not fit (not kiosk) starts cold
    // and ends the same as the claimed one.
    wait_pool_ready(&s, 1);
    let cold = s.create(&json!({ "start_url": page, "kiosk": false }));
    let cold_id = cold["id"].as_str().unwrap().to_string();
    s.wait_state(&cold_id, "ready", READY);
    assert!(!session_log(&s, &cold_id).contains("claimed from the warm pool"));
    let (tabs, history) = tabs_and_history(&s, &cold_id);
    assert_eq!(
        (tabs, history),
        (vec![page.clone()], 1),
        "a fresh session's"
    );
    assert_eq!(pool_ready(&s), 1, "the pool kept its session");

    for id in [&id, &cold_id] {
        assert_eq!(s.delete(id)["state"], "stopped");
    }
    // The pooled session, which nobody sees, is stopped with the server.
    assert_eq!(s.terminate(Duration::from_secs(30)), Some(0));
    let left = s.instance_leftovers();
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

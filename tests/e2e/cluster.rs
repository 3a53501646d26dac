//! Three nodes over one throw-away PostgreSQL server, on this machine, each
//! with its own port, data directory, instance, subnet and cgroups: sessions
//! are placed by room, never above a node's `max_sessions` even when creates
//! race on every node; any node answers for any session (forwarded, or the
//! viewer page redirected to the owner); a drained node gets nothing new;
//! a node that goes silent has its sessions failed ("node lost", with
//! webhooks), and when it comes back it reaps them and rejoins.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sandcast_e2e::{
    Server, ServerOptions, input_page, input_steps, leftovers, run_viewer, with_query,
};
use sandcast_server::store::testing::TestPostgres;
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(90);
const KEY: &str = "cluster-e2e-api-key-0123456789abcdef";
const SECRET: &str = "cluster-e2e-secret-0123456789abcdef0123";
const PER_NODE: usize = 4;

fn node_options(url: &str, id: &str) -> ServerOptions {
    ServerOptions {
        top: format!("max_sessions = {PER_NODE}\n"),
        tables: format!(
            "[cluster]\nnode_id = \"{id}\"\nheartbeat_seconds = 1\nlost_after_seconds = 4\n\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"0123456789abcdef\"\nevents = [\"failed\"]\n"
        ),
        env: vec![
            ("SANDCAST_API_KEY".into(), KEY.into()),
            ("SANDCAST_STORE".into(), url.into()),
            ("SANDCAST_CLUSTER_SECRET".into(), SECRET.into()),
        ],
        ..ServerOptions::default()
    }
}

/// `GET /api/nodes` through `s`: id → (placed, draining, lost).
fn nodes(s: &Server) -> BTreeMap<String, (u64, bool, bool)> {
    let r = s.api("GET", "/api/nodes", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                (
                    n["placed"].as_u64().unwrap(),
                    n["draining"].as_bool().unwrap(),
                    n["lost"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        // Polling the API: a node's state changes on its heartbeat, which
        // nothing outside the cluster can wait on.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node that runs a session, read from `nodes` before and after.
fn owner_of(s: &Server, id: &str) -> String {
    let events = s.api("GET", &format!("/api/sessions/{id}"), None);
    assert_eq!(events.status, 200, "{}", events.body);
    events.json()["node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn three_nodes_place_route_drain_and_lose_a_node() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let url = pg.database("cluster");
    let a = Server::start(node_options(&url, "a"));
    let b = a.start_beside(node_options(&url, "b"));
    let mut c = a.start_beside(node_options(&url, "c"));
    let all = [&a, &b, &c];

    wait_until("three nodes joined", Duration::from_secs(20), || {
        nodes(&a).len() == 3
    });

    // A user's profile stays on the node of their first profile session:
    // the next one, asked of other nodes, is made there, and the profile
    // is read through any node.
    let first = a.create(&json!({ "user_id": "alice", "profile": true, "kiosk": true }));
    let home = first["node"].as_str().expect("node").to_string();
    let id = first["id"].as_str().unwrap();
    b.wait_state(id, "ready", READY);
    assert_eq!(c.delete(id)["state"], "stopped");
    let others = [("a", &a), ("b", &b), ("c", &c)]
        .into_iter()
        .filter(|(n, _)| *n != home)
        .map(|(_, s)| s);
    for s in others {
        let again = s.create(&json!({ "user_id": "alice", "profile": true, "kiosk": true }));
        assert_eq!(again["node"], home.as_str(), "{again}");
        let id = again["id"].as_str().unwrap();
        s.wait_state(id, "ready", READY);
        let profile = s.api("GET", "/api/users/alice/profile", None);
        assert_eq!(profile.status, 200, "{}", profile.body);
        assert_eq!(s.delete(id)["state"], "stopped");
    }

    // 30 creates at once, ten through each node: exactly the cluster's
    // slots are used, each session once, no node above its max_sessions.
    let page = input_page();
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..30)
            .map(|i| {
                let (s, page) = (all[i % 3], page.clone());
                scope.spawn(move || {
                    let body = json!({ "start_url": page, "kiosk": true }).to_string();
                    let r = s.api("POST", "/api/sessions", Some(&body));
                    (r.status, r.json())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created: Vec<&Value> = answers
        .iter()
        .filter(|(st, _)| *st == 201)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(created.len(), 3 * PER_NODE, "{answers:#?}");
    assert!(
        answers.iter().all(|(st, _)| *st == 201 || *st == 503),
        "{answers:#?}"
    );
    let ids: BTreeSet<&str> = created.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), created.len(), "every session placed once");
    let placed = nodes(&b);
    for (id, (n, _, _)) in &placed {
        assert_eq!(*n as usize, PER_NODE, "node {id}: {placed:?}");
    }
    // Every session is ready, read through a node that may not run it.
    let mut on: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for v in &created {
        let id = v["id"].as_str().unwrap();
        all[1].wait_state(id, "ready", READY);
        on.entry(owner_of(&c, id)).or_default().push(v);
    }
    assert_eq!(on.len(), 3, "sessions on every node: {:?}", on.keys());

    // Sessions of node c, viewed through node b's URL: the viewer page is
    // sent to c, where it shows the page over WebRTC (one session) and over
    // noVNC (another: typing changes the page).
    for (v, mode, kind) in [
        (on["c"][0], "webrtc", "video"),
        (on["c"][1], "vnc", "canvas"),
    ] {
        let id = v["id"].as_str().unwrap();
        let token = v["viewer_token"].as_str().unwrap();
        assert!(
            v["viewer_url"].as_str().unwrap().starts_with(&c.base),
            "the viewer URL is the owner's: {v}"
        );
        let through_b = format!("{}/viewer/{id}#token={token}", b.base);
        let view = run_viewer(&json!({
            "url": with_query(&through_b, &format!("mode={mode}")),
            "kind": kind,
            "mode": mode,
            "steps": input_steps(),
        }));
        assert_eq!(view["ok"], true, "{mode}: {view:#}");
    }
    let id = on["c"][0]["id"].as_str().unwrap();
    // The API of any node answers for it (forwarded to c).
    let logs = a.api("GET", &format!("/api/sessions/{id}/logs"), None);
    assert_eq!(logs.status, 200, "{}", logs.body);

    // Drain a: two of its sessions and two of b's end; new sessions go to
    // b alone, a's remaining ones keep running.
    let (code, out, err) = b.cli(&["node", "drain", "a"]);
    assert_eq!(code, 0, "{out}{err}");
    for node in ["a", "b"] {
        for v in &on[node][..2] {
            let id = v["id"].as_str().unwrap();
            assert_eq!(c.delete(id)["state"], "stopped", "deleted through c");
        }
    }
    for _ in 0..2 {
        let v = a.create(&json!({ "start_url": page, "kiosk": true }));
        assert_eq!(owner_of(&a, v["id"].as_str().unwrap()), "b");
    }
    let r = a.api("POST", "/api/sessions", Some("{}"));
    assert_eq!(r.status, 503, "a drains, b and c are full: {}", r.body);
    assert_eq!(
        b.session(on["a"][3]["id"].as_str().unwrap())["state"],
        "ready"
    );
    let (code, out, err) = a.cli(&["node", "undrain", "a"]);
    assert_eq!(code, 0, "{out}{err}");

    // c goes silent (SIGKILL): past lost_after_seconds its sessions fail
    // with "node lost" and a webhook delivery; creates still succeed.
    c.kill();
    let c_ids: Vec<String> = on["c"]
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    wait_until("c lost", Duration::from_secs(20), || nodes(&a)["c"].2);
    for id in &c_ids {
        let s = a.session(id);
        assert_eq!(
            (s["state"].as_str(), s["reason"].as_str()),
            (Some("failed"), Some("node lost")),
            "{s}"
        );
    }
    let deliveries = a.api("GET", "/api/webhooks/deliveries", None).json();
    for id in &c_ids {
        assert!(
            deliveries["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["session_id"] == id.as_str() && d["event"] == "failed"),
            "a failed webhook for {id}: {deliveries:#}"
        );
    }
    let v = b.create(&json!({ "start_url": page, "kiosk": true }));
    assert_eq!(owner_of(&b, v["id"].as_str().unwrap()), "a");

    // c comes back: it reaps what it still ran and joins again.
    c.restart();
    wait_until("c rejoined", Duration::from_secs(20), || !nodes(&a)["c"].2);
    for id in &c_ids {
        let left = leftovers(id);
        assert!(left.is_empty(), "{id} left:\n{}", left.join("\n"));
    }
    // Every node stops its sessions when it stops.
    for mut s in [a, b, c] {
        assert_eq!(s.terminate(Duration::from_secs(60)), Some(0));
        let left = s.instance_leftovers();
        assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
    }
}

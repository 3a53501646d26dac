//! The HTTP API of a real `sandcast serve`: bad input, auth, rate limits,
//! health, metrics and provider presets.

use std::time::{Duration, Instant};

use sandcast_e2e::{Resp, Server, ServerOptions, agent_process, input_page, sigkill};
use serde_json::{Value, json};

/// Asserts a 4xx with a JSON `error`, and that the body names `mention`
/// when given (a clear error names the bad value).
fn assert_error(r: &Resp, statuses: &[u16], mention: Option<&str>, what: &str) {
    assert!(
        statuses.contains(&r.status),
        "{what}: status {} not in {statuses:?}: {}",
        r.status,
        r.body
    );
    let v: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", r.body));
    let err = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no error string: {v}"));
    assert!(!err.is_empty(), "{what}: empty error");
    if let Some(m) = mention {
        assert!(
            r.body.to_lowercase().contains(&m.to_lowercase()),
            "{what}: error does not name {m:?}: {}",
            r.body
        );
    }
}

#[test]
fn bad_requests_get_clear_4xx_and_create_nothing() {
    let s = Server::start_default();
    let before = s.session_ids();
    let post = |body: &str| s.api("POST", "/api/sessions", Some(body));

    assert_error(
        &post("{\"start_url\": "),
        &[400, 422],
        None,
        "malformed JSON",
    );
    assert_error(&post("[1,2"), &[400, 422], None, "truncated array");
    assert_error(
        &post("{\"bogus_field\": 1}"),
        &[400, 422],
        Some("bogus_field"),
        "unknown field",
    );
    assert_error(
        &post("{\"width\": \"wide\"}"),
        &[400, 422],
        Some("width"),
        "width of the wrong type",
    );

    let huge = json!({ "user_id": "u".repeat(70 * 1024) }).to_string();
    assert_error(&post(&huge), &[413], None, "body over 64 KiB");

    for url in [
        "file:///etc/passwd",
        "javascript:alert(1)",
        "chrome://settings",
        "ftp://127.0.0.1/",
    ] {
        let r = post(&json!({ "start_url": url }).to_string());
        let scheme = url.split(':').next().unwrap();
        assert_error(&r, &[400, 422], Some(scheme), &format!("start_url {url}"));
    }
    // Chromium's aliases of chrome:// pages.
    for url in ["about:settings", "about:flags", "about:version"] {
        let r = post(&json!({ "start_url": url }).to_string());
        assert_error(&r, &[400], Some(url), &format!("start_url {url}"));
    }
    assert_error(
        &post("{\"width\": 10}"),
        &[400, 422],
        Some("width"),
        "width 10",
    );
    assert_error(
        &post("{\"height\": 100000}"),
        &[400, 422],
        Some("height"),
        "height 100000",
    );
    assert_error(
        &post(&json!({ "user_id": "x".repeat(10_000) }).to_string()),
        &[400, 413, 422],
        Some("user_id"),
        "user_id of 10,000 characters",
    );
    assert_error(
        &post("{\"launch\": \"not-an-array\"}"),
        &[400, 422],
        Some("launch"),
        "launch as a string",
    );

    for path in [
        "/api/sessions/..%2f..",
        "/api/sessions/UPPER",
        "/api/sessions/a%00b",
        "/api/sessions/no-such-session",
    ] {
        let r = s.api("GET", path, None);
        assert_error(&r, &[400, 404], None, &format!("GET {path}"));
        let r = s.api("DELETE", path, None);
        assert_error(&r, &[400, 404], None, &format!("DELETE {path}"));
    }

    let ok_body = Some(b"{}".as_slice());
    let json_ct = ("content-type", "application/json");
    let r = s.raw("POST", "/api/sessions", &[json_ct], ok_body);
    assert_error(&r, &[401], None, "no API key");
    let r = s.raw(
        "POST",
        "/api/sessions",
        &[json_ct, ("authorization", "Bearer wrong-key")],
        ok_body,
    );
    assert_error(&r, &[401, 403], None, "wrong API key");
    let almost = format!("Bearer {}x", s.api_key);
    let r = s.raw("GET", "/api/sessions", &[("authorization", &almost)], None);
    assert_error(&r, &[401, 403], None, "API key with one more character");
    let r = s.raw(
        "GET",
        "/api/sessions",
        &[("authorization", &s.api_key)],
        None,
    );
    assert_error(&r, &[401, 403], None, "API key without the Bearer scheme");
    assert!(
        !s.logs().contains(&s.api_key),
        "the server logged its API key"
    );

    assert_eq!(s.session_ids(), before, "a bad request created a session");
    assert!(before.is_empty(), "fresh server lists sessions: {before:?}");
}

#[test]
fn the_key_limit_answers_429_but_signaling_still_works() {
    const LIMIT: usize = 5;
    let s = Server::start(ServerOptions {
        env: vec![(
            "SANDCAST_RATE_LIMIT__KEY_REQUESTS".into(),
            LIMIT.to_string(),
        )],
        ..Default::default()
    });
    let mut statuses = Vec::new();
    for _ in 0..LIMIT {
        statuses.push(s.api("GET", "/api/sessions", None).status);
    }
    assert!(
        statuses.iter().all(|&c| c == 200),
        "first {LIMIT} requests: {statuses:?}"
    );
    let r = s.api("GET", "/api/sessions", None);
    assert_error(&r, &[429], Some("API key"), "request over the limit");
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry >= 1, "Retry-After {retry}");

    // Signaling has its own, much higher limit.
    for i in 0..3 * LIMIT {
        let r = s.api("GET", "/api/webrtc/ice-servers", None);
        assert_eq!(
            r.status, 200,
            "ice-servers request {i} after the API limit: {r:?}"
        );
        assert!(r.json()["iceServers"].is_array(), "{}", r.body);
    }
    // Health is not under the API limit either.
    assert_eq!(s.raw("GET", "/health", &[], None).status, 200);
}

/// Default limits: what the operator gets out of the box.
fn default_limits() -> Server {
    Server::start(ServerOptions {
        default_rate_limits: true,
        ..Default::default()
    })
}

#[test]
fn anonymous_requests_cannot_lock_the_operator_out() {
    let s = default_limits();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut retry_after = None;
    let started = Instant::now();
    for _ in 0..1000 {
        let r = s.raw("GET", "/api/sessions", &[], None);
        if r.status == 429 && retry_after.is_none() {
            assert_error(
                &r,
                &[429],
                Some("address"),
                "anonymous request over the limit",
            );
            retry_after = r.header("retry-after").map(String::from);
        }
        *statuses.entry(r.status).or_default() += 1;
    }
    // 100 per 15 minutes by default (one more every 9 s): 401 until then,
    // 429 after.
    let refills = started.elapsed().as_secs() as usize / 9;
    let unlimited = statuses.get(&401).copied().unwrap_or(0);
    assert!(
        (100..=101 + refills).contains(&unlimited),
        "anonymous statuses: {statuses:?}"
    );
    assert_eq!(
        statuses.get(&429).copied(),
        Some(1000 - unlimited),
        "{statuses:?}"
    );
    assert!(retry_after.is_some(), "429 without Retry-After");
    // A wrong key is anonymous: it spends the address's budget, not the key's.
    let r = s.raw(
        "GET",
        "/api/sessions",
        &[("authorization", "Bearer not-the-key")],
        None,
    );
    assert_eq!(r.status, 429, "wrong key after the limit: {r:?}");
    // The operator, on the same address, is not locked out.
    let r = s.api("GET", "/api/sessions", None);
    assert_eq!(r.status, 200, "keyed request after 1,000 anonymous: {r:?}");
    let created = s.create(&json!({ "start_url": "about:blank" }));
    s.delete(created["id"].as_str().unwrap());
}

#[test]
fn a_keyed_backend_sends_1000_requests_a_minute_at_the_defaults() {
    let s = default_limits();
    let started = Instant::now();
    let mut limited = Vec::new();
    for i in 0..1000 {
        let r = s.api("GET", "/api/sessions", None);
        if r.status != 200 {
            limited.push((i, r.status));
        }
    }
    let took = started.elapsed();
    eprintln!("1,000 keyed requests in {took:?}");
    assert!(took < Duration::from_secs(60), "too slow to test: {took:?}");
    assert!(limited.is_empty(), "refused keyed requests: {limited:?}");
}

#[test]
fn behind_a_trusted_proxy_clients_are_counted_by_forwarded_address() {
    const LIMIT: usize = 3;
    let limited = |trusted: &str| {
        Server::start(ServerOptions {
            env: vec![
                (
                    "SANDCAST_RATE_LIMIT__API_REQUESTS".into(),
                    LIMIT.to_string(),
                ),
                (
                    "SANDCAST_RATE_LIMIT__TRUSTED_PROXIES".into(),
                    trusted.into(),
                ),
            ],
            ..Default::default()
        })
    };
    let statuses = |s: &Server, headers: &[(&str, &str)], n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| s.raw("GET", "/api/sessions", headers, None).status)
            .collect()
    };
    let proxy = limited("[\"127.0.0.0/8\"]");
    let a = [("x-forwarded-for", "203.0.113.1")];
    assert_eq!(statuses(&proxy, &a, LIMIT + 1), [401, 401, 401, 429]);
    // Another client behind the same proxy has its own budget.
    let b = [("x-forwarded-for", "203.0.113.2, 127.0.0.1")];
    assert_eq!(statuses(&proxy, &b, 1), [401], "second client");
    // RFC 7239, IPv6: one /64 is one client.
    let c1 = [("forwarded", "for=\"[2001:db8:1:2::1]:4711\";proto=https")];
    let c2 = [("forwarded", "for=\"[2001:db8:1:2::99]\"")];
    assert_eq!(statuses(&proxy, &c1, LIMIT), [401, 401, 401]);
    assert_eq!(statuses(&proxy, &c2, 1), [429], "same /64");
    // The operator behind the proxy is not limited by its clients.
    assert_eq!(proxy.api("GET", "/api/sessions", None).status, 200);
    drop(proxy); // one server at a time (the harness's lock)

    // From a peer that is not a trusted proxy the headers are ignored:
    // every request is the peer's.
    let direct = limited("[\"192.0.2.0/24\"]");
    let spoofed: Vec<u16> = (0..=LIMIT)
        .map(|i| {
            let ip = format!("203.0.113.{}", 10 + i);
            direct
                .raw("GET", "/api/sessions", &[("x-forwarded-for", &ip)], None)
                .status
        })
        .collect();
    assert_eq!(
        spoofed,
        [401, 401, 401, 429],
        "X-Forwarded-For from an untrusted peer"
    );
}

#[test]
fn ice_servers_need_a_credential_and_turn_credentials_are_short_lived() {
    const SECRET: &str = "turn-shared-secret";
    let s = Server::start(ServerOptions {
        tables: format!(
            "[webrtc.turn]\nurls = [\"turn:127.0.0.1:3479\"]\nshared_secret = \"{SECRET}\"\n\
             credential_ttl_seconds = 600\n"
        ),
        ..Default::default()
    });
    let r = s.raw("GET", "/api/webrtc/ice-servers", &[], None);
    assert_error(&r, &[401], None, "ice-servers without a credential");
    let created = s.create(&json!({ "start_url": "about:blank" }));
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["viewer_token"].as_str().unwrap().to_string();
    let viewer = format!("Bearer {token}");
    let r = s.raw(
        "GET",
        "/api/webrtc/ice-servers",
        &[("authorization", &viewer)],
        None,
    );
    assert_error(
        &r,
        &[401],
        Some("session"),
        "viewer token without its session",
    );
    let r = s.raw(
        "GET",
        &format!("/api/webrtc/ice-servers?session={id}"),
        &[("authorization", "Bearer wrong")],
        None,
    );
    assert_error(&r, &[401], None, "wrong token");

    let r = s.raw(
        "GET",
        &format!("/api/webrtc/ice-servers?session={id}"),
        &[("authorization", &viewer)],
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let servers = r.json()["iceServers"].clone();
    let turn = servers
        .as_array()
        .and_then(|a| a.iter().find(|s| s["username"].is_string()))
        .unwrap_or_else(|| panic!("no TURN credential: {servers}"));
    assert_eq!(turn["urls"], json!(["turn:127.0.0.1:3479"]));
    let username = turn["username"].as_str().unwrap();
    let (expiry, who) = username.split_once(':').expect("<expiry>:<session>");
    assert_eq!(who, id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().expect("expiry in unix seconds");
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "expiry {expiry}, now {now}"
    );
    // The password is what a TURN server with the same secret computes:
    // base64(HMAC-SHA1(secret, username)), here by openssl.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf %s \"$1\" | openssl dgst -sha1 -hmac \"$2\" -binary | base64")
        .args(["sh", username, SECRET])
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {out:?}");
    assert_eq!(
        turn["credential"].as_str().unwrap(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert_eq!(s.api("GET", "/api/webrtc/ice-servers", None).status, 200);

    // An ended session's token opens nothing more.
    s.delete(&id);
    let r = s.raw(
        "GET",
        &format!("/api/webrtc/ice-servers?session={id}"),
        &[("authorization", &viewer)],
        None,
    );
    assert_error(&r, &[409], Some("stopped"), "token of a stopped session");
}

#[test]
fn the_api_key_is_refused_in_a_url() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": "about:blank" }));
    let id = created["id"].as_str().unwrap().to_string();
    let token = created["viewer_token"].as_str().unwrap().to_string();
    // Viewer tokens are per session and may ride in the query of a WebSocket.
    let ws = |t: &str| s.ws_handshake(&format!("/api/webrtc/session/{id}/ws?token={t}"));
    assert_eq!(ws(&token), 101, "viewer token in the query");
    assert_eq!(ws(&s.api_key), 401, "API key in the query of signaling");
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{id}/vnc?token={}", s.api_key)),
        401,
        "API key in the query of the VNC WebSocket"
    );
    for path in [
        format!("/api/sessions?token={}", s.api_key),
        format!("/api/sessions?api_key={}", s.api_key),
    ] {
        let r = s.raw("GET", &path, &[], None);
        assert_error(&r, &[401], None, "API key in the query");
    }
    assert!(
        !s.logs().contains(&s.api_key),
        "the server logged its API key"
    );
    s.delete(&id);
}

#[test]
fn an_event_stream_opened_before_a_failure_ends_with_it() {
    let s = Server::start_default();
    let created = s.create(&json!({ "start_url": input_page() }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", Duration::from_secs(40));
    let events = s.events(&id);
    events
        .wait_for(Duration::from_secs(10), |e, v| {
            e == "state" && v["state"] == "ready"
        })
        .expect("the stream's first event: ready");
    // A followed log, opened before the failure too.
    let (log_done, log_end) = std::sync::mpsc::channel();
    let url = format!("{}/api/sessions/{id}/logs?follow=1", s.base);
    let key = format!("Bearer {}", s.api_key);
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(None)
            .build()
            .into();
        let resp = agent.get(&url).header("authorization", &key).call();
        let mut text = String::new();
        if let Ok(r) = resp {
            let _ = std::io::Read::read_to_string(&mut r.into_body().into_reader(), &mut text);
        }
        let _ = log_done.send(text);
    });
    let agent = agent_process(&id).unwrap_or_else(|| panic!("no agent for {id}"));
    sigkill(agent.pid);
    let log = log_end
        .recv_timeout(Duration::from_secs(30))
        .expect("logs?follow=1 did not end after the agent died");
    assert!(log.contains("session ready"), "the followed log: {log}");
    let seen = events
        .wait_closed(Duration::from_secs(30))
        .unwrap_or_else(|seen| panic!("the stream did not end after the agent died: {seen:?}"));
    let last = seen
        .last()
        .unwrap_or_else(|| panic!("no event before the end"));
    assert_eq!(last.0, "state", "{seen:?}");
    assert!(
        matches!(last.1["state"].as_str(), Some("failed" | "stopped")),
        "the stream ended on {last:?}"
    );
    let state = s.session(&id)["state"].clone();
    assert_eq!(
        state, last.1["state"],
        "the stream's last state is the session's"
    );
}

/// CPU time (ticks) of a process's waited-for children: grows with every
/// program it runs.
fn children_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which may contain spaces): state is 3.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of stat(5), 14 and 15 here.
    f[13].parse::<u64>().unwrap() + f[14].parse::<u64>().unwrap()
}

#[test]
fn health_runs_no_program_per_request() {
    let s = Server::start_default();
    let pid = s.pid();
    let before = children_cpu_ticks(pid);
    let mut times = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let r = s.raw("GET", "/health", &[], None);
        times.push(t.elapsed());
        assert_eq!(r.status, 200, "{r:?}");
    }
    let ticks = children_cpu_ticks(pid) - before;
    times.sort();
    eprintln!(
        "300 GET /health: median {:?}, children's CPU {ticks} ticks",
        times[150]
    );
    // Running the backend's checks per request costs several ticks of
    // programs' CPU per ten requests; one background refresh may fall in.
    assert!(ticks < 10, "children of the server used {ticks} ticks");

    let h = s.raw("GET", "/health", &[], None).json();
    assert_eq!(h["status"], "ok", "{h:#}");
    assert_eq!(
        (h["live"].clone(), h["ready"].clone()),
        (json!(true), json!(true))
    );
    assert!(
        h.get("backend").is_none(),
        "anonymous health shows checks: {h:#}"
    );
    let r = s.raw("GET", "/api/health", &[], None);
    assert_error(&r, &[401], None, "health detail without the key");
}

/// Sums every sample of a Prometheus series (all label sets).
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

#[test]
fn health_and_metrics_report_and_count_a_start() {
    let s = Server::start_default();
    let h = s.api("GET", "/api/health", None);
    assert_eq!(h.status, 200, "{h:?}");
    let h = h.json();
    assert_eq!(h["status"], "ok", "{h:#}");
    assert_eq!(h["store"]["ok"], true, "{h:#}");
    assert_eq!(h["backend"]["name"], "sandbox", "{h:#}");
    assert_eq!(h["backend"]["ready"], true, "{h:#}");
    let checks = h["backend"]["checks"].as_array().expect("checks");
    assert!(
        !checks.is_empty() && checks.iter().all(|c| c["ok"] == true),
        "{h:#}"
    );

    let m0 = s.raw("GET", "/metrics", &[], None);
    assert_eq!(m0.status, 200);
    for series in [
        "sandcast_sessions",
        "sandcast_session_starts_total",
        "sandcast_session_failures_total",
        "sandcast_child_restarts_total",
        "sandcast_session_start_seconds_bucket",
        "sandcast_session_start_seconds_count",
    ] {
        assert!(
            metric(&m0.body, series).is_some(),
            "/metrics lacks {series}:\n{}",
            m0.body
        );
    }
    let starts0 = metric(&m0.body, "sandcast_session_starts_total").unwrap();
    let hist0 = metric(&m0.body, "sandcast_session_start_seconds_count").unwrap();

    let created = s.create(&json!({ "start_url": input_page() }));
    let id = created["id"].as_str().unwrap();
    s.wait_state(id, "ready", Duration::from_secs(30));
    let m1 = s.raw("GET", "/metrics", &[], None).body;
    assert_eq!(
        metric(&m1, "sandcast_session_starts_total"),
        Some(starts0 + 1.0),
        "{m1}"
    );
    assert_eq!(
        metric(&m1, "sandcast_session_start_seconds_count"),
        Some(hist0 + 1.0),
        "{m1}"
    );
    assert!(
        m1.lines().any(|l| l.starts_with("sandcast_sessions{")
            && l.contains("\"ready\"")
            && metric(l, "sandcast_sessions") == Some(1.0)),
        "no sandcast_sessions{{state=\"ready\"}} 1:\n{m1}"
    );
    s.delete(id);
}

#[test]
fn provider_preset_starts_a_session_the_seed_way() {
    let page = input_page();
    let s = Server::start(ServerOptions {
        tables: format!("[providers.e2etest]\nstart_url = {page:?}\n"),
        ..Default::default()
    });
    let r = s.api(
        "POST",
        "/api/auth/start",
        Some(&json!({ "userId": "user-1", "provider": "e2etest" }).to_string()),
    );
    assert!(r.status == 200 || r.status == 201, "{r:?}");
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_string();
    assert!(
        v["viewer_url"].as_str().is_some_and(|u| u.contains(&id)),
        "{v:#}"
    );
    let got = s.session(&id);
    assert_eq!(got["start_url"], page.as_str(), "{got:#}");
    assert_eq!(got["user_id"], "user-1", "{got:#}");
    assert_eq!(got["provider"], "e2etest", "{got:#}");

    let r = s.api(
        "POST",
        "/api/auth/start",
        Some(&json!({ "userId": "user-1", "provider": "nope" }).to_string()),
    );
    assert_error(&r, &[400, 404], Some("nope"), "unknown provider");
    s.delete(&id);
    assert_eq!(
        s.session_ids().len(),
        1,
        "the unknown provider created a session"
    );
}

/// The OpenAPI 3.1 schema (see `fixtures/openapi/README.md`).
const OAS_31_SCHEMA: &str = include_str!("../../fixtures/openapi/oas-3.1-schema-2021-04-15.json");

/// Methods probed on every documented path; HEAD and OPTIONS are answered by
/// axum and the CORS layer for any route.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// A validator of `value`s against a schema of the served document.
fn doc_validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{schema}: {e}"))
}

/// Asserts that a real answer matches the document's schema for it.
fn assert_matches(doc: &Value, path: &str, method: &str, r: &Resp) {
    let status = r.status.to_string();
    let response = &doc["paths"][path][method]["responses"][&status];
    assert!(
        response.is_object(),
        "{method} {path} answered {status}, which the document does not list: {}",
        r.body
    );
    let Some(content) = response["content"].as_object() else {
        assert!(
            r.body.is_empty(),
            "{method} {path} {status}: a body not documented: {}",
            r.body
        );
        return;
    };
    let ct = r.header("content-type").unwrap_or("");
    let ct = ct.split(';').next().unwrap().trim();
    let (_, media) = content
        .iter()
        .find(|(k, _)| {
            let k = k.split(';').next().unwrap().trim();
            k == ct || k == "*/*" || k.strip_suffix("/*").is_some_and(|t| ct.starts_with(t))
        })
        .unwrap_or_else(|| {
            panic!("{method} {path} {status}: content type {ct:?} is not one of {content:?}")
        });
    if ct != "application/json" {
        return;
    }
    let schema = &media["schema"];
    let value = r.json();
    let errors: Vec<String> = doc_validator(doc, schema)
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: {value:#} does not match its schema: {errors:?}"
    );
}

/// Every `"$ref"` in `v`, with where it was found.
fn refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push((at.clone(), r)),
                    _ => refs(x, format!("{at}/{k}"), out),
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                refs(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `{name}` segments of a path template.
fn template_params(path: &str) -> Vec<String> {
    path.split('{')
        .skip(1)
        .filter_map(|p| p.split_once('}').map(|(name, _)| name.to_string()))
        .collect()
}

#[test]
fn openapi_document_is_valid_openapi_and_describes_the_real_router() {
    // Room for the probes below under the general limit.
    let s = Server::start(ServerOptions {
        env: vec![("SANDCAST_RATE_LIMIT__API_REQUESTS".into(), "10000".into())],
        ..Default::default()
    });
    // Public: no credential needed.
    let r = s.raw("GET", "/api/openapi.json", &[], None);
    assert_eq!(r.status, 200, "GET /api/openapi.json: {}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "content type: {:?}",
        r.header("content-type")
    );
    let doc = r.json();

    // Valid against the OpenAPI 3.1 schema.
    let meta: Value = serde_json::from_str(OAS_31_SCHEMA).unwrap();
    let oas = jsonschema::draft202012::new(&meta).expect("the OpenAPI 3.1 schema compiles");
    let errors: Vec<String> = oas.iter_errors(&doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "not valid OpenAPI 3.1: {errors:#?}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));

    // Every $ref resolves; every schema compiles.
    let mut all = Vec::new();
    refs(&doc, String::new(), &mut all);
    assert!(!all.is_empty(), "no $ref at all");
    for (at, r) in &all {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{at}: external $ref {r}"));
        assert!(
            doc.pointer(pointer).is_some(),
            "{at}: $ref {r} resolves to nothing"
        );
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        doc_validator(
            &doc,
            &json!({ "$ref": format!("#/components/schemas/{name}") }),
        );
        assert!(schema.is_object(), "{name}");
    }

    // Operations: unique ids, path parameters declared exactly, credentials
    // named in securitySchemes, a description, and an error schema on errors.
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let paths = doc["paths"].as_object().unwrap();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let what = format!("{method} {path}");
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no operationId"));
            assert!(ids.insert(id.to_string()), "{what}: operationId {id} twice");
            assert!(
                op["summary"].as_str().is_some_and(|d| !d.is_empty()),
                "{what}: no summary"
            );
            let declared: std::collections::BTreeSet<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(
                        p["required"], true,
                        "{what}: path parameter {p} not required"
                    );
                    p["name"].as_str().unwrap().to_string()
                })
                .collect();
            let in_template: std::collections::BTreeSet<String> =
                template_params(path).into_iter().collect();
            assert_eq!(declared, in_template, "{what}: path parameters");
            let security = op["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: no security stated"));
            for req in security {
                for name in req.as_object().unwrap().keys() {
                    assert!(schemes.contains_key(name), "{what}: unknown scheme {name}");
                }
            }
            for (status, resp) in op["responses"].as_object().unwrap() {
                // Errors are the JSON error body; a degraded /health keeps its report.
                let body = &resp["content"]["application/json"]["schema"]["$ref"];
                if status.starts_with('4') {
                    assert_eq!(body, "#/components/schemas/ErrorBody", "{what} {status}");
                } else if status.starts_with('5') {
                    assert!(body.is_string(), "{what} {status}: no JSON body documented");
                }
            }
        }
    }
    for needed in [
        "/api/sessions",
        "/api/sessions/{id}",
        "/api/auth/start",
        "/api/webrtc/session/{id}/ws",
        "/health",
        "/metrics",
        "/viewer/{id}/vnc",
        "/api/openapi.json",
    ] {
        assert!(paths.contains_key(needed), "{needed} is not documented");
    }

    // The real router serves exactly the documented methods on each path:
    // a documented one is routed (never 405, never the JSON 404 of unknown
    // paths), any other answers 405. Parameters get a well-formed id of no
    // session, so nothing is created or changed.
    let auth = format!("Bearer {}", s.api_key);
    let mut error_answers = 0;
    for (path, item) in paths {
        let concrete = template_params(path).iter().fold(path.clone(), |p, name| {
            p.replace(&format!("{{{name}}}"), "0123456789abcdef01234567")
        });
        for method in METHODS {
            // A fresh connection per probe: the server may close one whose
            // request it answered without reading, and the client's pool
            // would not notice in time.
            let r = s.raw(
                &method.to_uppercase(),
                &concrete,
                &[("authorization", &auth), ("connection", "close")],
                None,
            );
            let what = format!("{method} {concrete}");
            if item.get(method).is_some() {
                assert_ne!(r.status, 405, "{what}: documented but not routed");
                assert!(
                    !r.body.contains("no such endpoint"),
                    "{what}: documented but not routed: {}",
                    r.body
                );
                assert_matches(&doc, path, method, &r);
                error_answers += usize::from(r.status >= 400);
            } else {
                assert_eq!(
                    r.status, 405,
                    "{what}: routed but not documented: {}",
                    r.body
                );
            }
        }
    }
    assert!(
        error_answers > 5,
        "only {error_answers} error answers checked"
    );

    // Credentials as documented: operations that need the API key refuse a
    // request without one; open ones do not ask for one.
    for (path, item) in paths {
        let concrete = template_params(path).iter().fold(path.clone(), |p, name| {
            p.replace(&format!("{{{name}}}"), "0123456789abcdef01234567")
        });
        for (method, op) in item.as_object().unwrap() {
            if op_is_websocket(op) {
                continue;
            }
            let security = op["security"].as_array().unwrap();
            let open = security
                .iter()
                .any(|r| r.as_object().is_some_and(|o| o.is_empty()));
            let key_only = security.len() == 1 && security[0].get("api_key").is_some();
            let r = s.raw(
                &method.to_uppercase(),
                &concrete,
                &[("connection", "close")],
                None,
            );
            if key_only {
                assert_eq!(r.status, 401, "{method} {path} without the key: {}", r.body);
                assert_matches(&doc, path, method, &r);
            } else if open {
                assert_ne!(
                    r.status, 401,
                    "{method} {path} is documented as open: {}",
                    r.body
                );
            }
        }
    }

    // A real session through its life: every answer matches its schema.
    let r = s.api(
        "POST",
        "/api/sessions",
        Some(&json!({ "start_url": input_page() }).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_matches(&doc, "/api/sessions", "post", &r);
    let created = r.json();
    let id = created["id"].as_str().unwrap();
    let token = created["viewer_token"].as_str().unwrap();
    s.wait_state(id, "ready", Duration::from_secs(30));
    let one = "/api/sessions/{id}";
    let r = s.api("GET", &format!("/api/sessions/{id}"), None);
    assert!(
        r.json()["children"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "a ready session lists its children: {}",
        r.body
    );
    assert_matches(&doc, one, "get", &r);
    assert_matches(
        &doc,
        "/api/sessions",
        "get",
        &s.api("GET", "/api/sessions", None),
    );
    let viewer = format!("Bearer {token}");
    let r = s.raw(
        "GET",
        &format!("/viewer/{id}/state"),
        &[("authorization", &viewer)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_matches(&doc, "/viewer/{id}/state", "get", &r);
    let r = s.raw("GET", &format!("/viewer/{id}/state"), &[], None);
    assert_eq!(r.status, 401, "viewer state without a token: {}", r.body);
    assert_matches(&doc, "/viewer/{id}/state", "get", &r);
    assert_eq!(
        s.ws_handshake(&format!("/viewer/{id}/vnc?token={token}")),
        101,
        "the VNC WebSocket is an upgrade, as documented"
    );
    // Tokens with roles: made, listed, refused, revoked, as documented.
    let tokens = "/api/sessions/{id}/tokens";
    let path = format!("/api/sessions/{id}/tokens");
    for body in [
        r#"{"role":"view","ttl_seconds":60}"#,
        r#"{"role":"automation"}"#,
    ] {
        let r = s.api("POST", &path, Some(body));
        assert_eq!(r.status, 201, "{body}: {}", r.body);
        assert_matches(&doc, tokens, "post", &r);
    }
    let r = s.api("POST", &path, Some(r#"{"role":"owner"}"#));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_matches(&doc, tokens, "post", &r);
    let r = s.api("GET", &path, None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_matches(&doc, tokens, "get", &r);
    let first = r.json()["tokens"][0]["id"].as_str().unwrap().to_string();
    let r = s.api("DELETE", &format!("{path}/{first}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_matches(&doc, "/api/sessions/{id}/tokens/{token_id}", "delete", &r);
    let r = s.raw("GET", "/health", &[], None);
    assert_matches(&doc, "/health", "get", &r);
    let r = s.api("DELETE", &format!("/api/sessions/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_matches(&doc, one, "delete", &r);
    s.wait_state(id, "stopped", Duration::from_secs(20));
}

/// Whether an operation is documented as a WebSocket upgrade (answers 101).
fn op_is_websocket(op: &Value) -> bool {
    op["responses"].get("101").is_some()
}

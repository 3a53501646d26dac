//! The HTTP API of a real `sandcast serve`: bad input, auth, rate limits,
//! health, metrics and provider presets.

use std::time::Duration;

use sandcast_e2e::{Resp, Server, ServerOptions, input_page};
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
fn api_rate_limit_answers_429_but_signaling_still_works() {
    const LIMIT: usize = 5;
    let s = Server::start(ServerOptions {
        env: vec![(
            "SANDCAST_RATE_LIMIT__API_REQUESTS".into(),
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
    assert_error(&r, &[429], None, "request over the limit");
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
    let h = s.raw("GET", "/health", &[], None);
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

//! Webhooks with the real server: a receiver on 127.0.0.1 that refuses
//! attempts gets each event once acknowledged, signed, in order; a
//! delivery pending when the server is killed arrives after its restart.

use std::time::Duration;

use sandcast_e2e::webhook_receiver::{Received, Receiver, SECRET, expected_signature, tables};
use sandcast_e2e::{Server, ServerOptions, input_page, wait_no_leftovers};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(40);

/// Every request: signed over its exact body, its headers agreeing with
/// its body, about session `id`.
fn assert_well_formed(got: &[Received], id: &str) {
    for r in got {
        assert_eq!(
            r.header("x-sandcast-signature"),
            expected_signature(&r.body),
            "a wrong signature"
        );
        assert_eq!(r.header("content-type"), "application/json");
        let body = r.json();
        assert_eq!(body["event"], r.event(), "{body}");
        assert_eq!(body["id"], r.header("x-sandcast-delivery"), "{body}");
        assert_eq!(body["session_id"], id, "{body}");
        assert_eq!(body["data"]["state"], r.event(), "{body}");
        assert!(body["at_ms"].as_i64().is_some_and(|t| t > 0), "{body}");
    }
}

/// Each of `events` acknowledged exactly once, in this order, each after
/// two refusals at least.
fn assert_acknowledged_once_in_order(receiver: &Receiver, events: &[&str]) {
    let acked = receiver.acknowledged();
    let names: Vec<&str> = acked.iter().map(Received::event).collect();
    assert_eq!(names, events, "acknowledged events");
    let got = receiver.got();
    for r in &acked {
        let tries = got
            .iter()
            .filter(|g| g.header("x-sandcast-delivery") == r.header("x-sandcast-delivery"))
            .count();
        assert!(
            tries >= 3,
            "{} acknowledged after {tries} attempts",
            r.event()
        );
    }
}

/// `GET /api/webhooks/deliveries` as the document describes it; returns
/// the deliveries.
fn deliveries(s: &Server) -> Vec<Value> {
    let r = s.api("GET", "/api/webhooks/deliveries?limit=50", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !r.body.contains(SECRET),
        "the secret shows in the deliveries"
    );
    let doc = s.raw("GET", "/api/openapi.json", &[], None).json();
    let mut schema = doc["paths"]["/api/webhooks/deliveries"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"]
        .clone();
    schema["components"] = doc["components"].clone();
    let v = jsonschema::draft202012::new(&schema).expect("the schema compiles");
    let answer = r.json();
    let errors: Vec<String> = v.iter_errors(&answer).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{answer:#} does not match: {errors:?}");
    answer["deliveries"].as_array().unwrap().clone()
}

/// Each of `events` delivered, in order, after at least `min_attempts`.
fn assert_delivered(s: &Server, receiver: &Receiver, events: &[&str], min_attempts: u64) {
    let shown = deliveries(s);
    let mut seen: Vec<&str> = Vec::new();
    for d in shown.iter().rev() {
        assert_eq!(d["url"], receiver.url, "{d}");
        assert_eq!(d["state"], "delivered", "{d}");
        assert_eq!(d["last_status"], 200, "{d}");
        assert!(d["attempts"].as_u64().unwrap() >= min_attempts, "{d}");
        assert!(d["next_attempt_at"].is_null(), "{d}");
        seen.push(d["event"].as_str().unwrap());
    }
    assert_eq!(seen, events, "deliveries, oldest first: {shown:#?}");
}

#[test]
fn events_arrive_signed_once_acknowledged_and_in_order() {
    // `ready` is refused until the session has stopped, so `stopped` waits
    // behind it.
    let receiver = Receiver::start(&["ready"]);
    let s = Server::start(ServerOptions {
        tables: tables(&receiver.url),
        ..Default::default()
    });
    let created = s.create(&json!({ "start_url": input_page(), "user_id": "hooked" }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    receiver.wait("two refused ready attempts", Duration::from_secs(10), |g| {
        g.iter().filter(|r| r.event() == "ready").count() >= 2
    });
    s.delete(&id);
    // Time for `stopped` to be tried, were it not held back behind `ready`.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        receiver.got().iter().all(|r| r.event() == "ready"),
        "an event was sent before ready was acknowledged"
    );
    receiver.release("ready");
    receiver.wait("ready and stopped", Duration::from_secs(20), |g| {
        g.iter().filter(|r| r.acknowledged()).count() >= 2
    });
    // Nothing more comes: each was acknowledged once.
    std::thread::sleep(Duration::from_secs(1));
    assert_acknowledged_once_in_order(&receiver, &["ready", "stopped"]);
    let got = receiver.got();
    assert_well_formed(&got, &id);
    let ready = got.iter().find(|r| r.acknowledged()).unwrap().json();
    assert_eq!(ready["user_id"], "hooked", "{ready}");
    assert_delivered(&s, &receiver, &["ready", "stopped"], 3);
    assert!(
        !s.logs().contains(SECRET),
        "the secret is in the server's output"
    );
    let left = wait_no_leftovers(&id, Duration::from_secs(15));
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

#[test]
fn a_delivery_pending_when_the_server_is_killed_arrives_after_its_restart() {
    let receiver = Receiver::start(&["ready"]);
    let mut s = Server::start(ServerOptions {
        tables: tables(&receiver.url),
        ..Default::default()
    });
    let created = s.create(&json!({ "start_url": input_page() }));
    let id = created["id"].as_str().unwrap().to_string();
    s.wait_state(&id, "ready", READY);
    receiver.wait("a refused ready attempt", Duration::from_secs(10), |g| {
        g.iter().any(|r| r.event() == "ready")
    });
    let before = receiver.got()[0].header("x-sandcast-delivery").to_string();

    // Killed between attempts: the next run sends what is pending, and the
    // `stopped` its reconciliation records.
    s.kill();
    receiver.release("ready");
    s.restart();
    receiver.wait("ready and stopped", Duration::from_secs(30), |g| {
        g.iter().filter(|r| r.acknowledged()).count() >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_acknowledged_once_in_order(&receiver, &["ready", "stopped"]);
    let acked = receiver.acknowledged();
    assert_eq!(
        acked[0].header("x-sandcast-delivery"),
        before,
        "the same delivery, sent again"
    );
    let stopped = acked[1].json();
    assert!(
        stopped["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarted")),
        "{stopped}"
    );
    assert_well_formed(&receiver.got(), &id);
    // Killed after one refused attempt of `ready`, perhaps before a second.
    assert_delivered(&s, &receiver, &["ready", "stopped"], 1);
    let left = wait_no_leftovers(&id, Duration::from_secs(20));
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

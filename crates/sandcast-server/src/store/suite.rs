//! The one set of tests both stores pass: each case gets a function that
//! opens the same, initially empty, database (again), so a case can also
//! check what survives reopening it.

use super::*;
use crate::config::WebhookRetry;
use crate::webhooks::{DeliveryState, Outcome, after_attempt, given_up};

/// Opens the case's database.
pub type Open<'a> = &'a dyn Fn() -> Box<dyn Store>;

/// One case of the suite.
pub type Case = fn(Open);

/// Every case, by name.
pub const CASES: &[(&str, Case)] = &[
    (
        "rows_round_trip_and_states_move_only_forward",
        rows_round_trip_and_states_move_only_forward,
    ),
    (
        "reconcile_stops_live_sessions_and_survives_reopen",
        reconcile_stops_live_sessions_and_survives_reopen,
    ),
    (
        "pages_are_newest_first_filtered_and_complete",
        pages_are_newest_first_filtered_and_complete,
    ),
    (
        "ended_sessions_age_out_with_their_events",
        ended_sessions_age_out_with_their_events,
    ),
    (
        "tokens_are_kept_per_session_revoked_once_and_go_with_the_session",
        tokens_are_kept_per_session_revoked_once_and_go_with_the_session,
    ),
    (
        "each_endpoint_gets_its_deliveries_in_order_each_acknowledged_first",
        each_endpoint_gets_its_deliveries_in_order_each_acknowledged_first,
    ),
    (
        "a_delivery_is_given_up_at_the_deadline_and_the_next_one_goes",
        a_delivery_is_given_up_at_the_deadline_and_the_next_one_goes,
    ),
];

fn row(id: &str) -> Row {
    let base = Row::for_test(id);
    Row {
        user_id: Some("u".into()),
        spec: Spec {
            launch: Some(vec!["xterm".into()]),
            egress: sandcast_backend::Egress::Internet,
            ..base.spec
        },
        ..base
    }
}

#[test]
fn transitions() {
    use State::*;
    assert!(Starting.can_become(Ready));
    assert!(Ready.can_become(Stopping));
    assert!(Stopping.can_become(Stopped));
    assert!(!Stopped.can_become(Ready));
    assert!(!Failed.can_become(Ready));
    assert!(!Stopping.can_become(Ready));
    assert!(!Ready.can_become(Starting));
}

pub fn rows_round_trip_and_states_move_only_forward(open: Open) {
    let s = open();
    s.insert(&row("a")).unwrap();
    let got = s.get("a").unwrap().unwrap();
    // A session is inserted as this node's (none on a single host).
    let node = s
        .cluster()
        .map(|c| c.node_id().to_string())
        .unwrap_or_default();
    assert_eq!(got.node, node);
    assert_eq!(
        Row {
            node: String::new(),
            ..got
        },
        row("a")
    );
    assert!(s.insert(&row("a")).is_err(), "duplicate id");
    assert!(s.set_state("a", State::Ready, None, 5).unwrap());
    assert_eq!(s.get("a").unwrap().unwrap().ready_ms, Some(5));
    assert!(
        s.set_state("a", State::Failed, Some("browser crash loop"), 6)
            .unwrap()
    );
    assert!(!s.set_state("a", State::Ready, None, 7).unwrap());
    let a = s.get("a").unwrap().unwrap();
    assert_eq!(a.state, State::Failed);
    assert_eq!(a.reason.as_deref(), Some("browser crash loop"));
    assert!(!s.set_state("nope", State::Ready, None, 7).unwrap());
}

pub fn reconcile_stops_live_sessions_and_survives_reopen(open: Open) {
    let s = open();
    s.insert(&row("a")).unwrap();
    s.insert(&row("b")).unwrap();
    s.set_state("b", State::Stopping, None, 2).unwrap();
    s.set_state("b", State::Stopped, Some("deleted"), 3)
        .unwrap();
    s.add_event("a", "state", &serde_json::json!({"state": "starting"}), 1)
        .unwrap();
    drop(s);
    let s = open();
    let ids = s.reconcile("server restarted", 9).unwrap();
    assert_eq!(ids, ["a"]);
    let a = s.get("a").unwrap().unwrap();
    assert_eq!(a.state, State::Stopped);
    assert_eq!(a.reason.as_deref(), Some("server restarted"));
    assert_eq!(
        s.get("b").unwrap().unwrap().reason.as_deref(),
        Some("deleted")
    );
    assert_eq!(s.events("a").unwrap().len(), 1);
}

pub fn pages_are_newest_first_filtered_and_complete(open: Open) {
    let s = open();
    // 25 sessions, several created in the same millisecond.
    for i in 0..25 {
        let mut r = row(&format!("s{i:02}"));
        r.created_ms = 1000 + i / 3;
        r.user_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
        s.insert(&r).unwrap();
        if i % 5 == 0 {
            s.set_state(&r.id, State::Stopped, None, 2000).unwrap();
        }
    }
    let mut q = PageQuery {
        limit: 4,
        ..PageQuery::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = s.page(&q).unwrap();
        seen.extend(page.iter().map(|r| (r.created_ms, r.id.clone())));
        match page.last() {
            Some(last) if page.len() == q.limit => {
                q.after = Some((last.created_ms, last.id.clone()))
            }
            _ => break,
        }
    }
    let mut want = seen.clone();
    want.sort();
    want.reverse();
    want.dedup();
    assert_eq!(seen, want, "newest first, no repeats");
    assert_eq!(seen.len(), 25);

    let stopped = s
        .page(&PageQuery {
            limit: 100,
            states: vec![State::Stopped],
            ..PageQuery::default()
        })
        .unwrap();
    assert_eq!(stopped.len(), 5);
    assert!(stopped.iter().all(|r| r.state == State::Stopped));
    let odd_starting = s
        .page(&PageQuery {
            limit: 100,
            states: vec![State::Starting, State::Ready],
            user_id: Some("odd".into()),
            ..PageQuery::default()
        })
        .unwrap();
    assert_eq!(odd_starting.len(), 10);
    assert!(
        odd_starting
            .iter()
            .all(|r| r.user_id.as_deref() == Some("odd"))
    );
    let counts = s.count_by_state().unwrap();
    assert!(counts.contains(&(State::Stopped, 5)));
    assert!(counts.contains(&(State::Starting, 20)));
    assert!(counts.contains(&(State::Ready, 0)));
}

pub fn ended_sessions_age_out_with_their_events(open: Open) {
    let s = open();
    for id in ["live", "failed", "stopped", "late"] {
        s.insert(&row(id)).unwrap();
        s.add_event(id, "state", &serde_json::json!({}), 1).unwrap();
    }
    s.set_state("failed", State::Failed, Some("x"), 10).unwrap();
    s.set_state("stopped", State::Stopped, None, 20).unwrap();
    s.set_state("late", State::Stopped, None, 50).unwrap();
    // Stopping a failed session keeps the time it ended.
    s.set_state("failed", State::Stopped, None, 40).unwrap();
    assert_eq!(s.ended_before(9, 10).unwrap(), Vec::<String>::new());
    assert_eq!(s.ended_before(30, 10).unwrap(), ["failed", "stopped"]);
    assert_eq!(s.ended_before(30, 1).unwrap(), ["failed"]);
    assert!(s.delete("failed").unwrap());
    assert!(!s.delete("failed").unwrap());
    assert!(!s.exists("failed").unwrap());
    assert!(s.events("failed").unwrap().is_empty());
    assert_eq!(s.events("live").unwrap().len(), 1);
    let ids = s.reconcile("restart", 60).unwrap();
    assert_eq!(ids, ["live"]);
    assert_eq!(s.ended_before(60, 10).unwrap(), ["stopped", "late", "live"]);
}

pub fn tokens_are_kept_per_session_revoked_once_and_go_with_the_session(open: Open) {
    let s = open();
    use crate::tokens::Role;
    s.insert(&row("a")).unwrap();
    s.insert(&row("b")).unwrap();
    let tok = |id: &str, session: &str, role, created| TokenRow {
        id: id.into(),
        session_id: session.into(),
        role,
        token_hash: format!("hash-{id}"),
        created_ms: created,
        expires_ms: (role == Role::View).then_some(99),
        revoked_ms: None,
    };
    s.insert_token(&tok("t2", "a", Role::Control, 2)).unwrap();
    s.insert_token(&tok("t1", "a", Role::View, 1)).unwrap();
    s.insert_token(&tok("t3", "b", Role::Automation, 1))
        .unwrap();
    assert!(
        s.insert_token(&tok("t4", "nope", Role::View, 1)).is_err(),
        "a token needs its session"
    );
    assert!(s.insert_token(&tok("t1", "b", Role::View, 1)).is_err());
    let a = s.tokens("a").unwrap();
    assert_eq!(
        a,
        [
            tok("t1", "a", Role::View, 1),
            tok("t2", "a", Role::Control, 2)
        ]
    );
    assert!(s.revoke_token("a", "t1", 10).unwrap());
    assert!(s.revoke_token("a", "t1", 20).unwrap());
    assert_eq!(s.tokens("a").unwrap()[0].revoked_ms, Some(10));
    assert!(!s.revoke_token("a", "t3", 10).unwrap(), "b's token");
    assert!(!s.revoke_token("a", "zz", 10).unwrap());
    assert_eq!(s.tokens("b").unwrap()[0].revoked_ms, None);
    assert!(s.delete("a").unwrap());
    assert!(s.tokens("a").unwrap().is_empty());
    assert_eq!(s.tokens("b").unwrap().len(), 1);
}

fn delivery(n: u32, url: &str, at: i64) -> NewDelivery {
    NewDelivery {
        id: format!("d{n}"),
        url: url.into(),
        event: "ready".into(),
        session_id: "s".into(),
        body: format!("{{\"n\":{n}}}"),
        created_ms: at,
    }
}

fn failed(status: u16) -> Outcome {
    Outcome {
        status: Some(status),
        error: Some(format!("HTTP {status}")),
    }
}

const OK: Outcome = Outcome {
    status: Some(200),
    error: None,
};

fn head_of<'a>(heads: &'a [Head], url: &str) -> &'a Head {
    heads.iter().find(|h| h.delivery.url == url).unwrap()
}

/// One attempt recorded as the webhook worker records it.
fn attempt(
    store: &dyn Store,
    head: &Head,
    outcome: &Outcome,
    now_ms: i64,
    retry: &WebhookRetry,
) -> DeliveryState {
    let update = after_attempt(head, outcome, now_ms, retry);
    store.update_delivery(head.seq, &update).unwrap();
    update.state
}

/// Per endpoint, the next delivery is the oldest pending one, and it
/// stays so through failures until it is acknowledged; endpoints do
/// not wait for each other.
pub fn each_endpoint_gets_its_deliveries_in_order_each_acknowledged_first(open: Open) {
    let store = &*open();
    let retry = WebhookRetry::default();
    for (n, url) in [(1, "http://a/"), (2, "http://b/"), (3, "http://a/")] {
        store.enqueue_deliveries(&[delivery(n, url, 1000)]).unwrap();
    }
    let heads = store.delivery_heads().unwrap();
    assert_eq!(heads.len(), 2);
    assert_eq!(head_of(&heads, "http://a/").delivery.id, "d1");
    assert_eq!(head_of(&heads, "http://a/").next_ms, 1000, "due at once");
    assert_eq!(head_of(&heads, "http://b/").delivery.id, "d2");

    // Two failures: d1 stays a's head, due after 1 s, then 2 s.
    let h = head_of(&heads, "http://a/").clone();
    let st = attempt(store, &h, &failed(500), 1100, &retry);
    assert_eq!(st, DeliveryState::Pending);
    let heads = store.delivery_heads().unwrap();
    let h = head_of(&heads, "http://a/").clone();
    assert_eq!(
        (h.delivery.id.as_str(), h.attempts, h.next_ms),
        ("d1", 1, 2100)
    );
    let timeout = Outcome {
        status: None,
        error: Some("timed out".into()),
    };
    attempt(store, &h, &timeout, 2100, &retry);
    let heads = store.delivery_heads().unwrap();
    let h = head_of(&heads, "http://a/").clone();
    assert_eq!(
        (h.delivery.id.as_str(), h.attempts, h.next_ms),
        ("d1", 2, 4100)
    );
    // b was not held up.
    let b = head_of(&heads, "http://b/").clone();
    assert_eq!(
        attempt(store, &b, &OK, 2200, &retry),
        DeliveryState::Delivered
    );

    // Acknowledged: d3 is next for a.
    assert_eq!(
        attempt(store, &h, &OK, 4100, &retry),
        DeliveryState::Delivered
    );
    let heads = store.delivery_heads().unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].delivery.id, "d3");

    let shown = store.recent_deliveries(10).unwrap();
    let ids: Vec<&str> = shown.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["d3", "d2", "d1"], "newest first");
    let d1 = &shown[2];
    assert_eq!(d1.state, DeliveryState::Delivered);
    assert_eq!((d1.attempts, d1.last_status), (3, Some(200)));
    assert_eq!(d1.last_error, None);
    assert_eq!(d1.next_attempt_at, None);
    assert_eq!(d1.created_at, "1970-01-01T00:00:01.000Z");
    assert_eq!(
        shown[0].next_attempt_at.as_deref(),
        Some("1970-01-01T00:00:01.000Z")
    );
    assert_eq!(store.recent_deliveries(1).unwrap().len(), 1);
}

/// Retries stop `give_up_seconds` after the event: the last wait is cut
/// to that time, and a failure then gives the delivery up, so the next
/// one goes.
pub fn a_delivery_is_given_up_at_the_deadline_and_the_next_one_goes(open: Open) {
    let store = &*open();
    let retry = WebhookRetry {
        first_ms: 1000,
        max_ms: 60_000,
        give_up_seconds: 10,
        ..WebhookRetry::default()
    };
    store
        .enqueue_deliveries(&[delivery(1, "http://a/", 0)])
        .unwrap();
    store
        .enqueue_deliveries(&[delivery(2, "http://a/", 5)])
        .unwrap();
    let mut now = 0;
    let mut times = Vec::new();
    loop {
        let h = store.delivery_heads().unwrap()[0].clone();
        if h.delivery.id != "d1" {
            break;
        }
        now = now.max(h.next_ms);
        times.push(now);
        attempt(store, &h, &failed(503), now, &retry);
    }
    assert_eq!(times, [0, 1000, 3000, 7000, 10_000]);
    let shown = store.recent_deliveries(10).unwrap();
    assert_eq!(shown[1].state, DeliveryState::Failed);
    assert_eq!(shown[1].last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(shown[1].next_attempt_at, None);
    assert_eq!(shown[0].state, DeliveryState::Pending);

    // Old finished deliveries are pruned; pending ones never.
    assert_eq!(store.prune_deliveries(100).unwrap(), 1);
    assert_eq!(store.recent_deliveries(10).unwrap().len(), 1);
    let h = store.delivery_heads().unwrap()[0].clone();
    store.update_delivery(h.seq, &given_up(&h, "gone")).unwrap();
    assert!(store.delivery_heads().unwrap().is_empty());
}

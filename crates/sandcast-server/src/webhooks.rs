//! Webhooks: session events POSTed, signed, to the operator's endpoints.
//!
//! [`Webhooks::record`] is called where every session event is recorded
//! (`Manager::event`, and `reconcile` for the sessions a previous run left):
//! for each `[[webhooks]]` entry subscribed to the event it writes a
//! delivery into the store's `webhook_deliveries` table, in the same call,
//! and wakes the worker. Nothing is held only in memory, so a restart loses
//! nothing: the next run's worker picks up whatever is pending.
//!
//! The worker ([`Webhooks::spawn`]) sends the oldest pending delivery of
//! each endpoint, one at a time per endpoint, so an endpoint sees its events
//! in order, each acknowledged (2xx) before the next is sent. A failure is
//! retried after `[webhook_retry] first_ms`, doubling up to `max_ms`, until
//! `give_up_seconds` after the event, when the delivery is `failed` and the
//! next one goes. Delivery is at least once (an answer lost to a crash is
//! sent again); `X-Sandcast-Delivery` lets a receiver drop repeats.
//!
//! The body is fixed when the event happens and signed as sent:
//! `X-Sandcast-Signature: sha256=<hex HMAC-SHA256(secret, body)>`. Secrets
//! stay in the configuration: never stored, logged or shown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};

use crate::api::AppState;
use crate::config::{Config, Webhook, WebhookRetry};
use crate::error::ApiError;
use crate::manager::now_ms;
#[cfg(test)]
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// The events a webhook can subscribe to: the session states `ready`,
/// `completed`, `failed`, `stopped`, and a child's `crash_loop`.
pub const EVENTS: [&str; 5] = ["ready", "completed", "failed", "stopped", "crash_loop"];

/// The webhook event of a session event (`kind` and `data` as
/// `Manager::event` records them), if it is one: a state event's state
/// name, or `crash_loop` for a child report in that state.
pub fn event_name(kind: &str, data: &Value) -> Option<&'static str> {
    let state = data.get("state")?.as_str()?;
    let name = match kind {
        "state" => state,
        "child" if state == "crash_loop" => state,
        _ => return None,
    };
    EVENTS.into_iter().find(|e| *e == name)
}

/// The `X-Sandcast-Signature` value of `body`: `sha256=` and the hex
/// HMAC-SHA256 of its exact bytes with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait after the `failures`-th failed attempt (1 for the first):
/// `first_ms`, doubled each time, at most `max_ms`.
pub fn backoff(failures: u32, retry: &WebhookRetry) -> Duration {
    let doublings = failures.saturating_sub(1).min(63);
    let ms = retry
        .first_ms
        .saturating_mul(1u64 << doublings)
        .min(retry.max_ms);
    Duration::from_millis(ms)
}

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not yet acknowledged; tried again at `next_attempt_at`.
    Pending,
    /// Acknowledged with a 2xx answer.
    Delivered,
    /// Given up: not acknowledged within `webhook_retry.give_up_seconds`,
    /// or its endpoint is no longer configured.
    Failed,
}

impl DeliveryState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub(crate) fn parse(s: &str) -> DeliveryState {
        match s {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            _ => DeliveryState::Failed,
        }
    }
}

/// A delivery to write: one event for one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The delivery id (`X-Sandcast-Delivery`, `id` of the body).
    pub id: String,
    /// The endpoint.
    pub url: String,
    /// One of [`EVENTS`].
    pub event: String,
    /// The session it is about.
    pub session_id: String,
    /// The exact JSON body sent.
    pub body: String,
    /// When the event happened.
    pub created_ms: i64,
}

/// The oldest pending delivery of an endpoint: what is sent next there.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Row number: the order of the events.
    pub seq: i64,
    /// The delivery.
    pub delivery: NewDelivery,
    /// Attempts so far.
    pub attempts: u32,
    /// When it may be tried.
    pub next_ms: i64,
}

/// What one attempt gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The HTTP status of the answer, when there was one.
    pub status: Option<u16>,
    /// Why it was not acknowledged, when it was not.
    pub error: Option<String>,
}

impl Outcome {
    /// Whether the endpoint acknowledged it (2xx).
    pub fn acknowledged(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// What becomes of a delivery: after an attempt, or given up without one.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryUpdate {
    /// Its state now.
    pub state: DeliveryState,
    /// Attempts so far.
    pub attempts: u32,
    /// When it is tried next, while pending.
    pub next_ms: Option<i64>,
    /// The attempt just made: when, and the status it was answered (none:
    /// given up without one, and the last attempt's figures stay).
    pub attempt: Option<(i64, Option<u16>)>,
    /// Why it was not acknowledged.
    pub error: Option<String>,
}

/// What an attempt at `now_ms` makes of a delivery: delivered when
/// acknowledged; else due again after [`backoff`], or `failed` once
/// `give_up_seconds` after the event have passed (the last attempt is made
/// at that time).
pub fn after_attempt(
    head: &Head,
    outcome: &Outcome,
    now_ms: i64,
    retry: &WebhookRetry,
) -> DeliveryUpdate {
    let attempts = head.attempts + 1;
    let give_up_ms = head
        .delivery
        .created_ms
        .saturating_add(retry.give_up_seconds.saturating_mul(1000) as i64);
    let (state, next_ms) = if outcome.acknowledged() {
        (DeliveryState::Delivered, None)
    } else if now_ms >= give_up_ms {
        (DeliveryState::Failed, None)
    } else {
        let wait = backoff(attempts, retry).as_millis() as i64;
        (
            DeliveryState::Pending,
            Some(now_ms.saturating_add(wait).min(give_up_ms)),
        )
    };
    DeliveryUpdate {
        state,
        attempts,
        next_ms,
        attempt: Some((now_ms, outcome.status)),
        error: outcome.error.clone(),
    }
}

/// A pending delivery given up without an attempt (its endpoint is no
/// longer configured).
pub fn given_up(head: &Head, why: &str) -> DeliveryUpdate {
    DeliveryUpdate {
        state: DeliveryState::Failed,
        attempts: head.attempts,
        next_ms: None,
        attempt: None,
        error: Some(why.to_string()),
    }
}

/// A delivery as `GET /api/webhooks/deliveries` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// The delivery id: `X-Sandcast-Delivery` and the body's `id`.
    pub id: String,
    /// The endpoint.
    pub url: String,
    /// The event.
    #[schema(pattern = "^(ready|completed|failed|stopped|crash_loop)$")]
    pub event: String,
    /// The session it is about.
    pub session_id: String,
    /// Where it is.
    pub state: DeliveryState,
    /// Attempts so far.
    pub attempts: u32,
    /// When the event happened (RFC 3339).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it was last tried.
    #[schema(format = DateTime)]
    pub last_attempt_at: Option<String>,
    /// The HTTP status the endpoint last answered, if it answered.
    pub last_status: Option<u16>,
    /// Why the last attempt was not acknowledged (a connection error, a
    /// timeout, a status that is not 2xx).
    pub last_error: Option<String>,
    /// When it is tried next, while pending.
    #[schema(format = DateTime)]
    pub next_attempt_at: Option<String>,
}

/// Answer of `GET /api/webhooks/deliveries`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// The most recent deliveries, newest event first.
    pub deliveries: Vec<Delivery>,
}

/// A time as the API shows it.
pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The configured webhooks over the store, and the worker's wake-up.
pub struct Webhooks {
    hooks: Vec<Webhook>,
    retry: WebhookRetry,
    retention_ms: i64,
    store: Arc<dyn Store>,
    wake: Notify,
}

/// The running delivery worker; [`Worker::stop`] ends it.
pub struct Worker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Stops the worker. An attempt under way is abandoned: its delivery
    /// stays pending and is sent again by the next run.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// How often delivered and failed deliveries past `retention.seconds` are
/// removed.
const PRUNE_EVERY_MS: i64 = 3600 * 1000;

impl Webhooks {
    /// The configuration's webhooks over `store`.
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Webhooks {
        Webhooks {
            hooks: config.webhooks.clone(),
            retry: config.webhook_retry.clone(),
            retention_ms: (config.retention.seconds.saturating_mul(1000)).min(i64::MAX as u64)
                as i64,
            store,
            wake: Notify::new(),
        }
    }

    /// Writes a delivery of the session event (`kind`, `data` as stored at
    /// `at_ms`) for every webhook subscribed to it, and wakes the worker.
    /// Not a webhook event, or no subscriber: nothing.
    pub fn record(&self, session_id: &str, kind: &str, data: &Value, at_ms: i64) {
        let Some(event) = event_name(kind, data) else {
            return;
        };
        if !self.hooks.iter().any(|h| h.wants(event)) {
            return;
        }
        if let Err(e) = self.write(session_id, event, data, at_ms) {
            tracing::error!(session = session_id, event, error = %e, "could not record webhook deliveries");
        }
        self.wake.notify_one();
    }

    fn write(
        &self,
        session_id: &str,
        event: &str,
        data: &Value,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let row = self.store.get(session_id)?;
        let mut deliveries = Vec::new();
        for hook in self.hooks.iter().filter(|h| h.wants(event)) {
            let id = hex::encode(rand::random::<[u8; 16]>());
            let body = json!({
                "id": id,
                "event": event,
                "session_id": session_id,
                "user_id": row.as_ref().and_then(|r| r.user_id.clone()),
                "provider": row.as_ref().and_then(|r| r.provider.clone()),
                "at_ms": at_ms,
                "data": data,
            });
            deliveries.push(NewDelivery {
                id,
                url: hook.url.clone(),
                event: event.to_string(),
                session_id: session_id.to_string(),
                body: body.to_string(),
                created_ms: at_ms,
            });
        }
        self.store.enqueue_deliveries(&deliveries)
    }

    /// Starts the delivery worker.
    pub fn spawn(self: &Arc<Self>) -> Worker {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(self.clone().run(stopped));
        Worker { stop, task }
    }

    async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let http = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(self.retry.timeout_ms))
            // A redirect is not an acknowledgement: the endpoint is configured exactly.
            .redirects(0)
            .user_agent(concat!("sandcast/", env!("CARGO_PKG_VERSION")))
            .build();
        let secrets: HashMap<&str, &str> = self
            .hooks
            .iter()
            .map(|h| (h.url.as_str(), h.secret.as_str()))
            .collect();
        let mut in_flight: HashSet<String> = HashSet::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Head, Outcome)>();
        let mut pruned_ms = 0;
        loop {
            let now = now_ms();
            if now - pruned_ms >= PRUNE_EVERY_MS {
                pruned_ms = now;
                if let Err(e) = self.store.prune_deliveries(now - self.retention_ms) {
                    tracing::warn!(error = %e, "could not remove old webhook deliveries");
                }
            }
            let mut wait = Duration::from_millis(PRUNE_EVERY_MS as u64);
            let heads = match self.store.delivery_heads() {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "could not read webhook deliveries");
                    wait = Duration::from_secs(5);
                    Vec::new()
                }
            };
            let mut again = false;
            for head in heads {
                let url = head.delivery.url.clone();
                if in_flight.contains(&url) {
                    continue;
                }
                if head.next_ms > now {
                    wait = wait.min(Duration::from_millis((head.next_ms - now) as u64));
                    continue;
                }
                let Some(secret) = secrets.get(url.as_str()) else {
                    let why = "its webhook is no longer configured";
                    if let Err(e) = self.store.update_delivery(head.seq, &given_up(&head, why)) {
                        tracing::error!(error = %e, "could not give a webhook delivery up");
                    }
                    again = true;
                    continue;
                };
                in_flight.insert(url);
                let (http, secret, done) = (http.clone(), secret.to_string(), done_tx.clone());
                // A thread of its own, not the blocking pool: shutdown never
                // waits for an endpoint that does not answer.
                std::thread::spawn(move || {
                    let outcome = post(&http, &head.delivery, &secret);
                    let _ = done.send((head, outcome));
                });
            }
            if again {
                continue;
            }
            tokio::select! {
                _ = stopped.changed() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                Some((head, outcome)) = done_rx.recv() => {
                    in_flight.remove(&head.delivery.url);
                    self.finish(&head, &outcome);
                }
            }
        }
    }

    fn finish(&self, head: &Head, outcome: &Outcome) {
        let d = &head.delivery;
        let update = after_attempt(head, outcome, now_ms(), &self.retry);
        match self
            .store
            .update_delivery(head.seq, &update)
            .map(|()| update.state)
        {
            Ok(DeliveryState::Delivered) => {
                tracing::debug!(delivery = %d.id, url = %d.url, event = %d.event, "webhook delivered")
            }
            Ok(state) => tracing::warn!(
                delivery = %d.id, url = %d.url, event = %d.event, attempts = head.attempts + 1,
                error = outcome.error.as_deref().unwrap_or(""),
                "webhook not acknowledged; {}",
                if state == DeliveryState::Failed { "given up" } else { "will retry" }
            ),
            Err(e) => tracing::error!(error = %e, "could not record a webhook attempt"),
        }
    }
}

/// One attempt: POSTs the body, signed, and says what came of it.
fn post(http: &ureq::Agent, d: &NewDelivery, secret: &str) -> Outcome {
    let sent = http
        .post(&d.url)
        .set("Content-Type", "application/json")
        .set("X-Sandcast-Event", &d.event)
        .set("X-Sandcast-Delivery", &d.id)
        .set(
            "X-Sandcast-Signature",
            &signature(secret.as_bytes(), d.body.as_bytes()),
        )
        .send_bytes(d.body.as_bytes());
    match sent {
        Ok(r) if (200..300).contains(&r.status()) => Outcome {
            status: Some(r.status()),
            error: None,
        },
        Ok(r) => Outcome {
            status: Some(r.status()),
            error: Some(format!("HTTP {}", r.status())),
        },
        Err(ureq::Error::Status(code, _)) => Outcome {
            status: Some(code),
            error: Some(format!("HTTP {code}")),
        },
        Err(ureq::Error::Transport(t)) => Outcome {
            status: None,
            error: Some(t.to_string()),
        },
    }
}

/// Query of `GET /api/webhooks/deliveries`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Deliveries to show, 1 to 1000; 100 when not given.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// The most deliveries one answer shows.
pub const MAX_LIMIT: usize = 1000;

/// The most recent webhook deliveries, newest event first: which endpoint,
/// which event of which session, and how its attempts went.
///
/// Secrets are never shown.
#[utoipa::path(
    get,
    path = "/api/webhooks/deliveries",
    tag = "webhooks",
    security(("api_key" = [])),
    params(DeliveriesQuery),
    responses(
        (status = 200, description = "The most recent deliveries, newest first.", body = DeliveryList),
        (status = 400, description = "A malformed query; `detail.field` names the parameter.", body = crate::error::ErrorBody),
        (status = 500, description = "The session store failed.", body = crate::error::ErrorBody),
    )
)]
pub async fn deliveries(
    State(state): State<AppState>,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::bad_request("bad query string").detail(e.body_text()))?;
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: {l:?} is not a number in 1..={MAX_LIMIT}"))
                    .detail(json!({ "field": "limit" }))
            })?,
    };
    let deliveries = state.manager.store().recent_deliveries(limit)?;
    Ok(Json(DeliveryList { deliveries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test case 2: key "Jefe".
    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_from_first_up_to_max() {
        let retry = WebhookRetry::default();
        let secs: Vec<u64> = (1..=14).map(|n| backoff(n, &retry).as_secs()).collect();
        assert_eq!(
            secs,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
        );
        assert_eq!(backoff(u32::MAX, &retry), Duration::from_secs(3600));
        let quick = WebhookRetry {
            first_ms: 50,
            max_ms: 150,
            ..WebhookRetry::default()
        };
        let ms: Vec<u128> = (1..=4).map(|n| backoff(n, &quick).as_millis()).collect();
        assert_eq!(ms, [50, 100, 150, 150]);
    }

    #[test]
    fn only_subscribable_events_are_named() {
        let state = |s: &str| json!({"state": s, "reason": null});
        assert_eq!(event_name("state", &state("ready")), Some("ready"));
        assert_eq!(event_name("state", &state("completed")), Some("completed"));
        assert_eq!(event_name("state", &state("failed")), Some("failed"));
        assert_eq!(event_name("state", &state("stopped")), Some("stopped"));
        assert_eq!(event_name("state", &state("starting")), None);
        assert_eq!(event_name("state", &state("stopping")), None);
        let child = |s: &str| json!({"name": "browser", "state": s, "restarts": 5});
        assert_eq!(
            event_name("child", &child("crash_loop")),
            Some("crash_loop")
        );
        assert_eq!(event_name("child", &child("restarting")), None);
        assert_eq!(event_name("child", &child("stopped")), None);
        assert_eq!(event_name("display", &json!({"width": 1})), None);
        assert_eq!(event_name("dropped", &state("ready")), None);
    }

    fn temp_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
        (dir, store)
    }

    fn head_of<'a>(heads: &'a [Head], url: &str) -> &'a Head {
        heads.iter().find(|h| h.delivery.url == url).unwrap()
    }

    fn session_row(id: &str) -> crate::store::Row {
        crate::store::Row {
            user_id: Some("alice".into()),
            ..crate::store::Row::for_test(id)
        }
    }

    fn hook(url: &str, events: &[&str]) -> Webhook {
        Webhook {
            url: url.into(),
            secret: "0123456789abcdef".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
        }
    }

    /// A recorded event becomes one delivery per subscribed webhook, with
    /// the session's user and provider in a body fixed at that time; it
    /// survives reopening the store.
    #[test]
    fn recorded_events_reach_subscribed_webhooks_and_outlive_the_process() {
        let (dir, store) = temp_store();
        store.insert(&session_row("s1")).unwrap();
        let config = Config {
            webhooks: vec![
                hook("http://all/", &EVENTS),
                hook("http://ends/", &["stopped", "failed"]),
            ],
            ..Config::default()
        };
        let hooks = Webhooks::new(&config, store.clone());
        hooks.record("s1", "state", &json!({"state": "starting"}), 1);
        hooks.record("s1", "state", &json!({"state": "ready", "reason": null}), 2);
        hooks.record(
            "s1",
            "state",
            &json!({"state": "completed", "reason": "done", "exit_code": 0}),
            3,
        );
        hooks.record(
            "s1",
            "state",
            &json!({"state": "stopped", "reason": "x"}),
            4,
        );
        drop(hooks);
        drop(store);
        let store = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        let shown = store.recent_deliveries(10).unwrap();
        let got: Vec<(&str, &str)> = shown
            .iter()
            .rev()
            .map(|d| (d.url.as_str(), d.event.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("http://all/", "ready"),
                ("http://all/", "completed"),
                ("http://all/", "stopped"),
                ("http://ends/", "stopped"),
            ]
        );
        let h = store.delivery_heads().unwrap();
        let body: Value = serde_json::from_str(&head_of(&h, "http://all/").delivery.body).unwrap();
        assert_eq!(
            body,
            json!({
                "id": head_of(&h, "http://all/").delivery.id,
                "event": "ready",
                "session_id": "s1",
                "user_id": "alice",
                "provider": null,
                "at_ms": 2,
                "data": {"state": "ready", "reason": null},
            })
        );
        let completed: Value = serde_json::from_str(
            &rusqlite::Connection::open(dir.path().join("db.sqlite"))
                .unwrap()
                .query_row(
                    "SELECT body FROM webhook_deliveries WHERE event = 'completed'",
                    [],
                    |r| r.get::<_, String>(0),
                )
                .unwrap(),
        )
        .unwrap();
        assert_eq!(completed["data"]["exit_code"], 0);
    }
}

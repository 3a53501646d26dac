//! Health from checks run in the background, never by a request.
//!
//! The backend's readiness runs programs (`bwrap`, `ip`, `nft`); were
//! `/health` to run them, any anonymous client could make the host spend
//! CPU at will. So one task runs every check every [`REFRESH`] and requests
//! read the last result: the anonymous `/health` only whether the server is
//! live and ready, the keyed `/api/health` each check.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use sandcast_backend::Readiness;
use serde_json::{Value, json};

use crate::manager::Manager;

/// How often the checks run.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The result of one round of checks.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The store answered, or why not.
    pub store: Result<(), String>,
    /// The backend's readiness.
    pub backend: Readiness,
    /// When the checks ran (ms since the epoch).
    pub checked_ms: i64,
}

impl Snapshot {
    /// Runs every check once.
    pub async fn take(manager: &Manager) -> Snapshot {
        let store = manager.store().ping().map_err(|e| e.to_string());
        let backend = manager.backend().readiness().await;
        Snapshot {
            store,
            backend,
            checked_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    /// Whether sessions can be served.
    pub fn ready(&self) -> bool {
        self.store.is_ok() && self.backend.ready
    }

    fn checked_at(&self) -> Value {
        chrono::DateTime::from_timestamp_millis(self.checked_ms)
            .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or(Value::Null)
    }

    fn status(&self) -> &'static str {
        if self.ready() { "ok" } else { "degraded" }
    }

    /// What anyone may know: live (it answered) and ready.
    pub fn public_json(&self) -> Value {
        json!({
            "status": self.status(),
            "live": true,
            "ready": self.ready(),
            "checked_at": self.checked_at(),
        })
    }

    /// Every check, for the operator.
    pub fn detail_json(&self, manager: &Manager) -> Value {
        json!({
            "status": self.status(),
            "live": true,
            "ready": self.ready(),
            "checked_at": self.checked_at(),
            "store": { "ok": self.store.is_ok(), "detail": self.store.as_ref().err() },
            "backend": {
                "name": manager.backend().name(),
                "ready": self.backend.ready,
                "checks": self.backend.checks,
            },
            "webrtc": manager.gateway().map(|g| json!({
                "udp": g.udp_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "tcp": g.tcp_addr().map(|a| a.to_string()),
            })),
        })
    }
}

/// The last snapshot, shared by the handlers.
pub struct Health {
    last: RwLock<Arc<Snapshot>>,
}

impl Health {
    /// Starts from a snapshot taken at start-up.
    pub fn new(first: Snapshot) -> Arc<Health> {
        Arc::new(Health {
            last: RwLock::new(Arc::new(first)),
        })
    }

    /// The last snapshot.
    pub fn last(&self) -> Arc<Snapshot> {
        self.last.read().unwrap().clone()
    }

    /// Re-runs the checks every `period` while the manager exists.
    pub async fn refresh_every(self: Arc<Self>, manager: Weak<Manager>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(m) = manager.upgrade() else { return };
            let snap = Snapshot::take(&m).await;
            drop(m);
            *self.last.write().unwrap() = Arc::new(snap);
        }
    }
}

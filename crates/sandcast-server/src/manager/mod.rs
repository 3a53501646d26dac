//! The session manager: a registry of live sessions, each one a task that
//! owns its state ([`session`]), its agent channel ([`agent_conn`]), and the
//! relay that hands the gateway's events to each session without loss
//! ([`backlog`] is the policy when a session is behind).
//!
//! Sessions start on create and stop on request, on TTL or idle timeout,
//! when their agent dies, and all of them at shutdown. The registry's lock
//! guards only the map of handles and the warm [`pool`]'s bookkeeping;
//! `max_sessions` is enforced under it, in the same step that adds a
//! session or claims a pooled one, so concurrent creates never exceed it
//! and a pooled session is claimed once.

pub mod agent_conn;
pub mod backlog;
pub mod pool;
pub mod session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sandcast_backend::Backend;
use sandcast_proto::{FileOp, StreamTarget};
use sandcast_webrtc::{Gateway, GatewayEvent};
use serde_json::json;
use tokio::net::UnixStream;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::auth;
use crate::config::Config;
use crate::metrics::{Metrics, StreamTotals};
use crate::store::{Row, Spec, State, Store};
use crate::webhooks::Webhooks;
use backlog::Backlog;
use session::Command;
pub use session::{Holder, InUse, Live, Snapshot, VideoSocket};

/// A change worth telling subscribers of `/events`.
#[derive(Debug, Clone)]
pub struct SessionEvent {
    /// Session id.
    pub id: String,
    /// `state` or `child`.
    pub kind: &'static str,
    /// JSON payload.
    pub data: serde_json::Value,
}

/// A validated request for a new session (also as one node hands it to
/// another, see [`crate::cluster`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewSession {
    /// Operator's user id.
    pub user_id: Option<String>,
    /// Provider preset used.
    pub provider: Option<String>,
    /// What to run.
    pub spec: Spec,
    /// Lifetime.
    pub ttl_seconds: u64,
}

impl NewSession {
    /// The row of a new session `id` of this request, created at `now`,
    /// opened by viewer `token`.
    pub fn row(&self, id: String, token: &str, now: i64) -> Row {
        Row {
            id,
            user_id: self.user_id.clone(),
            provider: self.provider.clone(),
            state: State::Starting,
            reason: None,
            spec: self.spec.clone(),
            token_hash: auth::hash_token(token),
            created_ms: now,
            ready_ms: None,
            expires_ms: now + (self.ttl_seconds as i64) * 1000,
            stopped_ms: None,
            exit_code: None,
            node: String::new(),
        }
    }
}

/// A new session id.
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

/// Why the manager refused.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such session.
    #[error("no session {0}")]
    NotFound(String),
    /// Too many sessions.
    #[error("{0} sessions are running, the most this server allows")]
    Full(usize),
    /// The session is not in a state for this.
    #[error("{0}")]
    Conflict(String),
    /// Internal failure.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for ManagerError {
    fn from(e: crate::store::StoreError) -> Self {
        ManagerError::Internal(e.to_string())
    }
}

/// The manager.
pub struct Manager {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    backend: Arc<dyn Backend>,
    gateway: Option<Gateway>,
    metrics: Arc<Metrics>,
    agent_binary: PathBuf,
    live: Mutex<Registry>,
    /// What every pooled session starts as.
    pool_spec: Spec,
    /// Wakes the task that fills the pool.
    pool_wake: Arc<Notify>,
    /// The server is shutting down: the pool is not filled again.
    closing: AtomicBool,
    /// Which profile is in use, by whom (a session id, or an import): one
    /// ext4 file system is never mounted twice.
    profiles: Arc<Mutex<HashMap<String, String>>>,
    events: broadcast::Sender<SessionEvent>,
    webhooks: Arc<Webhooks>,
    /// What the recordings use on disk, for `[recording] disk_mib`.
    recordings: Arc<crate::recording::Disk>,
}

/// The live sessions, pooled ones included, and the pool's bookkeeping.
struct Registry {
    sessions: HashMap<String, Arc<Live>>,
    pool: pool::Pool,
}

/// A profile in use; released when dropped.
#[derive(Debug)]
pub struct ProfileClaim {
    profiles: Arc<Mutex<HashMap<String, String>>>,
    user_id: String,
}

impl Drop for ProfileClaim {
    fn drop(&mut self) {
        self.profiles.lock().unwrap().remove(&self.user_id);
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Manager {
    /// A manager over a store and a backend.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        backend: Arc<dyn Backend>,
        gateway: Option<Gateway>,
        metrics: Arc<Metrics>,
        agent_binary: PathBuf,
    ) -> Arc<Manager> {
        let (events, _) = broadcast::channel(1024);
        let webhooks = Arc::new(Webhooks::new(&config, store.clone()));
        let pool_size = config.session.pool_size;
        let m = Arc::new(Manager {
            pool_spec: pool::spec(&config),
            pool_wake: Arc::new(Notify::new()),
            closing: AtomicBool::new(false),
            config,
            store,
            backend,
            gateway,
            metrics,
            agent_binary,
            live: Mutex::new(Registry {
                sessions: HashMap::new(),
                pool: pool::Pool::new(pool_size),
            }),
            profiles: Arc::new(Mutex::new(HashMap::new())),
            events,
            webhooks,
            recordings: Arc::default(),
        });
        if let Some(events) = m.gateway.as_ref().and_then(Gateway::events) {
            tokio::spawn(relay(Arc::downgrade(&m), events));
        }
        if pool_size > 0 {
            tokio::spawn(fill_pool(Arc::downgrade(&m), m.pool_wake.clone()));
        }
        m
    }

    /// Who has `user_id`'s profile now (a session id), if anyone.
    pub fn profile_session(&self, user_id: &str) -> Option<String> {
        self.profiles.lock().unwrap().get(user_id).cloned()
    }

    /// Takes `user_id`'s profile for `holder`; `Err` names who has it.
    pub fn claim_profile(&self, user_id: &str, holder: &str) -> Result<ProfileClaim, String> {
        let mut p = self.profiles.lock().unwrap();
        if let Some(other) = p.get(user_id) {
            return Err(other.clone());
        }
        p.insert(user_id.to_string(), holder.to_string());
        Ok(ProfileClaim {
            profiles: self.profiles.clone(),
            user_id: user_id.to_string(),
        })
    }

    /// Gives a live session a new viewer token (the old one stops
    /// opening it) and returns it: the answer to a second create for a
    /// user whose profile that session has.
    pub fn new_viewer_token(&self, id: &str) -> Result<(Row, String), ManagerError> {
        let token = auth::new_secret();
        self.store.set_token_hash(id, &auth::hash_token(&token))?;
        let row = self
            .store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        Ok((row, token))
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The gateway, when WebRTC is on.
    pub fn gateway(&self) -> Option<&Gateway> {
        self.gateway.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A live session.
    pub fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.live.lock().unwrap().sessions.get(id).cloned()
    }

    /// Every live session's id, last published state and what its
    /// WebSocket stream viewers were sent (pooled sessions are nobody's
    /// yet, and not among them).
    pub fn live_snapshots(&self) -> Vec<(String, Snapshot, StreamTotals)> {
        let live: Vec<(String, Arc<Live>)> = {
            let reg = self.live.lock().unwrap();
            reg.sessions
                .iter()
                .filter(|(id, _)| !reg.pool.holds(id))
                .map(|(id, l)| (id.clone(), l.clone()))
                .collect()
        };
        live.into_iter()
            .map(|(id, l)| (id, l.snapshot(), l.stream().totals()))
            .collect()
    }

    /// Pooled sessions: ready to be claimed, and all of them.
    pub fn pool_counts(&self) -> (usize, usize) {
        let reg = self.live.lock().unwrap();
        (reg.pool.ready(), reg.pool.count())
    }

    /// What the recordings use on disk.
    pub fn recordings(&self) -> &Arc<crate::recording::Disk> {
        &self.recordings
    }

    /// The webhooks session events are delivered to.
    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.webhooks
    }

    /// Subscribes to every session's events.
    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    /// After a restart: sessions of the previous run are marked stopped and
    /// everything they left on the host is removed.
    pub async fn reconcile(&self) -> Result<Vec<String>, ManagerError> {
        let ids = self
            .store
            .reconcile("the server restarted while the session ran", now_ms())?;
        for id in &ids {
            let data =
                json!({"state": "stopped", "reason": "the server restarted while the session ran"});
            let at = now_ms();
            let _ = self.store.add_event(id, "state", &data, at);
            self.webhooks.record(id, "state", &data, at);
        }
        self.backend
            .reap(&[])
            .await
            .map_err(|e| ManagerError::Internal(format!("cleaning up after the last run: {e}")))?;
        let sessions = self.config.data_dir.join("sessions");
        if let Ok(entries) = std::fs::read_dir(&sessions) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(ids)
    }

    /// Creates a session and starts it in the background, or claims a
    /// pooled session it fits. Returns its row and viewer token.
    pub fn create(self: &Arc<Self>, req: NewSession) -> Result<(Row, String), ManagerError> {
        let token = auth::new_secret();
        let now = now_ms();
        let row = |id: String, req: &NewSession| req.row(id, &token, now);
        let ttl = Duration::from_secs(req.ttl_seconds);
        if pool::fits(&self.pool_spec, &req.spec) {
            let claimed = {
                let mut reg = self.live.lock().unwrap();
                reg.pool
                    .take()
                    .and_then(|id| Some((reg.sessions.get(&id)?.clone(), id)))
            };
            if let Some((live, id)) = claimed {
                self.pool_wake.notify_one();
                let row = row(id.clone(), &req);
                if let Err(e) = self.store.insert(&row) {
                    tokio::spawn(async move { live.stop("its claim failed").await });
                    return Err(e.into());
                }
                let claim = Command::Claim(Box::new(session::Claim {
                    spec: req.spec,
                    ttl,
                }));
                self.metrics.starts.inc();
                self.event(&id, "state", json!({"state": "starting"}));
                if live.commands().try_send(claim).is_err() {
                    // Its task ended as it was claimed (it failed
                    // meanwhile), or could not take the claim: it is
                    // nobody's now, and stops if it still runs.
                    tokio::spawn(async move { live.stop("its claim failed").await });
                    let reason = "the pooled session ended as it was claimed";
                    if self
                        .store
                        .set_state(&id, State::Failed, Some(reason), now_ms())?
                    {
                        self.event(&id, "state", json!({"state": "failed", "reason": reason}));
                    }
                }
                return Ok((row, token));
            }
        }
        let row = self.start(row(new_id(), &req), ttl, true)?;
        Ok((row, token))
    }

    /// Starts a session whose row another node placed on this one (see
    /// [`crate::cluster`]); its row is already in the store.
    pub fn start_placed(self: &Arc<Self>, row: Row) -> Result<(), ManagerError> {
        let left = (row.expires_ms - now_ms()).max(1000) as u64;
        self.start(row, Duration::from_millis(left), false)
            .map(drop)
    }

    /// Starts a session of `row`'s spec in the background, inserting its
    /// row first when `insert`.
    fn start(self: &Arc<Self>, row: Row, ttl: Duration, insert: bool) -> Result<Row, ManagerError> {
        let id = row.id.clone();
        let profile = row.spec.profile.clone();
        let (live, mut actor) =
            session::new(self.clone(), id.clone(), row.spec.clone(), ttl, false);
        let evicted = {
            // The count and the reservation are one step under one lock,
            // and so is the profile's.
            let mut reg = self.live.lock().unwrap();
            if reg.sessions.len() >= self.config.max_sessions && reg.pool.count() == 0 {
                return Err(ManagerError::Full(reg.sessions.len()));
            }
            if let Some(user) = &profile {
                let claim = self.claim_profile(user, &id).map_err(|other| {
                    ManagerError::Conflict(format!(
                        "session {other} has the profile of {user:?} now; one session at a time has a profile"
                    ))
                })?;
                actor.hold_profile(claim);
            }
            // Past every refusal: a pooled session gives way to a request
            // it does not fit only when that request will run.
            let mut evicted = None;
            if reg.sessions.len() >= self.config.max_sessions {
                let victim = reg.pool.evict().expect("checked above: the pool has one");
                evicted = reg.sessions.remove(&victim);
            }
            reg.sessions.insert(id.clone(), live);
            evicted
        };
        if let Some(pooled) = evicted {
            tokio::spawn(async move { pooled.stop("it gave way to a new session").await });
        }
        if insert && let Err(e) = self.store.insert(&row) {
            self.live.lock().unwrap().sessions.remove(&id);
            return Err(e.into());
        }
        self.metrics.starts.inc();
        self.event(&id, "state", json!({"state": "starting"}));
        tokio::spawn(actor.run());
        Ok(row)
    }

    /// Starts a pooled session when the pool wants one; whether it did.
    fn start_pooled(self: &Arc<Self>) -> bool {
        let id = new_id();
        let (live, actor) = session::new(
            self.clone(),
            id.clone(),
            self.pool_spec.clone(),
            pool::LIFETIME,
            true,
        );
        {
            let mut reg = self.live.lock().unwrap();
            let wanted =
                reg.pool
                    .next(reg.sessions.len(), self.config.max_sessions, Instant::now())
                    == pool::Next::Start;
            if !wanted || self.closing.load(Ordering::Acquire) {
                return false;
            }
            reg.pool.started(id.clone());
            reg.sessions.insert(id, live);
        }
        tokio::spawn(actor.run());
        true
    }

    /// A pooled session is ready to be claimed.
    fn pool_ready(&self, id: &str) {
        self.live.lock().unwrap().pool.mark_ready(id);
        self.pool_wake.notify_one();
    }

    /// Whether `id` is a pooled session, not yet claimed.
    fn pooled(&self, id: &str) -> bool {
        self.live.lock().unwrap().pool.holds(id)
    }

    /// A session's task has ended: it is gone from the registry (and the
    /// pool), and there is room again.
    fn ended(&self, id: &str) {
        {
            let mut reg = self.live.lock().unwrap();
            reg.sessions.remove(id);
            reg.pool.gone(id, Instant::now());
        }
        self.pool_wake.notify_one();
    }

    /// Records a session event and tells the webhooks and subscribers.
    pub(crate) fn event(&self, id: &str, kind: &'static str, data: serde_json::Value) {
        let at = now_ms();
        let _ = self.store.add_event(id, kind, &data, at);
        // Written before anyone hears of the event, so none is lost.
        self.webhooks.record(id, kind, &data, at);
        let _ = self.events.send(SessionEvent {
            id: id.to_string(),
            kind,
            data,
        });
    }

    /// Stops a session: asks the agent, stops the instance, removes it.
    pub async fn stop(&self, id: &str, reason: &str) -> Result<Row, ManagerError> {
        self.store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        if let Some(live) = self.live(id) {
            live.stop(reason).await;
        }
        // A session that ended otherwise meanwhile (failed) is stopped too.
        let row = self
            .store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        // A completed session stays completed (its result is for someone:
        // deleting it says it is read, and it goes).
        if row.state == State::Completed {
            crate::results::remove(&crate::results::dir(&self.config.data_dir), id);
        } else if row.state != State::Stopped
            && self
                .store
                .set_state(id, State::Stopped, Some(reason), now_ms())?
        {
            self.event(id, "state", json!({"state": "stopped", "reason": reason}));
        }
        self.store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    /// How many sessions run here, pooled ones included.
    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap().sessions.len()
    }

    /// Stops every live session (server shutdown).
    pub async fn stop_all(&self, reason: &str) {
        self.closing.store(true, Ordering::Release);
        self.stop_all_sessions(reason).await;
    }

    /// Stops every live session, pooled ones too, and goes on serving.
    pub async fn stop_all_sessions(&self, reason: &str) {
        let (ids, pooled): (Vec<String>, Vec<Arc<Live>>) = {
            let reg = self.live.lock().unwrap();
            let ids = reg.sessions.keys().filter(|id| !reg.pool.holds(id));
            let pooled = reg.sessions.iter().filter(|(id, _)| reg.pool.holds(id));
            (
                ids.cloned().collect(),
                pooled.map(|(_, l)| l.clone()).collect(),
            )
        };
        // Pooled sessions have no record to update: their tasks are told.
        let pooled = pooled.iter().map(|l| l.stop(reason));
        let stops = ids.iter().map(|id| async move {
            let _ = self.stop(id, reason).await;
        });
        futures::future::join(
            futures::future::join_all(stops),
            futures::future::join_all(pooled),
        )
        .await;
    }

    /// Opens a byte stream to the session's VNC server through its agent.
    pub async fn open_vnc(&self, id: &str) -> Result<UnixStream, ManagerError> {
        self.open_stream(
            id,
            StreamTarget::Vnc,
            "the session's VNC server did not answer",
        )
        .await
    }

    /// Opens a byte stream to the session browser's DevTools server (HTTP
    /// and WebSocket) through its agent.
    pub async fn open_devtools(&self, id: &str) -> Result<UnixStream, ManagerError> {
        self.open_stream(
            id,
            StreamTarget::Devtools,
            "the session's browser did not answer on its DevTools port",
        )
        .await
    }

    /// Opens a stream for a file operation in the session's home (see
    /// `sandcast_proto::files`); the agent's reply line comes first on it.
    pub async fn open_file(&self, id: &str, op: FileOp) -> Result<UnixStream, ManagerError> {
        self.open_stream(
            id,
            StreamTarget::File(op),
            "the session's agent did not answer",
        )
        .await
    }

    async fn open_stream(
        &self,
        id: &str,
        target: StreamTarget,
        silent: &str,
    ) -> Result<UnixStream, ManagerError> {
        let live = self
            .live(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let rx = live.open_stream(target).await?;
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(s)) => Ok(s),
            // Dropping the receiver withdraws the request.
            _ => Err(ManagerError::Conflict(silent.into())),
        }
    }

    /// The state a session's task last published.
    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.live(id).map(|l| l.snapshot())
    }
}

/// Hands the gateway's events to each session's task, without loss and
/// without waiting: a session whose queue is full gets its events in a
/// [`Backlog`] (releases and viewer changes kept, moves coalesced), sent as
/// one command as soon as its queue has room, while every other session's
/// events go on. This task never waits on a session, so it keeps up with the
/// gateway, whose queue to it holds every event (none is ever dropped).
/// Keeps the warm pool filled: woken when a pooled session is claimed,
/// becomes ready or ends, and when any session ends (there is room again).
async fn fill_pool(m: Weak<Manager>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(m) = m.upgrade() else { return };
            if m.closing.load(Ordering::Acquire) {
                return;
            }
            let next = {
                let reg = m.live.lock().unwrap();
                reg.pool
                    .next(reg.sessions.len(), m.config.max_sessions, Instant::now())
            };
            if next == pool::Next::Start {
                m.start_pooled();
                continue;
            }
            next
        };
        // No strong reference while waiting: the manager may go.
        match next {
            pool::Next::At(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t.into()) => {}
                    () = wake.notified() => {}
                }
            }
            _ => wake.notified().await,
        }
    }
}

async fn relay(m: Weak<Manager>, mut rx: mpsc::UnboundedReceiver<GatewayEvent>) {
    let mut backlogs: HashMap<String, Backlog> = HashMap::new();
    let mut room = FuturesUnordered::new();
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let Some(m) = m.upgrade() else { return };
                let session = ev.session().to_string();
                if let Some(b) = backlogs.get_mut(&session) {
                    b.push_event(ev);
                    continue;
                }
                let Some(live) = m.live(&session) else { continue };
                match live.commands().try_send(Command::Gateway(ev)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Command::Gateway(ev))) => {
                        let mut b = Backlog::default();
                        b.push_event(ev);
                        backlogs.insert(session.clone(), b);
                        let tx = live.commands().clone();
                        room.push(async move { (session, tx.reserve_owned().await) });
                    }
                    Err(_) => {}
                }
            }
            Some((session, permit)) = room.next() => {
                let b = backlogs.remove(&session);
                if let (Ok(permit), Some(b)) = (permit, b) {
                    permit.send(Command::Backlog(b));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

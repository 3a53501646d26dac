//! The session manager: creates sessions, runs each one's agent channel,
//! keeps its state in the store, and stops it — on request, on TTL or idle
//! timeout, when its agent dies, and for everything at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use sandcast_backend::{
    AgentToken, Backend, Instance, LaunchSpec, Limits, NetworkPolicy, SessionId,
};
use sandcast_proto::{
    BrowserConfig, ChildReport, Frame, FrameCodec, Message, PROTOCOL_VERSION, RestartPolicy, Role,
    SessionConfig, StreamTarget,
};
use sandcast_webrtc::{Gateway, GatewayEvent, ViewerMessage};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::auth;
use crate::budget::EventGate;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session_log::{self, SessionLog};
use crate::store::{Row, Spec, State, Store};

/// How long a stopping agent gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A validated request for a new session.
#[derive(Debug, Clone)]
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

/// One session with processes, as the running server sees it.
pub struct Live {
    id: String,
    spec: Spec,
    dir: PathBuf,
    control: Mutex<Option<mpsc::Sender<Message>>>,
    children: Mutex<BTreeMap<String, ChildReport>>,
    display: Mutex<(u32, u32)>,
    instance: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
    streams: Mutex<HashMap<u64, oneshot::Sender<UnixStream>>>,
    next_stream: AtomicU64,
    log: SessionLog,
    /// Child and display reports stored beyond this budget are dropped.
    events_gate: Mutex<EventGate>,
    viewers: AtomicUsize,
    last_activity: Mutex<Instant>,
    expires: Instant,
    ended: watch::Sender<bool>,
    stopping: std::sync::atomic::AtomicBool,
    /// Given to the backend (a microVM's MMDS holds its hash) and to the
    /// agent in its configuration; never logged.
    agent_token: AgentToken,
}

impl Live {
    /// Children as last reported.
    pub fn children(&self) -> Vec<ChildReport> {
        self.children.lock().unwrap().values().cloned().collect()
    }

    /// Display size now.
    pub fn display(&self) -> (u32, u32) {
        *self.display.lock().unwrap()
    }

    /// Marks a viewer as present: a session being watched is not idle.
    pub fn touch(&self) {
        *self.last_activity.lock().unwrap() = Instant::now();
    }

    /// Log lines as they come.
    pub fn subscribe_logs(&self) -> broadcast::Receiver<String> {
        self.log.subscribe()
    }

    /// Resolves to true once the session's processes are gone.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.subscribe()
    }

    /// Counts a viewer in (true) or out (false).
    pub fn viewer(&self, present: bool) {
        if present {
            self.viewers.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = self
                .viewers
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1));
        }
        self.touch();
    }

    /// Writes a line of the session's output within its log budget.
    fn log(&self, source: &str, stream: &str, line: &str) {
        self.log.write(source, stream, line);
    }

    /// Writes a line of the server's own about the session (state changes,
    /// agent connections), which the session's output cannot crowd out.
    fn note(&self, text: &str) {
        self.log.write_server(text);
    }

    async fn send(&self, msg: Message) -> bool {
        let tx = self.control.lock().unwrap().clone();
        match tx {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        }
    }
}

/// The manager.
pub struct Manager {
    config: Arc<Config>,
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    gateway: Option<Gateway>,
    metrics: Arc<Metrics>,
    agent_binary: PathBuf,
    live: Mutex<HashMap<String, Arc<Live>>>,
    events: broadcast::Sender<SessionEvent>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Manager {
    /// A manager over a store and a backend.
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        backend: Arc<dyn Backend>,
        gateway: Option<Gateway>,
        metrics: Arc<Metrics>,
        agent_binary: PathBuf,
    ) -> Arc<Manager> {
        let (events, _) = broadcast::channel(1024);
        let m = Arc::new(Manager {
            config,
            store,
            backend,
            gateway,
            metrics,
            agent_binary,
            live: Mutex::new(HashMap::new()),
            events,
        });
        if let Some(gw) = &m.gateway {
            tokio::spawn(gateway_events(Arc::downgrade(&m), gw.events()));
        }
        tokio::spawn(maintenance(Arc::downgrade(&m)));
        m
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
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
        self.live.lock().unwrap().get(id).cloned()
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
            let _ = self.store.add_event(
                id,
                "state",
                &json!({"state": "stopped", "reason": "the server restarted while the session ran"}),
                now_ms(),
            );
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

    /// Creates a session and starts it in the background. Returns its row
    /// and viewer token.
    pub fn create(self: &Arc<Self>, req: NewSession) -> Result<(Row, String), ManagerError> {
        let live_count = self.live.lock().unwrap().len();
        if live_count >= self.config.max_sessions {
            return Err(ManagerError::Full(live_count));
        }
        let id = hex::encode(rand::random::<[u8; 12]>());
        let token = auth::new_secret();
        let now = now_ms();
        let row = Row {
            id: id.clone(),
            user_id: req.user_id,
            provider: req.provider,
            state: State::Starting,
            reason: None,
            spec: req.spec.clone(),
            token_hash: auth::hash_token(&token),
            created_ms: now,
            ready_ms: None,
            expires_ms: now + (req.ttl_seconds as i64) * 1000,
            stopped_ms: None,
        };
        self.store.insert(&row)?;
        let dir = self.config.data_dir.join("sessions").join(&id);
        let log = SessionLog::open(
            &session_log::dir(&self.config.data_dir),
            &id,
            &self.config.logs,
        );
        let events_gate = EventGate::new(
            self.config.logs.events_per_second,
            self.config.logs.events_burst,
            Instant::now(),
        );
        let (ended, _) = watch::channel(false);
        let live = Arc::new(Live {
            id: id.clone(),
            spec: req.spec.clone(),
            dir,
            control: Mutex::new(None),
            children: Mutex::new(BTreeMap::new()),
            display: Mutex::new((req.spec.width, req.spec.height)),
            instance: tokio::sync::Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            log,
            events_gate: Mutex::new(events_gate),
            viewers: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
            expires: Instant::now() + Duration::from_secs(req.ttl_seconds),
            ended,
            stopping: std::sync::atomic::AtomicBool::new(false),
            agent_token: AgentToken::new(crate::auth::new_secret()),
        });
        self.live.lock().unwrap().insert(id.clone(), live.clone());
        self.metrics.starts.inc();
        self.event(&id, "state", json!({"state": "starting"}));
        let me = self.clone();
        tokio::spawn(async move { me.run(live).await });
        Ok((row, token))
    }

    fn event(&self, id: &str, kind: &'static str, data: serde_json::Value) {
        let _ = self.store.add_event(id, kind, &data, now_ms());
        let _ = self.events.send(SessionEvent {
            id: id.to_string(),
            kind,
            data,
        });
    }

    /// Stores and announces a report of the agent within the session's
    /// event budget; beyond it the report is dropped and counted, and the
    /// count stored before the next one that passes.
    fn agent_event(&self, live: &Live, kind: &'static str, data: serde_json::Value) {
        let admitted = live.events_gate.lock().unwrap().admit(Instant::now());
        match admitted {
            None => {}
            Some(0) => self.event(&live.id, kind, data),
            Some(dropped) => {
                self.event(
                    &live.id,
                    "dropped",
                    json!({
                        "events": dropped,
                        "reason": format!(
                            "the agent reported more than {} events a second (burst {})",
                            self.config.logs.events_per_second, self.config.logs.events_burst
                        ),
                    }),
                );
                self.event(&live.id, kind, data);
            }
        }
    }

    fn set_state(&self, live: &Live, state: State, reason: Option<&str>) -> bool {
        match self.store.set_state(&live.id, state, reason, now_ms()) {
            Ok(true) => {
                live.note(&format!(
                    "session {}{}",
                    state.as_str(),
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                ));
                self.event(
                    &live.id,
                    "state",
                    json!({"state": state.as_str(), "reason": reason}),
                );
                if let Some(gw) = &self.gateway {
                    gw.send_to_viewers(
                        &live.id,
                        ViewerMessage::SessionState {
                            state: state.as_str().into(),
                            reason: reason.map(String::from),
                        },
                    );
                }
                true
            }
            _ => false,
        }
    }

    async fn run(self: Arc<Self>, live: Arc<Live>) {
        match self.start(&live).await {
            Ok(mut exited) => {
                let timeout = Duration::from_secs(self.config.session.start_timeout_seconds);
                // Watch the instance: an exit nobody asked for fails the session.
                let me = self.clone();
                let l2 = live.clone();
                tokio::spawn(async move {
                    let exit = loop {
                        if let Some(e) = exited.borrow_and_update().clone() {
                            break e;
                        }
                        if exited.changed().await.is_err() {
                            return;
                        }
                    };
                    if !exit.requested && !l2.stopping.load(Ordering::SeqCst) {
                        let reason = format!("the session's agent ended: {}", exit.reason);
                        me.fail(&l2, &reason).await;
                    }
                });
                // Start timeout.
                let me = self.clone();
                let l3 = live.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    if let Ok(Some(row)) = me.store.get(&l3.id)
                        && row.state == State::Starting
                    {
                        let reason = format!("not ready within {} s", timeout.as_secs());
                        me.fail(&l3, &reason).await;
                    }
                });
            }
            Err(reason) => self.fail(&live, &reason).await,
        }
    }

    /// Binds the agent socket, starts the backend instance.
    async fn start(
        self: &Arc<Self>,
        live: &Arc<Live>,
    ) -> Result<watch::Receiver<Option<sandcast_backend::InstanceExit>>, String> {
        use std::os::unix::fs::DirBuilderExt;
        // Searchable (the sandboxed user reaches its socket by path), not listable.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&live.dir)
            .map_err(|e| format!("creating {}: {e}", live.dir.display()))?;
        let id = SessionId::new(live.id.clone()).map_err(|e| e.to_string())?;
        let sock = self.backend.agent_socket(&id, &live.dir);
        if let Some(parent) = sock.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| format!("listening on {}: {e}", sock.display()))?;
        tokio::spawn(accept_loop(self.clone(), live.clone(), listener));
        let spec = LaunchSpec {
            id,
            session_dir: live.dir.clone(),
            agent_socket: sock,
            agent_binary: self.agent_binary.clone(),
            limits: Limits {
                memory_mib: self.config.session.memory_mib,
                cpu_millis: self.config.session.cpu_millis,
                pids: self.config.session.pids,
            },
            network: NetworkPolicy {
                egress: live.spec.egress.clone(),
            },
            agent_token: Some(live.agent_token.clone()),
        };
        let instance = self.backend.start(&spec).await.map_err(|e| {
            format!(
                "the {} backend could not start the session: {e}",
                self.backend.name()
            )
        })?;
        let exited = instance.exited();
        *live.instance.lock().await = Some(instance);
        Ok(exited)
    }

    async fn fail(&self, live: &Arc<Live>, reason: &str) {
        if self.set_state(live, State::Failed, Some(reason)) {
            self.metrics.failures.inc();
            tracing::warn!(session = %live.id, %reason, "session failed");
        }
        // The processes are of no use any more; the record keeps the reason.
        self.teardown(live, false).await;
    }

    /// Stops a session: asks the agent, stops the instance, removes it.
    pub async fn stop(&self, id: &str, reason: &str) -> Result<Row, ManagerError> {
        let row = self
            .store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let live = self.live(id);
        match live {
            Some(live) => {
                self.set_state(&live, State::Stopping, Some(reason));
                self.teardown(&live, true).await;
            }
            None => {
                if row.state != State::Stopped {
                    self.store
                        .set_state(id, State::Stopped, Some(reason), now_ms())?;
                    self.event(id, "state", json!({"state": "stopped", "reason": reason}));
                }
            }
        }
        self.store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    async fn teardown(&self, live: &Arc<Live>, stopped: bool) {
        if live.stopping.swap(true, Ordering::SeqCst) {
            // Someone else is tearing down; wait for them.
            let mut ended = live.ended();
            let _ = ended.wait_for(|e| *e).await;
        } else {
            live.send(Message::Shutdown).await;
            if let Some(gw) = &self.gateway {
                gw.close_session(&live.id);
            }
            let instance = live.instance.lock().await.take();
            if let Some(instance) = instance
                && let Err(e) = instance.stop(STOP_GRACE).await
            {
                live.note(&format!("stopping the instance: {e}"));
                tracing::error!(session = %live.id, error = %e, "stopping instance");
            }
            *live.control.lock().unwrap() = None;
            let _ = std::fs::remove_dir_all(&live.dir);
            self.live.lock().unwrap().remove(&live.id);
            live.ended.send_replace(true);
        }
        if stopped {
            self.set_state(live, State::Stopped, None);
        }
        live.log.close();
    }

    /// Stops every live session (server shutdown).
    pub async fn stop_all(&self, reason: &str) {
        let ids: Vec<String> = self.live.lock().unwrap().keys().cloned().collect();
        let stops = ids.iter().map(|id| self.stop(id, reason));
        futures::future::join_all(stops).await;
    }

    /// Opens a byte stream to the session's VNC server through its agent.
    pub async fn open_vnc(&self, id: &str) -> Result<UnixStream, ManagerError> {
        let live = self
            .live(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        let n = live.next_stream.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        live.streams.lock().unwrap().insert(n, tx);
        if !live
            .send(Message::OpenStream {
                id: n,
                target: StreamTarget::Vnc,
            })
            .await
        {
            live.streams.lock().unwrap().remove(&n);
            return Err(ManagerError::Conflict(
                "the session's agent is not connected".into(),
            ));
        }
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(s)) => Ok(s),
            _ => {
                live.streams.lock().unwrap().remove(&n);
                Err(ManagerError::Conflict(
                    "the session's VNC server did not answer".into(),
                ))
            }
        }
    }

    /// Sends a message to a session's agent (from the gateway).
    pub async fn to_agent(&self, id: &str, msg: Message) {
        if let Some(live) = self.live(id) {
            live.send(msg).await;
        }
    }

    fn session_config(&self, live: &Live) -> SessionConfig {
        SessionConfig {
            session_id: live.id.clone(),
            width: live.spec.width,
            height: live.spec.height,
            start_url: live.spec.start_url.clone(),
            kiosk: live.spec.kiosk,
            launch: live.spec.launch.clone(),
            browser: BrowserConfig {
                binary: self.config.browser.binary.clone(),
                extra_args: self.config.browser.session_args(),
            },
            restart: RestartPolicy::default(),
            max_fps: self.config.webrtc.max_fps,
            h264_tuning: self.config.webrtc.h264_tuning,
            server_time_ms: now_ms() as u64,
            agent_token: Some(live.agent_token.clone()),
        }
    }

    async fn on_agent_message(self: &Arc<Self>, live: &Arc<Live>, msg: Message) {
        match msg {
            Message::Ready => {
                if self.set_state(live, State::Ready, None)
                    && let Ok(Some(row)) = self.store.get(&live.id)
                    && let Some(ready) = row.ready_ms
                {
                    let secs = (ready - row.created_ms) as f64 / 1000.0;
                    self.metrics.start_seconds.observe(secs);
                }
            }
            Message::Fatal { reason } => self.fail(live, &reason).await,
            Message::Child(report) => {
                if report.state == sandcast_proto::ChildState::Restarting
                    || report.state == sandcast_proto::ChildState::CrashLoop
                {
                    self.metrics.restarts.inc();
                    live.log(
                        &report.name,
                        "agent",
                        &format!(
                            "{} {}: {}; last output: {}",
                            report.name,
                            serde_json::to_value(report.state).unwrap_or_default(),
                            report.last_exit.map(|e| e.to_string()).unwrap_or_default(),
                            report.tail.join(" | ")
                        ),
                    );
                }
                let data = serde_json::to_value(&report).unwrap_or_default();
                live.children
                    .lock()
                    .unwrap()
                    .insert(report.name.clone(), report);
                self.agent_event(live, "child", data);
            }
            Message::Log(line) => {
                let stream = match line.stream {
                    sandcast_proto::LogStream::Stdout => "stdout",
                    sandcast_proto::LogStream::Stderr => "stderr",
                    sandcast_proto::LogStream::Agent => "agent",
                };
                live.log(&line.source, stream, &line.line);
            }
            Message::Clipboard { text } => {
                if let Some(gw) = &self.gateway {
                    gw.send_to_viewers(&live.id, ViewerMessage::Clipboard { text });
                }
            }
            Message::DisplaySize { width, height } => {
                *live.display.lock().unwrap() = (width, height);
                if let Some(gw) = &self.gateway {
                    gw.send_to_viewers(&live.id, ViewerMessage::DisplaySize { width, height });
                }
                self.agent_event(live, "display", json!({"width": width, "height": height}));
            }
            Message::Ping { seq } => {
                live.send(Message::Pong { seq }).await;
            }
            _ => {}
        }
    }
}

/// Accepts the agent's connections for one session and routes each by role.
async fn accept_loop(m: Arc<Manager>, live: Arc<Live>, listener: UnixListener) {
    let mut ended = live.ended();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => return },
            _ = ended.wait_for(|e| *e) => return,
        };
        let m = m.clone();
        let live = live.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_conn(m, live.clone(), conn).await {
                live.note(&format!("agent connection: {e}"));
            }
        });
    }
}

async fn handle_conn(m: Arc<Manager>, live: Arc<Live>, mut conn: UnixStream) -> Result<(), String> {
    let mut read = FramedRead::new(&mut conn, FrameCodec);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read.next()).await {
        Ok(Some(Ok(Frame::Message(Message::Hello(h))))) => h,
        Ok(Some(Ok(_))) => return Err("the first message was not a hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad hello: {e}")),
        Ok(None) => return Ok(()),
        Err(_) => return Err("no hello within 10 s".into()),
    };
    if !read.read_buffer().is_empty() {
        return Err("data before the welcome".into());
    }
    drop(read);
    if hello.protocol != PROTOCOL_VERSION {
        return reject(
            &mut conn,
            format!("protocol {} is not {PROTOCOL_VERSION}", hello.protocol),
        )
        .await;
    }
    match hello.role {
        Role::Control => {
            if live.control.lock().unwrap().is_some() {
                return reject(
                    &mut conn,
                    "the session already has a control connection".into(),
                )
                .await;
            }
            conn_write(
                &mut conn,
                &Message::Welcome {
                    protocol: PROTOCOL_VERSION,
                },
            )
            .await?;
            let config = m.session_config(&live);
            conn_write(&mut conn, &Message::Config(config)).await?;
            live.note(&format!("agent {} connected", hello.agent_version));
            let (r, w) = conn.into_split();
            let (tx, mut rx) = mpsc::channel::<Message>(256);
            *live.control.lock().unwrap() = Some(tx);
            tokio::spawn(async move {
                let mut sink = FramedWrite::new(w, FrameCodec);
                while let Some(msg) = rx.recv().await {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut frames = FramedRead::new(r, FrameCodec);
            while let Some(frame) = frames.next().await {
                match frame {
                    Ok(Frame::Message(msg)) => m.on_agent_message(&live, msg).await,
                    Ok(Frame::Video(_)) => {}
                    Err(e) => return Err(format!("control connection: {e}")),
                }
            }
            Ok(())
        }
        Role::Video => {
            conn_write(
                &mut conn,
                &Message::Welcome {
                    protocol: PROTOCOL_VERSION,
                },
            )
            .await?;
            let mut frames = FramedRead::new(conn, FrameCodec);
            while let Some(frame) = frames.next().await {
                match frame {
                    Ok(Frame::Video(v)) => {
                        if let Some(gw) = &m.gateway {
                            gw.push_frame(&live.id, v);
                        }
                    }
                    Ok(Frame::Message(_)) => {}
                    Err(e) => return Err(format!("video connection: {e}")),
                }
            }
            Ok(())
        }
        Role::Stream { id } => {
            let waiter = live.streams.lock().unwrap().remove(&id);
            let Some(waiter) = waiter else {
                return reject(&mut conn, format!("no stream {id} was asked for")).await;
            };
            conn_write(
                &mut conn,
                &Message::Welcome {
                    protocol: PROTOCOL_VERSION,
                },
            )
            .await?;
            let _ = waiter.send(conn);
            Ok(())
        }
    }
}

async fn reject(conn: &mut UnixStream, reason: String) -> Result<(), String> {
    let _ = conn_write(
        conn,
        &Message::Reject {
            reason: reason.clone(),
        },
    )
    .await;
    Err(reason)
}

async fn conn_write(conn: &mut UnixStream, msg: &Message) -> Result<(), String> {
    conn.write_all(&sandcast_proto::encode_message(msg))
        .await
        .map_err(|e| e.to_string())
}

/// Routes the gateway's events to the sessions' agents.
async fn gateway_events(m: std::sync::Weak<Manager>, mut rx: broadcast::Receiver<GatewayEvent>) {
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let Some(m) = m.upgrade() else { return };
        let session = match &ev {
            GatewayEvent::VideoWanted { session, .. }
            | GatewayEvent::VideoUnwanted { session }
            | GatewayEvent::KeyFrameWanted { session }
            | GatewayEvent::Bitrate { session, .. }
            | GatewayEvent::Input { session, .. }
            | GatewayEvent::Clipboard { session, .. }
            | GatewayEvent::Resize { session, .. }
            | GatewayEvent::ViewerState { session, .. } => session.clone(),
        };
        if let GatewayEvent::ViewerState { state, .. } = &ev
            && let Some(live) = m.live(&session)
        {
            match state {
                sandcast_webrtc::ViewerState::Connected => live.viewer(true),
                sandcast_webrtc::ViewerState::Closed => live.viewer(false),
                _ => live.touch(),
            }
        }
        if matches!(ev, GatewayEvent::Input { .. })
            && let Some(live) = m.live(&session)
        {
            live.touch();
        }
        if let Some(msg) = ev.to_agent_message() {
            m.to_agent(&session, msg).await;
        }
    }
}

/// Stops sessions past their TTL or idle for too long.
async fn maintenance(m: std::sync::Weak<Manager>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(m) = m.upgrade() else { return };
        let lives: Vec<Arc<Live>> = m.live.lock().unwrap().values().cloned().collect();
        for live in lives {
            if live.stopping.load(Ordering::SeqCst) {
                continue;
            }
            let now = Instant::now();
            let reason = if now >= live.expires {
                Some("its time to live ran out".to_string())
            } else if live.viewers.load(Ordering::SeqCst) == 0
                && now.duration_since(*live.last_activity.lock().unwrap())
                    >= Duration::from_secs(live.spec.idle_timeout_seconds)
            {
                Some(format!(
                    "nobody watched it for {} s",
                    live.spec.idle_timeout_seconds
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                let m = m.clone();
                let id = live.id.clone();
                tokio::spawn(async move {
                    let _ = m.stop(&id, &reason).await;
                });
            }
        }
    }
}

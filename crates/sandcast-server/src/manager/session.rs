//! One session as one task: it owns the session's state (children, display,
//! viewers, last activity, deadlines, the agent's control connection, pending
//! streams, the instance, its log and the gate on its agent's stored events)
//! and is driven by commands over bounded channels, like the gateway's hub.
//! Readers get a [`Snapshot`] through a `watch`; nothing about a session
//! sits behind a lock but its [`SessionLog`]'s writer, which is the log's own.
//!
//! [`Core`] is the sans-IO part (time passed in); [`Actor`] is its I/O edge.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sandcast_backend::{
    AgentToken, Instance, InstanceExit, LaunchSpec, Limits, NetworkPolicy, SessionId,
};
use sandcast_proto::{
    BrowserConfig, ChildReport, ExitInfo, FileOp, Message, RestartPolicy, SessionConfig,
    StreamTarget, VideoControl,
};
use sandcast_webrtc::{GatewayEvent, ViewerId, ViewerMessage, ViewerRequest};

/// The viewer id of input that came through a WebSocket rather than the
/// gateway (whose ids start at 1).
pub const SOCKET_VIEWER: ViewerId = ViewerId(0);
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};

use super::agent_conn::{self, Bounds, Channel, FromAgent};
use super::backlog::Backlog;
use super::{Manager, ManagerError, now_ms};
use crate::budget::EventGate;
use crate::session_log::{self, SessionLog};
use crate::store::{Spec, State};
use crate::tokens::Grant;

/// The encoder's bitrate while only the recording watches.
const RECORD_BITRATE_BPS: u32 = 2_500_000;

/// Starts (or keeps) the H.264 encoder for the recording.
fn record_video() -> Message {
    Message::Video(VideoControl::Start {
        codec: sandcast_proto::Codec::H264,
        bitrate_bps: RECORD_BITRATE_BPS,
    })
}

/// How long a stopping agent gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Commands queued for one session (API, viewers, the gateway relay).
pub const COMMAND_QUEUE: usize = 256;
/// Messages from the session's agent connections queued for its task.
const AGENT_QUEUE: usize = 64;
/// Refusals logged in full per session; later ones are only counted.
const REFUSALS_LOGGED: u64 = 16;

/// The backend's start of the session's instance, under way.
type Starting = BoxFuture<'static, Result<Box<dyn Instance>, String>>;

/// What the session's readers see, published by its task on every change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Children as last reported.
    pub children: Vec<ChildReport>,
    /// Display size now.
    pub display: (u32, u32),
    /// Viewers connected now (WebRTC, the WebSocket video stream and VNC).
    pub viewers: usize,
    /// Automation clients connected now (CDP WebSockets).
    pub automation: usize,
    /// Who may give input: everyone, or the person alone.
    pub control: Holder,
    /// The agent's own counters, as it last reported them (its word: for
    /// the operator's metrics, never for a decision).
    pub agent: sandcast_proto::AgentStats,
}

/// Who holds control of a session's input.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    /// The person in the viewer and automation clients both give input.
    #[default]
    Shared,
    /// The person has taken over: automation clients' `Input.*` commands
    /// are refused until control is given back.
    Person,
}

impl Holder {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Holder::Shared => "shared",
            Holder::Person => "person",
        }
    }
}

/// What a request that claims a pooled session wants of it.
pub struct Claim {
    /// The session's own specification (it fits the pool's: see
    /// [`super::pool::fits`]).
    pub spec: Spec,
    /// Its time to live, from the claim.
    pub ttl: Duration,
}

/// A command to a session's task.
pub enum Command {
    /// A pooled session is given to a request (its record now exists).
    Claim(Box<Claim>),
    /// An event from the gateway for this session.
    Gateway(GatewayEvent),
    /// Gateway events that waited while the queue was full (see [`Backlog`]).
    Backlog(Backlog),
    /// A viewer is looking: the session is not idle.
    Touch,
    /// A viewer arrived (true) or left (false).
    Viewer(bool),
    /// A viewer of the WebSocket video stream arrived, left or fell behind.
    VideoSocket(VideoSocket),
    /// An automation client (a DevTools connection, `client`) or one of
    /// its requests (`json/*`) arrived (true) or left (false).
    Automation {
        /// Arrived or left.
        present: bool,
        /// A connection rather than a single request: counted in the
        /// snapshot and announced.
        client: bool,
    },
    /// Who holds control now; says when it changed.
    Control(Holder, oneshot::Sender<Snapshot>),
    /// Open a stream through the session's agent (to its VNC server, for
    /// a file operation).
    OpenStream(
        StreamTarget,
        oneshot::Sender<Result<oneshot::Receiver<UnixStream>, ManagerError>>,
    ),
    /// The launch command of a session with `complete_on` ended and what
    /// it was to collect is saved (or could not be): the session ends.
    Complete {
        /// How the launch command ended.
        exit: ExitInfo,
        /// Why collecting failed, if it did.
        problem: Option<String>,
    },
    /// Stop the session.
    Stop(String),
    /// A token of the session was revoked: what was opened with it ends.
    Revoke(String),
    /// A WebRTC viewer was opened with an added token: closed when the
    /// token is revoked or expires.
    Peer {
        /// The viewer.
        viewer: ViewerId,
        /// Its token's id.
        token_id: String,
        /// When the token expires.
        expires: Option<Instant>,
    },
}

/// What a viewer of the WebSocket video stream tells its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoSocket {
    /// It connected: the encoder runs, and a key frame comes for it.
    Joined,
    /// It closed: the encoder stops when nobody else needs it.
    Left,
    /// It missed frames (it reads too slowly): it waits for a key frame.
    Lagged,
}

/// Encoded frames waiting for the slowest viewer on a WebSocket video
/// stream before it misses some and waits for a key frame (at 60 fps, a
/// quarter of a second: later than that the picture is stale anyway).
pub const VIDEO_SOCKET_QUEUE: usize = 16;

/// A handle to a running session; cheap to share. Dropping it does not stop
/// the session.
pub struct Live {
    id: String,
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
    log: Arc<SessionLog>,
    ended: watch::Receiver<bool>,
    to_sockets: broadcast::Sender<ViewerMessage>,
    /// The encoded video, for viewers of the WebSocket video stream.
    video_frames: broadcast::Sender<sandcast_proto::VideoFrame>,
    /// A slot per viewer of the WebSocket video stream, as many as the
    /// gateway allows WebRTC viewers.
    video_slots: Arc<Semaphore>,
    /// Ids of the session's tokens revoked while it runs.
    revoked: watch::Receiver<HashSet<String>>,
    /// What its WebSocket video stream's viewers were sent.
    stream: Arc<crate::metrics::StreamCounters>,
}

/// The `Instant` of a time in ms since the epoch (now if it has passed).
fn instant_of_ms(ms: i64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(now_ms()).max(0) as u64)
}

/// Messages for viewers on input sockets that wait unread before the
/// oldest are dropped (a slow viewer misses a clipboard change, nothing
/// else waits for it).
const SOCKET_VIEWER_QUEUE: usize = 64;

impl Live {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Children as last reported.
    pub fn children(&self) -> Vec<ChildReport> {
        self.snapshot.borrow().children.clone()
    }

    /// Display size now.
    pub fn display(&self) -> (u32, u32) {
        self.snapshot.borrow().display
    }

    /// The state as the session's task last published it.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// Every state the session's task publishes from now on.
    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// Marks a viewer as present: a session being watched is not idle. Never
    /// waits; when the session's queue is full it is busy with its viewers
    /// anyway, and the touch is not needed.
    pub fn touch(&self) {
        let _ = self.commands.try_send(Command::Touch);
    }

    /// Counts a viewer in (true) or out (false); waits for room in the
    /// session's queue, so the count is never lost.
    pub async fn viewer(&self, present: bool) {
        let _ = self.commands.send(Command::Viewer(present)).await;
    }

    /// Counts an automation client (`client`) or request in; the session
    /// is in use (its browser never paused) until the returned guard is
    /// dropped.
    pub async fn automation(self: &Arc<Self>, client: bool) -> InUse {
        let _ = self
            .commands
            .send(Command::Automation {
                present: true,
                client,
            })
            .await;
        InUse {
            live: self.clone(),
            client,
        }
    }

    /// Gives control to `holder`; the session's state after the change, or
    /// `None` when the session has ended.
    pub async fn set_control(&self, holder: Holder) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Control(holder, tx))
            .await
            .ok()?;
        rx.await.ok()
    }

    /// What the session tells its viewers (clipboard, display size, the
    /// remote focus), for viewers on an input socket rather than WebRTC.
    pub fn viewer_messages(&self) -> broadcast::Receiver<ViewerMessage> {
        self.to_sockets.subscribe()
    }

    /// What the session's WebSocket video stream viewers were sent, counted
    /// by their sockets.
    pub fn stream(&self) -> &crate::metrics::StreamCounters {
        &self.stream
    }

    /// The session's encoded video from now on, for a viewer of the
    /// WebSocket video stream; tell the session with [`Live::video_socket`].
    pub fn video_frames(&self) -> broadcast::Receiver<sandcast_proto::VideoFrame> {
        self.video_frames.subscribe()
    }

    /// A slot for one more viewer of the WebSocket video stream, held while
    /// it is open; `Err(max)` when the session has the most it may have.
    pub fn video_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, usize> {
        self.video_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| sandcast_webrtc::HubConfig::default().max_viewers_per_session)
    }

    /// Tells the session about a viewer of the WebSocket video stream; waits
    /// for room in the session's queue, so a count is never lost.
    pub async fn video_socket(&self, what: VideoSocket) {
        let _ = self.commands.send(Command::VideoSocket(what)).await;
    }

    /// Log lines as they come.
    pub fn subscribe_logs(&self) -> broadcast::Receiver<String> {
        self.log.subscribe()
    }

    /// Resolves to true once the session's processes are gone.
    pub fn ended(&self) -> watch::Receiver<bool> {
        self.ended.clone()
    }

    /// A request from a viewer that has no WebRTC data channel (the noVNC
    /// path's input WebSocket): handled as the gateway's viewers' are, so
    /// both paths type through the same injector. Waits for room in the
    /// session's queue, as a data channel's backpressure would.
    pub async fn viewer_request(&self, req: ViewerRequest) {
        let ev = GatewayEvent::from_request(self.id.clone(), SOCKET_VIEWER, req);
        let _ = self.commands.send(Command::Gateway(ev)).await;
    }

    /// Revokes a token of the session: WebRTC viewers opened with it are
    /// closed by the session's task, sockets opened with it end (they wait
    /// on [`Live::lost`]). Waits for room in the session's queue.
    pub async fn revoke(&self, token_id: &str) {
        let _ = self
            .commands
            .send(Command::Revoke(token_id.to_string()))
            .await;
    }

    /// Tells the session's task that a WebRTC viewer was opened with
    /// `grant`, so that revoking or the expiry of its token closes it.
    /// Nothing for the session's own token or the operator key.
    pub async fn peer_opened(&self, viewer: ViewerId, grant: &Grant) {
        let Some(token_id) = &grant.token_id else {
            return;
        };
        let _ = self
            .commands
            .send(Command::Peer {
                viewer,
                token_id: token_id.clone(),
                expires: grant.expires_ms.map(instant_of_ms),
            })
            .await;
    }

    /// Resolves once `grant` stops opening the session: its token revoked
    /// or expired. Never for the session's own token or the operator key
    /// (the session's end is [`Live::ended`]). A socket opened with a grant
    /// ends when this resolves.
    pub fn lost(&self, grant: &Grant) -> impl Future<Output = ()> + Send + 'static {
        let mut revoked = self.revoked.clone();
        let token = grant.token_id.clone();
        let expires = grant.expires_ms.map(instant_of_ms);
        async move {
            let Some(token) = token else {
                return std::future::pending().await;
            };
            let gone = async move {
                if revoked.wait_for(|r| r.contains(&token)).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            match expires {
                Some(at) => tokio::select! {
                    () = gone => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                },
                None => gone.await,
            }
        }
    }

    /// The session's command queue (for the gateway relay).
    pub(super) fn commands(&self) -> &mpsc::Sender<Command> {
        &self.commands
    }

    /// Stops the session and waits until its processes are gone.
    pub(super) async fn stop(&self, reason: &str) {
        let _ = self.commands.send(Command::Stop(reason.to_string())).await;
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(|e| *e).await;
    }

    /// Asks the agent for a stream to `target`.
    pub(super) async fn open_stream(
        &self,
        target: StreamTarget,
    ) -> Result<oneshot::Receiver<UnixStream>, ManagerError> {
        let (tx, rx) = oneshot::channel();
        let gone = || ManagerError::NotFound(self.id.clone());
        self.commands
            .send(Command::OpenStream(target, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// An automation client or request in a session; counted out when dropped.
pub struct InUse {
    live: Arc<Live>,
    client: bool,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let (live, client) = (self.live.clone(), self.client);
        // The count must not be lost: wait for room in the queue, on a
        // task of its own since a drop cannot wait.
        tokio::spawn(async move {
            let _ = live
                .commands
                .send(Command::Automation {
                    present: false,
                    client,
                })
                .await;
        });
    }
}

/// Why a session's time is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Its time to live ran out: it stops.
    Expired,
    /// Nobody watched it for this many seconds: it stops.
    Idle(u64),
    /// It was not ready within this many seconds: it fails.
    NotReady(u64),
}

impl Due {
    fn reason(&self) -> String {
        match self {
            Due::Expired => "its time to live ran out".into(),
            Due::Idle(s) => format!("nobody watched it for {s} s"),
            Due::NotReady(s) => format!("not ready within {s} s"),
        }
    }
}

/// The session's state and rules, without I/O; time is passed in.
#[derive(Debug)]
pub struct Core {
    viewers: usize,
    automation: usize,
    /// Automation requests (`json/*`, a connection being set up) under way.
    requests: usize,
    control: Holder,
    last_activity: Instant,
    expires: Instant,
    idle: Duration,
    start_timeout: Duration,
    /// Until the session is ready.
    start_deadline: Option<Instant>,
    display: (u32, u32),
    /// The largest display the server has asked for: video frames are
    /// bounded by what it can need.
    max_display: (u32, u32),
    children: BTreeMap<String, ChildReport>,
    agent: sandcast_proto::AgentStats,
}

impl Core {
    /// A session created at `now`.
    pub fn new(spec: &Spec, ttl: Duration, start_timeout: Duration, now: Instant) -> Core {
        Core {
            viewers: 0,
            automation: 0,
            requests: 0,
            control: Holder::Shared,
            last_activity: now,
            expires: now + ttl,
            idle: Duration::from_secs(spec.idle_timeout_seconds),
            start_timeout,
            start_deadline: Some(now + start_timeout),
            display: (spec.width, spec.height),
            max_display: (spec.width, spec.height),
            agent: Default::default(),
            children: BTreeMap::new(),
        }
    }

    /// Something showed a person is there.
    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// A viewer arrived or left.
    pub fn viewer(&mut self, present: bool, now: Instant) {
        if present {
            self.viewers += 1;
        } else {
            self.viewers = self.viewers.saturating_sub(1);
        }
        self.touch(now);
    }

    /// An automation client (`client`) or request arrived or left: while
    /// one is there the session is in use, as with a viewer.
    pub fn automation(&mut self, present: bool, client: bool, now: Instant) {
        let n = if client {
            &mut self.automation
        } else {
            &mut self.requests
        };
        *n = if present { *n + 1 } else { n.saturating_sub(1) };
        self.touch(now);
    }

    /// Gives control to `holder`; whether that changed anything.
    pub fn control(&mut self, holder: Holder, now: Instant) -> bool {
        self.touch(now);
        std::mem::replace(&mut self.control, holder) != holder
    }

    /// Whether anyone uses the session: a viewer or an automation client.
    /// An unused session may have its browser paused and stops when idle.
    pub fn in_use(&self) -> bool {
        self.viewers > 0 || self.automation > 0 || self.requests > 0
    }

    /// A pooled session is claimed at `now`: its time to live and idle
    /// timeout are the request's, counted from now, and it must be ready
    /// (the claim applied) within the start timeout.
    pub fn claim(&mut self, spec: &Spec, ttl: Duration, now: Instant) {
        self.expires = now + ttl;
        self.idle = Duration::from_secs(spec.idle_timeout_seconds);
        self.last_activity = now;
        self.start_deadline = Some(now + self.start_timeout);
    }

    /// The agent said the session is ready.
    pub fn ready(&mut self) {
        self.start_deadline = None;
    }

    /// The server asks the agent for this display size.
    pub fn resizing(&mut self, width: u32, height: u32) {
        self.max_display = (
            self.max_display.0.max(width),
            self.max_display.1.max(height),
        );
    }

    /// What has come due at `now`, the earliest first.
    pub fn due(&self, now: Instant) -> Option<Due> {
        if let Some(d) = self.start_deadline
            && now >= d
        {
            return Some(Due::NotReady(self.start_timeout.as_secs()));
        }
        if now >= self.expires {
            return Some(Due::Expired);
        }
        if !self.in_use() && now.duration_since(self.last_activity) >= self.idle {
            return Some(Due::Idle(self.idle.as_secs()));
        }
        None
    }

    /// When [`Core::due`] may next say something.
    pub fn next_deadline(&self) -> Instant {
        let mut t = self.expires;
        if let Some(d) = self.start_deadline {
            t = t.min(d);
        }
        if !self.in_use() {
            t = t.min(self.last_activity + self.idle);
        }
        t
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            children: self.children.values().cloned().collect(),
            display: self.display,
            viewers: self.viewers,
            automation: self.automation,
            control: self.control,
            agent: self.agent.clone(),
        }
    }
}

/// A session's task and everything it owns.
pub struct Actor {
    /// Viewers on input sockets (the noVNC path).
    to_sockets: broadcast::Sender<ViewerMessage>,
    m: Arc<Manager>,
    id: String,
    spec: Spec,
    dir: PathBuf,
    agent_token: AgentToken,
    core: Core,
    commands: mpsc::Receiver<Command>,
    from_agent: mpsc::Receiver<FromAgent>,
    to_self: mpsc::Sender<FromAgent>,
    control_taken: bool,
    control: Option<mpsc::Sender<Message>>,
    /// Whether the agent was last told someone watches (`None`: not told
    /// on this control connection yet).
    told_watched: Option<bool>,
    outbox: Backlog,
    streams: HashMap<u64, oneshot::Sender<UnixStream>>,
    next_stream: u64,
    starting: Option<Starting>,
    instance: Option<Box<dyn Instance>>,
    exited: Option<watch::Receiver<Option<InstanceExit>>>,
    bounds: Bounds,
    video_cap: watch::Sender<usize>,
    snapshot: watch::Sender<Snapshot>,
    log: Arc<SessionLog>,
    /// Child and display reports stored beyond this budget are dropped.
    events_gate: EventGate,
    ended: watch::Sender<bool>,
    refusals: u64,
    finished: bool,
    /// The session's own command queue, for work it hands to a task (the
    /// collection of a completed session's files).
    to_self_commands: mpsc::WeakSender<Command>,
    /// The launch command ended and the session is completing.
    completing: bool,
    /// The user's profile this session has as its home, held until its
    /// processes are gone.
    profile_claim: Option<super::ProfileClaim>,
    /// Ids of tokens revoked while the session runs (sockets watch it).
    revoked: watch::Sender<HashSet<String>>,
    /// WebRTC viewers opened with added tokens: viewer, token id, expiry.
    token_peers: Vec<(ViewerId, String, Option<Instant>)>,
    /// The session's recording, while it records.
    recorder: Option<crate::recording::Recorder>,
    /// The encoded video, for viewers of the WebSocket video stream.
    video_frames: broadcast::Sender<sandcast_proto::VideoFrame>,
    /// Viewers of the WebSocket video stream connected now.
    video_sockets: usize,
    /// Whether the gateway's WebRTC viewers want the video now (its last
    /// word was `Start`, not `Stop`).
    gateway_video: bool,
    /// In the warm pool, not yet claimed: no record, no events.
    pooled: bool,
}

/// Makes a session's handle and its task (not yet running).
/// A `pooled` session waits in the warm pool: it has no record, says
/// nothing to anyone, and becomes a request's session with a
/// [`Command::Claim`].
pub fn new(
    m: Arc<Manager>,
    id: String,
    spec: Spec,
    ttl: Duration,
    pooled: bool,
) -> (Arc<Live>, Actor) {
    let now = Instant::now();
    let start_timeout = Duration::from_secs(m.config.session.start_timeout_seconds);
    let core = Core::new(&spec, ttl, start_timeout, now);
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (to_self, from_agent) = mpsc::channel(AGENT_QUEUE);
    let (snapshot, snapshot_rx) = watch::channel(core.snapshot());
    let log = Arc::new(SessionLog::open(
        &session_log::dir(&m.config.data_dir),
        &id,
        &m.config.logs,
    ));
    let events_gate = EventGate::new(
        m.config.logs.events_per_second,
        m.config.logs.events_burst,
        now,
    );
    let (ended, ended_rx) = watch::channel(false);
    let bounds = Bounds::new(&m.config.agent_channel);
    let (video_cap, _) = watch::channel(agent_conn::video_frame_cap(
        spec.width,
        spec.height,
        bounds.video_max,
    ));
    let (to_sockets, _) = broadcast::channel(SOCKET_VIEWER_QUEUE);
    let (video_frames, _) = broadcast::channel(VIDEO_SOCKET_QUEUE);
    let (revoked, revoked_rx) = watch::channel(HashSet::new());
    let live = Arc::new(Live {
        revoked: revoked_rx,
        id: id.clone(),
        commands: commands_tx,
        snapshot: snapshot_rx,
        log: log.clone(),
        ended: ended_rx,
        to_sockets: to_sockets.clone(),
        video_frames: video_frames.clone(),
        video_slots: Arc::new(Semaphore::new(
            sandcast_webrtc::HubConfig::default().max_viewers_per_session,
        )),
        stream: Arc::default(),
    });
    let dir = m.config.data_dir.join("sessions").join(&id);
    let actor = Actor {
        m,
        id,
        spec,
        dir,
        agent_token: AgentToken::new(crate::auth::new_secret()),
        core,
        commands,
        from_agent,
        to_self,
        control_taken: false,
        control: None,
        told_watched: None,
        outbox: Backlog::default(),
        streams: HashMap::new(),
        next_stream: 1,
        starting: None,
        instance: None,
        exited: None,
        bounds,
        video_cap,
        snapshot,
        log,
        events_gate,
        ended,
        refusals: 0,
        finished: false,
        to_sockets,
        to_self_commands: live.commands.downgrade(),
        completing: false,
        profile_claim: None,
        revoked,
        token_peers: Vec::new(),
        recorder: None,
        video_frames,
        video_sockets: 0,
        gateway_video: false,
        pooled,
    };
    (live, actor)
}

/// Waits for the instance's exit.
async fn exit_of(rx: &mut Option<watch::Receiver<Option<InstanceExit>>>) -> Option<InstanceExit> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        if let Some(e) = rx.borrow_and_update().clone() {
            return Some(e);
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

async fn started(f: &mut Option<Starting>) -> Result<Box<dyn Instance>, String> {
    match f {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    /// Keeps the claim on the session's profile until its processes are gone.
    pub(super) fn hold_profile(&mut self, claim: super::ProfileClaim) {
        self.profile_claim = Some(claim);
    }

    /// Runs the session until it has stopped or failed and its processes are
    /// gone.
    pub async fn run(mut self) {
        match self.launch() {
            Ok(f) => self.starting = Some(f),
            Err(reason) => self.fail(&reason).await,
        }
        let mut key_frames =
            tokio::time::interval(Duration::from_millis(self.m.config.recording.fragment_ms));
        key_frames.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.finished {
            let deadline = tokio::time::Instant::from_std(self.core.next_deadline());
            let token_expiry = self.token_peers.iter().filter_map(|p| p.2).min();
            let control = self.control.clone();
            let recording = self.recorder.is_some();
            tokio::select! {
                _ = key_frames.tick(), if recording => self.recording_tick(),
                r = started(&mut self.starting) => {
                    self.starting = None;
                    match r {
                        Ok(instance) => {
                            self.exited = Some(instance.exited());
                            self.instance = Some(instance);
                        }
                        Err(reason) => self.fail(&reason).await,
                    }
                }
                Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                Some(msg) = self.from_agent.recv() => self.on_agent(msg).await,
                Ok(permit) = async { control.as_ref().expect("guarded").reserve().await },
                    if control.is_some() && self.outbox.messages() > 0 =>
                {
                    if let Some(msg) = self.outbox.pop() {
                        permit.send(msg);
                    }
                }
                exit = exit_of(&mut self.exited) => {
                    self.exited = None;
                    if let Some(exit) = exit
                        && !exit.requested
                    {
                        self.fail(&format!("the session's agent ended: {}", exit.reason)).await;
                    }
                }
                () = tokio::time::sleep_until(token_expiry.unwrap_or(Instant::now()).into()),
                    if token_expiry.is_some() =>
                {
                    self.close_token_peers(|_, expires| expires.is_some_and(|e| e <= Instant::now()));
                }
                _ = tokio::time::sleep_until(deadline) => {
                    match self.core.due(Instant::now()) {
                        Some(due @ Due::NotReady(_)) => self.fail(&due.reason()).await,
                        Some(due) => self.stop(&due.reason()).await,
                        None => {}
                    }
                }
            }
        }
        // A claim that came as the session ended finds no session to have:
        // its record says so rather than staying `starting`.
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            if let Command::Claim(_) = cmd {
                self.pooled = false;
                self.set_state(
                    State::Failed,
                    Some("the pooled session ended as it was claimed"),
                );
            }
        }
        // After the final state and its log line: whoever waits for the end
        // (`Manager::stop`, log followers) finds the session's record and
        // log complete, and later lines reach followers only.
        self.log.close();
        self.ended.send_replace(true);
    }

    fn publish(&self) {
        self.snapshot.send_replace(self.core.snapshot());
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

    /// Stores and announces a report of the agent within the session's
    /// event budget; beyond it the report is dropped and counted, and the
    /// count stored before the next one that passes.
    fn agent_event(&mut self, kind: &'static str, data: serde_json::Value) {
        if self.pooled {
            return;
        }
        match self.events_gate.admit(Instant::now()) {
            None => {}
            Some(0) => self.m.event(&self.id, kind, data),
            Some(dropped) => {
                let logs = &self.m.config.logs;
                self.m.event(
                    &self.id,
                    "dropped",
                    json!({
                        "events": dropped,
                        "reason": format!(
                            "the agent reported more than {} events a second (burst {})",
                            logs.events_per_second, logs.events_burst
                        ),
                    }),
                );
                self.m.event(&self.id, kind, data);
            }
        }
    }

    fn set_state(&mut self, state: State, reason: Option<&str>) -> bool {
        self.set_state_with(state, reason, json!({}))
    }

    /// Like [`Actor::set_state`], with more in the event (`extra`'s fields).
    fn set_state_with(
        &mut self,
        state: State,
        reason: Option<&str>,
        extra: serde_json::Value,
    ) -> bool {
        if self.pooled {
            // Nobody's yet: the log has it, no record or event does.
            self.note(&format!(
                "pooled session {}{}",
                state.as_str(),
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            ));
            return false;
        }
        if !matches!(
            self.m.store.set_state(&self.id, state, reason, now_ms()),
            Ok(true)
        ) {
            return false;
        }
        self.note(&format!(
            "session {}{}",
            state.as_str(),
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        ));
        let mut data = json!({"state": state.as_str(), "reason": reason});
        if let (Some(d), serde_json::Value::Object(more)) = (data.as_object_mut(), extra) {
            d.extend(more);
        }
        self.m.event(&self.id, "state", data);
        if let Some(gw) = &self.m.gateway {
            gw.send_to_viewers(
                &self.id,
                ViewerMessage::SessionState {
                    state: state.as_str().into(),
                    reason: reason.map(String::from),
                },
            );
        }
        true
    }

    /// Binds the agent socket, starts listening, and returns the backend's
    /// start as a future the task polls beside its commands.
    fn launch(&mut self) -> Result<Starting, String> {
        use std::os::unix::fs::DirBuilderExt;
        // Searchable (the sandboxed user reaches its socket by path), not listable.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let id = SessionId::new(self.id.clone()).map_err(|e| e.to_string())?;
        let backend = self.m.backend.clone();
        let sock = backend.agent_socket(&id, &self.dir);
        if let Some(parent) = sock.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| format!("listening on {}: {e}", sock.display()))?;
        if self.spec.record {
            self.start_recording();
        }
        let channel = Arc::new(Channel {
            id: self.id.clone(),
            peer_uid: backend.agent_peer_uid(&id),
            bounds: self.bounds,
            budget: Arc::new(Semaphore::new(self.bounds.budget)),
            pending: Arc::new(Semaphore::new(self.bounds.pending)),
            video: Arc::new(Semaphore::new(1)),
            video_cap: self.video_cap.subscribe(),
            to_session: self.to_self.clone(),
            gateway: self.m.gateway.clone(),
            recorder: self.recorder.as_ref().map(|r| r.sink()),
            video_sockets: self.video_frames.clone(),
        });
        tokio::spawn(agent_conn::accept_loop(
            channel,
            listener,
            self.ended.subscribe(),
        ));
        let spec = LaunchSpec {
            id,
            session_dir: self.dir.clone(),
            agent_socket: sock,
            agent_binary: self.m.agent_binary.clone(),
            limits: Limits {
                memory_mib: self.m.config.session.memory_mib,
                cpu_millis: self.m.config.session.cpu_millis,
                pids: self.m.config.session.pids,
            },
            network: NetworkPolicy {
                egress: self.spec.egress.clone(),
            },
            agent_token: Some(self.agent_token.clone()),
            home: None,
        };
        let profile = self.spec.profile.clone().map(|user| {
            let cfg = &self.m.config;
            (
                crate::profiles::dir(&cfg.data_dir),
                user,
                cfg.session.profile_mib,
            )
        });
        let session = self.id.clone();
        Ok(Box::pin(async move {
            let mut spec = spec;
            if let Some((dir, user, mib)) = profile {
                let image = crate::profiles::prepare(&dir, &user, mib, &session).await?;
                spec.home = Some(image);
            }
            backend.start(&spec).await.map_err(|e| {
                format!(
                    "the {} backend could not start the session: {e}",
                    backend.name()
                )
            })
        }))
    }

    async fn fail(&mut self, reason: &str) {
        if self.pooled {
            tracing::warn!(session = %self.id, %reason, "pooled session failed");
        }
        if self.set_state(State::Failed, Some(reason)) {
            self.m.metrics.failures.inc();
            tracing::warn!(session = %self.id, %reason, "session failed");
        }
        // The processes are of no use any more; the record keeps the reason.
        self.teardown().await;
    }

    async fn stop(&mut self, reason: &str) {
        self.set_state(State::Stopping, Some(reason));
        self.teardown().await;
        self.set_state(State::Stopped, None);
    }

    async fn teardown(&mut self) {
        if let Some(r) = self.recorder.take() {
            r.finish().await;
        }
        if let Some(control) = &self.control {
            let _ = control.try_send(Message::Shutdown);
        }
        if let Some(gw) = &self.m.gateway {
            gw.close_session(&self.id);
        }
        // A start under way is finished first, so what it made is stopped.
        if let Some(f) = self.starting.take() {
            match f.await {
                Ok(instance) => self.instance = Some(instance),
                Err(e) => self.note(&e),
            }
        }
        if let Some(instance) = self.instance.take()
            && let Err(e) = instance.stop(STOP_GRACE).await
        {
            self.note(&format!("stopping the instance: {e}"));
            tracing::error!(session = %self.id, error = %e, "stopping instance");
        }
        self.control = None;
        self.streams.clear();
        // Its file system is unmounted with the instance: free for the next.
        self.profile_claim = None;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.m.ended(&self.id);
        self.finished = true;
    }

    async fn on_command(&mut self, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Claim(claim) => self.claim(*claim, now),
            Command::Gateway(ev) => {
                if let GatewayEvent::ViewerState {
                    viewer,
                    state: sandcast_webrtc::ViewerState::Closed,
                    ..
                } = &ev
                {
                    self.token_peers.retain(|p| p.0 != *viewer);
                }
                let mut b = Backlog::default();
                b.push_event(ev);
                self.apply(b, now);
            }
            Command::Backlog(b) => {
                if b.dropped > 0 {
                    tracing::warn!(session = %self.id, dropped = b.dropped, "viewer events coalesced or dropped while the session was behind");
                }
                self.apply(b, now);
            }
            Command::Touch => self.core.touch(now),
            Command::Viewer(present) => {
                self.core.viewer(present, now);
                self.publish();
                self.tell_watched();
            }
            Command::VideoSocket(what) => self.video_socket(what, now),
            Command::Automation { present, client } => {
                self.core.automation(present, client, now);
                self.tell_watched();
                if client {
                    self.publish();
                    self.announce_control();
                }
            }
            Command::Control(holder, reply) => {
                if self.core.control(holder, now) {
                    self.publish();
                    self.announce_control();
                }
                let _ = reply.send(self.core.snapshot());
            }
            Command::OpenStream(target, reply) => {
                let _ = reply.send(self.open_stream(target));
            }
            Command::Complete { exit, problem } => self.complete(exit, problem).await,
            Command::Stop(reason) => self.stop(&reason).await,
            Command::Revoke(token_id) => {
                self.revoked.send_modify(|r| {
                    r.insert(token_id.clone());
                });
                let n = self.close_token_peers(|t, _| t == token_id);
                self.note(&format!(
                    "token {token_id} revoked; {n} WebRTC viewer(s) with it closed"
                ));
            }
            Command::Peer {
                viewer,
                token_id,
                expires,
            } => {
                self.token_peers.push((viewer, token_id.clone(), expires));
                // Revoked or expired while the offer was answered.
                let gone = self.revoked.borrow().contains(&token_id);
                self.close_token_peers(|t, e| {
                    t == token_id && (gone || e.is_some_and(|e| e <= now))
                });
            }
        }
    }

    /// Closes the WebRTC viewers opened with a token that `which` (its id,
    /// its expiry) picks; returns how many.
    fn close_token_peers(&mut self, which: impl Fn(&str, Option<Instant>) -> bool) -> usize {
        let (closing, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.token_peers)
            .into_iter()
            .partition(|(_, t, e)| which(t, *e));
        self.token_peers = kept;
        if let Some(gw) = &self.m.gateway {
            for (viewer, _, _) in &closing {
                gw.close_viewer(*viewer);
            }
        }
        closing.len()
    }

    /// Applies gateway events (one, or a backlog of them).
    fn apply(&mut self, mut b: Backlog, now: Instant) {
        let viewers = self.core.viewers;
        for _ in 0..b.connected {
            self.core.viewer(true, now);
        }
        for _ in 0..b.closed {
            self.core.viewer(false, now);
        }
        if b.activity {
            self.core.touch(now);
        }
        if self.core.viewers != viewers {
            self.publish();
        }
        self.tell_watched();
        let msgs: Vec<Message> = b.drain().collect();
        for msg in msgs {
            if matches!(msg, Message::ChooseFiles { .. }) && !self.spec.transfers {
                continue;
            }
            match msg {
                Message::Video(VideoControl::Start { .. }) => self.gateway_video = true,
                Message::Video(VideoControl::Stop) => {
                    self.gateway_video = false;
                    // The last WebRTC viewer left: a recording or a viewer
                    // on the WebSocket stream keeps the encoder running.
                    if self.video_elsewhere() {
                        self.send_agent(record_video());
                        continue;
                    }
                }
                _ => {}
            }
            self.send_agent(msg);
        }
    }

    /// Whether something beside the gateway needs the encoded video: the
    /// recording, or a viewer on the WebSocket video stream.
    fn video_elsewhere(&self) -> bool {
        self.recording() || self.video_sockets > 0
    }

    /// A viewer of the WebSocket video stream arrived, left or fell behind.
    /// It counts as a viewer (the session is watched, not idle); the
    /// encoder runs while any viewer of either kind or a recording needs it,
    /// in the codec the WebRTC viewers negotiated when there are any (the
    /// stream says its codec in each frame), else H.264.
    fn video_socket(&mut self, what: VideoSocket, now: Instant) {
        match what {
            VideoSocket::Joined => {
                self.video_sockets += 1;
                self.core.viewer(true, now);
                // Its stream starts at a key frame: ask for one from a
                // running encoder, or start it (it opens with one).
                if self.gateway_video || self.recording() {
                    self.send_agent(Message::Video(VideoControl::KeyFrame));
                } else {
                    self.send_agent(record_video());
                }
            }
            VideoSocket::Left => {
                self.video_sockets = self.video_sockets.saturating_sub(1);
                self.core.viewer(false, now);
                if !self.gateway_video && !self.video_elsewhere() {
                    self.send_agent(Message::Video(VideoControl::Stop));
                }
            }
            VideoSocket::Lagged => {
                self.send_agent(Message::Video(VideoControl::KeyFrame));
                return;
            }
        }
        self.publish();
        self.tell_watched();
    }

    /// Whether the session records now (it may have stopped at a cap).
    fn recording(&self) -> bool {
        self.recorder.as_ref().is_some_and(|r| r.is_open())
    }

    /// Starts the recording; a recording that cannot start is said in the
    /// log and events, and the session goes on without it.
    fn start_recording(&mut self) {
        let cfg = &self.m.config.recording;
        let ttl = self.spec.recording_ttl_seconds.unwrap_or(cfg.ttl_seconds);
        let dir = crate::recording::dir(&self.m.config.data_dir);
        let m = self.m.clone();
        let id = self.id.clone();
        let log = self.log.clone();
        let notify: crate::recording::Notify = Arc::new(move |state, reason| {
            log.write_server(&format!("recording {state}: {reason}"));
            m.event(&id, "recording", json!({"state": state, "reason": reason}));
        });
        let started = crate::recording::create_dir(&dir, &self.id).and_then(|dir| {
            crate::recording::Recorder::start(crate::recording::Setup {
                dir,
                meta: crate::recording::Meta::new(&self.id, ttl),
                max_bytes: cfg.max_mib << 20,
                disk_max_bytes: cfg.disk_mib << 20,
                disk: self.m.recordings().clone(),
                notify: notify.clone(),
            })
        });
        match started {
            Ok(r) => {
                self.recorder = Some(r);
                self.note("recording");
                self.m
                    .event(&self.id, "recording", json!({"state": "recording"}));
            }
            Err(e) => notify("stopped", &format!("the recording could not start: {e}")),
        }
    }

    /// Every fragment interval while recording: a key frame starts the next
    /// fragment. A recording that stopped (a cap) lets the encoder and the
    /// browser rest again when nobody watches.
    fn recording_tick(&mut self) {
        if self.recording() {
            self.send_agent(Message::Video(VideoControl::KeyFrame));
            return;
        }
        self.recorder = None;
        if !self.gateway_video && !self.video_elsewhere() && self.control.is_some() {
            self.send_agent(Message::Video(VideoControl::Stop));
        }
        self.tell_watched();
    }

    /// Tells the agent when the session went from watched to unwatched or
    /// back (it pauses and resumes the browser).
    fn tell_watched(&mut self) {
        // A recording watches too: the browser must not be paused.
        let watched = self.core.in_use() || self.recording();
        if self.control.is_some() && self.told_watched != Some(watched) {
            self.told_watched = Some(watched);
            self.send_agent(Message::Watched { watched });
        }
    }

    /// Sends a message to the agent without waiting: when its connection is
    /// behind, the message waits in the outbox under the backlog's policy.
    fn send_agent(&mut self, msg: Message) {
        if let Message::Resize { width, height } = msg {
            self.core.resizing(width, height);
            let (w, h) = self.core.max_display;
            self.video_cap
                .send_replace(agent_conn::video_frame_cap(w, h, self.bounds.video_max));
        }
        let Some(control) = &self.control else {
            // A viewer may connect while the session starts, before its
            // agent does: what it asks for (the video stream, a key frame,
            // a size) waits, under the backlog's policy, for the agent.
            if !self.finished {
                self.outbox.push(msg);
            }
            return;
        };
        if self.outbox.messages() > 0 {
            self.outbox.push(msg);
            return;
        }
        match control.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => self.outbox.push(msg),
            Err(mpsc::error::TrySendError::Closed(_)) => self.control = None,
        }
    }

    fn open_stream(
        &mut self,
        target: StreamTarget,
    ) -> Result<oneshot::Receiver<UnixStream>, ManagerError> {
        if self.control.is_none() {
            return Err(ManagerError::Conflict(
                "the session's agent is not connected".into(),
            ));
        }
        // Requests whose caller gave up are forgotten.
        self.streams.retain(|_, w| !w.is_closed());
        if self.streams.len() >= self.bounds.streams {
            return Err(ManagerError::Conflict(format!(
                "the session already waits for {} streams",
                self.streams.len()
            )));
        }
        let n = self.next_stream;
        self.next_stream += 1;
        let (tx, rx) = oneshot::channel();
        self.streams.insert(n, tx);
        self.send_agent(Message::OpenStream { id: n, target });
        Ok(rx)
    }

    /// Says who holds control and how many automation clients are
    /// connected: an event on the session's stream, and a message to its
    /// viewers (whose page offers to take over while a program drives).
    fn announce_control(&mut self) {
        let snap = self.core.snapshot();
        self.m.event(
            &self.id,
            "control",
            json!({"holder": snap.control.as_str(), "automation_clients": snap.automation}),
        );
        self.to_viewers(ViewerMessage::Automation {
            clients: snap.automation as u32,
            paused: snap.control == Holder::Person,
        });
    }

    /// Tells every viewer, over WebRTC and on input sockets.
    fn to_viewers(&self, msg: ViewerMessage) {
        if msg.check().is_err() {
            return;
        }
        if let Some(gw) = &self.m.gateway {
            gw.send_to_viewers(&self.id, msg.clone());
        }
        let _ = self.to_sockets.send(msg);
    }

    fn session_config(&self) -> SessionConfig {
        let config = &self.m.config;
        SessionConfig {
            session_id: self.id.clone(),
            width: self.spec.width,
            height: self.spec.height,
            start_url: self.spec.start_url.clone(),
            kiosk: self.spec.kiosk,
            launch: self.spec.launch.clone(),
            launch_once: self.spec.outcome.complete_on.is_some(),
            browser: BrowserConfig {
                binary: config.browser.binary.clone(),
                extra_args: config.browser.session_args(),
                policy: Some(config.browser.policy()),
            },
            restart: RestartPolicy::default(),
            max_fps: config.webrtc.max_fps,
            h264_tuning: config.webrtc.h264_tuning,
            server_time_ms: now_ms() as u64,
            agent_token: Some(self.agent_token.clone()),
            pause_unwatched_ms: config.session.pause_unwatched_seconds.saturating_mul(1000),
            keyboard_layout: self.spec.keyboard_layout.clone(),
            transfers: self.spec.transfers,
            display_max: Some((config.session.max_width, config.session.max_height)),
        }
    }

    async fn on_agent(&mut self, msg: FromAgent) {
        match msg {
            FromAgent::ControlHello { version, reply } => {
                if self.control_taken || self.finished {
                    let _ = reply.send(None);
                } else {
                    self.control_taken = true;
                    let _ = reply.send(Some(self.session_config()));
                    self.note(&format!("agent {version} connected"));
                }
            }
            FromAgent::ControlUp(tx) => {
                self.control = Some(tx);
                self.told_watched = None;
                self.tell_watched();
                if self.video_elsewhere() {
                    self.send_agent(record_video());
                }
            }
            FromAgent::Message(msg) => self.on_agent_message(*msg).await,
            FromAgent::ClaimStream { id, reply } => {
                let _ = reply.send(self.streams.remove(&id).filter(|w| !w.is_closed()));
            }
            FromAgent::Refused(why) => {
                self.refusals += 1;
                if self.refusals <= REFUSALS_LOGGED {
                    self.note(&why);
                } else if self.refusals.is_power_of_two() {
                    self.note(&format!(
                        "{} agent connections refused or failed so far",
                        self.refusals
                    ));
                }
            }
        }
    }

    async fn on_agent_message(&mut self, msg: Message) {
        let m = self.m.clone();
        match msg {
            Message::Ready if self.pooled => {
                self.core.ready();
                self.note("pooled session ready");
                m.pool_ready(&self.id);
            }
            Message::Claimed { error: Some(e) } if !self.pooled => {
                self.fail(&format!("the claim of a pooled session failed: {e}"))
                    .await;
            }
            Message::Claimed { error: None } if !self.pooled => {
                self.tell_watched();
                self.ready().await;
            }
            Message::Ready => self.ready().await,
            Message::Fatal { reason } => self.fail(&reason).await,
            Message::Child(report) => {
                if report.state == sandcast_proto::ChildState::Restarting
                    || report.state == sandcast_proto::ChildState::CrashLoop
                {
                    m.metrics.restarts.inc();
                    self.log(
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
                self.core.children.insert(report.name.clone(), report);
                self.publish();
                self.agent_event("child", data);
            }
            Message::Log(line) => {
                let stream = match line.stream {
                    sandcast_proto::LogStream::Stdout => "stdout",
                    sandcast_proto::LogStream::Stderr => "stderr",
                    sandcast_proto::LogStream::Agent => "agent",
                };
                self.log(&line.source, stream, &line.line);
            }
            Message::Clipboard { text } => {
                self.to_viewers(ViewerMessage::Clipboard { text });
            }
            Message::DisplaySize { width, height } => {
                self.core.display = (width, height);
                self.publish();
                self.to_viewers(ViewerMessage::DisplaySize { width, height });
                self.agent_event("display", json!({"width": width, "height": height}));
            }
            Message::RemoteFocus { editable, x, y } => {
                // The page reports it: only its shape is trusted, checked
                // by ViewerMessage::check on the way out.
                self.to_viewers(ViewerMessage::Focus { editable, x, y });
            }
            // The page names its downloads and opens choosers at will: the
            // agent rate-limits both, the name is checked by
            // ViewerMessage::check, and a session with transfers off says
            // nothing of either.
            Message::Download { name, size } if self.spec.transfers => {
                if sandcast_proto::transfer::check_name(&name).is_ok() {
                    self.note(&format!("download finished: {name:?}, {size} bytes"));
                }
                self.to_viewers(ViewerMessage::Download { name, size });
            }
            Message::FileChooser { chooser, multiple } if self.spec.transfers => {
                self.to_viewers(ViewerMessage::FileChooser { chooser, multiple });
            }
            Message::Ping { seq } => self.send_agent(Message::Pong { seq }),
            // Sent only when they changed, at most every few seconds.
            Message::Stats(stats) => {
                self.core.agent = stats;
                self.publish();
            }
            Message::LaunchEnded { exit } => self.launch_ended(exit),
            _ => {}
        }
    }

    /// The session is ready: its record says so, and the time it took is
    /// measured.
    async fn ready(&mut self) {
        let m = self.m.clone();
        self.core.ready();
        if !self.set_state(State::Ready, None) {
            // Its record ended while it started (in a cluster, the node
            // that placed it here gave up on it): nobody has it, so it
            // must not run on.
            let ended = match m.store.get(&self.id) {
                Ok(None) => true,
                Ok(Some(row)) => !row.state.is_live(),
                Err(_) => false,
            };
            if ended {
                self.stop("its record ended before it was ready").await;
            }
            return;
        }
        if let Ok(Some(row)) = m.store.get(&self.id)
            && let Some(ready) = row.ready_ms
        {
            let secs = (ready - row.created_ms) as f64 / 1000.0;
            m.metrics.start_seconds.observe(secs);
        }
    }

    /// A pooled session becomes the request's: the agent applies what the
    /// request wants (see [`Message::Claim`]) and says when it is done;
    /// until then the session is `starting`.
    fn claim(&mut self, claim: Claim, now: Instant) {
        if !self.pooled || self.m.pooled(&self.id) {
            // Never sent twice, nor to a session nobody took from the pool.
            tracing::error!(session = %self.id, "a claim for a session that is not a claimed pooled one");
            return;
        }
        self.pooled = false;
        self.spec = claim.spec;
        self.core.claim(&self.spec, claim.ttl, now);
        self.note("claimed from the warm pool");
        // A paused browser opens no tab: it counts as watched until the
        // claim is applied, then as what it is (`tell_watched` on `Claimed`).
        self.told_watched = Some(true);
        self.send_agent(Message::Watched { watched: true });
        let config = self.session_config();
        self.send_agent(Message::Claim(Box::new(config)));
    }

    /// The launch command of a `complete_on` session exited: its files are
    /// collected (by a task: the streams come through this task) and then
    /// the session completes. Said only once; a session without
    /// `complete_on` never runs its command once, so a report is noise.
    fn launch_ended(&mut self, exit: ExitInfo) {
        if self.completing || self.spec.outcome.complete_on.is_none() {
            return;
        }
        self.completing = true;
        self.note(&format!("the launch command ended ({exit}); completing"));
        let max = self.m.config.files.result_max_kib * 1024;
        let paths = self.spec.outcome.collect.clone();
        let dir = crate::results::dir(&self.m.config.data_dir);
        let id = self.id.clone();
        let ttl = self.spec.outcome.result_ttl_seconds;
        let back = self.to_self_commands.clone();
        let streams = back.clone();
        // Each stream is asked for through this task's own queue, as any
        // other request: its replies come through here.
        let open =
            move |op: FileOp| -> BoxFuture<'static, Result<oneshot::Receiver<UnixStream>, String>> {
                let queue = streams.clone();
                Box::pin(async move {
                    let queue = queue.upgrade().ok_or("the session ended")?;
                    let (tx, rx) = oneshot::channel();
                    queue
                        .send(Command::OpenStream(StreamTarget::File(op), tx))
                        .await
                        .map_err(|_| "the session ended".to_string())?;
                    match rx.await {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("the session ended".to_string()),
                    }
                })
            };
        tokio::spawn(async move {
            let collected = crate::results::collect(paths, max, open).await;
            let saved = crate::results::save(&dir, &id, &collected, exit.code, now_ms(), ttl);
            let problem = collected
                .problem()
                .or(saved.err().map(|e| format!("saving the result: {e}")));
            if let Some(tx) = back.upgrade() {
                let _ = tx.send(Command::Complete { exit, problem }).await;
            }
        });
    }

    /// Ends a session whose launch command exited: `completed` with its
    /// exit code, or `failed` when a non-zero exit fails it; then its
    /// processes go.
    async fn complete(&mut self, exit: ExitInfo, problem: Option<String>) {
        let _ = self.m.store.set_exit_code(&self.id, exit.code);
        let failed = exit.code != Some(0)
            && self.spec.outcome.nonzero_exit == crate::store::NonzeroExit::Failed;
        let mut reason = format!("the launch command ended with {exit}");
        if let Some(p) = problem {
            reason = format!("{reason}; {p}");
        }
        let extra = json!({ "exit_code": exit.code, "signal": exit.signal });
        if failed {
            if self.set_state_with(State::Failed, Some(&reason), extra) {
                self.m.metrics.failures.inc();
            }
        } else {
            self.set_state_with(State::Completed, Some(&reason), extra);
        }
        self.teardown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(idle: u64) -> Spec {
        Spec {
            idle_timeout_seconds: idle,
            egress: sandcast_backend::Egress::None,
            ..Spec::from_defaults(&crate::config::SessionDefaults::default())
        }
    }

    #[test]
    fn a_claimed_session_lives_by_the_requests_times_from_the_claim() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = Core::new(&spec(86_400), s(86_400), s(10), t0);
        c.ready();
        // Pooled for an hour, then claimed with a 2-minute life.
        let t1 = t0 + s(3600);
        assert_eq!(c.due(t1), None);
        c.claim(&spec(30), s(120), t1);
        assert_eq!(
            c.next_deadline(),
            t1 + s(10),
            "the claim must be applied in time"
        );
        assert_eq!(c.due(t1 + s(10)), Some(Due::NotReady(10)));
        c.ready();
        assert_eq!(c.due(t1 + s(29)), None);
        assert_eq!(c.due(t1 + s(30)), Some(Due::Idle(30)));
        c.viewer(true, t1);
        assert_eq!(c.due(t1 + s(119)), None);
        assert_eq!(c.due(t1 + s(120)), Some(Due::Expired));
    }

    #[test]
    fn not_ready_in_time_fails_first() {
        let t0 = Instant::now();
        let c = Core::new(
            &spec(60),
            Duration::from_secs(3600),
            Duration::from_secs(10),
            t0,
        );
        assert_eq!(c.due(t0 + Duration::from_secs(9)), None);
        assert_eq!(c.next_deadline(), t0 + Duration::from_secs(10));
        assert_eq!(c.due(t0 + Duration::from_secs(10)), Some(Due::NotReady(10)));
        // Idle too by 100 s, but never ready: not being ready is the reason.
        assert_eq!(
            c.due(t0 + Duration::from_secs(100)),
            Some(Due::NotReady(10))
        );
    }

    /// A ready session of an hour with `idle` seconds of idle timeout.
    fn ready_core(idle: u64, t0: Instant) -> Core {
        let mut c = Core::new(
            &spec(idle),
            Duration::from_secs(3600),
            Duration::from_secs(10),
            t0,
        );
        c.ready();
        c
    }

    #[test]
    fn a_watched_session_is_never_idle_and_an_unwatched_one_is() {
        let t0 = Instant::now();
        let mut c = ready_core(5, t0);
        c.viewer(true, t0 + Duration::from_secs(1));
        assert_eq!(c.due(t0 + Duration::from_secs(1000)), None);
        assert_eq!(c.next_deadline(), t0 + Duration::from_secs(3600));
        c.viewer(false, t0 + Duration::from_secs(1000));
        assert_eq!(c.due(t0 + Duration::from_secs(1004)), None);
        assert_eq!(c.due(t0 + Duration::from_secs(1005)), Some(Due::Idle(5)));
        // A touch restarts the idle clock; a departure never goes below zero.
        c.viewer(false, t0 + Duration::from_secs(1005));
        c.touch(t0 + Duration::from_secs(1008));
        assert_eq!(c.due(t0 + Duration::from_secs(1012)), None);
        assert_eq!(c.next_deadline(), t0 + Duration::from_secs(1013));
    }

    #[test]
    fn an_automation_client_keeps_the_session_in_use_and_control_changes_once() {
        let t0 = Instant::now();
        let mut c = ready_core(5, t0);
        assert!(!c.in_use());
        c.automation(true, true, t0);
        assert!(c.in_use());
        assert_eq!(c.due(t0 + Duration::from_secs(100)), None);
        c.automation(true, false, t0 + Duration::from_secs(100));
        c.automation(false, true, t0 + Duration::from_secs(100));
        assert!(c.in_use(), "a request under way keeps it in use");
        assert_eq!(c.snapshot().automation, 0, "requests are not clients");
        c.automation(false, false, t0 + Duration::from_secs(100));
        assert!(!c.in_use());
        assert_eq!(c.due(t0 + Duration::from_secs(105)), Some(Due::Idle(5)));
        assert_eq!(c.snapshot().control, Holder::Shared);
        assert!(c.control(Holder::Person, t0));
        assert!(
            !c.control(Holder::Person, t0),
            "no change, nothing to announce"
        );
        assert_eq!(c.snapshot().control, Holder::Person);
        assert!(c.control(Holder::Shared, t0));
    }

    #[test]
    fn the_time_to_live_ends_a_watched_session() {
        let t0 = Instant::now();
        let mut c = Core::new(
            &spec(5),
            Duration::from_secs(60),
            Duration::from_secs(10),
            t0,
        );
        c.ready();
        c.viewer(true, t0);
        assert_eq!(c.due(t0 + Duration::from_secs(60)), Some(Due::Expired));
    }

    #[test]
    fn the_largest_requested_display_is_remembered() {
        let mut c = Core::new(
            &spec(5),
            Duration::from_secs(60),
            Duration::from_secs(10),
            Instant::now(),
        );
        c.resizing(1920, 600);
        c.resizing(800, 1080);
        assert_eq!(c.max_display, (1920, 1080));
    }
}

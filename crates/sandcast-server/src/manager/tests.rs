//! The manager with real sockets, a real store and a backend double whose
//! "agent" is the test itself speaking the agent protocol: what cannot run
//! here is only the sandbox (the e2e tests run that).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{SinkExt, StreamExt};
use sandcast_backend::{
    Backend, BackendError, Instance, InstanceExit, LaunchSpec, Readiness, SessionId,
};
use sandcast_proto::{Frame, FrameCodec, Hello, InputEvent, Message, PROTOCOL_VERSION, Role};
use sandcast_webrtc::{GatewayEvent, ViewerId, ViewerState};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio_util::codec::Framed;

use super::*;

struct Double;

struct DoubleInstance(watch::Sender<Option<InstanceExit>>);

#[async_trait]
impl Instance for DoubleInstance {
    fn pid(&self) -> Option<u32> {
        None
    }
    fn exited(&self) -> watch::Receiver<Option<InstanceExit>> {
        self.0.subscribe()
    }
    async fn stop(&self, _grace: Duration) -> Result<(), BackendError> {
        self.0.send_replace(Some(InstanceExit {
            reason: "stopped".into(),
            requested: true,
        }));
        Ok(())
    }
}

#[async_trait]
impl Backend for Double {
    fn name(&self) -> &'static str {
        "double"
    }
    async fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            checks: Vec::new(),
        }
    }
    fn agent_peer_uid(&self, _id: &SessionId) -> Option<u32> {
        // SAFETY: getuid(2) cannot fail.
        Some(unsafe { libc::getuid() })
    }
    async fn start(&self, _spec: &LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        Ok(Box::new(DoubleInstance(watch::channel(None).0)))
    }
    async fn reap(&self, _keep: &[SessionId]) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn manager(max_sessions: usize) -> (Arc<Manager>, TempDir) {
    manager_with(max_sessions, |_| {})
}

fn manager_with(max_sessions: usize, tweak: impl FnOnce(&mut Config)) -> (Arc<Manager>, TempDir) {
    let dir = std::env::temp_dir().join(format!(
        "sandcast-manager-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 6]>())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = Config {
        data_dir: dir.clone(),
        max_sessions,
        ..Config::default()
    };
    config.session.idle_timeout_seconds = 3600;
    tweak(&mut config);
    let store: Arc<dyn Store> =
        Arc::new(crate::store::sqlite::SqliteStore::open(&dir.join("db.sqlite")).unwrap());
    let m = Manager::new(
        Arc::new(config),
        store,
        Arc::new(Double),
        None,
        Arc::new(Metrics::new()),
        "/nonexistent/sandcast-agent".into(),
    );
    (m, TempDir(dir))
}

fn request() -> NewSession {
    NewSession {
        user_id: None,
        provider: None,
        spec: Spec {
            idle_timeout_seconds: 3600,
            egress: sandcast_backend::Egress::None,
            ..Spec::from_defaults(&crate::config::SessionDefaults::default())
        },
        ttl_seconds: 3600,
    }
}

type Conn = Framed<UnixStream, FrameCodec>;

async fn connect(m: &Manager, id: &str, role: Role) -> Conn {
    let sock = m
        .config
        .data_dir
        .join("sessions")
        .join(id)
        .join("agent.sock");
    let mut last = None;
    for _ in 0..200 {
        match UnixStream::connect(&sock).await {
            Ok(s) => {
                let mut c = Framed::new(s, FrameCodec);
                c.send(Message::Hello(Hello {
                    protocol: PROTOCOL_VERSION,
                    role,
                    agent_version: "test".into(),
                }))
                .await
                .unwrap();
                return c;
            }
            // The session's task binds the socket as it starts.
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("connecting to {}: {last:?}", sock.display());
}

async fn next_message(c: &mut Conn) -> Option<Message> {
    match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
        Ok(Some(Ok(Frame::Message(m)))) => Some(m),
        Ok(_) => None,
        Err(_) => panic!("no message within 10 s"),
    }
}

/// Connects as the control connection and reads the welcome and configuration.
async fn control(m: &Manager, id: &str) -> Conn {
    let mut c = connect(m, id, Role::Control).await;
    assert!(matches!(
        next_message(&mut c).await,
        Some(Message::Welcome { .. })
    ));
    match next_message(&mut c).await {
        // Every backend's agent gets the browser's URL filters to put in place.
        Some(Message::Config(config)) => assert_eq!(
            config.browser.policy,
            Some(m.config.browser.policy()),
            "the configuration carries the URL filters"
        ),
        other => panic!("expected the configuration, got {other:?}"),
    }
    c
}

fn key(session: &str, code: &str, down: bool) -> GatewayEvent {
    GatewayEvent::Input {
        session: session.into(),
        viewer: ViewerId(1),
        event: InputEvent::Key {
            code: code.into(),
            key: code.into(),
            down,
        },
    }
}

async fn wait_snapshot(live: &Live, what: &str, ok: impl Fn(&Snapshot) -> bool) {
    let mut rx = live.snapshots();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| ok(s)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not within 10 s"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_agent_does_not_read_stalls_and_loses_nothing_of_another() {
    let (m, _dir) = manager(4);
    let (gw, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(relay(Arc::downgrade(&m), rx));
    let (slow, _) = m.create(request()).unwrap();
    let (fast, _) = m.create(request()).unwrap();
    let mut slow_agent = control(&m, &slow.id).await;
    let mut fast_agent = control(&m, &fast.id).await;

    // Far more than the slow agent's socket, writer queue, outbox and command
    // queue hold together; the slow agent reads none of it yet.
    for i in 0..50_000 {
        gw.send(key(&slow.id, &format!("K{}", i % 50), true))
            .unwrap();
        gw.send(key(&slow.id, &format!("K{}", i % 50), false))
            .unwrap();
        gw.send(GatewayEvent::Input {
            session: slow.id.clone(),
            viewer: ViewerId(1),
            event: InputEvent::PointerMove { x: i % 1000, y: 1 },
        })
        .unwrap();
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for i in 0..3 {
        gw.send(GatewayEvent::ViewerState {
            session: fast.id.clone(),
            viewer: ViewerId(10 + i),
            state: ViewerState::Connected,
        })
        .unwrap();
    }
    gw.send(key(&fast.id, "KeyB", true)).unwrap();
    gw.send(key(&fast.id, "KeyB", false)).unwrap();

    // The other session gets every event, in order, now.
    let mut got = Vec::new();
    while got.len() < 2 {
        match next_message(&mut fast_agent).await {
            Some(Message::Input(ev)) => got.push(ev),
            Some(_) => {}
            None => panic!("the fast agent's connection ended"),
        }
    }
    assert_eq!(
        got,
        [
            InputEvent::Key {
                code: "KeyB".into(),
                key: "KeyB".into(),
                down: true
            },
            InputEvent::Key {
                code: "KeyB".into(),
                key: "KeyB".into(),
                down: false
            },
        ]
    );
    let fast_live = m.live(&fast.id).unwrap();
    wait_snapshot(&fast_live, "three viewers", |s| s.viewers == 3).await;
    // The slow one's own viewer changes are not lost either.
    gw.send(GatewayEvent::ViewerState {
        session: slow.id.clone(),
        viewer: ViewerId(2),
        state: ViewerState::Connected,
    })
    .unwrap();
    let slow_live = m.live(&slow.id).unwrap();
    wait_snapshot(&slow_live, "the slow session's viewer", |s| s.viewers == 1).await;

    // When the slow agent reads at last, no key is left pressed.
    let mut pressed = BTreeSet::new();
    let mut inputs = 0;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(2), slow_agent.next()).await;
        let Ok(Some(Ok(Frame::Message(msg)))) = msg else {
            break;
        };
        if let Message::Input(ev) = msg {
            inputs += 1;
            match ev {
                InputEvent::Key {
                    code, down: true, ..
                } => {
                    pressed.insert(code);
                }
                InputEvent::Key {
                    code, down: false, ..
                } => {
                    pressed.remove(&code);
                }
                InputEvent::ReleaseAll => pressed.clear(),
                _ => {}
            }
        }
    }
    assert!(
        inputs > 0 && inputs < 150_000,
        "{inputs} inputs reached the slow agent"
    );
    assert!(pressed.is_empty(), "keys left pressed: {pressed:?}");
    m.stop_all("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_exceed_max_sessions() {
    let (m, _dir) = manager(3);
    let handle = tokio::runtime::Handle::current();
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let m = m.clone();
            let handle = handle.clone();
            std::thread::spawn(move || {
                let _rt = handle.enter();
                m.create(request()).map(|(row, _)| row.id)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, ManagerError::Full(3)))
    );
    m.stop_all("test over").await;
    assert!(m.live.lock().unwrap().sessions.is_empty());
    // Room again once they are gone.
    assert!(m.create(request()).is_ok());
    m.stop_all("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_channel_takes_one_control_one_video_and_only_streams_asked_for() {
    let (m, _dir) = manager(2);
    let (row, _) = m.create(request()).unwrap();
    let _agent = control(&m, &row.id).await;
    let refused = |msg: Option<Message>| matches!(msg, Some(Message::Reject { .. }) | None);

    let mut second = connect(&m, &row.id, Role::Control).await;
    assert!(refused(next_message(&mut second).await), "a second control");

    let mut video = connect(&m, &row.id, Role::Video).await;
    assert!(matches!(
        next_message(&mut video).await,
        Some(Message::Welcome { .. })
    ));
    let mut video2 = connect(&m, &row.id, Role::Video).await;
    assert!(refused(next_message(&mut video2).await), "a second video");

    let mut stream = connect(&m, &row.id, Role::Stream { id: 1 }).await;
    assert!(
        refused(next_message(&mut stream).await),
        "a stream nobody asked for"
    );

    // A video frame announced larger than a 1280×720 display can need closes
    // the connection, and the next video connection is welcome again.
    use tokio::io::AsyncWriteExt;
    let mut raw = video.into_inner();
    raw.write_all(&(4u32 << 20).to_be_bytes()).await.unwrap();
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf))
        .await
        .expect("the oversized frame's connection was not closed");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let mut video3 = connect(&m, &row.id, Role::Video).await;
    assert!(matches!(
        next_message(&mut video3).await,
        Some(Message::Welcome { .. })
    ));
    m.stop_all("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_hello_are_bounded() {
    let (m, _dir) = manager(2);
    let (row, _) = m.create(request()).unwrap();
    let _agent = control(&m, &row.id).await;
    let sock = m
        .config
        .data_dir
        .join("sessions")
        .join(&row.id)
        .join("agent.sock");
    let pending = m.config.agent_channel.pending as usize;
    // Connections that never say hello: the first `pending` are held, the
    // rest closed at once.
    let mut conns = Vec::new();
    for _ in 0..pending + 20 {
        conns.push(UnixStream::connect(&sock).await.unwrap());
    }
    let mut closed = 0;
    for c in &mut conns {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), c.read(&mut b)).await {
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
            closed += 1;
        }
    }
    assert_eq!(closed, 20, "{closed} of {} closed", conns.len());
    m.stop_all("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_or_expired_token_ends_what_was_opened_with_it() {
    use crate::store::TokenRow;
    use crate::tokens::Role as TokenRole;
    let (m, _dir) = manager(2);
    let (row, own) = m.create(request()).unwrap();
    let live = m.live(&row.id).unwrap();
    let add = |id: &str, secret: &str, role, expires_ms| {
        m.store()
            .insert_token(&TokenRow {
                id: id.into(),
                session_id: row.id.clone(),
                role,
                token_hash: crate::auth::hash_token(secret),
                created_ms: now_ms(),
                expires_ms,
                revoked_ms: None,
            })
            .unwrap();
    };
    add("watch", "w", TokenRole::View, None);
    add("brief", "b", TokenRole::Control, Some(now_ms() + 300));
    let grant = |t: &str| m.token_grant(&row.id, t).unwrap().unwrap();
    let (own, watch, brief) = (grant(&own), grant("w"), grant("b"));
    assert_eq!(own, crate::tokens::Grant::control());
    assert_eq!(watch.role, TokenRole::View);
    let soon = Duration::from_millis(100);
    assert!(
        tokio::time::timeout(soon, live.lost(&watch)).await.is_err(),
        "nothing happened to it yet"
    );
    // Expiry: the brief token's connections end when it does.
    let t0 = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), live.lost(&brief))
        .await
        .expect("the expired token's connections end");
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert_eq!(m.token_grant(&row.id, "b").unwrap(), None);
    // Revocation: a connection waiting on it, and one opened afterwards.
    let waiting = tokio::spawn(live.lost(&watch));
    assert!(m.store().revoke_token(&row.id, "watch", now_ms()).unwrap());
    live.revoke("watch").await;
    tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("ended within 1 s")
        .unwrap();
    tokio::time::timeout(soon, live.lost(&watch))
        .await
        .expect("a late connection with a revoked grant ends at once");
    assert_eq!(m.token_grant(&row.id, "w").unwrap(), None);
    // The session's own token is not revoked with it.
    assert!(tokio::time::timeout(soon, live.lost(&own)).await.is_err());
    assert_eq!(m.token_grant(&row.id, &row.id).unwrap(), None);
    m.stop_all("test over").await;
}

/// The pooled session the pool started (waits for the pool's task).
async fn pooled_id(m: &Manager, not: &[&str]) -> String {
    let t0 = std::time::Instant::now();
    loop {
        {
            let reg = m.live.lock().unwrap();
            let found = reg
                .sessions
                .keys()
                .find(|id| reg.pool.holds(id) && !not.contains(&id.as_str()));
            if let Some(id) = found {
                return id.clone();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no pooled session within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the store has `id` in `state`.
async fn wait_state(m: &Manager, id: &str, state: State) -> Row {
    let mut events = m.subscribe();
    let t0 = std::time::Instant::now();
    loop {
        if let Some(row) = m.store().get(id).unwrap()
            && row.state == state
        {
            return row;
        }
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        assert!(
            tokio::time::timeout(left, events.recv()).await.is_ok(),
            "{id} not {state:?} within 10 s"
        );
    }
}

/// The pool's session once its agent (the test) said it is ready.
async fn ready_pooled(m: &Manager) -> (String, Conn) {
    let pooled = pooled_id(m, &[]).await;
    let mut agent = control(m, &pooled).await;
    agent.send(Message::Ready).await.unwrap();
    while m.pool_counts().0 == 0 {
        tokio::task::yield_now().await;
    }
    (pooled, agent)
}

/// A request the pool's sessions fit (the configured egress).
fn fitting(m: &Manager) -> NewSession {
    let mut req = request();
    req.spec.egress = m.config.session.egress.clone();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_claims_a_ready_pooled_session_which_the_pool_replaces() {
    let (m, _dir) = manager_with(4, |c| c.session.pool_size = 1);
    let pooled = pooled_id(&m, &[]).await;
    assert!(
        m.store().get(&pooled).unwrap().is_none(),
        "nobody's yet: no record"
    );
    let mut agent = control(&m, &pooled).await;
    // Not ready yet: a create starts cold.
    let (cold, _) = m.create(fitting(&m)).unwrap();
    assert_ne!(cold.id, pooled);
    agent.send(Message::Ready).await.unwrap();
    let t0 = std::time::Instant::now();
    while m.pool_counts() != (1, 1) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            m.pool_counts()
        );
        tokio::task::yield_now().await;
    }
    assert!(
        m.live_snapshots().iter().all(|(id, ..)| *id != pooled),
        "a pooled session is not among the live ones"
    );

    let mut req = fitting(&m);
    req.spec.start_url = "https://example.com/start".into();
    req.spec.launch = Some(vec!["gh".into(), "auth".into(), "login".into()]);
    req.ttl_seconds = 120;
    let (row, _) = m.create(req).unwrap();
    assert_eq!(row.id, pooled, "the ready pooled session is claimed");
    assert_eq!(row.state, State::Starting);
    // Watched first, so a paused browser runs to open the tab.
    let mut watched = None;
    let config = loop {
        match next_message(&mut agent).await {
            Some(Message::Claim(c)) => break c,
            Some(Message::Watched { watched: w }) => watched = Some(w),
            Some(_) => {}
            None => panic!("the agent's connection ended"),
        }
    };
    assert_eq!(watched, Some(true), "the last word before the claim");
    assert_eq!(config.start_url, "https://example.com/start");
    assert_eq!(config.launch.as_deref().unwrap()[0], "gh");
    assert_eq!(config.session_id, pooled);
    agent.send(Message::Claimed { error: None }).await.unwrap();
    let ready = wait_state(&m, &pooled, State::Ready).await;
    assert_eq!(ready.expires_ms, row.created_ms + 120_000);
    // The agent hears that nobody watches once the claim is applied.
    loop {
        match next_message(&mut agent).await {
            Some(Message::Watched { watched }) => break assert!(!watched),
            Some(_) => {}
            None => panic!("the agent's connection ended"),
        }
    }
    // The pool starts another.
    let next = pooled_id(&m, &[&pooled]).await;
    assert_ne!(next, pooled);
    assert!(m.live_snapshots().iter().any(|(id, ..)| *id == pooled));
    m.stop_all("test over").await;
    assert!(
        m.live.lock().unwrap().sessions.is_empty(),
        "pooled ones stop too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_the_agent_cannot_apply_fails_the_session() {
    let (m, _dir) = manager_with(2, |c| c.session.pool_size = 1);
    let (pooled, mut agent) = ready_pooled(&m).await;
    let (row, _) = m.create(fitting(&m)).unwrap();
    assert_eq!(row.id, pooled);
    while !matches!(next_message(&mut agent).await, Some(Message::Claim(_))) {}
    agent
        .send(Message::Claimed {
            error: Some("no tab".into()),
        })
        .await
        .unwrap();
    let failed = wait_state(&m, &pooled, State::Failed).await;
    assert!(failed.reason.unwrap().contains("no tab"));
    m.stop_all("test over").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_session_gives_way_to_a_request_it_does_not_fit() {
    let (m, _dir) = manager_with(1, |c| c.session.pool_size = 1);
    let (pooled, mut agent) = ready_pooled(&m).await;
    // A request refused for another reason takes nothing from the pool.
    let _held = m.claim_profile("alice", "elsewhere").unwrap();
    let mut alice = fitting(&m);
    alice.user_id = Some("alice".into());
    alice.spec.profile = Some("alice".into());
    assert!(matches!(m.create(alice), Err(ManagerError::Conflict(_))));
    assert_eq!(m.pool_counts(), (1, 1), "the pooled session is still there");
    let mut kiosk = fitting(&m);
    kiosk.spec.kiosk = true;
    let (row, _) = m.create(kiosk).unwrap();
    assert_ne!(row.id, pooled, "a kiosk session starts cold");
    // The pooled one is stopped, and the server stays within its limit.
    loop {
        match next_message(&mut agent).await {
            Some(Message::Shutdown) | None => break,
            Some(_) => {}
        }
    }
    {
        let reg = m.live.lock().unwrap();
        assert_eq!(reg.sessions.len(), 1);
        assert!(reg.sessions.contains_key(&row.id));
    }
    // Full with a session of someone's: no pooled one and no room.
    assert!(matches!(m.create(fitting(&m)), Err(ManagerError::Full(1))));
    m.stop_all("test over").await;
}

/// A session whose record ended while it started (in a cluster: the node
/// that placed it gave up on it) stops when its agent says it is ready,
/// rather than running on for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_record_ended_while_it_started_stops_when_ready() {
    let (m, _dir) = manager(2);
    let (row, _) = m.create(request()).unwrap();
    let mut agent = control(&m, &row.id).await;
    assert!(
        m.store()
            .set_state(&row.id, State::Failed, Some("node b gave up"), now_ms())
            .unwrap()
    );
    // Watched before the agent speaks: the session may be gone at once.
    let live = m.live(&row.id).expect("live until it hears it is ready");
    let mut ended = live.ended();
    agent.send(Message::Ready).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|e| *e))
        .await
        .expect("stopped within 10 s")
        .unwrap();
    let row = m.store().get(&row.id).unwrap().unwrap();
    assert_eq!(row.state, State::Stopped, "{row:?}");
    m.stop_all("test over").await;
}

//! The I/O edge: sockets, timers and the handle the server uses.
//!
//! One task owns the [`Hub`] and every socket; the [`Gateway`] handle talks
//! to it over channels, so no lock is held on the media path. The task
//! sleeps until the earliest str0m timeout, a packet or a command: an idle
//! session costs no wake-ups beyond str0m's own (RTCP, stats, ICE consent).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sandcast_proto::VideoFrame;
use str0m::Candidate;
use str0m::net::{Protocol, TcpType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::hub::{Hub, HubConfig};
use crate::messages::ViewerMessage;
use crate::negotiate::OfferError;
use crate::{Answer, GatewayEvent, ViewerCounters, ViewerId, ViewerOptions};

/// Largest packet read from UDP or one RFC 4571 frame.
const MAX_PACKET: usize = 2048;
/// Frames waiting for the gateway task; a late frame is dropped, not queued.
const FRAME_QUEUE: usize = 8;
/// Packets waiting for one ICE-TCP connection's writer.
const TCP_QUEUE: usize = 512;
/// Most ICE-TCP connections open at once; more are refused at accept.
const MAX_TCP_CONNECTIONS: usize = 1024;
/// An ICE-TCP connection silent this long is closed; a live one carries
/// consent checks every few seconds.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Shortest gap between key-frame requests caused by dropped frames.
const DROP_KEYFRAME_GAP_MS: u64 = 500;

/// Where the gateway listens and what it advertises.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// UDP address for every session and viewer. With an unspecified IP, one
    /// socket is bound per advertised address, all on the same port.
    pub udp_bind: SocketAddr,
    /// TCP address for ICE-TCP (RFC 4571 framing); None disables it.
    pub tcp_bind: Option<SocketAddr>,
    /// Addresses put into host candidates. Empty: 127.0.0.1 and the host's
    /// non-loopback addresses.
    pub public_ips: Vec<IpAddr>,
    /// Advertise UDP candidates. Off only to force ICE-TCP (tests, networks
    /// known to block UDP).
    pub advertise_udp: bool,
    /// Core tunables.
    pub hub: HubConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            udp_bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 3478),
            tcp_bind: None,
            public_ips: Vec::new(),
            advertise_udp: true,
            hub: HubConfig::default(),
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A socket could not be bound.
    #[error("cannot bind {proto} {addr}: {source}")]
    Bind {
        /// "udp" or "tcp".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// An address cannot be a host candidate.
    #[error("{0} cannot be advertised as a candidate: {1}")]
    Candidate(SocketAddr, String),
    /// No address to advertise.
    #[error("no address to advertise: set public_ips")]
    NoAddress,
}

enum Command {
    Offer {
        session: String,
        sdp: String,
        opts: ViewerOptions,
        reply: oneshot::Sender<Result<Answer, OfferError>>,
    },
    Send(String, ViewerMessage),
    CloseSession(String),
    CloseViewer(ViewerId),
    Counters(ViewerId, oneshot::Sender<Option<ViewerCounters>>),
    AllCounters(oneshot::Sender<Vec<(String, ViewerId, ViewerCounters)>>),
}

enum TcpIn {
    Open(SocketAddr, mpsc::Sender<Vec<u8>>),
    Packet {
        source: SocketAddr,
        destination: SocketAddr,
        data: Vec<u8>,
    },
    Closed(SocketAddr),
}

struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    frames: mpsc::Sender<(String, VideoFrame)>,
    events: mpsc::UnboundedSender<GatewayEvent>,
    /// The receiving end until [`Gateway::events`] takes it.
    events_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<GatewayEvent>>>,
    frames_dropped: AtomicU64,
    /// When a dropped frame last asked for a key frame (ms since `epoch`).
    last_drop_keyframe_ms: AtomicU64,
    epoch: Instant,
    udp_addrs: Vec<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
}

/// Handle to a running gateway; cheap to clone. The gateway stops when the
/// last handle is dropped.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("udp", &self.inner.udp_addrs)
            .field("tcp", &self.inner.tcp_addr)
            .finish()
    }
}

fn host_ips() -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if let Ok(ifs) = if_addrs::get_if_addrs() {
        for i in ifs {
            let ip = i.ip();
            let usable = !ip.is_loopback()
                && match ip {
                    IpAddr::V4(v) => !v.is_link_local(),
                    // Link-local v6 needs a scope id a browser cannot use.
                    IpAddr::V6(v) => (v.segments()[0] & 0xffc0) != 0xfe80,
                };
            if usable && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    ips
}

impl Gateway {
    /// Binds the sockets and starts the gateway task on the current runtime.
    pub async fn start(cfg: GatewayConfig) -> Result<Gateway, GatewayError> {
        let ips = if !cfg.public_ips.is_empty() {
            cfg.public_ips.clone()
        } else if cfg.udp_bind.ip().is_unspecified() {
            host_ips()
        } else {
            vec![cfg.udp_bind.ip()]
        };
        if ips.is_empty() {
            return Err(GatewayError::NoAddress);
        }

        // UDP: one socket per advertised address when bound to "any", so a
        // packet's destination (which ICE checks) is known without pktinfo.
        let mut udp: Vec<(UdpSocket, SocketAddr)> = Vec::new();
        let bind_udp = |addr: SocketAddr| async move {
            UdpSocket::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind {
                    proto: "udp",
                    addr,
                    source,
                })
        };
        if cfg.udp_bind.ip().is_unspecified() && cfg.public_ips.is_empty() {
            let mut port = cfg.udp_bind.port();
            for ip in &ips {
                let s = bind_udp(SocketAddr::new(*ip, port)).await?;
                let local = s.local_addr().map_err(|source| GatewayError::Bind {
                    proto: "udp",
                    addr: SocketAddr::new(*ip, port),
                    source,
                })?;
                port = local.port();
                udp.push((s, local));
            }
        } else {
            let s = bind_udp(cfg.udp_bind).await?;
            let local = s.local_addr().map_err(|source| GatewayError::Bind {
                proto: "udp",
                addr: cfg.udp_bind,
                source,
            })?;
            // Behind 1:1 NAT the socket's address is not the advertised one.
            let adv = SocketAddr::new(ips[0], local.port());
            udp.push((s, adv));
        }
        let udp_port = udp[0].1.port();

        let tcp = match cfg.tcp_bind {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Bind {
                        proto: "tcp",
                        addr,
                        source,
                    })?;
                let local = l.local_addr().map_err(|source| GatewayError::Bind {
                    proto: "tcp",
                    addr,
                    source,
                })?;
                Some((l, local))
            }
            None => None,
        };

        let mut candidates = Vec::new();
        for ip in &ips {
            if cfg.advertise_udp {
                let addr = SocketAddr::new(*ip, udp_port);
                candidates.push(
                    Candidate::host(addr, "udp")
                        .map_err(|e| GatewayError::Candidate(addr, e.to_string()))?,
                );
            }
            if let Some((_, local)) = &tcp {
                let addr = SocketAddr::new(*ip, local.port());
                candidates.push(
                    Candidate::builder()
                        .tcp()
                        .host(addr)
                        .tcptype(TcpType::Passive)
                        .build()
                        .map_err(|e| GatewayError::Candidate(addr, e.to_string()))?,
                );
            }
        }
        if candidates.is_empty() {
            return Err(GatewayError::NoAddress);
        }

        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (frame_tx, frame_rx) = mpsc::channel(FRAME_QUEUE);
        // Unbounded, so that the gateway never waits on its consumer (that
        // would stall every session's video) and never drops an event (a
        // lost key-up is a stuck key). What fills it is bounded upstream:
        // each viewer's input is rate-limited by the hub, and the one
        // consumer (the server's relay) never waits on anything.
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (tcp_tx, tcp_rx) = mpsc::channel(1024);

        let udp_addrs: Vec<SocketAddr> = udp.iter().map(|(_, a)| *a).collect();
        let tcp_addr = tcp.as_ref().map(|(_, a)| *a);
        if let Some((listener, _)) = tcp {
            tokio::spawn(accept_tcp(listener, ips.clone(), tcp_tx.clone()));
        }
        let hub = Hub::new(cfg.hub.clone(), candidates);
        tokio::spawn(run(hub, udp, cmd_rx, frame_rx, tcp_rx, ev_tx.clone()));
        tracing::info!(udp = ?udp_addrs, tcp = ?tcp_addr, "webrtc gateway started");
        Ok(Gateway {
            inner: Arc::new(Inner {
                commands: cmd_tx,
                frames: frame_tx,
                events: ev_tx,
                events_rx: std::sync::Mutex::new(Some(ev_rx)),
                frames_dropped: AtomicU64::new(0),
                last_drop_keyframe_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                udp_addrs,
                tcp_addr,
            }),
        })
    }

    /// The UDP addresses the gateway advertises.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.inner.udp_addrs
    }

    /// The ICE-TCP listener's address, if enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.tcp_addr
    }

    /// Answers a viewer's offer for a session. Errors are the viewer's fault
    /// (4xx) except [`OfferError::Stopped`].
    pub async fn accept_offer(
        &self,
        session_id: &str,
        offer_sdp: &str,
        opts: ViewerOptions,
    ) -> Result<Answer, OfferError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Offer {
                session: session_id.to_string(),
                sdp: offer_sdp.to_string(),
                opts,
                reply,
            })
            .map_err(|_| OfferError::Stopped)?;
        rx.await.map_err(|_| OfferError::Stopped)?
    }

    /// Hands a frame from the agent to the session's viewers. Never blocks:
    /// when the gateway is behind, the frame is dropped and a key frame asked
    /// for, so viewers recover instead of decoding a broken chain.
    pub fn push_frame(&self, session_id: &str, frame: VideoFrame) {
        if self
            .inner
            .frames
            .try_send((session_id.to_string(), frame))
            .is_err()
        {
            self.inner.frames_dropped.fetch_add(1, Ordering::Relaxed);
            // Rate-limited, so an overloaded gateway is not sent key frames,
            // the largest frames there are, on every drop.
            let now_ms = self.inner.epoch.elapsed().as_millis() as u64 + DROP_KEYFRAME_GAP_MS;
            let last = self.inner.last_drop_keyframe_ms.load(Ordering::Relaxed);
            if now_ms >= last + DROP_KEYFRAME_GAP_MS
                && self
                    .inner
                    .last_drop_keyframe_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let _ = self.inner.events.send(GatewayEvent::KeyFrameWanted {
                    session: session_id.to_string(),
                });
            }
        }
    }

    /// Frames dropped because the gateway task was behind.
    pub fn frames_dropped(&self) -> u64 {
        self.inner.frames_dropped.load(Ordering::Relaxed)
    }

    /// The gateway's events, every one in order, for their one consumer:
    /// `None` once taken.
    pub fn events(&self) -> Option<mpsc::UnboundedReceiver<GatewayEvent>> {
        self.inner
            .events_rx
            .lock()
            .expect("events receiver lock")
            .take()
    }

    /// Sends a message to every viewer of a session.
    pub fn send_to_viewers(&self, session_id: &str, msg: ViewerMessage) {
        let _ = self
            .inner
            .commands
            .send(Command::Send(session_id.to_string(), msg));
    }

    /// Closes every viewer of a session.
    pub fn close_session(&self, session_id: &str) {
        let _ = self
            .inner
            .commands
            .send(Command::CloseSession(session_id.to_string()));
    }

    /// Closes one viewer.
    pub fn close_viewer(&self, viewer: ViewerId) {
        let _ = self.inner.commands.send(Command::CloseViewer(viewer));
    }

    /// A viewer's counters, None when it is gone.
    pub async fn viewer_counters(&self, viewer: ViewerId) -> Option<ViewerCounters> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Counters(viewer, tx))
            .ok()?;
        rx.await.ok().flatten()
    }

    /// Every viewer's counters with its session (for the metrics).
    pub async fn all_counters(&self) -> Vec<(String, ViewerId, ViewerCounters)> {
        let (tx, rx) = oneshot::channel();
        if self.inner.commands.send(Command::AllCounters(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

async fn accept_tcp(listener: TcpListener, ips: Vec<IpAddr>, to_hub: mpsc::Sender<TcpIn>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("ice-tcp accept failed: {e}");
                if to_hub.is_closed() {
                    return;
                }
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refusing ice-tcp connection: {MAX_TCP_CONNECTIONS} open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        // Behind 1:1 NAT the connection's local address is not the advertised one.
        let destination = if ips.contains(&local.ip()) || ips.len() != 1 {
            local
        } else {
            SocketAddr::new(ips[0], local.port())
        };
        let to_hub = to_hub.clone();
        tokio::spawn(async move {
            serve_tcp(stream, peer, destination, to_hub).await;
            drop(permit);
        });
    }
}

async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    destination: SocketAddr,
    to_hub: mpsc::Sender<TcpIn>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    if to_hub.send(TcpIn::Open(peer, tx)).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(pkt) = rx.recv().await {
            // RFC 4571: a 16-bit length before every packet.
            let mut buf = Vec::with_capacity(pkt.len() + 2);
            buf.extend_from_slice(&(pkt.len() as u16).to_be_bytes());
            buf.extend_from_slice(&pkt);
            if wr.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    while let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, rd.read_u16()).await {
        let len = usize::from(len);
        if len == 0 || len > MAX_PACKET {
            tracing::debug!(%peer, len, "ice-tcp frame length out of range; closing");
            break;
        }
        let mut data = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, rd.read_exact(&mut data)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let msg = TcpIn::Packet {
            source: peer,
            destination,
            data,
        };
        if to_hub.send(msg).await.is_err() {
            break;
        }
    }
    writer.abort();
    let _ = to_hub.send(TcpIn::Closed(peer)).await;
}

async fn run(
    mut hub: Hub,
    udp: Vec<(UdpSocket, SocketAddr)>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut frames: mpsc::Receiver<(String, VideoFrame)>,
    mut tcp_in: mpsc::Receiver<TcpIn>,
    events: mpsc::UnboundedSender<GatewayEvent>,
) {
    let mut tcp_conns: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let (udp_tx, mut udp_rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let udp: Vec<(Arc<UdpSocket>, SocketAddr)> =
        udp.into_iter().map(|(s, a)| (Arc::new(s), a)).collect();
    // One reader task per socket; with the common single socket it is one.
    let mut readers = Vec::new();
    for (i, (sock, _)) in udp.iter().enumerate() {
        let sock = sock.clone();
        let tx = udp_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_PACKET];
            loop {
                match sock.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        if tx.send((i, from, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!("udp receive failed: {e}"),
                }
            }
        }));
    }
    drop(udp_tx);

    loop {
        let deadline = hub.poll_timeout();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((i, from, data)) = udp_rx.recv() => {
                hub.handle_receive(Protocol::Udp, from, udp[i].1, &data, Instant::now());
            }
            Some(msg) = tcp_in.recv() => match msg {
                TcpIn::Open(peer, tx) => { tcp_conns.insert(peer, tx); }
                TcpIn::Packet { source, destination, data } => {
                    hub.handle_receive(Protocol::Tcp, source, destination, &data, Instant::now());
                }
                TcpIn::Closed(peer) => { tcp_conns.remove(&peer); }
            },
            Some((session, frame)) = frames.recv() => {
                hub.push_frame(&session, &frame, Instant::now());
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                let now = Instant::now();
                match cmd {
                    Command::Offer { session, sdp, opts, reply } => {
                        let _ = reply.send(hub.accept_offer(&session, &sdp, opts, now));
                    }
                    Command::Send(session, msg) => hub.send_to_viewers(&session, &msg, now),
                    Command::CloseSession(session) => hub.close_session(&session, now),
                    Command::CloseViewer(id) => hub.close_viewer(id, now),
                    Command::Counters(id, reply) => { let _ = reply.send(hub.counters(id)); }
                    Command::AllCounters(reply) => { let _ = reply.send(hub.all_counters()); }
                }
            }
            _ = sleep => hub.handle_timeout(Instant::now()),
        }

        for t in hub.take_transmits() {
            match t.proto {
                Protocol::Udp => {
                    let sock = udp
                        .iter()
                        .find(|(_, a)| *a == t.source)
                        .unwrap_or(&udp[0])
                        .0
                        .clone();
                    if let Err(e) = sock.try_send_to(&t.contents, t.destination) {
                        // A full send buffer drops the packet; NACK repairs it.
                        tracing::debug!(dest = %t.destination, "udp send failed: {e}");
                    }
                }
                Protocol::Tcp => {
                    if let Some(tx) = tcp_conns.get(&t.destination) {
                        let _ = tx.try_send(t.contents.to_vec());
                    }
                }
                _ => {}
            }
        }
        for e in hub.take_events() {
            let _ = events.send(e);
        }
    }
    for r in readers {
        r.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const OFFER: &str = include_str!("../tests/fixtures/chromium-offer-default.sdp");

    fn local() -> GatewayConfig {
        GatewayConfig {
            udp_bind: "127.0.0.1:0".parse().unwrap(),
            tcp_bind: Some("127.0.0.1:0".parse().unwrap()),
            public_ips: vec!["127.0.0.1".parse().unwrap()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_bind_failure_names_the_address() {
        // 192.0.2.0/24 is TEST-NET-1: never an address of this host.
        let cfg = GatewayConfig {
            udp_bind: "192.0.2.1:0".parse().unwrap(),
            ..local()
        };
        let err = Gateway::start(cfg).await.unwrap_err();
        assert!(err.to_string().contains("udp 192.0.2.1:0"), "{err}");
    }

    #[tokio::test]
    async fn answers_offers_with_udp_and_tcp_candidates() {
        let gw = Gateway::start(local()).await.unwrap();
        let mut events = gw.events().unwrap();
        assert!(gw.events().is_none(), "the events have one consumer");
        let a = gw
            .accept_offer("s", OFFER, ViewerOptions::default())
            .await
            .unwrap();
        let udp = gw.udp_addrs()[0];
        let tcp = gw.tcp_addr().unwrap();
        assert!(
            a.sdp
                .contains(&format!("127.0.0.1 {} typ host", udp.port())),
            "{}",
            a.sdp
        );
        assert!(
            a.sdp.contains(&format!(
                "127.0.0.1 {} typ host tcptype passive",
                tcp.port()
            )),
            "{}",
            a.sdp
        );
        let first = events.recv().await.unwrap();
        assert!(
            matches!(first, GatewayEvent::ViewerState { .. }),
            "{first:?}"
        );
        assert!(matches!(
            gw.accept_offer("s", "nonsense", ViewerOptions::default())
                .await,
            Err(OfferError::BadSdp(_))
        ));
        assert!(gw.viewer_counters(a.viewer_id).await.is_some());
        gw.close_viewer(a.viewer_id);
        assert!(gw.viewer_counters(a.viewer_id).await.is_none());
    }

    #[tokio::test]
    async fn ice_tcp_closes_connections_with_bad_framing() {
        let gw = Gateway::start(local()).await.unwrap();
        for bad in [&[0u8, 0][..], &[0xff, 0xff][..]] {
            let mut s = TcpStream::connect(gw.tcp_addr().unwrap()).await.unwrap();
            s.write_all(bad).await.unwrap();
            let mut buf = [0u8; 16];
            // The gateway closes: read returns end of stream, not a timeout.
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("connection closed by the gateway")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
    }
}

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
use tokio::sync::{broadcast, mpsc, oneshot};

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
    /// Capacity of the event channel; a lagging subscriber loses the oldest.
    pub event_capacity: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            udp_bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 3478),
            tcp_bind: None,
            public_ips: Vec::new(),
            advertise_udp: true,
            hub: HubConfig::default(),
            event_capacity: 4096,
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
    events: broadcast::Sender<GatewayEvent>,
    frames_dropped: AtomicU64,
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
        let (ev_tx, _) = broadcast::channel(cfg.event_capacity.max(16));
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
                frames_dropped: AtomicU64::new(0),
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
            let _ = self.inner.events.send(GatewayEvent::KeyFrameWanted {
                session: session_id.to_string(),
            });
        }
    }

    /// Frames dropped because the gateway task was behind.
    pub fn frames_dropped(&self) -> u64 {
        self.inner.frames_dropped.load(Ordering::Relaxed)
    }

    /// Subscribes to the gateway's events.
    pub fn events(&self) -> broadcast::Receiver<GatewayEvent> {
        self.inner.events.subscribe()
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
}

async fn accept_tcp(listener: TcpListener, ips: Vec<IpAddr>, to_hub: mpsc::Sender<TcpIn>) {
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
        tokio::spawn(serve_tcp(stream, peer, destination, to_hub.clone()));
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
    while let Ok(len) = rd.read_u16().await {
        let len = usize::from(len);
        if len == 0 || len > MAX_PACKET {
            tracing::debug!(%peer, len, "ice-tcp frame length out of range; closing");
            break;
        }
        let mut data = vec![0u8; len];
        if rd.read_exact(&mut data).await.is_err() {
            break;
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
    events: broadcast::Sender<GatewayEvent>,
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

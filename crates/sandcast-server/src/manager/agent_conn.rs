//! One session's agent channel: the listener on its agent socket, each
//! connection's peer check, hello and role, and the bounds that keep a
//! hostile session from costing the server more than configured.
//!
//! Everything that arrives here comes from inside the session and may be
//! written by the page or the launch command (they can ptrace the agent), so:
//! the peer's uid comes from the kernel (`SO_PEERCRED`), never from the hello;
//! at most `pending` connections wait for their hello (more are closed as they
//! arrive); a session has one control connection, ever, and one video
//! connection at a time; a stream connection is taken only for an id the
//! server asked for; and every announced frame is checked against its
//! connection's share of the session's buffer budget before a byte of it is
//! buffered. Decisions go to the session's task, which owns the state.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use sandcast_proto::{
    Frame, FrameCodec, FrameError, MAX_FRAME_LEN, MAX_JSON_LEN, Message, PROTOCOL_VERSION, Role,
    SessionConfig,
};
use sandcast_webrtc::Gateway;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};

use crate::config::AgentChannelLimits;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest hello: a few fields.
pub const HELLO_MAX: usize = 4096;
/// How long a new video connection waits for the previous one to be gone
/// (the agent reopens it when video restarts, and the old one's end may be
/// seen a moment after the new one's hello).
const VIDEO_HANDOVER: Duration = Duration::from_secs(1);
/// Messages queued for the agent's control connection writer.
const CONTROL_QUEUE: usize = 64;

/// What the connections tell the session's task.
pub enum FromAgent {
    /// A control hello: the task answers with the configuration, or `None`
    /// when the session already has (or had) a control connection.
    ControlHello {
        /// The agent's version, as it claims (for the log only).
        version: String,
        /// The answer.
        reply: oneshot::Sender<Option<SessionConfig>>,
    },
    /// The control connection is up: messages for the agent go here.
    ControlUp(mpsc::Sender<Message>),
    /// A message on the control connection (boxed: a configuration is large).
    Message(Box<Message>),
    /// A stream connection for `id`: the task hands over the waiter that
    /// asked for it, or `None` when nobody did.
    ClaimStream {
        /// The id in the hello.
        id: u64,
        /// The answer.
        reply: oneshot::Sender<Option<oneshot::Sender<UnixStream>>>,
    },
    /// A connection was refused or failed; for the session's log.
    Refused(String),
}

/// Byte and connection limits of one session's channel, derived from the
/// configuration.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The session's whole buffer budget in bytes.
    pub budget: usize,
    /// Largest control message.
    pub control_max: usize,
    /// Largest video frame the budget allows (the display may allow less).
    pub video_max: usize,
    /// Connections waiting for their hello.
    pub pending: usize,
    /// Stream connections asked for and not yet arrived.
    pub streams: usize,
}

impl Bounds {
    /// The bounds for `limits`: hellos take `HELLO_MAX` each, control
    /// messages a quarter of the rest, video frames the remainder; their sum
    /// never exceeds the budget, so a legitimate agent never runs out.
    pub fn new(limits: &AgentChannelLimits) -> Bounds {
        let budget = limits.buffer_kib as usize * 1024;
        let pending = limits.pending as usize;
        let rest = budget.saturating_sub(pending * (HELLO_MAX + 4));
        let control_max = (rest / 4).min(MAX_JSON_LEN + 1);
        let video_max = (rest - control_max - 8).min(MAX_FRAME_LEN);
        Bounds {
            budget,
            control_max,
            video_max,
            pending,
            streams: limits.streams as usize,
        }
    }
}

/// The largest encoded frame a display of `width × height` can need: its
/// uncompressed I420 picture (1.5 bytes a pixel) and an eighth more for
/// headers and a coder's worst case, or `video_max` if that is less.
pub fn video_frame_cap(width: u32, height: u32, video_max: usize) -> usize {
    let raw = width as usize * height as usize * 3 / 2;
    (raw + raw / 8 + 4096).min(video_max)
}

/// The frame size limit of one connection.
enum Limit {
    Fixed(usize),
    /// The session's task updates it when the display may grow.
    Watch(watch::Receiver<usize>),
}

/// [`FrameCodec`] with the size limit checked and the frame charged to the
/// session's budget as soon as its length is read, before it is buffered.
pub struct BoundedCodec {
    limit: Limit,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl BoundedCodec {
    fn new(limit: Limit, budget: Arc<Semaphore>) -> BoundedCodec {
        BoundedCodec {
            limit,
            budget,
            held: None,
        }
    }

    fn max(&self) -> usize {
        match &self.limit {
            Limit::Fixed(n) => *n,
            Limit::Watch(rx) => *rx.borrow(),
        }
    }
}

impl Decoder for BoundedCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() >= 4 && self.held.is_none() {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            let max = self.max();
            if len > max {
                return Err(FrameError::TooLong { len, max });
            }
            let permit = u32::try_from(len + 4)
                .ok()
                .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok())
                .ok_or_else(|| {
                    FrameError::Io(std::io::Error::other(format!(
                        "a frame of {len} bytes exceeds what is left of the session's agent channel buffer"
                    )))
                })?;
            self.held = Some(permit);
        }
        let frame = FrameCodec.decode(src)?;
        if frame.is_some() {
            self.held = None;
        }
        Ok(frame)
    }
}

/// What every connection of one session shares.
pub struct Channel {
    /// Session id (for logs).
    pub id: String,
    /// The uid every connection must come from; `None`: no check.
    pub peer_uid: Option<u32>,
    /// The bounds.
    pub bounds: Bounds,
    /// Bytes left of the session's buffer budget.
    pub budget: Arc<Semaphore>,
    /// Slots for connections waiting for their hello.
    pub pending: Arc<Semaphore>,
    /// The one video connection.
    pub video: Arc<Semaphore>,
    /// The largest video frame the session's display can need now.
    pub video_cap: watch::Receiver<usize>,
    /// To the session's task.
    pub to_session: mpsc::Sender<FromAgent>,
    /// Where video frames go.
    pub gateway: Option<Gateway>,
    /// The session's recording, if it records: frames are offered to it
    /// first, never waiting.
    pub recorder: Option<crate::recording::Sink>,
    /// Viewers of the WebSocket video stream: a frame is a reference, and a
    /// viewer that falls behind misses frames rather than holding any up.
    pub video_sockets: tokio::sync::broadcast::Sender<sandcast_proto::VideoFrame>,
}

impl Channel {
    fn refused(&self, why: String) {
        // Never waits: a flood of refusals must not hold up the listener.
        let _ = self.to_session.try_send(FromAgent::Refused(why));
    }
}

/// Accepts the agent's connections for one session until `ended`.
pub async fn accept_loop(
    ch: Arc<Channel>,
    listener: UnixListener,
    mut ended: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            c = listener.accept() => c,
            _ = ended.wait_for(|e| *e) => return,
        };
        let conn = match accepted {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                ch.refused(format!("accepting an agent connection: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Err(why) = check_peer(&conn, ch.peer_uid) {
            ch.refused(why);
            continue;
        }
        let Ok(permit) = ch.pending.clone().try_acquire_owned() else {
            // Closed at once: waiting connections are bounded.
            continue;
        };
        let ch = ch.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(&ch, conn, permit).await {
                ch.refused(format!("agent connection: {e}"));
            }
        });
    }
}

/// Refuses a peer whose uid (from the kernel) is not `expected`.
pub fn check_peer(conn: &UnixStream, expected: Option<u32>) -> Result<(), String> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let cred = conn
        .peer_cred()
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    if cred.uid() == expected {
        Ok(())
    } else {
        Err(format!(
            "refused a connection from uid {} (pid {:?}): the session's agent runs as uid {expected}",
            cred.uid(),
            cred.pid()
        ))
    }
}

async fn handle(
    ch: &Channel,
    mut conn: UnixStream,
    pending: OwnedSemaphorePermit,
) -> Result<(), String> {
    let mut read = FramedRead::new(
        &mut conn,
        BoundedCodec::new(Limit::Fixed(HELLO_MAX), ch.budget.clone()),
    );
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read.next()).await {
        Ok(Some(Ok(Frame::Message(Message::Hello(h))))) => h,
        Ok(Some(Ok(_))) => return Err("the first message was not a hello".into()),
        Ok(Some(Err(e))) => return Err(format!("bad hello: {e}")),
        Ok(None) => return Ok(()),
        Err(_) => return Err(format!("no hello within {} s", HELLO_TIMEOUT.as_secs())),
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
        // Each holds its waiting slot until it is admitted or refused, so
        // connections queued for a role are bounded too.
        Role::Control => control(ch, conn, hello.agent_version, pending).await,
        Role::Video => video(ch, conn, pending).await,
        Role::Stream { id } => stream(ch, conn, id, pending).await,
    }
}

async fn ask<T>(ch: &Channel, make: impl FnOnce(oneshot::Sender<T>) -> FromAgent) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    ch.to_session.send(make(tx)).await.ok()?;
    rx.await.ok()
}

async fn control(
    ch: &Channel,
    mut conn: UnixStream,
    version: String,
    pending: OwnedSemaphorePermit,
) -> Result<(), String> {
    let config = ask(ch, |reply| FromAgent::ControlHello { version, reply })
        .await
        .flatten();
    drop(pending);
    let Some(config) = config else {
        return reject(
            &mut conn,
            "the session already has a control connection".into(),
        )
        .await;
    };
    welcome(&mut conn).await?;
    conn_write(&mut conn, &Message::Config(Box::new(config))).await?;
    let (r, w) = conn.into_split();
    let (tx, mut rx) = mpsc::channel::<Message>(CONTROL_QUEUE);
    if ch.to_session.send(FromAgent::ControlUp(tx)).await.is_err() {
        return Ok(());
    }
    tokio::spawn(async move {
        let mut sink = FramedWrite::new(w, FrameCodec);
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut frames = FramedRead::new(
        r,
        BoundedCodec::new(Limit::Fixed(ch.bounds.control_max), ch.budget.clone()),
    );
    while let Some(frame) = frames.next().await {
        match frame {
            // Waits when the session's task is behind: the agent is slowed,
            // nothing is buffered here.
            Ok(Frame::Message(msg)) => {
                if ch
                    .to_session
                    .send(FromAgent::Message(Box::new(msg)))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            Ok(Frame::Video(_)) => {}
            Err(e) => return Err(format!("control connection: {e}")),
        }
    }
    Ok(())
}

async fn video(
    ch: &Channel,
    mut conn: UnixStream,
    pending: OwnedSemaphorePermit,
) -> Result<(), String> {
    let slot = tokio::time::timeout(VIDEO_HANDOVER, ch.video.clone().acquire_owned()).await;
    drop(pending);
    let Ok(Ok(_slot)) = slot else {
        return reject(
            &mut conn,
            "the session already has a video connection".into(),
        )
        .await;
    };
    welcome(&mut conn).await?;
    let mut frames = FramedRead::new(
        conn,
        BoundedCodec::new(Limit::Watch(ch.video_cap.clone()), ch.budget.clone()),
    );
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(Frame::Video(v)) => {
                if let Some(r) = &ch.recorder {
                    r.push(&v);
                }
                if ch.video_sockets.receiver_count() > 0 {
                    let _ = ch.video_sockets.send(v.clone());
                }
                if let Some(gw) = &ch.gateway {
                    gw.push_frame(&ch.id, v);
                }
            }
            Ok(Frame::Message(_)) => {}
            Err(e) => return Err(format!("video connection: {e}")),
        }
    }
    Ok(())
}

async fn stream(
    ch: &Channel,
    mut conn: UnixStream,
    id: u64,
    pending: OwnedSemaphorePermit,
) -> Result<(), String> {
    let waiter = ask(ch, |reply| FromAgent::ClaimStream { id, reply })
        .await
        .flatten();
    drop(pending);
    let Some(waiter) = waiter else {
        return reject(&mut conn, format!("no stream {id} was asked for")).await;
    };
    welcome(&mut conn).await?;
    let _ = waiter.send(conn);
    Ok(())
}

async fn welcome(conn: &mut UnixStream) -> Result<(), String> {
    conn_write(
        conn,
        &Message::Welcome {
            protocol: PROTOCOL_VERSION,
        },
    )
    .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn budget(n: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(n))
    }

    #[test]
    fn an_oversized_announcement_is_refused_before_anything_is_buffered() {
        let b = budget(1 << 20);
        let mut c = BoundedCodec::new(Limit::Fixed(4096), b.clone());
        let mut src = BytesMut::new();
        src.put_u32(8 * 1024 * 1024);
        let e = c.decode(&mut src).unwrap_err();
        assert!(matches!(e, FrameError::TooLong { max: 4096, .. }), "{e}");
        assert!(src.capacity() < 4096, "buffer grew to {}", src.capacity());
        assert_eq!(b.available_permits(), 1 << 20);
    }

    #[test]
    fn a_frame_is_charged_to_the_budget_until_it_is_whole() {
        let b = budget(10_000);
        let mut c = BoundedCodec::new(Limit::Fixed(8000), b.clone());
        let msg = sandcast_proto::encode_message(&Message::Ping { seq: 1 });
        let mut src = BytesMut::from(&msg[..3]);
        assert!(c.decode(&mut src).unwrap().is_none());
        assert_eq!(
            b.available_permits(),
            10_000,
            "nothing charged before the length"
        );
        src.extend_from_slice(&msg[3..msg.len() - 1]);
        assert!(c.decode(&mut src).unwrap().is_none());
        assert_eq!(b.available_permits(), 10_000 - msg.len());
        src.extend_from_slice(&msg[msg.len() - 1..]);
        assert_eq!(
            c.decode(&mut src).unwrap(),
            Some(Frame::Message(Message::Ping { seq: 1 }))
        );
        assert_eq!(b.available_permits(), 10_000);
    }

    #[test]
    fn frames_of_all_connections_share_one_budget() {
        let b = budget(6000);
        let mut one = BoundedCodec::new(Limit::Fixed(5000), b.clone());
        let mut two = BoundedCodec::new(Limit::Fixed(5000), b.clone());
        let mut a = BytesMut::new();
        a.put_u32(4000);
        assert!(one.decode(&mut a).unwrap().is_none());
        let mut other = BytesMut::new();
        other.put_u32(4000);
        assert!(
            two.decode(&mut other).is_err(),
            "the second 4000 fit in 6000"
        );
        drop(one);
        assert_eq!(
            b.available_permits(),
            6000,
            "a closed connection returns its charge"
        );
    }

    #[test]
    fn the_video_limit_follows_the_display() {
        let b = Bounds::new(&AgentChannelLimits::default());
        assert!(b.control_max + b.video_max + b.pending * (HELLO_MAX + 4) <= b.budget);
        let hd = video_frame_cap(1280, 720, b.video_max);
        assert!(hd > 1280 * 720 * 3 / 2 && hd < 2 << 20, "{hd}");
        assert_eq!(video_frame_cap(3840, 2160, b.video_max), b.video_max);
    }

    #[tokio::test]
    async fn a_peer_of_another_uid_is_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        // SAFETY: getuid(2) cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(check_peer(&a, Some(me)).is_ok());
        assert!(check_peer(&a, None).is_ok());
        let e = check_peer(&a, Some(me.wrapping_add(1))).unwrap_err();
        assert!(e.contains(&format!("from uid {me}")), "{e}");
    }
}

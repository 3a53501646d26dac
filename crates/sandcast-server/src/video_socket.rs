//! The video stream over a WebSocket on the server's HTTP port: the path for
//! a viewer that can reach nothing but that port (UDP and the ICE-TCP port
//! blocked, as on many corporate networks). The same encoded frames WebRTC
//! viewers get, one per binary message, decoded in the page with WebCodecs;
//! input goes over the viewer's input socket (`/viewer/{id}/input`), as
//! beside noVNC.
//!
//! No jitter buffer, no pacing: a frame is sent as soon as the agent hands
//! it over. A viewer that reads too slowly misses frames (the session's
//! queue of them is short and never waits for it) and then waits for the
//! next key frame, which it asks for. A viewer that acknowledges frames
//! (4 bytes: the sequence number it received) is not sent more while its
//! oldest unacknowledged frame is older than [`MAX_IN_FLIGHT`]: on a link
//! slower than the stream, the kernel's and the network's buffers would
//! otherwise fill and the picture fall seconds behind.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use sandcast_proto::{VideoFrame, VideoHeader};
use tokio::sync::broadcast::error::RecvError;

use crate::api::{AppState, SessionPath};
use crate::error::{ApiError, ErrorBody};
use crate::manager::{Live, VideoSocket};
use crate::tokens::{Grant, session_is};
use crate::viewer::{TokenQuery, authorize};

/// Bytes of the header in front of each frame's bitstream.
pub const HEADER_LEN: usize = sandcast_proto::VIDEO_HEADER_LEN;

/// How long one frame may take to reach the socket's buffer before the
/// viewer counts as gone: one that stopped reading must not hold the
/// stream's task (and its session's viewer count) forever.
const SEND_STALL: Duration = Duration::from_secs(10);

/// The largest message a viewer may send on this socket (acknowledgements
/// and a close; anything bigger ends the connection).
const MAX_VIEWER_MESSAGE: usize = 1024;

/// The longest a frame may wait for its acknowledgement before no more are
/// sent: more than that in flight is a link slower than the stream.
pub const MAX_IN_FLIGHT: Duration = Duration::from_millis(250);

/// The session's video as binary WebSocket messages, for a viewer that
/// cannot use WebRTC: one encoded frame per message, starting at a key
/// frame.
///
/// A WebSocket upgrade. Each message is an 18-byte header, big-endian,
/// then the frame's bitstream: byte 0 the codec (1: H.264 constrained
/// baseline, Annex B; 2: VP8), byte 1 flags (bit 0: a key frame), bytes
/// 2-3 width and 4-5 height in pixels, bytes 6-9 the frame's sequence
/// number (a gap: frames were skipped), bytes 10-17 when the screen was
/// captured, in microseconds since the Unix epoch by the session's clock.
/// The codec is the one WebRTC viewers of the session negotiated when
/// there are any, else H.264. The viewer may acknowledge each frame with a
/// 4-byte binary message, its sequence number: then no more frames are sent
/// while the oldest unacknowledged one is over 250 ms old, and the stream
/// resumes at a key frame (a slow link shows fewer pictures instead of
/// falling behind). Its input goes over `/viewer/{id}/input`. It counts as
/// a viewer: the session is watched and not idle while it is open.
#[utoipa::path(
    get,
    path = "/viewer/{id}/video",
    tag = "viewer",
    security(("viewer_token_query" = []), ("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; encoded frames in binary messages."),
        (status = 400, description = "`id` is not a session id (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is neither `starting` nor `ready`, or already has the most viewers on this stream allowed (16).", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn video(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (row, grant) = authorize(&state, &id, &headers, q.token())?;
    let live = match state.manager.live(&id) {
        Some(l) if row.state.takes_stream_viewers() => l,
        _ => return Err(session_is(&row)),
    };
    let slot = live.video_slot().map_err(|max| {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("the session already has the most viewers on the video stream allowed ({max}); close one"),
        )
    })?;
    Ok(ws
        .max_message_size(MAX_VIEWER_MESSAGE)
        .on_upgrade(move |socket| async move {
            pump(socket, live, grant).await;
            drop(slot);
        }))
}

/// The message of one frame: its header, then its bitstream.
/// The viewer gets the agent channel's own header (`VideoHeader::encode`),
/// so there is one layout to keep; the test below pins it to this route's
/// documentation.
pub fn message(frame: &VideoFrame) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + frame.data.len());
    out.extend_from_slice(&frame.header.encode());
    out.extend_from_slice(&frame.data);
    Bytes::from(out)
}

/// Which frames one viewer gets: none until a key frame, and none again
/// after it missed some until the next key frame (a delta frame on a
/// picture it does not have would decode as garbage).
#[derive(Debug)]
pub struct KeyGate {
    waiting: bool,
}

impl Default for KeyGate {
    fn default() -> Self {
        KeyGate { waiting: true }
    }
}

impl KeyGate {
    /// Whether the viewer gets this frame.
    pub fn pass(&mut self, h: &VideoHeader) -> bool {
        if h.keyframe {
            self.waiting = false;
        }
        !self.waiting
    }

    /// The viewer missed frames: it waits for a key frame again.
    pub fn missed(&mut self) {
        self.waiting = true;
    }

    /// Whether the viewer waits for a key frame.
    pub fn waiting(&self) -> bool {
        self.waiting
    }
}

/// The frames sent to a viewer and not yet acknowledged. Nothing is kept
/// for a viewer that never acknowledges.
#[derive(Debug, Default)]
pub struct InFlight {
    acks: bool,
    sent: VecDeque<(u32, Instant)>,
}

impl InFlight {
    /// Most frames remembered (a viewer acknowledging far behind is full
    /// long before).
    const MAX: usize = 1024;

    /// Frame `seq` was sent at `now`.
    pub fn sent(&mut self, seq: u32, now: Instant) {
        if self.acks {
            if self.sent.len() == Self::MAX {
                self.sent.pop_front();
            }
            self.sent.push_back((seq, now));
        }
    }

    /// The viewer received every frame up to `seq`.
    pub fn acked(&mut self, seq: u32) {
        self.acks = true;
        // Sequence numbers wrap: `a` is at or before `seq` when it is less
        // than half the space behind it.
        while self
            .sent
            .front()
            .is_some_and(|(a, _)| seq.wrapping_sub(*a) < 1 << 31)
        {
            self.sent.pop_front();
        }
    }

    /// Whether the oldest unacknowledged frame waited longer than
    /// [`MAX_IN_FLIGHT`].
    pub fn full(&self, now: Instant) -> bool {
        self.sent
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > MAX_IN_FLIGHT)
    }
}

/// Sends the session's frames until the viewer closes, stops reading, the
/// session ends or the token stops opening it.
async fn pump(mut socket: WebSocket, live: Arc<Live>, grant: Grant) {
    // Subscribed before the session starts the encoder for it, so the
    // opening key frame cannot pass before the subscription.
    let mut frames = live.video_frames();
    live.video_socket(VideoSocket::Joined).await;
    let mut ended = live.ended();
    let lost = live.lost(&grant);
    tokio::pin!(lost);
    let mut gate = KeyGate::default();
    let mut in_flight = InFlight::default();
    let mut freeze = sandcast_webrtc::freeze::FreezeMeter::default();
    let counts = live.stream();
    let skipped = |freeze: &mut sandcast_webrtc::freeze::FreezeMeter| {
        freeze.skipped();
        counts.frames_skipped.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                Ok(frame) => {
                    let now = Instant::now();
                    if in_flight.full(now) {
                        // The link is full: skip, and resume at a key frame,
                        // asked for when the skipping starts and whenever
                        // one is skipped (none would come by itself).
                        skipped(&mut freeze);
                        let was_waiting = gate.waiting();
                        gate.missed();
                        if !was_waiting || frame.header.keyframe {
                            live.video_socket(VideoSocket::Lagged).await;
                        }
                        continue;
                    }
                    if !gate.pass(&frame.header) {
                        skipped(&mut freeze);
                        continue;
                    }
                    let msg = message(&frame);
                    let bytes = frame.data.len() as u64;
                    let sent = tokio::time::timeout(SEND_STALL, socket.send(WsMessage::Binary(msg))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                    in_flight.sent(frame.header.seq, now);
                    counts.frames_sent.fetch_add(1, Ordering::Relaxed);
                    counts.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                    if let Some(gap) = freeze.sent(now) {
                        counts.freezes.fetch_add(1, Ordering::Relaxed);
                        counts.freeze_ms.fetch_add(gap.as_millis() as u64, Ordering::Relaxed);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    freeze.skipped();
                    counts.frames_skipped.fetch_add(n, Ordering::Relaxed);
                    gate.missed();
                    live.video_socket(VideoSocket::Lagged).await;
                }
                Err(RecvError::Closed) => break,
            },
            m = socket.recv() => match m {
                Some(Ok(WsMessage::Binary(b))) if b.len() == 4 => {
                    in_flight.acked(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            // Its guard must not live on in the select's output.
            () = async { let _ = ended.wait_for(|e| *e).await; } => break,
            () = &mut lost => break,
        }
    }
    live.video_socket(VideoSocket::Left).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcast_proto::Codec;

    fn frame(codec: Codec, keyframe: bool, seq: u32) -> VideoFrame {
        VideoFrame {
            header: VideoHeader {
                codec,
                keyframe,
                width: 1280,
                height: 720,
                seq,
                capture_us: 1_765_000_000_123_456,
            },
            data: Bytes::from_static(&[0, 0, 0, 1, 0x65, 0xaa]),
        }
    }

    #[test]
    fn a_message_is_the_documented_header_then_the_bitstream() {
        let m = message(&frame(Codec::H264, true, 0x0102_0304));
        assert_eq!(m.len(), HEADER_LEN + 6);
        assert_eq!(m[0], 1, "H.264");
        assert_eq!(m[1], 1, "key frame");
        assert_eq!(u16::from_be_bytes([m[2], m[3]]), 1280);
        assert_eq!(u16::from_be_bytes([m[4], m[5]]), 720);
        assert_eq!(&m[6..10], &[1, 2, 3, 4]);
        assert_eq!(
            u64::from_be_bytes(m[10..18].try_into().unwrap()),
            1_765_000_000_123_456
        );
        assert_eq!(&m[HEADER_LEN..], &[0, 0, 0, 1, 0x65, 0xaa]);
        let vp8 = message(&frame(Codec::Vp8, false, 7));
        assert_eq!((vp8[0], vp8[1]), (2, 0));
    }

    #[test]
    fn frames_wait_for_their_acknowledgement_only_for_a_viewer_that_sends_them() {
        let t0 = Instant::now();
        let later = t0 + MAX_IN_FLIGHT + Duration::from_millis(1);
        let mut f = InFlight::default();
        f.sent(1, t0);
        assert!(
            !f.full(later),
            "a viewer that never acknowledges is never held"
        );
        f.acked(1);
        f.sent(2, t0);
        f.sent(3, t0 + Duration::from_millis(100));
        assert!(!f.full(t0 + Duration::from_millis(200)));
        assert!(f.full(later), "frame 2 waited too long");
        f.acked(2);
        assert!(!f.full(later), "frame 3 is younger");
        f.acked(3);
        assert!(!f.full(t0 + Duration::from_secs(9)), "all acknowledged");
        // Across the wrap of the sequence numbers.
        f.sent(u32::MAX, t0);
        f.sent(0, t0);
        f.acked(u32::MAX);
        assert!(f.full(later), "frame 0 (after the wrap) still waits");
        f.acked(0);
        assert!(!f.full(later));
    }

    #[test]
    fn a_viewer_starts_at_a_key_frame_and_waits_for_one_after_missing_frames() {
        let mut gate = KeyGate::default();
        assert!(!gate.pass(&frame(Codec::H264, false, 1).header));
        assert!(gate.pass(&frame(Codec::H264, true, 2).header));
        assert!(gate.pass(&frame(Codec::H264, false, 3).header));
        gate.missed();
        assert!(!gate.pass(&frame(Codec::H264, false, 9).header));
        assert!(gate.pass(&frame(Codec::H264, true, 10).header));
        assert!(gate.pass(&frame(Codec::H264, false, 11).header));
    }
}

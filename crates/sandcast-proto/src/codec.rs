//! Length-prefixed framing, sans-IO.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::message::Message;
use crate::video::VideoFrame;

/// Largest frame accepted or sent (kind byte and payload). Key frames at the
/// largest display size stay well below this.
pub const MAX_FRAME_LEN: usize = 8 * 1024 * 1024;

/// Largest JSON control message. Control messages are small; a larger one is
/// a bug or an attack.
pub const MAX_JSON_LEN: usize = 1024 * 1024;

/// Most room reserved for a frame beyond the bytes already buffered.
const RESERVE_AHEAD: usize = 64 * 1024;

const KIND_JSON: u8 = 1;
const KIND_VIDEO: u8 = 2;
const HEADER_LEN: usize = 5;

/// One decoded frame of the agent channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A control message.
    Message(Message),
    /// An encoded video frame with its header.
    Video(VideoFrame),
}

/// Why a frame could not be decoded or encoded. Every variant is fatal for
/// the connection: framing cannot be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the limit for its kind.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Announced length.
        len: usize,
        /// Limit that applies.
        max: usize,
    },
    /// A zero-length frame has no kind byte.
    #[error("empty frame")]
    Empty,
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The JSON payload did not parse as a [`Message`].
    #[error("bad control message: {0}")]
    Json(#[from] serde_json::Error),
    /// The video payload is shorter than its header or has a bad codec.
    #[error("bad video frame: {0}")]
    Video(String),
    /// The connection ended in the middle of a frame.
    #[error("connection closed inside a frame ({0} bytes pending)")]
    Truncated(usize),
    /// An I/O error from the transport.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encoder and decoder for [`Frame`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        // Check the kind-specific limit as soon as the kind byte is here, so an
        // oversized JSON frame is refused before it is buffered.
        if src.len() >= HEADER_LEN {
            let kind = src[4];
            match kind {
                KIND_JSON if len - 1 > MAX_JSON_LEN => {
                    return Err(FrameError::TooLong {
                        len,
                        max: MAX_JSON_LEN,
                    });
                }
                KIND_JSON | KIND_VIDEO => {}
                other => return Err(FrameError::UnknownKind(other)),
            }
        }
        if src.len() < 4 + len {
            // Room grows with the bytes that arrive, not with the length
            // announced: a peer that announces the largest frame and sends
            // five bytes costs a few KiB, not 8 MiB per connection. Doubling
            // keeps a large frame's copies to a few.
            let missing = 4 + len - src.len();
            src.reserve(missing.min(src.len().max(RESERVE_AHEAD)));
            return Ok(None);
        }
        src.advance(4);
        let kind = src.get_u8();
        let payload = src.split_to(len - 1).freeze();
        match kind {
            KIND_JSON => Ok(Some(Frame::Message(serde_json::from_slice(&payload)?))),
            KIND_VIDEO => Ok(Some(Frame::Video(VideoFrame::decode(payload)?))),
            other => Err(FrameError::UnknownKind(other)),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(buf.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Message(msg) => self.encode(msg, dst),
            Frame::Video(video) => self.encode(video, dst),
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let json = serde_json::to_vec(&msg)?;
        if json.len() > MAX_JSON_LEN {
            return Err(FrameError::TooLong {
                len: json.len() + 1,
                max: MAX_JSON_LEN,
            });
        }
        put_frame(dst, KIND_JSON, &[&json]);
        Ok(())
    }
}

impl Encoder<VideoFrame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, video: VideoFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let header = video.header.encode();
        let len = 1 + header.len() + video.data.len();
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        put_frame(dst, KIND_VIDEO, &[&header, &video.data]);
        Ok(())
    }
}

fn put_frame(dst: &mut BytesMut, kind: u8, parts: &[&[u8]]) {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    dst.reserve(4 + len);
    dst.put_u32(len as u32);
    dst.put_u8(kind);
    for part in parts {
        dst.put_slice(part);
    }
}

/// Encodes one message into a fresh buffer; handy for tests and one-shot writes.
pub fn encode_message(msg: &Message) -> Bytes {
    let mut buf = BytesMut::new();
    FrameCodec
        .encode(msg.clone(), &mut buf)
        .expect("a control message fits in a frame");
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Hello, Role};
    use crate::video::{Codec, VideoHeader};

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol: crate::PROTOCOL_VERSION,
            role: Role::Control,
            agent_version: "test".into(),
        })
    }

    #[test]
    fn message_round_trips() {
        let mut buf = BytesMut::new();
        FrameCodec.encode(hello(), &mut buf).unwrap();
        let frame = FrameCodec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame, Frame::Message(hello()));
        assert!(buf.is_empty());
    }

    #[test]
    fn video_round_trips() {
        let video = VideoFrame {
            header: VideoHeader {
                codec: Codec::H264,
                keyframe: true,
                width: 1280,
                height: 720,
                seq: 7,
                capture_us: 1_700_000_000_123_456,
            },
            data: Bytes::from_static(&[0, 0, 0, 1, 0x67, 0x42]),
        };
        let mut buf = BytesMut::new();
        FrameCodec.encode(video.clone(), &mut buf).unwrap();
        assert_eq!(
            FrameCodec.decode(&mut buf).unwrap(),
            Some(Frame::Video(video))
        );
    }

    #[test]
    fn partial_input_waits_for_more_bytes() {
        let full = encode_message(&hello());
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(
                FrameCodec.decode(&mut buf).unwrap().is_none(),
                "cut at {cut}"
            );
            buf.extend_from_slice(&full[cut..]);
            assert!(
                FrameCodec.decode(&mut buf).unwrap().is_some(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut buf = BytesMut::new();
        for _ in 0..3 {
            buf.extend_from_slice(&encode_message(&hello()));
        }
        for _ in 0..3 {
            assert!(FrameCodec.decode(&mut buf).unwrap().is_some());
        }
        assert!(FrameCodec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let full = encode_message(&hello());
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert!(matches!(
            FrameCodec.decode_eof(&mut buf),
            Err(FrameError::Truncated(_))
        ));
        let mut empty = BytesMut::new();
        assert!(FrameCodec.decode_eof(&mut empty).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_is_refused_from_its_prefix() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_FRAME_LEN + 1) as u32);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn oversized_json_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32((MAX_JSON_LEN + 2) as u32);
        buf.put_u8(KIND_JSON);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::TooLong {
                max: MAX_JSON_LEN,
                ..
            })
        ));
    }

    #[test]
    fn an_announced_length_is_not_reserved_before_its_bytes_arrive() {
        // The largest video frame announced, five bytes sent: this used to
        // reserve all 8 MiB at once.
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME_LEN as u32);
        buf.put_u8(KIND_VIDEO);
        assert!(FrameCodec.decode(&mut buf).unwrap().is_none());
        assert!(
            buf.capacity() <= 2 * RESERVE_AHEAD,
            "{} bytes reserved for 5 received",
            buf.capacity()
        );
        // The frame still arrives whole, however it is cut.
        let data = vec![7u8; 3 * RESERVE_AHEAD];
        let video = VideoFrame {
            header: VideoHeader {
                codec: Codec::Vp8,
                keyframe: false,
                width: 2,
                height: 2,
                seq: 1,
                capture_us: 1,
            },
            data: Bytes::from(data),
        };
        let mut whole = BytesMut::new();
        FrameCodec.encode(video.clone(), &mut whole).unwrap();
        let mut buf = BytesMut::new();
        for chunk in whole.chunks(10_000) {
            assert!(FrameCodec.decode(&mut buf).unwrap().is_none());
            buf.extend_from_slice(chunk);
        }
        assert_eq!(
            FrameCodec.decode(&mut buf).unwrap(),
            Some(Frame::Video(video))
        );
    }

    #[test]
    fn empty_and_unknown_frames_are_errors() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::Empty)
        ));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 99, 0][..]);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::UnknownKind(99))
        ));
    }

    #[test]
    fn garbage_json_is_an_error() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, KIND_JSON, &[b"{not json"]);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn short_video_header_is_an_error() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, KIND_VIDEO, &[&[1, 2, 3]]);
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::Video(_))
        ));
    }

    mod props {
        use super::*;
        use crate::message::{LogLine, LogStream};
        use crate::testing::{cuts, json_value, split_at};
        use crate::{InputEvent, PointerButton};
        use proptest::prelude::*;

        const WORDS: &[&str] = &[
            "type",
            "hello",
            "welcome",
            "config",
            "log",
            "clipboard",
            "resize",
            "video",
            "input",
            "protocol",
            "role",
            "control",
            "text",
            "width",
            "height",
            "op",
            "start",
            "codec",
            "h264",
            "bitrate_bps",
            "seq",
            "ping",
        ];

        /// Feeds `pieces` one read at a time, decoding what it can after each,
        /// as `Framed` does; stops at the first error, which ends a connection.
        fn feed(pieces: &[&[u8]]) -> (Vec<Frame>, Option<FrameError>, BytesMut) {
            let mut buf = BytesMut::new();
            let mut frames = Vec::new();
            for piece in pieces {
                buf.extend_from_slice(piece);
                loop {
                    match FrameCodec.decode(&mut buf) {
                        Ok(Some(f)) => frames.push(f),
                        Ok(None) => break,
                        Err(e) => return (frames, Some(e), buf),
                    }
                }
            }
            match FrameCodec.decode_eof(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(e) => return (frames, Some(e), buf),
            }
            (frames, None, buf)
        }

        fn message() -> impl Strategy<Value = Message> {
            let text = prop_oneof![".{0,40}", any::<String>()];
            prop_oneof![
                (
                    text.clone(),
                    text.clone(),
                    prop_oneof![
                        Just(LogStream::Stdout),
                        Just(LogStream::Stderr),
                        Just(LogStream::Agent)
                    ]
                )
                    .prop_map(|(source, line, stream)| Message::Log(LogLine {
                        source,
                        stream,
                        line
                    })),
                text.clone().prop_map(|text| Message::Clipboard { text }),
                (any::<u32>(), any::<u32>())
                    .prop_map(|(width, height)| Message::Resize { width, height }),
                any::<u64>().prop_map(|seq| Message::Ping { seq }),
                (any::<i32>(), any::<i32>())
                    .prop_map(|(x, y)| Message::Input(InputEvent::PointerMove { x, y })),
                (text.clone(), text, any::<bool>()).prop_map(|(code, key, down)| Message::Input(
                    InputEvent::Key { code, key, down }
                )),
                any::<bool>().prop_map(|down| Message::Input(InputEvent::PointerButton {
                    button: PointerButton::Middle,
                    down
                })),
                Just(Message::Ready),
                Just(Message::Shutdown),
            ]
        }

        fn video() -> impl Strategy<Value = VideoFrame> {
            (
                any::<bool>(),
                any::<bool>(),
                any::<u16>(),
                any::<u16>(),
                any::<u32>(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..4096),
            )
                .prop_map(|(h264, keyframe, width, height, seq, capture_us, data)| {
                    VideoFrame {
                        header: VideoHeader {
                            codec: if h264 { Codec::H264 } else { Codec::Vp8 },
                            keyframe,
                            width,
                            height,
                            seq,
                            capture_us,
                        },
                        data: Bytes::from(data),
                    }
                })
        }

        fn frame() -> impl Strategy<Value = Frame> {
            prop_oneof![
                message().prop_map(Frame::Message),
                video().prop_map(Frame::Video)
            ]
        }

        /// A length prefix that fits its payload, a kind byte of any value and a
        /// payload of random bytes or of JSON: frames that pass the prefix checks
        /// and reach the payload parsers.
        fn framed_junk() -> impl Strategy<Value = Vec<u8>> {
            let payload = prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                json_value(WORDS).prop_map(|v| serde_json::to_vec(&v).unwrap()),
            ];
            let kind = prop_oneof![Just(KIND_JSON), Just(KIND_VIDEO), any::<u8>()];
            prop::collection::vec((kind, payload), 0..6).prop_map(|frames| {
                let mut buf = BytesMut::new();
                for (kind, payload) in frames {
                    put_frame(&mut buf, kind, &[payload.as_slice()]);
                }
                buf.to_vec()
            })
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_in_any_pieces_never_panic(
                data in prop::collection::vec(any::<u8>(), 0..4096),
                cuts in cuts(16),
            ) {
                let _ = feed(&split_at(&data, &cuts));
            }

            #[test]
            fn framed_junk_in_any_pieces_never_panics(data in framed_junk(), cuts in cuts(16)) {
                let (frames, _, _) = feed(&split_at(&data, &cuts));
                // Whatever was accepted is written again as the same frame.
                for f in frames {
                    let mut out = BytesMut::new();
                    FrameCodec.encode(f.clone(), &mut out).unwrap();
                    prop_assert_eq!(FrameCodec.decode(&mut out).unwrap(), Some(f));
                }
            }

            #[test]
            fn valid_frames_round_trip_in_any_pieces(
                frames in prop::collection::vec(frame(), 0..8),
                cuts in cuts(32),
            ) {
                let mut wire = BytesMut::new();
                for f in &frames {
                    FrameCodec.encode(f.clone(), &mut wire).unwrap();
                }
                let (decoded, err, rest) = feed(&split_at(&wire, &cuts));
                prop_assert!(err.is_none(), "{err:?}");
                prop_assert!(rest.is_empty());
                prop_assert_eq!(decoded, frames);
            }

            #[test]
            fn announced_bytes_are_reserved_only_as_they_arrive(
                len in 6..=MAX_FRAME_LEN,
                json in any::<bool>(),
                sent in 0usize..400_000,
                cuts in cuts(24),
            ) {
                let kind = if json { KIND_JSON } else { KIND_VIDEO };
                let mut wire = BytesMut::new();
                wire.put_u32(len as u32);
                wire.put_u8(kind);
                // Fewer bytes than announced: the frame stays incomplete.
                wire.resize(HEADER_LEN + sent.min(len - 2), 0);
                let mut buf = BytesMut::new();
                for piece in split_at(&wire, &cuts) {
                    buf.extend_from_slice(piece);
                    match FrameCodec.decode(&mut buf) {
                        Ok(None) => {}
                        Err(FrameError::TooLong { .. }) if json => break,
                        other => prop_assert!(false, "{other:?}"),
                    }
                    // Never more than a few times what arrived, plus a bounded
                    // read-ahead.
                    prop_assert!(
                        buf.capacity() <= 4 * buf.len() + 2 * RESERVE_AHEAD,
                        "{} bytes reserved for {} received of {len} announced",
                        buf.capacity(),
                        buf.len()
                    );
                }
            }
        }
    }
}

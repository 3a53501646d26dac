//! Encoded video frames as they cross the agent channel.

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};

use crate::codec::FrameError;

/// Bytes of the binary header in front of every video payload.
pub const VIDEO_HEADER_LEN: usize = 18;

/// A video codec the agent can encode and the gateway can packetise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// H.264 constrained baseline, Annex B byte stream.
    H264,
    /// VP8, one frame per payload.
    Vp8,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::H264 => 1,
            Codec::Vp8 => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Codec::H264),
            2 => Some(Codec::Vp8),
            _ => None,
        }
    }
}

/// What the gateway needs to know about a frame besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoHeader {
    /// Codec of the payload.
    pub codec: Codec,
    /// Whether the frame can be decoded on its own.
    pub keyframe: bool,
    /// Encoded width in pixels.
    pub width: u16,
    /// Encoded height in pixels.
    pub height: u16,
    /// Sequence number, one per encoded frame; a gap means frames were dropped.
    pub seq: u32,
    /// When the screen content was captured, in microseconds since the Unix
    /// epoch (the agent's clock, which the server may correct).
    pub capture_us: u64,
}

impl VideoHeader {
    /// The header as the agent channel carries it (and the viewer's
    /// WebSocket video stream): codec (1 H.264, 2 VP8), key-frame flag,
    /// width, height, sequence number, capture time in µs, big-endian.
    pub fn encode(&self) -> [u8; VIDEO_HEADER_LEN] {
        let mut out = [0u8; VIDEO_HEADER_LEN];
        out[0] = self.codec.to_byte();
        out[1] = u8::from(self.keyframe);
        out[2..4].copy_from_slice(&self.width.to_be_bytes());
        out[4..6].copy_from_slice(&self.height.to_be_bytes());
        out[6..10].copy_from_slice(&self.seq.to_be_bytes());
        out[10..18].copy_from_slice(&self.capture_us.to_be_bytes());
        out
    }
}

/// One encoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoFrame {
    /// Codec, timing and size.
    pub header: VideoHeader,
    /// The encoded bitstream of this frame.
    pub data: Bytes,
}

impl VideoFrame {
    pub(crate) fn decode(mut payload: Bytes) -> Result<Self, FrameError> {
        if payload.len() < VIDEO_HEADER_LEN {
            return Err(FrameError::Video(format!(
                "{} bytes is shorter than the {VIDEO_HEADER_LEN}-byte header",
                payload.len()
            )));
        }
        let codec_byte = payload.get_u8();
        let codec = Codec::from_byte(codec_byte)
            .ok_or_else(|| FrameError::Video(format!("unknown codec {codec_byte}")))?;
        let keyframe = payload.get_u8() & 1 == 1;
        let width = payload.get_u16();
        let height = payload.get_u16();
        let seq = payload.get_u32();
        let capture_us = payload.get_u64();
        Ok(VideoFrame {
            header: VideoHeader {
                codec,
                keyframe,
                width,
                height,
                seq,
                capture_us,
            },
            data: payload,
        })
    }
}

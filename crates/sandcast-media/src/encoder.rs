//! The encoder trait and what every codec shares.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sandcast_proto::Codec;

use crate::convert::I420Frame;
use crate::error::Result;
use crate::h264::{H264Encoder, H264Mode};
use crate::vp8::Vp8Encoder;

/// One encoded picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    /// The bitstream: Annex B for H.264 (SPS and PPS before every key
    /// frame), one frame for VP8.
    pub data: Bytes,
    /// Whether it decodes on its own.
    pub keyframe: bool,
    /// Encoded width.
    pub width: u32,
    /// Encoded height.
    pub height: u32,
}

/// Settings every encoder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Target bitrate in bits per second.
    pub bitrate_bps: u32,
    /// Highest frame rate the encoder is fed at.
    pub max_fps: u32,
    /// How H.264 is encoded (VP8 has one way).
    pub h264_mode: H264Mode,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        EncoderSettings {
            bitrate_bps: 2_500_000,
            max_fps: 60,
            h264_mode: H264Mode::default(),
        }
    }
}

/// Lowest and highest bitrate accepted; the gateway's estimate is clamped.
pub(crate) const BITRATE_RANGE: (u32, u32) = (100_000, 50_000_000);

/// A low-latency video encoder: one picture in, at most one frame out, no
/// B-frames, no lookahead.
pub trait Encoder: Send {
    /// Encodes `frame`; a key frame when `force_keyframe` (or when the size
    /// changed). `Ok(None)` when the encoder chose to emit nothing.
    fn encode(&mut self, frame: &I420Frame, force_keyframe: bool) -> Result<Option<EncodedFrame>>;
    /// Changes the target bitrate (clamped to a sane range) from the next frame on.
    fn set_bitrate(&mut self, bitrate_bps: u32);
    /// The target bitrate now.
    fn bitrate(&self) -> u32;
    /// The codec produced.
    fn codec(&self) -> Codec;
}

/// Makes the encoder sandcast uses for `codec`: H.264 in `settings.h264_mode`
/// (camera mode encoding every picture by default, see [`H264Mode`]) or VP8.
pub fn new_encoder(codec: Codec, settings: EncoderSettings) -> Result<Box<dyn Encoder>> {
    Ok(match codec {
        Codec::H264 => Box::new(H264Encoder::new(settings, settings.h264_mode)?),
        Codec::Vp8 => Box::new(Vp8Encoder::new(settings)?),
    })
}

/// Rate limit for key frames.
///
/// A 720p key frame is 100-160 KB, about half a second of a 2.5 Mbit/s
/// budget; a viewer that asks for one on every lost packet would starve
/// itself. Requests inside `min_interval` of the last key frame are not
/// dropped but deferred to the end of the interval, and any number of
/// requests in between become one key frame.
///
/// The key frame that opens a stream does not start the interval: it is
/// encoded while the first viewer is still connecting (the server starts the
/// encoder on its offer), so nobody can use it, and that viewer's own request
/// a moment later must be served at once, not a second later.
#[derive(Debug, Clone)]
pub struct KeyFramePolicy {
    min_interval: Duration,
    last: Option<Instant>,
    pending: bool,
    /// The pending key frame opens the stream.
    opening: bool,
}

impl KeyFramePolicy {
    /// At most one requested key frame per `min_interval`.
    pub fn new(min_interval: Duration) -> KeyFramePolicy {
        KeyFramePolicy {
            min_interval,
            last: None,
            pending: false,
            opening: false,
        }
    }

    /// Notes a request.
    pub fn request(&mut self) {
        self.pending = true;
    }

    /// Asks for the key frame that opens a stream (served at once, and not
    /// counted by the limit).
    pub fn open(&mut self) {
        self.last = None;
        self.pending = true;
        self.opening = true;
    }

    /// Whether a request waits.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// When the waiting request may be served (`now` at the earliest):
    /// `None` if none waits.
    pub fn due_at(&self, now: Instant) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        Some(match self.last {
            Some(last) => (last + self.min_interval).max(now),
            None => now,
        })
    }

    /// Whether the next frame, encoded at `now`, must be a key frame.
    pub fn should_force(&self, now: Instant) -> bool {
        self.due_at(now).is_some_and(|due| now >= due)
    }

    /// Records that a key frame (requested or not) went out at `now`.
    pub fn sent(&mut self, now: Instant) {
        if !std::mem::take(&mut self.opening) {
            self.last = Some(now);
        }
        self.pending = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_is_served_at_once() {
        let mut p = KeyFramePolicy::new(Duration::from_secs(1));
        let now = Instant::now();
        assert!(!p.should_force(now));
        p.request();
        assert!(p.should_force(now));
        p.sent(now);
        assert!(!p.pending());
    }

    #[test]
    fn the_opening_key_frame_does_not_hold_back_the_next_request() {
        let mut p = KeyFramePolicy::new(Duration::from_secs(1));
        let t0 = Instant::now();
        p.open();
        assert!(p.should_force(t0));
        p.sent(t0);
        // The first viewer connects and asks: served at once.
        let t1 = t0 + Duration::from_millis(200);
        p.request();
        assert!(p.should_force(t1));
        p.sent(t1);
        // Later requests are limited again.
        p.request();
        assert!(!p.should_force(t1 + Duration::from_millis(500)));
        assert_eq!(p.due_at(t1), Some(t1 + Duration::from_secs(1)));
    }

    #[test]
    fn requests_inside_the_interval_coalesce_and_wait() {
        let mut p = KeyFramePolicy::new(Duration::from_secs(1));
        let t0 = Instant::now();
        p.sent(t0);
        for _ in 0..50 {
            p.request();
        }
        assert!(!p.should_force(t0 + Duration::from_millis(500)));
        assert_eq!(p.due_at(t0), Some(t0 + Duration::from_secs(1)));
        assert!(p.should_force(t0 + Duration::from_millis(1000)));
        p.sent(t0 + Duration::from_millis(1000));
        assert!(!p.should_force(t0 + Duration::from_secs(5)));
    }
}

//! H.264 constrained baseline with openh264.

use std::time::Instant;

use bytes::Bytes;
use openh264::encoder::{
    BitRate, Complexity, Encoder as Oh264, EncoderConfig, FrameRate, FrameType, IntraFramePeriod,
    Profile, RateControlMode, UsageType,
};
use openh264::formats::YUVSource;
use openh264::{OpenH264API, Timestamp};
use sandcast_proto::Codec;

use crate::convert::I420Frame;
use crate::encoder::{BITRATE_RANGE, EncodedFrame, Encoder, EncoderSettings};
use crate::error::{Error, Result};

/// openh264's two usage modes, and camera mode without frame skipping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum H264Mode {
    /// Camera real-time: about twice as fast a frame, but it holds its
    /// bitrate on scrolling text only by skipping most frames.
    RealTime,
    /// Camera real-time that never skips a picture and holds its bitrate by
    /// its quantiser alone: every frame, but coarse ones on fast scrolling.
    /// sandcast's default: a small change encodes in about a third of
    /// screen mode's time, which is what a viewer waits for on every
    /// keystroke (figures in `docs/encoders.md`).
    #[default]
    RealTimeEveryFrame,
    /// Screen content: slower a frame, far fewer bits on scrolling text.
    Screen,
}

impl YUVSource for I420Frame {
    fn dimensions(&self) -> (usize, usize) {
        (self.width as usize, self.height as usize)
    }

    fn strides(&self) -> (usize, usize, usize) {
        let c = self.chroma_stride() as usize;
        (self.width as usize, c, c)
    }

    fn y(&self) -> &[u8] {
        &self.y
    }

    fn u(&self) -> &[u8] {
        &self.u
    }

    fn v(&self) -> &[u8] {
        &self.v
    }
}

/// openh264, one thread, constrained baseline, no periodic key frames.
pub struct H264Encoder {
    inner: Oh264,
    settings: EncoderSettings,
    mode: H264Mode,
    /// openh264 takes options only once it has seen the first picture.
    initialised: bool,
    bitrate: u32,
    started: Instant,
    last_ms: Option<u64>,
    out: Vec<u8>,
}

impl std::fmt::Debug for H264Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Encoder")
            .field("bitrate", &self.bitrate)
            .finish_non_exhaustive()
    }
}

impl H264Encoder {
    /// A new encoder; the picture size comes with the first frame.
    pub fn new(settings: EncoderSettings, mode: H264Mode) -> Result<H264Encoder> {
        let bitrate = settings.bitrate_bps.clamp(BITRATE_RANGE.0, BITRATE_RANGE.1);
        Ok(H264Encoder {
            inner: Self::make(bitrate, settings.max_fps, mode)?,
            settings,
            mode,
            initialised: false,
            bitrate,
            started: Instant::now(),
            last_ms: None,
            out: Vec::new(),
        })
    }

    fn make(bitrate: u32, max_fps: u32, mode: H264Mode) -> Result<Oh264> {
        let config = EncoderConfig::new()
            .usage_type(match mode {
                H264Mode::RealTime | H264Mode::RealTimeEveryFrame => UsageType::CameraVideoRealTime,
                H264Mode::Screen => UsageType::ScreenContentRealTime,
            })
            .profile(Profile::Baseline)
            .rate_control_mode(RateControlMode::Bitrate)
            .bitrate(BitRate::from_bps(bitrate))
            .max_frame_rate(FrameRate::from_hz(max_fps.max(1) as f32))
            // Skipping pictures is how openh264 holds its bitrate on fast
            // motion; the pipeline retries a skipped picture one frame
            // later, so the last change before the screen idles is never
            // lost. RealTimeEveryFrame raises its quantiser instead.
            .skip_frames(mode != H264Mode::RealTimeEveryFrame)
            // Key frames only when asked: a scene change on a web page (a
            // navigation) would otherwise cost a 100+ KB frame.
            .scene_change_detect(false)
            .intra_frame_period(IntraFramePeriod::from_num_frames(0))
            .complexity(Complexity::Medium)
            .num_threads(1);
        Oh264::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| Error::encoder("H.264", e.to_string()))
    }
}

impl Encoder for H264Encoder {
    fn encode(&mut self, frame: &I420Frame, force_keyframe: bool) -> Result<Option<EncodedFrame>> {
        if force_keyframe {
            self.inner.force_intra_frame();
        }
        // Real timestamps: frames come when the screen changes, not at a
        // fixed rate, and rate control must know the gaps. They are never
        // closer than the frame-rate cap, which the pipeline enforces anyway.
        let min_gap = 1000 / u64::from(self.settings.max_fps.max(1));
        let ms = (self.started.elapsed().as_millis() as u64)
            .max(self.last_ms.map_or(0, |l| l + min_gap));
        self.last_ms = Some(ms);
        let ts = Timestamp::from_millis(ms);
        let bs = self.inner.encode_at(frame, ts).map_err(|e| {
            Error::encoder("H.264", format!("{}x{}: {e}", frame.width, frame.height))
        })?;
        self.initialised = true;
        let keyframe = matches!(bs.frame_type(), FrameType::IDR | FrameType::I);
        if matches!(bs.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Ok(None);
        }
        self.out.clear();
        bs.write_vec(&mut self.out);
        if self.out.is_empty() {
            return Ok(None);
        }
        Ok(Some(EncodedFrame {
            data: Bytes::copy_from_slice(&self.out),
            keyframe,
            width: frame.width,
            height: frame.height,
        }))
    }

    fn set_bitrate(&mut self, bitrate_bps: u32) {
        let bitrate = bitrate_bps.clamp(BITRATE_RANGE.0, BITRATE_RANGE.1);
        if bitrate == self.bitrate {
            return;
        }
        self.bitrate = bitrate;
        if !self.initialised {
            match Self::make(bitrate, self.settings.max_fps, self.mode) {
                Ok(inner) => self.inner = inner,
                Err(e) => tracing::warn!(error = %e, "H.264 encoder not re-created"),
            }
            return;
        }
        for (option, layer) in [
            // The maximum first, or a raise above the old maximum is refused.
            (
                openh264_sys2::ENCODER_OPTION_MAX_BITRATE,
                openh264_sys2::SPATIAL_LAYER_ALL,
            ),
            (
                openh264_sys2::ENCODER_OPTION_BITRATE,
                openh264_sys2::SPATIAL_LAYER_ALL,
            ),
        ] {
            let mut info = openh264_sys2::SBitrateInfo {
                iLayer: layer,
                iBitrate: bitrate as i32,
            };
            // SAFETY: a documented option with its documented argument type,
            // on an initialised encoder; it changes no field the wrapper
            // relies on.
            unsafe {
                self.inner
                    .raw_api()
                    .set_option(option, (&raw mut info).cast());
            }
        }
    }

    fn bitrate(&self) -> u32 {
        self.bitrate
    }

    fn codec(&self) -> Codec {
        Codec::H264
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openh264::decoder::Decoder;

    /// A picture of text-like stripes scrolled by `offset` rows.
    /// Bytes a running encoder produces for frames 31..60 of a moving
    /// picture after its bitrate was changed to `bitrate`, as the gateway does.
    pub(crate) fn bytes_after_bitrate_change(enc: &mut dyn Encoder, bitrate: u32) -> usize {
        enc.encode(&synthetic(640, 360, 0), false).unwrap();
        enc.set_bitrate(bitrate);
        assert_eq!(enc.bitrate(), bitrate);
        (1..60)
            .map(|i| {
                enc.encode(&synthetic(640, 360, i * 4), false)
                    .unwrap()
                    .map_or(0, |f| f.data.len())
            })
            .skip(30)
            .sum::<usize>()
    }

    pub(crate) fn synthetic(width: u32, height: u32, offset: u32) -> I420Frame {
        let mut f = I420Frame::new(width, height);
        for y in 0..height {
            let line = (y + offset) / 16;
            let in_glyph = (y + offset) % 16 < 10;
            for x in 0..width {
                let glyph = in_glyph
                    && !(x / 7 + line * 3).is_multiple_of(5)
                    && (x * 13 + line * 7) % 11 < 6;
                f.y[(y * width + x) as usize] = if glyph { 30 } else { 230 };
            }
        }
        f
    }

    pub(crate) fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(x, y)| {
                let d = f64::from(*x) - f64::from(*y);
                d * d
            })
            .sum::<f64>()
            / a.len() as f64;
        if mse == 0.0 {
            return 99.0;
        }
        10.0 * (255.0 * 255.0 / mse).log10()
    }

    fn nal_types(data: &[u8]) -> Vec<u8> {
        openh264::nal_units(data)
            .map(|n| {
                let start = n.iter().position(|b| *b == 1).unwrap() + 1;
                n[start] & 0x1f
            })
            .collect()
    }

    fn decode_y(dec: &mut Decoder, data: &[u8], w: usize, h: usize) -> Vec<u8> {
        let yuv = dec.decode(data).unwrap().expect("a picture");
        let (ys, _, _) = yuv.strides();
        let mut out = Vec::with_capacity(w * h);
        for row in 0..h {
            out.extend_from_slice(&yuv.y()[row * ys..row * ys + w]);
        }
        out
    }

    #[test]
    fn output_is_annex_b_baseline_and_decodes_close_to_the_source() {
        for mode in [
            H264Mode::RealTime,
            H264Mode::RealTimeEveryFrame,
            H264Mode::Screen,
        ] {
            let mut enc = H264Encoder::new(EncoderSettings::default(), mode).unwrap();
            let mut dec = Decoder::new().unwrap();
            let first = enc.encode(&synthetic(640, 360, 0), false).unwrap().unwrap();
            assert!(first.keyframe, "{mode:?}: the first frame is a key frame");
            assert!(
                first.data.starts_with(&[0, 0, 0, 1]),
                "{mode:?}: Annex B start code"
            );
            let types = nal_types(&first.data);
            assert!(
                types.starts_with(&[7, 8]),
                "{mode:?}: SPS, PPS first, got {types:?}"
            );
            assert!(types.contains(&5), "{mode:?}: an IDR slice, got {types:?}");
            // SPS: profile_idc 66 (baseline) with constraint_set1 (constrained).
            let sps = openh264::nal_units(&first.data).next().unwrap();
            let at = sps.iter().position(|b| *b == 1).unwrap() + 1;
            assert_eq!(sps[at + 1], 66, "{mode:?}: baseline profile");
            assert_ne!(sps[at + 2] & 0x40, 0, "{mode:?}: constrained baseline");
            decode_y(&mut dec, &first.data, 640, 360);
            for i in 1..6 {
                let src = synthetic(640, 360, i * 4);
                // A skipped picture is retried, as the pipeline does.
                let f = (0..30)
                    .find_map(|_| enc.encode(&src, false).unwrap())
                    .expect("a picture within 30 tries");
                assert!(!f.keyframe, "{mode:?}: no unasked key frames");
                assert_eq!(nal_types(&f.data), vec![1], "{mode:?}: one P slice");
                let got = decode_y(&mut dec, &f.data, 640, 360);
                let p = psnr(&got, &src.y);
                assert!(p > 30.0, "{mode:?}: frame {i} PSNR {p:.1} dB");
            }
        }
    }

    #[test]
    fn key_frame_on_request_carries_sps_and_pps() {
        let mut enc = H264Encoder::new(EncoderSettings::default(), H264Mode::RealTime).unwrap();
        enc.encode(&synthetic(320, 240, 0), false).unwrap();
        let p = enc.encode(&synthetic(320, 240, 4), false).unwrap().unwrap();
        assert!(!p.keyframe);
        let k = enc.encode(&synthetic(320, 240, 8), true).unwrap().unwrap();
        assert!(k.keyframe);
        assert!(
            nal_types(&k.data).starts_with(&[7, 8, 5]),
            "{:?}",
            nal_types(&k.data)
        );
        // A fresh decoder starts from this key frame alone.
        let mut dec = Decoder::new().unwrap();
        let got = decode_y(&mut dec, &k.data, 320, 240);
        assert!(psnr(&got, &synthetic(320, 240, 8).y) > 30.0);
    }

    #[test]
    fn bitrate_change_changes_the_output_size() {
        let run = |bitrate| {
            let mut enc = H264Encoder::new(
                EncoderSettings {
                    bitrate_bps: 5_000_000,
                    max_fps: 30,
                    ..EncoderSettings::default()
                },
                H264Mode::RealTime,
            )
            .unwrap();
            bytes_after_bitrate_change(&mut enc, bitrate)
        };
        let low = run(200_000);
        let high = run(5_000_000);
        assert!(
            high > low * 2,
            "5 Mbit/s gave {high} bytes, 200 kbit/s {low}"
        );
    }

    #[test]
    fn a_size_change_restarts_with_a_key_frame() {
        let mut enc = H264Encoder::new(EncoderSettings::default(), H264Mode::RealTime).unwrap();
        enc.encode(&synthetic(320, 240, 0), false).unwrap();
        let f = enc.encode(&synthetic(640, 360, 0), false).unwrap().unwrap();
        assert!(f.keyframe);
        assert_eq!((f.width, f.height), (640, 360));
    }
}

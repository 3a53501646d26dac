//! VP8 with libvpx: real-time deadline, error-resilient, CBR.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::raw::{c_int, c_uint, c_ulong};
use std::time::Instant;

use bytes::BytesMut;
use sandcast_proto::Codec;
use vpx_sys as vpx;

use crate::convert::I420Frame;
use crate::encoder::{BITRATE_RANGE, EncodedFrame, Encoder, EncoderSettings};
use crate::error::{Error, Result};

/// libvpx speed for real time: 16 is the fastest, 12 keeps text readable.
const CPU_USED: c_int = 12;

/// A key frame may use this many per cent of an average frame's budget:
/// about 100 ms of the bitrate at 60 fps, so a key frame does not stall the
/// stream for half a second.
const MAX_INTRA_PCT: c_uint = 600;

/// A libvpx VP8 encoder for one picture size; re-created when it changes.
pub struct Vp8Encoder {
    ctx: Option<Box<vpx::vpx_codec_ctx_t>>,
    cfg: vpx::vpx_codec_enc_cfg_t,
    settings: EncoderSettings,
    size: (u32, u32),
    started: Instant,
    last_pts: Option<i64>,
}

// SAFETY: the libvpx context is used from one thread at a time (&mut self).
unsafe impl Send for Vp8Encoder {}

impl std::fmt::Debug for Vp8Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vp8Encoder")
            .field("settings", &self.settings)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn check(ctx: *mut vpx::vpx_codec_ctx_t, rc: vpx::vpx_codec_err_t, what: &str) -> Result<()> {
    if rc == vpx::VPX_CODEC_OK {
        return Ok(());
    }
    // SAFETY: libvpx returns static NUL-terminated strings.
    let msg = unsafe {
        let p = if ctx.is_null() {
            vpx::vpx_codec_err_to_string(rc)
        } else {
            vpx::vpx_codec_error(ctx)
        };
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    Err(Error::encoder("VP8", format!("{what}: {msg}")))
}

impl Vp8Encoder {
    /// A new encoder; the picture size comes with the first frame.
    pub fn new(settings: EncoderSettings) -> Result<Vp8Encoder> {
        let mut cfg = MaybeUninit::<vpx::vpx_codec_enc_cfg_t>::zeroed();
        // SAFETY: fills the config struct libvpx owns the layout of.
        let rc = unsafe {
            vpx::vpx_codec_enc_config_default(vpx::vpx_codec_vp8_cx(), cfg.as_mut_ptr(), 0)
        };
        check(std::ptr::null_mut(), rc, "default configuration")?;
        // SAFETY: initialised by the call above.
        let cfg = unsafe { cfg.assume_init() };
        let mut enc = Vp8Encoder {
            ctx: None,
            cfg,
            settings: EncoderSettings {
                bitrate_bps: settings.bitrate_bps.clamp(BITRATE_RANGE.0, BITRATE_RANGE.1),
                max_fps: settings.max_fps.max(1),
                h264_mode: settings.h264_mode,
            },
            size: (0, 0),
            started: Instant::now(),
            last_pts: None,
        };
        enc.apply_settings();
        Ok(enc)
    }

    fn apply_settings(&mut self) {
        let c = &mut self.cfg;
        c.g_threads = 1;
        c.g_timebase = vpx::vpx_rational { num: 1, den: 1000 };
        c.g_error_resilient = vpx::VPX_ERROR_RESILIENT_DEFAULT;
        c.g_lag_in_frames = 0;
        c.g_pass = vpx::vpx_enc_pass::VPX_RC_ONE_PASS;
        c.rc_end_usage = vpx::vpx_rc_mode::VPX_CBR;
        c.rc_target_bitrate = self.settings.bitrate_bps / 1000;
        // Dropping is how libvpx holds its rate on fast scrolling; the
        // pipeline retries a dropped picture one frame later, so the last
        // change before the screen idles is never lost.
        c.rc_dropframe_thresh = 30;
        c.rc_resize_allowed = 0;
        c.rc_min_quantizer = 4;
        c.rc_max_quantizer = 63;
        c.rc_undershoot_pct = 50;
        c.rc_overshoot_pct = 15;
        // A short buffer: the rate follows the bitrate within half a second.
        c.rc_buf_sz = 500;
        c.rc_buf_initial_sz = 300;
        c.rc_buf_optimal_sz = 400;
        // VPX_KF_FIXED is libvpx's "disabled": key frames only when forced.
        c.kf_mode = vpx::vpx_kf_mode::VPX_KF_FIXED;
        c.kf_min_dist = 0;
        c.kf_max_dist = 0x7fff_ffff;
    }

    fn open(&mut self, width: u32, height: u32) -> Result<()> {
        self.close();
        self.cfg.g_w = width;
        self.cfg.g_h = height;
        let mut ctx: Box<vpx::vpx_codec_ctx_t> =
            // SAFETY: an all-zero context is what vpx_codec_enc_init expects.
            Box::new(unsafe { MaybeUninit::zeroed().assume_init() });
        // SAFETY: valid context, interface and config.
        let rc = unsafe {
            vpx::vpx_codec_enc_init_ver(
                &mut *ctx,
                vpx::vpx_codec_vp8_cx(),
                &self.cfg,
                0,
                vpx::VPX_ENCODER_ABI_VERSION as c_int,
            )
        };
        check(
            std::ptr::null_mut(),
            rc,
            &format!("init at {width}x{height}"),
        )?;
        let controls: [(vpx::vp8e_enc_control_id, c_int); 4] = [
            (vpx::vp8e_enc_control_id::VP8E_SET_CPUUSED, CPU_USED),
            (
                vpx::vp8e_enc_control_id::VP8E_SET_MAX_INTRA_BITRATE_PCT,
                MAX_INTRA_PCT as c_int,
            ),
            (vpx::vp8e_enc_control_id::VP8E_SET_STATIC_THRESHOLD, 1),
            (vpx::vp8e_enc_control_id::VP8E_SET_NOISE_SENSITIVITY, 0),
        ];
        for (id, value) in controls {
            // SAFETY: documented controls taking one int, on a live context.
            let rc = unsafe { vpx::vpx_codec_control_(&mut *ctx, id as c_int, value) };
            if let Err(e) = check(&mut *ctx, rc, &format!("control {id:?}")) {
                // SAFETY: initialised above, destroyed once.
                unsafe { vpx::vpx_codec_destroy(&mut *ctx) };
                return Err(e);
            }
        }
        self.ctx = Some(ctx);
        self.size = (width, height);
        Ok(())
    }

    fn close(&mut self) {
        if let Some(mut ctx) = self.ctx.take() {
            // SAFETY: initialised in `open`, destroyed once.
            unsafe { vpx::vpx_codec_destroy(&mut *ctx) };
        }
    }
}

impl Drop for Vp8Encoder {
    fn drop(&mut self) {
        self.close();
    }
}

impl Encoder for Vp8Encoder {
    fn encode(&mut self, frame: &I420Frame, force_keyframe: bool) -> Result<Option<EncodedFrame>> {
        let mut force = force_keyframe;
        if self.ctx.is_none() || self.size != (frame.width, frame.height) {
            self.open(frame.width, frame.height)?;
            force = true;
        }
        let ctx: *mut vpx::vpx_codec_ctx_t = &mut **self.ctx.as_mut().expect("opened above");
        let mut img = MaybeUninit::<vpx::vpx_image_t>::zeroed();
        // SAFETY: wraps our planes without copying; libvpx only reads them
        // during vpx_codec_encode below, while `frame` is borrowed.
        let img = unsafe {
            vpx::vpx_img_wrap(
                img.as_mut_ptr(),
                vpx::vpx_img_fmt::VPX_IMG_FMT_I420,
                frame.width,
                frame.height,
                1,
                frame.y.as_ptr().cast_mut(),
            );
            let mut img = img.assume_init();
            img.planes[0] = frame.y.as_ptr().cast_mut();
            img.planes[1] = frame.u.as_ptr().cast_mut();
            img.planes[2] = frame.v.as_ptr().cast_mut();
            img.stride[0] = frame.width as c_int;
            img.stride[1] = frame.chroma_stride() as c_int;
            img.stride[2] = frame.chroma_stride() as c_int;
            img
        };
        // Never closer than the frame-rate cap, like the H.264 timestamps.
        let duration = (1000 / self.settings.max_fps).max(1) as c_ulong;
        let pts = (self.started.elapsed().as_millis() as i64)
            .max(self.last_pts.map_or(0, |l| l + duration as i64));
        self.last_pts = Some(pts);
        let flags = if force {
            vpx::VPX_EFLAG_FORCE_KF as vpx::vpx_enc_frame_flags_t
        } else {
            0
        };
        // SAFETY: live context, image valid for the call.
        let rc = unsafe {
            vpx::vpx_codec_encode(
                ctx,
                &img,
                pts,
                duration,
                flags,
                vpx::VPX_DL_REALTIME as c_ulong,
            )
        };
        check(ctx, rc, "encode")?;
        let mut out = BytesMut::new();
        let mut keyframe = false;
        let mut iter: vpx::vpx_codec_iter_t = std::ptr::null();
        loop {
            // SAFETY: iterating packets of the call above on a live context.
            let pkt = unsafe { vpx::vpx_codec_get_cx_data(ctx, &mut iter) };
            if pkt.is_null() {
                break;
            }
            // SAFETY: libvpx hands out valid packets until the next encode.
            let pkt = unsafe { &*pkt };
            if pkt.kind != vpx::vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                continue;
            }
            // SAFETY: a frame packet's union member is `frame`.
            let f = unsafe { pkt.data.frame };
            // SAFETY: buf holds sz bytes.
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(f.buf.cast::<u8>(), f.sz as usize)
            });
            keyframe |= f.flags & vpx::VPX_FRAME_IS_KEY != 0;
        }
        if out.is_empty() {
            return Ok(None);
        }
        Ok(Some(EncodedFrame {
            data: out.freeze(),
            keyframe,
            width: frame.width,
            height: frame.height,
        }))
    }

    fn set_bitrate(&mut self, bitrate_bps: u32) {
        let bitrate = bitrate_bps.clamp(BITRATE_RANGE.0, BITRATE_RANGE.1);
        self.settings.bitrate_bps = bitrate;
        self.cfg.rc_target_bitrate = bitrate / 1000;
        if let Some(ctx) = self.ctx.as_mut() {
            // SAFETY: live context, config of the same size.
            let rc = unsafe { vpx::vpx_codec_enc_config_set(&mut **ctx, &self.cfg) };
            if let Err(e) = check(&mut **ctx, rc, "bitrate change") {
                tracing::warn!(error = %e, "VP8 bitrate change refused; re-opening the encoder");
                // The next frame re-opens with the new config (a key frame).
                self.close();
            }
        }
    }

    fn bitrate(&self) -> u32 {
        self.settings.bitrate_bps
    }

    fn codec(&self) -> Codec {
        Codec::Vp8
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::h264::tests::{psnr, synthetic};

    /// A libvpx VP8 decoder returning the luma plane.
    pub(crate) struct Vp8Decoder(Box<vpx::vpx_codec_ctx_t>);

    impl Vp8Decoder {
        pub(crate) fn new() -> Self {
            let mut ctx: Box<vpx::vpx_codec_ctx_t> =
                Box::new(unsafe { MaybeUninit::zeroed().assume_init() });
            let rc = unsafe {
                vpx::vpx_codec_dec_init_ver(
                    &mut *ctx,
                    vpx::vpx_codec_vp8_dx(),
                    std::ptr::null(),
                    0,
                    vpx::VPX_DECODER_ABI_VERSION as c_int,
                )
            };
            assert_eq!(rc, vpx::VPX_CODEC_OK);
            Vp8Decoder(ctx)
        }

        pub(crate) fn decode_y(&mut self, data: &[u8]) -> (u32, u32, Vec<u8>) {
            let rc = unsafe {
                vpx::vpx_codec_decode(
                    &mut *self.0,
                    data.as_ptr(),
                    data.len() as c_uint,
                    std::ptr::null_mut(),
                    0,
                )
            };
            check(&mut *self.0, rc, "decode").unwrap();
            let mut iter: vpx::vpx_codec_iter_t = std::ptr::null();
            let img = unsafe { vpx::vpx_codec_get_frame(&mut *self.0, &mut iter) };
            assert!(!img.is_null(), "a decoded picture");
            let img = unsafe { &*img };
            let mut y = Vec::new();
            for row in 0..img.d_h as usize {
                let p = unsafe { img.planes[0].add(row * img.stride[0] as usize) };
                y.extend_from_slice(unsafe { std::slice::from_raw_parts(p, img.d_w as usize) });
            }
            (img.d_w, img.d_h, y)
        }
    }

    impl Drop for Vp8Decoder {
        fn drop(&mut self) {
            unsafe { vpx::vpx_codec_destroy(&mut *self.0) };
        }
    }

    fn is_vp8_keyframe(data: &[u8]) -> bool {
        // Frame tag bit 0 clear = key frame, then the start code 9d 01 2a.
        data.len() > 10 && data[0] & 1 == 0 && data[3..6] == [0x9d, 0x01, 0x2a]
    }

    #[test]
    fn first_frame_is_a_valid_key_frame_and_frames_decode() {
        let mut enc = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        let mut dec = Vp8Decoder::new();
        let first = enc.encode(&synthetic(640, 360, 0), false).unwrap().unwrap();
        assert!(first.keyframe);
        assert!(is_vp8_keyframe(&first.data), "{:02x?}", &first.data[..10]);
        // Width and height in the key frame header, little-endian 14 bits.
        assert_eq!(
            u16::from_le_bytes([first.data[6], first.data[7]]) & 0x3fff,
            640
        );
        assert_eq!(
            u16::from_le_bytes([first.data[8], first.data[9]]) & 0x3fff,
            360
        );
        dec.decode_y(&first.data);
        for i in 1..8 {
            let src = synthetic(640, 360, i * 4);
            let f = enc.encode(&src, false).unwrap().unwrap();
            assert!(
                !f.keyframe && !is_vp8_keyframe(&f.data),
                "frame {i} is an inter frame"
            );
            let (w, h, y) = dec.decode_y(&f.data);
            assert_eq!((w, h), (640, 360));
            let p = psnr(&y, &src.y);
            assert!(p > 25.0, "frame {i} PSNR {p:.1} dB");
        }
    }

    #[test]
    fn key_frame_on_request() {
        let mut enc = Vp8Encoder::new(EncoderSettings::default()).unwrap();
        enc.encode(&synthetic(320, 240, 0), false).unwrap();
        assert!(
            !enc.encode(&synthetic(320, 240, 4), false)
                .unwrap()
                .unwrap()
                .keyframe
        );
        let k = enc.encode(&synthetic(320, 240, 8), true).unwrap().unwrap();
        assert!(k.keyframe && is_vp8_keyframe(&k.data));
        let (_, _, y) = Vp8Decoder::new().decode_y(&k.data);
        assert_eq!(y.len(), 320 * 240);
    }

    #[test]
    fn bitrate_change_changes_the_output_size() {
        let run = |bitrate| {
            let mut enc = Vp8Encoder::new(EncoderSettings {
                bitrate_bps: 5_000_000,
                max_fps: 30,
                ..EncoderSettings::default()
            })
            .unwrap();
            crate::h264::tests::bytes_after_bitrate_change(&mut enc, bitrate)
        };
        let low = run(200_000);
        let high = run(5_000_000);
        assert!(
            high > low * 2,
            "5 Mbit/s gave {high} bytes, 200 kbit/s {low}"
        );
    }
}

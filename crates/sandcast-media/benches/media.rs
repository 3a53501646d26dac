//! `cargo bench -p sandcast-media`: capture, colour conversion and encoders
//! at 1280x720 on text scrolling 4 px a frame. Medians go to docs/encoders.md.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sandcast_media::testdata::ScrollingText;
use sandcast_media::xvfb::Xvfb;
use sandcast_media::{
    Capture, CaptureMethod, CapturedFrame, Encoder, EncoderSettings, H264Encoder, H264Mode,
    I420Frame, Vp8Encoder, bgra_to_i420,
};

const W: u32 = 1280;
const H: u32 = 720;
const STEP: u32 = 4;

fn capture(c: &mut Criterion) {
    let x = Xvfb::start(W, H).expect("Xvfb");
    let mut g = c.benchmark_group("capture_1280x720");
    for (name, method) in [
        ("shm", CaptureMethod::Shm),
        ("get_image", CaptureMethod::GetImage),
    ] {
        let mut cap = Capture::open(x.display(), method).expect("capture");
        g.bench_function(name, |b| b.iter(|| cap.grab().expect("grab").bgra[0]));
    }
    g.finish();
}

fn convert(c: &mut Criterion) {
    let text = ScrollingText::new(W, H);
    let frames: Vec<Vec<u8>> = (0..30).map(|n| text.bgra(n, STEP)).collect();
    let mut out = I420Frame::default();
    let mut n = 0;
    c.bench_function("bgra_to_i420_1280x720", |b| {
        b.iter(|| {
            n = (n + 1) % frames.len();
            let src = CapturedFrame {
                width: W,
                height: H,
                stride: W * 4,
                bgra: &frames[n],
            };
            bgra_to_i420(&src, &mut out).expect("convert");
        })
    });
}

/// Frames of a page 240 rows tall scrolling 4 px a frame: 60 frames loop
/// without a jump.
fn scroll_loop() -> Vec<I420Frame> {
    let text = ScrollingText::with_page_rows(W, H, 60 * STEP);
    (0..60).map(|n| text.i420(n, STEP)).collect()
}

/// Frames of a still page where only a row of 32 blocks of 16 px changes,
/// each frame another binary pattern: what the latency clock page draws.
fn small_change_loop() -> Vec<I420Frame> {
    let base = ScrollingText::new(W, H).i420(0, 0);
    (0..60u32)
        .map(|n| {
            let mut f = base.clone();
            let pattern = n.wrapping_mul(2_654_435_761);
            for bit in 0..32u32 {
                let v = if pattern >> bit & 1 == 1 { 235 } else { 16 };
                for y in 0..16 {
                    let row = (16 + y) as usize * W as usize;
                    let x0 = (16 + bit * 16) as usize;
                    f.y[row + x0..row + x0 + 16].fill(v);
                }
            }
            f
        })
        .collect()
}

/// Times the encode of each next scrolled frame, skipped frames included
/// (an encoder holding its bitrate skips; that is part of its cost).
fn bench_encoder(
    c: &mut Criterion,
    frames: &[I420Frame],
    name: &str,
    mut make: impl FnMut() -> Box<dyn Encoder>,
) {
    c.bench_function(name, |b| {
        let mut enc = make();
        enc.encode(&frames[0], false).expect("encode");
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % frames.len();
            enc.encode(&frames[n], false).expect("encode")
        })
    });
}

fn encode(c: &mut Criterion) {
    // A bitrate high enough that no encoder skips: this measures the cost
    // of encoding a frame. How each holds 2.5 Mbit/s (by skipping) is in
    // the encoder_report example.
    let settings = EncoderSettings {
        bitrate_bps: 20_000_000,
        max_fps: 60,
        ..EncoderSettings::default()
    };
    let frames = scroll_loop();
    bench_encoder(c, &frames, "h264_realtime_1280x720", || {
        Box::new(H264Encoder::new(settings, H264Mode::RealTime).expect("h264"))
    });
    bench_encoder(c, &frames, "h264_screen_1280x720", || {
        Box::new(H264Encoder::new(settings, H264Mode::Screen).expect("h264"))
    });
    bench_encoder(c, &frames, "vp8_1280x720", || {
        Box::new(Vp8Encoder::new(settings).expect("vp8"))
    });
    // The latency path: a still page with a small change a frame.
    let frames = small_change_loop();
    bench_encoder(c, &frames, "h264_realtime_small_change_1280x720", || {
        Box::new(H264Encoder::new(settings, H264Mode::RealTime).expect("h264"))
    });
    bench_encoder(c, &frames, "h264_screen_small_change_1280x720", || {
        Box::new(H264Encoder::new(settings, H264Mode::Screen).expect("h264"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = capture, convert, encode
}
criterion_main!(benches);

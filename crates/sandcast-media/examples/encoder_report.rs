//! `cargo run --release -p sandcast-media --example encoder_report [BITRATE_BPS]`
//!
//! Encodes ten seconds of 1280x720 text scrolling 4 px a frame at 60 fps
//! with each encoder and prints, per encoder: median and p95 encode time,
//! the bitrate it produced against its target (2.5 Mbit/s unless given), the frames it
//! skipped, the median luma PSNR of the frames it produced (H.264, decoded
//! with openh264), and the size of the first and of a requested key frame. Then measures the CPU the video
//! pipeline uses on an idle display.

use std::time::{Duration, Instant};

use sandcast_media::testdata::ScrollingText;
use sandcast_media::xvfb::Xvfb;
use sandcast_media::{
    Encoder, EncoderSettings, H264Encoder, H264Mode, VideoPipeline, VideoSettings, Vp8Encoder,
};

const W: u32 = 1280;
const H: u32 = 720;
const FPS: u32 = 60;
const FRAMES: u32 = 600;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, text: &ScrollingText, step: u32, mut enc: Box<dyn Encoder>) {
    // Encode times of frames produced; skipped frames cost almost nothing
    // and are counted apart.
    let mut times = Vec::new();
    let mut bytes = 0usize;
    let mut skipped = 0;
    let mut first_key = 0;
    let mut asked_key = 0;
    let mut decoder = name
        .starts_with("H.264")
        .then(|| openh264::decoder::Decoder::new().expect("an H.264 decoder"));
    let mut psnr = Vec::new();
    for n in 0..FRAMES {
        let frame = text.i420(n, step);
        let force = n == FRAMES / 2;
        let t = Instant::now();
        let out = enc.encode(&frame, force).expect("encode");
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match out {
            Some(f) => {
                times.push(ms);
                if let Some(d) = decoder.as_mut()
                    && let Ok(Some(picture)) = d.decode(&f.data)
                {
                    psnr.push(luma_psnr(&picture, &frame.y));
                }
                bytes += f.data.len();
                if n == 0 {
                    first_key = f.data.len();
                }
                if force && f.keyframe {
                    asked_key = f.data.len();
                }
            }
            None => skipped += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    psnr.sort_by(f64::total_cmp);
    let psnr = if psnr.is_empty() {
        "–".to_owned()
    } else {
        format!("{:.1}", percentile(&psnr, 0.5))
    };
    let kbps = bytes as f64 * 8.0 * f64::from(FPS) / f64::from(FRAMES) / 1000.0;
    println!(
        "| {name} | {step} px | {:.2} | {:.2} | {:.0} | {:.1}x | {} | {psnr} | {:.0} | {:.0} |",
        percentile(&times, 0.5),
        percentile(&times, 0.95),
        kbps,
        kbps / (f64::from(enc.bitrate()) / 1000.0),
        skipped,
        first_key as f64 / 1024.0,
        asked_key as f64 / 1024.0,
    );
}

/// Luma PSNR in dB of a decoded picture against the source's Y plane.
fn luma_psnr(picture: &openh264::decoder::DecodedYUV<'_>, source: &[u8]) -> f64 {
    use openh264::formats::YUVSource;
    let (stride, _, _) = picture.strides();
    let y = picture.y();
    let mut squared = 0f64;
    for row in 0..H as usize {
        let got = &y[row * stride..row * stride + W as usize];
        let want = &source[row * W as usize..(row + 1) * W as usize];
        for (a, b) in got.iter().zip(want) {
            let e = f64::from(*a) - f64::from(*b);
            squared += e * e;
        }
    }
    let mse = (squared / f64::from(W * H)).max(1e-9);
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// User plus system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of another process, from /proc.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn main() {
    // The target bitrate: 2.5 Mbit/s (where a viewer starts) unless given.
    let bitrate_bps = match std::env::args().nth(1) {
        None => 2_500_000,
        Some(a) => match a.parse::<u32>() {
            Ok(b) if (100_000..=50_000_000).contains(&b) => b,
            _ => {
                eprintln!(
                    "encoder_report: bitrate {a:?} is not a number of bits per second from 100000 to 50000000"
                );
                std::process::exit(2);
            }
        },
    };
    let text = ScrollingText::new(W, H);
    let settings = EncoderSettings {
        bitrate_bps,
        max_fps: FPS,
        ..EncoderSettings::default()
    };
    println!(
        "| encoder | scroll | median ms | p95 ms | kbit/s | of target | skipped | PSNR dB | first key KB | asked key KB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for step in [4, 16] {
        report(
            "H.264 real-time",
            &text,
            step,
            Box::new(H264Encoder::new(settings, H264Mode::RealTime).unwrap()),
        );
        report(
            "H.264 real-time, every frame",
            &text,
            step,
            Box::new(H264Encoder::new(settings, H264Mode::RealTimeEveryFrame).unwrap()),
        );
        report(
            "H.264 screen",
            &text,
            step,
            Box::new(H264Encoder::new(settings, H264Mode::Screen).unwrap()),
        );
        report(
            "VP8",
            &text,
            step,
            Box::new(Vp8Encoder::new(settings).unwrap()),
        );
    }

    let x = Xvfb::start(W, H).expect("Xvfb");
    let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async { rx.next().await.expect("first frame") });
    let (c0, x0, t0) = (cpu_seconds(), proc_cpu_seconds(x.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let wall = t0.elapsed().as_secs_f64();
    println!();
    println!(
        "idle display, 10 s: this process (pipeline) {:.3} % of a core, Xvfb {:.3} %, captures after the first frame: {}",
        (cpu_seconds() - c0) / wall * 100.0,
        (proc_cpu_seconds(x.pid()) - x0) / wall * 100.0,
        pipe.stats().captures - 1
    );

    // Continuous motion: another client scrolls a page of text 4 px every
    // 16 ms (drawn as an image, as a browser would), while a consumer takes
    // every frame at once.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drawer = {
        let stop = stop.clone();
        let display = x.display().to_owned();
        std::thread::spawn(move || draw_scrolling(&display, &stop))
    };
    let before = pipe.stats();
    let (c0, x0, t0) = (cpu_seconds(), proc_cpu_seconds(x.pid()), Instant::now());
    let mut latencies = Vec::new();
    rt.block_on(async {
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), rx.next()).await {
                let now_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros() as u64;
                latencies.push(now_us.saturating_sub(f.header.capture_us) as f64 / 1000.0);
            }
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drawer.join().unwrap();
    let after = pipe.stats();
    latencies.sort_by(f64::total_cmp);
    let frames = after.frames_encoded - before.frames_encoded;
    println!(
        "scrolling text, 10 s, the default pipeline (H.264 camera mode, every frame) at 2.5 Mbit/s: {:.1} frames/s, {:.0} kbit/s, \
         process (pipeline + drawing client) {:.1} % of a core, Xvfb {:.1} %, \
         capture-to-frame-taken median {:.1} ms p95 {:.1} ms, waits merged {}",
        frames as f64 / wall,
        (after.bytes - before.bytes) as f64 * 8.0 / wall / 1000.0,
        (cpu_seconds() - c0) / wall * 100.0,
        (proc_cpu_seconds(x.pid()) - x0) / wall * 100.0,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        after.frames_dropped - before.frames_dropped,
    );
}

/// Puts frames of scrolling text on `display` every 16 ms until `stop`.
fn draw_scrolling(display: &str, stop: &std::sync::atomic::AtomicBool) {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, CreateGCAux, ImageFormat};
    let (conn, screen) = x11rb::connect(Some(display)).unwrap();
    let root = conn.setup().roots[screen].root;
    let gc = conn.generate_id().unwrap();
    conn.create_gc(gc, root, &CreateGCAux::new()).unwrap();
    let text = ScrollingText::new(W, H / 2);
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let img = text.bgra(n, 4);
        conn.put_image(
            ImageFormat::Z_PIXMAP,
            root,
            gc,
            W as u16,
            (H / 2) as u16,
            0,
            0,
            0,
            24,
            &img,
        )
        .unwrap();
        conn.get_input_focus().unwrap().reply().unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(16));
    }
}

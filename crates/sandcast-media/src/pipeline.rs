//! The video pipeline: damage → capture → convert → encode → newest-wins slot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sandcast_proto::{Codec, VideoControl, VideoFrame, VideoHeader};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::Event;
use x11rb::protocol::damage::{self, ConnectionExt as _, ReportLevel};
use x11rb::protocol::xfixes::ConnectionExt as _;
use x11rb::protocol::xproto::{
    ChangeWindowAttributesAux, ClientMessageEvent, ConnectionExt as _, CreateWindowAux, EventMask,
    WindowClass,
};
use x11rb::rust_connection::RustConnection;

use crate::capture::{Capture, CaptureMethod};
use crate::convert::{I420Frame, bgra_to_i420};
use crate::encoder::{Encoder, EncoderSettings, KeyFramePolicy, new_encoder};
use crate::error::{Error, Result};
use crate::h264::H264Mode;
use crate::xutil;

/// What the pipeline starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoSettings {
    /// Codec to encode.
    pub codec: Codec,
    /// Target bitrate in bits per second.
    pub bitrate_bps: u32,
    /// Highest frame rate; changes closer together than this are merged.
    pub max_fps: u32,
    /// How H.264 is encoded.
    pub h264_mode: H264Mode,
}

impl Default for VideoSettings {
    fn default() -> Self {
        VideoSettings {
            codec: Codec::H264,
            bitrate_bps: 2_500_000,
            max_fps: 60,
            h264_mode: H264Mode::default(),
        }
    }
}

impl VideoSettings {
    /// What the encoder gets of these settings, at `bitrate_bps`.
    fn encoder_settings(&self, bitrate_bps: u32) -> EncoderSettings {
        EncoderSettings {
            bitrate_bps,
            max_fps: self.max_fps,
            h264_mode: self.h264_mode,
        }
    }
}

/// Counters of a pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Screens captured.
    pub captures: u64,
    /// Frames encoded and published.
    pub frames_encoded: u64,
    /// Key frames among them.
    pub keyframes: u64,
    /// Changes that had to wait because the previous frame was not taken
    /// yet; they are merged into the next capture instead of queued.
    pub frames_dropped: u64,
    /// Encoded bytes published.
    pub bytes: u64,
    /// Microseconds spent producing the frames: capture, conversion and
    /// encoding.
    pub encode_us: u64,
}

impl PipelineStats {
    /// The counters the agent reports, with its count of refused input.
    pub fn to_agent_stats(&self, input_dropped: u64) -> sandcast_proto::AgentStats {
        sandcast_proto::AgentStats {
            input_dropped,
            frames_encoded: self.frames_encoded,
            frames_dropped: self.frames_dropped,
            key_frames: self.keyframes,
            encode_us: self.encode_us,
        }
    }

    /// These counters and `other`'s together (a pipeline that ended and
    /// the one after it).
    pub fn plus(&self, other: &PipelineStats) -> PipelineStats {
        PipelineStats {
            captures: self.captures + other.captures,
            frames_encoded: self.frames_encoded + other.frames_encoded,
            keyframes: self.keyframes + other.keyframes,
            frames_dropped: self.frames_dropped + other.frames_dropped,
            bytes: self.bytes + other.bytes,
            encode_us: self.encode_us + other.encode_us,
        }
    }
}

/// Shortest gap between two requested key frames.
const KEYFRAME_MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Counters {
    captures: AtomicU64,
    frames_encoded: AtomicU64,
    keyframes: AtomicU64,
    frames_dropped: AtomicU64,
    bytes: AtomicU64,
    encode_us: AtomicU64,
}

struct Slot {
    frame: Option<VideoFrame>,
    /// The pipeline has a change to capture and waits for the slot to empty.
    waiting: bool,
    /// The pipeline thread has ended.
    closed: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    notify: tokio::sync::Notify,
    controls: Mutex<Vec<VideoControl>>,
    stop: AtomicBool,
    counters: Counters,
    error: Mutex<Option<String>>,
}

/// A second connection that only sends: it wakes the pipeline thread out
/// of its blocking wait by sending a ClientMessage to the pipeline's own
/// window (with an empty event mask, the event goes to that window's
/// creator).
struct Waker {
    conn: RustConnection,
    window: u32,
}

impl Waker {
    fn wake(&self) {
        let ev = ClientMessageEvent::new(32, self.window, x11rb::NONE, [0u32; 5]);
        let _ = self
            .conn
            .send_event(false, self.window, EventMask::NO_EVENT, ev);
        let _ = self.conn.flush();
    }
}

/// Captures and encodes the display whenever it changes, on its own thread.
pub struct VideoPipeline {
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VideoPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoPipeline")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Receives the newest encoded frame; frames are never queued.
pub struct FrameReceiver {
    shared: Arc<Shared>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for FrameReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReceiver").finish_non_exhaustive()
    }
}

impl FrameReceiver {
    /// Waits for the next frame; `None` once the pipeline has ended.
    ///
    /// Taking a frame is what lets the pipeline capture the next one, so
    /// a slow sender gets the screen as it is when it is ready, not a
    /// backlog.
    pub async fn next(&mut self) -> Option<VideoFrame> {
        loop {
            // Registered before looking, so a frame published in between
            // still wakes us.
            let shared = self.shared.clone();
            let notified = shared.notify.notified();
            match self.try_next() {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(()) => return None,
            }
            notified.await;
        }
    }

    /// The frame waiting now, if any; `Err` once the pipeline has ended.
    #[allow(clippy::result_unit_err)]
    pub fn try_next(&mut self) -> Result<Option<VideoFrame>, ()> {
        let (frame, wake) = {
            let mut slot = self.shared.slot.lock().expect("slot lock");
            let frame = slot.frame.take();
            if frame.is_none() && slot.closed {
                return Err(());
            }
            let wake = frame.is_some() && std::mem::take(&mut slot.waiting);
            (frame, wake)
        };
        if wake {
            self.waker.wake();
        }
        Ok(frame)
    }
}

impl VideoPipeline {
    /// Starts capturing `display` and encoding with `settings`. The first
    /// frame (a key frame) is published at once; later ones when the screen
    /// changes.
    pub fn spawn(display: &str, settings: VideoSettings) -> Result<(VideoPipeline, FrameReceiver)> {
        if settings.max_fps == 0 || settings.max_fps > 240 {
            return Err(Error::Unsupported(format!(
                "max_fps = {} is outside 1 to 240",
                settings.max_fps
            )));
        }
        let capture = Capture::open(display, CaptureMethod::Shm)?;
        let conn = capture.conn();
        if conn
            .extension_information(damage::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Err(Error::MissingExtension("DAMAGE"));
        }
        // Damage regions are XFixes regions: both versions must be negotiated.
        conn.xfixes_query_version(5, 0)?.reply()?;
        conn.damage_query_version(1, 1)?.reply()?;
        let root = capture.root();
        let window = conn.generate_id()?;
        conn.create_window(
            0,
            window,
            root,
            -1,
            -1,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new(),
        )?;
        let damage = conn.generate_id()?;
        // NON_EMPTY: one event when the screen goes from clean to dirty, then
        // silence until we subtract; an idle or busy screen costs one event.
        conn.damage_create(damage, root, ReportLevel::NON_EMPTY)?;
        conn.change_window_attributes(
            root,
            &ChangeWindowAttributesAux::new().event_mask(EventMask::STRUCTURE_NOTIFY),
        )?;
        conn.get_input_focus()?.reply()?;
        let encoder = new_encoder(
            settings.codec,
            settings.encoder_settings(settings.bitrate_bps),
        )?;
        let (waker_conn, _) = xutil::connect(display)?;
        let waker = Arc::new(Waker {
            conn: waker_conn,
            window,
        });
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                frame: None,
                waiting: false,
                closed: false,
            }),
            notify: tokio::sync::Notify::new(),
            controls: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            error: Mutex::new(None),
        });
        let mut worker = Worker {
            capture,
            damage,
            shared: shared.clone(),
            encoder,
            settings,
            running: true,
            dirty: true,
            dirty_since: Instant::now(),
            keyframes: KeyFramePolicy::new(KEYFRAME_MIN_INTERVAL),
            pacer: Pacer::new(settings.max_fps),
            budget: BitBudget::new(),
            started_bps: settings.bitrate_bps,
            seq: 0,
            i420: I420Frame::default(),
            subtract_seq: 0,
        };
        worker.keyframes.open();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sandcast-video".into())
            .spawn(move || {
                if let Err(e) = worker.run() {
                    tracing::error!(error = %e, "video pipeline stopped");
                    *thread_shared.error.lock().expect("error lock") = Some(e.to_string());
                }
                thread_shared.slot.lock().expect("slot lock").closed = true;
                thread_shared.notify.notify_one();
            })
            .map_err(|source| Error::Os {
                what: "spawn the video thread",
                source,
            })?;
        let rx = FrameReceiver {
            shared: shared.clone(),
            waker: waker.clone(),
        };
        Ok((
            VideoPipeline {
                shared,
                waker,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Starts, stops, re-keys or re-rates the stream. Takes effect within
    /// one frame; never blocks on the encoder. `Start` always brings a key
    /// frame at once (a new viewer); `KeyFrame` requests are served at most
    /// once a second, merged in between.
    pub fn control(&self, control: VideoControl) {
        self.shared
            .controls
            .lock()
            .expect("controls lock")
            .push(control);
        self.waker.wake();
    }

    /// The counters now.
    pub fn stats(&self) -> PipelineStats {
        let c = &self.shared.counters;
        PipelineStats {
            captures: c.captures.load(Ordering::Relaxed),
            frames_encoded: c.frames_encoded.load(Ordering::Relaxed),
            keyframes: c.keyframes.load(Ordering::Relaxed),
            frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            encode_us: c.encode_us.load(Ordering::Relaxed),
        }
    }

    /// Why the pipeline stopped, if it did.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().expect("error lock").clone()
    }
}

impl Drop for VideoPipeline {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a capture waits after the first damage of a picture: a client
/// often draws one picture in several requests, and a capture between them
/// would show part of it until the pacer allows the next frame.
const COALESCE: Duration = Duration::from_micros(1500);

/// Paces frames to `max_fps` on average (GCRA), allowing one frame early, so
/// that a change right after a capture is not held back a whole interval
/// when the previous gap was long. Plain state, the clock passed in.
#[derive(Debug, Clone)]
struct Pacer {
    interval: Duration,
    /// When the next frame would be due at exactly `max_fps`.
    tat: Option<Instant>,
}

impl Pacer {
    fn new(max_fps: u32) -> Pacer {
        Pacer {
            interval: Duration::from_secs(1) / max_fps.max(1),
            tat: None,
        }
    }

    /// The earliest time the next frame may be made.
    fn next_at(&self) -> Instant {
        // One interval of tolerance: a burst of two frames at most.
        match self.tat {
            Some(t) => t.checked_sub(self.interval).unwrap_or(t),
            None => Instant::now(),
        }
    }

    /// Records a frame made at `now`.
    fn sent(&mut self, now: Instant) {
        let base = self.tat.map_or(now, |t| t.max(now));
        self.tat = Some(base + self.interval);
    }
}

/// Holds the stream to the encoder's bitrate when the encoder cannot: in
/// camera mode without skipping (the default), openh264 raises its
/// quantiser only so far, and a page that changes everywhere (scrolling)
/// then needs several times the bitrate it was asked for, which a slow
/// link loses whole. A token bucket of bits refilled at the bitrate, with
/// half a second of it saved (a key frame passes at once); while it is in
/// debt the next frame waits, so the frame rate falls instead of the link
/// overflowing. Only once the bitrate was lowered since the stream started
/// (a viewer lost packets): until then the link has carried what it was
/// given, and holding a fast link to the starting bitrate would cost frames
/// for nothing. Plain state, the clock passed in.
#[derive(Debug, Clone)]
struct BitBudget {
    bits: f64,
    at: Option<Instant>,
}

impl BitBudget {
    /// Seconds of the bitrate the bucket holds.
    const SAVED_SECONDS: f64 = 0.5;

    fn new() -> BitBudget {
        BitBudget {
            bits: 0.0,
            at: None,
        }
    }

    /// The bits in the bucket at `now`.
    fn level(&self, now: Instant, bitrate: u32) -> f64 {
        let rate = f64::from(bitrate.max(1));
        match self.at {
            None => rate * Self::SAVED_SECONDS,
            Some(at) => (self.bits + now.saturating_duration_since(at).as_secs_f64() * rate)
                .min(rate * Self::SAVED_SECONDS),
        }
    }

    /// The earliest a frame may be made, at `now` (no earlier than it).
    fn next_at(&self, now: Instant, bitrate: u32) -> Instant {
        let level = self.level(now, bitrate);
        if level >= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(-level / f64::from(bitrate.max(1)))
    }

    /// A frame of `bytes` was made at `now`.
    fn spent(&mut self, bytes: usize, now: Instant, bitrate: u32) {
        self.bits = self.level(now, bitrate) - (bytes * 8) as f64;
        self.at = Some(now);
    }
}

struct Worker {
    capture: Capture,
    damage: damage::Damage,
    shared: Arc<Shared>,
    encoder: Box<dyn Encoder>,
    settings: VideoSettings,
    running: bool,
    /// The screen changed since the last capture.
    dirty: bool,
    /// When the screen became dirty; a capture waits [`COALESCE`] after it.
    dirty_since: Instant,
    keyframes: KeyFramePolicy,
    pacer: Pacer,
    budget: BitBudget,
    /// The bitrate the stream started at (its last `Start`).
    started_bps: u32,
    seq: u32,
    i420: I420Frame,
    /// Sequence number of the last DamageSubtract request.
    subtract_seq: u64,
}

impl Worker {
    fn run(&mut self) -> Result<()> {
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.apply_controls()?;
            // When may the next frame be made, if one is wanted at all?
            let due = if !self.running {
                None
            } else if self.dirty {
                let now = Instant::now();
                let bitrate = self.encoder.bitrate();
                let budget = if bitrate < self.started_bps {
                    self.budget.next_at(now, bitrate)
                } else {
                    now
                };
                Some(
                    (self.dirty_since + COALESCE)
                        .max(self.pacer.next_at())
                        .max(budget),
                )
            } else {
                // An unchanged screen is encoded only for a key frame.
                self.keyframes.due_at(Instant::now())
            };
            let due = match due {
                Some(d) if self.has_room()? => Some(d),
                _ => None,
            };
            if let Some(d) = due
                && Instant::now() >= d
            {
                self.frame()?;
                continue;
            }
            match xutil::wait_event(self.capture.conn(), due)? {
                Some(Event::DamageNotify(ev)) => {
                    // An event the server sent before it processed our last
                    // subtract reports damage that capture already saw.
                    let since = ev.sequence.wrapping_sub(self.subtract_seq as u16) as i16;
                    if since >= 0 {
                        self.mark_dirty(Instant::now());
                    }
                }
                Some(Event::ConfigureNotify(ev)) if ev.window == self.capture.root() => {
                    self.capture.refresh_size()?;
                    self.mark_dirty(Instant::now());
                }
                // Wake-ups from `control`, the receiver or drop: loop again.
                Some(_) | None => {}
            }
        }
        Ok(())
    }

    /// Notes a change of the screen at `at` (the first since the last capture
    /// starts the coalescing wait).
    fn mark_dirty(&mut self, at: Instant) {
        if !self.dirty {
            self.dirty = true;
            self.dirty_since = at;
        }
    }

    /// Whether the slot is free; if not, asks the receiver to wake us.
    fn has_room(&mut self) -> Result<bool> {
        let mut slot = self.shared.slot.lock().expect("slot lock");
        if slot.frame.is_none() {
            return Ok(true);
        }
        if !slot.waiting {
            slot.waiting = true;
            self.shared
                .counters
                .frames_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(false)
    }

    fn apply_controls(&mut self) -> Result<()> {
        let controls = std::mem::take(&mut *self.shared.controls.lock().expect("controls lock"));
        for c in controls {
            match c {
                VideoControl::Start { codec, bitrate_bps } => {
                    self.started_bps = bitrate_bps;
                    if codec != self.encoder.codec() {
                        // A waiting frame of the old codec is no use now.
                        self.shared.slot.lock().expect("slot lock").frame = None;
                        self.encoder =
                            new_encoder(codec, self.settings.encoder_settings(bitrate_bps))?;
                    } else {
                        self.encoder.set_bitrate(bitrate_bps);
                    }
                    self.running = true;
                    self.mark_dirty(Instant::now());
                    self.keyframes.open();
                }
                VideoControl::Stop => {
                    self.running = false;
                    self.shared.slot.lock().expect("slot lock").frame = None;
                }
                VideoControl::KeyFrame => self.keyframes.request(),
                VideoControl::Bitrate { bitrate_bps } => self.encoder.set_bitrate(bitrate_bps),
            }
        }
        Ok(())
    }

    fn frame(&mut self) -> Result<()> {
        let conn = self.capture.conn();
        // Subtract first: a change during the capture then raises a new
        // event instead of being lost.
        self.subtract_seq = conn
            .damage_subtract(self.damage, x11rb::NONE, x11rb::NONE)?
            .sequence_number();
        self.dirty = false;
        let now = Instant::now();
        self.pacer.sent(now);
        let capture_us = xutil::now_us();
        let grabbed = match self.capture.grab() {
            Ok(g) => g,
            // The screen shrank between its resize and our ConfigureNotify:
            // learn the new size and capture again, rather than stop.
            Err(Error::Reply(x11rb::errors::ReplyError::X11Error(e))) => {
                tracing::debug!(error = ?e.error_kind, "capture refused; re-reading the screen size");
                self.capture.refresh_size()?;
                self.mark_dirty(Instant::now());
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.shared
            .counters
            .captures
            .fetch_add(1, Ordering::Relaxed);
        bgra_to_i420(&grabbed, &mut self.i420)?;
        let force = self.keyframes.should_force(now);
        let encoded = match self.encoder.encode(&self.i420, force) {
            Ok(Some(e)) => e,
            Ok(None) => {
                // The encoder skipped the picture to hold its bitrate; it may
                // be the last change, so try again one frame later.
                self.mark_dirty(now + self.pacer.interval);
                return Ok(());
            }
            Err(e) => {
                // One bad frame is not the end of the stream: start over
                // with a fresh encoder and a key frame.
                tracing::warn!(error = %e, "encode failed; resetting the encoder");
                self.encoder = new_encoder(
                    self.encoder.codec(),
                    self.settings.encoder_settings(self.encoder.bitrate()),
                )?;
                self.keyframes.request();
                self.mark_dirty(Instant::now());
                return Ok(());
            }
        };
        if encoded.keyframe {
            self.keyframes.sent(now);
            self.shared
                .counters
                .keyframes
                .fetch_add(1, Ordering::Relaxed);
        }
        self.budget
            .spent(encoded.data.len(), now, self.encoder.bitrate());
        let c = &self.shared.counters;
        c.frames_encoded.fetch_add(1, Ordering::Relaxed);
        c.encode_us
            .fetch_add(now.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.bytes
            .fetch_add(encoded.data.len() as u64, Ordering::Relaxed);
        let frame = VideoFrame {
            header: VideoHeader {
                codec: self.encoder.codec(),
                keyframe: encoded.keyframe,
                width: encoded.width as u16,
                height: encoded.height as u16,
                seq: self.seq,
                capture_us,
            },
            data: encoded.data,
        };
        self.seq = self.seq.wrapping_add(1);
        self.shared.slot.lock().expect("slot lock").frame = Some(frame);
        self.shared.notify.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bit_budget_lets_a_key_frame_through_and_holds_the_average() {
        let t0 = Instant::now();
        let mut b = BitBudget::new();
        let rate = 1_000_000; // 1 Mbit/s: half a second saved is 62 500 bytes
        assert_eq!(b.next_at(t0, rate), t0, "a fresh stream goes at once");
        // A 50 KB key frame fits in what is saved.
        b.spent(50_000, t0, rate);
        assert_eq!(b.next_at(t0, rate), t0);
        // 50 KB more puts it 300 kbit in debt: 300 ms to wait.
        b.spent(50_000, t0, rate);
        let wait = b.next_at(t0, rate) - t0;
        assert!((wait.as_secs_f64() - 0.3).abs() < 0.001, "{wait:?}");
        // Frames of 20 KB, each as soon as allowed, average the bitrate.
        let mut now = t0;
        let mut bytes = 100_000usize;
        for _ in 0..100 {
            now = b.next_at(now, rate);
            b.spent(20_000, now, rate);
            bytes += 20_000;
        }
        let secs = (now - t0).as_secs_f64();
        let avg = bytes as f64 * 8.0 / secs;
        assert!(
            avg < 1_100_000.0 && avg > 900_000.0,
            "{avg} bit/s over {secs} s"
        );
        // Small frames at a high bitrate are never held.
        let mut b = BitBudget::new();
        let mut now = t0;
        for _ in 0..600 {
            assert_eq!(b.next_at(now, 2_500_000), now);
            b.spent(500, now, 2_500_000);
            now += Duration::from_millis(16);
        }
    }

    #[test]
    fn pacer_holds_the_average_and_lets_one_frame_through_early() {
        let mut p = Pacer::new(50); // 20 ms
        let t0 = Instant::now();
        p.sent(t0);
        // Right after an idle stretch, a second frame may follow at once...
        assert!(p.next_at() <= t0);
        p.sent(t0 + Duration::from_millis(1));
        // ...but then the pace is one interval a frame.
        assert_eq!(p.next_at(), t0 + Duration::from_millis(20));
        p.sent(t0 + Duration::from_millis(20));
        assert_eq!(p.next_at(), t0 + Duration::from_millis(40));
        // Over a long busy run the rate never exceeds max_fps (+1 frame).
        let mut now = t0 + Duration::from_millis(40);
        let mut n = 0;
        while now < t0 + Duration::from_secs(1) {
            now = now.max(p.next_at());
            p.sent(now);
            n += 1;
            now += Duration::from_millis(1);
        }
        assert!(n <= 49, "{n} frames in 960 ms at 50 fps");
        // After a long pause the next frame is due at once.
        let later = now + Duration::from_secs(5);
        p.sent(later);
        assert!(p.next_at() <= later);
    }
    use crate::capture::tests::fill_rect;
    use crate::xvfb::Xvfb;
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    async fn next_within(rx: &mut FrameReceiver, secs: u64) -> Option<VideoFrame> {
        tokio::time::timeout(Duration::from_secs(secs), rx.next())
            .await
            .ok()
            .flatten()
    }

    /// Luma at (x, y) after decoding `frame`.
    fn luma_at(dec: &mut Decoder, frame: &VideoFrame, x: usize, y: usize) -> u8 {
        let yuv = dec.decode(&frame.data).unwrap().expect("a picture");
        let (stride, _, _) = yuv.strides();
        yuv.y()[y * stride + x]
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn idle_screen_does_no_work_and_a_change_is_captured() {
        let x = Xvfb::start(640, 360).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        let mut dec = Decoder::new().unwrap();
        rt().block_on(async {
            let first = next_within(&mut rx, 10).await.expect("a first frame");
            assert!(first.header.keyframe);
            assert_eq!(
                (first.header.width, first.header.height, first.header.seq),
                (640, 360, 0)
            );
            assert!(luma_at(&mut dec, &first, 100, 100) < 20, "black screen");
            // Idle: the wait must time out and nothing must be captured.
            assert!(
                next_within(&mut rx, 1).await.is_none(),
                "a frame from an idle screen"
            );
            assert_eq!(pipe.stats().captures, 1);
            fill_rect(&conn, screen, (80, 80, 64, 64), 0xff_ff_ff);
            let f = next_within(&mut rx, 10)
                .await
                .expect("a frame after drawing");
            assert!(!f.header.keyframe);
            assert_eq!(f.header.seq, 1);
            let y = luma_at(&mut dec, &f, 110, 110);
            assert!(y > 200, "white rectangle decoded as luma {y}");
        });
        let s = pipe.stats();
        assert_eq!((s.frames_encoded, s.keyframes), (2, 1));
        assert!(s.captures <= 3, "{s:?}");
    }

    #[test]
    fn newest_frame_wins_under_back_pressure() {
        let x = Xvfb::start(320, 240).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        let mut dec = Decoder::new().unwrap();
        rt().block_on(async {
            let first = next_within(&mut rx, 10).await.unwrap();
            luma_at(&mut dec, &first, 0, 0);
        });
        // Not taken: the slot fills with the frame of this change...
        fill_rect(&conn, screen, (0, 0, 100, 100), 0xff_00_00);
        wait_until("the red frame", || pipe.stats().frames_encoded == 2);
        // ...and these changes wait, merged, instead of queueing.
        for colour in [0x00_ff_00, 0x00_00_ff, 0xff_ff_ff] {
            fill_rect(&conn, screen, (0, 0, 100, 100), colour);
        }
        wait_until("a dropped frame", || pipe.stats().frames_dropped >= 1);
        assert_eq!(
            pipe.stats().frames_encoded,
            2,
            "nothing encoded while the slot is full"
        );
        rt().block_on(async {
            let red = next_within(&mut rx, 10).await.unwrap();
            let y = luma_at(&mut dec, &red, 50, 50);
            assert!((70..95).contains(&y), "red as luma {y}");
            let newest = next_within(&mut rx, 10).await.expect("the newest screen");
            let y = luma_at(&mut dec, &newest, 50, 50);
            assert!(y > 200, "white (the last colour) as luma {y}");
            assert_eq!(newest.header.seq, 2, "green and blue were never encoded");
        });
    }

    #[test]
    fn key_frames_on_request_are_rate_limited_but_served() {
        let x = Xvfb::start(320, 240).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        rt().block_on(async {
            assert!(next_within(&mut rx, 10).await.unwrap().header.keyframe);
            // The first viewer's request after the opening key frame.
            pipe.control(VideoControl::KeyFrame);
            let k = next_within(&mut rx, 10)
                .await
                .expect("the first viewer's key frame");
            assert!(k.header.keyframe);
            let first = k.header.capture_us;
            for _ in 0..10 {
                pipe.control(VideoControl::KeyFrame);
            }
            let k = next_within(&mut rx, 10)
                .await
                .expect("a requested key frame");
            assert!(k.header.keyframe);
            // Capture times are taken beside the limiter's clock (a few µs
            // apart), so the gap is the interval at least.
            let gap = Duration::from_micros(k.header.capture_us - first);
            assert!(
                gap + Duration::from_millis(1) >= KEYFRAME_MIN_INTERVAL,
                "served inside the interval: {gap:?}"
            );
            // Ten requests became one key frame.
            assert!(next_within(&mut rx, 2).await.is_none());
        });
        assert_eq!(pipe.stats().keyframes, 3);
    }

    #[test]
    fn stop_start_and_codec_switch() {
        let x = Xvfb::start(320, 240).unwrap();
        let (conn, screen) = xutil::connect(x.display()).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        rt().block_on(async {
            assert_eq!(
                next_within(&mut rx, 10).await.unwrap().header.codec,
                Codec::H264
            );
            pipe.control(VideoControl::Stop);
            fill_rect(&conn, screen, (0, 0, 50, 50), 0xff_ff_ff);
            assert!(
                next_within(&mut rx, 1).await.is_none(),
                "a frame while stopped"
            );
            pipe.control(VideoControl::Start {
                codec: Codec::Vp8,
                bitrate_bps: 1_000_000,
            });
            let f = next_within(&mut rx, 10).await.expect("a frame after start");
            assert_eq!(f.header.codec, Codec::Vp8);
            assert!(f.header.keyframe);
            assert_eq!(&f.data[3..6], &[0x9d, 0x01, 0x2a]);
            pipe.control(VideoControl::Bitrate {
                bitrate_bps: 500_000,
            });
            fill_rect(&conn, screen, (60, 60, 50, 50), 0xff_00_00);
            let f = next_within(&mut rx, 10)
                .await
                .expect("a frame after a bitrate change");
            assert!(!f.header.keyframe);
        });
    }

    #[test]
    fn a_resize_produces_a_key_frame_at_the_new_size() {
        let x = Xvfb::start(1280, 720).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        rt().block_on(async {
            let first = next_within(&mut rx, 10).await.unwrap();
            assert_eq!((first.header.width, first.header.height), (1280, 720));
            crate::resize::resize_display(x.display(), 800, 600).unwrap();
            // A frame captured just before the resize may still be on its
            // way; the first one at the new size must be a key frame.
            let f = loop {
                let f = next_within(&mut rx, 10)
                    .await
                    .expect("a frame at the new size");
                if (f.header.width, f.header.height) != (1280, 720) {
                    break f;
                }
            };
            assert_eq!((f.header.width, f.header.height), (800, 600));
            assert!(f.header.keyframe, "a new size starts with a key frame");
            let mut dec = Decoder::new().unwrap();
            let yuv = dec.decode(&f.data).unwrap().expect("decodes on its own");
            assert_eq!(yuv.dimensions(), (800, 600));
        });
        drop(pipe);
    }

    #[test]
    fn bad_settings_and_displays_are_named() {
        let err = VideoPipeline::spawn(
            ":0",
            VideoSettings {
                max_fps: 0,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_fps = 0"), "{err}");
        let err = VideoPipeline::spawn(":4242", VideoSettings::default()).unwrap_err();
        assert!(err.to_string().contains(":4242"), "{err}");
    }

    #[test]
    fn receiver_ends_when_the_pipeline_is_dropped() {
        let x = Xvfb::start(320, 240).unwrap();
        let (pipe, mut rx) = VideoPipeline::spawn(x.display(), VideoSettings::default()).unwrap();
        rt().block_on(async {
            next_within(&mut rx, 10).await.unwrap();
            drop(pipe);
            assert!(rx.next().await.is_none());
        });
    }
}

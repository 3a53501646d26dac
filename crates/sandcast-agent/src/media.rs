//! Video, input, clipboard and resize on the session's display.
//!
//! The main loop hands the server's `Video`, `Input`, `Clipboard` and
//! `Resize` messages to one media task. Per display (a restarted Xvfb is a
//! new display) one worker thread applies input, clipboard and resizes in
//! the order they came, so a paste after a clipboard change sees the new
//! text and a click after a resize lands where the viewer meant. Video runs
//! beside it: a pipeline on the display, and a forwarder that owns the
//! `Role::Video` connection and sends only the newest frame. Nothing here
//! ends the session: failures are logged and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::SinkExt;
use sandcast_media::{
    Clipboard, FrameReceiver, H264Mode, InputInjector, MAX_DISPLAY_SIZE, MIN_DISPLAY_SIZE,
    PipelineStats, VideoPipeline, VideoSettings, resize_display,
};
use sandcast_proto::{
    AgentStats, FrameCodec, H264Tuning, InputEvent, LogLine, LogStream, Message, Role, VideoControl,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedWrite;

use crate::channel::{self, Target};

/// How often counters are reported, when one changed.
pub const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// Messages waiting for the media task; input beyond this is dropped.
const INBOX: usize = 1024;
/// Jobs waiting for a display worker; input beyond this is dropped.
const WORKER_QUEUE: usize = 1024;

/// The display size the session wants, and the size it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Asked for by the configuration or the last valid `Resize`.
    pub wanted: (u32, u32),
    /// Last size set and reported, once a display is up.
    pub actual: Option<(u32, u32)>,
}

/// [`Sizes`] shared by the supervisor (which sizes a new display before the
/// browser starts) and the media task.
pub type SharedSizes = Arc<Mutex<Sizes>>;

/// The session's configured size, brought into the range the display
/// accepts; a size outside it is logged, naming it.
pub fn initial_sizes(width: u32, height: u32, out: &mpsc::Sender<Message>) -> SharedSizes {
    let w = width.clamp(MIN_DISPLAY_SIZE.0, MAX_DISPLAY_SIZE.0);
    let h = height.clamp(MIN_DISPLAY_SIZE.1, MAX_DISPLAY_SIZE.1);
    if (w, h) != (width, height) {
        log(
            out,
            "agent",
            format!("configured display size {width}x{height} is out of range; using {w}x{h}"),
        );
    }
    Arc::new(Mutex::new(Sizes {
        wanted: (w, h),
        actual: None,
    }))
}

/// Resizes `display` to the wanted size and reports the size it has, as
/// `DisplaySize`, when it changed or when `always` is set. Blocking.
pub fn apply_wanted_size(
    display: &str,
    sizes: &SharedSizes,
    out: &mpsc::Sender<Message>,
    always: bool,
) {
    let (wanted, before) = {
        let s = sizes.lock().unwrap();
        (s.wanted, s.actual)
    };
    match resize_display(display, wanted.0, wanted.1) {
        Ok(size) => {
            sizes.lock().unwrap().actual = Some(size);
            if always || before != Some(size) {
                let _ = out.blocking_send(Message::DisplaySize {
                    width: size.0,
                    height: size.1,
                });
            }
        }
        Err(e) => log(
            out,
            "agent",
            format!(
                "resizing display {display} to {}x{}: {e}",
                wanted.0, wanted.1
            ),
        ),
    }
}

/// Counters reported in `Stats`.
#[derive(Debug, Default)]
struct Counters {
    input_dropped: AtomicU64,
}

/// The main loop's handle on the media task.
pub struct Media {
    tx: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Media {
    /// Starts the media task for the displays `display` announces.
    pub fn spawn(
        target: Target,
        out: mpsc::Sender<Message>,
        display: watch::Receiver<Option<String>>,
        sizes: SharedSizes,
        max_fps: u32,
        h264_mode: H264Mode,
    ) -> Media {
        let (tx, rx) = mpsc::channel(INBOX);
        let counters = Arc::new(Counters::default());
        let (video_tx, video_rx) = mpsc::channel(8);
        let task = MediaTask {
            target,
            out,
            sizes,
            max_fps,
            h264_mode,
            counters: counters.clone(),
            display: None,
            worker: None,
            video: Video::default(),
            video_events: video_tx,
            clipboard: None,
            last_stats: AgentStats::default(),
        };
        let task = tokio::spawn(task.run(rx, display, video_rx));
        Media { tx, counters, task }
    }

    /// Hands a `Video`, `Input`, `Clipboard` or `Resize` message over.
    /// Input that finds the task busy is dropped and counted, never queued
    /// without bound.
    pub fn handle(&self, msg: Message) {
        let is_input = matches!(msg, Message::Input(_));
        if self.tx.try_send(msg).is_err() && is_input {
            self.counters.input_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops video, input and clipboard.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// What the frame forwarder tells the media task.
#[derive(Debug)]
enum VideoEvent {
    /// The pipeline of this generation stopped publishing frames.
    PipelineEnded(u64),
    /// The video connection could not be opened or broke.
    ConnectionFailed(String),
}

/// Video state: wanted between `Start` and `Stop`.
#[derive(Default)]
struct Video {
    settings: Option<VideoSettings>,
    pipeline: Option<(u64, VideoPipeline)>,
    generation: u64,
    feed: Option<mpsc::Sender<(u64, FrameReceiver)>>,
    forwarder: Option<JoinHandle<()>>,
    /// Counters of pipelines that have ended.
    ended: PipelineStats,
}

struct MediaTask {
    target: Target,
    out: mpsc::Sender<Message>,
    sizes: SharedSizes,
    max_fps: u32,
    h264_mode: H264Mode,
    counters: Arc<Counters>,
    display: Option<String>,
    worker: Option<std::sync::mpsc::SyncSender<Job>>,
    video: Video,
    video_events: mpsc::Sender<VideoEvent>,
    /// The server's last clipboard text, set again on a new display.
    clipboard: Option<String>,
    last_stats: AgentStats,
}

impl MediaTask {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Message>,
        mut display: watch::Receiver<Option<String>>,
        mut video_rx: mpsc::Receiver<VideoEvent>,
    ) {
        let mut tick = tokio::time::interval(STATS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let current = display.borrow_and_update().clone();
        self.set_display(current).await;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.on_message(msg).await,
                    None => break,
                },
                changed = display.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = display.borrow_and_update().clone();
                    if current != self.display {
                        self.set_display(current).await;
                    }
                }
                Some(ev) = video_rx.recv() => self.on_video_event(ev).await,
                _ = tick.tick() => self.report_stats(),
            }
        }
        self.stop_video().await;
    }

    async fn on_message(&mut self, msg: Message) {
        match msg {
            Message::Input(ev) => self.queue(Job::Input(ev)),
            Message::Clipboard { text } => {
                self.clipboard = Some(text.clone());
                if self.worker.is_some() {
                    self.queue(Job::SetClipboard(text));
                }
            }
            Message::Resize { width, height } => self.resize(width, height),
            Message::Video(control) => self.on_video(control).await,
            other => log(&self.out, "agent", format!("media cannot handle {other:?}")),
        }
    }

    /// A job for the display worker; refused input is counted.
    fn queue(&mut self, job: Job) {
        let refused = match &self.worker {
            Some(w) => match w.try_send(job) {
                Ok(()) => None,
                Err(std::sync::mpsc::TrySendError::Full(job))
                | Err(std::sync::mpsc::TrySendError::Disconnected(job)) => Some(job),
            },
            None => Some(job),
        };
        match refused {
            Some(Job::Input(_)) => {
                self.counters.input_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Some(Job::SetClipboard(_)) => log(
                &self.out,
                "clipboard",
                "no display for the clipboard; it is set once one is up".into(),
            ),
            Some(Job::Resize) => {}
            None => {}
        }
    }

    fn resize(&mut self, width: u32, height: u32) {
        let (min, max) = (MIN_DISPLAY_SIZE, MAX_DISPLAY_SIZE);
        if !(min.0..=max.0).contains(&width) || !(min.1..=max.1).contains(&height) {
            log(
                &self.out,
                "agent",
                format!(
                    "refusing resize to {width}x{height}: outside {}x{} to {}x{}",
                    min.0, min.1, max.0, max.1
                ),
            );
            // The viewer learns the size it still has.
            if let Some((w, h)) = self.sizes.lock().unwrap().actual {
                let _ = self.out.try_send(Message::DisplaySize {
                    width: w,
                    height: h,
                });
            }
            return;
        }
        self.sizes.lock().unwrap().wanted = (width, height);
        // Without a display, the supervisor sizes the next one.
        if self.worker.is_some() {
            self.queue(Job::Resize);
        }
    }

    async fn set_display(&mut self, display: Option<String>) {
        // The old display's worker ends once its queue is empty.
        self.worker = None;
        self.drop_pipeline().await;
        self.display = display.clone();
        let Some(display) = display else { return };
        let (tx, rx) = std::sync::mpsc::sync_channel(WORKER_QUEUE);
        let ctx = WorkerCtx {
            display: display.clone(),
            out: self.out.clone(),
            sizes: self.sizes.clone(),
            counters: self.counters.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("sandcast-input".into())
            .spawn(move || ctx.run(rx));
        match spawned {
            Ok(_) => {
                self.worker = Some(tx);
                // A Resize that came while the display started is applied.
                self.queue(Job::Resize);
                if let Some(text) = self.clipboard.clone() {
                    self.queue(Job::SetClipboard(text));
                }
            }
            Err(e) => log(
                &self.out,
                "agent",
                format!("cannot start the input thread: {e}"),
            ),
        }
        if self.video.settings.is_some() {
            self.spawn_pipeline().await;
        }
    }

    async fn on_video(&mut self, control: VideoControl) {
        match control {
            VideoControl::Start { codec, bitrate_bps } => {
                self.video.settings = Some(VideoSettings {
                    codec,
                    bitrate_bps,
                    max_fps: self.max_fps,
                    h264_mode: self.h264_mode,
                });
                if self.video.forwarder.is_none() {
                    self.start_forwarder();
                }
                match &self.video.pipeline {
                    Some((_, p)) => p.control(control),
                    None => self.spawn_pipeline().await,
                }
            }
            VideoControl::Stop => self.stop_video().await,
            VideoControl::KeyFrame | VideoControl::Bitrate { .. } => {
                if let (VideoControl::Bitrate { bitrate_bps }, Some(s)) =
                    (&control, self.video.settings.as_mut())
                {
                    s.bitrate_bps = *bitrate_bps;
                }
                match &self.video.pipeline {
                    Some((_, p)) => p.control(control),
                    // A pipeline that failed gets another chance.
                    None if self.video.settings.is_some() => self.spawn_pipeline().await,
                    None => {}
                }
            }
        }
    }

    async fn on_video_event(&mut self, ev: VideoEvent) {
        match ev {
            VideoEvent::PipelineEnded(generation) => {
                if self
                    .video
                    .pipeline
                    .as_ref()
                    .is_some_and(|(g, _)| *g == generation)
                {
                    let why = self.video.pipeline.as_ref().and_then(|(_, p)| p.error());
                    log(
                        &self.out,
                        "video",
                        format!(
                            "video pipeline on {} stopped: {}",
                            self.display.as_deref().unwrap_or("no display"),
                            why.as_deref().unwrap_or("the display went away")
                        ),
                    );
                    self.drop_pipeline().await;
                }
            }
            VideoEvent::ConnectionFailed(why) => {
                log(
                    &self.out,
                    "video",
                    format!("video connection: {why}; video stops until the next start"),
                );
                self.stop_video().await;
            }
        }
    }

    fn start_forwarder(&mut self) {
        let (tx, rx) = mpsc::channel(2);
        self.video.feed = Some(tx);
        self.video.forwarder = Some(tokio::spawn(forward(
            self.target.clone(),
            rx,
            self.video_events.clone(),
        )));
    }

    async fn spawn_pipeline(&mut self) {
        let (Some(settings), Some(display)) = (self.video.settings, self.display.clone()) else {
            return;
        };
        let spawned = tokio::task::spawn_blocking({
            let display = display.clone();
            move || VideoPipeline::spawn(&display, settings)
        })
        .await;
        match spawned {
            Ok(Ok((pipeline, frames))) => {
                self.video.generation += 1;
                let generation = self.video.generation;
                self.video.pipeline = Some((generation, pipeline));
                if let Some(feed) = &self.video.feed {
                    let _ = feed.send((generation, frames)).await;
                }
            }
            Ok(Err(e)) => log(
                &self.out,
                "video",
                format!("cannot start video on {display}: {e}"),
            ),
            Err(e) => log(&self.out, "video", format!("video start panicked: {e}")),
        }
    }

    /// Ends the current pipeline, keeping its counts.
    async fn drop_pipeline(&mut self) {
        if let Some((_, p)) = self.video.pipeline.take() {
            let stats = p.stats();
            self.video.ended = self.video.ended.plus(&stats);
            // Joining the pipeline's thread blocks briefly; not on the runtime.
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
        }
    }

    async fn stop_video(&mut self) {
        self.video.settings = None;
        self.video.feed = None;
        if let Some(f) = self.video.forwarder.take() {
            // Closes the video connection, even mid-send.
            f.abort();
            let _ = f.await;
        }
        self.drop_pipeline().await;
    }

    fn stats(&self) -> AgentStats {
        let live = self
            .video
            .pipeline
            .as_ref()
            .map(|(_, p)| p.stats())
            .unwrap_or_default();
        self.video
            .ended
            .plus(&live)
            .to_agent_stats(self.counters.input_dropped.load(Ordering::Relaxed))
    }

    fn report_stats(&mut self) {
        let stats = self.stats();
        if stats != self.last_stats && self.out.try_send(Message::Stats(stats.clone())).is_ok() {
            self.last_stats = stats;
        }
    }
}

/// The encoder mode for the server's tuning.
pub fn h264_mode(tuning: H264Tuning) -> H264Mode {
    match tuning {
        H264Tuning::Camera => H264Mode::RealTimeEveryFrame,
        H264Tuning::Screen => H264Mode::Screen,
    }
}

/// Owns the video connection: sends the newest frame of the current
/// pipeline, takes the next pipeline's frames when the display changes.
async fn forward(
    target: Target,
    mut feed: mpsc::Receiver<(u64, FrameReceiver)>,
    events: mpsc::Sender<VideoEvent>,
) {
    let conn = match channel::open(&target, Role::Video).await {
        Ok(c) => c,
        Err(e) => {
            let _ = events
                .send(VideoEvent::ConnectionFailed(format!("{e:#}")))
                .await;
            return;
        }
    };
    let mut sink = FramedWrite::new(conn, FrameCodec);
    let mut current: Option<(u64, FrameReceiver)> = None;
    enum Step {
        Feed(Option<(u64, FrameReceiver)>),
        Frame(Option<sandcast_proto::VideoFrame>),
    }
    loop {
        let step = tokio::select! {
            biased;
            f = feed.recv() => Step::Feed(f),
            f = next_frame(&mut current) => Step::Frame(f),
        };
        match step {
            Step::Feed(Some(next)) => current = Some(next),
            Step::Feed(None) => break,
            // Sending completes before the next frame is taken, so a slow
            // connection makes the pipeline skip frames, not queue them.
            Step::Frame(Some(frame)) => {
                if let Err(e) = sink.send(frame).await {
                    let _ = events
                        .send(VideoEvent::ConnectionFailed(e.to_string()))
                        .await;
                    return;
                }
            }
            Step::Frame(None) => {
                if let Some((generation, _)) = current.take() {
                    let _ = events.send(VideoEvent::PipelineEnded(generation)).await;
                }
            }
        }
    }
    let _ = SinkExt::<sandcast_proto::VideoFrame>::close(&mut sink).await;
}

async fn next_frame(
    current: &mut Option<(u64, FrameReceiver)>,
) -> Option<sandcast_proto::VideoFrame> {
    match current {
        Some((_, rx)) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Work for a display's worker thread, in the order it arrived.
enum Job {
    Input(InputEvent),
    SetClipboard(String),
    /// Bring the display to the wanted size and report it.
    Resize,
}

struct WorkerCtx {
    display: String,
    out: mpsc::Sender<Message>,
    sizes: SharedSizes,
    counters: Arc<Counters>,
}

impl WorkerCtx {
    fn run(self, jobs: std::sync::mpsc::Receiver<Job>) {
        let mut input = match InputInjector::connect(&self.display) {
            Ok(i) => Some(i),
            Err(e) => {
                log(
                    &self.out,
                    "input",
                    format!("no input on {}: {e}", self.display),
                );
                None
            }
        };
        let out = self.out.clone();
        let clipboard = match Clipboard::spawn(&self.display, move |text| {
            let _ = out.blocking_send(Message::Clipboard { text });
        }) {
            Ok(c) => Some(c),
            Err(e) => {
                log(
                    &self.out,
                    "clipboard",
                    format!("no clipboard on {}: {e}", self.display),
                );
                None
            }
        };
        let mut first = true;
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Input(ev) => self.input(input.as_mut(), &ev),
                Job::SetClipboard(text) => {
                    let result = match &clipboard {
                        Some(c) => c.set(&text).map_err(|e| e.to_string()),
                        None => Err("no clipboard on this display".into()),
                    };
                    if let Err(e) = result {
                        // The text may be a secret: only its length is logged.
                        log(
                            &self.out,
                            "clipboard",
                            format!("setting {} bytes of clipboard text: {e}", text.len()),
                        );
                    }
                }
                Job::Resize => {
                    // A resize request is always answered; the check after
                    // the display came up only when the size changed.
                    apply_wanted_size(&self.display, &self.sizes, &self.out, !first);
                    first = false;
                }
            }
        }
    }

    fn input(&self, input: Option<&mut InputInjector>, ev: &InputEvent) {
        let result = match input {
            Some(i) => i.apply(ev).map_err(|e| e.to_string()),
            None => Err("no input connection".into()),
        };
        if let Err(e) = result {
            let n = self.counters.input_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // A flood is logged sparsely; keys and text are never logged, as
            // they may be a password.
            if n == 1 || n.is_multiple_of(100) {
                let what = match ev {
                    InputEvent::Key { .. } | InputEvent::Text { .. } => "key or text".into(),
                    other => format!("{e}: {other:?}"),
                };
                log(
                    &self.out,
                    "input",
                    format!("refused input ({n} so far): {what}"),
                );
            }
        }
    }
}

/// A best-effort log line for the server.
pub fn log(out: &mpsc::Sender<Message>, source: &str, line: String) {
    let _ = out.try_send(Message::Log(LogLine {
        source: source.into(),
        stream: LogStream::Agent,
        line,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_tunings_map_to_encoder_modes() {
        assert_eq!(h264_mode(H264Tuning::default()), H264Mode::default());
        assert_eq!(h264_mode(H264Tuning::Camera), H264Mode::RealTimeEveryFrame);
        assert_eq!(h264_mode(H264Tuning::Screen), H264Mode::Screen);
    }

    #[test]
    fn configured_sizes_are_clamped_and_named() {
        let (tx, mut rx) = mpsc::channel(4);
        let s = initial_sizes(1280, 720, &tx);
        assert_eq!(s.lock().unwrap().wanted, (1280, 720));
        assert!(rx.try_recv().is_err());
        let s = initial_sizes(10, 99_999, &tx);
        assert_eq!(
            s.lock().unwrap().wanted,
            (MIN_DISPLAY_SIZE.0, MAX_DISPLAY_SIZE.1)
        );
        match rx.try_recv() {
            Ok(Message::Log(l)) => assert!(l.line.contains("10x99999"), "{}", l.line),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_display_is_sized_and_reported() {
        let (w, h) = MAX_DISPLAY_SIZE;
        let x = sandcast_media::xvfb::Xvfb::start(w, h).unwrap();
        let (out, mut out_rx) = mpsc::channel(16);
        // Odd sides are rounded down to what the encoders take.
        let sizes = initial_sizes(1025, 769, &out);
        apply_wanted_size(x.display(), &sizes, &out, true);
        assert_eq!(
            out_rx.try_recv().unwrap(),
            Message::DisplaySize {
                width: 1024,
                height: 768
            }
        );
        assert_eq!(sizes.lock().unwrap().actual, Some((1024, 768)));
        // Unchanged and not asked: nothing to report.
        apply_wanted_size(x.display(), &sizes, &out, false);
        assert!(out_rx.try_recv().is_err());
        sizes.lock().unwrap().wanted = (640, 480);
        apply_wanted_size(x.display(), &sizes, &out, false);
        assert_eq!(
            out_rx.try_recv().unwrap(),
            Message::DisplaySize {
                width: 640,
                height: 480
            }
        );
    }

    #[tokio::test]
    async fn input_without_a_display_is_counted() {
        let (out, _out_rx) = mpsc::channel(16);
        let (_display_tx, display_rx) = watch::channel(None);
        let sizes = initial_sizes(800, 600, &out);
        let media = Media::spawn(
            Target::Unix("/nonexistent".into()),
            out,
            display_rx,
            sizes,
            30,
            H264Mode::default(),
        );
        media.handle(Message::Input(InputEvent::PointerMove { x: 1, y: 1 }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while media.counters.input_dropped.load(Ordering::Relaxed) != 1 {
            assert!(tokio::time::Instant::now() < deadline, "not counted");
            tokio::task::yield_now().await;
        }
        media.stop();
    }

    #[tokio::test]
    async fn bad_resize_is_refused_naming_the_size() {
        let (out, mut out_rx) = mpsc::channel(16);
        let (_display_tx, display_rx) = watch::channel(None);
        let sizes = initial_sizes(800, 600, &out);
        sizes.lock().unwrap().actual = Some((800, 600));
        let media = Media::spawn(
            Target::Unix("/nonexistent".into()),
            out,
            display_rx,
            sizes.clone(),
            30,
            H264Mode::default(),
        );
        media.handle(Message::Resize {
            width: 100_000,
            height: 600,
        });
        let mut saw_log = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), out_rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                Message::Log(l) => {
                    assert!(l.line.contains("100000x600"), "{}", l.line);
                    saw_log = true;
                }
                Message::DisplaySize { width, height } => {
                    assert_eq!((width, height), (800, 600));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(saw_log);
        assert_eq!(sizes.lock().unwrap().wanted, (800, 600));
        media.stop();
    }
}

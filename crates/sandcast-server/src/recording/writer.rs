//! The recording's file writer: a thread of its own behind a bounded
//! queue. The frame path only ever tries to queue a frame ([`Sink::push`]):
//! when the writer is behind (a slow disk, an fsync), the frame is dropped
//! and counted, and the muxer waits for the next key frame (the gap shows in
//! the frames' sequence numbers), so the recording never slows the video.
//!
//! Each segment file starts with its init segment; each fragment is
//! appended whole and synced once. The caps are checked before a fragment is
//! written: past one, the recording stops cleanly (the session goes on).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use sandcast_proto::{Codec, VideoFrame};
use tokio::sync::oneshot;

use super::mux::{Frame, Muxer, Output};
use super::{Disk, Meta};

/// Frames queued for the writer before new ones are dropped.
const QUEUE: usize = 64;
/// How long the end of a session waits for its recording's last fragment.
pub const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Told when the recording stops early (`"stopped"`) or skips video
/// (`"paused"`), with why: for the session's log and events.
pub type Notify = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

enum Item {
    Frame(VideoFrame),
    /// The session ended at this capture-clock time (microseconds).
    Finish(u64, oneshot::Sender<()>),
}

/// The frame path's end of a recording: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Item>,
    open: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Sink {
    /// Queues a frame for the writer, or drops it (and counts it) when the
    /// writer is behind or the recording has stopped.
    pub fn push(&self, frame: &VideoFrame) {
        if !self.open.load(Ordering::Relaxed) {
            return;
        }
        match self.tx.try_send(Item::Frame(frame.clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => self.open.store(false, Ordering::Relaxed),
        }
    }

    /// Frames dropped because the writer was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether the recording still takes frames.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }
}

/// A running recording, owned by its session.
pub struct Recorder {
    sink: Sink,
}

/// What the writer thread needs.
pub struct Setup {
    /// The session's recording directory (made, 0700).
    pub dir: PathBuf,
    /// Its metadata as it starts.
    pub meta: Meta,
    /// Most bytes of this recording.
    pub max_bytes: u64,
    /// Most bytes of every recording together.
    pub disk_max_bytes: u64,
    /// What every recording uses.
    pub disk: Arc<Disk>,
    /// Told when the recording stops early, or skips video.
    pub notify: Notify,
}

impl Recorder {
    /// Starts the writer thread.
    pub fn start(setup: Setup) -> std::io::Result<Recorder> {
        setup.meta.save(&setup.dir)?;
        let (tx, rx) = sync_channel(QUEUE);
        let sink = Sink {
            tx,
            open: Arc::new(AtomicBool::new(true)),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let open = sink.open.clone();
        let dropped = sink.dropped.clone();
        std::thread::Builder::new()
            .name("sandcast-rec".into())
            .spawn(move || {
                Writer {
                    setup,
                    muxer: Muxer::new(),
                    file: None,
                    bytes: 0,
                    last_seq: None,
                    skipped_vp8: false,
                    open,
                    dropped,
                }
                .run(rx)
            })?;
        Ok(Recorder { sink })
    }

    /// The frame path's end.
    pub fn sink(&self) -> Sink {
        self.sink.clone()
    }

    /// Whether it still records (no cap reached, no write failed).
    pub fn is_open(&self) -> bool {
        self.sink.is_open()
    }

    /// Ends the recording: the last fragment is written (the last frame
    /// lasting until now) and its expiry set. Resolves once written, or
    /// after [`FINISH_WAIT`] (a disk that hangs must not hold up the end of
    /// the session; the writer finishes on its own).
    pub async fn finish(self) {
        let (tx, rx) = oneshot::channel();
        let sender = self.sink.tx.clone();
        let end_us = now_us();
        let done = async move {
            // Waits for room in the queue, on a blocking thread.
            let sent = tokio::task::spawn_blocking(move || sender.send(Item::Finish(end_us, tx)))
                .await
                .is_ok_and(|r| r.is_ok());
            if sent {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(FINISH_WAIT, done).await.is_err() {
            tracing::warn!("a recording's writer did not finish in time");
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Writer {
    setup: Setup,
    muxer: Muxer,
    /// The current segment's file.
    file: Option<File>,
    /// Bytes of this recording written.
    bytes: u64,
    last_seq: Option<u32>,
    skipped_vp8: bool,
    open: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Item>) {
        let mut done = None;
        while let Ok(item) = rx.recv() {
            match item {
                Item::Frame(v) => {
                    if self.open.load(Ordering::Relaxed) {
                        self.frame(v);
                    }
                }
                Item::Finish(end_us, reply) => {
                    if self.open.load(Ordering::Relaxed)
                        && let Some(out) = self.muxer.finish(Some(end_us))
                    {
                        self.write(out);
                    }
                    done = Some(reply);
                    break;
                }
            }
        }
        self.open.store(false, Ordering::Relaxed);
        self.setup.meta.ended_ms = Some(crate::manager::now_ms());
        self.setup.meta.frames_dropped = self.dropped.load(Ordering::Relaxed);
        self.setup.meta.set_expiry();
        if let Err(e) = self.setup.meta.save(&self.setup.dir) {
            tracing::error!(error = %e, "saving a recording's metadata");
        }
        if let Some(reply) = done {
            let _ = reply.send(());
        }
    }

    fn frame(&mut self, v: VideoFrame) {
        let h = v.header;
        if h.codec != Codec::H264 {
            if !self.skipped_vp8 {
                self.skipped_vp8 = true;
                (self.setup.notify)(
                    "paused",
                    "the recording skips VP8 video (a viewer that decodes only VP8 holds the session on it); it goes on at the next H.264 key frame",
                );
            }
            self.last_seq = None;
            return;
        }
        let gap = self
            .last_seq
            .is_some_and(|last| h.seq != last.wrapping_add(1));
        self.last_seq = Some(h.seq);
        let frame = Frame {
            data: &v.data,
            keyframe: h.keyframe,
            width: h.width,
            height: h.height,
            capture_us: h.capture_us,
        };
        if gap && let Some(out) = self.muxer.lost(h.capture_us) {
            self.write(out);
        }
        // A frame the muxer cannot take (before a key frame) is simply
        // not recorded.
        if let Ok(outs) = self.muxer.push(frame) {
            for out in outs {
                self.write(out);
            }
        }
    }

    fn write(&mut self, out: Output) {
        if !self.open.load(Ordering::Relaxed) {
            return;
        }
        let result = match out {
            Output::Segment { init, .. } => self.new_segment(&init),
            Output::Fragment { bytes, .. } => self.append(&bytes),
        };
        if let Err(why) = result {
            self.stop(&why);
        }
    }

    fn check_caps(&self, len: u64) -> Result<(), String> {
        let s = &self.setup;
        if self.bytes + len > s.max_bytes {
            return Err(format!(
                "the recording reached its size cap of {} MiB ([recording] max_mib)",
                s.max_bytes >> 20
            ));
        }
        if s.disk.used() + len > s.disk_max_bytes {
            return Err(format!(
                "the recordings directory reached its cap of {} MiB ([recording] disk_mib)",
                s.disk_max_bytes >> 20
            ));
        }
        Ok(())
    }

    fn new_segment(&mut self, init: &[u8]) -> Result<(), String> {
        self.check_caps(init.len() as u64)?;
        let n = self.setup.meta.segments;
        let path = super::segment_path(&self.setup.dir, n);
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("creating {}: {e}", path.display()))?
        };
        f.write_all(init)
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.file = Some(f);
        self.bytes += init.len() as u64;
        self.setup.disk.add(init.len() as u64);
        self.setup.meta.segments = n + 1;
        self.setup
            .meta
            .save(&self.setup.dir)
            .map_err(|e| format!("saving the recording's metadata: {e}"))?;
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.check_caps(bytes.len() as u64)?;
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        f.write_all(bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("writing the recording: {e}"))?;
        self.bytes += bytes.len() as u64;
        self.setup.disk.add(bytes.len() as u64);
        Ok(())
    }

    /// Stops the recording early; the session goes on.
    fn stop(&mut self, why: &str) {
        self.open.store(false, Ordering::Relaxed);
        self.file = None;
        self.setup.meta.stopped = Some(why.to_string());
        let _ = self.setup.meta.save(&self.setup.dir);
        (self.setup.notify)("stopped", why);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    use bytes::Bytes;
    use sandcast_proto::VideoHeader;

    use super::*;
    use crate::recording::mux::testing;
    use crate::recording::{Meta, recover, segment_path};

    fn video(frames: &[(Vec<u8>, bool, u64)]) -> Vec<VideoFrame> {
        frames
            .iter()
            .enumerate()
            .map(|(i, (data, keyframe, capture_us))| VideoFrame {
                header: VideoHeader {
                    codec: Codec::H264,
                    keyframe: *keyframe,
                    width: 160,
                    height: 120,
                    seq: i as u32,
                    capture_us: *capture_us,
                },
                data: Bytes::from(data.clone()),
            })
            .collect()
    }

    fn setup(dir: &std::path::Path, max_bytes: u64) -> (Setup, Arc<Mutex<Vec<String>>>) {
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let d = crate::recording::create_dir(dir, "s1").unwrap();
        (
            Setup {
                dir: d,
                meta: Meta::new("s1", 60),
                max_bytes,
                disk_max_bytes: 1 << 30,
                disk: Arc::new(Disk::default()),
                notify: Arc::new(move |state, why| {
                    t.lock().unwrap().push(format!("{state}: {why}"))
                }),
            },
            told,
        )
    }

    /// Pushes every frame, waiting for room as a steady stream would.
    fn feed(sink: &Sink, frames: &[VideoFrame]) {
        for f in frames {
            while sink.tx.try_send(Item::Frame(f.clone())).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    #[tokio::test]
    async fn a_recording_is_private_whole_and_expires_after_its_ttl() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("recordings");
        let (setup, told) = setup(&dir, 1 << 30);
        let d = setup.dir.clone();
        let disk = setup.disk.clone();
        let r = Recorder::start(setup).unwrap();
        feed(&r.sink(), &video(&testing::h264(160, 120, 90)));
        r.finish().await;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&d), 0o700);
        let seg = segment_path(&d, 0);
        assert_eq!(mode(&seg), 0o600);
        assert_eq!(mode(&d.join("meta.json")), 0o600);
        let len = std::fs::metadata(&seg).unwrap().len();
        assert_eq!(
            recover::complete_length(&seg).unwrap(),
            Some(len),
            "every fragment whole"
        );
        assert_eq!(disk.used(), len);
        let meta = Meta::load(&d).unwrap().unwrap();
        assert_eq!(meta.segments, 1);
        let ended = meta.ended_ms.unwrap();
        assert_eq!(meta.expires_ms, Some(ended + 60_000));
        assert!(told.lock().unwrap().is_empty(), "{told:?}");
        assert_eq!(crate::recording::sweep(&dir, &disk, ended + 59_999), 0);
        assert!(seg.exists());
        assert_eq!(
            disk.used(),
            len + std::fs::metadata(d.join("meta.json")).unwrap().len()
        );
        assert_eq!(crate::recording::sweep(&dir, &disk, ended + 60_000), 1);
        assert!(!d.exists());
        assert_eq!(disk.used(), 0);
    }

    #[tokio::test]
    async fn the_size_cap_stops_the_recording_cleanly_and_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let frames = video(&testing::h264(160, 120, 90));
        // Room for the init segment and about one fragment.
        let (setup, told) = setup(tmp.path(), 40_000);
        let d = setup.dir.clone();
        let r = Recorder::start(setup).unwrap();
        feed(&r.sink(), &frames[..61]);
        // The writer stops once the second fragment does not fit.
        for _ in 0..500 {
            if !r.is_open() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!r.is_open(), "the cap stopped it");
        // Frames offered now are neither queued nor counted as dropped.
        r.sink().push(&frames[61]);
        assert_eq!(r.sink().dropped(), 0);
        r.finish().await;
        let seg = segment_path(&d, 0);
        let len = std::fs::metadata(&seg).unwrap().len();
        assert!(len <= 40_000, "{len}");
        assert_eq!(
            recover::complete_length(&seg).unwrap(),
            Some(len),
            "still playable"
        );
        let meta = Meta::load(&d).unwrap().unwrap();
        assert!(
            meta.stopped.as_deref().unwrap().contains("max_mib"),
            "{meta:?}"
        );
        let told = told.lock().unwrap();
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].starts_with("stopped: the recording reached its size cap"),
            "{told:?}"
        );
    }

    #[tokio::test]
    async fn a_size_change_writes_a_second_playable_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let (setup, _) = setup(tmp.path(), 1 << 30);
        let d = setup.dir.clone();
        let r = Recorder::start(setup).unwrap();
        let small = video(&testing::h264(160, 120, 40));
        let mut big = video(&testing::h264(320, 240, 40));
        let last = small.last().unwrap().header;
        for (i, f) in big.iter_mut().enumerate() {
            f.header.width = 320;
            f.header.height = 240;
            f.header.seq = last.seq + 1 + i as u32;
            f.header.capture_us += last.capture_us + 33_333 - 1_700_000_000_000_000;
        }
        feed(&r.sink(), &small);
        feed(&r.sink(), &big);
        r.finish().await;
        assert_eq!(Meta::load(&d).unwrap().unwrap().segments, 2);
        for n in 0..2 {
            let seg = segment_path(&d, n);
            let len = std::fs::metadata(&seg).unwrap().len();
            assert_eq!(
                recover::complete_length(&seg).unwrap(),
                Some(len),
                "segment {n}"
            );
        }
    }

    #[test]
    fn a_full_queue_drops_frames_and_counts_them() {
        let (tx, _rx) = sync_channel(1);
        let sink = Sink {
            tx,
            open: Arc::new(AtomicBool::new(true)),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let f = video(&testing::h264(160, 120, 1)).remove(0);
        sink.push(&f);
        sink.push(&f);
        sink.push(&f);
        assert_eq!(sink.dropped(), 2);
    }
}

//! Prometheus metrics: sessions by state, starts, failures, restarts and the
//! time from request to ready; per live session and viewer, the video the
//! session encodes and each viewer gets (frames, key frames, bytes, RTT,
//! loss). The per-session series are rebuilt at each scrape from the live
//! sessions, so an ended session's series go with it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use sandcast_webrtc::{ViewerCounters, ViewerId};

use crate::manager::Snapshot;
use crate::store::State;

/// A metric's label set.
type Labels = Vec<(String, String)>;
/// A family of counters whose values are set from a snapshot.
type Counters = Family<Labels, Counter<u64, AtomicU64>>;
/// A family of floating-point gauges.
type Floats = Family<Labels, Gauge<f64, AtomicU64>>;

/// The server's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Sessions by state, refreshed from the store at each scrape.
    pub sessions: Family<Vec<(String, String)>, Gauge>,
    /// Sessions created.
    pub starts: Counter,
    /// Sessions that failed.
    pub failures: Counter,
    /// Child restarts reported by agents.
    pub restarts: Counter,
    /// Seconds from create to ready.
    pub start_seconds: Histogram,
    /// Sessions of the warm pool, ready or warming, set at each scrape.
    pool: Family<Vec<(String, String)>, Gauge>,
    live: LiveFamilies,
}

/// What a session's viewers of the WebSocket video stream were sent, all
/// of them together; counted by their sockets as they send, read at each
/// scrape (atomics: no lock between a socket and the scrape).
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Frames sent.
    pub frames_sent: AtomicU64,
    /// Frames not sent (waiting for a key frame, or the link full).
    pub frames_skipped: AtomicU64,
    /// Encoded bytes sent.
    pub bytes_sent: AtomicU64,
    /// Gaps over 250 ms between frames sent with frames skipped between
    /// (see `sandcast_webrtc::freeze`).
    pub freezes: AtomicU64,
    /// Their total length in milliseconds.
    pub freeze_ms: AtomicU64,
}

/// A copy of [`StreamCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamTotals {
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames not sent.
    pub frames_skipped: u64,
    /// Encoded bytes sent.
    pub bytes_sent: u64,
    /// Freezes.
    pub freezes: u64,
    /// Their total length in milliseconds.
    pub freeze_ms: u64,
}

impl StreamCounters {
    /// The counts now.
    pub fn totals(&self) -> StreamTotals {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StreamTotals {
            frames_sent: get(&self.frames_sent),
            frames_skipped: get(&self.frames_skipped),
            bytes_sent: get(&self.bytes_sent),
            freezes: get(&self.freezes),
            freeze_ms: get(&self.freeze_ms),
        }
    }
}

/// The per-session and per-viewer series.
#[derive(Default)]
struct LiveFamilies {
    viewers: Family<Labels, Gauge>,
    automation: Family<Labels, Gauge>,
    frames_encoded: Counters,
    key_frames: Counters,
    encode_seconds: Floats,
    frames_dropped: Counters,
    input_dropped: Counters,
    frames_sent: Counters,
    frames_skipped: Counters,
    key_frames_sent: Counters,
    bytes_sent: Counters,
    key_frame_requests: Counters,
    freezes: Counters,
    freeze_seconds: Floats,
    rtt: Floats,
    loss: Floats,
    target_bitrate: Family<Labels, Gauge>,
    stream_frames_sent: Counters,
    stream_frames_skipped: Counters,
    stream_bytes_sent: Counters,
    stream_freezes: Counters,
    stream_freeze_seconds: Floats,
}

impl LiveFamilies {
    fn register(&self, r: &mut Registry) {
        r.register(
            "session_viewers",
            "Viewers of a live session (WebRTC, the WebSocket stream and noVNC)",
            self.viewers.clone(),
        );
        r.register(
            "session_automation_clients",
            "DevTools clients of a live session",
            self.automation.clone(),
        );
        r.register(
            "session_frames_encoded",
            "Video frames the session's agent encoded (its report)",
            self.frames_encoded.clone(),
        );
        r.register(
            "session_key_frames_encoded",
            "Key frames the session's agent encoded (its report)",
            self.key_frames.clone(),
        );
        r.register(
            "session_encode_seconds",
            "Seconds the session's agent spent producing frames: capture, conversion, encoding (its report; grows like a counter)",
            self.encode_seconds.clone(),
        );
        r.register(
            "session_frames_dropped",
            "Video frames the session's agent dropped because its channel was busy (its report)",
            self.frames_dropped.clone(),
        );
        r.register(
            "session_input_dropped",
            "Input events the session's agent refused (its report)",
            self.input_dropped.clone(),
        );
        r.register(
            "stream_frames_sent",
            "Video frames sent to a session's viewers of the WebSocket video stream, all together",
            self.stream_frames_sent.clone(),
        );
        r.register(
            "stream_frames_skipped",
            "Video frames not sent to a WebSocket stream viewer (waiting for a key frame, or its link full)",
            self.stream_frames_skipped.clone(),
        );
        r.register(
            "stream_sent_bytes",
            "Encoded video bytes sent to a session's WebSocket stream viewers",
            self.stream_bytes_sent.clone(),
        );
        r.register(
            "stream_freezes",
            "Times a WebSocket stream viewer got no frame for over 250 ms while the encoder made frames",
            self.stream_freezes.clone(),
        );
        r.register(
            "stream_freeze_seconds",
            "Total length of the WebSocket stream viewers' freezes (grows like a counter)",
            self.stream_freeze_seconds.clone(),
        );
        r.register(
            "viewer_frames_sent",
            "Video frames sent to a WebRTC viewer",
            self.frames_sent.clone(),
        );
        r.register(
            "viewer_frames_skipped",
            "Video frames not sent to a WebRTC viewer (waiting for a key frame)",
            self.frames_skipped.clone(),
        );
        r.register(
            "viewer_key_frames_sent",
            "Key frames sent to a WebRTC viewer",
            self.key_frames_sent.clone(),
        );
        r.register(
            "viewer_sent_bytes",
            "Encoded video bytes sent to a WebRTC viewer",
            self.bytes_sent.clone(),
        );
        r.register(
            "viewer_key_frame_requests",
            "PLI and FIR a WebRTC viewer sent",
            self.key_frame_requests.clone(),
        );
        r.register(
            "viewer_freezes",
            "Times a WebRTC viewer got no frame for over 250 ms while the encoder made frames (held back for a key frame or unwritable)",
            self.freezes.clone(),
        );
        r.register(
            "viewer_freeze_seconds",
            "Total length of a WebRTC viewer's freezes (grows like a counter)",
            self.freeze_seconds.clone(),
        );
        r.register(
            "viewer_rtt_seconds",
            "A WebRTC viewer's last round-trip time (receiver reports)",
            self.rtt.clone(),
        );
        r.register(
            "viewer_loss_ratio",
            "Fraction of packets a WebRTC viewer lost (last receiver report)",
            self.loss.clone(),
        );
        r.register(
            "viewer_target_bitrate_bps",
            "The bitrate the loss controller asks for a WebRTC viewer",
            self.target_bitrate.clone(),
        );
    }

    fn clear(&self) {
        self.viewers.clear();
        self.automation.clear();
        self.encode_seconds.clear();
        self.freeze_seconds.clear();
        self.stream_freeze_seconds.clear();
        for f in [
            &self.frames_encoded,
            &self.key_frames,
            &self.frames_dropped,
            &self.input_dropped,
            &self.frames_sent,
            &self.frames_skipped,
            &self.key_frames_sent,
            &self.bytes_sent,
            &self.key_frame_requests,
            &self.freezes,
            &self.stream_frames_sent,
            &self.stream_frames_skipped,
            &self.stream_bytes_sent,
            &self.stream_freezes,
        ] {
            f.clear();
        }
        self.rtt.clear();
        self.loss.clear();
        self.target_bitrate.clear();
    }
}

/// Sets a counter read from a snapshot.
fn set(family: &Counters, labels: &Labels, v: u64) {
    family
        .get_or_create(labels)
        .inner()
        .store(v, Ordering::Relaxed);
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sandcast");
        let sessions = Family::<Vec<(String, String)>, Gauge>::default();
        let starts = Counter::default();
        let failures = Counter::default();
        let restarts = Counter::default();
        // From 50 ms: a session claimed from the warm pool is ready that fast.
        let start_seconds = Histogram::new([
            0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
        ]);
        let pool = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "pool_sessions",
            "Sessions of the warm pool: ready to be claimed, or warming",
            pool.clone(),
        );
        registry.register("sessions", "Sessions by state", sessions.clone());
        registry.register("session_starts", "Sessions created", starts.clone());
        registry.register("session_failures", "Sessions that failed", failures.clone());
        registry.register(
            "child_restarts",
            "Child processes restarted by agents",
            restarts.clone(),
        );
        registry.register(
            "session_start_seconds",
            "Time from the create request to ready",
            start_seconds.clone(),
        );
        let live = LiveFamilies::default();
        live.register(&mut registry);
        Metrics {
            registry: Mutex::new(registry),
            sessions,
            starts,
            failures,
            restarts,
            start_seconds,
            pool,
            live,
        }
    }

    /// The warm pool's sessions now: `ready` of `all`.
    pub fn set_pool(&self, ready: usize, all: usize) {
        let state = |s: &str| vec![("state".to_string(), s.to_string())];
        self.pool.get_or_create(&state("ready")).set(ready as i64);
        self.pool
            .get_or_create(&state("warming"))
            .set(all.saturating_sub(ready) as i64);
    }

    /// The text exposition with the per-session and per-viewer series of
    /// the live sessions and the gateway's viewers. They exist only while
    /// the registry's lock is held for this scrape, so [`Metrics::render`]
    /// (for a scrape without the key) never shows them.
    pub fn render_live(
        &self,
        sessions: &[(String, Snapshot, StreamTotals)],
        viewers: &[(String, ViewerId, ViewerCounters)],
    ) -> String {
        let registry = self.registry.lock().unwrap();
        self.set_live(sessions, viewers);
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String");
        self.live.clear();
        out
    }

    fn set_live(
        &self,
        sessions: &[(String, Snapshot, StreamTotals)],
        viewers: &[(String, ViewerId, ViewerCounters)],
    ) {
        // Empty: render_live clears them before it lets go of the lock.
        let f = &self.live;
        for (id, s, st) in sessions {
            let l = vec![("session".to_string(), id.clone())];
            f.viewers.get_or_create(&l).set(s.viewers as i64);
            f.automation.get_or_create(&l).set(s.automation as i64);
            set(&f.frames_encoded, &l, s.agent.frames_encoded);
            set(&f.key_frames, &l, s.agent.key_frames);
            f.encode_seconds
                .get_or_create(&l)
                .set(s.agent.encode_us as f64 / 1e6);
            set(&f.frames_dropped, &l, s.agent.frames_dropped);
            set(&f.input_dropped, &l, s.agent.input_dropped);
            if *st != StreamTotals::default() {
                set(&f.stream_frames_sent, &l, st.frames_sent);
                set(&f.stream_frames_skipped, &l, st.frames_skipped);
                set(&f.stream_bytes_sent, &l, st.bytes_sent);
                set(&f.stream_freezes, &l, st.freezes);
                f.stream_freeze_seconds
                    .get_or_create(&l)
                    .set(st.freeze_ms as f64 / 1000.0);
            }
        }
        for (session, viewer, c) in viewers {
            let l = vec![
                ("session".to_string(), session.clone()),
                ("viewer".to_string(), viewer.0.to_string()),
            ];
            set(&f.frames_sent, &l, c.frames_sent);
            set(&f.frames_skipped, &l, c.frames_skipped);
            set(&f.key_frames_sent, &l, c.key_frames_sent);
            set(&f.bytes_sent, &l, c.bytes_sent);
            set(&f.key_frame_requests, &l, c.key_frame_requests);
            set(&f.freezes, &l, c.freezes);
            f.freeze_seconds
                .get_or_create(&l)
                .set(c.freeze_ms as f64 / 1000.0);
            f.rtt.get_or_create(&l).set(f64::from(c.rtt_ms) / 1000.0);
            f.loss
                .get_or_create(&l)
                .set(f64::from(c.loss_permille) / 1000.0);
            f.target_bitrate
                .get_or_create(&l)
                .set(i64::from(c.target_bitrate_bps));
        }
    }

    /// Sets the per-state gauges from counts.
    pub fn set_states(&self, counts: &[(State, i64)]) {
        for state in State::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.sessions
                .get_or_create(&vec![("state".to_string(), state.as_str().to_string())])
                .set(n);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().unwrap()).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_series() {
        let m = Metrics::new();
        m.starts.inc();
        m.start_seconds.observe(0.8);
        m.set_states(&[(State::Ready, 2)]);
        let text = m.render();
        assert!(text.contains("sandcast_session_starts_total 1"), "{text}");
        assert!(
            text.contains("sandcast_sessions{state=\"ready\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sandcast_sessions{state=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("sandcast_session_start_seconds_bucket{le=\"1.0\"} 1"),
            "{text}"
        );
        assert!(text.contains("sandcast_child_restarts_total 0"), "{text}");
        m.set_pool(1, 3);
        let text = m.render();
        assert!(
            text.contains("sandcast_pool_sessions{state=\"ready\"} 1")
                && text.contains("sandcast_pool_sessions{state=\"warming\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn live_series_follow_the_sessions_and_viewers_there_are() {
        let m = Metrics::new();
        let snap = Snapshot {
            viewers: 1,
            agent: sandcast_proto::AgentStats {
                frames_encoded: 42,
                encode_us: 210_000,
                ..Default::default()
            },
            ..Default::default()
        };
        let stream = StreamTotals {
            frames_sent: 30,
            frames_skipped: 4,
            bytes_sent: 9_000,
            freezes: 1,
            freeze_ms: 400,
        };
        // A session no stream viewer ever opened has no stream series.
        let quiet = Snapshot::default();
        let counters = ViewerCounters {
            frames_sent: 40,
            bytes_sent: 123_456,
            rtt_ms: 12,
            loss_permille: 25,
            freezes: 2,
            freeze_ms: 1500,
            ..Default::default()
        };
        let text = m.render_live(
            &[
                ("abc".into(), snap, stream),
                ("def".into(), quiet, StreamTotals::default()),
            ],
            &[("abc".into(), ViewerId(7), counters)],
        );
        assert!(
            !text.contains("sandcast_stream_frames_sent_total{session=\"def\"}"),
            "{text}"
        );
        for want in [
            "sandcast_session_viewers{session=\"abc\"} 1",
            "sandcast_session_frames_encoded_total{session=\"abc\"} 42",
            "sandcast_session_encode_seconds{session=\"abc\"} 0.21",
            "sandcast_viewer_frames_sent_total{session=\"abc\",viewer=\"7\"} 40",
            "sandcast_viewer_sent_bytes_total{session=\"abc\",viewer=\"7\"} 123456",
            "sandcast_viewer_rtt_seconds{session=\"abc\",viewer=\"7\"} 0.012",
            "sandcast_viewer_loss_ratio{session=\"abc\",viewer=\"7\"} 0.025",
            "sandcast_viewer_freezes_total{session=\"abc\",viewer=\"7\"} 2",
            "sandcast_viewer_freeze_seconds{session=\"abc\",viewer=\"7\"} 1.5",
            "sandcast_stream_frames_sent_total{session=\"abc\"} 30",
            "sandcast_stream_frames_skipped_total{session=\"abc\"} 4",
            "sandcast_stream_sent_bytes_total{session=\"abc\"} 9000",
            "sandcast_stream_freezes_total{session=\"abc\"} 1",
            "sandcast_stream_freeze_seconds{session=\"abc\"} 0.4",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        // A scrape without the key never shows them.
        let text = m.render();
        assert!(!text.contains("abc"), "{text}");
        // The session ended: its series go.
        let text = m.render_live(&[], &[]);
        assert!(!text.contains("abc"), "{text}");
    }
}

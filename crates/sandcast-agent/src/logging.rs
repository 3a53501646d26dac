//! The agent's tracing subscriber: events of the agent and its libraries
//! (the video pipeline, the encoders, the clipboard report through
//! `tracing`) at [`LEVEL`] and above become log lines of the session, sent to
//! the server on the control connection, so `GET /api/sessions/{id}/logs`
//! shows them. Before the control connection is up, and after it is gone,
//! they go to standard error.
//!
//! The thread that raises an event (the video pipeline's, the clipboard's)
//! only formats a line and `try_send`s it into a bounded queue: it never
//! waits for the connection. A full queue drops the line and counts it, and
//! the forwarder says how many were dropped. Sending never logs into itself:
//! the forwarder and the connection's writer run under a subscriber that
//! writes to standard error only ([`sending`]), and an event raised while
//! the layer handles another on the same thread is dropped.

use std::cell::Cell;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sandcast_proto::{LogLine, LogStream, Message};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::instrument::{WithDispatch, WithSubscriber as _};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Events at this level and above reach the session's log; the rest are
/// not even formatted.
pub const LEVEL: Level = Level::WARN;

/// Lines waiting for the control connection; beyond this they are dropped
/// and counted.
pub const QUEUE: usize = 256;

/// Longest line sent, in bytes; the rest is cut.
const MAX_LINE: usize = 4000;

/// How often the forwarder reports lines dropped while nothing else comes.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// The layer that formats events and queues them for the server.
pub struct ForwardLayer {
    shared: Arc<Shared>,
}

/// Attaches the layer to a control connection and reads its counter.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    level: Level,
    capacity: usize,
    /// The queue while a control connection is attached; standard error
    /// otherwise.
    queue: Mutex<Option<mpsc::Sender<LogLine>>>,
    /// Lines dropped because the queue was full, not yet reported.
    dropped: AtomicU64,
}

/// A layer passing events at `level` and above, queueing up to `capacity`
/// lines once attached.
pub fn layer(level: Level, capacity: usize) -> (ForwardLayer, Handle) {
    let shared = Arc::new(Shared {
        level,
        capacity: capacity.max(1),
        queue: Mutex::new(None),
        dropped: AtomicU64::new(0),
    });
    (
        ForwardLayer {
            shared: shared.clone(),
        },
        Handle { shared },
    )
}

static INSTALLED: OnceLock<Handle> = OnceLock::new();

/// Makes the layer the process's subscriber, at [`LEVEL`] with a queue of
/// [`QUEUE`]. Events go to standard error until [`attach`].
pub fn install() {
    let (layer, handle) = layer(LEVEL, QUEUE);
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(handle);
    }
}

/// Sends the installed layer's events on `out` until the returned guard is
/// dropped; `None` when no layer was installed (the agent's own tests).
pub fn attach(out: mpsc::Sender<Message>) -> Option<Attached> {
    INSTALLED.get().map(|h| h.attach(out))
}

/// Runs `fut` (a part of the path that sends logs) with its own events going
/// to standard error only, so sending a line never produces another.
pub fn sending<F: Future>(fut: F) -> WithDispatch<F> {
    let (layer, _) = layer(LEVEL, 1);
    fut.with_subscriber(tracing_subscriber::registry().with(layer))
}

/// Keeps the layer attached to a control connection; dropping it detaches
/// (events go to standard error again) and lets the forwarder end once it
/// has passed on what was queued.
pub struct Attached {
    shared: Arc<Shared>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        *self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Handle {
    /// Queues events for `out` from now on, and spawns the forwarder that
    /// moves them there. Needs a tokio runtime.
    pub fn attach(&self, out: mpsc::Sender<Message>) -> Attached {
        let (tx, rx) = mpsc::channel(self.shared.capacity);
        *self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        tokio::spawn(sending(forward(rx, out, self.shared.clone())));
        Attached {
            shared: self.shared.clone(),
        }
    }

    /// Lines dropped and not yet reported.
    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Moves queued lines to the control connection's outbox; waits there, not
/// in the thread that raised the event. Reports drops with the next line,
/// or after [`DROP_REPORT_INTERVAL`] when none comes.
async fn forward(mut rx: mpsc::Receiver<LogLine>, out: mpsc::Sender<Message>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(DROP_REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            line = rx.recv() => line,
            _ = tick.tick() => {
                if !report_drops(&out, &shared).await {
                    return;
                }
                continue;
            }
        };
        if !report_drops(&out, &shared).await {
            return;
        }
        let Some(line) = line else { return };
        if out.send(Message::Log(line)).await.is_err() {
            return;
        }
    }
}

/// Sends a line saying how many lines were dropped, if any were; false
/// when the connection is gone.
async fn report_drops(out: &mpsc::Sender<Message>, shared: &Shared) -> bool {
    let n = shared.dropped.swap(0, Ordering::Relaxed);
    if n == 0 {
        return true;
    }
    let line = LogLine {
        source: "agent".into(),
        stream: LogStream::Agent,
        line: format!(
            "{n} log lines dropped: more than {} were waiting for the connection",
            shared.capacity
        ),
    };
    out.send(Message::Log(line)).await.is_ok()
}

thread_local! {
    /// Set while this thread is inside the layer.
    static IN_LAYER: Cell<bool> = const { Cell::new(false) };
}

impl<S: Subscriber> Layer<S> for ForwardLayer {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        *metadata.level() <= self.shared.level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.shared.level))
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() > self.shared.level {
            return;
        }
        // An event raised while this thread formats or queues one (a
        // field's Debug that logs) is dropped, never handled recursively.
        if IN_LAYER.with(|f| f.replace(true)) {
            return;
        }
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                IN_LAYER.with(|f| f.set(false));
            }
        }
        let _reset = Reset;
        let line = format_event(event);
        let queue = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match queue {
            Some(tx) => match tx.try_send(line) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The forwarder is gone with the connection.
                Err(mpsc::error::TrySendError::Closed(line)) => {
                    eprintln!("sandcast-agent: {}", line.line)
                }
            },
            None => eprintln!("sandcast-agent: {}", line.line),
        }
    }
}

/// `LEVEL target: message key=value …`, on one line, at most [`MAX_LINE`]
/// bytes.
fn format_event(event: &Event<'_>) -> LogLine {
    let meta = event.metadata();
    let mut fields = Fields::default();
    event.record(&mut fields);
    let mut line = format!("{} {}: {}", meta.level(), meta.target(), fields.message);
    line.push_str(&fields.rest);
    // One event, one line: the session's log is line-oriented.
    let mut line: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    LogLine {
        source: "agent".into(),
        stream: LogStream::Agent,
        line,
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(rx: &mut mpsc::Receiver<Message>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Message::Log(l) => lines.push(l.line),
                other => panic!("{other:?}"),
            }
        }
        lines
    }

    /// Lets the forwarder move what is queued.
    async fn settle(out: &mut mpsc::Receiver<Message>, want: usize) -> Vec<String> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            match tokio::time::timeout_at(deadline, out.recv()).await {
                Ok(Some(Message::Log(l))) => got.push(l.line),
                Ok(Some(other)) => panic!("{other:?}"),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }

    #[tokio::test]
    async fn events_at_and_above_the_level_reach_the_connection_as_lines() {
        let (layer, handle) = layer(Level::WARN, 16);
        let (out, mut out_rx) = mpsc::channel(64);
        let _attached = handle.attach(out);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!("a trace");
            tracing::debug!("a debug");
            tracing::info!("an info");
            tracing::warn!(len = 70_000, "clipboard text\ntoo long");
            tracing::error!(error = %"boom", "video pipeline stopped");
        });
        let got = settle(&mut out_rx, 2).await;
        assert_eq!(
            got,
            [
                "WARN sandcast_agent::logging::tests: clipboard text too long len=70000",
                "ERROR sandcast_agent::logging::tests: video pipeline stopped error=boom",
            ]
        );
        assert!(logs(&mut out_rx).is_empty());
        assert_eq!(handle.dropped(), 0);
    }

    #[tokio::test]
    async fn the_level_is_a_setting_of_the_layer() {
        let (layer, handle) = layer(Level::INFO, 16);
        let (out, mut out_rx) = mpsc::channel(64);
        let _attached = handle.attach(out);
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::debug!("a debug");
            tracing::info!("an info");
        });
        let got = settle(&mut out_rx, 1).await;
        assert_eq!(got, ["INFO sandcast_agent::logging::tests: an info"]);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_the_count_is_reported() {
        let (layer, handle) = layer(Level::WARN, 4);
        // The outbox holds one message, so the forwarder is soon stuck and
        // the queue fills behind it; the emitting thread never waits.
        let (out, mut out_rx) = mpsc::channel(1);
        let _attached = handle.attach(out);
        let subscriber = tracing_subscriber::registry().with(layer);
        // A thread of its own, as the media threads are: nothing here may
        // wait for the runtime.
        std::thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || {
                for i in 0..20 {
                    tracing::warn!(i, "flood");
                }
            });
        })
        .join()
        .unwrap();
        let dropped = handle.dropped();
        // At most the queue, the forwarder's hand and the outbox hold lines.
        assert!(dropped >= 20 - 4 - 2, "only {dropped} dropped");
        let got = settle(&mut out_rx, 20 - dropped as usize + 1).await;
        let kept: Vec<&String> = got.iter().filter(|l| l.contains("flood")).collect();
        assert_eq!(kept.len() as u64, 20 - dropped, "{got:?}");
        let report = got
            .iter()
            .find(|l| l.contains("log lines dropped"))
            .unwrap_or_else(|| panic!("no drop report in {got:?}"));
        assert!(
            report.starts_with(&format!("{dropped} log lines dropped")),
            "{report}"
        );
        assert_eq!(handle.dropped(), 0);
    }

    #[tokio::test]
    async fn before_attaching_and_after_detaching_nothing_is_queued() {
        let (layer, handle) = layer(Level::WARN, 4);
        let subscriber = Arc::new(tracing_subscriber::registry().with(layer));
        let (out, mut out_rx) = mpsc::channel(8);
        tracing::subscriber::with_default(subscriber.clone(), || {
            tracing::warn!("to standard error: not attached yet");
        });
        let attached = handle.attach(out);
        tracing::subscriber::with_default(subscriber.clone(), || tracing::warn!("queued"));
        drop(attached);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("to standard error: detached");
        });
        let got = settle(&mut out_rx, 2).await;
        assert_eq!(got, ["WARN sandcast_agent::logging::tests: queued"]);
        // Detached, the forwarder ends and lets go of the outbox.
        assert!(
            tokio::time::timeout(Duration::from_secs(5), out_rx.recv())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_sending_path_does_not_log_into_itself() {
        let (layer, handle) = layer(Level::WARN, 4);
        let (out, mut out_rx) = mpsc::channel(8);
        let _attached = handle.attach(out);
        let subscriber = tracing_subscriber::registry().with(layer);
        let _default = tracing::subscriber::set_default(subscriber);
        // What the connection's writer raises goes to standard error.
        sending(async { tracing::warn!("from the writer") }).await;
        tracing::warn!("from elsewhere");
        let got = settle(&mut out_rx, 2).await;
        assert_eq!(got, ["WARN sandcast_agent::logging::tests: from elsewhere"]);
    }

    #[test]
    fn long_lines_are_cut_at_a_character_boundary() {
        let (layer, handle) = layer(Level::WARN, 4);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (out, mut out_rx) = mpsc::channel(8);
        let _attached = rt.block_on(async { handle.attach(out) });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::warn!("{}", "é".repeat(MAX_LINE));
        });
        let got = rt.block_on(settle(&mut out_rx, 1));
        assert_eq!(got.len(), 1);
        assert!(got[0].len() <= MAX_LINE && got[0].len() > MAX_LINE - 2);
    }
}

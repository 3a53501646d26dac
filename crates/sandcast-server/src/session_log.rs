//! A session's log on the host's disk: `<data_dir>/logs/<id>.log` and the
//! one previous file `<id>.log.1`, mode 0600, in a 0700 directory.
//!
//! Whatever the session prints, its log cannot grow past
//! [`LogLimits::max_bytes`](crate::config::LogLimits) (the current file is
//! rotated at half of it) nor be written faster than the rate limit: lines
//! beyond the budget are dropped and counted, and a marker line says how
//! many lines and bytes were dropped and why. Each line is
//! `<RFC 3339 UTC time, milliseconds> <source> <stream>: <text>`; the
//! fixed-width time sorts as text, which [`crate::log_read`] relies on.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

use crate::budget::Budget;
use crate::config::LogLimits;

/// Longest text of one line; longer lines are cut and say so.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// The smallest `logs.max_bytes`: half of it holds several longest lines.
pub const MIN_MAX_BYTES: u64 = 4 * MAX_LINE_BYTES as u64;
/// Length of the time at the start of each line.
pub const STAMP_LEN: usize = "2026-01-01T00:00:00.000Z".len();
/// Least time between two marker lines about dropped output.
const MARKER_EVERY: Duration = Duration::from_secs(1);
/// Lines kept for slow followers before they skip ahead; the ring holds
/// its lines while anyone follows, so it is small (at most 4 MiB of
/// longest lines).
const FOLLOW_BUFFER: usize = 256;
/// The budget of the server's own lines about a session (state changes,
/// agent connections): apart from the session's output, so it cannot crowd
/// them out, yet bounded, since some quote what the agent sent.
const SERVER_RATE: u64 = 4 * 1024;
/// Burst of the server's own lines.
const SERVER_BURST: u64 = 64 * 1024;

/// The time as it starts a log line.
pub fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The log directory under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("logs")
}

/// A session's log files, the previous one first.
pub fn paths(dir: &Path, id: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{id}.log.1")),
        dir.join(format!("{id}.log")),
    ]
}

/// The session id a file of the log directory belongs to, if it is a log.
pub fn id_of(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(".log.1")
        .or_else(|| file_name.strip_suffix(".log"))
        .filter(|id| crate::limits::check_id(id).is_ok())
}

/// Removes a session's log files; missing files are fine.
pub fn remove(dir: &Path, id: &str) -> std::io::Result<()> {
    for p in paths(dir, id) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates the log directory, mode 0700 (also when it existed).
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn open_append(path: &Path, truncate: bool) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(!truncate)
        .write(true)
        .truncate(truncate)
        .mode(0o600)
        .open(path)?;
    // An older file may have been made with another mode.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// One session's log: the writer with its limits, and live lines for
/// followers.
pub struct SessionLog {
    writer: Mutex<Writer>,
    lines: broadcast::Sender<String>,
}

impl SessionLog {
    /// Opens (appending) the log of session `id` in `dir`. When the file
    /// cannot be opened the log still works for followers and says why in
    /// the server's own log.
    pub fn open(dir: &Path, id: &str, limits: &LogLimits) -> SessionLog {
        let writer = Writer::open(dir, id, limits, Instant::now());
        let (lines, _) = broadcast::channel(FOLLOW_BUFFER);
        SessionLog {
            writer: Mutex::new(writer),
            lines,
        }
    }

    /// Writes one line (from `source`'s `stream`), unless over the limits.
    pub fn write(&self, source: &str, stream: &str, text: &str) {
        let mut w = self.writer.lock().unwrap();
        for line in w.write(Instant::now(), Utc::now(), source, stream, text) {
            let _ = self.lines.send(line);
        }
    }

    /// Writes a line of the server's own about the session, under the
    /// server's budget rather than the session's.
    pub fn write_server(&self, text: &str) {
        let mut w = self.writer.lock().unwrap();
        for line in w.write_server(Instant::now(), Utc::now(), text) {
            let _ = self.lines.send(line);
        }
    }

    /// Lines as they are written (without their newline).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.lines.subscribe()
    }

    /// Writes the marker of what was dropped, if anything was, and closes
    /// the file; later lines go to followers only.
    pub fn close(&self) {
        let mut w = self.writer.lock().unwrap();
        if let Some(line) = w.flush_marker(Utc::now()) {
            let _ = self.lines.send(line);
        }
        w.file = None;
    }
}

/// The writer: file, rotation and budget. Times are passed in.
struct Writer {
    id: String,
    current: PathBuf,
    previous: PathBuf,
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// The current file is rotated before it would pass this.
    rotate_at: u64,
    budget: Budget,
    server_budget: Budget,
    rate: u64,
    burst: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
    last_marker: Option<Instant>,
}

impl Writer {
    fn open(dir: &Path, id: &str, limits: &LogLimits, now: Instant) -> Writer {
        let [previous, current] = paths(dir, id);
        let file = create_dir(dir)
            .and_then(|()| open_append(&current, false))
            .inspect_err(|e| {
                tracing::error!(session = id, error = %e, "opening {}", current.display());
            })
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        // A longest line must always fit the bucket, or it could never pass.
        let burst = limits.burst_bytes.max(MAX_LINE_BYTES as u64 + 256);
        Writer {
            id: id.to_string(),
            current,
            previous,
            file,
            size,
            rotate_at: (limits.max_bytes / 2).max(MIN_MAX_BYTES / 2),
            budget: Budget::new(limits.rate_bytes_per_second, burst, now),
            server_budget: Budget::new(SERVER_RATE, SERVER_BURST, now),
            rate: limits.rate_bytes_per_second,
            burst,
            dropped_lines: 0,
            dropped_bytes: 0,
            last_marker: None,
        }
    }

    /// Writes a line if the budget allows; returns the lines written (a
    /// marker about earlier drops may come first).
    fn write(
        &mut self,
        now: Instant,
        at: DateTime<Utc>,
        source: &str,
        stream: &str,
        text: &str,
    ) -> Vec<String> {
        let line = format_line(at, source, stream, text);
        let cost = line.len() as u64 + 1;
        if !self.budget.take(cost, now) {
            self.dropped_lines += 1;
            self.dropped_bytes += cost;
            return Vec::new();
        }
        self.admitted(now, at, line)
    }

    /// Like [`Writer::write`] for the server's own lines.
    fn write_server(&mut self, now: Instant, at: DateTime<Utc>, text: &str) -> Vec<String> {
        let line = format_line(at, "server", "agent", text);
        let cost = line.len() as u64 + 1;
        if !self.server_budget.take(cost, now) {
            self.dropped_lines += 1;
            self.dropped_bytes += cost;
            return Vec::new();
        }
        self.admitted(now, at, line)
    }

    /// Writes an admitted line, after the marker of earlier drops when one
    /// is due.
    fn admitted(&mut self, now: Instant, at: DateTime<Utc>, line: String) -> Vec<String> {
        let mut out = Vec::with_capacity(2);
        let marker_due = self
            .last_marker
            .is_none_or(|t| now.saturating_duration_since(t) >= MARKER_EVERY);
        if marker_due && let Some(m) = self.flush_marker(at) {
            self.last_marker = Some(now);
            out.push(m);
        }
        self.append(&line);
        out.push(line);
        out
    }

    /// Writes the marker line about drops not yet reported, if any.
    fn flush_marker(&mut self, at: DateTime<Utc>) -> Option<String> {
        if self.dropped_lines == 0 {
            return None;
        }
        let text = format!(
            "dropped {} lines ({} bytes) of this session's log: over the log rate limit of {} bytes/s (burst {})",
            self.dropped_lines, self.dropped_bytes, self.rate, self.burst
        );
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
        let line = format_line(at, "server", "limit", &text);
        self.append(&line);
        Some(line)
    }

    fn append(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if self.file.is_some() && self.size + len > self.rotate_at {
            self.rotate();
        }
        let Some(f) = self.file.as_mut() else { return };
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        match f.write_all(&buf) {
            Ok(()) => self.size += len,
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "writing the session log; it stops here");
                self.file = None;
            }
        }
    }

    /// The current file becomes the previous one (replacing it).
    fn rotate(&mut self) {
        self.file = None;
        let result = std::fs::rename(&self.current, &self.previous)
            .and_then(|()| open_append(&self.current, true));
        match result {
            Ok(f) => {
                self.file = Some(f);
                self.size = 0;
            }
            Err(e) => {
                tracing::error!(session = %self.id, error = %e, "rotating the session log; it stops here");
            }
        }
    }
}

/// One line: time, source, stream, text; newlines and other control
/// characters of the session's text are escaped so a line stays one line
/// with its real time in front.
fn format_line(at: DateTime<Utc>, source: &str, stream: &str, text: &str) -> String {
    let mut line = String::with_capacity(STAMP_LEN + 2 + source.len() + stream.len() + text.len());
    line.push_str(&stamp(at));
    line.push(' ');
    push_word(&mut line, source);
    line.push(' ');
    push_word(&mut line, stream);
    line.push_str(": ");
    let mut cut = text.len().min(MAX_LINE_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    for c in text[..cut].chars() {
        match c {
            '\t' => line.push(c),
            c if c.is_control() => line.extend(c.escape_default()),
            c => line.push(c),
        }
    }
    if cut < text.len() {
        line.push_str(&format!(" [cut: {} more bytes]", text.len() - cut));
    }
    line
}

/// A name (child, stream) as one bounded word.
fn push_word(line: &mut String, word: &str) {
    let mut n = 0;
    for c in word.chars().take(64) {
        line.push(if c.is_whitespace() || c.is_control() || c == ':' {
            '_'
        } else {
            c
        });
        n += 1;
    }
    if n == 0 {
        line.push('-');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u64, burst: u64, max: u64) -> LogLimits {
        LogLimits {
            rate_bytes_per_second: rate,
            burst_bytes: burst,
            max_bytes: max,
            ..LogLimits::default()
        }
    }

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sc-log-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const ID: &str = "0123456789abcdef01234567";

    fn read_all(dir: &Path) -> String {
        paths(&dir.join("logs"), ID)
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect()
    }

    #[test]
    fn lines_carry_time_source_stream_and_stay_one_line() {
        let at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00.5Z")
            .unwrap()
            .to_utc();
        let l = format_line(at, "launch sh", "stdout", "a\nb\r\u{1b}[0m\tc");
        assert_eq!(
            l,
            "2026-12-06T10:00:00.500Z launch_sh stdout: a\\nb\\r\\u{1b}[0m\tc"
        );
        assert_eq!(&l[..STAMP_LEN], "2026-12-06T10:00:00.500Z");
        let long = "é".repeat(MAX_LINE_BYTES);
        let l = format_line(at, "", "x", &long);
        assert!(l.len() < MAX_LINE_BYTES + 100, "{}", l.len());
        assert!(l.contains(" - x: "), "{}", &l[..40]);
        assert!(l.ends_with(&format!("[cut: {} more bytes]", MAX_LINE_BYTES)));
    }

    #[test]
    fn output_beyond_the_rate_is_dropped_counted_and_marked() {
        let dir = temp_dir();
        let t0 = Instant::now();
        let at = Utc::now();
        // 20 000 B/s, 20 KiB burst (raised to fit one longest line).
        let mut w = Writer::open(&dir.join("logs"), ID, &limits(20_000, 1, 1 << 20), t0);
        let text = "x".repeat(999);
        let mut written = 0;
        for _ in 0..100 {
            written += w.write(t0, at, "launch", "stdout", &text).len();
        }
        // The burst is 16 KiB + 256: about 16 lines of ~1040 bytes.
        assert!((14..=17).contains(&written), "{written}");
        let dropped = 100 - written as u64;
        // One second later 20 000 bytes are back: a marker, then the line.
        let out = w.write(t0 + Duration::from_secs(1), at, "launch", "stdout", "after");
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].contains(&format!("server limit: dropped {dropped} lines (")),
            "{}",
            out[0]
        );
        assert!(out[0].contains("rate limit of 20000 bytes/s"), "{}", out[0]);
        assert!(out[1].ends_with("launch stdout: after"));
        let file = read_all(&dir);
        assert_eq!(file.lines().count(), written + 2);
        assert!(file.lines().any(|l| l.contains("dropped")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_sessions_output_cannot_crowd_out_the_servers_lines() {
        let dir = temp_dir();
        let t0 = Instant::now();
        let at = Utc::now();
        let mut w = Writer::open(&dir.join("logs"), ID, &limits(1, 1, 1 << 20), t0);
        let text = "x".repeat(4000);
        for _ in 0..100 {
            w.write(t0, at, "launch", "stdout", &text);
        }
        let out = w.write_server(t0, at, "session stopped");
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].contains("server limit: dropped"));
        assert!(out[1].ends_with("server agent: session stopped"));
        // Its own budget is bounded too.
        let mut passed = 0;
        for _ in 0..1000 {
            passed += w
                .write_server(t0, at, &"agent connection: no hello ".repeat(4))
                .len();
        }
        assert!((400..=450).contains(&passed), "{passed}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn markers_come_at_most_once_a_second_and_on_close() {
        let dir = temp_dir();
        let log = SessionLog::open(&dir.join("logs"), ID, &limits(1, 1, 1 << 20));
        let mut rx = log.subscribe();
        let text = "y".repeat(8000);
        for _ in 0..10 {
            log.write("launch", "stdout", &text);
        }
        // Two pass the 16.6 KiB burst; the rest wait for the close.
        assert!(!read_all(&dir).contains("dropped"));
        log.close();
        let file = read_all(&dir);
        assert_eq!(file.lines().count(), 3, "{}", file.len());
        let last = file.lines().last().unwrap();
        assert!(last.contains("dropped 8 lines ("), "{last}");
        let mut seen = 0;
        while rx.try_recv().is_ok() {
            seen += 1;
        }
        assert_eq!(seen, 3, "followers see what the file has");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotation_keeps_one_previous_file_within_the_size() {
        let dir = temp_dir();
        let max = 256 * 1024;
        let t0 = Instant::now();
        let mut w = Writer::open(
            &dir.join("logs"),
            ID,
            &limits(u64::MAX / 4, 1 << 40, max),
            t0,
        );
        let text = "z".repeat(3000);
        for i in 0..1000 {
            w.write(t0, Utc::now(), "launch", "stdout", &format!("{i} {text}"));
        }
        let [prev, cur] = paths(&dir.join("logs"), ID);
        let (p, c) = (
            std::fs::metadata(&prev).unwrap().len(),
            std::fs::metadata(&cur).unwrap().len(),
        );
        assert!(p + c <= max, "{p} + {c} > {max}");
        assert!(p > max / 2 - 4000, "previous file {p} is not nearly full");
        // The newest line is last in the current file, the previous file
        // ends where the current one starts.
        let cur_text = std::fs::read_to_string(&cur).unwrap();
        assert!(cur_text.lines().last().unwrap().contains(" 999 z"));
        let prev_text = std::fs::read_to_string(&prev).unwrap();
        let last_prev: u32 = prev_text
            .lines()
            .last()
            .unwrap()
            .split(' ')
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        let first_cur: u32 = cur_text
            .lines()
            .next()
            .unwrap()
            .split(' ')
            .nth(3)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(last_prev + 1, first_cur);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_are_0600_in_a_0700_directory_and_removed_together() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t0 = Instant::now();
        let mut w = Writer::open(&logs, ID, &limits(u64::MAX / 4, 1 << 40, MIN_MAX_BYTES), t0);
        let text = "w".repeat(10_000);
        for _ in 0..10 {
            w.write(t0, Utc::now(), "a", "stdout", &text);
        }
        assert_eq!(std::fs::metadata(&logs).unwrap().mode() & 0o777, 0o700);
        for p in paths(&logs, ID) {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o600,
                "{p:?}"
            );
        }
        assert_eq!(id_of(&format!("{ID}.log.1")), Some(ID));
        assert_eq!(id_of(&format!("{ID}.log")), Some(ID));
        assert_eq!(id_of("../x.log"), None);
        remove(&logs, ID).unwrap();
        remove(&logs, ID).unwrap();
        assert_eq!(std::fs::read_dir(&logs).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

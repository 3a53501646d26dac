//! Reading a session's log from disk for `GET /api/sessions/{id}/logs`
//! without holding it in memory: the files are opened once, the start is
//! found by reading backwards in blocks (`tail`) or by the time at the
//! start of each line (`since`), and the rest is sent in chunks.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::session_log::{self, STAMP_LEN};

/// Size of the blocks read and sent.
const CHUNK: usize = 64 * 1024;

/// Which lines of a log to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only the last this many lines.
    pub tail: Option<u64>,
    /// Only lines from the first one stamped at or after this time (as
    /// [`session_log::stamp`] writes it).
    pub since: Option<String>,
}

impl Selection {
    /// Whether a live line (as written) belongs to the selection's time.
    pub fn admits_live(&self, line: &str) -> bool {
        match &self.since {
            Some(since) => line.get(..STAMP_LEN).is_some_and(|s| s >= since.as_str()),
            None => true,
        }
    }
}

/// Parses `since`: an RFC 3339 time (`2026-12-06T10:00:00Z`, any offset) or
/// milliseconds since the Unix epoch; returns it as lines carry it.
pub fn parse_since(s: &str) -> Result<String, String> {
    let t = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<i64>()
            .ok()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .ok_or_else(|| format!("{s:?} is out of range"))?
    } else {
        chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| {
                format!("{s:?} is neither an RFC 3339 time nor milliseconds since 1970: {e}")
            })?
            .to_utc()
    };
    let stamp = session_log::stamp(t);
    if stamp.len() != STAMP_LEN {
        return Err(format!("{s:?} is outside the years 0 to 9999"));
    }
    Ok(stamp)
}

/// A byte range of one open file.
#[derive(Debug)]
pub struct Part {
    file: File,
    start: u64,
    end: u64,
}

/// Opens a session's log files (the previous one first) with their
/// current lengths. A rotation between the two opens is seen (the
/// previous file is then the one opened as current) and the current file
/// opened again.
pub fn open(dir: &Path, id: &str) -> std::io::Result<Vec<(File, u64)>> {
    let [prev_path, cur_path] = session_log::paths(dir, id);
    for _ in 0..3 {
        let cur = open_if_exists(&cur_path)?;
        let prev = open_if_exists(&prev_path)?;
        let same = match (&cur, &prev) {
            (Some((c, _)), Some((p, _))) => {
                let (c, p) = (c.metadata()?, p.metadata()?);
                c.ino() == p.ino() && c.dev() == p.dev()
            }
            _ => false,
        };
        if !same {
            return Ok(prev.into_iter().chain(cur).collect());
        }
    }
    Err(std::io::Error::other(
        "the log rotated three times while being opened",
    ))
}

fn open_if_exists(p: &Path) -> std::io::Result<Option<(File, u64)>> {
    match File::open(p) {
        Ok(f) => {
            let len = f.metadata()?.len();
            Ok(Some((f, len)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The byte ranges of the files to send for `sel` (blocking I/O).
pub fn select(files: Vec<(File, u64)>, sel: &Selection) -> std::io::Result<Vec<Part>> {
    let mut start = (0usize, 0u64);
    if let Some(n) = sel.tail {
        start = start.max(tail_start(&files, n)?);
    }
    if let Some(since) = &sel.since {
        start = start.max(since_start(&files, since)?);
    }
    Ok(files
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i >= start.0)
        .map(|(i, (file, len))| Part {
            file,
            start: if i == start.0 { start.1.min(len) } else { 0 },
            end: len,
        })
        .filter(|p| p.end > p.start)
        .collect())
}

/// Where the last `n` lines start: (file index, offset). Reads backwards
/// in blocks; a file's final newline ends its last line.
fn tail_start(files: &[(File, u64)], n: u64) -> std::io::Result<(usize, u64)> {
    if n == 0 {
        return Ok((files.len(), 0));
    }
    let mut need = n;
    let mut buf = vec![0u8; CHUNK];
    for (i, (f, len)) in files.iter().enumerate().rev() {
        if *len == 0 {
            continue;
        }
        let mut last = [0u8; 1];
        f.read_exact_at(&mut last, len - 1)?;
        let mut hi = if last[0] == b'\n' { len - 1 } else { *len };
        while hi > 0 {
            let lo = hi.saturating_sub(CHUNK as u64);
            let block = &mut buf[..(hi - lo) as usize];
            f.read_exact_at(block, lo)?;
            for (j, b) in block.iter().enumerate().rev() {
                if *b == b'\n' {
                    need -= 1;
                    if need == 0 {
                        return Ok((i, lo + j as u64 + 1));
                    }
                }
            }
            hi = lo;
        }
        // The file's first line.
        need -= 1;
        if need == 0 {
            return Ok((i, 0));
        }
    }
    Ok((0, 0))
}

/// Where the first line stamped at or after `since` starts. A file whose
/// last line is older is skipped whole, so at most one file is read.
fn since_start(files: &[(File, u64)], since: &str) -> std::io::Result<(usize, u64)> {
    for (i, (f, len)) in files.iter().enumerate() {
        let (_, last_start) = tail_start(std::slice::from_ref(&(f.try_clone()?, *len)), 1)?;
        if *len == 0 || stamp_at(f, last_start)?.is_none_or(|s| s.as_str() < since) {
            continue;
        }
        let mut r = BufReader::with_capacity(CHUNK, f.try_clone()?);
        r.seek(SeekFrom::Start(0))?;
        let mut pos = 0u64;
        let mut line = Vec::new();
        while pos < *len {
            line.clear();
            let n = r.by_ref().take(len - pos).read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.get(..STAMP_LEN).is_some_and(|s| s >= since.as_bytes()) {
                return Ok((i, pos));
            }
            pos += n as u64;
        }
    }
    Ok((files.len(), 0))
}

fn stamp_at(f: &File, offset: u64) -> std::io::Result<Option<String>> {
    let mut buf = [0u8; STAMP_LEN];
    match f.read_exact_at(&mut buf, offset) {
        Ok(()) => Ok(String::from_utf8(buf.to_vec()).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// The parts as a stream of chunks of at most 64 KiB.
pub fn stream(parts: Vec<Part>) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::iter(parts).flat_map(|p| {
        let len = p.end - p.start;
        let mut f = tokio::fs::File::from_std(p.file);
        futures::stream::once(async move {
            f.seek(SeekFrom::Start(p.start)).await?;
            Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(
                f.take(len),
                CHUNK,
            ))
        })
        .try_flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const ID: &str = "abcdef0123456789abcdef01";

    /// A log of `n` lines over the two files, line `i` stamped `i` ms after
    /// 2026-01-01; the previous file holds the first `split`.
    fn make_log(n: u64, split: u64, pad: usize) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sc-logread-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let [prev, cur] = session_log::paths(&dir, ID);
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let text = "p".repeat(pad);
        let mut w = std::io::BufWriter::new(File::create(&prev).unwrap());
        for i in 0..n {
            if i == split {
                w.flush().unwrap();
                w = std::io::BufWriter::new(File::create(&cur).unwrap());
            }
            let at = t0 + chrono::Duration::milliseconds(i as i64);
            writeln!(w, "{} launch stdout: {i} {text}", session_log::stamp(at)).unwrap();
        }
        w.flush().unwrap();
        dir
    }

    async fn read(dir: &Path, sel: Selection) -> String {
        let parts = select(open(dir, ID).unwrap(), &sel).unwrap();
        let chunks: Vec<Bytes> = stream(parts).try_collect().await.unwrap();
        assert!(chunks.iter().all(|c| c.len() <= CHUNK));
        String::from_utf8(chunks.concat()).unwrap()
    }

    fn numbers(text: &str) -> Vec<u64> {
        text.lines()
            .map(|l| l.split(' ').nth(3).unwrap().parse().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn whole_tail_and_since_over_two_big_files() {
        // About 2 × 20 MiB, far more than one block.
        let n = 200_000;
        let dir = make_log(n, 120_000, 180);
        let all = read(&dir, Selection::default()).await;
        assert_eq!(numbers(&all), (0..n).collect::<Vec<_>>());

        let t = |n| Selection {
            tail: Some(n),
            since: None,
        };
        assert_eq!(numbers(&read(&dir, t(3)).await), [n - 3, n - 2, n - 1]);
        // Across the rotation boundary.
        let last = numbers(&read(&dir, t(80_005)).await);
        assert_eq!(last.len(), 80_005);
        assert_eq!(last[0], n - 80_005);
        assert_eq!(read(&dir, t(0)).await, "");
        assert_eq!(numbers(&read(&dir, t(10 * n)).await).len() as u64, n);

        let s = |ms: i64| Selection {
            tail: None,
            since: Some(parse_since(&(1_767_225_600_000 + ms).to_string()).unwrap()),
        };
        assert_eq!(numbers(&read(&dir, s(199_998)).await), [199_998, 199_999]);
        assert_eq!(numbers(&read(&dir, s(5)).await)[0], 5);
        assert_eq!(numbers(&read(&dir, s(130_000)).await)[0], 130_000);
        assert_eq!(read(&dir, s(300_000)).await, "");
        // Both: the later start wins.
        let both = Selection {
            tail: Some(10),
            since: s(199_995).since,
        };
        assert_eq!(
            numbers(&read(&dir, both).await),
            [199_995, 199_996, 199_997, 199_998, 199_999]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_or_partial_log_reads_as_what_is_there() {
        let dir = std::env::temp_dir().join(format!("sc-logread-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir, Selection::default()).await, "");
        let [_, cur] = session_log::paths(&dir, ID);
        std::fs::write(
            &cur,
            "2026-01-01T00:00:00.000Z a b: 1\n2026-01-01T00:00:00.001Z a b: 2",
        )
        .unwrap();
        let sel = Selection {
            tail: Some(1),
            since: None,
        };
        assert_eq!(read(&dir, sel).await, "2026-01-01T00:00:00.001Z a b: 2");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn since_takes_rfc3339_or_unix_milliseconds() {
        assert_eq!(parse_since("0").unwrap(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            parse_since("2026-12-06T10:00:00+01:00").unwrap(),
            "2026-12-06T09:00:00.000Z"
        );
        assert_eq!(
            parse_since("1765015200123").unwrap(),
            "2025-12-06T10:00:00.123Z"
        );
        assert!(parse_since("yesterday").unwrap_err().contains("yesterday"));
        assert!(parse_since("").is_err());
        assert!(parse_since("99999999999999999999").is_err());
        let s = Selection {
            tail: None,
            since: Some(parse_since("1765015200123").unwrap()),
        };
        assert!(s.admits_live("2025-12-06T10:00:00.123Z x y: z"));
        assert!(!s.admits_live("2025-12-06T10:00:00.122Z x y: z"));
        assert!(!s.admits_live("short"));
    }
}

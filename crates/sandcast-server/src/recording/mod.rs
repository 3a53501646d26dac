//! Recordings: a session created with `record: true` has its video, as the
//! agent encoded it, written into fragmented MP4 files under
//! `<data_dir>/recordings/<id>/` (directory 0700, files 0600: a recording
//! shows what a person did), served at `GET /api/sessions/{id}/recording`
//! with the API key, kept for the recording's TTL after it ended, then
//! removed by a sweep.
//!
//! - [`mux`]: the sans-IO muxer (frames in, boxes out).
//! - [`writer`]: the writer thread behind a bounded queue, and the caps.
//! - [`recover`]: the whole part of a file a crash cut short.
//!
//! A recording is one or more segments (`0.mp4`, `1.mp4`, …): a display
//! size change starts the next, each a playable file of its own.
//! `meta.json` says when the recording started and ended, when it expires,
//! how many segments it has and why it stopped early, if it did.

pub mod mux;
pub mod recover;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::api::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::manager::now_ms;

pub use writer::{Notify, Recorder, Setup, Sink};

/// How often expired recordings are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The metadata file in a recording's directory.
const META: &str = "meta.json";

/// The recordings directory under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("recordings")
}

/// One session's recording directory.
pub fn session_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join(id)
}

/// Segment `n` of a recording.
pub fn segment_path(session_dir: &Path, n: u32) -> PathBuf {
    session_dir.join(format!("{n}.mp4"))
}

/// Makes a session's recording directory (and the recordings directory),
/// readable by root alone.
pub fn create_dir(dir: &Path, id: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    b.create(dir)?;
    let d = session_dir(dir, id);
    b.create(&d)?;
    Ok(d)
}

/// What is known of a recording besides its files.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// The session.
    pub session_id: String,
    /// When recording started, milliseconds since the Unix epoch.
    pub started_ms: i64,
    /// When it ended (the session ended, or the server restarted).
    #[serde(default)]
    pub ended_ms: Option<i64>,
    /// Seconds it is kept after it ended.
    pub ttl_seconds: u64,
    /// When it is removed.
    #[serde(default)]
    pub expires_ms: Option<i64>,
    /// Segment files written.
    #[serde(default)]
    pub segments: u32,
    /// Why it stopped before the session ended (a cap, a write error).
    #[serde(default)]
    pub stopped: Option<String>,
    /// Frames dropped because the writer was behind.
    #[serde(default)]
    pub frames_dropped: u64,
}

impl Meta {
    /// A recording starting now.
    pub fn new(session_id: &str, ttl_seconds: u64) -> Meta {
        Meta {
            session_id: session_id.to_string(),
            started_ms: now_ms(),
            ttl_seconds,
            ..Meta::default()
        }
    }

    /// Sets the expiry from the end.
    pub fn set_expiry(&mut self) {
        let end = self.ended_ms.unwrap_or_else(now_ms);
        self.expires_ms = Some(end.saturating_add((self.ttl_seconds as i64).saturating_mul(1000)));
    }

    /// Writes `meta.json` in `dir` (replacing it whole).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{META}.tmp"));
        crate::auth::write_private(
            &tmp,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, dir.join(META))
    }

    /// Reads `meta.json` in `dir`; `None` when there is none.
    pub fn load(dir: &Path) -> std::io::Result<Option<Meta>> {
        match std::fs::read(dir.join(META)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }
}

/// The bytes every recording uses together, for `[recording] disk_mib`:
/// counted up by the writers, recounted from the disk by each sweep.
#[derive(Debug, Default)]
pub struct Disk {
    used: AtomicU64,
}

impl Disk {
    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A writer wrote `n` bytes.
    pub fn add(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn set(&self, n: u64) {
        self.used.store(n, Ordering::Relaxed);
    }
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// At server start, before any session runs: every recording the last run
/// left unfinished (killed while recording) is cut to its last complete
/// fragment and given its expiry. Returns the recordings fixed.
pub fn recover_all(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut fixed = 0;
    for e in entries.flatten() {
        let d = e.path();
        let Ok(Some(mut meta)) = Meta::load(&d) else {
            continue;
        };
        if meta.ended_ms.is_some() {
            continue;
        }
        for n in 0..meta.segments {
            let p = segment_path(&d, n);
            if let Err(e) = recover::truncate(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "recovering a recording");
            }
        }
        meta.ended_ms = Some(now_ms());
        meta.stopped = Some(
            "the server stopped while recording; kept up to its last complete fragment".into(),
        );
        meta.set_expiry();
        if meta.save(&d).is_ok() {
            fixed += 1;
        }
    }
    fixed
}

/// Removes every expired recording, recounts what the others use; returns
/// how many were removed.
pub fn sweep(dir: &Path, disk: &Disk, now_ms: i64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    let mut used = 0;
    for e in entries.flatten() {
        let d = e.path();
        match Meta::load(&d) {
            Ok(Some(meta)) if meta.expired(now_ms) => {
                if std::fs::remove_dir_all(&d).is_ok() {
                    removed += 1;
                }
            }
            // An unreadable one stays for a person to look at, and counts.
            _ => used += dir_bytes(&d),
        }
    }
    disk.set(used);
    removed
}

/// Sweeps `dir` every few seconds, for as long as the server runs.
pub fn spawn_sweeper(dir: PathBuf, disk: std::sync::Arc<Disk>) {
    crate::retention::spawn_every(SWEEP_EVERY, move || {
        sweep(&dir, &disk, now_ms());
    });
}

/// Query of `GET /api/sessions/{id}/recording`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RecordingQuery {
    /// Which segment (0, the default, is the first); a display size change
    /// starts the next. The answer's `Sandcast-Recording-Segments` header
    /// says how many there are.
    segment: Option<u32>,
}

/// A session's recording (an MP4 file, H.264).
///
/// Served with range requests (`Range: bytes=…` → 206), playable in a
/// `<video>`. While the session still records, the complete fragments so
/// far. Kept for `recording_ttl_seconds` after the session ended. It shows
/// what the person did: treat it as the person's data.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/recording",
    operation_id = "get_recording",
    tag = "sessions",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The session's id."),
        RecordingQuery,
        ("Range" = Option<String>, Header, description = "A byte range, e.g. `bytes=0-1023`."),
    ),
    responses(
        (status = 200, description = "The whole segment.", content_type = "video/mp4", body = Vec<u8>,
            headers(("Accept-Ranges" = String), ("Sandcast-Recording-Segments" = u32))),
        (status = 206, description = "The range asked for.", content_type = "video/mp4", body = Vec<u8>,
            headers(("Content-Range" = String), ("Sandcast-Recording-Segments" = u32))),
        (status = 400, description = "A malformed id.", body = ErrorBody),
        (status = 404, description = "No such session, or no recording: not recorded, nothing written yet, expired, or no such segment.", body = ErrorBody),
        (status = 416, description = "The range is outside the segment.", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<RecordingQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::limits::check_id(&id).map_err(ApiError::bad_request)?;
    let m = &state.manager;
    let d = session_dir(&dir(&m.config().data_dir), &id);
    let meta = {
        let d = d.clone();
        tokio::task::spawn_blocking(move || Meta::load(&d))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("reading the recording: {e}")))?
    };
    let none = |why: String| ApiError::not_found(why).detail(json!({ "field": "recording" }));
    // A recording outlives its session's row when its TTL is the longer.
    let Some(meta) = meta.filter(|m| !m.expired(now_ms())) else {
        let row = m
            .store()
            .get(&id)?
            .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
        return Err(none(if !row.spec.record {
            format!("session {id} was not recorded (create it with record: true)")
        } else if row.state.is_live() {
            format!("session {id} has not started recording yet")
        } else {
            format!("session {id}'s recording expired or was never written")
        }));
    };
    let n = q.segment.unwrap_or(0);
    if meta.segments == 0 {
        return Err(none(format!(
            "session {id} has no recorded video yet (the first key frame has not arrived)"
        )));
    }
    if n >= meta.segments {
        return Err(none(format!(
            "segment {n} does not exist: the recording has {} (0..={})",
            meta.segments,
            meta.segments - 1
        )));
    }
    let path = segment_path(&d, n);
    // While recording, only what is complete; after, the file as it is.
    let live = meta.ended_ms.is_none();
    let len = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
            if live {
                Ok(recover::complete_length(&path)?.unwrap_or(0))
            } else {
                Ok(std::fs::metadata(&path)?.len())
            }
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("reading the recording: {e}")))?
    };
    serve(&path, len, &headers, meta.segments).await
}

/// Serves the first `len` bytes of `path`, or the one range asked for.
async fn serve(
    path: &Path,
    len: u64,
    headers: &HeaderMap,
    segments: u32,
) -> Result<Response, ApiError> {
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => {
            let unsatisfiable = || {
                let mut r = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("the range is not within the recording's {len} bytes"),
                )
                .into_response();
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    format!("bytes */{len}").parse().expect("ascii"),
                );
                r
            };
            let ranges = v
                .to_str()
                .ok()
                .and_then(|s| http_range_header::parse_range_header(s).ok())
                .and_then(|p| p.validate(len).ok());
            match ranges.as_deref() {
                Some([one]) => Some(one.clone()),
                // Several ranges: the whole file, as RFC 9110 allows.
                Some(_) => None,
                None => return Ok(unsatisfiable()),
            }
        }
    };
    let (start, end) = range
        .clone()
        .map_or((0, len), |r| (*r.start(), *r.end() + 1));
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::internal(format!("opening the recording: {e}")))?;
    f.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal(format!("reading the recording: {e}")))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f.take(end - start)));
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "video/mp4")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::CACHE_CONTROL, "private, no-store")
        .header("sandcast-recording-segments", segments);
    b = match range {
        Some(r) => b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{len}", r.start(), r.end()),
        ),
        None => b.status(StatusCode::OK),
    };
    b.body(body).map_err(|e| ApiError::internal(e.to_string()))
}

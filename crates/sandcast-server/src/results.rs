//! What a completed session leaves: the files it was to `collect`, copied
//! out of its home through the agent when its launch command ended, kept
//! under `<data_dir>/results/` (directory 0700, files 0600: they are
//! credentials, as often as not) for `result_ttl_seconds`, served at
//! `GET /api/sessions/{id}/result`, then removed by a sweep. Never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::future::BoxFuture;
use sandcast_proto::{FileOp, FileReply, HomePath};
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::api::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::files::FileStream;
use crate::manager::now_ms;

/// How often expired results are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long a collection waits for the agent's stream of one file.
const STREAM_DEADLINE: Duration = Duration::from_secs(20);

/// The results directory under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("results")
}

fn file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// What was collected of one session.
#[derive(Debug, Default)]
pub struct Collected {
    /// Each file found, by the path as asked (`~/…`).
    pub files: BTreeMap<String, Vec<u8>>,
    /// Each path not collected, and why (absent, a directory, too large).
    pub missing: BTreeMap<String, String>,
    /// What went wrong with the collection itself (the agent).
    pub failure: Option<String>,
}

impl Collected {
    /// A failure of the collection (not a file that was simply absent).
    pub fn problem(&self) -> Option<String> {
        self.failure.clone()
    }
}

/// Reads each of `paths` through a stream `open` asks the agent for, one
/// after the other (a session's pending streams are bounded), at most
/// `max_total` bytes of them all; a file past that is listed as missing.
pub async fn collect<F>(paths: Vec<HomePath>, max_total: u64, mut open: F) -> Collected
where
    F: FnMut(FileOp) -> BoxFuture<'static, Result<oneshot::Receiver<UnixStream>, String>>,
{
    let mut out = Collected::default();
    let mut left = max_total;
    for path in paths {
        let name = path.to_string();
        let asked = open(FileOp::Read {
            path,
            max_bytes: left,
        })
        .await;
        let conn = match asked {
            Ok(rx) => match tokio::time::timeout(STREAM_DEADLINE, rx).await {
                Ok(Ok(c)) => c,
                _ => {
                    out.failure = Some(format!("the agent did not open a stream for {name}"));
                    out.missing.insert(name, "the agent did not answer".into());
                    continue;
                }
            },
            Err(e) => {
                out.failure = Some(format!("collecting {name}: {e}"));
                out.missing.insert(name, e);
                continue;
            }
        };
        let mut stream = FileStream::new(conn);
        match stream.reply().await {
            Ok(FileReply::File { size }) if size <= left => {
                match stream.read_exact_body(size).await {
                    Ok(bytes) => {
                        left -= size;
                        out.files.insert(name, bytes);
                    }
                    Err(e) => {
                        out.failure = Some(format!("reading {name}: {e}"));
                        out.missing.insert(name, e);
                    }
                }
            }
            Ok(FileReply::File { size }) => {
                out.missing.insert(
                    name,
                    format!(
                        "{size} bytes; over the {max_total} bytes a result holds ([files] result_max_kib)"
                    ),
                );
            }
            Ok(FileReply::Directory) => {
                out.missing
                    .insert(name, "a directory; collect files".into());
            }
            Ok(FileReply::Refused { detail, .. }) => {
                out.missing.insert(name, detail);
            }
            Ok(other) => {
                out.failure = Some(format!("the agent answered {other:?} for {name}"));
                out.missing
                    .insert(name, "the agent answered wrongly".into());
            }
            Err(e) => {
                out.failure = Some(format!("collecting {name}: {e}"));
                out.missing.insert(name, e);
            }
        }
    }
    out
}

/// A stored result, as `GET /api/sessions/{id}/result` answers it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionResult {
    /// The session.
    pub session_id: String,
    /// The launch command's exit code (null when a signal ended it).
    pub exit_code: Option<i32>,
    /// When the session completed, milliseconds since the Unix epoch.
    pub completed_ms: i64,
    /// When this result is removed, milliseconds since the Unix epoch.
    pub expires_ms: i64,
    /// Each collected file's content, base64, by its path (`~/…`).
    pub files: BTreeMap<String, String>,
    /// Each path that was not collected, and why.
    pub missing: BTreeMap<String, String>,
}

/// Writes a session's result, readable by root alone, replacing any.
pub fn save(
    dir: &Path,
    id: &str,
    collected: &Collected,
    exit_code: Option<i32>,
    now_ms: i64,
    ttl_seconds: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let result = SessionResult {
        session_id: id.to_string(),
        exit_code,
        completed_ms: now_ms,
        expires_ms: now_ms.saturating_add((ttl_seconds as i64).saturating_mul(1000)),
        files: collected
            .files
            .iter()
            .map(|(k, v)| (k.clone(), b64.encode(v)))
            .collect(),
        missing: collected.missing.clone(),
    };
    crate::auth::write_private(
        &file(dir, id),
        &serde_json::to_vec(&result).map_err(std::io::Error::other)?,
    )
}

/// A session's result while it is kept; an expired one is removed.
pub fn load(dir: &Path, id: &str, now_ms: i64) -> std::io::Result<Option<SessionResult>> {
    let path = file(dir, id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let result: SessionResult = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
    if result.expires_ms <= now_ms {
        remove(dir, id);
        return Ok(None);
    }
    Ok(Some(result))
}

/// Removes a session's result, if any.
pub fn remove(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(file(dir, id));
}

/// Removes every expired result; returns how many.
pub fn sweep(dir: &Path, now_ms: i64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        // `load` removes what has expired (and an unreadable file stays for
        // a person to look at).
        if matches!(load(dir, id, now_ms), Ok(None)) {
            removed += 1;
        }
    }
    removed
}

/// Sweeps `dir` every few seconds, for as long as the server runs.
pub fn spawn_sweeper(dir: PathBuf) {
    crate::retention::spawn_every(SWEEP_EVERY, move || {
        sweep(&dir, now_ms());
    });
}

/// Query of `GET /api/sessions/{id}/result`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultQuery {
    /// `json` (default): paths and base64 contents; `tar`: the files in a
    /// tar archive, by their paths below the home.
    format: Option<String>,
}

/// A completed session's collected files.
///
/// Kept for `result_ttl_seconds` after the session completed (or until
/// the session is deleted), then gone. Treat them as secrets: they are
/// often a tool's credentials.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/result",
    operation_id = "get_result",
    tag = "sessions",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The session's id."), ResultQuery),
    responses(
        (status = 200, description = "The collected files (JSON, or a tar archive with `format=tar`).", body = SessionResult),
        (status = 400, description = "A malformed id or format.", body = ErrorBody),
        (status = 404, description = "No such session, or no result: not completed, nothing to collect, or expired.", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ResultQuery>,
) -> Result<Response, ApiError> {
    crate::limits::check_id(&id).map_err(ApiError::bad_request)?;
    let tar = match q.format.as_deref() {
        None | Some("json") => false,
        Some("tar") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format {other:?} is not one of \"json\", \"tar\""
            )));
        }
    };
    let m = &state.manager;
    let dir = dir(&m.config().data_dir);
    let loaded = tokio::task::spawn_blocking({
        let id = id.clone();
        move || load(&dir, &id, now_ms())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("reading the result: {e}")))?;
    let Some(result) = loaded else {
        let row = m
            .store()
            .get(&id)?
            .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
        return Err(ApiError::not_found(format!(
            "session {id} has no result: it is {}{}",
            row.state.as_str(),
            if row.state == crate::store::State::Completed {
                " and its result expired or was deleted"
            } else {
                "; a result is kept when a session with complete_on completes"
            }
        )));
    };
    if !tar {
        return Ok(axum::Json(result).into_response());
    }
    let archive =
        to_tar(&result).map_err(|e| ApiError::internal(format!("making the archive: {e}")))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-tar")],
        archive,
    )
        .into_response())
}

/// The result's files as a tar archive, by their paths below the home,
/// mode 0600.
fn to_tar(result: &SessionResult) -> std::io::Result<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in &result.files {
        let bytes = b64.decode(content).map_err(std::io::Error::other)?;
        let rel = HomePath::parse(path).map_err(std::io::Error::other)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_mtime((result.completed_ms / 1000).max(0) as u64);
        h.set_cksum();
        builder.append_data(&mut h, rel.as_str(), bytes.as_slice())?;
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collected() -> Collected {
        let mut c = Collected::default();
        c.files
            .insert("~/.config/democli/token.json".into(), b"{\"t\":1}".to_vec());
        c.missing.insert("~/absent".into(), "no such file".into());
        c
    }

    #[test]
    fn a_result_is_private_kept_until_it_expires_then_swept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sc-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        save(&dir, "s1", &collected(), Some(0), 1_000, 10).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file(&dir, "s1")), 0o600);
        let r = load(&dir, "s1", 5_000).unwrap().unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.expires_ms, 11_000);
        assert_eq!(r.files["~/.config/democli/token.json"], "eyJ0IjoxfQ==");
        assert_eq!(r.missing["~/absent"], "no such file");
        assert_eq!(sweep(&dir, 10_999), 0);
        assert!(file(&dir, "s1").exists());
        assert_eq!(sweep(&dir, 11_000), 1);
        assert!(!file(&dir, "s1").exists());
        assert!(load(&dir, "s1", 0).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tar_holds_the_files_below_the_home() {
        let r = SessionResult {
            session_id: "s".into(),
            exit_code: Some(0),
            completed_ms: 1_000,
            expires_ms: 2_000,
            files: BTreeMap::from([("~/.config/democli/token.json".into(), "eyJ0IjoxfQ==".into())]),
            missing: BTreeMap::new(),
        };
        let bytes = to_tar(&r).unwrap();
        let mut a = tar::Archive::new(bytes.as_slice());
        let mut entries = a.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        assert_eq!(
            e.path().unwrap().to_str().unwrap(),
            ".config/democli/token.json"
        );
        assert_eq!(e.header().mode().unwrap(), 0o600);
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        assert_eq!(s, "{\"t\":1}");
        assert!(entries.next().is_none());
    }
}

//! The files API: a session's home read, written and removed through its
//! agent (`GET`, `PUT`, `DELETE /api/sessions/{id}/files/{path}`), so it is
//! the same in a sandbox and in a microVM.
//!
//! Each request is one stream connection the agent opens (see
//! `sandcast_proto::files`); bytes flow through without being gathered, so
//! a large file costs the server a buffer, not its size. Paths are checked
//! here before the agent is asked, and the agent resolves them beneath the
//! home. The agent is not trusted: its reply line is bounded, a body never
//! runs past what it announced or past `[files] max_mib`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use sandcast_proto::files::{Chunk, ChunkCodec, Listing, MAX_LISTING, Refusal};
use sandcast_proto::{FileOp, FileReply, HomePath};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio_util::codec::FramedWrite;
use tokio_util::io::ReaderStream;

use crate::api::AppState;
use crate::error::{ApiError, ErrorBody};

/// How long the agent may take to say what it will do.
const REPLY_DEADLINE: Duration = Duration::from_secs(20);

/// Longest directory listing read from the agent.
const MAX_LISTING_BYTES: u64 = (MAX_LISTING as u64) * 1024;

/// One file operation's stream, from the agent's reply on.
pub struct FileStream {
    conn: UnixStream,
    /// Bytes read past the reply line.
    buf: BytesMut,
}

impl FileStream {
    /// Wraps a stream the agent opened for a file operation.
    pub fn new(conn: UnixStream) -> FileStream {
        FileStream {
            conn,
            buf: BytesMut::new(),
        }
    }

    /// The agent's next reply line.
    pub async fn reply(&mut self) -> Result<FileReply, String> {
        tokio::time::timeout(REPLY_DEADLINE, async {
            loop {
                if let Some(r) = FileReply::take_line(&mut self.buf)? {
                    return Ok(r);
                }
                if self
                    .conn
                    .read_buf(&mut self.buf)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Err("the agent closed the stream without a reply".to_string());
                }
            }
        })
        .await
        .map_err(|_| "the agent did not reply within 20 s".to_string())?
    }

    /// The body after the reply, at most `limit` bytes of it.
    pub(crate) fn body(self, limit: u64) -> impl AsyncRead + Send + Unpin + 'static {
        std::io::Cursor::new(self.buf.freeze())
            .chain(self.conn)
            .take(limit)
    }

    /// A 200 streaming the file of `size` bytes that the reply announced.
    pub fn file_response(self, size: u64) -> Response {
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                (header::CONTENT_LENGTH, size.to_string()),
            ],
            Body::from_stream(ReaderStream::new(self.body(size))),
        )
            .into_response()
    }

    /// Exactly `size` bytes of body, gathered (for small files only).
    pub async fn read_exact_body(self, size: u64) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(size.min(1 << 20) as usize);
        self.body(size)
            .read_to_end(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        if out.len() as u64 != size {
            return Err(format!(
                "the agent sent {} of the {size} bytes it announced",
                out.len()
            ));
        }
        Ok(out)
    }
}

/// The status and message of an agent's refusal.
pub(crate) fn refused(reason: Refusal, detail: String) -> ApiError {
    let status = match reason {
        Refusal::BadPath => StatusCode::BAD_REQUEST,
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Conflict => StatusCode::CONFLICT,
        Refusal::Failed => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, detail)
}

/// The 502 of an agent that failed or misbehaved.
pub(crate) fn agent_error(e: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, format!("the session's agent: {e}"))
}

/// The 502 of a reply that does not fit the operation.
pub(crate) fn unexpected(reply: FileReply) -> ApiError {
    agent_error(format!("an unexpected reply {reply:?}"))
}

/// Checks the id and path, and opens the operation's stream.
async fn open(
    state: &AppState,
    id: &str,
    op: impl FnOnce(HomePath, u64) -> FileOp,
    raw_path: &str,
) -> Result<(FileStream, u64), ApiError> {
    crate::limits::check_id(id).map_err(ApiError::bad_request)?;
    let path = HomePath::parse(raw_path)
        .map_err(|e| ApiError::bad_request(e).detail(serde_json::json!({ "field": "path" })))?;
    open_path(state, id, op, path).await
}

/// Opens the stream of an operation on a checked path of a live session;
/// the stream and `[files] max_mib` in bytes.
pub(crate) async fn open_path(
    state: &AppState,
    id: &str,
    op: impl FnOnce(HomePath, u64) -> FileOp,
    path: HomePath,
) -> Result<(FileStream, u64), ApiError> {
    let max = state.manager.config().files.max_mib.saturating_mul(1 << 20);
    let live = state.manager.live(id);
    if live.is_none() {
        let row = state
            .manager
            .store()
            .get(id)?
            .ok_or_else(|| ApiError::no_session(id))?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "session {id} is {}: files are reachable while it runs (a completed session's collected files are at /result)",
                row.state.as_str()
            ),
        ));
    }
    let conn = state.manager.open_file(id, op(path, max)).await?;
    Ok((FileStream::new(conn), max))
}

/// Query of `GET /api/sessions/{id}/files/{path}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// `tar`: the directory (or file) as a tar archive, symbolic links kept
    /// as links.
    archive: Option<String>,
}

async fn read(
    state: AppState,
    id: String,
    path: String,
    q: ReadQuery,
) -> Result<Response, ApiError> {
    let tar = match q.archive.as_deref() {
        None => false,
        Some("tar") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "archive {other:?} is not \"tar\""
            )));
        }
    };
    let (mut stream, max) = if tar {
        open(
            &state,
            &id,
            |path, max_bytes| FileOp::Tar { path, max_bytes },
            &path,
        )
        .await?
    } else {
        open(
            &state,
            &id,
            |path, max_bytes| FileOp::Read { path, max_bytes },
            &path,
        )
        .await?
    };
    match stream.reply().await.map_err(agent_error)? {
        FileReply::File { size } if size <= max => Ok(stream.file_response(size)),
        FileReply::Directory => {
            let mut json = Vec::new();
            stream
                .body(MAX_LISTING_BYTES)
                .read_to_end(&mut json)
                .await
                .map_err(|e| agent_error(e.to_string()))?;
            let listing: Listing = serde_json::from_slice(&json)
                .map_err(|e| agent_error(format!("a malformed listing: {e}")))?;
            if listing.entries.len() > MAX_LISTING {
                return Err(agent_error("a listing over its limit".into()));
            }
            Ok(axum::Json(listing).into_response())
        }
        FileReply::Archive => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-tar")],
            Body::from_stream(ReaderStream::new(stream.body(max))),
        )
            .into_response()),
        FileReply::Refused { reason, detail } => Err(refused(reason, detail)),
        other => Err(unexpected(other)),
    }
}

/// Read a file or a directory in a session's home.
///
/// A file comes as its bytes; a directory as a JSON listing, or with
/// `archive=tar` as a tar archive. Paths are relative to the home (or
/// `~/…`); `..`, paths outside the home, symbolic links that lead out of
/// it, devices, FIFOs and sockets are refused with 400.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/files/{*path}",
    operation_id = "read_file",
    tag = "files",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The session's id."),
        ("path" = String, Path, description = "A path in the session's home, e.g. `.config/tool/token.json`."),
        ReadQuery,
    ),
    responses(
        (status = 200, description = "The file's bytes (`application/octet-stream`), a directory's listing (JSON), or a tar archive.", body = crate::openapi::Listing),
        (status = 400, description = "The path leads out of the home or names a device, FIFO or socket.", body = ErrorBody),
        (status = 404, description = "No such session or file.", body = ErrorBody),
        (status = 409, description = "The session is not running.", body = ErrorBody),
        (status = 413, description = "The file is larger than `[files] max_mib`.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    UrlPath((id, path)): UrlPath<(String, String)>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    read(state, id, path, q).await
}

/// List a session's home, or archive it.
///
/// As `GET /api/sessions/{id}/files/{path}` for the home itself.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/files",
    operation_id = "list_home",
    tag = "files",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The session's id."), ReadQuery),
    responses(
        (status = 200, description = "The home's listing (JSON), or with `archive=tar` a tar archive of it.", body = crate::openapi::Listing),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not running.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn home(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    read(state, id, String::new(), q).await
}

/// Write a file in a session's home.
///
/// The body is the file's content, streamed; missing parent directories
/// are made, and the file is replaced only once all of it arrived (a
/// broken upload changes nothing).
#[utoipa::path(
    put,
    path = "/api/sessions/{id}/files/{*path}",
    operation_id = "write_file",
    tag = "files",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The session's id."),
        ("path" = String, Path, description = "A path in the session's home."),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written.", body = crate::openapi::Written),
        (status = 400, description = "The path leads out of the home or names a device, FIFO or socket.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not running, or a directory is in the way.", body = ErrorBody),
        (status = 413, description = "The body is larger than `[files] max_mib`.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn put(
    State(state): State<AppState>,
    UrlPath((id, path)): UrlPath<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let (stream, max) = open(
        &state,
        &id,
        |path, max_bytes| FileOp::Write { path, max_bytes },
        &path,
    )
    .await?;
    let size = write_body(stream, max, body).await?;
    let path = HomePath::parse(&path)
        .map(|p| p.to_string())
        .unwrap_or_default();
    Ok(axum::Json(crate::openapi::Written { path, size }).into_response())
}

/// Streams `body` into a write's stream as chunks, at most `max` bytes;
/// the size written once the agent says it is done.
pub(crate) async fn write_body(
    mut stream: FileStream,
    max: u64,
    body: Body,
) -> Result<u64, ApiError> {
    match stream.reply().await.map_err(agent_error)? {
        FileReply::Ready => {}
        FileReply::Refused { reason, detail } => return Err(refused(reason, detail)),
        other => return Err(unexpected(other)),
    }
    let mut body = body.into_data_stream();
    let mut sent: u64 = 0;
    let mut chunks = FramedWrite::new(&mut stream.conn, ChunkCodec);
    let mut broken = None;
    while let Some(data) = body.next().await {
        // A broken upload: the stream closes without its end, and the agent
        // leaves the old file as it was.
        let data: Bytes =
            data.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        sent += data.len() as u64;
        if sent > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the file is over {max} bytes ([files] max_mib)"),
            ));
        }
        if let Err(e) = chunks.send(Chunk::Data(data)).await {
            broken = Some(e);
            break;
        }
    }
    if broken.is_none()
        && let Err(e) = chunks.send(Chunk::End).await
    {
        broken = Some(e);
    }
    drop(chunks);
    // The agent's reply says how it went, also when it stopped reading
    // early (a refusal says why).
    let reply = stream.reply().await.map_err(|e| match &broken {
        Some(b) => agent_error(format!("{b}; {e}")),
        None => agent_error(e),
    })?;
    match reply {
        FileReply::Done { size } => Ok(size),
        FileReply::Refused { reason, detail } => Err(refused(reason, detail)),
        other => Err(unexpected(other)),
    }
}

/// Remove a file or a directory in a session's home.
///
/// A directory goes with everything in it; a symbolic link is removed,
/// never what it points to.
#[utoipa::path(
    delete,
    path = "/api/sessions/{id}/files/{*path}",
    operation_id = "delete_file",
    tag = "files",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The session's id."),
        ("path" = String, Path, description = "A path in the session's home."),
    ),
    responses(
        (status = 204, description = "Removed."),
        (status = 400, description = "The path leads out of the home, or is the home itself.", body = ErrorBody),
        (status = 404, description = "No such session or file.", body = ErrorBody),
        (status = 409, description = "The session is not running.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    UrlPath((id, path)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let (mut stream, _) = open(&state, &id, |path, _| FileOp::Delete { path }, &path).await?;
    match stream.reply().await.map_err(agent_error)? {
        FileReply::Done { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
        FileReply::Refused { reason, detail } => Err(refused(reason, detail)),
        other => Err(unexpected(other)),
    }
}

//! The viewer: its page and assets (embedded in the binary), its state
//! endpoint, the noVNC WebSocket tunnelled through the agent, the input
//! WebSocket beside it and beside the WebSocket video stream
//! ([`crate::video_socket`]), WebRTC signaling (the seed's endpoints), and the person's
//! downloads and uploads (files in the session's `~/Downloads` and
//! `~/Uploads`, by plain name, through the agent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rust_embed::Embed;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{AppState, SessionPath, session_json};
use crate::auth;
use crate::error::{ApiError, ErrorBody};
use crate::limits;
use crate::openapi::{IceServers, SdpMessage, ViewerState};
use crate::store::{Row, State as SessionState};
use crate::tokens::{self, Credentials, Grant, session_is};

/// The viewer's files: `viewer/` of the source tree.
#[derive(Embed)]
#[folder = "../../viewer/"]
struct Assets;

/// A file of the viewer (scripts, styles, noVNC), embedded in the server.
#[utoipa::path(
    get,
    path = "/assets/{*path}",
    tag = "viewer",
    security(()),
    params(("path" = String, Path, description = "The file's path under the viewer's directory; may contain `/`.")),
    responses(
        (status = 200, description = "The file, with its MIME type.", body = Vec<u8>, content_type = "*/*"),
        (status = 404, description = "No such asset.", body = ErrorBody),
    )
)]
pub async fn asset(Path(path): Path<String>) -> Response {
    match Assets::get(&path) {
        Some(file) => {
            let mime = file.metadata.mimetype().to_string();
            (
                [
                    (header::CONTENT_TYPE, mime),
                    (header::CACHE_CONTROL, "no-cache".to_string()),
                    (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".to_string()),
                ],
                file.data,
            )
                .into_response()
        }
        None => ApiError::new(StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// The viewer page of a session.
///
/// Open it as `viewer_url` says, `/viewer/{id}#token=…`: the token stays
/// in the URL fragment, which browsers never send, and the page presents
/// it to the endpoints below.
#[utoipa::path(
    get,
    path = "/viewer/{id}",
    tag = "viewer",
    security(()),
    params(SessionPath),
    responses(
        (status = 200, description = "The page.", body = String, content_type = "text/html"),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
    )
)]
pub async fn page(Path(id): Path<String>) -> Response {
    if limits::check_id(&id).is_err() {
        return ApiError::bad_request("bad session id").into_response();
    }
    match Assets::get("index.html") {
        Some(file) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            file.data,
        )
            .into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "the viewer is not built in").into_response(),
    }
}

/// Checks a request's credential against a session; the session's row and
/// what the credential may do ([`Grant`]) when it opens the session's
/// viewer. The viewer token may come from the `Authorization` header or
/// (where a browser cannot set headers: WebSockets) the query; the operator
/// key only ever from the header, never from a URL that proxies log. Only
/// `view` and `control` tokens open the viewer (the session's own token is
/// `control`); an `automation` token never does.
pub(crate) fn authorize(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(Row, Grant), ApiError> {
    let (row, who) = tokens::credentials(state, id, headers, query_token)?;
    match who {
        Credentials::Operator => Ok((row, Grant::control())),
        Credentials::Missing => Err(ApiError::unauthorized("missing viewer token")),
        Credentials::Granted(g) if g.role.opens_viewer() => Ok((row, g)),
        Credentials::Granted(_) => Err(ApiError::unauthorized(
            "an automation token does not open the viewer",
        )),
        Credentials::Unknown => Err(ApiError::unauthorized(
            "the token does not open this session",
        )),
    }
}

/// The state of a session as its viewer sees it; counts as viewer
/// activity for the idle timeout.
#[utoipa::path(
    get,
    path = "/viewer/{id}/state",
    tag = "viewer",
    security(("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "The session's state.", body = ViewerState),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn state(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (row, grant) = authorize(&state, &id, &headers, None)?;
    let live = state.manager.live(&id);
    if let Some(l) = &live {
        l.touch();
    }
    let full = session_json(&row, live.as_deref());
    Ok(Json(json!({
        "id": full["id"], "state": full["state"], "reason": full["reason"],
        "width": full["width"], "height": full["height"], "children": full["children"],
        "webrtc": state.manager.gateway().is_some(),
        "role": grant.role,
        "control": full["control"], "automation_clients": full["automation_clients"],
    })))
}

/// Take control from programs driving the session (`person`: their
/// `Input.*` commands are refused) or give it back (`shared`): the
/// viewer's control of `PUT /api/sessions/{id}/control`.
#[utoipa::path(
    put,
    path = "/viewer/{id}/control",
    operation_id = "viewer_control",
    tag = "viewer",
    security(("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    request_body = crate::cdp::ControlRequest,
    responses(
        (status = 200, description = "Who holds control now.", body = crate::openapi::Control),
        (status = 400, description = "`id` or the body is malformed.", body = ErrorBody),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 403, description = "A `view` token: watching never takes control.", body = ErrorBody),
        (status = 404, description = "No such session, or it is not running.", body = ErrorBody),
    )
)]
pub async fn control(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<crate::cdp::ControlRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (_, grant) = authorize(&state, &id, &headers, None)?;
    if grant.view_only() {
        return Err(view_only("taking control"));
    }
    let req = crate::cdp::control_body(body)?;
    crate::cdp::set_control(&state, &id, req.holder).await
}

/// Query carrying the token where headers cannot (WebSocket); documented
/// as the `viewer_token_query` security scheme.
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

impl TokenQuery {
    /// The token, when the query has one.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// The noVNC fallback: RFB over a WebSocket (subprotocol `binary`).
///
/// A WebSocket upgrade (`Connection: Upgrade`, `Upgrade: websocket`); the
/// server splices it onto the session's VNC server through the agent.
#[utoipa::path(
    get,
    path = "/viewer/{id}/vnc",
    tag = "viewer",
    security(("viewer_token_query" = []), ("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; RFB in binary messages."),
        (status = 400, description = "`id` is not a session id (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn vnc(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (row, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    if row.state != SessionState::Ready {
        return Err(session_is(&row));
    }
    let stream = state.manager.open_vnc(&id).await?;
    let live = state.manager.live(&id);
    Ok(ws
        .protocols(["binary"])
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| async move {
            if let Some(l) = &live {
                l.viewer(true).await;
            }
            let ended = live.as_ref().map(|l| l.ended());
            let lost = live.as_ref().map(|l| l.lost(&grant));
            pump(socket, stream, ended, lost, grant.view_only()).await;
            if let Some(l) = &live {
                l.viewer(false).await;
            }
        }))
}

/// Input for a viewer without WebRTC (the noVNC fallback): the same JSON
/// messages as the WebRTC data channel `input`, one per text message, both
/// ways.
///
/// A WebSocket upgrade. The server sends what it sends WebRTC viewers
/// (`clipboard` in full Unicode, `display_size`, `focus`, `download`,
/// `file_chooser`). Each message from the viewer is a viewer request
/// (`key`, `text`, `pointer_move`, `pointer_button`, `wheel`,
/// `release_all`, `clipboard`, `resize`, `choose_files`); malformed, oversized or too frequent ones are dropped and
/// counted, never fatal. Closing it releases every key and button it held.
/// noVNC beside it only shows the screen (the viewer's input overlay keeps
/// events from it), so keys, text and input methods behave exactly as over
/// WebRTC.
#[utoipa::path(
    get,
    path = "/viewer/{id}/input",
    tag = "viewer",
    security(("viewer_token_query" = []), ("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; viewer requests as JSON text messages."),
        (status = 400, description = "`id` is not a session id (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is neither `starting` nor `ready`.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn input(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (row, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    // While the session starts too, beside the WebSocket video stream:
    // what is sent before the agent is up waits for it.
    let live = match state.manager.live(&id) {
        Some(l) if row.state.takes_stream_viewers() => l,
        _ => return Err(session_is(&row)),
    };
    Ok(ws
        .max_message_size(sandcast_webrtc::MAX_MESSAGE_LEN)
        .on_upgrade(move |socket| input_pump(socket, live, grant)))
}

/// Path of a viewer's download or upload: the session and a plain file name.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TransferPath {
    /// The session's id.
    #[param(pattern = "^[a-z0-9-]{1,64}$")]
    id: String,
    /// A file name: one component, no `/`, not `..`, no control
    /// characters, at most 255 bytes.
    name: String,
}

/// The 403 of a session created with `transfers: false`.
fn transfers_on(row: &Row) -> Result<(), ApiError> {
    if row.spec.transfers {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "downloads and uploads are off for this session (transfers: false)",
    )
    .detail(json!({ "field": "transfers" })))
}

/// The 403 of something only a `control` viewer does.
fn view_only(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!("a view token only watches: {what} need a control token"),
    )
    .detail(json!({ "role": "view" }))
}

/// The 400 of a name that is not a plain file name.
fn bad_name(e: String) -> ApiError {
    ApiError::bad_request(e).detail(json!({ "field": "name" }))
}

/// `Content-Disposition` for saving `name`: an ASCII fallback and the exact
/// name in RFC 5987 form (`filename*=UTF-8''…`), so no character of the
/// name, which the remote page chose, can end the header's value.
pub fn attachment(name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// A file the session's browser downloaded, for the person in the viewer
/// to save.
///
/// Only files directly in the session's `~/Downloads` (the server builds
/// the path from the name). The body is the file's bytes, streamed through
/// the session's agent, with `Content-Disposition: attachment`. The token
/// goes in the `Authorization` header (the viewer fetches it so) or, for a
/// plain link, in the query.
#[utoipa::path(
    get,
    path = "/viewer/{id}/downloads/{name}",
    tag = "viewer",
    security(("viewer_token" = []), ("viewer_token_query" = []), ("api_key" = [])),
    params(TransferPath),
    responses(
        (status = 200, description = "The file's bytes.", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, description = "`id` is not a session id, or `name` is not a plain file name.", body = ErrorBody),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 403, description = "The session was created with `transfers: false`.", body = ErrorBody),
        (status = 404, description = "No such session or file.", body = ErrorBody),
        (status = 409, description = "The session is not running.", body = ErrorBody),
        (status = 413, description = "The file is larger than `[files] max_mib`.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn download(
    State(state): State<AppState>,
    Path(TransferPath { id, name }): Path<TransferPath>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::files::{FileStream, agent_error, refused, unexpected};
    use sandcast_proto::{FileOp, FileReply};
    let (row, _) = authorize(&state, &id, &headers, q.token.as_deref())?;
    transfers_on(&row)?;
    let path = sandcast_proto::transfer::download_path(&name).map_err(bad_name)?;
    let (mut stream, max): (FileStream, u64) = crate::files::open_path(
        &state,
        &id,
        |path, max_bytes| FileOp::Read { path, max_bytes },
        path,
    )
    .await?;
    if let Some(l) = state.manager.live(&id) {
        l.touch();
    }
    match stream.reply().await.map_err(agent_error)? {
        FileReply::File { size } if size <= max => {
            let mut resp = stream.file_response(size);
            let h = resp.headers_mut();
            for (key, value) in [
                (header::CONTENT_DISPOSITION, attachment(&name)),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ] {
                h.insert(
                    key,
                    value.parse().map_err(|_| ApiError::internal("a header"))?,
                );
            }
            Ok(resp)
        }
        FileReply::Directory => Err(ApiError::not_found(format!(
            "~/Downloads/{name} is a directory, not a download"
        ))),
        FileReply::Refused { reason, detail } => Err(refused(reason, detail)),
        other => Err(unexpected(other)),
    }
}

/// A file from the person in the viewer, for a file chooser of the remote
/// page.
///
/// Written to the session's `~/Uploads/{name}` (replaced once all of it
/// arrived), at most `[files] max_mib`; the viewer then names it in its
/// `choose_files` answer to the chooser.
#[utoipa::path(
    put,
    path = "/viewer/{id}/uploads/{name}",
    tag = "viewer",
    security(("viewer_token" = []), ("viewer_token_query" = []), ("api_key" = [])),
    params(TransferPath),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written.", body = crate::openapi::Written),
        (status = 400, description = "`id` is not a session id, or `name` is not a plain file name.", body = ErrorBody),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 403, description = "The session was created with `transfers: false`, or the token is a `view` token.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not running, or a directory is in the way.", body = ErrorBody),
        (status = 413, description = "The body is larger than `[files] max_mib`.", body = ErrorBody),
        (status = 502, description = "The session's agent failed or misbehaved.", body = ErrorBody),
    )
)]
pub async fn upload(
    State(state): State<AppState>,
    Path(TransferPath { id, name }): Path<TransferPath>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use sandcast_proto::FileOp;
    let (row, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    if grant.view_only() {
        return Err(view_only("uploads"));
    }
    transfers_on(&row)?;
    let path = sandcast_proto::transfer::upload_path(&name).map_err(bad_name)?;
    let shown = path.to_string();
    let (stream, max) = crate::files::open_path(
        &state,
        &id,
        |path, max_bytes| FileOp::Write { path, max_bytes },
        path,
    )
    .await?;
    if let Some(l) = state.manager.live(&id) {
        l.touch();
    }
    let size = crate::files::write_body(stream, max, body).await?;
    Ok(Json(crate::openapi::Written { path: shown, size }).into_response())
}

async fn input_pump(mut socket: WebSocket, live: Arc<crate::manager::Live>, grant: Grant) {
    use sandcast_webrtc::{RateLimiter, parse_viewer_message};
    let mut limiter = RateLimiter::default();
    let mut ended = live.ended();
    let mut to_viewer = live.viewer_messages();
    let lost = live.lost(&grant);
    tokio::pin!(lost);
    let mut dropped: u64 = 0;
    loop {
        let msg = tokio::select! {
            m = socket.recv() => m,
            // Its guard must not live on in the select's output.
            () = async { let _ = ended.wait_for(|e| *e).await; } => break,
            () = &mut lost => break,
            out = to_viewer.recv() => {
                match out {
                    Ok(m) => {
                        let text = serde_json::to_string(&m).unwrap_or_default();
                        if socket.send(WsMessage::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    // A viewer that reads too slowly misses some; it goes on.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
                continue;
            }
        };
        let data = match msg {
            Some(Ok(WsMessage::Text(t))) => Bytes::from(t.as_str().as_bytes().to_vec()),
            Some(Ok(WsMessage::Binary(b))) => b,
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let req = if grant.view_only() {
            // The server is the boundary: a view token's requests never
            // reach the session, whatever its page sends.
            Err("a view token's input, clipboard and resize are dropped".into())
        } else if limiter.allow(std::time::Instant::now()) {
            parse_viewer_message(&data).map_err(|e| e.to_string())
        } else {
            Err("more messages than the rate limit".into())
        };
        match req {
            Ok(req) => live.viewer_request(req).await,
            Err(e) => {
                dropped += 1;
                // Sparse, and never the content: it may be a password.
                if dropped == 1 || dropped.is_multiple_of(100) {
                    tracing::warn!(session = %live.id(), dropped, error = %e, "viewer input dropped");
                }
            }
        }
    }
    // A watcher held nothing, and must not release what others hold.
    if !grant.view_only() {
        live.viewer_request(sandcast_webrtc::ViewerRequest::Input(
            sandcast_proto::InputEvent::ReleaseAll,
        ))
        .await;
    }
}

/// Splices a noVNC WebSocket onto the session's VNC server until either
/// side ends, the session ends, or its token stops opening it (`lost`).
/// A `view` viewer's stream goes through [`crate::rfb_view::ViewFilter`]:
/// its keys, pointer, clipboard and resize never reach the VNC server.
async fn pump(
    socket: WebSocket,
    stream: tokio::net::UnixStream,
    ended: Option<tokio::sync::watch::Receiver<bool>>,
    lost: Option<impl std::future::Future<Output = ()>>,
    view_only: bool,
) {
    use futures::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut rd, mut wr) = stream.into_split();
    let up = async {
        let mut filter = view_only.then(crate::rfb_view::ViewFilter::default);
        while let Some(Ok(msg)) = ws_rx.next().await {
            let mut data = match msg {
                WsMessage::Binary(b) => b,
                WsMessage::Text(t) => Bytes::from(t.as_str().as_bytes().to_vec()),
                WsMessage::Close(_) => break,
                _ => continue,
            };
            if let Some(f) = &mut filter {
                match f.feed(&data) {
                    Ok(kept) => data = Bytes::from(kept),
                    Err(e) => {
                        tracing::warn!(error = %e, "a view viewer's RFB stream ended");
                        break;
                    }
                }
            }
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(WsMessage::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    let end = async {
        match ended {
            Some(mut e) => {
                let _ = e.wait_for(|v| *v).await;
            }
            None => std::future::pending().await,
        }
    };
    let lost = async {
        match lost {
            Some(l) => l.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = end => {}
        _ = lost => {}
    }
}

/// The last offer and answer per session, for the seed's GET endpoints.
#[derive(Default)]
pub struct Signaling {
    last: Mutex<HashMap<String, (String, String)>>,
}

/// Body of an offer.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct OfferBody {
    /// The viewer's SDP offer.
    sdp: String,
    /// `offer` when given.
    #[serde(default, rename = "type")]
    #[schema(pattern = "^offer$")]
    kind: Option<String>,
}

fn authorize_signaling(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
) -> Result<(Row, Grant), ApiError> {
    authorize(state, id, headers, None)
}

/// The last offer and answer are another viewer's (its addresses among
/// them): not for a `view` token.
fn not_for_watchers(grant: &Grant) -> Result<(), ApiError> {
    if grant.view_only() {
        return Err(view_only("the session's last offer and answer"));
    }
    Ok(())
}

/// How the gateway treats a viewer opened with `grant`.
fn viewer_options(grant: &Grant) -> sandcast_webrtc::ViewerOptions {
    sandcast_webrtc::ViewerOptions {
        view_only: grant.view_only(),
        ..Default::default()
    }
}

/// Send a WebRTC offer; the answer comes back at once (the seed's
/// endpoint).
///
/// The gateway is ICE-lite and puts all its candidates in the answer, so
/// no trickle is needed. A `starting` session takes offers too: the
/// picture follows as soon as the browser draws.
#[utoipa::path(
    post,
    path = "/api/webrtc/session/{id}/offer",
    tag = "seed",
    security(("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    request_body(description = "The offer: JSON, or the bare SDP as text.", content(
        (OfferBody = "application/json"),
        (String = "application/sdp"),
    )),
    responses(
        (status = 200, description = "The answer, and the id of the new viewer.", body = SdpMessage),
        (status = 400, description = "`id` is not a session id, or a malformed offer.", body = ErrorBody),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is neither `starting` nor `ready`.", body = ErrorBody),
        (status = 503, description = "WebRTC is turned off on this server.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn offer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (row, grant) = authorize_signaling(&state, &id, &headers)?;
    let Some(gw) = state.manager.gateway() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WebRTC is turned off on this server",
        ));
    };
    if !row.state.takes_stream_viewers() {
        return Err(session_is(&row));
    }
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the offer is not UTF-8"))?;
    let sdp = if text.trim_start().starts_with('{') {
        let b: OfferBody = serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request("bad offer body").detail(e.to_string()))?;
        if b.kind.as_deref().is_some_and(|k| k != "offer") {
            return Err(ApiError::bad_request("type must be \"offer\""));
        }
        b.sdp
    } else {
        text.to_string()
    };
    let answer = gw
        .accept_offer(&id, &sdp, viewer_options(&grant))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
                e.to_string(),
            )
        })?;
    if let Some(l) = state.manager.live(&id) {
        l.peer_opened(answer.viewer_id, &grant).await;
        l.touch();
    }
    sig.last
        .lock()
        .unwrap()
        .insert(id.clone(), (sdp, answer.sdp.clone()));
    Ok(Json(
        json!({ "type": "answer", "sdp": answer.sdp, "viewer_id": answer.viewer_id.to_string() }),
    )
    .into_response())
}

/// The last offer sent for a session (the seed's endpoint).
#[utoipa::path(
    get,
    path = "/api/webrtc/session/{id}/offer",
    tag = "seed",
    security(("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "The offer (`type` is `offer`).", body = SdpMessage),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 403, description = "A `view` token: another viewer's offer is not for it.", body = ErrorBody),
        (status = 404, description = "No such session, or no offer yet.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn last_offer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, grant) = authorize_signaling(&state, &id, &headers)?;
    not_for_watchers(&grant)?;
    let last = sig.last.lock().unwrap().get(&id).cloned();
    let (offer, _) = last.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no offer yet"))?;
    Ok(Json(json!({ "type": "offer", "sdp": offer })))
}

/// The last answer given for a session (the seed's endpoint; `POST`
/// answers the same as `GET`).
#[utoipa::path(
    method(get, post),
    path = "/api/webrtc/session/{id}/answer",
    tag = "seed",
    security(("viewer_token" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "The answer (`type` is `answer`).", body = SdpMessage),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 403, description = "A `view` token: another viewer's answer is not for it.", body = ErrorBody),
        (status = 404, description = "No such session, or no answer yet.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn last_answer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (_, grant) = authorize_signaling(&state, &id, &headers)?;
    not_for_watchers(&grant)?;
    let last = sig.last.lock().unwrap().get(&id).cloned();
    let (_, answer) = last.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no answer yet"))?;
    Ok(Json(json!({ "type": "answer", "sdp": answer })))
}

/// Query of `ice-servers`: the session the viewer token belongs to.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IceQuery {
    /// The session whose viewer token is sent; without it, only the
    /// operator key is accepted.
    #[param(pattern = "^[a-z0-9-]{1,64}$")]
    session: Option<String>,
}

/// The ICE servers the viewer should use (the seed's endpoint).
///
/// For the operator key, or a live session's viewer token with
/// `?session=<id>`. With a TURN shared secret, a credential valid for
/// `webrtc.turn.credential_ttl_seconds` is made for the caller.
#[utoipa::path(
    get,
    path = "/api/webrtc/ice-servers",
    tag = "seed",
    security(("viewer_token" = []), ("api_key" = [])),
    params(IceQuery),
    responses(
        (status = 200, description = "The configured ICE servers, as `RTCConfiguration.iceServers`, and a TURN credential when TURN is configured.", body = IceServers),
        (status = 400, description = "`session` is not a session id.", body = ErrorBody),
        (status = 401, description = "No API key and no `session`, or a token that does not open that session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session has ended.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn ice_servers(
    State(state): State<AppState>,
    Query(q): Query<IceQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = match q.session.as_deref() {
        Some(id) => {
            let (row, _) = authorize(&state, id, &headers, None)?;
            if !row.state.is_live() {
                return Err(session_is(&row));
            }
            row.id
        }
        None if auth::is_operator(&headers, &state.api_key) => "operator".to_string(),
        None => {
            return Err(ApiError::unauthorized(
                "send the API key, or a viewer token with ?session=<id>",
            ));
        }
    };
    let webrtc = &state.manager.config().webrtc;
    let mut servers = webrtc.ice_servers.clone();
    if let Some(turn) = &webrtc.turn {
        let expiry = chrono::Utc::now().timestamp() as u64 + turn.credential_ttl_seconds;
        let username = format!("{expiry}:{who}");
        let credential = auth::turn_credential(&turn.shared_secret, &username);
        servers.push(json!({ "urls": turn.urls, "username": username, "credential": credential }));
    }
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "iceServers": servers })),
    )
        .into_response())
}

/// WebRTC signaling over a WebSocket, for renegotiation and trickle.
///
/// A WebSocket upgrade. Messages are JSON text: the viewer sends
/// `{"type":"offer","sdp"}` (answered with `{"type":"answer","sdp","viewer_id"}`;
/// a later offer replaces the viewer, which is how it renegotiates) and
/// `{"type":"candidate",...}` (acknowledged: the gateway is ICE-lite and puts
/// all its candidates in the answer, so remote candidates are learned from
/// the viewer's checks). Errors come back as `{"type":"error","error"}`.
#[utoipa::path(
    get,
    path = "/api/webrtc/session/{id}/ws",
    tag = "signaling",
    security(("viewer_token" = []), ("viewer_token_query" = []), ("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; JSON messages as described."),
        (status = 400, description = "`id` is not a session id (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "No token, or one that does not open this session's viewer (another session's, revoked, expired, or an automation token).", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 503, description = "WebRTC is turned off on this server.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn signaling_ws(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (_, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    if state.manager.gateway().is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WebRTC is turned off on this server",
        ));
    }
    Ok(ws
        .max_message_size(limits::MAX_BODY)
        .on_upgrade(move |socket| signaling_session(state, id, grant, socket)))
}

async fn signaling_session(state: AppState, id: String, grant: Grant, mut socket: WebSocket) {
    let mut viewer: Option<sandcast_webrtc::ViewerId> = None;
    // Revoked or expired: the socket ends, and its viewer (closed by the
    // session's task too) with it.
    let lost = async {
        match state.manager.live(&id) {
            Some(l) => l.lost(&grant).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost);
    loop {
        let msg = tokio::select! {
            m = socket.recv() => m,
            () = &mut lost => {
                if let (Some(gw), Some(v)) = (state.manager.gateway(), viewer.take()) {
                    gw.close_viewer(v);
                }
                break;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        let text = match msg {
            WsMessage::Text(t) => t.to_string(),
            WsMessage::Close(_) => break,
            _ => continue,
        };
        let reply = signaling_reply(&state, &id, &grant, &text, &mut viewer).await;
        if socket
            .send(WsMessage::Text(reply.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
}

async fn signaling_reply(
    state: &AppState,
    id: &str,
    grant: &Grant,
    text: &str,
    viewer: &mut Option<sandcast_webrtc::ViewerId>,
) -> Value {
    let err = |e: String| json!({ "type": "error", "error": e });
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return err("messages must be JSON objects".into());
    };
    let Some(gw) = state.manager.gateway() else {
        return err("WebRTC is turned off".into());
    };
    match v["type"].as_str() {
        Some("offer") => {
            let Some(sdp) = v["sdp"].as_str() else {
                return err("an offer needs \"sdp\"".into());
            };
            match state.manager.store().get(id) {
                Ok(Some(row)) if row.state.takes_stream_viewers() => {}
                Ok(Some(row)) => return err(format!("the session is {}", row.state.as_str())),
                _ => return err("no such session".into()),
            }
            if let Some(old) = viewer.take() {
                gw.close_viewer(old);
            }
            match gw.accept_offer(id, sdp, viewer_options(grant)).await {
                Ok(answer) => {
                    *viewer = Some(answer.viewer_id);
                    if let Some(l) = state.manager.live(id) {
                        l.peer_opened(answer.viewer_id, grant).await;
                    }
                    json!({ "type": "answer", "sdp": answer.sdp, "viewer_id": answer.viewer_id.to_string() })
                }
                Err(e) => err(e.to_string()),
            }
        }
        Some("candidate") => json!({ "type": "ack" }),
        Some(other) => err(format!("unknown message type {other:?}")),
        None => err("a message needs \"type\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_name_cannot_break_out_of_its_header() {
        assert_eq!(
            attachment("report.pdf"),
            "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
        );
        assert_eq!(
            attachment("a \"b\";c.txt"),
            "attachment; filename=\"a _b_;c.txt\"; filename*=UTF-8''a%20%22b%22%3Bc.txt"
        );
        assert_eq!(
            attachment("ünï 你.csv"),
            "attachment; filename=\"_n_ _.csv\"; filename*=UTF-8''%C3%BCn%C3%AF%20%E4%BD%A0.csv"
        );
        // Whatever the name, the value is a valid header value.
        for name in ["a\\b", "x\u{7f}", "\u{202e}exe.txt"] {
            assert!(axum::http::HeaderValue::from_str(&attachment(name)).is_ok());
        }
    }
}

//! Automation beside the person: a Chrome DevTools Protocol endpoint per
//! session, and who holds control of its input.
//!
//! `GET /api/sessions/{id}/cdp` is a WebSocket carrying the browser-level
//! DevTools connection of the session's Chromium, which the server opens
//! through the agent (a stream to the browser's DevTools port on the
//! session's own loopback: nothing listens outside the session). The
//! `json/version` and `json/list` answers are the browser's own with every
//! `webSocketDebuggerUrl` pointing back here, which is what Playwright's
//! `connectOverCDP` and Puppeteer's `connect` read.
//!
//! The relay parses only what it must from the client's messages (the
//! `id`, `method` and `sessionId` of each) to refuse `Input.*` while the
//! person holds control; the browser's messages are passed on as they are,
//! bounded in size. Invariant: what the browser sends is the session's and
//! hostile: it is never parsed here but for the two `json/*` answers,
//! which are read with a size bound into fixed shapes, and whose URLs are
//! rebuilt by this server, never taken over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite;

use crate::api::{AppState, SessionPath};
use crate::error::{ApiError, ErrorBody};
use crate::limits;
use crate::manager::{Holder, InUse, Live};
use crate::store::{Row, State as SessionState};
use crate::tokens::{self, Credentials, Grant, Role};

/// Largest `json/*` answer read from the browser.
const MAX_JSON: usize = 1 << 20;
/// How long the browser's DevTools server gets to answer a `json/*` request
/// or a WebSocket handshake.
const DEVTOOLS_TIMEOUT: Duration = Duration::from_secs(10);
/// A client's activity touches the session at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(1);
/// The JSON-RPC error code CDP uses for a refused command.
const SERVER_ERROR: i64 = -32000;

/// Whether `path` is one of the DevTools endpoints, which check the API
/// key or an automation token themselves.
pub fn is_cdp_path(path: &str) -> bool {
    path.strip_prefix("/api/sessions/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, tail)| tail == "cdp" || tail.starts_with("cdp/"))
}

/// An automation token in the query, for clients that cannot set headers.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenQuery {
    /// An automation token of this session (never the API key: a key in a
    /// URL ends up in logs).
    pub token: Option<String>,
}

/// The session, if the request may automate it: the operator's key, or an
/// automation token of this session (never a viewer token), with what
/// opened it. It must be `ready`.
fn authorize(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(Row, Grant), ApiError> {
    let (row, who) = tokens::credentials(state, id, headers, query_token)?;
    let grant = match who {
        Credentials::Operator => Grant::control(),
        Credentials::Missing => {
            return Err(ApiError::unauthorized(
                "missing credentials: send Authorization: Bearer <API key or automation token>",
            ));
        }
        Credentials::Granted(g) if g.role == Role::Automation => g,
        Credentials::Granted(_) | Credentials::Unknown => {
            return Err(ApiError::unauthorized(
                "the credentials do not automate this session: use the API key or a token made \
                 with POST /api/sessions/{id}/tokens {\"role\": \"automation\"}",
            ));
        }
    };
    if row.state != SessionState::Ready {
        return Err(tokens::session_is(&row));
    }
    Ok((row, grant))
}

/// The session's DevTools endpoint as the client reached this server.
pub(crate) fn cdp_url(state: &AppState, headers: &HeaderMap, id: &str) -> String {
    format!("{}/api/sessions/{id}/cdp", ws_base(state, headers))
}

/// The `ws://` or `wss://` base of this server as the client reached it.
fn ws_base(state: &AppState, headers: &HeaderMap) -> String {
    let base = crate::api::base_url(state, headers);
    match base.strip_prefix("http") {
        Some(rest) => format!("ws{rest}"),
        None => base,
    }
}

/// The live session `id`, in use while the guard lives: an unwatched
/// session's browser may be paused, and in use it runs.
async fn in_use(state: &AppState, id: &str) -> Result<InUse, ApiError> {
    Ok(live_of(state, id)?.automation(false).await)
}

/// The live session `id`.
fn live_of(state: &AppState, id: &str) -> Result<Arc<Live>, ApiError> {
    state
        .manager
        .live(id)
        .ok_or_else(|| ApiError::no_session(id))
}

/// A `GET` of the browser's DevTools HTTP server through the agent: the
/// body of a 200, at most [`MAX_JSON`] bytes. The caller holds the
/// session in use.
async fn devtools_get(state: &AppState, id: &str, path: &str) -> Result<Vec<u8>, ApiError> {
    let stream = state.manager.open_devtools(id).await?;
    tokio::time::timeout(DEVTOOLS_TIMEOUT, http_get(stream, path))
        .await
        .map_err(|_| browser_error("the browser's DevTools server did not answer in time"))?
        .map_err(|e| browser_error(&e))
}

/// `GET path` over `stream` (HTTP/1.1, `Content-Length` body), bounded.
async fn http_get(mut stream: UnixStream, path: &str) -> Result<Vec<u8>, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("writing to the browser's DevTools server: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.len() > MAX_JSON {
            return Err(format!("the browser's answer exceeds {MAX_JSON} bytes"));
        }
        let mut chunk = [0u8; 8192];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the browser's DevTools server: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let status = resp
            .parse(&buf)
            .map_err(|e| format!("the browser's answer is not HTTP: {e}"))?;
        if let httparse::Status::Complete(head) = status {
            if resp.code != Some(200) {
                return Err(format!(
                    "the browser's DevTools server answered {}",
                    resp.code.unwrap_or(0)
                ));
            }
            let length = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            let body = &buf[head..];
            match length {
                Some(l) if l > MAX_JSON => {
                    return Err(format!("the browser's answer exceeds {MAX_JSON} bytes"));
                }
                Some(l) if body.len() >= l => return Ok(body[..l].to_vec()),
                None if n == 0 => return Ok(body.to_vec()),
                _ => {}
            }
        }
        if n == 0 {
            return Err("the browser's DevTools server closed the connection early".into());
        }
    }
}

fn browser_error(msg: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, msg.to_string())
}

/// Whether `s` is a DevTools target or browser id as Chromium makes them
/// (hex, or a UUID): the only part of the browser's URLs that is used.
fn is_target_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// What the browser's `json/version` says, in the fields clients read.
#[derive(Debug, Deserialize)]
struct BrowserVersion {
    #[serde(rename = "Browser", default)]
    browser: String,
    #[serde(rename = "Protocol-Version", default)]
    protocol_version: String,
    #[serde(rename = "User-Agent", default)]
    user_agent: String,
    #[serde(rename = "V8-Version", default)]
    v8_version: String,
    #[serde(rename = "WebKit-Version", default)]
    webkit_version: String,
    #[serde(rename = "webSocketDebuggerUrl")]
    ws_url: String,
}

impl BrowserVersion {
    /// The browser's id from its `webSocketDebuggerUrl`.
    fn browser_id(&self) -> Result<&str, ApiError> {
        self.ws_url
            .rsplit_once("/devtools/browser/")
            .map(|(_, id)| id)
            .filter(|id| is_target_id(id))
            .ok_or_else(|| browser_error("the browser's json/version names no browser target"))
    }
}

async fn browser_version(state: &AppState, id: &str) -> Result<BrowserVersion, ApiError> {
    let body = devtools_get(state, id, "/json/version").await?;
    serde_json::from_slice(&body).map_err(|e| {
        browser_error(&format!(
            "the browser's json/version is not as expected: {e}"
        ))
    })
}

/// A DevTools target as the browser's `json/list` describes it.
#[derive(Debug, Deserialize)]
struct Target {
    id: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    description: String,
}

/// The session browser's version, with `webSocketDebuggerUrl` pointing at
/// this server (what Playwright and Puppeteer read first).
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp/json/version",
    operation_id = "cdp_version",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, TokenQuery),
    responses(
        (status = 200, description = "The browser's version.", body = crate::openapi::CdpVersion),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`, or its agent is not connected.", body = ErrorBody),
        (status = 502, description = "The session's browser did not answer as expected.", body = ErrorBody),
    )
)]
pub async fn version(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &id, &headers, q.token.as_deref())?;
    let _in_use = in_use(&state, &id).await?;
    let v = browser_version(&state, &id).await?;
    Ok(Json(json!({
        "Browser": v.browser,
        "Protocol-Version": v.protocol_version,
        "User-Agent": v.user_agent,
        "V8-Version": v.v8_version,
        "WebKit-Version": v.webkit_version,
        "webSocketDebuggerUrl": cdp_url(&state, &headers, &id),
    })))
}

/// `json/version` with a trailing slash, as Playwright asks for it.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp/json/version/",
    operation_id = "cdp_version_slash",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, TokenQuery),
    responses(
        (status = 200, description = "As `json/version`.", body = crate::openapi::CdpVersion),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`.", body = ErrorBody),
        (status = 502, description = "The session's browser did not answer as expected.", body = ErrorBody),
    )
)]
pub async fn version_slash(
    state: State<AppState>,
    id: Path<String>,
    q: Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    version(state, id, q, headers).await
}

/// The session browser's targets (pages, workers), each with a
/// `webSocketDebuggerUrl` at this server.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp/json/list",
    operation_id = "cdp_list",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, TokenQuery),
    responses(
        (status = 200, description = "The browser's targets.", body = [crate::openapi::CdpTarget]),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`.", body = ErrorBody),
        (status = 502, description = "The session's browser did not answer as expected.", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &id, &headers, q.token.as_deref())?;
    let _in_use = in_use(&state, &id).await?;
    let body = devtools_get(&state, &id, "/json/list").await?;
    let targets: Vec<Target> = serde_json::from_slice(&body)
        .map_err(|e| browser_error(&format!("the browser's json/list is not as expected: {e}")))?;
    let base = ws_base(&state, &headers);
    let list: Vec<Value> = targets
        .into_iter()
        .filter(|t| is_target_id(&t.id))
        .map(|t| {
            json!({
                "id": t.id,
                "type": t.kind,
                "title": t.title,
                "url": t.url,
                "description": t.description,
                "webSocketDebuggerUrl": format!("{base}/api/sessions/{id}/cdp/devtools/page/{}", t.id),
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

/// `json/list` with a trailing slash, and `json` alone, as clients ask.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp/json",
    operation_id = "cdp_list_alias",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, TokenQuery),
    responses(
        (status = 200, description = "As `json/list`.", body = [crate::openapi::CdpTarget]),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`.", body = ErrorBody),
        (status = 502, description = "The session's browser did not answer as expected.", body = ErrorBody),
    )
)]
pub async fn list_alias(
    state: State<AppState>,
    id: Path<String>,
    q: Query<TokenQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    list(state, id, q, headers).await
}

/// The browser-level DevTools connection of the session's Chromium.
///
/// A WebSocket upgrade; CDP's JSON messages both ways, as text. Input
/// from it and from the person in the viewer both reach the page; while
/// the person holds control (`PUT /api/sessions/{id}/control`), `Input.*`
/// commands are answered with an error instead. A message over
/// `[cdp] max_message_mib`, or a binary one, closes the connection; the
/// session goes on.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp",
    operation_id = "cdp_browser",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, TokenQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol: the DevTools connection."),
        (status = 400, description = "`id` is not a session id (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`, or has `[cdp] clients_per_session` clients already.", body = ErrorBody),
        (status = 502, description = "The session's browser did not answer as expected.", body = ErrorBody),
    )
)]
pub async fn browser(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (_, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    let live = room_for_client(&state, &id)?;
    let in_use = live.automation(false).await;
    let v = browser_version(&state, &id).await?;
    let path = format!("/devtools/browser/{}", v.browser_id()?);
    upgrade(&state, &id, live, in_use, grant, &path, ws).await
}

/// A page-level DevTools connection (a `webSocketDebuggerUrl` of
/// `json/list`).
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/cdp/devtools/page/{target}",
    operation_id = "cdp_page",
    tag = "automation",
    security(("api_key" = []), ("automation_token" = [])),
    params(SessionPath, ("target" = String, Path, description = "A target id of `json/list`."), TokenQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol: the page's DevTools connection."),
        (status = 400, description = "`id` or `target` is malformed (a JSON error), or the request is not a WebSocket upgrade (plain text).", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "Neither the API key nor an automation token of this session.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session is not `ready`, or has `[cdp] clients_per_session` clients already.", body = ErrorBody),
        (status = 502, description = "The session's browser refused the connection (no such target).", body = ErrorBody),
    )
)]
pub async fn page(
    State(state): State<AppState>,
    Path((id, target)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (_, grant) = authorize(&state, &id, &headers, q.token.as_deref())?;
    if !is_target_id(&target) {
        return Err(ApiError::bad_request(
            "target: not a DevTools target id (hex digits and dashes, up to 64)",
        ));
    }
    let live = room_for_client(&state, &id)?;
    let in_use = live.automation(false).await;
    let path = format!("/devtools/page/{target}");
    upgrade(&state, &id, live, in_use, grant, &path, ws).await
}

/// The session, if it has room for one more automation client.
fn room_for_client(state: &AppState, id: &str) -> Result<Arc<Live>, ApiError> {
    let live = live_of(state, id)?;
    let most = state.manager.config().cdp.clients_per_session;
    if live.snapshot().automation >= most {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the session has {most} automation clients already ([cdp] clients_per_session)"
            ),
        ));
    }
    Ok(live)
}

/// Connects to the browser's DevTools WebSocket at `path`, then upgrades
/// the client's request and relays between the two.
async fn upgrade(
    state: &AppState,
    id: &str,
    live: Arc<Live>,
    in_use: InUse,
    grant: Grant,
    path: &str,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let limit = (state.manager.config().cdp.max_message_mib as usize) << 20;
    let stream = state.manager.open_devtools(id).await?;
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let connect = tokio_tungstenite::client_async_with_config(
        format!("ws://localhost{path}"),
        stream,
        Some(config),
    );
    let (browser, _) = tokio::time::timeout(DEVTOOLS_TIMEOUT, connect)
        .await
        .map_err(|_| browser_error("the browser's DevTools server did not answer in time"))?
        .map_err(|e| browser_error(&format!("the browser refused the DevTools connection: {e}")))?;
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| async move {
            let _client = live.automation(true).await;
            drop(in_use);
            relay(socket, browser, &live, &grant).await;
        })
        .into_response())
}

/// What becomes of a client's message.
#[derive(Debug, PartialEq)]
enum Gate {
    /// Passed on to the browser as it is.
    Forward,
    /// Answered by the server with this error reply, not passed on.
    Refuse(String),
}

/// The parts of a CDP command the relay reads.
#[derive(Deserialize)]
struct CommandHead {
    id: Option<i64>,
    method: Option<String>,
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
}

/// Decides a client's text message. One that does not parse is refused
/// rather than passed on: what the server cannot read, it cannot check.
fn gate(text: &str, control: Holder, session: &str) -> Gate {
    let head: CommandHead = match serde_json::from_str(text) {
        Ok(h) => h,
        Err(e) => {
            return Gate::Refuse(
                json!({"error": {"code": -32700, "message": format!("sandcast: not a CDP command: {e}")}})
                    .to_string(),
            );
        }
    };
    let refuse = |message: String| {
        let mut reply = json!({"id": head.id, "error": {"code": SERVER_ERROR, "message": message}});
        if let Some(s) = &head.session_id {
            reply["sessionId"] = json!(s);
        }
        Gate::Refuse(reply.to_string())
    };
    let Some(method) = &head.method else {
        return refuse("sandcast: a CDP command needs a method".into());
    };
    if head.id.is_none() {
        return refuse("sandcast: a CDP command needs an integer id".into());
    }
    if control == Holder::Person && method.starts_with("Input.") {
        return refuse(format!(
            "sandcast: automation input is paused: the person in the viewer holds control of \
             session {session} (PUT /api/sessions/{session}/control {{\"holder\": \"shared\"}} gives it back)"
        ));
    }
    Gate::Forward
}

/// Relays between the client and the browser until either closes or the
/// session ends.
async fn relay(
    client: WebSocket,
    browser: tokio_tungstenite::WebSocketStream<UnixStream>,
    live: &Live,
    grant: &Grant,
) {
    let (mut c_tx, mut c_rx) = client.split();
    let mut lost = std::pin::pin!(live.lost(grant));
    let (mut b_tx, mut b_rx) = browser.split();
    let snapshots = live.snapshots();
    let mut ended = live.ended();
    let mut ended = std::pin::pin!(async move {
        let _ = ended.wait_for(|e| *e).await;
    });
    let mut touched = Instant::now();
    let close = |code: u16, reason: &'static str| {
        WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            m = c_rx.next() => match m {
                Some(Ok(WsMessage::Text(t))) => {
                    if touched.elapsed() >= TOUCH_EVERY {
                        touched = Instant::now();
                        live.touch();
                    }
                    let control = snapshots.borrow().control;
                    match gate(t.as_str(), control, live.id()) {
                        Gate::Forward => {
                            if b_tx.send(tungstenite::Message::text(t.as_str())).await.is_err() {
                                let _ = c_tx.send(close(1011, "the browser's DevTools connection failed")).await;
                                break;
                            }
                        }
                        Gate::Refuse(reply) => {
                            if c_tx.send(WsMessage::Text(reply.into())).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                Some(Ok(WsMessage::Binary(_))) => {
                    let _ = c_tx.send(close(1003, "CDP messages are JSON text")).await;
                    break;
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Err(e)) => {
                    if too_big(e) {
                        let _ = c_tx.send(close(1009, "a message exceeds [cdp] max_message_mib")).await;
                    }
                    break;
                }
                Some(Ok(WsMessage::Close(_))) | None => break,
            },
            m = b_rx.next() => match m {
                Some(Ok(tungstenite::Message::Text(t))) => {
                    if c_tx.send(WsMessage::Text(t.as_str().into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    if c_tx.send(WsMessage::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(tungstenite::Message::Close(_))) | Some(Err(_)) | None => {
                    let _ = c_tx.send(close(1011, "the browser closed its DevTools connection")).await;
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = &mut ended => {
                let _ = c_tx.send(close(1001, "the session ended")).await;
                break;
            }
            _ = &mut lost => {
                let _ = c_tx.send(close(1008, "the automation token was revoked or expired")).await;
                break;
            }
        }
    }
    let _ = b_tx.send(tungstenite::Message::Close(None)).await;
}

/// Whether a client's WebSocket failed on a message over the size limit.
fn too_big(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Body of `PUT /api/sessions/{id}/control`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// `person` pauses automation input; `shared` gives it back.
    pub holder: Holder,
}

fn control_json(holder: Holder, clients: usize) -> Value {
    json!({"holder": holder.as_str(), "automation_clients": clients})
}

/// Who holds control of the session's input, and how many automation
/// clients are connected.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/control",
    tag = "automation",
    security(("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "Who holds control.", body = crate::openapi::Control),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 404, description = "No such session, or it is not running.", body = ErrorBody),
    )
)]
pub async fn get_control(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    limits::check_id(&id).map_err(ApiError::bad_request)?;
    let live = state
        .manager
        .live(&id)
        .ok_or_else(|| ApiError::not_found(format!("session {id} is not running")))?;
    let s = live.snapshot();
    Ok(Json(control_json(s.control, s.automation)))
}

/// Take control for the person (`person`: automation clients' `Input.*`
/// commands are refused) or give it back (`shared`). Said on the
/// session's event stream (`control`) and to its viewers.
#[utoipa::path(
    put,
    path = "/api/sessions/{id}/control",
    tag = "automation",
    security(("api_key" = [])),
    params(SessionPath),
    request_body = ControlRequest,
    responses(
        (status = 200, description = "Who holds control now.", body = crate::openapi::Control),
        (status = 400, description = "`id` or the body is malformed.", body = ErrorBody),
        (status = 404, description = "No such session, or it is not running.", body = ErrorBody),
    )
)]
pub async fn put_control(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<ControlRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    limits::check_id(&id).map_err(ApiError::bad_request)?;
    set_control(&state, &id, control_body(body)?.holder).await
}

/// The body of a control request, or a 400 naming what is wrong.
pub fn control_body(
    body: Result<Json<ControlRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<ControlRequest, ApiError> {
    body.map(|Json(r)| r).map_err(|e| {
        ApiError::bad_request(format!(
            "body: {} (expected {{\"holder\": \"person\"|\"shared\"}})",
            e.body_text()
        ))
    })
}

/// Sets the holder of a running session.
pub async fn set_control(
    state: &AppState,
    id: &str,
    holder: Holder,
) -> Result<Json<Value>, ApiError> {
    let not_running = || ApiError::not_found(format!("session {id} is not running"));
    let live = state.manager.live(id).ok_or_else(not_running)?;
    let s = live.set_control(holder).await.ok_or_else(not_running)?;
    Ok(Json(control_json(s.control, s.automation)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(g: Gate) -> Value {
        match g {
            Gate::Refuse(s) => serde_json::from_str(&s).unwrap(),
            Gate::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn input_is_refused_only_while_the_person_holds_control() {
        let key = r#"{"id":7,"method":"Input.dispatchKeyEvent","params":{"type":"keyDown"},"sessionId":"AB"}"#;
        assert_eq!(gate(key, Holder::Shared, "s1"), Gate::Forward);
        let r = refused(gate(key, Holder::Person, "s1"));
        assert_eq!(r["id"], 7);
        assert_eq!(r["sessionId"], "AB");
        assert_eq!(r["error"]["code"], SERVER_ERROR);
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("PUT /api/sessions/s1/control")
        );
        // Other domains go on while the person drives.
        let eval = r#"{"id":8,"method":"Runtime.evaluate","params":{"expression":"1"}}"#;
        assert_eq!(gate(eval, Holder::Person, "s1"), Gate::Forward);
    }

    #[test]
    fn what_cannot_be_read_is_not_passed_on() {
        // Escapes are read as the browser reads them.
        let escaped = r#"{"id":1,"method":"Input\u002edispatchMouseEvent"}"#;
        assert!(matches!(
            gate(escaped, Holder::Person, "s"),
            Gate::Refuse(_)
        ));
        // Two methods: which one would the browser take?
        let twice = r#"{"id":1,"method":"Runtime.evaluate","method":"Input.insertText"}"#;
        assert!(matches!(gate(twice, Holder::Shared, "s"), Gate::Refuse(_)));
        for bad in [
            "",
            "{",
            "[1]",
            "null",
            r#"{"id":1}"#,
            r#"{"method":"Page.enable"}"#,
            r#"{"id":"x","method":"Page.enable"}"#,
        ] {
            assert!(
                matches!(gate(bad, Holder::Shared, "s"), Gate::Refuse(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn cdp_paths_are_recognised() {
        assert!(is_cdp_path("/api/sessions/abc/cdp"));
        assert!(is_cdp_path("/api/sessions/abc/cdp/json/version"));
        assert!(!is_cdp_path("/api/sessions/abc/cdpx"));
        assert!(!is_cdp_path("/api/sessions/abc"));
        assert!(!is_cdp_path("/api/sessions/abc/files/cdp"));
        assert!(!is_cdp_path("/viewer/abc/cdp"));
    }

    #[test]
    fn target_ids_are_plain() {
        assert!(is_target_id("39d93247-ce16-4c0b-8b3c-8b52db799045"));
        assert!(is_target_id("E3F0A1B2C3D4E5F60718293A4B5C6D7E"));
        for bad in ["", "../x", "a/b", "x y", &"a".repeat(65)] {
            assert!(!is_target_id(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn http_answers_are_bounded_and_read_by_length() {
        async fn answer(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
            let (a, mut b) = UnixStream::pair().unwrap();
            tokio::spawn(async move {
                let mut req = [0u8; 256];
                let _ = b.read(&mut req).await;
                let _ = b.write_all(&bytes).await;
                // Kept open: the body's length must end the read.
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
            http_get(a, "/json/version").await
        }
        let ok = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec()).await;
        assert_eq!(ok.unwrap(), b"{}");
        let err = answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        assert!(err.unwrap_err().contains("404"));
        let huge = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_JSON + 1
        );
        assert!(
            answer(huge.into_bytes())
                .await
                .unwrap_err()
                .contains("exceeds")
        );
        assert!(
            answer(b"SSH-2.0\r\n\r\n".to_vec())
                .await
                .unwrap_err()
                .contains("not HTTP")
        );
    }
}

//! The viewer: its page and assets (embedded in the binary), its state
//! endpoint, the noVNC WebSocket tunnelled through the agent, and WebRTC
//! signaling (the seed's endpoints).

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

use crate::api::{AppState, bearer, session_json};
use crate::auth;
use crate::error::ApiError;
use crate::limits;
use crate::store::{Row, State as SessionState};

/// The viewer's files: `viewer/` of the source tree.
#[derive(Embed)]
#[folder = "../../viewer/"]
struct Assets;

/// `GET /assets/{*path}`.
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

/// `GET /viewer/{id}`: the page; the token stays in the URL fragment.
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

/// Checks a request's credential against a session; the session's row when
/// it opens it. The viewer token may come from the `Authorization` header or
/// (where a browser cannot set headers: WebSockets) the query; the operator
/// key only ever from the header, never from a URL that proxies log.
fn authorize(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Row, ApiError> {
    limits::check_id(id).map_err(ApiError::bad_request)?;
    let row = state
        .manager
        .store()
        .get(id)?
        .ok_or_else(|| ApiError::no_session(id))?;
    if auth::is_operator(headers, &state.api_key) {
        return Ok(row);
    }
    let Some(token) = bearer(headers).or(query_token) else {
        return Err(ApiError::unauthorized("missing viewer token"));
    };
    if auth::token_matches(token, &row.token_hash) {
        Ok(row)
    } else {
        Err(ApiError::unauthorized(
            "the token does not open this session",
        ))
    }
}

/// `GET /viewer/{id}/state`.
pub async fn state(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let row = authorize(&state, &id, &headers, None)?;
    let live = state.manager.live(&id);
    if let Some(l) = &live {
        l.touch();
    }
    let full = session_json(&row, live.as_deref());
    Ok(Json(json!({
        "id": full["id"], "state": full["state"], "reason": full["reason"],
        "width": full["width"], "height": full["height"], "children": full["children"],
        "webrtc": state.manager.gateway().is_some(),
    })))
}

/// Query carrying the token where headers cannot (WebSocket).
#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// `GET /viewer/{id}/vnc?token=…`: RFB over a WebSocket.
pub async fn vnc(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let row = authorize(&state, &id, &headers, q.token.as_deref())?;
    if row.state != SessionState::Ready {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the session is {}", row.state.as_str()),
        ));
    }
    let stream = state.manager.open_vnc(&id).await?;
    let live = state.manager.live(&id);
    Ok(ws
        .protocols(["binary"])
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| async move {
            if let Some(l) = &live {
                l.viewer(true);
            }
            let ended = live.as_ref().map(|l| l.ended());
            pump(socket, stream, ended).await;
            if let Some(l) = &live {
                l.viewer(false);
            }
        }))
}

async fn pump(
    socket: WebSocket,
    stream: tokio::net::UnixStream,
    ended: Option<tokio::sync::watch::Receiver<bool>>,
) {
    use futures::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (mut rd, mut wr) = stream.into_split();
    let up = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                WsMessage::Binary(b) => b,
                WsMessage::Text(t) => Bytes::from(t.as_str().as_bytes().to_vec()),
                WsMessage::Close(_) => break,
                _ => continue,
            };
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
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = end => {}
    }
}

/// The last offer and answer per session, for the seed's GET endpoints.
#[derive(Default)]
pub struct Signaling {
    last: Mutex<HashMap<String, (String, String)>>,
}

/// Body of an offer.
#[derive(Debug, Deserialize)]
struct OfferBody {
    sdp: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

fn authorize_signaling(state: &AppState, id: &str, headers: &HeaderMap) -> Result<Row, ApiError> {
    authorize(state, id, headers, None)
}

/// `POST /api/webrtc/session/{id}/offer`: answers at once.
pub async fn offer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let row = authorize_signaling(&state, &id, &headers)?;
    let Some(gw) = state.manager.gateway() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WebRTC is turned off on this server",
        ));
    };
    if row.state != SessionState::Ready {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the session is {}", row.state.as_str()),
        ));
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
        .accept_offer(&id, &sdp, sandcast_webrtc::ViewerOptions::default())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
                e.to_string(),
            )
        })?;
    if let Some(l) = state.manager.live(&id) {
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

/// `GET /api/webrtc/session/{id}/offer`.
pub async fn last_offer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_signaling(&state, &id, &headers)?;
    let last = sig.last.lock().unwrap().get(&id).cloned();
    let (offer, _) = last.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no offer yet"))?;
    Ok(Json(json!({ "type": "offer", "sdp": offer })))
}

/// `GET|POST /api/webrtc/session/{id}/answer`.
pub async fn last_answer(
    State(state): State<AppState>,
    axum::Extension(sig): axum::Extension<Arc<Signaling>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_signaling(&state, &id, &headers)?;
    let last = sig.last.lock().unwrap().get(&id).cloned();
    let (_, answer) = last.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no answer yet"))?;
    Ok(Json(json!({ "type": "answer", "sdp": answer })))
}

/// Query of `ice-servers`: the session the viewer token belongs to.
#[derive(Debug, Deserialize)]
pub struct IceQuery {
    session: Option<String>,
}

/// `GET /api/webrtc/ice-servers[?session=<id>]`: the STUN/TURN servers, for
/// the operator key or a live session's viewer token (with `session`).
/// With a TURN shared secret, a credential valid for
/// `webrtc.turn.credential_ttl_seconds` is made for the caller.
pub async fn ice_servers(
    State(state): State<AppState>,
    Query(q): Query<IceQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = match q.session.as_deref() {
        Some(id) => {
            let row = authorize(&state, id, &headers, None)?;
            if !row.state.is_live() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the session is {}", row.state.as_str()),
                ));
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

/// `GET /api/webrtc/session/{id}/ws?token=…`: WebSocket signaling for
/// renegotiation and trickle. Messages are JSON: the viewer sends
/// `{"type":"offer","sdp"}` (answered with `{"type":"answer","sdp","viewer_id"}`;
/// a later offer replaces the viewer, which is how it renegotiates) and
/// `{"type":"candidate",...}` (acknowledged: the gateway is ICE-lite and puts
/// all its candidates in the answer, so remote candidates are learned from
/// the viewer's checks). Errors come back as `{"type":"error","error"}`.
pub async fn signaling_ws(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    authorize(&state, &id, &headers, q.token.as_deref())?;
    if state.manager.gateway().is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "WebRTC is turned off on this server",
        ));
    }
    Ok(ws
        .max_message_size(limits::MAX_BODY)
        .on_upgrade(move |socket| signaling_session(state, id, socket)))
}

async fn signaling_session(state: AppState, id: String, mut socket: WebSocket) {
    let mut viewer: Option<sandcast_webrtc::ViewerId> = None;
    while let Some(Ok(msg)) = socket.recv().await {
        let text = match msg {
            WsMessage::Text(t) => t.to_string(),
            WsMessage::Close(_) => break,
            _ => continue,
        };
        let reply = signaling_reply(&state, &id, &text, &mut viewer).await;
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
                Ok(Some(row)) if row.state == SessionState::Ready => {}
                Ok(Some(row)) => return err(format!("the session is {}", row.state.as_str())),
                _ => return err("no such session".into()),
            }
            if let Some(old) = viewer.take() {
                gw.close_viewer(old);
            }
            match gw
                .accept_offer(id, sdp, sandcast_webrtc::ViewerOptions::default())
                .await
            {
                Ok(answer) => {
                    *viewer = Some(answer.viewer_id);
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

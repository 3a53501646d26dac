//! The operator API: sessions, their logs and events, the seed's
//! `/api/auth/start`, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth;
use crate::error::ApiError;
use crate::limits;
use crate::manager::{Live, Manager, NewSession};
use crate::store::{Row, Spec, State as SessionState};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The session manager.
    pub manager: Arc<Manager>,
    /// The operator key.
    pub api_key: Arc<String>,
}

/// Requires the operator key on `/api/*` (signaling has its own check).
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/api/webrtc/") {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(key) if auth::secret_eq(key, &state.api_key) => next.run(req).await,
        Some(_) => ApiError::unauthorized("wrong API key").into_response(),
        None => ApiError::unauthorized("missing API key: send Authorization: Bearer <key>")
            .into_response(),
    }
}

/// The bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
}

/// Body of `POST /api/sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    user_id: Option<String>,
    start_url: Option<String>,
    provider: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    ttl_seconds: Option<u64>,
    idle_timeout_seconds: Option<u64>,
    kiosk: Option<bool>,
    launch: Option<Vec<String>>,
    /// `"internet"`, `"none"`, a list of networks, or a bool; read in
    /// [`validate`] so that a bad entry is named in a 400.
    egress: Option<Value>,
}

/// Body of the seed's `POST /api/auth/start`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthStartRequest {
    user_id: String,
    provider: String,
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    match body {
        Ok(Json(t)) => Ok(t),
        Err(e) => {
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                StatusCode::PAYLOAD_TOO_LARGE
            } else if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            } else {
                StatusCode::BAD_REQUEST
            };
            Err(ApiError::new(status, "bad request body").detail(e.body_text()))
        }
    }
}

/// Validates a request into what the manager runs.
pub fn validate(state: &AppState, req: CreateRequest) -> Result<NewSession, ApiError> {
    let cfg = state.manager.config();
    let bad = |field: &str, msg: String| {
        ApiError::bad_request(format!("{field}: {msg}")).detail(json!({ "field": field }))
    };
    if let Some(u) = &req.user_id {
        limits::check_name("user_id", u).map_err(|e| bad("user_id", e))?;
    }
    let provider = match &req.provider {
        Some(p) => {
            limits::check_name("provider", p).map_err(|e| bad("provider", e))?;
            Some(cfg.providers.get(p).ok_or_else(|| {
                bad(
                    "provider",
                    format!(
                        "unknown provider {p:?}; configured: {:?}",
                        cfg.providers.keys().collect::<Vec<_>>()
                    ),
                )
            })?)
        }
        None => None,
    };
    let start_url = req
        .start_url
        .clone()
        .or_else(|| provider.map(|p| p.start_url.clone()))
        .unwrap_or_else(|| cfg.session.start_url.clone());
    limits::check_url(&start_url).map_err(|e| bad("start_url", e))?;
    let width = req.width.unwrap_or(cfg.session.width);
    let height = req.height.unwrap_or(cfg.session.height);
    limits::check_size(width, height).map_err(|e| bad("width/height", e))?;
    let ttl = req.ttl_seconds.unwrap_or(cfg.session.ttl_seconds);
    if ttl == 0 || ttl > limits::MAX_TTL {
        return Err(bad(
            "ttl_seconds",
            format!("{ttl} is outside 1..={}", limits::MAX_TTL),
        ));
    }
    let idle = req
        .idle_timeout_seconds
        .unwrap_or(cfg.session.idle_timeout_seconds);
    if idle == 0 || idle > limits::MAX_TTL {
        return Err(bad(
            "idle_timeout_seconds",
            format!("{idle} is outside 1..={}", limits::MAX_TTL),
        ));
    }
    let launch = req
        .launch
        .clone()
        .or_else(|| provider.and_then(|p| p.launch.clone()));
    if let Some(argv) = &launch {
        limits::check_launch(argv).map_err(|e| bad("launch", e))?;
    }
    let egress = match req.egress {
        None => cfg.session.egress.clone(),
        Some(v) => limits::check_egress(v).map_err(|e| bad("egress", e))?,
    };
    Ok(NewSession {
        user_id: req.user_id,
        provider: req.provider,
        spec: Spec {
            start_url,
            width,
            height,
            kiosk: req.kiosk.unwrap_or(false),
            launch,
            idle_timeout_seconds: idle,
            egress,
        },
        ttl_seconds: ttl,
    })
}

fn rfc3339(ms: i64) -> Value {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// A session as the API shows it.
pub fn session_json(row: &Row, live: Option<&Live>) -> Value {
    let (children, display) = match live {
        Some(l) => (
            serde_json::to_value(l.children()).unwrap_or_default(),
            l.display(),
        ),
        None => (json!([]), (row.spec.width, row.spec.height)),
    };
    json!({
        "id": row.id,
        "user_id": row.user_id,
        "provider": row.provider,
        "state": row.state.as_str(),
        "reason": row.reason,
        "start_url": row.spec.start_url,
        "width": display.0,
        "height": display.1,
        "kiosk": row.spec.kiosk,
        "launch": row.spec.launch,
        "egress": row.spec.egress,
        "idle_timeout_seconds": row.spec.idle_timeout_seconds,
        "created_at": rfc3339(row.created_ms),
        "ready_at": row.ready_ms.map(rfc3339),
        "expires_at": rfc3339(row.expires_ms),
        "stopped_at": row.stopped_ms.map(rfc3339),
        "children": children,
    })
}

fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    let cfg = &state.manager.config().public_url;
    if !cfg.is_empty() {
        return cfg.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(String::from)
        .unwrap_or_else(|| state.manager.config().listen.to_string());
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    format!("{proto}://{host}")
}

fn created(state: &AppState, headers: &HeaderMap, new: NewSession) -> Result<Response, ApiError> {
    let (row, token) = state.manager.create(new)?;
    let mut body = session_json(&row, state.manager.live(&row.id).as_deref());
    body["viewer_url"] = json!(format!(
        "{}/viewer/{}#token={}",
        base_url(state, headers),
        row.id,
        token
    ));
    body["viewer_token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /api/sessions`.
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    let new = validate(&state, req)?;
    created(&state, &headers, new)
}

/// `POST /api/auth/start`: a session from a provider preset.
pub async fn auth_start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<AuthStartRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    let new = validate(
        &state,
        CreateRequest {
            user_id: Some(req.user_id),
            provider: Some(req.provider),
            ..Default::default()
        },
    )?;
    let resp = created(&state, &headers, new)?;
    Ok(resp)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    limits::check_id(id).map_err(|e| ApiError::bad_request(e).detail(json!({ "field": "id" })))
}

/// `GET /api/sessions`.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rows = state.manager.store().list()?;
    let sessions: Vec<Value> = rows
        .iter()
        .map(|r| session_json(r, state.manager.live(&r.id).as_deref()))
        .collect();
    Ok(Json(json!({ "sessions": sessions })))
}

/// `GET /api/sessions/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    let row = state
        .manager
        .store()
        .get(&id)?
        .ok_or_else(|| ApiError::no_session(&id))?;
    Ok(Json(session_json(&row, state.manager.live(&id).as_deref())))
}

/// `DELETE /api/sessions/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    let row = state.manager.stop(&id, "deleted through the API").await?;
    Ok(Json(session_json(&row, None)))
}

/// Query of the logs endpoint.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    follow: Option<String>,
}

/// `GET /api/sessions/{id}/logs[?follow=1]`.
pub async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    state
        .manager
        .store()
        .get(&id)?
        .ok_or_else(|| ApiError::no_session(&id))?;
    let path = state
        .manager
        .config()
        .data_dir
        .join("logs")
        .join(format!("{id}.log"));
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes"));
    let live = state.manager.live(&id);
    // Subscribe before reading the file so no line falls in between.
    let sub = live
        .as_ref()
        .filter(|_| follow)
        .map(|l| (l.subscribe_logs(), l.ended()));
    let existing = tokio::fs::read_to_string(&path).await.unwrap_or_default();
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let Some((rx, mut ended)) = sub else {
        return Ok((text_plain, existing).into_response());
    };
    let head = futures::stream::once(async move { Ok::<_, Infallible>(existing) });
    let tail = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) => return Some((Ok::<_, Infallible>(format!("{line}\n")), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    })
    .take_until(async move {
        let _ = ended.wait_for(|e| *e).await;
    });
    Ok((text_plain, Body::from_stream(head.chain(tail))).into_response())
}

/// `GET /api/sessions/{id}/events`: server-sent events, current state first.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    check_id(&id)?;
    let rx = state.manager.subscribe();
    let row = state
        .manager
        .store()
        .get(&id)?
        .ok_or_else(|| ApiError::no_session(&id))?;
    let first = Event::default()
        .event("state")
        .data(json!({"state": row.state.as_str(), "reason": row.reason}).to_string());
    let done = !row.state.is_live();
    let filter_id = id.clone();
    let rest = futures::stream::unfold((rx, done), move |(mut rx, done)| {
        let id = filter_id.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.id == id => {
                        let end = ev.kind == "state"
                            && matches!(ev.data["state"].as_str(), Some("stopped"));
                        let event = Event::default().event(ev.kind).data(ev.data.to_string());
                        return Some((Ok(event), (rx, end)));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        }
    });
    let stream = futures::stream::once(async move { Ok(first) }).chain(rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `GET /health`.
pub async fn health(State(state): State<AppState>) -> Response {
    let store_ok = state.manager.store().ping();
    let backend = state.manager.backend().readiness().await;
    let ok = store_ok.is_ok() && backend.ready;
    let body = json!({
        "status": if ok { "ok" } else { "degraded" },
        "store": { "ok": store_ok.is_ok(), "detail": store_ok.err().map(|e| e.to_string()) },
        "backend": { "name": state.manager.backend().name(), "ready": backend.ready, "checks": backend.checks },
        "webrtc": state.manager.gateway().map(|g| json!({
            "udp": g.udp_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "tcp": g.tcp_addr().map(|a| a.to_string()),
        })),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`.
pub async fn metrics(
    State(state): State<AppState>,
    metrics: axum::Extension<Arc<crate::metrics::Metrics>>,
) -> Response {
    if let Ok(rows) = state.manager.store().list() {
        let counts: Vec<(SessionState, i64)> = SessionState::ALL
            .iter()
            .map(|s| (*s, rows.iter().filter(|r| r.state == *s).count() as i64))
            .collect();
        metrics.set_states(&counts);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

/// Unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

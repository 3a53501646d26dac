//! The operator API: sessions, their logs and events, the seed's
//! `/api/auth/start`, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth;
use crate::config::Config;
use crate::error::{ApiError, ErrorBody};
use crate::limits;
use crate::log_read::{self, Selection};
use crate::manager::{Live, Manager, NewSession};
use crate::openapi::{CreatedSession, Health, HealthDetail, Session, SessionList};
use crate::session_log;
use crate::store::{PageQuery, Row, Spec, State as SessionState};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The session manager.
    pub manager: Arc<Manager>,
    /// The operator key.
    pub api_key: Arc<String>,
    /// This server as a node of a cluster, when its store is PostgreSQL.
    pub node: Option<Arc<crate::cluster::Node>>,
}

/// Requires the operator key on `/api/*` (signaling has its own check).
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // Signaling and the DevTools endpoints take their own tokens too.
    if req.uri().path().starts_with("/api/webrtc/") || crate::cdp::is_cdp_path(req.uri().path()) {
        return next.run(req).await;
    }
    if auth::is_operator(req.headers(), &state.api_key) {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
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

/// Body of `POST /api/sessions`: every field is optional, unknown fields
/// are refused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "user_id": "alice", "start_url": "https://example.org/", "width": 1280, "height": 720
}))]
pub struct CreateRequest {
    /// The operator's own id for the user (up to 128 characters), kept with
    /// the session.
    #[schema(max_length = 128)]
    user_id: Option<String>,
    /// The page the browser opens: an `http`, `https`, `data` or `about` URL.
    /// Default: the provider's, else the configured one.
    start_url: Option<String>,
    /// A provider preset from the configuration: its start URL and launch
    /// command apply unless given here.
    #[schema(max_length = 128)]
    provider: Option<String>,
    /// Display width in pixels.
    #[schema(minimum = 320, maximum = 3840)]
    width: Option<u32>,
    /// Display height in pixels.
    #[schema(minimum = 240, maximum = 2160)]
    height: Option<u32>,
    /// Seconds until the session is stopped, however busy.
    #[schema(minimum = 1, maximum = 86400)]
    ttl_seconds: Option<u64>,
    /// Seconds without a viewer before the session is stopped.
    #[schema(minimum = 1, maximum = 86400)]
    idle_timeout_seconds: Option<u64>,
    /// Chromium in kiosk mode (no tabs, no address bar).
    kiosk: Option<bool>,
    /// A command run in the session beside the browser, as argv, e.g.
    /// `["my-cli", "login"]`.
    #[schema(max_items = 64)]
    launch: Option<Vec<String>>,
    /// `"internet"`, `"none"`, a list of networks, or a bool; read in
    /// [`validate`] so that a bad entry is named in a 400.
    #[schema(value_type = Option<crate::openapi::EgressInput>)]
    egress: Option<Value>,
    /// The display's keyboard layout as XKB names it, e.g. `"de"`, `"fr"`,
    /// `"jp"` or `"us(intl)"`, so that shortcuts and physical keys match
    /// the person's keyboard; default US. Any character is typed whatever
    /// the layout.
    #[schema(max_length = 64, example = "de")]
    keyboard_layout: Option<String>,
    /// `"launch_exit"`: the launch command runs once, and its exit ends the
    /// session as `completed` with `exit_code` (see `nonzero_exit`), its
    /// `collect` files readable at `GET /api/sessions/{id}/result`. Needs
    /// `launch`. Default: the provider's.
    complete_on: Option<crate::store::CompleteOn>,
    /// What a non-zero exit makes of the session: `"failed"` (default) or
    /// `"completed"`.
    nonzero_exit: Option<crate::store::NonzeroExit>,
    /// Paths in the session's home (`~/.config/tool/token.json`, or
    /// relative to it) copied out when the session completes. Default: the
    /// provider's.
    #[schema(max_items = 32, example = json!(["~/.config/democli/token.json"]))]
    collect: Option<Vec<String>>,
    /// Seconds the collected files are kept; default `[files]
    /// result_ttl_seconds` (600).
    #[schema(minimum = 1, maximum = 86400)]
    result_ttl_seconds: Option<u64>,
    /// The home (browser profile, dot-files) is the user's profile, kept
    /// between sessions; needs `user_id`. Default: the provider's
    /// `persist`.
    profile: Option<bool>,
    /// When the user's profile is in a live session already: `"existing"`
    /// (default) answers with that session (200, a new viewer token),
    /// `"reject"` with 409.
    profile_conflict: Option<ProfileConflict>,
    /// Downloads and uploads for the person in the viewer: a file the page
    /// downloads is offered to the viewer, and a file chooser the page
    /// opens asks the viewer for local files. `false` turns both off (the
    /// viewer's download and upload routes answer 403). Default: the
    /// provider's, else true.
    transfers: Option<bool>,
    /// Record the session's video (H.264 in fragmented MP4) for `GET
    /// /api/sessions/{id}/recording`; the video is encoded even while
    /// nobody watches. Default: the provider's `record`, else false.
    record: Option<bool>,
    /// Seconds the recording is kept after the session ended; at most
    /// `[recording] ttl_seconds` (the default). Needs `record`.
    #[schema(minimum = 1)]
    recording_ttl_seconds: Option<u64>,
}

/// What a create does when the user's profile is in a live session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProfileConflict {
    /// Answer with the live session.
    #[default]
    Existing,
    /// Refuse with 409.
    Reject,
}

/// Body of the seed's `POST /api/auth/start`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({ "userId": "alice", "provider": "example" }))]
pub struct AuthStartRequest {
    /// The operator's own id for the user.
    #[schema(max_length = 128)]
    user_id: String,
    /// A provider preset from the configuration.
    #[schema(max_length = 128)]
    provider: String,
}

pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
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

/// Validates a request into what the manager runs, with `cfg`'s defaults
/// and providers.
pub fn validate(cfg: &Config, req: CreateRequest) -> Result<NewSession, ApiError> {
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
    let complete_on = req.complete_on.or(provider.and_then(|p| p.complete_on));
    let collect = req
        .collect
        .clone()
        .unwrap_or_else(|| provider.map(|p| p.collect.clone()).unwrap_or_default());
    let result_ttl = req
        .result_ttl_seconds
        .or(provider.and_then(|p| p.result_ttl_seconds));
    let collect = limits::check_outcome(launch.as_deref(), complete_on, &collect, result_ttl)
        .map_err(|(field, e)| bad(field, e))?;
    let outcome = crate::store::Outcome {
        complete_on,
        nonzero_exit: req
            .nonzero_exit
            .or(provider.and_then(|p| p.nonzero_exit))
            .unwrap_or_default(),
        collect,
        result_ttl_seconds: result_ttl.unwrap_or(cfg.files.result_ttl_seconds),
    };
    let profile = match req.profile.unwrap_or(provider.is_some_and(|p| p.persist)) {
        false => None,
        true => Some(req.user_id.clone().ok_or_else(|| {
            bad(
                "profile",
                "a profile belongs to a user: give user_id".into(),
            )
        })?),
    };
    let egress = match req.egress {
        None => cfg.session.egress.clone(),
        Some(v) => limits::check_egress(v).map_err(|e| bad("egress", e))?,
    };
    let keyboard_layout = match &req.keyboard_layout {
        None => None,
        Some(v) => {
            // The error names the field and the value itself.
            let refused = |e: sandcast_proto::keyboard::LayoutError| {
                ApiError::bad_request(e.to_string()).detail(json!({ "field": "keyboard_layout" }))
            };
            let layout = sandcast_proto::KeyboardLayout::parse(v).map_err(refused)?;
            layout
                .check_installed(std::path::Path::new(
                    sandcast_proto::keyboard::XKB_SYMBOLS_DIR,
                ))
                .map_err(refused)?;
            Some(layout.to_string())
        }
    };
    let record = req.record.or(provider.map(|p| p.record)).unwrap_or(false);
    if let Some(t) = req.recording_ttl_seconds {
        let max = cfg.recording.ttl_seconds;
        if !record {
            return Err(bad(
                "recording_ttl_seconds",
                "only a recorded session has a recording: give record: true".into(),
            ));
        }
        if !(1..=max).contains(&t) {
            return Err(bad(
                "recording_ttl_seconds",
                format!("{t} is outside 1..={max} ([recording] ttl_seconds)"),
            ));
        }
    }
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
            keyboard_layout,
            outcome,
            profile,
            transfers: req
                .transfers
                .or(provider.and_then(|p| p.transfers))
                .unwrap_or(true),
            record,
            recording_ttl_seconds: req.recording_ttl_seconds,
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
    let (children, display, snapshot) = match live {
        Some(l) => (
            serde_json::to_value(l.children()).unwrap_or_default(),
            l.display(),
            l.snapshot(),
        ),
        None => (
            json!([]),
            (row.spec.width, row.spec.height),
            Default::default(),
        ),
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
        "keyboard_layout": row.spec.keyboard_layout,
        "complete_on": row.spec.outcome.complete_on,
        "collect": row.spec.outcome.collect,
        "transfers": row.spec.transfers,
        "record": row.spec.record,
        "exit_code": row.exit_code,
        "node": (!row.node.is_empty()).then_some(&row.node),
        "profile": row.spec.profile.is_some(),
        "idle_timeout_seconds": row.spec.idle_timeout_seconds,
        "created_at": rfc3339(row.created_ms),
        "ready_at": row.ready_ms.map(rfc3339),
        "expires_at": rfc3339(row.expires_ms),
        "stopped_at": row.stopped_ms.map(rfc3339),
        "children": children,
        "control": snapshot.control.as_str(),
        "automation_clients": snapshot.automation,
        "viewers": snapshot.viewers,
    })
}

/// The viewer of session `id` opened with `token` (in the fragment, which
/// browsers never send).
pub(crate) fn viewer_url(state: &AppState, headers: &HeaderMap, id: &str, token: &str) -> String {
    viewer_url_at(&base_url(state, headers), id, token)
}

/// The viewer of session `id` on the server at `base`.
fn viewer_url_at(base: &str, id: &str, token: &str) -> String {
    format!("{base}/viewer/{id}#token={token}")
}

/// This server's base URL as the client reached it (or `public_url`).
pub(crate) fn base_url(state: &AppState, headers: &HeaderMap) -> String {
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
        .unwrap_or(state.manager.config().scheme());
    format!("{proto}://{host}")
}

/// How long a create waits for the session that is ending with the user's
/// profile to let go of it.
const PROFILE_HANDOVER: std::time::Duration = std::time::Duration::from_secs(15);

pub(crate) async fn created(
    state: &AppState,
    headers: &HeaderMap,
    new: NewSession,
    conflict: ProfileConflict,
) -> Result<Response, ApiError> {
    // In a cluster a profile lives on one node: a create for it is made
    // there, where the sessions that may hold it run.
    if let (Some(node), Some(user)) = (&state.node, new.spec.profile.as_deref())
        && let Some(pinned) = crate::cluster::profile_node(state, user)?
        && pinned != node.id()
    {
        return crate::cluster::create_on(state, node, &pinned, &new, conflict).await;
    }
    created_here(state, headers, new, conflict).await
}

/// [`created`] on this node: the user's profile, if any, is here or
/// nowhere yet.
pub(crate) async fn created_here(
    state: &AppState,
    headers: &HeaderMap,
    new: NewSession,
    conflict: ProfileConflict,
) -> Result<Response, ApiError> {
    let m = &state.manager;
    let holder = new
        .spec
        .profile
        .as_deref()
        .and_then(|user| m.profile_session(user))
        .and_then(|id| m.live(&id).map(|live| (id, live)));
    let mut existing = None;
    if let Some((id, live)) = holder {
        let running = m
            .store()
            .get(&id)?
            .is_some_and(|row| matches!(row.state, SessionState::Starting | SessionState::Ready));
        if running {
            // The user's profile is in a running session: that session is
            // the answer (with a new viewer token), unless asked to refuse.
            existing = (conflict == ProfileConflict::Existing).then_some(id);
        } else {
            // It is ending (completed, failed, stopping): the new session
            // takes the profile once its file system is let go of.
            let mut ended = live.ended();
            let _ = tokio::time::timeout(PROFILE_HANDOVER, ended.wait_for(|e| *e)).await;
        }
    }
    let (status, (row, token), base) = match (existing, &state.node) {
        (Some(id), node) => (
            StatusCode::OK,
            state.manager.new_viewer_token(&id)?,
            // The profile's session runs here, on this node.
            node.as_ref()
                .map_or_else(|| base_url(state, headers), |n| n.public_url().to_string()),
        ),
        (None, Some(node)) => {
            let (row, token, base) = crate::cluster::create(state, node, new).await?;
            (StatusCode::CREATED, (row, token), base)
        }
        (None, None) => (
            StatusCode::CREATED,
            state.manager.create(new)?,
            base_url(state, headers),
        ),
    };
    let mut body = session_json(&row, state.manager.live(&row.id).as_deref());
    body["viewer_url"] = json!(viewer_url_at(&base, &row.id, &token));
    body["viewer_token"] = json!(token);
    body["cdp_url"] = json!(crate::cdp::cdp_url(state, headers, &row.id));
    Ok((status, Json(body)).into_response())
}

/// Create a session.
///
/// Records the session and starts it in the background: the answer comes
/// at once with `state` `starting`; watch `GET /api/sessions/{id}` or its
/// events for `ready`. `viewer_url` opens this session's viewer and
/// nothing else; hand it to the user.
#[utoipa::path(
    post,
    path = "/api/sessions",
    tag = "sessions",
    security(("api_key" = [])),
    request_body = CreateRequest,
    responses(
        (status = 201, description = "Created and starting.", body = CreatedSession),
        (status = 400, description = "A field is malformed or out of range; `detail.field` names it.", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 503, description = "`max_sessions` sessions are running.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    let conflict = req.profile_conflict.unwrap_or_default();
    let new = validate(state.manager.config(), req)?;
    created(&state, &headers, new, conflict).await
}

/// Create a session from a provider preset (the seed's endpoint).
///
/// Equivalent to `POST /api/sessions` with `user_id` and `provider`.
#[utoipa::path(
    post,
    path = "/api/auth/start",
    tag = "seed",
    security(("api_key" = [])),
    request_body = AuthStartRequest,
    responses(
        (status = 201, description = "Created and starting.", body = CreatedSession),
        (status = 400, description = "Unknown provider or a malformed field.", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 503, description = "`max_sessions` sessions are running.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn auth_start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<AuthStartRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    let new = validate(
        state.manager.config(),
        CreateRequest {
            user_id: Some(req.user_id),
            provider: Some(req.provider),
            ..Default::default()
        },
    )?;
    let resp = created(&state, &headers, new, ProfileConflict::Existing).await?;
    Ok(resp)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    limits::check_id(id).map_err(|e| ApiError::bad_request(e).detail(json!({ "field": "id" })))
}

/// Sessions a page lists when the request does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Most sessions a page lists.
pub const MAX_PAGE: usize = 1000;

/// Query of `GET /api/sessions`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Sessions on a page, 1 to 1000; 100 when not given.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// Where the page starts: `next` of the page before. Opaque.
    cursor: Option<String>,
    /// Only sessions in these states, comma-separated (`ready,starting`).
    #[param(
        pattern = "^(starting|ready|failed|stopping|stopped|completed)(,(starting|ready|failed|stopping|stopped|completed))*$"
    )]
    state: Option<String>,
    /// Only the sessions of this `user_id`.
    #[param(max_length = 128)]
    user_id: Option<String>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request("bad query string").detail(e.body_text()))
}

fn bad_param(field: &str, msg: String) -> ApiError {
    ApiError::bad_request(format!("{field}: {msg}")).detail(json!({ "field": field }))
}

/// The opaque cursor of the page after `row`.
fn cursor_after(row: &Row) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}.{}", row.created_ms, row.id))
}

fn parse_cursor(s: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let bad = || bad_param("cursor", format!("{s:?} is not a cursor this server gave"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, id) = text.split_once('.').ok_or_else(bad)?;
    let ms = ms.parse::<i64>().map_err(|_| bad())?;
    limits::check_id(id).map_err(|_| bad())?;
    Ok((ms, id.to_string()))
}

/// Turns the list query into a page of the store.
pub fn page_query(q: ListQuery) -> Result<PageQuery, ApiError> {
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                bad_param("limit", format!("{l:?} is not a number in 1..={MAX_PAGE}"))
            })?,
    };
    let after = q.cursor.as_deref().map(parse_cursor).transpose()?;
    let mut states = Vec::new();
    for name in q.state.iter().flat_map(|s| s.split(',')) {
        let st = SessionState::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
            bad_param(
                "state",
                format!("{name:?} is not one of {}", names.join(", ")),
            )
        })?;
        if !states.contains(&st) {
            states.push(st);
        }
    }
    if let Some(u) = &q.user_id {
        limits::check_name("user_id", u).map_err(|e| bad_param("user_id", e))?;
    }
    Ok(PageQuery {
        limit,
        after,
        states,
        user_id: q.user_id,
    })
}

/// List sessions, newest first, a page at a time.
///
/// `next` of an answer is the `cursor` of the following page, `null` on the
/// last; the filters stay the same from page to page.
#[utoipa::path(
    get,
    path = "/api/sessions",
    tag = "sessions",
    security(("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of sessions, newest first.", body = SessionList),
        (status = 400, description = "A malformed query; `detail.field` names the parameter.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut page = page_query(query(q)?)?;
    let limit = page.limit;
    // One more than asked says whether there is a next page.
    page.limit += 1;
    let mut rows = state.manager.store().page(&page)?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = rows.last().filter(|_| more).map(cursor_after);
    let sessions: Vec<Value> = rows
        .iter()
        .map(|r| session_json(r, state.manager.live(&r.id).as_deref()))
        .collect();
    Ok(Json(json!({ "sessions": sessions, "next": next })))
}

/// Get a session: its state, why it failed or stopped, and each of its
/// child processes.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "The session.", body = Session),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
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

/// Stop a session.
///
/// Stops its processes and removes its sandbox; the session stays listed
/// as `stopped`.
#[utoipa::path(
    delete,
    path = "/api/sessions/{id}",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "Stopped; the session as it ended.", body = Session),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_id(&id)?;
    let row = state.manager.stop(&id, "deleted through the API").await?;
    Ok(Json(session_json(&row, None)))
}

/// Query of the logs endpoint.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// `1`, `true` or `yes`: keep the answer open and send new lines as
    /// they come, until the session ends (`0`, `false`, `no`: do not).
    #[param(pattern = "^(1|true|yes|0|false|no)$")]
    follow: Option<String>,
    /// Only the last this many lines, 0 to 100000000.
    #[param(value_type = Option<u64>, minimum = 0, maximum = 100000000)]
    tail: Option<String>,
    /// Only the lines from this time on: RFC 3339
    /// (`2026-12-06T10:00:00Z`) or milliseconds since the Unix epoch.
    since: Option<String>,
}

/// Path of the endpoints of one session.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct SessionPath {
    /// The session's id, as `POST /api/sessions` answered it.
    #[param(pattern = "^[a-z0-9-]{1,64}$")]
    pub id: String,
}

/// Most lines `tail` may ask for (a log holds far fewer).
pub const MAX_TAIL: u64 = 100_000_000;

fn logs_selection(q: &LogsQuery) -> Result<(bool, Selection), ApiError> {
    let follow = match q.follow.as_deref() {
        None | Some("0" | "false" | "no") => false,
        Some("1" | "true" | "yes") => true,
        Some(other) => {
            return Err(bad_param(
                "follow",
                format!("{other:?} is not one of 1, true, yes, 0, false, no"),
            ));
        }
    };
    let tail = q
        .tail
        .as_deref()
        .map(|t| {
            t.parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_TAIL)
                .ok_or_else(|| {
                    bad_param("tail", format!("{t:?} is not a number in 0..={MAX_TAIL}"))
                })
        })
        .transpose()?;
    let since = q
        .since
        .as_deref()
        .map(|s| log_read::parse_since(s).map_err(|e| bad_param("since", e)))
        .transpose()?;
    Ok((follow, Selection { tail, since }))
}

/// Get a session's log: the output of its agent and child processes.
///
/// Read from disk (the previous file, then the current one): every line,
/// the last `tail` lines, or those from `since` on; with `follow`, then
/// new lines until the session ends.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/logs",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath, LogsQuery),
    responses(
        (status = 200, description = "The log, one line per output line.", body = String, content_type = "text/plain"),
        (status = 400, description = "`id` is not a session id, or a malformed query; `detail.field` names the parameter.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed, or the log could not be read.", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let (follow, sel) = logs_selection(&query(q)?)?;
    state
        .manager
        .store()
        .get(&id)?
        .ok_or_else(|| ApiError::no_session(&id))?;
    let dir = session_log::dir(&state.manager.config().data_dir);
    let live = state.manager.live(&id);
    // Subscribe before opening the files so no line falls in between.
    let sub = live
        .as_ref()
        .filter(|_| follow)
        .map(|l| (l.subscribe_logs(), l.ended()));
    let sel2 = sel.clone();
    let parts = tokio::task::spawn_blocking(move || {
        log_read::open(&dir, &id).and_then(|files| log_read::select(files, &sel2))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the session log: {e}"),
        )
    })?;
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let from_disk = log_read::stream(parts);
    let Some((rx, mut ended)) = sub else {
        return Ok((text_plain, Body::from_stream(from_disk)).into_response());
    };
    let live_lines = futures::stream::unfold(rx, move |mut rx| {
        let sel = sel.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(line) if sel.admits_live(&line) => {
                        return Some((Ok(bytes::Bytes::from(format!("{line}\n"))), rx));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return None,
                }
            }
        }
    })
    .take_until(async move {
        let _ = ended.wait_for(|e| *e).await;
    });
    Ok((text_plain, Body::from_stream(from_disk.chain(live_lines))).into_response())
}

/// Follow a session's events as server-sent events.
///
/// The first event is the current `state` (`{"state","reason"}`); then
/// each change: `state` events, `child` events with a child process's
/// report (as in `children` of the session), and for a recorded session
/// `recording` events (`{"state": "recording"}` as it starts; `"stopped"`
/// or `"paused"` with a `reason` when it stops early or skips video). The
/// stream ends after the
/// session ends: its first `failed` or `stopped` state.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/events",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "An event stream (`text/event-stream`).", body = String, content_type = "text/event-stream"),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
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
    let manager = state.manager.clone();
    // Ends after the first event of a final state (failed, stopped), also
    // when the relay lagged past it: then the store says where it is.
    let rest = futures::stream::unfold((rx, done), move |(mut rx, done)| {
        let id = filter_id.clone();
        let manager = manager.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.id == id => {
                        let end = ev.kind == "state"
                            && SessionState::ALL
                                .into_iter()
                                .find(|s| ev.data["state"].as_str() == Some(s.as_str()))
                                .is_some_and(|s| !s.is_live());
                        let event = Event::default().event(ev.kind).data(ev.data.to_string());
                        return Some((Ok(event), (rx, end)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(Some(row)) = manager.store().get(&id)
                            && !row.state.is_live()
                        {
                            let event = Event::default().event("state").data(
                                json!({"state": row.state.as_str(), "reason": row.reason})
                                    .to_string(),
                            );
                            return Some((Ok(event), (rx, true)));
                        }
                    }
                    Ok(_) => continue,
                    Err(_) => return None,
                }
            }
        }
    });
    let stream = futures::stream::once(async move { Ok(first) }).chain(rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Whether the server is live and ready to serve sessions, from the last
/// background check. No credential needed; `GET /api/health` says which
/// check failed.
#[utoipa::path(
    get,
    path = "/health",
    tag = "server",
    security(()),
    responses(
        (status = 200, description = "Sessions can start.", body = Health),
        (status = 503, description = "Degraded: a check failed; `GET /api/health` says which.", body = Health),
    )
)]
pub async fn health(health: axum::Extension<Arc<crate::health::Health>>) -> Response {
    let snap = health.last();
    (health_status(&snap), Json(snap.public_json())).into_response()
}

/// Server health in detail: the last result of every check (the store, the
/// backend's readiness checks) and the WebRTC gateway's addresses.
#[utoipa::path(
    get,
    path = "/api/health",
    tag = "server",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Sessions can start.", body = HealthDetail),
        (status = 503, description = "Degraded: a check failed; `store` and `backend.checks` say which.", body = HealthDetail),
    )
)]
pub async fn health_detail(
    State(state): State<AppState>,
    health: axum::Extension<Arc<crate::health::Health>>,
) -> Response {
    let snap = health.last();
    let body = snap.detail_json(&state.manager);
    (health_status(&snap), Json(body)).into_response()
}

fn health_status(snap: &crate::health::Snapshot) -> StatusCode {
    if snap.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Prometheus metrics in the OpenMetrics text format.
///
/// Without a credential: `sandcast_sessions{state}`,
/// `sandcast_session_starts_total`, `sandcast_session_failures_total`,
/// `sandcast_child_restarts_total`, `sandcast_session_start_seconds`.
/// With the API key as a bearer (Prometheus' `authorization` scrape
/// setting), also per live session and viewer (session ids are not for
/// everyone): `sandcast_session_viewers`, `sandcast_session_automation_clients`,
/// `sandcast_session_frames_encoded_total`, `sandcast_session_key_frames_encoded_total`,
/// `sandcast_session_encode_seconds`, `sandcast_session_frames_dropped_total`,
/// `sandcast_session_input_dropped_total`, and per WebRTC viewer
/// `sandcast_viewer_frames_sent_total`, `sandcast_viewer_frames_skipped_total`,
/// `sandcast_viewer_key_frames_sent_total`, `sandcast_viewer_sent_bytes_total`,
/// `sandcast_viewer_key_frame_requests_total`, `sandcast_viewer_rtt_seconds`,
/// `sandcast_viewer_loss_ratio`, `sandcast_viewer_target_bitrate_bps`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "server",
    security(()),
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
    metrics: axum::Extension<Arc<crate::metrics::Metrics>>,
    headers: HeaderMap,
) -> Response {
    if let Ok(counts) = state.manager.store().count_by_state() {
        metrics.set_states(&counts);
    }
    let (ready, pooled) = state.manager.pool_counts();
    metrics.set_pool(ready, pooled);
    let text = if auth::is_operator(&headers, &state.api_key) {
        let viewers = match state.manager.gateway() {
            Some(gw) => gw.all_counters().await,
            None => Vec::new(),
        };
        metrics.render_live(&state.manager.live_snapshots(), &viewers)
    } else {
        metrics.render()
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sandcast_proto::testing::{json_value, mutated};

    const WORDS: &[&str] = &[
        "user_id",
        "start_url",
        "provider",
        "width",
        "height",
        "ttl_seconds",
        "idle_timeout_seconds",
        "kiosk",
        "launch",
        "egress",
        "transfers",
        "record",
        "recording_ttl_seconds",
        "userId",
        "alice",
        "preset",
        "https://example.org/",
        "HTTP://a",
        "http://",
        "https:",
        "data:text/html,<h1>x</h1>",
        "about:blank",
        "about:settings",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "chrome://settings",
        "xterm",
        "-e",
        "a\nb",
        "\u{0}",
        "",
    ];

    fn config() -> Config {
        let mut cfg = Config::default();
        cfg.providers.insert(
            "preset".into(),
            crate::config::Provider {
                start_url: "https://example.org/login".into(),
                launch: Some(vec!["xterm".into()]),
                ..Default::default()
            },
        );
        cfg
    }

    /// The documented limits, stated again independently of `limits`.
    fn holds_the_limits(cfg: &Config, new: &NewSession) -> Result<(), TestCaseError> {
        let short = |s: &str| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
        if let Some(u) = &new.user_id {
            prop_assert!(short(u), "user_id {u:?}");
        }
        if let Some(p) = &new.provider {
            prop_assert!(cfg.providers.contains_key(p), "provider {p:?}");
        }
        let url = &new.spec.start_url;
        prop_assert!(url.len() <= 32 * 1024);
        prop_assert!(!url.chars().any(char::is_control), "url {url:?}");
        let lower = url.to_ascii_lowercase();
        prop_assert!(
            ["http://", "https://", "data:", "about:"]
                .iter()
                .any(|p| lower.starts_with(p)),
            "url {url:?}"
        );
        if lower.starts_with("http") {
            prop_assert!(url.len() > lower.find("//").unwrap() + 2, "url {url:?}");
        }
        prop_assert!((320..=3840).contains(&new.spec.width));
        prop_assert!((240..=2160).contains(&new.spec.height));
        prop_assert!((1..=86_400).contains(&new.ttl_seconds));
        prop_assert!((1..=86_400).contains(&new.spec.idle_timeout_seconds));
        if let Some(t) = new.spec.recording_ttl_seconds {
            prop_assert!(new.spec.record, "a recording TTL without record");
            prop_assert!((1..=cfg.recording.ttl_seconds).contains(&t));
        }
        if let Some(argv) = &new.spec.launch {
            prop_assert!((1..=64).contains(&argv.len()));
            prop_assert!(!argv[0].is_empty());
            prop_assert!(argv.iter().all(|a| a.len() <= 4096 && !a.contains('\0')));
        }
        Ok(())
    }

    /// A body as the create handler takes it: parsed, then validated. A
    /// refusal is a 4xx.
    fn create_body(bytes: &[u8]) -> Result<(), TestCaseError> {
        let cfg = config();
        let parsed = json_body(Json::<CreateRequest>::from_bytes(bytes));
        match parsed.and_then(|req| validate(&cfg, req)) {
            Ok(new) => holds_the_limits(&cfg, &new)?,
            Err(e) => prop_assert!(e.status.is_client_error(), "{}", e.status),
        }
        Ok(())
    }

    /// A body as `/api/auth/start` takes it.
    fn auth_start_body(bytes: &[u8]) -> Result<(), TestCaseError> {
        let cfg = config();
        let parsed = json_body(Json::<AuthStartRequest>::from_bytes(bytes));
        let new = parsed.and_then(|req| {
            validate(
                &cfg,
                CreateRequest {
                    user_id: Some(req.user_id),
                    provider: Some(req.provider),
                    ..Default::default()
                },
            )
        });
        match new {
            Ok(new) => {
                prop_assert!(new.provider.is_some() && new.user_id.is_some());
                holds_the_limits(&cfg, &new)?;
            }
            Err(e) => prop_assert!(e.status.is_client_error(), "{}", e.status),
        }
        Ok(())
    }

    #[test]
    fn a_valid_body_is_accepted() {
        let cfg = config();
        let req = Json::<CreateRequest>::from_bytes(
            br#"{"user_id":"alice","provider":"preset","width":1280,"height":720}"#,
        )
        .unwrap()
        .0;
        let new = validate(&cfg, req).unwrap();
        assert_eq!(new.spec.start_url, "https://example.org/login");
        assert_eq!(new.spec.launch, Some(vec!["xterm".to_string()]));
        let req = Json::<AuthStartRequest>::from_bytes(br#"{"userId":"a","provider":"preset"}"#);
        assert!(req.is_ok());
    }

    #[test]
    fn record_comes_from_the_body_or_the_provider_and_its_ttl_is_bounded() {
        let mut cfg = config();
        cfg.providers.insert(
            "recorded".into(),
            crate::config::Provider {
                start_url: "https://example.org/".into(),
                record: true,
                ..Default::default()
            },
        );
        let new = |body: &str| {
            validate(
                &cfg,
                Json::<CreateRequest>::from_bytes(body.as_bytes())
                    .unwrap()
                    .0,
            )
        };
        assert!(!new("{}").unwrap().spec.record);
        assert!(new(r#"{"provider":"recorded"}"#).unwrap().spec.record);
        assert!(
            !new(r#"{"provider":"recorded","record":false}"#)
                .unwrap()
                .spec
                .record
        );
        let s = new(r#"{"record":true,"recording_ttl_seconds":60}"#)
            .unwrap()
            .spec;
        assert_eq!((s.record, s.recording_ttl_seconds), (true, Some(60)));
        for (body, why) in [
            (r#"{"recording_ttl_seconds":60}"#, "record: true"),
            (
                r#"{"record":true,"recording_ttl_seconds":0}"#,
                "outside 1..=86400",
            ),
            (
                r#"{"record":true,"recording_ttl_seconds":86401}"#,
                "outside 1..=86400",
            ),
        ] {
            let e = new(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                e.error.contains("recording_ttl_seconds") && e.error.contains(why),
                "{body}: {}",
                e.error
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_create_bodies_are_refused_or_within_limits(v in json_value(WORDS)) {
            create_body(&serde_json::to_vec(&v).unwrap())?;
        }

        #[test]
        fn arbitrary_create_objects_are_refused_or_within_limits(
            fields in prop::collection::vec((prop::sample::select(WORDS), json_value(WORDS)), 0..10)
        ) {
            let obj: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            create_body(&serde_json::to_vec(&obj).unwrap())?;
        }

        #[test]
        fn mutated_create_bodies_are_refused_or_within_limits(
            bytes in mutated(
                br#"{"user_id":"alice","start_url":"https://example.org/","width":1280,"height":720,"ttl_seconds":600,"idle_timeout_seconds":60,"kiosk":true,"launch":["xterm","-e","top"],"egress":false}"#.to_vec()
            )
        ) {
            create_body(&bytes)?;
        }

        #[test]
        fn arbitrary_auth_start_bodies_are_refused_or_within_limits(
            v in json_value(WORDS),
            bytes in mutated(br#"{"userId":"alice","provider":"preset"}"#.to_vec()),
        ) {
            auth_start_body(&serde_json::to_vec(&v).unwrap())?;
            auth_start_body(&bytes)?;
        }
    }
}

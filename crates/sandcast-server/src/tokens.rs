//! Per-session tokens with a role, and the one rule that says what a token
//! may do.
//!
//! - `view`: the viewer's stream only; the server drops its input,
//!   clipboard and resize and refuses its uploads.
//! - `control`: the viewer with input. The token made with the session
//!   (`viewer_token`) is one, and lasts as long as the session.
//! - `automation`: for programs (the session's CDP endpoint); never opens
//!   a viewer.
//!
//! The operator creates, lists and revokes them under
//! `/api/sessions/{id}/tokens`; the store keeps only their SHA-256
//! ([`TokenRow`]). Every route that takes a per-session token asks
//! [`Manager::token_grant`]. Revoking one, or its expiry, disconnects the
//! connections opened with it (the session's task tracks them:
//! [`crate::manager::Live::revoke`], [`crate::manager::Live::lost`]).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{AppState, SessionPath};
use crate::auth;
use crate::error::{ApiError, ErrorBody};
use crate::limits;
use crate::manager::{Manager, now_ms};
use crate::store::{Row, State as SessionState, StoreError, TokenRow};

/// What a per-session token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Watch: the viewer's stream, no input, clipboard, resize or upload.
    View,
    /// The viewer with input (what the session's own token is).
    Control,
    /// Programs: the CDP endpoint; never a viewer.
    Automation,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::View, Role::Control, Role::Automation];

    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::View => "view",
            Role::Control => "control",
            Role::Automation => "automation",
        }
    }

    /// The role of a name as [`Role::as_str`] gives it.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether it opens the session's viewer routes.
    pub fn opens_viewer(self) -> bool {
        matches!(self, Role::View | Role::Control)
    }
}

/// What a request's token may do in one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's public id; none for the session's own token and the
    /// operator key (they are not revoked on their own).
    pub token_id: Option<String>,
    /// Its role.
    pub role: Role,
    /// When it stops opening the session (ms since the epoch); none: with
    /// the session.
    pub expires_ms: Option<i64>,
}

impl Grant {
    /// The operator's key, or the session's own token: full control.
    pub fn control() -> Grant {
        Grant {
            token_id: None,
            role: Role::Control,
            expires_ms: None,
        }
    }

    /// Whether the server drops this viewer's input.
    pub fn view_only(&self) -> bool {
        self.role == Role::View
    }
}

/// The grant of `token` in the session of `row` with `tokens` at `now_ms`:
/// the session's own token is `control`; an added token its role, unless
/// revoked or expired. Every stored hash is compared, in constant time.
pub fn grant_of(row: &Row, tokens: &[TokenRow], token: &str, now_ms: i64) -> Option<Grant> {
    if auth::token_matches(token, &row.token_hash) {
        return Some(Grant::control());
    }
    let mut found = None;
    for t in tokens {
        // No early exit: how many tokens were compared says nothing.
        if auth::token_matches(token, &t.token_hash) && found.is_none() {
            found = Some(t);
        }
    }
    let t = found.filter(|t| t.session_id == row.id)?;
    if t.revoked_ms.is_some() || t.expires_ms.is_some_and(|e| e <= now_ms) {
        return None;
    }
    Some(Grant {
        token_id: Some(t.id.clone()),
        role: t.role,
        expires_ms: t.expires_ms,
    })
}

/// Who a per-session request is, before its route decides what that may do.
#[derive(Debug)]
pub enum Credentials {
    /// The operator's API key.
    Operator,
    /// No key and no token.
    Missing,
    /// A token that does not open this session (unknown, another
    /// session's, revoked or expired).
    Unknown,
    /// A token of this session, with what it may do.
    Granted(Grant),
}

/// The session `id` and who the request is: the API key, or a token of
/// this session from the `Authorization` header or, for clients that
/// cannot set headers, `query_token`. The one lookup behind the viewer and
/// DevTools routes; each maps the outcome to its own refusals.
pub fn credentials(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(Row, Credentials), ApiError> {
    limits::check_id(id).map_err(ApiError::bad_request)?;
    let row = state
        .manager
        .store()
        .get(id)?
        .ok_or_else(|| ApiError::no_session(id))?;
    if auth::is_operator(headers, &state.api_key) {
        return Ok((row, Credentials::Operator));
    }
    let Some(token) = crate::api::bearer(headers).or(query_token) else {
        return Ok((row, Credentials::Missing));
    };
    let who = match state.manager.token_grant(id, token)? {
        Some(g) => Credentials::Granted(g),
        None => Credentials::Unknown,
    };
    Ok((row, who))
}

/// The 409 for a session not in the state a request needs, naming its state.
pub fn session_is(row: &Row) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!("the session is {}", row.state.as_str()),
    )
}

impl Manager {
    /// What `token` may do in session `session_id`, now: its [`Grant`], or
    /// none when it does not open the session (unknown, another session's,
    /// revoked or expired). The session's own token is `control`.
    ///
    /// The one check of a per-session token: viewer routes accept `view`
    /// and `control` grants, the CDP endpoint `automation`.
    pub fn token_grant(&self, session_id: &str, token: &str) -> Result<Option<Grant>, StoreError> {
        let Some(row) = self.store().get(session_id)? else {
            return Ok(None);
        };
        let tokens = self.store().tokens(session_id)?;
        Ok(grant_of(&row, &tokens, token, now_ms()))
    }
}

/// Most tokens a session can have been given (revoked ones count).
pub const MAX_TOKENS_PER_SESSION: usize = 64;
/// Longest `ttl_seconds` of a token: 30 days.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

/// Body of `POST /api/sessions/{id}/tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({ "role": "view", "ttl_seconds": 3600 }))]
pub struct TokenRequest {
    /// What the token may do.
    #[schema(value_type = Role, required = true)]
    #[serde(default)]
    role: Value,
    /// Seconds it lasts, 1 to 2592000 (30 days); without it, as long as
    /// the session.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 2592000)]
    #[serde(default)]
    ttl_seconds: Value,
}

/// Answer of `POST /api/sessions/{id}/tokens`: the token, shown only here.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenCreated {
    /// Its public id, for listing and revoking.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// The secret. Only its hash is kept: it is shown this once.
    pub token: String,
    /// When it stops opening the session; `null`: with the session.
    pub expires_at: Option<String>,
    /// For `view` and `control`: the session's viewer with this token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_url: Option<String>,
    /// For `automation`: the session's DevTools endpoint, which this token
    /// opens (`Authorization: Bearer <token>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdp_url: Option<String>,
}

/// A token as `GET /api/sessions/{id}/tokens` lists it: never its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Its public id.
    pub id: String,
    /// What it may do.
    pub role: Role,
    /// When it was made.
    pub created_at: String,
    /// When it stops opening the session; `null`: with the session.
    pub expires_at: Option<String>,
    /// When it was revoked; `null`: it was not.
    pub revoked_at: Option<String>,
    /// Whether it opens the session now (neither revoked nor expired).
    pub active: bool,
}

/// Answer of `GET /api/sessions/{id}/tokens`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenList {
    /// The session's tokens, oldest first (revoked and expired ones too;
    /// not the session's own `viewer_token`).
    pub tokens: Vec<TokenInfo>,
}

/// Path of one token.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TokenPath {
    /// The session's id.
    #[param(pattern = "^[a-z0-9-]{1,64}$")]
    id: String,
    /// The token's id, as its creation answered it.
    #[param(pattern = "^[a-z0-9-]{1,64}$")]
    token_id: String,
}

fn stamp(ms: i64) -> String {
    crate::session_log::stamp(chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default())
}

fn bad_field(field: &str, msg: String) -> ApiError {
    ApiError::bad_request(format!("{field}: {msg}")).detail(json!({ "field": field }))
}

/// The role and lifetime asked for, checked.
fn parse_request(req: &TokenRequest) -> Result<(Role, Option<u64>), ApiError> {
    let names = || {
        Role::ALL
            .iter()
            .map(|r| format!("{:?}", r.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let role = req
        .role
        .as_str()
        .and_then(Role::from_name)
        .ok_or_else(|| bad_field("role", format!("{} is not one of {}", req.role, names())))?;
    let ttl = match &req.ttl_seconds {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .filter(|n| (1..=MAX_TTL_SECONDS).contains(n))
                .ok_or_else(|| {
                    bad_field(
                        "ttl_seconds",
                        format!("{v} is not a whole number in 1..={MAX_TTL_SECONDS}"),
                    )
                })?,
        ),
    };
    Ok((role, ttl))
}

fn session_of(state: &AppState, id: &str) -> Result<Row, ApiError> {
    limits::check_id(id).map_err(|e| ApiError::bad_request(e).detail(json!({ "field": "id" })))?;
    state
        .manager
        .store()
        .get(id)?
        .ok_or_else(|| ApiError::no_session(id))
}

/// Give a session another token: `view`, `control` or `automation`.
///
/// The answer holds the token itself, the only time it is shown, and for
/// `view` and `control` the session's viewer URL with it. A `view` viewer
/// gets the stream; the server drops its input, clipboard and resize. An
/// `automation` token never opens the viewer. Revoke it with `DELETE`.
#[utoipa::path(
    post,
    path = "/api/sessions/{id}/tokens",
    operation_id = "create_token",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "Made.", body = TokenCreated),
        (status = 400, description = "A bad `role` or `ttl_seconds` (`detail.field` names it), or a bad id.", body = ErrorBody),
        (status = 401, description = "No API key.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 409, description = "The session has ended, or has 64 tokens already.", body = ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = crate::api::json_body(body)?;
    let row = session_of(&state, &id)?;
    let (role, ttl) = parse_request(&req)?;
    if !matches!(row.state, SessionState::Starting | SessionState::Ready) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the session is {}", row.state.as_str()),
        ));
    }
    let store = state.manager.store();
    if store.tokens(&id)?.len() >= MAX_TOKENS_PER_SESSION {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("the session has {MAX_TOKENS_PER_SESSION} tokens, the most it can have"),
        ));
    }
    let token = auth::new_secret();
    let now = now_ms();
    let t = TokenRow {
        id: hex::encode(rand::random::<[u8; 8]>()),
        session_id: id.clone(),
        role,
        token_hash: auth::hash_token(&token),
        created_ms: now,
        expires_ms: ttl.map(|s| now + s as i64 * 1000),
        revoked_ms: None,
    };
    store.insert_token(&t)?;
    let viewer_url = role
        .opens_viewer()
        .then(|| crate::api::viewer_url(&state, &headers, &id, &token));
    let body = TokenCreated {
        id: t.id,
        role,
        token,
        expires_at: t.expires_ms.map(stamp),
        viewer_url,
        cdp_url: (role == Role::Automation).then(|| crate::cdp::cdp_url(&state, &headers, &id)),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// List a session's tokens, without their secrets.
#[utoipa::path(
    get,
    path = "/api/sessions/{id}/tokens",
    operation_id = "list_tokens",
    tag = "sessions",
    security(("api_key" = [])),
    params(SessionPath),
    responses(
        (status = 200, description = "The tokens.", body = TokenList),
        (status = 400, description = "`id` is not a session id.", body = ErrorBody),
        (status = 401, description = "No API key.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TokenList>, ApiError> {
    session_of(&state, &id)?;
    let now = now_ms();
    let tokens = state
        .manager
        .store()
        .tokens(&id)?
        .into_iter()
        .map(|t| TokenInfo {
            active: t.revoked_ms.is_none() && t.expires_ms.is_none_or(|e| e > now),
            id: t.id,
            role: t.role,
            created_at: stamp(t.created_ms),
            expires_at: t.expires_ms.map(stamp),
            revoked_at: t.revoked_ms.map(stamp),
        })
        .collect();
    Ok(Json(TokenList { tokens }))
}

/// Revoke a session's token: it opens nothing any more, and the viewers
/// and sockets opened with it are disconnected at once.
#[utoipa::path(
    delete,
    path = "/api/sessions/{id}/tokens/{token_id}",
    operation_id = "revoke_token",
    tag = "sessions",
    security(("api_key" = [])),
    params(TokenPath),
    responses(
        (status = 204, description = "Revoked (also when it already was)."),
        (status = 400, description = "A bad id.", body = ErrorBody),
        (status = 401, description = "No API key.", body = ErrorBody),
        (status = 404, description = "No such session, or no such token of it (`detail` names which).", body = ErrorBody),
        (status = 500, description = "The session store failed.", body = ErrorBody),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    Path(TokenPath { id, token_id }): Path<TokenPath>,
) -> Result<Response, ApiError> {
    session_of(&state, &id)?;
    limits::check_id(&token_id)
        .map_err(|e| ApiError::bad_request(e).detail(json!({ "field": "token_id" })))?;
    if !state
        .manager
        .store()
        .revoke_token(&id, &token_id, now_ms())?
    {
        return Err(ApiError::not_found("no such token of this session")
            .detail(json!({ "token_id": token_id })));
    }
    if let Some(live) = state.manager.live(&id) {
        live.revoke(&token_id).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str, role: Role, secret: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            session_id: "s".into(),
            role,
            token_hash: auth::hash_token(secret),
            created_ms: 1,
            expires_ms: None,
            revoked_ms: None,
        }
    }

    #[test]
    fn grants_follow_the_token_its_role_and_its_life() {
        let mut row = Row::for_test("s");
        row.token_hash = auth::hash_token("own");
        let mut tokens = vec![
            token("v", Role::View, "watch"),
            token("c", Role::Control, "drive"),
            token("a", Role::Automation, "program"),
        ];
        tokens[0].expires_ms = Some(100);
        assert_eq!(grant_of(&row, &tokens, "own", 50), Some(Grant::control()));
        let v = grant_of(&row, &tokens, "watch", 99).unwrap();
        assert_eq!(v.token_id.as_deref(), Some("v"));
        assert_eq!(v.role, Role::View);
        assert!(v.view_only());
        assert_eq!(v.expires_ms, Some(100));
        assert_eq!(grant_of(&row, &tokens, "watch", 100), None, "expired");
        assert_eq!(
            grant_of(&row, &tokens, "drive", 1).unwrap().role,
            Role::Control
        );
        let a = grant_of(&row, &tokens, "program", 1).unwrap();
        assert_eq!(a.role, Role::Automation);
        assert!(!a.role.opens_viewer() && !a.view_only());
        assert_eq!(grant_of(&row, &tokens, "guess", 1), None);
        assert_eq!(grant_of(&row, &tokens, "", 1), None);
        tokens[1].revoked_ms = Some(5);
        assert_eq!(grant_of(&row, &tokens, "drive", 6), None, "revoked");
        // Another session's token opens nothing here, even if handed in.
        tokens[2].session_id = "other".into();
        assert_eq!(grant_of(&row, &tokens, "program", 1), None);
    }

    #[test]
    fn requests_name_the_bad_field() {
        let req = |v: Value| serde_json::from_value::<TokenRequest>(v).unwrap();
        assert_eq!(
            parse_request(&req(json!({"role": "view"}))).unwrap(),
            (Role::View, None)
        );
        assert_eq!(
            parse_request(&req(json!({"role": "automation", "ttl_seconds": 60}))).unwrap(),
            (Role::Automation, Some(60))
        );
        for (body, field) in [
            (json!({"role": "admin"}), "role"),
            (json!({"role": 3}), "role"),
            (json!({"role": null}), "role"),
            (json!({}), "role"),
            (json!({"role": "view", "ttl_seconds": 0}), "ttl_seconds"),
            (json!({"role": "view", "ttl_seconds": -5}), "ttl_seconds"),
            (json!({"role": "view", "ttl_seconds": 1.5}), "ttl_seconds"),
            (json!({"role": "view", "ttl_seconds": "60"}), "ttl_seconds"),
            (
                json!({"role": "view", "ttl_seconds": MAX_TTL_SECONDS + 1}),
                "ttl_seconds",
            ),
        ] {
            let e = parse_request(&req(body.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.detail["field"], field, "{body}");
        }
        assert!(serde_json::from_value::<TokenRequest>(json!({"role": "view", "x": 1})).is_err());
    }
}

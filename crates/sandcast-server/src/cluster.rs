//! This server as a node of a cluster: every node runs the same server
//! over one PostgreSQL store ([`crate::store::Cluster`]).
//!
//! - **Membership.** A node writes its row when it starts and a heartbeat
//!   every `[cluster] heartbeat_seconds` with its figures. Each heartbeat
//!   also looks for nodes silent for `lost_after_seconds`: their live
//!   sessions fail with reason "node lost" (one node does it, and records
//!   the events and webhooks). A lost node that comes back hears so from
//!   its next heartbeat, stops what it still runs and joins again.
//! - **Placement.** A create on any node is placed by the store (the
//!   freest of `candidates` random nodes, the row inserted under their
//!   locks); the chosen node is asked to start it ([`start`], carrying
//!   the cluster secret). If it cannot, the session is failed and the next
//!   candidate gets a new one, once.
//! - **Routing.** A request for a session this node does not run is
//!   forwarded to the node that does ([`route`]), WebSocket upgrades
//!   included; a viewer page is redirected there, so the viewer's streams
//!   and WebRTC media go straight to the owner.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::api::AppState;
use crate::api::ProfileConflict;
use crate::config::Config;
use crate::error::ApiError;
use crate::manager::{Manager, NewSession, new_id, now_ms};
use crate::store::{Cluster, NodeInfo, NodeLoad, NodeRow, Placement, Row, State as SessionState};

/// The header node-to-node requests carry the cluster secret in.
pub const SECRET_HEADER: &str = "x-sandcast-cluster";

/// Why a node's sessions failed when it went silent.
pub const NODE_LOST: &str = "node lost";

/// How long a node waits for another to take a session it placed there.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// This node: what it says of itself, and its client for other nodes.
pub struct Node {
    info: NodeInfo,
    secret: String,
    http: Client<HttpConnector, Body>,
}

impl Node {
    /// This node as `config` describes it, listening on `listen`.
    pub fn new(config: &Config, listen: std::net::SocketAddr) -> Node {
        let api_url = if config.cluster.api_url.is_empty() {
            let ip = if listen.ip().is_unspecified() {
                crate::local_ip().unwrap_or_else(|| "127.0.0.1".into())
            } else {
                listen.ip().to_string()
            };
            format!("{}://{ip}:{}", config.scheme(), listen.port())
        } else {
            config.cluster.api_url.trim_end_matches('/').to_string()
        };
        let public_url = if config.public_url.is_empty() {
            api_url.clone()
        } else {
            config.public_url.trim_end_matches('/').to_string()
        };
        let mut webrtc = vec![format!("udp:{}", config.webrtc.udp_bind)];
        if let Some(tcp) = config.webrtc.tcp_bind {
            webrtc.push(format!("tcp:{tcp}"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Node {
            info: NodeInfo {
                id: crate::store::node_id(config),
                api_url,
                public_url,
                webrtc,
                version: env!("CARGO_PKG_VERSION").to_string(),
                max_sessions: config.max_sessions as u32,
            },
            secret: config.cluster_secret.clone(),
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// Where viewers reach this node.
    pub fn public_url(&self) -> &str {
        &self.info.public_url
    }

    /// Whether a request carries the cluster secret (constant time).
    fn vouched(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(SECRET_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| crate::auth::secret_eq(v, &self.secret))
    }
}

fn cluster_of(m: &Manager) -> &dyn Cluster {
    m.store()
        .cluster()
        .expect("a node exists only over a cluster store")
}

/// Free memory of this host, MiB (`MemAvailable`).
fn free_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Joins the cluster and keeps the heartbeat (and the watch for lost
/// nodes) going while the server runs.
pub async fn run(node: Arc<Node>, m: std::sync::Weak<Manager>) {
    let Some(manager) = m.upgrade() else { return };
    let c = manager.config().cluster.clone();
    drop(manager);
    let every = Duration::from_secs(c.heartbeat_seconds);
    let mut joined = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(m) = m.upgrade() else { return };
        let cluster = cluster_of(&m);
        let now = now_ms();
        if !joined {
            match cluster.join(&node.info, now) {
                Ok(()) => joined = true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not join the cluster; trying again");
                    continue;
                }
            }
        }
        let load = NodeLoad {
            sessions: m.live_count() as u32,
            free_mib: free_mib(),
            idle_millis: 0,
        };
        match cluster.heartbeat(&load, now) {
            Ok(true) => {}
            Ok(false) => {
                // The others took this node for lost and failed its
                // sessions: what still runs here is nobody's.
                tracing::warn!(
                    "the cluster took this node for lost; stopping its sessions and joining again"
                );
                m.stop_all_sessions("the cluster took its node for lost")
                    .await;
                joined = false;
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        let cutoff = now - (c.lost_after_seconds as i64) * 1000;
        match cluster.fail_lost(cutoff, NODE_LOST, now) {
            Ok(ids) => {
                for id in ids {
                    tracing::warn!(session = %id, "its node was lost");
                    m.event(
                        &id,
                        "state",
                        json!({"state": "failed", "reason": NODE_LOST}),
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for lost nodes"),
        }
    }
}

/// Creates a session somewhere in the cluster: placed by the store, started
/// by the chosen node. A node that cannot start it fails it, and the next
/// candidate gets a new session, once. Returns the row, its viewer token
/// and the public URL of the node that runs it.
pub async fn create(
    state: &AppState,
    node: &Node,
    req: NewSession,
) -> Result<(Row, String, String), ApiError> {
    let m = &state.manager;
    let cluster = cluster_of(m);
    let c = &m.config().cluster;
    let token = crate::auth::new_secret();
    let mut exclude = Vec::new();
    let mut last: Option<ApiError> = None;
    for _ in 0..2 {
        let now = now_ms();
        let mut row = req.row(new_id(), &token, now);
        let fresh_after = now - (c.lost_after_seconds as i64) * 1000;
        let owner = match cluster.place(&row, c.candidates, fresh_after, &exclude)? {
            Placement::Placed(owner) => owner,
            Placement::Full => break,
            Placement::Pinned(n) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the user's profile is on node {n}, which cannot take a session now \
                         (full, draining or silent)"
                    ),
                )
                .detail(json!({ "node": n })));
            }
        };
        row.node = owner.clone();
        let started = if owner == node.id() {
            m.start_placed(row.clone())
                .map(|()| node.info.public_url.clone())
                .map_err(ApiError::from)
        } else {
            start_remote(state, node, &owner, &row.id).await
        };
        match started {
            Ok(public_url) => return Ok((row, token, public_url)),
            Err(e) => {
                let reason = format!("node {owner} could not start it: {}", e.error);
                tracing::warn!(session = %row.id, node = %owner, error = %e.error, "placement failed; trying the next node");
                if m.store()
                    .set_state(&row.id, SessionState::Failed, Some(&reason), now_ms())?
                {
                    m.event(
                        &row.id,
                        "state",
                        json!({"state": "failed", "reason": reason}),
                    );
                }
                exclude.push(owner);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no node of the cluster has room: every node is full, draining or silent",
        )
    }))
}

/// The node that keeps `user_id`'s profile, if any.
pub fn profile_node(state: &AppState, user_id: &str) -> Result<Option<String>, ApiError> {
    Ok(cluster_of(&state.manager).profile_node(user_id)?)
}

/// A create handed from one node to another.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HandedCreate {
    /// The validated request.
    #[schema(value_type = Object)]
    pub request: NewSession,
    /// What to do when the user's profile is in a live session.
    pub conflict: ProfileConflict,
}

/// Makes a create on `target` (where the user's profile is) and answers
/// with what it answered.
pub async fn create_on(
    state: &AppState,
    node: &Node,
    target: &str,
    new: &NewSession,
    conflict: ProfileConflict,
) -> Result<Response, ApiError> {
    let target = node_row(state, target)?;
    let body = serde_json::to_vec(&HandedCreate {
        request: new.clone(),
        conflict,
    })
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let req = axum::http::Request::post(format!("{}/api/cluster/sessions", target.info.api_url))
        .header(SECRET_HEADER, &node.secret)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match tokio::time::timeout(START_TIMEOUT, node.http.request(req)).await {
        Ok(Ok(resp)) => Ok(resp.map(Body::new)),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("node {} that keeps the profile: {e}", target.info.id),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "node {} that keeps the profile did not answer",
                target.info.id
            ),
        )),
    }
}

fn node_row(state: &AppState, id: &str) -> Result<NodeRow, ApiError> {
    cluster_of(&state.manager)
        .node(id)?
        .ok_or_else(|| ApiError::internal(format!("node {id} has no row")))
}

/// Create a session on this node, handed over by another node of the
/// cluster (the user's profile is here).
///
/// Between the nodes of a cluster only: the request carries the cluster
/// secret in `X-Sandcast-Cluster`. Answers as `POST /api/sessions` does.
#[utoipa::path(
    post,
    path = "/api/cluster/sessions",
    operation_id = "create_handed_session",
    tag = "cluster",
    security(("cluster_secret" = [])),
    request_body = HandedCreate,
    responses(
        (status = 201, description = "Created, as `POST /api/sessions` answers.", body = crate::openapi::Session),
        (status = 200, description = "The user's live session, as `POST /api/sessions` answers.", body = crate::openapi::Session),
        (status = 401, description = "No or a wrong cluster secret.", body = crate::error::ErrorBody),
        (status = 503, description = "No room.", body = crate::error::ErrorBody),
    )
)]
pub async fn handed_create(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    if !state.node.as_ref().is_some_and(|n| n.vouched(&headers)) {
        return Err(ApiError::unauthorized(
            "node-to-node requests carry the cluster secret",
        ));
    }
    let handed: HandedCreate = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("a handed create: {e}")))?;
    crate::api::created_here(&state, &headers, handed.request, handed.conflict).await
}

/// Asks `owner` to start session `id`, placed on it; returns the owner's
/// public URL.
async fn start_remote(
    state: &AppState,
    node: &Node,
    owner: &str,
    id: &str,
) -> Result<String, ApiError> {
    let target = node_row(state, owner)?;
    let req = axum::http::Request::post(format!(
        "{}/api/cluster/sessions/{id}/start",
        target.info.api_url
    ))
    .header(SECRET_HEADER, &node.secret)
    .body(Body::empty())
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let resp = tokio::time::timeout(START_TIMEOUT, node.http.request(req))
        .await
        .map_err(|_| ApiError::internal(format!("node {owner} did not answer")))?
        .map_err(|e| ApiError::internal(format!("node {owner}: {e}")))?;
    if resp.status().is_success() {
        return Ok(target.info.public_url);
    }
    let status = resp.status();
    Err(ApiError::internal(format!(
        "node {owner} answered {status}"
    )))
}

/// Start a session another node placed on this one.
///
/// Between the nodes of a cluster only: the request carries the cluster
/// secret in `X-Sandcast-Cluster`.
#[utoipa::path(
    post,
    path = "/api/cluster/sessions/{id}/start",
    operation_id = "start_placed_session",
    tag = "cluster",
    security(("cluster_secret" = [])),
    params(("id" = String, Path, description = "Session id.")),
    responses(
        (status = 202, description = "It is starting."),
        (status = 401, description = "No or a wrong cluster secret.", body = crate::error::ErrorBody),
        (status = 404, description = "No such session placed on this node.", body = crate::error::ErrorBody),
        (status = 503, description = "This node is full.", body = crate::error::ErrorBody),
    )
)]
pub async fn start(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Some(node) = state.node.as_ref().filter(|n| n.vouched(&headers)) else {
        return Err(ApiError::unauthorized(
            "node-to-node requests carry the cluster secret",
        ));
    };
    let row = state
        .manager
        .store()
        .get(&id)?
        .filter(|r| r.node == node.id() && r.state == SessionState::Starting)
        .ok_or_else(|| ApiError::not_found(format!("no session {id} placed on this node")))?;
    if state.manager.live(&id).is_none() {
        state.manager.start_placed(row)?;
    }
    Ok(StatusCode::ACCEPTED)
}

/// The nodes of the cluster.
#[utoipa::path(
    get,
    path = "/api/nodes",
    operation_id = "list_nodes",
    tag = "cluster",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Every node, by id.", body = [NodeRow]),
        (status = 404, description = "This server is not a node of a cluster (its store is SQLite).", body = crate::error::ErrorBody),
    )
)]
pub async fn list(State(state): State<AppState>) -> Result<axum::Json<Vec<NodeRow>>, ApiError> {
    let cluster = state.manager.store().cluster().ok_or_else(not_clustered)?;
    Ok(axum::Json(cluster.nodes()?))
}

fn not_clustered() -> ApiError {
    ApiError::not_found("this server is not a node of a cluster: its store is SQLite")
}

/// Stop placing new sessions on a node; its sessions go on until they end.
#[utoipa::path(
    put,
    path = "/api/nodes/{id}/drain",
    operation_id = "drain_node",
    tag = "cluster",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Node id.")),
    responses(
        (status = 204, description = "It is draining."),
        (status = 404, description = "No such node, or no cluster.", body = crate::error::ErrorBody),
    )
)]
pub async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_draining(&state, &id, true)
}

/// Place new sessions on a node again.
#[utoipa::path(
    delete,
    path = "/api/nodes/{id}/drain",
    operation_id = "undrain_node",
    tag = "cluster",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "Node id.")),
    responses(
        (status = 204, description = "It takes sessions again."),
        (status = 404, description = "No such node, or no cluster.", body = crate::error::ErrorBody),
    )
)]
pub async fn undrain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_draining(&state, &id, false)
}

fn set_draining(state: &AppState, id: &str, draining: bool) -> Result<StatusCode, ApiError> {
    let cluster = state.manager.store().cluster().ok_or_else(not_clustered)?;
    if !cluster.set_draining(id, draining)? {
        return Err(ApiError::not_found(format!("no node {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The session a path is about, and whether it is a viewer page.
fn session_of(path: &str) -> Option<(&str, bool)> {
    fn id_in(rest: &str) -> Option<&str> {
        rest.split('/').next().filter(|s| !s.is_empty())
    }
    if let Some(rest) = path.strip_prefix("/api/sessions/") {
        return id_in(rest).map(|id| (id, false));
    }
    if let Some(rest) = path.strip_prefix("/api/webrtc/session/") {
        return id_in(rest).map(|id| (id, false));
    }
    if let Some(rest) = path.strip_prefix("/viewer/") {
        let id = id_in(rest)?;
        return Some((id, rest.len() == id.len()));
    }
    None
}

/// The user whose profile a path is about.
fn profile_of(path: &str) -> Option<&str> {
    path.strip_prefix("/api/users/")?
        .strip_suffix("/profile")
        .filter(|u| !u.is_empty() && !u.contains('/'))
}

/// Sends a request about a session that another node runs (or a profile
/// another node keeps) to that node:
/// a viewer page is redirected (its streams then go there directly), the
/// rest is forwarded, WebSocket upgrades included. A request that another
/// node forwarded is answered here, whatever the store says, so no request
/// goes round.
pub async fn route(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(node) = state.node.clone() else {
        return next.run(req).await;
    };
    if node.vouched(req.headers()) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let (owner, page) = if let Some(user) = profile_of(&path) {
        match cluster_of(&state.manager).profile_node(user) {
            Ok(Some(n)) if n != node.id() => (n, false),
            _ => return next.run(req).await,
        }
    } else if let Some((id, page)) = session_of(&path) {
        if state.manager.live(id).is_some() {
            return next.run(req).await;
        }
        match state.manager.store().get(id) {
            Ok(Some(row)) if !row.node.is_empty() && row.node != node.id() => (row.node, page),
            _ => return next.run(req).await,
        }
    } else {
        return next.run(req).await;
    };
    let target = match cluster_of(&state.manager).node(&owner) {
        Ok(target) => target,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(target) = target.filter(|t| !t.lost) else {
        return next.run(req).await;
    };
    if page {
        let q = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        return Redirect::temporary(&format!(
            "{}{}{q}",
            target.info.public_url,
            req.uri().path()
        ))
        .into_response();
    }
    forward(&node, &target, req).await
}

/// `X-Forwarded-For` with `peer` appended to what it said before.
fn forwarded_for(before: Option<&str>, peer: std::net::IpAddr) -> String {
    match before.map(str::trim).filter(|b| !b.is_empty()) {
        Some(before) => format!("{before}, {peer}"),
        None => peer.to_string(),
    }
}

/// Forwards `req` to `target`, bridging a WebSocket upgrade.
async fn forward(node: &Node, target: &NodeRow, mut req: Request) -> Response {
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_side = upgrading.then(|| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let uri = match format!("{}{path}", target.info.api_url).parse() {
        Ok(u) => u,
        Err(e) => return ApiError::internal(format!("node URL: {e}")).into_response(),
    };
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    // The client's address as this node saw it, appended: the owner counts
    // requests per client when it trusts the nodes (`trusted_proxies`).
    if let Some(axum::extract::ConnectInfo(peer)) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
    {
        let xff = header::HeaderName::from_static("x-forwarded-for");
        let before = parts.headers.get(&xff).and_then(|v| v.to_str().ok());
        if let Ok(v) = HeaderValue::from_str(&forwarded_for(before, peer.ip())) {
            parts.headers.insert(xff, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&node.secret) {
        parts.headers.insert(SECRET_HEADER, v);
    }
    let out = axum::http::Request::from_parts(parts, body);
    let mut resp = match node.http.request(out).await {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "node {} that runs the session did not answer: {e}",
                    target.info.id
                ),
            )
            .into_response();
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let server_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(a), Ok(b)) = (client_side.await, server_side.await) else {
                return;
            };
            let mut a = hyper_util::rt::TokioIo::new(a);
            let mut b = hyper_util::rt::TokioIo::new(b);
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
    }
    resp.map(Body::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_appended_to_forwarded_for() {
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(forwarded_for(None, ip), "203.0.113.7");
        assert_eq!(forwarded_for(Some(" "), ip), "203.0.113.7");
        assert_eq!(
            forwarded_for(Some("198.51.100.1"), ip),
            "198.51.100.1, 203.0.113.7"
        );
    }

    #[test]
    fn per_session_paths_name_their_session() {
        assert_eq!(session_of("/api/sessions/abc"), Some(("abc", false)));
        assert_eq!(
            session_of("/api/sessions/abc/files/x"),
            Some(("abc", false))
        );
        assert_eq!(
            session_of("/api/webrtc/session/abc/ws"),
            Some(("abc", false))
        );
        assert_eq!(session_of("/viewer/abc"), Some(("abc", true)));
        assert_eq!(session_of("/viewer/abc/vnc"), Some(("abc", false)));
        assert_eq!(session_of("/api/sessions"), None);
        assert_eq!(session_of("/api/sessions/"), None);
        assert_eq!(session_of("/api/nodes"), None);
        assert_eq!(session_of("/assets/x.js"), None);
        assert_eq!(profile_of("/api/users/alice/profile"), Some("alice"));
        assert_eq!(profile_of("/api/users//profile"), None);
        assert_eq!(profile_of("/api/users/a/b/profile"), None);
        assert_eq!(profile_of("/api/users/alice"), None);
    }
}

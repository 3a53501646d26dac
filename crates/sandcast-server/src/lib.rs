//! The sandcast server: HTTP API, session manager, store, viewer and its
//! streams (noVNC tunnelled through the agent channel, WebRTC through the
//! gateway).
//!
//! [`run`] wires it together: configuration → store (reconciled with what
//! the last run left) → backend → gateway → [`manager::Manager`] → axum
//! router. Handlers live in [`api`] (operator API) and [`viewer`] (viewer
//! page, its state, VNC WebSocket, WebRTC signaling); [`openapi`] documents
//! them, from the same route tables the router is built of. [`webhooks`]
//! tells the operator's endpoints of session events.

pub mod api;
pub mod auth;
pub mod budget;
pub mod capacity;
pub mod cdp;
pub mod cluster;
pub mod config;
pub mod error;
pub mod files;
pub mod health;
pub mod limits;
pub mod log_read;
pub mod manager;
pub mod metrics;
pub mod openapi;
pub mod profiles;
pub mod ratelimit;
pub mod recording;
pub mod results;
pub mod retention;
pub mod rfb_view;
pub mod session_log;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod video_socket;
pub mod viewer;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use sandcast_backend::Backend;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::Config;

/// Options of one run beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Create one session once listening and print its viewer URL.
    pub open_session: bool,
}

/// The agent binary: configured, else `sandcast-agent` beside this executable.
pub fn agent_binary(config: &Config) -> PathBuf {
    if !config.agent_binary.as_os_str().is_empty() {
        return config.agent_binary.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("sandcast-agent")))
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/sandcast-agent"))
}

/// Builds the configured backend.
///
/// Both get the `[host]` settings with this server's instance id, so that
/// everything they make on the host is this server's alone.
pub fn backend(config: &Config) -> anyhow::Result<Arc<dyn Backend>> {
    let host = config.host_config();
    Ok(match config.backend.as_str() {
        "firecracker" => {
            let mut fc = config.firecracker.to_backend();
            fc.runtime_dir = fc.runtime_dir.join(&host.instance);
            fc.host = host;
            Arc::new(sandcast_firecracker::FirecrackerBackend::new(fc)?)
        }
        _ => Arc::new(sandcast_sandbox::SandboxBackend::new(
            sandcast_sandbox::SandboxConfig {
                host,
                ..config.sandbox.clone()
            },
        )?),
    })
}

/// The routes under `/api/*` that pass [`api::require_api_key`] (which lets
/// signaling through to its own check). Handlers are registered only through
/// `routes!`, which also enters them in the OpenAPI document.
fn api_routes() -> OpenApiRouter<api::AppState> {
    OpenApiRouter::new()
        .routes(routes!(api::create, api::list))
        .routes(routes!(api::get, api::delete))
        .routes(routes!(api::logs))
        .routes(routes!(api::events))
        .routes(routes!(api::auth_start))
        .routes(routes!(api::health_detail))
        .routes(routes!(files::get, files::put, files::delete))
        .routes(routes!(files::home))
        .routes(routes!(results::get))
        .routes(routes!(tokens::create, tokens::list))
        .routes(routes!(tokens::revoke))
        .routes(routes!(recording::get))
        .routes(routes!(profiles::get, profiles::put, profiles::delete))
        .routes(routes!(viewer::offer, viewer::last_offer))
        .routes(routes!(viewer::last_answer))
        .routes(routes!(viewer::ice_servers))
        .routes(routes!(viewer::signaling_ws))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(cdp::browser))
        .routes(routes!(cdp::page))
        .routes(routes!(cdp::version))
        .routes(routes!(cdp::version_slash))
        .routes(routes!(cdp::list))
        .routes(routes!(cdp::list_alias))
        .routes(routes!(cdp::get_control, cdp::put_control))
        .routes(routes!(cluster::list))
        .routes(routes!(cluster::drain, cluster::undrain))
}

/// The routes outside the API key's check; documented like the others.
fn open_routes() -> OpenApiRouter<api::AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi::serve))
        .routes(routes!(api::health))
        .routes(routes!(api::metrics))
        .routes(routes!(viewer::page))
        .routes(routes!(viewer::state))
        .routes(routes!(viewer::control))
        .routes(routes!(viewer::vnc))
        .routes(routes!(viewer::input))
        .routes(routes!(video_socket::video))
        .routes(routes!(viewer::download))
        .routes(routes!(viewer::upload))
        .routes(routes!(viewer::asset))
        // These check the cluster secret themselves.
        .routes(routes!(cluster::start))
        .routes(routes!(cluster::handed_create))
}

/// The two route tables and the OpenAPI document of both.
fn route_tables() -> (
    Router<api::AppState>,
    Router<api::AppState>,
    utoipa::openapi::OpenApi,
) {
    let (api, mut doc) = api_routes().split_for_parts();
    let (open, open_doc) = open_routes().split_for_parts();
    doc.merge(open_doc);
    (api, open, openapi::document(doc))
}

/// The OpenAPI document of the router, as `GET /api/openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    route_tables().2
}

/// Builds the router. The rate limits are the outermost layer: they decide
/// whose budget a request spends (the key's or its address's) before any is
/// charged.
pub fn router(
    state: api::AppState,
    metrics: Arc<metrics::Metrics>,
    limiters: Arc<ratelimit::Limiters>,
    health: Arc<health::Health>,
) -> Router {
    let (api, open, doc) = route_tables();
    let api = api
        // Not an endpoint: the JSON 404 of unknown `/api/*` paths, after the key check.
        .route("/api/{*rest}", axum::routing::any(api::not_found))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_api_key,
        ));
    Router::new()
        .merge(api)
        .merge(open)
        .fallback(api::not_found)
        .layer(axum::Extension(openapi::Served::new(&doc)))
        .layer(axum::Extension(metrics))
        .layer(axum::Extension(health))
        .layer(axum::Extension(Arc::new(viewer::Signaling::default())))
        .layer(DefaultBodyLimit::max(limits::MAX_BODY))
        // Before every handler: a session another node runs is answered there.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::route,
        ))
        // The viewer may be embedded in an operator's page on another origin;
        // no cookies are used, so no credentials are allowed.
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([
                    axum::http::Method::GET,
                    axum::http::Method::POST,
                    // The viewer's uploads.
                    axum::http::Method::PUT,
                    axum::http::Method::DELETE,
                ])
                .allow_headers([
                    axum::http::header::AUTHORIZATION,
                    axum::http::header::CONTENT_TYPE,
                ]),
        )
        .layer(axum::middleware::from_fn_with_state(
            limiters,
            ratelimit::middleware,
        ))
        .with_state(state)
}

/// Runs the server until SIGINT or SIGTERM; then stops every session.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    private_dirs(&config.data_dir)?;
    let tls = match config.tls_files() {
        Some((cert, key)) => {
            let t = tls::Tls::load(cert, key).map_err(anyhow::Error::msg)?;
            if let Some(w) = tls::key_mode_warning(key) {
                tracing::warn!("{w}");
            }
            Some(Arc::new(t))
        }
        None => None,
    };
    let store = store::open(&config).with_context(|| match config.clustered() {
        true => format!(
            "opening the session store {}",
            store::redact_url(&config.store)
        ),
        false => "opening the session store".to_string(),
    })?;
    let key_path = config.data_dir.join("api_key");
    let api_key = auth::load_or_create_api_key(&config.api_key, &key_path)
        .with_context(|| format!("reading or writing {}", key_path.display()))?;
    let backend = backend(&config)?;
    let gateway = if config.webrtc.enabled {
        let gw = sandcast_webrtc::Gateway::start(sandcast_webrtc::GatewayConfig {
            udp_bind: config.webrtc.udp_bind,
            tcp_bind: config.webrtc.tcp_bind,
            public_ips: config.webrtc.public_ips.clone(),
            ..Default::default()
        })
        .await
        .context("starting the WebRTC gateway")?;
        Some(gw)
    } else {
        None
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let manager = manager::Manager::new(
        config.clone(),
        store,
        backend.clone(),
        gateway,
        metrics.clone(),
        agent_binary(&config),
    );
    retention::spawn(&manager);
    results::spawn_sweeper(results::dir(&config.data_dir));
    // Before any session records: what a killed server left is cut to its
    // last complete fragment.
    let recovered = recording::recover_all(&recording::dir(&config.data_dir));
    if recovered > 0 {
        tracing::info!(count = recovered, "recordings of the last run recovered");
    }
    recording::spawn_sweeper(
        recording::dir(&config.data_dir),
        manager.recordings().clone(),
    );
    // Before reconcile, whose `stopped` events it delivers; it also picks
    // up whatever the last run left pending.
    let webhooks = manager.webhooks().spawn();
    let stale = manager.reconcile().await?;
    if !stale.is_empty() {
        tracing::info!(
            count = stale.len(),
            "sessions of the last run marked stopped"
        );
    }
    let first = health::Snapshot::take(&manager).await;
    for c in first.backend.checks.iter().filter(|c| !c.ok) {
        eprintln!("sandcast: backend check failed: {}: {}", c.name, c.detail);
    }
    let health = health::Health::new(first);
    tokio::spawn(
        health
            .clone()
            .refresh_every(Arc::downgrade(&manager), health::REFRESH),
    );
    let api_key = Arc::new(api_key);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let node = config
        .clustered()
        .then(|| Arc::new(cluster::Node::new(&config, addr)));
    if let Some(node) = &node {
        println!("node {} of the cluster", node.id());
        tokio::spawn(cluster::run(node.clone(), Arc::downgrade(&manager)));
    }
    let state = api::AppState {
        manager: manager.clone(),
        api_key: api_key.clone(),
        node,
    };
    let limiters = Arc::new(ratelimit::Limiters::new(&config.rate_limit, api_key));
    tokio::spawn(limiters.clone().trim_every(ratelimit::TRIM));
    let app = router(state, metrics, limiters, health);
    println!("sandcast listening on {}://{addr}", config.scheme());
    if let Some(w) = config.plain_http_warning() {
        tracing::warn!("{w}");
    }
    println!("API key in {}", key_path.display());
    if opts.open_session {
        let m = manager.clone();
        tokio::spawn(open_session(m, addr));
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            use axum::serve::ListenerExt;
            // Frames and input are small writes that must go out at once,
            // not wait for the previous one's acknowledgement (Nagle).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await?
        }
        Some(tls) => {
            use axum::serve::ListenerExt;
            let watcher = tls.clone().watch(tls::RELOAD_INTERVAL);
            // `tap_io` is how axum gives a custom listener's peer address to
            // `ConnectInfo`; nothing is done to the connection.
            let listener = tls.listener(listener).tap_io(|_| {});
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
            watcher.abort();
            served?
        }
    }
    eprintln!("sandcast: stopping every session");
    manager.stop_all("the server shut down").await;
    // After the sessions' last events were recorded; what is not sent yet
    // stays pending for the next run.
    webhooks.stop().await;
    match manager.backend().release().await {
        Ok(lines) if !lines.is_empty() => {
            tracing::info!(removed = %lines.join(", "), "released the host")
        }
        Ok(_) => {}
        // The next start (or `sandcast doctor`) reaps what is left.
        Err(e) => tracing::warn!(error = %e, "could not release the host"),
    }
    Ok(())
}

/// Makes the session and log directories under `data_dir`, readable by
/// root alone: `sessions/` keeps its search bit for the sandboxed user who
/// reaches its agent socket by path, but cannot be listed.
fn private_dirs(data_dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let sessions = data_dir.join("sessions");
    std::fs::create_dir_all(&sessions)
        .with_context(|| format!("creating {}", sessions.display()))?;
    std::fs::set_permissions(&sessions, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("chmod {}", sessions.display()))?;
    let logs = session_log::dir(data_dir);
    session_log::create_dir(&logs).with_context(|| format!("creating {}", logs.display()))?;
    Ok(())
}

async fn open_session(m: Arc<manager::Manager>, addr: SocketAddr) {
    let cfg = m.config().clone();
    let new = manager::NewSession {
        user_id: Some("demo".into()),
        provider: None,
        spec: store::Spec::from_defaults(&cfg.session),
        ttl_seconds: cfg.session.ttl_seconds,
    };
    let (row, token) = match m.create(new) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sandcast: could not open a session: {e}");
            return;
        }
    };
    let mut events = m.subscribe();
    loop {
        if let Ok(Some(r)) = m.store().get(&row.id) {
            match r.state {
                store::State::Ready => break,
                store::State::Starting => {}
                _ => {
                    eprintln!(
                        "sandcast: the session failed: {}",
                        r.reason.unwrap_or_default()
                    );
                    return;
                }
            }
        }
        if events.recv().await.is_err() {
            return;
        }
    }
    let base = if cfg.public_url.is_empty() {
        let host = if addr.ip().is_unspecified() {
            local_ip().unwrap_or_else(|| "127.0.0.1".into())
        } else {
            addr.ip().to_string()
        };
        format!("{}://{host}:{}", cfg.scheme(), addr.port())
    } else {
        cfg.public_url.trim_end_matches('/').to_string()
    };
    println!("viewer: {base}/viewer/{}#token={token}", row.id);
}

/// This host's address toward the outside, if it has one.
pub(crate) fn local_ip() -> Option<String> {
    // The address the host would use to reach the outside; no packet is sent.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then(|| ip.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;

    /// The (method, path) pairs a router serves, read from axum's own route
    /// table through its `Debug` view (axum has no other way to list them).
    /// HEAD is left out: axum answers it for every GET.
    fn served(router: &Router<api::AppState>) -> BTreeSet<(String, String)> {
        let full = format!("{router:?}");
        // The routes proper; the fallback router that follows has route ids of its own.
        let text = full
            .split_once("path_router: PathRouter {")
            .and_then(|(_, rest)| rest.split_once("fallback_router:"))
            .map(|(routes, _)| routes)
            .unwrap_or_else(|| panic!("no path router in {full}"));
        let mut paths = HashMap::new();
        let mut methods = HashMap::new();
        for piece in text.split("RouteId(").skip(1) {
            let (id, rest) = piece.split_once("): ").expect("RouteId(n): …");
            if let Some(path) = rest.strip_prefix('"') {
                paths.insert(id, path.split('"').next().unwrap().to_string());
            } else if rest.starts_with("MethodRouter(") {
                let allow = rest
                    .split("allow_header: Bytes(b\"")
                    .nth(1)
                    .and_then(|a| a.split('"').next())
                    .unwrap_or_else(|| panic!("no allow header in {rest}"));
                methods.insert(id, allow.to_string());
            }
        }
        assert_eq!(
            paths.keys().collect::<BTreeSet<_>>(),
            methods.keys().collect::<BTreeSet<_>>(),
            "every route has a path and methods: {text}"
        );
        let mut pairs = BTreeSet::new();
        for (id, path) in &paths {
            for m in methods[id].split(',').filter(|m| *m != "HEAD") {
                pairs.insert((m.to_lowercase(), path.replace("{*", "{")));
            }
        }
        pairs
    }

    fn documented(doc: &utoipa::openapi::OpenApi) -> BTreeSet<(String, String)> {
        let v = serde_json::to_value(doc).unwrap();
        let mut pairs = BTreeSet::new();
        for (path, item) in v["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                pairs.insert((method.clone(), path.clone()));
            }
        }
        pairs
    }

    /// The router adds no route of its own to the tables but the 404 of
    /// unknown `/api/*` paths: every other registration goes through
    /// `routes!` and so into the document.
    #[test]
    fn the_router_registers_routes_only_through_the_tables() {
        let source = include_str!("lib.rs");
        let code = source.split("#[cfg(test)]").next().unwrap();
        let direct: Vec<&str> = code
            .lines()
            .filter(|l| {
                [".route(", ".route_service(", ".nest(", ".nest_service("]
                    .iter()
                    .any(|r| l.contains(r))
            })
            .collect();
        assert_eq!(
            direct,
            [r#"        .route("/api/{*rest}", axum::routing::any(api::not_found))"#],
            "routes registered around the documented tables (use routes! in api_routes or open_routes)"
        );
    }

    #[test]
    fn every_route_of_the_router_is_in_the_document_and_nothing_else() {
        let (api, open, doc) = route_tables();
        let mut routes = served(&api);
        routes.extend(served(&open));
        let documented = documented(&doc);
        assert!(
            routes.contains(&("post".into(), "/api/sessions".into()))
                && routes.contains(&("get".into(), "/assets/{path}".into())),
            "the route table was not read: {routes:?}"
        );
        let missing: Vec<_> = routes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(
            missing.is_empty(),
            "routes not in the document: {missing:?}"
        );
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }
}

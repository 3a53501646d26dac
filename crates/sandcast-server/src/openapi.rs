//! The API's OpenAPI 3.1 document, generated from the handlers and served at
//! `GET /api/openapi.json`.
//!
//! Each handler carries its own `#[utoipa::path]` (method, path, parameters,
//! bodies, answers, credentials; its doc comment is the operation's
//! description), and `lib`'s route tables register handlers only through
//! `utoipa_axum::routes!`, so the router and the document come from one
//! list: a route cannot be served without being documented.
//!
//! Request types derive their schemas where they are defined. Most answers
//! are built as JSON values in the handlers; their shapes are described
//! here ([`Session`], [`Health`], …), and the tests validate what the
//! handlers really produce against them, so the two cannot drift apart.
//!
//! The document is public, like the README that describes the same API:
//! tools fetch it without credentials, and it holds nothing secret.

use axum::Extension;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use utoipa::Modify;
use utoipa::OpenApi as _;
use utoipa::ToSchema;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr, ResponseBuilder};

use crate::error::ErrorBody;
use crate::store::State;

/// Where the document is served.
pub const PATH: &str = "/api/openapi.json";

/// The document's fixed parts: title, security schemes, tags, shared schemas.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "sandcast",
        description = "Operator API, viewer and WebRTC signaling of a sandcast server: \
            one isolated, disposable Chromium per session, streamed to a web page. \
            Errors are JSON `{\"error\", \"detail\"}` with a 4xx or 5xx status.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorBody, State)),
    tags(
        (name = "sessions", description = "Sessions: create, watch, stop."),
        (name = "seed", description = "The seed's endpoints: `/api/auth/start` and WebRTC signaling over HTTP."),
        (name = "signaling", description = "WebRTC signaling over a WebSocket."),
        (name = "viewer", description = "The viewer page, its assets and its streams."),
        (name = "server", description = "Health, metrics and this document."),
        (name = "webhooks", description = "Deliveries of session events to the configured webhooks."),
        (name = "automation", description = "A session's Chrome DevTools Protocol endpoint, and who holds control of its input."),
    )
)]
struct Base;

/// Adds the security schemes the operations refer to.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator's API key: `Authorization: Bearer <key>`. \
                         By default the server generates it into `<data_dir>/api_key`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "viewer_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A session's viewer token (`viewer_token` of the created session, \
                         the `#token=` of its `viewer_url`): `Authorization: Bearer <token>`. \
                         It opens that session's viewer endpoints and nothing else.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "automation_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A session's automation token (`POST /api/sessions/{id}/tokens` with \
                         `{\"role\": \"automation\"}`): `Authorization: Bearer <token>`, or \
                         `?token=<token>` where a client cannot set headers. It opens that \
                         session's DevTools endpoints and nothing else.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cluster_secret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Sandcast-Cluster",
                "The cluster secret (`cluster_secret`), on requests between the nodes \
                 of a cluster only.",
            ))),
        );
        components.add_security_scheme(
            "viewer_token_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "A session's viewer token in the query, `?token=<token>`, \
                 where a browser cannot set headers (WebSocket).",
            ))),
        );
    }
}

/// Completes the document of the route tables: the fixed parts, the answers
/// every operation may give, and OpenAPI's spelling where axum's differs.
pub fn document(routes: OpenApi) -> OpenApi {
    let mut doc = Base::openapi();
    doc.merge(routes);
    let error = || {
        ResponseBuilder::new()
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        ErrorBody::name(),
                    ))))
                    .build(),
            )
            .description("")
    };
    let mut paths = std::mem::take(&mut doc.paths.paths);
    let mut ops_by_id = std::collections::BTreeMap::<String, usize>::new();
    for item in paths.values() {
        for (_, op) in operations(item) {
            if let Some(id) = &op.operation_id {
                *ops_by_id.entry(id.clone()).or_default() += 1;
            }
        }
    }
    for (path, item) in paths.iter_mut() {
        let limited = crate::ratelimit::classify(path) != crate::ratelimit::Class::None;
        for (method, op) in operations_mut(item) {
            // A handler serving two methods gives both its name; ids must be unique.
            if let Some(id) = &mut op.operation_id
                && ops_by_id.get(id).copied().unwrap_or(0) > 1
            {
                *id = format!("{id}_{method}");
            }
            let needs_credential = op
                .security
                .as_ref()
                .is_some_and(|s| !s.iter().any(is_anonymous));
            if needs_credential {
                op.responses
                    .responses
                    .entry("401".into())
                    .or_insert_with(|| {
                        error()
                            .description("No credential, or a wrong one.")
                            .build()
                            .into()
                    });
            }
            if limited {
                op.responses
                    .responses
                    .entry("429".into())
                    .or_insert_with(|| {
                        error()
                        .description(
                            "Too many requests from this client; `Retry-After` says when to retry.",
                        )
                        .build()
                        .into()
                    });
            }
        }
    }
    // axum's catch-all `{*name}` is `{name}` in OpenAPI.
    doc.paths.paths = paths
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    doc
}

fn is_anonymous(req: &utoipa::openapi::security::SecurityRequirement) -> bool {
    serde_json::to_value(req).is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty()))
}

/// Every operation of a path item with its method's lower-case name.
fn operations(
    item: &utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &utoipa::openapi::path::Operation)> {
    [
        ("get", &item.get),
        ("put", &item.put),
        ("post", &item.post),
        ("delete", &item.delete),
        ("options", &item.options),
        ("head", &item.head),
        ("patch", &item.patch),
        ("trace", &item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_ref().map(|op| (m, op)))
}

fn operations_mut(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
}

/// The served document, serialised once; each answer shares the bytes.
#[derive(Clone)]
pub struct Served(Bytes);

impl Served {
    /// Serialises a document for serving.
    pub fn new(doc: &OpenApi) -> Served {
        Served(Bytes::from(
            doc.to_json().expect("the OpenAPI document serialises"),
        ))
    }
}

/// This document: every route of the server, its parameters, bodies,
/// answers and credentials, as OpenAPI 3.1.
///
/// No credential needed.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "server",
    security(()),
    responses(
        (status = 200, description = "The OpenAPI 3.1 document.", body = Object, content_type = "application/json"),
    )
)]
pub async fn serve(Extension(doc): Extension<Served>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0).into_response()
}

/// Where a session's traffic may go: `"internet"` (every public address, no
/// private or reserved range), `"none"`, or only the networks of a list,
/// each with an optional port range (`"203.0.113.0/24:443"`,
/// `"[2001:db8::/32]:8000-8100"`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Egress {
    /// A policy by name.
    Policy(EgressPolicy),
    /// An allow list.
    Allow(Vec<String>),
}

/// A named egress policy.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressPolicy {
    /// Every public address.
    Internet,
    /// Nothing at all.
    None,
}

/// An egress policy as a request gives it: as [`Egress`], or `true` for
/// `"internet"` and `false` for `"none"`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EgressInput {
    /// `true` or `false`.
    Bool(bool),
    /// A name or an allow list.
    Egress(Egress),
}

/// A session as the API shows it (`api::session_json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Session {
    /// The session's id.
    pub id: String,
    /// The operator's user id, when given.
    pub user_id: Option<String>,
    /// The provider preset it was made from, if any.
    pub provider: Option<String>,
    /// Where it is in its life.
    pub state: State,
    /// Why it failed or stopped.
    pub reason: Option<String>,
    /// The page the browser opened.
    pub start_url: String,
    /// Display width now.
    pub width: u32,
    /// Display height now.
    pub height: u32,
    /// Chromium in kiosk mode.
    pub kiosk: bool,
    /// The command run beside the browser.
    pub launch: Option<Vec<String>>,
    /// Where its traffic may go.
    pub egress: Egress,
    /// The display's keyboard layout; null is US.
    pub keyboard_layout: Option<String>,
    /// What completes the session, if anything.
    pub complete_on: Option<crate::store::CompleteOn>,
    /// Paths copied out when it completes.
    pub collect: Vec<String>,
    /// Downloads and file choosers reach the viewer.
    pub transfers: bool,
    /// Its video is recorded (`GET /api/sessions/{id}/recording`).
    pub record: bool,
    /// The launch command's exit code, once it exited in a session with
    /// `complete_on`.
    pub exit_code: Option<i32>,
    /// The node of the cluster that runs it; null on a single host.
    pub node: Option<String>,
    /// Its home is its user's profile.
    pub profile: bool,
    /// Seconds without a viewer before it stops.
    pub idle_timeout_seconds: u64,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it became ready.
    #[schema(format = DateTime)]
    pub ready_at: Option<String>,
    /// When its TTL ends.
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// When it ended.
    #[schema(format = DateTime)]
    pub stopped_at: Option<String>,
    /// Its child processes (`xvfb`, `browser`, `vnc`, `launch`) while it
    /// runs; empty once it ended.
    pub children: Vec<Child>,
    /// Who holds control of its input: `shared` (the person and automation
    /// clients) or `person` (automation input paused).
    pub control: crate::manager::Holder,
    /// Automation clients (CDP) connected now.
    pub automation_clients: usize,
    /// Viewers connected now: WebRTC, the WebSocket video stream and noVNC.
    pub viewers: usize,
}

/// The session browser's version (`cdp::version`), as DevTools clients
/// read it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CdpVersion {
    /// Product and version, such as `Chrome/156.0.8078.129`.
    #[serde(rename = "Browser")]
    pub browser: String,
    /// The DevTools protocol's version.
    #[serde(rename = "Protocol-Version")]
    pub protocol_version: String,
    /// The browser's user agent.
    #[serde(rename = "User-Agent")]
    pub user_agent: String,
    /// V8's version.
    #[serde(rename = "V8-Version")]
    pub v8_version: String,
    /// WebKit's version.
    #[serde(rename = "WebKit-Version")]
    pub webkit_version: String,
    /// The browser-level DevTools WebSocket at this server,
    /// `ws(s)://…/api/sessions/{id}/cdp`.
    #[serde(rename = "webSocketDebuggerUrl")]
    pub web_socket_debugger_url: String,
}

/// A DevTools target of the session's browser (`cdp::list`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CdpTarget {
    /// The target's id.
    pub id: String,
    /// `page`, `iframe`, `service_worker`, `browser`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Its title.
    pub title: String,
    /// Its URL.
    pub url: String,
    /// Chromium's description of it.
    pub description: String,
    /// Its DevTools WebSocket at this server.
    #[serde(rename = "webSocketDebuggerUrl")]
    pub web_socket_debugger_url: String,
}

/// Who holds control of a session's input (`cdp::get_control`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Control {
    /// `shared`: the person and automation clients both give input;
    /// `person`: automation clients' `Input.*` commands are refused.
    pub holder: crate::manager::Holder,
    /// Automation clients connected now.
    pub automation_clients: usize,
}

/// A directory in a session's home (`sandcast_proto::files::Listing`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Listing {
    /// The directory, relative to the home.
    pub path: String,
    /// Its entries by name, at most 10000.
    pub entries: Vec<ListEntry>,
    /// Entries left out past 10000.
    pub omitted: u64,
}

/// One entry of a [`Listing`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ListEntry {
    /// Its name.
    pub name: String,
    /// `file`, `directory`, `symlink` (not followed) or `other`.
    #[schema(pattern = "^(file|directory|symlink|other)$")]
    pub kind: String,
    /// A file's size in bytes; 0 for the rest.
    pub size: u64,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: i64,
}

/// Answer of `PUT /api/sessions/{id}/files/{path}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    /// The file, as `~/…`.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A session just created: the session and how to open its viewer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedSession {
    /// The session.
    #[serde(flatten)]
    pub session: Session,
    /// The viewer of this session and nothing else; hand it to the user.
    pub viewer_url: String,
    /// The session's viewer token (also in `viewer_url`'s fragment).
    pub viewer_token: String,
    /// Its DevTools endpoint for automation clients (Playwright,
    /// Puppeteer): the API key or an automation token opens it.
    pub cdp_url: String,
}

/// Answer of `GET /api/sessions`: a page of sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// The sessions of this page, newest first.
    pub sessions: Vec<Session>,
    /// The `cursor` of the next page; `null` on the last.
    pub next: Option<String>,
}

/// A child process of a session, as its agent reports it
/// (`sandcast_proto::ChildReport`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Child {
    /// Stable name: `xvfb`, `browser`, `vnc`, `launch`.
    pub name: String,
    /// Its state now.
    pub state: ChildState,
    /// Its process id inside the session, while it runs.
    pub pid: Option<u32>,
    /// How often it was restarted.
    pub restarts: u32,
    /// How it last ended.
    pub last_exit: Option<ExitInfo>,
    /// The last lines of its output when it ended.
    pub tail: Vec<String>,
}

/// State of a child process (`sandcast_proto::ChildState`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Started, not yet ready.
    Starting,
    /// Up and ready.
    Running,
    /// Up, and paused because nobody watches (the browser only).
    Paused,
    /// Died; a restart is scheduled.
    Restarting,
    /// Died too often too quickly; still restarted, with the longest backoff.
    CrashLoop,
    /// Stopped on purpose, or gave up.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

/// Answer of `GET /health` (`health::Snapshot::public_json`): what anyone
/// may know.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when a check failed.
    #[schema(pattern = "^(ok|degraded)$")]
    pub status: String,
    /// Always `true`: the server answered.
    pub live: bool,
    /// Whether sessions can start.
    pub ready: bool,
    /// When the checks last ran (RFC 3339).
    #[schema(format = DateTime)]
    pub checked_at: Option<String>,
}

/// Answer of `GET /api/health` (`health::Snapshot::detail_json`): every
/// check's last result.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthDetail {
    /// `ok`, or `degraded` when a check failed.
    #[schema(pattern = "^(ok|degraded)$")]
    pub status: String,
    /// Always `true`: the server answered.
    pub live: bool,
    /// Whether sessions can start.
    pub ready: bool,
    /// When the checks last ran (RFC 3339).
    #[schema(format = DateTime)]
    pub checked_at: Option<String>,
    /// The session store.
    pub store: StoreHealth,
    /// The isolation backend.
    pub backend: BackendHealth,
    /// The WebRTC gateway's addresses; `null` when WebRTC is off.
    pub webrtc: Option<WebrtcHealth>,
}

/// Health of the session store.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreHealth {
    /// Whether the database answers.
    pub ok: bool,
    /// Its error, when it does not.
    pub detail: Option<String>,
}

/// Readiness of the isolation backend.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackendHealth {
    /// `sandbox` or `firecracker`.
    pub name: String,
    /// Whether sessions can start.
    pub ready: bool,
    /// One entry per check.
    pub checks: Vec<Check>,
}

/// One readiness check (`sandcast_backend::Check`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what is missing and how to get it.
    pub detail: String,
}

/// The WebRTC gateway's listening addresses.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebrtcHealth {
    /// UDP addresses.
    pub udp: Vec<String>,
    /// The ICE-TCP address, when enabled.
    pub tcp: Option<String>,
}

/// Answer of `GET /viewer/{id}/state`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewerState {
    /// The session's id.
    pub id: String,
    /// Where it is in its life.
    pub state: State,
    /// Why it failed or stopped.
    pub reason: Option<String>,
    /// Display width now.
    pub width: u32,
    /// Display height now.
    pub height: u32,
    /// Its child processes.
    pub children: Vec<Child>,
    /// Whether the server streams over WebRTC (else the viewer uses VNC).
    pub webrtc: bool,
    /// What the token may do: `view` (the server drops this viewer's
    /// input, clipboard and resize; the page says "view only") or
    /// `control`.
    pub role: crate::tokens::Role,
    /// Who holds control of its input (`shared` or `person`).
    pub control: crate::manager::Holder,
    /// Automation clients (CDP) connected now.
    pub automation_clients: usize,
}

/// An SDP offer or answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct SdpMessage {
    /// `offer` or `answer`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(offer|answer)$")]
    pub kind: String,
    /// The session description.
    pub sdp: String,
    /// The new viewer's id, in the answer to an offer.
    pub viewer_id: Option<String>,
}

/// Answer of `GET /api/webrtc/ice-servers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct IceServers {
    /// `RTCIceServer` entries as configured (`urls`, and `username` and
    /// `credential` for TURN).
    #[serde(rename = "iceServers")]
    pub ice_servers: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::store::{Row, Spec};

    fn doc() -> Value {
        serde_json::to_value(crate::openapi_document()).unwrap()
    }

    /// A validator for `schema` (a schema of the document, `$ref`s into its
    /// components resolved).
    fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
        let mut root = schema.clone();
        root["components"] = doc["components"].clone();
        jsonschema::draft202012::new(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    fn component(doc: &Value, name: &str) -> jsonschema::Validator {
        validator(
            doc,
            &json!({ "$ref": format!("#/components/schemas/{name}") }),
        )
    }

    fn assert_valid(v: &jsonschema::Validator, value: &Value, what: &str) {
        let errors: Vec<String> = v.iter_errors(value).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{what}: {value:#} does not match: {errors:?}"
        );
    }

    fn row(state: crate::store::State) -> Row {
        Row {
            id: "0123456789abcdef01234567".into(),
            user_id: Some("alice".into()),
            provider: None,
            state,
            reason: None,
            spec: Spec {
                start_url: "https://example.org/".into(),
                launch: Some(vec!["my-cli".into(), "login".into()]),
                idle_timeout_seconds: 300,
                egress: sandcast_backend::Egress::Internet,
                ..Spec::from_defaults(&crate::config::SessionDefaults::default())
            },
            token_hash: "00".repeat(32),
            created_ms: 1_700_000_000_000,
            ready_ms: Some(1_700_000_001_000),
            expires_ms: 1_700_003_600_000,
            stopped_ms: None,
            exit_code: None,
            node: String::new(),
        }
    }

    #[test]
    fn sessions_as_the_api_builds_them_match_the_session_schema() {
        let doc = doc();
        let v = component(&doc, "Session");
        for state in crate::store::State::ALL {
            let json = crate::api::session_json(&row(state), None);
            assert_valid(&v, &json, state.as_str());
        }
        // The schema is not empty: a session missing a field does not match.
        let mut broken = crate::api::session_json(&row(crate::store::State::Ready), None);
        broken.as_object_mut().unwrap().remove("state");
        assert!(!v.is_valid(&broken), "a session without state matched");
        broken["state"] = json!("sleeping");
        assert!(!v.is_valid(&broken), "an unknown state matched");
    }

    #[test]
    fn error_answers_match_the_error_schema() {
        use axum::response::IntoResponse;
        let doc = doc();
        let v = component(&doc, "ErrorBody");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for e in [
            crate::error::ApiError::no_session("abc"),
            crate::error::ApiError::bad_request("width: 10 is outside 320..=3840"),
        ] {
            let resp = e.into_response();
            let body = rt
                .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                .unwrap();
            let json: Value = serde_json::from_slice(&body).unwrap();
            assert_valid(&v, &json, "error body");
        }
        assert!(!v.is_valid(&json!({ "detail": null })));
    }

    /// The README's request examples (`curl -X POST $API/… -d '…'`) are
    /// valid request bodies of their endpoints.
    #[test]
    fn readme_request_examples_match_the_schemas() {
        let doc = doc();
        let readme = include_str!("../../../README.md").replace("\\\n", " ");
        let mut checked = 0;
        for line in readme.lines().filter(|l| l.contains("curl ")) {
            let (Some(path), Some(body)) = (
                line.split("-X POST $API")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next()),
                line.split("-d '").nth(1).and_then(|r| r.split('\'').next()),
            ) else {
                continue;
            };
            let body: Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("README body for {path} is not JSON ({e}): {body}"));
            // The shell variable of a session id is the document's `{id}`.
            let path = path.replace("$ID", "{id}");
            let path = path.as_str();
            let schema =
                &doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "README posts to {path}, which takes no JSON body"
            );
            assert_valid(
                &validator(&doc, schema),
                &body,
                &format!("README's POST {path}"),
            );
            // And the schema refuses what the server refuses.
            let mut bad = body.clone();
            bad["no_such_field"] = json!(1);
            assert!(
                !validator(&doc, schema).is_valid(&bad),
                "POST {path}: unknown fields pass the schema"
            );
            checked += 1;
        }
        assert!(
            checked >= 2,
            "found {checked} request examples in the README"
        );
    }

    #[test]
    fn health_answers_match_the_health_schema() {
        let doc = doc();
        let v = component(&doc, "Health");
        for ready in [true, false] {
            let snap = crate::health::Snapshot {
                store: if ready {
                    Ok(())
                } else {
                    Err("disk I/O error".into())
                },
                backend: sandcast_backend::Readiness {
                    ready,
                    checks: vec![sandcast_backend::Check {
                        name: "bwrap".into(),
                        ok: ready,
                        detail: "found".into(),
                    }],
                },
                checked_ms: 1_700_000_000_000,
            };
            assert_valid(&v, &snap.public_json(), &format!("ready {ready}"));
        }
        assert!(
            !v.is_valid(&json!({ "status": "ok", "live": true, "ready": "yes" })),
            "a health answer with a malformed field matched"
        );
    }

    /// The bounds the document states are the ones the server checks.
    #[test]
    fn documented_bounds_are_the_checked_ones() {
        use crate::limits;
        let doc = doc();
        let props = &doc["components"]["schemas"]["CreateRequest"]["properties"];
        let bounds = |f: &str| (props[f]["minimum"].as_u64(), props[f]["maximum"].as_u64());
        let size = |x: u32| Some(u64::from(x));
        assert_eq!(
            bounds("width"),
            (size(limits::MIN_SIZE.0), size(limits::MAX_SIZE.0))
        );
        assert_eq!(
            bounds("height"),
            (size(limits::MIN_SIZE.1), size(limits::MAX_SIZE.1))
        );
        assert_eq!(bounds("ttl_seconds"), (Some(1), Some(limits::MAX_TTL)));
        assert_eq!(
            bounds("idle_timeout_seconds"),
            (Some(1), Some(limits::MAX_TTL))
        );
        let max_len = limits::MAX_NAME_LEN as u64;
        assert_eq!(props["user_id"]["maxLength"].as_u64(), Some(max_len));
        assert_eq!(props["provider"]["maxLength"].as_u64(), Some(max_len));
        assert_eq!(
            props["launch"]["maxItems"].as_u64(),
            Some(limits::MAX_LAUNCH_ARGS as u64)
        );
        let param = |path: &str, name: &str| {
            doc["paths"][path]["get"]["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .map(|p| p["schema"].clone())
                .unwrap_or_else(|| panic!("GET {path}: no parameter {name}"))
        };
        let limit = param("/api/sessions", "limit");
        assert_eq!(
            (limit["minimum"].as_u64(), limit["maximum"].as_u64()),
            (Some(1), Some(crate::api::MAX_PAGE as u64))
        );
        assert_eq!(
            param("/api/sessions", "user_id")["maxLength"].as_u64(),
            Some(max_len)
        );
        let tail = param("/api/sessions/{id}/logs", "tail");
        assert_eq!(
            (tail["minimum"].as_u64(), tail["maximum"].as_u64()),
            (Some(0), Some(crate::api::MAX_TAIL))
        );
        // The state filter's pattern takes every state the server knows, no other.
        let pattern = param("/api/sessions", "state")["pattern"]
            .as_str()
            .unwrap()
            .to_string();
        let re = jsonschema::draft202012::new(&json!({ "pattern": pattern })).unwrap();
        let all: Vec<&str> = crate::store::State::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert!(re.is_valid(&json!(all.join(","))), "{pattern}");
        assert!(!re.is_valid(&json!("ready,sleeping")), "{pattern}");
    }
}

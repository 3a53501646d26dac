//! The agent token check inside a microVM.
//!
//! The Firecracker backend puts `{"sandcast": {"session_id": …,
//! "agent_token_sha256": …}}` in the VM's MMDS (version 2) before the guest
//! runs, and again after every snapshot restore. The server sends the token
//! itself in the session's configuration. Before it runs anything of a
//! configuration, the agent reads MMDS (a session token from
//! `PUT /latest/api/token`, then `GET /sandcast` with it) and refuses a
//! configuration that is for another session or whose token does not hash to
//! the published value. The token is never logged; the hashes are compared
//! in constant time.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use sandcast_proto::SessionConfig;
use serde_json::Value;

/// Firecracker's default MMDS address (the backend does not change it).
pub const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Where the agent reads MMDS in a microVM.
pub const MMDS_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(MMDS_IP), 80);

/// How long a session token asks to live; the agent reads MMDS once.
const TOKEN_TTL_SECONDS: u32 = 60;

/// How long to keep trying: right after a restore the guest's network may
/// need a moment (its ARP entry for MMDS is re-learned).
pub const FETCH_DEADLINE: Duration = Duration::from_secs(5);

/// What the backend published for this VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmdsRecord {
    /// The session this VM belongs to.
    pub session_id: String,
    /// SHA-256 (hex) of the session's agent token.
    pub agent_token_sha256: Option<String>,
}

impl MmdsRecord {
    /// Reads the record from the JSON of `GET /sandcast`.
    pub fn from_json(v: &Value) -> anyhow::Result<Self> {
        let session_id = v["session_id"]
            .as_str()
            .context("MMDS has no sandcast.session_id")?
            .to_owned();
        let agent_token_sha256 = v["agent_token_sha256"].as_str().map(str::to_owned);
        Ok(MmdsRecord {
            session_id,
            agent_token_sha256,
        })
    }
}

/// Reads MMDS at `addr` and checks `config` against it; the error is the
/// reason to give the server.
pub async fn verify(
    config: &SessionConfig,
    addr: SocketAddr,
    within: Duration,
) -> Result<(), String> {
    let record = fetch(addr, within).await.map_err(|e| {
        format!("refusing the configuration: cannot read MMDS to check its agent token: {e:#}")
    })?;
    check(config, &record)
}

/// Whether `config` may run in the VM that MMDS describes; the error says
/// why not, without the token.
pub fn check(config: &SessionConfig, record: &MmdsRecord) -> Result<(), String> {
    if config.session_id != record.session_id {
        return Err(format!(
            "refusing the configuration: it is for session {:?} but this microVM belongs to session {:?} (MMDS)",
            config.session_id, record.session_id
        ));
    }
    let Some(hash) = &record.agent_token_sha256 else {
        return Err(
            "refusing the configuration: MMDS holds no agent token hash for this session".into(),
        );
    };
    let Some(token) = &config.agent_token else {
        return Err("refusing the configuration: it carries no agent token".into());
    };
    if !token.matches_sha256_hex(hash) {
        return Err(
            "refusing the configuration: its agent token does not match the hash in MMDS".into(),
        );
    }
    Ok(())
}

/// Reads this VM's record from MMDS version 2 at `addr`, retrying for up
/// to `within`.
pub async fn fetch(addr: SocketAddr, within: Duration) -> anyhow::Result<MmdsRecord> {
    let deadline = Instant::now() + within;
    loop {
        match fetch_once(addr).await {
            Ok(r) => return Ok(r),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!("reading MMDS at {addr}"));
            }
            // Polling with a deadline: nothing announces that MMDS answers.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn fetch_once(addr: SocketAddr) -> anyhow::Result<MmdsRecord> {
    let token = request(
        addr,
        Request::put("/latest/api/token")
            .header("host", addr.ip().to_string())
            .header(
                "x-metadata-token-ttl-seconds",
                TOKEN_TTL_SECONDS.to_string(),
            )
            .body(Empty::<Bytes>::new())?,
    )
    .await
    .context("getting an MMDS session token")?;
    let token = String::from_utf8(token.to_vec()).context("MMDS session token")?;
    let body = request(
        addr,
        Request::get("/sandcast")
            .header("host", addr.ip().to_string())
            .header("accept", "application/json")
            .header("x-metadata-token", token.trim())
            .body(Empty::<Bytes>::new())?,
    )
    .await
    .context("reading sandcast from MMDS")?;
    let v: Value = serde_json::from_slice(&body).context("MMDS answered no JSON")?;
    MmdsRecord::from_json(&v)
}

/// One request on its own connection (MMDS serves one at a time).
async fn request(addr: SocketAddr, req: Request<Empty<Bytes>>) -> anyhow::Result<Bytes> {
    let stream = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let what = format!("{} {}", req.method(), req.uri());
    let result = async {
        let resp = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req))
            .await
            .context("no answer")??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{what}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(body)
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use sandcast_proto::{AgentToken, BrowserConfig};
    use serde_json::json;

    use super::*;

    /// An MMDS version 2 stand-in on 127.0.0.1: `PUT /latest/api/token`
    /// with a TTL header gives a session token; `GET` needs it and answers
    /// the JSON at the path (with `Accept: application/json`), as
    /// Firecracker's MMDS does.
    pub(crate) async fn mmds_standin(data: Value) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issued: Arc<Mutex<Vec<String>>> = Arc::default();
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Ok((s, _)) = listener.accept().await {
                n += 1;
                let data = data.clone();
                let issued = issued.clone();
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let data = data.clone();
                    let issued = issued.clone();
                    async move {
                        let reply = |status: StatusCode, body: String| {
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        };
                        let h = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        match *req.method() {
                            hyper::Method::PUT if req.uri().path() == "/latest/api/token" => {
                                let ttl = h("x-metadata-token-ttl-seconds")
                                    .and_then(|t| t.parse::<u32>().ok());
                                match ttl {
                                    Some(1..=21600) => {
                                        let t = format!("session-token-{n}");
                                        issued.lock().unwrap().push(t.clone());
                                        reply(StatusCode::OK, t)
                                    }
                                    _ => reply(
                                        StatusCode::BAD_REQUEST,
                                        "Token time to live value not found.".into(),
                                    ),
                                }
                            }
                            hyper::Method::GET => {
                                let ok = h("x-metadata-token")
                                    .is_some_and(|t| issued.lock().unwrap().contains(&t));
                                if !ok {
                                    return reply(
                                        StatusCode::UNAUTHORIZED,
                                        "No MMDS token provided. Use `X-metadata-token` header to specify the session token.".into(),
                                    );
                                }
                                if h("accept").as_deref() != Some("application/json") {
                                    return reply(
                                        StatusCode::NOT_IMPLEMENTED,
                                        "Cannot retrieve value. The value has an unsupported type."
                                            .into(),
                                    );
                                }
                                match data.pointer(req.uri().path()) {
                                    Some(v) => reply(StatusCode::OK, v.to_string()),
                                    None => reply(
                                        StatusCode::NOT_FOUND,
                                        format!("Resource not found: {}.", req.uri().path()),
                                    ),
                                }
                            }
                            _ => reply(
                                StatusCode::METHOD_NOT_ALLOWED,
                                "Not allowed HTTP method.".into(),
                            ),
                        }
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        addr
    }

    pub(crate) fn config(id: &str, token: Option<&str>) -> SessionConfig {
        SessionConfig {
            session_id: id.into(),
            width: 640,
            height: 480,
            start_url: "about:blank".into(),
            kiosk: false,
            launch: None,
            launch_once: false,
            browser: BrowserConfig {
                binary: "/bin/false".into(),
                extra_args: Vec::new(),
                policy: None,
            },
            restart: Default::default(),
            max_fps: 30,
            h264_tuning: sandcast_proto::H264Tuning::default(),
            server_time_ms: 0,
            agent_token: token.map(AgentToken::new),
            pause_unwatched_ms: 0,
            transfers: true,
            display_max: None,
            keyboard_layout: None,
        }
    }

    fn record(id: &str, token: &str) -> MmdsRecord {
        MmdsRecord {
            session_id: id.into(),
            agent_token_sha256: Some(AgentToken::new(token).sha256_hex()),
        }
    }

    #[test]
    fn a_matching_token_and_session_pass() {
        assert_eq!(
            check(&config("s1", Some("tok")), &record("s1", "tok")),
            Ok(())
        );
    }

    #[test]
    fn a_wrong_missing_or_foreign_configuration_is_refused_without_the_token() {
        let e = check(&config("s1", Some("wrong-secret")), &record("s1", "tok")).unwrap_err();
        assert!(e.contains("does not match the hash in MMDS"), "{e}");
        assert!(!e.contains("wrong-secret"), "{e}");
        let e = check(&config("s1", None), &record("s1", "tok")).unwrap_err();
        assert!(e.contains("carries no agent token"), "{e}");
        let e = check(&config("s2", Some("tok")), &record("s1", "tok")).unwrap_err();
        assert!(e.contains("\"s2\"") && e.contains("\"s1\""), "{e}");
        let no_hash = MmdsRecord {
            session_id: "s1".into(),
            agent_token_sha256: None,
        };
        let e = check(&config("s1", Some("tok")), &no_hash).unwrap_err();
        assert!(e.contains("no agent token hash"), "{e}");
    }

    #[test]
    fn the_record_is_read_from_the_backends_json() {
        let v = json!({"session_id": "s1", "agent_vsock_port": 1024, "agent_token_sha256": "ab"});
        assert_eq!(
            MmdsRecord::from_json(&v).unwrap(),
            MmdsRecord {
                session_id: "s1".into(),
                agent_token_sha256: Some("ab".into())
            }
        );
        assert!(MmdsRecord::from_json(&json!({"x": 1})).is_err());
    }

    #[tokio::test]
    async fn fetch_speaks_mmds_version_2() {
        let hash = AgentToken::new("tok").sha256_hex();
        let addr = mmds_standin(json!({"sandcast": {
            "session_id": "s1", "agent_vsock_port": 1024, "agent_token_sha256": hash,
        }}))
        .await;
        let r = fetch(addr, FETCH_DEADLINE).await.unwrap();
        assert_eq!(r.session_id, "s1");
        assert_eq!(r.agent_token_sha256.as_deref(), Some(hash.as_str()));
    }

    #[tokio::test]
    async fn fetch_names_what_mmds_lacks() {
        let addr = mmds_standin(json!({"other": {}})).await;
        let e = format!(
            "{:#}",
            fetch(addr, Duration::from_millis(300)).await.unwrap_err()
        );
        assert!(e.contains("404") && e.contains("/sandcast"), "{e}");
    }
}

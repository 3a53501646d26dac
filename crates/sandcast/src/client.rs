//! `sandcast session …`: a thin client of the HTTP API.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::{Value, json};

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Server URL.
    #[arg(
        long,
        env = "SANDCAST_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// API key (default: read from <data-dir>/api_key).
    #[arg(long, env = "SANDCAST_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Data directory holding the generated API key.
    #[arg(
        long,
        env = "SANDCAST_DATA_DIR",
        default_value = "/var/lib/sandcast",
        global = true
    )]
    pub data_dir: PathBuf,
    /// PEM file of the CA (or self-signed certificate) to trust for an
    /// https server instead of the public roots.
    #[arg(long, env = "SANDCAST_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

/// Session commands.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Create a session; prints it with its viewer URL.
    Create {
        /// Page to open.
        #[arg(long)]
        start_url: Option<String>,
        /// Display width.
        #[arg(long)]
        width: Option<u32>,
        /// Display height.
        #[arg(long)]
        height: Option<u32>,
        /// Lifetime in seconds.
        #[arg(long)]
        ttl_seconds: Option<u64>,
        /// Provider preset.
        #[arg(long)]
        provider: Option<String>,
        /// Kiosk mode.
        #[arg(long)]
        kiosk: bool,
        /// Wait until it is ready (or failed).
        #[arg(long)]
        wait: bool,
    },
    /// List sessions, newest first (every page unless --limit is given).
    List {
        /// Only sessions in these states (comma-separated, e.g. `ready,starting`).
        #[arg(long)]
        state: Option<String>,
        /// Only sessions of this user id.
        #[arg(long)]
        user_id: Option<String>,
        /// At most this many sessions (one page).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one session.
    Get {
        /// Session id.
        id: String,
    },
    /// Print a session's logs.
    Logs {
        /// Session id.
        id: String,
        /// Keep printing until the session ends.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
        /// Only lines stamped at or after this time (RFC 3339 or Unix milliseconds).
        #[arg(long)]
        since: Option<String>,
    },
    /// Stop and delete a session.
    Delete {
        /// Session id.
        id: String,
    },
}

/// An API client.
pub struct Client {
    base: String,
    key: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client from the flags.
    pub fn new(conn: &ConnArgs) -> anyhow::Result<Client> {
        let key = match &conn.api_key {
            Some(k) => k.clone(),
            None => {
                let path = conn.data_dir.join("api_key");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no --api-key given and {} is not readable", path.display())
                    })?
                    .trim()
                    .to_string()
            }
        };
        let mut agent = ureq::AgentBuilder::new();
        if let Some(ca) = &conn.ca_cert {
            let tls = sandcast_server::tls::client_config(ca)
                .map_err(|e| anyhow::anyhow!("--ca-cert: {e}"))?;
            agent = agent.tls_config(std::sync::Arc::new(tls));
        }
        Ok(Client {
            base: conn.server.trim_end_matches('/').to_string(),
            key,
            agent: agent.build(),
        })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<ureq::Response> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.key));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                bail!("{method} {path}: HTTP {code}: {text}")
            }
            Err(e) => bail!(
                "{method} {path}: {e} (is `sandcast serve` running at {}?)",
                self.base
            ),
        }
    }

    /// A JSON request.
    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        Ok(self.call(method, path, body)?.into_json()?)
    }

    /// `GET /api/sessions` with filters: one page of `limit`, or every page
    /// followed through `next` when no limit is given.
    pub fn list(
        &self,
        state: Option<&str>,
        user_id: Option<&str>,
        limit: Option<u32>,
    ) -> anyhow::Result<Value> {
        let mut base = Vec::new();
        if let Some(s) = state {
            base.push(format!("state={}", encode(s)));
        }
        if let Some(u) = user_id {
            base.push(format!("user_id={}", encode(u)));
        }
        if let Some(n) = limit {
            base.push(format!("limit={n}"));
        }
        let mut sessions = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = base.clone();
            if let Some(c) = &cursor {
                q.push(format!("cursor={}", encode(c)));
            }
            let path = if q.is_empty() {
                "/api/sessions".to_string()
            } else {
                format!("/api/sessions?{}", q.join("&"))
            };
            let page = self.json("GET", &path, None)?;
            if let Some(list) = page["sessions"].as_array() {
                sessions.extend(list.iter().cloned());
            }
            cursor = page["next"].as_str().map(str::to_string);
            if limit.is_some() || cursor.is_none() {
                break;
            }
        }
        Ok(json!({ "sessions": sessions }))
    }

    /// Waits until a session leaves `starting`.
    pub fn wait(&self, id: &str) -> anyhow::Result<Value> {
        let resp = self.call("GET", &format!("/api/sessions/{id}/events"), None)?;
        let mut reader = std::io::BufReader::new(resp.into_reader());
        let mut line = String::new();
        let mut event = String::new();
        use std::io::BufRead;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                // Only session state events; child events carry states too.
                if event != "state" {
                    continue;
                }
                let v: Value = serde_json::from_str(data.trim()).unwrap_or_default();
                if v["state"].as_str().is_some_and(|s| s != "starting") {
                    break;
                }
            }
        }
        self.json("GET", &format!("/api/sessions/{id}"), None)
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs a session command.
pub fn run(conn: &ConnArgs, cmd: SessionCommand) -> anyhow::Result<ExitCode> {
    let c = Client::new(conn)?;
    let out = match cmd {
        SessionCommand::Create {
            start_url,
            width,
            height,
            ttl_seconds,
            provider,
            kiosk,
            wait,
        } => {
            let mut body = json!({ "kiosk": kiosk });
            let obj = body.as_object_mut().unwrap();
            if let Some(v) = start_url {
                obj.insert("start_url".into(), json!(v));
            }
            if let Some(v) = width {
                obj.insert("width".into(), json!(v));
            }
            if let Some(v) = height {
                obj.insert("height".into(), json!(v));
            }
            if let Some(v) = ttl_seconds {
                obj.insert("ttl_seconds".into(), json!(v));
            }
            if let Some(v) = provider {
                obj.insert("provider".into(), json!(v));
            }
            let mut created = c.json("POST", "/api/sessions", Some(body))?;
            if wait {
                let id = created["id"].as_str().unwrap_or_default().to_string();
                let now = c.wait(&id)?;
                created["state"] = now["state"].clone();
                created["reason"] = now["reason"].clone();
                created["children"] = now["children"].clone();
            }
            created
        }
        SessionCommand::List {
            state,
            user_id,
            limit,
        } => c.list(state.as_deref(), user_id.as_deref(), limit)?,
        SessionCommand::Get { id } => c.json("GET", &format!("/api/sessions/{id}"), None)?,
        SessionCommand::Delete { id } => c.json("DELETE", &format!("/api/sessions/{id}"), None)?,
        SessionCommand::Logs {
            id,
            follow,
            tail,
            since,
        } => {
            let mut query = Vec::new();
            if follow {
                query.push("follow=1".to_string());
            }
            if let Some(n) = tail {
                query.push(format!("tail={n}"));
            }
            if let Some(t) = since {
                query.push(format!("since={}", encode(&t)));
            }
            let path = if query.is_empty() {
                format!("/api/sessions/{id}/logs")
            } else {
                format!("/api/sessions/{id}/logs?{}", query.join("&"))
            };
            let mut reader = c.call("GET", &path, None)?.into_reader();
            let mut buf = [0u8; 8192];
            let mut stdout = std::io::stdout();
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                stdout.write_all(&buf[..n])?;
                stdout.flush()?;
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    if out["state"] == "failed" {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `sandcast node`: the nodes of a cluster (a PostgreSQL store).
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node: its URLs, slots, load, heartbeat, whether it drains.
    List,
    /// Place no new sessions on a node; its sessions go on until they end.
    Drain {
        /// Node id (as `sandcast node list` shows it).
        id: String,
    },
    /// Place new sessions on a node again.
    Undrain {
        /// Node id.
        id: String,
    },
}

/// Runs a node command.
pub fn run_node(conn: &ConnArgs, cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    let c = Client::new(conn)?;
    let out = match cmd {
        NodeCommand::List => c.json("GET", "/api/nodes", None)?,
        NodeCommand::Drain { id } => {
            c.call("PUT", &format!("/api/nodes/{}/drain", encode(&id)), None)?;
            json!({ "node": id, "draining": true })
        }
        NodeCommand::Undrain { id } => {
            c.call("DELETE", &format!("/api/nodes/{}/drain", encode(&id)), None)?;
            json!({ "node": id, "draining": false })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

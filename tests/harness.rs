//! End-to-end test harness for sandcast: runs the real `sandcast serve`
//! binary with a throw-away data directory, talks to its HTTP API, drives
//! headless Chromium viewers through the node scripts in `browser/`, and
//! checks that a session leaves nothing behind on the host.
//!
//! The harness builds nothing itself: it runs the `sandcast` and
//! `sandcast-agent` binaries from the Cargo target directory (build them
//! first with `cargo build -p sandcast -p sandcast-agent`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "webhook_receiver.rs"]
pub mod webhook_receiver;

/// Flags every test browser gets (both the viewers and the browsers in sessions).
pub const BROWSER_FLAGS: [&str; 5] = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
];

/// Chromium features that would block a page's requests to local addresses
/// by browser policy; switched off in sessions so that only the sandbox's
/// network isolation can stop them.
pub const LOCAL_NETWORK_POLICY_OFF: &str = "--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults,BlockInsecurePrivateNetworkRequests";

/// The directory holding the `sandcast` and `sandcast-agent` binaries.
///
/// Test binaries live in `<target>/debug/deps`, so the binaries are two
/// levels up; `CARGO_TARGET_DIR` and `<workspace>/target` are fallbacks.
pub fn bin_dir() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.parent().and_then(Path::parent)
    {
        candidates.push(d.to_path_buf());
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    for d in &candidates {
        if d.join("sandcast").is_file() && d.join("sandcast-agent").is_file() {
            return d.clone();
        }
    }
    panic!(
        "no sandcast and sandcast-agent binaries in {candidates:?}: \
         run `cargo build -p sandcast -p sandcast-agent` first (same CARGO_TARGET_DIR)"
    );
}

/// The `tests/browser` directory (node scripts and their `node_modules`).
pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// One HTTP response, whatever its status.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body as text (empty when it is not UTF-8).
    pub body: String,
    /// The body's bytes.
    pub bytes: Vec<u8>,
}

impl Resp {
    /// The body parsed as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The first header of that (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Top-level TOML keys added to the config file.
    pub top: String,
    /// Whole TOML tables added to the config file (not `[webrtc]`,
    /// `[browser]`, `[session]`, which the harness writes).
    pub tables: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `sandcast serve ...`.
    pub args: Vec<String>,
    /// Extra keys of the `[webrtc]` table.
    pub webrtc: String,
    /// Extra keys of the `[session]` table.
    pub session: String,
    /// Keep the server's default rate limits (the harness otherwise raises
    /// the per-address limit of requests without the key, which tests
    /// probing refusals spend quickly).
    pub default_rate_limits: bool,
    /// PEM CA certificate the harness's clients (HTTP and `sandcast` CLI)
    /// trust, for a server with `tls_cert`/`tls_key` in `top`.
    pub ca_cert: Option<PathBuf>,
    /// The sessions' browser instead of `/usr/bin/chromium` (a path the
    /// sandbox shows: not under /tmp, /var/tmp, /run or /home).
    pub browser_binary: Option<String>,
}

/// A running `sandcast serve` with its own data directory.
pub struct Server {
    child: Option<Child>,
    opts: ServerOptions,
    data: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`, or `https://` for a server with TLS.
    pub base: String,
    /// The API port.
    pub port: u16,
    /// The operator API key (read from `<data_dir>/api_key`).
    pub api_key: String,
    /// Everything the server wrote to stdout and stderr, line by line.
    pub output: Arc<Mutex<Vec<String>>>,
    agent: ureq::Agent,
    // Held while the server lives, so test servers of different test
    // binaries do not run at once (they would compete for the machine).
    // A server started beside another ([`Server::start_beside`]) shares the
    // first one's lock. (Test servers use their own prefix and cgroup parent,
    // and every server has its own instance id, so they leave other sandcast
    // servers on the host alone.)
    _lock: Option<std::fs::File>,
}

/// The `[host] name_prefix` of test servers.
pub const E2E_PREFIX: &str = "sce2e";

/// Takes the machine-wide lock that serialises test servers.
fn server_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("sandcast-e2e-server.lock"))
        .expect("open lock file");
    // SAFETY: flock on a file descriptor we own; blocks until the lock is free.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

/// An HTTP client; for https it trusts only the CA in `ca` (PEM).
fn http_agent(ca: Option<&Path>, timeout: Option<Duration>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("reading {}: {e}", ca.display()));
        let cert = ureq::tls::Certificate::from_pem(&pem)
            .unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
        let roots = ureq::tls::RootCerts::Specific(Arc::new(vec![cert]));
        config = config.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
    }
    config.build().into()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Server {
    /// Starts a server with the harness defaults plus `opts`.
    pub fn start(opts: ServerOptions) -> Server {
        Server::start_with_lock(opts, Some(server_lock()))
    }

    /// Starts a second server while `self` runs, under `self`'s machine-wide
    /// lock, with its own data directory (so its own instance) and port.
    pub fn start_beside(&self, opts: ServerOptions) -> Server {
        Server::start_with_lock(opts, None)
    }

    fn start_with_lock(opts: ServerOptions, lock: Option<std::fs::File>) -> Server {
        let data = tempfile::Builder::new()
            .prefix("sandcast-e2e-")
            .tempdir()
            .expect("temp data dir");
        let agent = http_agent(opts.ca_cert.as_deref(), Some(Duration::from_secs(30)));
        let mut s = Server {
            child: None,
            opts,
            data,
            base: String::new(),
            port: 0,
            api_key: String::new(),
            output: Arc::new(Mutex::new(Vec::new())),
            agent,
            _lock: lock,
        };
        s.spawn(None);
        s
    }

    /// Starts a server with the harness defaults.
    pub fn start_default() -> Server {
        Server::start(ServerOptions::default())
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The server's instance id (from its data directory).
    pub fn instance(&self) -> String {
        sandcast_host::instance_id(self.data.path())
    }

    /// The server's nftables table.
    pub fn nft_table(&self) -> String {
        sandcast_host::net::table_name(E2E_PREFIX, &self.instance())
    }

    /// What this server's instance keeps on the host between sessions and
    /// is still there: its nftables table and its cgroup parents.
    pub fn instance_leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let table = self.nft_table();
        let listed = Command::new("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .expect("running nft");
        if listed.status.success() {
            left.push(format!("nftables table inet {table}"));
        }
        let parent = format!("sandcast-e2e/{}", self.instance());
        let roots = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in roots {
            let dir = root.join(&parent);
            if dir.is_dir() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        left
    }

    /// The elements of one set of the server's table (empty when there is
    /// no table).
    pub fn nft_set(&self, set: &str) -> Vec<String> {
        let out = Command::new("nft")
            .args(["-j", "list", "set", "inet", &self.nft_table(), set])
            .output()
            .expect("running nft");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), String::from))
            .collect()
    }

    /// The host-side veth of session `id` of this server.
    pub fn veth(&self, id: &str) -> String {
        sandcast_host::net::veth_name(&self.instance(), id)
    }

    /// Files of sessions left in the data directory: backend records and
    /// session directories.
    pub fn session_files(&self) -> Vec<String> {
        ["sandbox/sessions", "sessions"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.data.path().join(d)).ok())
            .flat_map(|rd| rd.flatten().map(|e| e.path().display().to_string()))
            .collect()
    }

    fn write_config(&self) -> PathBuf {
        let extra_args: Vec<String> = BROWSER_FLAGS[1..]
            .iter()
            .map(|s| s.to_string())
            .chain([LOCAL_NETWORK_POLICY_OFF.to_string()])
            .collect();
        let cfg = format!(
            "data_dir = {data:?}\n{top}\n\
             [session]\negress = false\n{session}\n\n\
             [browser]\nbinary = {binary:?}\nextra_args = {args}\n\n\
             [host]\nname_prefix = \"{prefix}\"\ncgroup_parent = \"sandcast-e2e\"\n\n\
             [webrtc]\nudp_bind = \"127.0.0.1:0\"\ntcp_bind = \"127.0.0.1:0\"\npublic_ips = [\"127.0.0.1\"]\n{webrtc}\n\n\
             {tables}\n",
            data = self.data.path().to_str().expect("utf-8 temp path"),
            top = self.opts.top,
            session = self.opts.session,
            args = serde_json::to_string(&extra_args).expect("json"),
            binary = self
                .opts
                .browser_binary
                .as_deref()
                .unwrap_or("/usr/bin/chromium"),
            tables = self.opts.tables,
            webrtc = self.opts.webrtc,
            prefix = E2E_PREFIX,
        );
        let path = self.data.path().join("sandcast.toml");
        std::fs::write(&path, cfg).expect("write config");
        path
    }

    /// Runs `sandcast serve` and waits for its "listening" line.
    fn spawn(&mut self, port: Option<u16>) {
        let config = self.write_config();
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        let mut cmd = Command::new(bin_dir().join("sandcast"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(self.data.path())
            .env_remove("SANDCAST_API_KEY")
            // The harness's own switches, not server settings (the server
            // would warn that it ignores them).
            .env_remove("SANDCAST_E2E_VERBOSE")
            .env_remove("SANDCAST_E2E_CYCLES")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !self.opts.default_rate_limits {
            cmd.env("SANDCAST_RATE_LIMIT__API_REQUESTS", "100000");
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.args(&self.opts.args);
        let mut child = cmd.spawn().expect("spawn sandcast serve");
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (stream, tx) in [
            (Box::new(stdout) as Box<dyn Read + Send>, tx.clone()),
            (Box::new(stderr) as Box<dyn Read + Send>, tx),
        ] {
            let out = self.output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("SANDCAST_E2E_VERBOSE").is_some() {
                        eprintln!("server: {line}");
                    }
                    out.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let (scheme, addr) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1)
                        && let Some((scheme, rest)) = rest.split_once("://")
                    {
                        let addr = rest.split_whitespace().next().unwrap_or("");
                        break (scheme.to_string(), addr.to_string());
                    }
                }
                Err(_) => {
                    let status = self.child.as_mut().unwrap().try_wait();
                    panic!(
                        "sandcast serve did not print \"listening on\" (exit: {status:?}); output:\n{}",
                        self.output.lock().unwrap().join("\n")
                    );
                }
            }
        };
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("cannot parse the listening address {addr:?}"));
        if port == 0 {
            // The server printed the requested address, not the bound one:
            // choose a port ourselves.
            self.kill();
            let p = free_port();
            return self.spawn(Some(p));
        }
        self.port = port;
        self.base = format!("{scheme}://127.0.0.1:{port}");
        if let Some((_, key)) = self.opts.env.iter().find(|(k, _)| k == "SANDCAST_API_KEY") {
            self.api_key = key.clone();
            return;
        }
        let key_path = self.data.path().join("api_key");
        self.api_key = std::fs::read_to_string(&key_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", key_path.display()))
            .trim()
            .to_string();
        assert!(!self.api_key.is_empty(), "empty api_key file");
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the server and starts it again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(Some(port));
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Polls the server's output for a line containing `needle`; returns it.
    pub fn wait_output(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no line with {needle:?} in the server's output:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sandcast <args>` as a client of this server; returns
    /// (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(bin_dir().join("sandcast"));
        cmd.args(args)
            .env("SANDCAST_SERVER", &self.base)
            .env("SANDCAST_API_KEY", &self.api_key)
            .env_remove("SANDCAST_CA_CERT")
            .stdin(Stdio::null());
        if let Some(ca) = &self.opts.ca_cert {
            cmd.env("SANDCAST_CA_CERT", ca);
        }
        let out = cmd.output().expect("run sandcast");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The server's output so far.
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// A request with full control: method, path, headers, optional body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        self.try_raw(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Server::raw`], with transport errors returned.
    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Resp, String> {
        let url = format!("{}{}", self.base, path);
        let send = || {
            let req = ureq::http::Request::builder().method(method).uri(&url);
            let req = headers.iter().fold(req, |r, (k, v)| r.header(*k, *v));
            match body {
                Some(b) => self.agent.run(req.body(b.to_vec()).expect("request")),
                None => self.agent.run(req.body(()).expect("request")),
            }
        };
        // A connection the server closed after its last answer (it may, when
        // it refused a request before reading its body) fails the next
        // request sent on it; browsers and curl send an idempotent one again
        // on a new connection, and so does this.
        let idempotent = matches!(method, "GET" | "HEAD" | "PUT" | "DELETE");
        let result = match send() {
            Err(e) if idempotent && e.to_string().contains("Peer disconnected") => send(),
            r => r,
        };
        let mut resp = result.map_err(|e| format!("{method} {url}: {e}"))?;
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_lowercase(),
                    v.to_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap_or_default();
        Ok(Resp {
            status,
            headers,
            body: String::from_utf8(bytes.clone()).unwrap_or_default(),
            bytes,
        })
    }

    fn try_api(&self, method: &str, path: &str) -> Option<Resp> {
        let auth = format!("Bearer {}", self.api_key);
        self.try_raw(method, path, &[("authorization", auth.as_str())], None)
            .ok()
    }

    /// A request with the operator API key; `body` is sent as JSON.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let auth = format!("Bearer {}", self.api_key);
        let mut h = vec![("authorization", auth.as_str())];
        if body.is_some() {
            h.push(("content-type", "application/json"));
        }
        self.raw(method, path, &h, body.map(str::as_bytes))
    }

    /// Creates a session; panics unless the server answers 201.
    pub fn create(&self, body: &Value) -> Value {
        let r = self.api("POST", "/api/sessions", Some(&body.to_string()));
        assert_eq!(r.status, 201, "POST /api/sessions {body}: {r:?}");
        r.json()
    }

    /// `GET /api/sessions/{id}`.
    pub fn session(&self, id: &str) -> Value {
        let r = self.api("GET", &format!("/api/sessions/{id}"), None);
        assert_eq!(r.status, 200, "GET session {id}: {r:?}");
        r.json()
    }

    /// The ids of all sessions `GET /api/sessions` lists, page by page.
    pub fn session_ids(&self) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        let mut path = "/api/sessions?limit=1000".to_string();
        loop {
            let r = self.api("GET", &path, None);
            assert_eq!(r.status, 200, "GET {path}: {r:?}");
            let v = r.json();
            ids.extend(
                v["sessions"]
                    .as_array()
                    .expect("sessions array")
                    .iter()
                    .map(|s| s["id"].as_str().expect("id").to_string()),
            );
            match v["next"].as_str() {
                Some(next) => path = format!("/api/sessions?limit=1000&cursor={next}"),
                None => return ids,
            }
        }
    }

    /// The server's resident memory in KiB (`VmRSS` of /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
    }

    /// Polls the session until its state is `state`; panics on timeout or
    /// when it reaches a different final state first.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        self.wait_session(id, timeout, &format!("state {state}"), |s| {
            let st = s["state"].as_str().unwrap_or("");
            if st == state {
                return Some(true);
            }
            let terminal = matches!(st, "failed" | "stopped");
            terminal.then_some(false)
        })
    }

    /// Polls the session until `pred` says `Some(true)`; `Some(false)`
    /// (a state from which the wanted one cannot come) or the deadline panics.
    pub fn wait_session(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Value) -> Option<bool>,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.session(id);
            match pred(&s) {
                Some(true) => return s,
                Some(false) => panic!("session {id} can no longer reach {what}: {s:#}"),
                None => {}
            }
            if Instant::now() > deadline {
                panic!("session {id} did not reach {what} in {timeout:?}: {s:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes the session and waits until it is `stopped`.
    pub fn delete(&self, id: &str) -> Value {
        let r = self.api("DELETE", &format!("/api/sessions/{id}"), None);
        assert_eq!(r.status, 200, "DELETE {id}: {r:?}");
        let st = r.json()["state"].as_str().unwrap_or("").to_string();
        assert!(
            st == "stopping" || st == "stopped",
            "DELETE answered state {st:?}: {}",
            r.body
        );
        self.wait_state(id, "stopped", Duration::from_secs(20))
    }

    /// Opens the session's server-sent events; events arrive on the receiver.
    pub fn events(&self, id: &str) -> EventStream {
        let url = format!("{}/api/sessions/{id}/events", self.base);
        let agent = http_agent(self.opts.ca_cert.as_deref(), None);
        let resp = agent
            .get(&url)
            .header("authorization", &format!("Bearer {}", self.api_key))
            .header("accept", "text/event-stream")
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let reader = BufReader::new(resp.into_body().into_reader());
            let mut event = String::from("message");
            let mut data = String::new();
            for line in reader.lines().map_while(Result::ok) {
                if line.is_empty() {
                    if !data.is_empty() {
                        let v = serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                        if tx.send((event.clone(), v)).is_err() {
                            return;
                        }
                    }
                    event = "message".into();
                    data.clear();
                } else if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
        });
        EventStream { rx }
    }
}

impl Server {
    /// Sends a WebSocket upgrade request for `path` and returns the status
    /// code of the answer (101 when the upgrade was accepted).
    pub fn ws_handshake(&self, path: &str) -> u16 {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n\r\n",
            port = self.port
        )
        .expect("write handshake");
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .expect("read status line");
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        // Delete what a failed test left running, so the backend tears it
        // down (a killed server leaves network and cgroups to the next reap).
        if let Some(list) = self.try_api(
            "GET",
            "/api/sessions?limit=1000&state=starting,ready,stopping,failed",
        ) && list.status == 200
            && let Ok(v) = serde_json::from_str::<Value>(&list.body)
        {
            let live: Vec<String> = v["sessions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| !matches!(s["state"].as_str(), Some("stopped")))
                .filter_map(|s| s["id"].as_str().map(String::from))
                .collect();
            for id in &live {
                self.try_api("DELETE", &format!("/api/sessions/{id}"));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            for id in &live {
                while Instant::now() < deadline {
                    match self.try_api("GET", &format!("/api/sessions/{id}")) {
                        Some(r) if r.status == 200 && !r.body.contains("\"stopped\"") => {}
                        _ => break,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        self.terminate(Duration::from_secs(5));
    }
}

/// Events received, in order: `(event name, JSON data)`.
pub type Events = Vec<(String, Value)>;

/// Server-sent events of one session: `(event name, JSON data)`.
pub struct EventStream {
    rx: mpsc::Receiver<(String, Value)>,
}

impl EventStream {
    /// Waits for an event that `pred` accepts; returns it, or every event seen on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str, &Value) -> bool,
    ) -> Result<(String, Value), Vec<(String, Value)>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((e, v)) => {
                    if pred(&e, &v) {
                        return Ok((e, v));
                    }
                    seen.push((e, v));
                }
                Err(_) => return Err(seen),
            }
        }
    }

    /// Waits for the server to end the stream; every event until then, or
    /// (as the error) every event seen when `timeout` passed first.
    pub fn wait_closed(&self, timeout: Duration) -> Result<Events, Events> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => seen.push(ev),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(seen),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(seen),
            }
        }
    }
}

/// A child process (`xvfb`, `browser`, `vnc`, `launch`) from a session JSON.
pub fn child<'a>(session: &'a Value, name: &str) -> Option<&'a Value> {
    session["children"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// True when xvfb, browser and vnc all run with a pid (the browser may be
/// paused: nobody watched it for a while).
pub fn children_running(session: &Value) -> bool {
    ["xvfb", "browser", "vnc"].iter().all(|n| {
        child(session, n).is_some_and(|c| {
            let up = c["state"] == "running" || (*n == "browser" && c["state"] == "paused");
            up && c["pid"].as_u64().unwrap_or(0) > 0
        })
    })
}

/// A host process seen in /proc.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Host pid.
    pub pid: i32,
    /// Pids from the outermost to the innermost PID namespace (`NSpid`).
    pub ns_pids: Vec<i32>,
    /// `comm`.
    pub comm: String,
    /// Command line, arguments joined by spaces.
    pub cmdline: String,
    /// Contents of /proc/<pid>/cgroup.
    pub cgroup: String,
}

/// Every process on the host (those that vanish while reading are skipped).
pub fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let p = e.path();
        let Ok(status) = std::fs::read_to_string(p.join("status")) else {
            continue;
        };
        let ns_pids = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let comm = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let cmdline = std::fs::read(p.join("cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(p.join("cgroup")).unwrap_or_default();
        out.push(Proc {
            pid,
            ns_pids,
            comm,
            cmdline,
            cgroup,
        });
    }
    out
}

/// True when a cgroup file names a cgroup whose last component is `id`
/// (or a cgroup below it).
fn cgroup_mentions(cgroup: &str, id: &str) -> bool {
    cgroup.lines().any(|l| {
        let path = l.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|c| c == id)
    })
}

/// The processes of a session: in its cgroup, or naming its id on the command line.
pub fn session_processes(id: &str) -> Vec<Proc> {
    let me = std::process::id() as i32;
    processes()
        .into_iter()
        .filter(|p| p.pid != me && (cgroup_mentions(&p.cgroup, id) || p.cmdline.contains(id)))
        .collect()
}

/// The host process of a session whose pid, in any PID namespace, is `pid`
/// and whose comm/cmdline contains `name_hint`.
pub fn find_session_process(id: &str, pid: i32, name_hint: &str) -> Option<Proc> {
    session_processes(id).into_iter().find(|p| {
        (p.pid == pid || p.ns_pids.last() == Some(&pid))
            && (p.comm.contains(name_hint) || p.cmdline.contains(name_hint))
    })
}

/// The `sandcast-agent` process of a session.
pub fn agent_process(id: &str) -> Option<Proc> {
    processes().into_iter().find(|p| {
        (p.comm.starts_with("sandcast-agent")
            || p.cmdline
                .split(' ')
                .next()
                .unwrap_or("")
                .ends_with("sandcast-agent"))
            && (cgroup_mentions(&p.cgroup, id) || p.cmdline.contains(id))
    })
}

/// Sends SIGKILL to a host pid.
pub fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 {pid}: {e}"));
}

fn run_text(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cgroup_dirs_named(id: &str) -> Vec<PathBuf> {
    // Session cgroups live at <root>[/<controller>]/<parent>/<id>; walk three levels.
    let mut found = Vec::new();
    let mut level = vec![PathBuf::from("/sys/fs/cgroup")];
    for _ in 0..4 {
        let mut next = Vec::new();
        for d in &level {
            let Ok(rd) = std::fs::read_dir(d) else {
                continue;
            };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if e.file_name() == id {
                    found.push(e.path());
                } else {
                    next.push(e.path());
                }
            }
        }
        level = next;
    }
    found
}

/// Everything of session `id` still on the host: processes, mounts, cgroups,
/// network namespaces and links. Empty when the session left nothing.
pub fn leftovers(id: &str) -> Vec<String> {
    assert!(id.len() >= 8, "session id {id:?} too short to search for");
    let mut left = Vec::new();
    for p in session_processes(id) {
        left.push(format!("process {} ({}): {}", p.pid, p.comm, p.cmdline));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for l in mountinfo.lines().filter(|l| l.contains(id)) {
        left.push(format!("mount: {l}"));
    }
    for d in cgroup_dirs_named(id) {
        left.push(format!("cgroup {}", d.display()));
    }
    for l in run_text("ip", &["netns", "list"])
        .lines()
        .filter(|l| l.contains(id))
    {
        left.push(format!("netns {l}"));
    }
    for l in run_text("ip", &["-o", "link", "show"])
        .lines()
        .filter(|l| l.contains(id))
    {
        left.push(format!("link {l}"));
    }
    left
}

/// Polls [`leftovers`] until it is empty; returns what is left at the deadline.
pub fn wait_no_leftovers(id: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = leftovers(id);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Percent-encodes a page into a `data:text/html` URL (space, quotes,
/// brackets, `#`, `%` and everything outside printable ASCII).
pub fn data_url(html: &str) -> String {
    let mut s = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        // The set a URL parser would encode in an opaque path, plus '%' and
        // '#', so the URL stays short and survives being normalised.
        if b.is_ascii_graphic() && !br##""#%<>?`{}|\^"##.contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Background colours of the test page, as `#rrggbb`.
pub mod colours {
    /// The page as loaded.
    pub const START: &str = "#00c000";
    /// After a mouse button went down on the page.
    pub const CLICKED: &str = "#0000c0";
    /// After the text "hi" was typed.
    pub const TYPED: &str = "#c00000";
}

/// Viewer steps for [`input_page`]: the page shown, a click, "hi" typed.
pub fn input_steps() -> Value {
    serde_json::json!([
        { "expect": colours::START, "timeoutMs": 30000 },
        { "click": true },
        { "expect": colours::CLICKED },
        { "type": "hi" },
        { "expect": colours::TYPED },
    ])
}

/// A page that is green, turns blue on a click and red once "hi" is typed.
pub fn input_page() -> String {
    data_url(&format!(
        "<!doctype html><html><head><title>e2e</title><style>html,body{{margin:0;height:100%;background:{start}}}</style></head>\
         <body><script>let typed='';\
         addEventListener('mousedown',()=>{{document.body.style.background='{clicked}'}});\
         addEventListener('keydown',e=>{{typed+=e.key;if(typed.endsWith('hi'))document.body.style.background='{typed}'}});\
         </script></body></html>",
        start = colours::START,
        clicked = colours::CLICKED,
        typed = colours::TYPED,
    ))
}

/// Script for the test pages: `copy(v)` puts text `v` on the session's
/// clipboard (which the viewer mirrors), as the page's own copy would.
const COPY_JS: &str = "const copy=v=>{document.addEventListener('copy',c=>{c.clipboardData.setData('text/plain',v);c.preventDefault()},{once:true});document.execCommand('copy')};";

/// What the clipboard page copies when clicked.
pub const REMOTE_COPY: &str = "copied in the session ✓";
/// What the clipboard test pastes into the session.
pub const LOCAL_PASTE: &str = "pasted from the viewer ✓";

/// A page with a focused text area: green; a click copies [`REMOTE_COPY`]
/// to the session's clipboard and turns it blue; once [`LOCAL_PASTE`] is
/// pasted into the text area it turns red.
pub fn clipboard_page() -> String {
    clipboard_page_copying(&serde_json::to_string(REMOTE_COPY).unwrap())
}

/// [`clipboard_page`] whose click copies the value of the JavaScript
/// expression `copy_js` (e.g. `'a'.repeat(70000)`).
pub fn clipboard_page_copying(copy_js: &str) -> String {
    let js = |s: &str| serde_json::to_string(s).unwrap();
    data_url(&format!(
        "<!doctype html><html><head><title>clipboard</title><style>html,body{{margin:0;height:100%;background:{start}}}</style></head>\
         <body><textarea id=t autofocus style=\"position:absolute;left:0;top:0;width:200px;height:40px\"></textarea><script>\
         const t=document.getElementById('t');\
         {copy_js}addEventListener('mousedown',e=>{{e.preventDefault();\
           copy({copy});t.focus();document.body.style.background='{clicked}'}});\
         t.addEventListener('input',()=>{{if(t.value.includes({paste}))document.body.style.background='{typed}'}});\
         </script></body></html>",
        start = colours::START,
        clicked = colours::CLICKED,
        typed = colours::TYPED,
        copy = copy_js,
        copy_js = COPY_JS,
        paste = js(LOCAL_PASTE),
    ))
}

/// The key that makes the typing page copy what it received.
pub const TYPING_COPY_KEY: &str = "F8";
/// The key that makes the typing page copy the physical keys (`code`) of
/// the key presses it received, comma-separated.
pub const TYPING_CODES_KEY: &str = "F9";

/// A page with a focused text area that records what is typed into it: F8
/// copies the text area's value to the session's clipboard (which the
/// viewer mirrors), so a test compares what arrived character by
/// character; F9 copies the `code` of every key press. Green while empty,
/// red once something arrived.
pub fn typing_page() -> String {
    data_url(&format!(
        "<!doctype html><html><head><meta charset=utf-8><title>typing</title><style>html,body{{margin:0;height:100%;background:{start}}}</style></head>\
         <body><textarea id=t autofocus style=\"position:absolute;left:0;top:0;width:600px;height:80px\"></textarea><script>\
         const t=document.getElementById('t');\
         addEventListener('mousedown',e=>{{e.preventDefault();t.focus()}});\
         t.addEventListener('blur',()=>setTimeout(()=>t.focus(),0));\
         t.addEventListener('input',()=>{{document.body.style.background=t.value?'{typed}':'{start}'}});\
         const codes=[];{copy_js}\
         addEventListener('keydown',e=>{{const v=e.key==='{copy_key}'?t.value:e.key==='{codes_key}'?codes.join(','):null;\
           if(v===null){{codes.push(e.code);return}}e.preventDefault();copy(v)}});\
         </script></body></html>",
        start = colours::START,
        typed = colours::TYPED,
        copy_key = TYPING_COPY_KEY,
        codes_key = TYPING_CODES_KEY,
        copy_js = COPY_JS,
    ))
}

/// The key that makes the focus page copy how far it is scrolled.
pub const SCROLL_REPORT_KEY: &str = "F7";

/// A tall page with a text area at (100, 300), 400x60, not focused: green;
/// blue while the text area has the focus. F8 copies the text area's value
/// to the session's clipboard, F7 how far the page is scrolled (`scrollY`).
pub fn focus_page() -> String {
    data_url(&format!(
        "<!doctype html><html><head><meta charset=utf-8><title>focus</title><style>html,body{{margin:0;height:4000px;background:{start}}}</style></head>\
         <body><textarea id=t style=\"position:absolute;left:100px;top:300px;width:400px;height:60px;border:0;padding:0\"></textarea><script>\
         const t=document.getElementById('t');\
         t.addEventListener('focus',()=>{{document.body.style.background='{focused}'}});\
         t.addEventListener('blur',()=>{{document.body.style.background='{start}'}});\
         {copy_js}addEventListener('keydown',e=>{{const v=e.key==='{copy_key}'?t.value:e.key==='{scroll_key}'?String(Math.round(scrollY)):null;\
           if(v===null)return;e.preventDefault();copy(v)}});\
         </script></body></html>",
        start = colours::START,
        focused = colours::CLICKED,
        copy_key = TYPING_COPY_KEY,
        scroll_key = SCROLL_REPORT_KEY,
        copy_js = COPY_JS,
    ))
}

/// Inserts a query string (`mode=vnc`) into a viewer URL before its fragment.
pub fn with_query(viewer_url: &str, query: &str) -> String {
    match viewer_url.split_once('#') {
        Some((a, frag)) => {
            let sep = if a.contains('?') { '&' } else { '?' };
            format!("{a}{sep}{query}#{frag}")
        }
        None => format!("{viewer_url}?{query}"),
    }
}

/// Runs `browser/<script>` with node and one JSON argument; returns the
/// JSON of its `RESULT` line, panicking with its output when there is none.
pub fn run_browser(script: &str, arg: &Value) -> Value {
    let dir = browser_dir();
    let out = Command::new("node")
        .arg(dir.join(script))
        .arg(arg.to_string())
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running node {script} (is Node installed?): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match stdout.lines().rev().find_map(|l| l.strip_prefix("RESULT ")) {
        Some(r) => serde_json::from_str(r).unwrap_or_else(|e| panic!("bad RESULT line {r:?}: {e}")),
        None => panic!(
            "node {script} printed no RESULT line ({}); stdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        ),
    }
}

/// Runs the viewer script and asserts every step passed; returns its result.
pub fn run_viewer(arg: &Value) -> Value {
    let r = run_browser("e2e-viewer.mjs", arg);
    assert!(
        r["ok"] == true,
        "viewer scenario failed: {r:#}\nscenario: {arg:#}"
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_escape_everything_that_matters() {
        let u = data_url("<a href='#x'>100%</a>");
        assert!(u.starts_with("data:text/html;charset=utf-8,"));
        assert!(!u[29..].contains('#') && !u[29..].contains('<'), "{u}");
        assert!(u.contains("100%25"));
        assert!(u.contains("%3Ca%20href='%23x'%3E"), "{u}");
    }

    #[test]
    fn query_goes_before_the_fragment() {
        assert_eq!(
            with_query("http://h/viewer/a#token=t", "mode=vnc"),
            "http://h/viewer/a?mode=vnc#token=t"
        );
        assert_eq!(
            with_query("http://h/v?x=1#t", "mode=vnc"),
            "http://h/v?x=1&mode=vnc#t"
        );
        assert_eq!(with_query("http://h/v", "mode=vnc"), "http://h/v?mode=vnc");
    }

    #[test]
    fn cgroup_lines_match_whole_components_only() {
        let cg = "4:memory:/sandcast/abc12345\n0::/user.slice\n";
        assert!(cgroup_mentions(cg, "abc12345"));
        assert!(!cgroup_mentions(cg, "abc1234"));
        assert!(!cgroup_mentions("0::/sandcast/abc12345x", "abc12345"));
    }

    #[test]
    fn own_process_is_visible_with_its_namespace_pids() {
        let me = std::process::id() as i32;
        let p = processes()
            .into_iter()
            .find(|p| p.pid == me)
            .expect("self in /proc");
        assert_eq!(p.ns_pids.first(), Some(&me));
    }

    #[test]
    fn an_unknown_id_has_no_leftovers() {
        assert!(leftovers("no-such-session-0000").is_empty());
    }
}

//! Server configuration: embedded defaults, then a TOML file, then
//! `SANDCAST_*` environment variables, then command-line flags.
//!
//! Only variables that name a setting are configuration (`SANDCAST_LISTEN`,
//! `SANDCAST_RATE_LIMIT__API_REQUESTS`); the others with the prefix belong to
//! something else (`SANDCAST_LOG`, the client's `SANDCAST_SERVER`, test
//! switches) and are left alone, see [`is_setting`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::capacity::HostSize;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP address (HTTPS when `tls_cert` and `tls_key` are set).
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first); with `tls_key`, the server speaks
    /// HTTPS only, and reloads both files when they change.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// SQLite file, session folders, logs, the generated API key.
    pub data_dir: PathBuf,
    /// Base of `viewer_url`; empty means the scheme and Host of the request.
    pub public_url: String,
    /// Operator API key; empty means generated into `<data_dir>/api_key`.
    pub api_key: String,
    /// `sandbox` or `firecracker`.
    pub backend: String,
    /// The agent binary; empty means `sandcast-agent` beside this executable.
    pub agent_binary: PathBuf,
    /// Most sessions alive at once; 0 (the default) means as many as the
    /// host's memory (less a reserve) holds at `session.memory_mib` each,
    /// at most four per CPU.
    pub max_sessions: usize,
    /// Defaults for new sessions.
    pub session: SessionDefaults,
    /// The browser inside sessions.
    pub browser: BrowserSettings,
    /// Request rate limits.
    pub rate_limit: RateLimits,
    /// Named presets for `POST /api/auth/start`.
    pub providers: BTreeMap<String, Provider>,
    /// The WebRTC gateway.
    pub webrtc: WebRtcSettings,
    /// Host isolation shared by both backends: address pool, egress policy,
    /// DNS, cgroups, names.
    pub host: sandcast_host::HostConfig,
    /// Sandbox backend settings.
    pub sandbox: sandcast_sandbox::SandboxConfig,
    /// Firecracker backend settings (see docs/firecracker.md).
    pub firecracker: FirecrackerSettings,
    /// How long ended sessions are kept.
    pub retention: Retention,
    /// What a session may write on the host: its log files and events.
    pub logs: LogLimits,
    /// What one session's agent channel may cost the server.
    pub agent_channel: AgentChannelLimits,
    /// Files in and out of sessions, and what completed sessions leave.
    pub files: FileLimits,
    /// `[[webhooks]]`: endpoints told of session events (see
    /// [`crate::webhooks`]).
    pub webhooks: Vec<Webhook>,
    /// How webhook deliveries are retried.
    pub webhook_retry: WebhookRetry,
    /// Automation clients on a session's DevTools endpoint.
    pub cdp: CdpLimits,
    /// Recordings of sessions created with `record: true`.
    pub recording: RecordingSettings,
    /// The session store: empty for the SQLite file in `data_dir` (one
    /// host), or a PostgreSQL URL (`postgres://user:password@host/db`)
    /// shared by the nodes of a cluster.
    pub store: String,
    /// The secret node-to-node requests carry (at least 32 characters, the
    /// same on every node); needed with a PostgreSQL store.
    pub cluster_secret: String,
    /// This node, when `store` is PostgreSQL.
    pub cluster: ClusterSettings,
}

/// `[cluster]`: this server as a node of a cluster (a PostgreSQL `store`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's id; empty means the host name and the instance id.
    pub node_id: String,
    /// Where other nodes reach this node's API; empty means the listen
    /// address (this host's address when listening on every address).
    pub api_url: String,
    /// Seconds between heartbeats.
    pub heartbeat_seconds: u64,
    /// Seconds without a heartbeat after which a node is lost: its
    /// sessions fail with reason "node lost".
    pub lost_after_seconds: u64,
    /// Placement picks the freest of this many random nodes.
    pub candidates: usize,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            node_id: String::new(),
            api_url: String::new(),
            heartbeat_seconds: 2,
            lost_after_seconds: 15,
            candidates: 2,
        }
    }
}

/// The shortest `cluster_secret`.
pub const MIN_CLUSTER_SECRET: usize = 32;

/// `[cdp]`: automation clients on `/api/sessions/{id}/cdp`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CdpLimits {
    /// Largest DevTools message either way, in MiB (a full-page screenshot
    /// of a large page comes as one message).
    pub max_message_mib: u64,
    /// Automation clients connected to one session at once.
    pub clients_per_session: usize,
}

impl Default for CdpLimits {
    fn default() -> Self {
        CdpLimits {
            max_message_mib: 64,
            clients_per_session: 4,
        }
    }
}

/// The longest a recording may be kept: 90 days.
pub const MAX_RECORDING_TTL: u64 = 90 * 86_400;

/// `[recording]`: how long recordings are kept and how much disk they may
/// use (see [`crate::recording`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordingSettings {
    /// Seconds a recording is kept after its session ended; a session's
    /// `recording_ttl_seconds` may shorten it.
    pub ttl_seconds: u64,
    /// Most MiB of one recording; past it the recording stops (the
    /// session goes on).
    pub max_mib: u64,
    /// Most MiB of every recording together in `<data_dir>/recordings`;
    /// past it, recordings stop.
    pub disk_mib: u64,
    /// Milliseconds between the key frames the server asks for while
    /// recording: each starts a fragment, and a crash loses at most the
    /// fragment being written.
    pub fragment_ms: u64,
}

impl Default for RecordingSettings {
    fn default() -> Self {
        RecordingSettings {
            ttl_seconds: 86_400,
            max_mib: 1024,
            disk_mib: 10 * 1024,
            fragment_ms: 2000,
        }
    }
}

/// `[files]`: the files API and the files a completed session leaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileLimits {
    /// Largest file read, written or archived through the files API, in MiB.
    pub max_mib: u64,
    /// Most bytes of collected files one session leaves, all together, in KiB.
    pub result_max_kib: u64,
    /// Seconds a completed session's collected files are kept by default.
    pub result_ttl_seconds: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_mib: 1024,
            result_max_kib: 16 * 1024,
            result_ttl_seconds: 600,
        }
    }
}

/// `[[webhooks]]`: an endpoint that session events are POSTed to, signed
/// with its secret.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// Where events are POSTed: an `http` or `https` URL.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Sandcast-Signature`, at least
    /// [`Webhook::MIN_SECRET`] bytes. Never logged.
    pub secret: String,
    /// Which events it gets, of [`crate::webhooks::EVENTS`]; all when not given.
    #[serde(default = "Webhook::all_events")]
    pub events: Vec<String>,
}

impl Webhook {
    /// The shortest secret accepted, in bytes.
    pub const MIN_SECRET: usize = 16;

    fn all_events() -> Vec<String> {
        crate::webhooks::EVENTS
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    /// Whether it subscribed to `event`.
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    /// Rejects what cannot work, naming the key (`webhooks[i].…`).
    fn check(&self, i: usize) -> Result<(), String> {
        let uri: axum::http::Uri = self
            .url
            .parse()
            .map_err(|e| format!("webhooks[{i}].url {:?}: {e}", self.url))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "webhooks[{i}].url {:?} must be an http:// or https:// URL with a host",
                self.url
            ));
        }
        if self.secret.len() < Webhook::MIN_SECRET {
            return Err(format!(
                "webhooks[{i}].secret must be at least {} bytes",
                Webhook::MIN_SECRET
            ));
        }
        if self.events.is_empty() {
            return Err(format!(
                "webhooks[{i}].events is empty; leave it out for every event"
            ));
        }
        for e in &self.events {
            if !crate::webhooks::EVENTS.contains(&e.as_str()) {
                return Err(format!(
                    "webhooks[{i}].events: {e:?} is not one of {}",
                    crate::webhooks::EVENTS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .finish()
    }
}

/// `[webhook_retry]`: when a delivery that was not acknowledged (an answer
/// other than 2xx, a connection error, a timeout) is tried again: after
/// `first_ms`, then twice as long each time up to `max_ms`, until
/// `give_up_seconds` after the event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookRetry {
    /// The wait after the first failed attempt, in milliseconds.
    pub first_ms: u64,
    /// The longest wait between attempts, in milliseconds.
    pub max_ms: u64,
    /// Seconds after the event when a delivery is given up (`failed`).
    pub give_up_seconds: u64,
    /// How long one attempt may take, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for WebhookRetry {
    fn default() -> Self {
        WebhookRetry {
            first_ms: 1000,
            max_ms: 3600 * 1000,
            give_up_seconds: 24 * 3600,
            timeout_ms: 10_000,
        }
    }
}

/// `[agent_channel]`: bounds on each session's agent connections. Everything
/// from inside a session is hostile, so these cap what one session can make
/// the server hold: memory `buffer_kib` (plus a few KiB per waiting
/// connection) and file descriptors `3 + pending + streams`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentChannelLimits {
    /// Bytes of incoming frames the server buffers for one session at once,
    /// over all its connections, in KiB. A frame announced larger than this
    /// (or than the session's display can need) closes its connection.
    pub buffer_kib: u32,
    /// Connections that have not yet said hello, per session; more are
    /// closed as they arrive.
    pub pending: u32,
    /// Stream connections (VNC) asked for and not yet arrived, per session.
    pub streams: u32,
}

impl Default for AgentChannelLimits {
    fn default() -> Self {
        AgentChannelLimits {
            buffer_kib: 4096,
            pending: 4,
            streams: 8,
        }
    }
}

/// `[retention]`: how long a stopped or failed session's row, events and
/// log files are kept before they are removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Seconds after a session ended (stopped or failed).
    pub seconds: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            seconds: 7 * 24 * 3600,
        }
    }
}

/// `[logs]`: per-session limits on what reaches the host's disk. Lines and
/// events beyond them are dropped and counted, never queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogLimits {
    /// Log bytes a second a session may write, on average.
    pub rate_bytes_per_second: u64,
    /// Log bytes a session may write at once above the rate.
    pub burst_bytes: u64,
    /// Most bytes of a session's log on disk, the current file and the one
    /// previous file together; the current file is rotated at half of it.
    pub max_bytes: u64,
    /// Child and display events a second the agent may have stored.
    pub events_per_second: u32,
    /// Events the agent may have stored at once above that rate.
    pub events_burst: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            rate_bytes_per_second: 64 * 1024,
            burst_bytes: 1024 * 1024,
            max_bytes: 16 * 1024 * 1024,
            events_per_second: 10,
            events_burst: 100,
        }
    }
}

/// Defaults and limits for sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionDefaults {
    /// Display width.
    pub width: u32,
    /// Display height.
    pub height: u32,
    /// Widest display a viewer may resize a session to; Xvfb allocates its
    /// framebuffer for `max_width` x `max_height` (4 bytes a pixel) whatever
    /// size is in use, so this is memory every session pays. A viewer
    /// asking for more gets this. A session created larger gets its own
    /// size.
    pub max_width: u32,
    /// Tallest display a viewer may resize a session to (see `max_width`).
    pub max_height: u32,
    /// Lifetime of a session.
    pub ttl_seconds: u64,
    /// A session nobody watches for this long stops.
    pub idle_timeout_seconds: u64,
    /// Page the browser opens.
    pub start_url: String,
    /// Where sessions' outbound traffic may go: `"internet"`, `"none"` or a
    /// list of networks (`true`/`false` read as `"internet"`/`"none"`).
    pub egress: sandcast_backend::Egress,
    /// Memory limit per session; by default 2048 or what the host can
    /// spare, whichever is less.
    pub memory_mib: u64,
    /// CPU limit per session in thousandths of a core; by default 2000 or
    /// the host's CPUs, whichever is less.
    pub cpu_millis: u32,
    /// Process limit per session.
    pub pids: u32,
    /// Longest wait for a session to become ready.
    pub start_timeout_seconds: u64,
    /// Seconds without any viewer after which the session's browser is
    /// paused (no rendering, no CPU; a launch command runs on); a viewer
    /// resumes it at once. 0 never pauses.
    pub pause_unwatched_seconds: u64,
    /// Size of a user's profile (its quota), in MiB, when it is made.
    pub profile_mib: u64,
    /// Sessions kept started ahead of any request (the warm pool): a
    /// create that fits one (the default size, egress and kiosk setting,
    /// no profile, keyboard layout or recording) is ready in the time a
    /// tab takes to open. Each costs an idle session's memory; pooled
    /// sessions count toward `max_sessions` and give way to a create that
    /// needs the room. 0: none.
    pub pool_size: usize,
    /// Pooled sessions' browsers are in kiosk mode (no tabs or address
    /// bar): only kiosk requests fit them then. Set it to what the
    /// operator's requests ask for.
    pub pool_kiosk: bool,
}

impl Default for SessionDefaults {
    fn default() -> Self {
        let host = HostSize::detect();
        SessionDefaults {
            width: 1280,
            height: 720,
            // A 1440p or 16:10 laptop screen filled by the viewer, at 16 MiB
            // a session; 3840x2160 costs 32 MiB.
            max_width: 2560,
            max_height: 1600,
            ttl_seconds: 3600,
            idle_timeout_seconds: 900,
            start_url: "about:blank".into(),
            egress: sandcast_backend::Egress::Internet,
            memory_mib: host.session_memory_mib(),
            cpu_millis: host.session_cpu_millis(),
            pids: 1024,
            start_timeout_seconds: 60,
            pause_unwatched_seconds: 10,
            profile_mib: 512,
            pool_size: 0,
            pool_kiosk: false,
        }
    }
}

/// Browser binary and flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrowserSettings {
    /// Path inside the session.
    pub binary: String,
    /// Extra flags.
    pub extra_args: Vec<String>,
    /// Let the browser draw each frame as soon as it is ready rather than on
    /// its own 60 Hz timer (`--disable-frame-rate-limit`). Off by default:
    /// on the 60 Hz timer a page animating without pause costs a third of
    /// the CPU at the same WebRTC latency (docs/benchmarks.md); on, the
    /// canvas fallbacks (WebSocket stream, noVNC) keep a lower p50.
    pub low_latency: bool,
    /// URLs the browser refuses to open (Chromium's `URLBlocklist` managed
    /// policy): by default local files, Chromium's own pages and `about:`.
    pub blocked_urls: Vec<String>,
    /// Exceptions to `blocked_urls` (`URLAllowlist`): by default `about:blank`.
    pub allowed_urls: Vec<String>,
}

impl BrowserSettings {
    /// The flags sessions get beyond the agent's own: the low-latency flag
    /// when on, then `extra_args`.
    pub fn session_args(&self) -> Vec<String> {
        let mut args = Vec::with_capacity(self.extra_args.len() + 1);
        if self.low_latency {
            args.push("--disable-frame-rate-limit".to_owned());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl Default for BrowserSettings {
    fn default() -> Self {
        let policy = sandcast_proto::BrowserPolicy::default();
        BrowserSettings {
            binary: "/usr/bin/chromium".into(),
            extra_args: Vec::new(),
            low_latency: false,
            blocked_urls: policy.blocked_urls,
            allowed_urls: policy.allowed_urls,
        }
    }
}

impl BrowserSettings {
    /// The URL filters as the backend takes them.
    pub fn policy(&self) -> sandcast_proto::BrowserPolicy {
        sandcast_proto::BrowserPolicy {
            blocked_urls: self.blocked_urls.clone(),
            allowed_urls: self.allowed_urls.clone(),
        }
    }
}

/// Request rate limits: per API key for requests that carry it, per client
/// address for the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Requests to `/api/*` (but `/api/webrtc/*`) without a valid API key,
    /// per client address (IPv6: per /64), per window.
    pub api_requests: u32,
    /// The window of `api_requests`.
    pub api_window_seconds: u64,
    /// Requests to `/api/*` (but `/api/webrtc/*`) with the API key, per
    /// window; they never spend an address's `api_requests`.
    pub key_requests: u32,
    /// The window of `key_requests`.
    pub key_window_seconds: u64,
    /// Requests to `/api/webrtc/*`, `/viewer/*` and `/assets/*` per client
    /// address per minute.
    pub webrtc_per_minute: u32,
    /// Reverse proxies (CIDRs) whose `Forwarded` / `X-Forwarded-For` name the
    /// client; empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            api_requests: 100,
            api_window_seconds: 900,
            key_requests: 6_000,
            key_window_seconds: 60,
            webrtc_per_minute: 10_000,
            trusted_proxies: Vec::new(),
        }
    }
}

/// A named preset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Page the browser opens.
    pub start_url: String,
    /// Optional command beside the browser.
    #[serde(default)]
    pub launch: Option<Vec<String>>,
    /// `"launch_exit"`: the launch command's exit completes the session.
    #[serde(default)]
    pub complete_on: Option<crate::store::CompleteOn>,
    /// What a non-zero exit makes of the session: `"failed"` (default) or
    /// `"completed"`.
    #[serde(default)]
    pub nonzero_exit: Option<crate::store::NonzeroExit>,
    /// Paths in the session's home copied out when it completes.
    #[serde(default)]
    pub collect: Vec<String>,
    /// Seconds the collected files are kept (default `[files]`'s).
    #[serde(default)]
    pub result_ttl_seconds: Option<u64>,
    /// The user's profile is the session's home (`profile: true`).
    #[serde(default)]
    pub persist: bool,
    /// Downloads and file choosers reach the viewer (default true).
    #[serde(default)]
    pub transfers: Option<bool>,
    /// The session's video is recorded (`record: true`).
    #[serde(default)]
    pub record: bool,
}

/// Gateway sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebRtcSettings {
    /// Turn the gateway on.
    pub enabled: bool,
    /// UDP port for every session and viewer.
    pub udp_bind: SocketAddr,
    /// ICE-TCP port; unset disables it.
    pub tcp_bind: Option<SocketAddr>,
    /// Addresses advertised as host candidates; empty: the host's own.
    pub public_ips: Vec<IpAddr>,
    /// STUN/TURN servers handed to viewers (`iceServers` entries).
    pub ice_servers: Vec<serde_json::Value>,
    /// A TURN server with a shared secret: viewers get short-lived
    /// credentials for it (the TURN REST scheme).
    pub turn: Option<TurnSettings>,
    /// The most video frames a session sends a second (1 to 240).
    pub max_fps: u32,
    /// How H.264 is encoded: `camera` (the least time a frame) or `screen`
    /// (the fewest bits on scrolling text).
    pub h264_tuning: sandcast_proto::H264Tuning,
}

impl Default for WebRtcSettings {
    fn default() -> Self {
        WebRtcSettings {
            enabled: true,
            udp_bind: "0.0.0.0:3478".parse().unwrap(),
            tcp_bind: Some("0.0.0.0:3478".parse().unwrap()),
            public_ips: Vec::new(),
            ice_servers: Vec::new(),
            turn: None,
            max_fps: 60,
            h264_tuning: sandcast_proto::H264Tuning::Camera,
        }
    }
}

/// `[webrtc.turn]`: a TURN server sharing a secret with sandcast (coturn's
/// `use-auth-secret` / `static-auth-secret`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnSettings {
    /// Its URLs, e.g. `turn:turn.example.com:3478?transport=udp`.
    pub urls: Vec<String>,
    /// The shared secret.
    pub shared_secret: String,
    /// How long a handed-out credential is valid.
    #[serde(default = "TurnSettings::default_ttl")]
    pub credential_ttl_seconds: u64,
}

impl TurnSettings {
    fn default_ttl() -> u64 {
        3600
    }
}

impl std::fmt::Debug for TurnSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSettings")
            .field("urls", &self.urls)
            .field("shared_secret", &"<redacted>")
            .field("credential_ttl_seconds", &self.credential_ttl_seconds)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            tls_cert: None,
            tls_key: None,
            data_dir: "/var/lib/sandcast".into(),
            public_url: String::new(),
            api_key: String::new(),
            backend: "sandbox".into(),
            agent_binary: PathBuf::new(),
            max_sessions: 0,
            session: SessionDefaults::default(),
            browser: BrowserSettings::default(),
            rate_limit: RateLimits::default(),
            providers: BTreeMap::new(),
            webrtc: WebRtcSettings::default(),
            host: sandcast_host::HostConfig::default(),
            sandbox: sandcast_sandbox::SandboxConfig::default(),
            firecracker: FirecrackerSettings::default(),
            retention: Retention::default(),
            logs: LogLimits::default(),
            agent_channel: AgentChannelLimits::default(),
            files: FileLimits::default(),
            webhooks: Vec::new(),
            webhook_retry: WebhookRetry::default(),
            cdp: CdpLimits::default(),
            recording: RecordingSettings::default(),
            store: String::new(),
            cluster_secret: String::new(),
            cluster: ClusterSettings::default(),
        }
    }
}

/// Keys of earlier versions that moved, with what replaces them.
const MOVED_KEYS: &[(&str, &str)] = &[
    (
        "sandbox.subnet",
        "host.subnet (one address pool for both backends)",
    ),
    ("sandbox.name_prefix", "host.name_prefix"),
    ("sandbox.cgroup_parent", "host.cgroup_parent"),
    ("sandbox.cgroup_root", "host.cgroup_root"),
    ("sandbox.dns", "host.dns"),
    ("sandbox.ip", "host.ip"),
    ("sandbox.nft", "host.nft"),
    (
        "sandbox.uid_range",
        "host.uid_range (one uid range for both backends)",
    ),
    (
        "firecracker.jailer.uid",
        "host.uid_range (each session's Firecracker runs as a uid of its own)",
    ),
    (
        "firecracker.jailer.gid",
        "host.uid_range (each session's Firecracker runs as a uid and gid of its own)",
    ),
    (
        "sandbox.egress_deny",
        "nothing: every private and reserved range is closed to sessions now; open one with host.egress_allow",
    ),
];

/// Firecracker backend settings; unset values take the backend's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirecrackerSettings {
    /// The `firecracker` binary.
    pub firecracker_bin: Option<PathBuf>,
    /// Uncompressed guest kernel.
    pub kernel: Option<PathBuf>,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// The kernel's `.config`, checked when given.
    pub kernel_config: Option<PathBuf>,
    /// Root drive (ext4).
    pub rootfs: Option<PathBuf>,
    /// Image directory made by `sandcast image build`.
    pub image: Option<PathBuf>,
    /// Where the ready-VM snapshot lives; sessions restore from it.
    pub snapshot_dir: Option<PathBuf>,
    /// Size of each session's writable drive.
    pub writable_drive_mib: Option<u64>,
    /// Run Firecracker under its jailer; absent: not jailed.
    pub jailer: Option<JailerSettings>,
}

/// `[firecracker.jailer]`: running each microVM's Firecracker under its
/// `jailer`; unset values take the defaults of
/// [`sandcast_firecracker::JailerConfig`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailerSettings {
    /// The `jailer` binary.
    pub jailer_bin: Option<PathBuf>,
    /// Where the jails are built.
    pub chroot_base_dir: Option<PathBuf>,
}

impl JailerSettings {
    /// The backend's jailer configuration.
    pub fn to_backend(&self) -> sandcast_firecracker::JailerConfig {
        let mut c = sandcast_firecracker::JailerConfig::default();
        if let Some(v) = &self.jailer_bin {
            c.jailer_bin = v.clone();
        }
        if let Some(v) = &self.chroot_base_dir {
            c.chroot_base_dir = v.clone();
        }
        c
    }
}

impl FirecrackerSettings {
    /// The backend's configuration.
    pub fn to_backend(&self) -> sandcast_firecracker::FirecrackerConfig {
        let mut c = sandcast_firecracker::FirecrackerConfig::default();
        if let Some(v) = &self.firecracker_bin {
            c.firecracker_bin = v.clone();
        }
        if let Some(v) = &self.kernel {
            c.kernel = v.clone();
        }
        c.initramfs = self.initramfs.clone();
        c.kernel_config = self.kernel_config.clone();
        if let Some(v) = &self.rootfs {
            c.rootfs = v.clone();
        }
        c.image = self.image.clone();
        c.snapshot_dir = self.snapshot_dir.clone();
        if let Some(v) = self.writable_drive_mib {
            c.writable_drive_mib = v;
        }
        c.jailer = self.jailer.as_ref().map(JailerSettings::to_backend);
        c
    }
}

/// Whether the environment variable `SANDCAST_<key>` (figment's key: the
/// rest of the name, lower-cased, `__` made `.`) is a setting: its first
/// part names a top-level key, and a table is only set key by key. Every
/// other `SANDCAST_*` variable is someone else's (`SANDCAST_LOG`, the
/// client's `SANDCAST_SERVER`, `SANDCAST_FIRECRACKER` of the benchmarks) and
/// must not stop the server from starting.
pub fn is_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let (top, nested) = match key.split_once('.') {
        Some((top, _)) => (top, true),
        None => (key.as_str(), false),
    };
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    match defaults.get(top) {
        Some(serde_json::Value::Object(_)) => nested,
        Some(_) => !nested,
        None => false,
    }
}

/// `SANDCAST_*` variables of other parts of sandcast: the log filter and the
/// client's server URL and CA, the tests' switch (`SANDCAST_API_KEY` and `SANDCAST_DATA_DIR` mean the
/// same to the client and the server).
pub const RESERVED_ENV: [&str; 4] = [
    "SANDCAST_LOG",
    "SANDCAST_SERVER",
    "SANDCAST_CA_CERT",
    // The tests' switch: PostgreSQL tests fail rather than skip.
    "SANDCAST_REQUIRE_POSTGRES",
];

/// `SANDCAST_*` variables in the environment that are neither settings nor
/// reserved, so ignored: worth a warning, they may be misspelt settings.
pub fn ignored_env() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.get(..9)
                .is_some_and(|p| p.eq_ignore_ascii_case("SANDCAST_"))
                && !RESERVED_ENV.iter().any(|r| r.eq_ignore_ascii_case(k))
                && !is_setting(&k[9..].replace("__", "."))
        })
        .collect()
}

/// The default configuration file, read when it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/sandcast/sandcast.toml";

impl Config {
    /// Loads defaults, `file` (or the default file when it exists), the
    /// environment, then `overrides` (flags), and checks the result.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let mut read = None;
        match file {
            Some(f) => {
                if !f.exists() {
                    return Err(format!("config file {} does not exist", f.display()));
                }
                fig = fig.merge(Toml::file(f));
                read = Some(f.to_path_buf());
            }
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                fig = fig.merge(Toml::file(DEFAULT_CONFIG_FILE));
                read = Some(DEFAULT_CONFIG_FILE.into());
            }
            None => {}
        }
        fig = fig
            .merge(
                Env::prefixed("SANDCAST_")
                    .split("__")
                    .filter(|k| is_setting(k.as_str())),
            )
            .merge(overrides);
        for (old, new) in MOVED_KEYS {
            if fig.find_value(old).is_ok() {
                return Err(format!("{old} is no longer read; use {new}"));
            }
        }
        let mut config: Config = fig.extract().map_err(|e| e.to_string())?;
        // It can hold the API key: sessions must not read it.
        if let Some(f) = read {
            let f = std::fs::canonicalize(&f).unwrap_or(f);
            if !config.sandbox.hide_paths.contains(&f) {
                config.sandbox.hide_paths.push(f);
            }
        }
        config.fill_derived(&HostSize::detect());
        config.check()?;
        Ok(config)
    }

    /// Settings that follow from others (and from the host) unless set.
    fn fill_derived(&mut self, host: &HostSize) {
        let default_state = sandcast_sandbox::SandboxConfig::default().state_dir;
        if self.sandbox.state_dir == default_state {
            self.sandbox.state_dir = self.data_dir.join("sandbox");
        }
        if !self.sandbox.hide_paths.contains(&self.data_dir) {
            self.sandbox.hide_paths.push(self.data_dir.clone());
        }
        self.sandbox.browser_policy = self.browser.policy();
        if self.max_sessions == 0 {
            self.max_sessions = host.max_sessions(self.session.memory_mib);
        }
        // All sessions together get what max_sessions promises, never more
        // than the host can spare.
        if self.sandbox.sessions_memory_mib == 0 {
            self.sandbox.sessions_memory_mib = (self.max_sessions as u64)
                .saturating_mul(self.session.memory_mib)
                .min(host.sessions_mib());
        }
        // An empty path (e.g. `SANDCAST_TLS_CERT=`) means unset.
        for p in [&mut self.tls_cert, &mut self.tls_key] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *p = None;
            }
        }
    }

    /// Whether the store is PostgreSQL: this server is a node of a cluster.
    pub fn clustered(&self) -> bool {
        self.store.starts_with("postgres://") || self.store.starts_with("postgresql://")
    }

    /// The certificate and key files when TLS is configured.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    /// The scheme clients reach the server with: `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls_files().is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Why listening beyond loopback without TLS is a risk, when it is the case.
    pub fn plain_http_warning(&self) -> Option<String> {
        if self.tls_files().is_some() || self.listen.ip().is_loopback() {
            return None;
        }
        Some(format!(
            "listening on {} beyond loopback without TLS: the API key and every viewer \
             (its token, video and input) cross the network in clear, and a viewer opened \
             over plain HTTP from another machine is not a secure context, so the browser \
             hides the clipboard API from it; set tls_cert and tls_key, or listen on \
             127.0.0.1 behind a TLS proxy",
            self.listen
        ))
    }

    /// A warning when the configuration promises sessions more memory than
    /// this host has (less a reserve for itself), for `sandcast doctor`.
    pub fn overcommit_warning(&self) -> Option<String> {
        HostSize::detect().overcommit(self.max_sessions, self.session.memory_mib)
    }

    /// The host isolation settings with this server's instance id, derived
    /// from its data directory.
    pub fn host_config(&self) -> sandcast_host::HostConfig {
        sandcast_host::HostConfig {
            instance: sandcast_host::instance_id(&self.data_dir),
            ..self.host.clone()
        }
    }

    /// Rejects values that cannot work, naming them.
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.backend.as_str(), "sandbox" | "firecracker") {
            return Err(format!(
                "backend {:?} is not one of \"sandbox\", \"firecracker\"",
                self.backend
            ));
        }
        crate::limits::check_size(self.session.width, self.session.height)
            .map_err(|e| format!("session size: {e}"))?;
        crate::limits::check_size(self.session.max_width, self.session.max_height)
            .map_err(|e| format!("session.max_width/max_height: {e}"))?;
        crate::limits::check_url(&self.session.start_url)
            .map_err(|e| format!("session.start_url: {e}"))?;
        for (name, p) in &self.providers {
            crate::limits::check_url(&p.start_url)
                .map_err(|e| format!("providers.{name}.start_url: {e}"))?;
            crate::limits::check_outcome(
                p.launch.as_deref(),
                p.complete_on,
                &p.collect,
                p.result_ttl_seconds,
            )
            .map_err(|(field, e)| format!("providers.{name}.{field}: {e}"))?;
        }
        if self.clustered() {
            if self.cluster_secret.len() < MIN_CLUSTER_SECRET {
                return Err(format!(
                    "cluster_secret: a PostgreSQL store makes this server a node of a cluster, \
                     and its nodes need a shared secret of at least {MIN_CLUSTER_SECRET} characters \
                     (e.g. `openssl rand -hex 32`)"
                ));
            }
            if self.api_key.is_empty() {
                return Err(
                    "api_key: every node of a cluster answers the API, so they need \
                    the same api_key; set it (a PostgreSQL store is configured)"
                        .into(),
                );
            }
            if self.session.pool_size > 0 {
                return Err(
                    "session.pool_size: a node of a cluster keeps no pool yet; set it to 0 \
                    or use the SQLite store"
                        .into(),
                );
            }
            let c = &self.cluster;
            if c.heartbeat_seconds == 0 || c.lost_after_seconds < 2 * c.heartbeat_seconds {
                return Err(format!(
                    "cluster.lost_after_seconds = {} must be at least twice cluster.heartbeat_seconds = {} (and that at least 1)",
                    c.lost_after_seconds, c.heartbeat_seconds
                ));
            }
            if !(1..=16).contains(&c.candidates) {
                return Err(format!(
                    "cluster.candidates = {} is outside 1 to 16",
                    c.candidates
                ));
            }
        } else if !self.store.is_empty() {
            return Err(format!(
                "store = {:?}: empty (SQLite in data_dir) or a postgres:// URL",
                crate::store::redact_url(&self.store)
            ));
        }
        if self.session.pool_size > 64 {
            return Err(format!(
                "session.pool_size = {} is more than 64",
                self.session.pool_size
            ));
        }
        if !(16..=1 << 20).contains(&self.session.profile_mib) {
            return Err(format!(
                "session.profile_mib = {} is outside 16 to 1048576",
                self.session.profile_mib
            ));
        }
        let f = &self.files;
        if f.max_mib == 0 || f.result_max_kib == 0 {
            return Err("files.max_mib and files.result_max_kib must be at least 1".into());
        }
        if !(1..=crate::limits::MAX_TTL).contains(&f.result_ttl_seconds) {
            return Err(format!(
                "files.result_ttl_seconds = {} is outside 1 to {}",
                f.result_ttl_seconds,
                crate::limits::MAX_TTL
            ));
        }
        if !(1..=1024).contains(&self.cdp.max_message_mib) || self.cdp.clients_per_session == 0 {
            return Err(format!(
                "cdp.max_message_mib = {} must be 1 to 1024 and cdp.clients_per_session at least 1",
                self.cdp.max_message_mib
            ));
        }
        let rec = &self.recording;
        if !(1..=MAX_RECORDING_TTL).contains(&rec.ttl_seconds) {
            return Err(format!(
                "recording.ttl_seconds = {} is outside 1 to {MAX_RECORDING_TTL}",
                rec.ttl_seconds,
            ));
        }
        if rec.max_mib == 0 || rec.disk_mib == 0 {
            return Err("recording.max_mib and recording.disk_mib must be at least 1".into());
        }
        if !(500..=60_000).contains(&rec.fragment_ms) {
            return Err(format!(
                "recording.fragment_ms = {} is outside 500 to 60000",
                rec.fragment_ms
            ));
        }
        self.browser.policy().check()?;
        let r = &self.rate_limit;
        if r.api_requests == 0 || r.key_requests == 0 || r.webrtc_per_minute == 0 {
            return Err("rate_limit values must be at least 1".into());
        }
        if r.key_window_seconds == 0 {
            return Err("rate_limit.key_window_seconds must be at least 1".into());
        }
        if let Some(t) = &self.webrtc.turn {
            if t.urls.is_empty() || t.shared_secret.is_empty() {
                return Err("webrtc.turn needs urls and a shared_secret".into());
            }
            if !(60..=crate::limits::MAX_TTL).contains(&t.credential_ttl_seconds) {
                return Err(format!(
                    "webrtc.turn.credential_ttl_seconds = {} is outside 60 to {}",
                    t.credential_ttl_seconds,
                    crate::limits::MAX_TTL
                ));
            }
        }
        if !(1..=240).contains(&self.webrtc.max_fps) {
            return Err(format!(
                "webrtc.max_fps = {} is outside 1 to 240",
                self.webrtc.max_fps
            ));
        }
        if self.rate_limit.api_window_seconds == 0 {
            return Err("rate_limit.api_window_seconds must be at least 1".into());
        }
        if self.retention.seconds == 0 {
            return Err("retention.seconds must be at least 1".into());
        }
        let logs = &self.logs;
        if logs.rate_bytes_per_second == 0 || logs.events_per_second == 0 {
            return Err(
                "logs.rate_bytes_per_second and logs.events_per_second must be at least 1".into(),
            );
        }
        if logs.max_bytes < crate::session_log::MIN_MAX_BYTES {
            return Err(format!(
                "logs.max_bytes = {} is below {}",
                logs.max_bytes,
                crate::session_log::MIN_MAX_BYTES
            ));
        }
        sandcast_host::uid::check_range(self.host.uid_range)?;
        let ac = &self.agent_channel;
        if ac.buffer_kib < 256 || ac.pending == 0 || ac.streams == 0 {
            return Err(format!(
                "agent_channel: buffer_kib = {} must be at least 256, pending = {} and streams = {} at least 1",
                ac.buffer_kib, ac.pending, ac.streams
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("tls_cert is set but tls_key is not".into()),
            (None, Some(_)) => return Err("tls_key is set but tls_cert is not".into()),
            _ => {}
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            hook.check(i)?;
            if let Some(j) = self.webhooks[..i].iter().position(|h| h.url == hook.url) {
                return Err(format!(
                    "webhooks[{i}].url repeats webhooks[{j}].url; list each endpoint once"
                ));
            }
        }
        let r = &self.webhook_retry;
        if r.first_ms == 0 || r.max_ms < r.first_ms || r.give_up_seconds == 0 || r.timeout_ms == 0 {
            return Err(format!(
                "webhook_retry: first_ms = {}, timeout_ms = {} and give_up_seconds = {} must be at least 1, max_ms = {} at least first_ms",
                r.first_ms, r.timeout_ms, r.give_up_seconds, r.max_ms
            ));
        }
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "public_url {:?} must start with http:// or https://",
                self.public_url
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::load(None, Figment::new()).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.rate_limit.api_requests, 100);
        assert_eq!(c.rate_limit.api_window_seconds, 900);
        assert_eq!(c.rate_limit.key_requests, 6000);
        assert_eq!(c.rate_limit.key_window_seconds, 60);
        assert!(c.rate_limit.trusted_proxies.is_empty());
        assert_eq!(c.rate_limit.webrtc_per_minute, 10_000);
        assert_eq!(c.webrtc.max_fps, 60);
        assert_eq!(c.webrtc.h264_tuning, sandcast_proto::H264Tuning::Camera);
        assert!(!c.browser.low_latency);
        assert!(c.browser.session_args().is_empty());
        let fast = BrowserSettings {
            low_latency: true,
            extra_args: vec!["--lang=de".into()],
            ..BrowserSettings::default()
        };
        assert_eq!(
            fast.session_args(),
            ["--disable-frame-rate-limit", "--lang=de"]
        );
        assert_eq!(c.sandbox.state_dir, c.data_dir.join("sandbox"));
        assert!(c.sandbox.hide_paths.contains(&c.data_dir));
        assert_eq!(c.firecracker.to_backend().jailer, None);
        assert_eq!(c.retention.seconds, 7 * 24 * 3600);
        assert_eq!(c.logs.rate_bytes_per_second, 65536);
        assert_eq!(c.logs.burst_bytes, 1 << 20);
        assert_eq!(c.logs.max_bytes, 16 << 20);
        // Limits follow the host: never more memory promised than it has.
        let host = HostSize::detect();
        assert_eq!(c.session.memory_mib, host.session_memory_mib());
        assert_eq!(c.max_sessions, host.max_sessions(c.session.memory_mib));
        assert_eq!(c.overcommit_warning(), None);
        assert!(c.sandbox.sessions_memory_mib <= host.sessions_mib());
        assert_eq!(
            c.sandbox.browser_policy,
            sandcast_proto::BrowserPolicy::default()
        );
    }

    #[test]
    fn the_config_file_and_browser_policy_reach_the_sandbox() {
        let dir = std::env::temp_dir().join(format!("sc-config-hide-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "api_key = \"secret\"\nmax_sessions = 3\n[session]\nmemory_mib = 1000\n\
             [browser]\nblocked_urls = [\"file://*\"]\nallowed_urls = []\n",
        )
        .unwrap();
        let canonical = std::fs::canonicalize(&file).unwrap();
        let c = Config::load(Some(&file), Figment::new()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(c.sandbox.hide_paths.contains(&canonical));
        assert_eq!(c.sandbox.browser_policy.blocked_urls, ["file://*"]);
        assert!(c.sandbox.browser_policy.allowed_urls.is_empty());
        // 3 sessions of 1000 MiB together, if the host can spare that.
        assert_eq!(
            c.sandbox.sessions_memory_mib,
            3000.min(HostSize::detect().sessions_mib())
        );
    }

    /// `deploy/`'s node configuration is one the server takes, as a node.
    #[test]
    fn the_deploy_example_is_a_node_configuration() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/systemd/sandcast.toml.example");
        let c = Config::load(Some(&file), Figment::new()).unwrap();
        assert!(c.clustered());
        assert_eq!(c.cluster.node_id, "node-1");
        assert_eq!(c.cluster.api_url, "http://10.0.0.11:8080");
        assert_eq!(c.max_sessions, 40);
    }

    /// A cluster's settings are checked, each refusal naming its key.
    #[test]
    fn a_node_needs_a_secret_a_key_and_no_pool() {
        let node = || Config {
            store: "postgres://sc@db/sc".into(),
            cluster_secret: "s".repeat(MIN_CLUSTER_SECRET),
            api_key: "k".into(),
            ..Config::default()
        };
        assert!(node().check().is_ok());
        let short = Config {
            cluster_secret: "short".into(),
            ..node()
        };
        assert!(short.check().unwrap_err().starts_with("cluster_secret"));
        let no_key = Config {
            api_key: String::new(),
            ..node()
        };
        assert!(no_key.check().unwrap_err().starts_with("api_key"));
        let mut pool = node();
        pool.session.pool_size = 1;
        assert!(pool.check().unwrap_err().starts_with("session.pool_size"));
        let mut fast = node();
        fast.cluster.lost_after_seconds = 3;
        assert!(fast.check().unwrap_err().contains("lost_after_seconds"));
        let sqlite_typo = Config {
            store: "mysql://x:pw@db".into(),
            ..Config::default()
        };
        let e = sqlite_typo.check().unwrap_err();
        assert!(e.starts_with("store") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn moved_keys_are_refused_naming_their_replacement() {
        let dir = std::env::temp_dir().join(format!("sc-config-moved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |toml: &str| {
            let f = dir.join("c.toml");
            std::fs::write(&f, toml).unwrap();
            Config::load(Some(&f), Figment::new())
        };
        let e = load("[sandbox]\nsubnet = \"10.9.0.0/16\"\n").unwrap_err();
        assert!(
            e.contains("sandbox.subnet") && e.contains("host.subnet"),
            "{e}"
        );
        let e = load("[sandbox]\negress_deny = [\"10.0.0.0/8\"]\n").unwrap_err();
        assert!(e.contains("host.egress_allow"), "{e}");
        let e = load("[sandbox]\nuid_range = [3000000, 3000100]\n").unwrap_err();
        assert!(e.contains("host.uid_range"), "{e}");
        let c = load("[host]\nuid_range = [3000000, 3000100]\n").unwrap();
        assert_eq!(c.host_config().uid_range, [3_000_000, 3_000_100]);
        let c = load(
            "[host]\nsubnet = \"100.70.0.0/16\"\negress_allow = [\"10.9.0.0/16\"]\n[session]\negress = false\n",
        )
        .unwrap();
        assert_eq!(c.host.subnet, "100.70.0.0/16");
        assert_eq!(c.session.egress, sandcast_backend::Egress::None);
        let c = load("[session]\negress = [\"203.0.113.0/24:443\"]\n").unwrap();
        assert!(matches!(
            c.session.egress,
            sandcast_backend::Egress::Allow(_)
        ));
        assert!(
            load("[session]\negress = [\"bogus\"]\n")
                .unwrap_err()
                .contains("bogus")
        );
        // The instance follows the data directory.
        let a = load(&format!("data_dir = {:?}\n", dir.join("a"))).unwrap();
        let b = load(&format!("data_dir = {:?}\n", dir.join("b"))).unwrap();
        assert_ne!(a.host_config().instance, b.host_config().instance);
        assert_eq!(a.host_config().instance.len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_jailer_section_runs_firecracker_jailed() {
        let dir = std::env::temp_dir().join(format!("sc-config-jail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "backend = \"firecracker\"\n[firecracker.jailer]\nchroot_base_dir = \"/srv/j\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), Figment::new()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let j = c.firecracker.to_backend().jailer.unwrap();
        assert_eq!(j.chroot_base_dir, Path::new("/srv/j"));
        assert_eq!(j.jailer_bin, Path::new("jailer"));
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn file_then_env_then_flags() {
        let dir = std::env::temp_dir().join(format!("sc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nmax_sessions = 3\n[session]\nwidth = 800\n\
             [providers.docs]\nstart_url = \"https://example.org/\"\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("SANDCAST_MAX_SESSIONS", "5");
            jail.set_env("SANDCAST_RATE_LIMIT__API_REQUESTS", "7");
            let c = Config::load(
                Some(&file),
                Figment::from(Serialized::default("listen", "127.0.0.1:9001")),
            )
            .unwrap();
            assert_eq!(c.listen.port(), 9001);
            assert_eq!(c.max_sessions, 5);
            assert_eq!(c.rate_limit.api_requests, 7);
            assert_eq!(c.session.width, 800);
            assert_eq!(c.providers["docs"].start_url, "https://example.org/");
            Ok(())
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn only_settings_are_read_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SANDCAST_LOG", "debug");
            jail.set_env("SANDCAST_SERVER", "http://127.0.0.1:1");
            jail.set_env("SANDCAST_CA_CERT", "/etc/sandcast/ca.pem");
            jail.set_env("SANDCAST_FIRECRACKER", "/usr/local/bin/firecracker");
            jail.set_env("SANDCAST_LISTN", "127.0.0.1:1");
            jail.set_env("SANDCAST_API_KEY", "k");
            jail.set_env("SANDCAST_DATA_DIR", "/tmp/sc-env");
            jail.set_env("SANDCAST_RATE_LIMIT__KEY_REQUESTS", "9");
            jail.set_env("SANDCAST_RATE_LIMIT__TRUSTED_PROXIES", "[\"10.0.0.0/8\"]");
            let c = Config::load(None, Figment::new()).unwrap();
            assert_eq!(c.api_key, "k");
            assert_eq!(c.data_dir, Path::new("/tmp/sc-env"));
            assert_eq!(c.rate_limit.key_requests, 9);
            assert_eq!(
                c.rate_limit.trusted_proxies,
                ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
            );
            let mut ignored = ignored_env();
            ignored.sort();
            assert_eq!(ignored, ["SANDCAST_FIRECRACKER", "SANDCAST_LISTN"]);
            // Inside a table, a misspelt key is still refused.
            jail.set_env("SANDCAST_RATE_LIMIT__KEY_REQUEST", "9");
            let e = Config::load(None, Figment::new()).unwrap_err();
            assert!(e.contains("key_request"), "{e}");
            Ok(())
        });
        assert!(is_setting("LISTEN") && is_setting("rate_limit.api_requests"));
        assert!(!is_setting("log") && !is_setting("server") && !is_setting("session"));
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn tls_needs_both_files_and_plain_http_beyond_loopback_is_warned_about() {
        figment::Jail::expect_with(|jail| {
            let c = Config::load(None, Figment::new()).unwrap();
            assert_eq!(c.tls_files(), None);
            assert_eq!(c.scheme(), "http");
            let w = c
                .plain_http_warning()
                .expect("0.0.0.0 without TLS is warned about");
            assert!(w.contains("0.0.0.0:8080") && w.contains("API key"), "{w}");
            assert!(w.contains("clipboard") && w.contains("tls_cert"), "{w}");

            let local = Figment::from(Serialized::default("listen", "127.0.0.1:8080"));
            assert_eq!(
                Config::load(None, local).unwrap().plain_http_warning(),
                None
            );

            jail.set_env("SANDCAST_TLS_CERT", "/etc/sandcast/cert.pem");
            let e = Config::load(None, Figment::new()).unwrap_err();
            assert!(e.contains("tls_key is not"), "{e}");
            jail.set_env("SANDCAST_TLS_KEY", "/etc/sandcast/key.pem");
            let c = Config::load(None, Figment::new()).unwrap();
            assert_eq!(
                c.tls_files(),
                Some((
                    Path::new("/etc/sandcast/cert.pem"),
                    Path::new("/etc/sandcast/key.pem")
                ))
            );
            assert_eq!(c.scheme(), "https");
            assert_eq!(c.plain_http_warning(), None);

            // Empty values (a template with nothing filled in) mean unset.
            jail.set_env("SANDCAST_TLS_CERT", "");
            jail.set_env("SANDCAST_TLS_KEY", "");
            assert_eq!(
                Config::load(None, Figment::new()).unwrap().tls_files(),
                None
            );
            Ok(())
        });
    }

    #[test]
    fn webhooks_take_every_event_by_default_and_hide_their_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[[webhooks]]\nurl = \"https://ops.example/hooks\"\nsecret = \"s3cr3t-s3cr3t-s3cr3t\"\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"0123456789abcdef\"\n\
             events = [\"completed\", \"crash_loop\"]\n\
             [webhook_retry]\nfirst_ms = 50\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), Figment::new()).unwrap();
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[0].events, crate::webhooks::EVENTS);
        assert!(c.webhooks[1].wants("crash_loop") && !c.webhooks[1].wants("ready"));
        assert_eq!(c.webhook_retry.first_ms, 50);
        assert_eq!(c.webhook_retry.max_ms, 3_600_000);
        assert_eq!(c.webhook_retry.give_up_seconds, 86_400);
        assert_eq!(c.webhook_retry.timeout_ms, 10_000);
        let shown = format!("{c:?}");
        assert!(shown.contains("https://ops.example/hooks"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "the secret shows in {shown}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = |toml: &str| {
            let dir = std::env::temp_dir().join(format!("sc-config-bad-{}", rand::random::<u32>()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("c.toml");
            std::fs::write(&file, toml).unwrap();
            let e = Config::load(Some(&file), Figment::new()).unwrap_err();
            std::fs::remove_dir_all(&dir).unwrap();
            e
        };
        assert!(err("backend = \"qemu\"").contains("\"qemu\""));
        assert!(err("listen = \"nope\"").contains("listen"));
        assert!(err("colour = 1").contains("colour"));
        assert!(err("[session]\nstart_url = \"file:///etc/passwd\"").contains("start_url"));
        assert!(err("[session]\nwidth = 10").contains("width"));
        assert!(err("[webrtc]\nmax_fps = 0").contains("webrtc.max_fps = 0"));
        let bad = err("[webrtc]\nh264_tuning = \"film\"");
        assert!(bad.contains("film") && bad.contains("screen"), "{bad}");
        assert!(err("[webrtc]\nmax_fps = 1000").contains("webrtc.max_fps = 1000"));
        assert!(err("[firecracker.jailer]\nuid = 1234").contains("host.uid_range"));
        assert!(err("[host]\nuid_range = [0, 10]").contains("host.uid_range [0, 10]"));
        assert!(err("[firecracker.jailer]\nuser = 5").contains("user"));
        assert!(err("[retention]\nseconds = 0").contains("retention.seconds"));
        assert!(err("[logs]\nmax_bytes = 10").contains("logs.max_bytes = 10"));
        assert!(err("[logs]\nrate_bytes_per_second = 0").contains("rate_bytes_per_second"));
        assert!(
            err("[rate_limit]\ntrusted_proxies = [\"10.0.0.0/33\"]").contains("trusted_proxies")
        );
        assert!(err("[webrtc.turn]\nurls = [\"turn:t\"]\nshared_secret = \"\"").contains("turn"));
        assert!(err("[browser]\nblocked_urls = [\"\"]").contains("browser.blocked_urls"));
        let hook = |body: &str| format!("[[webhooks]]\n{body}\n");
        let secret = "secret = \"0123456789abcdef\"";
        let e = err(&hook(&format!("url = \"ftp://h/x\"\n{secret}")));
        assert!(
            e.contains("webhooks[0].url") && e.contains("ftp://h/x"),
            "{e}"
        );
        let e = err(&hook("url = \"https://h/x\"\nsecret = \"short\""));
        assert!(
            e.contains("webhooks[0].secret") && !e.contains("short"),
            "{e}"
        );
        let e = err(&hook(&format!(
            "url = \"https://h/x\"\n{secret}\nevents = [\"ready\", \"exploded\"]"
        )));
        assert!(
            e.contains("webhooks[0].events") && e.contains("\"exploded\""),
            "{e}"
        );
        let e = err(&format!(
            "{}{}",
            hook(&format!("url = \"https://h/x\"\n{secret}")),
            hook(&format!("url = \"https://h/x\"\n{secret}"))
        ));
        assert!(e.contains("webhooks[1].url repeats webhooks[0].url"), "{e}");
        assert!(err("[webhook_retry]\nfirst_ms = 0").contains("webhook_retry"));
        assert!(
            Config::load(Some(Path::new("/nonexistent.toml")), Figment::new())
                .unwrap_err()
                .contains("/nonexistent.toml")
        );
    }
}

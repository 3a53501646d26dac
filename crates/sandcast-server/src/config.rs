//! Server configuration: embedded defaults, then a TOML file, then
//! `SANDCAST_*` environment variables, then command-line flags.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTP address.
    pub listen: SocketAddr,
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
    /// Most sessions alive at once.
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
}

/// Defaults and limits for sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionDefaults {
    /// Display width.
    pub width: u32,
    /// Display height.
    pub height: u32,
    /// Lifetime of a session.
    pub ttl_seconds: u64,
    /// A session nobody watches for this long stops.
    pub idle_timeout_seconds: u64,
    /// Page the browser opens.
    pub start_url: String,
    /// Where sessions' outbound traffic may go: `"internet"`, `"none"` or a
    /// list of networks (`true`/`false` read as `"internet"`/`"none"`).
    pub egress: sandcast_backend::Egress,
    /// Memory limit per session.
    pub memory_mib: u64,
    /// CPU limit per session in thousandths of a core.
    pub cpu_millis: u32,
    /// Process limit per session.
    pub pids: u32,
    /// Longest wait for a session to become ready.
    pub start_timeout_seconds: u64,
}

impl Default for SessionDefaults {
    fn default() -> Self {
        SessionDefaults {
            width: 1280,
            height: 720,
            ttl_seconds: 3600,
            idle_timeout_seconds: 900,
            start_url: "about:blank".into(),
            egress: sandcast_backend::Egress::Internet,
            memory_mib: 2048,
            cpu_millis: 2000,
            pids: 1024,
            start_timeout_seconds: 60,
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
    /// its own 60 Hz timer (`--disable-frame-rate-limit`): one or two frames
    /// less latency, more CPU while a page animates.
    pub low_latency: bool,
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
        BrowserSettings {
            binary: "/usr/bin/chromium".into(),
            extra_args: Vec::new(),
            low_latency: true,
        }
    }
}

/// Rate limits per client address.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Requests to `/api/*` (but `/api/webrtc/*`) per window.
    pub api_requests: u32,
    /// The window of `api_requests`.
    pub api_window_seconds: u64,
    /// Requests to `/api/webrtc/*` and `/viewer/*` per minute.
    pub webrtc_per_minute: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            api_requests: 100,
            api_window_seconds: 900,
            webrtc_per_minute: 10_000,
        }
    }
}

/// A named preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// Page the browser opens.
    pub start_url: String,
    /// Optional command beside the browser.
    #[serde(default)]
    pub launch: Option<Vec<String>>,
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
            max_fps: 60,
            h264_tuning: sandcast_proto::H264Tuning::Camera,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            data_dir: "/var/lib/sandcast".into(),
            public_url: String::new(),
            api_key: String::new(),
            backend: "sandbox".into(),
            agent_binary: PathBuf::new(),
            max_sessions: 16,
            session: SessionDefaults::default(),
            browser: BrowserSettings::default(),
            rate_limit: RateLimits::default(),
            providers: BTreeMap::new(),
            webrtc: WebRtcSettings::default(),
            host: sandcast_host::HostConfig::default(),
            sandbox: sandcast_sandbox::SandboxConfig::default(),
            firecracker: FirecrackerSettings::default(),
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
    /// The unprivileged uid Firecracker runs as.
    pub uid: Option<u32>,
    /// The gid Firecracker runs as.
    pub gid: Option<u32>,
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
        if let Some(v) = self.uid {
            c.uid = v;
        }
        if let Some(v) = self.gid {
            c.gid = v;
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

/// The default configuration file, read when it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/sandcast/sandcast.toml";

impl Config {
    /// Loads defaults, `file` (or the default file when it exists), the
    /// environment, then `overrides` (flags), and checks the result.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(f) => {
                if !f.exists() {
                    return Err(format!("config file {} does not exist", f.display()));
                }
                fig = fig.merge(Toml::file(f));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                fig = fig.merge(Toml::file(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        fig = fig
            .merge(Env::prefixed("SANDCAST_").split("__"))
            .merge(overrides);
        for (old, new) in MOVED_KEYS {
            if fig.find_value(old).is_ok() {
                return Err(format!("{old} is no longer read; use {new}"));
            }
        }
        let mut config: Config = fig.extract().map_err(|e| e.to_string())?;
        config.fill_derived();
        config.check()?;
        Ok(config)
    }

    /// Settings that follow from others unless set.
    fn fill_derived(&mut self) {
        let default_state = sandcast_sandbox::SandboxConfig::default().state_dir;
        if self.sandbox.state_dir == default_state {
            self.sandbox.state_dir = self.data_dir.join("sandbox");
        }
        if !self.sandbox.hide_paths.contains(&self.data_dir) {
            self.sandbox.hide_paths.push(self.data_dir.clone());
        }
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
        crate::limits::check_url(&self.session.start_url)
            .map_err(|e| format!("session.start_url: {e}"))?;
        for (name, p) in &self.providers {
            crate::limits::check_url(&p.start_url)
                .map_err(|e| format!("providers.{name}.start_url: {e}"))?;
        }
        if self.rate_limit.api_requests == 0 || self.rate_limit.webrtc_per_minute == 0 {
            return Err("rate_limit values must be at least 1".into());
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
        if let Some(j) = &self.firecracker.jailer
            && j.uid == Some(0)
        {
            return Err(
                "firecracker.jailer.uid = 0: the jail is only worth having with an unprivileged uid"
                    .into(),
            );
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
        assert_eq!(c.rate_limit.webrtc_per_minute, 10_000);
        assert_eq!(c.webrtc.max_fps, 60);
        assert_eq!(c.webrtc.h264_tuning, sandcast_proto::H264Tuning::Camera);
        assert!(c.browser.low_latency);
        assert_eq!(c.browser.session_args(), ["--disable-frame-rate-limit"]);
        let plain = BrowserSettings {
            low_latency: false,
            extra_args: vec!["--lang=de".into()],
            ..BrowserSettings::default()
        };
        assert_eq!(plain.session_args(), ["--lang=de"]);
        assert_eq!(c.sandbox.state_dir, c.data_dir.join("sandbox"));
        assert!(c.sandbox.hide_paths.contains(&c.data_dir));
        assert_eq!(c.firecracker.to_backend().jailer, None);
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
            "backend = \"firecracker\"\n[firecracker.jailer]\nuid = 1234\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), Figment::new()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let j = c.firecracker.to_backend().jailer.unwrap();
        assert_eq!(j.uid, 1234);
        assert_eq!(j.gid, 65534);
        assert_eq!(j.chroot_base_dir, Path::new("/srv/jailer"));
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
        assert!(err("[firecracker.jailer]\nuid = 0").contains("firecracker.jailer.uid = 0"));
        assert!(err("[firecracker.jailer]\nuser = 5").contains("user"));
        assert!(
            Config::load(Some(Path::new("/nonexistent.toml")), Figment::new())
                .unwrap_err()
                .contains("/nonexistent.toml")
        );
    }
}

//! The boundary between the sandcast server and an isolation backend.
//!
//! A backend turns a [`LaunchSpec`] into a running, isolated instance whose
//! first process is `sandcast-agent`, and guarantees that stopping it (or
//! [`Backend::reap`] after a crash or restart of the server) leaves nothing
//! behind: no process, mount, network device, namespace or cgroup.
//!
//! The server owns the agent channel: before [`Backend::start`] it listens on
//! [`Backend::agent_socket`] for the session, and the backend makes that
//! socket reachable from inside (a bind mount for the sandbox, Firecracker's
//! hybrid vsock for a microVM). The agent always connects out; nothing inside a
//! session listens for the host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
pub use sandcast_proto::AgentToken;
use serde::Serialize;
use tokio::sync::watch;

/// A session id as backends see it: lowercase ASCII letters, digits and `-`,
/// at most 64 bytes, so it is safe in paths, cgroup and device names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SessionId(String);

impl SessionId {
    /// Checks the form and wraps the id.
    pub fn new(id: impl Into<String>) -> Result<Self, BackendError> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(SessionId(id))
        } else {
            Err(BackendError::InvalidSpec(format!("bad session id {id:?}")))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resource limits for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Memory limit in MiB (the browser needs about 300 MiB and more for heavy pages).
    pub memory_mib: u64,
    /// CPU quota in thousandths of a core (1000 = one core).
    pub cpu_millis: u32,
    /// Largest number of processes and threads.
    pub pids: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 2048,
            cpu_millis: 2000,
            pids: 1024,
        }
    }
}

/// Network policy for one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    /// Where outbound traffic may go through NAT. Never to the host, its
    /// loopback, other sessions or a private range the operator has not
    /// opened, whatever this says.
    pub egress: Egress,
}

/// Most entries an egress allow list may hold.
pub const MAX_EGRESS_RULES: usize = 64;

/// Where a session's outbound traffic may go.
///
/// Written as `"internet"`, `"none"` or a list of rules like
/// `"203.0.113.0/24"`, `"198.51.100.7:443"`, `"192.0.2.0/24:8000-8100"` or
/// `"[2001:db8::/32]:443"`; `true` and `false` read as `"internet"` and
/// `"none"` (the form of earlier versions).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// Every public address; no private or reserved range.
    #[default]
    Internet,
    /// Nothing at all.
    None,
    /// Only these destinations (and the session's DNS resolvers).
    Allow(Vec<EgressRule>),
}

/// One destination of an egress allow list: a network and, optionally, a
/// port range (TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressRule {
    /// Network address (host bits cleared).
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// First and last port, or every port.
    pub ports: Option<(u16, u16)>,
}

impl std::str::FromStr for EgressRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("{s:?} {why}"));
        // `[v6/len]:ports`, `v4/len:ports`, or a bare network.
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            match rest.split_once(']') {
                Some((net, "")) => (net, None),
                Some((net, tail)) => match tail.strip_prefix(':') {
                    Some(p) => (net, Some(p)),
                    None => return bad("has text after ']' that is not :PORT"),
                },
                None => return bad("has no closing ']'"),
            }
        } else if s.matches(':').count() == 1 {
            let (n, p) = s.split_once(':').expect("one colon");
            (n, Some(p))
        } else {
            (s, None)
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (net, None),
        };
        let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
            return bad(
                "is not an IP network like 203.0.113.0/24, 198.51.100.7:443 or [2001:db8::/32]:443",
            );
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(l) if l <= max => l,
                _ => return bad(&format!("has a prefix length that is not 0 to {max}")),
            },
        };
        let ports = match ports {
            None => None,
            Some(p) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) if lo >= 1 && lo <= hi => Some((lo, hi)),
                    _ => return bad("has a port that is not 1-65535 or a range LOW-HIGH"),
                }
            }
        };
        Ok(EgressRule {
            addr: mask(addr, prefix),
            prefix,
            ports,
        })
    }
}

/// `addr` with the bits after `prefix` cleared.
fn mask(addr: std::net::IpAddr, prefix: u8) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            std::net::IpAddr::V4((u32::from(a) & m).into())
        }
        std::net::IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            std::net::IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl std::fmt::Display for EgressRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let net = format!("{}/{}", self.addr, self.prefix);
        match (self.addr, self.ports) {
            (_, None) => f.write_str(&net),
            (std::net::IpAddr::V4(_), Some((lo, hi))) if lo == hi => write!(f, "{net}:{lo}"),
            (std::net::IpAddr::V4(_), Some((lo, hi))) => write!(f, "{net}:{lo}-{hi}"),
            (std::net::IpAddr::V6(_), Some((lo, hi))) if lo == hi => write!(f, "[{net}]:{lo}"),
            (std::net::IpAddr::V6(_), Some((lo, hi))) => write!(f, "[{net}]:{lo}-{hi}"),
        }
    }
}

impl Egress {
    /// Reads an allow list, naming every bad entry.
    pub fn allow_list<S: AsRef<str>>(entries: &[S]) -> Result<Egress, String> {
        if entries.is_empty() {
            return Err("an empty egress list reaches nothing: say \"none\"".into());
        }
        if entries.len() > MAX_EGRESS_RULES {
            return Err(format!(
                "{} egress entries is more than {MAX_EGRESS_RULES}",
                entries.len()
            ));
        }
        let mut rules = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        for e in entries {
            match e.as_ref().trim().parse() {
                Ok(r) => rules.push(r),
                Err(why) => errors.push(why),
            }
        }
        if errors.is_empty() {
            Ok(Egress::Allow(rules))
        } else {
            Err(format!("bad egress entries: {}", errors.join("; ")))
        }
    }
}

impl Serialize for Egress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Egress::Internet => s.serialize_str("internet"),
            Egress::None => s.serialize_str("none"),
            Egress::Allow(rules) => s.collect_seq(rules.iter().map(ToString::to_string)),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Egress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Word(String),
            List(Vec<String>),
        }
        let repr = Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "egress must be \"internet\", \"none\", true, false or a list of networks like [\"203.0.113.0/24:443\"]",
            )
        })?;
        match repr {
            Repr::Bool(true) => Ok(Egress::Internet),
            Repr::Bool(false) => Ok(Egress::None),
            Repr::Word(w) if w == "internet" => Ok(Egress::Internet),
            Repr::Word(w) if w == "none" => Ok(Egress::None),
            Repr::Word(w) => Err(serde::de::Error::custom(format!(
                "egress {w:?} is not \"internet\", \"none\" or a list of networks"
            ))),
            Repr::List(l) => Egress::allow_list(&l).map_err(serde::de::Error::custom),
        }
    }
}

/// Everything a backend needs to start one session.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The session.
    pub id: SessionId,
    /// A directory owned by this session on the host, removed when it ends;
    /// the backend keeps its writable layer and runtime files here.
    pub session_dir: PathBuf,
    /// Where the server listens for this session's agent (from
    /// [`Backend::agent_socket`]).
    pub agent_socket: PathBuf,
    /// The agent binary on the host (used where the image does not carry one).
    pub agent_binary: PathBuf,
    /// Resource limits.
    pub limits: Limits,
    /// Network policy.
    pub network: NetworkPolicy,
    /// The session's agent token, also sent to the agent in its
    /// configuration. A backend that can publish something the agent reads
    /// before it trusts its configuration (Firecracker's MMDS) publishes its
    /// SHA-256 there; `None` for an instance that gets no configuration (a
    /// snapshot template).
    pub agent_token: Option<AgentToken>,
    /// An ext4 image (a user's profile, made and checked by the caller) to
    /// be the session's home, writable; `None`: a fresh, empty home. The
    /// sandbox mounts it inside the session's mount namespace, a microVM
    /// gets it as a drive.
    pub home: Option<PathBuf>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceExit {
    /// What happened, in words (for example "agent killed by signal 9").
    pub reason: String,
    /// Whether it ended because [`Instance::stop`] asked it to.
    pub requested: bool,
}

/// A running session instance.
#[async_trait]
pub trait Instance: Send + Sync {
    /// Host pid of the instance's outermost process, where there is one.
    fn pid(&self) -> Option<u32>;

    /// Resolves with the exit once the instance has ended; may be awaited by
    /// several callers and after the fact.
    fn exited(&self) -> watch::Receiver<Option<InstanceExit>>;

    /// Stops the instance: asks it to end, kills it after `grace`, then removes
    /// everything it had on the host. Idempotent.
    async fn stop(&self, grace: Duration) -> Result<(), BackendError>;
}

/// Health of a backend, for `/health` and `sandcast doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Whether sessions can start.
    pub ready: bool,
    /// One line per check, each saying what was found or exactly what is missing.
    pub checks: Vec<Check>,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, or what is missing and how to get it.
    pub detail: String,
}

/// An isolation backend.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short name, as in the configuration (`sandbox`, `firecracker`).
    fn name(&self) -> &'static str;

    /// Checks the host: binaries, kernel features, permissions.
    async fn readiness(&self) -> Readiness;

    /// Where the server must listen for the agent of session `id`, whose
    /// directory is `session_dir`. The server creates the socket's directory
    /// when it is missing.
    fn agent_socket(&self, id: &SessionId, session_dir: &Path) -> PathBuf {
        let _ = id;
        session_dir.join("agent.sock")
    }

    /// The host uid that every agent connection of session `id` comes from
    /// (`SO_PEERCRED` of the connection on [`Backend::agent_socket`]); the
    /// server refuses a connection from any other uid. `None` means no check.
    /// Never taken from what the agent says about itself.
    fn agent_peer_uid(&self, id: &SessionId) -> Option<u32> {
        let _ = id;
        None
    }

    /// Starts a session. On error nothing of it is left on the host.
    async fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn Instance>, BackendError>;

    /// Removes everything on the host that belongs to a session of this
    /// backend other than those in `keep`: processes, cgroups, network
    /// devices, namespaces, mounts, files. Run at server start (after a crash)
    /// and periodically. Returns one line per thing removed.
    async fn reap(&self, keep: &[SessionId]) -> Result<Vec<String>, BackendError>;

    /// The last call at server shutdown, once every session has stopped:
    /// removes what the backend keeps on the host between sessions (for the
    /// namespace and microVM backends: the instance's firewall table and
    /// cgroup parent). Returns one line per thing removed.
    async fn release(&self) -> Result<Vec<String>, BackendError> {
        Ok(Vec::new())
    }
}

/// A backend failure, with the exact reason.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The spec cannot be honoured.
    #[error("invalid launch spec: {0}")]
    InvalidSpec(String),
    /// Something the backend needs is missing on the host.
    #[error("host is not ready: {0}")]
    NotReady(String),
    /// Starting the instance failed.
    #[error("start failed: {0}")]
    Start(String),
    /// Stopping or cleaning up failed.
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_reads_every_form_and_names_bad_entries() {
        let read = |j: &str| serde_json::from_str::<Egress>(j);
        assert_eq!(read("true").unwrap(), Egress::Internet);
        assert_eq!(read("false").unwrap(), Egress::None);
        assert_eq!(read("\"internet\"").unwrap(), Egress::Internet);
        assert_eq!(read("\"none\"").unwrap(), Egress::None);
        let list = read(r#"["203.0.113.9/24", "198.51.100.7:443", "192.0.2.0/24:8000-8100", "[2001:db8::1/32]:53", "2001:db8::5"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"["203.0.113.0/24","198.51.100.7/32:443","192.0.2.0/24:8000-8100","[2001:db8::/32]:53","2001:db8::5/128"]"#
        );
        // Written and read back unchanged.
        assert_eq!(read(&serde_json::to_string(&list).unwrap()).unwrap(), list);
        let e = read(r#"["10.0.0.0/8", "10.0.0.0/33", "nope:80", "1.2.3.4:0", "1.2.3.4:9-2"]"#)
            .unwrap_err()
            .to_string();
        for bad in ["10.0.0.0/33", "nope:80", "1.2.3.4:0", "1.2.3.4:9-2"] {
            assert!(e.contains(&format!("{bad:?}")), "{bad} not named in {e}");
        }
        assert!(!e.contains("\"10.0.0.0/8\""), "{e}");
        assert!(
            read("\"everything\"")
                .unwrap_err()
                .to_string()
                .contains("everything")
        );
        assert!(read("[]").unwrap_err().to_string().contains("none"));
        assert!(read("3").is_err());
        let many: Vec<String> = (0..65).map(|i| format!("192.0.2.{i}")).collect();
        assert!(Egress::allow_list(&many).unwrap_err().contains("65"));
    }

    #[test]
    fn session_ids_are_path_safe() {
        assert!(SessionId::new("a1b2-c3").is_ok());
        for bad in ["", "A", "../x", "a b", "a/b", &"a".repeat(65)] {
            assert!(SessionId::new(bad).is_err(), "{bad:?}");
        }
    }
}

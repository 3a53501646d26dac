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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    /// Outbound traffic to the outside world through NAT. Never to the host,
    /// its loopback or other sessions, whatever this says.
    pub egress: bool,
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

    /// The host uid the agent of session `id` connects with (`SO_PEERCRED`
    /// of its agent socket connections), when the backend gives each
    /// session a uid of its own; `None` when it cannot say.
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
    fn session_ids_are_path_safe() {
        assert!(SessionId::new("a1b2-c3").is_ok());
        for bad in ["", "A", "../x", "a b", "a/b", &"a".repeat(65)] {
            assert!(SessionId::new(bad).is_err(), "{bad:?}");
        }
    }
}

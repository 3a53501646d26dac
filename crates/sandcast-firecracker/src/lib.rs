//! The Firecracker backend of sandcast: one microVM per session, driven
//! through Firecracker's HTTP API on its Unix socket.
//!
//! - [`FirecrackerBackend`] implements [`sandcast_backend::Backend`]: per
//!   session a Firecracker process in its own cgroup and network namespace
//!   (TAP device, NAT egress), the image's ext4 as a read-only root drive, a
//!   sparse writable drive, vsock for the agent channel, MMDS with the
//!   session's id, the serial console in the session's log; optional
//!   snapshot restore.
//! - [`jail`] runs Firecracker under its `jailer` (chroot, unprivileged
//!   uid/gid, the session's cgroup and namespace) when configured.
//! - [`client`] is the API client, [`api`] the request types from
//!   Firecracker's OpenAPI specification (v1.16.1).
//! - [`kernel`] checks a guest kernel and its `.config`, [`kvm`] whether
//!   `/dev/kvm` can run a guest, [`vsock`] the hybrid vsock handshake.
//! - With the `testing` feature, [`testing`] is a Firecracker double that
//!   checks every request against the specification, and the
//!   `firecracker-double` binary runs it as a process.

pub mod api;
mod backend;
pub mod client;
pub mod host;
pub mod jail;
pub mod kernel;
pub mod kvm;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vsock;

pub use backend::{AGENT_PATH_IN_IMAGE, FirecrackerBackend, FirecrackerConfig, SnapshotFiles};
pub use jail::JailerConfig;

/// Host port (vsock) the agent in a microVM connects to; it arrives on
/// `<session_dir>/vsock.sock_1024` (in the jail's root when jailed).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest's vsock context id (the host is 2).
pub const GUEST_CID: u32 = 3;

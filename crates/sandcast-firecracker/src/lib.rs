//! The Firecracker backend: one microVM per session, driven through Firecracker's HTTP API.

pub mod api;
pub mod client;
pub mod kernel;
pub mod host;
pub mod kvm;
#[cfg(feature = "testing")]
pub mod testing;

/// Host port (vsock) the agent in a microVM connects to.
pub const AGENT_VSOCK_PORT: u32 = 1024;
pub mod vsock;

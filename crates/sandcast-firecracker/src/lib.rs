//! The Firecracker backend: one microVM per session, driven through Firecracker's HTTP API.

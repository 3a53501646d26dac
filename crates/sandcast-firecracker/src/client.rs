//! A client for Firecracker's HTTP API on its Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::*;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request never got an answer (no socket, connection refused or reset).
    #[error("Firecracker API {method} {path} on {socket}: {reason}")]
    Transport {
        /// Method of the request.
        method: Method,
        /// Path of the request.
        path: String,
        /// The API socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Firecracker answered with an error; `fault_message` is its own text.
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Api {
        /// Method of the request.
        method: Method,
        /// Path of the request.
        path: String,
        /// HTTP status.
        status: u16,
        /// Firecracker's `fault_message`, verbatim.
        fault_message: String,
    },
    /// An answer did not have the documented form.
    #[error("Firecracker API {method} {path}: unexpected answer: {reason}")]
    Decode {
        /// Method of the request.
        method: Method,
        /// Path of the request.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// A Firecracker API client bound to one API socket.
#[derive(Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    http: Client<UnixConnector, Full<Bytes>>,
}

impl std::fmt::Debug for FirecrackerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirecrackerClient")
            .field("socket", &self.socket)
            .finish()
    }
}

impl FirecrackerClient {
    /// A client for the API socket at `socket` (nothing is connected yet).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        FirecrackerClient {
            socket: socket.into(),
            http: Client::builder(TokioExecutor::new()).build(UnixConnector),
        }
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the answer's body on a 2xx status.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let transport = |reason: String| ClientError::Transport {
            method: method.clone(),
            path: path.to_owned(),
            socket: self.socket.clone(),
            reason,
        };
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header("accept", "application/json");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let resp = self.http.request(req).await.map_err(|e| {
            // The interesting part (ENOENT, ECONNREFUSED) sits in the source chain.
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            transport(reason)
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = match serde_json::from_slice::<ApiErrorBody>(&bytes) {
            Ok(b) => b.fault_message,
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        Err(ClientError::Api {
            method,
            path: path.to_owned(),
            status: status.as_u16(),
            fault_message,
        })
    }

    async fn send<T: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ClientError> {
        let json = serde_json::to_vec(body).expect("API types serialise");
        self.call(method, path, Some(json)).await.map(|_| ())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            method: Method::GET,
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// `GET /`: the instance's id, state and version.
    pub async fn describe(&self) -> Result<InstanceInfo, ClientError> {
        self.get("/").await
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, cfg: &MachineConfig) -> Result<(), ClientError> {
        self.send(Method::PUT, "/machine-config", cfg).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, src: &BootSource) -> Result<(), ClientError> {
        self.send(Method::PUT, "/boot-source", src).await
    }

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ClientError> {
        let path = format!("/drives/{}", path_segment(&drive.drive_id));
        self.send(Method::PUT, &path, drive).await
    }

    /// `PATCH /drives/{drive_id}`: a new backing file (post-boot, also after
    /// a snapshot load).
    pub async fn patch_drive(&self, drive_id: &str, path_on_host: &str) -> Result<(), ClientError> {
        let path = format!("/drives/{}", path_segment(drive_id));
        let body = serde_json::json!({ "drive_id": drive_id, "path_on_host": path_on_host });
        self.send(Method::PATCH, &path, &body).await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ClientError> {
        let path = format!("/network-interfaces/{}", path_segment(&iface.iface_id));
        self.send(Method::PUT, &path, iface).await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), ClientError> {
        self.send(Method::PUT, "/vsock", vsock).await
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ClientError> {
        self.send(Method::PUT, "/logger", logger).await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), ClientError> {
        self.send(Method::PUT, "/metrics", metrics).await
    }

    /// `PUT /mmds/config`.
    pub async fn put_mmds_config(&self, cfg: &MmdsConfig) -> Result<(), ClientError> {
        self.send(Method::PUT, "/mmds/config", cfg).await
    }

    /// `PUT /mmds`: replaces the whole metadata store.
    pub async fn put_mmds(&self, data: &serde_json::Value) -> Result<(), ClientError> {
        self.send(Method::PUT, "/mmds", data).await
    }

    /// `GET /mmds`.
    pub async fn get_mmds(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/mmds").await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), ClientError> {
        self.send(Method::PUT, "/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PATCH /vm`: pause or resume.
    pub async fn set_vm_state(&self, state: VmState) -> Result<(), ClientError> {
        self.send(Method::PATCH, "/vm", &Vm { state }).await
    }

    /// `PUT /snapshot/create` (the VM must be paused).
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ClientError> {
        self.send(Method::PUT, "/snapshot/create", params).await
    }

    /// `PUT /snapshot/load` (only on a fresh process).
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ClientError> {
        self.send(Method::PUT, "/snapshot/load", params).await
    }
}

/// Ids are chosen by sandcast, but a path segment must never carry `/`, `?` or `#`.
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        assert_eq!(path_segment("rootfs"), "rootfs");
        assert_eq!(path_segment("a/b?c"), "a%2Fb%3Fc");
    }

    #[tokio::test]
    async fn missing_socket_names_the_socket() {
        let client = FirecrackerClient::new("/nonexistent/fc.sock");
        let err = client.describe().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/fc.sock"), "{text}");
        assert!(matches!(err, ClientError::Transport { .. }));
    }
}

//! Firecracker's hybrid vsock, host side.
//!
//! - Guest-initiated: a guest connecting to host CID 2, port `P` arrives on the
//!   Unix socket `<uds_path>_<P>`, where the host listens ([`guest_port_socket`]).
//!   This is how the agent reaches the server.
//! - Host-initiated: the host connects to `uds_path`, writes `CONNECT <port>\n`
//!   and reads `OK <host port>\n`; then the stream is connected to the guest's
//!   listener on that port ([`connect`]). When nothing listens, Firecracker
//!   closes the connection without an answer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The Unix socket on which guest connections to host `port` arrive.
pub fn guest_port_socket(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Why a host-initiated vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The vsock Unix socket could not be reached.
    #[error("vsock socket {path}: {source}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Firecracker closed the connection: nothing in the guest listens there.
    #[error("no listener on guest vsock port {port} (connection closed after CONNECT)")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// The answer was not `OK <port>`.
    #[error("unexpected answer to CONNECT {port}: {answer:?}")]
    BadAnswer {
        /// The guest port.
        port: u32,
        /// What came back.
        answer: String,
    },
    /// No answer within the timeout.
    #[error("no answer to CONNECT {port} within {timeout:?}")]
    Timeout {
        /// The guest port.
        port: u32,
        /// How long it waited.
        timeout: Duration,
    },
}

/// A host-initiated connection to a guest port.
#[derive(Debug)]
pub struct VsockStream {
    /// The connected stream. Bytes the guest sent right after the handshake
    /// may sit in the reader's buffer, so read through it.
    pub stream: BufReader<UnixStream>,
    /// The host-side port Firecracker allocated (from `OK <port>`).
    pub host_port: u32,
}

/// Connects to `port` in the guest through the vsock socket `uds_path`.
pub async fn connect(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<VsockStream, VsockError> {
    let handshake = async {
        let mut stream =
            UnixStream::connect(uds_path)
                .await
                .map_err(|source| VsockError::Socket {
                    path: uds_path.to_owned(),
                    source,
                })?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|source| VsockError::Socket {
                path: uds_path.to_owned(),
                source,
            })?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|source| VsockError::Socket {
                path: uds_path.to_owned(),
                source,
            })?;
        if n == 0 {
            return Err(VsockError::Refused { port });
        }
        let host_port = line
            .strip_prefix("OK ")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| VsockError::BadAnswer {
                port,
                answer: line.clone(),
            })?;
        Ok(VsockStream {
            stream: reader,
            host_port,
        })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| VsockError::Timeout { port, timeout })?
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;
    use crate::testing::{FirecrackerDouble, GuestBehaviour, Spec};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sc-fc-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A double with a vsock device configured through its API.
    async fn double_with_vsock(d: &Path) -> (FirecrackerDouble, PathBuf) {
        let fc = FirecrackerDouble::new(
            Arc::new(Spec::fixture()),
            "vsock-test",
            GuestBehaviour {
                listening_ports: vec![52],
                agent_port: None,
                ..GuestBehaviour::default()
            },
        );
        let api = d.join("api.sock");
        fc.serve(&api).unwrap();
        let uds = d.join("v.sock");
        crate::client::FirecrackerClient::new(&api)
            .put_vsock(&crate::api::Vsock {
                guest_cid: 3,
                uds_path: uds.display().to_string(),
            })
            .await
            .unwrap();
        (fc, uds)
    }

    #[tokio::test]
    async fn host_initiated_connect_reaches_a_guest_listener() {
        let d = dir("ok");
        let (_fc, uds) = double_with_vsock(&d).await;
        let mut conn = connect(&uds, 52, Duration::from_secs(5)).await.unwrap();
        assert!(conn.host_port > 0);
        conn.stream.get_mut().write_all(b"ping\n").await.unwrap();
        let mut buf = [0u8; 5];
        conn.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn host_initiated_connect_to_a_closed_port_is_refused() {
        let d = dir("refused");
        let (_fc, uds) = double_with_vsock(&d).await;
        let e = connect(&uds, 53, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, VsockError::Refused { port: 53 }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_answers_garbage_is_reported() {
        let d = dir("garbage");
        let uds = d.join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut line = [0u8; 11];
            s.read_exact(&mut line).await.unwrap();
            s.write_all(b"NOPE\n").await.unwrap();
        });
        let e = connect(&uds, 52, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().contains("NOPE"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn guest_initiated_connection_arrives_on_the_port_socket() {
        let d = dir("guest");
        let uds = d.join("v.sock");
        let agent = guest_port_socket(&uds, crate::AGENT_VSOCK_PORT);
        assert_eq!(agent, d.join("v.sock_1024"));
        let listener = UnixListener::bind(&agent).unwrap();
        let fc = FirecrackerDouble::new(Arc::new(Spec::fixture()), "g", GuestBehaviour::default());
        let api = d.join("api.sock");
        fc.serve(&api).unwrap();
        let client = crate::client::FirecrackerClient::new(&api);
        client
            .put_vsock(&crate::api::Vsock {
                guest_cid: 3,
                uds_path: uds.display().to_string(),
            })
            .await
            .unwrap();
        let kernel = d.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        client
            .put_boot_source(&crate::api::BootSource {
                kernel_image_path: kernel.display().to_string(),
                boot_args: None,
                initrd_path: None,
            })
            .await
            .unwrap();
        client
            .action(crate::api::ActionType::InstanceStart)
            .await
            .unwrap();
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut frame).await.unwrap();
        let hello: serde_json::Value = serde_json::from_slice(&frame[1..]).unwrap();
        assert_eq!(hello["type"], "hello");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

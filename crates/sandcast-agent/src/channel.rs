//! The agent's end of the agent channel: connecting to the server over a Unix
//! socket (sandbox) or vsock (microVM) and the per-connection hello.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, bail};
use bytes::BytesMut;
use sandcast_proto::{FrameCodec, Hello, Message, PROTOCOL_VERSION, Role, encode_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket path (bound into the sandbox).
    Unix(PathBuf),
    /// A vsock address; the host is CID 2.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: empty socket path"));
            }
            return Ok(Target::Unix(path.into()));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected vsock:<cid>:<port>"))?;
            let cid = cid.parse().map_err(|_| format!("{s:?}: bad cid {cid:?}"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
            return Ok(Target::Vsock { cid, port });
        }
        Err(format!("{s:?}: expected unix:<path> or vsock:<cid>:<port>"))
    }
}

/// A connection of either kind.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// A boxed connection.
pub type BoxConn = Box<dyn Conn>;

/// Opens a connection and says hello with `role`; returns it once the server
/// has welcomed it. Nothing past the welcome frame is read, so a stream
/// connection can carry raw bytes from here on.
pub async fn open(target: &Target, role: Role) -> anyhow::Result<BoxConn> {
    let mut conn: BoxConn = match target {
        Target::Unix(path) => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("connecting to {}", path.display()))?,
        ),
        Target::Vsock { cid, port } => Box::new(
            tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                .await
                .with_context(|| format!("connecting to vsock {cid}:{port}"))?,
        ),
    };
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    });
    conn.write_all(&encode_message(&hello)).await?;
    match read_one(&mut conn).await? {
        Message::Welcome { .. } => Ok(conn),
        Message::Reject { reason } => bail!("server refused the connection: {reason}"),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// Reads exactly one control frame, and not a byte more.
async fn read_one(conn: &mut BoxConn) -> anyhow::Result<Message> {
    let len = conn.read_u32().await? as usize;
    if len > sandcast_proto::MAX_JSON_LEN + 1 {
        bail!("welcome frame of {len} bytes is too long");
    }
    let mut buf = BytesMut::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    buf.resize(4 + len, 0);
    conn.read_exact(&mut buf[4..]).await?;
    match FrameCodec.decode(&mut buf)? {
        Some(sandcast_proto::Frame::Message(msg)) => Ok(msg),
        Some(_) => bail!("expected a control frame"),
        None => Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            "unix:/run/sandcast/agent.sock".parse(),
            Ok(Target::Unix("/run/sandcast/agent.sock".into()))
        );
        assert_eq!(
            "vsock:2:1024".parse(),
            Ok(Target::Vsock { cid: 2, port: 1024 })
        );
        for bad in ["", "unix:", "vsock:2", "vsock:x:1", "tcp:1.2.3.4:5"] {
            let err = bad.parse::<Target>().unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[tokio::test]
    async fn hello_then_raw_bytes_are_not_swallowed() {
        let dir = std::env::temp_dir().join(format!("sc-agent-chan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut framed = tokio_util::codec::FramedRead::new(&mut s, FrameCodec);
            use futures::StreamExt;
            let hello = framed.next().await.unwrap().unwrap();
            drop(framed);
            // Welcome and raw bytes in one write: the agent must not eat the bytes.
            let mut out = encode_message(&Message::Welcome { protocol: 1 }).to_vec();
            out.extend_from_slice(b"RFB 003.008\n");
            s.write_all(&out).await.unwrap();
            hello
        });
        let mut conn = open(&Target::Unix(path.clone()), Role::Stream { id: 7 })
            .await
            .unwrap();
        let mut banner = [0u8; 12];
        conn.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"RFB 003.008\n");
        match server.await.unwrap() {
            sandcast_proto::Frame::Message(Message::Hello(h)) => {
                assert_eq!(h.role, Role::Stream { id: 7 })
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The server's side of the agent channel for the agent's tests: a Unix
//! listener in a temporary directory and the agent under test connected to it.

// Each test file uses a different part of this.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sandcast_proto::{Frame, FrameCodec, Message, PROTOCOL_VERSION, Role};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

/// A control, video or stream connection after its welcome.
pub type Channel = Framed<UnixStream, FrameCodec>;

/// The agent under test and the socket it connects to.
pub struct Harness {
    /// Temporary directory: the socket and the agent's HOME and TMPDIR.
    pub dir: PathBuf,
    listener: UnixListener,
    /// The agent process.
    pub agent: tokio::process::Child,
}

impl Harness {
    /// Starts the agent against a fresh socket; `name` keeps tests apart.
    pub fn new(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!("sc-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandcast-agent"))
            .arg("--connect")
            .arg(format!("unix:{}", sock.display()))
            .env("HOME", &dir)
            .env("TMPDIR", &dir)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Harness {
            dir,
            listener,
            agent,
        }
    }

    /// Accepts the next connection, checks its hello and welcomes it; nothing
    /// past the hello has been read, so raw bytes of a stream follow.
    pub async fn accept_raw(&self, want: Role) -> UnixStream {
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), self.listener.accept())
            .await
            .expect("no connection from the agent")
            .unwrap();
        let mut framed = Framed::new(&mut s, FrameCodec);
        match framed.next().await.unwrap().unwrap() {
            Frame::Message(Message::Hello(h)) => {
                assert_eq!(h.role, want);
                assert_eq!(h.protocol, PROTOCOL_VERSION);
            }
            other => panic!("expected hello, got {other:?}"),
        }
        framed
            .send(Message::Welcome {
                protocol: PROTOCOL_VERSION,
            })
            .await
            .unwrap();
        assert!(framed.read_buffer().is_empty());
        drop(framed);
        s
    }

    /// Like [`Harness::accept_raw`], framed.
    pub async fn accept(&self, want: Role) -> Channel {
        Framed::new(self.accept_raw(want).await, FrameCodec)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

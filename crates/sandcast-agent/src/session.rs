//! The agent's main loop: say hello, take the session's configuration, start
//! the supervisor and serve the server's requests until told to stop or until
//! the server goes away (then everything stops: a session never runs on
//! without its server).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use sandcast_proto::{Frame, FrameCodec, Message, Role, StreamTarget};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

use crate::channel::{self, Target};
use crate::logging;
use crate::media::{self, Media};
use crate::mmds;
use crate::supervisor::{Event, Supervisor};

/// Outgoing control messages waiting for the writer; logs beyond this are dropped.
const OUTBOX: usize = 2048;

/// Ends the session before anything runs: `reason` is said on the channel,
/// so the server fails the session with it.
async fn fail(
    mut framed: Framed<channel::BoxConn, FrameCodec>,
    reason: String,
) -> anyhow::Result<()> {
    framed
        .send(Message::Fatal {
            reason: reason.clone(),
        })
        .await?;
    let _ = SinkExt::<Message>::close(&mut framed).await;
    bail!(reason)
}

/// Runs one session to its end. In a microVM, `mmds` is where the agent
/// reads what the backend published and checks the configuration's agent
/// token against it before running anything; `None` elsewhere.
pub async fn run(target: Target, mmds: Option<SocketAddr>) -> anyhow::Result<()> {
    let conn = channel::open(&target, Role::Control)
        .await
        .context("opening the control connection")?;
    let mut framed = Framed::new(conn, FrameCodec);
    let config = loop {
        match framed.next().await {
            Some(Ok(Frame::Message(Message::Config(c)))) => break *c,
            Some(Ok(Frame::Message(Message::Ping { seq }))) => {
                framed.send(Message::Pong { seq }).await?;
            }
            Some(Ok(Frame::Message(Message::Shutdown))) | None => return Ok(()),
            Some(Ok(other)) => bail!("expected the session configuration, got {other:?}"),
            Some(Err(e)) => return Err(e).context("reading the session configuration"),
        }
    };
    if let Some(addr) = mmds
        && let Err(reason) = mmds::verify(&config, addr, mmds::FETCH_DEADLINE).await
    {
        return fail(framed, reason).await;
    }
    if config.server_time_ms > 0 {
        set_clock_if_behind(config.server_time_ms);
    }
    // The browser never runs without its URL filters.
    if let Some(policy) = &config.browser.policy
        && let Err(reason) = crate::policy::install(policy, Path::new("/"))
    {
        return fail(framed, reason).await;
    }
    let (mut sink, mut stream) = framed.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(OUTBOX);
    let writer = tokio::spawn(logging::sending(async move {
        while let Some(msg) = out_rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    }));
    // From here on, the media pipeline's and clipboard's warnings are the
    // session's log lines.
    let logs = logging::attach(out_tx.clone());

    let sizes = media::initial_sizes(config.width, config.height, &out_tx);
    let max_fps = config.max_fps;
    let h264_mode = media::h264_mode(config.h264_tuning);
    let mut supervisor = Supervisor::start(config, out_tx.clone(), sizes.clone()).await;
    let media = Media::spawn(
        target.clone(),
        out_tx.clone(),
        supervisor.display.clone(),
        sizes,
        max_fps,
        h264_mode,
    );
    let mut next_stream_ok = true;
    // The backend's stop is a SIGTERM: the children are stopped in order
    // (the browser gets to write its profile), as on `Shutdown`.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    let reason = loop {
        tokio::select! {
            _ = terminate.recv() => break "asked to stop (SIGTERM)".to_string(),
            frame = stream.next() => match frame {
                Some(Ok(Frame::Message(msg))) => match msg {
                    Message::Shutdown => break "the server asked to shut down".to_string(),
                    Message::Ping { seq } => { let _ = out_tx.send(Message::Pong { seq }).await; }
                    Message::Watched { watched } => supervisor.set_watched(watched),
                    Message::Claim(config) => {
                        agent_log(&out_tx, format!("claimed for session {}", config.session_id));
                        let out = out_tx.clone();
                        match supervisor.claim(*config) {
                            Ok(answer) => {
                                tokio::spawn(async move {
                                    let error = match answer.await {
                                        Ok(Ok(())) => None,
                                        Ok(Err(e)) => Some(e),
                                        Err(_) => Some("the browser went away before the page opened".into()),
                                    };
                                    let _ = out.send(Message::Claimed { error }).await;
                                });
                            }
                            Err(error) => {
                                let _ = out.send(Message::Claimed { error: Some(error) }).await;
                            }
                        }
                    }
                    Message::ChooseFiles { chooser, paths } => {
                        supervisor.choose(crate::devtools::Choice { chooser, paths });
                    }
                    Message::OpenStream { id, target: to @ (StreamTarget::Vnc | StreamTarget::Devtools) } => {
                        let (port, what) = if to == StreamTarget::Vnc {
                            (supervisor.vnc_port.clone(), "the VNC server")
                        } else {
                            (supervisor.devtools_port.clone(), "the browser's DevTools server")
                        };
                        let target = target.clone();
                        let out = out_tx.clone();
                        tokio::spawn(async move {
                            if let Err(e) = open_local_stream(&target, id, port, what).await {
                                agent_log(&out, format!("stream {id} to {what}: {e:#}"));
                            }
                        });
                    }
                    Message::OpenStream { id, target: StreamTarget::File(op) } => {
                        let target = target.clone();
                        let out = out_tx.clone();
                        tokio::spawn(async move {
                            let home = std::env::var_os("HOME")
                                .map(std::path::PathBuf::from)
                                .unwrap_or_else(|| sandcast_proto::files::SESSION_HOME.into());
                            let result = match channel::open(&target, Role::Stream { id }).await {
                                Ok(conn) => crate::files::serve(conn, op, &home).await,
                                Err(e) => Err(e),
                            };
                            if let Err(e) = result {
                                agent_log(&out, format!("file stream {id}: {e:#}"));
                            }
                        });
                    }
                    msg @ (Message::Input(_)
                    | Message::Clipboard { .. }
                    | Message::Resize { .. }
                    | Message::Video(_)) => media.handle(msg),
                    other => {
                        if next_stream_ok {
                            agent_log(&out_tx, format!("ignoring unsupported message {}", kind_of(&other)));
                            next_stream_ok = false;
                        }
                    }
                },
                Some(Ok(Frame::Video(_))) => {}
                Some(Err(e)) => break format!("the control connection failed: {e}"),
                None => break "the server closed the control connection".to_string(),
            },
            ev = supervisor.events.recv() => match ev {
                Some(Event::Ready) => { let _ = out_tx.send(Message::Ready).await; }
                Some(Event::LaunchEnded(exit)) => { let _ = out_tx.send(Message::LaunchEnded { exit }).await; }
                Some(Event::Fatal(reason)) => {
                    let _ = out_tx.send(Message::Fatal { reason: reason.clone() }).await;
                    break reason;
                }
                None => break "the supervisor ended".to_string(),
            },
        }
    };
    agent_log(&out_tx, format!("stopping: {reason}"));
    media.stop();
    supervisor.shutdown().await;
    drop(logs);
    drop(out_tx);
    // Give the writer a moment to flush the last reports; the server may be gone.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

/// Opens a stream connection for `id` and splices it to a server on the
/// session's loopback (the VNC server, the browser's DevTools) once its
/// port is known.
async fn open_local_stream(
    target: &Target,
    id: u64,
    mut port: tokio::sync::watch::Receiver<Option<u16>>,
    what: &str,
) -> anyhow::Result<()> {
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(p) = *port.borrow_and_update() {
                return Ok(p);
            }
            if port.changed().await.is_err() {
                bail!("{what} is gone");
            }
        }
    })
    .await
    .with_context(|| format!("{what} is not up"))??;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to {what}"))?;
    tcp.set_nodelay(true)?;
    let mut conn = channel::open(target, Role::Stream { id }).await?;
    tokio::io::copy_bidirectional(&mut conn, &mut tcp).await?;
    Ok(())
}

fn agent_log(out: &mpsc::Sender<Message>, line: String) {
    let _ = out.try_send(Message::Log(sandcast_proto::LogLine {
        source: "agent".into(),
        stream: sandcast_proto::LogStream::Agent,
        line,
    }));
}

fn kind_of(msg: &Message) -> String {
    serde_json::to_value(msg)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(String::from))
        .unwrap_or_default()
}

/// A microVM restored from a snapshot wakes with the clock of the snapshot;
/// the server's time is the best we have. Only ever moves the clock forward,
/// and only where the agent may (it is PID 1 in a microVM).
fn set_clock_if_behind(server_ms: u64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if server_ms > now_ms + 2000 {
        let ts = libc::timespec {
            tv_sec: (server_ms / 1000) as libc::time_t,
            tv_nsec: ((server_ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec; failure (no CAP_SYS_TIME) is harmless.
        unsafe {
            libc::clock_settime(libc::CLOCK_REALTIME, &ts);
        }
    }
}

#[cfg(test)]
mod tests {
    use sandcast_proto::{Hello, PROTOCOL_VERSION};
    use serde_json::json;
    use tokio::net::UnixListener;

    use super::*;
    use crate::mmds::tests::{config, mmds_standin};

    /// The server's side: welcomes the control connection, sends `config`,
    /// and returns every message the agent sent after that.
    async fn serve_one(
        listener: UnixListener,
        config: sandcast_proto::SessionConfig,
    ) -> Vec<Message> {
        let (conn, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(conn, FrameCodec);
        match framed.next().await {
            Some(Ok(Frame::Message(Message::Hello(Hello {
                role: Role::Control,
                ..
            })))) => {}
            other => panic!("expected a control hello, got {other:?}"),
        }
        framed
            .send(Message::Welcome {
                protocol: PROTOCOL_VERSION,
            })
            .await
            .unwrap();
        framed
            .send(Message::Config(Box::new(config)))
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(Ok(Frame::Message(m))) = framed.next().await {
            got.push(m);
        }
        got
    }

    #[tokio::test]
    async fn a_vm_agent_refuses_a_configuration_whose_token_mmds_does_not_vouch_for() {
        let dir = std::env::temp_dir().join(format!("sc-agent-mmds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let hash = sandcast_proto::AgentToken::new("the-right-token").sha256_hex();
        let mmds = mmds_standin(json!({"sandcast": {
            "session_id": "s1", "agent_vsock_port": 1024, "agent_token_sha256": hash,
        }}))
        .await;
        let server = tokio::spawn(serve_one(listener, config("s1", Some("a-wrong-token"))));

        let err = run(Target::Unix(sock), Some(mmds)).await.unwrap_err();
        let said = server.await.unwrap();
        let reason = format!("{err:#}");
        assert!(
            reason.contains("does not match the hash in MMDS"),
            "{reason}"
        );
        // The server heard the same reason, and nothing was started.
        assert_eq!(
            said,
            [Message::Fatal {
                reason: reason.clone()
            }],
            "{said:?}"
        );
        assert!(!reason.contains("a-wrong-token"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

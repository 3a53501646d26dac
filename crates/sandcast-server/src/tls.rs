//! TLS built in: HTTPS, and so WSS, on the listen address with rustls when
//! `tls_cert` and `tls_key` are set.
//!
//! [`Tls`] holds the current certificate behind a resolver that every new
//! handshake asks, and [`Tls::watch`] swaps it when the files change (checked
//! by modification time, size and inode every few seconds, so a `mv` over the
//! old file, a symlink switched by a secret manager and an in-place write all
//! count). A pair that does not load (unreadable, not PEM, key not matching
//! the certificate) is logged and the old one kept. [`TlsListener`] plugs into
//! `axum::serve`, so connection info and graceful shutdown work as they do
//! over plain TCP; each handshake runs in its connection's own task, never in
//! the accept loop, and is given [`HANDSHAKE_TIMEOUT`].
//!
//! Everything TLS in sandcast, the `sandcast` command's client included, uses
//! [`provider`], so server and client share one rustls stack.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How often the certificate and key files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The longest a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crypto provider of every rustls configuration sandcast makes: ring,
/// which the `sandcast` command's HTTP client (ureq) is built with too.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        e => format!("not valid PEM ({e:?})"),
    }
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
            path.display()
        ),
        e => format!("{}: {}", path.display(), pem_error(e)),
    })
}

/// Loads a certificate chain and its private key, and checks that they
/// belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = load_certs(cert)?;
    let signing = provider()
        .key_provider
        .load_private_key(load_key(key)?)
        .map_err(|e| format!("{}: not a usable private key: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        // A key type whose public half rustls cannot compute: accepted, as
        // rustls itself does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "the key in {} does not belong to the certificate in {}",
            key.display(),
            cert.display()
        )),
        Err(e) => Err(format!("{}: not a usable certificate: {e}", cert.display())),
    }
}

/// A warning when the private key file can be read or written by users
/// other than its owner; `None` when it cannot (or it cannot be checked).
pub fn key_mode_warning(key: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the TLS private key {} has mode {mode:04o}: other users of this host can read it; chmod 600 it",
            key.display()
        )
    })
}

/// A rustls client configuration trusting only the certificates in `ca`
/// (a private CA, or a self-signed server certificate).
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What a file looked like when last read: a change to any of these is a
/// new file to load.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // Follows symlinks: a link switched to a new target is a change.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The certificate every new handshake gets; replaced on reload.
#[derive(Debug)]
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The outcome of the latest reload attempt, for whoever watches it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Reload attempts so far (one per change seen in the files).
    pub attempts: u64,
    /// Why the latest attempt kept the old certificate; `None` when it loaded.
    pub error: Option<String>,
}

/// TLS for the server: its configuration and the files it reloads from.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The files as they were just before they were loaded.
    loaded: (Option<Stamp>, Option<Stamp>),
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    status: watch::Sender<ReloadStatus>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the pair; an error names the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        // Taken first: a change while the files are read is seen later.
        let loaded = (stamp(cert), stamp(key));
        let pair = load_pair(cert, key)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(pair)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The router speaks HTTP/1.1 only (WebSockets upgrade over it).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            loaded,
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            status: watch::channel(ReloadStatus::default()).0,
        })
    }

    /// The certificate chain new handshakes present now.
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.resolver
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cert
            .clone()
    }

    /// Reload outcomes as they happen.
    pub fn subscribe(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// A listener serving TLS over `tcp`, for `axum::serve`.
    pub fn listener(&self, tcp: TcpListener) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: self.acceptor.clone(),
        }
    }

    /// Loads the files again; on success new handshakes get the new pair,
    /// on failure the current one stays and the error is returned.
    fn reload(&self) -> Result<(), String> {
        let pair = load_pair(&self.cert, &self.key)?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(())
    }

    /// Checks the files every `every` and reloads them when they changed,
    /// until the returned task is aborted.
    pub fn watch(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut seen = self.loaded.clone();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = (stamp(&self.cert), stamp(&self.key));
                if now == seen {
                    continue;
                }
                seen = now;
                let error = match self.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                        if let Some(w) = key_mode_warning(&self.key) {
                            tracing::warn!("{w}");
                        }
                        None
                    }
                    Err(e) => {
                        tracing::error!(
                            "TLS certificate not reloaded, the previous one stays: {e}"
                        );
                        Some(e)
                    }
                };
                self.status.send_modify(|s| {
                    s.attempts += 1;
                    s.error = error;
                });
            }
        })
    }
}

/// A TCP listener whose connections speak TLS; `axum::serve` takes it
/// (wrapped by `tap_io`, through which axum hands a custom listener's
/// `SocketAddr` to `ConnectInfo`).
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        loop {
            match self.tcp.accept().await {
                Ok((stream, addr)) => {
                    // As on the plain listener: small writes go out at once.
                    let _ = stream.set_nodelay(true);
                    return (
                        TlsConn {
                            state: ConnState::Handshake(Box::new(self.acceptor.accept(stream))),
                            deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)),
                        },
                        addr,
                    );
                }
                Err(e) => accept_error(e).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

// As axum's own TCP listener does: a connection that died before it was
// accepted is nothing; anything else (out of file descriptors) is logged and
// waited out rather than spun on.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One server-side TLS connection; its handshake runs on first use, in the
/// task serving the connection.
pub struct TlsConn {
    state: ConnState,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

enum ConnState {
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    Ready(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Failed,
}

impl TlsConn {
    fn poll_stream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<&mut tokio_rustls::server::TlsStream<TcpStream>>> {
        if let ConnState::Handshake(accept) = &mut self.state {
            let done = match Pin::new(accept).poll(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    ready!(self.deadline.as_mut().poll(cx));
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    ))
                }
            };
            match done {
                Ok(stream) => self.state = ConnState::Ready(Box::new(stream)),
                Err(e) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    self.state = ConnState::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        match &mut self.state {
            ConnState::Ready(s) => Poll::Ready(Ok(&mut **s)),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS handshake failed",
            ))),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(s).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let s = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(s).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let s = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(s).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let s = ready!(self.get_mut().poll_stream(cx))?;
        Pin::new(s).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            ConnState::Ready(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            // Nothing was said over TLS: there is nothing to close but TCP,
            // which dropping the connection does.
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ConnectInfo;
    use axum::serve::ListenerExt;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA and a certificate it signed for localhost and 127.0.0.1, as PEM.
    struct Pki {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
        cert_der: CertificateDer<'static>,
    }

    fn pki(name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {name}"));
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        }
    }

    /// Replaces a file as deployment tools do: a new file moved over the old.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    struct Files {
        dir: tempfile::TempDir,
        cert: PathBuf,
        key: PathBuf,
    }

    impl Files {
        fn new(p: &Pki) -> Files {
            let dir = tempfile::tempdir().unwrap();
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert, &p.cert_pem).unwrap();
            std::fs::write(&key, &p.key_pem).unwrap();
            Files { dir, cert, key }
        }

        fn ca(&self, p: &Pki, name: &str) -> PathBuf {
            let path = self.dir.path().join(format!("{name}.pem"));
            std::fs::write(&path, &p.ca_pem).unwrap();
            path
        }
    }

    /// GET /who over TLS trusting only `ca`: the certificate the server
    /// presented and the body of the answer.
    async fn get(port: u16, ca: &Path) -> Result<(CertificateDer<'static>, String), String> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca)?));
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        // The server may close without close_notify once the answer is out.
        let _ = tls.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((peer, body))
    }

    struct Served {
        port: u16,
        tls: Arc<Tls>,
        stop: tokio::sync::oneshot::Sender<()>,
        done: tokio::task::JoinHandle<()>,
        watcher: tokio::task::JoinHandle<()>,
    }

    /// The real listener under `axum::serve` as `run` sets it up, with a
    /// route answering the peer address axum hands to `ConnectInfo`.
    async fn serve(files: &Files, every: Duration) -> Served {
        let tls = Arc::new(Tls::load(&files.cert, &files.key).unwrap());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/who",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.ip().to_string()
            }),
        );
        let listener = tls.listener(tcp).tap_io(|_| {});
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let watcher = tls.clone().watch(every);
        Served {
            port,
            tls,
            stop,
            done,
            watcher,
        }
    }

    /// Waits until the reload status satisfies `pred`.
    async fn reload_until(
        rx: &mut watch::Receiver<ReloadStatus>,
        pred: impl FnMut(&ReloadStatus) -> bool,
    ) -> ReloadStatus {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(pred))
            .await
            .expect("the reload status within 10 s")
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn serves_https_and_reloads_a_new_pair_but_not_a_broken_one() {
        let (a, b) = (pki("a"), pki("b"));
        let files = Files::new(&a);
        let (ca_a, ca_b) = (files.ca(&a, "ca-a"), files.ca(&b, "ca-b"));
        let s = serve(&files, Duration::from_millis(20)).await;
        let mut reloads = s.tls.subscribe();

        let (peer, body) = get(s.port, &ca_a).await.unwrap();
        assert_eq!(peer, a.cert_der);
        assert_eq!(body, "127.0.0.1", "ConnectInfo carries the peer address");
        assert!(get(s.port, &ca_b).await.is_err(), "B is not served yet");

        // New files: the next connection gets B. (The two replacements may
        // be seen as one change or as two, the first a mismatched pair that
        // is kept out; either way the last attempt loads B.)
        replace(&files.cert, &b.cert_pem);
        replace(&files.key, &b.key_pem);
        reload_until(&mut reloads, |s| s.attempts > 0 && s.error.is_none()).await;
        let (peer, _) = get(s.port, &ca_b).await.unwrap();
        assert_eq!(peer, b.cert_der);
        let e = get(s.port, &ca_a).await.unwrap_err();
        assert!(e.contains("certificate"), "{e}");

        // A key that is not B's: logged and refused, B stays.
        replace(&files.key, &a.key_pem);
        let st = reload_until(&mut reloads, |s| s.error.is_some()).await;
        let err = st.error.unwrap();
        assert!(err.contains("does not belong"), "{err}");
        assert_eq!(get(s.port, &ca_b).await.unwrap().0, b.cert_der);
        assert_eq!(s.tls.current_chain(), vec![b.cert_der.clone()]);

        // A file that is not PEM at all: the same.
        replace(&files.cert, "not a certificate\n");
        let st = reload_until(&mut reloads, |s| {
            s.error
                .as_ref()
                .is_some_and(|e| e.contains("no PEM certificate"))
        })
        .await;
        assert!(st.error.unwrap().contains("cert.pem"));
        assert_eq!(get(s.port, &ca_b).await.unwrap().0, b.cert_der);

        // Graceful shutdown still ends the server.
        s.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.done)
            .await
            .expect("server stops on the shutdown signal")
            .unwrap();
        s.watcher.abort();
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_others_and_plain_http_gets_no_answer() {
        let a = pki("a");
        let files = Files::new(&a);
        let ca = files.ca(&a, "ca");
        let s = serve(&files, RELOAD_INTERVAL).await;

        // Connected, never says a word: handshakes run per connection, not
        // in the accept loop, so the next client is served.
        let _silent = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        let (peer, _) = tokio::time::timeout(Duration::from_secs(5), get(s.port, &ca))
            .await
            .expect("served beside a silent connection")
            .unwrap();
        assert_eq!(peer, a.cert_der);

        // Plain HTTP to the TLS port is a failed handshake, never an answer.
        let mut plain = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        plain
            .write_all(b"GET /who HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out))
            .await
            .expect("the server closes a plain HTTP connection");
        assert!(
            !out.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        s.watcher.abort();
        s.done.abort();
    }

    #[test]
    fn bad_files_are_named_and_a_readable_key_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (pki("a"), pki("b"));
        let files = Files::new(&a);
        assert!(load_pair(&files.cert, &files.key).is_ok());

        let missing = files.dir.path().join("nope.pem");
        let e = load_pair(&missing, &files.key).unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");
        let e = load_pair(&files.key, &files.key).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = load_pair(&files.cert, &files.cert).unwrap_err();
        assert!(e.contains("no PEM private key"), "{e}");
        std::fs::write(&files.key, &b.key_pem).unwrap();
        let e = load_pair(&files.cert, &files.key).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        assert!(Tls::load(&files.cert, &files.key).is_err());

        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = key_mode_warning(&files.key).expect("0644 is warned about");
        assert!(w.contains("0644") && w.contains("key.pem"), "{w}");
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(key_mode_warning(&files.key), None);
    }
}

//! The egress policy on this host's real network stack: session namespaces
//! made by the host layer, probing test hosts that live in network
//! namespaces this test makes.
//!
//! No probe leaves this machine: the "private" host (10.123.0.2,
//! 192.168.123.2, 169.254.169.254) and the "public" one (100.201.0.2, an
//! address outside every special-purpose range) are veth peers in test
//! namespaces, their routes are installed (and checked) before the first
//! probe, and the session pool is a blackhole route so that even a broken
//! policy cannot forward a session's packet to the default gateway. Needs
//! root.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sandcast_backend::Egress;
use sandcast_host::state::Record;
use sandcast_host::{Host, HostConfig};

const POOL: &str = "100.75.0.0/16";
const PRIVATE_10: &str = "10.123.0.2";
const PRIVATE_192: &str = "192.168.123.2";
const METADATA: &str = "169.254.169.254";
const PUBLIC: &str = "100.201.0.2";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tag() -> String {
    format!("{:06x}", std::process::id() & 0xff_ffff)
}

/// Runs `f` on a thread inside network namespace `ns` (a path).
fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we own.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

/// A TCP server answering every connection with its greeting, in a
/// namespace (or on the host with `None`), until dropped.
struct Greeter {
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Greeter {
    fn start(ns: Option<&Path>, port: u16, greeting: &'static str) -> Greeter {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let file = ns.map(|p| std::fs::File::open(p).unwrap());
        std::thread::spawn(move || {
            if let Some(f) = file {
                // SAFETY: as in in_netns.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            }
            let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(greeting.as_bytes());
                    }
                    // Non-blocking accept: the stop flag is checked between tries.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Greeter { stop, port }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A test host: a namespace behind a veth whose host end holds `host_addrs`
/// and whose peer holds `addrs`, plus host routes `routes` to it.
struct TestHost {
    netns: String,
    veth: String,
    routes: Vec<String>,
}

impl TestHost {
    fn new(name: &str, host_addrs: &[&str], addrs: &[&str], routes: &[&str]) -> TestHost {
        let netns = format!("hntest-{name}-{}", tag());
        let veth = format!("hnt{name}{}", &tag()[..4]);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &veth])
            .status();
        let t = TestHost {
            netns: netns.clone(),
            veth: veth.clone(),
            routes: routes.iter().map(ToString::to_string).collect(),
        };
        sh(&["ip", "netns", "add", &netns]);
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        for a in host_addrs {
            sh(&["ip", "addr", "add", a, "dev", &veth]);
        }
        sh(&["ip", "link", "set", &veth, "up"]);
        for a in addrs {
            sh(&["ip", "-n", &netns, "addr", "add", a, "dev", "eth0"]);
        }
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let gw = host_addrs[0].split('/').next().unwrap();
        sh(&["ip", "-n", &netns, "route", "add", "default", "via", gw]);
        for r in routes {
            // Another test may hold the same route for a moment.
            let mut tries = 0;
            while std::process::Command::new("ip")
                .args(["route", "add", r, "dev", &veth])
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
            {
                tries += 1;
                assert!(tries < 300, "cannot add the route {r}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        t
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Asserts that the host routes `addr` into this test host.
    fn assert_routes(&self, addr: &str) {
        let r = sh(&["ip", "route", "get", addr]);
        assert!(
            r.contains(&format!("dev {}", self.veth)),
            "{addr} is not routed to the test host: {r}"
        );
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for r in &self.routes {
            let _ = std::process::Command::new("ip")
                .args(["route", "del", r, "dev", &self.veth])
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A host layer of its own (own state directory, so own instance).
struct Layer {
    host: Host,
    dir: tempfile::TempDir,
}

fn layer(egress_allow: &[&str], dns: &str) -> Layer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HostConfig {
        name_prefix: "hntest".into(),
        subnet: POOL.into(),
        egress_allow: egress_allow.iter().map(ToString::to_string).collect(),
        dns: vec![dns.parse().unwrap()],
        cgroup_parent: "sandcast-host-test".into(),
        ..HostConfig::default()
    };
    let host = Host::new(&cfg, &dir.path().join("state"), "").unwrap();
    Layer { host, dir }
}

impl Drop for Layer {
    fn drop(&mut self) {
        let host = &self.host;
        // On a thread of its own: Drop may run inside the test's runtime.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let (records, _) = host.records();
                    for r in &records {
                        let _ = host.teardown(r).await;
                        let _ = host.forget(&r.id);
                    }
                    let _ = host.reap_unrecorded(&HashSet::new()).await;
                });
            });
        });
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &host.policy().table])
            .status();
        for root in ["memory", "cpu", "pids", "unified", ""] {
            let p = Path::new("/sys/fs/cgroup")
                .join(root)
                .join(host.cgroup_parent());
            let _ = std::fs::remove_dir(&p);
            let _ = std::fs::remove_dir(p.parent().unwrap());
        }
        let _ = self.dir.path();
    }
}

/// Connects from inside `session` to each target at once; the greeting
/// read back, or `None` when it could not connect (1.5 s each).
fn probe_all(
    session: &Record,
    targets: &[(&'static str, SocketAddr)],
) -> Vec<(&'static str, Option<String>)> {
    let ns = Path::new("/run/netns").join(&session.netns);
    let handles: Vec<_> = targets
        .iter()
        .map(|(name, addr)| {
            let (ns, addr, name) = (ns.clone(), *addr, *name);
            std::thread::spawn(move || {
                let got = in_netns(&ns, move || {
                    let mut c =
                        TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).ok()?;
                    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    let mut s = String::new();
                    c.read_to_string(&mut s).ok()?;
                    Some(s)
                });
                (name, got)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Every address of this host, IPv4 and IPv6.
fn host_addresses() -> Vec<IpAddr> {
    let out = sh(&["ip", "-j", "addr", "show"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str()?.parse().ok())
        .filter(|a: &IpAddr| !matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reach_the_public_test_host_and_nothing_private() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (network namespaces, nftables)");
        return;
    }
    // The pool never leaves this machine, whatever the policy does.
    let blackhole = BlackholeRoute::new(POOL);
    let private = TestHost::new(
        "p",
        &["10.123.0.1/24", "192.168.123.1/24"],
        &["10.123.0.2/24", "192.168.123.2/24", "169.254.169.254/32"],
        &["169.254.169.254/32"],
    );
    let public = TestHost::new("u", &["100.201.0.1/24"], &["100.201.0.2/24"], &[]);
    for a in [PRIVATE_10, PRIVATE_192, METADATA] {
        private.assert_routes(a);
    }
    public.assert_routes(PUBLIC);
    let pool_route = sh(&["ip", "route", "show", POOL]);
    assert!(
        pool_route.contains("blackhole"),
        "the pool is not blackholed: {pool_route}"
    );

    // Servers: the private host (and its DNS port), the public host on two
    // ports, and the host itself on every address.
    let priv_web = Greeter::start(Some(&private.path()), 0, "private");
    let priv_dns = Greeter::start(Some(&private.path()), 53, "resolver");
    let pub_web = Greeter::start(Some(&public.path()), 0, "public");
    let pub_other = Greeter::start(Some(&public.path()), 0, "public-other");
    let host_api = Greeter::start(None, 0, "host");

    // The test resolver sits on a private address: the policy opens exactly it, on port 53.
    let a = layer(&[], PRIVATE_10);
    let (internet, none, listed, peer) = (
        a.host
            .create(
                "s-internet",
                &Egress::Internet,
                PathBuf::new(),
                serde_json::Value::Null,
            )
            .await
            .unwrap(),
        a.host
            .create(
                "s-none",
                &Egress::None,
                PathBuf::new(),
                serde_json::Value::Null,
            )
            .await
            .unwrap(),
        a.host
            .create(
                "s-listed",
                &Egress::allow_list(&[format!("{PUBLIC}:{}", pub_web.port)]).unwrap(),
                PathBuf::new(),
                serde_json::Value::Null,
            )
            .await
            .unwrap(),
        a.host
            .create(
                "s-peer",
                &Egress::Internet,
                PathBuf::new(),
                serde_json::Value::Null,
            )
            .await
            .unwrap(),
    );
    let peer_web = Greeter::start(Some(&Path::new("/run/netns").join(&peer.netns)), 0, "peer");
    // Positive control: the peer session's server answers inside its namespace.
    let peer_addr = sa(&peer.session_addr.to_string(), peer_web.port);
    assert_eq!(
        in_netns(&Path::new("/run/netns").join(&peer.netns), move || {
            let mut c = TcpStream::connect_timeout(&peer_addr, Duration::from_secs(2)).ok()?;
            let mut s = String::new();
            c.read_to_string(&mut s).ok()?;
            Some(s)
        })
        .as_deref(),
        Some("peer")
    );
    // And the host reaches its own API port on each of its addresses.
    let host_addrs = host_addresses();
    assert!(host_addrs.iter().any(|a| a.to_string() == "10.123.0.1"));
    for addr in &host_addrs {
        if addr.is_ipv4() {
            assert!(
                TcpStream::connect_timeout(
                    &SocketAddr::new(*addr, host_api.port),
                    Duration::from_secs(2)
                )
                .is_ok(),
                "the host does not reach itself on {addr}"
            );
        }
    }

    let mut denied: Vec<(&'static str, SocketAddr)> = vec![
        ("private 10/8", sa(PRIVATE_10, priv_web.port)),
        ("private 192.168/16", sa(PRIVATE_192, priv_web.port)),
        ("link-local metadata", sa(METADATA, priv_web.port)),
        ("resolver on another port", sa(PRIVATE_10, priv_web.port)),
        ("loopback", sa("127.0.0.1", host_api.port)),
        (
            "gateway",
            sa(&internet.host_addr.to_string(), host_api.port),
        ),
        ("other session", peer_addr),
    ];
    for addr in &host_addrs {
        // Leaked so that the probe table can name them.
        let name: &'static str = Box::leak(format!("host address {addr}").into_boxed_str());
        denied.push((name, SocketAddr::new(*addr, host_api.port)));
    }
    let public_web = ("public host", sa(PUBLIC, pub_web.port));
    let public_other = ("public host, other port", sa(PUBLIC, pub_other.port));
    let dns = ("resolver port 53", sa(PRIVATE_10, 53));

    // "internet": the public host and the resolver, nothing else.
    let mut targets = denied.clone();
    targets.extend([public_web, public_other, dns]);
    let got = probe_all(&internet, &targets);
    eprintln!("internet: {got:#?}");
    for (name, r) in &got {
        let want = match *name {
            "public host" => Some("public"),
            "public host, other port" => Some("public-other"),
            "resolver port 53" => Some("resolver"),
            _ => None,
        };
        assert_eq!(r.as_deref(), want, "internet session, {name}");
    }

    // "none": nothing, not even the resolver.
    let got = probe_all(&none, &targets);
    for (name, r) in &got {
        assert_eq!(r, &None, "egress none reached {name}");
    }

    // An allow list: exactly its address and port (and the resolver).
    let got = probe_all(&listed, &targets);
    for (name, r) in &got {
        let want = match *name {
            "public host" => Some("public"),
            "resolver port 53" => Some("resolver"),
            _ => None,
        };
        assert_eq!(r.as_deref(), want, "listed session, {name}");
    }

    // Fail closed: an interface taken out of the sessions set forwards
    // nothing, though it is still in the internet set.
    let t = &a.host.policy().table;
    sh(&[
        "nft",
        "delete",
        "element",
        "inet",
        t,
        "sessions",
        &format!("{{ \"{}\" }}", internet.veth),
    ]);
    let got = probe_all(&internet, &[public_web]);
    assert_eq!(
        got[0].1, None,
        "a session outside the sets reached the public host"
    );
    a.host.rebuild(None).await.unwrap();
    let got = probe_all(&internet, &[public_web]);
    assert_eq!(
        got[0].1.as_deref(),
        Some("public"),
        "rebuilt from the records"
    );

    // A second instance opens 10.123.0.0/24 to its sessions; rewriting its
    // table leaves the first instance's sessions and elements alone.
    let b = layer(&["10.123.0.0/24"], PRIVATE_10);
    assert_ne!(b.host.instance(), a.host.instance());
    let opened = b
        .host
        .create(
            "s-opened",
            &Egress::Internet,
            PathBuf::new(),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    b.host.rebuild(None).await.unwrap();
    let got = probe_all(
        &opened,
        &[
            ("opened private", sa(PRIVATE_10, priv_web.port)),
            ("still private", sa(PRIVATE_192, priv_web.port)),
            ("metadata", sa(METADATA, priv_web.port)),
            ("other instance's session", peer_addr),
            public_web,
        ],
    );
    let want = [Some("private"), None, None, None, Some("public")];
    for ((name, r), w) in got.iter().zip(want) {
        assert_eq!(r.as_deref(), w, "second instance, {name}");
    }
    let set = sh(&["nft", "list", "set", "inet", t, "sessions"]);
    for rec in [&internet, &none, &listed, &peer] {
        assert!(
            set.contains(&rec.veth),
            "{} dropped from the first table: {set}",
            rec.veth
        );
    }
    let got = probe_all(
        &internet,
        &[
            public_web,
            ("opened elsewhere", sa(PRIVATE_10, priv_web.port)),
        ],
    );
    assert_eq!(got[0].1.as_deref(), Some("public"));
    assert_eq!(
        got[1].1, None,
        "the second instance's egress_allow opened the first's sessions"
    );

    // Teardown removes exactly what was made.
    for rec in [&internet, &none, &listed, &peer] {
        let (_, errors) = a.host.teardown(rec).await;
        assert!(errors.is_empty(), "{errors:?}");
        a.host.forget(&rec.id).unwrap();
        assert!(!Path::new("/run/netns").join(&rec.netns).exists());
        assert!(!Path::new("/sys/class/net").join(&rec.veth).exists());
    }
    let set = sh(&["nft", "list", "set", "inet", t, "sessions"]);
    assert!(!set.contains("sc-"), "{set}");
    // The second instance's session is untouched by the first's teardown.
    assert!(Path::new("/run/netns").join(&opened.netns).exists());
    drop((priv_web, priv_dns, pub_web, pub_other, host_api, peer_web));
    drop((b, a, private, public, blackhole));
}

/// A blackhole route removed on drop.
struct BlackholeRoute(String);

impl BlackholeRoute {
    fn new(net: &str) -> BlackholeRoute {
        let _ = std::process::Command::new("ip")
            .args(["route", "del", "blackhole", net])
            .status();
        sh(&["ip", "route", "add", "blackhole", net]);
        BlackholeRoute(net.to_string())
    }
}

impl Drop for BlackholeRoute {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["route", "del", "blackhole", &self.0])
            .status();
    }
}

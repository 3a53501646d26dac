//! `sandcast bench view --impair "delay=20ms,loss=1%,rate=8mbit"`: the
//! viewer behind an impaired link that never leaves this machine.
//!
//! The viewer (node and its Chromium) runs in a network namespace of its
//! own, joined to the host by a veth pair on 198.18.0.0/15 (the range set
//! aside for benchmarks). Its only routes lead to that veth's host end and
//! to this machine's own addresses the server advertises for WebRTC, so
//! every packet stays on this machine. The server is reached through a TCP
//! relay on the host end. On the host end, both directions pass an
//! iptables chain of the benchmark's own: random loss (`statistic`), then
//! the benchmark's NFQUEUE, where a thread holds each packet for `delay`
//! (this kernel has no netem). `rate` is a token bucket (`tbf`) on both
//! ends. Everything is removed when the [`Link`] is dropped.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// What the link does to every packet, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Impairment {
    /// Added to every packet in each direction (the round trip gets twice).
    pub delay: Duration,
    /// Packets dropped at random, in thousandths.
    pub loss_permille: u32,
    /// The link's rate each way, in kbit/s.
    pub rate_kbit: Option<u32>,
}

impl FromStr for Impairment {
    type Err = String;

    /// `delay=20ms,loss=1%,rate=8mbit` (any of them, in any order).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut imp = Impairment::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("{part:?} is not key=value (delay=20ms, loss=1%, rate=8mbit)")
            })?;
            let bad = || format!("{key}={value:?} is not valid (delay=20ms, loss=1%, rate=8mbit)");
            match key {
                "delay" => {
                    let ms = if let Some(v) = value.strip_suffix("ms") {
                        v.parse::<u64>().map_err(|_| bad())?
                    } else if let Some(v) = value.strip_suffix('s') {
                        v.parse::<u64>().map_err(|_| bad())? * 1000
                    } else {
                        return Err(bad());
                    };
                    if ms > 5000 {
                        return Err(format!("delay={value} is more than 5 s"));
                    }
                    imp.delay = Duration::from_millis(ms);
                }
                "loss" => {
                    let pct: f64 = value
                        .strip_suffix('%')
                        .ok_or_else(bad)?
                        .parse()
                        .map_err(|_| bad())?;
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(format!("loss={value} is not between 0% and 100%"));
                    }
                    imp.loss_permille = (pct * 10.0).round() as u32;
                }
                "rate" => {
                    let kbit = if let Some(v) = value.strip_suffix("mbit") {
                        v.parse::<u32>().map_err(|_| bad())?.saturating_mul(1000)
                    } else if let Some(v) = value.strip_suffix("kbit") {
                        v.parse::<u32>().map_err(|_| bad())?
                    } else {
                        return Err(bad());
                    };
                    if kbit < 64 {
                        return Err(format!("rate={value} is below 64kbit"));
                    }
                    imp.rate_kbit = Some(kbit);
                }
                _ => return Err(format!("unknown impairment {key:?} (delay, loss, rate)")),
            }
        }
        Ok(imp)
    }
}

impl std::fmt::Display for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delay {} ms each way, loss {:.1} %",
            self.delay.as_millis(),
            f64::from(self.loss_permille) / 10.0
        )?;
        match self.rate_kbit {
            Some(k) => write!(f, ", rate {k} kbit/s each way"),
            None => write!(f, ", no rate limit"),
        }
    }
}

/// Runs a command; an error names it and what it printed.
fn run<S: AsRef<str>>(program: &str, args: &[S]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new(program)
        .args(&args)
        .output()
        .with_context(|| format!("running {program} (is it installed? iproute2, iptables)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The viewer's impaired link; torn down when dropped.
pub struct Link {
    ns: String,
    host_if: String,
    chain: String,
    relay: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    has_chain: bool,
}

impl Link {
    /// Makes the namespace, the veth pair, the routes to `own` (this
    /// machine's addresses the server's WebRTC answers with), the relay to
    /// `server` and the impairment.
    pub fn up(imp: &Impairment, server: SocketAddr, own: &[Ipv4Addr]) -> anyhow::Result<Link> {
        let pid = std::process::id();
        // A /30 of 198.18.0.0/15 per benchmark process.
        let block = pid % 16000;
        let base = Ipv4Addr::new(
            198,
            18 + (block / 8000) as u8,
            ((block % 8000) / 64) as u8,
            ((block % 64) * 4) as u8,
        );
        let o = base.octets();
        let host_addr = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1);
        let ns_addr = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 2);
        let mut link = Link {
            ns: format!("scbench-{pid}"),
            host_if: format!("scbh{pid}"),
            chain: format!("SCBENCH{pid}"),
            relay: SocketAddr::from((host_addr, 0)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            has_chain: false,
        };
        let ns = link.ns.clone();
        let host_if = link.host_if.clone();
        let ns_if = format!("scbv{pid}");
        run("ip", &["netns", "add", &ns])?;
        // No IPv6 inside: a link-local address appearing a moment after the
        // link is up is a network change to Chromium, which then fails the
        // page's requests (ERR_NETWORK_CHANGED).
        for key in ["all", "default"] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ],
            )?;
        }
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{host_addr}/30"), "dev", &host_if],
        )?;
        run("ip", &["link", "set", &host_if, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_if,
            ],
        )?;
        run("ip", &["-n", &ns, "link", "set", &ns_if, "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        // No default route: only this machine's own addresses are reachable.
        for a in own {
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("{a}/32"),
                    "via",
                    &host_addr.to_string(),
                ],
            )?;
        }
        if let Some(kbit) = imp.rate_kbit {
            // A burst of 10 ms at the rate (at least 16 KB), a queue of 200 ms.
            let burst = (kbit as u64 * 1000 / 8 / 100).max(16_000).to_string();
            let rate = format!("{kbit}kbit");
            let tbf = [
                "root", "tbf", "rate", &rate, "burst", &burst, "latency", "200ms",
            ];
            let mut host = vec!["qdisc", "add", "dev", &host_if];
            host.extend(tbf);
            run("tc", &host)?;
            let mut inner = vec!["-n", &ns, "qdisc", "add", "dev", &ns_if];
            inner.extend(tbf);
            run("tc", &inner)?;
        }
        let queue = (20000 + pid % 40000) as u16;
        let chain = link.chain.clone();
        run("iptables", &["-t", "mangle", "-N", &chain])?;
        link.has_chain = true;
        // Rule 1 is the loss, replaced for a burst (`set_loss`).
        run(
            "iptables",
            &Self::loss_rule(&chain, "-A", imp.loss_permille),
        )?;
        if !imp.delay.is_zero() {
            let q = queue.to_string();
            run(
                "iptables",
                &[
                    "-t",
                    "mangle",
                    "-A",
                    &chain,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &q,
                ],
            )?;
            let (stop, delay) = (link.stop.clone(), imp.delay);
            let (ready_tx, ready) = std::sync::mpsc::channel();
            link.threads.push(std::thread::spawn(move || {
                if let Err(e) = hold(queue, delay, &stop, &ready_tx) {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }));
            match ready.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("the delay queue could not start: {e}"),
                Err(_) => bail!("the delay queue did not start"),
            }
        }
        run(
            "iptables",
            &[
                "-t",
                "mangle",
                "-I",
                "PREROUTING",
                "-i",
                &host_if,
                "-j",
                &chain,
            ],
        )?;
        run(
            "iptables",
            &[
                "-t",
                "mangle",
                "-I",
                "POSTROUTING",
                "-o",
                &host_if,
                "-j",
                &chain,
            ],
        )?;
        let listener = TcpListener::bind((host_addr, 0)).context("the relay's listener")?;
        link.relay = listener.local_addr()?;
        let stop = link.stop.clone();
        link.threads
            .push(std::thread::spawn(move || relay(listener, server, &stop)));
        Ok(link)
    }

    fn loss_rule(chain: &str, op: &'static str, permille: u32) -> Vec<String> {
        let mut v: Vec<String> = ["-t", "mangle", op, chain].map(String::from).into();
        if op == "-R" {
            v.push("1".into());
        }
        v.extend(
            [
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &format!("{:.4}", f64::from(permille) / 1000.0),
                "-j",
                "DROP",
            ]
            .map(String::from),
        );
        v
    }

    /// Changes the random loss (for a burst).
    pub fn set_loss(&self, permille: u32) -> anyhow::Result<()> {
        run("iptables", &Self::loss_rule(&self.chain, "-R", permille))
    }

    /// The server's base URL as the viewer reaches it: the relay.
    pub fn viewer_base(&self) -> String {
        format!("http://{}", self.relay)
    }

    /// `program` to run inside the viewer's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the relay's accept.
        let _ = TcpStream::connect_timeout(&self.relay, Duration::from_millis(200));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let quiet = |args: &[&str]| {
            let _ = Command::new("iptables").args(args).output();
        };
        quiet(&[
            "-t",
            "mangle",
            "-D",
            "PREROUTING",
            "-i",
            &self.host_if,
            "-j",
            &self.chain,
        ]);
        quiet(&[
            "-t",
            "mangle",
            "-D",
            "POSTROUTING",
            "-o",
            &self.host_if,
            "-j",
            &self.chain,
        ]);
        if self.has_chain {
            quiet(&["-t", "mangle", "-F", &self.chain]);
            quiet(&["-t", "mangle", "-X", &self.chain]);
        }
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .output();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .output();
    }
}

/// Holds every packet of NFQUEUE `queue` for `delay`, then lets it pass,
/// in order, until `stop`.
fn hold(
    queue: u16,
    delay: Duration,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> std::io::Result<()> {
    let mut q = nfq::Queue::open()?;
    q.bind(queue)?;
    // Only the verdict matters, not the bytes.
    q.set_copy_range(queue, 0)?;
    q.set_queue_max_len(queue, 8192)?;
    q.set_nonblocking(true);
    let _ = ready.send(Ok(()));
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        loop {
            match q.recv() {
                Ok(mut m) => {
                    m.set_verdict(nfq::Verdict::Accept);
                    held.push_back((Instant::now() + delay, m));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, m) = held.pop_front().expect("checked");
            q.verdict(m)?;
        }
        // A quarter of a millisecond: the delay's resolution.
        std::thread::sleep(Duration::from_micros(250));
    }
    for (_, m) in held {
        q.verdict(m)?;
    }
    q.unbind(queue)
}

/// Relays each connection to `server` until `stop`.
fn relay(listener: TcpListener, server: SocketAddr, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(down) = conn else { continue };
        let Ok(up) = TcpStream::connect(server) else {
            continue;
        };
        // Small writes (frames, input) go out at once, as the server's do.
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pipe(down, up));
        std::thread::spawn(move || pipe(up2, down2));
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impairment_reads_as_the_issue_writes_it() {
        let imp: Impairment = "delay=20ms,loss=1%,rate=8mbit".parse().unwrap();
        assert_eq!(
            imp,
            Impairment {
                delay: Duration::from_millis(20),
                loss_permille: 10,
                rate_kbit: Some(8000)
            }
        );
        let imp: Impairment = "rate=2000kbit".parse().unwrap();
        assert_eq!(imp.rate_kbit, Some(2000));
        assert_eq!(imp.delay, Duration::ZERO);
        assert_eq!("loss=0.5%".parse::<Impairment>().unwrap().loss_permille, 5);
        assert_eq!(
            "delay=1s".parse::<Impairment>().unwrap().delay,
            Duration::from_secs(1)
        );
    }

    /// A server on this host's loopback answering every request with "ok".
    fn ok_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut c = c;
                let mut buf = [0u8; 1024];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let _ = std::io::Write::write_all(
                    &mut c,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            }
        });
        addr
    }

    #[test]
    fn the_link_delays_each_packet_and_leaves_nothing_behind() {
        if !nix_is_root() {
            eprintln!("SKIPPED: the impaired link needs root (namespaces, iptables)");
            return;
        }
        let server = ok_server();
        let imp: Impairment = "delay=60ms".parse().unwrap();
        let link = Link::up(&imp, server, &[]).expect("the link comes up");
        let (ns, host_if, chain) = (link.ns.clone(), link.host_if.clone(), link.chain.clone());
        // From inside the namespace, through the relay: the SYN and the
        // SYN-ACK each wait 60 ms.
        let out = link
            .command("curl")
            .args([
                "-s",
                "-w",
                " %{time_connect}",
                &format!("{}/", link.viewer_base()),
            ])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, connect) = text.rsplit_once(' ').expect("curl's output");
        assert_eq!(
            body,
            "ok",
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let connect: f64 = connect.parse().unwrap();
        assert!(
            connect >= 0.115,
            "connected in {connect} s through 2 x 60 ms"
        );
        // Nothing else is reachable from the namespace: with no default route
        // the connect fails inside it, and no packet leaves.
        let out = link
            .command("curl")
            .args(["-s", "-m", "2", "http://198.51.100.1/"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "an address off this link answered");
        drop(link);
        let listed = |program: &str, args: &[&str]| {
            String::from_utf8_lossy(&Command::new(program).args(args).output().unwrap().stdout)
                .to_string()
        };
        assert!(!listed("ip", &["netns", "list"]).contains(&ns));
        assert!(!listed("ip", &["link"]).contains(&host_if));
        assert!(!listed("iptables", &["-t", "mangle", "-S"]).contains(&chain));
    }

    fn nix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|u| u.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn a_bad_impairment_names_what_is_wrong() {
        for (bad, says) in [
            ("jitter=5ms", "unknown impairment \"jitter\""),
            ("delay=20", "delay=\"20\" is not valid"),
            ("loss=101%", "not between 0% and 100%"),
            ("rate=8", "rate=\"8\" is not valid"),
            ("rate=10kbit", "below 64kbit"),
            ("delay", "is not key=value"),
            ("delay=9s", "more than 5 s"),
        ] {
            let e = bad.parse::<Impairment>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}

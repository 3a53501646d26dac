//! Start and stop latency of real sandboxes (needs root):
//! `cargo bench -p sandcast-sandbox --bench start`.
//!
//! - `start_returns`: `start` until it returns (namespaces, cgroup, network,
//!   firewall and mounts done, the agent exec'd);
//! - `start_until_agent_connects`: until the agent inside has connected to the
//!   agent socket and sent a line (the agent here is a tiny perl client, so
//!   this includes perl's start-up, a few milliseconds);
//! - `stop`: `stop(3 s grace)` of a session whose agent ends on SIGTERM, until
//!   everything is removed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sandcast_backend::{Backend, Egress, Instance, LaunchSpec, Limits, NetworkPolicy, SessionId};
use sandcast_sandbox::{SandboxBackend, SandboxConfig, SandboxInstance};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

const AGENT: &str = r#"#!/bin/sh
exec perl -MIO::Socket::UNIX -e '$s=IO::Socket::UNIX->new(Peer=>"/run/sandcast/agent.sock") or die "agent socket: $!"; print $s "up\n"; close $s; sleep 600'
"#;

struct Bench {
    dir: tempfile::TempDir,
    backend: SandboxBackend,
    agent: std::path::PathBuf,
    n: u32,
}

impl Bench {
    fn spec(&mut self) -> (LaunchSpec, UnixListener) {
        self.n += 1;
        let session_dir = self.dir.path().join(format!("s{}", self.n));
        std::fs::create_dir_all(&session_dir).unwrap();
        let id = SessionId::new(format!("b{}", self.n)).unwrap();
        let socket = self.backend.agent_socket(&id, &session_dir);
        let listener = UnixListener::bind(&socket).unwrap();
        let spec = LaunchSpec {
            id,
            session_dir,
            agent_socket: socket,
            agent_binary: self.agent.clone(),
            limits: Limits::default(),
            network: NetworkPolicy {
                egress: Egress::Internet,
            },
            agent_token: None,
            home: None,
        };
        (spec, listener)
    }

    async fn start(&mut self) -> (SandboxInstance, UnixListener, LaunchSpec) {
        let (spec, listener) = self.spec();
        let inst = self.backend.start_sandbox(&spec).await.unwrap();
        (inst, listener, spec)
    }
}

async fn wait_agent(listener: &UnixListener) {
    let (mut conn, _) = listener.accept().await.unwrap();
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"up\n");
}

fn bench(c: &mut Criterion) {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the sandbox benchmark needs root");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Path::new("/var/lib/sandcast-sandbox-tests");
    std::fs::create_dir_all(base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let tag = format!("{:08x}", std::process::id().wrapping_mul(2_654_435_761));
    let cfg = SandboxConfig {
        state_dir: dir.path().join("state"),
        host: sandcast_host::HostConfig {
            cgroup_parent: format!("sandcast-bench/{tag}"),
            name_prefix: format!("b{tag}"),
            subnet: "100.73.0.0/16".into(),
            ..sandcast_host::HostConfig::default()
        },
        ..SandboxConfig::default()
    };
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, AGENT).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut b = Bench {
        backend: SandboxBackend::new(cfg.clone()).unwrap(),
        dir,
        agent,
        n: 0,
    };

    let mut g = c.benchmark_group("sandbox");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    g.bench_function("start_returns", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    let (inst, listener, _) = b.start().await;
                    total += t0.elapsed();
                    wait_agent(&listener).await;
                    inst.stop(Duration::ZERO).await.unwrap();
                }
                total
            })
        })
    });
    g.bench_function("start_until_agent_connects", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    let (inst, listener, _) = b.start().await;
                    wait_agent(&listener).await;
                    total += t0.elapsed();
                    inst.stop(Duration::ZERO).await.unwrap();
                }
                total
            })
        })
    });
    g.bench_function("stop", |bn| {
        bn.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (inst, listener, spec) = b.start().await;
                    wait_agent(&listener).await;
                    let t0 = Instant::now();
                    inst.stop(Duration::from_secs(3)).await.unwrap();
                    total += t0.elapsed();
                    assert!(!spec.session_dir.join("sandbox").exists());
                }
                total
            })
        })
    });
    g.finish();

    // Nothing of the benchmark stays on the host.
    let left = rt.block_on(b.backend.reap(&[])).unwrap();
    assert!(
        left.is_empty(),
        "sessions left after the benchmark: {left:?}"
    );
    for root in ["memory", "cpu", "pids", "unified", ""] {
        let p = Path::new("/sys/fs/cgroup")
            .join(root)
            .join(b.backend.host().cgroup_parent());
        let _ = std::fs::remove_dir(&p);
        let _ = std::fs::remove_dir(p.parent().unwrap());
        let _ = std::fs::remove_dir(p.parent().unwrap().parent().unwrap());
    }
    let _ = std::process::Command::new("nft")
        .args(["delete", "table", "inet", &b.backend.host().policy().table])
        .status();
    drop(b);
    let _ = std::fs::remove_dir(base);
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Shared set-up for the backend tests: a Firecracker double process, a
//! kernel and a root file system file, and a server-side agent listener.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandcast_backend::{Backend, LaunchSpec, Limits, NetworkPolicy, SessionId};
use sandcast_firecracker::{FirecrackerBackend, FirecrackerConfig};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

/// A scratch directory removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("sc-fc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TestDir(d)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // The instance's firewall table, named after its runtime directory.
        let instance = sandcast_host::instance_id(&self.0.join("run"));
        let _ = std::process::Command::new("nft")
            .args([
                "delete",
                "table",
                "inet",
                &format!("{TEST_PREFIX}_{instance}"),
            ])
            .status();
        // The instance's cgroup parent (the backend leaves parents in place).
        for c in ["", "memory/", "cpu/", "pids/", "unified/"] {
            let _ =
                std::fs::remove_dir(format!("/sys/fs/cgroup/{c}{TEST_CGROUP_PARENT}/{instance}"));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Names of the test instances' namespaces and tables, apart from a server's.
pub const TEST_PREFIX: &str = "fctest";
/// Their cgroup parent.
pub const TEST_CGROUP_PARENT: &str = "sandcast-fc-test";

/// A configuration that runs the double instead of Firecracker.
pub fn config(dir: &Path) -> FirecrackerConfig {
    let kernel = dir.join("vmlinux");
    // An ELF header is all the double (and the kernel check) looks at.
    std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00").unwrap();
    let rootfs = dir.join("rootfs.ext4");
    std::fs::File::create(&rootfs)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    FirecrackerConfig {
        firecracker_bin: env!("CARGO_BIN_EXE_firecracker-double").into(),
        kernel,
        rootfs,
        probe_kvm: false,
        writable_drive_mib: 64,
        runtime_dir: dir.join("run"),
        host: sandcast_host::HostConfig {
            name_prefix: TEST_PREFIX.into(),
            cgroup_parent: TEST_CGROUP_PARENT.into(),
            subnet: "100.74.0.0/16".into(),
            ..sandcast_host::HostConfig::default()
        },
        ..FirecrackerConfig::default()
    }
}

pub fn session_id(name: &str) -> SessionId {
    SessionId::new(format!("{name}-{}", std::process::id())).unwrap()
}

pub fn launch_spec(backend: &FirecrackerBackend, dir: &Path, id: &SessionId) -> LaunchSpec {
    let session_dir = dir.join(id.as_str());
    std::fs::create_dir_all(&session_dir).unwrap();
    let agent_socket = backend.agent_socket(id, &session_dir);
    std::fs::create_dir_all(agent_socket.parent().unwrap()).unwrap();
    LaunchSpec {
        id: id.clone(),
        agent_socket,
        session_dir,
        agent_binary: PathBuf::new(),
        limits: Limits {
            memory_mib: 512,
            cpu_millis: 2000,
            pids: 256,
        },
        network: NetworkPolicy {
            egress: sandcast_backend::Egress::Internet,
        },
        agent_token: Some(sandcast_backend::AgentToken::new(format!("token-of-{id}"))),
        home: None,
    }
}

/// The requests the double received, from its log.
pub fn requests(session_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(session_dir.join("firecracker.sock.requests.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Accepts the agent's connection and returns its first frame's JSON.
pub async fn agent_hello(listener: &UnixListener) -> (UnixStream, Value) {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("the agent connects")
        .unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).await.unwrap();
    assert_eq!(frame[0], 1, "a JSON control frame");
    (s, serde_json::from_slice(&frame[1..]).unwrap())
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Whether a namespace of session `id` exists (`<prefix>-<instance>-<id>`).
pub fn netns_exists(id: &SessionId) -> bool {
    let suffix = format!("-{id}");
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(TEST_PREFIX) && n.ends_with(&suffix)
            })
        })
        .unwrap_or(false)
}

/// Whether a cgroup of session `id` (`<parent>/<instance>/fc-<id>`) exists.
pub fn cgroup_exists(id: &SessionId) -> bool {
    ["", "memory/", "cpu/", "pids/", "unified/"]
        .iter()
        .any(|c| {
            std::fs::read_dir(format!("/sys/fs/cgroup/{c}{TEST_CGROUP_PARENT}"))
                .map(|rd| {
                    rd.flatten()
                        .any(|inst| inst.path().join(format!("fc-{id}")).exists())
                })
                .unwrap_or(false)
        })
}

/// [`config`] with Firecracker run under the jailer double (Firecracker's
/// docs/jailer.md, v1.16.1) as each session's own uid, jails under `dir/jails`.
pub fn jailed_config(dir: &Path) -> FirecrackerConfig {
    FirecrackerConfig {
        jailer: Some(sandcast_firecracker::JailerConfig {
            jailer_bin: env!("CARGO_BIN_EXE_jailer-double").into(),
            chroot_base_dir: dir.join("jails"),
        }),
        ..config(dir)
    }
}

/// The jail directory (`<base>/<exec name>/<id>`) of a session under
/// [`jailed_config`].
pub fn jail_dir(dir: &Path, id: &SessionId) -> PathBuf {
    dir.join("jails/firecracker-double")
        .join(format!("fc-{id}"))
}

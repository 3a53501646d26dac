//! The backend against the real Firecracker v1.16.1 (no double): the whole
//! start sequence (boot source, machine configuration, root and writable
//! drives, the network interface on the session's TAP, vsock, MMDS v2,
//! logger, metrics, InstanceStart) accepted by the real API, a tiny PVH
//! guest's serial console in the session's console log, and stop or the
//! guest's own end leaving nothing behind.
//!
//! The binary is `SANDCAST_FC_BIN`, else `../shared/firecracker/bin/firecracker`
//! beside the project; without one, or without `as` and `ld` (binutils) to
//! build the guest, each test says why it is skipped, on stderr. The guest
//! is `tests/guest/tiny-pvh.S` (a Linux kernel does not boot on every KVM;
//! this guest does wherever Firecracker runs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandcast_backend::{Backend, Instance};
use sandcast_firecracker::{FirecrackerBackend, FirecrackerConfig};
use tokio::net::UnixListener;

mod common;
use common::{
    TestDir, cgroup_exists, config, launch_spec, netns_exists, process_alive, session_id,
};

const HELLO: &str = "sandcast tiny guest: hello";

fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The real Firecracker, if there is one.
fn firecracker() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SANDCAST_FC_BIN") {
        return Ok(p.into());
    }
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/firecracker/bin/firecracker");
    if shared.is_file() {
        return Ok(shared);
    }
    Err(format!(
        "no real Firecracker: SANDCAST_FC_BIN is not set and {} does not exist",
        shared.display()
    ))
}

/// Assembles the tiny guest into `dir`; `stay`: it halts instead of
/// resetting, so the VM runs until stopped.
fn tiny_guest(dir: &Path, stay: bool) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/tiny-pvh.S");
    let obj = dir.join("tiny.o");
    let elf = dir.join(if stay { "tiny-stay.elf" } else { "tiny.elf" });
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let out = cmd
            .output()
            .map_err(|e| format!("{name} (binutils) cannot run: {e}"))?;
        if !out.status.success() {
            return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    };
    let mut assemble = std::process::Command::new("as");
    assemble.arg("--64");
    if stay {
        assemble.args(["--defsym", "STAY=1"]);
    }
    run(assemble.arg("-o").arg(&obj).arg(&src))?;
    run(std::process::Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "-Ttext=0x100000",
            "-e",
            "start",
            "-o",
        ])
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
}

/// The test configuration with the real binary and the tiny guest, or why
/// it cannot run here.
fn real_config(dir: &Path, stay: bool) -> Result<FirecrackerConfig, String> {
    let bin = firecracker()?;
    let kernel = tiny_guest(dir, stay)?;
    Ok(FirecrackerConfig {
        firecracker_bin: bin,
        kernel,
        ..config(dir)
    })
}

/// Waits until the session's console log holds `text`.
async fn console_shows(session_dir: &Path, text: &str) -> String {
    let path = session_dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let console = std::fs::read_to_string(&path).unwrap_or_default();
        if console.contains(text) {
            return console;
        }
        assert!(
            Instant::now() < deadline,
            "{text:?} not in {}: {console:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn exited(instance: &dyn Instance) -> sandcast_backend::InstanceExit {
    let mut rx = instance.exited();
    tokio::time::timeout(Duration::from_secs(15), rx.wait_for(Option::is_some))
        .await
        .expect("the instance ends")
        .unwrap()
        .clone()
        .unwrap()
}

#[tokio::test]
async fn the_whole_start_sequence_runs_on_the_real_vmm_and_stop_leaves_nothing() {
    let test = "the_whole_start_sequence_runs_on_the_real_vmm_and_stop_leaves_nothing";
    let dir = TestDir::new("realvmm");
    let cfg = match real_config(&dir.0, true) {
        Ok(c) => c,
        Err(why) => return skip(test, &why),
    };
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("realvmm");
    let spec = launch_spec(&backend, &dir.0, &id);
    // The server's agent socket, where the vsock would deliver the agent.
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    // Every configuration call and InstanceStart are answered by the real
    // API: an answer it refused would fail the start with its message.
    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().expect("firecracker's pid");
    assert!(process_alive(pid));
    // The guest runs: its serial output is the session's console.
    console_shows(&spec.session_dir, HELLO).await;
    // In the session's network namespace, with the TAP there.
    let ns = |p: &str| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    assert_eq!(
        ns(&format!("/proc/{pid}/ns/net")),
        ns(&backend.host().netns_path(id.as_str()).to_string_lossy())
    );
    // Firecracker's own log is there and holds no error.
    let log = std::fs::read_to_string(spec.session_dir.join("firecracker.log"))
        .or_else(|_| std::fs::read_to_string(spec.session_dir.join("run/firecracker.log")))
        .unwrap_or_default();
    assert!(
        !log.contains("ERROR"),
        "firecracker logged an error:\n{log}"
    );

    instance.stop(Duration::from_millis(500)).await.unwrap();
    let exit = exited(instance.as_ref()).await;
    assert!(exit.requested, "{exit:?}");
    assert!(!process_alive(pid), "firecracker {pid} still runs");
    assert!(!netns_exists(&id), "the namespace is left");
    assert!(!cgroup_exists(&id), "the cgroup is left");
    assert!(
        backend.host().records().0.is_empty(),
        "a record is left: {:?}",
        backend.host().records().0
    );
}

#[tokio::test]
async fn a_guest_that_ends_on_its_own_is_reported_with_its_console_and_leaves_nothing() {
    let test = "a_guest_that_ends_on_its_own_is_reported_with_its_console_and_leaves_nothing";
    let dir = TestDir::new("realend");
    let cfg = match real_config(&dir.0, false) {
        Ok(c) => c,
        Err(why) => return skip(test, &why),
    };
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("realend");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().expect("firecracker's pid");
    // The guest resets at once; Firecracker exits 0, which is still an end
    // nobody asked for, and the reason carries what the guest printed.
    let exit = exited(instance.as_ref()).await;
    assert!(!exit.requested, "{exit:?}");
    assert!(
        exit.reason.contains("firecracker ended unexpectedly") && exit.reason.contains(HELLO),
        "{exit:?}"
    );
    // The backend cleans up before it reports the end.
    assert!(!process_alive(pid));
    assert!(!netns_exists(&id), "the namespace is left");
    assert!(!cgroup_exists(&id), "the cgroup is left");
    assert!(backend.host().records().0.is_empty(), "a record is left");
}

/// The real jailer, beside the real Firecracker.
fn jailer() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SANDCAST_JAILER_BIN") {
        return Ok(p.into());
    }
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/firecracker/bin/jailer");
    if shared.is_file() {
        return Ok(shared);
    }
    Err(format!(
        "no real jailer: SANDCAST_JAILER_BIN is not set and {} does not exist",
        shared.display()
    ))
}

#[tokio::test]
async fn the_real_jailer_runs_the_session_as_its_own_uid_in_its_chroot() {
    let test = "the_real_jailer_runs_the_session_as_its_own_uid_in_its_chroot";
    let dir = TestDir::new("realjail");
    let cfg = match (real_config(&dir.0, true), jailer()) {
        (Ok(c), Ok(j)) => FirecrackerConfig {
            jailer: Some(sandcast_firecracker::JailerConfig {
                jailer_bin: j,
                chroot_base_dir: dir.0.join("jails"),
            }),
            ..c
        },
        (Err(why), _) | (_, Err(why)) => return skip(test, &why),
    };
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("realjail");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().expect("firecracker's pid");
    assert!(process_alive(pid));
    console_shows(&spec.session_dir, HELLO).await;
    // Firecracker, exec'd by the jailer, runs as the session's own uid in
    // its chroot, in the session's namespace.
    let uid = backend.agent_peer_uid(&id).expect("the session's uid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert!(status.contains(&format!("Uid:\t{ids}")), "{status}");
    assert!(status.contains(&format!("Gid:\t{ids}")), "{status}");
    // Its root (pivoted into, so /proc shows it as "/") is the jail: the
    // files it was given, none of the host's.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    for f in [
        "vmlinux",
        "rootfs.ext4",
        "writable.ext4",
        "firecracker.sock",
        "dev/kvm",
    ] {
        assert!(proc_root.join(f).exists(), "{f} missing in the jail");
    }
    assert!(
        !proc_root.join("etc").exists(),
        "the host is visible in the jail"
    );
    // `<chroot_base_dir>/<exec file name>/<jail id>`.
    let jail = dir.0.join("jails/firecracker").join(format!("fc-{id}"));
    assert!(jail.join("root/vmlinux").exists(), "{}", jail.display());
    let ns = |p: &str| {
        std::fs::metadata(p)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    assert_eq!(
        ns(&format!("/proc/{pid}/ns/net")),
        ns(&backend.host().netns_path(id.as_str()).to_string_lossy())
    );

    instance.stop(Duration::from_millis(500)).await.unwrap();
    let exit = exited(instance.as_ref()).await;
    assert!(exit.requested, "{exit:?}");
    assert!(!process_alive(pid));
    assert!(!jail.exists(), "the jail is left: {}", jail.display());
    assert!(!netns_exists(&id), "the namespace is left");
    assert!(!cgroup_exists(&id), "the cgroup is left");
    assert!(backend.host().records().0.is_empty(), "a record is left");
}

/// After a crash of the server (here: a second backend on the same state,
/// as a restarted server has), reap finds the real jailed Firecracker by
/// its pid and jail id and removes it with everything it held.
#[tokio::test]
async fn reap_after_a_crash_removes_a_real_jailed_vm() {
    let test = "reap_after_a_crash_removes_a_real_jailed_vm";
    let dir = TestDir::new("realreap");
    let cfg = match (real_config(&dir.0, true), jailer()) {
        (Ok(c), Ok(j)) => FirecrackerConfig {
            jailer: Some(sandcast_firecracker::JailerConfig {
                jailer_bin: j,
                chroot_base_dir: dir.0.join("jails"),
            }),
            ..c
        },
        (Err(why), _) | (_, Err(why)) => return skip(test, &why),
    };
    let backend = FirecrackerBackend::new(cfg.clone()).unwrap();
    let id = session_id("realreap");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().expect("firecracker's pid");
    console_shows(&spec.session_dir, HELLO).await;
    let uid = backend.agent_peer_uid(&id).expect("the session's uid");

    let restarted = FirecrackerBackend::new(cfg).unwrap();
    let removed = restarted.reap(&[]).await.unwrap();
    assert!(
        removed
            .iter()
            .any(|l| l.contains(&format!("firecracker process {pid}"))),
        "{removed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "firecracker {pid} survived the reap"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let jail = dir.0.join("jails/firecracker").join(format!("fc-{id}"));
    assert!(!jail.exists(), "the jail is left: {}", jail.display());
    assert!(!netns_exists(&id), "the namespace is left");
    assert!(!cgroup_exists(&id), "the cgroup is left");
    assert!(restarted.host().records().0.is_empty(), "a record is left");
    let claims = sandcast_host::uid::claims_dir(&restarted.host().config().lock_dir);
    assert!(
        !claims.join(uid.to_string()).exists(),
        "uid {uid} still claimed"
    );
    drop(instance);
}

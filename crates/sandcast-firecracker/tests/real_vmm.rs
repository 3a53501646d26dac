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
mod real;
use common::{
    TestDir, cgroup_exists, config, launch_spec, netns_exists, process_alive, session_id,
};
use real::{HELLO, firecracker, jailer, tiny_guest};

fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
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

/// [`real_config`] with the real jailer, jails under `dir/jails`.
fn real_jailed_config(dir: &Path) -> Result<FirecrackerConfig, String> {
    Ok(FirecrackerConfig {
        jailer: Some(sandcast_firecracker::JailerConfig {
            jailer_bin: jailer()?,
            chroot_base_dir: dir.join("jails"),
        }),
        ..real_config(dir, true)?
    })
}

/// The jail of session `id` under [`real_jailed_config`]:
/// `<chroot_base_dir>/<exec file name>/fc-<id>`.
fn real_jail(dir: &Path, id: &sandcast_backend::SessionId) -> PathBuf {
    dir.join("jails/firecracker").join(format!("fc-{id}"))
}

/// Waits until the session's console log holds `text` (generously: the
/// whole test suite may be loading the machine).
async fn console_shows(session_dir: &Path, text: &str) -> String {
    let path = session_dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(30);
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

#[tokio::test]
async fn the_real_jailer_runs_the_session_as_its_own_uid_in_its_chroot() {
    let test = "the_real_jailer_runs_the_session_as_its_own_uid_in_its_chroot";
    let dir = TestDir::new("realjail");
    let cfg = match real_jailed_config(&dir.0) {
        Ok(c) => c,
        Err(why) => return skip(test, &why),
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
    let jail = real_jail(&dir.0, &id);
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
    let cfg = match real_jailed_config(&dir.0) {
        Ok(c) => c,
        Err(why) => return skip(test, &why),
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
    let jail = real_jail(&dir.0, &id);
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

/// A network namespace with two TAP devices, removed on drop.
struct TapNs(String);

impl TapNs {
    fn new(name: String) -> TapNs {
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(ok.success(), "ip {args:?}");
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        ip(&["netns", "add", &name]);
        for tap in ["tap0", "tap1"] {
            ip(&["-n", &name, "tuntap", "add", tap, "mode", "tap"]);
        }
        TapNs(name)
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Pause, a full snapshot, and its load into a fresh Firecracker with the
/// vsock and network overrides a restored session needs, all on the real
/// VMM, for a guest that stays alive.
#[tokio::test]
async fn a_real_snapshot_is_taken_and_restored_with_overrides() {
    let test = "a_real_snapshot_is_taken_and_restored_with_overrides";
    let dir = TestDir::new("realsnap");
    let (bin, kernel) = match firecracker().and_then(|b| Ok((b, tiny_guest(&dir.0, true)?))) {
        Ok(found) => found,
        Err(why) => return skip(test, &why),
    };
    let ns = TapNs::new(format!("fcsnap{}", std::process::id()));
    let d = &dir.0;

    let mut first = real::spawn(&bin, Some(&ns.0), &d.join("a.sock"), &d.join("a.console"));
    let a = real::api_up(&d.join("a.sock")).await;
    real::configure(&a, &kernel, &d.join("v1.sock"), Some("tap0")).await;
    a.action(sandcast_firecracker::api::ActionType::InstanceStart)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(d.join("a.console"))
        .unwrap_or_default()
        .contains(HELLO)
    {
        assert!(
            Instant::now() < deadline,
            "the guest printed nothing; firecracker {:?}, its output: {:?}",
            first.try_wait(),
            std::fs::read_to_string(d.join("a.console")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    real::snapshot(&a, &d.join("vm.state"), &d.join("vm.mem")).await;
    assert_eq!(
        std::fs::metadata(d.join("vm.mem")).unwrap().len(),
        real::GUEST_MIB << 20,
        "the memory file holds the guest's memory"
    );
    first.kill().await.unwrap();

    let mut second = real::spawn(&bin, Some(&ns.0), &d.join("b.sock"), &d.join("b.console"));
    let b = real::api_up(&d.join("b.sock")).await;
    real::restore(
        &b,
        &d.join("vm.state"),
        &d.join("vm.mem"),
        &d.join("v2.sock"),
        Some("tap1"),
    )
    .await;
    assert_eq!(b.describe().await.unwrap().state, "Running");
    // The restored VM's vsock listens where the override said.
    assert!(
        d.join("v2.sock").exists(),
        "no vsock socket at the override"
    );
    assert!(
        second.try_wait().unwrap().is_none(),
        "the restored VM ended"
    );
    second.kill().await.unwrap();
}

/// What the real Firecracker refuses reaches the session's reason in its
/// own words (not as an HTTP body), and the failed start leaves nothing.
#[tokio::test]
async fn the_real_vmms_refusals_are_reported_in_words() {
    let test = "the_real_vmms_refusals_are_reported_in_words";
    let dir = TestDir::new("realrefuse");
    let bin = match firecracker() {
        Ok(b) => b,
        Err(why) => return skip(test, &why),
    };
    // The test configuration's kernel is an ELF header and nothing else.
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        firecracker_bin: bin,
        ..config(&dir.0)
    })
    .unwrap();
    let id = session_id("realrefuse");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let e = backend
        .start(&spec)
        .await
        .err()
        .expect("a refused start")
        .to_string();
    assert!(e.contains("Firecracker refused PUT /"), "{e}");
    assert!(
        e.to_lowercase().contains("kernel"),
        "the reason does not say what was wrong: {e}"
    );
    assert!(
        !e.contains("fault_message") && !e.contains('{'),
        "a raw body: {e}"
    );
    assert!(!netns_exists(&id), "the namespace is left");
    assert!(!cgroup_exists(&id), "the cgroup is left");
    assert!(backend.host().records().0.is_empty(), "a record is left");
}

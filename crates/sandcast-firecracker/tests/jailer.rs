//! The Firecracker backend with Firecracker under its jailer. The
//! `jailer-double` does what Firecracker's docs/jailer.md (v1.16.1) says the
//! jailer does (chroot by `pivot_root`, cgroups from `--cgroup`, `--netns`,
//! uid/gid drop, exec in place) and runs the Firecracker double, which checks
//! every request against the v1.16.1 specification and attaches to the TAP
//! device as Firecracker does.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use sandcast_backend::{Backend, SessionId};
use sandcast_firecracker::FirecrackerBackend;
use sandcast_firecracker::host;
use serde_json::Value;
use tokio::net::UnixListener;

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn calls_with_paths(reqs: &[Value]) -> Vec<(String, Value)> {
    reqs.iter()
        .map(|r| (r["path"].as_str().unwrap().to_owned(), r["body"].clone()))
        .collect()
}

#[tokio::test]
async fn a_jailed_vm_runs_unprivileged_in_its_jail_cgroup_and_namespace() {
    let dir = TestDir::new("jailed");
    let backend = FirecrackerBackend::new(jailed_config(&dir.0)).unwrap();
    let id = session_id("jailed");
    let spec = launch_spec(&backend, &dir.0, &id);
    let jail = jail_dir(&dir.0, &id);
    let root = jail.join("root");
    // The agent's vsock connection arrives inside the jail.
    assert_eq!(spec.agent_socket, root.join("vsock.sock_1024"));
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();

    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().unwrap();
    assert!(process_alive(pid));
    // The jailer exec'd Firecracker in place, unprivileged, as the session's
    // own uid from the host layer's range: what the server expects on the
    // agent's connections.
    let uid = backend.agent_peer_uid(&id).expect("a jailed session's uid");
    let [lo, hi] = backend.host().config().uid_range;
    assert!((lo..=hi).contains(&uid), "{uid}");
    let ids = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "Gid"), ids);
    assert_eq!(status_field(pid, "Groups"), "");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(args[0], "/firecracker-double");
    assert_eq!(args[1], format!("--id=fc-{id}"));
    assert!(args.contains(&"--api-sock".to_owned()), "{args:?}");
    // Its root is the jail: the files it was given, no host.
    let proc_root = Path::new("/proc").join(pid.to_string()).join("root");
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
    // The kernel and root drive are hard links, not copies.
    assert_eq!(
        std::fs::metadata(root.join("rootfs.ext4")).unwrap().ino(),
        std::fs::metadata(backend.config().rootfs.as_path())
            .unwrap()
            .ino()
    );
    assert_eq!(
        std::fs::metadata(root.join("writable.ext4")).unwrap().uid(),
        uid
    );
    // In the session's network namespace...
    let ns = |p: &str| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ns(&format!("/proc/{pid}/ns/net")),
        ns(&backend.host().netns_path(id.as_str()).to_string_lossy())
    );
    // ...and the session's cgroup, made by the jailer with the limits.
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.contains(&format!("/{}/fc-{id}", backend.host().cgroup_parent())),
        "{cgroups}"
    );
    let plan = backend
        .host()
        .cgroup_plan(id.as_str(), &host::cgroup_limits(&spec.limits))
        .unwrap();
    for (file, value) in &plan.values {
        let dir = plan.dir_for(file).unwrap();
        let got = std::fs::read_to_string(dir.join(file)).unwrap();
        // cpu.max reads back as "<quota> <period>"; the rest verbatim.
        assert_eq!(got.trim(), value, "{file}");
    }
    // The TAP belongs to the jail's uid, so Firecracker could attach to it.
    let taps = std::process::Command::new("ip")
        .args([
            "-n",
            &backend.host().netns_name(id.as_str()),
            "tuntap",
            "show",
        ])
        .output()
        .unwrap();
    let taps = String::from_utf8_lossy(&taps.stdout);
    assert!(taps.contains(&format!("{}: tap", host::TAP_NAME)), "{taps}");
    assert!(taps.contains(&format!("user {uid} group {uid}")), "{taps}");

    // A second session at the same time runs as a uid of its own.
    let id2 = session_id("jailed2");
    let spec2 = launch_spec(&backend, &dir.0, &id2);
    let _listener2 = UnixListener::bind(&spec2.agent_socket).unwrap();
    let instance2 = backend.start(&spec2).await.unwrap();
    let uid2 = backend
        .agent_peer_uid(&id2)
        .expect("the second session's uid");
    assert_ne!(uid, uid2, "two sessions share a uid");
    assert_eq!(
        status_field(instance2.pid().unwrap(), "Uid"),
        format!("{uid2} {uid2} {uid2} {uid2}")
    );
    instance2.stop(Duration::from_secs(5)).await.unwrap();

    let (_conn, hello) = agent_hello(&listener).await;
    assert_eq!(hello["type"], "hello");
    let reqs = requests(&root);
    assert!(
        reqs.iter()
            .all(|r| r["status"] == 204 || r["status"] == 200),
        "{reqs:#?}"
    );
    // Every path Firecracker was given is the jail's.
    let calls = calls_with_paths(&reqs);
    let body = |path: &str| calls.iter().find(|(p, _)| p == path).unwrap().1.clone();
    assert_eq!(body("/logger")["log_path"], "/firecracker.log");
    assert_eq!(body("/metrics")["metrics_path"], "/metrics.json");
    assert_eq!(body("/boot-source")["kernel_image_path"], "/vmlinux");
    assert_eq!(body("/drives/rootfs")["path_on_host"], "/rootfs.ext4");
    assert_eq!(body("/drives/writable")["path_on_host"], "/writable.ext4");
    assert_eq!(body("/vsock")["uds_path"], "/vsock.sock");

    instance.stop(Duration::from_secs(5)).await.unwrap();
    let exit = instance.exited().borrow().clone().unwrap();
    assert!(
        exit.requested && exit.reason.contains("exit code 0"),
        "{exit:?}"
    );
    assert!(!process_alive(pid));
    assert!(!jail.exists(), "the jail is left behind");
    // Its uid is free again.
    let claims = sandcast_host::uid::claims_dir(&backend.host().config().lock_dir);
    assert!(
        !claims.join(uid.to_string()).exists(),
        "uid {uid} still claimed"
    );
    assert_eq!(backend.agent_peer_uid(&id), None);
    assert!(!netns_exists(&id));
    assert!(!cgroup_exists(&id));
    // Firecracker's log outlives the jail, beside the console.
    assert!(spec.session_dir.join("firecracker.log").exists());
    assert!(spec.session_dir.join("console.log").exists());
}

#[tokio::test]
async fn jailed_failures_name_the_cause_and_leave_nothing() {
    let dir = TestDir::new("jailfail");
    // A kernel the jail's uid cannot read.
    let cfg = jailed_config(&dir.0);
    std::fs::set_permissions(
        &cfg.kernel,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("jailfail");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let e = backend.start(&spec).await.err().unwrap().to_string();
    assert!(
        e.contains("vmlinux") && e.contains("not readable by the jail's uid and gid"),
        "{e}"
    );
    assert!(!jail_dir(&dir.0, &id).exists());
    assert!(!netns_exists(&id));
    assert!(!cgroup_exists(&id));

    // A missing jailer binary is named, in readiness too.
    let mut cfg = jailed_config(&dir.0);
    cfg.jailer.as_mut().unwrap().jailer_bin = "/nonexistent/jailer".into();
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = SessionId::new(format!("nojailer-{}", std::process::id())).unwrap();
    let spec = launch_spec(&backend, &dir.0, &id);
    let e = backend.start(&spec).await.err().unwrap().to_string();
    assert!(
        e.contains("jailer binary /nonexistent/jailer not found"),
        "{e}"
    );
    let r = backend.readiness().await;
    assert!(!r.ready);
    let check = r.checks.iter().find(|c| c.name == "jailer binary").unwrap();
    assert!(
        !check.ok && check.detail.contains("/nonexistent/jailer"),
        "{check:?}"
    );
    assert!(!netns_exists(&id));
    assert!(!jail_dir(&dir.0, &id).exists());
}

#[tokio::test]
async fn jailed_sessions_build_and_restore_a_snapshot() {
    let dir = TestDir::new("jailsnap");
    let mut cfg = jailed_config(&dir.0);
    cfg.snapshot_dir = Some(dir.0.join("snapshot"));
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let files = backend.build_snapshot().await.unwrap();
    assert!(files.state.is_file() && files.memory.is_file() && files.writable.is_file());
    let template = SessionId::new("snapshot-template").unwrap();
    assert!(!jail_dir(&dir.0, &template).exists());
    assert_eq!(backend.snapshot(), Some(files.clone()));

    let id = session_id("jailrestored");
    let spec = launch_spec(&backend, &dir.0, &id);
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let (_conn, hello) = agent_hello(&listener).await;
    assert_eq!(hello["type"], "hello");
    let reqs = requests(&jail_dir(&dir.0, &id).join("root"));
    assert!(
        reqs.iter()
            .all(|r| r["status"] == 204 || r["status"] == 200),
        "{reqs:#?}"
    );
    let calls = calls_with_paths(&reqs);
    let load = &calls.iter().find(|(p, _)| p == "/snapshot/load").unwrap().1;
    assert_eq!(load["snapshot_path"], "/vm.state");
    assert_eq!(load["mem_backend"]["backend_path"], "/vm.mem");
    assert_eq!(load["vsock_override"]["uds_path"], "/vsock.sock");
    let patch = &calls
        .iter()
        .find(|(p, _)| p == "/drives/writable")
        .unwrap()
        .1;
    assert_eq!(patch["path_on_host"], "/writable.ext4");
    instance.stop(Duration::from_secs(5)).await.unwrap();
    assert!(!jail_dir(&dir.0, &id).exists());
    // The snapshot stays for the next session.
    assert!(files.state.is_file() && files.memory.is_file() && files.writable.is_file());
}

//! The Firecracker backend against the Firecracker double, which checks every
//! request against Firecracker's OpenAPI specification v1.16.1
//! (`fixtures/firecracker/firecracker-v1.16.1.yaml`) and answers as
//! Firecracker does.

mod common;

use std::time::Duration;

use common::*;
use sandcast_backend::{Backend, BackendError, Limits};
use sandcast_firecracker::testing::SPEC_VERSION;
use sandcast_firecracker::{FirecrackerBackend, FirecrackerConfig};
use serde_json::json;
use tokio::net::UnixListener;

#[tokio::test]
async fn boot_configures_the_vm_and_stop_leaves_nothing() {
    assert_eq!(SPEC_VERSION, "1.16.1");
    let dir = TestDir::new("boot");
    let backend = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let id = session_id("boot");
    let spec = launch_spec(&backend, &dir.0, &id);
    assert!(spec.agent_socket.ends_with("vsock.sock_1024"));
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();

    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().unwrap();
    assert!(process_alive(pid));
    assert!(netns_exists(&id));
    assert!(cgroup_exists(&id));

    // The guest's agent reaches the server through the vsock port socket.
    let (_conn, hello) = agent_hello(&listener).await;
    assert_eq!(hello["type"], "hello");

    let reqs = requests(&spec.session_dir);
    assert!(
        reqs.iter()
            .all(|r| r["status"] == 204 || r["status"] == 200),
        "{reqs:#?}"
    );
    let calls: Vec<String> = reqs
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .filter(|c| c != "GET /")
        .collect();
    assert_eq!(
        calls,
        [
            "PUT /logger",
            "PUT /metrics",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /drives/writable",
            "PUT /network-interfaces/eth0",
            "PUT /mmds/config",
            "PUT /mmds",
            "PUT /vsock",
            "PUT /actions",
        ]
    );
    let body = |path: &str| reqs.iter().find(|r| r["path"] == path).unwrap()["body"].clone();
    assert_eq!(
        body("/machine-config"),
        json!({"vcpu_count": 2, "mem_size_mib": 512})
    );
    let args = body("/boot-source")["boot_args"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(args.contains("root=/dev/vda"), "{args}");
    assert!(args.ends_with("-- --vm --connect vsock:2:1024"), "{args}");
    assert_eq!(body("/drives/rootfs")["is_read_only"], true);
    assert_eq!(body("/drives/rootfs")["is_root_device"], true);
    assert_eq!(body("/drives/writable")["is_read_only"], false);
    assert_eq!(body("/mmds/config")["version"], "V2");
    assert_eq!(body("/mmds")["sandcast"]["session_id"], id.as_str());
    assert_eq!(
        body("/vsock")["uds_path"],
        spec.session_dir.join("vsock.sock").display().to_string()
    );
    assert_eq!(body("/actions"), json!({"action_type": "InstanceStart"}));
    // The writable drive is sparse and formatted.
    let writable = spec.session_dir.join("writable.ext4");
    let meta = std::fs::metadata(&writable).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < meta.len());
    // The serial console is in the session's log.
    let console = std::fs::read_to_string(spec.session_dir.join("console.log")).unwrap();
    assert!(console.contains("Kernel command line:"), "{console}");

    instance.stop(Duration::from_secs(5)).await.unwrap();
    let exit = instance.exited().borrow().clone().unwrap();
    assert!(exit.requested, "{exit:?}");
    let reqs = requests(&spec.session_dir);
    assert_eq!(
        reqs.last().unwrap()["body"],
        json!({"action_type": "SendCtrlAltDel"})
    );
    // The guest shut down on Ctrl+Alt+Del: Firecracker exited by itself.
    assert!(exit.reason.contains("exit code 0"), "{exit:?}");
    assert!(!process_alive(pid));
    assert!(!netns_exists(&id));
    assert!(!cgroup_exists(&id));
    for f in [
        "writable.ext4",
        "firecracker.sock",
        "vsock.sock",
        "metrics.json",
    ] {
        assert!(!spec.session_dir.join(f).exists(), "{f} left behind");
    }
    assert!(!dir.0.join("run").join(format!("{id}.json")).exists());
    // Idempotent.
    instance.stop(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn stop_kills_a_guest_that_ignores_ctrl_alt_del() {
    let dir = TestDir::new("kill");
    let mut cfg = config(&dir.0);
    cfg.extra_boot_args = vec!["sandcast_double.no_i8042".into()];
    cfg.network = false;
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("kill");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let pid = instance.pid().unwrap();
    instance.stop(Duration::from_millis(300)).await.unwrap();
    let exit = instance.exited().borrow().clone().unwrap();
    assert!(exit.requested);
    assert!(exit.reason.contains("killed by signal 9"), "{exit:?}");
    assert!(!process_alive(pid));
    assert!(!cgroup_exists(&id));
}

#[tokio::test]
async fn a_vm_that_dies_is_reported_and_cleaned_up() {
    let dir = TestDir::new("dies");
    let backend = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let id = session_id("dies");
    let spec = launch_spec(&backend, &dir.0, &id);
    let _listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(instance.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut exited = instance.exited();
    let exit = exited
        .wait_for(|e| e.is_some())
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(!exit.requested);
    assert!(exit.reason.contains("ended unexpectedly"), "{exit:?}");
    assert!(
        exit.reason.contains("Kernel command line"),
        "console tail: {exit:?}"
    );
    assert!(!netns_exists(&id));
    assert!(!cgroup_exists(&id));
    instance.stop(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn a_missing_binary_is_named() {
    let dir = TestDir::new("nobin");
    let mut cfg = config(&dir.0);
    cfg.firecracker_bin = "firecracker-that-does-not-exist".into();
    let backend = FirecrackerBackend::new(cfg).unwrap();
    let id = session_id("nobin");
    let spec = launch_spec(&backend, &dir.0, &id);
    let e = backend.start(&spec).await.err().unwrap();
    assert!(matches!(e, BackendError::NotReady(_)), "{e}");
    assert!(
        e.to_string()
            .contains("firecracker-that-does-not-exist not found on PATH"),
        "{e}"
    );
    let ready = backend.readiness().await;
    assert!(!ready.ready);
    assert!(
        ready
            .checks
            .iter()
            .any(|c| c.name == "firecracker binary" && !c.ok)
    );
    assert!(!netns_exists(&id));
}

#[tokio::test]
async fn missing_or_unusable_kvm_is_named() {
    let dir = TestDir::new("kvm");
    for (dev, want) in [
        ("/nonexistent/kvm", "/nonexistent/kvm does not exist"),
        ("/dev/null", "/dev/null"),
    ] {
        let mut cfg = config(&dir.0);
        cfg.kvm_device = dev.into();
        cfg.probe_kvm = true;
        let backend = FirecrackerBackend::new(cfg).unwrap();
        let id = session_id("kvm");
        let spec = launch_spec(&backend, &dir.0, &id);
        let e = backend.start(&spec).await.err().unwrap();
        assert!(matches!(e, BackendError::NotReady(_)), "{e}");
        assert!(e.to_string().contains(want), "{e}");
        assert!(!netns_exists(&id));
        let ready = backend.readiness().await;
        assert!(
            ready
                .checks
                .iter()
                .any(|c| c.name == "kvm" && !c.ok && c.detail.contains(want))
        );
    }
}

#[tokio::test]
async fn a_bad_kernel_or_image_is_refused_with_the_path() {
    let dir = TestDir::new("badkernel");
    let mut cfg = config(&dir.0);
    std::fs::write(&cfg.kernel, b"\x1f\x8b compressed").unwrap();
    let e = FirecrackerBackend::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("not an uncompressed vmlinux"), "{e}");
    assert!(e.to_string().contains("gzip"), "{e}");
    cfg.kernel = dir.0.join("no-such-vmlinux");
    let e = FirecrackerBackend::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("no-such-vmlinux"), "{e}");
    let mut cfg = config(&dir.0);
    cfg.rootfs = dir.0.clone();
    let e = FirecrackerBackend::new(cfg).unwrap_err();
    assert!(e.to_string().contains("is not a file"), "{e}");
}

#[tokio::test]
async fn an_api_error_is_surfaced_verbatim_and_nothing_is_left() {
    let dir = TestDir::new("apierr");
    let backend = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let id = session_id("apierr");
    let mut spec = launch_spec(&backend, &dir.0, &id);
    // Firecracker refuses a machine with no memory.
    spec.limits = Limits {
        memory_mib: 0,
        ..spec.limits
    };
    let e = backend.start(&spec).await.err().unwrap();
    assert!(
        e.to_string().contains(
            "Firecracker refused PUT /machine-config (400): The memory size (MiB) is invalid."
        ),
        "{e}"
    );
    assert!(!netns_exists(&id));
    assert!(!cgroup_exists(&id));
    assert!(!spec.session_dir.join("writable.ext4").exists());
    assert!(!spec.session_dir.join("firecracker.sock").exists());
    let alive = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains(&format!("{}", spec.session_dir.display())));
    assert!(
        !alive,
        "a firecracker process of the failed session is still running"
    );
}

#[tokio::test]
async fn sessions_restore_from_a_snapshot_with_fresh_mmds() {
    let dir = TestDir::new("snap");
    let mut cfg: FirecrackerConfig = config(&dir.0);
    cfg.snapshot_dir = Some(dir.0.join("snapshot"));
    let backend = FirecrackerBackend::new(cfg).unwrap();
    assert!(backend.snapshot().is_none());
    let files = backend.build_snapshot().await.unwrap();
    assert!(files.state.is_file() && files.memory.is_file() && files.writable.is_file());
    assert!(!netns_exists(
        &sandcast_backend::SessionId::new("snapshot-template").unwrap()
    ));
    let template_reqs = requests(&dir.0.join("snapshot/template"));
    let calls: Vec<String> = template_reqs
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap()
            )
        })
        .collect();
    let pause = calls.iter().position(|c| c == "PATCH /vm").unwrap();
    assert_eq!(calls[pause + 1], "PUT /snapshot/create");
    assert_eq!(template_reqs[pause + 1]["status"], 204);

    for n in 0..2 {
        let id = session_id(&format!("restored{n}"));
        let spec = launch_spec(&backend, &dir.0, &id);
        let listener = UnixListener::bind(&spec.agent_socket).unwrap();
        let instance = backend.start(&spec).await.unwrap();
        // The restored agent reconnects to this session's socket.
        let (_conn, hello) = agent_hello(&listener).await;
        assert_eq!(hello["type"], "hello");
        let reqs = requests(&spec.session_dir);
        assert!(
            reqs.iter()
                .all(|r| r["status"] == 204 || r["status"] == 200),
            "{reqs:#?}"
        );
        assert!(!reqs.iter().any(|r| r["path"] == "/boot-source"));
        let load = reqs.iter().find(|r| r["path"] == "/snapshot/load").unwrap();
        assert_eq!(
            load["body"]["vsock_override"]["uds_path"],
            spec.session_dir.join("vsock.sock").display().to_string()
        );
        let after: Vec<String> = reqs
            .iter()
            .skip_while(|r| r["path"] != "/snapshot/load")
            .map(|r| {
                format!(
                    "{} {}",
                    r["method"].as_str().unwrap(),
                    r["path"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            after,
            [
                "PUT /snapshot/load",
                "PATCH /drives/writable",
                "PUT /mmds",
                "PATCH /vm"
            ]
        );
        let mmds = reqs.iter().find(|r| r["path"] == "/mmds").unwrap();
        assert_eq!(mmds["body"]["sandcast"]["session_id"], id.as_str());
        // Each restored session gets its own token's hash, never the token.
        let token = spec.agent_token.as_ref().unwrap();
        assert_eq!(
            mmds["body"]["sandcast"]["agent_token_sha256"],
            token.sha256_hex()
        );
        assert!(!mmds["body"].to_string().contains(token.expose()));
        instance.stop(Duration::from_secs(5)).await.unwrap();
        assert!(!netns_exists(&id));
    }
}

#[tokio::test]
async fn an_image_without_the_browser_is_refused_with_the_reason() {
    let dir = TestDir::new("image");
    let image = dir.0.join("image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("rootfs.ext4"), b"ext4").unwrap();
    let manifest = json!({
        "format": 1, "variant": "tiny", "distro": "debian", "suite": "bookworm",
        "mirror": "http://deb.debian.org/debian",
        "packages": {"busybox": "1:1.35.0-4+b3", "ca-certificates": "20230311", "x11vnc": "0.9.16-9"},
        "agent_version": "0.1.0", "agent_sha256": "00", "built_at": 0,
        "ext4_size": 4, "ext4_sha256": "00", "rootfs_key": ""
    });
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
    let mut cfg = config(&dir.0);
    cfg.image = Some(image.clone());
    let e = FirecrackerBackend::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("lacks xvfb, chromium"), "{e}");

    let mut manifest = manifest;
    manifest["packages"]["xvfb"] = json!("2:21.1.7-3");
    manifest["packages"]["chromium"] = json!("131.0");
    std::fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
    let backend = FirecrackerBackend::new(cfg).unwrap();
    assert_eq!(backend.config().rootfs, image.join("rootfs.ext4"));
}

#[tokio::test]
async fn a_profile_is_the_vms_third_drive_writable_and_kept() {
    let dir = TestDir::new("home");
    let backend = FirecrackerBackend::new(config(&dir.0)).unwrap();
    let id = session_id("home");
    let mut spec = launch_spec(&backend, &dir.0, &id);
    let image = dir.0.join("alice.ext4");
    std::fs::write(&image, b"stands for an ext4 profile").unwrap();
    spec.home = Some(image.clone());
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = backend.start(&spec).await.unwrap();
    let _hello = agent_hello(&listener).await;
    let reqs = requests(&spec.session_dir);
    let drives: Vec<&str> = reqs
        .iter()
        .filter(|r| r["method"] == "PUT")
        .filter_map(|r| r["path"].as_str())
        .filter(|p| p.starts_with("/drives/"))
        .collect();
    // Third, so the guest sees it as /dev/vdc.
    assert_eq!(
        drives,
        ["/drives/rootfs", "/drives/writable", "/drives/home"]
    );
    let home = reqs.iter().find(|r| r["path"] == "/drives/home").unwrap();
    assert_eq!(home["status"], 204, "{home}");
    assert_eq!(home["body"]["is_read_only"], false);
    assert_eq!(home["body"]["is_root_device"], false);
    assert_eq!(home["body"]["path_on_host"], image.display().to_string());
    instance.stop(Duration::from_secs(5)).await.unwrap();
    // The profile outlives the VM.
    assert_eq!(
        std::fs::read(&image).unwrap(),
        b"stands for an ext4 profile"
    );
}

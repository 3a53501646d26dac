//! Boots a real microVM with the tiny image, where that is possible: a
//! `firecracker` binary (`SANDCAST_FC_BIN` or `SANDCAST_FIRECRACKER`, else
//! `../shared/firecracker/bin/` beside the project, else on PATH), a
//! /dev/kvm that runs a Linux guest (not a paravirtual one), a guest kernel (`SANDCAST_FC_KERNEL`) and a tiny image built
//! with the real agent (`SANDCAST_FC_IMAGE`, a directory from
//! `sandcast image build --tiny`). Otherwise it says why it is skipped, on
//! stderr, which the test harness does not capture.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandcast_backend::{Backend, LaunchSpec, Limits, NetworkPolicy, SessionId};
use sandcast_firecracker::{FirecrackerBackend, FirecrackerConfig};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

mod real;

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED boots_a_real_microvm: {why}");
}

fn firecracker_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SANDCAST_FIRECRACKER") {
        return Some(p.into());
    }
    real::firecracker().ok().or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("firecracker"))
            .find(|p| p.is_file())
    })
}

#[tokio::test]
async fn boots_a_real_microvm() {
    let Some(bin) = firecracker_binary() else {
        return skip(
            "no firecracker binary: SANDCAST_FC_BIN is not set, ../shared/firecracker/bin has none, none on PATH",
        );
    };
    if let Err(e) = sandcast_firecracker::kvm::probe(Path::new("/dev/kvm")) {
        return skip(&format!("KVM cannot run a guest here: {e}"));
    }
    if let Some(why) = sandcast_firecracker::kvm::linux_guests_unsupported(Path::new("/sys/module"))
    {
        return skip(&why);
    }
    let Some(kernel) = std::env::var_os("SANDCAST_FC_KERNEL").map(PathBuf::from) else {
        return skip("SANDCAST_FC_KERNEL (an uncompressed vmlinux) is not set");
    };
    let Some(image) = std::env::var_os("SANDCAST_FC_IMAGE").map(PathBuf::from) else {
        return skip("SANDCAST_FC_IMAGE (a tiny image directory with the real agent) is not set");
    };
    sandcast_image::check(
        &image,
        &sandcast_image::Requirements {
            ext4: true,
            ..Default::default()
        },
    )
    .expect("a usable tiny image");
    let dir = std::env::temp_dir().join(format!("sc-fc-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        firecracker_bin: bin,
        kernel,
        rootfs: image.join(sandcast_image::ROOTFS_EXT4),
        runtime_dir: dir.join("run"),
        writable_drive_mib: 256,
        ..FirecrackerConfig::default()
    })
    .unwrap();
    let id = SessionId::new(format!("realboot-{}", std::process::id())).unwrap();
    let session_dir = dir.join("session");
    std::fs::create_dir_all(&session_dir).unwrap();
    let spec = LaunchSpec {
        agent_socket: backend.agent_socket(&id, &session_dir),
        id,
        session_dir: session_dir.clone(),
        agent_binary: PathBuf::new(),
        limits: Limits {
            memory_mib: 256,
            cpu_millis: 1000,
            pids: 256,
        },
        network: NetworkPolicy {
            egress: sandcast_backend::Egress::None,
        },
        agent_token: Some(sandcast_backend::AgentToken::new("real-boot-token")),
        home: None,
    };
    let listener = UnixListener::bind(&spec.agent_socket).unwrap();
    let instance = match backend.start(&spec).await {
        Ok(i) => i,
        Err(e) => {
            // A KVM that runs the probe can still fail a full guest (nested
            // virtualisation without the needed features); say so and stop.
            let _ = std::fs::remove_dir_all(&dir);
            return skip(&format!("firecracker could not start a VM here: {e}"));
        }
    };
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the guest agent connects over vsock within 30 s")
        .unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).await.unwrap();
    assert!(u32::from_be_bytes(len) > 0);
    instance.stop(Duration::from_secs(5)).await.unwrap();
    let console = std::fs::read_to_string(session_dir.join("console.log")).unwrap();
    assert!(console.contains("Linux version"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
}

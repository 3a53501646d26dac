//! The real Firecracker and jailer binaries, the tiny guest, and the API
//! calls that run it, for the tests and benchmarks that use them: `SANDCAST_FC_BIN` and
//! `SANDCAST_JAILER_BIN`, else `../shared/firecracker/bin/` beside the
//! project. Each finder says why when there is none.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandcast_firecracker::api::*;
use sandcast_firecracker::client::FirecrackerClient;

/// The line the tiny guest prints on its serial console.
pub const HELLO: &str = "sandcast tiny guest: hello";

fn find(var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(p.into());
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/firecracker/bin")
        .join(name);
    if shared.is_file() {
        return Ok(shared);
    }
    Err(format!(
        "no real {name}: {var} is not set and {} does not exist",
        shared.display()
    ))
}

/// The real Firecracker, if there is one.
pub fn firecracker() -> Result<PathBuf, String> {
    find("SANDCAST_FC_BIN", "firecracker")
}

/// The real jailer, beside the real Firecracker.
pub fn jailer() -> Result<PathBuf, String> {
    find("SANDCAST_JAILER_BIN", "jailer")
}

/// Assembles the tiny guest into `dir`; `stay`: it halts instead of
/// resetting, so the VM runs until stopped.
pub fn tiny_guest(dir: &Path, stay: bool) -> Result<PathBuf, String> {
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

/// The tiny guest's memory in the tests and benchmark that drive the real
/// API directly.
pub const GUEST_MIB: u64 = 32;

/// A real Firecracker on API socket `sock`, in network namespace `netns`
/// when given, its serial console written to `console` and its own log to
/// `console` with the extension `vmm.log`.
pub fn spawn(
    bin: &Path,
    netns: Option<&str>,
    sock: &Path,
    console: &Path,
) -> tokio::process::Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    // Firecracker's own log goes to a file beside the console: on stdout it
    // would interleave with the guest's serial output inside a line (seen:
    // "sa<a log line>ndcast tiny guest: hello").
    let log = console.with_extension("vmm.log");
    std::fs::File::create(&log).unwrap();
    cmd.arg("--api-sock")
        .arg(sock)
        .arg("--log-path")
        .arg(&log)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(console).unwrap())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (up to 5 s) until the API on `sock` answers.
pub async fn api_up(sock: &Path) -> FirecrackerClient {
    let client = FirecrackerClient::new(sock);
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.describe().await.is_err() {
        assert!(Instant::now() < deadline, "no API on {}", sock.display());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    client
}

/// Configures the tiny guest `kernel`: one vCPU and [`GUEST_MIB`], vsock
/// on `vsock_uds`, and `eth0` on TAP `tap` when given.
pub async fn configure(c: &FirecrackerClient, kernel: &Path, vsock_uds: &Path, tap: Option<&str>) {
    c.put_machine_config(&MachineConfig {
        vcpu_count: 1,
        mem_size_mib: GUEST_MIB,
        smt: None,
        track_dirty_pages: None,
    })
    .await
    .unwrap();
    c.put_boot_source(&BootSource {
        kernel_image_path: kernel.display().to_string(),
        boot_args: None,
        initrd_path: None,
    })
    .await
    .unwrap();
    if let Some(tap) = tap {
        c.put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap.into(),
            guest_mac: None,
        })
        .await
        .unwrap();
    }
    c.put_vsock(&Vsock {
        guest_cid: 3,
        uds_path: vsock_uds.display().to_string(),
    })
    .await
    .unwrap();
}

/// Pauses the VM and writes a full snapshot to `state` and `mem`.
pub async fn snapshot(c: &FirecrackerClient, state: &Path, mem: &Path) {
    c.set_vm_state(VmState::Paused).await.unwrap();
    c.create_snapshot(&SnapshotCreateParams {
        snapshot_path: state.display().to_string(),
        mem_file_path: mem.display().to_string(),
        snapshot_type: Some(SnapshotType::Full),
    })
    .await
    .unwrap();
}

/// Loads the snapshot at `state` and `mem` into a fresh Firecracker and
/// resumes it, its vsock on `vsock_uds` and `eth0` on `tap` when given (the
/// overrides a restored session needs).
pub async fn restore(
    c: &FirecrackerClient,
    state: &Path,
    mem: &Path,
    vsock_uds: &Path,
    tap: Option<&str>,
) {
    c.load_snapshot(&SnapshotLoadParams {
        snapshot_path: state.display().to_string(),
        mem_backend: MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: mem.display().to_string(),
        },
        resume_vm: Some(true),
        network_overrides: tap
            .map(|t| NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: t.into(),
            })
            .into_iter()
            .collect(),
        vsock_override: Some(VsockOverride {
            uds_path: vsock_uds.display().to_string(),
        }),
        clock_realtime: None,
    })
    .await
    .unwrap();
}

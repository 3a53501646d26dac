//! Builds the agent's microVM init module (`sandcast-agent/src/vm_init.rs`)
//! here too, runs its unit tests, and runs `prepare_vm_root_with` for real in
//! a child process with its own mount, UTS and network namespaces, chrooted
//! into a small read-only-style root, with an ext4 writable drive on a loop
//! device standing in for the VM's `/dev/vdb`.

#[allow(dead_code)]
#[path = "../../sandcast-agent/src/vm_init.rs"]
mod vm_init;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

const CHILD_ENV: &str = "SANDCAST_VM_INIT_CHILD";

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs inside the child (it does nothing in a normal test run): becomes
/// "PID 1 of a VM" in namespaces and checks the result from inside.
#[test]
fn vm_init_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (root, device) = spec.split_once('|').unwrap();
    // The VM's interface, in this child's own network namespace (a veth:
    // not every kernel has the dummy driver).
    sh(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ],
    );
    sh("ip", &["link", "set", "eth0", "up"]);
    let cs = |s: &str| std::ffi::CString::new(s).unwrap();
    // SAFETY: plain mount/chroot system calls on valid strings, in a process
    // that has its own mount namespace.
    unsafe {
        let none = cs("none");
        let slash = cs("/");
        assert_eq!(
            libc::mount(
                none.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0
        );
        // pivot_root needs the current root to be a mount point.
        let r = cs(root);
        assert_eq!(
            libc::mount(
                r.as_ptr(),
                r.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null()
            ),
            0
        );
        std::env::set_current_dir(root).unwrap();
        assert_eq!(libc::chroot(cs(".").as_ptr()), 0);
    }
    std::env::set_current_dir("/").unwrap();

    vm_init::prepare_vm_root_with(Path::new(device)).unwrap();

    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let fs_of = |target: &str| {
        mounts
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .rfind(|f| f[1] == target)
            .map(|f| f[2].to_owned())
    };
    assert_eq!(fs_of("/").as_deref(), Some("overlay"), "{mounts}");
    assert_eq!(fs_of("/proc").as_deref(), Some("proc"));
    assert_eq!(fs_of("/sys").as_deref(), Some("sysfs"));
    assert_eq!(fs_of("/dev").as_deref(), Some("devtmpfs"));
    assert_eq!(fs_of("/dev/pts").as_deref(), Some("devpts"));
    assert_eq!(fs_of("/dev/shm").as_deref(), Some("tmpfs"));
    assert_eq!(fs_of("/run").as_deref(), Some("tmpfs"));
    assert_eq!(fs_of("/tmp").as_deref(), Some("tmpfs"));
    assert!(!Path::new("/oldroot").exists());
    let mut name = [0u8; 64];
    // SAFETY: the buffer is 64 bytes.
    unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    assert!(name.starts_with(b"sandcast\0"));
    // The read-only image root is writable through the overlay.
    std::fs::write("/etc/written-in-session", b"hello").unwrap();
    // MMDS is routed straight out of the VM's interface (169.254.169.254,
    // little-endian hex in /proc/net/route, flags RTF_UP | RTF_HOST).
    let routes = std::fs::read_to_string("/proc/net/route").unwrap();
    assert!(
        routes.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[0] == "eth0" && f[1] == "FEA9FEA9" && f[3] == "0005"
        }),
        "{routes}"
    );
    assert!(vm_init::has_mmds_interface());
    let lo = std::fs::read_to_string("/sys/class/net/lo/flags").unwrap();
    assert_eq!(
        u32::from_str_radix(lo.trim().trim_start_matches("0x"), 16).unwrap() & 1,
        1
    );
}

#[test]
fn prepare_vm_root_overlays_the_writable_drive_and_pivots() {
    let dir = std::env::temp_dir().join(format!("sc-vm-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    for d in ["proc", "sys", "dev", "run", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/hostname"), "image\n").unwrap();
    let drive = dir.join("writable.ext4");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    sh("mkfs.ext4", &["-q", "-F", drive.to_str().unwrap()]);
    let loopdev = sh("losetup", &["-f", "--show", drive.to_str().unwrap()]);

    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "vm_init_child_process", "--nocapture"])
        .env(CHILD_ENV, format!("{}|{loopdev}", root.display()));
    // SAFETY: unshare is a plain system call.
    unsafe {
        child.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = child.output().unwrap();
    let detach = || {
        // The child's mounts went with its namespace; the loop device is free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while Command::new("losetup")
            .args(["-d", &loopdev])
            .status()
            .is_ok_and(|s| !s.success())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    detach();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    // The write landed on the writable drive, not in the image.
    assert!(!root.join("etc/written-in-session").exists());
    let written = sh(
        "debugfs",
        &[
            "-R",
            "cat /upper/etc/written-in-session",
            drive.to_str().unwrap(),
        ],
    );
    assert_eq!(written, "hello");
    std::fs::remove_dir_all(&dir).unwrap();
}

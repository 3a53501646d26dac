//! Builds the tiny image for real (mmdebstrap from the Debian mirror apt
//! uses, then `mkfs.ext4 -d`), checks its manifest, and that a second build
//! is served from the cache.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sandcast_image::*;

fn debugfs(ext4: &Path, request: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(ext4)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn tiny_image_builds_with_a_true_manifest_and_is_cached() {
    let dir = std::env::temp_dir().join(format!("sc-image-tiny-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Any binary stands for the agent here; its bytes are what is checked.
    let agent = Path::new("/bin/true");
    let mut opts = BuildOptions::new(&dir, agent, "0.1.0-test");
    opts.variant = Variant::Tiny;
    opts.ext4_headroom_mib = 16;

    let t = Instant::now();
    let report = build_with_report(&opts).unwrap();
    println!("tiny image built in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(report.ran, ["bootstrap", "agent", "ext4"]);
    let m = &report.manifest;
    assert_eq!(m.suite, "bookworm");
    assert_eq!(m.variant, Variant::Tiny);
    assert!(
        m.packages["busybox"].contains("1.35"),
        "{:?}",
        m.packages.get("busybox")
    );
    assert!(m.packages.contains_key("libc6"));
    assert!(m.packages.contains_key("ca-certificates"));
    assert!(!m.packages.contains_key("chromium"));
    assert_eq!(m.agent_version, "0.1.0-test");

    // The manifest's digest and size are the ext4's.
    let ext4 = dir.join(ROOTFS_EXT4);
    assert_eq!(std::fs::metadata(&ext4).unwrap().len(), m.ext4_size);
    let checked = check(
        &dir,
        &Requirements {
            packages: vec!["busybox".into()],
            ext4: true,
            verify_digest: true,
            directory: true,
        },
    )
    .unwrap();
    assert_eq!(&checked, m);

    // The agent is inside the ext4 (read without mounting), byte for byte,
    // and is the init.
    assert_eq!(
        debugfs(&ext4, &format!("cat {AGENT_PATH}")),
        std::fs::read(agent).unwrap()
    );
    let init = String::from_utf8(debugfs(&ext4, "stat /sbin/init")).unwrap();
    assert!(init.contains(AGENT_PATH), "{init}");
    let hostname = debugfs(&ext4, "cat /etc/hostname");
    assert_eq!(hostname, b"sandcast\n");

    // A browser session cannot use it, and is told why.
    let e = check(&dir, &Requirements::browser()).unwrap_err();
    assert!(e.to_string().contains("lacks xvfb, chromium"), "{e}");

    // Unchanged inputs: nothing is redone.
    let t = Instant::now();
    let again = build_with_report(&opts).unwrap();
    println!("cached rebuild in {:.2} s", t.elapsed().as_secs_f64());
    assert!(again.ran.is_empty(), "{:?}", again.ran);
    assert_eq!(again.manifest, *m);

    // A new agent redoes only the agent and the ext4.
    let mut opts2 = opts.clone();
    opts2.agent_binary = "/bin/false".into();
    let third = build_with_report(&opts2).unwrap();
    assert_eq!(third.ran, ["agent", "ext4"]);
    assert_ne!(third.manifest.ext4_sha256, m.ext4_sha256);

    std::fs::remove_dir_all(&dir).unwrap();
}

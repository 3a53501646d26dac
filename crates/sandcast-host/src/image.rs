//! Work on a session's ext4 image (a user's profile) from the host: the
//! image is mounted only in a throw-away mount namespace of `unshare`, so
//! the host's mounts never hold it, and the mount and its loop device go
//! when the script ends, whatever it did.

use std::path::Path;

/// `unshare --mount … sh -c SCRIPT IMAGE`: the image mounted (ext4, with
/// `nosuid,nodev,noexec` and `options`, e.g. `ro`) at `$m` before `script`
/// runs; the script's own arguments are `$1`… (add them to the command).
/// A failing step fails the command (`set -e`).
pub fn in_private_mount(image: &Path, options: &str, script: &str) -> tokio::process::Command {
    let options = if options.is_empty() {
        "loop,nosuid,nodev,noexec".to_string()
    } else {
        format!("loop,nosuid,nodev,noexec,{options}")
    };
    let whole = format!(
        "set -e\n\
         m=$(mktemp -d)\n\
         trap 'umount \"$m\" 2>/dev/null; rmdir \"$m\"' EXIT\n\
         mount -t ext4 -o {options} \"$0\" \"$m\"\n\
         {script}"
    );
    let mut cmd = tokio::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(whole)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_script_sees_the_image_mounted_and_the_host_never_does() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sc-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("home.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(ok.success());
        let out = in_private_mount(
            &image,
            "",
            "echo \"$1\" > \"$m/note\"; stat -f -c %T \"$m\"",
        )
        .arg("written inside")
        .output()
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ext2/ext3");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(dir.to_str().unwrap()),
            "the host holds a mount"
        );
        // Read-only: the note is there, and writing fails the script.
        let out = in_private_mount(&image, "ro", "cat \"$m/note\"; touch \"$m/x\"")
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "written inside\n");
        assert!(!out.status.success());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

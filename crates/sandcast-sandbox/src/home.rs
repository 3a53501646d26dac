//! A user's profile (an ext4 image) as the session's home.
//!
//! The image is attached to a free loop device here, with autoclear, and
//! mounted by the forked child inside the session's own mount namespace
//! (see [`crate::launch::PreExec`]): nothing of it ever appears in the
//! host's mounts, and when the session's last process is gone the mount
//! goes with its namespace and the loop device detaches itself, also after
//! a crash of the server. Each session runs as its own host uid, so before
//! the mount the image's files are given to this session's uid (in a
//! throw-away mount namespace of `unshare`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An image attached to a loop device that detaches itself once nothing
/// holds it: keep this until the child has mounted it.
#[derive(Debug)]
pub struct LoopDevice {
    _device: File,
    /// `/dev/loopN`.
    pub path: CString,
}

impl LoopDevice {
    /// Attaches `image` (read-write) to a free loop device.
    pub fn attach(image: &Path) -> io::Result<LoopDevice> {
        let backing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", image.display())))?;
        let control = File::open("/dev/loop-control")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/loop-control: {e}")))?;
        // Another process may take the free device between the two calls.
        for _ in 0..8 {
            // SAFETY: an ioctl without argument on a descriptor we own.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let path = format!("/dev/loop{n}");
            let device = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?;
            // SAFETY: zeroes are a valid loop_config.
            let mut config: LoopConfig = unsafe { std::mem::zeroed() };
            config.fd = backing.as_raw_fd() as u32;
            config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
            // SAFETY: LOOP_CONFIGURE reads a loop_config we own.
            let r = unsafe {
                libc::ioctl(
                    device.as_raw_fd(),
                    LOOP_CONFIGURE,
                    &config as *const LoopConfig,
                )
            };
            if r == 0 {
                return Ok(LoopDevice {
                    _device: device,
                    path: CString::new(path).expect("no NUL"),
                });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("attaching {} to {path}: {e}", image.display()),
                ));
            }
        }
        Err(io::Error::other("no free loop device after 8 tries"))
    }
}

/// Gives every file of the ext4 `image` to `uid` (and its gid), the home
/// itself mode 0700: mounted in a mount namespace of its own, so the host
/// never sees it. Symbolic links are changed, never followed.
pub async fn give_to(image: &Path, uid: u32) -> Result<(), String> {
    let out = sandcast_host::image::in_private_mount(
        image,
        "",
        "chown -R -P \"$1:$1\" \"$m\"\nchmod 0700 \"$m\"",
    )
    .arg(uid.to_string())
    .output()
    .await
    .map_err(|e| format!("running unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "preparing the profile {} for uid {uid}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[tokio::test]
    async fn an_image_is_given_to_a_uid_and_its_loop_device_goes_when_released() {
        if !root() {
            eprintln!("SKIPPED: loop devices and mounts need root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sc-home-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("home.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(mkfs.success());
        give_to(&image, 2_000_123).await.unwrap();
        let dev = LoopDevice::attach(&image).unwrap();
        let name = dev
            .path
            .to_str()
            .unwrap()
            .trim_start_matches("/dev/")
            .to_string();
        let backing = format!("/sys/block/{name}/loop/backing_file");
        assert_eq!(
            std::fs::read_to_string(&backing).unwrap().trim(),
            image.display().to_string()
        );
        // Mounted in a namespace of its own: the files are the uid's.
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "m=$(mktemp -d) && mount {} \"$m\" && stat -c '%u %a' \"$m\" \"$m/lost+found\"; umount \"$m\"; rmdir \"$m\"",
                dev.path.to_str().unwrap()
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "2000123 700\n2000123 700\n"
        );
        drop(dev);
        // Autoclear: with nothing holding it, the device lets go of the image.
        assert!(
            std::fs::read_to_string(&backing).is_err(),
            "{name} still holds the image"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

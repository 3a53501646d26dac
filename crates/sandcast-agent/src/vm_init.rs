//! PID-1 duties of the agent inside a Firecracker microVM.
//!
//! The kernel starts the agent as init (`init=/usr/local/bin/sandcast-agent
//! -- --vm --connect vsock:2:1024`) with the image's ext4 mounted read-only
//! as `/`. [`prepare_vm_root`] makes a normal, writable system of it before
//! anything else runs: it mounts the per-session writable drive (`/dev/vdb`,
//! ext4), lays an overlay of it over the read-only root, pivots into the
//! overlay, mounts `/proc`, `/sys`, `/dev` (with `/dev/pts` and a sized
//! `/dev/shm` for Chromium), `/run` and `/tmp`, brings up loopback, writes
//! `/etc/resolv.conf` from the kernel's `ip=` configuration, routes
//! Firecracker's MMDS address through the VM's interface (when it has one),
//! mounts a user's profile drive (`/dev/vdc`, when the session has one) as
//! the home and sets the hostname. Reaping orphans stays the supervisor's job.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// The per-session writable drive (Firecracker's second virtio-block drive).
pub const WRITABLE_DEVICE: &str = "/dev/vdb";
/// A user's profile, when the session has one (the third drive).
pub const PROFILE_DEVICE: &str = "/dev/vdc";
/// Where the profile is mounted: the session user's home.
pub const PROFILE_HOME: &str = sandcast_proto::files::SESSION_HOME;
/// The hostname of every session.
pub const HOSTNAME: &str = "sandcast";
/// The VM's network interface (the kernel's `ip=` configures it); MMDS
/// answers on it.
pub const MMDS_INTERFACE: &str = "eth0";
/// Firecracker's default MMDS address, 169.254.169.254.
pub const MMDS_IPV4: [u8; 4] = [169, 254, 169, 254];
/// Where the writable drive is mounted before the pivot.
const RW_MOUNT: &str = "/run/sandcast/rw";
/// Where the overlay is assembled before the pivot.
const NEW_ROOT: &str = "/run/sandcast/root";
/// Chromium keeps shared memory for its renderers in /dev/shm; a small one
/// crashes tabs, so it gets half of the VM's memory (tmpfs pages are only
/// used when written).
const SHM_OPTIONS: &str = "mode=1777,size=50%";

/// Turns the read-only image root into a writable overlay root and mounts
/// what a session needs; see the module documentation.
pub fn prepare_vm_root() -> io::Result<()> {
    prepare_vm_root_with(Path::new(WRITABLE_DEVICE))
}

/// [`prepare_vm_root`] with another writable drive.
pub fn prepare_vm_root_with(writable: &Path) -> io::Result<()> {
    // devtmpfs may already be there (CONFIG_DEVTMPFS_MOUNT).
    mount_ignoring_busy("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    std::fs::create_dir_all(RW_MOUNT)?;
    std::fs::create_dir_all(NEW_ROOT)?;
    mount(
        &writable.to_string_lossy(),
        RW_MOUNT,
        "ext4",
        libc::MS_NOATIME,
        "",
    )
    .map_err(|e| {
        context(
            e,
            &format!("mounting the writable drive {}", writable.display()),
        )
    })?;
    let upper = format!("{RW_MOUNT}/upper");
    let work = format!("{RW_MOUNT}/work");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    mount(
        "overlay",
        NEW_ROOT,
        "overlay",
        0,
        &overlay_options("/", &upper, &work),
    )
    .map_err(|e| context(e, "mounting the overlay root"))?;
    pivot_into(NEW_ROOT)?;

    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount_ignoring_busy("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    for dir in ["/dev/pts", "/dev/shm"] {
        std::fs::create_dir_all(dir)?;
    }
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount(
        "shm",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        SHM_OPTIONS,
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    loopback_up()?;
    if let Ok(pnp) = std::fs::read_to_string("/proc/net/pnp") {
        let servers = nameservers(&pnp);
        if !servers.is_empty() {
            let text: String = servers
                .iter()
                .map(|s| format!("nameserver {s}\n"))
                .collect();
            std::fs::write("/etc/resolv.conf", text)?;
        }
    }
    if has_mmds_interface() {
        add_host_route(MMDS_IPV4, MMDS_INTERFACE)?;
    }
    mount_profile(Path::new(PROFILE_DEVICE), Path::new(PROFILE_HOME))?;
    set_hostname(HOSTNAME)
}

/// Mounts a profile's drive as the home when the VM has one; returns
/// whether it did. A drive that is there but does not mount is an error:
/// a session must not run on a fresh home in place of its profile.
pub fn mount_profile(device: &Path, home: &Path) -> io::Result<bool> {
    if !device.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(home)?;
    mount(
        &device.to_string_lossy(),
        &home.to_string_lossy(),
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    )
    .map_err(|e| context(e, &format!("mounting the profile {}", device.display())))?;
    Ok(true)
}

/// Whether the VM has the interface MMDS answers on (none when the backend
/// runs it without a network).
pub fn has_mmds_interface() -> bool {
    Path::new("/sys/class/net").join(MMDS_INTERFACE).exists()
}

/// Routes `addr`/32 straight out of `dev`, as Firecracker's MMDS needs
/// (`ip route add 169.254.169.254 dev eth0`): the guest then asks for the
/// address on the link, where Firecracker answers for it.
pub fn add_host_route(addr: [u8; 4], dev: &str) -> io::Result<()> {
    let sin = |a: [u8; 4]| {
        // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
        let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        s.sin_family = libc::AF_INET as libc::sa_family_t;
        s.sin_addr.s_addr = u32::from_ne_bytes(a);
        // SAFETY: sockaddr_in and sockaddr have the same size; a sockaddr
        // holding an AF_INET address is how the routing ioctl takes it.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(s) }
    };
    let name = cstr(dev)?;
    // SAFETY: rtentry is plain data; zeroed is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sin(addr);
    rt.rt_genmask = sin([255, 255, 255, 255]);
    rt.rt_flags = libc::RTF_UP | libc::RTF_HOST;
    rt.rt_dev = name.as_ptr().cast_mut();
    // SAFETY: a fresh socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(context(io::Error::last_os_error(), "socket for a route"));
    }
    // SAFETY: `rt` is a valid rtentry whose device name outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCADDRT, &rt) };
    let err = (rc < 0).then(io::Error::last_os_error);
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    match err {
        None => Ok(()),
        // Already there (the agent restarted): fine.
        Some(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Some(e) => {
            let [a, b, c, d] = addr;
            Err(context(
                e,
                &format!("routing {a}.{b}.{c}.{d} through {dev}"),
            ))
        }
    }
}

/// Options of the overlay mount.
fn overlay_options(lower: &str, upper: &str, work: &str) -> String {
    format!("lowerdir={lower},upperdir={upper},workdir={work}")
}

/// Name servers from the kernel's `/proc/net/pnp` (written by `ip=`).
fn nameservers(pnp: &str) -> Vec<String> {
    pnp.lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s != "0.0.0.0")
        .collect()
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in {s:?}")))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string for the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(context(e, &format!("mount {fstype} on {target}")))
    }
}

fn mount_ignoring_busy(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    match mount(source, target, fstype, flags, data) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Makes `new_root` the root and lets go of the old one.
fn pivot_into(new_root: &str) -> io::Result<()> {
    let old = format!("{new_root}/oldroot");
    std::fs::create_dir_all(&old)?;
    std::env::set_current_dir(new_root)?;
    let (dot, old_rel) = (cstr(".")?, cstr("oldroot")?);
    // SAFETY: plain system calls on valid strings; no memory is shared.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old_rel.as_ptr()) };
    if rc != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "pivot_root into the overlay",
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "chroot into the overlay",
        ));
    }
    std::env::set_current_dir("/")?;
    let old_abs = cstr("/oldroot")?;
    // The writable drive stays mounted underneath the overlay, which holds it.
    // SAFETY: as above.
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "detaching the old root",
        ));
    }
    let _ = std::fs::remove_dir("/oldroot");
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(context(io::Error::last_os_error(), "sethostname"))
    }
}

/// Brings `lo` up; the kernel's `ip=` configures only the VM's interface.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a fresh socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(context(io::Error::last_os_error(), "socket for lo"));
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for these ioctls; `fd` is open.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
    result.map_err(|e| context(e, "bringing lo up"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_puts_the_writable_drive_over_the_image() {
        assert_eq!(
            overlay_options("/", "/run/sandcast/rw/upper", "/run/sandcast/rw/work"),
            "lowerdir=/,upperdir=/run/sandcast/rw/upper,workdir=/run/sandcast/rw/work"
        );
    }

    #[test]
    fn name_servers_come_from_the_kernel_ip_config() {
        let pnp = "#MANUAL\nnameserver 1.1.1.1\nnameserver 0.0.0.0\nbootserver 0.0.0.0\n";
        assert_eq!(nameservers(pnp), ["1.1.1.1"]);
        assert!(nameservers("#MANUAL\n").is_empty());
    }

    #[test]
    fn a_profile_drive_is_mounted_as_the_home_and_its_absence_is_no_error() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sc-vm-home-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let home = dir.join("home");
        assert!(!mount_profile(&dir.join("no-such-device"), &home).unwrap());
        let image = dir.join("profile.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let ok = |c: &mut std::process::Command| c.status().unwrap().success();
        assert!(ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)));
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(device.starts_with("/dev/loop"), "{device}");
        assert!(mount_profile(Path::new(&device), &home).unwrap());
        assert!(
            home.join("lost+found").is_dir(),
            "the profile's file system is the home"
        );
        // SAFETY: a NUL-terminated path.
        unsafe {
            libc::umount2(
                cstr(home.to_str().unwrap()).unwrap().as_ptr(),
                libc::MNT_DETACH,
            )
        };
        let _ = std::process::Command::new("losetup")
            .args(["-d", &device])
            .status();
        // A drive that is not a file system fails the VM, naming it.
        let bad = dir.join("not-ext4");
        std::fs::write(&bad, vec![0u8; 1 << 20]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&bad)
            .output()
            .unwrap();
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let err = mount_profile(Path::new(&device), &home).unwrap_err();
        assert!(err.to_string().contains("mounting the profile"), "{err}");
        let _ = std::process::Command::new("losetup")
            .args(["-d", &device])
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mount_errors_name_the_target() {
        let e = mount("none", "/nonexistent/target", "tmpfs", 0, "").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/target"), "{e}");
    }
}

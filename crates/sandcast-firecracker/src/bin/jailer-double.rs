//! A stand-in for Firecracker's `jailer` where no Firecracker release is
//! installed, following its documentation for v1.16.1 (`docs/jailer.md`):
//!
//! 1. validates the arguments (`--id` of letters, digits and hyphens, at most
//!    64; an `--exec-file` whose name contains `firecracker`);
//! 2. closes every inherited descriptor but 0, 1 and 2, and execs with an
//!    empty environment;
//! 3. makes `<chroot_base>/<exec_file_name>/<id>/root` and copies the exec
//!    file into it;
//! 4. sets `--resource-limit`s (`no-file` 2048 when none is given);
//! 5. makes `<cgroup_base>/<parent_cgroup>/<id>` for each controller named by
//!    a `--cgroup` (found through `/proc/mounts`), writes the values, and puts
//!    itself in (`tasks` on v1, `cgroup.procs` on v2);
//! 6. joins `--netns`;
//! 7. unshares its mount namespace, makes `/` private, bind-mounts the jail
//!    on itself, `pivot_root`s into it, detaches the old root and chroots;
//! 8. makes `/dev/net/tun` (10, 200) and `/dev/kvm` (10, 232) and gives them
//!    and `/` to `--uid`:`--gid`;
//! 9. with `--daemonize`, starts a session and points 0, 1, 2 at `/dev/null`;
//! 10. drops to `--gid` and `--uid` and execs `/<exec_file_name>
//!     --id=<id> --start-time-us=<t> --start-time-cpu-us=<t>` and the
//!     arguments after `--`: the same pid, as without `--new-pid-ns`.
//!
//! One deviation, because this double runs `firecracker-double`, which is
//! linked dynamically (a Firecracker release is a static musl binary): the
//! host's `/usr` is bind-mounted read-only at the jail's `/usr` (with `lib`
//! and `lib64` links) inside the jail's private mount namespace, so the mount
//! ends with the process. `--new-pid-ns` is refused as not implemented.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, chown, chroot, pivot_root, setgid, setgroups, setuid};

/// What the command line asks for.
#[derive(Debug)]
struct Args {
    id: String,
    exec_file: PathBuf,
    uid: u32,
    gid: u32,
    chroot_base: PathBuf,
    parent_cgroup: Option<String>,
    cgroup_v2: bool,
    cgroups: Vec<(String, String)>,
    netns: Option<PathBuf>,
    limits: Vec<(String, u64)>,
    daemonize: bool,
    extra: Vec<OsString>,
}

fn main() {
    let start_us = now_us(libc::CLOCK_REALTIME);
    let start_cpu_us = now_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let args = match parse(std::env::args_os().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Jailer error: Arguments parsing error: {e}");
            std::process::exit(1);
        }
    };
    let e = run(&args, start_us, start_cpu_us);
    eprintln!("Jailer error: {e}");
    std::process::exit(1);
}

fn now_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn parse(raw: Vec<OsString>) -> Result<Args, String> {
    let mut it = raw.into_iter();
    let mut a = Args {
        id: String::new(),
        exec_file: PathBuf::new(),
        uid: u32::MAX,
        gid: u32::MAX,
        chroot_base: "/srv/jailer".into(),
        parent_cgroup: None,
        cgroup_v2: false,
        cgroups: Vec::new(),
        netns: None,
        limits: Vec::new(),
        daemonize: false,
        extra: Vec::new(),
    };
    let (mut id, mut exec, mut uid, mut gid) = (false, false, false, false);
    while let Some(arg) = it.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let mut value = || {
            it.next()
                .and_then(|v| v.into_string().ok())
                .ok_or_else(|| format!("Argument '{arg}' requires a value"))
        };
        match arg.as_str() {
            "--id" => {
                a.id = value()?;
                id = true;
            }
            "--exec-file" => {
                a.exec_file = value()?.into();
                exec = true;
            }
            "--uid" => {
                a.uid = number(&value()?, "uid")?;
                uid = true;
            }
            "--gid" => {
                a.gid = number(&value()?, "gid")?;
                gid = true;
            }
            "--chroot-base-dir" => a.chroot_base = value()?.into(),
            "--parent-cgroup" => a.parent_cgroup = Some(value()?),
            "--cgroup-version" => {
                a.cgroup_v2 = match value()?.as_str() {
                    "1" => false,
                    "2" => true,
                    v => return Err(format!("Invalid cgroup version: {v}")),
                }
            }
            "--cgroup" => {
                let v = value()?;
                match v.split_once('=') {
                    Some((file, val)) if file.contains('.') && !file.contains('/') => {
                        a.cgroups.push((file.to_owned(), val.to_owned()))
                    }
                    _ => return Err(format!("Invalid format for cgroup: {v}")),
                }
            }
            "--netns" => a.netns = Some(value()?.into()),
            "--resource-limit" => {
                let v = value()?;
                match v.split_once('=') {
                    Some((r @ ("fsize" | "no-file"), n)) => {
                        a.limits.push((r.to_owned(), number(n, "resource limit")?))
                    }
                    _ => return Err(format!("Invalid resource limit: {v}")),
                }
            }
            "--daemonize" => a.daemonize = true,
            "--new-pid-ns" => {
                return Err("--new-pid-ns is not implemented by this double".into());
            }
            "--" => {
                a.extra = it.by_ref().collect();
                break;
            }
            other => return Err(format!("Found argument '{other}' which wasn't expected")),
        }
    }
    for (given, name) in [
        (id, "--id"),
        (exec, "--exec-file"),
        (uid, "--uid"),
        (gid, "--gid"),
    ] {
        if !given {
            return Err(format!("Missing argument: {name}"));
        }
    }
    if a.id.is_empty()
        || a.id.len() > 64
        || !a.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!("Invalid instance ID: {}", a.id));
    }
    let name = a.exec_file.file_name().map(|n| n.to_string_lossy());
    if !a.exec_file.is_file() || !name.as_deref().is_some_and(|n| n.contains("firecracker")) {
        return Err(format!(
            "Invalid exec file {} (a file whose name contains firecracker)",
            a.exec_file.display()
        ));
    }
    Ok(a)
}

fn number<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("Invalid {what}: {v}"))
}

/// Does the jailer's work and execs; returns only on failure.
fn run(a: &Args, start_us: u64, start_cpu_us: u64) -> String {
    match jail(a) {
        Ok(exec_name) => {
            let err = std::process::Command::new(format!("/{exec_name}"))
                .arg(format!("--id={}", a.id))
                .arg(format!("--start-time-us={start_us}"))
                .arg(format!(
                    "--start-time-cpu-us={}",
                    now_us(libc::CLOCK_PROCESS_CPUTIME_ID) - start_cpu_us
                ))
                .args(&a.extra)
                .env_clear()
                .exec();
            format!("Failed to exec into Firecracker: {err}")
        }
        Err(e) => e,
    }
}

fn jail(a: &Args) -> Result<String, String> {
    close_inherited_fds();
    let exec_name = a
        .exec_file
        .file_name()
        .expect("checked while parsing")
        .to_string_lossy()
        .into_owned();
    let chroot_dir = a.chroot_base.join(&exec_name).join(&a.id).join("root");
    std::fs::create_dir_all(&chroot_dir)
        .map_err(|e| format!("Failed to create {}: {e}", chroot_dir.display()))?;
    std::fs::copy(&a.exec_file, chroot_dir.join(&exec_name)).map_err(|e| {
        format!(
            "Failed to copy {} into the jail: {e}",
            a.exec_file.display()
        )
    })?;
    set_limits(&a.limits)?;
    join_cgroups(a, &exec_name)?;
    if let Some(ns) = &a.netns {
        let f = std::fs::File::open(ns)
            .map_err(|e| format!("Failed to open the network namespace {}: {e}", ns.display()))?;
        setns(&f, CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("Failed to join the network namespace: {e}"))?;
    }
    pivot_into(&chroot_dir)?;
    std::fs::create_dir_all("/dev/net").map_err(|e| format!("Failed to create /dev/net: {e}"))?;
    let owner = (Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.gid)));
    for (path, minor) in [("/dev/net/tun", 200), ("/dev/kvm", 232)] {
        mknod(
            path,
            SFlag::S_IFCHR,
            Mode::S_IRUSR | Mode::S_IWUSR,
            makedev(10, minor),
        )
        .map_err(|e| format!("Failed to create {path} via mknod inside the jail: {e}"))?;
        chown(path, owner.0, owner.1)
            .map_err(|e| format!("Failed to change owner of {path}: {e}"))?;
    }
    chown("/", owner.0, owner.1).map_err(|e| format!("Failed to change owner of the jail: {e}"))?;
    if a.daemonize {
        nix::unistd::setsid().map_err(|e| format!("Failed to daemonize: setsid: {e}"))?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .or_else(|_| {
                // The jail has no /dev/null; make one like the devices above.
                mknod(
                    "/dev/null",
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o666),
                    makedev(1, 3),
                )?;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            })
            .map_err(|e| format!("Failed to open /dev/null: {e}"))?;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) } < 0 {
                return Err(format!(
                    "Failed to redirect descriptor {fd}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    setgroups(&[]).map_err(|e| format!("Failed to drop supplementary groups: {e}"))?;
    setgid(Gid::from_raw(a.gid)).map_err(|e| format!("Failed to change gid: {e}"))?;
    setuid(Uid::from_raw(a.uid)).map_err(|e| format!("Failed to change uid: {e}"))?;
    Ok(exec_name)
}

/// Closes what the parent left open, as the jailer does from `/proc/self/fd`.
fn close_inherited_fds() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    for fd in fds {
        // SAFETY: closing descriptors nothing in this process uses (the
        // directory's own is already closed; closing it again is EBADF).
        unsafe { libc::close(fd) };
    }
}

fn set_limits(limits: &[(String, u64)]) -> Result<(), String> {
    let mut all: Vec<(String, u64)> = limits.to_vec();
    if !all.iter().any(|(r, _)| r == "no-file") {
        all.push(("no-file".into(), 2048));
    }
    for (resource, value) in &all {
        let r = match resource.as_str() {
            "fsize" => libc::RLIMIT_FSIZE,
            _ => libc::RLIMIT_NOFILE,
        };
        let lim = libc::rlimit {
            rlim_cur: *value,
            rlim_max: *value,
        };
        // SAFETY: setrlimit reads one rlimit.
        if unsafe { libc::setrlimit(r, &lim) } < 0 {
            return Err(format!(
                "Failed to set the resource limit {resource}={value}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Where each cgroup hierarchy a controller needs is mounted.
fn cgroup_base(v2: bool, controller: &str) -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| format!("Failed to read /proc/mounts: {e}"))?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[1], f[2], f[3]))
        })
        .find(|(_, fstype, opts)| {
            if v2 {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && opts.split(',').any(|o| o == controller)
            }
        })
        .map(|(point, _, _)| PathBuf::from(point))
        .ok_or_else(|| {
            format!(
                "Cgroup error: cannot find the mount point of {}",
                if v2 { "cgroup2" } else { controller }
            )
        })
}

fn join_cgroups(a: &Args, exec_name: &str) -> Result<(), String> {
    let parent = a.parent_cgroup.clone().unwrap_or_else(|| exec_name.into());
    let pid = std::process::id().to_string();
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value)
            .map_err(|e| format!("Cgroup error: writing {value} to {}: {e}", path.display()))
    };
    let mut joined: Vec<PathBuf> = Vec::new();
    for (file, value) in &a.cgroups {
        let controller = file.split('.').next().expect("checked while parsing");
        let base = cgroup_base(a.cgroup_v2, controller)?;
        let dir = base.join(&parent).join(&a.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("Cgroup error: creating {}: {e}", dir.display()))?;
        if a.cgroup_v2 {
            // The controller must be handed down from the root to the VM's cgroup.
            let mut d = base.clone();
            for part in Path::new(&parent).components() {
                write(&d.join("cgroup.subtree_control"), &format!("+{controller}"))?;
                d.push(part);
            }
            write(&d.join("cgroup.subtree_control"), &format!("+{controller}"))?;
        }
        write(&dir.join(file), value)?;
        if !joined.contains(&dir) {
            let tasks = if a.cgroup_v2 { "cgroup.procs" } else { "tasks" };
            write(&dir.join(tasks), &pid)?;
            joined.push(dir);
        }
    }
    Ok(())
}

/// Step 7: `pivot_root` into the jail, with the double's `/usr` (see above).
fn pivot_into(chroot_dir: &Path) -> Result<(), String> {
    let m = |what: &str, e: nix::Error| format!("Failed to {what}: {e}");
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| m("unshare the mount namespace", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| m("make / private", e))?;
    mount(
        Some(chroot_dir),
        chroot_dir,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| m("bind-mount the jail on itself", e))?;
    // The double's deviation: the dynamic linker and libraries, read-only.
    let usr = chroot_dir.join("usr");
    std::fs::create_dir_all(&usr)
        .map_err(|e| format!("Failed to create {}: {e}", usr.display()))?;
    mount(
        Some("/usr"),
        &usr,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| m("bind-mount /usr", e))?;
    mount(
        None::<&str>,
        &usr,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| m("make /usr read-only", e))?;
    for lib in ["lib", "lib64"] {
        let link = chroot_dir.join(lib);
        if !link.exists() {
            std::os::unix::fs::symlink(format!("usr/{lib}"), &link)
                .map_err(|e| format!("Failed to link {}: {e}", link.display()))?;
        }
    }
    let old_root = chroot_dir.join("old_root");
    std::fs::create_dir_all(&old_root).map_err(|e| format!("Failed to create old_root: {e}"))?;
    chdir(chroot_dir).map_err(|e| m("enter the jail", e))?;
    pivot_root(".", "old_root").map_err(|e| m("pivot_root", e))?;
    umount2("old_root", MntFlags::MNT_DETACH).map_err(|e| m("unmount the old root", e))?;
    std::fs::remove_dir("old_root").map_err(|e| format!("Failed to remove old_root: {e}"))?;
    chroot(".").map_err(|e| m("chroot", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn arguments_are_checked_like_the_jailer_checks_them() {
        let exe = std::env::current_exe().unwrap();
        // The test binary's name does not contain `firecracker`.
        let e = parse(args(&format!(
            "--id a --exec-file {} --uid 1 --gid 1",
            exe.display()
        )))
        .unwrap_err();
        assert!(e.contains("Invalid exec file"), "{e}");
        let e = parse(args("--id a_b --exec-file /x --uid 1 --gid 1")).unwrap_err();
        assert!(
            e.contains("Invalid exec file") || e.contains("Invalid instance ID"),
            "{e}"
        );
        let e = parse(args("--id ab --uid 1 --gid 1 --bogus 1")).unwrap_err();
        assert!(e.contains("'--bogus' which wasn't expected"), "{e}");
        let e = parse(args("--id ab --uid 1 --gid 1")).unwrap_err();
        assert!(e.contains("Missing argument: --exec-file"), "{e}");
        let e = parse(args("--cgroup memory --id ab")).unwrap_err();
        assert!(e.contains("Invalid format for cgroup"), "{e}");
        let e = parse(args("--new-pid-ns")).unwrap_err();
        assert!(e.contains("not implemented"), "{e}");
    }
}

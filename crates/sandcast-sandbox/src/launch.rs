//! Spawning bubblewrap: its arguments, and the few system calls made in the
//! forked child before it execs (join the netns and cgroup, stage the host
//! paths, drop to the unprivileged user).
//!
//! bwrap runs as the unprivileged user in a user namespace, so it can only
//! bind host paths that user may traverse. The server's session directory is
//! usually not such a path, so the child first enters a private mount
//! namespace, mounts a tiny tmpfs on the stage directory and bind-mounts each
//! needed host path there while still root. Then, still root, it hides the
//! host paths a session must not see (sandcast's configuration, data and
//! state): a read-only empty tmpfs over each directory, an empty file over
//! each file. bwrap binds the root from this namespace, so the session sees
//! the host's root with those paths emptied, whatever their permissions.
//! That namespace (and every mount in it) vanishes with the sandbox: nothing
//! is mounted on the host.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where things appear inside the sandbox.
pub mod inside {
    /// Directory holding the agent and its socket.
    pub const RUN_DIR: &str = "/run/sandcast";
    /// The agent binary.
    pub const AGENT: &str = "/run/sandcast/sandcast-agent";
    /// The agent channel socket.
    pub const SOCKET: &str = "/run/sandcast/agent.sock";
    /// The session user's home.
    pub const HOME: &str = "/home/sandcast";
    /// The hostname.
    pub const HOSTNAME: &str = "sandcast";
    /// The search path.
    pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

/// One host path to stage, by the name it gets in the stage directory.
#[derive(Debug, Clone)]
pub struct StagedPath {
    /// Path on the host.
    pub host: PathBuf,
    /// File name under the stage directory.
    pub name: &'static str,
    /// Whether it is a directory (else a file or socket).
    pub dir: bool,
}

/// A browser's policy directory (`/etc/chromium`) as a session sees it: a
/// tmpfs holding the root's own entries bound back, and the staged
/// `policies` directory in place of the root's.
#[derive(Debug, Clone)]
pub struct PolicyMount {
    /// The directory inside the session, e.g. `/etc/chromium`.
    pub dir: PathBuf,
    /// The same directory on the host (under the root).
    pub source: PathBuf,
    /// The names of its entries to keep (all but `policies`).
    pub keep: Vec<OsString>,
}

impl PolicyMount {
    /// The mount for `dir` (absolute, inside the session) when `root` has
    /// it; `None` when the root has no such directory.
    pub fn for_root(root: &Path, dir: &str) -> Option<PolicyMount> {
        let source = root.join(dir.trim_start_matches('/'));
        let rd = std::fs::read_dir(&source).ok()?;
        let mut keep: Vec<OsString> = rd
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "policies")
            .collect();
        keep.sort();
        Some(PolicyMount {
            dir: dir.into(),
            source,
            keep,
        })
    }
}

/// Where Chromium reads managed policies below its `/etc` directory.
pub const POLICY_SUBDIR: &str = "policies/managed";

/// Everything needed to build the bwrap command line.
#[derive(Debug, Clone)]
pub struct BwrapArgs {
    /// Root file system shown read-only at `/`.
    pub root: PathBuf,
    /// Stage directory (host path) where staged paths appear.
    pub stage: PathBuf,
    /// Size of /dev/shm in bytes.
    pub shm_bytes: u64,
    /// Size of each other writable tmpfs (home, /tmp, /var/tmp, /run) in bytes.
    pub writable_bytes: u64,
    /// Browser policy directories to provide.
    pub policies: Vec<PolicyMount>,
    /// Where /etc/resolv.conf must be bound (it may be a symlink in the root).
    pub resolv_target: PathBuf,
    /// The fd bwrap writes its info JSON to.
    pub info_fd: RawFd,
    /// Fds holding compiled seccomp programs, loaded before the agent runs.
    pub seccomp_fds: Vec<RawFd>,
    /// The home is a profile mounted at the stage's `home` (see
    /// [`PreExec::prepare`]), bound in place of a fresh tmpfs.
    pub profile_home: bool,
}

/// The stage entry a profile's file system is mounted on.
pub const HOME_STAGE: &str = "home";

/// The bwrap arguments (after the program name).
pub fn bwrap_args(a: &BwrapArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRefOs]| {
        for i in items {
            v.push(i.os());
        }
    };
    let stage = |n: &str| a.stage.join(n);
    let writable = a.writable_bytes.to_string();
    push(&[
        &"--die-with-parent",
        &"--new-session",
        &"--unshare-user",
        &"--unshare-pid",
        &"--unshare-ipc",
        &"--unshare-uts",
        &"--unshare-cgroup-try",
        &"--hostname",
        &inside::HOSTNAME,
        &"--ro-bind",
        &a.root,
        &"/",
        &"--dev",
        &"/dev",
        &"--perms",
        &"1777",
        &"--size",
        &a.shm_bytes.to_string(),
        &"--tmpfs",
        &"/dev/shm",
        &"--proc",
        &"/proc",
        &"--ro-bind",
        &"/sys",
        &"/sys",
        // The host's sysfs lists the host's network devices (other sessions'
        // veths among them); the session sees its own through netlink.
        &"--tmpfs",
        &"/sys/class/net",
        &"--tmpfs",
        &"/sys/devices/virtual/net",
        // The host's cgroup tree names every session.
        &"--tmpfs",
        &"/sys/fs/cgroup",
    ]);
    // Everything writable is a size-limited tmpfs: its pages are charged to
    // the session's memory cgroup, and a full one is ENOSPC inside, never
    // the host's disk.
    for (dir, perms) in [
        ("/run", "0755"),
        ("/var/tmp", "1777"),
        ("/tmp", "1777"),
        ("/home", "0755"),
    ] {
        push(&[&"--perms", &perms, &"--size", &writable, &"--tmpfs", &dir]);
    }
    if a.profile_home {
        // The profile's own size is its quota.
        push(&[&"--bind", &stage(HOME_STAGE), &inside::HOME]);
    } else {
        push(&[
            &"--perms",
            &"0700",
            &"--size",
            &writable,
            &"--tmpfs",
            &inside::HOME,
        ]);
    }
    for p in &a.policies {
        push(&[&"--size", &"1048576", &"--tmpfs", &p.dir]);
        for name in &p.keep {
            push(&[&"--ro-bind-try", &p.source.join(name), &p.dir.join(name)]);
        }
        push(&[
            &"--ro-bind",
            &stage("policies"),
            &p.dir.join("policies"),
            &"--remount-ro",
            &p.dir,
        ]);
    }
    push(&[
        &"--perms",
        &"0755",
        &"--dir",
        &inside::RUN_DIR,
        &"--ro-bind",
        &stage("agent"),
        &inside::AGENT,
        &"--bind",
        &stage("agent.sock"),
        &inside::SOCKET,
        &"--ro-bind",
        &stage("resolv.conf"),
        &a.resolv_target,
        &"--ro-bind",
        &stage("hosts"),
        &"/etc/hosts",
        &"--clearenv",
        &"--setenv",
        &"HOME",
        &inside::HOME,
        &"--setenv",
        &"TMPDIR",
        &"/tmp",
        &"--setenv",
        &"PATH",
        &inside::PATH,
        &"--setenv",
        &"LANG",
        &"C.UTF-8",
        &"--setenv",
        &"USER",
        &"sandcast",
        &"--chdir",
        &inside::HOME,
        &"--info-fd",
        &a.info_fd.to_string(),
    ]);
    for fd in &a.seccomp_fds {
        push(&[&"--add-seccomp-fd", &fd.to_string()]);
    }
    push(&[
        &"--",
        &inside::AGENT,
        &"--connect",
        &format!("unix:{}", inside::SOCKET),
    ]);
    v
}

/// Anything that can be an argument.
trait AsRefOs {
    fn os(&self) -> OsString;
}
impl AsRefOs for &str {
    fn os(&self) -> OsString {
        (*self).into()
    }
}
impl AsRefOs for String {
    fn os(&self) -> OsString {
        self.into()
    }
}
impl AsRefOs for PathBuf {
    fn os(&self) -> OsString {
        self.as_os_str().to_owned()
    }
}

/// The staged paths and their fixed names (as used by [`bwrap_args`]).
pub fn staged(
    agent: &Path,
    socket: &Path,
    resolv: &Path,
    hosts: &Path,
    policies: &Path,
) -> Vec<StagedPath> {
    let s = |host: &Path, name, dir| StagedPath {
        host: host.to_path_buf(),
        name,
        dir,
    };
    vec![
        s(agent, "agent", false),
        s(socket, "agent.sock", false),
        s(resolv, "resolv.conf", false),
        s(hosts, "hosts", false),
        s(policies, "policies", true),
    ]
}

/// Where /etc/resolv.conf must be bound inside `root`: the file itself, or
/// the absolute target of the symlink it is (as with systemd-resolved).
pub fn resolv_target(root: &Path) -> PathBuf {
    let etc = Path::new("/etc/resolv.conf");
    let host = root.join("etc/resolv.conf");
    let target = match std::fs::read_link(&host) {
        Ok(t) => Path::new("/etc").join(t),
        Err(_) => return etc.to_path_buf(),
    };
    // Lexical clean-up: bwrap wants a plain absolute destination.
    let mut out = PathBuf::from("/");
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// Checks that an image root has what a session needs: a shell, the mount
/// points bwrap binds over (it cannot create them in a read-only root) and
/// the files it replaces. The error lists everything missing.
pub fn check_image_root(root: &Path) -> Result<(), String> {
    let present = |p: &str| std::fs::symlink_metadata(root.join(p)).is_ok();
    let missing: Vec<&str> = [
        "bin/sh",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "home",
        "var/tmp",
        "etc/hosts",
        "etc/resolv.conf",
    ]
    .into_iter()
    .filter(|p| !present(p))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "image_root {} lacks {} (an image needs a shell, these mount points and files; empty ones will do)",
            root.display(),
            missing.join(", ")
        ))
    }
}

/// Steps of the pre-exec sequence, reported by number when one fails.
const STEPS: [&str; 11] = [
    "joining the network namespace",
    "joining the cgroup",
    "creating a private mount namespace",
    "making mounts private",
    "mounting the stage tmpfs",
    "creating a stage entry",
    "bind-mounting a host path into the stage",
    "dropping to the unprivileged user",
    "passing fds to bwrap",
    "hiding a host path",
    "mounting the profile as the home",
];

/// Name of a pre-exec step reported by the child.
pub fn step_name(step: u8) -> &'static str {
    STEPS
        .get(usize::from(step))
        .copied()
        .unwrap_or("unknown step")
}

/// The prepared pre-exec work: only plain data and fds, so the closure makes
/// no allocation after fork.
pub struct PreExec {
    netns: OwnedFd,
    cgroup_procs: Vec<OwnedFd>,
    stage: CString,
    entries: Vec<(CString, CString, bool)>,
    empty: CString,
    hide: Vec<(CString, bool)>,
    uid: u32,
    gid: u32,
    pass_fds: Vec<RawFd>,
    step_fd: RawFd,
    /// A profile's loop device and where in the stage to mount it.
    home: Option<(CString, CString)>,
}

/// A host path hidden inside the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    /// The path.
    pub path: PathBuf,
    /// Whether it is a directory (covered by a tmpfs) or a file (by an
    /// empty file).
    pub dir: bool,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NUL in path {}", p.display()),
        )
    })
}

impl PreExec {
    /// Opens the netns and cgroup files (in the parent, before fork);
    /// `(uid, gid)` is the user bwrap runs as; `pass_fds` stay open across
    /// exec for bwrap.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        netns_path: &Path,
        cgroup_procs: &[PathBuf],
        stage: &Path,
        staged: &[StagedPath],
        hide: &[Hidden],
        (uid, gid): (u32, u32),
        pass_fds: Vec<RawFd>,
        step_fd: RawFd,
        home: Option<&std::ffi::CStr>,
    ) -> io::Result<PreExec> {
        let open = |p: &Path, write: bool| -> io::Result<OwnedFd> {
            let f = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(p)
                .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", p.display())))?;
            Ok(f.into())
        };
        Ok(PreExec {
            netns: open(netns_path, false)?,
            cgroup_procs: cgroup_procs
                .iter()
                .map(|p| open(p, true))
                .collect::<io::Result<_>>()?,
            stage: cstr(stage)?,
            entries: staged
                .iter()
                .map(|s| Ok((cstr(&s.host)?, cstr(&stage.join(s.name))?, s.dir)))
                .collect::<io::Result<_>>()?,
            empty: cstr(&stage.join(".empty"))?,
            hide: hide
                .iter()
                .map(|h| Ok((cstr(&h.path)?, h.dir)))
                .collect::<io::Result<_>>()?,
            uid,
            gid,
            pass_fds,
            step_fd,
            home: home
                .map(|dev| Ok::<_, io::Error>((dev.to_owned(), cstr(&stage.join(HOME_STAGE))?)))
                .transpose()?,
        })
    }

    /// Runs in the forked child. Only async-signal-safe system calls.
    ///
    /// # Safety
    /// Must only be called between fork and exec.
    pub unsafe fn run(&self) -> io::Result<()> {
        let fail = |step: u8| -> io::Result<()> {
            let err = io::Error::last_os_error();
            // SAFETY: write(2) of a one-byte buffer on an fd we own.
            unsafe { libc::write(self.step_fd, [step].as_ptr().cast(), 1) };
            Err(err)
        };
        // SAFETY (whole block): plain system calls on fds and NUL-terminated
        // strings prepared before fork and alive for the closure's lifetime.
        unsafe {
            if libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return fail(0);
            }
            // "0" moves the writing process; its children inherit the cgroup.
            for fd in &self.cgroup_procs {
                if libc::write(fd.as_raw_fd(), c"0".as_ptr().cast(), 1) != 1 {
                    return fail(1);
                }
            }
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return fail(2);
            }
            let none = std::ptr::null::<libc::c_char>();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return fail(3);
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.stage.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=64k".as_ptr().cast(),
            ) != 0
            {
                return fail(4);
            }
            for (src, dst, dir) in &self.entries {
                if *dir {
                    if libc::mkdir(dst.as_ptr(), 0o755) != 0 {
                        return fail(5);
                    }
                } else {
                    let fd = libc::open(
                        dst.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    if fd < 0 {
                        return fail(5);
                    }
                    libc::close(fd);
                }
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return fail(6);
                }
            }
            // The profile, in this namespace only; a failure fails the
            // session rather than leave it a fresh home unnoticed.
            if let Some((dev, target)) = &self.home {
                if libc::mkdir(target.as_ptr(), 0o700) != 0 {
                    return fail(10);
                }
                if libc::mount(
                    dev.as_ptr(),
                    target.as_ptr(),
                    c"ext4".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                ) != 0
                {
                    return fail(10);
                }
            }
            // After staging (whose sources may lie under a hidden path).
            if !self.hide.is_empty() {
                let fd = libc::open(
                    self.empty.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o444,
                );
                if fd < 0 {
                    return fail(5);
                }
                libc::close(fd);
            }
            for (path, dir) in &self.hide {
                let r = if *dir {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"mode=0755,size=4k".as_ptr().cast(),
                    )
                } else {
                    libc::mount(
                        self.empty.as_ptr(),
                        path.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                if r != 0 {
                    return fail(9);
                }
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(self.gid, self.gid, self.gid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
            {
                return fail(7);
            }
            for fd in &self.pass_fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return fail(8);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Vec<String> {
        args_with(false)
    }

    fn args_with(profile_home: bool) -> Vec<String> {
        bwrap_args(&BwrapArgs {
            root: "/".into(),
            stage: "/run/stage".into(),
            shm_bytes: 512 << 20,
            writable_bytes: 256 << 20,
            policies: vec![PolicyMount {
                dir: "/etc/chromium".into(),
                source: "/img/etc/chromium".into(),
                keep: vec!["master_preferences".into()],
            }],
            resolv_target: "/etc/resolv.conf".into(),
            info_fd: 7,
            seccomp_fds: vec![8, 9],
            profile_home,
        })
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    fn has_seq(v: &[String], seq: &[&str]) -> bool {
        v.windows(seq.len()).any(|w| w == seq)
    }

    #[test]
    fn bwrap_gets_namespaces_but_shares_the_prepared_netns() {
        let a = args();
        for flag in [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--die-with-parent",
        ] {
            assert!(a.iter().any(|x| x == flag), "{flag}");
        }
        // The netns is joined before exec; bwrap must not make another.
        assert!(
            !a.iter()
                .any(|x| x == "--unshare-net" || x == "--unshare-all")
        );
    }

    #[test]
    fn bwrap_mounts_are_read_only_root_and_private_writables() {
        let a = args();
        assert!(has_seq(&a, &["--ro-bind", "/", "/"]));
        assert!(has_seq(
            &a,
            &[
                "--perms",
                "1777",
                "--size",
                "536870912",
                "--tmpfs",
                "/dev/shm"
            ]
        ));
        // Writable places are size-limited tmpfs, never host directories.
        for (dir, perms) in [
            ("/home/sandcast", "0700"),
            ("/tmp", "1777"),
            ("/var/tmp", "1777"),
            ("/run", "0755"),
        ] {
            assert!(
                has_seq(
                    &a,
                    &["--perms", perms, "--size", "268435456", "--tmpfs", dir]
                ),
                "{dir}"
            );
        }
        // The only writable host path is the agent socket.
        let binds: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "--bind" || w[0] == "--bind-try")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(binds, ["/run/stage/agent.sock"]);
        // A profile's home is the one other: its own file system, mounted
        // on the stage in the session's namespace.
        let p = args_with(true);
        assert!(has_seq(
            &p,
            &["--bind", "/run/stage/home", "/home/sandcast"]
        ));
        assert!(!has_seq(&p, &["--tmpfs", "/home/sandcast"]));
        assert!(has_seq(
            &a,
            &[
                "--ro-bind",
                "/run/stage/agent",
                "/run/sandcast/sandcast-agent"
            ]
        ));
        assert!(has_seq(
            &a,
            &[
                "--bind",
                "/run/stage/agent.sock",
                "/run/sandcast/agent.sock"
            ]
        ));
        assert!(has_seq(&a, &["--info-fd", "7"]));
        assert!(has_seq(
            &a,
            &["--add-seccomp-fd", "8", "--add-seccomp-fd", "9", "--"]
        ));
    }

    #[test]
    fn browser_policies_replace_only_the_policies_directory() {
        let a = args();
        assert!(has_seq(
            &a,
            &["--size", "1048576", "--tmpfs", "/etc/chromium"]
        ));
        assert!(has_seq(
            &a,
            &[
                "--ro-bind-try",
                "/img/etc/chromium/master_preferences",
                "/etc/chromium/master_preferences"
            ]
        ));
        assert!(has_seq(
            &a,
            &[
                "--ro-bind",
                "/run/stage/policies",
                "/etc/chromium/policies",
                "--remount-ro",
                "/etc/chromium"
            ]
        ));
        let t = tempfile::tempdir().unwrap();
        assert!(PolicyMount::for_root(t.path(), "/etc/chromium").is_none());
        std::fs::create_dir_all(t.path().join("etc/chromium/policies")).unwrap();
        std::fs::write(t.path().join("etc/chromium/default"), "").unwrap();
        let m = PolicyMount::for_root(t.path(), "/etc/chromium").unwrap();
        assert_eq!(m.keep, vec![OsString::from("default")]);
        assert_eq!(m.source, t.path().join("etc/chromium"));
    }

    #[test]
    fn command_is_the_agent_with_the_socket() {
        let a = args();
        let dashdash = a.iter().position(|x| x == "--").unwrap();
        assert_eq!(
            &a[dashdash + 1..],
            [
                "/run/sandcast/sandcast-agent",
                "--connect",
                "unix:/run/sandcast/agent.sock"
            ]
        );
        assert!(has_seq(&a, &["--setenv", "HOME", "/home/sandcast"]));
        assert!(has_seq(&a, &["--setenv", "TMPDIR", "/tmp"]));
        assert!(a.iter().any(|x| x == "--clearenv"));
    }

    #[test]
    fn resolv_target_follows_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        assert_eq!(resolv_target(t.path()), Path::new("/etc/resolv.conf"));
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            t.path().join("etc/resolv.conf"),
        )
        .unwrap();
        assert_eq!(
            resolv_target(t.path()),
            Path::new("/run/systemd/resolve/stub-resolv.conf")
        );
        std::fs::remove_file(t.path().join("etc/resolv.conf")).unwrap();
        std::os::unix::fs::symlink("/run/x.conf", t.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(resolv_target(t.path()), Path::new("/run/x.conf"));
    }

    #[test]
    fn image_roots_are_checked_for_what_bwrap_needs() {
        assert_eq!(check_image_root(Path::new("/")), Ok(()));
        let t = tempfile::tempdir().unwrap();
        for d in [
            "bin", "dev", "proc", "sys", "tmp", "run", "home", "var/tmp", "etc",
        ] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::os::unix::fs::symlink("dash", t.path().join("bin/sh")).unwrap();
        std::fs::write(t.path().join("etc/hosts"), "").unwrap();
        let e = check_image_root(t.path()).unwrap_err();
        assert!(e.ends_with("lacks etc/resolv.conf (an image needs a shell, these mount points and files; empty ones will do)") && e.contains(t.path().to_str().unwrap()), "{e}");
        // A dangling symlink (to /run/...) is fine: the target is bound.
        std::os::unix::fs::symlink("../run/resolv.conf", t.path().join("etc/resolv.conf")).unwrap();
        assert_eq!(check_image_root(t.path()), Ok(()));
        std::fs::remove_dir(t.path().join("sys")).unwrap();
        assert!(
            check_image_root(t.path())
                .unwrap_err()
                .contains("lacks sys (")
        );
    }

    #[test]
    fn step_names_cover_every_step() {
        assert_eq!(step_name(0), "joining the network namespace");
        assert_eq!(step_name(8), "passing fds to bwrap");
        assert_eq!(step_name(9), "hiding a host path");
        assert_eq!(step_name(200), "unknown step");
    }
}

//! Running Firecracker under its `jailer` (Firecracker's docs/jailer.md, v1.16.1).
//!
//! The jailer builds `<chroot_base>/<exec_file_name>/<id>/root`, copies the
//! Firecracker binary into it, puts itself into the cgroups named by
//! `--cgroup`, joins `--netns`, pivots into the jail, drops to `--uid`/`--gid`
//! and execs Firecracker there (the same pid, without `--daemonize` and
//! `--new-pid-ns`). Firecracker then sees only the jail: every path sandcast
//! gives it (kernel, drives, sockets, logs, snapshot files) is relative to the
//! jail root, and the files must be inside it, owned by or readable to the
//! jail's uid. [`Jail`] is that layout for one session: where its root is,
//! how a host file gets in, the jailer's command line, and removal.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sandcast_backend::{BackendError, SessionId};

use sandcast_host::cgroup::CgroupPlan;

/// How sessions run under the jailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary, of the same release as `firecracker`: a path, or a
    /// name looked up on `PATH`. Default `jailer`.
    pub jailer_bin: PathBuf,
    /// Where the jails are built (the jailer's `--chroot-base-dir`). Default
    /// `/srv/jailer`, the jailer's own default.
    pub chroot_base_dir: PathBuf,
}

impl Default for JailerConfig {
    fn default() -> Self {
        JailerConfig {
            jailer_bin: "jailer".into(),
            chroot_base_dir: "/srv/jailer".into(),
        }
    }
}

/// The longest id the jailer takes.
const MAX_JAIL_ID: usize = 64;
/// The longest path a Unix socket can be bound at (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// One session's jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The jailer's `--id`: `fc-<session id>`, like the session's cgroup.
    pub id: String,
    /// `<chroot_base>/<exec_file_name>/<id>`, removed whole at the end.
    pub dir: PathBuf,
    /// `<dir>/root`, the jail's `/`.
    pub root: PathBuf,
    chroot_base_dir: PathBuf,
    /// The session's own uid (and gid of the same number), claimed by the
    /// host layer with the session's record; set by [`Jail::set_owner`].
    owner: Option<u32>,
}

impl Jail {
    /// The jail of session `id` for the Firecracker binary `firecracker`.
    pub fn new(
        config: &JailerConfig,
        firecracker: &Path,
        id: &SessionId,
    ) -> Result<Jail, BackendError> {
        let jail_id = format!("fc-{id}");
        if jail_id.len() > MAX_JAIL_ID {
            return Err(BackendError::InvalidSpec(format!(
                "session id {id} is too long for the jailer (its --id {jail_id} has {} characters, at most {MAX_JAIL_ID})",
                jail_id.len()
            )));
        }
        let exec_name = firecracker.file_name().ok_or_else(|| {
            BackendError::InvalidSpec(format!(
                "firecracker binary {} has no file name",
                firecracker.display()
            ))
        })?;
        let dir = config.chroot_base_dir.join(exec_name).join(&jail_id);
        let root = dir.join("root");
        Ok(Jail {
            id: jail_id,
            dir,
            root,
            chroot_base_dir: config.chroot_base_dir.clone(),
            owner: None,
        })
    }

    /// Makes `uid` (and the gid of the same number) the jail's: Firecracker
    /// runs as it, and the files it uses are given to it. Each session has
    /// a uid of its own, so no two Firecrackers share one.
    pub fn set_owner(&mut self, uid: u32) -> Result<(), BackendError> {
        if uid == 0 {
            return Err(BackendError::InvalidSpec(
                "the jail's uid is 0: the jail is only worth having with an unprivileged uid"
                    .into(),
            ));
        }
        self.owner = Some(uid);
        Ok(())
    }

    /// The jail's uid; set before anything is given to it.
    fn owner(&self) -> Result<u32, BackendError> {
        self.owner.ok_or_else(|| {
            BackendError::Start(format!("jail {} has no uid yet (set_owner first)", self.id))
        })
    }

    /// The host path of a file the jailed Firecracker calls `/<name>`.
    pub fn host_path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// What the jailed Firecracker calls the file [`host_path`](Self::host_path)`(name)`.
    pub fn jail_name(&self, name: &str) -> String {
        format!("/{name}")
    }

    /// Makes the jail's root directory (the jailer leaves an existing one as
    /// it is) and checks that its sockets' paths fit.
    pub fn create(&self, longest_name: &str) -> Result<(), BackendError> {
        let longest = self.host_path(longest_name);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(BackendError::InvalidSpec(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH} bytes; choose a shorter firecracker.jailer.chroot_base_dir",
                longest.display()
            )));
        }
        std::fs::create_dir_all(&self.root)
            .map_err(|e| BackendError::io(format!("creating {}", self.root.display()), e))
    }

    /// Puts the host file `from` into the jail as `/<name>` and returns that
    /// name: a hard link when both are on one file system, else a copy. The
    /// jail's uid must be able to read it.
    pub async fn bring_in(&self, from: &Path, name: &str) -> Result<String, BackendError> {
        let meta = std::fs::metadata(from)
            .map_err(|e| BackendError::io(format!("reading {}", from.display()), e))?;
        let id = self.owner()?;
        let readable = meta.mode() & 0o004 != 0
            || (meta.uid() == id && meta.mode() & 0o400 != 0)
            || (meta.gid() == id && meta.mode() & 0o040 != 0);
        if !readable {
            return Err(BackendError::NotReady(format!(
                "{} (mode {:o}, owner {}:{}) is not readable by the jail's uid and gid {id}; sessions' uids come from host.uid_range, so make it readable by others (o+r)",
                from.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
            )));
        }
        let to = self.host_path(name);
        let _ = std::fs::remove_file(&to);
        if std::fs::hard_link(from, &to).is_err() {
            crate::backend::copy_sparse(from, &to).await?;
        }
        Ok(self.jail_name(name))
    }

    /// Brings `from` into the jail as `name` by a hard link only (a file
    /// the VM writes for later); another file system is an error naming it.
    pub fn link_in(&self, from: &Path, name: &str) -> Result<String, BackendError> {
        let to = self.host_path(name);
        let _ = std::fs::remove_file(&to);
        std::fs::hard_link(from, &to).map_err(|e| {
            BackendError::io(
                format!(
                    "linking {} into the jail (a profile must be on the jail's file system: put the data directory and chroot_base_dir on one)",
                    from.display()
                ),
                e,
            )
        })?;
        Ok(self.jail_name(name))
    }

    /// Gives a file or socket in the jail (or the agent's socket) to the
    /// jail's uid and gid, so the unprivileged Firecracker can use it.
    pub fn give(&self, path: &Path) -> Result<(), BackendError> {
        let id = self.owner()?;
        std::os::unix::fs::chown(path, Some(id), Some(id))
            .map_err(|e| BackendError::io(format!("giving {} to the jail", path.display()), e))
    }

    /// The jailer's arguments: Firecracker `firecracker` in this jail, in the
    /// cgroup `plan` (created by the jailer under the plan's parent), in the
    /// network namespace `netns`, then Firecracker's own `extra` arguments.
    pub fn jailer_args(
        &self,
        firecracker: &Path,
        plan: &CgroupPlan,
        netns: Option<&Path>,
        extra: &[&str],
    ) -> Result<Vec<OsString>, BackendError> {
        let id = self.owner()?;
        let mut a: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--exec-file".into(),
            firecracker.into(),
            "--uid".into(),
            id.to_string().into(),
            "--gid".into(),
            id.to_string().into(),
            "--chroot-base-dir".into(),
            self.chroot_base_dir.clone().into(),
            "--cgroup-version".into(),
            if plan.v2 { "2" } else { "1" }.into(),
            "--parent-cgroup".into(),
            plan.parent.clone().into(),
        ];
        for (file, value) in &plan.values {
            a.push("--cgroup".into());
            a.push(format!("{file}={value}").into());
        }
        if let Some(ns) = netns {
            a.push("--netns".into());
            a.push(ns.into());
        }
        a.push("--".into());
        a.extend(extra.iter().map(OsString::from));
        Ok(a)
    }

    /// Removes the jail with everything in it (hard links only: the host
    /// files they point at stay).
    pub fn remove(&self) -> Result<(), BackendError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::Cleanup(format!(
                "removing jail {}: {e}",
                self.dir.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandcast_host::cgroup::CgroupPlan;

    fn jail(base: &str) -> (JailerConfig, Jail) {
        let config = JailerConfig {
            jailer_bin: "/usr/bin/jailer".into(),
            chroot_base_dir: base.into(),
        };
        let id = SessionId::new("ab12").unwrap();
        let mut j = Jail::new(&config, Path::new("/usr/bin/firecracker"), &id).unwrap();
        j.set_owner(2_000_123).unwrap();
        (config, j)
    }

    #[test]
    fn layout_follows_the_jailer() {
        let (_, j) = jail("/srv/jailer");
        assert_eq!(j.id, "fc-ab12");
        assert_eq!(j.root, Path::new("/srv/jailer/firecracker/fc-ab12/root"));
        assert_eq!(
            j.host_path("vmlinux"),
            Path::new("/srv/jailer/firecracker/fc-ab12/root/vmlinux")
        );
        assert_eq!(j.jail_name("vmlinux"), "/vmlinux");
    }

    #[test]
    fn jailer_arguments_name_cgroup_netns_and_firecracker_arguments() {
        let (_, j) = jail("/srv/jailer");
        let plan = CgroupPlan {
            v2: true,
            parent: "fc-sessions".into(),
            name: "fc-ab12".into(),
            values: vec![
                ("memory.max".into(), "1073741824".into()),
                ("cpu.max".into(), "200000 100000".into()),
            ],
            dirs: Vec::new(),
        };
        let args = j
            .jailer_args(
                Path::new("/usr/bin/firecracker"),
                &plan,
                Some(Path::new("/run/netns/fc-ab12")),
                &["--api-sock", "/firecracker.sock"],
            )
            .unwrap();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--id fc-ab12 --exec-file /usr/bin/firecracker --uid 2000123 --gid 2000123 \
             --chroot-base-dir /srv/jailer --cgroup-version 2 --parent-cgroup fc-sessions \
             --cgroup memory.max=1073741824 --cgroup cpu.max=200000 100000 \
             --netns /run/netns/fc-ab12 -- --api-sock /firecracker.sock"
        );
    }

    #[test]
    fn ids_too_long_for_the_jailer_a_root_uid_and_long_socket_paths_are_refused() {
        let config = JailerConfig::default();
        let long = SessionId::new("a".repeat(62)).unwrap();
        let e = Jail::new(&config, Path::new("firecracker"), &long).unwrap_err();
        assert!(e.to_string().contains("too long for the jailer"), "{e}");
        let id = SessionId::new("x").unwrap();
        let mut j = Jail::new(&config, Path::new("firecracker"), &id).unwrap();
        // Nothing is given to a jail before its uid is set, and never uid 0.
        let e = j.give(Path::new("/nonexistent")).unwrap_err();
        assert!(e.to_string().contains("no uid yet"), "{e}");
        let e = j.set_owner(0).unwrap_err();
        assert!(e.to_string().contains("uid is 0"), "{e}");
        let (_, j) = jail(&format!("/tmp/{}", "d".repeat(80)));
        let e = j.create("vsock.sock_1024").unwrap_err();
        assert!(e.to_string().contains("longer than 107 bytes"), "{e}");
    }

    #[tokio::test]
    async fn files_come_in_as_links_and_leave_with_the_jail() {
        let base = std::env::temp_dir().join(format!("sc-jail-{}", std::process::id()));
        let (_, j) = jail(base.to_str().unwrap());
        j.create("x").unwrap();
        let src = base.join("kernel");
        std::fs::write(&src, b"kernel").unwrap();
        assert_eq!(j.bring_in(&src, "vmlinux").await.unwrap(), "/vmlinux");
        let linked = std::fs::metadata(j.host_path("vmlinux")).unwrap();
        assert_eq!(linked.ino(), std::fs::metadata(&src).unwrap().ino());
        // A file the jail's uid cannot read is refused with the reason.
        let secret = base.join("secret");
        std::fs::write(&secret, b"s").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let e = j.bring_in(&secret, "secret").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("not readable by the jail's uid and gid 2000123"),
            "{e}"
        );
        j.remove().unwrap();
        assert!(!j.dir.exists());
        assert_eq!(std::fs::read(&src).unwrap(), b"kernel");
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! Resolving a [`HomePath`] beneath the home without ever leaving it.
//!
//! Every lookup goes through `openat2(2)` relative to a descriptor of the
//! home with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel follows a
//! symbolic link that stays inside and fails with `EXDEV` one that leads out
//! (absolute, or climbing above the home), however the session rearranges
//! its files meanwhile. Below a resolved directory, work is done on single
//! names relative to its descriptor, never on a path string that the session
//! could redirect between a check and its use.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sandcast_proto::files::HomePath;

/// How every path in the home is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// `openat2` gives `EAGAIN` when a rename raced a `..` lookup; a session can
/// keep doing that, so the retries are bounded.
const EAGAIN_RETRIES: usize = 16;

/// The session's home, held open: the anchor of every lookup.
pub(super) struct Home {
    fd: OwnedFd,
}

impl Home {
    /// Opens the home itself (the agent's own configuration names it, so
    /// this one path is trusted).
    pub(super) fn open(path: &Path) -> Result<Home, Errno> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Home { fd })
    }

    /// Opens `path` (following links that stay inside) with `flags`.
    pub(super) fn open_path(&self, path: &HomePath, flags: OFlags) -> Result<OwnedFd, Errno> {
        self.open_str(path.as_str(), flags)
    }

    fn open_str(&self, rel: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        let rel = if rel.is_empty() { "." } else { rel };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Err(Errno::AGAIN) if tries < EAGAIN_RETRIES => tries += 1,
                r => return r,
            }
        }
    }

    /// Opens the directory at `rel` (components joined by `/`) as `O_PATH`.
    fn dir(&self, rel: &str) -> Result<OwnedFd, Errno> {
        self.open_str(rel, OFlags::PATH | OFlags::DIRECTORY)
    }

    /// The directory holding `path` (an `O_PATH` descriptor) and the last
    /// component's name, which is not resolved: the caller decides whether
    /// to follow it. With `create`, missing directories are made (mode
    /// 0755 less the umask), each in the directory resolved before it.
    /// `path` must not be the home itself.
    pub(super) fn parent(&self, path: &HomePath, create: bool) -> Result<(OwnedFd, String), Errno> {
        let comps: Vec<&str> = path.components().collect();
        let Some((name, dirs)) = comps.split_last() else {
            return Err(Errno::INVAL);
        };
        let name = (*name).to_string();
        match self.dir(&dirs.join("/")) {
            Err(Errno::NOENT) if create => {}
            r => return r.map(|fd| (fd, name)),
        }
        let mut fd = self.dir("")?;
        for i in 0..dirs.len() {
            let prefix = dirs[..=i].join("/");
            fd = match self.dir(&prefix) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&fd, dirs[i], Mode::from_raw_mode(0o755)) {
                        // Made meanwhile by the session: as good.
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    // Resolved again from the home, so a link planted in
                    // place of the new directory is judged like any other.
                    self.dir(&prefix)?
                }
                r => r?,
            };
        }
        Ok((fd, name))
    }

    /// Where a file reached through links actually is, as a path in the
    /// home: read from `/proc/self/fd` of its descriptor. The answer only
    /// chooses what to resolve next, beneath the home as always, so a
    /// session renaming things meanwhile can misdirect it only within the
    /// home.
    pub(super) fn locate(&self, fd: impl AsFd) -> Result<HomePath, Errno> {
        let home = proc_path(self.fd.as_fd())?;
        let there = proc_path(fd.as_fd())?;
        let rel = there.strip_prefix(&home).map_err(|_| Errno::XDEV)?;
        let rel = rel.to_str().ok_or(Errno::INVAL)?;
        HomePath::parse(rel).map_err(|_| Errno::XDEV)
    }
}

fn proc_path(fd: rustix::fd::BorrowedFd<'_>) -> Result<PathBuf, Errno> {
    let link = format!("/proc/self/fd/{}", rustix::fd::AsRawFd::as_raw_fd(&fd));
    let target = rustix::fs::readlink(link, Vec::new())?;
    Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> HomePath {
        HomePath::parse(s).unwrap()
    }

    #[test]
    fn links_inside_resolve_and_links_out_do_not() {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("home");
        std::fs::create_dir_all(home.join("real")).unwrap();
        std::fs::create_dir(base.path().join("outside")).unwrap();
        std::os::unix::fs::symlink("real", home.join("in")).unwrap();
        std::os::unix::fs::symlink("../outside", home.join("up")).unwrap();
        std::os::unix::fs::symlink("/", home.join("root")).unwrap();
        let h = Home::open(&home).unwrap();

        assert!(h.open_path(&hp("in"), OFlags::PATH).is_ok());
        assert_eq!(
            h.open_path(&hp("up"), OFlags::PATH).unwrap_err(),
            Errno::XDEV
        );
        assert_eq!(
            h.open_path(&hp("root/etc"), OFlags::PATH).unwrap_err(),
            Errno::XDEV
        );
        assert_eq!(
            h.parent(&hp("up/x"), true).unwrap_err(),
            Errno::XDEV,
            "no directory is made outside"
        );
        assert!(!base.path().join("outside/x").exists());

        let (_, name) = h.parent(&hp("in/new/deeper/f"), true).unwrap();
        assert_eq!(name, "f");
        assert!(home.join("real/new/deeper").is_dir());

        let fd = h.open_path(&hp("in/new"), OFlags::PATH).unwrap();
        assert_eq!(h.locate(&fd).unwrap(), hp("real/new"));
    }
}

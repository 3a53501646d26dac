//! Session cgroups on cgroup v1 (one hierarchy per controller) and v2 (unified).
//!
//! The layout is detected at runtime from the files under the cgroup root, so
//! the same code runs on hosts with v1 controllers (optionally with an empty
//! cgroup2 mounted at `unified`, whose `cgroup.kill` is then used to stop a
//! session in one write) and on pure v2 hosts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandcast_backend::{BackendError, Limits};

/// CFS period used for CPU quotas, in microseconds (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Controllers a session needs in v1 mode, as directory names under the root.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// How cgroups are mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy at `root`.
    V2 {
        /// Mount point of the cgroup2 file system.
        root: PathBuf,
    },
    /// One hierarchy per controller at `root/<controller>`.
    V1 {
        /// The directory holding the per-controller mounts.
        root: PathBuf,
        /// A cgroup2 mount beside them (hybrid hosts), used for `cgroup.kill`
        /// and to track membership; `None` when absent.
        unified: Option<PathBuf>,
    },
}

impl Layout {
    /// Detects the layout under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Result<Layout, BackendError> {
        if root.join("cgroup.controllers").is_file() {
            let have = fs::read_to_string(root.join("cgroup.controllers")).map_err(|e| {
                BackendError::io(format!("reading {}/cgroup.controllers", root.display()), e)
            })?;
            let missing: Vec<&str> = ["memory", "cpu", "pids"]
                .into_iter()
                .filter(|c| !have.split_whitespace().any(|h| h == *c))
                .collect();
            if !missing.is_empty() {
                return Err(BackendError::NotReady(format!(
                    "cgroup v2 at {} lacks the controller(s) {}: enable them in the kernel/boot configuration",
                    root.display(),
                    missing.join(", ")
                )));
            }
            return Ok(Layout::V2 {
                root: root.to_path_buf(),
            });
        }
        let missing: Vec<&str> = V1_CONTROLLERS
            .into_iter()
            .filter(|c| !root.join(c).join("cgroup.procs").is_file())
            .collect();
        if !missing.is_empty() {
            return Err(BackendError::NotReady(format!(
                "no cgroup v2 at {root} (no {root}/cgroup.controllers) and the cgroup v1 controller(s) {m} are not mounted under {root}",
                root = root.display(),
                m = missing.join(", ")
            )));
        }
        let unified = root.join("unified");
        let unified = unified
            .join("cgroup.controllers")
            .is_file()
            .then_some(unified);
        Ok(Layout::V1 {
            root: root.to_path_buf(),
            unified,
        })
    }

    /// Short description for readiness output.
    pub fn describe(&self) -> String {
        match self {
            Layout::V2 { root } => format!("cgroup v2 at {}", root.display()),
            Layout::V1 { root, unified } => format!(
                "cgroup v1 (memory, cpu, pids) under {}{}",
                root.display(),
                match unified {
                    Some(u) => format!(", cgroup2 at {} for cgroup.kill", u.display()),
                    None => String::new(),
                }
            ),
        }
    }

    /// Parent directories under which session cgroups are made, one per
    /// hierarchy; `parent` is relative to each hierarchy's root.
    pub fn parent_dirs(&self, parent: &str) -> Vec<PathBuf> {
        match self {
            Layout::V2 { root } => vec![root.join(parent)],
            Layout::V1 { root, unified } => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(parent))
                .chain(unified.iter().map(|u| u.join(parent)))
                .collect(),
        }
    }

    /// The cgroup of session `name` under `parent` (not created).
    pub fn session(&self, parent: &str, name: &str) -> SessionCgroup {
        SessionCgroup {
            layout: self.clone(),
            dirs: self
                .parent_dirs(parent)
                .into_iter()
                .map(|p| p.join(name))
                .collect(),
        }
    }

    /// The session cgroup with these directories (from a record).
    pub fn from_dirs(&self, dirs: Vec<PathBuf>) -> SessionCgroup {
        SessionCgroup {
            layout: self.clone(),
            dirs,
        }
    }

    /// Limits the memory of everything under `parent` together (the
    /// parent's `memory.max`, or `memory.limit_in_bytes` on v1), creating
    /// the parent when missing. Written at each session start, so a changed
    /// configuration takes effect with the next session.
    pub fn limit_parent_memory(&self, parent: &str, mib: u64) -> Result<(), BackendError> {
        if let Layout::V2 { root } = self {
            enable_v2_controllers(root, parent)?;
        }
        let (dir, file) = match self {
            Layout::V2 { root } => (root.join(parent), "memory.max"),
            Layout::V1 { root, .. } => (root.join("memory").join(parent), "memory.limit_in_bytes"),
        };
        fs::create_dir_all(&dir)
            .map_err(|e| BackendError::io(format!("creating cgroup {}", dir.display()), e))?;
        let path = dir.join(file);
        let value = (mib << 20).to_string();
        write_file(&path, &value)
            .map_err(|e| BackendError::io(format!("writing {value} to {}", path.display()), e))
    }

    /// Names of the session cgroups that exist under `parent` in any hierarchy.
    pub fn list_sessions(&self, parent: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .parent_dirs(parent)
            .iter()
            .filter_map(|d| fs::read_dir(d).ok())
            .flat_map(|rd| rd.filter_map(Result::ok))
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// A session's cgroup as a plan: where it goes and what is written into it,
/// carried out by [`SessionCgroup::create`] or by Firecracker's jailer from
/// its `--cgroup` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// cgroup v2 (one unified hierarchy) rather than v1.
    pub v2: bool,
    /// The parent, relative to each hierarchy's root.
    pub parent: String,
    /// The session's cgroup, under `parent`.
    pub name: String,
    /// Limit files and their values, in write order (only files every
    /// host has: a jailer cannot skip a missing one).
    pub values: Vec<(String, String)>,
    /// The session's cgroup directories (one on v2, one per hierarchy on v1).
    pub dirs: Vec<PathBuf>,
}

impl CgroupPlan {
    /// The directory that holds the limit file `file` (on v1, that of its
    /// controller, the part of its name before the first dot).
    pub fn dir_for(&self, file: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| {
                // <root>/<controller>/<parent...>/<name>
                let depth = Path::new(&self.parent).components().count();
                self.v2
                    || d.ancestors()
                        .nth(depth + 1)
                        .and_then(Path::file_name)
                        .is_some_and(|c| file.split('.').next() == c.to_str())
            })
            .map(PathBuf::as_path)
    }
}

impl Layout {
    /// The plan of cgroup `name` under `parent` with `limits`.
    pub fn plan(&self, parent: &str, name: &str, limits: &Limits) -> CgroupPlan {
        let values = limit_writes(self, limits)
            .into_iter()
            .filter(|(_, f, _)| !matches!(*f, "memory.swap.max" | "memory.memsw.limit_in_bytes"))
            .map(|(_, f, v)| (f.to_string(), v))
            .collect();
        CgroupPlan {
            v2: matches!(self, Layout::V2 { .. }),
            parent: parent.to_string(),
            name: name.to_string(),
            values,
            dirs: self.session(parent, name).dirs,
        }
    }

    /// Makes `parent` in every hierarchy and, on v2, lets it hand the
    /// memory, cpu and pids controllers down, so that a session cgroup made
    /// under it (here or by a jailer) has its limit files.
    pub fn prepare_parent(&self, parent: &str) -> Result<(), BackendError> {
        match self {
            Layout::V2 { root } => enable_v2_controllers(root, parent),
            Layout::V1 { .. } => {
                for d in self.parent_dirs(parent) {
                    fs::create_dir_all(&d).map_err(|e| {
                        BackendError::io(format!("creating cgroup {}", d.display()), e)
                    })?;
                }
                Ok(())
            }
        }
    }
}

/// One session's cgroup: a directory in each hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
}

/// The files and values that express `limits` on `layout`, in write order.
pub fn limit_writes(layout: &Layout, limits: &Limits) -> Vec<(&'static str, &'static str, String)> {
    let bytes = limits.memory_mib * 1024 * 1024;
    let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
    match layout {
        // (hierarchy, file, value); hierarchy "" means the single v2 one.
        Layout::V2 { .. } => vec![
            ("", "memory.max", bytes.to_string()),
            ("", "memory.swap.max", "0".into()),
            ("", "cpu.max", format!("{quota} {CPU_PERIOD_US}")),
            ("", "pids.max", limits.pids.to_string()),
        ],
        Layout::V1 { .. } => vec![
            ("memory", "memory.limit_in_bytes", bytes.to_string()),
            // Absent without swap accounting; must be >= the memory limit.
            ("memory", "memory.memsw.limit_in_bytes", bytes.to_string()),
            ("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            ("cpu", "cpu.cfs_quota_us", quota.to_string()),
            ("pids", "pids.max", limits.pids.to_string()),
        ],
    }
}

/// Checks limits for values the kernel would refuse or that cannot run a browser.
pub fn validate_limits(limits: &Limits) -> Result<(), BackendError> {
    if limits.memory_mib < 64 || limits.memory_mib > 1 << 30 {
        return Err(BackendError::InvalidSpec(format!(
            "memory_mib {} is out of range (64..=1073741824)",
            limits.memory_mib
        )));
    }
    // The kernel's smallest CFS quota is 1 ms per 100 ms period.
    if limits.cpu_millis < 10 || limits.cpu_millis > 1_024_000 {
        return Err(BackendError::InvalidSpec(format!(
            "cpu_millis {} is out of range (10..=1024000)",
            limits.cpu_millis
        )));
    }
    if limits.pids < 8 || limits.pids > 4_194_304 {
        return Err(BackendError::InvalidSpec(format!(
            "pids {} is out of range (8..=4194304)",
            limits.pids
        )));
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

impl SessionCgroup {
    /// The directories of this cgroup, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The `cgroup.procs` files a process must write to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn dir_for(&self, hierarchy: &str) -> &Path {
        match &self.layout {
            Layout::V2 { .. } => &self.dirs[0],
            Layout::V1 { .. } => {
                let i = V1_CONTROLLERS
                    .iter()
                    .position(|c| *c == hierarchy)
                    .unwrap_or(0);
                &self.dirs[i]
            }
        }
    }

    /// Creates the directories (and, on v2, enables the controllers on the
    /// way down) and writes the limits.
    pub fn create(&self, parent: &str, limits: &Limits) -> Result<(), BackendError> {
        self.layout.prepare_parent(parent)?;
        for d in &self.dirs {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(BackendError::Start(format!(
                        "cgroup {} already exists (a session with this id is running or was not reaped)",
                        d.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(d).map_err(|e| {
                        BackendError::io(format!("creating cgroup {}", d.display()), e)
                    })?;
                }
                Err(e) => {
                    return Err(BackendError::io(
                        format!("creating cgroup {}", d.display()),
                        e,
                    ));
                }
            }
        }
        for (hierarchy, file, value) in limit_writes(&self.layout, limits) {
            let path = self.dir_for(hierarchy).join(file);
            if !path.exists() && matches!(file, "memory.swap.max" | "memory.memsw.limit_in_bytes") {
                continue; // no swap accounting on this host: nothing to limit
            }
            write_file(&path, &value).map_err(|e| {
                BackendError::io(format!("writing {value} to {}", path.display()), e)
            })?;
        }
        Ok(())
    }

    /// Host pids of every process in the cgroup (all hierarchies).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Whether any directory of the cgroup still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }

    /// Sends `sig` to every process in the cgroup except those in `except`.
    pub fn signal_all(&self, sig: i32, except: &[i32]) {
        for pid in self.pids() {
            if !except.contains(&pid) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }

    /// Kills every process and waits until the cgroup is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), BackendError> {
        // cgroup.kill (v2, kernel >= 5.14) kills atomically, forks included.
        for d in &self.dirs {
            let kill = d.join("cgroup.kill");
            if kill.exists() {
                let _ = write_file(&kill, "1");
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in &pids {
                // SAFETY: as above.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                return Err(BackendError::Cleanup(format!(
                    "processes {pids:?} still in cgroup {} after SIGKILL",
                    self.dirs[0].display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills everything and removes the directories. Idempotent.
    pub fn destroy(&self, timeout: Duration) -> Result<(), BackendError> {
        if !self.exists() {
            return Ok(());
        }
        self.kill_all(timeout)?;
        let deadline = Instant::now() + timeout;
        for d in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // Exiting tasks leave the cgroup a moment after they die.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(BackendError::io(
                            format!("removing cgroup {}", d.display()),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Makes memory, cpu and pids available to children of every cgroup from the
/// root down to `root/parent` (v2 only hands controllers down explicitly).
fn enable_v2_controllers(root: &Path, parent: &str) -> Result<(), BackendError> {
    let mut dir = root.to_path_buf();
    let mut chain = vec![dir.clone()];
    for part in Path::new(parent).components() {
        dir = dir.join(part);
        chain.push(dir.clone());
    }
    for d in &chain {
        if !d.exists() {
            fs::create_dir(d)
                .map_err(|e| BackendError::io(format!("creating cgroup {}", d.display()), e))?;
        }
        let control = d.join("cgroup.subtree_control");
        let have = fs::read_to_string(&control).unwrap_or_default();
        for c in ["memory", "cpu", "pids"] {
            if !have.split_whitespace().any(|h| h == c) {
                write_file(&control, &format!("+{c}")).map_err(|e| {
                    // EBUSY: processes sit in this cgroup itself, and v2 only
                    // hands controllers to children of cgroups without any.
                    let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                        " (processes live directly in this cgroup; run the server in a leaf cgroup, e.g. systemd Delegate=yes)"
                    } else {
                        ""
                    };
                    BackendError::io(
                        format!("enabling the {c} controller in {}{hint}", control.display()),
                        e,
                    )
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, "").unwrap();
    }

    fn fake_v1(root: &Path, unified: bool) {
        for c in ["memory", "cpu", "pids", "freezer"] {
            touch(&root.join(c).join("cgroup.procs"));
        }
        if unified {
            touch(&root.join("unified/cgroup.controllers"));
        }
    }

    #[test]
    fn detects_v2_by_root_controllers_file() {
        let t = tempfile::tempdir().unwrap();
        fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(
            Layout::detect(t.path()).unwrap(),
            Layout::V2 {
                root: t.path().into()
            }
        );
    }

    #[test]
    fn v2_without_memory_controller_names_it() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        let err = Layout::detect(t.path()).unwrap_err().to_string();
        assert!(err.contains("memory"), "{err}");
        assert!(!err.contains("cpu,"), "{err}");
    }

    #[test]
    fn detects_v1_with_and_without_unified() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), false);
        assert_eq!(
            Layout::detect(t.path()).unwrap(),
            Layout::V1 {
                root: t.path().into(),
                unified: None
            }
        );
        touch(&t.path().join("unified/cgroup.controllers"));
        assert_eq!(
            Layout::detect(t.path()).unwrap(),
            Layout::V1 {
                root: t.path().into(),
                unified: Some(t.path().join("unified"))
            }
        );
    }

    #[test]
    fn missing_v1_controller_is_named() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("memory/cgroup.procs"));
        touch(&t.path().join("cpu/cgroup.procs"));
        let err = Layout::detect(t.path()).unwrap_err().to_string();
        assert!(err.contains("pids") && !err.contains("memory,"), "{err}");
    }

    #[test]
    fn v1_limit_files_are_written() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        let layout = Layout::detect(t.path()).unwrap();
        let cg = layout.session("sandcast", "s1");
        let limits = Limits {
            memory_mib: 512,
            cpu_millis: 1500,
            pids: 300,
        };
        cg.create("sandcast", &limits).unwrap();
        let r = |p: &str| fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(r("memory/sandcast/s1/memory.limit_in_bytes"), "536870912");
        assert_eq!(r("cpu/sandcast/s1/cpu.cfs_period_us"), "100000");
        assert_eq!(r("cpu/sandcast/s1/cpu.cfs_quota_us"), "150000");
        assert_eq!(r("pids/sandcast/s1/pids.max"), "300");
        // No swap accounting in the fake: the memsw file is not invented.
        assert!(
            !t.path()
                .join("memory/sandcast/s1/memory.memsw.limit_in_bytes")
                .exists()
        );
        assert!(t.path().join("unified/sandcast/s1").is_dir());
        assert_eq!(cg.procs_files().len(), 4);
        assert_eq!(layout.list_sessions("sandcast"), vec!["s1".to_string()]);
        // A second session with the same name is refused.
        let err = cg.create("sandcast", &limits).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn v2_enables_controllers_and_writes_limits() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let layout = Layout::detect(t.path()).unwrap();
        let cg = layout.session("sc/parent", "s2");
        cg.create(
            "sc/parent",
            &Limits {
                memory_mib: 256,
                cpu_millis: 250,
                pids: 64,
            },
        )
        .unwrap();
        // Plain files in the fake: each write replaces, so the last one stays.
        for d in ["", "sc", "sc/parent"] {
            let ctl = fs::read_to_string(t.path().join(d).join("cgroup.subtree_control")).unwrap();
            assert_eq!(ctl, "+pids", "{d}");
        }
        let r = |p: &str| fs::read_to_string(t.path().join("sc/parent/s2").join(p)).unwrap();
        assert_eq!(r("memory.max"), "268435456");
        assert_eq!(r("cpu.max"), "25000 100000");
        assert_eq!(r("pids.max"), "64");
        assert!(!t.path().join("sc/parent/s2/memory.swap.max").exists());
    }

    #[test]
    fn plans_name_dirs_and_values_for_a_jailer() {
        let t = tempfile::tempdir().unwrap();
        fake_v1(t.path(), true);
        let layout = Layout::detect(t.path()).unwrap();
        let limits = Limits {
            memory_mib: 512,
            cpu_millis: 1500,
            pids: 300,
        };
        let plan = layout.plan("sandcast/0a1b", "fc-s1", &limits);
        assert!(!plan.v2);
        assert_eq!(
            plan.values,
            [
                ("memory.limit_in_bytes", "536870912"),
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "150000"),
                ("pids.max", "300")
            ]
            .map(|(f, v)| (f.to_string(), v.to_string()))
        );
        assert_eq!(
            plan.dir_for("cpu.cfs_quota_us").unwrap(),
            t.path().join("cpu/sandcast/0a1b/fc-s1")
        );
        assert_eq!(
            plan.dir_for("memory.limit_in_bytes").unwrap(),
            t.path().join("memory/sandcast/0a1b/fc-s1")
        );
        layout.prepare_parent("sandcast/0a1b").unwrap();
        assert!(t.path().join("pids/sandcast/0a1b").is_dir());
        let t2 = tempfile::tempdir().unwrap();
        fs::write(t2.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let v2 = Layout::detect(t2.path()).unwrap().plan("p", "n", &limits);
        assert!(v2.v2);
        assert_eq!(v2.dirs, vec![t2.path().join("p/n")]);
        assert_eq!(v2.dir_for("pids.max").unwrap(), t2.path().join("p/n"));
        assert!(v2.values.iter().all(|(f, _)| f != "memory.swap.max"));
    }

    #[test]
    fn limits_are_validated_with_the_bad_value() {
        let ok = Limits::default();
        assert!(validate_limits(&ok).is_ok());
        let e = validate_limits(&Limits {
            memory_mib: 1,
            ..ok
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory_mib 1"), "{e}");
        let e = validate_limits(&Limits {
            cpu_millis: 5,
            ..ok
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cpu_millis 5"), "{e}");
        let e = validate_limits(&Limits { pids: 0, ..ok })
            .unwrap_err()
            .to_string();
        assert!(e.contains("pids 0"), "{e}");
    }
}

//! The sandbox backend: one session in Linux namespaces and a cgroup, with its own network namespace.
//!
//! Each session runs `sandcast-agent` under bubblewrap as a host uid of its
//! own (from `[host] uid_range`, see [`sandcast_host::uid`]) in new user, mount, PID, IPC and UTS
//! namespaces, inside a network namespace of its own (`<prefix>-<id>`) that
//! is joined before bwrap starts, under a seccomp filter (see [`seccomp`])
//! that every process of the session inherits. The root file system (the
//! host's `/` or an image directory) is read-only, with sandcast's own files
//! hidden; home, `/tmp`, `/var/tmp`, `/run` and `/dev/shm` are private,
//! size-limited tmpfs counted in the session's memory. The browser gets
//! managed policies (see [`policy`]). Memory, CPU and process limits live in
//! a cgroup (`<cgroup_parent>/<instance>/<id>`, v1 or v2, detected at
//! runtime); the instance's parent memory limit bounds all its sessions
//! together.
//!
//! The network namespace, veth, address, egress policy, cgroup, records and
//! reap are `sandcast-host`'s, shared with the Firecracker backend; this
//! crate adds bubblewrap and the session's files.
//!
//! Everything made for a session is recorded under `state_dir/sessions`, so
//! [`Instance::stop`] and, after a crash, [`Backend::reap`] remove processes,
//! cgroups, veths, namespaces, firewall elements and files exactly.
//!
//! # Using it
//!
//! ```no_run
//! # async fn demo(spec: sandcast_backend::LaunchSpec) -> Result<(), sandcast_backend::BackendError> {
//! use sandcast_backend::Backend;
//! use sandcast_sandbox::{SandboxBackend, SandboxConfig};
//! let backend = SandboxBackend::new(SandboxConfig {
//!     state_dir: "/var/lib/sandcast/sandbox".into(),
//!     // The server's data directory, so sessions cannot read its database.
//!     hide_paths: vec!["/var/lib/sandcast".into()],
//!     ..SandboxConfig::default()
//! })?;
//! backend.reap(&[]).await?; // leftovers of a previous run
//! let _ready = backend.readiness().await; // one check per requirement
//! // The server binds a UnixListener at backend.agent_socket(&spec.id, &spec.session_dir) first.
//! let inst = backend.start(&spec).await?;
//! let mut exited = inst.exited(); // Some(InstanceExit) once the agent/bwrap ended
//! inst.stop(std::time::Duration::from_secs(3)).await?; // also after an unexpected exit
//! # Ok(()) }
//! ```
//!
//! - Each session runs as its own uid and gid (the same number) from
//!   `[host] uid_range`, never named in `/etc/passwd` or `/etc/group` and never
//!   shared by two live sessions; nothing is added to the host's account
//!   files. The agent socket and the session directory are chowned to that
//!   uid with mode 0700, so no other session (and no other unprivileged
//!   user) can connect; [`Backend::agent_peer_uid`] tells the server which
//!   uid to expect on the socket.
//! - `start` must run inside a tokio runtime, which also reaps the sandbox.
//!   bwrap is forked from a thread that lives as long as the process, so a
//!   session ends (`--die-with-parent`) when the server process ends, not
//!   when some runtime thread does.
//! - When the agent or bwrap ends by itself, every process of the session is
//!   killed at once; its network, cgroup and files stay until
//!   [`Instance::stop`] (or [`Backend::reap`]).
//! - Only `session_dir/sandbox` (generated `resolv.conf`, `hosts` and
//!   browser policies) belongs to the backend; the server removes the
//!   session directory. Nothing a session writes lands on the host's disk.

pub mod home;
pub mod launch;
pub mod seccomp;

use std::collections::{HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sandcast_backend::{
    Backend, BackendError, Check, Instance, InstanceExit, LaunchSpec, Readiness, SessionId,
};
use sandcast_host::cgroup::SessionCgroup;
use sandcast_host::state::Record;
use sandcast_host::{Host, HostConfig, KILL_TIMEOUT};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

pub use sandcast_proto::BrowserPolicy;
use sandcast_proto::policy;

/// How many lines of bwrap/agent output are kept to explain an exit.
const TAIL_LINES: usize = 20;

/// Configuration of the sandbox backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Where the backend records what it made for each session.
    pub state_dir: PathBuf,
    /// Root file system shown read-only in sessions; `None` is the host's `/`.
    pub image_root: Option<PathBuf>,
    /// Size of each session's /dev/shm in MiB (Chromium needs plenty).
    pub shm_mib: u64,
    /// Size of each of a session's home, /tmp, /var/tmp and /run in MiB
    /// (tmpfs, counted in the session's memory limit).
    pub writable_mib: u64,
    /// Memory limit of all sessions together in MiB (the memory limit of
    /// `cgroup_parent`); 0 leaves the parent unlimited.
    pub sessions_memory_mib: u64,
    /// Host paths (directories or files) hidden inside sessions when the
    /// host root is used (for example the server's data directory and
    /// configuration file). The state directory, the parent of the session
    /// directory, `/etc/sandcast` and `/var/lib/sandcast` are always hidden.
    pub hide_paths: Vec<PathBuf>,
    /// URL filters for the session's browser; set from the server's
    /// `[browser]` section.
    #[serde(skip)]
    pub browser_policy: BrowserPolicy,
    /// Host directory (mode 0755) holding the stage mount point.
    pub stage_dir: PathBuf,
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// Host isolation (network, firewall, cgroups): the server's `[host]`
    /// settings with its instance id.
    #[serde(skip)]
    pub host: HostConfig,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            state_dir: "/var/lib/sandcast/sandbox".into(),
            image_root: None,
            shm_mib: 512,
            writable_mib: 1024,
            sessions_memory_mib: 0,
            hide_paths: Vec::new(),
            browser_policy: BrowserPolicy::default(),
            stage_dir: "/run/sandcast-sandbox".into(),
            bwrap: "/usr/bin/bwrap".into(),
            host: HostConfig::default(),
        }
    }
}

/// The sandbox backend.
#[derive(Clone)]
pub struct SandboxBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SandboxConfig,
    host: Host,
    /// The compiled seccomp programs.
    seccomp: Vec<Vec<u8>>,
}

impl SandboxBackend {
    /// Validates the configuration and prepares the backend's directories.
    /// Host problems (missing tools, cgroups) do not fail here; they show in
    /// [`Backend::readiness`] and in the error of [`Backend::start`].
    pub fn new(cfg: SandboxConfig) -> Result<SandboxBackend, BackendError> {
        let bad = |m: String| Err(BackendError::InvalidSpec(m));
        cfg.browser_policy
            .check()
            .map_err(BackendError::InvalidSpec)?;
        if cfg.shm_mib < 16 {
            return bad(format!("shm_mib {} is below 16", cfg.shm_mib));
        }
        if cfg.writable_mib < 16 {
            return bad(format!("writable_mib {} is below 16", cfg.writable_mib));
        }
        if cfg.sessions_memory_mib != 0 && cfg.sessions_memory_mib < 64 {
            return bad(format!(
                "sessions_memory_mib {} is below 64 (0 means no limit)",
                cfg.sessions_memory_mib
            ));
        }
        for (name, dir) in [("state_dir", &cfg.state_dir), ("stage_dir", &cfg.stage_dir)] {
            if !dir.is_absolute() {
                return bad(format!("{name} {} must be absolute", dir.display()));
            }
        }
        if let Some(root) = &cfg.image_root {
            launch::check_image_root(root).map_err(BackendError::InvalidSpec)?;
        }
        let mkdir = |d: &Path, mode: u32| -> Result<(), BackendError> {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| BackendError::io(format!("creating {}", d.display()), e))
        };
        let host = Host::new(&cfg.host, &cfg.state_dir, "")?;
        // bwrap runs as the session user and must traverse the stage.
        mkdir(&cfg.stage_dir, 0o755)?;
        mkdir(&cfg.stage_dir.join("stage"), 0o755)?;
        let seccomp = seccomp::programs().map_err(BackendError::InvalidSpec)?;
        Ok(SandboxBackend {
            inner: Arc::new(Inner { cfg, host, seccomp }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.cfg
    }

    /// The host isolation layer (names, policy, instance).
    pub fn host(&self) -> &Host {
        &self.inner.host
    }

    /// [`Backend::start`], returning the concrete instance (with its
    /// addresses and names) rather than a trait object.
    pub async fn start_sandbox(&self, spec: &LaunchSpec) -> Result<SandboxInstance, BackendError> {
        self.inner.start(spec).await
    }
}

impl Inner {
    fn check_bwrap(&self) -> Result<(), BackendError> {
        sandcast_host::check_tool(&self.cfg.bwrap, "bubblewrap")
    }

    /// Removes everything a record lists. Returns one line per thing removed.
    async fn teardown(&self, rec: &Record) -> Result<Vec<String>, BackendError> {
        let (mut done, mut errors) = self.host.teardown(rec).await;
        if rec.files_dir.exists() {
            // remove_dir_all does not follow symlinks the session may have made.
            match std::fs::remove_dir_all(&rec.files_dir) {
                Ok(()) => done.push(format!("removed {}", rec.files_dir.display())),
                Err(e) => errors.push(format!("removing {}: {e}", rec.files_dir.display())),
            }
        }
        if errors.is_empty() {
            self.host.forget(&rec.id)?;
            Ok(done)
        } else {
            Err(BackendError::Cleanup(format!(
                "session {}: {}",
                rec.id,
                errors.join("; ")
            )))
        }
    }

    /// Host paths hidden inside a session with this session directory.
    fn hidden(&self, session_dir: &Path) -> Vec<launch::Hidden> {
        if self.cfg.image_root.is_some() {
            return Vec::new(); // host paths are not in an image root anyway
        }
        let mut v: Vec<PathBuf> = vec![
            self.cfg.state_dir.clone(),
            "/etc/sandcast".into(),
            "/var/lib/sandcast".into(),
        ];
        if let Some(p) = session_dir.parent()
            && p != Path::new("/")
        {
            v.push(p.to_path_buf());
        }
        v.extend(self.cfg.hide_paths.iter().cloned());
        v.sort();
        v.dedup();
        hidden_paths(&v, &self.cfg.stage_dir)
    }

    fn write_files(&self, spec: &LaunchSpec, files: &Path, uid: u32) -> Result<(), BackendError> {
        let cfg = &self.cfg;
        let io_err = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e| BackendError::io(what, e)
        };
        std::fs::create_dir_all(&spec.session_dir)
            .map_err(io_err("creating", &spec.session_dir))?;
        // No record means no live session: anything here is a stale leftover.
        if files.exists() {
            std::fs::remove_dir_all(files).map_err(io_err("removing stale", files))?;
        }
        std::fs::create_dir(files).map_err(io_err("creating", files))?;
        std::fs::set_permissions(files, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", files))?;
        let managed = files.join(launch::POLICY_SUBDIR);
        std::fs::create_dir_all(&managed).map_err(io_err("creating", &managed))?;
        for d in [files.join("policies"), managed.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err("chmod", &d))?;
        }
        let policy = managed.join(policy::FILE_NAME);
        std::fs::write(&policy, cfg.browser_policy.managed_json())
            .map_err(io_err("writing", &policy))?;
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &policy))?;
        let resolv = self.host.resolv_conf();
        let hosts = format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            h = launch::inside::HOSTNAME
        );
        for (name, text) in [("resolv.conf", resolv), ("hosts", hosts)] {
            let p = files.join(name);
            std::fs::write(&p, text).map_err(io_err("writing", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err("chmod", &p))?;
        }
        // The session's uid connects to the server's socket, so it owns it;
        // mode 0700 on both keeps every other unprivileged uid out.
        for p in [&spec.session_dir, &spec.agent_socket] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid)).map_err(io_err("chown", p))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", p))?;
        }
        Ok(())
    }

    fn check_spec(&self, spec: &LaunchSpec) -> Result<(), BackendError> {
        sandcast_host::cgroup::validate_limits(&spec.limits)?;
        let meta = std::fs::metadata(&spec.agent_binary).map_err(|e| {
            BackendError::InvalidSpec(format!("agent binary {}: {e}", spec.agent_binary.display()))
        })?;
        let mode = meta.permissions().mode();
        // Session uids own nothing and are in no group: "others" applies.
        if !meta.is_file() || mode & 0o005 != 0o005 {
            return Err(BackendError::InvalidSpec(format!(
                "agent binary {} must be a file readable and executable by every user (o+rx): sessions run as uids of host.uid_range (mode is {:o})",
                spec.agent_binary.display(),
                mode & 0o7777
            )));
        }
        use std::os::unix::fs::FileTypeExt;
        let is_socket = std::fs::metadata(&spec.agent_socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(BackendError::InvalidSpec(format!(
                "agent socket {} is not a listening Unix socket: the server must bind it before start",
                spec.agent_socket.display()
            )));
        }
        if !spec.session_dir.is_absolute() {
            return Err(BackendError::InvalidSpec(format!(
                "session_dir {} must be absolute",
                spec.session_dir.display()
            )));
        }
        Ok(())
    }

    async fn start(self: &Arc<Self>, spec: &LaunchSpec) -> Result<SandboxInstance, BackendError> {
        self.check_spec(spec)?;
        self.check_bwrap()?;
        self.host.check_tools()?;
        let id = spec.id.as_str();
        // The host layer claims the session's uid with its record.
        let rec = self
            .host
            .create(
                id,
                &spec.network.egress,
                spec.session_dir.join("sandbox"),
                serde_json::Value::Null,
            )
            .await?;
        let cg = self.host.cgroup(id)?;
        let result = self.launch(spec, rec.clone(), cg).await;
        match result {
            Ok(inst) => Ok(inst),
            Err(e) => {
                if let Err(cleanup) = self.teardown(&rec).await {
                    tracing::error!(session = id, "cleanup after failed start: {cleanup}");
                }
                Err(e)
            }
        }
    }

    async fn launch(
        self: &Arc<Self>,
        spec: &LaunchSpec,
        mut rec: Record,
        cg: SessionCgroup,
    ) -> Result<SandboxInstance, BackendError> {
        let cfg = &self.cfg;
        let uid = rec.uid.expect("allocated before launch");
        self.write_files(spec, &rec.files_dir, uid)?;
        if cfg.sessions_memory_mib != 0 {
            self.host
                .limit_parent_memory(cfg.sessions_memory_mib)
                .await?;
        }
        self.host.create_cgroup(&rec.id, &spec.limits).await?;

        let root = cfg.image_root.clone().unwrap_or_else(|| "/".into());
        let stage = cfg.stage_dir.join("stage");
        let files = &rec.files_dir;
        let staged = launch::staged(
            &spec.agent_binary,
            &spec.agent_socket,
            &files.join("resolv.conf"),
            &files.join("hosts"),
            &files.join("policies"),
        );
        let (info_r, info_w) = pipe()?;
        let (step_r, step_w) = pipe()?;
        let seccomp_fds = self
            .seccomp
            .iter()
            .map(|p| program_fd(p))
            .collect::<Result<Vec<OwnedFd>, BackendError>>()?;
        let args = launch::bwrap_args(&launch::BwrapArgs {
            root: root.clone(),
            stage: stage.clone(),
            shm_bytes: cfg.shm_mib << 20,
            writable_bytes: cfg.writable_mib << 20,
            policies: policy::POLICY_DIRS
                .iter()
                .filter_map(|d| launch::PolicyMount::for_root(&root, d))
                .collect(),
            resolv_target: launch::resolv_target(&root),
            info_fd: info_w.as_raw_fd(),
            seccomp_fds: seccomp_fds.iter().map(AsRawFd::as_raw_fd).collect(),
            profile_home: spec.home.is_some(),
        });
        // A profile: its files become this session's uid's, then its loop
        // device is held until the child has mounted it.
        let home = match &spec.home {
            Some(image) => {
                home::give_to(image, uid)
                    .await
                    .map_err(BackendError::Start)?;
                Some(
                    home::LoopDevice::attach(image)
                        .map_err(|e| BackendError::Start(format!("the profile: {e}")))?,
                )
            }
            None => None,
        };
        let mut pass_fds = vec![info_w.as_raw_fd()];
        pass_fds.extend(seccomp_fds.iter().map(AsRawFd::as_raw_fd));
        let pre = launch::PreExec::prepare(
            &Path::new("/run/netns").join(&rec.netns),
            &cg.procs_files(),
            &stage,
            &staged,
            &self.hidden(&spec.session_dir),
            (uid, uid),
            pass_fds,
            step_w.as_raw_fd(),
            home.as_ref().map(|h| h.path.as_c_str()),
        )
        .map_err(|e| BackendError::Start(format!("preparing the sandbox: {e}")))?;
        let mut cmd = tokio::process::Command::new(&cfg.bwrap);
        cmd.args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: PreExec::run makes only async-signal-safe system calls on
        // data prepared before fork.
        unsafe {
            cmd.pre_exec(move || pre.run());
        }
        // The spawner thread drops cmd (closing our netns and cgroup fds).
        let spawned = spawn_from_lasting_thread(cmd).await;
        drop(info_w);
        drop(step_w);
        drop(seccomp_fds);
        // Mounted by now (or the spawn failed): the mount holds the device.
        drop(home);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let mut step = [0u8; 1];
                let mut f = std::fs::File::from(step_r);
                let what = match f.read(&mut step) {
                    Ok(1) => launch::step_name(step[0]),
                    _ => "starting bwrap",
                };
                return Err(BackendError::Start(format!(
                    "{what} for {} failed: {e}",
                    cfg.bwrap.display()
                )));
            }
        };
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut readers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(forward_lines(
                out,
                rec.id.clone(),
                tail.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(forward_lines(
                err,
                rec.id.clone(),
                tail.clone(),
            )));
        }
        // bwrap writes its info once the namespaces exist; EOF first means it
        // failed before that.
        let info = tokio::task::spawn_blocking(move || read_info(info_r));
        let info = tokio::time::timeout(Duration::from_secs(20), info).await;
        let init_pid = match info {
            Ok(Ok(Some(p))) => Some(p),
            _ => None,
        };
        // Then wait until the agent is exec'd (bwrap's mounts are done) or
        // bwrap gives up, so that setup errors are start errors.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut failed = init_pid.is_none();
        while let Some(init) = init_pid {
            if child.try_wait().ok().flatten().is_some() {
                for r in readers.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
                }
                // A quick agent may already be done; only bwrap's own words
                // mean the sandbox never came up.
                failed = tail
                    .lock()
                    .expect("tail")
                    .iter()
                    .any(|l| l.starts_with("bwrap:"));
                break;
            }
            if exec_done(&cg, init) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                failed = true;
                tail.lock()
                    .expect("tail")
                    .push_back("the agent was not started within 20 s".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if failed {
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
            }
            for r in readers {
                let _ = tokio::time::timeout(Duration::from_secs(1), r).await;
            }
            let lines: Vec<String> = tail.lock().expect("tail").iter().cloned().collect();
            return Err(BackendError::Start(format!(
                "bwrap did not set up the sandbox: {}",
                if lines.is_empty() {
                    "no output".to_string()
                } else {
                    lines.join(" | ")
                }
            )));
        }
        let init_pid = init_pid.unwrap_or(0);
        rec.pid = Some(pid);
        self.host.save(&rec)?;
        tracing::info!(session = %rec.id, pid, init_pid, veth = %rec.veth, addr = %rec.session_addr, "sandbox started");

        let (tx, rx) = watch::channel(None);
        let requested = Arc::new(AtomicBool::new(false));
        let req = requested.clone();
        let mon_cg = cg.clone();
        let id = rec.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // bwrap is gone, so the session is over: nothing may linger.
            let _ = tokio::task::spawn_blocking(move || mon_cg.kill_all(KILL_TIMEOUT)).await;
            for r in readers {
                let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
            }
            let lines: Vec<String> = tail.lock().expect("tail").iter().cloned().collect();
            let reason = describe_exit(&status, &lines);
            tracing::info!(session = %id, "sandbox ended: {reason}");
            let _ = tx.send(Some(InstanceExit {
                reason,
                requested: req.load(Ordering::SeqCst),
            }));
        });
        Ok(SandboxInstance {
            inner: self.clone(),
            rec,
            cgroup: cg,
            pid,
            init_pid,
            exit: rx,
            requested,
            stopped: tokio::sync::Mutex::new(false),
        })
    }
}

type SpawnJob = (
    tokio::runtime::Handle,
    tokio::process::Command,
    tokio::sync::oneshot::Sender<io::Result<tokio::process::Child>>,
);

/// Spawns on a thread that lives as long as the process. bwrap's
/// `--die-with-parent` fires when the *thread* that forked it exits, and
/// runtime threads may come and go (blocking pools, `block_in_place`); a
/// session must end with the server process, not with a thread.
async fn spawn_from_lasting_thread(
    cmd: tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::mpsc::Sender<SpawnJob>> =
        std::sync::OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                for (handle, mut cmd, reply) in rx {
                    // The child is reaped by the caller's runtime.
                    let _guard = handle.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        tx
    });
    let (reply, rx) = tokio::sync::oneshot::channel();
    tx.send((tokio::runtime::Handle::current(), cmd, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// A sealed-off in-memory file holding one compiled seccomp program, read by
/// bwrap from its start.
fn program_fd(program: &[u8]) -> Result<OwnedFd, BackendError> {
    use std::io::{Seek, Write};
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(c"sandcast-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BackendError::io(
            "creating a memfd for the seccomp filter",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: just created, owned by nobody else.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(program)
        .and_then(|()| f.rewind())
        .map_err(|e| BackendError::io("writing the seccomp filter", e))?;
    Ok(f.into())
}

/// The hidden paths that exist, as directories or files; never the stage
/// (or an ancestor of it), which bwrap needs, and nothing inside another
/// hidden directory (gone from view once that is covered).
fn hidden_paths(paths: &[PathBuf], stage_dir: &Path) -> Vec<launch::Hidden> {
    let found: Vec<launch::Hidden> = paths
        .iter()
        .filter(|p| p.is_absolute() && !stage_dir.starts_with(p))
        .filter_map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some(launch::Hidden {
                path: p.clone(),
                dir: m.is_dir(),
            })
        })
        .collect();
    found
        .iter()
        .filter(|h| {
            !found
                .iter()
                .any(|o| o.dir && o.path != h.path && h.path.starts_with(&o.path))
        })
        .cloned()
        .collect()
}

fn pipe() -> Result<(OwnedFd, OwnedFd), BackendError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(BackendError::io(
            "creating a pipe",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads bwrap's info JSON up to the closing brace; the pid of the sandbox's
/// init, or `None` when bwrap closed the pipe first.
fn read_info(fd: OwnedFd) -> Option<u32> {
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'}') {
        match f.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    v.get("child-pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
}

async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    id: String,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(session = %id, "sandbox: {line}");
        let mut t = tail.lock().expect("tail");
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Words for how bwrap (and through it the agent) ended.
pub fn describe_exit(status: &io::Result<ExitStatus>, tail: &[String]) -> String {
    let status = match status {
        Ok(s) => s,
        Err(e) => return format!("could not wait for bwrap: {e}"),
    };
    let last = tail
        .last()
        .map(|l| format!("; last output: {l}"))
        .unwrap_or_default();
    if let Some(sig) = status.signal() {
        return format!("sandbox (bwrap) killed by signal {sig}{last}");
    }
    match status.code() {
        Some(0) => "agent exited with status 0".to_string(),
        // bwrap reports a command killed by signal N as 128 + N.
        Some(c) if (129..=192).contains(&c) => format!("agent killed by signal {}{last}", c - 128),
        Some(1) if tail.iter().any(|l| l.starts_with("bwrap:")) => {
            let l = tail
                .iter()
                .rev()
                .find(|l| l.starts_with("bwrap:"))
                .expect("found");
            format!("sandbox setup failed: {l}")
        }
        Some(c) => format!("agent exited with status {c}{last}"),
        None => format!("bwrap ended with {status}{last}"),
    }
}

/// A running sandbox session.
pub struct SandboxInstance {
    inner: Arc<Inner>,
    rec: Record,
    cgroup: SessionCgroup,
    pid: u32,
    init_pid: u32,
    exit: watch::Receiver<Option<InstanceExit>>,
    requested: Arc<AtomicBool>,
    stopped: tokio::sync::Mutex<bool>,
}

impl SandboxInstance {
    /// The session's address inside its network namespace.
    pub fn session_addr(&self) -> std::net::Ipv4Addr {
        self.rec.session_addr
    }

    /// The host end of the session's veth (its gateway).
    pub fn host_addr(&self) -> std::net::Ipv4Addr {
        self.rec.host_addr
    }

    /// The host-side veth name.
    pub fn veth(&self) -> &str {
        &self.rec.veth
    }

    /// The network namespace name (under /run/netns).
    pub fn netns(&self) -> &str {
        &self.rec.netns
    }

    /// The session's cgroup directories, one per hierarchy.
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        &self.rec.cgroup_dirs
    }

    /// The per-session files (generated config and browser policies).
    pub fn files_dir(&self) -> &Path {
        &self.rec.files_dir
    }

    /// The session's host uid (also its gid).
    pub fn uid(&self) -> u32 {
        self.rec.uid.expect("allocated at start")
    }

    /// Host pid of the sandbox's init (pid 1 inside).
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// Pids in the session's cgroup whose parent is the sandbox's init: the
    /// agent (and any orphan the init adopted).
    fn agent_pids(&self) -> Vec<i32> {
        self.cgroup
            .pids()
            .into_iter()
            .filter(|p| parent_pid(*p) == Some(self.init_pid as i32))
            .collect()
    }
}

/// Whether the sandbox's init has a child that is no longer bwrap: the
/// agent has been exec'd, so every mount succeeded.
fn exec_done(cg: &SessionCgroup, init_pid: u32) -> bool {
    cg.pids().into_iter().any(|p| {
        parent_pid(p) == Some(init_pid as i32)
            && std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() != "bwrap")
    })
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

#[async_trait]
impl Instance for SandboxInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn exited(&self) -> watch::Receiver<Option<InstanceExit>> {
        self.exit.clone()
    }

    async fn stop(&self, grace: Duration) -> Result<(), BackendError> {
        let mut stopped = self.stopped.lock().await;
        if *stopped {
            return Ok(());
        }
        self.requested.store(true, Ordering::SeqCst);
        let mut rx = self.exit.clone();
        if rx.borrow().is_none() && !grace.is_zero() {
            // Ask the agent to end; it stops its own children.
            for pid in self.agent_pids() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(grace, rx.wait_for(Option::is_some)).await;
        }
        let removed = self.inner.teardown(&self.rec).await?;
        // Killing the cgroup ends bwrap; its exit is reported by the monitor.
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        tracing::info!(session = %self.rec.id, "sandbox stopped: {}", removed.join(", "));
        *stopped = true;
        Ok(())
    }
}

#[async_trait]
impl Backend for SandboxBackend {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn readiness(&self) -> Readiness {
        let checks = readiness_checks(&self.inner).await;
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        Ok(Box::new(self.inner.start(spec).await?))
    }

    fn agent_peer_uid(&self, id: &SessionId) -> Option<u32> {
        Record::load(&self.inner.cfg.state_dir, id.as_str())?.uid
    }

    async fn reap(&self, keep: &[SessionId]) -> Result<Vec<String>, BackendError> {
        let inner = &self.inner;
        let keep: HashSet<String> = keep.iter().map(|k| k.as_str().to_string()).collect();
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        let (records, bad) = inner.host.records();
        for p in bad {
            if std::fs::remove_file(&p).is_ok() {
                lines.push(format!("removed unreadable record {}", p.display()));
            }
        }
        for rec in records.iter().filter(|r| !keep.contains(&r.id)) {
            match inner.teardown(rec).await {
                Ok(done) => lines.extend(done),
                Err(e) => errors.push(e.to_string()),
            }
        }
        // Leftovers without a record (a crash between steps of start).
        let (more, errs) = inner.host.reap_unrecorded(&keep).await;
        lines.extend(more);
        errors.extend(errs);
        if inner.host.check_tools().is_ok()
            && let Err(e) = inner.host.rebuild(Some(&keep)).await
        {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(lines)
        } else {
            Err(BackendError::Cleanup(format!(
                "removed [{}] but: {}",
                lines.join(", "),
                errors.join("; ")
            )))
        }
    }

    async fn release(&self) -> Result<Vec<String>, BackendError> {
        // Whatever a failed stop left goes first; the table and cgroup
        // parent can only go when no session is recorded.
        let mut lines = self.reap(&[]).await?;
        lines.extend(self.inner.host.release().await?);
        Ok(lines)
    }
}

async fn readiness_checks(inner: &Inner) -> Vec<Check> {
    let cfg = &inner.cfg;
    let host_checks = inner.host.checks().await;
    let mut checks = Vec::new();
    let mut add = |name: &str, r: Result<String, String>| {
        checks.push(match r {
            Ok(detail) => Check {
                name: name.into(),
                ok: true,
                detail,
            },
            Err(detail) => Check {
                name: name.into(),
                ok: false,
                detail,
            },
        })
    };
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    add(
        "root",
        if euid == 0 {
            Ok("running as root (needed for namespaces, cgroups and nftables)".into())
        } else {
            Err(format!(
                "running as uid {euid}: the sandbox backend must run as root"
            ))
        },
    );
    let bwrap = match inner.check_bwrap() {
        Err(e) => Err(e
            .to_string()
            .trim_start_matches("host is not ready: ")
            .to_string()),
        Ok(()) => sandcast_host::net::run(&cfg.bwrap, &["--version"], None)
            .await
            .map(|v| format!("{} ({})", cfg.bwrap.display(), v.trim()))
            .map_err(|e| e.to_string()),
    };
    add("bwrap", bwrap);
    for c in host_checks {
        add(&c.name, if c.ok { Ok(c.detail) } else { Err(c.detail) });
    }
    add("user namespaces", probe_userns(inner).await);
    add(
        "root file system",
        match &cfg.image_root {
            None => Ok("the host's / (read-only in sessions)".into()),
            Some(r) => launch::check_image_root(r).map(|()| format!("image at {}", r.display())),
        },
    );
    let root = cfg.image_root.clone().unwrap_or_else(|| "/".into());
    let dirs: Vec<&str> = policy::POLICY_DIRS
        .iter()
        .copied()
        .filter(|d| root.join(d.trim_start_matches('/')).is_dir())
        .collect();
    add(
        "browser policy",
        if dirs.is_empty() {
            Err(format!(
                "none of {} exists in the root: the browser's URL filters (browser.blocked_urls) cannot be applied; install chromium or mkdir {}",
                policy::POLICY_DIRS.join(", "),
                root.join("etc/chromium").display()
            ))
        } else {
            Ok(format!(
                "{} blocked and {} allowed URL filters in {}",
                cfg.browser_policy.blocked_urls.len(),
                cfg.browser_policy.allowed_urls.len(),
                dirs.join(", ")
            ))
        },
    );
    checks
}

/// Runs bwrap as the session user with the namespaces sessions use.
async fn probe_userns(inner: &Inner) -> Result<String, String> {
    let cfg = &inner.cfg;
    inner.check_bwrap().map_err(|e| e.to_string())?;
    // Any uid of the range shows whether session uids can make namespaces.
    let first = inner.host.config().uid_range[0];
    let (uid, gid) = (first, first);
    let root = cfg.image_root.clone().unwrap_or_else(|| "/".into());
    let mut cmd = tokio::process::Command::new(&cfg.bwrap);
    cmd.args([
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--ro-bind",
    ])
    .arg(&root)
    .args([
        "/", "--proc", "/proc", "--dev", "/dev", "--", "/bin/sh", "-c", "exit 0",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    // SAFETY: only async-signal-safe credential calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .map_err(|_| "bwrap probe hung for 10 s".to_string())?
        .map_err(|e| format!("cannot run {} as uid {uid}: {e}", cfg.bwrap.display()))?;
    if out.status.success() {
        Ok(format!(
            "uid {uid} can create user, pid, ipc and uts namespaces with bwrap"
        ))
    } else {
        Err(format!(
            "bwrap as uid {uid} failed: {} (enable unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0, and on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(raw: i32) -> io::Result<ExitStatus> {
        Ok(ExitStatus::from_raw(raw))
    }

    #[test]
    fn exits_are_described() {
        assert_eq!(describe_exit(&status(0), &[]), "agent exited with status 0");
        // bwrap exit code 137: the agent got SIGKILL.
        assert_eq!(
            describe_exit(&status(137 << 8), &[]),
            "agent killed by signal 9"
        );
        assert_eq!(
            describe_exit(&status(9), &["x".into()]),
            "sandbox (bwrap) killed by signal 9; last output: x"
        );
        let tail =
            vec!["bwrap: Can't mount proc on /newroot/proc: Operation not permitted".to_string()];
        assert_eq!(
            describe_exit(&status(1 << 8), &tail),
            "sandbox setup failed: bwrap: Can't mount proc on /newroot/proc: Operation not permitted"
        );
        assert_eq!(
            describe_exit(&status(3 << 8), &["boom".into()]),
            "agent exited with status 3; last output: boom"
        );
    }

    #[test]
    fn config_is_validated_with_the_bad_value() {
        let t = tempfile::tempdir().unwrap();
        let base = SandboxConfig {
            state_dir: t.path().join("state"),
            stage_dir: t.path().join("stage"),
            host: HostConfig {
                lock_dir: t.path().join("lock"),
                ..HostConfig::default()
            },
            ..SandboxConfig::default()
        };
        let err = |c: SandboxConfig| SandboxBackend::new(c).err().expect("error").to_string();
        // Host settings are checked by the host layer.
        assert!(
            err(SandboxConfig {
                host: HostConfig {
                    name_prefix: "Bad-Prefix".into(),
                    ..base.host.clone()
                },
                ..base.clone()
            })
            .contains("\"Bad-Prefix\"")
        );
        assert!(
            err(SandboxConfig {
                host: HostConfig {
                    uid_range: [0, 10],
                    ..base.host.clone()
                },
                ..base.clone()
            })
            .contains("host.uid_range [0, 10]")
        );
        assert!(
            err(SandboxConfig {
                writable_mib: 1,
                ..base.clone()
            })
            .contains("writable_mib 1")
        );
        assert!(
            err(SandboxConfig {
                browser_policy: BrowserPolicy {
                    blocked_urls: vec!["a b".into()],
                    allowed_urls: Vec::new(),
                },
                ..base.clone()
            })
            .contains("\"a b\"")
        );
        assert!(
            err(SandboxConfig {
                image_root: Some(t.path().join("nope")),
                ..base.clone()
            })
            .contains("nope")
        );
        let b = SandboxBackend::new(base.clone()).unwrap();
        assert_eq!(b.name(), "sandbox");
        // The stage must be traversable by the session user.
        let mode = std::fs::metadata(&base.stage_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn config_reads_from_toml_like_json_with_defaults() {
        let c: SandboxConfig = serde_json::from_str(r#"{"shm_mib": 256}"#).unwrap();
        assert_eq!(c.shm_mib, 256);
        assert_eq!(c.writable_mib, 1024);
        assert_eq!(c.bwrap, Path::new("/usr/bin/bwrap"));
        // The browser policy comes from the server's [browser] section only.
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"browser_policy": {}}"#).is_err());
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"nope": 1}"#).is_err());
        // Host settings moved to the host layer's own section.
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"subnet": "10.200.0.0/16"}"#).is_err());
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"uid_range": [1500, 1600]}"#).is_err());
    }

    #[test]
    fn hidden_paths_skip_the_stage_and_what_another_covers() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("sandbox")).unwrap();
        std::fs::write(t.path().join("c.toml"), "").unwrap();
        let stage = t.path().join("run/stage");
        std::fs::create_dir_all(&stage).unwrap();
        let h = hidden_paths(
            &[
                data.join("sandbox"),
                data.clone(),
                t.path().join("c.toml"),
                t.path().join("missing"),
                t.path().join("run"),
            ],
            &stage,
        );
        assert_eq!(
            h,
            [
                launch::Hidden {
                    path: data,
                    dir: true
                },
                launch::Hidden {
                    path: t.path().join("c.toml"),
                    dir: false
                },
            ]
        );
    }

    #[test]
    fn parent_pid_reads_proc_stat() {
        // SAFETY: getpid/getppid cannot fail.
        let (me, parent) = unsafe { (libc::getpid(), libc::getppid()) };
        assert_eq!(parent_pid(me), Some(parent));
        assert_eq!(parent_pid(-5), None);
    }
}

//! The `firecracker` backend: one microVM per session.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandcast_backend::{
    AgentToken, Backend, BackendError, Check, Instance, InstanceExit, LaunchSpec, Readiness,
    SessionId,
};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::api::*;
use crate::client::{ClientError, FirecrackerClient};
use crate::host;
use crate::jail::{Jail, JailerConfig};
use crate::kernel::{self, GuestKernel};
use crate::{AGENT_VSOCK_PORT, GUEST_CID, kvm, vsock};
use sandcast_host::cgroup::SessionCgroup;
use sandcast_host::{Host, HostConfig};

/// Configuration of the Firecracker backend. [`Default`] gives the documented
/// defaults; `kernel` and `rootfs` usually need setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary: a path, or a name looked up on `PATH`.
    /// Default `firecracker`.
    pub firecracker_bin: PathBuf,
    /// Uncompressed guest kernel (`vmlinux`). Default `/var/lib/sandcast/vmlinux`.
    pub kernel: PathBuf,
    /// Optional initramfs (for a kernel with its virtio drivers as modules).
    pub initramfs: Option<PathBuf>,
    /// The kernel's `.config`; default: looked for beside the kernel.
    pub kernel_config: Option<PathBuf>,
    /// The image's ext4 root file system, shared read-only by every VM.
    /// Default `/var/lib/sandcast/image/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// An image directory from `sandcast image build`. When set, its
    /// manifest is checked for what a browser session needs and `rootfs`
    /// is taken to be its `rootfs.ext4`. Default `None`.
    pub image: Option<PathBuf>,
    /// The KVM device. Default `/dev/kvm`.
    pub kvm_device: PathBuf,
    /// Run a trivial guest on `kvm_device` before each start to report an
    /// unusable KVM clearly. Default `true`.
    pub probe_kvm: bool,
    /// Size of each session's sparse writable drive in MiB. Default 4096.
    pub writable_drive_mib: u64,
    /// A network interface on a TAP device in a per-session namespace.
    /// Default `true`.
    pub network: bool,
    /// Extra kernel command line arguments.
    pub extra_boot_args: Vec<String>,
    /// Where [`FirecrackerBackend::build_snapshot`] keeps the ready-VM
    /// snapshot; sessions restore from it when it exists. Default `None`
    /// (every session boots).
    pub snapshot_dir: Option<PathBuf>,
    /// Where the backend records its sessions for [`Backend::reap`]: the
    /// instance's own directory (the server adds its instance id).
    /// Default `/run/sandcast-firecracker`.
    pub runtime_dir: PathBuf,
    /// Host isolation (namespace, address, egress policy, cgroup): the
    /// server's `[host]` settings with its instance id. The guest's DNS
    /// server is the first of the host layer's resolvers.
    pub host: HostConfig,
    /// How long to wait for Firecracker's API socket and for each call.
    /// Default 10 s.
    pub api_timeout: Duration,
    /// How long a template VM may take to boot to its agent. Default 60 s.
    pub boot_timeout: Duration,
    /// Run Firecracker under its jailer (chroot, unprivileged uid/gid, the
    /// session's cgroup and network namespace). Default `None`: Firecracker
    /// runs as the server's user in the session's cgroup and namespace.
    pub jailer: Option<JailerConfig>,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            firecracker_bin: "firecracker".into(),
            kernel: "/var/lib/sandcast/vmlinux".into(),
            initramfs: None,
            kernel_config: None,
            rootfs: "/var/lib/sandcast/image/rootfs.ext4".into(),
            image: None,
            kvm_device: "/dev/kvm".into(),
            probe_kvm: true,
            writable_drive_mib: 4096,
            network: true,
            extra_boot_args: Vec::new(),
            snapshot_dir: None,
            runtime_dir: "/run/sandcast-firecracker".into(),
            api_timeout: Duration::from_secs(10),
            boot_timeout: Duration::from_secs(60),
            jailer: None,
            host: HostConfig::default(),
        }
    }
}

/// Files of a ready-VM snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The microVM state.
    pub state: PathBuf,
    /// Guest memory.
    pub memory: PathBuf,
    /// The template's writable drive at snapshot time; each restored session
    /// starts from a copy of it.
    pub writable: PathBuf,
}

impl SnapshotFiles {
    fn in_dir(dir: &Path) -> Self {
        SnapshotFiles {
            state: dir.join("vm.state"),
            memory: dir.join("vm.mem"),
            writable: dir.join("vm.writable.ext4"),
        }
    }

    fn exist(&self) -> bool {
        self.state.is_file() && self.memory.is_file() && self.writable.is_file()
    }
}

/// File names inside a session directory.
const API_SOCKET: &str = "firecracker.sock";
const VSOCK_SOCKET: &str = "vsock.sock";
const WRITABLE_DRIVE: &str = "writable.ext4";
const SNAPSHOT_STATE: &str = "vm.state";
const SNAPSHOT_MEMORY: &str = "vm.mem";
const CONSOLE_LOG: &str = "console.log";
const FIRECRACKER_LOG: &str = "firecracker.log";
const METRICS_FILE: &str = "metrics.json";
/// Drive and interface ids in the VM configuration.
const ROOT_DRIVE_ID: &str = "rootfs";
const WRITABLE_DRIVE_ID: &str = "writable";
/// A profile's drive, the third (`/dev/vdc` in the guest, where the agent
/// mounts it as the home).
const HOME_DRIVE_ID: &str = "home";
const IFACE_ID: &str = "eth0";
/// Where the image installs the agent.
pub const AGENT_PATH_IN_IMAGE: &str = "/usr/local/bin/sandcast-agent";

/// The Firecracker backend.
#[derive(Debug)]
pub struct FirecrackerBackend {
    config: FirecrackerConfig,
    kernel: GuestKernel,
    host: Arc<Host>,
}

/// What the backend adds to the host layer's record of a session so that
/// [`Backend::reap`] can clean up after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    session_dir: PathBuf,
    /// The jail directory, when the session ran under the jailer.
    #[serde(default)]
    jail: Option<PathBuf>,
    /// An argument only this session's Firecracker has on its command line,
    /// to tell it from a process that reused its pid.
    #[serde(default)]
    marker: Option<String>,
}

impl FirecrackerBackend {
    /// Checks the kernel (and its config when there is one) and the root
    /// file system image; the binary and KVM are checked at each start and by
    /// [`Backend::readiness`], so a server can start and say what is missing.
    pub fn new(mut config: FirecrackerConfig) -> Result<Self, BackendError> {
        if let Some(image) = &config.image {
            let req = sandcast_image::Requirements {
                ext4: true,
                ..sandcast_image::Requirements::browser()
            };
            sandcast_image::check(image, &req)
                .map_err(|e| BackendError::NotReady(e.to_string()))?;
            config.rootfs = image.join(sandcast_image::ROOTFS_EXT4);
        }
        let kernel = kernel::check_kernel(
            &config.kernel,
            config.initramfs.as_deref(),
            config.kernel_config.as_deref(),
        )
        .map_err(|e| BackendError::NotReady(e.to_string()))?;
        check_rootfs(&config.rootfs)?;
        if let Some(report) = &kernel.config_report {
            for w in &report.warnings {
                tracing::warn!(kernel = %config.kernel.display(), "{w}");
            }
        }
        // Leaf names `fc-<id>`: the jailer names the cgroup after its `--id`.
        let host = Arc::new(Host::new(&config.host, &config.runtime_dir, "fc-")?);
        Ok(FirecrackerBackend {
            config,
            kernel,
            host,
        })
    }

    /// The host isolation layer (names, policy, instance).
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The configuration in use.
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// The checked guest kernel.
    pub fn kernel(&self) -> &GuestKernel {
        &self.kernel
    }

    /// The snapshot sessions restore from, when one has been built.
    pub fn snapshot(&self) -> Option<SnapshotFiles> {
        let files = SnapshotFiles::in_dir(self.config.snapshot_dir.as_deref()?);
        files.exist().then_some(files)
    }

    /// The kernel command line of a freshly booted VM.
    pub fn boot_args(&self) -> String {
        let mut args = vec![
            "console=ttyS0".to_owned(),
            "reboot=k".into(),
            "panic=1".into(),
            "pci=off".into(),
            // Firecracker's i8042 has no AUX port or PNP; probing them only costs time.
            "i8042.noaux".into(),
            "i8042.nomux".into(),
            "i8042.nopnp".into(),
            "i8042.dumbkbd".into(),
            "root=/dev/vda".into(),
            "rootfstype=ext4".into(),
            "ro".into(),
        ];
        if self.config.network {
            // The egress policy lets sessions reach exactly these on port 53.
            let dns: Vec<String> = self
                .host
                .resolvers()
                .iter()
                .filter(|a| a.is_ipv4())
                .take(2)
                .map(ToString::to_string)
                .collect();
            args.push(format!(
                "ip={}::{}:{}:sandcast:eth0:off:{}",
                host::GUEST_IP,
                host::GATEWAY_IP,
                host::TAP_NETMASK,
                dns.join(":")
            ));
        }
        args.extend(self.config.extra_boot_args.iter().cloned());
        args.push(format!("init={AGENT_PATH_IN_IMAGE}"));
        // Everything after `--` is the init's argv.
        args.push("--".into());
        args.push("--vm".into());
        args.push("--connect".into());
        args.push(format!("vsock:2:{AGENT_VSOCK_PORT}"));
        args.join(" ")
    }

    fn resolve_binary(&self) -> Result<PathBuf, BackendError> {
        find_binary(
            &self.config.firecracker_bin,
            "firecracker",
            "install a Firecracker v1.16.1 release binary",
        )
    }

    fn check_kvm(&self) -> Result<(), BackendError> {
        if self.config.probe_kvm {
            kvm::probe(&self.config.kvm_device).map_err(BackendError::NotReady)?;
        }
        Ok(())
    }

    /// Boots one template VM to the point where its agent waits for a
    /// session, snapshots it into `snapshot_dir`, and stops it. Later
    /// sessions restore from this snapshot.
    pub async fn build_snapshot(&self) -> Result<SnapshotFiles, BackendError> {
        let dir =
            self.config.snapshot_dir.clone().ok_or_else(|| {
                BackendError::InvalidSpec("snapshot_dir is not configured".into())
            })?;
        let files = SnapshotFiles::in_dir(&dir);
        let template_dir = dir.join("template");
        let _ = std::fs::remove_dir_all(&template_dir);
        std::fs::create_dir_all(&template_dir)
            .map_err(|e| BackendError::io(format!("creating {}", template_dir.display()), e))?;
        let id = SessionId::new("snapshot-template")?;
        let agent_socket = self.agent_socket(&id, &template_dir);
        if let Some(parent) = agent_socket.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| BackendError::io(format!("creating {}", parent.display()), e))?;
        }
        let spec = LaunchSpec {
            id,
            session_dir: template_dir.clone(),
            agent_socket,
            agent_binary: PathBuf::new(),
            limits: sandcast_backend::Limits::default(),
            network: sandcast_backend::NetworkPolicy {
                egress: sandcast_backend::Egress::None,
            },
            agent_token: None,
            home: None,
        };
        // The template's agent connects and waits; it gets no configuration.
        let _ = std::fs::remove_file(&spec.agent_socket);
        let listener = UnixListener::bind(&spec.agent_socket).map_err(|e| {
            BackendError::io(format!("listening on {}", spec.agent_socket.display()), e)
        })?;
        let mut running = self.launch(&spec, None).await?;
        let result = async {
            let (_conn, _) = tokio::time::timeout(self.config.boot_timeout, listener.accept())
                .await
                .map_err(|_| {
                    BackendError::Start(format!(
                        "the template VM's agent did not connect within {:?}; console: {}",
                        self.config.boot_timeout,
                        console_tail(&template_dir, 10)
                    ))
                })?
                .map_err(|e| BackendError::io("accepting the template agent", e))?;
            let client = &running.client;
            api(client.set_vm_state(VmState::Paused).await)?;
            for name in [SNAPSHOT_STATE, SNAPSHOT_MEMORY] {
                let _ = std::fs::remove_file(running.vm_dir.join(name));
            }
            api(client
                .create_snapshot(&SnapshotCreateParams {
                    snapshot_path: running.vm_name(SNAPSHOT_STATE),
                    mem_file_path: running.vm_name(SNAPSHOT_MEMORY),
                    snapshot_type: Some(SnapshotType::Full),
                })
                .await)?;
            Ok(())
        }
        .await;
        running.kill().await;
        // The snapshot and the drive it names leave the VM's directory (or
        // jail) before that is cleaned.
        let result = match result {
            Ok(()) => {
                let mut kept = Ok(());
                for (name, to) in [
                    (SNAPSHOT_STATE, &files.state),
                    (SNAPSHOT_MEMORY, &files.memory),
                    (WRITABLE_DRIVE, &files.writable),
                ] {
                    kept = move_file(&running.vm_dir.join(name), to).await;
                    if kept.is_err() {
                        break;
                    }
                }
                kept
            }
            Err(e) => Err(e),
        };
        let _ = running.cleanup().await;
        let _ = std::fs::remove_file(&spec.agent_socket);
        if result.is_err() {
            for f in [&files.state, &files.memory, &files.writable] {
                let _ = std::fs::remove_file(f);
            }
        }
        result.map(|()| files)
    }

    /// The jail of session `id`, when sessions run under the jailer.
    fn jail_for(&self, id: &SessionId) -> Option<Result<Jail, BackendError>> {
        let jailer = self.config.jailer.as_ref()?;
        Some(Jail::new(jailer, &self.config.firecracker_bin, id))
    }

    fn resolve_jailer(&self) -> Result<Option<PathBuf>, BackendError> {
        let Some(jailer) = &self.config.jailer else {
            return Ok(None);
        };
        find_binary(
            &jailer.jailer_bin,
            "jailer",
            "install the jailer of the same Firecracker release",
        )
        .map(Some)
    }

    /// Starts Firecracker for a session and configures it (boot or restore).
    async fn launch(
        &self,
        spec: &LaunchSpec,
        snapshot: Option<&SnapshotFiles>,
    ) -> Result<Running, BackendError> {
        let jail = self.jail_for(&spec.id).transpose()?;
        let checked = (|| {
            let bin = self.resolve_binary()?;
            let jailer = self.resolve_jailer()?;
            self.check_kvm()?;
            check_rootfs(&self.config.rootfs)?;
            Ok((bin, jailer))
        })();
        let (bin, jailer) = match checked {
            Ok(found) => found,
            Err(e) => {
                // The server may have made the jail's root for the agent socket.
                if let Some(j) = &jail {
                    let _ = j.remove();
                }
                return Err(e);
            }
        };
        let dir = &spec.session_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
        let vm_dir = jail
            .as_ref()
            .map_or_else(|| dir.clone(), |j| j.root.clone());
        let mut running = Running {
            id: spec.id.clone(),
            dir: dir.clone(),
            client: FirecrackerClient::new(vm_dir.join(API_SOCKET)),
            vm_dir,
            pid: None,
            rec: None,
            cgroup: None,
            child: None,
            host: self.host.clone(),
            jail,
        };
        match self
            .launch_inner(spec, snapshot, &bin, jailer.as_deref(), &mut running)
            .await
        {
            Ok(()) => Ok(running),
            Err(e) => {
                let detail = console_tail(dir, 5);
                running.kill_and_clean().await;
                Err(match (e, detail.is_empty()) {
                    (BackendError::Start(m), false) => {
                        BackendError::Start(format!("{m}; console: {detail}"))
                    }
                    (e, _) => e,
                })
            }
        }
    }

    async fn launch_inner(
        &self,
        spec: &LaunchSpec,
        snapshot: Option<&SnapshotFiles>,
        bin: &Path,
        jailer: Option<&Path>,
        running: &mut Running,
    ) -> Result<(), BackendError> {
        let dir = &spec.session_dir;
        let record = Record {
            session_dir: dir.clone(),
            jail: running.jail.as_ref().map(|j| j.dir.clone()),
            marker: Some(match &running.jail {
                Some(j) => format!("--id={}", j.id),
                None => running.client.socket().display().to_string(),
            }),
        };
        // The host layer records the session and builds its namespace,
        // veth and firewall elements; the TAP goes in below.
        let backend_part = serde_json::to_value(&record).expect("record serialises");
        running.rec = Some(
            self.host
                .create(
                    spec.id.as_str(),
                    &spec.network.egress,
                    PathBuf::new(),
                    backend_part,
                )
                .await?,
        );
        // Jailed, Firecracker runs as the uid the host layer claimed for
        // this session with its record: no two sessions share one.
        let uid = running.rec.as_ref().and_then(|r| r.uid);
        if let Some(j) = running.jail.as_mut() {
            j.set_owner(uid.ok_or_else(|| {
                BackendError::Start("the host layer claimed no uid for the session".into())
            })?)?;
            j.create(&format!("{VSOCK_SOCKET}_{AGENT_VSOCK_PORT}"))?;
        }
        // Stale sockets from an earlier run would make Firecracker fail to bind.
        for name in [API_SOCKET, VSOCK_SOCKET] {
            let _ = std::fs::remove_file(running.vm_dir.join(name));
        }
        let writable = running.vm_dir.join(WRITABLE_DRIVE);
        match snapshot {
            Some(s) => copy_sparse(&s.writable, &writable).await?,
            None => make_writable_drive(&writable, self.config.writable_drive_mib).await?,
        }
        running.give(&writable)?;
        for name in [FIRECRACKER_LOG, METRICS_FILE] {
            let path = running.vm_dir.join(name);
            std::fs::File::create(&path)
                .map_err(|e| BackendError::io(format!("creating {}", path.display()), e))?;
            running.give(&path)?;
        }
        // The guest-initiated vsock connection to the agent port is made by
        // Firecracker, as the jail's uid.
        if spec.agent_socket.exists() {
            running.give(&spec.agent_socket)?;
        }
        let netns = self.host.netns_name(spec.id.as_str());
        if self.config.network {
            let owner = match (&running.jail, uid) {
                (Some(_), Some(u)) => Some((u, u)),
                _ => None,
            };
            let hc = self.host.config();
            host::setup_tap(&hc.ip, &hc.nft, &netns, owner).await?;
        }
        let limits = host::cgroup_limits(&spec.limits);
        let plan = self.host.cgroup_plan(spec.id.as_str(), &limits)?;
        match jailer {
            // The jailer makes the session's cgroup itself from `--cgroup`.
            Some(_) => self.host.prepare_cgroup_parent().await?,
            None => {
                running.cgroup = Some(self.host.create_cgroup(spec.id.as_str(), &limits).await?);
            }
        }
        let kernel = running.import(&self.kernel.vmlinux, "vmlinux").await?;
        let initrd = match &self.kernel.initramfs {
            Some(p) => Some(running.import(p, "initrd").await?),
            None => None,
        };
        let rootfs = running.import(&self.config.rootfs, "rootfs.ext4").await?;
        let home = match &spec.home {
            Some(image) => Some(running.import_writable(image, "home.ext4").await?),
            None => None,
        };
        let snapshot_names = match snapshot {
            Some(s) => Some((
                running.import(&s.state, SNAPSHOT_STATE).await?,
                running.import(&s.memory, SNAPSHOT_MEMORY).await?,
            )),
            None => None,
        };
        self.spawn(spec, bin, jailer, &plan, running)?;
        if let Some(rec) = running.rec.as_mut() {
            rec.pid = running.pid;
            self.host.save(rec)?;
        }
        self.wait_for_api(running).await?;
        let c = running.client.clone();
        let logger = Logger {
            log_path: running.vm_name(FIRECRACKER_LOG),
            level: Some(LogLevel::Warning),
            show_level: Some(true),
        };
        api(c.put_logger(&logger).await)?;
        api(c
            .put_metrics(&Metrics {
                metrics_path: running.vm_name(METRICS_FILE),
            })
            .await)?;
        let vsock_uds = running.vm_name(VSOCK_SOCKET);
        let writable = running.vm_name(WRITABLE_DRIVE);
        match snapshot_names {
            None => {
                let vcpus = spec.limits.cpu_millis.div_ceil(1000).clamp(1, 32) as u8;
                api(c
                    .put_machine_config(&MachineConfig {
                        vcpu_count: vcpus,
                        mem_size_mib: spec.limits.memory_mib,
                        smt: None,
                        track_dirty_pages: None,
                    })
                    .await)?;
                api(c
                    .put_boot_source(&BootSource {
                        kernel_image_path: kernel,
                        boot_args: Some(self.boot_args()),
                        initrd_path: initrd,
                    })
                    .await)?;
                api(c
                    .put_drive(&Drive {
                        drive_id: ROOT_DRIVE_ID.into(),
                        is_root_device: true,
                        is_read_only: true,
                        path_on_host: rootfs,
                        cache_type: None,
                    })
                    .await)?;
                api(c
                    .put_drive(&Drive {
                        drive_id: WRITABLE_DRIVE_ID.into(),
                        is_root_device: false,
                        is_read_only: false,
                        path_on_host: writable,
                        cache_type: None,
                    })
                    .await)?;
                if let Some(home) = home {
                    api(c
                        .put_drive(&Drive {
                            drive_id: HOME_DRIVE_ID.into(),
                            is_root_device: false,
                            is_read_only: false,
                            path_on_host: home,
                            cache_type: None,
                        })
                        .await)?;
                }
                if self.config.network {
                    api(c
                        .put_network_interface(&NetworkInterface {
                            iface_id: IFACE_ID.into(),
                            host_dev_name: host::TAP_NAME.into(),
                            guest_mac: Some(guest_mac(&spec.id)),
                        })
                        .await)?;
                    api(c
                        .put_mmds_config(&MmdsConfig {
                            network_interfaces: vec![IFACE_ID.into()],
                            version: Some(MmdsVersion::V2),
                            ipv4_address: None,
                        })
                        .await)?;
                    api(c
                        .put_mmds(&mmds_contents(&spec.id, spec.agent_token.as_ref()))
                        .await)?;
                }
                api(c
                    .put_vsock(&Vsock {
                        guest_cid: GUEST_CID,
                        uds_path: vsock_uds,
                    })
                    .await)?;
                api(c.action(ActionType::InstanceStart).await)?;
            }
            Some((state, memory)) => {
                api(c
                    .load_snapshot(&SnapshotLoadParams {
                        snapshot_path: state,
                        mem_backend: MemoryBackend {
                            backend_type: MemoryBackendType::File,
                            backend_path: memory,
                        },
                        resume_vm: Some(false),
                        network_overrides: if self.config.network {
                            vec![NetworkOverride {
                                iface_id: IFACE_ID.into(),
                                host_dev_name: host::TAP_NAME.into(),
                            }]
                        } else {
                            Vec::new()
                        },
                        vsock_override: Some(VsockOverride {
                            uds_path: vsock_uds,
                        }),
                        clock_realtime: Some(true),
                    })
                    .await)?;
                // The snapshot names the template's writable drive; this
                // session writes to its own copy before the guest runs again.
                api(c.patch_drive(WRITABLE_DRIVE_ID, &writable).await)?;
                if self.config.network {
                    // MMDS contents are not part of a snapshot.
                    api(c
                        .put_mmds(&mmds_contents(&spec.id, spec.agent_token.as_ref()))
                        .await)?;
                }
                api(c.set_vm_state(VmState::Resumed).await)?;
            }
        }
        Ok(())
    }

    fn spawn(
        &self,
        spec: &LaunchSpec,
        bin: &Path,
        jailer: Option<&Path>,
        plan: &sandcast_host::cgroup::CgroupPlan,
        running: &mut Running,
    ) -> Result<(), BackendError> {
        let dir = &spec.session_dir;
        let console = std::fs::File::create(dir.join(CONSOLE_LOG)).map_err(|e| {
            BackendError::io(format!("creating {}", dir.join(CONSOLE_LOG).display()), e)
        })?;
        let console2 = console
            .try_clone()
            .map_err(|e| BackendError::io("duplicating the console log", e))?;
        let (mut cmd, netns, procs) = match (jailer, &running.jail) {
            (Some(jailer), Some(jail)) => {
                // The jailer joins the namespace and makes the cgroup, then
                // execs Firecracker (same pid) inside the jail.
                let mut cmd = tokio::process::Command::new(jailer);
                let api_sock = format!("/{API_SOCKET}");
                let netns = self.host.netns_path(spec.id.as_str());
                cmd.args(jail.jailer_args(bin, plan, Some(&netns), &["--api-sock", &api_sock])?);
                (cmd, None, Vec::new())
            }
            _ => {
                let path = self.host.netns_path(spec.id.as_str());
                let netns: Option<OwnedFd> = Some(
                    std::fs::File::open(&path)
                        .map_err(|e| BackendError::io(format!("opening {}", path.display()), e))?
                        .into(),
                );
                let procs: Vec<OwnedFd> = running
                    .cgroup
                    .as_ref()
                    .map(|cg| cg.procs_files())
                    .unwrap_or_default()
                    .iter()
                    .map(|p| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(p)
                            .map(OwnedFd::from)
                            .map_err(|e| BackendError::io(format!("opening {}", p.display()), e))
                    })
                    .collect::<Result<_, _>>()?;
                let mut cmd = tokio::process::Command::new(bin);
                cmd.arg("--api-sock")
                    .arg(running.client.socket())
                    .arg("--id")
                    .arg(spec.id.as_str());
                (cmd, netns, procs)
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(console)
            .stderr(console2)
            .kill_on_drop(false);
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only async-signal-safe system calls run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: a signal to the server's process group does
                // not reach the VM, and stop() decides when it ends.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in &proc_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = jailer.unwrap_or(bin);
        let child = cmd
            .spawn()
            .map_err(|e| BackendError::io(format!("starting {}", program.display()), e))?;
        running.pid = child.id();
        running.child = Some(child);
        Ok(())
    }

    async fn wait_for_api(&self, running: &mut Running) -> Result<(), BackendError> {
        let deadline = Instant::now() + self.config.api_timeout;
        loop {
            if let Some(child) = running.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(BackendError::Start(format!(
                    "firecracker exited before its API was up ({status})"
                )));
            }
            if running.client.socket().exists() && running.client.describe().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BackendError::Start(format!(
                    "firecracker's API socket {} did not answer within {:?}",
                    running.client.socket().display(),
                    self.config.api_timeout
                )));
            }
            // Polling a condition with a deadline: Firecracker gives no
            // other signal that its socket is up.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `bin` when it is a path to a file, else the first `bin` on `PATH`; when
/// there is none, says so, naming it as the `what` binary, with `install`.
fn find_binary(bin: &Path, what: &str, install: &str) -> Result<PathBuf, BackendError> {
    let is_path = bin.components().count() > 1;
    let found = if is_path {
        bin.is_file().then(|| bin.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
    };
    found.ok_or_else(|| {
        BackendError::NotReady(format!(
            "{what} binary {} not found{}; {install} (see docs/firecracker.md)",
            bin.display(),
            if is_path { "" } else { " on PATH" }
        ))
    })
}

fn check_rootfs(rootfs: &Path) -> Result<(), BackendError> {
    let meta = std::fs::metadata(rootfs).map_err(|e| {
        BackendError::NotReady(format!(
            "root file system image {}: {e} (build one with `sandcast image build`)",
            rootfs.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(BackendError::NotReady(format!(
            "root file system image {} is not a file (the microVM needs the image's ext4, not its directory)",
            rootfs.display()
        )));
    }
    Ok(())
}

/// Wraps an API failure; Firecracker's own message is kept verbatim.
fn api<T>(r: Result<T, ClientError>) -> Result<T, BackendError> {
    r.map_err(|e| BackendError::Start(e.to_string()))
}

/// What the guest finds in MMDS (version 2): the session's id and the
/// SHA-256 of its agent token (never the token), which the agent checks its
/// configuration against.
pub(crate) fn mmds_contents(id: &SessionId, token: Option<&AgentToken>) -> serde_json::Value {
    let mut sandcast = serde_json::json!({
        "session_id": id.as_str(),
        "agent_vsock_port": AGENT_VSOCK_PORT,
    });
    if let Some(token) = token {
        sandcast["agent_token_sha256"] = serde_json::Value::String(token.sha256_hex());
    }
    serde_json::json!({ "sandcast": sandcast })
}

/// A locally administered MAC derived from the session id.
fn guest_mac(id: &SessionId) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(id.as_str().as_bytes());
    format!("06:fc:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3])
}

/// A sparse file formatted as ext4, without mounting anything.
async fn make_writable_drive(path: &Path, mib: u64) -> Result<(), BackendError> {
    let f = std::fs::File::create(path)
        .map_err(|e| BackendError::io(format!("creating {}", path.display()), e))?;
    f.set_len(mib << 20)
        .map_err(|e| BackendError::io(format!("sizing {}", path.display()), e))?;
    drop(f);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "sandcast-rw",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(path)
        .output()
        .await
        .map_err(|e| BackendError::io("running mkfs.ext4 (install e2fsprogs)", e))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(BackendError::Start(format!(
            "mkfs.ext4 {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Moves a file, across file systems too (a jail may be on another one).
async fn move_file(from: &Path, to: &Path) -> Result<(), BackendError> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    copy_sparse(from, to).await?;
    let _ = std::fs::remove_file(from);
    Ok(())
}

/// Copies a file keeping it sparse (and reflinked where the file system can).
pub(crate) async fn copy_sparse(from: &Path, to: &Path) -> Result<(), BackendError> {
    let out = tokio::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(|e| BackendError::io("running cp", e))?;
    if !out.status.success() {
        return Err(BackendError::Start(format!(
            "copying {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The last `n` lines of a session's serial console, joined with ` | `.
fn console_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(dir.join(CONSOLE_LOG)).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_vmm_line(l))
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Whether a console line is Firecracker's own (it logs to standard output,
/// which is the console, until its logger is set up): `<RFC 3339 time>
/// [<id>:<thread>] ...` with thread `main`, `fc_api` or `fc_vcpu N`. Those
/// are the VMM's chatter (request bodies included), not what the guest said.
fn is_vmm_line(line: &str) -> bool {
    let b = line.as_bytes();
    let dated =
        b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T';
    dated
        && line
            .split_once(" [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .is_some_and(|(tag, _)| {
                tag.rsplit_once(':').is_some_and(|(_, thread)| {
                    thread == "main" || thread == "fc_api" || thread.starts_with("fc_vcpu")
                })
            })
}

/// The last ERROR line of Firecracker's log in the session directory.
fn last_error(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(FIRECRACKER_LOG)).ok()?;
    text.lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .map(|l| l.trim().to_owned())
}

/// A started Firecracker process and what it holds on the host.
struct Running {
    id: SessionId,
    /// The session's directory (console log, and the VM's files unjailed).
    dir: PathBuf,
    /// Where the VM's own files live: `dir`, or the jail's root.
    vm_dir: PathBuf,
    jail: Option<Jail>,
    client: FirecrackerClient,
    pid: Option<u32>,
    /// The host layer's record: namespace, veth, address, cgroup.
    rec: Option<sandcast_host::state::Record>,
    /// The cgroup made here (unjailed); the jailer makes its own.
    cgroup: Option<SessionCgroup>,
    child: Option<tokio::process::Child>,
    host: Arc<Host>,
}

impl Running {
    /// What Firecracker calls the file `name` of its VM directory.
    fn vm_name(&self, name: &str) -> String {
        match &self.jail {
            Some(j) => j.jail_name(name),
            None => self.vm_dir.join(name).display().to_string(),
        }
    }

    /// What Firecracker calls the host file `host`: the file itself, or,
    /// jailed, its link or copy `/<name>` in the jail.
    async fn import(&self, host: &Path, name: &str) -> Result<String, BackendError> {
        match &self.jail {
            Some(j) => j.bring_in(host, name).await,
            None => Ok(host.display().to_string()),
        }
    }

    /// Like [`Running::import`] for a file the VM writes and that must
    /// outlive it (a profile): given to the jail's uid, and only ever a hard
    /// link, never a copy that the session's writes would miss.
    async fn import_writable(&self, host: &Path, name: &str) -> Result<String, BackendError> {
        match &self.jail {
            Some(j) => {
                j.give(host)?;
                j.link_in(host, name)
            }
            None => Ok(host.display().to_string()),
        }
    }

    /// Gives `path` to the jail's uid and gid; nothing to do unjailed.
    fn give(&self, path: &Path) -> Result<(), BackendError> {
        match &self.jail {
            Some(j) => j.give(path),
            None => Ok(()),
        }
    }

    /// Kills the process and removes everything it held but the logs.
    async fn kill_and_clean(mut self) {
        self.kill().await;
        let _ = self.cleanup().await;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    async fn cleanup(&self) -> Result<(), BackendError> {
        let mut errors = Vec::new();
        if let Some(rec) = &self.rec {
            // cgroup (and whatever still runs in it), veth, namespace, elements.
            let (_, errs) = self.host.teardown(rec).await;
            errors.extend(errs);
        }
        match &self.jail {
            Some(j) => {
                // Firecracker's log outlives the jail, beside the console.
                let log = j.host_path(FIRECRACKER_LOG);
                if log.exists() {
                    let _ = std::fs::copy(&log, self.dir.join(FIRECRACKER_LOG));
                }
                if let Err(e) = j.remove() {
                    errors.push(e.to_string());
                }
            }
            None => remove_runtime_files(&self.dir),
        }
        if errors.is_empty() {
            if let Some(rec) = &self.rec {
                self.host.forget(&rec.id)?;
            }
            Ok(())
        } else {
            Err(BackendError::Cleanup(format!(
                "session {}: {}",
                self.id,
                errors.join("; ")
            )))
        }
    }
}

/// Removes what a VM had in its session directory (sockets, drives, metrics);
/// the console and Firecracker logs stay for the server, which removes the
/// directory itself.
fn remove_runtime_files(dir: &Path) {
    for name in [API_SOCKET, WRITABLE_DRIVE, METRICS_FILE, VSOCK_SOCKET] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

/// A running microVM.
struct FcInstance {
    pid: Option<u32>,
    exited: watch::Receiver<Option<InstanceExit>>,
    requested: Arc<std::sync::atomic::AtomicBool>,
    client: FirecrackerClient,
    state: Arc<Mutex<Option<Running>>>,
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    async fn readiness(&self) -> Readiness {
        let mut checks = Vec::new();
        let mut check = |name: &str, r: Result<String, String>| {
            checks.push(Check {
                name: name.to_owned(),
                ok: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
            });
        };
        check(
            "firecracker binary",
            self.resolve_binary()
                .map(|p| p.display().to_string())
                .map_err(|e| e.to_string()),
        );
        if self.config.jailer.is_some() {
            check(
                "jailer binary",
                self.resolve_jailer()
                    .map(|p| p.unwrap_or_default().display().to_string())
                    .map_err(|e| e.to_string()),
            );
        }
        check(
            "kvm",
            if self.config.probe_kvm {
                kvm::probe(&self.config.kvm_device).and_then(|()| {
                    match kvm::linux_guests_unsupported(Path::new("/sys/module")) {
                        Some(why) => Err(why),
                        None => Ok(format!(
                            "{} runs a probe guest",
                            self.config.kvm_device.display()
                        )),
                    }
                })
            } else {
                Ok("not probed (probe_kvm = false)".into())
            },
        );
        check(
            "guest kernel",
            kernel::check_kernel(
                &self.config.kernel,
                self.config.initramfs.as_deref(),
                self.config.kernel_config.as_deref(),
            )
            .map(|k| match k.config_report {
                Some(r) if !r.warnings.is_empty() => format!(
                    "{} (warnings: {})",
                    k.vmlinux.display(),
                    r.warnings.join("; ")
                ),
                _ => k.vmlinux.display().to_string(),
            })
            .map_err(|e| e.to_string()),
        );
        check(
            "root file system",
            check_rootfs(&self.config.rootfs)
                .map(|()| self.config.rootfs.display().to_string())
                .map_err(|e| e.to_string()),
        );
        check(
            "mkfs.ext4",
            std::process::Command::new("mkfs.ext4")
                .arg("-V")
                .output()
                .map(|_| "found".to_owned())
                .map_err(|e| format!("mkfs.ext4: {e} (install e2fsprogs)")),
        );
        if let Some(dir) = &self.config.snapshot_dir {
            check(
                "snapshot",
                Ok(match self.snapshot() {
                    Some(_) => format!("sessions restore from {}", dir.display()),
                    None => format!("no snapshot in {} yet; sessions boot", dir.display()),
                }),
            );
        }
        checks.extend(self.host.checks().await);
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    fn agent_socket(&self, id: &SessionId, session_dir: &Path) -> PathBuf {
        // Firecracker connects the guest's port to `<uds_path>_<port>`, and
        // a jailed one sees only its jail.
        let dir = match self.jail_for(id) {
            Some(Ok(jail)) => jail.root,
            _ => session_dir.to_path_buf(),
        };
        vsock::guest_port_socket(&dir.join(VSOCK_SOCKET), AGENT_VSOCK_PORT)
    }

    fn agent_peer_uid(&self, id: &SessionId) -> Option<u32> {
        // With hybrid vsock the guest's connection to the agent port is made
        // on the host by the Firecracker process, so the peer is Firecracker,
        // not the guest: jailed, the session's own uid (from its record);
        // else the uid this server started it as (its own, root in every
        // supported setup). Anything in the guest is behind the VMM and never
        // appears as a host peer.
        match &self.config.jailer {
            Some(_) => sandcast_host::state::Record::load(self.host.state_dir(), id.as_str())?.uid,
            // SAFETY: geteuid(2) cannot fail.
            None => Some(unsafe { libc::geteuid() }),
        }
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<Box<dyn Instance>, BackendError> {
        let expected = self.agent_socket(&spec.id, &spec.session_dir);
        if spec.agent_socket != expected {
            return Err(BackendError::InvalidSpec(format!(
                "agent socket {} is not where the VM's vsock delivers the agent ({})",
                spec.agent_socket.display(),
                expected.display()
            )));
        }
        // A restored VM keeps the template's drives; a profile needs a
        // drive of its own, so a session with one boots.
        let snapshot = self.snapshot().filter(|_| spec.home.is_none());
        let mut running = self.launch(spec, snapshot.as_ref()).await?;
        let (tx, rx) = watch::channel(None);
        let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut child = running.child.take().expect("launch leaves a child");
        let client = running.client.clone();
        let pid = running.pid;
        let dir = running.dir.clone();
        let state = Arc::new(Mutex::new(Some(running)));
        let req = requested.clone();
        let st = state.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let requested = req.load(std::sync::atomic::Ordering::SeqCst);
            let how = match status {
                Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    (Some(c), _) => format!("exit code {c}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "unknown exit".into(),
                },
                Err(e) => format!("cannot wait: {e}"),
            };
            // A VM that died on its own still leaves nothing behind (and
            // its log is then beside the console).
            let taken = if requested {
                None
            } else {
                st.lock().unwrap().take()
            };
            if let Some(r) = taken {
                let _ = r.cleanup().await;
            }
            let reason = if requested {
                format!("microVM stopped on request (firecracker {how})")
            } else {
                // Firecracker exits 0 even after a guest's internal error:
                // its log says what happened.
                let logged = match last_error(&dir) {
                    Some(e) => format!("; firecracker logged: {e}"),
                    None => String::new(),
                };
                format!(
                    "firecracker ended unexpectedly ({how}){logged}; console: {}",
                    console_tail(&dir, 5)
                )
            };
            let _ = tx.send(Some(InstanceExit { reason, requested }));
        });
        Ok(Box::new(FcInstance {
            pid,
            exited: rx,
            requested,
            client,
            state,
        }))
    }

    async fn reap(&self, keep: &[SessionId]) -> Result<Vec<String>, BackendError> {
        let keep: std::collections::HashSet<String> =
            keep.iter().map(|k| k.as_str().to_string()).collect();
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        let (records, bad) = self.host.records();
        for p in bad {
            if std::fs::remove_file(&p).is_ok() {
                removed.push(format!("unreadable record {}", p.display()));
            }
        }
        for rec in records.iter().filter(|r| !keep.contains(&r.id)) {
            if let Ok(record) = serde_json::from_value::<Record>(rec.backend.clone()) {
                let marker = record
                    .marker
                    .clone()
                    .unwrap_or_else(|| record.session_dir.join(API_SOCKET).display().to_string());
                if let Some(pid) = rec.pid
                    && is_our_firecracker(pid, &marker)
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    removed.push(format!("firecracker process {pid}"));
                }
                match &record.jail {
                    Some(jail) => {
                        let _ = std::fs::remove_dir_all(jail);
                        removed.push(format!("jail {}", jail.display()));
                    }
                    None => {
                        remove_runtime_files(&record.session_dir);
                        removed.push(format!("runtime files in {}", record.session_dir.display()));
                    }
                }
            }
            // cgroup first inside: removing it kills what is still there.
            let (done, errs) = self.host.teardown(rec).await;
            removed.extend(done);
            if errs.is_empty() {
                self.host.forget(&rec.id)?;
            }
            errors.extend(errs);
        }
        let (more, errs) = self.host.reap_unrecorded(&keep).await;
        removed.extend(more);
        errors.extend(errs);
        if self.host.check_tools().is_ok()
            && let Err(e) = self.host.rebuild(Some(&keep)).await
        {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(removed)
        } else {
            Err(BackendError::Cleanup(format!(
                "removed [{}] but: {}",
                removed.join(", "),
                errors.join("; ")
            )))
        }
    }

    async fn release(&self) -> Result<Vec<String>, BackendError> {
        // Whatever a failed stop left goes first; the table and cgroup
        // parent can only go when no session is recorded.
        let mut lines = self.reap(&[]).await?;
        lines.extend(self.host.release().await?);
        Ok(lines)
    }
}

/// Whether `pid` is still a Firecracker of ours (pids are reused): its
/// command line has the session's `marker` argument.
fn is_our_firecracker(pid: u32, marker: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline_has(&cmdline, marker)
}

/// Whether a NUL-separated command line has `marker`. A jailed session's
/// marker is `--id=<jail id>`, which the real jailer passes on to
/// Firecracker as two arguments, `--id <jail id>`.
fn cmdline_has(cmdline: &[u8], marker: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if args.contains(&marker.as_bytes()) {
        return true;
    }
    marker.strip_prefix("--id=").is_some_and(|id| {
        args.windows(2)
            .any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
    })
}

#[async_trait]
impl Instance for FcInstance {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn exited(&self) -> watch::Receiver<Option<InstanceExit>> {
        self.exited.clone()
    }

    async fn stop(&self, grace: Duration) -> Result<(), BackendError> {
        self.requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut exited = self.exited.clone();
        let running = exited.borrow().is_none();
        if running {
            // A clean guest shutdown first; the guest may lack an i8042
            // keyboard, so the kill below is the guarantee.
            let _ = self.client.action(ActionType::SendCtrlAltDel).await;
            let ended = tokio::time::timeout(grace, exited.wait_for(|e| e.is_some()))
                .await
                .is_ok();
            if !ended && let Some(pid) = self.pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let gone = exited.wait_for(|e| e.is_some()).await.is_ok();
                debug_assert!(gone);
            }
        }
        let running = self.state.lock().unwrap().take();
        match running {
            Some(r) => r.cleanup().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host layer with its state and lock in a scratch directory, and
    /// the guest's DNS server set to 1.1.1.1 and 9.9.9.9.
    fn test_host() -> Arc<Host> {
        let dir = std::env::temp_dir().join(format!("sc-fc-unit-{}", std::process::id()));
        let cfg = HostConfig {
            dns: vec!["1.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
            lock_dir: dir.join("lock"),
            ..HostConfig::default()
        };
        let host = Arc::new(Host::new(&cfg, &dir.join("run"), "fc-").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        host
    }

    #[test]
    fn agent_socket_is_the_vsock_port_socket() {
        let b = FirecrackerBackend {
            config: FirecrackerConfig::default(),
            kernel: GuestKernel {
                vmlinux: "/k".into(),
                initramfs: None,
                config_report: None,
            },
            host: test_host(),
        };
        let id = SessionId::new("ab").unwrap();
        assert_eq!(
            b.agent_socket(&id, Path::new("/s/x")),
            PathBuf::from("/s/x/vsock.sock_1024")
        );
        // A jailed Firecracker's vsock sockets are in its jail.
        let jailed = FirecrackerBackend {
            config: FirecrackerConfig {
                jailer: Some(JailerConfig::default()),
                ..FirecrackerConfig::default()
            },
            kernel: b.kernel.clone(),
            host: b.host.clone(),
        };
        assert_eq!(
            jailed.agent_socket(&id, Path::new("/s/x")),
            PathBuf::from("/srv/jailer/firecracker/fc-ab/root/vsock.sock_1024")
        );
        // The agent's connections come from Firecracker: the session's own
        // uid when jailed (none for a session without a record: every peer
        // is refused), or this process's own uid when it is not jailed.
        assert_eq!(jailed.agent_peer_uid(&id), None);
        // SAFETY: geteuid(2) cannot fail.
        assert_eq!(b.agent_peer_uid(&id), Some(unsafe { libc::geteuid() }));
        let args = b.boot_args();
        assert!(
            args.ends_with("init=/usr/local/bin/sandcast-agent -- --vm --connect vsock:2:1024"),
            "{args}"
        );
        assert!(
            args.contains(
                "ip=172.16.0.2::172.16.0.1:255.255.255.252:sandcast:eth0:off:1.1.1.1:9.9.9.9 "
            ),
            "{args}"
        );
    }

    #[test]
    fn mmds_holds_the_id_and_the_token_hash_never_the_token() {
        let id = SessionId::new("s1").unwrap();
        let token = AgentToken::new("the-secret-token");
        let v = mmds_contents(&id, Some(&token));
        assert_eq!(v["sandcast"]["session_id"], "s1");
        assert_eq!(v["sandcast"]["agent_vsock_port"], AGENT_VSOCK_PORT);
        assert_eq!(v["sandcast"]["agent_token_sha256"], token.sha256_hex());
        assert_eq!(token.sha256_hex().len(), 64);
        assert!(!v.to_string().contains("the-secret-token"), "{v}");
        // A template VM gets no configuration, so no token either.
        let v = mmds_contents(&id, None);
        assert!(v["sandcast"].get("agent_token_sha256").is_none(), "{v}");
    }

    #[test]
    fn guest_macs_are_unicast_and_local() {
        let mac = guest_mac(&SessionId::new("abc").unwrap());
        assert!(mac.starts_with("06:fc:"), "{mac}");
        assert_eq!(mac.len(), 17);
    }

    #[test]
    fn a_jailed_firecracker_is_known_by_its_id_in_either_form() {
        let real = b"/firecracker\0--id\0fc-ab\0--api-sock\0/firecracker.sock\0";
        assert!(cmdline_has(real, "--id=fc-ab"));
        assert!(cmdline_has(b"/firecracker\0--id=fc-ab\0", "--id=fc-ab"));
        assert!(!cmdline_has(real, "--id=fc-abc"));
        assert!(!cmdline_has(b"/bin/sleep\0fc-ab\0--id\0", "--id=fc-ab"));
        assert!(cmdline_has(b"fc\0--api-sock\0/s/api.sock\0", "/s/api.sock"));
    }

    #[test]
    fn the_last_logged_error_is_found() {
        let t = std::env::temp_dir().join(format!("sc-fc-lasterr-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        assert_eq!(last_error(&t), None);
        std::fs::write(
            t.join(FIRECRACKER_LOG),
            "2026 [fc:main:WARN] slow\n2026 [fc:fc_vcpu 0:ERROR:vstate] Unexpected exit reason on vcpu run: InternalError\n2026 [fc:main:INFO] exiting\n",
        )
        .unwrap();
        assert_eq!(
            last_error(&t).unwrap(),
            "2026 [fc:fc_vcpu 0:ERROR:vstate] Unexpected exit reason on vcpu run: InternalError"
        );
        std::fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn the_console_tail_is_the_guests_not_the_vmms() {
        let t = std::env::temp_dir().join(format!("sc-fc-console-{}", std::process::id()));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join(CONSOLE_LOG),
            "2026-12-07T03:40:43.668 [s-1:main] Listening on API socket\n\
             [    0.000000] Linux version 6.1\n\
             2026-12-07T03:40:43.678 [s-1:fc_api] The API server received a Put request on \"/mmds\" with body \"{}\".\n\
             2026-12-07T03:40:43.700 [s-1:fc_vcpu 0] Received KVM_EXIT_SHUTDOWN signal\n\
             sandcast tiny guest: hello\n",
        )
        .unwrap();
        assert_eq!(
            console_tail(&t, 5),
            "[    0.000000] Linux version 6.1 | sandcast tiny guest: hello"
        );
        std::fs::remove_dir_all(&t).unwrap();
    }
}

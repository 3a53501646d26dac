//! The host side of session isolation, one layer for every backend: each
//! session's network namespace and veth pair, its address from one
//! configured pool, the nftables egress policy, its cgroup (v1 or v2), the
//! on-disk record of all of it, and reap.
//!
//! A backend adds only what is its own: the sandbox runs bubblewrap inside
//! the namespace and cgroup; the Firecracker backend adds a TAP device in
//! the namespace and runs its VMM there.
//!
//! # Instances
//!
//! Every server is an *instance*, named by four hex digits derived from its
//! data directory ([`instance_id`]). Everything made here carries it: the
//! namespace `<prefix>-<instance>-<id>`, the veth `sc-<instance><hash>` and
//! its alias, the table `inet <prefix>_<instance>`, the cgroup parent
//! `<cgroup_parent>/<instance>` and the records (in the backend's state
//! directory, which is the instance's). Reap and table rewrites touch only
//! the instance's own; the address pool is shared, allocated under one
//! cross-process lock (`<lock_dir>/host.lock`) and checked against every
//! address and host route in use, so instances never collide.
//!
//! # The network
//!
//! The session end of the veth (`eth0` in the namespace) holds the second
//! address of a /30 from the pool; the host end holds no address (see
//! ARCHITECTURE.md): a route and static neighbours on both ends suffice.
//! [`policy`] describes the firewall.

pub mod cgroup;
pub mod image;
pub mod net;
pub mod policy;
pub mod state;
pub mod uid;

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use sandcast_backend::{BackendError, Check, Egress, Limits};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::cgroup::{CgroupPlan, Layout, SessionCgroup};
use crate::policy::{FirewallEntry, Policy};
use crate::state::Record;

/// How long killing and emptying a cgroup may take before it is an error.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Host isolation settings shared by both backends (`[host]` in the
/// server's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// The instance id (four lowercase hex digits). The server sets it from
    /// its data directory; empty means derived from the backend's state
    /// directory.
    #[serde(skip)]
    pub instance: String,
    /// Names namespaces (`<prefix>-<instance>-<id>`), the nft table and veth
    /// aliases: 1-16 lowercase letters or digits, starting with a letter.
    pub name_prefix: String,
    /// IPv4 pool from which each session of every backend gets a /30.
    pub subnet: String,
    /// Networks sessions may reach although they are private or reserved
    /// (for example an internal proxy), as CIDRs; open to sessions with
    /// egress `"internet"` and to allow lists that name them.
    pub egress_allow: Vec<String>,
    /// DNS servers for sessions; empty means the host's upstream servers
    /// (never its loopback stub), else public ones. Sessions with any egress
    /// reach exactly these on port 53, even on a private address.
    pub dns: Vec<IpAddr>,
    /// Parent of the instances' session cgroups, relative to each
    /// hierarchy's root.
    pub cgroup_parent: String,
    /// Where cgroup file systems are mounted.
    pub cgroup_root: PathBuf,
    /// Directory of the lock that serialises address allocation and
    /// firewall changes between all instances on the host.
    pub lock_dir: PathBuf,
    /// The `ip` binary (iproute2).
    pub ip: PathBuf,
    /// The `nft` binary (nftables).
    pub nft: PathBuf,
    /// Host uids for sessions, first and last: each session of either
    /// backend runs as a uid of its own (see [`uid`]).
    pub uid_range: [u32; 2],
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            instance: String::new(),
            name_prefix: "sandcast".into(),
            subnet: "100.64.0.0/16".into(),
            egress_allow: Vec::new(),
            dns: Vec::new(),
            cgroup_parent: "sandcast".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            lock_dir: "/run/sandcast".into(),
            ip: "/usr/sbin/ip".into(),
            nft: "/usr/sbin/nft".into(),
            uid_range: [2_000_000, 2_065_535],
        }
    }
}

/// The instance id of a server with data directory `dir`: four hex digits
/// of the SHA-256 of its canonical path (short enough to fit every veth
/// name; two data directories share one with a chance of 1 in 65536).
pub fn instance_id(dir: &Path) -> String {
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("{:02x}{:02x}", digest[0], digest[1])
}

/// Checks that `path` is an executable file, naming the package that has it.
pub fn check_tool(path: &Path, package: &str) -> Result<(), BackendError> {
    let ok = std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(BackendError::NotReady(format!(
            "{} not found at {}: apt-get install {package}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            path.display(),
        )))
    }
}

/// Held while allocating addresses or changing the firewall; an flock, so
/// it orders every instance and backend on the host.
pub struct HostLock {
    _file: std::fs::File,
}

/// One instance's host isolation layer.
#[derive(Debug)]
pub struct Host {
    cfg: HostConfig,
    instance: String,
    state_dir: PathBuf,
    leaf_prefix: String,
    subnet: Ipv4Net,
    policy: Policy,
    layout: Result<Layout, String>,
    ready: OnceCell<()>,
}

impl Host {
    /// Validates `cfg` and prepares the directories. Records live under
    /// `state_dir`; session cgroups are named `<leaf_prefix><id>`. Host
    /// problems (tools, cgroups) do not fail here; they show in
    /// [`Host::checks`] and in the error of [`Host::create`].
    pub fn new(
        cfg: &HostConfig,
        state_dir: &Path,
        leaf_prefix: &str,
    ) -> Result<Host, BackendError> {
        let bad = |m: String| Err(BackendError::InvalidSpec(m));
        let p = &cfg.name_prefix;
        if p.is_empty()
            || p.len() > 16
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return bad(format!(
                "name_prefix {p:?} must be 1-16 lowercase letters or digits, starting with a letter"
            ));
        }
        let parent = Path::new(&cfg.cgroup_parent);
        if cfg.cgroup_parent.is_empty()
            || parent.is_absolute()
            || parent
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return bad(format!(
                "cgroup_parent {:?} must be a relative path like \"sandcast\"",
                cfg.cgroup_parent
            ));
        }
        for (name, dir) in [("state_dir", state_dir), ("lock_dir", &cfg.lock_dir)] {
            if !dir.is_absolute() {
                return bad(format!("{name} {} must be absolute", dir.display()));
            }
        }
        let instance = if cfg.instance.is_empty() {
            instance_id(state_dir)
        } else {
            cfg.instance.clone()
        };
        if instance.len() != 4
            || !instance
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return bad(format!(
                "instance id {instance:?} is not four lowercase hex digits"
            ));
        }
        uid::check_range(cfg.uid_range).map_err(BackendError::InvalidSpec)?;
        let subnet = net::parse_subnet(&cfg.subnet)?;
        let open = cfg
            .egress_allow
            .iter()
            .map(|d| {
                d.parse::<IpNet>()
                    .ok()
                    .or_else(|| d.parse::<IpAddr>().ok().map(IpNet::from))
                    .map(|n| n.trunc())
                    .ok_or_else(|| {
                        BackendError::InvalidSpec(format!(
                            "egress_allow entry {d:?} is not a CIDR like 10.20.0.0/16"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(n) = open.iter().find(|n| match n {
            IpNet::V4(v4) => v4.contains(&subnet) || subnet.contains(v4),
            IpNet::V6(_) => false,
        }) {
            return bad(format!(
                "egress_allow entry {n} overlaps the session pool {subnet}: sessions never reach each other"
            ));
        }
        let mkdir = |d: &Path, mode: u32| -> Result<(), BackendError> {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
                .map_err(|e| BackendError::io(format!("creating {}", d.display()), e))
        };
        mkdir(state_dir, 0o700)?;
        mkdir(&state::dir(state_dir), 0o700)?;
        mkdir(&cfg.lock_dir, 0o755)?;
        mkdir(&uid::claims_dir(&cfg.lock_dir), 0o700)?;
        let host_resolv: Vec<String> = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect();
        let refs: Vec<&str> = host_resolv.iter().map(String::as_str).collect();
        let resolvers = net::resolvers(&cfg.dns, &refs, subnet);
        let policy = Policy {
            table: net::table_name(&cfg.name_prefix, &instance),
            veth_prefix: net::veth_prefix(&instance),
            subnet,
            open,
            resolvers,
        };
        Ok(Host {
            layout: Layout::detect(&cfg.cgroup_root).map_err(|e| e.to_string()),
            cfg: cfg.clone(),
            instance,
            state_dir: state_dir.to_path_buf(),
            leaf_prefix: leaf_prefix.to_string(),
            subnet,
            policy,
            ready: OnceCell::new(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Where the records live.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The server-wide part of the egress policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The session address pool.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The DNS servers sessions use (and may reach).
    pub fn resolvers(&self) -> &[IpAddr] {
        &self.policy.resolvers
    }

    /// The resolv.conf sessions get.
    pub fn resolv_conf(&self) -> String {
        net::resolv_conf(&self.policy.resolvers)
    }

    /// The cgroup layout, or why there is none.
    pub fn layout(&self) -> Result<&Layout, BackendError> {
        self.layout
            .as_ref()
            .map_err(|e| BackendError::NotReady(e.clone()))
    }

    /// This instance's cgroup parent: `<cgroup_parent>/<instance>`.
    pub fn cgroup_parent(&self) -> String {
        format!("{}/{}", self.cfg.cgroup_parent, self.instance)
    }

    /// The cgroup of session `id` (not created).
    pub fn cgroup(&self, id: &str) -> Result<SessionCgroup, BackendError> {
        Ok(self
            .layout()?
            .session(&self.cgroup_parent(), &format!("{}{id}", self.leaf_prefix)))
    }

    /// The cgroup of session `id` as a plan (for a jailer that makes it).
    pub fn cgroup_plan(&self, id: &str, limits: &Limits) -> Result<CgroupPlan, BackendError> {
        Ok(self.layout()?.plan(
            &self.cgroup_parent(),
            &format!("{}{id}", self.leaf_prefix),
            limits,
        ))
    }

    /// Makes this instance's cgroup parent (for a jailer that makes the
    /// session's cgroup under it).
    pub async fn prepare_cgroup_parent(&self) -> Result<(), BackendError> {
        let layout = self.layout()?.clone();
        let parent = self.cgroup_parent();
        tokio::task::spawn_blocking(move || layout.prepare_parent(&parent))
            .await
            .expect("cgroup task")
    }

    /// Limits the memory of all this instance's sessions together (the
    /// memory limit of its cgroup parent), making the parent when missing.
    pub async fn limit_parent_memory(&self, mib: u64) -> Result<(), BackendError> {
        let layout = self.layout()?.clone();
        let parent = self.cgroup_parent();
        tokio::task::spawn_blocking(move || layout.limit_parent_memory(&parent, mib))
            .await
            .expect("cgroup task")
    }

    /// Creates a session's cgroup with its limits (a no-op plan check first).
    pub async fn create_cgroup(
        &self,
        id: &str,
        limits: &Limits,
    ) -> Result<SessionCgroup, BackendError> {
        cgroup::validate_limits(limits)?;
        let cg = self.cgroup(id)?;
        let parent = self.cgroup_parent();
        let (cg2, limits) = (cg.clone(), *limits);
        tokio::task::spawn_blocking(move || cg2.create(&parent, &limits))
            .await
            .expect("cgroup task")?;
        Ok(cg)
    }

    /// The network namespace name of session `id`.
    pub fn netns_name(&self, id: &str) -> String {
        net::netns_name(&self.cfg.name_prefix, &self.instance, id)
    }

    /// `/run/netns/<name>` of session `id`.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        Path::new("/run/netns").join(self.netns_name(id))
    }

    /// The host-side veth of session `id`.
    pub fn veth_name(&self, id: &str) -> String {
        net::veth_name(&self.instance, id)
    }

    /// Whether `ip` and `nft` are installed.
    pub fn check_tools(&self) -> Result<(), BackendError> {
        check_tool(&self.cfg.ip, "iproute2")?;
        check_tool(&self.cfg.nft, "nftables")
    }

    /// Takes the host-wide lock.
    pub async fn lock(&self) -> Result<HostLock, BackendError> {
        let path = self.cfg.lock_dir.join("host.lock");
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| BackendError::io(format!("opening {}", path.display()), e))?;
            // SAFETY: flock(2) on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(BackendError::io(
                    format!("locking {}", path.display()),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(HostLock { _file: file })
        })
        .await
        .expect("lock task")
    }

    /// One-time host preparation: tools present, forwarding on, this
    /// instance's table built from its records.
    pub async fn ensure(&self) -> Result<(), BackendError> {
        self.ready
            .get_or_try_init(|| async {
                self.check_tools()?;
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| {
                    BackendError::io("setting net.ipv4.ip_forward=1 (needed for NAT egress)", e)
                })?;
                self.rebuild(None).await
            })
            .await
            .map(|_| ())
    }

    /// Replaces this instance's table with one listing its recorded sessions
    /// (only those in `keep` when given).
    pub async fn rebuild(&self, keep: Option<&HashSet<String>>) -> Result<(), BackendError> {
        let _lock = self.lock().await?;
        let (records, _) = Record::load_all(&self.state_dir);
        let entries: Vec<FirewallEntry> = records
            .iter()
            .filter(|r| keep.is_none_or(|k| k.contains(&r.id)))
            .map(|r| FirewallEntry {
                veth: r.veth.clone(),
                egress: r.egress.clone(),
            })
            .collect();
        net::run(
            &self.cfg.nft,
            &["-f", "-"],
            Some(&self.policy.ruleset(&entries)),
        )
        .await?;
        Ok(())
    }

    /// Every readable record of this instance, and the unreadable files.
    pub fn records(&self) -> (Vec<Record>, Vec<PathBuf>) {
        Record::load_all(&self.state_dir)
    }

    /// Writes a record (after the backend added what it made).
    pub fn save(&self, rec: &Record) -> Result<(), BackendError> {
        rec.save(&self.state_dir)
    }

    /// Removes the record of `id`; call after everything it lists is gone.
    pub fn forget(&self, id: &str) -> Result<(), BackendError> {
        Record::delete(&self.state_dir, id)
    }

    /// Records session `id`, allocates its address block and builds its
    /// namespace, veth and firewall elements. The cgroup is only planned
    /// (its directories are in the record); the backend makes it. On error
    /// nothing is left.
    pub async fn create(
        &self,
        id: &str,
        egress: &Egress,
        files_dir: PathBuf,
        backend: serde_json::Value,
    ) -> Result<Record, BackendError> {
        let cg = self.cgroup(id)?;
        self.ensure().await?;
        let lock = self.lock().await?;
        let netns = self.netns_name(id);
        if Record::exists(&self.state_dir, id) || Path::new("/run/netns").join(&netns).exists() {
            return Err(BackendError::Start(format!(
                "session {id} is already running in this instance (stop or reap it first)"
            )));
        }
        let (records, _) = Record::load_all(&self.state_dir);
        let used: BTreeSet<u32> = records.iter().map(|r| r.block).collect();
        let live = net::host_ipv4_in_use(&self.cfg.ip).await?;
        let block = net::allocate(self.subnet, &used, &live)?;
        let rec = Record {
            id: id.to_string(),
            netns,
            veth: self.veth_name(id),
            block: block.index,
            host_addr: block.host,
            session_addr: block.session,
            egress: egress.clone(),
            cgroup_dirs: cg.dirs().to_vec(),
            files_dir,
            pid: None,
            backend,
            uid: None,
        };
        // The record (with its uid) is saved under the uid claims' lock,
        // which keeps the claim live.
        let (range, claims, state_dir) = (
            self.cfg.uid_range,
            uid::claims_dir(&self.cfg.lock_dir),
            self.state_dir.clone(),
        );
        let rec = tokio::task::spawn_blocking(move || {
            let mut rec = rec;
            let id = rec.id.clone();
            uid::allocate(range, &claims, &state_dir, &id, |u| {
                rec.uid = Some(u);
                rec.save(&state_dir)
            })?;
            Ok::<_, BackendError>(rec)
        })
        .await
        .expect("uid task")?;
        let made = self.setup_network(&rec).await;
        drop(lock);
        if let Err(e) = made {
            let (_, errors) = self.teardown(&rec).await;
            if errors.is_empty() {
                let _ = self.forget(id);
            } else {
                tracing::error!(
                    session = id,
                    "cleanup after failed start: {}",
                    errors.join("; ")
                );
            }
            return Err(e);
        }
        Ok(rec)
    }

    async fn setup_network(&self, rec: &Record) -> Result<(), BackendError> {
        let ip = &self.cfg.ip;
        net::run(ip, &["netns", "add", &rec.netns], None).await?;
        let alias = net::veth_alias(&self.cfg.name_prefix, &self.instance, &rec.id);
        let (host_mac, session_mac) = net::block_macs(rec.block);
        let host_side = format!(
            "link add {veth} address {host_mac} type veth peer name {inner} address {session_mac} netns {ns}\n\
             link set {veth} alias {alias}\n",
            veth = rec.veth,
            inner = net::INNER_IF,
            ns = rec.netns
        );
        net::run(ip, &["-batch", "-"], Some(&host_side)).await?;
        // No IPv6 on the host end: a session must not reach the host over
        // link-local addresses either, and a host address would be a network
        // change to every program on the host.
        let v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", rec.veth);
        if Path::new(&v6).exists() {
            std::fs::write(&v6, "1").map_err(|e| BackendError::io(format!("writing {v6}"), e))?;
        }
        // Into the firewall sets before the link carries anything.
        let entry = FirewallEntry {
            veth: rec.veth.clone(),
            egress: rec.egress.clone(),
        };
        net::run(
            &self.cfg.nft,
            &["-f", "-"],
            Some(&self.policy.add_elements(&entry)),
        )
        .await?;
        // The host end carries no address, only a route and a static
        // neighbour: adding or removing an address on the host is a network
        // change to every program there (Chromium aborts its requests in
        // flight), and the session's gateway needs no host address to work.
        let up = format!(
            "link set {veth} up\n\
             route add {session}/32 dev {veth}\n\
             neigh replace {session} lladdr {session_mac} dev {veth} nud permanent\n",
            veth = rec.veth,
            session = rec.session_addr,
        );
        net::run(ip, &["-batch", "-"], Some(&up)).await?;
        let inside = format!(
            "link set lo up\n\
             addr add {a}/30 dev {i}\n\
             link set {i} up\n\
             neigh replace {gw} lladdr {host_mac} dev {i} nud permanent\n\
             route add default via {gw}\n",
            a = rec.session_addr,
            i = net::INNER_IF,
            gw = rec.host_addr
        );
        net::run(ip, &["-n", &rec.netns, "-batch", "-"], Some(&inside)).await?;
        Ok(())
    }

    /// Removes what a record lists on the host: cgroup (and every process in
    /// it), veth, namespace, firewall elements. Returns what was removed and
    /// what could not be; the record stays (see [`Host::forget`]).
    pub async fn teardown(&self, rec: &Record) -> (Vec<String>, Vec<String>) {
        let mut done = Vec::new();
        let mut errors = Vec::new();
        if let Ok(layout) = self.layout()
            && !rec.cgroup_dirs.is_empty()
        {
            let cg = layout.from_dirs(rec.cgroup_dirs.clone());
            let n = cg.pids().len();
            let existed = cg.exists();
            match tokio::task::spawn_blocking(move || cg.destroy(KILL_TIMEOUT))
                .await
                .expect("cgroup task")
            {
                Ok(()) if existed => done.push(format!(
                    "killed {n} process(es) and removed cgroup of {}",
                    rec.id
                )),
                Ok(()) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        let _lock = match self.lock().await {
            Ok(l) => l,
            Err(e) => {
                errors.push(e.to_string());
                return (done, errors);
            }
        };
        if Path::new("/sys/class/net").join(&rec.veth).exists() {
            match net::run(&self.cfg.ip, &["link", "del", &rec.veth], None).await {
                Ok(_) => done.push(format!("removed veth {}", rec.veth)),
                // Deleting the netns may have taken the pair with it.
                Err(_) if !Path::new("/sys/class/net").join(&rec.veth).exists() => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
        if Path::new("/run/netns").join(&rec.netns).exists() {
            match net::run(&self.cfg.ip, &["netns", "del", &rec.netns], None).await {
                Ok(_) => done.push(format!("removed netns {}", rec.netns)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let entry = FirewallEntry {
            veth: rec.veth.clone(),
            egress: rec.egress.clone(),
        };
        if let Err(e) = net::run(
            &self.cfg.nft,
            &["-f", "-"],
            Some(&self.policy.delete_elements(&entry)),
        )
        .await
        {
            // No table (never built, or removed by hand) holds no element.
            if !e.to_string().contains("No such file or directory") {
                errors.push(e.to_string());
            }
        }
        // Last: until every process of it is gone, its uid stays claimed.
        if let Some(u) = rec.uid
            && errors.is_empty()
            && let Err(e) = uid::release(
                &uid::claims_dir(&self.cfg.lock_dir),
                u,
                &self.state_dir,
                &rec.id,
            )
        {
            errors.push(e);
        }
        (done, errors)
    }

    /// Removes what this instance keeps on the host between sessions (its
    /// firewall table and cgroup parent) when no session of it is recorded:
    /// the last step of a server's shutdown. Sessions recorded (a teardown
    /// that failed) keep both, so their rules stay closed until a reap. The
    /// next start makes them again; this `Host` is not used after it.
    pub async fn release(&self) -> Result<Vec<String>, BackendError> {
        let _lock = self.lock().await?;
        let (records, _) = Record::load_all(&self.state_dir);
        if !records.is_empty() {
            return Ok(Vec::new());
        }
        let mut done = Vec::new();
        let table = &self.policy.table;
        match net::run(&self.cfg.nft, &["delete", "table", "inet", table], None).await {
            Ok(_) => done.push(format!("removed nftables table inet {table}")),
            // Never built (no session ever started), or removed by hand.
            Err(e) if e.to_string().contains("No such file or directory") => {}
            Err(e) => return Err(e),
        }
        if let Ok(layout) = self.layout() {
            for dir in layout.parent_dirs(&self.cgroup_parent()) {
                // Only an empty cgroup can go; a busy one stays for the reap.
                if std::fs::remove_dir(&dir).is_ok() {
                    done.push(format!("removed cgroup {}", dir.display()));
                }
            }
        }
        Ok(done)
    }

    /// Removes this instance's session cgroups, namespaces and veths that no
    /// record lists and whose session is not in `keep` (a crash between
    /// steps of a start). Returns what was removed and what could not be.
    pub async fn reap_unrecorded(&self, keep: &HashSet<String>) -> (Vec<String>, Vec<String>) {
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        if let Ok(layout) = self.layout() {
            let parent = self.cgroup_parent();
            for name in layout.list_sessions(&parent) {
                let id = name.strip_prefix(&self.leaf_prefix).unwrap_or(&name);
                if keep.contains(id) {
                    continue;
                }
                let cg = layout.session(&parent, &name);
                let n = cg.pids().len();
                match tokio::task::spawn_blocking(move || cg.destroy(KILL_TIMEOUT))
                    .await
                    .expect("cgroup task")
                {
                    Ok(()) => {
                        lines.push(format!("killed {n} process(es) and removed cgroup of {id}"))
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        let _lock = match self.lock().await {
            Ok(l) => l,
            Err(e) => {
                errors.push(e.to_string());
                return (lines, errors);
            }
        };
        let prefix = format!("{}-{}-", self.cfg.name_prefix, self.instance);
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_prefix(&prefix) else {
                    continue;
                };
                if keep.contains(id) {
                    continue;
                }
                match net::run(&self.cfg.ip, &["netns", "del", &name], None).await {
                    Ok(_) => lines.push(format!("removed netns {name}")),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        let alias_prefix = net::veth_alias(&self.cfg.name_prefix, &self.instance, "");
        if let Ok(links) = net::links(&self.cfg.ip).await {
            for l in links {
                let Some(id) = l
                    .ifalias
                    .as_deref()
                    .and_then(|a| a.strip_prefix(&alias_prefix))
                else {
                    continue;
                };
                if keep.contains(id) {
                    continue;
                }
                match net::run(&self.cfg.ip, &["link", "del", &l.ifname], None).await {
                    Ok(_) => lines.push(format!("removed veth {}", l.ifname)),
                    Err(_) if !Path::new("/sys/class/net").join(&l.ifname).exists() => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        // Claims of sessions that have no record (a crash between claiming
        // and recording); a recorded one keeps its uid until its teardown.
        let mut held = keep.clone();
        held.extend(
            Record::load_all(&self.state_dir)
                .0
                .into_iter()
                .map(|r| r.id),
        );
        lines.extend(uid::release_others(
            &uid::claims_dir(&self.cfg.lock_dir),
            &self.state_dir,
            &held,
        ));
        (lines, errors)
    }

    /// Readiness checks of the host side: tools, nftables, cgroups, forwarding, policy.
    pub async fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let mut add = |name: &str, r: Result<String, String>| {
            checks.push(Check {
                name: name.into(),
                ok: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
            });
        };
        for (path, package, flag) in [
            (&self.cfg.ip, "iproute2", "-V"),
            (&self.cfg.nft, "nftables", "--version"),
        ] {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let r = match check_tool(path, package) {
                Err(e) => Err(e
                    .to_string()
                    .trim_start_matches("host is not ready: ")
                    .to_string()),
                Ok(()) => net::run(path, &[flag], None)
                    .await
                    .map(|v| format!("{} ({})", path.display(), v.trim()))
                    .map_err(|e| e.to_string()),
            };
            add(&name, r);
        }
        if check_tool(&self.cfg.nft, "nftables").is_ok() {
            add(
                "nftables kernel support",
                net::run(&self.cfg.nft, &["list", "tables"], None)
                    .await
                    .map(|_| "nft can list tables".to_string())
                    .map_err(|e| format!("{e} (kernel needs nf_tables, nft_masq, nft_ct)")),
            );
        }
        add(
            "cgroups",
            match self.layout() {
                Ok(l) => {
                    let unwritable: Vec<String> = l
                        .parent_dirs(&self.cgroup_parent())
                        .iter()
                        // The nearest existing ancestor is where mkdir happens.
                        .filter_map(|d| d.ancestors().find(|a| a.exists()).map(Path::to_path_buf))
                        .filter(|d| {
                            let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).ok();
                            // SAFETY: access(2) on a NUL-terminated path.
                            c.is_none_or(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0)
                        })
                        .map(|d| d.display().to_string())
                        .collect();
                    if unwritable.is_empty() {
                        Ok(format!(
                            "{}; sessions under {}",
                            l.describe(),
                            self.cgroup_parent()
                        ))
                    } else {
                        Err(format!(
                            "{}, but cannot write {}",
                            l.describe(),
                            unwritable.join(", ")
                        ))
                    }
                }
                Err(e) => Err(e.to_string()),
            },
        );
        // SAFETY: geteuid(2) cannot fail.
        let euid = unsafe { libc::geteuid() };
        add(
            "ip_forward",
            match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
                Ok(v) if v.trim() == "1" => Ok("net.ipv4.ip_forward=1".into()),
                Ok(_) if euid == 0 => {
                    Ok("net.ipv4.ip_forward=0 now; set to 1 when the first session starts".into())
                }
                Ok(_) => Err("net.ipv4.ip_forward=0 and not root to change it".into()),
                Err(e) => Err(format!("cannot read /proc/sys/net/ipv4/ip_forward: {e}")),
            },
        );
        let resolvers: Vec<String> = self
            .policy
            .resolvers
            .iter()
            .map(ToString::to_string)
            .collect();
        let open: Vec<String> = self.policy.open.iter().map(ToString::to_string).collect();
        add(
            "egress policy",
            Ok(format!(
                "instance {}: table inet {}, sessions from {}, private ranges closed{}, DNS {}",
                self.instance,
                self.policy.table,
                self.subnet,
                if open.is_empty() {
                    String::new()
                } else {
                    format!(" but {}", open.join(", "))
                },
                resolvers.join(", ")
            )),
        );
        checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_follow_the_canonical_data_dir() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let id = instance_id(&a);
        assert_eq!(id.len(), 4);
        assert!(
            id.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(id, instance_id(&t.path().join("b/../a")));
        assert_ne!(id, instance_id(&b));
    }

    #[test]
    fn config_is_validated_with_the_bad_value() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let base = HostConfig {
            lock_dir: t.path().join("lock"),
            ..HostConfig::default()
        };
        let err = |c: HostConfig| Host::new(&c, &state, "").expect_err("error").to_string();
        assert!(
            err(HostConfig {
                name_prefix: "Bad-Prefix".into(),
                ..base.clone()
            })
            .contains("\"Bad-Prefix\"")
        );
        assert!(
            err(HostConfig {
                subnet: "10.0.0.0/8x".into(),
                ..base.clone()
            })
            .contains("10.0.0.0/8x")
        );
        assert!(
            err(HostConfig {
                cgroup_parent: "../x".into(),
                ..base.clone()
            })
            .contains("\"../x\"")
        );
        assert!(
            err(HostConfig {
                egress_allow: vec!["10.1.0.0/16".into(), "nope".into()],
                ..base.clone()
            })
            .contains("\"nope\"")
        );
        assert!(
            err(HostConfig {
                egress_allow: vec!["100.64.0.0/10".into()],
                ..base.clone()
            })
            .contains("overlaps the session pool")
        );
        assert!(
            err(HostConfig {
                instance: "XYZ".into(),
                ..base.clone()
            })
            .contains("\"XYZ\"")
        );
        let h = Host::new(
            &HostConfig {
                instance: "0a1b".into(),
                egress_allow: vec!["10.1.2.3/16".into(), "192.168.5.5".into()],
                ..base.clone()
            },
            &state,
            "fc-",
        )
        .unwrap();
        assert_eq!(h.instance(), "0a1b");
        assert_eq!(h.policy().table, "sandcast_0a1b");
        assert_eq!(
            h.policy().open,
            vec![
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "192.168.5.5/32".parse().unwrap()
            ]
        );
        assert_eq!(h.netns_name("s1"), "sandcast-0a1b-s1");
        assert!(h.veth_name("s1").starts_with("sc-0a1b"));
        assert_eq!(h.cgroup_parent(), "sandcast/0a1b");
        if let Ok(cg) = h.cgroup("s1") {
            assert!(
                cg.dirs().iter().all(|d| d.ends_with("sandcast/0a1b/fc-s1")),
                "{:?}",
                cg.dirs()
            );
        }
        // Without an instance, the state directory names it.
        let derived = Host::new(&base, &state, "").unwrap();
        assert_eq!(derived.instance(), instance_id(&state));
    }
}

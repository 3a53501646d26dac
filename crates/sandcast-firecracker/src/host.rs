//! Per-session host resources of a microVM: a network namespace with the
//! VM's TAP device and NAT egress, and a cgroup for the Firecracker process.
//!
//! Every name starts with `fc-` (or `fcv` for 15-byte interface names), so
//! nothing collides with the sandbox backend and [`reap_network`] /
//! [`reap_cgroups`] find what a crashed server left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sandcast_backend::{BackendError, Limits, SessionId};
use sha2::{Digest, Sha256};

/// Name of the TAP device inside a session's network namespace.
pub const TAP_NAME: &str = "fc-tap0";
/// Guest address on the TAP link (the kernel's `ip=` sets it).
pub const GUEST_IP: &str = "172.16.0.2";
/// Host-side address of the TAP link: the guest's gateway.
pub const GATEWAY_IP: &str = "172.16.0.1";
/// Netmask of the TAP link.
pub const TAP_NETMASK: &str = "255.255.255.252";
/// Pool for the /30 links between the host and each session's namespace.
const LINK_POOL: &str = "10.201.0.0/16";
const LINK_BLOCKS: u32 = 1 << 14;
/// Namespace-side name of the uplink.
const NS_UPLINK: &str = "fc-eth";
/// The host's nftables table for every session.
const HOST_TABLE: &str = "fc_sessions";

/// Serialises address allocation and the host table between concurrent starts.
static NET_LOCK: Mutex<()> = Mutex::new(());

/// The network of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionNet {
    /// The network namespace (`fc-<id>`).
    pub netns: String,
    /// The host end of the uplink, when egress is on.
    pub host_veth: Option<String>,
    /// The uplink's /30 block index in the pool.
    pub block: Option<u32>,
}

impl SessionNet {
    /// `/run/netns/<name>`, for joining the namespace.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Host and namespace addresses of the uplink.
    pub fn uplink_addrs(&self) -> Option<(String, String)> {
        self.block.map(block_addrs)
    }

    /// Removes the namespace (and with it the TAP and both uplink ends).
    pub fn teardown(&self) -> Result<(), BackendError> {
        if Path::new("/run/netns").join(&self.netns).exists() {
            run("ip", &["netns", "del", &self.netns])?;
        }
        // Deleting the namespace deletes the pair asynchronously; the host
        // end may vanish between the check and the delete.
        if let Some(v) = &self.host_veth
            && Path::new("/sys/class/net").join(v).exists()
            && let Err(e) = run("ip", &["link", "del", v])
            && Path::new("/sys/class/net").join(v).exists()
        {
            return Err(e);
        }
        Ok(())
    }
}

/// Network namespace name of a session.
pub fn netns_name(id: &SessionId) -> String {
    format!("fc-{id}")
}

/// Host uplink name: interface names have at most 15 bytes, ids up to 64.
fn veth_name(id: &SessionId) -> String {
    let h = Sha256::digest(id.as_str().as_bytes());
    format!("fcv{}", hex::encode(&h[..5]))
}

fn run(cmd: &str, args: &[&str]) -> Result<String, BackendError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| BackendError::io(format!("running {cmd}"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BackendError::Start(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<(), BackendError> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| BackendError::io(format!("running {cmd}"), e))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())
        .map_err(|e| BackendError::io(format!("writing to {cmd}"), e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| BackendError::io(format!("waiting for {cmd}"), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BackendError::Start(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Creates a session's namespace with the TAP device, and with `egress` an
/// uplink to the host with NAT. On error nothing is left.
///
/// `tap_owner` (uid, gid) lets an unprivileged (jailed) Firecracker attach
/// to the TAP device.
pub fn setup_network(
    id: &SessionId,
    egress: bool,
    tap_owner: Option<(u32, u32)>,
) -> Result<SessionNet, BackendError> {
    let _guard = NET_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut net = SessionNet {
        netns: netns_name(id),
        host_veth: None,
        block: None,
    };
    let result = (|| {
        run("ip", &["netns", "add", &net.netns])?;
        let ns = net.netns.clone();
        let ip_ns = |args: &[&str]| {
            let mut a = vec!["-n", ns.as_str()];
            a.extend_from_slice(args);
            run("ip", &a)
        };
        ip_ns(&["link", "set", "lo", "up"])?;
        let owner = tap_owner.map(|(u, g)| (u.to_string(), g.to_string()));
        let mut tap = vec!["tuntap", "add", "dev", TAP_NAME, "mode", "tap"];
        if let Some((u, g)) = &owner {
            tap.extend_from_slice(&["user", u, "group", g]);
        }
        ip_ns(&tap)?;
        ip_ns(&["addr", "add", &format!("{GATEWAY_IP}/30"), "dev", TAP_NAME])?;
        ip_ns(&["link", "set", TAP_NAME, "up"])?;
        if !egress {
            return Ok(());
        }
        ensure_host_table()?;
        let block = free_block(id)?;
        let veth = veth_name(id);
        net.host_veth = Some(veth.clone());
        net.block = Some(block);
        let (host_ip, ns_ip) = net.uplink_addrs().expect("block set");
        let (host_mac, ns_mac) = uplink_macs(block);
        run(
            "ip",
            &[
                "link", "add", &veth, "address", &host_mac, "type", "veth", "peer", "name",
                NS_UPLINK, "address", &ns_mac, "netns", &ns,
            ],
        )?;
        run("ip", &["link", "set", &veth, "alias", &ns])?;
        // No IPv6 on the host end, set before the link comes up: its
        // link-local address would be a route from the session to the host,
        // and an address change on the host (Chromium there aborts its
        // requests in flight when one settles).
        let v6 = format!("/proc/sys/net/ipv6/conf/{veth}/disable_ipv6");
        if Path::new(&v6).exists() {
            std::fs::write(&v6, "1")
                .map_err(|e| BackendError::Start(format!("writing {v6}: {e}")))?;
        }
        // The host end carries no address, only a route and a static
        // neighbour: an address added on the host is a network change to
        // every program there (Chromium aborts its requests in flight).
        run("ip", &["link", "set", &veth, "up"])?;
        run(
            "ip",
            &["route", "add", &format!("{ns_ip}/32"), "dev", &veth],
        )?;
        run(
            "ip",
            &[
                "neigh",
                "replace",
                &ns_ip,
                "lladdr",
                &ns_mac,
                "dev",
                &veth,
                "nud",
                "permanent",
            ],
        )?;
        ip_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", NS_UPLINK])?;
        ip_ns(&["link", "set", NS_UPLINK, "up"])?;
        ip_ns(&[
            "neigh",
            "replace",
            &host_ip,
            "lladdr",
            &host_mac,
            "dev",
            NS_UPLINK,
            "nud",
            "permanent",
        ])?;
        ip_ns(&["route", "add", "default", "via", &host_ip])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        run_stdin(
            "ip",
            &["netns", "exec", &ns, "nft", "-f", "-"],
            &format!(
                "table ip fc_nat {{\n chain post {{ type nat hook postrouting priority 100; oifname \"{NS_UPLINK}\" masquerade; }}\n}}\n"
            ),
        )?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(net),
        Err(e) => {
            let _ = net.teardown();
            Err(e)
        }
    }
}

/// The host's rules for every session uplink: no traffic to the host itself,
/// to private or link-local ranges or between sessions; NAT to the outside.
fn ensure_host_table() -> Result<(), BackendError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| BackendError::io("enabling IPv4 forwarding", e))?;
    if run("nft", &["list", "table", "ip", HOST_TABLE]).is_ok() {
        return Ok(());
    }
    run_stdin(
        "nft",
        &["-f", "-"],
        &format!(
            r#"table ip {HOST_TABLE} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "fcv*" ct state established,related accept
    iifname "fcv*" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "fcv*" oifname "fcv*" drop
    iifname "fcv*" ip daddr {{ 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 }} drop
    oifname "fcv*" ct state established,related accept
    oifname "fcv*" drop
  }}
  chain post {{
    type nat hook postrouting priority 100;
    ip saddr {LINK_POOL} oifname != "fcv*" masquerade
  }}
}}
"#
        ),
    )
}

/// A free /30 block for a session's uplink, starting at one derived from its
/// id. A block is taken while the host routes its namespace address (or holds
/// any of its addresses).
fn free_block(id: &SessionId) -> Result<u32, BackendError> {
    let addrs = run("ip", &["-o", "-4", "addr", "show"])?;
    let routes = run("ip", &["-o", "-4", "route", "show"])?;
    let routed: Vec<&str> = routes
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let h = Sha256::digest(id.as_str().as_bytes());
    let start = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % LINK_BLOCKS;
    (0..LINK_BLOCKS)
        .map(|i| (start + i) % LINK_BLOCKS)
        .find(|&b| {
            let (host, ns) = block_addrs(b);
            !addrs.contains(&format!(" {host}/"))
                && !addrs.contains(&format!(" {ns}/"))
                && !routed.contains(&ns.as_str())
        })
        .ok_or_else(|| BackendError::Start("no free uplink address block in 10.201.0.0/16".into()))
}

/// Host (gateway) and namespace addresses of an uplink block.
fn block_addrs(block: u32) -> (String, String) {
    let base = block * 4;
    (
        format!("10.201.{}.{}", base >> 8, (base & 0xff) + 1),
        format!("10.201.{}.{}", base >> 8, (base & 0xff) + 2),
    )
}

/// Fixed, locally administered MACs of an uplink's host and namespace ends,
/// so each holds a permanent neighbour entry for the other.
fn uplink_macs(block: u32) -> (String, String) {
    let [_, a, b, c] = block.to_be_bytes();
    (
        format!("02:66:63:{a:02x}:{b:02x}:{c:02x}"),
        format!("02:66:73:{a:02x}:{b:02x}:{c:02x}"),
    )
}

/// Removes the namespaces and uplinks of sessions not in `keep`.
pub fn reap_network(keep: &[SessionId]) -> Vec<String> {
    reap_network_matching(keep, "fc-")
}

/// [`reap_network`] limited to namespaces whose name starts with `prefix`.
fn reap_network_matching(keep: &[SessionId], prefix: &str) -> Vec<String> {
    let keep_ns: Vec<String> = keep.iter().map(netns_name).collect();
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix)
                && !keep_ns.contains(&name)
                && run("ip", &["netns", "del", &name]).is_ok()
            {
                removed.push(format!("network namespace {name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("fcv") {
                continue;
            }
            let alias = std::fs::read_to_string(e.path().join("ifalias")).unwrap_or_default();
            let alias = alias.trim().to_owned();
            // An uplink without our alias is one half-made by a crash: ours too.
            let ours = alias.starts_with(prefix) || (alias.is_empty() && prefix == "fc-");
            if ours && !keep_ns.contains(&alias) && run("ip", &["link", "del", &name]).is_ok() {
                removed.push(format!("uplink {name}"));
            }
        }
    }
    removed
}

/// Root of the cgroup hierarchies.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent cgroup of every session's cgroup.
const CGROUP_PARENT: &str = "fc-sessions";
/// cgroup v1 controllers used.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Memory the VMM itself needs beyond guest memory.
const VMM_OVERHEAD_MIB: u64 = 256;

/// A session's cgroup (one directory on v2, one per controller on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCgroup {
    /// The directories.
    pub dirs: Vec<PathBuf>,
}

fn cgroup_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

fn write(path: &Path, value: &str) -> Result<(), BackendError> {
    std::fs::write(path, value)
        .map_err(|e| BackendError::io(format!("writing {value:?} to {}", path.display()), e))
}

/// A session's cgroup: where it goes and what is written into it. Made
/// here by [`setup_cgroup`], or by the jailer from its `--cgroup` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    /// cgroup v2 (one unified hierarchy) rather than v1.
    pub v2: bool,
    /// The parent, relative to each hierarchy's root.
    pub parent: String,
    /// The session's cgroup, under `parent`.
    pub name: String,
    /// Limit files and their values.
    pub values: Vec<(String, String)>,
    /// The session's cgroup directories (one on v2, one per controller on v1).
    pub dirs: Vec<PathBuf>,
}

impl CgroupPlan {
    /// The directory that holds the limit file `file` (on v1, that of its
    /// controller, the part of its name before the first dot).
    pub fn dir_for(&self, file: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| {
                self.v2
                    || d.parent()
                        .and_then(Path::parent)
                        .and_then(Path::file_name)
                        .is_some_and(|c| file.split('.').next() == c.to_str())
            })
            .map(PathBuf::as_path)
    }
}

/// The cgroup of session `id` with its limits.
pub fn cgroup_plan(id: &SessionId, limits: &Limits) -> CgroupPlan {
    let name = format!("fc-{id}");
    let mem = ((limits.memory_mib + VMM_OVERHEAD_MIB) << 20).to_string();
    let period = 100_000u64;
    let quota = (u64::from(limits.cpu_millis) * period / 1000).max(1000);
    let pids = limits.pids.to_string();
    let v2 = cgroup_v2();
    let pair = |f: &str, v: String| (f.to_owned(), v);
    let (values, dirs) = if v2 {
        (
            vec![
                pair("memory.max", mem),
                pair("cpu.max", format!("{quota} {period}")),
                pair("pids.max", pids),
            ],
            vec![Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(&name)],
        )
    } else {
        (
            vec![
                pair("memory.limit_in_bytes", mem),
                pair("cpu.cfs_period_us", period.to_string()),
                pair("cpu.cfs_quota_us", quota.to_string()),
                pair("pids.max", pids),
            ],
            V1_CONTROLLERS
                .iter()
                .map(|c| {
                    Path::new(CGROUP_ROOT)
                        .join(c)
                        .join(CGROUP_PARENT)
                        .join(&name)
                })
                .collect(),
        )
    };
    CgroupPlan {
        v2,
        parent: CGROUP_PARENT.into(),
        name,
        values,
        dirs,
    }
}

/// Makes the parents of a planned cgroup and, on v2, lets them hand the
/// memory, cpu and pids controllers down, so that the session's cgroup (made
/// here or by the jailer) has its limit files.
pub fn prepare_cgroup_parents(plan: &CgroupPlan) -> Result<(), BackendError> {
    for dir in &plan.dirs {
        let parent = dir.parent().expect("a session cgroup has a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| BackendError::io(format!("creating {}", parent.display()), e))?;
        if plan.v2 {
            for d in [Path::new(CGROUP_ROOT), parent] {
                write(&d.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
            }
        }
    }
    Ok(())
}

/// Creates the cgroup of a session with its limits. On error nothing is left.
pub fn setup_cgroup(id: &SessionId, limits: &Limits) -> Result<SessionCgroup, BackendError> {
    let plan = cgroup_plan(id, limits);
    let mut cg = SessionCgroup { dirs: Vec::new() };
    let result = (|| {
        prepare_cgroup_parents(&plan)?;
        for dir in &plan.dirs {
            std::fs::create_dir(dir)
                .map_err(|e| BackendError::io(format!("creating {}", dir.display()), e))?;
            cg.dirs.push(dir.clone());
        }
        for (file, value) in &plan.values {
            let dir = plan
                .dir_for(file)
                .expect("every limit file has its controller's directory");
            write(&dir.join(file), value)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(cg),
        Err(e) => {
            let _ = cg.remove();
            Err(e)
        }
    }
}

impl SessionCgroup {
    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Kills whatever is left inside and removes the directories.
    pub fn remove(&self) -> Result<(), BackendError> {
        for dir in self.dirs.iter().rev() {
            remove_cgroup_dir(dir)?;
        }
        Ok(())
    }
}

fn remove_cgroup_dir(dir: &Path) -> Result<(), BackendError> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Busy until the killed processes are gone.
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(BackendError::Cleanup(format!(
                    "removing cgroup {}: {e}",
                    dir.display()
                )));
            }
        }
    }
}

/// Removes the cgroups (and their processes) of sessions not in `keep`.
pub fn reap_cgroups(keep: &[SessionId]) -> Vec<String> {
    reap_cgroups_matching(keep, "fc-")
}

/// [`reap_cgroups`] limited to cgroups whose name starts with `prefix`.
fn reap_cgroups_matching(keep: &[SessionId], prefix: &str) -> Vec<String> {
    let keep: Vec<String> = keep.iter().map(|k| format!("fc-{k}")).collect();
    let parents: Vec<PathBuf> = if cgroup_v2() {
        vec![Path::new(CGROUP_ROOT).join(CGROUP_PARENT)]
    } else {
        V1_CONTROLLERS
            .iter()
            .map(|c| Path::new(CGROUP_ROOT).join(c).join(CGROUP_PARENT))
            .collect()
    };
    let mut removed = Vec::new();
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir()
                && name.starts_with(prefix)
                && !keep.contains(&name)
                && remove_cgroup_dir(&e.path()).is_ok()
            {
                removed.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    /// Tears a test's network down even when an assertion fails.
    struct Guard(SessionNet);

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.teardown();
        }
    }

    fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(ns).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn session_network_is_isolated_from_the_host_and_removed() {
        let id = SessionId::new(format!("nettest-{}", std::process::id())).unwrap();
        let net = setup_network(&id, true, None).unwrap();
        let _guard = Guard(net.clone());
        assert!(net.netns_path().exists());
        let veth = net.host_veth.clone().unwrap();
        assert!(veth.len() <= 15);
        assert!(Path::new("/sys/class/net").join(&veth).exists());
        let (host_ip, ns_ip) = net.uplink_addrs().unwrap();
        // No address on the host end, IPv6 link-local included: that would
        // be a network change to every program on the host.
        let host_end = run("ip", &["-o", "addr", "show", "dev", &veth]).unwrap();
        assert_eq!(host_end.trim(), "");

        // The link works: the host reaches a listener inside the namespace.
        let ns_listener = in_netns(&net.netns_path(), move || {
            TcpListener::bind(format!("{ns_ip}:0")).unwrap()
        });
        let addr = ns_listener.local_addr().unwrap();
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        let (mut s, _) = ns_listener.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();

        // The namespace (where the guest's traffic comes from) cannot reach
        // the host through its gateway address.
        let host_listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = host_listener.local_addr().unwrap().port();
        let reached = in_netns(&net.netns_path(), move || {
            let target = format!("{host_ip}:{port}").parse().unwrap();
            TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
        });
        assert!(!reached, "the session reached the host");
        run("ip", &["-n", &net.netns, "link", "show", TAP_NAME]).unwrap();

        net.teardown().unwrap();
        assert!(!net.netns_path().exists());
        assert!(!Path::new("/sys/class/net").join(&veth).exists());
    }

    #[test]
    fn reap_removes_what_a_crashed_server_left() {
        let id = SessionId::new(format!("reaptest-{}", std::process::id())).unwrap();
        let keep = SessionId::new(format!("keeptest-{}", std::process::id())).unwrap();
        let net = setup_network(&id, true, None).unwrap();
        let kept = setup_network(&keep, false, None).unwrap();
        let cg = setup_cgroup(&id, &Limits::default()).unwrap();
        assert!(cg.dirs.iter().all(|d| d.exists()));
        // Limited to this test's names: other tests run at the same time.
        let keep = [keep];
        let removed = [
            reap_network_matching(&keep, "fc-reaptest-"),
            reap_network_matching(&keep, "fc-keeptest-"),
            reap_cgroups_matching(&keep, "fc-reaptest-"),
        ]
        .concat();
        assert!(
            removed.iter().any(|r| r.contains(&net.netns)),
            "{removed:?}"
        );
        assert!(!net.netns_path().exists());
        assert!(cg.dirs.iter().all(|d| !d.exists()));
        assert!(kept.netns_path().exists());
        kept.teardown().unwrap();
    }

    #[test]
    fn cgroup_limits_are_written() {
        let id = SessionId::new(format!("cgtest-{}", std::process::id())).unwrap();
        let limits = Limits {
            memory_mib: 512,
            cpu_millis: 1500,
            pids: 77,
        };
        let cg = setup_cgroup(&id, &limits).unwrap();
        let all: String = cg
            .dirs
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                [
                    "memory.max",
                    "memory.limit_in_bytes",
                    "pids.max",
                    "cpu.max",
                    "cpu.cfs_quota_us",
                ]
                .contains(&n.as_str())
            })
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        assert!(
            all.contains(&((512 + VMM_OVERHEAD_MIB) << 20).to_string()),
            "{all}"
        );
        assert!(all.contains("77"), "{all}");
        assert!(all.contains("150000"), "{all}");
        cg.remove().unwrap();
        assert!(cg.dirs.iter().all(|d| !d.exists()));
    }
}

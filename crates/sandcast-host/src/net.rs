//! Per-session networking: names, address blocks, resolvers, and the
//! `ip`/`nft` commands that build and remove a session's network namespace.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Stdio;

use ipnet::Ipv4Net;
use sandcast_backend::BackendError;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Prefix of every host-side veth of any sandcast instance and backend;
/// every instance's firewall drops traffic from all of them to the host and
/// between them.
pub const VETH_PREFIX: &str = "sc-";

/// Name of the interface inside the session's network namespace.
pub const INNER_IF: &str = "eth0";

/// The prefix of every host-side veth of one instance: `sc-<instance>`.
pub fn veth_prefix(instance: &str) -> String {
    format!("{VETH_PREFIX}{instance}")
}

/// Host-side veth name for a session: `sc-`, the 4-digit instance id and 8
/// hex digits of a hash of the instance and session id, 15 bytes, the most
/// IFNAMSIZ allows.
pub fn veth_name(instance: &str, id: &str) -> String {
    let digest = Sha256::digest(format!("{instance}/{id}").as_bytes());
    let mut name = veth_prefix(instance);
    for b in &digest[..4] {
        let _ = write!(name, "{b:02x}");
    }
    name
}

/// Network namespace name for a session (`/run/netns/<name>`).
pub fn netns_name(prefix: &str, instance: &str, id: &str) -> String {
    format!("{prefix}-{instance}-{id}")
}

/// The link alias that marks a host-side veth as this instance's, so reap
/// can find it without the record.
pub fn veth_alias(prefix: &str, instance: &str, id: &str) -> String {
    format!("sandcast:{prefix}-{instance}:{id}")
}

/// nftables table name of an instance (nft identifiers take no `-`).
pub fn table_name(prefix: &str, instance: &str) -> String {
    format!("{prefix}_{instance}").replace('-', "_")
}

/// The addresses of one session's /30 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Index of the /30 inside the configured subnet.
    pub index: u32,
    /// The session's gateway: the address the session sends to the host end
    /// of the veth, which itself carries no address.
    pub host: Ipv4Addr,
    /// The session end.
    pub session: Ipv4Addr,
}

/// The `index`-th /30 of `subnet`, if it fits.
pub fn block(subnet: Ipv4Net, index: u32) -> Option<Block> {
    let base = u32::from(subnet.network());
    let size = 1u64 << (32 - subnet.prefix_len());
    if (u64::from(index) + 1) * 4 > size {
        return None;
    }
    let net = base + index * 4;
    Some(Block {
        index,
        host: Ipv4Addr::from(net + 1),
        session: Ipv4Addr::from(net + 2),
    })
}

/// The lowest /30 of `subnet` that holds none of `used_addrs` and whose index
/// is not in `used_blocks`.
pub fn allocate(
    subnet: Ipv4Net,
    used_blocks: &BTreeSet<u32>,
    used_addrs: &[Ipv4Addr],
) -> Result<Block, BackendError> {
    let taken_by_addr: BTreeSet<u32> = used_addrs
        .iter()
        .filter(|a| subnet.contains(*a))
        .map(|a| (u32::from(*a) - u32::from(subnet.network())) / 4)
        .collect();
    (0..)
        .map_while(|i| block(subnet, i))
        .find(|b| !used_blocks.contains(&b.index) && !taken_by_addr.contains(&b.index))
        .ok_or_else(|| {
            BackendError::Start(format!(
                "no free /30 left in subnet {subnet} ({} sessions hold addresses in it)",
                used_blocks.union(&taken_by_addr).count()
            ))
        })
}

/// Validates the configured subnet: IPv4, at least one /30.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, BackendError> {
    let net: Ipv4Net = s.parse().map_err(|e| {
        BackendError::InvalidSpec(format!(
            "subnet {s:?} is not an IPv4 CIDR like 100.64.0.0/16: {e}"
        ))
    })?;
    if net.prefix_len() > 30 {
        return Err(BackendError::InvalidSpec(format!(
            "subnet {s:?} is smaller than one /30"
        )));
    }
    Ok(net.trunc())
}

/// Runs a tool, returning stdout or an error with its stderr.
pub async fn run(tool: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, BackendError> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| BackendError::NotReady(format!("cannot run {}: {e}", tool.display())))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| BackendError::io(format!("writing to {}", tool.display()), e))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| BackendError::io(format!("waiting for {}", tool.display()), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BackendError::Start(format!(
            "{} {} failed ({}): {}",
            tool.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A host link as `ip -j link` reports it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Link {
    /// Interface name.
    pub ifname: String,
    /// Alias, where set.
    #[serde(default)]
    pub ifalias: Option<String>,
}

/// Every link on the host.
pub async fn links(ip: &Path) -> Result<Vec<Link>, BackendError> {
    let out = run(ip, &["-j", "link", "show"], None).await?;
    serde_json::from_str(&out)
        .map_err(|e| BackendError::Cleanup(format!("cannot parse `ip -j link show`: {e}")))
}

/// Every IPv4 address the host uses: its interfaces' addresses and the
/// destinations of its host routes (how sessions of any sandbox backend,
/// whose host ends carry no address, show up).
pub async fn host_ipv4_in_use(ip: &Path) -> Result<Vec<Ipv4Addr>, BackendError> {
    #[derive(serde::Deserialize)]
    struct AddrInfo {
        local: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Iface {
        #[serde(default)]
        addr_info: Vec<AddrInfo>,
    }
    #[derive(serde::Deserialize)]
    struct Route {
        dst: String,
    }
    let out = run(ip, &["-j", "-4", "addr", "show"], None).await?;
    let ifaces: Vec<Iface> = serde_json::from_str(&out)
        .map_err(|e| BackendError::Start(format!("cannot parse `ip -j addr show`: {e}")))?;
    let out = run(ip, &["-j", "-4", "route", "show"], None).await?;
    let routes: Vec<Route> = serde_json::from_str(&out)
        .map_err(|e| BackendError::Start(format!("cannot parse `ip -j route show`: {e}")))?;
    Ok(ifaces
        .into_iter()
        .flat_map(|i| i.addr_info)
        .filter_map(|a| a.local?.parse().ok())
        .chain(routes.iter().filter_map(|r| host_route_dst(&r.dst)))
        .collect())
}

/// The address of a host route's destination (`a.b.c.d` or `a.b.c.d/32`).
fn host_route_dst(dst: &str) -> Option<Ipv4Addr> {
    dst.strip_suffix("/32").unwrap_or(dst).parse().ok()
}

/// The fixed MAC addresses of a block's host and session ends (locally
/// administered), so each side can hold a permanent neighbour entry for the
/// other and neither needs ARP.
pub fn block_macs(index: u32) -> (String, String) {
    let [_, a, b, c] = index.to_be_bytes();
    (
        format!("02:73:63:{a:02x}:{b:02x}:{c:02x}"),
        format!("02:73:73:{a:02x}:{b:02x}:{c:02x}"),
    )
}

/// The DNS servers a session uses: `configured` servers, else the host's
/// upstream ones that a session can reach (IPv4, not loopback, not in the
/// session subnet), else public resolvers; at most three. The egress policy
/// lets sessions reach exactly these on port 53, wherever they are.
pub fn resolvers(configured: &[IpAddr], host_files: &[&str], subnet: Ipv4Net) -> Vec<IpAddr> {
    // Sessions only have an IPv4 route out.
    let usable = |ip: &IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !subnet.contains(v4),
        IpAddr::V6(_) => false,
    };
    let mut servers: Vec<IpAddr> = configured.to_vec();
    if servers.is_empty() {
        for text in host_files {
            servers.extend(
                text.lines()
                    .filter_map(|l| l.trim().strip_prefix("nameserver"))
                    .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
                    .filter(usable),
            );
            if !servers.is_empty() {
                break;
            }
        }
    }
    if servers.is_empty() {
        servers = vec![
            IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
            IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)),
        ];
    }
    servers.truncate(3);
    servers
}

/// The resolv.conf naming `servers`.
pub fn resolv_conf(servers: &[IpAddr]) -> String {
    let mut s = String::new();
    for ip in servers {
        let _ = writeln!(s, "nameserver {ip}");
    }
    s.push_str("options timeout:2 attempts:2\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ() {
        let a = veth_name("0a1b", "a".repeat(64).as_str());
        assert!(a.len() == 15 && a.starts_with("sc-0a1b"), "{a}");
        assert_eq!(a, veth_name("0a1b", &"a".repeat(64)));
        assert_ne!(veth_name("0a1b", "s1"), veth_name("0a1b", "s2"));
        assert!(veth_name("ffff", "s1").starts_with(&veth_prefix("ffff")));
        assert_ne!(veth_name("0a1b", "s1")[7..], veth_name("ffff", "s1")[7..]);
        assert_eq!(netns_name("sandcast", "0a1b", "s1"), "sandcast-0a1b-s1");
        assert_eq!(
            veth_alias("sandcast", "0a1b", "s1"),
            "sandcast:sandcast-0a1b:s1"
        );
        assert_eq!(table_name("sc-test", "0a1b"), "sc_test_0a1b");
    }

    #[test]
    fn blocks_are_slash30s_inside_the_subnet() {
        let net = parse_subnet("100.64.0.0/16").unwrap();
        let b = block(net, 0).unwrap();
        assert_eq!(
            (b.host, b.session),
            ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap())
        );
        let b = block(net, 70).unwrap();
        assert_eq!(b.host, "100.64.1.25".parse::<Ipv4Addr>().unwrap());
        assert!(block(net, 16383).is_some());
        assert!(block(net, 16384).is_none());
        assert_eq!(block(parse_subnet("10.0.0.0/30").unwrap(), 1), None);
    }

    #[test]
    fn allocation_skips_used_blocks_and_live_addresses() {
        let net = parse_subnet("100.64.0.0/28").unwrap(); // four /30s
        let used: BTreeSet<u32> = [0].into();
        // Block 1 is held by an interface we have no record of (another backend).
        let live = ["100.64.0.6".parse().unwrap(), "192.0.2.2".parse().unwrap()];
        assert_eq!(allocate(net, &used, &live).unwrap().index, 2);
        let full: BTreeSet<u32> = [0, 2, 3].into();
        let err = allocate(net, &full, &live).unwrap_err().to_string();
        assert!(
            err.contains("no free /30") && err.contains("100.64.0.0/28"),
            "{err}"
        );
    }

    #[test]
    fn host_routes_count_as_addresses_in_use() {
        assert_eq!(host_route_dst("100.64.0.2"), Some([100, 64, 0, 2].into()));
        assert_eq!(
            host_route_dst("100.64.0.2/32"),
            Some([100, 64, 0, 2].into())
        );
        assert_eq!(host_route_dst("100.64.0.0/30"), None);
        assert_eq!(host_route_dst("default"), None);
    }

    #[test]
    fn block_macs_are_local_unicast_and_distinct() {
        let (h0, s0) = block_macs(0);
        let (h1, s1) = block_macs(0x01_02_03);
        assert_eq!(h0, "02:73:63:00:00:00");
        assert_eq!(s1, "02:73:73:01:02:03");
        let all = [&h0, &s0, &h1, &s1];
        for (i, a) in all.iter().enumerate() {
            // Locally administered (bit 1), not multicast (bit 0).
            let first = u8::from_str_radix(&a[..2], 16).unwrap();
            assert_eq!(first & 0b11, 0b10, "{a}");
            assert!(all[i + 1..].iter().all(|b| b != a), "{a} repeats");
        }
    }

    #[test]
    fn bad_subnets_are_named() {
        for bad in ["", "100.64.0.0", "fd00::/64", "10.0.0.0/31", "300.1.1.1/16"] {
            let e = parse_subnet(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        // Host bits are dropped, not an error.
        assert_eq!(
            parse_subnet("10.1.2.3/16").unwrap().to_string(),
            "10.1.0.0/16"
        );
    }

    #[test]
    fn resolvers_avoid_host_loopback() {
        let net = parse_subnet("100.64.0.0/16").unwrap();
        let stub = "nameserver 127.0.0.53\noptions edns0\n";
        let upstream = "# resolved\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(resolvers(&[], &[stub, upstream], net), vec![ip("10.0.0.2")]);
        assert_eq!(
            resolvers(&[], &[stub], net),
            vec![ip("1.1.1.1"), ip("9.9.9.9")]
        );
        assert_eq!(
            resolvers(&[ip("8.8.8.8")], &[upstream], net),
            vec![ip("8.8.8.8")]
        );
        assert_eq!(
            resolvers(&[], &["nameserver 100.64.0.1\n"], net),
            vec![ip("1.1.1.1"), ip("9.9.9.9")]
        );
        assert_eq!(
            resolv_conf(&[ip("10.0.0.2")]),
            "nameserver 10.0.0.2\noptions timeout:2 attempts:2\n"
        );
    }
}

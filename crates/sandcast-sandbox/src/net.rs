//! Per-session networking: names, address blocks, the nftables table, and the
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

/// Prefix of every host-side veth of any sandcast sandbox backend; the
/// firewall drops traffic from all of them to the host and between them.
pub const VETH_PREFIX: &str = "sc-";

/// Name of the interface inside the session's network namespace.
pub const INNER_IF: &str = "eth0";

/// Host-side veth name for a session: `sc-` and 8 hex digits of a hash of
/// the backend prefix and the id, short enough for IFNAMSIZ (15).
pub fn veth_name(prefix: &str, id: &str) -> String {
    let digest = Sha256::digest(format!("{prefix}/{id}").as_bytes());
    let mut name = String::from(VETH_PREFIX);
    for b in &digest[..4] {
        let _ = write!(name, "{b:02x}");
    }
    name
}

/// Network namespace name for a session (`/run/netns/<name>`).
pub fn netns_name(prefix: &str, id: &str) -> String {
    format!("{prefix}-{id}")
}

/// The link alias that marks a host-side veth as this backend's, so reap can
/// find it without the state file.
pub fn veth_alias(prefix: &str, id: &str) -> String {
    format!("sandcast-sandbox:{prefix}:{id}")
}

/// nftables table name for a backend prefix (nft identifiers take no `-`).
pub fn table_name(prefix: &str) -> String {
    prefix.replace('-', "_")
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

/// A session as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallEntry {
    /// Host-side veth name.
    pub veth: String,
    /// Whether the session may reach the outside.
    pub egress: bool,
}

/// The whole table, as one atomic `nft -f` transaction that replaces any
/// previous version of it. `deny` lists destinations no session may reach
/// even with egress on (by default the link-local range with the cloud
/// metadata service).
pub fn ruleset(
    table: &str,
    subnet: Ipv4Net,
    deny: &[Ipv4Net],
    sessions: &[FirewallEntry],
) -> String {
    let elems = |pick: &dyn Fn(&FirewallEntry) -> bool| -> String {
        let list: Vec<String> = sessions
            .iter()
            .filter(|s| pick(s))
            .map(|s| format!("\"{}\"", s.veth))
            .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", list.join(", "))
        }
    };
    let all = elems(&|_| true);
    let egress = elems(&|s| s.egress);
    let p = VETH_PREFIX;
    let deny = if deny.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = deny.iter().map(ToString::to_string).collect();
        format!(
            "\t\tiifname @sessions ip daddr {{ {} }} drop\n",
            list.join(", ")
        )
    };
    format!(
        "table inet {table}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         \tset sessions {{ type ifname;{all} }}\n\
         \tset egress {{ type ifname;{egress} }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\t# Nothing from a session reaches the host itself (API, agent sockets' peers, other services).\n\
         \t\tiifname \"{p}*\" drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname \"{p}*\" oifname \"{p}*\" drop\n\
         \t\t# A gateway address is no host's: it must not route out either.\n\
         \t\tiifname \"{p}*\" ip daddr {subnet} drop\n\
         \t\toifname \"{p}*\" ct state established,related accept\n\
         \t\toifname \"{p}*\" drop\n\
         {deny}\
         \t\tiifname @sessions iifname != @egress drop\n\
         \t\tiifname @sessions accept\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{p}*\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Commands that add one session's interface to the sets.
pub fn add_elements(table: &str, entry: &FirewallEntry) -> String {
    let mut s = format!(
        "add element inet {table} sessions {{ \"{}\" }}\n",
        entry.veth
    );
    if entry.egress {
        let _ = writeln!(
            s,
            "add element inet {table} egress {{ \"{}\" }}",
            entry.veth
        );
    }
    s
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

/// The resolv.conf a session gets: `configured` servers, else the host's
/// upstream ones that a session can reach (IPv4, not loopback, not in the
/// session subnet), else public resolvers.
pub fn resolv_conf(configured: &[IpAddr], host_files: &[&str], subnet: Ipv4Net) -> String {
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
    let mut s = String::new();
    for ip in servers.iter().take(3) {
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
        let a = veth_name("sandcast", "a".repeat(64).as_str());
        assert!(a.len() <= 15 && a.starts_with("sc-"), "{a}");
        assert_eq!(a, veth_name("sandcast", &"a".repeat(64)));
        assert_ne!(veth_name("sandcast", "s1"), veth_name("sandcast", "s2"));
        assert_ne!(veth_name("sandcast", "s1"), veth_name("other", "s1"));
        assert_eq!(netns_name("sandcast", "s1"), "sandcast-s1");
        assert_eq!(table_name("sc-test-1"), "sc_test_1");
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
    fn ruleset_isolates_and_lists_sessions() {
        let net = parse_subnet("100.64.0.0/16").unwrap();
        let text = ruleset(
            "sandcast",
            net,
            &[parse_subnet("169.254.0.0/16").unwrap()],
            &[
                FirewallEntry {
                    veth: "sc-00000001".into(),
                    egress: true,
                },
                FirewallEntry {
                    veth: "sc-00000002".into(),
                    egress: false,
                },
            ],
        );
        assert!(text.starts_with("table inet sandcast\ndelete table inet sandcast\n"));
        assert!(text.contains(
            "set sessions { type ifname; elements = { \"sc-00000001\", \"sc-00000002\" }; }"
        ));
        assert!(text.contains("set egress { type ifname; elements = { \"sc-00000001\" }; }"));
        assert!(text.contains("hook input priority filter - 10; policy accept;\n\t\t# Nothing"));
        assert!(text.contains("\t\tiifname \"sc-*\" drop\n"));
        assert!(text.contains("iifname \"sc-*\" oifname \"sc-*\" drop"));
        assert!(text.contains("iifname @sessions iifname != @egress drop"));
        assert!(text.contains("\t\tiifname @sessions ip daddr { 169.254.0.0/16 } drop\n"));
        assert!(text.contains("ip saddr 100.64.0.0/16 oifname != \"sc-*\" masquerade"));
        // Gateway addresses are not the host's, so they need a rule of their own.
        let drop_gateways = text
            .find("iifname \"sc-*\" ip daddr 100.64.0.0/16 drop")
            .unwrap();
        assert!(drop_gateways < text.find("iifname @sessions accept").unwrap());
        // Sessions-to-sessions drop comes before any accept.
        let drop_between = text.find("oifname \"sc-*\" drop").unwrap();
        let accept = text.find("iifname @sessions accept").unwrap();
        assert!(drop_between < accept);
        // Empty sets carry no (invalid) empty element list.
        let empty = ruleset("t", net, &[], &[]);
        assert!(!empty.contains("daddr {"), "{empty}");
        assert!(empty.contains("set sessions { type ifname; }"), "{empty}");
    }

    #[test]
    fn element_commands_follow_egress() {
        let on = add_elements(
            "t",
            &FirewallEntry {
                veth: "sc-1".into(),
                egress: true,
            },
        );
        assert_eq!(
            on,
            "add element inet t sessions { \"sc-1\" }\nadd element inet t egress { \"sc-1\" }\n"
        );
        let off = add_elements(
            "t",
            &FirewallEntry {
                veth: "sc-1".into(),
                egress: false,
            },
        );
        assert!(!off.contains("egress"));
    }

    #[test]
    fn resolv_conf_avoids_host_loopback() {
        let net = parse_subnet("100.64.0.0/16").unwrap();
        let stub = "nameserver 127.0.0.53\noptions edns0\n";
        let upstream = "# resolved\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n";
        let r = resolv_conf(&[], &[stub, upstream], net);
        assert!(r.starts_with("nameserver 10.0.0.2\noptions"), "{r}");
        assert!(!r.contains("127.0.0.53"));
        let r = resolv_conf(&[], &[stub], net);
        assert!(r.starts_with("nameserver 1.1.1.1\n"), "{r}");
        let r = resolv_conf(&["8.8.8.8".parse().unwrap()], &[upstream], net);
        assert!(r.starts_with("nameserver 8.8.8.8\noptions"), "{r}");
        let r = resolv_conf(&[], &["nameserver 100.64.0.1\n"], net);
        assert!(!r.contains("100.64.0.1"), "{r}");
    }
}

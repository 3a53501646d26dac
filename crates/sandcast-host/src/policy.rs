//! The egress policy as nftables text: one `inet` table per instance, so that
//! a server rewriting its own table never touches another server's sessions.
//!
//! A session reaches the public internet and nothing else: every private,
//! shared, loopback, link-local, multicast, benchmark, documentation and
//! reserved range of IPv4 and IPv6 is closed ([`DENY_V4`], [`DENY_V6`]),
//! unless the operator opens a range with `egress_allow`. The host itself
//! (any of its addresses) and every other session are closed whatever the
//! configuration says. The policy fails closed: traffic from an interface
//! of this instance goes to a chain that ends in `drop`, and the first rule
//! there drops every interface that is not (or no longer) in the `sessions`
//! set.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};
use sandcast_backend::{Egress, EgressRule};

use crate::net::VETH_PREFIX;

/// IPv4 destinations no session reaches unless `egress_allow` opens them:
/// "this network", RFC 1918, shared address space (CGNAT, which holds the
/// session pool), loopback, link-local (cloud metadata), IETF protocol
/// assignments, the three documentation nets, benchmarking, multicast,
/// reserved and limited broadcast (both in 240/4).
pub const DENY_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 destinations no session reaches unless `egress_allow` opens them:
/// unspecified, loopback, IPv4-mapped and the NAT64 prefixes (both lead
/// back to IPv4 ranges), discard, documentation (old and new), 6to4
/// (embeds any IPv4 address), unique local (ULA), link-local, site-local
/// and multicast.
pub const DENY_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:db8::/32",
    "2002::/16",
    "3fff::/20",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The server-wide part of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// This instance's table (`inet <table>`).
    pub table: String,
    /// The prefix of this instance's host-side veths (`sc-<instance>`).
    pub veth_prefix: String,
    /// The session address pool.
    pub subnet: Ipv4Net,
    /// Ranges the operator opened (`egress_allow`).
    pub open: Vec<IpNet>,
    /// The sessions' DNS servers, reachable on port 53 by every session
    /// that has any egress.
    pub resolvers: Vec<IpAddr>,
}

/// A session as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallEntry {
    /// Host-side veth name.
    pub veth: String,
    /// Where it may go.
    pub egress: Egress,
}

/// `(set, element)` pairs that put one session into the policy.
fn elements(e: &FirewallEntry) -> Vec<(&'static str, String)> {
    let v = format!("\"{}\"", e.veth);
    let mut out = vec![("sessions", v.clone())];
    match &e.egress {
        Egress::Internet => out.push(("internet", v)),
        Egress::None => {}
        Egress::Allow(rules) => {
            out.push(("listed", v.clone()));
            for r in rules {
                out.extend(rule_elements(&v, r));
            }
        }
    }
    out
}

fn rule_elements(veth: &str, r: &EgressRule) -> Vec<(&'static str, String)> {
    let net = format!("{}/{}", r.addr, r.prefix);
    let v4 = r.addr.is_ipv4();
    match r.ports {
        None => vec![(
            if v4 { "allow4" } else { "allow6" },
            format!("{veth} . {net}"),
        )],
        Some((lo, hi)) => {
            let ports = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            let set = if v4 { "allow4p" } else { "allow6p" };
            ["tcp", "udp"]
                .iter()
                .map(|p| (set, format!("{veth} . {net} . {p} . {ports}")))
                .collect()
        }
    }
}

fn elems(list: &[String]) -> String {
    if list.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", list.join(", "))
    }
}

impl Policy {
    /// The whole table as one atomic `nft -f` transaction that replaces any
    /// previous version of it (and only it), listing `sessions`.
    pub fn ruleset(&self, sessions: &[FirewallEntry]) -> String {
        let all: Vec<(&str, String)> = sessions.iter().flat_map(elements).collect();
        let set = |name: &str| -> String {
            let list: Vec<String> = all
                .iter()
                .filter(|(s, _)| *s == name)
                .map(|(_, e)| e.clone())
                .collect();
            elems(&list)
        };
        let pick = |v4: bool| -> (String, String, String) {
            let deny: Vec<String> = (if v4 { DENY_V4 } else { DENY_V6 })
                .iter()
                .map(ToString::to_string)
                .collect();
            let open: Vec<String> = self
                .open
                .iter()
                .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                .map(ToString::to_string)
                .collect();
            let dns: Vec<String> = self
                .resolvers
                .iter()
                .filter(|a| a.is_ipv4() == v4)
                .map(ToString::to_string)
                .collect();
            (elems(&deny), elems(&open), elems(&dns))
        };
        let (deny4, open4, dns4) = pick(true);
        let (deny6, open6, dns6) = pick(false);
        let t = &self.table;
        let own = &self.veth_prefix;
        let any = VETH_PREFIX;
        let subnet = self.subnet;
        let mut s = String::new();
        let _ = write!(
            s,
            "table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tset sessions {{ type ifname;{sessions} }}\n\
             \tset internet {{ type ifname;{internet} }}\n\
             \tset listed {{ type ifname;{listed} }}\n\
             \tset allow4 {{ type ifname . ipv4_addr; flags interval;{allow4} }}\n\
             \tset allow4p {{ type ifname . ipv4_addr . inet_proto . inet_service; flags interval;{allow4p} }}\n\
             \tset allow6 {{ type ifname . ipv6_addr; flags interval;{allow6} }}\n\
             \tset allow6p {{ type ifname . ipv6_addr . inet_proto . inet_service; flags interval;{allow6p} }}\n\
             \tset deny4 {{ type ipv4_addr; flags interval;{deny4} }}\n\
             \tset deny6 {{ type ipv6_addr; flags interval;{deny6} }}\n\
             \tset open4 {{ type ipv4_addr; flags interval; auto-merge;{open4} }}\n\
             \tset open6 {{ type ipv6_addr; flags interval; auto-merge;{open6} }}\n\
             \tset dns4 {{ type ipv4_addr;{dns4} }}\n\
             \tset dns6 {{ type ipv6_addr;{dns6} }}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter - 10; policy accept;\n\
             \t\t# Nothing from any session reaches the host itself, on any address.\n\
             \t\tiifname \"{any}*\" drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter - 10; policy accept;\n\
             \t\tiifname \"{own}*\" goto from_session\n\
             \t\toifname \"{own}*\" goto to_session\n\
             \t}}\n\
             \tchain from_session {{\n\
             \t\t# Fail closed: an interface not (or no longer) in the sets forwards nothing.\n\
             \t\tiifname != @sessions drop\n\
             \t\toifname \"{any}*\" drop\n\
             \t\tip daddr {subnet} drop\n\
             \t\tiifname != @internet iifname != @listed drop\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns4 accept\n\
             \t\tmeta l4proto {{ tcp, udp }} th dport 53 ip6 daddr @dns6 accept\n\
             \t\tip daddr != @open4 ip daddr @deny4 drop\n\
             \t\tip6 daddr != @open6 ip6 daddr @deny6 drop\n\
             \t\tiifname @internet accept\n\
             \t\tiifname . ip daddr @allow4 accept\n\
             \t\tiifname . ip daddr . meta l4proto . th dport @allow4p accept\n\
             \t\tiifname . ip6 daddr @allow6 accept\n\
             \t\tiifname . ip6 daddr . meta l4proto . th dport @allow6p accept\n\
             \t\tdrop\n\
             \t}}\n\
             \tchain to_session {{\n\
             \t\tct state established,related accept\n\
             \t\tdrop\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} oifname != \"{any}*\" masquerade\n\
             \t}}\n\
             }}\n",
            sessions = set("sessions"),
            internet = set("internet"),
            listed = set("listed"),
            allow4 = set("allow4"),
            allow4p = set("allow4p"),
            allow6 = set("allow6"),
            allow6p = set("allow6p"),
        );
        s
    }

    /// Commands that put one session into the sets, as one transaction.
    pub fn add_elements(&self, e: &FirewallEntry) -> String {
        let mut s = String::new();
        for (set, el) in elements(e) {
            let _ = writeln!(s, "add element inet {} {set} {{ {el} }}", self.table);
        }
        s
    }

    /// Commands that take one session out of the sets, as one transaction
    /// that succeeds whether or not the elements are there (each is added,
    /// which is a no-op when present, then deleted).
    pub fn delete_elements(&self, e: &FirewallEntry) -> String {
        let mut s = self.add_elements(e);
        for (set, el) in elements(e) {
            let _ = writeln!(s, "delete element inet {} {set} {{ {el} }}", self.table);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            table: "sandcast_0a1b".into(),
            veth_prefix: "sc-0a1b".into(),
            subnet: "100.64.0.0/16".parse().unwrap(),
            open: vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            resolvers: vec!["10.255.255.53".parse().unwrap()],
        }
    }

    fn entries() -> Vec<FirewallEntry> {
        vec![
            FirewallEntry {
                veth: "sc-0a1b00000001".into(),
                egress: Egress::Internet,
            },
            FirewallEntry {
                veth: "sc-0a1b00000002".into(),
                egress: Egress::None,
            },
            FirewallEntry {
                veth: "sc-0a1b00000003".into(),
                egress: Egress::allow_list(&[
                    "203.0.113.0/24",
                    "198.51.100.7:443",
                    "[2001:db8::/32]:8000-8100",
                ])
                .unwrap(),
            },
        ]
    }

    /// The line of `text` that holds `needle`, with its position.
    fn line_of(text: &str, needle: &str) -> usize {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
    }

    #[test]
    fn every_denied_range_is_in_the_ruleset() {
        let text = policy().ruleset(&entries());
        let deny4 = text.lines().find(|l| l.contains("set deny4")).unwrap();
        for r in DENY_V4 {
            assert!(
                deny4.contains(&format!(" {r},")) || deny4.contains(&format!(" {r} ")),
                "{r} missing: {deny4}"
            );
        }
        let deny6 = text.lines().find(|l| l.contains("set deny6")).unwrap();
        for r in DENY_V6 {
            assert!(
                deny6.contains(&format!(" {r},")) || deny6.contains(&format!(" {r} ")),
                "{r} missing: {deny6}"
            );
        }
        // The ranges the issue names, by an address inside each.
        let deny: Vec<IpNet> = DENY_V4
            .iter()
            .chain(DENY_V6)
            .map(|r| r.parse().unwrap())
            .collect();
        for addr in [
            "127.0.0.1",
            "10.2.3.4",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.2",
            "100.127.255.254",
            "169.254.169.254",
            "224.0.0.251",
            "239.255.255.250",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "240.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "::1",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "::",
        ] {
            let a: IpAddr = addr.parse().unwrap();
            assert!(deny.iter().any(|n| n.contains(&a)), "{addr} is not denied");
        }
        for public in ["1.1.1.1", "8.8.8.8", "100.128.0.1", "2606:4700::1111"] {
            let a: IpAddr = public.parse().unwrap();
            assert!(!deny.iter().any(|n| n.contains(&a)), "{public} is denied");
        }
    }

    #[test]
    fn the_policy_fails_closed() {
        let text = policy().ruleset(&entries());
        // Only this instance's interfaces, into a chain ending in drop.
        assert!(text.contains("\t\tiifname \"sc-0a1b*\" goto from_session\n"));
        assert!(text.contains("\t\toifname \"sc-0a1b*\" goto to_session\n"));
        let chain = &text[line_of(&text, "chain from_session")..line_of(&text, "chain to_session")];
        let rules: Vec<&str> = chain
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty() && *l != "}")
            .collect();
        assert_eq!(rules[1], "iifname != @sessions drop", "{chain}");
        assert_eq!(rules[rules.len() - 1], "drop", "{chain}");
        // Before any accept: other sessions of any instance, the pool, "none".
        let first_accept = rules.iter().position(|r| r.ends_with("accept")).unwrap();
        for r in [
            "oifname \"sc-*\" drop",
            "ip daddr 100.64.0.0/16 drop",
            "iifname != @internet iifname != @listed drop",
        ] {
            let at = rules
                .iter()
                .position(|x| *x == r)
                .unwrap_or_else(|| panic!("{r} missing"));
            assert!(at < first_accept, "{r} after an accept");
        }
        // Private ranges are dropped before "internet" is accepted.
        let deny = rules
            .iter()
            .position(|r| *r == "ip daddr != @open4 ip daddr @deny4 drop")
            .unwrap();
        let deny6 = rules
            .iter()
            .position(|r| *r == "ip6 daddr != @open6 ip6 daddr @deny6 drop")
            .unwrap();
        let internet = rules
            .iter()
            .position(|r| *r == "iifname @internet accept")
            .unwrap();
        assert!(deny < internet && deny6 < internet);
        // Replies only into sessions; nothing from any session to the host.
        assert!(text.contains(
            "chain to_session {\n\t\tct state established,related accept\n\t\tdrop\n\t}"
        ));
        assert!(text.contains("hook input priority filter - 10; policy accept;\n\t\t# Nothing from any session reaches the host itself, on any address.\n\t\tiifname \"sc-*\" drop\n"));
        // Exactly one table, replaced as a whole and nothing else.
        assert!(text.starts_with("table inet sandcast_0a1b\ndelete table inet sandcast_0a1b\n"));
        assert_eq!(text.matches("delete").count(), 1);
    }

    #[test]
    fn sessions_allow_lists_and_resolvers_are_listed() {
        let text = policy().ruleset(&entries());
        assert!(text.contains("set sessions { type ifname; elements = { \"sc-0a1b00000001\", \"sc-0a1b00000002\", \"sc-0a1b00000003\" }; }"), "{text}");
        assert!(text.contains("set internet { type ifname; elements = { \"sc-0a1b00000001\" }; }"));
        assert!(text.contains("set listed { type ifname; elements = { \"sc-0a1b00000003\" }; }"));
        assert!(text.contains("elements = { \"sc-0a1b00000003\" . 203.0.113.0/24 }"));
        assert!(text.contains("\"sc-0a1b00000003\" . 198.51.100.7/32 . tcp . 443, \"sc-0a1b00000003\" . 198.51.100.7/32 . udp . 443"));
        assert!(text.contains("\"sc-0a1b00000003\" . 2001:db8::/32 . tcp . 8000-8100"));
        assert!(text.contains(
            "set open4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.1.0.0/16 }; }"
        ));
        assert!(text.contains(
            "set open6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00:1::/64 }; }"
        ));
        assert!(text.contains("set dns4 { type ipv4_addr; elements = { 10.255.255.53 }; }"));
        // Empty sets carry no (invalid) empty element list.
        let empty = policy().ruleset(&[]);
        assert!(empty.contains("set sessions { type ifname; }"), "{empty}");
        assert!(!empty.contains("{  }"), "{empty}");
    }

    #[test]
    fn instances_have_tables_and_interfaces_of_their_own() {
        let a = policy();
        let b = Policy {
            table: "sandcast_ffff".into(),
            veth_prefix: "sc-ffff".into(),
            ..policy()
        };
        let ta = a.ruleset(&[]);
        let tb = b.ruleset(&[]);
        assert!(!tb.contains("sandcast_0a1b") && !tb.contains("sc-0a1b"));
        assert!(!ta.contains("sandcast_ffff") && !ta.contains("sc-ffff"));
        let add = b.add_elements(&entries()[0]);
        assert!(
            add.lines()
                .all(|l| l.starts_with("add element inet sandcast_ffff ")),
            "{add}"
        );
    }

    #[test]
    fn element_commands_follow_egress_and_deletes_never_fail() {
        let p = policy();
        let e = entries();
        assert_eq!(
            p.add_elements(&e[0]),
            "add element inet sandcast_0a1b sessions { \"sc-0a1b00000001\" }\n\
             add element inet sandcast_0a1b internet { \"sc-0a1b00000001\" }\n"
        );
        assert_eq!(
            p.add_elements(&e[1]),
            "add element inet sandcast_0a1b sessions { \"sc-0a1b00000002\" }\n"
        );
        let del = p.delete_elements(&e[2]);
        let adds = del.matches("add element").count();
        assert_eq!(adds, del.matches("delete element").count());
        assert!(adds >= 6, "{del}");
        assert!(del.find("delete element").unwrap() > del.rfind("add element").unwrap());
    }

    /// `nft -c` checks the text against the running kernel without changing anything.
    #[test]
    fn the_ruleset_parses_with_this_machines_nft() {
        let nft = std::path::Path::new("/usr/sbin/nft");
        // SAFETY: geteuid cannot fail.
        if !nft.exists() || unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root and /usr/sbin/nft to check the ruleset with nft -c");
            return;
        }
        for text in [policy().ruleset(&entries()), policy().ruleset(&[])] {
            // `delete table` of a table that does not exist fails a check;
            // the first line creates it inside the same transaction.
            let mut child = std::process::Command::new(nft)
                .args(["-c", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "nft -c refused:\n{}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

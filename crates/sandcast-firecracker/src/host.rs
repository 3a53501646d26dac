//! What a microVM adds to the host isolation layer (`sandcast-host`): a TAP
//! device in the session's network namespace, routed and masqueraded out of
//! the namespace's `eth0`, so that the guest's traffic meets the same egress
//! policy as a sandbox session's; and the VMM's own memory in its cgroup.

use std::path::Path;

use sandcast_backend::{BackendError, Limits};
use sandcast_host::net;

/// Name of the TAP device inside a session's network namespace.
pub const TAP_NAME: &str = "fc-tap0";
/// Guest address on the TAP link (the kernel's `ip=` sets it).
pub const GUEST_IP: &str = "172.16.0.2";
/// Namespace-side address of the TAP link: the guest's gateway.
pub const GATEWAY_IP: &str = "172.16.0.1";
/// Netmask of the TAP link.
pub const TAP_NETMASK: &str = "255.255.255.252";

/// Memory the VMM itself needs beyond guest memory.
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// The limits of a session's cgroup: the guest's, plus the VMM's memory.
pub fn cgroup_limits(limits: &Limits) -> Limits {
    Limits {
        memory_mib: limits.memory_mib + VMM_OVERHEAD_MIB,
        ..*limits
    }
}

/// Adds the TAP device to the session's namespace `netns` and forwards the
/// guest's traffic out of the namespace's uplink with NAT (the host's policy
/// then sees the session's own address). `tap_owner` (uid, gid) lets an
/// unprivileged (jailed) Firecracker attach to the TAP device.
pub async fn setup_tap(
    ip: &Path,
    nft: &Path,
    netns: &str,
    tap_owner: Option<(u32, u32)>,
) -> Result<(), BackendError> {
    let owner = tap_owner
        .map(|(u, g)| format!(" user {u} group {g}"))
        .unwrap_or_default();
    let batch = format!(
        "tuntap add dev {TAP_NAME} mode tap{owner}\n\
         addr add {GATEWAY_IP}/30 dev {TAP_NAME}\n\
         link set {TAP_NAME} up\n"
    );
    net::run(ip, &["-n", netns, "-batch", "-"], Some(&batch)).await?;
    net::run(
        ip,
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
        None,
    )
    .await?;
    let nft = nft.to_string_lossy().into_owned();
    net::run(
        ip,
        &["netns", "exec", netns, nft.as_str(), "-f", "-"],
        Some(&format!(
            "table ip fc_nat {{\n chain post {{ type nat hook postrouting priority 100; oifname \"{}\" masquerade; }}\n}}\n",
            net::INNER_IF
        )),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_memory_is_charged_to_the_session() {
        let l = cgroup_limits(&Limits {
            memory_mib: 512,
            cpu_millis: 1500,
            pids: 77,
        });
        assert_eq!((l.memory_mib, l.cpu_millis, l.pids), (768, 1500, 77));
    }
}

//! The parts of Firecracker's API (v1.16.1) that sandcast uses, modelled from
//! its OpenAPI specification (`fixtures/firecracker/firecracker-v1.16.1.yaml`).
//!
//! Optional fields are skipped when `None`, so every body carries only what
//! sandcast sets and Firecracker applies its documented defaults to the rest.

use serde::{Deserialize, Serialize};

/// `PUT /machine-config` (`MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Number of vCPUs: 1 to 32.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (x86 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking, needed for diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// `PUT /boot-source` (`BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Host path of the uncompressed guest kernel.
    pub kernel_image_path: String,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of an initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// Block device cache strategy (`Drive.cache_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored (Firecracker's default).
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// `PUT /drives/{drive_id}` (`Drive`, virtio-block form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// The drive's id; also the last path segment of the request.
    pub drive_id: String,
    /// Whether the kernel boots from it (becomes `/dev/vda` and `root=`).
    pub is_root_device: bool,
    /// Whether the guest may only read it.
    pub is_read_only: bool,
    /// Host path of the backing file.
    pub path_on_host: String,
    /// Cache strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// The interface's id; also the last path segment of the request.
    pub iface_id: String,
    /// Name of the TAP device on the host (in Firecracker's network namespace).
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /vsock` (`Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// The guest's context id (at least 3).
    pub guest_cid: u32,
    /// Host Unix socket that proxies vsock connections.
    pub uds_path: String,
}

/// Log level of Firecracker's own logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Informational messages (Firecracker's default).
    Info,
    /// Debugging detail.
    Debug,
}

/// `PUT /logger` (`Logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// File or named pipe for the log.
    pub log_path: String,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix lines with their level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
}

/// `PUT /metrics` (`Metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// File or named pipe the JSON metrics are flushed to.
    pub metrics_path: String,
}

/// MMDS version (`MmdsConfig.version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GET requests.
    V1,
    /// Session-oriented: a token from `PUT /latest/api/token` first.
    V2,
}

/// `PUT /mmds/config` (`MmdsConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsConfig {
    /// Interfaces that may reach MMDS.
    pub network_interfaces: Vec<String>,
    /// Version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    /// The link-local address MMDS answers on (default 169.254.169.254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
}

/// `PUT /actions` action types (`InstanceActionInfo.action_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured microVM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard (x86 only).
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PUT /actions` (`InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// Desired microVM state (`Vm.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// vCPUs stopped.
    Paused,
    /// vCPUs running.
    Resumed,
}

/// `PATCH /vm` (`Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// The state to move to.
    pub state: VmState,
}

/// Snapshot kind (`SnapshotCreateParams.snapshot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create` (`SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// File for the microVM state.
    pub snapshot_path: String,
    /// File for guest memory.
    pub mem_file_path: String,
    /// Full (default) or diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// How guest memory is loaded on restore (`MemoryBackend.backend_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Map the memory file (copy on write).
    File,
    /// Serve page faults from a userfaultfd handler.
    Uffd,
}

/// `SnapshotLoadParams.mem_backend` (`MemoryBackend`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// Kind.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the UFFD handler's socket.
    pub backend_path: String,
}

/// `SnapshotLoadParams.network_overrides[]` (`NetworkOverride`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    /// The interface as it was configured when the snapshot was taken.
    pub iface_id: String,
    /// The TAP device to use now.
    pub host_dev_name: String,
}

/// `SnapshotLoadParams.vsock_override` (`VsockOverride`, since 1.16.1 with
/// the restore fix sandcast relies on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    /// The vsock Unix socket to use now.
    pub uds_path: String,
}

/// `PUT /snapshot/load` (`SnapshotLoadParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// File with the microVM state.
    pub snapshot_path: String,
    /// Guest memory source.
    pub mem_backend: MemoryBackend,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// TAP devices to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Vsock socket to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall time since the snapshot (x86_64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// `GET /` answer (`InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name ("Firecracker").
    pub app_name: String,
    /// The `--id` Firecracker was started with.
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
}

/// Error body of every failed request (`Error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Firecracker's description of the failure.
    #[serde(default)]
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_are_omitted() {
        let json = serde_json::to_value(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 1024,
            smt: None,
            track_dirty_pages: None,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 1024})
        );
    }

    #[test]
    fn enums_use_the_spec_spelling() {
        let json = serde_json::to_string(&InstanceActionInfo {
            action_type: ActionType::SendCtrlAltDel,
        })
        .unwrap();
        assert_eq!(json, r#"{"action_type":"SendCtrlAltDel"}"#);
        assert_eq!(
            serde_json::to_string(&Vm {
                state: VmState::Paused
            })
            .unwrap(),
            r#"{"state":"Paused"}"#
        );
    }
}

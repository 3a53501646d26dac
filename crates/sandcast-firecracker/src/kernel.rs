//! The guest kernel: an uncompressed `vmlinux`, an optional initramfs, and a
//! check of the kernel's `.config` when one is shipped beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options a sandcast guest kernel needs built in (`=y`), or as modules
/// (`=m`) when an initramfs loads them, with why.
pub const REQUIRED_OPTIONS: &[(&str, &str)] = &[
    (
        "ACPI",
        "Firecracker 1.16 describes its virtio-mmio devices through ACPI",
    ),
    ("VIRTIO_MMIO", "every Firecracker device is virtio-mmio"),
    ("VIRTIO_BLK", "root and writable drives"),
    ("VIRTIO_NET", "the network interface"),
    ("VIRTIO_VSOCKETS", "the agent channel"),
    ("EXT4_FS", "the image and the writable drive are ext4"),
    ("OVERLAY_FS", "the writable layer over the read-only root"),
    ("USER_NS", "Chromium's own sandbox"),
];

/// Options without which a session still works, but less well.
pub const RECOMMENDED_OPTIONS: &[(&str, &str)] = &[
    (
        "SERIO_I8042",
        "SendCtrlAltDel reaches the guest through the i8042 controller; without it a stop waits for the grace period and kills the VM",
    ),
    (
        "KEYBOARD_ATKBD",
        "the AT keyboard driver turns Ctrl+Alt+Del into a clean shutdown",
    ),
];

/// A guest kernel, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// The uncompressed kernel (ELF `vmlinux`).
    pub vmlinux: PathBuf,
    /// An initramfs, when the kernel needs modules from one.
    pub initramfs: Option<PathBuf>,
    /// What the `.config` check found, when there was a config.
    pub config_report: Option<ConfigReport>,
}

/// The result of checking a kernel `.config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigReport {
    /// The config file that was read.
    pub path: PathBuf,
    /// Required options that are missing, each with why it is needed.
    pub missing: Vec<String>,
    /// Recommended options that are missing, each with what is lost.
    pub warnings: Vec<String>,
    /// Required options that are modules (fine with an initramfs that loads them).
    pub modules: Vec<String>,
}

impl ConfigReport {
    /// Whether every required option is there.
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Why a kernel cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The file is missing or unreadable.
    #[error("guest kernel {path}: {reason}")]
    Unreadable {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not an uncompressed ELF kernel.
    #[error(
        "guest kernel {path} is not an uncompressed vmlinux (ELF); Firecracker on x86_64 boots only ELF kernels, not bzImage: {found}"
    )]
    NotElf {
        /// The path given.
        path: PathBuf,
        /// What the file looks like instead.
        found: String,
    },
    /// The config lacks required options.
    #[error("guest kernel config {path} is missing: {}", missing.join("; "))]
    MissingOptions {
        /// The config file.
        path: PathBuf,
        /// Each missing option with why it is needed.
        missing: Vec<String>,
    },
}

/// Checks a kernel: the vmlinux is an ELF file, the initramfs (if any) is
/// readable, and the config (given, or `<vmlinux>.config`, or `.config` in
/// the same directory) has every required option.
pub fn check_kernel(
    vmlinux: &Path,
    initramfs: Option<&Path>,
    config: Option<&Path>,
) -> Result<GuestKernel, KernelError> {
    let unreadable = |p: &Path, e: std::io::Error| KernelError::Unreadable {
        path: p.to_owned(),
        reason: e.to_string(),
    };
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(vmlinux).map_err(|e| unreadable(vmlinux, e))?;
        let n = f.read(&mut head).map_err(|e| unreadable(vmlinux, e))?;
        if n < 4 || head != *b"\x7fELF" {
            let found = if head[..2] == [0x4d, 0x5a] {
                "it starts like a bzImage/PE file".to_owned()
            } else if head[..2] == [0x1f, 0x8b] {
                "it is gzip-compressed".to_owned()
            } else {
                format!("its first bytes are {:02x?}", &head[..n])
            };
            return Err(KernelError::NotElf {
                path: vmlinux.to_owned(),
                found,
            });
        }
    }
    if let Some(initrd) = initramfs {
        std::fs::metadata(initrd).map_err(|e| unreadable(initrd, e))?;
    }
    let config = match config {
        Some(c) => Some(c.to_owned()),
        None => beside(vmlinux),
    };
    let config_report = match config {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| unreadable(&path, e))?;
            let report = check_config(&path, &text, initramfs.is_some());
            if !report.ok() {
                return Err(KernelError::MissingOptions {
                    path,
                    missing: report.missing,
                });
            }
            Some(report)
        }
        None => None,
    };
    Ok(GuestKernel {
        vmlinux: vmlinux.to_owned(),
        initramfs: initramfs.map(Path::to_owned),
        config_report,
    })
}

/// A kernel config shipped beside the kernel: `<vmlinux>.config`, or
/// `.config` / `config` in its directory.
fn beside(vmlinux: &Path) -> Option<PathBuf> {
    let mut own = vmlinux.as_os_str().to_owned();
    own.push(".config");
    let dir = vmlinux.parent().unwrap_or(Path::new("."));
    [PathBuf::from(own), dir.join(".config"), dir.join("config")]
        .into_iter()
        .find(|p| p.is_file())
}

/// Checks a kernel config's text. `=m` counts for a required option only
/// when an initramfs is there to load the module.
pub fn check_config(path: &Path, text: &str, have_initramfs: bool) -> ConfigReport {
    let mut values: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.trim().split_once('=')
            && let Some(name) = k.strip_prefix("CONFIG_")
        {
            values.insert(name, v);
        }
    }
    let mut report = ConfigReport {
        path: path.to_owned(),
        ..ConfigReport::default()
    };
    for (name, why) in REQUIRED_OPTIONS {
        match values.get(name).copied() {
            Some("y") => {}
            Some("m") if have_initramfs => report.modules.push(format!("CONFIG_{name}")),
            Some("m") => report.missing.push(format!(
                "CONFIG_{name} is a module (=m) but no initramfs is given to load it ({why})"
            )),
            _ => report
                .missing
                .push(format!("CONFIG_{name} is not set ({why})")),
        }
    }
    for (name, why) in RECOMMENDED_OPTIONS {
        if values.get(name).copied() != Some("y") {
            report
                .warnings
                .push(format!("CONFIG_{name} is not built in: {why}"));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ci_config() -> (PathBuf, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/firecracker/microvm-kernel-ci-x86_64-6.1.config");
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    #[test]
    fn firecracker_ci_config_has_every_required_option() {
        let (path, text) = ci_config();
        let report = check_config(&path, &text, false);
        assert!(report.ok(), "{:?}", report.missing);
        // That config has no i8042 keyboard: said, not fatal.
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.starts_with("CONFIG_SERIO_I8042")),
            "{:?}",
            report.warnings
        );
    }

    #[test]
    fn removed_options_are_named_exactly() {
        let (path, text) = ci_config();
        let text: String = text
            .lines()
            .filter(|l| {
                !l.starts_with("CONFIG_OVERLAY_FS=") && !l.starts_with("CONFIG_VIRTIO_VSOCKETS=")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let text = text.replace("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_BLK=m");
        let report = check_config(&path, &text, false);
        let names: Vec<&str> = report
            .missing
            .iter()
            .map(|m| m.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "CONFIG_VIRTIO_BLK",
                "CONFIG_VIRTIO_VSOCKETS",
                "CONFIG_OVERLAY_FS"
            ]
        );
        assert!(report.missing[0].contains("no initramfs"));
        // With an initramfs a module is acceptable.
        let with_initrd = check_config(&path, &text, true);
        assert_eq!(with_initrd.missing.len(), 2);
        assert_eq!(with_initrd.modules, ["CONFIG_VIRTIO_BLK"]);
    }

    #[test]
    fn kernel_files_are_checked() {
        let dir = tempdir();
        let k = dir.join("vmlinux");
        std::fs::write(&k, b"MZ\x00\x00bzimage").unwrap();
        let e = check_kernel(&k, None, None).unwrap_err();
        assert!(matches!(e, KernelError::NotElf { .. }), "{e}");
        assert!(e.to_string().contains("bzImage"), "{e}");

        let e = check_kernel(&dir.join("absent"), None, None).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");

        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        let ok = check_kernel(&k, None, None).unwrap();
        assert!(ok.config_report.is_none());

        // A config beside the kernel is found and enforced.
        let (_, text) = ci_config();
        std::fs::write(
            dir.join("vmlinux.config"),
            text.replace("CONFIG_ACPI=y", ""),
        )
        .unwrap();
        let e = check_kernel(&k, None, None).unwrap_err();
        assert!(e.to_string().contains("CONFIG_ACPI is not set"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sandcast-fc-kernel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

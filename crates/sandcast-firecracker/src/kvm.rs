//! Whether this host's KVM can run a guest at all.
//!
//! A `/dev/kvm` that opens is not enough: nested or restricted hosts expose
//! one that fails to create a VM or to run a vCPU. The probe creates a VM with
//! one page of real-mode code (`mov al, 42; out 0x10, al; hlt`) and checks
//! that the vCPU exits on that port write with that value.

use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use std::os::fd::{FromRawFd, IntoRawFd};

use kvm_ioctls::{Kvm, VcpuExit};

/// The KVM API version every current kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Why Linux guests cannot boot on this host's KVM although Firecracker
/// runs, or `None` when nothing says so. `sys_module` is `/sys/module`: a
/// loaded `kvm_pvm` is the paravirtual KVM (PVM) of nested cloud machines,
/// which emulates guest kernel code instruction by instruction and stops a
/// Linux kernel early in boot (`KVM_EXIT_INTERNAL_ERROR`), while a tiny
/// guest and the probe run.
pub fn linux_guests_unsupported(sys_module: &Path) -> Option<String> {
    sys_module.join("kvm_pvm").exists().then(|| {
        "/dev/kvm is a paravirtual KVM (kvm_pvm): Firecracker runs, but a Linux guest stops with an emulation failure early in boot; microVM sessions need hardware KVM (bare metal or VMX nesting)".to_owned()
    })
}

/// Runs the probe against the KVM device at `path`; the error says exactly
/// which step failed.
pub fn probe(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if !path.exists() {
        return Err(format!(
            "{shown} does not exist: this host has no KVM (hardware virtualisation off, or not exposed to this machine)"
        ));
    }
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {shown}: {e} (is this user in the kvm group?)"))?;
    // SAFETY: `fd` is an open file we own; Kvm takes ownership of the descriptor.
    let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(format!(
            "{shown} is not a usable KVM device: KVM_GET_API_VERSION returned {version}, expected {KVM_API_VERSION}"
        ));
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("{shown}: KVM_CREATE_VM failed: {e}"))?;
    let page = GuestPage::new().map_err(|e| format!("mapping guest memory: {e}"))?;
    page.write(&[0xb0, 42, 0xe6, 0x10, 0xf4]);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: 0x1000,
        userspace_addr: page.addr as u64,
        flags: 0,
    };
    // SAFETY: the region maps `page`, which outlives `vm` (dropped first below).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("{shown}: KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("{shown}: KVM_CREATE_VCPU failed: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("{shown}: KVM_GET_SREGS failed: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("{shown}: KVM_SET_SREGS failed: {e}"))?;
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| format!("{shown}: KVM_GET_REGS failed: {e}"))?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("{shown}: KVM_SET_REGS failed: {e}"))?;
    let result = match vcpu.run() {
        Ok(VcpuExit::IoOut(0x10, data)) if data.first() == Some(&42) => Ok(()),
        Ok(other) => Err(format!(
            "{shown} cannot run a guest: the probe vCPU exited with {other:?} instead of its port write"
        )),
        Err(e) => Err(format!("{shown} cannot run a guest: KVM_RUN failed: {e}")),
    };
    drop(vcpu);
    drop(vm);
    drop(page);
    result
}

/// One anonymous page of guest memory.
struct GuestPage {
    addr: *mut u8,
}

impl GuestPage {
    fn new() -> std::io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; checked for failure.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x1000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(GuestPage { addr: addr.cast() })
    }

    fn write(&self, code: &[u8]) {
        assert!(code.len() <= 0x1000);
        // SAFETY: the page is 4 KiB, writable and ours.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.addr, code.len()) };
    }
}

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.addr.cast(), 0x1000) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_named() {
        let e = probe(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(e.contains("/nonexistent/kvm does not exist"), "{e}");
    }

    #[test]
    fn a_device_that_is_not_kvm_is_refused() {
        let e = probe(Path::new("/dev/null")).unwrap_err();
        assert!(e.contains("/dev/null"), "{e}");
    }

    #[test]
    fn probe_of_this_host_gives_an_answer() {
        // Either answer is fine here; what matters is that an unusable KVM
        // is reported as text naming the device, not as a panic or a hang.
        match probe(Path::new("/dev/kvm")) {
            Ok(()) => println!("/dev/kvm runs the probe guest"),
            Err(e) => {
                println!("/dev/kvm unusable: {e}");
                assert!(e.contains("/dev/kvm"));
            }
        }
    }

    #[test]
    fn a_paravirtual_kvm_is_named() {
        let t = std::env::temp_dir().join(format!("sc-kvm-mod-{}", std::process::id()));
        std::fs::create_dir_all(t.join("kvm")).unwrap();
        assert_eq!(linux_guests_unsupported(&t), None);
        std::fs::create_dir_all(t.join("kvm_pvm")).unwrap();
        let why = linux_guests_unsupported(&t).unwrap();
        assert!(
            why.contains("kvm_pvm") && why.contains("hardware KVM"),
            "{why}"
        );
        std::fs::remove_dir_all(&t).unwrap();
    }
}

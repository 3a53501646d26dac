//! The seccomp filter every process of a session runs under.
//!
//! A deny-list anchored on Docker's default profile: the system calls a
//! container without capabilities may not make (kernel keyrings, BPF,
//! performance events, userfaultfd, kexec, modules, mounts, new namespaces,
//! ptrace, odd personalities, accounting, swap, reboot, the clock, I/O ports,
//! quotas, file handles, io_uring, …) fail with `EPERM`. The program is
//! compiled with `seccompiler` and handed to bwrap (`--add-seccomp-fd`),
//! which loads it into its own init and the agent right before exec: no
//! process of the session ever runs without it, so no process of the session
//! can be ptraced into making an unfiltered call (and ptrace is denied too).
//!
//! Only the x86_64 system call ABI is allowed: a call through the i386 ABI
//! (another audit architecture) kills the process, as seccompiler's
//! architecture check does, and an x32 call (x86_64 with bit 30 set in the
//! number) fails with `EPERM`. `clone3` fails with `ENOSYS`, as in Docker:
//! its flags live in memory a filter cannot read, and `ENOSYS` makes the C
//! library fall back to `clone`, whose flags are checked.
//!
//! Nested user namespaces are denied (`clone`/`unshare` with any namespace
//! flag, `setns`): the kernel surface reachable from a user namespace where
//! one is root is the largest source of local privilege escalations. The
//! price is that Chromium's own namespace sandbox cannot start, so it runs
//! with `--no-sandbox` and the session is its only sandbox (see
//! `docs/security.md`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// System calls that always fail with `EPERM` in a session, by name.
pub const DENIED: &[(&str, i64)] = &[
    // Kernel keyrings are not namespaced.
    ("add_key", libc::SYS_add_key),
    ("keyctl", libc::SYS_keyctl),
    ("request_key", libc::SYS_request_key),
    // Large kernel surfaces a browser does not need.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("fanotify_init", libc::SYS_fanotify_init),
    // The kernel itself.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("syslog", libc::SYS_syslog),
    ("_sysctl", libc::SYS__sysctl),
    ("uselib", libc::SYS_uselib),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("vhangup", libc::SYS_vhangup),
    // Mounts (bwrap has made them all before the filter is loaded).
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    // Joining namespaces.
    ("setns", libc::SYS_setns),
    // Other processes' memory: session code must not drive the agent.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    // Host-wide state.
    ("acct", libc::SYS_acct),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    // File handles bypass the mount namespace's view.
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
];

/// Namespace flags `clone` may not carry (Docker's mask `0x7E020000`).
const CLONE_NS_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// `personality(2)` values allowed (Docker's): Linux, `UNAME26`,
/// `ADDR_NO_RANDOMIZE` and both, and the query `0xffffffff`.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Terminal ioctls that push input into another program's terminal.
const TTY_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

/// Bit 30 of the system call number marks the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index is below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule has conditions")
}

/// One rule per flag: the call matches when any flag is set.
fn any_flag(arg: u8, flags: &[i32]) -> Vec<SeccompRule> {
    flags
        .iter()
        .map(|f| {
            let f = u64::from(f.cast_unsigned());
            rule(vec![cond(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(f),
                f,
            )])
        })
        .collect()
}

/// The main filter: [`DENIED`] and the conditional denials, `EPERM`.
fn deny_filter() -> SeccompFilter {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    rules.insert(libc::SYS_clone, any_flag(0, &CLONE_NS_FLAGS));
    let mut unshare_flags = CLONE_NS_FLAGS.to_vec();
    unshare_flags.push(libc::CLONE_NEWTIME);
    rules.insert(libc::SYS_unshare, any_flag(0, &unshare_flags));
    // Denied unless the argument is one of the allowed values.
    rules.insert(
        libc::SYS_personality,
        vec![rule(
            PERSONALITIES
                .iter()
                .map(|p| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *p))
                .collect(),
        )],
    );
    rules.insert(
        libc::SYS_ioctl,
        TTY_IOCTLS
            .iter()
            .map(|r| rule(vec![cond(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *r)]))
            .collect(),
    );
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.cast_unsigned()),
        TargetArch::x86_64,
    )
    .expect("distinct actions")
}

/// `clone3` reports `ENOSYS` so that the C library falls back to `clone`.
fn clone3_filter() -> SeccompFilter {
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.cast_unsigned()),
        TargetArch::x86_64,
    )
    .expect("distinct actions")
}

/// x32 system calls (same audit architecture as x86_64, so seccompiler's
/// architecture check lets them through) fail with `EPERM`. Three
/// instructions: seccompiler keys rules by exact number, not by range.
fn x32_guard() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        ins(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(BPF_RET_K, 0, 0, RET_ERRNO | libc::EPERM.cast_unsigned()),
        ins(BPF_RET_K, 0, 0, RET_ALLOW),
    ]
}

/// The compiled programs, each as the bytes of a `struct sock_filter`
/// array, in the order they go to bwrap (`--add-seccomp-fd` each). The
/// kernel runs them all and the strictest answer wins.
pub fn programs() -> Result<Vec<Vec<u8>>, String> {
    let compile = |f: SeccompFilter| -> Result<BpfProgram, String> {
        f.try_into()
            .map_err(|e: seccompiler::BackendError| format!("compiling the seccomp filter: {e}"))
    };
    let progs = [
        compile(deny_filter())?,
        compile(clone3_filter())?,
        x32_guard(),
    ];
    Ok(progs.iter().map(|p| to_bytes(p)).collect())
}

fn to_bytes(prog: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads the programs in a forked child (as bwrap does: no_new_privs,
    /// then each filter) and makes the calls; the child's exit code is the
    /// index of the first check that failed, 0 when all passed.
    #[test]
    fn filters_deny_with_eperm_and_allow_the_rest() {
        let progs = programs().unwrap();
        let fprogs: Vec<libc::sock_fprog> = progs
            .iter()
            .map(|p| libc::sock_fprog {
                len: u16::try_from(p.len() / 8).unwrap(),
                filter: p.as_ptr().cast_mut().cast(),
            })
            .collect();
        // SAFETY: the child makes only raw system calls on data prepared
        // before fork, then _exit()s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                let errno = || *libc::__errno_location();
                let fails_with = |r: libc::c_long, e: i32| r == -1 && errno() == e;
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(100);
                }
                for f in &fprogs {
                    if libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        f as *const libc::sock_fprog,
                    ) != 0
                    {
                        libc::_exit(101);
                    }
                }
                let checks: [bool; 12] = [
                    fails_with(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0), libc::EPERM),
                    fails_with(libc::syscall(libc::SYS_bpf, 0, 0, 0), libc::EPERM),
                    fails_with(
                        libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
                        libc::EPERM,
                    ),
                    fails_with(
                        libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS),
                        libc::EPERM,
                    ),
                    // Without namespace flags unshare is allowed.
                    libc::syscall(libc::SYS_unshare, libc::CLONE_FILES) == 0,
                    fails_with(libc::syscall(libc::SYS_clone3, 0, 0), libc::ENOSYS),
                    fails_with(libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0), libc::EPERM),
                    fails_with(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0), libc::EPERM),
                    // READ_IMPLIES_EXEC is refused, the query answered.
                    fails_with(libc::syscall(libc::SYS_personality, 0x40_0000), libc::EPERM),
                    libc::syscall(libc::SYS_personality, 0xffff_ffffu32) >= 0,
                    // x32 numbering of getpid.
                    fails_with(
                        libc::syscall(i64::from(X32_SYSCALL_BIT) | libc::SYS_getpid),
                        libc::EPERM,
                    ),
                    libc::syscall(libc::SYS_getpid) > 0,
                ];
                for (i, ok) in checks.iter().enumerate() {
                    if !ok {
                        libc::_exit(i32::try_from(i).unwrap_or(99) + 1);
                    }
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "check number (1-based) that failed in the filtered child"
        );
    }

    #[test]
    fn every_denied_call_is_in_the_main_program() {
        let bytes = programs().unwrap();
        assert_eq!(bytes.len(), 3);
        let main = &bytes[0];
        for (name, nr) in DENIED {
            // A jump comparing the number with the call's: code 0x15, k = nr.
            let found = main.chunks(8).any(|i| {
                u16::from_ne_bytes([i[0], i[1]]) == 0x15
                    && u32::from_ne_bytes([i[4], i[5], i[6], i[7]]) == *nr as u32
            });
            assert!(found, "{name} is not compared in the filter");
        }
        assert_eq!(bytes[2].len(), 4 * 8);
    }
}

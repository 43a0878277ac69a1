//! The seccomp filter loaded by bubblewrap (`--seccomp FD`) just before it executes the task's
//! runtime: a deny-list, compiled to classic BPF by [`seccompiler`] (rust-vmm, the compiler
//! Firecracker uses) for the architecture this binary was built for (x86_64 or aarch64).
//!
//! What this module owns: the policy (which system calls and arguments are refused, and how),
//! stated once as data ([`denied_syscalls`], [`ALLOWED_SOCKET_FAMILIES`], [`CLONE_NEW_FLAGS`],
//! [`DENIED_IOCTLS`]), and the bytes bubblewrap reads. It does not install the filter: bubblewrap
//! does, with `PR_SET_SECCOMP`, after it has built the namespaces (which need the calls we deny).
//!
//! Why a deny-list and not an allow-list: Python and R (with their C extensions, BLAS, threads)
//! use a wide and changing set of system calls; an allow-list breaks them in ways that are hard
//! to see. The namespaces, the dropped capabilities and the unprivileged host uid are the main
//! walls; this filter removes the kernel surface that none of them covers well (keyrings, BPF,
//! perf, io_uring, userfaultfd, the mount API, nested namespaces, ptrace and cross-process memory
//! access, vsock) and the terminal-injection ioctls.
//!
//! Actions: a foreign architecture (i386 `int 0x80` on x86_64, arm32 compat on aarch64) or the
//! x32 ABI kills the process; a denied call fails with `EPERM` (so a program that probes, e.g.
//! Python's `os.unshare`, gets an error it can handle instead of dying); `clone3` fails with
//! `ENOSYS` so libc falls back to `clone`, whose flags a classic filter can inspect.
//!
//! Why a short hand-written prologue remains: a [`SeccompFilter`] has one action for every
//! match, and it compares syscall numbers only for equality. The two rules that need something
//! else, killing the x32 ABI (every number at or above `__X32_SYSCALL_BIT`, a range) and `ENOSYS`
//! for `clone3` (a second action), are [`prologue`]: eight instructions on x86_64 (six on
//! aarch64) that check the architecture themselves and fall through into seccompiler's program,
//! which checks it again. Everything with argument conditions is seccompiler's.
//!
//! Cost: seccompiler's program is longer than the hand-assembled one was (417 instructions
//! against 162 on x86_64) and an allowed call passes about two instructions per rule chain
//! instead of one. The kernel JIT-compiles the filter, so the extra cost per call should be
//! small; it was not measured on its own (`benches/sandbox_overhead.rs` measures whole runs).
//!
//! The output is the raw `struct sock_filter[]` bytes (8 bytes per instruction, native endian)
//! that bubblewrap reads from the descriptor and installs.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Seccomp return actions (linux/seccomp.h), for the prologue and the tests.
pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// `AUDIT_ARCH_X86_64` (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `AUDIT_ARCH_AARCH64` (EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
pub const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;
/// System call numbers at or above this are the x32 ABI on x86_64.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// A syscall number as seccompiler takes it (the `libc::SYS_*` type).
type Nr = libc::c_long;

/// The system calls that fail with `EPERM` inside the sandbox, by name, with this architecture's
/// numbers (from `libc`, so each architecture gets its own), grouped by the reason for denying them.
///
/// Calls an architecture does not have (aarch64 never had `iopl` or `modify_ldt`) are simply
/// absent from its list.
pub fn denied_syscalls() -> Vec<(&'static str, Nr)> {
    use libc::*;
    let denied = [
        // Debugging and reading/writing other processes' memory.
        ("ptrace", SYS_ptrace),
        ("process_vm_readv", SYS_process_vm_readv),
        ("process_vm_writev", SYS_process_vm_writev),
        ("kcmp", SYS_kcmp),
        ("pidfd_getfd", SYS_pidfd_getfd),
        ("process_madvise", SYS_process_madvise),
        // Mounts and the new mount API, root switching.
        ("mount", SYS_mount),
        ("umount2", SYS_umount2),
        ("pivot_root", SYS_pivot_root),
        ("chroot", SYS_chroot),
        ("open_tree", SYS_open_tree),
        ("move_mount", SYS_move_mount),
        ("fsopen", SYS_fsopen),
        ("fsconfig", SYS_fsconfig),
        ("fsmount", SYS_fsmount),
        ("fspick", SYS_fspick),
        ("mount_setattr", SYS_mount_setattr),
        // Namespaces (clone with CLONE_NEW* is handled separately).
        ("unshare", SYS_unshare),
        ("setns", SYS_setns),
        // Kernel keyrings (not namespaced).
        ("add_key", SYS_add_key),
        ("request_key", SYS_request_key),
        ("keyctl", SYS_keyctl),
        // eBPF, perf, io_uring, userfaultfd: large attack surface, frequent CVEs.
        ("bpf", SYS_bpf),
        ("perf_event_open", SYS_perf_event_open),
        ("io_uring_setup", SYS_io_uring_setup),
        ("io_uring_enter", SYS_io_uring_enter),
        ("io_uring_register", SYS_io_uring_register),
        ("userfaultfd", SYS_userfaultfd),
        ("fanotify_init", SYS_fanotify_init),
        // File handles bypass path-based checks.
        ("name_to_handle_at", SYS_name_to_handle_at),
        ("open_by_handle_at", SYS_open_by_handle_at),
        // Kernel modules, kexec, reboot, swap, accounting, quotas.
        ("init_module", SYS_init_module),
        ("finit_module", SYS_finit_module),
        ("delete_module", SYS_delete_module),
        ("kexec_load", SYS_kexec_load),
        ("kexec_file_load", SYS_kexec_file_load),
        ("reboot", SYS_reboot),
        ("swapon", SYS_swapon),
        ("swapoff", SYS_swapoff),
        ("acct", SYS_acct),
        ("quotactl", SYS_quotactl),
        ("quotactl_fd", SYS_quotactl_fd),
        ("nfsservctl", SYS_nfsservctl),
        // Host-global clocks, names and logs.
        ("settimeofday", SYS_settimeofday),
        ("clock_settime", SYS_clock_settime),
        ("clock_adjtime", SYS_clock_adjtime),
        ("adjtimex", SYS_adjtimex),
        ("sethostname", SYS_sethostname),
        ("setdomainname", SYS_setdomainname),
        ("syslog", SYS_syslog),
        // Legacy and hardware-level calls nobody's Python or R needs.
        ("vhangup", SYS_vhangup),
        ("lookup_dcookie", SYS_lookup_dcookie),
        ("move_pages", SYS_move_pages),
    ];
    #[cfg(target_arch = "x86_64")]
    let only_here: &[(&str, Nr)] = &[
        // Removed from the kernel long ago; libc no longer names them, the numbers stay reserved.
        ("create_module", 174),
        ("get_kernel_syms", 177),
        ("query_module", 178),
        ("uselib", SYS_uselib),
        ("ustat", SYS_ustat),
        ("sysfs", SYS_sysfs),
        ("_sysctl", SYS__sysctl),
        ("modify_ldt", SYS_modify_ldt),
        ("iopl", SYS_iopl),
        ("ioperm", SYS_ioperm),
        ("afs_syscall", SYS_afs_syscall),
        ("tuxcall", SYS_tuxcall),
        ("security", SYS_security),
        ("vserver", SYS_vserver),
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let only_here: &[(&str, Nr)] = &[];
    denied.into_iter().chain(only_here.iter().copied()).collect()
}

/// ioctls that push input into a terminal or drive the Linux console.
pub const DENIED_IOCTLS: &[(&str, u32)] = &[("TIOCSTI", libc::TIOCSTI as u32), ("TIOCLINUX", libc::TIOCLINUX as u32)];

/// `clone` flags that create namespaces (`CLONE_NEWTIME` shares its bit with the exit signal in
/// `clone`'s first argument and only exists for `clone3`/`unshare`, both denied).
pub const CLONE_NEW_FLAGS: &[(&str, u32)] = &[
    ("CLONE_NEWNS", libc::CLONE_NEWNS as u32),
    ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP as u32),
    ("CLONE_NEWUTS", libc::CLONE_NEWUTS as u32),
    ("CLONE_NEWIPC", libc::CLONE_NEWIPC as u32),
    ("CLONE_NEWUSER", libc::CLONE_NEWUSER as u32),
    ("CLONE_NEWPID", libc::CLONE_NEWPID as u32),
    ("CLONE_NEWNET", libc::CLONE_NEWNET as u32),
];

/// Socket families a program may create: local, IPv4/IPv6 (the network namespace has only `lo`)
/// and netlink (glibc's `getaddrinfo` uses it). Everything else is refused, in particular
/// `AF_VSOCK`, which is not network-namespaced and reaches the hypervisor host from a VM.
pub const ALLOWED_SOCKET_FAMILIES: &[u32] =
    &[libc::AF_UNIX as u32, libc::AF_INET as u32, libc::AF_INET6 as u32, libc::AF_NETLINK as u32];

/// Why no filter could be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy's syscall numbers are only known for x86_64 and aarch64; running without the
    /// filter would silently weaken the sandbox, so the backend refuses to start.
    #[error("the sandbox's seccomp filter is only defined for x86_64 and aarch64, not {0}")]
    UnsupportedArch(&'static str),
    /// seccompiler refused the policy (a bug in this module, caught by its tests).
    #[error("cannot compile the sandbox's seccomp filter: {0}")]
    Compile(#[from] BackendError),
}

/// The architecture this binary was built for, as seccompiler names it, and its audit value.
fn host_arch() -> Result<(TargetArch, u32), SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok((TargetArch::x86_64, AUDIT_ARCH_X86_64))
    } else if cfg!(target_arch = "aarch64") {
        Ok((TargetArch::aarch64, AUDIT_ARCH_AARCH64))
    } else {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// The filter for the architecture this binary was built for: [`prologue`], then seccompiler's
/// compilation of the `EPERM` rules.
///
/// # Errors
/// [`SeccompError::UnsupportedArch`] on anything but x86_64 and aarch64.
pub fn program_for_host() -> Result<BpfProgram, SeccompError> {
    let (arch, audit_arch) = host_arch()?;
    let eperm: BpfProgram = eperm_filter(arch)?.try_into()?;
    let mut program = prologue(audit_arch);
    program.extend(eperm);
    Ok(program)
}

/// `Errno(EPERM)` for every denied call, for `clone` with a namespace flag, for the denied
/// ioctls and for socket families outside the allow-list; everything else is allowed.
fn eperm_filter(arch: TargetArch) -> Result<SeccompFilter, BackendError> {
    // Only the low 32 bits of these arguments are compared (`Dword`): the kernel reads them as
    // `int`/`unsigned int`, so a program setting high bits would slip past a 64-bit comparison.
    let low32 =
        |arg: u8, op: SeccompCmpOp, value: u32| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value.into());

    let mut rules: BTreeMap<Nr, Vec<SeccompRule>> =
        denied_syscalls().into_iter().map(|(_, nr)| (nr, Vec::new())).collect();
    // clone: any namespace flag in the first argument (one rule per flag; rules are or-ed).
    let clone = CLONE_NEW_FLAGS
        .iter()
        .map(|&(_, flag)| SeccompRule::new(vec![low32(0, SeccompCmpOp::MaskedEq(flag.into()), flag)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_clone, clone);
    // ioctl: the request is the second argument.
    let ioctl = DENIED_IOCTLS
        .iter()
        .map(|&(_, request)| SeccompRule::new(vec![low32(1, SeccompCmpOp::Eq, request)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl);
    // socket: a family that is none of the allowed ones (conditions of one rule are and-ed).
    let other_family =
        ALLOWED_SOCKET_FAMILIES.iter().map(|&f| low32(0, SeccompCmpOp::Ne, f)).collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(other_family)?]);

    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
}

// Classic BPF opcodes (linux/bpf_common.h), for the prologue only.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
                             // Offsets into `struct seccomp_data { int nr; __u32 arch; __u64 ip; __u64 args[6]; }`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;

/// What a [`SeccompFilter`] cannot say: kill a foreign architecture, kill the x32 ABI (a range
/// of numbers; x86_64 only) and answer `clone3` with `ENOSYS` (an action other than `EPERM`).
/// Anything else falls through to the next instruction, the start of seccompiler's program.
pub fn prologue(audit_arch: u32) -> BpfProgram {
    let insn = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    let mut p = vec![
        // Architecture check: anything else (e.g. i386 via int 0x80) is killed.
        insn(BPF_LD_W_ABS, OFF_ARCH, 0, 0),
        insn(BPF_JEQ_K, audit_arch, 1, 0),
        insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS, 0, 0),
        insn(BPF_LD_W_ABS, OFF_NR, 0, 0),
    ];
    if audit_arch == AUDIT_ARCH_X86_64 {
        // x32 ABI numbers alias the x86_64 ones with a high bit set, past every rule: kill.
        p.push(insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1));
        p.push(insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS, 0, 0));
    }
    // clone3 passes its flags in memory, which BPF cannot read: ENOSYS makes glibc use clone.
    p.push(insn(BPF_JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    p.push(insn(BPF_RET_K, SECCOMP_RET_ERRNO | libc::ENOSYS as u32, 0, 0));
    p
}

/// Serializes a program as the bytes of a `struct sock_filter[]`.
pub fn to_bytes(program: &[sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests;

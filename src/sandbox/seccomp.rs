//! The seccomp filter loaded by bubblewrap (`--seccomp FD`) just before it executes the task's
//! runtime: a classic-BPF deny-list for x86_64.
//!
//! Why a deny-list and not an allow-list: Python and R (with their C extensions, BLAS, threads)
//! use a wide and changing set of system calls; an allow-list breaks them in ways that are hard
//! to see. The namespaces, the dropped capabilities and the unprivileged host uid are the main
//! walls; this filter removes the kernel surface that none of them covers well (keyrings, BPF,
//! perf, io_uring, userfaultfd, the mount API, nested namespaces, ptrace and cross-process memory
//! access, vsock) and the terminal-injection ioctls.
//!
//! Actions: a foreign architecture (i386 `int 0x80`) or the x32 ABI kills the process; a denied
//! call fails with `EPERM` (so a program that probes, e.g. Python's `os.unshare`, gets an error it
//! can handle instead of dying); `clone3` fails with `ENOSYS` so libc falls back to `clone`, whose
//! flags a classic filter can inspect.
//!
//! The output is the raw `struct sock_filter[]` bytes (8 bytes per instruction, native endian)
//! that bubblewrap reads from the descriptor and installs with `PR_SET_SECCOMP`.

/// `struct sock_filter` as the kernel expects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// Seccomp return actions (linux/seccomp.h).
pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

/// `AUDIT_ARCH_X86_64` (EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// System call numbers at or above this are the x32 ABI on x86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Offsets into `struct seccomp_data { int nr; __u32 arch; __u64 ip; __u64 args[6]; }`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of argument `i` (little endian).
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// x86_64 system calls that fail with `EPERM` inside the sandbox, with the reason for each group.
pub const DENIED_SYSCALLS: &[(&str, u32)] = &[
    // Debugging and reading/writing other processes' memory.
    ("ptrace", 101),
    ("process_vm_readv", 310),
    ("process_vm_writev", 311),
    ("kcmp", 312),
    ("pidfd_getfd", 438),
    ("process_madvise", 440),
    // Mounts and the new mount API, root switching.
    ("mount", 165),
    ("umount2", 166),
    ("pivot_root", 155),
    ("chroot", 161),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("mount_setattr", 442),
    // Namespaces (clone with CLONE_NEW* is handled separately).
    ("unshare", 272),
    ("setns", 308),
    // Kernel keyrings (not namespaced).
    ("add_key", 248),
    ("request_key", 249),
    ("keyctl", 250),
    // eBPF, perf, io_uring, userfaultfd: large attack surface, frequent CVEs.
    ("bpf", 321),
    ("perf_event_open", 298),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("userfaultfd", 323),
    ("fanotify_init", 300),
    // File handles bypass path-based checks.
    ("name_to_handle_at", 303),
    ("open_by_handle_at", 304),
    // Kernel modules, kexec, reboot, swap, accounting, quotas.
    ("init_module", 175),
    ("finit_module", 313),
    ("delete_module", 176),
    ("create_module", 174),
    ("get_kernel_syms", 177),
    ("query_module", 178),
    ("kexec_load", 246),
    ("kexec_file_load", 320),
    ("reboot", 169),
    ("swapon", 167),
    ("swapoff", 168),
    ("acct", 163),
    ("quotactl", 179),
    ("quotactl_fd", 443),
    ("nfsservctl", 180),
    // Host-global clocks, names and logs.
    ("settimeofday", 164),
    ("clock_settime", 227),
    ("clock_adjtime", 305),
    ("adjtimex", 159),
    ("sethostname", 170),
    ("setdomainname", 171),
    ("syslog", 103),
    // Legacy and hardware-level calls nobody's Python or R needs.
    ("uselib", 134),
    ("ustat", 136),
    ("sysfs", 139),
    ("_sysctl", 156),
    ("vhangup", 153),
    ("modify_ldt", 154),
    ("iopl", 172),
    ("ioperm", 173),
    ("lookup_dcookie", 212),
    ("move_pages", 279),
    ("afs_syscall", 183),
    ("tuxcall", 184),
    ("security", 185),
    ("vserver", 236),
];

const SYS_IOCTL: u32 = 16;
const SYS_SOCKET: u32 = 41;
const SYS_CLONE: u32 = 56;
const SYS_CLONE3: u32 = 435;

/// ioctls that push input into a terminal or drive the Linux console.
pub const TIOCSTI: u32 = 0x5412;
pub const TIOCLINUX: u32 = 0x541C;

/// `clone` flags that create namespaces (`CLONE_NEWTIME` shares its bit with the exit signal in
/// `clone`'s first argument and only exists for `clone3`/`unshare`, both denied).
pub const CLONE_NEW_MASK: u32 = 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET

/// Socket families a program may create: local, IPv4/IPv6 (the network namespace has only `lo`)
/// and netlink (glibc's `getaddrinfo` uses it). Everything else is refused, in particular
/// `AF_VSOCK`, which is not network-namespaced and reaches the hypervisor host from a VM.
pub const ALLOWED_SOCKET_FAMILIES: &[u32] =
    &[1 /* AF_UNIX */, 2 /* AF_INET */, 10 /* AF_INET6 */, 16 /* AF_NETLINK */];

/// Why no filter could be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedArch(pub &'static str);

impl std::fmt::Display for UnsupportedArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the sandbox's seccomp filter is only defined for x86_64, not {}", self.0)
    }
}

impl std::error::Error for UnsupportedArch {}

/// The filter for the architecture this binary was built for.
///
/// # Errors
/// [`UnsupportedArch`] on anything but x86_64: the syscall numbers above are x86_64's, and running
/// without the filter would silently weaken the sandbox, so the backend refuses to start.
pub fn program_for_host() -> Result<Vec<Insn>, UnsupportedArch> {
    if cfg!(target_arch = "x86_64") {
        Ok(x86_64_program())
    } else {
        Err(UnsupportedArch(std::env::consts::ARCH))
    }
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn ret(k: u32) -> Insn {
    stmt(BPF_RET_K, k)
}

/// The x86_64 deny-list program (see the module docs).
pub fn x86_64_program() -> Vec<Insn> {
    let eperm = SECCOMP_RET_ERRNO | EPERM;
    let mut p = vec![
        // Architecture check: anything but x86_64 (e.g. i386 via int 0x80) is killed.
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(SECCOMP_RET_KILL_PROCESS),
        // x32 ABI numbers alias the x86_64 ones with a high bit set: kill.
        stmt(BPF_LD_W_ABS, OFF_NR),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        ret(SECCOMP_RET_KILL_PROCESS),
    ];
    for &(_, nr) in DENIED_SYSCALLS {
        p.push(jump(BPF_JEQ_K, nr, 0, 1));
        p.push(ret(eperm));
    }
    // clone3 passes its flags in memory, which BPF cannot read: ENOSYS makes glibc use clone.
    p.push(jump(BPF_JEQ_K, SYS_CLONE3, 0, 1));
    p.push(ret(SECCOMP_RET_ERRNO | ENOSYS));

    // clone: refuse namespace flags.
    p.push(jump(BPF_JEQ_K, SYS_CLONE, 0, 4));
    p.push(stmt(BPF_LD_W_ABS, off_arg_lo(0)));
    p.push(jump(BPF_JSET_K, CLONE_NEW_MASK, 0, 1));
    p.push(ret(eperm));
    p.push(ret(SECCOMP_RET_ALLOW));

    // ioctl: the request is an `unsigned int`, so only the low 32 bits matter (checking all 64
    // would let a program set high bits to slip past).
    p.push(jump(BPF_JEQ_K, SYS_IOCTL, 0, 5));
    p.push(stmt(BPF_LD_W_ABS, off_arg_lo(1)));
    p.push(jump(BPF_JEQ_K, TIOCSTI, 2, 0));
    p.push(jump(BPF_JEQ_K, TIOCLINUX, 1, 0));
    p.push(ret(SECCOMP_RET_ALLOW));
    p.push(ret(eperm));

    // socket: allow-list of address families.
    let n = ALLOWED_SOCKET_FAMILIES.len();
    p.push(jump(BPF_JEQ_K, SYS_SOCKET, 0, (n + 3) as u8));
    p.push(stmt(BPF_LD_W_ABS, off_arg_lo(0)));
    for (i, &family) in ALLOWED_SOCKET_FAMILIES.iter().enumerate() {
        // On a match jump over the remaining compares and the EPERM to the ALLOW.
        p.push(jump(BPF_JEQ_K, family, (n - i) as u8, 0));
    }
    p.push(ret(eperm));
    p.push(ret(SECCOMP_RET_ALLOW));

    p.push(ret(SECCOMP_RET_ALLOW));
    p
}

/// Serializes a program as the bytes of a `struct sock_filter[]`.
pub fn to_bytes(program: &[Insn]) -> Vec<u8> {
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
mod tests {
    use super::*;

    /// A minimal classic-BPF interpreter for the instructions we emit, over a `seccomp_data`.
    fn eval(program: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            pc += 1;
            match insn.code {
                BPF_LD_W_ABS => {
                    let o = insn.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_JEQ_K => pc += if acc == insn.k { insn.jt } else { insn.jf } as usize,
                BPF_JGE_K => pc += if acc >= insn.k { insn.jt } else { insn.jf } as usize,
                BPF_JSET_K => pc += if acc & insn.k != 0 { insn.jt } else { insn.jf } as usize,
                BPF_RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn run(nr: u32, args: [u64; 6]) -> u32 {
        eval(&x86_64_program(), AUDIT_ARCH_X86_64, nr, args)
    }

    const EPERM_RET: u32 = SECCOMP_RET_ERRNO | EPERM;

    #[test]
    fn every_denied_syscall_gets_eperm() {
        for &(name, nr) in DENIED_SYSCALLS {
            assert_eq!(run(nr, [0; 6]), EPERM_RET, "{name}");
        }
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        for (name, nr) in [
            ("read", 0),
            ("write", 1),
            ("openat", 257),
            ("mmap", 9),
            ("execve", 59),
            ("exit_group", 231),
            ("kill", 62),
            ("connect", 42),
        ] {
            assert_eq!(run(nr, [0; 6]), SECCOMP_RET_ALLOW, "{name}");
        }
    }

    #[test]
    fn foreign_arch_and_x32_are_killed() {
        let p = x86_64_program();
        assert_eq!(eval(&p, 0x4000_0003 /* AUDIT_ARCH_I386 */, 1, [0; 6]), SECCOMP_RET_KILL_PROCESS);
        assert_eq!(run(X32_SYSCALL_BIT | 1, [0; 6]), SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn clone_with_namespace_flags_is_denied_and_clone3_is_enosys() {
        // What glibc's fork() passes: CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD.
        assert_eq!(run(SYS_CLONE, [0x0120_0011, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        // pthread_create's flags.
        assert_eq!(run(SYS_CLONE, [0x003d_0f00, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
        for flag in [0x0002_0000u64, 0x1000_0000, 0x2000_0000, 0x4000_0000] {
            assert_eq!(run(SYS_CLONE, [flag | 17, 0, 0, 0, 0, 0]), EPERM_RET, "{flag:#x}");
        }
        assert_eq!(run(SYS_CLONE3, [0; 6]), SECCOMP_RET_ERRNO | ENOSYS);
    }

    #[test]
    fn tiocsti_is_denied_even_with_high_bits_set() {
        assert_eq!(run(SYS_IOCTL, [0, TIOCSTI as u64, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(SYS_IOCTL, [0, (1u64 << 32) | TIOCSTI as u64, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(SYS_IOCTL, [0, TIOCLINUX as u64, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(SYS_IOCTL, [0, 0x5401 /* TCGETS */, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
    }

    #[test]
    fn only_allowed_socket_families() {
        for family in [1u64, 2, 10, 16] {
            assert_eq!(run(SYS_SOCKET, [family, 1, 0, 0, 0, 0]), SECCOMP_RET_ALLOW, "{family}");
        }
        for family in [40u64 /* AF_VSOCK */, 17 /* AF_PACKET */, 31 /* AF_BLUETOOTH */] {
            assert_eq!(run(SYS_SOCKET, [family, 1, 0, 0, 0, 0]), EPERM_RET, "{family}");
        }
    }

    #[test]
    fn bytes_are_eight_per_instruction_and_every_jump_stays_inside() {
        let p = x86_64_program();
        assert_eq!(to_bytes(&p).len(), p.len() * 8);
        assert!(p.len() < 4096, "BPF_MAXINSNS");
        for (i, insn) in p.iter().enumerate() {
            if insn.code != BPF_RET_K && insn.code != BPF_LD_W_ABS {
                assert!(i + 1 + (insn.jt.max(insn.jf) as usize) < p.len(), "jump out of range at {i}");
            }
        }
        assert_eq!(p.last().unwrap().k, SECCOMP_RET_ALLOW);
    }
}

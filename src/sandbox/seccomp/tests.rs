use super::*;

const EPERM_RET: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ENOSYS_RET: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

fn host_audit_arch() -> u32 {
    host_arch().expect("tests run on x86_64 or aarch64").1
}

/// A classic-BPF interpreter for every instruction the prologue and seccompiler emit, over a
/// `seccomp_data`. It also checks what the kernel's verifier would refuse: jumps out of range
/// and falling off the end.
fn eval(program: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
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
        let insn = program.get(pc).unwrap_or_else(|| panic!("fell off the program at {pc}"));
        pc += 1;
        let cond = |c: bool| if c { insn.jt } else { insn.jf } as usize;
        match insn.code {
            0x20 /* LD W ABS */ => {
                let o = insn.k as usize;
                acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
            }
            0x54 /* ALU AND K */ => acc &= insn.k,
            0x05 /* JA */ => pc += insn.k as usize,
            0x15 /* JEQ K */ => pc += cond(acc == insn.k),
            0x25 /* JGT K */ => pc += cond(acc > insn.k),
            0x35 /* JGE K */ => pc += cond(acc >= insn.k),
            0x45 /* JSET K */ => pc += cond(acc & insn.k != 0),
            0x06 /* RET K */ => return insn.k,
            other => panic!("unexpected opcode {other:#x}"),
        }
        assert!(pc < program.len(), "jump out of range");
    }
}

fn run(nr: Nr, args: [u64; 6]) -> u32 {
    eval(&program_for_host().unwrap(), host_audit_arch(), nr as u32, args)
}

#[test]
fn every_denied_syscall_gets_eperm() {
    for (name, nr) in denied_syscalls() {
        assert_eq!(run(nr, [0; 6]), EPERM_RET, "{name}");
    }
}

#[test]
fn ordinary_syscalls_are_allowed() {
    use libc::*;
    for (name, nr) in [
        ("read", SYS_read),
        ("write", SYS_write),
        ("openat", SYS_openat),
        ("mmap", SYS_mmap),
        ("execve", SYS_execve),
        ("exit_group", SYS_exit_group),
        ("kill", SYS_kill),
        ("connect", SYS_connect),
        ("clone", SYS_clone),
        ("ioctl", SYS_ioctl),
        ("socket", SYS_socket),
    ] {
        let args = if nr == SYS_socket { [AF_UNIX as u64, 1, 0, 0, 0, 0] } else { [0; 6] };
        assert_eq!(run(nr, args), SECCOMP_RET_ALLOW, "{name}");
    }
}

#[test]
fn a_foreign_arch_is_killed_and_on_x86_64_the_x32_abi_too() {
    let p = program_for_host().unwrap();
    for foreign in [
        0x4000_0003, /* AUDIT_ARCH_I386 */
        0x4000_0028, /* AUDIT_ARCH_ARM */
        AUDIT_ARCH_AARCH64 ^ AUDIT_ARCH_X86_64 ^ host_audit_arch(),
    ] {
        assert_eq!(eval(&p, foreign, 1, [0; 6]), SECCOMP_RET_KILL_PROCESS, "{foreign:#x}");
    }
    if cfg!(target_arch = "x86_64") {
        for nr in [X32_SYSCALL_BIT, X32_SYSCALL_BIT | 1, X32_SYSCALL_BIT | 521 /* x32 ptrace */, u32::MAX] {
            assert_eq!(eval(&p, AUDIT_ARCH_X86_64, nr, [0; 6]), SECCOMP_RET_KILL_PROCESS, "{nr:#x}");
        }
    }
}

#[test]
fn clone_with_namespace_flags_is_denied_and_clone3_is_enosys() {
    use libc::SYS_clone;
    // What glibc's fork() passes: CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD.
    assert_eq!(run(SYS_clone, [0x0120_0011, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
    // pthread_create's flags.
    assert_eq!(run(SYS_clone, [0x003d_0f00, 0, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
    for &(name, flag) in CLONE_NEW_FLAGS {
        assert_eq!(run(SYS_clone, [u64::from(flag) | 17, 0, 0, 0, 0, 0]), EPERM_RET, "{name}");
    }
    assert_eq!(run(libc::SYS_clone3, [0; 6]), ENOSYS_RET);
}

#[test]
fn tiocsti_is_denied_even_with_high_bits_set() {
    let [(_, tiocsti), (_, tioclinux)] = DENIED_IOCTLS else { panic!("{DENIED_IOCTLS:?}") };
    assert_eq!((*tiocsti, *tioclinux), (0x5412, 0x541C));
    let tiocsti = u64::from(*tiocsti);
    assert_eq!(run(libc::SYS_ioctl, [0, tiocsti, 0, 0, 0, 0]), EPERM_RET);
    assert_eq!(run(libc::SYS_ioctl, [0, (1u64 << 32) | tiocsti, 0, 0, 0, 0]), EPERM_RET);
    assert_eq!(run(libc::SYS_ioctl, [0, u64::from(*tioclinux), 0, 0, 0, 0]), EPERM_RET);
    assert_eq!(run(libc::SYS_ioctl, [0, 0x5401 /* TCGETS */, 0, 0, 0, 0]), SECCOMP_RET_ALLOW);
}

#[test]
fn only_allowed_socket_families() {
    for family in [1u64, 2, 10, 16] {
        assert_eq!(run(libc::SYS_socket, [family, 1, 0, 0, 0, 0]), SECCOMP_RET_ALLOW, "{family}");
    }
    for family in [40u64 /* AF_VSOCK */, 17 /* AF_PACKET */, 31 /* AF_BLUETOOTH */, 0, 3] {
        assert_eq!(run(libc::SYS_socket, [family, 1, 0, 0, 0, 0]), EPERM_RET, "{family}");
    }
}

#[test]
fn bytes_are_eight_per_instruction_and_the_program_fits() {
    let p = program_for_host().unwrap();
    assert_eq!(to_bytes(&p).len(), p.len() * 8);
    assert!(p.len() < 4096, "BPF_MAXINSNS");
    // The first instruction of the serialized program: `ld [4]` (the architecture).
    assert_eq!(to_bytes(&p)[..8], [0x20, 0, 0, 0, 4, 0, 0, 0]);
}

/// The policy as it was before seccompiler: the hand-assembled x86_64 program, frozen here as
/// the reference the compiled program must agree with, on every syscall number and on every
/// argument that one of the conditions looks at.
#[cfg(target_arch = "x86_64")]
mod reference {
    use super::*;

    const LD: u16 = 0x20;
    const JEQ: u16 = 0x15;
    const JGE: u16 = 0x35;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;

    /// The deny-list as it was, by number.
    pub const DENIED: &[u32] = &[
        101, 310, 311, 312, 438, 440, 165, 166, 155, 161, 428, 429, 430, 431, 432, 433, 442, 272, 308, 248, 249, 250,
        321, 298, 425, 426, 427, 323, 300, 303, 304, 175, 313, 176, 174, 177, 178, 246, 320, 169, 167, 168, 163, 179,
        443, 180, 164, 227, 305, 159, 170, 171, 103, 134, 136, 139, 156, 153, 154, 172, 173, 212, 279, 183, 184, 185,
        236,
    ];

    fn i(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    pub fn program() -> Vec<sock_filter> {
        let eperm = SECCOMP_RET_ERRNO | 1;
        let mut p = vec![
            i(LD, 4, 0, 0),
            i(JEQ, AUDIT_ARCH_X86_64, 1, 0),
            i(RET, SECCOMP_RET_KILL_PROCESS, 0, 0),
            i(LD, 0, 0, 0),
            i(JGE, X32_SYSCALL_BIT, 0, 1),
            i(RET, SECCOMP_RET_KILL_PROCESS, 0, 0),
        ];
        for &nr in DENIED {
            p.push(i(JEQ, nr, 0, 1));
            p.push(i(RET, eperm, 0, 0));
        }
        p.extend([i(JEQ, 435, 0, 1), i(RET, SECCOMP_RET_ERRNO | 38, 0, 0)]);
        p.extend([
            i(JEQ, 56, 0, 4),
            i(LD, 16, 0, 0),
            i(JSET, 0x7e02_0000, 0, 1),
            i(RET, eperm, 0, 0),
            i(RET, SECCOMP_RET_ALLOW, 0, 0),
        ]);
        p.extend([
            i(JEQ, 16, 0, 5),
            i(LD, 24, 0, 0),
            i(JEQ, 0x5412, 2, 0),
            i(JEQ, 0x541C, 1, 0),
            i(RET, SECCOMP_RET_ALLOW, 0, 0),
            i(RET, eperm, 0, 0),
        ]);
        p.extend([
            i(JEQ, 41, 0, 7),
            i(LD, 16, 0, 0),
            i(JEQ, 1, 4, 0),
            i(JEQ, 2, 3, 0),
            i(JEQ, 10, 2, 0),
            i(JEQ, 16, 1, 0),
            i(RET, eperm, 0, 0),
            i(RET, SECCOMP_RET_ALLOW, 0, 0),
        ]);
        p.push(i(RET, SECCOMP_RET_ALLOW, 0, 0));
        p
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_denied_set_is_the_one_before_seccompiler() {
    let mut now: Vec<u32> = denied_syscalls().into_iter().map(|(_, nr)| nr as u32).collect();
    let mut before = reference::DENIED.to_vec();
    now.sort_unstable();
    before.sort_unstable();
    assert_eq!(now, before);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_compiled_program_decides_every_call_as_the_hand_assembled_one_did() {
    let new = program_for_host().unwrap();
    let old = reference::program();
    // Values that each argument condition distinguishes, with and without high bits set.
    let mut values: Vec<u64> = vec![0, 1, 2, 3, 10, 16, 17, 31, 40, 0x5401, 0x5412, 0x541C, 0x0120_0011, 0x003d_0f00];
    values.extend(CLONE_NEW_FLAGS.iter().map(|&(_, f)| u64::from(f) | 17));
    values.extend(values.clone().into_iter().map(|v| v | (1 << 32)));
    values.push(u64::MAX);
    let mut numbers: Vec<u32> = (0..1024).collect();
    numbers.extend([X32_SYSCALL_BIT, X32_SYSCALL_BIT | 101, X32_SYSCALL_BIT | 521, 0x8000_0000, u32::MAX]);
    let mut checked = 0;
    for arch in [AUDIT_ARCH_X86_64, 0x4000_0003 /* i386 */] {
        for &nr in &numbers {
            for &v in &values {
                // Every condition reads argument 0 or 1.
                for args in [[v, 0, 0, 0, 0, 0], [0, v, 0, 0, 0, 0]] {
                    let (a, b) = (eval(&old, arch, nr, args), eval(&new, arch, nr, args));
                    assert_eq!(a, b, "arch {arch:#x} nr {nr} args {args:x?}: before {a:#x}, now {b:#x}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100_000);
}

//! Hostile guest programs end with a clean error, never a VMM panic or hang.

mod common;

use common::*;

fn hostile(mode: &str) -> std::process::Output {
    let program = guest("hostile", Link::Static);
    run(&["--timeout", "20", program.to_str().unwrap(), mode])
}

fn assert_clean_death(mode: &str, status: i32, report: &str) {
    let out = hostile(mode);
    assert_eq!(
        out.status.code(),
        Some(status),
        "{mode}: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(report), "{mode}: {}", describe(&out));
    assert!(!stderr.contains("panicked"), "{mode}: {}", describe(&out));
}

#[test]
fn bad_pointers_give_efault() {
    let out = hostile("bad-pointers");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

#[test]
fn writes_to_the_vmm_machinery_are_segfaults() {
    assert_clean_death("write-doorbell", 139, "write at 0xffffffff80004000");
    assert_clean_death("write-gdt", 139, "write at 0xffffffff80000000");
    assert_clean_death("store-mmio", 139, "doorbell");
    assert_clean_death(
        "jump-kernel",
        139,
        "instruction fetch at 0xffffffff80003000",
    );
}

#[test]
fn privileged_and_trapping_instructions_are_reported() {
    assert_clean_death("ud2", 132, "invalid opcode (#UD)");
    assert_clean_death("hlt", 139, "general protection (#GP)");
    assert_clean_death("int3", 133, "breakpoint (#BP)");
    assert_clean_death("cli", 139, "general protection (#GP)");
    assert_clean_death("out", 139, "general protection (#GP)");
}

#[test]
fn a_huge_mmap_fails_cleanly() {
    let out = hostile("mmap-1tib");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_fork_bomb_is_refused() {
    let out = hostile("fork-bomb");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn an_endless_loop_is_stopped_by_the_timeout() {
    let program = guest("hostile", Link::Static);
    let started = std::time::Instant::now();
    let out = run(&["--timeout", "0.5", program.to_str().unwrap(), "spin"]);
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout"));
}

#[test]
fn unknown_syscalls_are_enosys_and_named_in_the_log() {
    let program = guest("process", Link::Static);
    let out = run(&[program.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("100000"),
        "{}",
        describe(&out)
    );
}

/// A syscall fuzzer (tests/guests/fuzz.c, in the style of trinity) makes thousands of
/// random calls with hostile arguments: the VMM answers each with a result or an errno,
/// and neither it nor the app ever dies.
#[test]
fn random_syscalls_with_hostile_arguments_never_end_the_vmm() {
    let program = guest("fuzz", Link::Static);
    let runs: [(&str, &[&str]); 8] = [
        ("1", &[]),
        ("2", &[]),
        ("3", &[]),
        ("4", &[]),
        ("5", &[]),
        ("6", &[]),
        ("7", &["--no-mailbox"]),
        ("8", &["--no-mailbox"]),
    ];
    for (seed, extra) in runs {
        let mut args = vec!["--timeout", "120"];
        args.extend_from_slice(extra);
        args.extend([program.to_str().unwrap(), seed, "20000"]);
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "seed {seed}: {}",
            describe(&out)
        );
        assert!(
            stdout(&out).contains("calls answered"),
            "{}",
            describe(&out)
        );
        assert!(
            !stderr.contains("panicked"),
            "seed {seed}: {}",
            describe(&out)
        );
    }
}

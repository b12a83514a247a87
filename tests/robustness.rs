//! The VMM against extreme guest input and its own failures: huge timeouts are answered as
//! Linux answers them, and a panic on any VMM thread ends the VMM cleanly, never with a
//! hang.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// The timeouts guest's output, natively and in a picoprocess with `flags`, must match.
fn timeouts_like_linux(flags: &[&str]) {
    let program = guest("timeouts", Link::Static);
    let native = Command::new(&program)
        .output()
        .expect("running the guest natively");
    assert!(native.status.success(), "natively: {}", describe(&native));
    let mut args = vec!["--timeout", "60"];
    args.extend_from_slice(flags);
    args.push(program.to_str().unwrap());
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), stdout(&native), "{}", describe(&out));
}

/// Before, a huge timeout overflowed an `Instant`: the VMM exited 101 on the vCPU thread,
/// and on the mailbox poller the app spun in the doorbell forever.
#[test]
fn huge_timeouts_sleep_forever_or_fail_as_on_linux() {
    timeouts_like_linux(&[]);
}

#[test]
fn huge_timeouts_sleep_forever_or_fail_as_on_linux_with_exits_only() {
    timeouts_like_linux(&["--no-mailbox"]);
}

/// Runs the syscall loop as app `name` with the VMM made to panic at `hook` (see
/// `picocenter_vmm::panics::test_hook`), with a private TMPDIR; returns the output and
/// the TMPDIR.
fn run_until_panic(
    name: &str,
    hook: &str,
    flags: &[&str],
) -> (std::process::Output, tempfile::TempDir) {
    let program = guest("syscall_loop", Link::Static);
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = picocenter();
    cmd.env("PICOCENTER_TEST_PANIC", hook)
        .env("TMPDIR", tmp.path());
    cmd.args(["run", "--name", name, "--timeout", "60"])
        .args(flags)
        .arg(&program)
        .arg("1000000");
    (run_with_limit(&mut cmd, Duration::from_secs(60)), tmp)
}

/// What must hold after a panic: a non-zero status, one line on stderr that says which
/// thread panicked, the control socket and the temporary root and data gone.
fn ended_cleanly(name: &str, thread: &str, out: &std::process::Output, tmp: &tempfile::TempDir) {
    assert_eq!(out.status.code(), Some(1), "{}", describe(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{}", describe(out));
    assert!(
        stderr.contains(&format!("thread '{thread}' panicked at ")),
        "{}",
        describe(out)
    );
    let socket = state_dir().join("run").join(format!("{name}.sock"));
    assert!(!socket.exists(), "{} was left behind", socket.display());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "temporary files were left: {left:?}");
}

/// The poller panics while the app waits in the doorbell for its answer: the vCPU thread is
/// kicked, and the run ends instead of the app spinning forever.
#[test]
fn a_panic_on_the_mailbox_poller_ends_the_vmm_cleanly() {
    let name = "test-panic-mailbox";
    let (out, tmp) = run_until_panic(name, &format!("mailbox:{}", libc::SYS_lseek), &[]);
    ended_cleanly(name, "picocenter-mailbox", &out, &tmp);
}

#[test]
fn a_panic_on_the_vcpu_thread_ends_the_vmm_cleanly() {
    let name = "test-panic-vcpu";
    let hook = format!("vcpu:{}", libc::SYS_lseek);
    let (out, tmp) = run_until_panic(name, &hook, &["--no-mailbox"]);
    ended_cleanly(name, "main", &out, &tmp);
}

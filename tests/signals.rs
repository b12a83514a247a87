//! Signals: delivery to handlers (plain, SA_SIGINFO, masks, SA_RESTART, alarm, setitimer,
//! fault handlers) and default actions.

mod common;

use common::*;

fn signals(mode: &str) -> std::process::Output {
    signals_with(&[], mode)
}

/// The signals guest in `mode`, run with `flags`.
fn signals_with(flags: &[&str], mode: &str) -> std::process::Output {
    let program = guest("signals", Link::Static);
    let mut args = vec!["--timeout", "30"];
    args.extend_from_slice(flags);
    args.extend([program.to_str().unwrap(), mode]);
    run(&args)
}

#[test]
fn handlers_masks_timers_and_fault_handlers_work() {
    let out = signals("ok");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

#[test]
fn dynamic_build_works_too() {
    let program = guest("signals", Link::Dynamic);
    let out = run(&["--timeout", "30", program.to_str().unwrap(), "ok"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn default_actions_end_the_app_with_the_signal() {
    for (mode, signal, name) in [
        ("term", 15, "SIGTERM"),
        ("abort", 6, "SIGABRT"),
        ("sigpipe", 13, "SIGPIPE"),
    ] {
        let out = signals(mode);
        assert_eq!(
            out.status.code(),
            Some(128 + signal),
            "{mode}: {}",
            describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(name),
            "{}",
            describe(&out)
        );
    }
}

/// Starts the signals guest in `mode` as app `name` and waits for its first line.
fn start_waiting(name: &str, mode: &str) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let program = guest("signals", Link::Static);
    let mut child = picocenter()
        .args([
            "run",
            "--name",
            name,
            "--timeout",
            "60",
            program.to_str().unwrap(),
            mode,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "{mode}: no output");
    child.stdout = Some(reader.into_inner());
    child
}

fn stop(name: &str, grace: &str) -> std::process::Output {
    let mut cmd = picocenter();
    cmd.args(["stop", name, "--grace", grace]);
    run_with_limit(&mut cmd, std::time::Duration::from_secs(30))
}

#[test]
fn stop_delivers_sigterm_to_a_blocked_app() {
    let child = start_waiting("test-stop-blocked", "wait-term");
    assert!(stop("test-stop-blocked", "10").status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("got SIGTERM"), "{}", describe(&out));
}

#[test]
fn stop_delivers_sigterm_to_a_computing_app() {
    let child = start_waiting("test-stop-computing", "spin-term");
    assert!(stop("test-stop-computing", "10").status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("while computing"),
        "{}",
        describe(&out)
    );
}

#[test]
fn stop_kills_an_app_that_ignores_sigterm_after_the_grace_period() {
    let child = start_waiting("test-stop-stubborn", "ignore-term");
    let started = std::time::Instant::now();
    assert!(stop("test-stop-stubborn", "0.5").status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
}

#[test]
fn sigint_to_picocenter_reaches_the_app() {
    let child = start_waiting("test-sigint", "wait-term");
    // The guest handles SIGTERM only, so SIGINT's default action ends it.
    let pid = child.id() as i32;
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", describe(&out));
}

#[test]
fn an_ignored_signal_does_not_interrupt_a_blocking_call() {
    let child = start_waiting("test-ignored-hup", "ignore-hup-sleep");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("slept"), "{}", describe(&out));
}

/// Runs the storm guest for two seconds with `flags`, and checks it passed.
fn storm(flags: &[&str]) {
    let program = guest("storm", Link::Static);
    let mut args = vec!["--timeout", "60"];
    args.extend_from_slice(flags);
    args.extend([program.to_str().unwrap(), "2"]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("PASSED"), "{}", describe(&out));
}

/// A 100 us timer interrupts calls of every path (answered in the doorbell, the mailbox,
/// exits, blocking ones): every handler frame holds the app's own context, and every call
/// keeps its result and the registers Linux keeps. Before the VMM brought an app stopped
/// inside the doorbell to a clean point, a signal during a mailbox call built a frame at a
/// doorbell address and rt_sigreturn killed the app within a fraction of a second.
#[test]
fn a_signal_storm_during_mailbox_calls_keeps_every_call_correct() {
    storm(&[]);
}

/// The same storm with every forwarded call an exit.
#[test]
fn a_signal_storm_during_exits_keeps_every_call_correct() {
    storm(&["--no-mailbox"]);
}

/// A number printed after `before` in a run's output.
fn printed_after(out: &std::process::Output, before: &str) -> u64 {
    stdout(out)
        .split(before)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after '{before}': {}", describe(out)))
}

/// A loop that reads the clock through the vDSO, with no call that exits, is interrupted
/// by a 1 ms timer every time, and its clock never goes back. Before, a kick that stopped
/// the vCPU inside the vDSO delivered nothing (~100 signals of 1,500 reached the app, at
/// the time page's 100 ms refreshes), and a refresh while the vCPU was stopped halfway
/// through a read gave that read half the old page and half the new (steps back in 2 runs
/// of 3); now a vCPU stopped in the vDSO starts its function over. The loop also reads a
/// clock the vDSO passes on to the VMM with its own `syscall`: a signal delivered after
/// that call, or a kick in the doorbell during it, killed the app ("rt_sigreturn to a
/// non-user address", in 3 runs of 3).
#[test]
fn a_timer_interrupts_a_loop_on_the_vdso_clock_which_never_goes_back() {
    for flags in [&[][..], &["--no-mailbox"]] {
        let out = signals_with(flags, "vdso-clock-under-signals");
        assert_eq!(out.status.code(), Some(0), "{flags:?}: {}", describe(&out));
        let signals = printed_after(&out, "steps back in ");
        assert!(signals >= 400, "{flags:?}: {}", describe(&out));
    }
}

/// A timer signal raised after the app unblocked it (a mask change the mailbox answers)
/// interrupts a loop that makes no call at once: the mask change also changes which
/// signals kick the vCPU. Before, it waited for the loop's next exit (2 s here: none).
#[test]
fn a_signal_unblocked_through_the_mailbox_interrupts_a_loop() {
    for flags in [&[][..], &["--no-mailbox"]] {
        let out = signals_with(flags, "unblock-then-spin");
        assert_eq!(out.status.code(), Some(0), "{flags:?}: {}", describe(&out));
        // ~0-10 ms; the bound leaves room for a loaded machine.
        let late = printed_after(&out, "handled at most ");
        assert!(late < 1000, "{flags:?}: {}", describe(&out));
    }
}

//! Signals: delivery to handlers (plain, SA_SIGINFO, masks, SA_RESTART, alarm, setitimer,
//! fault handlers) and default actions.

mod common;

use common::*;

fn signals(mode: &str) -> std::process::Output {
    let program = guest("signals", Link::Static);
    run(&["--timeout", "30", program.to_str().unwrap(), mode])
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

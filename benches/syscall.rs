//! The cost of one syscall in a picoprocess, as ratios measured side by side in one run:
//!
//! * a `getppid` loop forwarded with a VM exit each (`--no-mailbox`), against a bare
//!   ring-3 MMIO-exit round trip in the same VMM (stores to the calibration page), which is
//!   the floor an exit-based syscall can reach, and against the same binary run natively;
//! * the same loop through the shared-memory mailbox (the default);
//! * `getpid` and `clock_gettime` as raw syscalls, which the doorbell answers without
//!   leaving the guest;
//! * `clock_gettime` through libc, which the vDSO answers with no syscall at all;
//! * each `getppid` timed on its own, through the mailbox and by exits, in three settings:
//!   two free cores, a CPU-bound process running beside it, and the picoprocess pinned to
//!   one core (its vCPU and mailbox threads sharing it): the per-call distribution and
//!   how far the worst run is from the median run (issue #15's "a mailbox that holds up
//!   under CPU contention").
//!
//! With `PICOCENTER_BEFORE=<another build's picocenter binary>`, the mailbox rows of the
//! first two settings are also measured under that build, runs alternating with this one's
//! (issue #15's before and after).
//!
//! Run with `cargo bench --bench syscall`. Rounds alternate the measurements so that
//! machine noise hits them alike; medians of the per-round values are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{guest, median, picocenter, printed_number, with_build, Build, Link};
use std::process::Command;

/// Calls per run of the distribution rounds.
const DISTRIBUTION_CALLS: &str = "20000";

/// A CPU-bound process (a shell's busy loop) for the contention rounds; killed when dropped.
struct Burner(std::process::Child);

impl Burner {
    fn start() -> Self {
        Self(
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("starting a CPU burner"),
        )
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One run of `syscall_bench getppid-dist`: mean, p50, p90, p99, p99.9 and max ns per call.
fn distribution(program: &str, mailbox: bool, pinned: bool) -> [f64; 6] {
    let mut cmd = picocenter();
    cmd.arg("run");
    if !mailbox {
        cmd.arg("--no-mailbox");
    }
    cmd.args([program, "getppid-dist", DISTRIBUTION_CALLS]);
    if pinned {
        cmd = common::on_cpu("1", &cmd);
    }
    let out = cmd.output().expect("running syscall_bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let values: Vec<f64> = text
        .split_whitespace()
        .map(|v| v.parse().expect("a number"))
        .collect();
    values.try_into().expect("six numbers")
}

/// The per-call distribution of forwarded calls in three settings, mailbox against exits.
fn contention(program: &str) {
    println!();
    println!("each getppid timed on its own, {ROUNDS} runs of {DISTRIBUTION_CALLS} calls per row:");
    println!(
        "  {:<44} {:>8} {:>8} {:>8} {:>9} {:>17}",
        "setting", "mean", "p50", "p99", "p99.9", "worst/median run"
    );
    for (setting, burner, pinned) in [
        ("two free cores", false, false),
        ("beside a CPU-bound process", true, false),
        ("pinned to one core", false, true),
    ] {
        let _burner = burner.then(Burner::start);
        for mailbox in [true, false] {
            let mut runs: Vec<[f64; 6]> = (0..ROUNDS)
                .map(|_| distribution(program, mailbox, pinned))
                .collect();
            let column = |runs: &mut Vec<[f64; 6]>, i: usize| {
                median(&mut runs.iter().map(|r| r[i]).collect::<Vec<_>>())
            };
            let mean = column(&mut runs, 0);
            let worst = runs.iter().map(|r| r[0]).fold(0.0, f64::max);
            println!(
                "  {:<44} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>17.2}",
                format!("{setting}, {}", if mailbox { "mailbox" } else { "exits" }),
                mean,
                column(&mut runs, 1),
                column(&mut runs, 3),
                column(&mut runs, 4),
                worst / mean
            );
        }
    }
    println!("  (ns per call; medians over the runs; worst/median run compares the runs' means)");
}

/// The mailbox's per-call distribution under `before` and this build, runs alternating.
fn before_and_after(program: &str, before: &Build) {
    println!();
    println!("through the mailbox, PICOCENTER_BEFORE against this build, {ROUNDS} alternating runs each:");
    println!(
        "  {:<44} {:>8} {:>8} {:>8} {:>17}",
        "setting", "mean", "p50", "p99", "worst/median run"
    );
    for (setting, burner) in [
        ("two free cores", false),
        ("beside a CPU-bound process", true),
    ] {
        let _burner = burner.then(Burner::start);
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            old.push(with_build(Some(before), || {
                distribution(program, true, false)
            }));
            new.push(distribution(program, true, false));
        }
        for (build, runs) in [("before", &old), ("after", &new)] {
            let column = |i: usize| median(&mut runs.iter().map(|r| r[i]).collect::<Vec<_>>());
            let mean = column(0);
            let worst = runs.iter().map(|r| r[0]).fold(0.0, f64::max);
            println!(
                "  {:<44} {:>8.0} {:>8.0} {:>8.0} {:>17.2}",
                format!("{setting}, {build}"),
                mean,
                column(1),
                column(3),
                worst / mean
            );
        }
    }
    println!("  (ns per call; medians over the runs)");
}

const ROUNDS: usize = 7;
const ITERATIONS: &str = "20000";

fn main() {
    let program = guest("syscall_bench", Link::Static);
    let program = program.to_str().unwrap();
    let in_pico = |mode: &str, flags: &[&str]| {
        let mut cmd = picocenter();
        cmd.arg("run").args(flags).args([program, mode, ITERATIONS]);
        printed_number(&mut cmd)
    };
    let native = |mode: &str| printed_number(Command::new(program).args([mode, ITERATIONS]));
    let names = [
        "forwarded getppid, one exit each",
        "bare ring-3 MMIO exit, same VMM",
        "forwarded getppid, through the mailbox",
        "getpid answered in the doorbell",
        "clock_gettime answered in the doorbell",
        "clock_gettime through the vDSO",
        "native getppid",
        "native clock_gettime (vDSO)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut vs_exit = Vec::new();
    for _ in 0..ROUNDS {
        let round = [
            in_pico("getppid", &["--no-mailbox"]),
            in_pico("mmio-exit", &["--no-mailbox"]),
            in_pico("getppid", &[]),
            in_pico("getpid", &[]),
            in_pico("clock_gettime_syscall", &[]),
            in_pico("clock_gettime", &[]),
            native("getppid"),
            native("clock_gettime"),
        ];
        vs_exit.push(round[0] / round[1]);
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    println!("median of {ROUNDS} rounds of {ITERATIONS} calls:");
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    for (name, value) in names.iter().zip(&medians) {
        println!("  {name:<42} {value:>9.0} ns/call");
    }
    println!(
        "ratio forwarded (exit) / bare exit:        {:9.2}  (target <= 1.2)",
        median(&mut vs_exit)
    );
    println!(
        "ratio forwarded (exit) / native:           {:9.0}",
        medians[0] / medians[6]
    );
    println!(
        "ratio mailbox / bare exit:                 {:9.3}",
        medians[2] / medians[1]
    );
    println!(
        "ratio doorbell answer / bare exit:         {:9.3}",
        medians[3] / medians[1]
    );
    println!(
        "ratio vDSO clock_gettime / doorbell one:   {:9.4}",
        medians[5] / medians[4]
    );
    println!(
        "ratio vDSO clock_gettime / native vDSO:    {:9.2}",
        medians[5] / medians[7]
    );
    contention(program);
    if let Some(before) = Build::before() {
        before_and_after(program, &before);
    }
}

//! The cost of one syscall in a picoprocess, as ratios measured side by side in one run:
//!
//! * a `getppid` loop forwarded with a VM exit each (`--no-mailbox`), against a bare
//!   ring-3 MMIO-exit round trip in the same VMM (stores to the calibration page), which is
//!   the floor an exit-based syscall can reach, and against the same binary run natively;
//! * the same loop through the shared-memory mailbox (the default);
//! * `getpid` and `clock_gettime` as raw syscalls, which the doorbell answers without
//!   leaving the guest;
//! * `clock_gettime` through libc, which the vDSO answers with no syscall at all.
//!
//! Run with `cargo bench --bench syscall`. Rounds alternate the measurements so that
//! machine noise hits them alike; medians of the per-round values are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{guest, median, picocenter, printed_number, Link};
use std::process::Command;

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
}

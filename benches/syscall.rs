//! The cost of one forwarded syscall, as ratios measured side by side in one run:
//!
//! * a `getppid` loop in a picoprocess, against the same binary run natively;
//! * the same loop, against a bare ring-3 MMIO-exit round trip in the same picoprocess
//!   (stores to the calibration page), which is the floor a forwarded syscall can reach;
//! * `getpid` and `clock_gettime`, which the doorbell answers without an exit.
//!
//! Run with `cargo bench --bench syscall`. Rounds alternate the three measurements so that
//! machine noise hits them alike; the medians of the per-round ratios are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{guest, median, picocenter, Link};
use std::process::Command;

const ROUNDS: usize = 7;
const ITERATIONS: &str = "20000";

fn ns_per_iteration(cmd: &mut Command) -> f64 {
    let out = cmd.output().expect("running the benchmark program");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("ns per iteration")
}

fn main() {
    let program = guest("syscall_bench", Link::Static);
    let program = program.to_str().unwrap();
    let (mut pico, mut exit, mut native) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        pico.push(ns_per_iteration(
            picocenter().args(["run", program, "getppid", ITERATIONS]),
        ));
        exit.push(ns_per_iteration(picocenter().args([
            "run",
            program,
            "mmio-exit",
            ITERATIONS,
        ])));
        native.push(ns_per_iteration(
            Command::new(program).args(["getppid", ITERATIONS]),
        ));
    }
    let mut vs_exit: Vec<f64> = pico.iter().zip(&exit).map(|(p, e)| p / e).collect();
    let mut vs_native: Vec<f64> = pico.iter().zip(&native).map(|(p, n)| p / n).collect();
    println!(
        "forwarded getppid in a picoprocess: {:9.0} ns/call (median of {ROUNDS})",
        median(&mut pico)
    );
    println!(
        "bare ring-3 MMIO exit, same VMM:    {:9.0} ns/exit",
        median(&mut exit)
    );
    println!(
        "native getppid on this host:        {:9.0} ns/call",
        median(&mut native)
    );
    println!(
        "ratio forwarded / bare exit:        {:9.2}  (target <= 1.2)",
        median(&mut vs_exit)
    );
    println!(
        "ratio forwarded / native:           {:9.0}",
        median(&mut vs_native)
    );
}

//! What threads cost in a picoprocess, as ratios measured side by side in one run:
//!
//! * `pthread_create` + `pthread_join` of a thread that returns at once, one pair after
//!   another (the median pair);
//! * a futex ping-pong between two threads: wake the other, wait until it wakes you (the
//!   median round trip).
//!
//! Each against the same static binary run natively. Threads share the picoprocess's one
//! vCPU (README: "Where this differs from DESIGN.md"), so a round trip is two thread
//! switches inside the VMM and no host thread wake-up.
//!
//! Run with `cargo bench --bench threads`. Rounds alternate the measurements so that
//! machine noise hits them alike; medians of the per-round values are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{guest, median, picocenter, printed_number, Link};
use std::process::Command;

const ROUNDS: usize = 7;

fn main() {
    let program = guest("thread_bench", Link::Static);
    let program = program.to_str().unwrap();
    let in_pico = |mode: &str, count: &str| {
        let mut cmd = picocenter();
        cmd.arg("run").args([program, mode, count]);
        printed_number(&mut cmd)
    };
    let native =
        |mode: &str, count: &str| printed_number(Command::new(program).args([mode, count]));
    let names = [
        "pthread_create + join, picoprocess",
        "pthread_create + join, native",
        "futex ping-pong round trip, picoprocess",
        "futex ping-pong round trip, native",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        let round = [
            in_pico("create", "300"),
            native("create", "300"),
            in_pico("pingpong", "1000"),
            native("pingpong", "1000"),
        ];
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    println!("median of {ROUNDS} rounds (each the median of 300 pairs or 1000 round trips):");
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    for (name, value) in names.iter().zip(&medians) {
        println!("  {name:<42} {:>9.1} us", value / 1000.0);
    }
    println!(
        "ratio create + join, picoprocess / native:   {:6.2}  (goal: <= 300 us a pair)",
        medians[0] / medians[1]
    );
    println!(
        "ratio ping-pong, picoprocess / native:       {:6.2}  (exit floor ~145 us a round trip)",
        medians[2] / medians[3]
    );
}

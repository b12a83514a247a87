//! Start-to-exit time of a static hello in a picoprocess (`picocenter run`, including the
//! temporary root it makes), against the same binary run natively, measured side by side.
//!
//! Run with `cargo bench --bench startup`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{guest, median, picocenter, Link};
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNS: usize = 41;

fn time_ms(cmd: &mut Command) -> f64 {
    let started = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().expect("running");
    assert!(status.success());
    started.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let program = guest("hello", Link::Static);
    let program = program.to_str().unwrap();
    let (mut pico, mut native) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        pico.push(time_ms(picocenter().args(["run", program])));
        native.push(time_ms(&mut Command::new(program)));
    }
    let mut ratios: Vec<f64> = pico.iter().zip(&native).map(|(p, n)| p / n).collect();
    println!(
        "static hello, picocenter run:   {:6.2} ms median of {RUNS} (target < 10 ms)",
        median(&mut pico)
    );
    println!(
        "static hello, native:           {:6.2} ms",
        median(&mut native)
    );
    println!(
        "ratio picoprocess / native:     {:6.1}",
        median(&mut ratios)
    );
}

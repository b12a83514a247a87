//! Start-to-exit times, in a picoprocess against native, measured side by side:
//!
//! * a static hello (`picocenter run`; its root kept from the run before, as for every
//!   run of a program after its first);
//! * `python3 -c pass` (the python-http image's Debian python3, against the same binary on
//!   the host), and with reads answered in the guest (the default) against without
//!   (`--no-guest-reads`), which must not cost a start-up anything.
//!
//! With `PICOCENTER_BEFORE=<another build's picocenter binary>`, the static hello also runs
//! under that build, alternating with this one (issue #15's before and after).
//!
//! Run with `cargo bench --bench startup`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{build_image, guest, median, picocenter, with_build, Build, Link};
use std::process::{Command, Stdio};
use std::time::Instant;

const RUNS: usize = 31;

fn time_ms(cmd: &mut Command) -> f64 {
    let started = Instant::now();
    let status = cmd.stdout(Stdio::null()).status().expect("running");
    assert!(status.success());
    started.elapsed().as_secs_f64() * 1000.0
}

/// Runs both commands alternately and prints their medians and ratio.
fn compare(
    title: &str,
    target: &str,
    mut pico: impl FnMut() -> Command,
    mut native: impl FnMut() -> Command,
) {
    let (mut p, mut n) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        p.push(time_ms(&mut pico()));
        n.push(time_ms(&mut native()));
    }
    let (p, n) = (median(&mut p), median(&mut n));
    println!("{title}: picoprocess {p:6.2} ms, native {n:6.2} ms, ratio {:4.2} ({target}; medians of {RUNS})", p / n);
}

fn main() {
    let hello = guest("hello", Link::Static);
    let run_hello = || {
        let mut cmd = picocenter();
        cmd.arg("run").arg(&hello);
        cmd
    };
    compare("static hello", "target < 10 ms", run_hello, || {
        Command::new(&hello)
    });
    if let Some(before) = Build::before() {
        compare(
            "static hello, this build (as 'picoprocess') against PICOCENTER_BEFORE (as 'native')",
            "issue #15: <= 3 ms",
            run_hello,
            || with_build(Some(&before), run_hello),
        );
    }
    build_image("python-http");
    let python = |flags: &[&str]| {
        let mut cmd = picocenter();
        cmd.args(["run", "--image", "python-http"])
            .args(flags)
            .args(["/usr/bin/python3", "-c", "pass"]);
        cmd
    };
    compare(
        "python3 -c pass",
        "target ratio <= 3",
        || python(&[]),
        || {
            let mut cmd = Command::new("/usr/bin/python3");
            cmd.args(["-c", "pass"]);
            cmd
        },
    );
    compare(
        "python3 -c pass, reads in the guest (as 'picoprocess') against not (as 'native')",
        "target ratio <= 1.05",
        || python(&[]),
        || python(&["--no-guest-reads"]),
    );
}

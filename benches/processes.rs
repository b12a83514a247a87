//! What processes cost in a picoprocess, as ratios measured side by side in one run:
//!
//! * fork + _exit + waitpid of a process with 64 MiB touched (the median of 50);
//! * posix_spawn of a static program that exits at once, + waitpid (the median of 50);
//! * posix_spawn of busybox `sh -c 'true | true'` + waitpid (the median of 20);
//! * a round trip between two processes through process-shared semaphores in shared
//!   memory (the median of 200): each wait is a host futex wait in its VMM's helper;
//!
//! each against the same static binary (tests/guests/fork_bench.c) run natively, in
//! alternating rounds. Then the memory that 10 forked idle children of a 64 MiB parent
//! add: the proportional set size (PSS) of every VMM process of the app, before and after
//! the forks (copy-on-write keeps the 64 MiB shared).
//!
//! Last, Debian's nginx as one process (the image's `master_process off`) against a master
//! with two workers, under wrk `-t1 -c10` for 3 s, in alternating rounds; then both swapped
//! out and in again, in alternating rounds: the time `snapshot create --stop` takes, the
//! time from starting `snapshot restore` to the end of the first response, and the pages
//! each snapshot stores (a tree stores what its processes share once).
//!
//! Run with `cargo bench --bench processes` (`-- swaps` for the swap cycles alone).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{
    guest, http, install, median, nginx_with_workers, picocenter, printed_number, snapshot_stdout,
    wrk, Link, Server,
};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;

/// A root with busybox (as /bin/sh) and the benchmark program (as /bin/fork_bench).
fn bench_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    // The jailed VMM reads the root as the app's own user once it runs.
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("true")).unwrap();
    install(
        root.path(),
        &guest("fork_bench", Link::Static),
        "fork_bench",
    );
    root
}

fn main() {
    if std::env::args().any(|a| a == "swaps") {
        nginx_swaps();
        return;
    }
    let root = bench_root();
    let root_arg = root.path().to_str().unwrap().to_string();
    let native_program = root.path().join("bin/fork_bench");
    let native_sh = root.path().join("bin/sh");
    let in_pico = |args: &[&str]| {
        let mut cmd = picocenter();
        cmd.args(["run", "--root", &root_arg, "/bin/fork_bench"])
            .args(args);
        printed_number(&mut cmd)
    };
    let native = |args: &[&str]| printed_number(Command::new(&native_program).args(args));
    let names = [
        "fork + exit + wait, 64 MiB touched, picoprocess",
        "fork + exit + wait, 64 MiB touched, native",
        "posix_spawn + wait, picoprocess",
        "posix_spawn + wait, native",
        "sh -c 'true | true', picoprocess",
        "sh -c 'true | true', native",
        "semaphore round trip between processes, picoprocess",
        "semaphore round trip between processes, native",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        let round = [
            in_pico(&["fork64", "50"]),
            native(&["fork64", "50"]),
            in_pico(&["spawn", "50"]),
            native(&["spawn", "50"]),
            in_pico(&["shell", "20", "/bin/sh"]),
            native(&["shell", "20", native_sh.to_str().unwrap()]),
            in_pico(&["semping", "200"]),
            native(&["semping", "200"]),
        ];
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    println!("median of {ROUNDS} rounds (each the median of 50, 20 or 200 runs):");
    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    for (name, value) in names.iter().zip(&medians) {
        println!("  {name:<50} {:>9.3} ms", value / 1e6);
    }
    for (what, goal, pair) in [
        ("fork + exit + wait (64 MiB)", "goal: <= 3 ms", 0),
        ("posix_spawn + wait", "goal: <= 10 ms", 2),
        ("sh -c 'true | true'", "", 4),
        ("semaphore round trip", "", 6),
    ] {
        println!(
            "ratio {what}, picoprocess / native: {:7.2}  {goal}",
            medians[pair] / medians[pair + 1]
        );
    }
    idle_children_memory(&root_arg);
    nginx_workers();
    nginx_swaps();
}

/// Swaps app `name` out into `dir`: (milliseconds, pages stored).
fn swap_out(name: &str, dir: &Path) -> (f64, u64) {
    let started = Instant::now();
    let said = snapshot_stdout(&["create", name, "-o", dir.to_str().unwrap(), "--stop"]);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let stored = said
        .split_once(" pages stored")
        .and_then(|(before, _)| before.rsplit(['(', ' ']).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no page count in {said:?}"));
    (ms, stored)
}

/// Restores the newest snapshot in `dir` and returns it with the milliseconds to the end
/// of the first response to `GET /` at `address`.
fn swap_in(dir: &Path, address: &str) -> (std::process::Child, f64) {
    let started = Instant::now();
    let child = picocenter()
        .args(["snapshot", "restore"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address: std::net::SocketAddr = address.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "nothing answered at {address}");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(http(address, "GET", "/", b"").status, 200);
    (child, started.elapsed().as_secs_f64() * 1e3)
}

/// nginx as one process against a master with two workers through swap cycles.
fn nginx_swaps() {
    let apps = [
        ("bench-swap-single", "127.0.12.3:80"),
        ("bench-swap-workers", "127.0.12.4:80"),
    ];
    let single = Server::start("nginx", apps[0].0, "127.0.12.3", 80, &[]);
    let (workers, _data) = nginx_with_workers(apps[1].0, "127.0.12.4");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut out_ms = [Vec::new(), Vec::new()];
    let mut in_ms = [Vec::new(), Vec::new()];
    let mut stored = [0u64; 2];
    let mut full = [0u64; 2];
    for (i, server) in [single, workers].into_iter().enumerate() {
        assert_eq!(http(server.address, "GET", "/", b"").status, 200);
        full[i] = swap_out(apps[i].0, dirs[i].path()).1;
        let _ = server.stop_waiting();
    }
    for _ in 0..ROUNDS {
        for i in 0..2 {
            let (mut child, ms) = swap_in(dirs[i].path(), apps[i].1);
            in_ms[i].push(ms);
            let (ms, pages) = swap_out(apps[i].0, dirs[i].path());
            out_ms[i].push(ms);
            stored[i] = pages;
            let _ = child.wait();
        }
    }
    let medians = |lists: &mut [Vec<f64>; 2]| [median(&mut lists[0]), median(&mut lists[1])];
    let (out, into) = (medians(&mut out_ms), medians(&mut in_ms));
    println!("nginx swap cycles, median of {ROUNDS}: one process, then a master and 2 workers");
    println!(
        "  snapshot create --stop     {:8.1} ms {:8.1} ms  ratio {:.2}",
        out[0],
        out[1],
        out[1] / out[0]
    );
    println!(
        "  restore to first response  {:8.1} ms {:8.1} ms  ratio {:.2}",
        into[0],
        into[1],
        into[1] / into[0]
    );
    for (what, pages) in [("first, full", full), ("last, increment", stored)] {
        println!(
            "  pages stored ({what:<15}) {:6} {:11}     ratio {:.2}",
            pages[0],
            pages[1],
            pages[1] as f64 / pages[0].max(1) as f64
        );
    }
}

/// Requests per second of nginx as one process and as a master with two workers.
fn nginx_workers() {
    let single = Server::start("nginx", "bench-nginx-single", "127.0.12.1", 80, &[]);
    let (workers, _data) = nginx_with_workers("bench-nginx-workers", "127.0.12.2");
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(wrk("127.0.12.1:80", "/files/1k.txt", "3").0);
        two.push(wrk("127.0.12.2:80", "/files/1k.txt", "3").0);
    }
    let (one, two) = (median(&mut one), median(&mut two));
    println!(
        "nginx 1 KiB file, requests/s: one process {one:.0}, a master and 2 workers {two:.0}: \
         ratio {:.2}",
        two / one
    );
    drop((single, workers));
}

/// PSS of process `pid`, bytes.
fn pss(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        << 10
}

/// `pid` and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        i += 1;
    }
    all
}

/// The host memory 10 idle forked children of a 64 MiB parent add (PSS of the whole tree
/// of VMM processes, before and after the forks).
fn idle_children_memory(root: &str) {
    let mut child = picocenter()
        .args(["run", "--root", root, "/bin/fork_bench", "idle", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the idle app");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = child.id();
    let mut wait_for = |want: &str| {
        let line = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        assert_eq!(line, want, "the idle app said {line:?}");
        // Let the processes settle (a fork's child is ready before it first runs).
        std::thread::sleep(std::time::Duration::from_millis(500));
        tree(pid).into_iter().map(pss).sum::<u64>()
    };
    let before = wait_for("parent");
    let mut go = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut go, b"\n").unwrap();
    let after = wait_for("children");
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "10 idle forked children of a 64 MiB parent: PSS of all VMM processes {:.1} MiB \
         before, {:.1} MiB after: {:+.1}%  (goal: <= +10%)",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        (after as f64 / before as f64 - 1.0) * 100.0
    );
}

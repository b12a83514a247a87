//! What threads cost in a picoprocess, as ratios measured side by side in one run:
//!
//! * `pthread_create` + `pthread_join` of a thread that returns at once, one pair after
//!   another (the median pair);
//! * a futex ping-pong between two threads: wake the other, wait until it wakes you (the
//!   median round trip).
//!
//! * two threads that each compute for a while with no call: the time until both are done.
//!
//! Each against the same static binary run natively, and in a picoprocess twice: with
//! every thread on one vCPU (`--vcpus 1`: a ping-pong round trip is two thread switches
//! inside the VMM), and with a vCPU per thread (`--vcpus 2`: a round trip is two host
//! thread wake-ups, through exits).
//!
//! Then large reads of a file (tests/guests/threads.c `parallel-reads`: 4 MiB preads, 96
//! MiB a thread): one thread alone, then two at once, natively and in a picoprocess with
//! one vCPU and with two; with a second vCPU the VMM makes such reads without its process
//! lock, so two threads take about as long as one, where one lock would make it twice.
//!
//! Then small calls the VMM performs (getppid, open + close, a UDP send; thread_bench
//! `calls`): two threads at once against one alone, natively and in a picoprocess with one
//! vCPU, with a vCPU each, and with a vCPU each but no mailbox (every call an exit). With
//! a vCPU each the calls' transitions run in parallel; the VMM's own share of a call holds
//! the process lock, and the one mailbox poller answers one call at a time.
//!
//! Then two threaded servers against the same binaries run natively on loopback:
//! Debian's redis-server under `redis-benchmark -q -n 20000 -t set,get`, and the Go
//! net/http server of tests/go/httpd under wrk `-t1 -c10`, in alternating rounds, each
//! with one vCPU and with two.
//!
//! Run with `cargo bench --bench threads`. Rounds alternate the measurements so that
//! machine noise hits them alike; medians of the per-round values are reported.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{go_program, guest, median, picocenter, printed_number, wrk, Link, Server};
use std::process::{Command, Stdio};

const ROUNDS: usize = 7;

fn main() {
    let program = guest("thread_bench", Link::Static);
    let program = program.to_str().unwrap();
    let in_pico = |vcpus: &str, mode: &str, count: &str| {
        let mut cmd = picocenter();
        cmd.arg("run")
            .args(["--vcpus", vcpus])
            .args([program, mode, count]);
        printed_number(&mut cmd)
    };
    let native =
        |mode: &str, count: &str| printed_number(Command::new(program).args([mode, count]));
    let names = [
        "pthread_create + join, native",
        "pthread_create + join, 1 vCPU",
        "pthread_create + join, a vCPU each",
        "futex ping-pong round trip, native",
        "futex ping-pong round trip, 1 vCPU",
        "futex ping-pong round trip, a vCPU each",
        "2 threads x 200M steps, native",
        "2 threads x 200M steps, 1 vCPU",
        "2 threads x 200M steps, a vCPU each",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        let round = [
            native("create", "300"),
            in_pico("1", "create", "300"),
            in_pico("2", "create", "300"),
            native("pingpong", "1000"),
            in_pico("1", "pingpong", "1000"),
            in_pico("2", "pingpong", "1000"),
            native("parallel", "200"),
            in_pico("1", "parallel", "200"),
            in_pico("2", "parallel", "200"),
        ];
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    println!("median of {ROUNDS} rounds (each the median of 300 pairs or 1000 round trips):");
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    for (name, value) in names.iter().zip(&m) {
        println!("  {name:<42} {:>11.1} us", value / 1000.0);
    }
    for (what, at) in [
        ("create + join (goal: <= 300 us a pair)", 0),
        ("ping-pong (exit floor ~145 us a round trip)", 3),
        ("2 threads computing", 6),
    ] {
        println!(
            "ratio to native, {what}: 1 vCPU {:.2}, a vCPU each {:.2}",
            m[at + 1] / m[at],
            m[at + 2] / m[at]
        );
    }
    reads();
    calls();
    servers();
}

/// Two threads making small calls at once against one alone (see the module's comment).
fn calls() {
    let program = guest("thread_bench", Link::Static);
    let program = program.to_str().unwrap();
    let run = |cmd: &mut Command| -> (f64, f64) {
        let out = cmd.output().expect("running thread_bench");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let mut numbers = text
            .split_whitespace()
            .map(|n| n.parse::<f64>().expect("a number"));
        (
            numbers.next().expect("a ratio"),
            numbers.next().expect("ns a round"),
        )
    };
    let in_pico = |options: &[&str]| {
        run(picocenter()
            .arg("run")
            .args(options)
            .args([program, "calls", "1000"]))
    };
    let names = ["native", "1 vCPU", "a vCPU each", "a vCPU each, no mailbox"];
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        let round = [
            run(Command::new(program).args(["calls", "20000"])),
            in_pico(&["--vcpus", "1"]),
            in_pico(&["--vcpus", "2"]),
            in_pico(&["--vcpus", "2", "--no-mailbox"]),
        ];
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    println!(
        "small calls (getppid, open + close, UDP send), median of {ROUNDS} rounds: two threads \
         at once against one alone, and the us a round of both together"
    );
    for (name, list) in names.iter().zip(&mut samples) {
        let mut ratios: Vec<f64> = list.iter().map(|s| s.0).collect();
        let mut rounds: Vec<f64> = list.iter().map(|s| s.1).collect();
        println!(
            "  {name:<26} two / one {:.2}   {:>8.2} us a round",
            median(&mut ratios),
            median(&mut rounds) / 1000.0
        );
    }
}

/// The (one thread, two threads) times in ms that `threads parallel-reads` prints.
fn read_times(cmd: &mut Command) -> (f64, f64) {
    let out = cmd.output().expect("running the threads program");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("PASSED"), "{text}");
    let after = |key: &str| -> f64 {
        text.split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{key}' in {text}"))
    };
    (after("one thread "), after("two threads "))
}

fn reads() {
    let program = guest("threads", Link::Static);
    let program = program.to_str().unwrap();
    let in_pico = |vcpus: &str| {
        let mut cmd = picocenter();
        cmd.args(["run", "--vcpus", vcpus, program, "parallel-reads"]);
        read_times(&mut cmd)
    };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 6];
    for _ in 0..ROUNDS {
        let (native, one, own) = (
            read_times(Command::new(program).arg("parallel-reads")),
            in_pico("1"),
            in_pico("2"),
        );
        for (list, value) in samples
            .iter_mut()
            .zip([native.0, native.1, one.0, one.1, own.0, own.1])
        {
            list.push(value);
        }
    }
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    println!("large file reads, median of {ROUNDS} rounds (ms: one thread alone, two at once):");
    for (name, at) in [("native", 0), ("1 vCPU", 2), ("a vCPU each", 4)] {
        println!(
            "  {name:<12} {:>6.1} {:>6.1}   two / one {:.2}",
            m[at],
            m[at + 1],
            m[at + 1] / m[at]
        );
    }
}

/// A server run natively, killed when dropped.
struct Native(std::process::Child);

impl Native {
    fn start(program: &str, args: &[&str], address: &str) -> Native {
        let native = Native(
            Command::new(program)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {program}: {e}")),
        );
        for _ in 0..500 {
            if std::net::TcpStream::connect(address).is_ok() {
                return native;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{program} never listened on {address}");
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// redis-benchmark's requests per second for SET and GET.
fn redis_benchmark(host: &str) -> (f64, f64) {
    let out = Command::new("redis-benchmark")
        .args(["-h", host, "-q", "-n", "20000", "-t", "set,get"])
        .output()
        .expect("redis-benchmark (redis-tools) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let rate = |test: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no {test} figure in:\n{text}"))
    };
    (rate("SET"), rate("GET"))
}

fn servers() {
    // The picoprocesses: with one vCPU, and with a vCPU per thread (two, on two cores).
    let (native_ip, one_ip, own_ip) = ("127.0.14.1", "127.0.14.2", "127.0.14.3");
    let _native_redis = Native::start(
        "/usr/bin/redis-server",
        &[
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            native_ip,
            "--port",
            "6379",
        ],
        &format!("{native_ip}:6379"),
    );
    let one = ["--vcpus", "1"];
    let own = ["--vcpus", "2"];
    let _one_redis = Server::start("redis", "bench-threads-redis1", one_ip, 6379, &one);
    let _own_redis = Server::start("redis", "bench-threads-redis2", own_ip, 6379, &own);
    let go = go_program("httpd");
    let go = go.to_str().unwrap();
    let native_go_address = format!("{native_ip}:8080");
    let _native_go = Native::start(go, &[&native_go_address], &native_go_address);
    let _one_go = Server::run(
        "bench-threads-go1",
        one_ip,
        8080,
        &[one[0], one[1], go, ":8080"],
    );
    let _own_go = Server::run(
        "bench-threads-go2",
        own_ip,
        8080,
        &[own[0], own[1], go, ":8080"],
    );
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 9];
    for _ in 0..ROUNDS.min(5) {
        let (set, get) = redis_benchmark(native_ip);
        let (set1, get1) = redis_benchmark(one_ip);
        let (set2, get2) = redis_benchmark(own_ip);
        let go_rate = |ip: &str| wrk(&format!("{ip}:8080"), "/", "3").0;
        let round = [
            set,
            set1,
            set2,
            get,
            get1,
            get2,
            go_rate(native_ip),
            go_rate(one_ip),
            go_rate(own_ip),
        ];
        for (list, value) in samples.iter_mut().zip(round) {
            list.push(value);
        }
    }
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    println!("threaded servers, medians of alternating rounds (requests per second):");
    for (name, at) in [
        ("redis SET (redis-benchmark -n 20000)", 0),
        ("redis GET", 3),
        ("Go net/http (wrk -t1 -c10, 3 s)", 6),
    ] {
        let (native, one, own) = (m[at], m[at + 1], m[at + 2]);
        println!(
            "  {name:<38} native {native:>8.0}  1 vCPU {one:>8.0} ({:>5.1}%)  2 vCPUs {own:>8.0} ({:>5.1}%)",
            100.0 * one / native,
            100.0 * own / native
        );
    }
}

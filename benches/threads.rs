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
//! Then two threaded servers against the same binaries run natively on loopback:
//! Debian's redis-server under `redis-benchmark -q -n 20000 -t set,get`, and the Go
//! net/http server of tests/go/httpd under wrk `-t1 -c10`, in alternating rounds.
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
    servers();
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
    let (native_ip, pico_ip) = ("127.0.14.1", "127.0.14.2");
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
    let _pico_redis = Server::start("redis", "bench-threads-redis", pico_ip, 6379, &[]);
    let go = go_program("httpd");
    let go = go.to_str().unwrap();
    let native_go_address = format!("{native_ip}:8080");
    let _native_go = Native::start(go, &[&native_go_address], &native_go_address);
    let _pico_go = Server::run("bench-threads-go", pico_ip, 8080, &[go, ":8080"]);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 6];
    for _ in 0..ROUNDS.min(5) {
        let (set, get) = redis_benchmark(native_ip);
        let (pset, pget) = redis_benchmark(pico_ip);
        let (go_native, _, _) = wrk(&native_go_address, "/", "3");
        let (go_pico, _, _) = wrk(&format!("{pico_ip}:8080"), "/", "3");
        for (list, value) in samples
            .iter_mut()
            .zip([set, pset, get, pget, go_native, go_pico])
        {
            list.push(value);
        }
    }
    let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    println!("threaded servers, medians of alternating rounds (requests per second):");
    for (name, native, pico) in [
        ("redis SET (redis-benchmark -n 20000)", m[0], m[1]),
        ("redis GET", m[2], m[3]),
        ("Go net/http (wrk -t1 -c10, 3 s)", m[4], m[5]),
    ] {
        println!(
            "  {name:<40} native {native:>9.0}  picoprocess {pico:>9.0}  {:>5.1}%",
            100.0 * pico / native
        );
    }
}

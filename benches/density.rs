//! Density (issue #18): how many resident idle apps one worker holds, and what they cost.
//!
//! One hub and one worker; counter-http apps are added in stages (by default 10, 200 and
//! 1,000 apps; `PICOCENTER_DENSITY_APPS=10,200,1000,5000` for more). At each stage every
//! new app is resolved once through the hub's DNS and asked for `/`, so that all are
//! resident; then, with every app idle, this reports:
//!
//! * apps answering, out of N;
//! * memory per app: the drop in MemAvailable since before the first app, and the PSS of
//!   the worker's VMM and supervisor processes;
//! * the machine's CPU over 30 s of idleness (`PICOCENTER_DENSITY_IDLE_S` to change),
//!   and the part of it that the hub, the worker and its VMMs and supervisors used (the
//!   rest is the host's own: its init, kernel threads);
//! * the first request's latency (DNS query to first byte, the app starting), p50 and p99;
//! * a second pass over all apps (connect to first byte, resident), p50 and p99;
//! * the latency of one request to a single app while all the others idle, p50.
//!
//! Run with `cargo bench --bench density`. Needs root (the worker jails its VMMs) and
//! about 2.5 MiB of memory per app.

#[path = "../tests/common/mod.rs"]
mod common;

use common::cluster::{
    api, descendants, first_a, first_byte_of_root, mem_available, pss_bytes, query, start_hub,
    wait_for, Proc,
};
use common::{build_image, picocenter, state_dir};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";
const LIMIT: Duration = Duration::from_secs(60);
/// Client threads for a pass over the apps (the machine has 2 cores).
const CLIENTS: usize = 2;

/// One authenticated API call: (status, JSON).
fn call(address: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    api(address, method, path, Some(body), Some(TOKEN))
}

/// The app's address from the hub's DNS, and the milliseconds from the query to the
/// first byte of its answer to `GET /`.
fn resolve_and_ask(dns: SocketAddr, name: &str) -> Option<(Ipv4Addr, f64)> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket.set_read_timeout(Some(LIMIT)).ok()?;
    let started = Instant::now();
    socket.send_to(&query(name, 7), dns).ok()?;
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer).ok()?;
    let address = first_a(&answer[..n])?;
    Some((address, first_byte_of_root(address, started)?))
}

/// Runs `each` over `items` on [`CLIENTS`] threads, in order within each thread.
fn in_parallel<T: Sync, R: Send>(items: &[T], each: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(CLIENTS).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&each).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// The `p`-th percentile (0..=100) of `values`.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// The machine's CPU time so far: (busy, total), in clock ticks.
fn cpu_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = fields[3] + fields[4];
    (total - idle, total)
}

/// CPU ticks (user + system, all threads, reaped children excluded) of process `pid`.
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0;
    };
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum()
}

/// CPU ticks of the hub, the worker and every VMM and supervisor below it.
fn picocenter_ticks(hub: u32, worker: u32) -> u64 {
    [hub, worker]
        .into_iter()
        .chain(descendants(worker))
        .map(process_ticks)
        .sum()
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn main() {
    common::require_kvm();
    build_image("counter-http");
    let stages: Vec<usize> = std::env::var("PICOCENTER_DENSITY_APPS")
        .unwrap_or_else(|_| "10,200,1000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("PICOCENTER_DENSITY_APPS: numbers"))
        .collect();
    let idle_s: u64 = std::env::var("PICOCENTER_DENSITY_IDLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    let dir = state_dir().join("bench-density");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (hub, dns, hub_api) = start_hub(&dir, TOKEN);
    let mut cmd = picocenter();
    cmd.args(["worker", "--hub", &format!("http://{hub_api}")]);
    cmd.args(["--token", TOKEN, "--id", "density"]);
    cmd.args(["--addresses", "127.8.0.0/17", "--idle-after", "3600"]);
    cmd.args(["--memory-limit-mib", "1000000"]);
    cmd.arg("--store").arg(dir.join("cold"));
    let worker = Proc::spawn(cmd, dir.join("worker.log"));
    wait_for("the worker", LIMIT, || {
        let (_, workers) = call(hub_api, "GET", "/v1/workers", "");
        (!workers.as_array()?.is_empty()).then_some(())
    });
    // Let the worker and hub settle before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let baseline = mem_available();

    println!(
        "| apps | answering | MemAvailable drop per app | PSS per app (VMM + supervisor) | threads per app | machine CPU, {idle_s} s idle (picocenter's own) | first request p50 / p99 | second pass p50 / p99 | one app while the rest idle, p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut addresses: Vec<Ipv4Addr> = Vec::new();
    let mut answering = 0usize;
    for &n in &stages {
        let have = addresses.len();
        let names: Vec<String> = (have..n).map(|i| format!("dense{i}")).collect();
        for name in &names {
            let body = format!(r#"{{"name":"{name}","image":"counter-http"}}"#);
            let (status, answer) = call(hub_api, "POST", "/v1/apps", &body);
            assert!(status == 201 || status == 409, "{answer}");
        }
        let first = in_parallel(&names, |name| {
            resolve_and_ask(dns, &format!("{name}.pico.local"))
        });
        let mut first_ms = Vec::new();
        for (name, result) in names.iter().zip(first) {
            match result {
                Some((address, ms)) => {
                    addresses.push(address);
                    first_ms.push(ms);
                    answering += 1;
                }
                None => {
                    eprintln!("{name} did not answer");
                    addresses.push(Ipv4Addr::UNSPECIFIED);
                }
            }
        }
        // Idle: nothing asks anything for the measured period.
        std::thread::sleep(Duration::from_secs(3));
        let (hub_pid, worker_pid) = (hub.child.id(), worker.child.id());
        let (busy0, total0) = cpu_ticks();
        let own0 = picocenter_ticks(hub_pid, worker_pid);
        std::thread::sleep(Duration::from_secs(idle_s));
        let own1 = picocenter_ticks(hub_pid, worker_pid);
        let (busy1, total1) = cpu_ticks();
        let cpu = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
        let own = own1.saturating_sub(own0) as f64 / (total1 - total0).max(1) as f64 * 100.0;
        // Signed: with few apps, what the rest of the machine freed meanwhile can outweigh
        // them.
        let drop = (baseline as f64 - mem_available() as f64) / n as f64;
        let vmms = descendants(worker.child.id());
        let pss: u64 = vmms.iter().map(|&pid| pss_bytes(pid)).sum();
        let thread_count: usize = vmms.iter().map(|&pid| threads(pid)).sum();
        let mut second_ms = in_parallel(&addresses, |&address| {
            first_byte_of_root(address, Instant::now()).unwrap_or(f64::NAN)
        });
        second_ms.retain(|ms| !ms.is_nan());
        let mut one_ms: Vec<f64> = (0..200)
            .filter_map(|_| first_byte_of_root(addresses[0], Instant::now()))
            .collect();
        println!(
            "| {n} | {answering}/{n} | {:.2} MiB | {:.2} MiB | {:.1} | {cpu:.2}% ({own:.2}%) | {:.1} / {:.1} ms | {:.2} / {:.2} ms | {:.2} ms |",
            drop / 1048576.0,
            pss as f64 / n as f64 / 1048576.0,
            thread_count as f64 / n as f64,
            percentile(&mut first_ms, 50.0),
            percentile(&mut first_ms, 99.0),
            percentile(&mut second_ms, 50.0),
            percentile(&mut second_ms, 99.0),
            percentile(&mut one_ms, 50.0),
        );
    }
    // For looking at the machine by hand afterwards.
    if let Some(hold) = std::env::var("PICOCENTER_DENSITY_HOLD_S")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("holding the apps for {hold} s");
        std::thread::sleep(Duration::from_secs(hold));
    }
    drop(worker);
    drop(hub);
}

//! Snapshots: how fast a swapped-out app answers again, how fast a snapshot is written, and
//! how small an increment is, measured side by side in one run.
//!
//! * Restore to first response: from starting `picocenter snapshot restore --mode M` to
//!   the end of the first HTTP response, for eager, lazy and activeset, rounds alternating
//!   between the modes on one snapshot (in the page cache). The apps: bigmem (256 MiB
//!   touched, 8 MiB read per request), counter-http, nginx and python-http. Each snapshot
//!   is a second-cycle one: the app was restored once and served requests, so its
//!   ActiveSet is what requests use, as in production.
//! * Write throughput: full snapshots of bigmem's 256 MiB, against writing and syncing
//!   the same number of bytes from one buffer in this process, to the same file system.
//! * Increment size: the page file an increment writes after a request dirtied 1 MiB.
//!
//! With `PICOCENTER_BEFORE=<another build's picocenter binary>`: counter-http's restore to
//! first response (activeset, second cycle) under that build against this one, rounds
//! alternating (issue #15's before and after); `cargo bench --bench snapshots -- before`
//! runs only this.
//!
//! Run with `cargo bench --bench snapshots`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{
    build_image, guest, median, picocenter, snapshot_stdout, with_build, Build, Link, Server,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 11;
const MODES: [&str; 4] = ["eager", "lazy", "activeset", "stream"];

/// Sends `GET path` to `address` once it accepts, and returns the body.
fn get(address: &str, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match std::net::TcpStream::connect(address) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("connecting to {address}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_micros(100)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{address}{path}: {text}"
    );
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// Starts a restore of the newest snapshot in `dir`.
fn restore(dir: &Path, mode: &str) -> Child {
    let mut cmd = picocenter();
    cmd.args(["snapshot", "restore"])
        .arg(dir)
        .args(["--mode", mode])
        .args(common::root_from(dir));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    cmd.stdout(Stdio::null()).stderr(log);
    cmd.spawn().unwrap()
}

/// Ends a restored app without a snapshot, so the next round restores the same one.
fn discard(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Milliseconds from starting a restore to the end of the first response to `GET path`.
fn restore_to_response(dir: &Path, mode: &str, address: &str, path: &str) -> f64 {
    let started = Instant::now();
    let child = restore(dir, mode);
    get(address, path);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    discard(child);
    ms
}

/// Swaps app `name` out into `dir` and waits for its process.
fn swap_out(name: &str, dir: &Path, mut child: Child) {
    snapshot_stdout(&["create", name, "-o", dir.to_str().unwrap(), "--stop"]);
    let _ = child.wait();
}

/// Makes the snapshot a second-cycle one: restores it, serves `requests`, swaps it out.
fn second_cycle(name: &str, dir: &Path, address: &str, path: &str, requests: usize) {
    let child = restore(dir, "lazy");
    for _ in 0..requests {
        get(address, path);
        // Requests 60 ms apart: the first two are each a sampled episode (a port's samples
        // are 50 ms apart at first, the gap doubling with each).
        std::thread::sleep(Duration::from_millis(60));
    }
    swap_out(name, dir, child);
}

/// Starts `image` as app `name` at `ip`:80 with an empty store `dir`, asks it for `path`,
/// swaps it out, and makes that snapshot a second-cycle one; returns its address.
fn second_cycle_snapshot(image: &str, name: &str, dir: &Path, ip: &str, path: &str) -> String {
    let _ = std::fs::remove_dir_all(dir);
    let address = format!("{ip}:80");
    let server = Server::start(image, name, ip, 80, &[]);
    get(&address, path);
    snapshot_stdout(&["create", name, "-o", dir.to_str().unwrap(), "--stop"]);
    server.stop_waiting();
    second_cycle(name, dir, &address, path, 3);
    address
}

/// The newest snapshot's inspection, for its ActiveSet line.
fn activeset_line(dir: &Path) -> String {
    snapshot_stdout(&["inspect", dir.to_str().unwrap()])
        .lines()
        .find(|l| l.trim_start().starts_with("ActiveSet"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The size of the newest snapshot's page file in `dir`.
fn newest_page_file(dir: &Path) -> u64 {
    let head = std::fs::read_to_string(dir.join("HEAD")).unwrap();
    std::fs::metadata(dir.join(format!("{}.pages", head.trim())))
        .unwrap()
        .len()
}

/// The size of every page file in `dir`.
fn page_files(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pages"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Times the three restore modes on the snapshot in `dir` and prints them.
fn compare_modes(label: &str, dir: &Path, address: &str, path: &str) {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    // Warm the page cache with one untimed round of each.
    for mode in MODES {
        restore_to_response(dir, mode, address, path);
    }
    for _ in 0..ROUNDS {
        for (i, mode) in MODES.iter().enumerate() {
            times[i].push(restore_to_response(dir, mode, address, path));
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    println!("{label}  ({})", activeset_line(dir));
    for (mode, ms) in MODES.iter().zip(&medians) {
        println!(
            "  {mode:<10} {ms:8.2} ms   eager/{mode} = {:.2}x",
            medians[0] / ms
        );
    }
}

/// Drops the page cache's copy of every file in `dir` (written back first), as if the
/// store were on a disk nothing had read since boot.
fn drop_cached(dir: &Path) {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let file = std::fs::File::open(&path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: posix_fadvise only reads its arguments; the fd is open.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise {}", path.display());
    }
}

/// Times restores of the snapshot in `dir` from a cold page cache: eager, lazy,
/// activeset, and activeset told the port the first client uses (`--first-port`, which
/// fetches that port's pages first instead of the app-wide ActiveSet).
fn compare_cold(label: &str, dir: &Path, address: &str, path: &str, port: &str) {
    const COLD_ROUNDS: usize = 5;
    let variants: [(&str, &[&str]); 4] = [
        ("eager", &["--mode", "eager"]),
        ("lazy", &["--mode", "lazy"]),
        ("activeset", &["--mode", "activeset"]),
        ("port set", &["--mode", "activeset", "--first-port", port]),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..COLD_ROUNDS {
        for (i, (_, args)) in variants.iter().enumerate() {
            drop_cached(dir);
            let started = Instant::now();
            let mut cmd = picocenter();
            cmd.args(["snapshot", "restore"])
                .arg(dir)
                .args(*args)
                .args(common::root_from(dir))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().unwrap();
            get(address, path);
            times[i].push(started.elapsed().as_secs_f64() * 1e3);
            discard(child);
        }
    }
    println!(
        "{label}, page cache dropped before each restore (median of {COLD_ROUNDS})  ({})",
        activeset_line(dir)
    );
    let eager = median(&mut times[0].clone());
    for ((name, _), t) in variants.iter().zip(times.iter_mut()) {
        let ms = median(t);
        println!(
            "  {name:<10} {ms:8.2} ms   eager/{name} = {:.2}x",
            eager / ms
        );
    }
}

fn bigmem_dir(state: &Path) -> (PathBuf, Child) {
    start_bigmem(state, "bigmem", "127.0.8.1")
}

/// Starts bigmem as app `bench-NAME` at `ip`:80 with an empty store
/// `bench-snapshots/NAME`, and asks it for `/` once.
fn start_bigmem(state: &Path, name: &str, ip: &str) -> (PathBuf, Child) {
    let dir = state.join(format!("bench-snapshots/{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let program = guest("bigmem", Link::Static);
    let mut cmd = picocenter();
    cmd.args(["run", "--name", &format!("bench-{name}"), "--memory", "320"]);
    cmd.args(["--address", ip]).arg(&program);
    cmd.args(["80", "256", "8"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let child = cmd.spawn().unwrap();
    get(&format!("{ip}:80"), "/");
    (dir, child)
}

/// Issue #14's case: bigmem's first snapshot after its start, whose app-wide ActiveSet
/// holds everything the start touched (256 MiB) while port 80's set holds what requests
/// used, restored from a cold page cache.
fn first_cycle_cold(state: &Path) {
    let (dir, child) = start_bigmem(state, "bigmem-cold", "127.0.8.5");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(60));
        get("127.0.8.5:80", "/");
    }
    swap_out("bench-bigmem-cold", &dir, child);
    compare_cold(
        "bigmem 256 MiB, first snapshot after its start",
        &dir,
        "127.0.8.5:80",
        "/",
        "80",
    );
    // How well each prefetch guessed the first request: restored with --relearn (so the
    // next snapshot's ActiveSet holds only what the app used), one request, swapped out.
    let first = std::fs::read_to_string(dir.join("HEAD")).unwrap();
    println!("  what the first request used of the prefetch (snapshot inspect):");
    for extra in [&["--first-port", "80"][..], &[]] {
        let mut cmd = picocenter();
        cmd.args(["snapshot", "restore"])
            .arg(&dir)
            .args(["--id", first.trim(), "--mode", "activeset", "--relearn"])
            .args(extra)
            .args(common::root_from(&dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap();
        get("127.0.8.5:80", "/");
        swap_out("bench-bigmem-cold", &dir, child);
        let inspect = snapshot_stdout(&["inspect", dir.to_str().unwrap()]);
        let line = inspect
            .lines()
            .find(|l| l.trim_start().starts_with("prefetch "))
            .unwrap_or_default();
        println!("    {}", line.trim());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Full snapshots of the running bigmem (256 MiB), each to a fresh store; MB/s.
fn write_throughput(state: &Path) -> (f64, f64) {
    let mut rates = Vec::new();
    let mut baseline = Vec::new();
    let buffer: Vec<u8> = (0..256usize << 20).map(|i| (i >> 12) as u8 | 1).collect();
    for round in 0..ROUNDS.min(7) {
        let dir = state.join(format!("bench-snapshots/throughput-{round}"));
        let _ = std::fs::remove_dir_all(&dir);
        let out = snapshot_stdout(&[
            "create",
            "bench-bigmem",
            "-o",
            dir.to_str().unwrap(),
            "--full",
        ]);
        let bytes = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pages"))
            .map(|e| e.metadata().unwrap().len())
            .sum::<u64>();
        let ms: f64 = out
            .rsplit_once(" in ")
            .and_then(|(_, t)| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time in {out:?}"));
        rates.push(bytes as f64 / ms / 1e3);
        std::fs::remove_dir_all(&dir).unwrap();

        let path = state.join("bench-snapshots/baseline");
        let started = Instant::now();
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in buffer.chunks(1 << 20) {
            file.write_all(chunk).unwrap();
        }
        file.sync_all().unwrap();
        baseline.push(buffer.len() as f64 / started.elapsed().as_secs_f64() / 1e6);
        std::fs::remove_file(&path).unwrap();
    }
    (median(&mut rates), median(&mut baseline))
}

/// counter-http's restore to first response under `before` and this build, each from a
/// second-cycle snapshot in its own state directory, rounds alternating.
fn before_and_after(before: &Build) {
    let prepare = |ip: &str| {
        let dir = common::state_dir().join("bench-snapshots/floor-counter");
        let address = second_cycle_snapshot("counter-http", "bench-floor-counter", &dir, ip, "/");
        (dir, address)
    };
    let (old_dir, old_address) = with_build(Some(before), || prepare("127.0.8.6"));
    let (new_dir, new_address) = prepare("127.0.8.7");
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let o = with_build(Some(before), || {
            restore_to_response(&old_dir, "activeset", &old_address, "/")
        });
        let n = restore_to_response(&new_dir, "activeset", &new_address, "/");
        // The first round warms the page cache.
        if round > 0 {
            old.push(o);
            new.push(n);
        }
    }
    let (old, new) = (median(&mut old), median(&mut new));
    println!("== counter-http, restore (activeset) to first response, median of {ROUNDS} ==");
    println!(
        "  PICOCENTER_BEFORE {old:8.2} ms\n  this build        {new:8.2} ms   after/before = {:.2}",
        new / old
    );
}

fn main() {
    common::require_kvm();
    let before = Build::before();
    if let Some(before) = &before {
        before_and_after(before);
    }
    if std::env::args().any(|a| a == "before") {
        return;
    }
    let state = common::state_dir();
    for image in ["counter-http", "nginx", "python-http"] {
        build_image(image);
    }

    println!("== snapshot write throughput (256 MiB, full; median of 7) ==");
    let (dir, bigmem) = bigmem_dir(&state);
    let (rate, baseline) = write_throughput(&state);
    println!(
        "  snapshot    {rate:8.0} MB/s\n  write+fsync {baseline:8.0} MB/s (one buffer, same file system)\n  snapshot/baseline = {:.2}",
        rate / baseline
    );

    println!("\n== restore start to first HTTP response (median of {ROUNDS}) ==");
    swap_out("bench-bigmem", &dir, bigmem);
    // The throughput rounds' snapshots went into the app's own store first, so this one
    // is an increment of theirs: the full size is the whole chain's.
    let full_bytes = page_files(&dir);
    first_cycle_cold(&state);
    second_cycle("bench-bigmem", &dir, "127.0.8.1:80", "/", 3);
    compare_modes(
        "bigmem 256 MiB, 8 MiB per request",
        &dir,
        "127.0.8.1:80",
        "/",
    );
    compare_cold(
        "bigmem 256 MiB, second cycle",
        &dir,
        "127.0.8.1:80",
        "/",
        "80",
    );

    for (image, ip, path) in [
        ("counter-http", "127.0.8.2", "/"),
        ("nginx", "127.0.8.3", "/"),
        ("python-http", "127.0.8.4", "/"),
    ] {
        let dir = state.join(format!("bench-snapshots/{image}"));
        let address = second_cycle_snapshot(image, &format!("bench-{image}"), &dir, ip, path);
        compare_modes(image, &dir, &address, path);
    }

    println!("\n== incremental snapshot after 1 MiB dirtied ==");
    let dir = state.join("bench-snapshots/bigmem");
    let child = restore(&dir, "lazy");
    get("127.0.8.1:80", "/dirty");
    swap_out("bench-bigmem", &dir, child);
    let increment = newest_page_file(&dir);
    println!(
        "  full page file {:.1} MiB; increment {:.2} MiB ({} pages) = {:.3}% of full",
        full_bytes as f64 / 1048576.0,
        increment as f64 / 1048576.0,
        increment / 4096,
        increment as f64 * 100.0 / full_bytes as f64
    );
    let _ = std::fs::remove_dir_all(state.join("bench-snapshots"));
}

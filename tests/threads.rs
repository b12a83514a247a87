//! Threaded apps: pthreads (tests/guests/threads.c), Python's thread pool and its
//! ThreadingHTTPServer, exit_group from a second thread. Snapshots of threaded apps are in
//! tests/snapshots.rs.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn the_pthread_program_passes_static_and_dynamic() {
    for link in [Link::Static, Link::Dynamic] {
        let program = guest("threads", link);
        let native = std::process::Command::new(&program).output().unwrap();
        assert_eq!(
            native.status.code(),
            Some(0),
            "native: {}",
            describe(&native)
        );
        let out = run(&[program.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{link:?}: {}", describe(&out));
        assert_eq!(stdout(&out), "PASSED: 0 failures\n", "{}", describe(&out));
    }
}

#[test]
fn exit_group_from_a_second_thread_ends_the_app_with_its_status() {
    let program = guest("threads", Link::Static);
    let out = run(&[program.to_str().unwrap(), "exit-from-thread"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(
        stdout(&out).contains("PASSED before exit"),
        "{}",
        describe(&out)
    );
}

/// A page one thread unmaps faults in another that used it before.
#[test]
fn a_page_unmapped_by_one_thread_faults_in_another() {
    let program = guest("threads", Link::Static);
    let out = run(&[program.to_str().unwrap(), "unmap-across"]);
    assert_eq!(out.status.code(), Some(139), "{}", describe(&out));
    assert!(
        stdout(&out).contains("read 42 before"),
        "{}",
        describe(&out)
    );
    assert!(!stdout(&out).contains("survived"), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("segmentation fault: read at"),
        "{}",
        describe(&out)
    );
}

const POOL: &str = "
import concurrent.futures, threading, hashlib
main = threading.get_ident()
def work(n):
    return hashlib.sha256(str(n).encode() * 1000).hexdigest()[:8], threading.get_ident() != main
with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(work, range(300)))
print(len(results), all(other for _, other in results), ' '.join(h for h, _ in results[::50]))
";

#[test]
fn pythons_thread_pool_gives_what_it_gives_natively() {
    build_image("python-http");
    let native = std::process::Command::new("/usr/bin/python3")
        .args(["-c", POOL])
        .output()
        .unwrap();
    assert!(native.status.success(), "{}", describe(&native));
    let out = run(&[
        "--image",
        "python-http",
        "--name",
        "test-thread-pool",
        "--address",
        "127.0.11.1",
        "/usr/bin/python3",
        "-c",
        POOL,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), String::from_utf8_lossy(&native.stdout));
    assert!(stdout(&out).starts_with("300 True "), "{}", describe(&out));
}

/// `python3 -m http.server` is a ThreadingHTTPServer: a thread per connection. Twenty
/// clients at once each get the file byte for byte; a snapshot of the running server
/// leaves it serving; idle, it uses no CPU.
#[test]
fn python_http_server_serves_twenty_clients_at_once() {
    let file = "/usr/lib/python3.11/json/decoder.py";
    let expected = std::fs::read(file).unwrap();
    let server = Server::start(
        "python-http",
        "test-thread-http",
        "127.0.11.2",
        8000,
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "0.0.0.0",
            "--directory",
            "/usr/lib/python3.11",
        ],
    );
    let address = server.address;
    let clients: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || http(address, "GET", "/json/decoder.py", b"")))
        .collect();
    for client in clients {
        let response = client.join().unwrap();
        assert_eq!(response.status, 200);
        assert!(response.body == expected, "a body differs from {file}");
    }

    // A snapshot of the running threaded server leaves it serving.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = picocenter();
    cmd.args(["snapshot", "create", "test-thread-http", "-o"])
        .arg(dir.path());
    let out = run_with_limit(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(http(address, "GET", "/json/decoder.py", b"").body, expected);

    // Idle: every thread waits, and nothing ticks.
    let pid = server_pid("test-thread-http");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used <= 5,
        "an idle threaded app used {used} ticks in {:?}",
        started.elapsed()
    );
    server.stop();
}

/// The VMM process of app `name` (its command line names it).
fn server_pid(name: &str) -> u32 {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "--", &format!("--name {name} ")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .min()
        .unwrap_or_else(|| panic!("no VMM for {name}"))
}

/// User + system CPU ticks of process `pid`, all threads.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

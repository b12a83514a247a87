//! Threaded apps: pthreads (tests/guests/threads.c), Python's thread pool and its
//! ThreadingHTTPServer, exit_group from a second thread. Snapshots of threaded apps are in
//! tests/snapshots.rs.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The vCPU limits each threaded test runs with: every thread on one vCPU, and a vCPU per
/// thread.
const VCPUS: [&str; 2] = ["1", "4"];

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
        for vcpus in VCPUS {
            let out = run(&["--vcpus", vcpus, program.to_str().unwrap()]);
            let what = format!("{link:?}, {vcpus} vCPUs");
            assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
            assert_eq!(
                stdout(&out),
                "PASSED: 0 failures\n",
                "{what}: {}",
                describe(&out)
            );
        }
    }
}

#[test]
fn exit_group_from_a_second_thread_ends_the_app_with_its_status() {
    for vcpus in VCPUS {
        let out = threads_program(&[], vcpus, "exit-from-thread");
        ends_saying(&out, 7, "PASSED before exit", vcpus);
    }
}

/// tests/guests/threads.c (static) in mode `mode`, with `flags` and `vcpus` vCPUs at most.
fn threads_program(flags: &[&str], vcpus: &str, mode: &str) -> std::process::Output {
    let program = guest("threads", Link::Static);
    let mut args = flags.to_vec();
    args.extend(["--vcpus", vcpus, program.to_str().unwrap(), mode]);
    run(&args)
}

/// Checks that a run ended with status `code` and printed `text`.
fn ends_saying(out: &std::process::Output, code: i32, text: &str, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {}", describe(out));
    assert!(stdout(out).contains(text), "{what}: {}", describe(out));
}

/// A thread that computes without a call holds up one that sleeps only while they share a
/// vCPU: on vCPUs of their own, 50 sleeps of 1 ms take about 50 ms, not 50 time slices.
#[test]
fn a_computing_thread_holds_up_no_other_on_a_vcpu_of_its_own() {
    let program = guest("threads", Link::Static);
    let took = |vcpus: &str| -> u64 {
        let out = run(&["--vcpus", vcpus, program.to_str().unwrap(), "latency"]);
        assert_eq!(out.status.code(), Some(0), "{vcpus}: {}", describe(&out));
        let text = stdout(&out);
        let ms = text
            .strip_prefix("slept 50 x 1 ms in ")
            .and_then(|rest| rest.trim().strip_suffix(" ms"))
            .and_then(|ms| ms.parse().ok());
        ms.unwrap_or_else(|| panic!("{vcpus}: {}", describe(&out)))
    };
    let shared = took("1");
    // Sharing, each sleep waits for the spinner's 10 ms slice: at least ~500 ms.
    assert!(shared >= 400, "one vCPU: {shared} ms");
    // On vCPUs of their own, ~60 ms on an idle machine; the other tests of this binary
    // load its two cores, so the best of up to three runs must be under half.
    let mut own = u64::MAX;
    for _ in 0..3 {
        own = own.min(took("2"));
        if own * 2 <= shared {
            break;
        }
    }
    assert!(
        own * 2 <= shared,
        "a vCPU each: {own} ms, one vCPU: {shared} ms"
    );
}

/// Threads on vCPUs of their own make calls the mailbox answers while the main thread
/// signals them: the one poller serves every vCPU's mailbox, and must answer each call as
/// the thread that made it (its own signal mask, robust list and file offsets), and each
/// signal must reach its thread. The log's count shows that calls from the other vCPUs
/// went through the mailbox, not only by exits.
#[test]
fn calls_through_the_mailbox_act_as_the_thread_on_each_vcpu() {
    let program = guest("threads", Link::Static);
    let native = std::process::Command::new(&program)
        .arg("own-calls")
        .output();
    ends_saying(&native.unwrap(), 0, "own-calls: PASSED", "native");
    for vcpus in VCPUS {
        let out = threads_program(&["-v"], vcpus, "own-calls");
        ends_saying(&out, 0, "own-calls: PASSED: 0 failures", vcpus);
        // ~60,000 calls the mailbox may answer, most while the poller spins; under the
        // load of the binary's other tests it still takes some.
        counted_only_with_a_second_vcpu(&out, "mailbox_calls_from_other_vcpus", vcpus, 100);
    }
}

/// A count the VMM logs at debug level (`-v`) when the app ends, and the log.
fn logged_count(out: &std::process::Output, key: &str) -> (u64, String) {
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let count = log
        .split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the log: {log}"));
    (count, log)
}

/// Checks that the count `key` the run logged is 0 with one vCPU, and at least `at_least`
/// with more.
fn counted_only_with_a_second_vcpu(
    out: &std::process::Output,
    key: &str,
    vcpus: &str,
    at_least: u64,
) {
    let (count, log) = logged_count(out, key);
    if vcpus == "1" {
        assert_eq!(count, 0, "{log}");
    } else {
        assert!(count >= at_least, "{vcpus}: {count}: {log}");
    }
}

/// With a second vCPU, a large read of a regular file is made without the process lock,
/// so that the other threads' calls go on meanwhile (BENCHMARKS.md measures two threads
/// reading at once), and every byte read is right. With one vCPU nothing could go on
/// meanwhile, and none is.
#[test]
fn large_file_reads_are_made_without_the_process_lock() {
    for vcpus in VCPUS {
        let out = threads_program(&["-v"], vcpus, "parallel-reads");
        ends_saying(&out, 0, "parallel-reads: PASSED: 0 failures", vcpus);
        // 5 threads' 24 reads of 4 MiB each, and two threads' 2 writes.
        counted_only_with_a_second_vcpu(&out, "unlocked_transfers", vcpus, 100);
    }
}

/// The attack on reads made without the lock: one thread reads 4 MiB into a buffer while
/// another unmaps the buffer, maps new memory and fills it. The buffer's frames must not
/// go to the new memory before the read is over, or the read lands in it. (With the
/// frames not held back, 5 to 21 rounds of 30 found the new memory overwritten.)
#[test]
fn a_read_made_without_the_lock_never_lands_in_memory_mapped_meanwhile() {
    for vcpus in VCPUS {
        let out = threads_program(&["-v"], vcpus, "unmap-during-read");
        ends_saying(&out, 0, "unmap-during-read: PASSED: 0 failures", vcpus);
        let (unlocked, log) = logged_count(&out, "unlocked_transfers");
        if vcpus != "1" {
            assert!(unlocked > 0, "{vcpus}: {log}");
        }
    }
}

/// New mappings only fill empty page-table entries, which no CPU caches: a thread that
/// maps and fills 200 areas does not bring another, computing on a vCPU of its own, out
/// of its guest for each (200 shootdowns before; the one left is the time page's or the
/// ActiveSet's).
/// The kvm vCPU and VM fds that process `pid` holds: (vCPUs, VMs).
fn kvm_fds(pid: u32) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let links: Vec<String> = entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let count = |prefix: &str| links.iter().filter(|l| l.starts_with(prefix)).count();
    (count("anon_inode:kvm-vcpu"), count("anon_inode:kvm-vm"))
}

/// The processes below `root` in the host's process tree.
fn descendants(root: u32) -> Vec<u32> {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut found = vec![root];
    loop {
        let more: Vec<u32> = all
            .iter()
            .copied()
            .filter(|&pid| {
                !found.contains(&pid) && parent_of(pid).is_some_and(|p| found.contains(&p))
            })
            .collect();
        if more.is_empty() {
            return found;
        }
        found.extend(more);
    }
}

/// A process forked while a second thread runs on its own vCPU keeps only what it uses
/// of KVM: its own VM and vCPU, not the parent's VM and the other vCPUs.
#[test]
fn a_forked_process_lets_go_of_its_parent_s_vms_and_vcpus() {
    use std::io::BufRead;
    let program = guest("threads", Link::Static);
    let mut child = picocenter()
        .args(["run", "--vcpus", "2"])
        .arg(&program)
        .arg("fork-beside-a-thread")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let said = lines.next().and_then(|l| l.ok());
    let holders: Vec<(usize, usize)> = descendants(child.id())
        .into_iter()
        .map(kvm_fds)
        .filter(|&(vcpus, vms)| vcpus + vms > 0)
        .collect();
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(said.as_deref(), Some("forked"), "{rest:?}");
    assert!(status.success(), "{rest:?}");
    let mut holders = holders;
    holders.sort();
    // The parent: its two vCPUs and its VM; the child: its own vCPU and VM.
    assert_eq!(holders, [(1, 1), (2, 1)], "(vCPU fds, VM fds) of each VMM");
}

#[test]
fn new_mappings_do_not_stop_the_other_vcpus() {
    let out = threads_program(&["-v"], "2", "map-beside-a-spinner");
    ends_saying(&out, 0, "PASSED: 0 failures", "2 vCPUs");
    let (shootdowns, log) = logged_count(&out, "shootdowns");
    assert!(shootdowns < 50, "{shootdowns}: {log}");
}

/// A page one thread unmaps faults in another that used it before, on one vCPU and on two
/// (where the translation the other vCPU cached must be shot down).
#[test]
fn a_page_unmapped_by_one_thread_faults_in_another() {
    let program = guest("threads", Link::Static);
    for vcpus in VCPUS {
        a_page_unmapped_by_one_thread_faults_in_another_with(&program, vcpus);
    }
}

fn a_page_unmapped_by_one_thread_faults_in_another_with(program: &std::path::Path, vcpus: &str) {
    let out = run(&["--vcpus", vcpus, program.to_str().unwrap(), "unmap-across"]);
    assert_eq!(out.status.code(), Some(139), "{vcpus}: {}", describe(&out));
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

/// Debian's redis-server (with its background threads), driven by redis-cli and
/// redis-benchmark.
#[test]
fn redis_answers_redis_cli_and_redis_benchmark() {
    let server = Server::start("redis", "test-thread-redis", "127.0.11.3", 6379, &[]);
    let host = "127.0.11.3";
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", host])
            .args(args)
            .output()
            .expect("redis-cli (redis-tools) must be installed");
        assert!(out.status.success(), "{}", describe(&out));
        stdout(&out).trim().to_string()
    };
    assert_eq!(cli(&["ping"]), "PONG");
    assert_eq!(cli(&["set", "greeting", "hello"]), "OK");
    assert_eq!(cli(&["get", "greeting"]), "hello");
    let out = run_with_limit(
        std::process::Command::new("redis-benchmark")
            .args(["-h", host, "-q", "-n", "10000", "-t", "set,get", "-c", "20"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out).replace('\r', "\n");
    for test in ["SET", "GET"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second")),
            "no {test} figure in:\n{text}"
        );
    }
    // redis-benchmark's keys are there, and ours too.
    assert_eq!(cli(&["get", "greeting"]), "hello");
    assert!(cli(&["dbsize"]).parse::<u64>().unwrap() >= 2);
    server.stop();
}

/// Debian's memcached with four worker threads: clients on several connections at once
/// each store and read back their own keys.
#[test]
fn memcached_with_four_threads_serves_concurrent_clients() {
    use std::io::{BufRead, BufReader, Write};
    let server = Server::start(
        "memcached",
        "test-thread-memcached",
        "127.0.11.4",
        11211,
        &[],
    );
    let address = server.address;
    let clients: Vec<_> = (0..8)
        .map(|client| {
            std::thread::spawn(move || {
                let stream = std::net::TcpStream::connect(address).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                for i in 0..50 {
                    let value = format!("value-{client}-{i}");
                    write!(
                        &stream,
                        "set key-{client}-{i} 0 0 {}\r\n{value}\r\n",
                        value.len()
                    )
                    .unwrap();
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    assert_eq!(line, "STORED\r\n");
                    write!(&stream, "get key-{client}-{i}\r\n").unwrap();
                    let mut got = Vec::new();
                    for _ in 0..3 {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        got.push(line.clone());
                    }
                    assert_eq!(
                        got,
                        [
                            format!("VALUE key-{client}-{i} 0 {}\r\n", value.len()),
                            format!("{value}\r\n"),
                            "END\r\n".to_string()
                        ]
                    );
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    server.stop();
}

/// A static Go net/http server (goroutines on the runtime's threads, SIGURG preemption,
/// futexes, epoll), built with Debian's Go.
#[test]
fn a_go_http_server_with_goroutines_answers() {
    let program = go_program("httpd");
    let server = Server::run(
        "test-thread-go",
        "127.0.11.5",
        8080,
        &[program.to_str().unwrap(), ":8080"],
    );
    for i in 1..=5 {
        let response = http(server.address, "GET", "/count", b"");
        assert_eq!(response.status, 200);
        let body = String::from_utf8_lossy(&response.body).into_owned();
        assert!(
            body.starts_with(&format!(
                "hits={i} path=/count count={i} sums=[5000 9999 15000 20000]"
            )),
            "{body}"
        );
    }
    server.stop();
}

/// Node.js: an http server whose handler reads a file with fs.readFile (libuv's thread
/// pool) and answers with its size.
#[test]
fn a_node_http_server_reads_files_through_its_thread_pool() {
    let node = std::path::Path::new("/usr/bin/node");
    let size = std::fs::metadata(std::fs::canonicalize(node).unwrap())
        .unwrap()
        .len();
    let script = "
        const http = require('http'), fs = require('fs');
        http.createServer((req, res) => {
            fs.readFile('/usr/bin/node', (err, data) =>
                res.end(err ? 'error ' + err.code : 'size ' + data.length));
        }).listen(8081, '0.0.0.0');
    ";
    let server = Server::run(
        "test-thread-node",
        "127.0.11.6",
        8081,
        &["/usr/bin/node", "-e", script],
    );
    for _ in 0..3 {
        let response = http(server.address, "GET", "/", b"");
        assert_eq!(
            String::from_utf8_lossy(&response.body),
            format!("size {size}")
        );
    }
    server.stop();
}

/// The CPU count is the app's vCPU limit everywhere the app can look.
#[test]
fn the_app_sees_its_vcpu_limit_as_its_cpus_everywhere() {
    build_image("python-http");
    let code = "import os; print(os.cpu_count(), len(os.sched_getaffinity(0)), \
                open('/sys/devices/system/cpu/online').read().strip(), \
                open('/proc/cpuinfo').read().count('processor'))";
    for (vcpus, expected) in [("1", "1 1 0 1\n"), ("3", "3 3 0-2 3\n")] {
        let out = run(&[
            "--vcpus",
            vcpus,
            "--image",
            "python-http",
            "--name",
            "test-thread-cpus",
            "--address",
            "127.0.11.7",
            "/usr/bin/python3",
            "-c",
            code,
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(stdout(&out), expected, "{vcpus}: {}", describe(&out));
    }
}

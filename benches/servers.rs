//! Real servers under load: requests per second and p50/p99 latency in a picoprocess,
//! against the same server run natively, measured side by side with wrk in one run.
//!
//! * nginx serving a 1 KiB file (natively: the same binary and config, chrooted into a copy
//!   of the image's root);
//! * python-http answering `GET /` (natively: the host's python3 running the same app.py).
//!
//! For each, five servers: native; a picoprocess with every forwarded call a VM exit
//! (`--no-mailbox`); the same without time calls answered in the doorbell; one with the
//! shared-memory mailbox (the default); and the default without reads answered in the
//! guest from file windows (`--no-guest-reads`). Rounds alternate between them, and the
//! medians are reported, with the syscalls forwarded per request (`--trace-syscalls`),
//! with and without reads in the guest, also for lighttpd and counter-http. Needs root
//! (chroot, port 80) and wrk.
//!
//! nginx is also measured pinned (issue #15): wrk on CPU 0 and each server, every thread
//! of every process of it, on CPU 1, so that the ratio against native measures the
//! picoprocess and not where the scheduler put it; a picoprocess's vCPU and mailbox
//! threads then share one core.
//!
//! With `PICOCENTER_BEFORE=<another build's picocenter binary>`: nginx (unpinned and
//! pinned) and python-http, native against that build's default picoprocess against this
//! one's, rounds alternating (issue #15's before and after); `cargo bench --bench servers
//! -- before` runs only this.
//!
//! Run with `cargo bench --bench servers`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{build_image, median, state_dir, with_build, wrk_on, Build, Server};
use std::process::{Command, Stdio};

const ROUNDS: usize = 5;
const SECONDS: &str = "3";
const NGINX_PATH: &str = "/files/1k.txt";

/// nginx run natively from a copy of the image's root, listening on `address`.
struct Native {
    child: std::process::Child,
    /// The root's copy, removed when the server is dropped.
    _dir: tempfile::TempDir,
}

impl Native {
    fn start(address: &str) -> Native {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = state_dir().join("images/nginx/rootfs");
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", rootfs.display()))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        for sub in ["dev", "run", "tmp", "var/log/nginx", "var/lib/nginx/body"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let _ = Command::new("mknod")
            .arg(dir.path().join("dev/null"))
            .args(["c", "1", "3"])
            .status();
        let conf = dir.path().join("etc/nginx/nginx.conf");
        let text = std::fs::read_to_string(&conf)
            .unwrap()
            .replace("listen 80 ", &format!("listen {address} "));
        std::fs::write(&conf, text).unwrap();
        let child = Command::new("chroot")
            .arg(dir.path())
            .args(["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = address.parse().unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Native { child, _dir: dir }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Syscalls forwarded per request: a traced picoprocess under the same load (with `extra`
/// flags), its per-syscall counts divided by the requests wrk completed.
fn syscalls_per_request(image: &str, path: &str, ip: &str, extra: &[&str]) -> Vec<(String, f64)> {
    let mut flags = vec!["--trace-syscalls", "--no-mailbox"];
    flags.extend_from_slice(extra);
    let server = Server::start(image, &format!("bench-{image}-trace"), ip, 80, &flags);
    let out = Command::new("wrk")
        .args(["-t1", "-c10", "-d", SECONDS])
        .arg(format!("http://{}{path}", server.address))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1.0);
    let summary = String::from_utf8_lossy(&server.stop().stderr).into_owned();
    summary
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Rows of the `strace -c`-style table: "% time  seconds  usecs/call  calls ...".
            fields.first()?.parse::<f64>().ok()?;
            fields.get(1)?.parse::<f64>().ok()?;
            let calls: f64 = fields.get(3)?.parse().ok()?;
            let name = fields.last()?.to_string();
            (name != "total" && calls >= requests / 100.0).then(|| (name, calls / requests))
        })
        .collect()
}

/// Pins every thread of process `pid` and of its descendants to CPU `cpu`.
fn pin_tree(pid: u32, cpu: &str) {
    let mut pids = vec![pid];
    let mut next = 0;
    while let Some(&parent) = pids.get(next) {
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    for pid in pids {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", cpu, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("taskset (util-linux) must be installed");
        assert!(status.success(), "pinning {pid} to CPU {cpu}");
    }
}

/// Alternates wrk rounds over `targets` and prints the medians; wrk runs on `wrk_cpu` if
/// given.
fn compare(title: &str, path: &str, targets: &[(&str, String)], wrk_cpu: Option<&str>) {
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, address)) in targets.iter().enumerate() {
            let (rps, p50, p99) = wrk_on(wrk_cpu, address, path, SECONDS);
            results[i].0.push(rps);
            results[i].1.push(p50);
            results[i].2.push(p99);
        }
    }
    let native_rps = median(&mut results[0].0.clone());
    println!("{title}, GET {path}, wrk -t1 -c10, {ROUNDS} rounds of {SECONDS} s, medians:");
    println!(
        "{:<40} {:>10} {:>9} {:>9} {:>10} {:>11}",
        "server", "req/s", "p50 us", "p99 us", "vs native", "worst round"
    );
    // Each round's ratio against that round's native figure: the round-to-round swing.
    let native_rounds = results[0].0.clone();
    for (i, (name, _)) in targets.iter().enumerate() {
        let (rps, p50, p99) = &mut results[i];
        let worst = rps
            .iter()
            .zip(&native_rounds)
            .map(|(r, n)| r / n)
            .fold(f64::INFINITY, f64::min);
        let rps = median(rps);
        println!(
            "{:<40} {:>10.0} {:>9.0} {:>9.0} {:>9.0}% {:>10.0}%",
            name,
            rps,
            median(p50),
            median(p99),
            100.0 * rps / native_rps,
            100.0 * worst
        );
    }
}

/// The four picoprocess variants of `image`, on 127.0.3.{base, ..., base+3}.
fn picoprocesses(image: &str, base: u8) -> Vec<Server> {
    vec![
        Server::start(
            image,
            &format!("bench-{image}-exits"),
            &format!("127.0.3.{base}"),
            80,
            &["--no-mailbox"],
        ),
        Server::start(
            image,
            &format!("bench-{image}-notime"),
            &format!("127.0.3.{}", base + 1),
            80,
            &["--no-mailbox", "--no-doorbell-time"],
        ),
        Server::start(
            image,
            &format!("bench-{image}-mailbox"),
            &format!("127.0.3.{}", base + 2),
            80,
            &[],
        ),
        Server::start(
            image,
            &format!("bench-{image}-noreads"),
            &format!("127.0.3.{}", base + 3),
            80,
            &["--no-guest-reads"],
        ),
    ]
}

fn labels(native: String, servers: &[Server]) -> Vec<(&'static str, String)> {
    vec![
        ("native", native),
        ("picoprocess, exits", servers[0].address.to_string()),
        (
            "picoprocess, exits, no doorbell time",
            servers[1].address.to_string(),
        ),
        ("picoprocess, mailbox", servers[2].address.to_string()),
        (
            "picoprocess, mailbox, no reads in guest",
            servers[3].address.to_string(),
        ),
    ]
}

/// Prints the syscalls `image` forwards per request, with reads answered in the guest
/// (the default) and without (`--no-guest-reads`), side by side.
fn print_syscalls(image: &str, path: &str, ip: &str) {
    let with = syscalls_per_request(image, path, ip, &[]);
    let without = syscalls_per_request(image, path, ip, &["--no-guest-reads"]);
    println!("{image} {path}: syscalls forwarded per request, reads in the guest / not:");
    let mut names: Vec<&String> = with.iter().chain(&without).map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    let of = |list: &[(String, f64)], name: &String| {
        list.iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, per)| *per)
    };
    let (mut sum_with, mut sum_without) = (0.0, 0.0);
    for name in names {
        let (a, b) = (of(&with, name), of(&without, name));
        sum_with += a;
        sum_without += b;
        println!("  {name:<14} {a:>6.2} {b:>6.2}");
    }
    println!("  {:<14} {sum_with:>6.2} {sum_without:>6.2}", "total");
    println!();
}

/// python-http run natively by the host's python3 on 127.0.0.1:`port`, once it accepts.
fn native_python(port: u16) -> std::process::Child {
    let app = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("images/python-http/app.py");
    let native = Command::new("/usr/bin/python3")
        .arg("-B")
        .arg(app)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    native
}

/// nginx and python-http: native, `before`'s default picoprocess and this build's.
fn before_and_after(before: &Build) {
    let pair = |image: &str, old_ip: &str, new_ip: &str| {
        let old = with_build(Some(before), || {
            Server::start(image, &format!("bench-{image}-before"), old_ip, 80, &[])
        });
        let new = Server::start(image, &format!("bench-{image}-after"), new_ip, 80, &[]);
        (old, new)
    };
    {
        let native = Native::start("127.0.3.30:80");
        let (old, new) = pair("nginx", "127.0.3.31", "127.0.3.32");
        let targets = [
            ("native", "127.0.3.30:80".to_string()),
            ("PICOCENTER_BEFORE", old.address.to_string()),
            ("this build", new.address.to_string()),
        ];
        compare("nginx, before and after", NGINX_PATH, &targets, None);
        pin_tree(native.child.id(), "1");
        pin_tree(old.pid(), "1");
        pin_tree(new.pid(), "1");
        compare(
            "nginx pinned (servers on CPU 1, wrk on CPU 0), before and after",
            NGINX_PATH,
            &targets,
            Some("0"),
        );
    }
    let mut native = native_python(18091);
    let (old, new) = pair("python-http", "127.0.3.33", "127.0.3.34");
    let targets = [
        ("native", "127.0.0.1:18091".to_string()),
        ("PICOCENTER_BEFORE", old.address.to_string()),
        ("this build", new.address.to_string()),
    ];
    compare("python-http, before and after", "/", &targets, None);
    let _ = native.kill();
    let _ = native.wait();
}

fn main() {
    build_image("nginx");
    build_image("python-http");
    if let Some(before) = Build::before() {
        before_and_after(&before);
    }
    if std::env::args().any(|a| a == "before") {
        return;
    }
    {
        let native = Native::start("127.0.3.1:80");
        let servers = picoprocesses("nginx", 2);
        let targets = labels("127.0.3.1:80".into(), &servers);
        compare("nginx", NGINX_PATH, &targets, None);
        pin_tree(native.child.id(), "1");
        for server in &servers {
            pin_tree(server.pid(), "1");
        }
        compare(
            "nginx pinned (servers on CPU 1, wrk on CPU 0)",
            NGINX_PATH,
            &targets,
            Some("0"),
        );
    }
    print_syscalls("nginx", NGINX_PATH, "127.0.3.6");
    build_image("lighttpd");
    build_image("counter-http");
    print_syscalls("lighttpd", "/files/1k.txt", "127.0.3.7");
    print_syscalls("counter-http", "/", "127.0.3.8");
    {
        let mut native = native_python(18090);
        let servers = picoprocesses("python-http", 12);
        compare(
            "python-http",
            "/",
            &labels("127.0.0.1:18090".into(), &servers),
            None,
        );
        let _ = native.kill();
        let _ = native.wait();
    }
    print_syscalls("python-http", "/", "127.0.3.16");
}

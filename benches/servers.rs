//! Real servers under load: requests per second and p50/p99 latency in a picoprocess,
//! against the same server run natively, measured side by side with wrk in one run.
//!
//! * nginx serving a 1 KiB file (natively: the same binary and config, chrooted into a copy
//!   of the image's root);
//! * python-http answering `GET /` (natively: the host's python3 running the same app.py).
//!
//! For each, four servers: native; a picoprocess with every forwarded call a VM exit
//! (`--no-mailbox`); the same without time calls answered in the doorbell; and one with
//! the shared-memory mailbox (the default). Rounds alternate between them, and the medians are reported, with the syscalls
//! forwarded per request (`--trace-syscalls`). Needs root (chroot, port 80) and wrk.
//!
//! Run with `cargo bench --bench servers`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{build_image, median, state_dir, wrk, Server};
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

/// Syscalls forwarded per request: a traced picoprocess under the same load, its
/// per-syscall counts divided by the requests wrk completed.
fn syscalls_per_request(image: &str, path: &str, ip: &str) -> Vec<(String, f64)> {
    let server = Server::start(
        image,
        &format!("bench-{image}-trace"),
        ip,
        80,
        &["--trace-syscalls", "--no-mailbox"],
    );
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

/// Alternates wrk rounds over `targets` and prints the medians.
fn compare(title: &str, path: &str, targets: &[(&str, String)]) {
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, address)) in targets.iter().enumerate() {
            let (rps, p50, p99) = wrk(address, path, SECONDS);
            results[i].0.push(rps);
            results[i].1.push(p50);
            results[i].2.push(p99);
        }
    }
    let native_rps = median(&mut results[0].0.clone());
    println!("{title}, GET {path}, wrk -t1 -c10, {ROUNDS} rounds of {SECONDS} s, medians:");
    println!(
        "{:<40} {:>10} {:>9} {:>9} {:>10}",
        "server", "req/s", "p50 us", "p99 us", "vs native"
    );
    for (i, (name, _)) in targets.iter().enumerate() {
        let (rps, p50, p99) = &mut results[i];
        let rps = median(rps);
        println!(
            "{:<40} {:>10.0} {:>9.0} {:>9.0} {:>9.0}%",
            name,
            rps,
            median(p50),
            median(p99),
            100.0 * rps / native_rps
        );
    }
}

/// The three picoprocess variants of `image`, on 127.0.3.{base, base+1, base+2}.
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
    ]
}

fn print_syscalls(list: Vec<(String, f64)>) {
    println!("syscalls forwarded per request:");
    for (name, per_request) in list {
        println!("  {name:<14} {per_request:.2}");
    }
    println!();
}

fn main() {
    build_image("nginx");
    build_image("python-http");
    {
        let _native = Native::start("127.0.3.1:80");
        let servers = picoprocesses("nginx", 2);
        compare(
            "nginx",
            NGINX_PATH,
            &labels("127.0.3.1:80".into(), &servers),
        );
    }
    print_syscalls(syscalls_per_request("nginx", NGINX_PATH, "127.0.3.5"));
    {
        let app =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("images/python-http/app.py");
        let mut native = Command::new("/usr/bin/python3")
            .arg("-B")
            .arg(app)
            .arg("18090")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let servers = picoprocesses("python-http", 12);
        for _ in 0..300 {
            if std::net::TcpStream::connect("127.0.0.1:18090").is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        compare(
            "python-http",
            "/",
            &labels("127.0.0.1:18090".into(), &servers),
        );
        let _ = native.kill();
        let _ = native.wait();
    }
    print_syscalls(syscalls_per_request("python-http", "/", "127.0.3.15"));
}

//! Helpers for the tests and benchmarks of the hub and workers: child processes with
//! logs, polling, raw API calls, the hub's address line, and a moto S3 server.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Adds `worker --hub URL,URL... --token TOKEN --id ID` to `cmd`: a worker reporting to
/// the first of `hubs` (their API URLs) that answers; its own flags follow.
pub fn worker_args(cmd: &mut Command, hubs: &[String], token: &str, id: &str) {
    cmd.args([
        "worker",
        "--hub",
        &hubs.join(","),
        "--token",
        token,
        "--id",
        id,
    ]);
}

/// A child process killed when dropped, its output in a file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with its stdout and stderr in `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        Proc {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (at most 30 s).
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 50 ms until it gives a value, at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw HTTP/1.1 request with an optional bearer token: (status, JSON body or null).
pub fn api(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: hub\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Starts a hub on free loopback ports with its data in `dir`, its log in `dir/hub.log`:
/// (the hub, its DNS address, its API address).
pub fn start_hub(dir: &Path, token: &str) -> (Proc, SocketAddr, SocketAddr) {
    start_hub_with(dir, token, &[])
}

/// [`start_hub`] with `extra` flags.
pub fn start_hub_with(dir: &Path, token: &str, extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let mut cmd = super::picocenter();
    cmd.args(["hub", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
    cmd.args(["--token", token])
        .arg("--data-dir")
        .arg(dir.join("hub"));
    cmd.args(extra);
    let hub = Proc::spawn(cmd, dir.join("hub.log"));
    let (dns, api) = wait_for("the hub", Duration::from_secs(60), || {
        hub_addresses(&hub.log)
    });
    (hub, dns, api)
}

/// The DNS and API addresses a hub printed on its first line, once it has.
pub fn hub_addresses(log: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.starts_with("hub: DNS on "))?;
    let dns = line
        .strip_prefix("hub: DNS on ")?
        .split_whitespace()
        .next()?;
    let api = line.split("http://").nth(1)?.split([';', ' ']).next()?;
    Some((dns.parse().ok()?, api.parse().ok()?))
}

/// An S3 server (moto, or s3s-fs) on a free loopback port, stopped when dropped.
pub struct S3Server {
    /// The server.
    pub proc: Proc,
    /// Its URL.
    pub endpoint: String,
}

impl S3Server {
    /// Starts moto's S3 server, logging to `log`, and waits until it accepts.
    pub fn moto(log: PathBuf) -> S3Server {
        Self::moto_on(Ipv4Addr::LOCALHOST, log)
    }

    /// [`S3Server::moto`] listening on `host` (an address of this host's).
    pub fn moto_on(host: Ipv4Addr, log: PathBuf) -> S3Server {
        let port = free_port(host);
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", &host.to_string()]);
        cmd.args(["-p", &port.to_string()]);
        Self::spawn(
            cmd,
            (host, port),
            log,
            "the moto S3 server (pip install 'moto[server]')",
        )
    }

    /// Starts s3s-fs (an S3 server over a directory, in Rust: unlike moto it reads only
    /// the range a GET asks for, and serves requests in parallel, as S3 does) on `root`,
    /// with the access key `test` and secret `test`, logging to `log`. `None` if it is not
    /// installed (`cargo install s3s-fs --version 0.14.1 --features binary`).
    pub fn s3s_fs(root: &Path, log: PathBuf) -> Option<S3Server> {
        let program = s3s_fs_program()?;
        std::fs::create_dir_all(root).unwrap();
        let port = free_port(Ipv4Addr::LOCALHOST);
        let mut cmd = Command::new(program);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
        cmd.args(["--access-key", "test", "--secret-key", "test"])
            .arg(root);
        Some(Self::spawn(
            cmd,
            (Ipv4Addr::LOCALHOST, port),
            log,
            "the s3s-fs S3 server",
        ))
    }

    fn spawn(mut cmd: Command, at: (Ipv4Addr, u16), log: PathBuf, what: &str) -> S3Server {
        cmd.stdin(Stdio::null());
        let proc = Proc::spawn(cmd, log);
        let endpoint = format!("http://{}:{}", at.0, at.1);
        wait_for(what, Duration::from_secs(30), || {
            std::net::TcpStream::connect(at).ok().map(|_| ())
        });
        S3Server { proc, endpoint }
    }
}

/// A port free on `host` just now.
fn free_port(host: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where s3s-fs is: on the PATH, or in cargo's bin directory.
fn s3s_fs_program() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain(home.map(|h| h.join("bin")))
        .map(|dir| dir.join("s3s-fs"))
        .find(|program| program.is_file())
}

/// A DNS query for `name` (type A), id `id`.
pub fn query(name: &str, id: u16) -> Vec<u8> {
    let mut packet = vec![
        (id >> 8) as u8,
        id as u8,
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    for label in name.trim_end_matches('.').split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]);
    packet
}

/// The first A record of a DNS answer.
pub fn first_a(answer: &[u8]) -> Option<Ipv4Addr> {
    if answer.len() < 12 || answer[3] & 0x0f != 0 || u16::from_be_bytes([answer[6], answer[7]]) == 0
    {
        return None;
    }
    let mut at = 12;
    while *answer.get(at)? != 0 {
        at += 1 + *answer.get(at)? as usize;
    }
    at += 5;
    // The answer's name: a compression pointer, or labels.
    if answer.get(at)? & 0xc0 == 0xc0 {
        at += 2;
    } else {
        while *answer.get(at)? != 0 {
            at += 1 + *answer.get(at)? as usize;
        }
        at += 1;
    }
    // Type, class, TTL, length, then the address.
    let rdata = at + 2 + 2 + 4 + 2;
    let b = answer.get(rdata..rdata + 4)?;
    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// Proportional set size of process `pid` (shared pages split among their users).
pub fn pss_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// MemAvailable, bytes, after the kernel's clean caches are dropped where this bench may
/// (as root): what they hold is reclaimable anyway, and their ups and downs (logs, the
/// registry, the bench's own reads of /proc) would otherwise swamp an app's share.
pub fn mem_available() -> u64 {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The spare VMMs waiting in worker `worker`'s warm pool: its children (of any of its
/// threads: the pool's own thread starts them) still running `picocenter spare` as root
/// (a spare that became an app's VMM runs as the app's uid).
pub fn waiting_spares(worker: u32) -> Vec<u32> {
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{worker}/task"))
        .into_iter()
        .flatten()
    {
        let Ok(task) = task else { continue };
        children
            .push_str(&std::fs::read_to_string(task.path().join("children")).unwrap_or_default());
        children.push(' ');
    }
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.ends_with(b"spare\0") && uid_of(*pid) == Some(0)
        })
        .collect()
}

/// A process's real uid.
pub fn uid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// The processes descended from `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parents.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        at += 1;
    }
    found.remove(0);
    found
}

/// Milliseconds from `started` to the first byte of the answer to `GET /` at `address`,
/// connecting now; `None` if it does not answer.
pub fn first_byte_of_root(address: Ipv4Addr, started: Instant) -> Option<f64> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&(address, 80).into(), Duration::from_secs(60))
            .ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).ok()?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).ok()?;
    (first[0] == b'H' && rest.starts_with(b"TTP/1.1 200")).then_some(ms)
}

/// Waits (at most 20 s) until the hub whose API is at `api` lists worker `id`: only then
/// can it run apps there.
pub fn wait_until_registered(api_address: SocketAddr, token: &str, id: &str) {
    wait_for("the worker to register", Duration::from_secs(20), || {
        let (_, workers) = api(api_address, "GET", "/v1/workers", None, Some(token));
        workers
            .as_array()?
            .iter()
            .any(|w| w["id"] == id)
            .then_some(())
    });
}

//! Shared helpers for the end-to-end tests: the picocenter binary, guest programs compiled
//! from tests/guests, and roots assembled from host files.
#![allow(dead_code)]

pub mod cluster;
pub mod wan;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a guest program is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// `-static`.
    Static,
    /// `-static-pie`.
    StaticPie,
    /// Dynamically linked against glibc.
    Dynamic,
}

/// Fails loudly when this machine has no KVM: every Picocenter host has it, so a missing
/// /dev/kvm is a broken machine, not a reason to skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: Picocenter's tests run real picoprocesses and need KVM"
    );
}

/// Another build of picocenter that a before-and-after bench compares this one with: its
/// binary, and a state directory of its own (images built by it, its control sockets).
#[derive(Debug, Clone)]
pub struct Build {
    pub binary: PathBuf,
    pub state: PathBuf,
}

impl Build {
    /// The build named by `PICOCENTER_BEFORE` (the path of its `picocenter` binary), if
    /// any: benches then measure it beside this one.
    pub fn before() -> Option<Build> {
        let binary = PathBuf::from(std::env::var_os("PICOCENTER_BEFORE")?);
        assert!(
            binary.is_file(),
            "PICOCENTER_BEFORE={}: no such binary",
            binary.display()
        );
        Some(Build {
            binary,
            state: Path::new(env!("CARGO_TARGET_TMPDIR")).join("state-before"),
        })
    }
}

/// The build the helpers run for the calling thread's next commands; `None` is this one.
static OTHER_BUILD: std::sync::Mutex<Option<Build>> = std::sync::Mutex::new(None);

/// Runs `f` with every helper (`picocenter`, `state_dir` and all that use them) on `build`
/// (`None`: this build), and goes back to this build after.
pub fn with_build<T>(build: Option<&Build>, f: impl FnOnce() -> T) -> T {
    let previous = std::mem::replace(
        &mut *OTHER_BUILD.lock().unwrap_or_else(|e| e.into_inner()),
        build.cloned(),
    );
    let result = f();
    *OTHER_BUILD.lock().unwrap_or_else(|e| e.into_inner()) = previous;
    result
}

/// The build the helpers run now (see [`with_build`]).
fn other_build() -> Option<Build> {
    OTHER_BUILD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// The picocenter binary under test.
pub fn picocenter() -> Command {
    require_kvm();
    let binary = other_build().map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_picocenter")),
        |build| build.binary,
    );
    let mut cmd = Command::new(binary);
    cmd.stdin(Stdio::null());
    // One state directory for the whole test run: images built once serve every test,
    // and control sockets stay out of the host's /var/lib/picocenter.
    cmd.env("PICOCENTER_STATE_DIR", state_dir());
    cmd
}

/// Whether app `name` has a live control socket (one that accepts a connection). A
/// socket file may outlive its VMM for a moment: the supervisor outside the jail removes it.
pub fn control_socket_live(name: &str) -> bool {
    let socket = state_dir().join("run").join(format!("{name}.sock"));
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// The pid of app `name`'s running VMM, as its control socket tells.
pub fn vmm_pid(name: &str) -> u32 {
    use std::io::Write;
    let socket = state_dir().join("run").join(format!("{name}.sock"));
    let mut control = std::os::unix::net::UnixStream::connect(&socket)
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    writeln!(control, r#"{{"op":"stats"}}"#).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(control), &mut line).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&line).unwrap();
    let pid = stats["pid"].as_u64().expect("the VMM's pid");
    u32::try_from(pid).unwrap()
}

/// The state directory the tests share (see [`picocenter`]), or the other build's.
pub fn state_dir() -> PathBuf {
    other_build().map_or_else(
        || Path::new(env!("CARGO_TARGET_TMPDIR")).join("state"),
        |build| build.state,
    )
}

/// The snapshot key of the tests' state directory (made by whichever comes first: a VMM
/// or this).
pub fn snapshot_key() -> picocenter_snapshots::SnapshotKey {
    let path = picocenter_snapshots::key::default_path(&state_dir());
    picocenter_snapshots::SnapshotKey::load_or_create(&path).unwrap()
}

/// `--root-from PROGRAM` if the newest snapshot in `dir` was taken of an app run from a
/// host program (`picocenter run PROGRAM`): the restoring caller names the program, as a
/// restore never takes it from the snapshot alone.
pub fn root_from(dir: &Path) -> Vec<String> {
    use picocenter_snapshots::Store;
    let store = picocenter_snapshots::LocalStore::open(dir).unwrap();
    let Some(head) = store.head().unwrap() else {
        return Vec::new();
    };
    match store.manifest(&head, &snapshot_key()) {
        Ok(manifest) => match manifest.app.root_from {
            Some(program) => vec!["--root-from".into(), program],
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    }
}

/// Checks that snapshot directory `dir` is 0700 and every file in it 0600.
pub fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

static COMPILE: Mutex<()> = Mutex::new(());

/// Compiles tests/guests/NAME.c with gcc (once per link kind) and returns the binary.
pub fn guest(name: &str, link: Link) -> PathBuf {
    let _guard = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    std::fs::create_dir_all(&dir).unwrap();
    let suffix = match link {
        Link::Static => "static",
        Link::StaticPie => "static-pie",
        Link::Dynamic => "dynamic",
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/guests/{name}.c"));
    let out = dir.join(format!("{name}-{suffix}"));
    let fresh = |path: &Path| {
        let built = std::fs::metadata(path).and_then(|m| m.modified());
        let source_time = std::fs::metadata(&source).and_then(|m| m.modified());
        matches!((built, source_time), (Ok(b), Ok(s)) if b >= s)
    };
    if !fresh(&out) {
        let tmp = dir.join(format!("{name}-{suffix}.{}.tmp", std::process::id()));
        let mut cmd = Command::new("gcc");
        cmd.args(["-O2", "-g", "-w", "-o"]).arg(&tmp).arg(&source);
        match link {
            Link::Static => cmd.arg("-static"),
            Link::StaticPie => cmd.arg("-static-pie"),
            Link::Dynamic => &mut cmd,
        };
        let status = cmd.status().expect("gcc must be installed");
        assert!(status.success(), "compiling {}", source.display());
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// Runs `cmd` with a hard time limit, so that a hung picoprocess fails the test instead of
/// hanging it.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning picocenter");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("waiting for picocenter").is_some() {
            return child.wait_with_output().unwrap();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "picocenter ran longer than {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `picocenter run ARGS...` with a 60 s limit.
pub fn run(args: &[&str]) -> Output {
    let mut cmd = picocenter();
    cmd.arg("run").args(args);
    run_with_limit(&mut cmd, Duration::from_secs(60))
}

/// Everything about a finished run, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Calls of `name` in a `--trace-syscalls` summary (its `strace -c`-style table).
pub fn traced_calls(stderr: &[u8], name: &str) -> u64 {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.last() == Some(&name)).then(|| fields.get(3)?.parse::<u64>().ok())?
        })
        .sum()
}

/// The app's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary root holding the given host files (and the symlinks on their paths).
pub fn root_with(files: &[&Path]) -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("picocenter-test-root-")
        .tempdir()
        .unwrap();
    for file in files {
        picocenter_images::rootfs::add_path(root.path(), file).unwrap();
    }
    root
}

/// Copies a guest binary into `root` at `/bin/NAME` and returns its guest path.
pub fn install(root: &Path, binary: &Path, name: &str) -> String {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(binary, root.join("bin").join(name)).unwrap();
    format!("/bin/{name}")
}

/// The median of `values` (sorted in place); benchmarks report it.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Builds the shipped image `name` into the shared test state directory (fast when it is
/// up to date; concurrent builds of one image wait for each other).
pub fn build_image(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("images")
        .join(name);
    let mut cmd = picocenter();
    cmd.arg("image").arg("build").arg(&dir);
    let out = run_with_limit(&mut cmd, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "building image {name}: {}",
        describe(&out)
    );
}

/// A server app running in a picoprocess, stopped (SIGKILL) when dropped. Its output goes
/// to files (a pipe nobody reads would fill up and stall a chatty server).
pub struct Server {
    child: std::process::Child,
    output: tempfile::TempDir,
    /// Its address.
    pub address: std::net::SocketAddr,
    /// Its name.
    pub name: String,
}

impl Server {
    /// The pid of its `picocenter run` process (the VMM's parent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts image `image` as app `name` at `ip:port` and waits until it accepts
    /// connections (at most 30 s).
    pub fn start(image: &str, name: &str, ip: &str, port: u16, extra: &[&str]) -> Server {
        build_image(image);
        let mut args = vec!["--image", image];
        args.extend_from_slice(extra);
        Self::run(name, ip, port, &args)
    }

    /// Starts `picocenter run --name NAME --address IP ARGS...` and waits until `ip:port`
    /// accepts connections (at most 30 s).
    pub fn run(name: &str, ip: &str, port: u16, args: &[&str]) -> Server {
        let image = args.first().copied().unwrap_or("the app");
        let mut cmd = picocenter();
        cmd.args(["run", "--name", name, "--address", ip]);
        cmd.args(args);
        let output = tempfile::tempdir().unwrap();
        let file = |name: &str| std::fs::File::create(output.path().join(name)).unwrap();
        cmd.stdout(file("stdout")).stderr(file("stderr"));
        let child = cmd.spawn().expect("starting picocenter");
        let address: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let mut server = Server {
            child,
            output,
            address,
            name: name.to_string(),
        };
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let err = std::fs::read_to_string(server.output.path().join("stderr"));
                panic!("{image} exited with {status} before listening:\n{err:?}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{image} never listened on {address}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the app with `picocenter stop` and returns its exit status and output.
    pub fn stop(mut self) -> Output {
        let mut cmd = picocenter();
        cmd.args(["stop", &self.name, "--grace", "10"]);
        let stopped = run_with_limit(&mut cmd, Duration::from_secs(30));
        assert!(stopped.status.success(), "stop: {}", describe(&stopped));
        let status = self.child.wait().unwrap();
        let read = |name: &str| std::fs::read(self.output.path().join(name)).unwrap_or_default();
        Output {
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }
}

impl Server {
    /// Waits (at most 30 s) for the app to end by itself, as it does after `snapshot
    /// create --stop`, and returns its exit status and output.
    pub fn stop_waiting(mut self) -> Output {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} did not end",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let read = |name: &str| std::fs::read(self.output.path().join(name)).unwrap_or_default();
        Output {
            status,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the nginx image as app `name` at `ip:80` with its default process model: a
/// master and two workers (the image itself runs one process). The returned directory is
/// the app's data directory, which holds that configuration (/tmp/master.conf).
pub fn nginx_with_workers(name: &str, ip: &str) -> (Server, tempfile::TempDir) {
    build_image("nginx");
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("tmp")).unwrap();
    let config =
        std::fs::read_to_string(state_dir().join("images/nginx/rootfs/etc/nginx/nginx.conf"))
            .unwrap()
            .replace("master_process off;", "master_process on;")
            .replace("worker_processes 1;", "worker_processes 2;");
    std::fs::write(data.path().join("tmp/master.conf"), config).unwrap();
    let server = Server::start(
        "nginx",
        name,
        ip,
        80,
        &[
            "--data-dir",
            data.path().to_str().unwrap(),
            "/usr/sbin/nginx",
            "-c",
            "/tmp/master.conf",
        ],
    );
    (server, data)
}

/// Asks `clients` concurrent clients to GET `path` from `address`, and checks that every
/// one is answered 200 with `expected`.
pub fn all_answered(
    address: std::net::SocketAddr,
    path: &'static str,
    clients: usize,
    expected: &[u8],
) {
    let clients: Vec<_> = (0..clients)
        .map(|_| std::thread::spawn(move || http(address, "GET", path, b"")))
        .collect();
    for client in clients {
        let response = client.join().expect("client thread");
        assert_eq!(response.status, 200);
        assert!(
            response.body == expected,
            "{path}: {} bytes, expected {}",
            response.body.len(),
            expected.len()
        );
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// One HTTP/1.1 request with `Connection: close`, read to the end (10 s limit).
pub fn http(address: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("reading from {address}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// One redis command over RESP, with its reply in redis-cli's plain form: a status or
/// error line, an integer, a bulk string (`(nil)` for none), or the elements of an array
/// one per line.
pub fn redis(address: std::net::SocketAddr, args: &[&str]) -> String {
    redis_pipeline(address, &[args.to_vec()]).remove(0)
}

/// Several redis commands sent at once; their replies in order.
pub fn redis_pipeline(address: std::net::SocketAddr, commands: &[Vec<&str>]) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to redis at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = Vec::new();
    for args in commands {
        request.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            request.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
    }
    (&stream).write_all(&request).unwrap();
    let mut reader = BufReader::new(&stream);
    fn reply(reader: &mut impl BufRead) -> String {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end().to_string();
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            "+" | "-" | ":" => rest.to_string(),
            "$" => {
                let Ok(len) = rest.parse::<usize>() else {
                    return "(nil)".into();
                };
                let mut body = vec![0u8; len + 2];
                reader.read_exact(&mut body).unwrap();
                String::from_utf8_lossy(&body[..len]).into_owned()
            }
            "*" => {
                let count: i64 = rest.parse().unwrap_or(0);
                (0..count.max(0))
                    .map(|_| reply(reader))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            _ => panic!("not a RESP reply: {line:?}"),
        }
    }
    commands.iter().map(|_| reply(&mut reader)).collect()
}

/// Builds the Go program in tests/go/NAME with Debian's Go toolchain (static, no cgo) into
/// the test target directory, once per source change.
pub fn go_program(name: &str) -> PathBuf {
    let _guard = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/go")
        .join(name);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("go-{name}"));
    let source_time = std::fs::metadata(source.join("main.go")).and_then(|m| m.modified());
    let built = std::fs::metadata(&out).and_then(|m| m.modified());
    if !matches!((built, source_time), (Ok(b), Ok(s)) if b >= s) {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-cache");
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&source)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", &cache)
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local")
            .status()
            .expect("Debian's golang-go must be installed (scripts/setup.sh installs it)");
        assert!(status.success(), "building tests/go/{name}");
    }
    out
}

/// Runs `cmd`, which must succeed and print one number (a benchmark program's figure).
pub fn printed_number(cmd: &mut Command) -> f64 {
    let out = cmd.output().expect("running the benchmark program");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a number")
}

/// wrk's requests per second, p50 and p99 latency (µs), with one thread and ten
/// connections for `seconds`.
pub fn wrk(address: &str, path: &str, seconds: &str) -> (f64, f64, f64) {
    wrk_on(None, address, path, seconds)
}

/// `cmd` (its program, arguments and environment) run on CPU `cpu` only, with every thread
/// and child it starts (`taskset -c`).
pub fn on_cpu(cpu: &str, cmd: &Command) -> Command {
    let mut pinned = Command::new("taskset");
    pinned
        .args(["-c", cpu])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => pinned.env(key, value),
            None => pinned.env_remove(key),
        };
    }
    pinned
}

/// [`wrk`], run on CPU `cpu` only if one is given.
pub fn wrk_on(cpu: Option<&str>, address: &str, path: &str, seconds: &str) -> (f64, f64, f64) {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c10", "-d", seconds, "--latency"])
        .arg(format!("http://{address}{path}"));
    if let Some(cpu) = cpu {
        cmd = on_cpu(cpu, &cmd);
    }
    let out = cmd
        .output()
        .expect("wrk must be installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |prefix: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in wrk output:\n{text}"));
        let field = line.split_whitespace().nth(1).unwrap_or("0");
        let (number, unit) = field.split_at(
            field
                .find(|c: char| c.is_alphabetic())
                .unwrap_or(field.len()),
        );
        let n: f64 = number.parse().unwrap_or(0.0);
        match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            _ => n,
        }
    };
    (value("Requests/sec:"), value("50%"), value("99%"))
}

/// `picocenter snapshot ARGS...`, which must succeed (2 minutes at most): what it printed.
pub fn snapshot_stdout(args: &[&str]) -> String {
    let mut cmd = picocenter();
    cmd.arg("snapshot").args(args);
    let out = run_with_limit(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "snapshot {args:?}: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A root holding Debian's static busybox, its applets as symlinks, a three-line
/// /etc/passwd and two more files in /etc.
pub fn busybox_shell_root() -> tempfile::TempDir {
    let root = root_with(&[Path::new("/usr/bin/busybox")]);
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/bin/busybox", bin.join("busybox")).unwrap();
    for applet in ["sh", "ls", "sort", "head", "wc", "sleep", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.join("a"), "").unwrap();
    std::fs::write(etc.join("b"), "").unwrap();
    root
}

/// Sends one mail over SMTP to `address` (greeting, EHLO, MAIL, RCPT, DATA, QUIT), each
/// reply checked; returns the reply to the data, which names the queue id.
pub fn send_mail(address: std::net::SocketAddr, from: &str, to: &str, message: &str) -> String {
    use std::io::{BufRead, Write};
    let stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = std::io::BufReader::new(stream);
    // A reply: lines "CODE-text" then a last "CODE text".
    let mut reply = |expect: &str| -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert!(
                line.starts_with(expect),
                "SMTP: wanted {expect}, got {line:?} (after {all:?})"
            );
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    reply("220");
    let mut say = |line: &str| writer.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    say("EHLO client.test");
    reply("250");
    say(&format!("MAIL FROM:<{from}>"));
    reply("250");
    say(&format!("RCPT TO:<{to}>"));
    reply("250");
    say("DATA");
    reply("354");
    // Dot-stuffed, CRLF lines, and the lone dot.
    for line in message.lines() {
        let stuffed = if line.starts_with('.') {
            format!(".{line}")
        } else {
            line.to_string()
        };
        say(&stuffed);
    }
    say(".");
    let queued = reply("250");
    say("QUIT");
    reply("221");
    queued
}

/// The mails in maildir folder `dir`/new, oldest first, once there are `count` of them
/// (at most 30 s).
pub fn maildir_messages(dir: &Path, count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir.join("new"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if found.len() >= count {
            found.sort();
            return found
                .iter()
                .map(|(_, path)| std::fs::read_to_string(path).unwrap())
                .collect();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} mail(s) in {}, not {count}",
            found.len(),
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

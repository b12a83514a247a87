//! One app's VMM, as a child process of the worker: starting it (fresh or from a snapshot),
//! talking to its control socket, and reading what it uses from /proc.

use super::child::ChildProcess;
use super::pool::WarmPool;
use super::{held, supervision};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Why a VMM could not be started or asked something.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The process could not be spawned.
    #[error("starting {what}: {source}")]
    Spawn {
        /// The command.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The app ended before it was ready.
    #[error("the app ended before it was ready ({status}): {stderr}")]
    Ended {
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        stderr: String,
    },
    /// The app did not get ready in time.
    #[error("the app was not ready after {0:?}")]
    Timeout(Duration),
    /// An app name that cannot name its files.
    #[error(transparent)]
    Name(#[from] picocenter_snapshots::names::NameError),
    /// The control socket failed or answered with an error.
    #[error("control socket {path}: {message}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// How to start an app's VMM.
#[derive(Debug, Clone)]
pub enum Launch {
    /// A fresh start of an image.
    Fresh {
        /// The image.
        image: String,
        /// Guest memory, MiB.
        memory_mib: Option<u64>,
        /// Extra environment.
        env: Vec<String>,
        /// The app's snapshot store (its VMM writes nowhere else).
        store: PathBuf,
    },
    /// A restore of snapshot `id` in a local store directory, configured as the registry
    /// says (the snapshot must agree, or the VMM refuses it).
    Restore {
        /// The store.
        dir: PathBuf,
        /// The snapshot the registry names (not whatever HEAD says).
        id: String,
        /// The image.
        image: String,
        /// Guest memory, MiB (the image's if absent).
        memory_mib: Option<u64>,
        /// Sockets the worker held while the app was swapped out (fds of the worker),
        /// which the VMM takes back with what queued on them.
        sockets: Vec<i32>,
        /// The port a connection waits on among them, whose requests' pages come first.
        first_port: Option<u16>,
        /// The VMM's end of a page feed (an fd of the worker) and the snapshots whose page
        /// files come over it, newest first: the VMM restores in stream mode, before they
        /// are here.
        feed: Option<(i32, Vec<String>)>,
    },
}

/// Where a VMM launch finds its state, key and logs.
#[derive(Debug, Clone)]
pub struct Paths<'a> {
    /// The `picocenter` binary.
    pub picocenter: &'a Path,
    /// The state directory (images, control sockets).
    pub state_dir: &'a Path,
    /// The cluster's snapshot key.
    pub key_file: &'a Path,
    /// Where each app's output goes, as `<name>.log`.
    pub log_dir: &'a Path,
    /// The VMMs' temporary directory (`TMPDIR`): see [`base_command`].
    pub temp_dir: &'a Path,
}

/// A running VMM child.
#[derive(Debug)]
pub struct Vmm {
    /// The process.
    pub child: ChildProcess,
    /// The VMM's own pid, as its control socket tells (the process the worker started,
    /// or its child, checked with the kernel).
    pub vmm_pid: u32,
    /// Its control socket.
    pub control: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Whether it was a spare from the warm pool.
    pub from_pool: bool,
}

/// Environment variables of the worker that no VMM inherits.
pub const SECRETS: [&str; 5] = [
    "PICOCENTER_TOKEN",
    "PICOCENTER_HUB_CA",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// A VMM process's program and environment, before its arguments: the worker's
/// environment without its secrets, the state directory, and `temp_dir` as `TMPDIR`.
///
/// A VMM makes an app's temporary data directory and its /dev/shm there. They are the
/// worker's to remove when the VMM ends (see [`super::supervision`]); in the worker's own
/// directory, which it empties when it starts, they do not outlive a worker that was
/// killed with its VMMs.
pub(super) fn base_command(picocenter: &Path, state_dir: &Path, temp_dir: &Path) -> Command {
    let mut cmd = Command::new(picocenter);
    // The worker's secrets are not the VMM's: a VMM an app took over finds none of them
    // in its environment.
    for secret in SECRETS {
        cmd.env_remove(secret);
    }
    cmd.env("PICOCENTER_STATE_DIR", state_dir);
    cmd.env("TMPDIR", temp_dir);
    cmd
}

/// Makes a VMM process die with the worker, with the open-file limit VMMs get.
pub(super) fn die_with_worker(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and setrlimit are async-signal-safe and touch no
    // memory of the parent; the VMM dies with the worker instead of outliving it
    // unmanaged, and has the hard open-file limit the worker was given (as soft and
    // hard), not the one it raised for thousands of apps. The parent-death signal follows
    // the thread that forks: the caller's thread must live as long as the worker (a
    // runtime worker thread, or the warm pool's refill thread).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            super::limits::restore_open_files_for_vmm()
        });
    }
}

/// The command line of a VMM for app `name` at `address`: every setting explicit, from the
/// registry, never left to a snapshot.
fn command(
    paths: &Paths<'_>,
    name: &str,
    address: Ipv4Addr,
    launch: &Launch,
) -> Result<(Command, Vec<i32>), VmmError> {
    let mut cmd = base_command(paths.picocenter, paths.state_dir, paths.temp_dir);
    let mut handed = Vec::new();
    let memory = match launch {
        Launch::Fresh {
            image,
            memory_mib,
            env,
            store,
        } => {
            cmd.args(["run", "--image", image]);
            cmd.arg("--store").arg(store);
            if !env.is_empty() {
                // Through a private file, not the command line, which every user can read.
                cmd.arg("--env-file").arg(env_file(paths, name, env)?);
            }
            memory_mib
        }
        Launch::Restore {
            dir,
            id,
            image,
            memory_mib,
            sockets,
            first_port,
            feed,
        } => {
            cmd.args(["snapshot", "restore"]).arg(dir);
            let mode = if feed.is_some() {
                "stream"
            } else {
                "activeset"
            };
            cmd.args(["--id", id, "--image", image, "--mode", mode]);
            if let Some(port) = first_port {
                cmd.arg("--first-port").arg(port.to_string());
            }
            handed.extend_from_slice(sockets);
            if !sockets.is_empty() {
                cmd.arg("--listen-fds").arg(sockets.len().to_string());
            }
            if let Some((fd, ids)) = feed {
                // Handed down right after the listen fds.
                cmd.arg("--feed-fd").arg((3 + handed.len()).to_string());
                handed.push(*fd);
                for id in ids {
                    cmd.arg("--fed").arg(id);
                }
            }
            memory_mib
        }
    };
    cmd.args(["--name", name]);
    cmd.arg("--address").arg(address.to_string());
    cmd.arg("--key-file").arg(paths.key_file);
    if let Some(m) = memory {
        cmd.arg("--memory").arg(m.to_string());
    }
    Ok((cmd, handed))
}

/// Writes app `name`'s environment (its secrets, often) to a file only the worker's user
/// can read, next to its log, and returns its path.
fn env_file(paths: &Paths<'_>, name: &str, env: &[String]) -> Result<PathBuf, VmmError> {
    let dir = paths.log_dir.join("env");
    let path = dir.join(format!("{name}.env"));
    let write = |source| VmmError::Spawn {
        what: format!("environment file {}", path.display()),
        source,
    };
    picocenter_snapshots::private::create_dir_all(&dir).map_err(write)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(write)?;
    let mut text = String::new();
    for var in env {
        // One variable a line: a newline inside one would make another.
        text.push_str(&var.replace('\n', " "));
        text.push('\n');
    }
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(write)?;
    Ok(path)
}

/// The most fds handed down: every held socket, a page feed, and the supervision channel.
const HANDED_MAX: usize = held::MAX_SOCKETS + 2;

/// Makes `sockets` the child's fds 3, 4, ... (without close-on-exec), as
/// `snapshot restore --listen-fds` (and `--feed-fd` after them) expects them; the
/// supervision channel comes last.
pub(super) fn hand_down(cmd: &mut Command, sockets: Vec<i32>) {
    // Far above anything the child has open, so that the copies never land on a target.
    const PARKING: i32 = 4096;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // fcntl(2) and dup2(2), which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let mut parked = [0i32; HANDED_MAX];
            for (i, &fd) in sockets.iter().enumerate().take(HANDED_MAX) {
                parked[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, PARKING);
                if parked[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in parked
                .iter()
                .enumerate()
                .take(sockets.len().min(HANDED_MAX))
            {
                // dup2 leaves the new fd without close-on-exec.
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Starts app `name` at `address` (in a spare VMM of `pool` if one waits) and waits (at
/// most `limit`) until its listening sockets are bound: the VMM opens its control socket
/// only after restoring them, and a fresh app is ready once it listens on its address.
pub async fn launch(
    paths: &Paths<'_>,
    name: &str,
    address: Ipv4Addr,
    launch: &Launch,
    limit: Duration,
    pool: Option<&WarmPool>,
) -> Result<Vmm, VmmError> {
    // The name becomes the log's and the control socket's file names.
    picocenter_snapshots::names::validate_app_name(name)?;
    let (mut cmd, mut handed) = command(paths, name, address, launch)?;
    // The worker supervises the VMM (privileged binds, what it leaves): its end of the
    // channel is handed down last.
    let spawn_error = |what: &str| {
        let what = what.to_string();
        move |source| VmmError::Spawn { what, source }
    };
    let (vmm_end, worker_end) = picocenter_vmm::sandbox::binder::channel()
        .map_err(|e| spawn_error("a socketpair")(e.into()))?;
    cmd.env(
        picocenter_vmm::sandbox::supervise::SUPERVISOR_FD_VAR,
        (3 + handed.len()).to_string(),
    );
    handed.push(std::os::fd::AsRawFd::as_raw_fd(&vmm_end));
    let log_dir = paths.log_dir;
    let _ = picocenter_snapshots::private::create_dir_all(log_dir);
    let log = log_dir.join(format!("{name}.log"));
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .map_err(|source| VmmError::Spawn {
            what: format!("log {}", log.display()),
            source,
        })?;
    let (child, from_pool) = start_process(cmd, handed, stderr, pool, name, paths.picocenter)?;
    drop(vmm_end);
    let run_dir = paths.state_dir.join("run");
    supervision::start(
        worker_end,
        child.clone(),
        std::net::IpAddr::V4(address),
        supervision::roots(paths.state_dir),
        run_dir.clone(),
    )
    .map_err(spawn_error("the VMM's supervision"))?;
    let control = run_dir.join(format!("{name}.sock"));
    let fresh = matches!(launch, Launch::Fresh { .. });
    let vmm_pid = wait_until_ready(&child, &control, &log, address, fresh, limit).await?;
    Ok(Vmm {
        child,
        vmm_pid,
        control,
        log,
        from_pool,
    })
}

/// Starts the VMM process `cmd` with `handed` as its fds 3, 4, ... and `log` as its
/// stdout and stderr: a spare of `pool` if one waits (true), else a new process.
fn start_process(
    mut cmd: Command,
    handed: Vec<i32>,
    log: std::fs::File,
    pool: Option<&WarmPool>,
    name: &str,
    picocenter: &Path,
) -> Result<(ChildProcess, bool), VmmError> {
    let assignment = pool.map(|_| super::pool::assignment(&cmd)).transpose();
    let assignment = assignment.unwrap_or_else(|err| {
        tracing::warn!(app = name, "warm pool: {err}; starting a VMM instead");
        None
    });
    let warm = assignment.as_ref().and_then(|assignment| {
        let spare = pool.and_then(WarmPool::take)?;
        let pid = spare.id();
        // SAFETY: every fd in `handed` is open for the duration of this call: the held
        // sockets and the feed belong to the caller, the channel's end to `launch`.
        let fds: Vec<_> = handed
            .iter()
            .map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            .collect();
        match spare.assign(assignment, &fds, std::os::fd::AsFd::as_fd(&log)) {
            Ok(child) => {
                tracing::debug!(app = name, pid, "a spare VMM from the warm pool runs it");
                Some(child)
            }
            Err(err) => {
                tracing::warn!(app = name, pid, "warm pool: {err}; starting a VMM instead");
                None
            }
        }
    });
    if let Some(child) = warm {
        return Ok((child, true));
    }
    hand_down(&mut cmd, handed);
    let stdout = log.try_clone().map_err(|source| VmmError::Spawn {
        what: "log".into(),
        source,
    })?;
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(log);
    die_with_worker(&mut cmd);
    // Killed if it is dropped unreaped (a failed launch, an app record that goes).
    let child = ChildProcess::spawn(&mut cmd).map_err(|source| VmmError::Spawn {
        what: format!("{} for {name}", picocenter.display()),
        source,
    })?;
    Ok((child, false))
}

/// Waits (at most `limit`) until the VMM `child` is ready, and returns the VMM's pid: its
/// control socket answers (a restore binds its sockets before), and for a `fresh` app a
/// socket serves `address`: its VMM says so, or, every 50 ms after the first 50 (a
/// listener of a forked process of the app, which its VMM does not count), a scan of the
/// host's sockets finds one.
async fn wait_until_ready(
    child: &ChildProcess,
    control: &Path,
    log: &Path,
    address: Ipv4Addr,
    fresh: bool,
    limit: Duration,
) -> Result<u32, VmmError> {
    const SCAN_EVERY: Duration = Duration::from_millis(50);
    let pid = child.id();
    let started = Instant::now();
    let mut next_scan = SCAN_EVERY;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmmError::Ended {
                status: status.to_string(),
                stderr: tail(log, 2000),
            });
        }
        let answered = stats(control)
            .await
            .ok()
            .filter(|s| s.pid == pid || (s.ppid == pid && parent_of(s.pid) == Some(pid)));
        let ready = answered.filter(|s| {
            !fresh
                || s.serving > 0
                || (started.elapsed() >= next_scan && {
                    next_scan = started.elapsed() + SCAN_EVERY;
                    listening_on(address)
                })
        });
        if let Some(stats) = ready {
            return Ok(stats.pid);
        }
        if started.elapsed() > limit {
            let _ = child.kill().await;
            return Err(VmmError::Timeout(limit));
        }
        let pause = if started.elapsed() < Duration::from_millis(20) {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(5)
        };
        tokio::time::sleep(pause).await;
    }
}

/// The last `bytes` of a file, for error messages.
pub fn tail(path: &Path, bytes: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

/// Whether some socket serves `address` (any port): a TCP socket listening there
/// (/proc/net/tcp) or a UDP socket bound there (/proc/net/udp). A scan of every socket
/// on the host (~5 ms with a few hundred in TIME_WAIT): only the fallback of a fresh
/// start's readiness, for an app whose listener a forked process of it opened (its VMM
/// counts only its own in `serving`).
pub fn listening_on(address: Ipv4Addr) -> bool {
    // Local address as the kernel prints it: the 32-bit value in host order, in hex.
    let want = format!("{:08X}", u32::from_ne_bytes(address.octets()));
    let serves = |table: &str, state_wanted: Option<&str>| {
        let Ok(table) = std::fs::read_to_string(table) else {
            return false;
        };
        table.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            local.split(':').next() == Some(want.as_str())
                && state_wanted.is_none_or(|wanted| state == wanted)
        })
    };
    serves("/proc/net/tcp", Some("0A")) || serves("/proc/net/udp", None)
}

/// The answer to a stats request.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Stats {
    /// The VMM's pid.
    pub pid: u32,
    /// Its parent's (the supervisor of a jailed VMM).
    #[serde(default)]
    pub ppid: u32,
    /// Syscalls handled.
    pub syscalls: u64,
    /// Connections accepted.
    #[serde(default)]
    pub connections: u64,
    /// Sockets serving the app's address (see `picocenter_vmm::control::StatsReply`).
    #[serde(default)]
    pub serving: usize,
    /// CPU time of the VMM process, nanoseconds.
    #[serde(default)]
    pub cpu_ns: u64,
    /// CPU time of the threads working for the app, nanoseconds.
    #[serde(default)]
    pub app_cpu_ns: u64,
    /// Resident memory of the VMM, bytes.
    #[serde(default)]
    pub rss_bytes: u64,
}

/// One request on a control socket; the JSON answer.
pub async fn request(
    control: &Path,
    request: &serde_json::Value,
    limit: Duration,
) -> Result<serde_json::Value, VmmError> {
    let error = |message: String| VmmError::Control {
        path: control.to_path_buf(),
        message,
    };
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(control)
            .await
            .map_err(|e| error(e.to_string()))?;
        let mut line = request.to_string();
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| error(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(|e| error(e.to_string()))?;
        serde_json::from_str::<serde_json::Value>(&answer)
            .map_err(|e| error(format!("bad answer {answer:?}: {e}")))
    };
    let answer = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| error(format!("no answer in {limit:?}")))??;
    if answer.get("ok") == Some(&serde_json::Value::Bool(false)) {
        return Err(error(
            answer["error"].as_str().unwrap_or("failed").to_string(),
        ));
    }
    Ok(answer)
}

/// The parent of process `pid`, as the kernel knows it (what a VMM says of itself is not
/// believed: it runs beside the tenant's code and may be subverted).
fn parent_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces and ends with ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A view of the counters of `vmm` that reads them without waking it (see
/// `picocenter_vmm::stats_page`).
pub fn stats_view(vmm: &Vmm) -> std::io::Result<picocenter_vmm::stats_page::StatsView> {
    picocenter_vmm::stats_page::StatsView::open(&vmm.control.with_extension("stats"), vmm.vmm_pid)
}

/// The counters of a VMM, from its stats page through `view` if it has one, else from
/// its control socket (which wakes it).
pub async fn counters(
    control: &Path,
    view: Option<&mut picocenter_vmm::stats_page::StatsView>,
) -> Result<Stats, VmmError> {
    match view.and_then(|view| view.read()) {
        Some(page) => Ok(page.into()),
        None => stats(control).await,
    }
}

impl From<picocenter_vmm::stats_page::PageStats> for Stats {
    fn from(page: picocenter_vmm::stats_page::PageStats) -> Self {
        Stats {
            pid: page.pid,
            ppid: 0,
            syscalls: page.syscalls,
            connections: page.connections,
            // The page does not say; only a fresh start asks, through the socket.
            serving: 0,
            cpu_ns: page.cpu_ns,
            app_cpu_ns: page.app_cpu_ns,
            rss_bytes: page.rss_bytes,
        }
    }
}

/// The VMM's counters, asked through its control socket.
pub async fn stats(control: &Path) -> Result<Stats, VmmError> {
    let answer = request(
        control,
        &serde_json::json!({"op": "stats"}),
        Duration::from_secs(2),
    )
    .await?;
    serde_json::from_value(answer).map_err(|e| VmmError::Control {
        path: control.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_environment_never_reaches_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            picocenter: Path::new("/bin/true"),
            state_dir: dir.path(),
            key_file: &dir.path().join("key"),
            log_dir: &dir.path().join("logs"),
            temp_dir: &dir.path().join("tmp"),
        };
        let launch = Launch::Fresh {
            image: "img".into(),
            memory_mib: None,
            env: vec!["SECRET=hunter2".into()],
            store: dir.path().join("store"),
        };
        let (cmd, _) = command(&paths, "app", Ipv4Addr::new(127, 1, 0, 1), &launch).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a.contains("hunter2")), "{args:?}");
        let file = args
            .iter()
            .position(|a| a == "--env-file")
            .map(|i| PathBuf::from(&args[i + 1]))
            .expect("--env-file");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "SECRET=hunter2\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn finds_a_listening_socket() {
        let address = Ipv4Addr::new(127, 0, 9, 77);
        assert!(!listening_on(address));
        let listener = std::net::TcpListener::bind((address, 0)).unwrap();
        assert!(listening_on(address));
        drop(listener);
        assert!(!listening_on(address));
        let udp = std::net::UdpSocket::bind((address, 0)).unwrap();
        assert!(listening_on(address));
        drop(udp);
    }
}

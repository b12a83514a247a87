//! The control socket of one picoprocess: a Unix stream socket that takes one JSON request
//! per line and answers one JSON line.
//!
//! | request | effect |
//! |---|---|
//! | `{"op":"stats"}` | name, pid, state, memory and exit counters |
//! | `{"op":"stop","grace_ms":N}` | SIGTERM to every process of the app; after N ms, SIGKILL |
//! | `{"op":"snapshot","stop":B,"full":B}` | a snapshot into the app's own store (then the app ends if B) |
//! | `{"op":"digest"}` | a digest of the app's memory, to check a restore |
//! | `{"op":"sockets"}` | its listening and bound IP sockets, passed with SCM_RIGHTS |
//!
//! The socket is 0600 in a 0700 directory, and a client must run as the VMM's own user or
//! as root (checked with SO_PEERCRED). The socket lives as long as the picoprocess: a client that asked for `stop` knows the
//! app is gone when the connection closes.

use crate::kvm::kick::{reason, Kicker};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Report counters.
    Stats,
    /// Stop the app: SIGTERM, then SIGKILL after `grace_ms`.
    Stop {
        /// Milliseconds between SIGTERM and SIGKILL.
        grace_ms: u64,
    },
    /// Snapshot the app into its store (see [`Control::store`]).
    Snapshot {
        /// The store directory, if the client names one: it must be the app's own.
        #[serde(default)]
        dir: Option<PathBuf>,
        /// End the app once the snapshot is safe.
        #[serde(default)]
        stop: bool,
        /// Write every page, even if an increment of the last snapshot would do.
        #[serde(default)]
        full: bool,
        /// Only if the app is idle at the clean point: no connection open and nothing
        /// waiting on its sockets (else the answer says `"busy": true` and it runs on).
        #[serde(default)]
        if_idle: bool,
        /// Also digest the memory as captured (as [`Request::Digest`] does), in the same
        /// stop, so that a restore can be checked against exactly what was written.
        #[serde(default)]
        digest: bool,
    },
    /// Digest the app's memory (non-zero pages by address and contents).
    Digest,
    /// Hand over the app's listening and bound IP sockets: the answer line comes with
    /// the host sockets as SCM_RIGHTS, in the order it lists them. A worker holds them
    /// while the app is swapped out, so its address keeps accepting.
    Sockets,
}

/// One socket handed over by [`Request::Sockets`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedSocket {
    /// The app's fd number for it.
    pub guest_fd: i32,
    /// AF_INET or AF_INET6.
    pub domain: i32,
    /// SOCK_STREAM or SOCK_DGRAM.
    pub kind: i32,
    /// The host address it is bound to.
    pub bound: String,
    /// Its backlog, if it listens.
    pub listening: Option<i32>,
}

/// The sockets of an app that a worker may hold while the app is swapped out: TCP
/// listeners and bound UDP sockets on the app's address. The syscalls that make them
/// offer them here; the control thread reads them without the process lock (which a
/// blocked call holds).
#[derive(Debug, Default)]
pub struct Handoff(std::sync::Mutex<Vec<(i32, std::sync::Weak<crate::fdtable::OpenFile>)>>);

impl Handoff {
    /// Offers the app's fd `guest_fd`, open on `file`.
    pub fn offer(&self, guest_fd: i32, file: &Arc<crate::fdtable::OpenFile>) {
        let mut offered = self.0.lock().unwrap_or_else(|e| e.into_inner());
        offered.retain(|(_, f)| f.strong_count() > 0);
        if !offered
            .iter()
            .any(|(_, f)| std::ptr::eq(f.as_ptr(), Arc::as_ptr(file)))
        {
            offered.push((guest_fd, Arc::downgrade(file)));
        }
    }

    /// The offered sockets that are still open, each once.
    pub fn live(&self) -> Vec<(i32, Arc<crate::fdtable::OpenFile>)> {
        let offered = self.0.lock().unwrap_or_else(|e| e.into_inner());
        offered
            .iter()
            .filter_map(|(fd, f)| Some((*fd, f.upgrade()?)))
            .collect()
    }
}

/// Sends `line` with the handed-over sockets' fds (SCM_RIGHTS) in one message.
fn send_sockets(stream: &UnixStream, handoff: &Handoff) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let mut described = Vec::new();
    let mut files = Vec::new();
    for (guest_fd, file) in handoff.live() {
        let crate::fdtable::FileKind::Socket { domain, kind } = file.kind else {
            continue;
        };
        let Ok(bound) = rustix::net::getsockname(file.host()) else {
            continue;
        };
        let Ok(bound) = std::net::SocketAddr::try_from(bound) else {
            continue;
        };
        described.push(HandedSocket {
            guest_fd,
            domain,
            kind,
            bound: bound.to_string(),
            listening: file.state().listening,
        });
        files.push(file);
    }
    let fds: Vec<_> = files.iter().map(|f| f.host()).collect();
    let mut line = serde_json::json!({"ok": true, "sockets": described}).to_string();
    line.push('\n');
    let mut space =
        vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::ErrorKind::OutOfMemory.into());
    }
    rustix::net::sendmsg(
        stream.as_fd(),
        &[std::io::IoSlice::new(line.as_bytes())],
        &mut control,
        rustix::net::SendFlags::empty(),
    )?;
    Ok(())
}

/// Work the control socket hands to the vCPU thread, which does it at a clean point.
#[derive(Debug)]
pub enum PendingOp {
    /// Take a snapshot; the reply is a JSON line.
    Snapshot {
        /// The store directory.
        dir: PathBuf,
        /// End the app afterwards.
        stop: bool,
        /// No increment.
        full: bool,
        /// Only if the app is idle then.
        if_idle: bool,
        /// Digest the memory as captured.
        digest: bool,
        /// Where the answer goes.
        reply: Reply,
    },
    /// Digest the app's memory; the reply is a JSON line.
    Digest {
        /// Where the answer goes.
        reply: Reply,
    },
}

/// The answer to a [`PendingOp`]. The vCPU thread writes it to the client itself, before
/// it does anything else: after a snapshot with `stop` the VMM exits right away, and the
/// answer must be out by then.
#[derive(Debug)]
pub struct Reply {
    stream: UnixStream,
    done: std::sync::mpsc::Sender<()>,
}

impl Reply {
    /// Writes `answer` as one JSON line and lets the control thread go on.
    pub fn send(self, answer: serde_json::Value) {
        if let Err(e) = write_line(&self.stream, &answer) {
            tracing::debug!("a control client left before its answer: {e}");
        }
        let _ = self.done.send(());
    }
}

/// Writes `value` and a newline in one write, so a reader never sees half a line.
fn write_line(mut stream: &UnixStream, value: &serde_json::Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())
}

/// The queue of [`PendingOp`]s.
#[derive(Debug, Default)]
pub struct PendingOps(std::sync::Mutex<Vec<PendingOp>>);

impl PendingOps {
    /// Queues an op.
    pub fn push(&self, op: PendingOp) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Takes every queued op.
    pub fn take(&self) -> Vec<PendingOp> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Counters the run loop publishes for the control socket.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Syscalls handled.
    pub syscalls: AtomicU64,
    /// Guest RAM frames in use.
    pub frames_in_use: AtomicU64,
    /// Guest RAM frames in all.
    pub frames_total: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// CPU-time clocks of the threads that work for the app (the vCPU's and the mailbox
    /// poller's), as opposed to the control socket's own.
    app_clocks: std::sync::Mutex<Vec<libc::clockid_t>>,
    /// CPU time of app threads that have ended (a retired mailbox poller), nanoseconds.
    retired_app_ns: AtomicU64,
    /// The counters as a worker reads them without asking (see [`crate::stats_page`]).
    page: std::sync::OnceLock<crate::stats_page::StatsPage>,
    /// Lists the app's processes, once it has forked.
    processes: std::sync::OnceLock<Lister>,
}

/// What lists an app's processes for `stats` (the run loop gives one at the first fork).
pub type ProcessLister = Box<dyn Fn() -> Vec<AppProcess> + Send + Sync>;

struct Lister(ProcessLister);

impl std::fmt::Debug for Lister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lister")
    }
}

impl LiveStats {
    /// Publishes the counters in `page` too from now on.
    pub fn attach_page(&self, page: crate::stats_page::StatsPage) {
        let _ = self.page.set(page);
    }

    /// Reports the app's processes through `lister` from now on.
    pub fn attach_processes(&self, lister: ProcessLister) {
        let _ = self.processes.set(Lister(lister));
        // The worker counts the other processes' CPU from now on (idle detection).
        if let Some(page) = self.page.get() {
            page.mark_tree();
        }
    }

    /// The app's processes; none listed until it forks (it is one process).
    fn processes(&self) -> Vec<AppProcess> {
        self.processes
            .get()
            .map(|list| (list.0)())
            .unwrap_or_default()
    }

    /// Publishes the counters (in the stats page too, if there is one).
    pub fn publish(&self, syscalls: u64, connections: u64, frames_in_use: u64, frames_total: u64) {
        self.syscalls.store(syscalls, Ordering::Relaxed);
        self.connections.store(connections, Ordering::Relaxed);
        self.frames_in_use.store(frames_in_use, Ordering::Relaxed);
        self.frames_total.store(frames_total, Ordering::Relaxed);
        if let Some(page) = self.page.get() {
            page.publish(syscalls, connections, frames_in_use, frames_total);
        }
    }

    /// Counts the calling thread's CPU time as the app's, and names it in the stats page.
    pub fn add_current_app_thread(&self) {
        if let Some(clock) = current_thread_clock() {
            self.app_clocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(clock);
        }
        if let Some(page) = self.page.get() {
            page.add_thread(rustix::thread::gettid().as_raw_nonzero().get());
        }
    }

    /// The calling thread, one of the app's, is about to end, having used `used` ns of
    /// CPU for the app: that time stays counted, so that the app's never goes back.
    pub fn retire_current_app_thread(&self, used: u64) {
        let Some(clock) = current_thread_clock() else {
            return;
        };
        {
            let mut clocks = self.app_clocks.lock().unwrap_or_else(|e| e.into_inner());
            clocks.retain(|&c| c != clock);
            self.retired_app_ns.fetch_add(used, Ordering::Relaxed);
        }
        if let Some(page) = self.page.get() {
            page.retire_thread(rustix::thread::gettid().as_raw_nonzero().get(), used);
        }
    }

    /// CPU time of the app's threads, nanoseconds.
    fn app_cpu_ns(&self) -> u64 {
        let clocks = self.app_clocks.lock().unwrap_or_else(|e| e.into_inner());
        let live: u64 = clocks.iter().filter_map(|&c| clock_ns(c)).sum();
        live + self.retired_app_ns.load(Ordering::Relaxed)
    }
}

/// The CPU-time clock of the calling thread (its id names this thread for other threads
/// too, unlike CLOCK_THREAD_CPUTIME_ID).
fn current_thread_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self is the calling, live thread; the call writes one clockid.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

/// The CPU time the calling thread has used, in nanoseconds.
pub fn current_thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0)
}

/// The time of `clock` in nanoseconds, if it can be read.
fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec, which `t` is.
    let rc = unsafe { libc::clock_gettime(clock, &mut t) };
    (rc == 0).then(|| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// This process's resident memory, bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The answer to [`Request::Stats`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReply {
    /// The app's name.
    pub name: String,
    /// The app's address.
    #[serde(default)]
    pub address: String,
    /// The store its snapshots go to.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// The user its VMM runs as.
    #[serde(default)]
    pub uid: u32,
    /// The VMM's process id.
    pub pid: u32,
    /// Its parent's: the supervisor of a jailed VMM, which whoever started it knows.
    #[serde(default)]
    pub ppid: u32,
    /// "running".
    pub state: String,
    /// Guest memory the app has mapped, in bytes.
    pub memory_bytes: u64,
    /// Guest RAM in all, in bytes.
    pub memory_limit_bytes: u64,
    /// Syscalls handled so far.
    pub syscalls: u64,
    /// Connections the app accepted so far.
    #[serde(default)]
    pub connections: u64,
    /// Sockets that serve the app's address now (TCP listeners and bound UDP sockets, not
    /// those on 127.0.0.1 or ::1): a fresh app with one is ready for clients.
    #[serde(default)]
    pub serving: usize,
    /// CPU time of the whole VMM process, exited threads included, nanoseconds.
    #[serde(default)]
    pub cpu_ns: u64,
    /// CPU time of the threads that work for the app (vCPU and mailbox), nanoseconds:
    /// what tells a busy app from an idle one whose VMM only answers questions.
    #[serde(default)]
    pub app_cpu_ns: u64,
    /// Resident memory of the VMM process, bytes.
    #[serde(default)]
    pub rss_bytes: u64,
    /// The app's processes, each a VMM process of its own (empty for an app that has
    /// never forked).
    #[serde(default)]
    pub processes: Vec<AppProcess>,
}

/// One process of an app, as `stats` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppProcess {
    /// Its pid in the app.
    pub pid: i32,
    /// Its VMM's host pid.
    pub host_pid: i32,
    /// Its process group in the app.
    pub pgid: i32,
}

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another live picoprocess holds the name.
    #[error("an app named {0} is already running")]
    NameInUse(String),
    /// The socket could not be created.
    #[error("creating the control socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The name of a running app, held: an exclusive flock on `<run>/<name>.lock` while the
/// app lives. It is what makes the name this app's, with no race between two apps
/// starting at once, and the kernel releases it however the VMM ends. It is taken before
/// the VMM is built (by its supervisor, outside the jail) and handed down.
#[derive(Debug, Clone)]
pub struct NameLease {
    /// The app's name.
    pub name: String,
    /// Its control socket's path.
    pub socket: PathBuf,
    lock_file: Arc<std::os::fd::OwnedFd>,
}

impl NameLease {
    /// Takes `name` in `run_dir`, or fails with [`ControlError::NameInUse`].
    pub fn take(run_dir: &Path, name: &str) -> Result<Self, ControlError> {
        let socket = run_dir.join(format!("{name}.sock"));
        let bind_error = |source| ControlError::Bind {
            path: socket.clone(),
            source,
        };
        private_dir(run_dir).map_err(bind_error)?;
        let lock = rustix::fs::open(
            socket.with_extension("lock"),
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| bind_error(e.into()))?;
        let try_lock =
            || rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        let mut outcome = try_lock();
        if outcome == Err(rustix::io::Errno::WOULDBLOCK) && !holder_alive(&lock) {
            // The app's VMM has ended and its supervisor, which shares the lock, is still
            // removing what the VMM left: the name is about to be free, so a restart right
            // after a stop waits for it instead of failing.
            let deadline = std::time::Instant::now() + SUPERVISOR_CLEANUP_WAIT;
            while outcome == Err(rustix::io::Errno::WOULDBLOCK)
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
                outcome = try_lock();
            }
        }
        match outcome {
            Ok(()) => {
                record_holder(&lock).map_err(bind_error)?;
                Ok(Self {
                    name: name.to_string(),
                    socket,
                    lock_file: Arc::new(lock),
                })
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Err(ControlError::NameInUse(name.to_string())),
            Err(e) => Err(bind_error(e.into())),
        }
    }
}

impl NameLease {
    /// The lock that holds the name (a copy held elsewhere, by a supervisor, keeps it).
    pub fn lock(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&*self.lock_file)
    }
}

/// How long a start waits for the supervisor of an ended app to let go of its name.
const SUPERVISOR_CLEANUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes this process's pid (the VMM's: the lease is taken before the supervisor forks)
/// into the held lock file, so that whoever finds the name taken can tell a live app from
/// one whose supervisor is cleaning up.
fn record_holder(lock: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    rustix::fs::ftruncate(lock, 0)?;
    let pid = std::process::id().to_string();
    rustix::io::pwrite(lock, pid.as_bytes(), 0)?;
    Ok(())
}

/// Whether the VMM recorded in a lock file someone else holds still runs. A file with no
/// pid yet belongs to an app that is starting: alive.
fn holder_alive(lock: &std::os::fd::OwnedFd) -> bool {
    let mut text = [0u8; 16];
    let Ok(length) = rustix::io::pread(lock, &mut text, 0) else {
        return true;
    };
    let Some(pid) = std::str::from_utf8(&text[..length])
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|&pid| pid > 0)
    else {
        return true;
    };
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return true;
    };
    if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
        return false;
    }
    // A zombie has ended too: only its parent has not reaped it yet.
    std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .ok()
        .and_then(|stat| {
            Some(
                stat.rsplit_once(')')?
                    .1
                    .trim_start()
                    .starts_with(['Z', 'X']),
            )
        })
        != Some(true)
}

/// What the control socket of an app serves.
#[derive(Debug, Clone)]
pub struct Control {
    /// The app's name and socket.
    pub lease: NameLease,
    /// The app's address (reported by `stats`).
    pub address: std::net::IpAddr,
    /// The only store its snapshots may go to, if it is set: a client cannot make the VMM
    /// write anywhere else.
    pub store: Option<PathBuf>,
}

/// A running control-socket server. Dropping it removes the socket file (where the VMM
/// still may; a jailed VMM's supervisor removes it otherwise).
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    _lease: NameLease,
    listener: UnixListener,
    serving: Serving,
}

impl ControlServer {
    /// Listens at the lease's socket path. Whatever socket file is there belongs to an app
    /// that has ended, since the lease is held.
    pub fn start(
        control: &Control,
        kicker: Kicker,
        stats: Arc<LiveStats>,
        ops: Arc<PendingOps>,
        handoff: Arc<Handoff>,
    ) -> Result<Self, ControlError> {
        let path = control.lease.socket.clone();
        let bind_error = |source| ControlError::Bind {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(&path);
        // The directory is the owner's alone (0700), so nobody else can reach the socket
        // between its bind and its chmod.
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        // No thread waits at the socket: once the app runs, a connection signals the
        // process, which kicks the vCPU thread, whose run loop accepts it (see
        // `kick_on_connections` and `accept_waiting`). Until then they wait in its backlog.
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(Self {
            path,
            _lease: control.lease.clone(),
            listener,
            serving: Serving {
                kicker,
                stats,
                ops,
                served: Arc::new(control.clone()),
                handoff,
            },
        })
    }

    /// From now on, a connection kicks the vCPU thread (with `reason::CONTROL`); kicks
    /// once now for those that waited. Called by the run loop as it starts: a kick during
    /// set-up would interrupt its host calls.
    pub fn kick_on_connections(&self) -> std::io::Result<()> {
        crate::kvm::kick::kick_on_connection(&self.serving.kicker, &self.listener)
    }

    /// Serves the connections waiting at the socket, each on a thread of its own while it
    /// lasts (the run loop calls this when a connection kicked it).
    pub fn accept_waiting(&self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                // A client that gave up before it was accepted, or a kick meanwhile.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of fds (the app may hold them all): what waits is accepted at
                    // the next connection's kick.
                    tracing::warn!("control socket: accepting: {e}");
                    return;
                }
            };
            if let Err(refusal) = check_peer(&stream) {
                tracing::warn!("control socket: {refusal}");
                continue;
            }
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let serving = self.serving.clone();
            // Named, so that a worker can tell the CPU these take (its own questions)
            // from the app's.
            let spawned = std::thread::Builder::new()
                .name("picocenter-control".into())
                .spawn(move || serve(stream, &serving));
            if let Err(e) = spawned {
                tracing::warn!("control socket: no thread for a connection: {e}");
            }
        }
    }
}

/// What a control connection's thread needs.
#[derive(Debug, Clone)]
struct Serving {
    kicker: Kicker,
    stats: Arc<LiveStats>,
    ops: Arc<PendingOps>,
    served: Arc<Control>,
    handoff: Arc<Handoff>,
}

/// Makes `dir` (and its parents) exist, with `dir` itself 0700: control sockets and
/// their locks live there, and only their owner may reach them.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes the socket files in `dir` whose app has ended (nobody holds their lock): a
/// jailed VMM may not remove its own, so its supervisor does.
pub fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for socket in entries.flatten().map(|e| e.path()) {
        if socket.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        let Ok(lock) = std::fs::File::open(socket.with_extension("lock")) else {
            continue;
        };
        let free = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive);
        if free.is_ok() {
            let _ = std::fs::remove_file(&socket);
        }
    }
}

/// Only the VMM's own user and root may use its control socket (SO_PEERCRED), whatever
/// reached the socket file.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let peer = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("refused a client whose credentials cannot be read: {e}"))?;
    let (uid, own) = (peer.uid.as_raw(), rustix::process::geteuid().as_raw());
    if uid == 0 || uid == own {
        Ok(())
    } else {
        Err(format!(
            "refused a client running as uid {uid} (pid {})",
            peer.pid.as_raw_nonzero()
        ))
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, serving: &Serving) {
    let Serving {
        kicker,
        stats,
        ops,
        served: control,
        handoff,
    } = serving;
    let name = &control.lease.name;
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Stats) => serde_json::to_value(StatsReply {
                name: name.to_string(),
                address: control.address.to_string(),
                store: control.store.clone(),
                uid: rustix::process::geteuid().as_raw(),
                pid: std::process::id(),
                ppid: std::os::unix::process::parent_id(),
                state: "running".into(),
                memory_bytes: stats.frames_in_use.load(Ordering::Relaxed) * 4096,
                memory_limit_bytes: stats.frames_total.load(Ordering::Relaxed) * 4096,
                syscalls: stats.syscalls.load(Ordering::Relaxed),
                connections: stats.connections.load(Ordering::Relaxed),
                serving: handoff.live().len(),
                cpu_ns: clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or(0),
                app_cpu_ns: stats.app_cpu_ns(),
                rss_bytes: rss_bytes(),
                processes: stats.processes(),
            })
            .ok(),
            Ok(Request::Stop { grace_ms }) => {
                tracing::info!(grace_ms, "stop requested: SIGTERM to {name}");
                kicker.raise(libc::SIGTERM);
                // Every other process of the app gets it too; when the first one ends
                // (by itself or by the SIGKILL below), they all end.
                // A stopped one is continued after, as systemd does, so that it can act on
                // the SIGTERM in the grace period.
                let own = std::process::id() as i32;
                for process in stats.processes() {
                    if process.host_pid > 0 && process.host_pid != own {
                        for signal in [libc::SIGTERM, libc::SIGCONT] {
                            let _ = crate::kvm::kick::send_guest_signal(process.host_pid, signal);
                        }
                    }
                }
                let later = kicker.clone();
                let timer = std::thread::Builder::new()
                    .name("picocenter-stop-grace".into())
                    .spawn(move || {
                        std::thread::sleep(Duration::from_millis(grace_ms));
                        later.kick(reason::STOP);
                    });
                if let Err(e) = timer {
                    tracing::warn!("no thread for the grace period ({e}): stopping now");
                    kicker.kick(reason::STOP);
                }
                Some(serde_json::json!({"ok": true, "stopping": true}))
            }
            Ok(Request::Snapshot {
                dir,
                stop,
                full,
                if_idle,
                digest,
            }) => match snapshot_dir(control, dir) {
                Ok(dir) => at_clean_point(kicker, ops, &writer, |reply| PendingOp::Snapshot {
                    dir,
                    stop,
                    full,
                    if_idle,
                    digest,
                    reply,
                }),
                Err(error) => Some(serde_json::json!({"ok": false, "error": error})),
            },
            Ok(Request::Sockets) => match send_sockets(&writer, handoff) {
                Ok(()) => None,
                Err(e) => Some(serde_json::json!({"ok": false, "error": e.to_string()})),
            },
            Ok(Request::Digest) => {
                at_clean_point(kicker, ops, &writer, |reply| PendingOp::Digest { reply })
            }
            Err(e) => Some(serde_json::json!({"ok": false, "error": format!("bad request: {e}")})),
        };
        if let Some(reply) = reply {
            if write_line(&writer, &reply).is_err() {
                return;
            }
        }
    }
}

/// Where a snapshot the client asked for goes: the app's store, which a client may name
/// but not change; a VMM without one takes the client's directory.
fn snapshot_dir(control: &Control, asked: Option<PathBuf>) -> Result<PathBuf, String> {
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    match (asked, &control.store) {
        (None, Some(store)) => Ok(store.clone()),
        (Some(asked), Some(store)) if same(&asked, store) => Ok(store.clone()),
        (Some(asked), Some(store)) => Err(format!(
            "{} snapshots into its own store {}, not {}",
            control.lease.name,
            store.display(),
            asked.display()
        )),
        (Some(asked), None) => Ok(asked),
        (None, None) => Err(format!("{} has no snapshot store", control.lease.name)),
    }
}

/// Hands an op to the vCPU thread and stops the app at a clean point; the vCPU thread
/// answers the client. Returns the answer to write only if the app ended first.
fn at_clean_point(
    kicker: &Kicker,
    ops: &PendingOps,
    client: &UnixStream,
    op: impl FnOnce(Reply) -> PendingOp,
) -> Option<serde_json::Value> {
    let ended = || {
        Some(
            serde_json::json!({"ok": false, "error": "the app ended before it reached a clean point"}),
        )
    };
    let Ok(stream) = client.try_clone() else {
        return Some(serde_json::json!({"ok": false, "error": "out of file descriptors"}));
    };
    let (done, answered) = std::sync::mpsc::channel();
    ops.push(op(Reply { stream, done }));
    kicker.kick(reason::PAUSE);
    match answered.recv() {
        Ok(()) => None,
        Err(_) => ended(),
    }
}

/// Sends one request to the control socket at `path` and returns the reply line.
pub fn request(path: &Path, request: &Request) -> std::io::Result<(String, UnixStream)> {
    let mut stream = UnixStream::connect(path)?;
    writeln!(
        stream,
        "{}",
        serde_json::to_string(request).unwrap_or_default()
    )?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    Ok((line, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_cpu_counts_the_registered_threads_only() {
        let stats = LiveStats::default();
        stats.add_current_app_thread();
        let before = stats.app_cpu_ns();
        let own = || clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
        let start = own();
        while own() < start + 20_000_000 {
            std::hint::black_box(0);
        }
        let after = stats.app_cpu_ns();
        assert!(after >= before + 20_000_000, "{before} -> {after}");
        // Another thread's work is not the app's.
        let idle = stats.app_cpu_ns();
        std::thread::spawn(move || {
            let start = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
            while clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap() < start + 20_000_000 {
                std::hint::black_box(0);
            }
        })
        .join()
        .unwrap();
        assert!(stats.app_cpu_ns() < idle + 5_000_000);
        // An app thread that ends (a retired poller) leaves its time counted.
        let stats = std::sync::Arc::new(stats);
        let worker = stats.clone();
        std::thread::spawn(move || {
            worker.add_current_app_thread();
            let start = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
            while clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap() < start + 20_000_000 {
                std::hint::black_box(0);
            }
            worker.retire_current_app_thread(clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap());
        })
        .join()
        .unwrap();
        let retired = stats.app_cpu_ns();
        assert!(retired >= idle + 20_000_000, "{idle} -> {retired}");
        assert!(clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap() >= after);
        assert!(rss_bytes() > 0);
    }

    /// A stats request from a client running as `uid`, through python3; its output.
    fn ask_as(uid: u32, socket: &Path) -> String {
        use std::os::unix::process::CommandExt;
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            s.connect(sys.argv[1])\n\
            s.sendall(b'{\"op\":\"stats\"}\\n')\n\
            print(s.recv(4096).decode() or 'closed')\n";
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(socket)
            .uid(uid)
            .gid(uid)
            .output()
            .expect("python3");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn a_name_is_refused_while_its_app_lives_and_waited_for_while_its_supervisor_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let lease = NameLease::take(&run, "app").unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(
            NameLease::take(&run, "app"),
            Err(ControlError::NameInUse(_))
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The lock now names a VMM that has ended, as when a supervisor still holds it.
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        let ended_pid = ended.id();
        ended.wait().unwrap();
        std::fs::write(run.join("app.lock"), ended_pid.to_string()).unwrap();
        let supervisor = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(lease);
        });
        let started = std::time::Instant::now();
        let second = NameLease::take(&run, "app").unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        supervisor.join().unwrap();
        let recorded = std::fs::read_to_string(run.join("app.lock")).unwrap();
        assert_eq!(recorded, std::process::id().to_string());
        drop(second);
    }

    #[test]
    fn only_root_and_the_owner_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let socket = run.join("app.sock");
        let kicker = Kicker::for_current_thread().unwrap();
        let control = Control {
            lease: NameLease::take(&run, "app").unwrap(),
            address: std::net::Ipv4Addr::new(127, 100, 0, 1).into(),
            store: None,
        };
        assert!(matches!(
            NameLease::take(&run, "app"),
            Err(ControlError::NameInUse(_))
        ));
        let server = ControlServer::start(
            &control,
            kicker.clone(),
            Arc::new(LiveStats::default()),
            Arc::new(PendingOps::default()),
            Arc::new(Handoff::default()),
        )
        .unwrap();
        server.kick_on_connections().unwrap();
        // The run loop's part: a connection kicks, and the kicked thread accepts.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepting = {
            let done = done.clone();
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    let mut fds = [rustix::event::PollFd::new(
                        kicker.wake_fd(),
                        rustix::event::PollFlags::IN,
                    )];
                    let tick = rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 50_000_000,
                    };
                    let _ = rustix::event::poll(&mut fds, Some(&tick));
                    if kicker.pending() & crate::kvm::kick::reason::CONTROL != 0 {
                        kicker.clear(crate::kvm::kick::reason::CONTROL);
                        server.accept_waiting();
                    }
                }
            })
        };
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&run), 0o700);
        assert_eq!(mode(&socket), 0o600);
        assert!(ask_as(0, &socket).contains("\"name\":\"app\""));
        // Even a client that reached the socket file (here: opened up on purpose) is
        // refused unless it runs as the owner or root.
        for path in [dir.path(), run.as_path(), socket.as_path()] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let stranger = ask_as(65534, &socket);
        assert!(!stranger.contains("\"name\""), "{stranger}");
        done.store(true, Ordering::SeqCst);
        accepting.join().unwrap();
    }
}

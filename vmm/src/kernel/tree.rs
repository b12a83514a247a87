//! The app as a tree of processes. Each process of an app is its own VMM process (a host
//! fork of its parent's, see `crate::run::fork`); what they share lives here:
//!
//! * [`AppTree`]: one shared, VMM-only page every process of the app maps, with the pid
//!   counter and a table of the live processes (guest pid, host pid, group and session),
//!   so that kill, setpgid and `ps` can name any process of the app, and nothing else;
//! * [`ProcessIds`]: one process's own pid, parent, group and session;
//! * [`ChildProcess`]: what a parent knows of a child it forked (its pidfd, for wait4).
//!
//! The guest cannot reach the table: it is host memory, not guest RAM.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Most processes an app may have at once (zombies included): a fork beyond gives EAGAIN,
/// as RLIMIT_NPROC does, so a fork bomb stays inside its app. A snapshot of the tree
/// holds at most as many (the format's bound is this one).
pub const MAX_PROCESSES: usize = picocenter_snapshots::bounds::MAX_PROCESSES;

/// The highest pid handed out (Linux's default pid_max), which a snapshot's are below.
pub const PID_MAX: i32 = picocenter_snapshots::bounds::PID_MAX;

/// A process's identity in the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIds {
    /// Its pid.
    pub pid: i32,
    /// Its parent's pid (the first process's parent is outside the app: 1).
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
}

impl ProcessIds {
    /// The first process of an app: its own group and session leader.
    pub fn first() -> Self {
        let pid = super::GUEST_PID;
        Self {
            pid,
            ppid: super::GUEST_PPID,
            pgid: pid,
            sid: pid,
        }
    }

    /// A child `pid` of this process, in its group and session.
    pub fn child(&self, pid: i32) -> Self {
        Self {
            pid,
            ppid: self.pid,
            pgid: self.pgid,
            sid: self.sid,
        }
    }
}

impl Default for ProcessIds {
    fn default() -> Self {
        Self::first()
    }
}

/// A child process a parent forked and has not reaped.
#[derive(Debug)]
pub struct ChildProcess {
    /// Its guest pid.
    pub pid: i32,
    /// Its VMM's host pid.
    pub host_pid: i32,
    /// Its process group as its parent last knew it (the table's is the truth while it
    /// lives; a wait for a group still finds it once it has ended).
    pub pgid: i32,
    /// A pidfd of its VMM: readable once it has ended.
    pub pidfd: OwnedFd,
}

/// How the processes of an app learn that its first process ended, however it ended:
/// the first holds the write end of a pipe nobody writes to, every fork closes its copy
/// of that end at once and keeps the read end, which reports a hang-up once the first
/// process is gone. A forked process's watcher thread then ends its own VMM, as the
/// processes of a PID namespace end with its init.
#[derive(Debug)]
pub struct RootWatch {
    /// The read end.
    pub alive: OwnedFd,
    /// The write end: the first process's only.
    pub holder: Option<OwnedFd>,
}

impl RootWatch {
    /// A watch held by this (the first) process.
    pub fn new() -> std::io::Result<Self> {
        let (alive, holder) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        Ok(Self {
            alive,
            holder: Some(holder),
        })
    }

    /// In a freshly forked process: lets go of the write end and starts the thread that
    /// ends this process when the first one is gone.
    pub fn watch_from_fork(&mut self) -> std::io::Result<()> {
        self.holder = None;
        let alive = self.alive.try_clone()?;
        std::thread::Builder::new()
            .name("picocenter-root-watch".into())
            .spawn(move || loop {
                let mut fds = [rustix::event::PollFd::new(
                    &alive,
                    rustix::event::PollFlags::IN,
                )];
                match rustix::event::poll(&mut fds, None) {
                    Err(rustix::io::Errno::INTR) => continue,
                    _ => {
                        // SAFETY: raise touches no memory; SIGKILL ends the whole process.
                        unsafe { libc::raise(libc::SIGKILL) };
                        return;
                    }
                }
            })?;
        Ok(())
    }
}

/// Job control between a process and its parent: stops and continues (SIGSTOP, SIGTSTP,
/// SIGTTIN, SIGTTOU and SIGCONT), which wait4's WUNTRACED and WCONTINUED report. The
/// state itself is in the [`AppTree`]; these are the wake-ups.
#[derive(Debug, Default)]
pub struct JobControl {
    /// Becomes readable when a child of this process stops or continues: an eventfd made
    /// at its first fork, which its children (host forks) inherit and write to.
    pub children_changed: Option<std::sync::Arc<OwnedFd>>,
    /// The parent's `children_changed` (a forked process's only).
    pub parent_changed: Option<std::sync::Arc<OwnedFd>>,
    /// A stop signal taken, which the first vCPU acts on at its next clean point.
    pub stop: Option<i32>,
    /// What the SIGCHLD pending from a child's stop or continue says.
    pub sigchld: Option<crate::kvm::kick::ChildChange>,
}

impl JobControl {
    /// The eventfd children report to, made on first use.
    pub fn children_changed(&mut self) -> std::io::Result<std::sync::Arc<OwnedFd>> {
        if let Some(fd) = &self.children_changed {
            return Ok(fd.clone());
        }
        let fd = std::sync::Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?);
        self.children_changed = Some(fd.clone());
        Ok(fd)
    }

    /// In a freshly forked process: its parent's eventfd is what it reports to; its own
    /// children get one of their own.
    pub fn forked(&mut self) {
        self.parent_changed = self.children_changed.take();
        self.stop = None;
        self.sigchld = None;
    }

    /// Tells the parent's waits that this process stopped or continued.
    pub fn notify_parent(&self) {
        if let Some(fd) = &self.parent_changed {
            let _ = rustix::io::write(&**fd, &1u64.to_ne_bytes());
        }
    }

    /// Empties the children's eventfd before this process looks at their states, so
    /// that only a change after the look wakes its next wait.
    pub fn drain(&self) {
        if let Some(fd) = &self.children_changed {
            let _ = rustix::io::read(&**fd, &mut [0u8; 8]);
        }
    }
}

impl ChildProcess {
    /// The child's status if it has ended (reaping it, unless `keep`), without waiting.
    pub fn ended(&self, keep: bool) -> rustix::io::Result<Option<rustix::process::WaitIdStatus>> {
        use rustix::process::WaitIdOptions;
        let mut options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        if keep {
            options |= WaitIdOptions::NOWAIT;
        }
        rustix::process::waitid(
            rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(&self.pidfd)),
            options,
        )
    }
}

/// One live process in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its guest pid.
    pub pid: i32,
    /// Its VMM's host pid (0 while its fork is under way).
    pub host_pid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
    /// Its parent's pid.
    pub ppid: i32,
    /// Its short name (Linux's comm), as it last described itself.
    pub comm: String,
    /// Whether it is stopped (job control).
    pub stopped: bool,
    /// Its program's path, if it fits the table.
    pub exe: Option<String>,
    /// Its working directory, if it fits the table.
    pub cwd: Option<String>,
    /// The start of its command line, NUL-separated (at most [`DESCRIBED_ARGS`] bytes).
    pub cmdline: Vec<u8>,
    /// Whether it has ended (a zombie its parent has not waited for).
    pub ended: bool,
    /// Its uids and its gids (each real, effective, saved, filesystem), as it last said.
    pub ids: [[u32; 4]; 2],
}

/// How much of a process's command line the table keeps, for other processes' /proc.
pub const DESCRIBED_ARGS: usize = 128;

#[repr(C)]
struct Slot {
    pid: AtomicI32,
    host_pid: AtomicI32,
    pgid: AtomicI32,
    sid: AtomicI32,
    ppid: AtomicI32,
    args_len: AtomicU32,
    /// comm, 16 bytes, NUL-padded.
    comm: [AtomicU64; 2],
    /// The command line's first [`DESCRIBED_ARGS`] bytes.
    args: [AtomicU64; DESCRIBED_ARGS / 8],
    /// Its job-control state: the `JOB_*` bits and the stop signal in the low byte.
    job: AtomicU32,
    /// Whether it set SA_NOCLDSTOP for SIGCHLD (its children's stops send it none).
    no_stop_signal: AtomicU32,
    /// Its program's path, and its length (0 when unknown or longer than the room).
    exe: [AtomicU64; DESCRIBED_PATH / 8],
    exe_len: AtomicU32,
    /// Its working directory, and its length (as `exe`).
    cwd: [AtomicU64; DESCRIBED_PATH / 8],
    cwd_len: AtomicU32,
    /// Its VMM has ended (a zombie until its parent waits for it).
    ended: AtomicU32,
    /// Its part of a tree snapshot: the board's generation, shifted by 4, and a
    /// [`CaptureStatus`].
    capture: AtomicU32,
    /// Asks for its description (maps, fds) so far, and the last one it answered.
    describe_asked: AtomicU32,
    described: AtomicU32,
    /// Its real, effective, saved and filesystem uid, then the same gids.
    ids: [AtomicU32; 8],
}

/// A tree snapshot in progress, as its first process announces it to the others: which
/// one (the generation), where their parts go, and what became of it.
#[repr(C)]
struct CaptureBoard {
    generation: AtomicU32,
    /// The generation, shifted by 4, and a [`Verdict`]: what the others do afterwards.
    verdict: AtomicU32,
    /// The generation, shifted by 4, and a `PHASE_*`.
    phase: AtomicU32,
    if_idle: AtomicU32,
    dir: [AtomicU64; DESCRIBED_PATH / 8],
    dir_len: AtomicU32,
    /// The snapshot's id.
    id: [AtomicU64; SNAPSHOT_ID / 8],
    id_len: AtomicU32,
    /// The snapshot it is an increment of, if any (length 0: none).
    parent: [AtomicU64; SNAPSHOT_ID / 8],
    parent_len: AtomicU32,
}

/// The longest snapshot id the board holds (a store's ids are at most 128 bytes).
const SNAPSHOT_ID: usize = 128;

/// In `CaptureBoard::phase`: the processes park (every thread at a clean point).
const PHASE_PARK: u32 = 1;
/// Every process is parked: each writes its part.
const PHASE_WRITE: u32 = 2;

/// What the first process asks of the others for a tree snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    /// Which snapshot.
    pub generation: u32,
    /// The directory each process writes its part into.
    pub dir: String,
    /// Only if the app is idle: a process that is not says so instead.
    pub if_idle: bool,
    /// The snapshot's id.
    pub id: String,
    /// The snapshot it is an increment of: a process restored from that one stores only
    /// the pages it changed since.
    pub parent: Option<String>,
}

/// What the first process decided about a tree snapshot, for the others (the low 4 bits
/// of the board's `verdict` word; 0 is undecided).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Verdict {
    /// Saved, and the app ends.
    End = 1,
    /// Saved, and the app goes on (the next snapshot is an increment of it).
    Saved = 2,
    /// Not saved; the app goes on.
    Abandoned = 3,
}

impl Verdict {
    /// The verdict in a board word's low 4 bits (by its value above).
    fn from_state(state: u32) -> Self {
        [Self::End, Self::Saved]
            .into_iter()
            .find(|v| *v as u32 == state & 0xf)
            .unwrap_or(Self::Abandoned)
    }
}

/// Where one process's part of a tree snapshot stands (the low 4 bits of its slot's
/// `capture` word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CaptureStatus {
    /// Asked, not parked yet.
    Pending = 1,
    /// Parked at a clean point, every thread of it, until the first process says write.
    Parked = 5,
    /// Written.
    Done = 2,
    /// Not written: the process is not idle.
    Busy = 3,
    /// Not written: it failed (its part's directory says why).
    Failed = 4,
}

impl CaptureStatus {
    /// The status in a slot word's low 4 bits (by its value above).
    fn from_state(state: u32) -> Self {
        [Self::Pending, Self::Parked, Self::Done, Self::Busy]
            .into_iter()
            .find(|s| *s as u32 == state & 0xf)
            .unwrap_or(Self::Failed)
    }
}

/// How long a path (a program's, a working directory) the table keeps for other
/// processes' /proc; a longer one is not shown.
pub const DESCRIBED_PATH: usize = 512;

/// In `Slot::job`: the process is stopped (by the signal in the low byte).
const JOB_STOPPED: u32 = 1 << 8;
/// Its stop is not yet reported to its parent's wait.
const JOB_STOP_UNREPORTED: u32 = 1 << 9;
/// Its continuation is not yet reported to its parent's wait.
const JOB_CONTINUE_UNREPORTED: u32 = 1 << 10;

/// Stores `bytes` (zero-padded) into `words`.
fn store_bytes(words: &[AtomicU64], bytes: &[u8]) {
    for (i, word) in words.iter().enumerate() {
        let mut chunk = [0u8; 8];
        for (j, byte) in chunk.iter_mut().enumerate() {
            *byte = bytes.get(i * 8 + j).copied().unwrap_or(0);
        }
        word.store(u64::from_le_bytes(chunk), Ordering::Relaxed);
    }
}

/// Stores `path` and its length, or length 0 when it does not fit. A reader racing the
/// update may see a mix of old and new, as a racing reader of Linux's /proc may.
fn store_path(words: &[AtomicU64], len: &AtomicU32, path: &str) {
    let bytes = path.as_bytes();
    if bytes.len() > words.len() * 8 {
        len.store(0, Ordering::Release);
        return;
    }
    store_bytes(words, bytes);
    len.store(bytes.len() as u32, Ordering::Release);
}

/// The path [`store_path`] stored, if any.
fn load_path(words: &[AtomicU64], len: &AtomicU32) -> Option<String> {
    let len = len.load(Ordering::Acquire) as usize;
    let mut bytes = load_bytes(words);
    (len > 0 && len <= bytes.len()).then(|| {
        bytes.truncate(len);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The bytes `words` hold.
fn load_bytes(words: &[AtomicU64]) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
        .collect()
}

#[repr(C)]
struct Table {
    next_pid: AtomicI32,
    slots: [Slot; MAX_PROCESSES],
    capture: CaptureBoard,
}

/// The table every process of one app shares (see the module docs).
#[derive(Debug)]
pub struct AppTree {
    table: std::ptr::NonNull<Table>,
}

// SAFETY: the mapping is only ever accessed through atomics, from any thread or process.
unsafe impl Send for AppTree {}
// SAFETY: as above.
unsafe impl Sync for AppTree {}

impl AppTree {
    /// Maps a new table holding `first` (host pid `host_pid`), whose next pid is above
    /// `highest_used`.
    pub fn new(first: ProcessIds, host_pid: i32, highest_used: i32) -> std::io::Result<Self> {
        let size = std::mem::size_of::<Table>();
        // SAFETY: a fresh anonymous mapping; nothing else refers to the range. MAP_SHARED
        // keeps it one table across the forks of this process, unlike guest RAM.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let table = std::ptr::NonNull::new(base.cast::<Table>())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        let tree = Self { table };
        // Zeroed memory is a valid Table of atomics: no process yet.
        tree.table().next_pid.store(
            highest_used.max(first.pid).saturating_add(1),
            Ordering::SeqCst,
        );
        if let Some(slot) = tree.claim(first.pid) {
            tree.fill(slot, first, host_pid);
        }
        Ok(tree)
    }

    fn table(&self) -> &Table {
        // SAFETY: the mapping lives as long as `self` and holds a `Table` of atomics.
        unsafe { self.table.as_ref() }
    }

    /// A new pid (or tid), never handed out before in this app; `None` past [`PID_MAX`].
    pub fn allocate_pid(&self) -> Option<i32> {
        let pid = self.table().next_pid.fetch_add(1, Ordering::SeqCst);
        (1..PID_MAX).contains(&pid).then_some(pid)
    }

    /// Takes a free slot for `pid`; `None` when the app has [`MAX_PROCESSES`].
    pub fn claim(&self, pid: i32) -> Option<usize> {
        self.table().slots.iter().position(|slot| {
            slot.pid
                .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    /// Records what slot `slot`, claimed for `ids.pid`, holds (host pid 0: not yet known).
    pub fn fill(&self, slot: usize, ids: ProcessIds, host_pid: i32) {
        let slot = &self.table().slots[slot];
        slot.pgid.store(ids.pgid, Ordering::SeqCst);
        slot.sid.store(ids.sid, Ordering::SeqCst);
        slot.host_pid.store(host_pid, Ordering::SeqCst);
    }

    /// Records the host pid of the process in slot `slot`, once its fork has made it.
    pub fn set_host_pid(&self, slot: usize, host_pid: i32) {
        self.table().slots[slot]
            .host_pid
            .store(host_pid, Ordering::SeqCst);
    }

    /// Frees `pid`'s slot (harmless if it is already free: pids are never reused).
    pub fn release(&self, pid: i32) {
        for slot in &self.table().slots {
            if slot.pid.load(Ordering::SeqCst) == pid {
                slot.host_pid.store(0, Ordering::SeqCst);
                slot.args_len.store(0, Ordering::SeqCst);
                slot.ppid.store(0, Ordering::SeqCst);
                slot.job.store(0, Ordering::SeqCst);
                slot.no_stop_signal.store(0, Ordering::SeqCst);
                slot.exe_len.store(0, Ordering::SeqCst);
                slot.cwd_len.store(0, Ordering::SeqCst);
                slot.ended.store(0, Ordering::SeqCst);
                slot.capture.store(0, Ordering::SeqCst);
                slot.describe_asked.store(0, Ordering::SeqCst);
                slot.described.store(0, Ordering::SeqCst);
                for id in &slot.ids {
                    id.store(0, Ordering::SeqCst);
                }
                store_bytes(&slot.comm, &[]);
                store_bytes(&slot.args, &[]);
                slot.pid.store(0, Ordering::SeqCst);
            }
        }
    }

    /// Records what process `pid` shows other processes of the app in /proc: its parent,
    /// short name and command line (cut to [`DESCRIBED_ARGS`] bytes). A reader racing the
    /// update may see a mix of old and new, as a racing reader of Linux's /proc may.
    pub fn describe(&self, pid: i32, ppid: i32, comm: &str, cmdline: &[u8]) {
        for slot in &self.table().slots {
            if slot.pid.load(Ordering::SeqCst) == pid {
                slot.ppid.store(ppid, Ordering::Relaxed);
                store_bytes(&slot.comm, &comm.as_bytes()[..comm.len().min(15)]);
                let kept = cmdline.len().min(DESCRIBED_ARGS);
                store_bytes(&slot.args, &cmdline[..kept]);
                slot.args_len.store(kept as u32, Ordering::Release);
            }
        }
    }

    /// Records process `pid`'s program and working directory, for other processes'
    /// /proc (`exe` and `cwd`); a path longer than [`DESCRIBED_PATH`] is not shown.
    pub fn describe_paths(&self, pid: i32, exe: &str, cwd: &str) {
        if let Some(slot) = self.slot_of(pid) {
            store_path(&slot.exe, &slot.exe_len, exe);
            store_path(&slot.cwd, &slot.cwd_len, cwd);
        }
    }

    /// Records process `pid`'s uids and gids (each real, effective, saved,
    /// filesystem), for other processes' /proc.
    pub fn describe_ids(&self, pid: i32, ids: [[u32; 4]; 2]) {
        if let Some(slot) = self.slot_of(pid) {
            for (at, id) in slot.ids.iter().zip(ids.into_iter().flatten()) {
                at.store(id, Ordering::Relaxed);
            }
        }
    }

    /// Records `ids`' group and session for its pid.
    pub fn update(&self, ids: ProcessIds) {
        for slot in &self.table().slots {
            if slot.pid.load(Ordering::SeqCst) == ids.pid {
                slot.pgid.store(ids.pgid, Ordering::SeqCst);
                slot.sid.store(ids.sid, Ordering::SeqCst);
            }
        }
    }

    fn slot_of(&self, pid: i32) -> Option<&Slot> {
        self.table()
            .slots
            .iter()
            .find(|slot| slot.pid.load(Ordering::SeqCst) == pid)
    }

    /// Records that `pid` stopped on `signal`, for its parent's wait to report.
    pub fn set_stopped(&self, pid: i32, signal: i32) {
        if let Some(slot) = self.slot_of(pid) {
            let signal = u32::try_from(signal).unwrap_or(0) & 0xff;
            slot.job
                .store(JOB_STOPPED | JOB_STOP_UNREPORTED | signal, Ordering::SeqCst);
        }
    }

    /// Records that `pid` continued; a stop not yet reported never will be.
    pub fn set_continued(&self, pid: i32) {
        if let Some(slot) = self.slot_of(pid) {
            slot.job.store(JOB_CONTINUE_UNREPORTED, Ordering::SeqCst);
        }
    }

    /// The signal `pid` stopped on, if its stop is not reported yet; reported now unless
    /// `keep` (WNOWAIT).
    pub fn take_stop(&self, pid: i32, keep: bool) -> Option<i32> {
        let slot = self.slot_of(pid)?;
        let job = if keep {
            slot.job.load(Ordering::SeqCst)
        } else {
            slot.job.fetch_and(!JOB_STOP_UNREPORTED, Ordering::SeqCst)
        };
        (job & JOB_STOP_UNREPORTED != 0).then_some((job & 0xff) as i32)
    }

    /// Whether `pid` continued and that is not reported yet; reported now unless `keep`.
    pub fn take_continued(&self, pid: i32, keep: bool) -> bool {
        let Some(slot) = self.slot_of(pid) else {
            return false;
        };
        let job = if keep {
            slot.job.load(Ordering::SeqCst)
        } else {
            slot.job
                .fetch_and(!JOB_CONTINUE_UNREPORTED, Ordering::SeqCst)
        };
        job & JOB_CONTINUE_UNREPORTED != 0
    }

    /// Records whether `pid` asked for no SIGCHLD when a child stops (SA_NOCLDSTOP).
    pub fn set_no_stop_signal(&self, pid: i32, no_signal: bool) {
        if let Some(slot) = self.slot_of(pid) {
            slot.no_stop_signal
                .store(u32::from(no_signal), Ordering::SeqCst);
        }
    }

    /// Whether `pid` wants SIGCHLD when a child of its stops or continues.
    pub fn wants_stop_signal(&self, pid: i32) -> bool {
        self.slot_of(pid)
            .is_some_and(|slot| slot.no_stop_signal.load(Ordering::SeqCst) == 0)
    }

    /// The live processes of the app.
    pub fn members(&self) -> Vec<Member> {
        self.table()
            .slots
            .iter()
            .filter_map(|slot| {
                let pid = slot.pid.load(Ordering::SeqCst);
                (pid != 0).then(|| {
                    let comm = load_bytes(&slot.comm);
                    let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
                    let mut cmdline = load_bytes(&slot.args);
                    let args_len = slot.args_len.load(Ordering::Acquire) as usize;
                    cmdline.truncate(args_len.min(DESCRIBED_ARGS));
                    Member {
                        pid,
                        host_pid: slot.host_pid.load(Ordering::SeqCst),
                        pgid: slot.pgid.load(Ordering::SeqCst),
                        sid: slot.sid.load(Ordering::SeqCst),
                        ppid: slot.ppid.load(Ordering::Relaxed),
                        comm: String::from_utf8_lossy(&comm[..comm_len]).into_owned(),
                        stopped: slot.job.load(Ordering::SeqCst) & JOB_STOPPED != 0,
                        exe: load_path(&slot.exe, &slot.exe_len),
                        cwd: load_path(&slot.cwd, &slot.cwd_len),
                        cmdline,
                        ended: slot.ended.load(Ordering::SeqCst) != 0,
                        ids: std::array::from_fn(|kind| {
                            std::array::from_fn(|i| slot.ids[kind * 4 + i].load(Ordering::Relaxed))
                        }),
                    }
                })
            })
            .collect()
    }

    /// Process `pid`, if it is one of the app's.
    pub fn find(&self, pid: i32) -> Option<Member> {
        self.members().into_iter().find(|m| m.pid == pid)
    }

    /// What `picocenter ps` lists of the app: its processes, from this table.
    pub fn lister(self: std::sync::Arc<Self>) -> crate::control::ProcessLister {
        Box::new(move || {
            self.members()
                .into_iter()
                .map(|m| crate::control::AppProcess {
                    pid: m.pid,
                    host_pid: m.host_pid,
                    pgid: m.pgid,
                })
                .collect()
        })
    }

    /// Asks process `pid` for its description: the ticket its answer will reach.
    pub fn ask_description(&self, pid: i32) -> Option<u32> {
        let slot = self.slot_of(pid)?;
        Some(
            slot.describe_asked
                .fetch_add(1, Ordering::SeqCst)
                .wrapping_add(1),
        )
    }

    /// The asks process `pid` has to answer now: the ticket to answer them up to.
    pub fn description_asked(&self, pid: i32) -> u32 {
        self.slot_of(pid)
            .map_or(0, |slot| slot.describe_asked.load(Ordering::SeqCst))
    }

    /// Process `pid` has published its description for every ask up to `ticket`.
    pub fn answer_description(&self, pid: i32, ticket: u32) {
        if let Some(slot) = self.slot_of(pid) {
            slot.described.fetch_max(ticket, Ordering::SeqCst);
        }
    }

    /// Whether process `pid` has answered the ask with `ticket`.
    pub fn description_answered(&self, pid: i32, ticket: u32) -> bool {
        self.slot_of(pid)
            .is_some_and(|slot| slot.described.load(Ordering::SeqCst) >= ticket)
    }

    /// The next pid [`AppTree::allocate_pid`] would hand out.
    pub fn next_pid(&self) -> i32 {
        self.table().next_pid.load(Ordering::SeqCst)
    }

    /// Records that `pid`'s VMM has ended: it is a zombie until its parent waits for it.
    pub fn set_ended(&self, pid: i32) {
        if let Some(slot) = self.slot_of(pid) {
            slot.ended.store(1, Ordering::SeqCst);
        }
    }

    /// Announces tree snapshot `id` (an increment of `parent`, if any) to processes
    /// `pids`, whose parts go into `dir`: the generation that names it, or `None` if `dir`
    /// or an id is too long to announce.
    pub fn request_capture(
        &self,
        dir: &str,
        if_idle: bool,
        pids: &[i32],
        id: &str,
        parent: Option<&str>,
    ) -> Option<u32> {
        let board = &self.table().capture;
        let fits = |text: &str, words: &[AtomicU64]| text.len() <= words.len() * 8;
        if dir.is_empty()
            || !fits(dir, &board.dir)
            || id.is_empty()
            || !fits(id, &board.id)
            || !parent.is_none_or(|p| fits(p, &board.parent))
        {
            return None;
        }
        // Only the first process announces, so a load and a store do.
        let generation = (board.generation.load(Ordering::SeqCst) % 0x0fff_ffff) + 1;
        board.generation.store(generation, Ordering::SeqCst);
        store_path(&board.dir, &board.dir_len, dir);
        store_path(&board.id, &board.id_len, id);
        store_path(&board.parent, &board.parent_len, parent.unwrap_or(""));
        board.if_idle.store(u32::from(if_idle), Ordering::SeqCst);
        board.verdict.store(0, Ordering::SeqCst);
        board
            .phase
            .store(generation << 4 | PHASE_PARK, Ordering::SeqCst);
        for &pid in pids {
            if let Some(slot) = self.slot_of(pid) {
                slot.capture.store(
                    generation << 4 | CaptureStatus::Pending as u32,
                    Ordering::SeqCst,
                );
            }
        }
        Some(generation)
    }

    /// The tree snapshot `pid` is asked for its part of, if any.
    pub fn capture_request(&self, pid: i32) -> Option<CaptureRequest> {
        let board = &self.table().capture;
        let generation = board.generation.load(Ordering::SeqCst);
        let slot = self.slot_of(pid)?;
        if slot.capture.load(Ordering::SeqCst) != generation << 4 | CaptureStatus::Pending as u32 {
            return None;
        }
        let request = CaptureRequest {
            generation,
            dir: load_path(&board.dir, &board.dir_len)?,
            if_idle: board.if_idle.load(Ordering::SeqCst) != 0,
            id: load_path(&board.id, &board.id_len)?,
            parent: load_path(&board.parent, &board.parent_len),
        };
        // A newer announcement while the fields were read may have mixed them.
        (board.generation.load(Ordering::SeqCst) == generation).then_some(request)
    }

    /// Records where `pid`'s part of snapshot `generation` stands: from asked to parked,
    /// busy or failed, and from parked to written or failed.
    pub fn report_capture(&self, pid: i32, generation: u32, status: CaptureStatus) {
        let Some(slot) = self.slot_of(pid) else {
            return;
        };
        for from in [CaptureStatus::Pending, CaptureStatus::Parked] {
            if slot
                .capture
                .compare_exchange(
                    generation << 4 | from as u32,
                    generation << 4 | status as u32,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                return;
            }
        }
    }

    /// Where `pid`'s part of snapshot `generation` stands (failed if `pid` is gone or
    /// ended before writing it).
    pub fn capture_status(&self, pid: i32, generation: u32) -> CaptureStatus {
        let Some(slot) = self.slot_of(pid) else {
            return CaptureStatus::Failed;
        };
        let state = slot.capture.load(Ordering::SeqCst);
        if state >> 4 != generation {
            return CaptureStatus::Failed;
        }
        let status = CaptureStatus::from_state(state);
        let waiting = matches!(status, CaptureStatus::Pending | CaptureStatus::Parked);
        if waiting && slot.ended.load(Ordering::SeqCst) != 0 {
            return CaptureStatus::Failed;
        }
        status
    }

    /// Every process asked for snapshot `generation` is parked: each writes its part now.
    pub fn start_writing(&self, generation: u32) {
        self.table()
            .capture
            .phase
            .store(generation << 4 | PHASE_WRITE, Ordering::SeqCst);
    }

    /// For a parked process: `Some(true)` once it may write its part of snapshot
    /// `generation`, `Some(false)` if that snapshot was abandoned or superseded, `None`
    /// while the others still park.
    pub fn may_write(&self, generation: u32) -> Option<bool> {
        let board = &self.table().capture;
        if board.generation.load(Ordering::SeqCst) != generation
            || board.verdict.load(Ordering::SeqCst) >> 4 == generation
        {
            return Some(false);
        }
        let phase = board.phase.load(Ordering::SeqCst);
        (phase == generation << 4 | PHASE_WRITE).then_some(true)
    }

    /// Tells the processes what became of snapshot `generation`.
    pub fn decide_capture(&self, generation: u32, verdict: Verdict) {
        self.table()
            .capture
            .verdict
            .store(generation << 4 | verdict as u32, Ordering::SeqCst);
    }

    /// What became of snapshot `generation`, once decided (abandoned if another one
    /// has been announced since).
    pub fn capture_verdict(&self, generation: u32) -> Option<Verdict> {
        let board = &self.table().capture;
        if board.generation.load(Ordering::SeqCst) != generation {
            return Some(Verdict::Abandoned);
        }
        let verdict = board.verdict.load(Ordering::SeqCst);
        if verdict >> 4 != generation {
            return None;
        }
        Some(Verdict::from_state(verdict))
    }
}

impl Drop for AppTree {
    fn drop(&mut self) {
        // SAFETY: unmaps the table this value mapped; no reference to it outlives `self`.
        unsafe { libc::munmap(self.table.as_ptr().cast(), std::mem::size_of::<Table>()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_unique_and_the_table_is_bounded() {
        let first = ProcessIds::first();
        let tree = AppTree::new(first, 100, 7).unwrap();
        assert_eq!(tree.allocate_pid(), Some(8));
        assert_eq!(tree.allocate_pid(), Some(9));
        assert_eq!(tree.find(first.pid).unwrap().host_pid, 100);
        let mut claimed = 1;
        while let Some(pid) = tree.allocate_pid() {
            if tree.claim(pid).is_none() {
                break;
            }
            claimed += 1;
        }
        assert_eq!(claimed, MAX_PROCESSES);
        tree.release(first.pid);
        assert!(tree.find(first.pid).is_none());
        assert!(tree.claim(1000).is_some());
        tree.update(ProcessIds {
            pid: 1000,
            ppid: 2,
            pgid: 1000,
            sid: 1000,
        });
        assert_eq!(tree.find(1000).unwrap().pgid, 1000);
        let long = vec![b'a'; 300];
        tree.describe(1000, 2, "a-very-long-program-name", &long);
        let long = "/a".repeat(DESCRIBED_PATH);
        tree.describe_paths(1000, &long, "/srv");
        assert_eq!(tree.find(1000).unwrap().exe, None);
        tree.describe_paths(1000, "/usr/bin/prog", "/srv");
        let described = tree.find(1000).unwrap();
        assert_eq!(
            (described.exe.as_deref(), described.cwd.as_deref()),
            (Some("/usr/bin/prog"), Some("/srv"))
        );
        assert_eq!(
            (
                described.ppid,
                described.comm.as_str(),
                described.cmdline.len()
            ),
            (2, "a-very-long-pro", DESCRIBED_ARGS)
        );
    }

    #[test]
    fn a_forked_process_shares_the_table() {
        let tree = AppTree::new(ProcessIds::first(), 1, 2).unwrap();
        // SAFETY: the child only touches atomics in the shared table and _exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let pid = tree.allocate_pid().unwrap_or(0);
            // SAFETY: ends the forked test process at once.
            unsafe { libc::_exit(pid) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 3);
        assert_eq!(tree.allocate_pid(), Some(4));
    }
}

//! The Linux system-call ABI, one file per area, dispatched from one `match`.
//!
//! Two error channels, as in Solo5: a guest mistake becomes `-errno` in RAX
//! ([`SysError::Errno`]); everything the VMM must act on is another [`SysError`] variant
//! that the run loop handles (exit, restart after an interruption, a fatal signal).

pub mod children;
pub mod credentials;
pub mod epoll;
pub mod exec;
pub mod fs;
pub mod mem;
pub mod net;
pub mod netlink;
pub mod poll;
pub mod process;
pub mod procfs;
pub mod pty;
pub mod rights;
pub mod signal;
pub mod table;
pub mod thread;
pub mod time;
pub mod wait;

use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::io::Errno;
use syscalls::Sysno;

/// The outcome of a handler that did not simply return a value to the app.
#[derive(Debug)]
pub enum SysError {
    /// Return `-errno` to the app.
    Errno(Errno),
    /// The app called exit or exit_group with this status.
    Exit(i32),
    /// A kick interrupted a blocking call: rewind the app to re-execute `syscall`.
    Restart,
    /// A signal the app handles arrived during a blocking call: EINTR, or a restart when
    /// the handler has SA_RESTART and the call allows it.
    Interrupted,
    /// The call would block, and it came through the mailbox, where nothing may wait: the
    /// doorbell makes it again with an exit.
    WouldBlock,
    /// The call must wait, and the app has other threads to run meanwhile: the run loop
    /// parks the calling thread at its `syscall` instruction until this is over, then
    /// performs the call again (see [`crate::kernel::thread`]).
    Block(crate::kernel::thread::Wait),
    /// The calling thread ended with this status (exit), and others remain.
    ThreadExit(i32),
    /// sched_yield: let another thread run.
    Yield,
    /// clone for a new thread: the run loop gives it the caller's registers.
    Spawn(Box<thread::Spawn>),
    /// fork, vfork or clone of a new process: the run loop forks the VMM.
    Fork(Box<children::ForkRequest>),
    /// execve loaded a new program: the run loop starts it with fresh registers.
    Exec(Box<crate::loader::StartState>),
    /// The call is a transfer between a regular file and app memory, prepared, that the
    /// run loop makes without the process lock (see `fs::Transfer`); its result is the
    /// call's.
    Transfer(Box<fs::Transfer>),
    /// The app must die of this signal (default action of a fatal signal).
    Kill {
        /// The signal number.
        signal: i32,
        /// What happened, for the report.
        reason: String,
    },
}

impl From<Errno> for SysError {
    fn from(errno: Errno) -> Self {
        SysError::Errno(errno)
    }
}

/// What a handler returns: the value for RAX, or a [`SysError`].
pub type SysResult = Result<u64, SysError>;

/// The six syscall arguments (rdi, rsi, rdx, r10, r8, r9), with typed accessors.
#[derive(Debug, Clone, Copy)]
pub struct Args(pub [u64; 6]);

impl Args {
    /// Argument `i` as an fd (the kernel takes the low 32 bits).
    pub fn fd(&self, i: usize) -> i32 {
        self.0[i] as i32
    }
    /// Argument `i` as a pointer into app memory.
    pub fn ptr(&self, i: usize) -> UserAddr {
        UserAddr(self.0[i])
    }
    /// Argument `i` as a size.
    pub fn usize(&self, i: usize) -> usize {
        self.0[i] as usize
    }
    /// Argument `i` as an int.
    pub fn i32(&self, i: usize) -> i32 {
        self.0[i] as i32
    }
    /// Argument `i` as an unsigned int.
    pub fn u32(&self, i: usize) -> u32 {
        self.0[i] as u32
    }
    /// Argument `i` as a raw 64-bit value.
    pub fn u64(&self, i: usize) -> u64 {
        self.0[i]
    }
}

/// Whether an interrupted call may be restarted after a SA_RESTART handler (Linux's
/// ERESTARTSYS calls); the rest always fail with EINTR. From [`table`].
pub fn restartable(nr: u64) -> bool {
    table::lookup(nr).is_some_and(|e| e.restartable)
}

/// Performs syscall `nr` for the app, timing it when tracing.
pub fn perform(p: &mut Process, nr: u64, a: &Args) -> SysResult {
    let started = p.trace.is_some().then(std::time::Instant::now);
    // A file whose offset the guest keeps has it on the host fd while the call runs.
    let offset_kept = p.windows.before_call(nr, &a.0, &p.mem);
    let result = dispatch(p, nr, a);
    if let Some(fd) = offset_kept {
        p.windows.after_call(fd, &p.mem);
    }
    // The doorbell must never answer for an fd that was closed or now names another file.
    p.windows.reconcile(&p.files, &mut p.mem);
    if let (Some(trace), Some(started)) = (p.trace.as_mut(), started) {
        if !matches!(result, Err(SysError::WouldBlock)) {
            trace.record(
                nr,
                matches!(result, Err(SysError::Errno(_))),
                started.elapsed(),
            );
        }
    }
    result
}

/// Whether a call may be answered through the mailbox, by the poller thread while the app
/// waits in the doorbell (see [`table`]).
pub fn mailbox_allowed(nr: u64) -> bool {
    table::lookup(nr).is_some_and(|e| e.mailbox)
}

/// Logs, once per app, that it used `what`, which is not supported.
pub fn warn_once(p: &mut Process, nr: u64, what: &str) {
    if p.warned.insert(nr) {
        tracing::warn!("unsupported: {what}");
    }
}

/// Performs syscall `nr` for the app: its [`table`] entry's handler, or ENOSYS (logged once
/// by name).
pub fn dispatch(p: &mut Process, nr: u64, a: &Args) -> SysResult {
    if let Some(entry) = table::lookup(nr) {
        let result = (entry.handler)(p, entry.sysno, a);
        // Every call, with RUST_LOG=picocenter_vmm::syscalls=trace (off, it costs a
        // level check).
        tracing::trace!(
            pid = p.ids.pid,
            tid = p.thread.tid,
            "{}({:#x}, {:#x}, {:#x}, {:#x}) = {:?}",
            entry.sysno.name(),
            a.u64(0),
            a.u64(1),
            a.u64(2),
            a.u64(3),
            result
        );
        return result;
    }
    if p.warned.insert(nr) {
        match Sysno::new(nr as usize) {
            Some(sysno) => tracing::warn!(
                "unsupported syscall {} ({nr}): returning ENOSYS",
                sysno.name()
            ),
            None => tracing::warn!("unknown syscall number {nr}: returning ENOSYS"),
        }
    }
    Err(Errno::NOSYS.into())
}

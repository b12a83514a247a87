//! The state the Linux ABI keeps for one app: its memory, files, working directory, signal
//! dispositions, identity and clocks. Syscall handlers take `&mut Process`.

use super::thread::{ThreadState, Threads};
use crate::fdtable::FdTable;
use crate::kernel::clock::Clock;
use crate::kernel::signals::SignalState;
use crate::kvm::kick::Kicker;
use crate::memory::AddressSpace;
use crate::sandbox::Sandbox;
use crate::trace::SyscallTrace;
use std::collections::HashSet;

/// The app's process state.
#[derive(Debug)]
pub struct Process {
    /// Its address space.
    pub mem: AddressSpace,
    /// The current thread's own state (see [`crate::kernel::thread`]).
    pub thread: ThreadState,
    /// Its other threads.
    pub threads: Threads,
    /// Its fds.
    pub files: FdTable,
    /// The files the doorbell reads by itself.
    pub windows: super::windows::FileWindows,
    /// Its file namespace.
    pub sandbox: Sandbox,
    /// Its working directory (absolute, normalised guest path).
    pub cwd: String,
    /// Its file-mode creation mask.
    pub umask: u32,
    /// Its user and group ids.
    pub credentials: super::credentials::Credentials,
    /// Its nice value (-20..=19): what getpriority reports; the host's scheduling of the
    /// VMM is the operator's.
    pub nice: i32,
    /// Signal dispositions and mask.
    pub signals: SignalState,
    /// Its clocks.
    pub clock: Clock,
    /// Interrupts blocking calls.
    pub kicker: Kicker,
    /// The app's name (for logs and `ps`).
    pub name: String,
    /// Per-syscall counts and times, when tracing.
    pub trace: Option<SyscallTrace>,
    /// ITIMER_REAL.
    pub alarm: crate::alarm::Alarm,
    /// The app's address and outbound policy.
    pub net: crate::kernel::netpolicy::NetPolicy,
    /// How the app was started, for snapshots.
    pub app: picocenter_snapshots::format::AppRecord,
    /// Its writable directories: (guest path, host directory).
    pub writable_dirs: Vec<(String, std::path::PathBuf)>,
    /// The key its snapshots are authenticated with, if it may be snapshotted.
    pub snapshot_key: Option<picocenter_snapshots::SnapshotKey>,
    /// The CPU features it may rely on.
    pub cpu: picocenter_snapshots::format::CpuRecord,
    /// The snapshot it was restored from, or last saved to, if the page tables still
    /// track changes since then: (store, snapshot id).
    pub restored_from: Option<(String, String)>,
    /// What the restore it came from prefetched, until its next snapshot records it.
    pub prefetched: Option<picocenter_snapshots::format::PrefetchRecord>,
    /// Connections it has accepted (requests, for metering).
    pub accepted: u64,
    /// The pages it uses, overall and per listening port.
    pub activeset: crate::activeset::ActiveSet,
    /// Who waits for its first request after a streamed restore, until it is served.
    pub first_request: Option<FirstRequest>,
    /// Sockets the caller of a restore handed down (held while the app was swapped out),
    /// taken by the socket records they match.
    pub inherited_sockets: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// The sockets a worker may hold while the app is swapped out.
    pub handoff: std::sync::Arc<crate::control::Handoff>,
    /// Unsupported syscalls already logged (each is logged once).
    pub warned: HashSet<u64>,
    /// Its pid, parent, group and session.
    pub ids: super::tree::ProcessIds,
    /// The children it forked and has not reaped.
    pub children: Vec<super::tree::ChildProcess>,
    /// The table of the app's processes, once the app has forked.
    pub tree: Option<std::sync::Arc<super::tree::AppTree>>,
    /// The pipe that tells every process of the app that the first one ended (see
    /// [`super::tree::RootWatch`]), once the app has forked.
    pub root_watch: Option<super::tree::RootWatch>,
    /// A vfork child's end of the pipe its parent waits on: closed when it calls execve
    /// or ends.
    pub vfork_done: Option<std::os::fd::OwnedFd>,
    /// The program it runs (guest path), for /proc/self/exe.
    pub exe: String,
    /// The path the program was run by, before links were resolved (its comm's source).
    pub run_as: String,
    /// Its /proc as a directory tree, once the app first looks at /proc.
    pub proc_view: Option<super::procview::ProcView>,
    /// Its argv, for /proc/self/cmdline.
    pub cmdline: Vec<String>,
    /// A forked process's parent's host pid (0 for the first process): while the parent
    /// lives, it reaps this process and frees its place in the table.
    pub parent_host_pid: i32,
    /// Whether this process is a fork (its VMM ends with the app's status when it does,
    /// rather than returning to whoever started the first process).
    pub forked: bool,
    /// Stops and continues, its own and its children's.
    pub jobs: super::tree::JobControl,
}

/// Tells the page feed of a streamed restore (see `persist::stream`) when the app has
/// served its first request since: the first connection it accepted is closed. The rest of
/// its memory then streams in without slowing that request down (on two cores, the
/// stream's copying and checking took the app's CPU).
#[derive(Debug)]
pub struct FirstRequest {
    /// An eventfd the feed's thread polls.
    notify: std::os::fd::OwnedFd,
    /// The first connection accepted, once there is one.
    connection: Option<i32>,
}

impl FirstRequest {
    /// Notifies `notify` (an eventfd) when the first request is served.
    pub fn new(notify: std::os::fd::OwnedFd) -> Self {
        Self {
            notify,
            connection: None,
        }
    }

    /// Notes a connection accepted at `fd`.
    pub fn accepted(&mut self, fd: i32) {
        self.connection.get_or_insert(fd);
    }

    /// Notes that `fd` was closed; true (and the feed told) if it was the first
    /// connection.
    fn closed(&self, fd: i32) -> bool {
        if self.connection != Some(fd) {
            return false;
        }
        if let Err(e) = rustix::io::write(&self.notify, &1u64.to_ne_bytes()) {
            tracing::debug!("the page feed was not told of the first request: {e}");
        }
        true
    }
}

impl Process {
    /// Notes that the app closed `fd`: it may end a request episode (see
    /// [`crate::activeset`]) or the first request after a streamed restore.
    pub fn closed(&mut self, fd: i32) {
        self.activeset.closed(fd);
        if self.first_request.as_ref().is_some_and(|f| f.closed(fd)) {
            self.first_request = None;
        }
    }

    /// The deadline of a call with timeout `timeout`: `timeout` from now (saturated, see
    /// [`crate::timeout`]; `None` is no deadline), or, when this call is the re-execution
    /// of one the VMM interrupted, that call's own deadline.
    pub fn deadline_after(&mut self, timeout: std::time::Duration) -> Option<std::time::Instant> {
        if let Some((nr, rip, deadline)) = self.thread.restart {
            if (nr, rip) == self.thread.current_call {
                self.thread.restart = None;
                return Some(deadline);
            }
        }
        crate::timeout::deadline(std::time::Instant::now(), timeout)
    }

    /// Publishes which signals need not interrupt the vCPU when raised (see
    /// [`crate::kvm::kick::Kicker::raise`]), then absorbs any raised meanwhile. Called
    /// before the guest runs and before every blocking wait.
    pub fn quiet_signals(&mut self) {
        // Only a signal every thread blocks need not interrupt the current one.
        let blocked = self.signals.mask & self.threads.common_mask();
        self.kicker.set_quiet(blocked | self.signals.all_pending());
        if self.kicker.pending() & crate::kvm::kick::reason::SIGNAL != 0 {
            self.absorb_external_signals();
        }
    }

    /// Moves signals raised from other threads into the pending set (those the app
    /// ignores are dropped, as `raise` does for any other).
    pub fn absorb_external_signals(&mut self) -> u64 {
        self.kicker.clear(crate::kvm::kick::reason::SIGNAL);
        let mut raised = self.kicker.take_signals();
        let taken = raised;
        if raised & super::signals::bit(libc::SIGCONT) != 0 {
            // A stop not acted on yet is undone.
            self.jobs.stop = None;
        }
        if raised != 0 && self.threads.current_cpu != 0 {
            // Taken from the first vCPU's kicker by another: the first looks at them too.
            self.threads.wake_cpu(0);
        }
        if raised & super::signals::bit(libc::SIGCHLD) != 0 {
            let change = self.kicker.take_child_change();
            // Kept only for a SIGCHLD that will be delivered to a handler.
            if matches!(
                self.signals.disposition(libc::SIGCHLD),
                super::signals::Disposition::Handle(_)
            ) {
                self.jobs.sigchld = change;
            }
            self.reap_unwaited_children();
        }
        while raised != 0 {
            let signal = raised.trailing_zeros() as i32 + 1;
            raised &= raised - 1;
            self.signals.raise(signal);
        }
        taken
    }

    /// Takes a stop signal the current thread could be interrupted by, so that a wait
    /// stops rather than fails: the first vCPU stops the process at its next clean point
    /// (kicked now), and the wait, like one the VMM interrupts, is performed again
    /// afterwards with its own deadline and mask. Returns whether it took one.
    pub fn take_stop_signal(&mut self) -> bool {
        let ready = self.signals.all_pending() & !self.signals.mask & super::signals::STOP_SIGNALS;
        if ready == 0 {
            return false;
        }
        let signal = ready.trailing_zeros() as i32 + 1;
        if self.signals.disposition(signal) != super::signals::Disposition::Stop {
            return false;
        }
        self.signals.clear(signal);
        self.request_stop(signal);
        true
    }

    /// Job control: the process stops on `signal` at the first vCPU's next clean point,
    /// with every thread parked (the run loop's `stay_stopped`); the first vCPU is kicked.
    pub fn request_stop(&mut self, signal: i32) {
        self.jobs.stop = Some(signal);
        self.kicker.kick(crate::kvm::kick::reason::PAUSE);
    }

    /// Tells the app's table whether this process wants SIGCHLD when a child of its stops
    /// or continues (no SA_NOCLDSTOP), which the child looks at.
    pub fn publish_no_stop_signal(&self) {
        if let Some(tree) = &self.tree {
            let flags = self.signals.actions[libc::SIGCHLD as usize - 1].flags;
            tree.set_no_stop_signal(self.ids.pid, flags & super::signals::SA_NOCLDSTOP != 0);
        }
    }

    /// Job control: records in the app's table that this process stopped (on `stopped`)
    /// or continued, wakes its parent's waits, and sends the parent SIGCHLD unless it
    /// asked for none (SA_NOCLDSTOP).
    pub fn report_job_change(&mut self, stopped: Option<i32>) {
        let Some(tree) = self.tree.clone() else {
            return;
        };
        match stopped {
            Some(signal) => tree.set_stopped(self.ids.pid, signal),
            None => tree.set_continued(self.ids.pid),
        }
        self.jobs.notify_parent();
        let parent = tree.find(self.ids.ppid);
        if let Some(parent) = parent.filter(|m| m.host_pid != 0) {
            if tree.wants_stop_signal(parent.pid) {
                let change = match stopped {
                    Some(signal) => (libc::CLD_STOPPED, self.ids.pid, signal),
                    None => (libc::CLD_CONTINUED, self.ids.pid, libc::SIGCONT),
                };
                if let Err(e) = crate::kvm::kick::send_child_change(parent.host_pid, change) {
                    tracing::debug!("SIGCHLD to the parent: {e}");
                }
            }
        }
    }

    /// Makes the thread on vCPU `cpu` the current one, to handle that vCPU's exit; the
    /// first vCPU's thread (the current one until now) goes to `threads.elsewhere`.
    /// Undone by [`Process::leave_cpu`] before the lock is let go.
    pub fn enter_cpu(&mut self, cpu: usize) {
        debug_assert_eq!(self.threads.current_cpu, 0);
        if cpu == 0 {
            return;
        }
        let first = self.take_current();
        let own = self.threads.elsewhere.get_mut(cpu).and_then(Option::take);
        self.put_current(own);
        self.set_elsewhere(0, first);
        self.threads.current_cpu = cpu;
    }

    /// Undoes [`Process::enter_cpu`]: the current thread (if it still runs on vCPU `cpu`)
    /// goes back to `threads.elsewhere`, and the first vCPU's becomes current again.
    pub fn leave_cpu(&mut self, cpu: usize) {
        if cpu == 0 {
            return;
        }
        let own = self.take_current();
        self.set_elsewhere(cpu, own);
        let first = self.threads.elsewhere.get_mut(0).and_then(Option::take);
        self.put_current(first);
        self.threads.current_cpu = 0;
    }

    /// Takes the current thread out of the process state (`None` if no thread is current:
    /// a vCPU whose thread exited or parked).
    fn take_current(&mut self) -> Option<super::thread::Running> {
        let state = std::mem::take(&mut self.thread);
        let signals = super::thread::ThreadSignals {
            mask: self.signals.mask,
            pending: std::mem::take(&mut self.signals.thread_pending),
            altstack: self.signals.altstack,
        };
        (state.tid != 0).then_some(super::thread::Running { state, signals })
    }

    fn put_current(&mut self, running: Option<super::thread::Running>) {
        match running {
            Some(t) => {
                self.thread = t.state;
                self.signals.mask = t.signals.mask;
                self.signals.thread_pending = t.signals.pending;
                self.signals.altstack = t.signals.altstack;
            }
            None => {
                self.thread = Default::default();
                self.signals.thread_pending = 0;
            }
        }
    }

    fn set_elsewhere(&mut self, cpu: usize, running: Option<super::thread::Running>) {
        if self.threads.elsewhere.len() <= cpu {
            self.threads.elsewhere.resize(cpu + 1, None);
        }
        self.threads.elsewhere[cpu] = running;
    }

    /// Notes that thread `running` now runs on vCPU `cpu` (not the current one's).
    pub fn run_elsewhere(&mut self, cpu: usize, running: super::thread::Running) {
        self.set_elsewhere(cpu, Some(running));
    }

    /// A new tid (or pid), unique across the app's processes once it has forked.
    pub fn allocate_tid(&mut self) -> Option<i32> {
        match &self.tree {
            Some(tree) => tree.allocate_pid(),
            None => self.threads.allocate_tid(),
        }
    }

    /// The short name Linux keeps (comm): the file name of the path the program was run
    /// by (busybox's applets run as `/proc/self/exe` show as `exe`), at most 15 bytes.
    pub fn comm(&self) -> String {
        short_name(&self.run_as)
    }

    /// Its command line as /proc/PID/cmdline has it: each argument NUL-terminated.
    pub fn cmdline_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for arg in &self.cmdline {
            bytes.extend(crate::sandbox::pathbytes::to_host(arg).iter());
            bytes.push(0);
        }
        bytes
    }

    /// Tells the app's other processes (their /proc) its parent, name and command line,
    /// once it has a process table (after its first fork).
    pub fn describe_in_tree(&self) {
        if let Some(tree) = &self.tree {
            tree.describe(
                self.ids.pid,
                self.ids.ppid,
                &self.comm(),
                &self.cmdline_bytes(),
            );
            tree.describe_paths(self.ids.pid, &self.exe, &self.cwd);
            self.describe_ids();
        }
    }

    /// Tells the app's process table its user and group ids (after a change).
    pub fn describe_ids(&self) {
        if let Some(tree) = &self.tree {
            let ids = [
                self.credentials.uid.as_array(),
                self.credentials.gid.as_array(),
            ];
            tree.describe_ids(self.ids.pid, ids);
        }
    }

    /// Its process group and session: the table's, which a parent's setpgid changes.
    pub fn group(&self) -> (i32, i32) {
        self.tree
            .as_ref()
            .and_then(|tree| tree.find(self.ids.pid))
            .map_or((self.ids.pgid, self.ids.sid), |m| (m.pgid, m.sid))
    }

    /// Reaps the children that ended when the app asked not to wait for them (SIGCHLD
    /// ignored, or SA_NOCLDWAIT): Linux makes no zombies of those, and a server that
    /// forks per connection must not run out of processes.
    pub fn reap_unwaited_children(&mut self) {
        let action = self.signals.actions[libc::SIGCHLD as usize - 1];
        if action.handler != super::signals::SIG_IGN
            && action.flags & super::signals::SA_NOCLDWAIT == 0
        {
            return;
        }
        let tree = self.tree.clone();
        self.children.retain(|child| {
            let ended = child.ended(false).ok().flatten().is_some();
            if let (true, Some(tree)) = (ended, &tree) {
                tree.release(child.pid);
            }
            !ended
        });
    }

    /// Makes `path` (as the app named it) absolute and normalised against the working
    /// directory.
    pub fn absolute(&self, path: &str) -> String {
        crate::sandbox::normalize(&self.cwd, path)
    }
}

/// The process state, shared by the app's vCPU threads and the VMM's helper threads.
/// A parking_lot mutex, so that a vCPU thread can let go of it while it waits
/// (`MutexGuard::unlocked`, `Condvar::wait`) without giving up its borrow of the guard.
pub type SharedProcess = std::sync::Arc<parking_lot::Mutex<Process>>;

/// The process state, locked.
pub type ProcessGuard<'a> = parking_lot::MutexGuard<'a, Process>;

/// Locks the process state. A lock held by a thread that panicked is released as usual:
/// every handler leaves the state consistent before it can panic, and a panic ends the run
/// anyway (see `crate::panics`).
pub fn lock(process: &parking_lot::Mutex<Process>) -> ProcessGuard<'_> {
    process.lock()
}
/// Linux's comm for a program run by `path`: its file name, cut to 15 bytes.
pub fn short_name(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or("");
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

//! App threads: what each thread owns, and the scheduler that shares the picoprocess's
//! vCPU among them.
//!
//! A thread owns its registers and FPU state, its signal mask, alternate stack and
//! thread-directed signals, its TLS base, its `clear_child_tid` and robust list, and the
//! bookkeeping of the call it is in. Everything else (memory, fds, signal actions,
//! process-directed signals) is the thread group's, in [`crate::kernel::process::Process`].
//!
//! An app has one or more vCPUs, each on a host thread of its own: the first runs the
//! app's first thread and any thread no other vCPU took; each other vCPU runs one thread at
//! a time. Whichever vCPU handles an exit makes its thread the *current* one while it
//! holds the process lock: its [`ThreadState`] is `Process::thread` and its mask and
//! altstack are in `Process::signals`, so handlers written for one thread see the caller's
//! state. The threads on the other vCPUs are [`Running`], in `Threads::elsewhere`. The
//! rest are [`Parked`], each with the CPU context it stopped at; a parked thread may be
//! pinned to the vCPU that waits for it. [`Threads`] picks the next one to run when a
//! vCPU's thread blocks, exits, yields or uses up its time slice.
//!
//! A parked thread always stopped at a clean point: either between two instructions of
//! its own code (preempted), or at its `syscall` instruction with RAX = the call's number
//! (blocked), so that resuming it re-performs the call, which then finds what it waited
//! for, its deadline (kept in `restart`), or the signal that interrupted it.

use kvm_bindings::{kvm_regs, kvm_xsave};
use rustix::event::PollFlags;
use std::os::fd::OwnedFd;
use std::time::Instant;

/// The tid of the first thread: the pid, as on Linux.
pub const MAIN_TID: i32 = crate::kernel::GUEST_PID;
/// Most threads an app may have at once (each parked one holds a 4 KiB FPU image).
pub const MAX_THREADS: usize = 4096;

/// One thread's own state, apart from its CPU registers.
#[derive(Debug, Clone, Default)]
pub struct ThreadState {
    /// Its thread id.
    pub tid: i32,
    /// The FS base it set (its TLS); the run loop writes it to the vCPU when it changes.
    pub fs_base: u64,
    /// Whether `fs_base` changed since the vCPU last saw it.
    pub fs_base_changed: bool,
    /// The address set by set_tid_address or CLONE_CHILD_CLEARTID: zeroed and woken when
    /// the thread exits.
    pub clear_child_tid: u64,
    /// The head of its robust futex list (set_robust_list), 0 if none.
    pub robust_list: u64,
    /// The mask to restore after a handler that interrupted rt_sigsuspend.
    pub saved_mask: Option<u64>,
    /// Whether the call being performed came through the mailbox (it must not block).
    pub in_mailbox: bool,
    /// The call being performed: (number, address of its `syscall` instruction).
    pub current_call: (u64, u64),
    /// A blocking call interrupted for the VMM (not for the app), or parked, keeps its
    /// deadline here, so that re-executing it does not restart its timeout:
    /// (number, address, deadline).
    pub restart: Option<(u64, u64, Instant)>,
    /// The deadline of the wait an operator's kick just interrupted.
    pub interrupted_deadline: Option<Instant>,
    /// A FUTEX_WAKE reached this thread while it waited: its re-performed wait returns 0.
    pub futex_woken: bool,
    /// Its wait on a futex in memory shared with other processes, kept while it is parked
    /// (see [`crate::kernel::shared_futex`]); dropping it cancels the wait.
    pub shared_futex: Option<std::sync::Arc<crate::kernel::shared_futex::SharedFutexWait>>,
}

impl ThreadState {
    /// The state of a new thread `tid`.
    pub fn new(tid: i32) -> Self {
        Self {
            tid,
            ..Default::default()
        }
    }
}

/// The signal state that belongs to a thread but lives in `Process::signals` while it is
/// current.
#[derive(Debug, Clone, Copy)]
pub struct ThreadSignals {
    /// Blocked signals.
    pub mask: u64,
    /// Signals sent to this thread (tgkill), not yet delivered.
    pub pending: u64,
    /// The alternate signal stack: (sp, flags, size).
    pub altstack: (u64, i32, u64),
}

/// The CPU state of a thread that is not on the vCPU.
pub struct CpuContext {
    /// The general registers.
    pub regs: kvm_regs,
    /// The FPU/SSE/AVX state.
    pub xsave: Box<kvm_xsave>,
}

impl std::fmt::Debug for CpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuContext")
            .field("rip", &self.regs.rip)
            .field("rsp", &self.regs.rsp)
            .finish_non_exhaustive()
    }
}

/// What a parked thread waits for.
#[derive(Debug, Default)]
pub enum Wait {
    /// Nothing: it may run.
    #[default]
    Runnable,
    /// One of these host fds to become ready, or the deadline.
    Io {
        /// Duplicates of the fds the call waits on, with the events (shared, so that the
        /// vCPU a thread is pinned to can poll them without the process lock).
        fds: Vec<(std::sync::Arc<OwnedFd>, PollFlags)>,
        /// When the call times out.
        deadline: Option<Instant>,
    },
    /// A FUTEX_WAKE on `addr` with a bit of `bitset`, or the deadline.
    Futex {
        /// The futex word's guest-virtual address.
        addr: u64,
        /// The waiter's bitset (all ones for FUTEX_WAIT).
        bitset: u32,
        /// When the wait times out.
        deadline: Option<Instant>,
    },
}

impl Wait {
    /// When the wait ends by itself, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Wait::Runnable => None,
            Wait::Io { deadline, .. } | Wait::Futex { deadline, .. } => *deadline,
        }
    }
}

/// A thread that is not on the vCPU.
#[derive(Debug)]
pub struct Parked {
    /// Its own state.
    pub state: ThreadState,
    /// Its signal mask, pending signals and altstack.
    pub signals: ThreadSignals,
    /// Its registers and FPU state.
    pub cpu: CpuContext,
    /// What it waits for.
    pub wait: Wait,
    /// Whether it stopped in a call (at its `syscall` instruction), which it performs
    /// again when it runs; else it resumes its own code.
    pub in_call: bool,
    /// The vCPU it must run on (the one that waits for it), or `None` for any.
    pub pinned_to: Option<usize>,
}

/// A thread running on a vCPU other than the one whose exit is being handled.
#[derive(Debug, Clone)]
pub struct Running {
    /// Its own state.
    pub state: ThreadState,
    /// Its signal mask, pending signals and altstack.
    pub signals: ThreadSignals,
}

/// What the other vCPUs need of one vCPU: how to interrupt it (or wake it when it waits
/// for a thread), and whether its guest is running.
#[derive(Debug, Clone)]
pub struct CpuSlot {
    /// Interrupts its host thread.
    pub kicker: crate::kvm::kick::Kicker,
    /// Set while its guest may run (set with the process lock held, cleared as soon as
    /// `KVM_RUN` returns): a vCPU that changes translations waits until no other one is.
    pub in_guest: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Whether it waits for a thread to run.
    pub idle: bool,
}

/// The threads of an app other than the current one, in the order they run next.
#[derive(Debug, Default)]
pub struct Threads {
    /// Parked threads, the next to run first.
    pub parked: std::collections::VecDeque<Parked>,
    last_tid: i32,
    /// Preempts the current thread while others are runnable; started with the second
    /// thread.
    pub slicer: Option<TimeSlicer>,
    /// The threads on other vCPUs than the current one's, by vCPU number.
    pub elsewhere: Vec<Option<Running>>,
    /// The app's vCPUs, by number (`None` before the run loop registers the first, and
    /// for numbers no vCPU has).
    pub cpus: Vec<Option<CpuSlot>>,
    /// The vCPU whose exit is being handled (its thread is the current one).
    pub current_cpu: usize,
    /// Set while the first vCPU needs every thread parked (a snapshot, an exec, a fork):
    /// the other vCPUs park their threads and take none.
    pub hold: bool,
    /// Transfers with files running without the process lock now (see
    /// `syscalls::fs::Transfer`): a thread in one parks only once it is over, however long
    /// a slow disk makes it.
    pub transfers: u32,
}

/// How long a thread runs while others wait to, as Linux's CFS gives a few milliseconds.
pub const TIME_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// A host thread that kicks the vCPU every [`TIME_SLICE`] while a thread runs and others
/// are parked, so that a thread that never makes a call cannot starve the others: at each
/// tick the run loop looks at the parked threads' fds and deadlines, and switches if one
/// may run. It sleeps (parked, no timer) while every thread waits, so that an idle
/// threaded app costs no CPU.
#[derive(Debug)]
pub struct TimeSlicer {
    contended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TimeSlicer {
    /// Starts the slicer for the vCPU `kicker` interrupts.
    pub fn start(kicker: crate::kvm::kick::Kicker) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let contended = std::sync::Arc::new(AtomicBool::new(false));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (c, s) = (contended.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("picocenter-slice".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    if c.load(Ordering::SeqCst) {
                        std::thread::sleep(TIME_SLICE);
                        if c.load(Ordering::SeqCst) && !s.load(Ordering::SeqCst) {
                            kicker.kick(crate::kvm::kick::reason::PREEMPT);
                        }
                    } else {
                        std::thread::park();
                    }
                }
            })?;
        Ok(Self {
            contended,
            stop,
            thread: Some(thread),
        })
    }

    /// Says whether a thread runs while others are parked.
    pub fn set_contended(&self, contended: bool) {
        use std::sync::atomic::Ordering;
        if self.contended.swap(contended, Ordering::SeqCst) != contended && contended {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }
}

impl Drop for TimeSlicer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Threads {
    /// The signals every other thread blocks.
    pub fn common_mask(&self) -> u64 {
        let parked = self.parked.iter().map(|t| t.signals.mask);
        let running = self.elsewhere.iter().flatten().map(|t| t.signals.mask);
        parked.chain(running).fold(!0, |mask, m| mask & m)
    }

    /// Whether the app has more than its current thread.
    pub fn any(&self) -> bool {
        !self.parked.is_empty() || self.elsewhere.iter().any(Option::is_some)
    }

    /// Whether a call that must wait parks its thread (and the vCPU goes on without the
    /// process lock) rather than waiting in place: when other threads exist, and always on
    /// a vCPU other than the first.
    pub fn waits_park(&self) -> bool {
        self.any() || self.current_cpu != 0
    }

    /// All threads, the current one included.
    pub fn count(&self) -> usize {
        self.parked.len() + self.elsewhere.iter().flatten().count() + 1
    }

    /// The tids of the threads other than the current one.
    pub fn other_tids(&self) -> Vec<i32> {
        self.parked
            .iter()
            .map(|t| t.state.tid)
            .chain(self.elsewhere.iter().flatten().map(|t| t.state.tid))
            .collect()
    }

    /// The thread `tid` if it runs on another vCPU: its state and that vCPU's number.
    pub fn running_mut(&mut self, tid: i32) -> Option<(&mut Running, usize)> {
        self.elsewhere
            .iter_mut()
            .enumerate()
            .find_map(|(cpu, t)| t.as_mut().filter(|t| t.state.tid == tid).map(|t| (t, cpu)))
    }

    /// Interrupts vCPU `cpu` so that it looks at its thread or the parked ones again.
    pub fn wake_cpu(&self, cpu: usize) {
        if let Some(Some(slot)) = self.cpus.get(cpu) {
            slot.kicker.kick(crate::kvm::kick::reason::PREEMPT);
        }
    }

    /// Wakes whichever vCPU should take a thread made runnable: the one it is pinned to,
    /// or for an unpinned thread an idle one, else the first (which switches to it, or
    /// stops waiting for one).
    pub fn wake_for_runnable(&self) {
        let mut unpinned = false;
        for t in self
            .parked
            .iter()
            .filter(|t| matches!(t.wait, Wait::Runnable))
        {
            match t.pinned_to {
                Some(cpu) if cpu != self.current_cpu => self.wake_cpu(cpu),
                Some(_) => {}
                None => unpinned = true,
            }
        }
        if unpinned {
            // An idle first vCPU takes unpinned threads (the others leave them to it),
            // even when a call made for it elsewhere (by the mailbox poller) made one
            // runnable.
            if self.first_cpu_idle() {
                self.wake_cpu(0);
                return;
            }
            let idle = self.cpus.iter().enumerate().find(|(cpu, slot)| {
                *cpu != self.current_cpu
                    && slot.as_ref().is_some_and(|s| s.idle)
                    && !self.waits_for(*cpu)
            });
            match idle {
                Some((cpu, _)) => self.wake_cpu(cpu),
                None if self.current_cpu != 0 => self.wake_cpu(0),
                None => {}
            }
        }
    }

    /// A tid for a new thread: above every tid given so far, never reused while its
    /// owner may still be named by the app.
    pub fn allocate_tid(&mut self) -> Option<i32> {
        if self.count() >= MAX_THREADS {
            return None;
        }
        self.last_tid = self.last_tid.max(MAIN_TID).checked_add(1)?;
        Some(self.last_tid)
    }

    /// The highest tid handed out so far.
    pub fn highest_tid(&self) -> i32 {
        self.last_tid.max(MAIN_TID)
    }

    /// Notes that `tid` is in use (a restored thread), so that no new thread gets it.
    pub fn note_tid(&mut self, tid: i32) {
        self.last_tid = self.last_tid.max(tid);
    }

    /// Whether some parked thread may run now on the first vCPU.
    pub fn runnable(&self) -> bool {
        self.parked
            .iter()
            .any(|t| matches!(t.wait, Wait::Runnable) && t.pinned_to.is_none_or(|c| c == 0))
    }

    /// Takes the next runnable thread for the first vCPU, if any.
    pub fn take_runnable(&mut self) -> Option<Parked> {
        self.take_runnable_for(0)
    }

    /// Takes the next runnable thread vCPU `cpu` may run: one pinned to it first, else
    /// one pinned to none. On a vCPU other than the first, an unpinned thread only if none
    /// waits for this vCPU (it would not see its own thread's wait end while it ran
    /// another), and only while the first vCPU is busy: an idle first vCPU takes its own
    /// threads back. Taken here, the thread would stay pinned to this vCPU, and the next
    /// thread it makes would have to share a vCPU with it while the first one idles.
    pub fn take_runnable_for(&mut self, cpu: usize) -> Option<Parked> {
        let runnable = |t: &Parked| matches!(t.wait, Wait::Runnable);
        let at = self
            .parked
            .iter()
            .position(|t| runnable(t) && t.pinned_to == Some(cpu))
            .or_else(|| {
                if cpu != 0 && (self.waits_for(cpu) || self.first_cpu_idle()) {
                    return None;
                }
                self.parked
                    .iter()
                    .position(|t| runnable(t) && t.pinned_to.is_none())
            })?;
        self.parked.remove(at)
    }

    /// The parked threads in one line, for logs: tid, the vCPU pinned to, what it waits
    /// for.
    pub fn describe_parked(&self) -> String {
        let now = Instant::now();
        let wait = |w: &Wait| match w {
            Wait::Runnable => "runnable".to_string(),
            Wait::Io { fds, deadline } => format!(
                "io({} fds, {:?} ms)",
                fds.len(),
                deadline.map(|d| d.saturating_duration_since(now).as_millis())
            ),
            Wait::Futex { addr, deadline, .. } => format!(
                "futex({addr:#x}, {:?} ms)",
                deadline.map(|d| d.saturating_duration_since(now).as_millis())
            ),
        };
        self.parked
            .iter()
            .map(|t| format!("{}@{:?}:{}", t.state.tid, t.pinned_to, wait(&t.wait)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the first vCPU waits for a thread to run (it takes every unpinned one).
    pub fn first_cpu_idle(&self) -> bool {
        self.cpus
            .first()
            .and_then(Option::as_ref)
            .is_some_and(|s| s.idle)
    }

    /// Notes whether the first vCPU waits for a thread to run.
    pub fn set_first_cpu_idle(&mut self, idle: bool) {
        if let Some(Some(slot)) = self.cpus.first_mut() {
            slot.idle = idle;
        }
    }

    /// Whether a parked thread is pinned to vCPU `cpu`.
    pub fn waits_for(&self, cpu: usize) -> bool {
        self.parked.iter().any(|t| t.pinned_to == Some(cpu))
    }

    /// Makes runnable every waiter whose deadline has passed.
    pub fn expire(&mut self, now: Instant) {
        for t in &mut self.parked {
            if t.wait.deadline().is_some_and(|d| now >= d) {
                t.wait = Wait::Runnable;
            }
        }
    }

    /// Wakes up to `count` threads waiting on the futex at `addr` whose bitset meets
    /// `bitset`; returns how many.
    pub fn futex_wake(&mut self, addr: u64, bitset: u32, count: u32) -> u32 {
        let mut woken = 0;
        for t in &mut self.parked {
            if woken >= count {
                break;
            }
            if matches!(t.wait, Wait::Futex { addr: a, bitset: b, .. } if a == addr && b & bitset != 0)
            {
                t.wait = Wait::Runnable;
                t.state.futex_woken = true;
                woken += 1;
            }
        }
        if woken > 0 {
            self.wake_for_runnable();
        }
        woken
    }

    /// Moves up to `count` waiters of the futex at `from` to wait on `to` instead;
    /// returns how many.
    pub fn futex_requeue(&mut self, from: u64, to: u64, count: u32) -> u32 {
        let mut moved = 0;
        for t in &mut self.parked {
            if moved >= count {
                break;
            }
            if let Wait::Futex { addr, .. } = &mut t.wait {
                if *addr == from {
                    *addr = to;
                    moved += 1;
                }
            }
        }
        moved
    }

    /// The parked thread `tid`.
    pub fn get_mut(&mut self, tid: i32) -> Option<&mut Parked> {
        self.parked.iter_mut().find(|t| t.state.tid == tid)
    }

    /// Makes a parked thread that can take a signal in `signals` (not blocked by its mask)
    /// runnable, so that its interrupted call sees it. Returns whether one could; if none
    /// could, the other vCPUs whose threads can take it are interrupted instead.
    pub fn interrupt_one(&mut self, signals: u64) -> bool {
        match self
            .parked
            .iter_mut()
            .find(|t| t.signals.pending & !t.signals.mask != 0 || signals & !t.signals.mask != 0)
        {
            Some(t) => {
                t.wait = Wait::Runnable;
                self.wake_for_runnable();
                true
            }
            None => {
                // A thread on another vCPU that can take one looks at it at its next
                // entry into the guest.
                let cpus: Vec<usize> = self
                    .elsewhere
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| {
                        t.as_ref().is_some_and(|t| {
                            t.signals.pending & !t.signals.mask != 0
                                || signals & !t.signals.mask != 0
                        })
                    })
                    .map(|(cpu, _)| cpu)
                    .collect();
                for cpu in cpus {
                    self.wake_cpu(cpu);
                }
                false
            }
        }
    }

    /// Makes runnable the parked threads whose fds are ready or deadlines passed, without
    /// waiting (while another thread runs). Returns whether some thread is runnable.
    pub fn poll_waits(&mut self, wake: std::os::fd::BorrowedFd<'_>) -> rustix::io::Result<bool> {
        self.expire(Instant::now());
        let waits = self.waits_of(0);
        let ready = waits.poll(wake, Some(Instant::now()))?;
        self.mark_ready(&ready);
        Ok(self.runnable())
    }

    /// What vCPU `cpu` waits for when it has no thread to run: the fds and deadlines of
    /// the parked threads it watches (those pinned to it, and for the first vCPU the
    /// unpinned ones too).
    pub fn waits_of(&self, cpu: usize) -> WaitSet {
        let watched = |t: &&Parked| match t.pinned_to {
            Some(c) => c == cpu,
            None => cpu == 0,
        };
        let mut set = WaitSet::default();
        for t in self.parked.iter().filter(watched) {
            if let Wait::Io { fds, .. } = &t.wait {
                for (fd, events) in fds {
                    set.fds.push((t.state.tid, fd.clone(), *events));
                }
            }
            if let Some(d) = t.wait.deadline() {
                set.deadline = Some(set.deadline.map_or(d, |e: Instant| e.min(d)));
            }
        }
        set
    }

    /// Makes runnable the parked threads `ready` names (by tid) and those whose deadline
    /// passed; wakes the vCPUs that should run them.
    pub fn mark_ready(&mut self, ready: &[i32]) {
        for t in &mut self.parked {
            if ready.contains(&t.state.tid) {
                t.wait = Wait::Runnable;
            }
        }
        self.expire(Instant::now());
        self.wake_for_runnable();
    }
}

/// Copies of what some parked threads wait for, to wait on without the process lock.
#[derive(Debug, Default)]
pub struct WaitSet {
    /// (tid, fd, events).
    fds: Vec<(i32, std::sync::Arc<OwnedFd>, PollFlags)>,
    /// The earliest deadline.
    deadline: Option<Instant>,
}

impl WaitSet {
    /// Waits until one of the fds is ready, the earliest deadline or `until` passes, or
    /// `wake` (a kicker's eventfd) is signalled; returns the tids whose fds are ready.
    pub fn poll(
        &self,
        wake: std::os::fd::BorrowedFd<'_>,
        until: Option<Instant>,
    ) -> rustix::io::Result<Vec<i32>> {
        use rustix::event::PollFd;
        let now = Instant::now();
        let deadline = match (self.deadline, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut polled = vec![PollFd::new(&wake, PollFlags::IN)];
        for (_, fd, events) in &self.fds {
            polled.push(PollFd::new(&**fd, *events));
        }
        let timeout = deadline.map(|d| {
            rustix::time::Timespec::try_from(d.saturating_duration_since(now)).unwrap_or(
                rustix::time::Timespec {
                    tv_sec: i64::MAX,
                    tv_nsec: 0,
                },
            )
        });
        match rustix::event::poll(&mut polled, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
        Ok(polled[1..]
            .iter()
            .zip(&self.fds)
            .filter(|(fd, _)| !fd.revents().is_empty())
            .map(|(_, (tid, _, _))| *tid)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(tid: i32, wait: Wait) -> Parked {
        Parked {
            state: ThreadState::new(tid),
            signals: ThreadSignals {
                mask: 0,
                pending: 0,
                altstack: (0, libc::SS_DISABLE, 0),
            },
            cpu: CpuContext {
                regs: kvm_regs::default(),
                xsave: Box::default(),
            },
            wait,
            in_call: true,
            pinned_to: None,
        }
    }

    #[test]
    fn futex_wakes_match_address_and_bitset_and_count() {
        let mut threads = Threads::default();
        let futex = |addr, bitset| Wait::Futex {
            addr,
            bitset,
            deadline: None,
        };
        threads.parked.push_back(parked(3, futex(0x1000, !0)));
        threads.parked.push_back(parked(4, futex(0x1000, 0b10)));
        threads.parked.push_back(parked(5, futex(0x2000, !0)));
        assert_eq!(threads.futex_wake(0x1000, 0b01, 10), 1);
        assert!(threads.get_mut(3).unwrap().state.futex_woken);
        assert_eq!(threads.futex_requeue(0x1000, 0x2000, 1), 1);
        assert_eq!(threads.futex_wake(0x2000, !0, 1), 1);
        assert_eq!(threads.take_runnable().unwrap().state.tid, 3);
        assert_eq!(threads.take_runnable().unwrap().state.tid, 4);
        assert!(threads.take_runnable().is_none());
    }

    #[test]
    fn deadlines_make_waiters_runnable() {
        let mut threads = Threads::default();
        let soon = Instant::now() + std::time::Duration::from_millis(5);
        threads.parked.push_back(parked(
            3,
            Wait::Futex {
                addr: 8,
                bitset: !0,
                deadline: Some(soon),
            },
        ));
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        use std::os::fd::AsFd;
        let ready = threads.waits_of(0).poll(wake.as_fd(), None).unwrap();
        threads.mark_ready(&ready);
        assert!(threads.runnable());
        assert!(Instant::now() >= soon);
    }

    #[test]
    fn a_second_vcpu_leaves_the_first_one_s_threads_to_it_while_it_idles() {
        let mut threads = Threads::default();
        let slot = || {
            Some(CpuSlot {
                kicker: crate::kvm::kick::Kicker::for_current_thread().unwrap(),
                in_guest: Default::default(),
                idle: false,
            })
        };
        threads.cpus = vec![slot(), slot()];
        threads.parked.push_back(parked(3, Wait::Runnable));
        threads.set_first_cpu_idle(true);
        assert!(threads.take_runnable_for(1).is_none());
        threads.set_first_cpu_idle(false);
        assert_eq!(threads.take_runnable_for(1).unwrap().state.tid, 3);
    }

    #[test]
    fn tids_grow_and_are_bounded() {
        let mut threads = Threads::default();
        assert_eq!(threads.allocate_tid(), Some(MAIN_TID + 1));
        assert_eq!(threads.allocate_tid(), Some(MAIN_TID + 2));
    }
}

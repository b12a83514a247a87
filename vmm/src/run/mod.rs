//! The run loop: run the vCPU, decode the exit, dispatch it, resume; and schedule the
//! app's threads on it.
//!
//! [`sigframe`] builds signal frames on the app's stack and takes them back
//! (rt_sigreturn). The machinery it drives is beside it: [`crate::doorbell`] (bringing an
//! app stopped inside the doorbell to a clean point) and [`crate::mailbox`] (the poller
//! thread that answers syscalls with no exit).
//!
//! Three kinds of exit matter: the doorbell (a syscall), an exception stub (a fault, which
//! may be a demand page fault to serve), and a kick (a timeout or an operator's request).

pub mod cpus;
pub mod fork;
pub mod sigframe;

use crate::control::{LiveStats, PendingOp, PendingOps};
use crate::doorbell::{Recovery, Settled};
use crate::kernel::process::{lock, ProcessGuard};
use crate::kernel::signals::{bit, Disposition, SA_RESTART};
use crate::kernel::thread::{CpuContext, Parked, ThreadSignals, Wait};
use crate::kvm::kick::{reason, Kicker};
use crate::kvm::system::{cpu_local_address, kernel_stack_top};
use crate::kvm::vcpu::Exit;
use crate::kvm::vcpu::Vcpu;
use crate::kvm::Machine;
use crate::mailbox::Poller;
use crate::memory::layout::cpu_local_gpa;
use crate::memory::space::Access;
use crate::memory::FaultResolution;
use crate::platform::Invalidation;
use crate::syscalls::{self, Args, SysError};
use crate::{Picoprocess, VmmError};
use picocenter_guest_shim::abi;
use sigframe::{DeliveryError, SigInfo};
use std::sync::atomic::Ordering;

/// How an app's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// It called exit or exit_group with this status.
    Exited(i32),
    /// It was killed by a signal, with a one-line report of why.
    Killed {
        /// The signal.
        signal: i32,
        /// What happened.
        report: String,
    },
    /// The run's time limit passed.
    TimedOut,
    /// It was snapshotted and stopped; it lives on in the snapshot with this id.
    Snapshotted(String),
}

impl RunOutcome {
    /// The exit status a shell would show: the status, 128 + signal, or 124 for a timeout
    /// (as `timeout(1)`).
    pub fn exit_status(&self) -> i32 {
        match self {
            RunOutcome::Exited(code) => *code,
            RunOutcome::Killed { signal, .. } => 128 + signal,
            RunOutcome::TimedOut => 124,
            RunOutcome::Snapshotted(_) => 0,
        }
    }
}

/// Counters of the run loop.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExitStats {
    /// Syscalls forwarded through the doorbell.
    pub syscalls: u64,
    /// Exception exits.
    pub exceptions: u64,
    /// Calibration exits.
    pub calibration: u64,
    /// Kicks.
    pub interruptions: u64,
    /// Notification exits (the doorbell asking the VMM to act after a mailbox call).
    pub notifications: u64,
    /// Stops inside the doorbell brought to a clean point by rewinding the call.
    pub rewound_in_doorbell: u64,
    /// Stops inside the doorbell brought to a clean point by completing the call.
    pub completed_in_doorbell: u64,
    /// Page-table entries invalidated one by one (kvm_pvm's PTE writer).
    pub entries_rewritten: u64,
    /// Invalidations of every translation.
    pub full_invalidations: u64,
    /// When this vCPU's last syscall exit came (the mailbox poller's idle window follows
    /// the time between two).
    pub last_syscall_exit: Option<std::time::Instant>,
}

/// An exception frame as the CPU pushed it on the ring-0 stack.
#[derive(Debug, Clone, Copy)]
struct Frame {
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
}

fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        _ => "exception",
    }
}

/// A signal's name, for reports.
pub fn signal_name(signal: i32) -> String {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    match NAMES.get((signal - 1) as usize) {
        Some(name) if signal >= 1 => name.to_string(),
        _ => format!("signal {signal}"),
    }
}

/// The signal Linux would send for an exception in user mode.
fn signal_for(vector: u8) -> i32 {
    match vector {
        0 | 16 | 19 => libc::SIGFPE,
        1 | 3 => libc::SIGTRAP,
        6 => libc::SIGILL,
        17 => libc::SIGBUS,
        _ => libc::SIGSEGV,
    }
}

impl Picoprocess {
    /// Runs the app until it exits, dies, or its time limit passes. Must be called on the
    /// thread that built the picoprocess.
    /// A panic on any of its threads ends the run with [`VmmError::Panicked`] (see
    /// [`crate::panics`]).
    pub fn run(&mut self) -> Result<RunOutcome, VmmError> {
        crate::panics::install();
        let _watch = crate::panics::watch(self.kicker());
        crate::heap::give_back_free_heap();
        crate::heap::give_back_unused_stack();
        self.live.add_current_app_thread();
        if let Some(control) = &self.control {
            // Connections that waited while the app was being built are served at once,
            // even if the app never exits by itself (the kick is pending until the first
            // exit, which it makes happen once armed).
            control
                .kick_on_connections()
                .map_err(|source| VmmError::Host {
                    what: "the control socket's signal",
                    source,
                })?;
        }
        Kicker::arm(self.vcpu.immediate_exit_ptr());
        {
            // The app may have a vCPU for each of the CPUs it is shown.
            let mut p = lock(&self.process);
            self.cpus = std::sync::Arc::new(cpus::CpuShared::new(p.sandbox.cpus()));
            self.cpus.register_first(&mut p);
        }
        // The state a panic leaves is only dropped afterwards, never used again.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        Kicker::arm(std::ptr::null_mut());
        self.cpus.stop_all(&self.process);
        // What other processes of the app read of this one in /proc goes with it.
        crate::kernel::procview::forget_description();
        let forked = {
            let mut p = lock(&self.process);
            if p.forked {
                // Other processes of the app may wait on its process-shared locks.
                syscalls::thread::release_robust_lists_at_exit(&mut p);
            }
            let orphan = std::os::unix::process::parent_id() as i32 != p.parent_host_pid;
            if let (true, Some(tree)) = (p.forked, &p.tree) {
                // An orphan has no parent to reap it and free its place; a child whose
                // parent lives keeps its place until it is waited for, as a zombie counts
                // against RLIMIT_NPROC (and keeps a tree snapshot from being taken).
                if orphan {
                    tree.release(p.ids.pid);
                } else {
                    tree.set_ended(p.ids.pid);
                }
            }
            p.forked
        };
        if forked {
            let outcome = match (crate::panics::take_report(), outcome) {
                (Some(report), _) => Err(VmmError::Panicked(report)),
                (None, Ok(outcome)) => outcome,
                (None, Err(_)) => Err(VmmError::Panicked("the vCPU thread panicked".into())),
            };
            fork::exit_as_forked_process(&outcome);
        }
        if let Some(poller) = &self.poller {
            poller.stop();
        }
        match (crate::panics::take_report(), outcome) {
            (Some(report), _) => Err(VmmError::Panicked(report)),
            (None, Ok(outcome)) => outcome,
            (None, Err(_)) => Err(VmmError::Panicked("the vCPU thread panicked".into())),
        }
    }

    /// Brings the app to a clean point if the vCPU stopped inside the doorbell (see
    /// [`crate::doorbell`]). Called without the process lock: the poller may need it to
    /// finish a call the app is waiting for.
    fn settle(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        match self
            .doorbell
            .settle(&mut self.vcpu, self.poller.as_deref())?
        {
            Settled::Outside | Settled::Faulting => {}
            Settled::Recovered(Recovery::Rewind(_)) => self.stats.rewound_in_doorbell += 1,
            Settled::Recovered(Recovery::Complete(_)) => self.stats.completed_in_doorbell += 1,
            Settled::Stray(report) => {
                return Ok(Some(RunOutcome::Killed {
                    signal: libc::SIGSEGV,
                    report,
                }))
            }
        }
        Ok(None)
    }

    /// The exit-handling context over this picoprocess, with the process state locked.
    fn exits<'a, 'g>(&'a mut self, p: &'a mut ProcessGuard<'g>) -> Exits<'a, 'g> {
        Exits {
            vcpu: &mut self.vcpu,
            machine: &mut self.machine,
            p,
            stats: &mut self.stats,
            live: &mut self.live,
            ops: &self.ops,
            poller: &mut self.poller,
            control: &mut self.control,
            process: &self.process,
            cpu: 0,
            cpus: &mut self.cpus,
            seen_invalidations: &mut self.seen_invalidations,
            thread_left: false,
        }
    }

    fn run_loop(&mut self) -> Result<RunOutcome, VmmError> {
        let mut last_fault = (0u64, 0u64, 0u32);
        let process = self.process.clone();
        loop {
            // Whatever stopped the vCPU, the app's context is its own from here on: the
            // kicks, signals and snapshots below may look at it.
            if let Some(outcome) = self.settle()? {
                return Ok(outcome);
            }
            {
                // The process state is locked whenever the guest is not running, so that a
                // mailbox poller only touches it while the guest waits for an answer.
                let mut p = lock(&process);
                if let Some(outcome) = self.exits(&mut p).before_entry()? {
                    return Ok(outcome);
                }
                // Set with the lock held: a vCPU that changes translations holds it and
                // waits until no other guest runs.
                self.cpus.first_in_guest.store(true, Ordering::SeqCst);
            }
            let exit = self.vcpu.run();
            self.cpus.first_in_guest.store(false, Ordering::SeqCst);
            if matches!(exit, Exit::Interrupted) {
                crate::doorbell::restart_in_vdso(&mut self.vcpu)?;
            }
            let mut p = lock(&process);
            if let Some(outcome) = self.exits(&mut p).on_exit(exit, &mut last_fault)? {
                return Ok(outcome);
            }
        }
    }
}

impl Exits<'_, '_> {
    /// Handles one exit of the vCPU.
    fn on_exit(
        &mut self,
        exit: Exit,
        last_fault: &mut (u64, u64, u32),
    ) -> Result<Option<RunOutcome>, VmmError> {
        let x = self;
        let outcome = match exit {
            Exit::Syscall => {
                // The app made progress: a fault at the same place from here on is a
                // new one (an app that maps, touches and unmaps a buffer in a loop
                // faults at the same instruction and address every time).
                *last_fault = (0, 0, 0);
                x.on_syscall()?
            }
            Exit::Calibration => {
                x.stats.calibration += 1;
                None
            }
            Exit::Notify => {
                x.stats.notifications += 1;
                None
            }
            Exit::Exception(vector) => x.on_exception(vector, last_fault)?,
            Exit::Interrupted => {
                x.stats.interruptions += 1;
                x.vcpu.clear_immediate_exit();
                None
            }
            Exit::StrayDoorbellStore { rip } => Some(RunOutcome::Killed {
                signal: libc::SIGSEGV,
                report: format!("store to the syscall doorbell from rip={rip:#x}"),
            }),
            Exit::PteWriterDone => Some(RunOutcome::Killed {
                signal: libc::SIGKILL,
                report: "the page-table writer ran outside an invalidation".into(),
            }),
            // A host page behind guest memory is gone: a file mapped from the root
            // shrank on the host, or the app shrank a file it maps shared (Linux's
            // SIGBUS, which ends it here, handler or not). If it was a file window's, the windows go and the
            // reads they answered are the VMM's again; otherwise the app cannot go on.
            Exit::HostFault if x.p.windows.any() => {
                tracing::warn!(
                    "guest memory the host could not provide (a file of the root \
                         changed on the host?): the file windows are taken down"
                );
                let p: &mut crate::kernel::process::Process = x.p;
                p.windows.take_down_all(&mut p.mem);
                None
            }
            Exit::HostFault => Some(RunOutcome::Killed {
                signal: libc::SIGBUS,
                report: "guest memory the host could not provide (KVM_RUN: EFAULT; \
                             did a file mapped shared, or one mapped from the root, \
                             shrink?)"
                    .into(),
            }),
            Exit::Unexpected(what) => Some(RunOutcome::Killed {
                signal: libc::SIGKILL,
                report: format!("unexpected VM exit: {what}"),
            }),
        };
        Ok(outcome)
    }
}

/// A memory digest as the control socket gives it, in the `digest` request's answer and
/// in a snapshot's reply alike (the tests compare the two): `{"pages": N, "digest": hex}`.
fn digest_json((pages, digest): (u64, u64)) -> serde_json::Value {
    serde_json::json!({"pages": pages, "digest": format!("{digest:016x}")})
}

/// What performing a call left to do.
enum Step {
    /// The thread goes on (or the run ends with the outcome).
    Done(Option<RunOutcome>),
    /// The thread was parked or ended: another must be put on the vCPU.
    Switch,
}

/// Everything one exit's handling touches, borrowed from the [`Picoprocess`] (the first
/// vCPU) or from another vCPU's thread (see [`cpus`]).
struct Exits<'a, 'g> {
    vcpu: &'a mut Vcpu,
    machine: &'a mut std::sync::Arc<Machine>,
    /// The process state, locked; a wait lets go of it (`MutexGuard::unlocked`).
    p: &'a mut ProcessGuard<'g>,
    stats: &'a mut ExitStats,
    live: &'a mut std::sync::Arc<LiveStats>,
    ops: &'a PendingOps,
    poller: &'a mut Option<std::sync::Arc<Poller>>,
    control: &'a mut Option<crate::control::ControlServer>,
    /// The process state `p` is the locked content of (a poller started here needs it).
    process: &'a crate::kernel::process::SharedProcess,
    /// This vCPU's number (0: the first).
    cpu: usize,
    /// What the app's vCPUs share.
    cpus: &'a mut std::sync::Arc<cpus::CpuShared>,
    /// The invalidations of translations this vCPU has caught up with.
    seen_invalidations: &'a mut u64,
    /// Set on a vCPU other than the first when its thread left it (parked or ended).
    thread_left: bool,
}

impl Exits<'_, '_> {
    /// Publishes counters for the control socket.
    fn publish_stats(&self) {
        let memory = self.p.mem.stats();
        self.live.publish(
            self.stats.syscalls,
            self.p.accepted,
            memory.frames_in_use,
            memory.frames_total,
        );
    }

    /// Everything between two runs of the guest: kicks, signals, then what the last exit
    /// changed.
    fn before_entry(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        // Every kick so far is acted on below, so a stale `immediate_exit` would only cost
        // an empty round trip into the guest (one per signal in a storm). A kick from now
        // on sets it again.
        self.vcpu.clear_immediate_exit();
        loop {
            if let Some(outcome) = self.take_kicks()? {
                return Ok(Some(outcome));
            }
            if let Some(outcome) = self.preempt()? {
                return Ok(Some(outcome));
            }
            if self.p.signals.deliverable().is_some() && !self.at_clean_point()? {
                break;
            }
            if let Some(outcome) = self.deliver_signals()? {
                return Ok(Some(outcome));
            }
            // From here on only signals the app can take at once kick the guest; those
            // raised since the kicks were taken are delivered first.
            self.p.quiet_signals();
            if self.p.signals.deliverable().is_none() {
                break;
            }
        }
        if self.p.threads.any() {
            // A signal for the thread group that this thread blocks goes to one that
            // does not; then it must get its turn.
            let blocked_here = self.p.signals.pending & self.p.signals.mask;
            if blocked_here != 0 {
                self.p.threads.interrupt_one(blocked_here);
            }
        }
        self.spread()?;
        if let Some(slicer) = &self.p.threads.slicer {
            // Time slices matter only while threads share this vCPU.
            let sharing = self
                .p
                .threads
                .parked
                .iter()
                .any(|t| t.pinned_to.is_none_or(|cpu| cpu == 0));
            slicer.set_contended(sharing);
        }
        self.prepare_entry()?;
        Ok(None)
    }

    /// Gives the threads that share the first vCPU (a restored app's, those made while
    /// every vCPU was taken) vCPUs of their own, as far as the limit allows.
    fn spread(&mut self) -> Result<(), VmmError> {
        if self.cpus.limit() <= 1 || self.p.threads.hold {
            return Ok(());
        }
        while let Some(at) = self
            .p
            .threads
            .parked
            .iter()
            .position(|t| t.pinned_to.is_none())
        {
            let Some(mut thread) = self.p.threads.parked.remove(at) else {
                break;
            };
            let placed = cpus::place(self, &mut thread)?;
            self.p.threads.parked.push_back(thread);
            if !placed {
                break;
            }
        }
        self.p.threads.wake_for_runnable();
        Ok(())
    }

    /// Parks every thread on the other vCPUs (for a snapshot, a fork or an exec): they
    /// keep theirs parked until [`Exits::release_the_world`]. Waits without the lock.
    /// Returns false if the app ended meanwhile (a thread elsewhere ended it), with
    /// threads left running.
    fn stop_the_world(&mut self) -> Result<bool, VmmError> {
        let running_elsewhere =
            |p: &ProcessGuard<'_>| p.threads.elsewhere.iter().skip(1).any(Option::is_some);
        if !running_elsewhere(self.p) {
            return Ok(true);
        }
        self.p.threads.hold = true;
        let mut started = std::time::Instant::now();
        let mut kicked = None;
        while running_elsewhere(self.p) {
            if self.cpus.ended() {
                return Ok(false);
            }
            if kicked.is_none_or(|at: std::time::Instant| at.elapsed().as_millis() >= 5) {
                // Again now and then: a vCPU kicked in an exception stub runs on to a
                // clean point first.
                for slot in self.p.threads.cpus.iter().skip(1).flatten() {
                    slot.kicker.kick(reason::PREEMPT);
                }
                kicked = Some(std::time::Instant::now());
            }
            if self.p.threads.transfers > 0 {
                // A thread in a transfer with a file parks once it is over, however long a
                // slow disk makes it: only the time after it counts.
                started = std::time::Instant::now();
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                return Err(VmmError::Host {
                    what: "parking the threads on the other vCPUs",
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            parking_lot::MutexGuard::unlocked(self.p, || {
                std::thread::sleep(std::time::Duration::from_micros(50))
            });
        }
        Ok(true)
    }

    /// Lets the other vCPUs take their threads again.
    fn release_the_world(&mut self) {
        if self.p.threads.hold {
            self.p.threads.hold = false;
            for cpu in 1..self.p.threads.cpus.len() {
                self.p.threads.wake_cpu(cpu);
            }
        }
    }

    /// Whether the vCPU's context is the app's own, to build a signal frame on, capture
    /// in a snapshot or park with its thread. It is not in two windows a kick can stop
    /// the vCPU in; in both, what is due waits for the next exit, which comes at once:
    /// - between the CPU's entry into an exception stub (ring 0, on the kernel stack)
    ///   and the stub's exit: a handler frame built there would run the handler at ring
    ///   0 and bury the exception's frame (the fuzzer's seed 7 died so, rarely);
    /// - after KVM took a fault but before it delivered it to the stub: KVM injects it at
    ///   whatever RIP the next entry has, so a handler frame built then takes it at the
    ///   handler's first instruction, with the fault's CR2 (the fuzzer's time() on a bad
    ///   pointer died so, 1 run in 30 under load), and a snapshot or a thread switch
    ///   would hand it to the wrong context.
    ///
    /// The vDSO's code is the app's own, as on Linux: it runs in user mode on the app's
    /// stack and registers, at fixed offsets that snapshots keep. A vCPU kicked there is
    /// at a clean point; were it not, a signal for an app that loops on the vDSO's
    /// clock_gettime (with no call that exits) waited for ever, the kick spent.
    /// A vCPU in a vDSO function is moved to its entry first (see
    /// [`crate::doorbell::restart_in_vdso`]): a signal frame, a parked thread or a snapshot
    /// then holds an address the ABI fixes, not one inside this VMM's layout of the code.
    fn at_clean_point(&mut self) -> Result<bool, VmmError> {
        crate::doorbell::restart_in_vdso(self.vcpu)?;
        let rip = self.vcpu.regs().rip;
        let users = rip < picocenter_guest_shim::abi::SYSTEM_VA
            || crate::memory::space::app_code_address(rip);
        Ok(users && !self.vcpu.exception_in_flight()?)
    }

    /// Ends the current thread's time slice if another thread is runnable.
    fn preempt(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        if self.p.kicker.pending() & reason::PREEMPT == 0 || !self.at_clean_point()? {
            return Ok(None);
        }
        self.p.kicker.clear(reason::PREEMPT);
        let process: &mut crate::kernel::process::Process = self.p;
        let wake = process.kicker.wake_fd();
        let runnable = process
            .threads
            .poll_waits(std::os::fd::AsFd::as_fd(wake))
            .map_err(|e| VmmError::Host {
                what: "looking at the app's waiting threads",
                source: e.into(),
            })?;
        if !runnable {
            return Ok(None);
        }
        self.park_current(Wait::Runnable, false)?;
        self.schedule()
    }

    /// Parks the thread on the vCPU (see [`crate::kernel::thread`]): `in_call` if it is at a
    /// `syscall` instruction it must perform again.
    fn park_current(&mut self, wait: Wait, in_call: bool) -> Result<(), VmmError> {
        if !in_call {
            // Kept at an entry the ABI fixes, should a snapshot take it (see
            // `at_clean_point`); a thread in a call keeps the call's registers.
            crate::doorbell::restart_in_vdso(self.vcpu)?;
        }
        let cpu = CpuContext {
            regs: self.vcpu.regs(),
            xsave: Box::new(self.vcpu.xsave()?),
        };
        let signals = ThreadSignals {
            mask: self.p.signals.mask,
            pending: std::mem::take(&mut self.p.signals.thread_pending),
            altstack: self.p.signals.altstack,
        };
        let state = std::mem::take(&mut self.p.thread);
        // A thread parked on another vCPU stays that vCPU's: it waits for it.
        let pinned_to = (self.cpu != 0).then_some(self.cpu);
        self.p.threads.parked.push_back(Parked {
            state,
            signals,
            cpu,
            wait,
            in_call,
            pinned_to,
        });
        self.thread_left = true;
        Ok(())
    }

    /// Puts parked thread `t` on the vCPU.
    fn load(&mut self, t: Parked) -> Result<(), VmmError> {
        *self.vcpu.regs_mut() = t.cpu.regs;
        self.vcpu.set_xsave(&t.cpu.xsave)?;
        self.p.thread = t.state;
        self.p.thread.fs_base_changed = true;
        self.p.signals.mask = t.signals.mask;
        self.p.signals.thread_pending = t.signals.pending;
        self.p.signals.altstack = t.signals.altstack;
        crate::kernel::clock::publish_tid(self.p.mem.phys(), self.cpu as u64, self.p.thread.tid);
        Ok(())
    }

    /// Puts the next runnable thread on the vCPU (the current one is parked or gone),
    /// waiting for one if none is. A thread that stopped in a call performs it again
    /// here; if it must wait again, the next one is tried.
    fn schedule(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        if self.cpu != 0 {
            // The vCPU's own loop waits for its next thread (see `cpus`).
            self.thread_left = true;
            return Ok(None);
        }
        loop {
            let next = if self.p.threads.hold {
                // Every thread is parked for the first vCPU's sake: any may run here.
                let at = self
                    .p
                    .threads
                    .parked
                    .iter()
                    .position(|t| matches!(t.wait, Wait::Runnable));
                at.and_then(|at| self.p.threads.parked.remove(at))
            } else {
                self.p.threads.take_runnable()
            };
            if let Some(next) = next {
                let in_call = next.in_call;
                self.load(next)?;
                if !in_call {
                    return Ok(None);
                }
                match self.perform_call()? {
                    Step::Done(outcome) => return Ok(outcome),
                    Step::Switch => continue,
                }
            }
            if !self.p.threads.any() {
                // Unreachable: the last thread's exit ends the app.
                return Ok(Some(RunOutcome::Exited(0)));
            }
            // Every thread waits. Signals and kicks wake one of them, whose call sees
            // what happened when it is performed again.
            let blocked = self.p.threads.common_mask();
            self.p.kicker.set_quiet(blocked | self.p.signals.pending);
            let kicks = self.p.kicker.pending();
            if kicks & reason::SIGNAL != 0 {
                self.p.absorb_external_signals();
            }
            if kicks & reason::PREEMPT != 0 {
                self.p.kicker.clear(reason::PREEMPT);
            }
            let pending = self.p.signals.pending;
            // (A thread pinned to another vCPU that takes it runs there.)
            if pending != 0 && self.p.threads.interrupt_one(pending) && self.p.threads.runnable() {
                continue;
            }
            if let Some(outcome) = self.final_kicks()? {
                return Ok(Some(outcome));
            }
            if self.p.kicker.pending() & reason::CONTROL != 0 {
                self.p.kicker.clear(reason::CONTROL);
                if let Some(control) = self.control.as_ref() {
                    control.accept_waiting();
                }
            }
            if self.p.kicker.pending() & !(reason::SIGNAL | reason::PREEMPT) != 0 {
                // A kick to act on needs a thread on this vCPU: the next one (every
                // thread parked, should it need them all; any may then run here).
                if !self.stop_the_world()? {
                    return self.final_kicks();
                }
                self.p.threads.hold = self.cpus.limit() > 1;
                if let Some(first) = self.p.threads.parked.front_mut() {
                    first.wait = Wait::Runnable;
                    continue;
                }
            }
            if let Some(slicer) = &self.p.threads.slicer {
                slicer.set_contended(false);
            }
            // Waits without the lock: the other vCPUs' threads go on meanwhile.
            tracing::trace!(cpu = 0, "idle: {}", self.p.threads.describe_parked());
            let waits = self.p.threads.waits_of(0);
            let wake = self.p.kicker.clone();
            self.p.threads.set_first_cpu_idle(true);
            let ready = parking_lot::MutexGuard::unlocked(self.p, || {
                waits.poll(std::os::fd::AsFd::as_fd(wake.wake_fd()), None)
            });
            self.p.threads.set_first_cpu_idle(false);
            let ready = ready.map_err(|e| VmmError::Host {
                what: "waiting for the app's threads",
                source: e.into(),
            })?;
            self.p.threads.mark_ready(&ready);
        }
    }

    /// Starts a thread clone asked for, with the caller's registers (after its call,
    /// RAX = 0) on its own stack.
    fn spawn_thread(&mut self, spawn: syscalls::thread::Spawn) -> Result<(), VmmError> {
        let mut regs = self.vcpu.regs();
        regs.rip = regs.rcx;
        regs.rflags = regs.r11;
        regs.rax = 0;
        regs.rsp = spawn.stack;
        let mut state = crate::kernel::thread::ThreadState::new(spawn.tid);
        state.fs_base = spawn.tls.unwrap_or(self.p.thread.fs_base);
        state.clear_child_tid = spawn.clear_child_tid;
        let parked = Parked {
            state,
            // Linux clears the alternate stack of a thread that shares the memory.
            signals: ThreadSignals {
                mask: self.p.signals.mask,
                pending: 0,
                altstack: (0, libc::SS_DISABLE, 0),
            },
            cpu: CpuContext {
                regs,
                xsave: Box::new(self.vcpu.xsave()?),
            },
            wait: Wait::Runnable,
            in_call: false,
            pinned_to: None,
        };
        let mut parked = parked;
        let placed = cpus::place(self, &mut parked)?;
        if !placed && self.p.threads.slicer.is_none() {
            let slicer = crate::kernel::thread::TimeSlicer::start(self.p.kicker.clone()).map_err(
                |source| VmmError::Host {
                    what: "the threads' time slicer",
                    source,
                },
            )?;
            self.p.threads.slicer = Some(slicer);
        }
        self.p.threads.parked.push_back(parked);
        // Its vCPU, or the first (spawned elsewhere: it may be waiting for a thread).
        self.p.threads.wake_for_runnable();
        Ok(())
    }

    /// Puts the vCPU at the start of the program execve loaded: its entry and stack, every
    /// other register zero, the FPU in its initial state.
    fn start_program(&mut self, start: &crate::loader::StartState) -> Result<(), VmmError> {
        self.vcpu
            .resume_user(start.entry, start.rsp, crate::kvm::cpu::USER_RFLAGS)?;
        let regs = self.vcpu.regs_mut();
        *regs = kvm_bindings::kvm_regs {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            ..Default::default()
        };
        let mut xsave = kvm_bindings::kvm_xsave::default();
        // The legacy area's MXCSR (bytes 24..28); with XSTATE_BV zero, the rest of the
        // state is in its initial configuration (FCW 0x37f included).
        xsave.region[6] = 0x1f80;
        self.vcpu.set_xsave(&xsave)?;
        Ok(())
    }

    /// The kicks that end the run, whether or not a thread is on this vCPU: a thread on
    /// another ended the app, a VMM thread failed, the time limit passed, the operator
    /// stopped the app.
    fn final_kicks(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        let pending = self.p.kicker.pending();
        if pending & reason::ENDED != 0 {
            if let Some(outcome) = self.cpus.take_ending() {
                return Ok(Some(outcome));
            }
            self.p.kicker.clear(reason::ENDED);
        }
        if pending & reason::FAILED != 0 {
            let report = crate::panics::report().unwrap_or_default();
            return Err(VmmError::Panicked(report));
        }
        if pending & reason::TIMEOUT != 0 {
            return Ok(Some(RunOutcome::TimedOut));
        }
        if pending & reason::STOP != 0 {
            return Ok(Some(RunOutcome::Killed {
                signal: libc::SIGKILL,
                report: "stopped by the operator".into(),
            }));
        }
        Ok(None)
    }

    /// Acts on kicks that arrived; the app is outside any syscall here.
    fn take_kicks(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        if let Some(outcome) = self.final_kicks()? {
            return Ok(Some(outcome));
        }
        let pending = self.p.kicker.pending();
        if pending & reason::SIGNAL != 0 {
            self.p.absorb_external_signals();
        }
        if pending & reason::DESCRIBE != 0 {
            // Cleared first: an ask that comes after the publication kicks again.
            self.p.kicker.clear(reason::DESCRIBE);
            crate::syscalls::procfs::publish_description(self.p);
        }
        if pending & reason::CONTROL != 0 {
            // Cleared first: a connection that comes after the accepts kicks again.
            self.p.kicker.clear(reason::CONTROL);
            if let Some(control) = self.control.as_ref() {
                control.accept_waiting();
            }
        }
        // The operator's requests (a snapshot among them) wait for a clean point.
        if pending & (reason::PAUSE | reason::CAPTURE) != 0 && self.at_clean_point()? {
            // Every thread parked, so that the requests see them all at a clean point.
            if !self.stop_the_world()? {
                return self.final_kicks();
            }
            self.p.kicker.clear(reason::PAUSE | reason::CAPTURE);
            for op in self.ops.take() {
                if let Some(outcome) = self.perform(op)? {
                    return Ok(Some(outcome));
                }
            }
            // Asked for a part of a tree snapshot (looked up in the table, not only by
            // the kick: one that came with a pause is cleared with it above).
            // A stop signal taken and not yet acted on counts as stopped.
            let stopping = self.p.jobs.stop.is_some();
            if let Some(outcome) = self.write_part(stopping)? {
                return Ok(Some(outcome));
            }
            if let Some(signal) = self.p.jobs.stop.take() {
                if let Some(outcome) = self.stay_stopped(signal)? {
                    return Ok(Some(outcome));
                }
            }
        }
        self.release_the_world();
        Ok(None)
    }

    /// Job control: the process stays stopped by `signal`, every thread parked, until a
    /// SIGCONT or SIGKILL comes (or the app ends); its parent's wait sees it stop and
    /// continue. A call a thread was in is performed again afterwards.
    fn stay_stopped(&mut self, signal: i32) -> Result<Option<RunOutcome>, VmmError> {
        tracing::debug!(signal, "stopped");
        self.p.report_job_change(Some(signal));
        // Every signal raised must wake this wait, the blocked ones too.
        self.p.kicker.set_quiet(0);
        let kicker = self.p.kicker.clone();
        loop {
            if let Some(outcome) = self.final_kicks()? {
                return Ok(Some(outcome));
            }
            let asked = self.p.kicker.pending() & reason::DESCRIBE != 0;
            self.p
                .kicker
                .clear(reason::PREEMPT | reason::PAUSE | reason::CAPTURE | reason::DESCRIBE);
            if asked {
                crate::syscalls::procfs::publish_description(self.p);
            }
            // A tree snapshot asked of a stopped process is told it is stopped (a restore
            // would bring it back running).
            if let Some(outcome) = self.write_part(true)? {
                return Ok(Some(outcome));
            }
            let raised = self.p.absorb_external_signals();
            let killed = self.p.signals.all_pending() & bit(libc::SIGKILL) != 0;
            if raised & bit(libc::SIGCONT) != 0 || killed {
                break;
            }
            parking_lot::MutexGuard::unlocked(self.p, || {
                let mut fds = [rustix::event::PollFd::new(
                    kicker.wake_fd(),
                    rustix::event::PollFlags::IN,
                )];
                let _ = rustix::event::poll(&mut fds, None);
            });
        }
        // The stop signals taken meanwhile are dropped by the SIGCONT (see `raise`).
        self.p.jobs.stop = None;
        if self.p.signals.all_pending() & bit(libc::SIGKILL) == 0 {
            // Killed, it never continued.
            self.p.report_job_change(None);
        }
        tracing::debug!("continued");
        Ok(None)
    }

    /// In a process other than the app's first, every thread parked: writes its part of
    /// the tree snapshot the first one asked for, then waits to learn whether the app
    /// ends (saved to stop) or goes on.
    fn write_part(&mut self, stopped: bool) -> Result<Option<RunOutcome>, VmmError> {
        use crate::kernel::tree::{CaptureStatus, Verdict};
        use crate::persist::parts;
        let Some(tree) = self.p.tree.clone() else {
            return Ok(None);
        };
        let pid = self.p.ids.pid;
        let Some(request) = tree.capture_request(pid) else {
            return Ok(None);
        };
        let parked = parts::park(self.p, &request, stopped);
        tree.report_capture(pid, request.generation, parked);
        if parked != CaptureStatus::Parked {
            return Ok(None);
        }
        // Parked until every process of the app is; if the first one ends meanwhile, so
        // does this process (see `RootWatch`).
        match self.wait_for_first_process(|| tree.may_write(request.generation))? {
            Err(outcome) => return Ok(Some(outcome)),
            Ok(false) => return Ok(None),
            Ok(true) => {}
        }
        let status = parts::write_part(self.vcpu, self.p, &request);
        tree.report_capture(pid, request.generation, status);
        if status != CaptureStatus::Done {
            return Ok(None);
        }
        // The first process commits the snapshot meanwhile.
        match self.wait_for_first_process(|| tree.capture_verdict(request.generation))? {
            Err(outcome) => Ok(Some(outcome)),
            Ok(Verdict::End) => Ok(Some(RunOutcome::Snapshotted(request.id))),
            Ok(Verdict::Saved) => {
                if let Err(e) = parts::saved(self.p, &request) {
                    // The next snapshot is then a full one of this process's pages.
                    tracing::warn!("after a snapshot: {e}");
                    self.p.restored_from = None;
                }
                Ok(None)
            }
            Ok(Verdict::Abandoned) => Ok(None),
        }
    }

    /// Polls `decided` (what the app's first process says, in their table) every
    /// millisecond until it says something, or a kick ends the run first (`Err`).
    fn wait_for_first_process<T>(
        &mut self,
        mut decided: impl FnMut() -> Option<T>,
    ) -> Result<Result<T, RunOutcome>, VmmError> {
        loop {
            if let Some(outcome) = self.final_kicks()? {
                return Ok(Err(outcome));
            }
            if let Some(said) = decided() {
                return Ok(Ok(said));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Does what the control socket asked, with the app at a clean point.
    fn perform(&mut self, op: PendingOp) -> Result<Option<RunOutcome>, VmmError> {
        match op {
            PendingOp::Snapshot {
                dir,
                stop,
                full,
                if_idle,
                digest,
                reply,
            } => {
                if let Some(why) = if_idle.then(|| crate::persist::busy(self.p)).flatten() {
                    reply.send(serde_json::json!({"ok": false, "busy": true, "error": why}));
                    return Ok(None);
                }
                let digest = match digest.then(|| self.p.mem.digest()).transpose() {
                    Ok(digest) => digest,
                    Err(e) => {
                        reply.send(
                            serde_json::json!({"ok": false, "error": format!("digest: {e}")}),
                        );
                        return Ok(None);
                    }
                };
                let result = picocenter_snapshots::LocalStore::open(&dir)
                    .map_err(crate::persist::PersistError::from)
                    .and_then(|store| {
                        let options = crate::persist::CaptureOptions {
                            full,
                            stop,
                            if_idle,
                        };
                        let manifest = crate::persist::capture(self.vcpu, self.p, &store, options)?;
                        if !stop {
                            crate::persist::saved(self.p, &store, &manifest)?;
                        }
                        Ok(manifest)
                    });
                match result {
                    Ok(manifest) => {
                        reply.send(serde_json::json!({
                            "ok": true,
                            "id": manifest.id,
                            "parent": manifest.parent,
                            "stats": manifest.stats,
                            "stopped": stop,
                            "digest": digest.map(digest_json),
                        }));
                        if stop {
                            return Ok(Some(RunOutcome::Snapshotted(manifest.id)));
                        }
                    }
                    Err(e @ crate::persist::PersistError::Busy(_)) => {
                        let error = e.to_string();
                        tracing::info!("no snapshot: {error}");
                        reply.send(serde_json::json!({"ok": false, "busy": true, "error": error}));
                    }
                    Err(e) => {
                        let error = crate::report::error_chain(&e);
                        tracing::warn!("snapshot failed: {error}");
                        reply.send(serde_json::json!({"ok": false, "error": error}));
                    }
                }
                Ok(None)
            }
            PendingOp::Digest { reply } => {
                let answer = match self.p.mem.digest() {
                    Ok(digest) => {
                        let mut answer = digest_json(digest);
                        answer["ok"] = true.into();
                        answer
                    }
                    Err(e) => serde_json::json!({"ok": false, "error": format!("digest: {e}")}),
                };
                reply.send(answer);
                Ok(None)
            }
        }
    }

    /// Delivers every pending signal the app does not block: runs its default action or
    /// builds a handler frame (nesting, as Linux does when several are pending).
    fn deliver_signals(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        while let Some(signal) = self.p.signals.deliverable() {
            match self.p.signals.disposition(signal) {
                Disposition::Ignore => {
                    self.p.signals.clear(signal);
                }
                Disposition::Stop => {
                    // The process stops at the first vCPU's next clean point, with every
                    // thread parked. (The app's first process, its init, never gets here:
                    // it ignores stop signals, as a PID namespace's init does.)
                    self.p.signals.clear(signal);
                    self.p.request_stop(signal);
                }
                Disposition::Terminate => {
                    return Ok(Some(RunOutcome::Killed {
                        signal,
                        report: format!("{} was not handled", signal_name(signal)),
                    }))
                }
                Disposition::Handle(_) => {
                    // A signal sent to this thread came from tgkill (SI_TKILL, which
                    // glibc's cancellation handler insists on); the rest as from kill.
                    const SI_TKILL: i32 = -6;
                    let tkill = self.p.signals.thread_pending & crate::kernel::signals::bit(signal);
                    let mut info = SigInfo {
                        signo: signal,
                        code: if tkill != 0 { SI_TKILL } else { 0 },
                        ..Default::default()
                    };
                    if signal == libc::SIGCHLD && tkill == 0 {
                        // As the kernel fills it: the child that stopped or continued, as
                        // it said; else one that ended.
                        let cause = self.p.jobs.sigchld.take().or_else(|| {
                            syscalls::children::sigchld_cause(self.p)
                                .map(|(pid, ended)| (ended.code, pid, ended.value))
                        });
                        if let Some((code, pid, status)) = cause {
                            info.code = code;
                            info.child = Some((pid, status));
                        }
                    }
                    if let Some(outcome) = self.deliver(info)? {
                        return Ok(Some(outcome));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Builds a handler frame for `info`; a frame that cannot be written kills the app.
    fn deliver(&mut self, info: SigInfo) -> Result<Option<RunOutcome>, VmmError> {
        // A call the vDSO made and the VMM completed leaves the app in the vDSO; the frame
        // keeps the function's entry (see `at_clean_point`).
        crate::doorbell::restart_in_vdso(self.vcpu)?;
        match sigframe::deliver(self.p, self.vcpu, info) {
            Ok(()) => Ok(None),
            Err(DeliveryError::Vcpu(e)) => Err(e.into()),
            Err(DeliveryError::BadFrame(why)) => Ok(Some(RunOutcome::Killed {
                signal: libc::SIGSEGV,
                report: why,
            })),
        }
    }

    /// Rewinds the app to execute its `syscall` instruction again, with RAX = `nr`.
    fn rewind_syscall(&mut self, nr: u64) -> Result<(), VmmError> {
        self.vcpu.complete_syscall()?;
        let regs = self.vcpu.regs_mut();
        regs.rip -= 2;
        regs.rax = nr;
        Ok(())
    }

    /// Applies what the last exit changed before the guest runs again.
    fn prepare_entry(&mut self) -> Result<(), VmmError> {
        if self.p.clock.publish_due() {
            // The other vCPUs' guests would read a half-written time page.
            self.shoot_down()?;
            let p: &mut crate::kernel::process::Process = self.p;
            p.clock.publish(p.mem.phys(), true);
        }
        if self.p.thread.fs_base_changed {
            self.vcpu.set_fs_base(self.p.thread.fs_base)?;
            self.p.thread.fs_base_changed = false;
        }
        if self.cpu == 0 && self.p.activeset.harvest_due() {
            tracing::trace!("activeset: harvest");
            // Clearing A bits must not lose a D bit another vCPU sets meanwhile.
            self.shoot_down()?;
            let accessed = self.p.mem.take_accessed()?;
            self.p.activeset.harvest(accessed);
        }
        if self.p.mem.is_stale() {
            self.shoot_down()?;
            match self
                .vcpu
                .invalidate_translations(self.machine, &self.p.mem)?
            {
                Invalidation::Entries(n) => self.stats.entries_rewritten += n,
                Invalidation::Everything => self.stats.full_invalidations += 1,
            }
            self.p.mem.invalidated();
            *self.seen_invalidations = self.p.mem.invalidation_count();
        } else if *self.seen_invalidations != self.p.mem.invalidation_count() {
            self.vcpu.catch_up_invalidation()?;
            *self.seen_invalidations = self.p.mem.invalidation_count();
        }
        Ok(())
    }

    /// Brings every other vCPU out of its guest before translations change: each is kicked
    /// and, since this vCPU holds the process lock, cannot enter again until the change is
    /// made (and, on hardware KVM, caught up with; see [`Vcpu::catch_up_invalidation`]).
    /// A kernel's TLB shootdown, in effect.
    fn shoot_down(&mut self) -> Result<(), VmmError> {
        let others: Vec<_> = (self.p.threads.cpus.iter().enumerate())
            .filter(|(cpu, _)| *cpu != self.cpu)
            .filter_map(|(_, slot)| slot.as_ref())
            .filter(|slot| slot.in_guest.load(Ordering::SeqCst))
            .map(|slot| (slot.in_guest.clone(), slot.kicker.clone()))
            .collect();
        if !others.is_empty() {
            self.cpus.shootdowns.fetch_add(1, Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        let mut kicked: Option<std::time::Instant> = None;
        while others
            .iter()
            .any(|(in_guest, _)| in_guest.load(Ordering::SeqCst))
        {
            if kicked.is_none_or(|at| at.elapsed().as_millis() >= 5) {
                for (in_guest, kicker) in &others {
                    if in_guest.load(Ordering::SeqCst) {
                        kicker.kick(reason::PREEMPT);
                    }
                }
                kicked = Some(std::time::Instant::now());
            }
            if started.elapsed() > std::time::Duration::from_secs(10) {
                return Err(VmmError::Host {
                    what: "bringing the other vCPUs out of the guest",
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    fn on_syscall(&mut self) -> Result<Option<RunOutcome>, VmmError> {
        self.stats.syscalls += 1;
        if self.cpu == 0 {
            self.publish_stats();
        }
        let regs = self.vcpu.regs();
        let nr = regs.rax;
        let now = std::time::Instant::now();
        let since_last = self.stats.last_syscall_exit.replace(now).map(|t| now - t);
        if let Some(poller) = self.poller.as_ref() {
            poller.exit_call(self.cpu, nr, since_last);
        }
        if nr == libc::SYS_rt_sigreturn as u64 {
            return match sigframe::sigreturn(self.p, self.vcpu) {
                Ok(()) => self.deliver_signals(),
                Err(DeliveryError::Vcpu(e)) => Err(e.into()),
                Err(DeliveryError::BadFrame(why)) => Ok(Some(RunOutcome::Killed {
                    signal: libc::SIGSEGV,
                    report: why,
                })),
            };
        }
        let started = std::time::Instant::now();
        let step = self.perform_call()?;
        if started.elapsed() > crate::mailbox::IDLE && syscalls::mailbox_allowed(nr) {
            // The call blocked for longer than the poller stays awake without calls, so it
            // sleeps, and what the app does with what it waited for (a server's accept,
            // read and write after its poll) comes as a burst. Woken now, the poller is
            // awake when that burst begins, instead of after the exit of its first call.
            // (Not after a futex wait: threads that hand work to each other would keep it
            // spinning on a core their vCPUs need.)
            if let Some(poller) = self.poller.as_ref() {
                poller.wake();
            }
        }
        match step {
            Step::Done(outcome) => Ok(outcome),
            Step::Switch => self.schedule(),
        }
    }

    /// Performs the call the current thread is at (its registers as after its `syscall`
    /// instruction, or rewound to it).
    fn perform_call(&mut self) -> Result<Step, VmmError> {
        let regs = self.vcpu.regs();
        let nr = regs.rax;
        let whole_process = cpus::needs_first_cpu(self.p, nr, regs.rdi);
        if whole_process && self.cpu != 0 {
            // Performed on the first vCPU, which copies or replaces the whole process.
            self.rewind_syscall(nr)?;
            self.park_current(Wait::Runnable, true)?;
            if let Some(moved) = self.p.threads.parked.back_mut() {
                moved.pinned_to = Some(0);
            }
            self.p.threads.wake_cpu(0);
            return Ok(Step::Switch);
        }
        if whole_process {
            // A fork copies, an exec replaces, the process: the other vCPUs' threads park
            // first, and stay parked until it is done.
            if !self.stop_the_world()? {
                // The app ended meanwhile: the next kicks say how.
                self.rewind_syscall(nr)?;
                return Ok(Step::Done(None));
            }
            let step = self.perform_call_now(whole_process);
            self.release_the_world();
            return step;
        }
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
        if cpus::rewrites_translations(self.p, nr, &args) {
            self.shoot_down()?;
        }
        self.perform_call_now(whole_process)
    }

    /// Performs the call now, on this vCPU; `whole_process`: the other vCPUs' threads are
    /// parked for a fork or an exec.
    fn perform_call_now(&mut self, whole_process: bool) -> Result<Step, VmmError> {
        let regs = self.vcpu.regs();
        let nr = regs.rax;
        crate::panics::test_hook(crate::panics::Place::Vcpu, nr);
        let args = Args([regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]);
        let call = (nr, regs.rcx.wrapping_sub(2));
        self.p.thread.current_call = call;
        self.p.thread.interrupted_deadline = None;
        let result = syscalls::perform(self.p, nr, &args);
        if !matches!(
            result,
            Err(SysError::Block(_) | SysError::Restart | SysError::WouldBlock)
        ) && self
            .p
            .thread
            .restart
            .is_some_and(|(n, rip, _)| (n, rip) == call)
        {
            // Done (a wait that found it was woken need not look at its deadline): the
            // deadline it kept must not be taken by the next call from the same place.
            self.p.thread.restart = None;
        }
        let rax = match result {
            Ok(value) => value,
            Err(SysError::Errno(errno)) => (-(errno.raw_os_error() as i64)) as u64,
            Err(SysError::Exit(code)) => return Ok(Step::Done(Some(RunOutcome::Exited(code)))),
            Err(SysError::Kill { signal, reason }) => {
                return Ok(Step::Done(Some(RunOutcome::Killed {
                    signal,
                    report: reason,
                })))
            }
            Err(SysError::Block(wait)) => {
                // Performed again when the wait is over, with the deadline it had.
                self.p.thread.restart = wait.deadline().map(|d| (call.0, call.1, d));
                self.rewind_syscall(nr)?;
                self.park_current(wait, true)?;
                return Ok(Step::Switch);
            }
            Err(SysError::ThreadExit(status)) => {
                syscalls::thread::release_thread(self.p);
                if !self.p.threads.any() {
                    return Ok(Step::Done(Some(RunOutcome::Exited(status))));
                }
                // No thread is on the vCPU until the next is loaded.
                self.p.thread = Default::default();
                return Ok(Step::Switch);
            }
            Err(SysError::Yield) if self.cpu != 0 => 0,
            Err(SysError::Yield) => {
                self.vcpu.regs_mut().rax = 0;
                self.vcpu.complete_syscall()?;
                self.park_current(Wait::Runnable, false)?;
                return Ok(Step::Switch);
            }
            Err(SysError::Fork(_)) if !whole_process => {
                // clone3's flags were changed under it (another thread wrote them after
                // they were looked at): it runs again, as what it now asks for.
                self.rewind_syscall(nr)?;
                return Ok(Step::Done(None));
            }
            Err(SysError::Fork(request)) => match self.fork(*request)? {
                Ok(pid) => pid,
                Err(errno) => (-(errno.raw_os_error() as i64)) as u64,
            },
            Err(SysError::Exec(start)) => {
                self.start_program(&start)?;
                return Ok(Step::Done(self.deliver_signals()?));
            }
            Err(SysError::Transfer(transfer)) => self.transfer_unlocked(*transfer),
            Err(SysError::Spawn(spawn)) => {
                let tid = spawn.tid;
                self.spawn_thread(*spawn)?;
                tid as u64
            }
            Err(SysError::Restart) | Err(SysError::WouldBlock) => {
                // Re-execute the `syscall` instruction once the kick is handled, with the
                // deadline it had.
                self.p.thread.restart = self
                    .p
                    .thread
                    .interrupted_deadline
                    .take()
                    .map(|deadline| (call.0, call.1, deadline));
                self.rewind_syscall(nr)?;
                return Ok(Step::Done(None));
            }
            Err(SysError::Interrupted) => {
                // As on Linux, only a handler without SA_RESTART makes the call fail with
                // EINTR: after a stop (and continue) it is performed again.
                let restart = match self.p.signals.deliverable() {
                    Some(signal) => match self.p.signals.disposition(signal) {
                        Disposition::Handle(action) => {
                            action.flags & SA_RESTART != 0 && syscalls::restartable(nr)
                        }
                        _ => true,
                    },
                    None => true,
                };
                if restart {
                    self.rewind_syscall(nr)?;
                    return Ok(Step::Done(self.deliver_signals()?));
                }
                (-libc::EINTR as i64) as u64
            }
        };
        self.vcpu.regs_mut().rax = rax;
        self.vcpu.complete_syscall()?;
        Ok(Step::Done(self.deliver_signals()?))
    }

    /// Makes a call's transfer between a regular file and app memory without the process
    /// lock, so that the other threads' calls go on meanwhile; returns the call's result.
    /// This vCPU's thread stops being the current one while the lock is let go (whoever
    /// takes it finds the first vCPU's thread current), as for a wait.
    fn transfer_unlocked(&mut self, transfer: syscalls::fs::Transfer) -> u64 {
        self.p.threads.transfers = self.p.threads.transfers.saturating_add(1);
        self.p.leave_cpu(self.cpu);
        let moved =
            parking_lot::MutexGuard::unlocked(self.p, || transfer.io.perform(transfer.file.host()));
        self.p.enter_cpu(self.cpu);
        self.p.threads.transfers = self.p.threads.transfers.saturating_sub(1);
        self.p.mem.finish_transfer(transfer.io);
        self.cpus.unlocked_transfers.fetch_add(1, Ordering::Relaxed);
        match moved {
            Ok(bytes) => bytes as u64,
            Err(errno) => (-(errno.raw_os_error() as i64)) as u64,
        }
    }

    /// Reads the exception frame the CPU pushed on the ring-0 stack.
    fn read_frame(&self, vector: u8) -> Option<Frame> {
        let rsp = self.vcpu.regs().rsp;
        let words = if has_error_code(vector) { 6 } else { 5 };
        let stack_bottom = abi::CPU_LOCAL_VA + abi::cpu_local::KERNEL_STACK_PAGE * abi::PAGE_SIZE;
        let ist_bottom = abi::CPU_LOCAL_VA + abi::cpu_local::IST_STACK_PAGE * abi::PAGE_SIZE;
        let ist_top = ist_bottom + abi::PAGE_SIZE;
        let end = rsp.checked_add(words * 8)?;
        let on_stack = (rsp >= stack_bottom && end <= kernel_stack_top())
            || (rsp >= ist_bottom && end <= ist_top);
        if !on_stack {
            return None;
        }
        let mut raw = [0u64; 6];
        let phys = self.p.mem.phys();
        for (i, word) in raw.iter_mut().take(words as usize).enumerate() {
            let gpa = cpu_local_address(self.cpu, rsp + i as u64 * 8)?;
            *word = phys.read_u64(gpa).ok()?;
        }
        let w = if has_error_code(vector) {
            &raw[..]
        } else {
            &raw[..5]
        };
        let (error_code, rest) = if has_error_code(vector) {
            (w[0], &w[1..])
        } else {
            (0, w)
        };
        Some(Frame {
            error_code,
            rip: rest[0],
            cs: rest[1],
            rflags: rest[2],
            rsp: rest[3],
        })
    }

    /// A fault inside the doorbell: a call answered in the guest (a time call, or a read
    /// from a file window) touched the app's buffer or path, which is mapped on demand or
    /// bad (`cr2` for a page fault; `None` for a non-canonical address). A page mapped on
    /// demand restarts the call; for a bad one the VMM performs the call itself, as an exit
    /// would have, and answers as Linux does (EFAULT, or the bytes before the bad page).
    /// A fault in a file window (which should not happen: windows are mapped whole) takes
    /// the window down and restarts the call, which the VMM then answers.
    fn on_doorbell_fault(
        &mut self,
        frame: &Frame,
        cr2: Option<u64>,
    ) -> Result<Option<RunOutcome>, VmmError> {
        let phys = self.p.mem.phys();
        let slot = |offset: u64| {
            phys.read_u64(cpu_local_gpa(self.cpu as u64, abi::cpu_local::SCRATCH_PAGE) + offset)
                .unwrap_or(0)
        };
        let (nr, rcx, rdx) = (
            slot(abi::scratch::RAX),
            slot(abi::scratch::RCX),
            slot(abi::scratch::RDX),
        );
        let r11 = self.vcpu.regs().r11;
        let access = if frame.error_code & 2 != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let resolved = match cr2 {
            Some(cr2) => match crate::kernel::windows::window_at(cr2) {
                Some(fd) => {
                    // Only the app's own jumps into the doorbell get here (windows are
                    // mapped whole), so this is not worth more than a debug line.
                    tracing::debug!(fd, "a fault in a file window: the window is taken down");
                    let p: &mut crate::kernel::process::Process = self.p;
                    p.windows.take_down(fd, &mut p.mem);
                    true
                }
                None => self
                    .p
                    .mem
                    .handle_fault(cr2, access)
                    .is_ok_and(|r| r == FaultResolution::Resolved),
            },
            None => false,
        };
        // The app can jump into the doorbell with registers of its own choosing.
        if !crate::memory::space::app_code_address(rcx.wrapping_sub(2)) {
            return Ok(Some(RunOutcome::Killed {
                signal: libc::SIGSEGV,
                report: format!("left the doorbell for a non-user address {rcx:#x}"),
            }));
        }
        self.vcpu
            .resume_user(rcx.wrapping_sub(2), frame.rsp, r11 | 0x202)?;
        let regs = self.vcpu.regs_mut();
        (regs.rax, regs.rcx, regs.rdx) = (nr, rcx, rdx);
        if resolved {
            return Ok(None);
        }
        self.stats.syscalls += 1;
        match self.perform_call()? {
            Step::Done(outcome) => Ok(outcome),
            Step::Switch => self.schedule(),
        }
    }

    /// Sends a fault's signal to the app's handler, if it has one and does not block the
    /// signal. `Some(None)`: delivered, resume; `Some(Some(_))`: the frame failed; `None`:
    /// no handler, the caller kills the app.
    fn fault_to_handler(
        &mut self,
        frame: &Frame,
        signal: i32,
        code: i32,
        addr: u64,
    ) -> Result<Option<Option<RunOutcome>>, VmmError> {
        let handled = matches!(self.p.signals.disposition(signal), Disposition::Handle(_));
        if !handled || self.p.signals.mask & crate::kernel::signals::bit(signal) != 0 {
            return Ok(None);
        }
        self.vcpu.resume_user(frame.rip, frame.rsp, frame.rflags)?;
        let info = SigInfo {
            signo: signal,
            code,
            addr,
            ..Default::default()
        };
        Ok(Some(self.deliver(info)?))
    }

    fn on_exception(
        &mut self,
        vector: u8,
        last_fault: &mut (u64, u64, u32),
    ) -> Result<Option<RunOutcome>, VmmError> {
        self.stats.exceptions += 1;
        let Some(frame) = self.read_frame(vector) else {
            return Ok(Some(RunOutcome::Killed {
                signal: libc::SIGSEGV,
                report: format!("{} with an unreadable exception frame", vector_name(vector)),
            }));
        };
        let from_user = frame.cs & 3 == 3;
        let cr2 = if vector == 14 {
            self.vcpu.sregs()?.cr2
        } else {
            0
        };
        // A #PF (an unmapped or demand-paged buffer) or a #GP (a non-canonical one) in the
        // doorbell is a time call's store to the app's buffer.
        if (vector == 14 || vector == 13)
            && frame.rip.wrapping_sub(abi::DOORBELL_VA) < abi::PAGE_SIZE
        {
            return self.on_doorbell_fault(&frame, (vector == 14).then_some(cr2));
        }
        if vector == 14 && from_user {
            let access = if frame.error_code & 0x10 != 0 {
                Access::Execute
            } else if frame.error_code & 0x2 != 0 {
                Access::Write
            } else {
                Access::Read
            };
            let resolution = self
                .p
                .mem
                .handle_fault(cr2, access)
                .unwrap_or(FaultResolution::Forbidden);
            // The same fault three times in a row means the mapping cannot be fixed.
            let key = (frame.rip, cr2);
            let repeats = if (last_fault.0, last_fault.1) == key {
                last_fault.2 + 1
            } else {
                0
            };
            *last_fault = (key.0, key.1, repeats);
            if resolution == FaultResolution::Resolved && repeats < 3 {
                self.vcpu.resume_user(frame.rip, frame.rsp, frame.rflags)?;
                return Ok(None);
            }
            // SEGV_MAPERR, SEGV_ACCERR, or BUS_ADRERR.
            let (signal, code) = match resolution {
                FaultResolution::Unmapped => (libc::SIGSEGV, 1),
                FaultResolution::PastEndOfFile => (libc::SIGBUS, 2),
                _ => (libc::SIGSEGV, 2),
            };
            if let Some(outcome) = self.fault_to_handler(&frame, signal, code, cr2)? {
                return Ok(outcome);
            }
            let why = match resolution {
                FaultResolution::Unmapped => "address not mapped",
                FaultResolution::PastEndOfFile => "past the end of a shared file mapping",
                _ => "access not permitted",
            };
            let what = match access {
                Access::Read => "read",
                Access::Write => "write",
                Access::Execute => "instruction fetch",
            };
            return Ok(Some(RunOutcome::Killed {
                signal,
                report: format!(
                    "{}: {what} at {cr2:#x} ({why}), rip={:#x}",
                    if signal == libc::SIGBUS {
                        "bus error"
                    } else {
                        "segmentation fault"
                    },
                    frame.rip
                ),
            }));
        }
        if from_user && vector != 14 {
            if let Some(outcome) =
                self.fault_to_handler(&frame, signal_for(vector), 0x80, frame.rip)?
            {
                return Ok(outcome);
            }
        }
        let mut report = format!(
            "{} at rip={:#x} rsp={:#x}",
            vector_name(vector),
            frame.rip,
            frame.rsp
        );
        if has_error_code(vector) {
            report.push_str(&format!(" error={:#x}", frame.error_code));
        }
        if vector == 14 {
            report.push_str(&format!(" cr2={cr2:#x}"));
        }
        if !from_user {
            report.push_str(" (in the VMM's guest code)");
        }
        Ok(Some(RunOutcome::Killed {
            signal: if from_user {
                signal_for(vector)
            } else {
                libc::SIGKILL
            },
            report,
        }))
    }
}

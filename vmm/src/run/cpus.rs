//! The app's vCPUs beyond the first: a vCPU per app thread.
//!
//! The first vCPU runs on the thread that called [`crate::Picoprocess::run`] and owns the
//! run: kicks, the control socket's requests, snapshots, fork and exec. When the app
//! makes a thread, the thread gets a vCPU of its own ([`start`]) if the app has fewer than
//! its limit: a KVM vCPU in the same VM, with page tables and ring-0 stacks of its own (see
//! [`crate::kvm::system::add_cpu`]), on a host thread of its own that runs the loop here.
//! Beyond the limit, threads share the first vCPU, which switches among them
//! (see [`crate::kernel::thread`]).
//!
//! Such a vCPU runs one thread at a time. It handles its exits as the first vCPU does
//! (the same [`Exits`] code), holding the process lock meanwhile and making its thread the
//! current one (`Process::enter_cpu`); its guest runs without the lock, in parallel with
//! the others. A call that must wait parks its thread *pinned* to this vCPU, which then
//! waits for the thread's fds, deadline or a wake without the lock, and performs the call
//! again when one comes. A thread that ends frees the vCPU for the next thread.
//!
//! What needs the whole app still (a snapshot, fork, exec) happens on the first vCPU:
//! a thread here that calls fork or exec moves there ([`needs_first_cpu`]), and the first
//! vCPU *holds* the others (`Threads::hold`) until every thread is parked. When a thread
//! here ends the app (exit_group, a fatal signal), the first vCPU ends the run.

use super::{ExitStats, Exits, RunOutcome};
use crate::control::{LiveStats, PendingOps};
use crate::doorbell::{Doorbell, Settled};
use crate::kernel::process::{lock, Process, SharedProcess};
use crate::kernel::thread::{CpuSlot, Parked, Running, TimeSlicer, Wait};
use crate::kvm::kick::{reason, Kicker};
use crate::kvm::vcpu::{ForkedVcpu, Vcpu};
use crate::kvm::{cpu, system, Machine};
use crate::VmmError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What the app's vCPUs share.
#[derive(Debug)]
pub struct CpuShared {
    /// The most vCPUs the app may have (1: every thread on the first).
    limit: usize,
    /// Set while the first vCPU's guest may run.
    pub first_in_guest: Arc<AtomicBool>,
    /// How the app ended, when a thread on another vCPU ended it.
    ending: Mutex<Option<RunOutcome>>,
    /// Set when the run is over: the other vCPUs' threads stop.
    stop: AtomicBool,
    /// The other vCPUs' host threads.
    helpers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The other vCPUs' fds and `kvm_run` pages, for a forked copy of this VMM to let go.
    helper_vcpus: Mutex<Vec<ForkedVcpu>>,
    /// The CPUID and features every vCPU is given (computed for the second vCPU).
    setup: OnceLock<(kvm_bindings::CpuId, cpu::CpuFeatures)>,
    /// Transfers between files and app memory made without the process lock, by any vCPU.
    pub unlocked_transfers: AtomicU64,
    /// Shootdowns that kicked another vCPU out of its guest.
    pub shootdowns: AtomicU64,
}

impl Default for CpuShared {
    /// One vCPU.
    fn default() -> Self {
        Self::new(1)
    }
}

impl CpuShared {
    /// The shared state of an app that may have up to `limit` vCPUs (at least 1).
    pub fn new(limit: usize) -> Self {
        let most = crate::memory::layout::MAX_VCPUS as usize;
        Self {
            limit: limit.clamp(1, most),
            first_in_guest: Arc::new(AtomicBool::new(false)),
            ending: Mutex::new(None),
            stop: AtomicBool::new(false),
            helpers: Mutex::new(Vec::new()),
            helper_vcpus: Mutex::new(Vec::new()),
            setup: OnceLock::new(),
            unlocked_transfers: AtomicU64::new(0),
            shootdowns: AtomicU64::new(0),
        }
    }

    /// The most vCPUs the app may have.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Registers the first vCPU (whose kicker is the process's) with the process state.
    pub fn register_first(&self, p: &mut Process) {
        if p.threads.cpus.is_empty() {
            p.threads.cpus.push(None);
        }
        p.threads.cpus[0] = Some(CpuSlot {
            kicker: p.kicker.clone(),
            in_guest: self.first_in_guest.clone(),
            idle: false,
        });
    }

    /// How a thread on another vCPU ended the app, if one did.
    pub fn take_ending(&self) -> Option<RunOutcome> {
        let outcome = self.ending.lock().unwrap_or_else(|e| e.into_inner()).take();
        if outcome.is_some() {
            // The run ends now: `ended` stays true.
            self.stop.store(true, Ordering::SeqCst);
        }
        outcome
    }

    fn end(&self, p: &Process, outcome: RunOutcome) {
        let mut ending = self.ending.lock().unwrap_or_else(|e| e.into_inner());
        ending.get_or_insert(outcome);
        p.kicker.kick(reason::ENDED);
        // The others stop running the app's code at their next exit.
        for slot in p.threads.cpus.iter().skip(1).flatten() {
            slot.kicker.kick(reason::PREEMPT);
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether the run is over, or a thread on another vCPU ended the app.
    pub fn ended(&self) -> bool {
        self.stopping()
            || self
                .ending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// Stops the other vCPUs' threads and waits for them (the run is over). Must be called
    /// without the process lock.
    pub fn stop_all(&self, process: &SharedProcess) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let p = lock(process);
            for slot in p.threads.cpus.iter().skip(1).flatten() {
                slot.kicker.kick(reason::STOP);
            }
        }
        let helpers = std::mem::take(&mut *self.helpers.lock().unwrap_or_else(|e| e.into_inner()));
        for helper in helpers {
            let _ = helper.join();
        }
    }

    /// Forgets the other vCPUs without stopping them: in a forked process, which has none
    /// of the parent's threads (their handles must not be joined or dropped there). Their
    /// vCPUs' fds are closed and `kvm_run` pages unmapped: nothing here would drop them.
    pub fn forget_helpers(&self) {
        let helpers = std::mem::take(&mut *self.helpers.lock().unwrap_or_else(|e| e.into_inner()));
        std::mem::forget(helpers);
        let vcpus =
            std::mem::take(&mut *self.helper_vcpus.lock().unwrap_or_else(|e| e.into_inner()));
        for vcpu in vcpus {
            // SAFETY: this is the forked process (the only caller), where each of these
            // vCPUs belongs to a parent's thread that does not exist here; the list is
            // taken, so each is released once.
            unsafe { vcpu.release() };
        }
    }
}

/// The calls a thread on another vCPU must make on the first: those that copy or replace
/// the process (fork, vfork, clone of a process, execve).
pub fn needs_first_cpu(p: &mut Process, nr: u64, first_arg: u64) -> bool {
    const CLONE_THREAD: u64 = 0x10000;
    match nr as i64 {
        libc::SYS_fork | libc::SYS_vfork | libc::SYS_execve | libc::SYS_execveat => true,
        libc::SYS_clone => first_arg & CLONE_THREAD == 0,
        libc::SYS_clone3 => {
            // The flags are the first u64 of `struct clone_args`; an unreadable one is the
            // call's own EFAULT, made wherever it runs.
            let flags: Option<u64> = p.mem.read_pod(crate::memory::UserAddr(first_arg)).ok();
            flags.is_some_and(|f| f & CLONE_THREAD == 0)
        }
        _ => false,
    }
}

/// Whether call `nr` with `args` may rewrite page-table entries the guest uses (read them,
/// then write them back): while it does, no other vCPU may run, or the Accessed and Dirty
/// bits its CPU sets in between would be lost. A call that only fills empty entries needs
/// no such care (no CPU caches or sets bits in an entry that is not present): an mmap at
/// an address of the VMM's choosing or one that must replace nothing, a brk that grows,
/// advice that drops nothing. Removals are shot down before the guest runs again anyway
/// (see `Exits::prepare_entry`).
pub fn rewrites_translations(p: &Process, nr: u64, args: &[u64; 6]) -> bool {
    const MAP_FIXED: u64 = 0x10;
    const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
    match nr as i64 {
        libc::SYS_mmap => args[3] & MAP_FIXED != 0 && args[3] & MAP_FIXED_NOREPLACE == 0,
        // Only a brk that shrinks the heap removes entries (brk(0) asks for the break).
        libc::SYS_brk => {
            let (start, current) = p.mem.brk_state();
            args[0] >= start && args[0] < current
        }
        libc::SYS_madvise => matches!(args[2] as i32, libc::MADV_DONTNEED | libc::MADV_FREE),
        libc::SYS_munmap
        | libc::SYS_mprotect
        | libc::SYS_pkey_mprotect
        | libc::SYS_mremap
        | libc::SYS_shmdt => true,
        _ => false,
    }
}

/// Gives thread `parked` (not yet queued) a vCPU of its own if the app may have one more
/// or one is idle: it is pinned to that vCPU. Returns whether it got one.
pub(super) fn place(x: &mut Exits<'_, '_>, parked: &mut Parked) -> Result<bool, VmmError> {
    if x.cpus.limit <= 1 {
        return Ok(false);
    }
    let idle =
        x.p.threads
            .cpus
            .iter()
            .enumerate()
            .skip(1)
            .find(|(cpu, slot)| {
                slot.as_ref().is_some_and(|s| s.idle)
                    && !x.p.threads.parked.iter().any(|t| t.pinned_to == Some(*cpu))
            });
    let cpu = match idle {
        Some((cpu, _)) => cpu,
        None => match start(x)? {
            Some(cpu) => cpu,
            None => return Ok(false),
        },
    };
    parked.pinned_to = Some(cpu);
    if let Some(Some(slot)) = x.p.threads.cpus.get_mut(cpu) {
        slot.idle = false;
    }
    // Runnable or not, the thread is that vCPU's to watch from now on: it looks again.
    x.p.threads.wake_cpu(cpu);
    Ok(true)
}

/// Starts one more vCPU for the app, if it may have one more; returns its number.
fn start(x: &mut Exits<'_, '_>) -> Result<Option<usize>, VmmError> {
    let taken = |cpu: usize| x.p.threads.cpus.get(cpu).is_some_and(Option::is_some);
    let Some(cpu) = (1..x.cpus.limit).find(|&cpu| !taken(cpu)) else {
        return Ok(None);
    };
    // The file offsets the first vCPU's doorbell moves would be that vCPU's alone.
    let p: &mut Process = x.p;
    p.windows.keep_offsets_on_host(&p.mem);
    p.mem.note_several_cpus();
    let (cpuid, features) = match x.cpus.setup.get() {
        Some(setup) => setup.clone(),
        None => {
            let setup = cpu::guest_cpuid(x.machine)?;
            x.cpus.setup.get_or_init(|| setup).clone()
        }
    };
    while x.p.mem.cpus() <= cpu {
        system::add_cpu(&mut x.p.mem, features.nx)?;
    }
    let cr3 = system::cpu_root(&x.p.mem, cpu as u64)?;
    let fd = x.machine.create_another_vcpu(cpu as u64)?;
    cpu::configure(&fd, &cpuid, features, cr3, 0, 0)?;
    if let Some(first) = x.p.clock.tsc {
        // Every vCPU reads the same TSC, as the time page assumes.
        cpu::set_tsc(
            &fd,
            cpu::host_tsc().wrapping_add_signed(first.guest_minus_host),
        )?;
    }
    let mut vcpu = Vcpu::new(fd, x.vcpu.platform())?;
    let forked_copy = vcpu.forked_copy(&x.machine.kvm);
    let in_guest = Arc::new(AtomicBool::new(false));
    let doorbell = Doorbell::new(x.p.mem.phys(), cpu as u64)?;
    if let Some(poller) = x.poller.as_ref() {
        // The vCPU's calls go through its own mailbox, which the one poller serves too.
        poller.add_cpu(cpu, doorbell.mailbox().clone());
    }
    let helper = Helper {
        cpu,
        vcpu,
        machine: x.machine.clone(),
        process: x.process.clone(),
        shared: x.cpus.clone(),
        live: x.live.clone(),
        in_guest: in_guest.clone(),
        doorbell,
        cr3,
        nx: features.nx,
        stats: ExitStats::default(),
        seen_invalidations: x.p.mem.invalidation_count(),
        ops: PendingOps::default(),
        poller: x.poller.clone(),
        control: None,
    };
    let handle = std::thread::Builder::new()
        .name(format!("picocenter-vcpu{cpu}"))
        .stack_size(2 << 20)
        .spawn(move || helper.main())
        .map_err(|source| VmmError::Host {
            what: "a vCPU thread",
            source,
        })?;
    let kicker = Kicker::for_thread(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle))
        .map_err(|source| VmmError::Host {
            what: "a vCPU thread's kicker",
            source,
        })?;
    if x.p.threads.cpus.len() <= cpu {
        x.p.threads.cpus.resize(cpu + 1, None);
    }
    x.p.threads.cpus[cpu] = Some(CpuSlot {
        kicker,
        in_guest,
        idle: true,
    });
    x.cpus
        .helpers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(handle);
    x.cpus
        .helper_vcpus
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(forked_copy);
    tracing::debug!(cpu, "a vCPU for a new thread");
    Ok(Some(cpu))
}

/// A vCPU other than the first, on its own host thread.
struct Helper {
    cpu: usize,
    vcpu: Vcpu,
    machine: Arc<Machine>,
    process: SharedProcess,
    shared: Arc<CpuShared>,
    live: Arc<LiveStats>,
    in_guest: Arc<AtomicBool>,
    doorbell: Doorbell,
    /// The CR3 the vCPU has (an exec replaces the page tables).
    cr3: u64,
    /// Whether no-execute pages are available (for this vCPU's tables in a new address
    /// space).
    nx: bool,
    stats: ExitStats,
    seen_invalidations: u64,
    /// Never used: only the first vCPU takes the control socket's requests.
    ops: PendingOps,
    /// The app's mailbox poller, which serves this vCPU's mailbox too.
    poller: Option<Arc<crate::mailbox::Poller>>,
    control: Option<crate::control::ControlServer>,
}

/// What the code before an entry into the guest decided.
enum Entry {
    /// Run the guest.
    Run,
    /// The thread left this vCPU (parked or ended).
    Left,
    /// The app ended.
    Ended(RunOutcome),
}

impl Helper {
    fn main(mut self) {
        // Its CPU time is the app's: idle detection and metering count it.
        self.live.add_current_app_thread();
        Kicker::arm(self.vcpu.immediate_exit_ptr());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve()));
        Kicker::arm(std::ptr::null_mut());
        self.live
            .retire_current_app_thread(crate::control::current_thread_cpu_ns());
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(crate::report::error_chain(&e)),
            Err(_) => {
                Some(crate::panics::report().unwrap_or_else(|| "a vCPU thread panicked".into()))
            }
        };
        if let Some(report) = failure {
            tracing::error!(cpu = self.cpu, "vCPU {} failed: {report}", self.cpu);
            let p = lock(&self.process);
            self.shared.end(
                &p,
                RunOutcome::Killed {
                    signal: libc::SIGKILL,
                    report: format!("vCPU {} failed: {report}", self.cpu),
                },
            );
        }
    }

    fn kicker(&self, p: &Process) -> Option<Kicker> {
        p.threads
            .cpus
            .get(self.cpu)
            .and_then(|s| s.as_ref())
            .map(|s| s.kicker.clone())
    }

    /// Takes threads and runs them until the run is over.
    fn serve(&mut self) -> Result<(), VmmError> {
        // The vCPU's starter holds the lock until it has registered the slot.
        let Some(kicker) = self.kicker(&lock(&self.process)) else {
            return Ok(());
        };
        loop {
            if self.shared.ended() {
                return Ok(());
            }
            let process = self.process.clone();
            let waits = {
                let mut p = lock(&process);
                let next = if p.threads.hold {
                    None
                } else {
                    p.threads.take_runnable_for(self.cpu)
                };
                if let Some(slot) = p.threads.cpus.get_mut(self.cpu).and_then(Option::as_mut) {
                    slot.idle = next.is_none();
                }
                match next {
                    Some(thread) => {
                        let in_call = thread.in_call;
                        self.load(&mut p, thread)?;
                        drop(p);
                        self.run_thread(in_call, &kicker)?;
                        continue;
                    }
                    None => {
                        let unpinned_runnable = p
                            .threads
                            .parked
                            .iter()
                            .any(|t| t.pinned_to.is_none() && matches!(t.wait, Wait::Runnable));
                        if !p.threads.hold
                            && unpinned_runnable
                            && !p.threads.first_cpu_idle()
                            && p.threads.waits_for(self.cpu)
                        {
                            // Threads wait for a vCPU while this one waits for its own:
                            // the first vCPU watches that wait instead, and this one runs
                            // a thread that can run.
                            for t in p.threads.parked.iter_mut() {
                                if t.pinned_to == Some(self.cpu) {
                                    t.pinned_to = None;
                                }
                            }
                            if p.threads.slicer.is_none() {
                                // The first vCPU looks at the waits it watches at each
                                // time slice's end while it runs a thread.
                                let slicer =
                                    TimeSlicer::start(p.kicker.clone()).map_err(|source| {
                                        VmmError::Host {
                                            what: "the threads' time slicer",
                                            source,
                                        }
                                    })?;
                                p.threads.slicer = Some(slicer);
                            }
                            p.threads.wake_cpu(0);
                            continue;
                        }
                        tracing::trace!(cpu = self.cpu, "idle: {}", p.threads.describe_parked());
                        p.threads.waits_of(self.cpu)
                    }
                }
            };
            let ready = waits
                .poll(std::os::fd::AsFd::as_fd(kicker.wake_fd()), None)
                .map_err(|e| VmmError::Host {
                    what: "waiting for a thread to run",
                    source: e.into(),
                })?;
            kicker.clear(!0);
            let mut p = lock(&self.process);
            // Made runnable here, a thread for the first vCPU must wake it: the wakes
            // look at which vCPU acts (`current_cpu`), and this one has no thread current.
            let first = std::mem::replace(&mut p.threads.current_cpu, self.cpu);
            p.threads.mark_ready(&ready);
            p.threads.current_cpu = first;
        }
    }

    /// Puts `thread` on this vCPU.
    fn load(&mut self, p: &mut Process, thread: Parked) -> Result<(), VmmError> {
        while p.mem.cpus() <= self.cpu {
            // A new address space (exec) has only the first vCPU's tables.
            system::add_cpu(&mut p.mem, self.nx)?;
        }
        p.mem.note_several_cpus();
        let cr3 = system::cpu_root(&p.mem, self.cpu as u64)?;
        if cr3 != self.cr3 {
            // A new address space (exec): this vCPU's tables in it.
            let mut sregs = self.vcpu.sregs()?;
            sregs.cr3 = cr3;
            self.vcpu.set_sregs(&sregs)?;
            self.cr3 = cr3;
        }
        *self.vcpu.regs_mut() = thread.cpu.regs;
        self.vcpu.set_xsave(&thread.cpu.xsave)?;
        let mut state = thread.state;
        state.fs_base_changed = true;
        crate::kernel::clock::publish_tid(p.mem.phys(), self.cpu as u64, state.tid);
        p.run_elsewhere(
            self.cpu,
            Running {
                state,
                signals: thread.signals,
            },
        );
        Ok(())
    }

    fn exits<'a, 'g>(
        &'a mut self,
        p: &'a mut crate::kernel::process::ProcessGuard<'g>,
    ) -> Exits<'a, 'g> {
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
            cpu: self.cpu,
            cpus: &mut self.shared,
            seen_invalidations: &mut self.seen_invalidations,
            thread_left: false,
        }
    }

    /// Runs the thread just loaded until it leaves this vCPU; `in_call`: it stopped in a
    /// call, which it performs first.
    fn run_thread(&mut self, mut in_call: bool, kicker: &Kicker) -> Result<(), VmmError> {
        let mut last_fault = (0u64, 0u64, 0u32);
        loop {
            let entry = {
                let process = self.process.clone();
                let mut p = lock(&process);
                p.enter_cpu(self.cpu);
                let entry = self.before_entry(&mut p, std::mem::take(&mut in_call));
                if matches!(entry, Ok(Entry::Run)) {
                    // Set with the lock held: a vCPU that changes translations holds it
                    // and waits until no other guest runs.
                    self.in_guest.store(true, Ordering::SeqCst);
                }
                p.leave_cpu(self.cpu);
                entry?
            };
            match entry {
                Entry::Run => {}
                Entry::Left => return Ok(()),
                Entry::Ended(outcome) => {
                    self.shared.end(&lock(&self.process), outcome);
                    return Ok(());
                }
            }
            let exit = self.vcpu.run();
            self.in_guest.store(false, Ordering::SeqCst);
            kicker.clear(!0);
            if matches!(exit, crate::kvm::vcpu::Exit::Interrupted) {
                crate::doorbell::restart_in_vdso(&mut self.vcpu)?;
            }
            match self
                .doorbell
                .settle(&mut self.vcpu, self.poller.as_deref())?
            {
                Settled::Outside | Settled::Faulting => {}
                Settled::Recovered(_) => self.stats.rewound_in_doorbell += 1,
                Settled::Stray(report) => {
                    let outcome = RunOutcome::Killed {
                        signal: libc::SIGSEGV,
                        report,
                    };
                    self.shared.end(&lock(&self.process), outcome);
                    return Ok(());
                }
            }
            let process = self.process.clone();
            let mut p = lock(&process);
            if self.shared.ended() {
                // The app ended elsewhere: this exit is not acted on.
                return Ok(());
            }
            p.enter_cpu(self.cpu);
            let mut x = self.exits(&mut p);
            let handled = x.on_exit(exit, &mut last_fault);
            let left = x.thread_left;
            p.leave_cpu(self.cpu);
            match handled? {
                Some(outcome) => {
                    self.shared.end(&p, outcome);
                    return Ok(());
                }
                None if left => return Ok(()),
                None => {}
            }
        }
    }

    /// Everything between two runs of the guest, with the thread current: the call it
    /// stopped in, a hold, signals, what the last exit changed.
    fn before_entry(
        &mut self,
        p: &mut crate::kernel::process::ProcessGuard<'_>,
        in_call: bool,
    ) -> Result<Entry, VmmError> {
        let mut x = self.exits(p);
        x.vcpu.clear_immediate_exit();
        if x.cpus.stopping() {
            // The run is over: nothing of the thread matters any more.
            return Ok(Entry::Left);
        }
        if in_call {
            match x.perform_call()? {
                super::Step::Done(Some(outcome)) => return Ok(Entry::Ended(outcome)),
                super::Step::Done(None) => {}
                super::Step::Switch => return Ok(Entry::Left),
            }
            if x.thread_left {
                return Ok(Entry::Left);
            }
        }
        if (x.p.threads.hold || x.cpus.ended()) && x.at_clean_point()? {
            x.park_current(Wait::Runnable, false)?;
            return Ok(Entry::Left);
        }
        // As on the first vCPU: a signal raised while every thread that could take it ran
        // must still interrupt one.
        x.p.quiet_signals();
        if x.p.signals.deliverable().is_some() && x.at_clean_point()? {
            if let Some(outcome) = x.deliver_signals()? {
                return Ok(Entry::Ended(outcome));
            }
        }
        let blocked_here = x.p.signals.pending & x.p.signals.mask;
        if blocked_here != 0 {
            x.p.threads.interrupt_one(blocked_here);
        }
        x.prepare_entry()?;
        Ok(Entry::Run)
    }
}

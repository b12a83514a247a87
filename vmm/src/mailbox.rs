//! The shared-memory mailbox: a VMM poller thread that answers forwarded syscalls while the
//! app spins in the doorbell, with no VM exit.
//!
//! Every vCPU has a mailbox page of its own (in its vCPU-local area), and one poller serves
//! them all: it answers a call as the thread that runs on the vCPU whose page it came in
//! (`Process::enter_cpu`). Its spin looks at each vCPU's page in turn.
//!
//! The poller spins only while calls keep coming: after [`IDLE`] without one it clears
//! `AWAKE` and sleeps, and the doorbell goes back to exiting. Every exit-path syscall wakes
//! it again, so a burst of calls pays one exit and then goes through the mailbox. An idle
//! app therefore costs no CPU. A call that would block, change the address space or need
//! the vCPU is declined, and the doorbell makes it with an exit instead.
//!
//! The hand-off adapts to CPU contention. The mailbox only pays while the poller has a
//! core of its own; without one, the app's calls wait out the doorbell's spin untaken and
//! then exit anyway. Three things keep that from costing more than exiting at once:
//! - the spin is short, ~6 µs (`mailbox::SPIN`, a count of `pause`s measured per host: a
//!   fixed count was 48 µs on a CPU whose `pause` takes 24 ns);
//! - the poller is SCHED_BATCH, so that a wake does not preempt the thread it lands
//!   beside, which is most often the vCPU thread that woke it (pinned to one core, every
//!   exit used to hand the core to the poller for its idle spin: ~90 µs a call against
//!   ~53 µs by exits);
//! - the run loop reports *missed* calls, made by exit while the poller was awake
//!   ([`Poller::exit_call`]); when they outweigh the taken ones, the poller backs off, and
//!   exits do not wake it for [`MIN_BACKOFF`], doubling up to [`MAX_BACKOFF`] while it
//!   keeps missing, reset once an awake period goes well.
//!
//! The poller's thread itself ends after [`RETIRE_AFTER`] asleep, and the next wake starts
//! another: an idle app keeps no thread for it (issue #18), and the CPU time the ended
//! one used stays the app's.
//!
//! An awake period that answered nothing is not a sign of contention: the app most often
//! blocked in the call that woke the poller (a server's `poll` for its next connection),
//! and backing off then would make its next request's calls all exits.

use crate::kernel::process::lock;
use crate::kvm::kick::reason;
use crate::memory::layout::MAX_VCPUS;
use crate::memory::phys::SharedPage;
use crate::syscalls::{self, Args, SysError};
use picocenter_guest_shim::abi::mailbox::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the poller spins without a call before it sleeps, at least. It spins longer
/// where exits are slow (see [`idle_window`]): an exit wakes it, and the app's next call
/// comes only after that exit's round trip, which it must outlast.
pub const IDLE: Duration = Duration::from_micros(50);
/// How long the poller spins without a call before it sleeps, at most.
pub const MAX_IDLE: Duration = Duration::from_micros(250);
/// Syscall exits per estimate of an exit's round trip.
const EXIT_SAMPLES: u32 = 64;
/// The first back-off after an awake period whose calls mostly went untaken.
pub const MIN_BACKOFF: Duration = Duration::from_millis(2);
/// The longest back-off: how long an app that lost its contention keeps exiting before the
/// mailbox is tried again.
pub const MAX_BACKOFF: Duration = Duration::from_millis(32);
/// How long the poller sleeps unwoken before its thread ends (the next wake starts a new
/// one, ~50 µs): an idle app then keeps no thread for it, its stack, kernel stack and task
/// (~40 KiB, issue #18), while one that makes calls every second or so keeps it.
pub const RETIRE_AFTER: Duration = Duration::from_secs(2);
/// Missed calls an awake period may have before the poller considers backing off (a few
/// are normal: a call posted as the poller falls asleep).
const MISSES_TOLERATED: u64 = 4;

/// When the poller sleeps and what wakes it.
#[derive(Debug)]
struct Sleep {
    /// It sleeps (`AWAKE` is 0).
    asleep: bool,
    /// It backs off: until then, exits do not wake it.
    until: Option<Instant>,
    /// The next back-off's length.
    backoff: Duration,
    /// Its thread ended after sleeping [`RETIRE_AFTER`]; a wake starts another.
    retired: bool,
    /// How long it spins without a call before it sleeps: [`idle_window`] of the last
    /// estimate of an exit's round trip.
    idle: Duration,
    /// The shortest time between two syscall exits of a vCPU in the current sample.
    fastest_exit: Duration,
    /// Syscall exits in the current sample.
    exits_sampled: u32,
}

/// The poller's idle window for an app whose syscall exits come, back to back, every
/// `round_trip` at best: twice that (an exit wakes the poller, and the app's next call
/// comes a round trip later), within [`IDLE`] and [`MAX_IDLE`]. On a host where an exit
/// takes ~100 µs, a 50 µs window had the poller asleep again before every call that
/// followed an exit, and a thread's calls around a `clone` all exited.
fn idle_window(round_trip: Duration) -> Duration {
    round_trip.saturating_mul(2).clamp(IDLE, MAX_IDLE)
}

#[derive(Debug)]
struct Shared {
    /// Each vCPU's mailbox page, by vCPU number, set as the vCPU is made.
    pages: [OnceLock<SharedPage>; MAX_VCPUS as usize],
    /// One more than the highest vCPU number with a page: how far the spin looks.
    cpus: AtomicUsize,
    /// By vCPU: set while the poller takes or performs a call of that vCPU's (a vCPU
    /// settling a call marked taken tells the poller's mark from one the app forged).
    serving: [AtomicBool; MAX_VCPUS as usize],
    process: crate::kernel::process::SharedProcess,
    sleep: Mutex<Sleep>,
    wake: Condvar,
    stop: AtomicBool,
    calls: AtomicU64,
    /// Of those, calls from vCPUs other than the first.
    calls_elsewhere: AtomicU64,
    /// Calls that came by exit while the poller was awake and the mailbox could have
    /// answered them: each waited out the doorbell's spin untaken.
    missed: AtomicU64,
    /// Back-offs so far.
    backoffs: AtomicU64,
}

/// The poller thread of one picoprocess.
#[derive(Debug)]
pub struct Poller {
    shared: Arc<Shared>,
    live: Arc<crate::control::LiveStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Poller {
    /// Starts a (sleeping) poller over the first vCPU's mailbox page `page`.
    pub fn start(
        page: SharedPage,
        process: crate::kernel::process::SharedProcess,
        live: Arc<crate::control::LiveStats>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            pages: std::array::from_fn(|_| OnceLock::new()),
            serving: std::array::from_fn(|_| AtomicBool::new(false)),
            cpus: AtomicUsize::new(0),
            process,
            sleep: Mutex::new(Sleep {
                asleep: true,
                until: None,
                backoff: MIN_BACKOFF,
                retired: false,
                idle: IDLE,
                fastest_exit: Duration::MAX,
                exits_sampled: 0,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            calls_elsewhere: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            backoffs: AtomicU64::new(0),
        });
        let poller = Self {
            shared,
            live,
            thread: Mutex::new(None),
        };
        poller.add_cpu(0, page);
        poller.spawn()?;
        Ok(poller)
    }

    /// Serves vCPU `cpu`'s mailbox `page` too (a spinning poller tells its doorbell so
    /// within 64 spins). The vCPU must not have run yet (its mailbox is reset). A vCPU
    /// keeps its page for the process's life, so a second call for `cpu` changes nothing.
    pub fn add_cpu(&self, cpu: usize, page: SharedPage) {
        let Some(slot) = self.shared.pages.get(cpu) else {
            return;
        };
        if slot.get().is_some() {
            return;
        }
        page.u32(SPIN).store(spin_iterations(), Ordering::SeqCst);
        page.u32(AWAKE).store(0, Ordering::SeqCst);
        page.u32(STATE).store(EMPTY, Ordering::SeqCst);
        let _ = slot.set(page);
        self.shared.cpus.fetch_max(cpu + 1, Ordering::SeqCst);
    }

    /// Starts the poller's thread (the first, or one after a retired one).
    fn spawn(&self) -> std::io::Result<()> {
        let (shared, live) = (self.shared.clone(), self.live.clone());
        let thread = std::thread::Builder::new()
            .name("picocenter-mailbox".into())
            .spawn(move || {
                // Its CPU time is the app's: the worker reads it without asking.
                live.add_current_app_thread();
                batch_scheduling();
                if let Some(used) = run(&shared) {
                    live.retire_current_app_thread(used);
                }
            })?;
        // The previous thread, if any, has retired: it ends on its own.
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(())
    }

    /// Wakes the poller if it sleeps (cheap when it is awake), unless it backs off; starts
    /// a new thread for it if the last one retired.
    pub fn wake(&self) {
        let sleep = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.wake_locked(sleep);
    }

    fn wake_locked(&self, mut sleep: std::sync::MutexGuard<'_, Sleep>) {
        if sleep.asleep && sleep.until.is_none_or(|until| Instant::now() >= until) {
            if sleep.retired {
                // Without a thread (the host refused one) calls go by exits, as while the
                // poller sleeps; the next wake tries again.
                if let Err(e) = self.spawn() {
                    tracing::debug!("the mailbox poller stays retired: {e}");
                    return;
                }
                sleep.retired = false;
            }
            sleep.asleep = false;
            sleep.until = None;
            self.shared.wake.notify_one();
        }
    }

    /// Whether the poller has a thread now (it retires while the app idles).
    pub fn has_thread(&self) -> bool {
        !self
            .shared
            .sleep
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retired
    }

    /// The run loop's report of a syscall `nr` that came by exit on vCPU `cpu`,
    /// `since_last` after that vCPU's previous syscall exit. A call the mailbox may answer
    /// is a miss if the poller was awake, and it wakes the poller as [`Poller::wake`]
    /// does: more such calls most often follow. Other calls (futex, clone, mmap) leave the
    /// poller as it is: an app that makes only those, such as threads that hand work to
    /// each other through futexes, would keep it spinning for nothing, on a core its
    /// vCPUs need. Must be called while that vCPU is stopped.
    pub fn exit_call(&self, cpu: usize, nr: u64, since_last: Option<Duration>) {
        let mut sleep = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gap) = since_last {
            sleep.fastest_exit = sleep.fastest_exit.min(gap);
            sleep.exits_sampled += 1;
            if sleep.exits_sampled >= EXIT_SAMPLES {
                sleep.idle = idle_window(sleep.fastest_exit);
                sleep.fastest_exit = Duration::MAX;
                sleep.exits_sampled = 0;
            }
        }
        let page = self.shared.pages.get(cpu).and_then(|p| p.get());
        // A call the poller declined comes back by exit by design. The flag is the last
        // answer's; cleared here, so that it only ever speaks of the call this exit makes
        // (no call can be in the mailbox while the vCPU is stopped).
        let declined = page.is_some_and(|page| page.u32(DECLINED).swap(0, Ordering::SeqCst) != 0);
        if !syscalls::mailbox_allowed(nr) {
            return;
        }
        if page.is_some_and(|page| page.u32(AWAKE).load(Ordering::SeqCst) != 0) && !declined {
            self.shared.missed.fetch_add(1, Ordering::Relaxed);
        }
        self.wake_locked(sleep);
    }

    /// Whether the poller can still finish a call it took: its thread runs. A retired
    /// one took none (it retires asleep), so a call marked taken then was forged by the
    /// app. It ends otherwise only when stopped, or by a panic.
    pub fn running(&self) -> bool {
        if !self.has_thread() {
            return false;
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Calls answered through the mailbox so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Whether the poller takes or performs a call of vCPU `cpu`'s now.
    pub fn serving(&self, cpu: usize) -> bool {
        self.shared
            .serving
            .get(cpu)
            .is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Of [`Poller::calls`], those from vCPUs other than the first.
    pub fn calls_elsewhere(&self) -> u64 {
        self.shared.calls_elsewhere.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            // Also out of a back-off, which `wake` respects.
            let _sleep = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
            // How the hand-off went, for `RUST_LOG=picocenter_vmm=debug`.
            tracing::debug!(
                answered = self.shared.calls.load(Ordering::Relaxed),
                answered_for_other_vcpus = self.shared.calls_elsewhere.load(Ordering::Relaxed),
                missed = self.shared.missed.load(Ordering::Relaxed),
                backoffs = self.shared.backoffs.load(Ordering::Relaxed),
                "mailbox poller stopped"
            );
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the calling thread (the poller) SCHED_BATCH: a woken poller then never preempts
/// the thread it shares a core with, which is most often the vCPU thread that woke it (the
/// scheduler places a woken thread beside its waker). Preempting it only stops the app it
/// would serve (BENCHMARKS.md, "The mailbox under CPU contention").
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's own policy; `param` outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        tracing::debug!(
            "the mailbox poller stays SCHED_OTHER: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The `pause` iterations that take about [`SPIN_NS`] on this host (measured once per
/// process, in ~10 µs): what the doorbell spins for an untaken call.
fn spin_iterations() -> u32 {
    static ITERATIONS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ITERATIONS.get_or_init(|| {
        const SAMPLE: u32 = 128;
        // The fastest of a few samples: one the thread was preempted in says nothing.
        let fastest = (0..3)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..SAMPLE {
                    std::hint::spin_loop();
                }
                started.elapsed()
            })
            .min()
            .unwrap_or_default();
        let per_pause_ns = (fastest.as_nanos() as f64 / f64::from(SAMPLE)).max(0.1);
        ((f64::from(SPIN_NS) / per_pause_ns) as u32).clamp(64, 1 << 16)
    })
}

/// How an awake period of the poller went, for the back-off decision.
#[derive(Debug, Clone, Copy)]
struct Period {
    /// Calls the poller answered.
    taken: u64,
    /// Calls the app made by exit although the poller was awake and could have answered.
    missed: u64,
}

impl Period {
    /// Whether the poller should stop spinning and back off: its calls mostly went
    /// untaken, so it does not get a core when the app needs it.
    fn losing(&self) -> bool {
        self.missed > MISSES_TOLERATED && self.missed > self.taken.saturating_mul(2)
    }
}

impl Shared {
    /// The vCPUs' mailbox pages so far, with their vCPU numbers.
    fn pages(&self) -> impl Iterator<Item = (usize, &SharedPage)> {
        let cpus = self.cpus.load(Ordering::Acquire).min(self.pages.len());
        self.pages[..cpus]
            .iter()
            .enumerate()
            .filter_map(|(cpu, page)| page.get().map(|page| (cpu, page)))
    }

    /// Tells every vCPU's doorbell whether the poller spins.
    fn set_awake(&self, awake: bool) {
        for (_, page) in self.pages() {
            page.u32(AWAKE).store(awake as u32, Ordering::SeqCst);
        }
    }

    /// Takes and answers one call from each vCPU's mailbox that has one; returns whether
    /// there was any.
    fn take_calls(&self) -> bool {
        let mut took = false;
        for (cpu, page) in self.pages() {
            took |= take_call(self, cpu, page);
        }
        took
    }
}

/// The poller's loop. Returns the CPU time it used for the app when it retires (what it
/// had used when it fell asleep: waking up to retire is not the app's work, and counted
/// as the app's it would look like activity to an idle detector), `None` when stopped.
fn run(shared: &Shared) -> Option<u64> {
    loop {
        let idle = {
            let used = crate::kernel::clock::to_ns(rustix::time::clock_gettime(
                rustix::time::ClockId::ThreadCPUTime,
            ))
            .try_into()
            .unwrap_or(0);
            let mut sleep = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            while sleep.asleep && !shared.stop.load(Ordering::SeqCst) {
                let (guard, waited) = shared
                    .wake
                    .wait_timeout(sleep, RETIRE_AFTER)
                    .unwrap_or_else(|e| e.into_inner());
                sleep = guard;
                if waited.timed_out() && sleep.asleep && !shared.stop.load(Ordering::SeqCst) {
                    // Unwoken for a while: the thread ends; `wake` starts another.
                    sleep.retired = true;
                    return Some(used);
                }
            }
            sleep.idle
        };
        if shared.stop.load(Ordering::SeqCst) {
            shared.set_awake(false);
            return None;
        }
        let misses_before = shared.missed.load(Ordering::Relaxed);
        let taken_before = shared.calls.load(Ordering::Relaxed);
        let period = |shared: &Shared| Period {
            taken: shared.calls.load(Ordering::Relaxed) - taken_before,
            missed: shared.missed.load(Ordering::Relaxed) - misses_before,
        };
        shared.set_awake(true);
        let mut cpus = shared.cpus.load(Ordering::Acquire);
        let mut last_call = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.take_calls() {
                last_call = Instant::now();
                continue;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                if last_call.elapsed() > idle || shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                if period(shared).losing() {
                    break;
                }
                let now = shared.cpus.load(Ordering::Acquire);
                if now != cpus {
                    // A new vCPU's doorbell may post from now on.
                    cpus = now;
                    shared.set_awake(true);
                }
            }
        }
        {
            let mut sleep = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            sleep.asleep = true;
            // Counts only grow, so a period cut short for losing still loses here.
            let ended = period(shared);
            if ended.losing() {
                sleep.until = Some(Instant::now() + sleep.backoff);
                sleep.backoff = (sleep.backoff * 2).min(MAX_BACKOFF);
                shared.backoffs.fetch_add(1, Ordering::Relaxed);
            } else if ended.taken > 0 {
                sleep.backoff = MIN_BACKOFF;
            }
        }
        shared.set_awake(false);
        // A call posted just before AWAKE went to 0 is still served (or the doorbell
        // withdraws it after its spin and exits).
        shared.take_calls();
    }
}

/// Takes and answers the call in vCPU `cpu`'s mailbox `page`, if there is one.
fn take_call(shared: &Shared, cpu: usize, page: &SharedPage) -> bool {
    let state = page.u32(STATE);
    if state.load(Ordering::Relaxed) != REQUEST {
        return false;
    }
    let Some(serving) = shared.serving.get(cpu) else {
        return false;
    };
    // Marked before the call is taken, unmarked after its answer (see `Doorbell::settle`).
    serving.store(true, Ordering::SeqCst);
    if state
        .compare_exchange(REQUEST, TAKEN, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        serving.store(false, Ordering::SeqCst);
        return false;
    }
    let nr = page.u64(NR).load(Ordering::Relaxed);
    let mut args = [0u64; 6];
    for (i, arg) in args.iter_mut().enumerate() {
        *arg = page.u64(ARGS + i as u64 * 8).load(Ordering::Relaxed);
    }
    let (result, declined, notify) = {
        let mut p = lock(&shared.process);
        // The call is that of the thread on vCPU `cpu`. Only a call the app wrote into
        // the page itself, outside the doorbell, can come from a vCPU with no thread on it
        // now (its thread went on to an exit that parked it): it is declined.
        let thread_there = cpu == 0
            || p.threads
                .elsewhere
                .get(cpu)
                .is_some_and(|thread| thread.is_some());
        p.enter_cpu(cpu);
        let outcome = if thread_there && syscalls::mailbox_allowed(nr) {
            crate::panics::test_hook(crate::panics::Place::Mailbox, nr);
            p.thread.in_mailbox = true;
            let outcome = syscalls::perform(&mut p, nr, &Args(args));
            p.thread.in_mailbox = false;
            outcome
        } else {
            Err(SysError::WouldBlock)
        };
        let (result, declined) = match outcome {
            Ok(value) => (value, false),
            Err(SysError::Errno(errno)) => ((-(errno.raw_os_error() as i64)) as u64, false),
            Err(_) => (0, true),
        };
        if matches!(nr as i64, libc::SYS_rt_sigprocmask | libc::SYS_rt_sigaction) {
            // What may interrupt the thread changed: a signal it now takes must kick its
            // vCPU when it is raised (this also takes in those raised meanwhile).
            p.quiet_signals();
        } else if p.kicker.pending() & reason::SIGNAL != 0 {
            p.absorb_external_signals();
        }
        // The VMM acts before the app goes on when a signal is deliverable to it, or when
        // it blocked one that is pending for the whole app: another thread must take it
        // (the exit makes the run loop interrupt one).
        let notify = p.signals.deliverable().is_some()
            || (nr == libc::SYS_rt_sigprocmask as u64 && p.signals.pending & p.signals.mask != 0);
        p.leave_cpu(cpu);
        (result, declined, notify)
    };
    if !declined {
        shared.calls.fetch_add(1, Ordering::Relaxed);
        if cpu != 0 {
            shared.calls_elsewhere.fetch_add(1, Ordering::Relaxed);
        }
    }
    page.u64(RESULT).store(result, Ordering::Relaxed);
    page.u32(DECLINED).store(declined as u32, Ordering::Relaxed);
    page.u32(NOTIFY).store(notify as u32, Ordering::Relaxed);
    state.store(DONE, Ordering::SeqCst);
    serving.store(false, Ordering::SeqCst);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_loses_when_misses_outweigh_taken_calls() {
        let period = |taken, missed| Period { taken, missed };
        // A few misses are normal (a call posted as the poller falls asleep).
        assert!(!period(0, MISSES_TOLERATED).losing());
        assert!(period(0, MISSES_TOLERATED + 1).losing());
        assert!(!period(1000, 100).losing());
        assert!(period(10, 21).losing());
        assert!(!period(10, 20).losing());
    }

    #[test]
    fn the_idle_window_outlasts_an_exit_within_bounds() {
        // A fast host keeps the shortest window; a slow one spins two round trips.
        assert_eq!(idle_window(Duration::from_micros(10)), IDLE);
        assert_eq!(
            idle_window(Duration::from_micros(97)),
            Duration::from_micros(194)
        );
        // A blocking app's gaps say nothing of an exit's cost: the window stays bounded.
        assert_eq!(idle_window(Duration::from_secs(1)), MAX_IDLE);
        assert_eq!(idle_window(Duration::MAX), MAX_IDLE);
    }

    #[test]
    fn the_spin_is_bounded_whatever_a_pause_costs() {
        let spins = spin_iterations();
        assert!((64..=1 << 16).contains(&spins), "{spins}");
        // Measured once per process.
        assert_eq!(spin_iterations(), spins);
    }
}

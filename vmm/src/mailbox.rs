//! The shared-memory mailbox: a VMM poller thread that answers forwarded syscalls while the
//! app spins in the doorbell, with no VM exit.
//!
//! The poller spins only while calls keep coming: after [`IDLE`] without one it clears
//! `AWAKE` and sleeps, and the doorbell goes back to exiting. Every exit-path syscall wakes
//! it again, so a burst of calls pays one exit and then goes through the mailbox. An idle
//! app therefore costs no CPU. A call that would block, change the address space or need
//! the vCPU is declined, and the doorbell makes it with an exit instead.

use crate::kernel::process::lock;
use crate::kernel::process::Process;
use crate::kvm::kick::reason;
use crate::memory::phys::SharedPage;
use crate::syscalls::{self, Args, SysError};
use picocenter_guest_shim::abi::mailbox::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the poller spins without a call before it sleeps.
pub const IDLE: Duration = Duration::from_micros(50);

#[derive(Debug)]
struct Shared {
    page: SharedPage,
    process: Arc<Mutex<Process>>,
    asleep: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    calls: AtomicU64,
}

/// The poller thread of one picoprocess.
#[derive(Debug)]
pub struct Poller {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Poller {
    /// Starts a (sleeping) poller over the mailbox page `page`.
    pub fn start(
        page: SharedPage,
        process: Arc<Mutex<Process>>,
        live: Arc<crate::control::LiveStats>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            page,
            process,
            asleep: Mutex::new(true),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("picocenter-mailbox".into())
            .spawn(move || {
                // Its CPU time is the app's: the worker reads it without asking.
                live.add_app_tid(rustix::thread::gettid().as_raw_nonzero().get());
                run(&worker)
            })?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The poller thread, while it runs.
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Wakes the poller if it sleeps (cheap when it is awake).
    pub fn wake(&self) {
        let mut asleep = self.shared.asleep.lock().unwrap_or_else(|e| e.into_inner());
        if *asleep {
            *asleep = false;
            self.shared.wake.notify_one();
        }
    }

    /// Whether the poller thread still runs: it ends only when stopped, or by a panic.
    pub fn running(&self) -> bool {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Calls answered through the mailbox so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared) {
    let awake = shared.page.u32(AWAKE);
    loop {
        {
            let mut asleep = shared.asleep.lock().unwrap_or_else(|e| e.into_inner());
            while *asleep && !shared.stop.load(Ordering::SeqCst) {
                asleep = shared.wake.wait(asleep).unwrap_or_else(|e| e.into_inner());
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            awake.store(0, Ordering::SeqCst);
            return;
        }
        awake.store(1, Ordering::SeqCst);
        let mut last_call = Instant::now();
        let mut spins = 0u32;
        loop {
            if take_call(shared) {
                last_call = Instant::now();
                continue;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64)
                && (last_call.elapsed() > IDLE || shared.stop.load(Ordering::Relaxed))
            {
                break;
            }
        }
        *shared.asleep.lock().unwrap_or_else(|e| e.into_inner()) = true;
        awake.store(0, Ordering::SeqCst);
        // A call posted just before AWAKE went to 0 is still served (or the doorbell
        // withdraws it after its spin and exits).
        take_call(shared);
    }
}

/// Takes and answers the call in the mailbox, if there is one.
fn take_call(shared: &Shared) -> bool {
    let page = &shared.page;
    let state = page.u32(STATE);
    if state
        .compare_exchange(REQUEST, TAKEN, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    let nr = page.u64(NR).load(Ordering::Relaxed);
    let mut args = [0u64; 6];
    for (i, arg) in args.iter_mut().enumerate() {
        *arg = page.u64(ARGS + i as u64 * 8).load(Ordering::Relaxed);
    }
    let (result, declined, notify) = {
        let mut p = lock(&shared.process);
        let outcome = if syscalls::mailbox_allowed(nr) {
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
        if p.kicker.pending() & reason::SIGNAL != 0 {
            p.absorb_external_signals();
        }
        (result, declined, p.signals.deliverable().is_some())
    };
    if !declined {
        shared.calls.fetch_add(1, Ordering::Relaxed);
    }
    page.u64(RESULT).store(result, Ordering::Relaxed);
    page.u32(DECLINED).store(declined as u32, Ordering::Relaxed);
    page.u32(NOTIFY).store(notify as u32, Ordering::Relaxed);
    state.store(DONE, Ordering::Release);
    true
}

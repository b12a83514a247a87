//! Kicking the vCPU thread out of `KVM_RUN` or a blocking host call.
//!
//! Another thread (a timeout, the control socket) calls [`Kicker::kick`]: it sends a
//! real-time signal to the vCPU thread. The signal handler sets `immediate_exit` in that
//! thread's `kvm_run`, so the kick is not lost even if it lands just before `KVM_RUN`;
//! `KVM_RUN` then returns EINTR. Blocking calls in the VMM wait in `poll` together with the
//! [`Kicker`]'s eventfd, so they wake too.
//!
//! The kernel kicks too: a connection waiting at the control socket raises a signal at the
//! vCPU thread ([`kick_on_connection`]), whose handler kicks with [`reason::CONTROL`].

use rustix::event::EventfdFlags;
use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU running on this thread, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `IMMEDIATE_EXIT` is const-initialised with no destructor, so this access is a plain
    // TLS load, which is async-signal-safe.
    let flag = IMMEDIATE_EXIT.with(|cell| cell.get());
    if !flag.is_null() {
        // SAFETY: the pointer was set by `Kicker::arm` on this thread to a byte of the
        // vCPU's mmapped `kvm_run`, and is cleared before that mapping goes away.
        unsafe { flag.write_volatile(1) };
    }
}

/// The kicker host signals are forwarded to (see [`forward_host_signals`]): a leaked box,
/// since a signal handler may be reading the one a later call replaces.
static FORWARD_TO: std::sync::atomic::AtomicPtr<Kicker> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

fn forward_to() -> Option<&'static Kicker> {
    // SAFETY: the pointer is null or a `Box` leaked by `forward_host_signals`, never freed.
    unsafe { FORWARD_TO.load(Ordering::SeqCst).as_ref() }
}

extern "C" fn on_host_signal(signal: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only atomics, an eventfd write and pthread_kill: all async-signal-safe.
    if let Some(kicker) = forward_to() {
        kicker.raise(signal);
    }
}

/// The host signal that carries a guest signal from one process of an app to another
/// (see [`send_guest_signal`]).
pub(crate) fn guest_signal_carrier() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

extern "C" fn on_guest_signal(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; the carrier is
    // only ever sent with sigqueue, whose value is the guest signal (in the low byte) and
    // for a child's stop or continue, what its SIGCHLD says.
    let value = unsafe { (*info).si_value().sival_ptr } as usize as u64;
    let signal = (value & 0xff) as i32;
    if let Some(kicker) = forward_to() {
        if value & CAPTURE_REQUEST != 0 {
            kicker.kick(reason::CAPTURE);
            return;
        }
        if value & DESCRIBE_REQUEST != 0 {
            kicker.kick(reason::DESCRIBE);
            return;
        }
        if signal == libc::SIGCHLD && value >> 8 != 0 {
            kicker.child_change.store(value, Ordering::SeqCst);
        }
        kicker.raise(signal);
    }
}

/// In the carrier's value: no guest signal, but a request for a part of a tree snapshot.
const CAPTURE_REQUEST: u64 = 1 << 62;

/// In the carrier's value: no guest signal, but a request to publish its description.
const DESCRIBE_REQUEST: u64 = 1 << 61;

/// Asks the app process whose VMM is host process `host_pid` for its part of a tree
/// snapshot (announced in the app's table first).
pub fn send_capture_request(host_pid: i32) -> std::io::Result<()> {
    send_request(host_pid, CAPTURE_REQUEST)
}

/// Asks the app process whose VMM is host process `host_pid` to publish what /proc shows
/// of it to the others (asked in the app's table first).
pub fn send_describe_request(host_pid: i32) -> std::io::Result<()> {
    send_request(host_pid, DESCRIBE_REQUEST)
}

fn send_request(host_pid: i32, request: u64) -> std::io::Result<()> {
    let value = libc::sigval {
        sival_ptr: request as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue copies the value; no memory is shared.
    if unsafe { libc::sigqueue(host_pid, guest_signal_carrier(), value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A child's stop or continue as its SIGCHLD tells it: (si_code, pid, si_status).
pub type ChildChange = (i32, i32, i32);

/// Sends SIGCHLD to the app process whose VMM is host process `host_pid` (a parent) for
/// `change`, which its siginfo will show.
pub fn send_child_change(host_pid: i32, change: ChildChange) -> std::io::Result<()> {
    let (code, pid, status) = change;
    let value = libc::SIGCHLD as u64
        | (u64::from(code as u8) << 8)
        | (u64::from(pid as u32) << 16)
        | (u64::from(status as u8) << 48);
    let value = libc::sigval {
        sival_ptr: value as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue copies the value; no memory is shared.
    if unsafe { libc::sigqueue(host_pid, guest_signal_carrier(), value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises guest signal `signal` in the app process whose VMM is host process `host_pid`
/// (another process of the same app).
pub fn send_guest_signal(host_pid: i32, signal: i32) -> std::io::Result<()> {
    let value = libc::sigval {
        sival_ptr: signal as usize as *mut libc::c_void,
    };
    // SAFETY: sigqueue copies the value; no memory is shared.
    if unsafe { libc::sigqueue(host_pid, guest_signal_carrier(), value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes SIGINT, SIGTERM and SIGHUP sent to this VMM process arrive at the app instead,
/// as they would at a process run in a terminal; so do SIGCHLD (a child process of the app
/// ended) and signals from the app's other processes. A later call (in a forked process,
/// whose vCPU thread has a new kicker) replaces the kicker.
pub fn forward_host_signals(kicker: &Kicker) -> std::io::Result<()> {
    let previous = FORWARD_TO.swap(Box::into_raw(Box::new(kicker.clone())), Ordering::SeqCst);
    // The previous kicker is leaked on purpose: a handler running now may hold it.
    let _ = previous;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
        vmm_sys_util::signal::register_signal_handler(signal, on_host_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    vmm_sys_util::signal::register_signal_handler(guest_signal_carrier(), on_guest_signal)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(())
}

/// The signal a listening socket raises when a connection waits (see
/// [`kick_on_connection`]).
fn connection_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 4
}

/// fcntl's F_SETSIG and F_SETOWN_EX, and the owner type of a thread (Linux's fcntl.h),
/// which the libc crate leaves out for this target.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// Linux's `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// The kicker a waiting connection kicks: a leaked box, as for [`FORWARD_TO`].
static CONNECTION_KICKS: std::sync::atomic::AtomicPtr<Kicker> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_connection(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the pointer is null or a `Box` leaked by `kick_on_connection`, never freed.
    // Only atomics, an eventfd write and pthread_kill follow: all async-signal-safe.
    if let Some(kicker) = unsafe { CONNECTION_KICKS.load(Ordering::SeqCst).as_ref() } {
        kicker.kick(reason::CONTROL);
    }
}

/// Makes a connection waiting at `listener` kick `kicker`'s vCPU thread with
/// [`reason::CONTROL`], so that no thread needs to wait at the socket: the kernel signals
/// the calling thread, which must be that vCPU thread (O_ASYNC, F_SETSIG, F_SETOWN_EX: no
/// other thread's host calls are interrupted), and the handler kicks. Kicks once now too,
/// for connections that came before.
pub fn kick_on_connection(
    kicker: &Kicker,
    listener: &impl std::os::fd::AsRawFd,
) -> std::io::Result<()> {
    let previous = CONNECTION_KICKS.swap(Box::into_raw(Box::new(kicker.clone())), Ordering::SeqCst);
    // The previous kicker is leaked on purpose: a handler running now may hold it.
    let _ = previous;
    // SIGIO too: the kernel falls back to it when the queue of real-time signals is full.
    for signal in [connection_signal(), libc::SIGIO] {
        vmm_sys_util::signal::register_signal_handler(signal, on_connection)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    let fd = listener.as_raw_fd();
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: fcntl on an fd the caller holds open; these commands take integers, but
    // F_SETOWN_EX, which reads one `f_owner_ex` that outlives the call.
    unsafe {
        check(libc::fcntl(fd, F_SETSIG, connection_signal()))?;
        let owner = OwnerEx {
            kind: F_OWNER_TID,
            pid: libc::gettid(),
        };
        check(libc::fcntl(fd, F_SETOWN_EX, &owner as *const OwnerEx))?;
        let flags = check(libc::fcntl(fd, libc::F_GETFL))?;
        check(libc::fcntl(
            fd,
            libc::F_SETFL,
            flags | libc::O_ASYNC | libc::O_NONBLOCK,
        ))?;
    }
    kicker.kick(reason::CONTROL);
    Ok(())
}

/// Why a kick was sent. Several can be pending at once.
pub mod reason {
    /// The run's time limit passed.
    pub const TIMEOUT: u32 = 1 << 0;
    /// An operator asked the app to stop.
    pub const STOP: u32 = 1 << 1;
    /// The VMM wants the app at a clean point (pause, snapshot).
    pub const PAUSE: u32 = 1 << 2;
    /// A signal was raised for the app (see [`super::Kicker::raise`]).
    pub const SIGNAL: u32 = 1 << 3;
    /// A VMM thread panicked: the run must end (see `crate::panics`).
    pub const FAILED: u32 = 1 << 4;
    /// The current app thread's time slice is over (see `crate::kernel::thread::TimeSlicer`).
    pub const PREEMPT: u32 = 1 << 5;
    /// A connection waits at the control socket (see [`super::kick_on_connection`]).
    pub const CONTROL: u32 = 1 << 6;
    /// A thread on another vCPU ended the app (exit_group, a fatal signal): the first
    /// vCPU ends the run (see `crate::run::cpus`).
    pub const ENDED: u32 = 1 << 7;
    /// The app's first process asks this one for its part of a tree snapshot (see
    /// [`super::send_capture_request`]), which it writes at its next clean point.
    pub const CAPTURE: u32 = 1 << 8;
    /// Another process of the app reads this one's maps or fd/ in /proc: it publishes
    /// them (see [`super::send_describe_request`]).
    pub const DESCRIBE: u32 = 1 << 9;
}

/// SIGSTOP, SIGTSTP, SIGTTIN and SIGTTOU (the kernel's `signals::STOP_SIGNALS`; the vCPU
/// layer does not depend on the kernel's state).
const STOP_SIGNALS: u64 = (1 << (libc::SIGSTOP - 1))
    | (1 << (libc::SIGTSTP - 1))
    | (1 << (libc::SIGTTIN - 1))
    | (1 << (libc::SIGTTOU - 1));

/// A handle that interrupts one vCPU thread. Cloneable and `Send`.
#[derive(Debug, Clone)]
pub struct Kicker {
    thread: libc::pthread_t,
    reasons: Arc<AtomicU32>,
    signals: Arc<AtomicU64>,
    quiet: Arc<AtomicU64>,
    wake: Arc<OwnedFd>,
    /// What the last SIGCHLD from a child's stop or continue said (see
    /// [`send_child_change`]), 0 if none.
    child_change: Arc<AtomicU64>,
}

impl Kicker {
    /// Creates a kicker for the calling thread, which must be the vCPU thread.
    pub fn for_current_thread() -> std::io::Result<Self> {
        // SAFETY: pthread_self has no preconditions.
        Self::for_thread(unsafe { libc::pthread_self() })
    }

    /// Creates a kicker for host thread `thread`, a vCPU thread of this process that
    /// lives as long as its picoprocess and arms itself ([`Kicker::arm`]) before it first
    /// runs its vCPU.
    pub fn for_thread(thread: libc::pthread_t) -> std::io::Result<Self> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            thread,
            reasons: Arc::new(AtomicU32::new(0)),
            signals: Arc::new(AtomicU64::new(0)),
            quiet: Arc::new(AtomicU64::new(0)),
            child_change: Arc::new(AtomicU64::new(0)),
            wake: Arc::new(rustix::event::eventfd(
                0,
                EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC,
            )?),
        })
    }

    /// Points this thread's signal handler at `immediate_exit` (null to disarm).
    pub fn arm(immediate_exit: *mut u8) {
        IMMEDIATE_EXIT.with(|cell| cell.set(immediate_exit));
    }

    /// Interrupts the vCPU thread for `why` (a [`reason`] bit).
    pub fn kick(&self, why: u32) {
        self.reasons.fetch_or(why, Ordering::SeqCst);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        // SAFETY: `thread` is the vCPU thread, which lives as long as its picoprocess; a
        // signal to a thread that has exited is reported as ESRCH, not undefined behaviour,
        // with glibc's pthread_kill.
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }

    /// Raises signal `signal` (1..=64) for the app, from any thread: an operator's
    /// SIGTERM, a timer's SIGALRM. A signal the app blocks or already has pending (see
    /// [`Self::set_quiet`]) is only noted: as on Linux, its arrival changes nothing the app
    /// could see, so it does not interrupt the vCPU. Otherwise a timer faster than the
    /// VMM's exits would keep the app from running at all.
    pub fn raise(&self, signal: i32) {
        if (1..=64).contains(&signal) {
            let bit = 1u64 << (signal - 1);
            // Of a SIGCONT and a stop signal, the later one wins, as on Linux: both
            // raised before the vCPU looks must not come out in signal-number order.
            if signal == libc::SIGCONT {
                self.signals.fetch_and(!STOP_SIGNALS, Ordering::SeqCst);
            } else if STOP_SIGNALS & bit != 0 {
                self.signals
                    .fetch_and(!(1u64 << (libc::SIGCONT - 1)), Ordering::SeqCst);
            }
            self.signals.fetch_or(bit, Ordering::SeqCst);
            if self.quiet.load(Ordering::SeqCst) & bit != 0 {
                self.reasons.fetch_or(reason::SIGNAL, Ordering::SeqCst);
            } else {
                self.kick(reason::SIGNAL);
            }
        }
    }

    /// Sets the signals whose raising need not interrupt the vCPU: those the app blocks or
    /// has pending. The vCPU thread sets it before the guest runs or the VMM waits, and
    /// then looks at the raised signals once more, so none raised meanwhile is missed.
    pub fn set_quiet(&self, signals: u64) {
        self.quiet.store(signals, Ordering::SeqCst);
    }

    /// Takes what the last SIGCHLD from a child's stop or continue said, if one came.
    pub fn take_child_change(&self) -> Option<ChildChange> {
        let value = self.child_change.swap(0, Ordering::SeqCst);
        (value >> 8 != 0).then_some((
            ((value >> 8) & 0xff) as i32,
            ((value >> 16) & 0xffff_ffff) as u32 as i32,
            ((value >> 48) & 0xff) as i32,
        ))
    }

    /// Takes the signals raised since the last call (bit n-1 for signal n).
    pub fn take_signals(&self) -> u64 {
        self.signals.swap(0, Ordering::SeqCst)
    }

    /// The reasons kicked so far, without clearing them.
    pub fn pending(&self) -> u32 {
        self.reasons.load(Ordering::SeqCst)
    }

    /// Clears `why` once handled, and drains the eventfd when nothing is left.
    pub fn clear(&self, why: u32) {
        if self.reasons.fetch_and(!why, Ordering::SeqCst) & !why == 0 {
            let _ = rustix::io::read(&*self.wake, &mut [0u8; 8]);
        }
    }

    /// The eventfd that becomes readable on every kick; blocking waits poll it.
    pub fn wake_fd(&self) -> &OwnedFd {
        &self.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(kicker: &Kicker) -> bool {
        rustix::io::read(kicker.wake_fd(), &mut [0u8; 8]).is_ok()
    }

    #[test]
    fn a_blocked_or_pending_signal_is_noted_without_a_kick() {
        let kicker = Kicker::for_current_thread().unwrap();
        kicker.set_quiet(1 << (libc::SIGALRM - 1));
        kicker.raise(libc::SIGALRM);
        assert!(!woken(&kicker), "a quiet signal woke the vCPU thread");
        assert_eq!(kicker.pending(), reason::SIGNAL);
        assert_eq!(kicker.take_signals(), 1 << (libc::SIGALRM - 1));
        kicker.clear(reason::SIGNAL);
        kicker.raise(libc::SIGUSR1);
        assert!(woken(&kicker), "a signal the app can take did not kick");
        assert_eq!(kicker.take_signals(), 1 << (libc::SIGUSR1 - 1));
    }
}

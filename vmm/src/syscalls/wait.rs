//! Blocking on the app's behalf. Every wait is a host `poll` that also watches the kick
//! eventfd, so a blocked app can always be interrupted:
//!
//! * an operator's kick (pause, snapshot, stop, timeout) gives [`SysError::Restart`]: the
//!   app is rewound to re-execute the call, which is invisible to it;
//! * a signal the app does not block gives [`SysError::Interrupted`]: the run loop returns
//!   EINTR or restarts the call (SA_RESTART), then delivers the signal.

use super::SysError;
use crate::fdtable::OpenFile;
use crate::kernel::process::Process;
use crate::kvm::kick::reason;
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::time::Timespec;
use std::os::fd::BorrowedFd;
use std::time::Instant;

/// What interrupted a wait, if anything. Signals the app blocks are left out of the
/// kicks while it waits.
pub(crate) fn interruption(p: &mut Process) -> Option<SysError> {
    // A time slice's end does not interrupt a call: only threads that run are preempted.
    if p.kicker.pending() & !(reason::SIGNAL | reason::PREEMPT) != 0 {
        return Some(SysError::Restart);
    }
    p.quiet_signals();
    // A stop is not an interruption: the call is performed again once the process
    // continues, as on Linux.
    if p.take_stop_signal() {
        return Some(SysError::Restart);
    }
    p.signals.deliverable().map(|_| SysError::Interrupted)
}

fn timeout_until(deadline: Option<Instant>) -> Option<Timespec> {
    deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        })
    })
}

/// Waits until one of `fds` is ready, `deadline` passes, or the app is interrupted.
/// Returns the revents of each fd (all empty on timeout).
pub fn wait_any(
    p: &mut Process,
    fds: &[(BorrowedFd<'_>, PollFlags)],
    deadline: Option<Instant>,
) -> Result<Vec<PollFlags>, SysError> {
    if p.thread.in_mailbox {
        return poll_now(fds, deadline);
    }
    if p.threads.waits_park() {
        // Other threads run while this one waits: it is parked, with copies of the fds,
        // and performs the call again when one is ready (see `crate::kernel::thread`).
        if let Some(stop) = interruption(p) {
            if matches!(stop, SysError::Restart) {
                p.thread.interrupted_deadline = deadline;
            }
            return Err(stop);
        }
        return match poll_now(fds, deadline) {
            Err(SysError::WouldBlock) => {
                let mut owned = Vec::with_capacity(fds.len());
                for (fd, events) in fds {
                    let copy = rustix::io::fcntl_dupfd_cloexec(fd, 0)?;
                    owned.push((std::sync::Arc::new(copy), *events));
                }
                Err(SysError::Block(crate::kernel::thread::Wait::Io {
                    fds: owned,
                    deadline,
                }))
            }
            other => other,
        };
    }
    loop {
        if let Some(stop) = interruption(p) {
            if matches!(stop, SysError::Restart) {
                p.thread.interrupted_deadline = deadline;
            }
            return Err(stop);
        }
        // A thread alone has nothing to switch to: a time slice's end or another vCPU's
        // wake, left pending, would only make every poll below return at once. (Cleared
        // only when pending: `clear` reads the eventfd, a host call on every wait.)
        if p.kicker.pending() & reason::PREEMPT != 0 {
            p.kicker.clear(reason::PREEMPT);
        }
        let wake = p.kicker.wake_fd();
        let mut polled = Vec::with_capacity(fds.len() + 1);
        polled.push(PollFd::new(wake, PollFlags::IN));
        for (fd, events) in fds {
            polled.push(PollFd::from_borrowed_fd(*fd, *events));
        }
        match rustix::event::poll(&mut polled, timeout_until(deadline).as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        // A wake-up with no reason left (one already handled) must not make every later
        // poll return at once. A kick sets its reason before it writes, so none is lost.
        let stale_wake = !polled[0].revents().is_empty() && p.kicker.pending() == 0;
        let ready: Vec<PollFlags> = polled[1..].iter().map(|f| f.revents()).collect();
        if stale_wake {
            let _ = rustix::io::read(p.kicker.wake_fd(), &mut [0u8; 8]);
        }
        if ready.iter().any(|r| !r.is_empty()) {
            return Ok(ready);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(ready);
        }
    }
}

/// A wait on the mailbox path, which must not block: what is ready now, or WouldBlock
/// (unless the deadline has already passed: then nothing is ready, which is the answer).
fn poll_now(
    fds: &[(BorrowedFd<'_>, PollFlags)],
    deadline: Option<Instant>,
) -> Result<Vec<PollFlags>, SysError> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, events)| PollFd::from_borrowed_fd(*fd, *events))
        .collect();
    rustix::event::poll(
        &mut polled,
        Some(&Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }),
    )?;
    let ready: Vec<PollFlags> = polled.iter().map(|f| f.revents()).collect();
    let expired = deadline.is_some_and(|d| Instant::now() >= d);
    if ready.iter().any(|r| !r.is_empty()) || expired {
        Ok(ready)
    } else {
        Err(SysError::WouldBlock)
    }
}

/// Waits until `fd` is ready for `events` (empty flags on timeout).
pub fn wait_fd(
    p: &mut Process,
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
) -> Result<PollFlags, SysError> {
    Ok(wait_any(p, &[(fd, events)], deadline)?[0])
}

/// Sleeps until `deadline` (`None`: forever) or an interruption.
pub fn sleep_until(p: &mut Process, deadline: Option<Instant>) -> Result<(), SysError> {
    wait_any(p, &[], deadline).map(drop)
}

/// Performs `op` on `file` with the blocking behaviour the app asked for: an app-blocking
/// fd waits for `events` and retries while the host says EAGAIN; a non-blocking one gets
/// EAGAIN. Host-blocking fds (the VMM's stdio) are waited on first, so the host call does
/// not block the vCPU thread.
pub fn retry<T>(
    p: &mut Process,
    file: &OpenFile,
    events: PollFlags,
    mut op: impl FnMut(&mut Process) -> Result<T, Errno>,
) -> Result<T, SysError> {
    if !file.host_nonblocking() {
        if !file.nonblocking() && !matches!(file.kind, crate::fdtable::FileKind::Path { .. }) {
            wait_fd(p, file.host(), events, None)?;
        }
        return op(p).map_err(Into::into);
    }
    loop {
        match op(p) {
            Err(Errno::AGAIN) if !file.nonblocking() => {
                wait_fd(p, file.host(), events, None)?;
            }
            other => return other.map_err(Into::into),
        }
    }
}

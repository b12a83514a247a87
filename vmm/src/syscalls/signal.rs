//! Signal dispositions, masks and sources: the calls that set them, and the bookkeeping
//! the run loop uses to deliver signals (see `crate::sigframe`).

use super::{Args, SysError, SysResult};
use crate::process::Process;
use rustix::io::Errno;
use std::time::Duration;
use syscalls::Sysno;

/// Number of signals (1..=64).
pub const NSIG: usize = 64;
/// SA_SIGINFO.
pub const SA_SIGINFO: u64 = 0x4;
/// SA_ONSTACK.
pub const SA_ONSTACK: u64 = 0x0800_0000;
/// SA_RESTART.
pub const SA_RESTART: u64 = 0x1000_0000;
/// SA_NODEFER.
pub const SA_NODEFER: u64 = 0x4000_0000;
/// SA_RESETHAND.
pub const SA_RESETHAND: u64 = 0x8000_0000;
/// SA_RESTORER.
pub const SA_RESTORER: u64 = 0x0400_0000;
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;

/// One `struct sigaction` as the kernel takes it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SigAction {
    /// Handler address, or SIG_DFL (0) / SIG_IGN (1).
    pub handler: u64,
    /// SA_* flags.
    pub flags: u64,
    /// SA_RESTORER's trampoline.
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

/// What happens when a signal arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Run the app's handler.
    Handle(SigAction),
    /// Drop it.
    Ignore,
    /// End the app with it.
    Terminate,
}

/// The bit of signal `n` in a mask.
pub fn bit(signal: i32) -> u64 {
    1u64 << (signal - 1)
}

const UNBLOCKABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

/// Dispositions and pending signals of the thread group, and the current thread's mask,
/// pending signals and alternate stack (see [`crate::thread`]: they are swapped with the
/// thread).
#[derive(Debug, Clone)]
pub struct SignalState {
    /// Indexed by signal number - 1.
    pub actions: [SigAction; NSIG],
    /// The current thread's blocked signals.
    pub mask: u64,
    /// Signals raised for the thread group and not yet delivered.
    pub pending: u64,
    /// Signals sent to the current thread (tgkill) and not yet delivered.
    pub thread_pending: u64,
    /// The current thread's alternate signal stack: (sp, flags, size).
    pub altstack: (u64, i32, u64),
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            actions: [SigAction::default(); NSIG],
            mask: 0,
            pending: 0,
            thread_pending: 0,
            altstack: (0, libc::SS_DISABLE, 0),
        }
    }
}

impl SignalState {
    /// What signal `signal` does now.
    pub fn disposition(&self, signal: i32) -> Disposition {
        let action = self.actions[signal as usize - 1];
        match action.handler {
            SIG_IGN => Disposition::Ignore,
            SIG_DFL => match signal {
                libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT => {
                    Disposition::Ignore
                }
                // Job control has no meaning without a terminal session.
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => {
                    Disposition::Ignore
                }
                _ => Disposition::Terminate,
            },
            _ => Disposition::Handle(action),
        }
    }

    /// Marks `signal` pending, unless it is ignored.
    pub fn raise(&mut self, signal: i32) {
        if (1..=NSIG as i32).contains(&signal) && self.disposition(signal) != Disposition::Ignore {
            self.pending |= bit(signal);
        }
    }

    /// Marks `signal` pending for the current thread only, unless it is ignored.
    pub fn raise_for_thread(&mut self, signal: i32) {
        if (1..=NSIG as i32).contains(&signal) && self.disposition(signal) != Disposition::Ignore {
            self.thread_pending |= bit(signal);
        }
    }

    /// Signals pending for the current thread: its own and the thread group's.
    pub fn all_pending(&self) -> u64 {
        self.pending | self.thread_pending
    }

    /// The lowest pending signal the current thread does not block.
    pub fn deliverable(&self) -> Option<i32> {
        let ready = self.all_pending() & !self.mask;
        (ready != 0).then(|| ready.trailing_zeros() as i32 + 1)
    }

    /// Takes `signal` off the pending sets: the thread's own first, as Linux does.
    pub fn clear(&mut self, signal: i32) {
        if self.thread_pending & bit(signal) != 0 {
            self.thread_pending &= !bit(signal);
        } else {
            self.pending &= !bit(signal);
        }
    }
}

/// rt_sigaction(2).
pub fn rt_sigaction(p: &mut Process, a: &Args) -> SysResult {
    let signal = a.usize(0);
    if signal == 0 || signal > NSIG || a.usize(3) != 8 {
        return Err(Errno::INVAL.into());
    }
    let old = p.signals.actions[signal - 1];
    if !a.ptr(1).is_null() {
        if signal == libc::SIGKILL as usize || signal == libc::SIGSTOP as usize {
            return Err(Errno::INVAL.into());
        }
        let [handler, flags, restorer, mask]: [u64; 4] = p.mem.read_pod(a.ptr(1))?;
        p.signals.actions[signal - 1] = SigAction {
            handler,
            flags,
            restorer,
            mask: mask & !UNBLOCKABLE,
        };
        if handler == SIG_IGN {
            p.signals.pending &= !bit(signal as i32);
            p.signals.thread_pending &= !bit(signal as i32);
        }
    }
    if !a.ptr(2).is_null() {
        p.mem
            .write_pod(a.ptr(2), &[old.handler, old.flags, old.restorer, old.mask])?;
    }
    Ok(0)
}

/// rt_sigprocmask(2).
pub fn rt_sigprocmask(p: &mut Process, a: &Args) -> SysResult {
    if a.usize(3) != 8 {
        return Err(Errno::INVAL.into());
    }
    let old = p.signals.mask;
    if !a.ptr(1).is_null() {
        let set: u64 = p.mem.read_pod(a.ptr(1))?;
        p.signals.mask = match a.i32(0) {
            libc::SIG_BLOCK => old | set,
            libc::SIG_UNBLOCK => old & !set,
            libc::SIG_SETMASK => set,
            _ => return Err(Errno::INVAL.into()),
        } & !UNBLOCKABLE;
    }
    if !a.ptr(2).is_null() {
        p.mem.write_pod(a.ptr(2), &old)?;
    }
    Ok(0)
}

/// rt_sigpending(2).
pub fn rt_sigpending(p: &mut Process, a: &Args) -> SysResult {
    p.absorb_external_signals();
    let pending = p.signals.all_pending() & p.signals.mask;
    p.mem.write_pod(a.ptr(0), &pending)?;
    Ok(0)
}

/// rt_sigsuspend(2) and pause(2): wait for a signal with a temporary mask. The old mask
/// comes back when the handler returns (see `crate::sigframe`).
pub fn suspend(p: &mut Process, sysno: Sysno, a: &Args) -> SysResult {
    let mask = if sysno == Sysno::rt_sigsuspend {
        if a.usize(1) != 8 {
            return Err(Errno::INVAL.into());
        }
        let mask: u64 = p.mem.read_pod(a.ptr(0))?;
        Some(mask & !UNBLOCKABLE)
    } else {
        None
    };
    if let Some(mask) = mask {
        p.thread.saved_mask = Some(p.signals.mask);
        p.signals.mask = mask;
    }
    loop {
        match super::wait::wait_any(p, &[], None) {
            Err(SysError::Interrupted) => return Err(Errno::INTR.into()),
            Err(other) => {
                if let Some(old) = p.thread.saved_mask.take() {
                    p.signals.mask = old;
                }
                return Err(other);
            }
            Ok(_) => {}
        }
    }
}

/// sigaltstack(2).
pub fn sigaltstack(p: &mut Process, a: &Args) -> SysResult {
    let (sp, flags, size) = p.signals.altstack;
    if !a.ptr(1).is_null() {
        let mut old = [0u8; 24];
        old[..8].copy_from_slice(&sp.to_le_bytes());
        old[8..12].copy_from_slice(&flags.to_le_bytes());
        old[16..].copy_from_slice(&size.to_le_bytes());
        p.mem.write(a.ptr(1), &old)?;
    }
    if !a.ptr(0).is_null() {
        let [new_sp, new_flags, new_size]: [u64; 3] = p.mem.read_pod(a.ptr(0))?;
        let new_flags = new_flags as i32;
        if new_flags & !libc::SS_DISABLE != 0 {
            return Err(Errno::INVAL.into());
        }
        if new_flags & libc::SS_DISABLE == 0 && new_size < libc::MINSIGSTKSZ as u64 {
            return Err(Errno::NOMEM.into());
        }
        p.signals.altstack = (new_sp, new_flags, new_size);
    }
    Ok(0)
}

/// kill(2): only the app itself exists to receive it. A signal for the thread group
/// goes to the current thread unless it blocks it, else to a thread that does not.
pub fn kill(p: &mut Process, a: &Args) -> SysResult {
    let (target, signal) = (a.i32(0), a.i32(1));
    let me = crate::process::GUEST_PID;
    if target != me && target != 0 && target != -1 {
        return Err(Errno::SRCH.into());
    }
    if !(0..=NSIG as i32).contains(&signal) {
        return Err(Errno::INVAL.into());
    }
    if signal != 0 {
        p.signals.raise(signal);
        if p.signals.mask & bit(signal) != 0 {
            p.threads.interrupt_one(bit(signal));
        }
    }
    Ok(0)
}

fn timeval_words(d: Duration) -> [i64; 2] {
    [d.as_secs() as i64, d.subsec_micros() as i64]
}

/// alarm(2).
pub fn alarm(p: &mut Process, a: &Args) -> SysResult {
    let (left, _) = p
        .alarm
        .set(Duration::from_secs(a.u32(0) as u64), Duration::ZERO);
    // alarm rounds the time left up to whole seconds, and never reports 0 for a live one.
    let secs = left.as_secs() + (left.subsec_nanos() > 0) as u64;
    Ok(secs)
}

/// setitimer(2) for ITIMER_REAL (the others are refused).
pub fn setitimer(p: &mut Process, a: &Args) -> SysResult {
    if a.i32(0) != libc::ITIMER_REAL {
        return Err(Errno::INVAL.into());
    }
    let (interval, value) = if a.ptr(1).is_null() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let [isec, iusec, vsec, vusec]: [i64; 4] = p.mem.read_pod(a.ptr(1))?;
        (
            crate::timeout::from_timeval(isec, iusec)?,
            crate::timeout::from_timeval(vsec, vusec)?,
        )
    };
    let (left, old_interval) = p.alarm.set(value, interval);
    if !a.ptr(2).is_null() {
        let [i0, i1] = timeval_words(old_interval);
        let [v0, v1] = timeval_words(left);
        p.mem.write_pod(a.ptr(2), &[i0, i1, v0, v1])?;
    }
    Ok(0)
}

/// getitimer(2) for ITIMER_REAL.
pub fn getitimer(p: &mut Process, a: &Args) -> SysResult {
    if a.i32(0) != libc::ITIMER_REAL {
        return Err(Errno::INVAL.into());
    }
    let (left, interval) = p.alarm.get();
    let [i0, i1] = timeval_words(interval);
    let [v0, v1] = timeval_words(left);
    p.mem.write_pod(a.ptr(1), &[i0, i1, v0, v1])?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dispositions_follow_linux() {
        let state = SignalState::default();
        assert_eq!(state.disposition(libc::SIGTERM), Disposition::Terminate);
        assert_eq!(state.disposition(libc::SIGCHLD), Disposition::Ignore);
        assert_eq!(state.disposition(libc::SIGSEGV), Disposition::Terminate);
    }

    #[test]
    fn blocked_signals_wait_and_the_lowest_goes_first() {
        let mut state = SignalState::default();
        state.raise(libc::SIGTERM);
        state.raise(libc::SIGINT);
        state.mask = bit(libc::SIGINT);
        assert_eq!(state.deliverable(), Some(libc::SIGTERM));
        state.pending &= !bit(libc::SIGTERM);
        assert_eq!(state.deliverable(), None);
        state.mask = 0;
        assert_eq!(state.deliverable(), Some(libc::SIGINT));
    }

    #[test]
    fn ignored_signals_are_not_queued() {
        let mut state = SignalState::default();
        state.actions[libc::SIGPIPE as usize - 1].handler = SIG_IGN;
        state.raise(libc::SIGPIPE);
        state.raise(libc::SIGCHLD);
        assert_eq!(state.pending, 0);
    }
}

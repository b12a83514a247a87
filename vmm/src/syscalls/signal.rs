//! Signal dispositions, masks and sources: the calls that set them. The state is in
//! [`crate::kernel::signals`]; the run loop delivers signals.

use super::{Args, SysError, SysResult};
use crate::kernel::process::Process;
use crate::kernel::signals::{bit, SigAction, NSIG, SIG_IGN, UNBLOCKABLE};
use rustix::io::Errno;
use std::time::Duration;
use syscalls::Sysno;

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
        if signal == libc::SIGCHLD as usize {
            p.publish_no_stop_signal();
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
/// comes back when the handler returns (see `crate::run::sigframe`).
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

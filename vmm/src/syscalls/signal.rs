//! Signal dispositions and masks. They are recorded for delivery; a signal the app sends
//! itself with the default action of terminating ends it with that signal.

use super::{Args, SysError, SysResult};
use crate::process::Process;
use rustix::io::Errno;
use syscalls::Sysno;

/// Number of signals (1..=64).
pub const NSIG: usize = 64;

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

/// Dispositions and the blocked mask.
#[derive(Debug, Clone)]
pub struct SignalState {
    /// Indexed by signal number - 1.
    pub actions: [SigAction; NSIG],
    /// Blocked signals (bit n-1 for signal n).
    pub mask: u64,
    /// The alternate signal stack: (sp, flags, size).
    pub altstack: (u64, i32, u64),
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            actions: [SigAction::default(); NSIG],
            mask: 0,
            altstack: (0, libc::SS_DISABLE, 0),
        }
    }
}

const UNBLOCKABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

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

/// kill(2), tkill(2), tgkill(2) aimed at the app itself. A signal whose disposition is the
/// default and whose default is to terminate ends the app; an ignored one is dropped.
pub fn kill(p: &mut Process, sysno: Sysno, a: &Args) -> SysResult {
    let (target, signal) = match sysno {
        Sysno::tgkill => (a.i32(1), a.i32(2)),
        _ => (a.i32(0), a.i32(1)),
    };
    let me = crate::process::GUEST_PID;
    if target != me && target != 0 && target != -1 {
        return Err(Errno::SRCH.into());
    }
    if signal == 0 {
        return Ok(0);
    }
    if signal < 1 || signal as usize > NSIG {
        return Err(Errno::INVAL.into());
    }
    let action = p.signals.actions[signal as usize - 1];
    let ignored_by_default = matches!(
        signal,
        libc::SIGCHLD | libc::SIGURG | libc::SIGWINCH | libc::SIGCONT
    );
    if action.handler == 1 || (action.handler == 0 && ignored_by_default) {
        return Ok(0);
    }
    Err(SysError::Kill {
        signal,
        reason: format!("the app sent itself signal {signal}"),
    })
}

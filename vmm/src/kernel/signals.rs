//! Signals: dispositions and pending signals of the thread group, and the current
//! thread's mask, pending signals and alternate stack (see [`super::thread`]: those are
//! swapped with the thread). The calls that change them are in `syscalls::signal`; the run
//! loop delivers them (`run::sigframe`).

/// Number of signals (1..=64).
pub const NSIG: usize = 64;
/// SA_SIGINFO.
pub const SA_SIGINFO: u64 = 0x4;
/// SA_NOCLDSTOP: no SIGCHLD when a child stops or continues.
pub const SA_NOCLDSTOP: u64 = 0x1;
/// SA_NOCLDWAIT: children that end are not kept for a wait.
pub const SA_NOCLDWAIT: u64 = 0x2;
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
/// SIG_DFL.
pub const SIG_DFL: u64 = 0;
/// SIG_IGN.
pub const SIG_IGN: u64 = 1;

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
    /// Stop the process until SIGCONT (job control: SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU).
    Stop,
}

/// The signals whose default action stops the process.
pub const STOP_SIGNALS: u64 = (1 << (libc::SIGSTOP - 1))
    | (1 << (libc::SIGTSTP - 1))
    | (1 << (libc::SIGTTIN - 1))
    | (1 << (libc::SIGTTOU - 1));

/// The bit of signal `n` in a mask.
pub fn bit(signal: i32) -> u64 {
    1u64 << (signal - 1)
}

/// SIGKILL and SIGSTOP, which no mask blocks.
pub const UNBLOCKABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

/// Dispositions and pending signals of the thread group, and the current thread's mask,
/// pending signals and alternate stack (see [`crate::kernel::thread`]: they are swapped with the
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
    /// Whether stop signals left at their default are ignored: in the app's first
    /// process, its init, as a PID namespace's init ignores them. A fork clears it.
    pub stops_ignored: bool,
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            actions: [SigAction::default(); NSIG],
            mask: 0,
            pending: 0,
            thread_pending: 0,
            altstack: (0, libc::SS_DISABLE, 0),
            stops_ignored: true,
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
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => {
                    if self.stops_ignored {
                        Disposition::Ignore
                    } else {
                        Disposition::Stop
                    }
                }
                _ => Disposition::Terminate,
            },
            _ => Disposition::Handle(action),
        }
    }

    /// Marks `signal` pending, unless it is ignored. As on Linux, a SIGCONT drops the
    /// stop signals pending, and a stop signal a pending SIGCONT, whatever they do.
    pub fn raise(&mut self, signal: i32) {
        if !(1..=NSIG as i32).contains(&signal) {
            return;
        }
        if signal == libc::SIGCONT {
            self.pending &= !STOP_SIGNALS;
            self.thread_pending &= !STOP_SIGNALS;
        } else if STOP_SIGNALS & bit(signal) != 0 {
            self.pending &= !bit(libc::SIGCONT);
            self.thread_pending &= !bit(libc::SIGCONT);
        }
        if self.disposition(signal) != Disposition::Ignore {
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

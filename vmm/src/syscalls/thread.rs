//! Threads: clone and clone3 for threads, exit, gettid, set_robust_list, sched_yield,
//! and futexes. The state they act on is in [`crate::kernel::thread`]; the run loop does what
//! needs the vCPU (a new thread's registers, parking, switching).

use super::{Args, SysError, SysResult};
use crate::kernel::process::Process;
use crate::kernel::shared_futex;
use crate::kernel::thread::Wait;
use rustix::event::PollFlags;
use rustix::io::Errno;
use std::os::fd::AsFd;
use std::time::Instant;

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_PARENT: u64 = 0x8000;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SYSVSEM: u64 = 0x4_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
const CLONE_DETACHED: u64 = 0x40_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;
/// What a thread needs: one address space, fd table, filesystem view and signal actions.
const THREAD_FLAGS: u64 = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD;
/// Flags a thread may add.
const THREAD_OPTIONS: u64 = CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_DETACHED
    | CLONE_CHILD_SETTID;

/// A new thread, as the run loop starts it: on `stack`, with the caller's other
/// registers, RAX = 0.
#[derive(Debug)]
pub struct Spawn {
    /// Its tid.
    pub tid: i32,
    /// Its stack pointer (0: the caller's).
    pub stack: u64,
    /// Its FS base, if CLONE_SETTLS gave one.
    pub tls: Option<u64>,
    /// CLONE_CHILD_CLEARTID's address, or 0.
    pub clear_child_tid: u64,
}

/// The arguments of clone or clone3, made alike.
struct CloneArgs {
    flags: u64,
    stack: u64,
    parent_tid: u64,
    child_tid: u64,
    tls: u64,
}

/// clone(2): a thread, or a new process (see [`super::children`]).
pub fn clone(p: &mut Process, a: &Args) -> SysResult {
    // x86-64 order: flags, stack, parent_tid, child_tid, tls.
    spawn(
        p,
        CloneArgs {
            flags: a.u64(0),
            stack: a.u64(1),
            parent_tid: a.u64(2),
            child_tid: a.u64(3),
            tls: a.u64(4),
        },
    )
}

/// clone3(2), with the same support as clone.
pub fn clone3(p: &mut Process, a: &Args) -> SysResult {
    let size = a.usize(1);
    // CLONE_ARGS_SIZE_VER0 is 64 bytes; later fields must be zero if present.
    if !(64..=4096).contains(&size) {
        return Err(Errno::INVAL.into());
    }
    let mut bytes = vec![0u8; size];
    p.mem.read(a.ptr(0), &mut bytes)?;
    let word =
        |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, then
    // set_tid, set_tid_size, cgroup (none of which is supported). pidfd is only read
    // with CLONE_PIDFD, which is refused. A thread has no exit signal; a process's is in
    // its own field, not in the flags' low byte as with clone.
    let (flags, exit_signal) = (word(0), word(4));
    if bytes[64..].iter().any(|&b| b != 0)
        || flags & 0xff != 0
        || exit_signal > 0xff
        || (exit_signal != 0 && flags & CLONE_THREAD != 0)
    {
        return Err(Errno::INVAL.into());
    }
    let (stack, stack_size) = (word(5), word(6));
    if (stack == 0) != (stack_size == 0) {
        return Err(Errno::INVAL.into());
    }
    spawn(
        p,
        CloneArgs {
            flags: flags | exit_signal,
            // clone3 names the lowest address of the stack; it grows down from the top.
            stack: stack.checked_add(stack_size).ok_or(Errno::INVAL)?,
            parent_tid: word(3),
            child_tid: word(2),
            tls: word(7),
        },
    )
}

fn spawn(p: &mut Process, args: CloneArgs) -> SysResult {
    let flags = args.flags;
    if flags & CLONE_THREAD == 0 {
        // A new process (fork, vfork, posix_spawn's clone).
        return super::children::fork_request(
            flags,
            args.stack,
            args.parent_tid,
            args.child_tid,
            args.tls,
        );
    }
    if flags & THREAD_FLAGS != THREAD_FLAGS {
        return Err(Errno::INVAL.into());
    }
    // The exit signal (low byte) means nothing for a thread.
    let unknown = flags & !(THREAD_FLAGS | THREAD_OPTIONS | 0xff);
    if unknown & (CLONE_PIDFD | CLONE_PARENT) != 0 || unknown != 0 {
        return Err(Errno::INVAL.into());
    }
    if args.stack == 0 {
        // Two threads cannot share one stack.
        return Err(Errno::INVAL.into());
    }
    if flags & CLONE_SETTLS != 0 && !super::process::is_user_canonical(args.tls) {
        return Err(Errno::PERM.into());
    }
    let tid = p.allocate_tid().ok_or(Errno::AGAIN)?;
    if flags & CLONE_PARENT_SETTID != 0 {
        p.mem
            .write_pod(crate::memory::UserAddr(args.parent_tid), &tid)?;
    }
    if flags & CLONE_CHILD_SETTID != 0 {
        p.mem
            .write_pod(crate::memory::UserAddr(args.child_tid), &tid)?;
    }
    Err(SysError::Spawn(Box::new(Spawn {
        tid,
        stack: args.stack,
        tls: (flags & CLONE_SETTLS != 0).then_some(args.tls),
        clear_child_tid: if flags & CLONE_CHILD_CLEARTID != 0 {
            args.child_tid
        } else {
            0
        },
    })))
}

/// exit(2): ends the calling thread; the last one ends the app.
pub fn exit(p: &mut Process, a: &Args) -> SysResult {
    let status = a.i32(0) & 0xff;
    if p.threads.any() {
        Err(SysError::ThreadExit(status))
    } else {
        Err(SysError::Exit(status))
    }
}

/// set_robust_list(2): remembered, and walked when the thread dies.
pub fn set_robust_list(p: &mut Process, a: &Args) -> SysResult {
    // sizeof(struct robust_list_head).
    if a.usize(1) != 24 {
        return Err(Errno::INVAL.into());
    }
    p.thread.robust_list = a.u64(0);
    Ok(0)
}

/// get_robust_list(2) for the caller (pid 0 or its own tid).
pub fn get_robust_list(p: &mut Process, a: &Args) -> SysResult {
    if a.i32(0) != 0 && a.i32(0) != p.thread.tid {
        return Err(Errno::PERM.into());
    }
    p.mem.write_pod(a.ptr(1), &p.thread.robust_list)?;
    p.mem.write_pod(a.ptr(2), &24u64)?;
    Ok(0)
}

/// sched_yield(2).
pub fn sched_yield(p: &mut Process) -> SysResult {
    if p.threads.runnable() {
        Err(SysError::Yield)
    } else {
        Ok(0)
    }
}

const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// What a dying thread owes its robust futexes and `clear_child_tid` (as Linux's
/// exit_robust_list and mm_release): every lock it holds is marked OWNER_DIED and one
/// waiter woken; then `clear_child_tid` is zeroed and one waiter woken (pthread_join).
pub fn release_thread(p: &mut Process) {
    use crate::memory::UserAddr;
    release_robust_list(p);
    let clear = p.thread.clear_child_tid;
    if clear != 0 && p.mem.write_pod(UserAddr(clear), &0u32).is_ok() {
        wake_word(p, clear, false, !0, 1);
    }
}

/// What the threads of a process that ends owe their robust futexes, as each thread's
/// exit does on Linux: a process-shared robust mutex a thread held is marked OWNER_DIED
/// and a waiter woken, in another process of the app. (No `clear_child_tid` is written:
/// the process's memory goes with it.)
pub fn release_robust_lists_at_exit(p: &mut Process) {
    release_robust_list(p);
    let mut parked = std::mem::take(&mut p.threads.parked);
    for thread in parked.iter_mut() {
        std::mem::swap(&mut p.thread, &mut thread.state);
        release_robust_list(p);
        std::mem::swap(&mut p.thread, &mut thread.state);
    }
    p.threads.parked = parked;
    let mut elsewhere = std::mem::take(&mut p.threads.elsewhere);
    for thread in elsewhere.iter_mut().flatten() {
        std::mem::swap(&mut p.thread, &mut thread.state);
        release_robust_list(p);
        std::mem::swap(&mut p.thread, &mut thread.state);
    }
    p.threads.elsewhere = elsewhere;
}

/// The current thread's robust futexes: every lock it holds is marked OWNER_DIED and one
/// waiter woken. A corrupt list is abandoned where it goes wrong, as Linux does.
fn release_robust_list(p: &mut Process) {
    use crate::memory::UserAddr;
    let tid = p.thread.tid as u32;
    let head = p.thread.robust_list;
    if head != 0 {
        let read = |p: &mut Process, at: u64| p.mem.read_pod::<u64>(UserAddr(at)).ok();
        if let (Some(mut entry), Some(offset), Some(pending)) =
            (read(p, head), read(p, head + 8), read(p, head + 16))
        {
            let release = |p: &mut Process, entry: u64| {
                let Some(word_at) = entry.checked_add_signed(offset as i64) else {
                    return;
                };
                if let Ok(word) = p.mem.read_pod::<u32>(UserAddr(word_at)) {
                    if word & FUTEX_TID_MASK == tid {
                        let new = (word & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
                        if p.mem.write_pod(UserAddr(word_at), &new).is_ok() {
                            wake_word(p, word_at, false, !0, 1);
                        }
                    }
                }
            };
            // Linux's ROBUST_LIST_LIMIT.
            for _ in 0..2048 {
                if entry == head || entry == 0 {
                    break;
                }
                let next = read(p, entry);
                if entry != pending {
                    release(p, entry);
                }
                match next {
                    Some(next) => entry = next,
                    None => break,
                }
            }
            if pending != 0 {
                release(p, pending);
            }
        }
    }
}

const FUTEX_WAIT: i32 = 0;
const FUTEX_WAKE: i32 = 1;
const FUTEX_REQUEUE: i32 = 3;
const FUTEX_CMP_REQUEUE: i32 = 4;
const FUTEX_WAKE_OP: i32 = 5;
const FUTEX_WAIT_BITSET: i32 = 9;
const FUTEX_WAKE_BITSET: i32 = 10;
const FUTEX_PRIVATE_FLAG: i32 = 128;
const FUTEX_CLOCK_REALTIME: i32 = 256;
const FUTEX_CMD_MASK: i32 = 0x7f;

/// Wakes up to `count` waiters of the futex at `addr`: this process's own, or for a shared
/// futex (not FUTEX_PRIVATE_FLAG) in shared memory, those of every process of the app
/// (see [`crate::kernel::shared_futex`]). Returns how many.
fn wake_word(p: &mut Process, addr: u64, private: bool, bitset: u32, count: u32) -> u32 {
    match (!private).then(|| p.mem.shared_word(addr, false)) {
        Some(Ok(Some(word))) => shared_futex::wake(word, count),
        _ => p.threads.futex_wake(addr, bitset, count),
    }
}

/// futex(2): waits and wakes between the app's threads, and between its processes for
/// shared futexes in shared memory. Otherwise the private and shared variants are one (a
/// process is one address space), and a futex is named by its address.
pub fn futex(p: &mut Process, a: &Args) -> SysResult {
    let op = a.i32(1);
    let addr = a.u64(0);
    if !addr.is_multiple_of(4) {
        return Err(Errno::INVAL.into());
    }
    let private = op & FUTEX_PRIVATE_FLAG != 0;
    // A shared wait this thread kept while parked serves only the same wait performed
    // again; any other call (or a failure below) cancels it.
    let kept = p.thread.shared_futex.take();
    let count = |i: usize| a.u32(i).min(i32::MAX as u32);
    match op & FUTEX_CMD_MASK {
        FUTEX_WAIT | FUTEX_WAIT_BITSET => {
            let bitset = if op & FUTEX_CMD_MASK == FUTEX_WAIT {
                !0
            } else {
                a.u32(5)
            };
            if bitset == 0 {
                return Err(Errno::INVAL.into());
            }
            match if private {
                None
            } else {
                p.mem.shared_word(addr, false)?
            } {
                Some(word) => shared_wait(p, a, op, word, kept),
                None => wait(p, a, op, addr, bitset),
            }
        }
        FUTEX_WAKE | FUTEX_WAKE_BITSET => {
            let bitset = if op & FUTEX_CMD_MASK == FUTEX_WAKE {
                !0
            } else {
                a.u32(5)
            };
            if bitset == 0 {
                return Err(Errno::INVAL.into());
            }
            Ok(u64::from(wake_word(p, addr, private, bitset, count(2))))
        }
        FUTEX_REQUEUE | FUTEX_CMP_REQUEUE => {
            let target = a.u64(4);
            if !target.is_multiple_of(4) {
                return Err(Errno::INVAL.into());
            }
            let compare = op & FUTEX_CMD_MASK == FUTEX_CMP_REQUEUE;
            if !private {
                if let Some(word) = p.mem.shared_word(addr, false)? {
                    // The waiters are host waiters: the host requeues them.
                    let target = p.mem.shared_word(target, false)?.ok_or(Errno::INVAL)?;
                    return shared_futex::requeue(word, target, count(2), count(3), {
                        compare.then(|| a.u32(5))
                    })
                    .map(u64::from)
                    .map_err(Into::into);
                }
            }
            if compare {
                let current: u32 = p.mem.read_pod(a.ptr(0))?;
                if current != a.u32(5) {
                    return Err(Errno::AGAIN.into());
                }
            }
            let woken = p.threads.futex_wake(addr, !0, count(2));
            // The timeout argument is the requeue limit here.
            let moved = p.threads.futex_requeue(addr, target, count(3));
            Ok(u64::from(woken) + u64::from(moved))
        }
        FUTEX_WAKE_OP => {
            let target = a.u64(4);
            if !target.is_multiple_of(4) {
                return Err(Errno::INVAL.into());
            }
            let encoded = a.u32(5);
            // Check the operation before anything changes.
            wake_op(encoded, 0).ok_or(Errno::NOSYS)?;
            let shared_target = if private {
                None
            } else {
                p.mem.shared_word(target, true)?
            };
            let wake_target = match shared_target {
                // Other processes change it too: one host atomic operation.
                Some(word) => shared_futex::apply(word, |old| wake_op(encoded, old)),
                None => {
                    let old: u32 = p.mem.read_pod(a.ptr(4))?;
                    let (new, wake_target) = wake_op(encoded, old).ok_or(Errno::NOSYS)?;
                    // The process lock is held, so no other call of the app's threads
                    // changes it meanwhile.
                    p.mem.write_pod(a.ptr(4), &new)?;
                    wake_target
                }
            };
            let mut woken = wake_word(p, addr, private, !0, count(2));
            if wake_target {
                woken += wake_word(p, target, private, !0, count(3));
            }
            Ok(u64::from(woken))
        }
        // Priority-inheritance futexes are not supported.
        _ => Err(Errno::NOSYS.into()),
    }
}

/// FUTEX_WAKE_OP's operation on the old value: the new value, and whether to wake the
/// second futex. `None` for an unknown operation or comparison.
fn wake_op(encoded: u32, old: u32) -> Option<(u32, bool)> {
    let op = (encoded >> 28) & 7;
    let shift_arg = encoded & (8 << 28) != 0;
    let cmp = (encoded >> 24) & 15;
    // Both arguments are 12-bit signed numbers.
    let oparg = ((encoded << 8) as i32 >> 20) as u32;
    let cmparg = ((encoded << 20) as i32 >> 20) as u32;
    let oparg = if shift_arg {
        1u32.checked_shl(oparg & 31).unwrap_or(0)
    } else {
        oparg
    };
    let new = match op {
        0 => oparg,
        1 => old.wrapping_add(oparg),
        2 => old | oparg,
        3 => old & !oparg,
        4 => old ^ oparg,
        _ => return None,
    };
    let (o, c) = (old as i32, cmparg as i32);
    let wake = match cmp {
        0 => o == c,
        1 => o != c,
        2 => o < c,
        3 => o <= c,
        4 => o > c,
        5 => o >= c,
        _ => return None,
    };
    Some((new, wake))
}

/// When a FUTEX_WAIT or FUTEX_WAIT_BITSET times out: its relative timeout, or
/// WAIT_BITSET's absolute time on the clock it names; kept across a re-performed wait.
fn wait_deadline(p: &mut Process, a: &Args, op: i32) -> Result<Option<Instant>, SysError> {
    if a.ptr(3).is_null() {
        return Ok(None);
    }
    let ts: libc::timespec = p.mem.read_pod(a.ptr(3))?;
    let timeout = crate::timeout::from_timespec(ts.tv_sec, ts.tv_nsec)?;
    let relative = if op & FUTEX_CMD_MASK == FUTEX_WAIT {
        timeout
    } else {
        let clock = if op & FUTEX_CLOCK_REALTIME != 0 {
            libc::CLOCK_REALTIME
        } else {
            libc::CLOCK_MONOTONIC
        };
        let now = u128::try_from(p.clock.now_ns(clock)?).unwrap_or(0);
        let at = timeout.as_nanos();
        std::time::Duration::from_nanos(u64::try_from(at.saturating_sub(now)).unwrap_or(u64::MAX))
    };
    Ok(p.deadline_after(relative))
}

/// FUTEX_WAIT and FUTEX_WAIT_BITSET on this process's own futexes.
fn wait(p: &mut Process, a: &Args, op: i32, addr: u64, bitset: u32) -> SysResult {
    // A wake that reached this thread while it was parked in this wait ends it.
    if std::mem::take(&mut p.thread.futex_woken) {
        return Ok(0);
    }
    let current: u32 = p.mem.read_pod(a.ptr(0))?;
    if current != a.u32(2) {
        return Err(Errno::AGAIN.into());
    }
    let deadline = wait_deadline(p, a, op)?;
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Errno::TIMEDOUT.into());
    }
    if !p.threads.waits_park() || p.thread.in_mailbox {
        // Alone, nothing but a signal or the timeout ends the wait, as on Linux.
        super::wait::sleep_until(p, deadline)?;
        return Err(Errno::TIMEDOUT.into());
    }
    if let Some(stop) = super::wait::interruption(p) {
        if matches!(stop, SysError::Restart) {
            p.thread.interrupted_deadline = deadline;
        }
        return Err(stop);
    }
    Err(SysError::Block(Wait::Futex {
        addr,
        bitset,
        deadline,
    }))
}

/// FUTEX_WAIT and FUTEX_WAIT_BITSET on a futex in memory shared with other processes,
/// whose host address is `word`: a host wait (see [`crate::kernel::shared_futex`]) that
/// the thread waits for as for an fd, so signals, deadlines and the VMM's kicks end it as
/// they end a read. A parked thread keeps its wait, and its re-performed call looks at it.
fn shared_wait(
    p: &mut Process,
    a: &Args,
    op: i32,
    word: u64,
    kept: Option<std::sync::Arc<shared_futex::SharedFutexWait>>,
) -> SysResult {
    use shared_futex::{SharedFutexWait, SharedWaitOutcome};
    let settle = |outcome| -> SysResult {
        match outcome {
            SharedWaitOutcome::Woken => Ok(0),
            SharedWaitOutcome::Changed => Err(Errno::AGAIN.into()),
            SharedWaitOutcome::Failed(errno) => Err(Errno::from_raw_os_error(errno).into()),
        }
    };
    let kept = kept.filter(|w| w.word() == word);
    if let Some(outcome) = kept.as_ref().and_then(|w| w.outcome()) {
        return settle(outcome);
    }
    let deadline = wait_deadline(p, a, op)?;
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(Errno::TIMEDOUT.into());
    }
    let waiting = match kept {
        Some(waiting) => waiting,
        None => {
            let expected = a.u32(2);
            let current: u32 = p.mem.read_pod(a.ptr(0))?;
            if current != expected {
                return Err(Errno::AGAIN.into());
            }
            // Without a helper thread (too many wait, or the host refused one) the host
            // has no waiter to wake: the caller retries.
            std::sync::Arc::new(SharedFutexWait::start(word, expected).map_err(|e| {
                tracing::debug!("a shared futex wait could not start: {e}");
                Errno::AGAIN
            })?)
        }
    };
    let ready = waiting.ready_fd();
    p.thread.shared_futex = Some(waiting.clone());
    let waited = super::wait::wait_any(p, &[(ready.as_fd(), PollFlags::IN)], deadline);
    if matches!(
        waited,
        Err(SysError::Block(_) | SysError::Restart | SysError::WouldBlock)
    ) {
        // Parked, or to be performed again after the VMM's kick: the thread keeps its
        // wait for the re-performed call, so that a wake meanwhile is not lost.
        return waited.map(|_| 0);
    }
    // Interrupted, timed out or ended: dropping the last handle cancels the host wait.
    p.thread.shared_futex = None;
    waited?;
    match waiting.outcome() {
        Some(outcome) => settle(outcome),
        None => Err(Errno::TIMEDOUT.into()),
    }
}

/// tkill(2) and tgkill(2): a signal for one thread.
pub fn tgkill(p: &mut Process, tgid: Option<i32>, tid: i32, signal: i32) -> SysResult {
    if tgid.is_some_and(|g| g != p.ids.pid) || tid <= 0 {
        return Err(if tgid.is_some_and(|g| g <= 0) {
            Errno::INVAL
        } else {
            Errno::SRCH
        }
        .into());
    }
    if !(0..=crate::kernel::signals::NSIG as i32).contains(&signal) {
        return Err(Errno::INVAL.into());
    }
    if tid == p.thread.tid {
        if signal != 0 {
            p.signals.raise_for_thread(signal);
        }
        return Ok(0);
    }
    let ignored =
        signal != 0 && p.signals.disposition(signal) == crate::kernel::signals::Disposition::Ignore;
    if let Some((target, cpu)) = p.threads.running_mut(tid) {
        // Its vCPU delivers it at its next entry into the guest.
        if signal != 0 && !ignored {
            target.signals.pending |= crate::kernel::signals::bit(signal);
            p.threads.wake_cpu(cpu);
        }
        return Ok(0);
    }
    let Some(target) = p.threads.get_mut(tid) else {
        return Err(Errno::SRCH.into());
    };
    if signal != 0 && !ignored {
        let bit = crate::kernel::signals::bit(signal);
        target.signals.pending |= bit;
        // Its wait ends, to see the signal, unless it blocks it.
        if target.signals.mask & bit == 0 && !matches!(target.wait, Wait::Runnable) {
            target.wait = Wait::Runnable;
            p.threads.wake_for_runnable();
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_op_decodes_like_linux() {
        // FUTEX_OP(FUTEX_OP_SET, 0, FUTEX_OP_CMP_GT, 1): glibc's pthread_cond_signal once.
        let encoded = (4 << 24) | 1;
        assert_eq!(wake_op(encoded, 2), Some((0, true)));
        assert_eq!(wake_op(encoded, 1), Some((0, false)));
        // ADD with a shifted argument: 1 << 3.
        let encoded = ((1 | 8) << 28) | (3 << 12);
        assert_eq!(wake_op(encoded, 1), Some((9, false)));
        // Unknown operation.
        assert_eq!(wake_op(7 << 28, 0), None);
    }
}

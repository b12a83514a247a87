//! Processes of an app: fork (and vfork, and clone without CLONE_THREAD), wait4 and
//! waitid, process groups and sessions, and kill across the app's processes.
//!
//! A fork is a host fork of the VMM (the run loop does it, see `crate::run::fork`); this
//! file decides what the app asked for. A child's VMM is a host child of its parent's, so
//! a parent waits on its children's pidfds and reads their statuses with the host's
//! waitid: a child VMM ends with its app process's exit status or signal.

use super::{Args, SysError, SysResult};
use crate::kernel::process::Process;
use crate::kernel::signals::{bit, NSIG};
use crate::kernel::tree::{ChildProcess, ProcessIds};
use rustix::event::PollFlags;
use rustix::io::Errno;
use std::os::fd::AsFd;

pub(crate) const CLONE_VM: u64 = 0x100;
pub(crate) const CLONE_VFORK: u64 = 0x4000;
pub(crate) const CLONE_SETTLS: u64 = 0x8_0000;
pub(crate) const CLONE_PARENT_SETTID: u64 = 0x10_0000;
pub(crate) const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
pub(crate) const CLONE_CHILD_SETTID: u64 = 0x100_0000;
/// The exit signal, in the low byte.
const EXIT_SIGNAL: u64 = 0xff;
/// What a new process may ask for. Sharing an fd table, a filesystem view or signal
/// actions between processes (CLONE_FILES, CLONE_FS, CLONE_SIGHAND without a thread) is
/// not supported; CLONE_VM only with CLONE_VFORK, where the parent waits anyway.
const PROCESS_FLAGS: u64 = CLONE_VM
    | CLONE_VFORK
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_CHILD_SETTID
    | EXIT_SIGNAL;

/// A new process, as the run loop forks it.
#[derive(Debug, Clone, Copy)]
pub struct ForkRequest {
    /// The child's stack pointer (0: the caller's).
    pub stack: u64,
    /// Its FS base, if CLONE_SETTLS gave one.
    pub tls: Option<u64>,
    /// Where the parent's copy gets the child's pid (CLONE_PARENT_SETTID).
    pub parent_tid: Option<u64>,
    /// Where the child's copy gets its pid (CLONE_CHILD_SETTID).
    pub child_tid: Option<u64>,
    /// CLONE_CHILD_CLEARTID's address, or 0.
    pub clear_child_tid: u64,
    /// Whether the parent waits until the child calls execve or ends (vfork).
    pub vfork: bool,
}

/// A clone without CLONE_THREAD: a new process.
pub(crate) fn fork_request(
    flags: u64,
    stack: u64,
    parent_tid: u64,
    child_tid: u64,
    tls: u64,
) -> SysResult {
    if flags & !PROCESS_FLAGS != 0 || (flags & CLONE_VM != 0 && flags & CLONE_VFORK == 0) {
        return Err(Errno::INVAL.into());
    }
    // A non-canonical FS base would fail the child's VM entry.
    if flags & CLONE_SETTLS != 0 && !super::process::is_user_canonical(tls) {
        return Err(Errno::PERM.into());
    }
    Err(SysError::Fork(Box::new(ForkRequest {
        stack,
        tls: (flags & CLONE_SETTLS != 0).then_some(tls),
        parent_tid: (flags & CLONE_PARENT_SETTID != 0).then_some(parent_tid),
        child_tid: (flags & CLONE_CHILD_SETTID != 0).then_some(child_tid),
        clear_child_tid: if flags & CLONE_CHILD_CLEARTID != 0 {
            child_tid
        } else {
            0
        },
        vfork: flags & CLONE_VFORK != 0,
    })))
}

/// fork(2).
pub fn fork() -> SysResult {
    fork_request(libc::SIGCHLD as u64, 0, 0, 0, 0)
}

/// vfork(2).
pub fn vfork() -> SysResult {
    fork_request(CLONE_VM | CLONE_VFORK | libc::SIGCHLD as u64, 0, 0, 0, 0)
}

/// How an ended child ended, as wait4's status word and waitid's code and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// wait4's status.
    pub status: i32,
    /// waitid's si_code: CLD_EXITED, CLD_KILLED or CLD_DUMPED.
    pub code: i32,
    /// waitid's si_status: the exit code or the signal.
    pub value: i32,
}

impl Ended {
    /// A child stopped by `signal` (job control).
    fn stopped(signal: i32) -> Self {
        Self {
            status: (signal << 8) | 0x7f,
            code: libc::CLD_STOPPED,
            value: signal,
        }
    }

    /// A stopped child continued.
    fn continued() -> Self {
        Self {
            status: 0xffff,
            code: libc::CLD_CONTINUED,
            value: libc::SIGCONT,
        }
    }

    fn from_host(status: &rustix::process::WaitIdStatus) -> Self {
        if let Some(code) = status.exit_status() {
            return Self {
                status: (code & 0xff) << 8,
                code: libc::CLD_EXITED,
                value: code & 0xff,
            };
        }
        let signal = status.terminating_signal().unwrap_or(libc::SIGKILL);
        let dumped = status.dumped();
        Self {
            status: signal | if dumped { 0x80 } else { 0 },
            code: if dumped {
                libc::CLD_DUMPED
            } else {
                libc::CLD_KILLED
            },
            value: signal,
        }
    }
}

/// Which children a wait names.
#[derive(Debug, Clone, Copy)]
enum Which {
    Any,
    Pid(i32),
    Group(i32),
}

fn matches(p: &Process, child: &ChildProcess, which: Which) -> bool {
    match which {
        Which::Any => true,
        Which::Pid(pid) => child.pid == pid,
        Which::Group(pgid) => {
            p.tree
                .as_ref()
                .and_then(|tree| tree.find(child.pid))
                .map_or(child.pgid, |m| m.pgid)
                == pgid
        }
    }
}

/// What a wait reports: which changes of state (wait4's WUNTRACED and WCONTINUED,
/// waitid's WEXITED, WSTOPPED and WCONTINUED), and whether it leaves them reportable
/// (WNOWAIT).
#[derive(Debug, Clone, Copy)]
struct Wanted {
    exited: bool,
    stopped: bool,
    continued: bool,
    keep: bool,
}

/// Looks for a child among those `which` names that changed state as `wanted` asks: it
/// ended, stopped or continued (in that order for each child, as Linux looks).
/// `Ok(None)`: some match, none has changed; ECHILD: none match.
fn reap(p: &mut Process, which: Which, wanted: Wanted) -> Result<Option<(i32, Ended)>, Errno> {
    if wanted.stopped || wanted.continued {
        // Emptied before the look: a change after it wakes the next wait.
        p.jobs.drain();
    }
    look(p, which, wanted)
}

/// What a SIGCHLD being delivered tells of, for its siginfo: a child that ended, stopped
/// or continued and that no wait has reported yet (left for the wait to report).
pub(crate) fn sigchld_cause(p: &mut Process) -> Option<(i32, Ended)> {
    let wanted = Wanted {
        exited: true,
        stopped: true,
        continued: true,
        keep: true,
    };
    look(p, Which::Any, wanted).ok().flatten()
}

/// [`reap`]'s look at the children.
fn look(p: &mut Process, which: Which, wanted: Wanted) -> Result<Option<(i32, Ended)>, Errno> {
    let mut any = false;
    for index in 0..p.children.len() {
        let child = &p.children[index];
        if !matches(p, child, which) {
            continue;
        }
        any = true;
        let pid = child.pid;
        if wanted.exited {
            if let Some(status) = child.ended(wanted.keep)? {
                let ended = Ended::from_host(&status);
                if !wanted.keep {
                    p.children.remove(index);
                    if let Some(tree) = &p.tree {
                        tree.release(pid);
                    }
                }
                return Ok(Some((pid, ended)));
            }
        }
        let Some(tree) = &p.tree else {
            continue;
        };
        if wanted.stopped {
            if let Some(signal) = tree.take_stop(pid, wanted.keep) {
                return Ok(Some((pid, Ended::stopped(signal))));
            }
        }
        if wanted.continued && tree.take_continued(pid, wanted.keep) {
            return Ok(Some((pid, Ended::continued())));
        }
    }
    if any {
        Ok(None)
    } else {
        Err(Errno::CHILD)
    }
}

/// Waits (unless `nohang`) for a child `which` names to change state as `wanted` asks.
fn wait_for(
    p: &mut Process,
    which: Which,
    nohang: bool,
    wanted: Wanted,
) -> Result<Option<(i32, Ended)>, SysError> {
    loop {
        if let Some(found) = reap(p, which, wanted)? {
            return Ok(Some(found));
        }
        if nohang {
            return Ok(None);
        }
        // An ended child's pidfd stays readable: watched only by a wait for exits.
        let mut fds: Vec<_> = p
            .children
            .iter()
            .filter(|c| wanted.exited && matches(p, c, which))
            .map(|c| c.pidfd.try_clone())
            .collect::<Result<_, _>>()
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::NOMEM))?;
        if wanted.stopped || wanted.continued {
            if let Some(changed) = &p.jobs.children_changed {
                fds.push(rustix::io::fcntl_dupfd_cloexec(&**changed, 0)?);
            }
        }
        let polled: Vec<_> = fds.iter().map(|fd| (fd.as_fd(), PollFlags::IN)).collect();
        super::wait::wait_any(p, &polled, None)?;
    }
}

/// The children a pid argument of wait4 names.
fn which_of(p: &Process, pid: i32) -> Result<Which, Errno> {
    Ok(match pid {
        -1 => Which::Any,
        0 => Which::Group(p.group().0),
        i32::MIN => return Err(Errno::SRCH),
        pid if pid < 0 => Which::Group(-pid),
        pid => Which::Pid(pid),
    })
}

/// wait4(2): exits and signals, and with WUNTRACED and WCONTINUED, stops and continues.
pub fn wait4(p: &mut Process, a: &Args) -> SysResult {
    const KNOWN: i32 = libc::WNOHANG
        | libc::WUNTRACED
        | libc::WCONTINUED
        | libc::__WALL
        | libc::__WCLONE
        | libc::__WNOTHREAD;
    let (pid, status_at, options, rusage_at) = (a.i32(0), a.ptr(1), a.i32(2), a.ptr(3));
    if options & !KNOWN != 0 {
        return Err(Errno::INVAL.into());
    }
    let which = which_of(p, pid)?;
    let wanted = Wanted {
        exited: true,
        stopped: options & libc::WUNTRACED != 0,
        continued: options & libc::WCONTINUED != 0,
        keep: false,
    };
    match wait_for(p, which, options & libc::WNOHANG != 0, wanted)? {
        None => Ok(0),
        Some((pid, ended)) => {
            if !status_at.is_null() {
                p.mem.write_pod(status_at, &ended.status)?;
            }
            if !rusage_at.is_null() {
                p.mem.write(rusage_at, &[0u8; 144])?;
            }
            Ok(pid as u64)
        }
    }
}

/// waitid(2): P_ALL, P_PID and P_PGID, for children that exited (WEXITED), stopped
/// (WSTOPPED) or continued (WCONTINUED).
pub fn waitid(p: &mut Process, a: &Args) -> SysResult {
    const KNOWN: i32 = libc::WNOHANG
        | libc::WEXITED
        | libc::WSTOPPED
        | libc::WCONTINUED
        | libc::WNOWAIT
        | libc::__WALL
        | libc::__WCLONE
        | libc::__WNOTHREAD;
    let (idtype, id, info_at, options) = (a.u32(0), a.i32(1), a.ptr(2), a.i32(3));
    if options & !KNOWN != 0 || options & (libc::WEXITED | libc::WSTOPPED | libc::WCONTINUED) == 0 {
        return Err(Errno::INVAL.into());
    }
    let which = match idtype {
        libc::P_ALL => Which::Any,
        libc::P_PID if id > 0 => Which::Pid(id),
        libc::P_PGID if id >= 0 => Which::Group(if id == 0 { p.group().0 } else { id }),
        libc::P_PID | libc::P_PGID => return Err(Errno::INVAL.into()),
        _ => return Err(Errno::INVAL.into()),
    };
    let wanted = Wanted {
        exited: options & libc::WEXITED != 0,
        stopped: options & libc::WSTOPPED != 0,
        continued: options & libc::WCONTINUED != 0,
        keep: options & libc::WNOWAIT != 0,
    };
    let found = wait_for(p, which, options & libc::WNOHANG != 0, wanted)?;
    if !info_at.is_null() {
        let mut info = [0u8; 128];
        if let Some((pid, ended)) = found {
            info[0..4].copy_from_slice(&libc::SIGCHLD.to_le_bytes());
            info[8..12].copy_from_slice(&ended.code.to_le_bytes());
            info[16..20].copy_from_slice(&pid.to_le_bytes());
            info[24..28].copy_from_slice(&ended.value.to_le_bytes());
        }
        p.mem.write(info_at, &info)?;
    }
    Ok(0)
}

/// The (group, session) of this process (pid 0 or its own) or another of the app.
fn group_of(p: &Process, pid: i32) -> Result<(i32, i32), Errno> {
    if pid == 0 || pid == p.ids.pid {
        return Ok(p.group());
    }
    let member = p.tree.as_ref().and_then(|t| t.find(pid));
    member.map(|m| (m.pgid, m.sid)).ok_or(Errno::SRCH)
}

/// getpgid(2) (and getpgrp).
pub fn getpgid(p: &Process, pid: i32) -> SysResult {
    Ok(group_of(p, pid)?.0 as u64)
}

/// getsid(2).
pub fn getsid(p: &Process, pid: i32) -> SysResult {
    Ok(group_of(p, pid)?.1 as u64)
}

/// setpgid(2): for this process or one of its children, into a group of its session.
pub fn setpgid(p: &mut Process, a: &Args) -> SysResult {
    let (pid, pgid) = (a.i32(0), a.i32(1));
    if pgid < 0 {
        return Err(Errno::INVAL.into());
    }
    let pid = if pid == 0 { p.ids.pid } else { pid };
    let pgid = if pgid == 0 { pid } else { pgid };
    let (_, sid) = p.group();
    if pid != p.ids.pid && !p.children.iter().any(|c| c.pid == pid) {
        return Err(Errno::SRCH.into());
    }
    let target_sid = if pid == p.ids.pid {
        sid
    } else {
        p.tree
            .as_ref()
            .and_then(|t| t.find(pid))
            .map_or(sid, |m| m.sid)
    };
    if target_sid != sid || pid == target_sid {
        // Another session's, or a session leader.
        return Err(Errno::PERM.into());
    }
    // The group must be the process's own or exist in its session.
    let exists = pgid == pid
        || p.group().0 == pgid
        || p.tree
            .as_ref()
            .is_some_and(|t| t.members().iter().any(|m| m.pgid == pgid && m.sid == sid));
    if !exists {
        return Err(Errno::PERM.into());
    }
    if pid == p.ids.pid {
        p.ids.pgid = pgid;
    }
    if let Some(child) = p.children.iter_mut().find(|c| c.pid == pid) {
        child.pgid = pgid;
    }
    if let Some(tree) = &p.tree {
        tree.update(ProcessIds {
            pid,
            ppid: p.ids.ppid,
            pgid,
            sid,
        });
    }
    Ok(0)
}

/// setsid(2): a new session and group led by the caller, which must not lead a group.
pub fn setsid(p: &mut Process) -> SysResult {
    let (pgid, _) = p.group();
    if pgid == p.ids.pid {
        return Err(Errno::PERM.into());
    }
    p.ids.pgid = p.ids.pid;
    p.ids.sid = p.ids.pid;
    if let Some(tree) = &p.tree {
        tree.update(p.ids);
    }
    Ok(p.ids.pid as u64)
}

/// Raises `signal` (0: only checks) in this process, as kill(2) does for its own pid.
fn raise_here(p: &mut Process, signal: i32) {
    if signal != 0 {
        p.signals.raise(signal);
        if p.signals.mask & bit(signal) != 0 {
            p.threads.interrupt_one(bit(signal));
        }
    }
}

/// kill(2): to this process, another of the app, a group (0 or -pgid) or every process of
/// the app but the caller (-1). Nothing outside the app can be named.
pub fn kill(p: &mut Process, a: &Args) -> SysResult {
    let (target, signal) = (a.i32(0), a.i32(1));
    if !(0..=NSIG as i32).contains(&signal) {
        return Err(Errno::INVAL.into());
    }
    if target == i32::MIN {
        return Err(Errno::SRCH.into());
    }
    let me = p.ids.pid;
    let members = p.tree.as_ref().map(|t| t.members()).unwrap_or_default();
    let (own_group, _) = p.group();
    let targets: Vec<(i32, i32)> = if members.is_empty() {
        // The app has never forked: it is alone.
        match target {
            t if t == me || t == 0 || t == -1 || t == -own_group => vec![(me, 0)],
            _ => Vec::new(),
        }
    } else {
        members
            .iter()
            .filter(|m| match target {
                t if t > 0 => m.pid == t,
                0 => m.pgid == own_group,
                -1 => m.pid != me || members.len() == 1,
                t => m.pgid == -t,
            })
            .map(|m| (m.pid, m.host_pid))
            .collect()
    };
    if targets.is_empty() {
        return Err(Errno::SRCH.into());
    }
    for (pid, host_pid) in targets {
        if pid == me {
            raise_here(p, signal);
        } else if signal != 0 && host_pid > 0 {
            // A process that ended meanwhile is simply not signalled, as with a zombie.
            let _ = crate::kvm::kick::send_guest_signal(host_pid, signal);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_clones_are_checked_like_linux() {
        let fork = |flags| fork_request(flags, 0, 0, 0, 0);
        assert!(matches!(fork(libc::SIGCHLD as u64), Err(SysError::Fork(_))));
        let Err(SysError::Fork(request)) = fork(CLONE_VM | CLONE_VFORK | 17) else {
            panic!("posix_spawn's clone is a vfork");
        };
        assert!(request.vfork);
        // Memory shared without vfork, or an fd table shared between processes.
        assert!(matches!(
            fork(CLONE_VM | 17),
            Err(SysError::Errno(Errno::INVAL))
        ));
        assert!(matches!(
            fork(0x400 | 17),
            Err(SysError::Errno(Errno::INVAL))
        ));
    }
}

//! The syscall table, as gVisor's linux64.go: one entry per call, with its handler,
//! whether it may be restarted after a SA_RESTART handler interrupts it (Linux's
//! ERESTARTSYS calls; the rest fail with EINTR), whether the mailbox poller may answer it
//! (it must not change the address space, the vCPU or the app's life, and must not block:
//! it is declined if it would), and how far it is supported. The dispatch, the restart
//! and mailbox lists, `--trace-syscalls` names and the README's syscall table all come
//! from here ([`markdown`]).

use super::*;
use credentials::Kind::{Group, User};
use syscalls::Sysno;
use Support::*;

/// A handler: the process, the call's number (for handlers shared by several calls) and
/// its arguments.
pub type Handler = fn(&mut Process, Sysno, &Args) -> SysResult;

/// How far a call is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// As Linux does it.
    Full,
    /// With a difference (the note says which).
    Partly(&'static str),
    /// Not supported: the note says what the app gets.
    Unsupported(&'static str),
}

/// One system call.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The call.
    pub sysno: Sysno,
    /// What performs it.
    pub handler: Handler,
    /// Whether an interrupted call restarts after a SA_RESTART handler.
    pub restartable: bool,
    /// Whether the mailbox poller may answer it.
    pub mailbox: bool,
    /// How far it is supported.
    pub support: Support,
}

const NONE: u8 = 0;
const R: u8 = 1;
const M: u8 = 2;
const RM: u8 = R | M;

/// The note of the calls that change ids.
const IDS: &str = "Linux's rules; the ids do not narrow what the sandbox lets the app do";

const fn call(sysno: Sysno, handler: Handler, flags: u8, support: Support) -> Entry {
    Entry {
        sysno,
        handler,
        restartable: flags & R != 0,
        mailbox: flags & M != 0,
        support,
    }
}

/// Every call the VMM knows. A call not here gets ENOSYS, logged once by name.
pub static TABLE: &[Entry] = &[
    call(Sysno::read, |p, _, a| fs::read(p, a), RM, Full),
    call(Sysno::write, |p, _, a| fs::write(p, a), RM, Full),
    call(Sysno::pread64, |p, _, a| fs::pread64(p, a), RM, Full),
    call(Sysno::pwrite64, |p, _, a| fs::pwrite64(p, a), RM, Full),
    call(Sysno::readv, |p, _, a| fs::readv(p, a), RM, Full),
    call(Sysno::writev, |p, _, a| fs::writev(p, a), RM, Full),
    call(Sysno::preadv, |p, _, a| fs::preadv(p, a), RM, Full),
    call(Sysno::pwritev, |p, _, a| fs::pwritev(p, a), RM, Full),
    call(Sysno::lseek, |p, _, a| fs::lseek(p, a), M, Full),
    call(Sysno::close, |p, _, a| fs::close(p, a), M, Full),
    call(Sysno::close_range, |p, _, a| fs::close_range(p, a), NONE, Full),
    call(Sysno::getxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::lgetxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::fgetxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::setxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::lsetxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::fsetxattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::listxattr, fs::xattr, NONE, Partly("empty")),
    call(Sysno::llistxattr, fs::xattr, NONE, Partly("empty")),
    call(Sysno::flistxattr, fs::xattr, NONE, Partly("empty")),
    call(Sysno::removexattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::lremovexattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::fremovexattr, fs::xattr, NONE, Partly("ENOTSUP")),
    call(Sysno::open, |p, _, a| fs::open(p, a), RM, Full),
    call(Sysno::openat, |p, _, a| fs::openat(p, a), RM, Full),
    call(Sysno::creat, |p, _, a| fs::creat(p, a), NONE, Full),
    call(Sysno::fstat, |p, _, a| fs::fstat(p, a), M, Full),
    call(Sysno::stat, |p, _, a| fs::stat(p, a), NONE, Full),
    call(Sysno::lstat, |p, _, a| fs::lstat(p, a), NONE, Full),
    call(Sysno::newfstatat, |p, _, a| fs::newfstatat(p, a), M, Full),
    call(Sysno::statx, |p, _, a| fs::statx(p, a), M, Full),
    call(Sysno::statfs, |p, _, a| fs::statfs(p, a), NONE, Full),
    call(Sysno::fstatfs, |p, _, a| fs::fstatfs(p, a), NONE, Full),
    call(Sysno::getdents64, |p, _, a| fs::getdents64(p, a), M, Full),
    call(Sysno::readlink, |p, _, a| fs::readlink(p, a), M, Full),
    call(Sysno::readlinkat, |p, _, a| fs::readlinkat(p, a), M, Full),
    call(Sysno::access, |p, _, a| fs::access(p, a), M, Full),
    call(Sysno::faccessat, |p, _, a| fs::faccessat(p, a), M, Full),
    call(Sysno::faccessat2, |p, _, a| fs::faccessat(p, a), M, Full),
    call(Sysno::dup, |p, _, a| fs::dup(p, a), M, Full),
    call(Sysno::dup2, |p, _, a| fs::dup2(p, a), NONE, Full),
    call(Sysno::dup3, |p, _, a| fs::dup3(p, a), M, Full),
    call(Sysno::fcntl, |p, _, a| fs::fcntl(p, a), RM, Partly("F_SETOWN is remembered, no SIGIO is sent")),
    call(Sysno::pipe, |p, _, a| fs::pipe(p, a), NONE, Full),
    call(Sysno::pipe2, |p, _, a| fs::pipe2(p, a), NONE, Full),
    call(Sysno::getcwd, |p, _, a| fs::getcwd(p, a), M, Full),
    call(Sysno::chdir, |p, _, a| fs::chdir(p, a), NONE, Full),
    call(Sysno::fchdir, |p, _, a| fs::fchdir(p, a), NONE, Full),
    call(Sysno::ioctl, |p, _, a| fs::ioctl(p, a), RM, Partly("TCGETS, TIOCGWINSZ, TIOCGPGRP on a terminal; the terminal ioctls on a pty; SIOCGIF* for lo on a socket; FIONBIO, FIONREAD, FIOCLEX, FIONCLEX; FIOASYNC without SIGIO")),
    call(Sysno::mkdir, |p, _, a| fs::mkdir(p, a), NONE, Full),
    call(Sysno::mkdirat, |p, _, a| fs::mkdirat(p, a), NONE, Full),
    call(Sysno::unlink, |p, _, a| fs::unlink(p, a), NONE, Full),
    call(Sysno::unlinkat, |p, _, a| fs::unlinkat(p, a), NONE, Full),
    call(Sysno::rmdir, |p, _, a| fs::rmdir(p, a), NONE, Full),
    call(Sysno::link, fs::link, NONE, Full),
    call(Sysno::linkat, fs::link, NONE, Full),
    call(Sysno::symlink, fs::symlink, NONE, Full),
    call(Sysno::symlinkat, fs::symlink, NONE, Full),
    call(Sysno::rename, |p, _, a| fs::rename(p, a), NONE, Full),
    call(Sysno::renameat, |p, _, a| fs::renameat(p, a), NONE, Full),
    call(Sysno::renameat2, |p, _, a| fs::renameat(p, a), NONE, Full),
    call(Sysno::ftruncate, |p, _, a| fs::ftruncate(p, a), NONE, Full),
    call(Sysno::truncate, |p, _, a| fs::truncate(p, a), NONE, Full),
    call(Sysno::fallocate, |p, _, a| fs::fallocate(p, a), NONE, Full),
    call(Sysno::fsync, |p, _, a| fs::fsync(p, a), NONE, Full),
    call(Sysno::fdatasync, |p, _, a| fs::fsync(p, a), NONE, Full),
    call(Sysno::fadvise64, |p, _, a| fs::fd_hint(p, a), NONE, Partly("no-op")),
    call(Sysno::flock, |p, _, a| fs::flock(p, a), NONE, Full),
    call(Sysno::umask, |p, _, a| fs::umask(p, a), M, Full),
    call(Sysno::fchmod, |p, _, a| fs::fchmod(p, a), NONE, Full),
    call(Sysno::chmod, fs::chmod, NONE, Full),
    call(Sysno::fchmodat, fs::chmod, NONE, Full),
    call(Sysno::chown, fs::chown, NONE, Partly("checks its target, changes nothing")),
    call(Sysno::fchown, fs::chown, NONE, Partly("checks its target, changes nothing")),
    call(Sysno::lchown, fs::chown, NONE, Partly("checks its target, changes nothing")),
    call(Sysno::fchownat, fs::chown, NONE, Partly("checks its target, changes nothing")),
    call(Sysno::utimensat, |p, _, a| fs::utimensat(p, a), NONE, Full),
    call(Sysno::poll, |p, _, a| poll::poll(p, a), M, Full),
    call(Sysno::ppoll, |p, _, a| poll::ppoll(p, a), M, Full),
    call(Sysno::select, |p, _, a| poll::select(p, a), M, Full),
    call(Sysno::pselect6, |p, _, a| poll::pselect6(p, a), M, Full),
    call(Sysno::epoll_create, |p, _, _| epoll::epoll_create1(p, 0), NONE, Full),
    call(Sysno::epoll_create1, |p, _, a| epoll::epoll_create1(p, a.u32(0)), NONE, Full),
    call(Sysno::epoll_ctl, |p, _, a| epoll::epoll_ctl(p, a), M, Full),
    call(Sysno::epoll_wait, |p, _, a| epoll::epoll_wait(p, a), M, Full),
    call(Sysno::epoll_pwait, |p, _, a| epoll::epoll_pwait(p, a), M, Full),
    call(Sysno::eventfd, |p, _, a| epoll::eventfd2(p, a.u32(0), 0), NONE, Full),
    call(Sysno::eventfd2, |p, _, a| epoll::eventfd2(p, a.u32(0), a.u32(1)), M, Full),
    call(Sysno::timerfd_create, |p, _, a| epoll::timerfd_create(p, a), NONE, Full),
    call(Sysno::timerfd_settime, |p, _, a| epoll::timerfd_settime(p, a), M, Full),
    call(Sysno::timerfd_gettime, |p, _, a| epoll::timerfd_gettime(p, a), M, Full),
    call(Sysno::socket, |p, _, a| net::socket_call(p, a), M, Full),
    call(Sysno::socketpair, |p, _, a| net::socketpair(p, a), NONE, Full),
    call(Sysno::bind, |p, _, a| net::bind(p, a), M, Full),
    call(Sysno::listen, |p, _, a| net::listen(p, a), M, Full),
    call(Sysno::accept, |p, _, a| net::accept4(p, a, 0), RM, Full),
    call(Sysno::accept4, |p, _, a| net::accept4(p, a, a.i32(3)), RM, Full),
    call(Sysno::connect, |p, _, a| net::connect(p, a), RM, Full),
    call(Sysno::getsockname, |p, _, a| net::getsockname(p, a), M, Full),
    call(Sysno::getpeername, |p, _, a| net::getpeername(p, a), M, Full),
    call(Sysno::setsockopt, |p, _, a| net::setsockopt(p, a), M, Full),
    call(Sysno::getsockopt, |p, _, a| net::getsockopt(p, a), M, Full),
    call(Sysno::shutdown, |p, _, a| net::shutdown(p, a), M, Full),
    call(Sysno::sendto, |p, _, a| net::sendto(p, a), RM, Full),
    call(Sysno::recvfrom, |p, _, a| net::recvfrom(p, a), RM, Full),
    call(Sysno::sendmsg, |p, _, a| net::sendmsg(p, a), RM, Partly("ancillary data: SCM_RIGHTS of sockets and pipes only")),
    call(Sysno::recvmsg, |p, _, a| net::recvmsg(p, a), RM, Partly("ancillary data: SCM_RIGHTS of sockets and pipes only (others closed, MSG_CTRUNC)")),
    call(Sysno::sendfile, |p, _, a| net::sendfile(p, a), RM, Full),
    call(Sysno::sendmmsg, |p, _, a| net::mmsg(p, a, true), R, Partly("no ancillary data")),
    call(Sysno::recvmmsg, |p, _, a| net::mmsg(p, a, false), R, Partly("no ancillary data; no timeout (EINVAL); waits for the first message only")),
    call(Sysno::copy_file_range, |p, _, a| fs::copy_file_range(p, a), NONE, Full),
    call(Sysno::splice, |p, _, a| fs::splice(p, a), R, Full),
    call(Sysno::tee, |p, _, a| fs::tee(p, a), R, Full),
    call(Sysno::mmap, |p, _, a| mem::mmap(p, a), NONE, Partly("MAP_SHARED of a file open read-only is a private copy (it reads the same); a guest access past the end of a shared file that shrank after it was touched ends the app (SIGBUS, even with a handler)")),
    call(Sysno::munmap, |p, _, a| mem::munmap(p, a), NONE, Full),
    call(Sysno::mprotect, |p, _, a| mem::mprotect(p, a), NONE, Full),
    call(Sysno::brk, |p, _, a| mem::brk(p, a), NONE, Full),
    call(Sysno::mremap, |p, _, a| mem::mremap(p, a), NONE, Full),
    call(Sysno::madvise, |p, _, a| mem::madvise(p, a), NONE, Full),
    call(Sysno::mincore, |p, _, a| mem::mincore(p, a), NONE, Full),
    call(Sysno::memfd_create, |p, _, a| fs::memfd_create(p, a), NONE, Partly("no huge pages")),
    call(Sysno::msync, |p, _, a| mem::msync(p, a), NONE, Full),
    call(Sysno::mlock, |_, _, _| Ok(0), NONE, Partly("no-op")),
    call(Sysno::munlock, |_, _, _| Ok(0), NONE, Partly("no-op")),
    call(Sysno::mlockall, |_, _, _| Ok(0), NONE, Partly("no-op")),
    call(Sysno::munlockall, |_, _, _| Ok(0), NONE, Partly("no-op")),
    call(Sysno::clock_gettime, |p, _, a| time::clock_gettime(p, a), NONE, Full),
    call(Sysno::clock_getres, |p, _, a| time::clock_getres(p, a), M, Full),
    call(Sysno::gettimeofday, |p, _, a| time::gettimeofday(p, a), NONE, Full),
    call(Sysno::time, |p, _, a| time::time(p, a), NONE, Full),
    call(Sysno::nanosleep, |p, _, a| time::nanosleep(p, a), NONE, Full),
    call(Sysno::clock_nanosleep, |p, _, a| time::clock_nanosleep(p, a), NONE, Full),
    call(Sysno::getpid, |p, _, _| Ok(p.ids.pid as u64), NONE, Full),
    call(Sysno::gettid, |p, _, _| Ok(p.thread.tid as u64), NONE, Full),
    call(Sysno::getppid, |p, _, _| Ok(p.ids.ppid as u64), M, Partly("an orphan keeps its parent's pid")),
    call(Sysno::getpgrp, |p, _, _| children::getpgid(p, 0), NONE, Full),
    call(Sysno::getpgid, |p, _, a| children::getpgid(p, a.i32(0)), NONE, Full),
    call(Sysno::getsid, |p, _, a| children::getsid(p, a.i32(0)), NONE, Full),
    call(Sysno::setsid, |p, _, _| children::setsid(p), NONE, Full),
    call(Sysno::setpgid, |p, _, a| children::setpgid(p, a), NONE, Full),
    call(Sysno::getuid, |p, _, _| credentials::real(p, User), M, Full),
    call(Sysno::geteuid, |p, _, _| credentials::effective(p, User), M, Full),
    call(Sysno::getgid, |p, _, _| credentials::real(p, Group), M, Full),
    call(Sysno::getegid, |p, _, _| credentials::effective(p, Group), M, Full),
    call(Sysno::getresuid, |p, _, a| credentials::get_res(p, a, User), M, Full),
    call(Sysno::getresgid, |p, _, a| credentials::get_res(p, a, Group), M, Full),
    call(Sysno::getgroups, |p, _, a| credentials::getgroups(p, a), M, Full),
    call(Sysno::setuid, |p, _, a| credentials::set(p, a, User), NONE, Partly(IDS)),
    call(Sysno::setgid, |p, _, a| credentials::set(p, a, Group), NONE, Partly(IDS)),
    call(Sysno::setreuid, |p, _, a| credentials::set_re(p, a, User), NONE, Partly(IDS)),
    call(Sysno::setregid, |p, _, a| credentials::set_re(p, a, Group), NONE, Partly(IDS)),
    call(Sysno::setresuid, |p, _, a| credentials::set_res(p, a, User), NONE, Partly(IDS)),
    call(Sysno::setresgid, |p, _, a| credentials::set_res(p, a, Group), NONE, Partly(IDS)),
    call(Sysno::setfsuid, |p, _, a| credentials::set_fs(p, a, User), NONE, Partly(IDS)),
    call(Sysno::setfsgid, |p, _, a| credentials::set_fs(p, a, Group), NONE, Partly(IDS)),
    call(Sysno::setgroups, |p, _, a| credentials::setgroups(p, a), NONE, Partly(IDS)),
    call(Sysno::uname, |p, _, a| process::uname(p, a), M, Full),
    call(Sysno::sethostname, |_, _, _| Err(Errno::PERM.into()), NONE, Partly("EPERM: the host's name is not the app's")),
    call(Sysno::setdomainname, |_, _, _| Err(Errno::PERM.into()), NONE, Partly("EPERM: the host's name is not the app's")),
    call(Sysno::getrandom, |p, _, a| process::getrandom(p, a), M, Full),
    call(Sysno::set_tid_address, |p, _, a| process::set_tid_address(p, a), NONE, Full),
    call(Sysno::set_robust_list, |p, _, a| thread::set_robust_list(p, a), M, Full),
    call(Sysno::get_robust_list, |p, _, a| thread::get_robust_list(p, a), M, Full),
    call(Sysno::rseq, |_, _, _| Err(Errno::NOSYS.into()), M, Unsupported("ENOSYS; glibc does without")),
    call(Sysno::prlimit64, |p, _, a| process::prlimit64(p, a), NONE, Full),
    call(Sysno::getrlimit, |p, _, a| process::getrlimit(p, a), NONE, Full),
    call(Sysno::setrlimit, |_, _, _| Ok(0), NONE, Partly("accepted, ignored")),
    call(Sysno::getrusage, |p, _, a| process::getrusage(p, a), NONE, Full),
    call(Sysno::times, |p, _, a| process::times(p, a), NONE, Full),
    call(Sysno::getpriority, |p, _, a| process::getpriority(p, a), NONE, Full),
    call(Sysno::setpriority, |p, _, a| process::setpriority(p, a), NONE, Full),
    call(Sysno::sched_getaffinity, |p, _, a| process::sched_getaffinity(p, a), NONE, Partly("the CPUs the app may have vCPUs for (`--vcpus`)")),
    call(Sysno::sched_setaffinity, |_, _, _| Ok(0), NONE, Partly("accepted, ignored")),
    call(Sysno::sched_yield, |p, _, _| thread::sched_yield(p), M, Full),
    call(Sysno::sched_get_priority_max, |_, _, a| process::sched_priority_bound(a, true), M, Full),
    call(Sysno::sched_get_priority_min, |_, _, a| process::sched_priority_bound(a, false), M, Full),
    call(Sysno::sched_getscheduler, |p, _, a| process::sched_getscheduler(p, a), M, Full),
    call(Sysno::sched_setscheduler, |p, _, a| process::sched_setscheduler(p, a), NONE, Partly("normal policies only; real-time ones give EPERM")),
    call(Sysno::sched_getparam, |p, _, a| process::sched_getparam(p, a), NONE, Full),
    call(Sysno::sched_setparam, |p, _, a| process::sched_setparam(p, a), NONE, Full),
    call(Sysno::sched_rr_get_interval, |p, _, a| process::sched_rr_get_interval(p, a), NONE, Full),
    call(Sysno::sysinfo, |p, _, a| process::sysinfo(p, a), NONE, Full),
    call(Sysno::arch_prctl, |p, _, a| process::arch_prctl(p, a), NONE, Full),
    call(Sysno::prctl, |p, _, a| process::prctl(p, a), NONE, Partly("names, dumpable, no_new_privs, pdeathsig")),
    call(Sysno::exit, |p, _, a| thread::exit(p, a), NONE, Full),
    call(Sysno::exit_group, |_, _, a| Err(SysError::Exit(a.i32(0) & 0xff)), NONE, Full),
    call(Sysno::clone, |p, _, a| thread::clone(p, a), NONE, Partly("threads, and new processes as fork or vfork; processes share no fd table, filesystem view or signal actions (EINVAL)")),
    call(Sysno::clone3, |p, _, a| thread::clone3(p, a), NONE, Partly("as clone; no pidfd, set_tid or cgroup")),
    call(Sysno::fork, |_, _, _| children::fork(), NONE, Full),
    call(Sysno::vfork, |_, _, _| children::vfork(), NONE, Partly("the child's memory is a copy-on-write copy, not shared")),
    call(Sysno::execve, |p, _, a| exec::execve(p, a), NONE, Full),
    call(Sysno::execveat, |p, _, a| exec::execveat(p, a), NONE, Full),
    call(Sysno::wait4, |p, _, a| children::wait4(p, a), R, Partly("rusage is all zeros")),
    call(Sysno::waitid, |p, _, a| children::waitid(p, a), R, Partly("P_ALL, P_PID, P_PGID; no P_PIDFD")),
    call(Sysno::futex, |p, _, a| thread::futex(p, a), R, Partly("no priority-inheritance operations (ENOSYS); between processes (a shared futex in shared memory) a FUTEX_WAIT_BITSET's bitset is not matched, so a wake may reach it spuriously")),
    call(Sysno::kill, |p, _, a| children::kill(p, a), NONE, Full),
    call(Sysno::tgkill, |p, _, a| thread::tgkill(p, Some(a.i32(0)), a.i32(1), a.i32(2)), NONE, Full),
    call(Sysno::tkill, |p, _, a| thread::tgkill(p, None, a.i32(0), a.i32(1)), NONE, Full),
    call(Sysno::rt_sigaction, |p, _, a| signal::rt_sigaction(p, a), M, Full),
    call(Sysno::rt_sigprocmask, |p, _, a| signal::rt_sigprocmask(p, a), M, Full),
    call(Sysno::sigaltstack, |p, _, a| signal::sigaltstack(p, a), M, Full),
    call(Sysno::rt_sigpending, |p, _, a| signal::rt_sigpending(p, a), M, Full),
    call(Sysno::rt_sigsuspend, signal::suspend, NONE, Full),
    call(Sysno::pause, signal::suspend, NONE, Full),
    call(Sysno::alarm, |p, _, a| signal::alarm(p, a), NONE, Full),
    call(Sysno::setitimer, |p, _, a| signal::setitimer(p, a), NONE, Partly("ITIMER_REAL only")),
    call(Sysno::getitimer, |p, _, a| signal::getitimer(p, a), NONE, Partly("ITIMER_REAL only")),
];

/// The table's entry for syscall number `nr`.
pub fn lookup(nr: u64) -> Option<&'static Entry> {
    static INDEX: std::sync::OnceLock<Vec<Option<u16>>> = std::sync::OnceLock::new();
    let index = INDEX.get_or_init(|| {
        let size = TABLE
            .iter()
            .map(|e| e.sysno.id() as usize + 1)
            .max()
            .unwrap_or(0);
        let mut index = vec![None; size];
        for (i, entry) in TABLE.iter().enumerate() {
            index[entry.sysno.id() as usize] = u16::try_from(i).ok();
        }
        index
    });
    let slot = usize::try_from(nr).ok()?;
    let i = (*index.get(slot)?)?;
    TABLE.get(usize::from(i))
}

/// The README's syscall table: the calls supported fully, those supported partly (with
/// what differs) and those that are not (with what the app gets).
pub fn markdown() -> String {
    let mut full: Vec<&str> = Vec::new();
    let mut partly: Vec<String> = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    for entry in TABLE {
        let name = entry.sysno.name();
        match entry.support {
            Full => full.push(name),
            // A `|` would end the table's cell.
            Partly(note) => partly.push(format!("{name} ({})", note.replace('|', "\\|"))),
            Unsupported(note) => unsupported.push(format!("{name} ({})", note.replace('|', "\\|"))),
        }
    }
    full.sort_unstable();
    partly.sort_unstable();
    unsupported.sort_unstable();
    format!(
        "| status | calls |\n|---|---|\n| implemented | {} |\n| partly | {} |\n| not implemented | {}; every other call: ENOSYS, logged once by name |\n",
        full.join(" "),
        partly.join(", "),
        unsupported.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_in_the_table_once_and_found_by_number() {
        let mut seen = std::collections::HashSet::new();
        for entry in TABLE {
            assert!(seen.insert(entry.sysno), "{} twice", entry.sysno.name());
            let found = lookup(entry.sysno.id() as u64).unwrap();
            assert_eq!(found.sysno, entry.sysno);
        }
        assert!(lookup(100_000).is_none());
        assert!(lookup(u64::MAX).is_none());
    }

    /// The README's table is this table's [`markdown`]. With PICOCENTER_UPDATE_README=1
    /// the test writes it there instead.
    #[test]
    fn the_readme_shows_this_table() {
        const START: &str = "<!-- syscalls: generated from vmm/src/syscalls/table.rs -->\n";
        const END: &str = "<!-- end of the generated syscall table -->";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (Some(start), Some(end)) = (readme.find(START), readme.find(END)) else {
            panic!("README.md lacks the markers {START:?} and {END:?}");
        };
        let current = &readme[start + START.len()..end];
        let generated = markdown();
        if std::env::var_os("PICOCENTER_UPDATE_README").is_some() {
            let updated = format!("{}{START}{generated}{}", &readme[..start], &readme[end..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            assert!(
                current == generated,
                "README.md's syscall table is stale: run PICOCENTER_UPDATE_README=1 cargo test -p picocenter-vmm --lib readme"
            );
        }
    }

    #[test]
    fn the_lists_come_from_the_table() {
        assert!(lookup(libc::SYS_read as u64).unwrap().restartable);
        assert!(lookup(libc::SYS_read as u64).unwrap().mailbox);
        assert!(!lookup(libc::SYS_mmap as u64).unwrap().mailbox);
        assert!(!lookup(libc::SYS_clone as u64).unwrap().mailbox);
        assert!(!lookup(libc::SYS_getpid as u64).unwrap().restartable);
    }
}

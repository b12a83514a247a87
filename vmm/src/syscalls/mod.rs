//! The Linux system-call ABI, one file per area, dispatched from one `match`.
//!
//! Two error channels, as in Solo5: a guest mistake becomes `-errno` in RAX
//! ([`SysError::Errno`]); everything the VMM must act on is another [`SysError`] variant
//! that the run loop handles (exit, restart after an interruption, a fatal signal).

pub mod epoll;
pub mod fs;
pub mod mem;
pub mod net;
pub mod poll;
pub mod process;
pub mod signal;
pub mod thread;
pub mod time;
pub mod wait;

use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::io::Errno;
use syscalls::Sysno;

/// The outcome of a handler that did not simply return a value to the app.
#[derive(Debug)]
pub enum SysError {
    /// Return `-errno` to the app.
    Errno(Errno),
    /// The app called exit or exit_group with this status.
    Exit(i32),
    /// A kick interrupted a blocking call: rewind the app to re-execute `syscall`.
    Restart,
    /// A signal the app handles arrived during a blocking call: EINTR, or a restart when
    /// the handler has SA_RESTART and the call allows it.
    Interrupted,
    /// The call would block, and it came through the mailbox, where nothing may wait: the
    /// doorbell makes it again with an exit.
    WouldBlock,
    /// The call must wait, and the app has other threads to run meanwhile: the run loop
    /// parks the calling thread at its `syscall` instruction until this is over, then
    /// performs the call again (see [`crate::kernel::thread`]).
    Block(crate::kernel::thread::Wait),
    /// The calling thread ended with this status (exit), and others remain.
    ThreadExit(i32),
    /// sched_yield: let another thread run.
    Yield,
    /// clone for a new thread: the run loop gives it the caller's registers.
    Spawn(Box<thread::Spawn>),
    /// The app must die of this signal (default action of a fatal signal).
    Kill {
        /// The signal number.
        signal: i32,
        /// What happened, for the report.
        reason: String,
    },
}

impl From<Errno> for SysError {
    fn from(errno: Errno) -> Self {
        SysError::Errno(errno)
    }
}

/// What a handler returns: the value for RAX, or a [`SysError`].
pub type SysResult = Result<u64, SysError>;

/// The six syscall arguments (rdi, rsi, rdx, r10, r8, r9), with typed accessors.
#[derive(Debug, Clone, Copy)]
pub struct Args(pub [u64; 6]);

impl Args {
    /// Argument `i` as an fd (the kernel takes the low 32 bits).
    pub fn fd(&self, i: usize) -> i32 {
        self.0[i] as i32
    }
    /// Argument `i` as a pointer into app memory.
    pub fn ptr(&self, i: usize) -> UserAddr {
        UserAddr(self.0[i])
    }
    /// Argument `i` as a size.
    pub fn usize(&self, i: usize) -> usize {
        self.0[i] as usize
    }
    /// Argument `i` as an int.
    pub fn i32(&self, i: usize) -> i32 {
        self.0[i] as i32
    }
    /// Argument `i` as an unsigned int.
    pub fn u32(&self, i: usize) -> u32 {
        self.0[i] as u32
    }
    /// Argument `i` as a raw 64-bit value.
    pub fn u64(&self, i: usize) -> u64 {
        self.0[i]
    }
}

/// Whether an interrupted call may be restarted after a SA_RESTART handler (Linux's
/// ERESTARTSYS calls); the rest always fail with EINTR.
pub fn restartable(nr: u64) -> bool {
    use Sysno::*;
    matches!(
        Sysno::new(nr as usize),
        Some(
            read | write
                | readv
                | writev
                | pread64
                | pwrite64
                | preadv
                | pwritev
                | accept
                | accept4
                | connect
                | recvfrom
                | sendto
                | recvmsg
                | sendmsg
                | sendfile
                | wait4
                | futex
                | open
                | openat
                | ioctl
                | fcntl
        )
    )
}

/// Performs syscall `nr` for the app, timing it when tracing.
pub fn perform(p: &mut Process, nr: u64, a: &Args) -> SysResult {
    let started = p.trace.is_some().then(std::time::Instant::now);
    let result = dispatch(p, nr, a);
    if let (Some(trace), Some(started)) = (p.trace.as_mut(), started) {
        if !matches!(result, Err(SysError::WouldBlock)) {
            trace.record(
                nr,
                matches!(result, Err(SysError::Errno(_))),
                started.elapsed(),
            );
        }
    }
    result
}

/// Whether a call may be answered through the mailbox, by the poller thread while the app
/// waits in the doorbell: it must not change the address space, the vCPU, or the app's
/// life (those need the run loop), and it must not block (it is declined if it would).
pub fn mailbox_allowed(nr: u64) -> bool {
    use Sysno::*;
    matches!(
        Sysno::new(nr as usize),
        Some(
            read | write
                | readv
                | writev
                | pread64
                | pwrite64
                | preadv
                | pwritev
                | lseek
                | close
                | openat
                | open
                | fstat
                | newfstatat
                | statx
                | getdents64
                | fcntl
                | ioctl
                | dup
                | dup3
                | accept
                | accept4
                | recvfrom
                | sendto
                | recvmsg
                | sendmsg
                | sendfile
                | shutdown
                | setsockopt
                | getsockopt
                | getsockname
                | getpeername
                | socket
                | bind
                | listen
                | connect
                | epoll_wait
                | epoll_pwait
                | epoll_ctl
                | poll
                | ppoll
                | select
                | pselect6
                | getppid
                | getuid
                | geteuid
                | getgid
                | getegid
                | umask
                | access
                | faccessat
                | faccessat2
                | readlink
                | readlinkat
                | getcwd
                | getrandom
                | uname
                | clock_getres
                | eventfd2
                | timerfd_settime
                | timerfd_gettime
                | sched_yield
        )
    )
}

/// Logs, once per app, that it used `what`, which is not supported.
pub fn warn_once(p: &mut Process, nr: u64, what: &str) {
    if p.warned.insert(nr) {
        tracing::warn!("unsupported: {what}");
    }
}

/// Performs syscall `nr` for the app.
pub fn dispatch(p: &mut Process, nr: u64, a: &Args) -> SysResult {
    let Some(sysno) = Sysno::new(nr as usize) else {
        if p.warned.insert(nr) {
            tracing::warn!("unknown syscall number {nr}: returning ENOSYS");
        }
        return Err(Errno::NOSYS.into());
    };
    match sysno {
        // files
        Sysno::read => fs::read(p, a),
        Sysno::write => fs::write(p, a),
        Sysno::pread64 => fs::pread64(p, a),
        Sysno::pwrite64 => fs::pwrite64(p, a),
        Sysno::readv => fs::readv(p, a),
        Sysno::writev => fs::writev(p, a),
        Sysno::preadv => fs::preadv(p, a),
        Sysno::pwritev => fs::pwritev(p, a),
        Sysno::lseek => fs::lseek(p, a),
        Sysno::close => fs::close(p, a),
        Sysno::close_range => fs::close_range(p, a),
        Sysno::getxattr
        | Sysno::lgetxattr
        | Sysno::fgetxattr
        | Sysno::setxattr
        | Sysno::lsetxattr
        | Sysno::fsetxattr
        | Sysno::listxattr
        | Sysno::llistxattr
        | Sysno::flistxattr
        | Sysno::removexattr
        | Sysno::lremovexattr
        | Sysno::fremovexattr => fs::xattr(p, sysno, a),
        Sysno::open => fs::open(p, a),
        Sysno::openat => fs::openat(p, a),
        Sysno::creat => fs::creat(p, a),
        Sysno::fstat => fs::fstat(p, a),
        Sysno::stat => fs::stat(p, a),
        Sysno::lstat => fs::lstat(p, a),
        Sysno::newfstatat => fs::newfstatat(p, a),
        Sysno::statx => fs::statx(p, a),
        Sysno::statfs => fs::statfs(p, a),
        Sysno::fstatfs => fs::fstatfs(p, a),
        Sysno::getdents64 => fs::getdents64(p, a),
        Sysno::readlink => fs::readlink(p, a),
        Sysno::readlinkat => fs::readlinkat(p, a),
        Sysno::access => fs::access(p, a),
        Sysno::faccessat => fs::faccessat(p, a),
        Sysno::faccessat2 => fs::faccessat(p, a),
        Sysno::dup => fs::dup(p, a),
        Sysno::dup2 => fs::dup2(p, a),
        Sysno::dup3 => fs::dup3(p, a),
        Sysno::fcntl => fs::fcntl(p, a),
        Sysno::pipe => fs::pipe(p, a),
        Sysno::pipe2 => fs::pipe2(p, a),
        Sysno::getcwd => fs::getcwd(p, a),
        Sysno::chdir => fs::chdir(p, a),
        Sysno::fchdir => fs::fchdir(p, a),
        Sysno::ioctl => fs::ioctl(p, a),
        Sysno::mkdir => fs::mkdir(p, a),
        Sysno::mkdirat => fs::mkdirat(p, a),
        Sysno::unlink => fs::unlink(p, a),
        Sysno::unlinkat => fs::unlinkat(p, a),
        Sysno::rmdir => fs::rmdir(p, a),
        Sysno::link | Sysno::linkat => fs::link(p, sysno, a),
        Sysno::symlink | Sysno::symlinkat => fs::symlink(p, sysno, a),
        Sysno::rename => fs::rename(p, a),
        Sysno::renameat => fs::renameat(p, a),
        Sysno::renameat2 => fs::renameat(p, a),
        Sysno::ftruncate => fs::ftruncate(p, a),
        Sysno::fsync | Sysno::fdatasync => fs::fsync(p, a),
        Sysno::fadvise64 => fs::fd_hint(p, a),
        Sysno::flock => fs::flock(p, a),
        Sysno::umask => fs::umask(p, a),
        Sysno::fchmod => fs::fchmod(p, a),
        Sysno::chmod | Sysno::fchmodat => fs::chmod(p, sysno, a),
        Sysno::chown | Sysno::fchown | Sysno::lchown | Sysno::fchownat => fs::chown(p, sysno, a),
        Sysno::utimensat => fs::utimensat(p, a),
        // waiting
        Sysno::poll => poll::poll(p, a),
        Sysno::ppoll => poll::ppoll(p, a),
        Sysno::select => poll::select(p, a),
        Sysno::pselect6 => poll::pselect6(p, a),
        Sysno::epoll_create => epoll::epoll_create1(p, 0),
        Sysno::epoll_create1 => epoll::epoll_create1(p, a.u32(0)),
        Sysno::epoll_ctl => epoll::epoll_ctl(p, a),
        Sysno::epoll_wait => epoll::epoll_wait(p, a),
        Sysno::epoll_pwait => epoll::epoll_pwait(p, a),
        Sysno::eventfd => epoll::eventfd2(p, a.u32(0), 0),
        Sysno::eventfd2 => epoll::eventfd2(p, a.u32(0), a.u32(1)),
        Sysno::timerfd_create => epoll::timerfd_create(p, a),
        Sysno::timerfd_settime => epoll::timerfd_settime(p, a),
        Sysno::timerfd_gettime => epoll::timerfd_gettime(p, a),
        // sockets
        Sysno::socket => net::socket_call(p, a),
        Sysno::socketpair => net::socketpair(p, a),
        Sysno::bind => net::bind(p, a),
        Sysno::listen => net::listen(p, a),
        Sysno::accept => net::accept4(p, a, 0),
        Sysno::accept4 => net::accept4(p, a, a.i32(3)),
        Sysno::connect => net::connect(p, a),
        Sysno::getsockname => net::getsockname(p, a),
        Sysno::getpeername => net::getpeername(p, a),
        Sysno::setsockopt => net::setsockopt(p, a),
        Sysno::getsockopt => net::getsockopt(p, a),
        Sysno::shutdown => net::shutdown(p, a),
        Sysno::sendto => net::sendto(p, a),
        Sysno::recvfrom => net::recvfrom(p, a),
        Sysno::sendmsg => net::sendmsg(p, a),
        Sysno::recvmsg => net::recvmsg(p, a),
        Sysno::sendfile => net::sendfile(p, a),
        // memory
        Sysno::mmap => mem::mmap(p, a),
        Sysno::munmap => mem::munmap(p, a),
        Sysno::mprotect => mem::mprotect(p, a),
        Sysno::brk => mem::brk(p, a),
        Sysno::mremap => mem::mremap(p, a),
        Sysno::madvise => mem::madvise(p, a),
        Sysno::msync | Sysno::mlock | Sysno::munlock | Sysno::mlockall | Sysno::munlockall => Ok(0),
        // time
        Sysno::clock_gettime => time::clock_gettime(p, a),
        Sysno::clock_getres => time::clock_getres(p, a),
        Sysno::gettimeofday => time::gettimeofday(p, a),
        Sysno::time => time::time(p, a),
        Sysno::nanosleep => time::nanosleep(p, a),
        Sysno::clock_nanosleep => time::clock_nanosleep(p, a),
        // process
        Sysno::getpid => Ok(crate::kernel::GUEST_PID as u64),
        Sysno::gettid => Ok(p.thread.tid as u64),
        Sysno::getppid => Ok(crate::kernel::GUEST_PPID as u64),
        Sysno::getpgrp | Sysno::getpgid | Sysno::getsid => Ok(crate::kernel::GUEST_PID as u64),
        Sysno::setsid | Sysno::setpgid => Ok(crate::kernel::GUEST_PID as u64),
        Sysno::getuid | Sysno::geteuid | Sysno::getgid | Sysno::getegid => Ok(0),
        Sysno::setuid | Sysno::setgid | Sysno::setreuid | Sysno::setregid => Ok(0),
        Sysno::setresuid | Sysno::setresgid | Sysno::setgroups => Ok(0),
        Sysno::getresuid | Sysno::getresgid => process::getres_ids(p, a),
        Sysno::getgroups => Ok(0),
        Sysno::uname => process::uname(p, a),
        Sysno::getrandom => process::getrandom(p, a),
        Sysno::set_tid_address => process::set_tid_address(p, a),
        Sysno::set_robust_list => thread::set_robust_list(p, a),
        Sysno::get_robust_list => thread::get_robust_list(p, a),
        Sysno::rseq => Err(Errno::NOSYS.into()),
        Sysno::prlimit64 => process::prlimit64(p, a),
        Sysno::getrlimit => process::getrlimit(p, a),
        Sysno::setrlimit => Ok(0),
        Sysno::getrusage => process::getrusage(p, a),
        Sysno::times => process::times(p, a),
        Sysno::getpriority => process::getpriority(a),
        Sysno::setpriority => process::setpriority(a),
        Sysno::sched_getaffinity => process::sched_getaffinity(p, a),
        Sysno::sched_setaffinity => Ok(0),
        Sysno::sched_yield => thread::sched_yield(p),
        Sysno::sysinfo => process::sysinfo(p, a),
        Sysno::arch_prctl => process::arch_prctl(p, a),
        Sysno::prctl => process::prctl(p, a),
        Sysno::exit => thread::exit(p, a),
        Sysno::exit_group => Err(SysError::Exit(a.i32(0) & 0xff)),
        Sysno::clone => thread::clone(p, a),
        Sysno::clone3 => thread::clone3(p, a),
        Sysno::fork | Sysno::vfork => Err(Errno::AGAIN.into()),
        Sysno::execve | Sysno::execveat => Err(Errno::NOSYS.into()),
        Sysno::wait4 | Sysno::waitid => Err(Errno::CHILD.into()),
        Sysno::futex => thread::futex(p, a),
        Sysno::kill => signal::kill(p, a),
        Sysno::tgkill => thread::tgkill(p, Some(a.i32(0)), a.i32(1), a.i32(2)),
        Sysno::tkill => thread::tgkill(p, None, a.i32(0), a.i32(1)),
        // signals
        Sysno::rt_sigaction => signal::rt_sigaction(p, a),
        Sysno::rt_sigprocmask => signal::rt_sigprocmask(p, a),
        Sysno::sigaltstack => signal::sigaltstack(p, a),
        Sysno::rt_sigpending => signal::rt_sigpending(p, a),
        Sysno::rt_sigsuspend | Sysno::pause => signal::suspend(p, sysno, a),
        Sysno::alarm => signal::alarm(p, a),
        Sysno::setitimer => signal::setitimer(p, a),
        Sysno::getitimer => signal::getitimer(p, a),
        other => {
            if p.warned.insert(nr) {
                tracing::warn!(
                    "unsupported syscall {} ({nr}): returning ENOSYS",
                    other.name()
                );
            }
            Err(Errno::NOSYS.into())
        }
    }
}

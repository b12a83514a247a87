//! The seccomp filter of a running VMM (rust-vmm's `seccompiler`): the host system calls
//! the VMM makes once it runs the app, and nothing else. The list comes from tracing the
//! whole test suite (every syscall area, servers, snapshots of every restore mode, stops
//! and signals); what is left out is what a VMM never needs once its jail is set up:
//! mounting, namespaces, changing user, exec, tracing other processes, kernel modules,
//! BPF, keys, device nodes.
//!
//! A call outside the list raises SIGSYS, whose handler writes one line naming the call
//! and ends the VMM with status 159 (128 + SIGSYS). Sockets are further limited to the
//! families an app may use (AF_UNIX, AF_INET, AF_INET6), so no netlink or packet socket
//! can be made even by a compromised VMM.

use super::jail::JailError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Every host syscall a running VMM may make (besides `socket`, filtered by family).
pub const ALLOWED: &[libc::c_long] = &[
    // memory
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_userfaultfd,
    libc::SYS_memfd_create,
    // files, through the sandbox's fds
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_lchown,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_fadvise64,
    libc::SYS_flock,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_splice,
    libc::SYS_tee,
    libc::SYS_umask,
    libc::SYS_getcwd,
    libc::SYS_chdir,
    libc::SYS_fchdir,
    // sockets (socket itself is filtered by family below)
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // waiting
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    // a shared futex's host wait (see `kernel::shared_futex`)
    libc::SYS_futex_waitv,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    // threads and signals (the VMM's own)
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_wait4,
    // the app's processes: each is a fork of its parent's VMM (rt_sigqueueinfo, which
    // carries a signal between them, is filtered below)
    libc::SYS_waitid,
    libc::SYS_pidfd_open,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrusage,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prctl,
    libc::SYS_arch_prctl,
    libc::SYS_restart_syscall,
];

/// The filter: [`ALLOWED`], plus `socket` for the app's families, `rt_sigqueueinfo` for
/// the guest-signal carrier and `sched_setscheduler` to SCHED_BATCH; SIGSYS for the rest.
pub fn filter() -> Result<BpfProgram, JailError> {
    let error = |e: seccompiler::BackendError| JailError::Config(format!("seccomp filter: {e}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let family = |domain: i32| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, domain as u64)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
        .into_iter()
        .map(family)
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    rules.insert(libc::SYS_socket, families);
    // Between the VMMs of one app, only the signal that carries a guest signal (see
    // `kvm::kick::send_guest_signal`): nothing another process could act on.
    let carrier = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        crate::kvm::kick::guest_signal_carrier() as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(error)?;
    rules.insert(libc::SYS_rt_sigqueueinfo, vec![carrier]);
    // The mailbox poller of a forked VMM makes itself SCHED_BATCH (see
    // `mailbox::batch_scheduling`): only the calling thread (pid 0), and no other policy,
    // which could only raise a priority.
    let batch = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 0)
        .and_then(|itself| {
            let policy = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SCHED_BATCH as u64,
            )?;
            SeccompRule::new(vec![itself, policy])
        })
        .map_err(error)?;
    rules.insert(libc::SYS_sched_setscheduler, vec![batch]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(error)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| error(e))
}

/// Writes `text` to stderr from a signal handler (no allocation, no locks).
fn write_stderr(text: &[u8]) {
    // SAFETY: write(2) of a live buffer to fd 2; async-signal-safe.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

/// The SIGSYS handler: names the call and ends the VMM.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for a seccomp trap the
    // si_syscall field sits right after si_call_addr (a pointer) in the union, at byte 24
    // of the siginfo on x86-64.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let name = syscalls::Sysno::new(nr as usize).map_or("?", |s| s.name());
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    write_stderr(b"picocenter: seccomp: the VMM made host syscall ");
    write_stderr(name.as_bytes());
    write_stderr(b" (");
    write_stderr(&digits[at..]);
    write_stderr(b"), which its filter does not allow; ending the app\n");
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// The filter, compiled once per process: a spare VMM compiles it before its app is
/// known (see [`prepare`]), which takes the compilation off the app's start.
static COMPILED: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

/// The filter, compiled at the first call.
fn compiled() -> Result<&'static BpfProgram, JailError> {
    if let Some(program) = COMPILED.get() {
        return Ok(program);
    }
    let program = filter()?;
    Ok(COMPILED.get_or_init(|| program))
}

/// Compiles the filter now, for a later [`install`].
pub fn prepare() -> Result<(), JailError> {
    compiled().map(drop)
}

/// Installs the SIGSYS handler and the filter on every thread of the process.
pub fn install() -> Result<(), JailError> {
    install_program(compiled()?)
}

/// Installs the SIGSYS handler and `program` on every thread of the process.
fn install_program(program: &BpfProgram) -> Result<(), JailError> {
    // SAFETY: a sigaction with a handler of the right signature, SA_SIGINFO set, and a
    // zeroed (empty) mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(JailError::Config(format!(
                "installing the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    seccompiler::apply_filter_all_threads(program)
        .map_err(|e| JailError::Config(format!("installing the seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_leaves_out_what_a_jailed_vmm_never_needs() {
        let program = filter().unwrap();
        assert!(!program.is_empty());
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_setresuid,
            libc::SYS_ptrace,
            libc::SYS_bpf,
            libc::SYS_mknodat,
            libc::SYS_init_module,
            libc::SYS_kill,
        ] {
            assert!(!ALLOWED.contains(&forbidden), "{forbidden}");
        }
        // A forbidden call ends the process with 159 and a line naming it.
        let (read, write) = rustix::pipe::pipe().unwrap();
        // SAFETY: the child only installs the prepared filter, redirects stderr and makes
        // one forbidden call; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: dup2 onto stderr in the child.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&write), 2) };
            let _ = install_program(&program);
            // SAFETY: a syscall the filter forbids; its arguments are never read.
            unsafe { libc::syscall(libc::SYS_unshare, 0) };
            // SAFETY: not reached when the filter works.
            unsafe { libc::_exit(0) };
        }
        drop(write);
        let mut status = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let mut said = vec![0u8; 512];
        let n = rustix::io::read(&read, &mut said).unwrap();
        let said = String::from_utf8_lossy(&said[..n]).into_owned();
        assert_eq!(libc::WEXITSTATUS(status), 159, "{said}");
        assert!(said.contains("host syscall unshare"), "{said}");
        let mut sorted = ALLOWED.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ALLOWED.len(), "a call is listed twice");
    }

    /// Between the VMMs of an app only the guest-signal carrier may be sent: a jailed VMM
    /// that queues any other signal (to itself, here) dies of the filter.
    #[test]
    fn only_the_guest_signal_carrier_can_be_queued() {
        let program = filter().unwrap();
        let queue = |signal: i32| {
            // SAFETY: the child installs the filter, queues one signal to itself (blocked,
            // so that only the filter can end it) and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above: the child's own mask, then calls that end it.
                unsafe {
                    let mut all: libc::sigset_t = std::mem::zeroed();
                    libc::sigfillset(&mut all);
                    libc::sigdelset(&mut all, libc::SIGSYS);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                    libc::close(2);
                    let _ = install_program(&program);
                    let value = libc::sigval {
                        sival_ptr: std::ptr::null_mut(),
                    };
                    libc::sigqueue(libc::getpid(), signal, value);
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: reaps our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            libc::WEXITSTATUS(status)
        };
        assert_eq!(queue(crate::kvm::kick::guest_signal_carrier()), 0);
        assert_eq!(queue(libc::SIGUSR1), 159);
    }

    /// A jailed VMM may make its own thread SCHED_BATCH (the mailbox poller does) and
    /// nothing else: no other policy, and no other process's.
    #[test]
    fn only_sched_batch_for_the_caller_is_allowed() {
        let program = filter().unwrap();
        let set = |pid: i32, policy: i32| {
            // SAFETY: the child installs the filter, makes one sched_setscheduler call
            // and _exits; it never returns into the test harness.
            let child = unsafe { libc::fork() };
            if child == 0 {
                // SAFETY: as above.
                unsafe {
                    libc::close(2);
                    let _ = install_program(&program);
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(pid, policy, &param);
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: reaps our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            libc::WEXITSTATUS(status)
        };
        assert_eq!(set(0, libc::SCHED_BATCH), 0);
        assert_eq!(set(0, libc::SCHED_FIFO), 159);
        assert_eq!(set(1, libc::SCHED_BATCH), 159);
    }
}

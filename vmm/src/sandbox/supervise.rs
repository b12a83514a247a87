//! Running a VMM in its jail, with a supervisor beside it: the worker that started it,
//! over the channel it handed down (see [`SUPERVISOR_FD_VAR`] and `super::binder`), or
//! else a forked one. Without a worker, as root, the process forks once: the child becomes
//! the *supervisor* and stays root, outside the jail; the process
//! itself goes on as the VMM, so whoever started it (a worker, a shell) holds the VMM's own
//! pid: its signals reach the VMM directly, and once it is reaped the VMM is gone. The VMM
//! enters the jail's mount namespace, builds the picoprocess, then locks itself down
//! ([`Lockdown::now`]: the app's own uid, leased from a range like its address, with no
//! capabilities, `no_new_privs` and the seccomp filter) and runs the app. The supervisor
//! binds privileged ports for it (see [`super::binder`]) and, when the VMM ends, cleans up
//! what the jailed VMM may no longer touch (the jail's scratch directory, its control
//! socket file).
//!
//! Without root none of the jail's first steps is possible: the VMM runs as the invoking
//! user, still with `no_new_privs` and the seccomp filter.

use super::jail::{self, JailError, JailSpec};
use super::lease::{spread, take_first_free, Lease};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The uids jailed VMMs run as, unless PICOCENTER_UIDS says `FIRST-LAST`.
pub const DEFAULT_UIDS: (u32, u32) = (2_000_000_000, 2_000_065_535);

/// Most host processes and threads an app's uid may have (RLIMIT_NPROC).
const HOST_TASKS_PER_APP: libc::rlim_t = 1024;

/// Locks a built VMM down: called by the VMM once it holds everything it needs.
#[derive(Debug, Clone)]
pub struct Lockdown {
    identity: Option<(u32, u32)>,
}

/// The parent-death signal this process has (0 for none).
fn parent_death_signal() -> i32 {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int through the pointer we pass.
    unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
    signal
}

/// Sets the parent-death signal again (a change of user clears it), and ends now if the
/// parent has already gone in between.
fn restore_parent_death_signal(signal: i32, parent: u32) -> Result<(), JailError> {
    if signal == 0 {
        return Ok(());
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a signal number touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) } != 0 {
        return Err(io_step("PR_SET_PDEATHSIG".into())(
            std::io::Error::last_os_error(),
        ));
    }
    if std::os::unix::process::parent_id() != parent {
        std::process::exit(1);
    }
    Ok(())
}

impl Lockdown {
    /// Gives `path` and everything in it to the app's user, as the jail gave the app's
    /// directories before the VMM started: for what the VMM made in them since as root
    /// (a restore's unpacked data).
    pub fn own(&self, path: &Path) -> Result<(), JailError> {
        match self.identity {
            Some((uid, _)) => give(path, uid, uid_range()?),
            None => Ok(()),
        }
    }

    /// Drops to the app's user (as root) and installs the seccomp filter.
    pub fn now(&self) -> Result<(), JailError> {
        match self.identity {
            Some((uid, gid)) => {
                // The app's uid is its own: a backstop on its host processes and threads,
                // beside the table's 64 processes (each VMM has a few threads).
                let limit = libc::rlimit {
                    rlim_cur: HOST_TASKS_PER_APP,
                    rlim_max: HOST_TASKS_PER_APP,
                };
                // SAFETY: setrlimit reads one rlimit we own.
                unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) };
                // Whoever asked the VMM to die with it (a worker does) still gets that.
                let (signal, parent) = (parent_death_signal(), std::os::unix::process::parent_id());
                jail::drop_privileges(uid, gid)?;
                restore_parent_death_signal(signal, parent)?;
            }
            None => jail::set_no_new_privs()?,
        }
        super::seccomp::install()
    }
}

/// The uid range, from PICOCENTER_UIDS or the default.
pub fn uid_range() -> Result<(u32, u32), JailError> {
    let Ok(text) = std::env::var("PICOCENTER_UIDS") else {
        return Ok(DEFAULT_UIDS);
    };
    let parsed = text
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
    match parsed {
        Some((first, last)) if first > 0 && first <= last => Ok((first, last)),
        _ => Err(JailError::Config(format!(
            "PICOCENTER_UIDS={text}: expected FIRST-LAST, with 0 < FIRST <= LAST"
        ))),
    }
}

fn io_step(what: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Step { step: what, source }
}

fn lease_uid(run_dir: &Path) -> Result<Lease<u32>, JailError> {
    let (first, last) = uid_range()?;
    let dir = run_dir.join("uids");
    let count = last - first + 1;
    take_first_free(&dir, spread(first, count))
        .map_err(io_step(format!("leasing a uid in {}", dir.display())))?
        .ok_or_else(|| {
            JailError::Config(format!(
                "every uid of {first}-{last} runs an app; widen PICOCENTER_UIDS"
            ))
        })
}

/// Gives `dir` and everything in it to `uid`, without following symlinks. A regular
/// file with other hard links that the app's users do not already own is left alone
/// (it may be a host file linked in), and named in the log.
fn give(dir: &Path, uid: u32, uids: (u32, u32)) -> Result<(), JailError> {
    let meta =
        std::fs::symlink_metadata(dir).map_err(io_step(format!("reading {}", dir.display())))?;
    let foreign_link = meta.is_file()
        && meta.nlink() > 1
        && !(uids.0..=uids.1).contains(&meta.uid())
        && meta.uid() != uid;
    if foreign_link {
        tracing::warn!(
            "{} has other hard links and is not the app's: left as it is",
            dir.display()
        );
        return Ok(());
    }
    // Already the app's (most of a restored directory is, but what the restore made):
    // one call less each.
    if meta.uid() != uid || meta.gid() != uid {
        std::os::unix::fs::lchown(dir, Some(uid), Some(uid))
            .map_err(io_step(format!("giving {} to uid {uid}", dir.display())))?;
    }
    if meta.is_dir() {
        let listing = io_step(format!("listing {}", dir.display()));
        for entry in std::fs::read_dir(dir).map_err(listing)? {
            let entry = entry.map_err(io_step(format!("listing {}", dir.display())))?;
            give(&entry.path(), uid, uids)?;
        }
    }
    Ok(())
}

/// Runs `vmm` in a jail showing `spec.visible` (its uid owning `owned`), with the
/// control sockets in `run_dir`, and returns its exit status. `vmm` reports its own
/// errors and returns a status.
pub fn supervise(
    mut spec: JailSpec,
    owned: &[PathBuf],
    cleanup: &[PathBuf],
    held: &[BorrowedFd<'_>],
    run_dir: &Path,
    address: std::net::IpAddr,
    vmm: impl FnOnce(&Lockdown) -> i32,
) -> Result<i32, JailError> {
    // Taken in every case, so that the channel's fd is never left open without
    // close-on-exec; without root there is nothing for a supervisor to do.
    let worker = worker_channel()?;
    if !rustix::process::geteuid().is_root() {
        tracing::debug!("not root: the VMM runs as this user, without a jail of its own");
        drop(worker);
        return Ok(vmm(&Lockdown { identity: None }));
    }
    let lease = lease_uid(run_dir)?;
    tracing::trace!(uid = lease.value, "jail: uid leased");
    let uids = uid_range()?;
    for dir in owned {
        give(dir, lease.value, uids)?;
    }
    // Named by the uid, whose lease the supervisor holds until it has removed this: a
    // later VMM never finds it (a pid may come back sooner).
    let scratch = run_dir.join(format!("jail-{}", lease.value));
    crate::control::private_dir(&scratch)
        .map_err(io_step(format!("creating {}", scratch.display())))?;
    spec.scratch = scratch.clone();
    tracing::trace!("jail: owned directories given, scratch made");
    let lockdown = Lockdown {
        identity: Some((lease.value, lease.value)),
    };
    let mut leftovers = vec![scratch.clone()];
    leftovers.extend(cleanup.iter().cloned());
    let supervisor = match worker {
        Some(channel) => {
            // The worker that started this VMM supervises it: no process of its own.
            let mut held = held.to_vec();
            held.push(lease.lock());
            super::binder::hand_over(channel.as_fd(), &leftovers, &held)
                .map_err(|e| io_step("handing the leftovers to the worker".into())(e.into()))?;
            super::binder::install(channel);
            None
        }
        None => Some(start_supervisor(address, &leftovers, run_dir)?),
    };
    tracing::trace!("jail: supervisor ready");
    let status = match jail::enter_filesystem(&spec) {
        Ok(()) => {
            tracing::debug!(uid = lease.value, "in the jail");
            vmm(&lockdown)
        }
        Err(e) => {
            eprintln!("picocenter: error: {}", crate::report::error_chain(&e));
            1
        }
    };
    // Done: the supervisor cleans up, and the VMM ends only once it has (so whoever
    // waits for the VMM finds its files gone).
    match supervisor {
        Some(supervisor) => {
            super::binder::close();
            let mut reaped = 0;
            // SAFETY: waits for our own child; `reaped` is written by the kernel.
            unsafe { libc::waitpid(supervisor, &mut reaped, 0) };
        }
        None => super::binder::finish(WORKER_CLEANUP_WAIT),
    }
    Ok(status)
}

/// The variable through which a worker hands its VMM the fd of its supervision channel.
pub const SUPERVISOR_FD_VAR: &str = "PICOCENTER_SUPERVISOR_FD";

/// How long an ending VMM waits for its worker to remove what it left.
const WORKER_CLEANUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The channel to the worker that supervises this VMM, if it handed one down
/// ([`SUPERVISOR_FD_VAR`]): a Unix stream socket, taken (close-on-exec, the variable
/// removed) so that nothing this process starts inherits it.
fn worker_channel() -> Result<Option<OwnedFd>, JailError> {
    let Ok(text) = std::env::var(SUPERVISOR_FD_VAR) else {
        return Ok(None);
    };
    // The process is single-threaded here (as the supervisor's fork needs), so no thread
    // reads the environment while it changes.
    std::env::remove_var(SUPERVISOR_FD_VAR);
    let invalid = || JailError::Config(format!("{SUPERVISOR_FD_VAR}={text}: not a socket fd"));
    let fd: i32 = text.trim().parse().map_err(|_| invalid())?;
    if fd < 3 {
        return Err(invalid());
    }
    // SAFETY: fcntl(F_SETFD) on an fd number only changes its flags; it fails (EBADF) on
    // one that is not open, which is checked before the number is owned.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(invalid());
    }
    // SAFETY: the fd is open (checked above) and was handed down for this use only: the
    // worker passes it under this variable, and nothing else in this process owns it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    match rustix::fs::fstat(&channel) {
        Ok(stat)
            if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                == rustix::fs::FileType::Socket =>
        {
            Ok(Some(channel))
        }
        _ => Err(invalid()),
    }
}

/// Forks the supervisor: the child serves the VMM's bind requests for the app's
/// `address` and, once this process (the VMM) is done (it closes its end, or ends),
/// removes `leftovers` (the jail's scratch directory, temporary roots and data, its control
/// socket) and the stale control sockets of `run_dir`. This process goes on as the VMM. Returns the
/// supervisor's pid.
fn start_supervisor(
    address: std::net::IpAddr,
    leftovers: &[PathBuf],
    run_dir: &Path,
) -> Result<i32, JailError> {
    let (vmm_end, supervisor_end) =
        super::binder::channel().map_err(|e| io_step("socketpair".into())(e.into()))?;
    let vmm = rustix::process::getpid();
    // SAFETY: the process is single-threaded here (the jail checks it again), so the child
    // is a complete copy; it only supervises and ends with _exit, running none of the
    // parent's destructors.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_step("forking the supervisor".into())(
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        drop(vmm_end);
        crate::heap::give_back_free_heap();
        supervise_until_gone(vmm, &supervisor_end, address);
        for path in leftovers {
            if std::fs::remove_dir_all(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        crate::control::remove_stale_sockets(run_dir);
        // SAFETY: ends the supervisor without running the VMM's atexit handlers or
        // destructors, which belong to the VMM.
        unsafe { libc::_exit(0) };
    }
    drop(supervisor_end);
    super::binder::install(vmm_end);
    Ok(pid)
}

/// The supervisor's loop: bind requests until the VMM `vmm` closes its end or ends. Signals meant for the
/// app (a Ctrl-C to the terminal's process group) are the VMM's to handle, not its.
fn supervise_until_gone(
    vmm: rustix::process::Pid,
    binder: &std::os::fd::OwnedFd,
    address: std::net::IpAddr,
) {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: ignoring a signal installs no handler and touches no memory.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let Ok(pidfd) = rustix::process::pidfd_open(vmm, rustix::process::PidfdFlags::empty()) else {
        return;
    };
    if rustix::process::getppid() != Some(vmm) {
        return;
    }
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(binder, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
        if !fds[0].revents().is_empty() {
            return;
        }
        let asked = !fds[1].revents().is_empty();
        // The VMM closed its end (it is done, and waits for this cleanup) or ended.
        if asked && !super::binder::serve_one(binder.as_fd(), address) {
            return;
        }
    }
}

//! Running a VMM in its jail under a supervisor: as root, the process forks; the child
//! enters the jail's mount namespace, builds the picoprocess, then locks itself down
//! ([`Lockdown::now`]: the app's own uid, leased from a range like its address, with no
//! capabilities, `no_new_privs` and the seccomp filter) and runs the app. The parent stays
//! outside as its supervisor: it forwards signals, cleans up what the jailed child may no
//! longer touch (the jail's scratch directory, its control socket file), and returns the
//! child's status.
//!
//! Without root none of the jail's first steps is possible: the VMM runs in-process as the
//! invoking user, still with `no_new_privs` and the seccomp filter.

use super::jail::{self, JailError, JailSpec};
use super::lease::{spread, take_first_free, Lease};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The uids jailed VMMs run as, unless PICOCENTER_UIDS says `FIRST-LAST`.
pub const DEFAULT_UIDS: (u32, u32) = (2_000_000_000, 2_000_065_535);

/// Locks a built VMM down: called by the VMM once it holds everything it needs.
#[derive(Debug)]
pub struct Lockdown {
    identity: Option<(u32, u32)>,
    supervisor: u32,
}

/// Makes this process get SIGKILL when its parent `supervisor` ends (or now, if it has).
fn die_with_parent(supervisor: u32) -> Result<(), JailError> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) with a signal number touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io_step("PR_SET_PDEATHSIG".into())(
            std::io::Error::last_os_error(),
        ));
    }
    if std::os::unix::process::parent_id() != supervisor {
        std::process::exit(1);
    }
    Ok(())
}

impl Lockdown {
    /// Drops to the app's user (as root) and installs the seccomp filter.
    pub fn now(&self) -> Result<(), JailError> {
        match self.identity {
            Some((uid, gid)) => {
                jail::drop_privileges(uid, gid)?;
                // A change of user clears the parent-death signal: set it again, so the
                // VMM still dies with its supervisor.
                die_with_parent(self.supervisor)?;
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
    std::os::unix::fs::lchown(dir, Some(uid), Some(uid))
        .map_err(io_step(format!("giving {} to uid {uid}", dir.display())))?;
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
    run_dir: &Path,
    address: std::net::IpAddr,
    vmm: impl FnOnce(&Lockdown) -> i32,
) -> Result<i32, JailError> {
    if !rustix::process::geteuid().is_root() {
        tracing::debug!("not root: the VMM runs as this user, without a jail of its own");
        return Ok(vmm(&Lockdown {
            identity: None,
            supervisor: 0,
        }));
    }
    let lease = lease_uid(run_dir)?;
    let uids = uid_range()?;
    for dir in owned {
        give(dir, lease.value, uids)?;
    }
    let scratch = run_dir.join(format!("jail-{}", std::process::id()));
    crate::control::private_dir(&scratch)
        .map_err(io_step(format!("creating {}", scratch.display())))?;
    spec.scratch = scratch.clone();
    let lockdown = Lockdown {
        identity: Some((lease.value, lease.value)),
        supervisor: std::process::id(),
    };
    let status = fork_and_wait(address, || match jail::enter_filesystem(&spec) {
        Ok(()) => vmm(&lockdown),
        Err(e) => {
            eprintln!("picocenter: error: {e}: {}", error_chain(&e));
            1
        }
    });
    let _ = std::fs::remove_dir(&scratch);
    crate::control::remove_stale_sockets(run_dir);
    status
}

/// The sources of `error`, joined, for a one-line report.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.join(": ")
}

/// The signals the supervisor passes on to its child.
const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn signal_set(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Forks; the child runs `child` and exits with its status (or 1 after printing its
/// error); the parent forwards signals to it and returns its status.
fn fork_and_wait(address: std::net::IpAddr, child: impl FnOnce() -> i32) -> Result<i32, JailError> {
    let (vmm_end, supervisor_end) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io_step("socketpair".into())(e.into()))?;
    let set = signal_set(&FORWARDED);
    let mut old: libc::sigset_t = signal_set(&[]);
    // SAFETY: blocks the forwarded signals in this (single-threaded) process, so that
    // none is lost between the fork and the signalfd; `old` receives the previous mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    let parent = std::process::id();
    // SAFETY: the CLI is single-threaded here (the jail checks it again), so the child
    // is a complete copy; it only runs `child` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io_step("forking the VMM".into())(
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // SAFETY: restores the mask the parent had; dies with the supervisor.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(1);
        }
        drop(supervisor_end);
        super::binder::install(vmm_end);
        std::process::exit(child());
    }
    drop(vmm_end);
    wait_forwarding(pid, &set, supervisor_end, address)
}

/// Waits for child `pid`, passing on the signals of `set` (blocked in this process) and
/// serving its bind requests on `binder` for the app's `address`.
fn wait_forwarding(
    pid: i32,
    set: &libc::sigset_t,
    binder: std::os::fd::OwnedFd,
    address: std::net::IpAddr,
) -> Result<i32, JailError> {
    let mut binder = Some(binder);
    // SAFETY: a signalfd over a set we own, close-on-exec.
    let sfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if sfd < 0 {
        return Err(io_step("signalfd".into())(std::io::Error::last_os_error()));
    }
    // SAFETY: `sfd` is a new fd that nothing else owns.
    let sfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sfd) };
    let child = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| JailError::Config(format!("fork gave pid {pid}")))?;
    let pidfd = rustix::process::pidfd_open(child, rustix::process::PidfdFlags::empty())
        .map_err(|e| io_step("pidfd_open".into())(e.into()))?;
    loop {
        let mut fds = vec![
            rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&sfd, rustix::event::PollFlags::IN),
        ];
        if let Some(binder) = &binder {
            fds.push(rustix::event::PollFd::new(
                binder,
                rustix::event::PollFlags::IN,
            ));
        }
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io_step("waiting for the VMM".into())(e.into())),
        }
        let (exited, signalled) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        let asked = fds.get(2).is_some_and(|fd| !fd.revents().is_empty());
        drop(fds);
        if asked {
            let open = binder
                .as_ref()
                .is_some_and(|b| super::binder::serve_one(b.as_fd(), address));
            if !open {
                binder = None;
            }
        }
        if signalled {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            if rustix::io::read(&sfd, &mut info).is_ok_and(|n| n == info.len()) {
                let signal = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                // SAFETY: kill(2) on our own child with a signal number from the kernel.
                unsafe { libc::kill(pid, signal as i32) };
            }
        }
        if exited {
            let mut status = 0;
            // SAFETY: reaps our own child; `status` is written by the kernel.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                let signal = libc::WTERMSIG(status);
                eprintln!(
                    "picocenter: the VMM was killed by {}",
                    crate::exit::signal_name(signal)
                );
                128 + signal
            });
        }
    }
}

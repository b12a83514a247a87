//! The warm pool: spare VMM processes (`picocenter spare`) started ahead of need, each
//! with its KVM VM and vCPU made, waiting to be told which app to run (see
//! `picocenter_vmm::spare`). A start or restore that finds one skips process start-up and
//! VM creation; one that finds none starts its VMM as before. The pool is bounded, and one
//! thread refills it in the background after each take.
//!
//! A spare is the worker's child like any VMM and dies with it; it runs no app code until
//! its assignment, and becomes one app's VMM, never a second's.

use super::child::ChildProcess;
use picocenter_vmm::spare::{self, Assignment, SpareError};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where spares write until they have an app's log, in the worker's log directory.
pub const SPARES_LOG: &str = ".spares.log";

/// How a spare is started.
#[derive(Debug, Clone)]
pub struct SpareCommand {
    /// The `picocenter` binary.
    pub picocenter: PathBuf,
    /// The state directory the VMMs use.
    pub state_dir: PathBuf,
    /// Where a spare's own messages go until it has an app's log ([`SPARES_LOG`] in it).
    pub log_dir: PathBuf,
    /// The VMMs' temporary directory (`TMPDIR`).
    pub temp_dir: PathBuf,
}

/// A spare VMM, waiting for its assignment.
#[derive(Debug)]
pub struct Spare {
    child: ChildProcess,
    socket: OwnedFd,
}

/// What a spare is told to become for `cmd` (a VMM's command line and environment, as
/// `super::vmm` builds it): checked before a spare is taken, so that a command a spare
/// cannot be given costs no spare.
pub fn assignment(cmd: &Command) -> Result<Assignment, SpareError> {
    let text = |s: &std::ffi::OsStr| {
        s.to_str()
            .map(str::to_string)
            .ok_or_else(|| SpareError::Malformed(format!("{s:?} is not UTF-8")))
    };
    let args = cmd.get_args().map(text).collect::<Result<Vec<_>, _>>()?;
    let env = cmd
        .get_envs()
        .map(|(name, value)| Ok((text(name)?, value.map(text).transpose()?)))
        .collect::<Result<Vec<_>, SpareError>>()?;
    Ok(Assignment { args, env })
}

impl Spare {
    /// Tells the spare to become what `assignment` says, with `handed` as its fds 3, 4, ...
    /// and `log` as its stdout and stderr; returns its process. A spare that has died
    /// fails here (the caller then starts the VMM itself).
    pub fn assign(
        self,
        assignment: &Assignment,
        handed: &[BorrowedFd<'_>],
        log: BorrowedFd<'_>,
    ) -> Result<ChildProcess, SpareError> {
        spare::send(self.socket.as_fd(), assignment, handed, log)?;
        Ok(self.child)
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

/// A bounded pool of spares, refilled by a thread of its own.
#[derive(Debug, Clone)]
pub struct WarmPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    size: usize,
    spares: Mutex<VecDeque<Spare>>,
    /// Signalled when a spare is taken: the refill thread makes another.
    taken: Condvar,
}

impl WarmPool {
    /// A pool of `size` spares (none: `size` 0), started with `command`. Must be called
    /// within the tokio runtime, whose handle the refill thread uses to watch its spares.
    pub fn start(size: usize, command: SpareCommand) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                size,
                spares: Mutex::new(VecDeque::with_capacity(size)),
                taken: Condvar::new(),
            }),
        };
        if size > 0 {
            let inner = pool.inner.clone();
            let runtime = tokio::runtime::Handle::current();
            // The spares' parent-death signal is tied to the thread that starts them (the
            // kernel's rule), so that thread never ends: an app a spare became must not
            // die with it.
            let started = std::thread::Builder::new()
                .name("warm-pool".into())
                .spawn(move || {
                    let _runtime = runtime.enter();
                    refill_forever(&inner, &command)
                });
            if let Err(err) = started {
                tracing::warn!("warm pool: no refill thread ({err}): VMMs start cold");
            }
        }
        pool
    }

    /// A live spare, if one waits; the pool makes another in the background.
    pub fn take(&self) -> Option<Spare> {
        let mut spares = self.inner.lock();
        prune_ended(&mut spares);
        let spare = spares.pop_front();
        self.inner.taken.notify_one();
        spare
    }

    /// Spares waiting now (those that ended are reaped and replaced).
    pub fn waiting(&self) -> usize {
        let mut spares = self.inner.lock();
        if prune_ended(&mut spares) {
            self.inner.taken.notify_one();
        }
        spares.len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Spare>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reaps the spares that ended while they waited (a spare whose VM could not be made
/// still waits; one killed by hand does not); true if there were any.
fn prune_ended(spares: &mut VecDeque<Spare>) -> bool {
    let before = spares.len();
    spares.retain(|spare| match spare.child.try_wait() {
        Ok(None) => true,
        Ok(Some(status)) => {
            tracing::warn!(
                pid = spare.id(),
                "warm pool: a waiting spare ended ({status})"
            );
            false
        }
        Err(err) => {
            tracing::warn!(
                pid = spare.id(),
                "warm pool: a waiting spare is lost: {err}"
            );
            false
        }
    });
    spares.len() != before
}

/// How often the refill thread looks for spares that ended, with nothing taken.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Keeps the pool full. A spare that cannot be started is tried again after a pause that
/// doubles up to a minute, with one warning per failure. Never returns, and never
/// unwinds: the spares' parent-death signal follows this thread, so its end would kill
/// every app a spare became.
fn refill_forever(inner: &Inner, command: &SpareCommand) -> ! {
    let mut pause = Duration::from_millis(100);
    loop {
        let refilled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            {
                let mut spares = inner.lock();
                prune_ended(&mut spares);
                while spares.len() >= inner.size {
                    spares = inner
                        .taken
                        .wait_timeout(spares, PRUNE_EVERY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    prune_ended(&mut spares);
                }
            }
            start_spare(command).map(|spare| inner.lock().push_back(spare))
        }));
        match refilled {
            Ok(Ok(())) => pause = Duration::from_millis(100),
            Ok(Err(err)) => {
                tracing::warn!("warm pool: starting a spare VMM: {err}; again in {pause:?}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(60));
            }
            Err(_) => {
                tracing::error!("warm pool: the refill thread panicked; going on in {pause:?}");
                std::thread::sleep(pause);
            }
        }
    }
}

/// Starts one spare: `picocenter spare` with its end of a fresh socket pair as fd 3.
fn start_spare(command: &SpareCommand) -> std::io::Result<Spare> {
    let (worker_end, spare_end) = spare::socket_pair()?;
    let mut cmd =
        super::vmm::base_command(&command.picocenter, &command.state_dir, &command.temp_dir);
    cmd.arg("spare");
    super::vmm::hand_down(&mut cmd, vec![spare_end.as_raw_fd()]);
    let _ = picocenter_snapshots::private::create_dir_all(&command.log_dir);
    // A name no app's log can have (app names start with a letter or digit).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(command.log_dir.join(SPARES_LOG))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    super::vmm::die_with_worker(&mut cmd);
    let child = ChildProcess::spawn(&mut cmd)?;
    drop(spare_end);
    Ok(Spare {
        child,
        socket: worker_end,
    })
}

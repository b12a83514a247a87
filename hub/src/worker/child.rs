//! A VMM process the worker started, known by one pidfd: its end can be awaited by
//! several tasks at once (the worker's and the VMM's supervision), it is reaped and
//! signalled through that pidfd (never through a pid that may have been reused).
//!
//! One fd per VMM: a tokio `Child` keeps a pidfd of its own, which beside the
//! supervision's made two, and at thousands of resident apps the worker's open files are
//! what runs out first (issue #18).

use rustix::process::{PidfdFlags, Signal, WaitId, WaitIdOptions, WaitIdStatus};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;

/// A started child process; clones share it. When the last clone goes and the process
/// has not been reaped, it is killed and reaped on a thread of its own.
#[derive(Debug, Clone)]
pub struct ChildProcess {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// Its status once reaped.
    status: Mutex<Option<ExitStatus>>,
}

impl ChildProcess {
    /// Starts `cmd`. Must be called within the tokio runtime.
    pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<Self> {
        let mut child = cmd.spawn()?;
        let pid = child.id();
        // Nothing reaps the child but this handle, so until it does the pid names it.
        let opened = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))
            .and_then(|pid| Ok(rustix::process::pidfd_open(pid, PidfdFlags::NONBLOCK)?))
            .and_then(|pidfd| {
                // SAFETY: `pidfd` is an open fd this AsyncFd owns from now on; an OwnedFd's
                // raw fd never changes while it lives.
                unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            });
        match opened {
            Ok(pidfd) => Ok(Self {
                inner: Arc::new(Inner {
                    pid,
                    pidfd,
                    status: Mutex::new(None),
                }),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Its pid.
    pub fn id(&self) -> u32 {
        self.inner.pid
    }

    /// Its status, if it has ended (reaping it).
    pub fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        self.inner.try_wait()
    }

    /// Waits until it ends, and reaps it.
    pub async fn wait(&self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            // A pidfd becomes readable when its process has ended.
            let mut ready = self.inner.pidfd.readable().await?;
            ready.retain_ready();
        }
    }

    /// Waits until it ends, without reaping it.
    pub async fn ended(&self) {
        if let Ok(mut ready) = self.inner.pidfd.readable().await {
            ready.retain_ready();
        }
    }

    /// Sends it `signal`; a process already ended is not an error.
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        match rustix::process::pidfd_send_signal(self.inner.pidfd.get_ref(), signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Kills it and waits until it has ended.
    pub async fn kill(&self) -> std::io::Result<ExitStatus> {
        self.signal(Signal::KILL)?;
        self.wait().await
    }
}

impl Inner {
    fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = *status {
            return Ok(Some(status));
        }
        *status = reap_if_ended(self.pidfd.get_ref())?.map(exit_status);
        Ok(*status)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let reaped = self.status.get_mut().map(|s| s.is_some()).unwrap_or(true);
        if reaped {
            return;
        }
        let _ = rustix::process::pidfd_send_signal(self.pidfd.get_ref(), Signal::KILL);
        // The end of a killed process takes a moment; no async task waits for it.
        if let Ok(pidfd) = self.pidfd.get_ref().try_clone() {
            std::thread::spawn(move || reap(&pidfd));
        }
    }
}

/// Waits for the process of `pidfd` to end, and reaps it. The pidfd is non-blocking (a
/// `waitid` on it fails with EAGAIN until the process has ended), so the wait is a `poll`.
fn reap(pidfd: &OwnedFd) {
    loop {
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
        match reap_if_ended(pidfd) {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => continue,
        }
    }
}

/// Reaps the process of `pidfd` if it has ended: its status, or `None` while it runs.
fn reap_if_ended(pidfd: &OwnedFd) -> std::io::Result<Option<WaitIdStatus>> {
    Ok(rustix::process::waitid(
        WaitId::PidFd(pidfd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?)
}

/// `waitid`'s status as `wait`'s, which std's `ExitStatus` holds.
fn exit_status(status: WaitIdStatus) -> ExitStatus {
    if let Some(code) = status.exit_status() {
        ExitStatus::from_raw((code & 0xff) << 8)
    } else if let Some(signal) = status.terminating_signal() {
        ExitStatus::from_raw((signal & 0x7f) | if status.dumped() { 0x80 } else { 0 })
    } else {
        ExitStatus::from_raw(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_is_awaited_by_two_tasks_and_reaped_once_with_its_status() {
        let child =
            ChildProcess::spawn(std::process::Command::new("sh").args(["-c", "exit 7"])).unwrap();
        let watcher = child.clone();
        let ended = tokio::spawn(async move { watcher.ended().await });
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(7));
        ended.await.unwrap();
        // Reaped: asking again gives the same status, and the pid is no longer a child.
        assert_eq!(child.try_wait().unwrap().and_then(|s| s.code()), Some(7));
        assert!(rustix::process::waitpid(
            rustix::process::Pid::from_raw(child.id() as i32),
            rustix::process::WaitOptions::NOHANG
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_killed_child_reports_its_signal_and_a_dropped_one_is_killed_and_reaped() {
        let child = ChildProcess::spawn(std::process::Command::new("sleep").arg("30")).unwrap();
        assert!(child.try_wait().unwrap().is_none());
        let status = child.kill().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        let dropped = ChildProcess::spawn(std::process::Command::new("sleep").arg("30")).unwrap();
        let pid = dropped.id();
        drop(dropped);
        // Killed and reaped by the drop's thread: soon no such process.
        let gone = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
        assert!(gone, "a dropped child was left running or unreaped");
    }
}

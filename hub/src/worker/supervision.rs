//! The worker as the supervisor of its jailed VMMs, in place of a forked process per VMM
//! (see `picocenter_vmm::sandbox::binder`): it binds privileged ports for each VMM, only on
//! the app's own address, and removes what the VMM left once it is done, holding the VMM's
//! name and uid leases until then.
//!
//! An idle app then costs one process less: a forked supervisor's private pages, page
//! tables and task were ~0.4 MiB of the ~1.5 MiB an idle app took (BENCHMARKS.md, "Density").

use super::child::ChildProcess;
use picocenter_vmm::sandbox::binder::{self, Leftovers, Served};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;

/// Starts serving `worker_end` (a socketpair end whose other end the VMM, process `vmm`,
/// holds) for an app at `own`, on a task of its own. When the VMM closes its end, the
/// worker closes its own (a VMM ending normally waits for that), then waits for the
/// process to end, and only then removes its leftovers (only under `roots`: the worker's
/// state directory and the temporary directory; and `run_dir`'s stale control sockets)
/// and lets go of its leases: a VMM that closes its end early (a subverted one) loses
/// nothing it still uses, and its uid is not leased to another app while it runs.
pub fn start(
    worker_end: OwnedFd,
    vmm: ChildProcess,
    own: IpAddr,
    roots: Vec<PathBuf>,
    run_dir: PathBuf,
) -> std::io::Result<()> {
    rustix::io::ioctl_fionbio(&worker_end, true)?;
    // SAFETY: `worker_end` is an open fd this AsyncFd owns from now on; an OwnedFd's raw
    // fd never changes while it lives.
    let channel =
        unsafe { AsyncFd::register_with_interest(worker_end, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        let leftovers = serve(&channel, own).await;
        // Closing the channel tells a VMM waiting in `binder::finish` that it may end.
        drop(channel);
        vmm.ended().await;
        let removal = tokio::task::spawn_blocking(move || {
            remove(&leftovers.paths, &roots);
            picocenter_vmm::control::remove_stale_sockets(&run_dir);
            // The leases go only now: the next VMM of this name, or of this uid, starts
            // on a clean slate.
            drop(leftovers.held);
        });
        let _ = removal.await;
    });
    Ok(())
}

/// Serves binds until the VMM closes its end (or breaks the protocol); returns what it
/// handed over to remove. Each message is read, and its fds bound and closed, on a
/// blocking thread: closing a socket a VMM sent can wait (SO_LINGER), which must not
/// hold up the worker's runtime; one message at a time per VMM.
async fn serve(channel: &AsyncFd<OwnedFd>, own: IpAddr) -> Leftovers {
    let mut leftovers = Leftovers::default();
    let mut first = true;
    loop {
        let Ok(mut ready) = channel.readable().await else {
            return leftovers;
        };
        let Ok(end) = channel.get_ref().try_clone() else {
            return leftovers;
        };
        let served =
            tokio::task::spawn_blocking(move || binder::serve_message(end.as_fd(), own, first))
                .await;
        match served {
            Ok(Served::NotReady) => {
                ready.clear_ready();
                continue;
            }
            Ok(Served::Answered) => {}
            Ok(Served::HandedOver(handed)) => leftovers = handed,
            Ok(Served::Closed) | Err(_) => return leftovers,
        }
        first = false;
    }
}

/// Removes each of `paths` that lies under one of `roots` (a directory with all it holds,
/// or a file; a symlink itself, never what it points to).
fn remove(paths: &[PathBuf], roots: &[PathBuf]) {
    for path in paths {
        if !roots
            .iter()
            .any(|root| path.starts_with(root) && path != root)
        {
            tracing::warn!(
                "a VMM asked to remove {} after it, outside the worker's directories: left",
                path.display()
            );
            continue;
        }
        let removed = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
            Err(_) => Ok(()),
        };
        if let Err(e) = removed {
            tracing::warn!("removing {} after its VMM: {e}", path.display());
        }
    }
}

/// The directories under which a VMM's leftovers may lie: the state directory and the
/// temporary directory, as given and as canonical paths.
pub fn roots(state_dir: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for dir in [state_dir.to_path_buf(), std::env::temp_dir()] {
        if let Ok(canonical) = dir.canonicalize() {
            roots.push(canonical);
        }
        roots.push(dir);
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;
    use picocenter_vmm::sandbox::binder;

    fn v4(ip: [u8; 4], port: u16) -> Vec<u8> {
        picocenter_vmm::syscalls::net::encode_ip((std::net::Ipv4Addr::from(ip), port).into())
    }

    /// A VMM that closes its end early (a subverted one) keeps its leftovers and its
    /// leases until its process ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_removed_or_let_go_while_the_vmm_runs() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        let scratch = state.join("run/jail-7");
        std::fs::create_dir_all(&scratch).unwrap();
        let lock_path = root.path().join("uid.lock");
        let lock = std::fs::File::create(&lock_path).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        let vmm = ChildProcess::spawn(std::process::Command::new("sleep").arg("30")).unwrap();
        let (vmm_end, worker_end) = binder::channel().unwrap();
        let own: IpAddr = "127.100.9.10".parse().unwrap();
        start(
            worker_end,
            vmm.clone(),
            own,
            vec![state.clone()],
            state.join("run"),
        )
        .unwrap();
        binder::hand_over(
            vmm_end.as_fd(),
            std::slice::from_ref(&scratch),
            &[lock.as_fd()],
        )
        .unwrap();
        drop((vmm_end, lock));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(scratch.exists(), "removed while the VMM runs");
        let probe = std::fs::File::open(&lock_path).unwrap();
        assert!(
            rustix::fs::flock(&probe, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err(),
            "the lease was let go while the VMM runs"
        );
        vmm.kill().await.unwrap();
        let started = std::time::Instant::now();
        while scratch.exists() {
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The worker binds only on the app's address, removes what the VMM handed over (and
    /// nothing outside its directories), keeps the VMM's lease locked until then, and lets
    /// the VMM end only after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_worker_binds_for_its_vmm_and_removes_what_it_left() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        let (scratch, kept) = (state.join("run/jail-1"), outside.path().join("kept"));
        std::fs::create_dir_all(scratch.join("deep")).unwrap();
        std::fs::write(scratch.join("deep/file"), b"x").unwrap();
        std::fs::write(&kept, b"x").unwrap();
        // A leftover that became a symlink to a directory elsewhere: the link goes, never
        // what it points to.
        let link = state.join("run/picocenter-data-link");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let lock_path = root.path().join("name.lock");
        let lock = std::fs::File::create(&lock_path).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();

        let (vmm_end, worker_end) = binder::channel().unwrap();
        let own: IpAddr = "127.100.9.9".parse().unwrap();
        // The VMM's process is stood for by a child that ends at once: its leftovers go
        // when the channel has closed and that process has ended.
        let child = ChildProcess::spawn(&mut std::process::Command::new("true")).unwrap();
        start(
            worker_end,
            child.clone(),
            own,
            vec![state.clone()],
            state.join("run"),
        )
        .unwrap();
        child.wait().await.unwrap();
        let leftovers = [scratch.clone(), kept.clone(), link.clone()];
        let vmm = tokio::task::spawn_blocking(move || {
            binder::hand_over(vmm_end.as_fd(), &leftovers, &[lock.as_fd()]).unwrap();
            drop(lock);
            binder::install(vmm_end);
            let socket = rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap();
            let refused = binder::ask_supervisor(socket.as_fd(), &v4([127, 0, 0, 1], 0));
            binder::ask_supervisor(socket.as_fd(), &v4([127, 100, 9, 9], 0)).unwrap();
            let bound = rustix::net::getsockname(&socket).unwrap();
            binder::finish(std::time::Duration::from_secs(10));
            (refused, format!("{bound:?}"))
        });
        let (refused, bound) = tokio::time::timeout(std::time::Duration::from_secs(20), vmm)
            .await
            .expect("the VMM's finish waits only for the worker's end to close")
            .unwrap();
        assert_eq!(refused, Err(rustix::io::Errno::ADDRNOTAVAIL));
        assert!(bound.contains("127.100.9.9"), "{bound}");
        // The removal follows the VMM's process's end (here a child that ended at once).
        let lock = std::fs::File::open(&lock_path).unwrap();
        let started = std::time::Instant::now();
        while scratch.exists()
            || rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .is_err()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "the VMM's scratch directory is left, or its lease still held"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            kept.exists(),
            "a path outside the worker's directories was removed"
        );
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "the symlink is left"
        );
        assert!(outside.path().is_dir(), "the symlink was followed");
    }
}

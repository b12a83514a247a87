//! The worker as the supervisor of its jailed VMMs, in place of a forked process per VMM
//! (see `picocenter_vmm::sandbox::binder`): it binds privileged ports for each VMM, only on
//! the app's own address, and removes what the VMM left once it is done, holding the VMM's
//! name and uid leases until then.
//!
//! An idle app then costs one process less: a forked supervisor's private pages, page
//! tables and task were ~0.4 MiB of the ~1.5 MiB an idle app took (BENCHMARKS.md, "Density").

use picocenter_vmm::sandbox::binder::{self, Leftovers, Served};
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use tokio::io::unix::AsyncFd;

/// Starts serving `worker_end` (a socketpair end whose other end the VMM holds) for an app
/// at `own`, on a task of its own until the VMM is done. Leftovers are removed only under
/// `roots` (the worker's state directory and the temporary directory); `run_dir`'s stale
/// control sockets go too.
pub fn start(
    worker_end: OwnedFd,
    own: IpAddr,
    roots: Vec<PathBuf>,
    run_dir: PathBuf,
) -> std::io::Result<()> {
    rustix::io::ioctl_fionbio(&worker_end, true)?;
    // SAFETY: `worker_end` is an open fd this AsyncFd owns from now on; an OwnedFd's raw fd
    // never changes while it lives.
    let channel =
        unsafe { AsyncFd::register_with_interest(worker_end, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        let leftovers = serve(&channel, own).await;
        let removal = tokio::task::spawn_blocking(move || {
            remove(&leftovers.paths, &roots);
            picocenter_vmm::control::remove_stale_sockets(&run_dir);
            // The leases go only now: the next VMM of this name starts on a clean slate.
            drop(leftovers.held);
        });
        let _ = removal.await;
        // Closing the channel tells a VMM waiting in `binder::finish` that it may end.
        drop(channel);
    });
    Ok(())
}

/// Serves binds until the VMM closes its end (or breaks the protocol); returns what it
/// handed over to remove.
async fn serve(channel: &AsyncFd<OwnedFd>, own: IpAddr) -> Leftovers {
    let mut leftovers = Leftovers::default();
    let mut first = true;
    loop {
        let Ok(mut ready) = channel.readable().await else {
            return leftovers;
        };
        match binder::serve_message(channel.get_ref().as_fd(), own, first) {
            Served::NotReady => {
                ready.clear_ready();
                continue;
            }
            Served::Answered => {}
            Served::HandedOver(handed) => leftovers = handed,
            Served::Closed => return leftovers,
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
        start(worker_end, own, vec![state.clone()], state.join("run")).unwrap();
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
            .expect("the VMM's finish waits only for the removal")
            .unwrap();
        assert_eq!(refused, Err(rustix::io::Errno::ADDRNOTAVAIL));
        assert!(bound.contains("127.100.9.9"), "{bound}");
        assert!(!scratch.exists(), "the VMM's scratch directory is left");
        assert!(
            kept.exists(),
            "a path outside the worker's directories was removed"
        );
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "the symlink is left"
        );
        assert!(outside.path().is_dir(), "the symlink was followed");
        let lock = std::fs::File::open(&lock_path).unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .expect("the worker still holds the VMM's lease");
    }
}

//! Leases of things only one running app may hold at a time (an address, a uid): an
//! exclusive flock on `<dir>/<thing>.lock`, which the kernel releases however the holder
//! ends, so a crashed app never keeps one.

use std::fmt::Display;
use std::path::Path;

/// A thing held while this value lives.
#[derive(Debug)]
pub struct Lease<T> {
    /// What is held.
    pub value: T,
    lock_file: std::fs::File,
}

impl<T> Lease<T> {
    /// The lock that holds it (a copy held elsewhere keeps it held).
    pub fn lock(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.lock_file)
    }
}

/// Takes the first free thing of `candidates`, with its lock in `dir` (made 0700).
/// `Ok(None)` when every one is held.
pub fn take_first_free<T: Display>(
    dir: &Path,
    candidates: impl IntoIterator<Item = T>,
) -> std::io::Result<Option<Lease<T>>> {
    crate::control::private_dir(dir)?;
    for value in candidates {
        let path = dir.join(format!("{value}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                return Ok(Some(Lease {
                    value,
                    lock_file: file,
                }))
            }
            Err(rustix::io::Errno::WOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// The `count` values from `first`, starting at an offset that differs per process, so
/// that concurrent starts rarely try the same one first.
pub fn spread(first: u32, count: u32) -> impl Iterator<Item = u32> {
    let start = std::process::id() % count.max(1);
    (0..count).map(move |step| first + (start + step) % count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_thing_is_skipped_and_a_released_one_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = take_first_free(dir.path(), [1, 2]).unwrap().unwrap();
        let second = take_first_free(dir.path(), [1, 2]).unwrap().unwrap();
        assert_eq!((first.value, second.value), (1, 2));
        assert!(take_first_free(dir.path(), [1, 2]).unwrap().is_none());
        drop(first);
        assert_eq!(
            take_first_free(dir.path(), [1, 2]).unwrap().unwrap().value,
            1
        );
        let all: Vec<u32> = spread(10, 5).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, [10, 11, 12, 13, 14]);
    }
}

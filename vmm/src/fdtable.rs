//! The app's file-descriptor table: guest fd → host object, with what a restore needs.
//!
//! A guest fd number is the app's; the host fd behind it is the VMM's. Guest fds that were
//! dup'ed share one [`OpenFile`], as Linux shares one open file description, so offsets and
//! status flags (kept by the host fd) are shared too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustix::io::Errno;

/// The default RLIMIT_NOFILE.
pub const DEFAULT_FD_LIMIT: u32 = 1024;

/// What a host fd is, with what is needed to reopen it after a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file or other filesystem object, by its guest path.
    Path {
        /// Absolute guest path when opened.
        path: String,
        /// The open flags the app gave (O_ACCMODE, O_APPEND, ...).
        flags: u32,
    },
    /// A directory, by its guest path (used for `*at` calls and getdents).
    Directory {
        /// Absolute guest path.
        path: String,
    },
    /// One of the VMM's own stdin, stdout or stderr.
    Stdio(u8),
    /// One end of a pipe.
    Pipe {
        /// Whether this is the write end.
        write_end: bool,
    },
    /// A socket.
    Socket {
        /// AF_INET, AF_INET6 or AF_UNIX.
        domain: i32,
        /// SOCK_STREAM or SOCK_DGRAM.
        kind: i32,
    },
    /// An epoll instance.
    Epoll,
    /// An eventfd.
    EventFd {
        /// EFD_SEMAPHORE.
        semaphore: bool,
    },
    /// A timerfd.
    TimerFd {
        /// Its clock.
        clock: i32,
    },
    /// A read-only rtnetlink socket the VMM answers (see `syscalls::netlink`): a host
    /// datagram socket whose peer the VMM writes the answers to.
    Netlink,
    /// One end of a pseudo-terminal (see `syscalls::pty`).
    Pty {
        /// The master (the multiplexer's side) or the slave.
        master: bool,
        /// Its number (the N of /dev/pts/N).
        index: u32,
    },
    /// An anonymous file from memfd_create: a host memfd, whose contents a snapshot keeps.
    Memfd {
        /// The name the app gave (shown as `/memfd:NAME`).
        name: String,
    },
}

/// What changes about an open file after it is created, kept for snapshots and `ps`.
#[derive(Debug, Default, Clone)]
pub struct FileState {
    /// The address a socket is bound to, as the app sees it.
    pub bound: Option<SocketAddr>,
    /// An AF_UNIX socket's name as the app gave it.
    pub unix_name: Option<Vec<u8>>,
    /// The AF_UNIX name a datagram socket connected to (encoded as `unix_name`).
    pub connected_to: Option<Vec<u8>>,
    /// The backlog of a listening socket.
    pub listening: Option<i32>,
    /// Socket options the app set: (level, name, value).
    pub options: Vec<(i32, i32, Vec<u8>)>,
    /// The peers a datagram socket last received from (a few, newest last): the app may
    /// answer them whatever its outbound policy, as a UDP server must.
    pub heard_from: std::collections::VecDeque<SocketAddr>,
    /// An epoll instance's registrations: guest fd -> what it named, events, data. Linux
    /// ties a registration to the open file description, not the number, so the number
    /// alone may name another file later (see `persist::files`).
    pub registrations: BTreeMap<i32, Registration>,
    /// A netlink socket's other end, where the VMM writes its answers.
    pub netlink_answers: Option<Arc<OwnedFd>>,
    /// The process (or -group) F_SETOWN named; no SIGIO or SIGURG is ever sent to it.
    pub owner: i32,
    /// The host inode of the other end, for one end of a socketpair the app made (kept
    /// through fork and snapshots, not passed with SCM_RIGHTS): a snapshot keeps the two
    /// connected if both are the app's.
    pub pair_peer: Option<u64>,
}

/// One epoll registration.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The open file description registered.
    pub target: std::sync::Weak<OpenFile>,
    /// EPOLL* event bits.
    pub events: u32,
    /// The app's data word.
    pub data: u64,
}

/// An open file description.
///
/// Host fds the VMM creates (sockets, pipes, eventfds, timerfds) are always non-blocking
/// on the host, so that no host call can hang the vCPU thread; whether the *app* asked for
/// O_NONBLOCK is kept here, and blocking behaviour is the VMM's (see
/// `syscalls::wait::retry`). Stdio fds are the VMM's own and keep their host mode.
#[derive(Debug)]
pub struct OpenFile {
    /// The host fd.
    pub fd: OwnedFd,
    /// What it is.
    pub kind: FileKind,
    nonblocking: AtomicBool,
    state: Mutex<FileState>,
}

impl OpenFile {
    /// Wraps a host fd; `nonblocking` is the app's O_NONBLOCK.
    pub fn new(fd: OwnedFd, kind: FileKind) -> Arc<Self> {
        Self::with_mode(fd, kind, false)
    }

    /// Wraps a host fd with the app's O_NONBLOCK flag.
    pub fn with_mode(fd: OwnedFd, kind: FileKind, nonblocking: bool) -> Arc<Self> {
        Arc::new(Self {
            fd,
            kind,
            nonblocking: AtomicBool::new(nonblocking),
            state: Mutex::new(FileState::default()),
        })
    }

    /// Whether the app set O_NONBLOCK.
    pub fn nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    /// Sets the app's O_NONBLOCK.
    pub fn set_nonblocking(&self, on: bool) {
        self.nonblocking.store(on, Ordering::Relaxed)
    }

    /// Whether the host fd never blocks (every VMM-created object but stdio and files).
    pub fn host_nonblocking(&self) -> bool {
        matches!(
            self.kind,
            FileKind::Pipe { .. }
                | FileKind::Socket { .. }
                | FileKind::Epoll
                | FileKind::EventFd { .. }
                | FileKind::TimerFd { .. }
                | FileKind::Netlink
                | FileKind::Pty { .. }
        )
    }

    /// The mutable state (sockets' addresses and options, epoll registrations).
    pub fn state(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host fd, borrowed.
    pub fn host(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The guest path of a directory or file, if it has one.
    pub fn path(&self) -> Option<&str> {
        match &self.kind {
            FileKind::Path { path, .. } | FileKind::Directory { path } => Some(path),
            _ => None,
        }
    }
}

/// One slot of the table.
#[derive(Debug, Clone)]
pub struct FdEntry {
    /// The open file description.
    pub file: Arc<OpenFile>,
    /// FD_CLOEXEC.
    pub cloexec: bool,
}

/// The table.
#[derive(Debug)]
pub struct FdTable {
    entries: BTreeMap<i32, FdEntry>,
    limit: u32,
    /// Counts the changes of which file an fd names (see [`FdTable::generation`]).
    generation: u64,
}

impl Default for FdTable {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            limit: DEFAULT_FD_LIMIT,
            generation: 0,
        }
    }
}

impl FdTable {
    /// The entry for `fd`, or EBADF.
    pub fn get(&self, fd: i32) -> Result<&FdEntry, Errno> {
        self.entries.get(&fd).ok_or(Errno::BADF)
    }

    /// The open file for `fd`, or EBADF.
    pub fn file(&self, fd: i32) -> Result<Arc<OpenFile>, Errno> {
        Ok(self.get(fd)?.file.clone())
    }

    /// Mutable entry for `fd`, or EBADF.
    pub fn get_mut(&mut self, fd: i32) -> Result<&mut FdEntry, Errno> {
        self.entries.get_mut(&fd).ok_or(Errno::BADF)
    }

    /// Lowest free fd at or above `min`, or EMFILE.
    fn lowest_free(&self, min: i32) -> Result<i32, Errno> {
        let mut candidate = min.max(0);
        for (&fd, _) in self.entries.range(candidate..) {
            if fd != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate as u32 >= self.limit {
            Err(Errno::MFILE)
        } else {
            Ok(candidate)
        }
    }

    /// Installs `file` at the lowest free fd at or above `min` and returns the fd.
    pub fn insert_from(
        &mut self,
        min: i32,
        file: Arc<OpenFile>,
        cloexec: bool,
    ) -> Result<i32, Errno> {
        let fd = self.lowest_free(min)?;
        self.entries.insert(fd, FdEntry { file, cloexec });
        self.generation += 1;
        Ok(fd)
    }

    /// Installs `file` at the lowest free fd.
    pub fn insert(&mut self, file: Arc<OpenFile>, cloexec: bool) -> Result<i32, Errno> {
        self.insert_from(0, file, cloexec)
    }

    /// Installs `file` at exactly `fd`, closing what was there (dup2's core).
    pub fn insert_at(&mut self, fd: i32, file: Arc<OpenFile>, cloexec: bool) -> Result<(), Errno> {
        if fd < 0 || fd as u32 >= self.limit {
            return Err(Errno::BADF);
        }
        self.entries.insert(fd, FdEntry { file, cloexec });
        self.generation += 1;
        Ok(())
    }

    /// Removes `fd`. The host fd closes when its last guest fd is gone.
    pub fn remove(&mut self, fd: i32) -> Result<FdEntry, Errno> {
        let entry = self.entries.remove(&fd).ok_or(Errno::BADF)?;
        self.generation += 1;
        Ok(entry)
    }

    /// A number that changes whenever an fd is opened, closed or made to name another
    /// file, so that what depends on the table (the doorbell's file windows) can tell
    /// cheaply whether it must look again.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// All entries, in fd order.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &FdEntry)> {
        self.entries.iter().map(|(&fd, e)| (fd, e))
    }

    /// Number of open fds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no fd is open.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The RLIMIT_NOFILE in force.
    pub fn limit(&self) -> u32 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Arc<OpenFile> {
        let (r, _w) = rustix::pipe::pipe().unwrap();
        OpenFile::new(r, FileKind::Pipe { write_end: false })
    }

    #[test]
    fn lowest_free_fd_is_used() {
        let mut table = FdTable::default();
        assert_eq!(table.insert(file(), false).unwrap(), 0);
        assert_eq!(table.insert(file(), false).unwrap(), 1);
        table.remove(0).unwrap();
        assert_eq!(table.insert(file(), false).unwrap(), 0);
        assert_eq!(table.insert_from(10, file(), true).unwrap(), 10);
        assert_eq!(table.insert_from(10, file(), true).unwrap(), 11);
        assert_eq!(table.remove(5).unwrap_err(), Errno::BADF);
    }

    #[test]
    fn every_change_of_what_an_fd_names_moves_the_generation() {
        let mut table = FdTable::default();
        let mut seen = table.generation();
        let mut changed = |table: &FdTable| {
            let moved = table.generation() != seen;
            seen = table.generation();
            moved
        };
        table.insert(file(), false).unwrap();
        assert!(changed(&table));
        table.insert_at(7, file(), false).unwrap();
        assert!(changed(&table));
        table.get_mut(7).unwrap().cloexec = true;
        assert!(!changed(&table));
        table.remove(7).unwrap();
        assert!(changed(&table));
        table.remove(7).unwrap_err();
        assert!(!changed(&table));
    }
}

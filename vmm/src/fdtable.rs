//! The app's file-descriptor table: guest fd → host object, with what a restore needs.
//!
//! A guest fd number is the app's; the host fd behind it is the VMM's. Guest fds that were
//! dup'ed share one [`OpenFile`], as Linux shares one open file description, so offsets and
//! status flags (kept by the host fd) are shared too.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

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
}

/// An open file description.
#[derive(Debug)]
pub struct OpenFile {
    /// The host fd.
    pub fd: OwnedFd,
    /// What it is.
    pub kind: FileKind,
}

impl OpenFile {
    /// Wraps a host fd.
    pub fn new(fd: OwnedFd, kind: FileKind) -> Arc<Self> {
        Arc::new(Self { fd, kind })
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
}

impl Default for FdTable {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            limit: DEFAULT_FD_LIMIT,
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
        Ok(())
    }

    /// Removes `fd`. The host fd closes when its last guest fd is gone.
    pub fn remove(&mut self, fd: i32) -> Result<FdEntry, Errno> {
        self.entries.remove(&fd).ok_or(Errno::BADF)
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
}

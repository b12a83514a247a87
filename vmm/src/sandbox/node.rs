//! What a resolved path can be acted on through: a [`Node`] (the file itself, held as an
//! `O_PATH` fd) or an [`Entry`] (a name in a directory held as an fd). Every host call
//! here takes one of these fds; none hands the host kernel a name it would resolve again
//! past the sandbox:
//!
//! * a [`Node`] is reached through its fd's own `/proc/self/fd/N` magic link, which names
//!   exactly that inode, never a path;
//! * an [`Entry`] names one component in its directory, and every call on it is one that
//!   never follows a final symlink (mkdir, unlink, rename, readlink, bind, `*at` with
//!   `AT_SYMLINK_NOFOLLOW`).

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Mode bits an app may set: the permission bits and the sticky bit. Set-user-ID and
/// set-group-ID bits are stripped, so no file an app makes can run with another identity.
pub const SETTABLE_MODE: u32 = 0o1777;

/// Longest AF_UNIX path (`sun_path` holds 108 bytes with its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// A file the app named, resolved inside its sandbox.
#[derive(Debug)]
pub struct Node {
    fd: OwnedFd,
    kind: FileType,
    writable: bool,
}

impl Node {
    /// The node an fd the app holds refers to; `writable` is whether its mount is.
    pub fn from_fd(fd: OwnedFd, writable: bool) -> Result<Self, Errno> {
        Self::new(fd, writable)
    }

    pub(super) fn new(fd: OwnedFd, writable: bool) -> Result<Self, Errno> {
        let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        Ok(Self { fd, kind, writable })
    }

    /// The `O_PATH` fd of the file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Takes the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// What kind of file it is.
    pub fn kind(&self) -> FileType {
        self.kind
    }

    /// Whether it lives in a writable mount.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The magic link that names exactly this inode.
    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// Fails unless the app may change this file's metadata: it must be in a writable
    /// mount, and no device (a device node is the host's, whatever mount shows it).
    fn require_changeable(&self) -> Result<(), Errno> {
        if matches!(self.kind, FileType::CharacterDevice | FileType::BlockDevice) {
            return Err(Errno::PERM);
        }
        if !self.writable {
            return Err(Errno::ROFS);
        }
        Ok(())
    }

    /// chmod(2) on this file, with set-id bits stripped. Linux cannot change a symlink's
    /// mode: EOPNOTSUPP.
    pub fn chmod(&self, mode: u32) -> Result<(), Errno> {
        self.require_changeable()?;
        if self.kind == FileType::Symlink {
            return Err(Errno::OPNOTSUPP);
        }
        rustix::fs::chmod(
            self.proc_path().as_str(),
            Mode::from_bits_truncate(mode & SETTABLE_MODE),
        )
    }

    /// utimensat(2) on this file (a symlink's own times when the node is the link), on
    /// the fd itself.
    pub fn set_times(&self, times: &Timestamps) -> Result<(), Errno> {
        self.require_changeable()?;
        rustix::fs::utimensat(&self.fd, "", times, AtFlags::EMPTY_PATH)
    }

    /// chown(2) on this file (`None` is -1, "unchanged"). The app is uid 0 in its own
    /// view and owns everything in its writable mounts, so a change there is accepted
    /// and has no effect on the host (the file stays the VMM's); a change in a read-only
    /// mount is EROFS, and a device is the host's (EPERM).
    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> Result<(), Errno> {
        if uid.is_none() && gid.is_none() {
            return Ok(());
        }
        self.require_changeable()
    }

    /// The AF_UNIX address that reaches the socket this node is: its magic link, so the
    /// host kernel connects to exactly this inode.
    pub fn unix_address(&self) -> Result<Vec<u8>, Errno> {
        if self.kind != FileType::Socket {
            return Err(Errno::CONNREFUSED);
        }
        Ok(self.proc_path().into_bytes())
    }
}

/// A name in a directory of the sandbox, for calls that act on the name itself.
#[derive(Debug)]
pub struct Entry {
    dir: OwnedFd,
    /// The name as the host's bytes (see [`super::pathbytes`]).
    name: Vec<u8>,
    writable: bool,
    /// The guest path of its mount: links never cross mounts (EXDEV, as on Linux).
    mount: String,
}

impl Entry {
    pub(super) fn new(dir: OwnedFd, name: &str, writable: bool, mount: &str) -> Self {
        Self {
            dir,
            name: super::pathbytes::to_host(name).into_owned(),
            writable,
            mount: mount.to_string(),
        }
    }

    /// link(2): a new name `to` for the file this entry names (the entry itself, a symlink
    /// included: link does not follow). Both must be in the same writable mount, so an
    /// app can never give a file of its read-only root (shared with other apps) a name it
    /// may write through.
    pub fn link_to(&self, to: &Entry) -> Result<(), Errno> {
        self.require_writable()?;
        to.require_writable()?;
        if self.mount != to.mount {
            return Err(Errno::XDEV);
        }
        rustix::fs::linkat(
            &self.dir,
            self.name.as_slice(),
            &to.dir,
            to.name.as_slice(),
            AtFlags::empty(),
        )
    }

    /// link(2) with AT_SYMLINK_FOLLOW: a new name `to` for `real`, the file this entry's
    /// final symlink leads to (resolved inside the same mount), by its magic link.
    pub fn link_followed_to(&self, real: &Node, to: &Entry) -> Result<(), Errno> {
        self.require_writable()?;
        to.require_writable()?;
        if self.mount != to.mount || !real.writable {
            return Err(Errno::XDEV);
        }
        rustix::fs::linkat(
            rustix::fs::CWD,
            real.proc_path().as_str(),
            &to.dir,
            to.name.as_slice(),
            AtFlags::SYMLINK_FOLLOW,
        )
    }

    /// symlink(2): makes this entry a symlink to `target`. The target is only text here;
    /// every later resolution of it stays inside the mount.
    pub fn symlink(&self, target: &[u8]) -> Result<(), Errno> {
        self.require_writable()?;
        rustix::fs::symlinkat(target, &self.dir, self.name.as_slice())
    }

    /// The directory's fd.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Takes the directory's fd.
    pub fn into_dir(self) -> OwnedFd {
        self.dir
    }

    /// Fails with EROFS unless the entry is in a writable mount.
    pub fn require_writable(&self) -> Result<(), Errno> {
        if self.writable {
            Ok(())
        } else {
            Err(Errno::ROFS)
        }
    }

    /// mkdir(2), with set-id bits stripped from `mode`, which the new directory gets
    /// exactly (the VMM's own umask does not narrow the app's: the app's was applied).
    pub fn mkdir(&self, mode: u32) -> Result<(), Errno> {
        self.require_writable()?;
        let mode = Mode::from_bits_truncate(mode & SETTABLE_MODE);
        rustix::fs::mkdirat(&self.dir, self.name.as_slice(), mode)?;
        // The directory just made, never a symlink put in its place since: the chmod goes
        // through its own fd's magic link.
        if let Ok(made) = rustix::fs::openat(
            &self.dir,
            self.name.as_slice(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            let _ = rustix::fs::chmod(format!("/proc/self/fd/{}", made.as_raw_fd()), mode);
        }
        Ok(())
    }

    /// unlink(2), or rmdir(2) with `AtFlags::REMOVEDIR`.
    pub fn unlink(&self, flags: AtFlags) -> Result<(), Errno> {
        self.require_writable()?;
        rustix::fs::unlinkat(&self.dir, self.name.as_slice(), flags & AtFlags::REMOVEDIR)
    }

    /// rename(2) of this entry to `to`.
    pub fn rename_to(&self, to: &Entry) -> Result<(), Errno> {
        self.require_writable()?;
        to.require_writable()?;
        rustix::fs::renameat(&self.dir, self.name.as_slice(), &to.dir, to.name.as_slice())
    }

    /// readlink(2): the link's target, as bytes.
    pub fn readlink(&self) -> Result<Vec<u8>, Errno> {
        Ok(rustix::fs::readlinkat(&self.dir, self.name.as_slice(), Vec::new())?.into_bytes())
    }

    /// utimensat(2) with AT_SYMLINK_NOFOLLOW: the entry's own times.
    pub fn set_times_nofollow(&self, times: &Timestamps) -> Result<(), Errno> {
        self.require_writable()?;
        rustix::fs::utimensat(
            &self.dir,
            self.name.as_slice(),
            times,
            AtFlags::SYMLINK_NOFOLLOW,
        )
    }

    /// The AF_UNIX address that binds a new socket file at this entry: the directory's
    /// magic link plus the name. bind(2) creates the name and never follows it (an
    /// existing name, symlink or not, gives EADDRINUSE). The directory fd must stay open
    /// until the bind is done.
    pub fn unix_bind_address(&self) -> Result<Vec<u8>, Errno> {
        self.require_writable()?;
        let mut address = format!("/proc/self/fd/{}/", self.dir.as_raw_fd()).into_bytes();
        address.extend_from_slice(&self.name);
        if address.len() > SUN_PATH_MAX {
            return Err(Errno::NAMETOOLONG);
        }
        Ok(address)
    }
}

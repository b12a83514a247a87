//! Pseudo-terminals: `/dev/ptmx` opens a host pty master the VMM owns, and its slave is
//! reached through the master (`ioctl(TIOCGPTPEER)`, as glibc's `openpty` does, or
//! `/dev/pts/N` for a master the app holds), never through the host's /dev/pts by name,
//! so an app reaches its own ptys and nobody else's. In the jail the VMM's ptys come from
//! a devpts instance of its own. Reads and writes are the host's (non-blocking there, the
//! VMM waits); the terminal ioctls are passed through with their arguments copied. A pty
//! cannot be kept by a snapshot: an app holding one is not snapshotted (see
//! `persist::files`).

use super::{Args, SysResult};
use crate::fdtable::{FileKind, OpenFile};
use crate::kernel::process::Process;
use rustix::io::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const TCGETS: u32 = 0x5401;
const TCSETS: u32 = 0x5402;
const TCSETSW: u32 = 0x5403;
const TCSETSF: u32 = 0x5404;
const TCSBRK: u32 = 0x5409;
const TCXONC: u32 = 0x540a;
const TCFLSH: u32 = 0x540b;
const TIOCSCTTY: u32 = 0x540e;
const TIOCGPGRP: u32 = 0x540f;
const TIOCSPGRP: u32 = 0x5410;
const TIOCOUTQ: u32 = 0x5411;
const TIOCGWINSZ: u32 = 0x5413;
const TIOCSWINSZ: u32 = 0x5414;
const TIOCNOTTY: u32 = 0x5422;
const TIOCGSID: u32 = 0x5429;
const TIOCGPTN: u32 = 0x8004_5430;
const TIOCSPTLCK: u32 = 0x4004_5431;
const TIOCGPTPEER: u32 = 0x5441;
/// The kernel's `struct termios` on x86-64: four flag words, c_line, 19 control chars.
const TERMIOS_SIZE: usize = 36;
/// `struct winsize`.
const WINSIZE_SIZE: usize = 8;

/// Where the VMM's pty masters come from: its own devpts instance in the jail, else the
/// host's multiplexer.
const MULTIPLEXERS: [&str; 2] = ["/dev/pts/ptmx", "/dev/ptmx"];

/// The errno of the raw ioctl that just failed.
fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

/// open("/dev/ptmx"): a new pty master.
pub fn open_master(p: &mut Process, flags: u32) -> SysResult {
    use rustix::fs::{Mode, OFlags};
    let host_flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = MULTIPLEXERS
        .iter()
        .find_map(|path| rustix::fs::open(*path, host_flags, Mode::empty()).ok())
        .ok_or(Errno::NODEV)?;
    let index = number(&fd)?;
    let file = OpenFile::with_mode(
        fd,
        FileKind::Pty {
            master: true,
            index,
        },
        flags & libc::O_NONBLOCK as u32 != 0,
    );
    Ok(p.files.insert(file, flags & libc::O_CLOEXEC as u32 != 0)? as u64)
}

/// The pty number of a master (TIOCGPTN).
fn number(master: &OwnedFd) -> Result<u32, Errno> {
    let mut index: u32 = 0;
    // SAFETY: TIOCGPTN writes one u32 through the pointer, which is valid for it.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), TIOCGPTN as _, &mut index) };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(index)
}

/// The slave of `master` (TIOCGPTPEER), as a new host fd.
fn peer(master: &OpenFile) -> Result<OwnedFd, Errno> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: TIOCGPTPEER takes its open flags by value and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(master.fd.as_raw_fd(), TIOCGPTPEER as _, flags) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: the kernel just returned this fd, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn insert_slave(p: &mut Process, master: &OpenFile, index: u32, flags: u32) -> SysResult {
    let fd = peer(master)?;
    let file = OpenFile::with_mode(
        fd,
        FileKind::Pty {
            master: false,
            index,
        },
        flags & libc::O_NONBLOCK as u32 != 0,
    );
    Ok(p.files.insert(file, flags & libc::O_CLOEXEC as u32 != 0)? as u64)
}

/// open("/dev/pts/N"): the slave of a master the app holds (ENOENT for any other).
pub fn open_slave(p: &mut Process, name: &str, flags: u32) -> SysResult {
    let index: u32 = name.parse().map_err(|_| Errno::NOENT)?;
    let master = p
        .files
        .iter()
        .map(|(_, entry)| entry.file.clone())
        .find(|f| matches!(f.kind, FileKind::Pty { master: true, index: i } if i == index))
        .ok_or(Errno::NOENT)?;
    insert_slave(p, &master, index, flags)
}

/// Calls ioctl `request` on `file`'s host fd with a buffer of `size` bytes copied from
/// (`copy_in`) and back to (`copy_out`) the app's argument.
fn with_buffer(
    p: &mut Process,
    file: &OpenFile,
    a: &Args,
    size: usize,
    copy_in: bool,
    copy_out: bool,
) -> SysResult {
    let mut buffer = vec![0u8; size];
    if copy_in {
        p.mem.read(a.ptr(2), &mut buffer)?;
    }
    // SAFETY: every request given here reads or writes at most `size` bytes through the
    // pointer, and the buffer holds that many.
    let rc = unsafe { libc::ioctl(file.fd.as_raw_fd(), a.u32(1) as _, buffer.as_mut_ptr()) };
    if rc < 0 {
        return Err(last_errno().into());
    }
    if copy_out {
        p.mem.write(a.ptr(2), &buffer)?;
    }
    Ok(rc as u64)
}

/// The terminal ioctls on a pty end.
pub fn ioctl(p: &mut Process, file: &OpenFile, a: &Args) -> SysResult {
    let FileKind::Pty { master, index } = file.kind else {
        return Err(Errno::NOTTY.into());
    };
    match a.u32(1) {
        TCGETS => with_buffer(p, file, a, TERMIOS_SIZE, false, true),
        TCSETS | TCSETSW | TCSETSF => with_buffer(p, file, a, TERMIOS_SIZE, true, false),
        TIOCGWINSZ => with_buffer(p, file, a, WINSIZE_SIZE, false, true),
        TIOCSWINSZ => with_buffer(p, file, a, WINSIZE_SIZE, true, false),
        TIOCOUTQ => with_buffer(p, file, a, 4, false, true),
        TIOCSPTLCK if master => with_buffer(p, file, a, 4, true, false),
        TIOCGPTN if master => {
            p.mem.write_pod(a.ptr(2), &index)?;
            Ok(0)
        }
        TIOCGPTPEER if master => insert_slave(p, file, index, a.u32(2)),
        TCSBRK | TCXONC | TCFLSH => {
            // SAFETY: these take an int by value and touch no memory of ours.
            let rc = unsafe { libc::ioctl(file.fd.as_raw_fd(), a.u32(1) as _, a.u64(2)) };
            if rc < 0 {
                return Err(last_errno().into());
            }
            Ok(0)
        }
        // The app is its own session and process group; a controlling terminal is its
        // view only (the VMM never takes one on the host).
        TIOCSCTTY | TIOCNOTTY | TIOCSPGRP => Ok(0),
        TIOCGPGRP | TIOCGSID => {
            p.mem.write_pod(a.ptr(2), &p.group().0)?;
            Ok(0)
        }
        _ => Err(Errno::NOTTY.into()),
    }
}

//! SCM_RIGHTS: fds passed over AF_UNIX sockets, as nginx's master passes its workers'
//! channels. A guest fd's host fd travels as a host SCM_RIGHTS message; a received host
//! fd becomes a guest fd if it is a socket or a pipe (what the VMM can wrap without a
//! guest path), and is closed otherwise (MSG_CTRUNC), so nothing received can name a host
//! directory or file outside the app's sandbox. A socket on the app's private localhost
//! is not passed (EINVAL): its peer filter is VMM state the receiver would not have.

use crate::fdtable::{FileKind, OpenFile};
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use rustix::io::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

/// Most fds one message may pass (Linux's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;
/// Bytes of a `struct cmsghdr`.
const HEADER: usize = 16;
/// Host control space for one message of [`MAX_FDS`] fds.
pub const CONTROL_SPACE: usize = HEADER + MAX_FDS * 4 + 4;
/// Most control bytes an app may send.
const MAX_CONTROL: u64 = 4096;

fn align(len: usize) -> usize {
    len.next_multiple_of(8)
}

/// One SCM_RIGHTS control message carrying `fds`, laid out as Linux does.
pub fn message(fds: &[i32]) -> Vec<u8> {
    let len = HEADER + fds.len() * 4;
    let mut out = vec![0u8; align(len)];
    out[0..8].copy_from_slice(&(len as u64).to_ne_bytes());
    out[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
    out[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
    for (slot, fd) in out[HEADER..len].chunks_exact_mut(4).zip(fds) {
        slot.copy_from_slice(&fd.to_ne_bytes());
    }
    out
}

/// The open files an app's control data (`len` bytes at `at`) passes. Only SCM_RIGHTS is
/// supported (EINVAL otherwise), of sockets and pipes.
pub fn passed(p: &mut Process, at: UserAddr, len: u64) -> Result<Vec<Arc<OpenFile>>, Errno> {
    if len > MAX_CONTROL {
        return Err(Errno::NOBUFS);
    }
    let mut bytes = vec![0u8; len as usize];
    p.mem.read(at, &mut bytes)?;
    let mut files = Vec::new();
    let mut offset = 0;
    while offset + HEADER <= bytes.len() {
        let word = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        let int = |i: usize| i32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let cmsg_len = usize::try_from(word(offset)).map_err(|_| Errno::INVAL)?;
        let end = offset.checked_add(cmsg_len).ok_or(Errno::INVAL)?;
        if cmsg_len < HEADER || end > bytes.len() {
            return Err(Errno::INVAL);
        }
        if int(offset + 8) != libc::SOL_SOCKET || int(offset + 12) != libc::SCM_RIGHTS {
            return Err(Errno::INVAL);
        }
        for chunk in bytes[offset + HEADER..end].chunks_exact(4) {
            let fd = i32::from_ne_bytes(chunk.try_into().unwrap_or_default());
            let file = p.files.file(fd)?;
            if !matches!(file.kind, FileKind::Socket { .. } | FileKind::Pipe { .. }) {
                return Err(Errno::INVAL);
            }
            // A socket on the app's localhost filters its peers by what the VMM knows of
            // it (its bound address), which a receiving process would not have.
            if super::net::local_only(&file) {
                return Err(Errno::INVAL);
            }
            files.push(file);
        }
        if files.len() > MAX_FDS {
            return Err(Errno::INVAL);
        }
        offset = align(end);
    }
    Ok(files)
}

/// Takes the fds of the SCM_RIGHTS messages in host control data `control`.
pub fn take(control: &[u8]) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    let mut offset = 0;
    while offset + HEADER <= control.len() {
        let word = u64::from_ne_bytes(control[offset..offset + 8].try_into().unwrap_or_default());
        let int = |i: usize| i32::from_ne_bytes(control[i..i + 4].try_into().unwrap_or_default());
        let Some(end) = usize::try_from(word)
            .ok()
            .and_then(|l| offset.checked_add(l))
        else {
            break;
        };
        if end < offset + HEADER || end > control.len() {
            break;
        }
        if int(offset + 8) == libc::SOL_SOCKET && int(offset + 12) == libc::SCM_RIGHTS {
            for chunk in control[offset + HEADER..end].chunks_exact(4) {
                let raw = i32::from_ne_bytes(chunk.try_into().unwrap_or_default());
                // SAFETY: the kernel installed this fd in this process for this message;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        offset = align(end);
    }
    fds
}

/// What a received host fd is to the app, if the VMM can hand it over.
fn kind_of(fd: &OwnedFd) -> Option<FileKind> {
    let stat = rustix::fs::fstat(fd).ok()?;
    match rustix::fs::FileType::from_raw_mode(stat.st_mode) {
        rustix::fs::FileType::Socket => {
            let domain = rustix::net::sockopt::socket_domain(fd).ok()?.as_raw() as i32;
            let kind = rustix::net::sockopt::socket_type(fd).ok()?.as_raw() as i32;
            [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
                .contains(&domain)
                .then_some(FileKind::Socket { domain, kind })
        }
        rustix::fs::FileType::Fifo => {
            let access = rustix::fs::fcntl_getfl(fd).ok()? & rustix::fs::OFlags::RWMODE;
            Some(FileKind::Pipe {
                write_end: access == rustix::fs::OFlags::WRONLY,
            })
        }
        _ => None,
    }
}

/// Installs the received `fds` in the app's table (as many as `capacity` control bytes
/// can name) and returns the guest control message, and whether any fd was dropped.
pub fn install(
    p: &mut Process,
    fds: Vec<OwnedFd>,
    capacity: usize,
    cloexec: bool,
) -> (Vec<u8>, bool) {
    let room = capacity.saturating_sub(HEADER) / 4;
    let mut guest = Vec::new();
    let mut dropped = false;
    for fd in fds {
        if guest.len() == room {
            dropped = true;
            continue;
        }
        let Some(kind) = kind_of(&fd) else {
            tracing::debug!(
                fd = fd.as_raw_fd(),
                "a received fd that is not a socket or pipe is closed"
            );
            dropped = true;
            continue;
        };
        // The VMM never blocks on a socket or pipe itself (it polls): one that came from
        // outside the app may not be non-blocking yet.
        let nonblocking = rustix::fs::fcntl_getfl(&fd)
            .and_then(|flags| rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK));
        if nonblocking.is_err() {
            dropped = true;
            continue;
        }
        match p.files.insert(OpenFile::new(fd, kind), cloexec) {
            Ok(number) => guest.push(number),
            Err(_) => dropped = true,
        }
    }
    if guest.is_empty() {
        return (Vec::new(), dropped);
    }
    let mut control = message(&guest);
    // The last message's padding is not the app's to receive if it has no room for it.
    control.truncate(capacity.min(control.len()));
    (control, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_damage_is_ignored() {
        let (a, b) = rustix::pipe::pipe().unwrap();
        let raw = [a.as_raw_fd(), b.as_raw_fd()];
        let control = message(&raw);
        assert_eq!(control.len(), 24);
        std::mem::forget((a, b));
        let taken = take(&control);
        assert_eq!(taken.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>(), raw);
        // A length past the end, or shorter than a header, ends the parse.
        let mut bad = message(&[]);
        bad[0..8].copy_from_slice(&1000u64.to_ne_bytes());
        assert!(take(&bad).is_empty());
        bad[0..8].copy_from_slice(&3u64.to_ne_bytes());
        assert!(take(&bad).is_empty());
    }
}

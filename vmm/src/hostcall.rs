//! The few host socket calls that take socket addresses and options as raw bytes, which
//! rustix only offers typed. The VMM validates and rewrites every address before it gets
//! here (see `syscalls::net`), so these wrappers only move bytes; each `unsafe` block
//! passes a pointer and a length taken from the same live slice.

use rustix::io::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Largest socket address (sockaddr_storage).
pub const SOCKADDR_MAX: usize = 128;

fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

fn check(rc: i32) -> Result<(), Errno> {
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// bind(2) with a raw address, by this process itself (for the app's binds, which a
/// jailed VMM's supervisor may make instead, see `crate::sandbox::binder::bind`).
pub fn bind(fd: BorrowedFd<'_>, addr: &[u8]) -> Result<(), Errno> {
    // SAFETY: `addr` is a live slice and its length is passed with it.
    check(unsafe { libc::bind(fd.as_raw_fd(), addr.as_ptr().cast(), addr.len() as u32) })
}

/// connect(2) with a raw address.
pub fn connect(fd: BorrowedFd<'_>, addr: &[u8]) -> Result<(), Errno> {
    // SAFETY: `addr` is a live slice and its length is passed with it.
    check(unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr().cast(), addr.len() as u32) })
}

type NameCall = unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut u32) -> i32;

fn name_of(fd: BorrowedFd<'_>, call: NameCall) -> Result<Vec<u8>, Errno> {
    let mut buf = [0u8; SOCKADDR_MAX];
    let mut len = SOCKADDR_MAX as u32;
    // SAFETY: `buf` has room for `len` bytes, and the kernel writes back at most that.
    check(unsafe { call(fd.as_raw_fd(), buf.as_mut_ptr().cast(), &mut len) })?;
    Ok(buf[..(len as usize).min(SOCKADDR_MAX)].to_vec())
}

/// getsockname(2).
pub fn getsockname(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    name_of(fd, libc::getsockname)
}

/// getpeername(2).
pub fn getpeername(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    name_of(fd, libc::getpeername)
}

/// accept4(2): the new socket and the peer's address.
pub fn accept4(fd: BorrowedFd<'_>, flags: i32) -> Result<(OwnedFd, Vec<u8>), Errno> {
    let mut buf = [0u8; SOCKADDR_MAX];
    let mut len = SOCKADDR_MAX as u32;
    // SAFETY: `buf` has room for `len` bytes, and the kernel writes back at most that.
    let rc = unsafe { libc::accept4(fd.as_raw_fd(), buf.as_mut_ptr().cast(), &mut len, flags) };
    if rc < 0 {
        return Err(last_errno());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(rc) };
    Ok((owned, buf[..(len as usize).min(SOCKADDR_MAX)].to_vec()))
}

/// setsockopt(2) with a raw value.
pub fn setsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: `value` is a live slice and its length is passed with it.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as u32,
        )
    })
}

/// getsockopt(2) with a raw value of at most `len` bytes.
pub fn getsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, len: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; len];
    let mut out_len = len as u32;
    // SAFETY: `buf` has room for `out_len` bytes, and the kernel writes back at most that.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut out_len,
        )
    })?;
    buf.truncate(out_len as usize);
    Ok(buf)
}

/// NETLINK_SOCK_DIAG's request for one unix socket (linux/unix_diag.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct UnixDiagRequest {
    header: libc::nlmsghdr,
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    inode: u32,
    show: u32,
    cookie: [u32; 2],
}

/// SOCK_DIAG_BY_FAMILY.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// UDIAG_SHOW_PEER: the answer names the peer's inode.
const UDIAG_SHOW_PEER: u32 = 0x4;
/// UNIX_DIAG_PEER: the attribute with the peer's inode.
const UNIX_DIAG_PEER: u16 = 2;
/// The size of `struct unix_diag_msg`, before the attributes.
const UNIX_DIAG_MSG: usize = 16;

/// The inode of the other end of connected unix socket `inode`, as the kernel's socket
/// diagnostics say (sock_diag(7)); `None` if it has none, or the kernel does not say.
pub fn unix_peer(inode: u64) -> Option<u64> {
    let inode = u32::try_from(inode).ok()?;
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    let diag = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = UnixDiagRequest {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<UnixDiagRequest>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: u32::MAX,
        inode,
        show: UDIAG_SHOW_PEER,
        // INET_DIAG_NOCOOKIE: any socket with that inode.
        cookie: [u32::MAX; 2],
    };
    // SAFETY: `request` is a plain repr(C) value with no padding the kernel reads
    // uninitialised (every field is set), viewed as its own bytes for the call.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&request as *const UnixDiagRequest).cast::<u8>(),
            std::mem::size_of::<UnixDiagRequest>(),
        )
    };
    rustix::io::write(&diag, bytes).ok()?;
    let mut answer = [0u8; 1024];
    let n = rustix::io::read(&diag, &mut answer).ok()?;
    let answer = &answer[..n];
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let length = u32::from_ne_bytes(answer.get(0..4)?.try_into().ok()?) as usize;
    let message = answer.get(header_len..length.min(answer.len()))?;
    let mut attributes = message.get(UNIX_DIAG_MSG..)?;
    // rtattrs: a length (header included) and a type, then the value, 4-byte aligned.
    while attributes.len() >= 4 {
        let len = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == UNIX_DIAG_PEER && len >= 8 {
            let peer = u32::from_ne_bytes(attributes[4..8].try_into().ok()?);
            return (peer != 0).then_some(peer as u64);
        }
        attributes = attributes
            .get(len.next_multiple_of(4)..)
            .unwrap_or_default();
    }
    None
}

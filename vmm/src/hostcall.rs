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

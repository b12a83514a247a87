//! Host I/O straight into and out of app memory, and plain-data copies of Linux ABI structs.
//!
//! `read(2)` into an app buffer becomes one host `readv` over the guest pages behind it: no
//! bounce buffer. All of it goes through [`AddressSpace`]'s checked translation first.

use super::space::Access;
use super::{AddressSpace, UserAddr};
use rustix::io::Errno;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Largest number of host iovecs one call passes (the kernel's IOV_MAX); a longer request
/// is simply a short read or write, which callers already handle.
const IOV_MAX: usize = 1024;

/// One vectored host call between `fd` and the app memory `iovecs` point into: a read into
/// it (`access` = `Write`) or a write from it (`Read`), at `offset` or the fd's own.
///
/// # Safety
///
/// Every iovec must cover guest memory that stays mapped for the call, checked to be app
/// memory with the permission the transfer needs, with no Rust reference into it live.
unsafe fn transfer(
    fd: BorrowedFd<'_>,
    iovecs: &[libc::iovec],
    offset: Option<u64>,
    access: Access,
) -> Result<usize, Errno> {
    if iovecs.is_empty() {
        return Ok(0);
    }
    let (fd, iov, count) = (fd.as_raw_fd(), iovecs.as_ptr(), iovecs.len() as i32);
    // SAFETY: the caller vouches for the memory; `iovecs` holds at most IOV_MAX entries.
    let rc = unsafe {
        match (access, offset) {
            (Access::Write, Some(off)) => libc::preadv(fd, iov, count, off as i64),
            (Access::Write, None) => libc::readv(fd, iov, count),
            (_, Some(off)) => libc::pwritev(fd, iov, count, off as i64),
            (_, None) => libc::writev(fd, iov, count),
        }
    };
    result_of(rc)
}

/// A transfer between a host fd and app memory, prepared with the process lock held
/// ([`AddressSpace::prepare_transfer`]) and made without it, so that other threads' calls
/// go on meanwhile, as on Linux (a large read of a file need not hold up the app).
#[derive(Debug)]
pub struct HostTransfer {
    iovecs: Vec<libc::iovec>,
    offset: Option<u64>,
    access: Access,
    /// Its hold on the frames of the buffer (see [`AddressSpace::finish_transfer`]).
    hold: u64,
    /// The guest memory the iovecs point into stays mapped while this lives.
    _mapping: super::phys::KeptMapping,
}

impl HostTransfer {
    /// Makes the transfer with host `fd`; returns the bytes moved.
    pub fn perform(&self, fd: BorrowedFd<'_>) -> Result<usize, Errno> {
        // SAFETY: the iovecs were checked when prepared, and the memory stays mapped while
        // `_mapping` lives. Another thread may unmap the app's buffer meanwhile: its frames
        // are held back until `finish_transfer` (never given to another mapping), so the
        // transfer only ever touches frames that were the buffer's. No Rust reference into
        // guest memory exists: the VMM touches it only through raw copies.
        unsafe { transfer(fd, &self.iovecs, self.offset, self.access) }
    }
}

/// Plain old data: a type made only of integers, with no padding, so that any byte pattern
/// is a valid value and its bytes can be copied to and from app memory.
///
/// # Safety
///
/// Implement only for `#[repr(C)]` types whose every field is an integer or an array of
/// integers, with no implicit padding.
pub unsafe trait Pod: Copy + 'static {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        // SAFETY: each of these is a primitive integer, or a libc struct that mirrors the
        // x86-64 Linux ABI with explicit padding fields: no implicit padding, every byte
        // pattern valid.
        $(unsafe impl Pod for $t {})*
    };
}
pod!(
    u8,
    u16,
    i16,
    u32,
    u64,
    i32,
    i64,
    libc::stat,
    libc::statx,
    libc::timespec,
    libc::timeval,
    libc::utsname,
    libc::rlimit,
    libc::pollfd,
    libc::iovec,
    libc::winsize,
    rustix::fs::Stat,
    rustix::fs::Statx,
);

// SAFETY: an array of plain data is plain data.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}

pub(crate) fn as_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all `size_of::<T>()` bytes are initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast(), std::mem::size_of::<T>()) }
}

/// The result of a host call that returns a count or -1 with errno.
fn result_of(rc: isize) -> Result<usize, Errno> {
    if rc < 0 {
        Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO))
    } else {
        Ok(rc as usize)
    }
}

impl AddressSpace {
    /// Reads a `T` from app memory.
    pub fn read_pod<T: Pod>(&mut self, addr: UserAddr) -> Result<T, Errno> {
        let mut bytes = vec![0u8; std::mem::size_of::<T>()];
        self.read(addr, &mut bytes)?;
        // SAFETY: `bytes` holds exactly size_of::<T>() bytes and any bytes are a valid `T`
        // (`Pod`); read_unaligned copes with the Vec's alignment.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// Writes a `T` to app memory, which must be writable by the app.
    pub fn write_pod<T: Pod>(&mut self, addr: UserAddr, value: &T) -> Result<(), Errno> {
        self.write(addr, as_bytes(value))
    }

    /// Reads `count` values of `T` from an array in app memory.
    pub fn read_pod_array<T: Pod>(
        &mut self,
        addr: UserAddr,
        count: usize,
    ) -> Result<Vec<T>, Errno> {
        let size = std::mem::size_of::<T>();
        let total = size.checked_mul(count).ok_or(Errno::FAULT)?;
        let mut bytes = vec![0u8; total];
        self.read(addr, &mut bytes)?;
        Ok(bytes
            .chunks_exact(size)
            // SAFETY: each chunk holds exactly size_of::<T>() bytes; `T: Pod`.
            .map(|chunk| unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<T>()) })
            .collect())
    }

    /// The guest-physical pieces `(gpa, len)` behind the app buffers `bufs`, checked for
    /// `access`.
    fn host_pieces(
        &mut self,
        bufs: &[(UserAddr, usize)],
        access: Access,
    ) -> Result<Vec<(u64, usize)>, Errno> {
        let mut iovecs = Vec::new();
        for &(addr, len) in bufs {
            if len == 0 {
                continue;
            }
            // As Linux: a buffer that runs past user space is refused whole (access_ok);
            // one with a bad page in it is used up to that page (the transfer is short),
            // and refused only if nothing comes before it.
            let end = addr
                .0
                .checked_add(len as u64)
                .filter(|&end| end <= super::space::USER_END)
                .ok_or(Errno::FAULT)?;
            match self.user_pieces(addr, len, access) {
                Ok(pieces) => iovecs.extend(pieces),
                Err(Errno::FAULT) => {
                    let mut at = addr.0;
                    while at < end {
                        let piece = (at | 0xfff).saturating_add(1).min(end) - at;
                        match self.user_pieces(UserAddr(at), piece as usize, access) {
                            Ok(pieces) => iovecs.extend(pieces),
                            Err(_) => break,
                        }
                        at += piece;
                    }
                    if iovecs.is_empty() {
                        return Err(Errno::FAULT);
                    }
                    iovecs.truncate(IOV_MAX);
                    return Ok(iovecs);
                }
                Err(e) => return Err(e),
            }
            if iovecs.len() >= IOV_MAX {
                iovecs.truncate(IOV_MAX);
                break;
            }
        }
        Ok(iovecs)
    }

    /// The host iovecs of app buffers `bufs`, as [`AddressSpace::host_pieces`] finds them.
    fn host_iovecs(
        &mut self,
        bufs: &[(UserAddr, usize)],
        access: Access,
    ) -> Result<Vec<libc::iovec>, Errno> {
        let pieces = self.host_pieces(bufs, access)?;
        self.host_iovecs_of(&pieces)
    }

    /// Reads from host `fd` into the app buffers `bufs` (read, readv, pread64, preadv).
    pub fn read_from_host(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[(UserAddr, usize)],
        offset: Option<u64>,
    ) -> Result<usize, Errno> {
        self.host_io(fd, bufs, offset, Access::Write)
    }

    /// Writes the app buffers `bufs` to host `fd` (write, writev, pwrite64, pwritev).
    pub fn write_to_host(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[(UserAddr, usize)],
        offset: Option<u64>,
    ) -> Result<usize, Errno> {
        self.host_io(fd, bufs, offset, Access::Read)
    }

    /// One vectored host call between `fd` and app memory. `access` is what the app's
    /// memory undergoes: `Write` for a host read into it, `Read` for a host write from it.
    fn host_io(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[(UserAddr, usize)],
        offset: Option<u64>,
        access: Access,
    ) -> Result<usize, Errno> {
        let iovecs = self.host_iovecs(bufs, access)?;
        // SAFETY: `host_iovecs` checked every iovec to cover app memory mapped with the
        // permission the transfer needs (writable when the host fills it); the vCPU is
        // stopped while the VMM handles the call, the process lock is held, and no Rust
        // reference into guest memory is live.
        unsafe { transfer(fd, &iovecs, offset, access) }
    }

    /// Prepares the same transfer as [`AddressSpace::read_from_host`] (`access` =
    /// `Write`) or [`AddressSpace::write_to_host`] (`Read`), to be made without the
    /// process lock: the frames of its buffer that are freed before
    /// [`AddressSpace::finish_transfer`] are held back, so that it never reaches a frame
    /// another mapping got meanwhile. A transfer dropped unfinished keeps them held.
    pub fn prepare_transfer(
        &mut self,
        bufs: &[(UserAddr, usize)],
        offset: Option<u64>,
        access: Access,
    ) -> Result<HostTransfer, Errno> {
        let pieces = self.host_pieces(bufs, access)?;
        Ok(HostTransfer {
            iovecs: self.host_iovecs_of(&pieces)?,
            offset,
            access,
            hold: self.hold_frames(pieces),
            _mapping: self.phys().keep_mapped(),
        })
    }

    /// Ends a transfer [`AddressSpace::prepare_transfer`] prepared, once it is made: the
    /// frames of its buffer that were freed meanwhile are cleared again (the transfer may
    /// have written them after they were) and given back.
    pub fn finish_transfer(&mut self, transfer: HostTransfer) {
        self.release_held_frames(transfer.hold);
    }

    /// sendmsg(2) from the app buffers `bufs` to host socket `fd`, to raw address `name`
    /// (empty for a connected socket).
    pub fn sendmsg_to_host(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[(UserAddr, usize)],
        name: &[u8],
        control: &[u8],
        flags: i32,
    ) -> Result<usize, Errno> {
        let mut iovecs = self.host_iovecs(bufs, Access::Read)?;
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = name.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = name.len() as u32;
        msg.msg_iov = iovecs.as_mut_ptr();
        msg.msg_iovlen = iovecs.len();
        if !control.is_empty() {
            msg.msg_control = control.as_ptr() as *mut libc::c_void;
            msg.msg_controllen = control.len();
        }
        // SAFETY: the iovecs cover readable app memory (checked by `host_iovecs`);
        // `name` and `control` (host cmsgs the VMM built) are live slices; all outlive the
        // call, and the vCPU is stopped.
        let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
        result_of(rc)
    }

    /// recvmsg(2) from host socket `fd` into the app buffers `bufs`, and host control
    /// messages into `control`. Returns the byte count, the sender's raw address, the
    /// message flags and the length of the control data.
    pub fn recvmsg_from_host(
        &mut self,
        fd: BorrowedFd<'_>,
        bufs: &[(UserAddr, usize)],
        control: &mut [u8],
        flags: i32,
    ) -> Result<(usize, Vec<u8>, i32, usize), Errno> {
        let mut iovecs = self.host_iovecs(bufs, Access::Write)?;
        let mut name = [0u8; crate::hostcall::SOCKADDR_MAX];
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = name.as_mut_ptr().cast();
        msg.msg_namelen = name.len() as u32;
        msg.msg_iov = iovecs.as_mut_ptr();
        msg.msg_iovlen = iovecs.len();
        if !control.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
        }
        // SAFETY: the iovecs cover writable app memory (checked by `host_iovecs`), `name`
        // has room for `msg_namelen` bytes and `control` for `msg_controllen`, and all
        // outlive the call; the vCPU is stopped.
        let rc = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        let count = result_of(rc)?;
        let len = (msg.msg_namelen as usize).min(name.len());
        let control_len = msg.msg_controllen.min(control.len());
        Ok((count, name[..len].to_vec(), msg.msg_flags, control_len))
    }
}

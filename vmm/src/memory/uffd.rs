//! A minimal userfaultfd: register a range of this process's anonymous memory for
//! missing-page faults, read the faults, and resolve them by copying pages in. Raw ioctls
//! (the structures are four small `repr(C)` records), so no system package or bindgen is
//! needed.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg`: the event, then (for a page fault) flags and the address.
#[repr(C)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    rest: u64,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl(fd: &OwnedFd, request: u64, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: every caller passes a pointer to the structure `request` expects, alive for
    // the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// A new userfaultfd (non-blocking reads), with the API handshake done.
    pub fn new() -> std::io::Result<Self> {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        // SAFETY: creating the fd is safe; what it can do to this process's memory is
        // limited to the ranges registered below, which the caller owns.
        let fd = unsafe { rustix::mm::userfaultfd(flags) }?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, (&mut api as *mut UffdioApi).cast())?;
        Ok(Self { fd })
    }

    /// Registers `[start, start + len)` (page-aligned, anonymous, never touched) for
    /// missing-page faults: a touch blocks until [`Uffd::copy`] fills the page.
    pub fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut register = UffdioRegister {
            start,
            len,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(
            &self.fd,
            UFFDIO_REGISTER,
            (&mut register as *mut UffdioRegister).cast(),
        )
    }

    /// Fills `[dst, dst + bytes.len())` with `bytes` and wakes whoever waits on it. A page
    /// already there (EEXIST), or no longer registered (the VMM freed it: ENOENT, EINVAL),
    /// is left as it is: the call then fills the pages one by one.
    pub fn copy(&self, dst: u64, bytes: &[u8]) -> std::io::Result<()> {
        let whole = self.copy_once(dst, bytes);
        match whole {
            Ok(()) => Ok(()),
            Err(e) if is_skippable(&e) && bytes.len() > 4096 => {
                for (i, page) in bytes.chunks(4096).enumerate() {
                    match self.copy_once(dst + i as u64 * 4096, page) {
                        Ok(()) => {}
                        Err(e) if is_skippable(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Err(e) if is_skippable(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn copy_once(&self, dst: u64, bytes: &[u8]) -> std::io::Result<()> {
        let mut copy = UffdioCopy {
            dst,
            src: bytes.as_ptr() as u64,
            len: bytes.len() as u64,
            mode: 0,
            copy: 0,
        };
        loop {
            match ioctl(&self.fd, UFFDIO_COPY, (&mut copy as *mut UffdioCopy).cast()) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                other => return other,
            }
        }
    }

    /// The address of the next page fault, if one is waiting.
    pub fn next_fault(&self) -> std::io::Result<Option<u64>> {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::zeroed();
        // SAFETY: reads at most one uffd_msg into memory sized for it.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msg.as_mut_ptr().cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EAGAIN) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: the kernel wrote a whole message (it never writes part of one), and the
        // zeroed start makes any shorter read a non-fault event.
        let msg = unsafe { msg.assume_init() };
        Ok((msg.event == UFFD_EVENT_PAGEFAULT).then_some(msg.address))
    }

    /// Waits up to `timeout_ms` for a fault to be readable.
    pub fn wait(&self, timeout_ms: i32) -> bool {
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, alive for the call.
        unsafe { libc::poll(&mut pollfd, 1, timeout_ms) > 0 }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn is_skippable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EEXIST) | Some(libc::ENOENT) | Some(libc::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_waits_for_its_page() {
        const LEN: usize = 4 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        let uffd = Uffd::new().expect("userfaultfd");
        uffd.register(base, LEN as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; the read blocks until the page is filled.
            unsafe { std::ptr::read_volatile((base + 4096 + 8) as *const u8) }
        });
        let mut fault = None;
        for _ in 0..1000 {
            if uffd.wait(10) {
                fault = uffd.next_fault().unwrap();
                if fault.is_some() {
                    break;
                }
            }
        }
        assert_eq!(fault.map(|a| a & !4095), Some(base + 4096));
        uffd.copy(base, &[7u8; LEN]).unwrap();
        assert_eq!(reader.join().unwrap(), 7);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base as *mut _, LEN) };
    }
}

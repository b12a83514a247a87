//! mmap, munmap, mprotect, mremap, madvise and brk: thin argument checking over
//! [`crate::memory::AddressSpace`].

use super::{Args, SysResult};
use crate::fdtable::FileKind;
use crate::kernel::process::Process;
use crate::memory::{Backing, Placement, Prot, UserAddr, VmaRole};
use rustix::io::Errno;
use std::fs::File;
use std::sync::Arc;

const MAP_PRIVATE: u32 = 0x02;
const MAP_SHARED_VALIDATE: u32 = 0x03;
const MAP_FIXED: u32 = 0x10;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_POPULATE: u32 = 0x8000;
const MAP_STACK: u32 = 0x2_0000;
const MAP_FIXED_NOREPLACE: u32 = 0x10_0000;
const MREMAP_MAYMOVE: u32 = 1;
const MREMAP_FIXED: u32 = 2;
const MADV_DONTNEED: i32 = 4;
const MADV_FREE: i32 = 8;
const PAGE: u64 = 4096;

fn prot_arg(raw: u32) -> Result<Prot, Errno> {
    if raw & !7 != 0 {
        return Err(Errno::INVAL);
    }
    Ok(Prot(raw))
}

/// mmap(2): anonymous and private file mappings, MAP_FIXED and MAP_FIXED_NOREPLACE,
/// hints, PROT_NONE reservations. A shared mapping of a file is a private copy, which is
/// exact for read-only use; a writable shared file mapping is refused (ENODEV).
pub fn mmap(p: &mut Process, a: &Args) -> SysResult {
    let (addr, len, prot, flags, fd, offset) = (
        a.u64(0),
        a.u64(1),
        prot_arg(a.u32(2))?,
        a.u32(3),
        a.fd(4),
        a.u64(5),
    );
    let sharing = flags & MAP_SHARED_VALIDATE;
    if sharing == 0 || offset % 4096 != 0 || len == 0 {
        return Err(Errno::INVAL.into());
    }
    let placement = if flags & MAP_FIXED_NOREPLACE != 0 {
        Placement::FixedNoReplace(addr)
    } else if flags & MAP_FIXED != 0 {
        Placement::Fixed(addr)
    } else {
        Placement::Hint(addr)
    };
    // A thread's stack (MAP_STACK, as glibc and Go ask for them) is populated like the
    // main one, near its top only: most of its megabytes are never touched.
    let role = if flags & MAP_STACK != 0 {
        VmaRole::Stack
    } else {
        VmaRole::Mapping
    };
    let backing = if flags & MAP_ANONYMOUS != 0 {
        Backing::Anonymous
    } else {
        let file = p.files.file(fd)?;
        let path = match &file.kind {
            FileKind::Memfd { .. } => {
                if sharing != MAP_PRIVATE && prot.contains(Prot::WRITE) {
                    return Err(Errno::NODEV.into());
                }
                let start = p.mem.map(placement, len, prot, Backing::Anonymous, role)?;
                if let Err(e) = copy_in(p, file.host(), offset, start, len) {
                    let _ = p.mem.unmap(start, len);
                    return Err(e.into());
                }
                return Ok(start);
            }
            FileKind::Path { path, flags } => {
                let writable_shared = sharing != MAP_PRIVATE && prot.contains(Prot::WRITE);
                if writable_shared {
                    return Err(Errno::NODEV.into());
                }
                if flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32 {
                    return Err(Errno::ACCESS.into());
                }
                path.clone()
            }
            _ => return Err(Errno::NODEV.into()),
        };
        let dup = rustix::io::fcntl_dupfd_cloexec(file.host(), 0)?;
        Backing::File {
            file: Arc::new(File::from(dup)),
            offset,
            immutable: p.sandbox.is_immutable(&path),
            path: path.into(),
        }
    };
    let start = p.mem.map(placement, len, prot, backing, role)?;
    if flags & MAP_POPULATE != 0 && prot != Prot::NONE {
        // As on Linux, a failure to populate does not fail the mmap: the pages not
        // populated are faulted in when touched.
        if let Err(e) = p.mem.populate(start, start + len) {
            tracing::debug!(start, len, "MAP_POPULATE left to demand faults: {e}");
        }
    }
    Ok(start)
}

/// Fills a new private mapping at `start` with what a memfd holds from `offset` (its
/// pages past the end of the file stay zero).
fn copy_in(
    p: &mut Process,
    file: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    start: u64,
    len: u64,
) -> Result<(), Errno> {
    let size = rustix::fs::fstat(file)?.st_size as u64;
    let wanted = size.saturating_sub(offset).min(len);
    let mut buf = vec![0u8; (1 << 20).min(wanted as usize)];
    let mut done = 0u64;
    while done < wanted {
        let room = (wanted - done).min(buf.len() as u64) as usize;
        let n = rustix::io::pread(file, &mut buf[..room], offset + done)?;
        if n == 0 {
            break;
        }
        p.mem.poke(UserAddr(start + done), &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// mincore(2): which pages of `[addr, addr + len)` are in memory. Every page must be
/// mapped (ENOMEM otherwise); a page is resident when the app's page table maps it.
pub fn mincore(p: &mut Process, a: &Args) -> SysResult {
    let (addr, len, out) = (a.u64(0), a.u64(1), a.ptr(2));
    if !addr.is_multiple_of(PAGE) {
        return Err(Errno::INVAL.into());
    }
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE))
        .ok_or(Errno::NOMEM)?;
    if !p.mem.vmas().is_covered(addr, end) {
        return Err(Errno::NOMEM.into());
    }
    let mut page = addr;
    let mut at = out;
    while page < end {
        let batch = ((end - page) / PAGE).min(4096);
        let mut flags = Vec::with_capacity(batch as usize);
        for i in 0..batch {
            let leaf = p.mem.leaf(page + i * PAGE).unwrap_or(0);
            flags.push(u8::from(leaf & 1 != 0));
        }
        p.mem.write(at, &flags)?;
        page += batch * PAGE;
        at = UserAddr(at.0 + batch);
    }
    Ok(0)
}

/// munmap(2).
pub fn munmap(p: &mut Process, a: &Args) -> SysResult {
    p.mem.unmap(a.u64(0), a.u64(1))?;
    Ok(0)
}

/// mprotect(2).
pub fn mprotect(p: &mut Process, a: &Args) -> SysResult {
    p.mem.protect(a.u64(0), a.u64(1), prot_arg(a.u32(2))?)?;
    Ok(0)
}

/// brk(2).
pub fn brk(p: &mut Process, a: &Args) -> SysResult {
    Ok(p.mem.brk(a.u64(0)))
}

/// mremap(2).
pub fn mremap(p: &mut Process, a: &Args) -> SysResult {
    let flags = a.u32(3);
    if flags & !(MREMAP_MAYMOVE | MREMAP_FIXED) != 0
        || (flags & MREMAP_FIXED != 0 && flags & MREMAP_MAYMOVE == 0)
    {
        return Err(Errno::INVAL.into());
    }
    let fixed = (flags & MREMAP_FIXED != 0).then(|| a.u64(4));
    let may_move = flags & MREMAP_MAYMOVE != 0;
    Ok(p.mem.remap(a.u64(0), a.u64(1), a.u64(2), may_move, fixed)?)
}

/// madvise(2): DONTNEED and FREE drop contents; other advice is accepted and ignored.
pub fn madvise(p: &mut Process, a: &Args) -> SysResult {
    match a.i32(2) {
        MADV_DONTNEED | MADV_FREE => p.mem.discard(a.u64(0), a.u64(1))?,
        _ if !a.u64(0).is_multiple_of(4096) => return Err(Errno::INVAL.into()),
        _ => {}
    }
    Ok(0)
}

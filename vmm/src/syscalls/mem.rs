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

/// mmap(2): anonymous, private and shared mappings, MAP_FIXED and MAP_FIXED_NOREPLACE,
/// hints, PROT_NONE reservations. A shared mapping of a file open for writing (or of a
/// memfd, or shared anonymous memory) maps the host file's own pages (see
/// [`Backing::Shared`]); one of a file open read-only is a private copy, which reads the
/// same, since this process cannot change the file.
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
    // A file range must fit a file offset (the areas' offsets never wrap).
    if flags & MAP_ANONYMOUS == 0
        && offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
    {
        return Err(Errno::OVERFLOW.into());
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
    let shared = sharing != MAP_PRIVATE;
    let backing = if flags & MAP_ANONYMOUS != 0 {
        if shared {
            shared_anonymous(len)?
        } else {
            Backing::Anonymous
        }
    } else {
        let file = p.files.file(fd)?;
        let path = match &file.kind {
            FileKind::Memfd { name } => {
                let sealed = rustix::fs::fcntl_get_seals(file.host())?;
                let write_sealed = sealed
                    .intersects(rustix::fs::SealFlags::WRITE | rustix::fs::SealFlags::FUTURE_WRITE);
                if shared && !write_sealed {
                    let dup = rustix::io::fcntl_dupfd_cloexec(file.host(), 0)?;
                    Backing::Shared {
                        file: Arc::new(File::from(dup)),
                        offset,
                        path: format!("/memfd:{name} (deleted)").into(),
                    }
                } else if shared && prot.contains(Prot::WRITE) {
                    return Err(Errno::PERM.into());
                } else {
                    // Private, or a memfd that can no longer change: a copy reads the same.
                    let start = p.mem.map(placement, len, prot, Backing::Anonymous, role)?;
                    if let Err(e) = copy_in(p, file.host(), offset, start, len) {
                        let _ = p.mem.unmap(start, len);
                        return Err(e.into());
                    }
                    return Ok(start);
                }
            }
            FileKind::Path { path, flags } => {
                let access = flags & libc::O_ACCMODE as u32;
                if flags & libc::O_PATH as u32 != 0 {
                    return Err(Errno::BADF.into());
                }
                if access == libc::O_WRONLY as u32 {
                    return Err(Errno::ACCESS.into());
                }
                if shared && access == libc::O_RDWR as u32 {
                    // Only a regular file's pages can be shared; /dev/zero's are shared
                    // anonymous memory, as on Linux.
                    let mode = rustix::fs::fstat(file.host())?.st_mode;
                    if rustix::fs::FileType::from_raw_mode(mode)
                        != rustix::fs::FileType::RegularFile
                    {
                        if path == "/dev/zero" {
                            shared_anonymous(len)?
                        } else {
                            return Err(Errno::NODEV.into());
                        }
                    } else if flags & libc::O_APPEND as u32 != 0 && prot.contains(Prot::WRITE) {
                        return Err(Errno::ACCESS.into());
                    } else {
                        Backing::Shared {
                            file: Arc::new(File::from(rustix::io::fcntl_dupfd_cloexec(
                                file.host(),
                                0,
                            )?)),
                            offset,
                            path: path.as_str().into(),
                        }
                    }
                } else if shared && prot.contains(Prot::WRITE) {
                    return Err(Errno::ACCESS.into());
                } else {
                    // Private, or shared from a file open read-only, which this process
                    // cannot change: a private copy reads the same.
                    let dup = rustix::io::fcntl_dupfd_cloexec(file.host(), 0)?;
                    Backing::File {
                        file: Arc::new(File::from(dup)),
                        offset,
                        immutable: p.sandbox.is_immutable(path),
                        path: path.as_str().into(),
                    }
                }
            }
            _ => return Err(Errno::NODEV.into()),
        };
        path
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

/// Shared anonymous memory: a host memfd of `len` bytes, which a fork shares as Linux
/// shares such memory with a child.
fn shared_anonymous(len: u64) -> Result<Backing, Errno> {
    let fd = rustix::fs::memfd_create("picocenter-shared", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, len)?;
    Ok(Backing::Shared {
        file: Arc::new(File::from(fd)),
        offset: 0,
        path: "/dev/zero (deleted)".into(),
    })
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

/// The end of `[addr, addr + len)` rounded up to a page, when areas map all of it;
/// ENOMEM otherwise (mincore and msync).
fn mapped_end(p: &Process, addr: u64, len: u64) -> Result<u64, Errno> {
    let end = addr
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE))
        .ok_or(Errno::NOMEM)?;
    if !p.mem.vmas().is_covered(addr, end) {
        return Err(Errno::NOMEM);
    }
    Ok(end)
}

/// mincore(2): which pages of `[addr, addr + len)` are in memory. Every page must be
/// mapped (ENOMEM otherwise); a page is resident when the app's page table maps it.
pub fn mincore(p: &mut Process, a: &Args) -> SysResult {
    let (addr, len, out) = (a.u64(0), a.u64(1), a.ptr(2));
    if !addr.is_multiple_of(PAGE) {
        return Err(Errno::INVAL.into());
    }
    let end = mapped_end(p, addr, len)?;
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

/// msync(2): checks its arguments as Linux does (EINVAL, and ENOMEM for a range not
/// wholly mapped); MS_SYNC writes the files that shared areas in the range map to disk.
/// Nothing else is needed: a shared area's pages are the host page cache's.
pub fn msync(p: &mut Process, a: &Args) -> SysResult {
    const MS_ASYNC: i32 = 1;
    const MS_INVALIDATE: i32 = 2;
    const MS_SYNC: i32 = 4;
    let (addr, len, flags) = (a.u64(0), a.u64(1), a.i32(2));
    if !addr.is_multiple_of(PAGE)
        || flags & !(MS_ASYNC | MS_INVALIDATE | MS_SYNC) != 0
        || (flags & MS_ASYNC != 0 && flags & MS_SYNC != 0)
    {
        return Err(Errno::INVAL.into());
    }
    let end = mapped_end(p, addr, len)?;
    if flags & MS_SYNC != 0 {
        let files: Vec<Arc<File>> = p
            .mem
            .vmas()
            .overlapping(addr, end)
            .filter_map(|v| match &v.backing {
                Backing::Shared { file, .. } => Some(file.clone()),
                _ => None,
            })
            .collect();
        for file in files {
            rustix::fs::fdatasync(&*file)?;
        }
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

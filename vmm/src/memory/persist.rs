//! What snapshots need from the address space: its pages as the page tables say, page
//! contents, and rebuilding areas and entries at restore.

use super::AddressSpace;
use crate::memory::paging::*;
use crate::memory::phys::FileSharing;
use crate::memory::vma::Vma;
use rustix::io::Errno;
use std::os::fd::BorrowedFd;

const PAGE: u64 = 4096;

/// One page the app has, as its leaf entry describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageState {
    /// Its virtual address.
    pub va: u64,
    /// The guest-physical frame.
    pub frame: u64,
    /// The app (or the VMM on its behalf) read or wrote it since the tables were built.
    pub accessed: bool,
    /// It was written since the tables were built.
    pub dirty: bool,
    /// It still holds what the snapshot the app was restored from had there.
    pub restored: bool,
}

impl AddressSpace {
    /// Every page that has a frame, in address order.
    pub fn pages(&mut self) -> Result<Vec<PageState>, Errno> {
        let ranges: Vec<(u64, u64)> = self.vmas.iter().map(|v| (v.start, v.end)).collect();
        let mut pages = Vec::new();
        for (start, end) in ranges {
            for (va, pte) in self.tables.leaves(&self.phys, start, end)? {
                if pte & PTE_OWNED == 0 {
                    continue;
                }
                pages.push(PageState {
                    va,
                    frame: pte & PTE_FRAME,
                    accessed: pte & PTE_ACCESSED != 0,
                    dirty: pte & PTE_DIRTY != 0,
                    restored: pte & PTE_RESTORED != 0,
                });
            }
        }
        Ok(pages)
    }

    /// The frame at `gpa`, borrowed in place so a snapshot can hand it to the kernel
    /// without a copy.
    ///
    /// # Safety
    ///
    /// Nothing may write the frame while the borrow lives: the vCPU must be out of
    /// KVM_RUN (the app is stopped at a clean point) and no other VMM thread writes app
    /// pages.
    pub unsafe fn frame_bytes(&self, gpa: u64) -> Result<&[u8], Errno> {
        let slice = self
            .phys
            .slice(gpa, PAGE as usize)
            .map_err(|_| Errno::FAULT)?;
        // SAFETY: `slice` covers PAGE bytes of mapped guest memory that outlive `self`'s
        // borrow; the caller guarantees nothing writes them meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), PAGE as usize) })
    }

    /// The pages whose Accessed bit is set, as page numbers, with the bits cleared. Every
    /// translation is then stale: the caller must invalidate before the guest runs.
    pub fn take_accessed(&mut self) -> Result<Vec<u64>, PagingError> {
        let ranges: Vec<(u64, u64)> = self.vmas.iter().map(|v| (v.start, v.end)).collect();
        let mut accessed = Vec::new();
        for (start, end) in ranges {
            for (va, pte) in self.tables.leaves(&self.phys, start, end)? {
                if pte & PTE_ACCESSED != 0 {
                    self.tables.set(&self.phys, va, pte & !PTE_ACCESSED)?;
                    accessed.push(va / PAGE);
                }
            }
        }
        self.stale.overflow = true;
        Ok(accessed)
    }

    /// A digest of the app's memory as it reads it: every mapped page that is not all
    /// zeros, by address and contents. Equal digests before a snapshot and after its
    /// restore show the app got its memory back. Returns (pages digested, digest).
    pub fn digest(&mut self) -> Result<(u64, u64), Errno> {
        let ranges: Vec<(u64, u64)> = self.vmas.iter().map(|v| (v.start, v.end)).collect();
        let mut hasher = crc32fast::Hasher::new();
        let mut folded = 0u64;
        let mut count = 0;
        let mut page = vec![0u8; PAGE as usize];
        for (start, end) in ranges {
            for (va, pte) in self.tables.leaves(&self.phys, start, end)? {
                self.phys
                    .read(pte & PTE_FRAME, &mut page)
                    .map_err(|_| Errno::FAULT)?;
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                hasher.update(&va.to_le_bytes());
                hasher.update(&page);
                // Two independent CRCs make a 64-bit digest.
                folded = folded.rotate_left(5) ^ u64::from(crc32fast::hash(&page)) ^ va;
                count += 1;
            }
        }
        Ok((count, (u64::from(hasher.finalize()) << 32) ^ folded))
    }

    /// The heap's start and the break.
    pub fn brk_state(&self) -> (u64, u64) {
        (self.brk_start, self.brk)
    }

    /// Adds an area as a snapshot recorded it, without populating it.
    pub fn restore_vma(&mut self, vma: Vma) -> Result<(), Errno> {
        if !vma.start.is_multiple_of(PAGE) || !vma.end.is_multiple_of(PAGE) || vma.start >= vma.end
        {
            return Err(Errno::INVAL);
        }
        if !self.vmas.is_free(vma.start, vma.end) {
            return Err(Errno::EXIST);
        }
        self.vmas.insert(vma);
        Ok(())
    }

    /// Makes the page file `file` (`pages` pages) guest memory: a private mapping over
    /// contiguous frames. Returns the first frame.
    pub fn attach_page_file(&mut self, file: BorrowedFd<'_>, pages: u64) -> Result<u64, Errno> {
        if pages == 0 {
            return Ok(0);
        }
        let base = self.frames.alloc_run(pages).ok_or(Errno::NOMEM)?;
        self.phys
            .map_file(base, pages * PAGE, file, 0, FileSharing::Private)
            .map_err(|_| Errno::NOMEM)?;
        Ok(base)
    }

    /// Makes the runs `runs` (first page, pages) of the page file `file` guest memory, each
    /// a private mapping over contiguous frames of its own; the pages no run names take no
    /// frames. Returns each run's first frame, in order.
    pub fn attach_page_runs(
        &mut self,
        file: BorrowedFd<'_>,
        runs: &[(u64, u64)],
    ) -> Result<Vec<u64>, Errno> {
        let mut bases = Vec::with_capacity(runs.len());
        for &(first, pages) in runs {
            let base = self.frames.alloc_run(pages).ok_or(Errno::NOMEM)?;
            let offset = first.checked_mul(PAGE).ok_or(Errno::INVAL)?;
            self.phys
                .map_file(base, pages * PAGE, file, offset, FileSharing::Private)
                .map_err(|_| Errno::NOMEM)?;
            bases.push(base);
        }
        Ok(bases)
    }

    /// Reserves `pages` contiguous, never-touched frames for a page file that will be
    /// streamed in (see `persist::stream`). Returns the first frame and its host address.
    pub fn reserve_page_file(&mut self, pages: u64) -> Result<(u64, u64), Errno> {
        let base = self.frames.alloc_run(pages.max(1)).ok_or(Errno::NOMEM)?;
        let host = self.phys.host_addr(base).map_err(|_| Errno::FAULT)? as u64;
        Ok((base, host))
    }

    /// Maps the `count` pages from `va` to consecutive frames from `frame` (of an
    /// attached page file), with their areas' protection. `accessed(i)` presets the A bit
    /// of page `i` (kvm_pvm then maps 8 pages per fault around it).
    pub fn map_restored_run(
        &mut self,
        va: u64,
        frame: u64,
        count: u64,
        accessed: impl Fn(u64) -> bool,
    ) -> Result<(), Errno> {
        let mut done = 0;
        while done < count {
            let at = va + done * PAGE;
            let vma = self.vmas.get(at).ok_or(Errno::FAULT)?;
            let n = ((vma.end - at) / PAGE).min(count - done);
            let flags = self.leaf_flags(vma.prot) | PTE_RESTORED;
            let ptes: Vec<u64> = (done..done + n)
                .map(|i| {
                    let a = if accessed(i) { PTE_ACCESSED } else { 0 };
                    (frame + i * PAGE) | flags | a
                })
                .collect();
            self.tables.set_run(&self.phys, at, &ptes)?;
            done += n;
        }
        Ok(())
    }

    /// Whether `va` is in an anonymous area (where an untouched page reads as zeros).
    pub fn is_anonymous(&self, va: u64) -> bool {
        matches!(
            self.vmas.get(va).map(|v| &v.backing),
            Some(crate::memory::vma::Backing::Anonymous)
        )
    }

    /// Gives `va` a fresh zero frame.
    pub fn map_zero(&mut self, va: u64) -> Result<(), Errno> {
        let prot = self.vmas.get(va).map(|v| v.prot).ok_or(Errno::FAULT)?;
        let frame = self.frames.alloc().ok_or(Errno::NOMEM)?;
        let pte = frame | self.leaf_flags(prot) | PTE_RESTORED;
        Ok(self.tables.set(&self.phys, va, pte)?)
    }

    /// Fills `[start, end)` from its areas' files, as when first touched.
    pub fn map_from_file(&mut self, start: u64, end: u64) -> Result<(), Errno> {
        self.populate(start, end)?;
        for va in (start..end).step_by(PAGE as usize) {
            let pte = self.tables.get(&self.phys, va)?;
            self.tables.set(&self.phys, va, pte | PTE_RESTORED)?;
        }
        Ok(())
    }

    /// Brings `[gpa, gpa + len)` into memory now, writable (MADV_POPULATE_WRITE), so that
    /// the first touches do not go to the page cache or disk.
    pub fn prefault(&self, gpa: u64, len: u64) -> Result<(), Errno> {
        self.phys.populate_write(gpa, len).map_err(|_| Errno::NOMEM)
    }

    /// After a snapshot of a running app: every page now holds what that snapshot has, so
    /// the next one can be an increment of it. Clears the Dirty bits, which needs every
    /// translation dropped (a cached writable translation would not set D again).
    pub fn mark_saved(&mut self) -> Result<(), Errno> {
        for page in self.pages()? {
            let pte = self.tables.get(&self.phys, page.va)?;
            self.tables
                .set(&self.phys, page.va, (pte & !PTE_DIRTY) | PTE_RESTORED)?;
        }
        self.stale.overflow = true;
        Ok(())
    }

    /// Restores the break.
    pub fn restore_brk(&mut self, start: u64, brk: u64) {
        self.brk_start = start;
        self.brk = brk;
    }
}

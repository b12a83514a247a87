//! The app's address space: the VMM acting as the guest's kernel for memory.
//!
//! It keeps the areas (VMAs), the page tables and the RAM frames consistent. Mappings are
//! populated when they are made where that is cheap, because a page fault costs an exception
//! exit; large mappings fill in on demand, a window of pages per fault.
//!
//! Adding a translation needs nothing more. Removing or reducing one marks the space
//! *stale*: the run loop must invalidate guest translations (see `crate::platform`) before
//! the guest runs again, and only then are the freed frames reused.

use super::frames::FrameAllocator;
use super::paging::*;
use super::phys::{FileSharing, PhysError, PhysicalMemory};
use super::vma::{Backing, Prot, Vma, VmaRole, VmaSet};
use super::UserAddr;
use rustix::io::Errno;
use std::os::fd::{AsFd, AsRawFd};

#[path = "persist.rs"]
pub mod persist;

/// One past the highest user address (Linux's TASK_SIZE on x86-64).
pub const USER_END: u64 = picocenter_guest_shim::abi::USER_END;

/// Whether the app's own code may run at `rip`: user space, or the vDSO's page (user-mode
/// code the VMM maps above it, which a signal may interrupt and `syscall` return to).
pub fn app_code_address(rip: u64) -> bool {
    use picocenter_guest_shim::abi::{PAGE_SIZE, VDSO_VA};
    rip < USER_END || (VDSO_VA..VDSO_VA + PAGE_SIZE).contains(&rip)
}
/// The frames of pages `(va, gpa)`.
fn frames_of(pages: &[(u64, u64)]) -> Vec<u64> {
    pages.iter().map(|&(_, gpa)| gpa).collect()
}

/// Lowest address `mmap` hands out (Linux's default `vm.mmap_min_addr`).
pub const MMAP_MIN: u64 = 0x1_0000;
/// Top of the main stack.
pub const STACK_TOP: u64 = USER_END;
/// Size of the main stack area (RLIMIT_STACK).
pub const STACK_SIZE: u64 = 8 << 20;
/// Where top-down `mmap` placement starts: below the stack and a guard gap, as Linux does.
pub const MMAP_BASE: u64 = STACK_TOP - (128 << 20);
/// Bytes of the stack populated up front.
const STACK_EAGER: u64 = 128 << 10;
/// Anonymous mappings up to this size are populated when made (PTEs only; the host commits
/// nothing until the guest touches a page).
const EAGER_ANON_MAX: u64 = 16 << 20;
/// File mappings up to this size are read in when made.
const EAGER_FILE_MAX: u64 = 1 << 20;
/// Pages populated around a demand fault.
const FAULT_WINDOW_PAGES: u64 = 32;

const PAGE: u64 = 4096;

fn page_down(addr: u64) -> u64 {
    addr & !(PAGE - 1)
}

fn page_up(addr: u64) -> Option<u64> {
    addr.checked_add(PAGE - 1).map(page_down)
}

/// Kind of access a fault or a syscall buffer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading.
    Read,
    /// Writing.
    Write,
    /// Instruction fetch.
    Execute,
}

/// Where a new mapping may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Anywhere; `hint` is tried first when it is free.
    Hint(u64),
    /// Exactly here, replacing what is there (MAP_FIXED).
    Fixed(u64),
    /// Exactly here, failing with EEXIST if anything is there (MAP_FIXED_NOREPLACE).
    FixedNoReplace(u64),
}

/// What a page fault turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultResolution {
    /// The page is now mapped; resume the guest.
    Resolved,
    /// No area covers the address (SEGV_MAPERR).
    Unmapped,
    /// An area covers it but forbids the access (SEGV_ACCERR).
    Forbidden,
    /// A shared file area covers it, past the end of its file (SIGBUS, BUS_ADRERR).
    PastEndOfFile,
}

/// Counters for stats and diagnostics.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemoryStats {
    /// RAM frames owned by mappings.
    pub frames_in_use: u64,
    /// RAM frames in total.
    pub frames_total: u64,
    /// Page-table pages in use.
    pub table_pages: u64,
    /// Demand faults served.
    pub demand_faults: u64,
    /// Invalidations performed.
    pub invalidations: u64,
}

/// The app's address space.
#[derive(Debug)]
pub struct AddressSpace {
    phys: PhysicalMemory,
    frames: FrameAllocator,
    tables: PageTables,
    vmas: VmaSet,
    brk_start: u64,
    brk: u64,
    nx: bool,
    stale: StaleEntries,
    /// Whether the app has (had) more than one vCPU: Accessed bits are then no proof
    /// that nothing is cached.
    several_cpus: bool,
    stats: MemoryStats,
    /// RAM a userfaultfd streamer fills in the background: (guest-physical start, bytes).
    streamed: Vec<(u64, u64)>,
}

/// Most leaf entries whose removal is tracked one by one; beyond this, every translation
/// is invalidated at once.
pub const MAX_STALE_ENTRIES: usize = 64;

/// The leaf entries changed since the last invalidation whose old value the guest may have
/// cached.
#[derive(Debug, Default)]
struct StaleEntries {
    /// Guest-physical addresses of the entries.
    entries: Vec<u64>,
    /// More changed than are tracked, or one whose address is unknown.
    overflow: bool,
}

/// Logs a VMM-internal memory error and turns it into the errno the guest sees. These only
/// happen on VMM bugs; the guest must never be able to cause one.
fn internal(err: impl std::fmt::Display) -> Errno {
    tracing::error!("internal memory error: {err}");
    Errno::FAULT
}

impl From<PagingError> for Errno {
    fn from(err: PagingError) -> Errno {
        match err {
            PagingError::OutOfTables => Errno::NOMEM,
            PagingError::Phys(e) => internal(e),
            e @ (PagingError::NoSuchCpu(_)
            | PagingError::NotCpuLocal(_)
            | PagingError::NotShared(_)) => internal(e),
        }
    }
}

impl AddressSpace {
    /// Creates an empty address space over `phys`. `nx` says whether EFER.NXE is on, so
    /// that non-executable pages can be marked so.
    pub fn new(phys: PhysicalMemory, nx: bool) -> Result<Self, PagingError> {
        let tables = PageTables::new(&phys)?;
        let frames = FrameAllocator::new(super::layout::RAM_GPA, phys.ram_size() / PAGE);
        Ok(Self {
            phys,
            frames,
            tables,
            vmas: VmaSet::default(),
            brk_start: 0,
            brk: 0,
            nx,
            stale: StaleEntries::default(),
            several_cpus: false,
            stats: MemoryStats::default(),
            streamed: Vec::new(),
        })
    }

    /// Notes that a streamer fills RAM `[gpa, gpa + len)` through a userfaultfd.
    pub fn note_streamed(&mut self, gpa: u64, len: u64) {
        self.streamed.push((gpa, len));
    }

    /// Waits until every streamed page has arrived (the fault makes the streamer send it
    /// first). A fork needs this: the child's copy of the memory has no userfaultfd, and a
    /// page missing at the fork would read as zeros there.
    pub fn finish_streaming(&mut self) -> Result<(), PhysError> {
        for (gpa, len) in std::mem::take(&mut self.streamed) {
            self.phys.populate_write(gpa, len)?;
        }
        Ok(())
    }

    /// The guest-physical memory under this space.
    pub fn phys(&self) -> &PhysicalMemory {
        &self.phys
    }

    /// Guest-physical address of vCPU `cpu`'s root page table (its CR3; see
    /// [`PageTables`]), if [`AddressSpace::add_cpu`] made it.
    pub fn cpu_root(&self, cpu: usize) -> Option<u64> {
        self.tables.cpu_root(cpu)
    }

    /// Makes page tables for one more vCPU and returns its number; the caller maps its own
    /// pages with [`AddressSpace::map_cpu_local_page`].
    pub fn add_cpu(&mut self) -> Result<usize, PagingError> {
        self.tables.add_cpu(&self.phys)
    }

    /// Number of vCPUs with page tables.
    pub fn cpus(&self) -> usize {
        self.tables.cpus()
    }

    /// Maps a page of vCPU `cpu`'s own at `va` (in the vCPU-local area) to `gpa`.
    pub fn map_cpu_local_page(
        &mut self,
        cpu: usize,
        va: u64,
        gpa: u64,
        flags: u64,
    ) -> Result<(), PagingError> {
        self.tables
            .set_cpu_local(&self.phys, cpu, va, gpa | flags | PTE_PRESENT)
    }

    /// The areas, in address order.
    pub fn vmas(&self) -> &VmaSet {
        &self.vmas
    }

    /// Current counters.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            frames_in_use: self.frames.in_use(),
            frames_total: self.phys.ram_size() / PAGE,
            table_pages: self.tables.tables_in_use(),
            ..self.stats
        }
    }

    /// Maps a system page (VMM machinery above the user range) at `va` to `gpa`.
    pub fn map_system_page(&mut self, va: u64, gpa: u64, flags: u64) -> Result<(), PagingError> {
        self.tables.set(&self.phys, va, gpa | flags | PTE_PRESENT)
    }

    /// Maps the first `len` bytes of `file` read-only for the guest at `va`, a file window
    /// above the user range (see [`crate::kernel::windows`]): its frames become private
    /// mappings of the file, so the guest reads the host's page cache with no copy. The
    /// frames need not be contiguous (a window taken down gives its frames back to the
    /// free list, which holds no runs): each run of adjacent ones is one mapping.
    pub fn map_window(
        &mut self,
        va: u64,
        file: std::os::fd::BorrowedFd<'_>,
        len: u64,
    ) -> Result<(), Errno> {
        let pages = len.div_ceil(PAGE);
        if pages > self.frames.available() {
            return Err(Errno::NOMEM);
        }
        let mut frames: Vec<u64> = (0..pages).filter_map(|_| self.frames.alloc()).collect();
        frames.sort_unstable();
        if frames.len() as u64 != pages {
            self.free_unmapped(&frames);
            return Err(Errno::NOMEM);
        }
        let mut first = 0;
        while first < frames.len() {
            let mut end = first + 1;
            while end < frames.len() && frames[end] == frames[end - 1] + PAGE {
                end += 1;
            }
            let run = (end - first) as u64 * PAGE;
            if let Err(e) = self.phys.map_file(
                frames[first],
                run,
                file,
                first as u64 * PAGE,
                FileSharing::Private,
            ) {
                self.free_unmapped(&frames);
                return Err(internal(e));
            }
            first = end;
        }
        let flags = PTE_USER | PTE_OWNED | PTE_PRESENT | if self.nx { PTE_NX } else { 0 };
        let ptes: Vec<u64> = frames.iter().map(|&gpa| gpa | flags).collect();
        if let Err(e) = self.tables.set_run(&self.phys, va, &ptes) {
            // The entries written so far may already be in a vCPU's TLB (another thread
            // may run meanwhile): they are taken down as any window's, their frames
            // quarantined until the invalidation. The frames no entry named go back now.
            let mut unnamed = Vec::new();
            for (i, &gpa) in frames.iter().enumerate() {
                if self.tables.get(&self.phys, va + i as u64 * PAGE)? == 0 {
                    unnamed.push(gpa);
                }
            }
            self.unmap_window(va, len)?;
            self.free_unmapped(&unnamed);
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes the window of `len` bytes at `va` that [`Self::map_window`] made. Its frames
    /// are reused only after the guest's translations are invalidated.
    pub fn unmap_window(&mut self, va: u64, len: u64) -> Result<(), Errno> {
        let mut leaves = Vec::new();
        for i in 0..len.div_ceil(PAGE) {
            let at = va + i * PAGE;
            let old = self.tables.get(&self.phys, at)?;
            if old != 0 {
                leaves.push((at, old));
            }
        }
        for &(at, _) in &leaves {
            self.tables.clear(&self.phys, at)?;
        }
        self.release_frames(&leaves)
    }

    /// Whether a translation was removed or reduced since the last invalidation.
    pub fn is_stale(&self) -> bool {
        self.stale.overflow || !self.stale.entries.is_empty()
    }

    /// The stale leaf entries as (guest-physical address, current value), or `None` when
    /// there are too many to name (invalidate everything).
    pub fn stale_entries(&self) -> Option<Vec<(u64, u64)>> {
        if self.stale.overflow {
            return None;
        }
        self.stale
            .entries
            .iter()
            .map(|&gpa| self.phys.read_u64(gpa).ok().map(|value| (gpa, value)))
            .collect()
    }

    /// Records that the leaf entry of `va` changed in a way a cached translation must not
    /// survive.
    fn mark_stale(&mut self, va: u64) -> Result<(), Errno> {
        if self.stale.overflow {
            return Ok(());
        }
        match self.tables.entry_gpa(&self.phys, va)? {
            Some(gpa) if self.stale.entries.contains(&gpa) => {}
            Some(gpa) if self.stale.entries.len() < MAX_STALE_ENTRIES => {
                self.stale.entries.push(gpa)
            }
            _ => {
                self.stale.overflow = true;
                self.stale.entries.clear();
            }
        }
        Ok(())
    }

    /// How many times guest translations were invalidated: a vCPU that did not do the
    /// last one itself catches up (see `Vcpu::catch_up_invalidation`) when this moved.
    pub fn invalidation_count(&self) -> u64 {
        self.stats.invalidations
    }

    /// Holds back the frames of `pieces` freed from now on (see [`FrameAllocator::hold`]).
    pub(super) fn hold_frames(&mut self, pieces: Vec<(u64, usize)>) -> u64 {
        self.frames.hold(pieces)
    }

    /// Ends hold `number`: the frames it held back are cleared again (a transfer may have
    /// written them after they were cleared on their way out) and freed.
    pub(super) fn release_held_frames(&mut self, number: u64) {
        for (gpa, stale) in self.frames.release(number) {
            if let Err(e) = self.phys.discard(gpa, PAGE) {
                // Never handed out again: it may still be a shared file's page.
                internal(e);
                continue;
            }
            if stale {
                self.frames.quarantine(gpa);
            } else {
                self.frames.free(gpa);
            }
        }
    }

    /// Records that guest translations were invalidated: quarantined frames become reusable.
    pub fn invalidated(&mut self) {
        self.stale = StaleEntries::default();
        self.frames.release_quarantine();
        self.stats.invalidations += 1;
    }

    fn leaf_flags(&self, prot: Prot) -> u64 {
        let mut flags = PTE_USER | PTE_OWNED;
        if prot != Prot::NONE {
            flags |= PTE_PRESENT;
        }
        if prot.contains(Prot::WRITE) {
            flags |= PTE_WRITABLE;
        }
        if self.nx && !prot.contains(Prot::EXEC) {
            flags |= PTE_NX;
        }
        flags
    }

    /// Whether the guest may hold a translation derived from leaf `pte`. Only an entry the
    /// CPU has used can be cached, and using it sets A (kvm_pvm's shadow MMU, prefetch
    /// included, skips entries with A = 0; hardware sets A when it fills the TLB). The VMM
    /// only ever clears A together with an invalidation, so A = 0 means nothing is cached.
    ///
    /// Once the app has a second vCPU, another vCPU may set A while the VMM rewrites the
    /// entry (a read, then a write), so A cannot be trusted: every present entry counts.
    fn maybe_cached(&self, pte: u64) -> bool {
        let used = if self.several_cpus { 0 } else { PTE_ACCESSED };
        pte & (PTE_PRESENT | used) == PTE_PRESENT | used
    }

    /// Notes that the app has more than one vCPU from now on (see
    /// [`AddressSpace::maybe_cached`]).
    pub fn note_several_cpus(&mut self) {
        self.several_cpus = true;
    }

    /// Whether replacing leaf `old` with `new` takes away anything the guest could do
    /// through a translation it may have cached.
    fn reduces(&self, old: u64, new: u64) -> bool {
        let had = |pte: u64, bit: u64| pte & bit != 0;
        if !self.maybe_cached(old) {
            return false;
        }
        (had(old, PTE_PRESENT) && !had(new, PTE_PRESENT))
            || (had(old, PTE_WRITABLE) && !had(new, PTE_WRITABLE))
            || (!had(old, PTE_NX) && had(new, PTE_NX))
            || (old & PTE_FRAME != new & PTE_FRAME && had(old, PTE_PRESENT))
    }

    /// Gives back the frames of leaves `(va, old entry)` that were just cleared. Freed
    /// frames are kept zeroed (returned to the host), so that allocation never has to
    /// clear one; runs of adjacent frames go back in one call.
    fn release_frames(&mut self, leaves: &[(u64, u64)]) -> Result<(), Errno> {
        let mut owned: Vec<u64> = leaves
            .iter()
            .filter(|(_, pte)| pte & PTE_OWNED != 0)
            .map(|(_, pte)| pte & PTE_FRAME)
            .collect();
        owned.sort_unstable();
        // Frames the host would not give back keep what they held (a shared file's pages,
        // say): they are never handed out again.
        let mut kept = std::collections::HashSet::new();
        let mut i = 0;
        while i < owned.len() {
            let mut j = i + 1;
            while j < owned.len() && owned[j] == owned[j - 1] + PAGE {
                j += 1;
            }
            if let Err(e) = self.phys.discard(owned[i], (j - i) as u64 * PAGE) {
                internal(e);
                kept.extend(owned[i..j].iter().copied());
            }
            i = j;
        }
        for &(va, pte) in leaves.iter().filter(|(_, pte)| pte & PTE_OWNED != 0) {
            if self.maybe_cached(pte) {
                self.mark_stale(va)?;
            }
            if kept.contains(&(pte & PTE_FRAME)) {
                continue;
            }
            if self.maybe_cached(pte) {
                self.frames.quarantine(pte & PTE_FRAME);
            } else {
                self.frames.free(pte & PTE_FRAME);
            }
        }
        Ok(())
    }

    // ---- mapping -------------------------------------------------------------------

    /// Maps `len` bytes and returns the address (mmap's core).
    pub fn map(
        &mut self,
        placement: Placement,
        len: u64,
        prot: Prot,
        backing: Backing,
        role: VmaRole,
    ) -> Result<u64, Errno> {
        let len = page_up(len).filter(|&l| l > 0).ok_or(Errno::INVAL)?;
        if len > USER_END {
            return Err(Errno::NOMEM);
        }
        // Like Linux's overcommit heuristic: a writable private mapping larger than all of
        // RAM can never be backed.
        if prot.contains(Prot::WRITE) && len > self.phys.ram_size() {
            return Err(Errno::NOMEM);
        }
        let start = match placement {
            Placement::Fixed(addr) | Placement::FixedNoReplace(addr) => {
                let end = addr.checked_add(len).ok_or(Errno::INVAL)?;
                if addr % PAGE != 0 || addr < MMAP_MIN || end > USER_END {
                    return Err(Errno::INVAL);
                }
                if matches!(placement, Placement::FixedNoReplace(_))
                    && !self.vmas.is_free(addr, end)
                {
                    return Err(Errno::EXIST);
                }
                self.unmap(addr, len)?;
                addr
            }
            Placement::Hint(hint) => self.choose_address(hint, len)?,
        };
        let end = start + len;
        self.vmas.insert(Vma {
            start,
            end,
            prot,
            backing,
            role,
        });
        self.populate_by_policy(start, end);
        Ok(start)
    }

    fn choose_address(&self, hint: u64, len: u64) -> Result<u64, Errno> {
        let hint = page_down(hint);
        if hint >= MMAP_MIN
            && hint.checked_add(len).is_some_and(|end| end <= USER_END)
            && self.vmas.is_free(hint, hint + len)
        {
            return Ok(hint);
        }
        self.vmas
            .find_free_top_down(len, MMAP_MIN, MMAP_BASE)
            .ok_or(Errno::NOMEM)
    }

    /// Populates `[start, end)` now if the policy says it is cheap enough. Only ahead of
    /// need: a failure (no frame left, a file that cannot be read) leaves the rest to
    /// demand faults, as Linux's MAP_POPULATE does, so the call that made the area never
    /// fails after changing it.
    fn populate_by_policy(&mut self, start: u64, end: u64) {
        let Some(vma) = self.vmas.get(start) else {
            return;
        };
        if vma.prot == Prot::NONE {
            return;
        }
        let len = end - start;
        let (start, eager) = match (&vma.backing, vma.role) {
            (_, VmaRole::Stack) => (end.saturating_sub(STACK_EAGER).max(start), true),
            (Backing::Anonymous | Backing::Shared { .. }, _) => (
                start,
                len <= EAGER_ANON_MAX && len / PAGE * 2 <= self.frames.available(),
            ),
            // Mapped from the page cache: only page-table entries to write.
            (
                Backing::File {
                    immutable: true, ..
                },
                _,
            ) => (start, len <= EAGER_ANON_MAX * 4),
            (Backing::File { .. }, _) => (start, len <= EAGER_FILE_MAX),
        };
        if eager {
            if let Err(e) = self.populate(start, end) {
                tracing::debug!(start, end, "left to demand faults: populating failed: {e}");
            }
        }
    }

    /// Gives every page in `[start, end)` that lies in an area a frame, filled from its
    /// backing. Pages that already have one are left alone.
    pub fn populate(&mut self, start: u64, end: u64) -> Result<(), Errno> {
        let areas: Vec<Vma> = self.vmas.overlapping(start, end).cloned().collect();
        for vma in areas {
            let lo = start.max(vma.start);
            let hi = end.min(vma.end);
            let flags = self.leaf_flags(vma.prot);
            self.map_file_pages(&vma, lo, hi, flags)?;
            if let Backing::Shared { .. } = vma.backing {
                // Only the file's own pages will do: what lies past its end stays unmapped.
                continue;
            }
            // A file's page is mapped only once it holds the file's bytes: with a second
            // vCPU, another thread could otherwise read it zeroed in between.
            let mut file_run: Vec<(u64, u64)> = Vec::new();
            let mut va = lo;
            while va < hi {
                if self.tables.get(&self.phys, va)? & PTE_OWNED == 0 {
                    let Some(gpa) = self.frames.alloc() else {
                        // Never mapped, so no CPU can have them: free at once.
                        self.free_unmapped(&frames_of(&file_run));
                        return Err(Errno::NOMEM);
                    };
                    if let Backing::File { .. } = vma.backing {
                        file_run.push((va, gpa));
                    } else if let Err(e) = self.tables.set(&self.phys, va, gpa | flags) {
                        self.free_unmapped(&[gpa]);
                        return Err(e.into());
                    }
                } else if !file_run.is_empty() {
                    self.map_filled(&vma, std::mem::take(&mut file_run), flags)?;
                }
                va += PAGE;
            }
            if !file_run.is_empty() {
                self.map_filled(&vma, file_run, flags)?;
            }
        }
        Ok(())
    }

    /// Maps the not-yet-populated pages of `[lo, hi)` of an immutable or a shared file area
    /// straight from the file: each run of such pages gets frames that become a mapping of
    /// the file (private or shared, as the area is). Pages past the end of the file are
    /// left alone (a shared area's are never mapped: touching one is SIGBUS). A private
    /// run that finds no contiguous frames is left for the copying path; a shared one is
    /// mapped a frame at a time instead, since a copy would not be the file.
    fn map_file_pages(&mut self, vma: &Vma, lo: u64, hi: u64, flags: u64) -> Result<(), Errno> {
        let (file, offset, sharing) = match &vma.backing {
            Backing::File {
                file,
                offset,
                immutable: true,
                ..
            } => (file, *offset, FileSharing::Private),
            Backing::Shared { file, offset, .. } => (file, *offset, FileSharing::Shared),
            _ => return Ok(()),
        };
        let file_len = rustix::fs::fstat(file.as_ref())
            .map_err(|_| Errno::IO)?
            .st_size as u64;
        let file_end = vma.start.saturating_add(
            file_len
                .saturating_sub(offset)
                .checked_next_multiple_of(PAGE)
                .unwrap_or(u64::MAX),
        );
        let hi = hi.min(file_end);
        let owned: Vec<u64> = self
            .tables
            .leaves(&self.phys, lo, hi)?
            .into_iter()
            .filter(|(_, pte)| pte & PTE_OWNED != 0)
            .map(|(va, _)| va)
            .collect();
        let mut va = lo;
        while va < hi {
            if owned.binary_search(&va).is_ok() {
                va += PAGE;
                continue;
            }
            let run_end = owned
                .iter()
                .copied()
                .find(|&o| o > va)
                .unwrap_or(hi)
                .min(hi);
            let mut pages = (run_end - va) / PAGE;
            let base = match (self.frames.alloc_run(pages), sharing) {
                (Some(base), _) => base,
                (None, FileSharing::Private) => return Ok(()),
                (None, FileSharing::Shared) => {
                    pages = 1;
                    self.frames.alloc().ok_or(Errno::NOMEM)?
                }
            };
            let file_offset = offset + (va - vma.start);
            if self
                .phys
                .map_file(base, pages * PAGE, file.as_fd(), file_offset, sharing)
                .is_err()
            {
                let frames: Vec<u64> = (0..pages).map(|i| base + i * PAGE).collect();
                self.free_unmapped(&frames);
                return match sharing {
                    // The copy path takes over.
                    FileSharing::Private => Ok(()),
                    FileSharing::Shared => Err(Errno::NOMEM),
                };
            }
            for i in 0..pages {
                if let Err(e) =
                    self.tables
                        .set(&self.phys, va + i * PAGE, (base + i * PAGE) | flags)
                {
                    // Those mapped stay the area's; the rest were never named.
                    let unnamed: Vec<u64> = (i..pages).map(|j| base + j * PAGE).collect();
                    self.free_unmapped(&unnamed);
                    return Err(e.into());
                }
            }
            va += pages * PAGE;
        }
        Ok(())
    }

    /// Fills the new frames of consecutive pages `(va, gpa)` of `vma` from its file, then
    /// maps them with `flags`; on failure they go back unmapped.
    fn map_filled(&mut self, vma: &Vma, run: Vec<(u64, u64)>, flags: u64) -> Result<(), Errno> {
        if let Err(e) = self.fill_from_file(vma, &run) {
            self.free_unmapped(&frames_of(&run));
            return Err(e);
        }
        for (at, &(va, gpa)) in run.iter().enumerate() {
            if let Err(e) = self.tables.set(&self.phys, va, gpa | flags) {
                // Those mapped stay the area's; the others were never mapped.
                self.free_unmapped(&frames_of(&run[at..]));
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Frees `frames`, which no page-table entry ever named: no CPU can hold a translation
    /// to them, so they need no quarantine.
    fn free_unmapped(&mut self, frames: &[u64]) {
        for &gpa in frames {
            if let Err(discarded) = self.phys.discard(gpa, PAGE) {
                // Never handed out again: it may still be a shared file's page.
                internal(discarded);
                continue;
            }
            self.frames.free(gpa);
        }
    }

    /// Reads the file contents of consecutive pages `(va, gpa)` of `vma` into their frames.
    fn fill_from_file(&self, vma: &Vma, pages: &[(u64, u64)]) -> Result<(), Errno> {
        let Backing::File { file, offset, .. } = &vma.backing else {
            return Ok(());
        };
        for chunk in pages.chunks(64) {
            let mut iovecs = Vec::with_capacity(chunk.len());
            for &(_, gpa) in chunk {
                let host = self.phys.host_addr(gpa).map_err(internal)?;
                iovecs.push(libc::iovec {
                    iov_base: host.cast(),
                    iov_len: PAGE as usize,
                });
            }
            let file_offset = offset + (chunk[0].0 - vma.start);
            // SAFETY: each iovec covers one whole RAM frame that this space owns and that
            // no Rust reference aliases; no guest reaches it yet (`map_filled` maps it
            // after this fill, and other vCPUs may be running). Short reads (end of file)
            // leave the rest of the frames zero, as they were allocated.
            let rc = unsafe {
                libc::preadv(
                    file.as_raw_fd(),
                    iovecs.as_ptr(),
                    iovecs.len() as i32,
                    file_offset as i64,
                )
            };
            if rc < 0 {
                return Err(Errno::IO);
            }
        }
        Ok(())
    }

    /// Removes mappings in `[addr, addr + len)` (munmap's core).
    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<(), Errno> {
        let len = page_up(len).ok_or(Errno::INVAL)?;
        let end = addr.checked_add(len).ok_or(Errno::INVAL)?;
        if !addr.is_multiple_of(PAGE) || len == 0 || end > USER_END {
            return Err(Errno::INVAL);
        }
        self.vmas.carve(addr, end);
        let leaves = self.tables.leaves(&self.phys, addr, end)?;
        for &(va, _) in &leaves {
            self.tables.clear(&self.phys, va)?;
        }
        self.release_frames(&leaves)
    }

    /// Changes the protection of `[addr, addr + len)` (mprotect's core).
    pub fn protect(&mut self, addr: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        let len = page_up(len).ok_or(Errno::INVAL)?;
        let end = addr.checked_add(len).ok_or(Errno::INVAL)?;
        if !addr.is_multiple_of(PAGE) || end > USER_END {
            return Err(Errno::INVAL);
        }
        if len == 0 {
            return Ok(());
        }
        if !self.vmas.is_covered(addr, end) {
            return Err(Errno::NOMEM);
        }
        for mut piece in self.vmas.carve(addr, end) {
            piece.prot = prot;
            self.vmas.insert(piece);
        }
        let flags = self.leaf_flags(prot);
        for (va, old) in self.tables.leaves(&self.phys, addr, end)? {
            let new = (old & (PTE_FRAME | PTE_ACCESSED | PTE_DIRTY | PTE_RESTORED)) | flags;
            self.tables.set(&self.phys, va, new)?;
            if self.reduces(old, new) {
                self.mark_stale(va)?;
            }
        }
        self.populate_by_policy(addr, end);
        Ok(())
    }

    /// Grows, shrinks or moves a mapping (mremap's core). Moving re-points page-table
    /// entries at the same frames; no data is copied.
    pub fn remap(
        &mut self,
        old: u64,
        old_len: u64,
        new_len: u64,
        may_move: bool,
        fixed: Option<u64>,
    ) -> Result<u64, Errno> {
        let old_len = page_up(old_len).ok_or(Errno::INVAL)?;
        let new_len = page_up(new_len).filter(|&l| l > 0).ok_or(Errno::INVAL)?;
        let old_end = old.checked_add(old_len).ok_or(Errno::INVAL)?;
        if !old.is_multiple_of(PAGE) || old_end > USER_END {
            return Err(Errno::INVAL);
        }
        let area = self.vmas.get(old).cloned().ok_or(Errno::FAULT)?;
        if old_end > area.end {
            return Err(Errno::FAULT);
        }
        if fixed.is_none() {
            if new_len <= old_len {
                if new_len < old_len {
                    self.unmap(old + new_len, old_len - new_len)?;
                }
                return Ok(old);
            }
            let grown_end = old.checked_add(new_len).ok_or(Errno::NOMEM)?;
            if old_end == area.end && grown_end <= USER_END && self.vmas.is_free(old_end, grown_end)
            {
                self.vmas
                    .insert(area.grown_tail(old_end, old_end, grown_end));
                self.populate_by_policy(old_end, grown_end);
                return Ok(old);
            }
            if !may_move {
                return Err(Errno::NOMEM);
            }
        }
        let target = match fixed {
            Some(addr) => {
                let end = addr.checked_add(new_len).ok_or(Errno::INVAL)?;
                if addr % PAGE != 0 || end > USER_END || (addr < old_end && old < end) {
                    return Err(Errno::INVAL);
                }
                self.unmap(addr, new_len)?;
                addr
            }
            None => self.choose_address(0, new_len)?,
        };
        let keep = old_len.min(new_len);
        let moved = self.vmas.carve(old, old + keep);
        for (va, pte) in self.tables.leaves(&self.phys, old, old + keep)? {
            self.tables.clear(&self.phys, va)?;
            // Moved, the page no longer holds what a snapshot had at its new address.
            self.tables
                .set(&self.phys, target + (va - old), pte & !PTE_RESTORED)?;
            if self.maybe_cached(pte) {
                self.mark_stale(va)?;
            }
        }
        for mut piece in moved {
            piece.start = target + (piece.start - old);
            piece.end = target + (piece.end - old);
            self.vmas.insert(piece);
        }
        if old_len > keep {
            self.unmap(old + keep, old_len - keep)?;
        }
        if new_len > keep {
            let tail = area.grown_tail(old + keep, target + keep, target + new_len);
            self.vmas.insert(tail);
            self.populate_by_policy(target + keep, target + new_len);
        }
        Ok(target)
    }

    /// Drops the contents of `[addr, addr + len)` (madvise(MADV_DONTNEED)): anonymous pages
    /// read as zero afterwards, file pages as the file.
    pub fn discard(&mut self, addr: u64, len: u64) -> Result<(), Errno> {
        let len = page_up(len).ok_or(Errno::INVAL)?;
        let end = addr.checked_add(len).ok_or(Errno::INVAL)?;
        if !addr.is_multiple_of(PAGE) || end > USER_END {
            return Err(Errno::INVAL);
        }
        // Frames that follow each other in guest-physical memory are dropped with one host
        // call (a thread's stack, say, is megabytes of them).
        let mut run: Option<(u64, u64)> = None;
        for (va, pte) in self.tables.leaves(&self.phys, addr, end)? {
            let anonymous = matches!(
                self.vmas.get(va).map(|v| &v.backing),
                Some(Backing::Anonymous) | None
            );
            if anonymous {
                // The frame stays mapped; the host drops its contents and KVM its mapping.
                // It no longer holds what a snapshot has there.
                let frame = pte & PTE_FRAME;
                run = match run {
                    Some((start, len)) if start + len == frame => Some((start, len + PAGE)),
                    Some((start, len)) => {
                        self.phys.discard(start, len).map_err(internal)?;
                        Some((frame, PAGE))
                    }
                    None => Some((frame, PAGE)),
                };
                if pte & PTE_RESTORED != 0 {
                    self.tables.set(&self.phys, va, pte & !PTE_RESTORED)?;
                }
            } else {
                self.tables.clear(&self.phys, va)?;
                self.release_frames(&[(va, pte)])?;
            }
        }
        if let Some((start, len)) = run {
            self.phys.discard(start, len).map_err(internal)?;
        }
        Ok(())
    }

    // ---- brk -------------------------------------------------------------------------

    /// Sets where the heap starts (just past the program's highest segment).
    pub fn set_brk_start(&mut self, addr: u64) {
        self.brk_start = addr;
        self.brk = addr;
    }

    /// brk(2): moves the program break and returns the new (or unchanged) break.
    pub fn brk(&mut self, requested: u64) -> u64 {
        if requested < self.brk_start || requested > MMAP_BASE {
            return self.brk;
        }
        let (Some(old_top), Some(new_top)) = (page_up(self.brk), page_up(requested)) else {
            return self.brk;
        };
        if new_top > old_top {
            if !self.vmas.is_free(old_top, new_top) {
                return self.brk;
            }
            let mapped = self.map(
                Placement::FixedNoReplace(old_top),
                new_top - old_top,
                Prot::RW,
                Backing::Anonymous,
                VmaRole::Heap,
            );
            if mapped.is_err() {
                return self.brk;
            }
        } else if new_top < old_top && self.unmap(new_top, old_top - new_top).is_err() {
            return self.brk;
        }
        self.brk = requested;
        self.brk
    }

    // ---- faults and guest pointers ------------------------------------------------------

    /// Handles a page fault at `addr` for `access`: maps the page if an area allows it.
    pub fn handle_fault(&mut self, addr: u64, access: Access) -> Result<FaultResolution, Errno> {
        let Some(vma) = self.vmas.get(addr).cloned() else {
            return Ok(FaultResolution::Unmapped);
        };
        let needed = match access {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
            Access::Execute => Prot::EXEC,
        };
        // On x86 every mapped page is readable, so any protection but NONE allows reads.
        let allowed =
            vma.prot.contains(needed) || (access == Access::Read && vma.prot != Prot::NONE);
        if !allowed {
            return Ok(FaultResolution::Forbidden);
        }
        let page = page_down(addr);
        if self.tables.get(&self.phys, page)? & PTE_OWNED != 0 {
            // Mapped with the right permissions already: a stale shadow entry, which the
            // CPU refreshes on the next access.
            return Ok(FaultResolution::Resolved);
        }
        let window = FAULT_WINDOW_PAGES * PAGE;
        let lo = (page & !(window - 1)).max(vma.start);
        let hi = (lo + window).min(vma.end);
        self.populate(lo, hi)?;
        self.stats.demand_faults += 1;
        if self.tables.get(&self.phys, page)? & PTE_OWNED == 0 {
            // Only a shared file area leaves a page unmapped: it lies past the file's end.
            return Ok(FaultResolution::PastEndOfFile);
        }
        Ok(FaultResolution::Resolved)
    }

    /// The host address of the futex word at `va` when it lies in a shared area (mapping
    /// its page if need be), which other processes' VMMs see too; `None` for any other
    /// memory, whose futexes are this process's own. EFAULT when it cannot be read.
    /// `write`: the caller changes the word (FUTEX_WAKE_OP), which the app must be allowed.
    pub fn shared_word(&mut self, va: u64, write: bool) -> Result<Option<u64>, Errno> {
        if !matches!(
            self.vmas.get(va).map(|v| &v.backing),
            Some(Backing::Shared { .. })
        ) {
            return Ok(None);
        }
        let access = if write { Access::Write } else { Access::Read };
        let pieces = self.user_pieces(UserAddr(va), 4, access)?;
        let &[(gpa, 4)] = pieces.as_slice() else {
            return Err(Errno::INVAL);
        };
        let host = self.phys.host_addr(gpa).map_err(internal)?;
        Ok(Some(host as u64))
    }

    /// Guest-physical pieces of `[addr, addr + len)`, checked for `access` the way the CPU
    /// would check the app's own access, and mapped on demand. EFAULT for anything else.
    pub(super) fn user_pieces(
        &mut self,
        addr: UserAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<(u64, usize)>, Errno> {
        let start = addr.0;
        let end = start.checked_add(len as u64).ok_or(Errno::FAULT)?;
        if end > USER_END {
            return Err(Errno::FAULT);
        }
        let need = match access {
            Access::Write => PTE_PRESENT | PTE_WRITABLE | PTE_USER,
            _ => PTE_PRESENT | PTE_USER,
        };
        let mut pieces: Vec<(u64, usize)> = Vec::new();
        let mut at = start;
        while at < end {
            let page = page_down(at);
            let mut pte = self.tables.get(&self.phys, page)?;
            if pte & PTE_OWNED == 0 {
                if self.handle_fault(at, access)? != FaultResolution::Resolved {
                    return Err(Errno::FAULT);
                }
                pte = self.tables.get(&self.phys, page)?;
            }
            if pte & need != need {
                return Err(Errno::FAULT);
            }
            // The VMM writing app memory is the app writing it: mark the page dirty, as
            // the CPU would, so that snapshots see the change.
            if access == Access::Write && pte & PTE_DIRTY == 0 {
                self.tables.set(&self.phys, page, pte | PTE_DIRTY)?;
            }
            let chunk = ((page + PAGE).min(end) - at) as usize;
            let gpa = (pte & PTE_FRAME) + (at - page);
            match pieces.last_mut() {
                Some((last_gpa, last_len)) if *last_gpa + *last_len as u64 == gpa => {
                    *last_len += chunk
                }
                _ => pieces.push((gpa, chunk)),
            }
            at += chunk as u64;
        }
        Ok(pieces)
    }

    /// Copies `buf.len()` bytes of app memory at `addr` into `buf`.
    pub fn read(&mut self, addr: UserAddr, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0;
        for (gpa, len) in self.user_pieces(addr, buf.len(), Access::Read)? {
            self.phys
                .read(gpa, &mut buf[done..done + len])
                .map_err(internal)?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into app memory at `addr`, which must be writable by the app.
    pub fn write(&mut self, addr: UserAddr, data: &[u8]) -> Result<(), Errno> {
        let mut done = 0;
        for (gpa, len) in self.user_pieces(addr, data.len(), Access::Write)? {
            self.phys
                .write(gpa, &data[done..done + len])
                .map_err(internal)?;
            done += len;
        }
        Ok(())
    }

    /// Copies `data` into app memory at `addr` whatever its protection (the loader's
    /// access: it fills read-only segments and the initial stack). The pages must be
    /// mapped.
    pub fn poke(&mut self, addr: UserAddr, data: &[u8]) -> Result<(), Errno> {
        let mut at = addr.0;
        let mut done = 0;
        while done < data.len() {
            let page = page_down(at);
            let pte = self.tables.get(&self.phys, page)?;
            if pte & PTE_OWNED == 0 {
                self.populate(page, page + PAGE)?;
            }
            let pte = self.tables.get(&self.phys, page)?;
            if pte & PTE_OWNED == 0 {
                return Err(Errno::FAULT);
            }
            if pte & PTE_DIRTY == 0 {
                self.tables.set(&self.phys, page, pte | PTE_DIRTY)?;
            }
            let chunk = ((page + PAGE - at) as usize).min(data.len() - done);
            self.phys
                .write((pte & PTE_FRAME) + (at - page), &data[done..done + chunk])
                .map_err(internal)?;
            done += chunk;
            at += chunk as u64;
        }
        Ok(())
    }

    /// Host I/O vectors over `[addr, addr + len)` of app memory, checked for `access`, for
    /// zero-copy `readv`/`writev` between a host fd and the app's buffer. They stay valid
    /// until the address space is next changed.
    pub fn iovecs(
        &mut self,
        addr: UserAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<libc::iovec>, Errno> {
        let pieces = self.user_pieces(addr, len, access)?;
        self.host_iovecs_of(&pieces)
    }

    /// The host iovecs of guest-physical pieces `(gpa, len)`.
    pub(super) fn host_iovecs_of(
        &self,
        pieces: &[(u64, usize)],
    ) -> Result<Vec<libc::iovec>, Errno> {
        pieces
            .iter()
            .map(|&(gpa, len)| {
                let host = self.phys.host_addr(gpa).map_err(internal)?;
                Ok(libc::iovec {
                    iov_base: host.cast(),
                    iov_len: len,
                })
            })
            .collect()
    }

    /// Reads a NUL-terminated string of at most `max` bytes (without the NUL).
    pub fn read_cstr(&mut self, addr: UserAddr, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut at = addr.0;
        loop {
            let room = (PAGE - at % PAGE) as usize;
            let mut chunk = vec![0u8; room.min(max + 1 - out.len())];
            self.read(UserAddr(at), &mut chunk)?;
            if let Some(nul) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..nul]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
            if out.len() > max {
                return Err(Errno::NAMETOOLONG);
            }
            at += chunk.len() as u64;
        }
    }

    /// The leaf entry for `va` (0 if none), for diagnostics and tests.
    pub fn leaf(&mut self, va: u64) -> Result<u64, PhysError> {
        self.tables.get(&self.phys, va).map_err(|e| match e {
            PagingError::Phys(p) => p,
            _ => PhysError::OutOfRange { gpa: va },
        })
    }
}

impl Vma {
    /// An area like this one covering `[start, end)`, for the part of it that would have
    /// continued at `from` (an address in this area's own range): when an area grows, or
    /// grows as it moves, file offsets go on from where this one's would.
    fn grown_tail(&self, from: u64, start: u64, end: u64) -> Vma {
        let mut grown = self.clone();
        grown.backing.advance(from.saturating_sub(self.start));
        grown.start = start;
        grown.end = end;
        grown
    }
}

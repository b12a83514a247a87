//! The guest's 4-level, 4 KiB page tables, written by the VMM.
//!
//! The tables live in their own memory slot (see [`super::layout`]). The guest never maps
//! them, so only the VMM writes them, and the CPU (or kvm_pvm's shadow MMU) sets the
//! Accessed and Dirty bits.

use super::frames::FrameAllocator;
use super::layout;
use super::phys::{PhysError, PhysicalMemory};

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// User-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Accessed (set by the CPU).
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Dirty (set by the CPU).
pub const PTE_DIRTY: u64 = 1 << 6;
/// Software bit: the entry owns a RAM frame, even when not present (PROT_NONE).
pub const PTE_OWNED: u64 = 1 << 9;
/// Software bit: the frame still holds what the snapshot this app was restored from had
/// at this address (until the page is written, D = 1, or moved).
pub const PTE_RESTORED: u64 = 1 << 10;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;
/// The frame address bits.
pub const PTE_FRAME: u64 = 0x000f_ffff_ffff_f000;

/// Flags of every upper-level entry: the leaf decides the real permissions.
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

/// Why a page-table update failed.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The page-table slot is full.
    #[error("the page-table slot is full")]
    OutOfTables,
    /// An entry pointed outside guest memory (a VMM bug).
    #[error(transparent)]
    Phys(#[from] PhysError),
}

/// The page tables of one address space.
#[derive(Debug)]
pub struct PageTables {
    root: u64,
    frames: FrameAllocator,
    /// The last leaf table found: (virtual address >> 21, its guest-physical address).
    leaf_cache: Option<(u64, u64)>,
}

impl PageTables {
    /// Creates empty tables: one zeroed root in the page-table slot.
    pub fn new(phys: &PhysicalMemory) -> Result<Self, PagingError> {
        let mut frames =
            FrameAllocator::new(layout::PAGE_TABLES_GPA, phys.page_tables_size() / 4096);
        let root = frames.alloc().ok_or(PagingError::OutOfTables)?;
        Ok(Self {
            root,
            frames,
            leaf_cache: None,
        })
    }

    /// Guest-physical address of the root table (CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Table pages in use.
    pub fn tables_in_use(&self) -> u64 {
        self.frames.in_use()
    }

    /// Guest-physical address of the leaf entry for `va`, creating missing tables when
    /// `create` is set. `None` when a table is missing and `create` is not set.
    fn leaf_entry(
        &mut self,
        phys: &PhysicalMemory,
        va: u64,
        create: bool,
    ) -> Result<Option<u64>, PagingError> {
        let leaf_index = (va >> 12) & 0x1ff;
        if let Some((key, table)) = self.leaf_cache {
            if key == va >> 21 {
                return Ok(Some(table + leaf_index * 8));
            }
        }
        let mut table = self.root;
        for shift in [39u32, 30, 21] {
            let entry_gpa = table + ((va >> shift) & 0x1ff) * 8;
            let entry = phys.read_u64(entry_gpa)?;
            table = if entry & PTE_PRESENT != 0 {
                entry & PTE_FRAME
            } else if create {
                let fresh = self.frames.alloc().ok_or(PagingError::OutOfTables)?;
                phys.write(fresh, &[0u8; 4096])?;
                phys.write_u64(entry_gpa, fresh | TABLE_FLAGS)?;
                fresh
            } else {
                return Ok(None);
            };
        }
        self.leaf_cache = Some((va >> 21, table));
        Ok(Some(table + leaf_index * 8))
    }

    /// Guest-physical address of the leaf entry for `va`, if its table exists.
    pub fn entry_gpa(
        &mut self,
        phys: &PhysicalMemory,
        va: u64,
    ) -> Result<Option<u64>, PagingError> {
        self.leaf_entry(phys, va, false)
    }

    /// The leaf entry for `va`, or 0 when there is none.
    pub fn get(&mut self, phys: &PhysicalMemory, va: u64) -> Result<u64, PagingError> {
        match self.leaf_entry(phys, va, false)? {
            Some(gpa) => Ok(phys.read_u64(gpa)?),
            None => Ok(0),
        }
    }

    /// Sets the leaf entry for `va`, creating tables as needed.
    pub fn set(&mut self, phys: &PhysicalMemory, va: u64, pte: u64) -> Result<(), PagingError> {
        if pte == 0 {
            return self.clear(phys, va).map(drop);
        }
        // With `create` set, `leaf_entry` either finds the entry or fails.
        let gpa = self
            .leaf_entry(phys, va, true)?
            .ok_or(PagingError::OutOfTables)?;
        Ok(phys.write_u64(gpa, pte)?)
    }

    /// Sets the leaf entries of consecutive pages from `va` to `ptes` (all non-zero),
    /// walking to each leaf table once and writing its entries in one copy.
    pub fn set_run(
        &mut self,
        phys: &PhysicalMemory,
        va: u64,
        ptes: &[u64],
    ) -> Result<(), PagingError> {
        let mut done = 0usize;
        while done < ptes.len() {
            let at = va + done as u64 * 4096;
            let left_in_table = 512 - ((at >> 12) & 511) as usize;
            let n = left_in_table.min(ptes.len() - done);
            let gpa = self
                .leaf_entry(phys, at, true)?
                .ok_or(PagingError::OutOfTables)?;
            let bytes: Vec<u8> = ptes[done..done + n]
                .iter()
                .flat_map(|pte| pte.to_le_bytes())
                .collect();
            phys.write(gpa, &bytes)?;
            done += n;
        }
        Ok(())
    }

    /// The non-zero leaf entries for pages in `[start, end)`, in address order. Missing
    /// tables are skipped whole, so a walk over a huge, mostly empty range is cheap.
    pub fn leaves(
        &mut self,
        phys: &PhysicalMemory,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64)>, PagingError> {
        let mut found = Vec::new();
        self.collect_leaves(phys, self.root, 39, 0, start, end, &mut found)?;
        Ok(found)
    }

    #[allow(clippy::too_many_arguments)]
    fn collect_leaves(
        &self,
        phys: &PhysicalMemory,
        table: u64,
        shift: u32,
        table_base: u64,
        start: u64,
        end: u64,
        found: &mut Vec<(u64, u64)>,
    ) -> Result<(), PagingError> {
        let span = 1u64 << shift;
        for index in 0..512u64 {
            let lo = table_base + index * span;
            let hi = lo + span;
            if hi <= start || lo >= end {
                continue;
            }
            let entry = phys.read_u64(table + index * 8)?;
            if entry == 0 {
                continue;
            }
            if shift == 12 {
                found.push((lo, entry));
            } else if entry & PTE_PRESENT != 0 {
                let child = entry & PTE_FRAME;
                self.collect_leaves(phys, child, shift - 9, lo, start, end, found)?;
            }
        }
        Ok(())
    }

    /// Clears the leaf entry for `va` and returns what it held (0 if nothing).
    pub fn clear(&mut self, phys: &PhysicalMemory, va: u64) -> Result<u64, PagingError> {
        match self.leaf_entry(phys, va, false)? {
            Some(gpa) => {
                let old = phys.read_u64(gpa)?;
                if old != 0 {
                    phys.write_u64(gpa, 0)?;
                }
                Ok(old)
            }
            None => Ok(0),
        }
    }
}

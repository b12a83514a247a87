//! The guest's 4-level, 4 KiB page tables, written by the VMM.
//!
//! The tables live in their own memory slot (see [`super::layout`]). The guest never maps
//! them, so only the VMM writes them, and the CPU (or kvm_pvm's shadow MMU) sets the
//! Accessed and Dirty bits.

use super::frames::FrameAllocator;
use super::layout;
use super::phys::{PhysError, PhysicalMemory};
use picocenter_guest_shim::abi;

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
    /// A vCPU that has no tables (a VMM bug).
    #[error("vCPU {0} has no page tables")]
    NoSuchCpu(usize),
    /// A vCPU-local mapping outside the vCPU-local area (a VMM bug).
    #[error("{0:#x} is not in the vCPU-local area")]
    NotCpuLocal(u64),
    /// A shared mapping in the vCPU-local area (a VMM bug).
    #[error("{0:#x} is in the vCPU-local area, which every vCPU maps on its own")]
    NotShared(u64),
}

/// The page tables of one address space.
///
/// The *master* tables map everything the vCPUs share. Each vCPU runs on a root of its
/// own ([`PageTables::add_cpu`]): copies of the master's tables on the path to the
/// vCPU-local area ([`abi::CPU_LOCAL_VA`], one 2 MiB leaf table), which differ from the
/// master's only in the entry that leads to that vCPU's leaf table. Every entry the master
/// gains in those tables later (a new table for a user range, a file window's table) is
/// written to the copies too, so every vCPU sees the same memory but its own local pages.
/// Upper-level tables are never freed, so the copies never need an entry removed.
#[derive(Debug)]
pub struct PageTables {
    root: u64,
    frames: FrameAllocator,
    /// The last leaf table found: (virtual address >> 21, its guest-physical address).
    leaf_cache: Option<(u64, u64)>,
    /// The master's tables on the path to the vCPU-local area (PML4 = `root`, then the
    /// PDPT and the PD), once a vCPU root exists.
    local_path: Option<[u64; 3]>,
    /// Each vCPU's copies of those three tables and its own leaf table.
    cpus: Vec<CpuTables>,
}

/// One vCPU's own tables: its root (CR3), the PDPT and PD below it on the path to the
/// vCPU-local area, and that area's leaf table.
#[derive(Debug, Clone, Copy)]
struct CpuTables {
    path: [u64; 3],
    leaf: u64,
}

/// Table index, at each of the three upper levels, of the path to the vCPU-local area.
fn local_path_index() -> [u64; 3] {
    let va = abi::CPU_LOCAL_VA;
    [(va >> 39) & 0x1ff, (va >> 30) & 0x1ff, (va >> 21) & 0x1ff]
}

/// Whether `va` lies in the vCPU-local area, which only [`PageTables::set_cpu_local`] maps.
pub fn is_cpu_local(va: u64) -> bool {
    va >> 21 == abi::CPU_LOCAL_VA >> 21
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
            local_path: None,
            cpus: Vec::new(),
        })
    }

    /// Guest-physical address of the master root table. No vCPU runs on it: see
    /// [`PageTables::cpu_root`].
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Guest-physical address of vCPU `cpu`'s root table (its CR3), if it has one.
    pub fn cpu_root(&self, cpu: usize) -> Option<u64> {
        self.cpus.get(cpu).map(|tables| tables.path[0])
    }

    /// Number of vCPU roots.
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Makes the tables of one more vCPU (see [`PageTables`]) and returns its number.
    pub fn add_cpu(&mut self, phys: &PhysicalMemory) -> Result<usize, PagingError> {
        let path = match self.local_path {
            Some(path) => path,
            None => {
                // The master's path down to the PD that holds the local area's entry.
                let index = local_path_index();
                let mut path = [self.root, 0, 0];
                for level in 0..2 {
                    let entry_gpa = path[level] + index[level] * 8;
                    let entry = phys.read_u64(entry_gpa)?;
                    path[level + 1] = if entry & PTE_PRESENT != 0 {
                        entry & PTE_FRAME
                    } else {
                        let fresh = self.frames.alloc().ok_or(PagingError::OutOfTables)?;
                        phys.write(fresh, &[0u8; 4096])?;
                        phys.write_u64(entry_gpa, fresh | TABLE_FLAGS)?;
                        fresh
                    };
                }
                self.local_path = Some(path);
                path
            }
        };
        let mut own = [0u64; 4];
        for table in own.iter_mut() {
            *table = self.frames.alloc().ok_or(PagingError::OutOfTables)?;
        }
        let index = local_path_index();
        let mut page = [0u8; 4096];
        for level in 0..3 {
            phys.read(path[level], &mut page)?;
            let at = index[level] as usize * 8;
            page[at..at + 8].copy_from_slice(&(own[level + 1] | TABLE_FLAGS).to_le_bytes());
            phys.write(own[level], &page)?;
        }
        phys.write(own[3], &[0u8; 4096])?;
        self.cpus.push(CpuTables {
            path: [own[0], own[1], own[2]],
            leaf: own[3],
        });
        Ok(self.cpus.len() - 1)
    }

    /// Sets vCPU `cpu`'s leaf entry for `va`, a page of the vCPU-local area.
    pub fn set_cpu_local(
        &mut self,
        phys: &PhysicalMemory,
        cpu: usize,
        va: u64,
        pte: u64,
    ) -> Result<(), PagingError> {
        let tables = self.cpus.get(cpu).ok_or(PagingError::NoSuchCpu(cpu))?;
        if !is_cpu_local(va) {
            return Err(PagingError::NotCpuLocal(va));
        }
        Ok(phys.write_u64(tables.leaf + ((va >> 12) & 0x1ff) * 8, pte)?)
    }

    /// Writes a new entry of a master table to the vCPUs' copies of it, if it is one of
    /// the tables they copy (and not the entry that leads to their own).
    fn replicate(
        &self,
        phys: &PhysicalMemory,
        table: u64,
        index: u64,
        value: u64,
    ) -> Result<(), PagingError> {
        let Some(path) = self.local_path else {
            return Ok(());
        };
        let Some(level) = path.iter().position(|&t| t == table) else {
            return Ok(());
        };
        if local_path_index()[level] == index {
            return Ok(());
        }
        for cpu in &self.cpus {
            phys.write_u64(cpu.path[level] + index * 8, value)?;
        }
        Ok(())
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
        if create && is_cpu_local(va) {
            return Err(PagingError::NotShared(va));
        }
        let mut table = self.root;
        for shift in [39u32, 30, 21] {
            let index = (va >> shift) & 0x1ff;
            let entry_gpa = table + index * 8;
            let entry = phys.read_u64(entry_gpa)?;
            table = if entry & PTE_PRESENT != 0 {
                entry & PTE_FRAME
            } else if create {
                let fresh = self.frames.alloc().ok_or(PagingError::OutOfTables)?;
                phys.write(fresh, &[0u8; 4096])?;
                phys.write_u64(entry_gpa, fresh | TABLE_FLAGS)?;
                self.replicate(phys, table, index, fresh | TABLE_FLAGS)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaf entry for `va` found by walking from `root`, as the CPU would.
    fn walk(phys: &PhysicalMemory, root: u64, va: u64) -> Option<u64> {
        let mut table = root;
        for shift in [39u32, 30, 21] {
            let entry = phys.read_u64(table + ((va >> shift) & 0x1ff) * 8).unwrap();
            if entry & PTE_PRESENT == 0 {
                return None;
            }
            table = entry & PTE_FRAME;
        }
        Some(phys.read_u64(table + ((va >> 12) & 0x1ff) * 8).unwrap()).filter(|&e| e != 0)
    }

    #[test]
    fn each_vcpu_sees_its_own_local_pages_and_every_shared_mapping() {
        let phys = PhysicalMemory::new(4 << 20).unwrap();
        let mut tables = PageTables::new(&phys).unwrap();
        let early_user = 0x40_0000u64;
        tables.set(&phys, early_user, 0x1000 | PTE_PRESENT).unwrap();
        let first = tables.add_cpu(&phys).unwrap();
        let second = tables.add_cpu(&phys).unwrap();
        assert_eq!((first, second), (0, 1));
        let roots = [tables.cpu_root(0).unwrap(), tables.cpu_root(1).unwrap()];
        assert_ne!(roots[0], roots[1]);
        assert!(roots.iter().all(|&r| r != tables.root()));

        // Mappings made after the vCPUs' tables: new tables at every level of the user
        // half, a shared system page and a file window's page (new entries in the copied
        // PDPT and PD).
        let late_user = 0x7f00_0000_0000u64;
        let window = abi::file_table::WINDOWS_VA + 5 * abi::file_table::WINDOW_SIZE;
        for (va, frame) in [
            (late_user, 0x2000),
            (abi::SYSTEM_VA, 0x3000),
            (window, 0x4000),
        ] {
            tables.set(&phys, va, frame | PTE_PRESENT).unwrap();
        }
        for root in roots.into_iter().chain([tables.root()]) {
            assert_eq!(walk(&phys, root, early_user), Some(0x1000 | PTE_PRESENT));
            assert_eq!(walk(&phys, root, late_user), Some(0x2000 | PTE_PRESENT));
            assert_eq!(
                walk(&phys, root, abi::SYSTEM_VA),
                Some(0x3000 | PTE_PRESENT)
            );
            assert_eq!(walk(&phys, root, window), Some(0x4000 | PTE_PRESENT));
        }

        // Each vCPU's own page, at the same address.
        for (cpu, frame) in [(0, 0x5000), (1, 0x6000)] {
            tables
                .set_cpu_local(&phys, cpu, abi::SCRATCH_VA, frame | PTE_PRESENT)
                .unwrap();
        }
        assert_eq!(
            walk(&phys, roots[0], abi::SCRATCH_VA),
            Some(0x5000 | PTE_PRESENT)
        );
        assert_eq!(
            walk(&phys, roots[1], abi::SCRATCH_VA),
            Some(0x6000 | PTE_PRESENT)
        );
        assert_eq!(walk(&phys, tables.root(), abi::SCRATCH_VA), None);

        // The local area is each vCPU's alone: the shared tables refuse it, and a vCPU's
        // own mapping must be in it.
        assert!(matches!(
            tables.set(&phys, abi::SCRATCH_VA, 0x7000 | PTE_PRESENT),
            Err(PagingError::NotShared(_))
        ));
        assert!(matches!(
            tables.set_cpu_local(&phys, 0, abi::SYSTEM_VA, 0x7000 | PTE_PRESENT),
            Err(PagingError::NotCpuLocal(_))
        ));
        assert!(matches!(
            tables.set_cpu_local(&phys, 2, abi::SCRATCH_VA, 0x7000 | PTE_PRESENT),
            Err(PagingError::NoSuchCpu(2))
        ));
    }
}

//! Guest-physical memory: the host mappings behind the three memory slots.

use super::layout::{self, slot};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion, VolatileSlice,
};

/// Why guest-physical memory could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum PhysError {
    /// The host refused to reserve the mapping.
    #[error("reserving {size} bytes of guest memory")]
    Reserve {
        /// Bytes asked for.
        size: u64,
        /// What mmap said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The requested RAM size is zero, unaligned or too large.
    #[error("guest RAM must be a non-zero multiple of 2 MiB up to {max} bytes, not {size}")]
    BadRamSize {
        /// Bytes asked for.
        size: u64,
        /// Largest supported size.
        max: u64,
    },
    /// The regions overlap (a layout bug).
    #[error("building the guest memory map")]
    Layout(#[from] vm_memory::GuestRegionCollectionError),
    /// A VMM-internal access fell outside guest memory (a VMM bug, never a guest action).
    #[error("guest-physical access at {gpa:#x} is outside guest memory")]
    OutOfRange {
        /// The address.
        gpa: u64,
    },
}

/// One KVM memory slot: what to pass to `KVM_SET_USER_MEMORY_REGION`.
#[derive(Debug, Clone, Copy)]
pub struct SlotInfo {
    /// Slot number.
    pub slot: u32,
    /// Guest-physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
}

/// The host mappings of a picoprocess's guest-physical memory.
#[derive(Debug)]
pub struct PhysicalMemory {
    mem: GuestMemoryMmap,
    ram_size: u64,
    page_tables_size: u64,
}

impl PhysicalMemory {
    /// A handle that keeps the guest's memory mapped for as long as it lives (for a host
    /// transfer made without the process lock).
    pub fn keep_mapped(&self) -> KeptMapping {
        KeptMapping(self.mem.clone())
    }

    /// Reserves `ram_size` bytes of RAM plus the system and page-table slots. Nothing is
    /// committed until touched (MAP_NORESERVE).
    pub fn new(ram_size: u64) -> Result<Self, PhysError> {
        if ram_size == 0 || !ram_size.is_multiple_of(2 << 20) || ram_size > layout::MAX_RAM_SIZE {
            return Err(PhysError::BadRamSize {
                size: ram_size,
                max: layout::MAX_RAM_SIZE,
            });
        }
        let page_tables_size = layout::page_tables_size(ram_size);
        let region = |gpa: u64, size: u64| -> Result<GuestRegionMmap, PhysError> {
            let mapping = MmapRegion::new(size as usize)
                .map_err(|source| PhysError::Reserve { size, source })?;
            // `new` only fails when the region would wrap the address space.
            GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or(PhysError::OutOfRange { gpa: gpa + size })
        };
        let mem = GuestMemoryMmap::from_regions(vec![
            region(layout::RAM_GPA, ram_size)?,
            region(layout::SYSTEM_GPA, layout::SYSTEM_SLOT_SIZE)?,
            region(layout::PAGE_TABLES_GPA, page_tables_size)?,
        ])?;
        Ok(Self {
            mem,
            ram_size,
            page_tables_size,
        })
    }

    /// Bytes of app RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Bytes of the page-table slot.
    pub fn page_tables_size(&self) -> u64 {
        self.page_tables_size
    }

    /// The slots to register with KVM, in slot order.
    pub fn slots(&self) -> [SlotInfo; 3] {
        let info = |slot: u32, gpa: u64, size: u64| SlotInfo {
            slot,
            gpa,
            size,
            host_addr: self
                .mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .unwrap_or(0),
        };
        [
            info(slot::RAM, layout::RAM_GPA, self.ram_size),
            info(slot::SYSTEM, layout::SYSTEM_GPA, layout::SYSTEM_SLOT_SIZE),
            info(
                slot::PAGE_TABLES,
                layout::PAGE_TABLES_GPA,
                self.page_tables_size,
            ),
        ]
    }

    /// Reads a little-endian u64 (a page-table entry).
    pub fn read_u64(&self, gpa: u64) -> Result<u64, PhysError> {
        self.mem
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// Writes a little-endian u64 (a page-table entry).
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), PhysError> {
        self.mem
            .write_obj(value, GuestAddress(gpa))
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// Copies `data` to guest-physical `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), PhysError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// Copies guest-physical `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PhysError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// A volatile view of `len` bytes at `gpa`, which must not cross a slot boundary.
    pub fn slice(&self, gpa: u64, len: usize) -> Result<VolatileSlice<'_>, PhysError> {
        self.mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// Host address of guest-physical `gpa`.
    pub fn host_addr(&self, gpa: u64) -> Result<*mut u8, PhysError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| PhysError::OutOfRange { gpa })
    }

    /// A view of the guest page at `gpa` for a VMM thread that talks to the running guest
    /// through it (the mailbox). It keeps the mapping alive by itself.
    pub fn shared_page(&self, gpa: u64) -> Result<SharedPage, PhysError> {
        let region = self
            .mem
            .find_region(GuestAddress(gpa))
            .ok_or(PhysError::OutOfRange { gpa })?;
        let offset = gpa - region.start_addr().0;
        if !gpa.is_multiple_of(4096) || offset + 4096 > region.len() {
            return Err(PhysError::OutOfRange { gpa });
        }
        Ok(SharedPage {
            mapping: region.get_mmap(),
            offset: offset as usize,
        })
    }

    /// Returns RAM pages to the host: afterwards they are fresh anonymous zero pages,
    /// whatever backed them (anonymous memory or a private file mapping, see
    /// [`Self::map_file`]). KVM drops its own mappings of them through the MMU notifier,
    /// so the guest sees zeros too.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), PhysError> {
        let slice = self.slice(gpa, len as usize)?;
        let guard = slice.ptr_guard_mut();
        // SAFETY: the range is page-aligned and inside one of our own mappings (checked by
        // `slice`); replacing it with fresh anonymous memory changes only its contents,
        // which no Rust reference is borrowing across this call.
        let mapped = unsafe {
            libc::mmap(
                guard.as_ptr().cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(PhysError::OutOfRange { gpa });
        }
        Ok(())
    }

    /// Faults `[gpa, gpa + len)` in writable now (MADV_POPULATE_WRITE): a private file
    /// mapping gets its own copies, anonymous memory its pages.
    pub fn populate_write(&self, gpa: u64, len: u64) -> Result<(), PhysError> {
        let slice = self.slice(gpa, len as usize)?;
        let guard = slice.ptr_guard_mut();
        // SAFETY: the range is inside our own mapping (checked by `slice`); populating
        // changes no contents.
        let rc = unsafe {
            libc::madvise(
                guard.as_ptr().cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            return Err(PhysError::OutOfRange { gpa });
        }
        Ok(())
    }

    /// Makes RAM `[gpa, gpa + len)` a private (copy-on-write) mapping of `len` bytes of
    /// `file` at `offset`: the guest reads the host's page cache with no copy, and its
    /// writes stay its own. The file must not shrink while mapped (the VMM only does this
    /// for files in the read-only root).
    pub fn map_file(
        &self,
        gpa: u64,
        len: u64,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), PhysError> {
        use std::os::fd::AsRawFd;
        let slice = self.slice(gpa, len as usize)?;
        let guard = slice.ptr_guard_mut();
        // SAFETY: the range is page-aligned and inside our RAM mapping (checked by
        // `slice`); MAP_FIXED replaces only those pages, which hold no Rust references.
        let mapped = unsafe {
            libc::mmap(
                guard.as_ptr().cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as i64,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(PhysError::OutOfRange { gpa });
        }
        Ok(())
    }
}

/// Keeps the guest's memory mapped (see [`PhysicalMemory::keep_mapped`]).
#[derive(Debug, Clone)]
pub struct KeptMapping(#[allow(dead_code)] GuestMemoryMmap);

/// One guest page shared with a running guest, accessed only through atomics, since the
/// guest reads and writes it concurrently.
#[derive(Debug, Clone)]
pub struct SharedPage {
    mapping: Arc<MmapRegion>,
    offset: usize,
}

impl SharedPage {
    fn field(&self, offset: u64, size: usize) -> *mut u8 {
        assert!(
            offset as usize + size <= 4096 && (offset as usize).is_multiple_of(size),
            "shared-page field {offset} out of the page or misaligned"
        );
        // The page lies inside the mapping (checked when the view was made).
        self.mapping
            .as_ptr()
            .wrapping_add(self.offset + offset as usize)
    }

    /// The u32 at byte `offset` (4-byte aligned).
    pub fn u32(&self, offset: u64) -> &AtomicU32 {
        // SAFETY: the field is inside a live mapping this view keeps alive (`mapping`), is
        // aligned (checked in `field`), and is only ever accessed atomically by the VMM;
        // the guest's own accesses are plain aligned loads and stores or `lock` ops, which
        // are atomic on x86.
        unsafe { AtomicU32::from_ptr(self.field(offset, 4).cast()) }
    }

    /// The u64 at byte `offset` (8-byte aligned).
    pub fn u64(&self, offset: u64) -> &AtomicU64 {
        // SAFETY: as for `u32`, with 8-byte alignment.
        unsafe { AtomicU64::from_ptr(self.field(offset, 8).cast()) }
    }
}

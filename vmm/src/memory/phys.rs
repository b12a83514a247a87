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
        if let Ok(ram) = mem.get_host_address(GuestAddress(layout::RAM_GPA)) {
            lost_pages::watch(ram as u64, ram_size);
        }
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

    /// Makes RAM `[gpa, gpa + len)` a mapping of `len` bytes of `file` at `offset`, so that
    /// the guest reads the host's page cache with no copy:
    /// * [`FileSharing::Private`]: copy-on-write, the guest's writes stay its own. The file
    ///   must not shrink while mapped (the VMM only does this for files in the read-only
    ///   root);
    /// * [`FileSharing::Shared`]: the guest's writes reach the file, and a host fork of this
    ///   VMM keeps sharing the pages. The file must be open for writing, and the range must
    ///   lie within the file's size.
    pub fn map_file(
        &self,
        gpa: u64,
        len: u64,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        sharing: FileSharing,
    ) -> Result<(), PhysError> {
        use std::os::fd::AsRawFd;
        let slice = self.slice(gpa, len as usize)?;
        let guard = slice.ptr_guard_mut();
        let offset = i64::try_from(offset).map_err(|_| PhysError::OutOfRange { gpa })?;
        let kind = match sharing {
            FileSharing::Private => libc::MAP_PRIVATE,
            FileSharing::Shared => libc::MAP_SHARED,
        };
        // SAFETY: the range is page-aligned and inside our RAM mapping (checked by
        // `slice`); MAP_FIXED replaces only those pages, which hold no Rust references.
        let mapped = unsafe {
            libc::mmap(
                guard.as_ptr().cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                kind | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(PhysError::OutOfRange { gpa });
        }
        Ok(())
    }
}

impl Drop for PhysicalMemory {
    fn drop(&mut self) {
        if let Ok(ram) = self.mem.get_host_address(GuestAddress(layout::RAM_GPA)) {
            lost_pages::unwatch(ram as u64);
        }
    }
}

/// Pages of a shared file mapping whose file shrank under them.
///
/// Guest RAM frames can be the pages of a file the app maps shared
/// ([`FileSharing::Shared`]). If the file then shrinks (the app truncates it, or another
/// process of the app does), touching such a page raises SIGBUS in whoever touches it. The
/// guest's own access makes `KVM_RUN` fail, which ends the app as Linux's SIGBUS would;
/// but the VMM touches guest memory too, in the calls it performs, and a SIGBUS must not
/// end the VMM. So a SIGBUS at an address in guest RAM replaces that page with a zero page
/// (as the frame would be had it never been mapped from the file) and the access goes on.
/// Anything else keeps the default action.
mod lost_pages {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Once;

    /// Host ranges of guest RAM in this process: (start, length), start 0 when free. A
    /// process has one picoprocess; unit tests make several at once.
    static RANGES: [(AtomicU64, AtomicU64); 64] =
        [const { (AtomicU64::new(0), AtomicU64::new(0)) }; 64];
    static INSTALL: Once = Once::new();

    pub(super) fn watch(start: u64, len: u64) {
        INSTALL.call_once(install);
        for (slot_start, slot_len) in &RANGES {
            if slot_start
                .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                slot_len.store(len, Ordering::SeqCst);
                return;
            }
        }
        tracing::warn!("more than 64 guest memories in one process: a shrunk shared file is fatal");
    }

    pub(super) fn unwatch(start: u64) {
        for (slot_start, slot_len) in &RANGES {
            if slot_start.load(Ordering::SeqCst) == start {
                slot_len.store(0, Ordering::SeqCst);
                slot_start.store(0, Ordering::SeqCst);
                return;
            }
        }
    }

    fn in_guest_ram(addr: u64) -> bool {
        RANGES.iter().any(|(start, len)| {
            let start = start.load(Ordering::SeqCst);
            start != 0 && addr >= start && addr - start < len.load(Ordering::SeqCst)
        })
    }

    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as u64;
        if in_guest_ram(addr) {
            // SAFETY: the page lies in a guest RAM mapping this process made (checked
            // above); replacing it gives the faulting access a zero page to complete on.
            // mmap is async-signal-safe.
            let mapped = unsafe {
                libc::mmap(
                    (addr & !4095) as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                return;
            }
        }
        // Not guest memory: the default action, when the access faults again.
        // SAFETY: signal() with SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }

    fn install() {
        // SAFETY: a sigaction with a handler of the right signature and SA_SIGINFO; the
        // handler only reads atomics and calls mmap or signal.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
                tracing::warn!("no SIGBUS handler: a shrunk shared file is fatal");
            }
        }
    }
}

/// How [`PhysicalMemory::map_file`] maps a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSharing {
    /// Copy-on-write.
    Private,
    /// The file's own pages.
    Shared,
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

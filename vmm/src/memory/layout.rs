//! Guest-physical layout and the KVM memory slots that back it.
//!
//! Three slots, so that each can be re-registered or replaced on its own:
//!
//! | slot | what | guest-physical |
//! |---|---|---|
//! | 0 | app RAM, one host mapping (anonymous, MAP_NORESERVE) | `0 .. ram_size` |
//! | 1 | the VMM's system pages (GDT, IDT, TSS, stubs, doorbell), then each vCPU's own (stacks, scratch, mailbox) | [`SYSTEM_GPA`] |
//! | 2 | page tables, alone so that re-registering it is cheap on kvm_pvm | [`PAGE_TABLES_GPA`] |
//!
//! The doorbell's MMIO page ([`picocenter_guest_shim::abi::DOORBELL_MMIO_GPA`]) lies above all
//! three, outside every slot.

use picocenter_guest_shim::abi;

/// Guest-physical base of app RAM.
pub const RAM_GPA: u64 = 0;
/// Largest app RAM: everything below [`SYSTEM_GPA`].
pub const MAX_RAM_SIZE: u64 = SYSTEM_GPA;
/// Guest-physical base of the system pages.
pub const SYSTEM_GPA: u64 = 0x4_0000_0000;
/// Most vCPUs a picoprocess can have: each has [`abi::cpu_local::PAGES`] pages of its own
/// in the system slot, after the shared ones.
pub const MAX_VCPUS: u64 = 64;
/// Bytes of the system slot: the shared system pages, then every vCPU's own.
pub const SYSTEM_SLOT_SIZE: u64 =
    (abi::SYSTEM_PAGES + MAX_VCPUS * abi::cpu_local::PAGES) * abi::PAGE_SIZE;
/// The vCPU an app starts on (today, the only one it has).
pub const FIRST_CPU: u64 = 0;
/// Guest-physical address of page `page` (an [`abi::cpu_local`] index) of vCPU `cpu`'s
/// own pages. `cpu` must be below [`MAX_VCPUS`].
pub const fn cpu_local_gpa(cpu: u64, page: u64) -> u64 {
    SYSTEM_GPA + (abi::SYSTEM_PAGES + cpu * abi::cpu_local::PAGES + page) * abi::PAGE_SIZE
}
// The vCPUs' own pages end below the page-table slot.
const _: () = assert!(SYSTEM_GPA + SYSTEM_SLOT_SIZE <= PAGE_TABLES_GPA);
/// Guest-physical base of the page-table slot.
pub const PAGE_TABLES_GPA: u64 = 0x4_0040_0000;
/// Largest page-table slot (it must stay below the doorbell's MMIO page).
pub const MAX_PAGE_TABLES_SIZE: u64 = abi::DOORBELL_MMIO_GPA - PAGE_TABLES_GPA;

/// KVM memory slot numbers.
pub mod slot {
    /// App RAM.
    pub const RAM: u32 = 0;
    /// System pages.
    pub const SYSTEM: u32 = 1;
    /// Page tables.
    pub const PAGE_TABLES: u32 = 2;
}

/// Size of the page-table slot for `ram_size` bytes of RAM.
///
/// Dense mappings need one table page per 2 MiB; sparse ones (stack, heap, libraries, each
/// far apart) need a few upper-level pages each. Twice the dense need plus 2 MiB is ample for
/// real programs; running out gives the guest ENOMEM, never a crash.
pub fn page_tables_size(ram_size: u64) -> u64 {
    (ram_size / 256 + (2 << 20)).min(MAX_PAGE_TABLES_SIZE)
}

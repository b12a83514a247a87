//! The VMM's machinery inside the guest: GDT, IDT, TSS, exception stubs and the doorbell,
//! written into the system slot and mapped at the top of the address space.
//!
//! Each vCPU has pages of its own at the same addresses (ring-0 and double-fault stacks,
//! the doorbell's scratch page, the mailbox) through page tables of its own (see
//! [`crate::memory::paging::PageTables`]); so one GDT, IDT and TSS serve them all.
//!
//! Everything here is rebuilt at every start and restore; none of it is in a snapshot.

use crate::memory::layout::{cpu_local_gpa, MAX_VCPUS, SYSTEM_GPA};
use crate::memory::paging::{PagingError, PTE_NX, PTE_USER, PTE_WRITABLE};
use crate::memory::phys::PhysError;
use crate::memory::AddressSpace;
use picocenter_guest_shim::abi::{self, selector};

/// GDT limit: 8 eight-byte slots plus the 16-byte TSS descriptor at 0x40.
pub const GDT_LIMIT: u16 = 0x4f;
/// IDT limit: one 16-byte gate per stub.
pub const IDT_LIMIT: u16 = (abi::STUB_COUNT * 16 - 1) as u16;
/// TSS limit (a 64-bit TSS without an I/O bitmap).
pub const TSS_LIMIT: u32 = 0x67;

/// Why the system pages could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SystemPagesError {
    /// Writing a page failed.
    #[error("writing the system pages")]
    Write(#[from] PhysError),
    /// Mapping a page failed.
    #[error("mapping the system pages")]
    Map(#[from] PagingError),
    /// Every vCPU the layout has room for exists.
    #[error("a picoprocess has at most {MAX_VCPUS} vCPUs")]
    TooManyCpus,
    /// A vCPU whose tables were never made (a VMM bug).
    #[error("vCPU {0} has no page tables")]
    NoSuchCpu(u64),
}

/// Guest-physical address of vCPU `cpu`'s root page table: its CR3.
pub fn cpu_root(space: &AddressSpace, cpu: u64) -> Result<u64, SystemPagesError> {
    space
        .cpu_root(cpu as usize)
        .ok_or(SystemPagesError::NoSuchCpu(cpu))
}

fn page_va(page: u64) -> u64 {
    abi::SYSTEM_VA + page * abi::PAGE_SIZE
}

fn page_gpa(page: u64) -> u64 {
    SYSTEM_GPA + page * abi::PAGE_SIZE
}

/// Guest-virtual address of page `page` (an [`abi::cpu_local`] index) of the vCPU-local
/// area.
fn local_va(page: u64) -> u64 {
    abi::CPU_LOCAL_VA + page * abi::PAGE_SIZE
}

/// A code or data segment descriptor: flags in bits 52..55, access byte in 40..47.
const fn segment(access: u64, flags: u64) -> u64 {
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The GDT in Linux's layout (STAR's selectors depend on it). Accessed bits are preset so
/// the CPU never writes the table.
fn gdt() -> [u64; 10] {
    let tss = page_va(abi::TSS_PAGE);
    let tss_low = TSS_LIMIT as u64
        | ((tss & 0xff_ffff) << 16)
        | (0x8b << 40) // present, type 0xb: busy 64-bit TSS
        | (((tss >> 24) & 0xff) << 56);
    let mut table = [0u64; 10];
    table[(selector::KERNEL_CS >> 3) as usize] = segment(0x9b, 0xa); // DPL 0 code, L
    table[(selector::KERNEL_DS >> 3) as usize] = segment(0x93, 0xc); // DPL 0 data
    table[(selector::USER_CS32 >> 3) as usize] = segment(0xfb, 0xc); // DPL 3 code, D
    table[(selector::USER_DS >> 3) as usize] = segment(0xf3, 0xc); // DPL 3 data
    table[(selector::USER_CS >> 3) as usize] = segment(0xfb, 0xa); // DPL 3 code, L
    table[(selector::TSS >> 3) as usize] = tss_low;
    table[(selector::TSS >> 3) as usize + 1] = tss >> 32;
    table
}

/// One 64-bit interrupt gate to `handler`.
fn gate(handler: u64, dpl: u64, ist: u64) -> [u64; 2] {
    let low = (handler & 0xffff)
        | ((selector::KERNEL_CS as u64) << 16)
        | (ist << 32)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The IDT: every vector goes to its stub. Breakpoint and overflow gates are DPL 3, so that
/// `int3` and `into` from the app arrive as themselves rather than as #GP. Every gate
/// switches stacks through the IST, so a frame always lands on the ring-0 stack even when
/// the exception interrupts the doorbell at CPL 0 (hardware KVM), never on the app's
/// stack; the double fault has a stack of its own (IST2).
fn idt() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(abi::STUB_COUNT as usize * 16);
    for vector in 0..abi::STUB_COUNT {
        let handler = abi::STUBS_VA + vector * abi::STUB_SIZE;
        let dpl = if vector == 3 || vector == 4 { 3 } else { 0 };
        let ist = if vector == 8 { 2 } else { 1 };
        for word in gate(handler, dpl, ist) {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
    }
    bytes
}

/// The TSS: RSP0 and IST1 at the top of the ring-0 stack, IST2 for double faults, no I/O
/// bitmap.
fn tss() -> [u8; 104] {
    let mut bytes = [0u8; 104];
    let rsp0 = kernel_stack_top();
    let ist2 = local_va(abi::cpu_local::IST_STACK_PAGE + 1);
    bytes[4..12].copy_from_slice(&rsp0.to_le_bytes());
    bytes[36..44].copy_from_slice(&rsp0.to_le_bytes());
    bytes[44..52].copy_from_slice(&ist2.to_le_bytes());
    bytes[102..104].copy_from_slice(&104u16.to_le_bytes());
    bytes
}

/// Guest-virtual address of the top of the ring-0 stack (where exception frames land).
pub fn kernel_stack_top() -> u64 {
    local_va(abi::cpu_local::KERNEL_STACK_PAGE + abi::cpu_local::KERNEL_STACK_PAGES)
}

/// The guest-physical address behind `va` of the vCPU-local area for vCPU `cpu`, if `va`
/// lies in one of its pages.
pub fn cpu_local_address(cpu: usize, va: u64) -> Option<u64> {
    let offset = va.checked_sub(abi::CPU_LOCAL_VA)?;
    let page = offset / abi::PAGE_SIZE;
    (page < abi::cpu_local::PAGES && (cpu as u64) < MAX_VCPUS)
        .then(|| cpu_local_gpa(cpu as u64, page) + offset % abi::PAGE_SIZE)
}

/// Writes the PTE writer's list: for each (guest-physical address of an entry in the
/// page-table slot, value), the entry's address in the window and the value. Returns the
/// list's guest-virtual address and length, or `None` if it does not fit.
pub fn write_pte_list(
    space: &AddressSpace,
    entries: &[(u64, u64)],
) -> Result<Option<(u64, u64)>, PhysError> {
    if entries.is_empty() || entries.len() * 16 > abi::PAGE_SIZE as usize {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(entries.len() * 16);
    for &(gpa, value) in entries {
        let va = abi::PAGE_TABLE_WINDOW_VA + (gpa - crate::memory::layout::PAGE_TABLES_GPA);
        bytes.extend_from_slice(&va.to_le_bytes());
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    space.phys().write(page_gpa(abi::PTE_LIST_PAGE), &bytes)?;
    Ok(Some((page_va(abi::PTE_LIST_PAGE), entries.len() as u64)))
}

/// Writes the system pages and maps them, then makes vCPU 0's tables and pages (see
/// [`add_cpu`]). All are supervisor-only except the doorbell and the vDSO (user, read +
/// execute), the time page and the file table (user, read-only) and the MMIO pages (user,
/// writable, outside every slot).
pub fn install(space: &mut AddressSpace, nx_enabled: bool) -> Result<(), SystemPagesError> {
    let phys = space.phys();
    let gdt_bytes: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    phys.write(page_gpa(abi::GDT_PAGE), &gdt_bytes)?;
    phys.write(page_gpa(abi::IDT_PAGE), &idt())?;
    phys.write(page_gpa(abi::TSS_PAGE), &tss())?;
    phys.write(
        page_gpa(abi::STUBS_PAGE),
        picocenter_guest_shim::exception_stubs_code(),
    )?;
    phys.write(
        page_gpa(abi::DOORBELL_PAGE),
        picocenter_guest_shim::doorbell_code(),
    )?;
    phys.write(page_gpa(abi::VDSO_PAGE), crate::vdso::image())?;

    let nx = if nx_enabled { PTE_NX } else { 0 };
    let data = PTE_WRITABLE | nx;
    let mut pages = vec![
        (abi::GDT_PAGE, data),
        (abi::IDT_PAGE, nx),
        (abi::TSS_PAGE, data),
        (abi::STUBS_PAGE, 0),
        (abi::DOORBELL_PAGE, PTE_USER),
        (abi::VDSO_PAGE, PTE_USER),
        (abi::TIME_PAGE, PTE_USER | nx),
        (abi::PTE_LIST_PAGE, data),
    ];
    for i in 0..abi::FILE_TABLE_PAGES {
        pages.push((abi::FILE_TABLE_PAGE + i, PTE_USER | nx));
    }
    for (page, flags) in pages {
        space.map_system_page(page_va(page), page_gpa(page), flags)?;
    }
    let mmio = PTE_USER | PTE_WRITABLE | nx;
    space.map_system_page(abi::DOORBELL_MMIO_VA, abi::DOORBELL_MMIO_GPA, mmio)?;
    space.map_system_page(abi::CALIBRATION_MMIO_VA, abi::CALIBRATION_MMIO_GPA, mmio)?;
    space.map_system_page(abi::NOTIFY_MMIO_VA, abi::NOTIFY_MMIO_GPA, mmio)?;
    // The page-table slot, for the PTE writer (supervisor only).
    let tables = space.phys().page_tables_size();
    for offset in (0..tables).step_by(abi::PAGE_SIZE as usize) {
        let va = abi::PAGE_TABLE_WINDOW_VA + offset;
        space.map_system_page(va, crate::memory::layout::PAGE_TABLES_GPA + offset, data)?;
    }
    let first = add_cpu(space, nx_enabled)?;
    debug_assert_eq!(first, 0);
    Ok(())
}

/// Makes one more vCPU's page tables and maps its own pages (zeroed): the ring-0 and
/// double-fault stacks (supervisor), the scratch page and the mailbox (user, writable).
/// Returns its number; its CR3 is [`AddressSpace::cpu_root`].
pub fn add_cpu(space: &mut AddressSpace, nx: bool) -> Result<usize, SystemPagesError> {
    use abi::cpu_local;
    if space.cpus() as u64 >= MAX_VCPUS {
        return Err(SystemPagesError::TooManyCpus);
    }
    let cpu = space.add_cpu()?;
    let nx = if nx { PTE_NX } else { 0 };
    let data = PTE_WRITABLE | nx;
    let mut pages = vec![
        (cpu_local::IST_STACK_PAGE, data),
        (cpu_local::SCRATCH_PAGE, PTE_USER | data),
        (cpu_local::MAILBOX_PAGE, PTE_USER | data),
    ];
    for i in 0..cpu_local::KERNEL_STACK_PAGES {
        pages.push((cpu_local::KERNEL_STACK_PAGE + i, data));
    }
    for (page, flags) in pages {
        let gpa = cpu_local_gpa(cpu as u64, page);
        space.phys().write(gpa, &[0u8; 4096])?;
        space.map_cpu_local_page(cpu, local_va(page), gpa, flags)?;
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_matches_linux_layout() {
        let table = gdt();
        assert_eq!(table[2], 0x00af9b000000ffff, "kernel CS");
        assert_eq!(table[3], 0x00cf93000000ffff, "kernel DS");
        assert_eq!(table[5], 0x00cff3000000ffff, "user DS");
        assert_eq!(table[6], 0x00affb000000ffff, "user CS");
    }

    #[test]
    fn gate_encodes_handler_and_selector() {
        let [low, high] = gate(0xffff_ffff_8000_3008, 3, 1);
        assert_eq!(low & 0xffff, 0x3008);
        assert_eq!((low >> 16) & 0xffff, 0x10);
        assert_eq!((low >> 32) & 0x7, 1);
        assert_eq!((low >> 40) & 0xff, 0xee);
        assert_eq!(low >> 48, 0x8000);
        assert_eq!(high, 0xffff_ffff);
    }
}

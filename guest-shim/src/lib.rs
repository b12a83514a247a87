//! The in-guest code of a picoprocess and the guest/host ABI.
//!
//! The guest has no kernel. Its only code besides the app is assembled here from source at
//! build time with `global_asm!` (no prebuilt binaries, no extra rustup target):
//!
//! * the **doorbell**: the page LSTAR points at. One store to an address outside every
//!   memory slot turns a `syscall` into exactly one `KVM_EXIT_MMIO`;
//! * the **exception stubs**: one per vector, each an `out` to a per-vector port.
//!
//! The code is assembled into a read-only data section of the VMM binary, and the VMM copies
//! the bytes into the guest. It is position-dependent only through the constants in [`abi`].

pub mod abi;

use abi::*;

std::arch::global_asm!(
    ".pushsection .rodata.picocenter_shim, \"a\"",
    // The doorbell: one byte store to an unbacked guest-physical page. The VMM completes the
    // syscall and resumes the app at RCX, so the `ud2` is only reached if it did not.
    ".globl picocenter_doorbell_start",
    ".globl picocenter_doorbell_end",
    "picocenter_doorbell_start:",
    "movabs byte ptr [{mmio}], al",
    "ud2",
    "picocenter_doorbell_end:",
    // Exception stubs, STUB_SIZE bytes each: `out port, al` exits to the VMM with the vector
    // in the port number; the frame is on the ring-0 stack. The VMM never resumes into a
    // stub, so each ends in a tight loop.
    ".globl picocenter_stubs_start",
    ".globl picocenter_stubs_end",
    ".balign {stub_size}, 0xcc",
    "picocenter_stubs_start:",
    ".set vector, 0",
    ".rept {count}",
    "out {port_base} + vector, al",
    "2: jmp 2b",
    ".balign {stub_size}, 0xcc",
    ".set vector, vector + 1",
    ".endr",
    "picocenter_stubs_end:",
    ".popsection",
    mmio = const DOORBELL_MMIO_VA,
    count = const STUB_COUNT,
    port_base = const EXCEPTION_PORT_BASE,
    stub_size = const STUB_SIZE,
);

extern "C" {
    static picocenter_doorbell_start: u8;
    static picocenter_doorbell_end: u8;
    static picocenter_stubs_start: u8;
    static picocenter_stubs_end: u8;
}

/// Returns the bytes between two symbols of the assembled shim.
fn blob(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: both symbols are defined in the same `global_asm!` block, in one read-only
    // section, with `start` before `end`, so the range is initialised immutable data that
    // lives for the whole program.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// Machine code of the doorbell page (place it at [`abi::DOORBELL_VA`]).
pub fn doorbell_code() -> &'static [u8] {
    blob(
        &raw const picocenter_doorbell_start,
        &raw const picocenter_doorbell_end,
    )
}

/// Machine code of the exception stubs (place it at [`abi::STUBS_VA`]).
pub fn exception_stubs_code() -> &'static [u8] {
    blob(
        &raw const picocenter_stubs_start,
        &raw const picocenter_stubs_end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_is_one_store_to_the_mmio_address() {
        let code = doorbell_code();
        // movabs moffs64, al = A2 imm64; then ud2 = 0F 0B.
        assert_eq!(code.len(), 11);
        assert_eq!(code[0], 0xa2);
        assert_eq!(
            u64::from_le_bytes(code[1..9].try_into().unwrap()),
            DOORBELL_MMIO_VA
        );
        assert_eq!(&code[9..], &[0x0f, 0x0b]);
    }

    #[test]
    fn one_stub_per_vector_with_its_port() {
        let code = exception_stubs_code();
        assert_eq!(code.len() as u64, STUB_COUNT * STUB_SIZE);
        for vector in 0..STUB_COUNT as usize {
            let stub = &code[vector * STUB_SIZE as usize..];
            assert_eq!(stub[0], 0xe6, "out imm8, al");
            assert_eq!(stub[1] as u16, EXCEPTION_PORT_BASE + vector as u16);
        }
    }
}

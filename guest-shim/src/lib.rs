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
    // rax = nanoseconds since the time page's TSC base; clobbers rdx.
    ".macro picocenter_tsc_delta_ns",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "sub rax, qword ptr [{tp} + {tp_tsc}]",
    "mul qword ptr [{tp} + {tp_mult}]",
    "shrd rax, rdx, 32",
    ".endm",
    ".globl picocenter_doorbell_start",
    ".globl picocenter_doorbell_end",
    "picocenter_doorbell_start:",
    // Calls answered here, with no exit.
    "cmp eax, 39",  // getpid
    "je 20f",
    "cmp eax, 186", // gettid
    "je 20f",
    "cmp eax, 228", // clock_gettime
    "je 30f",
    "cmp eax, 96",  // gettimeofday
    "je 40f",
    "cmp eax, 201", // time
    "je 50f",
    // Everything else goes to the VMM: through the mailbox while its poller is awake,
    // else with an exit.
    "10:",
    "cmp dword ptr [{mb} + {mb_awake}], 0",
    "je 11f",
    "mov qword ptr [{sc} + {sc_rcx}], rcx",
    "mov qword ptr [{sc} + {sc_rdx}], rdx",
    "mov qword ptr [{mb} + {mb_nr}], rax",
    "mov qword ptr [{mb} + {mb_args}], rdi",
    "mov qword ptr [{mb} + {mb_args} + 8], rsi",
    "mov qword ptr [{mb} + {mb_args} + 16], rdx",
    "mov qword ptr [{mb} + {mb_args} + 24], r10",
    "mov qword ptr [{mb} + {mb_args} + 32], r8",
    "mov qword ptr [{mb} + {mb_args} + 40], r9",
    "mov dword ptr [{mb} + {mb_state}], {request}",
    "mov ecx, {spin}",
    "12:",
    "cmp dword ptr [{mb} + {mb_state}], {done}",
    "je 14f",
    "pause",
    "dec ecx",
    "jnz 12b",
    // Nobody took it: withdraw it, unless the poller took it meanwhile.
    "mov eax, {request}",
    "xor edx, edx",
    "lock cmpxchg dword ptr [{mb} + {mb_state}], edx",
    "je 15f",
    "13:",
    "pause",
    "cmp dword ptr [{mb} + {mb_state}], {done}",
    "jne 13b",
    "14:",
    "cmp dword ptr [{mb} + {mb_declined}], 0",
    "jne 16f",
    "mov rax, qword ptr [{mb} + {mb_result}]",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "cmp dword ptr [{mb} + {mb_notify}], 0",
    "mov dword ptr [{mb} + {mb_state}], {empty}",
    "je 90f",
    // The VMM has something to do first (a signal to deliver). The app's registers are
    // all back in place, so this is a clean point to stop at.
    "movabs byte ptr [{notify}], al",
    ".globl picocenter_doorbell_notified",
    "picocenter_doorbell_notified:",
    "jmp 90f",
    "16:",
    "mov dword ptr [{mb} + {mb_state}], {empty}",
    "15:",
    "mov rax, qword ptr [{mb} + {mb_nr}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    // One store to an unbacked guest-physical page. The VMM performs the call and
    // resumes the app at RCX, so the `ud2` is only reached if it did not.
    "11:",
    "movabs byte ptr [{mmio}], al",
    "ud2",

    // getpid, gettid.
    "20:",
    "mov eax, dword ptr [{tp} + {tp_pid}]",
    "jmp 90f",

    // clock_gettime(clock = edi, ts = rsi) for the realtime and monotonic clocks.
    "30:",
    // REALTIME, MONOTONIC, MONOTONIC_RAW, *_COARSE and BOOTTIME (0, 1, 4-7); the CPU-time
    // clocks (2, 3) and the rest exit. RAX still holds the number if they do.
    "cmp edi, 7",
    "ja 10b",
    "cmp edi, 2",
    "je 10b",
    "cmp edi, 3",
    "je 10b",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 10b",
    "mov qword ptr [{sc} + {sc_rax}], rax",
    "mov qword ptr [{sc} + {sc_rcx}], rcx",
    "mov qword ptr [{sc} + {sc_rdx}], rdx",
    "picocenter_tsc_delta_ns",
    "test edi, edi",
    "jz 31f",
    "cmp edi, 5",
    "je 31f",
    "add rax, qword ptr [{tp} + {tp_mono}]",
    "jmp 32f",
    "31:",
    "add rax, qword ptr [{tp} + {tp_real}]",
    "32:",
    "xor edx, edx",
    "mov ecx, 1000000000",
    "div rcx",
    "mov qword ptr [rsi], rax",
    "mov qword ptr [rsi + 8], rdx",
    "xor eax, eax",
    "jmp 80f",

    // gettimeofday(tv = rdi, tz = rsi): timezone requests exit.
    "40:",
    "test rsi, rsi",
    "jnz 10b",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 10b",
    "mov qword ptr [{sc} + {sc_rax}], rax",
    "mov qword ptr [{sc} + {sc_rcx}], rcx",
    "mov qword ptr [{sc} + {sc_rdx}], rdx",
    "picocenter_tsc_delta_ns",
    "add rax, qword ptr [{tp} + {tp_real}]",
    "test rdi, rdi",
    "jz 41f",
    "xor edx, edx",
    "mov ecx, 1000000000",
    "div rcx",
    "mov qword ptr [rdi], rax",
    "mov rax, rdx",
    "xor edx, edx",
    "mov ecx, 1000",
    "div rcx",
    "mov qword ptr [rdi + 8], rax",
    "41:",
    "xor eax, eax",
    "jmp 80f",

    // time(tloc = rdi).
    "50:",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 10b",
    "mov qword ptr [{sc} + {sc_rax}], rax",
    "mov qword ptr [{sc} + {sc_rcx}], rcx",
    "mov qword ptr [{sc} + {sc_rdx}], rdx",
    "picocenter_tsc_delta_ns",
    "add rax, qword ptr [{tp} + {tp_real}]",
    "xor edx, edx",
    "mov ecx, 1000000000",
    "div rcx",
    "test rdi, rdi",
    "jz 80f",
    "mov qword ptr [rdi], rax",
    "jmp 80f",

    // Restore the registers a time call borrowed.
    "80:",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",

    // Return to the app with RAX: `sysretq` where the doorbell runs at CPL 0 (hardware
    // KVM); at CPL 3 (kvm_pvm), restore RFLAGS from R11 on the scratch stack and jump.
    "90:",
    "mov word ptr [{sc} + {sc_cs}], cs",
    "test byte ptr [{sc} + {sc_cs}], 3",
    "jz 91f",
    "mov qword ptr [{sc} + {sc_rsp}], rsp",
    "lea rsp, [{sc} + {sc_stack}]",
    "push r11",
    "popfq",
    "mov rsp, qword ptr [{sc} + {sc_rsp}]",
    "jmp rcx",
    "91:",
    "sysretq",
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
    // The PTE writer, right after the stubs (at PTE_WRITER_OFFSET).
    ".globl picocenter_pte_writer",
    "picocenter_pte_writer:",
    "3:",
    "mov rdi, qword ptr [rsi]",
    "mov rax, qword ptr [rsi + 8]",
    "mov qword ptr [rdi], rax",
    "add rsi, 16",
    "dec rcx",
    "jnz 3b",
    "out {pte_done}, al",
    "4: jmp 4b",
    ".globl picocenter_pte_writer_end",
    "picocenter_pte_writer_end:",
    ".popsection",
    mmio = const DOORBELL_MMIO_VA,
    notify = const NOTIFY_MMIO_VA,
    mb = const MAILBOX_VA,
    mb_state = const mailbox::STATE,
    mb_awake = const mailbox::AWAKE,
    mb_declined = const mailbox::DECLINED,
    mb_notify = const mailbox::NOTIFY,
    mb_nr = const mailbox::NR,
    mb_args = const mailbox::ARGS,
    mb_result = const mailbox::RESULT,
    empty = const mailbox::EMPTY,
    request = const mailbox::REQUEST,
    done = const mailbox::DONE,
    spin = const mailbox::SPIN,
    tp = const TIME_PAGE_VA,
    tp_valid = const time_page::VALID,
    tp_pid = const time_page::PID,
    tp_tsc = const time_page::TSC_BASE,
    tp_mult = const time_page::MULT,
    tp_mono = const time_page::MONOTONIC_NS,
    tp_real = const time_page::REALTIME_NS,
    sc = const SCRATCH_VA,
    sc_cs = const scratch::CS,
    sc_rcx = const scratch::RCX,
    sc_rdx = const scratch::RDX,
    sc_rsp = const scratch::RSP,
    sc_rax = const scratch::RAX,
    sc_stack = const scratch::STACK_TOP,
    count = const STUB_COUNT,
    port_base = const EXCEPTION_PORT_BASE,
    stub_size = const STUB_SIZE,
    pte_done = const PTE_WRITER_DONE_PORT,
);

extern "C" {
    static picocenter_doorbell_notified: u8;
    static picocenter_doorbell_start: u8;
    static picocenter_doorbell_end: u8;
    static picocenter_stubs_start: u8;
    #[cfg_attr(not(test), allow(dead_code))]
    static picocenter_stubs_end: u8;
    static picocenter_pte_writer_end: u8;
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

/// Offset in the doorbell page where the app resumes after a notify exit. There all of
/// its registers are its own again, so the VMM may stop it there (deliver a signal,
/// snapshot it) as at any point outside the doorbell.
pub fn notify_resume_offset() -> u64 {
    let start = &raw const picocenter_doorbell_start as usize;
    let notified = &raw const picocenter_doorbell_notified as usize;
    (notified - start) as u64
}

/// Machine code of the exception stubs followed by the PTE writer (place it at
/// [`abi::STUBS_VA`]).
pub fn exception_stubs_code() -> &'static [u8] {
    blob(
        &raw const picocenter_stubs_start,
        &raw const picocenter_pte_writer_end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_exits_with_one_store_to_the_mmio_address() {
        let code = doorbell_code();
        assert!(code.len() <= PAGE_SIZE as usize);
        // movabs moffs64, al = A2 imm64, followed by ud2 = 0F 0B: exactly one of them.
        let mut store = DOORBELL_MMIO_VA.to_le_bytes().to_vec();
        store.insert(0, 0xa2);
        store.extend_from_slice(&[0x0f, 0x0b]);
        let found = code
            .windows(store.len())
            .filter(|w| *w == store.as_slice())
            .count();
        assert_eq!(found, 1);
    }

    #[test]
    fn one_stub_per_vector_with_its_port() {
        let code = exception_stubs_code();
        assert!(code.len() as u64 > PTE_WRITER_OFFSET && code.len() as u64 <= PAGE_SIZE);
        let stubs = blob(
            &raw const picocenter_stubs_start,
            &raw const picocenter_stubs_end,
        );
        assert_eq!(
            stubs.len() as u64,
            PTE_WRITER_OFFSET,
            "the PTE writer follows the stubs"
        );
        for vector in 0..STUB_COUNT as usize {
            let stub = &code[vector * STUB_SIZE as usize..];
            assert_eq!(stub[0], 0xe6, "out imm8, al");
            assert_eq!(stub[1] as u16, EXCEPTION_PORT_BASE + vector as u16);
        }
    }
}

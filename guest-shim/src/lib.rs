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
    // rax = nanoseconds since the time page's TSC base; clobbers rdx. A TSC a few ticks
    // behind the base (the VMM's view of the guest TSC is not exact under nested or
    // emulated virtualization) counts as the base, instead of wrapping to centuries ahead.
    ".macro picocenter_tsc_delta_ns",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "sub rax, qword ptr [{tp} + {tp_tsc}]",
    "jae 5f",
    "xor eax, eax",
    "5:",
    "mul qword ptr [{tp} + {tp_mult}]",
    "shrd rax, rdx, 32",
    ".endm",
    // The file paths' pieces (see `abi::file_table`); each forwards the call (79) when it
    // cannot answer it. The entry of the fd in RDI: RAX = its offset in the file table.
    ".macro picocenter_window_entry",
    "cmp rdi, {ft_fds}",
    "jae 79f",
    "mov rax, rdi",
    "shl eax, {ft_shift}",
    "cmp qword ptr [rax + {ft} + {ft_va}], 0",
    "je 79f",
    ".endm",
    // The buffer [RSI, RSI + RDX) must lie in user space, as Linux's `access_ok` checks
    // it (EFAULT otherwise) before anything else. Clobbers RAX and RCX.
    ".macro picocenter_user_buffer",
    "mov rax, {user_end}",
    "mov rcx, rsi",
    "add rcx, rdx",
    "jc 79f",
    "cmp rcx, rax",
    "ja 79f",
    ".endm",
    // Copies what the file of the entry at RAX holds from byte `offset` (a register or
    // memory operand) on to the buffer at RSI, at most RDX bytes (none at or past the
    // end), 8 at a time and with RAX, RCX and RDX only, so that a stop or a fault
    // anywhere in it rewinds the call with every other register the app's; then goes to
    // `done` with RAX = the bytes copied.
    ".macro picocenter_window_copy offset, done",
    "mov rcx, qword ptr [rax + {ft} + {ft_size}]",
    "sub rcx, \\offset",
    "jbe 4f",
    "cmp rcx, rdx",
    "cmova rcx, rdx",
    "mov qword ptr [{sc} + {sc_len}], rcx",
    "mov rdx, qword ptr [rax + {ft} + {ft_va}]",
    "add rdx, \\offset",
    "xor ecx, ecx",
    "1:",
    "mov rax, qword ptr [{sc} + {sc_len}]",
    "sub rax, rcx",
    "cmp rax, 8",
    "jb 2f",
    "mov rax, qword ptr [rdx + rcx]",
    "mov qword ptr [rsi + rcx], rax",
    "add rcx, 8",
    "jmp 1b",
    "2:",
    "cmp rcx, qword ptr [{sc} + {sc_len}]",
    "jae 3f",
    "mov al, byte ptr [rdx + rcx]",
    "mov byte ptr [rsi + rcx], al",
    "inc rcx",
    "jmp 2b",
    "4:",
    "xor ecx, ecx",
    "3:",
    "mov rax, rcx",
    "jmp \\done",
    ".endm",
    ".globl picocenter_doorbell_start",
    ".globl picocenter_doorbell_end",
    "picocenter_doorbell_start:",
    // The regions between the labels below decide how the VMM brings an app it stops in
    // here to a clean point (see `doorbell_region`). Keep them in this order.
    //
    // Entry: the app's registers are all in place. Save the three the doorbell borrows,
    // so that until a result is committed a stop can put them back and re-execute the call.
    "mov qword ptr [{sc} + {sc_rax}], rax",
    "mov qword ptr [{sc} + {sc_rcx}], rcx",
    "mov qword ptr [{sc} + {sc_rdx}], rdx",
    // Saved: RAX, RCX and RDX may be clobbered, nothing is committed. The time paths'
    // stores to the app's buffer are made again when the call is.
    ".globl picocenter_doorbell_saved",
    "picocenter_doorbell_saved:",
    // Calls answered here, with no exit.
    "cmp eax, 39",  // getpid
    "je 20f",
    "cmp eax, 186", // gettid
    "je 21f",
    "cmp eax, 228", // clock_gettime
    "je 30f",
    "cmp eax, 96",  // gettimeofday
    "je 40f",
    "cmp eax, 201", // time
    "je 50f",
    "cmp eax, 17",  // pread64
    "je 60f",
    "cmp eax, 5",   // fstat
    "je 70f",
    "cmp eax, 262", // newfstatat
    "je 72f",
    "cmp eax, 0",   // read
    "je 100f",
    "cmp eax, 8",   // lseek
    "je 110f",
    "jmp 10f",

    // getpid, gettid.
    "20:",
    "mov eax, dword ptr [{tp} + {tp_pid}]",
    "jmp 90f",
    "21:",
    "mov eax, dword ptr [{sc} + {sc_tid}]",
    "jmp 90f",

    // clock_gettime(clock = edi, ts = rsi) for the realtime and monotonic clocks.
    "30:",
    // REALTIME, MONOTONIC, MONOTONIC_RAW, *_COARSE and BOOTTIME (0, 1, 4-7); the CPU-time
    // clocks (2, 3) and the rest go to the VMM. RAX still holds the number if they do.
    "cmp edi, 7",
    "ja 10f",
    "cmp edi, 2",
    "je 10f",
    "cmp edi, 3",
    "je 10f",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 10f",
    // The buffer must lie in user space (not the doorbell's own scratch page, say);
    // else the VMM answers (EFAULT).
    "mov rcx, {user_ptr_max}",
    "cmp rsi, rcx",
    "ja 15f",
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

    // gettimeofday(tv = rdi, tz = rsi): timezone requests go to the VMM.
    "40:",
    "test rsi, rsi",
    "jnz 10f",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 10f",
    "mov rcx, {user_ptr_max}",
    "cmp rdi, rcx",
    "ja 15f",
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
    "je 10f",
    "mov rcx, {user_ptr_max}",
    "cmp rdi, rcx",
    "ja 15f",
    "picocenter_tsc_delta_ns",
    "add rax, qword ptr [{tp} + {tp_real}]",
    "xor edx, edx",
    "mov ecx, 1000000000",
    "div rcx",
    "test rdi, rdi",
    "jz 80f",
    "mov qword ptr [rdi], rax",
    // (Falls through.)

    // Restore the registers a call answered here borrowed.
    "80:",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "jmp 90f",

    // pread64(fd = rdi, buf = rsi, count = rdx, offset = r10) on a file with a window
    // (see `abi::file_table`), copied from the window. Anything unusual goes to the VMM,
    // which answers it as Linux would. Linux checks the whole buffer first (EFAULT), then
    // the offset (EINVAL if negative or if offset + count overflows), and only then reads
    // what the file has.
    "60:",
    "picocenter_user_buffer",
    "test r10, r10",
    "js 79f",
    "mov rcx, r10",
    "add rcx, rdx",
    "jo 79f",
    "picocenter_window_entry",
    "picocenter_window_copy r10, 80b",

    // fstat(fd = rdi, buf = rsi).
    "70:",
    "picocenter_window_entry",
    "mov rdx, rsi",
    "jmp 75f",
    // newfstatat(dirfd = rdi, path = rsi, buf = rdx, flags = r10): only the fstat form,
    // AT_EMPTY_PATH with an empty path (what glibc's fstat calls).
    "72:",
    "cmp r10, {at_empty_path}",
    "jne 79f",
    "mov rcx, {user_ptr_max}",
    "cmp rsi, rcx",
    "ja 79f",
    "cmp byte ptr [rsi], 0",
    "jne 79f",
    "picocenter_window_entry",
    // Copy the entry's `struct stat` (at RAX) to the buffer at RDX.
    "75:",
    "mov rcx, {stat_ptr_max}",
    "cmp rdx, rcx",
    "ja 79f",
    ".set picocenter_stat_word, 0",
    ".rept {stat_words}",
    "mov rcx, qword ptr [rax + {ft} + {ft_stat} + picocenter_stat_word]",
    "mov qword ptr [rdx + picocenter_stat_word], rcx",
    ".set picocenter_stat_word, picocenter_stat_word + 8",
    ".endr",
    "xor eax, eax",
    "jmp 80b",

    // read(fd = rdi, buf = rsi, count = rdx) on a file with a window whose offset is
    // kept here (`file_table::OFFSET_IN_GUEST`): pread64 at that offset, which then moves
    // on by what was read in the commit sequence at the end of the doorbell. An offset
    // the app spoilt (negative) goes to the VMM. A read stopped mid-copy is made again
    // from the start; if another thread moved the offset meanwhile, bytes of the first
    // attempt may stay in the buffer past what the second returns (Linux leaves them
    // untouched), which only an app reading past the count it got could see.
    "100:",
    "picocenter_user_buffer",
    "picocenter_window_entry",
    "test byte ptr [rax + {ft} + {ft_flags}], {offset_in_guest}",
    "jz 79f",
    "cmp qword ptr [rdi * 8 + {sc} + {sc_offsets}], 0",
    "jl 79f",
    // Linux refuses offset + count past the largest offset (EINVAL), end of file or not.
    "mov rcx, qword ptr [rdi * 8 + {sc} + {sc_offsets}]",
    "add rcx, rdx",
    "jo 79f",
    "picocenter_window_copy [rdi*8+{sc}+{sc_offsets}], 120f",

    // lseek(fd = rdi, offset = rsi, whence = edx): SEEK_SET, SEEK_CUR and SEEK_END to an
    // offset within the file. The rest go to the VMM: a negative or overflowing one
    // (EINVAL), and one past the end, which Linux allows up to a limit of the host's
    // filesystem that only the host knows.
    "110:",
    "picocenter_window_entry",
    "test byte ptr [rax + {ft} + {ft_flags}], {offset_in_guest}",
    "jz 79f",
    "test edx, edx",
    "jz 111f",
    "cmp edx, 1",
    "je 112f",
    "cmp edx, 2",
    "je 113f",
    "jmp 79f",
    "111:",
    "xor ecx, ecx",
    "jmp 114f",
    "112:",
    "mov rcx, qword ptr [rdi * 8 + {sc} + {sc_offsets}]",
    "test rcx, rcx",
    "js 79f",
    "jmp 114f",
    "113:",
    "mov rcx, qword ptr [rax + {ft} + {ft_size}]",
    "114:",
    "add rcx, rsi",
    "jo 79f",
    "js 79f",
    "cmp rcx, qword ptr [rax + {ft} + {ft_size}]",
    "ja 79f",
    "mov rax, rcx",
    "jmp 121f",

    // Not answered here after all: restore what the file paths borrowed and forward it.
    "79:",
    "mov rax, qword ptr [{sc} + {sc_rax}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "jmp 10f",

    // A mailbox call withdrawn or declined: restore the registers and exit instead.
    "15:",
    "mov rax, qword ptr [{sc} + {sc_rax}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    // One store to an unbacked guest-physical page. The VMM performs the call and
    // resumes the app at RCX, so the `ud2` is only reached if it did not.
    "11:",
    "movabs byte ptr [{mmio}], al",
    "ud2",

    // Everything else goes to the VMM: through the mailbox while its poller is awake,
    // else with an exit.
    "10:",
    "cmp dword ptr [{mb} + {mb_awake}], 0",
    "je 11b",
    "mov qword ptr [{mb} + {mb_nr}], rax",
    "mov qword ptr [{mb} + {mb_args}], rdi",
    "mov qword ptr [{mb} + {mb_args} + 8], rsi",
    "mov qword ptr [{mb} + {mb_args} + 16], rdx",
    "mov qword ptr [{mb} + {mb_args} + 24], r10",
    "mov qword ptr [{mb} + {mb_args} + 32], r8",
    "mov qword ptr [{mb} + {mb_args} + 40], r9",
    // The last instruction of the Saved region: after it the call is posted.
    "mov dword ptr [{mb} + {mb_state}], {request}",
    // Posted: the mailbox state says where the call is (EMPTY once the doorbell withdrew
    // it or learnt it was declined), RAX, RCX and RDX are still saved.
    ".globl picocenter_doorbell_posted",
    "picocenter_doorbell_posted:",
    "mov ecx, dword ptr [{mb} + {mb_spin}]",
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
    "je 15b",
    "13:",
    "pause",
    "cmp dword ptr [{mb} + {mb_state}], {done}",
    "jne 13b",
    "14:",
    "cmp dword ptr [{mb} + {mb_declined}], 0",
    "je 17f",
    "mov dword ptr [{mb} + {mb_state}], {empty}",
    "jmp 15b",
    "17:",
    "mov rax, qword ptr [{mb} + {mb_result}]",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "cmp dword ptr [{mb} + {mb_notify}], 0",
    // The last instruction of the Posted region: after it the result is the app's.
    "mov dword ptr [{mb} + {mb_state}], {empty}",
    // Answered: RAX holds the result, every other register is the app's.
    ".globl picocenter_doorbell_answered",
    "picocenter_doorbell_answered:",
    "je 90f",
    // The VMM has something to do first (a signal to deliver).
    "movabs byte ptr [{notify}], al",
    ".globl picocenter_doorbell_notified",
    "picocenter_doorbell_notified:",

    // Return to the app with RAX: `sysretq` where the doorbell runs at CPL 0 (hardware
    // KVM); at CPL 3 (kvm_pvm), restore RFLAGS from R11 on the scratch stack and jump.
    "90:",
    "mov word ptr [{sc} + {sc_cs}], cs",
    "test byte ptr [{sc} + {sc_cs}], 3",
    "jz 91f",
    "mov qword ptr [{sc} + {sc_rsp}], rsp",
    "lea rsp, [{sc} + {sc_stack}]",
    // Scratch stack: as Answered, but the app's RSP is in the scratch page.
    ".globl picocenter_doorbell_scratch_stack",
    "picocenter_doorbell_scratch_stack:",
    "push r11",
    "popfq",
    "mov rsp, qword ptr [{sc} + {sc_rsp}]",
    // Answered again, to the end.
    ".globl picocenter_doorbell_app_stack",
    "picocenter_doorbell_app_stack:",
    "jmp rcx",
    "91:",
    "sysretq",
    // The commits of read and lseek, whose results move the file's offset: RAX holds the
    // result and RCX and RDX are the app's again, and the store to the offset is the last
    // instruction of a Saved region (before it the call is rewound; after it, answered).
    ".globl picocenter_doorbell_read_commit",
    "picocenter_doorbell_read_commit:",
    "120:",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "add qword ptr [rdi * 8 + {sc} + {sc_offsets}], rax",
    ".globl picocenter_doorbell_read_committed",
    "picocenter_doorbell_read_committed:",
    "jmp 90b",
    ".globl picocenter_doorbell_seek_commit",
    "picocenter_doorbell_seek_commit:",
    "121:",
    "mov rdx, qword ptr [{sc} + {sc_rdx}]",
    "mov rcx, qword ptr [{sc} + {sc_rcx}]",
    "mov qword ptr [rdi * 8 + {sc} + {sc_offsets}], rax",
    ".globl picocenter_doorbell_seek_committed",
    "picocenter_doorbell_seek_committed:",
    "jmp 90b",
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
    mb_spin = const mailbox::SPIN,
    tp = const TIME_PAGE_VA,
    tp_valid = const time_page::VALID,
    tp_pid = const time_page::PID,
    tp_tsc = const time_page::TSC_BASE,
    tp_mult = const time_page::MULT,
    tp_mono = const time_page::MONOTONIC_NS,
    tp_real = const time_page::REALTIME_NS,
    sc = const SCRATCH_VA,
    sc_len = const scratch::LEN,
    user_ptr_max = const USER_POINTER_MAX,
    user_end = const USER_END,
    stat_ptr_max = const USER_END - file_table::STAT_SIZE,
    stat_words = const file_table::STAT_SIZE / 8,
    ft = const FILE_TABLE_VA,
    ft_va = const file_table::VA,
    ft_size = const file_table::SIZE,
    ft_stat = const file_table::STAT,
    ft_fds = const file_table::FDS,
    ft_flags = const file_table::FLAGS,
    offset_in_guest = const file_table::OFFSET_IN_GUEST,
    sc_offsets = const scratch::FILE_OFFSETS,
    ft_shift = const file_table::ENTRY_SHIFT,
    at_empty_path = const 0x1000,
    sc_cs = const scratch::CS,
    sc_rcx = const scratch::RCX,
    sc_rdx = const scratch::RDX,
    sc_rsp = const scratch::RSP,
    sc_rax = const scratch::RAX,
    sc_stack = const scratch::STACK_TOP,
    sc_tid = const scratch::TID,
    count = const STUB_COUNT,
    port_base = const EXCEPTION_PORT_BASE,
    stub_size = const STUB_SIZE,
    pte_done = const PTE_WRITER_DONE_PORT,
);

// The vDSO's code (see `abi::vdso`): plain user-mode functions with the SysV calling
// convention, reading the time page at its fixed address. An entry table first, at the
// fixed offsets of `abi::vdso`; each falls back to the real `syscall` when the time page
// cannot answer (no calibrated TSC, a CPU-time or unknown clock, a timezone).
std::arch::global_asm!(
    ".pushsection .rodata.picocenter_vdso, \"a\"",
    ".macro picocenter_vdso_delta_ns",
    "rdtsc",
    "shl rdx, 32",
    "or rax, rdx",
    "sub rax, qword ptr [{tp} + {tp_tsc}]",
    "jae 5f",
    "xor eax, eax",
    "5:",
    "mul qword ptr [{tp} + {tp_mult}]",
    "shrd rax, rdx, 32",
    ".endm",
    ".globl picocenter_vdso_start",
    ".globl picocenter_vdso_gettimeofday",
    ".globl picocenter_vdso_time",
    ".globl picocenter_vdso_getcpu",
    ".globl picocenter_vdso_end",
    ".p2align 4",
    "picocenter_vdso_start:",
    "jmp 30f",
    ".p2align 4",
    "jmp 40f",
    ".p2align 4",
    "jmp 50f",
    ".p2align 4",
    "jmp 60f",
    ".p2align 4",
    // clock_gettime(clock = edi, ts = rsi).
    "30:",
    "cmp edi, 7",
    "ja 39f",
    "cmp edi, 2",
    "je 39f",
    "cmp edi, 3",
    "je 39f",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 39f",
    "picocenter_vdso_delta_ns",
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
    "ret",
    "39:",
    "mov eax, 228",
    "syscall",
    "ret",
    // gettimeofday(tv = rdi, tz = rsi).
    "picocenter_vdso_gettimeofday:",
    "40:",
    "test rsi, rsi",
    "jnz 49f",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 49f",
    "picocenter_vdso_delta_ns",
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
    "ret",
    "49:",
    "mov eax, 96",
    "syscall",
    "ret",
    // time(tloc = rdi).
    "picocenter_vdso_time:",
    "50:",
    "cmp dword ptr [{tp} + {tp_valid}], 0",
    "je 59f",
    "picocenter_vdso_delta_ns",
    "add rax, qword ptr [{tp} + {tp_real}]",
    "xor edx, edx",
    "mov ecx, 1000000000",
    "div rcx",
    "test rdi, rdi",
    "jz 51f",
    "mov qword ptr [rdi], rax",
    "51:",
    "ret",
    "59:",
    "mov eax, 201",
    "syscall",
    "ret",
    // getcpu(cpu = rdi, node = rsi, cache = rdx): the app's one CPU, node 0.
    "picocenter_vdso_getcpu:",
    "60:",
    "test rdi, rdi",
    "jz 61f",
    "mov dword ptr [rdi], 0",
    "61:",
    "test rsi, rsi",
    "jz 62f",
    "mov dword ptr [rsi], 0",
    "62:",
    "xor eax, eax",
    "ret",
    "picocenter_vdso_end:",
    ".popsection",
    tp = const TIME_PAGE_VA,
    tp_valid = const time_page::VALID,
    tp_tsc = const time_page::TSC_BASE,
    tp_mult = const time_page::MULT,
    tp_mono = const time_page::MONOTONIC_NS,
    tp_real = const time_page::REALTIME_NS,
);

extern "C" {
    static picocenter_vdso_start: u8;
    static picocenter_vdso_gettimeofday: u8;
    static picocenter_vdso_time: u8;
    static picocenter_vdso_getcpu: u8;
    static picocenter_vdso_end: u8;
    static picocenter_doorbell_start: u8;
    static picocenter_doorbell_saved: u8;
    static picocenter_doorbell_posted: u8;
    static picocenter_doorbell_answered: u8;
    #[cfg_attr(not(test), allow(dead_code))]
    static picocenter_doorbell_notified: u8;
    static picocenter_doorbell_scratch_stack: u8;
    static picocenter_doorbell_app_stack: u8;
    static picocenter_doorbell_read_commit: u8;
    static picocenter_doorbell_read_committed: u8;
    static picocenter_doorbell_seek_commit: u8;
    static picocenter_doorbell_seek_committed: u8;
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

/// Machine code of the vDSO's functions (place it at [`abi::vdso::CODE`] in the vDSO
/// page; its entry points are at the offsets of [`abi::vdso`]).
pub fn vdso_code() -> &'static [u8] {
    blob(
        &raw const picocenter_vdso_start,
        &raw const picocenter_vdso_end,
    )
}

/// Where a vCPU stopped at `offset` from the start of the vDSO's code (not in a fault) goes
/// on from: the entry of the function it is in (an offset of [`abi::vdso`]), or `None`
/// past the code. Every vDSO function may start over from any of its instructions: it
/// changes no register its arguments are in and no stack, and what it stores it stores
/// again. Started over, it reads the time page anew, so that a page the VMM rewrote while
/// the vCPU was out (every 100 ms) is never read half before and half after; and a
/// snapshot keeps it at an entry, whose offset is the ABI's, not inside code that another
/// VMM version lays out differently.
pub fn vdso_restart(offset: u64) -> Option<u64> {
    let at = |symbol: *const u8| {
        (symbol as usize).saturating_sub(&raw const picocenter_vdso_start as usize) as u64
    };
    let bodies = [
        (
            at(&raw const picocenter_vdso_gettimeofday),
            vdso::CLOCK_GETTIME,
        ),
        (at(&raw const picocenter_vdso_time), vdso::GETTIMEOFDAY),
        (at(&raw const picocenter_vdso_getcpu), vdso::TIME),
        (at(&raw const picocenter_vdso_end), vdso::GETCPU),
    ];
    let table_end = vdso::GETCPU + 0x10;
    if offset < table_end {
        // On an entry's `jmp`, or the padding after it.
        return Some(offset & !0xf);
    }
    bodies
        .iter()
        .find(|(body_end, _)| offset < *body_end)
        .map(|&(_, entry)| entry)
}

/// Offset of a doorbell symbol from the start of the doorbell.
fn doorbell_offset(symbol: *const u8) -> u64 {
    (symbol as usize).saturating_sub(&raw const picocenter_doorbell_start as usize) as u64
}

/// Where in the doorbell a stopped vCPU is, which says how the VMM brings the app to a
/// clean point: one where its context is that of its own `syscall` instruction, either
/// about to execute it (a *rewind*: RIP = RCX - 2, RAX = the number, as Linux restarts a
/// call) or just after it returned (a *completion*: RIP = RCX, RAX = the result). In every
/// region R11 holds the app's RFLAGS and only RAX, RCX, RDX and RSP may differ from the
/// app's; the scratch page ([`abi::scratch`]) holds what the region says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellRegion {
    /// The first instructions: every register is the app's. Rewind.
    Entry,
    /// RAX, RCX and RDX are saved in the scratch page and may be clobbered; no result is
    /// committed (a time call may have stored part of its answer, which it stores again).
    /// Rewind with the saved ones. The exit store is here too.
    Saved,
    /// A call is in the mailbox: its state decides. REQUEST: withdraw it (cmpxchg to
    /// EMPTY) and rewind; TAKEN: wait for the poller; DONE and declined, or EMPTY (the
    /// doorbell withdrew it or saw it declined): rewind; DONE and performed: complete with
    /// its result. RAX, RCX and RDX are saved as in `Saved`.
    Posted,
    /// RAX holds the result and every other register is the app's (the notify exit and
    /// the return sequence). Complete.
    Answered,
    /// As `Answered`, but RSP points at the doorbell's scratch stack (restoring RFLAGS with
    /// `popfq` at CPL 3): the app's RSP is in the scratch page. Complete with it.
    ScratchStack,
}

/// The region of the doorbell at byte `offset` from its start, or `None` past its code
/// (where no instruction is). The regions are ranges between labels of the assembly, in
/// the order of the table below.
pub fn doorbell_region(offset: u64) -> Option<DoorbellRegion> {
    use DoorbellRegion::*;
    let at = doorbell_offset;
    let table = [
        (0, Entry),
        (at(&raw const picocenter_doorbell_saved), Saved),
        (at(&raw const picocenter_doorbell_posted), Posted),
        (at(&raw const picocenter_doorbell_answered), Answered),
        (
            at(&raw const picocenter_doorbell_scratch_stack),
            ScratchStack,
        ),
        (at(&raw const picocenter_doorbell_app_stack), Answered),
        (at(&raw const picocenter_doorbell_read_commit), Saved),
        (at(&raw const picocenter_doorbell_read_committed), Answered),
        (at(&raw const picocenter_doorbell_seek_commit), Saved),
        (at(&raw const picocenter_doorbell_seek_committed), Answered),
    ];
    if offset >= doorbell_code().len() as u64 {
        return None;
    }
    table
        .iter()
        .rev()
        .find(|(start, _)| offset >= *start)
        .map(|&(_, region)| region)
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
    fn a_vdso_function_starts_over_from_its_entry() {
        let code = vdso_code().len() as u64;
        for (offset, entry) in [
            (0x00, vdso::CLOCK_GETTIME),
            (0x13, vdso::GETTIMEOFDAY),
            (0x3f, vdso::GETCPU),
            (0x40, vdso::CLOCK_GETTIME),
            (code - 1, vdso::GETCPU),
        ] {
            assert_eq!(vdso_restart(offset), Some(entry), "{offset:#x}");
        }
        assert_eq!(vdso_restart(code), None);
        // Each function's body comes after the one before, in the entry table's order.
        let starts: Vec<u64> = (0x40..code)
            .map(|at| vdso_restart(at).unwrap())
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] != w[1])
            .map(|w| w[1])
            .collect();
        assert_eq!(starts, [vdso::GETTIMEOFDAY, vdso::TIME, vdso::GETCPU]);
    }

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

    /// Offsets in the doorbell where `pattern` occurs.
    fn find(pattern: &[u8]) -> Vec<u64> {
        doorbell_code()
            .windows(pattern.len())
            .enumerate()
            .filter(|(_, w)| *w == pattern)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// `opcode modrm 0x25 disp32` with an absolute 32-bit address (sign-extended).
    fn absolute(opcode: &[u8], modrm: u8, address: u64) -> Vec<u8> {
        let mut bytes = opcode.to_vec();
        bytes.extend_from_slice(&[modrm, 0x25]);
        bytes.extend_from_slice(&(address as u32).to_le_bytes());
        bytes
    }

    fn state_store(value: u32) -> Vec<u8> {
        let mut bytes = absolute(&[0xc7], 0x04, MAILBOX_VA + mailbox::STATE);
        bytes.extend_from_slice(&value.to_le_bytes());
        bytes
    }

    fn offset(symbol: *const u8) -> u64 {
        doorbell_offset(symbol)
    }

    /// Asserts that every place `found` (of `pattern`) is in the Saved region.
    fn assert_all_saved(found: &[u64], pattern: &[u8]) {
        for &at in found {
            assert_eq!(
                doorbell_region(at),
                Some(DoorbellRegion::Saved),
                "{pattern:x?}"
            );
        }
    }

    #[test]
    fn the_entry_saves_rax_rcx_rdx_and_nothing_else() {
        let saved = offset(&raw const picocenter_doorbell_saved);
        let mut expected = absolute(&[0x48, 0x89], 0x04, SCRATCH_VA + scratch::RAX);
        expected.extend(absolute(&[0x48, 0x89], 0x0c, SCRATCH_VA + scratch::RCX));
        expected.extend(absolute(&[0x48, 0x89], 0x14, SCRATCH_VA + scratch::RDX));
        assert_eq!(&doorbell_code()[..saved as usize], expected.as_slice());
        assert_eq!(doorbell_region(0), Some(DoorbellRegion::Entry));
        assert_eq!(doorbell_region(saved - 1), Some(DoorbellRegion::Entry));
        assert_eq!(doorbell_region(saved), Some(DoorbellRegion::Saved));
    }

    #[test]
    fn a_call_is_posted_exactly_at_the_posted_label() {
        let posted = offset(&raw const picocenter_doorbell_posted);
        let request = state_store(mailbox::REQUEST);
        assert_eq!(find(&request), vec![posted - request.len() as u64]);
        assert_eq!(doorbell_region(posted - 1), Some(DoorbellRegion::Saved));
        assert_eq!(doorbell_region(posted), Some(DoorbellRegion::Posted));
    }

    #[test]
    fn results_are_the_apps_only_after_the_last_mailbox_store() {
        let (posted, answered) = (
            offset(&raw const picocenter_doorbell_posted),
            offset(&raw const picocenter_doorbell_answered),
        );
        let empty = state_store(mailbox::EMPTY);
        let stores = find(&empty);
        assert_eq!(stores.last(), Some(&(answered - empty.len() as u64)));
        for store in stores {
            assert_eq!(doorbell_region(store), Some(DoorbellRegion::Posted));
            assert!(store >= posted);
        }
        assert_eq!(doorbell_region(answered), Some(DoorbellRegion::Answered));
        // The notify exit resumes in the return sequence, answered.
        let notified = offset(&raw const picocenter_doorbell_notified);
        let mut notify = vec![0xa2];
        notify.extend_from_slice(&NOTIFY_MMIO_VA.to_le_bytes());
        assert_eq!(find(&notify), vec![notified - notify.len() as u64]);
        assert_eq!(doorbell_region(notified), Some(DoorbellRegion::Answered));
    }

    #[test]
    fn the_exit_and_the_stores_to_the_app_are_in_the_saved_region() {
        let mut exit = vec![0xa2];
        exit.extend_from_slice(&DOORBELL_MMIO_VA.to_le_bytes());
        // mov [rsi], rax; mov [rsi + 8], rdx; mov [rdi], rax; mov [rdi + 8], rax.
        let app_stores: [&[u8]; 4] = [
            &[0x48, 0x89, 0x06],
            &[0x48, 0x89, 0x56, 0x08],
            &[0x48, 0x89, 0x07],
            &[0x48, 0x89, 0x47, 0x08],
        ];
        for pattern in std::iter::once(exit.as_slice()).chain(app_stores) {
            let found = find(pattern);
            assert!(!found.is_empty(), "{pattern:x?} not found");
            assert_all_saved(&found, pattern);
        }
    }

    #[test]
    fn the_file_answers_write_to_the_app_only_in_the_saved_region() {
        // pread64's and read's copies: mov [rsi + rcx], rax; mov [rsi + rcx], al. fstat's:
        // the first and last words of `struct stat`, mov [rdx], rcx and mov [rdx + 136],
        // rcx.
        let app_stores: [(&[u8], usize); 4] = [
            (&[0x48, 0x89, 0x04, 0x0e], 2),
            (&[0x88, 0x04, 0x0e], 2),
            (&[0x48, 0x89, 0x0a], 1),
            (&[0x48, 0x89, 0x8a, 0x88, 0x00, 0x00, 0x00], 1),
        ];
        for (pattern, copies) in app_stores {
            let found = find(pattern);
            assert_eq!(found.len(), copies, "{pattern:x?}");
            assert_all_saved(&found, pattern);
        }
    }

    #[test]
    fn read_and_lseek_move_the_offset_with_the_last_instruction_before_their_answer() {
        let code = doorbell_code();
        // add [rdi * 8 + offsets], rax and mov [rdi * 8 + offsets], rax (SIB, disp32).
        let offsets = ((SCRATCH_VA + scratch::FILE_OFFSETS) as u32).to_le_bytes();
        for (opcode, commit, committed) in [
            (
                0x01,
                offset(&raw const picocenter_doorbell_read_commit),
                offset(&raw const picocenter_doorbell_read_committed),
            ),
            (
                0x89,
                offset(&raw const picocenter_doorbell_seek_commit),
                offset(&raw const picocenter_doorbell_seek_committed),
            ),
        ] {
            let mut store = vec![0x48, opcode, 0x04, 0xfd];
            store.extend_from_slice(&offsets);
            assert_eq!(find(&store), vec![committed - store.len() as u64]);
            for at in commit..committed {
                assert_eq!(doorbell_region(at), Some(DoorbellRegion::Saved));
            }
            assert_eq!(doorbell_region(committed), Some(DoorbellRegion::Answered));
            assert_eq!(doorbell_region(commit - 1), Some(DoorbellRegion::Answered));
        }
        assert_eq!(
            doorbell_region(code.len() as u64 - 1),
            Some(DoorbellRegion::Answered)
        );
    }

    #[test]
    fn rsp_is_the_scratch_stack_exactly_between_its_labels() {
        let code = doorbell_code();
        let (scratch_stack, app_stack) = (
            offset(&raw const picocenter_doorbell_scratch_stack),
            offset(&raw const picocenter_doorbell_app_stack),
        );
        let lea = absolute(&[0x48, 0x8d], 0x24, SCRATCH_VA + scratch::STACK_TOP);
        assert_eq!(find(&lea), vec![scratch_stack - lea.len() as u64]);
        let mut body = vec![0x41, 0x53, 0x9d]; // push r11; popfq
        body.extend(absolute(&[0x48, 0x8b], 0x24, SCRATCH_VA + scratch::RSP));
        assert_eq!(
            &code[scratch_stack as usize..app_stack as usize],
            body.as_slice()
        );
        assert_eq!(
            doorbell_region(scratch_stack - 1),
            Some(DoorbellRegion::Answered)
        );
        for at in scratch_stack..app_stack {
            assert_eq!(doorbell_region(at), Some(DoorbellRegion::ScratchStack));
        }
        // jmp rcx; sysretq; then the commits of read and lseek.
        let commits = offset(&raw const picocenter_doorbell_read_commit);
        assert_eq!(
            &code[app_stack as usize..commits as usize],
            &[0xff, 0xe1, 0x48, 0x0f, 0x07]
        );
        assert_eq!(doorbell_region(app_stack), Some(DoorbellRegion::Answered));
        assert_eq!(
            doorbell_region(code.len() as u64 - 1),
            Some(DoorbellRegion::Answered)
        );
        assert_eq!(doorbell_region(code.len() as u64), None);
        assert_eq!(doorbell_region(PAGE_SIZE - 1), None);
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

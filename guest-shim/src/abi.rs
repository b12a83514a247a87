//! The whole guest/host interface of a picoprocess, on one screen.
//!
//! The guest is an unmodified Linux program, so the call ABI *is* the Linux x86-64 syscall
//! ABI. What this module adds is where the VMM puts its own machinery in the guest's address
//! space and how the guest reaches the VMM:
//!
//! * `syscall` jumps to [`DOORBELL_VA`] (LSTAR). The doorbell stores one byte to
//!   [`DOORBELL_MMIO_VA`], which maps [`DOORBELL_MMIO_GPA`], an address outside every memory
//!   slot: KVM exits with `KVM_EXIT_MMIO` and the VMM performs the call from the registers.
//! * Every CPU exception enters a ring-0 stub at `STUBS_VA + vector * STUB_SIZE`, which
//!   executes `out EXCEPTION_PORT_BASE + vector, al`: KVM exits with `KVM_EXIT_IO` and the
//!   VMM reads the exception frame from the kernel stack.
//! * A store to [`CALIBRATION_MMIO_VA`] is a bare exit that the VMM answers by resuming at
//!   once. Benchmarks use it to measure the exit round trip the doorbell is compared with.
//! * Some calls never leave the guest: the doorbell answers getpid, clock_gettime,
//!   gettimeofday and time itself, from the read-only **time page** ([`time_page`]) that
//!   the VMM keeps current, and gettid from the vCPU's own **scratch page** ([`scratch`]),
//!   where it also spills registers.
//! * Each vCPU has its own scratch page, mailbox and ring-0 stacks, at the same addresses
//!   in the **vCPU-local area** ([`CPU_LOCAL_VA`], [`cpu_local`]).
//! * The doorbell also answers pread64, fstat and `newfstatat(fd, "", buf, AT_EMPTY_PATH)`
//!   on a file of the read-only root that the VMM gave a **file window** ([`file_table`]):
//!   a read-only mapping of the whole file above the user range, copied from with no exit;
//!   and read and lseek too where the file's offset is kept in the scratch page
//!   ([`scratch::FILE_OFFSETS`]).
//! * While a VMM poller thread is awake, other calls go through the [`mailbox`] page with
//!   no exit; the doorbell falls back to the exit when the poller sleeps or declines.
//! * The [`vdso`] page answers clock_gettime, gettimeofday, time and getcpu from the time
//!   page in user mode, before any `syscall`, for libcs that use a vDSO.
//!
//! Bump [`ABI_VERSION`] on any change to a value here.

/// Version of this interface. Snapshots do not depend on it: they hold only app state.
pub const ABI_VERSION: u32 = 11;

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Guest-virtual base of the system region: the top 2 GiB, far above any user mapping.
pub const SYSTEM_VA: u64 = 0xffff_ffff_8000_0000;
/// Page index (from [`SYSTEM_VA`]) of the GDT. Supervisor, writable.
pub const GDT_PAGE: u64 = 0;
/// Page index of the IDT. Supervisor, read-only.
pub const IDT_PAGE: u64 = 1;
/// Page index of the TSS. Supervisor, writable.
pub const TSS_PAGE: u64 = 2;
/// Page index of the exception stubs. Supervisor, executable.
pub const STUBS_PAGE: u64 = 3;
/// Page index of the doorbell. User, read + execute.
pub const DOORBELL_PAGE: u64 = 4;
/// Page index of the time page. User, read-only.
pub const TIME_PAGE: u64 = 8;
/// Page index of the list the PTE writer works through: (destination VA, value) pairs of
/// u64. Supervisor, writable.
pub const PTE_LIST_PAGE: u64 = 11;
/// Page index of the vDSO (see [`vdso`]). User, read + execute.
pub const VDSO_PAGE: u64 = 12;
/// First page of the file table (see [`file_table`]). User, read-only.
pub const FILE_TABLE_PAGE: u64 = 13;
/// Number of pages of the file table.
pub const FILE_TABLE_PAGES: u64 = 4;
/// Number of pages in the system region (pages 5, 6, 7, 9 and 10 are unused: they held
/// what is now each vCPU's own, in [`cpu_local`]).
pub const SYSTEM_PAGES: u64 = 17;

/// Guest-virtual base of the vCPU-local area: 2 MiB above [`SYSTEM_VA`], where every vCPU
/// maps pages of its own at the same addresses (each vCPU has its own top-level page tables
/// down to this area's table; everything else they share). The doorbell and the exception
/// stubs address them absolutely, as if there were one vCPU.
pub const CPU_LOCAL_VA: u64 = SYSTEM_VA + 0x20_0000;

/// Page indexes (from [`CPU_LOCAL_VA`]) of what each vCPU has of its own.
pub mod cpu_local {
    /// First page of the ring-0 stack that exceptions from ring 3 switch to (TSS.RSP0).
    /// Supervisor, writable.
    pub const KERNEL_STACK_PAGE: u64 = 0;
    /// Number of pages of that stack.
    pub const KERNEL_STACK_PAGES: u64 = 2;
    /// Page of the double-fault stack (IST2; every other exception uses IST1, the top of
    /// the ring-0 stack, so frames land there even when the doorbell runs at CPL 0).
    pub const IST_STACK_PAGE: u64 = 2;
    /// Page of the doorbell's scratch page ([`super::scratch`]). User, writable.
    pub const SCRATCH_PAGE: u64 = 3;
    /// Page of the mailbox ([`super::mailbox`]). User, writable.
    pub const MAILBOX_PAGE: u64 = 4;
    /// Pages per vCPU.
    pub const PAGES: u64 = 5;
}

/// Supervisor-only window onto the whole page-table slot, for the PTE writer.
pub const PAGE_TABLE_WINDOW_VA: u64 = SYSTEM_VA + 0x4000_0000;
/// Offset in the stubs page of the PTE writer: a ring-0 routine that stores RCX values
/// from the list at RSI, then does `out PTE_WRITER_DONE_PORT, al`. On kvm_pvm a store to
/// a page table from (emulated) ring 0 makes the shadow MMU drop just that entry, which is
/// far cheaper than dropping every translation. The VMM runs it only on kvm_pvm.
pub const PTE_WRITER_OFFSET: u64 = STUB_COUNT * STUB_SIZE;
/// I/O port of the PTE writer's completion.
pub const PTE_WRITER_DONE_PORT: u16 = 0x7f;

/// The end of the app's address space (user half, less the top page).
pub const USER_END: u64 = 0x7fff_ffff_f000;
/// The highest address of a 16-byte buffer the doorbell's time calls write to; a buffer
/// above it (or in the VMM's own region) is left to the VMM, which answers EFAULT.
pub const USER_POINTER_MAX: u64 = USER_END - 16;

/// Guest-virtual address of the time page.
pub const TIME_PAGE_VA: u64 = SYSTEM_VA + TIME_PAGE * PAGE_SIZE;
/// Guest-virtual address of the vDSO (AT_SYSINFO_EHDR).
pub const VDSO_VA: u64 = SYSTEM_VA + VDSO_PAGE * PAGE_SIZE;

/// The vDSO: an ELF shared object in one page that the app's libc (glibc, Go's runtime)
/// finds through AT_SYSINFO_EHDR, whose `__vdso_clock_gettime`, `__vdso_gettimeofday`,
/// `__vdso_time` and `__vdso_getcpu` answer from the time page with no `syscall` at all
/// (and make the call when the time page cannot answer). Its functions sit at fixed
/// offsets, because an app keeps pointers to them across snapshots and VMM versions:
/// never move them.
pub mod vdso {
    /// Offset in the vDSO page of its code.
    pub const CODE: u64 = 0x800;
    /// Offsets from [`CODE`] of the entry points, 16 bytes apart.
    pub const CLOCK_GETTIME: u64 = 0x00;
    /// gettimeofday.
    pub const GETTIMEOFDAY: u64 = 0x10;
    /// time.
    pub const TIME: u64 = 0x20;
    /// getcpu.
    pub const GETCPU: u64 = 0x30;
}
/// Guest-virtual address of the file table.
pub const FILE_TABLE_VA: u64 = SYSTEM_VA + FILE_TABLE_PAGE * PAGE_SIZE;

/// The file table: for each of the app's fds below [`file_table::FDS`], whether the
/// doorbell answers pread64 and fstat on it, and from what. The VMM fills an entry when it
/// gives a file of the read-only root a window (a read-only mapping of the whole file at
/// [`file_table::WINDOWS_VA`] + fd x [`file_table::WINDOW_SIZE`]) and zeroes it before
/// the fd is closed or changes. Entries of [`file_table::ENTRY_SIZE`] bytes; offsets:
pub mod file_table {
    /// u64: the window's guest-virtual address; 0 when the doorbell does not answer.
    pub const VA: u64 = 0;
    /// u64: the file's size in bytes (the window holds it all).
    pub const SIZE: u64 = 8;
    /// The `struct stat` fstat answers (144 bytes, x86-64 layout).
    pub const STAT: u64 = 16;
    /// Bytes of `struct stat`.
    pub const STAT_SIZE: u64 = 144;
    /// u64: flags, [`OFFSET_IN_GUEST`].
    pub const FLAGS: u64 = 160;
    /// The file's offset is the u64 at [`super::scratch::FILE_OFFSETS`] + fd x 8, which
    /// the doorbell moves (read, lseek) and the VMM takes back before it uses the host's
    /// (the open file is named by this one fd of one process).
    pub const OFFSET_IN_GUEST: u64 = 1;
    /// Bytes per entry.
    pub const ENTRY_SIZE: u64 = 256;
    /// log2 of [`ENTRY_SIZE`].
    pub const ENTRY_SHIFT: u32 = 8;
    /// Entries: fds `0..FDS`.
    pub const FDS: u64 = 64;
    /// Where the windows are: one slot of [`WINDOW_SIZE`] per fd, above the user range
    /// and below the page-table window.
    pub const WINDOWS_VA: u64 = super::SYSTEM_VA + 0x2000_0000;
    /// The largest window, which is the largest file given one.
    pub const WINDOW_SIZE: u64 = 4 << 20;
}

/// Guest-virtual address of the scratch page (the vCPU's own).
pub const SCRATCH_VA: u64 = CPU_LOCAL_VA + cpu_local::SCRATCH_PAGE * PAGE_SIZE;
/// Guest-virtual address of the mailbox page (the vCPU's own).
pub const MAILBOX_VA: u64 = CPU_LOCAL_VA + cpu_local::MAILBOX_PAGE * PAGE_SIZE;

/// The mailbox: while a VMM poller thread is awake, the doorbell posts a forwarded call
/// here and spins for the answer instead of exiting. Byte offsets:
pub mod mailbox {
    /// u32: [`EMPTY`], [`REQUEST`] (guest), [`TAKEN`] (poller), [`DONE`] (poller).
    pub const STATE: u64 = 0;
    /// u32: non-zero while the poller spins; the doorbell exits at once when it is 0.
    pub const AWAKE: u64 = 4;
    /// u32: set with DONE when the poller declined the call: the doorbell exits instead.
    pub const DECLINED: u64 = 8;
    /// u32: set with DONE when the VMM must act before the app goes on (a signal to
    /// deliver): the doorbell makes a notify exit after taking the result.
    pub const NOTIFY: u64 = 12;
    /// u64: the syscall number.
    pub const NR: u64 = 16;
    /// u64 x 6: the arguments.
    pub const ARGS: u64 = 24;
    /// u64: the result.
    pub const RESULT: u64 = 72;
    /// u32: `pause` iterations the doorbell spins before it withdraws an untaken call. The
    /// VMM writes it from the measured cost of a `pause` on the host, for [`SPIN_NS`]:
    /// a `pause` takes 24 ns on some CPUs and under 1 ns on others.
    pub const SPIN: u64 = 80;
    /// No call in the mailbox.
    pub const EMPTY: u32 = 0;
    /// A call waits for the poller.
    pub const REQUEST: u32 = 1;
    /// The poller is performing the call.
    pub const TAKEN: u32 = 2;
    /// The answer is in RESULT (or DECLINED is set).
    pub const DONE: u32 = 3;
    /// How long the doorbell waits for the poller to take a call, in ns. A poller on a
    /// core of its own takes it in well under a microsecond; one without a core would make
    /// a longer wait the miss's cost, paid before the exit the call then makes anyway.
    pub const SPIN_NS: u32 = 6000;
}

/// Byte offsets in the time page. Time is `base + ((rdtsc - TSC_BASE) * MULT) >> 32` ns.
pub mod time_page {
    /// u32: non-zero when the time fields may be used (else time calls exit).
    pub const VALID: u64 = 0;
    /// u32: the pid getpid answers.
    pub const PID: u64 = 4;
    /// u64: the guest TSC at which the bases below were taken.
    pub const TSC_BASE: u64 = 8;
    /// u64: nanoseconds per TSC tick, as a 32.32 fixed-point number.
    pub const MULT: u64 = 16;
    /// u64: the app's CLOCK_MONOTONIC at TSC_BASE, in ns.
    pub const MONOTONIC_NS: u64 = 24;
    /// u64: CLOCK_REALTIME at TSC_BASE, in ns since the epoch.
    pub const REALTIME_NS: u64 = 32;
}

/// Byte offsets in the scratch page.
pub mod scratch {
    /// u16: CS as the doorbell saw it (CPL 3 on kvm_pvm, 0 on hardware KVM).
    pub const CS: u64 = 0;
    /// u64: the app's RCX (its return address), saved by the doorbell's first
    /// instructions, for every call.
    pub const RCX: u64 = 8;
    /// u64: the app's RDX, saved likewise.
    pub const RDX: u64 = 16;
    /// u64: the app's RSP while the doorbell restores RFLAGS.
    pub const RSP: u64 = 24;
    /// u64: the app's RAX (the syscall number), saved likewise: with RCX and RDX it lets
    /// the VMM re-execute a call it stops before the result is committed.
    pub const RAX: u64 = 32;
    /// u64: the byte count of the copy a pread64 or read answered in the doorbell is
    /// making.
    pub const LEN: u64 = 40;
    /// u64 x [`super::file_table::FDS`]: the offset of each fd whose file-table entry has
    /// [`super::file_table::OFFSET_IN_GUEST`]. The app can write it (as it can lseek);
    /// the VMM takes a negative one as no offset to move to.
    pub const FILE_OFFSETS: u64 = 0x800;
    /// Top of the 16-byte stack the doorbell uses to restore RFLAGS with `popfq`.
    pub const STACK_TOP: u64 = 64;
    /// u32: the tid gettid answers: the thread on this vCPU (the VMM writes it).
    pub const TID: u64 = 0x100;
}

/// Guest-virtual address of the syscall entry point (LSTAR).
pub const DOORBELL_VA: u64 = SYSTEM_VA + DOORBELL_PAGE * PAGE_SIZE;
/// Guest-virtual address of the exception stubs.
pub const STUBS_VA: u64 = SYSTEM_VA + STUBS_PAGE * PAGE_SIZE;
/// Bytes per exception stub.
pub const STUB_SIZE: u64 = 8;
/// Number of exception vectors with a stub (the architectural exceptions).
pub const STUB_COUNT: u64 = 32;
/// I/O port of vector 0's stub; vector `v` uses `EXCEPTION_PORT_BASE + v`.
pub const EXCEPTION_PORT_BASE: u16 = 0x80;

/// Guest-physical address the doorbell stores to. No memory slot covers it.
pub const DOORBELL_MMIO_GPA: u64 = 0x4_8000_0000;
/// Guest-physical address of the calibration exit. No memory slot covers it.
pub const CALIBRATION_MMIO_GPA: u64 = DOORBELL_MMIO_GPA + PAGE_SIZE;
/// Guest-physical address of the notify exit (after a mailbox call). No slot covers it.
pub const NOTIFY_MMIO_GPA: u64 = DOORBELL_MMIO_GPA + 2 * PAGE_SIZE;
/// Guest-virtual address mapped to [`DOORBELL_MMIO_GPA`] (user, writable: the doorbell runs
/// at CPL 3 on kvm_pvm).
pub const DOORBELL_MMIO_VA: u64 = SYSTEM_VA + 0x10_0000;
/// Guest-virtual address mapped to [`CALIBRATION_MMIO_GPA`].
pub const CALIBRATION_MMIO_VA: u64 = DOORBELL_MMIO_VA + PAGE_SIZE;
/// Guest-virtual address mapped to [`NOTIFY_MMIO_GPA`].
pub const NOTIFY_MMIO_VA: u64 = DOORBELL_MMIO_VA + 2 * PAGE_SIZE;

/// Selectors of the GDT, in Linux's layout (STAR depends on it).
pub mod selector {
    /// Kernel 64-bit code.
    pub const KERNEL_CS: u16 = 0x10;
    /// Kernel data.
    pub const KERNEL_DS: u16 = 0x18;
    /// User 32-bit code (unused, but STAR's layout requires the slot).
    pub const USER_CS32: u16 = 0x23;
    /// User data, RPL 3.
    pub const USER_DS: u16 = 0x2b;
    /// User 64-bit code, RPL 3.
    pub const USER_CS: u16 = 0x33;
    /// The 16-byte TSS descriptor.
    pub const TSS: u16 = 0x40;
}

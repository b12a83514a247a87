//! The VMM's own heap.

/// Makes every thread allocate from the main heap. glibc gives each thread that allocates
/// while another holds the heap's lock an arena of its own, and keeps it: a mapped block
/// with its first pages resident and a page table for it, in every VMM, for the rest of
/// its life. A VMM's threads rarely allocate at the same time (the vCPU thread waits while
/// the mailbox poller performs its call), so one heap costs them nothing measurable and
/// saves an idle app's memory (issue #18). Call it before the process starts a thread.
pub fn use_one_arena() {
    // SAFETY: mallopt only changes the allocator's tuning; M_ARENA_MAX with 1 is valid.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX, 1) was refused");
    }
}

/// Returns the heap that setting up left free (parsing the image and snapshot, building
/// the address space) to the host: a resident idle app then costs what it uses, which
/// decides how many fit on a worker (issue #18).
pub fn give_back_free_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe { libc::malloc_trim(0) };
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    tracing::debug!(
        in_use = info.uordblks,
        free = info.fordblks,
        mapped = info.hblkhd,
        "heap after set-up"
    );
}

/// Returns the calling thread's stack below its current depth to the host: setting up
/// (parsing, loading, restoring) went much deeper than running the app does, and those
/// pages would otherwise stay resident for the app's whole life.
///
/// Pages are dropped one at a time downwards from two pages below the current one, and
/// only while they are resident: the walk ends at the first page the stack never reached
/// (or the end of the main thread's grow-down mapping), so it never goes past a thread's
/// stack into its guard page or the mapping beneath.
pub fn give_back_unused_stack() {
    const PAGE: usize = 4096;
    /// Deeper than any set-up goes (the default stack limit); a bound on the loop.
    const MOST: usize = 8 << 20;
    let here = 0u8;
    let depth = std::hint::black_box(&here) as *const u8 as usize;
    // This function's own frame and the calls it makes live in the margin.
    let top = (depth & !(PAGE - 1)).saturating_sub(2 * PAGE);
    let mut page = top;
    while page > 0 && top - page < MOST && resident(page) {
        // SAFETY: the page lies below this thread's stack pointer (the stack grows down)
        // and within its stack (every page from here up is resident, so the stack reached
        // it), where nothing live is kept; MADV_DONTNEED gives it back, and it reads as
        // zeros if the stack grows there again.
        if unsafe { libc::madvise(page as *mut libc::c_void, PAGE, libc::MADV_DONTNEED) } != 0 {
            break;
        }
        page -= PAGE;
    }
}

/// Whether the page at `page` is mapped and in memory.
fn resident(page: usize) -> bool {
    let mut state = 0u8;
    // SAFETY: mincore writes one byte for the one page asked about into `state`; an
    // unmapped page is an error (ENOMEM), not a fault.
    let rc = unsafe { libc::mincore(page as *mut libc::c_void, 4096, &mut state) };
    rc == 0 && state & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Touches `kib` KiB of stack below the caller, and returns the address of the deepest.
    #[inline(never)]
    fn go_deep(kib: usize) -> usize {
        let mut block = [0u8; 1024];
        std::hint::black_box(&mut block);
        let here = block.as_ptr() as usize;
        if kib <= 1 {
            here
        } else {
            std::hint::black_box(go_deep(kib - 1))
        }
    }

    #[test]
    fn the_stack_below_goes_and_what_is_above_and_beyond_stays() {
        // A thread of its own: a stack with a guard page and other mappings beneath.
        std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(|| {
                let deepest = go_deep(512) & !4095;
                assert!(resident(deepest), "the stack went that deep");
                let live = [7u8; 64];
                give_back_unused_stack();
                assert!(
                    !resident(deepest),
                    "the page 512 KiB down is still resident"
                );
                assert_eq!(
                    std::hint::black_box(live),
                    [7u8; 64],
                    "a live frame changed"
                );
                // The thread goes on using its stack.
                assert!(go_deep(600) > 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}

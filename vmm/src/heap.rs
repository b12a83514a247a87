//! The VMM's own heap.

/// Returns the heap that setting up left free (parsing the image and snapshot, building
/// the address space) to the host: a resident idle app then costs what it uses, which
/// decides how many fit on a worker (issue #18).
pub fn give_back_free_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own heap.
    unsafe { libc::malloc_trim(0) };
}

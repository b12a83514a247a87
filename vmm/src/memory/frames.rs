//! Allocation of guest-physical page frames.
//!
//! Frames come from a bump pointer until it reaches the end, then from a free list. A frame
//! that is freed while the guest may still hold a stale translation for it goes into
//! quarantine, and only becomes reusable after the next invalidation (see
//! `AddressSpace::take_invalidation`).

/// A guest-physical frame allocator over one region.
#[derive(Debug)]
pub struct FrameAllocator {
    base: u64,
    frames: u64,
    next_unused: u64,
    free: Vec<u64>,
    quarantine: Vec<u64>,
}

impl FrameAllocator {
    /// Creates an allocator for `frames` 4 KiB frames starting at guest-physical `base`.
    pub fn new(base: u64, frames: u64) -> Self {
        Self {
            base,
            frames,
            next_unused: 0,
            free: Vec::new(),
            quarantine: Vec::new(),
        }
    }

    /// Returns the guest-physical address of a free frame, or `None` when all are used.
    pub fn alloc(&mut self) -> Option<u64> {
        if let Some(gpa) = self.free.pop() {
            return Some(gpa);
        }
        if self.next_unused < self.frames {
            let gpa = self.base + self.next_unused * 4096;
            self.next_unused += 1;
            return Some(gpa);
        }
        None
    }

    /// Returns the first of `count` physically contiguous free frames, from the part
    /// never handed out, or `None` when there is not that much left.
    pub fn alloc_run(&mut self, count: u64) -> Option<u64> {
        if count == 0 || self.frames - self.next_unused < count {
            return None;
        }
        let gpa = self.base + self.next_unused * 4096;
        self.next_unused += count;
        Some(gpa)
    }

    /// Frames that can still be allocated (not counting quarantined ones).
    pub fn available(&self) -> u64 {
        self.frames - self.next_unused + self.free.len() as u64
    }

    /// Frames handed out and not yet freed.
    pub fn in_use(&self) -> u64 {
        self.next_unused - self.free.len() as u64 - self.quarantine.len() as u64
    }

    /// Frees a frame that no translation can still reach.
    pub fn free(&mut self, gpa: u64) {
        self.free.push(gpa);
    }

    /// Frees a frame that a stale guest translation may still reach.
    pub fn quarantine(&mut self, gpa: u64) {
        self.quarantine.push(gpa);
    }

    /// Makes quarantined frames reusable; call once stale translations are gone.
    pub fn release_quarantine(&mut self) {
        self.free.append(&mut self.quarantine);
    }

    /// Whether `gpa` is a frame of this allocator.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.base && gpa < self.base + self.frames * 4096 && gpa.is_multiple_of(4096)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_then_free_list_then_exhaustion() {
        let mut frames = FrameAllocator::new(0x1000, 2);
        let a = frames.alloc().unwrap();
        let b = frames.alloc().unwrap();
        assert_eq!((a, b), (0x1000, 0x2000));
        assert_eq!(frames.alloc(), None);
        frames.free(a);
        assert_eq!(frames.available(), 1);
        assert_eq!(frames.alloc(), Some(a));
    }

    #[test]
    fn runs_come_from_the_unused_part() {
        let mut frames = FrameAllocator::new(0, 4);
        assert_eq!(frames.alloc_run(3), Some(0));
        assert_eq!(frames.alloc_run(2), None);
        assert_eq!(frames.alloc(), Some(0x3000));
    }

    #[test]
    fn quarantined_frames_wait_for_release() {
        let mut frames = FrameAllocator::new(0, 1);
        let a = frames.alloc().unwrap();
        frames.quarantine(a);
        assert_eq!(frames.alloc(), None);
        assert_eq!(frames.in_use(), 0);
        frames.release_quarantine();
        assert_eq!(frames.alloc(), Some(a));
    }
}

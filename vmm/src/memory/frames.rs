//! Allocation of guest-physical page frames.
//!
//! Frames come from a bump pointer until it reaches the end, then from a free list. A frame
//! that is freed while the guest may still hold a stale translation for it goes into
//! quarantine, and only becomes reusable after the next invalidation (see
//! `AddressSpace::take_invalidation`). While a host transfer into or out of app memory runs
//! without the process lock ([`FrameAllocator::hold`]), every frame freed is held back
//! too: the transfer may still reach it, and must not land in a frame given to another
//! mapping meanwhile. A frame that is only held comes back once no transfer runs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A guest-physical frame allocator over one region.
#[derive(Debug)]
pub struct FrameAllocator {
    base: u64,
    frames: u64,
    next_unused: u64,
    free: Vec<u64>,
    quarantine: Vec<u64>,
    /// Transfers running without the process lock (see [`FrameAllocator::hold`]).
    holds: Arc<AtomicU32>,
    /// Frames freed while one ran, that no translation can reach.
    held_free: Vec<u64>,
    /// Frames freed while one ran, that a stale translation may still reach.
    held_quarantine: Vec<u64>,
}

/// A hold on the frames freed while it lives (see [`FrameAllocator::hold`]).
#[derive(Debug)]
pub struct FrameHold(Arc<AtomicU32>);

impl Drop for FrameHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
            holds: Arc::new(AtomicU32::new(0)),
            held_free: Vec::new(),
            held_quarantine: Vec::new(),
        }
    }

    /// Returns the guest-physical address of a free frame, or `None` when all are used.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free.is_empty() {
            self.held_now();
        }
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
        self.next_unused
            - self.free.len() as u64
            - self.quarantine.len() as u64
            - self.held_free.len() as u64
            - self.held_quarantine.len() as u64
    }

    /// Frees a frame that no translation can still reach.
    pub fn free(&mut self, gpa: u64) {
        if self.held_now() {
            self.held_free.push(gpa);
        } else {
            self.free.push(gpa);
        }
    }

    /// Frees a frame that a stale guest translation may still reach.
    pub fn quarantine(&mut self, gpa: u64) {
        if self.held_now() {
            self.held_quarantine.push(gpa);
        } else {
            self.quarantine.push(gpa);
        }
    }

    /// Holds back the frames freed from now on, until the hold returned (and every other)
    /// is dropped: for a host transfer into or out of app memory made without the process
    /// lock, which may still reach them.
    pub fn hold(&mut self) -> FrameHold {
        self.holds.fetch_add(1, Ordering::AcqRel);
        FrameHold(self.holds.clone())
    }

    /// Whether a hold is on; when none is any more, gives back what was held meanwhile.
    fn held_now(&mut self) -> bool {
        if self.holds.load(Ordering::Acquire) > 0 {
            return true;
        }
        self.free.append(&mut self.held_free);
        self.quarantine.append(&mut self.held_quarantine);
        false
    }

    /// Makes quarantined frames reusable; call once stale translations are gone.
    pub fn release_quarantine(&mut self) {
        // Frames held back wait for the transfers, and come back with a later call.
        self.held_now();
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

    #[test]
    fn frames_freed_during_a_transfer_wait_for_it() {
        let mut frames = FrameAllocator::new(0, 2);
        let (a, b) = (frames.alloc().unwrap(), frames.alloc().unwrap());
        let first = frames.hold();
        let second = frames.hold();
        frames.free(a);
        frames.quarantine(b);
        // An invalidation does not free what a running transfer may reach.
        frames.release_quarantine();
        assert_eq!(frames.alloc(), None);
        assert_eq!(frames.in_use(), 0);
        drop(first);
        assert_eq!(frames.alloc(), None, "one transfer still runs");
        drop(second);
        // The frame no translation reaches comes back at once; the other after the next
        // invalidation.
        assert_eq!(frames.alloc(), Some(a));
        assert_eq!(frames.alloc(), None);
        frames.release_quarantine();
        assert_eq!(frames.alloc(), Some(b));
    }
}

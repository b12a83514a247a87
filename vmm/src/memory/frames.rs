//! Allocation of guest-physical page frames.
//!
//! Frames come from a bump pointer until it reaches the end, then from a free list. A frame
//! that is freed while the guest may still hold a stale translation for it goes into
//! quarantine, and only becomes reusable after the next invalidation (see
//! `AddressSpace::take_invalidation`). While a host transfer into or out of app memory runs
//! without the process lock ([`FrameAllocator::hold`]), every frame freed is held back
//! too: the transfer may still reach it, and must not land in a frame given to another
//! mapping meanwhile. Only the frames of that transfer's buffer are held, until it ends.

/// A guest-physical frame allocator over one region.
#[derive(Debug)]
pub struct FrameAllocator {
    base: u64,
    frames: u64,
    next_unused: u64,
    free: Vec<u64>,
    quarantine: Vec<u64>,
    /// The guest-physical ranges `(start, len)` that transfers running without the
    /// process lock may reach, by hold (see [`FrameAllocator::hold`]).
    holds: Vec<(u64, Vec<(u64, usize)>)>,
    /// The next hold's number.
    next_hold: u64,
    /// Frames freed inside a held range, each with whether a stale translation may still
    /// reach it.
    held: Vec<(u64, bool)>,
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
            holds: Vec::new(),
            next_hold: 0,
            held: Vec::new(),
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
        self.next_unused
            - self.free.len() as u64
            - self.quarantine.len() as u64
            - self.held.len() as u64
    }

    /// Frees a frame that no translation can still reach.
    pub fn free(&mut self, gpa: u64) {
        if self.is_held(gpa) {
            self.held.push((gpa, false));
        } else {
            self.free.push(gpa);
        }
    }

    /// Frees a frame that a stale guest translation may still reach.
    pub fn quarantine(&mut self, gpa: u64) {
        if self.is_held(gpa) {
            self.held.push((gpa, true));
        } else {
            self.quarantine.push(gpa);
        }
    }

    /// Holds back the frames of `ranges` (guest-physical `(start, len)`) that are freed
    /// from now on, until [`FrameAllocator::release`] of the number returned: a host
    /// transfer into or out of app memory, made without the process lock, may still
    /// reach them.
    pub fn hold(&mut self, ranges: Vec<(u64, usize)>) -> u64 {
        let number = self.next_hold;
        self.next_hold = self.next_hold.wrapping_add(1);
        self.holds.push((number, ranges));
        number
    }

    /// Ends hold `number`: returns the frames it held back that no other hold does, each
    /// with whether a stale translation may still reach it. The caller clears and frees
    /// them ([`FrameAllocator::free`] or [`FrameAllocator::quarantine`]).
    pub fn release(&mut self, number: u64) -> Vec<(u64, bool)> {
        self.holds.retain(|(n, _)| *n != number);
        let held = std::mem::take(&mut self.held);
        let (still, released) = held.into_iter().partition(|&(gpa, _)| self.is_held(gpa));
        self.held = still;
        released
    }

    /// Whether a hold reaches the frame at `gpa`.
    fn is_held(&self, gpa: u64) -> bool {
        self.holds
            .iter()
            .flat_map(|(_, ranges)| ranges)
            .any(|&(start, len)| {
                let first = start & !0xfff;
                gpa >= first && gpa < start.saturating_add(len as u64)
            })
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

    #[test]
    fn frames_a_transfer_reaches_wait_for_it() {
        let mut frames = FrameAllocator::new(0, 4);
        let f: Vec<u64> = (0..4).map(|_| frames.alloc().unwrap()).collect();
        // Two transfers: one over frames 0 and 1 (from the middle of 0), one over 1.
        let first = frames.hold(vec![(f[0] + 100, 8000)]);
        let second = frames.hold(vec![(f[1], 4096)]);
        frames.free(f[0]);
        frames.quarantine(f[1]);
        // A frame no transfer reaches comes back as ever.
        frames.free(f[3]);
        assert_eq!(frames.alloc(), Some(f[3]));
        // An invalidation does not free what a running transfer may reach.
        frames.release_quarantine();
        assert_eq!(frames.alloc(), None);
        assert_eq!(frames.in_use(), 2, "frames 2 and 3");
        assert_eq!(frames.release(first), vec![(f[0], false)]);
        assert_eq!(frames.release(second), vec![(f[1], true)]);
        assert_eq!(frames.release(second), vec![], "released once");
    }
}

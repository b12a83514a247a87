//! The app's virtual memory areas: what each range of its address space is, as `mmap`,
//! `brk` and the loader made it.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

/// Page protection, as in `mmap(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prot(pub u32);

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot(0);
    /// Readable.
    pub const READ: Prot = Prot(1);
    /// Writable.
    pub const WRITE: Prot = Prot(2);
    /// Executable.
    pub const EXEC: Prot = Prot(4);
    /// Read and write.
    pub const RW: Prot = Prot(3);

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

/// What the pages of an area are filled from when first touched.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Zeros.
    Anonymous,
    /// A private copy of a file.
    File {
        /// The open file.
        file: Arc<File>,
        /// The file offset of the area's first byte.
        offset: u64,
        /// The file's path inside the app's root, for snapshots and diagnostics.
        path: Arc<str>,
        /// Whether the file is immutable for as long as the app runs (it is in the
        /// read-only root), so its pages may be mapped straight from the host's page cache
        /// instead of copied.
        immutable: bool,
    },
    /// The file itself (MAP_SHARED, or shared anonymous memory, which is a host memfd):
    /// the area's frames are mapped from the host file, so the guest's writes reach it at
    /// once, and a process forked from this one (a host fork of its VMM) keeps sharing the
    /// same pages. Only for files open for writing; a read-only shared mapping is a private
    /// copy ([`Backing::File`]), which reads the same.
    Shared {
        /// The open file.
        file: Arc<File>,
        /// The file offset of the area's first byte.
        offset: u64,
        /// The file's path inside the app's root (or the memfd's name), for diagnostics.
        path: Arc<str>,
    },
}

impl Backing {
    /// The file offset of an area that starts `by` bytes further on (anonymous memory has
    /// none).
    pub(super) fn advance(&mut self, by: u64) {
        if let Backing::File { offset, .. } | Backing::Shared { offset, .. } = self {
            *offset = offset.saturating_add(by);
        }
    }

    /// The file an area maps and where its first byte lies in it, if any.
    pub fn file(&self) -> Option<(&Arc<File>, u64, &Arc<str>)> {
        match self {
            Backing::Anonymous => None,
            Backing::File {
                file, offset, path, ..
            }
            | Backing::Shared { file, offset, path } => Some((file, *offset, path)),
        }
    }
}

/// What an area is for; it decides nothing but names the area in diagnostics. The values
/// are those a snapshot records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VmaRole {
    /// An ordinary mapping.
    Mapping,
    /// The brk heap.
    Heap,
    /// The main stack.
    Stack,
}

/// One area: a page-aligned range with one protection and one backing.
#[derive(Debug, Clone)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Protection.
    pub prot: Prot,
    /// Where its pages come from.
    pub backing: Backing,
    /// What it is for.
    pub role: VmaRole,
}

impl Vma {
    /// The part of this area within `[start, end)`, which must overlap it.
    fn clip(&self, start: u64, end: u64) -> Vma {
        let new_start = start.max(self.start);
        let mut piece = self.clone();
        piece.backing.advance(new_start - self.start);
        piece.start = new_start;
        piece.end = end.min(self.end);
        piece
    }

    /// Whether `next`, which starts where this ends, can be merged into this area.
    fn merges_with(&self, next: &Vma) -> bool {
        self.end == next.start
            && self.prot == next.prot
            && self.role == next.role
            && matches!(
                (&self.backing, &next.backing),
                (Backing::Anonymous, Backing::Anonymous)
            )
    }
}

/// The set of areas, ordered and non-overlapping.
#[derive(Debug, Default)]
pub struct VmaSet {
    by_start: BTreeMap<u64, Vma>,
}

impl VmaSet {
    /// The area containing `addr`.
    pub fn get(&self, addr: u64) -> Option<&Vma> {
        self.by_start
            .range(..=addr)
            .next_back()
            .map(|(_, vma)| vma)
            .filter(|vma| addr < vma.end)
    }

    /// The areas overlapping `[start, end)`, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self
            .by_start
            .range(..=start)
            .next_back()
            .filter(|(_, vma)| vma.end > start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.by_start
            .range(first..end)
            .map(|(_, vma)| vma)
            .filter(move |vma| vma.end > start)
    }

    /// Whether `[start, end)` overlaps no area.
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).next().is_none()
    }

    /// Whether `[start, end)` is entirely covered by areas, with no holes.
    pub fn is_covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for vma in self.overlapping(start, end) {
            if vma.start > at {
                return false;
            }
            at = vma.end;
        }
        at >= end
    }

    /// Removes `[start, end)` from the set, splitting areas that straddle its edges, and
    /// returns the removed parts.
    pub fn carve(&mut self, start: u64, end: u64) -> Vec<Vma> {
        let starts: Vec<u64> = self.overlapping(start, end).map(|v| v.start).collect();
        let mut removed = Vec::with_capacity(starts.len());
        for key in starts {
            let vma = self.by_start.remove(&key).expect("key came from the map");
            if vma.start < start {
                let left = vma.clip(vma.start, start);
                self.by_start.insert(left.start, left);
            }
            if vma.end > end {
                let right = vma.clip(end, vma.end);
                self.by_start.insert(right.start, right);
            }
            removed.push(vma.clip(start, end));
        }
        removed
    }

    /// Adds an area over a free range, merging it with compatible neighbours.
    pub fn insert(&mut self, mut vma: Vma) {
        debug_assert!(self.is_free(vma.start, vma.end));
        if let Some((&prev_start, prev)) = self.by_start.range(..vma.start).next_back() {
            if prev.merges_with(&vma) {
                vma.start = prev_start;
                self.by_start.remove(&prev_start);
            }
        }
        if let Some(next) = self.by_start.get(&vma.end) {
            if vma.merges_with(next) {
                vma.end = next.end;
                self.by_start.remove(&next.start.clone());
            }
        }
        self.by_start.insert(vma.start, vma);
    }

    /// The highest free range of `len` bytes within `[low, high)`.
    pub fn find_free_top_down(&self, len: u64, low: u64, high: u64) -> Option<u64> {
        let mut gap_end = high;
        for (_, vma) in self.by_start.range(..high).rev() {
            if vma.end <= gap_end && gap_end - vma.end >= len {
                return Some(gap_end - len).filter(|&s| s >= low);
            }
            gap_end = gap_end.min(vma.start);
            if gap_end < low + len {
                return None;
            }
        }
        gap_end.checked_sub(len).filter(|&s| s >= low)
    }

    /// All areas, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.by_start.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(start: u64, end: u64, prot: Prot) -> Vma {
        Vma {
            start,
            end,
            prot,
            backing: Backing::Anonymous,
            role: VmaRole::Mapping,
        }
    }

    #[test]
    fn carve_splits_straddling_areas() {
        let mut set = VmaSet::default();
        set.insert(anon(0x1000, 0x5000, Prot::RW));
        let removed = set.carve(0x2000, 0x3000);
        assert_eq!(removed.len(), 1);
        assert_eq!((removed[0].start, removed[0].end), (0x2000, 0x3000));
        let left: Vec<_> = set.iter().map(|v| (v.start, v.end)).collect();
        assert_eq!(left, vec![(0x1000, 0x2000), (0x3000, 0x5000)]);
        assert!(set.is_free(0x2000, 0x3000));
        assert!(!set.is_covered(0x1000, 0x5000));
    }

    #[test]
    fn adjacent_compatible_areas_merge() {
        let mut set = VmaSet::default();
        set.insert(anon(0x1000, 0x2000, Prot::RW));
        set.insert(anon(0x3000, 0x4000, Prot::RW));
        set.insert(anon(0x2000, 0x3000, Prot::RW));
        assert_eq!(set.iter().count(), 1);
        set.insert(anon(0x4000, 0x5000, Prot::READ));
        assert_eq!(set.iter().count(), 2);
    }

    #[test]
    fn top_down_search_skips_used_ranges() {
        let mut set = VmaSet::default();
        set.insert(anon(0x8000, 0x10000, Prot::RW));
        assert_eq!(set.find_free_top_down(0x1000, 0, 0x10000), Some(0x7000));
        assert_eq!(set.find_free_top_down(0x1000, 0, 0x11000), Some(0x10000));
        assert_eq!(set.find_free_top_down(0x9000, 0, 0x10000), None);
        assert_eq!(set.find_free_top_down(0x8000, 0, 0x10000), Some(0));
    }
}

//! Page runs: building them from pages, and resolving them through a chain of snapshots
//! (an increment's `Parent` pages are in the snapshot before it, and so on).

use crate::format::{Manifest, PageRun, PageSource, VpnRange};

/// Merges pages (page number and source, in address order) into runs: consecutive pages
/// with one source, and for stored pages consecutive indices.
pub fn runs(pages: impl IntoIterator<Item = (u64, PageSource)>) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::new();
    for (vpn, source) in pages {
        if let Some(last) = out.last_mut() {
            let contiguous = last.vpn + last.count == vpn;
            let same = match (last.source, source) {
                (PageSource::Stored { index: a }, PageSource::Stored { index: b }) => {
                    a + last.count == b
                }
                (a, b) => a == b,
            };
            if contiguous && same {
                last.count += 1;
                continue;
            }
        }
        out.push(PageRun {
            vpn,
            count: 1,
            source,
        });
    }
    out
}

/// Collapses sorted page numbers into ranges.
pub fn ranges(vpns: impl IntoIterator<Item = u64>) -> Vec<VpnRange> {
    let mut out: Vec<VpnRange> = Vec::new();
    for vpn in vpns {
        match out.last_mut() {
            Some(last) if last.vpn + last.count == vpn => last.count += 1,
            _ => out.push(VpnRange { vpn, count: 1 }),
        }
    }
    out
}

/// Whether `vpn` is in `ranges` (sorted, disjoint).
pub fn covered(ranges: &[VpnRange], vpn: u64) -> bool {
    let at = ranges.partition_point(|r| r.vpn + r.count <= vpn);
    ranges.get(at).is_some_and(|r| r.vpn <= vpn)
}

/// How many pages `a` and `b` (each sorted and disjoint, as bounds checks them) share.
pub fn overlap(a: &[VpnRange], b: &[VpnRange]) -> u64 {
    let (mut i, mut j, mut shared) = (0, 0, 0u64);
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        let (x_end, y_end) = (x.vpn.saturating_add(x.count), y.vpn.saturating_add(y.count));
        shared = shared.saturating_add(x_end.min(y_end).saturating_sub(x.vpn.max(y.vpn)));
        if x_end <= y_end {
            i += 1;
        } else {
            j += 1;
        }
    }
    shared
}

/// A run of pages with one resolved source: `count` pages from `vpn`; for `Stored`, page
/// `index` on of the page file at chain depth `depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The first page.
    pub vpn: u64,
    /// How many.
    pub count: u64,
    /// Where they are (never `Parent`).
    pub source: PageSource,
    /// Which snapshot of the chain holds them (0: the newest).
    pub depth: usize,
}

/// Resolves pages `[vpn, vpn + count)` of `chain[depth]` (newest first), following
/// `Parent` links run by run, into `out`. `None` if some page is in no snapshot of the
/// chain.
pub fn resolve_run(
    chain: &[Manifest],
    vpn: u64,
    count: u64,
    depth: usize,
    out: &mut Vec<Piece>,
) -> Option<()> {
    let runs = &chain.get(depth)?.pages;
    let end = vpn + count;
    let mut at = vpn;
    let mut i = runs.partition_point(|r| r.vpn + r.count <= vpn);
    while at < end {
        let run = runs.get(i).filter(|r| r.vpn <= at)?;
        let stop = end.min(run.vpn + run.count);
        match run.source {
            PageSource::Parent => resolve_run(chain, at, stop - at, depth + 1, out)?,
            PageSource::Stored { index } => out.push(Piece {
                vpn: at,
                count: stop - at,
                source: PageSource::Stored {
                    index: index + (at - run.vpn),
                },
                depth,
            }),
            other => out.push(Piece {
                vpn: at,
                count: stop - at,
                source: other,
                depth,
            }),
        }
        at = stop;
        i += 1;
    }
    Some(())
}

/// Every page of the newest snapshot of `chain`, resolved.
pub fn resolve_all(chain: &[Manifest]) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    for run in &chain.first()?.pages {
        resolve_run(chain, run.vpn, run.count, 0, &mut pieces)?;
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    #[test]
    fn overlap_counts_the_pages_two_sets_share() {
        use super::overlap;
        let r = |vpn, count| crate::format::VpnRange { vpn, count };
        assert_eq!(overlap(&[], &[r(0, 5)]), 0);
        assert_eq!(overlap(&[r(0, 5)], &[r(0, 5)]), 5);
        assert_eq!(overlap(&[r(0, 5)], &[r(5, 5)]), 0);
        assert_eq!(overlap(&[r(0, 10)], &[r(2, 3), r(8, 4)]), 5);
        assert_eq!(overlap(&[r(2, 3), r(8, 4)], &[r(0, 10)]), 5);
        assert_eq!(
            overlap(&[r(0, 2), r(4, 2), r(9, 1)], &[r(1, 4), r(9, 3)]),
            3
        );
        assert_eq!(overlap(&[r(u64::MAX - 1, 5)], &[r(u64::MAX - 3, 9)]), 1);
    }

    use super::*;

    fn run(vpn: u64, count: u64, source: PageSource) -> PageRun {
        PageRun { vpn, count, source }
    }

    #[test]
    fn runs_merge_and_chains_resolve() {
        let stored = |index| PageSource::Stored { index };
        let merged = runs([
            (1, stored(0)),
            (2, stored(1)),
            (3, stored(5)),
            (4, PageSource::Zero),
            (5, PageSource::Zero),
            (7, PageSource::Zero),
        ]);
        assert_eq!(
            merged,
            [
                run(1, 2, stored(0)),
                run(3, 1, stored(5)),
                run(4, 2, PageSource::Zero),
                run(7, 1, PageSource::Zero)
            ]
        );
        let parent = Manifest {
            pages: vec![run(0, 10, stored(0))],
            ..Default::default()
        };
        let newest = Manifest {
            pages: vec![
                run(0, 4, PageSource::Parent),
                run(4, 2, stored(0)),
                run(6, 4, PageSource::Parent),
            ],
            ..Default::default()
        };
        let chain = [newest, parent];
        let mut pieces = Vec::new();
        resolve_run(&chain, 2, 6, 0, &mut pieces).unwrap();
        assert_eq!(
            pieces,
            [
                Piece {
                    vpn: 2,
                    count: 2,
                    source: stored(2),
                    depth: 1
                },
                Piece {
                    vpn: 4,
                    count: 2,
                    source: stored(0),
                    depth: 0
                },
                Piece {
                    vpn: 6,
                    count: 2,
                    source: stored(6),
                    depth: 1
                },
            ]
        );
        assert_eq!(resolve_all(&chain).unwrap().len(), 3);
        assert!(resolve_run(&chain, 9, 3, 0, &mut pieces).is_none());
        let hot = ranges([1, 2, 3, 7]);
        assert!(covered(&hot, 2) && covered(&hot, 7) && !covered(&hot, 5));
    }
}

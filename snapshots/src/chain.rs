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

/// What a caller knows of a snapshot's chain before its manifest is read (a hub keeps it
/// with the app): a restore from S3 asks for these levels, and this much of each page
/// file, in its first round trip. Only a guess: the manifests decide, and a wrong one
/// costs GETs, never correctness.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHint {
    /// The snapshot's ancestors, newest first, as its manifest lists them.
    #[serde(default)]
    pub ancestors: Vec<String>,
    /// Bytes at the start of each page file of the chain (the snapshot's, then its
    /// ancestors') that hold the pages a restore brings in first ([`hot_set`]): what it
    /// needs before the app runs, in whole chunks.
    #[serde(default)]
    pub first_parts: Vec<u64>,
    /// The levels of the chain stored packed in S3 (README §5.7), with their bases: a
    /// restore asks for their packed objects, and their bases it lacks, in the first round
    /// trip (a worker learns this when it uploads, so [`ChainHint::of`] leaves it empty).
    #[serde(default)]
    pub packed: Vec<PackedLevel>,
}

/// A snapshot whose page file S3 holds packed, against base `base` (`APP/ID`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PackedLevel {
    /// The snapshot.
    pub id: String,
    /// Its base.
    pub base: String,
}

impl ChainHint {
    /// This hint cut to what a manifest could list ([`crate::format::MAX_ANCESTORS`]
    /// ancestors, and a size for each level): what a hub keeps of a worker's report.
    pub fn bounded(mut self) -> Self {
        self.ancestors.truncate(crate::format::MAX_ANCESTORS);
        self.first_parts
            .truncate(crate::format::MAX_ANCESTORS.saturating_add(1));
        self.packed
            .truncate(crate::format::MAX_ANCESTORS.saturating_add(1));
        self
    }

    /// The hint for the chain `manifests` (newest first, as [`crate::store::chain`]
    /// gives). Its hot pages are those of the newest snapshot's one port set, if it has
    /// exactly one (a server on one port: the port its first client will come to), else
    /// its app-wide ActiveSet.
    pub fn of(manifests: &[Manifest]) -> Self {
        let Some(newest) = manifests.first() else {
            return ChainHint::default();
        };
        let port = match newest.port_sets.as_slice() {
            [only] => Some(only.port),
            _ => None,
        };
        let hot = hot_set(newest, port);
        // One past the last hot page of each page file.
        let mut ends = vec![0u64; manifests.len()];
        for piece in resolve_all(manifests).unwrap_or_default() {
            let (PageSource::Stored { index }, Some(end)) =
                (piece.source, ends.get_mut(piece.depth))
            else {
                continue;
            };
            if let Some(last) = (0..piece.count)
                .rev()
                .find(|&i| covered(hot, piece.vpn.saturating_add(i)))
            {
                *end = (*end).max(index.saturating_add(last).saturating_add(1));
            }
        }
        let first_parts = ends
            .iter()
            .zip(manifests)
            .map(|(&end, m)| {
                let chunk = m.chunk_pages.max(1);
                end.div_ceil(chunk)
                    .saturating_mul(chunk)
                    .saturating_mul(crate::format::PAGE_SIZE)
            })
            .collect();
        ChainHint {
            ancestors: newest.ancestors.clone(),
            first_parts,
            packed: Vec::new(),
        }
    }
}

/// The pages a restore brings in first: those of `port`'s requests if `manifest`
/// recorded any, else the app-wide ActiveSet.
pub fn hot_set(manifest: &Manifest, port: Option<u16>) -> &[VpnRange] {
    port.and_then(|port| {
        manifest
            .port_sets
            .iter()
            .find(|set| set.port == port && !set.pages.is_empty())
    })
    .map_or(&manifest.activeset[..], |set| &set.pages[..])
}

/// The page-file chunks that hold the `hot` pages of `pieces` (resolved from a chain),
/// in the order first met, of the snapshots that `level` numbers by depth (a page feed's
/// levels; the others are left out).
pub fn hot_chunks(
    chain: &[Manifest],
    pieces: &[Piece],
    hot: &[VpnRange],
    level: impl Fn(usize) -> Option<u32>,
) -> Vec<crate::feed::ChunkId> {
    let mut chunks: Vec<crate::feed::ChunkId> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for piece in pieces {
        let (PageSource::Stored { index }, Some(level)) = (piece.source, level(piece.depth)) else {
            continue;
        };
        let chunk_pages = chain.get(piece.depth).map_or(1, |m| m.chunk_pages.max(1));
        for i in (0..piece.count).filter(|i| covered(hot, piece.vpn.saturating_add(*i))) {
            let id = crate::feed::ChunkId {
                level,
                chunk: index.saturating_add(i) / chunk_pages,
            };
            if seen.insert(id) {
                chunks.push(id);
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    #[test]
    fn hot_chunks_are_those_of_the_fed_levels_holding_hot_pages_in_order() {
        use super::{hot_chunks, Piece};
        use crate::feed::ChunkId;
        use crate::format::{Manifest, PageSource, VpnRange};
        let level = |chunk_pages| Manifest {
            chunk_pages,
            ..Default::default()
        };
        let chain = [level(4), level(2)];
        let stored = |vpn, count, index, depth| Piece {
            vpn,
            count,
            source: PageSource::Stored { index },
            depth,
        };
        let pieces = [
            stored(100, 8, 0, 0),
            Piece {
                vpn: 108,
                count: 4,
                source: PageSource::Zero,
                depth: 0,
            },
            stored(112, 8, 10, 1),
        ];
        let hot = [VpnRange {
            vpn: 102,
            count: 14,
        }];
        // Both levels fed: pages 102..108 are chunks 0 and 1 of the newest (4 pages a
        // chunk); 112..116 are pages 10..14 of the older, its chunks 5 and 6.
        let id = |level, chunk| ChunkId { level, chunk };
        let both = hot_chunks(&chain, &pieces, &hot, |depth| Some(depth as u32));
        assert_eq!(both, [id(0, 0), id(0, 1), id(1, 5), id(1, 6)]);
        // Only the older one fed, as level 0.
        let older = hot_chunks(&chain, &pieces, &hot, |depth| (depth == 1).then_some(0));
        assert_eq!(older, [id(0, 5), id(0, 6)]);
    }

    #[test]
    fn a_chain_hint_names_the_ancestors_and_where_each_page_file_s_hot_pages_end() {
        use super::ChainHint;
        use crate::format::{Manifest, PageRun, PageSource, PortSet, VpnRange};
        let run = |vpn, count, source| PageRun { vpn, count, source };
        // The newest: pages 100..104 its own (indexes 0..4), 104..200 from its parent.
        let newest = Manifest {
            chunk_pages: 2,
            ancestors: vec!["full".into()],
            pages: vec![
                run(100, 4, PageSource::Stored { index: 0 }),
                run(104, 96, PageSource::Parent),
            ],
            activeset: vec![VpnRange {
                vpn: 100,
                count: 100,
            }],
            port_sets: vec![PortSet {
                port: 80,
                pages: vec![
                    VpnRange { vpn: 101, count: 1 },
                    VpnRange {
                        vpn: 150,
                        count: 10,
                    },
                ],
            }],
            ..Default::default()
        };
        let full = Manifest {
            chunk_pages: 4,
            pages: vec![run(100, 100, PageSource::Stored { index: 0 })],
            ..Default::default()
        };
        // Its one port set decides: page 101 is index 1 of the newest (one chunk of 2
        // pages); 150..160 are indexes 50..60 of the full one (15 chunks of 4 pages).
        let hint = ChainHint::of(&[newest.clone(), full.clone()]);
        assert_eq!(hint.ancestors, ["full"]);
        assert_eq!(hint.first_parts, [2 * 4096, 60 * 4096]);
        // With two port sets, the app-wide set: everything up to page 199.
        let mut two_ports = newest;
        two_ports.port_sets.push(PortSet {
            port: 443,
            pages: vec![VpnRange { vpn: 100, count: 1 }],
        });
        let hint = ChainHint::of(&[two_ports, full]);
        assert_eq!(hint.first_parts, [4 * 4096, 100 * 4096]);
        assert_eq!(ChainHint::of(&[]), ChainHint::default());
    }

    #[test]
    fn the_first_port_s_pages_come_first_and_the_app_wide_set_is_the_fallback() {
        use super::hot_set;
        use crate::format::{Manifest, PortSet, VpnRange};
        let range = |vpn, count| VpnRange { vpn, count };
        let manifest = Manifest {
            activeset: vec![range(0, 100)],
            port_sets: vec![
                PortSet {
                    port: 80,
                    pages: vec![range(10, 2)],
                },
                PortSet {
                    port: 443,
                    pages: Vec::new(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(hot_set(&manifest, Some(80)), [range(10, 2)]);
        // A port with no recorded requests, one never seen, or none: the app-wide set.
        assert_eq!(hot_set(&manifest, Some(443)), [range(0, 100)]);
        assert_eq!(hot_set(&manifest, Some(8080)), [range(0, 100)]);
        assert_eq!(hot_set(&manifest, None), [range(0, 100)]);
    }

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

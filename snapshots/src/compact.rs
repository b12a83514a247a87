//! Merging a chain of incremental snapshots into one full snapshot.

use crate::chain::{covered, resolve_all, runs};
use crate::format::{Manifest, PageSource, PAGE_SIZE};
use crate::key::SnapshotKey;
use crate::pagefile::{PageFileWriter, CHUNK_PAGES};
use crate::store::{chain, new_id, Store, StoreError};
use std::collections::HashMap;

/// Why a compaction failed.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A page file failed.
    #[error(transparent)]
    PageFile(#[from] crate::pagefile::PageFileError),
    /// Reading a page failed.
    #[error("reading page {index} of snapshot {id}")]
    Read {
        /// The snapshot.
        id: String,
        /// The page.
        index: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Some page is in no snapshot of the chain.
    #[error("the chain misses pages (from {0:#x})")]
    Unresolved(u64),
}

/// Merges the chain ending at snapshot `id` into a new full snapshot, makes it the newest,
/// and removes the snapshots the chain no longer needs. Every manifest is checked under
/// `key`, and the new one is authenticated with it. Returns the new manifest.
pub fn compact(store: &dyn Store, key: &SnapshotKey, id: &str) -> Result<Manifest, CompactError> {
    let chain = chain(store, key, id)?;
    let newest = &chain[0];
    let new = new_id();
    // Every page, resolved; stored ones in ActiveSet-first order.
    let pieces = resolve_all(&chain).ok_or(CompactError::Unresolved(
        newest.pages.first().map_or(0, |r| r.vpn * PAGE_SIZE),
    ))?;
    let pages: Vec<(u64, usize, PageSource)> = pieces
        .iter()
        .flat_map(|p| {
            (0..p.count).map(move |i| {
                let source = match p.source {
                    PageSource::Stored { index } => PageSource::Stored { index: index + i },
                    other => other,
                };
                (p.vpn + i, p.depth, source)
            })
        })
        .collect();
    let stored: Vec<usize> = (0..pages.len())
        .filter(|&i| matches!(pages[i].2, PageSource::Stored { .. }))
        .collect();
    let (first, rest): (Vec<usize>, Vec<usize>) = stored
        .into_iter()
        .partition(|&i| covered(&newest.activeset, pages[i].0));
    let activeset_prefix = first.len() as u64;
    // The chain's page files, verified and mapped: the writer borrows pages from them.
    let mut maps = Vec::new();
    for m in &chain {
        let path = store.page_file(&m.id)?;
        let read = |source| CompactError::Read {
            id: m.id.clone(),
            index: 0,
            source,
        };
        let file = std::fs::File::open(&path).map_err(read)?;
        // SAFETY: the store never rewrites a committed page file (new snapshots get new
        // names), so the mapping's contents do not change while it is borrowed.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(read)?;
        crate::pagefile::verify_bytes(&map, m)?;
        maps.push(map);
    }
    let path = store.scratch(&new, "pages")?;
    let mut writer = PageFileWriter::create(&path)?;
    let mut new_sources: Vec<PageSource> = pages.iter().map(|p| p.2).collect();
    // The pages copied so far, by where they were (depth, index): the other processes of
    // a tree refer to some of the first one's, and get the same copy.
    let mut copied: HashMap<(usize, u64), u64> = HashMap::new();
    let page_at = |depth: usize, index: u64| {
        let at = index
            .checked_mul(PAGE_SIZE)
            .and_then(|at| usize::try_from(at).ok());
        at.and_then(|at| maps[depth].get(at..at.checked_add(PAGE_SIZE as usize)?))
            .ok_or_else(|| CompactError::Read {
                id: chain[depth].id.clone(),
                index,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })
    };
    for &i in first.iter().chain(&rest) {
        let (_, depth, source) = pages[i];
        let PageSource::Stored { index } = source else {
            continue;
        };
        let new = writer.push(page_at(depth, index)?)?;
        copied.insert((depth, index), new);
        new_sources[i] = PageSource::Stored { index: new };
    }
    let mut tree = newest.tree.clone();
    for part in tree.iter_mut().flat_map(|t| t.others.iter_mut()) {
        let part_chain = Manifest::part_chain(&chain, part.pid);
        let pieces = resolve_all(&part_chain).ok_or(CompactError::Unresolved(
            part.pages.first().map_or(0, |r| r.vpn * PAGE_SIZE),
        ))?;
        let mut sources = Vec::new();
        for piece in pieces {
            for i in 0..piece.count {
                let source = match piece.source {
                    PageSource::Stored { index } => {
                        let at = (piece.depth, index + i);
                        let new = match copied.get(&at) {
                            Some(&new) => new,
                            None => {
                                let new = writer.push(page_at(at.0, at.1)?)?;
                                copied.insert(at, new);
                                new
                            }
                        };
                        PageSource::Stored { index: new }
                    }
                    other => other,
                };
                sources.push((piece.vpn + i, source));
            }
        }
        part.pages = runs(sources);
    }
    let (page_count, chunk_digests) = writer.finish()?;
    let runs = runs(pages.iter().map(|p| p.0).zip(new_sources));
    let mut manifest = newest.clone();
    manifest.tree = tree;
    manifest.id = new.clone();
    manifest.parent = None;
    manifest.ancestors.clear();
    // Its prefetch record was about the parent the compacted snapshot no longer has.
    manifest.prefetched = None;
    manifest.pages = runs;
    manifest.page_count = page_count;
    manifest.chunk_pages = CHUNK_PAGES;
    manifest.chunk_digests = chunk_digests;
    manifest.activeset_prefix = activeset_prefix;
    manifest.stats.stored_pages = page_count;
    manifest.stats.parent_pages = 0;
    let data = match store.data_archive(&newest.id)? {
        Some(archive) => {
            let copy = store.scratch(&new, "data")?;
            crate::private::copy(&archive, &copy).map_err(|source| CompactError::Read {
                id: newest.id.clone(),
                index: 0,
                source,
            })?;
            Some(copy)
        }
        None => None,
    };
    store.commit(&manifest, key, &path, data.as_deref())?;
    for old in &chain {
        store.remove(&old.id)?;
    }
    Ok(manifest)
}

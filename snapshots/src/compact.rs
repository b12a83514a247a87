//! Merging a chain of incremental snapshots into one full snapshot.

use crate::chain::{covered, resolve_all, runs};
use crate::format::{Manifest, PageSource, PAGE_SIZE};
use crate::key::SnapshotKey;
use crate::pagefile::{PageFileWriter, CHUNK_PAGES};
use crate::store::{chain, new_id, Store, StoreError};

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
    for &i in first.iter().chain(&rest) {
        let (_, depth, source) = pages[i];
        let PageSource::Stored { index } = source else {
            continue;
        };
        let at = (index * PAGE_SIZE) as usize;
        let page = maps[depth]
            .get(at..at + PAGE_SIZE as usize)
            .ok_or_else(|| CompactError::Read {
                id: chain[depth].id.clone(),
                index,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
        new_sources[i] = PageSource::Stored {
            index: writer.push(page)?,
        };
    }
    let (page_count, chunk_digests) = writer.finish()?;
    let runs = runs(pages.iter().map(|p| p.0).zip(new_sources));
    let mut manifest = newest.clone();
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

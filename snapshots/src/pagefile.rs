//! The page file: the stored pages of a snapshot, 4 KiB each, back to back, the ActiveSet
//! first. It is written in large sequential writes and digested in chunks (BLAKE3 per
//! [`CHUNK_PAGES`] pages), so that a restore can verify just the parts it reads. The
//! digests are in the authenticated manifest, so a verified chunk is the one written.

use crate::format::{Digest, Manifest, PAGE_SIZE};
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Pages per digested chunk (256 KiB).
pub const CHUNK_PAGES: u64 = 64;
/// Pages gathered before one `writev` (1 MiB): small enough that a page is still in the
/// CPU cache from its zero check and digest when the kernel copies it.
const BATCH_PAGES: usize = 256;
/// Why a page file could not be written or verified.
#[derive(Debug, thiserror::Error)]
pub enum PageFileError {
    /// A host I/O error.
    #[error("{what} {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than its manifest says.
    #[error("the page file is truncated: {have} bytes, expected {expected}")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A chunk does not match its digest.
    #[error("the page file is corrupt: chunk {chunk} (pages {first}..{end}) fails its checksum")]
    Corrupt {
        /// The chunk.
        chunk: u64,
        /// Its first page.
        first: u64,
        /// One past its last page.
        end: u64,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PageFileError + 'a {
    move |source| PageFileError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Bytes of a full chunk.
const CHUNK_BYTES: usize = (CHUNK_PAGES * PAGE_SIZE) as usize;
/// Chunks queued for the digest thread at most (1 MiB).
const QUEUED_CHUNKS: usize = 4;

/// Digests chunks on a thread of its own, in order, so that hashing overlaps writing.
#[derive(Debug)]
struct Digester {
    chunks: std::sync::mpsc::SyncSender<Vec<u8>>,
    /// Buffers the thread is done with, to fill again.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: std::thread::JoinHandle<Vec<Digest>>,
}

impl Digester {
    fn start() -> std::io::Result<Self> {
        let (chunks, queued) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUED_CHUNKS);
        let (done, spare) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("page-digests".into())
            .spawn(move || {
                let mut digests = Vec::new();
                for chunk in queued {
                    digests.push(blake3::hash(&chunk).into());
                    let _ = done.send(chunk);
                }
                digests
            })?;
        Ok(Self {
            chunks,
            spare,
            thread,
        })
    }

    /// A buffer for the next chunk.
    fn buffer(&self) -> Vec<u8> {
        let mut buffer = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK_BYTES));
        buffer.clear();
        buffer
    }

    /// Queues a chunk; false if the thread has gone.
    fn digest(&self, chunk: Vec<u8>) -> bool {
        self.chunks.send(chunk).is_ok()
    }

    /// Every chunk's digest, in order (`None` if the thread panicked).
    fn finish(self) -> Option<Vec<Digest>> {
        drop(self.chunks);
        self.thread.join().ok()
    }
}

/// Writes a page file without copying it: pages are borrowed (from guest memory at capture,
/// from mapped page files at compaction) and handed to the kernel in batches with `writev`.
/// Each chunk is also copied once for its digest: BLAKE3 hashes a 256 KiB buffer at
/// 3-4 GB/s but 4 KiB updates at 1.2-1.7 GB/s (it works on many 1 KiB blocks at once), and
/// a thread of its own hashes the chunks while this one writes.
#[derive(Debug)]
pub struct PageFileWriter<'a> {
    file: File,
    path: std::path::PathBuf,
    pending: Vec<&'a [u8]>,
    pages: u64,
    /// The current chunk's pages, copied.
    chunk: Vec<u8>,
    digester: Digester,
}

impl<'a> PageFileWriter<'a> {
    /// Creates (or truncates) the page file at `path`, mode 0600.
    pub fn create(path: &Path) -> Result<Self, PageFileError> {
        let file = crate::private::create_file(path).map_err(io("creating", path))?;
        let digester = Digester::start().map_err(io("starting the digest thread for", path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            pending: Vec::with_capacity(BATCH_PAGES),
            pages: 0,
            chunk: digester.buffer(),
            digester,
        })
    }

    /// Appends one page (exactly 4096 bytes) and returns its index. The page must stay
    /// unchanged until the writer is finished.
    pub fn push(&mut self, page: &'a [u8]) -> Result<u64, PageFileError> {
        debug_assert_eq!(page.len() as u64, PAGE_SIZE);
        self.chunk.extend_from_slice(page);
        self.pending.push(page);
        let index = self.pages;
        self.pages += 1;
        if self.pages.is_multiple_of(CHUNK_PAGES) {
            self.end_chunk()?;
        }
        if self.pending.len() >= BATCH_PAGES {
            self.write_pending()?;
        }
        Ok(index)
    }

    /// Appends one page (exactly 4096 bytes) the caller does not keep: it is written at
    /// once, with the pages pending before it. Returns its index.
    pub fn push_copy(&mut self, page: &[u8]) -> Result<u64, PageFileError> {
        debug_assert_eq!(page.len() as u64, PAGE_SIZE);
        self.write_pending()?;
        self.file
            .write_all(page)
            .map_err(io("writing", &self.path))?;
        self.chunk.extend_from_slice(page);
        let index = self.pages;
        self.pages += 1;
        if self.pages.is_multiple_of(CHUNK_PAGES) {
            self.end_chunk()?;
        }
        Ok(index)
    }

    /// Hands the chunk gathered so far to the digest thread.
    fn end_chunk(&mut self) -> Result<(), PageFileError> {
        let full = std::mem::replace(&mut self.chunk, self.digester.buffer());
        if self.digester.digest(full) {
            Ok(())
        } else {
            Err(self.digest_thread_failed())
        }
    }

    fn digest_thread_failed(&self) -> PageFileError {
        io("digesting", &self.path)(std::io::Error::other("the digest thread failed"))
    }

    /// Pages written so far.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn write_pending(&mut self) -> Result<(), PageFileError> {
        let mut slices: Vec<IoSlice<'_>> = self.pending.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let written = match self.file.write_vectored(rest) {
                Ok(0) => return Err(io("writing", &self.path)(ErrorKind::WriteZero.into())),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("writing", &self.path)(e)),
            };
            IoSlice::advance_slices(&mut rest, written);
        }
        self.pending.clear();
        Ok(())
    }

    /// Writes what is pending, syncs the file to disk, and returns the page count and the
    /// chunk digests.
    pub fn finish(mut self) -> Result<(u64, Vec<Digest>), PageFileError> {
        if !self.pages.is_multiple_of(CHUNK_PAGES) {
            self.end_chunk()?;
        }
        self.write_pending()?;
        self.file.sync_all().map_err(io("syncing", &self.path))?;
        let failed = self.digest_thread_failed();
        let digests = self.digester.finish().ok_or(failed)?;
        Ok((self.pages, digests))
    }
}

/// Checks that the page file at `path` has the size `manifest` says.
pub fn check_size(path: &Path, manifest: &Manifest) -> Result<(), PageFileError> {
    let have = std::fs::metadata(path).map_err(io("reading", path))?.len();
    let expected = manifest.page_file_bytes();
    if have < expected {
        return Err(PageFileError::Truncated { have, expected });
    }
    Ok(())
}

/// Verifies the chunks covering pages `[first, end)` of the page file at `path`.
pub fn verify(path: &Path, manifest: &Manifest, first: u64, end: u64) -> Result<(), PageFileError> {
    let end = end.min(manifest.page_count);
    let chunk_pages = manifest.chunk_pages.max(1);
    let chunks = if first < end {
        first / chunk_pages..end.div_ceil(chunk_pages)
    } else {
        0..0
    };
    verify_chunks(path, manifest, chunks)
}

/// Verifies the chunks covering each of `pages` (indices into the page file at `path`).
pub fn verify_pages(
    path: &Path,
    manifest: &Manifest,
    pages: impl IntoIterator<Item = u64>,
) -> Result<(), PageFileError> {
    let chunk_pages = manifest.chunk_pages.max(1);
    let chunks: std::collections::BTreeSet<u64> =
        pages.into_iter().map(|page| page / chunk_pages).collect();
    verify_chunks(path, manifest, chunks)
}

/// Verifies the given chunks, in increasing order, of the page file at `path`.
fn verify_chunks(
    path: &Path,
    manifest: &Manifest,
    chunks: impl IntoIterator<Item = u64>,
) -> Result<(), PageFileError> {
    check_size(path, manifest)?;
    let chunk_pages = manifest.chunk_pages.max(1);
    let mut file = File::open(path).map_err(io("opening", path))?;
    // chunk_pages is at most MAX_CHUNK_PAGES (the manifest's bounds): 4 MiB.
    let mut buffer = vec![0u8; (chunk_pages * PAGE_SIZE) as usize];
    for chunk in chunks {
        let Some(pages) = chunk_pages_of(manifest, chunk) else {
            break;
        };
        let bytes = &mut buffer[..((pages.end - pages.start) * PAGE_SIZE) as usize];
        file.seek(SeekFrom::Start(pages.start * PAGE_SIZE))
            .map_err(io("reading", path))?;
        file.read_exact(bytes).map_err(io("reading", path))?;
        check_chunk(manifest, chunk, bytes)?;
    }
    Ok(())
}

/// Verifies a whole page file already in memory (a mapping of it).
pub fn verify_bytes(bytes: &[u8], manifest: &Manifest) -> Result<(), PageFileError> {
    let expected = manifest.page_file_bytes();
    if (bytes.len() as u64) < expected {
        return Err(PageFileError::Truncated {
            have: bytes.len() as u64,
            expected,
        });
    }
    let mut chunk = 0;
    while let Some(pages) = chunk_pages_of(manifest, chunk) {
        let range = (pages.start * PAGE_SIZE) as usize..(pages.end * PAGE_SIZE) as usize;
        check_chunk(manifest, chunk, &bytes[range])?;
        chunk += 1;
    }
    Ok(())
}

/// The pages of chunk `chunk`, if the page file has it.
pub fn chunk_pages_of(manifest: &Manifest, chunk: u64) -> Option<std::ops::Range<u64>> {
    let chunk_pages = manifest.chunk_pages.max(1);
    let start = chunk.checked_mul(chunk_pages)?;
    (start < manifest.page_count)
        .then(|| start..start.saturating_add(chunk_pages).min(manifest.page_count))
}

/// Checks the bytes of chunk `chunk` against its digest in `manifest`.
pub fn check_chunk(manifest: &Manifest, chunk: u64, bytes: &[u8]) -> Result<(), PageFileError> {
    let expected = usize::try_from(chunk)
        .ok()
        .and_then(|c| manifest.chunk_digests.get(c));
    let found: Digest = blake3::hash(bytes).into();
    if expected == Some(&found) {
        return Ok(());
    }
    let pages = chunk_pages_of(manifest, chunk).unwrap_or(0..0);
    Err(PageFileError::Corrupt {
        chunk,
        first: pages.start,
        end: pages.end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_digests_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        let count = BATCH_PAGES as u64 + 3;
        let contents: Vec<[u8; 4096]> = (0..count).map(|i| [i as u8; 4096]).collect();
        let mut writer = PageFileWriter::create(&path).unwrap();
        for page in &contents {
            writer.push(page).unwrap();
        }
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4096 * BATCH_PAGES as u64,
            "a full batch is written before finish"
        );
        let (pages, digests) = writer.finish().unwrap();
        assert_eq!(pages, count);
        assert_eq!(digests.len() as u64, count.div_ceil(CHUNK_PAGES));
        let manifest = Manifest {
            page_count: pages,
            chunk_pages: CHUNK_PAGES,
            chunk_digests: digests,
            ..Default::default()
        };
        verify(&path, &manifest, 0, pages).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(CHUNK_PAGES * 4096 + 5) as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        verify(&path, &manifest, 0, 1).unwrap();
        assert!(matches!(
            verify(&path, &manifest, 0, pages).unwrap_err(),
            PageFileError::Corrupt { chunk: 1, .. }
        ));
        std::fs::write(&path, &bytes[..4096]).unwrap();
        assert!(matches!(
            verify(&path, &manifest, 0, 1).unwrap_err(),
            PageFileError::Truncated { .. }
        ));
    }
}

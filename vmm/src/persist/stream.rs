//! Streaming a page file into guest memory while the app already runs.
//!
//! In `stream` mode the newest page file is not mapped: its frames are fresh anonymous
//! memory registered with userfaultfd, and a streamer thread copies the file in, chunk by
//! chunk (64 pages, each verified against its checksum), ActiveSet chunks first. A touch
//! of a page not yet there (by the app, through KVM, or by the VMM) blocks in the kernel
//! and reaches the streamer as a fault: that page's chunk jumps the queue. Pages are never
//! brought in one at a time. When every chunk is in, the userfaultfd is closed.

use crate::memory::uffd::Uffd;
use picocenter_snapshots::format::{Manifest, PAGE_SIZE};
use picocenter_snapshots::pagefile;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// What a streamer needs: the file, where its pages go, and its manifest (for the chunk
/// layout and checksums).
pub struct Streamer {
    /// The page file.
    pub file: File,
    /// The userfaultfd the page file's frames are registered with.
    pub uffd: Uffd,
    /// Host address of page 0's frame.
    pub host_base: u64,
    /// The page file's manifest.
    pub manifest: Manifest,
}

impl Streamer {
    /// A streamer for the page file `file` of `manifest`, whose frames (registered with
    /// `uffd`) start at host address `host_base`.
    pub fn new(file: File, manifest: &Manifest, uffd: Uffd, host_base: u64) -> Self {
        Self {
            file,
            uffd,
            host_base,
            manifest: manifest.clone(),
        }
    }

    /// Runs on its own thread until the whole file is in.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("picocenter-stream".into())
            .spawn(move || {
                let started = Instant::now();
                match self.run() {
                    Ok(faults) => tracing::debug!(
                        pages = self.manifest.page_count,
                        faults,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "page file streamed in"
                    ),
                    Err(e) => {
                        // The app cannot go on with pages it will never get.
                        eprintln!("picocenter: streaming the snapshot failed: {e}");
                        std::process::exit(70);
                    }
                }
            })
    }

    fn run(&self) -> Result<u64, String> {
        let chunk_pages = self.manifest.chunk_pages.max(1);
        let chunks = self.manifest.page_count.div_ceil(chunk_pages);
        let mut done = vec![false; chunks as usize];
        let mut buffer = vec![0u8; (chunk_pages * PAGE_SIZE) as usize];
        let mut next = 0u64;
        let mut faults = 0u64;
        // In file order, which puts the ActiveSet first.
        loop {
            // Faults first: each one's chunk jumps the queue.
            while let Some(address) = self.uffd.next_fault().map_err(|e| e.to_string())? {
                faults += 1;
                let page = address.saturating_sub(self.host_base) / PAGE_SIZE;
                let chunk = page / chunk_pages;
                if chunk < chunks && !done[chunk as usize] {
                    self.fill(chunk, &mut buffer)?;
                    done[chunk as usize] = true;
                }
            }
            while next < chunks && done[next as usize] {
                next += 1;
            }
            if next == chunks {
                return Ok(faults);
            }
            self.fill(next, &mut buffer)?;
            done[next as usize] = true;
        }
    }

    /// Reads chunk `chunk`, checks it, and copies it into guest memory.
    fn fill(&self, chunk: u64, buffer: &mut [u8]) -> Result<(), String> {
        let pages = pagefile::chunk_pages_of(&self.manifest, chunk).unwrap_or(0..0);
        let bytes = &mut buffer[..((pages.end - pages.start) * PAGE_SIZE) as usize];
        self.file
            .read_exact_at(bytes, pages.start * PAGE_SIZE)
            .map_err(|e| format!("reading pages {pages:?}: {e}"))?;
        pagefile::check_chunk(&self.manifest, chunk, bytes).map_err(|e| e.to_string())?;
        self.uffd
            .copy(self.host_base + pages.start * PAGE_SIZE, bytes)
            .map_err(|e| format!("copying pages {pages:?} in: {e}"))
    }
}

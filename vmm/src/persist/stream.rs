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
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// What a streamer needs: the file, where its pages go, and its manifest's checksums.
pub struct Streamer {
    /// The page file.
    pub file: File,
    /// The userfaultfd the page file's frames are registered with.
    pub uffd: Uffd,
    /// Host address of page 0's frame.
    pub host_base: u64,
    /// Pages in the file.
    pub pages: u64,
    /// Pages per chunk.
    pub chunk_pages: u64,
    /// CRC-32 of each chunk.
    pub checksums: Vec<u32>,
}

impl Streamer {
    /// A streamer for the page file `file` of `manifest`, whose frames (registered with
    /// `uffd`) start at host address `host_base`.
    pub fn new(file: File, manifest: &Manifest, uffd: Uffd, host_base: u64) -> Self {
        Self {
            file,
            uffd,
            host_base,
            pages: manifest.page_count,
            chunk_pages: manifest.chunk_pages.max(1),
            checksums: manifest.chunk_checksums.clone(),
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
                        pages = self.pages,
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
        let chunks = self.pages.div_ceil(self.chunk_pages);
        let mut done = vec![false; chunks as usize];
        let mut buffer = vec![0u8; (self.chunk_pages * PAGE_SIZE) as usize];
        let mut next = 0u64;
        let mut faults = 0u64;
        // In file order, which puts the ActiveSet first.
        loop {
            // Faults first: each one's chunk jumps the queue.
            while let Some(address) = self.uffd.next_fault().map_err(|e| e.to_string())? {
                faults += 1;
                let page = address.saturating_sub(self.host_base) / PAGE_SIZE;
                let chunk = page / self.chunk_pages;
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
        let first = chunk * self.chunk_pages;
        let count = self.chunk_pages.min(self.pages - first);
        let bytes = &mut buffer[..(count * PAGE_SIZE) as usize];
        self.file
            .read_exact_at(bytes, first * PAGE_SIZE)
            .map_err(|e| format!("reading pages {first}..{}: {e}", first + count))?;
        if self.checksums.get(chunk as usize).copied() != Some(crc32fast::hash(bytes)) {
            return Err(format!(
                "chunk {chunk} (pages {first}..{}) fails its checksum",
                first + count
            ));
        }
        self.uffd
            .copy(self.host_base + first * PAGE_SIZE, bytes)
            .map_err(|e| format!("copying pages {first}..{} in: {e}", first + count))
    }
}

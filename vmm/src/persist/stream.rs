//! Streaming a page file into guest memory while the app already runs.
//!
//! In `stream` mode the newest page file is not mapped: its frames are fresh anonymous
//! memory registered with userfaultfd, and a streamer thread copies the file in, chunk by
//! chunk (64 pages, each verified against its checksum), ActiveSet chunks first. A touch
//! of a page not yet there (by the app, through KVM, or by the VMM) blocks in the kernel
//! and reaches the streamer as a fault: that page's chunk jumps the queue. Pages are never
//! brought in one at a time. When every chunk is in, the userfaultfd is closed.
//!
//! A page file still on its way from cold storage comes the same way, from the worker
//! that downloads it ([`FeedStreamer`], over the page feed): chunks arrive in the
//! worker's order, and a touched page's chunk is asked for.

use crate::memory::uffd::Uffd;
use picocenter_snapshots::feed::{self, ChunkId};
use picocenter_snapshots::format::{Manifest, PAGE_SIZE};
use picocenter_snapshots::pagefile;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// Runs `fill` on a thread named `name`. If it fails, the VMM ends (status 70), saying
/// that `what` failed: the app cannot go on with pages it will never get.
fn spawn_filler(
    name: &str,
    what: &'static str,
    fill: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = fill() {
                eprintln!("picocenter: {what} failed: {e}");
                std::process::exit(70);
            }
        })
}

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
        spawn_filler("picocenter-stream", "streaming the snapshot", move || {
            let started = Instant::now();
            let faults = self.run()?;
            tracing::debug!(
                pages = self.manifest.page_count,
                faults,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "page file streamed in"
            );
            Ok(())
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

/// Page files a worker feeds in while it downloads them (see
/// [`picocenter_snapshots::feed`]): the VMM's end of the feed socket, and the snapshots
/// whose page files it carries, newest first (the feed's levels).
#[derive(Debug, Clone)]
pub struct Feed {
    /// The socket; the streamer reads chunks from it and writes wants to it.
    pub socket: std::sync::Arc<std::os::unix::net::UnixStream>,
    /// The snapshots it carries, newest first.
    pub ids: Vec<String>,
}

/// A fed page file: its manifest and where its frames are.
pub struct FedLevel {
    /// Its manifest.
    pub manifest: Manifest,
    /// Host address of page 0's frame.
    pub host_base: u64,
}

/// Fills the frames of every fed page file from the feed, chunk by chunk, each checked
/// against its digest; a page touched before its chunk came is asked for at once.
pub struct FeedStreamer {
    /// The feed.
    pub socket: std::sync::Arc<std::os::unix::net::UnixStream>,
    /// The userfaultfd every fed level's frames are registered with.
    pub uffd: Uffd,
    /// The levels, in the feed's order.
    pub levels: Vec<FedLevel>,
    /// Chunks to ask for before anything is touched (the pages that come first).
    pub first: Vec<ChunkId>,
    /// An eventfd the app's first request since the restore is announced on (see
    /// [`crate::kernel::process::FirstRequest`]). Until it is, or until
    /// [`BACKGROUND_AFTER`] has passed, the worker sends the chunks asked for and nothing
    /// else, so that the rest of the stream does not take the CPU that request needs.
    pub first_served: Option<std::os::fd::OwnedFd>,
}

/// The longest the rest of a stream waits for the app's first request to be served.
pub const BACKGROUND_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl FeedStreamer {
    /// Runs on its own thread until every chunk of every level is in. The thread runs at
    /// a lower priority (nice 10) than the vCPU's: a chunk the app waits for is not
    /// delayed by it (the vCPU thread sleeps meanwhile), and the rest of the stream does
    /// not slow the app's first requests down. Returns once that is set, before the
    /// VMM's seccomp filter (which does not allow it) can be.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let what = "streaming the snapshot from the worker";
        let (niced, is_niced) = std::sync::mpsc::channel();
        let thread = spawn_filler("picocenter-feed", what, move || {
            // SAFETY: changes the calling thread's own nice value (who = 0), nothing else.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) } != 0 {
                tracing::debug!(
                    "the feed keeps its priority: {}",
                    std::io::Error::last_os_error()
                );
            }
            let _ = niced.send(());
            let started = Instant::now();
            let wanted = self.run()?;
            tracing::debug!(
                levels = self.levels.len(),
                wanted,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "page files fed in"
            );
            Ok(())
        })?;
        let _ = is_niced.recv();
        Ok(thread)
    }

    /// The chunk the host address `address` lies in, if a fed level's frames hold it.
    fn chunk_at(&self, address: u64) -> Option<ChunkId> {
        self.levels.iter().enumerate().find_map(|(level, fed)| {
            let page = address.checked_sub(fed.host_base)? / PAGE_SIZE;
            (page < fed.manifest.page_count).then(|| ChunkId {
                level: level as u32,
                chunk: page / fed.manifest.chunk_pages.max(1),
            })
        })
    }

    fn run(&self) -> Result<u64, String> {
        use std::io::Write;
        let mut missing: Vec<Vec<bool>> = self
            .levels
            .iter()
            .map(|fed| {
                let chunks = fed
                    .manifest
                    .page_count
                    .div_ceil(fed.manifest.chunk_pages.max(1));
                vec![true; usize::try_from(chunks).unwrap_or(0)]
            })
            .collect();
        let mut remaining: usize = missing.iter().map(Vec::len).sum();
        let mut asked = std::collections::HashSet::new();
        let mut socket = &*self.socket;
        let mut ask = |id: ChunkId, socket: &mut &std::os::unix::net::UnixStream| {
            if !asked.insert(id) {
                return Ok(());
            }
            match socket.write_all(&feed::want(id)) {
                // The worker has sent everything and stopped listening (or is gone): what
                // is still to come is in the socket already, or the feed's end says so.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    Ok(())
                }
                other => other.map_err(|e| format!("asking the worker for a chunk: {e}")),
            }
        };
        for &id in &self.first {
            ask(id, &mut socket)?;
        }
        // The worker starts on the rest once the first request is served (or at once,
        // with nobody to tell of it).
        let background_at = Instant::now() + BACKGROUND_AFTER;
        let mut first_served = self.first_served.as_ref();
        if first_served.is_none() {
            ask(feed::FIRST_WANTS_DONE, &mut socket)?;
        }
        let mut wanted = 0u64;
        let mut buffer = Vec::new();
        while remaining > 0 {
            let waiting =
                first_served.map(|fd| rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN));
            let mut fds: Vec<rustix::event::PollFd<'_>> = [
                rustix::event::PollFd::new(&self.uffd, rustix::event::PollFlags::IN),
                rustix::event::PollFd::new(&*self.socket, rustix::event::PollFlags::IN),
            ]
            .into_iter()
            .chain(waiting)
            .collect();
            let timeout = first_served.map(|_| {
                let left = background_at.saturating_duration_since(Instant::now());
                rustix::time::Timespec::try_from(left).unwrap_or_default()
            });
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("waiting for faults and chunks: {e}")),
            }
            let (faulted, fed) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
            let served = fds.get(2).is_some_and(|fd| !fd.revents().is_empty());
            if first_served.is_some() && (served || Instant::now() >= background_at) {
                tracing::debug!(served, "the rest of the stream starts");
                first_served = None;
                ask(feed::FIRST_WANTS_DONE, &mut socket)?;
            }
            if faulted {
                while let Some(address) = self.uffd.next_fault().map_err(|e| e.to_string())? {
                    let Some(id) = self.chunk_at(address) else {
                        continue;
                    };
                    if missing[id.level as usize][id.chunk as usize] {
                        wanted += 1;
                        ask(id, &mut socket)?;
                    }
                }
            }
            if !fed {
                continue;
            }
            let id = feed::read_chunk(&mut socket, &mut buffer)
                .map_err(|e| format!("reading the feed: {e}"))?
                .ok_or_else(|| format!("the feed ended with {remaining} chunks still to come"))?;
            let fed = self
                .levels
                .get(id.level as usize)
                .ok_or_else(|| format!("the feed sent a chunk of level {}", id.level))?;
            let pages = pagefile::chunk_pages_of(&fed.manifest, id.chunk)
                .ok_or_else(|| format!("the feed sent chunk {} of level {}", id.chunk, id.level))?;
            pagefile::check_chunk(&fed.manifest, id.chunk, &buffer).map_err(|e| e.to_string())?;
            let slot = &mut missing[id.level as usize][id.chunk as usize];
            if !*slot {
                continue;
            }
            self.uffd
                .copy(fed.host_base + pages.start * PAGE_SIZE, &buffer)
                .map_err(|e| format!("copying pages {pages:?} in: {e}"))?;
            *slot = false;
            remaining -= 1;
        }
        Ok(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picocenter_snapshots::pagefile::{PageFileWriter, CHUNK_PAGES};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    const CHUNKS: u64 = 3;

    /// A manifest of CHUNKS chunks of pages whose bytes are their page numbers, and
    /// those pages.
    fn level() -> (Manifest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..CHUNKS * CHUNK_PAGES)
            .flat_map(|page| [page as u8 | 1; PAGE_SIZE as usize])
            .collect();
        let mut writer = PageFileWriter::create(&dir.path().join("pages")).unwrap();
        for page in bytes.chunks(PAGE_SIZE as usize) {
            writer.push(page).unwrap();
        }
        let (page_count, chunk_digests) = writer.finish().unwrap();
        let manifest = Manifest {
            page_count,
            chunk_pages: CHUNK_PAGES,
            chunk_digests,
            ..Default::default()
        };
        (manifest, bytes)
    }

    /// Fresh memory for the level, registered with a userfaultfd: (streamer, its address).
    fn streamer(
        manifest: &Manifest,
        socket: UnixStream,
        first: Vec<ChunkId>,
    ) -> (FeedStreamer, u64) {
        let len = (manifest.page_count * PAGE_SIZE) as usize;
        // SAFETY: a fresh private anonymous mapping, which the test leaks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        let uffd = Uffd::new().unwrap();
        uffd.register(base, len as u64).unwrap();
        let levels = vec![FedLevel {
            manifest: manifest.clone(),
            host_base: base,
        }];
        let socket = std::sync::Arc::new(socket);
        (
            FeedStreamer {
                socket,
                uffd,
                levels,
                first,
                first_served: None,
            },
            base,
        )
    }

    fn chunk(bytes: &[u8], chunk: u64) -> &[u8] {
        let size = (CHUNK_PAGES * PAGE_SIZE) as usize;
        &bytes[chunk as usize * size..(chunk as usize + 1) * size]
    }

    fn read_want(socket: &mut UnixStream) -> ChunkId {
        let mut message = [0u8; feed::WANT_BYTES];
        std::io::Read::read_exact(socket, &mut message).unwrap();
        feed::parse_want(&message)
    }

    #[test]
    fn the_rest_waits_for_the_first_request_or_its_time() {
        let (manifest, bytes) = level();
        for served in [true, false] {
            let (mut worker, vmm) = UnixStream::pair().unwrap();
            let first = ChunkId { level: 0, chunk: 2 };
            let (mut streamer, _) = streamer(&manifest, vmm, vec![first]);
            let notice = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
            let app_side = rustix::io::fcntl_dupfd_cloexec(&notice, 0).unwrap();
            streamer.first_served = Some(notice);
            let started = Instant::now();
            let running = std::thread::spawn(move || streamer.run());
            assert_eq!(read_want(&mut worker), first);
            feed::write_chunk(&mut worker, first, chunk(&bytes, 2)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            if served {
                rustix::io::write(&app_side, &1u64.to_ne_bytes()).unwrap();
            }
            assert_eq!(read_want(&mut worker), feed::FIRST_WANTS_DONE);
            let waited = started.elapsed();
            if served {
                assert!(waited < BACKGROUND_AFTER, "{waited:?}");
            } else {
                assert!(waited >= BACKGROUND_AFTER, "{waited:?}");
            }
            for chunk_index in [0, 1] {
                let id = ChunkId {
                    level: 0,
                    chunk: chunk_index,
                };
                feed::write_chunk(&mut worker, id, chunk(&bytes, chunk_index)).unwrap();
            }
            assert_eq!(running.join().unwrap(), Ok(0));
        }
    }

    #[test]
    fn first_wants_then_a_touched_chunk_then_the_rest_each_checked() {
        let (manifest, bytes) = level();
        let (mut worker, vmm) = UnixStream::pair().unwrap();
        let first = ChunkId { level: 0, chunk: 2 };
        let (streamer, base) = streamer(&manifest, vmm, vec![first]);
        let running = std::thread::spawn(move || streamer.run());
        assert_eq!(read_want(&mut worker), first);
        assert_eq!(read_want(&mut worker), feed::FIRST_WANTS_DONE);
        feed::write_chunk(&mut worker, first, chunk(&bytes, 2)).unwrap();
        // A touch of chunk 1 blocks until it comes, and asks for it.
        let touched = base + CHUNK_PAGES * PAGE_SIZE + 5;
        // SAFETY: inside the mapping made above.
        let reader = std::thread::spawn(move || unsafe { *(touched as *const u8) });
        let wanted = ChunkId { level: 0, chunk: 1 };
        assert_eq!(read_want(&mut worker), wanted);
        feed::write_chunk(&mut worker, wanted, chunk(&bytes, 1)).unwrap();
        assert_eq!(reader.join().unwrap(), (CHUNK_PAGES as u8) | 1);
        feed::write_chunk(
            &mut worker,
            ChunkId { level: 0, chunk: 0 },
            chunk(&bytes, 0),
        )
        .unwrap();
        assert_eq!(running.join().unwrap(), Ok(1));
        // SAFETY: the whole mapping is filled now.
        let memory = unsafe { std::slice::from_raw_parts(base as *const u8, bytes.len()) };
        assert!(memory == bytes);
    }

    #[test]
    fn a_worker_that_sent_everything_and_left_is_no_error() {
        let (manifest, bytes) = level();
        let (mut worker, vmm) = UnixStream::pair().unwrap();
        // Everything sent, without reading a want, and the worker gone.
        let sent = bytes.clone();
        let sender = std::thread::spawn(move || {
            for index in 0..CHUNKS {
                let id = ChunkId {
                    level: 0,
                    chunk: index,
                };
                feed::write_chunk(&mut worker, id, chunk(&sent, index)).unwrap();
            }
        });
        let first = vec![ChunkId { level: 0, chunk: 1 }];
        let (streamer, base) = streamer(&manifest, vmm, first);
        assert_eq!(streamer.run(), Ok(0));
        sender.join().unwrap();
        // SAFETY: the whole mapping is filled now.
        let memory = unsafe { std::slice::from_raw_parts(base as *const u8, bytes.len()) };
        assert!(memory == bytes);
    }

    #[test]
    fn a_bad_chunk_or_an_early_end_stops_the_stream() {
        let (manifest, bytes) = level();
        let mut wrong = chunk(&bytes, 0).to_vec();
        wrong[100] ^= 1;
        let id = |level, chunk| ChunkId { level, chunk };
        // (what, the chunks sent, what the error says)
        type Case<'a> = (&'a str, Vec<(ChunkId, Vec<u8>)>, &'a str);
        let cases: [Case; 5] = [
            ("damaged", vec![(id(0, 0), wrong)], "checksum"),
            (
                "another's",
                vec![(id(0, 1), chunk(&bytes, 0).to_vec())],
                "checksum",
            ),
            (
                "no such level",
                vec![(id(1, 0), chunk(&bytes, 0).to_vec())],
                "level 1",
            ),
            (
                "no such chunk",
                vec![(id(0, CHUNKS), chunk(&bytes, 0).to_vec())],
                "chunk 3",
            ),
            (
                "cut short",
                vec![(id(0, 0), chunk(&bytes, 0).to_vec())],
                "2 chunks still to come",
            ),
        ];
        for (what, sent, expected) in cases {
            let (mut worker, vmm) = UnixStream::pair().unwrap();
            let (streamer, _) = streamer(&manifest, vmm, Vec::new());
            let running = std::thread::spawn(move || streamer.run());
            assert_eq!(read_want(&mut worker), feed::FIRST_WANTS_DONE);
            for (id, bytes) in sent {
                feed::write_chunk(&mut worker, id, &bytes).unwrap();
            }
            worker.flush().unwrap();
            drop(worker);
            let error = running.join().unwrap().unwrap_err();
            assert!(error.contains(expected), "{what}: {error}");
        }
    }
}

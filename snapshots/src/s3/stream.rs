//! Swap-in that streams from S3: the worker's end of the [page feed](crate::feed).
//!
//! [`S3Store::open_stream`] brings what a VMM needs before it can start (the manifests of
//! the chain's snapshots that the local cache lacks, their data archives, and the first
//! part of each page file, in the round trips [`S3Store::fetch_chain`] takes) and commits
//! each snapshot to the local store as *pending*, its page file still to come. The VMM
//! starts on that; [`ChainStream::run`] then fetches the page files with parallel ranged
//! GETs, ActiveSet first (it leads each page file), and sends each chunk down the feed as
//! it completes. A chunk the VMM asks for (the app touched it) goes to the front, on a
//! connection kept free for such requests. When everything is in, each page file is
//! verified against its manifest and completes its snapshot in the local cache.

use super::{io, request, Level, S3Error, S3Store, PARALLEL_GETS};
use crate::feed::{self, ChunkId};
use crate::format::{Manifest, PAGE_SIZE};
use crate::key::SnapshotKey;
use crate::pagefile::chunk_pages_of;
use crate::store::{LocalStore, StoreError};
use aws_sdk_s3::error::DisplayErrorContext;
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes one GET for a chunk the app waits for asks for at least (two chunks of 64 pages:
/// ~10 ms at 50 MB/s on one connection): small, so that the pages a restore needs first
/// (8 MiB for bigmem) come over many connections at once. When more chunks are waited
/// for than the free connections carry at this size, each GET takes its share, so that
/// they all go in one round trip rather than a second wave.
const WANTED_RUN_BYTES: u64 = 512 << 10;
/// Bytes one background GET asks for at most: 8 MiB, the size of the ranged GETs a whole
/// download makes, since an S3 request costs more than its bytes.
const BACKGROUND_RUN_BYTES: u64 = 8 << 20;
/// How long the VMM may take to read a chunk, or to send its first wants.
const FEED_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a GET's body may send nothing before the GET is given up.
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// GETs a stream gives up and asks again before it fails (a connection reset, a stall).
const RETRIES: u32 = 3;
/// Connections kept free of background GETs, for chunks the app is waiting for.
const URGENT_CONNECTIONS: usize = 4;

/// One snapshot whose page file is streamed.
struct Streamed {
    manifest: Manifest,
    /// Where its page file is assembled (in the download directory).
    part: PathBuf,
    /// Its first bytes, which came with its manifest.
    first: Vec<u8>,
}

/// A chain committed as pending in the local store, whose page files are yet to stream.
pub struct ChainStream {
    store: S3Store,
    local: LocalStore,
    key: SnapshotKey,
    id: String,
    /// Newest first: the order of the feed's levels.
    levels: Vec<Streamed>,
    /// The chunks that hold the pages the restore brings in first.
    first: Vec<ChunkId>,
}

/// What a stream did, for the worker's log.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    /// Bytes fetched from S3 by the stream (the first parts not included).
    pub bytes: u64,
    /// Chunks the VMM asked for before they came.
    pub wanted: u64,
    /// Milliseconds from the start of the stream to its last chunk.
    pub ms: f64,
}

impl S3Store {
    /// Makes the chain ending at snapshot `id` restorable from `local`, streaming what
    /// its first round trips did not bring (first the pages of the port `first_port`'s
    /// requests, see [`crate::chain::hot_set`]). Returns `None` if the chain is complete in
    /// `local` now (it was, or every missing page file came whole with its manifest);
    /// else the stream, which the caller must [run](ChainStream::run) against the VMM's
    /// feed. Every manifest is checked under `key` before anything it names is used.
    /// `hint` shapes the first round trip, as for [`S3Store::fetch_chain`].
    pub fn open_stream(
        self,
        local: &LocalStore,
        key: &SnapshotKey,
        id: &str,
        hint: &crate::chain::ChainHint,
        first_port: Option<u16>,
    ) -> Result<Option<ChainStream>, StoreError> {
        if local.is_chain_complete(id, key) {
            return Ok(None);
        }
        let started = Instant::now();
        let since = || started.elapsed().as_secs_f64() * 1e3;
        let levels = self.run(async {
            let (newest, guessed) = self.first_round(local, key, id, hint).await?;
            tracing::debug!(
                ms = since(),
                expected = guessed.len(),
                "stream: the newest manifest is in"
            );
            let older = self
                .older_levels(local, key, &newest.manifest, guessed)
                .await?;
            let levels = std::iter::once(newest).chain(older);
            futures::future::try_join_all(levels.map(|level| self.prepare_level(level))).await
        })?;
        tracing::debug!(ms = since(), "stream: every level's first part is in");
        if levels
            .first()
            .is_some_and(|(level, _, _)| level.manifest.tree.is_some())
        {
            // Each process of a tree maps its own pages of the page files, which must be
            // here whole before the restore forks them: fetched, not streamed.
            tracing::debug!("stream: a tree of processes is fetched whole");
            self.fetch_chain(local, key, id, hint)?;
            return Ok(None);
        }
        let mut streamed = Vec::new();
        // Oldest first, so that every commit's parent is already there.
        for (level, whole, data) in levels.into_iter().rev() {
            // HEAD moves only once the whole chain is here (in `complete`, or below).
            local.commit_pending(&level.manifest, key, data.as_deref())?;
            match whole {
                Some(pages) => local.attach_pages(&level.manifest.id, key, &pages)?,
                None => {
                    let serial = super::next_serial();
                    // Its own name: a stream left over from a failed start may still run.
                    let part = self.cache_dir.join(format!(
                        ".{}.pages.{}-{serial}.stream",
                        level.manifest.id,
                        std::process::id()
                    ));
                    let first = level.pages.map(|p| p.bytes).unwrap_or_default();
                    streamed.push(Streamed {
                        manifest: level.manifest,
                        part,
                        first,
                    });
                }
            }
        }
        if streamed.is_empty() {
            local.set_head(id, key)?;
            return Ok(None);
        }
        streamed.reverse();
        // The chunks the VMM will want first (it asks for them too, once it has started):
        // asked for at once.
        let chain = crate::store::chain(local, key, id)?;
        let pieces = crate::chain::resolve_all(&chain).unwrap_or_default();
        let hot = crate::chain::hot_set(&chain[0], first_port);
        let first = crate::chain::hot_chunks(&chain, &pieces, hot, |depth| {
            let id = &chain.get(depth)?.id;
            let level = streamed.iter().position(|s| s.manifest.id == *id)?;
            u32::try_from(level).ok()
        });
        Ok(Some(ChainStream {
            first,
            store: self,
            local: local.clone(),
            key: key.clone(),
            id: id.to_string(),
            levels: streamed,
        }))
    }

    /// Finishes `level`'s data archive, and its page file if the first round trip brought
    /// all of it (or the cache holds it): returns the level, that page file (verified)
    /// if so, and the data archive (verified).
    async fn prepare_level(
        &self,
        mut level: Level,
    ) -> Result<(Level, Option<PathBuf>, Option<PathBuf>), StoreError> {
        let m = level.manifest.clone();
        let data = match m.data_bytes {
            0 => None,
            size => Some(
                self.finish_object(&m.id, "data", size, 0, level.data.take())
                    .await?,
            ),
        };
        let size = m.page_file_bytes();
        let cached = self.cache_dir.join(format!("{}.pages", m.id));
        let whole = match &level.pages {
            Some(first) if first.bytes.len() as u64 == size && first.size == size => {
                let path = self
                    .finish_object(&m.id, "pages", size, 0, level.pages.take())
                    .await?;
                Some(path)
            }
            None if std::fs::metadata(&cached).is_ok_and(|meta| meta.len() == size) => Some(cached),
            Some(first) if first.size != size => {
                return Err(S3Error::Length {
                    url: self.url(&self.object_key(&m.id, "pages")?),
                    start: 0,
                    end: size,
                    got: first.size,
                }
                .into())
            }
            _ => None,
        };
        // No plain page file came: it may be stored packed (README §5.7), which is made
        // whole here rather than streamed (only small page files are packed).
        let whole = match whole {
            None => {
                self.packed_pages(&m, level.pages.as_ref(), level.packed.take())
                    .await?
            }
            whole => whole,
        };
        let (checked, pages, archive) = (m.clone(), whole.clone(), data.clone());
        tokio::task::spawn_blocking(move || match &pages {
            Some(pages) => super::verify_download(&checked, pages, archive.as_deref()),
            None => super::verify_data(&checked, archive.as_deref()),
        })
        .await
        .map_err(|_| S3Error::Panicked)?
        .inspect_err(|_| super::discard([whole.as_ref(), data.as_ref()]))?;
        Ok((level, whole, data))
    }
}

impl ChainStream {
    /// The ids of the snapshots whose page files the feed carries, newest first: the
    /// feed's levels, which the VMM is told in this order.
    pub fn ids(&self) -> Vec<String> {
        self.levels.iter().map(|l| l.manifest.id.clone()).collect()
    }

    /// Streams every page file into `feed` (the worker's end of the VMM's feed socket),
    /// then verifies each and completes its snapshot in the local store, and makes the
    /// chain's newest snapshot its HEAD. Blocks until done. On failure the pending
    /// snapshots stay pending (a later restore fetches them again) and the VMM, whose
    /// feed closes, stops.
    pub fn run(self, feed: std::os::unix::net::UnixStream) -> Result<StreamReport, StoreError> {
        let result = self
            .store
            .run(self.feed(feed))
            .and_then(|report| self.complete().map(|()| report));
        if result.is_err() {
            for level in &self.levels {
                let _ = std::fs::remove_file(&level.part);
            }
        }
        result
    }

    /// Verifies the assembled page files and moves them into the local store.
    fn complete(&self) -> Result<(), StoreError> {
        for level in self.levels.iter().rev() {
            super::verify_download(&level.manifest, &level.part, None)?;
            self.local
                .attach_pages(&level.manifest.id, &self.key, &level.part)?;
        }
        self.local.set_head(&self.id, &self.key)
    }

    async fn feed(&self, feed: std::os::unix::net::UnixStream) -> Result<StreamReport, StoreError> {
        let started = Instant::now();
        let feed_error = |what: &'static str| {
            move |e: std::io::Error| StoreError::Io {
                what,
                path: "the VMM's page feed".into(),
                source: e,
            }
        };
        feed.set_nonblocking(true)
            .map_err(feed_error("configuring"))?;
        let (mut wants, mut to_vmm) = tokio::net::UnixStream::from_std(feed)
            .map_err(feed_error("configuring"))?
            .into_split();
        let mut files = Vec::new();
        for level in &self.levels {
            let file =
                crate::private::create_file(&level.part).map_err(io("creating", &level.part))?;
            file.set_len(level.manifest.page_file_bytes())
                .map_err(io("sizing", &level.part))?;
            files.push(file);
        }
        let mut schedule = Schedule::new(&self.levels);
        for &id in &self.first {
            schedule.want(id);
        }
        let schedule = Arc::new(Mutex::new(schedule));
        let woken = Arc::new(tokio::sync::Notify::new());
        // Chunks go to the VMM one message at a time, and into the cache's copy.
        let (chunks, mut arrived) = tokio::sync::mpsc::channel::<(ChunkId, Vec<u8>)>(PARALLEL_GETS);
        let levels = &self.levels;
        let (sent_schedule, sent_woken) = (schedule.clone(), woken.clone());
        let sender = async move {
            let mut message = Vec::new();
            while let Some((id, bytes)) = arrived.recv().await {
                let level = &levels[id.level as usize];
                let start = chunk_pages_of(&level.manifest, id.chunk).map_or(0, |p| p.start);
                files[id.level as usize]
                    .write_all_at(&bytes, start * PAGE_SIZE)
                    .map_err(io("writing", &level.part))?;
                tracing::trace!(level = id.level, chunk = id.chunk, "sending a chunk");
                message.clear();
                feed::write_chunk(&mut message, id, &bytes).map_err(feed_error("encoding"))?;
                // A VMM that stops reading ends its stream (and so itself, when it next
                // needs a page), not the worker's thread.
                tokio::time::timeout(FEED_STALL, to_vmm.write_all(&message))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
                    .and_then(|written| written)
                    .map_err(feed_error("writing to"))?;
                if sent_schedule
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .arrived(id)
                {
                    sent_woken.notify_one();
                }
            }
            to_vmm.shutdown().await.map_err(feed_error("closing"))
        };
        // What the app waits for, from the VMM.
        let (listen_schedule, listen_woken) = (schedule.clone(), woken.clone());
        let listener = tokio::spawn(async move {
            let mut message = [0u8; feed::WANT_BYTES];
            while wants.read_exact(&mut message).await.is_ok() {
                let id = feed::parse_want(&message);
                let mut schedule = listen_schedule.lock().unwrap_or_else(|e| e.into_inner());
                match id {
                    feed::FIRST_WANTS_DONE => schedule.background = true,
                    id => schedule.want(id),
                }
                tracing::trace!(level = id.level, chunk = id.chunk, "the VMM wants a chunk");
                drop(schedule);
                listen_woken.notify_one();
            }
            // The VMM is gone: nothing waits for the rest (which fails to send).
            listen_schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .background = true;
            listen_woken.notify_one();
        });
        let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let downloads = async {
            // Owned here: the sender ends when this ends, with every chunk handed over.
            let chunks = chunks;
            // The chunks that came with the manifests go first.
            for (index, level) in self.levels.iter().enumerate() {
                let whole =
                    level.first.len() as u64 / PAGE_SIZE / level.manifest.chunk_pages.max(1);
                for chunk in 0..whole {
                    let pages = chunk_pages_of(&level.manifest, chunk).unwrap_or(0..0);
                    let bytes = &level.first
                        [(pages.start * PAGE_SIZE) as usize..(pages.end * PAGE_SIZE) as usize];
                    let id = ChunkId {
                        level: index as u32,
                        chunk,
                    };
                    schedule.lock().unwrap_or_else(|e| e.into_inner()).take(id);
                    chunks
                        .send((id, bytes.to_vec()))
                        .await
                        .map_err(|_| S3Error::Panicked)?;
                }
            }
            let mut tasks = tokio::task::JoinSet::new();
            let mut retries = 0;
            loop {
                while tasks.len() < PARALLEL_GETS {
                    let background = tasks.len() < PARALLEL_GETS - URGENT_CONNECTIONS;
                    let next = {
                        let mut schedule = schedule.lock().unwrap_or_else(|e| e.into_inner());
                        schedule.free_connections = PARALLEL_GETS - tasks.len();
                        schedule.next(background)
                    };
                    let Some((level, range)) = next else { break };
                    let m = &self.levels[level as usize].manifest;
                    let first = chunk_pages_of(m, range.start).map_or(0, |p| p.start);
                    let end = chunk_pages_of(m, range.end - 1).map_or(0, |p| p.end);
                    let key = self.store.object_key(&m.id, "pages")?;
                    let get = Get {
                        client: self.store.conn.client.clone(),
                        traffic: self.store.conn.traffic.clone(),
                        bucket: self.store.conn.bucket.clone(),
                        url: self.store.url(&key),
                        key,
                        manifest: m.clone(),
                        level,
                        chunks: range,
                        bytes: first * PAGE_SIZE..end * PAGE_SIZE,
                    };
                    tracing::trace!(level, chunks = ?get.chunks, "GET");
                    let (chunks, fetched) = (chunks.clone(), fetched.clone());
                    tasks.spawn(async move { get.run(&chunks, &fetched).await });
                }
                let all_asked = schedule
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .all_taken();
                if tasks.is_empty() {
                    if all_asked {
                        return Ok::<_, StoreError>(());
                    }
                    // Waiting for the VMM's first wants (a permit is kept if they came),
                    // but not for ever.
                    if tokio::time::timeout(FEED_STALL, woken.notified())
                        .await
                        .is_err()
                    {
                        tracing::debug!("no first wants from the VMM: the background starts");
                        schedule
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .background = true;
                    }
                    continue;
                }
                tokio::select! {
                    done = tasks.join_next() => {
                        match done.map(|done| done.map_err(|_| S3Error::Panicked)) {
                            Some(Err(panicked)) => return Err(panicked.into()),
                            Some(Ok(Err(failed))) if retries < RETRIES => {
                                retries += 1;
                                tracing::warn!(
                                    level = failed.level,
                                    chunks = ?failed.unsent,
                                    "a GET of the stream failed, asking again: {}",
                                    failed.error
                                );
                                schedule
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .untake(failed.level as usize, failed.unsent);
                            }
                            Some(Ok(Err(failed))) => return Err(failed.error),
                            Some(Ok(Ok(()))) | None => {}
                        }
                    }
                    () = woken.notified() => {}
                }
            }
        };
        let result = futures::future::try_join(downloads, sender).await;
        listener.abort();
        result?;
        let wanted = schedule.lock().unwrap_or_else(|e| e.into_inner()).wanted;
        Ok(StreamReport {
            bytes: fetched.load(std::sync::atomic::Ordering::Relaxed),
            wanted,
            ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Which chunks are still to be asked for, and in what order.
struct Schedule {
    /// Per level, per chunk: asked for (or here) already.
    taken: Vec<Vec<bool>>,
    /// How many chunks are not taken.
    untaken: usize,
    /// Per level, the most chunks a GET asks for: (for a wanted chunk, in the background).
    runs: Vec<(u64, u64)>,
    /// Chunks the VMM asked for, oldest first, each once.
    urgent: VecDeque<ChunkId>,
    /// The chunks in `urgent` (a VMM that repeats a want adds nothing).
    queued: std::collections::HashSet<ChunkId>,
    /// Where the background order has got to: (level, chunk).
    cursor: (usize, u64),
    /// How many chunks the VMM asked for that were not yet asked for from S3.
    wanted: u64,
    /// Whether the background may start: the VMM's first wants are all in.
    background: bool,
    /// Chunks the VMM waits for that are asked for and not yet sent: while there are
    /// any, no background GET starts (on two cores, even its copying slows them down).
    awaited: std::collections::HashSet<ChunkId>,
    /// Connections free for the next GETs: the chunks waited for are spread over them.
    free_connections: usize,
}

impl Schedule {
    fn new(levels: &[Streamed]) -> Self {
        let (taken, runs): (Vec<_>, Vec<_>) = levels
            .iter()
            .map(|l| {
                let chunk_pages = l.manifest.chunk_pages.max(1);
                let chunks = l.manifest.page_count.div_ceil(chunk_pages);
                let chunk_bytes = chunk_pages.saturating_mul(PAGE_SIZE);
                let run = |bytes: u64| (bytes / chunk_bytes).max(1);
                (
                    vec![false; usize::try_from(chunks).unwrap_or(0)],
                    (run(WANTED_RUN_BYTES), run(BACKGROUND_RUN_BYTES)),
                )
            })
            .unzip();
        Self::with(taken, runs)
    }

    fn with(taken: Vec<Vec<bool>>, runs: Vec<(u64, u64)>) -> Self {
        Self {
            untaken: taken.iter().map(Vec::len).sum(),
            taken,
            runs,
            urgent: VecDeque::new(),
            queued: Default::default(),
            cursor: (0, 0),
            wanted: 0,
            background: false,
            awaited: Default::default(),
            free_connections: PARALLEL_GETS,
        }
    }

    fn taken_at(&self, id: ChunkId) -> Option<bool> {
        self.taken
            .get(id.level as usize)?
            .get(usize::try_from(id.chunk).ok()?)
            .copied()
    }

    fn slot(&mut self, id: ChunkId) -> Option<&mut bool> {
        self.taken
            .get_mut(id.level as usize)?
            .get_mut(usize::try_from(id.chunk).ok()?)
    }

    /// Chunk `id` went to the VMM. Returns whether that ends the wait for what it
    /// wanted (so the background may go on).
    fn arrived(&mut self, id: ChunkId) -> bool {
        self.awaited.remove(&id) && self.awaited.is_empty()
    }

    /// Chunks `chunks` of `level` were asked for and did not come: they are to be asked
    /// for again, those the VMM waits for first.
    fn untake(&mut self, level: usize, chunks: std::ops::Range<u64>) {
        for chunk in chunks.clone() {
            let id = ChunkId {
                level: level as u32,
                chunk,
            };
            let Some(taken) = self.slot(id) else {
                continue;
            };
            if std::mem::replace(taken, false) {
                self.untaken += 1;
            }
            if self.awaited.remove(&id) && self.queued.insert(id) {
                self.urgent.push_front(id);
            }
        }
        self.cursor = self.cursor.min((level, chunks.start));
    }

    /// Whether every chunk has been asked for.
    fn all_taken(&self) -> bool {
        self.untaken == 0
    }

    /// Marks chunk `id` as asked for.
    fn take(&mut self, id: ChunkId) {
        if let Some(taken) = self.slot(id) {
            if !std::mem::replace(taken, true) {
                self.untaken -= 1;
            }
        }
    }

    /// The VMM waits for chunk `id`.
    fn want(&mut self, id: ChunkId) {
        if self.slot(id).is_some_and(|taken| !*taken) && self.queued.insert(id) {
            self.urgent.push_back(id);
        }
    }

    /// The next GET: a chunk the VMM waits for, with the chunks after it that nobody asked
    /// for yet (read-ahead: the body streams in order, so the wanted chunk still comes
    /// first), at most [`WANTED_RUN_BYTES`]; else, once the background may start, while
    /// no wanted chunk is awaited and if `connections_free` (some are kept for wanted
    /// chunks), the next chunks in file order, newest level first, at most
    /// [`BACKGROUND_RUN_BYTES`].
    fn next(&mut self, connections_free: bool) -> Option<(u32, std::ops::Range<u64>)> {
        while let Some(id) = self.urgent.pop_front() {
            self.queued.remove(&id);
            if self.slot(id).is_some_and(|taken| !*taken) {
                self.wanted += 1;
                self.awaited.insert(id);
                let waiting = 1 + self
                    .urgent
                    .iter()
                    .filter(|&&id| self.taken_at(id) == Some(false))
                    .count() as u64;
                let (least, background) = self.runs[id.level as usize];
                let most = waiting
                    .div_ceil(self.free_connections.max(1) as u64)
                    .clamp(least, background.max(least));
                let run = self.take_run(id.level as usize, id.chunk, most);
                return Some((id.level, run));
            }
        }
        if !(connections_free && self.background && self.awaited.is_empty()) {
            return None;
        }
        while let Some(chunks) = self.taken.get(self.cursor.0) {
            let (level, mut chunk) = self.cursor;
            while (chunk as usize) < chunks.len() && chunks[chunk as usize] {
                chunk += 1;
            }
            if chunk as usize == chunks.len() {
                self.cursor = (level + 1, 0);
                continue;
            }
            let run = self.take_run(level, chunk, self.runs[level].1);
            self.cursor = (level, run.end);
            return Some((level as u32, run));
        }
        None
    }

    /// Takes chunk `start` of `level` (not yet taken) and the untaken ones after it, up
    /// to `most` in all.
    fn take_run(&mut self, level: usize, start: u64, most: u64) -> std::ops::Range<u64> {
        let chunks = &mut self.taken[level];
        let mut end = start;
        while (end as usize) < chunks.len() && !chunks[end as usize] && end - start < most {
            chunks[end as usize] = true;
            end += 1;
        }
        self.untaken -= (end - start) as usize;
        start..end
    }
}

/// One ranged GET of whole chunks of a page file.
struct Get {
    client: aws_sdk_s3::Client,
    traffic: Arc<super::Traffic>,
    bucket: String,
    key: String,
    url: String,
    manifest: Manifest,
    level: u32,
    chunks: std::ops::Range<u64>,
    bytes: std::ops::Range<u64>,
}

impl Get {
    /// Fetches the chunks and hands each to `out` as soon as its last byte is in. On
    /// failure, says which chunks it did not hand over.
    async fn run(
        &self,
        out: &tokio::sync::mpsc::Sender<(ChunkId, Vec<u8>)>,
        fetched: &std::sync::atomic::AtomicU64,
    ) -> Result<(), Failed> {
        let mut next = self.chunks.start;
        self.fetch(out, fetched, &mut next)
            .await
            .map_err(|error| Failed {
                error,
                level: self.level,
                unsent: next..self.chunks.end,
            })
    }

    async fn fetch(
        &self,
        out: &tokio::sync::mpsc::Sender<(ChunkId, Vec<u8>)>,
        fetched: &std::sync::atomic::AtomicU64,
        chunk: &mut u64,
    ) -> Result<(), StoreError> {
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .range(format!("bytes={}-{}", self.bytes.start, self.bytes.end - 1))
            .send()
            .await
            .map_err(|e| request("GetObject", self.url.clone(), &e))?;
        let mut body = response.body;
        let mut buffer = Vec::new();
        let mut got = 0u64;
        let length = |got| S3Error::Length {
            url: self.url.clone(),
            start: self.bytes.start,
            end: self.bytes.end,
            got,
        };
        let stalled = || S3Error::Request {
            op: "GetObject",
            url: self.url.clone(),
            detail: format!("no bytes for {BODY_STALL:?}"),
        };
        while let Some(bytes) = tokio::time::timeout(BODY_STALL, body.try_next())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| S3Error::Request {
                op: "GetObject",
                url: self.url.clone(),
                detail: DisplayErrorContext(&e).to_string(),
            })?
        {
            got += bytes.len() as u64;
            fetched.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.traffic.received(bytes.len() as u64);
            buffer.extend_from_slice(&bytes);
            while let Some(pages) =
                chunk_pages_of(&self.manifest, *chunk).filter(|_| *chunk < self.chunks.end)
            {
                let size = ((pages.end - pages.start) * PAGE_SIZE) as usize;
                if buffer.len() < size {
                    break;
                }
                let rest = buffer.split_off(size);
                let id = ChunkId {
                    level: self.level,
                    chunk: *chunk,
                };
                out.send((id, std::mem::replace(&mut buffer, rest)))
                    .await
                    .map_err(|_| S3Error::Panicked)?;
                *chunk += 1;
            }
            if got > self.bytes.end - self.bytes.start {
                return Err(length(got).into());
            }
        }
        if *chunk != self.chunks.end || !buffer.is_empty() {
            return Err(length(got).into());
        }
        Ok(())
    }
}

/// A GET that failed, and the chunks it did not hand over.
struct Failed {
    error: StoreError,
    level: u32,
    unsent: std::ops::Range<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schedule of levels of `chunks` chunks of 64 pages, its first wants in.
    fn schedule(chunks: &[usize]) -> Schedule {
        let taken = chunks.iter().map(|&n| vec![false; n]).collect();
        let mut s = Schedule::with(taken, vec![(2, 32); chunks.len()]);
        s.background = true;
        s
    }

    #[test]
    fn nothing_but_wanted_chunks_goes_before_the_first_wants_are_in() {
        let mut s = schedule(&[40]);
        s.background = false;
        assert_eq!(s.next(true), None);
        s.want(ChunkId { level: 0, chunk: 9 });
        assert_eq!(s.next(true), Some((0, 9..11)));
        assert_eq!(s.next(true), None);
        s.background = true;
        assert_eq!(s.next(true), None, "chunk 9 is awaited");
        assert!(s.arrived(ChunkId { level: 0, chunk: 9 }));
        assert_eq!(s.next(true), Some((0, 0..9)));
        assert_eq!(s.next(true), Some((0, 11..40)));
    }

    #[test]
    fn the_background_waits_while_a_wanted_chunk_is_on_its_way() {
        let mut s = schedule(&[40]);
        s.want(ChunkId { level: 0, chunk: 3 });
        assert_eq!(s.next(true), Some((0, 3..5)));
        assert_eq!(s.next(true), None);
        // The read-ahead chunk is not what the VMM waits for.
        assert!(!s.arrived(ChunkId { level: 0, chunk: 4 }));
        assert_eq!(s.next(true), None);
        assert!(s.arrived(ChunkId { level: 0, chunk: 3 }));
        assert_eq!(s.next(true), Some((0, 0..3)));
    }

    #[test]
    fn chunks_a_failed_get_did_not_bring_are_asked_for_again() {
        let mut s = schedule(&[40]);
        s.want(ChunkId {
            level: 0,
            chunk: 20,
        });
        assert_eq!(s.next(true), Some((0, 20..22)));
        assert_eq!(s.next(true), None, "chunk 20 is awaited");
        // That GET brought nothing: chunk 20 goes first again, still awaited.
        s.untake(0, 20..22);
        assert_eq!(s.next(true), Some((0, 20..22)));
        assert!(s.arrived(ChunkId {
            level: 0,
            chunk: 20
        }));
        assert_eq!(s.next(true), Some((0, 0..20)));
        assert_eq!(s.next(true), Some((0, 22..40)));
        // A background GET that brought its first 5 of 18 chunks.
        s.untake(0, 27..40);
        assert_eq!(s.next(true), Some((0, 27..40)));
        assert!(s.all_taken());
    }

    #[test]
    fn many_wanted_chunks_are_spread_over_the_free_connections() {
        // 40 chunks waited for, 2-chunk runs, 16 connections: 3 chunks a GET at first,
        // then 2, so that the 40 go in 16 GETs, not 20.
        let mut s = schedule(&[60]);
        for chunk in 0..40 {
            s.want(ChunkId { level: 0, chunk });
        }
        let mut gets = Vec::new();
        while let Some((_, run)) = s.next(false) {
            gets.push(run);
            s.free_connections -= 1;
        }
        assert_eq!(gets.len(), 16, "{gets:?}");
        assert_eq!(gets[0], 0..3);
        assert_eq!(gets.last(), Some(&(38..40)));
    }

    #[test]
    fn runs_are_sized_in_bytes() {
        let level = |chunk_pages, page_count| Streamed {
            manifest: Manifest {
                chunk_pages,
                page_count,
                ..Default::default()
            },
            part: PathBuf::new(),
            first: Vec::new(),
        };
        let s = Schedule::new(&[level(64, 640), level(1024, 4096)]);
        assert_eq!(s.runs, [(2, 32), (1, 2)]);
        assert_eq!(s.untaken, 10 + 4);
        assert!(!s.background);
    }

    #[test]
    fn the_background_goes_in_file_order_newest_level_first_in_runs() {
        let mut s = schedule(&[40, 3]);
        assert_eq!(s.next(true), Some((0, 0..32)));
        assert_eq!(s.next(true), Some((0, 32..40)));
        assert_eq!(s.next(true), Some((1, 0..3)));
        assert_eq!(s.next(true), None);
    }

    #[test]
    fn a_wanted_chunk_jumps_the_queue_with_the_chunks_after_it() {
        let id = |chunk| ChunkId { level: 0, chunk };
        let mut s = schedule(&[50]);
        s.take(id(0));
        s.want(id(5));
        // Out of range, or already asked for: ignored.
        s.want(id(0));
        s.want(ChunkId { level: 3, chunk: 0 });
        s.want(id(99));
        // Only wanted chunks go when the background may not.
        assert_eq!(s.next(false), Some((0, 5..7)));
        assert_eq!(s.next(false), None);
        assert!(s.arrived(id(5)));
        assert_eq!(s.next(true), Some((0, 1..5)));
        assert_eq!(s.next(true), Some((0, 7..39)));
        // A wanted chunk already asked for goes nowhere; one not yet jumps the queue.
        s.want(id(20));
        s.want(id(47));
        // Repeated, a want adds nothing.
        s.want(id(47));
        assert_eq!(s.urgent.len(), 1);
        assert_eq!(s.next(true), Some((0, 47..49)));
        assert!(s.arrived(id(47)));
        assert_eq!(s.next(true), Some((0, 39..47)));
        assert_eq!(s.next(true), Some((0, 49..50)));
        assert_eq!(s.next(true), None);
        assert_eq!(s.wanted, 2);
    }
}

//! Bringing an app back from a snapshot, in a fresh VMM.
//!
//! The snapshot's page files (the newest and, for an increment, its parents) become guest
//! memory: each is mapped private over a run of frames, so a page is read from the host's
//! page cache only when first touched and the guest's writes stay its own. Page tables are
//! built fresh, with A = 0 — except, in `activeset` mode, on the ActiveSet, whose pages are
//! also faulted in up front: with A = 1 kvm_pvm maps 8 pages per fault, and the data is
//! already in memory. The app's next snapshot learns a new ActiveSet from the A bits.

use super::{memory, prot, PersistError, PAGE};
use crate::builder;
use crate::kernel::process::Process;
use crate::kvm::cpu;
use crate::memory::{Backing, Vma, VmaRole};
use crate::{Config, Picoprocess, VmmError};
use picocenter_snapshots::archive;
use picocenter_snapshots::chain::{covered, hot_chunks, hot_set, ranges, resolve_all};
use picocenter_snapshots::feed::ChunkId;
use picocenter_snapshots::format::{BackingRecord, Manifest, PageSource};
use picocenter_snapshots::pagefile;
use picocenter_snapshots::store::{self, Store};
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much of the snapshot to bring in before the app runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMode {
    /// Everything, verified.
    Eager,
    /// Nothing: every page comes in when first touched.
    Lazy,
    /// The ActiveSet (verified), with A = 1 on its entries.
    #[default]
    ActiveSet,
    /// The app runs at once while the newest page file streams in behind it (ActiveSet
    /// first, each chunk verified); a page touched before it arrives jumps the queue
    /// (userfaultfd). For page files on slow storage.
    Stream,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "eager" => Ok(RestoreMode::Eager),
            "lazy" => Ok(RestoreMode::Lazy),
            "stream" => Ok(RestoreMode::Stream),
            "activeset" => Ok(RestoreMode::ActiveSet),
            other => Err(format!(
                "unknown restore mode {other:?} (eager, lazy, activeset, stream)"
            )),
        }
    }
}

/// What a restore should do beyond the snapshot's own settings.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// How much to bring in up front.
    pub mode: RestoreMode,
    /// Build the ActiveSet's entries with A = 0 anyway, so the next snapshot learns it
    /// afresh (a prefetch with A = 1 hides which pages the app really used).
    pub relearn: bool,
    /// The port the app's first client connected to, if known: the pages requests on that
    /// port used last time come first instead of the app-wide ActiveSet, which after a
    /// fresh start also holds everything its initialisation touched (issue #14).
    pub first_port: Option<u16>,
    /// Page files that a worker feeds in while it downloads them (stream mode only): the
    /// app runs before they are here.
    pub feed: Option<super::stream::Feed>,
    /// How the app's VMM is locked down once built: the restore of a tree of processes
    /// locks down the VMM of each of the others the same way.
    pub lockdown: Option<crate::sandbox::supervise::Lockdown>,
}

/// Gives the page file `file` of `manifest` fresh frames that a streamer thread fills
/// while the app runs (see [`super::stream`]). Returns the first frame.
fn stream_in(
    space: &mut crate::memory::AddressSpace,
    file: File,
    manifest: &Manifest,
) -> Result<u64, PersistError> {
    let (base, host) = space
        .reserve_page_file(manifest.page_count)
        .map_err(memory("reserving frames for the page file"))?;
    space.note_streamed(base, manifest.page_count * PAGE);
    let stream_error = |what: &str, e: std::io::Error| PersistError::Data {
        what: what.to_string(),
        source: e,
    };
    let uffd = crate::memory::uffd::Uffd::new()
        .map_err(|e| stream_error("creating a userfaultfd for streaming", e))?;
    uffd.register(host, manifest.page_count * PAGE)
        .map_err(|e| stream_error("registering the page file's frames", e))?;
    super::stream::Streamer::new(file, manifest, uffd, host)
        .spawn()
        .map_err(|e| stream_error("starting the streamer", e))?;
    Ok(base)
}

/// Registers the fed page files' frames (level, host address of the first) with one
/// userfaultfd and starts the thread that fills them from `feed`, asking first for the
/// chunks `first`.
fn start_feed(
    feed: &super::stream::Feed,
    manifests: &[Manifest],
    fed_levels: Vec<(usize, u64)>,
    first: Vec<ChunkId>,
    first_served: Option<std::os::fd::OwnedFd>,
) -> Result<(), PersistError> {
    let feed_error = |what: &str, e: std::io::Error| PersistError::Data {
        what: what.to_string(),
        source: e,
    };
    let uffd = crate::memory::uffd::Uffd::new()
        .map_err(|e| feed_error("creating a userfaultfd for the feed", e))?;
    let mut levels: Vec<Option<super::stream::FedLevel>> = feed.ids.iter().map(|_| None).collect();
    for (level, host) in fed_levels {
        let manifest = manifests
            .iter()
            .find(|m| m.id == feed.ids[level])
            .cloned()
            .unwrap_or_default();
        if manifest.page_count > 0 {
            uffd.register(host, manifest.page_count * PAGE)
                .map_err(|e| feed_error("registering a fed page file's frames", e))?;
        }
        levels[level] = Some(super::stream::FedLevel {
            manifest,
            host_base: host,
        });
    }
    let levels = levels.into_iter().flatten().collect::<Vec<_>>();
    if levels.len() != feed.ids.len() {
        return Err(PersistError::Incompatible(
            "the feed names a snapshot twice".into(),
        ));
    }
    super::stream::FeedStreamer {
        socket: feed.socket.clone(),
        uffd,
        levels,
        first,
        first_served,
    }
    .spawn()
    .map_err(|e| feed_error("starting the feed's streamer", e))?;
    Ok(())
}

/// Gives the writable directories to the app's user: the restore, as root, unpacked the
/// data archive there and bound the app's unix sockets again, which the app must be able
/// to write to and connect to.
fn give_data_to_app(config: &Config, options: &RestoreOptions) -> Result<(), PersistError> {
    let Some(lockdown) = &options.lockdown else {
        return Ok(());
    };
    for (_, host) in &config.writable {
        lockdown.own(host).map_err(|e| {
            PersistError::Incompatible(format!(
                "giving the restored {} to the app: {e}",
                host.display()
            ))
        })?;
    }
    Ok(())
}

/// Refuses a file the restore (which runs as root, before the lockdown) reopened for a
/// mapping unless the app could read it too: anyone may, or it is not root's (the app's
/// own files are its user's). A snapshot's path may since name something else: a symlink
/// the app put in a writable directory, say.
fn app_may_read(fd: &impl std::os::fd::AsFd, path: &str) -> Result<(), PersistError> {
    let stat = rustix::fs::fstat(fd).map_err(memory("reopening a mapped file"))?;
    if stat.st_mode & 0o004 != 0 || stat.st_uid != 0 {
        return Ok(());
    }
    Err(PersistError::Incompatible(format!(
        "{path:?}, which the app maps, is not a file the app may read"
    )))
}

/// Where a page file's pages are in guest memory.
enum Frames {
    /// All of them, from this frame on.
    Contiguous(u64),
    /// Runs of them: (first page, pages, first frame), in page order.
    Runs(Vec<(u64, u64, u64)>),
}

impl Frames {
    /// The frame of page `index`, if it is mapped.
    fn frame(&self, index: u64) -> Option<u64> {
        match self {
            Frames::Contiguous(base) => Some(base + index * PAGE),
            Frames::Runs(runs) => {
                let at = runs.partition_point(|&(first, _, _)| first <= index);
                let &(first, count, base) = runs.get(at.checked_sub(1)?)?;
                (index < first + count).then(|| base + (index - first) * PAGE)
            }
        }
    }

    /// The runs of frames: (first frame, pages), for a page file of `pages` pages.
    fn runs(&self, pages: u64) -> Vec<(u64, u64)> {
        match self {
            Frames::Contiguous(base) => vec![(*base, pages)],
            Frames::Runs(runs) => runs.iter().map(|&(_, count, base)| (base, count)).collect(),
        }
    }
}

/// The runs (first page, pages) of the page file at `depth` that `pieces` use.
fn referenced_runs(pieces: &[picocenter_snapshots::chain::Piece], depth: usize) -> Vec<(u64, u64)> {
    let mut indices: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|piece| piece.depth == depth)
        .filter_map(|piece| match piece.source {
            PageSource::Stored { index } => Some((index, piece.count)),
            _ => None,
        })
        .collect();
    indices.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (first, count) in indices {
        match runs.last_mut() {
            Some((start, pages)) if first <= *start + *pages => {
                *pages = (*pages).max(first + count - *start);
            }
            _ => runs.push((first, count)),
        }
    }
    runs
}

/// Checks that this host offers every CPU feature the snapshot may rely on.
fn check_cpu(manifest: &Manifest, parts: &builder::Parts) -> Result<(), PersistError> {
    let here = builder::cpu_record(parts);
    for need in manifest.cpu.leaves.iter().map(builder::isa_bits) {
        let have = here
            .leaves
            .iter()
            .find(|l| (l.function, l.index) == (need.function, need.index));
        let missing = match have {
            None => (need.ebx, need.ecx, need.edx),
            Some(h) => (need.ebx & !h.ebx, need.ecx & !h.ecx, need.edx & !h.edx),
        };
        if missing != (0, 0, 0) {
            return Err(PersistError::Incompatible(format!(
                "the snapshot needs CPU features this host lacks: CPUID {:#x}.{} \
                 ebx {:#x} ecx {:#x} edx {:#x}",
                need.function, need.index, missing.0, missing.1, missing.2
            )));
        }
    }
    if manifest.cpu.xcr0 & !here.xcr0 != 0 {
        return Err(PersistError::Incompatible(format!(
            "the snapshot's FPU state needs XCR0 {:#x}, this host offers {:#x}",
            manifest.cpu.xcr0, here.xcr0
        )));
    }
    Ok(())
}

/// The data archive of the newest snapshot, if the app has one: it must be there when the
/// manifest says there is one, and not otherwise.
fn data_archive(
    store: &dyn Store,
    manifest: &Manifest,
) -> Result<Option<std::path::PathBuf>, PersistError> {
    match store.data_archive(&manifest.id)? {
        None if manifest.data_bytes > 0 => Err(PersistError::Archive(
            archive::ArchiveError::Corrupt("it is missing".into()),
        )),
        found => Ok(found),
    }
}

/// Checks the data archive (size, digest, every entry) without writing anything.
fn check_data(store: &dyn Store, manifest: &Manifest, config: &Config) -> Result<(), PersistError> {
    if let Some(path) = data_archive(store, manifest)? {
        archive::check(
            &path,
            manifest.data_bytes,
            &manifest.data_digest,
            &config.writable,
        )?;
    }
    Ok(())
}

/// Unpacks the data archive of the snapshot into the writable directories.
fn unpack_data(
    store: &dyn Store,
    manifest: &Manifest,
    config: &Config,
) -> Result<(), PersistError> {
    if let Some(path) = data_archive(store, manifest)? {
        archive::unpack(&path, &config.writable)?;
    }
    Ok(())
}

impl Picoprocess {
    /// Restores snapshot `id` from `store` into a new picoprocess configured by `config`
    /// (which says where the root and writable directories are, the address, the name).
    /// The snapshot is refused before anything is built from it unless its chain checks
    /// out under `config.snapshot_key`, is of the app `config` describes (name, image,
    /// writable directories, memory; see [`super::trust`]) and fits its memory. Must be
    /// called on the thread that will run it.
    pub fn restore(
        config: &Config,
        store: &dyn Store,
        id: &str,
        options: &RestoreOptions,
    ) -> Result<Self, VmmError> {
        Self::restore_inner(config, store, id, options).map_err(VmmError::Restore)
    }

    fn restore_inner(
        config: &Config,
        store: &dyn Store,
        id: &str,
        options: &RestoreOptions,
    ) -> Result<Self, PersistError> {
        let key = config.snapshot_key.as_ref().ok_or(PersistError::NoKey)?;
        let manifests = store::chain(store, key, id)?;
        super::trust::check(&manifests, config)?;
        let newest = &manifests[0];
        let others = newest.tree.iter().flat_map(|t| &t.others);
        let records = newest
            .files
            .iter()
            .chain(others.flat_map(|part| &part.files));
        let mut objects = super::files::SharedObjects::expecting(records);
        let Some(tree) = newest.tree.clone() else {
            let picoprocess = Self::build(config, store, &manifests, options, &mut objects, None)?;
            // The app's own sockets are its user's before any is connected to.
            give_data_to_app(config, options)?;
            objects.connect_all(&crate::kernel::process::lock(&picoprocess.process));
            return Ok(picoprocess);
        };
        if options.feed.is_some() {
            return Err(PersistError::Incompatible(
                "a snapshot of several processes is restored from a whole page file, not a fed one"
                    .into(),
            ));
        }
        // The other processes' VMMs are forked first, before this one has threads or a VM;
        // each builds its own process (see `restore_tree`) and never returns here.
        // Each process maps the page file's pages it has, so none is streamed in whole.
        let options = &RestoreOptions {
            mode: match options.mode {
                RestoreMode::Stream => RestoreMode::ActiveSet,
                mode => mode,
            },
            ..options.clone()
        };
        // Shared memory is made before the forks, so that every process maps the same.
        objects
            .make_memory(&manifests[0].shared_memory)
            .map_err(memory("making the shared memory"))?;
        let mut first = super::restore_tree::fork_processes(
            config, store, &manifests, &tree, options, &objects,
        )?;
        let picoprocess = Self::build(
            config,
            store,
            &manifests,
            options,
            &mut objects,
            Some(&mut first),
        )?;
        // The data is the app's before any of its processes runs (one that opened a file
        // still root's failed with EACCES, and a pipeline lost a line).
        first.hand_on(&picoprocess, &manifests[0], &tree, &mut objects, || {
            give_data_to_app(config, options)
        })?;
        Ok(picoprocess)
    }

    /// Builds the picoprocess of the newest snapshot of `manifests` (for a process of a
    /// tree other than its first, a one-manifest chain of its part: see
    /// `Manifest::part_view`). `role`: its place in a tree, if the app is one.
    pub(super) fn build(
        config: &Config,
        store: &dyn Store,
        manifests: &[picocenter_snapshots::format::Manifest],
        options: &RestoreOptions,
        objects: &mut super::files::SharedObjects,
        mut role: Option<&mut dyn super::restore_tree::Role>,
    ) -> Result<Self, PersistError> {
        let started = Instant::now();
        // Where the time goes, for `RUST_LOG=picocenter_vmm=debug`.
        let phase = |name: &str| {
            tracing::debug!(
                ms = started.elapsed().as_secs_f64() * 1e3,
                "restore: {name}"
            )
        };
        // The data archive is the app's, unpacked once, by its first process.
        let first_process = role.as_ref().is_none_or(|r| r.is_first());
        let newest = &manifests[0];
        let hot_pages = hot_set(newest, options.first_port);
        tracing::debug!(
            first_port = ?options.first_port,
            pages_first = hot_pages.iter().map(|r| r.count).sum::<u64>(),
            app_wide = newest.activeset.iter().map(|r| r.count).sum::<u64>(),
            "restore: the pages that come first"
        );
        let pieces = resolve_all(manifests).ok_or_else(|| {
            PersistError::Incompatible("some pages are in no snapshot of the chain".into())
        })?;
        // Refuse a damaged snapshot before anything is built from it: every page read up
        // front is verified (the rest is read later, from the host page cache, as the app
        // touches it; only the file sizes are checked for those).
        let mut upfront: Vec<Vec<u64>> = vec![Vec::new(); manifests.len()];
        if options.mode == RestoreMode::ActiveSet {
            for piece in &pieces {
                if let PageSource::Stored { index } = piece.source {
                    upfront[piece.depth].extend(
                        (0..piece.count)
                            .filter(|i| covered(hot_pages, piece.vpn + i))
                            .map(|i| index + i),
                    );
                }
            }
        }
        // The feed's level of each snapshot of the chain whose page file is fed.
        let fed_level: Vec<Option<usize>> = manifests
            .iter()
            .map(|m| {
                let ids = options.feed.as_ref().map_or(&[][..], |f| &f.ids[..]);
                ids.iter().position(|id| *id == m.id)
            })
            .collect();
        if let Some(feed) = &options.feed {
            if options.mode != RestoreMode::Stream {
                return Err(PersistError::Incompatible(
                    "a fed page file needs the stream restore mode".into(),
                ));
            }
            if let Some(stray) = feed
                .ids
                .iter()
                .find(|id| !manifests.iter().any(|m| m.id == **id))
            {
                return Err(PersistError::Incompatible(format!(
                    "the feed carries snapshot {stray}, which is not in the chain"
                )));
            }
        }
        let mut page_files = Vec::new();
        for ((m, pages), fed) in manifests.iter().zip(upfront).zip(&fed_level) {
            let path = store.page_file(&m.id)?;
            if fed.is_some() {
                // Not here yet: each chunk is checked as it arrives.
                page_files.push(path);
                continue;
            }
            match options.mode {
                RestoreMode::Eager => pagefile::verify(&path, m, 0, m.page_count)?,
                RestoreMode::ActiveSet => pagefile::verify_pages(&path, m, pages)?,
                RestoreMode::Lazy | RestoreMode::Stream => pagefile::check_size(&path, m)?,
            }
            page_files.push(path);
        }
        if first_process {
            check_data(store, newest, config)?;
        }
        phase("verified");
        let (parts, mut space, sandbox) =
            builder::prepare(config).map_err(|e| PersistError::Incompatible(e.to_string()))?;
        phase("vm");
        check_cpu(newest, &parts)?;
        if first_process {
            unpack_data(store, newest, config)?;
        }

        // Page files become guest memory: whole, or (with a tree anywhere in the chain)
        // only the pages this process has.
        let sparse = role.is_some() || manifests.iter().any(|m| m.tree.is_some());
        let mut bases = Vec::new();
        let mut fed_levels = Vec::new();
        for (depth, (m, path)) in manifests.iter().zip(&page_files).enumerate() {
            if let Some(level) = fed_level[depth] {
                let (base, host) = space
                    .reserve_page_file(m.page_count)
                    .map_err(memory("reserving frames for a fed page file"))?;
                space.note_streamed(base, m.page_count * PAGE);
                fed_levels.push((level, host));
                bases.push(Frames::Contiguous(base));
                continue;
            }
            let file = File::open(path).map_err(|source| PersistError::Data {
                what: format!("opening {}", path.display()),
                source,
            })?;
            if depth == 0 && options.mode == RestoreMode::Stream && m.page_count > 0 {
                bases.push(Frames::Contiguous(stream_in(&mut space, file, m)?));
                continue;
            }
            if sparse {
                // A tree's page file holds every process's pages: each process maps only
                // those it has, or it would run out of frames for the others'.
                let runs = referenced_runs(&pieces, depth);
                let firsts = space
                    .attach_page_runs(std::os::fd::AsFd::as_fd(&file), &runs)
                    .map_err(memory("mapping the page file"))?;
                bases.push(Frames::Runs(
                    runs.iter()
                        .zip(firsts)
                        .map(|(&(first, count), base)| (first, count, base))
                        .collect(),
                ));
                continue;
            }
            bases.push(Frames::Contiguous(
                space
                    .attach_page_file(std::os::fd::AsFd::as_fd(&file), m.page_count)
                    .map_err(memory("mapping the page file"))?,
            ));
        }
        phase("attached");

        // Areas, then pages.
        objects
            .make_memory(&newest.shared_memory)
            .map_err(memory("making the shared memory"))?;
        for record in &newest.vmas {
            let backing = match &record.backing {
                BackingRecord::Anonymous => Backing::Anonymous,
                BackingRecord::File {
                    path,
                    offset,
                    immutable,
                } => {
                    let fd = sandbox
                        .open(path, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty())
                        .map_err(|errno| PersistError::Data {
                            what: format!("reopening {path:?}, which the app maps"),
                            source: errno.into(),
                        })?;
                    app_may_read(&fd, path)?;
                    Backing::File {
                        file: Arc::new(File::from(fd)),
                        offset: *offset,
                        path: path.as_str().into(),
                        immutable: *immutable,
                    }
                }
                BackingRecord::Shared {
                    path,
                    offset,
                    memory: 0,
                } => {
                    // A file in a writable directory, which the data archive brought back.
                    let fd = sandbox
                        .open(path, rustix::fs::OFlags::RDWR, rustix::fs::Mode::empty())
                        .map_err(|errno| PersistError::Data {
                            what: format!("reopening {path:?}, which the app maps shared"),
                            source: errno.into(),
                        })?;
                    // Opened as root: only a plain file of the app's own (one name, so
                    // not a link to a file of someone else's) is mapped writable.
                    app_may_read(&fd, path)?;
                    let stat =
                        rustix::fs::fstat(&fd).map_err(memory("reopening a file mapped shared"))?;
                    if !rustix::fs::FileType::from_raw_mode(stat.st_mode).is_file()
                        || stat.st_nlink != 1
                    {
                        return Err(PersistError::Incompatible(format!(
                            "{path:?}, mapped shared, is not a plain file of the app's"
                        )));
                    }
                    Backing::Shared {
                        file: Arc::new(File::from(fd)),
                        offset: *offset,
                        path: path.as_str().into(),
                    }
                }
                BackingRecord::Shared {
                    path,
                    offset,
                    memory,
                } => Backing::Shared {
                    file: objects.memory.get(memory).cloned().ok_or_else(|| {
                        PersistError::Incompatible(format!("no shared memory {memory:#x}"))
                    })?,
                    offset: *offset,
                    path: path.as_str().into(),
                },
            };
            let role = match record.role {
                1 => VmaRole::Heap,
                2 => VmaRole::Stack,
                _ => VmaRole::Mapping,
            };
            space
                .restore_vma(Vma {
                    start: record.start,
                    end: record.end,
                    prot: prot(record.prot),
                    backing,
                    role,
                })
                .map_err(memory("rebuilding an area"))?;
        }
        phase("areas");
        let hot = |vpn: u64| covered(hot_pages, vpn);
        let preset = |vpn: u64| match options.mode {
            RestoreMode::Eager => true,
            RestoreMode::Lazy => false,
            RestoreMode::Stream => !options.relearn && hot(vpn),
            RestoreMode::ActiveSet => !options.relearn && hot(vpn),
        };
        let mut prefetch: Vec<u64> = Vec::new();
        let mut preset_pages: Vec<u64> = Vec::new();
        let mut file_pages: Vec<u64> = Vec::new();
        // The fed chunks that hold the pages that come first.
        let fed_first = hot_chunks(manifests, &pieces, hot_pages, |depth| {
            fed_level[depth].map(|level| level as u32)
        });
        for piece in pieces {
            let vpns = piece.vpn..piece.vpn + piece.count;
            match piece.source {
                PageSource::Stored { index } => {
                    let frame = bases[piece.depth].frame(index).ok_or_else(|| {
                        PersistError::Incompatible(format!(
                            "page {:#x} is not in its page file",
                            piece.vpn * PAGE
                        ))
                    })?;
                    space
                        .map_restored_run(piece.vpn * PAGE, frame, piece.count, |i| {
                            preset(piece.vpn + i)
                        })
                        .map_err(memory("mapping pages"))?;
                    preset_pages.extend(vpns.clone().filter(|&vpn| preset(vpn)));
                    if options.mode == RestoreMode::ActiveSet {
                        prefetch.extend(
                            vpns.filter(|&vpn| hot(vpn))
                                .map(|vpn| frame + (vpn - piece.vpn) * PAGE),
                        );
                    }
                }
                PageSource::File => file_pages.extend(vpns),
                // An anonymous zero page is what a first touch gives anyway, so it is
                // left to demand paging: nothing to allocate or clear now.
                PageSource::Zero => {
                    for vpn in vpns {
                        if !space.is_anonymous(vpn * PAGE) {
                            space
                                .map_zero(vpn * PAGE)
                                .map_err(memory("mapping a zero page"))?;
                        }
                    }
                }
                PageSource::Parent => {
                    return Err(PersistError::Incompatible(format!(
                        "page {:#x} refers to a parent the chain does not have",
                        piece.vpn * PAGE
                    )))
                }
            }
        }
        // File pages in runs: one mapping of the file per run.
        for run in ranges(file_pages) {
            space
                .map_from_file(run.vpn * PAGE, (run.vpn + run.count) * PAGE)
                .map_err(memory("mapping file pages"))?;
        }
        phase("pages");
        // The app tells the feed when it has served its first request (an eventfd).
        let mut first_request = None;
        if let Some(feed) = &options.feed {
            let notice = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .and_then(|fd| Ok((rustix::io::fcntl_dupfd_cloexec(&fd, 0)?, fd)))
            .map_err(|e| PersistError::Data {
                what: "creating the feed's first-request eventfd".into(),
                source: e.into(),
            })?;
            first_request = Some(crate::kernel::process::FirstRequest::new(notice.0));
            start_feed(feed, manifests, fed_levels, fed_first, Some(notice.1))?;
        }
        match options.mode {
            RestoreMode::Eager => {
                for (m, frames) in manifests.iter().zip(&bases) {
                    for (base, pages) in frames.runs(m.page_count) {
                        if pages > 0 {
                            space
                                .prefault(base, pages * PAGE)
                                .map_err(memory("reading the snapshot in"))?;
                        }
                    }
                }
            }
            RestoreMode::ActiveSet => {
                prefetch.sort_unstable();
                for run in ranges(prefetch.iter().map(|f| f / PAGE)) {
                    space
                        .prefault(run.vpn * PAGE, run.count * PAGE)
                        .map_err(memory("reading the ActiveSet in"))?;
                }
            }
            RestoreMode::Lazy | RestoreMode::Stream => {}
        }
        phase("prefetched");
        space.restore_brk(newest.process.brk_start, newest.process.brk);
        space.invalidated();

        // The vCPU, at the app's context.
        let vcpu_fd = parts
            .machine
            .create_vcpu()
            .map_err(|e| PersistError::Incompatible(e.to_string()))?;
        let context = &newest.context;
        cpu::configure(
            &vcpu_fd,
            &parts.cpuid,
            parts.features,
            crate::kvm::system::cpu_root(&space, crate::memory::layout::FIRST_CPU)
                .map_err(|e| PersistError::Incompatible(e.to_string()))?,
            context.rip,
            context.gprs[6],
        )
        .map_err(|e| PersistError::Incompatible(e.to_string()))?;
        cpu::restore_context(&vcpu_fd, context)
            .map_err(|e| PersistError::Incompatible(e.to_string()))?;

        phase("vcpu");
        let mut process = builder::process(config, &parts, space, sandbox, &vcpu_fd)
            .map_err(|e| PersistError::Incompatible(e.to_string()))?;
        restore_process(&mut process, newest)?;
        // The port whose set the hot pages came from (see `hot_set`), if they came from one.
        let hot_port = options.first_port.filter(|&port| {
            newest
                .port_sets
                .iter()
                .any(|set| set.port == port && !set.pages.is_empty())
        });
        let presets = match options.mode {
            RestoreMode::Eager => crate::activeset::Presets::Everything,
            _ => crate::activeset::Presets::HotSet(hot_port),
        };
        process.activeset.restored(preset_pages, presets);
        process.first_request = first_request;
        if let Some(role) = role.as_mut() {
            role.set_up(&mut process)?;
        }
        phase("process");
        super::files::restore(&mut process, &newest.files, objects)?;
        process.restored_from = Some((store.describe(), newest.id.clone()));
        process.prefetched = matches!(options.mode, RestoreMode::ActiveSet | RestoreMode::Stream)
            .then(|| picocenter_snapshots::format::PrefetchRecord {
                from: newest.id.clone(),
                port: hot_port,
                accessed_preset: !options.relearn,
            });
        phase("files");
        let picoprocess = builder::finish(config, parts, vcpu_fd, process)
            .map_err(|e| PersistError::Incompatible(e.to_string()))?;
        tracing::info!(
            id = %newest.id,
            mode = ?options.mode,
            chain = manifests.len(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "restored"
        );
        Ok(picoprocess)
    }
}

/// Signals, clocks, working directory and the rest of the process state.
fn restore_process(p: &mut Process, m: &Manifest) -> Result<(), PersistError> {
    for (slot, action) in p.signals.actions.iter_mut().zip(&m.signals.actions) {
        *slot = crate::kernel::signals::SigAction {
            handler: action[0],
            flags: action[1],
            restorer: action[2],
            mask: action[3],
        };
    }
    p.signals.mask = m.signals.mask;
    p.signals.pending = m.signals.pending;
    p.signals.altstack = m.signals.altstack;
    if m.signals.alarm.0 > 0 {
        p.alarm.set(
            Duration::from_nanos(m.signals.alarm.0),
            Duration::from_nanos(m.signals.alarm.1),
        );
    }
    // CLOCK_MONOTONIC goes on from where it was, plus the wall-clock time the app was away
    // (never less): it never runs backwards, on any host.
    let host_mono = p.clock.now_ns(libc::CLOCK_MONOTONIC).unwrap_or(0);
    let real_now = p.clock.now_ns(libc::CLOCK_REALTIME).unwrap_or(0);
    let away = (real_now - m.clock.realtime_ns as i128).max(0);
    let mono_now = m.clock.monotonic_ns as i128 + away;
    p.clock.monotonic_offset_ns = (mono_now - host_mono) as i64;
    p.clock.published = None;
    p.clock.base = None;
    p.cwd = m.process.cwd.clone();
    p.umask = m.process.umask;
    p.credentials = crate::kernel::credentials::Credentials::from_record(&m.process.credentials);
    let deadline = |restart: Option<(u64, u64, u64)>| {
        restart.map(|(nr, rip, deadline)| {
            let left = (deadline as i128 - mono_now).max(0) as u64;
            (nr, rip, Instant::now() + Duration::from_nanos(left))
        })
    };
    if m.process.tid > 0 {
        p.thread.tid = m.process.tid;
    }
    p.thread.robust_list = m.process.robust_list;
    p.thread.clear_child_tid = m.process.clear_child_tid;
    p.thread.fs_base = m.context.fs_base;
    p.thread.restart = deadline(m.process.restart);
    p.signals.thread_pending = m.signals.thread_pending;
    for t in &m.threads {
        let mut state = crate::kernel::thread::ThreadState::new(t.tid);
        state.fs_base = t.context.fs_base;
        state.clear_child_tid = t.clear_child_tid;
        state.robust_list = t.robust_list;
        state.restart = deadline(t.restart);
        state.futex_woken = t.futex_woken;
        p.threads.note_tid(t.tid);
        p.threads.parked.push_back(crate::kernel::thread::Parked {
            state,
            signals: crate::kernel::thread::ThreadSignals {
                mask: t.mask,
                pending: t.pending,
                altstack: t.altstack,
            },
            cpu: crate::kernel::thread::CpuContext {
                regs: cpu::user_regs(&t.context),
                xsave: Box::new(cpu::xsave_from(&t.context.xsave)),
            },
            // Whatever it waited for is looked at again when it performs its call.
            wait: crate::kernel::thread::Wait::Runnable,
            in_call: t.in_call,
            pinned_to: None,
        });
    }
    p.threads.note_tid(p.thread.tid);
    if p.threads.any() {
        let slicer = crate::kernel::thread::TimeSlicer::start(p.kicker.clone())
            .map_err(|e| PersistError::Incompatible(format!("the threads' time slicer: {e}")))?;
        p.threads.slicer = Some(slicer);
    }
    Ok(())
}

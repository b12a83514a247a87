//! Snapshots of a running picoprocess, and restores from them (the format itself is the
//! `picocenter-snapshots` crate).
//!
//! A capture happens at a clean point, with the app outside any system call (a blocking
//! one is rewound to be made again, its deadline kept). It writes:
//!
//! * the user context: registers, FS/GS base, XSAVE state;
//! * the areas, and each page: unchanged since the parent snapshot, unchanged from its
//!   file, zero, or stored in the page file — the ActiveSet (pages with A = 1) first;
//! * the fd table, signal state, clocks, and an archive of the writable directories.

pub mod files;
pub mod parts;
pub mod restore;
pub mod restore_tree;
pub mod stream;
pub mod trust;

use crate::kernel::process::Process;
use crate::kvm::vcpu::{Vcpu, VcpuError};
use crate::memory::{Backing, PageState, Prot};
use picocenter_snapshots::archive::{self, ArchiveError};
use picocenter_snapshots::bounds::MAX_SHARED_MEMORY;
use picocenter_snapshots::chain::runs;
use picocenter_snapshots::format::{
    BackingRecord, ClockRecord, Manifest, PageRun, PageSource, ProcessRecord, SharedMemoryRecord,
    SignalRecord, SnapshotStats, ThreadRecord, UserContext, VmaRecord, VpnRange,
};
use picocenter_snapshots::pagefile::{PageFileError, PageFileWriter, CHUNK_PAGES};
use picocenter_snapshots::store::{new_id, Store, StoreError};
use std::path::Path;
use std::time::Instant;

const PAGE: u64 = 4096;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The page file failed.
    #[error(transparent)]
    PageFile(#[from] PageFileError),
    /// Reading or setting the vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory could not be read or rebuilt.
    #[error("{what}: {errno}")]
    Memory {
        /// The step.
        what: &'static str,
        /// Why.
        errno: rustix::io::Errno,
    },
    /// A host file could not be opened or read.
    #[error("{what}")]
    Data {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The writable directories could not be archived, or their archive was refused.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The snapshot is not what the caller restores, or is out of the app's bounds.
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    /// No snapshot key was configured.
    #[error("no snapshot key: snapshots are authenticated with the cluster's key")]
    NoKey,
    /// A descriptor could not be made again.
    #[error(transparent)]
    Files(#[from] files::FileRestoreError),
    /// The snapshot cannot run here.
    #[error("{0}")]
    Incompatible(String),
    /// The app holds something a snapshot cannot keep.
    #[error("the app cannot be snapshotted: {0}")]
    Unsnapshottable(String),
    /// The snapshot was to be taken only if the app is idle, and one of its processes is
    /// not.
    #[error("busy: {0}")]
    Busy(String),
    /// The app was not at a clean point (its context would not be its own).
    #[error("the app is not at a clean point: rip={rip:#x} is not a user address")]
    NotAtCleanPoint {
        /// Where it was.
        rip: u64,
    },
}

fn memory(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> PersistError {
    move |errno| PersistError::Memory { what, errno }
}

/// How each page is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    File,
    Parent,
    Stored,
}

/// The class of a page that need not be read: unchanged since the parent snapshot, or an
/// unwritten page of an immutable file. `None` means its contents decide (zero or stored).
fn class_without_contents(p: &Process, page: &PageState, has_parent: bool) -> Option<Class> {
    if page.restored && !page.dirty && has_parent {
        return Some(Class::Parent);
    }
    let immutable_file = matches!(
        p.mem.vmas().get(page.va).map(|v| &v.backing),
        Some(Backing::File {
            immutable: true,
            ..
        })
    );
    // D only tells of writes since the tables were built or last saved; a page that held
    // anything but the file's bytes before then is marked restored.
    (immutable_file && !page.dirty && !page.restored).then_some(Class::File)
}

/// Whether a page holds only zeros; word-wise so it runs at memory speed.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|line| {
        line.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

use picocenter_snapshots::chain::ranges;

fn vma_records(p: &Process) -> Vec<VmaRecord> {
    p.mem
        .vmas()
        .iter()
        .map(|v| VmaRecord {
            start: v.start,
            end: v.end,
            prot: v.prot.0,
            role: v.role as u8,
            backing: match &v.backing {
                Backing::Anonymous => BackingRecord::Anonymous,
                Backing::File {
                    offset,
                    path,
                    immutable,
                    ..
                } => BackingRecord::File {
                    path: path.to_string(),
                    offset: *offset,
                    immutable: *immutable,
                },
                Backing::Shared { offset, path, file } => BackingRecord::Shared {
                    path: path.to_string(),
                    offset: *offset,
                    memory: shared_memory_key(file).unwrap_or(0),
                },
            },
        })
        .collect()
}

/// The app's context. The run loop settles the vCPU before any capture (see
/// [`crate::doorbell`]), so RIP is the app's own; anything else would be a context no
/// restore could resume, and is refused.
fn user_context(vcpu: &Vcpu, p: &Process) -> Result<UserContext, PersistError> {
    let regs = vcpu.regs();
    if !crate::memory::space::app_code_address(regs.rip) {
        return Err(PersistError::NotAtCleanPoint { rip: regs.rip });
    }
    let sregs = vcpu.sregs()?;
    let xsave = vcpu.xsave()?;
    Ok(context_record(
        &regs,
        &xsave,
        p.thread.fs_base,
        sregs.gs.base,
    ))
}

fn context_record(
    regs: &kvm_bindings::kvm_regs,
    xsave: &kvm_bindings::kvm_xsave,
    fs_base: u64,
    gs_base: u64,
) -> UserContext {
    UserContext {
        gprs: [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        rip: regs.rip,
        rflags: regs.rflags,
        fs_base,
        gs_base,
        xsave: xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

/// Why this process cannot be captured: it is not the app's first (a snapshot is always
/// asked of that one).
fn cannot_capture(p: &Process) -> Option<String> {
    p.forked
        .then(|| "only an app's first process is snapshotted".to_string())
}

/// Why the app cannot be captured now, but may be soon: one of its other processes is
/// not at a point a snapshot can keep (ended and not waited for, stopped, being forked).
fn not_now(p: &Process) -> Option<String> {
    let others = p.tree.as_ref().map(|t| t.members()).unwrap_or_default();
    others
        .iter()
        .filter(|m| m.pid != p.ids.pid)
        .find_map(|other| {
            let pid = other.pid;
            if other.ended {
                Some(format!("process {pid} has ended and is not waited for yet"))
            } else if other.stopped {
                Some(format!("process {pid} is stopped"))
            } else if other.host_pid == 0 {
                Some(format!("process {pid} is being forked"))
            } else {
                None
            }
        })
}

/// The key of shared anonymous memory (a memfd the VMM made, or one the app made and
/// mapped shared), the same in every process that maps it; `None` for a file with a
/// name, whose bytes the file keeps.
fn shared_memory_key(file: &std::fs::File) -> Option<u64> {
    let stat = rustix::fs::fstat(file).ok().filter(|s| s.st_nlink == 0)?;
    // The device too: unlinked files of two file systems may have one inode number.
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&stat.st_dev.to_le_bytes());
    id[8..].copy_from_slice(&stat.st_ino.to_le_bytes());
    let digest = blake3::hash(&id);
    let key = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap_or([1; 8]));
    Some(key.max(1))
}

/// The bytes of the shared anonymous memory this process maps, each once.
fn shared_memory(p: &Process) -> Result<Vec<SharedMemoryRecord>, PersistError> {
    let mut records: Vec<SharedMemoryRecord> = Vec::new();
    let mut total = 0u64;
    for vma in p.mem.vmas().iter() {
        let Backing::Shared { file, path, .. } = &vma.backing else {
            continue;
        };
        let Some(key) = shared_memory_key(file) else {
            continue;
        };
        if records.iter().any(|r| r.key == key) {
            continue;
        }
        let size = rustix::fs::fstat(file.as_ref()).map_or(0, |s| s.st_size as u64);
        total = total.saturating_add(size);
        if total > MAX_SHARED_MEMORY as u64 {
            return Err(PersistError::Unsnapshottable(format!(
                "it maps {total} bytes of shared memory (up to {path:?}), over the {MAX_SHARED_MEMORY} a snapshot keeps"
            )));
        }
        let mut data = vec![0u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(file.as_ref(), &mut data, 0).map_err(
            |source| PersistError::Data {
                what: format!("reading shared memory {path:?}"),
                source,
            },
        )?;
        records.push(SharedMemoryRecord { key, data });
    }
    Ok(records)
}

/// One process's pages, as a snapshot keeps them.
struct CapturedMemory {
    runs: Vec<PageRun>,
    activeset: Vec<VpnRange>,
    /// Stored pages of the ActiveSet (pushed first).
    activeset_prefix: u64,
    resident: u64,
    zero: u64,
    file: u64,
    parent: u64,
    hot: u64,
}

/// Classifies every page of `p` (`pages`, from its page tables) and hands those that must be stored to `push` (which
/// returns each one's index), the ActiveSet's first. `has_parent`: a page unchanged since
/// the restore (or last save) is the parent snapshot's.
fn capture_memory<'a>(
    p: &'a Process,
    pages: Vec<PageState>,
    has_parent: bool,
    push: &mut dyn FnMut(&'a [u8]) -> Result<u64, PersistError>,
) -> Result<CapturedMemory, PersistError> {
    // A shared area's pages are its file's or its shared memory's, kept once elsewhere.
    let pages: Vec<PageState> = pages
        .into_iter()
        .filter(|page| {
            !matches!(
                p.mem.vmas().get(page.va).map(|v| &v.backing),
                Some(Backing::Shared { .. })
            )
        })
        .collect();
    let hot: Vec<bool> = pages
        .iter()
        .map(|page| p.activeset.contains(page.va / PAGE, page.accessed))
        .collect();
    let mut classes: Vec<Option<Class>> = pages
        .iter()
        .map(|page| class_without_contents(p, page, has_parent))
        .collect();

    // The other pages are read once, in ActiveSet-first order: checked for zeros, then
    // handed on in place, so a restore can fetch the ActiveSet in one read.
    let order: Vec<usize> = {
        let (hot, cold): (Vec<usize>, Vec<usize>) = (0..pages.len())
            .filter(|&i| classes[i].is_none())
            .partition(|&i| hot[i]);
        hot.into_iter().chain(cold).collect()
    };
    let mut stored_index = vec![0u64; pages.len()];
    let mut activeset_prefix = 0;
    for &i in &order {
        // SAFETY: the app is stopped at a clean point for the capture and this thread is
        // the only one that writes app pages, until the borrow of `p` ends.
        let bytes =
            unsafe { p.mem.frame_bytes(pages[i].frame) }.map_err(memory("reading a page"))?;
        if is_zero(bytes) {
            classes[i] = Some(Class::Zero);
            continue;
        }
        classes[i] = Some(Class::Stored);
        stored_index[i] = push(bytes)?;
        if hot[i] {
            activeset_prefix += 1;
        }
    }
    let classes: Vec<Class> = classes
        .into_iter()
        .map(|c| c.unwrap_or(Class::Zero))
        .collect();
    let sources = classes
        .iter()
        .zip(&stored_index)
        .map(|(c, &index)| match c {
            Class::Zero => PageSource::Zero,
            Class::File => PageSource::File,
            Class::Parent => PageSource::Parent,
            Class::Stored => PageSource::Stored { index },
        });
    let count = |class: Class| classes.iter().filter(|&&c| c == class).count() as u64;
    Ok(CapturedMemory {
        runs: runs(pages.iter().map(|p| p.va / PAGE).zip(sources)),
        activeset: ranges(
            pages
                .iter()
                .zip(&hot)
                .filter(|(_, &h)| h)
                .map(|(pg, _)| pg.va / PAGE),
        ),
        activeset_prefix,
        resident: pages.len() as u64,
        zero: count(Class::Zero),
        file: count(Class::File),
        parent: count(Class::Parent),
        hot: hot.iter().filter(|&&h| h).count() as u64,
    })
}

/// The app's clocks now, as a snapshot records them.
fn clock_record(p: &Process) -> ClockRecord {
    ClockRecord {
        monotonic_ns: p.clock.now_ns(libc::CLOCK_MONOTONIC).unwrap_or(0) as u64,
        realtime_ns: p.clock.now_ns(libc::CLOCK_REALTIME).unwrap_or(0) as u64,
    }
}

/// Whether `fd` becomes readable before `deadline` (a signal does not end the wait).
fn readable_before(fd: &impl std::os::fd::AsFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = rustix::time::Timespec::try_from(left).unwrap_or(rustix::time::Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) if !left.is_zero() => {}
            Err(_) => return false,
        }
    }
}

/// A call's deadline as the app's CLOCK_MONOTONIC in ns (see `ProcessRecord::restart`).
fn restart_record(
    restart: Option<(u64, u64, Instant)>,
    clock: &ClockRecord,
) -> Option<(u64, u64, u64)> {
    restart.map(|(nr, rip, deadline)| {
        let left = deadline.saturating_duration_since(Instant::now());
        let left = crate::timeout::nanos(left);
        (nr, rip, clock.monotonic_ns.saturating_add(left))
    })
}

/// The parked threads (the current one is `context`, `signals` and `process`).
fn thread_records(p: &Process, clock: &ClockRecord) -> Vec<ThreadRecord> {
    p.threads
        .parked
        .iter()
        .map(|t| ThreadRecord {
            tid: t.state.tid,
            context: context_record(&t.cpu.regs, &t.cpu.xsave, t.state.fs_base, 0),
            in_call: t.in_call,
            mask: t.state.saved_mask.unwrap_or(t.signals.mask),
            pending: t.signals.pending,
            altstack: t.signals.altstack,
            clear_child_tid: t.state.clear_child_tid,
            robust_list: t.state.robust_list,
            restart: restart_record(t.state.restart, clock),
            futex_woken: t.state.futex_woken,
        })
        .collect()
}

fn signal_record(p: &Process) -> SignalRecord {
    let (left, interval) = p.alarm.get();
    SignalRecord {
        actions: p
            .signals
            .actions
            .iter()
            .map(|a| [a.handler, a.flags, a.restorer, a.mask])
            .collect(),
        mask: p.thread.saved_mask.unwrap_or(p.signals.mask),
        pending: p.signals.pending,
        thread_pending: p.signals.thread_pending,
        altstack: p.signals.altstack,
        alarm: (crate::timeout::nanos(left), crate::timeout::nanos(interval)),
    }
}

fn process_record(p: &Process, clock: &ClockRecord) -> ProcessRecord {
    let (brk_start, brk) = p.mem.brk_state();
    ProcessRecord {
        cwd: p.cwd.clone(),
        umask: p.umask,
        brk_start,
        brk,
        tid: p.thread.tid,
        robust_list: p.thread.robust_list,
        clear_child_tid: p.thread.clear_child_tid,
        restart: restart_record(p.thread.restart, clock),
        credentials: p.credentials.record(),
    }
}

/// Archives the writable directories into `path`, streamed; returns its size and digest.
fn archive_data(p: &Process, path: &Path) -> Result<Option<archive::Written>, PersistError> {
    // An empty /dev/shm (every app has one) is left out: a restore's is a fresh, empty
    // directory anyway, and an app with nothing else to keep then needs no archive.
    let dirs: Vec<(String, std::path::PathBuf)> = p
        .writable_dirs
        .iter()
        .filter(|(guest, host)| {
            guest != crate::sandbox::SHARED_MEMORY_DIR
                || std::fs::read_dir(host).map_or(true, |mut d| d.next().is_some())
        })
        .cloned()
        .collect();
    if dirs.is_empty() {
        return Ok(None);
    }
    Ok(Some(archive::create(path, &dirs)?))
}

/// Checks that every thread of `p` is parked, and gives the host fds the file offsets
/// the guest keeps (what the snapshot records).
fn settle_for_capture(p: &mut Process) -> Result<(), PersistError> {
    if p.threads.elsewhere.iter().any(Option::is_some) {
        // The run loop parks every thread first (a VMM bug if not).
        return Err(PersistError::Unsnapshottable(
            "a thread is running on another vCPU".into(),
        ));
    }
    p.windows.offsets_to_host(&p.mem);
    Ok(())
}

/// What a capture is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaptureOptions {
    /// A full snapshot, not an increment.
    pub full: bool,
    /// The app ends once it is saved (its other processes with it).
    pub stop: bool,
    /// Only if every process is idle.
    pub if_idle: bool,
}

/// A test hook, in debug builds only: `PICOCENTER_TEST_SNAPSHOT_DELAY_MS=N` in the VMM's
/// environment makes every capture take N ms longer (with the app stopped at its clean
/// point), so that tests can make requests land during a swap-out. The environment is the
/// operator's, never the app's, and release builds have no hook at all.
fn slow_capture_test_hook() {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("PICOCENTER_TEST_SNAPSHOT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}

/// Why the app is not idle, if it is not: a connection it holds (a request may be in
/// flight), or a connection or datagram waiting on one of its sockets. A snapshot then
/// would cut the first; the second a worker can keep (it holds the sockets), but the app
/// serves it sooner by running on.
pub fn busy(p: &Process) -> Option<String> {
    busy_here(p).map(|why| format!("busy: {why}"))
}

/// Why the app's first process, or the app as a whole, is not idle, if it is not.
fn busy_here(p: &Process) -> Option<String> {
    cannot_capture(p)
        .or_else(|| not_now(p))
        .or_else(|| busy_connections(p))
}

/// Why this process is not idle, if it is not: its connections and queued sockets.
fn busy_connections(p: &Process) -> Option<String> {
    use crate::fdtable::FileKind;
    use rustix::event::{PollFd, PollFlags};
    for (fd, entry) in p.files.iter() {
        let FileKind::Socket { domain, kind } = entry.file.kind else {
            continue;
        };
        if domain == libc::AF_UNIX {
            continue;
        }
        let host = entry.file.host();
        let listening = entry.file.state().listening.is_some();
        if kind == libc::SOCK_STREAM && !listening {
            if rustix::net::getpeername(host).is_ok() {
                return Some(format!("fd {fd} is a connection"));
            }
            continue;
        }
        let mut poll = [PollFd::new(&host, PollFlags::IN)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut poll, Some(&zero)).is_ok_and(|n| n > 0) {
            return Some(format!("something waits on fd {fd}"));
        }
    }
    None
}

/// Takes a snapshot of the app into `store`: an increment of the snapshot the app was
/// restored from (or last saved to) if that is in `store` and `full` is not set. An app
/// of several processes is saved whole: the others write their parts at a clean point of
/// theirs while this one waits (see [`parts`]).
pub fn capture(
    vcpu: &Vcpu,
    p: &mut Process,
    store: &dyn Store,
    options: CaptureOptions,
) -> Result<Manifest, PersistError> {
    let CaptureOptions {
        full,
        stop,
        if_idle,
    } = options;
    slow_capture_test_hook();
    if let Some(why) = cannot_capture(p) {
        return Err(PersistError::Unsnapshottable(why));
    }
    if let Some(why) = not_now(p) {
        return Err(PersistError::Busy(why));
    }
    settle_for_capture(p)?;
    let started = Instant::now();
    let key = p.snapshot_key.clone().ok_or(PersistError::NoKey)?;
    let id = new_id();
    let parent = match &p.restored_from {
        Some((where_, parent)) if !full && *where_ == store.describe() => {
            store.manifest(parent, &key).ok()
        }
        _ => None,
    };
    let ancestors: Vec<String> = parent
        .iter()
        .flat_map(|m| std::iter::once(&m.id).chain(&m.ancestors))
        .take(picocenter_snapshots::format::MAX_ANCESTORS)
        .cloned()
        .collect();
    let parent = parent.map(|m| m.id);
    let context = user_context(vcpu, p)?;
    let pages_path = store.scratch(&id, "pages")?;
    let mut writer = PageFileWriter::create(&pages_path)?;
    let others = p.tree.clone().filter(|t| t.members().len() > 1);
    // In a tree, the other processes' pages that equal one of these are not stored again.
    let mut stored_pages = others.is_some().then(parts::StoredPages::default);
    let pages = p.mem.pages().map_err(memory("reading the page tables"))?;
    let p: &Process = p;
    let memory = capture_memory(p, pages, parent.is_some(), &mut |bytes| {
        let index = writer.push(bytes)?;
        if let Some(stored) = &mut stored_pages {
            stored.note(bytes, index);
        }
        Ok(index)
    })?;
    let gathered = match (&others, &mut stored_pages) {
        (Some(tree), Some(stored)) => {
            let dir = store.scratch(&id, "parts")?;
            let ask = parts::Ask {
                dir: &dir,
                if_idle,
                id: &id,
                parent: parent.as_deref(),
            };
            Some(parts::gather(p, tree, ask, stored, &mut |bytes| {
                Ok(writer.push_copy(bytes)?)
            })?)
        }
        _ => None,
    };
    let (page_count, chunk_digests) = writer.finish()?;

    let mut shared = shared_memory(p)?;
    if let Some(gathered) = &gathered {
        for record in gathered.shared_memory() {
            if !shared.iter().any(|r| r.key == record.key) {
                shared.push(record.clone());
            }
        }
    }
    let (files, closed) = files::capture(p).map_err(PersistError::Unsnapshottable)?;
    if closed > 0 {
        tracing::info!("the snapshot closes {closed} connection(s)");
    }
    let clock = clock_record(p);
    let data_path = store.scratch(&id, "data")?;
    let data = archive_data(p, &data_path)?;
    let stats = SnapshotStats {
        resident_pages: memory.resident,
        stored_pages: page_count,
        zero_pages: memory.zero,
        file_pages: memory.file,
        parent_pages: memory.parent,
        activeset_pages: memory.hot,
        closed_connections: closed,
        data_bytes: data.as_ref().map_or(0, |d| d.bytes),
        capture_us: started.elapsed().as_micros() as u64,
    };
    let prefetched = p
        .prefetched
        .clone()
        .filter(|record| parent.as_deref() == Some(record.from.as_str()));
    let manifest = Manifest {
        id: id.clone(),
        parent,
        ancestors,
        created_unix_ms: clock.realtime_ns / 1_000_000,
        app: p.app.clone(),
        cpu: p.cpu.clone(),
        context,
        vmas: vma_records(p),
        pages: memory.runs,
        page_count,
        chunk_pages: CHUNK_PAGES,
        chunk_digests,
        activeset_prefix: memory.activeset_prefix,
        activeset: memory.activeset,
        port_sets: p.activeset.port_sets(),
        files,
        signals: signal_record(p),
        process: process_record(p, &clock),
        threads: thread_records(p, &clock),
        clock,
        data_bytes: data.as_ref().map_or(0, |d| d.bytes),
        data_digest: data.as_ref().map_or([0; 32], |d| d.digest),
        stats,
        prefetched,
        tree: gathered.as_ref().map(|g| g.record(p)),
        shared_memory: shared,
    };
    manifest
        .validate()
        .map_err(|e| PersistError::Incompatible(e.to_string()))?;
    store.commit(
        &manifest,
        &key,
        &pages_path,
        data.map(|_| data_path.as_path()),
    )?;
    if let Some(gathered) = gathered {
        gathered.committed(stop);
    }
    tracing::info!(
        id = %manifest.id,
        stored = page_count,
        zero = stats.zero_pages,
        file = stats.file_pages,
        parent = stats.parent_pages,
        activeset = stats.activeset_pages,
        us = stats.capture_us,
        "snapshot written to {}",
        store.describe()
    );
    Ok(manifest)
}

/// After a snapshot of an app that keeps running: it now matches that snapshot.
pub fn saved(p: &mut Process, store: &dyn Store, manifest: &Manifest) -> Result<(), PersistError> {
    p.mem
        .mark_saved()
        .map_err(memory("marking the pages saved"))?;
    p.restored_from = Some((store.describe(), manifest.id.clone()));
    // What comes next is measured against this snapshot, which nothing prefetched.
    p.prefetched = None;
    Ok(())
}

/// The protection bits of a record.
pub(crate) fn prot(bits: u32) -> Prot {
    Prot(bits & 7)
}

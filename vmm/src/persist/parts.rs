//! Snapshots of an app that is a tree of processes.
//!
//! The first process takes the snapshot, as for an app of one process, and asks each of
//! the others for its part ([`gather`]):
//!
//! ```text
//! first process                          each other process (its own VMM)
//! ─────────────                          ────────────────────────────────
//! its pages into the page file
//! announce in the app's table  ──────►   at its next clean point, every thread parked:
//! (generation, directory, if_idle)       report parked (or busy: a connection, with
//!                                        if_idle; or stopped)
//! every process parked, the same
//! ones as announced: say write ──────►   its pages into <dir>/<pid>.<gen>.pages,
//!                                        the rest into <dir>/<pid>.<gen>.part
//! wait for every part          ◄──────   report done (or failed); wait
//! merge each part's pages in: a page
//! another process stored is not stored
//! again; commit the manifest
//! decide: end, go on saved, or   ──────►  end with the app, or go on
//! go on unsaved
//! ```
//!
//! Every process is parked before any writes, so what they share (a pipe's bytes, shared
//! memory) is the same whichever of them records it, and no process can fork or end
//! between the parts.
//!
//! A part's pages are in the snapshot's own page file, or unchanged in its part of the
//! parent: what the processes still share copy-on-write is stored once, found by its
//! BLAKE3 digest. No process maps one stored page at two addresses: that would alias them
//! in its memory.

use super::{
    busy_connections, capture_memory, process_record, shared_memory, signal_record, thread_records,
    user_context, vma_records, PersistError,
};
use crate::kernel::process::Process;
use crate::kernel::tree::{AppTree, CaptureRequest, CaptureStatus, Verdict};
use crate::kvm::vcpu::Vcpu;
use picocenter_snapshots::chain::runs;
use picocenter_snapshots::format::{PageSource, ProcessPart, SharedMemoryRecord, TreeRecord};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// How long the first process waits for the others' parts.
const PART_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the first process, saved to stop, waits for the others to end.
const ENDING_TIMEOUT: Duration = Duration::from_secs(10);

/// The pages the snapshot's page file holds so far, by digest.
#[derive(Debug, Default)]
pub struct StoredPages {
    by_digest: HashMap<[u8; 32], u64>,
}

impl StoredPages {
    /// Notes that page `index` of the page file holds `bytes`.
    pub fn note(&mut self, bytes: &[u8], index: u64) {
        self.by_digest
            .entry(*blake3::hash(bytes).as_bytes())
            .or_insert(index);
    }
}

/// The other processes' parts, merged into the snapshot's page file; until
/// [`Gathered::committed`], dropping it tells them the snapshot was abandoned.
pub struct Gathered {
    tree: Arc<AppTree>,
    generation: u32,
    others: Vec<ProcessPart>,
    /// The shared memory the others map.
    shared_memory: Vec<SharedMemoryRecord>,
    dir: PathBuf,
    decided: bool,
}

impl Gathered {
    /// The manifest's record of the tree, with `p` its first process.
    pub fn record(&self, p: &Process) -> TreeRecord {
        let (pgid, sid) = p.group();
        TreeRecord {
            pid: p.ids.pid,
            pgid,
            sid,
            next_pid: self.tree.next_pid(),
            others: self.others.clone(),
        }
    }

    /// The shared anonymous memory the other processes map (some of it the first's too).
    pub fn shared_memory(&self) -> &[SharedMemoryRecord] {
        &self.shared_memory
    }

    /// The snapshot is in the store: the other processes end with the app if `stop`,
    /// and go on otherwise.
    pub fn committed(mut self, stop: bool) {
        // Their VMMs, watched before they are told to end (a pid is not reused while its
        // pidfd is open).
        let ending: Vec<std::os::fd::OwnedFd> = match stop {
            true => self
                .others
                .iter()
                .filter_map(|part| self.tree.find(part.pid))
                .filter_map(|m| rustix::process::Pid::from_raw(m.host_pid))
                .filter_map(|pid| {
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
                })
                .collect(),
            false => Vec::new(),
        };
        let verdict = if stop { Verdict::End } else { Verdict::Saved };
        self.tree.decide_capture(self.generation, verdict);
        self.decided = true;
        // The app has ended only once they have: until then they hold its sockets, and a
        // restore started at once could find its address taken, or a client reach them.
        let deadline = Instant::now() + ENDING_TIMEOUT;
        for pidfd in &ending {
            super::readable_before(pidfd, deadline);
        }
    }
}

impl Drop for Gathered {
    fn drop(&mut self) {
        if !self.decided {
            self.tree
                .decide_capture(self.generation, Verdict::Abandoned);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> PersistError {
    move |source| PersistError::Data { what, source }
}

/// Why process `pid`'s part was not written, as it said.
fn part_error(dir: &Path, pid: i32, generation: u32) -> String {
    std::fs::read_to_string(part_file(dir, pid, generation, "error"))
        .unwrap_or_else(|_| "it ended or gave no reason".into())
}

/// What the first process asks the others for.
pub(super) struct Ask<'a> {
    /// Where their parts go.
    pub dir: &'a Path,
    /// Only if each of them is idle.
    pub if_idle: bool,
    /// The snapshot's id.
    pub id: &'a str,
    /// The snapshot it is an increment of, if any.
    pub parent: Option<&'a str>,
}

/// Asks every other process of `tree` for its part (see [`Ask`]), waits for them, and
/// merges their pages into the page file through `push`. `stored`: the pages the first
/// process stored.
pub(super) fn gather(
    p: &Process,
    tree: &Arc<AppTree>,
    ask: Ask<'_>,
    stored: &mut StoredPages,
    push: &mut dyn FnMut(&[u8]) -> Result<u64, PersistError>,
) -> Result<Gathered, PersistError> {
    let dir = ask.dir;
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let members = tree.members();
    let others: Vec<_> = members.iter().filter(|m| m.pid != p.ids.pid).collect();
    let pids: Vec<i32> = others.iter().map(|m| m.pid).collect();
    let generation = dir
        .to_str()
        .and_then(|d| tree.request_capture(d, ask.if_idle, &pids, ask.id, ask.parent))
        .ok_or_else(|| {
            PersistError::Unsnapshottable(format!(
                "the parts' directory {} cannot be announced",
                dir.display()
            ))
        })?;
    let mut gathered = Gathered {
        tree: tree.clone(),
        generation,
        others: Vec::new(),
        shared_memory: Vec::new(),
        dir: dir.to_path_buf(),
        decided: false,
    };
    for other in &others {
        if other.host_pid == 0 || other.ended {
            return Err(PersistError::Busy(format!(
                "process {} is being forked or has ended",
                other.pid
            )));
        }
        crate::kvm::kick::send_capture_request(other.host_pid).map_err(io(format!(
            "asking process {} for its part of the snapshot",
            other.pid
        )))?;
    }
    // Every process parks first, so that what they share (pipes, shared memory) is the
    // same whichever of them records it; then the tree cannot change, and each writes.
    wait_for(tree, &pids, generation, dir, CaptureStatus::Parked)?;
    let now: Vec<_> = tree
        .members()
        .into_iter()
        .filter(|m| m.pid != p.ids.pid)
        .collect();
    if now.len() != pids.len() || now.iter().any(|m| !pids.contains(&m.pid) || m.ended) {
        return Err(PersistError::Busy(
            "the app's processes changed during the snapshot".into(),
        ));
    }
    tree.start_writing(generation);
    wait_for(tree, &pids, generation, dir, CaptureStatus::Done)?;
    // Parents before their children, as a restore forks them; a process whose parent
    // ended has the app's first process as its parent, as on Linux.
    let mut placed = vec![p.ids.pid];
    let mut order = Vec::new();
    while order.len() < others.len() {
        let before = order.len();
        for other in &others {
            let ppid = if members.iter().any(|m| m.pid == other.ppid) {
                other.ppid
            } else {
                p.ids.pid
            };
            if !placed.contains(&other.pid) && placed.contains(&ppid) {
                placed.push(other.pid);
                order.push((other.pid, ppid));
            }
        }
        if order.len() == before {
            return Err(PersistError::Unsnapshottable(
                "the app's processes do not form a tree".into(),
            ));
        }
    }
    for (pid, ppid) in order {
        let mut part = read_part(dir, pid, generation)?;
        part.ppid = ppid;
        for record in std::mem::take(&mut part.shared_memory) {
            if !gathered.shared_memory.iter().any(|r| r.key == record.key) {
                gathered.shared_memory.push(record);
            }
        }
        let pages = part_file(dir, pid, generation, "pages");
        merge_pages(&mut part, &pages, stored, push)?;
        gathered.others.push(part);
    }
    Ok(gathered)
}

/// Waits until every process of `pids` has reached `until` for snapshot `generation`
/// (at most [`PART_TIMEOUT`]); a process that is busy or failed ends the wait.
fn wait_for(
    tree: &AppTree,
    pids: &[i32],
    generation: u32,
    dir: &Path,
    until: CaptureStatus,
) -> Result<(), PersistError> {
    let deadline = Instant::now() + PART_TIMEOUT;
    loop {
        let mut pending = None;
        for &pid in pids {
            match tree.capture_status(pid, generation) {
                status if status == until => {}
                CaptureStatus::Pending | CaptureStatus::Parked => pending = Some(pid),
                CaptureStatus::Busy => {
                    return Err(PersistError::Busy(format!(
                        "process {pid}: {}",
                        part_error(dir, pid, generation)
                    )))
                }
                CaptureStatus::Done | CaptureStatus::Failed => {
                    return Err(PersistError::Unsnapshottable(format!(
                        "process {pid}: {}",
                        part_error(dir, pid, generation)
                    )))
                }
            }
        }
        let Some(pid) = pending else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(PersistError::Unsnapshottable(format!(
                "process {pid} did not write its part within {} s",
                PART_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The file of process `pid`'s part of snapshot `generation` named `what`.
fn part_file(dir: &Path, pid: i32, generation: u32, what: &str) -> PathBuf {
    dir.join(format!("{pid}.{generation}.{what}"))
}

/// The most a part's record may take (its pages are in a file of their own; its shared
/// memory is bounded by `MAX_SHARED_MEMORY`, about four times as long in JSON).
const MAX_PART_BYTES: u64 = 256 << 20;

fn read_part(dir: &Path, pid: i32, generation: u32) -> Result<ProcessPart, PersistError> {
    let path = part_file(dir, pid, generation, "part");
    let size = std::fs::metadata(&path)
        .map_err(io(format!("reading {}", path.display())))?
        .len();
    if size > MAX_PART_BYTES {
        return Err(PersistError::Unsnapshottable(format!(
            "process {pid}'s part takes {size} bytes"
        )));
    }
    let bytes = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
    let part: ProcessPart = serde_json::from_slice(&bytes).map_err(|e| {
        PersistError::Unsnapshottable(format!("process {pid}'s part is unreadable: {e}"))
    })?;
    if part.pid != pid {
        return Err(PersistError::Unsnapshottable(format!(
            "process {pid}'s part is of process {}",
            part.pid
        )));
    }
    Ok(part)
}

/// Moves `part`'s stored pages from its own file into the page file: a page the page
/// file already has is not stored again, unless this process maps that copy already.
fn merge_pages(
    part: &mut ProcessPart,
    path: &Path,
    stored: &mut StoredPages,
    push: &mut dyn FnMut(&[u8]) -> Result<u64, PersistError>,
) -> Result<(), PersistError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut page = vec![0u8; PAGE];
    let mut used = HashSet::new();
    let mut sources = Vec::new();
    for run in &part.pages {
        for i in 0..run.count {
            let source = match run.source {
                PageSource::Stored { index } => {
                    let at = index
                        .checked_add(i)
                        .and_then(|n| n.checked_mul(PAGE as u64))
                        .ok_or_else(|| {
                            PersistError::Unsnapshottable("a part's page index overflows".into())
                        })?;
                    file.read_exact_at(&mut page, at)
                        .map_err(io(format!("reading {}", path.display())))?;
                    let digest = *blake3::hash(&page).as_bytes();
                    let index = match stored.by_digest.get(&digest) {
                        Some(&index) if !used.contains(&index) => index,
                        _ => {
                            let index = push(&page)?;
                            stored.by_digest.entry(digest).or_insert(index);
                            index
                        }
                    };
                    used.insert(index);
                    PageSource::Stored { index }
                }
                other => other,
            };
            sources.push((run.vpn + i, source));
        }
    }
    part.pages = runs(sources);
    Ok(())
}

/// In a process other than the first, once tree snapshot `request` is saved and the app
/// goes on: its next part is an increment of this one.
pub fn saved(p: &mut Process, request: &CaptureRequest) -> Result<(), PersistError> {
    p.mem
        .mark_saved()
        .map_err(super::memory("marking the pages saved"))?;
    p.restored_from = Some((String::new(), request.id.clone()));
    Ok(())
}

/// In a process other than the first, asked for its part of tree snapshot `request`
/// and parked (every thread at a clean point): whether it can be saved now. `stopped`:
/// it is stopped (job control), which a restore would not bring back.
pub fn park(p: &Process, request: &CaptureRequest, stopped: bool) -> CaptureStatus {
    let why = if stopped {
        Some(format!("process {} is stopped", p.ids.pid))
    } else if request.if_idle {
        busy_connections(p)
    } else {
        None
    };
    match why {
        None => CaptureStatus::Parked,
        Some(why) => {
            refuse(p, request, &why);
            CaptureStatus::Busy
        }
    }
}

/// Says why this process's part of `request` is not written.
fn refuse(p: &Process, request: &CaptureRequest, why: &str) {
    let path = part_file(
        Path::new(&request.dir),
        p.ids.pid,
        request.generation,
        "error",
    );
    let _ = std::fs::write(path, why.as_bytes());
}

/// In a process other than the first, parked, once every process is: writes its part of
/// tree snapshot `request`, and says how that went.
pub fn write_part(vcpu: &Vcpu, p: &mut Process, request: &CaptureRequest) -> CaptureStatus {
    // An increment of the snapshot this process was restored from (or last saved to)
    // keeps the pages it has not changed since as that one's.
    let has_parent = request.parent.is_some()
        && p.restored_from.as_ref().map(|(_, id)| id) == request.parent.as_ref();
    match part(vcpu, p, request, has_parent) {
        Ok(()) => CaptureStatus::Done,
        Err(e) => {
            let why = match e {
                PersistError::Busy(why) | PersistError::Unsnapshottable(why) => why,
                other => crate::report::error_chain(&other),
            };
            refuse(p, request, &why);
            CaptureStatus::Failed
        }
    }
}

fn part(
    vcpu: &Vcpu,
    p: &mut Process,
    request: &CaptureRequest,
    has_parent: bool,
) -> Result<(), PersistError> {
    super::settle_for_capture(p)?;
    let (dir, generation) = (Path::new(&request.dir), request.generation);
    let context = user_context(vcpu, p)?;
    let pid = p.ids.pid;
    let pages_path = part_file(dir, pid, generation, "pages");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&pages_path)
        .map_err(io(format!("creating {}", pages_path.display())))?;
    let mut out = std::io::BufWriter::new(file);
    let mut count = 0u64;
    let pages = p
        .mem
        .pages()
        .map_err(super::memory("reading the page tables"))?;
    let p: &Process = p;
    let memory = capture_memory(p, pages, has_parent, &mut |bytes| {
        out.write_all(bytes)
            .map_err(io(format!("writing {}", pages_path.display())))?;
        count += 1;
        Ok(count - 1)
    })?;
    out.flush()
        .map_err(io(format!("writing {}", pages_path.display())))?;
    let (files, _closed) = super::files::capture(p).map_err(PersistError::Unsnapshottable)?;
    let clock = super::clock_record(p);
    let (pgid, sid) = p.group();
    let part = ProcessPart {
        pid,
        ppid: p.ids.ppid,
        pgid,
        sid,
        exe: p.exe.clone(),
        run_as: p.run_as.clone(),
        cmdline: p.cmdline.clone(),
        context,
        vmas: vma_records(p),
        pages: memory.runs,
        activeset: memory.activeset,
        files,
        signals: signal_record(p),
        process: process_record(p, &clock),
        threads: thread_records(p, &clock),
        shared_memory: shared_memory(p)?,
    };
    let bytes = serde_json::to_vec(&part).map_err(|e| {
        PersistError::Unsnapshottable(format!("encoding process {pid}'s part: {e}"))
    })?;
    let path = part_file(dir, pid, generation, "part");
    std::fs::write(&path, bytes).map_err(io(format!("writing {}", path.display())))
}

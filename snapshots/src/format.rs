//! The snapshot manifest: everything about an app except its page contents.
//!
//! On disk: `MAGIC (8) | format version (u32 LE) | payload length (u64 LE) |
//! HMAC-SHA256 (32) | payload (postcard)`. The MAC, under the cluster's [`SnapshotKey`],
//! covers the first 20 bytes and the payload. A manifest is refused before it is decoded if
//! the magic, the version, the length cap or the MAC is wrong, and after decoding if any
//! field is out of its bounds ([`crate::bounds`]).

use crate::key::{SnapshotKey, KEY_BYTES};
use serde::{Deserialize, Serialize};

/// The first bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"PICOSNAP";
/// The format version. A different one is refused; bump it on any change to the types
/// here. (The product version is separate.)
pub const FORMAT_VERSION: u32 = 8;
/// The largest manifest payload accepted.
pub const MAX_MANIFEST_SIZE: u64 = 64 << 20;
/// The most ancestors a manifest lists (a longer chain lists its newest ones).
pub const MAX_ANCESTORS: usize = 64;
/// Bytes of a page.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes of the header: magic, version, length, MAC.
pub const HEADER_SIZE: usize = SIGNED_HEADER + KEY_BYTES;
/// The header bytes the MAC covers (magic, version, length).
const SIGNED_HEADER: usize = 8 + 4 + 8;
/// A BLAKE3 digest (of a page-file chunk, or of the data archive).
pub type Digest = [u8; 32];

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Too short to hold a header, or shorter than its header says.
    #[error("the snapshot manifest is truncated ({have} bytes, expected {expected})")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// Longer than its header says.
    #[error("the snapshot manifest has {have} bytes, {expected} expected: trailing bytes")]
    Trailing {
        /// Bytes present.
        have: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// Not a manifest at all.
    #[error("not a Picocenter snapshot (bad magic)")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("snapshot format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// Larger than any real manifest.
    #[error("the snapshot manifest claims {0} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")]
    TooLarge(u64),
    /// The MAC does not match: changed since it was written, or written with another key.
    #[error(
        "the snapshot manifest is corrupt or forged: its HMAC-SHA256 does not match this \
         cluster's snapshot key (changed in storage, or written with another key)"
    )]
    Forged,
    /// The payload does not decode.
    #[error("the snapshot manifest does not decode: {0}")]
    Decode(String),
    /// A field is out of its bounds, or contradicts another.
    #[error("the snapshot manifest is inconsistent: {0}")]
    Inconsistent(String),
}

/// How the app was run, so that it can be run again the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AppRecord {
    /// Its name.
    pub name: String,
    /// The image it came from, if any.
    pub image: Option<String>,
    /// Its root directory on the host where it was captured.
    pub root: String,
    /// Its writable guest directories.
    pub writable: Vec<String>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Its IP address.
    pub address: Option<String>,
    /// The program path (for display).
    pub program: String,
    /// When the root was a temporary one made from a host program (and its libraries),
    /// that program's host path, so that a restore can make it again.
    pub root_from: Option<String>,
}

/// One CPUID leaf the app may have relied on: the restoring host must offer every bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidBits {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// EBX feature bits.
    pub ebx: u32,
    /// ECX feature bits.
    pub ecx: u32,
    /// EDX feature bits.
    pub edx: u32,
}

/// The CPU features the app may rely on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CpuRecord {
    /// Feature leaves (1, 7.0, 0x80000001).
    pub leaves: Vec<CpuidBits>,
    /// XCR0 the app ran with (its FPU state format).
    pub xcr0: u64,
}

/// The app's registers at a clean point (outside any system call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserContext {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8 .. r15.
    pub gprs: [u64; 16],
    /// The instruction pointer.
    pub rip: u64,
    /// The flags.
    pub rflags: u64,
    /// FS base (TLS).
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// The XSAVE image of the FPU, SSE and AVX state (KVM_GET_XSAVE's 4 KiB).
    pub xsave: Vec<u8>,
}

/// Where an area's pages come from when they are not in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackingRecord {
    /// Zeros.
    Anonymous,
    /// A private mapping of a file in the app's root.
    File {
        /// Guest path.
        path: String,
        /// File offset of the area's start.
        offset: u64,
        /// Whether the file is in the read-only root.
        immutable: bool,
    },
    /// A shared mapping (MAP_SHARED): of a file in a writable directory by its path, or
    /// of shared anonymous memory (`memory` is not 0), whose bytes are the manifest's
    /// `shared_memory` record with that key. Its pages are in no page file: they are the
    /// file's or that record's.
    Shared {
        /// Guest path (for anonymous memory, the name it shows in /proc).
        path: String,
        /// File offset of the area's start.
        offset: u64,
        /// The key of its shared anonymous memory, or 0 for a file.
        memory: u64,
    },
}

/// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, shared between processes of a
/// tree): its bytes, once for every process that maps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SharedMemoryRecord {
    /// What the areas that map it name it by (not 0).
    pub key: u64,
    /// Its bytes (its size).
    pub data: Vec<u8>,
}

/// One memory area.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaRecord {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    /// 0: mapping, 1: heap, 2: stack.
    pub role: u8,
    /// Backing.
    pub backing: BackingRecord,
}

/// Where a run of pages comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageSource {
    /// All zero: not stored.
    Zero,
    /// Unchanged from the area's file: not stored.
    File,
    /// In this snapshot's page file, from this page index on.
    Stored {
        /// Index of the run's first page in the page file.
        index: u64,
    },
    /// Unchanged since the parent snapshot: look there.
    Parent,
}

/// A run of consecutive virtual pages with one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First virtual page number (address / 4096).
    pub vpn: u64,
    /// Pages in the run.
    pub count: u64,
    /// Where they come from.
    pub source: PageSource,
}

/// A range of virtual pages (an ActiveSet is a list of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpnRange {
    /// First virtual page number.
    pub vpn: u64,
    /// Pages.
    pub count: u64,
}

/// The pages touched while serving one listening port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSet {
    /// The port.
    pub port: u16,
    /// Its pages.
    pub pages: Vec<VpnRange>,
}

/// What kind of open file a descriptor was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRecord {
    /// A file by path.
    Path {
        /// Guest path.
        path: String,
        /// Open flags.
        flags: u32,
        /// Offset.
        offset: u64,
    },
    /// A directory.
    Directory {
        /// Guest path.
        path: String,
    },
    /// The VMM's stdin, stdout or stderr.
    Stdio(u8),
    /// One end of a pipe; `pipe` pairs the ends, `data` is what was buffered.
    Pipe {
        /// Pipe identity within the snapshot.
        pipe: u64,
        /// The write end?
        write_end: bool,
        /// Bytes in the pipe.
        data: Vec<u8>,
    },
    /// A socket.
    Socket {
        /// AF_*.
        domain: i32,
        /// SOCK_STREAM or SOCK_DGRAM.
        kind: i32,
        /// What the app bound it to, as it sees it.
        bound: Option<String>,
        /// An AF_UNIX name as the app gave it.
        unix_name: Option<Vec<u8>>,
        /// The AF_UNIX name a datagram socket is connected to, as the app gave it: it is
        /// connected there again once every socket of the app is made.
        connected_to: Option<Vec<u8>>,
        /// The backlog, if listening.
        listening: Option<i32>,
        /// Options set: (level, name, value).
        options: Vec<(i32, i32, Vec<u8>)>,
        /// It was a connection, closed at capture: it comes back at end of file.
        closed: bool,
        /// A unix connection with both ends in the app (a socketpair, or a connection
        /// between its processes): the other end's `FdRecord::object`; 0 for none. Both
        /// come back connected to each other; if the other end is not in the snapshot,
        /// this one comes back at end of file.
        peer: u64,
        /// What waited to be read at this end (from `peer`), at most
        /// [`crate::bounds::MAX_PIPE_DATA`] bytes.
        queued: Vec<u8>,
    },
    /// An epoll set: guest fd -> (events, data).
    Epoll {
        /// Registrations.
        registrations: Vec<(i32, u32, u64)>,
    },
    /// An eventfd.
    EventFd {
        /// Its counter.
        counter: u64,
        /// EFD_SEMAPHORE.
        semaphore: bool,
    },
    /// A timerfd, with what was left of it.
    TimerFd {
        /// Its clock.
        clock: i32,
        /// Nanoseconds to the next expiry (0: disarmed).
        remaining_ns: u64,
        /// The interval.
        interval_ns: u64,
    },
    /// A read-only rtnetlink socket the VMM answers (unanswered requests are dropped).
    Netlink,
    /// An anonymous file from memfd_create, with its contents.
    Memfd {
        /// The name the app gave it.
        name: String,
        /// Its bytes.
        data: Vec<u8>,
        /// Its file offset.
        offset: u64,
        /// The seals set on it (F_SEAL_*; F_SEAL_SEAL when no more may be added).
        seals: u32,
    },
}

impl FileRecord {
    /// The bytes of contents it carries (a pipe's, a connection's, a memfd's).
    pub fn held_bytes(&self) -> u64 {
        let held = match self {
            FileRecord::Pipe { data, .. } => data.len(),
            FileRecord::Socket { queued, .. } => queued.len(),
            FileRecord::Memfd { data, .. } => data.len(),
            _ => 0,
        };
        held as u64
    }

    /// What kind of file this is, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            FileRecord::Path { .. } => "file",
            FileRecord::Directory { .. } => "directory",
            FileRecord::Stdio(_) => "stdio",
            FileRecord::Pipe { .. } => "pipe",
            FileRecord::Socket { .. } => "socket",
            FileRecord::Epoll { .. } => "epoll set",
            FileRecord::EventFd { .. } => "eventfd",
            FileRecord::TimerFd { .. } => "timerfd",
            FileRecord::Netlink => "netlink socket",
            FileRecord::Memfd { .. } => "memfd",
        }
    }
}

/// One descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRecord {
    /// The guest fd.
    pub fd: i32,
    /// FD_CLOEXEC.
    pub cloexec: bool,
    /// O_NONBLOCK as the app set it.
    pub nonblocking: bool,
    /// Descriptors that share one open file description have the same `shared` value.
    pub shared: u64,
    /// The host object a pipe end or a socket is of, the same in every process of the
    /// app that holds it ([`object_key`]), so that a restore makes it once for them all;
    /// 0 for other files, which each process gets its own of.
    pub object: u64,
    /// What it is.
    pub file: FileRecord,
}

/// The `FdRecord::object` of a pipe (`pipe`: true) or socket with host inode `inode`.
pub fn object_key(pipe: bool, inode: u64) -> u64 {
    let kind: u64 = if pipe { 1 } else { 2 };
    (kind << 62) | (inode & ((1 << 62) - 1))
}

/// One process of an app that is a tree of processes, other than its first: what
/// `Manifest` holds of the first, for this one. Its pages are in the snapshot's page file
/// or, unchanged, in its part of the parent; a page it shares with another process is
/// stored once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcessPart {
    /// Its pid.
    pub pid: i32,
    /// Its parent's pid (a process of the tree).
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
    /// The program it runs (what /proc/<pid>/exe shows).
    pub exe: String,
    /// The path it was run by (its short name comes from it).
    pub run_as: String,
    /// Its argv.
    pub cmdline: Vec<String>,
    /// Registers.
    pub context: UserContext,
    /// Memory areas.
    pub vmas: Vec<VmaRecord>,
    /// Every page it had, by source, in address order (`Parent`: as in its part of the
    /// parent snapshot).
    pub pages: Vec<PageRun>,
    /// Its ActiveSet.
    pub activeset: Vec<VpnRange>,
    /// Descriptors.
    pub files: Vec<FdRecord>,
    /// Signals.
    pub signals: SignalRecord,
    /// Process state.
    pub process: ProcessRecord,
    /// Its other threads.
    pub threads: Vec<ThreadRecord>,
    /// The shared anonymous memory it maps (moved into the manifest's at capture).
    pub shared_memory: Vec<SharedMemoryRecord>,
}

/// The processes of an app that is a tree of them (the first one is the manifest's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TreeRecord {
    /// The first process's pid.
    pub pid: i32,
    /// The first process's group.
    pub pgid: i32,
    /// The first process's session.
    pub sid: i32,
    /// The next pid the app hands out.
    pub next_pid: i32,
    /// The other processes, each after its parent.
    pub others: Vec<ProcessPart>,
}

/// One of the app's threads other than the one `Manifest::context` is of: it was parked
/// (waiting, or preempted) when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ThreadRecord {
    /// Its thread id.
    pub tid: i32,
    /// Its registers: at its `syscall` instruction if `in_call`, else in its own code.
    pub context: UserContext,
    /// Whether it stopped in a call, which it performs again when it runs.
    pub in_call: bool,
    /// Blocked signals.
    pub mask: u64,
    /// Signals sent to it (tgkill) and not yet delivered.
    pub pending: u64,
    /// sigaltstack: (sp, flags, size).
    pub altstack: (u64, i32, u64),
    /// set_tid_address or CLONE_CHILD_CLEARTID.
    pub clear_child_tid: u64,
    /// set_robust_list's head.
    pub robust_list: u64,
    /// Its call's deadline, as `ProcessRecord::restart`.
    pub restart: Option<(u64, u64, u64)>,
    /// A futex wake reached it: its futex wait returns 0 when performed again.
    pub futex_woken: bool,
}

/// Signal dispositions, mask and pending set, and the real-time timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SignalRecord {
    /// (handler, flags, restorer, mask) per signal 1..=64.
    pub actions: Vec<[u64; 4]>,
    /// Blocked.
    pub mask: u64,
    /// Pending for the thread group.
    pub pending: u64,
    /// Pending for the thread `context` is of (tgkill).
    pub thread_pending: u64,
    /// sigaltstack: (sp, flags, size).
    pub altstack: (u64, i32, u64),
    /// ITIMER_REAL: (remaining ns, interval ns).
    pub alarm: (u64, u64),
}

/// Process-wide odds and ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ProcessRecord {
    /// Working directory.
    pub cwd: String,
    /// umask.
    pub umask: u32,
    /// Where the heap starts.
    pub brk_start: u64,
    /// The break.
    pub brk: u64,
    /// The tid of the thread `context` is of.
    pub tid: i32,
    /// Its set_robust_list head.
    pub robust_list: u64,
    /// Its set_tid_address.
    pub clear_child_tid: u64,
    /// A blocking call the app was in: (syscall number, its rip, its deadline on the app's
    /// CLOCK_MONOTONIC in ns), so that a restart keeps the original deadline.
    pub restart: Option<(u64, u64, u64)>,
    /// Its user and group ids.
    pub credentials: CredentialsRecord,
}

/// A process's user and group ids (credentials(7)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CredentialsRecord {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The app's clocks at capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClockRecord {
    /// The app's CLOCK_MONOTONIC, ns.
    pub monotonic_ns: u64,
    /// CLOCK_REALTIME, ns since the epoch.
    pub realtime_ns: u64,
}

/// Counters of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotStats {
    /// Pages the app had.
    pub resident_pages: u64,
    /// Pages stored in this snapshot's page file.
    pub stored_pages: u64,
    /// Pages omitted because they were zero.
    pub zero_pages: u64,
    /// Pages omitted because they were unchanged from their file.
    pub file_pages: u64,
    /// Pages omitted because they were unchanged since the parent.
    pub parent_pages: u64,
    /// Pages in the ActiveSet.
    pub activeset_pages: u64,
    /// Connections closed by the capture.
    pub closed_connections: u64,
    /// Bytes of the writable directories' archive.
    pub data_bytes: u64,
    /// Microseconds the capture took.
    pub capture_us: u64,
}

/// Everything about a snapshot but its page contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Manifest {
    /// This snapshot's id (unique in its store).
    pub id: String,
    /// The snapshot this one is an increment of.
    pub parent: Option<String>,
    /// The chain behind this snapshot, newest first: `parent`, its parent, and so on, at
    /// most [`MAX_ANCESTORS`] of them. A restore from remote storage asks for all their
    /// manifests at once instead of one round trip per link; each one fetched must still
    /// be the parent its child names.
    pub ancestors: Vec<String>,
    /// When it was taken (ms since the epoch).
    pub created_unix_ms: u64,
    /// How the app was run.
    pub app: AppRecord,
    /// CPU features the app may rely on.
    pub cpu: CpuRecord,
    /// Registers.
    pub context: UserContext,
    /// Memory areas.
    pub vmas: Vec<VmaRecord>,
    /// Every page the app had, by source, in address order.
    pub pages: Vec<PageRun>,
    /// Pages in the page file.
    pub page_count: u64,
    /// Pages per chunk of the page file (each chunk has its own digest).
    pub chunk_pages: u64,
    /// BLAKE3 digest of each chunk of the page file.
    pub chunk_digests: Vec<Digest>,
    /// How many leading pages of the page file are the ActiveSet (stored ActiveSet pages
    /// come first, in address order).
    pub activeset_prefix: u64,
    /// The ActiveSet: the pages the app touched since its last restore.
    pub activeset: Vec<VpnRange>,
    /// ActiveSets per listening port, harvested per request episode.
    pub port_sets: Vec<PortSet>,
    /// Descriptors.
    pub files: Vec<FdRecord>,
    /// Signals.
    pub signals: SignalRecord,
    /// Process state.
    pub process: ProcessRecord,
    /// The app's other threads (none for a single-threaded app).
    pub threads: Vec<ThreadRecord>,
    /// Clocks.
    pub clock: ClockRecord,
    /// Bytes of the archive of the writable directories (0: none).
    pub data_bytes: u64,
    /// BLAKE3 digest of that archive.
    pub data_digest: Digest,
    /// Counters.
    pub stats: SnapshotStats,
    /// What the restore before this snapshot brought in ahead of the app, when this
    /// snapshot is an increment of the one restored: with the ActiveSet (the pages used
    /// since), it tells how well the prefetch guessed (`snapshot inspect`).
    pub prefetched: Option<PrefetchRecord>,
    /// The app's other processes, if it has any.
    pub tree: Option<TreeRecord>,
    /// The shared anonymous memory the app's processes map.
    pub shared_memory: Vec<SharedMemoryRecord>,
}

/// The prefetch of a restore: the restored snapshot's ActiveSet, app-wide or one port's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PrefetchRecord {
    /// The snapshot restored (this snapshot's parent).
    pub from: String,
    /// The port whose set was prefetched, or none for the app-wide ActiveSet.
    pub port: Option<u16>,
    /// Whether the prefetched pages' Accessed bits were set at the restore, which makes
    /// every one of them count as used (a restore with `--relearn` leaves them clear).
    pub accessed_preset: bool,
}

impl Manifest {
    /// Encodes the manifest with its header, authenticated with `key`.
    pub fn encode(&self, key: &SnapshotKey) -> Vec<u8> {
        let payload = postcard::to_allocvec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_SIZE + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let mac = key.sign(&[&out, &payload]);
        out.extend_from_slice(&mac);
        out.extend_from_slice(&payload);
        out
    }

    /// Checks a manifest's MAC under `key`, then decodes and bounds-checks it. Nothing in it
    /// is trusted until this returns.
    pub fn decode(bytes: &[u8], key: &SnapshotKey) -> Result<Manifest, ManifestError> {
        let payload = authenticated_payload(bytes, key)?;
        let (manifest, rest): (Manifest, &[u8]) =
            postcard::take_from_bytes(payload).map_err(|e| ManifestError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ManifestError::Decode(format!(
                "{} bytes after the manifest",
                rest.len()
            )));
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks that every field is within its bounds and consistent with the others (see
    /// [`crate::bounds`]).
    pub fn validate(&self) -> Result<(), ManifestError> {
        crate::bounds::check(self).map_err(ManifestError::Inconsistent)
    }

    /// How long after the capture the app wanted to run again by itself: its earliest
    /// deadline among a blocked call's timeout, armed timerfds and the alarm. `None`
    /// if it waits only for the outside world.
    pub fn next_wakeup(&self) -> Option<std::time::Duration> {
        let others = self.tree.iter().flat_map(|t| &t.others);
        std::iter::once((&self.process, &self.files, &self.signals))
            .chain(others.map(|p| (&p.process, &p.files, &p.signals)))
            .filter_map(|(process, files, signals)| {
                let restart = process
                    .restart
                    .map(|(_, _, deadline)| deadline.saturating_sub(self.clock.monotonic_ns));
                let timers = files.iter().filter_map(|fd| match fd.file {
                    FileRecord::TimerFd { remaining_ns, .. } if remaining_ns > 0 => {
                        Some(remaining_ns)
                    }
                    _ => None,
                });
                let alarm = Some(signals.alarm.0).filter(|&ns| ns > 0);
                restart.into_iter().chain(timers).chain(alarm).min()
            })
            .min()
            .map(std::time::Duration::from_nanos)
    }

    /// When the app wants to run again by itself ([`Manifest::next_wakeup`] after the
    /// capture), Unix ms.
    pub fn wake_at_unix_ms(&self) -> Option<u64> {
        self.next_wakeup().map(|after| {
            let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            self.created_unix_ms.saturating_add(after)
        })
    }

    /// The manifest of one other process of a tree, `part`: this one with that
    /// process's registers, memory, files, signals and threads, and no data archive (the
    /// first process has it). Its `Parent` pages are that process's part of the parent.
    pub fn part_view(&self, part: &ProcessPart) -> Manifest {
        Manifest {
            id: self.id.clone(),
            parent: self.parent.clone(),
            ancestors: self.ancestors.clone(),
            created_unix_ms: self.created_unix_ms,
            app: self.app.clone(),
            cpu: self.cpu.clone(),
            context: part.context.clone(),
            vmas: part.vmas.clone(),
            pages: part.pages.clone(),
            page_count: self.page_count,
            chunk_pages: self.chunk_pages,
            chunk_digests: self.chunk_digests.clone(),
            activeset_prefix: 0,
            activeset: part.activeset.clone(),
            port_sets: Vec::new(),
            files: part.files.clone(),
            signals: part.signals.clone(),
            process: part.process.clone(),
            threads: part.threads.clone(),
            clock: self.clock,
            data_bytes: 0,
            data_digest: [0; 32],
            stats: SnapshotStats::default(),
            prefetched: None,
            tree: None,
            shared_memory: self.shared_memory.clone(),
        }
    }

    /// The chain of process `pid`'s part, newest first, from `chain` (a tree snapshot's,
    /// newest first): as far back as its parts go.
    pub fn part_chain(chain: &[Manifest], pid: i32) -> Vec<Manifest> {
        chain
            .iter()
            .map_while(|m| {
                let part = m.tree.as_ref()?.others.iter().find(|p| p.pid == pid)?;
                Some(m.part_view(part))
            })
            .collect()
    }

    /// Bytes of the page file this manifest describes.
    pub fn page_file_bytes(&self) -> u64 {
        self.page_count.saturating_mul(PAGE_SIZE)
    }
}

/// The payload of `bytes`, once the header checks out and the MAC matches.
fn authenticated_payload<'a>(
    bytes: &'a [u8],
    key: &SnapshotKey,
) -> Result<&'a [u8], ManifestError> {
    let (Some(header), Some(mac)) = (
        bytes.get(..SIGNED_HEADER),
        bytes.get(SIGNED_HEADER..HEADER_SIZE),
    ) else {
        return Err(ManifestError::Truncated {
            have: bytes.len() as u64,
            expected: HEADER_SIZE as u64,
        });
    };
    if header[..8] != MAGIC {
        return Err(ManifestError::BadMagic);
    }
    let word = |range: std::ops::Range<usize>| -> u64 {
        let mut buf = [0u8; 8];
        buf[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(buf)
    };
    let version = word(8..12) as u32;
    if version != FORMAT_VERSION {
        return Err(ManifestError::Version { found: version });
    }
    let length = word(12..20);
    if length > MAX_MANIFEST_SIZE {
        return Err(ManifestError::TooLarge(length));
    }
    let expected = HEADER_SIZE as u64 + length;
    let have = bytes.len() as u64;
    if have < expected {
        return Err(ManifestError::Truncated { have, expected });
    }
    if have > expected {
        return Err(ManifestError::Trailing { have, expected });
    }
    let payload = &bytes[HEADER_SIZE..];
    if !key.verify(&[header, payload], mac) {
        return Err(ManifestError::Forged);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SnapshotKey {
        SnapshotKey::from_bytes([7; KEY_BYTES])
    }

    fn sample() -> Manifest {
        Manifest {
            id: "s1".into(),
            page_count: 3,
            chunk_pages: 2,
            chunk_digests: vec![[1; 32], [2; 32]],
            activeset_prefix: 1,
            app: AppRecord {
                name: "app".into(),
                memory_mib: 16,
                ..Default::default()
            },
            vmas: vec![VmaRecord {
                start: 0x40_0000,
                end: 0x60_0000,
                prot: 3,
                role: 0,
                backing: BackingRecord::Anonymous,
            }],
            pages: vec![
                PageRun {
                    vpn: 0x400,
                    count: 3,
                    source: PageSource::Stored { index: 0 },
                },
                PageRun {
                    vpn: 0x500,
                    count: 10,
                    source: PageSource::Zero,
                },
            ],
            context: UserContext {
                xsave: vec![0; 4096],
                ..Default::default()
            },
            process: ProcessRecord {
                cwd: "/".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn round_trips() {
        let manifest = sample();
        assert_eq!(
            Manifest::decode(&manifest.encode(&key()), &key()).unwrap(),
            manifest
        );
    }

    #[test]
    fn refuses_damage_and_other_keys_before_decoding() {
        let bytes = sample().encode(&key());
        let decode = |bytes: &[u8]| Manifest::decode(bytes, &key()).unwrap_err();
        assert_eq!(
            decode(&bytes[..10]),
            ManifestError::Truncated {
                have: 10,
                expected: HEADER_SIZE as u64
            }
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            ManifestError::Truncated { .. }
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), ManifestError::Trailing { .. }));
        for at in [12, 30, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x40;
            let error = decode(&flipped);
            assert!(
                matches!(
                    error,
                    ManifestError::Forged
                        | ManifestError::TooLarge(_)
                        | ManifestError::Truncated { .. }
                        | ManifestError::Trailing { .. }
                ),
                "byte {at}: {error}"
            );
        }
        let other = SnapshotKey::from_bytes([8; KEY_BYTES]);
        assert_eq!(
            Manifest::decode(&bytes, &other).unwrap_err(),
            ManifestError::Forged
        );
        let mut versioned = bytes.clone();
        versioned[8] = 99;
        assert_eq!(decode(&versioned), ManifestError::Version { found: 99 });
        let mut magic = bytes;
        magic[0] = b'X';
        assert_eq!(decode(&magic), ManifestError::BadMagic);
    }

    #[test]
    fn refuses_inconsistent_runs_even_when_signed() {
        let mut manifest = sample();
        manifest.pages[0].source = PageSource::Stored { index: 2 };
        assert!(matches!(
            Manifest::decode(&manifest.encode(&key()), &key()).unwrap_err(),
            ManifestError::Inconsistent(_)
        ));
        let mut manifest = sample();
        manifest.pages[1].vpn = 0x401;
        assert!(matches!(
            manifest.validate().unwrap_err(),
            ManifestError::Inconsistent(_)
        ));
    }
}

//! The fd table in a snapshot: what each descriptor was, and making it again.
//!
//! Files are reopened by path (at their offset), listening and datagram sockets are made
//! anew and bound again (to the restoring app's address), pipes come back with the bytes
//! that were in them, epoll sets with their registrations, eventfds with their counters,
//! timerfds with the time they had left. A connection cannot move: it is closed at capture
//! and comes back as a socket at end of file.

use crate::fdtable::{FdTable, FileKind, OpenFile, Registration};
use crate::hostcall;
use crate::kernel::process::Process;
use picocenter_snapshots::bounds::{MAX_MEMFD_DATA, SOCKET_FAMILIES, SOCKET_TYPES};
use picocenter_snapshots::format::{object_key, FdRecord, FileRecord};
use rustix::event::EventfdFlags;
use rustix::fs::{Mode, OFlags, SeekFrom};
use rustix::io::Errno;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Why a descriptor could not be made again.
#[derive(Debug, thiserror::Error)]
#[error("restoring fd {fd} ({what}): {errno}")]
pub struct FileRestoreError {
    /// The guest fd.
    pub fd: i32,
    /// What it was.
    pub what: String,
    /// Why.
    pub errno: Errno,
}

/// Reads what is buffered in a pipe without taking it (tee into a scratch pipe).
fn pipe_contents(read_end: &OwnedFd) -> Vec<u8> {
    let Ok((scratch_r, scratch_w)) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::NONBLOCK)
    else {
        return Vec::new();
    };
    let _ = rustix::pipe::fcntl_setpipe_size(&scratch_w, 1 << 20);
    let copied = rustix::pipe::tee(
        read_end,
        &scratch_w,
        1 << 20,
        rustix::pipe::SpliceFlags::NONBLOCK,
    )
    .unwrap_or(0);
    let mut data = vec![0u8; copied];
    let n = rustix::io::read(&scratch_r, &mut data).unwrap_or(0);
    data.truncate(n);
    data
}

/// The most a snapshot keeps of what waits in a connection: what a fresh socketpair
/// takes at restore (an unprivileged SO_SNDBUF is at most wmem_max, 208 KiB by default,
/// which the kernel doubles).
const QUEUED_KEPT: usize = 256 << 10;

/// For one end of a socketpair of the app's (of type `kind`, whose other end has host
/// inode `peer`): that end's object key, and the bytes waiting to be read at this end,
/// peeked (the app still reads them). `None` if what waits cannot be kept whole (a
/// datagram's boundaries, descriptors in flight, a peek offset the app set, or more than
/// [`QUEUED_KEPT`]): the connection is then closed by the snapshot, as one that leaves
/// the app is.
fn connection_in_app(socket: &OwnedFd, kind: i32, peer: u64) -> Option<(u64, Vec<u8>)> {
    let cannot = |why: &str| {
        tracing::warn!("a connection of the app's is closed by the snapshot: {why}");
        None
    };
    let waiting = rustix::io::ioctl_fionread(socket).ok()? as usize;
    if waiting == 0 {
        return Some((object_key(false, peer), Vec::new()));
    }
    if kind != libc::SOCK_STREAM {
        return cannot("datagrams wait in it");
    }
    if waiting > QUEUED_KEPT {
        return cannot("more waits in it than a snapshot keeps");
    }
    // A peek from an offset the app set (SO_PEEK_OFF) would miss bytes, and move it.
    let peek_offset = hostcall::getsockopt(socket.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, 4)
        .ok()
        .and_then(|v| v.try_into().ok().map(i32::from_ne_bytes));
    if peek_offset != Some(-1) {
        return cannot("the app peeks from an offset");
    }
    let mut queued = vec![0u8; waiting];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let flags = rustix::net::RecvFlags::PEEK
        | rustix::net::RecvFlags::DONTWAIT
        | rustix::net::RecvFlags::CMSG_CLOEXEC;
    let got = rustix::net::recvmsg(
        socket,
        &mut [std::io::IoSliceMut::new(&mut queued)],
        &mut control,
        flags,
    )
    .ok()?;
    // Peeked descriptors are copies: dropped here.
    let passed = control.drain().count() > 0;
    if passed || got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return cannot("descriptors are in flight in it");
    }
    if got.bytes != waiting {
        return cannot("what waits in it could not be read whole");
    }
    Some((object_key(false, peer), queued))
}

/// The counter of an eventfd, read and written back so the app keeps it.
fn eventfd_counter(fd: &OwnedFd, semaphore: bool) -> u64 {
    let mut total = 0u64;
    loop {
        let mut buf = [0u8; 8];
        match rustix::io::read(fd, &mut buf) {
            Ok(8) => {
                total = total.saturating_add(u64::from_ne_bytes(buf));
                if !semaphore {
                    break;
                }
            }
            _ => break,
        }
    }
    if total > 0 {
        let _ = rustix::io::write(fd, &total.to_ne_bytes());
    }
    total
}

fn ns(t: rustix::time::Timespec) -> u64 {
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// A memfd's record: its bytes (up to [`MAX_MEMFD_DATA`]), offset and seals.
fn memfd_record(file: &OpenFile, name: &str) -> Result<FileRecord, String> {
    let host = file.host();
    let size = rustix::fs::fstat(host).map_or(0, |s| s.st_size as u64);
    if size > MAX_MEMFD_DATA as u64 {
        return Err(format!(
            "memfd {name:?} holds {size} bytes, over the {MAX_MEMFD_DATA} a snapshot keeps"
        ));
    }
    let mut data = vec![0u8; size as usize];
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pread(host, &mut data[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(format!("reading memfd {name:?}: {e}")),
        }
    }
    data.truncate(done);
    Ok(FileRecord::Memfd {
        name: name.to_string(),
        data,
        offset: rustix::fs::seek(host, SeekFrom::Current(0)).unwrap_or(0),
        seals: rustix::fs::fcntl_get_seals(host).map_or(0, |s| s.bits()),
    })
}

fn record(file: &OpenFile, files: &FdTable, closed: &mut u64) -> Result<FileRecord, String> {
    Ok(match &file.kind {
        FileKind::Memfd { name } => memfd_record(file, name)?,
        FileKind::Netlink => FileRecord::Netlink,
        FileKind::Pty { index, .. } => {
            return Err(format!(
                "pseudo-terminal {index} is open, and a snapshot cannot keep one"
            ))
        }
        FileKind::Path { path, flags } => FileRecord::Path {
            path: path.clone(),
            flags: *flags,
            offset: rustix::fs::seek(file.host(), SeekFrom::Current(0)).unwrap_or(0),
        },
        FileKind::Directory { path } => FileRecord::Directory { path: path.clone() },
        FileKind::Stdio(n) => FileRecord::Stdio(*n),
        FileKind::Pipe { write_end } => FileRecord::Pipe {
            pipe: rustix::fs::fstat(file.host())
                .map(|s| s.st_ino)
                .unwrap_or(0),
            write_end: *write_end,
            data: if *write_end {
                Vec::new()
            } else {
                pipe_contents(&file.fd)
            },
        },
        FileKind::Socket { domain, kind } => {
            let state = file.state();
            // A socketpair of the app's is kept, with what waits in it.
            let pair = state
                .pair_peer
                .and_then(|peer| connection_in_app(&file.fd, *kind, peer));
            let connected = pair.is_none()
                && state.listening.is_none()
                && *kind == libc::SOCK_STREAM
                && hostcall::getpeername(file.host()).is_ok();
            *closed += connected as u64;
            let (peer, queued) = pair.unwrap_or_default();
            FileRecord::Socket {
                domain: *domain,
                kind: *kind,
                bound: state.bound.map(|a| a.to_string()),
                unix_name: state.unix_name.clone(),
                connected_to: state.connected_to.clone(),
                listening: state.listening,
                options: state.options.clone(),
                closed: connected,
                peer,
                queued,
            }
        }
        FileKind::Epoll => FileRecord::Epoll {
            // Only registrations whose number still names the file registered: the others
            // are of files closed since (or reachable only through another number, which
            // the app can no longer name in epoll_ctl either).
            registrations: file
                .state()
                .registrations
                .iter()
                .filter(|(&fd, r)| {
                    matches!((files.file(fd), r.target.upgrade()),
                        (Ok(now), Some(then)) if Arc::ptr_eq(&now, &then))
                })
                .map(|(&fd, r)| (fd, r.events, r.data))
                .collect(),
        },
        FileKind::EventFd { semaphore } => FileRecord::EventFd {
            counter: eventfd_counter(&file.fd, *semaphore),
            semaphore: *semaphore,
        },
        FileKind::TimerFd { clock } => {
            let now = rustix::time::timerfd_gettime(file.host()).ok();
            FileRecord::TimerFd {
                clock: *clock,
                remaining_ns: now.as_ref().map_or(0, |t| ns(t.it_value)),
                interval_ns: now.as_ref().map_or(0, |t| ns(t.it_interval)),
            }
        }
    })
}

/// Records every descriptor. Returns the records and how many connections they close, or
/// what cannot be kept.
pub fn capture(p: &Process) -> Result<(Vec<FdRecord>, u64), String> {
    let mut closed = 0;
    let mut shared: HashMap<usize, u64> = HashMap::new();
    let mut records = Vec::new();
    // What the records hold (a description's bytes are in each of its descriptors'
    // records): no more than a manifest may, so an app that dups a full pipe a thousand
    // times is refused before it costs the VMM its memory.
    let mut held: u64 = 0;
    for (fd, entry) in p.files.iter() {
        let key = Arc::as_ptr(&entry.file) as usize;
        let next = shared.len() as u64;
        let id = *shared.entry(key).or_insert(next);
        let file = if id == next {
            record(&entry.file, &p.files, &mut closed)?
        } else {
            // The same description as an earlier fd: its record is the first one's.
            records
                .iter()
                .find(|r: &&FdRecord| r.shared == id)
                .map(|r| r.file.clone())
                .unwrap_or(FileRecord::Stdio(0))
        };
        held = held.saturating_add(file.held_bytes());
        if held > picocenter_snapshots::format::MAX_MANIFEST_SIZE {
            return Err(format!(
                "the app's descriptors hold more than a snapshot keeps ({} MiB)",
                picocenter_snapshots::format::MAX_MANIFEST_SIZE >> 20
            ));
        }
        let object = match entry.file.kind {
            FileKind::Pipe { .. } | FileKind::Socket { .. } => rustix::fs::fstat(entry.file.host())
                .map_or(0, |s| {
                    object_key(matches!(entry.file.kind, FileKind::Pipe { .. }), s.st_ino)
                }),
            _ => 0,
        };
        records.push(FdRecord {
            fd,
            cloexec: entry.cloexec,
            nonblocking: entry.file.nonblocking(),
            shared: id,
            object,
            file,
        });
    }
    Ok((records, closed))
}

fn timespec(ns: u64) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as _,
    }
}

/// A socket at end of file: one end of a pair whose other end is gone.
fn closed_socket(kind: i32) -> Result<OwnedFd, Errno> {
    let (ours, gone) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::from_raw(kind as u32),
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    drop(gone);
    Ok(ours)
}

/// The pipes and sockets of a snapshot, each made once: the processes of a tree that hold
/// one share it, as they did (see `FdRecord::object`). Each is kept here by what it is of
/// and a copy handed to each holder.
#[derive(Debug, Default)]
pub struct SharedObjects {
    /// By (pipe or socket id, which end: [`SOCKET`], [`READ_END`] or [`WRITE_END`]).
    fds: HashMap<(u64, u8), OwnedFd>,
    /// Pipes whose bytes are in them already, and sockets whose queued bytes are.
    filled: std::collections::HashSet<u64>,
    /// The sockets the snapshot has, by object key, with their peers' (0: none): a
    /// connection is made again only if both its ends are here, each the other's peer.
    sockets: HashMap<u64, u64>,
    /// For each end of a socketpair made again: the host inode of its other end (see
    /// `FileState::pair_peer`).
    peers: HashMap<u64, u64>,
    /// Datagram sockets made again, to connect to their names ([`Self::connect_all`]).
    unconnected: Vec<(OwnedFd, Vec<u8>)>,
    /// Shared anonymous memory, by key (see `SharedMemoryRecord`).
    pub memory: HashMap<u64, Arc<std::fs::File>>,
}

/// Which end of an object a descriptor is: a socket's only one.
pub const SOCKET: u8 = 0;
/// A pipe's read end.
pub const READ_END: u8 = 1;
/// A pipe's write end.
pub const WRITE_END: u8 = 2;

impl SharedObjects {
    /// For restoring `records` (every process's): notes which sockets they hold.
    pub fn expecting<'a>(records: impl IntoIterator<Item = &'a FdRecord>) -> Self {
        let sockets = records
            .into_iter()
            .filter(|r| r.object != 0)
            .filter_map(|r| match r.file {
                FileRecord::Socket { peer, .. } => Some((r.object, peer)),
                _ => None,
            })
            .collect();
        SharedObjects {
            sockets,
            ..Default::default()
        }
    }

    /// Makes the connection `record` (a socket with a peer in the snapshot) is one end
    /// of, if its other end did not already, and puts what waited at this end in it
    /// (from the other end). Nothing for a socket whose peer is not in the snapshot.
    fn connect(&mut self, record: &FdRecord) -> Result<(), Errno> {
        let FileRecord::Socket {
            kind, peer, queued, ..
        } = &record.file
        else {
            return Ok(());
        };
        // Both here, each the other's peer (a datagram socket connected to a bound one
        // names it as its peer, and is not named back).
        let mutual = self.sockets.get(peer) == Some(&record.object)
            && self.sockets.get(&record.object) == Some(peer);
        if *peer == 0 || !mutual {
            return Ok(());
        }
        let (ours, theirs) = ((record.object, SOCKET), (*peer, SOCKET));
        match (self.fds.contains_key(&ours), self.fds.contains_key(&theirs)) {
            (false, false) => {
                let (a, b) = rustix::net::socketpair(
                    rustix::net::AddressFamily::UNIX,
                    rustix::net::SocketType::from_raw(*kind as u32),
                    rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
                    None,
                )?;
                let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).map(|s| s.st_ino);
                self.peers.insert(record.object, inode(&b)?);
                self.peers.insert(*peer, inode(&a)?);
                self.fds.insert(ours, a);
                self.fds.insert(theirs, b);
            }
            (true, true) => {}
            // One end made as something else: not this pair (only a tampered snapshot).
            _ => return Ok(()),
        }
        if !queued.is_empty() && self.filled.insert(record.object) {
            let from = self.fds.get(&theirs).ok_or(Errno::BADF)?;
            // Room for it (the snapshot kept at most what a socket holds then).
            let room = queued.len().saturating_mul(2);
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(from, room);
            write_whole(from, queued)?;
        }
        Ok(())
    }

    /// The key of the object `record` is of, if it is a pipe end or socket.
    pub fn key(record: &FdRecord) -> Option<(u64, u8)> {
        match &record.file {
            FileRecord::Pipe {
                pipe, write_end, ..
            } => Some((*pipe, if *write_end { WRITE_END } else { READ_END })),
            FileRecord::Socket { .. } if record.object != 0 => Some((record.object, SOCKET)),
            _ => None,
        }
    }

    /// A copy of object `key`'s descriptor, if it is here.
    pub fn get(&self, key: (u64, u8)) -> Option<Result<OwnedFd, Errno>> {
        self.fds
            .get(&key)
            .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 0))
    }

    /// Keeps `fd` as object `key` (made elsewhere, with its contents).
    pub fn insert(&mut self, key: (u64, u8), fd: OwnedFd) {
        if key.1 != SOCKET {
            self.filled.insert(key.0);
        }
        self.fds.insert(key, fd);
    }

    /// Makes the shared anonymous memory of `records` that is not here yet: a memfd with
    /// its bytes each.
    pub fn make_memory(
        &mut self,
        records: &[picocenter_snapshots::format::SharedMemoryRecord],
    ) -> Result<(), Errno> {
        for record in records {
            if self.memory.contains_key(&record.key) {
                continue;
            }
            let fd =
                rustix::fs::memfd_create("picocenter-shared", rustix::fs::MemfdFlags::CLOEXEC)?;
            rustix::fs::ftruncate(&fd, record.data.len() as u64)?;
            let mut done = 0;
            while done < record.data.len() {
                done += rustix::io::pwrite(&fd, &record.data[done..], done as u64)?;
            }
            self.memory
                .insert(record.key, Arc::new(std::fs::File::from(fd)));
        }
        Ok(())
    }

    /// Connects the datagram sockets made again to where they were connected, now that
    /// every socket of the app is made (a name no socket binds any more leaves one
    /// unconnected, as a restarted server would).
    pub fn connect_all(&mut self, p: &Process) {
        for (fd, name) in std::mem::take(&mut self.unconnected) {
            if let Err(e) = crate::syscalls::net::reconnect_unix(p, fd.as_fd(), &name) {
                tracing::debug!("a restored datagram socket stays unconnected: {e}");
            }
        }
    }

    /// Object `key`'s descriptor, for handing on.
    pub fn fd(&self, key: (u64, u8)) -> Option<&OwnedFd> {
        self.fds.get(&key)
    }

    /// If object `key` is one end of a socketpair made again: the host inode of its
    /// other end.
    pub fn peer(&self, key: (u64, u8)) -> Option<u64> {
        (key.1 == SOCKET)
            .then(|| self.peers.get(&key.0).copied())
            .flatten()
    }

    /// Keeps `fd` as socket `key`, one end of a socketpair whose other end is host inode
    /// `peer` (handed on by the first process).
    pub fn insert_pair_end(&mut self, key: u64, fd: OwnedFd, peer: u64) {
        self.peers.insert(key, peer);
        self.fds.insert((key, SOCKET), fd);
    }
}

/// Writes all of `data` into a new pipe or connection that nothing reads yet (it never
/// blocks: there is room for what a snapshot keeps of it).
fn write_whole(fd: &OwnedFd, data: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::write(fd, &data[done..]) {
            Ok(0) => return Err(Errno::NOSPC),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes one open file again (not epoll sets: see [`restore`]). A pipe end or socket
/// comes from `objects` if it is there, and is kept there if made here.
fn reopen(
    p: &mut Process,
    record: &FdRecord,
    objects: &mut SharedObjects,
) -> Result<(OwnedFd, FileKind), Errno> {
    let file = &record.file;
    let key = SharedObjects::key(record);
    if let (Some(key), FileRecord::Socket { domain, kind, .. }) = (key, file) {
        objects.connect(record)?;
        if let Some(fd) = objects.get(key) {
            return Ok((
                fd?,
                FileKind::Socket {
                    domain: *domain,
                    kind: *kind,
                },
            ));
        }
        let (fd, kind) = reopen_file(p, file, objects)?;
        objects.insert(key, rustix::io::fcntl_dupfd_cloexec(&fd, 0)?);
        return Ok((fd, kind));
    }
    reopen_file(p, file, objects)
}

/// Makes `file` again; a pipe's ends come from `objects`, or are made there.
fn reopen_file(
    p: &mut Process,
    file: &FileRecord,
    objects: &mut SharedObjects,
) -> Result<(OwnedFd, FileKind), Errno> {
    // Only sockets an app could have made: a snapshot is input, and the VMM makes them.
    if let FileRecord::Socket { domain, kind, .. } = file {
        if !SOCKET_FAMILIES.contains(domain) || !SOCKET_TYPES.contains(kind) {
            return Err(Errno::AFNOSUPPORT);
        }
    }
    Ok(match file {
        FileRecord::Path {
            path,
            flags,
            offset,
        } => {
            let oflags = OFlags::from_bits_retain(*flags)
                & (OFlags::ACCMODE | OFlags::APPEND | OFlags::DIRECTORY | OFlags::PATH);
            // A generated /proc file (redis reads /proc/<pid>/stat now and then) is
            // generated again; it is in no directory the sandbox could open.
            let fd = match crate::syscalls::procfs::file_at_restore(p, path) {
                Some(content) => crate::sandbox::sealed_file(path, &content)?,
                None => {
                    crate::syscalls::procfs::refresh(p, path);
                    p.sandbox.open(path, oflags, Mode::empty())?
                }
            };
            rustix::fs::seek(&fd, SeekFrom::Start(*offset))?;
            (
                fd,
                FileKind::Path {
                    path: path.clone(),
                    flags: *flags,
                },
            )
        }
        FileRecord::Directory { path } => {
            // One of /proc's (its tree is made when first looked at).
            crate::syscalls::procfs::refresh(p, path);
            let fd = p
                .sandbox
                .open(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
            (fd, FileKind::Directory { path: path.clone() })
        }
        FileRecord::Stdio(n) => {
            let host = match n {
                0 => rustix::stdio::stdin(),
                1 => rustix::stdio::stdout(),
                _ => rustix::stdio::stderr(),
            };
            (
                rustix::io::fcntl_dupfd_cloexec(host, 3)?,
                FileKind::Stdio(*n),
            )
        }
        FileRecord::Pipe {
            pipe,
            write_end,
            data,
        } => {
            let (read, write) = ((*pipe, READ_END), (*pipe, WRITE_END));
            if !objects.fds.contains_key(&read) && !objects.fds.contains_key(&write) {
                let (r, w) = rustix::pipe::pipe_with(
                    rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC,
                )?;
                objects.fds.insert(read, r);
                objects.fds.insert(write, w);
            }
            // The bytes are in the read end's record; they go in once, whichever process
            // holds that end.
            if !data.is_empty() && objects.filled.insert(*pipe) {
                let w = objects.fds.get(&write).ok_or(Errno::BADF)?;
                // Room for all of it (a snapshot keeps up to 1 MiB of a pipe), then all of
                // it: the write end does not block, and nothing reads yet.
                if data.len() > 65536 {
                    rustix::pipe::fcntl_setpipe_size(w, data.len())?;
                }
                write_whole(w, data)?;
            }
            let end = if *write_end { write } else { read };
            (
                objects.get(end).ok_or(Errno::BADF)??,
                FileKind::Pipe {
                    write_end: *write_end,
                },
            )
        }
        // A connection, closed at capture or with its other end not in the snapshot.
        FileRecord::Socket {
            domain,
            kind,
            closed,
            peer,
            ..
        } if *closed || *peer != 0 => (
            closed_socket(*kind)?,
            FileKind::Socket {
                domain: *domain,
                kind: *kind,
            },
        ),
        FileRecord::Socket {
            domain,
            kind,
            bound,
            unix_name,
            connected_to,
            listening,
            options,
            ..
        } => {
            let fd = crate::syscalls::net::restore_socket(
                p,
                *domain,
                *kind,
                bound.as_deref(),
                unix_name.as_deref(),
                *listening,
                options,
            )?;
            if let Some(name) = connected_to {
                // Once every socket is made: where it connects may be one of them.
                let copy = rustix::io::fcntl_dupfd_cloexec(&fd, 0)?;
                objects.unconnected.push((copy, name.clone()));
            }
            (
                fd,
                FileKind::Socket {
                    domain: *domain,
                    kind: *kind,
                },
            )
        }
        FileRecord::EventFd { counter, semaphore } => {
            let mut flags = EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC;
            if *semaphore {
                flags |= EventfdFlags::SEMAPHORE;
            }
            let init = u32::try_from(*counter).unwrap_or(u32::MAX);
            let fd = rustix::event::eventfd(init, flags)?;
            if *counter > init as u64 {
                rustix::io::write(&fd, &(counter - init as u64).to_ne_bytes())?;
            }
            (
                fd,
                FileKind::EventFd {
                    semaphore: *semaphore,
                },
            )
        }
        FileRecord::TimerFd {
            clock,
            remaining_ns,
            interval_ns,
        } => {
            let host_clock = if *clock == libc::CLOCK_REALTIME {
                rustix::time::TimerfdClockId::Realtime
            } else {
                rustix::time::TimerfdClockId::Monotonic
            };
            let fd = rustix::time::timerfd_create(
                host_clock,
                rustix::time::TimerfdFlags::NONBLOCK | rustix::time::TimerfdFlags::CLOEXEC,
            )?;
            if *remaining_ns > 0 {
                let spec = rustix::time::Itimerspec {
                    it_interval: timespec(*interval_ns),
                    it_value: timespec(*remaining_ns),
                };
                rustix::time::timerfd_settime(
                    &fd,
                    rustix::time::TimerfdTimerFlags::empty(),
                    &spec,
                )?;
            }
            (fd, FileKind::TimerFd { clock: *clock })
        }
        FileRecord::Epoll { .. } => (
            rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)?,
            FileKind::Epoll,
        ),
        // Made with the end its answers go to, in `restore`.
        FileRecord::Netlink => return Err(Errno::INVAL),
        FileRecord::Memfd {
            name,
            data,
            offset,
            seals,
        } => {
            let fd = rustix::fs::memfd_create(
                "picocenter-app",
                rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
            )?;
            let mut done = 0;
            while done < data.len() {
                done += rustix::io::pwrite(&fd, &data[done..], done as u64)?;
            }
            rustix::fs::seek(&fd, SeekFrom::Start(*offset))?;
            let seals = rustix::fs::SealFlags::from_bits_retain(*seals);
            if !seals.is_empty() {
                rustix::fs::fcntl_add_seals(&fd, seals)?;
            }
            (fd, FileKind::Memfd { name: name.clone() })
        }
    })
}

/// Makes the pipes and sockets of `records` (the other processes' of a tree) that
/// `objects` does not have yet, with `p`'s context, for handing on.
pub fn make_objects(
    p: &mut Process,
    records: &[FdRecord],
    objects: &mut SharedObjects,
) -> Result<(), FileRestoreError> {
    for record in records {
        if SharedObjects::key(record).is_some() {
            reopen(p, record, objects).map_err(|errno| FileRestoreError {
                fd: record.fd,
                what: record.file.kind_name().to_string(),
                errno,
            })?;
        }
    }
    Ok(())
}

/// Makes every descriptor again in `p`'s (empty) fd table; pipes and sockets come from
/// `objects` if they are there, and are kept there if made here.
pub fn restore(
    p: &mut Process,
    records: &[FdRecord],
    objects: &mut SharedObjects,
) -> Result<(), FileRestoreError> {
    let mut opened: HashMap<u64, Arc<OpenFile>> = HashMap::new();
    let fail = |record: &FdRecord, errno| FileRestoreError {
        fd: record.fd,
        what: record.file.kind_name().to_string(),
        errno,
    };
    for record in records {
        let file = match opened.get(&record.shared) {
            Some(file) => file.clone(),
            None if matches!(record.file, FileRecord::Netlink) => {
                let (app, answers) =
                    crate::syscalls::netlink::pair().map_err(|e| fail(record, e))?;
                let file = OpenFile::with_mode(app, FileKind::Netlink, record.nonblocking);
                file.state().netlink_answers = Some(answers);
                opened.insert(record.shared, file.clone());
                file
            }
            None => {
                let (fd, kind) = reopen(p, record, objects).map_err(|e| fail(record, e))?;
                let file = OpenFile::with_mode(fd, kind, record.nonblocking);
                if let Some(key) = SharedObjects::key(record) {
                    file.state().pair_peer = objects.peer(key);
                }
                if let FileRecord::Socket {
                    bound,
                    unix_name,
                    connected_to,
                    listening,
                    options,
                    ..
                } = &record.file
                {
                    let mut state = file.state();
                    state.bound = bound.as_deref().and_then(|b| b.parse().ok());
                    state.unix_name = unix_name.clone();
                    state.connected_to = connected_to.clone();
                    state.listening = *listening;
                    state.options = options.clone();
                    let local_only = state
                        .bound
                        .is_some_and(|b| crate::kernel::netpolicy::is_app_loopback(b.ip()));
                    let handed = !local_only
                        && matches!(file.kind, FileKind::Socket { domain, kind }
                        if domain != libc::AF_UNIX
                            && (listening.is_some() || (kind == libc::SOCK_DGRAM && state.bound.is_some())));
                    drop(state);
                    if handed {
                        p.handoff.offer(record.fd, &file);
                    }
                }
                opened.insert(record.shared, file.clone());
                file
            }
        };
        p.files
            .insert_at(record.fd, file, record.cloexec)
            .map_err(|e| fail(record, e))?;
    }
    // Epoll registrations last: they name other fds.
    for record in records {
        if let FileRecord::Epoll { registrations } = &record.file {
            let epoll = p.files.file(record.fd).map_err(|e| fail(record, e))?;
            for &(fd, events, data) in registrations {
                let Ok(target) = p.files.file(fd) else {
                    continue;
                };
                rustix::event::epoll::add(
                    epoll.host(),
                    target.host(),
                    rustix::event::epoll::EventData::new_u64(data),
                    rustix::event::epoll::EventFlags::from_bits_retain(events),
                )
                .map_err(|e| fail(record, e))?;
                epoll.state().registrations.insert(
                    fd,
                    Registration {
                        target: Arc::downgrade(&target),
                        events,
                        data,
                    },
                );
            }
        }
    }
    Ok(())
}

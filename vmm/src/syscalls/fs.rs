//! Files, directories and pipes, inside the app's sandbox.

use super::wait::retry;
use super::{Args, SysError, SysResult};
use crate::fdtable::{FileKind, OpenFile};
use crate::kernel::process::Process;
use crate::memory::UserAddr;
use crate::sandbox::{pathbytes, Follow, Node};
use rustix::event::PollFlags;
use rustix::fs::{AtFlags, Mode, OFlags, SeekFrom};
use rustix::io::Errno;
use std::os::fd::{AsFd, OwnedFd};

const AT_FDCWD: i32 = -100;
const PATH_MAX: usize = 4096;
/// Largest guest buffer a single read or write may name; longer ones are short transfers.
const MAX_IO: usize = 0x7fff_f000;

/// Reads a path argument.
fn path_arg(p: &mut Process, addr: UserAddr) -> Result<String, Errno> {
    let bytes = p.mem.read_cstr(addr, PATH_MAX)?;
    if bytes.is_empty() {
        return Err(Errno::NOENT);
    }
    Ok(pathbytes::from_guest(bytes))
}

/// Resolves `path` relative to `dirfd` (AT_FDCWD or a directory fd) to an absolute,
/// normalised guest path.
fn at_path(p: &Process, dirfd: i32, path: &str) -> Result<String, Errno> {
    if path.starts_with('/') || dirfd == AT_FDCWD {
        return Ok(p.absolute(path));
    }
    let file = p.files.file(dirfd)?;
    match &file.kind {
        FileKind::Directory { path: dir } => Ok(crate::sandbox::normalize(dir, path)),
        _ => Err(Errno::NOTDIR),
    }
}

/// Reads a path argument and resolves it against `dirfd`.
fn at_path_arg(p: &mut Process, dirfd: i32, addr: UserAddr) -> Result<String, Errno> {
    let path = path_arg(p, addr)?;
    let path = at_path(p, dirfd, &path)?;
    // The tree behind /proc's directories and links, as it is now.
    super::procfs::refresh(p, &path);
    Ok(path)
}

// ---- read and write ------------------------------------------------------------------

/// The smallest transfer made without the process lock: a smaller one takes the lock
/// for a few microseconds, as other calls do.
const UNLOCKED_TRANSFER_MIN: usize = 64 << 10;
/// The smallest transfer the mailbox declines in an app with a second vCPU, so that it is
/// made without the lock (see [`unlocked_transfer`]).
const MAILBOX_TRANSFER_MAX: usize = 1 << 20;

/// A transfer between a regular file and app memory that the run loop makes without the
/// process lock ([`SysError::Transfer`]); its result is the call's.
#[derive(Debug)]
pub struct Transfer {
    /// The file, kept open for the transfer even if another thread closes its fd.
    pub file: std::sync::Arc<OpenFile>,
    /// The transfer, prepared.
    pub io: crate::memory::io::HostTransfer,
}

/// The unlocked transfer of `bufs` with `file` at `offset`, if this one is made without
/// the process lock: a regular file's, of at least [`UNLOCKED_TRANSFER_MIN`] bytes, in an
/// app with a second vCPU (with one, no other thread's call could go on meanwhile).
/// Other transfers (sockets, pipes: never longer than their buffers) take the lock.
///
/// The mailbox's one poller performs calls one at a time, with the lock: it declines a
/// transfer of [`MAILBOX_TRANSFER_MAX`] or more, which then comes by exit and is made
/// unlocked, and performs a smaller one itself (declined, it would pay an exit, ~100 µs
/// on kvm_pvm today, for a copy that takes less).
fn unlocked_transfer(
    p: &mut Process,
    file: &std::sync::Arc<OpenFile>,
    bufs: &[(UserAddr, usize)],
    offset: Option<u64>,
    access: crate::memory::Access,
) -> Result<Option<SysError>, Errno> {
    let total = bufs
        .iter()
        .fold(0usize, |sum, &(_, len)| sum.saturating_add(len));
    let regular = || {
        rustix::fs::fstat(file.host()).is_ok_and(|stat| {
            rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::RegularFile
        })
    };
    if total < UNLOCKED_TRANSFER_MIN
        || (p.thread.in_mailbox && total < MAILBOX_TRANSFER_MAX)
        || p.threads.cpus.len() < 2
        || !matches!(file.kind, FileKind::Path { .. })
        || !regular()
    {
        return Ok(None);
    }
    if p.thread.in_mailbox {
        return Ok(Some(SysError::WouldBlock));
    }
    let io = p.mem.prepare_transfer(bufs, offset, access)?;
    Ok(Some(SysError::Transfer(Box::new(Transfer {
        file: file.clone(),
        io,
    }))))
}

fn read_into(
    p: &mut Process,
    fd: i32,
    bufs: &[(UserAddr, usize)],
    offset: Option<u64>,
) -> SysResult {
    let file = p.files.file(fd)?;
    if matches!(file.kind, FileKind::Directory { .. }) {
        return Err(Errno::ISDIR.into());
    }
    if let Some(unlocked) = unlocked_transfer(p, &file, bufs, offset, crate::memory::Access::Write)?
    {
        return Err(unlocked);
    }
    let read = retry(p, &file, PollFlags::IN, |p| {
        p.mem.read_from_host(file.host(), bufs, offset)
    })?;
    Ok(read as u64)
}

fn write_from(
    p: &mut Process,
    fd: i32,
    bufs: &[(UserAddr, usize)],
    offset: Option<u64>,
) -> SysResult {
    let file = p.files.file(fd)?;
    if let Some(unlocked) = unlocked_transfer(p, &file, bufs, offset, crate::memory::Access::Read)?
    {
        return Err(unlocked);
    }
    match retry(p, &file, PollFlags::OUT, |p| {
        p.mem.write_to_host(file.host(), bufs, offset)
    }) {
        Err(SysError::Errno(Errno::PIPE)) => {
            p.signals.raise(libc::SIGPIPE);
            Err(Errno::PIPE.into())
        }
        other => Ok(other? as u64),
    }
}

/// read(2). Like pread64, it may earn the file a window (see `kernel::windows`).
pub fn read(p: &mut Process, a: &Args) -> SysResult {
    let read = read_into(p, a.fd(0), &[io_buf(a.ptr(1), a.u64(2))?], None)?;
    offer_window(p, a.fd(0));
    Ok(read)
}

/// write(2).
pub fn write(p: &mut Process, a: &Args) -> SysResult {
    write_from(p, a.fd(0), &[io_buf(a.ptr(1), a.u64(2))?], None)
}

/// pread64(2). A file of the read-only root read this way again and again gets a window,
/// and the doorbell answers the reads after that (see `kernel::windows`).
pub fn pread64(p: &mut Process, a: &Args) -> SysResult {
    let buf = io_buf(a.ptr(1), a.u64(2))?;
    let offset = offset_arg(a.u64(3))?;
    let read = read_into(p, a.fd(0), &[buf], Some(offset))?;
    offer_window(p, a.fd(0));
    Ok(read)
}

/// Counts a read of `fd` towards a file window (see `kernel::windows`) if it is a file of
/// the read-only root, open for reading, and gives it one once it has earned it.
fn offer_window(p: &mut Process, fd: i32) {
    if !p.windows.wants(fd) {
        return;
    }
    let Ok(file) = p.files.file(fd) else {
        return;
    };
    let FileKind::Path { path, flags } = &file.kind else {
        return;
    };
    let read_only = *flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32
        && *flags & libc::O_PATH as u32 == 0;
    if !read_only || !p.sandbox.is_immutable(path) || !p.windows.count_read(fd, &file) {
        return;
    }
    let Ok(stat) = guest_stat(file.host()) else {
        return;
    };
    // The offset moves into the guest only where nothing else can use it: no other fd
    // names this open file, and no other process shares the fd table's files.
    let alone = p.tree.is_none()
        && !p.forked
        && p.files
            .iter()
            .filter(|(_, entry)| std::sync::Arc::ptr_eq(&entry.file, &file))
            .count()
            == 1;
    let offset = alone
        .then(|| rustix::fs::seek(file.host(), rustix::fs::SeekFrom::Current(0)).ok())
        .flatten();
    p.windows.open(&mut p.mem, fd, &file, &stat, offset);
}

/// pwrite64(2).
pub fn pwrite64(p: &mut Process, a: &Args) -> SysResult {
    let buf = io_buf(a.ptr(1), a.u64(2))?;
    let offset = offset_arg(a.u64(3))?;
    write_from(p, a.fd(0), &[buf], Some(offset))
}

/// The app buffer of `count` bytes at `addr` for one transfer, of at most [`MAX_IO`]
/// bytes: refused (EFAULT) if any of the whole count lies past user space, as Linux's
/// `access_ok` refuses it before anything moves. (A bad page inside user space only makes
/// the transfer stop there: see `AddressSpace::read_from_host`.)
fn io_buf(addr: UserAddr, count: u64) -> Result<(UserAddr, usize), Errno> {
    if addr
        .0
        .checked_add(count)
        .is_none_or(|end| end > crate::memory::space::USER_END)
    {
        return Err(Errno::FAULT);
    }
    Ok((addr, (count as usize).min(MAX_IO)))
}

fn offset_arg(raw: u64) -> Result<u64, Errno> {
    if (raw as i64) < 0 {
        Err(Errno::INVAL)
    } else {
        Ok(raw)
    }
}

/// Reads a guest iovec array.
fn iovec_arg(
    p: &mut Process,
    addr: UserAddr,
    count: usize,
) -> Result<Vec<(UserAddr, usize)>, Errno> {
    if count > 1024 {
        return Err(Errno::INVAL);
    }
    let iovecs: Vec<[u64; 2]> = p.mem.read_pod_array(addr, count)?;
    iovecs
        .into_iter()
        .map(|[base, len]| io_buf(UserAddr(base), len))
        .collect()
}

/// readv(2).
pub fn readv(p: &mut Process, a: &Args) -> SysResult {
    let bufs = iovec_arg(p, a.ptr(1), a.usize(2))?;
    read_into(p, a.fd(0), &bufs, None)
}

/// writev(2).
pub fn writev(p: &mut Process, a: &Args) -> SysResult {
    let bufs = iovec_arg(p, a.ptr(1), a.usize(2))?;
    write_from(p, a.fd(0), &bufs, None)
}

/// preadv(2).
pub fn preadv(p: &mut Process, a: &Args) -> SysResult {
    let bufs = iovec_arg(p, a.ptr(1), a.usize(2))?;
    read_into(p, a.fd(0), &bufs, Some(offset_arg(a.u64(3))?))
}

/// pwritev(2).
pub fn pwritev(p: &mut Process, a: &Args) -> SysResult {
    let bufs = iovec_arg(p, a.ptr(1), a.usize(2))?;
    write_from(p, a.fd(0), &bufs, Some(offset_arg(a.u64(3))?))
}

/// lseek(2). Like read, it may earn the file a window (see `kernel::windows`).
pub fn lseek(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    if matches!(file.kind, FileKind::Pipe { .. }) {
        return Err(Errno::SPIPE.into());
    }
    let offset = a.u64(1) as i64;
    let whence = match a.u32(2) {
        0 => SeekFrom::Start(offset_arg(offset as u64)?),
        1 => SeekFrom::Current(offset),
        2 => SeekFrom::End(offset),
        3 => SeekFrom::Data(offset_arg(offset as u64)?),
        4 => SeekFrom::Hole(offset_arg(offset as u64)?),
        _ => return Err(Errno::INVAL.into()),
    };
    let offset = rustix::fs::seek(file.host(), whence)?;
    offer_window(p, a.fd(0));
    Ok(offset)
}

// ---- open and close --------------------------------------------------------------------

/// The open flags the VMM passes through to the host.
fn host_open_flags(flags: u32) -> OFlags {
    let allowed = OFlags::ACCMODE
        | OFlags::CREATE
        | OFlags::EXCL
        | OFlags::TRUNC
        | OFlags::APPEND
        | OFlags::NONBLOCK
        | OFlags::DIRECTORY
        | OFlags::NOFOLLOW
        | OFlags::DSYNC
        | OFlags::SYNC
        | OFlags::PATH
        | OFlags::NOATIME;
    OFlags::from_bits_retain(flags) & allowed
}

/// Opens `path` (absolute, normalised) for the app and installs it.
/// The app fd a path names by number, as Linux's /dev/fd/N (and /dev/stdin, /dev/stdout,
/// /dev/stderr, /proc/self/fd/N, /proc/<its pid>/fd/N) do.
fn fd_path(p: &Process, path: &str) -> Option<i32> {
    match path {
        "/dev/stdin" => Some(0),
        "/dev/stdout" => Some(1),
        "/dev/stderr" => Some(2),
        _ => match path.strip_prefix("/dev/fd/") {
            Some(number) => super::procfs::plain_number(number),
            None => super::procfs::own_fd(p, path),
        },
    }
}

fn open_path(p: &mut Process, path: String, flags: u32, mode: u32) -> SysResult {
    if let Some(fd) = fd_path(p, &path) {
        // Opening /dev/fd/N gives another fd for the same file (for a pipe, socket or
        // terminal Linux does too; a regular file keeps one offset here).
        let file = p.files.file(fd).map_err(|_| Errno::NOENT)?;
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        return Ok(p.files.insert(file, cloexec)? as u64);
    }
    if path == "/dev/ptmx" || path == "/dev/pts/ptmx" {
        return super::pty::open_master(p, flags);
    }
    if let Some(number) = path.strip_prefix("/dev/pts/") {
        return super::pty::open_slave(p, number, flags);
    }
    if let Some(content) = super::procfs::file(p, &path) {
        if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
            return Err(Errno::ACCESS.into());
        }
        let fd = crate::sandbox::sealed_file(&path, &content)?;
        let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
        let file = OpenFile::new(fd, FileKind::Path { path, flags });
        return Ok(p.files.insert(file, cloexec)? as u64);
    }
    let oflags = host_open_flags(flags);
    let mode = Mode::from_bits_truncate(mode & !p.umask & 0o7777);
    // Known by the path it really is, symlinks resolved: its mount decides what fchmod,
    // futimens and mmap may do with it.
    let opened = p.sandbox.open_resolved(&path, oflags, mode)?;
    let file_type = match opened.kind {
        Some(kind) => kind,
        None => rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&opened.fd)?.st_mode),
    };
    let (fd, path) = (opened.fd, opened.path);
    // A listing of its own fd/ shows the fd it is read through, as on Linux.
    let own_fds = path == format!("/proc/{}/fd", p.ids.pid);
    let kind = if file_type == rustix::fs::FileType::Directory {
        FileKind::Directory { path }
    } else {
        FileKind::Path { path, flags }
    };
    let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
    let fd = p.files.insert(OpenFile::new(fd, kind), cloexec)?;
    if own_fds {
        super::procfs::refresh(p, &format!("/proc/self/fd/{fd}"));
    }
    Ok(fd as u64)
}

/// open(2).
pub fn open(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    open_path(p, path, a.u32(1), a.u32(2))
}

/// openat(2).
pub fn openat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    open_path(p, path, a.u32(2), a.u32(3))
}

/// creat(2).
pub fn creat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    let flags = (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32;
    open_path(p, path, flags, a.u32(1))
}

/// close(2).
pub fn close(p: &mut Process, a: &Args) -> SysResult {
    p.files.remove(a.fd(0))?;
    p.closed(a.fd(0));
    Ok(0)
}

// ---- metadata ----------------------------------------------------------------------------

/// Opens `path` as an `O_PATH` fd, without following a final symlink when `nofollow`,
/// for stat-like calls.
fn open_for_stat(p: &Process, path: &str, nofollow: bool) -> Result<OwnedFd, Errno> {
    let follow = if nofollow { Follow::No } else { Follow::Yes };
    Ok(p.sandbox.lookup(path, follow)?.into_fd())
}

/// The owner the app sees for a host owner: it is root in its own view, and owns what
/// its VMM's user owns (a jailed VMM runs as a uid of its own); root's files stay root's,
/// and anyone else's belong to the overflow id, as in a user namespace.
fn guest_owner(host: u32, own: u32) -> u32 {
    const OVERFLOW_ID: u32 = 65534;
    if host == own || host == 0 {
        0
    } else {
        OVERFLOW_ID
    }
}

/// The `struct stat` of `fd` as the app sees it.
fn guest_stat(fd: impl AsFd) -> Result<rustix::fs::Stat, Errno> {
    let mut stat = rustix::fs::fstat(fd)?;
    stat.st_uid = guest_owner(stat.st_uid, rustix::process::geteuid().as_raw());
    stat.st_gid = guest_owner(stat.st_gid, rustix::process::getegid().as_raw());
    Ok(stat)
}

fn write_stat(p: &mut Process, fd: impl AsFd, out: UserAddr) -> SysResult {
    let stat = guest_stat(fd)?;
    p.mem.write_pod(out, &stat)?;
    Ok(0)
}

/// fstat(2). Like pread64, it may earn the file a window.
pub fn fstat(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    write_stat(p, file.host(), a.ptr(1))?;
    offer_window(p, a.fd(0));
    Ok(0)
}

/// stat(2).
pub fn stat(p: &mut Process, a: &Args) -> SysResult {
    let fd = stat_target(p, AT_FDCWD, a.ptr(0), 0)?;
    write_stat(p, fd, a.ptr(1))
}

/// lstat(2).
pub fn lstat(p: &mut Process, a: &Args) -> SysResult {
    let fd = stat_target(p, AT_FDCWD, a.ptr(0), libc::AT_SYMLINK_NOFOLLOW as u32)?;
    write_stat(p, fd, a.ptr(1))
}

/// What a stat-like call looks at (stat, lstat and the `*at` ones): the fd an empty path
/// with AT_EMPTY_PATH refers to, or the path's own. As on Linux, a path ending in `/`
/// follows a last symlink and must name a directory (`ls -l link/` lists what it names).
fn stat_target(
    p: &mut Process,
    dirfd: i32,
    path_addr: UserAddr,
    flags: u32,
) -> Result<OwnedFd, Errno> {
    let path = p.mem.read_cstr(path_addr, PATH_MAX)?;
    if path.is_empty() {
        if flags & libc::AT_EMPTY_PATH as u32 == 0 {
            return Err(Errno::NOENT);
        }
        if dirfd == AT_FDCWD {
            return p.sandbox.open(&p.cwd, OFlags::PATH, Mode::empty());
        }
        let file = p.files.file(dirfd)?;
        return rustix::io::fcntl_dupfd_cloexec(file.host(), 0);
    }
    let slash = path.len() > 1 && path.ends_with(b"/");
    let path = at_path(p, dirfd, &pathbytes::from_guest(path))?;
    super::procfs::refresh(p, &path);
    let nofollow = flags & libc::AT_SYMLINK_NOFOLLOW as u32 != 0 && !slash;
    let fd = open_for_stat(p, &path, nofollow)?;
    if slash {
        let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if kind != rustix::fs::FileType::Directory {
            return Err(Errno::NOTDIR);
        }
    }
    Ok(fd)
}

/// newfstatat(2). Its fstat form (an empty path with exactly AT_EMPTY_PATH, which the
/// doorbell answers for a file with a window) may earn the file a window, as fstat does.
pub fn newfstatat(p: &mut Process, a: &Args) -> SysResult {
    let fd = stat_target(p, a.fd(0), a.ptr(1), a.u32(3))?;
    write_stat(p, fd, a.ptr(2))?;
    if a.u32(3) == libc::AT_EMPTY_PATH as u32
        && a.u64(3) >> 32 == 0
        && p.mem.read_pod::<u8>(a.ptr(1)) == Ok(0)
    {
        offer_window(p, a.fd(0));
    }
    Ok(0)
}

/// statx(2).
pub fn statx(p: &mut Process, a: &Args) -> SysResult {
    let fd = stat_target(p, a.fd(0), a.ptr(1), a.u32(2))?;
    let mask = rustix::fs::StatxFlags::from_bits_retain(a.u32(3));
    let mut stx = rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, mask)?;
    stx.stx_uid = guest_owner(stx.stx_uid, rustix::process::geteuid().as_raw());
    stx.stx_gid = guest_owner(stx.stx_gid, rustix::process::getegid().as_raw());
    p.mem.write_pod(a.ptr(4), &stx)?;
    Ok(0)
}

/// `struct statfs` as x86-64 Linux lays it out (120 bytes).
fn statfs_bytes(s: &rustix::fs::StatFs) -> Vec<u8> {
    let mut out = Vec::with_capacity(120);
    for v in [
        s.f_type as u64,
        s.f_bsize as u64,
        s.f_blocks,
        s.f_bfree,
        s.f_bavail,
        s.f_files,
        s.f_ffree,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&[0u8; 8]); // f_fsid
    for v in [s.f_namelen as u64, s.f_frsize as u64, s.f_flags as u64] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.resize(120, 0);
    out
}

fn write_statfs(p: &mut Process, fd: impl AsFd, out: UserAddr) -> SysResult {
    let s = rustix::fs::fstatfs(fd)?;
    p.mem.write(out, &statfs_bytes(&s))?;
    Ok(0)
}

/// statfs(2).
pub fn statfs(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    // O_PATH: opening the file itself could block (a FIFO) or have effects (a device).
    let fd = open_for_stat(p, &path, false)?;
    write_statfs(p, fd, a.ptr(1))
}

/// fstatfs(2).
pub fn fstatfs(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    write_statfs(p, file.host(), a.ptr(1))
}

fn dirent_type(file_type: rustix::fs::FileType) -> u8 {
    use rustix::fs::FileType::*;
    match file_type {
        Fifo => 1,
        CharacterDevice => 2,
        Directory => 4,
        BlockDevice => 6,
        RegularFile => 8,
        Symlink => 10,
        Socket => 12,
        Unknown => 0,
    }
}

/// getdents64(2): reads host entries and re-encodes as many as fit; the host directory
/// offset is moved back to the first entry that did not fit.
pub fn getdents64(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    if !matches!(file.kind, FileKind::Directory { .. }) {
        return Err(Errno::NOTDIR.into());
    }
    let capacity = a.usize(2).min(1 << 20);
    let mut host_buf = vec![std::mem::MaybeUninit::<u8>::uninit(); capacity.max(64)];
    let mut out: Vec<u8> = Vec::with_capacity(capacity);
    let mut resume_at: Option<u64> = None;
    let mut last_cookie: Option<u64> = None;
    {
        let mut dir = rustix::fs::RawDir::new(file.host(), &mut host_buf);
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes_with_nul();
            let reclen = (19 + name.len()).next_multiple_of(8);
            if out.len() + reclen > capacity {
                resume_at = Some(last_cookie.unwrap_or(0));
                break;
            }
            let cookie = entry.next_entry_cookie();
            out.extend_from_slice(&entry.ino().to_le_bytes());
            out.extend_from_slice(&cookie.to_le_bytes());
            out.extend_from_slice(&(reclen as u16).to_le_bytes());
            out.push(dirent_type(entry.file_type()));
            out.extend_from_slice(name);
            out.resize(out.len().next_multiple_of(8), 0);
            last_cookie = Some(cookie);
        }
    }
    if let Some(offset) = resume_at {
        if out.is_empty() {
            return Err(Errno::INVAL.into());
        }
        rustix::fs::seek(file.host(), SeekFrom::Start(offset))?;
    }
    p.mem.write(a.ptr(1), &out)?;
    Ok(out.len() as u64)
}

fn readlink_common(p: &mut Process, path: String, buf: UserAddr, size: usize) -> SysResult {
    if size == 0 || size > i32::MAX as usize {
        return Err(Errno::INVAL.into());
    }
    if let Some(target) = super::procfs::link(p, &path) {
        let bytes = crate::sandbox::pathbytes::to_host(&target);
        let len = bytes.len().min(size);
        p.mem.write(buf, &bytes[..len])?;
        return Ok(len as u64);
    }
    let target = p.sandbox.entry(&path)?.readlink()?;
    let bytes = target.as_slice();
    let len = bytes.len().min(size);
    p.mem.write(buf, &bytes[..len])?;
    Ok(len as u64)
}

/// readlink(2).
pub fn readlink(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    readlink_common(p, path, a.ptr(1), a.usize(2))
}

/// readlinkat(2).
pub fn readlinkat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    readlink_common(p, path, a.ptr(2), a.usize(3))
}

fn access_common(p: &mut Process, path: String, mode: u32, flags: u32) -> SysResult {
    let nofollow = flags & libc::AT_SYMLINK_NOFOLLOW as u32 != 0;
    let follow = if nofollow { Follow::No } else { Follow::Yes };
    // The mount the file is in, once symlinks are followed, decides.
    let node = p.sandbox.lookup(&path, follow)?;
    let writable = node.writable() && !crate::sandbox::DEVICES.contains(&path.as_str());
    if mode & libc::W_OK as u32 != 0 && !writable {
        return Err(Errno::ROFS.into());
    }
    let fd = node.into_fd();
    if mode & libc::X_OK as u32 != 0 {
        let stat = rustix::fs::fstat(&fd)?;
        if stat.st_mode & 0o111 == 0 {
            return Err(Errno::ACCESS.into());
        }
    }
    Ok(0)
}

/// access(2).
pub fn access(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    access_common(p, path, a.u32(1), 0)
}

/// faccessat(2) and faccessat2(2).
pub fn faccessat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    access_common(p, path, a.u32(2), a.u32(3))
}

// ---- fds ----------------------------------------------------------------------------------

/// close_range(2): closes the app's fds from `first` to `last`, or marks them
/// close-on-exec with CLOSE_RANGE_CLOEXEC.
pub fn close_range(p: &mut Process, a: &Args) -> SysResult {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    const CLOSE_RANGE_UNSHARE: u32 = 1 << 1;
    let (first, last, flags) = (a.u32(0), a.u32(1), a.u32(2));
    if first > last || flags & !(CLOSE_RANGE_CLOEXEC | CLOSE_RANGE_UNSHARE) != 0 {
        return Err(Errno::INVAL.into());
    }
    let targets: Vec<i32> = p
        .files
        .iter()
        .map(|(fd, _)| fd)
        .filter(|&fd| (first..=last).contains(&(fd as u32)))
        .collect();
    for fd in targets {
        if flags & CLOSE_RANGE_CLOEXEC != 0 {
            p.files.get_mut(fd)?.cloexec = true;
        } else {
            p.files.remove(fd)?;
            p.closed(fd);
        }
    }
    Ok(0)
}

/// The extended-attribute calls: the app's files have none, and the sandbox keeps none,
/// as a filesystem without xattr support answers (ENOTSUP); a bad fd or path still gives
/// its own error.
pub fn xattr(p: &mut Process, sysno: syscalls::Sysno, a: &Args) -> SysResult {
    use syscalls::Sysno;
    match sysno {
        Sysno::fgetxattr | Sysno::fsetxattr | Sysno::flistxattr | Sysno::fremovexattr => {
            p.files.file(a.fd(0))?;
        }
        _ => {
            let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
            let follow = if matches!(
                sysno,
                Sysno::lgetxattr | Sysno::lsetxattr | Sysno::llistxattr | Sysno::lremovexattr
            ) {
                Follow::No
            } else {
                Follow::Yes
            };
            p.sandbox.lookup(&path, follow)?;
        }
    }
    if matches!(
        sysno,
        Sysno::listxattr | Sysno::llistxattr | Sysno::flistxattr
    ) {
        // No attributes: an empty list.
        return Ok(0);
    }
    Err(Errno::OPNOTSUPP.into())
}

/// dup(2).
pub fn dup(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    Ok(p.files.insert(file, false)? as u64)
}

/// dup2(2).
pub fn dup2(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    if a.fd(0) == a.fd(1) {
        return Ok(a.fd(1) as u64);
    }
    p.files.insert_at(a.fd(1), file, false)?;
    Ok(a.fd(1) as u64)
}

/// dup3(2).
pub fn dup3(p: &mut Process, a: &Args) -> SysResult {
    if a.fd(0) == a.fd(1) {
        return Err(Errno::INVAL.into());
    }
    let cloexec = match a.u32(2) {
        0 => false,
        f if f == libc::O_CLOEXEC as u32 => true,
        _ => return Err(Errno::INVAL.into()),
    };
    let file = p.files.file(a.fd(0))?;
    p.files.insert_at(a.fd(1), file, cloexec)?;
    Ok(a.fd(1) as u64)
}

/// fcntl(2): F_DUPFD, F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_SETOWN and
/// F_GETOWN (remembered; no SIGIO is sent), record locks (POSIX and OFD, on the host
/// file) and memfd seals.
pub fn fcntl(p: &mut Process, a: &Args) -> SysResult {
    let fd = a.fd(0);
    match a.i32(1) {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            let file = p.files.file(fd)?;
            let cloexec = a.i32(1) == libc::F_DUPFD_CLOEXEC;
            Ok(p.files.insert_from(a.i32(2), file, cloexec)? as u64)
        }
        libc::F_GETFD => Ok(p.files.get(fd)?.cloexec as u64),
        libc::F_SETFD => {
            p.files.get_mut(fd)?.cloexec = a.u32(2) & libc::FD_CLOEXEC as u32 != 0;
            Ok(0)
        }
        libc::F_GETFL => {
            let file = p.files.file(fd)?;
            let mut flags = rustix::fs::fcntl_getfl(file.host())? - OFlags::NONBLOCK;
            if file.nonblocking() {
                flags |= OFlags::NONBLOCK;
            }
            Ok(flags.bits() as u64)
        }
        libc::F_SETFL => {
            let file = p.files.file(fd)?;
            let requested = OFlags::from_bits_retain(a.u32(2));
            file.set_nonblocking(requested.contains(OFlags::NONBLOCK));
            // The host fd's own O_NONBLOCK stays as the VMM needs it.
            let mut host = (requested & (OFlags::APPEND | OFlags::NOATIME)) - OFlags::NONBLOCK;
            if file.host_nonblocking() {
                host |= OFlags::NONBLOCK;
            }
            rustix::fs::fcntl_setfl(file.host(), host)?;
            Ok(0)
        }
        libc::F_SETOWN => {
            let file = p.files.file(fd)?;
            let owner = a.i32(2);
            let group = owner.checked_neg().unwrap_or(0);
            let known = owner == 0
                || owner == p.ids.pid
                || group == p.group().0
                || p.tree.as_ref().is_some_and(|t| {
                    t.members()
                        .iter()
                        .any(|m| m.pid == owner || (group > 0 && m.pgid == group))
                });
            if !known {
                return Err(Errno::SRCH.into());
            }
            file.state().owner = owner;
            Ok(0)
        }
        libc::F_GETOWN => Ok(p.files.file(fd)?.state().owner as i64 as u64),
        libc::F_GETLK
        | libc::F_SETLK
        | libc::F_SETLKW
        | libc::F_OFD_SETLK
        | libc::F_OFD_SETLKW
        | libc::F_OFD_GETLK => record_lock(p, fd, a.i32(1), a.ptr(2)),
        // Seals are the host memfd's (a file that is not one gives EINVAL there too).
        libc::F_ADD_SEALS => {
            let file = p.files.file(fd)?;
            let seals = rustix::fs::SealFlags::from_bits_retain(a.u32(2));
            rustix::fs::fcntl_add_seals(file.host(), seals)?;
            Ok(0)
        }
        libc::F_GET_SEALS => {
            let file = p.files.file(fd)?;
            Ok(u64::from(rustix::fs::fcntl_get_seals(file.host())?.bits()))
        }
        _ => Err(Errno::INVAL.into()),
    }
}

/// `struct flock` as x86-64 Linux lays it out, with its padding spelled out.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GuestFlock {
    l_type: i16,
    l_whence: i16,
    pad0: u32,
    l_start: i64,
    l_len: i64,
    l_pid: i32,
    pad1: u32,
}

// SAFETY: repr(C), integers only, padding explicit: every byte pattern is a valid value.
unsafe impl crate::memory::io::Pod for GuestFlock {}

impl GuestFlock {
    fn to_host(self) -> libc::flock {
        libc::flock {
            l_type: self.l_type,
            l_whence: self.l_whence,
            l_start: self.l_start,
            l_len: self.l_len,
            l_pid: self.l_pid,
        }
    }

    fn from_host(lock: &libc::flock) -> Self {
        Self {
            l_type: lock.l_type,
            l_whence: lock.l_whence,
            pad0: 0,
            l_start: lock.l_start,
            l_len: lock.l_len,
            l_pid: lock.l_pid,
            pad1: 0,
        }
    }
}

/// How often a blocked lock request looks again (the host's own wait would block the
/// vCPU thread, which a signal, a stop or a snapshot must always be able to interrupt).
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// fcntl's POSIX and open-file-description record locks, on the host file: they hold
/// against the app itself as Linux has them, and against every other app (and host
/// process) that locks the same file in a shared data directory.
fn record_lock(p: &mut Process, fd: i32, cmd: i32, arg: UserAddr) -> SysResult {
    let file = p.files.file(fd)?;
    let mut lock = p.mem.read_pod::<GuestFlock>(arg)?.to_host();
    if ![libc::F_RDLCK, libc::F_WRLCK, libc::F_UNLCK].contains(&(lock.l_type as i32))
        || ![libc::SEEK_SET, libc::SEEK_CUR, libc::SEEK_END].contains(&(lock.l_whence as i32))
    {
        return Err(Errno::INVAL.into());
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&file.host());
    let host = |cmd: i32, lock: &mut libc::flock| -> Result<(), Errno> {
        // SAFETY: fcntl with a lock command reads and writes the one `flock` we pass.
        let rc = unsafe { libc::fcntl(raw, cmd, lock as *mut libc::flock) };
        if rc < 0 {
            Err(Errno::from_raw_os_error(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ))
        } else {
            Ok(())
        }
    };
    match cmd {
        libc::F_GETLK | libc::F_OFD_GETLK => {
            host(cmd, &mut lock)?;
            // The holder is another process of the host: the app cannot know it.
            if lock.l_type as i32 != libc::F_UNLCK && cmd == libc::F_GETLK {
                lock.l_pid = 0;
            }
            p.mem.write_pod(arg, &GuestFlock::from_host(&lock))?;
            Ok(0)
        }
        libc::F_SETLK | libc::F_OFD_SETLK => Ok(host(cmd, &mut lock).map(|()| 0)?),
        _ => {
            let try_cmd = if cmd == libc::F_SETLKW {
                libc::F_SETLK
            } else {
                libc::F_OFD_SETLK
            };
            loop {
                let mut attempt = lock;
                match host(try_cmd, &mut attempt) {
                    Ok(()) => return Ok(0),
                    Err(Errno::AGAIN | Errno::ACCESS) => {}
                    Err(e) => return Err(e.into()),
                }
                let again = std::time::Instant::now() + LOCK_RETRY;
                super::wait::sleep_until(p, Some(again))?;
            }
        }
    }
}

/// flock(2), on the host file (so it holds between apps sharing a data directory too);
/// a blocking request waits as [`record_lock`] does.
pub fn flock(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    let operation = a.i32(1);
    let (kind, nonblocking) = (operation & !libc::LOCK_NB, operation & libc::LOCK_NB != 0);
    let (wait, try_now) = match kind {
        libc::LOCK_SH => (false, rustix::fs::FlockOperation::NonBlockingLockShared),
        libc::LOCK_EX => (false, rustix::fs::FlockOperation::NonBlockingLockExclusive),
        libc::LOCK_UN => (true, rustix::fs::FlockOperation::Unlock),
        _ => return Err(Errno::INVAL.into()),
    };
    loop {
        match rustix::fs::flock(file.host(), try_now) {
            Ok(()) => return Ok(0),
            Err(Errno::WOULDBLOCK) if !nonblocking && !wait => {}
            Err(e) => return Err(e.into()),
        }
        let again = std::time::Instant::now() + LOCK_RETRY;
        super::wait::sleep_until(p, Some(again))?;
    }
}

fn make_pipe(p: &mut Process, out: UserAddr, flags: u32) -> SysResult {
    if flags & !((libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_DIRECT) as u32) != 0 {
        return Err(Errno::INVAL.into());
    }
    let host_flags = rustix::pipe::PipeFlags::NONBLOCK | rustix::pipe::PipeFlags::CLOEXEC;
    let (r, w) = rustix::pipe::pipe_with(host_flags)?;
    let cloexec = flags & libc::O_CLOEXEC as u32 != 0;
    let nonblocking = flags & libc::O_NONBLOCK as u32 != 0;
    let end = |fd, write_end| OpenFile::with_mode(fd, FileKind::Pipe { write_end }, nonblocking);
    let rfd = p.files.insert(end(r, false), cloexec)?;
    let wfd = match p.files.insert(end(w, true), cloexec) {
        Ok(fd) => fd,
        Err(e) => {
            p.files.remove(rfd)?;
            return Err(e.into());
        }
    };
    if let Err(e) = p.mem.write_pod(out, &[rfd, wfd]) {
        p.files.remove(rfd)?;
        p.files.remove(wfd)?;
        return Err(e.into());
    }
    Ok(0)
}

/// pipe(2).
pub fn pipe(p: &mut Process, a: &Args) -> SysResult {
    make_pipe(p, a.ptr(0), 0)
}

/// pipe2(2).
pub fn pipe2(p: &mut Process, a: &Args) -> SysResult {
    make_pipe(p, a.ptr(0), a.u32(1))
}

// ---- working directory -------------------------------------------------------------------

/// getcwd(2).
pub fn getcwd(p: &mut Process, a: &Args) -> SysResult {
    let mut bytes = pathbytes::to_host(&p.cwd).into_owned();
    bytes.push(0);
    if bytes.len() > a.usize(1) {
        return Err(Errno::RANGE.into());
    }
    p.mem.write(a.ptr(0), &bytes)?;
    Ok(bytes.len() as u64)
}

fn enter_directory(p: &mut Process, path: String) -> SysResult {
    // The directory's real path, symlinks resolved, as getcwd reports it on Linux.
    let opened = p
        .sandbox
        .open_resolved(&path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
    p.cwd = opened.path;
    if let Some(tree) = &p.tree {
        // Other processes' /proc/<pid>/cwd.
        tree.describe_paths(p.ids.pid, &p.exe, &p.cwd);
    }
    Ok(0)
}

/// chdir(2).
pub fn chdir(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    enter_directory(p, path)
}

/// fchdir(2).
pub fn fchdir(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    match &file.kind {
        FileKind::Directory { path } => enter_directory(p, path.clone()),
        _ => Err(Errno::NOTDIR.into()),
    }
}

// ---- ioctl ---------------------------------------------------------------------------------

const TCGETS: u32 = 0x5401;
const TIOCGWINSZ: u32 = 0x5413;
const TIOCGPGRP: u32 = 0x540f;
const FIONREAD: u32 = 0x541b;
const FIONBIO: u32 = 0x5421;
const FIONCLEX: u32 = 0x5450;
const FIOCLEX: u32 = 0x5451;
const FIOASYNC: u32 = 0x5452;

/// The kernel's `struct termios` (36 bytes) from the host's.
fn termios_bytes(t: &rustix::termios::Termios) -> Vec<u8> {
    let mut out = Vec::with_capacity(36);
    for flags in [
        t.input_modes.bits(),
        t.output_modes.bits(),
        t.control_modes.bits(),
        t.local_modes.bits(),
    ] {
        out.extend_from_slice(&flags.to_le_bytes());
    }
    out.push(0); // c_line
    use rustix::termios::SpecialCodeIndex as I;
    // The kernel's c_cc order on x86-64.
    let order = [
        I::VINTR,
        I::VQUIT,
        I::VERASE,
        I::VKILL,
        I::VEOF,
        I::VTIME,
        I::VMIN,
        I::VSWTC,
        I::VSTART,
        I::VSTOP,
        I::VSUSP,
        I::VEOL,
        I::VREPRINT,
        I::VDISCARD,
        I::VWERASE,
        I::VLNEXT,
        I::VEOL2,
    ];
    let mut cc = [0u8; 19];
    for (slot, index) in cc.iter_mut().zip(order) {
        *slot = t.special_codes[index];
    }
    out.extend_from_slice(&cc);
    out
}

/// ioctl(2): terminal queries are answered for stdio that is a terminal (ENOTTY
/// otherwise), plus FIONBIO, FIONREAD, FIOCLEX, FIONCLEX and FIOASYNC.
pub fn ioctl(p: &mut Process, a: &Args) -> SysResult {
    let fd = a.fd(0);
    let file = p.files.file(fd)?;
    let is_tty = matches!(file.kind, FileKind::Stdio(_)) && rustix::termios::isatty(file.host());
    let generic = [FIONBIO, FIONREAD, FIOCLEX, FIONCLEX, FIOASYNC];
    if matches!(file.kind, FileKind::Pty { .. }) && !generic.contains(&a.u32(1)) {
        return super::pty::ioctl(p, &file, a);
    }
    if matches!(file.kind, FileKind::Socket { .. } | FileKind::Netlink) {
        if let Some(answer) = super::netlink::interface_ioctl(p, a.u32(1), a.ptr(2)) {
            return answer;
        }
    }
    match a.u32(1) {
        TCGETS if is_tty => {
            let termios = rustix::termios::tcgetattr(file.host())?;
            p.mem.write(a.ptr(2), &termios_bytes(&termios))?;
            Ok(0)
        }
        TIOCGWINSZ if is_tty => {
            let size = rustix::termios::tcgetwinsize(file.host())?;
            p.mem.write_pod(
                a.ptr(2),
                &[size.ws_row, size.ws_col, size.ws_xpixel, size.ws_ypixel],
            )?;
            Ok(0)
        }
        TIOCGPGRP if is_tty => {
            p.mem.write_pod(a.ptr(2), &p.ids.pid)?;
            Ok(0)
        }
        FIONBIO => {
            let on: i32 = p.mem.read_pod(a.ptr(2))?;
            file.set_nonblocking(on != 0);
            Ok(0)
        }
        FIONREAD => {
            let n = rustix::io::ioctl_fionread(file.host())?;
            p.mem.write_pod(a.ptr(2), &(n as i32))?;
            Ok(0)
        }
        FIOCLEX | FIONCLEX => {
            p.files.get_mut(fd)?.cloexec = a.u32(1) == FIOCLEX;
            Ok(0)
        }
        FIOASYNC => {
            // Accepted, as nginx's master asks it of its channels to its workers, but no
            // SIGIO is ever sent: the apps that ask also poll.
            let _: i32 = p.mem.read_pod(a.ptr(2))?;
            Ok(0)
        }
        _ => Err(Errno::NOTTY.into()),
    }
}

// ---- changing the tree (writable mounts only) ----------------------------------------

fn mkdir_common(p: &mut Process, path: String, mode: u32) -> SysResult {
    p.sandbox.entry(&path)?.mkdir(mode & !p.umask)?;
    Ok(0)
}

/// mkdir(2).
pub fn mkdir(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    mkdir_common(p, path, a.u32(1))
}

/// mkdirat(2).
pub fn mkdirat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    mkdir_common(p, path, a.u32(2))
}

fn unlink_common(p: &mut Process, path: String, flags: AtFlags) -> SysResult {
    p.sandbox.entry(&path)?.unlink(flags)?;
    Ok(0)
}

/// unlink(2).
pub fn unlink(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    unlink_common(p, path, AtFlags::empty())
}

/// rmdir(2).
pub fn rmdir(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    unlink_common(p, path, AtFlags::REMOVEDIR)
}

/// unlinkat(2).
pub fn unlinkat(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    let flags = AtFlags::from_bits_retain(a.u32(2)) & AtFlags::REMOVEDIR;
    unlink_common(p, path, flags)
}

fn rename_common(p: &mut Process, from: String, to: String) -> SysResult {
    let source = p.sandbox.entry(&from)?;
    source.rename_to(&p.sandbox.entry(&to)?)?;
    Ok(0)
}

/// link(2) and linkat(2). With AT_SYMLINK_FOLLOW a final symlink of the old path is
/// followed (inside its mount) first.
pub fn link(p: &mut Process, sysno: syscalls::Sysno, a: &Args) -> SysResult {
    let (from, to, flags) = if sysno == syscalls::Sysno::link {
        (
            at_path_arg(p, AT_FDCWD, a.ptr(0))?,
            at_path_arg(p, AT_FDCWD, a.ptr(1))?,
            0,
        )
    } else {
        (
            at_path_arg(p, a.fd(0), a.ptr(1))?,
            at_path_arg(p, a.fd(2), a.ptr(3))?,
            a.u32(4),
        )
    };
    if flags & !(libc::AT_SYMLINK_FOLLOW as u32) != 0 {
        return Err(Errno::INVAL.into());
    }
    let (source, target) = (p.sandbox.entry(&from)?, p.sandbox.entry(&to)?);
    if flags & libc::AT_SYMLINK_FOLLOW as u32 != 0 {
        let real = p.sandbox.lookup(&from, Follow::Yes)?;
        if real.kind() == rustix::fs::FileType::Directory {
            return Err(Errno::PERM.into());
        }
        source.link_followed_to(&real, &target)?;
    } else {
        source.link_to(&target)?;
    }
    Ok(0)
}

/// symlink(2) and symlinkat(2).
pub fn symlink(p: &mut Process, sysno: syscalls::Sysno, a: &Args) -> SysResult {
    let target = p.mem.read_cstr(a.ptr(0), PATH_MAX)?;
    if target.is_empty() {
        return Err(Errno::NOENT.into());
    }
    let path = if sysno == syscalls::Sysno::symlink {
        at_path_arg(p, AT_FDCWD, a.ptr(1))?
    } else {
        at_path_arg(p, a.fd(1), a.ptr(2))?
    };
    p.sandbox.entry(&path)?.symlink(&target)?;
    Ok(0)
}

/// rename(2).
pub fn rename(p: &mut Process, a: &Args) -> SysResult {
    let from = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    let to = at_path_arg(p, AT_FDCWD, a.ptr(1))?;
    rename_common(p, from, to)
}

/// renameat(2) and renameat2(2) (flags other than none are refused).
pub fn renameat(p: &mut Process, a: &Args) -> SysResult {
    if a.u32(4) != 0 {
        return Err(Errno::INVAL.into());
    }
    let from = at_path_arg(p, a.fd(0), a.ptr(1))?;
    let to = at_path_arg(p, a.fd(2), a.ptr(3))?;
    rename_common(p, from, to)
}

/// ftruncate(2): the fd must have been opened for writing, which the sandbox only allows
/// in writable mounts.
pub fn ftruncate(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    rustix::fs::ftruncate(file.host(), offset_arg(a.u64(1))?)?;
    Ok(0)
}

/// truncate(2): the file the path names, opened for writing (so a read-only mount says
/// EROFS, and a directory EISDIR, as Linux does).
pub fn truncate(p: &mut Process, a: &Args) -> SysResult {
    let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
    let length = offset_arg(a.u64(1))?;
    let fd = p.sandbox.open(&path, OFlags::WRONLY, Mode::empty())?;
    rustix::fs::ftruncate(&fd, length)?;
    Ok(0)
}

/// fallocate(2), by the host on the app's file (which decides what modes it supports).
pub fn fallocate(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    let mode = rustix::fs::FallocateFlags::from_bits(a.u32(1)).ok_or(Errno::OPNOTSUPP)?;
    rustix::fs::fallocate(
        file.host(),
        mode,
        offset_arg(a.u64(2))?,
        offset_arg(a.u64(3))?,
    )?;
    Ok(0)
}

/// fsync(2) and fdatasync(2).
pub fn fsync(p: &mut Process, a: &Args) -> SysResult {
    let file = p.files.file(a.fd(0))?;
    match rustix::fs::fsync(file.host()) {
        Err(Errno::INVAL) | Ok(()) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// fadvise64(2): a hint that needs no action.
pub fn fd_hint(p: &mut Process, a: &Args) -> SysResult {
    p.files.get(a.fd(0))?;
    Ok(0)
}

/// umask(2).
pub fn umask(p: &mut Process, a: &Args) -> SysResult {
    let old = p.umask;
    p.umask = a.u32(0) & 0o777;
    Ok(old as u64)
}

/// The node an fd's file is, for calls on an fd (fchmod, fchown, futimens): its
/// mount's writability comes from the path it was opened by; devices and the app's own
/// pipes and sockets have none.
fn fd_node(p: &Process, fd: i32) -> Result<Node, Errno> {
    let file = p.files.file(fd)?;
    let writable = file.path().is_some_and(|path| p.sandbox.is_writable(path));
    Node::from_fd(rustix::io::fcntl_dupfd_cloexec(file.host(), 0)?, writable)
}

/// fchmod(2).
pub fn fchmod(p: &mut Process, a: &Args) -> SysResult {
    fd_node(p, a.fd(0))?.chmod(a.u32(1))?;
    Ok(0)
}

/// chmod(2) and fchmodat(2) (which has no flags: it always follows a final symlink).
pub fn chmod(p: &mut Process, sysno: syscalls::Sysno, a: &Args) -> SysResult {
    let (path, mode) = if sysno == syscalls::Sysno::chmod {
        (at_path_arg(p, AT_FDCWD, a.ptr(0))?, a.u32(1))
    } else {
        (at_path_arg(p, a.fd(0), a.ptr(1))?, a.u32(2))
    };
    p.sandbox.lookup(&path, Follow::Yes)?.chmod(mode)?;
    Ok(0)
}

/// A uid or gid argument: -1 is "unchanged".
fn owner_arg(raw: u32) -> Option<u32> {
    (raw != u32::MAX).then_some(raw)
}

/// chown(2), lchown(2), fchown(2) and fchownat(2), as an unprivileged owner may.
pub fn chown(p: &mut Process, sysno: syscalls::Sysno, a: &Args) -> SysResult {
    use syscalls::Sysno;
    let (node, uid, gid) = match sysno {
        Sysno::fchown => (fd_node(p, a.fd(0))?, a.u32(1), a.u32(2)),
        Sysno::chown | Sysno::lchown => {
            let path = at_path_arg(p, AT_FDCWD, a.ptr(0))?;
            let follow = if sysno == Sysno::lchown {
                Follow::No
            } else {
                Follow::Yes
            };
            (p.sandbox.lookup(&path, follow)?, a.u32(1), a.u32(2))
        }
        _ => {
            let flags = a.u32(4);
            let follow = if flags & libc::AT_SYMLINK_NOFOLLOW as u32 != 0 {
                Follow::No
            } else {
                Follow::Yes
            };
            let node = if p.mem.read_cstr(a.ptr(1), PATH_MAX)?.is_empty()
                && flags & libc::AT_EMPTY_PATH as u32 != 0
            {
                fd_node(p, a.fd(0))?
            } else {
                let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
                p.sandbox.lookup(&path, follow)?
            };
            (node, a.u32(2), a.u32(3))
        }
    };
    node.chown(owner_arg(uid), owner_arg(gid))?;
    Ok(0)
}

/// The times utimensat(2) asks for: now for both when the pointer is NULL.
fn times_arg(p: &mut Process, addr: UserAddr) -> Result<rustix::fs::Timestamps, Errno> {
    let now = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_NOW,
    };
    if addr.is_null() {
        return Ok(rustix::fs::Timestamps {
            last_access: now,
            last_modification: now,
        });
    }
    let [atime, mtime]: [libc::timespec; 2] = p.mem.read_pod(addr)?;
    let timespec = |t: libc::timespec| rustix::fs::Timespec {
        tv_sec: t.tv_sec,
        tv_nsec: t.tv_nsec as _,
    };
    Ok(rustix::fs::Timestamps {
        last_access: timespec(atime),
        last_modification: timespec(mtime),
    })
}

/// utimensat(2), and futimens(3) (a NULL path: the fd itself).
pub fn utimensat(p: &mut Process, a: &Args) -> SysResult {
    let times = times_arg(p, a.ptr(2))?;
    let flags = a.u32(3);
    if a.ptr(1).is_null() {
        fd_node(p, a.fd(0))?.set_times(&times)?;
        return Ok(0);
    }
    let path = at_path_arg(p, a.fd(0), a.ptr(1))?;
    if flags & libc::AT_SYMLINK_NOFOLLOW as u32 != 0 {
        p.sandbox.entry(&path)?.set_times_nofollow(&times)?;
    } else {
        p.sandbox.lookup(&path, Follow::Yes)?.set_times(&times)?;
    }
    Ok(0)
}

/// Installs the VMM's stdin, stdout and stderr as the app's fds 0, 1 and 2.
pub fn install_stdio(p: &mut Process) -> Result<(), Errno> {
    let streams: [(u8, std::os::fd::BorrowedFd<'static>); 3] = [
        (0, rustix::stdio::stdin()),
        (1, rustix::stdio::stdout()),
        (2, rustix::stdio::stderr()),
    ];
    for (n, host) in streams {
        let fd = rustix::io::fcntl_dupfd_cloexec(host, 3)?;
        p.files
            .insert_at(n as i32, OpenFile::new(fd, FileKind::Stdio(n)), false)?;
    }
    Ok(())
}

// ---- anonymous files, and copies between fds -----------------------------------------

const MFD_CLOEXEC: u32 = 0x1;
const MFD_ALLOW_SEALING: u32 = 0x2;
const MFD_HUGETLB: u32 = 0x4;
const MFD_NOEXEC_SEAL: u32 = 0x8;
const MFD_EXEC: u32 = 0x10;
/// Linux's limit on a memfd's name, without its NUL.
const MEMFD_NAME_MAX: usize = 249;

/// memfd_create(2): an anonymous file, backed by a host memfd the VMM owns (so reads,
/// writes, ftruncate, seals and fstat are the host's). Huge pages are not offered (EINVAL,
/// as on a kernel without hugetlbfs).
pub fn memfd_create(p: &mut Process, a: &Args) -> SysResult {
    let flags = a.u32(1);
    if flags & !(MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL | MFD_EXEC) != 0
        || flags & MFD_HUGETLB != 0
        || flags & (MFD_NOEXEC_SEAL | MFD_EXEC) == MFD_NOEXEC_SEAL | MFD_EXEC
    {
        return Err(Errno::INVAL.into());
    }
    let name = match p.mem.read_cstr(a.ptr(0), MEMFD_NAME_MAX) {
        Err(Errno::NAMETOOLONG) => return Err(Errno::INVAL.into()),
        other => other?,
    };
    let mut host_flags = rustix::fs::MemfdFlags::CLOEXEC;
    if flags & (MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL) != 0 {
        host_flags |= rustix::fs::MemfdFlags::ALLOW_SEALING;
    }
    // The host name is the VMM's; the app's is kept for snapshots and `ps`.
    let fd = rustix::fs::memfd_create("picocenter-app", host_flags)?;
    if flags & MFD_NOEXEC_SEAL != 0 {
        // Nothing is ever executed from an app's file descriptor on the host; the seal
        // the app asked for is what it can see.
        const F_SEAL_EXEC: u32 = 0x20;
        rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::from_bits_retain(F_SEAL_EXEC))
            .or_else(|e| if e == Errno::INVAL { Ok(()) } else { Err(e) })?;
    }
    let file = OpenFile::new(
        fd,
        FileKind::Memfd {
            name: pathbytes::from_guest(name),
        },
    );
    Ok(p.files.insert(file, flags & MFD_CLOEXEC != 0)? as u64)
}

/// An optional `loff_t *` argument, read.
fn offset_pointer(p: &mut Process, addr: UserAddr) -> Result<Option<u64>, Errno> {
    if addr.is_null() {
        return Ok(None);
    }
    let offset: i64 = p.mem.read_pod(addr)?;
    u64::try_from(offset).map(Some).map_err(|_| Errno::INVAL)
}

/// Writes an updated offset back where the app's pointer said.
fn write_offset(p: &mut Process, addr: UserAddr, offset: Option<u64>) -> Result<(), Errno> {
    match offset {
        Some(offset) => p.mem.write_pod(addr, &offset),
        None => Ok(()),
    }
}

/// copy_file_range(2): the host copies between the two files the app's fds name, so what
/// either may do (read access, write access, regular files only) is what the host allows
/// those descriptors.
pub fn copy_file_range(p: &mut Process, a: &Args) -> SysResult {
    if a.u32(5) != 0 {
        return Err(Errno::INVAL.into());
    }
    let input = p.files.file(a.fd(0))?;
    let output = p.files.file(a.fd(2))?;
    let mut off_in = offset_pointer(p, a.ptr(1))?;
    let mut off_out = offset_pointer(p, a.ptr(3))?;
    let copied = rustix::fs::copy_file_range(
        input.host(),
        off_in.as_mut(),
        output.host(),
        off_out.as_mut(),
        a.usize(4).min(MAX_IO),
    )?;
    write_offset(p, a.ptr(1), off_in)?;
    write_offset(p, a.ptr(3), off_out)?;
    Ok(copied as u64)
}

/// Whether `file` has something to read now (or never will block a read).
fn readable_now(file: &OpenFile) -> bool {
    let mut fds = [rustix::event::PollFd::new(&file.fd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&zero)).map_or(true, |n| n > 0)
}

/// splice(2) and tee(2), by the host between the host objects behind the app's fds (one
/// of them a pipe, as Linux requires). The host never blocks: a call the app lets block
/// waits for the side that holds it up (its input to have data, else its output to have
/// room) and goes again.
fn move_between_pipes(p: &mut Process, a: &Args, tee: bool) -> SysResult {
    let (in_fd, out_fd, len, raw_flags) = if tee {
        (a.fd(0), a.fd(1), a.usize(2), a.u32(3))
    } else {
        (a.fd(0), a.fd(2), a.usize(4), a.u32(5))
    };
    let flags = rustix::pipe::SpliceFlags::from_bits(raw_flags).ok_or(Errno::INVAL)?;
    let input = p.files.file(in_fd)?;
    let output = p.files.file(out_fd)?;
    let nonblocking = flags.contains(rustix::pipe::SpliceFlags::NONBLOCK)
        || input.nonblocking()
        || output.nonblocking();
    let (mut off_in, mut off_out) = if tee {
        (None, None)
    } else {
        (offset_pointer(p, a.ptr(1))?, offset_pointer(p, a.ptr(3))?)
    };
    let host_flags = flags | rustix::pipe::SpliceFlags::NONBLOCK;
    let len = len.min(MAX_IO);
    let moved = loop {
        let attempt = if tee {
            rustix::pipe::tee(input.host(), output.host(), len, host_flags)
        } else {
            rustix::pipe::splice(
                input.host(),
                off_in.as_mut(),
                output.host(),
                off_out.as_mut(),
                len,
                host_flags,
            )
        };
        match attempt {
            Err(Errno::AGAIN) if !nonblocking => {
                if readable_now(&input) {
                    super::wait::wait_fd(p, output.host(), PollFlags::OUT, None)?;
                } else {
                    super::wait::wait_fd(p, input.host(), PollFlags::IN, None)?;
                }
            }
            Err(Errno::PIPE) => {
                p.signals.raise(libc::SIGPIPE);
                return Err(Errno::PIPE.into());
            }
            other => break other?,
        }
    };
    if !tee {
        write_offset(p, a.ptr(1), off_in)?;
        write_offset(p, a.ptr(3), off_out)?;
    }
    Ok(moved as u64)
}

/// splice(2).
pub fn splice(p: &mut Process, a: &Args) -> SysResult {
    move_between_pipes(p, a, false)
}

/// tee(2).
pub fn tee(p: &mut Process, a: &Args) -> SysResult {
    move_between_pipes(p, a, true)
}

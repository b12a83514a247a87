//! The app's view of /proc as a directory tree: what `ls /proc`, `opendir("/proc/self/fd")`,
//! `stat("/proc/self")` and `readlink("/proc/self")` see. The VMM keeps it in a small
//! tmpfs of its jail ([`VIEW_ROOT`], one directory per VMM process, named by its host
//! pid), mounted read-only at the guest's /proc; it holds directories, symlinks and empty
//! files only. What a file holds is generated when it is opened (`crate::syscalls::procfs`
//! fills the tree and answers the opens); the app can change nothing here.
//!
//! Everything is made relative to directory fds, with names the VMM makes up (numbers and
//! fixed names): nothing the app says becomes a host path. A symlink's target may be the
//! app's (a cwd, a file's path), but the sandbox resolves targets inside the guest's tree.

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

/// Where the jail mounts the tmpfs of /proc views (see `crate::sandbox::jail`).
pub use crate::sandbox::PROC_VIEWS as VIEW_ROOT;

/// Where each VMM publishes what the app's other processes read of it in /proc (its maps
/// and fd/), a file per VMM named by its host pid, under [`VIEW_ROOT`]: in no app's /proc
/// (each sees its own directory of views, not their root).
const DESCRIBED: &str = "described";

/// Publishes `bytes` as this VMM process's description (see [`DESCRIBED`]), whole: a
/// reader sees the last one or this one, never a part.
pub fn publish_description(bytes: &[u8]) -> std::io::Result<()> {
    if !crate::sandbox::jail::proc_views_mounted() {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    let dir = std::path::Path::new(VIEW_ROOT).join(DESCRIBED);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let owner = std::process::id();
    let next = dir.join(format!("{owner}.new"));
    let written = std::fs::write(&next, bytes)
        .and_then(|()| std::fs::rename(&next, dir.join(owner.to_string())));
    if written.is_err() {
        let _ = std::fs::remove_file(&next);
    }
    written
}

/// Removes this VMM process's description, as it ends.
pub fn forget_description() {
    let path = std::path::Path::new(VIEW_ROOT)
        .join(DESCRIBED)
        .join(std::process::id().to_string());
    let _ = std::fs::remove_file(path);
}

/// The description VMM process `host_pid` last published (at most `limit` bytes).
pub fn read_description(host_pid: i32, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let path = std::path::Path::new(VIEW_ROOT)
        .join(DESCRIBED)
        .join(host_pid.to_string());
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(bytes)
}

/// One VMM process's /proc view.
#[derive(Debug)]
pub struct ProcView {
    /// Its directory.
    dir: OwnedFd,
    /// Its host path (the sandbox's /proc mount).
    pub path: PathBuf,
    /// The host pid it was made for: a forked VMM makes its own.
    pub owner: u32,
    /// Whether the process's own directory has its fixed entries.
    pub own_made: std::cell::Cell<bool>,
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// Opens directory `name` in `dir`, never through a symlink.
fn open_dir(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)
}

/// Removes `name` from `dir`, and everything in it if it is a directory.
fn remove_tree(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(io(e)),
    }
    let sub = match open_dir(dir, name) {
        Ok(sub) => sub,
        // Another process of the app removed it first.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries(sub.as_fd())? {
        remove_tree(sub.as_fd(), &entry)?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// The names in directory `dir` (without `.` and `..`).
fn entries(dir: BorrowedFd<'_>) -> std::io::Result<Vec<String>> {
    let listing = rustix::fs::Dir::read_from(dir).map_err(io)?;
    let mut names = Vec::new();
    for entry in listing {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    Ok(names)
}

impl ProcView {
    /// Makes this VMM process's view under [`VIEW_ROOT`], first removing those of VMM
    /// processes that have ended (the tmpfs is the jail's, shared by an app's processes).
    /// `None` when there is no such tmpfs (a VMM outside a jail).
    pub fn create() -> std::io::Result<Option<Self>> {
        if !crate::sandbox::jail::proc_views_mounted() {
            return Ok(None);
        }
        let root = match rustix::fs::open(
            VIEW_ROOT,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(root) => root,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let owner = std::process::id();
        if let Ok(described) = open_dir(root.as_fd(), DESCRIBED) {
            for name in entries(described.as_fd())? {
                let pid = name.trim_end_matches(".new");
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = rustix::fs::unlinkat(&described, name.as_str(), AtFlags::empty());
                }
            }
        }
        for name in entries(root.as_fd())?
            .into_iter()
            .filter(|name| name != DESCRIBED)
        {
            // The host's /proc says which have ended (the jail mounts it for the VMM;
            // kill(pid, 0) is not among the calls its seccomp filter allows).
            let ended = name.parse::<u32>().map_or(true, |pid| {
                pid == owner || !std::path::Path::new(&format!("/proc/{pid}")).exists()
            });
            if ended {
                if let Err(e) = remove_tree(root.as_fd(), &name) {
                    tracing::debug!(name, "the /proc view of an ended process stays: {e}");
                }
            }
        }
        let name = owner.to_string();
        rustix::fs::mkdirat(&root, name.as_str(), Mode::from_raw_mode(0o755)).map_err(io)?;
        let dir = open_dir(root.as_fd(), &name)?;
        Ok(Some(Self {
            dir,
            path: PathBuf::from(VIEW_ROOT).join(name),
            owner,
            own_made: std::cell::Cell::new(false),
        }))
    }

    /// The directory at `path` (names separated by `/`, each made if missing).
    pub fn dir(&self, path: &str) -> std::io::Result<OwnedFd> {
        let mut dir = rustix::io::fcntl_dupfd_cloexec(&self.dir, 0).map_err(io)?;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io(e)),
            }
            dir = open_dir(dir.as_fd(), name)?;
        }
        Ok(dir)
    }

    /// Makes empty file `name` in `dir` if it is missing.
    pub fn file(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
        match rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(_) | Err(Errno::EXIST) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Makes `name` in `dir` a symlink to guest path `target`, unless it already is one.
    pub fn link(dir: BorrowedFd<'_>, name: &str, target: &str) -> std::io::Result<()> {
        let target = crate::sandbox::pathbytes::to_host(target);
        if let Ok(now) = rustix::fs::readlinkat(dir, name, Vec::new()) {
            if now.as_bytes() == &target[..] {
                return Ok(());
            }
        }
        remove_tree(dir, name)?;
        rustix::fs::symlinkat(&target[..], dir, name).map_err(io)
    }

    /// Removes `name` (and what it holds) from `dir`, if it is there.
    pub fn remove(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<()> {
        remove_tree(dir, name)
    }

    /// Leaves exactly `keep` among the names of `dir` that `ours` picks (the others are
    /// left alone), removing the rest.
    pub fn prune(
        dir: BorrowedFd<'_>,
        ours: impl Fn(&str) -> bool,
        keep: &[String],
    ) -> std::io::Result<()> {
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        for name in entries(dir)? {
            if ours(&name) && !keep.contains(name.as_str()) {
                remove_tree(dir, &name)?;
            }
        }
        Ok(())
    }
}

//! The app's file namespace: a read-only root plus writable directories, and nothing else.
//! This module is the only way from a path the app names to a host file.
//!
//! Every path is made absolute against the working directory, normalised lexically,
//! matched to the longest mount prefix, and opened inside that mount with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`. A path with a symlink on it is first
//! resolved in the guest's own tree, one component at a time, each opened inside its
//! mount with symlinks refused ([`Sandbox::canonical`]): an absolute target starts again
//! at the guest's root (and may lead into another mount), `..` goes up in the guest's
//! tree and stops at its root, `/proc/self/root`-style magic links are refused. What a
//! call then acts on is an fd, never a name the host would resolve again:
//!
//! * [`Sandbox::open`] opens the file itself;
//! * [`Sandbox::lookup`] gives a [`Node`], the file as an `O_PATH` fd (following a final
//!   symlink inside the mount, or not), for stat, chmod, chown, times and AF_UNIX connect;
//! * [`Sandbox::entry`] gives an [`Entry`], the parent directory as an fd plus the final
//!   name, for calls that act on the name and never follow it: mkdir, unlink, rename,
//!   readlink, AF_UNIX bind.
//!
//! So no path, symlink (absolute, relative, or planted by an image, a data directory or a
//! snapshot) or race can reach a host file outside the mounts. The root mount is
//! read-only: any call that would change it fails with EROFS. Writable mounts (the app's
//! data directories) allow changes, but never set-id bits, and host device nodes cannot
//! be changed through any mount.

pub mod binder;
pub mod jail;
pub mod lease;
pub mod loopback6;
mod node;
pub mod pathbytes;
pub mod rtnetlink;
pub mod seccomp;
pub mod supervise;

pub use node::{Entry, Node, SETTABLE_MODE};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where a jail mounts the small tmpfs that holds its VMMs' views of the app's /proc
/// (`crate::kernel::procview`).
pub const PROC_VIEWS: &str = "/picocenter-proc";

/// Why a mount could not be set up (operator error, reported before the app starts).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The host directory could not be opened.
    #[error("opening {path} as a mount for {guest}")]
    OpenHostDir {
        /// Host path.
        path: PathBuf,
        /// Guest path.
        guest: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest path is not absolute.
    #[error("mount point {0:?} must be an absolute path")]
    RelativeMountPoint(String),
}

/// One host directory visible at a guest path.
#[derive(Debug)]
struct Mount {
    guest: String,
    host: OwnedFd,
    host_path: PathBuf,
    writable: bool,
}

/// A resolved path: which mount, and the path inside it.
#[derive(Debug)]
struct Resolved<'a> {
    mount: &'a Mount,
    /// The path relative to the mount (never empty: "." for the mount itself).
    relative: String,
}

/// A file [`Sandbox::open_resolved`] opened.
#[derive(Debug)]
pub struct Opened {
    /// The open file.
    pub fd: OwnedFd,
    /// Its path once the symlinks on the way are resolved.
    pub path: String,
    /// Its type, which every open but an O_PATH one has already looked at.
    pub kind: Option<rustix::fs::FileType>,
}

/// Whether a call follows a symlink in the final component of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Follow it (inside the mount), as stat, chmod and connect do.
    Yes,
    /// Act on the link itself, as lstat and `AT_SYMLINK_NOFOLLOW` do.
    No,
}

/// How one resolution inside a mount treats symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Symlinks {
    /// Refused (ELOOP), so that the caller resolves them in the guest's namespace first,
    /// where an absolute target starts at the guest's root and may lead into another
    /// mount (see [`Sandbox::canonical`]). A final symlink opened with O_PATH|O_NOFOLLOW
    /// is still the link itself.
    Refused,
    /// Resolved inside the mount: for a path already made symlink-free, where one can only
    /// appear by a race, which then stays confined to the mount.
    InMount,
}

/// statfs's f_type of procfs.
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// How many symlinks one path may lead through (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: usize = 40;

/// How many components one resolution may go through, symlinks' included: far more than
/// any real path, and a bound on the work a hostile tree of links can ask for.
const MAX_STEPS: usize = 4096;

/// How many of the innermost directories a resolution keeps open, to go on from.
const KEPT_DIRECTORIES: usize = 16;

fn open_in(
    root: &OwnedFd,
    relative: &str,
    flags: OFlags,
    mode: Mode,
    symlinks: Symlinks,
) -> Result<OwnedFd, Errno> {
    let resolve = match symlinks {
        Symlinks::Refused => ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
        Symlinks::InMount => ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    };
    // openat2 fails with EAGAIN when a rename or a mount anywhere on the host raced with
    // its resolution of `..` (it cannot then vouch for staying inside the root), and asks
    // to be called again: on a busy host (other apps' jails mounting), that happens.
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(
            root.as_fd(),
            pathbytes::to_host(relative).as_ref(),
            flags,
            mode,
            resolve,
        ) {
            Err(Errno::AGAIN) if attempts < 128 => attempts += 1,
            other => return other,
        }
    }
}

/// open(2) with O_CREAT in a writable mount: a file it creates gets exactly `mode` (the
/// app's umask already applied), not `mode` narrowed again by the VMM's own umask.
fn create_in(
    root: &OwnedFd,
    relative: &str,
    flags: OFlags,
    mode: Mode,
    symlinks: Symlinks,
) -> Result<OwnedFd, Errno> {
    let existing = flags & !(OFlags::CREATE | OFlags::EXCL);
    if !flags.contains(OFlags::EXCL) {
        match open_in(root, relative, existing, Mode::empty(), symlinks) {
            Err(Errno::NOENT) => {}
            other => return other,
        }
    }
    match open_in(root, relative, flags | OFlags::EXCL, mode, symlinks) {
        Ok(fd) => {
            rustix::fs::fchmod(&fd, mode)?;
            Ok(fd)
        }
        // Made meanwhile, or a dangling symlink (which O_CREAT creates the target of).
        Err(Errno::EXIST) if !flags.contains(OFlags::EXCL) => {
            open_in(root, relative, flags, mode, symlinks)
        }
        Err(e) => Err(e),
    }
}

/// The files that say how many CPUs there are, as the app sees them: as many as it may
/// have vCPUs (`cpus`), as `sched_getaffinity` says. glibc's `get_nprocs` reads the first;
/// many runtimes read /proc/cpuinfo.
fn cpu_view(path: &str, cpus: usize) -> Option<Vec<u8>> {
    let cpus = cpus.max(1);
    match path {
        "/sys/devices/system/cpu/online"
        | "/sys/devices/system/cpu/possible"
        | "/sys/devices/system/cpu/present" => Some(match cpus {
            1 => b"0\n".to_vec(),
            n => format!("0-{}\n", n - 1).into_bytes(),
        }),
        "/proc/cpuinfo" => {
            // The host's first processor, which is what the app's CPUID shows, once per
            // vCPU.
            let host = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let first = host.split("\n\n").next().unwrap_or("processor\t: 0");
            let mut out = String::new();
            for cpu in 0..cpus {
                for line in first.lines() {
                    let key = line.split(':').next().unwrap_or("").trim();
                    let line = match key {
                        "processor" | "core id" | "apicid" | "initial apicid" => {
                            format!("{key}\t: {cpu}")
                        }
                        "siblings" | "cpu cores" => format!("{key}\t: {cpus}"),
                        "physical id" => format!("{key}\t: 0"),
                        _ => line.to_string(),
                    };
                    out.push_str(&line);
                    out.push('\n');
                }
                out.push('\n');
            }
            Some(out.into_bytes())
        }
        _ => None,
    }
}

/// A read-only, sealed in-memory file holding `content`.
pub(crate) fn sealed_file(name: &str, content: &[u8]) -> Result<OwnedFd, Errno> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut written = 0;
    while written < content.len() {
        written += rustix::io::write(&fd, &content[written..])?;
    }
    rustix::fs::fcntl_add_seals(
        &fd,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    rustix::fs::seek(&fd, rustix::fs::SeekFrom::Start(0))?;
    Ok(fd)
}

/// Where glibc keeps POSIX shared memory and named semaphores: writable in every app, and
/// its own (the CLI backs it with a fresh directory each run, as Linux's tmpfs is).
pub const SHARED_MEMORY_DIR: &str = "/dev/shm";

/// The host devices every app sees at the same path, whatever its root holds: they hold no
/// state and reach nothing outside the app. They can be opened, never changed.
pub(crate) const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Joins `path` to `cwd` (when relative) and normalises `.`, `..` and repeated slashes.
/// `..` at the top stays at the top, as the kernel does at `/`.
pub fn normalize(cwd: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{cwd}/{path}")
    };
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The mount table of one app.
#[derive(Debug)]
pub struct Sandbox {
    /// Longest guest prefix first.
    mounts: Vec<Mount>,
    /// How many CPUs the app sees (its vCPU limit).
    cpus: usize,
}

impl Sandbox {
    /// A sandbox whose read-only root is the host directory `root`.
    pub fn new(root: &Path) -> Result<Self, SandboxError> {
        let mut sandbox = Self {
            mounts: Vec::new(),
            cpus: 1,
        };
        sandbox.mount("/", root, false)?;
        Ok(sandbox)
    }

    /// Says how many CPUs the app sees: in /proc/cpuinfo, /sys's CPU lists and
    /// `sched_getaffinity`.
    pub fn set_cpus(&mut self, cpus: usize) {
        self.cpus = cpus.max(1);
    }

    /// How many CPUs the app sees.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// Makes host directory `host` visible at guest path `guest`.
    pub fn mount(&mut self, guest: &str, host: &Path, writable: bool) -> Result<(), SandboxError> {
        if !guest.starts_with('/') {
            return Err(SandboxError::RelativeMountPoint(guest.to_string()));
        }
        let guest = normalize("/", guest);
        let fd = rustix::fs::open(
            host,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SandboxError::OpenHostDir {
            path: host.to_path_buf(),
            guest: guest.clone(),
            source: e.into(),
        })?;
        self.mounts.retain(|m| m.guest != guest);
        self.mounts.push(Mount {
            guest,
            host: fd,
            host_path: host.to_path_buf(),
            writable,
        });
        self.mounts
            .sort_by_key(|m| std::cmp::Reverse(m.guest.len()));
        Ok(())
    }

    /// Removes the mount at guest path `guest`, if there is one.
    pub fn unmount(&mut self, guest: &str) {
        self.mounts.retain(|m| m.guest != guest);
    }

    /// The host directory behind each mount, as (guest path, host path, writable).
    pub fn mounts(&self) -> impl Iterator<Item = (&str, &Path, bool)> {
        self.mounts
            .iter()
            .map(|m| (m.guest.as_str(), m.host_path.as_path(), m.writable))
    }

    /// Resolves an absolute, normalised guest path to its mount.
    fn resolve(&self, path: &str) -> Resolved<'_> {
        for mount in &self.mounts {
            let rest = if mount.guest == "/" {
                Some(path.trim_start_matches('/'))
            } else {
                path.strip_prefix(mount.guest.as_str())
                    .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                    .map(|rest| rest.trim_start_matches('/'))
            };
            if let Some(rest) = rest {
                let relative = if rest.is_empty() { "." } else { rest };
                return Resolved {
                    mount,
                    relative: relative.to_string(),
                };
            }
        }
        unreachable!("the root mount matches every absolute path")
    }

    /// Whether `path` (absolute, normalised) is a directory on the way to a mount.
    fn leads_to_a_mount(&self, path: &str) -> bool {
        self.mounts.iter().any(|m| {
            m.guest
                .strip_prefix(path)
                .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Whether `path` (absolute, normalised) lies in a writable mount.
    pub fn is_writable(&self, path: &str) -> bool {
        !DEVICES.contains(&path) && self.resolve(path).mount.writable
    }

    /// Whether what `path` names can never change while the app runs: it is in a
    /// read-only mount, which no app writes. (A device is never such a file.)
    pub fn is_immutable(&self, path: &str) -> bool {
        !DEVICES.contains(&path) && !self.resolve(path).mount.writable
    }

    /// The path `path` (absolute, normalised) names with no symlink on the way, each
    /// resolved in the guest's namespace as Linux does: an absolute target starts again
    /// at the guest's root (and may lead into another mount), `..` in a target goes up
    /// in the guest's tree. The final component is followed when `follow_last`. Every
    /// step opens one component, from the directory before it (or from its mount's top
    /// where a mount begins), with symlinks refused, so nothing here can reach outside
    /// the mounts. ENOENT for a missing directory on the way; a missing final component
    /// is kept (the caller may be creating it). The work is bounded: at most
    /// [`MAX_SYMLINKS`] links and [`MAX_STEPS`] components in all (ELOOP beyond).
    fn canonical(&self, path: &str, follow_last: bool) -> Result<String, Errno> {
        // The components resolved so far, each with the O_PATH fd of the directory it
        // names while it is one of the last few (deeper trees reopen from the mount).
        let mut done: Vec<(String, Option<OwnedFd>)> = Vec::new();
        let mut todo: std::collections::VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect();
        let mut links = 0;
        let mut steps = 0;
        let joined = |done: &[(String, Option<OwnedFd>)]| -> String {
            let mut out = String::new();
            for (name, _) in done {
                out.push('/');
                out.push_str(name);
            }
            if out.is_empty() {
                out.push('/');
            }
            out
        };
        while let Some(component) = todo.pop_front() {
            steps += 1;
            if steps > MAX_STEPS {
                return Err(Errno::LOOP);
            }
            if component == ".." {
                done.pop();
                continue;
            }
            if todo.is_empty() && !follow_last {
                done.push((component, None));
                break;
            }
            let parent = joined(&done);
            let candidate = normalize(&parent, &component);
            let resolved = self.resolve(&candidate);
            let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            // From the parent's fd when it is in the same mount (one component, no
            // symlink followed); else from the mount's top.
            let from_parent = match done.last() {
                Some((_, Some(dir)))
                    if self.resolve(&parent).mount.guest == resolved.mount.guest =>
                {
                    Some(dir)
                }
                _ => None,
            };
            let opened = match from_parent {
                Some(dir) => open_in(dir, &component, flags, Mode::empty(), Symlinks::Refused),
                None => open_in(
                    &resolved.mount.host,
                    &resolved.relative,
                    flags,
                    Mode::empty(),
                    Symlinks::Refused,
                ),
            };
            let fd = match opened {
                Ok(fd) => fd,
                Err(Errno::NOENT) if todo.is_empty() => {
                    done.push((component, None));
                    break;
                }
                // A directory on the way to a mount (a program's own directory, deep in
                // a writable one): the mount shows it, whatever is under it.
                Err(Errno::NOENT) if self.leads_to_a_mount(&candidate) => {
                    done.push((component, None));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode)
                != rustix::fs::FileType::Symlink
            {
                // Keep the fds of the last few levels only.
                if done.len() >= KEPT_DIRECTORIES {
                    let old = done.len() - KEPT_DIRECTORIES;
                    done[old].1 = None;
                }
                done.push((component, Some(fd)));
                continue;
            }
            links += 1;
            // procfs links are magic (they name objects, not paths): refused, as
            // RESOLVE_NO_MAGICLINKS refuses them.
            if links > MAX_SYMLINKS || rustix::fs::fstatfs(&fd)?.f_type == PROC_SUPER_MAGIC {
                return Err(Errno::LOOP);
            }
            let target = rustix::fs::readlinkat(&fd, "", Vec::new())?;
            let target = pathbytes::from_guest(target.into_bytes());
            if target.starts_with('/') {
                done.clear();
            }
            for part in target.split('/').rev() {
                if !part.is_empty() && part != "." {
                    todo.push_front(part.to_string());
                }
            }
        }
        Ok(joined(&done))
    }

    /// The file `path` (absolute, normalised) names, as an `O_PATH` fd.
    pub fn lookup(&self, path: &str, follow: Follow) -> Result<Node, Errno> {
        match self.lookup_once(path, follow, Symlinks::Refused) {
            Err(Errno::LOOP) => {
                let canonical = self.canonical(path, follow == Follow::Yes)?;
                self.lookup_once(&canonical, follow, Symlinks::InMount)
            }
            other => other,
        }
    }

    fn lookup_once(&self, path: &str, follow: Follow, symlinks: Symlinks) -> Result<Node, Errno> {
        let mut flags = OFlags::PATH | OFlags::CLOEXEC;
        if follow == Follow::No {
            flags |= OFlags::NOFOLLOW;
        }
        if let Some(device) = DEVICES.iter().find(|d| **d == path) {
            return Node::new(rustix::fs::open(*device, flags, Mode::empty())?, false);
        }
        let resolved = self.resolve(path);
        let fd = open_in(
            &resolved.mount.host,
            &resolved.relative,
            flags,
            Mode::empty(),
            symlinks,
        )?;
        Node::new(fd, resolved.mount.writable)
    }

    /// The name `path` (absolute, normalised) ends in, in its parent directory, for calls
    /// that act on the name itself. A mount's own top has no such entry (EBUSY, as for a
    /// mount point), and neither has a host device (EPERM).
    pub fn entry(&self, path: &str) -> Result<Entry, Errno> {
        match self.entry_once(path, Symlinks::Refused) {
            Err(Errno::LOOP) => {
                let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
                let parent = self.canonical(if parent.is_empty() { "/" } else { parent }, true)?;
                self.entry_once(&normalize(&parent, name), Symlinks::InMount)
            }
            other => other,
        }
    }

    fn entry_once(&self, path: &str, symlinks: Symlinks) -> Result<Entry, Errno> {
        if DEVICES.contains(&path) {
            return Err(Errno::PERM);
        }
        let resolved = self.resolve(path);
        let (parent, name) = match resolved.relative.rsplit_once('/') {
            Some((parent, name)) => (parent, name),
            None => (".", resolved.relative.as_str()),
        };
        if name == "." || name == ".." {
            return Err(Errno::BUSY);
        }
        let dir = open_in(
            &resolved.mount.host,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            symlinks,
        )?;
        Ok(Entry::new(
            dir,
            name,
            resolved.mount.writable,
            &resolved.mount.guest,
        ))
    }

    /// Opens an absolute, normalised guest path. Flags that could change the file (write
    /// access, O_CREAT of a missing file, O_TRUNC) need a writable mount; a new file's
    /// `mode` loses its set-id bits.
    pub fn open(&self, path: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        self.open_resolved(path, flags, mode)
            .map(|opened| opened.fd)
    }

    /// [`Sandbox::open`], with the path it opened once the symlinks on the way are
    /// resolved (what an open file is known by: its mount decides what may be done to
    /// it). A path with a symlink on it, or one in a read-only mount (a symlink there may
    /// lead into a writable one), is resolved first when the plain open cannot do.
    pub fn open_resolved(&self, path: &str, flags: OFlags, mode: Mode) -> Result<Opened, Errno> {
        let (path, (fd, kind)) = match self.open_once(path, flags, mode, Symlinks::Refused) {
            Err(first @ (Errno::LOOP | Errno::ROFS)) => {
                let canonical = self.canonical(path, !flags.contains(OFlags::NOFOLLOW))?;
                if first == Errno::ROFS && canonical == path {
                    return Err(first);
                }
                let opened = self.open_once(&canonical, flags, mode, Symlinks::InMount)?;
                (canonical, opened)
            }
            other => (path.to_string(), other?),
        };
        Ok(Opened { fd, path, kind })
    }

    /// One open of `path`. Files are opened non-blocking on the host, so that a FIFO
    /// (which an image or a data directory may hold) cannot hold the VMM until a peer
    /// comes: a FIFO is refused (ENXIO, as Linux says to a non-blocking writer without
    /// a reader); for every other file the flag changes nothing the app sees (F_GETFL
    /// reports the app's own).
    fn open_once(
        &self,
        path: &str,
        flags: OFlags,
        mode: Mode,
        symlinks: Symlinks,
    ) -> Result<(OwnedFd, Option<rustix::fs::FileType>), Errno> {
        if flags.contains(OFlags::PATH) {
            return Ok((self.open_file(path, flags, mode, symlinks)?, None));
        }
        let fd = self.open_file(path, flags | OFlags::NONBLOCK, mode, symlinks)?;
        let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
        if kind == rustix::fs::FileType::Fifo {
            return Err(Errno::NXIO);
        }
        Ok((fd, Some(kind)))
    }

    fn open_file(
        &self,
        path: &str,
        flags: OFlags,
        mode: Mode,
        symlinks: Symlinks,
    ) -> Result<OwnedFd, Errno> {
        if let Some(content) = cpu_view(path, self.cpus) {
            if flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::CREATE) {
                return Err(Errno::ROFS);
            }
            return sealed_file(path, &content);
        }
        if let Some(device) = DEVICES.iter().find(|d| **d == path) {
            let flags =
                flags & (OFlags::ACCMODE | OFlags::NONBLOCK | OFlags::PATH) | OFlags::CLOEXEC;
            return rustix::fs::open(*device, flags, Mode::empty());
        }
        let resolved = self.resolve(path);
        let writes = flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC);
        // openat2 rejects flags O_PATH ignores, and a mode without O_CREAT or O_TMPFILE.
        let flags = if flags.contains(OFlags::PATH) {
            flags & (OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW) | OFlags::CLOEXEC
        } else {
            flags | OFlags::CLOEXEC | OFlags::NOCTTY
        };
        let mode = if flags.contains(OFlags::CREATE) || flags.contains(OFlags::TMPFILE) {
            Mode::from_bits_truncate(mode.bits() & SETTABLE_MODE)
        } else {
            Mode::empty()
        };
        if resolved.mount.writable && flags.contains(OFlags::CREATE) {
            return create_in(
                &resolved.mount.host,
                &resolved.relative,
                flags,
                mode,
                symlinks,
            );
        }
        if !resolved.mount.writable {
            if writes {
                return Err(Errno::ROFS);
            }
            if flags.contains(OFlags::CREATE) {
                // Opening an existing file with O_CREAT is fine; creating one is not.
                let existing = flags & !(OFlags::CREATE | OFlags::EXCL);
                return match open_in(
                    &resolved.mount.host,
                    &resolved.relative,
                    existing,
                    mode,
                    symlinks,
                ) {
                    Err(Errno::NOENT) => Err(Errno::ROFS),
                    Ok(_) if flags.contains(OFlags::EXCL) => Err(Errno::EXIST),
                    other => other,
                };
            }
        }
        open_in(
            &resolved.mount.host,
            &resolved.relative,
            flags,
            mode,
            symlinks,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_handles_dots_and_relative_paths() {
        assert_eq!(normalize("/", "../../etc/hostname"), "/etc/hostname");
        assert_eq!(normalize("/usr/lib", "../bin//./x"), "/usr/bin/x");
        assert_eq!(normalize("/a", "/b/c/.."), "/b");
        assert_eq!(normalize("/", "."), "/");
    }

    #[test]
    fn longest_mount_wins_and_prefixes_respect_components() {
        let root = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/tmp", data.path(), true).unwrap();
        assert_eq!(sandbox.resolve("/tmp/x").relative, "x");
        assert!(sandbox.resolve("/tmp").mount.writable);
        assert!(!sandbox.resolve("/tmpfoo").mount.writable);
        assert_eq!(sandbox.resolve("/").relative, ".");
    }

    #[test]
    fn the_harmless_devices_exist_in_every_root() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(root.path()).unwrap();
        let null = sandbox
            .open("/dev/null", OFlags::RDWR, Mode::empty())
            .unwrap();
        assert_eq!(rustix::io::write(&null, b"gone").unwrap(), 4);
        assert!(sandbox
            .open("/dev/sda", OFlags::RDONLY, Mode::empty())
            .is_err());
    }

    #[test]
    fn magic_links_are_refused_even_in_a_root_that_has_them() {
        let sandbox = Sandbox::new(Path::new("/")).unwrap();
        assert_eq!(
            sandbox
                .open(
                    "/proc/self/root/etc/hostname",
                    OFlags::RDONLY,
                    Mode::empty()
                )
                .unwrap_err(),
            Errno::LOOP
        );
    }

    #[test]
    fn symlinks_cannot_escape_and_root_is_read_only() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("inside"), b"ok").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("loop", root.path().join("loop")).unwrap();
        let sandbox = Sandbox::new(root.path()).unwrap();
        // An absolute symlink resolves inside the root, where /etc/hostname does not exist.
        assert_eq!(
            sandbox
                .open("/abs", OFlags::RDONLY, Mode::empty())
                .unwrap_err(),
            Errno::NOENT
        );
        assert_eq!(
            sandbox
                .open("/loop", OFlags::RDONLY, Mode::empty())
                .unwrap_err(),
            Errno::LOOP
        );
        assert_eq!(
            sandbox
                .open("/inside", OFlags::WRONLY, Mode::empty())
                .unwrap_err(),
            Errno::ROFS
        );
        assert!(sandbox
            .open("/inside", OFlags::RDONLY, Mode::empty())
            .is_ok());
    }

    #[test]
    fn symlinks_resolve_in_the_guests_tree_across_mounts_and_never_outside() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/guest-file"), b"guest").unwrap();
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("real")).unwrap();
        std::fs::write(data.path().join("real/f"), b"data").unwrap();
        let link = |target: &str, name: &str| {
            std::os::unix::fs::symlink(target, data.path().join(name)).unwrap()
        };
        // Into the same mount by its guest path, up and out of it, and as far up as `..`
        // goes (the guest's root, never the host's).
        link("/data/real", "abs");
        link("../etc", "up");
        link("../../../../../../../etc", "far-up");
        link("/etc/hostname", "host-name");
        // The root's own absolute link into the writable mount.
        std::os::unix::fs::symlink("/data/real", root.path().join("into-data")).unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/data", data.path(), true).unwrap();
        let read = |path: &str| -> Result<Vec<u8>, Errno> {
            let fd = sandbox.open(path, OFlags::RDONLY, Mode::empty())?;
            let mut buf = [0u8; 16];
            let n = rustix::io::read(&fd, &mut buf)?;
            Ok(buf[..n].to_vec())
        };
        assert_eq!(read("/data/abs/f").unwrap(), b"data");
        assert_eq!(read("/into-data/f").unwrap(), b"data");
        assert_eq!(read("/data/up/guest-file").unwrap(), b"guest");
        assert_eq!(read("/data/far-up/guest-file").unwrap(), b"guest");
        assert_eq!(read("/data/host-name").unwrap_err(), Errno::NOENT);
        // Creating through a link makes the file where the link leads, in the mount.
        drop(
            sandbox
                .open(
                    "/data/abs/new",
                    OFlags::WRONLY | OFlags::CREATE,
                    Mode::from(0o640),
                )
                .unwrap(),
        );
        assert!(data.path().join("real/new").exists());
        // Through a link into the read-only root: still read-only.
        assert_eq!(
            sandbox
                .open("/data/up/guest-file", OFlags::WRONLY, Mode::empty())
                .unwrap_err(),
            Errno::ROFS
        );
        // An entry's parent is followed; its own name is not.
        sandbox
            .entry("/data/abs/new")
            .unwrap()
            .unlink(rustix::fs::AtFlags::empty())
            .unwrap();
        assert!(!data.path().join("real/new").exists());
        assert!(sandbox.entry("/data/abs").is_ok());
        assert_eq!(
            sandbox.lookup("/data/abs", Follow::No).unwrap().kind(),
            rustix::fs::FileType::Symlink
        );
    }

    /// A mount deep in a writable one (a program's own directory under /tmp) is reached
    /// through a link too, as /proc/self/exe leads to it; its neighbours are not there.
    #[test]
    fn a_link_reaches_a_mount_deep_in_another() {
        let root = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let program = tempfile::tempdir().unwrap();
        std::fs::write(program.path().join("prog"), b"program").unwrap();
        std::os::unix::fs::symlink("/tmp/a/b/prog", tmp.path().join("exe")).unwrap();
        std::os::unix::fs::symlink("/tmp/a/other", tmp.path().join("beside")).unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/tmp", tmp.path(), true).unwrap();
        sandbox.mount("/tmp/a/b", program.path(), false).unwrap();
        let fd = sandbox
            .open("/tmp/exe", OFlags::RDONLY, Mode::empty())
            .unwrap();
        let mut buf = [0u8; 16];
        let n = rustix::io::read(&fd, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"program");
        assert_eq!(
            sandbox
                .open("/tmp/beside", OFlags::RDONLY, Mode::empty())
                .unwrap_err(),
            Errno::NOENT
        );
    }

    #[test]
    fn writes_through_a_root_symlink_reach_the_writable_mount_and_keep_its_path() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/data", root.path().join("lnk")).unwrap();
        let data = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", data.path().join("up")).unwrap();
        std::fs::write(root.path().join("in-root"), b"root").unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/data", data.path(), true).unwrap();
        let path = sandbox
            .open_resolved("/lnk/f", OFlags::WRONLY | OFlags::CREATE, Mode::from(0o644))
            .unwrap()
            .path;
        assert_eq!(path, "/data/f");
        assert!(data.path().join("f").exists());
        // A root file reached through the writable mount is known by its root path.
        let path = sandbox
            .open_resolved("/data/up/in-root", OFlags::RDONLY, Mode::empty())
            .unwrap()
            .path;
        assert_eq!(path, "/in-root");
        assert!(!sandbox.is_writable(&path));
        assert_eq!(
            sandbox
                .open("/data/up/in-root", OFlags::WRONLY, Mode::empty())
                .unwrap_err(),
            Errno::ROFS
        );
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let data = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            data.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from(0o644),
            0,
        )
        .unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/d", data.path(), true).unwrap();
        for flags in [OFlags::RDONLY, OFlags::WRONLY, OFlags::RDWR] {
            assert_eq!(
                sandbox.open("/d/fifo", flags, Mode::empty()).unwrap_err(),
                Errno::NXIO
            );
        }
    }

    #[test]
    fn a_hostile_tree_of_links_costs_little() {
        // Links whose targets walk down and up a deep tree thousands of times.
        let data = tempfile::tempdir().unwrap();
        let mut deep = data.path().to_path_buf();
        for _ in 0..200 {
            deep.push("a");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let down_up = "a/../".repeat(800);
        for i in 0..39 {
            std::os::unix::fs::symlink(
                format!("{down_up}l{}", i + 1),
                data.path().join(format!("l{i}")),
            )
            .unwrap();
        }
        std::fs::create_dir(data.path().join("l39")).unwrap();
        let sandbox = Sandbox::new(data.path()).unwrap();
        let started = std::time::Instant::now();
        let result = sandbox.lookup("/l0", Follow::Yes);
        assert!(matches!(result, Ok(_) | Err(Errno::LOOP)), "{result:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn a_final_symlink_resolves_inside_the_guest_for_every_kind_of_call() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, b"host").unwrap();
        let data = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&secret, data.path().join("link")).unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::new(root.path()).unwrap();
        sandbox.mount("/data", data.path(), true).unwrap();
        // Followed: inside the mount, where the host path does not exist.
        assert_eq!(
            sandbox.lookup("/data/link", Follow::Yes).unwrap_err(),
            Errno::NOENT
        );
        // Not followed: the link itself, which is the app's own.
        let link = sandbox.lookup("/data/link", Follow::No).unwrap();
        assert_eq!(link.kind(), rustix::fs::FileType::Symlink);
        assert_eq!(link.chmod(0o777).unwrap_err(), Errno::OPNOTSUPP);
        // An entry names the link, and removing it leaves the target alone.
        sandbox
            .entry("/data/link")
            .unwrap()
            .unlink(rustix::fs::AtFlags::empty())
            .unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"host");
        assert_eq!(sandbox.entry("/data").unwrap_err(), Errno::BUSY);
    }
}

//! execve and execveat: a new program in the same process. Everything that can fail for
//! a reason the caller can act on (no such file, no execute bit, not an executable,
//! arguments too long) is checked first and reported as an errno; past that point the
//! old program is gone, and a failure to load the new one kills the process, as on
//! Linux. The run loop then starts the new program's registers (see
//! [`super::SysError::Exec`]).

use super::{Args, SysError, SysResult};
use crate::kernel::process::Process;
use crate::kernel::thread::ThreadState;
use crate::memory::layout::FIRST_CPU;
use crate::memory::UserAddr;
use rustix::io::Errno;

/// Most argv plus envp entries.
const MAX_STRINGS: usize = 0x7fff_ffff / 8;
/// Most bytes of argv plus envp strings (Linux: a quarter of the 8 MiB stack limit).
const MAX_STRING_BYTES: usize = 2 << 20;
/// Longest path.
const PATH_MAX: usize = 4096;
const AT_EMPTY_PATH: i32 = 0x1000;
const AT_SYMLINK_NOFOLLOW: i32 = 0x100;

/// A NULL-terminated array of strings in app memory, within the running `budget`.
fn read_strings(p: &mut Process, at: UserAddr, budget: &mut usize) -> Result<Vec<String>, Errno> {
    let mut strings = Vec::new();
    if at.is_null() {
        return Ok(strings);
    }
    for index in 0..MAX_STRINGS {
        let offset = (index as u64).checked_mul(8).ok_or(Errno::TOOBIG)?;
        let pointer: u64 = p
            .mem
            .read_pod(UserAddr(at.0.checked_add(offset).ok_or(Errno::FAULT)?))?;
        if pointer == 0 {
            return Ok(strings);
        }
        let bytes = p
            .mem
            .read_cstr(UserAddr(pointer), (*budget).min(PATH_MAX * 32))?;
        // Each string costs its bytes, its NUL and its pointer, as Linux counts them.
        *budget = budget
            .checked_sub(bytes.len() + 1 + 8)
            .ok_or(Errno::TOOBIG)?;
        strings.push(crate::sandbox::pathbytes::from_guest(bytes));
    }
    Err(Errno::TOOBIG)
}

/// execve(2).
pub fn execve(p: &mut Process, a: &Args) -> SysResult {
    exec(p, libc::AT_FDCWD, a.ptr(0), a.ptr(1), a.ptr(2), 0)
}

/// execveat(2).
pub fn execveat(p: &mut Process, a: &Args) -> SysResult {
    exec(p, a.i32(0), a.ptr(1), a.ptr(2), a.ptr(3), a.i32(4))
}

/// The guest path execve names: `path` against `dirfd` (AT_EMPTY_PATH: `dirfd` itself).
fn program_path(p: &mut Process, dirfd: i32, path: &str, flags: i32) -> Result<String, Errno> {
    if path.is_empty() {
        if flags & AT_EMPTY_PATH == 0 {
            return Err(Errno::NOENT);
        }
        let file = p.files.file(dirfd)?;
        return file.path().map(str::to_string).ok_or(Errno::NOENT);
    }
    if path.starts_with('/') || dirfd == libc::AT_FDCWD {
        return Ok(p.absolute(path));
    }
    let file = p.files.file(dirfd)?;
    let dir = file.path().ok_or(Errno::NOTDIR)?;
    Ok(crate::sandbox::normalize(dir, path))
}

fn exec(
    p: &mut Process,
    dirfd: i32,
    path_at: UserAddr,
    argv_at: UserAddr,
    envp_at: UserAddr,
    flags: i32,
) -> SysResult {
    if flags & !(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 {
        return Err(Errno::INVAL.into());
    }
    let raw = p.mem.read_cstr(path_at, PATH_MAX)?;
    let name = crate::sandbox::pathbytes::from_guest(raw);
    let path = program_path(p, dirfd, &name, flags)?;
    // /proc/self/exe (how busybox runs its applets) leads to the program through /proc.
    super::procfs::refresh(p, &path);
    // What /proc/self/exe will name: the program itself, links resolved, as on Linux
    // (its own path would make that link point at itself).
    let real = p
        .sandbox
        .open_resolved(&path, rustix::fs::OFlags::PATH, rustix::fs::Mode::empty())
        .map_or_else(|_| path.clone(), |opened| opened.path);
    let mut budget = MAX_STRING_BYTES;
    let argv = read_strings(p, argv_at, &mut budget)?;
    let envp = read_strings(p, envp_at, &mut budget)?;
    crate::loader::check(&p.sandbox, &path, &argv).map_err(|e| e.errno())?;
    tracing::debug!(path, "execve");

    // The point of no return: the old program goes.
    let ranges: Vec<(u64, u64)> = p.mem.vmas().iter().map(|v| (v.start, v.end)).collect();
    for (start, end) in ranges {
        p.mem.unmap(start, end - start)?;
    }
    let closing: Vec<i32> = p
        .files
        .iter()
        .filter(|(_, entry)| entry.cloexec)
        .map(|(fd, _)| fd)
        .collect();
    for fd in closing {
        let _ = p.files.remove(fd);
    }
    for action in p.signals.actions.iter_mut() {
        if action.handler != crate::kernel::signals::SIG_IGN {
            *action = Default::default();
        }
    }
    p.signals.altstack = (0, libc::SS_DISABLE, 0);
    p.publish_no_stop_signal();
    p.credentials.on_exec();
    // The other threads end; the caller becomes the main thread.
    p.threads.parked.clear();
    p.threads.slicer = None;
    p.thread = ThreadState::new(p.ids.pid);
    p.thread.fs_base_changed = true;
    crate::kernel::clock::publish_tid(p.mem.phys(), FIRST_CPU, p.thread.tid);
    // A vfork parent waits for this.
    p.vfork_done = None;
    let hwcap = std::arch::x86_64::__cpuid(1).edx as u64;
    let info = crate::loader::ExecInfo {
        argv: &argv,
        envp: &envp,
        path: &path,
        hwcap,
        credentials: &p.credentials,
    };
    let loaded = crate::loader::load(&mut p.mem, &p.sandbox, &info);
    p.exe = real;
    p.run_as = path.clone();
    p.cmdline = argv.clone();
    p.describe_in_tree();
    match loaded {
        Ok(start) => Err(SysError::Exec(Box::new(start))),
        Err(e) => Err(SysError::Kill {
            signal: libc::SIGKILL,
            reason: format!("execve of {path} failed past its point of no return: {e}"),
        }),
    }
}

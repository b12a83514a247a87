//! The root of an app run from a host program (`picocenter run PROGRAM`, and the restore
//! of its snapshots with `--root-from`): the program, its shared-library closure and a
//! few /etc files.
//!
//! A root is built once and kept in `<state>/roots/<key>/root` (0700 above it), keyed by
//! the program's path and the app's writable directories, with a manifest of every host
//! file it was made from and every directory searched for its libraries, and their
//! fingerprint as an image's host files have one (device, inode, mode, size, modification
//! time). The next run of the same program checks that none of
//! those changed (a `stat` each) and uses it: no closure to find, no tree to build, none
//! to remove after. A root whose files changed is built again. An app keeps a shared lock
//! on its root's `lock` file while it runs; a root is replaced or removed (the least
//! recently used first, past [`KEPT_MAX`]) only under an exclusive one.

use super::run::backing_dir;
use anyhow::{bail, Context};
use picocenter_snapshots::names::validate_guest_dir;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The most roots kept; past it, the least recently used that no app uses are removed.
pub const KEPT_MAX: usize = 64;

/// The manifest's format; a root of another is built again.
const FORMAT: u32 = 3;

/// The directory in a root that holds a program hidden by a writable directory, mounted
/// over that directory's own path.
const HOLDER: &str = ".picocenter-program";

/// A root, kept or built for one run, for a host program.
pub(super) struct ProgramRoot {
    /// The root directory: the guest's `/`.
    pub dir: PathBuf,
    /// The program's path inside the guest: its own host path.
    pub program: String,
    /// Read-only mounts the root needs besides itself: (guest directory, host directory).
    pub mounts: Vec<(String, PathBuf)>,
    /// The program, when its directory is one of the app's writable directories: (that
    /// guest directory, the host file). It is copied into the directory's backing
    /// directory ([`ProgramRoot::copy_program`]), which a mount of it would hide.
    pub program_in_writable: Option<(String, PathBuf)>,
    /// A root built for this run alone (the state directory could not keep one), to be
    /// removed when the app ends.
    pub temporary: Option<tempfile::TempDir>,
    /// The shared lock on a kept root, held while the app runs (through the jail: an open
    /// fd), so that no other run removes the root under it.
    _in_use: Option<std::fs::File>,
}

/// What a kept root was made from, and what it holds besides its tree.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// The program's path as given (made absolute).
    program: String,
    /// Its canonical path.
    real: PathBuf,
    /// Read-only mounts: (guest directory, host directory, relative when in the root).
    mounts: Vec<(String, PathBuf)>,
    program_in_writable: Option<(String, PathBuf)>,
    /// Every host file the root was made from, and every directory searched for its
    /// libraries.
    files: Vec<PathBuf>,
    /// Their fingerprint when it was made (`picocenter_images::fingerprint`'s, as an
    /// image's host files have).
    fingerprint: String,
}

/// The fingerprint of `files` as they are now.
fn fingerprint(files: &[PathBuf]) -> String {
    picocenter_images::fingerprint::host_files_fingerprint(files.iter().map(PathBuf::as_path))
}

/// The root for host program `program` run with `writable` directories: the kept one
/// when nothing it was made from changed, else one built now (and kept, where the state
/// directory allows).
pub(super) fn program_root(
    state_dir: &Path,
    program: &Path,
    writable: &[String],
) -> anyhow::Result<ProgramRoot> {
    let given = std::path::absolute(program)
        .with_context(|| format!("cannot find program {}", program.display()))?;
    let real = std::fs::canonicalize(&given)
        .with_context(|| format!("cannot find program {}", program.display()))?;
    let roots = state_dir.join("roots");
    let kept = roots.join(key(&given, writable));
    if let Some(root) = reuse(&kept, &given, &real) {
        tracing::debug!(root = %kept.display(), "the program's root, kept from an earlier run");
        return Ok(root);
    }
    // Private to its owner: a root holds hard links to host files (and copies of them,
    // across file systems), set-id programs among them, which no other user may reach
    // through it. The jail shows an app its root alone.
    let build = match picocenter_vmm::control::private_dir(&roots).and_then(|()| {
        tempfile::Builder::new()
            .prefix(".build-")
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir_in(&roots)
    }) {
        Ok(build) => build,
        Err(e) => {
            tracing::debug!("{}: {e}; a temporary root for this run", roots.display());
            return temporary_root(&given, &real, writable);
        }
    };
    let root = build.path().join("root");
    std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    let (manifest, settled) = build_root(&root, &given, &real, writable)?;
    let lock = match seal(build.path(), &manifest) {
        Ok(lock) => lock,
        Err(e) => {
            // A path that is not UTF-8, a full disk: the root serves this run alone.
            tracing::debug!("{e:#}: the program's root serves this run only");
            return Ok(ProgramRoot::new(manifest, root, Some(build), None));
        }
    };
    // Kept only when nothing changed while it was built (a file replaced between its
    // link and its stat would leave an old copy under a new identity), and when the root
    // it replaces, if any, is out of use: a kept root changes only under its exclusive
    // lock. Otherwise it serves this run alone; the next run builds it again.
    let place = if !settled {
        Err("a file it was made from changed while it was built, or just before")
    } else if !make_way(&roots, &kept) {
        Err("the root it replaces is in use")
    } else {
        std::fs::rename(build.path(), &kept).map_err(|_| "another run kept its own meanwhile")
    };
    let (dir, temporary) = match place {
        Ok(()) => {
            let _ = build.keep();
            tracing::debug!(root = %kept.display(), "the program's root, built and kept");
            (kept.join("root"), None)
        }
        Err(why) => {
            tracing::debug!("the program's root serves this run only: {why}");
            (root, Some(build))
        }
    };
    remove_unused(&roots);
    Ok(ProgramRoot::new(manifest, dir, temporary, Some(lock)))
}

/// Writes the manifest and the lock file of the root built in `build`, and returns the
/// lock, taken shared (read-only: nothing is ever written to it).
fn seal(build: &Path, manifest: &Manifest) -> anyhow::Result<std::fs::File> {
    let text = serde_json::to_vec(manifest).context("the root's manifest")?;
    std::fs::write(build.join("manifest.json"), text).context("writing the root's manifest")?;
    let lock_path = build.join("lock");
    std::fs::write(&lock_path, b"").with_context(|| format!("creating {}", lock_path.display()))?;
    let lock = std::fs::File::open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    rustix::fs::flock(&lock, FlockOperation::NonBlockingLockShared)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    Ok(lock)
}

/// Whether `kept` is free for a new root: nothing there, or a root no app uses, removed.
fn make_way(roots: &Path, kept: &Path) -> bool {
    match std::fs::symlink_metadata(kept) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(_) => false,
        Ok(_) => remove_if_unused(roots, kept),
    }
}

/// The kept root's directory name: the program's path and the writable directories
/// (which decide where the program is put), hashed.
fn key(given: &Path, writable: &[String]) -> String {
    use sha2::Digest;
    let mut dirs: Vec<&String> = writable.iter().collect();
    dirs.sort();
    dirs.dedup();
    let mut hash = sha2::Sha256::new();
    hash.update(given.as_os_str().as_encoded_bytes());
    for dir in dirs {
        hash.update([0]);
        hash.update(dir.as_bytes());
    }
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether open file `file` is the file at `path` (an open made before a rename or
/// removal there is of another).
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The root kept at `kept`, locked for this run, if it was made from `given` (at `real`)
/// and none of the files it was made from changed since.
fn reuse(kept: &Path, given: &Path, real: &Path) -> Option<ProgramRoot> {
    let lock_path = kept.join("lock");
    let lock = std::fs::File::open(&lock_path).ok()?;
    // Not waited for: an exclusive lock is a removal under way. Taken before the manifest
    // is read, and checked to be the lock still at that path: the root there is then this
    // lock's, and no one replaces or removes it while this run holds it.
    rustix::fs::flock(&lock, FlockOperation::NonBlockingLockShared).ok()?;
    if !same_file(&lock, &lock_path) {
        return None;
    }
    let text = std::fs::read(kept.join("manifest.json")).ok()?;
    let manifest: Manifest = serde_json::from_slice(&text).ok()?;
    if manifest.format != FORMAT || Path::new(&manifest.program) != given || manifest.real != real {
        return None;
    }
    // A mount inside the root is its program holder, and nothing else.
    if manifest
        .mounts
        .iter()
        .any(|(_, host)| host.is_relative() && host != Path::new(HOLDER))
    {
        return None;
    }
    if fingerprint(&manifest.files) != manifest.fingerprint {
        tracing::debug!("a file changed since the program's root was made");
        return None;
    }
    // Used now: the least recently used roots are the first to go.
    let _ = lock.set_modified(std::time::SystemTime::now());
    Some(ProgramRoot::new(
        manifest,
        kept.join("root"),
        None,
        Some(lock),
    ))
}

/// A root for this run alone, in the host's temporary directory.
fn temporary_root(given: &Path, real: &Path, writable: &[String]) -> anyhow::Result<ProgramRoot> {
    let temp = tempfile::Builder::new()
        .prefix("picocenter-root-")
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .context("creating a temporary root")?;
    let (manifest, _) = build_root(temp.path(), given, real, writable)?;
    Ok(ProgramRoot::new(
        manifest,
        temp.path().to_path_buf(),
        Some(temp),
        None,
    ))
}

/// Removes what no run uses in `roots`: removals cut short, builds abandoned (an hour
/// old), and past [`KEPT_MAX`] kept roots, the least recently used first. A root goes
/// only under the exclusive lock of its `lock` file, so never while an app runs from it.
fn remove_unused(roots: &Path) {
    let Ok(entries) = std::fs::read_dir(roots) else {
        return;
    };
    let mut kept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(".trash-") {
            // Renamed here under its exclusive lock: no run can find it any more.
            let _ = std::fs::remove_dir_all(&path);
        } else if name.starts_with(".build-") {
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > std::time::Duration::from_secs(3600)) {
                remove_if_unused(roots, &path);
            }
        } else {
            let used = std::fs::metadata(path.join("lock"))
                .and_then(|m| m.modified())
                .ok();
            kept.push((used, path));
        }
    }
    kept.sort();
    let mut excess = kept.len().saturating_sub(KEPT_MAX);
    for (_, path) in kept {
        if excess == 0 {
            break;
        }
        if remove_if_unused(roots, &path) {
            excess -= 1;
        }
    }
}

/// Removes root directory `path` (in `roots`) unless an app holds its lock; says whether
/// it did. It is renamed away first, under the lock: a removal cut short leaves no
/// partial root where a run would look.
fn remove_if_unused(roots: &Path, path: &Path) -> bool {
    let lock_path = path.join("lock");
    let lock = match std::fs::File::open(&lock_path) {
        Ok(lock) => Some(lock),
        // Never sealed: a build cut short (no run holds what it cannot lock).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => return false,
    };
    if let Some(lock) = &lock {
        if rustix::fs::flock(lock, FlockOperation::NonBlockingLockExclusive).is_err()
            || !same_file(lock, &lock_path)
        {
            return false;
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let trash = roots.join(format!(".trash-{}-{nanos}", std::process::id()));
    if let Err(e) = std::fs::rename(path, &trash) {
        tracing::warn!("removing {}: {e}", path.display());
        return false;
    }
    match std::fs::remove_dir_all(&trash) {
        Ok(()) => tracing::debug!(root = %path.display(), "removed a program root no app uses"),
        Err(e) => tracing::warn!("removing {}: {e}", trash.display()),
    }
    true
}

impl ProgramRoot {
    /// The root at `dir` that `manifest` describes.
    fn new(
        manifest: Manifest,
        dir: PathBuf,
        temporary: Option<tempfile::TempDir>,
        in_use: Option<std::fs::File>,
    ) -> Self {
        let mounts = manifest
            .mounts
            .into_iter()
            .map(|(guest, host)| {
                let host = if host.is_relative() {
                    dir.join(host)
                } else {
                    host
                };
                (guest, host)
            })
            .collect();
        Self {
            dir,
            program: manifest.program,
            mounts,
            program_in_writable: manifest.program_in_writable,
            temporary,
            _in_use: in_use,
        }
    }

    /// Copies the program into the backing directory, under `data_dir`, of the writable
    /// directory that holds it, if one does. A copy, not a link: the app may write to what
    /// it finds there, and must not reach the host's file through it. Everything is done
    /// relative to directory fds reached without following a symlink ([`backing_dir`]):
    /// this runs as root, and an app sharing the data directory may have planted links.
    pub fn copy_program(&self, data_dir: &Path) -> anyhow::Result<()> {
        let Some((guest_dir, source)) = &self.program_in_writable else {
            return Ok(());
        };
        let name = Path::new(&self.program)
            .file_name()
            .context("the program has no file name")?;
        let (host_dir, dir) = backing_dir(data_dir, guest_dir)?;
        let target = host_dir.join(name);
        let copying = || format!("copying {} to {}", source.display(), target.display());
        // The canonical path, opened once and checked: a regular file, not a link put
        // there since (by whoever owns its directory).
        let from = rustix::fs::open(
            source,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(copying)?;
        let stat = rustix::fs::fstat(&from).with_context(copying)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            bail!("{} is not a regular file", source.display());
        }
        // A file left there (an earlier run's copy) is replaced, never written through:
        // it may be a symlink an app made, to a host file. The new one is created
        // exclusively, without following a link.
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("replacing {}", target.display())),
        }
        let to = rustix::fs::openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(stat.st_mode & 0o777),
        )
        .with_context(copying)?;
        let mut from = std::fs::File::from(from).take(stat.st_size as u64);
        std::io::copy(&mut from, &mut std::fs::File::from(to)).with_context(copying)?;
        Ok(())
    }
}

/// Builds in `dir` the root holding `given` (whose canonical path is `real`) and its
/// shared-library closure (and an /etc/passwd and /etc/group that know root, which the
/// app is in its own view, and an /etc/hosts that knows localhost). The program keeps its
/// host path, so argv[0] names it inside the guest too. Where that path lies under a
/// writable directory, which would hide it: a program right in that directory (such as
/// /tmp/prog) is copied into it when the app starts (see `program_in_writable`); one
/// deeper (/tmp/build/prog) gets its directory as a read-only mount of its own that holds
/// just the program. Returns the root's manifest, and whether its files were settled:
/// none changed while the root was built, nor in the two seconds before (a change within
/// one tick of a file system's clock would not show in its modification time).
fn build_root(
    dir: &Path,
    given: &Path,
    real: &Path,
    writable: &[String],
) -> anyhow::Result<(Manifest, bool)> {
    let program = given;
    let (files, searched) = picocenter_images::closure::closure_and_searched(real)
        .with_context(|| format!("finding the libraries {} needs", program.display()))?;
    // A library put later into a directory searched before the one where it was found
    // would change the closure: the directories looked in count as files it was made from.
    let mut made_from = files.clone();
    made_from.extend(searched);
    let before = fingerprint(&made_from);
    for file in &files[1..] {
        picocenter_images::rootfs::add_path(dir, file)?;
    }
    let (mut mounts, depends) = interpreter_libraries(dir, &files)?;
    // The app is root in its own view: getpwuid(0) and getgrgid(0) find it.
    std::fs::create_dir_all(dir.join("etc"))?;
    for (file, entry) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        // localhost is the app itself (see syscalls::net); no DNS is asked for it.
        (
            "etc/hosts",
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        ),
    ] {
        if !dir.join(file).exists() {
            std::fs::write(dir.join(file), entry)?;
        }
    }
    let hidden = writable
        .iter()
        .any(|guest| given.starts_with(sandbox_path(guest)));
    let parent = given.parent().context("the program has no directory")?;
    let program_in_writable = writable
        .iter()
        .find(|guest| sandbox_path(guest) == parent)
        .map(|guest| (validate_guest_dir(guest), real.to_path_buf()));
    let program_in_writable = match program_in_writable {
        Some((guest, real)) => Some((guest?, real)),
        None => None,
    };
    if program_in_writable.is_some() {
        // Copied into the writable directory once it exists: a mount would make the
        // whole directory read-only.
    } else if hidden {
        let name = given.file_name().context("the program has no file name")?;
        let parent = given.parent().context("the program has no directory")?;
        // Outside the guest's view of the root: only the mount shows it.
        let holder = dir.join(HOLDER);
        std::fs::create_dir(&holder)?;
        std::fs::set_permissions(&holder, std::fs::Permissions::from_mode(0o755))?;
        if std::fs::hard_link(real, holder.join(name)).is_err() {
            std::fs::copy(real, holder.join(name))
                .with_context(|| format!("copying {} into the root", real.display()))?;
        }
        // Relative: inside the root, wherever the root ends up.
        mounts.push((parent.to_string_lossy().into_owned(), HOLDER.into()));
    } else {
        picocenter_images::rootfs::add_path(dir, given)?;
    }
    let settled = fingerprint(&made_from) == before;
    made_from.extend(depends);
    let settle = std::time::SystemTime::now() - std::time::Duration::from_secs(2);
    let settled = settled
        && made_from.iter().all(|file| {
            std::fs::metadata(file)
                .and_then(|m| m.modified())
                .map_or(true, |modified| modified < settle)
        });
    let manifest = Manifest {
        format: FORMAT,
        program: given.to_string_lossy().into_owned(),
        real: real.to_path_buf(),
        mounts,
        program_in_writable,
        fingerprint: fingerprint(&made_from),
        files: made_from,
    };
    Ok((manifest, settled))
}

/// The library directories of the interpreters among `files` (Python's and Perl's standard
/// libraries), as read-only mounts at their own paths, with what their native modules
/// need added to `root`: without them such an interpreter cannot start. Also returns the
/// files whose change would change the root (the libraries added, the directories of
/// the modules).
fn interpreter_libraries(root: &Path, files: &[PathBuf]) -> anyhow::Result<InterpreterLibraries> {
    use picocenter_images::{closure, interpreters};
    let mut dirs: Vec<PathBuf> = Vec::new();
    for file in files {
        for dir in interpreters::library_dirs(file) {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    if dirs.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let modules = interpreters::native_modules(&dirs);
    let needed = closure::closure_of(&modules, closure::Missing::Skip)
        .context("finding the libraries of the interpreter's native modules")?;
    let mut depends = Vec::new();
    for file in needed
        .iter()
        .filter(|f| !dirs.iter().any(|d| f.starts_with(d)))
    {
        picocenter_images::rootfs::add_path(root, file)?;
        depends.push(file.clone());
    }
    for module in &modules {
        // A module added or removed changes its directory.
        if let Some(dir) = module.parent().filter(|d| !depends.iter().any(|f| f == d)) {
            depends.push(dir.to_path_buf());
        }
    }
    tracing::debug!(
        ?dirs,
        modules = modules.len(),
        "interpreter library directories"
    );
    let mounts = dirs
        .into_iter()
        .map(|d| (d.to_string_lossy().into_owned(), d))
        .collect();
    Ok((mounts, depends))
}

/// An interpreter's library directories as mounts, and the files its root depends on.
type InterpreterLibraries = (Vec<(String, PathBuf)>, Vec<PathBuf>);

/// A guest directory as the host path it would hide.
fn sandbox_path(guest: &str) -> PathBuf {
    PathBuf::from(picocenter_vmm::sandbox::normalize("/", guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept root (its directory, manifest and lock) made from the files `from`.
    fn kept_root(kept: &Path, given: &Path, from: &[&Path]) {
        std::fs::create_dir_all(kept.join("root")).unwrap();
        let manifest = Manifest {
            format: FORMAT,
            program: given.to_string_lossy().into_owned(),
            real: given.to_path_buf(),
            mounts: Vec::new(),
            program_in_writable: None,
            files: from.iter().map(|f| f.to_path_buf()).collect(),
            fingerprint: picocenter_images::fingerprint::host_files_fingerprint(
                from.iter().copied(),
            ),
        };
        std::fs::write(
            kept.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        std::fs::write(kept.join("lock"), b"").unwrap();
    }

    #[test]
    fn a_root_is_reused_only_while_none_of_its_files_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (program, library) = (dir.path().join("prog"), dir.path().join("lib.so"));
        std::fs::write(&program, b"program").unwrap();
        std::fs::write(&library, b"library").unwrap();
        let kept = dir.path().join("roots/k");
        kept_root(&kept, &program, &[&program, &library]);
        assert!(reuse(&kept, &program, &program).is_some());
        // A mount inside the root other than the program's holder.
        let text = std::fs::read_to_string(kept.join("manifest.json")).unwrap();
        let bad = text.replace(r#""mounts":[]"#, r#""mounts":[["/x","../../etc"]]"#);
        assert_ne!(bad, text);
        std::fs::write(kept.join("manifest.json"), bad).unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
        kept_root(&kept, &program, &[&program, &library]);
        // Locked exclusively (a removal under way): not waited for.
        let remover = std::fs::File::open(kept.join("lock")).unwrap();
        rustix::fs::flock(&remover, FlockOperation::LockExclusive).unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
        drop(remover);
        // Another root's build linking a file (its change time moves) changes nothing.
        std::fs::hard_link(&library, dir.path().join("linked")).unwrap();
        assert!(reuse(&kept, &program, &program).is_some());
        // Another program, or the same one reached at another canonical path.
        assert!(reuse(&kept, &library, &library).is_none());
        assert!(reuse(&kept, &program, &library).is_none());

        // A library replaced by a file of the same size (a new inode).
        let fresh = dir.path().join("fresh");
        std::fs::write(&fresh, b"LIBRARY").unwrap();
        std::fs::rename(&fresh, &library).unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
        kept_root(&kept, &program, &[&program, &library]);
        assert!(reuse(&kept, &program, &program).is_some());
        // Rewritten in place, same size: its modification time moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&library, b"library").unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
        // Gone.
        kept_root(&kept, &program, &[&program, &library]);
        std::fs::remove_file(&library).unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
        // A manifest that does not decode.
        kept_root(&kept, &program, &[&program]);
        std::fs::write(kept.join("manifest.json"), b"{not json").unwrap();
        assert!(reuse(&kept, &program, &program).is_none());
    }

    #[test]
    fn unused_roots_go_the_least_recently_used_first_and_a_root_in_use_never() {
        let dir = tempfile::tempdir().unwrap();
        let roots = dir.path().join("roots");
        let program = dir.path().join("prog");
        std::fs::write(&program, b"program").unwrap();
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        let mut names = Vec::new();
        for i in 0..KEPT_MAX + 3 {
            let name = format!("{i:032x}");
            let kept = roots.join(&name);
            kept_root(&kept, &program, &[&program]);
            let lock = std::fs::File::open(kept.join("lock")).unwrap();
            lock.set_modified(epoch + std::time::Duration::from_secs(1000 + i as u64))
                .unwrap();
            names.push(name);
        }
        // The least recently used is in use: it stays, and the next three go (the bound
        // is kept all the same).
        let in_use = reuse(&roots.join(&names[0]), &program, &program).unwrap();
        let lock = std::fs::File::open(roots.join(&names[0]).join("lock")).unwrap();
        lock.set_modified(epoch + std::time::Duration::from_secs(1))
            .unwrap();
        // A removal cut short goes; so does an abandoned build, but not one under way, nor
        // one that serves an app (its lock held).
        std::fs::create_dir_all(roots.join(".trash-1-2/root")).unwrap();
        std::fs::create_dir_all(roots.join(".build-now")).unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for name in [".build-old", ".build-serving"] {
            std::fs::create_dir_all(roots.join(name)).unwrap();
        }
        kept_root(&roots.join(".build-serving"), &program, &[&program]);
        let serving = std::fs::File::open(roots.join(".build-serving/lock")).unwrap();
        rustix::fs::flock(&serving, FlockOperation::LockShared).unwrap();
        for name in [".build-old", ".build-serving"] {
            std::fs::File::open(roots.join(name))
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }

        remove_unused(&roots);
        let left = |name: &str| roots.join(name).exists();
        assert!(left(&names[0]), "a root in use was removed");
        for name in &names[1..4] {
            assert!(
                !left(name),
                "{name}, among the least recently used, is left"
            );
        }
        for name in &names[4..] {
            assert!(left(name), "{name} was removed");
        }
        assert!(!left(".trash-1-2"));
        assert!(left(".build-now") && left(".build-serving") && !left(".build-old"));
        // A root in use is not replaced by a new build; one out of use is.
        assert!(!make_way(&roots, &roots.join(&names[0])));
        drop((in_use, serving));
        assert!(make_way(&roots, &roots.join(&names[0])));
        assert!(!left(&names[0]));
    }
}

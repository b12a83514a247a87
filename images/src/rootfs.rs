//! Copying host files into a root directory, keeping the symlinks on their paths (for
//! example Debian's `/lib -> usr/lib`), so that the same paths work inside the root.
//! Files are hard-linked when the root is on the same filesystem, else copied.
//!
//! Because a root shares inodes with the host, nothing may ever write through an existing
//! file of a root: [`copy_tree`] replaces files instead of overwriting them, and
//! [`resolve_in_root`] follows the root's own symlinks inside the root, never on the host.

use std::path::{Component, Path, PathBuf};

/// Why a file could not be added to a root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A host file or directory operation failed.
    #[error("adding {path} to the root: {what}")]
    Io {
        /// The host path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Symlinks nested too deeply (a loop).
    #[error("too many levels of symbolic links under {0}")]
    SymlinkLoop(PathBuf),
    /// The path is not absolute.
    #[error("{0} is not an absolute path")]
    Relative(PathBuf),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Copies host file (or directory tree) `host` into `root` at the same path.
pub fn add_path(root: &Path, host: &Path) -> Result<(), RootfsError> {
    add_path_limited(root, host, 40)
}

fn add_path_limited(root: &Path, host: &Path, links_left: u32) -> Result<(), RootfsError> {
    if !host.is_absolute() {
        return Err(RootfsError::Relative(host.to_path_buf()));
    }
    let components: Vec<Component> = host.components().skip(1).collect();
    let mut current = PathBuf::from("/");
    for (i, component) in components.iter().enumerate() {
        current.push(component);
        let inside = root.join(current.strip_prefix("/").unwrap_or(&current));
        let meta = std::fs::symlink_metadata(&current).map_err(io(&current, "stat"))?;
        if meta.file_type().is_symlink() {
            if links_left == 0 {
                return Err(RootfsError::SymlinkLoop(host.to_path_buf()));
            }
            let target = std::fs::read_link(&current).map_err(io(&current, "readlink"))?;
            if std::fs::symlink_metadata(&inside).is_err() {
                std::os::unix::fs::symlink(&target, &inside).map_err(io(&inside, "symlink"))?;
            }
            let mut resolved = if target.is_absolute() {
                target
            } else {
                current.parent().unwrap_or(Path::new("/")).join(target)
            };
            for rest in &components[i + 1..] {
                resolved.push(rest);
            }
            return add_path_limited(root, &normalize(&resolved), links_left - 1);
        }
        let last = i + 1 == components.len();
        if meta.is_dir() {
            std::fs::create_dir_all(&inside).map_err(io(&inside, "mkdir"))?;
            if last {
                return add_tree(root, &current, links_left);
            }
        } else if last {
            if std::fs::symlink_metadata(&inside).is_ok() {
                return Ok(());
            }
            if std::fs::hard_link(&current, &inside).is_err() {
                std::fs::copy(&current, &inside).map_err(io(&current, "copy"))?;
            }
        }
    }
    Ok(())
}

fn add_tree(root: &Path, dir: &Path, links_left: u32) -> Result<(), RootfsError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir, "read directory"))? {
        let entry = entry.map_err(io(dir, "read directory"))?;
        add_path_limited(root, &entry.path(), links_left)?;
    }
    Ok(())
}

/// The host path of guest path `guest` inside `root`, with every symlink on the way
/// followed inside the root (as the app would see it), except the last component, which is
/// the caller's to create or replace. Missing directories on the way are not an error.
pub fn resolve_in_root(root: &Path, guest: &str) -> Result<PathBuf, RootfsError> {
    let mut pending: Vec<Part> = parts(Path::new(guest)).rev().collect();
    let mut resolved = PathBuf::new();
    let mut links_left = 40u32;
    while let Some(part) = pending.pop() {
        let name = match part {
            Part::Up => {
                resolved.pop();
                continue;
            }
            Part::Name(name) => name,
        };
        let candidate = resolved.join(&name);
        let host = root.join(&candidate);
        let is_link =
            !pending.is_empty() && std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_symlink());
        if !is_link {
            resolved = candidate;
            continue;
        }
        if links_left == 0 {
            return Err(RootfsError::SymlinkLoop(PathBuf::from(guest)));
        }
        links_left -= 1;
        let target = std::fs::read_link(&host).map_err(io(&host, "readlink"))?;
        if target.is_absolute() {
            resolved = PathBuf::new();
        }
        pending.extend(parts(&target).rev());
    }
    Ok(root.join(resolved))
}

/// One step of a path being resolved.
enum Part {
    Up,
    Name(std::ffi::OsString),
}

fn parts(path: &Path) -> impl DoubleEndedIterator<Item = Part> + '_ {
    path.components().filter_map(|component| match component {
        Component::ParentDir => Some(Part::Up),
        Component::Normal(name) => Some(Part::Name(name.to_os_string())),
        _ => None,
    })
}

/// Copies `src` (a file, symlink or directory tree) to `dest`, replacing what is there
/// file by file (never writing through an existing file, which may be a hard link to a
/// host file) and merging directories. Symlinks are copied as symlinks.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<(), RootfsError> {
    let meta = std::fs::symlink_metadata(src).map_err(io(src, "stat"))?;
    let existing = std::fs::symlink_metadata(dest).ok();
    if meta.is_dir() {
        if existing.as_ref().is_some_and(|m| !m.is_dir()) {
            std::fs::remove_file(dest).map_err(io(dest, "remove"))?;
        }
        std::fs::create_dir_all(dest).map_err(io(dest, "mkdir"))?;
        std::fs::set_permissions(dest, meta.permissions()).map_err(io(dest, "chmod"))?;
        for entry in std::fs::read_dir(src).map_err(io(src, "read directory"))? {
            let entry = entry.map_err(io(src, "read directory"))?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()))?;
        }
        return Ok(());
    }
    match existing {
        Some(m) if m.is_dir() => std::fs::remove_dir_all(dest).map_err(io(dest, "remove"))?,
        Some(_) => std::fs::remove_file(dest).map_err(io(dest, "remove"))?,
        None => {}
    }
    if meta.is_symlink() {
        let target = std::fs::read_link(src).map_err(io(src, "readlink"))?;
        std::os::unix::fs::symlink(target, dest).map_err(io(dest, "symlink"))?;
    } else {
        std::fs::copy(src, dest).map_err(io(src, "copy"))?;
    }
    Ok(())
}

/// Removes `.` and `..` lexically.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_on_the_path_are_recreated() {
        let host = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let real = host.path().join("usr/lib");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("libx.so"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/lib", host.path().join("lib")).unwrap();
        add_path(root.path(), &host.path().join("lib/libx.so")).unwrap();
        let inside = root.path().join(host.path().strip_prefix("/").unwrap());
        assert!(std::fs::symlink_metadata(inside.join("lib"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(inside.join("usr/lib/libx.so")).unwrap(), b"x");
    }

    #[test]
    fn resolving_follows_the_roots_symlinks_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("usr/lib/etc-link")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.path().join("up")).unwrap();
        let resolve = |guest| resolve_in_root(root.path(), guest).unwrap();
        assert_eq!(resolve("/lib/x.so"), root.path().join("usr/lib/x.so"));
        assert_eq!(
            resolve("/lib/etc-link/passwd"),
            root.path().join("etc/passwd")
        );
        assert_eq!(resolve("/up/up/etc/passwd"), root.path().join("etc/passwd"));
        // The last component is not followed: it is what the caller replaces.
        assert_eq!(resolve("/lib"), root.path().join("lib"));
        std::os::unix::fs::symlink("loop", root.path().join("loop")).unwrap();
        assert!(resolve_in_root(root.path(), "/loop/x").is_err());
    }

    #[test]
    fn copying_replaces_files_instead_of_writing_through_them() {
        let dir = tempfile::tempdir().unwrap();
        let host_file = dir.path().join("host");
        std::fs::write(&host_file, "host data").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), "new").unwrap();
        std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        std::fs::hard_link(&host_file, dest.join("sub/file")).unwrap();
        copy_tree(&src, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "host data");
        assert_eq!(
            std::fs::read_to_string(dest.join("sub/file")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("sub/file")
        );
    }
}

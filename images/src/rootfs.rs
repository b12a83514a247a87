//! Copying host files into a root directory, keeping the symlinks on their paths (for
//! example Debian's `/lib -> usr/lib`), so that the same paths work inside the root.
//! Files are hard-linked when the root is on the same filesystem, else copied.

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

/// Removes `.` and `..` lexically.
fn normalize(path: &Path) -> PathBuf {
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
}

//! The fingerprint of everything an image is built from, so that an unchanged image is not
//! built again. It covers the builder's version, the image folder's files (contents) and
//! any folder files a definition takes from outside it, and the host files the root holds:
//! their path, type, size, modification time and inode (and a symlink's target), which
//! only costs a `stat` each.

use crate::definition::Definition;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bumped whenever the builder would build the same definition differently.
pub const BUILDER_VERSION: u32 = 1;

/// Why a fingerprint could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    /// A file or directory could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> FingerprintError + '_ {
    move |source| FingerprintError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Every file and symlink under `path` (itself, when it is not a directory), sorted.
/// Symlinks are listed, not followed, except `path` itself.
pub fn walk(path: &Path) -> Result<Vec<PathBuf>, FingerprintError> {
    let mut found = Vec::new();
    if std::fs::metadata(path).map_err(read_error(path))?.is_dir() {
        walk_dir(path, &mut found)?;
    } else {
        found.push(path.to_path_buf());
    }
    Ok(found)
}

fn walk_dir(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), FingerprintError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(read_error(dir))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(dir))?;
    entries.sort();
    for entry in entries {
        let meta = std::fs::symlink_metadata(&entry).map_err(read_error(&entry))?;
        if meta.is_dir() {
            walk_dir(&entry, found)?;
        } else {
            found.push(entry);
        }
    }
    Ok(())
}

/// The host files a definition names: each `root.host` entry and, for a directory, every
/// file and symlink under it.
pub fn declared_host_files(definition: &Definition) -> Result<BTreeSet<PathBuf>, FingerprintError> {
    let mut files = BTreeSet::new();
    for path in &definition.spec.root.host {
        files.extend(walk(path)?);
    }
    Ok(files)
}

/// The folder inputs that lie outside the image folder (`src = "../site"`), normalized.
fn outside_inputs(definition: &Definition) -> BTreeSet<PathBuf> {
    let root = &definition.spec.root;
    let sources = root.copy.iter().map(|c| &c.src);
    let sources = sources.chain(root.compile.iter().flat_map(|c| &c.sources));
    sources
        .map(|src| crate::rootfs::normalize(&definition.dir.join(src)))
        .filter(|path| !path.starts_with(&definition.dir))
        .collect()
}

/// Feeds one length-prefixed field to the hash, so that fields cannot run together.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

fn hash_folder_file(hash: &mut Sha256, path: &Path) -> Result<(), FingerprintError> {
    field(hash, path.as_os_str().as_bytes());
    let meta = std::fs::symlink_metadata(path).map_err(read_error(path))?;
    if meta.is_symlink() {
        let target = std::fs::read_link(path).map_err(read_error(path))?;
        field(hash, b"symlink");
        field(hash, target.as_os_str().as_bytes());
    } else {
        field(hash, &meta.mode().to_le_bytes());
        field(hash, &std::fs::read(path).map_err(read_error(path))?);
    }
    Ok(())
}

/// The fingerprint (hex SHA-256) of host files `files` as they are now, by what `stat`
/// says of each (and of a symlink's target): a file changed in place, replaced, or gone
/// (or one that appears where none was) changes it; a hard link made to one does not.
pub fn host_files_fingerprint<'a>(files: impl IntoIterator<Item = &'a Path>) -> String {
    let mut hash = Sha256::new();
    for file in files {
        hash_host_file(&mut hash, file);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn stat_fields(meta: &std::fs::Metadata) -> [i64; 6] {
    [
        i64::from(meta.mode()),
        meta.size() as i64,
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino() as i64,
        meta.dev() as i64,
    ]
}

fn hash_host_file(hash: &mut Sha256, path: &Path) {
    field(hash, path.as_os_str().as_bytes());
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        field(hash, b"missing");
        return;
    };
    let mut stats = vec![stat_fields(&meta)];
    if meta.is_symlink() {
        field(
            hash,
            std::fs::read_link(path)
                .unwrap_or_default()
                .as_os_str()
                .as_bytes(),
        );
        stats.extend(std::fs::metadata(path).ok().map(|m| stat_fields(&m)));
    }
    for value in stats.iter().flatten() {
        hash.update(value.to_le_bytes());
    }
}

/// The fingerprint (hex SHA-256) of `definition` built from `host_files`: the declared
/// host files plus the shared libraries the build added for them.
pub fn fingerprint(
    definition: &Definition,
    host_files: &BTreeSet<PathBuf>,
) -> Result<String, FingerprintError> {
    let mut hash = Sha256::new();
    field(&mut hash, &BUILDER_VERSION.to_le_bytes());
    field(&mut hash, definition.name.as_bytes());
    let mut folder_files = walk(&definition.dir)?;
    for outside in outside_inputs(definition) {
        folder_files.extend(walk(&outside)?);
    }
    field(&mut hash, b"folder");
    for file in &folder_files {
        hash_folder_file(&mut hash, file)?;
    }
    field(&mut hash, b"host");
    for file in host_files {
        hash_host_file(&mut hash, file);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::ImageSpec;

    fn definition(dir: &Path, text: &str) -> Definition {
        std::fs::write(dir.join("image.toml"), text).unwrap();
        Definition {
            name: "t".into(),
            dir: dir.to_path_buf(),
            spec: ImageSpec::parse(text).unwrap(),
        }
    }

    #[test]
    fn any_change_to_an_input_changes_the_fingerprint() {
        let top = tempfile::tempdir().unwrap();
        let folder = top.path().join("t");
        let shared = top.path().join("shared");
        let host = top.path().join("host");
        for dir in [&folder, &shared, &host] {
            std::fs::create_dir(dir).unwrap();
        }
        std::fs::write(folder.join("a.txt"), "a").unwrap();
        std::fs::write(shared.join("s.txt"), "s").unwrap();
        std::fs::write(host.join("h"), "h").unwrap();
        let text = format!(
            "[run]\nargv = [\"/h\"]\n[root]\nhost = [{:?}]\ncopy = [{{ src = \"../shared\", dest = \"/s\" }}]\n",
            host.display()
        );
        let def = definition(&folder, &text);
        let print = || fingerprint(&def, &declared_host_files(&def).unwrap()).unwrap();
        let first = print();
        assert_eq!(print(), first, "stable when nothing changes");

        std::fs::write(folder.join("a.txt"), "b").unwrap();
        let folder_changed = print();
        assert_ne!(folder_changed, first);

        std::fs::write(shared.join("s.txt"), "t").unwrap();
        let shared_changed = print();
        assert_ne!(shared_changed, folder_changed);

        std::fs::remove_file(host.join("h")).unwrap();
        std::fs::write(host.join("h"), "h").unwrap();
        let host_changed = print();
        assert_ne!(host_changed, shared_changed, "a new inode");

        std::fs::write(host.join("new"), "").unwrap();
        assert_ne!(print(), host_changed, "a new file in a host directory");
    }

    #[test]
    fn a_vanished_host_file_changes_the_fingerprint() {
        let folder = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let def = definition(folder.path(), "[run]\nargv = [\"/x\"]\n");
        let lib = host.path().join("lib.so");
        std::fs::write(&lib, "").unwrap();
        let files = BTreeSet::from([lib.clone()]);
        let before = fingerprint(&def, &files).unwrap();
        std::fs::remove_file(&lib).unwrap();
        assert_ne!(fingerprint(&def, &files).unwrap(), before);
    }
}

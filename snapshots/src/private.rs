//! Files and directories only their owner can use: snapshots hold an app's memory and data
//! (its secrets), so everything a store, the key or the data archive writes is created
//! 0600, and every directory made for them 0700.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of the files written.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories made.
pub const DIR_MODE: u32 = 0o700;

/// Makes `path` and any missing parents, each new one 0700. Directories that already
/// exist keep their mode: they may be the operator's.
pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Creates (or truncates) the file at `path` for writing, 0600 if new. A file that
/// already exists is set to 0600 too, since its old contents go.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Creates a new file at `path` (refused if anything is there, a symlink included), 0600.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Writes `bytes` to a new file at `path` (see [`create_file`]) and syncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = create_file(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Copies `source` into a new file at `dest` (replacing what is there), 0600, synced.
pub fn copy(source: &Path, dest: &Path) -> std::io::Result<u64> {
    let mut from = File::open(source)?;
    let mut to = create_file(dest)?;
    let copied = std::io::copy(&mut from, &mut to)?;
    to.sync_all()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_and_directories_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("a")), DIR_MODE);
        assert_eq!(mode(&nested), DIR_MODE);
        let file = nested.join("f");
        std::fs::write(&file, b"old").unwrap();
        std::fs::set_permissions(&file, PermissionsExt::from_mode(0o644)).unwrap();
        write_synced(&file, b"new").unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert!(create_new(&file).is_err());
        create_new(&nested.join("g")).unwrap();
        assert_eq!(mode(&nested.join("g")), FILE_MODE);
    }
}

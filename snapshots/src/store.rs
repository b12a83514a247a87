//! Where snapshots are kept: the [`Store`] trait, and [`LocalStore`], a directory.
//!
//! A store holds one app's snapshots. Each snapshot `ID` is three objects: `ID.pages` (the
//! page file), `ID.data` (an archive of the writable directories, optional) and
//! `ID.manifest`; plus `HEAD`, the id of the newest snapshot. A commit writes the page file
//! and data first, then the manifest, then HEAD, each atomically, so a crash at any point
//! leaves HEAD naming a complete snapshot: the previous good one, or the new one.

use crate::format::{Manifest, ManifestError, HEADER_SIZE, MAX_MANIFEST_SIZE};
use crate::key::SnapshotKey;
use crate::private;
use std::path::{Path, PathBuf};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A host I/O error.
    #[error("{what} {path}")]
    Io {
        /// The step.
        what: &'static str,
        /// The object.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store holds no snapshot.
    #[error("no snapshot in {0}")]
    Empty(String),
    /// A snapshot id the store does not hold.
    #[error("snapshot {id} is not in {store}")]
    Missing {
        /// The id.
        id: String,
        /// The store.
        store: String,
    },
    /// A manifest was refused.
    #[error("snapshot {id}: {source}")]
    Manifest {
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// An id with characters a key may not hold.
    #[error("bad snapshot id {0:?}")]
    BadId(String),
    /// An app name that cannot name a store.
    #[error(transparent)]
    BadName(#[from] crate::names::NameError),
    /// A remote store failed.
    #[error("{0}")]
    Remote(String),
}

/// A place that keeps one app's snapshots.
pub trait Store: Send + Sync {
    /// Where this is, for messages.
    fn describe(&self) -> String;
    /// The id of the newest snapshot, if any.
    fn head(&self) -> Result<Option<String>, StoreError>;
    /// Reads a snapshot's manifest and checks it: its MAC under `key`, its bounds, and that
    /// it is the manifest of `id` (not another snapshot's put in its place).
    fn manifest(&self, id: &str, key: &SnapshotKey) -> Result<Manifest, StoreError>;
    /// Stores a snapshot whose page file and data archive are local files (consumed), with
    /// its manifest authenticated by `key`, then makes it the newest.
    fn commit(
        &self,
        manifest: &Manifest,
        key: &SnapshotKey,
        pages: &Path,
        data: Option<&Path>,
    ) -> Result<(), StoreError>;
    /// A local path to the page file of `id` (fetched first if the store is remote).
    fn page_file(&self, id: &str) -> Result<PathBuf, StoreError>;
    /// A local path to the data archive of `id`, if it has one.
    fn data_archive(&self, id: &str) -> Result<Option<PathBuf>, StoreError>;
    /// Ids of every snapshot held.
    fn list(&self) -> Result<Vec<String>, StoreError>;
    /// Removes a snapshot's objects.
    fn remove(&self, id: &str) -> Result<(), StoreError>;
    /// Bytes the store holds for `id` (page file + data + manifest).
    fn size(&self, id: &str) -> Result<u64, StoreError>;
    /// A local path where a file for snapshot `id` (`kind`: "pages", "data") can be
    /// written before [`Store::commit`] takes it.
    fn scratch(&self, id: &str, kind: &str) -> Result<PathBuf, StoreError>;
}

/// The largest manifest file read: the payload cap and the header.
pub const MAX_MANIFEST_FILE: u64 = MAX_MANIFEST_SIZE + HEADER_SIZE as u64;

/// Checks that `id` is safe as a file name or key.
pub fn check_id(id: &str) -> Result<(), StoreError> {
    if crate::names::is_plain(id, 128) {
        Ok(())
    } else {
        Err(StoreError::BadId(id.to_string()))
    }
}

/// Decodes the manifest bytes of snapshot `id` (see [`Store::manifest`]).
pub fn decode_manifest(id: &str, bytes: &[u8], key: &SnapshotKey) -> Result<Manifest, StoreError> {
    let refused = |source| StoreError::Manifest {
        id: id.to_string(),
        source,
    };
    let manifest = Manifest::decode(bytes, key).map_err(refused)?;
    if manifest.id != id {
        return Err(refused(ManifestError::Inconsistent(format!(
            "it is the manifest of snapshot {}, put in the place of another",
            manifest.id
        ))));
    }
    Ok(manifest)
}

/// A new snapshot id: time-ordered and unique.
pub fn new_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut random = [0u8; 4];
    // SAFETY: getrandom writes at most `random.len()` bytes into `random`.
    let _ = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    format!(
        "{}-{:06}-{:08x}",
        now.as_secs(),
        now.subsec_micros(),
        u32::from_le_bytes(random)
    )
}

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

impl LocalStore {
    /// A store in `dir`, created (0700) if missing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        private::create_dir_all(dir).map_err(io("creating", dir))?;
        // One spelling per directory: the name decides whether a later snapshot can be an
        // increment of the one an app was restored from.
        let dir = std::fs::canonicalize(dir).map_err(io("resolving", dir))?;
        Ok(Self { dir })
    }

    /// Makes snapshot `id` (which must be here, and check out under `key`) the newest.
    pub fn set_head(&self, id: &str, key: &SnapshotKey) -> Result<(), StoreError> {
        self.manifest(id, key)?;
        self.write_atomic(&self.dir.join("HEAD"), format!("{id}\n").as_bytes())?;
        self.sync_dir();
        Ok(())
    }

    /// Commits snapshot `id`'s manifest (and data archive) ahead of its page file, which
    /// is being streamed in: the snapshot is *pending* ([`LocalStore::is_complete`] says
    /// no) until [`LocalStore::attach_pages`]. HEAD is left alone. A restore that is fed
    /// the page file reads the manifest from here; anything else treats the snapshot as
    /// absent, so a worker that dies mid-stream leaves nothing half-made to restore from.
    pub fn commit_pending(
        &self,
        manifest: &Manifest,
        key: &SnapshotKey,
        data: Option<&Path>,
    ) -> Result<(), StoreError> {
        let id = &manifest.id;
        if let Some(data) = data {
            self.adopt(data, &self.object(id, "data")?)?;
        }
        self.sync_dir();
        self.write_atomic(&self.object(id, "manifest")?, &manifest.encode(key))?;
        self.sync_dir();
        Ok(())
    }

    /// Completes pending snapshot `id` with its page file (which the caller verified).
    pub fn attach_pages(
        &self,
        id: &str,
        key: &SnapshotKey,
        pages: &Path,
    ) -> Result<(), StoreError> {
        self.manifest(id, key)?;
        self.adopt(pages, &self.object(id, "pages")?)?;
        self.sync_dir();
        Ok(())
    }

    /// Whether snapshot `id` is here whole: its manifest checks out under `key` and its
    /// page file has the manifest's size (a pending one has none yet).
    pub fn is_complete(&self, id: &str, key: &SnapshotKey) -> bool {
        self.manifest(id, key)
            .is_ok_and(|manifest| self.has_page_file(&manifest))
    }

    /// Whether snapshot `id` and every snapshot it builds on are here whole (see
    /// [`LocalStore::is_complete`]): what a restore from this store needs.
    pub fn is_chain_complete(&self, id: &str, key: &SnapshotKey) -> bool {
        chain(self, key, id).is_ok_and(|chain| chain.iter().all(|m| self.has_page_file(m)))
    }

    /// Whether the page file of `manifest` is here, at its size.
    fn has_page_file(&self, manifest: &Manifest) -> bool {
        self.object(&manifest.id, "pages")
            .is_ok_and(|path| crate::pagefile::check_size(&path, manifest).is_ok())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn object(&self, id: &str, kind: &str) -> Result<PathBuf, StoreError> {
        check_id(id)?;
        Ok(self.dir.join(format!("{id}.{kind}")))
    }

    /// Writes `bytes` to `path` atomically (a temporary file, 0600, synced, then renamed).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = path.with_extension("tmp-write");
        private::write_synced(&tmp, bytes).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming", path))?;
        Ok(())
    }

    /// Moves (or copies) a local file into the store as `path`, 0600 whatever it was.
    fn adopt(&self, source: &Path, path: &Path) -> Result<(), StoreError> {
        if std::fs::rename(source, path).is_err() {
            private::copy(source, path).map_err(io("copying", source))?;
            let _ = std::fs::remove_file(source);
        }
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(private::FILE_MODE),
        )
        .map_err(io("protecting", path))
    }

    fn sync_dir(&self) {
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
    }
}

impl Store for LocalStore {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn head(&self) -> Result<Option<String>, StoreError> {
        let path = self.dir.join("HEAD");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim().to_string();
                check_id(&id)?;
                Ok(Some(id))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    fn manifest(&self, id: &str, key: &SnapshotKey) -> Result<Manifest, StoreError> {
        let path = self.object(id, "manifest")?;
        let bytes = match read_capped(&path, MAX_MANIFEST_FILE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    id: id.to_string(),
                    store: self.describe(),
                })
            }
            Err(e) => return Err(io("reading", &path)(e)),
        };
        decode_manifest(id, &bytes, key)
    }

    fn commit(
        &self,
        manifest: &Manifest,
        key: &SnapshotKey,
        pages: &Path,
        data: Option<&Path>,
    ) -> Result<(), StoreError> {
        let id = &manifest.id;
        self.adopt(pages, &self.object(id, "pages")?)?;
        if let Some(data) = data {
            self.adopt(data, &self.object(id, "data")?)?;
        }
        self.sync_dir();
        self.write_atomic(&self.object(id, "manifest")?, &manifest.encode(key))?;
        self.write_atomic(&self.dir.join("HEAD"), format!("{id}\n").as_bytes())?;
        self.sync_dir();
        Ok(())
    }

    fn page_file(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.object(id, "pages")
    }

    fn data_archive(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        let path = self.object(id, "data")?;
        Ok(path.exists().then_some(path))
    }

    fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(io("listing", &self.dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".manifest").map(str::to_string)
            })
            .filter(|id| check_id(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn remove(&self, id: &str) -> Result<(), StoreError> {
        for kind in ["manifest", "pages", "data"] {
            let path = self.object(id, kind)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &path)(e)),
            }
        }
        Ok(())
    }

    fn scratch(&self, id: &str, kind: &str) -> Result<PathBuf, StoreError> {
        check_id(id)?;
        Ok(self.dir.join(format!(".{id}.{kind}.tmp")))
    }

    fn size(&self, id: &str) -> Result<u64, StoreError> {
        let mut total = 0;
        for kind in ["manifest", "pages", "data"] {
            if let Ok(meta) = std::fs::metadata(self.object(id, kind)?) {
                total += meta.len();
            }
        }
        Ok(total)
    }
}

/// Reads the file at `path`, refused (`InvalidData`) if it holds more than `cap` bytes.
fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over the {cap}-byte limit of a manifest"),
        ));
    }
    Ok(bytes)
}

/// The chain of manifests from `id` back to its first full snapshot, newest first, each
/// checked under `key`.
pub fn chain(store: &dyn Store, key: &SnapshotKey, id: &str) -> Result<Vec<Manifest>, StoreError> {
    let mut chain = vec![store.manifest(id, key)?];
    while let Some(parent) = chain.last().and_then(|m| m.parent.clone()) {
        if chain.len() > 1000 || chain.iter().any(|m| m.id == parent) {
            return Err(StoreError::Manifest {
                id: parent,
                source: ManifestError::Inconsistent("the parent chain loops".into()),
            });
        }
        chain.push(store.manifest(&parent, key)?);
    }
    Ok(chain)
}

/// Copies snapshot `id`, and the parents it builds on, from `from` to `to`: oldest first,
/// skipping those `to` already holds (its manifest reads back), each through `to.commit`.
/// Leaves `to`'s HEAD at `id`, and returns the ids copied.
///
/// Each file is first staged at a [`Store::scratch`] path of `to`, and that is what `to`
/// commits: a [`LocalStore`] commit consumes its inputs, and `from`'s objects must stay.
/// Staging is a hard link where it can be (snapshot objects are never written in place,
/// only replaced by rename) and a copy across file systems; staged files are removed if the
/// commit fails. If `to` already held `id` but its HEAD named another snapshot, `id` is
/// committed again, as the trait has no other way to move HEAD.
pub fn copy_chain(
    from: &dyn Store,
    to: &dyn Store,
    key: &SnapshotKey,
    id: &str,
) -> Result<Vec<String>, StoreError> {
    let chain = chain(from, key, id)?;
    let mut copied = Vec::new();
    for manifest in chain.iter().rev() {
        if to.manifest(&manifest.id, key).is_ok() {
            continue;
        }
        copy_snapshot(from, to, key, manifest)?;
        copied.push(manifest.id.clone());
    }
    match chain.first() {
        Some(newest) if to.head()?.as_deref() != Some(id) => copy_snapshot(from, to, key, newest)?,
        _ => {}
    }
    Ok(copied)
}

/// Stages one snapshot's files from `from` in `to`'s scratch paths and commits it to `to`.
fn copy_snapshot(
    from: &dyn Store,
    to: &dyn Store,
    key: &SnapshotKey,
    manifest: &Manifest,
) -> Result<(), StoreError> {
    let id = &manifest.id;
    let mut staged = vec![stage(&from.page_file(id)?, &to.scratch(id, "pages")?)?];
    let result = match from.data_archive(id) {
        Ok(Some(data)) => to
            .scratch(id, "data")
            .and_then(|scratch| stage(&data, &scratch))
            .map(|data| staged.push(data)),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let result = result.and_then(|()| {
        to.commit(
            manifest,
            key,
            &staged[0],
            staged.get(1).map(|p| p.as_path()),
        )
    });
    if result.is_err() {
        for path in &staged {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// Makes `scratch` a new name (or, across file systems, a copy) of `source`.
fn stage(source: &Path, scratch: &Path) -> Result<PathBuf, StoreError> {
    match std::fs::remove_file(scratch) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("removing", scratch)(e))
        }
        _ => {}
    }
    if std::fs::hard_link(source, scratch).is_err() {
        private::copy(source, scratch).map_err(io("copying", source))?;
    }
    Ok(scratch.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{AppRecord, ProcessRecord, UserContext};
    use std::os::unix::fs::PermissionsExt;

    fn key() -> SnapshotKey {
        SnapshotKey::from_bytes([3; 32])
    }

    fn manifest(id: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            id: id.into(),
            parent: parent.map(str::to_string),
            ancestors: parent.map(str::to_string).into_iter().collect(),
            app: AppRecord {
                name: "app".into(),
                memory_mib: 16,
                ..Default::default()
            },
            process: ProcessRecord {
                cwd: "/".into(),
                ..Default::default()
            },
            context: UserContext {
                xsave: vec![0; 4096],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn commit_makes_a_snapshot_the_head_and_chains_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("new")).unwrap();
        assert_eq!(store.head().unwrap(), None);
        for (id, parent) in [("a", None), ("b", Some("a"))] {
            let pages = store.scratch(id, "pages").unwrap();
            std::fs::write(&pages, b"").unwrap();
            store
                .commit(&manifest(id, parent), &key(), &pages, None)
                .unwrap();
        }
        assert_eq!(store.head().unwrap().as_deref(), Some("b"));
        let ids: Vec<String> = chain(&store, &key(), "b")
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(store.list().unwrap(), ["a", "b"]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        for kind in ["manifest", "pages"] {
            assert_eq!(mode(&store.object("b", kind).unwrap()), 0o600, "{kind}");
        }
        assert_eq!(mode(&store.dir().join("HEAD")), 0o600);
        store.remove("a").unwrap();
        assert!(matches!(
            chain(&store, &key(), "b").unwrap_err(),
            StoreError::Missing { .. }
        ));
    }

    #[test]
    fn a_manifest_moved_to_another_id_or_under_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        snapshot(&store, "s1", None, None);
        snapshot(&store, "s2", None, None);
        let read = |id: &str| std::fs::read(store.object(id, "manifest").unwrap()).unwrap();
        std::fs::write(store.object("s2", "manifest").unwrap(), read("s1")).unwrap();
        let error = store.manifest("s2", &key()).unwrap_err().to_string();
        assert!(error.contains("manifest of snapshot s1"), "{error}");
        let other = SnapshotKey::from_bytes([4; 32]);
        let error = store.manifest("s1", &other).unwrap_err().to_string();
        assert!(error.contains("forged"), "{error}");
        std::fs::write(
            store.object("s1", "manifest").unwrap(),
            vec![0u8; MAX_MANIFEST_FILE as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            store.manifest("s1", &key()).unwrap_err(),
            StoreError::Io { .. }
        ));
    }

    #[test]
    fn ids_cannot_escape_the_store() {
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert!(check_id(&new_id()).is_ok());
    }
    fn snapshot(store: &LocalStore, id: &str, parent: Option<&str>, data: Option<&[u8]>) {
        let pages = store.scratch(id, "pages").unwrap();
        std::fs::write(&pages, id.repeat(4096).as_bytes()).unwrap();
        let archive = data.map(|bytes| {
            let path = store.scratch(id, "data").unwrap();
            std::fs::write(&path, bytes).unwrap();
            path
        });
        let manifest = manifest(id, parent);
        store
            .commit(&manifest, &key(), &pages, archive.as_deref())
            .unwrap();
    }

    #[test]
    fn copy_chain_copies_what_is_missing_oldest_first_and_leaves_the_source() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = LocalStore::open(a.path()).unwrap();
        let to = LocalStore::open(b.path()).unwrap();
        snapshot(&from, "s1", None, Some(b"archive"));
        snapshot(&from, "s2", Some("s1"), None);
        snapshot(&from, "s3", Some("s2"), None);
        assert_eq!(copy_chain(&from, &to, &key(), "s2").unwrap(), ["s1", "s2"]);
        assert_eq!(to.head().unwrap().as_deref(), Some("s2"));
        assert_eq!(copy_chain(&from, &to, &key(), "s3").unwrap(), ["s3"]);
        assert_eq!(to.list().unwrap(), ["s1", "s2", "s3"]);
        for id in ["s1", "s2", "s3"] {
            let read = |store: &LocalStore| std::fs::read(store.page_file(id).unwrap()).unwrap();
            assert_eq!(read(&from), read(&to), "{id}");
            assert_eq!(
                from.manifest(id, &key()).unwrap(),
                to.manifest(id, &key()).unwrap()
            );
        }
        let archive = to.data_archive("s1").unwrap().unwrap();
        assert_eq!(std::fs::read(archive).unwrap(), b"archive");
        assert!(
            from.data_archive("s1").unwrap().is_some(),
            "the source keeps its files"
        );
        assert_eq!(
            copy_chain(&from, &to, &key(), "s1").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(to.head().unwrap().as_deref(), Some("s1"), "HEAD moves back");
        assert_eq!(
            copy_chain(&from, &to, &key(), "s3").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(to.head().unwrap().as_deref(), Some("s3"));
    }
}

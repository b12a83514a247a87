//! Page files stored once per image in S3 (README §5.7): the first page file of an image
//! (up to [`MAX_BASE_BYTES`]) is stored plain and becomes the image's *base*; later page
//! files of the same image are stored [packed](crate::packed) against it, as their own
//! pages and references to the base's.
//!
//! Objects, beside each app's `{app}/ID.*`:
//!
//! | Key | Content |
//! |---|---|
//! | `{prefix}/.images/{image}` | `APP/ID`: the image's base, the plain page file `{prefix}/APP/ID.pages` |
//! | `{app}/ID.base` | a marker: this page file is a base, kept when its snapshot is removed |
//! | `{app}/ID.packed` | a packed page file, in place of `ID.pages` |
//!
//! A base outlives its snapshot: [`Store::remove`](crate::Store::remove) and
//! [`S3Store::remove_everything`] leave a marked page file, and
//! [`S3Store::collect_garbage`]
//! removes it once no packed page file names it (first the image's pointer, then, a
//! grace period later, the page file).

use super::{io, join_prefix, S3Error, S3Store};
use crate::format::{Manifest, PAGE_SIZE};
use crate::packed::{self, BaseIndex, PackedHeader};
use crate::store::{Store, StoreError};
use std::path::PathBuf;
use std::sync::Arc;

/// The largest page file that is deduplicated, and so the largest base: larger page files
/// (a big app's) stay plain, so that a restore streams them, ActiveSet first, rather than
/// assembling them before the VMM starts.
pub const MAX_BASE_BYTES: u64 = 64 << 20;
/// Bases whose page index a connection keeps in memory.
const CACHED_BASE_INDEXES: usize = 16;
/// The first bytes of a packed object read to find its base (its header is rarely more).
const HEADER_PROBE: u64 = 64 << 10;

/// The indexes of the bases a connection used last, so that every swap-out of an image's
/// apps does not read and digest its base again.
#[derive(Debug, Default)]
pub(super) struct BaseIndexes(std::sync::Mutex<Vec<Arc<BaseIndex>>>);

impl BaseIndexes {
    fn get(&self, base: &str) -> Option<Arc<BaseIndex>> {
        let cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache.iter().find(|index| index.base == base).cloned()
    }

    fn put(&self, index: Arc<BaseIndex>) {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|other| other.base != index.base);
        if cache.len() >= CACHED_BASE_INDEXES {
            cache.remove(0);
        }
        cache.push(index);
    }
}

/// How a page file went to S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesStored {
    /// As it is (`ID.pages`).
    Plain,
    /// As it is, and it became its image's base.
    Base,
    /// Packed (`ID.packed`): `own` of its `pages` pages are stored, the rest are the
    /// base's.
    Packed {
        /// Its pages.
        pages: u64,
        /// Those stored in the packed object.
        own: u64,
    },
}

impl S3Store {
    /// The app this store holds, if its page files may be deduplicated: a store opened on
    /// a plain app name (a worker's), with deduplication on.
    fn dedup_app(&self) -> Option<&str> {
        (self.conn.dedup && crate::names::validate_app_name(&self.app).is_ok())
            .then_some(self.app.as_str())
    }

    /// `{prefix}/.images/{image}`: the pointer to the base of `manifest`'s image (the
    /// image's name, or the program's path for an app run from a program).
    fn image_pointer_key(&self, manifest: &Manifest) -> Result<String, StoreError> {
        let identity = manifest
            .app
            .image
            .as_deref()
            .map(|image| format!("image:{image}"))
            .unwrap_or_else(|| format!("program:{}", manifest.app.program));
        let digest = blake3::hash(identity.as_bytes()).to_hex();
        Ok(format!(
            "{}/{}",
            join_prefix(&[&self.conn.base_prefix, ".images"])?,
            &digest[..32]
        ))
    }

    /// The key of base `base` (`APP/ID`, checked), the plain page file it names.
    fn base_key(&self, base: &str) -> Result<String, StoreError> {
        let (app, id) = base
            .split_once('/')
            .filter(|_| packed::is_base_ref(base))
            .ok_or_else(|| StoreError::Remote(format!("{base:?} is not a base page file")))?;
        Ok(format!(
            "{}/{id}.pages",
            join_prefix(&[&self.conn.base_prefix, app])?
        ))
    }

    /// Where this worker keeps a copy of base `base` (checked): `{bases_dir}/APP/ID.pages`.
    fn base_cache(&self, base: &str) -> PathBuf {
        let (app, id) = base.split_once('/').unwrap_or(("", base));
        self.bases_dir.join(app).join(format!("{id}.pages"))
    }

    /// [`S3Store::base_cache`], with its directory made.
    fn base_cache_made(&self, base: &str) -> Result<PathBuf, StoreError> {
        let path = self.base_cache(base);
        if let Some(dir) = path.parent() {
            crate::private::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        Ok(path)
    }

    /// Uploads page file `pages` of snapshot `manifest`: packed against its image's base
    /// if it shares enough pages with it (see [`packed::plan`]); else plain, and it
    /// becomes the image's base if the image has none.
    pub(super) async fn upload_pages(
        &self,
        manifest: &Manifest,
        pages: &std::path::Path,
    ) -> Result<PagesStored, StoreError> {
        let id = &manifest.id;
        let plain = self.object_key(id, "pages")?;
        let size = std::fs::metadata(pages)
            .map_err(io("reading", pages))?
            .len();
        let Some(app) = self.dedup_app() else {
            return self
                .upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain);
        };
        if size == 0 || size > MAX_BASE_BYTES {
            return self
                .upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain);
        }
        let pointer = self.image_pointer_key(manifest)?;
        let base = self
            .get_small(&pointer, 1024)
            .await?
            .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
            .filter(|base| packed::is_base_ref(base));
        let index = match &base {
            Some(base) => self.base_index(base).await?,
            None => None,
        };
        if let Some(index) = index {
            let (source, scratch) = (pages.to_path_buf(), self.scratch(id, "packed")?);
            let planned = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                let bytes = std::fs::read(&source).map_err(io("reading", &source))?;
                let Some((header, own)) = packed::plan(&bytes, &index) else {
                    return Ok(None);
                };
                let file =
                    crate::private::create_file(&scratch).map_err(io("creating", &scratch))?;
                let mut out = std::io::BufWriter::new(file);
                packed::write_packed(&header, &own, &bytes, &mut out)
                    .map_err(io("writing", &scratch))?;
                Ok(Some((header, scratch)))
            })
            .await
            .map_err(|_| S3Error::Panicked)??;
            if let Some((header, scratch)) = planned {
                let uploaded = self.upload(&scratch, &self.object_key(id, "packed")?).await;
                let _ = std::fs::remove_file(&scratch);
                uploaded?;
                tracing::debug!(
                    id,
                    base = header.base,
                    pages = header.logical_pages,
                    own = header.own_pages,
                    "page file stored packed"
                );
                return Ok(PagesStored::Packed {
                    pages: header.logical_pages,
                    own: header.own_pages,
                });
            }
            return self
                .upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain);
        }
        // The image has no base (or it is gone): this page file becomes it. The marker
        // goes first, so that no removal takes the page file once the pointer names it.
        self.upload(pages, &plain).await?;
        self.put_bytes(&self.object_key(id, "base")?, pointer.clone().into_bytes())
            .await?;
        let base = format!("{app}/{id}");
        self.put_bytes(&pointer, format!("{base}\n").into_bytes())
            .await?;
        // A copy for the next packing and restore; without one they fetch it.
        if let Ok(cached) = self.base_cache_made(&base) {
            if crate::private::copy(pages, &cached).is_err() {
                let _ = std::fs::remove_file(&cached);
            }
        }
        tracing::debug!(id, base, "page file stored plain, as its image's base");
        Ok(PagesStored::Base)
    }

    /// The page index of base `base` (`APP/ID`, checked): remembered, or read from this
    /// worker's copy, or fetched. `None` if the base is gone from S3.
    async fn base_index(&self, base: &str) -> Result<Option<Arc<BaseIndex>>, StoreError> {
        if let Some(index) = self.conn.bases.get(base) {
            return Ok(Some(index));
        }
        let Some(bytes) = self.base_bytes(base, None).await? else {
            return Ok(None);
        };
        let name = base.to_string();
        let index = tokio::task::spawn_blocking(move || Arc::new(BaseIndex::of(&name, &bytes)))
            .await
            .map_err(|_| S3Error::Panicked)?;
        self.conn.bases.put(index.clone());
        Ok(Some(index))
    }

    /// The bytes of base `base` (`APP/ID`, checked): from this worker's copy, or fetched
    /// into it. With `expected` (its size and digest, from a packed header), a copy that
    /// is not that is fetched again, and a fetched one that is not that is refused.
    /// `None` if the base is not in S3.
    async fn base_bytes(
        &self,
        base: &str,
        expected: Option<(u64, [u8; 32])>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.base_key(base)?;
        let cached = self.base_cache(base);
        let matches = |bytes: &[u8]| {
            expected.is_none_or(|(size, digest)| {
                bytes.len() as u64 == size && <[u8; 32]>::from(blake3::hash(bytes)) == digest
            })
        };
        if let Ok(bytes) = std::fs::read(&cached) {
            if matches(&bytes) {
                return Ok(Some(bytes));
            }
            let _ = std::fs::remove_file(&cached);
        }
        let size = match expected {
            Some((size, _)) => size,
            None => match self.object_size(&key).await? {
                Some(size) => size,
                None => return Ok(None),
            },
        };
        if size > MAX_BASE_BYTES || size % PAGE_SIZE != 0 {
            return Err(StoreError::Remote(format!(
                "base page file {}: {size} bytes (at most {MAX_BASE_BYTES}, whole pages)",
                self.url(&key)
            )));
        }
        let cached = self.base_cache_made(base)?;
        match self.download(&key, size, 0, &[], &cached).await {
            Ok(()) => {}
            Err(e) if expected.is_none() && self.object_size(&key).await?.is_none() => {
                tracing::debug!(base, "base gone: {e}");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let bytes = std::fs::read(&cached).map_err(io("reading", &cached))?;
        if !matches(&bytes) {
            let _ = std::fs::remove_file(&cached);
            return Err(StoreError::Remote(format!(
                "base page file {} is not the one its packed page files were made against",
                self.url(&key)
            )));
        }
        Ok(Some(bytes))
    }

    /// The packed object `{id}.packed`, or `None` if S3 has none.
    pub(super) async fn packed_object(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.object_key(id, "packed")?;
        self.get_small(&key, 16 + packed::MAX_HEADER + MAX_BASE_BYTES)
            .await
    }

    /// Fetches base `base` into this worker's copy unless it is there, ahead of the
    /// packed page file that needs it; a failure is left for that page file to meet.
    pub(super) async fn prefetch_base(&self, base: &str) {
        if !packed::is_base_ref(base) || self.base_cache(base).exists() {
            return;
        }
        if let Err(e) = self.base_bytes(base, None).await {
            tracing::debug!(base, "fetching a base ahead: {e}");
        }
    }

    /// `m`'s page file made from its packed object, if it is stored packed: `packed` (the
    /// object, if the first round trip brought it), or else, if no plain first part came
    /// (`head`) and the cache lacks the page file, the object fetched now. `None`: it is
    /// not packed. The page file still has to be checked against `m`.
    pub(super) async fn packed_pages(
        &self,
        m: &Manifest,
        head: Option<&super::FirstPart>,
        packed: Option<Vec<u8>>,
    ) -> Result<Option<PathBuf>, StoreError> {
        if let Some(bytes) = packed {
            return self
                .assemble_packed(&m.id, bytes, Some(m.page_count))
                .await
                .map(Some);
        }
        let cached = self.cache_dir.join(format!("{}.pages", m.id));
        let size = m.page_file_bytes();
        if head.is_some()
            || m.page_count == 0
            || size > MAX_BASE_BYTES
            || std::fs::metadata(&cached).is_ok_and(|meta| meta.len() == size)
        {
            return Ok(None);
        }
        match self.packed_object(&m.id).await? {
            Some(bytes) => self
                .assemble_packed(&m.id, bytes, Some(m.page_count))
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// Makes `{cache_dir}/{id}.pages` from the packed object `{id}.packed`, if there is
    /// one: returns its path, or `None` if S3 has no such object. The header's page count
    /// is taken, within [`MAX_BASE_BYTES`] (a caller without the manifest). The page file
    /// still has to be checked against its manifest.
    pub(super) async fn packed_page_file(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        match self.packed_object(id).await? {
            Some(bytes) => self.assemble_packed(id, bytes, None).await.map(Some),
            None => Ok(None),
        }
    }

    /// Makes `{cache_dir}/{id}.pages` from `bytes`, the packed object `{id}.packed`, and
    /// its base. `page_count` is the manifest's (authenticated) page count; without it,
    /// the header's is taken, within [`MAX_BASE_BYTES`].
    async fn assemble_packed(
        &self,
        id: &str,
        bytes: Vec<u8>,
        page_count: Option<u64>,
    ) -> Result<PathBuf, StoreError> {
        let key = self.object_key(id, "packed")?;
        let refused = |e: &dyn std::fmt::Display| {
            StoreError::Remote(format!("packed page file {}: {e}", self.url(&key)))
        };
        let header_len = packed::header_len(&bytes).map_err(|e| refused(&e))?;
        let prefix = bytes
            .get(..header_len as usize)
            .ok_or_else(|| refused(&"truncated"))?;
        let pages = match page_count {
            Some(pages) => pages,
            None => PackedHeader::logical_pages_of(prefix).map_err(|e| refused(&e))?,
        };
        if pages > MAX_BASE_BYTES / PAGE_SIZE {
            return Err(refused(&format!("{pages} pages")));
        }
        let header = packed::decode_header(prefix, pages).map_err(|e| refused(&e))?;
        let base_size = header.base_pages.saturating_mul(PAGE_SIZE);
        let base = self
            .base_bytes(&header.base, Some((base_size, header.base_digest)))
            .await?
            .ok_or_else(|| refused(&format!("its base {} is gone", header.base)))?;
        let serial = self
            .downloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dest = self.cache_dir.join(format!("{id}.pages"));
        let tmp = self.cache_dir.join(format!(
            ".{id}.pages.{}-{serial}.assemble",
            std::process::id()
        ));
        let (assembled, at) = (tmp.clone(), dest.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let own = &bytes[header_len as usize..];
            let result = packed::assemble(&header, own, &base, &assembled)
                .map_err(|e| StoreError::Remote(e.to_string()))
                .and_then(|()| std::fs::rename(&assembled, &at).map_err(io("renaming", &at)));
            if result.is_err() {
                let _ = std::fs::remove_file(&assembled);
            }
            result
        })
        .await
        .map_err(|_| S3Error::Panicked)??;
        tracing::debug!(id, "page file assembled from its packed object and base");
        Ok(dest)
    }

    /// How snapshot `id` is stored: the bytes its own objects take, and the base its
    /// page file is packed against, if it is packed.
    pub fn stored_as(&self, id: &str) -> Result<(u64, Option<String>), StoreError> {
        let bytes = self.size(id)?;
        let key = self.object_key(id, "packed")?;
        let base = self.run(async {
            match self.object_size(&key).await? {
                Some(_) => self.packed_base(&key).await,
                None => Ok(None),
            }
        })?;
        Ok((bytes, base))
    }

    /// Whether page file `id` is a base (its marker is there).
    pub(super) async fn is_base(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .object_size(&self.object_key(id, "base")?)
            .await?
            .is_some())
    }
}

/// What [`S3Store::collect_garbage`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GarbageReport {
    /// Bases still named by a packed page file or their own snapshot.
    pub bases_kept: usize,
    /// Bases no longer named by their image's pointer, to be removed by a later run.
    pub bases_retired: usize,
    /// Bases removed.
    pub bases_removed: usize,
}

impl S3Store {
    /// Removes the bases (page files kept for other apps' packed page files) that nothing
    /// names any more, across the whole bucket prefix, not only this store's app. A base
    /// whose snapshot is gone and that no packed page file names is first *retired*: its
    /// image's pointer is removed (so no new packed page file names it) and its marker
    /// rewritten; a run at least `grace` after that removes it, if still nothing names
    /// it. An upload that read the pointer before it went finishes within `grace`, so its
    /// packed page file is seen.
    pub fn collect_garbage(&self, grace: std::time::Duration) -> Result<GarbageReport, StoreError> {
        self.run(self.collect_garbage_async(grace))
    }

    async fn collect_garbage_async(
        &self,
        grace: std::time::Duration,
    ) -> Result<GarbageReport, StoreError> {
        let root = match join_prefix(&[&self.conn.base_prefix]) {
            Ok(prefix) => format!("{prefix}/"),
            Err(_) => String::new(),
        };
        let objects = self.all_objects(&root).await?;
        let exists = |key: &str| objects.iter().any(|(k, _)| k == key);
        // What packed page files and pointers name.
        let mut named = std::collections::HashSet::new();
        for (key, _) in objects.iter().filter(|(k, _)| k.ends_with(".packed")) {
            match self.packed_base(key).await {
                Ok(Some(base)) => {
                    named.insert(self.base_key(&base)?);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(key, "reading a packed page file's header: {e}"),
            }
        }
        let images = format!("{}/", join_prefix(&[&self.conn.base_prefix, ".images"])?);
        let mut pointers = Vec::new();
        for (key, _) in objects.iter().filter(|(k, _)| k.starts_with(&images)) {
            if let Some(bytes) = self.get_small(key, 1024).await? {
                let base = String::from_utf8_lossy(&bytes).trim().to_string();
                if packed::is_base_ref(&base) {
                    pointers.push((key.clone(), self.base_key(&base)?));
                }
            }
        }
        let mut report = GarbageReport::default();
        for (marker, modified) in objects.iter().filter(|(k, _)| k.ends_with(".base")) {
            let stem = marker.trim_end_matches(".base");
            let pages = format!("{stem}.pages");
            if exists(&format!("{stem}.manifest")) || named.contains(&pages) {
                report.bases_kept += 1;
                continue;
            }
            let pointed: Vec<&String> = pointers
                .iter()
                .filter(|(_, base)| *base == pages)
                .map(|(pointer, _)| pointer)
                .collect();
            if !pointed.is_empty() {
                for pointer in pointed {
                    self.delete(pointer).await?;
                }
                // Rewritten, so that its age counts from its retirement.
                self.put_bytes(marker, b"retired\n".to_vec()).await?;
                report.bases_retired += 1;
                continue;
            }
            let age = modified
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            if age < grace {
                report.bases_kept += 1;
                continue;
            }
            self.delete(&pages).await?;
            self.delete(marker).await?;
            report.bases_removed += 1;
        }
        tracing::info!(?report, "collected garbage in cold storage");
        Ok(report)
    }

    /// The base a packed object `key` names, from its header.
    async fn packed_base(&self, key: &str) -> Result<Option<String>, StoreError> {
        let super::FirstRange::Bytes(bytes, _) = self.first_range(key, 0..HEADER_PROBE).await?
        else {
            return Ok(None);
        };
        let refused = |e: &dyn std::fmt::Display| {
            StoreError::Remote(format!("packed page file {}: {e}", self.url(key)))
        };
        let len = packed::header_len(&bytes).map_err(|e| refused(&e))?;
        let bytes = if len as usize > bytes.len() {
            match self.first_range(key, 0..len).await? {
                super::FirstRange::Bytes(bytes, _) => bytes,
                _ => return Ok(None),
            }
        } else {
            bytes
        };
        let prefix = bytes
            .get(..len as usize)
            .ok_or_else(|| refused(&"truncated"))?;
        let pages = PackedHeader::logical_pages_of(prefix).map_err(|e| refused(&e))?;
        let header = packed::decode_header(prefix, pages).map_err(|e| refused(&e))?;
        Ok(Some(header.base))
    }

    /// Every object under `root` (recursively), with when it was last written.
    async fn all_objects(
        &self,
        root: &str,
    ) -> Result<Vec<(String, Option<std::time::SystemTime>)>, StoreError> {
        let mut objects = Vec::new();
        let mut token = None;
        loop {
            let list = self.conn.client.list_objects_v2().bucket(&self.conn.bucket);
            let out = list
                .prefix(root)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| super::request("ListObjectsV2", self.url(root), &e))?;
            objects.extend(out.contents().iter().filter_map(|object| {
                let modified = object
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                Some((object.key()?.to_string(), modified))
            }));
            token = out.next_continuation_token().map(str::to_string);
            if token.is_none() || out.is_truncated() != Some(true) {
                break;
            }
        }
        Ok(objects)
    }
}

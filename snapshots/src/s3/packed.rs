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
pub const MAX_BASE_BYTES: u64 = packed::MAX_PAGES * PAGE_SIZE;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagesStored {
    /// As it is (`ID.pages`).
    Plain,
    /// As it is, and it is to become its image's base once its snapshot is committed.
    Base(Promotion),
    /// Packed (`ID.packed`): `own` of its `pages` pages are stored, the rest are the
    /// base's.
    Packed {
        /// Its pages.
        pages: u64,
        /// Those stored in the packed object.
        own: u64,
    },
}

/// A page file to make its image's base ([`S3Store::promote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The image's pointer.
    pointer: String,
    /// What the pointer will say: `APP/ID SIZE DIGEST`.
    named: BaseName,
    /// The base the pointer named before, if any (unusable: gone, unmarked or changed).
    replaces: Option<String>,
}

/// What an image's pointer names: a base page file, its size and its BLAKE3 digest. The
/// size and digest are checked against the page file before anything is packed against
/// it, so a base that changed (or a pointer that lies) costs deduplication, not a
/// snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseName {
    base: String,
    size: u64,
    digest: [u8; 32],
}

impl BaseName {
    fn encode(&self) -> Vec<u8> {
        let digest: String = self.digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {} {digest}\n", self.base, self.size).into_bytes()
    }

    /// A pointer's text, if it is one (anything else is ignored).
    fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut fields = text.split_ascii_whitespace();
        let (base, size, hex) = (fields.next()?, fields.next()?, fields.next()?);
        if fields.next().is_some() || !packed::is_base_ref(base) || hex.len() != 64 {
            return None;
        }
        let size: u64 = size.parse().ok()?;
        let mut digest = [0u8; 32];
        for (k, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * k..2 * k + 2)?, 16).ok()?;
        }
        (size > 0 && size <= MAX_BASE_BYTES && size.is_multiple_of(PAGE_SIZE)).then(|| BaseName {
            base: base.to_string(),
            size,
            digest,
        })
    }
}

/// The longest pointer read.
const MAX_POINTER: u64 = 1024;

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

    /// The key of base `base`'s `kind` object (`APP/ID`, checked): `pages`, the plain page
    /// file it names, or `base`, its marker.
    fn base_key(&self, base: &str, kind: &str) -> Result<String, StoreError> {
        let (app, id) = base
            .split_once('/')
            .filter(|_| packed::is_base_ref(base))
            .ok_or_else(|| StoreError::Remote(format!("{base:?} is not a base page file")))?;
        Ok(format!(
            "{}/{id}.{kind}",
            join_prefix(&[&self.conn.base_prefix, app])?
        ))
    }

    /// Where this worker keeps a copy of base `base` (checked): `{bases_dir}/APP/ID.pages`.
    fn base_cache(&self, base: &str) -> PathBuf {
        let (app, id) = base.split_once('/').unwrap_or(("", base));
        self.bases_dir.join(app).join(format!("{id}.pages"))
    }

    /// Puts `bytes` at `path` whole or not at all (a temporary file, then a rename), so
    /// that a reader of the shared bases directory never sees part of a base.
    fn write_base_copy(&self, path: &std::path::Path, bytes: &[u8]) -> Result<(), StoreError> {
        if let Some(dir) = path.parent() {
            crate::private::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let tmp = path.with_extension(format!(
            "{}-{}.copy",
            std::process::id(),
            super::next_serial()
        ));
        let result = crate::private::write_synced(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io("writing", path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Uploads page file `pages` of snapshot `manifest`: packed against its image's base
    /// if it shares enough pages with it (see [`packed::plan`]); else plain, and, if the
    /// image has no usable base, to become it once the snapshot is committed. Anything
    /// wrong with the base (gone, changed, a pointer that is not one) means a plain
    /// upload, never a failed one.
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
        if size == 0 || size > MAX_BASE_BYTES || !size.is_multiple_of(PAGE_SIZE) {
            return self
                .upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain);
        }
        let pointer = self.image_pointer_key(manifest)?;
        let this = format!("{app}/{id}");
        let plain_upload = || async {
            self.upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain)
        };
        // A pointer or base that cannot be read now is not replaced: other uploads may
        // be packing against it. One that is not a pointer, or names a base that is gone,
        // unmarked or changed, is.
        let named = match self.read_pointer(&pointer).await {
            Ok(named) => named,
            Err(e) => {
                tracing::warn!(pointer, "reading an image's base pointer: {e}");
                return plain_upload().await;
            }
        };
        let index = match &named {
            // An upload tried again: its page file is the base already.
            Some(named) if named.base == this => return plain_upload().await,
            Some(named) => match self.base_index(named).await {
                Ok(index) => index,
                Err(e) => {
                    tracing::warn!(base = named.base, "reading an image's base: {e}");
                    return plain_upload().await;
                }
            },
            None => None,
        };
        let Some(index) = index else {
            self.upload(pages, &plain).await?;
            let digest = blake3::hash(&std::fs::read(pages).map_err(io("reading", pages))?).into();
            return Ok(PagesStored::Base(Promotion {
                pointer,
                named: BaseName {
                    base: this,
                    size,
                    digest,
                },
                replaces: named.map(|named| named.base),
            }));
        };
        let (source, scratch) = (pages.to_path_buf(), self.scratch(id, "packed")?);
        let planned = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let bytes = std::fs::read(&source).map_err(io("reading", &source))?;
            let Some((header, own)) = packed::plan(&bytes, &index) else {
                return Ok(None);
            };
            let file = crate::private::create_file(&scratch).map_err(io("creating", &scratch))?;
            let mut out = std::io::BufWriter::new(file);
            let header = packed::write_packed(&header, &own, &bytes, &mut out)
                .map_err(io("writing", &scratch))?;
            Ok(Some((header, scratch)))
        })
        .await
        .map_err(|_| S3Error::Panicked)??;
        let Some((header, scratch)) = planned else {
            return self
                .upload(pages, &plain)
                .await
                .map(|()| PagesStored::Plain);
        };
        let uploaded = self.upload(&scratch, &self.object_key(id, "packed")?).await;
        let _ = std::fs::remove_file(&scratch);
        uploaded?;
        tracing::debug!(
            id,
            base = header.base,
            pages = header.logical_pages,
            own = header.own_pages,
            own_bytes = header.own_bytes,
            "page file stored packed"
        );
        Ok(PagesStored::Packed {
            pages: header.logical_pages,
            own: header.own_pages,
        })
    }

    /// What the pointer `key` names: `None` if there is none, or it is not a pointer
    /// (junk of any size); an error only if it cannot be read.
    async fn read_pointer(&self, key: &str) -> Result<Option<BaseName>, StoreError> {
        match self.first_range(key, 0..MAX_POINTER + 1).await? {
            super::FirstRange::Bytes(bytes, size) if size <= MAX_POINTER => {
                Ok(BaseName::decode(&bytes))
            }
            _ => Ok(None),
        }
    }

    /// Makes a committed snapshot's page file (`pages`, its local copy) its image's base:
    /// its marker first, so that no removal takes the page file once the pointer names
    /// it, then the pointer. A failure costs deduplication only: it is logged.
    pub(super) async fn promote(&self, promotion: Promotion, pages: &std::path::Path) {
        let Promotion {
            pointer,
            named,
            replaces,
        } = promotion;
        let promoted = async {
            // The base it replaces keeps a grace from now, as if retired by garbage
            // collection: an upload that read the old pointer may still be packing against
            // it. (Only a marked one: marking an ordinary page file would make it garbage.)
            if let Some(old) = replaces {
                let old_marker = self.base_key(&old, "base")?;
                if self.object_size(&old_marker).await?.is_some() {
                    self.put_bytes(&old_marker, b"replaced\n".to_vec()).await?;
                }
            }
            let marker = self.base_key(&named.base, "base")?;
            self.put_bytes(&marker, pointer.clone().into_bytes())
                .await?;
            self.put_bytes(&pointer, named.encode()).await
        };
        if let Err(e) = promoted.await {
            tracing::warn!(
                base = named.base,
                "making a page file its image's base: {e}"
            );
            return;
        }
        // A copy for the next packing and restore; without one they fetch it.
        if let Ok(bytes) = std::fs::read(pages) {
            if let Err(e) = self.write_base_copy(&self.base_cache(&named.base), &bytes) {
                tracing::debug!(base = named.base, "keeping a copy of a base: {e}");
            }
        }
        tracing::debug!(
            base = named.base,
            "page file stored plain, as its image's base"
        );
    }

    /// The page index of the base `named`: remembered, or made from this worker's copy
    /// or a fetched one, which must have the size and digest the pointer names, and be
    /// marked as a base. `None` if it is gone from S3.
    async fn base_index(&self, named: &BaseName) -> Result<Option<Arc<BaseIndex>>, StoreError> {
        // Asked at every use, a remembered index too: a page file the pointer names but
        // that is not marked is an ordinary one, which its snapshot's removal would take,
        // and one garbage collection took is gone.
        let (marker, pages) = (
            self.base_key(&named.base, "base")?,
            self.base_key(&named.base, "pages")?,
        );
        let (marked, there) =
            futures::future::try_join(self.object_size(&marker), self.object_size(&pages)).await?;
        if marked.is_none() || there.is_none() {
            return Ok(None);
        }
        if let Some(index) = self.conn.bases.get(&named.base) {
            if index.digest == named.digest {
                return Ok(Some(index));
            }
        }
        let Some(bytes) = self
            .base_bytes(&named.base, Some((named.size, named.digest)))
            .await?
        else {
            return Ok(None);
        };
        let name = named.base.clone();
        let index = tokio::task::spawn_blocking(move || Arc::new(BaseIndex::of(&name, &bytes)))
            .await
            .map_err(|_| S3Error::Panicked)?;
        self.conn.bases.put(index.clone());
        Ok(Some(index))
    }

    /// The bytes of base `base` (`APP/ID`, checked): from this worker's copy, or fetched
    /// into it. With `expected` (its size and digest, from a pointer or a packed header), a
    /// copy that is not that is fetched again, and a fetched one that is not that is
    /// refused. `None` if the base is not in S3.
    async fn base_bytes(
        &self,
        base: &str,
        expected: Option<(u64, [u8; 32])>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.base_key(base, "pages")?;
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
        }
        let size = match expected {
            Some((size, _)) => size,
            None => match self.object_size(&key).await? {
                Some(size) => size,
                None => return Ok(None),
            },
        };
        if size == 0 || size > MAX_BASE_BYTES || !size.is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::Remote(format!(
                "base page file {}: {size} bytes (at most {MAX_BASE_BYTES}, whole pages)",
                self.url(&key)
            )));
        }
        // Fetched beside the copy, then renamed over it whole: several restores and
        // uploads may want one base at once.
        let fetched = cached.with_extension(format!(
            "{}-{}.fetched",
            std::process::id(),
            super::next_serial()
        ));
        if let Some(dir) = fetched.parent() {
            crate::private::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        // In 4 GETs at once (of 256 KiB at least): a base is fetched when a restore waits,
        // beside the rest of its round trip's requests.
        let piece = size.div_ceil(4).max(256 << 10);
        let downloaded = self
            .download_in(&key, size, (size, piece), &[], &fetched)
            .await;
        let bytes =
            downloaded.and_then(|()| std::fs::read(&fetched).map_err(io("reading", &fetched)));
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = std::fs::remove_file(&fetched);
                if expected.is_none() && self.object_size(&key).await?.is_none() {
                    tracing::debug!(base, "base gone: {e}");
                    return Ok(None);
                }
                return Err(e);
            }
        };
        if !matches(&bytes) {
            let _ = std::fs::remove_file(&fetched);
            return Err(StoreError::Remote(format!(
                "base page file {} is not the one its packed page files were made against",
                self.url(&key)
            )));
        }
        std::fs::rename(&fetched, &cached).map_err(io("renaming", &cached))?;
        Ok(Some(bytes))
    }

    /// The packed object `{id}.packed`, or `None` if S3 has none: at most a header and
    /// `page_count` pages (if the manifest is in; else [`MAX_BASE_BYTES`]). Its first
    /// 2 MiB come in `pieces` ranged GETs at once (over a wide-area link one connection is
    /// slow, but a round trip must not ask for more than its connections), the rest, if
    /// any, in parallel ranges after.
    pub(super) async fn packed_object(
        &self,
        id: &str,
        page_count: Option<u64>,
        pieces: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.object_key(id, "packed")?;
        let pages = page_count.map_or(MAX_BASE_BYTES, |pages| {
            pages.saturating_mul(PAGE_SIZE).min(MAX_BASE_BYTES)
        });
        let cap = 16 + packed::MAX_HEADER + pages;
        let asked = std::time::Instant::now();
        let shape = super::FirstPartShape::plain(pieces);
        let Some(head) = self.first_part_of(&key, shape).await? else {
            return Ok(None);
        };
        if head.size > cap {
            return Err(StoreError::Remote(format!(
                "packed page file {}: {} bytes, over the {cap}-byte limit",
                self.url(&key),
                head.size
            )));
        }
        let object = if head.bytes.len() as u64 == head.size {
            head.bytes
        } else {
            // The rest in parallel ranges, through a file of its own.
            let tmp = self.cache_dir.join(format!(
                ".{id}.packed.{}-{}",
                std::process::id(),
                super::next_serial()
            ));
            let fetched = self
                .download_in(
                    &key,
                    head.size,
                    (0, super::ACTIVE_PART_SIZE),
                    &head.bytes,
                    &tmp,
                )
                .await
                .and_then(|()| std::fs::read(&tmp).map_err(io("reading", &tmp)));
            let _ = std::fs::remove_file(&tmp);
            fetched?
        };
        tracing::debug!(
            key,
            bytes = object.len(),
            ms = asked.elapsed().as_secs_f64() * 1e3,
            "packed object"
        );
        Ok(Some(object))
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
        let cached = self.cache_dir.join(format!("{}.pages", m.id));
        let size = m.page_file_bytes();
        if m.page_count == 0
            || size > MAX_BASE_BYTES
            || std::fs::metadata(&cached).is_ok_and(|meta| meta.len() == size)
        {
            return Ok(None);
        }
        if let Some(bytes) = packed {
            return self
                .assemble_packed(&m.id, bytes, Some(m.page_count))
                .await
                .map(Some);
        }
        if head.is_some() {
            return Ok(None);
        }
        match Box::pin(self.packed_object(&m.id, Some(m.page_count), 1)).await? {
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
        match self.packed_object(id, None, 1).await? {
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
        let serial = super::next_serial();
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
        // A missing packed object reads as none: no HEAD first (a round trip per level).
        let base = self.run(self.packed_base(&self.object_key(id, "packed")?))?;
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
        let objects = self.list_objects(&root, true).await?;
        let exists = |key: &str| objects.iter().any(|(k, _)| k == key);
        // What packed page files name. A header that cannot be read ends the run: the
        // base it names might be taken for garbage.
        let mut named = std::collections::HashSet::new();
        for (key, _) in objects.iter().filter(|(k, _)| k.ends_with(".packed")) {
            match self.packed_base(key).await {
                Ok(Some(base)) => {
                    named.insert(self.base_key(&base, "pages")?);
                }
                Ok(None) => {}
                // Junk without a snapshot (its manifest) names nothing that matters; one
                // of a snapshot might name any base.
                Err(e)
                    if !exists(&format!(
                        "{}.manifest",
                        key.strip_suffix(".packed").unwrap_or(key)
                    )) =>
                {
                    tracing::warn!(key, "a packed object of no snapshot is unreadable: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        // What the images' pointers name (a pointer that is not one names nothing).
        let images = format!("{}/", join_prefix(&[&self.conn.base_prefix, ".images"])?);
        let mut pointers = Vec::new();
        for (key, _) in objects.iter().filter(|(k, _)| k.starts_with(&images)) {
            // One that cannot be read ends the run: the base it names would look unnamed.
            if let Some(named) = self.read_pointer(key).await? {
                pointers.push((key.clone(), self.base_key(&named.base, "pages")?));
            }
        }
        let age = |modified: Option<std::time::SystemTime>| {
            modified
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .unwrap_or_default()
        };
        let mut report = GarbageReport::default();
        for (marker, modified) in objects.iter() {
            let Some(stem) = marker.strip_suffix(".base") else {
                continue;
            };
            let pages = format!("{stem}.pages");
            // A marker younger than the grace is kept whatever it looks like: its
            // snapshot's manifest may be on its way, or another run just retired it.
            if exists(&format!("{stem}.manifest"))
                || named.contains(&pages)
                || age(*modified) < grace
            {
                report.bases_kept += 1;
                continue;
            }
            let pointed: Vec<&String> = pointers
                .iter()
                .filter(|(_, base)| *base == pages)
                .map(|(pointer, _)| pointer)
                .collect();
            if !pointed.is_empty() {
                // Rewritten first, so that its age counts from its retirement whatever
                // becomes of the rest of this run.
                self.put_bytes(marker, b"retired\n".to_vec()).await?;
                for pointer in pointed {
                    self.delete(pointer).await?;
                }
                report.bases_retired += 1;
                continue;
            }
            // Asked again: another worker's run may have retired it since the listing.
            if age(self.object_modified(marker).await?) < grace {
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
}

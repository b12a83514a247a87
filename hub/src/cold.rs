//! Cold storage for a worker: where each app's snapshots rest while it is swapped out.
//!
//! A VMM always writes and restores snapshots through a local directory store (its
//! page file is mapped as guest memory, so it must be local). With the local backend that
//! directory *is* cold storage (`<dir>/<app>/`), shared by every worker of the host. With
//! S3, the directory is the worker's staging cache: after a swap-out the worker uploads
//! the new snapshot (an increment only carries what changed), and before a restore it
//! downloads what the cache lacks of the chain, ActiveSet first.

use picocenter_snapshots::chain::{ChainHint, PackedLevel};
use picocenter_snapshots::compact::compact;
use picocenter_snapshots::names::validate_app_name;
use picocenter_snapshots::s3::{ChainStream, S3Config, S3Connection, S3Store, MAX_BASE_BYTES};
use picocenter_snapshots::{copy_chain, store::chain, LocalStore, SnapshotKey, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The longest snapshot chain kept in a local directory: a swap-out that makes it longer
/// compacts it.
pub const MAX_CHAIN: usize = 8;
/// The same in S3, where each snapshot of a chain costs a restore its own round trips.
pub const MAX_CHAIN_S3: usize = 3;
/// A chain in S3 whose snapshots hold at most this many bytes in all is compacted to one
/// at every swap-out.
pub const SMALL_CHAIN_S3: u64 = 4 << 20;
/// Connections to S3 a worker keeps open for its next restore: its first round trip asks
/// at once for the newest manifest, its data and its page file's first part, and the same
/// for each ancestor the hub names (the oldest's part in four pieces, the others' in
/// one): 9 requests for a chain of two, 12 for one of [`MAX_CHAIN_S3`]. One that finds no
/// open connection pays a handshake, another round trip over a wide-area link; but more
/// would fill a link that admits 16 connections with idle ones.
pub const WARM_S3_CONNECTIONS: usize = 8;
/// Where a worker keeps copies of image bases (README of the snapshots crate, §5.7), in
/// its cache: not an app name, so never evicted as one.
pub const BASES_DIR: &str = ".bases";
/// How long a retired image base stays before garbage collection removes it: longer than
/// any upload that may have read its pointer before it was retired.
pub const BASE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);
/// How often a worker collects garbage in S3.
pub const GARBAGE_PERIOD: std::time::Duration = std::time::Duration::from_secs(600);
/// How often a worker uses each of them, to keep it open.
pub const WARM_S3_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// Which cold storage backend, and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ColdConfig {
    /// A local directory: `<dir>/<app>/`.
    Local {
        /// The directory.
        dir: PathBuf,
    },
    /// An S3 bucket: `<prefix>/<app>/`.
    S3(S3Config),
}

/// A snapshot settled in the local store, for cold storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The snapshot to restore next (the one written, or the chain compacted into one).
    pub id: String,
    /// What its chain looks like. The hub keeps it, so that a restore from S3 asks for
    /// every level, and each level's ActiveSet, with the newest manifest (one round trip,
    /// not one more for the older ones and another for the pages the app needs first).
    pub chain_hint: ChainHint,
    /// Bytes its chain holds in cold storage.
    pub bytes: u64,
    /// When the app wants to run again by itself (its earliest deadline: a blocked call's
    /// timeout, an armed timerfd or the alarm), Unix ms.
    pub wake_at_unix_ms: Option<u64>,
    /// Snapshots in S3 that a compaction replaced: [`Cold::prune`] removes them after the
    /// swap-out is reported, so that their deletion does not hold it up.
    pub replaced: Vec<String>,
}

/// A chain uploaded to S3 ([`Cold::upload`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes its snapshots' own objects take in S3: a packed page file counts the pages
    /// it does not share with its image's base.
    pub stored_bytes: u64,
    /// Its levels stored packed, for the hub's [`ChainHint::packed`].
    pub packed: Vec<PackedLevel>,
}

/// A worker's cold storage. Everything it holds is untrusted: manifests are read only under
/// the cluster's key, and an app name becomes a directory or key prefix only once it is
/// checked ([`validate_app_name`]). Local directories are made 0700 and files 0600.
#[derive(Debug, Clone)]
pub struct Cold {
    config: ColdConfig,
    /// The worker's staging cache (S3 only).
    cache: PathBuf,
    /// The cluster's snapshot key.
    key: SnapshotKey,
    /// The S3 client every app's store shares (made on first use), so that connections
    /// stay open from one swap to the next.
    s3: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<S3Connection>>>,
    /// Per app, whether its last upload stored the chain's full snapshot packed in at most
    /// [`SMALL_CHAIN_S3`] bytes: then its chain is compacted at every swap-out (see
    /// [`Cold::settle`]).
    packs_small: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
}

impl Cold {
    /// Cold storage as `config` says, with `cache` for the S3 staging copies, its
    /// manifests checked and written under `key`.
    pub fn new(config: ColdConfig, cache: &Path, key: SnapshotKey) -> Self {
        Self {
            config,
            cache: cache.to_path_buf(),
            key,
            s3: Default::default(),
            packs_small: Default::default(),
        }
    }

    /// The shared S3 client (see [`Cold::s3`]).
    fn s3_connection(&self, config: &S3Config) -> Result<std::sync::Arc<S3Connection>, StoreError> {
        if let Some(conn) = self.s3.get() {
            return Ok(conn.clone());
        }
        let conn = S3Connection::open(config)?;
        conn.keep_warm(WARM_S3_CONNECTIONS, WARM_S3_PERIOD);
        // Two first uses at once make two; one is kept (the other's runtime, and so its
        // keep-warm task, stops when it is dropped).
        Ok(self.s3.get_or_init(|| conn).clone())
    }

    /// Bytes of object bodies sent to and received from S3 so far: (up, down); (0, 0)
    /// with a local directory, which the VMMs write and map in place.
    pub fn traffic(&self) -> (u64, u64) {
        self.s3.get().map_or((0, 0), |conn| conn.traffic())
    }

    /// A description for logs.
    pub fn describe(&self) -> String {
        match &self.config {
            ColdConfig::Local { dir } => dir.display().to_string(),
            ColdConfig::S3(s3) => format!(
                "s3://{}/{}{}",
                s3.bucket,
                s3.prefix,
                s3.endpoint
                    .as_deref()
                    .map(|e| format!(" at {e}"))
                    .unwrap_or_default()
            ),
        }
    }

    /// Checks that cold storage is reachable, making the S3 bucket if it does not exist.
    pub fn prepare(&self) -> Result<(), StoreError> {
        match &self.config {
            ColdConfig::Local { dir } => LocalStore::open(dir).map(drop),
            ColdConfig::S3(s3) => S3Store::on(
                self.s3_connection(s3)?,
                "picocenter",
                &self.cache.join(".probe"),
            )?
            .ensure_bucket(),
        }
    }

    /// The local store directory the VMM of `app` snapshots into and restores from.
    pub fn local_dir(&self, app: &str) -> Result<PathBuf, StoreError> {
        validate_app_name(app)?;
        Ok(match &self.config {
            ColdConfig::Local { dir } => dir.join(app),
            ColdConfig::S3(_) => self.cache.join(app).join("store"),
        })
    }

    fn remote(&self, app: &str) -> Result<Option<S3Store>, StoreError> {
        validate_app_name(app)?;
        match &self.config {
            ColdConfig::Local { .. } => Ok(None),
            ColdConfig::S3(s3) => S3Store::on(
                self.s3_connection(s3)?,
                app,
                &self.cache.join(app).join("download"),
            )
            .map(|store| Some(store.with_bases_dir(&self.cache.join(BASES_DIR)))),
        }
    }

    /// Whether a snapshot must still be uploaded once it is settled: with S3 (a local
    /// directory is cold storage itself).
    pub fn uploads(&self) -> bool {
        matches!(self.config, ColdConfig::S3(_))
    }

    /// After the VMM of `app` wrote snapshot `id` into [`Cold::local_dir`]: settles it
    /// there, ready to restore from and to [upload](Cold::upload). A chain grown past
    /// [`MAX_CHAIN`] snapshots ([`MAX_CHAIN_S3`] in S3) is compacted first, so a restore
    /// never reads more than that many; unless `may_compact` is false (an upload of the
    /// app is still reading the chain), when only a chain past [`MAX_CHAIN`] is.
    pub fn settle(&self, app: &str, id: &str, may_compact: bool) -> Result<Stored, StoreError> {
        let local = LocalStore::open(&self.local_dir(app)?)?;
        let mut manifests = chain(&local, &self.key, id)?;
        let (longest, small) = match (&self.config, may_compact) {
            (ColdConfig::Local { .. }, _) | (_, false) => (MAX_CHAIN, 0),
            (ColdConfig::S3(_), true) => (MAX_CHAIN_S3, SMALL_CHAIN_S3),
        };
        let mut chain_bytes = 0u64;
        for manifest in &manifests {
            chain_bytes = chain_bytes.saturating_add(local.size(&manifest.id)?);
        }
        // A small app's chain is kept at one snapshot: uploading all of it costs little,
        // and a restore from S3 then needs one round trip, not one more per increment. So
        // is one whose full snapshot S3 stored packed in at most as many bytes, last time
        // (a page file that does not pack small would be uploaded whole at every swap-out).
        let packs_small = self
            .packs_small
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(app)
            .copied()
            .unwrap_or(false);
        let packable = match &self.config {
            ColdConfig::S3(s3) => {
                s3.dedup
                    && may_compact
                    && packs_small
                    && stored_page_bytes(&manifests[0]) <= MAX_BASE_BYTES
            }
            ColdConfig::Local { .. } => false,
        };
        let compacted = manifests.len() > longest
            || (manifests.len() > 1 && (chain_bytes <= small || packable));
        let chain_ids: Vec<String> = manifests.iter().map(|m| m.id.clone()).collect();
        if compacted {
            let full =
                compact(&local, &self.key, id).map_err(|e| StoreError::Remote(e.to_string()))?;
            tracing::info!(app, from = %id, to = %full.id, "compacted the snapshot chain");
            manifests = vec![full];
        }
        let newest = &manifests[0];
        // Cold storage will hold the same objects as the local store: the chain measured
        // above, or what it was compacted into.
        let bytes = if compacted {
            local.size(&newest.id)?
        } else {
            chain_bytes
        };
        Ok(Stored {
            id: newest.id.clone(),
            chain_hint: ChainHint::of(&manifests),
            bytes,
            wake_at_unix_ms: newest.wake_at_unix_ms(),
            // What the compacted snapshot replaces goes from S3 once it is there.
            replaced: if compacted && self.uploads() {
                chain_ids
            } else {
                Vec::new()
            },
        })
    }

    /// How many snapshots the chain of `app` that ends at `id` holds, in the local store.
    pub fn chain_len(&self, app: &str, id: &str) -> Result<usize, StoreError> {
        let local = LocalStore::open(&self.local_dir(app)?)?;
        Ok(chain(&local, &self.key, id)?.len())
    }

    /// Puts settled snapshot `id` of `app`, and what it builds on, in S3: what S3 lacks
    /// of its chain, oldest first, HEAD last, so a worker that dies meanwhile leaves the
    /// previous snapshot whole there. Returns what its chain takes in S3 and which of its
    /// levels are packed, or `None` with a local directory, where there is nothing to do.
    pub fn upload(&self, app: &str, id: &str) -> Result<Option<Uploaded>, StoreError> {
        let Some(remote) = self.remote(app)? else {
            return Ok(None);
        };
        let local = LocalStore::open(&self.local_dir(app)?)?;
        copy_chain(&local, &remote, &self.key, id)?;
        // What it takes in S3 is for metering and the hint: a failure to learn it does not
        // fail the upload, which is in S3 and HEAD by now.
        let chain = chain(&local, &self.key, id)?;
        let mut uploaded = Uploaded::default();
        let mut full_packed_small = false;
        for (depth, manifest) in chain.iter().enumerate() {
            let (bytes, base) = match remote.stored_as(&manifest.id) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::warn!(app, snapshot = %manifest.id, "how S3 stores it: {e}");
                    (local.size(&manifest.id).unwrap_or(0), None)
                }
            };
            uploaded.stored_bytes = uploaded.stored_bytes.saturating_add(bytes);
            if let Some(base) = base {
                // The chain's full snapshot (its oldest), stored packed and small.
                full_packed_small = depth + 1 == chain.len() && bytes <= SMALL_CHAIN_S3;
                uploaded.packed.push(PackedLevel {
                    id: manifest.id.clone(),
                    base,
                });
            }
        }
        self.packs_small
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app.to_string(), full_packed_small);
        Ok(Some(uploaded))
    }

    /// With S3: removes the image bases nothing names any more, bucket-wide (see
    /// [`S3Store::collect_garbage`]); a base is retired first, and removed by a run at
    /// least `grace` later.
    pub fn collect_garbage(
        &self,
        grace: std::time::Duration,
    ) -> Result<Option<picocenter_snapshots::s3::GarbageReport>, StoreError> {
        match &self.config {
            ColdConfig::Local { .. } => Ok(None),
            ColdConfig::S3(s3) => S3Store::on(
                self.s3_connection(s3)?,
                "picocenter",
                &self.cache.join(".probe"),
            )?
            .collect_garbage(grace)
            .map(Some),
        }
    }

    /// With S3: while this worker's local copies take more than `limit` bytes, deletes
    /// those of the apps in `evictable` (oldest first; their next restore fetches from
    /// S3), then, if that was not enough, its copies of image bases. Returns the apps
    /// whose copies went.
    pub fn trim_cache(
        &self,
        limit: u64,
        evictable: impl Iterator<Item = String>,
    ) -> Result<Vec<String>, StoreError> {
        if !matches!(self.config, ColdConfig::S3(_)) {
            return Ok(Vec::new());
        }
        let mut total = tree_bytes(&self.cache);
        let mut evicted = Vec::new();
        for app in evictable {
            if total <= limit {
                break;
            }
            validate_app_name(&app)?;
            let dir = self.cache.join(&app);
            let bytes = tree_bytes(&dir);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(StoreError::Io {
                        what: "evicting",
                        path: dir.display().to_string(),
                        source,
                    })
                }
            }
            total = total.saturating_sub(bytes);
            evicted.push(app);
        }
        // Then the copies of image bases (a restore or upload fetches one it needs again).
        // Only whole copies (`*.pages`) go, not the directories nor a copy being written,
        // which a restore or upload may be renaming into place now; a reader has its copy
        // in memory already.
        if total > limit {
            let mut evicted_bases = 0;
            let apps = std::fs::read_dir(self.cache.join(BASES_DIR));
            for app in apps.into_iter().flatten().flatten() {
                for copy in std::fs::read_dir(app.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = copy.path();
                    if path.extension().is_some_and(|ext| ext == "pages")
                        && std::fs::remove_file(&path).is_ok()
                    {
                        evicted_bases += 1;
                    }
                }
            }
            if evicted_bases > 0 {
                tracing::info!(evicted_bases, "evicted the copies of image bases");
            }
        }
        Ok(evicted)
    }

    /// Removes the snapshots `replaced` of `app` from S3 (see [`Stored::replaced`]). They
    /// are named, not listed, so a newer snapshot being uploaded meanwhile is never
    /// touched.
    pub fn prune(&self, app: &str, replaced: &[String]) -> Result<(), StoreError> {
        if let Some(remote) = self.remote(app)? {
            for id in replaced {
                remote.remove(id)?;
            }
        }
        Ok(())
    }

    /// Before a restore of `app` at snapshot `id`: makes the chain restorable from the
    /// local directory, which it returns. With S3, what the first round trips do not
    /// bring whole is left to stream: the snapshots are committed there as pending, and
    /// the stream returned must be [run](ChainStream::run) against the restoring VMM's
    /// page feed; the pages of `first_port`'s requests come first. `hint` is what the hub
    /// knows of the chain (see [`Stored::chain_hint`]).
    pub fn fetch_streaming(
        &self,
        app: &str,
        id: &str,
        hint: &ChainHint,
        first_port: Option<u16>,
    ) -> Result<(PathBuf, Option<ChainStream>), StoreError> {
        let dir = self.local_dir(app)?;
        let Some(remote) = self.remote(app)? else {
            return Ok((dir, None));
        };
        let local = LocalStore::open(&dir)?;
        let started = std::time::Instant::now();
        let stream = remote.open_stream(&local, &self.key, id, hint, first_port)?;
        tracing::info!(
            app,
            streaming = ?stream.as_ref().map(ChainStream::ids),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "fetched the manifests from S3"
        );
        Ok((dir, stream))
    }

    /// Before a restore of `app` at snapshot `id`: makes the chain local. Returns the
    /// directory to restore from. `hint` as for [`Cold::fetch_streaming`].
    pub fn fetch(&self, app: &str, id: &str, hint: &ChainHint) -> Result<PathBuf, StoreError> {
        let dir = self.local_dir(app)?;
        if let Some(remote) = self.remote(app)? {
            let local = LocalStore::open(&dir)?;
            let started = std::time::Instant::now();
            let fetched = remote.fetch_chain(&local, &self.key, id, hint)?;
            tracing::info!(
                app,
                ?fetched,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "fetched from S3"
            );
        }
        Ok(dir)
    }
}

impl Cold {
    /// Deletes every snapshot of `app`, in cold storage and in this worker's cache.
    /// Returns how many snapshots cold storage held.
    pub fn forget(&self, app: &str) -> Result<usize, StoreError> {
        let removed = match self.remote(app)? {
            Some(remote) => {
                let ids = remote.list()?;
                remote.remove_everything()?;
                ids.len()
            }
            None => LocalStore::open(&self.local_dir(app)?)?.list()?.len(),
        };
        validate_app_name(app)?;
        let local = match &self.config {
            ColdConfig::Local { dir } => dir.join(app),
            ColdConfig::S3(_) => self.cache.join(app),
        };
        match std::fs::remove_dir_all(&local) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    what: "removing",
                    path: local.display().to_string(),
                    source,
                })
            }
        }
        Ok(removed)
    }
}

/// Bytes of the page file that compacting `newest`'s chain would write: its pages stored
/// in it or in a parent.
fn stored_page_bytes(newest: &picocenter_snapshots::Manifest) -> u64 {
    use picocenter_snapshots::format::{PageSource, PAGE_SIZE};
    newest
        .pages
        .iter()
        .filter(|run| matches!(run.source, PageSource::Stored { .. } | PageSource::Parent))
        .map(|run| run.count)
        .fold(0u64, u64::saturating_add)
        .saturating_mul(PAGE_SIZE)
}

/// Bytes of the regular files under `dir` (symlinks are not followed; what cannot be
/// read counts nothing).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => tree_bytes(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .fold(0u64, u64::saturating_add)
}

//! Cold storage for a worker: where each app's snapshots rest while it is swapped out.
//!
//! A VMM always writes and restores snapshots through a local directory store (its
//! page file is mapped as guest memory, so it must be local). With the local backend that
//! directory *is* cold storage (`<dir>/<app>/`), shared by every worker of the host. With
//! S3, the directory is the worker's staging cache: after a swap-out the worker uploads
//! the new snapshot (an increment only carries what changed), and before a restore it
//! downloads what the cache lacks of the chain, ActiveSet first.

use picocenter_snapshots::compact::compact;
use picocenter_snapshots::s3::{S3Config, S3Store};
use picocenter_snapshots::{copy_chain, store::chain, LocalStore, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The longest snapshot chain kept in a local directory: a swap-out that makes it longer
/// compacts it.
pub const MAX_CHAIN: usize = 8;
/// The same in S3, where each snapshot of a chain costs a restore its own round trips.
pub const MAX_CHAIN_S3: usize = 3;

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

/// A worker's cold storage.
#[derive(Debug, Clone)]
pub struct Cold {
    config: ColdConfig,
    /// The worker's staging cache (S3 only).
    cache: PathBuf,
}

impl Cold {
    /// Cold storage as `config` says, with `cache` for the S3 staging copies.
    pub fn new(config: ColdConfig, cache: &Path) -> Self {
        Self {
            config,
            cache: cache.to_path_buf(),
        }
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
            ColdConfig::S3(s3) => {
                S3Store::open(s3, "picocenter", &self.cache.join(".probe"))?.ensure_bucket()
            }
        }
    }

    /// The local store directory the VMM of `app` snapshots into and restores from.
    pub fn local_dir(&self, app: &str) -> PathBuf {
        match &self.config {
            ColdConfig::Local { dir } => dir.join(app),
            ColdConfig::S3(_) => self.cache.join(app).join("store"),
        }
    }

    fn remote(&self, app: &str) -> Result<Option<S3Store>, StoreError> {
        match &self.config {
            ColdConfig::Local { .. } => Ok(None),
            ColdConfig::S3(s3) => {
                let prefix = if s3.prefix.is_empty() {
                    app.to_string()
                } else {
                    format!("{}/{app}", s3.prefix.trim_end_matches('/'))
                };
                let mut config = s3.clone();
                config.prefix = String::new();
                S3Store::open(&config, &prefix, &self.cache.join(app).join("download")).map(Some)
            }
        }
    }

    /// After the VMM of `app` wrote snapshot `id` into [`Cold::local_dir`]: puts it in
    /// cold storage. A chain grown past [`MAX_CHAIN`] increments is compacted first (past
    /// [`MAX_CHAIN_S3`] for S3), so a restore never reads more than that many snapshots. Returns the snapshot to restore
    /// next (`id`, or the compacted one) and the bytes its chain holds in cold storage.
    pub fn store(&self, app: &str, id: &str) -> Result<(String, u64), StoreError> {
        let local = LocalStore::open(&self.local_dir(app))?;
        let mut id = id.to_string();
        let longest = match self.config {
            ColdConfig::Local { .. } => MAX_CHAIN,
            ColdConfig::S3(_) => MAX_CHAIN_S3,
        };
        if chain(&local, &id)?.len() > longest {
            let compacted = compact(&local, &id).map_err(|e| StoreError::Remote(e.to_string()))?;
            tracing::info!(app, from = %id, to = %compacted.id, "compacted the snapshot chain");
            id = compacted.id;
        }
        match self.remote(app)? {
            None => Ok((id.clone(), chain_bytes(&local, &id)?)),
            Some(remote) => {
                copy_chain(&local, &remote, &id)?;
                // What the new chain does not need (after a compaction) goes.
                let keep: Vec<String> = chain(&remote, &id)?.into_iter().map(|m| m.id).collect();
                for old in remote.list()? {
                    if !keep.contains(&old) {
                        remote.remove(&old)?;
                    }
                }
                Ok((id.clone(), chain_bytes(&remote, &id)?))
            }
        }
    }

    /// Before a restore of `app` at snapshot `id`: makes the chain local. Returns the
    /// directory to restore from.
    pub fn fetch(&self, app: &str, id: &str) -> Result<PathBuf, StoreError> {
        let dir = self.local_dir(app);
        if let Some(remote) = self.remote(app)? {
            let local = LocalStore::open(&dir)?;
            let started = std::time::Instant::now();
            let fetched = remote.fetch_chain(&local, id)?;
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
                for id in &ids {
                    remote.remove(id)?;
                }
                ids.len()
            }
            None => LocalStore::open(&self.local_dir(app))?.list()?.len(),
        };
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

/// Bytes the chain ending at `id` holds in `store`.
fn chain_bytes(store: &dyn Store, id: &str) -> Result<u64, StoreError> {
    let mut total = 0;
    for manifest in chain(store, id)? {
        total += store.size(&manifest.id)?;
    }
    Ok(total)
}

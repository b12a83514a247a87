//! The `--key-file` option: the cluster's snapshot key (see `picocenter_snapshots::key`).

use anyhow::Context;
use picocenter_snapshots::key::{default_path, SnapshotKey};
use std::path::{Path, PathBuf};

/// Where the snapshot key is.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyFile {
    /// The cluster's snapshot key: manifests are authenticated with it (HMAC-SHA256), and
    /// one that does not check out is refused. Default: <state-dir>/keys/snapshot.key,
    /// made (0600) by the first `run` or `worker` that needs it. Every worker and VMM of a
    /// cluster needs the same one.
    #[arg(long, value_name = "FILE", env = "PICOCENTER_KEY_FILE")]
    key_file: Option<PathBuf>,
}

impl KeyFile {
    /// A key file at `path`.
    pub fn at(path: PathBuf) -> Self {
        Self {
            key_file: Some(path),
        }
    }

    /// The key file's path.
    pub fn path(&self, state_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| default_path(state_dir))
    }

    /// The key, made if there is none yet.
    pub fn load_or_create(&self, state_dir: &Path) -> anyhow::Result<SnapshotKey> {
        let path = self.path(state_dir);
        SnapshotKey::load_or_create(&path)
            .with_context(|| format!("the snapshot key {}", path.display()))
    }

    /// The key, which must exist: snapshots are checked with the key they were written with.
    pub fn load(&self, state_dir: &Path) -> anyhow::Result<SnapshotKey> {
        let path = self.path(state_dir);
        SnapshotKey::load(&path).with_context(|| {
            format!(
                "the snapshot key {} (snapshots are checked with the key of the cluster that \
                 wrote them)",
                path.display()
            )
        })
    }
}

//! The hub's app registry: every app's record (spec, state, worker, address, newest
//! snapshot, usage, events), kept so that a hub restart loses nothing. The hub keeps the
//! live copy in memory and writes each change through; state changes durably at once,
//! usage updates batched where the store can batch them.
//!
//! Two stores implement [`RegistryStore`], and the same test suite runs against both:
//! * [`redb`]: one embedded database file in the hub's data directory (the default).
//! * [`etcd`]: an etcd cluster (`--registry etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`), a
//!   replicated store that outlives any one hub host.

pub mod etcd;
pub mod redb;

use crate::model::AppRecord;
use std::path::PathBuf;

/// Why the registry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database failed.
    #[error("the registry database: {0}")]
    Database(#[from] ::redb::Error),
    /// etcd failed.
    #[error("the registry in etcd at {endpoints}: {source}")]
    Etcd {
        /// The cluster.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The registry's own runtime (etcd's client) failed.
    #[error("the registry's client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The database file's permissions could not be set.
    #[error("making the registry private to its user")]
    Permissions(#[source] std::io::Error),
    /// A record did not decode.
    #[error("app record {name}: {source}")]
    Record {
        /// The app.
        name: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Another hub holds the registry (etcd), and did not let go in time.
    #[error("the registry {registry} is held by {holder}: one hub at a time uses a registry")]
    Held {
        /// Which registry.
        registry: String,
        /// Who holds it.
        holder: String,
    },
    /// This hub lost its hold on the registry (etcd): another may have taken it.
    #[error("this hub no longer holds the registry (its lease expired): it may not write")]
    Lost,
    /// A `--registry` that names no store.
    #[error("--registry {0:?}: expected `redb` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`")]
    Config(String),
}

/// A place that keeps app records. Writes are whole records, keyed by app name.
pub trait RegistryStore: Send + Sync + std::fmt::Debug {
    /// Every app record.
    fn load(&self) -> Result<Vec<AppRecord>, RegistryError>;
    /// Writes `records` at once; `sync` makes them durable before returning (a store
    /// whose every write is durable ignores it).
    fn save_all(&self, records: &[&AppRecord], sync: bool) -> Result<(), RegistryError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), RegistryError>;
    /// Removes app `name`'s record.
    fn remove(&self, name: &str) -> Result<(), RegistryError>;
    /// Whether this hub lost its hold on the registry for good (another hub may hold it):
    /// it must stop.
    fn lost(&self) -> bool {
        false
    }
}

/// Which store, as `--registry` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryConfig {
    /// The embedded database at this path.
    Redb(PathBuf),
    /// An etcd cluster.
    Etcd(etcd::EtcdConfig),
}

impl RegistryConfig {
    /// Parses `--registry`: `redb` (the file `default_redb`) or an `etcd://` URL.
    pub fn parse(text: &str, default_redb: PathBuf) -> Result<Self, RegistryError> {
        if text == "redb" {
            return Ok(Self::Redb(default_redb));
        }
        etcd::EtcdConfig::parse(text).map(Self::Etcd)
    }
}

/// The hub's registry: one of the stores.
#[derive(Debug)]
pub struct Registry {
    store: Box<dyn RegistryStore>,
}

impl Registry {
    /// Opens (or creates) the registry `config` names.
    pub fn open(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let store: Box<dyn RegistryStore> = match config {
            RegistryConfig::Redb(path) => Box::new(redb::RedbRegistry::open(path)?),
            RegistryConfig::Etcd(etcd) => Box::new(etcd::EtcdRegistry::open(etcd)?),
        };
        Ok(Self { store })
    }

    /// Every app record.
    pub fn load(&self) -> Result<Vec<AppRecord>, RegistryError> {
        self.store.load()
    }

    /// Writes `record`; `sync` makes it durable before returning.
    pub fn save(&self, record: &AppRecord, sync: bool) -> Result<(), RegistryError> {
        self.store.save_all(&[record], sync)
    }

    /// Writes `records` at once; `sync` makes them durable before returning.
    pub fn save_all<'a>(
        &self,
        records: impl IntoIterator<Item = &'a AppRecord>,
        sync: bool,
    ) -> Result<(), RegistryError> {
        let records: Vec<&AppRecord> = records.into_iter().collect();
        self.store.save_all(&records, sync)
    }

    /// Makes every earlier write durable.
    pub fn flush(&self) -> Result<(), RegistryError> {
        self.store.flush()
    }

    /// Removes app `name`.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        self.store.remove(name)
    }

    /// See [`RegistryStore::lost`].
    pub fn lost(&self) -> bool {
        self.store.lost()
    }
}

/// The suite every store passes (see each store's tests).
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use crate::model::{AppSpec, AppState};

    fn record(name: &str) -> AppRecord {
        AppRecord::new(AppSpec {
            name: name.into(),
            image: "counter-http".into(),
            memory_mib: Some(16),
            env: vec!["SECRET=1".into()],
            idle_after_secs: Some(5.0),
        })
    }

    /// Writes, overwrites, removes, and writes more records than one etcd transaction
    /// takes, then reopens `config` and finds exactly what was written.
    pub(crate) fn records_survive_a_reopen(config: &RegistryConfig) {
        let mut counter = record("counter");
        let many: Vec<AppRecord> = (0..300).map(|i| record(&format!("app-{i:03}"))).collect();
        {
            let registry = Registry::open(config).unwrap();
            assert_eq!(registry.load().unwrap(), vec![]);
            registry.save(&counter, true).unwrap();
            counter.state = AppState::SwappedOut;
            counter.snapshot = Some("s1".into());
            counter.chain_hint.ancestors = vec!["s0".into()];
            counter.chain_hint.first_parts = vec![8192, 1 << 20];
            counter.usage.requests = 7;
            counter.event("swapped out");
            registry.save(&counter, false).unwrap();
            registry.save(&record("gone"), true).unwrap();
            registry.remove("gone").unwrap();
            // Removing what is not there is no error.
            registry.remove("never").unwrap();
            registry.save_all(&many, true).unwrap();
            registry.flush().unwrap();
        }
        let registry = Registry::open(config).unwrap();
        let mut loaded = registry.load().unwrap();
        loaded.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let mut expected = many;
        expected.push(counter);
        expected.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let names = |records: &[AppRecord]| -> Vec<String> {
            records.iter().map(|r| r.spec.name.clone()).collect()
        };
        assert_eq!(names(&loaded), names(&expected));
        assert!(
            loaded == expected,
            "the records differ from what was written"
        );
    }
}

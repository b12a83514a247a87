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

use crate::model::{AppRecord, WorkerHello};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Another hub changed a record since this one read it: read it again, and retry.
    #[error("another hub changed the record first")]
    Conflict,
    /// A hub with this hub's id serves the registry already.
    #[error("a hub with id {0} serves the registry already (give each hub its own --hub-id)")]
    SameId(String),
    /// This hub lost its hold on the registry (etcd): another may have taken it.
    #[error("this hub no longer holds the registry (its lease expired): it may not write")]
    Lost,
    /// A `--registry` that names no store.
    #[error("--registry {0:?}: expected `redb` or `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`")]
    Config(String),
}

/// A record as the store holds it, with the store's revision of it. A write names the
/// revision it read, and the store refuses it if the record changed since
/// ([`RegistryError::Conflict`]): several hubs on one registry never overwrite each
/// other's changes, and exactly one of them wins a race to order an app's restore.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The record.
    pub record: AppRecord,
    /// The store's revision of it (0: not stored).
    pub revision: i64,
}

/// A worker as the registry keeps it while it is alive: what it said of itself, and the
/// figures of its last report. It stays alive while reports renew it (its lease, in
/// etcd), so every hub sees the same live workers, whichever hub a worker reports to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerRecord {
    /// Who it is and where its order API is.
    pub hello: WorkerHello,
    /// Resident memory of its apps, bytes.
    pub memory_bytes: u64,
    /// How many apps are resident there.
    pub resident: usize,
    /// Swapped-out apps whose addresses it holds, and the addresses.
    pub held: Vec<(String, Ipv4Addr)>,
    /// When the hub that took its last report took it (Unix ms).
    pub reported_at_unix_ms: u64,
}

/// A hub serving a registry, as the other hubs see it (their zone's name servers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HubRecord {
    /// Its id, unique among the hubs.
    pub id: String,
    /// Where it answers DNS.
    pub dns: std::net::SocketAddr,
}

/// A change to the app records, as the store tells of it (a hub's own writes come back
/// too: a change at a revision the hub has already is no news).
#[derive(Debug, Clone, PartialEq)]
pub enum AppChange {
    /// The record was written.
    Written(Box<Versioned>),
    /// The record was removed at `revision`.
    Removed {
        /// The app.
        name: String,
        /// The removal's revision.
        revision: i64,
    },
    /// Every record as of `revision` (after the store read everything again): a record
    /// not among them was removed meanwhile, unless written after `revision`.
    All {
        /// The records.
        apps: Vec<Versioned>,
        /// As of when.
        revision: i64,
    },
}

/// The most records one [`RegistryStore::save_all`] takes (etcd's default limit is 128
/// operations a transaction, and each record takes two).
pub const MAX_BATCH: usize = 48;

/// A place that keeps app records, and the live workers and hubs.
pub trait RegistryStore: Send + Sync + std::fmt::Debug {
    /// Every app record.
    fn load(&self) -> Result<Vec<Versioned>, RegistryError>;
    /// App `name`'s record as stored now.
    fn get(&self, name: &str) -> Result<Option<Versioned>, RegistryError>;
    /// Writes `records` (at most [`MAX_BATCH`]) at once, each if its stored revision is still the one given
    /// (0: only if there is none), else none of them ([`RegistryError::Conflict`]);
    /// `sync` makes them durable before returning (a store whose every write is durable
    /// ignores it). Returns each record's new revision.
    fn save_all(
        &self,
        records: &[(&AppRecord, i64)],
        sync: bool,
    ) -> Result<Vec<i64>, RegistryError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> Result<(), RegistryError>;
    /// Removes app `name`'s record.
    fn remove(&self, name: &str) -> Result<(), RegistryError>;
    /// Sends the changes other hubs make to app records from now on to `changes` (a
    /// store only this hub writes sends none).
    fn follow(&self, changes: tokio::sync::mpsc::UnboundedSender<AppChange>);
    /// Records `worker` as alive for `ttl` more (a report came), with its figures.
    fn worker_alive(&self, worker: &WorkerRecord, ttl: Duration) -> Result<(), RegistryError>;
    /// Forgets worker `id` at once (it left).
    fn worker_left(&self, id: &str) -> Result<(), RegistryError>;
    /// The workers alive now.
    fn live_workers(&self) -> Vec<WorkerRecord>;
    /// Says that this hub serves DNS at `me.dns`, for as long as it holds the registry.
    fn announce(&self, me: &HubRecord) -> Result<(), RegistryError>;
    /// The hubs serving this registry now, by id (this one included once announced).
    fn hubs(&self) -> Vec<HubRecord>;
    /// Whether this hub lost its hold on the registry for good (it was cut off for
    /// longer than its lease): it must stop.
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
    /// Opens (or creates) the registry `config` names, for the hub `hub_id`.
    pub fn open(config: &RegistryConfig, hub_id: &str) -> Result<Self, RegistryError> {
        let store: Box<dyn RegistryStore> = match config {
            RegistryConfig::Redb(path) => Box::new(redb::RedbRegistry::open(path)?),
            RegistryConfig::Etcd(etcd) => Box::new(etcd::EtcdRegistry::open(etcd, hub_id)?),
        };
        Ok(Self { store })
    }

    /// Writes `record` if its stored revision is still `revision`; its new revision.
    pub fn save(
        &self,
        record: &AppRecord,
        revision: i64,
        sync: bool,
    ) -> Result<i64, RegistryError> {
        let revisions = self.store.save_all(&[(record, revision)], sync)?;
        revisions.first().copied().ok_or(RegistryError::Conflict)
    }
}

impl std::ops::Deref for Registry {
    type Target = dyn RegistryStore;

    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

/// The suite every store passes (see each store's tests).
#[cfg(test)]
pub(crate) mod suite {
    use super::*;
    use crate::model::{AppSpec, AppState};

    pub(crate) fn record(name: &str) -> AppRecord {
        AppRecord::new(AppSpec {
            name: name.into(),
            image: "counter-http".into(),
            memory_mib: Some(16),
            env: vec!["SECRET=1".into()],
            idle_after_secs: Some(5.0),
        })
    }

    fn names(records: &[Versioned]) -> Vec<String> {
        records.iter().map(|r| r.record.spec.name.clone()).collect()
    }

    /// Writes, overwrites, removes, and writes more records than one etcd transaction
    /// takes, then reopens `config` and finds exactly what was written, at the revisions
    /// the writes gave.
    pub(crate) fn records_survive_a_reopen(config: &RegistryConfig) {
        let mut counter = record("counter");
        let many: Vec<AppRecord> = (0..300).map(|i| record(&format!("app-{i:03}"))).collect();
        let mut expected = Vec::new();
        {
            let registry = Registry::open(config, "hub-1").unwrap();
            assert_eq!(registry.load().unwrap(), vec![]);
            let first = registry.save(&counter, 0, true).unwrap();
            counter.state = AppState::SwappedOut;
            counter.snapshot = Some("s1".into());
            counter.chain_hint.ancestors = vec!["s0".into()];
            counter.chain_hint.first_parts = vec![8192, 1 << 20];
            counter.usage.requests = 7;
            counter.event("swapped out");
            let second = registry.save(&counter, first, false).unwrap();
            assert!(second > first);
            let gone = registry.save(&record("gone"), 0, true).unwrap();
            assert!(gone > second);
            registry.remove("gone").unwrap();
            // Removing what is not there is no error.
            registry.remove("never").unwrap();
            let mut revisions = Vec::new();
            for piece in many.chunks(MAX_BATCH) {
                let batch: Vec<(&AppRecord, i64)> = piece.iter().map(|r| (r, 0)).collect();
                revisions.extend(registry.save_all(&batch, true).unwrap());
            }
            assert_eq!(revisions.len(), many.len());
            registry.flush().unwrap();
            expected.push(Versioned {
                record: counter.clone(),
                revision: second,
            });
            for (record, revision) in many.iter().zip(revisions) {
                expected.push(Versioned {
                    record: record.clone(),
                    revision,
                });
            }
            assert_eq!(registry.get("counter").unwrap(), Some(expected[0].clone()));
            assert_eq!(registry.get("gone").unwrap(), None);
        }
        let registry = Registry::open(config, "hub-1").unwrap();
        let mut loaded = registry.load().unwrap();
        loaded.sort_by(|a, b| a.record.spec.name.cmp(&b.record.spec.name));
        expected.sort_by(|a, b| a.record.spec.name.cmp(&b.record.spec.name));
        assert_eq!(names(&loaded), names(&expected));
        assert!(
            loaded == expected,
            "the records or their revisions differ from what was written"
        );
    }

    /// A write that names a revision the record no longer has changes nothing, nor does
    /// any other write of its batch; a create of a record that exists is refused.
    pub(crate) fn a_stale_write_is_refused(config: &RegistryConfig) {
        let registry = Registry::open(config, "hub-1").unwrap();
        let mut app = record("app");
        let created = registry.save(&app, 0, true).unwrap();
        assert!(matches!(
            registry.save(&app, 0, true),
            Err(RegistryError::Conflict)
        ));
        app.state = AppState::Starting;
        let claimed = registry.save(&app, created, true).unwrap();
        // A second claim from what was read before the first is refused.
        app.state = AppState::Resident;
        assert!(matches!(
            registry.save(&app, created, true),
            Err(RegistryError::Conflict)
        ));
        let other = record("other");
        let refused = registry.save_all(&[(&other, 0), (&app, created)], true);
        assert!(matches!(refused, Err(RegistryError::Conflict)));
        assert_eq!(registry.get("other").unwrap(), None);
        let stored = registry.get("app").unwrap().unwrap();
        assert_eq!(stored.revision, claimed);
        assert_eq!(stored.record.state, AppState::Starting);
    }

    /// A hub that announced itself is among the hubs.
    pub(crate) fn a_hub_announces_itself(config: &RegistryConfig) {
        let registry = Registry::open(config, "hub-1").unwrap();
        let me = HubRecord {
            id: "hub-1".into(),
            dns: "127.0.0.1:53".parse().unwrap(),
        };
        registry.announce(&me).unwrap();
        assert!(registry.hubs().contains(&me), "{:?}", registry.hubs());
    }

    /// A worker is live from its first report until its time is up or it leaves; its
    /// figures are the last report's.
    pub(crate) fn workers_live_while_they_report(config: &RegistryConfig) {
        let registry = Registry::open(config, "hub-1").unwrap();
        let worker = |id: &str, memory_bytes| WorkerRecord {
            hello: WorkerHello {
                id: id.into(),
                url: "http://127.0.0.1:1".into(),
                memory_limit_bytes: 1 << 30,
                instance: 0,
            },
            memory_bytes,
            resident: 1,
            held: vec![("a".into(), Ipv4Addr::new(127, 1, 0, 9))],
            reported_at_unix_ms: 1,
        };
        let ttl = Duration::from_secs(2);
        registry.worker_alive(&worker("short", 1), ttl).unwrap();
        registry.worker_alive(&worker("leaving", 1), ttl).unwrap();
        registry.worker_alive(&worker("long", 1), ttl).unwrap();
        registry.worker_alive(&worker("long", 2), ttl).unwrap();
        let ids = |registry: &Registry| {
            let mut ids: Vec<String> = registry
                .live_workers()
                .into_iter()
                .map(|w| w.hello.id)
                .collect();
            ids.sort();
            ids
        };
        // What a store learns by watching may come a moment after the write.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ids(&registry) != ["leaving", "long", "short"] {
            assert!(std::time::Instant::now() < deadline, "{:?}", ids(&registry));
            std::thread::sleep(Duration::from_millis(10));
        }
        registry.worker_left("leaving").unwrap();
        assert_eq!(ids(&registry), ["long", "short"]);
        // Only "long" reports on: "short" is dead when its time is up.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ids(&registry) != ["long"] {
            registry.worker_alive(&worker("long", 2), ttl).unwrap();
            assert!(std::time::Instant::now() < deadline, "{:?}", ids(&registry));
            std::thread::sleep(Duration::from_millis(200));
        }
        let long = registry.live_workers().remove(0);
        assert_eq!(long, worker("long", 2));
    }
}

//! The registry in one embedded redb database: a table of app records (JSON) and a table
//! of their revisions. One hub uses the file (redb locks it), so the live workers and
//! the hub itself are kept in memory: a worker is live until its time from its last
//! report is up.

use super::{AppChange, HubRecord, RegistryError, RegistryStore, Versioned, WorkerRecord};
use crate::model::AppRecord;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
/// Each record's revision; a record written before revisions were kept has none, and
/// counts as [`FIRST_REVISION`].
const REVISIONS: TableDefinition<&str, i64> = TableDefinition::new("revisions");
/// The last revision given, under [`LAST_REVISION`].
const COUNTER: TableDefinition<&str, i64> = TableDefinition::new("counter");
const LAST_REVISION: &str = "last";
const FIRST_REVISION: i64 = 1;

fn db_error(e: impl Into<redb::Error>) -> RegistryError {
    RegistryError::Database(e.into())
}

/// The registry in a redb file.
#[derive(Debug)]
pub struct RedbRegistry {
    db: Database,
    /// Live workers, and when each one's time is up.
    workers: Mutex<HashMap<String, (WorkerRecord, Instant)>>,
    /// This hub, once announced.
    me: Mutex<Option<HubRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RedbRegistry {
    /// Opens (or creates) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(db_error)?;
        // App records hold environments (secrets): for the hub's user only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(RegistryError::Permissions)?;
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(APPS).map_err(db_error)?;
        txn.open_table(REVISIONS).map_err(db_error)?;
        txn.open_table(COUNTER).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(Self {
            db,
            workers: Mutex::new(HashMap::new()),
            me: Mutex::new(None),
        })
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<AppRecord, RegistryError> {
    serde_json::from_slice(bytes).map_err(|source| RegistryError::Record {
        name: name.to_string(),
        source,
    })
}

impl RegistryStore for RedbRegistry {
    fn load(&self) -> Result<Vec<Versioned>, RegistryError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(APPS).map_err(db_error)?;
        let revisions = txn.open_table(REVISIONS).map_err(db_error)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (name, bytes) = entry.map_err(db_error)?;
            let revision = revisions
                .get(name.value())
                .map_err(db_error)?
                .map_or(FIRST_REVISION, |r| r.value());
            records.push(Versioned {
                record: decode(name.value(), bytes.value())?,
                revision,
            });
        }
        Ok(records)
    }

    fn get(&self, name: &str) -> Result<Option<Versioned>, RegistryError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(APPS).map_err(db_error)?;
        let Some(bytes) = table.get(name).map_err(db_error)? else {
            return Ok(None);
        };
        let revisions = txn.open_table(REVISIONS).map_err(db_error)?;
        let revision = revisions
            .get(name)
            .map_err(db_error)?
            .map_or(FIRST_REVISION, |r| r.value());
        Ok(Some(Versioned {
            record: decode(name, bytes.value())?,
            revision,
        }))
    }

    /// One transaction; without `sync` it is not synced (a later durable commit covers
    /// it). Each write takes the next revision of a counter kept in the file.
    fn save_all(
        &self,
        records: &[(&AppRecord, i64)],
        sync: bool,
    ) -> Result<Vec<i64>, RegistryError> {
        let mut txn = self.db.begin_write().map_err(db_error)?;
        if !sync {
            txn.set_durability(Durability::None).map_err(db_error)?;
        }
        let mut given = Vec::with_capacity(records.len());
        {
            let mut table = txn.open_table(APPS).map_err(db_error)?;
            let mut revisions = txn.open_table(REVISIONS).map_err(db_error)?;
            let mut counter = txn.open_table(COUNTER).map_err(db_error)?;
            let mut last = counter
                .get(LAST_REVISION)
                .map_err(db_error)?
                .map_or(FIRST_REVISION, |r| r.value());
            for (record, expected) in records {
                let name = record.spec.name.as_str();
                let stored = match table.get(name).map_err(db_error)? {
                    None => 0,
                    Some(_) => revisions
                        .get(name)
                        .map_err(db_error)?
                        .map_or(FIRST_REVISION, |r| r.value()),
                };
                if stored != *expected {
                    // Dropping the transaction uncommitted leaves everything as it was.
                    return Err(RegistryError::Conflict);
                }
                let bytes = serde_json::to_vec(record).map_err(|source| RegistryError::Record {
                    name: name.to_string(),
                    source,
                })?;
                last += 1;
                table.insert(name, bytes.as_slice()).map_err(db_error)?;
                revisions.insert(name, last).map_err(db_error)?;
                given.push(last);
            }
            counter.insert(LAST_REVISION, last).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(given)
    }

    /// A durable commit covers the ones before it.
    fn flush(&self) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        txn.commit().map_err(db_error)
    }

    fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(APPS).map_err(db_error)?;
            table.remove(name).map_err(db_error)?;
            let mut revisions = txn.open_table(REVISIONS).map_err(db_error)?;
            revisions.remove(name).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
    }

    /// Only this hub writes the file: nobody else changes a record.
    fn follow(&self, _changes: tokio::sync::mpsc::UnboundedSender<AppChange>) {}

    fn worker_alive(&self, worker: &WorkerRecord, ttl: Duration) -> Result<(), RegistryError> {
        lock(&self.workers).insert(
            worker.hello.id.clone(),
            (worker.clone(), Instant::now() + ttl),
        );
        Ok(())
    }

    fn worker_left(&self, id: &str) -> Result<(), RegistryError> {
        lock(&self.workers).remove(id);
        Ok(())
    }

    fn live_workers(&self) -> Vec<WorkerRecord> {
        let mut workers = lock(&self.workers);
        let now = Instant::now();
        workers.retain(|_, (_, until)| *until > now);
        workers.values().map(|(w, _)| w.clone()).collect()
    }

    fn announce(&self, me: &HubRecord) -> Result<(), RegistryError> {
        *lock(&self.me) = Some(me.clone());
        Ok(())
    }

    fn hubs(&self) -> Vec<HubRecord> {
        lock(&self.me).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{suite, RegistryConfig};

    #[test]
    fn the_registry_suite_passes_on_redb() {
        let dir = tempfile::tempdir().unwrap();
        let config = RegistryConfig::Redb(dir.path().join("registry.redb"));
        suite::records_survive_a_reopen(&config);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("registry.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let config = RegistryConfig::Redb(dir.path().join("stale.redb"));
        suite::a_stale_write_is_refused(&config);
        suite::workers_live_while_they_report(&config);
        suite::a_hub_announces_itself(&config);
    }
}

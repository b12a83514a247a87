//! The hub's app registry on disk: one redb table of app records (JSON), so that a hub
//! restart loses nothing. The hub keeps the live copy in memory and writes each change
//! through; state changes are synced at once, usage updates are batched by redb.

use crate::model::AppRecord;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");

/// Why the registry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database failed.
    #[error("the registry database: {0}")]
    Database(#[from] redb::Error),
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
}

fn db_error(e: impl Into<redb::Error>) -> RegistryError {
    RegistryError::Database(e.into())
}

/// The persistent registry.
#[derive(Debug)]
pub struct Registry {
    db: Database,
}

impl Registry {
    /// Opens (or creates) the registry at `path`.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(db_error)?;
        // App records hold environments (secrets): for the hub's user only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(RegistryError::Permissions)?;
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(APPS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(Self { db })
    }

    /// Every app record.
    pub fn load(&self) -> Result<Vec<AppRecord>, RegistryError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(APPS).map_err(db_error)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (name, bytes) = entry.map_err(db_error)?;
            let record =
                serde_json::from_slice(bytes.value()).map_err(|source| RegistryError::Record {
                    name: name.value().to_string(),
                    source,
                })?;
            records.push(record);
        }
        Ok(records)
    }

    /// Writes `record`; `sync` makes it durable before returning.
    pub fn save(&self, record: &AppRecord, sync: bool) -> Result<(), RegistryError> {
        self.save_all([record], sync)
    }

    /// Writes `records` in one transaction; `sync` makes them durable before returning.
    pub fn save_all<'a>(
        &self,
        records: impl IntoIterator<Item = &'a AppRecord>,
        sync: bool,
    ) -> Result<(), RegistryError> {
        let mut txn = self.db.begin_write().map_err(db_error)?;
        if !sync {
            txn.set_durability(Durability::None).map_err(db_error)?;
        }
        {
            let mut table = txn.open_table(APPS).map_err(db_error)?;
            for record in records {
                let bytes = serde_json::to_vec(record).map_err(|source| RegistryError::Record {
                    name: record.spec.name.clone(),
                    source,
                })?;
                table
                    .insert(record.spec.name.as_str(), bytes.as_slice())
                    .map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Makes every earlier write durable (a durable commit covers the ones before it).
    pub fn flush(&self) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        txn.commit().map_err(db_error)
    }

    /// Removes app `name`.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(APPS).map_err(db_error)?;
            table.remove(name).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppSpec, AppState};

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.redb");
        let mut record = AppRecord::new(AppSpec {
            name: "counter".into(),
            image: "counter-http".into(),
            memory_mib: Some(16),
            env: vec!["A=1".into()],
            idle_after_secs: Some(5.0),
        });
        {
            let registry = Registry::open(&path).unwrap();
            registry.save(&record, true).unwrap();
            record.state = AppState::SwappedOut;
            record.snapshot = Some("s1".into());
            record.usage.requests = 7;
            registry.save(&record, false).unwrap();
            let mut other = record.clone();
            other.spec.name = "gone".into();
            registry.save(&other, true).unwrap();
            registry.remove("gone").unwrap();
        }
        let registry = Registry::open(&path).unwrap();
        assert_eq!(registry.load().unwrap(), vec![record]);
    }
}

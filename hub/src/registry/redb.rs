//! The registry in one embedded redb database: a table of app records (JSON).

use super::{RegistryError, RegistryStore};
use crate::model::AppRecord;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");

fn db_error(e: impl Into<redb::Error>) -> RegistryError {
    RegistryError::Database(e.into())
}

/// The registry in a redb file.
#[derive(Debug)]
pub struct RedbRegistry {
    db: Database,
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
        txn.commit().map_err(db_error)?;
        Ok(Self { db })
    }
}

impl RegistryStore for RedbRegistry {
    fn load(&self) -> Result<Vec<AppRecord>, RegistryError> {
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

    /// One transaction; without `sync` it is not synced (a later durable commit covers it).
    fn save_all(&self, records: &[&AppRecord], sync: bool) -> Result<(), RegistryError> {
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
        }
        txn.commit().map_err(db_error)
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
    }
}

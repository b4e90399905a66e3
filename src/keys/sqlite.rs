//! The embedded key store: one SQLite file.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use super::store::{KeyLookup, KeyStore, StoredKey};
use crate::crypto::KeyId;
use crate::error::KeyError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deks (
    key_id     BLOB PRIMARY KEY,
    scope      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    wrapped    BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (scope, version)
);
CREATE TABLE IF NOT EXISTS shredded_keys (key_id BLOB PRIMARY KEY, shredded_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS forgotten_scopes (scope TEXT PRIMARY KEY, forgotten_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, wrapped BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS key_usage (key_id BLOB PRIMARY KEY, encryptions INTEGER NOT NULL);
";

const FORGOTTEN: &str = "SELECT 1 FROM forgotten_scopes WHERE scope = ?1";
const INSERT: &str = "INSERT INTO deks (key_id, scope, version, wrapped, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT (scope, version) DO NOTHING";

/// How long a statement waits for another process's lock on the file (1 s in unit tests, which wait it out).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(if cfg!(test) { 1 } else { 10 });

pub struct SqliteStore {
    connection: Mutex<Connection>,
    /// A forget's or rewrap's WAL checkpoint found a reader in the way: retried on later calls until it empties the
    /// WAL (which can hold up to 40 MB of old pages, the forgotten keys' among them).
    checkpoint_pending: AtomicBool,
}

impl SqliteStore {
    /// Opens (creating when missing) the key store file and its tables.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Fatal: a directory or file that cannot be made or opened (permissions, a path under a file) is not
            // waited for; keys.store must change.
            std::fs::create_dir_all(dir)
                .map_err(|e| KeyError::Store(format!("cannot create {} (keys.store): {e}", dir.display())))?;
        }
        let connection = Connection::open(path)
            .map_err(|e| KeyError::Store(format!("cannot open {} (keys.store): {e}", path.display())))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| connection.pragma_update(None, "journal_mode", "WAL"))
            // Deleted rows (a forgotten subject's wrapped keys) are overwritten with zeros, not left in free pages.
            .and_then(|()| connection.pragma_update(None, "secure_delete", "ON"))
            // New subjects insert at random places in two indexes (key id, scope): a page cache that holds their
            // inner pages (16 MiB, not SQLite's 2 MB) and a WAL checkpointed every 40 MB rather than every 4 MB
            // (a page changed by many batches is copied back once) run new subjects ~30% faster (issue 15). Forget
            // still empties the WAL at once (`checkpoint_after`).
            .and_then(|()| connection.pragma_update(None, "cache_size", -16_384))
            .and_then(|()| connection.pragma_update(None, "wal_autocheckpoint", 10_000))
            .and_then(|()| connection.execute_batch(SCHEMA))
            .map_err(|e| store_error(e, "cannot prepare the key store"))?;
        Ok(Self {
            connection: Mutex::new(connection),
            checkpoint_pending: AtomicBool::new(false),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>, what: &str) -> Result<T, KeyError> {
        let mut connection = self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = f(&mut connection).map_err(|e| store_error(e, what));
        if self.checkpoint_pending.load(Ordering::Relaxed) {
            // Without waiting: a reader still in the way costs this call nothing, the next call tries again.
            let _ = connection.busy_timeout(std::time::Duration::ZERO);
            if truncate_wal(&connection) {
                self.checkpoint_pending.store(false, Ordering::Relaxed);
                tracing::info!("the key store's WAL is emptied: the rows as they were before the forget are gone");
            }
            let _ = connection.busy_timeout(BUSY_TIMEOUT);
        }
        result
    }

    /// After a forget or a rewrap, see [`checkpoint_after`].
    fn checkpoint_after(&self, c: &Connection, after: &str) {
        if !checkpoint_after(c, after) {
            self.checkpoint_pending.store(true, Ordering::Relaxed);
        }
    }
}

fn store_error(e: rusqlite::Error, what: &str) -> KeyError {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen | ErrorCode::SystemIoFailure,
        ) => KeyError::StoreUnavailable(format!("{what}: {e}")),
        _ => KeyError::Store(format!("{what}: {e}")),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn row_to_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredKey, KeyError>> {
    let key_id: Vec<u8> = row.get(0)?;
    let version: i64 = row.get(2)?;
    Ok(match (<[u8; 12]>::try_from(key_id), u32::try_from(version)) {
        (Ok(id), Ok(version)) => Ok(StoredKey {
            key_id: KeyId(id),
            scope: row.get(1)?,
            version,
            wrapped: row.get(3)?,
        }),
        _ => Err(KeyError::CorruptRow),
    })
}

impl KeyStore for SqliteStore {
    fn current(&self, scope: &str) -> Result<Option<StoredKey>, KeyError> {
        self.with(
            |c| {
                c.query_row(
                    "SELECT key_id, scope, version, wrapped FROM deks WHERE scope = ?1 ORDER BY version DESC LIMIT 1",
                    [scope],
                    row_to_key,
                )
                .optional()
            },
            "reading a key",
        )?
        .transpose()
    }

    fn by_id(&self, key_id: &KeyId) -> Result<KeyLookup, KeyError> {
        let (found, shredded) = self.with(
            |c| {
                let found = c
                    .query_row(
                        "SELECT key_id, scope, version, wrapped FROM deks WHERE key_id = ?1",
                        [&key_id.0[..]],
                        row_to_key,
                    )
                    .optional()?;
                let shredded = c
                    .query_row("SELECT 1 FROM shredded_keys WHERE key_id = ?1", [&key_id.0[..]], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some();
                Ok((found, shredded))
            },
            "reading a key",
        )?;
        Ok(match found {
            Some(key) => KeyLookup::Found(key?),
            None if shredded => KeyLookup::Shredded,
            None => KeyLookup::Unknown,
        })
    }

    fn insert_if_absent(&self, key: &StoredKey) -> Result<Option<StoredKey>, KeyError> {
        self.with(
            |c| {
                // IMMEDIATE: the write lock is taken first, so a forget (from this or another process) commits
                // wholly before or wholly after the check and the insert.
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if tx.prepare_cached(FORGOTTEN)?.exists([&key.scope])? {
                    return Ok(None);
                }
                tx.prepare_cached(INSERT)?.execute(params![
                    &key.key_id.0[..],
                    key.scope,
                    key.version,
                    key.wrapped,
                    now()
                ])?;
                let row = tx.query_row(
                    "SELECT key_id, scope, version, wrapped FROM deks WHERE scope = ?1 AND version = ?2",
                    params![key.scope, key.version],
                    row_to_key,
                )?;
                tx.commit()?;
                Ok(Some(row))
            },
            "storing a key",
        )?
        .transpose()
    }

    fn ensure_current(&self, candidates: &[StoredKey]) -> Result<Vec<Option<StoredKey>>, KeyError> {
        let rows = self.with(
            |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut rows = Vec::with_capacity(candidates.len());
                {
                    let mut current = tx.prepare_cached(
                        "SELECT key_id, scope, version, wrapped FROM deks WHERE scope = ?1 ORDER BY version DESC LIMIT 1",
                    )?;
                    let mut forgotten = tx.prepare_cached(FORGOTTEN)?;
                    let mut insert = tx.prepare_cached(INSERT)?;
                    for candidate in candidates {
                        if let Some(row) = current.query_row([&candidate.scope], row_to_key).optional()? {
                            rows.push(Some(row));
                        } else if forgotten.exists([&candidate.scope])? {
                            rows.push(None);
                        } else {
                            let inserted = insert.execute(params![
                                &candidate.key_id.0[..],
                                candidate.scope,
                                candidate.version,
                                candidate.wrapped,
                                now()
                            ])?;
                            // The transaction holds the write lock since its start, so no other writer can have
                            // stored one in between: ours. Read back only if the insert did nothing after all.
                            if inserted == 1 {
                                rows.push(Some(Ok(candidate.clone())));
                            } else {
                                rows.push(current.query_row([&candidate.scope], row_to_key).optional()?);
                            }
                        }
                    }
                }
                tx.commit()?;
                Ok(rows)
            },
            "creating keys",
        )?;
        rows.into_iter().map(Option::transpose).collect()
    }

    fn forget(&self, scope: &str) -> Result<usize, KeyError> {
        self.with(
            |c| {
                let tx = c.transaction()?;
                let at = now();
                tx.execute(
                    "INSERT OR IGNORE INTO shredded_keys (key_id, shredded_at) SELECT key_id, ?2 FROM deks WHERE scope = ?1",
                    params![scope, at],
                )?;
                let destroyed = tx.execute("DELETE FROM deks WHERE scope = ?1", [scope])?;
                tx.execute("INSERT OR IGNORE INTO forgotten_scopes (scope, forgotten_at) VALUES (?1, ?2)", params![scope, at])?;
                tx.commit()?;
                // Only deleted key rows leave bytes to erase (a uuid's forget names several forms, most of them
                // keyless: one checkpoint, not one per form).
                if destroyed > 0 {
                    self.checkpoint_after(c, "a forget");
                }
                Ok(destroyed)
            },
            "forgetting a subject",
        )
    }

    fn is_forgotten(&self, scope: &str) -> Result<bool, KeyError> {
        self.with(
            |c| {
                c.query_row("SELECT 1 FROM forgotten_scopes WHERE scope = ?1", [scope], |_| Ok(()))
                    .optional()
            },
            "reading the forgotten subjects",
        )
        .map(|found| found.is_some())
    }

    fn forgotten_scopes(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
        self.with(
            |c| {
                let mut statement =
                    c.prepare("SELECT scope FROM forgotten_scopes WHERE substr(scope, 1, ?2) = ?1 ORDER BY scope")?;
                let rows = statement.query_map(params![prefix, prefix.len() as i64], |row| row.get(0))?;
                rows.collect()
            },
            "listing the forgotten subjects",
        )
    }

    fn scopes_with_prefix(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
        self.with(
            |c| {
                let mut statement = c.prepare("SELECT DISTINCT scope FROM deks WHERE substr(scope, 1, ?2) = ?1")?;
                let rows = statement.query_map(params![prefix, prefix.len() as i64], |row| row.get(0))?;
                rows.collect()
            },
            "listing key scopes",
        )
    }

    fn versions(&self, scope: &str) -> Result<u32, KeyError> {
        self.with(
            |c| c.query_row("SELECT COUNT(*) FROM deks WHERE scope = ?1", [scope], |row| row.get(0)),
            "counting key versions",
        )
    }

    fn key_ids(&self, scope: &str) -> Result<Vec<KeyId>, KeyError> {
        let ids: Vec<Vec<u8>> = self.with(
            |c| {
                let mut statement = c.prepare_cached("SELECT key_id FROM deks WHERE scope = ?1 ORDER BY version")?;
                let rows = statement.query_map([scope], |row| row.get(0))?;
                rows.collect()
            },
            "listing key versions",
        )?;
        ids.into_iter()
            .map(|id| <[u8; 12]>::try_from(id).map(KeyId).map_err(|_| KeyError::CorruptRow))
            .collect()
    }

    fn record_encryptions(&self, key_id: &KeyId, count: u64) -> Result<u64, KeyError> {
        let count = i64::try_from(count).map_err(|_| KeyError::Store("an encryption count over 2^63".into()))?;
        let total: i64 = self.with(
            |c| {
                c.query_row(
                    "INSERT INTO key_usage (key_id, encryptions) VALUES (?1, ?2)
                     ON CONFLICT (key_id) DO UPDATE SET encryptions = encryptions + excluded.encryptions
                     RETURNING encryptions",
                    params![&key_id.0[..], count],
                    |row| row.get(0),
                )
            },
            "recording key usage",
        )?;
        Ok(total.max(0) as u64)
    }

    fn record_encryptions_of(&self, counts: &[(KeyId, u64)]) -> Result<(), KeyError> {
        let counts = counts
            .iter()
            .map(|(key_id, count)| Ok((key_id, i64::try_from(*count)?)))
            .collect::<Result<Vec<_>, std::num::TryFromIntError>>()
            .map_err(|_| KeyError::Store("an encryption count over 2^63".into()))?;
        self.with(
            |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                {
                    let mut add = tx.prepare_cached(
                        "INSERT INTO key_usage (key_id, encryptions) VALUES (?1, ?2)
                         ON CONFLICT (key_id) DO UPDATE SET encryptions = encryptions + excluded.encryptions",
                    )?;
                    for (key_id, count) in &counts {
                        add.execute(params![&key_id.0[..], count])?;
                    }
                }
                tx.commit()
            },
            "recording key usage",
        )
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KeyError> {
        self.with(
            |c| {
                c.query_row("SELECT wrapped FROM meta WHERE name = ?1", [name], |row| row.get(0))
                    .optional()
            },
            "reading the key store's own keys",
        )
    }

    fn meta_insert_if_absent(&self, name: &str, wrapped: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.with(
            |c| {
                c.execute(
                    "INSERT OR IGNORE INTO meta (name, wrapped) VALUES (?1, ?2)",
                    params![name, wrapped],
                )?;
                c.query_row("SELECT wrapped FROM meta WHERE name = ?1", [name], |row| row.get(0))
            },
            "reading the key store's own keys",
        )
    }

    fn keys_after(&self, after: Option<&KeyId>, limit: usize) -> Result<Vec<StoredKey>, KeyError> {
        let after = after.map_or(Vec::new(), |id| id.0.to_vec());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(
            |c| {
                let mut statement = c.prepare(
                    "SELECT key_id, scope, version, wrapped FROM deks WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
                )?;
                statement
                    .query_map(params![after, limit], row_to_key)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            },
            "listing keys",
        )?
        .into_iter()
        .collect()
    }

    fn replace_wrapped(&self, key_id: &KeyId, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
        self.with(
            |c| {
                c.execute(
                    "UPDATE deks SET wrapped = ?3 WHERE key_id = ?1 AND wrapped = ?2",
                    params![&key_id.0[..], old, new],
                )
            },
            "rewrapping a key",
        )
        .map(|changed| changed == 1)
    }

    fn after_rewrap(&self) -> Result<(), KeyError> {
        self.with(
            |c| {
                self.checkpoint_after(c, "a KEK rewrap");
                Ok(())
            },
            "checkpointing",
        )
    }

    fn replace_meta(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
        self.with(
            |c| {
                c.execute(
                    "UPDATE meta SET wrapped = ?3 WHERE name = ?1 AND wrapped = ?2",
                    params![name, old, new],
                )
            },
            "rewrapping the key store's own keys",
        )
        .map(|changed| changed == 1)
    }
}

/// After a forget, the WAL still holds the pages as they were before the delete: copy the zeroed pages into the
/// database file and empty the WAL. A reader in another process holding a snapshot is waited for (the connection's
/// busy timeout, 10 s); one that holds on longer makes SQLite answer "busy" in the result row, not as an error:
/// that is warned about, and the store tries again, without waiting, on each later call until the WAL is empty.
/// The forget itself has committed either way. The same after a KEK rewrap, whose old wraps would otherwise stay in
/// the WAL. Whether the WAL was emptied.
fn checkpoint_after(c: &Connection, after: &str) -> bool {
    let emptied = truncate_wal(c);
    if !emptied {
        tracing::warn!(
            after,
            "WAL not emptied: another process holds a read snapshot of the key store; the rows as they were stay in \
             keys.db-wal until a later call of this store empties it"
        );
    }
    emptied
}

/// Copies the WAL into the database file and truncates it; false when a reader was in the way or it failed.
fn truncate_wal(c: &Connection) -> bool {
    matches!(
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get::<_, i64>(0)),
        Ok(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// The bytes of the store's files: the database, its WAL and its shared-memory index.
    fn files(dir: &Path) -> Vec<u8> {
        ["keys.db", "keys.db-wal", "keys.db-shm"]
            .iter()
            .flat_map(|name| std::fs::read(dir.join(name)).unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_forgotten_key_leaves_no_bytes_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        let wrapped: Vec<u8> = (0..60u8).map(|b| b.wrapping_mul(151).wrapping_add(7)).collect();
        for (scope, wrapped) in [("s:kept", vec![0xAB; 60]), ("s:gone", wrapped.clone())] {
            let key = StoredKey {
                key_id: KeyId::random(),
                scope: scope.into(),
                version: 1,
                wrapped,
            };
            store.insert_if_absent(&key).unwrap().unwrap();
        }
        assert!(
            contains(&files(dir.path()), &wrapped),
            "the test looks for bytes that are there"
        );
        assert_eq!(store.forget("s:gone").unwrap(), 1);
        assert!(
            !contains(&files(dir.path()), &wrapped),
            "the wrapped key is still on disk"
        );
        assert!(store.current("s:kept").unwrap().is_some());
    }

    /// A store in a new directory holding one key of `scope`, whose wrapped bytes (returned) are a pattern of its own.
    fn store_with_key_of(scope: &str, mul: u8, add: u8) -> (tempfile::TempDir, SqliteStore, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        let wrapped: Vec<u8> = (0..60u8).map(|b| b.wrapping_mul(mul).wrapping_add(add)).collect();
        let key = StoredKey {
            key_id: KeyId::random(),
            scope: scope.into(),
            version: 1,
            wrapped: wrapped.clone(),
        };
        store.insert_if_absent(&key).unwrap().unwrap();
        (dir, store, wrapped)
    }

    /// A reader in another process holding a snapshot for a moment is waited out: the wrapped key still leaves the
    /// WAL.
    #[test]
    fn a_forget_waits_out_a_reader_before_emptying_the_wal() {
        let (dir, store, wrapped) = store_with_key_of("s:gone", 97, 3);
        let reader = Connection::open(dir.path().join("keys.db")).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM deks;").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            reader.execute_batch("COMMIT;").unwrap();
        });
        assert_eq!(store.forget("s:gone").unwrap(), 1);
        release.join().unwrap();
        assert!(
            !contains(&files(dir.path()), &wrapped),
            "the wrapped key is still on disk"
        );
    }

    /// A reader that holds its snapshot past the busy timeout keeps the forget's checkpoint from emptying the WAL;
    /// the store's next call, once the reader is gone, empties it (a 40 MB WAL would otherwise keep the key's bytes
    /// until some later forget).
    #[test]
    fn a_wal_a_reader_kept_full_is_emptied_by_the_next_call() {
        let (dir, store, wrapped) = store_with_key_of("s:gone", 61, 11);
        let reader = Connection::open(dir.path().join("keys.db")).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM deks;").unwrap();
        assert_eq!(store.forget("s:gone").unwrap(), 1);
        assert!(
            contains(&files(dir.path()), &wrapped),
            "the reader's snapshot keeps the old page in the WAL"
        );
        reader.execute_batch("COMMIT;").unwrap();
        assert!(store.current("s:other").unwrap().is_none());
        assert!(!contains(&files(dir.path()), &wrapped), "the next call emptied the WAL");
    }
}

//! The PostgreSQL key store: what several instances share (`keys.store = "postgres://..."`).
//!
//! The same tables as the SQLite store, prefixed `piiwall_`, created by versioned migrations at start-up under an
//! advisory lock (two instances starting together do not race). Every write that decides a scope's key takes that
//! scope's advisory transaction lock, so a first use and a forget of one subject are serialised across instances:
//! concurrent first uses create exactly one key (insert-if-absent under the lock), and no key is created for a
//! subject once its forget committed.
//!
//! The client is synchronous (the `postgres` crate): callers already run key-store work off the async reactor.
//! TLS follows the URL's `sslmode` (native-tls); a connection that broke is reopened on the next call, and until
//! then calls fail as *unavailable* (the pipeline waits and retries).

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use postgres::error::SqlState;
use postgres::{Client, Transaction};

use super::store::{KeyLookup, KeyStore, StoredKey};
use crate::crypto::KeyId;
use crate::error::KeyError;

/// Migrations, applied in order once each; the index + 1 is the schema version.
const MIGRATIONS: [&str; 2] = [
    "
CREATE TABLE piiwall_deks (
    key_id     BYTEA PRIMARY KEY,
    scope      TEXT NOT NULL,
    version    INTEGER NOT NULL,
    wrapped    BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (scope, version)
);
CREATE TABLE piiwall_shredded_keys (key_id BYTEA PRIMARY KEY, shredded_at BIGINT NOT NULL);
CREATE TABLE piiwall_forgotten_scopes (scope TEXT PRIMARY KEY, forgotten_at BIGINT NOT NULL);
CREATE TABLE piiwall_meta (name TEXT PRIMARY KEY, wrapped BYTEA NOT NULL);
",
    "
CREATE TABLE piiwall_key_usage (key_id BYTEA PRIMARY KEY, encryptions BIGINT NOT NULL);
",
];

/// The advisory lock key of the migrations (an arbitrary constant: "piiwall" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_6969_7761_6c6c;

const CURRENT: &str =
    "SELECT key_id, scope, version, wrapped FROM piiwall_deks WHERE scope = $1 ORDER BY version DESC LIMIT 1";
const FORGOTTEN: &str = "SELECT 1 FROM piiwall_forgotten_scopes WHERE scope = $1";
/// [`CURRENT`] of each scope of an array: one index probe per scope, whatever the planner's statistics say. (The
/// `scope = ANY($1)` form was planned as a scan of the whole table while a new store's statistics were stale, and
/// cost more with every key made: 13 ms a batch at 125,000 keys; issue 15.)
const CURRENT_OF_EACH: &str = "SELECT d.key_id, d.scope, d.version, d.wrapped FROM unnest($1::text[]) AS s(scope)
     CROSS JOIN LATERAL (SELECT key_id, scope, version, wrapped FROM piiwall_deks WHERE piiwall_deks.scope = s.scope
         ORDER BY version DESC LIMIT 1) AS d";
const INSERT: &str =
    "INSERT INTO piiwall_deks (key_id, scope, version, wrapped, created_at) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (scope, version) DO NOTHING";

/// Scopes one key-store transaction locks at most (PostgreSQL's lock table holds ~64 per connection by default,
/// and grows into shared memory beyond).
const LOCKS_PER_TRANSACTION: usize = 500;

/// How many connections one instance keeps to the key store: lanes that need keys at once do not queue behind
/// one connection, and a statement that waits (on a scope's lock, on a slow server) holds up only its own caller.
const POOL_SIZE: u32 = 4;

pub struct PostgresStore {
    pool: r2d2::Pool<Connector>,
}

/// Opens key-store connections for the pool (r2d2: the well-kept generic pool of the `postgres` crate's author).
struct Connector {
    url: String,
}

/// A pooled connection, and whether it must not be reused: a connection that may point at a former primary (a
/// read-only database after failover) is dropped even though it still answers.
struct Pooled {
    /// Always `Some` until dropped.
    client: Option<Client>,
    discard: bool,
}

impl Pooled {
    fn client(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("a pooled connection has its client until dropped")
    }
}

impl Drop for Pooled {
    /// Closing a sync `postgres` client runs a runtime of its own, which panics on a thread that drives tokio tasks
    /// (where the last keyring reference is often dropped): close it on a thread of its own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            std::thread::spawn(move || drop(client));
        }
    }
}

impl r2d2::ManageConnection for Connector {
    type Connection = Pooled;
    type Error = KeyError;

    fn connect(&self) -> Result<Pooled, KeyError> {
        Ok(Pooled {
            client: Some(connect(&self.url)?),
            discard: false,
        })
    }

    /// Checked when a connection is taken from the pool: one that the server closed meanwhile (a restart,
    /// `pg_terminate_backend`) is replaced before use.
    fn is_valid(&self, conn: &mut Pooled) -> Result<(), KeyError> {
        conn.client()
            .simple_query("")
            .map(drop)
            .map_err(|e| KeyError::StoreUnavailable(format!("a pooled key-store connection is gone: {e}")))
    }

    fn has_broken(&self, conn: &mut Pooled) -> bool {
        conn.discard || conn.client().is_closed()
    }
}

impl PostgresStore {
    /// Connects and migrates. `url` is a libpq-style URL (`postgres://user:password@host:port/db?sslmode=...`).
    pub fn open(url: &str) -> Result<Self, KeyError> {
        // Checked here, so a pool that cannot connect later is the server's doing, not the URL's.
        let config = url
            .parse::<postgres::Config>()
            .map_err(|e| KeyError::Store(format!("keys.store is not a PostgreSQL URL: {e}")))?;
        // Waiting for a connection covers connecting to each host of the URL in turn, with a margin.
        let per_host = config.get_connect_timeout().copied().unwrap_or(CONNECT_TIMEOUT);
        let hosts = config.get_hosts().len().max(1) as u32;
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            // Kept full: a connection discarded after a failover is replaced at once, and a caller waiting for
            // one is woken by its replacement.
            .min_idle(None)
            .test_on_check_out(true)
            .connection_timeout(per_host * hosts + std::time::Duration::from_secs(5))
            // The pool's own log would carry the error text of failed connects; `with` reports them instead.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Connector { url: url.to_owned() });
        let store = Self { pool };
        store.with("migrating the key store", |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS piiwall_schema_version (version INTEGER NOT NULL)")?;
            let applied: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0)::BIGINT FROM piiwall_schema_version",
                    &[],
                )?
                .get(0);
            for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
                tx.batch_execute(migration)?;
                tx.execute(
                    "INSERT INTO piiwall_schema_version (version) VALUES ($1)",
                    &[&(index as i32 + 1)],
                )?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `f` in a transaction on the (re)opened connection.
    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, KeyError> {
        let mut conn = self.pool.get().map_err(|e| {
            KeyError::StoreUnavailable(format!("no key-store connection within {CONNECT_TIMEOUT:?}: {e}"))
        })?;
        // READ COMMITTED, whatever the database's default: a statement after a scope's advisory lock must see a forget
        // that committed while the lock was awaited (under REPEATABLE READ the snapshot would predate it).
        let result = conn
            .client()
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::ReadCommitted)
            .start()
            .and_then(|mut tx| {
                let value = f(&mut tx)?;
                tx.commit()?;
                Ok(value)
            });
        result.map_err(|e| {
            if reconnect_after(&e) {
                conn.discard = true;
            }
            store_error(&e, what)
        })
    }

    /// [`KeyStore::ensure_current`] for up to [`LOCKS_PER_TRANSACTION`] candidates, in one transaction.
    fn ensure_current_chunk(&self, candidates: &[StoredKey]) -> Result<Vec<Option<StoredKey>>, KeyError> {
        let scopes: Vec<&str> = candidates.iter().map(|c| c.scope.as_str()).collect();
        let rows = self.with("creating keys", |tx| {
            // Locked in the order of their lock keys, so two instances' batches cannot deadlock on each other.
            tx.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM
                 (SELECT DISTINCT hashtextextended(s, 0) AS k FROM unnest($1::text[]) AS s ORDER BY k) AS sorted",
                &[&scopes],
            )?;
            let mut found: HashMap<String, postgres::Row> = tx
                .query(CURRENT_OF_EACH, &[&scopes])?
                .into_iter()
                .map(|row| (row.get::<_, String>(1), row))
                .collect();
            let forgotten: HashSet<String> = tx
                .query(
                    "SELECT scope FROM piiwall_forgotten_scopes WHERE scope = ANY($1)",
                    &[&scopes],
                )?
                .into_iter()
                .map(|row| row.get(0))
                .collect();
            // Under the locks no other writer decides about these scopes: what is neither stored nor forgotten is
            // inserted now, and is ours.
            let mut new: Vec<&StoredKey> = Vec::new();
            let mut seen: HashSet<&str> = HashSet::new();
            for candidate in candidates {
                let scope = candidate.scope.as_str();
                if !found.contains_key(scope) && !forgotten.contains(scope) && seen.insert(scope) {
                    new.push(candidate);
                }
            }
            if !new.is_empty() {
                let ids: Vec<&[u8]> = new.iter().map(|k| &k.key_id.0[..]).collect();
                let new_scopes: Vec<&str> = new.iter().map(|k| k.scope.as_str()).collect();
                let versions: Vec<i32> = new.iter().map(|k| k.version as i32).collect();
                let wrapped: Vec<&[u8]> = new.iter().map(|k| k.wrapped.as_slice()).collect();
                let inserted = tx.query(
                    "INSERT INTO piiwall_deks (key_id, scope, version, wrapped, created_at)
                     SELECT key_id, scope, version, wrapped, $5
                     FROM unnest($1::bytea[], $2::text[], $3::int[], $4::bytea[]) AS t(key_id, scope, version, wrapped)
                     ON CONFLICT (scope, version) DO NOTHING
                     RETURNING key_id, scope, version, wrapped",
                    &[&ids, &new_scopes, &versions, &wrapped, &now()],
                )?;
                found.extend(inserted.into_iter().map(|row| (row.get::<_, String>(1), row)));
                // A row that was there after all (a writer that did not lock): the stored one, never "forgotten".
                let lost: Vec<&str> = new_scopes.into_iter().filter(|s| !found.contains_key(*s)).collect();
                if !lost.is_empty() {
                    for row in tx.query(CURRENT_OF_EACH, &[&lost])? {
                        found.insert(row.get::<_, String>(1), row);
                    }
                }
            }
            Ok((found, forgotten))
        })?;
        let (found, forgotten) = rows;
        candidates
            .iter()
            .map(|c| match found.get(&c.scope) {
                Some(row) => row_to_key(row).map(Some),
                None if forgotten.contains(&c.scope) => Ok(None),
                // Inserted, yet not there: never read as "forgotten" (that would redact the records).
                None => Err(KeyError::StoreUnavailable(
                    "a key just stored could not be read back; the batch is retried".into(),
                )),
            })
            .collect()
    }
}

/// How long connecting may take, and one statement may run, before the call counts as unavailable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const STATEMENT_TIMEOUT_MS: u32 = 30_000;

fn connect(url: &str) -> Result<Client, KeyError> {
    let tls = native_tls::TlsConnector::new()
        .map_err(|e| KeyError::StoreUnavailable(format!("cannot set up TLS for the key store: {e}")))?;
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| KeyError::Store(format!("keys.store is not a PostgreSQL URL: {e}")))?;
    // A host that does not answer must not block every lane without an error: bounded connect, TCP keepalives
    // (a dead peer is noticed), and a bound on each statement unless the URL sets its own.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config
        .keepalives(true)
        .keepalives_idle(std::time::Duration::from_secs(30));
    // The error names the cause (refused, authentication, unknown database), never the URL with its password.
    let mut client = config
        .connect(postgres_native_tls::MakeTlsConnector::new(tls))
        // A server not answering is waited for; a refusal (a wrong password, an unknown database) is fatal.
        .map_err(|e| store_error(&e, "cannot connect to the PostgreSQL key store"))?;
    client
        .batch_execute(&format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}"))
        .map_err(|e| KeyError::StoreUnavailable(format!("cannot set up the key store session: {e}")))?;
    Ok(client)
}

/// Retry or fatal, by SQLSTATE (never by message): a server restarting or failing over, a read-only standby, a
/// serialization failure, a deadlock, a statement timeout, resources short — all pass, the same call may succeed
/// later; anything else (a missing table, a constraint broken, a permission) is fatal.
fn store_error(e: &postgres::Error, what: &str) -> KeyError {
    match e.code() {
        _ if e.is_closed() => KeyError::StoreUnavailable(format!("{what}: {e}")),
        None => KeyError::StoreUnavailable(format!("{what}: {e}")),
        Some(code) if is_transient(code) => KeyError::StoreUnavailable(format!("{what}: {e}")),
        Some(_) => KeyError::Store(format!("{what}: {e}")),
    }
}

fn is_transient(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "58") // connection, resources, operator intervention, system errors
        || [
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
        ]
        .contains(code)
}

/// Whether the connection is worth dropping after `e`: the server closed it, or it may be the old primary (a
/// read-only answer after a failover), so the next call connects afresh.
fn reconnect_after(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|code| {
            code == &SqlState::READ_ONLY_SQL_TRANSACTION || ["08", "57"].contains(&&code.code()[..2])
        })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A row as a key; `Err` for a row that is not one (a key id of the wrong size, a negative version).
fn row_to_key(row: &postgres::Row) -> Result<StoredKey, KeyError> {
    let key_id: Vec<u8> = row.get(0);
    let version: i32 = row.get(2);
    match (<[u8; 12]>::try_from(key_id), u32::try_from(version)) {
        (Ok(id), Ok(version)) => Ok(StoredKey {
            key_id: KeyId(id),
            scope: row.get(1),
            version,
            wrapped: row.get(3),
        }),
        _ => Err(KeyError::CorruptRow),
    }
}

/// Serialises every decision about `scope` across instances until the transaction ends.
fn lock_scope(tx: &mut Transaction<'_>, scope: &str) -> Result<(), postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&scope])
        .map(drop)
}

fn insert(tx: &mut Transaction<'_>, key: &StoredKey) -> Result<(), postgres::Error> {
    tx.execute(
        INSERT,
        &[
            &&key.key_id.0[..],
            &key.scope,
            &(key.version as i32),
            &key.wrapped,
            &now(),
        ],
    )
    .map(drop)
}

impl KeyStore for PostgresStore {
    fn current(&self, scope: &str) -> Result<Option<StoredKey>, KeyError> {
        self.with("reading a key", |tx| tx.query_opt(CURRENT, &[&scope]))?
            .as_ref()
            .map(row_to_key)
            .transpose()
    }

    fn by_id(&self, key_id: &KeyId) -> Result<KeyLookup, KeyError> {
        let (found, shredded) = self.with("reading a key", |tx| {
            let found = tx.query_opt(
                "SELECT key_id, scope, version, wrapped FROM piiwall_deks WHERE key_id = $1",
                &[&&key_id.0[..]],
            )?;
            let shredded = tx
                .query_opt(
                    "SELECT 1 FROM piiwall_shredded_keys WHERE key_id = $1",
                    &[&&key_id.0[..]],
                )?
                .is_some();
            Ok((found, shredded))
        })?;
        Ok(match found {
            Some(row) => KeyLookup::Found(row_to_key(&row)?),
            None if shredded => KeyLookup::Shredded,
            None => KeyLookup::Unknown,
        })
    }

    fn insert_if_absent(&self, key: &StoredKey) -> Result<Option<StoredKey>, KeyError> {
        let row = self.with("storing a key", |tx| {
            // Under the scope's lock a forget has committed wholly before this check, or waits for this insert.
            lock_scope(tx, &key.scope)?;
            if tx.query_opt(FORGOTTEN, &[&key.scope])?.is_some() {
                return Ok(None);
            }
            insert(tx, key)?;
            tx.query_one(
                "SELECT key_id, scope, version, wrapped FROM piiwall_deks WHERE scope = $1 AND version = $2",
                &[&key.scope, &(key.version as i32)],
            )
            .map(Some)
        })?;
        row.as_ref().map(row_to_key).transpose()
    }

    /// A whole batch in four statements, not a few round trips per key (a batch of new subjects took ~1 ms a key):
    /// lock every scope, read the current keys and the forgotten scopes of all of them, insert the missing ones.
    fn ensure_current(&self, candidates: &[StoredKey]) -> Result<Vec<Option<StoredKey>>, KeyError> {
        // A transaction holds one advisory lock per scope: bounded, so a large `pipeline.batch_size` cannot exhaust
        // the server's lock table.
        let mut rows = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(LOCKS_PER_TRANSACTION) {
            rows.extend(self.ensure_current_chunk(chunk)?);
        }
        Ok(rows)
    }

    fn forget(&self, scope: &str) -> Result<usize, KeyError> {
        self.with("forgetting a subject", |tx| {
            lock_scope(tx, scope)?;
            let at = now();
            tx.execute(
                "INSERT INTO piiwall_shredded_keys (key_id, shredded_at) SELECT key_id, $2 FROM piiwall_deks
                 WHERE scope = $1 ON CONFLICT DO NOTHING",
                &[&scope, &at],
            )?;
            let destroyed = tx.execute("DELETE FROM piiwall_deks WHERE scope = $1", &[&scope])?;
            tx.execute(
                "INSERT INTO piiwall_forgotten_scopes (scope, forgotten_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&scope, &at],
            )?;
            Ok(destroyed as usize)
        })
    }

    fn is_forgotten(&self, scope: &str) -> Result<bool, KeyError> {
        self.with("reading the forgotten subjects", |tx| {
            tx.query_opt(FORGOTTEN, &[&scope])
        })
        .map(|row| row.is_some())
    }

    fn clock_secs(&self) -> Result<u64, KeyError> {
        let secs: i64 = self.with("reading the database server's clock", |tx| {
            tx.query_one("SELECT floor(extract(epoch FROM now()))::bigint", &[])
                .map(|row| row.get(0))
        })?;
        Ok(secs.max(0) as u64)
    }

    fn forgotten_scopes(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
        self.with("listing the forgotten subjects", |tx| {
            tx.query(
                "SELECT scope FROM piiwall_forgotten_scopes WHERE left(scope, $2) = $1 ORDER BY scope",
                &[&prefix, &(prefix.chars().count() as i32)],
            )
        })
        .map(|rows| rows.iter().map(|row| row.get(0)).collect())
    }

    fn scopes_with_prefix(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
        self.with("listing key scopes", |tx| {
            tx.query(
                "SELECT DISTINCT scope FROM piiwall_deks WHERE left(scope, $2) = $1",
                &[&prefix, &(prefix.chars().count() as i32)],
            )
        })
        .map(|rows| rows.iter().map(|row| row.get(0)).collect())
    }

    fn versions(&self, scope: &str) -> Result<u32, KeyError> {
        let count: i64 = self.with("counting key versions", |tx| {
            tx.query_one("SELECT COUNT(*) FROM piiwall_deks WHERE scope = $1", &[&scope])
                .map(|row| row.get(0))
        })?;
        Ok(count as u32)
    }

    fn key_ids(&self, scope: &str) -> Result<Vec<KeyId>, KeyError> {
        let rows = self.with("listing key versions", |tx| {
            tx.query(
                "SELECT key_id FROM piiwall_deks WHERE scope = $1 ORDER BY version",
                &[&scope],
            )
        })?;
        rows.iter()
            .map(|row| {
                <[u8; 12]>::try_from(row.get::<_, Vec<u8>>(0))
                    .map(KeyId)
                    .map_err(|_| KeyError::CorruptRow)
            })
            .collect()
    }

    fn record_encryptions(&self, key_id: &KeyId, count: u64) -> Result<u64, KeyError> {
        let count = i64::try_from(count).map_err(|_| KeyError::Store("an encryption count over 2^63".into()))?;
        let total: i64 = self.with("recording key usage", |tx| {
            tx.query_one(
                "INSERT INTO piiwall_key_usage (key_id, encryptions) VALUES ($1, $2)
                 ON CONFLICT (key_id) DO UPDATE SET encryptions = piiwall_key_usage.encryptions + EXCLUDED.encryptions
                 RETURNING encryptions",
                &[&&key_id.0[..], &count],
            )
            .map(|row| row.get(0))
        })?;
        Ok(total.max(0) as u64)
    }

    fn record_encryptions_of(&self, counts: &[(KeyId, u64)]) -> Result<(), KeyError> {
        let ids: Vec<&[u8]> = counts.iter().map(|(key_id, _)| &key_id.0[..]).collect();
        let counts = counts
            .iter()
            .map(|(_, count)| i64::try_from(*count))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| KeyError::Store("an encryption count over 2^63".into()))?;
        self.with("recording key usage", |tx| {
            tx.execute(
                "INSERT INTO piiwall_key_usage (key_id, encryptions)
                 SELECT id, n FROM unnest($1::bytea[], $2::bigint[]) AS u(id, n) ORDER BY id
                 ON CONFLICT (key_id) DO UPDATE SET encryptions = piiwall_key_usage.encryptions + EXCLUDED.encryptions",
                &[&ids, &counts],
            )
            .map(drop)
        })
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KeyError> {
        self.with("reading the key store's own keys", |tx| {
            tx.query_opt("SELECT wrapped FROM piiwall_meta WHERE name = $1", &[&name])
                .map(|row| row.map(|row| row.get(0)))
        })
    }

    fn meta_insert_if_absent(&self, name: &str, wrapped: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.with("reading the key store's own keys", |tx| {
            tx.execute(
                "INSERT INTO piiwall_meta (name, wrapped) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&name, &wrapped],
            )?;
            tx.query_one("SELECT wrapped FROM piiwall_meta WHERE name = $1", &[&name])
                .map(|row| row.get(0))
        })
    }

    fn keys_after(&self, after: Option<&KeyId>, limit: usize) -> Result<Vec<StoredKey>, KeyError> {
        let after = after.map_or(Vec::new(), |id| id.0.to_vec());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with("listing keys", |tx| {
            tx.query(
                "SELECT key_id, scope, version, wrapped FROM piiwall_deks WHERE key_id > $1 ORDER BY key_id LIMIT $2",
                &[&after, &limit],
            )
        })?
        .iter()
        .map(row_to_key)
        .collect()
    }

    fn replace_wrapped(&self, key_id: &KeyId, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
        self.with("rewrapping a key", |tx| {
            tx.execute(
                "UPDATE piiwall_deks SET wrapped = $3 WHERE key_id = $1 AND wrapped = $2",
                &[&&key_id.0[..], &old, &new],
            )
        })
        .map(|changed| changed == 1)
    }

    fn replace_meta(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
        self.with("rewrapping the key store's own keys", |tx| {
            tx.execute(
                "UPDATE piiwall_meta SET wrapped = $3 WHERE name = $1 AND wrapped = $2",
                &[&name, &old, &new],
            )
        })
        .map(|changed| changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of its own on the test server (`PIIWALL_TEST_PG`, started by scripts/test-services).
    fn fresh_database() -> String {
        let admin = std::env::var("PIIWALL_TEST_PG").expect(
            "this test needs the test PostgreSQL: run `bash scripts/test`, or `bash scripts/test-services` and export \
             the PIIWALL_TEST_PG it prints",
        );
        let name = format!("piiwall_{:016x}", rand::random::<u64>());
        let mut client = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        client.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
        format!("{}/{name}?{query}", base.rsplit_once('/').unwrap().0)
    }

    /// Every node of a JSON plan, depth first.
    fn nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
        let mut all = vec![plan];
        for child in plan["Plans"].as_array().into_iter().flatten() {
            all.extend(nodes(child));
        }
        all
    }

    /// A new store's key table has no statistics until autovacuum gets to it (here: never). A batch's read of the
    /// current keys must then still look up only its own scopes: the `scope = ANY($1) ORDER BY scope, version DESC`
    /// form was planned as a scan of the whole table, which made every batch slower than the one before (issue 15).
    /// (On PostgreSQL 15, the test services' version; from 17, B-tree scans take `= ANY` in ordered scans and that
    /// form might pass too.)
    #[test]
    fn a_batch_reads_only_its_own_scopes_even_without_statistics() {
        let url = fresh_database();
        PostgresStore::open(&url).unwrap();
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        client
            .batch_execute(
                "ALTER TABLE piiwall_deks SET (autovacuum_enabled = false);
                 INSERT INTO piiwall_deks (key_id, scope, version, wrapped, created_at)
                 SELECT substr(sha256(('k' || g)::bytea), 1, 12), 's:' || encode(sha256(('s' || g)::bytea), 'hex'),
                        1, sha256(g::text::bytea), 0
                 FROM generate_series(1, 20000) AS g;
                 INSERT INTO piiwall_deks (key_id, scope, version, wrapped, created_at)
                 SELECT substr(sha256(('r' || g || v)::bytea), 1, 12), 's:rotated-' || g, v, sha256(g::text::bytea), 0
                 FROM generate_series(1, 10) AS g, generate_series(1, 2) AS v;",
            )
            .unwrap();
        // 490 scopes without a key and 10 with two versions each.
        let asked: Vec<String> = (0..490)
            .map(|i| format!("s:absent-{i}"))
            .chain((1..=10).map(|i| format!("s:rotated-{i}")))
            .collect();
        // As the store runs it: a statement with the array as its parameter (planned for the value given).
        client
            .batch_execute(&format!("PREPARE current_of_each (text[]) AS {CURRENT_OF_EACH}"))
            .unwrap();
        let answer = client
            .simple_query(&format!(
                "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE current_of_each ('{{{}}}')",
                asked.join(",")
            ))
            .unwrap();
        let text = answer
            .iter()
            .find_map(|message| match message {
                postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        let explained: serde_json::Value = serde_json::from_str(&text).unwrap();
        let plan = &explained[0]["Plan"];
        assert!(plan.is_object(), "a plan: {explained}");
        assert_eq!(
            plan["Actual Rows"], 10,
            "the current version of each scope that has one: {plan}"
        );
        assert!(
            nodes(plan).iter().any(
                |node| node["Node Type"].as_str().is_some_and(|kind| kind.starts_with("Index"))
                    && node["Relation Name"] == "piiwall_deks"
                    && node["Actual Loops"] == 500
            ),
            "one index probe per scope asked: {plan}"
        );
        for node in nodes(plan) {
            assert_ne!(node["Node Type"], "Seq Scan", "a scan of the whole table: {plan}");
            assert_eq!(
                node["Rows Removed by Filter"].as_u64().unwrap_or(0),
                0,
                "rows read and thrown away: {plan}"
            );
        }
    }
}

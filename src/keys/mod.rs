//! Data keys: created on first use, stored wrapped by the KEK, cached unwrapped, rotated and shredded.
//!
//! Key scopes are strings: `d:<domain>` for a domain key, `s:<keyed hash>` for a data subject's key. A subject id
//! never reaches the key store in clear: its scope is an HMAC of the id under the store's *subject index key*,
//! itself kept wrapped in the store. Forgetting a subject deletes every version of its key, remembers the key
//! ids as shredded (so a reveal says "subject forgotten" rather than "unknown key") and the scope as forgotten
//! (so later records of the subject are redacted rather than given a fresh key).

pub mod forgets;
mod keyring;
mod postgres;
mod sqlite;
mod store;
mod wrapping;

pub use keyring::{
    BatchKeys, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL, KeyCacheSettings, Keyring, KeyringStats, RecordKey, Retired,
    Rewrapped, SubjectStatus, today,
};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use store::{KeyLookup, KeyStore, StoredKey};
pub use wrapping::WrappingKey;

//! The key store seam: SQLite for one instance, PostgreSQL when several share keys.

use crate::crypto::KeyId;
use crate::error::KeyError;

/// One wrapped data key as stored.
#[derive(Clone)]
pub struct StoredKey {
    pub key_id: KeyId,
    pub scope: String,
    pub version: u32,
    /// The DEK wrapped by the KEK, with (key id, scope, version) as associated data.
    pub wrapped: Vec<u8>,
}

/// What a key id names.
pub enum KeyLookup {
    Found(StoredKey),
    /// The key existed and was destroyed by a forget.
    Shredded,
    Unknown,
}

pub trait KeyStore: Send + Sync {
    /// The newest version of a scope's key.
    fn current(&self, scope: &str) -> Result<Option<StoredKey>, KeyError>;
    fn by_id(&self, key_id: &KeyId) -> Result<KeyLookup, KeyError>;
    /// Inserts the key unless the scope already has this version; returns the row that is stored, so
    /// concurrent first uses agree on one key. `None` when the scope is forgotten: checked in the same transaction
    /// as the insert, so no key is ever created in a scope whose forget committed.
    fn insert_if_absent(&self, key: &StoredKey) -> Result<Option<StoredKey>, KeyError>;
    /// For each scope, in one transaction: its current key, after inserting `candidate` (version 1) when it has none
    /// and is not forgotten; `None` for a forgotten scope. Makes first use of many subjects cost one commit.
    fn ensure_current(&self, candidates: &[StoredKey]) -> Result<Vec<Option<StoredKey>>, KeyError>;
    /// Deletes every version of a scope's key, records their ids as shredded and the scope as forgotten.
    /// Returns how many key versions were destroyed. Idempotent.
    fn forget(&self, scope: &str) -> Result<usize, KeyError>;
    fn is_forgotten(&self, scope: &str) -> Result<bool, KeyError>;
    /// The scopes recorded as forgotten that start with `prefix`.
    fn forgotten_scopes(&self, prefix: &str) -> Result<Vec<String>, KeyError>;
    /// The scopes that hold keys and start with `prefix` (a domain family such as the quarantine's daily keys).
    fn scopes_with_prefix(&self, prefix: &str) -> Result<Vec<String>, KeyError>;
    /// How many key versions a scope holds (0 when it has none or was forgotten).
    fn versions(&self, scope: &str) -> Result<u32, KeyError>;
    /// The ids of a scope's key versions, oldest first (none when it has none or was forgotten): what a subject
    /// access export looks for in sanitized records.
    fn key_ids(&self, scope: &str) -> Result<Vec<KeyId>, KeyError>;
    /// Adds `count` to a key's tally of random-nonce encryptions (kept across restarts, shared by every instance
    /// using the store); returns the new total.
    fn record_encryptions(&self, key_id: &KeyId, count: u64) -> Result<u64, KeyError>;
    /// Adds each count to its key's tally, in one transaction where the store has them (the key ids are
    /// distinct): the counts of keys no cache holds any more (see `Keyring::retire_worn`).
    fn record_encryptions_of(&self, counts: &[(KeyId, u64)]) -> Result<(), KeyError> {
        counts
            .iter()
            .try_for_each(|(key_id, count)| self.record_encryptions(key_id, *count).map(drop))
    }
    /// A named store-wide secret (wrapped), if the store has it.
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KeyError>;
    /// A named store-wide secret (wrapped), inserted if absent; returns the stored one.
    fn meta_insert_if_absent(&self, name: &str, wrapped: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Up to `limit` stored keys in key-id order, after `after` (from the first when `None`): a KEK rewrap's pages.
    fn keys_after(&self, after: Option<&KeyId>, limit: usize) -> Result<Vec<StoredKey>, KeyError>;
    /// Replaces a key's wrapped bytes if they are still `old`: false when the key is gone (forgotten meanwhile) or
    /// was rewrapped by someone else. Never brings back a deleted key.
    fn replace_wrapped(&self, key_id: &KeyId, old: &[u8], new: &[u8]) -> Result<bool, KeyError>;
    /// As [`replace_wrapped`](Self::replace_wrapped), for a named store-wide secret.
    fn replace_meta(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool, KeyError>;
    /// After a rewrap: drop what the store keeps of the rows as they were, where it can (SQLite's WAL). PostgreSQL
    /// keeps them as dead tuples until VACUUM, and in its WAL and backups (the README says so).
    fn after_rewrap(&self) -> Result<(), KeyError> {
        Ok(())
    }
    /// Seconds since 1970-01-01 UTC by the store's clock: the server's, for a store several hosts share.
    fn clock_secs(&self) -> Result<u64, KeyError> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()))
    }
}

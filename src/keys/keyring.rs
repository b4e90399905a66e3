//! The keyring: data keys by scope and by id, from the key store through a bounded in-memory cache.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use moka::sync::Cache;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::SqliteStore;
use super::WrappingKey;
use super::forgets;
use super::store::{KeyLookup, KeyStore, StoredKey};
use crate::config::{KeysConfig, StoreLocation};
use crate::crypto::{CountSink, DataKey, Dek, KekProvider, KekSet, KekSource, KeyId, open_kek};
use crate::error::{Error, KeyError, RevealError};

/// Entries the key cache holds at most, by default.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
/// How long an unwrapped key stays cached, by default. It bounds how long another instance's rotation or forget
/// takes to be seen here.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);

const SUBJECT_INDEX: &str = "subject-index";
/// The daily quarantine domains: `piiwall.quarantine.<day>`.
const QUARANTINE_DOMAIN_PREFIX: &str = "piiwall.quarantine.";
/// The one quarantine key of earlier versions, and the store's record of the day this version first saw it.
const LEGACY_QUARANTINE_DOMAIN: &str = "piiwall.quarantine";
const LEGACY_QUARANTINE_SEEN: &str = "legacy-quarantine-key-first-seen-day";

/// Days since 1970-01-01 (UTC) now, by this host's clock.
pub fn today() -> u64 {
    host_secs() as u64 / 86_400
}

/// Seconds since 1970-01-01 (UTC) now, by this host's clock.
fn host_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, Copy)]
pub struct KeyCacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
}

impl Default for KeyCacheSettings {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CACHE_CAPACITY,
            ttl: DEFAULT_CACHE_TTL,
        }
    }
}

/// The keys of one batch's subjects, by subject id, and of its domains (held in memory for the batch only), and how
/// many subject keys were created.
#[derive(Default)]
pub struct BatchKeys {
    keys: HashMap<String, RecordKey>,
    /// The current keys of the domains the batch's records use: a batch has one or a few.
    domains: Vec<(String, Arc<Dek>)>,
    pub created: usize,
}

impl BatchKeys {
    pub fn get(&self, subject: &str) -> Option<&RecordKey> {
        self.keys.get(subject)
    }

    pub fn domain(&self, domain: &str) -> Option<&Arc<Dek>> {
        self.domains.iter().find(|(name, _)| name == domain).map(|(_, dek)| dek)
    }
}

/// A key that reached its encryption limit and was replaced by a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// The key scope: `d:<domain>`, or a subject's keyed hash (never the subject id).
    pub scope: String,
    /// The version new data uses from now on.
    pub version: u32,
}

impl Retired {
    /// The domain whose key this was; `None` for a subject's key.
    pub fn domain(&self) -> Option<&str> {
        self.scope.strip_prefix("d:")
    }
}

/// The key protecting a record.
#[derive(Clone)]
pub enum RecordKey {
    Active(Arc<Dek>),
    /// The record's subject was forgotten: its protected fields are redacted.
    Forgotten,
}

/// Whose key a counted key is: a scope known by name, or a subject whose scope is derived only when needed.
enum KeyHolder<'a> {
    Scope(String),
    Subject(&'a str),
}

#[derive(Clone)]
struct ById {
    scope: Arc<str>,
    key: Arc<DataKey>,
}

/// What the scope cache holds: a key in its compact form (see [`DataKey`]), expanded for each use.
#[derive(Clone)]
enum Cached {
    Active(Arc<DataKey>),
    Forgotten,
}

impl Cached {
    fn expand(&self) -> RecordKey {
        match self {
            Cached::Active(key) => RecordKey::Active(Arc::new(key.expand())),
            Cached::Forgotten => RecordKey::Forgotten,
        }
    }
}

pub struct Keyring {
    store: Arc<dyn KeyStore>,
    kek: Arc<dyn KekProvider>,
    subject_index: Hmac<Sha256>,
    /// Signs control-topic messages: derived from the subject-index key, so every instance of one store (and a
    /// restored backup of it) has it, and nobody without the KEK does.
    control: Hmac<Sha256>,
    /// Signs erasure receipts ([`crate::receipt`]).
    receipts: ed25519_dalek::SigningKey,
    by_scope: Cache<String, Cached>,
    by_id: Cache<KeyId, ById>,
    /// The encryption counts of keys whose last copy was dropped (a cache entry expired or evicted, its batches
    /// done) before the count reached a recording step: the key's next copy starts from it (see
    /// [`DataKey::counted`]). Past the key cache's capacity, `retire_worn` records the surplus in the store. A plain
    /// map behind a mutex, never a cache: the sink runs inside `DataKey::drop`, which moka can run inside its own
    /// locked sections, so it must not call into moka.
    leftovers: Arc<Mutex<HashMap<KeyId, u64>>>,
    count_sink: CountSink,
    /// The counts of every key this keyring handed out that may still be alive, for a clean stop: read directly,
    /// not through the caches, which hide expired entries and drop them some time later.
    counters: Mutex<LiveCounts>,
    capacity: usize,
    /// Domain keys, looked up for every record without a subject: a few entries, read without allocating.
    domains: RwLock<HashMap<String, (Arc<Dek>, Instant)>>,
    ttl: Duration,
    stats: KeyringStats,
    /// Cache fills share it; invalidations take it alone (see [`fill`](Self::fill)).
    fills: RwLock<()>,
    /// The key store's clock minus this host's, in seconds, as last read by [`store_today`](Self::store_today);
    /// `i64::MIN` until then. The day of a quarantined copy's key is the store's day, never the host's alone.
    store_clock_offset: AtomicI64,
    /// Forgets seen by this process (its own, and those other instances announced): a batch whose keys were
    /// resolved before one of its scopes was forgotten is sanitized again before it is written (see
    /// [`forgets_since`](Self::forgets_since)).
    forgets: super::forgets::ForgetLog,
}

/// What a KEK rewrap did, in keys.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    /// Moved to the current KEK.
    pub rewrapped: u64,
    /// Already under it (an earlier, cut-short rewrap; or made since the KEK changed).
    pub already: u64,
    /// Deleted (forgotten) or rewrapped by another process between reading and writing.
    pub gone: u64,
    /// Opened by no configured KEK (corrupted, or wrapped by a KEK the config does not name): left as they are.
    pub unreadable: u64,
}

/// The right-of-access answer about a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectStatus {
    /// The store holds keys for it, or remembers it as forgotten.
    pub known: bool,
    pub forgotten: bool,
    pub key_versions: u32,
}

/// Key cache hits and misses, keys created, and the key store's reads and writes on the record path, counted with
/// atomics and published by the caller per batch.
#[derive(Debug, Default)]
pub struct KeyringStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Keys this process created (new subjects and domains, rotations).
    pub created: AtomicU64,
    /// Key-store calls made for cache misses and new keys, and the time they took in total.
    pub store_calls: AtomicU64,
    pub store_nanos: AtomicU64,
}

impl KeyringStats {
    fn timed<T>(&self, call: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = call();
        self.store_calls.fetch_add(1, Ordering::Relaxed);
        self.store_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

impl Keyring {
    /// Opens the keyring over a store, checking that the KEK opens it (a store made under another KEK is refused).
    pub fn open(
        store: Arc<dyn KeyStore>,
        kek: Arc<dyn KekProvider>,
        cache: KeyCacheSettings,
    ) -> Result<Self, KeyError> {
        let ad = meta_ad(SUBJECT_INDEX);
        let fresh = Zeroizing::new(rand::random::<[u8; 32]>());
        let wrapped = store.meta_insert_if_absent(SUBJECT_INDEX, &kek.wrap(fresh.as_slice(), &ad)?)?;
        let index_key = kek.unwrap(&wrapped, &ad).map_err(|e| match e {
            KeyError::CorruptRow => KeyError::KekMismatch,
            other => other,
        })?;
        let subject_index = Hmac::<Sha256>::new_from_slice(&index_key).expect("HMAC takes any key length");
        let mut control_key = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(Some(b"piiwall control v1"), &index_key)
            .expand(b"control topic", control_key.as_mut_slice())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let control = Hmac::<Sha256>::new_from_slice(control_key.as_slice()).expect("HMAC takes any key length");
        // Every instance of the store signs erasure receipts with the same key; only KEK holders can derive it.
        let mut receipt_seed = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(Some(b"piiwall receipts v1"), &index_key)
            .expand(b"erasure receipt signing key", receipt_seed.as_mut_slice())
            .expect("32 bytes is a valid HKDF-SHA256 length");
        let receipts = ed25519_dalek::SigningKey::from_bytes(&receipt_seed);
        let by_scope = Cache::builder()
            .max_capacity(cache.capacity)
            .time_to_live(cache.ttl)
            .build();
        let by_id = Cache::builder()
            .max_capacity(cache.capacity)
            .time_to_live(cache.ttl)
            .support_invalidation_closures()
            .build();
        let leftovers: Arc<Mutex<HashMap<KeyId, u64>>> = Arc::default();
        let count_sink: CountSink = Arc::new({
            let leftovers = leftovers.clone();
            move |key_id, counter: &AtomicU64| {
                let mut leftovers = lock(&leftovers);
                let count = counter.swap(0, Ordering::Relaxed);
                if count > 0 {
                    *leftovers.entry(key_id).or_default() += count;
                }
            }
        });
        Ok(Self {
            store,
            kek,
            subject_index,
            control,
            receipts,
            by_scope,
            by_id,
            leftovers,
            count_sink,
            counters: Mutex::default(),
            capacity: usize::try_from(cache.capacity).unwrap_or(usize::MAX),
            domains: RwLock::new(HashMap::new()),
            ttl: cache.ttl,
            stats: KeyringStats::default(),
            fills: RwLock::new(()),
            store_clock_offset: AtomicI64::new(i64::MIN),
            forgets: Default::default(),
        })
    }

    /// Opens the configured key store and KEK.
    pub fn from_config(config: &KeysConfig) -> Result<Self, KeyError> {
        let store: Arc<dyn KeyStore> = match &config.store {
            StoreLocation::Sqlite(path) => Arc::new(SqliteStore::open(path)?),
            StoreLocation::Postgres(url) => Arc::new(super::PostgresStore::open(url)?),
        };
        let ttl = config.cache.ttl;
        let remote = |source: &KekSource| !matches!(source, KekSource::File { .. } | KekSource::Env(_));
        // A remote KEK's wrapping key, where the store has one, opens what was wrapped under it; the KEK itself opens
        // what it wrapped directly: both are in the set.
        let kek: Arc<dyn KekProvider> = Arc::from(open_kek(&config.kek, true)?);
        let wrapping = match remote(&config.kek) {
            true => WrappingKey::open(kek.clone(), &*store, ttl, config.wrapping_key)?,
            false => None,
        };
        let mut previous: Vec<Box<dyn KekProvider>> = Vec::new();
        let current: Box<dyn KekProvider> = match wrapping {
            Some(wrapping) if config.wrapping_key => {
                previous.push(Box::new(kek));
                Box::new(wrapping)
            }
            Some(wrapping) => {
                previous.push(Box::new(wrapping));
                Box::new(kek)
            }
            None => Box::new(kek),
        };
        for source in &config.kek_previous {
            let kek: Arc<dyn KekProvider> = Arc::from(open_kek(source, false)?);
            if remote(source)
                && let Some(wrapping) = WrappingKey::open(kek.clone(), &*store, ttl, false)?
            {
                previous.push(Box::new(wrapping));
            }
            previous.push(Box::new(kek));
        }
        let kek = Arc::new(KekSet::new(current, previous)?);
        Self::open(store, kek, config.cache)
    }

    /// Moves every stored key (and the store's own secret) to the current KEK (`keys.kek`), reading each with the
    /// KEK that wrapped it (`keys.kek` or `keys.kek_previous`): `batch` keys per page, `progress` after each page.
    /// Resumable and idempotent: keys already under the current KEK are skipped, so a rewrap cut short is run again.
    /// A key forgotten meanwhile stays forgotten: a rewrapped key is written only over the exact bytes it was read
    /// from, never over a deleted row.
    pub fn rewrap(&self, batch: usize, mut progress: impl FnMut(&Rewrapped)) -> Result<Rewrapped, KeyError> {
        let current = self.kek.id();
        let is_current = |wrapped: &[u8]| crate::crypto::KekSet::wrapped_by(wrapped) == Some(current.as_str());
        let mut done = Rewrapped::default();
        let ad = meta_ad(SUBJECT_INDEX);
        let candidate = self
            .kek
            .wrap(Zeroizing::new(rand::random::<[u8; 32]>()).as_slice(), &ad)?;
        let index = self.store.meta_insert_if_absent(SUBJECT_INDEX, &candidate)?;
        if !is_current(&index) {
            let secret = self.kek.unwrap(&index, &ad)?;
            self.store
                .replace_meta(SUBJECT_INDEX, &index, &self.checked_wrap(&secret, &ad)?)?;
        }
        let mut after = None;
        loop {
            let page = self.store.keys_after(after.as_ref(), batch.max(1))?;
            let Some(last) = page.last() else { break };
            after = Some(last.key_id);
            for row in &page {
                if is_current(&row.wrapped) {
                    done.already += 1;
                    continue;
                }
                let ad = dek_ad(row.key_id, &row.scope, row.version);
                let secret = match self.kek.unwrap(&row.wrapped, &ad) {
                    Ok(secret) => secret,
                    // One key no configured KEK opens (corrupted, or wrapped by a KEK the config lacks) does not
                    // stop the others from moving; it is counted and the command says so.
                    Err(KeyError::CorruptRow | KeyError::KekMissing(_)) => {
                        done.unreadable += 1;
                        continue;
                    }
                    // A previous KEK that refuses (a KMS key disabled or scheduled for deletion) leaves its keys
                    // where they are; the others move on.
                    Err(KeyError::KekRefused(why)) => {
                        tracing::warn!(error = %why, "a previous KEK refused to unwrap a key: counted as unreadable");
                        done.unreadable += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if self
                    .store
                    .replace_wrapped(&row.key_id, &row.wrapped, &self.checked_wrap(&secret, &ad)?)?
                {
                    done.rewrapped += 1;
                } else {
                    done.gone += 1;
                }
            }
            progress(&done);
        }
        self.store.after_rewrap()?;
        Ok(done)
    }

    /// Wraps under the current KEK and unwraps again before anything is written: a KEK that does not give back
    /// what it wrapped must never replace a key that opens.
    fn checked_wrap(&self, secret: &[u8], ad: &[u8]) -> Result<Vec<u8>, KeyError> {
        let wrapped = self.kek.wrap(secret, ad)?;
        match self.kek.unwrap(&wrapped, ad) {
            Ok(back) if back.as_slice() == secret => Ok(wrapped),
            _ => Err(KeyError::KekMalformed(format!(
                "{}: a key it wrapped does not unwrap to itself; nothing was written",
                self.kek.id()
            ))),
        }
    }

    /// The key scope of a data subject: a keyed hash, so the store never sees the id.
    pub fn subject_scope(&self, subject: &str) -> String {
        let mut mac = self.subject_index.clone();
        mac.update(subject.as_bytes());
        format!("s:{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// The Ed25519 signature of an erasure receipt's signed bytes.
    pub fn sign_receipt(&self, bytes: &[u8]) -> ed25519_dalek::Signature {
        use ed25519_dalek::Signer;
        self.receipts.sign(bytes)
    }

    /// The public key that checks this store's erasure receipts (`piiwall audit pubkey`).
    pub fn receipt_public_key(&self) -> ed25519_dalek::VerifyingKey {
        self.receipts.verifying_key()
    }

    /// HMAC-SHA256 of a control-topic message under the store's control key.
    pub fn control_mac(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = self.control.clone();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    pub fn domain_scope(domain: &str) -> String {
        format!("d:{domain}")
    }

    /// The current key of a data subject, created on first use; `Forgotten` once the subject was forgotten.
    pub fn subject_key(&self, subject: &str) -> Result<RecordKey, KeyError> {
        self.current(&self.subject_scope(subject))
    }

    /// The keys of a batch's subjects, creating the missing ones in one store transaction (first use of many new
    /// subjects costs one durable commit, not one each). The batch uses the returned keys directly: a bounded cache
    /// may evict or refuse them before their records come.
    pub fn prefetch_subjects<'a>(&self, subjects: impl IntoIterator<Item = &'a str>) -> Result<BatchKeys, KeyError> {
        self.prefetch(subjects, [])
    }

    /// The keys of a batch's subjects (as [`prefetch_subjects`](Self::prefetch_subjects)) and the current keys of
    /// its domains, so its records resolve their keys without touching the shared caches.
    pub fn prefetch<'a>(
        &self,
        subjects: impl IntoIterator<Item = &'a str>,
        domains: impl IntoIterator<Item = &'a str>,
    ) -> Result<BatchKeys, KeyError> {
        let mut batch = BatchKeys::default();
        for domain in domains {
            if batch.domain(domain).is_none() {
                batch.domains.push((domain.to_owned(), self.domain_key(domain)?));
            }
        }
        let mut missing: Vec<(String, String)> = Vec::new();
        let mut seen_missing: HashSet<&str> = HashSet::new();
        for subject in subjects {
            if batch.keys.contains_key(subject) || !seen_missing.insert(subject) {
                continue;
            }
            let scope = self.subject_scope(subject);
            match self.by_scope.get(&scope) {
                Some(key) => {
                    if matches!(key, Cached::Active(_)) {
                        forgets::note(&scope);
                    }
                    batch.keys.insert(subject.to_owned(), key.expand());
                }
                None => missing.push((subject.to_owned(), scope)),
            }
        }
        if missing.is_empty() {
            return Ok(batch);
        }
        // One KEK call for all the new keys: a KMS serves them concurrently, not one round trip after another.
        let key_ids: Vec<KeyId> = missing.iter().map(|_| KeyId::random()).collect();
        let secrets: Vec<Zeroizing<[u8; 32]>> = missing.iter().map(|_| Zeroizing::new(rand::random())).collect();
        let ads: Vec<Vec<u8>> = missing
            .iter()
            .zip(&key_ids)
            .map(|((_, scope), &key_id)| dek_ad(key_id, scope, 1))
            .collect();
        let to_wrap: Vec<(&[u8], &[u8])> = secrets
            .iter()
            .map(|s| s.as_slice())
            .zip(ads.iter().map(Vec::as_slice))
            .collect();
        let wrapped = self.kek.wrap_many(&to_wrap)?;
        let candidates: Vec<StoredKey> = missing
            .iter()
            .zip(key_ids)
            .zip(wrapped)
            .map(|(((_, scope), key_id), wrapped)| StoredKey {
                key_id,
                scope: scope.clone(),
                version: 1,
                wrapped,
            })
            .collect();
        let _fill = self.fill();
        let rows = self.stats.timed(|| self.store.ensure_current(&candidates))?;
        let fetched = missing.into_iter().zip(candidates.into_iter().zip(secrets).zip(rows));
        for ((subject, _), ((candidate, secret), row)) in fetched {
            let entry = match row {
                // Our candidate was stored: its key is the secret in hand, no unwrap (one KEK call less per new
                // subject, which an HSM or KMS feels).
                Some(row) if row.key_id == candidate.key_id => {
                    batch.created += 1;
                    self.stats.created.fetch_add(1, Ordering::Relaxed);
                    Cached::Active(self.counted(DataKey::new(row.key_id, row.version, secret.as_slice())))
                }
                Some(row) => Cached::Active(self.unwrap(&row)?),
                None => Cached::Forgotten,
            };
            if matches!(entry, Cached::Active(_)) {
                forgets::note(&candidate.scope);
            }
            batch.keys.insert(subject, entry.expand());
            self.by_scope.insert(candidate.scope, entry);
        }
        Ok(batch)
    }

    /// The current key of a domain, created on first use.
    pub fn domain_key(&self, domain: &str) -> Result<Arc<Dek>, KeyError> {
        let now = Instant::now();
        if let Some((dek, fetched)) = self.domains.read().unwrap_or_else(|p| p.into_inner()).get(domain)
            && now.duration_since(*fetched) < self.ttl
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            forgets::note_domain(domain);
            return Ok(dek.clone());
        }
        forgets::note_domain(domain);
        let _fill = self.fill();
        let dek = match self.current_filling(&Self::domain_scope(domain))? {
            RecordKey::Active(dek) => dek,
            RecordKey::Forgotten => return Err(KeyError::Store(format!("the key of domain {domain} was destroyed"))),
        };
        self.domains
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(domain.to_owned(), (dek.clone(), now));
        Ok(dek)
    }

    /// Cache hits and misses, keys created and key-store time so far.
    pub fn stats(&self) -> &KeyringStats {
        &self.stats
    }

    /// The key that issued a token, for `reveal`.
    pub fn key_by_id(&self, key_id: KeyId) -> Result<Arc<Dek>, Error> {
        if let Some(hit) = self.by_id.get(&key_id) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::new(hit.key.expand()));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let _fill = self.fill();
        match self.stats.timed(|| self.store.by_id(&key_id))? {
            KeyLookup::Found(row) => {
                let key = self.unwrap(&row)?;
                let dek = Arc::new(key.expand());
                self.by_id.insert(
                    key_id,
                    ById {
                        scope: row.scope.into(),
                        key,
                    },
                );
                Ok(dek)
            }
            KeyLookup::Shredded => Err(RevealError::SubjectForgotten.into()),
            KeyLookup::Unknown => Err(RevealError::UnknownKey.into()),
        }
    }

    /// What the key store holds under a key id: its row (scope, version), or that a forget destroyed it. For
    /// `breach assess`, which tells subject keys from domain keys; the row's wrapped key is not unwrapped.
    pub fn lookup_key(&self, key_id: KeyId) -> Result<KeyLookup, KeyError> {
        self.stats.timed(|| self.store.by_id(&key_id))
    }

    /// Adds a key version to a scope; new data uses it, old versions still reveal. Returns the new version.
    pub fn rotate(&self, scope: &str) -> Result<u32, KeyError> {
        if self.store.is_forgotten(scope)? {
            return Err(KeyError::Forgotten);
        }
        let next = self.store.current(scope)?.map_or(1, |k| k.version + 1);
        let (stored, _) = self.create(scope, next)?;
        self.invalidate_scope(scope);
        Ok(stored.version)
    }

    /// Records the random-nonce encryptions done under the domain keys in use and the batch's subject keys, and
    /// rotates each key whose total reached `limit`. AES-GCM with random 96-bit nonces is safe for 2^32
    /// encryptions per key (NIST SP 800-38D); the total is kept in the key store, so it survives restarts and adds up
    /// the work of every instance sharing the store. Counts are written in steps of `limit / 1024` (one store write
    /// per key every ~2 million encryptions at the default limit): a crash loses at most one step per key. A count
    /// below a step outlives the key's cache entry (see `leftovers`).
    pub fn retire_worn(&self, batch: &BatchKeys, limit: u64) -> Result<Vec<Retired>, KeyError> {
        let step = (limit / 1024).max(1);
        // First: failing after a rotation would lose the rotation's report.
        self.record_leftovers()?;
        let mut keys: Vec<(KeyHolder<'_>, Arc<Dek>)> = self
            .domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(domain, (dek, _))| (KeyHolder::Scope(Self::domain_scope(domain)), dek.clone()))
            .collect();
        keys.extend(batch.keys.iter().filter_map(|(subject, key)| match key {
            RecordKey::Active(dek) => Some((KeyHolder::Subject(subject), dek.clone())),
            RecordKey::Forgotten => None,
        }));
        let mut retired = Vec::new();
        for (holder, dek) in keys {
            let Some(count) = dek.take_unrecorded(step) else {
                continue;
            };
            let total = self
                .store
                .record_encryptions(&dek.key_id, count)
                .inspect_err(|_| dek.restore_unrecorded(count))?;
            if total < limit {
                continue;
            }
            let scope = match holder {
                KeyHolder::Scope(scope) => scope,
                KeyHolder::Subject(subject) => self.subject_scope(subject),
            };
            if let Some(version) = self.rotate_if_current(&scope, dek.key_id)? {
                retired.push(Retired { scope, version });
            }
        }
        Ok(retired)
    }

    /// Records in the store every random-nonce encryption count not yet there, however far below a step: those of
    /// every key this keyring handed out that is still alive (cached or not, expired or not), and those of keys
    /// dropped since (`leftovers`). For a clean stop, when no batch is in flight: a restart then starts from exact
    /// totals (a crash still loses at most a step per key). One transaction, in key-id order; what the store does
    /// not take is kept for a later call.
    pub fn record_all_counts(&self) -> Result<(), KeyError> {
        let mut counts: HashMap<KeyId, u64> = HashMap::new();
        {
            // Both held throughout, in the order `counted` takes them: no key is made meanwhile from a count in
            // `leftovers`, and a key dropped meanwhile hands its count over (the sink swaps it under `leftovers`)
            // wholly before or wholly after.
            let counters = lock(&self.counters);
            let mut leftovers = lock(&self.leftovers);
            for (key_id, unrecorded) in counters.alive() {
                let count = unrecorded.swap(0, Ordering::Relaxed);
                if count > 0 {
                    *counts.entry(key_id).or_default() += count;
                }
            }
            for (key_id, count) in std::mem::take(&mut *leftovers) {
                *counts.entry(key_id).or_default() += count;
            }
        }
        let mut counts: Vec<(KeyId, u64)> = counts.into_iter().collect();
        if counts.is_empty() {
            return Ok(());
        }
        counts.sort_unstable_by_key(|(key_id, _)| key_id.0);
        self.stats
            .timed(|| self.store.record_encryptions_of(&counts))
            .inspect_err(|_| {
                let mut leftovers = lock(&self.leftovers);
                for (key_id, count) in &counts {
                    *leftovers.entry(*key_id).or_default() += count;
                }
            })
    }

    /// Records in the store the counts `leftovers` holds past the key cache's capacity (and a thousand more, so a
    /// batch's worth of keys leaving the caches does not make every batch write): one transaction, at most as many
    /// keys as the caches hold. A key whose recorded total passes the limit this way rotates when it is next used
    /// and counted. Given back to `leftovers` if the store fails.
    fn record_leftovers(&self) -> Result<(), KeyError> {
        let surplus: Vec<(KeyId, u64)> = {
            let mut leftovers = lock(&self.leftovers);
            let Some(over) = leftovers.len().checked_sub(self.capacity).filter(|over| *over > 0) else {
                return Ok(());
            };
            let take = (over + 1000).min(leftovers.len());
            let ids: Vec<KeyId> = leftovers.keys().take(take).copied().collect();
            let mut surplus: Vec<(KeyId, u64)> = ids
                .into_iter()
                .filter_map(|id| leftovers.remove(&id).map(|count| (id, count)))
                .collect();
            // In key-id order, as every instance writes them: two instances recording the same keys lock their rows
            // in one order, never waiting on each other in a cycle.
            surplus.sort_unstable_by_key(|(key_id, _)| key_id.0);
            surplus
        };
        self.stats
            .timed(|| self.store.record_encryptions_of(&surplus))
            .inspect_err(|_| {
                let mut leftovers = lock(&self.leftovers);
                for (key_id, count) in &surplus {
                    *leftovers.entry(*key_id).or_default() += count;
                }
            })
    }

    /// Rotates a scope whose current key is `key_id`, returning the new version. When another lane or instance
    /// rotated (or forgot) it first, even at the same moment, only drops this process's cached copy: each rotation
    /// is reported once.
    fn rotate_if_current(&self, scope: &str, key_id: KeyId) -> Result<Option<u32>, KeyError> {
        let rotated = match self.store.current(scope)? {
            Some(current) if current.key_id == key_id => match self.create(scope, current.version + 1) {
                Ok((stored, ours)) => ours.then_some(stored.version),
                Err(KeyError::Forgotten) => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        self.invalidate_scope(scope);
        Ok(rotated)
    }

    /// The key scopes that an id given by a person (to forget, rotate or look up a subject) names: the id as
    /// given and, when it is a uuid, each of its common forms (hyphenated, simple, braced; lower and upper case):
    /// a uuid field carries the canonical form, and a string subject whatever form its producer wrote. A 64-bit
    /// integer past 2^63 (or below 0) in canonical decimal names its other form too: a protobuf `uint64` id is named
    /// unsigned, where earlier versions named it by its signed bits, as a producer keeping it in a signed long still
    /// does. Other ids are matched exactly: case, spaces and leading zeros count, since two such ids may well be two
    /// people.
    pub fn subject_scopes(&self, subject: &str) -> Vec<String> {
        self.scopes_named(subject, true)
    }

    /// The scopes `subject` names; with `other_64_bit_form`, the other form of a 64-bit id too (see
    /// [`subject_scopes`](Self::subject_scopes)).
    fn scopes_named(&self, subject: &str, other_64_bit_form: bool) -> Vec<String> {
        let mut ids = vec![subject.to_owned()];
        match (subject.parse::<u64>(), subject.parse::<i64>()) {
            _ if !other_64_bit_form => {}
            (Ok(unsigned), _) if unsigned > i64::MAX as u64 && unsigned.to_string() == subject => {
                ids.push((unsigned as i64).to_string());
            }
            (_, Ok(signed)) if signed < 0 && signed.to_string() == subject => ids.push((signed as u64).to_string()),
            _ => {}
        }
        if let Ok(uuid) = apache_avro::Uuid::try_parse(subject) {
            // A uuid field carries the canonical form; a string subject may carry any of the common ones.
            for form in [
                uuid.hyphenated().to_string(),
                uuid.simple().to_string(),
                uuid.braced().to_string(),
            ] {
                ids.push(form.to_ascii_uppercase());
                ids.push(form);
            }
        }
        ids.sort();
        ids.dedup();
        ids.iter().map(|id| self.subject_scope(id)).collect()
    }

    /// Destroys every key version of a subject (in each of its [scopes](Self::subject_scopes)) and remembers it as
    /// forgotten. Returns how many versions were destroyed (0 when it had none, or was already forgotten).
    pub fn forget_subject(&self, subject: &str) -> Result<usize, KeyError> {
        let mut destroyed = 0;
        for scope in self.subject_scopes(subject) {
            destroyed += self.forget_scope(&scope)?;
        }
        Ok(destroyed)
    }

    /// As [`forget_subject`](Self::forget_subject), by the subject's key scope (as the control topic names it).
    pub fn forget_scope(&self, scope: &str) -> Result<usize, KeyError> {
        let destroyed = self.store.forget(scope)?;
        self.invalidate_forgotten(scope);
        Ok(destroyed)
    }

    /// The key domain of the quarantined copies written on `day` (days since 1970-01-01, UTC) of records whose data
    /// subject is unknown: one key a day, destroyed by [`expire_quarantine_keys`](Self::expire_quarantine_keys).
    pub fn quarantine_domain(day: u64) -> String {
        format!("{QUARANTINE_DOMAIN_PREFIX}{day}")
    }

    /// Destroys the daily quarantine keys of days more than `retention_days` before `today`: the copies under them
    /// can never be read again. Returns how many key versions were destroyed.
    pub fn expire_quarantine_keys(&self, retention_days: u64, today: u64) -> Result<usize, KeyError> {
        let prefix = Self::domain_scope(QUARANTINE_DOMAIN_PREFIX);
        let mut destroyed = 0;
        for scope in self.store.scopes_with_prefix(&prefix)? {
            let day = scope[prefix.len()..].parse::<u64>();
            if day.is_ok_and(|day| today > day.saturating_add(retention_days)) {
                destroyed += self.forget_scope(&scope)?;
            }
        }
        Ok(destroyed + self.expire_legacy_quarantine_key(retention_days, today)?)
    }

    /// The single quarantine key of earlier versions names no day: no copy is written under it any more, so it is
    /// destroyed `retention_days` after the first day this version saw it (recorded in the store, so every
    /// instance and restart agrees).
    fn expire_legacy_quarantine_key(&self, retention_days: u64, today: u64) -> Result<usize, KeyError> {
        let scope = Self::domain_scope(LEGACY_QUARANTINE_DOMAIN);
        if self.store.versions(&scope)? == 0 {
            return Ok(0);
        }
        let seen = self
            .store
            .meta_insert_if_absent(LEGACY_QUARANTINE_SEEN, &today.to_be_bytes())?;
        let seen = <[u8; 8]>::try_from(seen.as_slice()).map_or(today, u64::from_be_bytes);
        if today > seen.saturating_add(retention_days) {
            self.forget_scope(&scope)
        } else {
            Ok(0)
        }
    }

    /// Today (days since 1970-01-01, UTC) by the key store's clock: one clock for every instance sharing the store,
    /// so that a host whose clock runs ahead does not destroy a quarantine key the others still write under.
    pub fn store_today(&self) -> Result<u64, KeyError> {
        let store = self.store.clock_secs()?;
        let offset = i64::try_from(store).unwrap_or(i64::MAX).saturating_sub(host_secs());
        self.store_clock_offset.store(offset, Ordering::Relaxed);
        Ok(store / 86_400)
    }

    /// The key of today's quarantined copies whose data subject is unknown. Today is the key store's day (the host's
    /// clock corrected by the offset to the store's, re-read with every expiry), so a host whose clock runs behind
    /// never writes under a day's key that the expiry, run by the store's clock, has already destroyed.
    pub fn quarantine_key(&self) -> Result<Arc<Dek>, KeyError> {
        let mut offset = self.store_clock_offset.load(Ordering::Relaxed);
        if offset == i64::MIN {
            self.store_today()?;
            offset = self.store_clock_offset.load(Ordering::Relaxed);
        }
        let day = host_secs().saturating_add(offset).max(0) as u64 / 86_400;
        self.domain_key(&Self::quarantine_domain(day))
    }

    /// The key scopes of every subject the store records as forgotten (keyed hashes, never ids).
    pub fn forgotten_subject_scopes(&self) -> Result<Vec<String>, KeyError> {
        self.store.forgotten_scopes("s:")
    }

    /// What the key store knows of a subject, for the right of access: no PII, only counts.
    pub fn subject_status(&self, subject: &str) -> Result<SubjectStatus, KeyError> {
        self.status_of(self.subject_scopes(subject))
    }

    /// [`subject_status`](Self::subject_status) of the form of a 64-bit id asked for alone, as an access export
    /// reads it (see [`subject_key_ids`](Self::subject_key_ids)).
    pub fn subject_status_as_exported(&self, subject: &str) -> Result<SubjectStatus, KeyError> {
        self.status_of(self.scopes_named(subject, false))
    }

    fn status_of(&self, scopes: Vec<String>) -> Result<SubjectStatus, KeyError> {
        let (mut forgotten, mut key_versions) = (false, 0);
        for scope in scopes {
            if self.store.is_forgotten(&scope)? {
                forgotten = true;
            } else {
                key_versions += self.store.versions(&scope)?;
            }
        }
        Ok(SubjectStatus {
            known: forgotten || key_versions > 0,
            forgotten,
            key_versions,
        })
    }

    /// The ids of every key version of a subject (in each of its [scopes](Self::subject_scopes), but for the other
    /// form of a 64-bit id: `-1` and `18446744073709551615` are one subject to forget, where forgetting too much is
    /// safe, but two to export, where one's records must never be handed to the other): its tokens and ciphertexts
    /// carry one of them. Empty when it has none or was forgotten.
    pub fn subject_key_ids(&self, subject: &str) -> Result<Vec<KeyId>, KeyError> {
        let mut ids = Vec::new();
        for scope in self.scopes_named(subject, false) {
            ids.extend(self.stats.timed(|| self.store.key_ids(&scope))?);
        }
        Ok(ids)
    }

    /// Drops whatever this process caches of a scope's keys: it was rotated (here or by another instance).
    pub fn invalidate_scope(&self, scope: &str) {
        self.invalidate(scope, false);
    }

    /// Drops whatever this process caches of a scope's keys, which a forget destroyed (here or in another instance),
    /// and counts the forget in [`forgets_seen`](Self::forgets_seen).
    pub fn invalidate_forgotten(&self, scope: &str) {
        self.invalidate(scope, true);
    }

    /// How many forgets this process has seen: read before a batch's keys are resolved (under
    /// [`forgets::recording`](super::forgets::recording)). The count moves only once the caches no longer hold the
    /// forgotten keys, so a batch that reads it afterwards resolves its keys without them.
    pub fn forgets_seen(&self) -> u64 {
        self.forgets.seen()
    }

    /// Notes, for the batch being sanitized ([`forgets::recording`](super::forgets::recording)), that it holds a
    /// subject's data under no key of the subject's (a quarantined copy of a record naming several): a forget of the
    /// subject touches the batch all the same.
    pub fn note_subject(&self, subject: &str) {
        for scope in self.subject_scopes(subject) {
            forgets::note(&scope);
        }
    }

    /// Whether a forget seen after the first `seen` ones destroyed a key of the scopes `tags` (what a batch
    /// resolved): the batch is then sanitized again before it is written.
    pub fn forgets_since(&self, seen: u64, tags: &[u64]) -> super::forgets::Since {
        self.forgets.since(seen, tags)
    }

    fn invalidate(&self, scope: &str, forgotten: bool) {
        // Waits for the cache fills under way: each either read the store before the forget (its entry is in the
        // cache now, and removed below) or will read it after (and find the forget).
        let _no_fill = self.fills.write().unwrap_or_else(|p| p.into_inner());
        self.by_scope.invalidate(scope);
        if let Some(domain) = scope.strip_prefix("d:") {
            self.domains.write().unwrap_or_else(|p| p.into_inner()).remove(domain);
        }
        let shared: Arc<str> = scope.into();
        self.by_id
            .invalidate_entries_if(move |_, cached| cached.scope == shared)
            .expect("invalidation closures are enabled");
        if forgotten {
            self.forgets.record(scope);
        }
    }

    fn current(&self, scope: &str) -> Result<RecordKey, KeyError> {
        let key = match self.by_scope.get(scope) {
            Some(hit) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                hit.expand()
            }
            None => {
                let _fill = self.fill();
                self.current_filling(scope)?
            }
        };
        if matches!(key, RecordKey::Active(_)) {
            forgets::note(scope);
        }
        Ok(key)
    }

    /// [`current`](Self::current) for a caller that holds [`fill`](Self::fill).
    fn current_filling(&self, scope: &str) -> Result<RecordKey, KeyError> {
        if let Some(hit) = self.by_scope.get(scope) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit.expand());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let entry = match self.stats.timed(|| self.store.current(scope))? {
            Some(row) => Cached::Active(self.unwrap(&row)?),
            None if self.stats.timed(|| self.store.is_forgotten(scope))? => Cached::Forgotten,
            None => match self.create(scope, 1) {
                Ok((row, _)) => Cached::Active(self.unwrap(&row)?),
                Err(KeyError::Forgotten) => Cached::Forgotten,
                Err(e) => return Err(e),
            },
        };
        let key = entry.expand();
        self.by_scope.insert(scope.to_owned(), entry);
        Ok(key)
    }

    /// Held by a cache fill from its store read until its cache insert; an invalidation waits for the fills under
    /// way. So a forget that races a fill wins: the fill either read the store after the forget committed, or its
    /// entry is in the cache before the invalidation removes it — never inserted after. Not re-entrant: a holder
    /// calls `current_filling`, never `current`.
    fn fill(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.fills.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates and stores a key version unless one exists; returns the stored row (ours or a concurrent winner's)
    /// and whether it is ours. [`KeyError::Forgotten`] when the scope is forgotten: the store checks that in the
    /// transaction of the insert, so a forget that commits between a caller's own check and this insert still wins.
    fn create(&self, scope: &str, version: u32) -> Result<(StoredKey, bool), KeyError> {
        let key_id = KeyId::random();
        let secret = Zeroizing::new(rand::random::<[u8; 32]>());
        let wrapped = self.kek.wrap(secret.as_slice(), &dek_ad(key_id, scope, version))?;
        let candidate = StoredKey {
            key_id,
            scope: scope.to_owned(),
            version,
            wrapped,
        };
        let stored = self
            .stats
            .timed(|| self.store.insert_if_absent(&candidate))?
            .ok_or(KeyError::Forgotten)?;
        let ours = stored.key_id == key_id;
        if ours {
            self.stats.created.fetch_add(1, Ordering::Relaxed);
        }
        Ok((stored, ours))
    }

    fn unwrap(&self, row: &StoredKey) -> Result<Arc<DataKey>, KeyError> {
        let secret = self
            .kek
            .unwrap(&row.wrapped, &dek_ad(row.key_id, &row.scope, row.version))?;
        if secret.len() != 32 {
            return Err(KeyError::CorruptRow);
        }
        Ok(self.counted(DataKey::new(row.key_id, row.version, &secret)))
    }

    /// `key` counting from what an earlier copy of it left (see [`DataKey::counted`]).
    fn counted(&self, key: DataKey) -> Arc<DataKey> {
        // `counters` first and throughout: a clean stop (which holds it too) sees the carried count either still in
        // `leftovers` or in this key's counter, never in between. Always taken before `leftovers`.
        let mut counters = lock(&self.counters);
        let carried = lock(&self.leftovers).remove(&key.key_id).unwrap_or(0);
        let key = Arc::new(key.counted(carried, self.count_sink.clone()));
        counters.add(key.key_id, key.unrecorded_count());
        key
    }
}

/// The encryption counters of the data keys a keyring handed out, held weakly: a dropped key's is pruned.
#[derive(Default)]
struct LiveCounts {
    counters: Vec<(KeyId, std::sync::Weak<AtomicU64>)>,
    /// Pruned when this many are held: twice what the last pruning kept, so adding stays cheap on average.
    prune_at: usize,
}

impl LiveCounts {
    fn add(&mut self, key_id: KeyId, counter: std::sync::Weak<AtomicU64>) {
        if self.counters.len() >= self.prune_at {
            self.counters.retain(|(_, counter)| counter.strong_count() > 0);
            self.prune_at = (self.counters.len() * 2).max(1024);
        }
        self.counters.push((key_id, counter));
    }

    fn alive(&self) -> Vec<(KeyId, Arc<AtomicU64>)> {
        self.counters
            .iter()
            .filter_map(|(key_id, counter)| Some((*key_id, counter.upgrade()?)))
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn dek_ad(key_id: KeyId, scope: &str, version: u32) -> Vec<u8> {
    let mut ad = b"piiwall/1|dek|".to_vec();
    ad.extend_from_slice(&key_id.0);
    ad.push(b'|');
    ad.extend_from_slice(scope.as_bytes());
    ad.push(b'|');
    ad.extend_from_slice(&version.to_be_bytes());
    ad
}

pub(super) fn meta_ad(name: &str) -> Vec<u8> {
    format!("piiwall/1|meta|{name}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::LocalKek;

    fn keyring(dir: &std::path::Path, kek: u8) -> Result<Keyring, KeyError> {
        let store = Arc::new(SqliteStore::open(&dir.join("keys.db"))?);
        Keyring::open(
            store,
            Arc::new(LocalKek::from_bytes(&[kek; 32])?),
            KeyCacheSettings::default(),
        )
    }

    fn active(key: RecordKey) -> Arc<Dek> {
        match key {
            RecordKey::Active(dek) => dek,
            RecordKey::Forgotten => panic!("expected an active key"),
        }
    }

    #[test]
    fn keys_are_created_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let first = active(keyring(dir.path(), 1).unwrap().subject_key("alice").unwrap());
        let again = active(keyring(dir.path(), 1).unwrap().subject_key("alice").unwrap());
        assert_eq!(first.key_id, again.key_id);
        let other = active(keyring(dir.path(), 1).unwrap().subject_key("bob").unwrap());
        assert_ne!(first.key_id, other.key_id);
    }

    #[test]
    fn rotation_is_seen_at_once_in_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let first = ring.domain_key("sales").unwrap();
        assert_eq!(ring.domain_key("sales").unwrap().key_id, first.key_id, "cached");
        assert_eq!(ring.rotate(&Keyring::domain_scope("sales")).unwrap(), 2);
        let second = ring.domain_key("sales").unwrap();
        assert_ne!(second.key_id, first.key_id);
        assert_eq!(second.version, 2);
        assert!(ring.key_by_id(first.key_id).is_ok(), "old versions still reveal");
    }

    #[test]
    fn prefetch_creates_missing_keys_once_and_respects_forget() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let existing = active(ring.subject_key("old").unwrap()).key_id;
        ring.forget_subject("gone").unwrap();
        ring.prefetch_subjects(["old", "new-1", "new-2", "new-1", "gone"])
            .unwrap();
        assert_eq!(
            active(ring.subject_key("old").unwrap()).key_id,
            existing,
            "existing keys are kept"
        );
        assert!(matches!(ring.subject_key("gone").unwrap(), RecordKey::Forgotten));
        let fresh = keyring(dir.path(), 1).unwrap();
        assert_eq!(
            active(fresh.subject_key("new-1").unwrap()).key_id,
            active(ring.subject_key("new-1").unwrap()).key_id
        );
        assert_ne!(
            active(fresh.subject_key("new-2").unwrap()).key_id,
            active(fresh.subject_key("new-1").unwrap()).key_id
        );
    }

    #[test]
    fn a_batch_holds_the_current_key_of_each_of_its_domains() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        ring.domain_key("sales").unwrap();
        ring.rotate(&Keyring::domain_scope("sales")).unwrap();
        let batch = ring.prefetch([], ["sales", "support", "sales"]).unwrap();
        for domain in ["sales", "support"] {
            let held = batch.domain(domain).expect("prefetched");
            assert_eq!(held.key_id, ring.domain_key(domain).unwrap().key_id, "{domain}");
        }
        assert_eq!(batch.domain("sales").unwrap().version, 2, "the current version");
        assert!(batch.domain("billing").is_none(), "only the domains asked for");
    }

    fn encrypt_times(dek: &Dek, times: usize) {
        for _ in 0..times {
            dek.encrypt("note", b"value");
        }
    }

    #[test]
    fn a_key_is_rotated_when_its_encryptions_reach_the_limit_counted_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = keyring(dir.path(), 1).unwrap();
        let v1 = first.domain_key("sales").unwrap();
        encrypt_times(&v1, 6);
        assert_eq!(first.retire_worn(&BatchKeys::default(), 10).unwrap(), [], "6 of 10");
        let restarted = keyring(dir.path(), 1).unwrap();
        let same = restarted.domain_key("sales").unwrap();
        assert_eq!(same.key_id, v1.key_id);
        encrypt_times(&same, 3);
        assert_eq!(restarted.retire_worn(&BatchKeys::default(), 10).unwrap(), [], "9 of 10");
        encrypt_times(&same, 1);
        let retired = restarted.retire_worn(&BatchKeys::default(), 10).unwrap();
        assert_eq!(
            retired,
            [Retired {
                scope: Keyring::domain_scope("sales"),
                version: 2
            }]
        );
        assert_eq!(
            restarted.domain_key("sales").unwrap().version,
            2,
            "new data uses the new version"
        );
        assert!(restarted.key_by_id(v1.key_id).is_ok(), "the worn key still reveals");
        assert_eq!(
            restarted.retire_worn(&BatchKeys::default(), 10).unwrap(),
            [],
            "nothing new to count"
        );
    }

    #[test]
    fn a_key_another_instance_rotated_is_not_rotated_again() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (keyring(dir.path(), 1).unwrap(), keyring(dir.path(), 1).unwrap());
        let (held_by_one, held_by_two) = (one.domain_key("sales").unwrap(), two.domain_key("sales").unwrap());
        encrypt_times(&held_by_one, 10);
        assert_eq!(one.retire_worn(&BatchKeys::default(), 10).unwrap().len(), 1);
        encrypt_times(&held_by_two, 1);
        assert_eq!(
            two.retire_worn(&BatchKeys::default(), 10).unwrap(),
            [],
            "already rotated"
        );
        assert_eq!(two.domain_key("sales").unwrap().version, 2, "its stale copy is dropped");
        assert_eq!(two.store.versions(&Keyring::domain_scope("sales")).unwrap(), 2);
    }

    #[test]
    fn instances_passing_the_limit_together_report_one_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let rings: Vec<Keyring> = (0..8).map(|_| keyring(dir.path(), 1).unwrap()).collect();
        let barrier = std::sync::Barrier::new(rings.len());
        for round in 0..10 {
            let domain = format!("sales-{round}");
            let reported: usize = std::thread::scope(|threads| {
                let handles: Vec<_> = rings
                    .iter()
                    .map(|ring| {
                        let (barrier, domain) = (&barrier, &domain);
                        threads.spawn(move || {
                            encrypt_times(&ring.domain_key(domain).unwrap(), 10);
                            barrier.wait();
                            ring.retire_worn(&BatchKeys::default(), 10).unwrap().len()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(reported, 1, "{domain}: one rotation, reported once");
            assert_eq!(rings[0].store.versions(&Keyring::domain_scope(&domain)).unwrap(), 2);
        }
    }

    #[test]
    fn only_the_batch_subject_key_that_reached_the_limit_is_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let batch = ring.prefetch_subjects(["alice", "bob"]).unwrap();
        let key = |subject| match batch.get(subject) {
            Some(RecordKey::Active(dek)) => dek.clone(),
            _ => panic!("{subject} has a key"),
        };
        encrypt_times(&key("alice"), 10);
        encrypt_times(&key("bob"), 9);
        let retired = ring.retire_worn(&batch, 10).unwrap();
        assert_eq!(
            retired,
            [Retired {
                scope: ring.subject_scope("alice"),
                version: 2
            }]
        );
        assert_eq!(active(ring.subject_key("alice").unwrap()).version, 2);
        assert_eq!(active(ring.subject_key("bob").unwrap()).version, 1);
    }

    /// A key whose cache entry expires (or is evicted) between batches keeps counting where it was: else a key
    /// reloaded every TTL that does fewer encryptions than a recording step in that time would never be counted,
    /// and never rotated.
    #[test]
    fn counts_below_a_step_survive_the_cache_entry() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let limit = 1024 * 10; // a recording step of 10
        let mut key_id = None;
        for round in 0..3 {
            let batch = ring.prefetch_subjects(["alice"]).unwrap();
            let Some(RecordKey::Active(dek)) = batch.get("alice") else {
                panic!("alice has a key")
            };
            key_id = Some(dek.key_id);
            encrypt_times(dek, 4);
            let id = dek.key_id;
            assert!(ring.retire_worn(&batch, limit).unwrap().is_empty());
            drop(batch);
            // The entry expires; the cache drops its copy (moka frees it a moment later: waited for), which leaves
            // its count (4, then 8; the third round's 12 reached the step and was recorded).
            ring.by_scope.invalidate(&ring.subject_scope("alice"));
            let started = std::time::Instant::now();
            while round < 2 && !lock(&ring.leftovers).contains_key(&id) {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the cache never dropped its copy"
                );
                ring.by_scope.run_pending_tasks();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // 12 encryptions over three copies of the key: the third reached the step and recorded all 12.
        assert_eq!(ring.store.record_encryptions(&key_id.unwrap(), 0).unwrap(), 12);
    }

    /// Counts left by more keys than the caches hold are recorded in the store, in one go, and leave the map: it
    /// stays bounded under a stream of subjects seen once.
    #[test]
    fn leftover_counts_past_the_cache_capacity_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let settings = KeyCacheSettings {
            capacity: 2,
            ..KeyCacheSettings::default()
        };
        let ring = Keyring::open(store, Arc::new(LocalKek::from_bytes(&[1; 32]).unwrap()), settings).unwrap();
        let ids: Vec<KeyId> = (0..5u8).map(|i| KeyId([i; 12])).collect();
        for (n, id) in ids.iter().enumerate() {
            (ring.count_sink)(*id, &AtomicU64::new(n as u64 + 1));
        }
        ring.retire_worn(&BatchKeys::default(), 1 << 31).unwrap();
        assert!(lock(&ring.leftovers).is_empty());
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(ring.store.record_encryptions(id, 0).unwrap(), n as u64 + 1);
        }
    }

    /// Alice's key, made and used for `times` random-nonce encryptions: the batch holding it, and its id.
    fn alice_encrypted(ring: &Keyring, times: usize) -> (BatchKeys, KeyId) {
        let batch = ring.prefetch_subjects(["alice"]).unwrap();
        let Some(RecordKey::Active(alice)) = batch.get("alice") else {
            panic!("alice has a key")
        };
        encrypt_times(alice, times);
        let key_id = alice.key_id;
        (batch, key_id)
    }

    /// A clean stop records every count, however far below a step: a subject key in the cache, a domain key, and a
    /// key the cache already let go. Without it a restart lost up to a step per key (~2 million encryptions at the
    /// default limit), each time.
    #[test]
    fn a_clean_stop_records_every_count_below_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let (batch, alice_id) = alice_encrypted(&ring, 3);
        let domain = ring.domain_key("sales").unwrap();
        encrypt_times(&domain, 5);
        let gone = KeyId([9; 12]);
        (ring.count_sink)(gone, &AtomicU64::new(7));
        assert!(ring.retire_worn(&batch, 1 << 31).unwrap().is_empty());
        drop(batch);
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&alice_id, 0).unwrap(), 3);
        assert_eq!(ring.store.record_encryptions(&domain.key_id, 0).unwrap(), 5);
        assert_eq!(ring.store.record_encryptions(&gone, 0).unwrap(), 7);
        // Recorded once: a second stop adds nothing.
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&alice_id, 0).unwrap(), 3);
        assert_eq!(ring.store.record_encryptions(&domain.key_id, 0).unwrap(), 5);
        assert_eq!(ring.store.record_encryptions(&gone, 0).unwrap(), 7);
    }

    /// A key whose cache entry expired before the stop, and which the cache has not dropped yet (its iterator skips
    /// such entries), is counted too (found by review).
    #[test]
    fn a_clean_stop_records_the_count_of_an_expired_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let settings = KeyCacheSettings {
            ttl: Duration::from_millis(50),
            ..KeyCacheSettings::default()
        };
        let ring = Keyring::open(store, Arc::new(LocalKek::from_bytes(&[1; 32]).unwrap()), settings).unwrap();
        let (batch, alice_id) = alice_encrypted(&ring, 3);
        drop(batch);
        std::thread::sleep(Duration::from_millis(200));
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&alice_id, 0).unwrap(), 3);
    }

    /// A key still alive that no cache shows (its entry invalidated, its drop not yet run, or a copy still held) is
    /// counted too: the counts are read from the keys, not through the caches (found by review).
    #[test]
    fn a_clean_stop_records_the_count_of_a_key_no_cache_shows() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let (batch, alice_id) = alice_encrypted(&ring, 3);
        ring.by_scope.invalidate(&ring.subject_scope("alice"));
        ring.by_scope.run_pending_tasks();
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&alice_id, 0).unwrap(), 3);
        drop(batch);
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&alice_id, 0).unwrap(), 3, "recorded once");
    }

    /// What the store does not take at a stop is kept, and recorded by the next call.
    #[test]
    fn counts_a_stop_could_not_record_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let domain = ring.domain_key("sales").unwrap();
        encrypt_times(&domain, 4);
        let store_file = rusqlite::Connection::open(dir.path().join("keys.db")).unwrap();
        store_file.execute_batch("DROP TABLE key_usage").unwrap();
        assert!(ring.record_all_counts().is_err(), "the store fails");
        SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        ring.record_all_counts().unwrap();
        assert_eq!(ring.store.record_encryptions(&domain.key_id, 0).unwrap(), 4);
    }

    #[test]
    fn counts_the_store_could_not_record_are_kept_for_the_next_batch() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        encrypt_times(&ring.domain_key("sales").unwrap(), 10);
        let store_file = rusqlite::Connection::open(dir.path().join("keys.db")).unwrap();
        store_file.execute_batch("DROP TABLE key_usage").unwrap();
        assert!(ring.retire_worn(&BatchKeys::default(), 10).is_err(), "the store fails");
        SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        let retired = ring.retire_worn(&BatchKeys::default(), 10).unwrap();
        assert_eq!(
            retired.len(),
            1,
            "the 10 encryptions were counted once the store answered"
        );
    }

    #[test]
    fn another_kek_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        keyring(dir.path(), 1).unwrap();
        assert!(matches!(keyring(dir.path(), 2), Err(KeyError::KekMismatch)));
    }

    #[test]
    fn forget_shreds_every_version_and_redacts_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let v1 = active(ring.subject_key("alice").unwrap()).key_id;
        ring.rotate(&ring.subject_scope("alice")).unwrap();
        let v2 = active(ring.subject_key("alice").unwrap()).key_id;
        assert_ne!(v1, v2);
        ring.key_by_id(v1).unwrap();
        assert_eq!(ring.forget_subject("alice").unwrap(), 2);
        assert!(matches!(ring.subject_key("alice").unwrap(), RecordKey::Forgotten));
        for id in [v1, v2] {
            assert!(matches!(
                ring.key_by_id(id),
                Err(Error::Reveal(RevealError::SubjectForgotten))
            ));
        }
        assert_eq!(ring.forget_subject("alice").unwrap(), 0, "forget is idempotent");
        let reopened = keyring(dir.path(), 1).unwrap();
        assert!(matches!(reopened.subject_key("alice").unwrap(), RecordKey::Forgotten));
        assert!(matches!(
            reopened.key_by_id(KeyId([0; 12])),
            Err(Error::Reveal(RevealError::UnknownKey))
        ));
    }

    /// Where [`Racing`] runs its hook: right after the store call of that name returned.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum After {
        IsForgotten,
        ById,
        Current,
        EnsureCurrent,
        Listing,
    }

    type Hook = Box<dyn FnOnce() + Send>;

    /// A store that runs a hook once, right after a chosen call: puts a forget exactly where a race would.
    struct Racing {
        inner: SqliteStore,
        hook: std::sync::Mutex<Option<(After, Hook)>>,
        /// How far the store's clock runs ahead of this host's (negative: behind), in seconds.
        clock_ahead: AtomicI64,
    }

    impl Racing {
        fn open(dir: &std::path::Path) -> Arc<Self> {
            Arc::new(Self {
                inner: SqliteStore::open(&dir.join("keys.db")).unwrap(),
                hook: std::sync::Mutex::new(None),
                clock_ahead: AtomicI64::new(0),
            })
        }

        fn arm(&self, after: After, hook: impl FnOnce() + Send + 'static) {
            *self.hook.lock().unwrap() = Some((after, Box::new(hook)));
        }

        fn fire(&self, point: After) {
            let hook = {
                let mut slot = self.hook.lock().unwrap();
                match slot.take() {
                    Some((after, hook)) if after == point => Some(hook),
                    other => {
                        *slot = other;
                        None
                    }
                }
            };
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    impl KeyStore for Racing {
        fn current(&self, scope: &str) -> Result<Option<StoredKey>, KeyError> {
            let found = self.inner.current(scope);
            self.fire(After::Current);
            found
        }
        fn by_id(&self, key_id: &KeyId) -> Result<KeyLookup, KeyError> {
            let found = self.inner.by_id(key_id);
            self.fire(After::ById);
            found
        }
        fn insert_if_absent(&self, key: &StoredKey) -> Result<Option<StoredKey>, KeyError> {
            self.inner.insert_if_absent(key)
        }
        fn ensure_current(&self, candidates: &[StoredKey]) -> Result<Vec<Option<StoredKey>>, KeyError> {
            let rows = self.inner.ensure_current(candidates);
            self.fire(After::EnsureCurrent);
            rows
        }
        fn forget(&self, scope: &str) -> Result<usize, KeyError> {
            self.inner.forget(scope)
        }
        fn is_forgotten(&self, scope: &str) -> Result<bool, KeyError> {
            let forgotten = self.inner.is_forgotten(scope);
            self.fire(After::IsForgotten);
            forgotten
        }
        fn versions(&self, scope: &str) -> Result<u32, KeyError> {
            self.inner.versions(scope)
        }
        fn key_ids(&self, scope: &str) -> Result<Vec<KeyId>, KeyError> {
            self.inner.key_ids(scope)
        }
        fn forgotten_scopes(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
            self.inner.forgotten_scopes(prefix)
        }
        fn scopes_with_prefix(&self, prefix: &str) -> Result<Vec<String>, KeyError> {
            self.inner.scopes_with_prefix(prefix)
        }
        fn record_encryptions(&self, key_id: &KeyId, count: u64) -> Result<u64, KeyError> {
            self.inner.record_encryptions(key_id, count)
        }
        fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KeyError> {
            self.inner.meta(name)
        }
        fn meta_insert_if_absent(&self, name: &str, wrapped: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.inner.meta_insert_if_absent(name, wrapped)
        }
        fn keys_after(&self, after: Option<&KeyId>, limit: usize) -> Result<Vec<StoredKey>, KeyError> {
            let page = self.inner.keys_after(after, limit);
            self.fire(After::Listing);
            page
        }
        fn replace_wrapped(&self, key_id: &KeyId, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
            self.inner.replace_wrapped(key_id, old, new)
        }
        fn replace_meta(&self, name: &str, old: &[u8], new: &[u8]) -> Result<bool, KeyError> {
            self.inner.replace_meta(name, old, new)
        }
        fn clock_secs(&self) -> Result<u64, KeyError> {
            Ok((host_secs() + self.clock_ahead.load(Ordering::Relaxed)) as u64)
        }
    }

    fn racing_keyring(store: &Arc<Racing>) -> Arc<Keyring> {
        let kek = Arc::new(LocalKek::from_bytes(&[1; 32]).unwrap());
        Arc::new(Keyring::open(store.clone(), kek, KeyCacheSettings::default()).unwrap())
    }

    fn kek_set(current: u8, previous: &[u8]) -> Arc<KekSet> {
        let local = |byte: u8| Box::new(LocalKek::from_bytes(&[byte; 32]).unwrap()) as Box<dyn KekProvider>;
        Arc::new(KekSet::new(local(current), previous.iter().map(|&b| local(b)).collect()).unwrap())
    }

    #[test]
    fn a_rewrap_moves_every_key_to_the_new_kek_and_a_forget_during_it_stays_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing::open(dir.path());
        // Keys made under the old KEK: bare wraps of before envelopes (a plain LocalKek) and enveloped ones.
        let bare = Keyring::open(
            store.clone(),
            Arc::new(LocalKek::from_bytes(&[1; 32]).unwrap()),
            KeyCacheSettings::default(),
        )
        .unwrap();
        let old = active(bare.subject_key("alice").unwrap());
        let enveloped = Keyring::open(store.clone(), kek_set(1, &[]), KeyCacheSettings::default()).unwrap();
        let bob = active(enveloped.subject_key("bob").unwrap());
        active(enveloped.subject_key("carol").unwrap());
        drop((bare, enveloped));

        // The new KEK alone cannot open the store; with the old one as previous it can.
        assert!(matches!(
            Keyring::open(store.clone(), kek_set(2, &[]), KeyCacheSettings::default()),
            Err(KeyError::KekMismatch)
        ));
        let ring = Keyring::open(store.clone(), kek_set(2, &[1]), KeyCacheSettings::default()).unwrap();
        // Carol is forgotten between the listing and the rewrite of her key.
        let (inner, carol) = (store.clone(), ring.subject_scope("carol"));
        store.arm(After::Listing, move || {
            inner.inner.forget(&carol).unwrap();
        });
        let mut pages = 0;
        let done = ring.rewrap(10, |_| pages += 1).unwrap();
        assert_eq!(
            done,
            Rewrapped {
                rewrapped: 2,
                already: 0,
                gone: 1,
                unreadable: 0
            }
        );
        assert_eq!(pages, 1, "one page of three keys");
        assert!(
            matches!(ring.subject_key("carol").unwrap(), RecordKey::Forgotten),
            "forgotten stays forgotten"
        );
        assert_eq!(
            ring.rewrap(10, |_| {}).unwrap(),
            Rewrapped {
                rewrapped: 0,
                already: 2,
                gone: 0,
                unreadable: 0
            },
            "idempotent"
        );

        // The old KEK can go: the new one alone opens the store and every key, at its old id.
        let after = Keyring::open(store.clone(), kek_set(2, &[]), KeyCacheSettings::default()).unwrap();
        assert_eq!(active(after.subject_key("alice").unwrap()).key_id, old.key_id);
        assert_eq!(active(after.subject_key("bob").unwrap()).key_id, bob.key_id);
        assert!(after.key_by_id(old.key_id).is_ok());
    }

    /// Counts the KEK calls of a local KEK.
    struct Counting {
        inner: LocalKek,
        wraps: AtomicU64,
        unwraps: AtomicU64,
    }

    impl KekProvider for Counting {
        fn wrap(&self, plaintext: &[u8], ad: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.wraps.fetch_add(1, Ordering::Relaxed);
            self.inner.wrap(plaintext, ad)
        }
        fn unwrap(&self, wrapped: &[u8], ad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            self.unwraps.fetch_add(1, Ordering::Relaxed);
            self.inner.unwrap(wrapped, ad)
        }
        fn id(&self) -> String {
            self.inner.id()
        }
    }

    #[test]
    fn a_batch_of_new_subjects_costs_one_kek_call_each_and_their_keys_work() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Arc::new(Counting {
            inner: LocalKek::from_bytes(&[1; 32]).unwrap(),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
        });
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let ring = Keyring::open(store.clone(), kek.clone(), KeyCacheSettings::default()).unwrap();
        let (wraps, unwraps) = (kek.wraps.load(Ordering::Relaxed), kek.unwraps.load(Ordering::Relaxed));
        let subjects: Vec<String> = (0..10).map(|i| format!("new-{i}")).collect();
        let batch = ring.prefetch_subjects(subjects.iter().map(String::as_str)).unwrap();
        assert_eq!(batch.created, 10);
        assert_eq!(
            kek.wraps.load(Ordering::Relaxed) - wraps,
            10,
            "one wrap per new subject"
        );
        assert_eq!(
            kek.unwraps.load(Ordering::Relaxed) - unwraps,
            0,
            "no unwrap of what was just wrapped"
        );
        // The keys held are the stored ones: another keyring reading the store derives the same tokens' keys.
        let other = Keyring::open(
            store,
            Arc::new(LocalKek::from_bytes(&[1; 32]).unwrap()),
            KeyCacheSettings::default(),
        )
        .unwrap();
        for subject in &subjects {
            let held = match batch.keys.get(subject.as_str()).unwrap() {
                RecordKey::Active(dek) => dek.clone(),
                RecordKey::Forgotten => panic!("new"),
            };
            let stored = active(other.subject_key(subject).unwrap());
            assert_eq!(held.key_id, stored.key_id);
            assert_eq!(
                held.tokenize("email", b"a@example.com"),
                stored.tokenize("email", b"a@example.com")
            );
        }
    }

    #[test]
    fn a_rewrap_writes_only_over_the_bytes_it_read_and_goes_past_keys_it_cannot_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing::open(dir.path());
        let old = Keyring::open(store.clone(), kek_set(1, &[]), KeyCacheSettings::default()).unwrap();
        for subject in ["alice", "bob", "carol"] {
            active(old.subject_key(subject).unwrap());
        }
        let rows = store.inner.keys_after(None, 10).unwrap();
        // One key corrupted in the store; another rewritten by someone else between the listing and the write.
        let mut corrupt = rows[0].wrapped.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert!(
            store
                .inner
                .replace_wrapped(&rows[0].key_id, &rows[0].wrapped, &corrupt)
                .unwrap()
        );
        let (inner, raced) = (store.clone(), rows[1].clone());
        store.arm(After::Listing, move || {
            assert!(
                inner
                    .inner
                    .replace_wrapped(&raced.key_id, &raced.wrapped, b"someone else's")
                    .unwrap()
            );
        });
        let ring = Keyring::open(store.clone(), kek_set(2, &[1]), KeyCacheSettings::default()).unwrap();
        let done = ring.rewrap(10, |_| {}).unwrap();
        assert_eq!(
            done,
            Rewrapped {
                rewrapped: 1,
                already: 0,
                gone: 1,
                unreadable: 1
            }
        );
        let after = store.inner.keys_after(None, 10).unwrap();
        assert_eq!(after[1].wrapped, b"someone else's", "the other writer's bytes stay");
        assert_eq!(after[0].wrapped, corrupt, "an unreadable key is left as it is");
    }

    #[test]
    fn a_forget_between_the_check_and_the_insert_leaves_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing::open(dir.path());
        let ring = racing_keyring(&store);
        // First use: the keyring finds no key and no forget, then the forget commits, then it inserts.
        let scope = ring.subject_scope("alice");
        let inner = store.clone();
        let forget_scope = scope.clone();
        store.arm(After::IsForgotten, move || {
            inner.inner.forget(&forget_scope).unwrap();
        });
        assert!(matches!(ring.subject_key("alice").unwrap(), RecordKey::Forgotten));
        assert!(
            store.inner.current(&scope).unwrap().is_none(),
            "no live key in a forgotten scope"
        );

        // Rotation: the same race.
        let scope = ring.subject_scope("bob");
        active(ring.subject_key("bob").unwrap());
        let inner = store.clone();
        let forget_scope = scope.clone();
        store.arm(After::IsForgotten, move || {
            inner.inner.forget(&forget_scope).unwrap();
        });
        assert!(matches!(ring.rotate(&scope), Err(KeyError::Forgotten)));
        assert!(store.inner.current(&scope).unwrap().is_none());

        // The store refuses on its own, whatever the caller checked.
        let key = StoredKey {
            key_id: KeyId::random(),
            scope,
            version: 3,
            wrapped: vec![0; 60],
        };
        assert!(store.inner.insert_if_absent(&key).unwrap().is_none());
    }

    /// Arms `after` with a forget of `subject` on another thread (another caller, as in production), and gives it
    /// time to do all it can before the filling caller goes on. Returns the forgetting thread, to join.
    fn forget_during(
        store: &Racing,
        ring: &Arc<Keyring>,
        after: After,
        subject: &'static str,
    ) -> Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>> {
        let thread = Arc::new(std::sync::Mutex::new(None));
        let (slot, forgetter) = (thread.clone(), ring.clone());
        store.arm(after, move || {
            let handle = std::thread::spawn(move || {
                forgetter.forget_subject(subject).unwrap();
            });
            *slot.lock().unwrap() = Some(handle);
            std::thread::sleep(std::time::Duration::from_millis(300));
        });
        thread
    }

    fn join(thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>) {
        let handle = thread.lock().unwrap().take().expect("the hook ran");
        handle.join().unwrap();
    }

    #[test]
    fn a_forget_racing_a_cache_fill_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing::open(dir.path());
        let key_id = active(racing_keyring(&store).subject_key("alice").unwrap()).key_id;

        // A reveal reads the key; a forget commits and invalidates meanwhile; the reveal then caches what it read.
        let ring = racing_keyring(&store);
        let forget = forget_during(&store, &ring, After::ById, "alice");
        assert!(ring.key_by_id(key_id).is_ok(), "the read came before the forget");
        join(forget);
        assert!(
            matches!(
                ring.key_by_id(key_id),
                Err(Error::Reveal(RevealError::SubjectForgotten))
            ),
            "the forgotten key must not stay cached"
        );

        // The same for a subject's current key, and for a batch's prefetch.
        for (subject, point) in [("bob", After::Current), ("carol", After::EnsureCurrent)] {
            active(racing_keyring(&store).subject_key(subject).unwrap());
            let ring = racing_keyring(&store);
            let forget = forget_during(&store, &ring, point, subject);
            match point {
                After::Current => drop(ring.subject_key(subject).unwrap()),
                _ => drop(ring.prefetch_subjects([subject]).unwrap()),
            }
            join(forget);
            assert!(
                matches!(ring.subject_key(subject).unwrap(), RecordKey::Forgotten),
                "{subject}: the forgotten key must not stay cached"
            );
        }
    }

    #[test]
    fn daily_quarantine_keys_are_destroyed_after_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let keys: Vec<(u64, KeyId)> = [100, 105, 106]
            .into_iter()
            .map(|day| (day, ring.domain_key(&Keyring::quarantine_domain(day)).unwrap().key_id))
            .collect();
        let other = ring.domain_key("sales").unwrap().key_id;
        assert_eq!(
            ring.expire_quarantine_keys(7, 112).unwrap(),
            1,
            "day 105 is kept until day 113"
        );
        assert!(matches!(
            ring.key_by_id(keys[0].1),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
        assert!(ring.key_by_id(keys[1].1).is_ok() && ring.key_by_id(keys[2].1).is_ok());
        assert_eq!(ring.expire_quarantine_keys(7, 114).unwrap(), 2);
        assert!(ring.key_by_id(other).is_ok(), "other domains are not touched");
        assert_eq!(ring.expire_quarantine_keys(7, 114).unwrap(), 0, "idempotent");
    }

    /// A uuid carried as a plain string keeps its producer's form: a forget by any form of it reaches that one.
    #[test]
    fn a_forget_of_a_uuid_reaches_every_form_a_string_subject_may_carry() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let upper = "550E8400-E29B-41D4-A716-446655440000";
        let key = active(ring.subject_key(upper).unwrap()).key_id;
        assert_eq!(ring.forget_subject("550e8400-e29b-41d4-a716-446655440000").unwrap(), 1);
        assert!(matches!(ring.subject_key(upper).unwrap(), RecordKey::Forgotten));
        assert!(ring.key_by_id(key).is_err());
        for form in [
            "550e8400e29b41d4a716446655440000",
            "{550e8400-e29b-41d4-a716-446655440000}",
        ] {
            assert!(ring.subject_status(form).unwrap().forgotten, "{form}");
        }
        assert!(!ring.subject_status("cus_1").unwrap().forgotten);
    }

    /// A 64-bit id past 2^63 was named by its signed form before protobuf's unsigned ids were read as unsigned (and
    /// still is by a producer that keeps it in a signed long): a forget by either form reaches both.
    #[test]
    fn a_forget_of_a_64_bit_id_reaches_its_signed_and_unsigned_forms() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let signed = active(ring.subject_key("-7").unwrap()).key_id;
        let unsigned = active(ring.subject_key("18446744073709551609").unwrap()).key_id;
        assert_eq!(ring.forget_subject("18446744073709551609").unwrap(), 2);
        assert!(ring.key_by_id(signed).is_err() && ring.key_by_id(unsigned).is_err());
        assert!(ring.subject_status("-7").unwrap().forgotten);
        let other = active(ring.subject_key("-8").unwrap()).key_id;
        assert_eq!(ring.forget_subject("-8").unwrap(), 1);
        assert!(ring.key_by_id(other).is_err());
        assert!(ring.subject_status("18446744073709551608").unwrap().forgotten);
        // Only the canonical decimal forms: "-07" and "7" name other subjects.
        for id in ["-07", "7", "9223372036854775807"] {
            assert_eq!(ring.subject_scopes(id).len(), 1, "{id}");
        }
        // An access export reads the form asked for alone: the other form's records may be another person's.
        let exported = active(ring.subject_key("-9").unwrap()).key_id;
        active(ring.subject_key("18446744073709551607").unwrap());
        assert_eq!(ring.subject_key_ids("-9").unwrap(), [exported]);
        ring.forget_scope(&ring.subject_scope("18446744073709551607")).unwrap();
        assert!(!ring.subject_status_as_exported("-9").unwrap().forgotten);
    }

    /// Earlier versions wrote every quarantined copy under one `piiwall.quarantine` key, which no day names: it
    /// expires a retention after this version first sees it (the last copy under it is older than that).
    #[test]
    fn the_single_quarantine_key_of_earlier_versions_expires_a_retention_after_it_is_first_seen() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path(), 1).unwrap();
        let legacy = ring.domain_key("piiwall.quarantine").unwrap().key_id;
        assert_eq!(ring.expire_quarantine_keys(7, 200).unwrap(), 0, "first seen on day 200");
        assert_eq!(ring.expire_quarantine_keys(7, 207).unwrap(), 0);
        let reopened = keyring(dir.path(), 1).unwrap();
        assert_eq!(
            reopened.expire_quarantine_keys(7, 208).unwrap(),
            1,
            "the first sighting is kept in the store"
        );
        assert!(matches!(
            reopened.key_by_id(legacy),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
    }

    /// Quarantine keys are written and expired by one clock, the key store's: a host whose clock runs a month
    /// behind the store's writes under the store's day, so the hourly expiry (by the store's clock) destroys no key
    /// that copies are still being written under, and every copy is kept for the whole retention.
    #[test]
    fn a_host_clock_behind_the_stores_writes_quarantine_copies_under_the_stores_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = Racing::open(dir.path());
        store.clock_ahead.store(30 * 86_400, Ordering::Relaxed);
        let ring = racing_keyring(&store);
        let written = ring.quarantine_key().unwrap().key_id;
        let store_day = ring.store_today().unwrap();
        assert_eq!(
            ring.expire_quarantine_keys(7, store_day).unwrap(),
            0,
            "today's key is not expired on its own day"
        );
        assert!(
            ring.key_by_id(written).is_ok(),
            "the copy written today can be replayed"
        );
        assert_eq!(
            ring.quarantine_key().unwrap().key_id,
            written,
            "later copies share the day's key"
        );
        assert_eq!(ring.expire_quarantine_keys(7, store_day + 8).unwrap(), 1);
        assert!(matches!(
            ring.key_by_id(written),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
    }
}

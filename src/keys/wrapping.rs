//! The store's wrapping key: a KEK of the key store's own, between a remote KEK (AWS KMS) and the data keys.
//!
//! With a KMS, one call per new subject makes a sign-up burst wait on the network (a KMS serves a few thousand calls
//! a second, a local wrap a million). Instead, the store holds one random 32-byte wrapping key per remote KEK, wrapped
//! by it (`wrapping-key/<KEK id>` in the store's meta rows; concurrent first starts agree on one); the data keys are
//! wrapped locally under the wrapping key (AES-256-GCM, their associated data bound). The remote KEK is asked to
//! unwrap the wrapping key at start-up and again every `keys.cache_ttl_secs` (from 80% of it on, by one caller, the
//! others going on meanwhile), as a data key would be re-read: a KMS key disabled or revoked stops key creation and
//! reads of uncached keys within one TTL (cached data keys live one TTL more), and an outage past the TTL makes new
//! subjects wait, as it would without the wrapping key. Nothing is stored unwrapped; the store alone, without the
//! remote KEK, opens nothing.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::store::KeyStore;
use crate::crypto::{KekProvider, LocalKek};
use crate::error::KeyError;

/// The meta row holding the wrapping key of the KEK `kek_id`.
fn meta_name(kek_id: &str) -> String {
    format!("wrapping-key/{kek_id}")
}

/// A KEK provider that wraps locally under the store's wrapping key, which `outer` unwraps, re-read every `ttl`.
/// Its id names the outer KEK and the wrapping key (`aws-kms:<key ARN>+wk:<fingerprint>`): rows say what opens them.
pub struct WrappingKey {
    outer: Arc<dyn KekProvider>,
    /// The wrapping key as stored, wrapped by `outer`.
    wrapped: Vec<u8>,
    ad: Vec<u8>,
    ttl: Duration,
    held: RwLock<Held>,
    /// Taken by the one caller that asks `outer` again; the others go on with the held key while it is in its TTL.
    refreshing: Mutex<()>,
    fingerprint: String,
    id: String,
}

/// The unwrapped wrapping key, when `outer` last gave it, and its last failure to.
struct Held {
    key: Arc<LocalKek>,
    fetched: Instant,
    failed: Option<(Instant, KeyError)>,
}

/// How long a failure to re-read the wrapping key is answered from memory, so that callers queued behind a KMS that
/// does not answer fail at once instead of each waiting out its own call.
const FAILURE_MEMORY: Duration = Duration::from_secs(2);

impl WrappingKey {
    /// The wrapping key of `outer` in `store`, made (wrapped by `outer`) when the store has none and `create` says so;
    /// `None` when it has none and `create` is false (a previous KEK that never had one).
    pub fn open(
        outer: Arc<dyn KekProvider>,
        store: &dyn KeyStore,
        ttl: Duration,
        create: bool,
    ) -> Result<Option<Self>, KeyError> {
        let name = meta_name(&outer.id());
        let ad = super::keyring::meta_ad(&name);
        let wrapped = match store.meta(&name)? {
            Some(wrapped) => wrapped,
            None if create => {
                let fresh = Zeroizing::new(rand::random::<[u8; 32]>());
                store.meta_insert_if_absent(&name, &outer.wrap(fresh.as_slice(), &ad)?)?
            }
            None => return Ok(None),
        };
        let key = unwrap_key(&*outer, &wrapped, &ad)?;
        let fingerprint = key.fingerprint().to_owned();
        let id = format!("{}+wk:{fingerprint}", outer.id());
        Ok(Some(Self {
            outer,
            wrapped,
            ad,
            ttl,
            held: RwLock::new(Held {
                key: Arc::new(key),
                fetched: Instant::now(),
                failed: None,
            }),
            refreshing: Mutex::new(()),
            fingerprint,
            id,
        }))
    }

    /// The wrapping key. Past 80% of its TTL one caller asks the outer KEK again while the others go on with the
    /// held key; past the TTL, callers wait for that answer. A failure is kept for [`FAILURE_MEMORY`].
    fn key(&self) -> Result<Arc<LocalKek>, KeyError> {
        let read = || self.held.read().unwrap_or_else(|p| p.into_inner());
        let due = self.ttl.mul_f32(0.8);
        {
            let held = read();
            if held.fetched.elapsed() < due {
                return Ok(held.key.clone());
            }
        }
        let _refreshing = match self.refreshing.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                {
                    let held = read();
                    if held.fetched.elapsed() < self.ttl {
                        return Ok(held.key.clone());
                    }
                }
                self.refreshing.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        {
            let held = read();
            let in_ttl = held.fetched.elapsed() < self.ttl;
            if held.fetched.elapsed() < due {
                return Ok(held.key.clone());
            }
            if let Some((at, e)) = &held.failed
                && at.elapsed() < FAILURE_MEMORY
            {
                return if in_ttl { Ok(held.key.clone()) } else { Err(e.clone()) };
            }
        }
        // The window a revoked KEK keeps working counts from the call, not from its answer.
        let asked = Instant::now();
        let fetched = unwrap_key(&*self.outer, &self.wrapped, &self.ad).and_then(|key| {
            match key.fingerprint() == self.fingerprint {
                true => Ok(key),
                // The outer KEK gave back another key than at open: never wrap under it.
                false => Err(KeyError::KekMismatch),
            }
        });
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        match fetched {
            Ok(key) => {
                *held = Held {
                    key: Arc::new(key),
                    fetched: asked,
                    failed: None,
                };
                Ok(held.key.clone())
            }
            Err(e) => {
                held.failed = Some((Instant::now(), e.clone()));
                match held.fetched.elapsed() < self.ttl {
                    true => Ok(held.key.clone()),
                    false => Err(e),
                }
            }
        }
    }
}

fn unwrap_key(outer: &dyn KekProvider, wrapped: &[u8], ad: &[u8]) -> Result<LocalKek, KeyError> {
    let secret = outer.unwrap(wrapped, ad).map_err(|e| match e {
        KeyError::CorruptRow => KeyError::KekMismatch,
        other => other,
    })?;
    LocalKek::from_bytes(&secret)
}

impl KekProvider for WrappingKey {
    fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.key()?.wrap(plaintext, associated_data)
    }

    fn wrap_many(&self, keys: &[(&[u8], &[u8])]) -> Result<Vec<Vec<u8>>, KeyError> {
        let key = self.key()?;
        keys.iter().map(|(plaintext, ad)| key.wrap(plaintext, ad)).collect()
    }

    fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.key()?.unwrap(wrapped, associated_data)
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::keys::SqliteStore;

    /// A remote KEK stand-in: a local KEK that counts its calls, can be made unavailable, or can lie (give back
    /// another key than it wrapped).
    #[derive(Default)]
    struct Remote {
        inner: Option<LocalKek>,
        calls: AtomicUsize,
        down: AtomicBool,
        lies: AtomicBool,
    }

    impl Remote {
        fn new(byte: u8) -> Arc<Self> {
            Arc::new(Self {
                inner: Some(LocalKek::from_bytes(&[byte; 32]).unwrap()),
                ..Self::default()
            })
        }

        fn call(&self) -> Result<&LocalKek, KeyError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.down.load(Ordering::SeqCst) {
                true => Err(KeyError::StoreUnavailable("the remote KEK does not answer".into())),
                false => Ok(self.inner.as_ref().unwrap()),
            }
        }
    }

    impl KekProvider for Remote {
        fn wrap(&self, plaintext: &[u8], associated_data: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.call()?.wrap(plaintext, associated_data)
        }
        fn unwrap(&self, wrapped: &[u8], associated_data: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
            let key = self.call()?.unwrap(wrapped, associated_data)?;
            match self.lies.load(Ordering::SeqCst) {
                true => Ok(Zeroizing::new(vec![0x77; 32])),
                false => Ok(key),
            }
        }
        fn id(&self) -> String {
            format!("remote:{}", self.inner.as_ref().unwrap().fingerprint())
        }
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        (dir, store)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn new_keys_cost_no_remote_call_and_two_instances_share_one_wrapping_key() {
        let (_dir, store) = store();
        let remote = Remote::new(1);
        let first = WrappingKey::open(remote.clone(), &store, HOUR, true).unwrap().unwrap();
        assert_eq!(
            remote.calls.load(Ordering::SeqCst),
            2,
            "one wrap to make it, one unwrap to read it"
        );
        let secrets: Vec<[u8; 32]> = (0..500).map(|i| [i as u8; 32]).collect();
        let keys: Vec<(&[u8], &[u8])> = secrets.iter().map(|s| (s.as_slice(), b"ad".as_slice())).collect();
        let wrapped = first.wrap_many(&keys).unwrap();
        assert_eq!(remote.calls.load(Ordering::SeqCst), 2, "500 new keys, no remote call");

        // Another instance on the same store: the same wrapping key, so each opens what the other wrapped.
        let second = WrappingKey::open(remote.clone(), &store, HOUR, true).unwrap().unwrap();
        assert_eq!(second.id(), first.id());
        assert!(second.id().starts_with(&format!("{}+wk:", remote.id())));
        assert_eq!(second.unwrap(&wrapped[7], b"ad").unwrap().as_slice(), &[7u8; 32]);
        assert!(matches!(
            second.unwrap(&wrapped[7], b"other"),
            Err(KeyError::CorruptRow)
        ));

        // Another remote KEK has a wrapping key of its own, and none is made unless asked.
        let other = Remote::new(2);
        assert!(WrappingKey::open(other.clone(), &store, HOUR, false).unwrap().is_none());
        let theirs = WrappingKey::open(other, &store, HOUR, true).unwrap().unwrap();
        assert_ne!(theirs.id(), first.id());
        assert!(matches!(theirs.unwrap(&wrapped[7], b"ad"), Err(KeyError::CorruptRow)));
    }

    #[test]
    fn the_wrapping_key_is_read_again_before_its_ttl_ends_and_waits_once_the_remote_kek_is_down_past_it() {
        let (_dir, store) = store();
        let remote = Remote::new(3);
        let ttl = Duration::from_millis(1000);
        let wrapping = WrappingKey::open(remote.clone(), &store, ttl, true).unwrap().unwrap();
        let kept = wrapping.wrap(&[9; 32], b"ad").unwrap();
        let before = remote.calls.load(Ordering::SeqCst);
        std::thread::sleep(ttl.mul_f32(0.85));
        assert_eq!(wrapping.unwrap(&kept, b"ad").unwrap().as_slice(), &[9u8; 32]);
        assert_eq!(
            remote.calls.load(Ordering::SeqCst),
            before + 1,
            "read again from 80% of the TTL"
        );

        // Down before the TTL ends: the held key serves until it does.
        remote.down.store(true, Ordering::SeqCst);
        std::thread::sleep(ttl.mul_f32(0.85));
        assert!(
            wrapping.wrap(&[1; 32], b"ad").is_ok(),
            "within the TTL the held key serves"
        );
        // Past the TTL: new keys and reads wait (retriable), as they would without the wrapping key; callers behind
        // a failed read fail at once, without another remote call each.
        std::thread::sleep(ttl);
        std::thread::sleep(FAILURE_MEMORY);
        let calls = remote.calls.load(Ordering::SeqCst);
        assert!(matches!(
            wrapping.wrap(&[1; 32], b"ad"),
            Err(KeyError::StoreUnavailable(_))
        ));
        assert!(matches!(
            wrapping.unwrap(&kept, b"ad"),
            Err(KeyError::StoreUnavailable(_))
        ));
        assert_eq!(
            remote.calls.load(Ordering::SeqCst),
            calls + 1,
            "one remote call for both"
        );
        remote.down.store(false, Ordering::SeqCst);
        std::thread::sleep(FAILURE_MEMORY);
        assert_eq!(wrapping.unwrap(&kept, b"ad").unwrap().as_slice(), &[9u8; 32]);

        // A re-read that gives another key than at open is refused, never wrapped under.
        remote.lies.store(true, Ordering::SeqCst);
        std::thread::sleep(ttl);
        assert!(matches!(wrapping.wrap(&[1; 32], b"ad"), Err(KeyError::KekMismatch)));
    }
}

//! Erasure receipts: what a forget did, signed so that a third party can check it.
//!
//! A receipt names the data subject only by its audit pseudonym (a keyed hash, never the id), says how many key
//! versions were destroyed and when, which instances acknowledged dropping the subject's keys from their caches
//! (through the control topic, within `keys.forget_ack_wait_ms`), and what remains of the subject and until when.
//! It is signed with Ed25519 under a key every instance of the key store derives from the store's own secret
//! (so only KEK holders can sign); `piiwall audit pubkey` prints the public key, `piiwall audit verify-receipt`
//! checks a receipt against it.
//!
//! The signed bytes: the receipt as compact JSON (serde_json: no whitespace, fields in the order of
//! [`ErasureReceipt`] and [`Remaining`], strings as UTF-8 with `"`, `\\` and control characters escaped, `null`
//! for an absent `until`) with `signature` the empty string. The audit event's digest is the SHA-256 of those
//! bytes, which `piiwall audit verify-receipt` prints.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditKind, FieldCount};
use crate::control::{Control, ControlOp};
use crate::error::Error;
use crate::keys::Keyring;

/// The receipt format's name and version.
pub const FORMAT: &str = "piiwall.erasure-receipt.v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureReceipt {
    pub format: String,
    /// The subject's audit pseudonym (`audit::subject_pseudonym`): what the audit trail's events of it carry.
    pub subject: String,
    pub key_versions_destroyed: u64,
    /// When the keys were destroyed, UTC (`YYYY-MM-DDTHH:MM:SSZ`).
    pub forgotten_at: String,
    /// The instance (or command) that destroyed them.
    pub forgotten_by: String,
    /// Whether the forget was announced on the control topic (the ledger `keys reapply-forgets` reads, and what
    /// makes running instances drop the keys at once). When not, `keys publish-forgets` announces it later.
    pub announced: bool,
    /// The instances that acknowledged dropping the subject's keys from their caches, by `audit.instance`: their
    /// caches no longer hold the keys (a batch or a reveal that already held them may still finish).
    pub acknowledged_by: Vec<String>,
    /// What remains of the subject, and until when.
    pub remaining: Vec<Remaining>,
    /// The Ed25519 public key that checks the signature (base64): compare it with `piiwall audit pubkey`.
    pub public_key: String,
    /// Ed25519 over the receipt with this field empty (base64).
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remaining {
    pub what: String,
    /// UTC date-time after which it is gone, or `null` when nothing bounds it.
    pub until: Option<String>,
}

impl ErasureReceipt {
    /// The audit record of this receipt (ERASURE_RECEIPT): the subject's pseudonym, the counts, and the receipt's
    /// SHA-256, so a receipt shown later can be matched to the audit trail.
    pub fn audit_event(&self) -> AuditEvent {
        let mut event = AuditEvent::new(AuditKind::ErasureReceipt);
        event.subject_token = Some(self.subject.clone());
        event.config_digest = Some(digest(self));
        event.counts = vec![
            FieldCount {
                field_path: "subject".into(),
                action: "key versions destroyed".into(),
                count: self.key_versions_destroyed as i64,
            },
            FieldCount {
                field_path: "instances".into(),
                action: "acknowledged".into(),
                count: self.acknowledged_by.len() as i64,
            },
        ];
        event
    }

    /// A signed receipt.
    pub fn signed(keyring: &Keyring, mut receipt: ErasureReceipt) -> ErasureReceipt {
        receipt.format = FORMAT.to_owned();
        receipt.public_key = STANDARD.encode(keyring.receipt_public_key().as_bytes());
        receipt.signature = String::new();
        let signature = keyring.sign_receipt(&receipt.signed_bytes());
        receipt.signature = STANDARD.encode(signature.to_bytes());
        receipt
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = ErasureReceipt {
            signature: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).expect("a receipt always serializes")
    }

    /// Checks the signature with `public_key` (base64), or with the key the receipt names when none is given (which
    /// proves only that the receipt is intact, not who signed it).
    pub fn verify(&self, public_key: Option<&str>) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("not a {FORMAT} receipt"));
        }
        let decode = |text: &str| -> Result<[u8; 32], String> {
            STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| "the public key is not 32 bytes of base64".to_owned())
        };
        let named = decode(&self.public_key)?;
        let key = match public_key {
            Some(given) if decode(given)? != named => {
                return Err("the receipt names another public key than the one given".into());
            }
            _ => named,
        };
        let key = VerifyingKey::from_bytes(&key).map_err(|_| "the public key is not an Ed25519 key")?;
        let signature: [u8; 64] = STANDARD
            .decode(&self.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or("the signature is not 64 bytes of base64")?;
        key.verify(&self.signed_bytes(), &Signature::from_bytes(&signature))
            .map_err(|_| "the signature does not match: the receipt was altered, or signed by another key".into())
    }
}

/// What a forget needs besides the keyring: where to announce it and read acknowledgements, who does it, and what
/// bounds what remains.
#[derive(Clone)]
pub struct Erasure {
    pub client: rdkafka::ClientConfig,
    pub control_topic: String,
    /// `audit.instance`: who the receipt says destroyed the keys.
    pub instance: String,
    /// How long acknowledgements are waited for (`keys.forget_ack_wait_ms`).
    pub ack_wait: std::time::Duration,
    pub quarantine_retention_days: u64,
    pub cache_ttl: std::time::Duration,
    /// Bounds the forgets waiting for acknowledgements at once (each holds a thread and a consumer for
    /// `ack_wait`).
    waiting: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Forgets that may wait for acknowledgements at once; others wait their turn.
const CONCURRENT_ACK_WAITS: usize = 8;

impl Erasure {
    pub fn from_config(config: &crate::config::Config, client: rdkafka::ClientConfig) -> Self {
        Self {
            client,
            control_topic: config.keys.control_topic.clone(),
            instance: config.audit.instance.clone(),
            ack_wait: config.keys.forget_ack_wait,
            quarantine_retention_days: config.kafka.quarantine_retention_days,
            cache_ttl: config.keys.cache.ttl,
            waiting: std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_ACK_WAITS)),
        }
    }

    /// The same, for a command run by hand: the receipt names `<audit.instance>/cli`, as its audit events do.
    pub fn for_command(config: &crate::config::Config, client: rdkafka::ClientConfig) -> Self {
        Self {
            instance: format!("{}/cli", config.audit.instance),
            ..Self::from_config(config, client)
        }
    }

    /// Forgets `subject`: destroys its keys, announces each of its scopes on the control topic (when `control` is
    /// given: an offline command has no brokers), waits for the running instances' acknowledgements, and returns
    /// the signed receipt, with the announcement's failure if it failed (the keys are destroyed either way; the
    /// receipt then lists no acknowledgement). Blocking; `runtime` runs the announcements.
    pub fn forget(
        &self,
        keyring: &Keyring,
        control: Option<&Control>,
        runtime: &tokio::runtime::Handle,
        subject: &str,
    ) -> Result<(ErasureReceipt, Option<Error>), Error> {
        let pseudonym = crate::audit::subject_pseudonym(keyring, subject)?;
        let destroyed = keyring.forget_subject(subject)?;
        let at = crate::audit::now_ms() / 1000;
        let scopes = keyring.subject_scopes(subject);
        let announced: Result<Vec<(i32, i64)>, Error> = match control {
            None => Ok(Vec::new()),
            Some(control) => scopes
                .iter()
                .map(|scope| runtime.block_on(control.announce(keyring, ControlOp::Forget, scope)))
                .collect(),
        };
        let (landed, failure) = match announced {
            Ok(landed) => (landed, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let acknowledged_by = if landed.is_empty() {
            Vec::new()
        } else {
            let _turn = runtime
                .block_on(self.waiting.acquire())
                .expect("the semaphore is never closed");
            // Not reading the acknowledgements takes nothing from the forget: the receipt lists no instance.
            crate::control::acknowledgements(
                &self.client,
                &self.control_topic,
                keyring,
                &scopes,
                &landed,
                self.ack_wait,
            )
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the acknowledgements of a forget could not be read");
                Vec::new()
            })
        };
        let day = 86_400;
        let remaining = vec![
            Remaining {
                what: "quarantined copies of records whose data subject could not be read, or that named more \
                       than one subject, made before this forget and sealed under the day's quarantine key \
                       (kafka.quarantine_retention_days; destroyed by a running instance's expiry, by the key store's \
                       clock)"
                    .into(),
                until: Some(utc_timestamp(at + (self.quarantine_retention_days as i64 + 1) * day)),
            },
            Remaining {
                what: "wrapped copies of the destroyed keys in key-store backups, WAL or point-in-time archives and \
                       not yet vacuumed PostgreSQL rows (useless without the KEK; `keys reapply-forgets` after a \
                       restore)"
                    .into(),
                until: None,
            },
            Remaining {
                what: "keys cached by instances that did not acknowledge (dropped when keys.cache_ttl_secs passes)"
                    .into(),
                until: Some(utc_timestamp(at + self.cache_ttl.as_secs() as i64)),
            },
            Remaining {
                what: "records already written: their tokens and ciphertexts of this subject no longer reveal; \
                       hashed and masked values stay as written, for the topics' retention"
                    .into(),
                until: None,
            },
        ];
        let receipt = ErasureReceipt::signed(
            keyring,
            ErasureReceipt {
                format: String::new(),
                subject: pseudonym,
                key_versions_destroyed: destroyed as u64,
                forgotten_at: utc_timestamp(at),
                forgotten_by: self.instance.clone(),
                announced: control.is_some() && failure.is_none(),
                acknowledged_by,
                remaining,
                public_key: String::new(),
                signature: String::new(),
            },
        );
        Ok((receipt, failure))
    }
}

/// The SHA-256 of a receipt's signed bytes, lowercase hex: what its audit event carries.
pub fn digest(receipt: &ErasureReceipt) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(receipt.signed_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A UTC date-time, `YYYY-MM-DDTHH:MM:SSZ`, of seconds since 1970-01-01.
pub fn utc_timestamp(secs: i64) -> String {
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::LocalKek;
    use crate::keys::{KeyCacheSettings, SqliteStore};

    fn keyring(dir: &std::path::Path, kek: u8) -> Keyring {
        let store = Arc::new(SqliteStore::open(&dir.join("keys.db")).unwrap());
        Keyring::open(
            store,
            Arc::new(LocalKek::from_bytes(&[kek; 32]).unwrap()),
            KeyCacheSettings::default(),
        )
        .unwrap()
    }

    fn sample(keyring: &Keyring) -> ErasureReceipt {
        ErasureReceipt::signed(
            keyring,
            ErasureReceipt {
                format: String::new(),
                subject: "pwh1.AAAA.BBBB".into(),
                key_versions_destroyed: 2,
                forgotten_at: utc_timestamp(1_764_150_000),
                forgotten_by: "piiwall-1".into(),
                announced: true,
                acknowledged_by: vec!["piiwall-1".into(), "piiwall-2".into()],
                remaining: vec![Remaining {
                    what: "quarantined copies".into(),
                    until: Some(utc_timestamp(1_764_754_800)),
                }],
                public_key: String::new(),
                signature: String::new(),
            },
        )
    }

    #[test]
    fn a_receipt_verifies_and_any_alteration_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(dir.path(), 7);
        let receipt = sample(&keyring);
        let public = STANDARD.encode(keyring.receipt_public_key().as_bytes());
        receipt.verify(Some(&public)).unwrap();
        receipt.verify(Some(&format!("{public}\n"))).unwrap();
        receipt.verify(None).unwrap();
        let alterations: [fn(&mut ErasureReceipt); 6] = [
            |r| r.announced = false,
            |r| r.key_versions_destroyed += 1,
            |r| r.acknowledged_by.pop().map(drop).unwrap_or_default(),
            |r| r.forgotten_at.replace_range(0..4, "2024"),
            |r| r.remaining[0].until = None,
            |r| r.subject.push('x'),
        ];
        for alter in alterations {
            let mut altered = receipt.clone();
            alter(&mut altered);
            assert!(altered.verify(Some(&public)).is_err(), "{altered:?}");
        }
        // Another store (another KEK) signs with another key: its receipt does not verify with this store's key.
        let other_dir = tempfile::tempdir().unwrap();
        let other = sample(&self::keyring(other_dir.path(), 9));
        let refused = other.verify(Some(&public)).unwrap_err();
        assert!(refused.contains("another public key"), "{refused}");
        // The key is the store's: reopened, it is the same.
        assert_eq!(
            keyring.receipt_public_key(),
            self::keyring(dir.path(), 7).receipt_public_key()
        );
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_764_150_000), "2025-11-26T09:40:00Z");
    }
}

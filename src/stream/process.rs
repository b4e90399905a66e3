//! What becomes of one consumed record: its sanitized form for the output topic, or an encrypted copy for the
//! quarantine topic with the reason. Synchronous and CPU-bound: lanes run it off the async reactor, a batch at a
//! time.

use std::borrow::Cow;
use std::sync::Arc;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use super::framing;
use super::routes::{Part, Route, Routes};
use crate::codec::protobuf::MAX_NAMED;
use crate::codec::{Records, avro_payload};
use crate::config::KeyAction;
use crate::crypto::plain;
use crate::error::{Error, ErrorKind};
use crate::keys::{BatchKeys, RecordKey};
use crate::sanitize::Sanitizer;
use crate::transcode::TranscodeScratch;

pub enum Outcome {
    /// The sanitized record (a `None` value is a tombstone, passed on as one), and its writer schema id.
    Output {
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        schema_id: Option<u32>,
    },
    /// The original key and value encrypted under the quarantine key, and why.
    Quarantine {
        key: Option<Vec<u8>>,
        value: Vec<u8>,
        reason: String,
        class: QuarantineClass,
        schema_id: Option<u32>,
    },
}

/// What kind of fault sent a record to quarantine: the label of `piiwall_quarantined_total`, where the reason's
/// text (a field path, a schema id) would make a label per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineClass {
    /// Not in the Confluent wire format.
    Framing,
    /// No schema is bound to its topic, or its schema could not be fetched, compiled or protected (configuration).
    Schema,
    /// The record does not decode under its schema, or a value cannot be protected.
    Record,
    /// Its sanitized form is larger than the brokers accept.
    TooLarge,
}

impl QuarantineClass {
    pub fn name(self) -> &'static str {
        match self {
            QuarantineClass::Framing => "framing",
            QuarantineClass::Schema => "schema",
            QuarantineClass::Record => "record",
            QuarantineClass::TooLarge => "too_large",
        }
    }
}

pub struct Processor {
    pub routes: Arc<Routes>,
    pub sanitizer: Arc<Sanitizer>,
    pub default_domain: String,
}

impl Processor {
    /// The (topic, part, schema id) triples a batch's values and Avro keys are framed with, each once: what
    /// [`Routes::resolve`] must know before the batch is processed.
    pub fn schemas_wanted(&self, batch: &[OwnedMessage]) -> Vec<(String, Part, u32)> {
        let mut wanted = std::collections::BTreeSet::new();
        for message in batch {
            if let Some((id, _)) = message
                .payload()
                .and_then(|v| self.routes.split(message.topic(), v).ok())
            {
                wanted.insert((message.topic().to_owned(), Part::Value, id));
            }
            if self.routes.key_action(message.topic()) == Some(KeyAction::Avro)
                && let Some((id, _)) = message.key().and_then(|k| framing::parse(k).ok())
            {
                wanted.insert((message.topic().to_owned(), Part::Key, id));
            }
        }
        wanted.into_iter().collect()
    }

    /// The keys of the batch's subjects, the missing ones created in one store transaction, and of its domains.
    pub fn prefetch_keys(&self, batch: &[OwnedMessage]) -> Result<BatchKeys, Error> {
        let mut subjects = Vec::new();
        let mut domains: Vec<String> = Vec::new();
        let mut want_domain = |domain: &str| {
            if !domains.iter().any(|d| d == domain) {
                domains.push(domain.to_owned());
            }
        };
        for message in batch {
            let Some(Ok((id, payload))) = message.payload().map(|v| self.routes.split(message.topic(), v)) else {
                continue;
            };
            let Route::Ready(route) = self.routes.get(message.topic(), id) else {
                continue;
            };
            let plan = &route.schema.plan;
            let subject = match plan.subject {
                // JSON records are read again by `process`: not read here when there is no subject to find.
                None => None,
                // Protobuf records are read where they are (see `ProtoRecords::transcode`).
                Some(_) if route.protobuf().is_some() => {
                    route.records.as_ref().and_then(|r| r.subject(&route.schema, payload))
                }
                Some(_) => {
                    let Ok((payload, _)) = avro_payload(route.records.as_ref(), &route.schema, payload) else {
                        continue;
                    };
                    let Ok(subject) = route.transcoder.subject(&payload) else {
                        continue;
                    };
                    subject.map(|s| s.into_owned())
                }
            };
            let hashes_key = self.routes.key_action(message.topic()).unwrap_or(KeyAction::Hash) == KeyAction::Hash;
            if plan.needs_domain_key(subject.is_some()) || (hashes_key && message.key().is_some()) {
                want_domain(self.sanitizer.domain_of(plan));
            }
            subjects.extend(subject);
        }
        Ok(self
            .sanitizer
            .keyring()
            .prefetch(subjects.iter().map(String::as_str), domains.iter().map(String::as_str))?)
    }

    /// Processes one record. `Err` only for what is not the record's fault (retriable or fatal).
    pub fn process(
        &self,
        message: &OwnedMessage,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Outcome, Error> {
        match self.sanitize(message, keys, scratch) {
            Ok(outcome) => Ok(outcome),
            Err(Failure::Poison {
                reason,
                class,
                schema_id,
            }) => self.quarantine(message, reason, class, schema_id),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    fn sanitize(
        &self,
        message: &OwnedMessage,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Outcome, Failure> {
        let poison = |class, reason: String, schema_id| Failure::Poison {
            reason,
            class,
            schema_id,
        };
        let Some(value) = message.payload() else {
            // A tombstone: no schema, only its key to protect.
            let action = self
                .routes
                .key_action(message.topic())
                .ok_or_else(|| poison(QuarantineClass::Schema, "no schema binding for this topic".into(), None))?;
            let domain = self.routes.value_domain(message.topic());
            let key = self.key(
                message.topic(),
                action,
                domain.as_deref(),
                KeyOwner::Tombstone,
                message.key(),
                keys,
                scratch,
            )?;
            return Ok(Outcome::Output {
                key,
                value: None,
                schema_id: None,
            });
        };
        let (schema_id, payload) = self
            .routes
            .split(message.topic(), value)
            .map_err(|reason| poison(QuarantineClass::Framing, reason.to_owned(), None))?;
        let route = match self.routes.get(message.topic(), schema_id) {
            Route::Ready(route) => route,
            Route::Broken(reason) => return Err(poison(QuarantineClass::Schema, reason, Some(schema_id))),
        };
        // Protobuf records are transcoded where they are; the others are read into Avro binary first.
        let (payload, subject) = match route.protobuf() {
            Some(proto) => {
                let plan = &route.schema.plan;
                let subject = match &plan.subject {
                    Some(subject) => proto
                        .strict_subject(&plan.rules[subject.rule].path, payload)
                        .map_err(|e| poison(QuarantineClass::Record, e.to_string(), Some(schema_id)))?,
                    None => None,
                };
                (Cow::Borrowed(payload), subject.map(Cow::Owned))
            }
            None => {
                let (payload, dropped) = avro_payload(route.records.as_ref(), &route.schema, payload)
                    .map_err(|e| poison(QuarantineClass::Record, e.to_string(), Some(schema_id)))?;
                count_dropped(message.topic(), dropped);
                let subject = match route.transcoder.subject(&payload) {
                    Ok(subject) => subject.map(|s| Cow::Owned(s.into_owned())),
                    Err(e) => return Err(poison(QuarantineClass::Record, e.to_string(), Some(schema_id))),
                };
                (payload, subject)
            }
        };
        let action = self.routes.key_action(message.topic()).unwrap_or(KeyAction::Hash);
        let forgotten = match subject.as_deref() {
            Some(subject) => self.sanitizer.is_forgotten(subject, keys).map_err(Failure::Other)?,
            None => false,
        };
        let key = if forgotten && action == KeyAction::Hash {
            // A forgotten subject's records keep no pseudonym of their key (a domain-keyed hash would link them
            // under a key that survives the forget), but keep a key: compacted topics refuse records without one.
            message.key().map(|_| FORGOTTEN_KEY.to_vec())
        } else {
            // Avro keys: protected with the subject's keys, so a forgotten subject's key fields are redacted.
            self.key(
                message.topic(),
                action,
                route.schema.plan.domain.as_deref(),
                KeyOwner::Value(subject.as_deref()),
                message.key(),
                keys,
                scratch,
            )?
        };
        let mut out = Vec::with_capacity(value.len() * 2 + 64);
        if route.framed {
            framing::write_header(route.sanitized_id, &mut out);
        }
        let sanitized = match (route.protobuf(), &route.records) {
            (Some(proto), _) => self
                .sanitizer
                .keys_in(&route.schema.plan, subject.as_deref(), keys)
                .and_then(|record_keys| {
                    Ok(proto.transcode(&route.schema, &payload, &record_keys, scratch, &mut out)?)
                })
                .map(|dropped| count_dropped(message.topic(), dropped)),
            (None, None) => {
                self.sanitizer
                    .sanitize_binary_in(&route.schema, &route.transcoder, &payload, keys, scratch, &mut out)
            }
            (None, Some(records)) => {
                let mut avro = Vec::with_capacity(payload.len() * 2 + 64);
                self.sanitizer
                    .sanitize_binary_in(&route.schema, &route.transcoder, &payload, keys, scratch, &mut avro)
                    .and_then(|()| Ok(records.write(&route.schema, &avro, &mut out)?))
            }
        };
        match sanitized {
            Ok(()) => Ok(Outcome::Output {
                key,
                value: Some(out),
                schema_id: Some(schema_id),
            }),
            Err(e) if e.kind() == ErrorKind::Poison => {
                Err(poison(QuarantineClass::Record, e.to_string(), Some(schema_id)))
            }
            Err(e) => Err(Failure::Other(e)),
        }
    }

    /// The protected record key. An Avro key schema that names no subject of its own is protected with the keys of
    /// its value's subject.
    #[allow(clippy::too_many_arguments)]
    fn key(
        &self,
        topic: &str,
        action: KeyAction,
        domain: Option<&str>,
        owner: KeyOwner<'_>,
        key: Option<&[u8]>,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let Some(key) = key else { return Ok(None) };
        Ok(match action {
            KeyAction::Keep => Some(key.to_vec()),
            KeyAction::Redact => None,
            KeyAction::Avro => Some(self.avro_key(topic, key, owner, keys, scratch)?),
            KeyAction::Hash => {
                let domain = domain.unwrap_or(&self.default_domain);
                let dek = match keys.and_then(|k| k.domain(domain)) {
                    Some(dek) => dek.clone(),
                    None => self
                        .sanitizer
                        .keyring()
                        .domain_key(domain)
                        .map_err(|e| Failure::Other(e.into()))?,
                };
                let mut plaintext = Vec::with_capacity(key.len() + 1);
                plaintext.push(plain::BYTES);
                plaintext.extend_from_slice(key);
                let mut out = Vec::new();
                dek.hash_into(crate::policy::contexts::KAFKA_KEY, &plaintext, &mut out);
                Some(out)
            }
        })
    }

    /// A Confluent-framed Avro key, sanitized by its key schema and framed with the sanitized key schema's id.
    fn avro_key(
        &self,
        topic: &str,
        key: &[u8],
        owner: KeyOwner<'_>,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Vec<u8>, Failure> {
        let poison = |class, reason: String, schema_id| Failure::Poison {
            reason: format!("key: {reason}"),
            class,
            schema_id,
        };
        let (schema_id, payload) =
            framing::parse(key).map_err(|reason| poison(QuarantineClass::Framing, reason.to_owned(), None))?;
        let route = match self.routes.get_part(topic, Part::Key, schema_id) {
            Route::Ready(route) => route,
            Route::Broken(reason) => return Err(poison(QuarantineClass::Schema, reason, Some(schema_id))),
        };
        let own_subject = route
            .transcoder
            .subject(payload)
            .map_err(|e| poison(QuarantineClass::Record, e.to_string(), Some(schema_id)))?;
        let subject = match (own_subject.as_deref(), owner) {
            (Some(own), _) => Some(own),
            (None, KeyOwner::Value(subject)) => subject,
            // A deletion carries no value to name its subject: protecting its key with the domain's keys would give
            // a pseudonym no forget destroys (and one that matches nothing the records carried).
            (None, KeyOwner::Tombstone) if route.schema.plan.needs_keys() => {
                return Err(poison(
                    QuarantineClass::Schema,
                    "a tombstone whose key schema names no data subject: give the key schema a pii.subject so \
                     deletions are protected like their records"
                        .into(),
                    Some(schema_id),
                ));
            }
            (None, KeyOwner::Tombstone) => None,
        };
        let mut out = Vec::with_capacity(key.len() * 2 + 64);
        framing::write_header(route.sanitized_id, &mut out);
        match self.sanitizer.sanitize_binary_as(
            &route.schema,
            &route.transcoder,
            payload,
            subject,
            keys,
            scratch,
            &mut out,
        ) {
            Ok(()) => Ok(out),
            Err(e) if e.kind() == ErrorKind::Poison => {
                Err(poison(QuarantineClass::Record, e.to_string(), Some(schema_id)))
            }
            Err(e) => Err(Failure::Other(e)),
        }
    }

    /// The quarantined copy: nothing of a subject may outlive its forget, so the copy is encrypted under the key of
    /// the record's data subject when the record names one that can be read, and holds no content at all when that
    /// subject is forgotten; otherwise under the day's quarantine key, destroyed after
    /// `kafka.quarantine_retention_days`.
    pub(super) fn quarantine(
        &self,
        message: &OwnedMessage,
        reason: String,
        class: QuarantineClass,
        schema_id: Option<u32>,
    ) -> Result<Outcome, Error> {
        let keyring = self.sanitizer.keyring();
        let dropped = |why: &str| {
            Ok(Outcome::Quarantine {
                key: None,
                value: Vec::new(),
                reason: format!("{reason} (content dropped: {why})"),
                class,
                schema_id,
            })
        };
        let dek = match self.subjects_of(message).as_slice() {
            [] => keyring.quarantine_key()?,
            [subject] => match keyring.subject_key(subject)? {
                RecordKey::Active(dek) => dek,
                RecordKey::Forgotten => return dropped("the record's data subject is forgotten"),
            },
            // A record naming several subjects (quarantined for that) can be sealed under none of their keys alone.
            several if several.len() > MAX_NAMED => {
                return dropped(&format!("the record names more than {MAX_NAMED} data subjects"));
            }
            several => {
                for subject in several {
                    if keyring.subject_status(subject)?.forgotten {
                        return dropped("one of the data subjects the record names is forgotten");
                    }
                    // The copy holds their data under no key of theirs: a forget of any of them touches the batch.
                    keyring.note_subject(subject);
                }
                keyring.quarantine_key()?
            }
        };
        use crate::policy::contexts;
        let bound = |part| contexts::quarantine(part, message.topic(), message.partition(), message.offset());
        let seal = |bytes: &[u8], context: &str| {
            let mut plaintext = Vec::with_capacity(bytes.len() + 1);
            plaintext.push(plain::BYTES);
            plaintext.extend_from_slice(bytes);
            dek.encrypt(context, &plaintext).into_bytes()
        };
        Ok(Outcome::Quarantine {
            key: message.key().map(|k| seal(k, &bound(contexts::QUARANTINE_KEY))),
            value: match message.payload() {
                Some(payload) => seal(payload, &bound(contexts::QUARANTINE_VALUE)),
                None => seal(&[], &bound(contexts::QUARANTINE_TOMBSTONE)),
            },
            reason,
            class,
            schema_id,
        })
    }

    /// The data subjects of a record that could not be sanitized, when its schema is known and its bytes hold the
    /// subject field (a record malformed after that field still names its subject): one, or for a protobuf record
    /// that names several, each of them.
    fn subjects_of(&self, message: &OwnedMessage) -> Vec<String> {
        let Some(Ok((id, payload))) = message.payload().map(|v| self.routes.split(message.topic(), v)) else {
            return Vec::new();
        };
        let Route::Ready(route) = self.routes.get(message.topic(), id) else {
            return Vec::new();
        };
        let plan = &route.schema.plan;
        match (&route.records, &plan.subject) {
            (_, None) => Vec::new(),
            (Some(Records::Protobuf(proto)), Some(subject)) => {
                proto.subjects_named(&plan.rules[subject.rule].path, payload)
            }
            // Read leniently: a record that cannot be converted whole still names its subject.
            (Some(records), Some(_)) => records.subject(&route.schema, payload).into_iter().collect(),
            (None, Some(_)) => match route.transcoder.subject(payload) {
                Ok(subject) => subject.map(|s| s.into_owned()).into_iter().collect(),
                Err(_) => Vec::new(),
            },
        }
    }
}

/// Counts the undeclared fields dropped from a record of `topic`.
fn count_dropped(topic: &str, dropped: usize) {
    if dropped > 0 {
        metrics::counter!("piiwall_undeclared_dropped_total", "topic" => topic.to_owned()).increment(dropped as u64);
    }
}

/// The key of a forgotten subject's record under `key = "hash"`: the same for every such record, a pseudonym of
/// nothing.
pub const FORGOTTEN_KEY: &[u8] = b"piiwall:forgotten";

/// Whose record a key belongs to.
#[derive(Clone, Copy)]
enum KeyOwner<'a> {
    /// A record with a value: its data subject, if it names one.
    Value(Option<&'a str>),
    /// A deletion: no value, so no subject but the key's own.
    Tombstone,
}

/// Why a record was not sanitized.
enum Failure {
    /// The record itself: it goes to quarantine.
    Poison {
        reason: String,
        class: QuarantineClass,
        schema_id: Option<u32>,
    },
    /// Not the record's fault (key store, KEK): retried or fatal, never quarantined.
    Other(Error),
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rdkafka::Timestamp;
    use serde_json::json;

    use super::*;
    use crate::codec::json::JsonCodec;
    use crate::config::Config;
    use crate::crypto::LocalKek;
    use crate::error::RevealError;
    use crate::keys::{KeyCacheSettings, Keyring, SqliteStore};

    const KEY_SCHEMA: &str =
        r#"{"type": "record", "name": "K", "fields": [{"name": "customer_id", "type": "string", "pii": "tokenize"}]}"#;

    /// A processor for topic `t` (customer_profile.avsc, id 1), its record keys protected by `key`.
    fn processor(dir: &Path, key: &str) -> Processor {
        let root = env!("CARGO_MANIFEST_DIR");
        std::fs::write(dir.join("key.avsc"), KEY_SCHEMA).unwrap();
        let key_schema = if key == "avro" {
            format!("key_schema = \"{}\"\nkey_id = 2\n", dir.join("key.avsc").display())
        } else {
            String::new()
        };
        let config = Config::parse(
            &format!(
                "[[schemas.local]]\ntopic = \"t\"\nschema = \"{root}/schemas/customer_profile.avsc\"\nid = 1\n\
                 key = \"{key}\"\n{key_schema}"
            ),
            [],
            "test.toml",
        )
        .unwrap();
        let store = Arc::new(SqliteStore::open(&dir.join("keys.db")).unwrap());
        let kek = Arc::new(LocalKek::from_bytes(&[7; 32]).unwrap());
        let keyring = Arc::new(Keyring::open(store, kek, KeyCacheSettings::default()).unwrap());
        Processor {
            routes: Arc::new(Routes::compile(&config).unwrap()),
            sanitizer: Arc::new(Sanitizer::new(keyring, "default")),
            default_domain: "default".into(),
        }
    }

    fn framed(processor: &Processor, part: Part, id: u32, record: serde_json::Value) -> Vec<u8> {
        let Route::Ready(route) = processor.routes.get_part("t", part, id) else {
            panic!("the binding compiles");
        };
        let value = JsonCodec::new(&route.schema.writer).to_value(&record).unwrap();
        framing::encode_framed(&route.schema, id, &value).unwrap()
    }

    fn message(processor: &Processor, key: Vec<u8>) -> OwnedMessage {
        let customer = json!({
            "customer_id": "cus_9", "email": "ada@example.com", "full_name": "Ada", "date_of_birth": 1000,
            "address": {"street": "1 Main Street", "city": "Leeds", "postcode": "LS1 4AP", "country": "GB"},
            "phones": [], "notes": null, "updated_at": 1
        });
        let value = framed(processor, Part::Value, 1, customer);
        OwnedMessage::new(Some(value), Some(key), "t".into(), Timestamp::NotAvailable, 0, 0, None)
    }

    fn output_key(processor: &Processor, message: &OwnedMessage) -> Option<Vec<u8>> {
        match processor
            .process(message, None, &mut TranscodeScratch::default())
            .unwrap()
        {
            Outcome::Output { key, .. } => key,
            Outcome::Quarantine { reason, .. } => panic!("quarantined: {reason}"),
        }
    }

    /// After a forget, no new output carries a pseudonym of the subject's record key under a key that survives it.
    #[test]
    fn a_forgotten_subjects_record_keys_keep_no_pseudonym() {
        let dir = tempfile::tempdir().unwrap();
        let processor = processor(dir.path(), "hash");
        let message = message(&processor, b"cus_9".to_vec());
        assert!(output_key(&processor, &message).unwrap().starts_with(b"pwh1."));
        processor.sanitizer.keyring().forget_subject("cus_9").unwrap();
        assert_eq!(output_key(&processor, &message).as_deref(), Some(FORGOTTEN_KEY));
    }

    /// An Avro key whose schema names no subject is protected with the value's subject's key: forgetting the
    /// subject makes its key tokens unrevealable, and later keys carry none.
    #[test]
    fn avro_keys_take_the_keys_of_the_values_subject() {
        let dir = tempfile::tempdir().unwrap();
        let processor = processor(dir.path(), "avro");
        let key = framed(&processor, Part::Key, 2, json!({"customer_id": "cus_9"}));
        let message = message(&processor, key);
        let out = output_key(&processor, &message).unwrap();
        let Route::Ready(route) = processor.routes.get_part("t", Part::Key, 2) else {
            panic!()
        };
        let (_, payload) = framing::parse(&out).unwrap();
        let decoded = apache_avro::reader::datum::GenericDatumReader::builder(&route.schema.sanitized)
            .build()
            .unwrap()
            .read_value(&mut &payload[..])
            .unwrap();
        let token = JsonCodec::new(&route.schema.sanitized).to_json(&decoded)["customer_id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            processor.sanitizer.reveal("customer_id", &token).unwrap(),
            json!("cus_9")
        );
        processor.sanitizer.keyring().forget_subject("cus_9").unwrap();
        assert!(matches!(
            processor.sanitizer.reveal("customer_id", &token),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
        let after = output_key(&processor, &message).unwrap();
        let (_, payload) = framing::parse(&after).unwrap();
        let decoded = apache_avro::reader::datum::GenericDatumReader::builder(&route.schema.sanitized)
            .build()
            .unwrap()
            .read_value(&mut &payload[..])
            .unwrap();
        assert_eq!(
            JsonCodec::new(&route.schema.sanitized).to_json(&decoded)["customer_id"],
            json!(""),
            "a forgotten subject's key fields are redacted"
        );

        // A deletion names no subject: a key schema without one cannot protect it, so it is quarantined.
        let tombstone = OwnedMessage::new(
            None,
            message.key().map(<[u8]>::to_vec),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            5,
            None,
        );
        let (_, _, reason) = quarantined(&processor, &tombstone);
        assert!(reason.contains("tombstone"), "{reason}");
    }

    /// A deletion that goes to quarantine (its key schema names no subject) comes back from replay as a deletion:
    /// its copy is sealed under its own context, so it cannot be mistaken for (or made into) a record's copy. And a
    /// copy opens only at the source coordinates it was made from: relabelled to another topic (one whose record
    /// keys are kept, say), replay refuses it.
    #[test]
    fn a_quarantined_deletion_replays_as_a_deletion_and_a_relabelled_copy_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let processor = processor(dir.path(), "avro");
        let keyring = processor.sanitizer.keyring();
        let unseal = super::super::replay::unseal;
        let key = framed(&processor, Part::Key, 2, json!({"customer_id": "cus_9"}));
        let copy_of = |message: &OwnedMessage| {
            let (sealed_key, value, _) = quarantined(&processor, message);
            OwnedMessage::new(
                Some(value),
                sealed_key,
                "t.quarantine".into(),
                Timestamp::NotAvailable,
                0,
                0,
                None,
            )
        };
        let tombstone = OwnedMessage::new(None, Some(key.clone()), "t".into(), Timestamp::NotAvailable, 0, 5, None);
        let Ok((value, unsealed_key)) = unseal(keyring, &copy_of(&tombstone), ("t", 0, 5)) else {
            panic!("the copy opens")
        };
        assert_eq!(value, None, "a deletion again, not an empty record");
        assert_eq!(unsealed_key.as_deref(), Some(&key[..]));

        let garbage = OwnedMessage::new(
            Some(b"garbage".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            6,
            None,
        );
        let copy = copy_of(&garbage);
        let Ok((value, _)) = unseal(keyring, &copy, ("t", 0, 6)) else {
            panic!("the copy opens")
        };
        assert_eq!(value.as_deref(), Some(&b"garbage"[..]));
        // Copies of earlier versions, sealed under the bare contexts: a deletion was an empty value, and a bare
        // key is not taken beside a bound value.
        let dek = keyring.quarantine_key().unwrap();
        let bare = |bytes: &[u8], context: &str| {
            let mut plaintext = vec![crate::crypto::plain::BYTES];
            plaintext.extend_from_slice(bytes);
            dek.encrypt(context, &plaintext).into_bytes()
        };
        let legacy = |value: &[u8], key: Option<&[u8]>| {
            let key = key.map(|k| bare(k, crate::policy::contexts::QUARANTINE_KEY));
            let value = bare(value, crate::policy::contexts::QUARANTINE_VALUE);
            OwnedMessage::new(
                Some(value),
                key,
                "t.quarantine".into(),
                Timestamp::NotAvailable,
                0,
                0,
                None,
            )
        };
        let Ok((value, unsealed_key)) = unseal(keyring, &legacy(b"", Some(&key)), ("t", 0, 5)) else {
            panic!("an earlier version's copy opens")
        };
        assert_eq!(
            (value, unsealed_key.as_deref()),
            (None, Some(&key[..])),
            "an earlier deletion is one"
        );
        let mixed = OwnedMessage::new(
            copy.payload().map(<[u8]>::to_vec),
            Some(bare(&key, crate::policy::contexts::QUARANTINE_KEY)),
            "t.quarantine".into(),
            Timestamp::NotAvailable,
            0,
            0,
            None,
        );
        assert!(
            unseal(keyring, &mixed, ("t", 0, 6)).is_err(),
            "a bare key beside a bound value"
        );

        for elsewhere in [("kept-keys", 0, 6), ("t", 1, 6), ("t", 0, 7)] {
            assert!(
                unseal(keyring, &copy, elsewhere).is_err(),
                "relabelled to {elsewhere:?}, the copy does not open"
            );
        }
    }

    fn quarantined(processor: &Processor, message: &OwnedMessage) -> (Option<Vec<u8>>, Vec<u8>, String) {
        match processor
            .process(message, None, &mut TranscodeScratch::default())
            .unwrap()
        {
            Outcome::Quarantine { key, value, reason, .. } => (key, value, reason),
            Outcome::Output { .. } => panic!("expected a quarantined copy"),
        }
    }

    /// Reveals the quarantined copy of `message`'s value, as an operator would (the context names its source).
    fn open(processor: &Processor, message: &OwnedMessage, copy: &[u8]) -> Result<serde_json::Value, Error> {
        let context = crate::policy::contexts::quarantine(
            crate::policy::contexts::QUARANTINE_VALUE,
            message.topic(),
            message.partition(),
            message.offset(),
        );
        processor.sanitizer.reveal(&context, std::str::from_utf8(copy).unwrap())
    }

    /// Nothing of a subject outlives its forget in quarantine: a copy of a record that names its subject is under
    /// the subject's key, and one written after the forget holds nothing.
    #[test]
    fn quarantined_copies_of_a_subjects_records_are_forgotten_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let processor = processor(dir.path(), "hash");
        let whole = message(&processor, b"cus_9".to_vec());
        let mut truncated = whole.payload().unwrap().to_vec();
        truncated.truncate(truncated.len() - 3);
        let broken = OwnedMessage::new(
            Some(truncated),
            Some(b"cus_9".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            1,
            None,
        );
        let (key, value, _) = quarantined(&processor, &broken);
        assert!(key.is_some());
        assert!(open(&processor, &broken, &value).is_ok(), "the copy can be replayed");
        processor.sanitizer.keyring().forget_subject("cus_9").unwrap();
        assert!(matches!(
            open(&processor, &broken, &value),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
        let (key, value, reason) = quarantined(&processor, &broken);
        assert_eq!(
            (key, value.len()),
            (None, 0),
            "no content of a forgotten subject is kept"
        );
        assert!(reason.contains("forgotten"), "{reason}");
    }

    /// A protobuf record that names two subjects is quarantined (sanitized in place, the first one's values would
    /// stay under the second's keys); its copy is under neither subject's key alone, so once either is forgotten a
    /// copy keeps no content.
    #[test]
    fn a_protobuf_record_naming_two_subjects_keeps_nothing_of_a_forgotten_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("r.proto"),
            "syntax = \"proto3\"; import \"piiwall/pii.proto\";\n\
             message R { option (piiwall.subject) = \"id\"; string id = 1; \
             string email = 2 [(piiwall.pii).action = \"tokenize\"]; }\n",
        )
        .unwrap();
        let mut processor = processor(dir.path(), "hash");
        let config = Config::parse(
            &format!(
                "[[schemas.local]]\ntopic = \"p\"\nschema = \"{}\"\nid = 3\n",
                dir.path().join("r.proto").display()
            ),
            [],
            "test.toml",
        )
        .unwrap();
        processor.routes = Arc::new(Routes::compile(&config).unwrap());
        let record = |bytes: &[u8]| {
            let mut value = Vec::new();
            framing::write_header(3, &mut value);
            value.push(0);
            value.extend_from_slice(bytes);
            OwnedMessage::new(Some(value), None, "p".into(), Timestamp::NotAvailable, 0, 5, None)
        };
        // id = "cus_a", email, id = "cus_b".
        let two = record(&[&[0x0a, 5][..], b"cus_a", &[0x12, 5], b"a@b.c", &[0x0a, 5], b"cus_b"].concat());
        let (_, value, reason) = quarantined(&processor, &two);
        assert!(
            reason.contains("more than once") && !reason.contains("cus_"),
            "{reason}"
        );
        assert!(
            !value.is_empty(),
            "kept, under the day's key, while neither subject is forgotten"
        );
        // A batch holding such a copy, still to be written, is touched by a forget of either subject.
        let keyring = processor.sanitizer.keyring();
        let seen = keyring.forgets_seen();
        let (_, tags) = crate::keys::forgets::recording(|| quarantined(&processor, &two));
        keyring.forget_subject("cus_a").unwrap();
        assert_eq!(keyring.forgets_since(seen, &tags), crate::keys::forgets::Since::Touched);
        let (key, value, reason) = quarantined(&processor, &two);
        assert_eq!(
            (key, value.len()),
            (None, 0),
            "no content of a forgotten subject is kept"
        );
        assert!(reason.contains("forgotten"), "{reason}");
        // Named once, the record is sanitized.
        let once = record(&[&[0x0a, 5][..], b"cus_b", &[0x12, 5], b"a@b.c"].concat());
        assert!(matches!(
            processor
                .process(&once, None, &mut TranscodeScratch::default())
                .unwrap(),
            Outcome::Output { .. }
        ));
    }

    /// A copy whose subject cannot be read is under the day's quarantine key, destroyed after the retention.
    #[test]
    fn other_quarantined_copies_expire_with_their_days_key() {
        let dir = tempfile::tempdir().unwrap();
        let processor = processor(dir.path(), "hash");
        let unframed = OwnedMessage::new(
            Some(b"not avro".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            2,
            None,
        );
        let (_, value, _) = quarantined(&processor, &unframed);
        assert!(open(&processor, &unframed, &value).is_ok());
        let keyring = processor.sanitizer.keyring();
        let today = crate::keys::today();
        assert_eq!(
            keyring.expire_quarantine_keys(7, today + 7).unwrap(),
            0,
            "kept for the retention"
        );
        assert_eq!(keyring.expire_quarantine_keys(7, today + 8).unwrap(), 1);
        assert!(matches!(
            open(&processor, &unframed, &value),
            Err(Error::Reveal(RevealError::SubjectForgotten))
        ));
    }
}

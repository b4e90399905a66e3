//! What becomes of one consumed record: its sanitized form for the output topic, or an encrypted copy for the
//! quarantine topic with the reason. Synchronous and CPU-bound: lanes run it off the async reactor, a batch at a
//! time.

use std::sync::Arc;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use super::framing;
use super::routes::{Part, Route, Routes};
use crate::config::KeyAction;
use crate::crypto::plain;
use crate::error::{Error, ErrorKind};
use crate::keys::BatchKeys;
use crate::sanitize::Sanitizer;
use crate::transcode::TranscodeScratch;

/// The key domain of quarantined copies.
pub const QUARANTINE_DOMAIN: &str = "piiwall.quarantine";

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
        schema_id: Option<u32>,
    },
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
            if let Some((id, _)) = message.payload().and_then(|v| framing::parse(v).ok()) {
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
            let Some(Ok((id, payload))) = message.payload().map(framing::parse) else {
                continue;
            };
            let Route::Ready(route) = self.routes.get(message.topic(), id) else {
                continue;
            };
            let plan = &route.schema.plan;
            let Ok(subject) = route.transcoder.subject(payload) else {
                continue;
            };
            let hashes_key = self.routes.key_action(message.topic()).unwrap_or(KeyAction::Hash) == KeyAction::Hash;
            if plan.needs_domain_key(subject.is_some()) || (hashes_key && message.key().is_some()) {
                want_domain(self.sanitizer.domain_of(plan));
            }
            if let Some(subject) = subject {
                subjects.push(subject.into_owned());
            }
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
            Err(Failure::Poison { reason, schema_id }) => self.quarantine(message, reason, schema_id),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    fn sanitize(
        &self,
        message: &OwnedMessage,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Outcome, Failure> {
        let poison = |reason: String, schema_id| Failure::Poison { reason, schema_id };
        let Some(value) = message.payload() else {
            // A tombstone: no schema, only its key to protect.
            let action = self
                .routes
                .key_action(message.topic())
                .ok_or_else(|| poison("no schema binding for this topic".into(), None))?;
            let key = self.key(message.topic(), action, None, message.key(), keys, scratch)?;
            return Ok(Outcome::Output {
                key,
                value: None,
                schema_id: None,
            });
        };
        let (schema_id, payload) = framing::parse(value).map_err(|reason| poison(reason.to_owned(), None))?;
        let route = match self.routes.get(message.topic(), schema_id) {
            Route::Ready(route) => route,
            Route::Broken(reason) => return Err(poison(reason, Some(schema_id))),
        };
        let action = self.routes.key_action(message.topic()).unwrap_or(KeyAction::Hash);
        let key = self.key(
            message.topic(),
            action,
            route.schema.plan.domain.as_deref(),
            message.key(),
            keys,
            scratch,
        )?;
        let mut out = Vec::with_capacity(value.len() * 2 + 64);
        framing::write_header(route.sanitized_id, &mut out);
        match self
            .sanitizer
            .sanitize_binary_in(&route.schema, &route.transcoder, payload, keys, scratch, &mut out)
        {
            Ok(()) => Ok(Outcome::Output {
                key,
                value: Some(out),
                schema_id: Some(schema_id),
            }),
            Err(e) if e.kind() == ErrorKind::Poison => Err(poison(e.to_string(), Some(schema_id))),
            Err(e) => Err(Failure::Other(e)),
        }
    }

    fn key(
        &self,
        topic: &str,
        action: KeyAction,
        domain: Option<&str>,
        key: Option<&[u8]>,
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Option<Vec<u8>>, Failure> {
        let Some(key) = key else { return Ok(None) };
        Ok(match action {
            KeyAction::Keep => Some(key.to_vec()),
            KeyAction::Redact => None,
            KeyAction::Avro => Some(self.avro_key(topic, key, keys, scratch)?),
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
        keys: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
    ) -> Result<Vec<u8>, Failure> {
        let poison = |reason: String, schema_id| Failure::Poison {
            reason: format!("key: {reason}"),
            schema_id,
        };
        let (schema_id, payload) = framing::parse(key).map_err(|reason| poison(reason.to_owned(), None))?;
        let route = match self.routes.get_part(topic, Part::Key, schema_id) {
            Route::Ready(route) => route,
            Route::Broken(reason) => return Err(poison(reason, Some(schema_id))),
        };
        let mut out = Vec::with_capacity(key.len() * 2 + 64);
        framing::write_header(route.sanitized_id, &mut out);
        match self
            .sanitizer
            .sanitize_binary_in(&route.schema, &route.transcoder, payload, keys, scratch, &mut out)
        {
            Ok(()) => Ok(out),
            Err(e) if e.kind() == ErrorKind::Poison => Err(poison(e.to_string(), Some(schema_id))),
            Err(e) => Err(Failure::Other(e)),
        }
    }

    fn quarantine(&self, message: &OwnedMessage, reason: String, schema_id: Option<u32>) -> Result<Outcome, Error> {
        let dek = self.sanitizer.keyring().domain_key(QUARANTINE_DOMAIN)?;
        let seal = |bytes: &[u8], context: &str| {
            let mut plaintext = Vec::with_capacity(bytes.len() + 1);
            plaintext.push(plain::BYTES);
            plaintext.extend_from_slice(bytes);
            dek.encrypt(context, &plaintext).into_bytes()
        };
        Ok(Outcome::Quarantine {
            key: message.key().map(|k| seal(k, "quarantine.key")),
            value: seal(message.payload().unwrap_or_default(), "quarantine.value"),
            reason,
            schema_id,
        })
    }
}

/// Why a record was not sanitized.
enum Failure {
    /// The record itself: it goes to quarantine.
    Poison { reason: String, schema_id: Option<u32> },
    /// Not the record's fault (key store, KEK): retried or fatal, never quarantined.
    Other(Error),
}

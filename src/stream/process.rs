//! What becomes of one consumed record: its sanitized form for the output topic, or an encrypted copy for the
//! quarantine topic with the reason. Synchronous and CPU-bound: lanes run it off the async reactor, a batch at a
//! time.

use std::sync::Arc;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use super::framing;
use super::routes::{Route, Routes};
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
    /// The keys of the batch's subjects, the missing ones created in one store transaction.
    pub fn prefetch_keys(&self, batch: &[OwnedMessage]) -> Result<BatchKeys, Error> {
        let subjects: Vec<String> = batch
            .iter()
            .filter_map(|message| {
                let (id, payload) = framing::parse(message.payload()?).ok()?;
                match self.routes.get(message.topic(), id) {
                    Route::Ready(route) => route.transcoder.subject(payload).ok().flatten().map(|s| s.into_owned()),
                    Route::Broken(_) => None,
                }
            })
            .collect();
        Ok(self
            .sanitizer
            .keyring()
            .prefetch_subjects(subjects.iter().map(String::as_str))?)
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
            let key = self.key(action, None, message.key()).map_err(Failure::Other)?;
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
        let key = self
            .key(route.key, route.schema.plan.domain.as_deref(), message.key())
            .map_err(Failure::Other)?;
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

    fn key(&self, action: KeyAction, domain: Option<&str>, key: Option<&[u8]>) -> Result<Option<Vec<u8>>, Error> {
        let Some(key) = key else { return Ok(None) };
        Ok(match action {
            KeyAction::Keep => Some(key.to_vec()),
            KeyAction::Redact => None,
            KeyAction::Hash => {
                let dek = self
                    .sanitizer
                    .keyring()
                    .domain_key(domain.unwrap_or(&self.default_domain))?;
                let mut plaintext = Vec::with_capacity(key.len() + 1);
                plaintext.push(plain::BYTES);
                plaintext.extend_from_slice(key);
                let mut out = Vec::new();
                dek.hash_into("kafka.key", &plaintext, &mut out);
                Some(out)
            }
        })
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

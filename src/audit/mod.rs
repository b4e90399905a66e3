//! Audit events on the audit topic, chained so that a removed or altered event is detectable.
//!
//! An [`Auditor`] owns its instance's chain: events are sealed and produced one after the other by one task, each
//! acknowledged before the next, so the topic holds the chain in order. [`verify`] reads a topic back and checks
//! every chain in it. No event ever carries a clear PII value: coordinates, field paths, reasons and tokens only.

mod event;
mod local;
mod verify;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use event::{AUDIT_DOMAIN, AUDIT_SCHEMA, AUDIT_SCHEMA_JSON, AuditEvent, AuditKind, AuditOutcome, FieldCount};
pub use local::{LocalAudit, local_principal, write_local};
pub use verify::{VerifyReport, verify};

use crate::error::Error;
use crate::keys::Keyring;
use event::Chain;

/// Audit events waiting to be written, at most: beyond, emitting waits (audit is never dropped).
const QUEUE: usize = 10_000;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends audit events to the audit topic, in order.
#[derive(Clone)]
pub struct Auditor {
    sender: mpsc::Sender<AuditEvent>,
}

impl Auditor {
    /// Starts the writer task of `instance`'s chain. The chain starts at sequence 0 with each start of the
    /// process: a chain is one run of one instance.
    pub fn start(
        producer: FutureProducer,
        topic: String,
        instance: String,
        keyring: std::sync::Arc<Keyring>,
    ) -> (Self, JoinHandle<Result<(), Error>>) {
        let (sender, mut receiver) = mpsc::channel::<AuditEvent>(QUEUE);
        let task = tokio::spawn(async move {
            let mut chain = Chain {
                instance: instance.clone(),
                seq: 0,
                prev_mac: Vec::new(),
            };
            while let Some(event) = receiver.recv().await {
                let ring = keyring.clone();
                let key = tokio::task::spawn_blocking(move || ring.domain_key(AUDIT_DOMAIN))
                    .await
                    .map_err(|_| Error::Kafka("audit key lookup panicked".into()))??;
                let bytes = chain.seal(&event, &key, now_ms());
                producer
                    .send(
                        FutureRecord::to(&topic).key(instance.as_bytes()).payload(&bytes),
                        DELIVERY_TIMEOUT,
                    )
                    .await
                    .map_err(|(e, _)| Error::Kafka(format!("an audit event was not delivered: {e}")))?;
            }
            Ok(())
        });
        (Self { sender }, task)
    }

    /// Queues an event; waits while the queue is full.
    pub async fn emit(&self, event: AuditEvent) {
        if self.sender.send(event).await.is_err() {
            tracing::error!("audit writer stopped: an audit event was not written");
        }
    }
}

/// A data subject as a keyed pseudonym under the audit domain key: the same subject gives the same token in every
/// audit event, so an auditor can follow one subject's requests without ever seeing the id.
pub fn subject_pseudonym(keyring: &Keyring, subject: &str) -> Result<String, Error> {
    let key = keyring.domain_key(AUDIT_DOMAIN)?;
    let mut plaintext = Vec::with_capacity(subject.len() + 1);
    plaintext.push(crate::crypto::plain::STRING);
    plaintext.extend_from_slice(subject.as_bytes());
    let mut out = Vec::new();
    key.hash_into(crate::policy::contexts::AUDIT_SUBJECT, &plaintext, &mut out);
    String::from_utf8(out).map_err(|_| Error::Kafka("a subject token is not text".into()))
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

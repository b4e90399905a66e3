//! Audit events on the audit topic, chained so that a removed or altered event is detectable.
//!
//! An [`Auditor`] owns its instance's chain: events are sealed and produced one after the other by one task, each
//! acknowledged before the next, so the topic holds the chain in order. Audit is at-least-once: an event that
//! cannot be written is kept and tried again (the writer never stops on its own in `run`), callers that must not go
//! on before their events are written wait for [`Acks`] (a lane before it writes a batch, an API call before it
//! answers), and while the writer fails no lane starts writing a batch. [`verify`] reads a topic back and checks
//! every chain in it. No event ever carries a clear PII value: coordinates, field paths, reasons and tokens only.

mod event;
mod local;
mod report;
mod verify;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::producer::FutureRecord;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use event::{AUDIT_DOMAIN, AUDIT_SCHEMA, AUDIT_SCHEMA_JSON, AuditEvent, AuditKind, AuditOutcome, FieldCount};
pub use local::{LocalAudit, local_principal, write_local};
pub use report::{ProcessingReport, date_ms, processing_report};
pub use verify::{VerifyReport, verify};

use crate::error::Error;
use crate::keys::Keyring;
use event::Chain;

/// Audit events waiting to be written, at most: beyond, emitting waits (audit is never dropped).
const QUEUE: usize = 10_000;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What the writer does when an event cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep the event and try again with backoff, for as long as it takes (`run`): the pipeline waits meanwhile.
    Retry,
    /// Stop with the error (a command-line verb, which then refuses to act).
    Stop,
}

/// How long the writer may spend on one event before [`Auditor::is_behind`] says so.
pub const BEHIND: Duration = Duration::from_secs(5);

/// An event to write, and who waits for its acknowledgement.
type Queued = (AuditEvent, Option<oneshot::Sender<()>>);

/// Sends audit events to the audit topic, in order.
#[derive(Clone)]
pub struct Auditor {
    sender: mpsc::Sender<Queued>,
    failing: Arc<AtomicBool>,
    /// When the writer took the event it is writing (ms since the epoch), 0 while it has none.
    busy_since: Arc<AtomicI64>,
}

/// The API's handle on the audit writer ([`Auditor::for_calls`]): it does not keep the writer running.
#[derive(Clone)]
pub struct CallAuditor {
    sender: mpsc::WeakSender<Queued>,
    failing: Arc<AtomicBool>,
    busy_since: Arc<AtomicI64>,
}

impl CallAuditor {
    /// An auditor for one call, which keeps the writer running until the call's events are queued; `None` once the
    /// writer has ended (piiwall is stopping): the call must then not be made.
    pub fn upgrade(&self) -> Option<Auditor> {
        Some(Auditor {
            sender: self.sender.upgrade()?,
            failing: self.failing.clone(),
            busy_since: self.busy_since.clone(),
        })
    }
}

/// Acknowledgements of events handed to [`Auditor::emit_acked`].
#[must_use = "an event counts as written only once its acknowledgement came"]
pub struct Acks(Vec<oneshot::Receiver<()>>);

impl Acks {
    /// Waits until every event is acknowledged by the audit topic; `Err` when the writer stopped first.
    pub async fn written(self) -> Result<(), Error> {
        for ack in self.0 {
            ack.await
                .map_err(|_| Error::Kafka("the audit writer stopped before writing an event".into()))?;
        }
        Ok(())
    }
}

impl Auditor {
    /// Starts the writer task of `instance`'s chain. The chain starts at sequence 0 with each start of the
    /// process: a chain is one run of one instance. The task never stops on its own under [`OnFailure::Retry`]: it
    /// ends once every `Auditor` is dropped and what it holds is written. `failing` is raised while events cannot be
    /// written (`/readyz` reads it).
    pub fn start(
        producer: crate::producer::Producer,
        topic: String,
        instance: String,
        keyring: Arc<Keyring>,
        on_failure: OnFailure,
        failing: Arc<AtomicBool>,
    ) -> (Self, JoinHandle<Result<(), Error>>) {
        let (sender, mut receiver) = mpsc::channel::<Queued>(QUEUE);
        let health = failing.clone();
        let busy_since = Arc::new(AtomicI64::new(0));
        let busy = busy_since.clone();

        let task = tokio::spawn(async move {
            let mut chain = Chain {
                instance: instance.clone(),
                seq: 0,
                prev_mac: Vec::new(),
            };
            let mut retry = Retry {
                on_failure,
                failing: health,
                wait: RETRY_START,
            };
            while let Some((event, ack)) = receiver.recv().await {
                busy.store(now_ms(), Ordering::SeqCst);
                let key = loop {
                    let ring = keyring.clone();
                    match tokio::task::spawn_blocking(move || ring.domain_key(AUDIT_DOMAIN)).await {
                        Ok(Ok(key)) => break key,
                        Ok(Err(e)) => retry.after(e.into()).await?,
                        Err(_) => retry.after(Error::Kafka("audit key lookup panicked".into())).await?,
                    }
                };
                // Sealed once: a retry sends the same bytes, so a delivery that did land the first time shows as an
                // exact duplicate, which `audit verify` accepts.
                let bytes = chain.seal(&event, &key, now_ms());
                loop {
                    let lease = producer.lease();
                    let sent = lease
                        .producer()
                        .send(
                            FutureRecord::to(&topic).key(instance.as_bytes()).payload(&bytes),
                            DELIVERY_TIMEOUT,
                        )
                        .await;
                    match sent {
                        Ok(_) => {
                            producer.delivered(&lease);
                            break;
                        }
                        Err((e, _)) => {
                            producer.failed(&lease, &e);
                            retry
                                .after(Error::Kafka(format!("an audit event was not delivered: {e}")))
                                .await?;
                        }
                    }
                }
                retry.succeeded();
                busy.store(0, Ordering::SeqCst);
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            Ok(())
        });
        (
            Self {
                sender,
                failing,
                busy_since,
            },
            task,
        )
    }

    /// A handle for the subject-rights API's calls that does not keep the writer running: the writer ends with the
    /// pipeline's own handles, once what it holds is written, however long the HTTP server lives.
    pub fn for_calls(&self) -> CallAuditor {
        CallAuditor {
            sender: self.sender.downgrade(),
            failing: self.failing.clone(),
            busy_since: self.busy_since.clone(),
        }
    }

    /// Queues an event; waits while the queue is full.
    pub async fn emit(&self, event: AuditEvent) {
        if self.sender.send((event, None)).await.is_err() {
            tracing::error!("audit writer stopped: an audit event was not written");
        }
    }

    /// Queues events whose acknowledgement the caller waits for (before it stores an input offset).
    pub async fn emit_acked(&self, events: Vec<AuditEvent>) -> Acks {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let (ack, acked) = oneshot::channel();
            if self.sender.send((event, Some(ack))).await.is_ok() {
                acks.push(acked);
            } else {
                // The receiver is gone with the writer: `written` reports it.
                let (_, closed) = oneshot::channel();
                acks.push(closed);
            }
        }
        Acks(acks)
    }

    /// Whether the writer is failing to write events right now.
    pub fn is_failing(&self) -> bool {
        failing_now(&self.failing)
    }

    /// Whether the writer is failing, or has been writing one event for longer than [`BEHIND`] (a delivery that
    /// does not come is reported as failed only after the producer's `message.timeout.ms`, 5 minutes by default).
    pub fn is_behind(&self) -> bool {
        let busy_since = self.busy_since.load(Ordering::SeqCst);
        self.is_failing() || (busy_since != 0 && now_ms().saturating_sub(busy_since) > BEHIND.as_millis() as i64)
    }

    /// Waits while the writer is failing: the pipeline stores no offset while audit cannot be written (fail closed).
    pub async fn wait_writing(&self) {
        while self.is_failing() {
            tokio::time::sleep(RETRY_START).await;
        }
    }
}

/// The writer's failure state and backoff.
struct Retry {
    on_failure: OnFailure,
    failing: Arc<AtomicBool>,
    wait: Duration,
}

impl Retry {
    /// After a failure: under [`OnFailure::Stop`] the error; else marks the writer failing (the pipeline waits,
    /// `/readyz` says so) and sleeps before the next attempt.
    async fn after(&mut self, e: Error) -> Result<(), Error> {
        if self.on_failure == OnFailure::Stop {
            return Err(e);
        }
        self.failing.store(true, Ordering::SeqCst);
        metrics::gauge!("piiwall_audit_failing").set(1.0);
        metrics::counter!("piiwall_audit_failures_total").increment(1);
        tracing::warn!(error = %e, retry_in_ms = self.wait.as_millis() as u64, "audit event not written: retrying");
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(RETRY_MAX);
        Ok(())
    }

    fn succeeded(&mut self) {
        if self.failing.swap(false, Ordering::SeqCst) {
            metrics::gauge!("piiwall_audit_failing").set(0.0);
            tracing::info!("audit events written again");
        }
        self.wait = RETRY_START;
    }
}

fn failing_now(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
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

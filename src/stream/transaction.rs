//! Exactly-once delivery (`kafka.delivery = "exactly-once"`): a batch's output and quarantine records and its
//! input offset are written in one Kafka transaction, so a consumer reading the outputs with
//! `isolation.level=read_committed` sees every input record's result once, across crashes and rebalances.
//!
//! One transactional producer per instance (`kafka.transactional_id`); lanes sanitize in parallel and take turns
//! to write, one transaction at a time. The offsets are sent with the consumer's group metadata, so a lane whose
//! partition moved to another instance is fenced by the group generation instead of committing over the new owner.
//! A batch whose transaction fails is aborted and its partition read again from the batch's first offset
//! ([`Outcome::Rewind`]); a fatal producer error (another instance took the transactional id) stops the pipeline.
//!
//! Start-up proves the brokers honour transactions: it initialises the producer, then begins a transaction, adds
//! an input offset to it and aborts it (an abort leaves nothing behind). A broker without transactions fails
//! there, and piiwall refuses to start rather than fall back to at-least-once.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::{Mutex, MutexGuard};

use super::PipelineConsumer;
use crate::error::{ConfigError, Error};

/// How long one transactional call (init, offsets, commit, abort) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a retriable commit failure is retried before the batch is aborted.
const COMMIT_ATTEMPTS: u32 = 3;

/// The instance's transactional producer, shared by every lane.
pub struct Transactions {
    producer: FutureProducer,
    /// One transaction at a time: a lane holds its turn from its first record to its commit.
    turn: Mutex<()>,
}

/// What became of a batch's transaction that did not commit.
pub enum Outcome {
    /// Aborted: nothing of the batch is visible; its partition must be read again from the batch's first offset.
    Rewind,
    /// The producer cannot go on (fenced by another instance with the same transactional id, or a broken broker).
    Fatal(Error),
}

impl Transactions {
    /// Creates the transactional producer and proves the brokers support transactions, using a partition of
    /// `probe_topic` (an input topic) for the aborted probe.
    pub async fn start(
        client: &ClientConfig,
        transactional_id: &str,
        consumer: Arc<PipelineConsumer>,
        probe_topic: &str,
    ) -> Result<Self, Error> {
        let producer: FutureProducer = client
            .clone()
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .map_err(|e| Error::Kafka(format!("cannot create the transactional producer: {e}")))?;
        let (probe_producer, probe_consumer, topic) = (producer.clone(), consumer.clone(), probe_topic.to_owned());
        tokio::task::spawn_blocking(move || -> Result<(), KafkaError> {
            probe_producer.init_transactions(CALL_TIMEOUT)?;
            probe_producer.begin_transaction()?;
            let mut offsets = TopicPartitionList::new();
            offsets.add_partition_offset(&topic, 0, Offset::Offset(0))?;
            let group = group_of(&probe_consumer)?;
            let sent = probe_producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT);
            let aborted = probe_producer.abort_transaction(CALL_TIMEOUT);
            sent.and(aborted)
        })
        .await
        .map_err(|_| Error::Kafka("the transaction probe panicked".into()))?
        .map_err(|e| {
            Error::from(ConfigError(format!(
                "kafka.delivery = \"exactly-once\" needs Kafka transactions, and the brokers refused them ({e}); \
                 use brokers that support transactions, or set kafka.delivery = \"at-least-once\""
            )))
        })?;
        tracing::info!("exactly-once: transactions available");
        Ok(Self {
            producer,
            turn: Mutex::new(()),
        })
    }

    /// The transactional producer, for aborting what stopped lanes left open at shutdown.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Waits for this lane's turn (to [`begin`](Waited::begin) its transaction, or give it up).
    pub async fn wait_turn(&self) -> Waited<'_> {
        Waited {
            owner: self,
            guard: self.turn.lock().await,
        }
    }
}

/// A lane's turn, its transaction not begun: dropping it lets the next lane go.
pub struct Waited<'a> {
    owner: &'a Transactions,
    guard: MutexGuard<'a, ()>,
}

impl<'a> Waited<'a> {
    /// Begins the transaction.
    pub fn begin(self) -> Result<Turn<'a>, Error> {
        self.owner
            .producer
            .begin_transaction()
            .map_err(|e| Error::Kafka(format!("cannot begin a transaction: {e}")))?;
        Ok(Turn {
            owner: self.owner,
            _guard: self.guard,
        })
    }
}

/// An open transaction; the other lanes wait until it commits or aborts.
pub struct Turn<'a> {
    owner: &'a Transactions,
    _guard: MutexGuard<'a, ()>,
}

impl Turn<'_> {
    pub fn producer(&self) -> &FutureProducer {
        &self.owner.producer
    }

    /// Adds the input position `next_offset` of `topic`/`partition` to the transaction, with the group metadata
    /// of the batch's first read, and commits it. A commit that fails with an error that requires an abort is
    /// aborted (the batch is read again); one that fails retriably is retried (aborting during a commit is not
    /// allowed), and if it still fails its outcome is unknown: the producer cannot go on, and the restart's
    /// `init_transactions` settles it.
    pub async fn commit(
        self,
        topic: &str,
        partition: i32,
        next_offset: i64,
        group: &Arc<ConsumerGroupMetadata>,
    ) -> Result<(), Outcome> {
        let producer = self.owner.producer.clone();
        let (topic, group) = (topic.to_owned(), group.clone());
        let offsets_sent = tokio::task::spawn_blocking(move || -> Result<(), KafkaError> {
            let mut offsets = TopicPartitionList::new();
            offsets.add_partition_offset(&topic, partition, Offset::Offset(next_offset))?;
            let mut attempt = 1;
            loop {
                match producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT) {
                    // A timed-out call must be retried: librdkafka refuses any other transactional call meanwhile.
                    Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < COMMIT_ATTEMPTS => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        if let Err(e) = offsets_sent {
            // Fenced by the generation (the partition moved), or the transaction failed: nothing is visible.
            return Err(self.abort(&e.to_string(), is_fatal(&e)).await);
        }
        let producer = self.owner.producer.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let mut attempt = 1;
            loop {
                match producer.commit_transaction(CALL_TIMEOUT) {
                    Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < COMMIT_ATTEMPTS => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled));
        match committed {
            Ok(()) => Ok(()),
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() && !e.is_fatal() => {
                Err(self.abort(&e.to_string(), false).await)
            }
            Err(e) => Err(Outcome::Fatal(Error::Kafka(format!(
                "a transaction commit failed and its outcome is unknown ({e}): stopping; the restart settles it"
            )))),
        }
    }

    /// Aborts the transaction after `cause`; nothing written in it becomes visible.
    pub async fn abort(self, cause: &str, fatal: bool) -> Outcome {
        let producer = self.owner.producer.clone();
        if fatal {
            return Outcome::Fatal(Error::Kafka(format!(
                "the transactional producer cannot continue: {cause}"
            )));
        }
        tracing::warn!(error = %cause, "transaction aborted: the batch will be read again");
        let aborted = tokio::task::spawn_blocking(move || producer.abort_transaction(CALL_TIMEOUT))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        match aborted {
            Ok(()) => Outcome::Rewind,
            Err(e) => Outcome::Fatal(Error::Kafka(format!("a transaction could not be aborted: {e}"))),
        }
    }
}

fn group_of(consumer: &PipelineConsumer) -> Result<rdkafka::consumer::ConsumerGroupMetadata, KafkaError> {
    consumer.group_metadata().ok_or(KafkaError::ConsumerCommit(
        rdkafka::types::RDKafkaErrorCode::InvalidGroupId,
    ))
}

fn is_fatal(error: &KafkaError) -> bool {
    matches!(error, KafkaError::Transaction(e) if e.is_fatal())
}

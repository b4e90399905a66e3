//! The control topic (`keys.control_topic`, compacted): how a forget or a rotation done by one instance reaches the
//! key cache of every other instance sharing the key store.
//!
//! A record's key is the affected key scope (a domain name, or a subject's keyed hash: never a subject id); its
//! value names the operation. Every instance reads the topic from its end while it runs, polling every
//! [`POLL`], and drops the scope from its caches. The bound on "every instance stops using a forgotten key" is
//! therefore the producer's acknowledgement plus one poll and fetch round (measured in `tests/shared_keys.rs`);
//! the cache TTL (`keys.cache_ttl_secs`) bounds it too should the control topic be unreachable. A restarted
//! instance starts with empty caches and reads the store, which already records the forget, so it needs no history.
//!
//! The topic is also the ledger of forgets outside the key store: a forget is final, so compaction keeps it, and
//! [`forgotten_scopes`] reads them all back so that a key store restored from a backup can be made to forget
//! again (`piiwall keys reapply-forgets`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::error::Error;
use crate::keys::Keyring;

/// How long one poll of the control topic waits.
pub const POLL: Duration = Duration::from_millis(50);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading the whole control topic back may take.
const READ_DEADLINE: Duration = Duration::from_secs(300);

/// What happened to a key scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    Forget,
    Rotate,
}

impl ControlOp {
    fn name(self) -> &'static str {
        match self {
            ControlOp::Forget => "forget",
            ControlOp::Rotate => "rotate",
        }
    }
}

/// Announces forgets and rotations on the control topic.
#[derive(Clone)]
pub struct Control {
    producer: FutureProducer,
    topic: String,
}

impl Control {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Publishes `op` on `scope` and waits for the broker's acknowledgement.
    pub async fn announce(&self, op: ControlOp, scope: &str) -> Result<(), Error> {
        self.producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(scope.as_bytes())
                    .payload(op.name().as_bytes()),
                SEND_TIMEOUT,
            )
            .await
            .map(drop)
            .map_err(|(e, _)| Error::Kafka(format!("cannot announce on the control topic {}: {e}", self.topic)))
    }
}

/// Every scope ever announced as forgotten on the control topic, read from its start to its end.
pub fn forgotten_scopes(client: &ClientConfig, topic: &str) -> Result<Vec<String>, Error> {
    let mut scopes = std::collections::BTreeSet::new();
    crate::stream::read_topic(client, topic, "control topic", READ_DEADLINE, |message| {
        if message.payload() == Some(ControlOp::Forget.name().as_bytes())
            && let Some(scope) = message.key().and_then(|k| std::str::from_utf8(k).ok())
        {
            scopes.insert(scope.to_owned());
        }
        Ok(())
    })?;
    Ok(scopes.into_iter().collect())
}

/// Reads the control topic from its current end until `stop`, dropping each announced scope from `keyring`'s
/// caches. Returns once the consumer is assigned, so announcements made after it returns are seen.
pub async fn listen(
    client: &ClientConfig,
    topic: &str,
    keyring: Arc<Keyring>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let consumer: BaseConsumer = client
        .clone()
        // No group: every instance reads every announcement, and commits nothing.
        .set("group.id", "piiwall.control.unused")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create the control topic consumer: {e}")))?;
    let topic = topic.to_owned();
    let consumer = tokio::task::spawn_blocking(move || -> Result<BaseConsumer, Error> {
        let metadata = consumer
            .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
            .map_err(|e| Error::Kafka(format!("cannot read the metadata of the control topic {topic}: {e}")))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(Error::Kafka(format!("the control topic {topic} does not exist")));
        }
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            assignment
                .add_partition_offset(&topic, partition, Offset::End)
                .map_err(|e| Error::Kafka(format!("control topic assignment: {e}")))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| Error::Kafka(format!("cannot read the control topic {topic}: {e}")))?;
        // The first poll resolves the end offsets; announcements from here on are seen.
        let _ = consumer.poll(POLL);
        Ok(consumer)
    })
    .await
    .map_err(|_| Error::Kafka("the control topic consumer panicked".into()))??;
    let task = tokio::task::spawn_blocking(move || {
        while !*stop.borrow_and_update() {
            match consumer.poll(POLL) {
                None => {}
                Some(Err(e)) => tracing::warn!(error = %e, "control topic read failed"),
                Some(Ok(message)) => {
                    let Some(scope) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                        continue;
                    };
                    keyring.invalidate_scope(scope);
                    let op = match message.payload() {
                        Some(b"forget") => "forget",
                        Some(b"rotate") => "rotate",
                        _ => "other",
                    };
                    metrics::counter!("piiwall_control_messages_total", "op" => op).increment(1);
                    tracing::debug!(op, "key cache entry dropped on announcement");
                }
            }
        }
    });
    Ok(task)
}

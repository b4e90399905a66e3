//! `piiwall quarantine replay`: once the cause of a quarantine is fixed (a schema registered, a binding corrected),
//! re-runs the quarantined records through the firewall.
//!
//! Each quarantined copy is decrypted, processed exactly as the pipeline would process the original, and — when it
//! now sanitizes — produced to its output topic on its source partition, with its original source coordinates in
//! the headers (so consumers deduplicate it like any other record). Records that still fail stay where they are and
//! are reported. The replay's consumer group commits only up to the first record that still fails, so the next
//! replay starts there: nothing fixed is replayed twice, nothing unfixed is skipped.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{OwnedMessage, Timestamp};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::lane::{self, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC};
use super::process::{Outcome, Processor};
use crate::config::Config;
use crate::error::{Error, RevealError};
use crate::transcode::TranscodeScratch;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading the quarantine topic to its end may take.
const READ_DEADLINE: Duration = Duration::from_secs(300);

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub replayed: u64,
    /// Records that still cannot be sanitized, with the reason of each (no value in it).
    pub still_failing: Vec<String>,
    /// Copies that can never be replayed, passed over for good: their data subject was forgotten, or their daily
    /// quarantine key expired, or they were kept as a reference only (coordinates and reason, no content).
    pub dropped: Vec<String>,
}

/// What a quarantined copy comes to on replay.
pub(super) enum Replayed {
    /// Decrypted and processed again.
    Processed(Box<(Outcome, OwnedMessage)>),
    /// Cannot be processed yet (the reason).
    Failing(String),
    /// Can never be: its content is gone (the reason).
    Gone(String),
}

pub async fn replay(config: Config) -> Result<ReplaySummary, Error> {
    let parts = super::Parts::build(&config, super::open_keyring(&config.keys).await?).await?;
    let kafka =
        |e: rdkafka::error::KafkaError| Error::Kafka(format!("replaying {}: {e}", config.kafka.quarantine_topic));
    let consumer: BaseConsumer = parts
        .client
        .clone()
        .set("group.id", format!("{}.replay", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // Quarantine copies of aborted transactions are not records to replay.
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka)?;
    let topic = config.kafka.quarantine_topic.as_str();
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(kafka)?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        assignment.add_partition(topic, partition.id());
    }
    // Start where the last replay committed (at the first record that still failed), else at the beginning.
    let committed = consumer.committed_offsets(assignment, TIMEOUT).map_err(kafka)?;
    let mut start = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        start
            .add_partition_offset(topic, element.partition(), offset)
            .map_err(kafka)?;
    }
    consumer.assign(&start).map_err(kafka)?;

    let processor = Processor {
        routes: parts.routes.clone(),
        sanitizer: parts.sanitizer.clone(),
        default_domain: config.keys.default_domain.clone(),
    };
    let mut scratch = TranscodeScratch::default();
    let mut summary = ReplaySummary::default();
    let mut failed: HashMap<i32, bool> = HashMap::new();
    let mut commit = TopicPartitionList::new();
    let mut copies = Vec::new();
    crate::topic_reader::read_to_end(&consumer, start.count(), READ_DEADLINE, |copy| {
        copies.push(copy);
        Ok(())
    })?;
    for message in copies {
        let failure = match original(&message, &parts, &processor, &mut scratch).await? {
            Replayed::Processed(processed) => match *processed {
                (Outcome::Output { key, value, schema_id }, source) => {
                    let output = format!("{}{}", source.topic(), config.kafka.output_suffix);
                    let mut record = FutureRecord::to(&output)
                        .partition(source.partition())
                        .headers(lane::output_headers(&source, &[], schema_id));
                    record = lane::with_payload(record, key.as_deref(), value.as_deref());
                    let lease = parts.producer.lease();
                    let delivery = lane::send(&lane::Through::shared(&parts.producer, &lease), record).await?;
                    delivery
                        .await
                        .map_err(|_| Error::Kafka("the producer went away".into()))?
                        .map_err(|(e, _)| {
                            parts.producer.failed(&lease, &e);
                            Error::Kafka(format!("a replayed record was not delivered: {e}"))
                        })?;
                    parts.producer.delivered(&lease);
                    summary.replayed += 1;
                    None
                }
                (Outcome::Quarantine { reason, .. }, _) => Some(reason),
            },
            Replayed::Gone(reason) => {
                summary.dropped.push(format!("offset {}: {reason}", message.offset()));
                None
            }
            Replayed::Failing(reason) => Some(reason),
        };
        if let Some(reason) = failure {
            failed.insert(message.partition(), true);
            summary
                .still_failing
                .push(format!("offset {}: {reason}", message.offset()));
        }
        if !failed.get(&message.partition()).copied().unwrap_or(false) {
            commit
                .add_partition_offset(topic, message.partition(), Offset::Offset(message.offset() + 1))
                .map_err(kafka)?;
        }
    }
    if commit.count() > 0 {
        consumer.commit(&commit, CommitMode::Sync).map_err(kafka)?;
    }
    Ok(summary)
}

/// A quarantined record's value (`None` for a deletion) and key.
pub(super) type Unsealed = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The value and key of the record a quarantined copy holds (`None` for the value of a deletion), opened under
/// contexts bound to the source coordinates its headers name: a copy relabelled with other coordinates does not
/// open. Copies of earlier versions, sealed under the bare contexts, still do.
pub(super) fn unseal(
    keyring: &crate::keys::Keyring,
    copy: &OwnedMessage,
    (topic, partition, offset): (&str, i32, i64),
) -> Result<Unsealed, Replayed> {
    use crate::policy::contexts::{self, QUARANTINE_KEY, QUARANTINE_TOMBSTONE, QUARANTINE_VALUE};
    let open_as = |bytes: &[u8], context: &str| -> Result<Vec<u8>, Replayed> {
        let token = std::str::from_utf8(bytes).map_err(|_| Replayed::Failing("not a quarantine copy".to_owned()))?;
        let json = crate::sanitize::reveal(keyring, context, token).map_err(|e| match e {
            // A forgotten subject's key, or an expired daily quarantine key: destroyed for good.
            Error::Reveal(RevealError::SubjectForgotten) => {
                Replayed::Gone("its key was destroyed (subject forgotten, or quarantine retention passed)".into())
            }
            e => Replayed::Failing(e.to_string()),
        })?;
        Ok(json.as_str().unwrap_or_default().chars().map(|c| c as u8).collect())
    };
    // Sealed for `part` at the copy's coordinates, or, by an earlier version, under the bare context (`true`).
    let open = |bytes: &[u8], part: &str| -> Result<(Vec<u8>, bool), Replayed> {
        match open_as(bytes, &contexts::quarantine(part, topic, partition, offset)) {
            Ok(plain) => Ok((plain, false)),
            Err(Replayed::Failing(problem)) => open_as(bytes, part)
                .map(|plain| (plain, true))
                .map_err(|_| Replayed::Failing(problem)),
            Err(other) => Err(other),
        }
    };
    let sealed = copy.payload().unwrap_or_default();
    let (value, earlier) = match open(sealed, QUARANTINE_VALUE) {
        // Earlier versions sealed a deletion as an empty value.
        Ok((plain, true)) if plain.is_empty() => (None, true),
        Ok((plain, earlier)) => (Some(plain), earlier),
        // A deletion's copy opens only under its own context.
        Err(Replayed::Failing(problem)) => match open(sealed, QUARANTINE_TOMBSTONE) {
            Ok((_, earlier)) => (None, earlier),
            Err(_) => return Err(Replayed::Failing(problem)),
        },
        Err(other) => return Err(other),
    };
    let key = match copy.key() {
        None => None,
        Some(sealed) => {
            let (plain, key_earlier) = open(sealed, QUARANTINE_KEY)?;
            // A key sealed by an earlier version, bound to nothing, is not taken beside a value bound to these
            // coordinates (or the other way round): it was sealed for another record.
            if key_earlier != earlier {
                return Err(Replayed::Failing(
                    "its key and value were not sealed for the same record".into(),
                ));
            }
            Some(plain)
        }
    };
    Ok((value, key))
}

/// Decrypts a quarantined copy back into the record it was, and processes that.
async fn original(
    copy: &OwnedMessage,
    parts: &super::Parts,
    processor: &Processor,
    scratch: &mut TranscodeScratch,
) -> Result<Replayed, Error> {
    let header = |name: &str| lane::header_text(copy, name);
    let (Some(topic), Some(partition), Some(offset)) = (
        header(SOURCE_TOPIC),
        header(SOURCE_PARTITION).and_then(|p| p.parse().ok()),
        header(SOURCE_OFFSET).and_then(|o| o.parse().ok()),
    ) else {
        return Ok(Replayed::Failing("no source coordinates in its headers".into()));
    };
    if copy.payload().is_none_or(<[u8]>::is_empty) {
        return Ok(Replayed::Gone("a reference only: the copy holds no content".into()));
    }
    let (value, key) = match unseal(parts.sanitizer.keyring(), copy, (&topic, partition, offset)) {
        Ok(record) => record,
        Err(replayed) => return Ok(replayed),
    };
    let source = OwnedMessage::new(value, key, topic, Timestamp::NotAvailable, partition, offset, None);
    parts
        .routes
        .resolve(&processor.schemas_wanted(std::slice::from_ref(&source)))
        .await?;
    // Key-store work blocks (PostgreSQL's client may not run on a runtime thread).
    let outcome = tokio::task::block_in_place(|| processor.process(&source, None, scratch))?;
    Ok(Replayed::Processed(Box::new((outcome, source))))
}

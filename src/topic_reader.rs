//! Reading a whole topic once, from its start to its end, with no consumer group: what `audit verify`,
//! `report processing`, `breach assess`, the forget ledger and `quarantine replay` do. Nothing is committed.

use std::time::Duration;

use rdkafka::Message;

use crate::error::Error;

/// Reads every partition of `topic` from its start to its end (see [`read_to_end`]) without a consumer group's
/// offsets: nothing is committed. `what` names the topic's role in errors.
pub fn read_topic(
    client: &rdkafka::ClientConfig,
    topic: &str,
    what: &str,
    deadline: Duration,
    on_record: impl FnMut(rdkafka::message::OwnedMessage) -> Result<(), Error>,
) -> Result<(), Error> {
    use rdkafka::consumer::Consumer;
    let kafka = |e: rdkafka::error::KafkaError| Error::Kafka(format!("reading {what} {topic}: {e}"));
    let consumer: rdkafka::consumer::BaseConsumer = client
        .clone()
        .set("group.id", "piiwall.reader.unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka)?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        assignment
            .add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning)
            .map_err(kafka)?;
    }
    if assignment.count() == 0 {
        return Err(Error::Kafka(format!("{what} {topic} does not exist")));
    }
    consumer.assign(&assignment).map_err(kafka)?;
    read_to_end(&consumer, assignment.count(), deadline, on_record)
}

/// How long a topic must stay silent before [`read_to_end`] takes it as read.
const QUIET_END: Duration = Duration::from_secs(3);

/// Reads the assigned partitions of `consumer` (created with `enable.partition.eof = true`) to their end, handing
/// every record to `on_record`. The end is every partition reporting end-of-partition, or no record for
/// [`QUIET_END`]: some brokers (Tansu 0.6) report high watermarks in record batches rather than records, which
/// makes end-of-partition unreliable there.
pub fn read_to_end(
    consumer: &rdkafka::consumer::BaseConsumer,
    partitions: usize,
    deadline: Duration,
    mut on_record: impl FnMut(rdkafka::message::OwnedMessage) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut ended = std::collections::HashSet::new();
    let give_up = std::time::Instant::now() + deadline;
    let mut last_record = std::time::Instant::now();
    while ended.len() < partitions && last_record.elapsed() < QUIET_END {
        if std::time::Instant::now() > give_up {
            return Err(Error::Kafka(format!("could not read to the end within {deadline:?}")));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                ended.insert(partition);
            }
            Some(Err(e)) => return Err(Error::Kafka(format!("reading: {e}"))),
            Some(Ok(message)) => {
                last_record = std::time::Instant::now();
                ended.remove(&message.partition());
                on_record(message.detach())?;
            }
        }
    }
    Ok(())
}

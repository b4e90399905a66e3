//! Helpers for the tests that talk to the test broker (started by scripts/test-services).

use std::time::{Duration, Instant};

use piiwall::codec::json::JsonCodec;
use piiwall::policy::CompiledSchema;
use piiwall::server;
use piiwall::stream;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{Value as Json, json};

pub fn broker() -> String {
    std::env::var("PIIWALL_TEST_KAFKA").expect(
        "these tests need the test broker: run `bash scripts/test`, or `bash scripts/test-services` and export the \
         PIIWALL_TEST_KAFKA it prints",
    )
}

/// A name no other test uses: topics and groups are per test.
pub fn unique(name: &str) -> String {
    format!("{name}-{:016x}", rand::random::<u64>())
}

pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&broker(), topic, partitions).await
}

/// As [`create_topic`], on the brokers at `bootstrap`.
pub async fn create_topic_on(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
}

/// (partition, key, value, headers) of a record to produce.
pub type Outgoing = (i32, Option<Vec<u8>>, Vec<u8>, OwnedHeaders);

pub async fn produce(topic: &str, records: Vec<Outgoing>) {
    produce_on(&broker(), topic, records).await
}

/// Produces values without keys or headers, alternating between partitions 0 and 1.
pub async fn produce_values(topic: &str, values: Vec<Vec<u8>>) {
    let records = values
        .into_iter()
        .enumerate()
        .map(|(i, v)| ((i % 2) as i32, None, v, rdkafka::message::OwnedHeaders::new()))
        .collect();
    produce(topic, records).await
}

/// As [`produce`], on the brokers at `bootstrap` (a mock cluster).
pub async fn produce_on(bootstrap: &str, topic: &str, records: Vec<Outgoing>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for (partition, key, value, headers) in records {
        let mut record = FutureRecord::to(topic)
            .partition(partition)
            .payload(&value)
            .headers(headers);
        if let Some(key) = &key {
            record = record.key(key);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Reads `topic` from the start until `count` records arrived (or the deadline passed).
pub fn consume(topic: &str, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    consume_from(reader(topic), count, deadline)
}

/// Reads from `consumer` until `count` records arrived (or the deadline passed).
pub fn consume_from(consumer: BaseConsumer, count: usize, deadline: Duration) -> Vec<OwnedMessage> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < count && start.elapsed() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            out.push(message.detach());
        }
    }
    out
}

/// A record of the writer schema in the Confluent wire format with schema id `id`.
pub fn framed(schema: &CompiledSchema, id: u32, record: &Json) -> Vec<u8> {
    stream::encode_framed(schema, id, &JsonCodec::new(&schema.writer).to_value(record).unwrap()).unwrap()
}

/// A consumer reading `topic` from its start, in a group of its own.
pub fn reader(topic: &str) -> BaseConsumer {
    reader_on(&broker(), topic, "read_committed")
}

/// As [`reader`], on the brokers at `bootstrap`, with the given `isolation.level`.
pub fn reader_on(bootstrap: &str, topic: &str, isolation: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", isolation)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The topic may not exist yet when reading starts: look again soon.
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Customers `0..n`, framed with schema id `id`, spread over 3 partitions (customer `i` on partition `i % 3`).
pub fn customer_records(schema: &CompiledSchema, id: u32, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            (
                (i % 3) as i32,
                None,
                framed(schema, id, &customer(i)),
                OwnedHeaders::new(),
            )
        })
        .collect()
}

/// Customer `i` of `schemas/customer_profile.avsc`; [`pii_of`] lists its values that must never leave in clear.
pub fn customer(i: usize) -> Json {
    json!({
        "customer_id": format!("cus_{i:05}"),
        "email": format!("person{i}@example.com"),
        "full_name": format!("Person Number{i}"),
        "date_of_birth": 7000 + i,
        "address": {"street": format!("{i} Secret Lane"), "city": "Leeds", "postcode": format!("LS{i} 9ZZ"), "country": "GB"},
        "phones": [{"kind": "MOBILE", "number": format!("+44 7700 9{i:05}")}],
        "notes": format!("private note {i}"),
        "updated_at": 1_764_150_000_000i64 + i as i64
    })
}

pub fn pii_of(i: usize) -> Vec<String> {
    vec![
        format!("person{i}@example.com"),
        format!("Person Number{i}"),
        format!("{i} Secret Lane"),
        format!("+44 7700 9{i:05}"),
        format!("private note {i}"),
    ]
}

pub fn header<'a>(message: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    use rdkafka::message::Headers;
    message.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

/// The audit events of one kind (`QUARANTINE`, `KEY_ROTATED`, ...) among `messages`, as JSON.
pub fn audit_events_of(messages: &[OwnedMessage], kind: &str) -> Vec<Json> {
    audit_events(messages)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Audit events as JSON.
pub fn audit_events(messages: &[OwnedMessage]) -> Vec<Json> {
    let json = JsonCodec::new(&piiwall::audit::AUDIT_SCHEMA);
    messages
        .iter()
        .map(|m| json.to_json(&super::decode(&piiwall::audit::AUDIT_SCHEMA, m.payload().unwrap())))
        .collect()
}

/// Runs the pipeline until `outputs` sanitized and `quarantined` quarantined records of `input` arrived (or time ran
/// out), then stops it; returns both.
pub async fn run_until(
    config: piiwall::config::Config,
    input: &str,
    outputs: usize,
    quarantined: usize,
) -> (Vec<OwnedMessage>, Vec<OwnedMessage>) {
    let shutdown = stream::Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let (output, quarantine) = (format!("{input}.sanitized"), format!("{input}.quarantine"));
    let read = tokio::task::spawn_blocking(move || {
        (
            consume(&output, outputs, Duration::from_secs(60)),
            consume(&quarantine, quarantined, Duration::from_secs(30)),
        )
    })
    .await
    .unwrap();
    shutdown.trigger();
    task.await.unwrap().unwrap();
    read
}

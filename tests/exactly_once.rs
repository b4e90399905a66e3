//! `kafka.delivery = "exactly-once"`: outputs and input offsets commit in one Kafka transaction. Tansu has no
//! transactions, so these run on librdkafka's in-process mock cluster, and one test checks that on Tansu piiwall
//! refuses to start rather than fall back.
//!
//! What the mock cluster can show: the transactional protocol driven end to end (init, begin, offsets, commit), and
//! an aborted batch written again. What it cannot: it accepts `TxnOffsetCommit` without storing the offsets and
//! does not hide aborted records from read_committed readers, so offset atomicity across a restart is not
//! observable here (the compose stack in docker/ runs real Kafka).

mod common;

use common::kafka::{Outgoing, broker, consume_from, customer_records, header, produce_on, unique};

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use piiwall::config::Config;
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::server;
use piiwall::stream::{SOURCE_OFFSET, SOURCE_PARTITION, Shutdown};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;
const SCHEMA_ID: u32 = 7;

fn config(dir: &Path, brokers: &str, input: &str, group: &str) -> Config {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    let text = format!(
        r#"
[keys]
store = "sqlite:{dir}/keys.db"
kek = "file:{dir}/kek.key"
control_topic = "{input}.control"

[kafka]
brokers = "{brokers}"
group_id = "{group}"
inputs = ["{input}"]
quarantine_topic = "{input}.quarantine"
delivery = "exactly-once"
transactional_id = "{group}-0"

[kafka.properties]
"session.timeout.ms" = 6000

[[schemas.local]]
topic = "{input}"
schema = "{schema}"
id = {SCHEMA_ID}

[pipeline]
batch_size = 10
drain_timeout_secs = 5

[audit]
topic = "{input}.audit"
instance = "eos-test"

[http]
listen = "off"
"#,
        dir = dir.display(),
        schema = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/customer_profile.avsc")
            .display(),
    );
    Config::parse(&text, std::iter::empty(), "test config").unwrap()
}

fn customer_schema() -> CompiledSchema {
    compile(&common::example("customer_profile.avsc"), &PolicySettings::default()).unwrap()
}

/// A mock cluster with the input, output, quarantine and audit topics.
fn cluster(input: &str) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(input, PARTITIONS, 1).unwrap();
    cluster
        .create_topic(&format!("{input}.sanitized"), PARTITIONS, 1)
        .unwrap();
    for topic in [
        format!("{input}.quarantine"),
        format!("{input}.audit"),
        format!("{input}.control"),
    ] {
        cluster.create_topic(&topic, 1, 1).unwrap();
    }
    cluster
}

/// The (partition, offset) source coordinates of every record in `messages`, with how often each occurs.
fn coordinates(messages: &[OwnedMessage]) -> HashMap<(i64, i64), usize> {
    let mut seen = HashMap::new();
    for message in messages {
        let number = |name| -> i64 {
            std::str::from_utf8(header(message, name).unwrap())
                .unwrap()
                .parse()
                .unwrap()
        };
        *seen
            .entry((number(SOURCE_PARTITION), number(SOURCE_OFFSET)))
            .or_default() += 1;
    }
    seen
}

/// A reader of every partition of `topic` from its start, at `isolation`: assigned, not subscribed, so it reads
/// at once instead of waiting for a consumer group to form (slow on a busy machine's mock cluster).
fn assigned_reader(brokers: &str, topic: &str, partitions: i32, isolation: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", isolation)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions_list = TopicPartitionList::new();
    for partition in 0..partitions {
        partitions_list
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&partitions_list).unwrap();
    consumer
}

/// Runs the pipeline until a reader of the output (at `isolation`) has seen `records` distinct source records and
/// quarantine has `quarantined`, then waits a little longer for extra copies (duplicates), drains and stops it.
/// Returns every output record that reader saw.
/// The keys made by the pipeline of `input`, as its audit topic's KEY_CREATED events count them.
async fn keys_created(brokers: String, input: String) -> i64 {
    let audit = tokio::task::spawn_blocking(move || {
        consume_from(
            assigned_reader(&brokers, &format!("{input}.audit"), 1, "read_uncommitted"),
            usize::MAX,
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    common::kafka::audit_events_of(&audit, "KEY_CREATED")
        .iter()
        .flat_map(|event| event["counts"].as_array().cloned().unwrap_or_default())
        .map(|count| count["count"].as_i64().unwrap())
        .sum()
}

async fn run_until(
    config: Config,
    brokers: &str,
    input: &str,
    isolation: &'static str,
    records: usize,
    quarantined: usize,
) -> Vec<OwnedMessage> {
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let (brokers, input) = (brokers.to_owned(), input.to_owned());
    let (outputs, quarantine) = tokio::task::spawn_blocking(move || {
        let reader = assigned_reader(&brokers, &format!("{input}.sanitized"), PARTITIONS, isolation);
        let mut outputs = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut complete_at = None;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
                outputs.push(message.detach());
            }
            if complete_at.is_none() && coordinates(&outputs).len() >= records {
                complete_at = Some(std::time::Instant::now());
            }
            if complete_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2)) {
                break;
            }
        }
        let quarantine = consume_from(
            assigned_reader(&brokers, &format!("{input}.quarantine"), 1, isolation),
            quarantined,
            Duration::from_secs(10),
        );
        (outputs, quarantine)
    })
    .await
    .unwrap();
    shutdown.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(quarantine.len(), quarantined, "quarantine copies");
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_written_once_in_transactions() {
    let input = unique("eos");
    let group = unique("piiwall");
    let cluster = cluster(&input);
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let schema = customer_schema();

    const N: usize = 45;
    let mut records: Vec<Outgoing> = customer_records(&schema, SCHEMA_ID, N);
    records.push((0, None, b"not avro".to_vec(), OwnedHeaders::new()));
    produce_on(&brokers, &input, records).await;
    let outputs = run_until(
        config(dir.path(), &brokers, &input, &group),
        &brokers,
        &input,
        "read_committed",
        N,
        1,
    )
    .await;
    let seen = coordinates(&outputs);
    assert_eq!(outputs.len(), N, "each record once");
    assert_eq!(seen.len(), N);
    let pii = common::kafka::pii_of(7);
    let text = String::from_utf8_lossy(
        outputs
            .iter()
            .find(|m| coordinates(std::slice::from_ref(m)).contains_key(&(1, 2)))
            .unwrap()
            .payload()
            .unwrap(),
    )
    .into_owned();
    assert!(
        pii.iter().all(|value| !text.contains(value.as_str())),
        "customer 7 (partition 1, offset 2) is sanitized"
    );
}

/// Customers in a pipeline whose first transaction after the start-up probe the mock cluster fails, by `errors`
/// answering the requests of `api`: the outputs as an `isolation` reader sees them, and the keys the audit topic says
/// were made.
async fn with_a_failed_transaction(
    name: &str,
    api: RDKafkaApiKey,
    errors: &[RDKafkaRespErr],
    isolation: &'static str,
) -> (Vec<OwnedMessage>, i64) {
    let input = unique(name);
    let group = unique("piiwall");
    let cluster = cluster(&input);
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let schema = customer_schema();
    produce_on(&brokers, &input, customer_records(&schema, SCHEMA_ID, ABORTED_N)).await;
    cluster.request_errors(api, errors);
    let outputs = run_until(
        config(dir.path(), &brokers, &input, &group),
        &brokers,
        &input,
        isolation,
        ABORTED_N,
        0,
    )
    .await;
    (outputs, keys_created(brokers, input).await)
}

/// Customers (each a subject of its own) of the failed-transaction tests.
const ABORTED_N: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_batch_is_written_again_from_its_first_offset() {
    // The group coordinator refuses the offsets of the first transaction after the start-up probe, as it does when
    // a rebalance moved the partition: piiwall must abort that transaction and write the batch again. The raw log
    // (read_uncommitted) holds the aborted batch and its second writing.
    let (outputs, created) = with_a_failed_transaction(
        "eos-abort",
        RDKafkaApiKey::TxnOffsetCommit,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION,
        ],
        "read_uncommitted",
    )
    .await;
    let seen = coordinates(&outputs);
    assert_eq!(seen.len(), ABORTED_N, "every record written");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n == 2).map(|(c, _)| *c).collect();
    assert!(
        !twice.is_empty() && twice.len() <= 10,
        "one batch (at most 10 records) written twice: {twice:?}"
    );
    assert!(seen.values().all(|&n| n <= 2));
    // The batch written twice is one partition's consecutive records.
    let partitions: std::collections::BTreeSet<i64> = twice.iter().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 1, "{twice:?}");
    // Every subject's key was made once, the aborted batch's too (its second writing found them made).
    assert_eq!(created, ABORTED_N as i64, "a KEY_CREATED count for each subject's key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_transactions_refuses_exactly_once_at_start() {
    let input = unique("eos-refused");
    common::kafka::create_topic(&input, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &broker(), &input, &unique("piiwall"));
    let result = tokio::time::timeout(Duration::from_secs(90), server::run(config, Shutdown::new()))
        .await
        .expect("start-up gives up in time");
    let error = result.expect_err("Tansu has no transactions: exactly-once must not start");
    let message = error.to_string();
    assert!(
        message.contains("kafka.delivery") && message.contains("exactly-once"),
        "{message}"
    );
    assert_eq!(error.kind(), piiwall::error::ErrorKind::Fatal);
}

/// The fault suite's rebalance under load, where transactions work: a second instance joins the group while
/// records flow (partitions move to it, cooperative-sticky), then the first leaves. Read committed, every record is
/// in the output exactly once: a batch read before the rebalance is fenced by its generation, aborted and read
/// again by the partition's owner.
///
/// It needs a broker whose transactions commit their offsets: Tansu has no transactions, and librdkafka's mock
/// cluster answers TxnOffsetCommit without committing anything (rdkafka_mock_handlers.c), so on it the second
/// instance reads every partition again from the start. Run it against Kafka:
/// `PIIWALL_TEST_EOS_KAFKA=host:9092 cargo test --test exactly_once -- --ignored rebalance`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Kafka with transactions (PIIWALL_TEST_EOS_KAFKA); the mock cluster never commits transactional offsets"]
async fn a_rebalance_under_load_writes_nothing_twice() {
    let input = unique("eos-rebalance");
    let group = unique("piiwall");
    let brokers =
        std::env::var("PIIWALL_TEST_EOS_KAFKA").expect("PIIWALL_TEST_EOS_KAFKA names a Kafka broker with transactions");
    common::kafka::create_topic_on(&brokers, &input, PARTITIONS).await;
    let schema = customer_schema();
    // Records keep arriving for ~9 s, while the second instance joins and the first leaves.
    const WAVES: usize = 60;
    const WAVE: usize = 50;
    const N: usize = WAVES * WAVE;
    let producing = tokio::spawn({
        let brokers = brokers.clone();
        let input = input.clone();
        async move {
            for wave in 0..WAVES {
                let records = (wave * WAVE..(wave + 1) * WAVE)
                    .map(|i| {
                        let value = common::kafka::framed(&schema, SCHEMA_ID, &common::kafka::customer(i));
                        ((i % 3) as i32, None, value, OwnedHeaders::new())
                    })
                    .collect();
                produce_on(&brokers, &input, records).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
    });

    // Two instances: key stores of their own (tokens differ; delivery is what is checked here), distinct
    // transactional ids and audit instances.
    let instance = |n: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &brokers, &input, &group);
        config.kafka.delivery = piiwall::config::Delivery::ExactlyOnce {
            transactional_id: format!("{group}-{n}"),
        };
        config.audit.instance = format!("eos-test-{n}");
        (dir, config)
    };
    let ((_first_dir, first), (_second_dir, second)) = (instance(0), instance(1));
    let first_stop = Shutdown::new();
    let first_task = tokio::spawn(server::run(first, first_stop.clone()));
    let reader = assigned_reader(&brokers, &format!("{input}.sanitized"), PARTITIONS, "read_committed");
    let (reader, mut outputs) = tokio::task::spawn_blocking(move || {
        let mut outputs = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while outputs.len() < 50 && std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
                outputs.push(message.detach());
            }
        }
        (reader, outputs)
    })
    .await
    .unwrap();
    assert!(outputs.len() >= 50, "the first instance writes");
    let second_stop = Shutdown::new();
    let second_task = tokio::spawn(server::run(second, second_stop.clone()));
    tokio::time::sleep(Duration::from_secs(4)).await;
    first_stop.trigger();

    let first_summary = first_task.await.unwrap().expect("the first instance leaves cleanly");
    producing.await.unwrap();

    let outputs = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut complete_at = None;
        while std::time::Instant::now() < deadline {
            if let Some(Ok(message)) = reader.poll(Duration::from_millis(100)) {
                outputs.push(message.detach());
            }
            if complete_at.is_none() && outputs.len() >= N && coordinates(&outputs).len() >= N {
                complete_at = Some(std::time::Instant::now());
            }
            if complete_at.is_some_and(|at| at.elapsed() > Duration::from_secs(3)) {
                break;
            }
        }
        outputs
    })
    .await
    .unwrap();
    second_stop.trigger();
    let second_summary = second_task.await.unwrap().expect("the second instance ends cleanly");
    assert!(
        first_summary.sanitized < N as u64 && second_summary.sanitized > 0,
        "the rebalances happened under load: first {}, second {}",
        first_summary.sanitized,
        second_summary.sanitized
    );
    let seen = coordinates(&outputs);
    assert_eq!(seen.len(), N, "every record is written");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records written twice: {twice:?}");
}

/// A batch whose write fails inside its transaction (here the broker refuses to add the output partition to it) is
/// aborted and read again; the keys it made were made all the same, and each has its KEY_CREATED count: the count
/// is acknowledged before the batch's transaction, since its second reading finds the keys made and counts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_of_a_batch_whose_transaction_failed_have_their_audit_events() {
    let (outputs, created) = with_a_failed_transaction(
        "eos-keys",
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        "read_committed",
    )
    .await;
    assert_eq!(coordinates(&outputs).len(), ABORTED_N, "every record written");
    assert_eq!(created, ABORTED_N as i64, "a KEY_CREATED count for each subject's key");
}

/// While the audit topic cannot be written, no transaction is open: a batch's audit events (here a quarantined
/// record's) are acknowledged before its transaction begins. Before, the lane began its transaction, wrote the batch
/// and then waited inside it for the audit topic, so an audit outage longer than `transaction.timeout.ms` made the
/// brokers abort the transaction and fence the producer, and piiwall exited (again after each restart). The audit
/// topic's only partition is led by a second broker, taken down while everything else stays up. One input
/// partition, so that one lane (no turn taken by another) meets the quarantined record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_transaction_waits_on_an_audit_topic_that_cannot_be_written() {
    let input = unique("eos-audit");
    let group = unique("piiwall");
    let cluster = MockCluster::new(2).unwrap();
    for topic in ["", ".sanitized", ".quarantine", ".control", ".audit"].map(|suffix| format!("{input}{suffix}")) {
        cluster.create_topic(&topic, 1, 1).unwrap();
        let leader = if topic.ends_with(".audit") { 2 } else { 1 };
        cluster.partition_leader(&topic, 0, Some(leader)).unwrap();
    }
    cluster.coordinator(MockCoordinator::Group(group.clone()), 1).unwrap();
    cluster
        .coordinator(MockCoordinator::Transaction(format!("{group}-0")), 1)
        .unwrap();
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(
        config(dir.path(), &brokers, &input, &group),
        shutdown.clone(),
    ));
    let _stop = common::StopOnDrop(shutdown.clone());
    let read = |topic: String, count: usize, wait: Duration| {
        let brokers = brokers.clone();
        tokio::task::spawn_blocking(move || {
            consume_from(assigned_reader(&brokers, &topic, 1, "read_uncommitted"), count, wait)
        })
    };
    let (output, audit) = (format!("{input}.sanitized"), format!("{input}.audit"));
    // Started: its START event is on the audit topic.
    let started = read(audit.clone(), 1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(started.len(), 1, "the pipeline started");

    // Customers at offsets 0..N and a record to quarantine at N: the customers' keys and the day's quarantine key
    // are made (and their KEY_CREATED events written) while the audit topic is up.
    const N: usize = 20;
    let malformed = || (0, None, b"not avro".to_vec(), OwnedHeaders::new());
    let customers = || -> Vec<Outgoing> {
        customer_records(&customer_schema(), SCHEMA_ID, N)
            .into_iter()
            .map(|(_, key, value, headers)| (0, key, value, headers))
            .collect()
    };
    produce_on(&brokers, &input, [customers(), vec![malformed()]].concat()).await;
    assert_eq!(read(output.clone(), N, Duration::from_secs(60)).await.unwrap().len(), N);

    // Another record to quarantine at N + 1, then the same customers again: the batch's only audit event is its
    // QUARANTINE. Produced at once, so that the customers are in its batch: the old lane wrote them in a transaction
    // and then waited there for the event.
    cluster.broker_down(2).unwrap();
    produce_burst(&brokers, &input, [vec![malformed()], customers()].concat()).await;
    let during = read(output.clone(), 2 * N, Duration::from_secs(8)).await.unwrap();
    let written: Vec<_> = coordinates(&during)
        .into_keys()
        .filter(|(_, offset)| *offset > N as i64)
        .collect();
    assert!(
        written.is_empty(),
        "records written in a transaction while their batch's audit event could not be: {written:?}"
    );
    assert!(!task.is_finished(), "the pipeline waits for the audit topic");

    cluster.broker_up(2).unwrap();
    let after = read(output, 2 * N, Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        coordinates(&after).len(),
        2 * N,
        "every record written once the audit topic is back"
    );
    shutdown.trigger();
    task.await.unwrap().unwrap();
    let events = read(audit, usize::MAX, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        common::kafka::audit_events_of(&events, "QUARANTINE").len(),
        2,
        "each quarantined record has its event"
    );
}

/// Produces `records` at once (every send queued before any is awaited), so that they reach the brokers, and a
/// consumer, together.
async fn produce_burst(brokers: &str, topic: &str, records: Vec<Outgoing>) {
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "50")
        .create()
        .unwrap();
    let deliveries: Vec<_> = records
        .iter()
        .map(|(partition, _, value, headers)| {
            producer
                .send_result(
                    rdkafka::producer::FutureRecord::<(), _>::to(topic)
                        .partition(*partition)
                        .payload(value)
                        .headers(headers.clone()),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

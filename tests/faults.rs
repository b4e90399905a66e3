//! The fault suite: what piiwall does when what it depends on fails, on real services (Tansu brokers of the tests'
//! own, the test PostgreSQL, rivven-schema behind an error-injecting proxy in `tests/registry_faults.rs`).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::kafka::{
    audit_events_of, consume, consume_from, create_topic, create_topic_on, customer, framed, header, produce,
    reader_on, unique,
};
use common::services::free_port;
use piiwall::audit::{AuditEvent, AuditKind, Auditor, OnFailure};
use piiwall::config::Config;
use piiwall::producer::Producer;
use piiwall::server;
use piiwall::stream::{self, SOURCE_OFFSET, Shutdown};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::Producer as _;
use rdkafka::{ClientConfig, Message};

/// The audit writer keeps an event it cannot write and tries again: it never stops on its own, says it is failing
/// meanwhile (the pipeline waits on that, and `/readyz` reports it), and acknowledges the event once it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rides_through_a_broker_that_is_down_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = common::keyring_at(dir.path());
    let mut broker = Broker::on(free_port());
    let topic = unique("faults-audit");
    let producer = Producer::create(
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("message.timeout.ms", "1000")
            .set("reconnect.backoff.max.ms", "200")
            .clone(),
    )
    .unwrap();
    let (auditor, writer, acks) = audit_two_events(producer, &topic, &keyring).await;
    let started = Instant::now();
    while !auditor.is_failing() {
        assert!(started.elapsed() < Duration::from_secs(20), "a failing writer says so");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!writer.is_finished(), "the writer never stops on its own");

    broker.start();
    create_topic_on(&broker.bootstrap(), &topic, 1).await;
    tokio::time::timeout(Duration::from_secs(60), acks.written())
        .await
        .expect("written once the broker is back")
        .unwrap();
    assert!(!auditor.is_failing());
    auditor.emit(AuditEvent::new(AuditKind::Stop)).await;
    drop(auditor);
    writer.await.unwrap().unwrap();

    let bootstrap = broker.bootstrap();
    let events = tokio::task::spawn_blocking(move || {
        consume_from(
            reader_on(&bootstrap, &topic, "read_committed"),
            3,
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    assert!(events.len() >= 3, "every event is on the topic (duplicates allowed)");
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker.bootstrap());
    let topic = events[0].topic().to_owned();
    let report = tokio::task::spawn_blocking({
        let keyring: Arc<_> = keyring.clone();
        move || piiwall::audit::verify(&client, &topic, &keyring).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        report.first_break, None,
        "the chain verifies, retried duplicates included"
    );
}

/// A pipeline config on `brokers` for `input`, bound to the customer schema (id 1), its key store in `dir`.
/// An audit writer that retries, and the acknowledgements of the two events (START, QUARANTINE) it was given.
async fn audit_two_events(
    producer: Producer,
    topic: &str,
    keyring: &Arc<piiwall::keys::Keyring>,
) -> (
    Auditor,
    tokio::task::JoinHandle<Result<(), piiwall::Error>>,
    piiwall::audit::Acks,
) {
    let (auditor, writer) = Auditor::start(
        producer,
        topic.to_owned(),
        "fault-test".into(),
        keyring.clone(),
        OnFailure::Retry,
        Default::default(),
    );
    let acks = auditor
        .emit_acked(vec![
            AuditEvent::new(AuditKind::Start),
            AuditEvent::new(AuditKind::Quarantine),
        ])
        .await;
    (auditor, writer, acks)
}

fn pipeline_config(dir: &std::path::Path, brokers: &str, input: &str, schema: &str, extra_kafka: &str) -> Config {
    let text = pipeline_config_text(dir, brokers, input, schema, extra_kafka);
    Config::parse(&text, std::iter::empty(), "fault test config").unwrap()
}

/// [`pipeline_config`]'s text, its `[http]` section last.
fn pipeline_config_text(dir: &std::path::Path, brokers: &str, input: &str, schema: &str, extra_kafka: &str) -> String {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    format!(
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
{extra_kafka}

[[schemas.local]]
topic = "{input}"
schema = "{schema}"
id = 1

[pipeline]
batch_size = 20
commit_interval_ms = 100
drain_timeout_secs = 5

[audit]
topic = "{input}.audit"

[http]
listen = "off"
"#,
        dir = dir.display(),
        group = unique("piiwall"),
    )
}

/// Distinct source offsets among `messages`.
fn sources(messages: &[OwnedMessage]) -> BTreeSet<i64> {
    messages
        .iter()
        .map(|m| {
            std::str::from_utf8(header(m, SOURCE_OFFSET).expect("source offset"))
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// A record whose sanitized form is larger than the brokers take (tokens are ~4/3 of their input) goes to
/// quarantine, as a reference when even its encrypted copy is too large; the records around it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_the_brokers_is_quarantined_and_the_stream_goes_on() {
    output_too_large_is_quarantined(None).await;
}

/// The same with the PostgreSQL key store, whose client must not be called on a runtime thread: making the
/// quarantine copy reads the day's quarantine key from the store (it panicked there, and again on every restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_the_brokers_is_quarantined_with_the_postgres_key_store() {
    let url = tokio::task::spawn_blocking(common::services::fresh_database)
        .await
        .unwrap();
    output_too_large_is_quarantined(Some(url)).await;
}

async fn output_too_large_is_quarantined(postgres: Option<String>) {
    let run = OneTooLarge::run(|doc| doc(8_000), OwnedHeaders::new(), "", postgres).await;
    assert!(run.produced[1] < 900_000, "the input itself fits");
    let reason = run.reason();
    assert!(reason.contains("more than the brokers accept"), "{reason}");
    assert!(
        reason.contains("replay it from the input topic"),
        "a reference: {reason}"
    );
    assert!(
        run.quarantined[0].payload().is_none_or(<[u8]>::is_empty),
        "no content kept"
    );
    let audit = run.audit.clone();
    run.stop().await;
    let events = tokio::task::spawn_blocking(move || consume(&audit, 3, Duration::from_secs(20)))
        .await
        .unwrap();
    let quarantine_events = audit_events_of(&events, "QUARANTINE");
    assert_eq!(quarantine_events.len(), 1, "the quarantined record has its audit event");
    assert_eq!(quarantine_events[0]["offset"], 1);
}

/// An output that fits by its own bytes but not with the input header `kafka.headers_allow` passes on to it (the
/// brokers count headers too) is quarantined, with its content (a quarantine copy carries no allowlisted header),
/// and the record after it is written. Before, the broker's refusal was taken for a passing fault and the batch was
/// written again for ever: its partition stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_with_its_allowlisted_headers_is_quarantined_and_the_stream_goes_on() {
    let trace = vec![b'x'; 400_000];
    let headed = OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "trace",
        value: Some(&trace),
    });
    let run = OneTooLarge::run(|doc| doc(5_000), headed, r#"headers_allow = ["trace"]"#, None).await;
    let reason = run.reason();
    assert!(reason.contains("with its allowlisted headers"), "{reason}");
    assert!(
        header(&run.quarantined[0], "trace").is_none(),
        "no allowlisted header on a quarantine copy"
    );
    assert!(
        run.quarantined[0].payload().is_some_and(|p| p.len() > 400_000),
        "the copy keeps the record's content"
    );
    run.stop().await;
}

/// A malformed record whose quarantine copy (encrypted, ~4/3 of its input) is larger than the brokers take is
/// quarantined as a reference (coordinates and reason, no content), and the records after it are written. Before,
/// only outputs were measured: the copy was refused by the producer, taken for a passing fault, and its batch
/// written again for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_record_too_large_to_keep_is_quarantined_as_a_reference_and_the_stream_goes_on() {
    let run = OneTooLarge::run(|_| vec![b'x'; 850_000], OwnedHeaders::new(), "", None).await;
    let reason = run.reason();
    assert!(reason.contains("too large to keep"), "{reason}");
    assert!(
        run.quarantined[0].payload().is_none_or(<[u8]>::is_empty),
        "no content kept"
    );
    run.stop().await;
}

/// A pipeline over three records of a document (an id and tokenized lines), the middle one too large in some way,
/// read until the two around it are written and it is quarantined.
struct OneTooLarge {
    _dir: tempfile::TempDir,
    /// The sizes of the three records produced.
    produced: Vec<usize>,
    quarantined: Vec<OwnedMessage>,
    audit: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<stream::Summary, piiwall::error::Error>>,
}

impl OneTooLarge {
    /// `middle` makes the middle record from a document of N lines; it carries `headers`.
    async fn run(
        middle: impl FnOnce(&dyn Fn(usize) -> Vec<u8>) -> Vec<u8>,
        headers: OwnedHeaders,
        extra_kafka: &str,
        postgres: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let input = unique("faults-large");
        create_topic(&input, 1).await;
        let schema_text = serde_json::json!({"type": "record", "name": "Doc", "fields": [
            {"name": "id", "type": "string"},
            {"name": "lines", "type": {"type": "array", "items": "string"}, "pii": "tokenize"}
        ]})
        .to_string();
        let schema_file = dir.path().join("doc.avsc");
        std::fs::write(&schema_file, &schema_text).unwrap();
        let schema = common::compiled(&schema_text);
        let doc = |lines: usize| {
            let lines: Vec<String> = (0..lines).map(|i| format!("{i:0>100}")).collect();
            framed(&schema, 1, &serde_json::json!({"id": "doc", "lines": lines}))
        };
        let records = vec![doc(3), middle(&doc), doc(3)];
        let produced = records.iter().map(Vec::len).collect();
        let headers = [OwnedHeaders::new(), headers, OwnedHeaders::new()];
        produce(
            &input,
            records
                .into_iter()
                .zip(headers)
                .map(|(value, headers)| (0, None, value, headers))
                .collect(),
        )
        .await;

        let mut config = pipeline_config(
            dir.path(),
            &common::kafka::broker(),
            &input,
            schema_file.to_str().unwrap(),
            extra_kafka,
        );
        if let Some(url) = postgres {
            config.keys.store = piiwall::config::StoreLocation::Postgres(url);
        }
        let shutdown = Shutdown::new();
        let task = tokio::spawn(server::run(config, shutdown.clone()));
        let (output, quarantine) = (format!("{input}.sanitized"), format!("{input}.quarantine"));
        let (out, quarantined) = tokio::task::spawn_blocking(move || {
            (
                consume(&output, 2, Duration::from_secs(60)),
                consume(&quarantine, 1, Duration::from_secs(30)),
            )
        })
        .await
        .unwrap();
        let run = Self {
            _dir: dir,
            produced,
            quarantined,
            audit: format!("{input}.audit"),
            shutdown,
            task,
        };
        assert_eq!(
            sources(&out),
            BTreeSet::from([0, 2]),
            "the records around it are written"
        );
        assert_eq!(sources(&run.quarantined), BTreeSet::from([1]));
        run
    }

    fn reason(&self) -> String {
        String::from_utf8_lossy(header(&self.quarantined[0], stream::REASON).unwrap()).into_owned()
    }

    async fn stop(mut self) {
        self.shutdown.trigger();
        (&mut self.task)
            .await
            .unwrap()
            .expect("the pipeline never stopped on it");
    }
}

/// A failed assertion stops the pipeline too.
impl Drop for OneTooLarge {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A pipeline reading `N` customers from a persistent broker of its own, started; returns once output flows.
struct Outage {
    _dir: tempfile::TempDir,
    broker: Broker,
    output: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<stream::Summary, piiwall::error::Error>>,
}

/// A failed assertion stops the pipeline too: its blocking readers would otherwise hold the test's runtime (and
/// the test) open for ever.
impl Drop for Outage {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

const OUTAGE_RECORDS: usize = 3_000;

async fn start_outage() -> Outage {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::persistent(free_port());
    broker.start();
    let input = unique("faults-outage");
    create_topic_on(&broker.bootstrap(), &input, 1).await;
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let records = (0..OUTAGE_RECORDS)
        .map(|i| (0, None, framed(&schema, 1, &customer(i)), OwnedHeaders::new()))
        .collect();
    common::kafka::produce_on(&broker.bootstrap(), &input, records).await;
    let schema_path = format!("{}/schemas/customer_profile.avsc", env!("CARGO_MANIFEST_DIR"));
    let config = pipeline_config(
        dir.path(),
        &broker.bootstrap(),
        &input,
        &schema_path,
        "[kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n\"reconnect.backoff.max.ms\" = \"500\"\n",
    );
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let output = format!("{input}.sanitized");
    let first = {
        let (bootstrap, output) = (broker.bootstrap(), output.clone());
        tokio::task::spawn_blocking(move || {
            consume_from(
                reader_on(&bootstrap, &output, "read_uncommitted"),
                1,
                Duration::from_secs(60),
            )
        })
        .await
        .unwrap()
    };
    if first.len() != 1 {
        shutdown.trigger();
    }
    assert_eq!(first.len(), 1, "output flows");
    Outage {
        _dir: dir,
        broker,
        output,
        shutdown,
        task,
    }
}

/// The broker goes away mid-stream for longer than `message.timeout.ms`, records in hand: the lane keeps them and
/// writes its batch again, it does not end the process; a shutdown meanwhile still ends within the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_longer_than_the_message_timeout_stops_nothing() {
    let mut outage = start_outage().await;
    outage.broker.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !outage.task.is_finished(),
        "the pipeline waits for the broker; it does not stop"
    );
    let asked = Instant::now();
    outage.shutdown.trigger();
    let ended = tokio::time::timeout(Duration::from_secs(30), &mut outage.task).await;
    assert!(ended.is_ok(), "a shutdown ends the wait within the drain timeout");
    assert!(asked.elapsed() < Duration::from_secs(20), "{:?}", asked.elapsed());
}

/// The same outage, then the broker comes back with its data: every record arrives at least once. Tansu 0.6
/// forgets idempotent-producer state in a restart and fences every later write of the old producer
/// (PRODUCER_FENCED): the writers' shared producer is replaced after a few such refusals and the batches in hand go
/// through the new one. Before that, the pipeline retried with the old producer for ever and nothing arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_longer_than_the_message_timeout_loses_nothing() {
    restart_loses_nothing(Duration::from_secs(5)).await;
}

/// A restart quicker than `message.timeout.ms` (1.5 s here): librdkafka's own retries meet the restarted broker,
/// which fences the old producer all the same. Ignored: Tansu 0.6's object-store engine, SIGKILLed with writes in
/// flight, acknowledges the old producer's retries of them after the restart and then never serves them
/// (reproduced with Confluent's Python client alone: 400 of 52,400 acknowledged records missing after such a
/// restart; its log shows DUPLICATE_SEQUENCE_NUMBER answers, which clients take as "already written"). Here it
/// showed as 2,980 of 3,000 when the kill met writes in flight. Run it against Kafka (`-- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "Tansu 0.6's object-store engine acknowledges in-flight writes it lost in a SIGKILL"]
async fn a_broker_restart_within_the_message_timeout_loses_nothing() {
    restart_loses_nothing(Duration::from_millis(200)).await;
}

/// Stops the outage's broker for `down` mid-stream, starts it again with its data, and reads every input record's
/// output.
async fn restart_loses_nothing(down: Duration) {
    let mut outage = start_outage().await;
    outage.broker.stop();
    tokio::time::sleep(down).await;
    outage.broker.start();
    let (bootstrap, output) = (outage.broker.bootstrap(), outage.output.clone());
    let out = tokio::task::spawn_blocking(move || {
        let consumer = reader_on(&bootstrap, &output, "read_uncommitted");
        let start = Instant::now();
        let mut seen = BTreeSet::new();
        while seen.len() < OUTAGE_RECORDS && start.elapsed() < Duration::from_secs(120) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                seen.extend(sources(&[message.detach()]));
            }
        }
        seen
    })
    .await
    .unwrap();
    outage.shutdown.trigger();
    let ended = tokio::time::timeout(Duration::from_secs(60), &mut outage.task).await;
    assert_eq!(out.len(), OUTAGE_RECORDS, "every record arrives at least once");
    ended
        .expect("the pipeline stops within a minute of its shutdown")
        .unwrap()
        .expect("the pipeline ends cleanly");
}

/// A producer librdkafka declares fatally failed (an idempotence error it cannot recover from) can write nothing
/// more: the audit writer then retried for ever with it, and a lane ended the process. Now the shared producer is
/// replaced and the events in hand are written by the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_failed_fatally_is_replaced_and_the_audit_trail_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = common::keyring_at(dir.path());
    let topic = unique("faults-fatal");
    create_topic(&topic, 1).await;
    let producer = Producer::create(
        ClientConfig::new()
            .set("bootstrap.servers", common::kafka::broker())
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "5000")
            .clone(),
    )
    .unwrap();
    let first = producer.lease();
    // SAFETY: librdkafka's hook for testing fatal errors, on a live handle the lease keeps alive; the reason is a
    // NUL-terminated literal.
    let raised = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            first.producer().client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            c"fault test".as_ptr(),
        )
    };
    assert_eq!(
        raised,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    assert!(
        first.producer().client().fatal_error().is_some(),
        "the producer is dead"
    );
    let (auditor, writer, acks) = audit_two_events(producer.clone(), &topic, &keyring).await;
    tokio::time::timeout(Duration::from_secs(60), acks.written())
        .await
        .expect("written by a new producer")
        .unwrap();
    assert!(producer.lease().producer().client().fatal_error().is_none(), "replaced");
    drop(auditor);
    writer.await.unwrap().unwrap();
    let events = tokio::task::spawn_blocking(move || consume(&topic, 2, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(audit_events_of(&events, "QUARANTINE").len(), 1);
}

/// The PostgreSQL key store after its connection is terminated (a server restart, `pg_terminate_backend`) and while
/// the database is read-only (a standby after failover): every failure is retriable, never fatal, and the store
/// works again once the server does, on a fresh connection.
/// The key store can be dropped where `run` drops it, on a thread that drives tokio tasks: closing a sync
/// PostgreSQL client there used to panic ("Cannot start a runtime from within a runtime").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_key_store_can_be_dropped_on_a_runtime_thread() {
    use piiwall::keys::{KeyStore, PostgresStore};
    let store = tokio::task::spawn_blocking(move || {
        let url = common::services::fresh_database();
        let store = PostgresStore::open(&url).unwrap();
        assert!(!store.is_forgotten("s:any").unwrap());
        store
    })
    .await
    .unwrap();
    drop(store);
}

/// Calls on the PostgreSQL key store do not queue behind one connection: while one waits on a scope's lock (held
/// here by another session, as another instance deciding about that subject would), a call about another scope
/// is answered at once.
#[test]
fn a_postgres_call_that_waits_holds_up_only_itself() {
    use piiwall::crypto::KeyId;
    use piiwall::keys::{KeyStore, PostgresStore, StoredKey};
    let url = common::services::fresh_database();
    let store = std::sync::Arc::new(PostgresStore::open(&url).unwrap());
    let key = |scope: &str| StoredKey {
        key_id: KeyId::random(),
        scope: scope.into(),
        version: 1,
        wrapped: vec![7; 60],
    };
    store.insert_if_absent(&key("s:other")).unwrap();
    let mut holder = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut tx = holder.transaction().unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('s:busy', 0))", &[])
        .unwrap();
    let waiting = {
        let store = store.clone();
        std::thread::spawn(move || store.insert_if_absent(&key("s:busy")))
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!waiting.is_finished(), "the first call waits on the scope's lock");
    let asked = Instant::now();
    assert!(store.current("s:other").unwrap().is_some());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "another scope's call is not held up: {:?}",
        asked.elapsed()
    );
    tx.rollback().unwrap();
    waiting
        .join()
        .unwrap()
        .unwrap()
        .expect("the waiting call completes once the lock is released");
}

#[test]
fn the_postgres_key_store_rides_through_terminated_connections_and_a_read_only_database() {
    use piiwall::crypto::KeyId;
    use piiwall::error::{ErrorKind, KeyError};
    use piiwall::keys::{KeyStore, PostgresStore, StoredKey};
    let url = common::services::fresh_database();
    let database = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let admin_url = std::env::var("PIIWALL_TEST_PG").unwrap();
    let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls).unwrap();
    let mut terminate = || {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .unwrap();
    };
    let store = PostgresStore::open(&url).unwrap();
    let key = |version| StoredKey {
        key_id: KeyId::random(),
        scope: "s:faults".into(),
        version,
        wrapped: vec![7; 60],
    };
    let retriable = |e: &KeyError| assert_eq!(e.kind(), ErrorKind::Retriable, "{e}");
    // Two tries at most: the first may meet the terminated connection, the next connects afresh.
    let twice = |f: &dyn Fn() -> Result<(), KeyError>| {
        if let Err(e) = f() {
            retriable(&e);
            f().unwrap();
        }
    };
    store.insert_if_absent(&key(1)).unwrap().unwrap();

    terminate();
    twice(&|| store.current("s:faults").map(|k| assert!(k.is_some())));

    let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {database} SET default_transaction_read_only = on"
        ))
        .unwrap();
    let mut terminate_again = || {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .unwrap();
    };
    terminate_again();
    for _ in 0..3 {
        retriable(&store.insert_if_absent(&key(2)).map(drop).unwrap_err());
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {database} RESET default_transaction_read_only"
        ))
        .unwrap();
    twice(&|| store.insert_if_absent(&key(2)).map(|k| assert!(k.is_some())));
}

/// A lane that cannot go on (its topic's schema is in a registry that never answers) pauses only its own partition:
/// the other topic's records flow meanwhile, and a shutdown ends the wait within the drain timeout (the blocked
/// records were never stored, so they are read again after the restart; the drain reports that it timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_lane_pauses_only_its_partition_and_a_shutdown_ends_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (flowing, blocked) = (unique("faults-flowing"), unique("faults-blocked"));
    create_topic(&flowing, 1).await;
    create_topic(&blocked, 1).await;
    // A registry that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let registry = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || silent.incoming().take(64).flatten().collect::<Vec<_>>());
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let records = |n: usize| -> Vec<_> {
        (0..n)
            .map(|i| (0, None, framed(&schema, 1, &customer(i)), OwnedHeaders::new()))
            .collect()
    };
    produce(&blocked, records(200)).await;

    std::fs::write(
        dir.path().join("kek.key"),
        "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
    )
    .unwrap();
    let text = format!(
        r#"
[keys]
store = "sqlite:{dir}/keys.db"
kek = "file:{dir}/kek.key"
control_topic = "{flowing}.control"

[kafka]
brokers = "{brokers}"
group_id = "{group}"
inputs = ["{flowing}", "{blocked}"]
quarantine_topic = "{flowing}.quarantine"

[schemas]
registry = "{registry}"

[[schemas.local]]
topic = "{flowing}"
schema = "{schema}"
id = 1

[pipeline]
batch_size = 5
lane_capacity = 1
commit_interval_ms = 100
drain_timeout_secs = 3

[audit]
topic = "{flowing}.audit"

[http]
listen = "off"
"#,
        dir = dir.path().display(),
        brokers = common::kafka::broker(),
        group = unique("piiwall"),
        schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/customer_profile.avsc")
            .display(),
    );
    let config = Config::parse(&text, std::iter::empty(), "blocked lane test config").unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    // Let the blocked topic's lane fill up before the other topic has anything to read.
    tokio::time::sleep(Duration::from_secs(4)).await;
    produce(&flowing, records(30)).await;
    let output = format!("{flowing}.sanitized");
    let out = tokio::task::spawn_blocking(move || consume(&output, 30, Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(
        sources(&out),
        (0..30).collect::<BTreeSet<i64>>(),
        "the other topic's records flow while one lane waits"
    );
    assert!(!task.is_finished(), "the waiting lane stops nothing");

    let stopping = Instant::now();
    shutdown.trigger();
    let result = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("a shutdown ends the wait")
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "stopped within the drain timeout: {:?}",
        stopping.elapsed()
    );
    let error = result
        .expect_err("a drain that timed out is not a clean stop")
        .to_string();
    assert!(error.contains("drain timed out"), "{error}");
    drop(held);
}

/// Brokers that are not up yet when piiwall starts (a cluster starting with it): start-up waits for them with
/// backoff instead of failing after the metadata timeout, then runs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_brokers_that_are_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::persistent(free_port());
    broker.start();
    let input = unique("faults-late");
    create_topic_on(&broker.bootstrap(), &input, 1).await;
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let records = (0..20)
        .map(|i| (0, None, framed(&schema, 1, &customer(i)), OwnedHeaders::new()))
        .collect();
    common::kafka::produce_on(&broker.bootstrap(), &input, records).await;
    broker.stop();

    let schema_path = format!("{}/schemas/customer_profile.avsc", env!("CARGO_MANIFEST_DIR"));
    let config = pipeline_config(
        dir.path(),
        &broker.bootstrap(),
        &input,
        &schema_path,
        "[kafka.properties]\n\"reconnect.backoff.max.ms\" = \"500\"\n",
    );
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    // Longer than one metadata request's timeout (10 s), after which start-up used to fail.
    tokio::time::sleep(Duration::from_secs(13)).await;
    assert!(!task.is_finished(), "start-up waits for the brokers");
    broker.start();
    let (bootstrap, output) = (broker.bootstrap(), format!("{input}.sanitized"));
    let out = tokio::task::spawn_blocking(move || {
        consume_from(
            reader_on(&bootstrap, &output, "read_uncommitted"),
            20,
            Duration::from_secs(90),
        )
    })
    .await
    .unwrap();
    assert_eq!(sources(&out), (0..20).collect::<BTreeSet<i64>>(), "then it runs");
    shutdown.trigger();
    task.await.unwrap().expect("a clean stop");
}

/// A rebalance under load (at-least-once, on Tansu): while records flow, a second and a third instance join the
/// group and the first leaves. Every input record reaches the output at least once, and copies under one source
/// coordinate are one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_under_load_loses_nothing() {
    const N: usize = 6000;
    const PARTITIONS: i32 = 6;
    let dir = tempfile::tempdir().unwrap();
    let input = unique("faults-rebalance");
    create_topic(&input, PARTITIONS).await;
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let records = (0..N)
        .map(|i| {
            let partition = (i % PARTITIONS as usize) as i32;
            let key = format!("customer-{i}").into_bytes();
            (
                partition,
                Some(key),
                framed(&schema, 1, &customer(i)),
                OwnedHeaders::new(),
            )
        })
        .collect();
    produce(&input, records).await;
    let schema_path = format!("{}/schemas/customer_profile.avsc", env!("CARGO_MANIFEST_DIR"));
    let config = pipeline_config(dir.path(), &common::kafka::broker(), &input, &schema_path, "");
    let start = |config: &Config| {
        let shutdown = Shutdown::new();
        (shutdown.clone(), tokio::spawn(server::run(config.clone(), shutdown)))
    };
    let output = format!("{input}.sanitized");
    let reading = tokio::task::spawn_blocking({
        let output = output.clone();
        move || consume(&output, N, Duration::from_secs(150))
    });
    let first = start(&config);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = start(&config);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = start(&config);
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.0.trigger();
    first.1.await.unwrap().expect("the leaving instance stops cleanly");

    let out = reading.await.unwrap();
    let mut by_source: std::collections::HashMap<(i32, i64), BTreeSet<Vec<u8>>> = std::collections::HashMap::new();
    for message in &out {
        let partition: i32 = std::str::from_utf8(header(message, stream::SOURCE_PARTITION).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = std::str::from_utf8(header(message, SOURCE_OFFSET).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        // The deterministic part of the record: its key (hashed; one per input record).
        by_source
            .entry((partition, offset))
            .or_default()
            .insert(message.key().unwrap_or_default().to_vec());
    }
    let per_partition = (N / PARTITIONS as usize) as i64;
    let expected: BTreeSet<(i32, i64)> = (0..PARTITIONS)
        .flat_map(|p| (0..per_partition).map(move |o| (p, o)))
        .collect();
    let missing: Vec<_> = expected.iter().filter(|s| !by_source.contains_key(s)).take(5).collect();
    assert!(
        missing.is_empty(),
        "nothing lost; first missing: {missing:?} ({} records read)",
        out.len()
    );
    assert!(
        by_source.values().all(|copies| copies.len() == 1),
        "copies under one coordinate are one record"
    );
    for (shutdown, task) in [second, third] {
        shutdown.trigger();
        task.await.unwrap().expect("a clean stop");
    }
}

/// The `client.id` of the test's own producer, which the produce gate never refuses.
const TEST_PRODUCER: &str = "piiwall-test-producer";

/// A broker of the test's own behind a produce gate, started; and the gate's address, which clients bootstrap from.
fn gated_broker() -> (Broker, common::gate::ProduceGate, String) {
    let mut broker = Broker::on(free_port());
    let gate = common::gate::ProduceGate::open(broker.port, TEST_PRODUCER);
    broker.advertise(gate.port);
    broker.start();
    let bootstrap = format!("127.0.0.1:{}", gate.port);
    (broker, gate, bootstrap)
}

/// A batch sanitized before a forget, whose writing waits because its output cannot be written, is sanitized again
/// before it is written: nothing written after the forget carries the subject's token. Before, the lane's retries
/// wrote the outcomes they were first given, under the destroyed key (a `mask`'s kept characters and the hashed
/// record key with them), whenever the writing succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_writing_outlasts_a_forget_is_sanitized_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_broker, gate, bootstrap) = gated_broker();
    let input = unique("faults-forget");
    create_topic_on(&bootstrap, &input, 1).await;
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let record = || (0, None, framed(&schema, 1, &customer(42)), OwnedHeaders::new());
    produce_as_test(&bootstrap, &input, vec![record()]).await;

    let (http_port, token) = (free_port(), format!("olga-{:032x}", rand::random::<u128>()));
    let schema_path = format!("{}/schemas/customer_profile.avsc", env!("CARGO_MANIFEST_DIR"));
    let text = pipeline_config_text(
        dir.path(),
        &bootstrap,
        &input,
        &schema_path,
        "[kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n\"reconnect.backoff.max.ms\" = \"500\"\n",
    )
    .replace("[keys]\n", "[keys]\nforget_ack_wait_ms = 100\n")
    .replace("listen = \"off\"", &format!("listen = \"127.0.0.1:{http_port}\""))
        + &format!(
            "[api.roles.privacy-officer]\noperations = [\"forget\"]\npurposes = [\"gdpr-erasure\"]\n\n\
             [[api.principals]]\nname = \"olga\"\ntoken_sha256 = \"{}\"\nroles = [\"privacy-officer\"]\n",
            piiwall::api::token_digest_hex(&token)
        );
    let config = Config::parse(&text, std::iter::empty(), "fault test config").unwrap();
    // Another instance's command line, on the same key store, whose writes the gate lets through.
    let cli_config = dir.path().join("cli.toml");
    std::fs::write(
        &cli_config,
        text.replace(
            "\"reconnect.backoff.max.ms\" = \"500\"\n",
            &format!("\"reconnect.backoff.max.ms\" = \"500\"\n\"client.id\" = \"{TEST_PRODUCER}\"\n"),
        ),
    )
    .unwrap();
    let forget_elsewhere = |subject: &'static str| {
        let cli_config = cli_config.clone();
        tokio::task::spawn_blocking(move || {
            let done = std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"))
                .arg("--config")
                .arg(&cli_config)
                .args(["forget", subject])
                .output()
                .unwrap();
            assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        })
    };
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let _stop = common::StopOnDrop(shutdown.clone());
    let output = format!("{input}.sanitized");
    let read = |count: usize| {
        let (bootstrap, output) = (bootstrap.clone(), output.clone());
        tokio::task::spawn_blocking(move || {
            consume_from(
                reader_on(&bootstrap, &output, "read_uncommitted"),
                count,
                Duration::from_secs(60),
            )
        })
    };
    let first = read(1).await.unwrap();
    assert_eq!(first.len(), 1, "output flows");
    let email = |message: &OwnedMessage| {
        let (_, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        let apache_avro::types::Value::Record(fields) = common::decode(&schema.sanitized, payload) else {
            panic!("not a record")
        };
        fields.into_iter().find(|(name, _)| name == "email").unwrap().1
    };
    let token_before = email(&first[0]);

    // The output cannot be written: five more records of the subject are read, sanitized under its key, and
    // held by the lane, which writes them again and again.
    gate.shut();
    produce_as_test(&bootstrap, &input, (0..5).map(|_| record()).collect()).await;
    let metric = |name: &str| metric_of(http_port, name);
    wait_for_metric(
        http_port,
        "piiwall_lane_retries_total",
        2.0,
        "the lane never retried its batch",
    )
    .await;

    // Another instance forgets another subject (a bulk erasure's): its announcement reaches this one, and does not
    // touch the batch, which is not sanitized again.
    forget_elsewhere("cus_00007").await.unwrap();
    wait_for_metric(
        http_port,
        "piiwall_control_messages_total{op=\"forget\"}",
        1.0,
        "the other instance's forget never reached this one",
    )
    .await;
    let retries = metric("piiwall_lane_retries_total");
    wait_for_metric(
        http_port,
        "piiwall_lane_retries_total",
        retries + 2.0,
        "the lane stopped retrying",
    )
    .await;
    assert_eq!(
        metric("piiwall_batches_resanitized_total"),
        0.0,
        "a forget of a subject the batch does not hold"
    );

    // A call to this instance's API is not answered while its audit event cannot be written (fail closed): the
    // first has its answer withheld once its event is not acknowledged in time, and the next, with that event
    // still unwritten, is refused before it acts.
    let call = |subject: &str| {
        let body = serde_json::json!({"purpose": "gdpr-erasure", "subject": subject}).to_string();
        let token = token.clone();
        tokio::task::spawn_blocking(move || {
            common::services::http(http_port, "POST", "/v1/subjects/forget", Some(&token), &body)
        })
    };
    let (status, answer) = call("cus_00099").await.unwrap();
    assert_eq!(status, 503, "{answer}");
    // Refused before it acts instead when a pipeline event (a processing summary) already waits for the gate.
    let first = answer.to_string();
    assert!(
        first.contains("not acknowledged in time") || first.contains("cannot be written at the moment"),
        "{answer}"
    );
    let (status, answer) = call("cus_00098").await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.to_string().contains("cannot be written at the moment"),
        "{answer}"
    );

    // Another instance forgets the batch's subject.
    forget_elsewhere("cus_00042").await.unwrap();
    wait_for_metric(
        http_port,
        "piiwall_batches_resanitized_total",
        1.0,
        "the batch was never sanitized again",
    )
    .await;
    gate.open_again();

    let out = read(6).await.unwrap();
    let after: Vec<_> = out
        .iter()
        .filter(|m| sources(std::slice::from_ref(*m)) != BTreeSet::from([0]))
        .collect();
    assert_eq!(sources(&out), (0..6).collect(), "every record is written");
    assert!(!after.is_empty());
    for message in after {
        assert_ne!(
            email(message),
            token_before,
            "a record written after the forget carries the subject's token"
        );
    }
    // The audit events held up by the gate: the pipeline is ready again once they are written.
    let started = Instant::now();
    while common::services::http(http_port, "GET", "/readyz", None, "").0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the audit trail never caught up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.trigger();
    let ended = tokio::time::timeout(Duration::from_secs(60), task).await;
    ended
        .expect("the pipeline stops")
        .unwrap()
        .expect("the pipeline ends cleanly");
}

/// The sum of a metric's series on the `/metrics` of 127.0.0.1:`port`.
fn metric_of(port: u16, name: &str) -> f64 {
    let metrics = common::services::http(port, "GET", "/metrics", None, "").1;
    metrics
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until a metric reaches `at_least`; fails saying `what` after a minute.
async fn wait_for_metric(port: u16, name: &str, at_least: f64, what: &str) {
    let started = Instant::now();
    while metric_of(port, name) < at_least {
        assert!(started.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces `records` as the client the produce gate never refuses.
async fn produce_as_test(bootstrap: &str, topic: &str, records: Vec<common::kafka::Outgoing>) {
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("client.id", TEST_PRODUCER)
        .create()
        .unwrap();
    for (partition, _, value, headers) in records {
        let record = rdkafka::producer::FutureRecord::<(), _>::to(topic)
            .partition(partition)
            .payload(&value)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// A forget another instance announces right after this instance's control-topic reader has started is seen, even
/// when the brokers are slow to say where the topic ends. Before, the reader was assigned at `Offset::End`, which
/// the consumer resolved some time after `listen` returned (50 ms were given to it): an announcement made meanwhile
/// fell before the resolved end and was skipped, and the keys stayed cached until `keys.cache_ttl_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_announced_as_the_control_reader_starts_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = common::keyring_at(dir.path());
    let (_broker, gate, bootstrap) = gated_broker();
    let topic = unique("faults-control");
    create_topic_on(&bootstrap, &topic, 1).await;
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &bootstrap);
    let announcer = piiwall::control::Control::new(Producer::create(client.clone()).unwrap(), topic.clone());
    // Warm: the announcer's connection and metadata are ready, so the announcement below lands at once.
    announcer
        .announce(
            &keyring,
            piiwall::control::ControlOp::Rotate,
            &piiwall::keys::Keyring::domain_scope("warm-up"),
        )
        .await
        .unwrap();
    const LIST_OFFSETS: i16 = 2;
    gate.slow(LIST_OFFSETS, Duration::from_millis(1_000));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let listener = piiwall::control::listen(&client, &topic, keyring.clone(), None, stopped)
        .await
        .unwrap()
        .expect("not stopped");
    let scope = keyring.subject_scope("cus_00042");
    announcer
        .announce(&keyring, piiwall::control::ControlOp::Forget, &scope)
        .await
        .unwrap();
    let started = Instant::now();
    while keyring.forgets_seen() == 0 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    listener.await.unwrap();
    assert_eq!(keyring.forgets_seen(), 1, "the announced forget reached the keyring");
}

//! The stream processor against a real broker (Tansu, started by scripts/test-services): every record arrives
//! sanitized in per-partition order on the same partition number; poison records land in quarantine, encrypted,
//! with their reason; offsets are committed only for delivered records, so a restart resumes without loss or
//! duplicates. Each test uses its own topics and consumer group.

mod common;

use common::kafka::{
    Outgoing, audit_events, audit_events_of, broker, consume, create_topic, customer, framed, header, pii_of, produce,
    unique,
};

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use apache_avro::reader::datum::GenericDatumReader;
use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::config::Config;
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::server;
use piiwall::stream::{self, REASON, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, Shutdown, Summary};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;

const PARTITIONS: i32 = 3;
const SCHEMA_ID: u32 = 7;
const SANITIZED_ID: u32 = 1007;

fn schema_path() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas/customer_profile.avsc")
        .to_string_lossy()
        .into_owned()
}

/// What every test here starts from: its own key store directory, input topic, consumer group, and the customer
/// schema.
struct Setup {
    dir: tempfile::TempDir,
    input: String,
    group: String,
    schema: piiwall::policy::CompiledSchema,
}

async fn setup(name: &str) -> Setup {
    let input = unique(name);
    create_topic(&input, PARTITIONS).await;
    Setup {
        dir: tempfile::tempdir().unwrap(),
        input,
        group: unique("piiwall"),
        schema: compile(&common::example("customer_profile.avsc"), &PolicySettings::default()).unwrap(),
    }
}

/// The pipeline's config for one test: its own key store and KEK in `dir` (the KEK file is written here).
fn config(dir: &Path, input: &str, group: &str) -> Config {
    config_on(dir, input, group, 0)
}

/// As [`config`], serving the operations endpoints on `http_port` (0: any free port).
fn config_on(dir: &Path, input: &str, group: &str, http_port: u16) -> Config {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    Config::parse(
        &config_text(dir, input, group, http_port),
        std::iter::empty(),
        "test config",
    )
    .unwrap()
}

/// A GET on the pipeline's operations port: (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

fn header_i64(message: &OwnedMessage, name: &str) -> i64 {
    std::str::from_utf8(header(message, name).expect(name))
        .unwrap()
        .parse()
        .unwrap()
}

/// The offsets the group committed on `topic`, by partition.
fn committed(group: &str, topic: &str) -> HashMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_sanitized_in_order_and_poison_goes_to_quarantine() {
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("customers").await;

    const N: usize = 120;
    let mut records = Vec::new();
    for i in 0..N {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "trace-id",
                value: Some(format!("t{i}").as_bytes()),
            })
            .insert(Header {
                key: "x-user-email",
                value: Some(format!("person{i}@example.com").as_bytes()),
            });
        records.push((
            (i % 3) as i32,
            Some(format!("cus_{i:05}").into_bytes()),
            framed(&schema, SCHEMA_ID, &customer(i)),
            headers,
        ));
    }
    let mut truncated = framed(&schema, SCHEMA_ID, &customer(999));
    truncated.truncate(truncated.len() - 3);
    let mut unknown_id = framed(&schema, SCHEMA_ID, &customer(998));
    unknown_id[4] = 99;
    let poison = [
        (
            0,
            b"plain text with person997@example.com".to_vec(),
            "not Confluent wire format",
        ),
        (1, unknown_id, "unknown schema id 99"),
        (2, truncated, "malformed Avro"),
    ];
    for (partition, value, _) in &poison {
        records.push((
            *partition,
            Some(b"poison-key".to_vec()),
            value.clone(),
            OwnedHeaders::new(),
        ));
    }
    produce(&input, records).await;

    let output = format!("{input}.sanitized");
    let quarantine = format!("{input}.quarantine");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(
        config_on(dir.path(), &input, &group, port),
        shutdown.clone(),
    ));
    let sanitized = tokio::task::spawn_blocking({
        let output = output.clone();
        move || consume(&output, N, Duration::from_secs(90))
    })
    .await
    .unwrap();
    let quarantined = tokio::task::spawn_blocking({
        let quarantine = quarantine.clone();
        move || consume(&quarantine, 3, Duration::from_secs(30))
    })
    .await
    .unwrap();
    // Give the committer a moment, look at the operations endpoints, then stop: drain, commit, return.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/healthz"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status} {body}");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .unwrap();
    assert!(status.contains("200"), "ready while consuming: {status}");
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    let count = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("piiwall_records_total{")
                    && l.contains(&format!("topic=\"{input}\""))
                    && l.contains(outcome)
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(count("outcome=\"sanitized\"").as_deref(), Some("120"), "{metrics}");
    assert_eq!(count("outcome=\"quarantined\"").as_deref(), Some("3"));
    assert!(metrics.contains("piiwall_batch_seconds"), "batch latency histogram");
    assert!(!metrics.contains("example.com"), "no value in a metric");
    shutdown.trigger();
    let summary = task.await.unwrap().expect("the pipeline stops cleanly");
    assert_eq!(
        summary,
        Summary {
            sanitized: N as u64,
            quarantined: 3
        }
    );

    // Every record arrived once, on its input's partition number, in order.
    assert_eq!(sanitized.len(), N, "every record arrives on the output topic");
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
    for message in &sanitized {
        assert_eq!(header(message, SOURCE_TOPIC), Some(input.as_bytes()));
        let source_partition = header_i64(message, SOURCE_PARTITION) as i32;
        assert_eq!(
            message.partition(),
            source_partition,
            "output partition = input partition"
        );
        let offset = header_i64(message, SOURCE_OFFSET);
        if let Some(previous) = last_offset.insert(source_partition, offset) {
            assert!(offset > previous, "per-partition order is kept");
        }
        assert!(header(message, "trace-id").is_some(), "allowlisted headers are kept");
        assert!(header(message, "x-user-email").is_none(), "other headers are dropped");
        let (id, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        assert_eq!(id, SANITIZED_ID);
        let value = reader
            .read_value(&mut &payload[..])
            .expect("decodes with the sanitized schema");
        assert!(value.validate(&schema.sanitized));
        let key = message.key().unwrap();
        assert!(key.starts_with(b"pwh1."), "keys are hashed by default");
    }

    // Quarantine: each poison record, encrypted, with its reason and coordinates.
    assert_eq!(quarantined.len(), 3);
    let keyring = common::keyring_at_with(
        dir.path(),
        &std::fs::read_to_string(dir.path().join("kek.key")).unwrap(),
    );
    for (partition, original, reason) in &poison {
        let copy = quarantined
            .iter()
            .find(|m| header_i64(m, SOURCE_PARTITION) as i32 == *partition)
            .expect("each poison record is quarantined");
        let why = std::str::from_utf8(header(copy, REASON).unwrap()).unwrap();
        assert!(why.contains(reason), "{why}");
        let token = std::str::from_utf8(copy.payload().unwrap()).unwrap();
        assert!(token.starts_with("pwe2."), "the original bytes are encrypted");
        // Sealed to its source coordinates, as the headers name them.
        let context = format!(
            "quarantine.value@{input}/{partition}/{}",
            header_i64(copy, SOURCE_OFFSET)
        );
        let revealed = piiwall::sanitize::reveal(&keyring, &context, token).unwrap();
        let bytes: Vec<u8> = revealed.as_str().unwrap().chars().map(|c| c as u8).collect();
        assert_eq!(
            &bytes, original,
            "the quarantine copy decrypts to the original bytes, for replay"
        );
    }

    // No input PII anywhere in what left: values, keys, headers.
    let mut everything = Vec::new();
    for message in sanitized.iter().chain(&quarantined) {
        everything.extend_from_slice(message.payload().unwrap_or_default());
        everything.extend_from_slice(message.key().unwrap_or_default());
        for h in message
            .headers()
            .map(|h| h.iter().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            everything.extend_from_slice(h.value.unwrap_or_default());
        }
    }
    let everything = String::from_utf8_lossy(&everything);
    for i in (0..N).chain([997, 998, 999]) {
        for pii in pii_of(i) {
            assert!(!everything.contains(&pii), "a PII value left in clear");
        }
    }

    // Offsets were committed for everything, so a restart finds nothing to redo.
    let committed = tokio::task::spawn_blocking({
        let (group, input) = (group.clone(), input.clone());
        move || committed(&group, &input)
    })
    .await
    .unwrap();
    let expected: HashMap<i32, i64> = (0..PARTITIONS).map(|p| (p, (N / 3) as i64 + 1)).collect();
    assert_eq!(committed, expected, "each partition committed past its last record");
}

/// Starts `piiwall run` as its own process over a config file.
fn spawn_piiwall(dir: &Path, input: &str, group: &str) -> std::process::Child {
    config(dir, input, group);
    std::fs::write(dir.join("config.toml"), config_text(dir, input, group, 0)).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args(["run", "--config"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "piiwall=debug")
        .stderr(std::fs::File::create(dir.join(format!("piiwall-{}.log", rand::random::<u32>()))).unwrap())
        .spawn()
        .unwrap()
}

fn config_text(dir: &Path, input: &str, group: &str, http_port: u16) -> String {
    format!(
        r#"
[keys]
store = "sqlite:{dir}/keys.db"
kek = "file:{dir}/kek.key"

[kafka]
brokers = "{broker}"
group_id = "{group}"
inputs = ["{input}"]
quarantine_topic = "{input}.quarantine"
headers_allow = ["trace-id"]

[[schemas.local]]
topic = "{input}"
schema = "{schema}"
id = {SCHEMA_ID}
sanitized_id = {SANITIZED_ID}

[pipeline]
batch_size = 20
commit_interval_ms = 100

[audit]
topic = "{input}.audit"
instance = "test-instance"
window_secs = 3600

[http]
listen = "127.0.0.1:{http_port}"
"#,
        dir = dir.display(),
        broker = broker(),
        schema = schema_path(),
    )
}

fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Reads the output topic until `wanted` distinct source records arrived; returns every message read.
/// An output record as the restart tests see it: its source coordinates, and the subject token it carries.
type Seen = ((i32, i64), String);

/// Reads the output topic until `wanted` distinct source records arrived; returns every record read.
fn read_until_unique(topic: &str, schema: &CompiledSchema, wanted: usize, deadline: Duration) -> Vec<Seen> {
    let consumer = common::kafka::reader(topic);
    let codec = ValueCodec::for_sanitized(schema);
    let seen_of = |message: &OwnedMessage| -> Seen {
        let (_, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        let subject = match codec.decode(payload).unwrap() {
            apache_avro::types::Value::Record(fields) => match &fields[0].1 {
                apache_avro::types::Value::String(token) => token.clone(),
                other => panic!("customer_id is a token, not {other:?}"),
            },
            _ => panic!("a record"),
        };
        (
            (
                header_i64(message, SOURCE_PARTITION) as i32,
                header_i64(message, SOURCE_OFFSET),
            ),
            subject,
        )
    };
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < wanted && start.elapsed() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let record = seen_of(&message.detach());
            distinct.insert(record.0);
            seen.push(record);
        }
    }
    // Anything still in flight (a duplicate) shows up within a moment.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            seen.push(seen_of(&message.detach()));
        }
    }
    seen
}

/// Produces `n` customers, starts piiwall, stops it with `first_signal` once part of the output is there, restarts
/// it, and returns the source coordinates of every output record once all `n` have arrived.
async fn interrupted_run(first_signal: &str, n: usize) -> (Vec<Seen>, Option<i32>) {
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("restart").await;
    produce(&input, common::kafka::customer_records(&schema, SCHEMA_ID, n)).await;
    let output = format!("{input}.sanitized");

    let first = spawn_piiwall(dir.path(), &input, &group);
    let partial = tokio::task::spawn_blocking({
        let (output, reader_schema) = (output.clone(), schema.clone());
        move || read_until_unique(&output, &reader_schema, n / 4, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(partial.len() >= n / 4, "the first run made progress");
    signal(&first, first_signal);
    let status = tokio::task::spawn_blocking(move || {
        let mut first = first;
        first.wait().unwrap()
    })
    .await
    .unwrap();

    let mut second = spawn_piiwall(dir.path(), &input, &group);
    let all = tokio::task::spawn_blocking({
        let (output, reader_schema) = (output.clone(), schema.clone());
        move || read_until_unique(&output, &reader_schema, n, Duration::from_secs(90))
    })
    .await
    .unwrap();
    signal(&second, "TERM");
    assert!(
        second.wait().unwrap().success(),
        "the second run stops cleanly on SIGTERM"
    );
    // piiwall's own log output (debug level, both runs) carries no value of any input record.
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    assert!(logs.contains("piiwall running"), "the logs were captured");
    for i in 0..n {
        for pii in pii_of(i) {
            assert!(!logs.contains(&pii), "a PII value in piiwall's log output");
        }
    }
    (all, status.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_0_and_a_restart_has_no_duplicates() {
    const N: usize = 3000;
    let (all, code) = interrupted_run("TERM", N).await;
    assert_eq!(code, Some(0), "SIGTERM drains and exits 0");
    let distinct: std::collections::HashSet<_> = all.iter().map(|(source, _)| source).collect();
    assert_eq!(distinct.len(), N, "nothing lost");
    assert_eq!(all.len(), N, "no duplicate after a graceful stop and restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_and_duplicates_carry_their_source_coordinates() {
    const N: usize = 3000;
    let (all, code) = interrupted_run("KILL", N).await;
    assert_eq!(code, None, "killed by a signal");
    // Every input record is in the output at least once.
    let mut by_source: HashMap<(i32, i64), Vec<&str>> = HashMap::new();
    for (source, subject) in &all {
        by_source.entry(*source).or_default().push(subject);
    }
    let expected: std::collections::HashSet<(i32, i64)> = (0..N).map(|i| ((i % 3) as i32, (i / 3) as i64)).collect();
    assert_eq!(
        by_source.keys().copied().collect::<std::collections::HashSet<_>>(),
        expected,
        "nothing lost"
    );
    // The source coordinates identify the duplicates: every copy under one coordinate is the same record (same
    // subject token, tokens being deterministic), and different coordinates are different records. So dropping
    // repeated coordinates leaves each input record exactly once.
    for (source, subjects) in &by_source {
        assert!(
            subjects.iter().all(|s| s == &subjects[0]),
            "copies under {source:?} are one record"
        );
    }
    let subjects: std::collections::HashSet<&str> = by_source.values().map(|s| s[0]).collect();
    assert_eq!(subjects.len(), N, "distinct coordinates are distinct records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_and_tampering_is_detected() {
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("audited").await;
    const N: usize = 30;
    let mut records = common::kafka::customer_records(&schema, SCHEMA_ID, N);
    records.push((0, None, b"person996@example.com in clear".to_vec(), OwnedHeaders::new()));
    // An address pasted into a field nobody tagged: reported (policy.detect's default), counted in the summary.
    let mut pasted = customer(5);
    pasted["address"]["city"] = json!("write to pasted.in@example.org");
    records[5].2 = framed(&schema, SCHEMA_ID, &pasted);
    produce(&input, records).await;

    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config(dir.path(), &input, &group), shutdown.clone()));
    let output = format!("{input}.sanitized");
    let arrived = tokio::task::spawn_blocking(move || consume(&output, N, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(arrived.len(), N);
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.trigger();
    task.await.unwrap().unwrap();
    // A restart of the same instance begins a new run of its chain.
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config(dir.path(), &input, &group), shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.trigger();
    task.await.unwrap().unwrap();

    let audit_topic = format!("{input}.audit");
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker());
    let kek = std::fs::read_to_string(dir.path().join("kek.key")).unwrap();
    let keyring = common::keyring_at_with(dir.path(), &kek);
    let verify = |topic: String| {
        let (client, keyring) = (client.clone(), keyring.clone());
        tokio::task::spawn_blocking(move || piiwall::audit::verify(&client, &topic, &keyring).unwrap())
    };
    let report = verify(audit_topic.clone()).await.unwrap();
    assert_eq!(report.first_break, None, "the chain as written verifies");
    assert_eq!((report.instances, report.runs), (1, 2));
    // The records of processing (Art. 30) the same trail sums to: counts by topic, field and action, no value.
    let processing = {
        let (client, topic) = (client.clone(), audit_topic.clone());
        tokio::task::spawn_blocking(move || piiwall::audit::processing_report(&client, &topic, 0).unwrap())
            .await
            .unwrap()
    };
    assert_eq!(processing.counted, report.events);
    assert_eq!(
        processing
            .processing
            .get(&(input.clone(), "customer_id".into(), "subject".into())),
        Some(&(N as i64))
    );
    assert_eq!(
        processing
            .processing
            .get(&(input.clone(), "address.city".into(), "detected email (report)".into())),
        Some(&1)
    );
    assert_eq!(processing.quarantined.get(&input), Some(&1));
    assert_eq!(processing.keys.get("KEY_CREATED"), Some(&(N as i64)));
    let rendered = processing.render() + &processing.to_json().to_string();
    assert!(!rendered.contains("@example"), "no value in the report");
    let later = {
        let (client, topic) = (client.clone(), audit_topic.clone());
        tokio::task::spawn_blocking(move || piiwall::audit::processing_report(&client, &topic, i64::MAX).unwrap())
            .await
            .unwrap()
    };
    assert_eq!(
        (later.read, later.counted),
        (report.events, 0),
        "events before --since are left out"
    );
    // A leak of the sanitized topic, assessed (Art. 33(3)): every record read, subjects counted by their keys.
    let assessed = {
        let (client, topic) = (client.clone(), format!("{input}.sanitized"));
        let (sanitized, keyring) = (schema.sanitized_json.clone(), keyring.clone());
        tokio::task::spawn_blocking(move || {
            let mut report = piiwall::breach::assess_topic(&client, &topic, |_| Some(sanitized.clone())).unwrap();
            report.identify_keys(&keyring).unwrap();
            report.to_json(&topic)
        })
        .await
        .unwrap()
    };
    assert_eq!(
        (assessed["records"].as_u64(), assessed["unreadable_records"].as_u64()),
        (Some(N as u64), Some(0))
    );
    assert_eq!(assessed["a_categories_and_numbers"]["data_subjects_by_subject_key"], N);
    let email = assessed["a_categories_and_numbers"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "email")
        .unwrap()
        .clone();
    assert_eq!(
        (email["protection"].as_str(), email["records"].as_u64()),
        (Some("tokenized"), Some(N as u64))
    );
    assert!(!assessed.to_string().contains("@example"), "no value in the assessment");

    let events = tokio::task::spawn_blocking({
        let topic = audit_topic.clone();
        let count = report.events;
        move || consume(&topic, count, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let decoded = audit_events(&events);
    let kinds: Vec<&str> = decoded.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let of = |kind: &str| decoded.iter().filter(|e| e["kind"] == kind).collect::<Vec<_>>();
    assert_eq!(kinds.first(), Some(&"START"));
    assert_eq!(kinds.last(), Some(&"STOP"));
    assert_eq!(kinds.iter().filter(|k| **k == "START").count(), 2);
    let restart = kinds.iter().rposition(|k| *k == "START").unwrap();
    assert_eq!(decoded[restart]["seq"], 0, "the second run starts its own sequence");
    let quarantine = of("QUARANTINE");
    assert_eq!(quarantine.len(), 1);
    assert!(
        quarantine[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not Confluent wire format")
    );
    assert_eq!(quarantine[0]["partition"], 0);
    let summaries = of("PROCESSING_SUMMARY");
    assert_eq!(summaries.len(), 1);
    assert_eq!(
        summaries[0]["counts"][0],
        json!({"field_path": "customer_id", "action": "subject", "count": N})
    );
    assert!(
        summaries[0]["counts"]
            .as_array()
            .unwrap()
            .contains(&json!({"field_path": "address.city", "action": "detected email (report)", "count": 1})),
        "{}",
        summaries[0]["counts"]
    );
    let created: i64 = of("KEY_CREATED")
        .iter()
        .map(|e| e["counts"][0]["count"].as_i64().unwrap())
        .sum();
    assert_eq!(created, N as i64, "one key created per new subject, audited");
    assert_eq!(decoded[0]["config_digest"], decoded[decoded.len() - 1]["config_digest"]);
    let q = kinds.iter().position(|k| *k == "QUARANTINE").unwrap();
    let everything: Vec<u8> = events.iter().flat_map(|m| m.payload().unwrap().to_vec()).collect();
    let everything = String::from_utf8_lossy(&everything);
    for i in (0..N).chain([996]) {
        for pii in pii_of(i) {
            assert!(!everything.contains(&pii), "an audit event carries a PII value");
        }
    }
    assert!(
        !everything.contains("pasted.in@example.org"),
        "a detection is counted, never its value"
    );

    // Copies of the trail, each with one change: the verifier must find it.
    let tampered = |name: &str, payloads: Vec<Vec<u8>>| {
        let topic = unique(name);
        async move {
            create_topic(&topic, 1).await;
            produce(
                &topic,
                payloads
                    .into_iter()
                    .map(|p| (0, None, p, OwnedHeaders::new()))
                    .collect(),
            )
            .await;
            topic
        }
    };
    let originals: Vec<Vec<u8>> = events.iter().map(|m| m.payload().unwrap().to_vec()).collect();

    let mut altered = originals.clone();
    let at = altered[q].windows(3).position(|w| w == b"not").unwrap();
    altered[q][at] = b'N';
    let report = verify(tampered("altered", altered).await).await.unwrap();
    let problem = report.first_break.expect("an altered event breaks the chain");
    assert!(
        problem.contains(&format!("seq {q}")) && problem.contains("MAC does not verify"),
        "{problem}"
    );

    let mut removed = originals.clone();
    removed.remove(q);
    let report = verify(tampered("removed", removed).await).await.unwrap();
    let problem = report.first_break.expect("a removed event breaks the chain");
    assert!(
        problem.contains(&format!("expected seq {q}, found {}", q + 1)),
        "{problem}"
    );

    let mut swapped = originals.clone();
    swapped.swap(q, q + 1);
    let report = verify(tampered("reordered", swapped).await).await.unwrap();
    assert!(report.first_break.is_some(), "reordered events break the chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_records_are_replayed_once_their_cause_is_fixed() {
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("replay").await;
    // Producers moved to schema id 42, the binding still says SCHEMA_ID: everything is quarantined.
    let mut records: Vec<Outgoing> = (0..5)
        .map(|i| (0, None, framed(&schema, 42, &customer(i)), OwnedHeaders::new()))
        .collect();
    records.push((0, None, b"garbage".to_vec(), OwnedHeaders::new()));
    produce(&input, records).await;
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config(dir.path(), &input, &group), shutdown.clone()));
    let quarantine = format!("{input}.quarantine");
    let quarantined = tokio::task::spawn_blocking(move || consume(&quarantine, 6, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(quarantined.len(), 6);
    shutdown.trigger();
    task.await.unwrap().unwrap();

    // The cause is fixed: the binding learns id 42. Replay sends the five on; the garbage stays, reported.
    let fixed_text = config_text(dir.path(), &input, &group, 0).replace(&format!("id = {SCHEMA_ID}\n"), "id = 42\n");
    let fixed = Config::parse(&fixed_text, std::iter::empty(), "fixed config").unwrap();
    let summary = stream::replay(fixed.clone()).await.unwrap();
    assert_eq!(summary.replayed, 5);
    assert_eq!(summary.still_failing.len(), 1);
    assert!(
        summary.still_failing[0].contains("not Confluent wire format"),
        "{:?}",
        summary.still_failing
    );

    let output = format!("{input}.sanitized");
    let out = tokio::task::spawn_blocking(move || consume(&output, 5, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(out.len(), 5);
    let offsets: Vec<i64> = out.iter().map(|m| header_i64(m, SOURCE_OFFSET)).collect();
    assert_eq!(
        offsets,
        [0, 1, 2, 3, 4],
        "replayed records keep their source coordinates, in order"
    );
    assert!(out.iter().all(|m| m.partition() == 0));
    let everything: Vec<u8> = out.iter().flat_map(|m| m.payload().unwrap().to_vec()).collect();
    for i in 0..5 {
        for pii in pii_of(i) {
            assert!(!String::from_utf8_lossy(&everything).contains(&pii));
        }
    }

    // The replay committed up to the first record that still fails (offset 5): the next replay starts there, so
    // nothing is sent twice and nothing unfixed is skipped.
    let replay_group = format!("{group}.replay");
    let quarantine_topic = format!("{input}.quarantine");
    let position = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker())
            .set("group.id", &replay_group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&quarantine_topic, 0);
        consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
            .elements()[0]
            .offset()
    })
    .await
    .unwrap();
    assert_eq!(position, Offset::Offset(5));
    let again = stream::replay(fixed).await.unwrap();
    assert_eq!(again.replayed, 0, "nothing is replayed twice");
    // (On Kafka the second replay reports the garbage record again; Tansu 0.6 cannot serve a fetch that starts
    // inside a record batch, so that part is not asserted here.)
}

/// A clean stop records the encryption counts still below a recording step (~2 million at the default limit), so a
/// restart counts on from the exact total: before, each restart lost them (a key restarted often enough was never
/// counted toward its random-nonce bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_records_the_encryption_counts_below_a_step() {
    use piiwall::keys::KeyStore;
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("counted").await;
    // One customer, 3 encrypted fields a record: 30 random-nonce encryptions under one key.
    let record = customer(7);
    let records: Vec<Outgoing> = (0..10)
        .map(|i| {
            let value = framed(&schema, SCHEMA_ID, &record);
            (i % 3, Some(b"cus_00007".to_vec()), value, OwnedHeaders::new())
        })
        .collect();
    produce(&input, records).await;
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config(dir.path(), &input, &group), shutdown.clone()));
    let output = format!("{input}.sanitized");
    let sanitized = tokio::task::spawn_blocking(move || consume(&output, 10, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(sanitized.len(), 10);
    shutdown.trigger();
    task.await.unwrap().unwrap();

    let kek = std::fs::read_to_string(dir.path().join("kek.key")).unwrap();
    let key_id = match common::keyring_at_with(dir.path(), &kek)
        .subject_key("cus_00007")
        .unwrap()
    {
        piiwall::keys::RecordKey::Active(dek) => dek.key_id,
        piiwall::keys::RecordKey::Forgotten => panic!("not forgotten"),
    };
    let store = piiwall::keys::SqliteStore::open(&dir.path().join("keys.db")).unwrap();
    assert_eq!(
        store.record_encryptions(&key_id, 0).unwrap(),
        30,
        "every encryption recorded at the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_reaches_its_encryption_limit_is_rotated_announced_and_audited() {
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("worn").await;
    // One customer throughout: 3 encrypted fields a record, 60 records = 180 encryptions against a limit of 100.
    // Whatever the batching, the first key passes 100 and the second stays under it (at most 80 + 3 x 5).
    let one_customer = |n: usize, updated_at: i64| -> Vec<Outgoing> {
        let mut record = customer(7);
        record["updated_at"] = json!(updated_at);
        (0..n)
            .map(|i| {
                let value = framed(&schema, SCHEMA_ID, &record);
                ((i % 3) as i32, Some(b"cus_00007".to_vec()), value, OwnedHeaders::new())
            })
            .collect()
    };
    const LATER: i64 = 1_800_000_000_000;
    produce(&input, one_customer(60, 1)).await;
    config(dir.path(), &input, &group);
    let text = config_text(dir.path(), &input, &group, 0).replace(
        "[keys]\n",
        &format!("[keys]\nmax_encryptions_per_key = 100\ncontrol_topic = \"{input}.control\"\n"),
    );
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(
        Config::parse(&text, std::iter::empty(), "test config").unwrap(),
        shutdown.clone(),
    ));
    let output = format!("{input}.sanitized");
    let wait_for = |count: usize| {
        let output = output.clone();
        tokio::task::spawn_blocking(move || consume(&output, count, Duration::from_secs(60)))
    };
    assert_eq!(wait_for(60).await.unwrap().len(), 60);
    produce(&input, one_customer(5, LATER)).await;
    let sanitized = wait_for(65).await.unwrap();
    assert_eq!(sanitized.len(), 65);
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.trigger();
    task.await.unwrap().unwrap();

    let kek = std::fs::read_to_string(dir.path().join("kek.key")).unwrap();
    let keyring = common::keyring_at_with(dir.path(), &kek);
    let status = keyring.subject_status("cus_00007").unwrap();
    assert_eq!(status.key_versions, 2, "rotated exactly once");
    let current = match keyring.subject_key("cus_00007").unwrap() {
        piiwall::keys::RecordKey::Active(dek) => dek,
        piiwall::keys::RecordKey::Forgotten => panic!("not forgotten"),
    };
    let new_head = format!("pwe2.{}.", current.key_id.to_text());
    let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
    let json = JsonCodec::new(&schema.sanitized);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for message in &sanitized {
        let (_, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        let record = json.to_json(&reader.read_value(&mut &payload[..]).unwrap());
        let under_new_key = record["full_name"].as_str().unwrap().starts_with(&new_head);
        if record["updated_at"] == json!(LATER) {
            after.push(under_new_key);
        } else {
            before.push(under_new_key);
        }
    }
    assert_eq!(after, [true; 5], "records after the rotation use the new key");
    assert!(
        before.iter().filter(|new| !**new).count() >= 100 / 3,
        "the first 100 encryptions used the old key"
    );

    let announced = tokio::task::spawn_blocking({
        let topic = format!("{input}.control");
        move || consume(&topic, 1, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(announced.len(), 1);
    assert!(
        announced[0].payload().unwrap().starts_with(b"rotate "),
        "a signed rotation"
    );
    assert_eq!(
        announced[0].key(),
        Some(keyring.subject_scope("cus_00007").as_bytes()),
        "the subject's key scope, not its id"
    );

    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker());
    let audit_topic = format!("{input}.audit");
    let report = tokio::task::spawn_blocking({
        let (topic, keyring) = (audit_topic.clone(), keyring.clone());
        move || piiwall::audit::verify(&client, &topic, &keyring).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(report.first_break, None);
    let events = tokio::task::spawn_blocking(move || consume(&audit_topic, report.events, Duration::from_secs(30)))
        .await
        .unwrap();
    let rotated = audit_events_of(&events, "KEY_ROTATED");
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(rotated[0]["principal"], "piiwall");
    assert_eq!(
        rotated[0]["reason"],
        "a subject's key reached keys.max_encryptions_per_key (100)"
    );
    for event in &events {
        let bytes = event.payload().unwrap();
        assert!(
            !bytes.windows(9).any(|w| w == b"cus_00007"),
            "no subject id in the audit trail"
        );
    }
}

/// SIGKILL at random points of a long stream, ten times in a row, then a run to the end: every input record is in
/// the output (duplicates carry their source coordinates), and the audit chain verifies (a killed run's chain
/// ends without its STOP, which is how a crash shows). The kill points come from a seed printed on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_ten_times_in_a_row_loses_nothing() {
    use rand::{Rng, SeedableRng};
    const N: usize = 6000;
    const KILLS: usize = 10;
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Setup {
        dir,
        input,
        group,
        schema,
    } = setup("killloop").await;
    produce(&input, common::kafka::customer_records(&schema, SCHEMA_ID, N)).await;
    let output = format!("{input}.sanitized");
    for kill in 0..KILLS {
        let child = spawn_piiwall(dir.path(), &input, &group);
        // Between just after start-up and well into the stream.
        let after = Duration::from_millis(rng.gen_range(300..2500));
        tokio::time::sleep(after).await;
        signal(&child, "KILL");
        let status = tokio::task::spawn_blocking(move || {
            let mut child = child;
            child.wait().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(
            status.code(),
            None,
            "kill {kill} (seed {seed}): killed, not exited on its own"
        );
    }
    let mut last = spawn_piiwall(dir.path(), &input, &group);
    let all = tokio::task::spawn_blocking({
        let (output, schema) = (output.clone(), schema.clone());
        move || read_until_unique(&output, &schema, N, Duration::from_secs(120))
    })
    .await
    .unwrap();
    signal(&last, "TERM");
    assert!(last.wait().unwrap().success(), "the last run stops cleanly");

    let mut by_source: HashMap<(i32, i64), std::collections::HashSet<&str>> = HashMap::new();
    for (source, subject) in &all {
        by_source.entry(*source).or_default().insert(subject);
    }
    let expected: std::collections::HashSet<(i32, i64)> = (0..N).map(|i| ((i % 3) as i32, (i / 3) as i64)).collect();
    let missing = expected.iter().filter(|s| !by_source.contains_key(s)).count();
    assert_eq!(missing, 0, "seed {seed}: nothing lost");
    assert!(
        by_source.values().all(|subjects| subjects.len() == 1),
        "seed {seed}: copies under one coordinate are one record"
    );

    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker());
    let kek = std::fs::read_to_string(dir.path().join("kek.key")).unwrap();
    let keyring = common::keyring_at_with(dir.path(), &kek);
    let topic = format!("{input}.audit");
    let report = tokio::task::spawn_blocking(move || piiwall::audit::verify(&client, &topic, &keyring).unwrap())
        .await
        .unwrap();
    assert_eq!(report.first_break, None, "seed {seed}: the audit chain verifies");
    assert!(report.runs >= 2, "the runs that started left their START");
}

//! End to end on a real broker (Tansu, started by `bash scripts/test-services`), in one run:
//!
//! 1. throughput and CPU: N records (default 1,000,000; `PIIWALL_E2E_RECORDS`) through a plain consume -> produce
//!    copy and through `piiwall run`, each its own process (this binary re-run as the copy; the built `piiwall`),
//!    with the same client settings (consumer group, offsets stored after delivery, idempotent producer with
//!    acks=all and linger.ms=5); each timed from its start until a reader has seen all N outputs, and its CPU
//!    seconds (user + system, `/proc/<pid>/stat`) divided by N. Three runs of each side, alternating, per stream:
//!    the 10-field event (domain keys), customer records over 100,000 known subjects drawn Zipf(1.1) (their keys made
//!    by a first, unmeasured `piiwall` pass over the same stream), and customer records of N new subjects (a fresh
//!    key store for every `piiwall` run: SQLite, and PostgreSQL when `PIIWALL_TEST_PG` names the test server, a new
//!    database each run). Medians, with the lowest and highest;
//! 2. latency: records produced at a steady rate to a caught-up pipeline, from the producer's timestamp to the
//!    reader, p50 and p99, copy and piiwall; the difference is what piiwall adds;
//! 3. memory: peak RSS of `piiwall run` (its own process, key cache at its default bound, 100,000 keys) over
//!    customer records of distinct data subjects (default 1,000,000; `PIIWALL_E2E_SUBJECTS`), each needing its own
//!    key, produced while it runs at a steady rate it keeps up with (`MEMORY_RATE`).
//!
//! Run: `bash scripts/bench-e2e` (or `PIIWALL_TEST_KAFKA=127.0.0.1:19092 cargo bench --bench end_to_end`);
//! `PIIWALL_E2E_ONLY=memory` (or `throughput`, `latency`, comma-separated) runs only those parts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use piiwall::codec::json::JsonCodec;
use piiwall::config::Config;
use piiwall::policy::{PolicySettings, compile};
use piiwall::server;
use piiwall::stream::{self, Shutdown};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message};
use tokio::sync::watch;

#[path = "../tests/common/services.rs"]
#[allow(dead_code)]
mod services;

const PARTITIONS: i32 = 2;
const SCHEMA_ID: u32 = 1;
const BATCH: usize = 500;
const LATENCY_RECORDS: usize = 20_000;
const LATENCY_RATE: u64 = 5_000;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn unique(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

fn client(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = client(brokers).create().unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

/// The framed 10-field event number `i` (distinct ids and emails).
fn events(count: usize) -> impl Iterator<Item = Vec<u8>> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.avsc")).unwrap();
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    (0..count).map(move |i| {
        let json = serde_json::json!({
            "id": format!("evt-{i:09}"), "ts": 1_764_150_400_000i64 + i as i64,
            "email": format!("person{i}@example.com"), "phone": format!("+44 7700 {i:06}"),
            "name": format!("Person Number{i}"), "amount": 129.99, "country": "GB", "ip": "203.0.113.0",
            "card_number": "4111111111111111", "note": "first order, gift wrapped"
        });
        stream::encode_framed(
            &schema,
            SCHEMA_ID,
            &JsonCodec::new(&schema.writer).to_value(&json).unwrap(),
        )
        .unwrap()
    })
}

/// Produces `count` events, paced at `rate` per second if given; returns the time it took.
fn produce(brokers: &str, topic: &str, count: usize, rate: Option<u64>) -> Duration {
    produce_values(brokers, topic, events(count), rate)
}

fn produce_values(brokers: &str, topic: &str, values: impl Iterator<Item = Vec<u8>>, rate: Option<u64>) -> Duration {
    produce_batched(brokers, topic, values, rate, 10_000)
}

/// As [`produce_values`], with at most `per_batch` records in a record batch.
fn produce_batched(
    brokers: &str,
    topic: &str,
    values: impl Iterator<Item = Vec<u8>>,
    rate: Option<u64>,
    per_batch: usize,
) -> Duration {
    let producer: BaseProducer = client(brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", per_batch.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let start = Instant::now();
    for (i, value) in values.enumerate() {
        if let Some(rate) = rate {
            let due = start + Duration::from_micros(i as u64 * 1_000_000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut record = BaseRecord::<(), _>::to(topic)
            .partition(i as i32 % PARTITIONS)
            .payload(&value)
            .timestamp(now_ms());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    start.elapsed()
}

/// Reads `topic` until `count` records arrived; returns each record's latency (arrival - producer timestamp), ms.
fn read(brokers: &str, topic: &str, count: usize, deadline: Duration) -> Vec<i64> {
    let consumer: BaseConsumer = client(brokers)
        .set("group.id", unique("bench-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count && start.elapsed() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            latencies.push(now_ms() - message.timestamp().to_millis().unwrap_or(0));
        }
    }
    assert_eq!(
        latencies.len(),
        count,
        "{topic}: not every record arrived within {deadline:?}"
    );
    latencies
}

/// The plain copy: consume, produce the same key, value and timestamp to the same partition of `output`, store
/// offsets after delivery, with piiwall's client settings.
async fn copy(brokers: String, input: String, output: String, mut stop: watch::Receiver<bool>) {
    let consumer: Arc<StreamConsumer> = Arc::new(
        client(&brokers)
            .set("group.id", unique("copy"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap(),
    );
    let producer: FutureProducer = client(&brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    consumer.subscribe(&[&input]).unwrap();
    let mut pending = Vec::with_capacity(BATCH);
    let mut last = Vec::with_capacity(BATCH);
    loop {
        // Take what is ready now; when nothing is, flush the partial batch and wait (piiwall's lanes do the same).
        let message = match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
            Ok(message) => message.unwrap(),
            Err(_) => {
                flush(&consumer, &mut pending, &mut last).await;
                tokio::select! {
                    _ = stop.changed() => break,
                    m = consumer.recv() => m.unwrap(),
                }
            }
        };
        let mut record = FutureRecord::to(&output).partition(message.partition());
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(ts) = message.timestamp().to_millis() {
            record = record.timestamp(ts);
        }
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        last.push((message.topic().to_owned(), message.partition(), message.offset()));
        if pending.len() >= BATCH {
            flush(&consumer, &mut pending, &mut last).await;
        }
    }
    flush(&consumer, &mut pending, &mut last).await;
}

/// Waits for every pending delivery, then stores and commits the offsets of what was delivered.
async fn flush(
    consumer: &StreamConsumer,
    pending: &mut Vec<rdkafka::producer::DeliveryFuture>,
    last: &mut Vec<(String, i32, i64)>,
) {
    for delivery in pending.drain(..) {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    for (topic, partition, offset) in last.drain(..) {
        let _ = consumer.store_offset(&topic, partition, offset);
    }
    let _ = consumer.commit_consumer_state(CommitMode::Async);
}

fn piiwall_config(brokers: &str, dir: &Path, input: &str) -> Config {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.avsc");
    let text = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\n[kafka]\nbrokers = \"{brokers}\"\n\
         group_id = \"{group}\"\ninputs = [\"{input}\"]\nquarantine_topic = \"{input}.quarantine\"\n\
         [[schemas.local]]\ntopic = \"{input}\"\nschema = \"{schema}\"\nid = {SCHEMA_ID}\n[http]\nlisten = \"off\"\n",
        dir = dir.display(),
        group = unique("piiwall"),
        schema = schema.display(),
    );
    Config::parse(&text, std::iter::empty(), "bench config").unwrap()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn measure(brokers: &str, which: &str, input: &str, count: usize, paced: bool) -> (Duration, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let (output, stop): (String, Box<dyn FnOnce() -> tokio::task::JoinHandle<()>>) = if which == "copy" {
        let output = format!("{input}.copy");
        create_topic(brokers, &output).await;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(copy(brokers.to_owned(), input.to_owned(), output.clone(), rx));
        (
            output,
            Box::new(move || {
                tx.send_replace(true);
                task
            }),
        )
    } else {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(server::run(
            piiwall_config(brokers, dir.path(), input),
            shutdown.clone(),
        ));
        (
            format!("{input}.sanitized"),
            Box::new(move || {
                shutdown.trigger();
                tokio::spawn(async move {
                    task.await.unwrap().unwrap();
                })
            }),
        )
    };
    let start = Instant::now();
    let reader = tokio::task::spawn_blocking({
        let (brokers, output) = (brokers.to_owned(), output.clone());
        move || read(&brokers, &output, count, Duration::from_secs(1800))
    });
    if paced {
        let (brokers, input) = (brokers.to_owned(), input.to_owned());
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::spawn_blocking(move || produce(&brokers, &input, count, Some(LATENCY_RATE)))
            .await
            .unwrap();
    }
    let latencies = reader.await.unwrap();
    let elapsed = start.elapsed();
    stop().await.unwrap();
    (elapsed, latencies)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench -- --list` probe bench targets: nothing to list
    }
    let Ok(brokers) = std::env::var("PIIWALL_TEST_KAFKA") else {
        eprintln!("end_to_end: set PIIWALL_TEST_KAFKA (start the broker with `bash scripts/test-services`)");
        std::process::exit(2);
    };
    if let Ok(topics) = std::env::var(COPY_CHILD) {
        // This binary re-run as the plain copy's own process: copies until SIGTERM.
        let (input, output) = topics.split_once(' ').unwrap();
        let (tx, rx) = watch::channel(false);
        let copying = tokio::spawn(copy(brokers.clone(), input.to_owned(), output.to_owned(), rx));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
        tx.send_replace(true);
        copying.await.unwrap();
        return;
    }
    let count: usize = std::env::var("PIIWALL_E2E_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);

    let only: Option<Vec<String>> = std::env::var("PIIWALL_E2E_ONLY")
        .ok()
        .map(|only| only.split(',').map(|p| p.trim().to_owned()).collect());
    const PARTS: [&str; 3] = ["throughput", "latency", "memory"];
    if let Some(unknown) = only.iter().flatten().find(|p| !PARTS.contains(&p.as_str())) {
        eprintln!(
            "end_to_end: PIIWALL_E2E_ONLY names `{unknown}`: the parts are {}",
            PARTS.join(", ")
        );
        std::process::exit(2);
    }
    let runs = |part: &str| only.as_ref().is_none_or(|only| only.iter().any(|p| p == part));
    if runs("throughput") {
        let mut streams = vec![Stream::Event, Stream::KnownSubjects, Stream::NewSubjects];
        if std::env::var_os("PIIWALL_TEST_PG").is_some() {
            streams.push(Stream::NewSubjectsPostgres);
        }
        for stream in streams {
            throughput(&brokers, stream, count).await;
        }
    }
    if runs("latency") {
        latency(&brokers).await;
    }
    if runs("memory") {
        memory(&brokers).await;
    }
}

/// Part 2: what piiwall adds to the latency of a caught-up pipeline.
async fn latency(brokers: &str) {
    let mut results = Vec::new();
    for which in ["copy", "piiwall"] {
        let topic = unique("e2e-latency");
        create_topic(brokers, &topic).await;
        let (_, mut latencies) = measure(brokers, which, &topic, LATENCY_RECORDS, true).await;
        latencies.sort_unstable();
        let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
        println!(
            "latency     {which:<7} p50 {p50:>4} ms  p99 {p99:>4} ms  ({LATENCY_RECORDS} records at {LATENCY_RATE}/s)"
        );
        results.push((p50, p99));
    }
    println!(
        "added by piiwall: p50 {} ms, p99 {} ms",
        results[1].0 - results[0].0,
        results[1].1 - results[0].1
    );
}

/// Part 3: peak RSS over many distinct subjects.
async fn memory(brokers: &str) {
    let subjects: usize = std::env::var("PIIWALL_E2E_SUBJECTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let (peak_kib, elapsed) = peak_rss(brokers, subjects).await;
    println!(
        "memory      piiwall run: peak RSS {:.1} MiB over {subjects} distinct subjects ({:.0} records/s, key cache at its default, 100,000)",
        peak_kib as f64 / 1024.0,
        subjects as f64 / elapsed.as_secs_f64()
    );
}

/// Customer records of `count` distinct subjects, framed with schema id 1.
fn customers(count: usize) -> impl Iterator<Item = Vec<u8>> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/customer_profile.avsc")).unwrap();
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    (0..count).map(move |i| {
        let json = serde_json::json!({
            "customer_id": format!("cus_{i:09}"), "email": format!("person{i}@example.com"),
            "full_name": format!("Person Number{i}"),
            "address": {"street": format!("{i} Lane"), "city": "Leeds", "postcode": "LS1 1AA", "country": "GB"},
            "phones": [{"kind": "MOBILE", "number": format!("+44 7700 {i:06}")}], "updated_at": 1
        });
        stream::encode_framed(
            &schema,
            SCHEMA_ID,
            &JsonCodec::new(&schema.writer).to_value(&json).unwrap(),
        )
        .unwrap()
    })
}

/// Records of new subjects per second produced for the memory run: below what piiwall sustains with new subjects
/// here (~19,000/s, beside the broker), so its lanes stay short.
const MEMORY_RATE: u64 = 10_000;

/// Runs `piiwall run` as its own process over `count` records of distinct subjects, produced while it runs at
/// `MEMORY_RATE`; returns its peak resident set (VmHWM, KiB) and the time until a reader had every output.
///
/// The records are produced as it runs rather than before: a topic written before would fill piiwall's lanes,
/// which pause their partitions, and Tansu answers the fetch of a resumed partition with nothing when it starts
/// inside a record batch (see `LANE_CAPACITY`); written one record a batch to avoid that, a million batches slow
/// Tansu's fetches to a crawl. A lane may hold 50,000 records (a few seconds of a stall, ~15 MB) instead of the
/// default 2,000, for the same reason.
async fn peak_rss(brokers: &str, count: usize) -> (u64, Duration) {
    let input = unique("e2e-subjects");
    create_topic(brokers, &input).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kek.key"),
        "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
    )
    .unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/customer_profile.avsc");
    let config = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\n\
         [kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ninputs = [\"{input}\"]\n\
         quarantine_topic = \"{input}.quarantine\"\n[[schemas.local]]\ntopic = \"{input}\"\nschema = \"{schema}\"\n\
         id = {SCHEMA_ID}\n[audit]\ntopic = \"{input}.audit\"\n[pipeline]\nlane_capacity = 50000\n\
         [http]\nlisten = \"off\"\n",
        dir = dir.path().display(),
        group = unique("piiwall"),
        schema = schema.display(),
    );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args(["run", "--config"])
        .arg(dir.path().join("config.toml"))
        .env("RUST_LOG", "piiwall=warn")
        .spawn()
        .unwrap();
    let start = Instant::now();
    let producer = tokio::task::spawn_blocking({
        let (brokers, input) = (brokers.to_owned(), input.clone());
        move || produce_batched(&brokers, &input, customers(count), Some(MEMORY_RATE), 100)
    });
    let reader = tokio::task::spawn_blocking({
        let (brokers, output) = (brokers.to_owned(), format!("{input}.sanitized"));
        move || read(&brokers, &output, count, Duration::from_secs(3600))
    });
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while !reader.is_finished() {
        if let Some(hwm) = std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
        {
            peak = peak.max(hwm);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    reader.await.unwrap();
    producer.await.unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (peak, elapsed)
}

/// The environment variable that makes this binary the plain copy (its value: "INPUT OUTPUT").
const COPY_CHILD: &str = "PIIWALL_E2E_COPY_CHILD";

/// Records a lane may hold: the whole stream, so no partition is ever paused. Tansu answers a fetch that starts
/// inside a record batch with nothing, or with the next batch (records skipped), and librdkafka resumes a paused
/// partition from the record after the last one it delivered, inside a batch: a pause stalls the bench on Tansu.
/// Kafka returns the batch that holds the offset.
const LANE_CAPACITY: usize = 2_000_000;

/// Distinct subjects of the known-subjects stream.
const KNOWN_SUBJECTS: usize = 100_000;

#[derive(Clone, Copy, PartialEq)]
enum Stream {
    Event,
    KnownSubjects,
    NewSubjects,
    /// As `NewSubjects`, with the PostgreSQL key store.
    NewSubjectsPostgres,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Event => "event (domain keys)",
            Stream::KnownSubjects => "customers, 100,000 known subjects, Zipf(1.1)",
            Stream::NewSubjects => "customers, every subject new",
            Stream::NewSubjectsPostgres => {
                "customers, every subject new, PostgreSQL key store (piiwall's CPU only: the server's is its own)"
            }
        }
    }

    fn schema(self) -> &'static str {
        match self {
            Stream::Event => "schemas/event.avsc",
            _ => "schemas/customer_profile.avsc",
        }
    }

    fn values(self, count: usize) -> Box<dyn Iterator<Item = Vec<u8>> + Send> {
        match self {
            Stream::Event => Box::new(events(count)),
            Stream::NewSubjects | Stream::NewSubjectsPostgres => Box::new(customers(count)),
            Stream::KnownSubjects => {
                let records: Vec<Vec<u8>> = customers(KNOWN_SUBJECTS).collect();
                let mut total = 0.0;
                let cdf: Vec<f64> = (1..=KNOWN_SUBJECTS)
                    .map(|rank| {
                        total += 1.0 / (rank as f64).powf(1.1);
                        total
                    })
                    .collect();
                let mut rng = StdRng::seed_from_u64(15);
                Box::new((0..count).map(move |_| {
                    let u: f64 = rng.r#gen::<f64>() * total;
                    records[cdf.partition_point(|c| *c < u).min(KNOWN_SUBJECTS - 1)].clone()
                }))
            }
        }
    }
}

/// One side's run: wall time until a reader had every output, and the process's CPU seconds.
struct Run {
    elapsed: Duration,
    cpu: f64,
}

/// Three runs of each side over one input topic, alternating; prints medians (lowest-highest) of records/s and of
/// CPU per record, and piiwall's ratios to the copy.
async fn throughput(brokers: &str, stream: Stream, count: usize) {
    let input = unique("e2e");
    create_topic(brokers, &input).await;
    let produced = tokio::task::spawn_blocking({
        let (brokers, input) = (brokers.to_owned(), input.clone());
        move || produce_values(&brokers, &input, stream.values(count), None)
    })
    .await
    .unwrap();
    println!(
        "{}: produced {count} records in {:.1} s",
        stream.name(),
        produced.as_secs_f64()
    );
    let keys = tempfile::tempdir().unwrap();
    if stream == Stream::KnownSubjects {
        // Every subject's key made before the measured runs, in the store they all use.
        run_process(brokers, "piiwall", &input, count, stream, keys.path()).await;
    }
    let (mut copies, mut piiwalls) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        copies.push(run_process(brokers, "copy", &input, count, stream, keys.path()).await);
        let fresh = tempfile::tempdir().unwrap();
        let store = if matches!(stream, Stream::NewSubjects | Stream::NewSubjectsPostgres) {
            fresh.path()
        } else {
            keys.path()
        };
        piiwalls.push(run_process(brokers, "piiwall", &input, count, stream, store).await);
    }
    let rates = |runs: &[Run]| -> Vec<f64> { runs.iter().map(|r| count as f64 / r.elapsed.as_secs_f64()).collect() };
    let cpus = |runs: &[Run]| -> Vec<f64> { runs.iter().map(|r| r.cpu * 1e6 / count as f64).collect() };
    let (copy_rate, piiwall_rate) = (median(rates(&copies)), median(rates(&piiwalls)));
    let (copy_cpu, piiwall_cpu) = (median(cpus(&copies)), median(cpus(&piiwalls)));
    for (side, rate, cpu) in [
        ("copy", &copy_rate, &copy_cpu),
        ("piiwall", &piiwall_rate, &piiwall_cpu),
    ] {
        println!(
            "  {side:<7} {:>9.0} records/s ({:.0}-{:.0})   CPU {:>6.2} µs/record ({:.2}-{:.2})",
            rate.0, rate.1, rate.2, cpu.0, cpu.1, cpu.2
        );
    }
    println!(
        "  piiwall / copy: records/s {:.2}x, CPU per record {:.2}x",
        piiwall_rate.0 / copy_rate.0,
        piiwall_cpu.0 / copy_cpu.0
    );
}

/// (median, lowest, highest)
fn median(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

/// Runs one side as its own process over `input` (a fresh consumer group and output topic) until a reader has
/// `count` outputs; then reads the process's CPU time and stops it.
async fn run_process(brokers: &str, side: &str, input: &str, count: usize, stream: Stream, keys: &Path) -> Run {
    let suffix = format!(".{}", unique(side));
    let output = format!("{input}{suffix}");
    create_topic(brokers, &output).await;
    let dir = tempfile::tempdir().unwrap();
    // The PostgreSQL stream's database for this run, dropped when it ends.
    let mut database: Option<String> = None;
    let mut command = if side == "copy" {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command.env(COPY_CHILD, format!("{input} {output}"));
        command
    } else {
        std::fs::write(keys.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
        let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join(stream.schema());
        let store = if stream == Stream::NewSubjectsPostgres {
            let url = tokio::task::block_in_place(services::fresh_database);
            database = Some(url.clone());
            url
        } else {
            format!("sqlite:{}/keys.db", keys.display())
        };
        let config = format!(
            "[keys]\nstore = \"{store}\"\nkek = \"file:{keys}/kek.key\"\n\
             [kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ninputs = [\"{input}\"]\n\
             output_suffix = \"{suffix}\"\nquarantine_topic = \"{input}.quarantine\"\n[[schemas.local]]\n\
             topic = \"{input}\"\nschema = \"{schema}\"\nid = {SCHEMA_ID}\n[audit]\ntopic = \"{input}.audit\"\n\
             [pipeline]\nlane_capacity = {LANE_CAPACITY}\n[http]\nlisten = \"off\"\n",
            keys = keys.display(),
            group = unique("piiwall"),
            schema = schema.display(),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"));
        command.args(["run", "--config"]).arg(dir.path().join("config.toml"));
        command
    };
    let start = Instant::now();
    let mut child = command.env("RUST_LOG", "piiwall=warn").spawn().unwrap();
    let (brokers, reading) = (brokers.to_owned(), output.clone());
    tokio::task::spawn_blocking(move || read(&brokers, &reading, count, Duration::from_secs(3600)))
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let cpu = cpu_seconds(child.id());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if let Some(url) = database {
        tokio::task::block_in_place(|| drop_database(&url));
    }
    println!(
        "    {side:<7} {:>9.0} records/s, {:.2} µs CPU/record",
        count as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / count as f64
    );
    Run { elapsed, cpu }
}

/// Drops a database [`services::fresh_database`] made (the bench's keys: a million rows a run).
fn drop_database(url: &str) {
    let name = url.rsplit_once('/').unwrap().1.split('?').next().unwrap();
    let admin = std::env::var("PIIWALL_TEST_PG").unwrap();
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
}

/// User + system CPU seconds of a process so far, from `/proc/<pid>/stat` (clock ticks of `getconf CLK_TCK`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses, which may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks as f64 / per_second
}

//! `piiwall demo`: the whole pipeline on librdkafka's in-process mock cluster, with the example schemas and sample
//! records built into the binary. It produces raw records, runs the firewall, prints raw and sanitized records side
//! by side and what went to quarantine, reveals one token, forgets one customer, and exits. No servers, no config.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::Value as Json;

use crate::codec::json::JsonCodec;
use crate::config::Config;
use crate::error::Error;
use crate::keys::Keyring;
use crate::policy::{CompiledSchema, compile_any};
use crate::server;
use crate::stream::{self, REASON, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, Shutdown};

struct Example {
    topic: &'static str,
    file: &'static str,
    schema: &'static str,
    samples: &'static str,
    id: u32,
    /// Plain JSON records (no Confluent framing): `format = "json"`.
    plain: bool,
}

const EXAMPLES: [Example; 6] = [
    Example {
        topic: "demo.customers",
        file: "customer_profile.avsc",
        schema: include_str!("../schemas/customer_profile.avsc"),
        samples: include_str!("../schemas/samples/customer_profile.jsonl"),
        id: 1,
        plain: false,
    },
    Example {
        topic: "demo.payments",
        file: "payment.avsc",
        schema: include_str!("../schemas/payment.avsc"),
        samples: include_str!("../schemas/samples/payment.jsonl"),
        id: 2,
        plain: false,
    },
    Example {
        topic: "demo.clicks",
        file: "clickstream.avsc",
        schema: include_str!("../schemas/clickstream.avsc"),
        samples: include_str!("../schemas/samples/clickstream.jsonl"),
        id: 3,
        plain: false,
    },
    // JSON Schema, Confluent wire format.
    Example {
        topic: "demo.orders",
        file: "order.schema.json",
        schema: include_str!("../schemas/order.schema.json"),
        samples: include_str!("../schemas/samples/order.jsonl"),
        id: 4,
        plain: false,
    },
    // Plain JSON, no framing.
    Example {
        topic: "demo.events",
        file: "event.schema.json",
        schema: include_str!("../schemas/event.schema.json"),
        samples: include_str!("../schemas/samples/event.jsonl"),
        id: 5,
        plain: true,
    },
    // Protobuf, Confluent wire format (message indexes before the message).
    Example {
        topic: "demo.events.proto",
        file: "event.proto",
        schema: include_str!("../schemas/event.proto"),
        samples: include_str!("../schemas/samples/event.jsonl"),
        id: 6,
        plain: false,
    },
];

/// A Protobuf schema's records written from Avro binary of `message` (the writer's, or the sanitized one).
fn protobuf_records(schema: &CompiledSchema, sanitized: bool) -> Option<crate::codec::Records> {
    let proto = schema.protobuf()?;
    let message = if sanitized {
        &proto.sanitized_message
    } else {
        &proto.writer
    };
    Some(crate::codec::Records::Protobuf(
        crate::codec::protobuf::ProtoRecords::of_message(message),
    ))
}

/// A sample record as its producer writes it: Avro or JSON, in the Confluent wire format unless plain.
fn encode_sample(example: &Example, schema: &CompiledSchema, id: u32, json: &Json) -> Result<Vec<u8>, Error> {
    if let Some(records) = protobuf_records(schema, false) {
        let value = JsonCodec::new(&schema.writer).to_value(json)?;
        let mut avro = Vec::new();
        crate::codec::avro::ValueCodec::for_writer(schema).encode(&value, &mut avro)?;
        let mut out = Vec::new();
        stream::write_frame_header(id, &mut out);
        records.write(schema, &avro, &mut out)?;
        return Ok(out);
    }
    if !schema.is_json() {
        return Ok(stream::encode_framed(
            schema,
            id,
            &JsonCodec::new(&schema.writer).to_value(json)?,
        )?);
    }
    let mut out = Vec::new();
    if !example.plain {
        stream::write_frame_header(id, &mut out);
    }
    serde_json::to_writer(&mut out, json).map_err(|e| Error::io("demo", e.into()))?;
    Ok(out)
}

/// A sanitized record as JSON, whatever its form.
fn sanitized_json(example: &Example, schema: &CompiledSchema, value: &[u8]) -> Result<Json, Error> {
    let payload = if example.plain {
        value
    } else {
        stream::parse_frame(value).map_err(kafka)?.1
    };
    if schema.is_json() || example.plain {
        return serde_json::from_slice(payload).map_err(|e| Error::io("demo", e.into()));
    }
    let avro;
    let payload = match protobuf_records(schema, true) {
        Some(records) => {
            avro = records.read(schema, payload)?.0;
            &avro[..]
        }
        None => payload,
    };
    let value = crate::codec::avro::ValueCodec::for_sanitized(schema).decode(payload)?;
    Ok(JsonCodec::new(&schema.sanitized).to_json(&value))
}

const PARTITIONS: i32 = 2;
const SANITIZED_ID_OFFSET: u32 = 100;
const WAIT: Duration = Duration::from_secs(30);

fn kafka(e: impl std::fmt::Display) -> Error {
    Error::Kafka(format!("demo: {e}"))
}

fn io(e: std::io::Error) -> Error {
    Error::io("demo", e)
}

/// The compose stack's sample producer: registers each example schema under `<topic>-value` (topics `customers`,
/// `payments`, `clicks`) and sends its sample events framed with the registered id. Returns how many were sent.
pub async fn produce_samples(brokers: &str, registry: &str) -> Result<usize, Error> {
    let registry = stream::registry::RegistryClient::new(registry).map_err(Error::Unavailable)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .map_err(kafka)?;
    let mut sent = 0;
    // Plain JSON topics have no schema id: they need a local binding, not the registry.
    for example in EXAMPLES.iter().filter(|e| !e.plain) {
        let topic = example.topic.trim_start_matches("demo.");
        let schema = compile_any(example.schema, &crate::policy::PolicySettings::default())?;
        let schema_type = match schema.format {
            crate::policy::SchemaFormat::Avro => "AVRO",
            crate::policy::SchemaFormat::JsonSchema { .. } => "JSON",
            crate::policy::SchemaFormat::Protobuf(_) => "PROTOBUF",
        };
        let id = registry
            .register(&format!("{topic}-value"), example.schema, schema_type)
            .await
            .map_err(|e| Error::Unavailable(format!("registering the schema of {topic}: {e}")))?;
        for line in example.samples.lines().filter(|l| !l.trim().is_empty()) {
            let json: Json = serde_json::from_str(line).expect("the built-in samples are JSON");
            let framed = encode_sample(example, &schema, id, &json)?;
            producer
                .send(FutureRecord::<(), _>::to(topic).payload(&framed), WAIT)
                .await
                .map_err(|(e, _)| kafka(e))?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// Runs the demo, printing to `out`.
pub async fn run(out: &mut impl Write) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("piiwall-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let result = run_in(&dir, out).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, out: &mut impl Write) -> Result<(), Error> {
    let cluster = MockCluster::new(1).map_err(kafka)?;
    let brokers = cluster.bootstrap_servers();
    for example in &EXAMPLES {
        for topic in [example.topic.to_owned(), format!("{}.sanitized", example.topic)] {
            cluster.create_topic(&topic, PARTITIONS, 1).map_err(kafka)?;
        }
    }
    cluster.create_topic("demo.quarantine", 1, 1).map_err(kafka)?;
    cluster.create_topic("demo.audit", 1, 1).map_err(kafka)?;
    cluster.create_topic("demo.control", 1, 1).map_err(kafka)?;

    let kek = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    std::fs::write(dir.join("kek.key"), kek).map_err(io)?;
    let mut text = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\ncontrol_topic = \"demo.control\"\n\n[kafka]\nbrokers = \"{brokers}\"\n\
         group_id = \"piiwall-demo\"\ninputs = [{inputs}]\nquarantine_topic = \"demo.quarantine\"\n\n\
         [pipeline]\nbatch_size = 100\ncommit_interval_ms = 100\n\n[audit]\ntopic = \"demo.audit\"\ninstance = \"demo\"\n\n[http]\nlisten = \"off\"\n\n\
         [policy.detect]\nmode = \"redact\"\n",
        dir = dir.display(),
        inputs = EXAMPLES
            .iter()
            .map(|e| format!("\"{}\"", e.topic))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut schemas = Vec::new();
    for example in &EXAMPLES {
        let path: PathBuf = dir.join(example.file);
        std::fs::write(&path, example.schema).map_err(io)?;
        text.push_str(&format!(
            "\n[[schemas.local]]\ntopic = \"{}\"\nschema = \"{}\"\nid = {}\nsanitized_id = {}\nkey = \"keep\"\nformat = \"{}\"\n",
            example.topic,
            path.display(),
            example.id,
            example.id + SANITIZED_ID_OFFSET,
            if example.plain { "json" } else { "confluent" },
        ));
        schemas.push(compile_any(example.schema, &crate::policy::PolicySettings::default())?);
    }
    let config = Config::parse(&text, std::iter::empty(), "the demo's config")?;

    // Raw records, as producers write them: Confluent wire format, schema id in front.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .map_err(kafka)?;
    let mut raw: Vec<(String, i32, i64, Json)> = Vec::new();
    for (example, schema) in EXAMPLES.iter().zip(&schemas) {
        for (i, line) in example.samples.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let json: Json = serde_json::from_str(line).expect("the built-in samples are JSON");
            let framed = encode_sample(example, schema, example.id, &json)?;
            let partition = i as i32 % PARTITIONS;
            let delivery = producer
                .send(
                    FutureRecord::<(), _>::to(example.topic)
                        .partition(partition)
                        .payload(&framed),
                    WAIT,
                )
                .await
                .map_err(|(e, _)| kafka(e))?;
            raw.push((example.topic.to_owned(), partition, delivery.offset, json));
        }
    }
    producer
        .send(
            FutureRecord::<(), _>::to("demo.payments")
                .partition(0)
                .payload("card=4111111111111111;name=Eve"),
            WAIT,
        )
        .await
        .map_err(|(e, _)| kafka(e))?;

    // The firewall, until every record came out.
    let shutdown = Shutdown::new();
    let pipeline = tokio::spawn(server::run(config.clone(), shutdown.clone()));
    let mut topics: Vec<String> = EXAMPLES.iter().map(|e| format!("{}.sanitized", e.topic)).collect();
    topics.push("demo.quarantine".to_owned());
    let expected = raw.len() + 1;
    let read_all = tokio::task::spawn_blocking({
        let brokers = brokers.clone();
        move || read(&brokers, &topics, expected)
    });
    let (quarantined, sanitized): (Vec<OwnedMessage>, Vec<OwnedMessage>) = read_all
        .await
        .map_err(kafka)?
        .into_iter()
        .partition(|m| m.topic() == "demo.quarantine");
    shutdown.trigger();
    let summary = pipeline.await.map_err(kafka)??;

    let w = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(io);
    w(
        out,
        "piiwall demo: raw topics -> piiwall -> sanitized topics, on an in-process Kafka mock cluster\n".into(),
    )?;
    for (topic, partition, offset, json) in &raw {
        let Some(message) = sanitized.iter().find(|m| {
            stream::header_text(m, SOURCE_TOPIC).as_deref() == Some(topic.as_str())
                && stream::header_text(m, SOURCE_PARTITION) == Some(partition.to_string())
                && stream::header_text(m, SOURCE_OFFSET) == Some(offset.to_string())
        }) else {
            continue;
        };
        let index = EXAMPLES.iter().position(|e| e.topic == topic).expect("a demo topic");
        let sanitized = sanitized_json(&EXAMPLES[index], &schemas[index], message.payload().unwrap_or_default())?;
        let form = match (EXAMPLES[index].plain, &schemas[index].format) {
            (true, _) => "plain JSON",
            (false, crate::policy::SchemaFormat::JsonSchema { .. }) => "JSON Schema",
            (false, crate::policy::SchemaFormat::Protobuf(_)) => "Protobuf",
            (false, crate::policy::SchemaFormat::Avro) => "Avro",
        };
        w(out, format!("{topic} [{form}; partition {partition}, offset {offset}]"))?;
        w(out, format!("  raw       {json}"))?;
        w(out, format!("  sanitized {sanitized}\n"))?;
    }
    for message in &quarantined {
        w(
            out,
            format!(
                "quarantined: {}",
                stream::header_text(message, REASON).unwrap_or_default()
            ),
        )?;
        w(
            out,
            "  (the original bytes are kept encrypted, for replay once the cause is fixed)\n".into(),
        )?;
    }
    w(
        out,
        format!(
            "{} records sanitized, {} quarantined\n",
            summary.sanitized, summary.quarantined
        ),
    )?;

    show_audit(&config, &brokers, out)?;
    show_reveal_and_forget(&config, &schemas[0], &sanitized, out)?;
    Ok(())
}

/// Prints the audit trail the run left, and checks its chain.
fn show_audit(config: &Config, brokers: &str, out: &mut impl Write) -> Result<(), Error> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    let keyring = Keyring::from_config(&config.keys)?;
    let report = crate::audit::verify(&client, "demo.audit", &keyring)?;
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&crate::audit::AUDIT_SCHEMA)
        .build()
        .expect("the audit schema resolves");
    writeln!(
        out,
        "audit trail (topic demo.audit; no value in clear, each event MACed over its predecessor):"
    )
    .map_err(io)?;
    let all = read(brokers, &["demo.audit".to_owned()], report.events);
    for message in &all {
        let Ok(value) = reader.read_value(&mut message.payload().unwrap_or_default()) else {
            continue;
        };
        let json = JsonCodec::new(&crate::audit::AUDIT_SCHEMA).to_json(&value);
        let mut line = format!("  #{} {}", json["seq"], json["kind"].as_str().unwrap_or_default());
        for key in ["topic", "partition", "offset", "reason"] {
            if !json[key].is_null() {
                line.push_str(&format!(" {key}={}", json[key]));
            }
        }
        if let Some(counts) = json["counts"].as_array().filter(|c| !c.is_empty()) {
            let rules: Vec<String> = counts
                .iter()
                .map(|c| {
                    format!(
                        "{}:{}",
                        c["field_path"].as_str().unwrap_or_default(),
                        c["action"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            if json["kind"] == "KEY_CREATED" {
                line.push_str(&format!(" keys={}", counts[0]["count"]));
            } else {
                line.push_str(&format!(" records={} rules=[{}]", counts[0]["count"], rules.join(" ")));
            }
        }
        writeln!(out, "{line}").map_err(io)?;
    }
    let verdict = report.first_break.unwrap_or_else(|| "every chain verifies".into());
    writeln!(out, "audit verify: {} events: {verdict}\n", report.events).map_err(io)?;
    Ok(())
}

/// Reveals the first customer's email, forgets that customer, and shows the token no longer reveals.
fn show_reveal_and_forget(
    config: &Config,
    schema: &CompiledSchema,
    sanitized: &[OwnedMessage],
    out: &mut impl Write,
) -> Result<(), Error> {
    let keyring = Arc::new(Keyring::from_config(&config.keys)?);
    let first = sanitized
        .iter()
        .filter(|m| stream::header_text(m, SOURCE_TOPIC).as_deref() == Some("demo.customers"))
        .find(|m| {
            stream::header_text(m, SOURCE_OFFSET).as_deref() == Some("0")
                && stream::header_text(m, SOURCE_PARTITION).as_deref() == Some("0")
        });
    let Some(first) = first else { return Ok(()) };
    let json = sanitized_json(&EXAMPLES[0], schema, first.payload().unwrap_or_default())?;
    let token = json["email"].as_str().unwrap_or_default();
    writeln!(out, "reveal --field email {token}").map_err(io)?;
    writeln!(out, "  -> {}", crate::sanitize::reveal(&keyring, "email", token)?).map_err(io)?;
    let destroyed = keyring.forget_subject("cus_0001")?;
    writeln!(out, "forget cus_0001  ({destroyed} key version destroyed)").map_err(io)?;
    match crate::sanitize::reveal(&keyring, "email", token) {
        Ok(_) => writeln!(out, "  -> still revealable: this is a bug").map_err(io)?,
        Err(e) => writeln!(out, "reveal --field email {token}\n  -> {e}").map_err(io)?,
    }
    Ok(())
}

/// Reads `topics` from the start until `count` records arrived, or the wait is over.
fn read(brokers: &str, topics: &[String], count: usize) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("piiwall-demo-reader-{:08x}", rand::random::<u32>()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(consumer) => consumer,
        Err(_) => return Vec::new(),
    };
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    if consumer.subscribe(&topics).is_err() {
        return Vec::new();
    }
    let start = Instant::now();
    let mut messages = Vec::new();
    while messages.len() < count && start.elapsed() < WAIT {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            messages.push(message.detach());
        }
    }
    messages
}

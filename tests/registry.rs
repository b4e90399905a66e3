//! The stream processor with a Schema Registry (rivven-schema, a Confluent-compatible registry held in memory,
//! installed by scripts/test-services): writer schemas resolved by id, sanitized schemas registered, and a registry
//! that goes away makes records wait, never quarantines them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::kafka::{broker, consume, create_topic, customer, framed, header, produce, run_until, unique};
use common::registry::{Registry, register};
use common::services::free_port;
use piiwall::config::Config;
use piiwall::policy::{PolicySettings, compile};
use piiwall::server;
use piiwall::stream::{self, Shutdown};
use rdkafka::Message;
use rdkafka::message::OwnedHeaders;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id};
use serde_json::Value as Json;

fn config(dir: &Path, input: &str, registry: &str) -> Config {
    config_with_keys(dir, input, registry, "hash")
}

/// As [`config`], with `schemas.key` set to `key`.
fn config_with_keys(dir: &Path, input: &str, registry: &str, key: &str) -> Config {
    let text = config_text(dir, input, registry, key);
    Config::parse(&text, std::iter::empty(), "registry test config").unwrap()
}

fn config_text(dir: &Path, input: &str, registry: &str, key: &str) -> String {
    std::fs::write(dir.join("kek.key"), "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\n[kafka]\nbrokers = \"{broker}\"\n\
         group_id = \"{group}\"\ninputs = [\"{input}\"]\nquarantine_topic = \"{input}.quarantine\"\n\
         [schemas]\nregistry = \"{registry}\"\nkey = \"{key}\"\n[pipeline]\ncommit_interval_ms = 100\n[audit]\ntopic = \"{input}.audit\"\n\
         [http]\nlisten = \"off\"\n",
        dir = dir.display(),
        broker = broker(),
        group = unique("piiwall"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_schemas_come_from_the_registry_and_sanitized_schemas_are_registered() {
    let registry = Registry::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let input = unique("reg-customers");
    create_topic(&input, 2).await;
    let text = common::example("customer_profile.avsc");
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    let id = register(&registry.url(), &format!("{input}-value"), &text).await;
    const N: usize = 20;
    let mut values: Vec<Vec<u8>> = (0..N).map(|i| framed(&schema, id, &customer(i))).collect();
    values.push(framed(&schema, id + 1000, &customer(999)));
    produce(
        &input,
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| ((i % 2) as i32, None, v, OwnedHeaders::new()))
            .collect(),
    )
    .await;

    let (out, quarantined) = run_until(config(dir.path(), &input, &registry.url()), &input, N, 1).await;

    assert_eq!(out.len(), N);
    let (sanitized_id, _) = stream::parse_frame(out[0].payload().unwrap()).unwrap();
    assert_ne!(
        sanitized_id, id,
        "outputs are framed with the sanitized schema's own id"
    );
    let registered = get_schema_by_id(sanitized_id, &SrSettings::new(registry.url()))
        .await
        .unwrap();
    let sanitized: Json = serde_json::from_str(&registered.schema).unwrap();
    assert_eq!(
        sanitized["pii.sanitized"], true,
        "the registered schema is the sanitized one"
    );
    let sanitized_schema = apache_avro::Schema::parse(&sanitized).unwrap();
    for message in &out {
        let (frame_id, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        assert_eq!(frame_id, sanitized_id);
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&sanitized_schema)
            .build()
            .unwrap();
        let value = reader
            .read_value(&mut &payload[..])
            .expect("decodes with the registered sanitized schema");
        assert!(
            !format!("{value:?}").contains("@example.com"),
            "no email leaves in clear"
        );
    }
    assert_eq!(quarantined.len(), 1, "an id the registry does not know is quarantined");
    let reason = String::from_utf8_lossy(header(&quarantined[0], stream::REASON).unwrap()).into_owned();
    assert!(reason.contains(&format!("no schema id {}", id + 1000)), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_while_the_registry_is_down_and_none_is_quarantined() {
    let port = free_port();
    let mut registry = Registry::start(port);
    let dir = tempfile::tempdir().unwrap();
    let input = unique("reg-outage");
    create_topic(&input, 2).await;
    let text = common::example("customer_profile.avsc");
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    let id = register(&registry.url(), &format!("{input}-value"), &text).await;
    registry.stop();

    const N: usize = 15;
    produce(
        &input,
        (0..N)
            .map(|i| {
                (
                    (i % 2) as i32,
                    None,
                    framed(&schema, id, &customer(i)),
                    OwnedHeaders::new(),
                )
            })
            .collect(),
    )
    .await;
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(
        config(dir.path(), &input, &format!("http://127.0.0.1:{port}")),
        shutdown.clone(),
    ));

    // While the registry is down: nothing out, nothing quarantined.
    let (output, quarantine) = (format!("{input}.sanitized"), format!("{input}.quarantine"));
    let during = tokio::task::spawn_blocking({
        let (output, quarantine) = (output.clone(), quarantine.clone());
        move || {
            (
                consume(&output, 1, Duration::from_secs(4)),
                consume(&quarantine, 1, Duration::from_secs(1)),
            )
        }
    })
    .await
    .unwrap();
    assert!(
        during.0.is_empty() && during.1.is_empty(),
        "records wait for the registry"
    );

    // The registry comes back (in memory: its schemas are registered again, the first one getting its id back).
    let registry = Registry::start(port);
    assert_eq!(register(&registry.url(), &format!("{input}-value"), &text).await, id);
    let out = tokio::task::spawn_blocking(move || consume(&output, N, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out.len(), N, "every record arrives once the registry answers");
    let late = tokio::task::spawn_blocking(move || consume(&quarantine, 1, Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(late.is_empty(), "nothing was quarantined for the outage");
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

/// A key schema: the customer id is tokenized under the domain key (deterministic, so partitioning by key and
/// compaction still work); the region passes.
const KEY_SCHEMA: &str = r#"{"type": "record", "name": "CustomerKey", "namespace": "test.keys",
  "fields": [{"name": "customer_id", "type": "string", "pii": "tokenize"}, {"name": "region", "type": "string"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_keys_are_sanitized_by_their_key_schema_registered_under_key() {
    let registry = Registry::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let input = unique("reg-keys");
    create_topic(&input, 2).await;
    let text = common::example("customer_profile.avsc");
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    let key_schema = compile(KEY_SCHEMA, &PolicySettings::default()).unwrap();
    let id = register(&registry.url(), &format!("{input}-value"), &text).await;
    let key_id = register(&registry.url(), &format!("{input}-key"), KEY_SCHEMA).await;

    // Customers 0..N/2, twice each, keyed by their customer id. (The key schema names no subject of its own, so keys
    // are protected with the keys of their value's subject: forgetting the customer covers them too.)
    const N: usize = 12;
    let key_of = |i: usize| {
        framed(
            &key_schema,
            key_id,
            &serde_json::json!({"customer_id": format!("cus_{:05}", i % (N / 2)), "region": "eu-west"}),
        )
    };
    let mut records: Vec<common::kafka::Outgoing> = (0..N)
        .map(|i| {
            (
                0,
                Some(key_of(i)),
                framed(&schema, id, &customer(i % (N / 2))),
                OwnedHeaders::new(),
            )
        })
        .collect();
    records.push((
        0,
        Some(b"cus_00001".to_vec()),
        framed(&schema, id, &customer(1)),
        OwnedHeaders::new(),
    ));
    produce(&input, records).await;

    let (out, quarantined) = run_until(
        config_with_keys(dir.path(), &input, &registry.url(), "avro"),
        &input,
        N,
        1,
    )
    .await;

    assert_eq!(out.len(), N);
    let settings = SrSettings::new(registry.url());
    let (sanitized_key_id, _) = stream::parse_frame(out[0].key().unwrap()).unwrap();
    let registered = get_schema_by_id(sanitized_key_id, &settings).await.unwrap();
    let registered: Json = serde_json::from_str(&registered.schema).unwrap();
    assert_eq!(registered["name"], "CustomerKey");
    assert_eq!(
        registered["pii.sanitized"], true,
        "the sanitized key schema is registered"
    );
    let latest = schema_registry_converter::async_impl::schema_registry::get_schema_by_subject(
        &settings,
        &schema_registry_converter::schema_registry_common::SubjectNameStrategy::TopicNameStrategy(
            format!("{input}.sanitized"),
            true,
        ),
    )
    .await
    .unwrap();
    assert_eq!(latest.id, sanitized_key_id, "registered under <output topic>-key");

    let reader_schema = apache_avro::Schema::parse(&registered).unwrap();
    let mut keys_by_offset = Vec::new();
    for message in &out {
        let (frame_id, payload) = stream::parse_frame(message.key().unwrap()).unwrap();
        assert_eq!(frame_id, sanitized_key_id);
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&reader_schema)
            .build()
            .unwrap()
            .read_value(&mut &payload[..])
            .expect("the key decodes with the registered sanitized key schema");
        let text = format!("{value:?}");
        assert!(!text.contains("cus_0"), "no customer id leaves in clear: {text}");
        assert!(text.contains("eu-west"), "unannotated key fields pass: {text}");
        keys_by_offset.push((message.offset(), message.key().unwrap().to_vec()));
    }
    keys_by_offset.sort();
    for i in 0..N / 2 {
        assert_eq!(
            keys_by_offset[i].1,
            keys_by_offset[i + N / 2].1,
            "the same key gives the same sanitized key"
        );
        assert_ne!(keys_by_offset[i].1, keys_by_offset[(i + 1) % (N / 2)].1);
    }
    assert_eq!(quarantined.len(), 1, "a key that is not framed Avro is quarantined");
    let reason = String::from_utf8_lossy(header(&quarantined[0], stream::REASON).unwrap()).into_owned();
    assert!(reason.starts_with("key: not Confluent wire format"), "{reason}");
}

/// Every metric the shipped Grafana dashboard (docker/grafana/dashboards/piiwall.json) queries is exported under that
/// name by a running pipeline with a registry, subjects and a quarantined record (states at 0 included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/grafana/dashboards/piiwall.json"))
            .unwrap(),
    )
    .unwrap();
    let mut wanted: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("piiwall_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !wanted.contains(&name) {
                    wanted.push(name);
                }
            }
        }
    }
    assert!(wanted.len() >= 15, "the dashboard queries the metrics: {wanted:?}");

    let registry = Registry::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let input = unique("dash-customers");
    create_topic(&input, 1).await;
    let text = common::example("customer_profile.avsc");
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    let id = register(&registry.url(), &format!("{input}-value"), &text).await;
    // An address pasted into an untagged field: a detection (reported, the default).
    let mut pasted = customer(0);
    pasted["address"]["city"] = Json::from("write to leak@example.org");
    let mut values: Vec<Vec<u8>> = vec![framed(&schema, id, &pasted)];
    values.extend((1..10).map(|i| framed(&schema, id, &customer(i))));
    values.push(framed(&schema, id + 1000, &customer(99)));
    let records = values.into_iter().map(|v| (0, None, v, OwnedHeaders::new())).collect();
    produce(&input, records).await;
    // Lag is published from librdkafka's statistics: every second here, every 5 s by default.
    let text = config_text(dir.path(), &input, &registry.url(), "hash")
        + "[kafka.properties]\n\"statistics.interval.ms\" = \"1000\"\n";
    let config = Config::parse(&text, std::iter::empty(), "dashboard test config").unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server::run(config, shutdown.clone()));
    let output = format!("{input}.sanitized");
    let read = tokio::task::spawn_blocking(move || consume(&output, 10, Duration::from_secs(60)));
    assert_eq!(read.await.unwrap().len(), 10);

    let missing = |text: &str| -> Vec<String> {
        wanted
            .iter()
            .filter(|name| {
                !text
                    .lines()
                    .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            })
            .cloned()
            .collect()
    };
    // Beyond names (other tests of this process record into the same metrics): this run's own series and totals.
    let value = |text: &str, name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let topic = format!("topic=\"{input}\"");
    let lag = format!("piiwall_lane_lag{{{topic}");
    // The keyring's totals are published every few seconds, lag with librdkafka's statistics: waited for.
    let complete = |text: &str| {
        missing(text).is_empty()
            && value(text, "piiwall_keys_created_total ", &[]) >= 10.0
            && value(text, "piiwall_quarantined_total{", &[&topic]) >= 1.0
            && text.contains(&lag)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut rendered = piiwall::http::prometheus().render();
    while !complete(&rendered) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rendered = piiwall::http::prometheus().render();
    }
    shutdown.trigger();
    task.await.unwrap().unwrap();
    assert_eq!(missing(&rendered), Vec::<String>::new(), "exported:\n{rendered}");
    assert_eq!(
        value(&rendered, "piiwall_quarantined_total{", &[&topic, "reason=\"schema\""]),
        1.0,
        "the unknown schema id counts as a schema fault of this topic"
    );
    assert_eq!(
        value(&rendered, "piiwall_records_total{", &[&topic, "outcome=\"sanitized\""]),
        10.0
    );
    assert!(rendered.contains(&lag), "this topic's lag");
    assert!(
        value(&rendered, "piiwall_detections_total{", &[&topic]) >= 1.0,
        "the pasted address"
    );
    assert!(
        value(&rendered, "piiwall_keys_created_total ", &[]) >= 10.0,
        "a key per new subject, published"
    );
    assert!(value(&rendered, "piiwall_key_store_calls_total ", &[]) >= 1.0);
    assert!(
        value(
            &rendered,
            "piiwall_registry_seconds_count{",
            &["operation=\"register\""]
        ) >= 1.0
    );
    for value in ["example.com", "example.org", "cus_"] {
        assert!(!rendered.contains(value), "no value in a metric");
    }
}

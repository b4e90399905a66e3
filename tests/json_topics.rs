//! JSON topics end to end, against the real broker (Tansu) and registry (rivven-schema): Confluent-framed JSON
//! Schema records resolved through the registry, and plain JSON topics bound locally. The sanitized JSON Schema
//! piiwall registers is checked by an independent validator (the `jsonschema` crate); no input value leaves in
//! clear; tokens reveal to the original values with their types; malformed records go to quarantine with a reason
//! that names a field path, never a value.

mod common;

use std::path::Path;

use common::kafka::{broker, create_topic, header, produce, run_until, unique};
use common::registry::{Registry, register_typed};
use common::services::free_port;
use piiwall::config::Config;
use piiwall::stream;
use rdkafka::Message;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id};
use schema_registry_converter::schema_registry_common::SchemaType;
use serde_json::{Value as Json, json};

/// The sample orders (schemas/samples/order.jsonl) and every PII value in them.
fn orders() -> Vec<Json> {
    common::example("samples/order.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const ORDER_PII: [&str; 12] = [
    "ada.lovelace@example.com",
    "grace.hopper@example.com",
    "alan.turing@example.com",
    "+44 7700 900123",
    "Ada Lovelace",
    "Alan Turing",
    "12 St James's Square",
    "1 Navy Yard",
    "Hollymeade",
    "SW1Y 4JH",
    "For Charles",
    "newsletter",
];

fn framed_json(id: u32, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    stream::write_frame_header(id, &mut out);
    out.extend_from_slice(record);
    out
}

const KEK: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n";

fn config_text(dir: &Path, input: &str, schemas: &str) -> String {
    std::fs::write(dir.join("kek.key"), KEK).unwrap();
    format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\n[kafka]\nbrokers = \"{broker}\"\n\
         group_id = \"{group}\"\ninputs = [\"{input}\"]\nquarantine_topic = \"{input}.quarantine\"\n\
         {schemas}\n[pipeline]\ncommit_interval_ms = 100\n[audit]\ntopic = \"{input}.audit\"\n[http]\nlisten = \"off\"\n",
        dir = dir.display(),
        broker = broker(),
        group = unique("piiwall"),
    )
}

fn assert_no_pii(messages: &[OwnedMessage], pii: &[&str]) {
    for message in messages {
        let mut everything = Vec::new();
        everything.extend_from_slice(message.payload().unwrap_or_default());
        everything.extend_from_slice(message.key().unwrap_or_default());
        if let Some(headers) = message.headers() {
            use rdkafka::message::Headers;
            for header in headers.iter() {
                everything.extend_from_slice(header.value.unwrap_or_default());
            }
        }
        let text = String::from_utf8_lossy(&everything);
        for value in pii {
            assert!(!text.contains(value), "{value} left in clear: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_records_arrive_sanitized_and_valid_under_the_registered_schema() {
    let registry = Registry::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let input = unique("json-orders");
    create_topic(&input, 2).await;
    let text = common::example("order.schema.json");
    let id = register_typed(&registry.url(), &format!("{input}-value"), &text, SchemaType::Json).await;

    let orders = orders();
    let mut values: Vec<Vec<u8>> = orders
        .iter()
        .map(|o| framed_json(id, o.to_string().as_bytes()))
        .collect();
    // Poison: bytes that are not JSON, and a record whose email is a number.
    values.push(framed_json(id, br#"{"order_id": "ord_9", "email": "x@example.com" "#));
    let mut wrong = orders[0].clone();
    wrong["shipping"]["street"] = json!(42);
    values.push(framed_json(id, wrong.to_string().as_bytes()));
    // A forgotten subject's record that cannot be sanitized: its quarantined copy keeps no content (its subject is
    // read from the JSON even though the record does not convert).
    let mut forgotten = orders[2].clone();
    forgotten["customer_id"] = json!("cus_0009");
    forgotten["placed_at"] = json!("yesterday");
    values.push(framed_json(id, forgotten.to_string().as_bytes()));
    std::fs::write(dir.path().join("kek.key"), KEK).unwrap();
    common::keyring_at_with(dir.path(), KEK)
        .forget_subject("cus_0009")
        .unwrap();
    produce(
        &input,
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| ((i % 2) as i32, None, v, OwnedHeaders::new()))
            .collect(),
    )
    .await;

    let config = Config::parse(
        &config_text(
            dir.path(),
            &input,
            &format!("[schemas]\nregistry = \"{}\"\n", registry.url()),
        ),
        std::iter::empty(),
        "json test config",
    )
    .unwrap();
    let (out, quarantined) = run_until(config, &input, orders.len(), 3).await;
    assert_eq!(out.len(), orders.len());

    // The registered sanitized schema, read back through a third-party registry client and compiled by an
    // independent JSON Schema validator, accepts every output record.
    let (sanitized_id, _) = stream::parse_frame(out[0].payload().unwrap()).unwrap();
    assert_ne!(sanitized_id, id);
    let registered = get_schema_by_id(sanitized_id, &SrSettings::new(registry.url()))
        .await
        .unwrap();
    assert_eq!(registered.schema_type, SchemaType::Json, "registered as a JSON schema");
    let sanitized_schema: Json = serde_json::from_str(&registered.schema).unwrap();
    assert_eq!(sanitized_schema["pii.sanitized"], true);
    let validator = jsonschema::validator_for(&sanitized_schema).expect("the sanitized schema is a valid JSON Schema");
    let mut by_order = std::collections::HashMap::new();
    for message in &out {
        let (frame_id, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        assert_eq!(frame_id, sanitized_id);
        let record: Json = serde_json::from_slice(payload).expect("the output is JSON");
        if let Err(e) = validator.validate(&record) {
            panic!("output does not validate against the registered schema: {e}");
        }
        by_order.insert(record["order_id"].as_str().unwrap().to_owned(), record);
    }
    assert_no_pii(&out, &ORDER_PII);

    // What each action did, property by property.
    let first = &by_order["ord_1001"];
    assert!(
        first["customer_id"].as_str().unwrap().starts_with("pwt1."),
        "the subject is tokenized"
    );
    assert!(
        first["email"].as_str().unwrap().starts_with("pwe2."),
        "tag PII -> encrypt"
    );
    assert_eq!(first["shipping"]["postcode"], "******JH", "masked, last 2 kept");
    assert_eq!(first["shipping"]["city"], "London", "untagged fields pass");
    assert!(
        first["lines"][0].get("gift_message").is_none(),
        "redacted (optional: left out)"
    );
    assert_eq!(first["lines"][0]["unit_price"], 1843.0);
    let (key, value) = first["attributes"].as_object().unwrap().iter().next().unwrap();
    assert!(
        key.starts_with("pwh1.") && value.as_str().unwrap().starts_with("pwh1."),
        "map keys hashed too"
    );
    let second = &by_order["ord_1002"];
    assert!(
        second.get("coupon_owner").is_none(),
        "an undeclared property is dropped"
    );
    assert!(second.get("phone").is_none(), "a null optional stays absent");

    // Reversible fields reveal to the originals, with their types.
    let keyring = common::keyring_at_with(
        dir.path(),
        &std::fs::read_to_string(dir.path().join("kek.key")).unwrap(),
    );
    for (context, expected) in [
        ("email", json!("ada.lovelace@example.com")),
        ("phone", json!("+44 7700 900123")),
        ("shipping.street", json!("12 St James's Square")),
        ("customer_id", json!("cus_0001")),
    ] {
        let token = first
            .pointer(&format!("/{}", context.replace('.', "/")))
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(
            piiwall::sanitize::reveal(&keyring, context, token).unwrap(),
            expected,
            "{context}"
        );
    }

    // Quarantine: every poison record, with reasons that name a field path or the fault, never a value.
    assert_eq!(quarantined.len(), 3);
    let reasons: Vec<String> = quarantined
        .iter()
        .map(|m| String::from_utf8_lossy(header(m, stream::REASON).unwrap()).into_owned())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("not JSON")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("shipping.street")), "{reasons:?}");
    let dropped: Vec<&OwnedMessage> = quarantined
        .iter()
        .filter(|m| String::from_utf8_lossy(header(m, stream::REASON).unwrap()).contains("subject is forgotten"))
        .collect();
    assert_eq!(dropped.len(), 1, "{reasons:?}");
    assert!(
        dropped[0].payload().unwrap_or_default().is_empty(),
        "no content of a forgotten subject is kept"
    );
    for reason in &reasons {
        assert!(!reason.contains("x@example.com") && !reason.contains("42"), "{reason}");
    }
    assert_no_pii(&quarantined, &ORDER_PII);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_json_topic_bound_locally_gives_plain_json_and_can_quarantine_undeclared_properties() {
    let dir = tempfile::tempdir().unwrap();
    let input = unique("json-events");
    create_topic(&input, 1).await;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.schema.json");
    let event = |i: usize| {
        json!({"id": format!("e{i}"), "ts": 1764150000000_i64 + i as i64, "email": format!("person{i}@example.com"),
               "phone": "+1 555 0100", "name": format!("Person Number{i}"), "amount": 12.5, "country": "GB",
               "ip": "203.0.113.0", "card_number": "4111111111111111", "note": "ok"})
    };
    let mut values: Vec<Vec<u8>> = (0..5).map(|i| event(i).to_string().into_bytes()).collect();
    let mut extra = event(5);
    extra["ssn"] = json!("078-05-1120");
    values.push(extra.to_string().into_bytes());
    produce(
        &input,
        values.into_iter().map(|v| (0, None, v, OwnedHeaders::new())).collect(),
    )
    .await;

    let binding = format!(
        "[policy]\nundeclared = \"quarantine\"\n[[schemas.local]]\ntopic = \"{input}\"\nschema = \"{}\"\nformat = \"json\"\n",
        schema.display()
    );
    let config = Config::parse(
        &config_text(dir.path(), &input, &binding),
        std::iter::empty(),
        "json test",
    )
    .unwrap();
    let (out, quarantined) = run_until(config, &input, 5, 1).await;
    assert_eq!(out.len(), 5);
    for message in &out {
        let record: Json = serde_json::from_slice(message.payload().unwrap()).expect("plain JSON out, no framing");
        assert!(record["email"].as_str().unwrap().starts_with("pwt1."));
        assert_eq!(record["card_number"], "************1111");
        assert_eq!(record["ts"].as_i64().unwrap() / 1000, 1764150000);
    }
    let pii: Vec<String> = (0..6)
        .flat_map(|i| [format!("person{i}@example.com"), format!("Number{i}")])
        .collect();
    assert_no_pii(&out, &pii.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(quarantined.len(), 1, "policy.undeclared = \"quarantine\"");
    let reason = String::from_utf8_lossy(header(&quarantined[0], stream::REASON).unwrap()).into_owned();
    assert!(
        reason.contains("is not a field of the record") && !reason.contains("ssn"),
        "{reason}"
    );
}

//! Protobuf topics end to end, against the real broker (Tansu) and registry (rivven-schema): Confluent-framed
//! Protobuf records (schema id, message indexes, message) whose schema imports another registered file through a
//! reference arrive sanitized; the sanitized `.proto` piiwall registers, read back with a third-party registry
//! client and compiled with protox, decodes every output record with prost-reflect; no input value leaves in
//! clear; tokens reveal to the originals with their types; malformed bytes and an unknown message index go to
//! quarantine with a reason that never holds a value.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::kafka::{broker, create_topic, header, produce_values, run_until, unique};
use common::registry::Registry;
use common::services::free_port;
use piiwall::config::Config;
use piiwall::stream;
use prost::Message as _;
use prost_reflect::{DynamicMessage, MapKey, MessageDescriptor, Value};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id};
use schema_registry_converter::schema_registry_common::SchemaType;
use serde_json::json;

const ADDRESS: &str = r#"syntax = "proto3";
package common;
import "piiwall/pii.proto";
message Address {
  string street = 1 [(piiwall.pii).action = "tokenize"];
  string city = 2;
}
"#;

const CUSTOMER: &str = r#"syntax = "proto3";
package shop;
import "piiwall/pii.proto";
import "confluent/meta.proto";
import "common/address.proto";
message Customer {
  option (piiwall.subject) = "customer_id";
  string customer_id = 1 [(piiwall.pii).action = "tokenize"];
  string email = 2 [(confluent.field_meta).tags = "PII"];
  optional int32 age = 3 [(piiwall.pii).action = "tokenize"];
  common.Address home = 4;
  repeated string phones = 5 [(piiwall.pii) = { action: "mask", keep_last: 2 }];
  map<string, string> notes = 6 [(piiwall.pii).action = "hash"];
  bool vip = 7;
  Tier tier = 8;
  enum Tier { FREE = 0; GOLD = 1; }
}
"#;

const PII: [&str; 7] = [
    "ada@example.com",
    "grace@example.com",
    "12 St James's Square",
    "+44 7700 900123",
    "likes tea",
    "cus_0001",
    "cus_0002",
];

const KEK: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n";

fn customer(desc: &MessageDescriptor, id: &str, email: &str, age: Option<i32>) -> DynamicMessage {
    let mut m = DynamicMessage::new(desc.clone());
    m.set_field_by_name("customer_id", Value::String(id.into()));
    m.set_field_by_name("email", Value::String(email.into()));
    if let Some(age) = age {
        m.set_field_by_name("age", Value::I32(age));
    }
    let address = desc
        .get_field_by_name("home")
        .unwrap()
        .kind()
        .as_message()
        .unwrap()
        .clone();
    let mut home = DynamicMessage::new(address);
    home.set_field_by_name("street", Value::String("12 St James's Square".into()));
    home.set_field_by_name("city", Value::String("London".into()));
    m.set_field_by_name("home", Value::Message(home));
    m.set_field_by_name("phones", Value::List(vec![Value::String("+44 7700 900123".into())]));
    let notes = [(MapKey::String("diet".into()), Value::String("likes tea".into()))]
        .into_iter()
        .collect();
    m.set_field_by_name("notes", Value::Map(notes));
    m.set_field_by_name("vip", Value::Bool(true));
    m.set_field_by_name("tier", Value::EnumNumber(1));
    m
}

/// A Confluent-framed protobuf record: magic byte, schema id, message indexes, message.
fn framed(id: u32, indexes: &[u8], message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    stream::write_frame_header(id, &mut out);
    out.extend_from_slice(indexes);
    out.extend_from_slice(message);
    out
}

/// Registers a schema over the registry's REST API (Confluent's), returning its id.
async fn register(url: &str, subject: &str, body: serde_json::Value) -> u32 {
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/subjects/{subject}/versions"))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["id"].as_u64().unwrap() as u32
}

fn config_text(dir: &Path, input: &str, registry: &str) -> String {
    std::fs::write(dir.join("kek.key"), KEK).unwrap();
    format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\n[kafka]\nbrokers = \"{broker}\"\n\
         group_id = \"{group}\"\ninputs = [\"{input}\"]\nquarantine_topic = \"{input}.quarantine\"\n\
         [schemas]\nregistry = \"{registry}\"\n[pipeline]\ncommit_interval_ms = 100\n[audit]\ntopic = \"{input}.audit\"\n\
         [http]\nlisten = \"off\"\n",
        dir = dir.display(),
        broker = broker(),
        group = unique("piiwall"),
    )
}

fn everything(message: &OwnedMessage) -> String {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(message.payload().unwrap_or_default());
    bytes.extend_from_slice(message.key().unwrap_or_default());
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            bytes.extend_from_slice(header.value.unwrap_or_default());
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_records_arrive_sanitized_and_decode_with_the_registered_proto() {
    let registry = Registry::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let input = unique("proto-customers");
    create_topic(&input, 2).await;
    let settings = SrSettings::new(registry.url());
    // The imported file first, under its own subject; then the schema, naming it as a reference.
    let address_subject = format!("{input}-common-address");
    register(
        &registry.url(),
        &address_subject,
        json!({"schema": ADDRESS, "schemaType": "PROTOBUF"}),
    )
    .await;
    let references = json!([{"name": "common/address.proto", "subject": address_subject, "version": 1}]);
    let body = json!({"schema": CUSTOMER, "schemaType": "PROTOBUF", "references": references});
    let id = register(&registry.url(), &format!("{input}-value"), body).await;

    let files = HashMap::from([
        ("customer.proto".to_owned(), CUSTOMER.to_owned()),
        ("common/address.proto".to_owned(), ADDRESS.to_owned()),
    ]);
    let writer = common::protobuf::pool(files, "customer.proto")
        .get_message_by_name("shop.Customer")
        .unwrap();
    let records = [
        customer(&writer, "cus_0001", "ada@example.com", Some(36)),
        customer(&writer, "cus_0002", "grace@example.com", None),
    ];
    let mut values: Vec<Vec<u8>> = records.iter().map(|r| framed(id, &[0], &r.encode_to_vec())).collect();
    // Poison: a cut record, and a record that names a message the schema does not define first.
    let cut = records[0].encode_to_vec();
    values.push(framed(id, &[0], &cut[..cut.len() - 3]));
    values.push(framed(id, &[2, 2], &records[0].encode_to_vec()));
    produce_values(&input, values).await;

    let config = Config::parse(&config_text(dir.path(), &input, &registry.url()), [], "protobuf test").unwrap();
    let (out, quarantined) = run_until(config, &input, records.len(), 2).await;
    assert_eq!(out.len(), records.len());

    // The registered sanitized schema, read back through a third-party client, compiled by protox.
    let (sanitized_id, _) = stream::parse_frame(out[0].payload().unwrap()).unwrap();
    assert_ne!(sanitized_id, id);
    let registered = get_schema_by_id(sanitized_id, &settings).await.unwrap();
    assert_eq!(registered.schema_type, SchemaType::Protobuf);
    let sanitized_pool = common::protobuf::pool(
        HashMap::from([("sanitized.proto".to_owned(), registered.schema.clone())]),
        "sanitized.proto",
    );
    let sanitized = sanitized_pool.get_message_by_name("shop.Customer").unwrap();
    let mut by_age = HashMap::new();
    for message in &out {
        let (frame_id, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        assert_eq!(frame_id, sanitized_id);
        assert_eq!(payload[0], 0, "the message index path [0]");
        let decoded =
            DynamicMessage::decode(sanitized.clone(), &payload[1..]).expect("decodes with the registered proto");
        let text = everything(message);
        for value in PII {
            assert!(!text.contains(value), "{value} left in clear");
        }
        by_age.insert(decoded.has_field_by_name("age"), decoded);
    }
    let first = &by_age[&true];
    let field = |m: &DynamicMessage, name: &str| m.get_field_by_name(name).unwrap().into_owned();
    let text = |m: &DynamicMessage, name: &str| field(m, name).as_str().unwrap().to_owned();
    assert!(
        text(first, "customer_id").starts_with("pwt1."),
        "the subject is tokenized"
    );
    assert!(text(first, "email").starts_with("pwe2."), "tag PII -> encrypt");
    assert!(
        text(first, "age").starts_with("pwt1."),
        "an int32 becomes a token string"
    );
    let home = field(first, "home");
    assert_eq!(
        text(home.as_message().unwrap(), "city"),
        "London",
        "untagged fields pass"
    );
    assert_eq!(
        field(first, "phones").as_list().unwrap()[0].as_str(),
        Some("*************23")
    );
    assert_eq!(field(first, "vip"), Value::Bool(true));
    assert_eq!(
        field(first, "tier"),
        Value::I32(1),
        "an enum by number (int32 in the sanitized .proto)"
    );
    let notes = field(first, "notes");
    let (key, value) = notes.as_map().unwrap().iter().next().unwrap();
    let MapKey::String(key) = key else {
        panic!("a string key")
    };
    assert!(
        key.starts_with("pwh1.") && value.as_str().unwrap().starts_with("pwh1."),
        "map keys hashed too"
    );
    assert!(
        !by_age[&false].has_field_by_name("age"),
        "an absent optional stays absent"
    );

    // Reversible fields reveal to the originals, with their types.
    let keyring = common::keyring_at_with(dir.path(), KEK);
    let street = text(home.as_message().unwrap(), "street");
    for (context, token, expected) in [
        ("email", text(first, "email"), json!("ada@example.com")),
        ("age", text(first, "age"), json!(36)),
        ("home.street", street, json!("12 St James's Square")),
        ("customer_id", text(first, "customer_id"), json!("cus_0001")),
    ] {
        assert_eq!(
            piiwall::sanitize::reveal(&keyring, context, &token).unwrap(),
            expected,
            "{context}"
        );
    }

    // What `/v1/tokenize` computes for a Protobuf topic (the route's schema, the field's value read as its type):
    // the token the stream wrote, so analysts can filter by it.
    let references = HashMap::from([("common/address.proto".to_owned(), ADDRESS.to_owned())]);
    let compiled = piiwall::policy::compile_protobuf(CUSTOMER, &references, None, &Default::default()).unwrap();
    let sanitizer = piiwall::sanitize::Sanitizer::new(keyring.clone(), "default");
    let codec = piiwall::codec::json::JsonCodec::new(&compiled.writer);
    let age = codec.field_value("age", &json!(36)).unwrap();
    assert_eq!(
        sanitizer.token_for(&compiled, "age", Some("cus_0001"), &age).unwrap(),
        text(first, "age")
    );

    // Quarantine: both poison records, with reasons that never hold a value.
    assert_eq!(quarantined.len(), 2);
    let reasons: Vec<String> = quarantined
        .iter()
        .map(|m| String::from_utf8_lossy(header(m, stream::REASON).unwrap()).into_owned())
        .collect();
    assert!(reasons.iter().any(|r| r.contains("malformed protobuf")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("message index path [1]")),
        "{reasons:?}"
    );
    for message in &quarantined {
        let text = everything(message);
        for value in PII {
            assert!(!text.contains(value), "{value} left in clear in quarantine");
        }
    }
}

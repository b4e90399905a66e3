//! Property tests of JSON records (JSON Schema topics): the path `run` takes (JSON read into Avro binary, the
//! transcoder, the sanitized Avro written back as JSON) equals the reference path (JSON to an apache-avro `Value`,
//! `sanitize::apply`, the `Value` written as JSON) for the deterministic actions, at every nesting depth; the output
//! validates against the sanitized JSON Schema (an independent validator) and holds no protected value; every
//! truncation of a record is rejected; any bytes are refused or taken without a panic.

mod common;

use std::sync::LazyLock;

use piiwall::codec::json::JsonCodec;
use piiwall::codec::json_records::JsonRecords;
use piiwall::policy::{CompiledSchema, PolicySettings, Undeclared, compile_json_schema};
use piiwall::sanitize::apply;
use piiwall::transcode::{TranscodeScratch, Transcoder};
use proptest::prelude::*;
use serde_json::{Value as Json, json};

/// Every JSON Schema shape piiwall reads, with the deterministic actions (encrypt's nonces differ by design).
const SCHEMA: &str = r##"{
  "type": "object",
  "$defs": {"Token": {"type": "string", "pii": "tokenize"}},
  "required": ["id", "email", "contact", "visits"],
  "properties": {
    "id": {"type": "string"},
    "email": {"$ref": "#/$defs/Token"},
    "age": {"type": ["integer", "null"], "pii": "tokenize"},
    "score": {"type": "number", "pii": "hash"},
    "card": {"type": "string", "pii": {"action": "mask", "keep_last": 4}},
    "secret": {"type": "string", "pii": "redact"},
    "vip": {"type": "boolean"},
    "contact": {
      "type": "object",
      "required": ["phone"],
      "properties": {
        "phone": {"type": "string", "pii": "hash"},
        "street": {"type": "string", "pii": "tokenize"},
        "city": {"type": "string"}
      }
    },
    "visits": {"type": "array", "items": {"type": "object", "required": ["page"],
               "properties": {"page": {"type": "string"}, "referrer": {"type": "string", "pii": "mask"}}}},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}, "pii": "tokenize"},
    "channel": {"oneOf": [{"type": "string"}, {"type": "integer"}]}
  }
}"##;

struct Fixture {
    schema: CompiledSchema,
    transcoder: Transcoder,
    records: JsonRecords,
    validator: jsonschema::Validator,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let schema = compile_json_schema(SCHEMA, &PolicySettings::default()).unwrap();
    let transcoder = Transcoder::new(&schema).unwrap();
    let records = JsonRecords::new(&schema, Undeclared::Drop);
    let sanitized: Json = serde_json::from_str(schema.published_schema().0).unwrap();
    let validator = jsonschema::validator_for(&sanitized).unwrap();
    Fixture {
        schema,
        transcoder,
        records,
        validator,
    }
});

/// Text that is never a token, mask or hash of itself, and that the output must not carry.
fn secret() -> impl Strategy<Value = String> {
    "[a-z]{3,8}@[a-z]{3,6}\\.example".prop_map(|s| s)
}

fn record() -> impl Strategy<Value = (Json, Vec<String>)> {
    (
        secret(),
        prop::option::of(prop::option::of(0i64..1_000_000)),
        prop::option::of(-1e6f64..1e6),
        prop::option::of("[0-9]{12,16}"),
        prop::option::of(secret()),
        prop::option::of(any::<bool>()),
        (
            secret(),
            prop::option::of(secret()),
            prop::option::of("[A-Z][a-z]{2,8}"),
        ),
        prop::collection::vec(("/[a-z]{1,6}", prop::option::of(secret())), 0..4),
        prop::option::of(prop::collection::btree_map(secret(), secret(), 0..3)),
        prop::option::of(prop_oneof![
            "[a-z]{1,5}".prop_map(Json::from),
            (0i64..100).prop_map(Json::from)
        ]),
        prop::option::of(secret()),
    )
        .prop_map(
            |(email, age, score, card, secret_field, vip, (phone, street, city), visits, labels, channel, extra)| {
                let mut pii = vec![email.clone(), phone.clone()];
                let mut record = json!({"id": "r1", "email": email, "contact": {"phone": phone}, "visits": []});
                if let Some(age) = age {
                    record["age"] = age.map_or(Json::Null, Json::from);
                }
                if let Some(score) = score {
                    record["score"] = json!(score);
                }
                if let Some(card) = card {
                    record["card"] = json!(card);
                }
                if let Some(s) = secret_field {
                    pii.push(s.clone());
                    record["secret"] = json!(s);
                }
                if let Some(vip) = vip {
                    record["vip"] = json!(vip);
                }
                if let Some(street) = street {
                    pii.push(street.clone());
                    record["contact"]["street"] = json!(street);
                }
                if let Some(city) = city {
                    record["contact"]["city"] = json!(city);
                }
                for (page, referrer) in visits {
                    let mut visit = json!({"page": page});
                    if let Some(r) = referrer {
                        visit["referrer"] = json!(r);
                    }
                    record["visits"].as_array_mut().unwrap().push(visit);
                }
                if let Some(labels) = labels {
                    pii.extend(labels.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
                    record["labels"] = json!(labels);
                }
                if let Some(channel) = channel {
                    record["channel"] = channel;
                }
                if let Some(extra) = extra {
                    // An undeclared property: dropped, never passed on.
                    pii.push(extra.clone());
                    record["undeclared"] = json!(extra);
                }
                (record, pii)
            },
        )
}

/// The `run` path: JSON -> Avro binary -> transcoder -> sanitized Avro -> JSON.
fn stream_path(json: &[u8]) -> Result<Vec<u8>, String> {
    let f = &*FIXTURE;
    let converted = f.records.read(&f.schema, json).map_err(|e| e.to_string())?;
    let mut avro = Vec::new();
    f.transcoder
        .transcode(
            &f.schema,
            &converted.avro,
            &common::fixed_keys(),
            &mut TranscodeScratch::default(),
            &mut avro,
        )
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    f.records.write(&f.schema, &avro, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The reference path: JSON -> `Value` -> `apply` -> JSON.
fn reference_path(json: &Json) -> Json {
    let f = &*FIXTURE;
    let mut value = JsonCodec::records(&f.schema.writer, Undeclared::Drop, true)
        .to_value(json)
        .unwrap();
    apply(&f.schema.plan, &mut value, &common::fixed_keys()).unwrap();
    JsonCodec::records(&f.schema.sanitized, Undeclared::Quarantine, true).to_json(&value)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_stream_path_equals_the_reference_and_validates((record, pii) in record()) {
        let bytes = serde_json::to_vec(&record).unwrap();
        let out = stream_path(&bytes).unwrap();
        let parsed: Json = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(&parsed, &reference_path(&record));
        prop_assert!(FIXTURE.validator.is_valid(&parsed), "{}", parsed);
        let text = String::from_utf8(out).unwrap();
        for value in &pii {
            prop_assert!(!text.contains(value.as_str()), "{} left in clear", value);
        }
        prop_assert!(parsed.get("undeclared").is_none());
        prop_assert!(parsed.get("secret").is_none(), "redacted optional: absent");
    }

    #[test]
    fn every_truncation_is_rejected((record, _) in record()) {
        let bytes = serde_json::to_vec(&record).unwrap();
        for end in 0..bytes.len() {
            prop_assert!(stream_path(&bytes[..end]).is_err(), "a record cut at {} of {} was taken", end, bytes.len());
        }
    }

    #[test]
    fn any_bytes_are_refused_or_taken_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = stream_path(&bytes);
    }

    #[test]
    fn corrupted_records_never_panic((record, _) in record(), position in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = serde_json::to_vec(&record).unwrap();
        let at = position.index(bytes.len());
        bytes[at] = byte;
        if let Ok(out) = stream_path(&bytes) {
            let parsed: Json = serde_json::from_slice(&out).unwrap();
            prop_assert!(FIXTURE.validator.is_valid(&parsed));
        }
    }
}

/// Reads `json` by both JSON readers (the fast path to Avro binary, and the `Value` path), on another thread, and
/// gives their errors (`None` for one that read it), or panics if they take more than a minute.
fn read_both_within_a_minute(schema: apache_avro::Schema, json: Json) -> (Option<String>, Option<String>) {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let input_len = json.to_string().len();
        let fast = piiwall::codec::json_binary::encode(&schema, &json, input_len, true, &mut 0, &mut out).err();
        let value = JsonCodec::records(&schema, Undeclared::Drop, false)
            .to_value_counted(&json, input_len)
            .err();
        let _ = sender.send((fast.map(|e| e.to_string()), value.map(|e| e.to_string())));
    });
    receiver
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("read within a minute")
}

/// A union of records whose fields are such unions tried every branch at every level (the fourth attacker
/// review): 40 levels of unions of two records, the second naming the next level's first (~300 bytes of JSON),
/// asked the `Value` path for more than 2^40 tries. Each record's reading now has a budget of steps, shared by the
/// branches it tries, and the record is refused with the field named. (The fast path takes no references, and
/// without them a schema doubles in size with each such level.)
#[test]
fn nested_unions_cannot_make_a_small_record_read_for_ever() {
    let nested = |levels: usize| {
        let mut record = json!("not an int");
        for _ in 0..=levels {
            record = json!({ "x": record });
        }
        record
    };
    let levels = 40;
    let mut ty =
        json!({"type": "record", "name": format!("B{}", levels - 1), "fields": [{"name": "x", "type": "int"}]});
    ty = json!([
        {"type": "record", "name": format!("A{}", levels - 1), "fields": [{"name": "x", "type": "int"}]},
        ty
    ]);
    for level in (0..levels - 1).rev() {
        ty = json!([
            {"type": "record", "name": format!("A{level}"), "fields": [{"name": "x", "type": ty}]},
            {"type": "record", "name": format!("B{level}"), "fields": [{"name": "x", "type": format!("A{}", level + 1)}]}
        ]);
    }
    let two_branches =
        apache_avro::Schema::parse(&json!({"type": "record", "name": "R", "fields": [{"name": "x", "type": ty}]}))
            .unwrap();
    let (_, value) = read_both_within_a_minute(two_branches, nested(levels));
    assert!(value.as_deref().is_some_and(|e| e.contains("steps")), "{value:?}");
}

/// A missing field takes its default whole, and the record's JSON names it again: 2,000 empty objects of a record
/// whose default is 64 KiB of text asked for 128 MiB (a 1 MB record of them, gigabytes); the same with the 64 KiB
/// in a map default's key, or in 200 field names of 10 KB with small defaults (the fourth and fifth attacker
/// reviews). A record's defaults may take 16 MiB and 16 bytes more per byte of the record.
#[test]
fn defaults_cannot_make_a_small_record_huge() {
    let items_of = |fields: Json| {
        apache_avro::Schema::parse(&json!({"type": "record", "name": "R", "fields": [
            {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "I", "fields": fields}}}
        ]}))
        .unwrap()
    };
    let long_default = items_of(json!([{"name": "d", "type": "string", "default": "d".repeat(64 << 10)}]));
    let long_key = items_of(json!([
        {"name": "m", "type": {"type": "map", "values": "int"}, "default": {"k".repeat(64 << 10): 0}}
    ]));
    let long_names = items_of(Json::Array(
        (0..200)
            .map(|i| json!({"name": format!("{}{i}", "n".repeat(10_000)), "type": "int", "default": 0}))
            .collect(),
    ));
    for (what, schema, items) in [
        ("a long default", long_default, 2000),
        ("a long key in a map default", long_key, 2000),
        ("long names", long_names, 100),
    ] {
        let (fast, value) = read_both_within_a_minute(schema, json!({"items": vec![json!({}); items]}));
        for error in [fast, value] {
            assert!(
                error.as_deref().is_some_and(|e| e.contains("defaults")),
                "{what}: {error:?}"
            );
        }
    }
}

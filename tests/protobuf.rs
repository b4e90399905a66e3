//! Property tests of Protobuf records, checked against prost-reflect (an independent protobuf implementation):
//! - with nothing protected, a record read into Avro binary and written back decodes, with prost-reflect, to the
//!   message prost-reflect decoded from the input: every scalar type, packed and unpacked repeated fields, maps
//!   with string, integer and bool keys, nested and repeated messages, oneofs, optional fields;
//! - sanitized, the output decodes with descriptors compiled from the sanitized `.proto` piiwall registers; the
//!   fields left alone are equal, the protected ones hold none of the input's values;
//! - the codec accepts exactly the prefixes of a record that prost-reflect accepts (a protobuf message cut at a
//!   field boundary is a valid, shorter message), with the same content; any bytes are refused or taken without a
//!   panic.

mod common;

use std::collections::HashMap;
use std::sync::LazyLock;

use piiwall::codec::Records;
use piiwall::policy::{CompiledSchema, PolicySettings, Undeclared, Untagged, compile_protobuf};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use proptest::prelude::*;
use prost::Message as _;
use prost_reflect::{DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value};

const PLAIN: &str = r#"
syntax = "proto3";
package test;
message Everything {
  double d = 1;
  float f = 2;
  int32 i32 = 3;
  int64 i64 = 4;
  uint32 u32 = 5;
  uint64 u64 = 6;
  sint32 s32 = 7;
  sint64 s64 = 8;
  fixed32 fx32 = 9;
  fixed64 fx64 = 10;
  sfixed32 sf32 = 11;
  sfixed64 sf64 = 12;
  bool flag = 13;
  string text = 14;
  bytes blob = 15;
  Tier tier = 16;
  optional string maybe = 17;
  Inner inner = 18;
  repeated int32 numbers = 19;
  repeated string words = 20;
  repeated Inner inners = 21;
  map<string, string> labels = 22;
  map<int64, Inner> by_id = 23;
  map<bool, sint32> by_flag = 24;
  oneof choice {
    string name = 25;
    int64 code = 26;
  }
  enum Tier { FREE = 0; GOLD = 1; }
  message Inner { string a = 1; repeated fixed64 b = 2; }
}
"#;

const PROTECTED: &str = r#"
syntax = "proto3";
package shop;
import "piiwall/pii.proto";
import "confluent/meta.proto";
message Customer {
  option (piiwall.subject) = "id";
  string id = 1;
  string email = 2 [(piiwall.pii).action = "tokenize", (piiwall.pii).kind = "email"];
  optional int32 age = 3 [(piiwall.pii).action = "tokenize"];
  double score = 4 [(piiwall.pii).action = "hash"];
  string card = 5 [(piiwall.pii) = { action: "mask", keep_last: 4 }];
  string secret = 6 [(piiwall.pii).action = "redact"];
  bool vip = 7;
  Contact contact = 8;
  repeated Visit visits = 9;
  map<string, string> labels = 10 [(confluent.field_meta).tags = "PII"];
  map<int32, string> codes = 11;
  repeated string aliases = 12 [(piiwall.pii).action = "tokenize"];
  int64 visits_total = 13;
  message Contact {
    string phone = 1 [(piiwall.pii).action = "hash"];
    string street = 2 [(piiwall.pii).action = "tokenize"];
    string city = 3;
  }
  message Visit { string page = 1; string referrer = 2 [(piiwall.pii).action = "mask"]; }
}
"#;

struct Fixture {
    schema: CompiledSchema,
    transcoder: Transcoder,
    records: Records,
    input: MessageDescriptor,
    output: MessageDescriptor,
}

/// The message `message` of `.proto` text, compiled with protox independently of piiwall.
fn descriptors(text: &str, message: &str) -> MessageDescriptor {
    let files = HashMap::from([("schema.proto".to_owned(), text.to_owned())]);
    common::protobuf::pool(files, "schema.proto")
        .get_message_by_name(message)
        .expect("the message")
}

fn fixture(text: &str, input: &str, output: &str, untagged: Untagged) -> Fixture {
    let settings = PolicySettings {
        untagged,
        ..PolicySettings::default()
    };
    let schema = compile_protobuf(text, &HashMap::new(), None, &settings).unwrap();
    let transcoder = Transcoder::new(&schema).unwrap();
    let records = Records::for_schema(&schema, &transcoder, Undeclared::Drop, true)
        .unwrap()
        .unwrap();
    let sanitized = schema.published_schema().0.to_owned();
    Fixture {
        transcoder,
        records,
        input: descriptors(text, input),
        output: descriptors(&sanitized, output),
        schema,
    }
}

static PLAIN_FIXTURE: LazyLock<Fixture> =
    LazyLock::new(|| fixture(PLAIN, "test.Everything", "test.Everything", Untagged::Pass));
static PROTECTED_FIXTURE: LazyLock<Fixture> =
    LazyLock::new(|| fixture(PROTECTED, "shop.Customer", "shop.Customer", Untagged::Block));

/// The transcoder on a record's Avro binary, with fixed keys.
fn transcoded(f: &Fixture, avro: &[u8]) -> Result<Vec<u8>, String> {
    let mut sanitized = Vec::new();
    f.transcoder
        .transcode(
            &f.schema,
            avro,
            &common::fixed_keys(),
            &mut TranscodeScratch::default(),
            &mut sanitized,
        )
        .map_err(|e| e.to_string())?;
    Ok(sanitized)
}

/// The `run` path: protobuf transcoded directly, with fixed keys. Framed as the message index path `[0]`, and
/// written back so: the message alone is returned.
fn stream_path(f: &Fixture, bytes: &[u8]) -> Result<Vec<u8>, String> {
    direct(f, bytes).map(|(out, _)| out)
}

/// As [`stream_path`], with the count of undeclared fields dropped.
fn direct(f: &Fixture, bytes: &[u8]) -> Result<(Vec<u8>, usize), String> {
    direct_by(&f.records, f, bytes)
}

/// As [`direct`], with `records` (another `policy.undeclared`).
fn direct_by(records: &Records, f: &Fixture, bytes: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let Records::Protobuf(proto) = records else {
        panic!("protobuf records")
    };
    let framed = [&[0u8][..], bytes].concat();
    let mut out = vec![0xff];
    let dropped = proto
        .transcode(
            &f.schema,
            &framed,
            &common::fixed_keys(),
            &mut TranscodeScratch::default(),
            &mut out,
        )
        .map_err(|e| {
            assert_eq!(out, [0xff], "left as it was");
            e.to_string()
        })?;
    assert_eq!(out[..2], [0xff, 0], "the message index path [0]");
    Ok((out.split_off(2), dropped))
}

/// The conversion path (export and the demo read and write protobuf records so): protobuf -> Avro binary ->
/// transcoder -> sanitized Avro -> protobuf.
fn converted_path(f: &Fixture, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let framed = [&[0u8][..], bytes].concat();
    let (avro, _) = f.records.read(&f.schema, &framed).map_err(|e| e.to_string())?;
    let sanitized = transcoded(f, &avro)?;
    let mut out = Vec::new();
    f.records
        .write(&f.schema, &sanitized, &mut out)
        .map_err(|e| e.to_string())?;
    assert_eq!(out[0], 0, "the message index path [0]");
    Ok(out.split_off(1))
}

fn inner(desc: &MessageDescriptor, a: &str, b: &[u64]) -> DynamicMessage {
    let inner = desc.get_field_by_name("inner").unwrap().kind();
    let mut m = DynamicMessage::new(inner.as_message().unwrap().clone());
    m.set_field_by_name("a", Value::String(a.to_owned()));
    m.set_field_by_name("b", Value::List(b.iter().map(|v| Value::U64(*v)).collect()));
    m
}

prop_compose! {
    fn everything()(
        d in any::<f64>(), f in any::<f32>(), i32_ in any::<i32>(), i64_ in any::<i64>(), u32_ in any::<u32>(),
        u64_ in any::<u64>(), s32 in any::<i32>(), s64 in any::<i64>(), fx32 in any::<u32>(), fx64 in any::<u64>(),
        sf32 in any::<i32>(), sf64 in any::<i64>(), flag in any::<bool>(), text in ".{0,12}",
        blob in prop::collection::vec(any::<u8>(), 0..12), tier in 0i32..3, maybe in prop::option::of("[a-z]{0,5}"),
        inner_a in prop::option::of("[a-z]{0,5}"), numbers in prop::collection::vec(any::<i32>(), 0..5),
        words in prop::collection::vec(".{0,4}", 0..4), inners in prop::collection::vec("[a-z]{0,3}", 0..3),
        labels in prop::collection::btree_map("[a-z]{0,4}", ".{0,4}", 0..4),
        by_id in prop::collection::btree_map(any::<i64>(), "[a-z]{0,3}", 0..3),
        by_flag in prop::collection::btree_map(any::<bool>(), any::<i32>(), 0..2),
        choice in prop::option::of(prop_oneof!["[a-z]{0,4}".prop_map(Ok), any::<i64>().prop_map(Err)]),
    ) -> DynamicMessage {
        let desc = &PLAIN_FIXTURE.input;
        let mut m = DynamicMessage::new(desc.clone());
        m.set_field_by_name("d", Value::F64(d));
        m.set_field_by_name("f", Value::F32(f));
        m.set_field_by_name("i32", Value::I32(i32_));
        m.set_field_by_name("i64", Value::I64(i64_));
        m.set_field_by_name("u32", Value::U32(u32_));
        m.set_field_by_name("u64", Value::U64(u64_));
        m.set_field_by_name("s32", Value::I32(s32));
        m.set_field_by_name("s64", Value::I64(s64));
        m.set_field_by_name("fx32", Value::U32(fx32));
        m.set_field_by_name("fx64", Value::U64(fx64));
        m.set_field_by_name("sf32", Value::I32(sf32));
        m.set_field_by_name("sf64", Value::I64(sf64));
        m.set_field_by_name("flag", Value::Bool(flag));
        m.set_field_by_name("text", Value::String(text));
        m.set_field_by_name("blob", Value::Bytes(blob.into()));
        m.set_field_by_name("tier", Value::EnumNumber(tier));
        if let Some(maybe) = maybe {
            m.set_field_by_name("maybe", Value::String(maybe));
        }
        if let Some(a) = inner_a {
            m.set_field_by_name("inner", Value::Message(inner(desc, &a, &[1, u64::MAX])));
        }
        m.set_field_by_name("numbers", Value::List(numbers.into_iter().map(Value::I32).collect()));
        m.set_field_by_name("words", Value::List(words.into_iter().map(Value::String).collect()));
        let inners = inners.iter().map(|a| Value::Message(inner(desc, a, &[7]))).collect();
        m.set_field_by_name("inners", Value::List(inners));
        let labels = labels.into_iter().map(|(k, v)| (MapKey::String(k), Value::String(v))).collect();
        m.set_field_by_name("labels", Value::Map(labels));
        let by_id = by_id.into_iter().map(|(k, a)| (MapKey::I64(k), Value::Message(inner(desc, &a, &[])))).collect();
        m.set_field_by_name("by_id", Value::Map(by_id));
        let by_flag = by_flag.into_iter().map(|(k, v)| (MapKey::Bool(k), Value::I32(v))).collect();
        m.set_field_by_name("by_flag", Value::Map(by_flag));
        match choice {
            Some(Ok(name)) => m.set_field_by_name("name", Value::String(name)),
            Some(Err(code)) => m.set_field_by_name("code", Value::I64(code)),
            None => {}
        }
        m
    }
}

/// A message's fields encoded one by one, in an order `seed` picks, with the fields at `repeats` (taken modulo
/// their count) written again at the end: a protobuf reader takes each as the same message but for a repeated
/// singular field, whose last occurrence wins.
fn shuffled(message: &DynamicMessage, seed: u64, repeats: &[usize]) -> Vec<u8> {
    let mut chunks: Vec<Vec<u8>> = message
        .fields()
        .map(|(field, value)| {
            let mut one = DynamicMessage::new(message.descriptor());
            one.set_field(&field, value.clone());
            one.encode_to_vec()
        })
        .collect();
    let n = chunks.len() as u64;
    for i in 0..n {
        let j = (seed.rotate_left(i as u32 * 7) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % n;
        chunks.swap(i as usize, j as usize);
    }
    let again: Vec<Vec<u8>> = repeats
        .iter()
        .filter(|_| n > 0)
        .map(|r| chunks[r % n as usize].clone())
        .collect();
    chunks.extend(again);
    chunks.concat()
}

/// A message with each ciphertext (`pwe2.…`) cut down to its prefix, at any depth, and each field without presence
/// that holds its zero cleared (proto3 reads a zero written and a zero left out alike; piiwall writes a protected
/// field's zero so that an earlier occurrence cannot win).
fn without_ciphertexts(message: &DynamicMessage) -> DynamicMessage {
    fn value(v: &mut Value) {
        match v {
            Value::String(s) if s.starts_with("pwe2.") => *s = "pwe2".to_owned(),
            Value::Message(m) => *m = without_ciphertexts(m),
            Value::List(items) => items.iter_mut().for_each(value),
            Value::Map(entries) => entries.values_mut().for_each(value),
            _ => {}
        }
    }
    let mut out = message.clone();
    for (_, v) in out.fields_mut() {
        value(v);
    }
    for field in message.descriptor().fields() {
        if !field.supports_presence() && out.get_field(&field).as_ref() == &field.default_value() {
            out.clear_field(&field);
        }
    }
    out
}

/// A value piiwall must never let through: looks like an e-mail address, never a token, mask or hash of itself.
fn secret() -> impl Strategy<Value = String> {
    "[a-z]{4,8}@[a-z]{3,6}\\.example"
}

prop_compose! {
    fn customer()(
        email in secret(), age in prop::option::of(18i32..99), score in -1e6f64..1e6, card in "[0-9]{12,16}",
        secret_field in secret(), vip in any::<bool>(), phone in secret(), street in secret(), city in "[A-Z][a-z]{2,6}",
        visits in prop::collection::vec(("/[a-z]{1,6}", secret()), 0..3),
        labels in prop::collection::btree_map(secret(), secret(), 0..3),
        codes in prop::collection::btree_map(any::<i32>(), "[a-z]{1,4}", 0..3),
        aliases in prop::collection::vec(secret(), 0..3), total in any::<i64>(),
    ) -> (DynamicMessage, Vec<String>) {
        let desc = &PROTECTED_FIXTURE.input;
        let mut m = DynamicMessage::new(desc.clone());
        let mut pii = vec![email.clone(), secret_field.clone(), phone.clone(), street.clone()];
        m.set_field_by_name("id", Value::String("customer-1".to_owned()));
        m.set_field_by_name("email", Value::String(email));
        if let Some(age) = age {
            m.set_field_by_name("age", Value::I32(age));
        }
        m.set_field_by_name("score", Value::F64(score));
        m.set_field_by_name("card", Value::String(card));
        m.set_field_by_name("secret", Value::String(secret_field));
        m.set_field_by_name("vip", Value::Bool(vip));
        let contact_desc = desc.get_field_by_name("contact").unwrap().kind().as_message().unwrap().clone();
        let mut contact = DynamicMessage::new(contact_desc);
        contact.set_field_by_name("phone", Value::String(phone));
        contact.set_field_by_name("street", Value::String(street));
        contact.set_field_by_name("city", Value::String(city));
        m.set_field_by_name("contact", Value::Message(contact));
        let visit_desc = desc.get_field_by_name("visits").unwrap().kind().as_message().unwrap().clone();
        let visits = visits.into_iter().map(|(page, referrer)| {
            pii.push(referrer.clone());
            let mut v = DynamicMessage::new(visit_desc.clone());
            v.set_field_by_name("page", Value::String(page));
            v.set_field_by_name("referrer", Value::String(referrer));
            Value::Message(v)
        }).collect();
        m.set_field_by_name("visits", Value::List(visits));
        pii.extend(labels.iter().flat_map(|(k, v)| [k.clone(), v.clone()]));
        let labels = labels.into_iter().map(|(k, v)| (MapKey::String(k), Value::String(v))).collect();
        m.set_field_by_name("labels", Value::Map(labels));
        let codes = codes.into_iter().map(|(k, v)| (MapKey::I32(k), Value::String(v))).collect();
        m.set_field_by_name("codes", Value::Map(codes));
        pii.extend(aliases.iter().cloned());
        m.set_field_by_name("aliases", Value::List(aliases.into_iter().map(Value::String).collect()));
        m.set_field_by_name("visits_total", Value::I64(total));
        (m, pii)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn unprotected_records_round_trip_as_prost_reflect_reads_them(message in everything()) {
        let f = &*PLAIN_FIXTURE;
        let bytes = message.encode_to_vec();
        for out in [stream_path(f, &bytes).unwrap(), converted_path(f, &bytes).unwrap()] {
            let decoded = DynamicMessage::decode(f.output.clone(), &out[..]).unwrap();
            // Compared through the encoding of each (messages of two descriptors pools do not compare directly).
            let again = DynamicMessage::decode(f.input.clone(), &decoded.encode_to_vec()[..]).unwrap();
            prop_assert_eq!(again, DynamicMessage::decode(f.input.clone(), &bytes[..]).unwrap());
        }
    }

    /// The direct transcoder and the conversion path sanitize alike (every action here is deterministic), whatever
    /// order the fields come in and however often.
    #[test]
    fn the_direct_transcoder_sanitizes_as_the_conversion_path(
        (message, _) in customer(),
        order in any::<u64>(),
        repeats in prop::collection::vec(0usize..14, 0..3),
    ) {
        let f = &*PROTECTED_FIXTURE;
        let bytes = shuffled(&message, order, &repeats);
        let direct = DynamicMessage::decode(f.output.clone(), &stream_path(f, &bytes).unwrap()[..]).unwrap();
        let converted = DynamicMessage::decode(f.output.clone(), &converted_path(f, &bytes).unwrap()[..]).unwrap();
        // The map tagged PII is encrypted (random nonces): its ciphertexts are compared by their presence only.
        prop_assert_eq!(without_ciphertexts(&direct), without_ciphertexts(&converted));
    }

    #[test]
    fn sanitized_records_decode_with_the_sanitized_proto_and_hold_no_pii((message, pii) in customer()) {
        let f = &*PROTECTED_FIXTURE;
        let out = stream_path(f, &message.encode_to_vec()).unwrap();
        let decoded = DynamicMessage::decode(f.output.clone(), &out[..]).unwrap();
        for value in &pii {
            prop_assert!(!out.windows(value.len()).any(|w| w == value.as_bytes()), "{} left in clear", value);
        }
        // Left alone: equal.
        let field = |m: &DynamicMessage, name: &str| m.get_field_by_name(name).unwrap().into_owned();
        for name in ["vip", "visits_total"] {
            prop_assert_eq!(field(&decoded, name), field(&message, name));
        }
        let codes = |m: &DynamicMessage| format!("{:?}", m.get_field_by_name("codes").unwrap().as_map().unwrap().iter().map(|(k, v)| (format!("{k:?}"), v.as_str().unwrap().to_owned())).collect::<std::collections::BTreeMap<_, _>>());
        prop_assert_eq!(codes(&decoded), codes(&message));
        let city = |m: &DynamicMessage| field(field(m, "contact").as_message().unwrap(), "city");
        prop_assert_eq!(city(&decoded), city(&message));
        // Protected: tokens and hashes where the input had other types; the redacted field absent (empty).
        let text = |name: &str| field(&decoded, name).as_str().unwrap_or_default().to_owned();
        prop_assert!(!text("score").is_empty());
        if message.has_field_by_name("age") {
            prop_assert!(!text("age").is_empty());
        }
        prop_assert_eq!(text("secret"), "");
        prop_assert!(text("card").starts_with('*'));
    }

    #[test]
    fn prefixes_are_taken_exactly_when_prost_reflect_takes_them(message in everything()) {
        let f = &*PLAIN_FIXTURE;
        let bytes = message.encode_to_vec();
        for end in 0..bytes.len() {
            let ours = stream_path(f, &bytes[..end]);
            let reference = DynamicMessage::decode(f.input.clone(), &bytes[..end]);
            prop_assert_eq!(ours.is_ok(), reference.is_ok(), "a record cut at {} of {}: {:?}", end, bytes.len(), ours.err());
            if let (Ok(ours), Ok(reference)) = (ours, reference) {
                let decoded = DynamicMessage::decode(f.input.clone(), &ours[..]).unwrap();
                prop_assert_eq!(decoded, reference);
            }
        }
    }

    #[test]
    fn any_bytes_are_refused_or_taken_without_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = stream_path(&PLAIN_FIXTURE, &bytes);
        let _ = stream_path(&PROTECTED_FIXTURE, &bytes);
    }
}

#[test]
fn undeclared_fields_are_dropped_and_counted_or_refused() {
    let f = &*PROTECTED_FIXTURE;
    // Field 99 (a string) is not in the schema: in the record, and in its `contact` (field 8) beside the city.
    let stray = [&[0x9a, 0x06, 5][..], b"a@b.c"].concat();
    let contact = [&[0x1a, 2, b'O', b'x'][..], &stray].concat();
    let bytes = [&[0x0a, 1, b'x'][..], &stray, &[0x42, contact.len() as u8], &contact].concat();
    let framed = [&[0u8][..], &bytes].concat();
    let (_, dropped) = f.records.read(&f.schema, &framed).unwrap();
    assert_eq!(dropped, 2);
    let (out, dropped) = direct(f, &bytes).unwrap();
    assert_eq!(dropped, 2);
    assert!(!out.windows(5).any(|w| w == b"a@b.c"));
    let decoded = DynamicMessage::decode(f.output.clone(), &out[..]).unwrap();
    let sanitized_contact = decoded.get_field_by_name("contact").unwrap();
    let city = sanitized_contact
        .as_message()
        .unwrap()
        .get_field_by_name("city")
        .unwrap();
    assert_eq!(city.as_str(), Some("Ox"));
    let strict = Records::for_schema(&f.schema, &f.transcoder, Undeclared::Quarantine, true)
        .unwrap()
        .unwrap();
    for refused in [
        strict.read(&f.schema, &framed).err().unwrap().to_string(),
        direct_by(&strict, f, &bytes).unwrap_err(),
        direct_by(&strict, f, &[&[0x42, contact.len() as u8][..], &contact].concat()).unwrap_err(),
    ] {
        assert!(
            refused.contains("field number 99") && !refused.contains("a@b.c"),
            "{refused}"
        );
    }
}

#[test]
fn a_protected_field_with_the_wrong_wire_type_is_refused_without_its_value() {
    let f = &*PROTECTED_FIXTURE;
    // email (field 2, a string) sent as a varint.
    let refused = stream_path(f, &[0x0a, 1, b'x', 0x10, 0x05]).unwrap_err();
    assert!(refused.contains("email") && refused.contains("wire type"), "{refused}");
}

#[test]
fn framed_records_name_their_message_and_the_output_names_the_first() {
    let f = &*PROTECTED_FIXTURE;
    let framed = Records::for_schema(&f.schema, &f.transcoder, Undeclared::Drop, true)
        .unwrap()
        .unwrap();
    let message = [0x0a, 1, b'x'];
    for indexes in [&[0u8][..], &[2, 0][..]] {
        let payload = [indexes, &message[..]].concat();
        let (avro, _) = framed.read(&f.schema, &payload).unwrap();
        let sanitized = transcoded(f, &avro).unwrap();
        let mut out = Vec::new();
        framed.write(&f.schema, &sanitized, &mut out).unwrap();
        assert_eq!(out[0], 0, "the index path [0]");
    }
    let other = framed
        .read(&f.schema, &[&[2u8, 2][..], &message[..]].concat())
        .err()
        .unwrap()
        .to_string();
    assert!(other.contains("message index path [1]"), "{other}");
    let bad = framed.read(&f.schema, &[0x7f]).err().unwrap().to_string();
    assert!(bad.contains("message indexes"), "{bad}");
}

/// Empty items of a repeated message are two bytes each but read as every field of the message: a record of them
/// is refused rather than expanded into gigabytes.
#[test]
fn a_record_that_expands_beyond_its_budget_is_refused() {
    let fields: String = (1..=200).map(|n| format!("double a{n} = {n}; ")).collect();
    let text = format!("syntax = \"proto3\"; message R {{ repeated Item items = 1; }} message Item {{ {fields} }}");
    let settings = PolicySettings {
        untagged: Untagged::Pass,
        ..PolicySettings::default()
    };
    let schema = compile_protobuf(&text, &HashMap::new(), None, &settings).unwrap();
    let records = Records::for_schema(&schema, &Transcoder::new(&schema).unwrap(), Undeclared::Drop, true)
        .unwrap()
        .unwrap();
    let few: Vec<u8> = [&[0u8][..], &[0x0a, 0x00].repeat(10)].concat();
    assert!(records.read(&schema, &few).is_ok());
    let many: Vec<u8> = [&[0u8][..], &[0x0a, 0x00].repeat(100_000)].concat();
    let refused = records.read(&schema, &many).err().unwrap().to_string();
    assert!(refused.contains("expands"), "{refused}");
}

/// A `.proto` of a message `R` of repeated `Item`s, each of `fields` tokenized strings.
fn tokenized_items(fields: usize) -> String {
    let fields: String = (1..=fields)
        .map(|n| format!("string s{n} = {n} [(piiwall.pii).action = \"tokenize\"]; "))
        .collect();
    format!(
        "syntax = \"proto3\"; import \"piiwall/pii.proto\"; message R {{ repeated Item items = 1; }} \
         message Item {{ {fields} }}"
    )
}

/// Each empty item of a repeated message writes a token of every absent tokenized field's zero (~60 bytes each),
/// within the walk's budget: 500,000 items of 15 such fields (1 MB) asked for ~450 MB of output (the fifth
/// attacker review). A record's sanitized form may take 64 MiB, as in the Avro transcoder; past it the record is
/// refused with the message named.
#[test]
fn a_record_s_sanitized_form_is_bounded() {
    let text = tokenized_items(15);
    let schema = compile_protobuf(&text, &HashMap::new(), None, &PolicySettings::default()).unwrap();
    let records = Records::for_schema(&schema, &Transcoder::new(&schema).unwrap(), Undeclared::Drop, true)
        .unwrap()
        .unwrap();
    let Records::Protobuf(proto) = &records else {
        panic!("protobuf records")
    };
    let transcode = |items: usize| {
        let framed: Vec<u8> = [&[0u8][..], &[0x0a, 0x00].repeat(items)].concat();
        let mut out = Vec::new();
        proto
            .transcode(
                &schema,
                &framed,
                &common::fixed_keys(),
                &mut TranscodeScratch::default(),
                &mut out,
            )
            .map(|_| out.len())
            .map_err(|e| e.to_string())
    };
    assert!(transcode(10).is_ok());
    let refused = transcode(100_000).expect_err("refused");
    assert!(refused.contains("passes 64 MiB"), "{refused}");
}

/// A record that cannot be read whole still names its subject (its quarantined copy is sealed under the subject's
/// key, so a forget covers it): read leniently, last occurrence first, as the strict reader would.
#[test]
fn a_malformed_record_still_names_its_subject() {
    let f = &*PROTECTED_FIXTURE;
    // id = "cus-9" twice (the last wins: the same), then a string field cut short.
    let mut bytes = vec![0u8, 0x0a, 5];
    bytes.extend_from_slice(b"cus-9");
    bytes.extend_from_slice(&[0x0a, 5]);
    bytes.extend_from_slice(b"cus-9");
    bytes.extend_from_slice(&[0x12, 40, b'a']);
    assert!(f.records.read(&f.schema, &bytes).is_err());
    assert_eq!(f.records.subject(&f.schema, &bytes).as_deref(), Some("cus-9"));
    // Two different ids: no one subject to seal the copy under.
    let two = [&[0u8, 0x0a, 5][..], b"cus-1", &[0x0a, 5], b"cus-9"].concat();
    assert_eq!(f.records.subject(&f.schema, &two), None);
    assert_eq!(
        f.records.subject(&f.schema, &[0u8, 0x12, 1, b'x']),
        None,
        "no subject field"
    );
    // A record of another message (index path [1]) is not read as this one.
    let other = [&[2u8, 2][..], &bytes[1..]].concat();
    assert_eq!(f.records.subject(&f.schema, &other), None);
}

/// Occurrences of a singular message merge, each parsed whole: a first occurrence cut short cannot swallow the
/// next one's bytes (they would be read as an unprotected field, with a protected value in them).
#[test]
fn occurrences_of_a_message_are_parsed_each_on_its_own() {
    let f = &*PROTECTED_FIXTURE;
    // contact (field 8) twice: the first holds a city (field 3) whose length runs into the second occurrence.
    let email = b"ada@example.com";
    let mut second = vec![0x0a, email.len() as u8];
    second.extend_from_slice(email);
    let mut bytes = vec![0x42, 2, 0x1a, second.len() as u8];
    bytes.extend_from_slice(&[0x42, second.len() as u8]);
    bytes.extend_from_slice(&second);
    let refused = stream_path(f, &bytes).unwrap_err();
    assert!(refused.contains("contact"), "{refused}");
}

/// Of a oneof's members, the last on the wire is the one set (as protobuf reads it), and the sanitized `.proto`
/// declares the oneof again.
#[test]
fn the_last_member_of_a_oneof_wins() {
    let f = &*PLAIN_FIXTURE;
    // code = 7 (field 26), then name = "ab" (field 25): name wins, though piiwall writes fields in number order.
    let bytes = [0xd0, 0x01, 7, 0xca, 0x01, 2, b'a', b'b'];
    let out = stream_path(f, &bytes).unwrap();
    let decoded = DynamicMessage::decode(f.output.clone(), &out[..]).unwrap();
    let reference = DynamicMessage::decode(f.input.clone(), &bytes[..]).unwrap();
    assert!(!decoded.has_field_by_name("code"));
    assert_eq!(decoded.get_field_by_name("name").unwrap().as_str(), Some("ab"));
    assert!(!reference.has_field_by_name("code"), "prost-reflect reads it so too");
    assert!(
        f.schema.published_schema().0.contains("oneof choice {"),
        "{}",
        f.schema.published_schema().0
    );
}

fn decoded_field(f: &Fixture, out: &[u8], name: &str) -> Value {
    let decoded = DynamicMessage::decode(f.output.clone(), out).unwrap();
    decoded.get_field_by_name(name).unwrap().into_owned()
}

/// Every occurrence of a protected field is protected where it is: none is left in clear, and a reader takes the
/// last, as it took the input's.
#[test]
fn each_occurrence_of_a_protected_field_is_protected_and_the_last_wins() {
    let f = &*PROTECTED_FIXTURE;
    let (first, second) = (b"ada@example.com", b"bob@example.org");
    let both = [&[0x12, 15][..], first, &[0x12, 15], second].concat();
    let out = stream_path(f, &both).unwrap();
    for value in [first, second] {
        assert!(!out.windows(15).any(|w| w == value));
    }
    let last = stream_path(f, &[&[0x12, 15][..], second].concat()).unwrap();
    assert_eq!(decoded_field(f, &out, "email"), decoded_field(f, &last, "email"));
}

/// A proto3 field without presence reads as its zero when absent: a protected one is written as its sanitized zero,
/// the same whether the producer wrote the zero or left it out, and as the conversion path writes it.
#[test]
fn an_absent_protected_field_reads_as_its_sanitized_zero() {
    let f = &*PROTECTED_FIXTURE;
    // score (field 4, a double that is hashed): absent, then written as 0.0.
    let absent = [0x0a, 1, b'x'];
    let zero = [&absent[..], &[0x21, 0, 0, 0, 0, 0, 0, 0, 0]].concat();
    let score = |bytes: &[u8]| decoded_field(f, &stream_path(f, bytes).unwrap(), "score");
    assert!(
        score(&absent).as_str().is_some_and(|s| s.starts_with("pwh")),
        "{:?}",
        score(&absent)
    );
    assert_eq!(score(&absent), score(&zero));
    let converted = decoded_field(f, &converted_path(f, &absent).unwrap(), "score");
    assert_eq!(score(&absent), converted);
}

/// A nested message whose sanitized form outgrows a one-byte length gets a longer length prefix.
#[test]
fn a_nested_message_that_grows_gets_a_longer_length() {
    let f = &*PROTECTED_FIXTURE;
    // contact (field 8): street (tokenized) and city, 120 bytes in, well over 127 out.
    let (street, city) = ("s".repeat(60), "c".repeat(56));
    let contact = [&[0x12, 60][..], street.as_bytes(), &[0x1a, 56], city.as_bytes()].concat();
    assert!(contact.len() < 0x80);
    let out = stream_path(f, &[&[0x42, contact.len() as u8][..], &contact].concat()).unwrap();
    let contact = decoded_field(f, &out, "contact");
    let contact = contact.as_message().unwrap();
    assert_eq!(contact.get_field_by_name("city").unwrap().as_str(), Some(city.as_str()));
    let token = contact.get_field_by_name("street").unwrap();
    assert!(token.as_str().unwrap().starts_with("pwt1."), "{token:?}");
}

/// Occurrences of a singular message merge, in the output as in the input: a protected field of the first is not
/// overridden by the zero of a later one that leaves it out.
#[test]
fn occurrences_of_a_message_merge_in_the_output_as_in_the_input() {
    let f = &*PROTECTED_FIXTURE;
    // contact { street = "1 Main" }, then contact { city = "Paris" }.
    let bytes = [&[0x42, 8, 0x12, 6][..], b"1 Main", &[0x42, 7, 0x1a, 5], b"Paris"].concat();
    let direct = decoded_field(f, &stream_path(f, &bytes).unwrap(), "contact");
    let converted = decoded_field(f, &converted_path(f, &bytes).unwrap(), "contact");
    assert_eq!(direct, converted);
    let street = direct.as_message().unwrap().get_field_by_name("street").unwrap();
    let alone = stream_path(f, &[&[0x42, 8, 0x12, 6][..], b"1 Main"].concat()).unwrap();
    let alone = decoded_field(f, &alone, "contact");
    assert_eq!(street, alone.as_message().unwrap().get_field_by_name("street").unwrap());
}

const ORDER: &str = r#"
syntax = "proto3";
package shop;
import "piiwall/pii.proto";
message Order {
  option (piiwall.subject) = "customer.id";
  Customer customer = 1;
  string note = 2;
  message Customer { int64 id = 1; string email = 2 [(piiwall.pii).action = "tokenize"]; }
}
"#;

/// The subject the keys are chosen for is the subject a reader of the output sees: occurrences of the message that
/// holds it merge, so a later occurrence without the id does not make the subject 0 (sealing the record under
/// another subject's key, beyond the reach of a forget of the real one).
#[test]
fn the_subject_of_merged_occurrences_is_the_one_a_reader_sees() {
    let f = fixture(ORDER, "shop.Order", "shop.Order", Untagged::Block);
    let framed = |bytes: &[u8]| [&[0u8][..], bytes].concat();
    // customer { id = 5, email = "a@b.c" }, then customer { email = "c@d.e" }.
    let bytes = [
        &[0x0a, 9, 0x08, 5, 0x12, 5][..],
        b"a@b.c",
        &[0x0a, 7, 0x12, 5],
        b"c@d.e",
    ]
    .concat();
    assert_eq!(f.records.subject(&f.schema, &framed(&bytes)).as_deref(), Some("5"));
    let direct = decoded_field(&f, &stream_path(&f, &bytes).unwrap(), "customer");
    let converted = decoded_field(&f, &converted_path(&f, &bytes).unwrap(), "customer");
    assert_eq!(direct, converted);
    // Present without its id: 0, as proto3 reads it; absent: no subject.
    assert_eq!(f.records.subject(&f.schema, &framed(&[0x0a, 0])).as_deref(), Some("0"));
    assert_eq!(f.records.subject(&f.schema, &framed(&[0x12, 1, b'x'])), None);
    // Set, then a later occurrence sets it to another id: two subjects, none named (see
    // `a_record_naming_two_subjects_is_refused`).
    let twice = [0x0a, 2, 0x08, 5, 0x0a, 2, 0x08, 7];
    assert_eq!(f.records.subject(&f.schema, &framed(&twice)), None);
}

/// A record of many empty items of a message whose absent fields are each sanitized (a token per field per item)
/// is refused by the direct transcoder too, rather than expanded.
#[test]
fn the_direct_transcoder_keeps_the_expansion_budget() {
    let f = fixture(&tokenized_items(200), "R", "R", Untagged::Block);
    assert!(stream_path(&f, &[0x0a, 0x00].repeat(10)).is_ok());
    let refused = stream_path(&f, &[0x0a, 0x00].repeat(100_000)).unwrap_err();
    // The walk's budget, or (first, with this many tokens an item) the bound on the sanitized form.
    assert!(
        refused.contains("expands") || refused.contains("passes 64 MiB"),
        "{refused}"
    );
}

/// A oneof member that is redacted still wins the oneof when it came last, as it did in the input: written as its
/// zero, not left out (which would hand the oneof to the member before it).
#[test]
fn a_redacted_oneof_member_still_wins_its_oneof() {
    let text = r#"syntax = "proto3"; import "piiwall/pii.proto";
        message M { oneof contact { Note note = 1; string email = 2 [(piiwall.pii).action = "redact"]; }
                    message Note { string text = 1; } }"#;
    let f = fixture(text, "M", "M", Untagged::Block);
    // note { text = "hi" }, then email = "a@b.c".
    let bytes = [&[0x0a, 4, 0x0a, 2, b'h', b'i', 0x12, 5][..], b"a@b.c"].concat();
    let input = DynamicMessage::decode(f.input.clone(), &bytes[..]).unwrap();
    assert!(input.has_field_by_name("email") && !input.has_field_by_name("note"));
    let out = stream_path(&f, &bytes).unwrap();
    assert!(!out.windows(5).any(|w| w == b"a@b.c"));
    let decoded = DynamicMessage::decode(f.output.clone(), &out[..]).unwrap();
    assert!(!decoded.has_field_by_name("note"), "the note came before the email");
    assert_eq!(decoded.get_field_by_name("email").unwrap().as_str(), Some(""));
}

/// An occurrence of a protected field whose sanitized form is its zero (the mask of an empty string) is written
/// all the same: left out, the earlier occurrence's mask would win, where the input's last value is empty.
#[test]
fn a_later_empty_occurrence_still_wins() {
    let f = &*PROTECTED_FIXTURE;
    // card (field 5, masked keeping 4): "4111111111111111", then "".
    let bytes = [&[0x2a, 16][..], b"4111111111111111", &[0x2a, 0]].concat();
    let out = stream_path(f, &bytes).unwrap();
    assert_eq!(decoded_field(f, &out, "card").as_str(), Some(""));
}

const ORDER_ONEOF: &str = r#"
syntax = "proto3";
package shop;
import "piiwall/pii.proto";
message Order {
  option (piiwall.subject) = "customer.id";
  oneof party { Customer customer = 1; string note = 2; }
  message Customer { int64 id = 1; string email = 2 [(piiwall.pii).action = "tokenize"]; }
}
"#;

/// A record that names two subjects (its subject field written twice with different ids, or unset by a oneof after
/// it was named) is refused for the transcoder, to be quarantined: every occurrence is sanitized in place, so the
/// first subject's values would stay in the output under the second's keys (or the domain's), beyond a forget of
/// the first. The lenient reader (which seals a quarantined copy) names no subject for it.
#[test]
fn a_record_naming_two_subjects_is_refused() {
    let framed = |bytes: &[u8]| [&[0u8][..], bytes].concat();
    let order = fixture(ORDER, "shop.Order", "shop.Order", Untagged::Block);
    let Records::Protobuf(proto) = &order.records else {
        panic!("protobuf records")
    };
    let two = framed(&[0x0a, 2, 0x08, 5, 0x0a, 2, 0x08, 7]);
    let refused = proto.strict_subject("customer.id", &two).unwrap_err().to_string();
    assert!(
        refused.contains("more than once") && !refused.contains('5') && !refused.contains('7'),
        "{refused}"
    );
    assert_eq!(order.records.subject(&order.schema, &two), None);
    // The quarantine reads every subject it names (to keep nothing of a forgotten one), up to one past the limit.
    assert_eq!(proto.subjects_named("customer.id", &two), ["5", "7"]);
    let many: Vec<u8> = (1..=40u8).flat_map(|id| [0x0a, 2, 0x08, id]).collect();
    assert_eq!(
        proto.subjects_named("customer.id", &framed(&many)).len(),
        piiwall::codec::protobuf::MAX_NAMED + 1
    );
    let same = framed(&[0x0a, 2, 0x08, 5, 0x0a, 2, 0x08, 5]);
    assert_eq!(
        proto.strict_subject("customer.id", &same).unwrap().as_deref(),
        Some("5")
    );

    let oneof = fixture(ORDER_ONEOF, "shop.Order", "shop.Order", Untagged::Block);
    let Records::Protobuf(proto) = &oneof.records else {
        panic!("protobuf records")
    };
    // customer { id = 5, email = "a@b.c" }, then note = "" (which unsets the customer).
    let unset = framed(&[&[0x0a, 9, 0x08, 5, 0x12, 5][..], b"a@b.c", &[0x12, 0]].concat());
    assert!(proto.strict_subject("customer.id", &unset).is_err());
    // note, then the customer: named once.
    let named = framed(&[0x12, 0, 0x0a, 2, 0x08, 5]);
    assert_eq!(
        proto.strict_subject("customer.id", &named).unwrap().as_deref(),
        Some("5")
    );
}

/// A `uint64` or `fixed64` subject id is named by its unsigned value on every path (the direct reader, the
/// conversion through Avro, the value-level reader): it is the id a forget request names, and a forget of
/// 18446744073709551615 must cover the records whose id is that, not -1.
#[test]
fn an_unsigned_subject_id_is_named_as_unsigned_on_every_path() {
    for ty in ["uint64", "fixed64"] {
        let text = format!(
            "syntax = \"proto3\"; package shop; import \"piiwall/pii.proto\"; \
             message Account {{ option (piiwall.subject) = \"id\"; {ty} id = 1; \
             string email = 2 [(piiwall.pii).action = \"tokenize\"]; }}"
        );
        let f = fixture(&text, "shop.Account", "shop.Account", Untagged::Block);
        let mut account = DynamicMessage::new(f.input.clone());
        let id = u64::MAX - 6;
        account.set_field_by_name("id", Value::U64(id));
        account.set_field_by_name("email", Value::String("ada@example.com".into()));
        let framed = [&[0u8][..], &account.encode_to_vec()].concat();
        let named = id.to_string();
        assert_eq!(
            f.records.subject(&f.schema, &framed).as_deref(),
            Some(&*named),
            "{ty}: direct"
        );
        let Records::Protobuf(proto) = &f.records else {
            panic!("protobuf records")
        };
        assert_eq!(
            proto.strict_subject("id", &framed).unwrap().as_deref(),
            Some(&*named),
            "{ty}: strict"
        );
        assert_eq!(
            proto.subjects_named("id", &framed),
            std::slice::from_ref(&named),
            "{ty}: quarantine"
        );
        let (avro, _) = f.records.read(&f.schema, &framed).unwrap();
        assert_eq!(
            f.transcoder.subject(&avro).unwrap().as_deref(),
            Some(&*named),
            "{ty}: conversion"
        );
        let value = piiwall::codec::avro::ValueCodec::new(&f.schema).decode(&avro).unwrap();
        assert_eq!(
            piiwall::sanitize::subject_id(&f.schema.plan, &value)
                .unwrap()
                .as_deref(),
            Some(&*named),
            "{ty}: value"
        );
    }
}

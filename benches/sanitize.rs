//! Sanitizing one record of the 10-field event (4 PII fields: tokenize, encrypt x2, mask) with warm key caches.
//!
//! - `reference`: Avro binary -> apache-avro `Value` -> sanitize -> Avro binary with the sanitized schema;
//! - `transcoder`: Avro binary -> sanitized Avro binary, walking the bytes (what `run` uses);
//! - `sanitize_event_1kb/transcoder`: the same event grown to 1 KB by its untagged free-text note, in bytes/s;
//! - `sanitize_event_json/json_schema`: the same event as JSON with `schemas/event.schema.json`, JSON in and out.
//! - `sanitize_event_protobuf/transcoder`: the same event as protobuf with `schemas/event.proto`, protobuf in and
//!   out through the direct protobuf transcoder, keys per batch as `run`;
//!   `sanitize_event_protobuf/prost_reflect_reference`: the reference path, decoded into a prost-reflect
//!   `DynamicMessage`, its values sanitized by piiwall's value-level `sanitize::apply` (the reference Avro path's),
//!   set on a message of the sanitized `.proto`'s descriptor and encoded by prost-reflect, keys per batch as well
//!   (it runs no detectors, where the transcoder looks at the unprotected strings: its ratio understates);
//!   `sanitize_event_protobuf/prost_reflect_decode_encode`: only decoding the record into a `DynamicMessage` and
//!   encoding it again, no sanitizing.
//!
//! Both include resolving the record's keys through the keyring (warm cache): the reference path per record, the
//! transcoder once per batch of [`BATCH`] records, as `run` does, with the batch's encryptions then counted towards
//! the key's rotation limit. Reported as records per second, one thread.

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::config::DEFAULT_BATCH_SIZE;
use piiwall::config::DEFAULT_MAX_ENCRYPTIONS;
use piiwall::crypto::LocalKek;
use piiwall::keys::{KeyCacheSettings, Keyring, SqliteStore};
use piiwall::policy::{PolicySettings, compile};
use piiwall::sanitize::Sanitizer;
use piiwall::transcode::{TranscodeScratch, Transcoder};

/// Records per batch for the transcoder: `pipeline.batch_size`'s default.
const BATCH: usize = DEFAULT_BATCH_SIZE;

const EVENT: &str = r#"{"id": "evt-000001", "ts": 1764150400000, "email": "ada.lovelace@example.com", "phone": "+44 7700 900123", "name": "Ada Lovelace", "amount": 129.99, "country": "GB", "ip": "203.0.113.0", "card_number": "4111111111111111", "note": "first order, gift wrapped"}"#;

fn bench(c: &mut Criterion) {
    let schema_text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.avsc")).unwrap();
    let schema = compile(&schema_text, &PolicySettings::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let keyring = Keyring::open(
        store,
        Arc::new(LocalKek::from_bytes(&[7; 32]).unwrap()),
        KeyCacheSettings::default(),
    )
    .unwrap();
    let sanitizer = Sanitizer::new(Arc::new(keyring), "default");
    let raw = avro(&schema, &serde_json::from_str(EVENT).unwrap());
    let codec = ValueCodec::new(&schema);
    let mut out = Vec::with_capacity(512);

    let mut group = c.benchmark_group("sanitize_event");
    group.throughput(Throughput::Elements(1));
    group.bench_function("reference", |b| {
        b.iter(|| {
            let mut value = codec.decode(&raw).unwrap();
            sanitizer.sanitize(&schema, &mut value).unwrap();
            out.clear();
            codec.encode(&value, &mut out).unwrap();
            out.len()
        })
    });
    let transcoder = Transcoder::new(&schema).unwrap();
    let mut scratch = TranscodeScratch::default();
    let domain = sanitizer.domain_of(&schema.plan);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("transcoder", |b| {
        b.iter(|| one_batch(&sanitizer, &schema, &transcoder, domain, &raw, &mut scratch, &mut out))
    });
    // The pure core: the same transcoding with the record's keys resolved once.
    group.throughput(Throughput::Elements(1));
    let keys = sanitizer.keys_for_subject(&schema.plan, None).unwrap();
    group.bench_function("transcoder_core", |b| {
        b.iter(|| {
            out.clear();
            transcoder
                .transcode(&schema, &raw, &keys, &mut scratch, &mut out)
                .unwrap();
            out.len()
        })
    });
    group.finish();
    large_records(c, &schema, &sanitizer, &transcoder);
    json_records(c, &sanitizer);
    protobuf_records(c, &sanitizer);
}

/// The same event as a protobuf record of `schemas/event.proto`: protobuf in and out through the direct protobuf
/// transcoder, as `run` does, keys per batch; beside it, the prost-reflect reference path, and prost-reflect's decode
/// and encode alone.
fn protobuf_records(c: &mut Criterion, sanitizer: &Sanitizer) {
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value};
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.proto")).unwrap();
    let schema =
        piiwall::policy::compile_protobuf(&text, &Default::default(), None, &PolicySettings::default()).unwrap();
    let transcoder = Transcoder::new(&schema).unwrap();
    let records = piiwall::codec::Records::for_schema(&schema, &transcoder, piiwall::policy::Undeclared::Drop, true)
        .unwrap()
        .unwrap();
    let piiwall::codec::Records::Protobuf(proto) = &records else {
        unreachable!("a .proto schema's records are protobuf")
    };
    let domain = sanitizer.domain_of(&schema.plan);
    // The event encoded by prost-reflect, from descriptors compiled by protox.
    let descriptor = event_descriptor(&Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"), "event.proto");
    let mut event = DynamicMessage::new(descriptor.clone());
    let json: serde_json::Value = serde_json::from_str(EVENT).unwrap();
    for (name, value) in json.as_object().unwrap() {
        let value = match value {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Number(n) if name == "ts" => Value::I64(n.as_i64().unwrap()),
            serde_json::Value::Number(n) => Value::F64(n.as_f64().unwrap()),
            other => panic!("{other}"),
        };
        event.set_field_by_name(name, value);
    }
    let bytes = event.encode_to_vec();
    // Framed as `run` reads it: the message index path [0], then the message.
    let framed = [&[0u8][..], &bytes].concat();
    let (mut scratch, mut out) = (TranscodeScratch::default(), Vec::new());
    let mut group = c.benchmark_group("sanitize_event_protobuf");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("transcoder", |b| {
        b.iter(|| {
            let batch = sanitizer.keyring().prefetch([], [domain]).unwrap();
            for _ in 0..BATCH {
                let subject = records.subject(&schema, &framed);
                let keys = sanitizer
                    .keys_in(&schema.plan, subject.as_deref(), Some(&batch))
                    .unwrap();
                out.clear();
                proto
                    .transcode(&schema, &framed, &keys, &mut scratch, &mut out)
                    .unwrap();
            }
            sanitizer
                .keyring()
                .retire_worn(&batch, DEFAULT_MAX_ENCRYPTIONS)
                .unwrap();
            out.len()
        })
    });
    // The sanitized `.proto` piiwall registers, compiled by protox as a consumer would.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sanitized.proto"), schema.published_schema().0).unwrap();
    let sanitized_descriptor = event_descriptor(dir.path(), "sanitized.proto");
    let reference = |keys: &piiwall::sanitize::RecordKeys, out: &mut Vec<u8>| {
        let message = DynamicMessage::decode(descriptor.clone(), &bytes[..]).unwrap();
        let mut record = apache_avro::types::Value::Record(
            descriptor
                .fields()
                .map(|field| (field.name().to_owned(), to_avro(&message.get_field(&field))))
                .collect(),
        );
        piiwall::sanitize::apply(&schema.plan, &mut record, keys).unwrap();
        let apache_avro::types::Value::Record(fields) = record else {
            unreachable!("a record stays a record")
        };
        let mut sanitized = DynamicMessage::new(sanitized_descriptor.clone());
        for (name, value) in fields {
            sanitized.set_field_by_name(&name, from_avro(value));
        }
        out.clear();
        sanitized.encode(out).unwrap();
    };
    // The two paths agree (the encrypted fields, random each time, by their length).
    let keys = sanitizer.keys_for_subject(&schema.plan, None).unwrap();
    let mut by_reference = Vec::new();
    reference(&keys, &mut by_reference);
    out.clear();
    proto
        .transcode(&schema, &framed, &keys, &mut scratch, &mut out)
        .unwrap();
    let decode = |bytes: &[u8]| DynamicMessage::decode(sanitized_descriptor.clone(), bytes).unwrap();
    // The transcoder's output is framed as its input: the message index path [0] first.
    let (ours, theirs) = (decode(&out[1..]), decode(&by_reference));
    for field in sanitized_descriptor.fields() {
        let (a, b) = (ours.get_field(&field), theirs.get_field(&field));
        match field.name() {
            "phone" | "name" => {
                let len = |v: &Value| v.as_str().map(str::len);
                assert!(len(&a).is_some_and(|n| n > 0), "{} is a ciphertext", field.name());
                assert_eq!(len(&a), len(&b), "{}", field.name());
            }
            _ => assert_eq!(a, b, "{}", field.name()),
        }
        assert_eq!(ours.has_field(&field), theirs.has_field(&field), "{}", field.name());
    }
    group.bench_function("prost_reflect_reference", |b| {
        b.iter(|| {
            let batch = sanitizer.keyring().prefetch([], [domain]).unwrap();
            for _ in 0..BATCH {
                let keys = sanitizer.keys_in(&schema.plan, None, Some(&batch)).unwrap();
                reference(&keys, &mut out);
            }
            sanitizer
                .keyring()
                .retire_worn(&batch, DEFAULT_MAX_ENCRYPTIONS)
                .unwrap();
            out.len()
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("prost_reflect_decode_encode", |b| {
        b.iter(|| {
            let message = DynamicMessage::decode(descriptor.clone(), &bytes[..]).unwrap();
            out.clear();
            message.encode(&mut out).unwrap();
            out.len()
        })
    });
    group.finish();
}

/// The bench event's message in `file` under `dir`, compiled by protox (piiwall's and Google's imports resolved).
fn event_descriptor(dir: &Path, file: &str) -> prost_reflect::MessageDescriptor {
    let mut files = protox::file::ChainFileResolver::new();
    files.add(protox::file::IncludeFileResolver::new(dir.to_owned()));
    files.add(protox::file::IncludeFileResolver::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/proto"),
    ));
    files.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(files);
    compiler.include_imports(true).open_file(file).unwrap();
    compiler
        .descriptor_pool()
        .get_message_by_name("com.acme.bench.Event")
        .unwrap()
}

/// A scalar of the event as the Avro value of its field in the schema's translation.
fn to_avro(value: &prost_reflect::Value) -> apache_avro::types::Value {
    use apache_avro::types::Value as Avro;
    use prost_reflect::Value;
    match value {
        Value::String(s) => Avro::String(s.clone()),
        Value::I64(n) => Avro::Long(*n),
        Value::F64(x) => Avro::Double(*x),
        other => panic!("the event has no {other:?}"),
    }
}

/// A sanitized Avro value as the protobuf value of its field in the sanitized `.proto`.
fn from_avro(value: apache_avro::types::Value) -> prost_reflect::Value {
    use apache_avro::types::Value as Avro;
    use prost_reflect::Value;
    match value {
        Avro::String(s) => Value::String(s),
        Avro::Bytes(b) => Value::Bytes(b.into()),
        Avro::Long(n) => Value::I64(n),
        Avro::Double(x) => Value::F64(x),
        other => panic!("the sanitized event has no {other:?}"),
    }
}

/// The same event as a JSON record of `schemas/event.schema.json` (a Confluent JSON Schema topic, or a plain JSON
/// one): JSON in, read into Avro binary, transcoded, written back as JSON, as `run` does, keys per batch.
fn json_records(c: &mut Criterion, sanitizer: &Sanitizer) {
    use piiwall::codec::json_records::JsonRecords;
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.schema.json")).unwrap();
    let schema = piiwall::policy::compile_json_schema(&text, &PolicySettings::default()).unwrap();
    let transcoder = Transcoder::new(&schema).unwrap();
    let records = JsonRecords::new(&schema, piiwall::policy::Undeclared::Drop);
    let domain = sanitizer.domain_of(&schema.plan);
    let json = serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(EVENT).unwrap()).unwrap();
    let (mut scratch, mut avro, mut out) = (TranscodeScratch::default(), Vec::new(), Vec::new());
    let mut group = c.benchmark_group("sanitize_event_json");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("json_schema", |b| {
        b.iter(|| {
            let keys = sanitizer.keyring().prefetch([], [domain]).unwrap();
            for _ in 0..BATCH {
                let converted = records.read(&schema, &json).unwrap();
                avro.clear();
                sanitizer
                    .sanitize_binary_in(
                        &schema,
                        &transcoder,
                        &converted.avro,
                        Some(&keys),
                        &mut scratch,
                        &mut avro,
                    )
                    .unwrap();
                out.clear();
                records.write(&schema, &avro, &mut out).unwrap();
            }
            sanitizer.keyring().retire_worn(&keys, DEFAULT_MAX_ENCRYPTIONS).unwrap();
            out.len()
        })
    });
    group.finish();
}

/// Bytes of Avro in the large event: the size Kroxylicious publishes its figures for.
const LARGE: usize = 1024;

/// The same event grown to 1 KB by its untagged `note` (support-ticket prose, looked at by detection at its default,
/// `report`): the same four protected fields, keys per batch as `run`. Reported in bytes per second; records per
/// second are that divided by 1,024.
fn large_records(
    c: &mut Criterion,
    schema: &piiwall::policy::CompiledSchema,
    sanitizer: &Sanitizer,
    transcoder: &Transcoder,
) {
    let mut event: serde_json::Value = serde_json::from_str(EVENT).unwrap();
    let prose = "Customer asked for the parcel to be left with a neighbour; courier confirmed the slot. ";
    let mut note = String::new();
    let raw = loop {
        event["note"] = serde_json::Value::from(note.as_str());
        let raw = avro(schema, &event);
        if raw.len() >= LARGE {
            break raw;
        }
        // Grown one character at a time past the last whole sentence, to land on 1,024 bytes.
        let next = prose.chars().nth(note.len() % prose.len()).unwrap();
        note.push(next);
    };
    assert_eq!(raw.len(), LARGE);
    let domain = sanitizer.domain_of(&schema.plan);
    let mut scratch = TranscodeScratch::default();
    let mut out = Vec::with_capacity(2 * LARGE);
    let mut group = c.benchmark_group("sanitize_event_1kb");
    group.throughput(Throughput::Bytes((BATCH * LARGE) as u64));
    group.bench_function("transcoder", |b| {
        b.iter(|| one_batch(sanitizer, schema, transcoder, domain, &raw, &mut scratch, &mut out))
    });
    group.finish();
}

/// One batch of [`BATCH`] copies of `raw` as `run` sanitizes it: the domain's key resolved for the batch, then, after
/// it, the batch's encryptions counted towards the key's limit.
fn one_batch(
    sanitizer: &Sanitizer,
    schema: &piiwall::policy::CompiledSchema,
    transcoder: &Transcoder,
    domain: &str,
    raw: &[u8],
    scratch: &mut TranscodeScratch,
    out: &mut Vec<u8>,
) -> usize {
    let keys = sanitizer.keyring().prefetch([], [domain]).unwrap();
    for _ in 0..BATCH {
        out.clear();
        sanitizer
            .sanitize_binary_in(schema, transcoder, raw, Some(&keys), scratch, out)
            .unwrap();
    }
    sanitizer.keyring().retire_worn(&keys, DEFAULT_MAX_ENCRYPTIONS).unwrap();
    out.len()
}

/// A record given as JSON, in Avro binary under the schema.
fn avro(schema: &piiwall::policy::CompiledSchema, record: &serde_json::Value) -> Vec<u8> {
    let value = JsonCodec::new(&schema.writer).to_value(record).unwrap();
    let mut raw = Vec::new();
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema.writer)
        .build()
        .unwrap()
        .write_value_ref(&mut raw, &value)
        .unwrap();
    raw
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The PII detectors' cost: the 10-field event through the transcoder with detection off, reporting and
//! redacting over its unannotated strings (records per second, one thread, keys resolved once); and the detectors
//! alone over a 1 KB free-text field (bytes per second).

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use piiwall::codec::json::JsonCodec;
use piiwall::crypto::LocalKek;
use piiwall::detect::{DetectMode, DetectPolicy, Detectors, Found};
use piiwall::keys::{KeyCacheSettings, Keyring, SqliteStore};
use piiwall::policy::{PolicySettings, compile};
use piiwall::sanitize::Sanitizer;
use piiwall::transcode::{TranscodeScratch, Transcoder};

const EVENT: &str = r#"{"id": "evt-000001", "ts": 1764150400000, "email": "ada.lovelace@example.com", "phone": "+44 7700 900123", "name": "Ada Lovelace", "amount": 129.99, "country": "GB", "ip": "203.0.113.0", "card_number": "4111111111111111", "note": "first order, gift wrapped"}"#;

/// About 1 KB of support-ticket prose, with one address and one phone number in it.
fn free_text() -> String {
    let paragraph = "The customer called on 2024-05-06 about order ORD-2024-000123 (3 items, total $1,234.56) \
                     and asked us to update the delivery notes: leave the parcel with the neighbour at number 14, \
                     ring twice, and do not use the side gate since it is locked after 18:00. ";
    let mut text = paragraph.repeat(3);
    text.push_str("Reply to ann.lee@example.org or +44 7700 900123 before Friday. ");
    while text.len() < 1024 {
        text.push_str("Version 2.4.1 of the app was used. ");
    }
    text.truncate(1024);
    text
}

fn bench(c: &mut Criterion) {
    let schema_text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.avsc")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let keyring = Keyring::open(
        store,
        Arc::new(LocalKek::from_bytes(&[7; 32]).unwrap()),
        KeyCacheSettings::default(),
    )
    .unwrap();
    let sanitizer = Sanitizer::new(Arc::new(keyring), "default");
    let mut group = c.benchmark_group("detect_event");
    group.throughput(Throughput::Elements(1));
    for mode in [DetectMode::Off, DetectMode::Report, DetectMode::Redact] {
        let settings = PolicySettings {
            detect: DetectPolicy {
                mode,
                ..DetectPolicy::default()
            },
            ..PolicySettings::default()
        };
        let schema = compile(&schema_text, &settings).unwrap();
        let value = JsonCodec::new(&schema.writer)
            .to_value(&serde_json::from_str(EVENT).unwrap())
            .unwrap();
        let mut raw = Vec::new();
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema.writer)
            .build()
            .unwrap()
            .write_value_ref(&mut raw, &value)
            .unwrap();
        let transcoder = Transcoder::new(&schema).unwrap();
        let keys = sanitizer.keys_for_subject(&schema.plan, None).unwrap();
        let mut scratch = TranscodeScratch::default();
        let mut out = Vec::with_capacity(512);
        group.bench_function(mode.name(), |b| {
            b.iter(|| {
                out.clear();
                transcoder
                    .transcode(&schema, &raw, &keys, &mut scratch, &mut out)
                    .unwrap();
                out.len()
            })
        });
    }
    group.finish();

    let text = free_text();
    let mut found: Vec<Found> = Vec::new();
    let mut group = c.benchmark_group("detect_text");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("1kb_free_text", |b| {
        b.iter(|| {
            Detectors::all().find(&text, &mut found);
            found.len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

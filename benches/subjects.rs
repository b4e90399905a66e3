//! Streams of real subjects, and the physical floor of one record's work (issue 15).
//!
//! - `known_subjects`: customer records (`schemas/customer_profile.avsc`, a subject per record) over 100,000
//!   subjects drawn Zipf(1.1), every subject's key already in the SQLite store, the key cache bounded to its default
//!   capacity and cold at the start; each iteration is one batch of 500 records as `run` handles it: the batch's
//!   keys prefetched, then every record transcoded. Records/s, one thread.
//! - `new_subjects`: the same records, every one of a subject never seen before (issue 15's all-new stream, e.g. a
//!   sign-up flow): each batch of 500 creates 500 keys (random key, KEK wrap, one SQLite transaction for the batch)
//!   before it is transcoded. The batch's records are encoded outside the measurement. Records/s, one thread. With
//!   the local KEK, and with SoftHSM2 (`new_subjects_pkcs11`) and AWS KMS on moto (`new_subjects_aws_kms`, under
//!   the store's wrapping key as `run` does by default; `new_subjects_aws_kms_per_key`, one KMS call per key), and
//!   the PostgreSQL key store (`new_subjects_postgres`, local KEK) when the test services run
//!   (`bash scripts/test-services`, then the variables it prints). Each prints the key store's share of its time.
//! - `export_scan` (issue 16): what `subject export` does with each record of a sanitized topic before any
//!   decoding: its tokens' key ids against the subject's and against the keys forgets destroyed (each distinct key
//!   id looked up once in the SQLite store, so the memo starts cold every iteration). 200,000 sanitized customer
//!   records of 20,000 subjects, 1% of them forgotten. Records/s, one thread; the target is 200,000.
//! - `floor`: only the unavoidable work of one record of the 10-field event (`schemas/event.avsc`): the same
//!   AES-256-GCM and HMAC-SHA256 operations on the same byte lengths, and one copy of the record's bytes, with no
//!   parsing — the physical limit on this machine, against which the transcoder is quoted.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hmac::{Hmac, Mac};
use piiwall::codec::json::JsonCodec;
use piiwall::crypto::{KekProvider, KekSet, LocalKek, Pkcs11Kek, Pkcs11Location, SecretSource};
use piiwall::keys::{KeyCacheSettings, KeyStore, Keyring, PostgresStore, SqliteStore, forgets};
use piiwall::policy::{PolicySettings, compile};
use piiwall::sanitize::Sanitizer;
use piiwall::transcode::{TranscodeScratch, Transcoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Sha256;

#[path = "../tests/common/keks.rs"]
mod keks;
#[path = "../tests/common/services.rs"]
#[allow(dead_code)]
mod services;

const SUBJECTS: usize = 100_000;
const BATCH: usize = 500;

fn customer(i: usize) -> serde_json::Value {
    let tier = ["NONE", "SILVER", "GOLD"][i % 3];
    serde_json::json!({
        "customer_id": format!("cus_{i:06}"),
        "email": format!("person{i}@example.com"),
        "full_name": format!("Person Number{i}"),
        "date_of_birth": 7000 + (i % 20_000) as i32,
        "address": {"street": format!("{i} Long Lane"), "city": "Leeds", "postcode": format!("LS{} 9ZZ", i % 30),
                    "country": "GB"},
        "phones": [{"kind": "MOBILE", "number": format!("+44 7700 9{:05}", i % 100_000)}],
        "marketing_opt_in": i.is_multiple_of(2),
        "loyalty_tier": tier,
        "notes": if i.is_multiple_of(4) { serde_json::Value::Null } else { serde_json::json!(format!("note {i}")) },
        "updated_at": 1_764_150_000_000i64 + i as i64
    })
}

/// Zipf(s) over `n` ranks: the cumulative weights, sampled by binary search.
fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|rank| {
            total += 1.0 / (rank as f64).powf(s);
            total
        })
        .collect();
    cdf.iter_mut().for_each(|c| *c /= total);
    cdf
}

fn known_subjects(c: &mut Criterion) {
    let (schema, transcoder) = customer_schema();
    let dir = tempfile::tempdir().unwrap();
    let kek = || Arc::new(LocalKek::from_bytes(&[7; 32]).unwrap());
    let open = || {
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        Keyring::open(store, kek(), KeyCacheSettings::default()).unwrap()
    };
    // Every subject's key in the store, made through the keyring as `run` makes them.
    let ids: Vec<String> = (0..SUBJECTS).map(|i| format!("cus_{i:06}")).collect();
    let setup = open();
    for chunk in ids.chunks(5_000) {
        setup.prefetch(chunk.iter().map(String::as_str), []).unwrap();
    }
    drop(setup);
    let codec = JsonCodec::new(&schema.writer);
    let records: Vec<Vec<u8>> = (0..SUBJECTS).map(|i| encode(&schema, &codec, &customer(i))).collect();
    let cdf = zipf_cdf(SUBJECTS, 1.1);
    let mut rng = StdRng::seed_from_u64(15);
    let stream: Vec<usize> = (0..1_000_000)
        .map(|_| {
            let u: f64 = rng.r#gen();
            cdf.partition_point(|c| *c < u).min(SUBJECTS - 1)
        })
        .collect();

    // A fresh keyring: its cache is cold when the measurement starts.
    let sanitizer = Sanitizer::new(Arc::new(open()), "default");
    let mut scratch = TranscodeScratch::default();
    let mut out = Vec::with_capacity(1024);
    let mut at = 0;
    let mut group = c.benchmark_group("subjects");
    group.throughput(Throughput::Elements(BATCH as u64));
    // As `run` sanitizes a batch: recording the scopes of the keys it resolves (`keys::forgets`).
    group.bench_function("known_subjects_zipf", |b| {
        b.iter(|| {
            let batch = &stream[at..at + BATCH];
            at = (at + BATCH) % (stream.len() - BATCH);
            let (written, tags) = forgets::recording(|| {
                let keys = sanitizer
                    .keyring()
                    .prefetch(batch.iter().map(|&i| ids[i].as_str()), [])
                    .unwrap();
                for &i in batch {
                    out.clear();
                    sanitizer
                        .sanitize_binary_in(&schema, &transcoder, &records[i], Some(&keys), &mut scratch, &mut out)
                        .unwrap();
                }
                out.len()
            });
            (written, tags.len())
        })
    });
    group.finish();
}

fn export_scan(c: &mut Criterion) {
    const EXPORT_SUBJECTS: usize = 20_000;
    const RECORDS: usize = 200_000;
    let (schema, transcoder) = customer_schema();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let keyring = Arc::new(
        Keyring::open(
            store,
            Arc::new(LocalKek::from_bytes(&[7; 32]).unwrap()),
            KeyCacheSettings::default(),
        )
        .unwrap(),
    );
    let sanitizer = Sanitizer::new(keyring.clone(), "default");
    let codec = JsonCodec::new(&schema.writer);
    let mut scratch = TranscodeScratch::default();
    let ids: Vec<String> = (0..EXPORT_SUBJECTS).map(|i| format!("cus_{i:06}")).collect();
    let mut sanitized = Vec::with_capacity(RECORDS);
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(BATCH) {
        let keys = keyring
            .prefetch(chunk.iter().map(|&n| ids[n % EXPORT_SUBJECTS].as_str()), [])
            .unwrap();
        for &n in chunk {
            let mut record = customer(n % EXPORT_SUBJECTS);
            record["updated_at"] = serde_json::json!(1_764_150_000_000i64 + n as i64);
            let mut out = Vec::new();
            sanitizer
                .sanitize_binary_in(
                    &schema,
                    &transcoder,
                    &encode(&schema, &codec, &record),
                    Some(&keys),
                    &mut scratch,
                    &mut out,
                )
                .unwrap();
            sanitized.push(out);
        }
    }
    for subject in ids.iter().step_by(100) {
        keyring.forget_subject(subject).unwrap();
    }
    let ours: std::collections::HashSet<_> = keyring.subject_key_ids(&ids[4_321]).unwrap().into_iter().collect();
    let mut group = c.benchmark_group("subjects");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("export_scan", |b| {
        b.iter(|| {
            let mut classifier = piiwall::export::Classifier::new(&keyring, ours.clone());
            let mut counts = [0usize; 3];
            for record in &sanitized {
                counts[classifier.classify(record).unwrap() as usize] += 1;
            }
            assert_eq!(counts, [10, RECORDS / 100, RECORDS - 10 - RECORDS / 100]);
            counts
        })
    });
    group.finish();
}

/// The customer schema (a subject per record), compiled, and its transcoder.
fn customer_schema() -> (piiwall::policy::CompiledSchema, Transcoder) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("schemas/customer_profile.avsc")).unwrap();
    let schema = compile(&text, &PolicySettings::default()).unwrap();
    let transcoder = Transcoder::new(&schema).unwrap();
    (schema, transcoder)
}

fn encode(schema: &piiwall::policy::CompiledSchema, codec: &JsonCodec, record: &serde_json::Value) -> Vec<u8> {
    let value = codec.to_value(record).unwrap();
    let mut bytes = Vec::new();
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema.writer)
        .build()
        .unwrap()
        .write_value_ref(&mut bytes, &value)
        .unwrap();
    bytes
}

/// New subjects with each KEK provider at hand: the local KEK always; SoftHSM2 through PKCS#11 and AWS KMS (moto)
/// when scripts/test-services runs (`PIIWALL_TEST_PKCS11_MODULE`, `PIIWALL_TEST_AWS` and the feature `aws-kms`); and
/// the PostgreSQL key store with the local KEK when `PIIWALL_TEST_PG` names the test server.
fn new_subjects(c: &mut Criterion) {
    let local = || -> Box<dyn KekProvider> { Box::new(LocalKek::from_bytes(&[7; 32]).unwrap()) };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = || -> Arc<dyn KeyStore> {
        Arc::new(SqliteStore::open(&dir.path().join(format!("keys-{}.db", rand::random::<u32>()))).unwrap())
    };
    new_subjects_with(c, "new_subjects", sqlite(), |_| local());
    if std::env::var_os("PIIWALL_TEST_PG").is_some() {
        let store = Arc::new(PostgresStore::open(&services::fresh_database()).unwrap());
        new_subjects_with(c, "new_subjects_postgres", store, |_| local());
    }
    if std::env::var_os("PIIWALL_TEST_PKCS11_MODULE").is_some() {
        let pin = std::env::temp_dir().join(format!("piiwall-bench-pin-{}", std::process::id()));
        std::fs::write(&pin, keks::PIN).unwrap();
        let location = Pkcs11Location {
            module: keks::module(),
            token: keks::TOKEN.into(),
            key_label: keks::new_hsm_key(),
            pin: SecretSource::File(pin),
        };
        new_subjects_with(c, "new_subjects_pkcs11", sqlite(), |_| {
            Box::new(Pkcs11Kek::open(&location).unwrap())
        });
    }
    #[cfg(feature = "aws-kms")]
    if std::env::var_os("PIIWALL_TEST_AWS").is_some() {
        let location = piiwall::crypto::AwsKmsLocation {
            key: keks::new_kms_key(),
            region: Some("us-east-1".into()),
            endpoint: Some(keks::endpoint()),
        };
        let kms: Arc<dyn KekProvider> = Arc::new(piiwall::crypto::AwsKmsKek::open(&location, true).unwrap());
        // Every new key wrapped by KMS (keys.wrapping_key = false), then under the store's wrapping key (the default).
        new_subjects_with(c, "new_subjects_aws_kms_per_key", sqlite(), |_| Box::new(kms.clone()));
        new_subjects_with(c, "new_subjects_aws_kms", sqlite(), |store| {
            let ttl = KeyCacheSettings::default().ttl;
            Box::new(
                piiwall::keys::WrappingKey::open(kms.clone(), store, ttl, true)
                    .unwrap()
                    .unwrap(),
            )
        });
    }
}

/// Batches of [`BATCH`] subjects never seen before, through `store` under the KEK `kek` makes; prints the key
/// store's share of the measured time (its calls, timed by the keyring) when done.
fn new_subjects_with(
    c: &mut Criterion,
    name: &str,
    store: Arc<dyn KeyStore>,
    kek: impl FnOnce(&dyn KeyStore) -> Box<dyn KekProvider>,
) {
    let (schema, transcoder) = customer_schema();
    let kek = kek(store.as_ref());
    let kek = Arc::new(KekSet::new(kek, vec![]).unwrap());
    let sanitizer = Sanitizer::new(
        Arc::new(Keyring::open(store, kek, KeyCacheSettings::default()).unwrap()),
        "default",
    );
    let codec = JsonCodec::new(&schema.writer);
    let mut scratch = TranscodeScratch::default();
    let mut out = Vec::with_capacity(1024);
    let mut next = 0usize;
    let mut measured = Duration::ZERO;
    let store_before = sanitizer.keyring().stats().store_nanos.load(Ordering::Relaxed);
    let mut group = c.benchmark_group("subjects");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.bench_function(name, |b| {
        b.iter_batched(
            || {
                // A batch of subjects nobody has seen: ids past every earlier batch's.
                let batch: Vec<(String, Vec<u8>)> = (next..next + BATCH)
                    .map(|i| {
                        let mut record = customer(i);
                        let id = format!("new_{i:09}");
                        record["customer_id"] = serde_json::json!(id);
                        (id, encode(&schema, &codec, &record))
                    })
                    .collect();
                next += BATCH;
                batch
            },
            |batch| {
                let started = Instant::now();
                let keys = sanitizer
                    .keyring()
                    .prefetch(batch.iter().map(|(id, _)| id.as_str()), [])
                    .unwrap();
                assert_eq!(keys.created, BATCH, "every subject is new");
                for (_, record) in &batch {
                    out.clear();
                    sanitizer
                        .sanitize_binary_in(&schema, &transcoder, record, Some(&keys), &mut scratch, &mut out)
                        .unwrap();
                }
                measured += started.elapsed();
                out.len()
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
    if next == 0 {
        return; // filtered out
    }
    let store = Duration::from_nanos(sanitizer.keyring().stats().store_nanos.load(Ordering::Relaxed) - store_before);
    eprintln!(
        "subjects/{name}: the key store took {:.0}% of the measured time ({:.1} µs per new key; {next} keys made)",
        100.0 * store.as_secs_f64() / measured.as_secs_f64(),
        store.as_secs_f64() * 1e6 / next as f64,
    );
}

/// The 10-field event's unavoidable work: tokenize the e-mail (HMAC-SHA256 for the synthetic nonce, then AES-GCM),
/// encrypt phone and name (AES-GCM), and copy the record's bytes once.
fn floor(c: &mut Criterion) {
    let (email, phone, name) = (
        b"ada.lovelace@example.com".to_vec(),
        b"+44 7700 900123".to_vec(),
        b"Ada Lovelace".to_vec(),
    );
    let record = vec![0x5au8; 170];
    let aead = Aes256Gcm::new_from_slice(&[3; 32]).unwrap();
    let mac = <Hmac<Sha256> as Mac>::new_from_slice(&[4; 32]).unwrap();
    let mut buffer = Vec::with_capacity(256);
    let mut copy = Vec::with_capacity(256);
    let mut group = c.benchmark_group("floor");
    group.throughput(Throughput::Elements(1));
    group.bench_function("event_crypto_and_one_copy", |b| {
        b.iter(|| {
            let mut nonce_mac = mac.clone();
            nonce_mac.update(b"email");
            nonce_mac.update(&email);
            let synthetic = nonce_mac.finalize().into_bytes();
            for (value, nonce) in [
                (&email, &synthetic[..12]),
                (&phone, &[1u8; 12][..]),
                (&name, &[2u8; 12][..]),
            ] {
                buffer.clear();
                buffer.extend_from_slice(value);
                aead.encrypt_in_place(Nonce::from_slice(nonce), b"context", &mut buffer)
                    .unwrap();
            }
            copy.clear();
            copy.extend_from_slice(&record);
            buffer.len() + copy.len()
        })
    });
    group.finish();
}

criterion_group!(benches, known_subjects, new_subjects, export_scan, floor);
criterion_main!(benches);

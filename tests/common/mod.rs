//! Helpers shared by the integration tests: a keyring in a temporary directory.

#![allow(dead_code)]

pub mod broker;
pub mod gate;
pub mod kafka;
pub mod keks;
pub mod protobuf;
pub mod registry;
pub mod services;

use std::path::Path;
use std::sync::Arc;

use piiwall::crypto::LocalKek;
use piiwall::crypto::{Dek, KeyId};
use piiwall::keys::{KeyCacheSettings, Keyring, SqliteStore};
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::sanitize::{RecordKeys, Sanitizer};

pub const KEK: [u8; 32] = [0x42; 32];

pub fn keyring_at(dir: &Path) -> Arc<Keyring> {
    keyring_with_kek(dir, &KEK)
}

/// A keyring over `dir/keys.db` whose KEK is the base64 text of a key file.
pub fn keyring_at_with(dir: &Path, kek_base64: &str) -> Arc<Keyring> {
    use base64::Engine;
    keyring_with_kek(
        dir,
        &base64::engine::general_purpose::STANDARD
            .decode(kek_base64.trim())
            .unwrap(),
    )
}

fn keyring_with_kek(dir: &Path, kek: &[u8]) -> Arc<Keyring> {
    let store = Arc::new(SqliteStore::open(&dir.join("keys.db")).expect("open key store"));
    // As `run` and the command line open it: the KEK in a set, which reads the envelopes they write.
    let local = Box::new(LocalKek::from_bytes(kek).unwrap());
    let kek = Arc::new(piiwall::crypto::KekSet::new(local, Vec::new()).unwrap());
    Arc::new(Keyring::open(store, kek, KeyCacheSettings::default()).expect("open keyring"))
}

pub fn sanitizer_at(dir: &Path) -> Sanitizer {
    Sanitizer::new(keyring_at(dir), "default")
}

pub fn compiled(schema: &str) -> CompiledSchema {
    compile(schema, &PolicySettings::default()).expect("schema compiles")
}

/// Reads an example schema of the repository.
pub fn example(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name)).expect("example schema")
}

/// Avro binary of a value.
pub fn encode(schema: &apache_avro::Schema, value: &apache_avro::types::Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .unwrap()
        .write_value_ref(&mut bytes, value)
        .unwrap();
    bytes
}

/// A value read from Avro binary; panics when the bytes do not decode with `schema`.
pub fn decode(schema: &apache_avro::Schema, bytes: &[u8]) -> apache_avro::types::Value {
    apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .unwrap()
        .read_value(&mut &bytes[..])
        .expect("decodes with the schema")
}

/// Fixed record keys (one data key for `tokenize`, `encrypt` and `hash`), for tests of the transcoder alone.
pub fn fixed_keys() -> RecordKeys {
    let dek = Arc::new(Dek::new(KeyId([5; 12]), 1, &[5; 32]));
    RecordKeys {
        record: Some(dek.clone()),
        domain: Some(dek),
        forgotten: false,
    }
}

/// Triggers a pipeline's shutdown when dropped: a failed assertion must not leave the pipeline's blocking readers
/// holding the test's runtime open.
pub struct StopOnDrop(pub piiwall::stream::Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

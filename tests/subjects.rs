//! Keys and data subjects: tokens are bound to their field and key, forgetting a subject makes all of its tokens
//! unrevealable and redacts its later records, and a damaged key store or a wrong KEK is a clear error.

mod common;

use std::sync::Arc;

use piiwall::codec::json::JsonCodec;
use piiwall::crypto::LocalKek;
use piiwall::error::{Error, KeyError, RevealError};
use piiwall::keys::{KeyCacheSettings, Keyring, SqliteStore};
use piiwall::policy::CompiledSchema;
use piiwall::sanitize::Sanitizer;
use serde_json::{Value as Json, json};

fn customer(id: &str, email: &str) -> Json {
    json!({
        "customer_id": id, "email": email, "full_name": format!("Name of {id}"), "date_of_birth": 1000,
        "address": {"street": format!("{id} Main Street"), "city": "Leeds", "postcode": "LS1 4AP", "country": "GB"},
        "phones": [{"kind": "MOBILE", "number": "+44 7700 900001"}], "notes": "called twice", "updated_at": 1
    })
}

fn sanitize(sanitizer: &Sanitizer, schema: &CompiledSchema, record: &Json) -> Json {
    let mut value = JsonCodec::new(&schema.writer).to_value(record).unwrap();
    sanitizer.sanitize(schema, &mut value).unwrap();
    assert!(value.validate(&schema.sanitized));
    JsonCodec::new(&schema.sanitized).to_json(&value)
}

/// (context, token) of every reversible field of a sanitized customer.
fn tokens(out: &Json) -> Vec<(&'static str, String)> {
    vec![
        ("customer_id", out["customer_id"].as_str().unwrap().to_owned()),
        ("email", out["email"].as_str().unwrap().to_owned()),
        ("full_name", out["full_name"].as_str().unwrap().to_owned()),
        ("date_of_birth", out["date_of_birth"].as_str().unwrap().to_owned()),
        ("address.street", out["address"]["street"].as_str().unwrap().to_owned()),
        ("phone", out["phones"][0]["number"].as_str().unwrap().to_owned()),
    ]
}

#[test]
fn tokens_are_per_subject_and_bound_to_field_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let a = sanitize(&sanitizer, &schema, &customer("cus_a", "same@example.com"));
    let b = sanitize(&sanitizer, &schema, &customer("cus_b", "same@example.com"));
    assert_ne!(a["email"], b["email"], "the same value of two subjects gets two tokens");
    assert_eq!(
        a["email"],
        sanitize(&sanitizer, &schema, &customer("cus_a", "same@example.com"))["email"]
    );

    let name = a["full_name"].as_str().unwrap();
    assert_eq!(sanitizer.reveal("full_name", name).unwrap(), json!("Name of cus_a"));
    // Copied into another field: revealing it as that field fails.
    let moved = sanitizer.reveal("address.street", name).unwrap_err();
    assert!(matches!(moved, Error::Reveal(RevealError::Forged)), "{moved}");
    // Paired with another key id (subject b's): fails.
    let b_key_id = b["full_name"].as_str().unwrap().split('.').nth(1).unwrap();
    let parts: Vec<&str> = name.split('.').collect();
    let relabelled = format!("{}.{}.{}", parts[0], b_key_id, parts[2]);
    assert!(matches!(
        sanitizer.reveal("full_name", &relabelled),
        Err(Error::Reveal(RevealError::Forged))
    ));
    // Altered payload: fails.
    let mut altered = name.to_owned();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(sanitizer.reveal("full_name", &altered).is_err());
    // Hashes are not reversible, malformed tokens are named.
    assert!(matches!(
        sanitizer.reveal("x", "pwh1.AAAAAAAAAAAAAAAA.AAAA"),
        Err(Error::Reveal(RevealError::NotReversible(_)))
    ));
    assert!(matches!(
        sanitizer.reveal("x", "not-a-token"),
        Err(Error::Reveal(RevealError::Malformed(_)))
    ));
}

#[test]
fn forget_makes_every_token_of_the_subject_unrevealable_and_redacts_later_records() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let before_rotation = sanitize(&sanitizer, &schema, &customer("cus_gone", "gone@example.com"));
    let keyring = sanitizer.keyring();
    keyring.rotate(&keyring.subject_scope("cus_gone")).unwrap();
    let after_rotation = sanitize(&sanitizer, &schema, &customer("cus_gone", "gone@example.com"));
    let kept = sanitize(&sanitizer, &schema, &customer("cus_kept", "kept@example.com"));

    assert_eq!(
        keyring.forget_subject("cus_gone").unwrap(),
        2,
        "both key versions destroyed"
    );

    // In this process and in a fresh one (another keyring over the same store), nothing of the subject reveals.
    let fresh = common::keyring_at(dir.path());
    for out in [&before_rotation, &after_rotation] {
        for (context, token) in tokens(out) {
            for ring in [keyring, &fresh] {
                let err = piiwall::sanitize::reveal(ring, context, &token).unwrap_err();
                assert!(
                    matches!(err, Error::Reveal(RevealError::SubjectForgotten)),
                    "{context}: {err}"
                );
                assert!(err.to_string().contains("subject forgotten"));
            }
        }
    }
    for (context, token) in tokens(&kept) {
        assert!(
            sanitizer.reveal(context, &token).is_ok(),
            "{context} of another subject still reveals"
        );
    }

    // New records of the forgotten subject come out redacted, still valid against the sanitized schema.
    let later = sanitize(&sanitizer, &schema, &customer("cus_gone", "gone@example.com"));
    assert_eq!(later["customer_id"], "");
    assert_eq!(later["email"], "");
    assert_eq!(later["full_name"], "");
    assert_eq!(later["date_of_birth"], Json::Null);
    assert_eq!(later["address"]["street"], "");
    assert_eq!(later["address"]["postcode"], "");
    assert_eq!(later["phones"], json!([{"kind": "MOBILE", "number": ""}]));
    assert_eq!(later["address"]["city"], "Leeds", "unprotected fields are kept");
    assert!(!later.to_string().contains("gone@example.com"));
    let fresh_sanitizer = Sanitizer::new(fresh, "default");
    assert_eq!(
        sanitize(&fresh_sanitizer, &schema, &customer("cus_gone", "x@example.com"))["email"],
        ""
    );
}

#[test]
fn a_wrong_kek_is_refused_and_a_corrupted_row_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(&common::example("customer_profile.avsc"));
    let out = sanitize(&sanitizer, &schema, &customer("cus_c", "c@example.com"));
    drop(sanitizer);

    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let wrong = Keyring::open(
        store,
        Arc::new(LocalKek::from_bytes(&[0x43; 32]).unwrap()),
        KeyCacheSettings::default(),
    );
    let err = wrong.err().expect("another KEK must be refused");
    assert!(matches!(err, KeyError::KekMismatch));
    assert!(err.to_string().contains("another KEK"));

    // Flip a byte of every stored data key.
    let db = rusqlite::Connection::open(dir.path().join("keys.db")).unwrap();
    db.execute("UPDATE deks SET wrapped = CAST(zeroblob(length(wrapped)) AS BLOB)", [])
        .unwrap();
    drop(db);
    let keyring = common::keyring_at(dir.path());
    let err = piiwall::sanitize::reveal(&keyring, "email", out["email"].as_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::Key(KeyError::CorruptRow)), "{err}");
    assert!(err.to_string().contains("corrupted"));
    let sanitizer = Sanitizer::new(keyring, "default");
    let mut value = JsonCodec::new(&schema.writer)
        .to_value(&customer("cus_c", "c@example.com"))
        .unwrap();
    assert!(matches!(
        sanitizer.sanitize(&schema, &mut value),
        Err(Error::Key(KeyError::CorruptRow))
    ));
}

/// Every type the compiler accepts as a subject is located on both paths (the transcoder `run` and `sanitize` use,
/// and the `Value` path): the record's tokens are under the subject's own key, so forgetting the subject makes them
/// unrevealable. A record that fell back to the domain key would still reveal after the forget.
#[test]
fn every_accepted_subject_type_is_located_and_forgotten() {
    use piiwall::transcode::{TranscodeScratch, Transcoder};
    let uuid = "0b7e6f3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    let cases: [(&str, Json, &str); 9] = [
        ("string", json!("string"), "cus_1"),
        ("int", json!("int"), "42"),
        ("long", json!("long"), "4200000000"),
        ("uuid on string", json!({"type": "string", "logicalType": "uuid"}), uuid),
        ("uuid on bytes", json!({"type": "bytes", "logicalType": "uuid"}), uuid),
        (
            "uuid on fixed",
            json!({"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}),
            uuid,
        ),
        ("nullable string", json!(["null", "string"]), "cus_2"),
        ("nullable long", json!(["null", "long"]), "7"),
        (
            "nullable uuid on bytes",
            json!(["null", {"type": "bytes", "logicalType": "uuid"}]),
            uuid,
        ),
    ];
    for (name, ty, id) in cases {
        let dir = tempfile::tempdir().unwrap();
        let sanitizer = common::sanitizer_at(dir.path());
        let schema = common::compiled(
            &json!({"type": "record", "name": "S", "fields": [
                {"name": "id", "type": ty, "pii": "subject"},
                {"name": "email", "type": "string", "pii": "tokenize"}
            ]})
            .to_string(),
        );
        let id_json = match name {
            "int" | "long" | "nullable long" => json!(id.parse::<i64>().unwrap()),
            _ => json!(id),
        };
        let record = JsonCodec::new(&schema.writer)
            .to_value(&json!({"id": id_json, "email": "ada@example.com"}))
            .unwrap();
        let binary = common::encode(&schema.writer, &record);
        let transcoder = Transcoder::new(&schema).unwrap();
        assert_eq!(transcoder.subject(&binary).unwrap().as_deref(), Some(id), "{name}");
        let mut out = Vec::new();
        sanitizer
            .sanitize_binary(
                &schema,
                &transcoder,
                &binary,
                &mut TranscodeScratch::default(),
                &mut out,
            )
            .unwrap();
        let sanitized = common::decode(&schema.sanitized, &out);
        let from_binary = JsonCodec::new(&schema.sanitized).to_json(&sanitized);
        let mut value = record;
        sanitizer.sanitize(&schema, &mut value).unwrap();
        let from_value = JsonCodec::new(&schema.sanitized).to_json(&value);
        assert_eq!(
            from_binary["email"], from_value["email"],
            "{name}: both paths use one key"
        );
        let token = from_binary["email"].as_str().unwrap();
        assert_eq!(
            sanitizer.reveal("email", token).unwrap(),
            json!("ada@example.com"),
            "{name}"
        );
        // Ids are matched exactly (case, spaces and leading zeros count), except uuids: records carry a uuid subject
        // in its canonical form whatever form the producer wrote, so a forget of a uuid in any form reaches it.
        if id == uuid {
            let shouted = id.to_uppercase();
            assert_eq!(
                sanitizer.keyring().subject_status(&shouted).unwrap().key_versions,
                1,
                "{name}"
            );
            assert_eq!(sanitizer.keyring().forget_subject(&shouted).unwrap(), 1, "{name}");
        } else {
            for other in [id.to_uppercase(), format!("{id} "), format!("0{id}")] {
                if other != id {
                    assert_eq!(sanitizer.keyring().forget_subject(&other).unwrap(), 0, "{name}");
                }
            }
            assert_eq!(
                sanitizer.keyring().forget_subject(id).unwrap(),
                1,
                "{name}: the subject had its own key"
            );
        }
        assert!(
            matches!(
                sanitizer.reveal("email", token),
                Err(Error::Reveal(RevealError::SubjectForgotten))
            ),
            "{name}: the token was under the subject's key"
        );
    }
}

/// A uuid on a fixed of another size than 16 is no uuid to Avro: as a subject it would never be located, so the
/// schema is refused with an error that says why (that the logical type does not apply there: every such type
/// is refused so since 7cfa112). A double or an enum is no subject type.
#[test]
fn a_subject_that_could_not_be_located_is_refused_at_compile_time() {
    for (ty, problem) in [
        (
            json!({"type": "fixed", "name": "U", "size": 8, "logicalType": "uuid"}),
            "the logicalType `uuid` does not apply",
        ),
        (json!("double"), "16-byte fixed"),
        (json!({"type": "enum", "name": "E", "symbols": ["A"]}), "16-byte fixed"),
    ] {
        let schema = json!({"type": "record", "name": "S", "fields": [{"name": "id", "type": ty, "pii": "subject"}]});
        let err = piiwall::policy::compile(&schema.to_string(), &Default::default()).unwrap_err();
        assert!(err.to_string().contains(problem), "{err}");
    }
}

/// `/v1/tokenize` (and `piiwall tokenize`) give no pseudonym of a forgotten subject, not even a domain-keyed hash:
/// it would let a caller find the subject's earlier records.
#[test]
fn a_forgotten_subject_gets_no_pseudonym_of_any_kind() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(
        &json!({"type": "record", "name": "S", "fields": [
            {"name": "id", "type": "string", "pii": "subject"},
            {"name": "email", "type": "string", "pii": "tokenize"},
            {"name": "ip", "type": "string", "pii": "hash"}
        ]})
        .to_string(),
    );
    let value = apache_avro::types::Value::String("203.0.113.9".into());
    for field in ["email", "ip"] {
        assert!(
            sanitizer.token_for(&schema, field, Some("cus_1"), &value).is_ok(),
            "{field}"
        );
        assert!(
            sanitizer.token_for(&schema, field, None, &value).is_err(),
            "{field}: the subject is required"
        );
    }
    sanitizer.keyring().forget_subject("cus_1").unwrap();
    for field in ["email", "ip"] {
        assert!(
            matches!(
                sanitizer.token_for(&schema, field, Some("cus_1"), &value),
                Err(Error::Reveal(RevealError::SubjectForgotten))
            ),
            "{field}"
        );
    }
}

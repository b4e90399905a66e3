//! Protected maps: their keys are data (an e-mail-keyed map would release every address), so every action covers
//! them, on the transcoder path `run` and `sanitize` use and on the `Value` path alike.

mod common;

use std::collections::BTreeSet;

use piiwall::codec::json::JsonCodec;
use piiwall::error::{Error, RevealError};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use serde_json::{Value as Json, json};

const EMAILS: [&str; 2] = ["ada@example.com", "bob@example.com"];

fn schema_with(action: Json) -> String {
    json!({"type": "record", "name": "R", "fields": [
        {"name": "customer_id", "type": "string", "pii": "subject"},
        {"name": "by_email", "type": {"type": "map", "values": "string"}, "pii": action},
        {"name": "nested", "type": {"type": "map", "values": {"type": "map", "values": "long"}},
         "pii": {"action": "tokenize", "kind": "contact"}}
    ]})
    .to_string()
}

fn record() -> Json {
    json!({
        "customer_id": "cus_1",
        "by_email": {EMAILS[0]: "first", EMAILS[1]: "second"},
        "nested": {EMAILS[0]: {EMAILS[1]: 7}}
    })
}

/// The record sanitized through the transcoder and through the `Value` path, as JSON of the sanitized schema.
fn sanitize_both(sanitizer: &piiwall::sanitize::Sanitizer, schema: &piiwall::policy::CompiledSchema) -> [Json; 2] {
    let value = JsonCodec::new(&schema.writer).to_value(&record()).unwrap();
    let binary = common::encode(&schema.writer, &value);
    let mut out = Vec::new();
    let transcoder = Transcoder::new(schema).unwrap();
    sanitizer
        .sanitize_binary(schema, &transcoder, &binary, &mut TranscodeScratch::default(), &mut out)
        .unwrap();
    let decoded = common::decode(&schema.sanitized, &out);
    let mut in_place = value;
    sanitizer.sanitize(schema, &mut in_place).unwrap();
    assert!(in_place.validate(&schema.sanitized));
    let codec = JsonCodec::new(&schema.sanitized);
    [codec.to_json(&decoded), codec.to_json(&in_place)]
}

fn keys(map: &Json) -> BTreeSet<String> {
    map.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_action_protects_map_keys_and_keeps_them_unique() {
    for (action, key_prefix) in [
        (json!("tokenize"), "pwt1."),
        (json!("encrypt"), "pwt1."),
        (json!("hash"), "pwh1."),
        (json!({"action": "mask", "keep_last": 2}), "pwh1."),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sanitizer = common::sanitizer_at(dir.path());
        let schema = common::compiled(&schema_with(action.clone()));
        for out in sanitize_both(&sanitizer, &schema) {
            let text = out.to_string();
            for email in EMAILS {
                assert!(!text.contains(email), "{action}: a map key left in clear: {text}");
            }
            let by_email = keys(&out["by_email"]);
            assert_eq!(by_email.len(), 2, "{action}: two keys stay two keys");
            assert!(
                by_email.iter().all(|k| k.starts_with(key_prefix)),
                "{action}: {by_email:?}"
            );
            let nested = &out["nested"];
            let inner = nested.as_object().unwrap().values().next().unwrap();
            assert!(
                keys(nested)
                    .iter()
                    .chain(keys(inner).iter())
                    .all(|k| k.starts_with("pwt1."))
            );
        }
        // Deterministic: the same key gets the same protected key on both paths and every time.
        let [a, b] = sanitize_both(&sanitizer, &schema);
        assert_eq!(keys(&a["by_email"]), keys(&b["by_email"]), "{action}");
    }
}

#[test]
fn tokenized_map_keys_reveal_under_the_key_context_and_forget_with_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(&schema_with(json!("encrypt")));
    let [out, _] = sanitize_both(&sanitizer, &schema);
    let revealed: BTreeSet<String> = keys(&out["by_email"])
        .iter()
        .map(|token| {
            sanitizer
                .reveal("by_email#key", token)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(revealed, EMAILS.iter().map(|e| e.to_string()).collect());
    // Values are encrypted, and reveal as values.
    let value = out["by_email"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert!(value.starts_with("pwe2."));
    assert!(sanitizer.reveal("by_email", value).is_ok());
    // A key token is not a value token: revealed as the field's value it does not authenticate.
    let key = keys(&out["by_email"]).into_iter().next().unwrap();
    assert!(matches!(
        sanitizer.reveal("by_email", &key),
        Err(Error::Reveal(RevealError::Forged))
    ));

    sanitizer.keyring().forget_subject("cus_1").unwrap();
    assert!(matches!(
        sanitizer.reveal("by_email#key", &key),
        Err(Error::Reveal(RevealError::SubjectForgotten))
    ));
    let [after, after_value] = sanitize_both(&sanitizer, &schema);
    for out in [after, after_value] {
        assert_eq!(out["by_email"], json!({}), "a forgotten subject's maps are emptied");
    }
}

#[test]
fn redacted_maps_are_emptied_and_the_sanitized_schema_says_what_keys_became() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = common::compiled(&schema_with(json!("redact")));
    for out in sanitize_both(&sanitizer, &schema) {
        assert_eq!(out["by_email"], json!({}));
    }
    let tokenized = common::compiled(&schema_with(json!("encrypt")));
    assert!(
        tokenized.sanitized_json.contains(r#""pii.keys":"tokenize""#),
        "{}",
        tokenized.sanitized_json
    );
    let hashed = common::compiled(&schema_with(json!("hash")));
    assert!(
        hashed.sanitized_json.contains(r#""pii.keys":"hash""#),
        "{}",
        hashed.sanitized_json
    );
}

//! Detection in fields no annotation protects, through the transcoder (what `run` and `sanitize` use): reported,
//! redacted span by span, or quarantined, at any depth (nested records, arrays, map keys and values, unions),
//! with per-field and per-detector overrides; and never the value in what is reported.

mod common;

use piiwall::codec::json::JsonCodec;
use piiwall::detect::{DetectMode, DetectPolicy, Kind};
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::transcode::{Detections, TranscodeScratch, Transcoder};
use serde_json::{Value as Json, json};

fn schema(detect: DetectPolicy) -> CompiledSchema {
    let text = json!({"type": "record", "name": "Ticket", "fields": [
        {"name": "email", "type": "string", "pii": "tokenize"},
        {"name": "notes", "type": "string"},
        {"name": "lines", "type": {"type": "array", "items": "string"}},
        {"name": "labels", "type": {"type": "map", "values": "string"}},
        {"name": "reply", "type": ["null", "string"]},
        {"name": "order", "type": {"type": "record", "name": "Order", "fields": [
            {"name": "reference", "type": "string"},
            {"name": "count", "type": "int"}
        ]}}
    ]})
    .to_string();
    let settings = PolicySettings {
        detect,
        ..PolicySettings::default()
    };
    compile(&text, &settings).expect("schema compiles")
}

fn policy(mode: DetectMode) -> DetectPolicy {
    DetectPolicy {
        mode,
        ..DetectPolicy::default()
    }
}

fn ticket() -> Json {
    json!({
        "email": "ann@example.com",
        "notes": "Customer wrote from bob.lee@example.org, call +44 7700 900123.",
        "lines": ["no PII here", "card 4111 1111 1111 1111 was declined"],
        "labels": {"vip": "carol@example.net", "plain": "SSN 123-45-6789"},
        "reply": "see 192.168.1.20",
        "order": {"reference": "4111111111111111", "count": 2}
    })
}

/// Transcodes the ticket: its output as JSON (decoded with the sanitized schema) or the error, and the detections.
fn run(schema: &CompiledSchema) -> (Result<Json, String>, Detections) {
    run_on(schema, &ticket())
}

fn run_on(schema: &CompiledSchema, ticket: &Json) -> (Result<Json, String>, Detections) {
    let input = common::encode(
        &schema.writer,
        &JsonCodec::new(&schema.writer).to_value(ticket).unwrap(),
    );
    let transcoder = Transcoder::new(schema).unwrap();
    let mut scratch = TranscodeScratch::default();
    let mut out = Vec::new();
    let result = transcoder
        .transcode(schema, &input, &common::fixed_keys(), &mut scratch, &mut out)
        .map(|()| JsonCodec::new(&schema.sanitized).to_json(&common::decode(&schema.sanitized, &out)))
        .map_err(|e| e.to_string());
    (result, scratch.take_detections())
}

/// Where and what, once per detection, sorted.
fn found(detections: &Detections) -> Vec<(String, Kind)> {
    let mut found: Vec<_> = detections
        .iter()
        .flat_map(|(d, n)| std::iter::repeat_n((d.path.to_string(), d.kind), *n as usize))
        .collect();
    found.sort();
    found
}

#[test]
fn report_counts_every_detection_at_any_depth_and_changes_nothing() {
    let (out, detections) = run(&schema(policy(DetectMode::Report)));
    let out = out.unwrap();
    assert_eq!(out["notes"], ticket()["notes"], "reported, not changed");
    assert_eq!(out["labels"], ticket()["labels"]);
    assert_eq!(
        found(&detections),
        vec![
            ("labels".to_owned(), Kind::Email),
            ("labels".to_owned(), Kind::Ssn),
            ("lines".to_owned(), Kind::Card),
            ("notes".to_owned(), Kind::Email),
            ("notes".to_owned(), Kind::Phone),
            ("order.reference".to_owned(), Kind::Card),
            ("reply".to_owned(), Kind::Ip),
        ]
    );
    assert!(detections.keys().all(|d| d.mode == DetectMode::Report));
    let (off, none) = run(&schema(policy(DetectMode::Off)));
    assert_eq!(off.unwrap(), out, "report writes what no detection writes");
    assert!(none.is_empty());
}

#[test]
fn redact_replaces_each_span_and_keeps_the_rest() {
    let (out, detections) = run(&schema(policy(DetectMode::Redact)));
    let out = out.unwrap();
    assert_eq!(out["notes"], "Customer wrote from [email], call [phone].");
    assert_eq!(out["lines"], json!(["no PII here", "card [card] was declined"]));
    assert_eq!(out["labels"], json!({"vip": "[email]", "plain": "SSN [ssn]"}));
    assert_eq!(out["reply"], json!("see [ip]"));
    assert_eq!(out["order"]["reference"], "[card]");
    assert_eq!(out["order"]["count"], 2);
    assert!(
        out["email"].as_str().unwrap().starts_with("pwt1."),
        "annotations still apply"
    );
    assert_eq!(found(&detections).len(), 7);
    assert!(detections.keys().all(|d| d.mode == DetectMode::Redact));
}

#[test]
fn quarantine_names_the_field_and_the_detector_never_the_value() {
    let (out, detections) = run(&schema(policy(DetectMode::Quarantine)));
    let error = out.unwrap_err();
    assert!(error.contains("notes"), "{error}");
    assert!(error.contains("email detector"), "{error}");
    assert!(!error.contains("bob.lee"), "{error}");
    assert_eq!(
        found(&detections),
        vec![("notes".to_owned(), Kind::Email), ("notes".to_owned(), Kind::Phone)],
        "the first field with a detection sends the record to quarantine"
    );
}

#[test]
fn a_field_known_to_be_safe_and_a_detector_can_be_silenced() {
    let mut detect = policy(DetectMode::Redact);
    detect.fields.insert("order.reference".into(), DetectMode::Off);
    detect.detectors.insert(Kind::Ip, DetectMode::Off);
    detect.detectors.insert(Kind::Ssn, DetectMode::Report);
    let (out, detections) = run(&schema(detect));
    let out = out.unwrap();
    assert_eq!(
        out["order"]["reference"], "4111111111111111",
        "an order id Luhn-valid by design"
    );
    assert_eq!(out["reply"], json!("see 192.168.1.20"));
    assert_eq!(out["labels"]["plain"], "SSN 123-45-6789", "reported only");
    assert_eq!(out["notes"], "Customer wrote from [email], call [phone].");
    assert!(
        detections
            .keys()
            .any(|d| d.kind == Kind::Ssn && d.mode == DetectMode::Report)
    );
    assert!(!detections.keys().any(|d| d.kind == Kind::Ip));
}

/// A map's keys are never rewritten (two keys would become one entry): where the policy would redact, a key that
/// carries PII sends the record to quarantine instead, naming the map.
#[test]
fn a_map_key_is_never_redacted_its_record_is_quarantined() {
    let mut keyed = ticket();
    keyed["labels"] = json!({"carol@example.net": "vip", "dave@example.net": "vip"});
    let (out, _) = run_on(&schema(policy(DetectMode::Redact)), &keyed);
    let error = out.unwrap_err();
    assert!(error.contains("labels") && error.contains("email detector"), "{error}");
    assert!(!error.contains("example.net"), "{error}");
    let (reported, detections) = run_on(&schema(policy(DetectMode::Report)), &keyed);
    assert_eq!(reported.unwrap()["labels"], keyed["labels"], "report changes nothing");
    assert_eq!(
        found(&detections).iter().filter(|(path, _)| path == "labels").count(),
        2
    );
}

/// Each action's detectors look on their own: a private key cut off (which runs to the end of the text) that is
/// only reported does not hide the address after it from redaction.
#[test]
fn a_reported_span_never_hides_what_another_action_redacts() {
    let mut detect = policy(DetectMode::Redact);
    detect.detectors.insert(Kind::Secret, DetectMode::Report);
    let mut pasted = ticket();
    pasted["notes"] = json!("key -----BEGIN PRIVATE KEY-----\nMIIB then write to x@example.org");
    let (out, detections) = run_on(&schema(detect), &pasted);
    assert_eq!(
        out.unwrap()["notes"],
        "key -----BEGIN PRIVATE KEY-----\nMIIB then write to [email]"
    );
    assert!(
        detections
            .keys()
            .any(|d| d.kind == Kind::Secret && d.mode == DetectMode::Report)
    );
}

//! `piiwall schema check`: annotation errors, and unannotated fields whose names suggest PII.

use std::collections::HashSet;

use serde_json::{Map, Value as Json};

use crate::policy::{PolicySettings, compile, compile_any, json_schema};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Dotted field path (empty for the schema as a whole).
    pub path: String,
    pub message: String,
}

/// Checks one schema: every annotation error the compiler finds, then a warning for each unannotated field whose
/// name suggests PII. A field marked `"pii": "none"` is taken as reviewed and not warned about. A JSON Schema is
/// checked through its translation to Avro (its properties are the fields).
pub fn check(schema_text: &str, settings: &PolicySettings) -> Vec<Finding> {
    let mut findings = Vec::new();
    let translation = if crate::policy::protobuf::is_proto(schema_text) {
        Some(crate::policy::protobuf::compile_writer(schema_text, &Default::default(), None).map(|w| w.avro))
    } else if json_schema::is_json_schema(schema_text) {
        Some(json_schema::to_avro(schema_text))
    } else {
        None
    };
    let translated;
    let schema_json = match translation {
        None => schema_text,
        Some(Ok(avro)) => {
            translated = avro;
            translated.as_str()
        }
        Some(Err(e)) => {
            return vec![Finding {
                severity: Severity::Error,
                path: e.path,
                message: e.problem,
            }];
        }
    };
    let protected: HashSet<String> = match compile(schema_json, settings) {
        Ok(compiled) => compiled.plan.rules.into_iter().map(|r| r.path).collect(),
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                path: e.path,
                message: e.problem,
            });
            HashSet::new()
        }
    };
    let Ok(json) = serde_json::from_str::<Json>(schema_json) else {
        return findings;
    };
    let mut fields = Vec::new();
    if let Some(root) = json.as_object() {
        collect_fields(root, "", &mut Vec::new(), &mut fields);
    }
    for (path, name, annotated) in fields {
        if annotated || protected.contains(&path) {
            continue;
        }
        if let Some(kind) = suggests_pii(&name) {
            findings.push(Finding {
                severity: Severity::Warning,
                path,
                message: format!("the name suggests PII ({kind}) but the field has no pii annotation: annotate it, or mark it \"pii\": \"none\""),
            });
        }
    }
    findings
}

/// Runs the PII detectors over sample records of a schema (JSON, one per line, as `piiwall sanitize` reads them)
/// and names each field that no annotation protects and that carried PII, with counts per detector: what producers
/// should annotate. A sample line that does not fit the schema is an error naming its line number, never its text.
pub fn check_samples(
    schema_json: &str,
    settings: &PolicySettings,
    samples: impl std::io::BufRead,
) -> Result<Vec<Finding>, crate::Error> {
    use crate::transcode::{TranscodeScratch, Transcoder};
    let settings = PolicySettings {
        detect: settings.detect.reporting(),
        ..settings.clone()
    };
    let schema = compile_any(schema_json, &settings)?;
    let transcoder = Transcoder::new(&schema)?;
    let reader = crate::codec::json_records::JsonRecords::new(&schema, crate::policy::Undeclared::Quarantine);
    // A throwaway key: the protected output is discarded, only the detections count.
    let dek = std::sync::Arc::new(crate::crypto::Dek::new(
        crate::crypto::KeyId([0; 12]),
        1,
        &rand::random::<[u8; 32]>(),
    ));
    let keys = crate::sanitize::RecordKeys {
        record: Some(dek.clone()),
        domain: Some(dek),
        forgotten: false,
    };
    let (mut scratch, mut out) = (TranscodeScratch::default(), Vec::new());
    let mut findings = Vec::new();
    let mut records = 0;
    for (index, line) in samples.lines().enumerate() {
        let line = line.map_err(|e| crate::Error::io(format!("reading sample line {}", index + 1), e))?;
        if line.trim().is_empty() {
            continue;
        }
        let checked = reader
            .read(&schema, line.as_bytes())
            .map_err(crate::Error::from)
            .and_then(|converted| {
                out.clear();
                Ok(transcoder.transcode(&schema, &converted.avro, &keys, &mut scratch, &mut out)?)
            });
        match checked {
            Ok(()) => records += 1,
            Err(e) => findings.push(Finding {
                severity: Severity::Error,
                path: String::new(),
                message: format!("sample line {}: {e}", index + 1),
            }),
        }
    }
    for (detection, count) in scratch.take_detections() {
        findings.push(Finding {
            severity: Severity::Warning,
            path: detection.path.to_string(),
            message: format!(
                "no annotation protects it, and the {} detector found {count} value(s) in {records} sample \
                 record(s): annotate it, or silence it in [policy.detect.fields] if that is by design",
                detection.kind.name()
            ),
        });
    }
    Ok(findings)
}

/// Collects (path, field name, has a pii or tag annotation) for every field of inline records.
fn collect_fields(
    record: &Map<String, Json>,
    path: &str,
    seen: &mut Vec<String>,
    out: &mut Vec<(String, String, bool)>,
) {
    let name = record.get("name").and_then(Json::as_str).unwrap_or("").to_owned();
    if seen.contains(&name) {
        return;
    }
    seen.push(name);
    for field in record.get("fields").and_then(Json::as_array).into_iter().flatten() {
        let Some(field) = field.as_object() else {
            continue;
        };
        let name = field.get("name").and_then(Json::as_str).unwrap_or("");
        let field_path = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        let annotated = field.contains_key("pii") || field.contains_key("confluent:tags");
        let ty = field.get("type").unwrap_or(&Json::Null);
        // A field holding records is judged by the fields inside them.
        if !holds_record(ty) {
            out.push((field_path.clone(), name.to_owned(), annotated));
        }
        visit_type(ty, &field_path, seen, out);
    }
}

fn visit_type(ty: &Json, path: &str, seen: &mut Vec<String>, out: &mut Vec<(String, String, bool)>) {
    match ty {
        Json::Array(branches) => branches.iter().for_each(|b| visit_type(b, path, seen, out)),
        Json::Object(object) => match object.get("type").and_then(Json::as_str) {
            Some("record" | "error") => collect_fields(object, path, seen, out),
            Some("array") => object
                .get("items")
                .into_iter()
                .for_each(|t| visit_type(t, path, seen, out)),
            Some("map") => object
                .get("values")
                .into_iter()
                .for_each(|t| visit_type(t, path, seen, out)),
            _ => {}
        },
        _ => {}
    }
}

fn holds_record(ty: &Json) -> bool {
    match ty {
        Json::Array(branches) => branches.iter().any(holds_record),
        Json::Object(object) => match object.get("type").and_then(Json::as_str) {
            Some("record" | "error") => true,
            Some("array") => object.get("items").is_some_and(holds_record),
            Some("map") => object.get("values").is_some_and(holds_record),
            _ => false,
        },
        _ => false,
    }
}

/// Name fragments that suggest PII, matched against the field name with separators removed, lowercased.
const PII_FRAGMENTS: &[(&str, &str)] = &[
    ("email", "email"),
    ("phone", "phone number"),
    ("mobile", "phone number"),
    ("msisdn", "phone number"),
    ("firstname", "name"),
    ("lastname", "name"),
    ("fullname", "name"),
    ("surname", "name"),
    ("givenname", "name"),
    ("familyname", "name"),
    ("username", "name"),
    ("displayname", "name"),
    ("address", "address"),
    ("street", "address"),
    ("postcode", "address"),
    ("postalcode", "address"),
    ("zipcode", "address"),
    ("ssn", "national id"),
    ("socialsecurity", "national id"),
    ("nationalid", "national id"),
    ("taxid", "national id"),
    ("passport", "passport"),
    ("driverlicen", "licence"),
    ("cardnumber", "card number"),
    ("creditcard", "card number"),
    ("iban", "bank account"),
    ("accountnumber", "bank account"),
    ("ipaddress", "ip address"),
    ("birth", "date of birth"),
    ("latitude", "location"),
    ("longitude", "location"),
];

/// Whole words (snake_case or camelCase parts) that suggest PII on their own.
const PII_WORDS: &[(&str, &str)] = &[
    ("name", "name"),
    ("ip", "ip address"),
    ("dob", "date of birth"),
    ("zip", "address"),
    ("pan", "card number"),
    ("card", "card number"),
];

/// Why a field name suggests PII, if it does.
pub fn suggests_pii(name: &str) -> Option<&'static str> {
    let words = split_words(name);
    let joined: String = words.concat();
    if let Some((_, kind)) = PII_FRAGMENTS.iter().find(|(fragment, _)| joined.contains(fragment)) {
        return Some(kind);
    }
    // A lone word such as `name` or `ip`, or one ending the name (`client_ip`, `customer_name`); not `name_length`
    // or `card_type`, which describe rather than hold.
    let last = words.last()?;
    PII_WORDS.iter().find(|(word, _)| last == word).map(|(_, kind)| *kind)
}

fn split_words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if c == '_' || c == '-' || c == '.' {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            previous_lower = false;
            continue;
        }
        if c.is_uppercase() && previous_lower && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        previous_lower = c.is_lowercase() || c.is_ascii_digit();
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pii_like_names_are_recognized() {
        for name in [
            "email",
            "contactEmail",
            "phone_number",
            "first_name",
            "customerName",
            "name",
            "client_ip",
            "dob",
            "home_address",
            "card_number",
            "iban",
            "birth_date",
            "ssn",
        ] {
            assert!(suggests_pii(name).is_some(), "{name}");
        }
        for name in [
            "event_id",
            "amount",
            "country",
            "currency",
            "name_length",
            "card_type",
            "ts",
            "shipping",
            "zipper_count",
        ] {
            assert_eq!(suggests_pii(name), None, "{name}");
        }
    }

    #[test]
    fn unannotated_pii_is_warned_and_annotation_errors_are_reported() {
        let schema = r#"{"type":"record","name":"R","fields":[
            {"name":"email","type":"string","pii":"tokenize"},
            {"name":"phone","type":"string"},
            {"name":"nick_name","type":"string","pii":"none"},
            {"name":"home","type":{"type":"record","name":"A","fields":[{"name":"street","type":"string"}]}},
            {"name":"address","type":{"type":"array","items":{"type":"record","name":"B","fields":[{"name":"zip","type":"string","pii":"mask"}]}}}
        ]}"#;
        let findings = check(schema, &PolicySettings::default());
        let warned: Vec<&str> = findings.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(warned, ["phone", "home.street"]);
        assert!(findings.iter().all(|f| f.severity == Severity::Warning));

        let bad = r#"{"type":"record","name":"R","fields":[{"name":"email","type":"string","pii":"scramble"}]}"#;
        let findings = check(bad, &PolicySettings::default());
        assert_eq!(findings[0].severity, Severity::Error);
        assert_eq!(findings[0].path, "email");
        assert!(findings[0].message.contains("unknown pii action"));
    }
}

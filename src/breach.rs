//! `piiwall breach assess`: what a leak of sanitized records exposes, in the terms of GDPR Art. 33(3). Each field
//! of the sanitized schema is classified by what piiwall did to it (its `pii.applied`: in clear, tokenized,
//! encrypted, hashed, masked, redacted); per field the records that carry it and the distinct keys its tokens and
//! ciphertexts name (a subject key is one data subject); over all, the keys an attacker would also need, and with
//! the key store at hand, which of them are domain keys (to rotate) and which subjects' keys are already destroyed.
//! The report holds field paths, counts and domain names: never a value, a token, a key id or a subject.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value as Json, json};

use crate::crypto::{KeyId, Token};
use crate::keys::Keyring;

/// What protects a field in the leaked records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protection {
    /// Not protected: the leak exposes the value as it is.
    Clear,
    /// Tokenized (a subject id, or a `tokenize` field): unreadable without its key, and linkable across records.
    Tokenized,
    Encrypted,
    /// Keyed hash: linkable, never reversible.
    Hashed,
    /// Part of the value kept in clear.
    Masked,
    /// Nothing of the value is there.
    Redacted,
}

impl Protection {
    pub fn name(self) -> &'static str {
        match self {
            Protection::Clear => "in clear",
            Protection::Tokenized => "tokenized",
            Protection::Encrypted => "encrypted",
            Protection::Hashed => "hashed",
            Protection::Masked => "masked",
            Protection::Redacted => "redacted",
        }
    }

    /// What the leak means for a field so protected (Art. 33(3)(c)).
    fn consequence(self) -> &'static str {
        match self {
            Protection::Clear => "exposed as it is",
            Protection::Tokenized => "unreadable without its key; records of one subject can be linked",
            Protection::Encrypted => "unreadable without its key",
            Protection::Hashed => "not reversible; equal values can be linked",
            Protection::Masked => "the kept part is exposed",
            Protection::Redacted => "nothing exposed",
        }
    }

    fn of(applied: &str) -> Protection {
        match applied {
            "tokenize" | "subject" => Protection::Tokenized,
            "encrypt" => Protection::Encrypted,
            "hash" => Protection::Hashed,
            "mask" => Protection::Masked,
            "redact" => Protection::Redacted,
            // "none" (released on purpose) and anything unknown: counted as exposed, failing towards caution.
            _ => Protection::Clear,
        }
    }
}

/// One field's exposure.
#[derive(Debug, Clone)]
pub struct FieldExposure {
    pub path: String,
    pub protection: Protection,
    /// Records in which the field holds a value (not null).
    pub records: u64,
    key_ids: HashSet<KeyId>,
}

impl FieldExposure {
    /// Distinct keys named by the field's tokens and ciphertexts.
    pub fn keys(&self) -> usize {
        self.key_ids.len()
    }
}

/// The assessment of a set of leaked records of one or more sanitized schemas.
#[derive(Debug, Clone, Default)]
pub struct BreachReport {
    pub records: u64,
    /// Records that are not sanitized records of a known schema (not assessed; counted).
    pub unreadable: u64,
    fields: Vec<FieldExposure>,
    by_path: HashMap<String, usize>,
    /// With the key store: key id -> what it is.
    owners: HashMap<KeyId, KeyOwner>,
}

/// Whose key a key id is, from the key store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyOwner {
    Subject,
    Domain(String),
    /// Destroyed by a forget: what it protected is unreadable to anyone.
    Destroyed,
    /// Not in this key store.
    Unknown,
}

impl BreachReport {
    pub fn fields(&self) -> &[FieldExposure] {
        &self.fields
    }

    /// Adds one leaked record, given as JSON (unions as bare values, as `sanitize` writes them), of the sanitized
    /// schema `schema`.
    pub fn add(&mut self, schema: &SanitizedSchema, record: &Json) {
        self.records += 1;
        self.visit(schema, &schema.root, record, "", None);
    }

    fn visit(&mut self, schema: &SanitizedSchema, ty: &Json, value: &Json, path: &str, applied: Option<&str>) {
        if let Some(applied) = applied {
            let index = self.field(path, Protection::of(applied));
            if !value.is_null() {
                self.fields[index].records += 1;
                let mut texts = Vec::new();
                strings(value, &mut texts);
                for text in texts {
                    if let Ok(token) = Token::parse(text) {
                        self.fields[index].key_ids.insert(token.key_id);
                    }
                }
            }
            return;
        }
        match resolve(schema, ty) {
            Json::Array(branches) => {
                // A union: the branch the value fits (records are objects; everything else is a leaf here).
                if value.is_null() {
                    return;
                }
                let branch = branches
                    .iter()
                    .find(|b| *b != "null" && is_record(schema, b) == value.is_object())
                    .or_else(|| branches.iter().find(|b| *b != "null"));
                if let Some(branch) = branch {
                    self.visit(schema, branch, value, path, None);
                }
            }
            Json::Object(object) => match object.get("type").and_then(Json::as_str) {
                Some("record") => {
                    for field in object.get("fields").and_then(Json::as_array).into_iter().flatten() {
                        let name = field["name"].as_str().unwrap_or_default();
                        let child = if path.is_empty() {
                            name.to_owned()
                        } else {
                            format!("{path}.{name}")
                        };
                        let applied = field.get("pii.applied").and_then(Json::as_str);
                        self.visit(
                            schema,
                            &field["type"],
                            value.get(name).unwrap_or(&Json::Null),
                            &child,
                            applied,
                        );
                    }
                }
                Some("array") => {
                    for item in value.as_array().into_iter().flatten() {
                        self.visit(schema, &object["items"], item, path, None);
                    }
                }
                Some("map") => {
                    // Map keys are the producer's data: never named in the report.
                    for entry in value.as_object().into_iter().flat_map(|m| m.values()) {
                        self.visit(schema, &object["values"], entry, path, None);
                    }
                }
                _ => self.leaf(path, value),
            },
            _ => self.leaf(path, value),
        }
    }

    /// An unannotated value: in clear.
    fn leaf(&mut self, path: &str, value: &Json) {
        let index = self.field(path, Protection::Clear);
        if !value.is_null() {
            self.fields[index].records += 1;
        }
    }

    fn field(&mut self, path: &str, protection: Protection) -> usize {
        if let Some(&index) = self.by_path.get(path) {
            return index;
        }
        self.fields.push(FieldExposure {
            path: path.to_owned(),
            protection,
            records: 0,
            key_ids: HashSet::new(),
        });
        self.by_path.insert(path.to_owned(), self.fields.len() - 1);
        self.fields.len() - 1
    }

    /// Looks every key id up in the key store: subject, domain (named), or destroyed by a forget.
    pub fn identify_keys(&mut self, keyring: &Keyring) -> Result<(), crate::error::KeyError> {
        let ids: HashSet<KeyId> = self.fields.iter().flat_map(|f| f.key_ids.iter().copied()).collect();
        for id in ids {
            let owner = match keyring.lookup_key(id)? {
                crate::keys::KeyLookup::Found(row) => match row.scope.strip_prefix("d:") {
                    Some(domain) => KeyOwner::Domain(domain.to_owned()),
                    None => KeyOwner::Subject,
                },
                crate::keys::KeyLookup::Shredded => KeyOwner::Destroyed,
                crate::keys::KeyLookup::Unknown => KeyOwner::Unknown,
            };
            self.owners.insert(id, owner);
        }
        Ok(())
    }

    fn owners_of<'a>(&'a self, ids: impl Iterator<Item = &'a KeyId>) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for id in ids {
            let name = match self.owners.get(id) {
                None => "keys",
                Some(KeyOwner::Subject) => "subject keys",
                Some(KeyOwner::Domain(_)) => "domain keys",
                Some(KeyOwner::Destroyed) => "destroyed keys (forgotten subjects)",
                Some(KeyOwner::Unknown) => "keys not in this key store",
            };
            *counts.entry(name).or_default() += 1;
        }
        counts
    }

    fn all_keys(&self) -> HashSet<KeyId> {
        self.fields.iter().flat_map(|f| f.key_ids.iter().copied()).collect()
    }

    fn domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self
            .owners
            .values()
            .filter_map(|o| match o {
                KeyOwner::Domain(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        domains.sort();
        domains.dedup();
        domains
    }

    /// The report as one JSON document, with the Art. 33(3) headings.
    pub fn to_json(&self, source: &str) -> Json {
        let all = self.all_keys();
        let subjects = self.owners.values().filter(|o| **o == KeyOwner::Subject).count();
        json!({
            "source": source,
            "records": self.records,
            "unreadable_records": self.unreadable,
            "a_categories_and_numbers": {
                "fields": self.fields.iter().map(|f| json!({
                    "field": f.path,
                    "protection": f.protection.name(),
                    "records": f.records,
                    "distinct_keys": f.keys(),
                    "keys_by_owner": self.owners_of(f.key_ids.iter()),
                })).collect::<Vec<_>>(),
                "records": self.records,
                "data_subjects_by_subject_key": if self.owners.is_empty() { Json::Null } else { json!(subjects) },
                "distinct_keys": all.len(),
            },
            "c_likely_consequences": self.fields.iter().map(|f| json!({
                "field": f.path, "protection": f.protection.name(), "consequence": f.protection.consequence(),
            })).collect::<Vec<_>>(),
            "d_measures": self.measures(),
        })
    }

    fn measures(&self) -> Vec<String> {
        let mut measures = Vec::new();
        let clear: Vec<&str> = self
            .fields
            .iter()
            .filter(|f| f.protection == Protection::Clear && f.records > 0)
            .map(|f| f.path.as_str())
            .collect();
        if !clear.is_empty() {
            measures.push(format!(
                "fields in clear are exposed as they are: {}; if any holds personal data, tag it in the schema \
                 (or set policy.detect) so it is protected from now on",
                clear.join(", ")
            ));
        }
        let all = self.all_keys();
        if !all.is_empty() {
            measures.push(format!(
                "the protected fields need {} distinct keys, held only in the key store under the KEK: keep both out \
                 of the attacker's reach; if the key store leaked too, rotate the KEK (keys.kek, then `piiwall keys \
                 rewrap`)",
                all.len()
            ));
        }
        for domain in self.domains() {
            measures.push(format!(
                "rotate the domain key {domain:?} so new records use a key the attacker has not seen: \
                 `piiwall keys rotate --domain {domain}`"
            ));
        }
        if self.owners.is_empty() && !all.is_empty() {
            measures.push(
                "run with the key store (--config) to tell subject keys from domain keys and count the data subjects"
                    .into(),
            );
        }
        measures
    }

    /// The report as text for a reader.
    pub fn render(&self, source: &str) -> String {
        let mut out = format!(
            "Breach assessment (GDPR Art. 33(3)) of {source}: {} records\n",
            self.records
        );
        if self.unreadable > 0 {
            out.push_str(&format!(
                "  {} records are not sanitized records of a known schema: not assessed\n",
                self.unreadable
            ));
        }
        out.push_str("\n(a) Categories of personal data, records and data subjects\n");
        out.push_str("  field  protection  records  distinct keys\n");
        for f in &self.fields {
            let owners: Vec<String> = self
                .owners_of(f.key_ids.iter())
                .iter()
                .map(|(name, n)| format!("{n} {name}"))
                .collect();
            let keys = if owners.is_empty() {
                "-".into()
            } else {
                owners.join(", ")
            };
            out.push_str(&format!(
                "  {}  {}  {}  {}\n",
                f.path,
                f.protection.name(),
                f.records,
                keys
            ));
        }
        let subjects = self.owners.values().filter(|o| **o == KeyOwner::Subject).count();
        if !self.owners.is_empty() {
            out.push_str(&format!("  data subjects (distinct subject keys): {subjects}\n"));
        }
        out.push_str("\n(c) Likely consequences\n");
        let mut seen = Vec::new();
        for f in &self.fields {
            if !seen.contains(&f.protection) {
                seen.push(f.protection);
                out.push_str(&format!("  {}: {}\n", f.protection.name(), f.protection.consequence()));
            }
        }
        out.push_str("\n(d) Measures\n");
        for measure in self.measures() {
            out.push_str(&format!("  - {measure}\n"));
        }
        out
    }
}

/// How long reading a topic to its end may take.
const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Assesses every record of a sanitized topic (Confluent-framed Avro), from its start to its end. `schema_of` gives
/// the sanitized schema text of a framed schema id (the registry's, or a local binding's), `None` if unknown: such
/// records, and records that are not framed or do not decode, are counted as unreadable.
pub fn assess_topic(
    client: &rdkafka::ClientConfig,
    topic: &str,
    mut schema_of: impl FnMut(u32) -> Option<String>,
) -> Result<BreachReport, crate::error::Error> {
    use rdkafka::Message;
    let mut schemas: HashMap<u32, Option<(SanitizedSchema, apache_avro::Schema)>> = HashMap::new();
    let mut report = BreachReport::default();
    crate::stream::read_topic(client, topic, "topic", READ_DEADLINE, |message| {
        let Some((id, mut body)) = message.payload().and_then(|p| crate::stream::parse_frame(p).ok()) else {
            report.records += 1;
            report.unreadable += 1;
            return Ok(());
        };
        let known = schemas.entry(id).or_insert_with(|| {
            let text = schema_of(id)?;
            Some((
                SanitizedSchema::parse(&text).ok()?,
                apache_avro::Schema::parse_str(&text).ok()?,
            ))
        });
        let decoded = known.as_ref().and_then(|(sanitized, avro)| {
            let reader = apache_avro::reader::datum::GenericDatumReader::builder(avro)
                .build()
                .ok()?;
            let value = reader.read_value(&mut body).ok()?;
            Some((sanitized, crate::codec::json::JsonCodec::new(avro).to_json(&value)))
        });
        match decoded {
            Some((sanitized, record)) => report.add(sanitized, &record),
            None => {
                report.records += 1;
                report.unreadable += 1;
            }
        }
        Ok(())
    })?;
    Ok(report)
}

/// Every string inside a value (a protected array or map holds several).
fn strings<'a>(value: &'a Json, out: &mut Vec<&'a str>) {
    match value {
        Json::String(s) => out.push(s),
        Json::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Json::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// A sanitized schema (with its `pii.applied` field attributes), its named types indexed.
pub struct SanitizedSchema {
    root: Json,
    named: HashMap<String, Json>,
}

impl SanitizedSchema {
    pub fn parse(text: &str) -> Result<Self, String> {
        let root: Json = serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let mut named = HashMap::new();
        index_named(&root, None, &mut named);
        Ok(Self { root, named })
    }
}

fn index_named(ty: &Json, namespace: Option<&str>, named: &mut HashMap<String, Json>) {
    match ty {
        Json::Array(branches) => branches.iter().for_each(|b| index_named(b, namespace, named)),
        Json::Object(object) => {
            let namespace = object.get("namespace").and_then(Json::as_str).or(namespace);
            if let Some(name) = object.get("name").and_then(Json::as_str) {
                named.insert(name.to_owned(), ty.clone());
                if let Some(ns) = namespace.filter(|_| !name.contains('.')) {
                    named.insert(format!("{ns}.{name}"), ty.clone());
                }
            }
            for field in object.get("fields").and_then(Json::as_array).into_iter().flatten() {
                index_named(&field["type"], namespace, named);
            }
            for inner in ["items", "values"] {
                if let Some(inner) = object.get(inner) {
                    index_named(inner, namespace, named);
                }
            }
        }
        _ => {}
    }
}

/// A type, with a reference to a named type (`"Address"`, or `{"type": "Address"}`) replaced by its definition.
fn resolve<'a>(schema: &'a SanitizedSchema, ty: &'a Json) -> &'a Json {
    let name = match ty {
        Json::String(name) => Some(name.as_str()),
        Json::Object(object) => object.get("type").and_then(Json::as_str),
        _ => None,
    };
    name.and_then(|name| schema.named.get(name)).unwrap_or(ty)
}

fn is_record(schema: &SanitizedSchema, ty: &Json) -> bool {
    resolve(schema, ty).get("type").and_then(Json::as_str) == Some("record")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type": "record", "name": "R", "fields": [
        {"name": "email", "type": "string", "pii.applied": "tokenize"},
        {"name": "note", "type": ["null", "string"], "pii.applied": "redact"},
        {"name": "city", "type": "string"},
        {"name": "tags", "type": {"type": "map", "values": "string"}},
        {"name": "inner", "type": ["null", {"type": "record", "name": "I", "fields": [
            {"name": "card", "type": "string", "pii.applied": "mask"}]}]}
    ]}"#;

    #[test]
    fn fields_are_classified_counted_and_their_keys_told_apart_without_any_value_in_the_report() {
        let schema = SanitizedSchema::parse(SCHEMA).unwrap();
        let key = |n: u8| KeyId([n; 12]);
        let token = |n: u8| Token::render(crate::crypto::TokenKind::Token, key(n), &[n; 20]);
        let mut report = BreachReport::default();
        for (n, note) in [(1u8, Json::Null), (2, json!("")), (1, Json::Null)] {
            report.add(
                &schema,
                &json!({"email": token(n), "note": note, "city": "Leeds", "tags": {"secret-key@example.com": "v"},
                        "inner": {"card": "************1111"}}),
            );
        }
        let field = |path: &str| report.fields().iter().find(|f| f.path == path).unwrap().clone();
        assert_eq!(
            (field("email").protection, field("email").records, field("email").keys()),
            (Protection::Tokenized, 3, 2)
        );
        assert_eq!(
            (field("note").protection, field("note").records),
            (Protection::Redacted, 1)
        );
        assert_eq!(
            (field("city").protection, field("city").records),
            (Protection::Clear, 3)
        );
        assert_eq!(field("inner.card").protection, Protection::Masked);
        assert_eq!(field("tags").protection, Protection::Clear);
        let text = report.render("leak.jsonl") + &report.to_json("leak.jsonl").to_string();
        for value in ["Leeds", "secret-key@example.com", "1111", &token(1), &key(1).to_text()] {
            assert!(!text.contains(value), "{value} in the report");
        }
        assert!(
            text.contains("fields in clear are exposed as they are: city, tags"),
            "{text}"
        );
    }
}

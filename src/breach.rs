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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    by_path: HashMap<(String, Protection), usize>,
    /// With the key store: key id -> what it is.
    owners: HashMap<KeyId, KeyOwner>,
}

/// Whose key a key id is, from the key store.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyOwner {
    /// A subject's key: its scope (a keyed hash, never shown), so a rotated subject counts once.
    Subject(String),
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
    /// schema `schema`. Anything but a JSON object is counted as unreadable.
    pub fn add(&mut self, schema: &SanitizedSchema, record: &Json) {
        self.records += 1;
        if !record.is_object() {
            self.unreadable += 1;
            return;
        }
        let mut touched = HashSet::new();
        self.visit(schema, &schema.root, record, "", None, None, &mut touched);
        for index in touched {
            self.fields[index].records += 1;
        }
    }

    /// Adds what a record's key exposes: a token (tokenized or hashed by the pipeline's `schemas.key`), bytes in
    /// clear, or a framed Avro key, whose schema this assessment does not read (counted apart, never as protected).
    pub fn add_key(&mut self, key: &[u8]) {
        let protection = match std::str::from_utf8(key).ok().and_then(|text| Token::parse(text).ok()) {
            Some(token) => {
                let protection = match token.kind {
                    crate::crypto::TokenKind::Hash => Protection::Hashed,
                    crate::crypto::TokenKind::Token => Protection::Tokenized,
                    _ => Protection::Encrypted,
                };
                let index = self.field("(record key)", protection);
                self.fields[index].key_ids.insert(token.key_id);
                self.fields[index].records += 1;
                return;
            }
            None if key.first() == Some(&0) && key.len() > 5 => "(record key, Avro: not assessed)",
            None => "(record key)",
        };
        let index = self.field(protection, Protection::Clear);
        self.fields[index].records += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn visit(
        &mut self,
        schema: &SanitizedSchema,
        ty: &Json,
        value: &Json,
        path: &str,
        applied: Option<&str>,
        namespace: Option<&str>,
        touched: &mut HashSet<usize>,
    ) {
        if let Some(applied) = applied {
            let index = self.field(path, Protection::of(applied));
            if !value.is_null() {
                touched.insert(index);
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
        let (ty, namespace) = schema.resolve(ty, namespace);
        match ty {
            Json::Array(branches) => {
                if value.is_null() {
                    return;
                }
                // A union: for an object, the record branch whose fields hold all its keys (the most of them), else
                // a map; for anything else, the first branch that is neither null nor a record.
                let branches: Vec<&Json> = branches.iter().filter(|b| *b != "null").collect();
                let branch = match value {
                    Json::Object(object) => branches
                        .iter()
                        .filter_map(|b| schema.record_fields(b, namespace).map(|names| (b, names)))
                        .max_by_key(|(_, names)| object.keys().filter(|k| names.contains(k.as_str())).count())
                        .filter(|(_, names)| object.keys().all(|k| names.contains(k.as_str())))
                        .map(|(b, _)| *b)
                        .or_else(|| {
                            branches
                                .iter()
                                .copied()
                                .find(|b| schema.kind(b, namespace) == Some("map"))
                        }),
                    _ => branches
                        .iter()
                        .copied()
                        .find(|b| schema.record_fields(b, namespace).is_none()),
                };
                match branch {
                    Some(branch) => self.visit(schema, branch, value, path, None, namespace, touched),
                    None => self.clear(path, "(values of no declared type)", touched),
                }
            }
            Json::Object(object) => match object.get("type").and_then(Json::as_str) {
                Some("record") => {
                    let declared: Vec<&Json> = object
                        .get("fields")
                        .and_then(Json::as_array)
                        .into_iter()
                        .flatten()
                        .collect();
                    for field in &declared {
                        let name = field["name"].as_str().unwrap_or_default();
                        let child = if path.is_empty() {
                            name.to_owned()
                        } else {
                            format!("{path}.{name}")
                        };
                        let applied = field.get("pii.applied").and_then(Json::as_str);
                        let child_value = value.get(name).unwrap_or(&Json::Null);
                        self.visit(schema, &field["type"], child_value, &child, applied, namespace, touched);
                    }
                    // Keys the schema does not declare: data nobody reviewed, in clear (named by count, not by key).
                    if let Some(fields) = value.as_object()
                        && fields.keys().any(|k| !declared.iter().any(|f| f["name"] == k.as_str()))
                    {
                        self.clear(path, "(fields not in the schema)", touched);
                    }
                }
                Some("array") => {
                    let items = object.get("items").unwrap_or(&Json::Null);
                    for item in value.as_array().into_iter().flatten() {
                        self.visit(schema, items, item, path, None, namespace, touched);
                    }
                }
                Some("map") => {
                    let values = object.get("values").unwrap_or(&Json::Null);
                    if let Some(entries) = value.as_object() {
                        // An unannotated map's keys are the producer's data, in clear: counted, never named.
                        if !entries.is_empty() {
                            self.clear(path, "(map keys)", touched);
                        }
                        for entry in entries.values() {
                            self.visit(schema, values, entry, path, None, namespace, touched);
                        }
                    }
                }
                _ => self.leaf(path, value, touched),
            },
            _ => self.leaf(path, value, touched),
        }
    }

    /// An unannotated value: in clear.
    fn leaf(&mut self, path: &str, value: &Json, touched: &mut HashSet<usize>) {
        let index = self.field(path, Protection::Clear);
        if !value.is_null() {
            touched.insert(index);
        }
    }

    /// Data in clear under `path` that is not a declared field of its own.
    fn clear(&mut self, path: &str, what: &str, touched: &mut HashSet<usize>) {
        let path = if path.is_empty() {
            what.to_owned()
        } else {
            format!("{path} {what}")
        };
        touched.insert(self.field(&path, Protection::Clear));
    }

    /// The row of a path under one protection: two schema versions that protect a field differently give two rows.
    fn field(&mut self, path: &str, protection: Protection) -> usize {
        let key = (path.to_owned(), protection);
        if let Some(&index) = self.by_path.get(&key) {
            return index;
        }
        self.fields.push(FieldExposure {
            path: path.to_owned(),
            protection,
            records: 0,
            key_ids: HashSet::new(),
        });
        self.by_path.insert(key, self.fields.len() - 1);
        self.fields.len() - 1
    }

    /// Looks every key id up in the key store: subject, domain (named), or destroyed by a forget.
    pub fn identify_keys(&mut self, keyring: &Keyring) -> Result<(), crate::error::KeyError> {
        let ids: HashSet<KeyId> = self.fields.iter().flat_map(|f| f.key_ids.iter().copied()).collect();
        for id in ids {
            let owner = match keyring.lookup_key(id)? {
                crate::keys::KeyLookup::Found(row) => match row.scope.strip_prefix("d:") {
                    Some(domain) => KeyOwner::Domain(domain.to_owned()),
                    None => KeyOwner::Subject(row.scope),
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
                Some(KeyOwner::Subject(_)) => "subject keys",
                Some(KeyOwner::Domain(_)) => "domain keys",
                Some(KeyOwner::Destroyed) => "destroyed keys (forgotten subjects)",
                Some(KeyOwner::Unknown) => "keys not in this key store",
            };
            *counts.entry(name).or_default() += 1;
        }
        counts
    }

    /// Distinct data subjects among the keys looked up (by scope: a rotated subject counts once), and whether some
    /// keys were not in the key store (then there are at least that many). `None` without a key store.
    fn subjects(&self) -> Option<(usize, bool)> {
        if self.owners.is_empty() {
            return None;
        }
        let scopes: HashSet<&str> = self
            .owners
            .values()
            .filter_map(|o| match o {
                KeyOwner::Subject(scope) => Some(scope.as_str()),
                _ => None,
            })
            .collect();
        Some((scopes.len(), self.owners.values().any(|o| *o == KeyOwner::Unknown)))
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
        let subjects = self.subjects();
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
                "data_subjects_by_subject_key": subjects.map(|(n, _)| n),
                "data_subjects_at_least": subjects.is_some_and(|(_, unknown)| unknown),
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
        if let Some((subjects, unknown)) = self.subjects() {
            let at_least = if unknown { "at least " } else { "" };
            out.push_str(&format!(
                "  data subjects (distinct subject keys): {at_least}{subjects}\n"
            ));
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
    // What an attacker holding the topic reads: aborted transactions' records too.
    let client = client.clone().set("isolation.level", "read_uncommitted").clone();
    crate::topic_reader::read_topic(&client, topic, "topic", READ_DEADLINE, |message| {
        if let Some(key) = message.key().filter(|k| !k.is_empty()) {
            report.add_key(key);
        }
        let Some((id, mut body)) = message.payload().and_then(|p| crate::stream::parse_frame(p).ok()) else {
            report.records += 1;
            report.unreadable += 1;
            return Ok(());
        };
        let known = schemas.entry(id).or_insert_with(|| {
            let text = schema_of(id)?;
            // A schema piiwall would not compile (a record holding itself, nesting past the bound) is not walked:
            // its records could take the decoder deeper than the stack.
            let parsed = SanitizedSchema::parse(&text).ok().zip(
                apache_avro::Schema::parse_str(&text)
                    .ok()
                    .filter(|avro| crate::policy::check_walkable(avro).is_ok()),
            );
            if parsed.is_none() {
                tracing::warn!(
                    schema_id = id,
                    "the sanitized schema of this id does not parse: its records are unreadable"
                );
            }
            parsed
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
        // A protected map's keys are tokens too.
        Json::Object(map) => map.iter().for_each(|(k, v)| {
            out.push(k);
            strings(v, out)
        }),
        _ => {}
    }
}

/// A sanitized schema (with its `pii.applied` field attributes), its named types indexed by full name.
pub struct SanitizedSchema {
    root: Json,
    named: HashMap<String, (Json, Option<String>)>,
}

impl SanitizedSchema {
    pub fn parse(text: &str) -> Result<Self, String> {
        let root: Json = serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
        let mut named = HashMap::new();
        index_named(&root, None, &mut named);
        Ok(Self { root, named })
    }

    /// Whether the text is a sanitized schema (its root says `"pii.sanitized": true`), not an annotated one.
    pub fn is_sanitized(text: &str) -> bool {
        serde_json::from_str::<Json>(text).is_ok_and(|root| root["pii.sanitized"] == true)
    }

    /// A type with a named reference (`"Address"`, `{"type": "Address"}`) replaced by its definition, and the
    /// namespace names inside it are resolved against.
    fn resolve<'a>(&'a self, ty: &'a Json, namespace: Option<&'a str>) -> (&'a Json, Option<&'a str>) {
        let own = ty.get("namespace").and_then(Json::as_str).or(namespace);
        let name = match ty {
            Json::String(name) => name.as_str(),
            Json::Object(object) => match object.get("type").and_then(Json::as_str) {
                // A definition (or a primitive) is itself, even where a type took the keyword as its name.
                Some("record" | "error" | "enum" | "fixed" | "array" | "map") | None => return (ty, own),
                Some(name) => name,
            },
            _ => return (ty, namespace),
        };
        let full = match (name.contains('.'), namespace) {
            (false, Some(ns)) => self.named.get(&format!("{ns}.{name}")),
            _ => None,
        };
        match full.or_else(|| self.named.get(name)) {
            Some((defined, ns)) => (defined, ns.as_deref()),
            None => (ty, own),
        }
    }

    fn kind<'a>(&'a self, ty: &'a Json, namespace: Option<&'a str>) -> Option<&'a str> {
        self.resolve(ty, namespace).0.get("type").and_then(Json::as_str)
    }

    /// The field names of a record type; `None` for any other type.
    fn record_fields<'a>(&'a self, ty: &'a Json, namespace: Option<&'a str>) -> Option<HashSet<&'a str>> {
        let (ty, _) = self.resolve(ty, namespace);
        (ty.get("type").and_then(Json::as_str) == Some("record")).then(|| {
            ty.get("fields")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(|f| f["name"].as_str())
                .collect()
        })
    }
}

/// Named types by full name (`namespace.name`, or the name as written when it has dots or no namespace applies),
/// each with the namespace its own references resolve in.
fn index_named(ty: &Json, namespace: Option<&str>, named: &mut HashMap<String, (Json, Option<String>)>) {
    match ty {
        Json::Array(branches) => branches.iter().for_each(|b| index_named(b, namespace, named)),
        Json::Object(object) => {
            let mut inner = object
                .get("namespace")
                .and_then(Json::as_str)
                .or(namespace)
                .map(str::to_owned);
            if let Some(name) = object.get("name").and_then(Json::as_str)
                && matches!(
                    object.get("type").and_then(Json::as_str),
                    Some("record" | "enum" | "fixed")
                )
            {
                let full = match (name.rsplit_once('.'), &inner) {
                    (Some((ns, _)), _) => {
                        inner = Some(ns.to_owned());
                        name.to_owned()
                    }
                    (None, Some(ns)) => format!("{ns}.{name}"),
                    (None, None) => name.to_owned(),
                };
                named.insert(full, (ty.clone(), inner.clone()));
            }
            for field in object.get("fields").and_then(Json::as_array).into_iter().flatten() {
                index_named(&field["type"], inner.as_deref(), named);
            }
            for key in ["items", "values"] {
                if let Some(nested) = object.get(key) {
                    index_named(nested, inner.as_deref(), named);
                }
            }
        }
        _ => {}
    }
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

    /// An inline record is itself, even in a schema where a type took `record` as its name (it was looked up by
    /// that name, and the report described the other record's fields).
    #[test]
    fn an_inline_definition_is_not_read_as_a_reference_to_a_type_named_like_its_keyword() {
        let schema = SanitizedSchema::parse(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "a", "type": {"type": "record", "name": "record", "fields": [
                    {"name": "ssn", "type": "string", "pii.applied": "encrypt"}]}},
                {"name": "b", "type": {"type": "record", "name": "B", "fields": [{"name": "city", "type": "string"}]}}
            ]}"#,
        )
        .unwrap();
        let mut report = BreachReport::default();
        report.add(&schema, &json!({"a": {"ssn": "pwe2.x.y"}, "b": {"city": "Leeds"}}));
        let paths: Vec<String> = report.fields().iter().map(|f| f.path.clone()).collect();
        assert!(paths.contains(&"b.city".to_owned()), "{paths:?}");
        assert!(!paths.contains(&"b.ssn".to_owned()), "{paths:?}");
    }

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

    /// Unions of two records (each branch's fields assessed), namespaces that reuse a short name, fields a record
    /// carries beyond its schema, an unannotated map's keys, and a path counted once per record however many array
    /// items hold it.
    #[test]
    fn unions_namespaces_undeclared_fields_map_keys_and_arrays_are_assessed() {
        let schema = SanitizedSchema::parse(
            r#"{"type": "record", "name": "Payment", "namespace": "com.a", "fields": [
                {"name": "method", "type": [
                    {"type": "record", "name": "Card", "fields": [
                        {"name": "number", "type": "string", "pii.applied": "mask"}]},
                    {"type": "record", "name": "Bank", "fields": [
                        {"name": "iban", "type": "string"}]}]},
                {"name": "billing", "type": {"type": "record", "name": "Address", "namespace": "com.b", "fields": [
                    {"name": "street", "type": "string", "pii.applied": "encrypt"}]}},
                {"name": "shipping", "type": {"type": "record", "name": "Address", "fields": [
                    {"name": "city", "type": "string"}]}},
                {"name": "again", "type": "com.b.Address"},
                {"name": "labels", "type": {"type": "map", "values": "string"}},
                {"name": "phones", "type": {"type": "array", "items": "string"}, "pii.applied": "tokenize"},
                {"name": "notes", "type": {"type": "array", "items": "string"}}
            ]}"#,
        )
        .unwrap();
        let mut report = BreachReport::default();
        report.add(
            &schema,
            &json!({"method": {"iban": "GB00"}, "billing": {"street": "x"}, "shipping": {"city": "Leeds"},
                    "again": {"street": "y"}, "labels": {"someone@example.com": "vip"}, "phones": ["a", "b"],
                    "notes": ["n1", "n2"], "ssn": "123"}),
        );
        report.add(
            &schema,
            &json!({"method": {"number": "****1111"}, "billing": {"street": "z"},
                                    "shipping": {"city": "York"}, "again": {"street": "w"}, "labels": {},
                                    "phones": [], "notes": []}),
        );
        report.add(&schema, &json!(42));
        let row = |path: &str| {
            report
                .fields()
                .iter()
                .find(|f| f.path == path)
                .map(|f| (f.protection, f.records))
        };
        assert_eq!(
            row("method.iban"),
            Some((Protection::Clear, 1)),
            "the second branch of the union"
        );
        assert_eq!(row("method.number"), Some((Protection::Masked, 1)));
        assert_eq!(row("billing.street"), Some((Protection::Encrypted, 2)));
        assert_eq!(
            row("shipping.city"),
            Some((Protection::Clear, 2)),
            "com.a.Address, not com.b.Address"
        );
        assert_eq!(
            row("again.street"),
            Some((Protection::Encrypted, 2)),
            "a reference by full name"
        );
        assert_eq!(row("labels (map keys)"), Some((Protection::Clear, 1)));
        assert_eq!(
            row("phones"),
            Some((Protection::Tokenized, 2)),
            "an empty array is still a value"
        );
        assert_eq!(
            row("notes"),
            Some((Protection::Clear, 1)),
            "once per record, not per item"
        );
        assert_eq!(row("(fields not in the schema)"), Some((Protection::Clear, 1)));
        assert_eq!(
            (report.records, report.unreadable),
            (3, 1),
            "a record that is not an object"
        );
        let text = report.render("x") + &report.to_json("x").to_string();
        for value in ["GB00", "Leeds", "someone@example.com", "ssn", "123", "1111"] {
            assert!(!text.contains(value), "{value}");
        }
    }

    #[test]
    fn record_keys_are_assessed_by_what_they_hold() {
        let key = Token::render(crate::crypto::TokenKind::Hash, KeyId([3; 12]), &[1; 32]);
        let mut report = BreachReport::default();
        report.add_key(key.as_bytes());
        report.add_key(b"cus_0001");
        report.add_key(&[0, 0, 0, 0, 7, 2, 4]);
        let rows: Vec<(&str, Protection, u64)> = report
            .fields()
            .iter()
            .map(|f| (f.path.as_str(), f.protection, f.records))
            .collect();
        assert_eq!(
            rows,
            [
                ("(record key)", Protection::Hashed, 1),
                ("(record key)", Protection::Clear, 1),
                ("(record key, Avro: not assessed)", Protection::Clear, 1)
            ]
        );
        assert!(!report.render("t").contains("cus_0001"));
    }
}

//! JSON records on a topic (framed JSON Schema records, or plain JSON): read into the Avro binary of the writer
//! schema, so the transcoder sanitizes them as it does Avro records, and the sanitized Avro written back as JSON.

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;

use super::avro::ValueCodec;
use super::json::JsonCodec;
use super::json_binary;
use crate::error::ValueError;
use crate::policy::{CompiledSchema, Undeclared};

/// The JSON reader and writer of one compiled schema.
pub struct JsonRecords {
    reader: JsonCodec,
    writer: JsonCodec,
    /// Both schemas are made of what [`json_binary`] takes: JSON goes to Avro binary and back directly.
    fast: bool,
    undeclared: Undeclared,
    omit_null_defaults: bool,
}

/// A record read from JSON: its Avro binary and how many undeclared properties were dropped.
pub struct Converted {
    pub avro: Vec<u8>,
    pub dropped: usize,
}

impl JsonRecords {
    pub fn new(schema: &CompiledSchema, undeclared: Undeclared) -> Self {
        let json_schema = schema.is_json();
        Self {
            reader: JsonCodec::records(&schema.writer, undeclared, json_schema),
            writer: JsonCodec::records(&schema.sanitized, Undeclared::Quarantine, json_schema),
            fast: json_binary::supports(&schema.writer) && json_binary::supports(&schema.sanitized),
            undeclared,
            omit_null_defaults: json_schema,
        }
    }

    /// Reads a JSON record (UTF-8 bytes) into the Avro binary of the writer schema.
    pub fn read(&self, schema: &CompiledSchema, json: &[u8]) -> Result<Converted, ValueError> {
        let parsed: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| ValueError::new("", format!("not JSON ({})", json_error_kind(&e))))?;
        let mut avro = Vec::with_capacity(json.len());
        if self.fast {
            let mut dropped = 0;
            let drop = self.undeclared == Undeclared::Drop;
            json_binary::encode(&schema.writer, &parsed, json.len(), drop, &mut dropped, &mut avro)?;
            return Ok(Converted { avro, dropped });
        }
        let (value, dropped) = self.reader.to_value_counted(&parsed, json.len())?;
        ValueCodec::for_writer(schema).encode(&value, &mut avro)?;
        Ok(Converted { avro, dropped })
    }

    /// Appends the JSON of a sanitized record (Avro binary of the sanitized schema) to `out`.
    pub fn write(&self, schema: &CompiledSchema, sanitized: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        if self.fast {
            let start = out.len();
            let written = json_binary::decode(&schema.sanitized, sanitized, self.omit_null_defaults, out);
            if written.is_err() {
                out.truncate(start);
            }
            return written;
        }
        let value = ValueCodec::for_sanitized(schema).decode(sanitized)?;
        serde_json::to_writer(out, &self.writer.to_json(&value))
            .map_err(|_| ValueError::new("", "the sanitized record cannot be written as JSON"))
    }
}

impl JsonRecords {
    /// The data subject a JSON record names, read leniently (the record need not be valid otherwise): for the
    /// quarantine of a record that cannot be sanitized, whose copy must be sealed under its subject's key (so a
    /// forget covers it) whenever the subject can be told. Read as the transcoder reads it: a non-empty string, an
    /// integer in decimal, a uuid in its canonical form; anything else is `None`.
    pub fn subject(&self, schema: &CompiledSchema, json: &[u8]) -> Option<String> {
        let subject = schema.plan.subject.as_ref()?;
        let path = &schema.plan.rules[subject.rule].path;
        let parsed: serde_json::Value = serde_json::from_slice(json).ok()?;
        let resolve = |ty| self.reader.resolve(ty);
        let (mut value, mut ty) = (&parsed, &schema.writer);
        for name in path.split('.') {
            let record = record_of(resolve(ty), resolve)?;
            let field = &record.fields[*record.lookup.get(name)?];
            ty = &field.schema;
            // An absent field reads as its default, as the codec reads it.
            value = match value.as_object()?.get(name) {
                Some(value) => value,
                None => field.default.as_ref()?,
            };
        }
        let ty = match resolve(ty) {
            Schema::Union(union) => resolve(union.variants().iter().find(|v| !matches!(v, Schema::Null))?),
            other => other,
        };
        match (ty, value) {
            (Schema::String, serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            // An unsigned 64-bit id (see `SubjectRef::unsigned`), written unsigned or by its signed bits.
            (Schema::Long, serde_json::Value::Number(n)) if subject.unsigned => n
                .as_u64()
                .or_else(|| n.as_i64().map(|n| n as u64))
                .map(|n| n.to_string()),
            (Schema::Int | Schema::Long, serde_json::Value::Number(n)) => n.as_i64().map(|n| n.to_string()),
            (Schema::Uuid(_), serde_json::Value::String(s)) => {
                apache_avro::Uuid::parse_str(s).ok().map(|u| u.to_string())
            }
            _ => None,
        }
    }
}

/// The record a type is, or the record branch of a union (references resolved by `resolve`).
fn record_of<'s>(schema: &'s Schema, resolve: impl Fn(&'s Schema) -> &'s Schema) -> Option<&'s RecordSchema> {
    match schema {
        Schema::Record(record) => Some(record),
        Schema::Union(union) => union.variants().iter().find_map(|v| match resolve(v) {
            Schema::Record(record) => Some(record),
            _ => None,
        }),
        _ => None,
    }
}

/// serde_json's error, by category and position only (its message can quote input).
pub fn json_error_kind(e: &serde_json::Error) -> String {
    let category = match e.classify() {
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Eof => "unexpected end",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Io => "read error",
    };
    format!("{category} at line {}, column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicySettings, compile};

    /// The subject of a record that does not convert is read as the transcoder would read it: through a named
    /// type used a second time (a reference) and from a field's default.
    #[test]
    fn a_subject_is_read_through_references_and_defaults() {
        let schema = compile(
            r#"{"type": "record", "name": "R", "pii.subject": "second.id", "fields": [
                {"name": "first", "type": {"type": "record", "name": "Party", "fields": [
                    {"name": "id", "type": "string", "default": "cus_default"}]}},
                {"name": "second", "type": "Party"},
                {"name": "n", "type": "long"}]}"#,
            &PolicySettings::default(),
        )
        .unwrap();
        let records = JsonRecords::new(&schema, Undeclared::Drop);
        let bad = br#"{"first": {"id": "a"}, "second": {"id": "cus_7"}, "n": "not a number"}"#;
        assert!(records.read(&schema, bad).is_err());
        assert_eq!(records.subject(&schema, bad).as_deref(), Some("cus_7"));
        let absent = br#"{"first": {"id": "a"}, "second": {}, "n": "x"}"#;
        assert_eq!(records.subject(&schema, absent).as_deref(), Some("cus_default"));
    }

    /// A plain JSON record of a `.proto` whose subject is a `uint64` names it unsigned, as the transcoder does,
    /// whether the producer wrote the id unsigned or by its signed bits (a record the reader refuses, quarantined
    /// under its subject's key, is reached by a forget of the id too).
    #[test]
    fn an_unsigned_subject_is_named_unsigned() {
        let schema = crate::policy::compile_protobuf(
            "syntax = \"proto3\"; import \"piiwall/pii.proto\"; message A { option (piiwall.subject) = \"id\"; \
             uint64 id = 1; string email = 2 [(piiwall.pii).action = \"tokenize\"]; }",
            &std::collections::HashMap::new(),
            None,
            &PolicySettings::default(),
        )
        .unwrap();
        let records = JsonRecords::new(&schema, Undeclared::Drop);
        for json in [
            &br#"{"id": -7, "email": 5}"#[..],
            br#"{"id": 18446744073709551609, "email": 5}"#,
        ] {
            assert!(records.read(&schema, json).is_err());
            assert_eq!(records.subject(&schema, json).as_deref(), Some("18446744073709551609"));
        }
        let transcoder = crate::transcode::Transcoder::new(&schema).unwrap();
        let converted = records.read(&schema, br#"{"id": -7, "email": "a@b.c"}"#).unwrap();
        assert_eq!(
            transcoder.subject(&converted.avro).unwrap().as_deref(),
            Some("18446744073709551609")
        );
    }
}

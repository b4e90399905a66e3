//! Codecs between wire forms and apache-avro values.
//!
//! - [`avro`]: Avro binary records to and from values (the reference path of the stream processor).
//! - [`json`]: plain JSON records (the form of `piiwall sanitize` and of `reveal`'s answers) to and from
//!   [`apache_avro::types::Value`], guided by the schema, with errors that name the field path and never the
//!   value.
//! - [`json_records`]: JSON records on a topic (JSON Schema or plain JSON), to and from the Avro binary the
//!   transcoder sanitizes.

pub mod avro;
pub mod json;
pub mod json_binary;
pub mod json_records;
pub mod protobuf;

use std::borrow::Cow;
use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};

use crate::error::{PolicyError, ValueError};
use crate::policy::{CompiledSchema, Undeclared};
use crate::transcode::Transcoder;

/// How a topic's records are carried to and from the Avro binary the transcoder sanitizes (Avro records are that
/// binary already and need neither).
pub enum Records {
    Json(Box<json_records::JsonRecords>),
    Protobuf(protobuf::ProtoRecords),
}

impl Records {
    /// The conversion a compiled schema's records need: JSON for JSON Schemas and for unframed (plain JSON) topics,
    /// whatever their schema; Confluent-framed protobuf for `.proto` schemas, transcoded directly by a program made
    /// from `transcoder`'s (see [`protobuf::ProtoRecords::transcode`]); `None` for framed Avro.
    pub fn for_schema(
        schema: &CompiledSchema,
        transcoder: &Transcoder,
        undeclared: Undeclared,
        framed: bool,
    ) -> Result<Option<Self>, PolicyError> {
        if let Some(proto) = schema.protobuf()
            && framed
        {
            return Ok(Some(Records::Protobuf(protobuf::ProtoRecords::transcoding(
                proto.writer.clone(),
                proto.sanitized_message.clone(),
                proto.indexes.clone(),
                undeclared,
                transcoder,
            )?)));
        }
        Ok((schema.is_json() || !framed)
            .then(|| Records::Json(Box::new(json_records::JsonRecords::new(schema, undeclared)))))
    }

    /// A record's payload as the Avro binary of the writer schema, and how many undeclared fields were dropped.
    pub fn read(&self, schema: &CompiledSchema, payload: &[u8]) -> Result<(Vec<u8>, usize), ValueError> {
        match self {
            Records::Json(json) => json.read(schema, payload).map(|c| (c.avro, c.dropped)),
            Records::Protobuf(proto) => proto.read(payload).map(|c| (c.avro, c.dropped)),
        }
    }

    /// The data subject a record names, read leniently (see [`json_records::JsonRecords::subject`] and
    /// [`protobuf::ProtoRecords::subject`]).
    pub fn subject(&self, schema: &CompiledSchema, payload: &[u8]) -> Option<String> {
        match self {
            Records::Json(json) => json.subject(schema, payload),
            Records::Protobuf(proto) => {
                let subject = schema.plan.subject.as_ref()?;
                proto.subject(&schema.plan.rules[subject.rule].path, payload)
            }
        }
    }

    /// Appends a sanitized record (Avro binary of the sanitized schema) in the topic's form.
    pub fn write(&self, schema: &CompiledSchema, sanitized: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        match self {
            Records::Json(json) => json.write(schema, sanitized, out),
            Records::Protobuf(proto) => proto.write(sanitized, out),
        }
    }
}

/// The Avro binary of a record's payload: the payload itself for Avro records, converted for the others.
pub fn avro_payload<'a>(
    records: Option<&Records>,
    schema: &CompiledSchema,
    payload: &'a [u8],
) -> Result<(Cow<'a, [u8]>, usize), ValueError> {
    match records {
        None => Ok((Cow::Borrowed(payload), 0)),
        Some(records) => {
            let (avro, dropped) = records.read(schema, payload)?;
            Ok((Cow::Owned(avro), dropped))
        }
    }
}

/// Every named type a schema defines, by name, to resolve `Schema::Ref`s.
pub(crate) fn schema_names(schema: &Schema) -> HashMap<&Name, &Schema> {
    let mut names = HashMap::new();
    collect_names(schema, &mut names);
    names
}

fn collect_names<'s>(schema: &'s Schema, names: &mut HashMap<&'s Name, &'s Schema>) {
    match schema {
        Schema::Record(record) if names.insert(&record.name, schema).is_none() => {
            record.fields.iter().for_each(|f| collect_names(&f.schema, names));
        }
        Schema::Enum(e) => {
            names.insert(&e.name, schema);
        }
        Schema::Fixed(f) | Schema::Uuid(UuidSchema::Fixed(f)) | Schema::Duration(f) => {
            names.insert(&f.name, schema);
        }
        Schema::Decimal(d) => {
            if let InnerDecimalSchema::Fixed(f) = &d.inner {
                names.insert(&f.name, schema);
            }
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

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

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};

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

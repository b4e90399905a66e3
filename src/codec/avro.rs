//! Avro binary <-> apache-avro values: the reference path (decode to a `Value` tree, sanitize, encode).
//!
//! apache-avro's own error messages can quote the value being read or written; these never leave this module:
//! the errors here say what went wrong, not with what.

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::error::ValueError;
use crate::policy::CompiledSchema;

/// A decoder for one schema and an encoder for another.
pub struct ValueCodec<'s> {
    reader: GenericDatumReader<'s>,
    writer: GenericDatumWriter<'s>,
}

impl<'s> ValueCodec<'s> {
    /// The reference path: decodes the writer schema, encodes the sanitized schema.
    pub fn new(schema: &'s CompiledSchema) -> Self {
        Self::between(&schema.writer, &schema.sanitized)
    }

    /// Decodes and encodes the writer schema: what producers write.
    pub fn for_writer(schema: &'s CompiledSchema) -> Self {
        Self::between(&schema.writer, &schema.writer)
    }

    /// Decodes and encodes the sanitized schema: what consumers of the output read.
    pub fn for_sanitized(schema: &'s CompiledSchema) -> Self {
        Self::between(&schema.sanitized, &schema.sanitized)
    }

    fn between(read: &'s Schema, write: &'s Schema) -> Self {
        Self {
            reader: GenericDatumReader::builder(read)
                .build()
                .expect("a compiled schema resolves"),
            writer: GenericDatumWriter::builder(write)
                .build()
                .expect("a compiled schema resolves"),
        }
    }

    /// Decodes one record; every byte must belong to it.
    pub fn decode(&self, mut bytes: &[u8]) -> Result<Value, ValueError> {
        let value = self.reader.read_value(&mut bytes).map_err(|_| {
            ValueError::new(
                "",
                "the bytes are not a record of the writer schema (truncated, corrupted, or written with another schema)",
            )
        })?;
        if !bytes.is_empty() {
            return Err(ValueError::new(
                "",
                format!(
                    "{} bytes remain after the record: it was written with another schema",
                    bytes.len()
                ),
            ));
        }
        Ok(value)
    }

    /// Encodes a record, appending to `out`.
    pub fn encode(&self, value: &Value, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.writer
            .write_value_ref(out, value)
            .map(drop)
            .map_err(|_| ValueError::new("", "the record does not fit its schema"))
    }
}

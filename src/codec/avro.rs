//! Avro binary <-> apache-avro values: the reference path (decode to a `Value` tree, sanitize, encode).
//!
//! apache-avro's own error messages can quote the value being read or written; these never leave this module:
//! the errors here say what went wrong, not with what.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::error::ValueError;
use crate::policy::CompiledSchema;

/// Decoder for the writer schema and encoder for the sanitized schema of one compiled schema.
pub struct ValueCodec<'s> {
    reader: GenericDatumReader<'s>,
    writer: GenericDatumWriter<'s>,
}

impl<'s> ValueCodec<'s> {
    pub fn new(schema: &'s CompiledSchema) -> Self {
        let reader = GenericDatumReader::builder(&schema.writer)
            .build()
            .expect("a compiled writer schema resolves");
        let writer = GenericDatumWriter::builder(&schema.sanitized)
            .build()
            .expect("a compiled sanitized schema resolves");
        Self { reader, writer }
    }

    /// Decodes one record of the writer schema; every byte must belong to it.
    pub fn decode(&self, mut bytes: &[u8]) -> Result<Value, ValueError> {
        let value = self
            .reader
            .read_value(&mut bytes)
            .map_err(|_| ValueError::new("", "the bytes are not a record of the writer schema (truncated, corrupted, or written with another schema)"))?;
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

    /// Encodes a sanitized record, appending to `out`.
    pub fn encode(&self, value: &Value, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.writer
            .write_value_ref(out, value)
            .map(drop)
            .map_err(|_| ValueError::new("", "the sanitized record does not fit the sanitized schema"))
    }
}

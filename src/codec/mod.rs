//! Codecs between wire forms and apache-avro values.
//!
//! - [`avro`]: Avro binary records to and from values (the reference path of the stream processor).
//! - [`json`]: plain JSON records (the form of `piiwall sanitize` and of `reveal`'s answers) to and from
//!   [`apache_avro::types::Value`], guided by the schema, with errors that name the field path and never the
//!   value.

pub mod avro;
pub mod json;

//! `piiwall sanitize`: plain-JSON records in, sanitized plain-JSON records out, one per line.
//!
//! A line that cannot be sanitized is reported (line number and field path, never the value) and skipped; the
//! rest go on. A key store or KEK failure stops the run: it would fail every line the same way.
//!
//! Each record takes the stream processor's path: JSON is encoded as Avro with the writer schema, sanitized by the
//! binary transcoder, and the result decoded with the sanitized schema back to JSON.

use std::io::{BufRead, Write};

use serde_json::Value as Json;

use crate::codec::avro::ValueCodec;
use crate::codec::json::JsonCodec;
use crate::error::{Error, ErrorKind};
use crate::keys::Retired;
use crate::policy::CompiledSchema;
use crate::sanitize::Sanitizer;
use crate::transcode::{TranscodeScratch, Transcoder};

/// Lines read and sanitized together.
const CHUNK: usize = 500;

/// How a run went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub sanitized: usize,
    pub failed: usize,
    /// Keys rotated on reaching `keys.max_encryptions_per_key`.
    pub retired: Vec<Retired>,
    /// PII found in fields no annotation protects (`policy.detect`), by field path, detector and what was done.
    pub detections: crate::transcode::Detections,
}

/// Sanitizes every line of `input` into `output`; `on_error` hears of each line that failed (1-based number).
/// Keys that reach `max_encryptions` are rotated as the stream processor does (`Keyring::retire_worn`).
pub fn sanitize_lines(
    schema: &CompiledSchema,
    sanitizer: &Sanitizer,
    max_encryptions: u64,
    input: impl BufRead,
    mut output: impl Write,
    mut on_error: impl FnMut(usize, &Error),
) -> Result<Summary, Error> {
    let reader = JsonCodec::new(&schema.writer);
    let writer = JsonCodec::new(&schema.sanitized);
    let (raw_codec, sanitized_codec) = (ValueCodec::for_writer(schema), ValueCodec::for_sanitized(schema));
    let transcoder = Transcoder::new(schema)?;
    let mut scratch = TranscodeScratch::default();
    let (mut raw, mut sanitized) = (Vec::new(), Vec::new());
    let mut summary = Summary::default();
    let mut lines = input.lines().enumerate();
    loop {
        // A chunk of lines at a time, so the keys of new subjects are created in one store transaction.
        let mut chunk: Vec<(usize, Result<Vec<u8>, Error>)> = Vec::with_capacity(CHUNK);
        for (index, line) in lines.by_ref() {
            let number = index + 1;
            let line = line.map_err(|e| Error::io(format!("reading line {number}"), e))?;
            if line.trim().is_empty() {
                continue;
            }
            let encoded = serde_json::from_str::<Json>(&line)
                .map_err(|e| crate::error::ValueError::new("", format!("not JSON ({})", json_error_kind(&e))).into())
                .and_then(|json| reader.to_value(&json).map_err(Error::from))
                .and_then(|value| {
                    raw.clear();
                    raw_codec.encode(&value, &mut raw)?;
                    Ok(raw.clone())
                });
            chunk.push((number, encoded));
            if chunk.len() == CHUNK {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let mut subjects = Vec::new();
        let mut needs_domain = false;
        for raw in chunk.iter().filter_map(|(_, r)| r.as_ref().ok()) {
            let Ok(subject) = transcoder.subject(raw) else { continue };
            needs_domain |= schema.plan.needs_domain_key(subject.is_some());
            subjects.extend(subject.map(|s| s.into_owned()));
        }
        let domain = needs_domain.then(|| sanitizer.domain_of(&schema.plan));
        let keys = sanitizer
            .keyring()
            .prefetch(subjects.iter().map(String::as_str), domain)?;
        for (number, encoded) in chunk {
            let result = encoded.and_then(|raw| {
                sanitized.clear();
                sanitizer.sanitize_binary_in(schema, &transcoder, &raw, Some(&keys), &mut scratch, &mut sanitized)?;
                Ok(sanitized_codec.decode(&sanitized)?)
            });
            match result {
                Ok(value) => {
                    serde_json::to_writer(&mut output, &writer.to_json(&value))
                        .map_err(|e| Error::io("writing output", e.into()))?;
                    output.write_all(b"\n").map_err(|e| Error::io("writing output", e))?;
                    summary.sanitized += 1;
                }
                Err(e) if e.kind() == ErrorKind::Poison => {
                    on_error(number, &e);
                    summary.failed += 1;
                }
                Err(e) => return Err(e),
            }
        }
        let retired = sanitizer.keyring().retire_worn(&keys, max_encryptions)?;
        summary.retired.extend(retired);
    }
    output.flush().map_err(|e| Error::io("writing output", e))?;
    summary.detections = scratch.take_detections();
    Ok(summary)
}

/// serde_json's error, by category and column only (its message can quote input).
fn json_error_kind(e: &serde_json::Error) -> String {
    let category = match e.classify() {
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Eof => "unexpected end",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Io => "read error",
    };
    format!("{category} at column {}", e.column())
}

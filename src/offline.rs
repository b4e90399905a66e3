//! `piiwall sanitize`: plain-JSON records in, sanitized plain-JSON records out, one per line.
//!
//! A line that cannot be sanitized is reported (line number and field path, never the value) and skipped; the
//! rest go on. A key store or KEK failure stops the run: it would fail every line the same way.
//!
//! Each record takes the stream processor's path: JSON is encoded as Avro with the writer schema (Avro, or a JSON
//! Schema translated to Avro), sanitized by the binary transcoder, and the result decoded with the sanitized schema
//! back to JSON. Properties the schema does not declare are dropped (counted) or fail the line, as
//! `policy.undeclared` says.

use std::io::{BufRead, Write};

use crate::codec::json_records::JsonRecords;
use crate::error::{Error, ErrorKind};
use crate::keys::Retired;
use crate::policy::{CompiledSchema, Undeclared};
use crate::sanitize::Sanitizer;
use crate::transcode::{TranscodeScratch, Transcoder};

/// Lines read and sanitized together.
const CHUNK: usize = 500;

/// How a run went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub sanitized: usize,
    pub failed: usize,
    /// Properties the schema does not declare, dropped (`policy.undeclared = "drop"`).
    pub dropped: usize,
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
    undeclared: Undeclared,
    input: impl BufRead,
    mut output: impl Write,
    mut on_error: impl FnMut(usize, &Error),
) -> Result<Summary, Error> {
    let records = JsonRecords::new(schema, undeclared);
    let transcoder = Transcoder::new(schema)?;
    let mut scratch = TranscodeScratch::default();
    let (mut sanitized, mut json) = (Vec::new(), Vec::new());
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
            let encoded = records
                .read(schema, line.as_bytes())
                .map_err(Error::from)
                .map(|converted| {
                    summary.dropped += converted.dropped;
                    converted.avro
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
                json.clear();
                records.write(schema, &sanitized, &mut json)?;
                json.push(b'\n');
                Ok(())
            });
            match result {
                Ok(()) => {
                    output.write_all(&json).map_err(|e| Error::io("writing output", e))?;
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
    // The counts below a recording step, which the next run would not see otherwise. Best effort: the output is
    // written and the rotations must still be reported; a store that fails here loses at most a step per key, as a
    // crash does.
    if let Err(e) = sanitizer.keyring().record_all_counts() {
        tracing::warn!(error = %e, "the encryption counts of this run's keys were not recorded");
    }
    summary.detections = scratch.take_detections();
    Ok(summary)
}

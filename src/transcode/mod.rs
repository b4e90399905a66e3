//! The binary transcoder: sanitizes Avro binary records without building a `Value` tree.
//!
//! A [`Transcoder`] is compiled once per schema from the writer schema and the plan. It walks a record's bytes,
//! copying the runs that do not change as they are, decoding only the protected values and writing their
//! replacements; the only allocation is the caller's output buffer (and [`TranscodeScratch`], reused). Its output
//! is byte for byte the reference path's (decode to `Value`, [`crate::sanitize::apply`], encode) for every
//! deterministic action; `encrypt` differs only by its random nonces.
//!
//! Malformed input — truncated values, overlong varints, negative lengths, out-of-range enum or union indices,
//! block counts larger than the record could hold, invalid UTF-8 — is an error, never a panic, and never makes it
//! allocate more than the input warrants.

pub(crate) mod program;
mod run;
pub(crate) mod wire;

use std::borrow::Cow;

pub use run::{Detection, Detections, TranscodeScratch};
pub(crate) use run::{MAX_OUTPUT, inspect_text, run_step};

use crate::error::{PolicyError, ValueError};
use crate::policy::CompiledSchema;
use crate::sanitize::RecordKeys;
use program::{Builder, Locate, Step};

/// A compiled schema's plan, as a program over Avro binary.
#[derive(Debug, Clone)]
pub struct Transcoder {
    root: Step,
    subject: Option<Locate>,
    /// Whether the subject is an unsigned 64-bit id held in a long (see `SubjectRef::unsigned`).
    unsigned_subject: bool,
}

impl Transcoder {
    pub fn new(schema: &CompiledSchema) -> Result<Self, PolicyError> {
        let builder = Builder::new(&schema.writer, &schema.plan.detect);
        let root = builder.root(&schema.writer, &schema.plan)?;
        let subject = match &schema.plan.subject {
            Some(subject) => Some(
                builder
                    .locate(&schema.writer, &subject.steps)
                    .map_err(|e| PolicyError::new(&schema.plan.rules[subject.rule].path, e.problem))?,
            ),
            None => None,
        };
        Ok(Self {
            root,
            subject,
            unsigned_subject: schema.plan.subject.as_ref().is_some_and(|s| s.unsigned),
        })
    }

    /// The program's root: the step of the writer schema's root record.
    pub(crate) fn root(&self) -> &Step {
        &self.root
    }

    /// The subject id of a record (`None` when the schema names none, or the record's is null or empty).
    pub fn subject<'a>(&self, record: &'a [u8]) -> Result<Option<Cow<'a, str>>, ValueError> {
        match &self.subject {
            Some(locate) => run::locate_subject(record, locate, self.unsigned_subject),
            None => Ok(None),
        }
    }

    /// Appends the sanitized form of `record` to `out`. On error `out` is left as it was.
    pub fn transcode(
        &self,
        schema: &CompiledSchema,
        record: &[u8],
        keys: &RecordKeys,
        scratch: &mut TranscodeScratch,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        let start = out.len();
        let result = run::Run::new(record, out, scratch, keys, &schema.plan.rules).finish(&self.root);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }
}

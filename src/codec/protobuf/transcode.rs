//! The direct transcoder of protobuf records, as `run` uses it: protobuf bytes in, protobuf bytes of the sanitized
//! message out, with no conversion of the fields that do not change.
//!
//! It walks a record's fields in wire order. A field nothing changes is checked (its wire type, UTF-8, a packed run,
//! a map entry) and left in the run of bytes copied in one piece; a nested message is walked the same way, so what
//! it holds is checked and its undeclared fields dropped; a string a detector looks at is looked at in place. A
//! field that changes (protected, or looked at where a detection could rewrite it) is read into the Avro binary of
//! its translation, one occurrence at a time, run by the Avro transcoder's step for it, and written back as the
//! sanitized field: actions, plaintext forms (so reveal gives the original types), forgotten subjects and detection
//! are the Avro path's own.
//!
//! Every occurrence of a field is sanitized and written where it was, so protobuf's rules read the output as they
//! read the input: the last occurrence of a scalar wins, the occurrences of a singular message merge, the last
//! member of a oneof is the one set. A proto3 field without presence that is absent reads as its zero: when such a
//! field changes, its zero is sanitized and written (a pseudonym of zero reads the same whether the producer wrote
//! the zero or left it out), as the conversion path does.

use crate::transcode::MAX_OUTPUT;
use std::sync::Arc;

use super::{
    At, EXPANDS, LEN, Reader, Wire, fixed, malformed, next_field, undeclared, varint, wire_type_of, write_field,
    write_key, write_len,
};
use crate::error::{PolicyError, ValueError};
use crate::policy::protobuf::{Field, Label, Message, Scalar, Type};
use crate::policy::{Rule, Undeclared};
use crate::sanitize::RecordKeys;
use crate::transcode::program::{self, Inspect, ShapeStep, Skip, Step};
use crate::transcode::wire::Input;
use crate::transcode::{TranscodeScratch, inspect_text, run_step};

/// Field numbers below this are found through a table; the rest through the message's map.
const DENSE: usize = 256;

/// A message of the program: what to do with each of its fields.
#[derive(Debug)]
pub(crate) struct MessageStep {
    writer: Arc<Message>,
    sanitized: Arc<Message>,
    /// The message's path in the record (empty for the record itself), for errors.
    path: String,
    fields: Vec<FieldStep>,
    /// `dense[n]`: one more than the index of field number `n`, 0 when no field has it.
    dense: Vec<u32>,
    /// The fields whose absence means something: required ones (an error), and proto3 ones without presence that
    /// change (their zero is sanitized).
    watch: Vec<usize>,
}

#[derive(Debug)]
struct FieldStep {
    kind: Kind,
    /// Its place in `watch`.
    watch: Option<usize>,
}

#[derive(Debug)]
enum Kind {
    /// Nothing changes it: checked and copied as it is.
    Copy,
    /// A singular string no annotation protects, which detectors look at.
    Inspect(Inspect),
    /// A message (singular or repeated) whose fields are walked.
    Walk(MessageStep),
    /// A protected singular scalar: its value alone converted to Avro, run by this step of the Avro program, and
    /// written back (the common case of `Convert`, without a field's framing on either side).
    Protect(Step),
    /// Converted to Avro, run by this step of the Avro program, and written back.
    Convert(Step),
}

fn mismatch() -> PolicyError {
    PolicyError::new("", "the protobuf transcoder's plan does not match its schema")
}

impl MessageStep {
    /// The program of `writer` (written as `sanitized`) from the Avro program's step of its translation.
    pub(crate) fn new(
        writer: &Arc<Message>,
        sanitized: &Arc<Message>,
        step: &Step,
        path: &str,
    ) -> Result<Self, PolicyError> {
        if writer.fields.len() != sanitized.fields.len() {
            return Err(mismatch());
        }
        let mut fields = Vec::with_capacity(writer.fields.len());
        let mut watch = Vec::new();
        for (index, field) in writer.fields.iter().enumerate() {
            let step = field_step(step, index)?;
            let field_path = if path.is_empty() {
                field.name.clone()
            } else {
                format!("{path}.{}", field.name)
            };
            let kind = kind(field, &sanitized.fields[index], step, &field_path)?;
            let watched = match field.label {
                Label::Required => true,
                Label::Implicit => matches!(kind, Kind::Convert(_) | Kind::Protect(_)),
                _ => false,
            };
            fields.push(FieldStep {
                watch: watched.then(|| {
                    watch.push(index);
                    watch.len() - 1
                }),
                kind,
            });
        }
        let mut dense = vec![0; DENSE];
        for (index, field) in writer.fields.iter().enumerate() {
            if let Some(slot) = dense.get_mut(field.number as usize) {
                *slot = index as u32 + 1;
            }
        }
        Ok(Self {
            writer: writer.clone(),
            sanitized: sanitized.clone(),
            path: path.to_owned(),
            fields,
            dense,
            watch,
        })
    }

    fn index(&self, number: u32) -> Option<usize> {
        match self.dense.get(number as usize) {
            Some(0) => None,
            Some(slot) => Some(*slot as usize - 1),
            None => self.writer.by_number.get(&number).copied(),
        }
    }
}

/// The step of a record's field `index`.
fn field_step(step: &Step, index: usize) -> Result<Step, PolicyError> {
    match step {
        Step::Record(steps) => steps.get(index).cloned(),
        Step::Skip(Skip::Record { fields, .. }) => fields.get(index).cloned().map(Step::Skip),
        _ => None,
    }
    .ok_or_else(mismatch)
}

fn kind(field: &Field, sanitized: &Field, step: Step, path: &str) -> Result<Kind, PolicyError> {
    Ok(match (&field.ty, step) {
        (Type::Scalar(_) | Type::Enum(_), Step::Protect(protect))
            if matches!(field.label, Label::Implicit | Label::Required) =>
        {
            Kind::Protect(Step::Protect(protect))
        }
        (_, Step::Protect(protect)) => Kind::Convert(Step::Protect(protect)),
        (Type::Message(inner), step) if !matches!(field.label, Label::Map(_)) => {
            let Type::Message(sanitized_inner) = &sanitized.ty else {
                return Err(mismatch());
            };
            let step = match (field.label, step) {
                (Label::Optional, Step::Union(mut branches)) if branches.len() == 2 => branches.pop().expect("two"),
                (Label::Optional, Step::Skip(Skip::Union(mut branches))) if branches.len() == 2 => {
                    Step::Skip(branches.pop().expect("two"))
                }
                (Label::Repeated, Step::Array(items)) => items.item,
                (Label::Repeated, Step::Skip(Skip::Array(item))) => Step::Skip(*item),
                (Label::Implicit | Label::Required, step) => step,
                _ => return Err(mismatch()),
            };
            Kind::Walk(MessageStep::new(inner, sanitized_inner, &step, path)?)
        }
        (Type::Message(_), step) => Kind::Convert(step),
        (_, Step::Skip(_)) => Kind::Copy,
        (Type::Scalar(Scalar::String), Step::Inspect(inspect))
            if matches!(field.label, Label::Implicit | Label::Required) && !inspect.redacts() =>
        {
            Kind::Inspect(*inspect)
        }
        (_, step) => Kind::Convert(step),
    })
}

/// Which watched fields a message has shown.
enum Seen {
    Few(u64),
    Many(Vec<bool>),
}

impl Seen {
    fn new(watched: usize) -> Self {
        if watched <= 64 {
            Seen::Few(0)
        } else {
            Seen::Many(vec![false; watched])
        }
    }

    fn insert(&mut self, at: usize) {
        match self {
            Seen::Few(bits) => *bits |= 1 << at,
            Seen::Many(seen) => seen[at] = true,
        }
    }

    fn contains(&self, at: usize) -> bool {
        match self {
            Seen::Few(bits) => bits & (1 << at) != 0,
            Seen::Many(seen) => seen[at],
        }
    }
}

/// One record's walk.
pub(crate) struct Walker<'a> {
    rules: &'a [Rule],
    keys: &'a RecordKeys,
    scratch: &'a mut TranscodeScratch,
    undeclared: Undeclared,
    /// Undeclared fields dropped so far.
    pub(crate) dropped: usize,
    /// What the record may still make the walker do, as the reader's budget (see `Reader`): a message occurrence
    /// and each zero it writes count one, as does each field a conversion visits.
    visits_left: usize,
    /// The repeated item being walked (0: none), the items numbered as they come.
    item: usize,
    items: usize,
    /// The singular messages, by step and repeated item, whose first occurrence has been walked.
    walked: Vec<(usize, usize)>,
    /// Bytes the record's protected and converted fields have written: bounded as the Avro transcoder bounds a
    /// record's output (a token of an absent field's zero is ~60 bytes, written for every empty repeated item).
    written: usize,
}

impl<'a> Walker<'a> {
    /// The walk of a record of `size` bytes.
    pub(crate) fn new(
        rules: &'a [Rule],
        keys: &'a RecordKeys,
        scratch: &'a mut TranscodeScratch,
        undeclared: Undeclared,
        size: usize,
    ) -> Self {
        Self {
            rules,
            keys,
            scratch,
            undeclared,
            dropped: 0,
            visits_left: Reader::new(undeclared, size).visits_left,
            item: 0,
            items: 0,
            walked: Vec::new(),
            written: 0,
        }
    }

    /// Counts what a protected or converted field wrote to `out` since `before`, refusing the record past
    /// [`MAX_OUTPUT`].
    fn wrote(&mut self, before: usize, out: &[u8], path: &str) -> Result<(), ValueError> {
        self.written += out.len().saturating_sub(before);
        if self.written > MAX_OUTPUT {
            return Err(ValueError::new(
                path,
                format!(
                    "the record's sanitized form passes {} MiB (tokens of small or absent values are far larger \
                     than what they replace)",
                    MAX_OUTPUT >> 20
                ),
            ));
        }
        Ok(())
    }

    /// Appends the sanitized form of a message's bytes. `first`: whether this is the first of the occurrences that
    /// merge into one message, which alone writes the zeros of the absent fields that change and must hold the
    /// required ones (a later occurrence's values override those zeros, as protobuf merges them).
    pub(crate) fn message(
        &mut self,
        step: &MessageStep,
        bytes: &[u8],
        first: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        let here = At {
            parent: &step.path,
            name: "",
        };
        self.visits_left = self
            .visits_left
            .checked_sub(1 + if first { step.watch.len() } else { 0 })
            .ok_or_else(|| ValueError::new(&step.path, EXPANDS))?;
        // Only a first occurrence looks at which fields it lacks.
        let mut seen = first.then(|| Seen::new(step.watch.len()));
        let (mut pos, mut copy_from) = (0, 0);
        while pos < bytes.len() {
            let start = pos;
            let (number, value) = next_field(bytes, &mut pos, here)?;
            let Some(index) = step.index(number) else {
                if self.undeclared == Undeclared::Quarantine {
                    return Err(undeclared(&step.path, number));
                }
                out.extend_from_slice(&bytes[copy_from..start]);
                copy_from = pos;
                self.dropped += 1;
                continue;
            };
            let field = &step.writer.fields[index];
            let at = At {
                parent: &step.path,
                name: &field.name,
            };
            let field_step = &step.fields[index];
            if let (Some(seen), Some(place)) = (&mut seen, field_step.watch) {
                seen.insert(place);
            }
            match &field_step.kind {
                Kind::Copy => check(field, value, at)?,
                Kind::Inspect(inspect) => {
                    // Never rewritten here: detectors that redact make the field a `Convert` (see `kind`).
                    inspect_text(text(value, at)?, inspect, self.scratch)?;
                }
                Kind::Walk(inner) => {
                    let Wire::Len(run) = value else {
                        return Err(malformed(at, "a message field that is not length-delimited"));
                    };
                    out.extend_from_slice(&bytes[copy_from..start]);
                    write_key(field.number, LEN, out);
                    if field.label == Label::Repeated {
                        // Each item is a message of its own; what was walked in it is of no further use.
                        let (outer, walked) = (self.item, self.walked.len());
                        self.items += 1;
                        self.item = self.items;
                        self.nested(inner, run, true, out)?;
                        self.item = outer;
                        self.walked.truncate(walked);
                    } else {
                        let first = inner.watch.is_empty() || self.first_occurrence(inner);
                        self.nested(inner, run, first, out)?;
                    }
                    copy_from = pos;
                }
                Kind::Protect(avro) => {
                    out.extend_from_slice(&bytes[copy_from..start]);
                    let before = out.len();
                    self.protect(field, &step.sanitized.fields[index], avro, value, at, out)?;
                    self.wrote(before, out, &step.path)?;
                    copy_from = pos;
                }
                Kind::Convert(avro) => {
                    out.extend_from_slice(&bytes[copy_from..start]);
                    let before = out.len();
                    self.convert(field, &step.sanitized.fields[index], avro, Some(value), &step.path, out)?;
                    self.wrote(before, out, &step.path)?;
                    copy_from = pos;
                }
            }
        }
        out.extend_from_slice(&bytes[copy_from..]);
        let Some(seen) = seen else {
            return Ok(());
        };
        for (place, &index) in step.watch.iter().enumerate() {
            if seen.contains(place) {
                continue;
            }
            let field = &step.writer.fields[index];
            match &step.fields[index].kind {
                Kind::Convert(avro) | Kind::Protect(avro) => {
                    let before = out.len();
                    self.convert(field, &step.sanitized.fields[index], avro, None, &step.path, out)?;
                    self.wrote(before, out, &step.path)?;
                }
                _ => {
                    let at = At {
                        parent: &step.path,
                        name: &field.name,
                    };
                    return Err(ValueError::new(&at.full(), "a required field is missing"));
                }
            }
        }
        Ok(())
    }

    /// Whether this is the first occurrence of a singular message within the repeated item it is in.
    fn first_occurrence(&mut self, step: &MessageStep) -> bool {
        let key = (std::ptr::from_ref(step) as usize, self.item);
        if self.walked.contains(&key) {
            return false;
        }
        self.walked.push(key);
        true
    }

    /// A nested message's sanitized bytes with their length before them (its key is written).
    fn nested(&mut self, step: &MessageStep, bytes: &[u8], first: bool, out: &mut Vec<u8>) -> Result<(), ValueError> {
        let at = out.len();
        out.push(0);
        self.message(step, bytes, first, out)?;
        let len = out.len() - at - 1;
        if len < 0x80 {
            out[at] = len as u8;
        } else {
            let mut prefix = Vec::with_capacity(10);
            super::write_varint(len as u64, &mut prefix);
            out.splice(at..=at, prefix);
        }
        Ok(())
    }

    /// Runs `f` with the scratch's two field buffers, emptied: taken out of the scratch for the while, since `f`
    /// runs the Avro program with the rest of it.
    fn with_buffers(
        &mut self,
        f: impl FnOnce(&mut Self, &mut Vec<u8>, &mut Vec<u8>) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        let mut avro = std::mem::take(&mut self.scratch.field_avro);
        let mut sanitized = std::mem::take(&mut self.scratch.field_sanitized);
        avro.clear();
        sanitized.clear();
        let result = f(self, &mut avro, &mut sanitized);
        self.scratch.field_avro = avro;
        self.scratch.field_sanitized = sanitized;
        result
    }

    /// One value of a protected singular scalar, through the Avro program.
    fn protect(
        &mut self,
        field: &Field,
        sanitized: &Field,
        step: &Step,
        value: Wire<'_>,
        at: At<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        // A string (what most PII is) whose action writes text or bytes: written here from its text, by the function
        // the Avro program's step calls, with no Avro on either side.
        if let (Some(Scalar::String), Some(Scalar::String | Scalar::Bytes), Step::Protect(protect)) =
            (field.ty.scalar(), sanitized.ty.scalar(), step)
            && matches!(protect.shape, ShapeStep::Scalar(program::Scalar::String))
        {
            let number = field.number;
            let frame = |len: usize, out: &mut Vec<u8>| {
                write_key(number, LEN, out);
                super::write_varint(len as u64, out);
            };
            let rule = &self.rules[protect.rule];
            if let Some(written) = self
                .scratch
                .protect_string(rule, self.keys, text(value, at)?, out, frame)
            {
                return written;
            }
        }
        self.with_buffers(|walker, avro, sanitized_avro| {
            Reader::new(walker.undeclared, 0).value(&field.ty, value, at, avro)?;
            run_step(step, avro, walker.keys, walker.scratch, walker.rules, sanitized_avro)?;
            let mut input = Input::new(sanitized_avro);
            // Written even when it is its zero (an empty mask, a redacted value): left out, it would let an
            // earlier occurrence of the field win instead.
            match sanitized.ty.scalar() {
                // What the actions make (the redacted zero of a string too): text the transcoder wrote, or bytes.
                Some(Scalar::String | Scalar::Bytes) => write_len(field.number, input.read_bytes()?, out),
                _ => {
                    let written = out.len();
                    write_field(sanitized, &mut input, at.parent, out)?;
                    if out.len() == written {
                        write_zero(sanitized, out);
                    }
                }
            }
            if input.remaining() != 0 {
                return Err(ValueError::new(&at.full(), "the sanitized field has bytes left over"));
            }
            Ok(())
        })
    }

    /// One occurrence of a field that changes (`None`: an absent field's zero), through the Avro program.
    fn convert(
        &mut self,
        field: &Field,
        sanitized: &Field,
        step: &Step,
        value: Option<Wire<'_>>,
        parent: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        self.with_buffers(|walker, avro, sanitized_avro| {
            let at = At {
                parent,
                name: &field.name,
            };
            let mut reader = Reader {
                visits_left: walker.visits_left,
                ..Reader::new(walker.undeclared, 0)
            };
            let occurrence = value.map(|value| [(0, value)]);
            let read = reader.field(
                field.label,
                &field.ty,
                occurrence.as_ref().map_or(&[], |o| &o[..]),
                at,
                avro,
            );
            walker.visits_left = reader.visits_left;
            walker.dropped += reader.dropped;
            read?;
            run_step(step, avro, walker.keys, walker.scratch, walker.rules, sanitized_avro)?;
            let mut input = Input::new(sanitized_avro);
            let written = out.len();
            write_field(sanitized, &mut input, parent, out)?;
            if input.remaining() != 0 {
                return Err(ValueError::new(&at.full(), "the sanitized field has bytes left over"));
            }
            // An occurrence of a singular field that comes out as nothing (an empty mask or detection, a redacted
            // oneof member) is written as its zero: left out, it would let an earlier occurrence win, or hand the
            // oneof to a member before it.
            if value.is_some() && (field.label == Label::Implicit || field.oneof.is_some()) && out.len() == written {
                write_zero(sanitized, out);
            }
            Ok(())
        })
    }
}

/// A field present with its type's zero (the empty string, bytes or message; 0; false).
fn write_zero(field: &Field, out: &mut Vec<u8>) {
    let wire_type = field.ty.scalar().map_or(LEN, wire_type_of);
    write_key(field.number, wire_type, out);
    match wire_type {
        super::I64 => out.extend_from_slice(&[0; 8]),
        super::I32 => out.extend_from_slice(&[0; 4]),
        _ => out.push(0),
    }
}

/// A string field's text, checked.
fn text<'a>(value: Wire<'a>, at: At<'_>) -> Result<&'a str, ValueError> {
    let Wire::Len(run) = value else {
        return Err(malformed(at, "a string field with the wrong wire type"));
    };
    std::str::from_utf8(run).map_err(|_| malformed(at, "a string that is not UTF-8"))
}

/// Checks a value of a field nothing changes, as the reader would read it.
fn check(field: &Field, value: Wire<'_>, at: At<'_>) -> Result<(), ValueError> {
    let scalar = field.ty.scalar().expect("messages are walked or converted");
    match field.label {
        Label::Repeated if scalar.packable() => match value {
            Wire::Len(run) => check_packed(scalar, run, at),
            value => check_scalar(scalar, value, at),
        },
        Label::Map(key) => {
            let Wire::Len(entry) = value else {
                return Err(malformed(at, "a map entry that is not length-delimited"));
            };
            let mut pos = 0;
            while pos < entry.len() {
                match next_field(entry, &mut pos, at)? {
                    (1, found) => check_scalar(key, found, at)?,
                    (2, found) => check_scalar(scalar, found, at)?,
                    _ => return Err(malformed(at, "a map entry with a field other than key and value")),
                }
            }
            Ok(())
        }
        _ => check_scalar(scalar, value, at),
    }
}

fn check_scalar(scalar: Scalar, value: Wire<'_>, at: At<'_>) -> Result<(), ValueError> {
    if value.wire_type() != wire_type_of(scalar) {
        return Err(malformed(
            at,
            &format!("a {} field with the wrong wire type", scalar.proto_name()),
        ));
    }
    if scalar == Scalar::String {
        text(value, at)?;
    }
    Ok(())
}

/// A packed run must hold whole values of its type.
fn check_packed(scalar: Scalar, run: &[u8], at: At<'_>) -> Result<(), ValueError> {
    let mut pos = 0;
    while pos < run.len() {
        match wire_type_of(scalar) {
            super::VARINT => {
                varint(run, &mut pos, at)?;
            }
            super::I64 => {
                fixed::<8>(run, &mut pos, at)?;
            }
            _ => {
                fixed::<4>(run, &mut pos, at)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy::{PolicySettings, Untagged, compile_protobuf};
    use crate::transcode::Transcoder;

    /// The first occurrences a repeated item's walk records are dropped after it: kept, every item's lookup would
    /// scan every earlier item's (a record of many small items would take quadratic time).
    #[test]
    fn what_a_repeated_item_walks_is_forgotten_after_it() {
        let text = "syntax = \"proto2\"; message R { repeated I items = 1; } message I { optional M m = 1; } \
                    message M { required int32 r = 1; }";
        let settings = PolicySettings {
            untagged: Untagged::Pass,
            ..PolicySettings::default()
        };
        let schema = compile_protobuf(text, &HashMap::new(), None, &settings).unwrap();
        let proto = schema.protobuf().unwrap();
        let transcoder = Transcoder::new(&schema).unwrap();
        let program = MessageStep::new(&proto.writer, &proto.sanitized_message, transcoder.root(), "").unwrap();
        let keys = RecordKeys {
            record: None,
            domain: None,
            forgotten: false,
        };
        let mut scratch = TranscodeScratch::default();
        // items { m { r: 0 } }, a thousand times.
        let bytes = [0x0a, 4, 0x0a, 2, 0x08, 0].repeat(1000);
        let mut walker = Walker::new(&schema.plan.rules, &keys, &mut scratch, Undeclared::Drop, bytes.len());
        let mut out = Vec::new();
        walker.message(&program, &bytes, true, &mut out).unwrap();
        assert_eq!(out, bytes);
        assert!(walker.walked.len() <= 1, "{} occurrences kept", walker.walked.len());
    }

    #[test]
    fn seen_tracks_few_and_many_fields() {
        for watched in [3, 64, 65, 200] {
            let mut seen = Seen::new(watched);
            seen.insert(watched - 1);
            seen.insert(0);
            assert!(seen.contains(0) && seen.contains(watched - 1));
            assert!(!seen.contains(1));
        }
    }
}

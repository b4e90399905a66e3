//! Protobuf records on a topic: read from protobuf bytes into the Avro binary of the writer schema's translation
//! (see [`crate::policy::protobuf`]), so the transcoder sanitizes them as it does Avro records, and the sanitized
//! Avro written back as protobuf bytes of the sanitized message. No `DynamicMessage` in between: both directions
//! walk the bytes, driven by the compiled [`Message`] tree.
//!
//! Reading follows protobuf's rules: fields in any order; the last occurrence of a singular scalar wins, the
//! occurrences of a singular message merge; repeated numbers packed or not; map entries with their key or value
//! missing take the type's zero. A field number the schema does not declare is data a producer added without
//! review: dropped (and counted) or refused, as `policy.undeclared` says; never passed through. Errors name the
//! field path, never a value.
//!
//! The Confluent framing of a protobuf record puts the message index path between the schema id and the message:
//! a count then the indexes, zig-zag varints; a count of 0 means `[0]`.

mod transcode;

use std::sync::Arc;

use crate::error::{PolicyError, ValueError};
use crate::policy::protobuf::{Field, Label, Message, Scalar, Type};
use crate::policy::{CompiledSchema, Undeclared};
use crate::sanitize::RecordKeys;
use crate::transcode::wire::{Input, write_long};
use crate::transcode::{TranscodeScratch, Transcoder};

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// Message indexes a record may name (deeper than any message piiwall compiles).
const MAX_INDEXES: usize = 32;

/// The protobuf reader and writer of one compiled schema.
#[derive(Debug)]
pub struct ProtoRecords {
    writer: Arc<Message>,
    sanitized: Arc<Message>,
    /// The message index path records must name.
    indexes: Vec<i32>,
    undeclared: Undeclared,
    /// The direct transcoder's program (see [`ProtoRecords::transcode`]); `None` for records only converted.
    program: Option<transcode::MessageStep>,
}

/// A record read from protobuf: its Avro binary and how many undeclared fields were dropped.
pub struct Converted {
    pub avro: Vec<u8>,
    pub dropped: usize,
}

impl ProtoRecords {
    pub fn new(writer: Arc<Message>, sanitized: Arc<Message>, indexes: Vec<i32>, undeclared: Undeclared) -> Self {
        Self {
            writer,
            sanitized,
            indexes,
            undeclared,
            program: None,
        }
    }

    /// The records of a compiled schema's message, transcoded directly (see [`ProtoRecords::transcode`]) by a
    /// program made from `transcoder`'s.
    pub fn transcoding(
        writer: Arc<Message>,
        sanitized: Arc<Message>,
        indexes: Vec<i32>,
        undeclared: Undeclared,
        transcoder: &Transcoder,
    ) -> Result<Self, PolicyError> {
        let program = transcode::MessageStep::new(&writer, &sanitized, transcoder.root(), "")?;
        Ok(Self {
            program: Some(program),
            ..Self::new(writer, sanitized, indexes, undeclared)
        })
    }

    /// The records of one message (framed with the index path `[0]`) to and from Avro binary of that message's
    /// form: the sanitized message reads what piiwall wrote (export, the demo); the writer's writes what a producer
    /// would (the demo's samples).
    pub fn of_message(message: &Arc<Message>) -> Self {
        Self::new(message.clone(), message.clone(), vec![0], Undeclared::Quarantine)
    }

    /// The message of a record: what follows its message index path, which must name this schema's message.
    fn message_of<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], ValueError> {
        // The common path `[0]`, written as the single byte 0, read without allocating.
        if let [0, message @ ..] = payload
            && self.indexes == [0]
        {
            return Ok(message);
        }
        let (indexes, message) = read_indexes(payload)?;
        if indexes != self.indexes {
            return Err(ValueError::new(
                "",
                format!(
                    "the record names message index path {indexes:?}; this schema binding sanitizes the message at \
                     {:?}",
                    self.indexes
                ),
            ));
        }
        Ok(message)
    }

    /// Sanitizes a record straight from protobuf to protobuf (see [`transcode`]): appends the index path `[0]` and
    /// the sanitized message to `out`, and returns how many undeclared fields were dropped. On error `out` is left as
    /// it was.
    pub fn transcode(
        &self,
        schema: &CompiledSchema,
        payload: &[u8],
        keys: &RecordKeys,
        scratch: &mut TranscodeScratch,
        out: &mut Vec<u8>,
    ) -> Result<usize, ValueError> {
        let program = self
            .program
            .as_ref()
            .ok_or_else(|| ValueError::new("", "these protobuf records are only converted, not transcoded"))?;
        let message = self.message_of(payload)?;
        let start = out.len();
        out.push(0);
        let mut walker = transcode::Walker::new(&schema.plan.rules, keys, scratch, self.undeclared, message.len());
        match walker.message(program, message, true, out) {
            Ok(()) => Ok(walker.dropped),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Reads a record (its message indexes, when framed, then the message) into Avro binary.
    pub fn read(&self, payload: &[u8]) -> Result<Converted, ValueError> {
        let message = self.message_of(payload)?;
        let mut reader = Reader::new(self.undeclared, message.len());
        let mut avro = Vec::with_capacity(message.len() + 64);
        reader.message(&self.writer, message, "", &mut avro)?;
        Ok(Converted {
            avro,
            dropped: reader.dropped,
        })
    }

    /// Appends a sanitized record (Avro binary of the sanitized schema) as protobuf: the index path `[0]` when
    /// framed (the sanitized `.proto` puts the record's message first), then the message.
    pub fn write(&self, sanitized: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        out.push(0);
        let mut input = Input::new(sanitized);
        write_message(&self.sanitized, &mut input, "", out)?;
        if input.remaining() != 0 {
            return Err(ValueError::new("", "the sanitized record has bytes left over"));
        }
        Ok(())
    }
}

impl ProtoRecords {
    /// The data subject a record names at `path` (the subject field's), read leniently: the rest of the record need
    /// not be valid. For the quarantine of a record that cannot be sanitized, whose copy is sealed under its
    /// subject's key (so a forget covers it) whenever the subject can be told. Read as the strict reader reads it:
    /// the last occurrence of the field; a non-empty string, or an integer in decimal.
    pub fn subject(&self, path: &str, payload: &[u8]) -> Option<String> {
        // A record of another message is not read as this one: its fields mean other things.
        let message = self.message_of(payload).ok()?;
        let steps: Vec<&str> = path.split('.').collect();
        lenient_subject(&self.writer, &steps, message)
    }

    /// Every data subject a record names at `path`, read leniently: one, as [`ProtoRecords::subject`] reads it, or
    /// each of the several a record that names more than one holds (at most [`MAX_NAMED`] + 1: more is reason
    /// enough to keep none of its content). For the quarantine of a record that cannot be sanitized: nothing of a
    /// forgotten subject may be kept.
    pub fn subjects_named(&self, path: &str, payload: &[u8]) -> Vec<String> {
        let Ok(message) = self.message_of(payload) else {
            return Vec::new();
        };
        let steps: Vec<&str> = path.split('.').collect();
        match last_subject(&self.writer, &steps, message) {
            Some(Subject::Ambiguous(ids)) => ids,
            Some(Subject::Unwritten { zero: true }) => vec!["0".to_owned()],
            Some(Subject::Written(Some(subject))) => vec![subject],
            _ => Vec::new(),
        }
    }

    /// The data subject a record names at `path`, for the direct transcoder: as [`ProtoRecords::subject`] reads it,
    /// but a record that names more than one subject (a subject field written twice with different ids, or unset
    /// by a oneof after it was written) is refused, to be quarantined.
    pub fn strict_subject(&self, path: &str, payload: &[u8]) -> Result<Option<String>, ValueError> {
        let message = self.message_of(payload)?;
        let steps: Vec<&str> = path.split('.').collect();
        record_subject(&self.writer, &steps, message)
    }
}

fn lenient_subject(message: &Message, steps: &[&str], bytes: &[u8]) -> Option<String> {
    record_subject(message, steps, bytes).ok().flatten()
}

/// The data subject of a record, as a reader of it sees it (its subject field's last occurrence, merged as
/// protobuf merges messages), or an error when the record names more than one: the direct transcoder sanitizes
/// every occurrence in place, so an overridden subject's values would stay in the output under the keys of another.
fn record_subject(message: &Message, steps: &[&str], bytes: &[u8]) -> Result<Option<String>, ValueError> {
    Ok(match last_subject(message, steps, bytes) {
        None | Some(Subject::Absent) => None,
        Some(Subject::Unwritten { zero }) => zero.then(|| "0".to_owned()),
        Some(Subject::Written(subject)) => subject,
        Some(Subject::Ambiguous(_)) => {
            return Err(ValueError::new(
                &steps.join("."),
                "the record names its data subject more than once, with different ids (or a oneof unsets it after \
                 naming it): quarantined rather than sealed under one of them",
            ));
        }
    })
}

/// What the occurrences of a message say of the subject field at a path below it, merged as protobuf merges them.
enum Subject {
    /// A message on the way is absent: no subject.
    Absent,
    /// The subject field's message is there, the field is not: its zero, which names a subject when the field is
    /// a proto3 integer (`0`; an absent string is empty, no subject).
    Unwritten { zero: bool },
    /// The field's last occurrence: a non-empty string or an integer in decimal, else no subject.
    Written(Option<String>),
    /// A subject written, then another one (or none) in its place: the ids named, at most [`MAX_NAMED`] + 1.
    Ambiguous(Vec<String>),
}

/// The subject ids a record naming several is read for (one more says there are more).
pub const MAX_NAMED: usize = 16;

impl Subject {
    /// What a later occurrence's subject makes of this one: a subject replaced by another is ambiguous.
    fn then(self, later: Subject) -> Subject {
        match (self, later) {
            (Subject::Ambiguous(mut ids), later) => {
                add_ids(&mut ids, later.ids());
                Subject::Ambiguous(ids)
            }
            (earlier, Subject::Ambiguous(later)) => {
                let mut ids = earlier.ids();
                add_ids(&mut ids, later);
                Subject::Ambiguous(ids)
            }
            (Subject::Written(Some(earlier)), Subject::Written(now)) if now.as_ref() != Some(&earlier) => {
                let mut ids = vec![earlier];
                add_ids(&mut ids, now.into_iter().collect());
                Subject::Ambiguous(ids)
            }
            (_, written @ Subject::Written(_)) => written,
            (Subject::Absent, unwritten @ Subject::Unwritten { .. }) => unwritten,
            (earlier, _) => earlier,
        }
    }

    /// The subject ids written.
    fn ids(self) -> Vec<String> {
        match self {
            Subject::Written(Some(subject)) => vec![subject],
            Subject::Ambiguous(ids) => ids,
            _ => Vec::new(),
        }
    }
}

/// Adds the ids not there yet, up to one more than [`MAX_NAMED`].
fn add_ids(ids: &mut Vec<String>, more: Vec<String>) {
    for id in more {
        if ids.len() > MAX_NAMED {
            return;
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

/// The subject at `steps` below one occurrence of `message` (`None`: the path is not in the schema).
fn last_subject(message: &Message, steps: &[&str], bytes: &[u8]) -> Option<Subject> {
    let (name, rest) = steps.split_first()?;
    let field = message.fields.iter().find(|f| f.name == *name)?;
    let nowhere = At { parent: "", name: "" };
    // Before its first occurrence: the field unwritten, or the message it leads into absent.
    let unset = || match rest.is_empty() {
        true => Subject::Unwritten {
            zero: field.label == Label::Implicit
                && field.ty.scalar().is_some_and(|s| {
                    !matches!(
                        s,
                        Scalar::String | Scalar::Bytes | Scalar::Bool | Scalar::Double | Scalar::Float
                    )
                }),
        },
        false => Subject::Absent,
    };
    let mut found = unset();
    let mut pos = 0;
    while pos < bytes.len() {
        let Ok((number, value)) = next_field(bytes, &mut pos, nowhere) else {
            break;
        };
        if number != field.number {
            // A later member of the subject field's oneof unsets it (and what it held).
            if field.oneof.is_some()
                && let Some(&index) = message.by_number.get(&number)
                && message.fields[index].oneof == field.oneof
            {
                found = match found {
                    Subject::Written(Some(subject)) => Subject::Ambiguous(vec![subject]),
                    ambiguous @ Subject::Ambiguous(_) => ambiguous,
                    _ => unset(),
                };
            }
            continue;
        }
        match (&field.ty, rest.is_empty(), value) {
            // Occurrences of a message merge: a later one overrides the subject only where it writes it, and makes
            // the message present where it was absent.
            (Type::Message(inner), false, Wire::Len(run)) => found = found.then(last_subject(inner, rest, run)?),
            (ty, true, value) => found = found.then(Subject::Written(subject_text(ty, value))),
            // A message on the path with another wire type: skipped, as a protobuf reader skips a field it cannot
            // read as declared (the transcoder refuses the record; its quarantined copy still names the subject).
            _ => {}
        }
    }
    Some(found)
}

/// A subject field's value as the transcoder reads it: a non-empty string, or an integer in decimal.
fn subject_text(ty: &Type, value: Wire<'_>) -> Option<String> {
    let mut reader = Reader::new(Undeclared::Drop, 0);
    let mut avro = Vec::new();
    reader.value(ty, value, At { parent: "", name: "" }, &mut avro).ok()?;
    let mut input = Input::new(&avro);
    match ty.scalar()? {
        Scalar::String => Some(input.read_str().ok()?.to_owned()).filter(|s| !s.is_empty()),
        Scalar::Bytes | Scalar::Double | Scalar::Float | Scalar::Bool => None,
        // Named by their unsigned value, as the Avro paths name them (see `SubjectRef::unsigned`).
        Scalar::Uint64 | Scalar::Fixed64 => Some((input.read_long().ok()? as u64).to_string()),
        _ => Some(input.read_long().ok()?.to_string()),
    }
}

/// Splits a framed protobuf payload into its message index path and the message.
pub fn read_indexes(payload: &[u8]) -> Result<(Vec<i32>, &[u8]), ValueError> {
    let bad = |problem: &str| ValueError::new("", format!("malformed message indexes: {problem}"));
    let mut input = Input::new(payload);
    let count = input.read_long().map_err(|_| bad("truncated"))?;
    if count == 0 {
        return Ok((vec![0], &payload[input.pos..]));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|c| *c <= MAX_INDEXES)
        .ok_or_else(|| bad("count out of range"))?;
    let mut indexes = Vec::with_capacity(count);
    for _ in 0..count {
        let index = input.read_int().map_err(|_| bad("truncated"))?;
        if index < 0 {
            return Err(bad("a negative index"));
        }
        indexes.push(index);
    }
    Ok((indexes, &payload[input.pos..]))
}

/// One value on the protobuf wire.
#[derive(Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    I64(u64),
    I32(u32),
    Len(&'a [u8]),
}

impl Wire<'_> {
    fn wire_type(&self) -> u8 {
        match self {
            Wire::Varint(_) => VARINT,
            Wire::I64(_) => I64,
            Wire::Len(_) => LEN,
            Wire::I32(_) => I32,
        }
    }
}

/// Where in a record a value is: its message's path and its field's name, joined only when an error names it
/// (no allocation per field on the way).
#[derive(Clone, Copy)]
struct At<'a> {
    parent: &'a str,
    name: &'a str,
}

impl At<'_> {
    fn full(self) -> String {
        match (self.parent.is_empty(), self.name.is_empty()) {
            (_, true) => self.parent.to_owned(),
            (true, false) => self.name.to_owned(),
            (false, false) => format!("{}.{}", self.parent, self.name),
        }
    }
}

#[cold]
fn malformed(at: At<'_>, problem: &str) -> ValueError {
    ValueError::new(&at.full(), format!("malformed protobuf: {problem}"))
}

/// A protobuf varint (up to 10 bytes, no zig-zag).
#[inline(always)]
fn varint(bytes: &[u8], pos: &mut usize, path: At<'_>) -> Result<u64, ValueError> {
    // Most varints (keys, lengths, small numbers) are one byte: read here, the rest by a call.
    match bytes.get(*pos) {
        Some(&byte) if byte < 0x80 => {
            *pos += 1;
            Ok(u64::from(byte))
        }
        _ => long_varint(bytes, pos, path),
    }
}

fn long_varint(bytes: &[u8], pos: &mut usize, path: At<'_>) -> Result<u64, ValueError> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *bytes.get(*pos).ok_or_else(|| malformed(path, "truncated varint"))?;
        *pos += 1;
        if i == 9 && byte > 1 {
            return Err(malformed(path, "varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    unreachable!("the tenth byte ends the varint or fails")
}

fn fixed<const N: usize>(bytes: &[u8], pos: &mut usize, path: At<'_>) -> Result<[u8; N], ValueError> {
    let run = bytes
        .get(*pos..*pos + N)
        .ok_or_else(|| malformed(path, "truncated fixed-width value"))?;
    *pos += N;
    Ok(run.try_into().expect("N bytes"))
}

/// The next field of a message: its number and value. Always inlined: returned through memory, the result was
/// copied with loads wider than the stores that wrote it, a store-forwarding stall per field.
#[inline(always)]
fn next_field<'a>(bytes: &'a [u8], pos: &mut usize, path: At<'_>) -> Result<(u32, Wire<'a>), ValueError> {
    let key = varint(bytes, pos, path)?;
    let number = u32::try_from(key >> 3).ok().filter(|n| *n > 0 && *n < 1 << 29);
    let number = number.ok_or_else(|| malformed(path, "a field number out of range"))?;
    let value = match (key & 7) as u8 {
        VARINT => Wire::Varint(varint(bytes, pos, path)?),
        I64 => Wire::I64(u64::from_le_bytes(fixed::<8>(bytes, pos, path)?)),
        I32 => Wire::I32(u32::from_le_bytes(fixed::<4>(bytes, pos, path)?)),
        LEN => {
            let len = usize::try_from(varint(bytes, pos, path)?).map_err(|_| malformed(path, "length out of range"))?;
            let end = pos.checked_add(len).filter(|end| *end <= bytes.len());
            let end = end.ok_or_else(|| malformed(path, "a length runs past the end of the message"))?;
            let run = &bytes[*pos..end];
            *pos = end;
            Wire::Len(run)
        }
        3 | 4 => return Err(malformed(path, "a group (wire types 3 and 4 are not supported)")),
        _ => return Err(malformed(path, "an unknown wire type")),
    };
    Ok((number, value))
}

/// The wire type a scalar is written with.
fn wire_type_of(scalar: Scalar) -> u8 {
    match scalar {
        Scalar::Double | Scalar::Fixed64 | Scalar::Sfixed64 => I64,
        Scalar::Float | Scalar::Fixed32 | Scalar::Sfixed32 => I32,
        Scalar::String | Scalar::Bytes => LEN,
        _ => VARINT,
    }
}

struct Reader {
    undeclared: Undeclared,
    dropped: usize,
    /// Fields the record may still make the reader write: a two-byte empty item of a repeated message expands to
    /// every field of that message, so a small record could otherwise ask for gigabytes of Avro.
    visits_left: usize,
}

/// Why a record holding a field number its schema does not declare is refused (the number, never the value).
fn undeclared(path: &str, number: u32) -> ValueError {
    ValueError::new(
        path,
        format!("field number {number} is not in the schema (policy.undeclared = \"quarantine\")"),
    )
}

/// Why a record that expands beyond its budget is refused.
const EXPANDS: &str =
    "the record expands to far more fields than its size allows (empty repeated items of large messages)";

/// The reader's budget of fields written: this many, plus [`VISITS_PER_BYTE`] per byte of the record.
const MIN_FIELD_VISITS: usize = 10_000;
const VISITS_PER_BYTE: usize = 8;

impl Reader {
    /// A reader of a record (or one field) of `size` bytes.
    fn new(undeclared: Undeclared, size: usize) -> Self {
        Self {
            undeclared,
            dropped: 0,
            visits_left: MIN_FIELD_VISITS + VISITS_PER_BYTE * size,
        }
    }

    fn message(&mut self, message: &Message, bytes: &[u8], path: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.message_parts(message, &[bytes], path, out)
    }

    /// A message given in parts (the occurrences of a singular message field, which merge): each part is parsed
    /// whole on its own, so a part cut short cannot swallow the next one's bytes.
    fn message_parts(
        &mut self,
        message: &Message,
        parts: &[&[u8]],
        path: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        // The fields as they arrived, grouped by declaration order (a stable sort keeps their order within one).
        let mut found: Vec<(usize, Wire<'_>)> = Vec::new();
        let here = At { parent: path, name: "" };
        for bytes in parts {
            let mut pos = 0;
            while pos < bytes.len() {
                let (number, value) = next_field(bytes, &mut pos, here)?;
                match message.by_number.get(&number) {
                    Some(&index) => found.push((index, value)),
                    None if self.undeclared == Undeclared::Drop => self.dropped += 1,
                    None => return Err(undeclared(path, number)),
                }
            }
        }
        self.visits_left = self
            .visits_left
            .checked_sub(message.fields.len())
            .ok_or_else(|| ValueError::new(path, EXPANDS))?;
        // Of a oneof's members, only the last on the wire is set: the others read as absent, as protobuf reads them.
        if found.iter().any(|(i, _)| message.fields[*i].oneof.is_some()) {
            let mut winners: Vec<(&str, usize)> = Vec::new();
            for (index, _) in found.iter().rev() {
                if let Some(group) = message.fields[*index].oneof.as_deref()
                    && !winners.iter().any(|(g, _)| *g == group)
                {
                    winners.push((group, *index));
                }
            }
            found.retain(|(index, _)| match message.fields[*index].oneof.as_deref() {
                Some(group) => winners.iter().any(|(g, i)| *g == group && i == index),
                None => true,
            });
        }
        found.sort_by_key(|(index, _)| *index);
        let mut at = 0;
        for (index, field) in message.fields.iter().enumerate() {
            let start = at;
            while at < found.len() && found[at].0 == index {
                at += 1;
            }
            let here = At {
                parent: path,
                name: &field.name,
            };
            self.field(field.label, &field.ty, &found[start..at], here, out)?;
        }
        Ok(())
    }

    fn field(
        &mut self,
        label: Label,
        ty: &Type,
        values: &[(usize, Wire<'_>)],
        path: At<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        match label {
            Label::Implicit => match values.last() {
                Some((_, value)) => self.single(ty, values, *value, path, out),
                None => self.zero(ty, path, out),
            },
            Label::Optional => match values.last() {
                None => {
                    write_long(out, 0);
                    Ok(())
                }
                Some((_, value)) => {
                    write_long(out, 1);
                    self.single(ty, values, *value, path, out)
                }
            },
            Label::Required => match values.last() {
                None => Err(ValueError::new(&path.full(), "a required field is missing")),
                Some((_, value)) => self.single(ty, values, *value, path, out),
            },
            Label::Repeated => {
                let mut items = Vec::new();
                let mut count = 0i64;
                for (_, value) in values {
                    match (ty.scalar(), value) {
                        (Some(scalar), Wire::Len(run)) if scalar.packable() => {
                            let mut pos = 0;
                            while pos < run.len() {
                                let item = match wire_type_of(scalar) {
                                    VARINT => Wire::Varint(varint(run, &mut pos, path)?),
                                    I64 => Wire::I64(u64::from_le_bytes(fixed::<8>(run, &mut pos, path)?)),
                                    _ => Wire::I32(u32::from_le_bytes(fixed::<4>(run, &mut pos, path)?)),
                                };
                                self.value(ty, item, path, &mut items)?;
                                count += 1;
                            }
                        }
                        _ => {
                            self.value(ty, *value, path, &mut items)?;
                            count += 1;
                        }
                    }
                }
                if count > 0 {
                    write_long(out, count);
                    out.extend_from_slice(&items);
                }
                write_long(out, 0);
                Ok(())
            }
            Label::Map(key) => {
                if !values.is_empty() {
                    write_long(out, values.len() as i64);
                }
                for (_, value) in values {
                    let Wire::Len(entry) = value else {
                        return Err(malformed(path, "a map entry that is not length-delimited"));
                    };
                    let (mut k, mut v) = (None, None);
                    let mut pos = 0;
                    while pos < entry.len() {
                        match next_field(entry, &mut pos, path)? {
                            (1, found) => k = Some(found),
                            (2, found) => v = Some(found),
                            _ => return Err(malformed(path, "a map entry with a field other than key and value")),
                        }
                    }
                    self.map_key(key, k, path, out)?;
                    match v {
                        Some(found) => self.single(ty, &[(0, found)], found, path, out)?,
                        None => self.zero(ty, path, out)?,
                    }
                }
                write_long(out, 0);
                Ok(())
            }
        }
    }

    /// A singular value: the last occurrence of a scalar; every occurrence of a message, merged.
    fn single(
        &mut self,
        ty: &Type,
        all: &[(usize, Wire<'_>)],
        last: Wire<'_>,
        path: At<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        match ty {
            Type::Message(message) if all.len() > 1 => {
                let mut parts = Vec::with_capacity(all.len());
                for (_, value) in all {
                    let Wire::Len(run) = value else {
                        return Err(malformed(path, "a message field that is not length-delimited"));
                    };
                    parts.push(*run);
                }
                self.message_parts(message, &parts, &path.full(), out)
            }
            _ => self.value(ty, last, path, out),
        }
    }

    /// One value as Avro.
    fn value(&mut self, ty: &Type, value: Wire<'_>, path: At<'_>, out: &mut Vec<u8>) -> Result<(), ValueError> {
        let scalar = match ty {
            Type::Message(message) => {
                let Wire::Len(run) = value else {
                    return Err(malformed(path, "a message field that is not length-delimited"));
                };
                return self.message(message, run, &path.full(), out);
            }
            other => other.scalar().expect("not a message"),
        };
        if value.wire_type() != wire_type_of(scalar) {
            return Err(malformed(
                path,
                &format!("a {} field with the wrong wire type", scalar.proto_name()),
            ));
        }
        match (scalar, value) {
            (Scalar::Double, Wire::I64(bits)) => out.extend_from_slice(&bits.to_le_bytes()),
            (Scalar::Float, Wire::I32(bits)) => out.extend_from_slice(&bits.to_le_bytes()),
            (Scalar::Int32 | Scalar::Enum, Wire::Varint(v)) => write_long(out, i64::from(v as i32)),
            (Scalar::Sint32, Wire::Varint(v)) => {
                let v = v as u32;
                write_long(out, i64::from((v >> 1) as i32 ^ -((v & 1) as i32)));
            }
            (Scalar::Sfixed32, Wire::I32(v)) => write_long(out, i64::from(v as i32)),
            (Scalar::Int64 | Scalar::Uint64, Wire::Varint(v)) => write_long(out, v as i64),
            (Scalar::Uint32, Wire::Varint(v)) => write_long(out, i64::from(v as u32)),
            (Scalar::Sint64, Wire::Varint(v)) => write_long(out, (v >> 1) as i64 ^ -((v & 1) as i64)),
            (Scalar::Fixed32, Wire::I32(v)) => write_long(out, i64::from(v)),
            (Scalar::Fixed64 | Scalar::Sfixed64, Wire::I64(v)) => write_long(out, v as i64),
            (Scalar::Bool, Wire::Varint(v)) => out.push(u8::from(v != 0)),
            (Scalar::String, Wire::Len(run)) => {
                if std::str::from_utf8(run).is_err() {
                    return Err(malformed(path, "a string that is not UTF-8"));
                }
                write_long(out, run.len() as i64);
                out.extend_from_slice(run);
            }
            (Scalar::Bytes, Wire::Len(run)) => {
                write_long(out, run.len() as i64);
                out.extend_from_slice(run);
            }
            _ => unreachable!("wire types checked above"),
        }
        Ok(())
    }

    /// The value an absent field reads as: the type's zero (a message's fields all absent).
    fn zero(&mut self, ty: &Type, path: At<'_>, out: &mut Vec<u8>) -> Result<(), ValueError> {
        match ty {
            Type::Message(message) => return self.message(message, &[], &path.full(), out),
            other => match other.scalar().expect("not a message") {
                Scalar::Double => out.extend_from_slice(&[0; 8]),
                Scalar::Float => out.extend_from_slice(&[0; 4]),
                // Zero, false, and the empty string or bytes are all the single byte 0 in Avro.
                _ => out.push(0),
            },
        }
        Ok(())
    }

    /// A map key as the text of an Avro map key.
    fn map_key(
        &mut self,
        key: Scalar,
        value: Option<Wire<'_>>,
        path: At<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ValueError> {
        let Some(value) = value else {
            let zero: &[u8] = match key {
                Scalar::String => b"",
                Scalar::Bool => b"false",
                _ => b"0",
            };
            write_long(out, zero.len() as i64);
            out.extend_from_slice(zero);
            return Ok(());
        };
        if key == Scalar::String {
            return self.value(&Type::Scalar(Scalar::String), value, path, out);
        }
        let mut avro = Vec::with_capacity(10);
        self.value(&Type::Scalar(key), value, path, &mut avro)?;
        let mut input = Input::new(&avro);
        let text = if key == Scalar::Bool {
            (avro[0] == 1).to_string()
        } else {
            input.read_long()?.to_string()
        };
        write_long(out, text.len() as i64);
        out.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

fn write_key(number: u32, wire_type: u8, out: &mut Vec<u8>) {
    write_varint(u64::from(number) << 3 | u64::from(wire_type), out);
}

fn write_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn write_len(number: u32, run: &[u8], out: &mut Vec<u8>) {
    write_key(number, LEN, out);
    write_varint(run.len() as u64, out);
    out.extend_from_slice(run);
}

/// Writes a record of the sanitized Avro schema as the sanitized message.
fn write_message(message: &Message, input: &mut Input<'_>, parent: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
    message
        .fields
        .iter()
        .try_for_each(|field| write_field(field, input, parent, out))
}

/// Writes one field of the sanitized message from its Avro form: nothing when it is absent (or a proto3 zero).
fn write_field(field: &Field, input: &mut Input<'_>, parent: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let path = At {
        parent,
        name: &field.name,
    };
    match field.label {
        Label::Implicit => write_value(field.number, &field.ty, input, path, true, out)?,
        Label::Required => write_value(field.number, &field.ty, input, path, false, out)?,
        Label::Optional => match input.read_long()? {
            0 => {}
            1 => write_value(field.number, &field.ty, input, path, false, out)?,
            _ => {
                return Err(ValueError::new(
                    &path.full(),
                    "the sanitized record has an unexpected union branch",
                ));
            }
        },
        Label::Repeated => {
            let packed = field.ty.scalar().is_some_and(Scalar::packable);
            let mut run = Vec::new();
            loop {
                let (count, _) = input.read_block()?;
                if count == 0 {
                    break;
                }
                for _ in 0..count {
                    if packed {
                        let scalar = field.ty.scalar().expect("packed values are scalars");
                        write_scalar(scalar, input, path, &mut run)?;
                    } else {
                        write_value(field.number, &field.ty, input, path, false, out)?;
                    }
                }
            }
            if packed && !run.is_empty() {
                write_len(field.number, &run, out);
            }
        }
        Label::Map(key) => loop {
            let (count, _) = input.read_block()?;
            if count == 0 {
                break;
            }
            for _ in 0..count {
                let mut entry = Vec::new();
                let text = input.read_str()?;
                write_map_key(key, text, path, &mut entry)?;
                write_value(2, &field.ty, input, path, false, &mut entry)?;
                write_len(field.number, &entry, out);
            }
        },
    }
    Ok(())
}

/// Writes one field's value; `skip_zero`: a proto3 field without presence, left out when it holds its zero.
fn write_value(
    number: u32,
    ty: &Type,
    input: &mut Input<'_>,
    path: At<'_>,
    skip_zero: bool,
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    match ty {
        Type::Message(message) => {
            let mut child = Vec::new();
            write_message(message, input, &path.full(), &mut child)?;
            write_len(number, &child, out);
        }
        other => {
            let scalar = other.scalar().expect("not a message");
            let start = out.len();
            write_key(number, wire_type_of(scalar), out);
            let value_start = out.len();
            write_scalar(scalar, input, path, out)?;
            let value = &out[value_start..];
            let zero = match scalar {
                Scalar::Double
                | Scalar::Float
                | Scalar::Fixed32
                | Scalar::Fixed64
                | Scalar::Sfixed32
                | Scalar::Sfixed64 => value.iter().all(|b| *b == 0),
                // A zero varint, or an empty string or bytes (its length 0).
                _ => value == [0],
            };
            if skip_zero && zero {
                out.truncate(start);
            }
        }
    }
    Ok(())
}

/// Reads one Avro scalar and appends its protobuf encoding (a LEN value with its length, no key).
fn write_scalar(scalar: Scalar, input: &mut Input<'_>, path: At<'_>, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let range = || {
        ValueError::new(
            &path.full(),
            format!("the sanitized value does not fit a {}", scalar.proto_name()),
        )
    };
    match scalar {
        Scalar::Double => out.extend_from_slice(input.take(8)?),
        Scalar::Float => out.extend_from_slice(input.take(4)?),
        Scalar::Int32 | Scalar::Enum => write_varint(i64::from(input.read_int()?) as u64, out),
        Scalar::Sint32 => {
            let v = input.read_int()?;
            write_varint(u64::from(((v << 1) ^ (v >> 31)) as u32), out);
        }
        Scalar::Sfixed32 => out.extend_from_slice(&input.read_int()?.to_le_bytes()),
        Scalar::Int64 | Scalar::Uint64 => write_varint(input.read_long()? as u64, out),
        Scalar::Uint32 => write_varint(u64::from(u32::try_from(input.read_long()?).map_err(|_| range())?), out),
        Scalar::Sint64 => {
            let v = input.read_long()?;
            write_varint(((v << 1) ^ (v >> 63)) as u64, out);
        }
        Scalar::Fixed32 => {
            out.extend_from_slice(&u32::try_from(input.read_long()?).map_err(|_| range())?.to_le_bytes())
        }
        Scalar::Fixed64 | Scalar::Sfixed64 => out.extend_from_slice(&input.read_long()?.to_le_bytes()),
        Scalar::Bool => {
            let byte = input.take(1)?[0];
            if byte > 1 {
                return Err(ValueError::new(&path.full(), "the sanitized record has a bad boolean"));
            }
            out.push(byte);
        }
        Scalar::String => {
            let text = input.read_str()?;
            write_varint(text.len() as u64, out);
            out.extend_from_slice(text.as_bytes());
        }
        Scalar::Bytes => {
            let bytes = input.read_bytes()?;
            write_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
    }
    Ok(())
}

/// A map key (Avro map keys are text) as field 1 of a map entry.
fn write_map_key(key: Scalar, text: &str, path: At<'_>, out: &mut Vec<u8>) -> Result<(), ValueError> {
    let bad = || ValueError::new(&path.full(), format!("a map key that is not a {}", key.proto_name()));
    match key {
        Scalar::String => write_len(1, text.as_bytes(), out),
        Scalar::Bool => {
            write_key(1, VARINT, out);
            out.push(match text {
                "true" => 1,
                "false" => 0,
                _ => return Err(bad()),
            });
        }
        other => {
            let number: i64 = text.parse().map_err(|_| bad())?;
            let mut avro = Vec::with_capacity(10);
            if matches!(other, Scalar::Int32 | Scalar::Sint32 | Scalar::Sfixed32 | Scalar::Enum) {
                write_long(&mut avro, i64::from(i32::try_from(number).map_err(|_| bad())?));
            } else {
                write_long(&mut avro, number);
            }
            write_key(1, wire_type_of(other), out);
            write_scalar(other, &mut Input::new(&avro), path, out)?;
        }
    }
    Ok(())
}

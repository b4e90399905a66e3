//! Running a program over one encoded record.
//!
//! Bytes that do not change are not copied one value at a time: `copy_from` marks the start of the pending
//! unchanged run, which is copied in one piece when a protected value (or a rewritten block header) interrupts it,
//! and at the end.

use std::borrow::Cow;

use super::program::{Inspect, Locate, ProtectStep, Scalar, ShapeStep, Skip, Step};
use super::wire::{Input, malformed, write_long};
use crate::crypto::{HASH_LEN, Scratch, ciphertext_len, plain, token_len};
use crate::detect::{DetectMode, Found, Kind, redact_into};
use crate::error::ValueError;
use crate::policy::{Action, Rule};
use crate::sanitize::{RecordKeys, mask_split};

/// Buffers one transcoding thread reuses from record to record, and the detections made since it was last
/// drained.
#[derive(Default)]
pub struct TranscodeScratch {
    plain: Vec<u8>,
    crypto: Scratch,
    found: Vec<Found>,
    pub(crate) redacted: String,
    detections: Detections,
    /// A protobuf field read into Avro binary, and its sanitized form (see `codec::protobuf::transcode`).
    pub(crate) field_avro: Vec<u8>,
    pub(crate) field_sanitized: Vec<u8>,
}

/// PII found in a field no annotation protects: where, what, and what was done (never the value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Detection {
    pub path: std::sync::Arc<str>,
    pub kind: Kind,
    pub mode: DetectMode,
}

/// How many of each detection: bounded by the schema's fields, however many records are transcoded.
pub type Detections = std::collections::BTreeMap<Detection, u64>;

impl TranscodeScratch {
    /// The detections made since the last call.
    pub fn take_detections(&mut self) -> Detections {
        std::mem::take(&mut self.detections)
    }

    /// Forgets the detections made since the last drain (a batch sanitized again counts once).
    pub fn clear_detections(&mut self) {
        self.detections.clear();
    }
}

pub(crate) struct Run<'a> {
    input: Input<'a>,
    copy_from: usize,
    out: &'a mut Vec<u8>,
    scratch: &'a mut TranscodeScratch,
    keys: &'a RecordKeys,
    rules: &'a [Rule],
    /// Where this record's output starts in `out`.
    out_start: usize,
}

/// The most bytes one record's sanitized form may take: protected values write more than they read (a token of an
/// empty string is ~50 bytes, a redacted value can be a fixed of 1 MiB standing for a one-byte branch), so a small
/// record could ask for gigabytes. Far above any broker's message size.
pub(crate) const MAX_OUTPUT: usize = 64 << 20;

impl<'a> Run<'a> {
    pub(crate) fn new(
        input: &'a [u8],
        out: &'a mut Vec<u8>,
        scratch: &'a mut TranscodeScratch,
        keys: &'a RecordKeys,
        rules: &'a [Rule],
    ) -> Self {
        Self {
            input: Input::new(input),
            copy_from: 0,
            out_start: out.len(),
            out,
            scratch,
            keys,
            rules,
        }
    }

    /// Runs the root step and copies the last pending run.
    pub(crate) fn finish(mut self, root: &Step) -> Result<(), ValueError> {
        self.exec(root)?;
        if self.input.remaining() != 0 {
            return Err(malformed(
                "bytes remain after the record: it was written with another schema",
            ));
        }
        self.flush();
        Ok(())
    }

    fn flush(&mut self) {
        self.out
            .extend_from_slice(&self.input.bytes[self.copy_from..self.input.pos]);
        self.copy_from = self.input.pos;
    }

    fn exec(&mut self, step: &Step) -> Result<(), ValueError> {
        match step {
            Step::Skip(skip) => skip_value(&mut self.input, skip),
            Step::Record(steps) => steps.iter().try_for_each(|s| self.exec(s)),
            Step::Array(items) => self.blocks(items.min_size, items.changes, |run| run.exec(&items.item)),
            Step::Map(items) => self.blocks(items.min_size + 1, items.changes, |run| {
                let start = run.input.pos;
                let key = run.input.read_str()?;
                if let Some(inspect) = &items.keys {
                    run.inspect(start, key, inspect)?;
                }
                run.exec(&items.item)
            }),
            Step::Union(branches) => {
                let index = self.input.read_long()?;
                let branch = usize::try_from(index).ok().and_then(|i| branches.get(i));
                self.exec(branch.ok_or_else(|| malformed("union branch index out of range"))?)
            }
            Step::Protect(protect) => self.protect(protect),
            Step::Inspect(inspect) => {
                let start = self.input.pos;
                let text = self.input.read_str()?;
                self.inspect(start, text, inspect)
            }
        }
    }

    /// Runs a field's detectors over `text` (read from `start`) and, when a detection redacts, writes the text
    /// rewritten in its place (see [`inspect_text`]).
    fn inspect(&mut self, start: usize, text: &'a str, inspect: &Inspect) -> Result<(), ValueError> {
        if inspect_text(text, inspect, self.scratch)? {
            self.out.extend_from_slice(&self.input.bytes[self.copy_from..start]);
            write_long(self.out, self.scratch.redacted.len() as i64);
            self.out.extend_from_slice(self.scratch.redacted.as_bytes());
            self.copy_from = self.input.pos;
        }
        Ok(())
    }

    /// Walks the blocks of an array or map whose items are looked at; when they can change, a block that declares
    /// its byte size gets a new header without it, since the size no longer holds.
    fn blocks(
        &mut self,
        min_size: usize,
        changes: bool,
        mut item: impl FnMut(&mut Self) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        loop {
            let header = self.input.pos;
            let (count, size) = self.input.read_block()?;
            if count == 0 {
                return Ok(());
            }
            check_count(count, min_size, &mut self.input)?;
            if size.is_some() && changes {
                self.out.extend_from_slice(&self.input.bytes[self.copy_from..header]);
                write_long(self.out, count as i64);
                self.copy_from = self.input.pos;
            }
            let start = self.input.pos;
            for _ in 0..count {
                item(self)?;
            }
            check_size(size, start, &self.input)?;
        }
    }

    fn protect(&mut self, step: &ProtectStep) -> Result<(), ValueError> {
        self.flush();
        let rule = &self.rules[step.rule];
        if rule.action == Action::Redact || self.keys.forgotten {
            skip_value(&mut self.input, &step.skip)?;
            self.out.extend_from_slice(&step.redacted);
        } else {
            self.shape(&step.shape, rule, step.scale)?;
        }
        if self.out.len() - self.out_start > MAX_OUTPUT {
            return Err(ValueError::new(
                &rule.path,
                format!(
                    "the record's sanitized form passes {} MiB (redacted values and tokens can be far larger than \
                     what they replace: a redacted fixed for every item of an array of small values)",
                    MAX_OUTPUT >> 20
                ),
            ));
        }
        self.copy_from = self.input.pos;
        Ok(())
    }

    fn shape(&mut self, shape: &ShapeStep, rule: &Rule, scale: u32) -> Result<(), ValueError> {
        match shape {
            ShapeStep::Scalar(scalar) => self.scalar(scalar, rule, scale),
            ShapeStep::Union(branches) => {
                let index = self.input.read_long()?;
                let (scalar, out) = usize::try_from(index)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| malformed("union branch index out of range"))?;
                if let Some(out) = out {
                    write_long(self.out, i64::from(*out));
                }
                match scalar {
                    Some(scalar) => self.scalar(scalar, rule, scale),
                    None => Ok(()),
                }
            }
            ShapeStep::Array(inner) | ShapeStep::Map(inner) => {
                let is_map = matches!(shape, ShapeStep::Map(_));
                loop {
                    let (count, size) = self.input.read_block()?;
                    write_long(self.out, count as i64);
                    if count == 0 {
                        return Ok(());
                    }
                    check_count(count, inner.min_size() + usize::from(is_map), &mut self.input)?;
                    let start = self.input.pos;
                    for _ in 0..count {
                        if is_map {
                            let key = self.input.read_str()?;
                            self.map_key(key, rule)?;
                        }
                        self.shape(inner, rule, scale)?;
                    }
                    check_size(size, start, &self.input)?;
                }
            }
        }
    }

    /// Writes the protected form of a protected map's key: keys are data, and stay unique (see
    /// [`Action::for_map_keys`]).
    fn map_key(&mut self, key: &str, rule: &Rule) -> Result<(), ValueError> {
        let plain_text = &mut self.scratch.plain;
        plain_text.clear();
        plain_text.push(plain::STRING);
        plain_text.extend_from_slice(key.as_bytes());
        let no_key = || ValueError::new(&rule.path, "no key for this field");
        match rule.map_keys {
            Some(Action::Tokenize) => {
                let dek = self.keys.record.as_ref().ok_or_else(no_key)?;
                write_long(self.out, token_len(plain_text.len()) as i64);
                dek.tokenize_into(&rule.key_context, plain_text, &mut self.scratch.crypto, self.out);
            }
            Some(Action::Hash) => {
                let dek = self.keys.domain.as_ref().ok_or_else(no_key)?;
                write_long(self.out, HASH_LEN as i64);
                dek.hash_into(&rule.key_context, plain_text, self.out);
            }
            _ => unreachable!("the compiler gives every map a key action of tokenize or hash"),
        }
        Ok(())
    }

    /// Reads one protected scalar and writes what its action makes of it.
    fn scalar(&mut self, scalar: &Scalar, rule: &Rule, scale: u32) -> Result<(), ValueError> {
        if let Action::Mask { keep_last } = rule.action {
            let text: Cow<'_, str> = match scalar {
                Scalar::String => Cow::Borrowed(self.input.read_str()?),
                Scalar::UuidString => Cow::Owned(parse_uuid(self.input.read_str()?)?.to_string()),
                Scalar::UuidBytes => Cow::Owned(
                    apache_avro::Uuid::from_slice(self.input.read_bytes()?)
                        .map_err(|_| malformed("a uuid takes 16 bytes"))?
                        .to_string(),
                ),
                Scalar::Fixed {
                    size: 16,
                    tag: plain::UUID,
                } => Cow::Owned(
                    apache_avro::Uuid::from_slice(self.input.take(16)?)
                        .expect("16 bytes")
                        .to_string(),
                ),
                _ => return Err(ValueError::new(&rule.path, "mask expects a string value")),
            };
            write_masked(&text, keep_last, self.out, avro_length);
            return Ok(());
        }
        let plain_text = &mut self.scratch.plain;
        plain_text.clear();
        read_plaintext(&mut self.input, scalar, scale, plain_text)?;
        write_keyed(
            rule,
            self.keys,
            plain_text,
            &mut self.scratch.crypto,
            self.out,
            avro_length,
        )
    }
}

/// An Avro string's or bytes' length, before it.
fn avro_length(len: usize, out: &mut Vec<u8>) {
    write_long(out, len as i64);
}

/// Writes `text` masked (see [`mask_split`]), after `frame(len, out)` writes what goes before a value of its length.
fn write_masked(text: &str, keep_last: usize, out: &mut Vec<u8>, frame: impl FnOnce(usize, &mut Vec<u8>)) {
    let (hidden, tail) = mask_split(text, keep_last);
    frame(hidden + text.len() - tail, out);
    out.resize(out.len() + hidden, b'*');
    out.extend_from_slice(&text.as_bytes()[tail..]);
}

/// Writes what the keyed action of `rule` (tokenize, encrypt, hash; a subject is tokenized) makes of `plain_text` (a
/// plaintext form, see `plain`), after `frame(len, out)` writes what goes before a value of its length.
fn write_keyed(
    rule: &Rule,
    keys: &RecordKeys,
    plain_text: &[u8],
    crypto: &mut Scratch,
    out: &mut Vec<u8>,
    frame: impl FnOnce(usize, &mut Vec<u8>),
) -> Result<(), ValueError> {
    let no_key = || ValueError::new(&rule.path, "no key for this field");
    match rule.action {
        Action::Tokenize | Action::Subject => {
            let dek = keys.record.as_ref().ok_or_else(no_key)?;
            frame(token_len(plain_text.len()), out);
            dek.tokenize_into(&rule.context, plain_text, crypto, out);
        }
        Action::Encrypt => {
            let dek = keys.record.as_ref().ok_or_else(no_key)?;
            frame(ciphertext_len(plain_text.len()), out);
            dek.encrypt_into(&rule.context, plain_text, crypto, out);
        }
        Action::Hash => {
            let dek = keys.domain.as_ref().ok_or_else(no_key)?;
            frame(HASH_LEN, out);
            dek.hash_into(&rule.context, plain_text, out);
        }
        Action::Mask { .. } | Action::Redact => unreachable!("handled before"),
    }
    Ok(())
}

impl TranscodeScratch {
    /// Writes what `rule`'s action makes of the string `text`, after `frame(len, out)` writes what goes before a
    /// value of its length, as a protected string of the Avro program would be written: `None` when the value is
    /// redacted instead (by its rule, or because the record's subject is forgotten), which only the program writes.
    pub(crate) fn protect_string(
        &mut self,
        rule: &Rule,
        keys: &RecordKeys,
        text: &str,
        out: &mut Vec<u8>,
        frame: impl FnOnce(usize, &mut Vec<u8>),
    ) -> Option<Result<(), ValueError>> {
        if rule.action == Action::Redact || keys.forgotten {
            return None;
        }
        if let Action::Mask { keep_last } = rule.action {
            write_masked(text, keep_last, out, frame);
            return Some(Ok(()));
        }
        self.plain.clear();
        self.plain.push(plain::STRING);
        self.plain.extend_from_slice(text.as_bytes());
        Some(write_keyed(rule, keys, &self.plain, &mut self.crypto, out, frame))
    }
}

/// Runs a field's detectors over `text`: records each detection, quarantines the record when one says so, and when
/// a detection redacts, leaves the text with the spans to redact replaced by their labels in `scratch.redacted` and
/// returns `true`. Each action's detectors look on their own, so a span one of them claims (a key cut off runs to
/// the end of the text) never hides what another would quarantine or redact.
pub(crate) fn inspect_text(text: &str, inspect: &Inspect, scratch: &mut TranscodeScratch) -> Result<bool, ValueError> {
    let detectors = &inspect.detectors;
    let mut redacted = false;
    for (set, mode) in [
        (detectors.quarantine, DetectMode::Quarantine),
        (detectors.report, DetectMode::Report),
        (detectors.redact, DetectMode::Redact),
    ] {
        if set.is_empty() {
            continue;
        }
        set.find(text, &mut scratch.found);
        for f in &scratch.found {
            *scratch
                .detections
                .entry(Detection {
                    path: inspect.path.clone(),
                    kind: f.kind,
                    mode,
                })
                .or_default() += 1;
        }
        let Some(first) = scratch.found.first() else {
            continue;
        };
        match mode {
            DetectMode::Quarantine => {
                return Err(ValueError::new(
                    &inspect.path,
                    format!(
                        "holds what the {} detector recognises, in a field no annotation protects \
                         (policy.detect = quarantine): annotate the field, or redact it",
                        first.kind.name()
                    ),
                ));
            }
            DetectMode::Redact => {
                scratch.redacted.clear();
                redact_into(text, &scratch.found, &mut scratch.redacted);
                redacted = true;
            }
            DetectMode::Report | DetectMode::Off => {}
        }
    }
    Ok(redacted)
}

/// Runs one step over the whole of `input` (Avro binary of the step's type), appending its output to `out`.
pub(crate) fn run_step(
    step: &Step,
    input: &[u8],
    keys: &RecordKeys,
    scratch: &mut TranscodeScratch,
    rules: &[Rule],
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    Run::new(input, out, scratch, keys, rules).finish(step)
}

/// Reads a scalar into its plaintext form: the same bytes `plain::encode_into` makes of its decoded value.
fn read_plaintext(input: &mut Input<'_>, scalar: &Scalar, scale: u32, out: &mut Vec<u8>) -> Result<(), ValueError> {
    match scalar {
        Scalar::String => {
            out.push(plain::STRING);
            out.extend_from_slice(input.read_str()?.as_bytes());
        }
        Scalar::UuidString => {
            out.push(plain::UUID);
            out.extend_from_slice(parse_uuid(input.read_str()?)?.as_bytes());
        }
        Scalar::Bytes => {
            out.push(plain::BYTES);
            out.extend_from_slice(input.read_bytes()?);
        }
        Scalar::UuidBytes => {
            let bytes = input.read_bytes()?;
            if bytes.len() != 16 {
                return Err(malformed("a uuid takes 16 bytes"));
            }
            out.push(plain::UUID);
            out.extend_from_slice(bytes);
        }
        Scalar::Fixed { size, tag } => {
            out.push(*tag);
            out.extend_from_slice(input.take(*size)?);
        }
        Scalar::Decimal { fixed } => {
            let unscaled = match fixed {
                Some(size) => input.take(*size)?,
                None => input.read_bytes()?,
            };
            if unscaled.is_empty() {
                return Err(malformed("a decimal with no bytes"));
            }
            out.push(plain::DECIMAL);
            out.extend_from_slice(&scale.to_be_bytes());
            out.extend_from_slice(unscaled);
        }
        Scalar::Int { tag } => {
            out.push(*tag);
            out.extend_from_slice(&input.read_int()?.to_be_bytes());
        }
        Scalar::Long { tag } => {
            out.push(*tag);
            out.extend_from_slice(&input.read_long()?.to_be_bytes());
        }
        Scalar::Float => {
            let bits: [u8; 4] = input.take(4)?.try_into().expect("4 bytes");
            out.push(plain::FLOAT);
            out.extend_from_slice(&f32::from_le_bytes(bits).to_be_bytes());
        }
        Scalar::Double => {
            let bits: [u8; 8] = input.take(8)?.try_into().expect("8 bytes");
            out.push(plain::DOUBLE);
            out.extend_from_slice(&f64::from_le_bytes(bits).to_be_bytes());
        }
        Scalar::Boolean => {
            let byte = input.take(1)?[0];
            if byte > 1 {
                return Err(malformed("a boolean is 0 or 1"));
            }
            out.push(plain::BOOLEAN);
            out.push(byte);
        }
        Scalar::Enum(symbols) => {
            let index = input.read_long()?;
            let symbol = usize::try_from(index)
                .ok()
                .and_then(|i| symbols.get(i))
                .ok_or_else(|| malformed("enum index out of range"))?;
            out.push(plain::ENUM);
            out.extend_from_slice(symbol.as_bytes());
        }
    }
    Ok(())
}

fn parse_uuid(text: &str) -> Result<apache_avro::Uuid, ValueError> {
    apache_avro::Uuid::parse_str(text).map_err(|_| malformed("not a valid uuid"))
}

/// A block may not declare more items than its remaining bytes could hold; items of zero size draw on the record's
/// budget of them ([`Input::empty_items_left`]).
fn check_count(count: usize, min_size: usize, input: &mut Input<'_>) -> Result<(), ValueError> {
    if min_size == 0 {
        input.empty_items_left = input
            .empty_items_left
            .checked_sub(count)
            .ok_or_else(|| malformed("more items of zero size than a record may hold (65536)"))?;
    } else if count > input.remaining() / min_size {
        return Err(malformed("block count larger than the record could hold"));
    }
    Ok(())
}

/// A block that declares its byte size must have exactly that many bytes of items.
fn check_size(size: Option<usize>, start: usize, input: &Input<'_>) -> Result<(), ValueError> {
    match size {
        Some(size) if size != input.pos - start => Err(malformed("block byte size does not match its items")),
        _ => Ok(()),
    }
}

/// Passes over one value, checking it (UTF-8, enum and union indices, lengths) on the way.
pub(crate) fn skip_value(input: &mut Input<'_>, skip: &Skip) -> Result<(), ValueError> {
    match skip {
        Skip::Null => {}
        Skip::Boolean => {
            if input.take(1)?[0] > 1 {
                return Err(malformed("a boolean is 0 or 1"));
            }
        }
        Skip::Int => {
            input.read_int()?;
        }
        Skip::Long => {
            input.read_long()?;
        }
        Skip::Float => {
            input.take(4)?;
        }
        Skip::Double => {
            input.take(8)?;
        }
        Skip::Bytes => {
            input.read_bytes()?;
        }
        Skip::String => {
            input.read_str()?;
        }
        Skip::UuidString => {
            parse_uuid(input.read_str()?)?;
        }
        Skip::UuidBytes => {
            if input.read_bytes()?.len() != 16 {
                return Err(malformed("a uuid takes 16 bytes"));
            }
        }
        Skip::Fixed(size) => {
            input.take(*size)?;
        }
        Skip::Enum(symbols) => {
            let index = input.read_long()?;
            if !(0..*symbols as i64).contains(&index) {
                return Err(malformed("enum index out of range"));
            }
        }
        Skip::Array(item) | Skip::Map(item) => {
            let is_map = matches!(skip, Skip::Map(_));
            let min_size = item.min_size() + usize::from(is_map);
            loop {
                let (count, size) = input.read_block()?;
                if count == 0 {
                    break;
                }
                check_count(count, min_size, input)?;
                let start = input.pos;
                for _ in 0..count {
                    if is_map {
                        input.read_str()?;
                    }
                    skip_value(input, item)?;
                }
                check_size(size, start, input)?;
            }
        }
        Skip::Union(branches) => {
            let index = input.read_long()?;
            let branch = usize::try_from(index).ok().and_then(|i| branches.get(i));
            skip_value(
                input,
                branch.ok_or_else(|| malformed("union branch index out of range"))?,
            )?;
        }
        Skip::Record { fields, .. } => fields.iter().try_for_each(|f| skip_value(input, f))?,
    }
    Ok(())
}

/// Reads the subject id of a record, as the reference path's `subject_id` would give it (`unsigned`: a long id read
/// as the unsigned 64-bit value it holds).
pub(crate) fn locate_subject<'a>(
    record: &'a [u8],
    mut locate: &Locate,
    unsigned: bool,
) -> Result<Option<Cow<'a, str>>, ValueError> {
    let mut input = Input::new(record);
    loop {
        match locate {
            Locate::Record { before, then } => {
                before.iter().try_for_each(|s| skip_value(&mut input, s))?;
                locate = then;
            }
            Locate::Union(branches) => {
                let index = input.read_long()?;
                match usize::try_from(index).ok().and_then(|i| branches.get(i)) {
                    Some(Some(next)) => locate = next,
                    Some(None) => return Ok(None),
                    None => return Err(malformed("union branch index out of range")),
                }
            }
            Locate::Scalar(scalar) => {
                return Ok(match scalar {
                    Scalar::String => Some(input.read_str()?).filter(|s| !s.is_empty()).map(Cow::Borrowed),
                    Scalar::UuidString => Some(Cow::Owned(parse_uuid(input.read_str()?)?.to_string())),
                    Scalar::Int { .. } => Some(Cow::Owned(input.read_int()?.to_string())),
                    Scalar::Long { .. } if unsigned => Some(Cow::Owned((input.read_long()? as u64).to_string())),
                    Scalar::Long { .. } => Some(Cow::Owned(input.read_long()?.to_string())),
                    Scalar::UuidBytes => {
                        let uuid = apache_avro::Uuid::from_slice(input.read_bytes()?)
                            .map_err(|_| malformed("a uuid takes 16 bytes"))?;
                        Some(Cow::Owned(uuid.to_string()))
                    }
                    Scalar::Fixed {
                        size: 16,
                        tag: plain::UUID,
                    } => {
                        let uuid = apache_avro::Uuid::from_slice(input.take(16)?).expect("16 bytes");
                        Some(Cow::Owned(uuid.to_string()))
                    }
                    _ => unreachable!("Builder::locate accepts no other subject type"),
                });
            }
        }
    }
}

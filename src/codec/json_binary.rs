//! JSON to Avro binary and back without a `Value` tree in between: the fast path of JSON records, for schemas made
//! only of what a JSON Schema translates to (null, boolean, int, long, float, double, string, array, map, record,
//! union). Other schemas (an Avro schema's logical types, on a plain-JSON topic) take [`super::json::JsonCodec`].
//!
//! Reading follows `JsonCodec`'s rules exactly (a union takes null in its null branch, anything else in the first
//! branch that accepts it as it is, then the first that accepts it without its undeclared properties; a missing
//! field takes its default), so both paths give the same record; the property tests of `tests/json_roundtrip.rs`
//! check it. Errors name the field path, never a value or a key of the input.

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;
use serde_json::Value as Json;

use super::json::{ReadBudget, declares, json_kind, no_branch, type_name};
use crate::error::ValueError;

/// Whether every type of `schema` is one this path handles.
pub fn supports(schema: &Schema) -> bool {
    match schema {
        Schema::Null
        | Schema::Boolean
        | Schema::Int
        | Schema::Long
        | Schema::Float
        | Schema::Double
        | Schema::String => true,
        Schema::Array(array) => supports(&array.items),
        Schema::Map(map) => supports(&map.types),
        Schema::Union(union) => union.variants().iter().all(supports),
        Schema::Record(record) => record.fields.iter().all(|f| supports(&f.schema)),
        _ => false,
    }
}

/// Writes a JSON record as the Avro binary of `schema`; undeclared properties are dropped (and counted in
/// `dropped`) when `drop`, else refused. `input_len`, the bytes the record was read from, sets its budget of steps
/// and of defaults.
pub fn encode(
    schema: &Schema,
    json: &Json,
    input_len: usize,
    drop: bool,
    dropped: &mut usize,
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    let mut budget = ReadBudget::for_input(input_len);
    Encoder {
        drop,
        dropped,
        budget: &mut budget,
    }
    .value(schema, json, "", out)
}

struct Encoder<'d> {
    drop: bool,
    dropped: &'d mut usize,
    /// The record's, shared by the attempts at a union's branches.
    budget: &'d mut ReadBudget,
}

impl Encoder<'_> {
    fn value(&mut self, schema: &Schema, json: &Json, path: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
        self.budget.step(path)?;
        if out.len() > super::json::MAX_AVRO_BYTES {
            return Err(self.budget.too_large(path));
        }
        let mismatch =
            |expected: &str| ValueError::new(path, format!("expected {expected}, found {}", json_kind(json)));
        match schema {
            Schema::Null if json.is_null() => {}
            Schema::Null => return Err(mismatch("null")),
            Schema::Boolean => out.push(u8::from(json.as_bool().ok_or_else(|| mismatch("a boolean"))?)),
            Schema::Int => {
                let n = json
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| mismatch("an int (32-bit integer)"))?;
                write_long(i64::from(n), out);
            }
            Schema::Long => write_long(json.as_i64().ok_or_else(|| mismatch("a long (64-bit integer)"))?, out),
            Schema::Float => {
                let n = json.as_f64().ok_or_else(|| mismatch("a number"))? as f32;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Schema::Double => {
                let n = json.as_f64().ok_or_else(|| mismatch("a number"))?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Schema::String => write_str(json.as_str().ok_or_else(|| mismatch("a string"))?, out),
            Schema::Array(array) => {
                let items = json.as_array().ok_or_else(|| mismatch("an array"))?;
                if !items.is_empty() {
                    write_long(items.len() as i64, out);
                    for item in items {
                        self.value(&array.items, item, path, out)?;
                    }
                }
                out.push(0);
            }
            Schema::Map(map) => {
                let entries = json.as_object().ok_or_else(|| mismatch("an object (map)"))?;
                if !entries.is_empty() {
                    write_long(entries.len() as i64, out);
                    for (key, value) in entries {
                        write_str(key, out);
                        self.value(&map.types, value, path, out)?;
                    }
                }
                out.push(0);
            }
            Schema::Union(union) => {
                let mut first_error = None;
                for drop in [false, true].into_iter().filter(|&d| !d || self.drop) {
                    for (index, variant) in union.variants().iter().enumerate() {
                        let start = out.len();
                        let mut dropped = 0;
                        write_long(index as i64, out);
                        match (Encoder {
                            drop,
                            dropped: &mut dropped,
                            budget: &mut *self.budget,
                        })
                        .value(variant, json, path, out)
                        {
                            Ok(()) => {
                                *self.dropped += dropped;
                                return Ok(());
                            }
                            Err(e) if self.budget.spent() => return Err(e),
                            Err(e) => {
                                out.truncate(start);
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                let names: Vec<&str> = union.variants().iter().map(type_name).collect();
                return Err(no_branch(path, json, &names, first_error));
            }
            Schema::Record(record) => self.record(record, json, path, out)?,
            _ => return Err(ValueError::new(path, "a type the JSON fast path does not take")),
        }
        Ok(())
    }

    fn record(&mut self, record: &RecordSchema, json: &Json, path: &str, out: &mut Vec<u8>) -> Result<(), ValueError> {
        let object = json
            .as_object()
            .ok_or_else(|| ValueError::new(path, format!("expected an object (record), found {}", json_kind(json))))?;
        let declared = object.keys().filter(|k| declares(record, k)).count();
        if declared < object.len() {
            if self.drop {
                *self.dropped += object.len() - declared;
            } else {
                // The key itself is input, and may be PII: the error names its position.
                let position = object
                    .keys()
                    .position(|k| !declares(record, k))
                    .expect("an undeclared key");
                return Err(ValueError::new(
                    path,
                    format!(
                        "the object's key number {} is not a field of the record (the schema has no such field)",
                        position + 1
                    ),
                ));
            }
        }
        for field in &record.fields {
            let field_path = if path.is_empty() {
                field.name.clone()
            } else {
                format!("{path}.{}", field.name)
            };
            match (object.get(&field.name), &field.default) {
                (Some(value), _) => self.value(&field.schema, value, &field_path, out)?,
                (None, Some(default)) => {
                    self.budget.default(&field.name, default, &field_path)?;
                    match &field.schema {
                        // A default of a union field is a value of the union's first branch.
                        Schema::Union(union) => {
                            let first = union
                                .variants()
                                .first()
                                .ok_or_else(|| ValueError::new(&field_path, "empty union"))?;
                            write_long(0, out);
                            self.value(first, default, &field_path, out)?;
                        }
                        other => self.value(other, default, &field_path, out)?,
                    }
                }
                (None, None) => return Err(ValueError::new(&field_path, "missing field (it has no default)")),
            }
        }
        Ok(())
    }
}

fn write_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    write_long(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

/// Writes the Avro binary `bytes` of `schema` as JSON text; with `omit_null_defaults`, a field whose default is null
/// and whose value is null is left out. Every byte must belong to the record.
pub fn decode(
    schema: &Schema,
    mut bytes: &[u8],
    omit_null_defaults: bool,
    out: &mut Vec<u8>,
) -> Result<(), ValueError> {
    Decoder { omit_null_defaults }.value(schema, &mut bytes, out)?;
    if !bytes.is_empty() {
        return Err(malformed());
    }
    Ok(())
}

struct Decoder {
    omit_null_defaults: bool,
}

fn malformed() -> ValueError {
    ValueError::new("", "the sanitized record is malformed")
}

/// Items one block may claim: far more than any record holds, and a bound on the work a corrupt count can ask.
const MAX_BLOCK_ITEMS: i64 = 1 << 24;

impl Decoder {
    fn value(&self, schema: &Schema, bytes: &mut &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
        match schema {
            Schema::Null => out.extend_from_slice(b"null"),
            Schema::Boolean => match take(bytes, 1)? {
                [0] => out.extend_from_slice(b"false"),
                [1] => out.extend_from_slice(b"true"),
                _ => return Err(malformed()),
            },
            Schema::Int | Schema::Long => {
                let n = read_long(bytes)?;
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            }
            Schema::Float => {
                let n = f32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes"));
                write_number(f64::from(n), out);
            }
            Schema::Double => {
                let n = f64::from_le_bytes(take(bytes, 8)?.try_into().expect("8 bytes"));
                write_number(n, out);
            }
            Schema::String => {
                let text = read_str(bytes)?;
                serde_json::to_writer(&mut *out, text).map_err(|_| malformed())?;
            }
            Schema::Array(array) => {
                out.push(b'[');
                let mut first = true;
                self.blocks(bytes, |bytes| {
                    if !std::mem::take(&mut first) {
                        out.push(b',');
                    }
                    self.value(&array.items, bytes, out)
                })?;
                out.push(b']');
            }
            Schema::Map(map) => {
                out.push(b'{');
                let mut first = true;
                self.blocks(bytes, |bytes| {
                    if !std::mem::take(&mut first) {
                        out.push(b',');
                    }
                    let key = read_str(bytes)?;
                    serde_json::to_writer(&mut *out, key).map_err(|_| malformed())?;
                    out.push(b':');
                    self.value(&map.types, bytes, out)
                })?;
                out.push(b'}');
            }
            Schema::Union(union) => {
                let index = usize::try_from(read_long(bytes)?).map_err(|_| malformed())?;
                let variant = union.variants().get(index).ok_or_else(malformed)?;
                self.value(variant, bytes, out)?;
            }
            Schema::Record(record) => {
                out.push(b'{');
                let mut first = true;
                for field in &record.fields {
                    if self.omit_null_defaults && field.default == Some(Json::Null) {
                        let null = match &field.schema {
                            Schema::Null => true,
                            Schema::Union(union) => {
                                let mut peek = *bytes;
                                let index = usize::try_from(read_long(&mut peek)?).map_err(|_| malformed())?;
                                let null = matches!(union.variants().get(index), Some(Schema::Null));
                                if null {
                                    *bytes = peek;
                                }
                                null
                            }
                            _ => false,
                        };
                        if null {
                            continue;
                        }
                    }
                    if !std::mem::take(&mut first) {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, &field.name).map_err(|_| malformed())?;
                    out.push(b':');
                    self.value(&field.schema, bytes, out)?;
                }
                out.push(b'}');
            }
            _ => return Err(ValueError::new("", "a type the JSON fast path does not take")),
        }
        Ok(())
    }

    /// Reads the blocks of an array or a map, calling `item` for each item.
    fn blocks(
        &self,
        bytes: &mut &[u8],
        mut item: impl FnMut(&mut &[u8]) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        let mut total = 0;
        loop {
            let mut count = read_long(bytes)?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                read_long(bytes)?;
                count = count.checked_neg().ok_or_else(malformed)?;
            }
            total += count;
            if total > MAX_BLOCK_ITEMS {
                return Err(malformed());
            }
            for _ in 0..count {
                item(bytes)?;
            }
        }
    }
}

/// A number as serde_json writes one (a non-finite double is `null`).
fn write_number(n: f64, out: &mut Vec<u8>) {
    if n.is_finite() {
        serde_json::to_writer(&mut *out, &n).expect("a finite number writes");
    } else {
        out.extend_from_slice(b"null");
    }
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], ValueError> {
    if bytes.len() < n {
        return Err(malformed());
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn read_long(bytes: &mut &[u8]) -> Result<i64, ValueError> {
    let mut z: u64 = 0;
    for shift in (0..64).step_by(7) {
        let [byte, rest @ ..] = *bytes else {
            return Err(malformed());
        };
        *bytes = rest;
        z |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    Err(malformed())
}

fn read_str<'a>(bytes: &mut &'a [u8]) -> Result<&'a str, ValueError> {
    let len = usize::try_from(read_long(bytes)?).map_err(|_| malformed())?;
    std::str::from_utf8(take(bytes, len)?).map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn longs_round_trip_at_their_edges() {
        for n in [0, 1, -1, 63, -64, 64, i64::from(i32::MAX), i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            write_long(n, &mut out);
            assert_eq!(read_long(&mut &out[..]).unwrap(), n);
        }
        assert!(
            read_long(&mut &[0xff; 11][..]).is_err(),
            "an overlong varint is refused"
        );
    }

    #[test]
    fn a_record_round_trips_with_absent_optionals_left_out() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "a", "type": "string"},
                {"name": "b", "type": ["null", "long"], "default": null},
                {"name": "c", "type": {"type": "map", "values": "double"}, "default": {}},
                {"name": "d", "type": {"type": "array", "items": ["null", "string", "boolean"]}}]}"#,
        )
        .unwrap();
        assert!(supports(&schema));
        let input = json!({"a": "x\"y", "d": ["s", null, true], "extra": 1});
        let (mut avro, mut dropped) = (Vec::new(), 0);
        encode(&schema, &input, 0, true, &mut dropped, &mut avro).unwrap();
        assert_eq!(dropped, 1);
        let mut out = Vec::new();
        decode(&schema, &avro, true, &mut out).unwrap();
        let back: Json = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, json!({"a": "x\"y", "c": {}, "d": ["s", null, true]}));
        for end in 0..avro.len() {
            assert!(decode(&schema, &avro[..end], true, &mut Vec::new()).is_err());
        }
        let refused = encode(&schema, &input, 0, false, &mut 0, &mut Vec::new()).unwrap_err();
        assert!(refused.to_string().contains("key number 3"), "{refused}");
    }
}

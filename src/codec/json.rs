//! Plain JSON <-> Avro values, guided by a schema.
//!
//! Plain JSON means what a person writes: a record is an object, a union is its bare value (the first branch that
//! accepts it wins), bytes and fixed are strings whose characters are U+0000..U+00FF (Avro's JSON encoding),
//! decimals are strings or numbers (`"12.34"`), uuids are strings and the date/time types are their numbers.

use std::collections::HashMap;

use apache_avro::schema::{DecimalSchema, InnerDecimalSchema, Name, RecordSchema, UuidSchema};
use apache_avro::types::Value;
use apache_avro::{Decimal, Schema, Uuid};
use serde_json::{Map, Value as Json};

use crate::error::ValueError;
pub use crate::policy::Undeclared;

/// Converts between plain JSON and values of one schema.
pub struct JsonCodec {
    schema: Schema,
    /// The named types of `schema`, to resolve references.
    names: HashMap<Name, Schema>,
    undeclared: Undeclared,
    /// Fields whose default is null and whose value is null are left out of the output (JSON Schema records: an
    /// optional property absent in the input stays absent).
    omit_null_defaults: bool,
}

/// Reading state: whether undeclared properties are dropped, and how many were; what is left of the record's
/// budgets.
struct Reading {
    drop: bool,
    dropped: usize,
    budget: ReadBudget,
}

/// The values reading one JSON record may try, each union branch tried counted: a union of records whose fields
/// are such unions tries every branch at every level, (2 × branches)^depth tries from a few hundred bytes. A
/// million, and 16 more per byte of the record: far above what a real record takes.
const MIN_READ_STEPS: usize = 1_000_000;
const READ_STEPS_PER_BYTE: usize = 16;

/// The bytes of defaults one JSON record may take (a missing field takes its default whole, and its JSON names the
/// field again): 16 MiB, and 16 more per byte of the record. `[{}, {}, …]` of a record with a long default (or a
/// long field name) asked for gigabytes.
const MIN_DEFAULT_BYTES: usize = 16 << 20;
const DEFAULT_BYTES_PER_BYTE: usize = 16;

/// The most bytes of Avro binary one JSON record may become on the fast path.
pub(crate) const MAX_AVRO_BYTES: usize = 64 << 20;

/// What one record's reading has left: values it may still try, bytes of defaults it may still take.
#[derive(Clone, Copy)]
pub(crate) struct ReadBudget {
    steps: usize,
    bytes: usize,
}

impl ReadBudget {
    /// The budget of a record of `input_len` bytes.
    pub(crate) fn for_input(input_len: usize) -> Self {
        Self {
            steps: MIN_READ_STEPS.saturating_add(READ_STEPS_PER_BYTE.saturating_mul(input_len)),
            bytes: MIN_DEFAULT_BYTES.saturating_add(DEFAULT_BYTES_PER_BYTE.saturating_mul(input_len)),
        }
    }

    /// Whether it ran out: the reading stops there (a union tries no other branch).
    pub(crate) fn spent(&self) -> bool {
        self.steps == 0
    }

    /// One more value tried.
    pub(crate) fn step(&mut self, path: &str) -> Result<(), ValueError> {
        self.steps = self.steps.checked_sub(1).ok_or_else(|| {
            ValueError::new(
                path,
                "the record takes more steps to read than its size allows (unions within unions try every branch \
                 at every level)",
            )
        })?;
        Ok(())
    }

    /// A missing field's default taken: its value, and its name, which the record's JSON carries again.
    pub(crate) fn default(&mut self, name: &str, default: &Json, path: &str) -> Result<(), ValueError> {
        match self.bytes.checked_sub(name.len() + json_size(default)) {
            Some(left) => {
                self.bytes = left;
                Ok(())
            }
            None => {
                self.steps = 0;
                Err(ValueError::new(
                    path,
                    "the record's missing fields take more of their defaults than its size allows (a missing field \
                     takes its default whole)",
                ))
            }
        }
    }

    /// The error of a record that becomes more than [`MAX_AVRO_BYTES`]; the budget is spent.
    pub(crate) fn too_large(&mut self, path: &str) -> ValueError {
        self.steps = 0;
        ValueError::new(
            path,
            format!(
                "the record becomes more than {} MiB of Avro (a missing field takes its default whole)",
                MAX_AVRO_BYTES >> 20
            ),
        )
    }
}

/// About the bytes of `json` written as text.
fn json_size(json: &Json) -> usize {
    match json {
        Json::Null | Json::Bool(_) | Json::Number(_) => 8,
        Json::String(text) => text.len() + 2,
        Json::Array(items) => items.iter().map(json_size).sum::<usize>() + 2,
        Json::Object(entries) => entries.iter().map(|(k, v)| k.len() + 3 + json_size(v)).sum::<usize>() + 2,
    }
}

impl JsonCodec {
    /// A codec that refuses object keys the schema does not declare.
    pub fn new(schema: &Schema) -> Self {
        Self {
            schema: schema.clone(),
            names: super::schema_names(schema)
                .into_iter()
                .map(|(name, schema)| (name.clone(), schema.clone()))
                .collect(),
            undeclared: Undeclared::Quarantine,
            omit_null_defaults: false,
        }
    }

    /// A codec for the records of a topic of JSON: undeclared properties as `undeclared` says; with
    /// `omit_null_defaults` (a JSON Schema translated to `schema`), absent optional properties stay absent.
    pub fn records(schema: &Schema, undeclared: Undeclared, omit_null_defaults: bool) -> Self {
        Self {
            undeclared,
            omit_null_defaults,
            ..Self::new(schema)
        }
    }

    /// Reads a plain-JSON record of this schema.
    pub fn to_value(&self, json: &Json) -> Result<Value, ValueError> {
        self.to_value_counted(json, 0).map(|(value, _)| value)
    }

    /// Reads a plain-JSON record of this schema; also says how many undeclared properties were dropped.
    /// `input_len`, the bytes the record was read from, sets its budget of steps and of defaults.
    pub fn to_value_counted(&self, json: &Json, input_len: usize) -> Result<(Value, usize), ValueError> {
        let mut reading = Reading {
            drop: self.undeclared == Undeclared::Drop,
            dropped: 0,
            budget: ReadBudget::for_input(input_len),
        };
        let value = self.read(&self.schema, json, "", &mut reading)?;
        Ok((value, reading.dropped))
    }

    /// Reads a plain-JSON value of the schema found at a field path (used by `tokenize`), unions unwrapped.
    pub fn field_value(&self, path: &str, json: &Json) -> Result<Value, ValueError> {
        let schema = self
            .field_schema(path)
            .ok_or_else(|| ValueError::new(path, "no such field in the schema"))?;
        let mut reading = Reading {
            drop: false,
            dropped: 0,
            budget: ReadBudget::for_input(0),
        };
        Ok(match self.read(schema, json, path, &mut reading)? {
            Value::Union(_, inner) => *inner,
            other => other,
        })
    }

    /// Writes a value of this schema as plain JSON.
    pub fn to_json(&self, value: &Value) -> Json {
        self.write(&self.schema, value)
    }

    /// A named type's definition for a reference to it.
    pub(crate) fn resolve<'a>(&'a self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            other => other,
        }
    }

    /// The schema of the field at a dotted path, through records, arrays, maps and unions.
    fn field_schema(&self, path: &str) -> Option<&Schema> {
        let mut current = &self.schema;
        for name in path.split('.') {
            current = self.find_field(current, name)?;
        }
        Some(current)
    }

    fn find_field<'a>(&'a self, schema: &'a Schema, name: &str) -> Option<&'a Schema> {
        match self.resolve(schema) {
            Schema::Record(record) => record.lookup.get(name).map(|&i| &record.fields[i].schema),
            Schema::Array(a) => self.find_field(&a.items, name),
            Schema::Map(m) => self.find_field(&m.types, name),
            Schema::Union(u) => u.variants().iter().find_map(|v| self.find_field(v, name)),
            _ => None,
        }
    }

    fn read(&self, schema: &Schema, json: &Json, path: &str, reading: &mut Reading) -> Result<Value, ValueError> {
        let mismatch =
            |expected: &str| ValueError::new(path, format!("expected {expected}, found {}", json_kind(json)));
        let int = || {
            json.as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| mismatch("an int (32-bit integer)"))
        };
        let long = || json.as_i64().ok_or_else(|| mismatch("a long (64-bit integer)"));
        reading.budget.step(path)?;
        Ok(match self.resolve(schema) {
            Schema::Null => json.is_null().then_some(Value::Null).ok_or_else(|| mismatch("null"))?,
            Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(|| mismatch("a boolean"))?),
            Schema::Int => Value::Int(int()?),
            Schema::Long => Value::Long(long()?),
            Schema::Float => Value::Float(json.as_f64().ok_or_else(|| mismatch("a number"))? as f32),
            Schema::Double => Value::Double(json.as_f64().ok_or_else(|| mismatch("a number"))?),
            Schema::String => Value::String(json.as_str().ok_or_else(|| mismatch("a string"))?.to_owned()),
            Schema::Bytes => Value::Bytes(
                json_to_bytes(json).ok_or_else(|| mismatch("a string of characters U+0000..U+00FF (bytes)"))?,
            ),
            Schema::Fixed(fixed) => {
                let bytes =
                    json_to_bytes(json).ok_or_else(|| mismatch("a string of characters U+0000..U+00FF (fixed)"))?;
                if bytes.len() != fixed.size {
                    return Err(ValueError::new(
                        path,
                        format!("fixed value has {} bytes, the schema says {}", bytes.len(), fixed.size),
                    ));
                }
                Value::Fixed(fixed.size, bytes)
            }
            Schema::Enum(e) => {
                let symbol = json.as_str().ok_or_else(|| mismatch("an enum symbol string"))?;
                let index = e
                    .symbols
                    .iter()
                    .position(|s| s == symbol)
                    .ok_or_else(|| ValueError::new(path, "not a symbol of the enum"))?;
                Value::Enum(index as u32, symbol.to_owned())
            }
            Schema::Array(array) => {
                let items = json.as_array().ok_or_else(|| mismatch("an array"))?;
                Value::Array(
                    items
                        .iter()
                        .map(|item| self.read(&array.items, item, path, reading))
                        .collect::<Result<_, _>>()?,
                )
            }
            Schema::Map(map) => {
                let entries = json.as_object().ok_or_else(|| mismatch("an object (map)"))?;
                Value::Map(
                    entries
                        .iter()
                        .map(|(k, v)| Ok((k.clone(), self.read(&map.types, v, path, reading)?)))
                        .collect::<Result<_, ValueError>>()?,
                )
            }
            Schema::Union(union) => {
                // Null goes to the null branch; any other value to the first branch that accepts it as it is, else
                // (when undeclared properties are dropped) to the first that accepts it without them.
                let mut first_error = None;
                for drop in [false, true].into_iter().filter(|&d| !d || reading.drop) {
                    for (index, variant) in union.variants().iter().enumerate() {
                        let mut attempt = Reading {
                            drop,
                            dropped: 0,
                            budget: reading.budget,
                        };
                        let read = self.read(variant, json, path, &mut attempt);
                        reading.budget = attempt.budget;
                        match read {
                            Ok(value) => {
                                reading.dropped += attempt.dropped;
                                return Ok(Value::Union(index as u32, Box::new(value)));
                            }
                            Err(e) if reading.budget.spent() => return Err(e),
                            Err(e) => {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                let names: Vec<&str> = union.variants().iter().map(|v| self.type_name(v)).collect();
                return Err(no_branch(path, json, &names, first_error));
            }
            Schema::Record(record) => self.read_record(record, json, path, reading)?,
            Schema::Decimal(decimal) => Value::Decimal(read_decimal(decimal, json, path)?),
            Schema::BigDecimal => {
                return Err(ValueError::new(
                    path,
                    "big-decimal values are not supported in JSON input",
                ));
            }
            Schema::Uuid(kind) => {
                let text = json.as_str().ok_or_else(|| mismatch("a uuid string"))?;
                let uuid = Uuid::parse_str(text).map_err(|_| ValueError::new(path, "not a valid uuid"))?;
                match kind {
                    UuidSchema::String | UuidSchema::Bytes | UuidSchema::Fixed(_) => Value::Uuid(uuid),
                }
            }
            Schema::Date => Value::Date(int()?),
            Schema::TimeMillis => Value::TimeMillis(int()?),
            Schema::TimeMicros => Value::TimeMicros(long()?),
            Schema::TimestampMillis => Value::TimestampMillis(long()?),
            Schema::TimestampMicros => Value::TimestampMicros(long()?),
            Schema::TimestampNanos => Value::TimestampNanos(long()?),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(long()?),
            Schema::LocalTimestampMicros => Value::LocalTimestampMicros(long()?),
            Schema::LocalTimestampNanos => Value::LocalTimestampNanos(long()?),
            Schema::Duration(_) => {
                return Err(ValueError::new(path, "duration values are not supported in JSON input"));
            }
            Schema::Ref { .. } => {
                return Err(ValueError::new(path, "the schema refers to an undefined type"));
            }
        })
    }

    fn read_record(
        &self,
        record: &RecordSchema,
        json: &Json,
        path: &str,
        reading: &mut Reading,
    ) -> Result<Value, ValueError> {
        let object = json
            .as_object()
            .ok_or_else(|| ValueError::new(path, format!("expected an object (record), found {}", json_kind(json))))?;
        if reading.drop {
            // Never passed on: the sanitized record is built from the declared fields only.
            reading.dropped += object.keys().filter(|k| !declares(record, k)).count();
        } else if let Some(position) = object.keys().position(|k| !declares(record, k)) {
            // The key itself is input, and may be PII (an e-mail pasted as a key): the error names its position.
            return Err(ValueError::new(
                path,
                format!(
                    "the object's key number {} is not a field of the record (the schema has no such field)",
                    position + 1
                ),
            ));
        }
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let field_path = join(path, &field.name);
            let value = match (object.get(&field.name), &field.default) {
                (Some(value), _) => self.read(&field.schema, value, &field_path, reading)?,
                (None, Some(default)) => {
                    reading.budget.default(&field.name, default, &field_path)?;
                    self.read_default(&field.schema, default, &field_path, reading)?
                }
                (None, None) => {
                    return Err(ValueError::new(&field_path, "missing field (it has no default)"));
                }
            };
            fields.push((field.name.clone(), value));
        }
        Ok(Value::Record(fields))
    }

    /// A default of a union field is a value of the union's first branch.
    fn read_default(
        &self,
        schema: &Schema,
        default: &Json,
        path: &str,
        reading: &mut Reading,
    ) -> Result<Value, ValueError> {
        match self.resolve(schema) {
            Schema::Union(union) => {
                let first = union
                    .variants()
                    .first()
                    .ok_or_else(|| ValueError::new(path, "empty union"))?;
                Ok(Value::Union(0, Box::new(self.read(first, default, path, reading)?)))
            }
            other => self.read(other, default, path, reading),
        }
    }

    fn write(&self, schema: &Schema, value: &Value) -> Json {
        let schema = self.resolve(schema);
        match (schema, value) {
            (Schema::Union(union), Value::Union(index, inner)) => match union.variants().get(*index as usize) {
                Some(variant) => self.write(variant, inner),
                None => Json::Null,
            },
            (Schema::Record(record), Value::Record(fields)) => {
                let mut object = Map::with_capacity(fields.len());
                for (field, (name, value)) in record.fields.iter().zip(fields) {
                    if self.omit_null_defaults && field.default == Some(Json::Null) && is_null(value) {
                        continue;
                    }
                    object.insert(name.clone(), self.write(&field.schema, value));
                }
                Json::Object(object)
            }
            (Schema::Array(array), Value::Array(items)) => {
                Json::Array(items.iter().map(|v| self.write(&array.items, v)).collect())
            }
            (Schema::Map(map), Value::Map(entries)) => {
                let mut keys: Vec<&String> = entries.keys().collect();
                keys.sort();
                Json::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), self.write(&map.types, &entries[k])))
                        .collect(),
                )
            }
            (Schema::Decimal(decimal), Value::Decimal(d)) => match Vec::<u8>::try_from(d) {
                Ok(bytes) => decimal_to_string(&bytes, decimal.scale as u32).map_or(Json::Null, Json::String),
                Err(_) => Json::Null,
            },
            (_, value) => scalar_to_json(value),
        }
    }

    fn type_name<'a>(&'a self, schema: &'a Schema) -> &'a str {
        type_name(self.resolve(schema))
    }
}

/// A type's name in messages: the primitive's, or a named type's own name.
pub(crate) fn type_name(schema: &Schema) -> &str {
    match schema {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int => "int",
        Schema::Long => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes => "bytes",
        Schema::String => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        Schema::Record(r) => r.name.name(),
        Schema::Enum(e) => e.name.name(),
        Schema::Fixed(f) => f.name.name(),
        _ => "logical type",
    }
}

/// Whether `key` names a field of `record` (its name: an alias is not a declared property of a JSON record).
pub(crate) fn declares(record: &RecordSchema, key: &str) -> bool {
    record.lookup.get(key).is_some_and(|&i| record.fields[i].name == key)
}

fn is_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Union(_, inner) => is_null(inner),
        _ => false,
    }
}

/// A scalar value as plain JSON.
fn scalar_to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(n) | Value::Date(n) | Value::TimeMillis(n) => Json::from(*n),
        Value::Long(n)
        | Value::TimeMicros(n)
        | Value::TimestampMillis(n)
        | Value::TimestampMicros(n)
        | Value::TimestampNanos(n)
        | Value::LocalTimestampMillis(n)
        | Value::LocalTimestampMicros(n)
        | Value::LocalTimestampNanos(n) => Json::from(*n),
        Value::Float(n) => Json::from(*n),
        Value::Double(n) => Json::from(*n),
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Bytes(b) | Value::Fixed(_, b) => bytes_to_json(b),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::BigDecimal(d) => Json::String(d.to_string()),
        Value::Duration(d) => bytes_to_json(&<[u8; 12]>::from(*d)),
        Value::Decimal(_) | Value::Union(..) | Value::Array(_) | Value::Map(_) | Value::Record(_) => Json::Null,
    }
}

/// Bytes as Avro's JSON encoding: one character U+0000..U+00FF per byte.
pub(crate) fn bytes_to_json(bytes: &[u8]) -> Json {
    Json::String(bytes.iter().map(|&b| char::from(b)).collect())
}

fn json_to_bytes(json: &Json) -> Option<Vec<u8>> {
    json.as_str()?
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

/// Formats an unscaled two's-complement big-endian integer with `scale` decimal places (up to 128 bits).
pub(crate) fn decimal_to_string(unscaled: &[u8], scale: u32) -> Option<String> {
    if unscaled.len() > 16 {
        return None;
    }
    let fill = if unscaled.first().is_some_and(|b| b & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut buf = [fill; 16];
    buf[16 - unscaled.len()..].copy_from_slice(unscaled);
    let n = i128::from_be_bytes(buf);
    let digits = n.unsigned_abs().to_string();
    let scale = scale as usize;
    let digits = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if n < 0 { "-" } else { "" };
    Some(if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

fn read_decimal(decimal: &DecimalSchema, json: &Json, path: &str) -> Result<Decimal, ValueError> {
    let text = match json {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        other => {
            return Err(ValueError::new(
                path,
                format!("expected a decimal string or number, found {}", json_kind(other)),
            ));
        }
    };
    let bad = || {
        ValueError::new(
            path,
            format!("not a decimal with at most {} digits after the point", decimal.scale),
        )
    };
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > decimal.scale
    {
        return Err(bad());
    }
    let digits = format!("{int}{frac}{}", "0".repeat(decimal.scale - frac.len()));
    if digits.trim_start_matches('0').len() > decimal.precision {
        return Err(ValueError::new(
            path,
            format!("decimal has more than {} significant digits", decimal.precision),
        ));
    }
    let magnitude: i128 = digits
        .parse()
        .map_err(|_| ValueError::new(path, "decimal is larger than 128 bits"))?;
    let n = if negative { -magnitude } else { magnitude };
    let bytes = n.to_be_bytes();
    let keep = minimal_twos_complement_len(&bytes);
    let size = match &decimal.inner {
        InnerDecimalSchema::Fixed(fixed) if fixed.size >= keep => fixed.size,
        InnerDecimalSchema::Fixed(_) => {
            return Err(ValueError::new(path, "decimal does not fit the fixed size"));
        }
        InnerDecimalSchema::Bytes => keep,
    };
    let fill = if n < 0 { 0xff } else { 0 };
    let mut out = vec![fill; size.saturating_sub(16)];
    out.extend_from_slice(&bytes[16 - size.min(16)..]);
    Ok(Decimal::from(out))
}

fn minimal_twos_complement_len(bytes: &[u8; 16]) -> usize {
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    16 - start
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// The JSON type of a value, for messages (never the value itself).
/// Why a JSON value fits no branch of a union: the branch's own error when there is one branch.
pub(crate) fn no_branch(path: &str, json: &Json, names: &[&str], first_error: Option<ValueError>) -> ValueError {
    match (names.len(), first_error) {
        (1, Some(e)) => e,
        _ => ValueError::new(
            path,
            format!(
                "{} matches no branch of the union [{}]",
                json_kind(json),
                names.join(", ")
            ),
        ),
    }
}

pub(crate) fn json_kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
                {"name":"id","type":"long"},
                {"name":"email","type":["null","string"],"default":null},
                {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
                {"name":"tags","type":{"type":"array","items":"string"}},
                {"name":"home","type":{"type":"record","name":"A","fields":[{"name":"zip","type":"string"}]}},
                {"name":"work","type":["null","A"]}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn round_trips_plain_json() {
        let schema = schema();
        let codec = JsonCodec::new(&schema);
        let input = json!({"id": 7, "email": "a@b.c", "amount": "-12.30", "tags": ["x"], "home": {"zip": "1"}, "work": {"zip": "2"}});
        let value = codec.to_value(&input).unwrap();
        assert!(value.validate(&schema));
        assert_eq!(codec.to_json(&value), input);
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let schema = schema();
        let codec = JsonCodec::new(&schema);
        let value = codec
            .to_value(&json!({"id": 7, "amount": 1, "tags": [], "home": {"zip": "1"}, "work": null}))
            .unwrap();
        assert_eq!(codec.to_json(&value)["email"], Json::Null);
        assert_eq!(codec.to_json(&value)["amount"], json!("1.00"));
    }

    #[test]
    fn errors_name_the_path_never_the_value() {
        let schema = schema();
        let codec = JsonCodec::new(&schema);
        let err = codec
            .to_value(&json!({"id": "secret-id", "amount": 1, "tags": [], "home": {"zip": "1"}, "work": null}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `id`: expected a long (64-bit integer), found a string"
        );
        let err = codec
            .to_value(&json!({"id": 1, "amount": 1, "tags": [], "home": {"zip": 5}, "work": null}))
            .unwrap_err();
        assert_eq!(err.path(), "home.zip");
        let err = codec
            .to_value(
                &json!({"id": 1, "amount": 1, "tags": [], "home": {"zip": "1", "ada@example.com": "1"}, "work": null}),
            )
            .unwrap_err();
        assert_eq!(err.path(), "home");
        assert_eq!(
            err.to_string(),
            "field `home`: the object's key number 2 is not a field of the record (the schema has no such field)"
        );
        let err = codec
            .to_value(&json!({"id": 1, "amount": "1.234", "tags": [], "home": {"zip": "1"}, "work": null}))
            .unwrap_err();
        assert_eq!(err.path(), "amount");
        assert!(!err.to_string().contains("1.234"));
    }

    #[test]
    fn decimals_render_with_their_scale() {
        assert_eq!(decimal_to_string(&[0x01], 3).unwrap(), "0.001");
        assert_eq!(decimal_to_string(&[0xff], 0).unwrap(), "-1");
        assert_eq!(decimal_to_string(&[0x30, 0x39], 2).unwrap(), "123.45");
    }
}

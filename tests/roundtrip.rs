//! Property tests over generated schemas and records, for both paths (the `Value` reference and the binary
//! transcoder that `run` and `piiwall sanitize` take), over every type piiwall protects: the primitives, enum,
//! fixed, decimal on bytes and on a fixed, uuid on string, bytes and a fixed, the date, time and timestamp types,
//! duration, unions of several branches, arrays, maps (their keys protected too) and records. At every nesting
//! depth, reversible actions reveal the original value with its type (as plain JSON), deterministic ones repeat,
//! encrypt never does, every output validates against the sanitized schema, and no protected string or uuid
//! survives anywhere in the output. The transcoder's output equals the reference's byte for byte except for
//! encrypt's random nonces; every truncation of a record is rejected, and corrupted bytes never panic nor yield
//! output that does not decode. Every combination is checked on both paths: nothing is left out as a known bug.

mod common;

use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::{Schema, Uuid};
use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::crypto::{Dek, KeyId};
use piiwall::policy::{CompiledSchema, DEFAULT_MASK_KEEP_LAST};
use piiwall::sanitize::{RecordKeys, Sanitizer, apply, mask};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use proptest::prelude::*;
use serde_json::{Value as Json, json};
use std::sync::Arc;

/// A generated Avro type. Named types (enum, fixed and the logical types on a fixed) take a unique name when
/// written out by `type_json`.
#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Str,
    Long,
    Int,
    Float,
    Double,
    Bytes,
    Bool,
    /// An enum of the symbols `S0`..`S{n-1}`.
    Enum(usize),
    Fixed(usize),
    /// A decimal on bytes (`fixed: None`) or on a fixed of that size.
    Decimal {
        fixed: Option<usize>,
        precision: u32,
        scale: u32,
    },
    Uuid(UuidOn),
    /// A logical type on int (date, time-millis) or long (the others in `TIMES`), by its name.
    Time(&'static str),
    /// A fixed of 12 bytes: months, days and milliseconds.
    Duration,
    /// Only as a branch of a `Union`.
    Null,
    Nullable(Box<Ty>),
    /// A union of scalars, null among them or not, in an order where plain JSON reads each value back into the
    /// branch it was generated for (see `union`).
    Union(Vec<Ty>),
    Array(Box<Ty>),
    Map(Box<Ty>),
    Record(Vec<Field>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum UuidOn {
    String,
    Bytes,
    Fixed,
}

const TIMES: [&str; 9] = [
    "date",
    "time-millis",
    "time-micros",
    "timestamp-millis",
    "timestamp-micros",
    "timestamp-nanos",
    "local-timestamp-millis",
    "local-timestamp-micros",
    "local-timestamp-nanos",
];

fn time_on_int(name: &str) -> bool {
    matches!(name, "date" | "time-millis")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Tokenize,
    Encrypt,
    Hash,
    Mask,
    Redact,
}

#[derive(Clone, Debug, PartialEq)]
struct Field {
    ty: Ty,
    action: Option<Act>,
    written: Written,
}

/// How a field's type is written in the schema: in full, or (a record the field before it has, used again) as a
/// reference: its name, or a type object naming it (`{"type": "R3"}`, which Avro reads as the same reference).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Written {
    InFull,
    ByName,
    ByTypeObject,
}

fn scalar() -> BoxedStrategy<Ty> {
    prop_oneof![
        prop_oneof![
            Just(Ty::Str),
            Just(Ty::Long),
            Just(Ty::Int),
            Just(Ty::Float),
            Just(Ty::Double),
            Just(Ty::Bytes),
            Just(Ty::Bool),
        ],
        prop_oneof![
            (1..5usize).prop_map(Ty::Enum),
            prop_oneof![0..7usize, Just(16)].prop_map(Ty::Fixed),
            decimal(),
            prop_oneof![Just(UuidOn::String), Just(UuidOn::Bytes), Just(UuidOn::Fixed)].prop_map(Ty::Uuid),
            prop::sample::select(TIMES.as_slice()).prop_map(Ty::Time),
            Just(Ty::Duration),
        ],
    ]
    .boxed()
}

/// A decimal on bytes or on a fixed of 1 to 16 bytes, with a precision that fits and a scale up to it.
fn decimal() -> impl Strategy<Value = Ty> {
    prop::option::of(1..=16usize)
        .prop_flat_map(|fixed| (Just(fixed), 1..=fixed.map_or(38, max_precision)))
        .prop_flat_map(|(fixed, precision)| (Just(fixed), Just(precision), 0..=precision.min(6)))
        .prop_map(|(fixed, precision, scale)| Ty::Decimal {
            fixed,
            precision,
            scale,
        })
}

/// The digits any signed integer of `size` bytes holds (Avro's limit on a decimal's precision on a fixed).
fn max_precision(size: usize) -> u32 {
    ((8 * size - 1) as f64 * 2f64.log10()).floor() as u32
}

/// A union of two or more branches. Their order makes plain JSON (the first branch that accepts a value wins) read
/// each value into the branch it came from: a generated string is no enum symbol, and an integer reaches long before
/// double (a generated double is never an integer in JSON).
fn union() -> impl Strategy<Value = Ty> {
    let branches = vec![Ty::Enum(3), Ty::Str, Ty::Long, Ty::Double, Ty::Bool];
    (prop::sample::subsequence(branches, 1..=4), prop::option::of(0..5usize)).prop_filter_map(
        "a union of one branch",
        |(mut branches, null)| {
            if let Some(at) = null {
                branches.insert(at.min(branches.len()), Ty::Null);
            }
            (branches.len() >= 2).then_some(Ty::Union(branches))
        },
    )
}

/// Whether the compiler lets mask apply: to strings and uuids, in nullables, unions, arrays and maps.
fn maskable(ty: &Ty) -> bool {
    match ty {
        Ty::Str | Ty::Uuid(_) => true,
        Ty::Nullable(t) | Ty::Array(t) | Ty::Map(t) => maskable(t),
        Ty::Union(branches) => branches.iter().all(|b| *b == Ty::Null || maskable(b)),
        _ => false,
    }
}

/// A protected field: a scalar or a union, possibly nullable, possibly in an array or map.
fn protected_field() -> impl Strategy<Value = Field> {
    (prop_oneof![4 => scalar(), 1 => union()], 0..4u8)
        .prop_map(|(s, wrap)| match wrap {
            // A union cannot hold a union.
            1 if matches!(s, Ty::Union(_)) => s,
            0 => s,
            1 => Ty::Nullable(Box::new(s)),
            2 => Ty::Array(Box::new(s)),
            _ => Ty::Map(Box::new(s)),
        })
        .prop_flat_map(|ty| {
            let mut actions = vec![
                None,
                Some(Act::Tokenize),
                Some(Act::Encrypt),
                Some(Act::Hash),
                Some(Act::Redact),
            ];
            if maskable(&ty) {
                actions.push(Some(Act::Mask));
            }
            (Just(ty), prop::sample::select(actions)).prop_map(|(ty, action)| Field {
                ty,
                action,
                written: Written::InFull,
            })
        })
}

fn fields(depth: u32) -> BoxedStrategy<Vec<Field>> {
    let field = if depth == 0 {
        protected_field().boxed()
    } else {
        prop_oneof![
            3 => protected_field(),
            1 => (fields(depth - 1), 0..4u8).prop_map(|(inner, wrap)| {
                let record = Ty::Record(inner);
                let ty = match wrap {
                    0 => record,
                    1 => Ty::Nullable(Box::new(record)),
                    2 => Ty::Array(Box::new(record)),
                    _ => Ty::Map(Box::new(record)),
                };
                Field {
                    ty,
                    action: None,
                    written: Written::InFull,
                }
            }),
        ]
        .boxed()
    };
    (prop::collection::vec(field, 1..5), 0..3u8)
        .prop_map(|(mut fields, again)| {
            // The first record of these fields used again right after it, by reference: the compiler must protect
            // what it holds at both places, as Avro reads both.
            let first_record = fields.iter().position(|f| matches!(f.ty, Ty::Record(_)));
            if let (Some(at), 1..) = (first_record, again) {
                let mut reused = fields[at].clone();
                reused.written = if again == 1 {
                    Written::ByName
                } else {
                    Written::ByTypeObject
                };
                fields.insert(at + 1, reused);
            }
            fields
        })
        .boxed()
}

fn fresh_name(prefix: &str, names: &mut usize) -> String {
    *names += 1;
    format!("{prefix}{names}")
}

fn type_json(ty: &Ty, names: &mut usize) -> Json {
    match ty {
        Ty::Str => json!("string"),
        Ty::Long => json!("long"),
        Ty::Int => json!("int"),
        Ty::Float => json!("float"),
        Ty::Double => json!("double"),
        Ty::Bytes => json!("bytes"),
        Ty::Bool => json!("boolean"),
        Ty::Null => json!("null"),
        Ty::Enum(n) => {
            let symbols: Vec<String> = (0..*n).map(|i| format!("S{i}")).collect();
            json!({"type": "enum", "name": fresh_name("E", names), "symbols": symbols})
        }
        Ty::Fixed(size) => json!({"type": "fixed", "name": fresh_name("F", names), "size": size}),
        Ty::Decimal {
            fixed,
            precision,
            scale,
        } => {
            let mut t = match fixed {
                None => json!({"type": "bytes"}),
                Some(size) => json!({"type": "fixed", "name": fresh_name("D", names), "size": size}),
            };
            t["logicalType"] = json!("decimal");
            t["precision"] = json!(precision);
            // A scale of 0 is left to its default.
            if *scale > 0 {
                t["scale"] = json!(scale);
            }
            t
        }
        Ty::Uuid(UuidOn::String) => json!({"type": "string", "logicalType": "uuid"}),
        Ty::Uuid(UuidOn::Bytes) => json!({"type": "bytes", "logicalType": "uuid"}),
        Ty::Uuid(UuidOn::Fixed) => {
            json!({"type": "fixed", "name": fresh_name("U", names), "size": 16, "logicalType": "uuid"})
        }
        Ty::Time(name) => {
            json!({"type": if time_on_int(name) { "int" } else { "long" }, "logicalType": name})
        }
        Ty::Duration => {
            json!({"type": "fixed", "name": fresh_name("T", names), "size": 12, "logicalType": "duration"})
        }
        Ty::Nullable(t) => json!(["null", type_json(t, names)]),
        Ty::Union(branches) => Json::Array(branches.iter().map(|b| type_json(b, names)).collect()),
        Ty::Array(t) => json!({"type": "array", "items": type_json(t, names)}),
        Ty::Map(t) => json!({"type": "map", "values": type_json(t, names)}),
        Ty::Record(fields) => record_json(fields, names, None),
    }
}

fn record_json(fields: &[Field], names: &mut usize, subject: Option<bool>) -> Json {
    let name = fresh_name("R", names);
    let mut out: Vec<Json> = Vec::new();
    if let Some(nullable) = subject {
        let ty = if nullable {
            json!(["null", "string"])
        } else {
            json!("string")
        };
        out.push(json!({"name": "sid", "type": ty, "pii": "subject"}));
    }
    for (i, field) in fields.iter().enumerate() {
        let ty = match field.written {
            Written::InFull => type_json(&field.ty, names),
            reference => {
                let name = out.last().expect("a reused record follows its definition")["type"]["name"].clone();
                if reference == Written::ByName {
                    name
                } else {
                    json!({ "type": name })
                }
            }
        };
        let mut f = json!({"name": format!("f{i}"), "type": ty});
        if let Some(action) = field.action {
            let name = match action {
                Act::Tokenize => "tokenize",
                Act::Encrypt => "encrypt",
                Act::Hash => "hash",
                Act::Mask => "mask",
                Act::Redact => "redact",
            };
            f["pii"] = json!(name);
        }
        out.push(f);
    }
    json!({"type": "record", "name": name, "fields": out})
}

/// Bytes as plain JSON: one character U+0000..U+00FF per byte.
fn byte_chars(bytes: &[u8]) -> Json {
    Json::String(bytes.iter().map(|&b| char::from(b)).collect())
}

/// A decimal as plain JSON writes it: its unscaled value with `scale` digits after the point.
fn decimal_text(unscaled: i128, scale: u32) -> String {
    let scale = scale as usize;
    let digits = format!("{:0>width$}", unscaled.unsigned_abs(), width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

fn finite_f32() -> impl Strategy<Value = f32> {
    use prop::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn finite_f64() -> impl Strategy<Value = f64> {
    use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn value(ty: &Ty) -> BoxedStrategy<Json> {
    match ty {
        Ty::Str => "~[a-z0-9]{4,10}~".prop_map(Json::from).boxed(),
        Ty::Long => any::<i64>().prop_map(Json::from).boxed(),
        Ty::Int => any::<i32>().prop_map(Json::from).boxed(),
        // A float is read from JSON as f64 and narrowed: generated as an f32, it comes back exactly.
        Ty::Float => finite_f32().prop_map(|f| Json::from(f64::from(f))).boxed(),
        Ty::Double => finite_f64().prop_map(Json::from).boxed(),
        Ty::Bytes => prop::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| byte_chars(&b))
            .boxed(),
        Ty::Bool => any::<bool>().prop_map(Json::from).boxed(),
        Ty::Null => Just(Json::Null).boxed(),
        Ty::Enum(n) => (0..*n).prop_map(|i| json!(format!("S{i}"))).boxed(),
        Ty::Fixed(size) => prop::collection::vec(any::<u8>(), *size)
            .prop_map(|b| byte_chars(&b))
            .boxed(),
        Ty::Duration => prop::collection::vec(any::<u8>(), 12)
            .prop_map(|b| byte_chars(&b))
            .boxed(),
        Ty::Decimal { precision, scale, .. } => {
            let (max, scale) = (10i128.pow(*precision) - 1, *scale);
            prop_oneof![-100i128..=100, -max..=max]
                .prop_map(move |n| Json::String(decimal_text(n.clamp(-max, max), scale)))
                .boxed()
        }
        Ty::Uuid(_) => any::<u128>()
            .prop_map(|n| Json::String(Uuid::from_u128(n).to_string()))
            .boxed(),
        Ty::Time(name) if time_on_int(name) => any::<i32>().prop_map(Json::from).boxed(),
        Ty::Time(_) => any::<i64>().prop_map(Json::from).boxed(),
        Ty::Nullable(t) => prop::option::of(value(t)).prop_map(|v| v.unwrap_or(Json::Null)).boxed(),
        Ty::Union(branches) => proptest::strategy::Union::new(branches.iter().map(value)).boxed(),
        Ty::Array(t) => prop::collection::vec(value(t), 0..3).prop_map(Json::Array).boxed(),
        // Keys are marked like protected strings, and long enough that two maps do not share one by chance.
        Ty::Map(t) => prop::collection::btree_map("~[a-z]{6,8}~", value(t), 0..3)
            .prop_map(|m| Json::Object(m.into_iter().collect()))
            .boxed(),
        Ty::Record(fields) => record_value(fields),
    }
}

fn record_value(fields: &[Field]) -> BoxedStrategy<Json> {
    let values: Vec<BoxedStrategy<Json>> = fields.iter().map(|f| value(&f.ty)).collect();
    values
        .prop_map(|vs| Json::Object(vs.into_iter().enumerate().map(|(i, v)| (format!("f{i}"), v)).collect()))
        .boxed()
}

/// A generated case: fields, whether the root has a subject (and whether it is nullable), and a record.
fn case() -> impl Strategy<Value = (Vec<Field>, Option<bool>, Json)> {
    let fields = fields(3);
    (fields, prop::option::of(any::<bool>())).prop_flat_map(|(fields, subject)| {
        let record = record_value(&fields);
        let sid = match subject {
            Some(true) => prop::option::of("sub-[a-z]{3}")
                .prop_map(|s| s.map_or(Json::Null, Json::from))
                .boxed(),
            _ => "sub-[a-z]{3}".prop_map(Json::from).boxed(),
        };
        (Just(fields), Just(subject), record, sid).prop_map(|(fields, subject, mut record, sid)| {
            if subject.is_some() {
                record.as_object_mut().unwrap().insert("sid".into(), sid);
            }
            (fields, subject, record)
        })
    })
}

static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());
static SANITIZER: LazyLock<Sanitizer> = LazyLock::new(|| common::sanitizer_at(DIR.path()));

/// A generated schema: compiled, and in the form its plain-JSON records are read with. That form differs only
/// for durations: the JSON codec takes none as input (`JsonCodec::read` refuses them), so records are read with
/// each duration as the plain 12-byte fixed it is on the wire, and the reference path decodes their bytes with the
/// writer schema.
struct Generated {
    compiled: CompiledSchema,
    json_input: Schema,
}

fn generate(fields: &[Field], subject: Option<bool>) -> Option<Generated> {
    let mut names = 0;
    let mut schema_json = record_json(fields, &mut names, subject);
    if subject.is_none() && !schema_json.to_string().contains("\"pii\"") {
        return None;
    }
    let compiled = common::compiled(&schema_json.to_string());
    without_durations(&mut schema_json);
    let json_input = Schema::parse(&schema_json).expect("the JSON input schema parses");
    Some(Generated { compiled, json_input })
}

fn without_durations(json: &mut Json) {
    match json {
        Json::Object(object) => {
            if object.get("logicalType") == Some(&json!("duration")) {
                object.shift_remove("logicalType");
            }
            object.values_mut().for_each(without_durations);
        }
        Json::Array(items) => items.iter_mut().for_each(without_durations),
        _ => {}
    }
}

/// A plain-JSON record as Avro binary of the writer schema.
fn encode_writer(schema: &Generated, record: &Json) -> Vec<u8> {
    let value = JsonCodec::new(&schema.json_input)
        .to_value(record)
        .expect("generated record fits its schema");
    common::encode(&schema.json_input, &value)
}

fn decode_sanitized(schema: &CompiledSchema, bytes: &[u8]) -> Json {
    let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
    let value = reader
        .read_value(&mut &bytes[..])
        .expect("output decodes with the sanitized schema");
    JsonCodec::new(&schema.sanitized).to_json(&value)
}

/// The binary path (what `run` and `piiwall sanitize` take): Avro bytes through the transcoder, decoded back to
/// JSON for checking.
fn sanitize_binary(schema: &Generated, transcoder: &Transcoder, record: &Json) -> Json {
    let mut out = Vec::new();
    SANITIZER
        .sanitize_binary(
            &schema.compiled,
            transcoder,
            &encode_writer(schema, record),
            &mut TranscodeScratch::default(),
            &mut out,
        )
        .expect("transcode");
    decode_sanitized(&schema.compiled, &out)
}

/// Replaces each ciphertext by its prefix and key id, the part that does not depend on the random nonce.
fn without_nonces(json: &Json) -> Json {
    match json {
        Json::String(s) if s.starts_with("pwe2.") => Json::String(format!("{}..{}", &s[..21], s.len())),
        Json::Array(items) => Json::Array(items.iter().map(without_nonces).collect()),
        Json::Object(map) => Json::Object(map.iter().map(|(k, v)| (k.clone(), without_nonces(v))).collect()),
        other => other.clone(),
    }
}

/// Whether a type or one inside it satisfies `pred`.
fn contains(ty: &Ty, pred: &dyn Fn(&Ty) -> bool) -> bool {
    pred(ty)
        || match ty {
            Ty::Nullable(t) | Ty::Array(t) | Ty::Map(t) => contains(t, pred),
            Ty::Union(branches) => branches.iter().any(|b| contains(b, pred)),
            Ty::Record(fields) => fields.iter().any(|f| contains(&f.ty, pred)),
            _ => false,
        }
}

fn any_field(fields: &[Field], pred: &dyn Fn(&Ty) -> bool) -> bool {
    fields.iter().any(|f| contains(&f.ty, pred))
}

fn fixed_keys(forgotten: bool) -> RecordKeys {
    let dek = Arc::new(Dek::new(KeyId([1; 12]), 1, &[1; 32]));
    RecordKeys {
        record: (!forgotten).then(|| dek.clone()),
        domain: Some(dek),
        forgotten,
    }
}

/// The reference path's input: the record decoded from its bytes. Where the JSON codec takes every type the record
/// holds, reading its plain JSON must give the same value.
fn writer_value(schema: &Generated, fields: &[Field], record: &Json) -> Value {
    let decoded = ValueCodec::for_writer(&schema.compiled)
        .decode(&encode_writer(schema, record))
        .expect("the record decodes");
    if !any_field(fields, &|t| *t == Ty::Duration) {
        let read = JsonCodec::new(&schema.compiled.writer)
            .to_value(record)
            .expect("generated record fits its schema");
        assert_eq!(read, decoded, "plain JSON reads as Avro binary decodes");
    }
    decoded
}

/// The reference path: a `Value` sanitized in place.
fn sanitize(schema: &Generated, fields: &[Field], record: &Json) -> Json {
    let mut value = writer_value(schema, fields, record);
    SANITIZER.sanitize(&schema.compiled, &mut value).expect("sanitize");
    assert!(
        value.validate(&schema.compiled.sanitized),
        "output does not validate against the sanitized schema"
    );
    JsonCodec::new(&schema.compiled.sanitized).to_json(&value)
}

/// What redact leaves, as plain JSON: null where the type allows it, else the type's empty value.
fn redacted(ty: &Ty) -> Json {
    match ty {
        Ty::Null | Ty::Nullable(_) => Json::Null,
        Ty::Union(branches) if branches.contains(&Ty::Null) => Json::Null,
        Ty::Union(branches) => redacted(&branches[0]),
        Ty::Array(_) => json!([]),
        Ty::Map(_) => json!({}),
        Ty::Str | Ty::Bytes => json!(""),
        Ty::Long | Ty::Int | Ty::Time(_) => json!(0),
        Ty::Float | Ty::Double => json!(0.0),
        Ty::Bool => json!(false),
        Ty::Enum(_) => json!("S0"),
        Ty::Fixed(size) => byte_chars(&vec![0; *size]),
        Ty::Duration => byte_chars(&[0; 12]),
        Ty::Decimal { scale, .. } => Json::String(decimal_text(0, *scale)),
        Ty::Uuid(_) => Json::String(Uuid::nil().to_string()),
        Ty::Record(_) => unreachable!("redact is generated on scalars, unions and collections of them"),
    }
}

/// Generated values that no output holds by chance: marked strings (map keys among them; a bytes value may start
/// with `~` too, so both ends count) and uuids, but the nil uuid that redaction writes.
fn distinctive(s: &str) -> bool {
    (s.len() >= 6 && s.starts_with('~') && s.ends_with('~'))
        || (s.len() == 36 && Uuid::parse_str(s).is_ok_and(|u| !u.is_nil()))
}

struct Checker {
    protected_strings: Vec<String>,
}

impl Checker {
    fn record(&mut self, fields: &[Field], path: &str, original: &Json, out: &Json, again: &Json) {
        for (i, field) in fields.iter().enumerate() {
            let name = format!("f{i}");
            let path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            let (o, s, a) = (&original[&name], &out[&name], &again[&name]);
            match field.action {
                Some(action) => self.protected(&field.ty, action, &path, o, s, a),
                None => self.nested(&field.ty, &path, o, s, a),
            }
        }
    }

    fn nested(&mut self, ty: &Ty, path: &str, o: &Json, s: &Json, a: &Json) {
        match ty {
            Ty::Record(fields) => self.record(fields, path, o, s, a),
            Ty::Nullable(t) if !o.is_null() => self.nested(t, path, o, s, a),
            Ty::Array(t) => {
                for i in 0..o.as_array().unwrap().len() {
                    self.nested(t, path, &o[i], &s[i], &a[i]);
                }
            }
            Ty::Map(t) => {
                for k in o.as_object().unwrap().keys() {
                    self.nested(t, path, &o[k], &s[k], &a[k]);
                }
            }
            _ => assert_eq!(o, s, "an unprotected value at {path} changed"),
        }
    }

    fn protected(&mut self, ty: &Ty, action: Act, path: &str, o: &Json, s: &Json, a: &Json) {
        if action == Act::Redact {
            assert_eq!(s, &redacted(ty), "redacted {path}");
            self.note(o);
            return;
        }
        match ty {
            Ty::Nullable(_) | Ty::Union(_) if o.is_null() => {
                assert!(s.is_null(), "null stays null at {path}");
            }
            Ty::Nullable(t) => self.protected(t, action, path, o, s, a),
            Ty::Array(t) => {
                assert_eq!(o.as_array().unwrap().len(), s.as_array().unwrap().len());
                for i in 0..o.as_array().unwrap().len() {
                    self.protected(t, action, path, &o[i], &s[i], &a[i]);
                }
            }
            Ty::Map(t) => {
                // Keys are protected too: tokenized (reversible) under tokenize and encrypt, hashed otherwise.
                let key_context = format!("{path}#key");
                let (s_map, a_map) = (s.as_object().unwrap(), a.as_object().unwrap());
                assert_eq!(
                    s_map.len(),
                    o.as_object().unwrap().len(),
                    "keys stay distinct at {path}"
                );
                for k in o.as_object().unwrap().keys() {
                    let protected_key = match action {
                        Act::Tokenize | Act::Encrypt => s_map
                            .keys()
                            .find(|t| SANITIZER.reveal(&key_context, t).ok().as_ref() == Some(&json!(k)))
                            .unwrap_or_else(|| panic!("{path}: no key token reveals to the original key"))
                            .clone(),
                        _ => {
                            let domain = SANITIZER.keyring().domain_key("default").unwrap();
                            domain.hash(&key_context, &[&[0u8][..], k.as_bytes()].concat())
                        }
                    };
                    assert!(
                        a_map.contains_key(&protected_key),
                        "map keys are deterministic at {path}"
                    );
                    self.note(&json!(k));
                    self.protected(t, action, path, &o[k], &s_map[&protected_key], &a_map[&protected_key]);
                }
            }
            // A scalar, or the value of a union's scalar branch.
            _ => self.leaf(action, path, o, s, a),
        }
    }

    /// Checks one protected scalar; `reveal` must give back the original as plain JSON, type and all (a long stays
    /// a number, a decimal keeps its scale, a uuid is its text, an enum its symbol, bytes and fixed their
    /// characters U+0000..U+00FF).
    fn leaf(&mut self, action: Act, path: &str, o: &Json, s: &Json, a: &Json) {
        let token = s
            .as_str()
            .unwrap_or_else(|| panic!("{path}: a protected value is text"));
        match action {
            Act::Tokenize => {
                assert!(token.starts_with("pwt1."), "{path}");
                assert_eq!(s, a, "tokenize is deterministic at {path}");
                assert_eq!(
                    &SANITIZER.reveal(path, token).unwrap(),
                    o,
                    "reveal(tokenize(x)) == x at {path}"
                );
            }
            Act::Encrypt => {
                assert!(token.starts_with("pwe2."), "{path}");
                assert_ne!(s, a, "encrypt never repeats at {path}");
                assert_eq!(
                    &SANITIZER.reveal(path, token).unwrap(),
                    o,
                    "reveal(encrypt(x)) == x at {path}"
                );
            }
            Act::Hash => {
                assert!(token.starts_with("pwh1."), "{path}");
                assert_eq!(s, a, "hash is deterministic at {path}");
            }
            Act::Mask => {
                // Strings and uuids (as their text).
                let original = o.as_str().unwrap();
                assert_eq!(token, mask(original, DEFAULT_MASK_KEEP_LAST), "masked {path}");
            }
            Act::Redact => unreachable!(),
        }
        self.note(o);
    }

    fn note(&mut self, o: &Json) {
        match o {
            Json::String(s) if distinctive(s) => self.protected_strings.push(s.clone()),
            Json::Array(items) => items.iter().for_each(|i| self.note(i)),
            Json::Object(map) => map.values().for_each(|v| self.note(v)),
            _ => {}
        }
    }
}

proptest! {
    #[test]
    fn sanitize_reveal_round_trip((fields, subject, record) in case()) {
        let generated = generate(&fields, subject);
        prop_assume!(generated.is_some());
        let schema = generated.unwrap();
        let transcoder = Transcoder::new(&schema.compiled).expect("every compiled schema transcodes");
        let binary = (sanitize_binary(&schema, &transcoder, &record), sanitize_binary(&schema, &transcoder, &record));
        let reference = (sanitize(&schema, &fields, &record), sanitize(&schema, &fields, &record));
        prop_assert_eq!(without_nonces(&reference.0), without_nonces(&binary.0), "the paths agree");
        for (out, again) in [&binary, &reference] {
            let mut checker = Checker { protected_strings: Vec::new() };
            checker.record(&fields, "", &record, out, again);
            if let Some(sid) = record.get("sid").and_then(Json::as_str) {
                prop_assert_eq!(SANITIZER.reveal("sid", out["sid"].as_str().unwrap()).unwrap(), Json::from(sid));
            }
            let text = out.to_string();
            for pii in &checker.protected_strings {
                prop_assert!(!text.contains(pii.as_str()), "a protected value occurs in the output");
            }
        }
    }

    #[test]
    fn transcoder_matches_the_reference_byte_for_byte((fields, subject, record) in case(), forgotten in any::<bool>()) {
        let generated = generate(&fields, subject);
        prop_assume!(generated.is_some());
        let generated = generated.unwrap();
        let schema = &generated.compiled;
        let has_encrypt = schema.plan.rules.iter().any(|r| r.action == piiwall::policy::Action::Encrypt);
        let keys = fixed_keys(forgotten);
        let bytes = encode_writer(&generated, &record);

        let transcoder = Transcoder::new(schema).unwrap();
        let mut scratch = TranscodeScratch::default();
        let mut transcoded = Vec::new();
        transcoder.transcode(schema, &bytes, &keys, &mut scratch, &mut transcoded).unwrap();
        let decoded = without_nonces(&decode_sanitized(schema, &transcoded));

        let codec = ValueCodec::new(schema);
        let mut value = codec.decode(&bytes).unwrap();
        apply(&schema.plan, &mut value, &keys).unwrap();
        let mut reference = Vec::new();
        codec.encode(&value, &mut reference).unwrap();
        // The reference re-encodes maps in HashMap order, the transcoder keeps the producer's: bytes are
        // comparable only without maps; decoded values always.
        if (forgotten || !has_encrypt) && !any_field(&fields, &|t| matches!(t, Ty::Map(_))) {
            prop_assert_eq!(&reference, &transcoded);
        }
        prop_assert_eq!(without_nonces(&decode_sanitized(schema, &reference)), decoded);

        // Every strict prefix of a record is malformed, and is rejected without touching the output.
        for cut in 0..bytes.len() {
            let mut out = vec![7u8];
            prop_assert!(transcoder.transcode(schema, &bytes[..cut], &keys, &mut scratch, &mut out).is_err(), "prefix of {} bytes accepted", cut);
            prop_assert_eq!(&out, &vec![7u8]);
        }
        // Corrupted bytes: an error, or output that still decodes with the sanitized schema; never a panic.
        for (i, flip) in (0..bytes.len()).zip([0x01u8, 0x80, 0xff, 0x7f].iter().cycle()) {
            let mut corrupted = bytes.clone();
            corrupted[i] ^= flip;
            let mut out = Vec::new();
            if transcoder.transcode(schema, &corrupted, &keys, &mut scratch, &mut out).is_ok() {
                let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
                let mut rest = &out[..];
                prop_assert!(reader.read_value(&mut rest).is_ok() && rest.is_empty(), "corrupted input gave undecodable output");
            }
        }
    }
}

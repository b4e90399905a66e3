//! Property tests over generated schemas and records, for both paths (the `Value` reference and the binary
//! transcoder): at every nesting depth, reversible actions reveal the original value, deterministic ones repeat,
//! encrypt never does, every output validates against the sanitized schema, and no protected string survives
//! anywhere in the output. The transcoder's output equals the reference's byte for byte except for encrypt's
//! random nonces; every truncation of a record is rejected, and corrupted bytes never panic nor yield output that
//! does not decode.

mod common;

use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::crypto::{Dek, KeyId};
use piiwall::policy::CompiledSchema;
use piiwall::sanitize::{RecordKeys, Sanitizer, apply};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use proptest::prelude::*;
use serde_json::{Value as Json, json};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq)]
enum Ty {
    Str,
    Long,
    Int,
    Double,
    Bytes,
    Bool,
    Nullable(Box<Ty>),
    Array(Box<Ty>),
    Map(Box<Ty>),
    Record(Vec<Field>),
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
}

fn scalar() -> impl Strategy<Value = Ty> {
    prop_oneof![
        Just(Ty::Str),
        Just(Ty::Long),
        Just(Ty::Int),
        Just(Ty::Double),
        Just(Ty::Bytes),
        Just(Ty::Bool)
    ]
}

/// A protected field: a scalar, possibly nullable, possibly in an array or map.
fn protected_field() -> impl Strategy<Value = Field> {
    (scalar(), 0..4u8)
        .prop_map(|(s, wrap)| match wrap {
            0 => s,
            1 => Ty::Nullable(Box::new(s)),
            2 => Ty::Array(Box::new(s)),
            _ => Ty::Map(Box::new(s)),
        })
        .prop_flat_map(|ty| {
            let is_string = matches!(base(&ty), Ty::Str);
            let actions = if is_string {
                prop_oneof![
                    Just(None),
                    Just(Some(Act::Tokenize)),
                    Just(Some(Act::Encrypt)),
                    Just(Some(Act::Hash)),
                    Just(Some(Act::Mask)),
                    Just(Some(Act::Redact))
                ]
                .boxed()
            } else {
                prop_oneof![
                    Just(None),
                    Just(Some(Act::Tokenize)),
                    Just(Some(Act::Encrypt)),
                    Just(Some(Act::Hash)),
                    Just(Some(Act::Redact))
                ]
                .boxed()
            };
            (Just(ty), actions).prop_map(|(ty, action)| Field { ty, action })
        })
}

fn base(ty: &Ty) -> &Ty {
    match ty {
        Ty::Nullable(t) | Ty::Array(t) | Ty::Map(t) => base(t),
        t => t,
    }
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
                Field { ty, action: None }
            }),
        ]
        .boxed()
    };
    prop::collection::vec(field, 1..5).boxed()
}

fn type_json(ty: &Ty, names: &mut usize) -> Json {
    match ty {
        Ty::Str => json!("string"),
        Ty::Long => json!("long"),
        Ty::Int => json!("int"),
        Ty::Double => json!("double"),
        Ty::Bytes => json!("bytes"),
        Ty::Bool => json!("boolean"),
        Ty::Nullable(t) => json!(["null", type_json(t, names)]),
        Ty::Array(t) => json!({"type": "array", "items": type_json(t, names)}),
        Ty::Map(t) => json!({"type": "map", "values": type_json(t, names)}),
        Ty::Record(fields) => record_json(fields, names, None),
    }
}

fn record_json(fields: &[Field], names: &mut usize, subject: Option<bool>) -> Json {
    *names += 1;
    let name = format!("R{names}");
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
        let mut f = json!({"name": format!("f{i}"), "type": type_json(&field.ty, names)});
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

fn value(ty: &Ty) -> BoxedStrategy<Json> {
    match ty {
        Ty::Str => "~[a-z0-9]{4,10}~".prop_map(Json::from).boxed(),
        Ty::Long => any::<i64>().prop_map(Json::from).boxed(),
        Ty::Int => any::<i32>().prop_map(Json::from).boxed(),
        Ty::Double => (-1e12f64..1e12).prop_map(Json::from).boxed(),
        Ty::Bytes => prop::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| Json::String(b.iter().map(|&c| char::from(c)).collect()))
            .boxed(),
        Ty::Bool => any::<bool>().prop_map(Json::from).boxed(),
        Ty::Nullable(t) => prop::option::of(value(t)).prop_map(|v| v.unwrap_or(Json::Null)).boxed(),
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
    (fields(3), prop::option::of(any::<bool>())).prop_flat_map(|(fields, subject)| {
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

fn encode_writer(schema: &CompiledSchema, record: &Json) -> Vec<u8> {
    let value = JsonCodec::new(&schema.writer)
        .to_value(record)
        .expect("generated record fits its schema");
    let mut bytes = Vec::new();
    GenericDatumWriter::builder(&schema.writer)
        .build()
        .unwrap()
        .write_value_ref(&mut bytes, &value)
        .unwrap();
    bytes
}

fn decode_sanitized(schema: &CompiledSchema, bytes: &[u8]) -> Json {
    let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
    let value = reader
        .read_value(&mut &bytes[..])
        .expect("output decodes with the sanitized schema");
    JsonCodec::new(&schema.sanitized).to_json(&value)
}

/// The binary path: Avro bytes through the transcoder, decoded back to JSON for checking.
fn sanitize_binary(schema: &CompiledSchema, transcoder: &Transcoder, record: &Json) -> Json {
    let mut out = Vec::new();
    SANITIZER
        .sanitize_binary(
            schema,
            transcoder,
            &encode_writer(schema, record),
            &mut TranscodeScratch::default(),
            &mut out,
        )
        .expect("transcode");
    decode_sanitized(schema, &out)
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

fn has_map(ty: &Ty) -> bool {
    match ty {
        Ty::Map(_) => true,
        Ty::Nullable(t) | Ty::Array(t) => has_map(t),
        Ty::Record(fields) => fields.iter().any(|f| has_map(&f.ty)),
        _ => false,
    }
}

fn fixed_keys(forgotten: bool) -> RecordKeys {
    let dek = Arc::new(Dek::new(KeyId([1; 12]), 1, &[1; 32]));
    RecordKeys {
        record: (!forgotten).then(|| dek.clone()),
        domain: Some(dek),
        forgotten,
    }
}

fn sanitize(schema: &CompiledSchema, record: &Json) -> Json {
    let mut value = JsonCodec::new(&schema.writer)
        .to_value(record)
        .expect("generated record fits its schema");
    SANITIZER.sanitize(schema, &mut value).expect("sanitize");
    assert!(
        value.validate(&schema.sanitized),
        "output does not validate against the sanitized schema"
    );
    JsonCodec::new(&schema.sanitized).to_json(&value)
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
            let expected = match ty {
                Ty::Nullable(_) => Json::Null,
                Ty::Array(_) => json!([]),
                Ty::Map(_) => json!({}),
                Ty::Str | Ty::Bytes => json!(""),
                Ty::Long | Ty::Int => json!(0),
                Ty::Double => json!(0.0),
                Ty::Bool => json!(false),
                Ty::Record(_) => unreachable!(),
            };
            assert_eq!(s, &expected, "redacted {path}");
            self.note(o);
            return;
        }
        match ty {
            Ty::Nullable(t) if o.is_null() => {
                assert!(s.is_null(), "null stays null at {path}");
                let _ = t;
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
            _ => self.leaf(action, path, o, s, a),
        }
    }

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
                let original = o.as_str().unwrap();
                assert_eq!(token.chars().count(), original.chars().count());
                assert!(token.starts_with('*'));
            }
            Act::Redact => unreachable!(),
        }
        self.note(o);
    }

    fn note(&mut self, o: &Json) {
        match o {
            Json::String(s) if s.starts_with('~') => self.protected_strings.push(s.clone()),
            Json::Array(items) => items.iter().for_each(|i| self.note(i)),
            Json::Object(map) => map.values().for_each(|v| self.note(v)),
            _ => {}
        }
    }
}

proptest! {
    #[test]
    fn sanitize_reveal_round_trip((fields, subject, record) in case()) {
        let mut names = 0;
        let schema_json = record_json(&fields, &mut names, subject);
        prop_assume!(subject.is_some() || schema_json.to_string().contains("\"pii\""));
        let schema = common::compiled(&schema_json.to_string());
        let transcoder = Transcoder::new(&schema).expect("every compiled schema transcodes");
        let reference = (sanitize(&schema, &record), sanitize(&schema, &record));
        let binary = (sanitize_binary(&schema, &transcoder, &record), sanitize_binary(&schema, &transcoder, &record));
        prop_assert_eq!(without_nonces(&reference.0), without_nonces(&binary.0), "the paths agree");
        for (out, again) in [&reference, &binary] {
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
        let mut names = 0;
        let schema_json = record_json(&fields, &mut names, subject);
        prop_assume!(subject.is_some() || schema_json.to_string().contains("\"pii\""));
        let schema = common::compiled(&schema_json.to_string());
        let has_encrypt = schema.plan.rules.iter().any(|r| r.action == piiwall::policy::Action::Encrypt);
        let keys = fixed_keys(forgotten);
        let bytes = encode_writer(&schema, &record);

        let codec = ValueCodec::new(&schema);
        let mut value = codec.decode(&bytes).unwrap();
        apply(&schema.plan, &mut value, &keys).unwrap();
        let mut reference = Vec::new();
        codec.encode(&value, &mut reference).unwrap();

        let transcoder = Transcoder::new(&schema).unwrap();
        let mut scratch = TranscodeScratch::default();
        let mut transcoded = Vec::new();
        transcoder.transcode(&schema, &bytes, &keys, &mut scratch, &mut transcoded).unwrap();
        // The reference re-encodes maps in HashMap order, the transcoder keeps the producer's: bytes are comparable
        // only without maps; decoded values always.
        if (forgotten || !has_encrypt) && !fields.iter().any(|f| has_map(&f.ty)) {
            prop_assert_eq!(&reference, &transcoded);
        }
        prop_assert_eq!(without_nonces(&decode_sanitized(&schema, &reference)), without_nonces(&decode_sanitized(&schema, &transcoded)));

        // Every strict prefix of a record is malformed, and is rejected without touching the output.
        for cut in 0..bytes.len() {
            let mut out = vec![7u8];
            prop_assert!(transcoder.transcode(&schema, &bytes[..cut], &keys, &mut scratch, &mut out).is_err(), "prefix of {} bytes accepted", cut);
            prop_assert_eq!(&out, &vec![7u8]);
        }
        // Corrupted bytes: an error, or output that still decodes with the sanitized schema; never a panic.
        for (i, flip) in (0..bytes.len()).zip([0x01u8, 0x80, 0xff, 0x7f].iter().cycle()) {
            let mut corrupted = bytes.clone();
            corrupted[i] ^= flip;
            let mut out = Vec::new();
            if transcoder.transcode(&schema, &corrupted, &keys, &mut scratch, &mut out).is_ok() {
                let reader = GenericDatumReader::builder(&schema.sanitized).build().unwrap();
                let mut rest = &out[..];
                prop_assert!(reader.read_value(&mut rest).is_ok() && rest.is_empty(), "corrupted input gave undecodable output");
            }
        }
    }
}

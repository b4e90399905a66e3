//! The binary transcoder on hand-built encodings: blocks with byte sizes, and malformed input of every kind,
//! rejected with an error and never a panic.

mod common;

use piiwall::codec::avro::ValueCodec;
use piiwall::policy::CompiledSchema;
use piiwall::sanitize::apply;
use piiwall::transcode::{TranscodeScratch, Transcoder};
use serde_json::json;

fn schema() -> CompiledSchema {
    common::compiled(
        &json!({"type": "record", "name": "R", "fields": [
            {"name": "id", "type": "long"},
            {"name": "emails", "type": {"type": "array", "items": "string"}, "pii": "tokenize"},
            {"name": "notes", "type": {"type": "array", "items": "string"}},
            {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A", "B"]}},
            {"name": "nick", "type": ["null", "string"], "pii": {"action": "mask", "keep_last": 1}},
            {"name": "empties", "type": {"type": "array", "items": "null"}}
        ]})
        .to_string(),
    )
}

fn zigzag(n: i64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

fn string(s: &str) -> Vec<u8> {
    [zigzag(s.len() as i64), s.as_bytes().to_vec()].concat()
}

/// id=1, emails=[a@x, b@x] as one block of `emails_header`, notes=[n] with a byte-size block, kind=B, nick="bob",
/// empties=[].
fn record(emails_header: Vec<u8>) -> Vec<u8> {
    record_with(emails_header, 1)
}

fn record_with(emails_header: Vec<u8>, kind: i64) -> Vec<u8> {
    let note = string("n");
    [
        zigzag(1),
        emails_header,
        string("a@x"),
        string("b@x"),
        vec![0],
        zigzag(-1),
        zigzag(note.len() as i64),
        note,
        vec![0],
        zigzag(kind),
        zigzag(1),
        string("bob"),
        vec![0],
    ]
    .concat()
}

fn transcode(schema: &CompiledSchema, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let transcoder = Transcoder::new(schema).unwrap();
    let mut out = Vec::new();
    transcoder
        .transcode(
            schema,
            bytes,
            &common::fixed_keys(),
            &mut TranscodeScratch::default(),
            &mut out,
        )
        .map(|()| out)
        .map_err(|e| e.to_string())
}

fn reference(schema: &CompiledSchema, bytes: &[u8]) -> Vec<u8> {
    let codec = ValueCodec::new(schema);
    let mut value = codec.decode(bytes).unwrap();
    apply(&schema.plan, &mut value, &common::fixed_keys()).unwrap();
    let mut out = Vec::new();
    codec.encode(&value, &mut out).unwrap();
    out
}

fn decode(schema: &CompiledSchema, bytes: &[u8]) -> apache_avro::types::Value {
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema.sanitized)
        .build()
        .unwrap();
    reader.read_value(&mut &bytes[..]).unwrap()
}

#[test]
fn blocks_with_byte_sizes_are_rewritten_and_match_the_reference() {
    let schema = schema();
    let plain_block = record(zigzag(2));
    let items = [string("a@x"), string("b@x")].concat();
    let sized_block = record([zigzag(-2), zigzag(items.len() as i64)].concat());
    let out = transcode(&schema, &sized_block).unwrap();
    assert_eq!(
        decode(&schema, &out),
        decode(&schema, &reference(&schema, &sized_block))
    );
    assert_eq!(
        out,
        transcode(&schema, &plain_block).unwrap(),
        "the byte size of a changed block goes"
    );
    let sized_notes = [zigzag(-1), zigzag(2), string("n"), vec![0]].concat();
    assert!(
        out.windows(sized_notes.len()).any(|w| w == sized_notes),
        "an unchanged sized block is copied as it is"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("a@x") && !text.contains("b@x"));
    assert!(text.contains("**b"), "mask keeps the last character");
    assert!(
        text.contains('n'),
        "unprotected notes are copied with their sized block"
    );
}

/// A redaction inside a block that declares its byte size changes the size: the block gets a header without it.
#[test]
fn a_redaction_in_a_sized_block_rewrites_its_header() {
    use piiwall::detect::{DetectMode, DetectPolicy};
    let schema = piiwall::policy::compile(
        &json!({"type": "record", "name": "R", "fields": [
            {"name": "notes", "type": {"type": "array", "items": "string"}},
            {"name": "id", "type": "long"}
        ]})
        .to_string(),
        &piiwall::policy::PolicySettings {
            untagged: piiwall::policy::Untagged::Pass,
            detect: DetectPolicy {
                mode: DetectMode::Redact,
                ..DetectPolicy::default()
            },
            ..piiwall::policy::PolicySettings::default()
        },
    )
    .unwrap();
    let items = [string("write to ann@example.org"), string("ok")].concat();
    let bytes = [zigzag(-2), zigzag(items.len() as i64), items, vec![0], zigzag(7)].concat();
    let out = transcode(&schema, &bytes).unwrap();
    let expected = [zigzag(2), string("write to [email]"), string("ok"), vec![0], zigzag(7)].concat();
    assert_eq!(out, expected);
}

#[test]
fn malformed_records_are_errors_never_panics() {
    let schema = schema();
    let good = record(zigzag(2));
    assert!(transcode(&schema, &good).is_ok());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty input", vec![], "truncated"),
        (
            "overlong varint",
            [vec![0xff; 11], good[1..].to_vec()].concat(),
            "varint",
        ),
        (
            "negative string length",
            [zigzag(1), zigzag(1), zigzag(-3)].concat(),
            "negative length",
        ),
        (
            "length past the end",
            [zigzag(1), zigzag(1), zigzag(1_000_000)].concat(),
            "past the end",
        ),
        (
            "absurd block count",
            [zigzag(1), zigzag(1 << 40), string("a")].concat(),
            "block count",
        ),
        (
            "i64::MIN block count",
            [zigzag(1), zigzag(i64::MIN)].concat(),
            "block count",
        ),
        ("byte size lies", record([zigzag(-2), zigzag(1)].concat()), "byte size"),
        ("enum index out of range", record_with(zigzag(2), 7), "enum index"),
        ("negative enum index", record_with(zigzag(2), -1), "enum index"),
        ("trailing bytes", [good.clone(), vec![0]].concat(), "bytes remain"),
        (
            "huge count of nulls",
            {
                let mut r = good.clone();
                r.pop();
                [r, zigzag(1 << 30), vec![0]].concat()
            },
            "zero size",
        ),
    ];
    for (what, bytes, expected) in cases {
        let err = transcode(&schema, &bytes).expect_err(what);
        assert!(err.contains(expected), "{what}: {err}");
        assert!(
            err.starts_with("malformed Avro") || err.contains("malformed Avro"),
            "{what}: {err}"
        );
    }
}

#[test]
fn garbage_never_panics() {
    let schema = schema();
    let transcoder = Transcoder::new(&schema).unwrap();
    let mut scratch = TranscodeScratch::default();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for len in 0..2000usize {
        let bytes: Vec<u8> = (0..len % 64)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut out = Vec::new();
        let _ = transcoder.transcode(&schema, &bytes, &common::fixed_keys(), &mut scratch, &mut out);
        assert!(out.len() <= 64 * 200, "output stays proportional to the input");
    }
}

/// Items of zero size take no bytes, so block headers alone could ask for ~10^10 iterations per megabyte: a record
/// may hold at most 65536 of them in all, however many blocks declare them.
#[test]
fn items_of_zero_size_are_bounded_per_record() {
    let schema = common::compiled(
        &json!({"type": "record", "name": "Z", "fields": [
            {"name": "email", "type": "string", "pii": "tokenize"},
            {"name": "empties", "type": {"type": "array", "items": "null"}}
        ]})
        .to_string(),
    );
    let with_blocks = |blocks: usize, per_block: i64| {
        let mut bytes = string("a@x");
        for _ in 0..blocks {
            bytes.extend(zigzag(per_block));
        }
        bytes.push(0);
        bytes
    };
    // The same for protected items that take no bytes: each would cost a token.
    let protected = common::compiled(
        &json!({"type": "record", "name": "Z", "fields": [
            {"name": "email", "type": "string", "pii": "tokenize"},
            {"name": "empties", "type": {"type": "array", "items": {"type": "fixed", "name": "F0", "size": 0}},
             "pii": "tokenize"}
        ]})
        .to_string(),
    );
    assert!(transcode(&protected, &with_blocks(1, 100)).is_ok());
    let err = transcode(&protected, &with_blocks(2, 60_000)).unwrap_err();
    assert!(err.contains("zero size"), "{err}");
    assert!(transcode(&schema, &with_blocks(1, 65_536)).is_ok());
    assert!(transcode(&schema, &with_blocks(4, 16_384)).is_ok());
    let err = transcode(&schema, &with_blocks(2, 60_000)).unwrap_err();
    assert!(err.contains("zero size"), "{err}");
    // A megabyte of headers: refused after the first two blocks, not after 10^10 iterations.
    assert!(transcode(&schema, &with_blocks(300_000, 60_000)).is_err());
}

/// A block count is checked against the fewest bytes an item takes, and that size was summed over the item's
/// whole type at every block: a 1 MB record of empty arrays of a record that expands to ~65,000 types (within
/// the schema bound) made ~10^11 steps, stalling its lane for hours (the attacker review's case). It is summed once,
/// when the program is built.
#[test]
fn an_item_type_of_many_types_costs_nothing_per_block() {
    let mut ty = json!({"type": "record", "name": "D14", "fields": [{"name": "s", "type": "string"}]});
    for level in (0..14).rev() {
        ty = json!({"type": "record", "name": format!("D{level}"), "fields": [
            {"name": "a", "type": ty}, {"name": "b", "type": format!("D{}", level + 1)}
        ]});
    }
    let schema = common::compiled(
        &json!({"type": "record", "name": "R", "fields": [
            {"name": "e", "type": "string", "pii": "tokenize"},
            {"name": "w", "type": {"type": "array", "items": {"type": "record", "name": "W", "fields": [
                {"name": "inner", "type": {"type": "array", "items": ty}}
            ]}}}
        ]})
        .to_string(),
    );
    let items = 1_000_000;
    let bytes = [string("e"), zigzag(items), vec![0; items as usize], vec![0]].concat();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(transcode(&schema, &bytes).map(|out| out.len())));
    let out = receiver
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("transcoded within two minutes (before: hours)");
    assert!(out.is_ok_and(|len| len > items as usize), "transcoded whole");
}

/// A redacted union with no null branch takes its first branch's empty value: here a fixed of 1 MiB for every
/// two-byte item whose value took the int branch. 100 such items asked for 100 MiB (a 1 MB record of them, 500
/// GB: the fourth attacker review). A record's sanitized form may take 64 MiB; past it the record is refused with
/// the field named (and goes to quarantine).
#[test]
fn a_record_s_sanitized_form_is_bounded() {
    let schema = common::compiled(
        &json!({"type": "record", "name": "R", "fields": [
            {"name": "e", "type": "string", "pii": "tokenize"},
            {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "I", "fields": [
                {"name": "v", "type": [{"type": "fixed", "name": "F", "size": 1 << 20}, "int"], "pii": "redact"}
            ]}}}
        ]})
        .to_string(),
    );
    let items = 100;
    let item = [zigzag(1), zigzag(0)].concat();
    let bytes = [string("e"), zigzag(items), item.repeat(items as usize), vec![0]].concat();
    let error = transcode(&schema, &bytes).map(|out| out.len()).expect_err("refused");
    assert!(error.contains("passes 64 MiB") && error.contains("items.v"), "{error}");
    let few = [string("e"), zigzag(3), item.repeat(3), vec![0]].concat();
    assert!(transcode(&schema, &few).is_ok(), "three items are 3 MiB: taken");
}

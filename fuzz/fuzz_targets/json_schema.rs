//! JSON Schema topics: schema text through the translation and the compiler, and JSON records through the reader
//! and writer of the repository's JSON Schemas. The first byte picks: even, the rest is a JSON Schema; odd, a
//! record of the JSON Schema picked by its upper bits.
//!
//! Properties: nothing panics on any text; a schema that compiles has a sanitized JSON Schema that is JSON and
//! marked sanitized, and is refused if given back; a record the reader takes transcodes (or is refused cleanly) and
//! writes back as JSON; no error echoes a value of the input.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use piiwall::codec::json_records::JsonRecords;
use piiwall::policy::{CompiledSchema, PolicySettings, Undeclared, Untagged, compile_json_schema};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use piiwall_fuzz::{assert_no_echo, keys};

const JSON_SCHEMAS: [&str; 2] = [
    include_str!("../../schemas/order.schema.json"),
    include_str!("../../schemas/event.schema.json"),
];

struct Compiled {
    schema: CompiledSchema,
    transcoder: Transcoder,
    records: [JsonRecords; 2],
}

fn compiled() -> &'static [Compiled] {
    static COMPILED: OnceLock<Vec<Compiled>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        JSON_SCHEMAS
            .iter()
            .map(|text| {
                let schema = compile_json_schema(text, &PolicySettings::default()).expect("corpus schema compiles");
                let transcoder = Transcoder::new(&schema).expect("corpus schema has a transcoder");
                let records = [
                    JsonRecords::new(&schema, Undeclared::Drop),
                    JsonRecords::new(&schema, Undeclared::Quarantine),
                ];
                Compiled {
                    schema,
                    transcoder,
                    records,
                }
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        schema(selector, input);
    } else {
        record(selector, input);
    }
});

fn schema(selector: u8, input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let settings = PolicySettings {
        untagged: if selector & 2 == 0 { Untagged::Block } else { Untagged::Pass },
        ..PolicySettings::default()
    };
    let compiled = match compile_json_schema(text, &settings) {
        Ok(compiled) => compiled,
        Err(_) => return,
    };
    let (sanitized, kind) = compiled.published_schema();
    assert_eq!(kind, "JSON");
    let json: serde_json::Value = serde_json::from_str(sanitized).expect("the sanitized JSON Schema is JSON");
    assert_eq!(json["pii.sanitized"], true, "the sanitized schema is marked");
    assert!(
        compile_json_schema(sanitized, &settings).is_err(),
        "a sanitized schema is never sanitized again"
    );
}

fn record(selector: u8, input: &[u8]) {
    let all = compiled();
    let compiled = &all[usize::from(selector >> 2) % all.len()];
    let records = &compiled.records[usize::from(selector >> 1) & 1];
    let converted = match records.read(&compiled.schema, input) {
        Ok(converted) => converted,
        Err(e) => {
            assert_no_echo("the JSON reader", &e.to_string());
            return;
        }
    };
    let mut avro = Vec::new();
    if let Err(e) = compiled.transcoder.transcode(
        &compiled.schema,
        &converted.avro,
        &keys(false),
        &mut TranscodeScratch::default(),
        &mut avro,
    ) {
        assert_no_echo("the transcoder", &e.to_string());
        return;
    }
    let mut out = Vec::new();
    records
        .write(&compiled.schema, &avro, &mut out)
        .expect("a sanitized record writes as JSON");
    serde_json::from_slice::<serde_json::Value>(&out).expect("the output is JSON");
}

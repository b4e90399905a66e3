//! Schema text as producers register it, through the policy compiler.
//!
//! Properties: a schema that compiles has a sanitized schema that Avro parses back to the same schema, and a
//! transcoder (or a clear refusal); nothing panics on any text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::policy::{PolicySettings, Untagged, compile};
use piiwall::transcode::Transcoder;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let settings = PolicySettings {
        untagged: if selector & 1 == 0 {
            Untagged::Block
        } else {
            Untagged::Pass
        },
        ..PolicySettings::default()
    };
    let Ok(compiled) = compile(text, &settings) else {
        return;
    };
    let reparsed = apache_avro::Schema::parse_str(&compiled.sanitized_json)
        .expect("the sanitized schema's JSON is a valid Avro schema");
    assert!(
        reparsed.canonical_form() == compiled.sanitized.canonical_form(),
        "the sanitized schema's JSON is not the sanitized schema"
    );
    let _ = Transcoder::new(&compiled);
});

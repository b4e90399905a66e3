//! A plain-JSON record (what `piiwall sanitize` and the API's tokenize read) through the JSON codec, over a schema
//! of the corpus picked by the first input byte.
//!
//! Properties: a record the codec takes encodes with the writer schema and decodes back to the same value; the
//! transcoder takes it or refuses it cleanly; the codec's errors never echo a value or a key of the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::transcode::TranscodeScratch;
use piiwall_fuzz::{assert_no_echo, keys, pick};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(text) else {
        return;
    };
    let compiled = pick(selector);
    let value = match JsonCodec::new(&compiled.schema.writer).to_value(&json) {
        Ok(value) => value,
        Err(e) => {
            assert_no_echo("the JSON codec", &e.to_string());
            return;
        }
    };
    let codec = ValueCodec::for_writer(&compiled.schema);
    let mut bytes = Vec::new();
    codec
        .encode(&value, &mut bytes)
        .expect("a record the JSON codec took encodes with its schema");
    let decoded = codec.decode(&bytes).expect("an encoded record decodes");
    assert!(decoded == value, "a record changed through encode and decode");
    let mut out = Vec::new();
    // The transcoder may refuse a value the codec takes (an action's own limits); it must say so cleanly.
    if let Err(e) = compiled.transcoder.transcode(
        &compiled.schema,
        &bytes,
        &keys(false),
        &mut TranscodeScratch::default(),
        &mut out,
    ) {
        assert_no_echo("the transcoder", &e.to_string());
    }
});

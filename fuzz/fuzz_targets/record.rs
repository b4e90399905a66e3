//! A Kafka record value as piiwall's lanes read it: the Confluent framing, then the Avro transcoder over a schema
//! of the corpus (the first input byte picks it, and whether the subject is forgotten).
//!
//! Properties: the framing splits exactly the 5-byte header; the transcoder's output always decodes with the
//! sanitized schema, to its last byte; a record the transcoder takes is one the reference decoder takes too; an
//! error leaves the output buffer as it was and never echoes a value.

#![no_main]

use apache_avro::reader::datum::GenericDatumReader;
use libfuzzer_sys::fuzz_target;
use piiwall::codec::avro::ValueCodec;
use piiwall::stream::parse_frame;
use piiwall::transcode::TranscodeScratch;
use piiwall_fuzz::{assert_no_echo, keys, pick};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let payload = match parse_frame(value) {
        Ok((id, payload)) => {
            assert_eq!(value[0], 0, "framing took a record whose magic byte is not 0");
            assert_eq!(id.to_be_bytes(), value[1..5], "framing read the wrong schema id");
            assert_eq!(payload, &value[5..], "framing cut the payload wrong");
            payload
        }
        Err(_) => {
            assert!(value.len() < 5 || value[0] != 0, "framing refused a well-framed record");
            return;
        }
    };
    let compiled = pick(selector & 0x7f);
    if let Err(e) = compiled.transcoder.subject(payload) {
        assert_no_echo("the subject locator", &e.to_string());
    }
    let mut out = b"prefix".to_vec();
    let mut scratch = TranscodeScratch::default();
    let keys = keys(selector & 0x80 != 0);
    match compiled
        .transcoder
        .transcode(&compiled.schema, payload, &keys, &mut scratch, &mut out)
    {
        Ok(()) => {
            let mut rest = &out[6..];
            GenericDatumReader::builder(&compiled.schema.sanitized)
                .build()
                .expect("the sanitized schema resolves")
                .read_value(&mut rest)
                .expect("the transcoder's output decodes with the sanitized schema");
            assert!(rest.is_empty(), "the transcoder's output has bytes after the record");
            if let Err(e) = ValueCodec::for_writer(&compiled.schema).decode(payload) {
                panic!("the transcoder took a record the reference decoder refuses: {e}");
            }
        }
        Err(e) => {
            assert_eq!(out, b"prefix", "a failed transcode left bytes in the output");
            assert_no_echo("the transcoder", &e.to_string());
        }
    }
});

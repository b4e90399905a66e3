//! A Confluent-framed protobuf record (message indexes, then the message) through the direct protobuf transcoder
//! (what `run` uses) and through the conversion path (protobuf codec, Avro transcoder, protobuf codec), over two
//! schemas picked by the first input byte: every scalar type, repeated, maps and oneofs with nothing protected; and
//! an annotated customer whose protected fields are strings, numbers, repeated, maps and nested.
//!
//! Properties: nothing panics; errors never echo the input; what the direct transcoder writes reads with the
//! sanitized message; with nothing protected, a record the codec takes is written back to bytes that read again to
//! the same Avro binary, by either path; a record the protected schema takes is sanitized and written, or refused
//! cleanly.

#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use piiwall::codec::Records;
use piiwall::codec::protobuf::ProtoRecords;
use piiwall::policy::{CompiledSchema, PolicySettings, Undeclared, Untagged, compile_protobuf};
use piiwall::transcode::{TranscodeScratch, Transcoder};
use piiwall_fuzz::{assert_no_echo, keys};

const PLAIN: &str = r#"syntax = "proto3";
message Everything {
  double d = 1; float f = 2; int32 i32 = 3; int64 i64 = 4; uint32 u32 = 5; uint64 u64 = 6; sint32 s32 = 7;
  sint64 s64 = 8; fixed32 fx32 = 9; fixed64 fx64 = 10; sfixed32 sf32 = 11; sfixed64 sf64 = 12; bool flag = 13;
  string text = 14; bytes blob = 15; Tier tier = 16; optional string maybe = 17; Inner inner = 18;
  repeated int32 numbers = 19; repeated string words = 20; repeated Inner inners = 21;
  map<string, string> labels = 22; map<int64, Inner> by_id = 23; map<bool, sint32> by_flag = 24;
  oneof choice { string name = 25; int64 code = 26; }
  enum Tier { FREE = 0; GOLD = 1; }
  message Inner { string a = 1; repeated fixed64 b = 2; }
}
"#;

const PROTECTED: &str = r#"syntax = "proto3";
import "piiwall/pii.proto";
message Customer {
  option (piiwall.subject) = "id";
  string id = 1;
  string email = 2 [(piiwall.pii).action = "tokenize"];
  optional int32 age = 3 [(piiwall.pii).action = "tokenize"];
  double score = 4 [(piiwall.pii).action = "hash"];
  repeated string phones = 5 [(piiwall.pii) = { action: "mask", keep_last: 2 }];
  map<int32, string> notes = 6 [(piiwall.pii).action = "encrypt"];
  Contact contact = 7;
  message Contact { string street = 1 [(piiwall.pii).action = "tokenize"]; repeated sint64 codes = 2; }
}
"#;

struct Compiled {
    schema: CompiledSchema,
    transcoder: Transcoder,
    records: Records,
}

fn compiled(text: &str, untagged: Untagged) -> Compiled {
    let settings = PolicySettings { untagged, ..PolicySettings::default() };
    let schema = compile_protobuf(text, &HashMap::new(), None, &settings).expect("the fuzz schema compiles");
    let transcoder = Transcoder::new(&schema).unwrap();
    Compiled {
        records: Records::for_schema(&schema, &transcoder, Undeclared::Drop, true).unwrap().unwrap(),
        transcoder,
        schema,
    }
}

static SCHEMAS: LazyLock<[Compiled; 2]> =
    LazyLock::new(|| [compiled(PLAIN, Untagged::Pass), compiled(PROTECTED, Untagged::Block)]);

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let plain = selector % 2 == 0;
    let c = &SCHEMAS[usize::from(selector % 2)];
    let Records::Protobuf(proto) = &c.records else { unreachable!("protobuf records") };
    let mut direct = Vec::new();
    let direct = match proto.transcode(&c.schema, payload, &keys(false), &mut TranscodeScratch::default(), &mut direct) {
        Ok(_) => {
            let sanitized = &c.schema.protobuf().expect("a .proto schema").sanitized_message;
            if let Err(e) = ProtoRecords::of_message(sanitized).read(&direct) {
                // Only the reader's budget of expanded fields may refuse what the transcoder wrote.
                assert!(e.to_string().contains("expands"), "what the transcoder wrote does not read: {e}");
            }
            Some(direct)
        }
        Err(e) => {
            assert_no_echo("the protobuf transcoder", &e.to_string());
            None
        }
    };
    let avro = match c.records.read(&c.schema, payload) {
        Ok((avro, _)) => avro,
        Err(e) => {
            assert_no_echo("the protobuf codec", &e.to_string());
            return;
        }
    };
    let mut sanitized = Vec::new();
    if let Err(e) = c.transcoder.transcode(&c.schema, &avro, &keys(false), &mut TranscodeScratch::default(), &mut sanitized) {
        assert_no_echo("the transcoder", &e.to_string());
        return;
    }
    let mut out = Vec::new();
    c.records.write(&c.schema, &sanitized, &mut out).expect("a sanitized record is written as protobuf");
    if plain {
        let (again, _) = c.records.read(&c.schema, &out).expect("what piiwall wrote reads again");
        assert!(again == avro, "a record changed through read, write and read");
        if let Some(direct) = direct
            && let Ok((again, _)) = c.records.read(&c.schema, &direct)
        {
            assert!(again == avro, "a record changed through the direct transcoder");
        }
    }
});

//! Writes the seed corpora under fuzz/corpus/<target>/: `cargo run --example seeds` in fuzz/ (stable toolchain).
//! Every seed carries the canary in its values, so the targets' no-echo checks have something to find.

use std::path::{Path, PathBuf};

use piiwall::codec::avro::ValueCodec;
use piiwall::codec::json::JsonCodec;
use piiwall::crypto::{KeyId, Token, TokenKind};
use piiwall::stream::write_frame_header;
use piiwall_fuzz::{CANARY, SCHEMAS, schemas};
use serde_json::{Value as Json, json};

const SAMPLES: [&str; 5] = [
    include_str!("../../schemas/samples/customer_profile.jsonl"),
    include_str!("../../schemas/samples/payment.jsonl"),
    include_str!("../../schemas/samples/clickstream.jsonl"),
    include_str!("../../schemas/samples/event.jsonl"),
    include_str!("../schemas/all_types.jsonl"),
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut record = Vec::new();
    let mut json_seeds = Vec::new();
    for (index, samples) in SAMPLES.iter().enumerate() {
        let compiled = &schemas()[index];
        for line in samples.lines().filter(|l| !l.trim().is_empty()) {
            let plain: Json = serde_json::from_str(line).expect("sample is JSON");
            let mut marked = plain.clone();
            with_canary(&mut marked);
            for value in [plain, marked] {
                let selector = index as u8;
                json_seeds.push([&[selector][..], value.to_string().as_bytes()].concat());
                // A value the canary made invalid (a uuid, a decimal) is a JSON seed only.
                let Ok(avro) = JsonCodec::new(&compiled.schema.writer).to_value(&value) else {
                    continue;
                };
                let mut framed = vec![selector];
                write_frame_header(42, &mut framed);
                ValueCodec::for_writer(&compiled.schema)
                    .encode(&avro, &mut framed)
                    .expect("sample encodes");
                let mut forgotten = framed.clone();
                forgotten[0] |= 0x80;
                record.push(framed);
                record.push(forgotten);
            }
        }
        let mut unknown = vec![index as u8];
        unknown.extend(
            json!({ format!("{CANARY}_added"): CANARY, "email": 12 })
                .to_string()
                .into_bytes(),
        );
        json_seeds.push(unknown);
    }
    write(&root.join("record"), &record);
    write(&root.join("json"), &json_seeds);

    let schema_seeds: Vec<Vec<u8>> = SCHEMAS
        .iter()
        .flat_map(|text| {
            [
                [&[0u8][..], text.as_bytes()].concat(),
                [&[1u8][..], text.as_bytes()].concat(),
            ]
        })
        .collect();
    write(&root.join("schema"), &schema_seeds);

    let key_id = KeyId([3; 12]);
    let tokens: Vec<Vec<u8>> = [
        Token::render(TokenKind::Token, key_id, &[9; 32]),
        Token::render(TokenKind::Ciphertext, key_id, &[9; 60]),
        Token::render(TokenKind::Hash, key_id, &[9; 32]),
        format!("pwt1.{CANARY}{CANARY}abcdef.{CANARY}"),
        format!("{CANARY}.{CANARY}.{CANARY}"),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    write(&root.join("token"), &tokens);

    let bodies = [
        json!({"purpose": CANARY, "field": CANARY, "tokens": [CANARY]}),
        json!({"purpose": CANARY, "topic": CANARY, "field": CANARY, "value": CANARY, "subject": CANARY}),
        json!({"purpose": CANARY, "subject": CANARY}),
        json!({"purpose": CANARY, "domain": CANARY}),
    ];
    let mut api = Vec::new();
    for operation in 0..5u8 {
        for body in &bodies {
            api.push([&[operation][..], body.to_string().as_bytes()].concat());
        }
        api.push([&[operation][..], format!("{{\"purpose\": \"{CANARY}").as_bytes()].concat());
        api.push([&[operation][..], format!("{{\"{CANARY}\": 1}}").as_bytes()].concat());
    }
    write(&root.join("api_request"), &api);

    let config = [
        include_str!("../../config/piiwall.toml").to_owned(),
        include_str!("../../docker/piiwall.toml").to_owned(),
        format!(
            "[keys]\nstore = \"postgres://piiwall:{CANARY}@db:5432/keys\"\n[schemas]\nregistry = \
             \"https://user:{CANARY}@registry:8081\"\n[kafka.properties]\n\"sasl.password\" = \"{CANARY}\"\n"
        ),
        format!("[keys]\nstore = \"host=db password={CANARY} port=x\"\n"),
        format!("[kafka.properties]\n\"sasl.password\" = \"{CANARY}\n"),
        format!("[kafka]\nbrokers = 3\n[kafka.properties]\n\"sasl.password\" = \"{CANARY}\"\n"),
    ];
    write(
        &root.join("config"),
        &config.iter().map(|text| text.clone().into_bytes()).collect::<Vec<_>>(),
    );
}

/// Appends the canary to every string of a record.
fn with_canary(value: &mut Json) {
    match value {
        Json::String(text) => text.push_str(CANARY),
        Json::Array(items) => items.iter_mut().for_each(with_canary),
        Json::Object(map) => map.values_mut().for_each(with_canary),
        _ => {}
    }
}

fn write(dir: &Path, seeds: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    for (n, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{n:03}")), seed).expect("write seed");
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
}

//! The policy compiler: every invalid annotation is an error naming its field path; the sanitized schema keeps
//! everything but what an action changed; Confluent-style tags map to actions.

mod common;

use std::collections::BTreeMap;

use piiwall::codec::json::JsonCodec;
use piiwall::policy::{Action, PolicySettings, Untagged, compile};
use serde_json::{Value as Json, json};

fn record(fields: Json) -> String {
    json!({"type": "record", "name": "R", "namespace": "com.acme", "fields": fields}).to_string()
}

fn error_of(schema: &str) -> (String, String) {
    let e = compile(schema, &PolicySettings::default()).expect_err("schema must be refused");
    (e.path, e.problem)
}

/// Records that each use the next one twice: a few kilobytes that expand to 2^levels types.
fn doubling_records(levels: usize) -> String {
    let mut ty = json!({"type": "record", "name": format!("L{levels}"), "fields": [
        {"name": "x", "type": "string", "pii": "encrypt"}
    ]});
    for level in (0..levels).rev() {
        ty = json!({"type": "record", "name": format!("L{level}"), "fields": [
            {"name": "a", "type": ty},
            {"name": "b", "type": format!("com.acme.L{}", level + 1)}
        ]});
    }
    record(json!([{"name": "f", "type": ty}]))
}

/// A schema that expands to more types than any record needs is refused at once: the compiler and the transcoder
/// walk a named record again at each use, so 17 levels of records that each use the next twice (2.2 KB) compiled
/// to a plan of 131,072 rules (20 levels: 14 s in a release build; each level doubles it), a stall of the lane
/// that meets it and, a few levels more, memory the process does not have. Ten levels still compile.
#[test]
fn a_schema_that_expands_past_the_bound_is_refused() {
    let (path, problem) = error_of(&doubling_records(17));
    assert_eq!(path, "");
    assert!(problem.contains("expands to more than 100000 types"), "{problem}");
    let compiled = compile(&doubling_records(10), &PolicySettings::default()).expect("compiles");
    piiwall::transcode::Transcoder::new(&compiled).expect("and runs");
}

/// Compiles on a thread with the stack of a tokio worker (2 MiB), where `run` compiles the schemas it meets: the
/// problem of a refused schema, or None.
fn refusal_on_a_worker_stack(schema: String) -> Option<String> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            compile(&schema, &PolicySettings::default())
                .and_then(|compiled| piiwall::transcode::Transcoder::new(&compiled).map(|_| ()))
                .err()
                .map(|e| e.problem)
        })
        .unwrap()
        .join()
        .unwrap()
}

/// Schemas the attacker review of the first bound found walkable past it, because the compiler resolves names on
/// its own (from the types it has walked, then in the null namespace) where the bound walked Avro's parsed schema.
#[test]
fn schemas_that_would_walk_without_bound_are_refused() {
    // A type defined inside a redacted field is one the compiler never walked: `Foo` inside `x.Bar` is the empty
    // `x.Foo` to Avro, and was the outer `Foo` to the compiler, whose redacted value then held itself for ever (a
    // stack overflow). Names now mean to the compiler what they mean to Avro: no cycle, and it compiles.
    let hidden_cycle = json!({"type": "record", "name": "R", "fields": [
        {"name": "h", "type": ["null", {"type": "record", "name": "x.Foo", "fields": []}], "pii": "redact"},
        {"name": "loop", "pii": "redact", "type": {"type": "record", "name": "Foo", "fields": [
            {"name": "b", "type": {"type": "record", "name": "x.Bar", "fields": [{"name": "c", "type": "Foo"}]}}
        ]}}
    ]});
    // The same mismatch doubling at every level: Avro sees ~5 types a level (`L{k+1}` inside `x.W{k}` is the empty
    // `x.L{k+1}`), the compiler walked 2^levels paths. Now it sees what Avro sees.
    let levels = 17;
    let hidden: Vec<Json> = std::iter::once(json!("null"))
        .chain((1..=levels).map(|k| json!({"type": "record", "name": format!("x.L{k}"), "fields": []})))
        .collect();
    let mut fields = vec![json!({"name": "h", "pii": "redact", "type": hidden})];
    fields.push(json!({"name": "e", "type": "string", "pii": "tokenize"}));
    for k in (1..=levels).rev() {
        let ty = if k == levels {
            json!({"type": "record", "name": format!("L{k}"), "fields": [{"name": "v", "type": "string", "pii": "encrypt"}]})
        } else {
            json!({"type": "record", "name": format!("L{k}"), "fields": [{"name": "w", "type": {
                "type": "record", "name": format!("x.W{k}"), "fields": [
                    {"name": "a", "type": format!("L{}", k + 1)}, {"name": "b", "type": format!("L{}", k + 1)}
                ]
            }}]})
        };
        fields.push(json!({"name": format!("f{k}"), "type": ty}));
    }
    let hidden_doubling = json!({"type": "record", "name": "R", "fields": fields});
    // A name defined twice (Avro's parser takes it): the second definition was never looked into.
    let defined_twice = json!({"type": "record", "name": "R", "fields": [
        {"name": "e", "type": "string", "pii": "tokenize"},
        {"name": "h", "type": ["null", {"type": "record", "name": "Foo", "fields": []}], "pii": "redact"},
        {"name": "loop", "type": {"type": "record", "name": "Foo", "fields": [{"name": "next", "type": "Foo"}]}, "pii": "redact"}
    ]});
    // A chain of records each holding the one defined before it, 200 deep (under the type bound): the compiler and
    // the transcoder follow each reference, three stack frames a level.
    let chain_of = |records: usize| {
        let mut chain = vec![json!({"name": "e", "type": "string", "pii": "tokenize"})];
        for k in 0..records {
            let inner = if k == 0 {
                json!("string")
            } else {
                json!(format!("C{}", k - 1))
            };
            chain.push(
                json!({"name": format!("c{k}"), "type": {"type": "record", "name": format!("C{k}"), "fields": [
                    {"name": "v", "type": inner}
                ]}}),
            );
        }
        json!({"type": "record", "name": "R", "fields": chain})
    };
    let deep_chain = chain_of(200);
    // Fewer records, each holding the one before inside ten arrays: 440 types deep through references (what the
    // JSON nests inline stops near 128), as deep in every walk's stack.
    let arrays_of = |records: usize| {
        let mut arrays = vec![json!({"name": "e", "type": "string", "pii": "tokenize"})];
        for k in 0..records {
            let mut inner = if k == 0 {
                json!("string")
            } else {
                json!(format!("A{}", k - 1))
            };
            for _ in 0..10 {
                inner = json!({"type": "array", "items": inner});
            }
            arrays.push(
                json!({"name": format!("a{k}"), "type": {"type": "record", "name": format!("A{k}"), "fields": [
                    {"name": "v", "type": inner}
                ]}}),
            );
        }
        json!({"type": "record", "name": "R", "fields": arrays})
    };
    let deep_arrays = arrays_of(40);
    // Long names at every level of records used twice: under the type bound, but each use's path is long, and the
    // plan keeps three copies of it per rule (~150 MB here).
    let long = "n".repeat(1000);
    let mut ty =
        json!({"type": "record", "name": "D12", "fields": [{"name": long, "type": "string", "pii": "encrypt"}]});
    for level in (0..12).rev() {
        ty = json!({"type": "record", "name": format!("D{level}"), "fields": [
            {"name": long, "type": ty}, {"name": format!("{long}b"), "type": format!("D{}", level + 1)}
        ]});
    }
    let long_paths = json!({"type": "record", "name": "R", "fields": [{"name": "f", "type": ty}]});
    // Values that take no bytes: 2^15 nulls in one item type (within the type bound), or a flat record of 100
    // null fields, in an array. Every item is one byte or none, and reading it took a step per null: a 1 MB record
    // asked for ~10^10 steps (the third review).
    let mut nulls = json!({"type": "record", "name": "N0", "fields": [
        {"name": "a", "type": "null"}, {"name": "b", "type": "null"}
    ]});
    for level in 1..15 {
        nulls = json!({"type": "record", "name": format!("N{level}"), "fields": [
            {"name": "a", "type": nulls}, {"name": "b", "type": format!("N{}", level - 1)}
        ]});
    }
    let null_tree = record(json!([
        {"name": "e", "type": "string", "pii": "tokenize"},
        {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item", "fields": [
            {"name": "flag", "type": "boolean"}, {"name": "n", "type": nulls}
        ]}}}
    ]));
    let null_fields = |count: usize| {
        let fields: Vec<Json> = (0..count)
            .map(|i| json!({"name": format!("z{i}"), "type": "null"}))
            .collect();
        record(json!([
            {"name": "e", "type": "string", "pii": "tokenize"},
            {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Flat", "fields": fields}}}
        ]))
    };
    // 63 records in one another, and the root: the deepest nesting of records taken; 11 records in ten arrays
    // each, 122 types deep (near the bound of 128); both compiled on a worker's stack.
    for compiles in [
        hidden_cycle,
        hidden_doubling,
        chain_of(63),
        arrays_of(11),
        serde_json::from_str(&null_fields(10)).unwrap(),
    ] {
        assert_eq!(refusal_on_a_worker_stack(compiles.to_string()), None);
    }
    for (what, schema, problem) in [
        ("a name defined twice", defined_twice, "defined twice"),
        ("a chain of 200 records", deep_chain, "nest more than"),
        ("40 records in ten arrays each", deep_arrays, "nest more than 128"),
        ("long paths", long_paths, "paths"),
        (
            "2^15 nulls in an item",
            serde_json::from_str(&null_tree).unwrap(),
            "take no bytes",
        ),
        (
            "100 null fields in an item",
            serde_json::from_str(&null_fields(100)).unwrap(),
            "take no bytes",
        ),
    ] {
        let refusal = refusal_on_a_worker_stack(schema.to_string());
        assert!(
            refusal.as_deref().is_some_and(|p| p.contains(problem)),
            "{what}: {refusal:?}"
        );
    }
}

/// A plain-JSON record of `compiled`'s writer schema through the transcoder, with fixed keys: its output.
fn transcoded(compiled: &piiwall::policy::CompiledSchema, record: &Json) -> Vec<u8> {
    let value = JsonCodec::new(&compiled.writer)
        .to_value(record)
        .expect("a record of the schema");
    let mut raw = Vec::new();
    piiwall::codec::avro::ValueCodec::for_writer(compiled)
        .encode(&value, &mut raw)
        .unwrap();
    let mut out = Vec::new();
    piiwall::transcode::Transcoder::new(compiled)
        .expect("runs")
        .transcode(
            compiled,
            &raw,
            &common::fixed_keys(),
            &mut piiwall::transcode::TranscodeScratch::default(),
            &mut out,
        )
        .expect("transcodes");
    out
}

/// Asserts `schema` is refused with `problem` in the error; `what` names the case on failure.
fn assert_refused(what: &str, schema: &str, problem: &str) {
    let refused = compile(schema, &PolicySettings::default());
    assert!(
        refused.as_ref().is_err_and(|e| e.problem.contains(problem)),
        "{what}: {:?}",
        refused.map(|c| c.plan.rules.len())
    );
}

#[test]
fn invalid_annotations_name_the_field() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            record(json!([{"name": "email", "type": "string", "pii": "tokenise"}])),
            "email",
            "unknown pii action",
        ),
        (
            record(json!([{"name": "age", "type": "long", "pii": "mask"}])),
            "age",
            "mask applies to strings",
        ),
        (
            record(
                json!([{"name": "home", "type": {"type": "record", "name": "A", "fields": [{"name": "zip", "type": "string"}]}, "pii": "tokenize"}]),
            ),
            "home",
            "applies to scalar values",
        ),
        (
            record(json!([{"name": "score", "type": "double", "pii": "subject"}])),
            "score",
            "subject field must be",
        ),
        (
            record(
                json!([{"name": "a", "type": "string", "pii": "subject"}, {"name": "b", "type": "string", "pii": "subject"}]),
            ),
            "b",
            "second subject",
        ),
        (
            record(json!([{"name": "ids", "type": {"type": "array", "items": "string"}, "pii": "subject"}])),
            "ids",
            "subject field must",
        ),
        (
            record(json!([{"name": "email", "type": {"type": "string", "pii": "tokenize"}}])),
            "email",
            "inside a type object",
        ),
        (
            record(json!([{"name": "emails", "type": {"type": "array", "items": "string", "pii": "encrypt"}}])),
            "emails",
            "inside an array or map type",
        ),
        (
            record(json!([{"name": "card", "type": "string", "pii": {"action": "mask", "keep_last": -1}}])),
            "card",
            "keep_last",
        ),
        (
            record(json!([{"name": "email", "type": "string", "pii": {"action": "tokenize", "keep_last": 2}}])),
            "email",
            "does not apply to tokenize",
        ),
        (
            record(json!([{"name": "email", "type": "string", "pii": {"kind": "email"}}])),
            "email",
            "needs an \"action\"",
        ),
        (
            record(json!([{"name": "email", "type": "string", "pii": 3}])),
            "email",
            "must be an action name",
        ),
        (
            record(
                json!([{"name": "x", "type": ["null", "string", {"type": "record", "name": "B", "fields": []}], "pii": "encrypt"}]),
            ),
            "x",
            "complex branch",
        ),
        (
            record(json!([
                {"name": "a", "type": {"type": "enum", "name": "Country", "symbols": ["GB", "US"]}, "pii": "tokenize"},
                {"name": "b", "type": "Country"}
            ])),
            "b",
            "whose definition at `a` an action replaced",
        ),
        (
            record(
                json!([{"name": "next", "type": ["null", "R"]}, {"name": "email", "type": "string", "pii": "hash"}]),
            ),
            "next",
            "recursive",
        ),
        // Recursion under a redacted field: the transcoder's skip of the value (and the redacted value itself, when
        // no branch ends the recursion) recursed for ever and overflowed the stack (the schema fuzz target).
        (
            record(json!([
                {"name": "email", "type": "string", "pii": "tokenize"},
                {"name": "n", "type": {"type": "record", "name": "N", "fields": [
                    {"name": "x", "type": "string"},
                    {"name": "next", "type": {"type": "map", "values": "N"}, "pii": "redact"}
                ]}}
            ])),
            "n.next",
            "recursive",
        ),
        (
            record(json!([
                {"name": "email", "type": "string", "pii": "tokenize"},
                {"name": "n", "type": {"type": "record", "name": "N", "fields": [{"name": "n", "type": "N"}]}, "pii": "redact"}
            ])),
            "n.n",
            "recursive",
        ),
        // A subject in one branch of a union of several records: the steps that find it would read the field at the
        // same position of another branch (a note, say) as the subject id.
        (
            record(json!([{"name": "payload", "type": [
                "null",
                {"type": "record", "name": "Signup", "fields": [{"name": "user", "type": "string", "pii": "subject"}]},
                {"type": "record", "name": "Note", "fields": [{"name": "text", "type": "string", "pii": "encrypt"}]}
            ]}])),
            "payload.user",
            "union of several",
        ),
        // Declared a uuid, but on a type no uuid is written with: what compiles must run.
        (
            record(json!([{"name": "who", "type": {"type": "double", "logicalType": "uuid"}, "pii": "subject"}])),
            "who",
            "does not apply",
        ),
    ];
    for (schema, path, problem) in cases {
        let (got_path, got_problem) = error_of(&schema);
        assert_eq!(got_path, path, "{schema}: {got_problem}");
        assert!(
            got_problem.contains(problem),
            "{schema}: expected '{problem}' in '{got_problem}'"
        );
    }
}

#[test]
fn schema_level_problems_are_explained() {
    let subject_missing = json!({"type": "record", "name": "R", "pii.subject": "user.id", "fields": [{"name": "email", "type": "string", "pii": "hash"}]});
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "not valid JSON"),
        (json!({"type": "record", "name": "R"}).to_string(), "not a valid Avro schema"),
        (json!("string").to_string(), "root must be a record"),
        (subject_missing.to_string(), "pii.subject names `user.id`"),
        (record(json!([{"name": "id", "type": "string"}])), "no pii annotations"),
        (json!({"type": "record", "name": "R", "pii.sanitized": true, "fields": []}).to_string(), "already sanitized"),
        (json!({"type": "record", "name": "R", "pii.domain": "Not OK", "fields": []}).to_string(), "pii.domain"),
        (
            json!({"type": "record", "name": "R", "fields": [{"name": "n", "type": {"type": "record", "name": "N", "pii.subject": "x", "fields": []}}]}).to_string(),
            "only the root",
        ),
        // Found by the schema fuzzer: Avro parses a decimal whose precision is text by dropping the logical type,
        // and Avro's canonical form then panics on it. Sizes, precisions and scales are whole numbers.
        (
            record(
                json!([{"name": "fee", "type": {"type": "fixed", "name": "Fee", "size": 8, "logicalType": "decimal", "precision": "Dur"}, "pii": "encrypt"}]),
            ),
            "`precision` must be a whole number",
        ),
        (
            record(json!([{"name": "n", "type": "string", "pii": "hash", "size": true}])),
            "`size` must be a whole number",
        ),
        // Also from the fuzzer: any attribute on a field is kept, and the canonical form walks into these.
        (
            record(json!([{"name": "n", "type": "string", "pii": "hash", "symbols": null}])),
            "`symbols` must be a string, an object or an array",
        ),
        (
            record(json!([{"name": "n", "type": "string", "pii": "hash", "items": ["string", 1]}])),
            "a list in a schema holds",
        ),
        // From a later hour of the schema fuzz target: a scale written `-0` (JSON's negative zero, a float to serde)
        // on a fixed type whose field has a default, which Avro's parser resolves through the canonical form, which
        // panics on it: the shapes are checked before Avro parses the schema.
        (
            r#"{"type": "record", "name": "R", "fields": [{"name": "fee", "type": {"type": "fixed", "name": "Fee",
                "size": 6, "scale": -0}, "default": null}, {"name": "n", "type": "string", "pii": "hash"}]}"#
                .into(),
            "`scale` must be a whole number",
        ),
        // From the hour-long schema fuzz run: a `fields` attribute on a field, listing a number.
        (
            record(json!([{"name": "n", "type": "string", "pii": "hash", "fields": [0]}])),
            "`fields` lists objects",
        ),
    ];
    for (schema, problem) in cases {
        let (_, got) = error_of(&schema);
        assert!(got.contains(problem), "{schema}: expected '{problem}' in '{got}'");
    }
}

#[test]
fn untagged_schemas_pass_only_when_configured() {
    let schema = record(json!([{"name": "id", "type": "string"}]));
    let pass = PolicySettings {
        untagged: Untagged::Pass,
        ..PolicySettings::default()
    };
    assert!(compile(&schema, &pass).unwrap().plan.rules.is_empty());
    let reviewed = record(json!([{"name": "id", "type": "string", "pii": "none"}]));
    assert!(
        compile(&reviewed, &PolicySettings::default()).is_ok(),
        "a field marked none counts as reviewed"
    );
}

#[test]
fn sanitized_schema_keeps_everything_but_what_was_applied() {
    let schema = json!({
        "type": "record", "name": "Customer", "namespace": "com.acme", "doc": "A customer.", "x-owner": "crm",
        "aliases": ["Client"],
        "fields": [
            {"name": "email", "type": "string", "doc": "Primary email", "aliases": ["mail"], "pii": "tokenize", "x-quality": "verified"},
            {"name": "age", "type": "int", "default": 0, "pii": "encrypt"},
            {"name": "note", "type": ["null", "string", "long"], "default": null, "pii": "encrypt"},
            {"name": "avatar", "type": "bytes", "pii": "encrypt"},
            {"name": "card", "type": "string", "default": "", "pii": {"action": "mask", "keep_last": 4}},
            {"name": "ssn", "type": "string", "confluent:tags": ["PII", "GOVERNMENT"]},
            {"name": "secret", "type": {"type": "record", "name": "S", "fields": [{"name": "x", "type": "long"}]}, "pii": "redact"},
            {"name": "country", "type": "string", "default": "GB", "doc": "ISO code"},
            {"name": "contact", "type": "string", "default": "noreply@acme.example", "pii": "tokenize"},
            {"name": "aliases", "type": {"type": "array", "items": "string"}, "default": [], "pii": "tokenize"},
            {"name": "office", "type": {"type": "record", "name": "O", "fields": [
                {"name": "street", "type": "string", "default": "1 Main Street"}
            ]}, "pii": "redact"}
        ]
    });
    let compiled = compile(&schema.to_string(), &PolicySettings::default()).unwrap();
    let out: Json = serde_json::from_str(&compiled.sanitized_json).unwrap();
    assert_eq!(out["doc"], "A customer.");
    assert_eq!(out["x-owner"], "crm");
    assert_eq!(out["aliases"], json!(["Client"]));
    assert_eq!(out["pii.sanitized"], true);
    let field = |name: &str| {
        out["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        field("email"),
        json!({"name": "email", "type": "string", "doc": "Primary email", "aliases": ["mail"], "x-quality": "verified", "pii.applied": "tokenize"})
    );
    assert_eq!(
        field("age"),
        json!({"name": "age", "type": "string", "pii.applied": "encrypt"}),
        "an int default is invalid for a string"
    );
    assert_eq!(
        field("note")["type"],
        json!(["null", "string"]),
        "branches that become strings merge"
    );
    assert_eq!(field("note")["default"], Json::Null);
    assert_eq!(field("avatar")["type"], "bytes", "encrypted bytes stay bytes");
    assert_eq!(field("card")["default"], "");
    assert_eq!(
        field("ssn"),
        json!({"name": "ssn", "type": "string", "confluent:tags": ["GOVERNMENT"], "pii.applied": "encrypt"})
    );
    assert_eq!(
        field("secret")["type"]["fields"][0]["name"],
        "x",
        "redact keeps the type"
    );
    assert_eq!(
        field("country"),
        schema["fields"][7],
        "unprotected fields are untouched"
    );
    assert_eq!(
        field("aliases")["default"],
        json!([]),
        "an empty default holds nothing and keeps the field addable"
    );
    assert!(
        !compiled.sanitized_json.contains("noreply@acme.example") && !compiled.sanitized_json.contains("1 Main"),
        "a protected field's default is a value in clear, not published: {}",
        compiled.sanitized_json
    );
}

#[test]
fn tags_map_to_actions_by_config() {
    let schema = json!({
        "type": "record", "name": "User", "namespace": "com.acme",
        "metadata": {"tags": {"**.ssn": ["PII"], "com.acme.User.contact.phone": ["CONTACT"]}},
        "fields": [
            {"name": "ssn", "type": "string"},
            {"name": "contact", "type": {"type": "record", "name": "Contact", "fields": [
                {"name": "phone", "type": "string"},
                {"name": "ssn", "type": "string"}
            ]}},
            {"name": "ip", "type": "string", "confluent:tags": ["NETWORK"]}
        ]
    })
    .to_string();
    let settings = PolicySettings {
        untagged: Untagged::Block,
        tag_actions: BTreeMap::from([
            ("PII".into(), Action::Encrypt),
            ("CONTACT".into(), Action::Hash),
            ("NETWORK".into(), Action::Hash),
        ]),
        ..PolicySettings::default()
    };
    let rules: Vec<(String, Action)> = compile(&schema, &settings)
        .unwrap()
        .plan
        .rules
        .into_iter()
        .map(|r| (r.path, r.action))
        .collect();
    assert_eq!(rules[0], ("ssn".into(), Action::Encrypt));
    assert_eq!(rules[1], ("contact.phone".into(), Action::Hash));
    assert_eq!(rules[2], ("contact.ssn".into(), Action::Encrypt));
    assert_eq!(rules[3], ("ip".into(), Action::Hash));
    let conflicting = json!({"type": "record", "name": "U", "fields": [{"name": "ssn", "type": "string", "confluent:tags": ["PII", "NETWORK", "PII"]}]});
    let e = compile(&conflicting.to_string(), &settings).unwrap_err();
    assert_eq!(e.path, "ssn");
    assert!(e.problem.contains("different actions"));
}

#[test]
fn logical_types_enums_and_fixed_round_trip_through_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = record(json!([
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}, "pii": "tokenize"},
        {"name": "price", "type": {"type": "fixed", "name": "P", "size": 8, "logicalType": "decimal", "precision": 12, "scale": 3}, "pii": "encrypt"},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}, "pii": "tokenize"},
        {"name": "born", "type": {"type": "int", "logicalType": "date"}, "pii": "encrypt"},
        {"name": "seen", "type": {"type": "long", "logicalType": "timestamp-micros"}, "pii": "tokenize"},
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["A", "B"]}, "pii": "tokenize"},
        {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 2}, "pii": "encrypt"},
        {"name": "uid_masked", "type": {"type": "string", "logicalType": "uuid"}, "pii": "mask"}
    ]));
    let compiled = common::compiled(&schema);
    let input = json!({
        "amount": "-1234.50", "price": "7.125", "uid": "6f1c2a9e-3b4d-4e5f-8a6b-1c2d3e4f5a6b", "born": -3650,
        "seen": 1_764_150_000_000_000i64, "tier": "B", "code": "\u{1}\u{ff}", "uid_masked": "6f1c2a9e-3b4d-4e5f-8a6b-1c2d3e4f5a6b"
    });
    let mut value = JsonCodec::new(&compiled.writer).to_value(&input).unwrap();
    sanitizer.sanitize(&compiled, &mut value).unwrap();
    assert!(value.validate(&compiled.sanitized));
    let out = JsonCodec::new(&compiled.sanitized).to_json(&value);
    for field in ["amount", "price", "uid", "born", "seen", "tier", "code"] {
        let token = out[field].as_str().unwrap();
        assert_eq!(sanitizer.reveal(field, token).unwrap(), input[field], "{field}");
    }
    assert_eq!(out["uid_masked"], "********************************5a6b");
}

#[test]
fn redacted_values_of_every_type_fit_the_sanitized_schema() {
    let dir = tempfile::tempdir().unwrap();
    let sanitizer = common::sanitizer_at(dir.path());
    let schema = record(json!([
        {"name": "price", "type": {"type": "fixed", "name": "P", "size": 8, "logicalType": "decimal", "precision": 12, "scale": 3}, "pii": "redact"},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}, "pii": "redact"},
        {"name": "uid", "type": {"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}, "pii": "redact"},
        {"name": "suid", "type": {"type": "string", "logicalType": "uuid"}, "pii": "redact"},
        {"name": "born", "type": {"type": "int", "logicalType": "date"}, "pii": "redact"},
        {"name": "seen", "type": {"type": "long", "logicalType": "timestamp-millis"}, "pii": "redact"},
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["A", "B"], "default": "B"}, "pii": "redact"},
        {"name": "home", "type": {"type": "record", "name": "H", "fields": [{"name": "n", "type": "int"}, {"name": "t", "type": "Tier"}]}, "pii": "redact"},
        {"name": "tags", "type": {"type": "map", "values": "string"}, "pii": "redact"},
        {"name": "score", "type": "float", "pii": "redact"}
    ]));
    let compiled = common::compiled(&schema);
    let input = json!({
        "price": "7.125", "amount": "1.50", "uid": "00112233-4455-6677-8899-aabbccddeeff", "suid": "6f1c2a9e-3b4d-4e5f-8a6b-1c2d3e4f5a6b",
        "born": 12, "seen": 99, "tier": "A", "home": {"n": 3, "t": "A"}, "tags": {"a": "b"}, "score": 1.5
    });
    let mut value = JsonCodec::new(&compiled.writer).to_value(&input).unwrap();
    sanitizer.sanitize(&compiled, &mut value).unwrap();
    assert!(
        value.validate(&compiled.sanitized),
        "every redacted value fits its type"
    );
    let out = JsonCodec::new(&compiled.sanitized).to_json(&value);
    assert_eq!(out["tier"], "B", "an enum redacts to its default symbol");
    assert_eq!(out["home"], json!({"n": 0, "t": "B"}));
    assert_eq!(out["amount"], "0.00");
    assert_eq!(out["tags"], json!({}));
}

/// piiwall's own domains and contexts cannot be named by a schema: otherwise the pipeline (or `/v1/tokenize`) would
/// compute the audit trail's subject pseudonyms, or the hashes of record keys, for whoever registers a schema.
#[test]
fn internal_domains_and_contexts_are_reserved() {
    let audit_pseudonym_oracle = json!({"type": "record", "name": "R", "pii.domain": "piiwall.audit", "fields": [
        {"name": "who", "type": "string", "pii": {"action": "hash", "kind": "audit.subject"}}
    ]});
    let (_, problem) = error_of(&audit_pseudonym_oracle.to_string());
    assert!(
        problem.contains("pii.domain must be") && problem.contains("piiwall"),
        "{problem}"
    );
    for (pii, fields) in [
        (json!({"action": "hash", "kind": "audit.subject"}), None),
        (json!({"action": "tokenize", "kind": "kafka.key"}), None),
        (json!({"action": "tokenize", "kind": "email#key"}), None),
        (json!({"action": "tokenize", "kind": "quarantine.value@t/0/1"}), None),
        (json!("hash"), Some("kafka.key")),
    ] {
        let schema = match fields {
            None => record(json!([{"name": "who", "type": "string", "pii": pii}])),
            Some(_) => record(
                json!([{"name": "kafka", "type": {"type": "record", "name": "K", "fields": [
                    {"name": "key", "type": "string", "pii": pii}
                ]}}]),
            ),
        };
        let (_, problem) = error_of(&schema);
        assert!(problem.contains("is reserved"), "{pii}: {problem}");
    }
}

/// Issue 13's friction: a root `pii.subject` naming a field that also says `tokenize` (what a subject gets anyway) is
/// taken; an action that contradicts it is refused with what to write instead.
#[test]
fn a_field_named_by_pii_subject_may_say_tokenize_but_not_a_contradicting_action() {
    let with = |pii: Json| {
        json!({"type": "record", "name": "Customer", "pii.subject": "customer_id", "fields": [
            {"name": "customer_id", "type": "string", "pii": pii},
            {"name": "email", "type": "string", "pii": "hash"}
        ]})
        .to_string()
    };
    for pii in [
        json!("tokenize"),
        json!("subject"),
        json!({"action": "tokenize", "kind": "customer"}),
    ] {
        let compiled = compile(&with(pii.clone()), &PolicySettings::default()).unwrap();
        let subject = compiled
            .plan
            .subject_rule()
            .expect("the subject is the field pii.subject names");
        assert_eq!(
            (subject.path.as_str(), subject.action),
            ("customer_id", Action::Subject),
            "{pii}"
        );
    }
    let kind = compile(
        &with(json!({"action": "tokenize", "kind": "customer"})),
        &PolicySettings::default(),
    )
    .unwrap();
    assert_eq!(
        kind.plan.subject_rule().unwrap().context,
        "customer",
        "the kind is kept"
    );
    for action in ["encrypt", "hash", "redact", "mask"] {
        let (path, problem) = error_of(&with(json!(action)));
        assert_eq!(path, "customer_id");
        assert!(problem.contains(r#"write "pii": "subject""#), "{action}: {problem}");
    }
}

/// Avro reads `{"type": "Person"}` as a reference to `Person`, as Java does; the compiler read it as an opaque
/// type, so the annotated fields of `Person` used there went out in clear (and a redacted one got a string's empty
/// value where a record belongs). Found by the second attacker review of the schema bounds.
#[test]
fn a_type_object_naming_a_type_is_that_type() {
    let person = json!({"type": "record", "name": "Person", "fields": [
        {"name": "ssn", "type": "string", "pii": "encrypt"}
    ]});
    let schema = record(json!([
        {"name": "a", "type": person},
        {"name": "b", "type": {"type": "Person"}},
        {"name": "c", "type": ["null", {"type": "com.acme.Person"}]},
        {"name": "d", "type": {"type": "Person"}, "pii": "redact"}
    ]));
    let compiled = compile(&schema, &PolicySettings::default()).expect("compiles");
    let protected: Vec<&str> = compiled.plan.rules.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(protected, ["a.ssn", "b.ssn", "c.ssn", "d"]);
    let ssn = |value: &str| json!({"ssn": value});
    let record_json =
        json!({"a": ssn("111-11-1111"), "b": ssn("222-22-2222"), "c": ssn("333-33-3333"), "d": ssn("444-44-4444")});
    let out = transcoded(&compiled, &record_json);
    let text = String::from_utf8_lossy(&out);
    for clear in ["111-11-1111", "222-22-2222", "333-33-3333", "444-44-4444"] {
        assert!(!text.contains(clear), "a value of an annotated field went out in clear");
    }
    piiwall::codec::avro::ValueCodec::for_sanitized(&compiled)
        .decode(&out)
        .expect("the output is a record of the sanitized schema");
}

/// Shapes Avro's parser reads otherwise than they look, refused: an `error` type object is a reference to a type
/// named `error` to it, and an array or map carrying one of its logical types a reference to a type named `array` or
/// `map`, whose items it never reads (definitions in them, which the compiler read, could stand in for a real one
/// of the same name).
#[test]
fn shapes_avro_reads_as_references_are_refused() {
    for (schema, problem) in [
        (
            record(json!([
                {"name": "e", "type": "string", "pii": "tokenize"},
                {"name": "named", "type": {"type": "record", "name": "error", "fields": []}},
                {"name": "x", "type": {"type": "error", "name": "Oops", "fields": [{"name": "s", "type": "string"}]}}
            ])),
            "error",
        ),
        (
            record(json!([
                {"name": "e", "type": "string", "pii": "tokenize"},
                {"name": "named", "type": {"type": "record", "name": "array", "fields": []}},
                {"name": "d", "type": {"type": "array", "logicalType": "date", "items": "int"}}
            ])),
            "logicalType",
        ),
        // The same on a record (the third review): Avro reads `b` as the type named `record`, whose `ssn` is
        // annotated; the compiler walked the empty Decoy, and `b.ssn` went out in clear.
        (
            record(json!([
                {"name": "a", "type": {"type": "record", "name": "record", "fields": [
                    {"name": "ssn", "type": "string", "pii": "encrypt"}
                ]}},
                {"name": "b", "type": {"type": "record", "name": "Decoy", "logicalType": "date", "fields": []}}
            ])),
            "logicalType",
        ),
        // An annotation on a type object that wraps another is not on a field: refused, as on any type object
        // (it was dropped, and `x` went out in clear).
        (
            record(json!([
                {"name": "e", "type": "string", "pii": "tokenize"},
                {"name": "x", "type": {"type": {"type": "string"}, "pii": "encrypt"}}
            ])),
            "a type object",
        ),
    ] {
        assert_refused(&schema, &schema, problem);
    }
}

/// Avro keeps `fields` on an enum or a fixed as a plain attribute and never reads it; the compiler defined the
/// records in it, and the first definition of a name won: `q`'s `Person` was the empty decoy to the compiler and
/// the annotated record to Avro, so `q.ssn` went out in clear (the third attacker review).
#[test]
fn records_in_an_enum_s_attributes_define_nothing() {
    let schema = record(json!([
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A"],
            "fields": [{"name": "z", "type": {"type": "record", "name": "Person", "fields": []}}]}},
        {"name": "p", "type": {"type": "record", "name": "Person", "fields": [
            {"name": "ssn", "type": "string", "pii": "encrypt"}
        ]}},
        {"name": "q", "type": "Person"}
    ]));
    let compiled = compile(&schema, &PolicySettings::default()).expect("compiles");
    let protected: Vec<&str> = compiled.plan.rules.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(protected, ["p.ssn", "q.ssn"]);
}

/// A logical type Avro's parser does not apply to the type it is on, which the compiler applied: a redacted value
/// was written in the logical type's form where the plain type's belongs (text in a long, one byte in a double,
/// a length-prefixed decimal in a fixed), output consumers could not read (the third attacker review). Refused.
#[test]
fn logical_types_avro_does_not_apply_are_refused() {
    for ty in [
        json!({"type": "long", "logicalType": "uuid"}),
        json!({"type": "double", "logicalType": "date"}),
        json!({"type": "fixed", "name": "F", "size": 4, "logicalType": "decimal"}),
        json!({"type": "bytes", "logicalType": "decimal", "precision": 2, "scale": 3}),
        json!({"type": "fixed", "name": "G", "size": 8, "logicalType": "uuid"}),
        json!({"type": {"type": "string"}, "logicalType": "uuid"}),
    ] {
        let schema = record(json!([
            {"name": "e", "type": "string", "pii": "tokenize"},
            {"name": "x", "type": ty, "pii": "redact"}
        ]));
        let refused = compile(&schema, &PolicySettings::default());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.path == "x" && e.problem.contains("does not apply")),
            "{schema}: {:?}",
            refused.map(|c| c.plan.rules.len())
        );
    }
    for applies in [
        json!({"type": "string", "logicalType": "uuid"}),
        json!({"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}),
        json!({"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}),
        json!({"type": "long", "logicalType": "timestamp-millis"}),
        json!({"type": "int", "logicalType": "date"}),
        json!({"type": "string", "logicalType": "not-one-of-avro-s"}),
    ] {
        let schema = record(json!([{"name": "x", "type": applies, "pii": "redact"}]));
        compile(&schema, &PolicySettings::default()).unwrap_or_else(|e| panic!("{schema}: {e}"));
    }
}

/// The fourth attacker review of the schema readings: shapes that still got through.
#[test]
fn the_fourth_review_s_schemas_are_refused() {
    // A chain of 60 records holding only a null each reads no byte and was counted as one value of no bytes: 64
    // uses of it in an item of one byte made ~3,900 steps a byte.
    let mut fields = vec![
        json!({"name": "e", "type": "string", "pii": "tokenize"}),
        json!({"name": "c60", "type": {"type": "record", "name": "C60", "fields": [{"name": "f", "type": "null"}]}}),
    ];
    for k in (1..60).rev() {
        fields.push(
            json!({"name": format!("c{k}"), "type": {"type": "record", "name": format!("C{k}"), "fields": [
                {"name": "f", "type": format!("C{}", k + 1)}
            ]}}),
        );
    }
    let mut item = vec![json!({"name": "b", "type": "boolean"})];
    item.extend((0..64).map(|i| json!({"name": format!("z{i}"), "type": "C1"})));
    fields.push(json!({"name": "items", "type": {"type": "array", "items": {
        "type": "record", "name": "Item", "fields": item
    }}}));
    let chained_nulls = record(Json::Array(fields));
    // A fixed of 2^62 bytes, redacted: its zero value was allocated as the schema compiled, and the process aborted.
    let huge_fixed = record(json!([
        {"name": "e", "type": "string", "pii": "tokenize"},
        {"name": "x", "type": {"type": "fixed", "name": "F", "size": 4_611_686_018_427_387_904u64}, "pii": "redact"}
    ]));
    // A decimal Avro does not apply (no precision), defined in a union's branch the compiler never classified and
    // used by name elsewhere: the compiler read `F` as a decimal, Avro as a plain fixed of 4 (5 bytes written where
    // 4 belong, every record misaligned).
    let hidden_decimal = record(json!([
        {"name": "a", "type": ["null", {"type": "fixed", "name": "F", "size": 4, "logicalType": "decimal"}], "pii": "redact"},
        {"name": "b", "type": "F", "pii": "redact"}
    ]));
    for (what, schema, problem) in [
        ("64 uses of a chain of records of nulls", chained_nulls, "take no bytes"),
        ("a fixed of 2^62 bytes", huge_fixed, "at most 1048576 bytes"),
        (
            "a decimal without precision in a branch",
            hidden_decimal,
            "does not apply",
        ),
    ] {
        assert_refused(what, &schema, problem);
    }
}

/// A logical type Avro does not know is ignored by it, and now by the compiler: a redacted double with one took a
/// string's empty value (one byte where eight belong), and mask refused a string with one (`varchar`, as Hive
/// writes). The fourth attacker review.
#[test]
fn a_logical_type_avro_does_not_know_is_the_plain_type() {
    let schema = record(json!([
        {"name": "e", "type": "string", "pii": "tokenize"},
        {"name": "ratio", "type": {"type": "double", "logicalType": "percent"}, "pii": "redact"},
        {"name": "code", "type": {"type": "string", "logicalType": "varchar", "maxLength": 8}, "pii": "mask"}
    ]));
    let compiled = compile(&schema, &PolicySettings::default()).expect("compiles");
    let out = transcoded(&compiled, &json!({"e": "a", "ratio": 0.25, "code": "ABCDEFGH"}));
    piiwall::codec::avro::ValueCodec::for_sanitized(&compiled)
        .decode(&out)
        .expect("the output is a record of the sanitized schema");
}

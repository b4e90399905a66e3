//! The `piiwall` command as a user runs it: separate processes sharing a key store in a working directory.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value as Json;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn piiwall(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    piiwall_env(dir, args, stdin, &[])
}

/// As [`piiwall`], with environment overrides of the config.
fn piiwall_env(dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args(args)
        .current_dir(dir)
        .env_remove("PIIWALL_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run piiwall");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a command's output (stdout or stderr) contains `needle`, showing the output when not.
fn says(output: &[u8], needle: &str) {
    assert!(
        text(output).contains(needle),
        "expected {needle:?} in: {}",
        text(output)
    );
}

fn lines(output: &Output) -> Vec<Json> {
    text(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sanitize_sample(dir: &Path, name: &str) -> Vec<Json> {
    let schema = repo(&format!("schemas/{name}.avsc"));
    let input = repo(&format!("schemas/samples/{name}.jsonl"));
    let out = piiwall(
        dir,
        &[
            "sanitize",
            "--schema",
            schema.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    lines(&out)
}

#[test]
fn tokens_are_stable_across_processes_and_reveal_in_another() {
    let dir = tempfile::tempdir().unwrap();
    let first = sanitize_sample(dir.path(), "customer_profile");
    let second = sanitize_sample(dir.path(), "customer_profile");
    assert_eq!(first.len(), 3);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a["email"], b["email"], "tokenize is deterministic across processes");
        assert_ne!(a["full_name"], b["full_name"], "encrypt never repeats");
    }
    // The KEK file was created once, in the working directory's default place.
    assert!(dir.path().join(".piiwall/kek.key").exists());

    let email = first[0]["email"].as_str().unwrap();
    let name = first[0]["full_name"].as_str().unwrap();
    let out = piiwall(dir.path(), &["reveal", "--field", "email", email], None);
    assert_eq!(text(&out.stdout).trim(), "\"ada.lovelace@example.com\"");
    let out = piiwall(
        dir.path(),
        &["reveal", "--field", "full_name", "-"],
        Some(&format!("{name}\n")),
    );
    assert_eq!(text(&out.stdout).trim(), "\"Ada Lovelace\"");

    // The token an analyst asks for equals the one in the data; the payment schema shares the email kind.
    let schema = repo("schemas/customer_profile.avsc");
    let out = piiwall(
        dir.path(),
        &[
            "tokenize",
            "--schema",
            schema.to_str().unwrap(),
            "--field",
            "email",
            "--subject",
            "cus_0001",
            "ada.lovelace@example.com",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), email);
    let payments = sanitize_sample(dir.path(), "payment");
    assert_eq!(
        payments[0]["customer_email"], first[0]["email"],
        "tokens of one kind join across schemas"
    );
}

#[test]
fn forget_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = sanitize_sample(dir.path(), "customer_profile");
    let email = out[0]["email"].as_str().unwrap();
    let other = out[1]["email"].as_str().unwrap();
    let forget = piiwall(dir.path(), &["forget", "-"], Some("cus_0001\n"));
    assert!(forget.status.success(), "{}", text(&forget.stderr));
    assert!(text(&forget.stdout).contains("1 key version(s) destroyed"));
    assert!(
        !text(&forget.stdout).contains("cus_0001"),
        "the subject id is not echoed"
    );

    let reveal = piiwall(dir.path(), &["reveal", "--field", "email", email, other], None);
    assert_eq!(reveal.status.code(), Some(1));
    says(&reveal.stderr, "token 1: subject forgotten");
    assert_eq!(text(&reveal.stdout).trim(), "\"grace.hopper@example.com\"");

    let again = sanitize_sample(dir.path(), "customer_profile");
    assert_eq!(
        again[0]["email"], "",
        "later records of a forgotten subject are redacted"
    );
    assert_ne!(again[1]["email"], "");
}

#[test]
fn bad_lines_are_reported_by_number_and_path_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let schema = repo("schemas/event.avsc");
    let good = r#"{"id": "e1", "ts": 1, "email": "good@example.com", "phone": "+1 555 0100", "name": "Good Person", "amount": 1.0, "country": "GB", "ip": "203.0.113.0", "card_number": "4111111111111111", "note": "ok"}"#;
    let input = [
        r#"{"id": "e0", "email": "leaked@example.com" "#.to_owned(),
        good.replace("\"good@example.com\"", "12345"),
        good.replace(
            "\"note\": \"ok\"",
            "\"note\": \"ok\", \"leaked@example.com\": \"078-05-1120\"",
        ),
        good.replace(", \"phone\": \"+1 555 0100\"", ""),
        String::new(),
        good.to_owned(),
    ]
    .join("\n");
    let out = piiwall(
        dir.path(),
        &["sanitize", "--schema", schema.to_str().unwrap()],
        Some(&input),
    );
    assert_eq!(out.status.code(), Some(1), "some lines failed");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("line 1: record: not JSON"), "{stderr}");
    assert!(
        stderr.contains("line 2: record: field `email`: expected a string, found a number"),
        "{stderr}"
    );
    // policy.undeclared = "drop" (the default): line 3's undeclared property is left out, and counted.
    assert!(!stderr.contains("line 3:"), "{stderr}");
    assert!(
        stderr.contains("1 properties the schema does not declare were dropped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: record: field `phone`: missing field"),
        "{stderr}"
    );
    assert!(stderr.contains("2 records sanitized, 3 failed"), "{stderr}");
    for secret in [
        "leaked@example.com",
        "12345",
        "078-05-1120",
        "good@example.com",
        "Good Person",
    ] {
        assert!(!stderr.contains(secret), "stderr must not carry values");
    }
    let sanitized = lines(&out);
    assert_eq!(sanitized.len(), 2);
    assert_eq!(sanitized[0]["id"], "e1");
    assert_eq!(sanitized[0].as_object().unwrap().len(), 10, "only declared fields");
    let stdout = text(&out.stdout);
    for secret in ["good@example.com", "leaked@example.com", "078-05-1120"] {
        assert!(!stdout.contains(secret), "the output must not carry {secret}");
    }
}

#[test]
fn kek_problems_stop_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let schema = repo("schemas/event.avsc");
    let schema = schema.to_str().unwrap();
    let run = |envs: &[(&str, &str)]| {
        piiwall_env(
            dir.path(),
            &["sanitize", "--schema", schema, "--input", "/dev/null"],
            None,
            envs,
        )
    };
    let missing = run(&[("PIIWALL_KEYS__KEK", "env:PIIWALL_TEST_NO_SUCH_KEK")]);
    assert_eq!(missing.status.code(), Some(2));
    says(
        &missing.stderr,
        "environment variable PIIWALL_TEST_NO_SUCH_KEK is not set",
    );

    let absent_file = run(&[("PIIWALL_KEYS__KEK", "file:absent.key")]);
    assert_eq!(absent_file.status.code(), Some(2));
    assert!(text(&absent_file.stderr).contains("cannot read key file absent.key"));
    assert!(
        !dir.path().join("absent.key").exists(),
        "an explicitly configured key file is never created"
    );

    std::fs::write(dir.path().join("short.key"), "c2hvcnQ=\n").unwrap();
    let malformed = run(&[("PIIWALL_KEYS__KEK", "file:short.key")]);
    says(&malformed.stderr, "malformed");

    assert!(run(&[]).status.success(), "the default KEK is created");
    let other = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI="; // 32 bytes, not the store's KEK
    let wrong = run(&[
        ("PIIWALL_KEYS__KEK", "env:PIIWALL_TEST_KEK"),
        ("PIIWALL_TEST_KEK", other),
    ]);
    assert_eq!(wrong.status.code(), Some(2));
    says(&wrong.stderr, "open this key store");
    assert!(!text(&wrong.stderr).contains(other));

    let bad_config = run(&[("PIIWALL_KEYS__STORE", "mysql://nope")]);
    says(&bad_config.stderr, "keys.store");
}

#[test]
fn schema_commands() {
    let dir = tempfile::tempdir().unwrap();
    let schemas: Vec<String> = ["customer_profile", "payment", "clickstream", "event", "audit"]
        .iter()
        .map(|s| repo(&format!("schemas/{s}.avsc")).to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["schema", "check"];
    args.extend(schemas.iter().map(String::as_str));
    let out = piiwall(dir.path(), &args, None);
    assert!(out.status.success(), "the examples are clean: {}", text(&out.stdout));
    assert!(text(&out.stdout).contains("5 file(s) checked: 0 error(s), 0 warning(s)"));

    let bad = dir.path().join("bad.avsc");
    std::fs::write(&bad, r#"{"type":"record","name":"R","fields":[{"name":"email","type":"string"},{"name":"x","type":"string","pii":"scramble"}]}"#).unwrap();
    let out = piiwall(dir.path(), &["schema", "check", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.contains("error: field `x`: unknown pii action \"scramble\""),
        "{report}"
    );
    assert!(
        report.contains("warning: field `email`: the name suggests PII"),
        "{report}"
    );

    // Sample records: the unannotated fields the detectors find PII in are named with counts, never the values.
    let samples = dir.path().join("clicks.jsonl");
    std::fs::copy(repo("schemas/samples/clickstream.jsonl"), &samples).unwrap();
    let out = piiwall(
        dir.path(),
        &["schema", "check", &schemas[2], "--sample", samples.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(
        report.contains("warning: field `url`: no annotation protects it, and the email detector found 1 value(s)"),
        "{report}"
    );
    assert!(!report.contains("grace.hopper"), "{report}");
    std::fs::write(&samples, "{\"event_id\": \"e-9\", \"url\": \"mailto:x@example.com\"}\n").unwrap();
    let out = piiwall(
        dir.path(),
        &["schema", "check", &schemas[2], "--sample", samples.to_str().unwrap()],
        None,
    );
    let report = text(&out.stdout);
    assert!(report.contains("error: sample line 1:"), "{report}");
    assert!(
        !report.contains("x@example.com"),
        "a bad sample is not repeated: {report}"
    );

    let out = piiwall(dir.path(), &["schema", "sanitized", &schemas[1]], None);
    let sanitized: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sanitized["pii.sanitized"], true);
    assert!(apache_avro::Schema::parse(&sanitized).is_ok());
}

/// `schema check`, `schema sanitized` and `sanitize` take `.proto` schemas: names that look like PII are linted,
/// the sanitized `.proto` is printed, JSON records described by the message are sanitized.
#[test]
fn schema_commands_take_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let event = repo("schemas/event.proto").to_string_lossy().into_owned();
    let out = piiwall(dir.path(), &["schema", "check", &event], None);
    assert!(out.status.success(), "the example is clean: {}", text(&out.stdout));
    let lax = dir.path().join("lax.proto");
    std::fs::write(&lax, "syntax = \"proto3\";\nimport \"piiwall/pii.proto\";\nmessage R {\n  string email = 1;\n  string x = 2 [(piiwall.pii).action = \"tokenize\"];\n}\n").unwrap();
    let out = piiwall(dir.path(), &["schema", "check", lax.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("warning: field `email`: the name suggests PII"),
        "{}",
        text(&out.stdout)
    );
    let broken = dir.path().join("broken.proto");
    std::fs::write(&broken, "syntax = \"proto3\"; message R { string a = 1 }").unwrap();
    let out = piiwall(dir.path(), &["schema", "check", broken.to_str().unwrap()], None);
    assert!(
        text(&out.stdout).contains("error: not a valid .proto schema"),
        "{}",
        text(&out.stdout)
    );

    let out = piiwall(dir.path(), &["schema", "sanitized", &event], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sanitized = text(&out.stdout);
    assert!(
        sanitized.contains("string email = 3; // pii.applied: tokenize"),
        "{sanitized}"
    );
    assert!(sanitized.contains("int64 ts = 2;"), "{sanitized}");

    let input = dir.path().join("events.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"e1\", \"ts\": 5, \"email\": \"ada@example.com\", \"card_number\": \"4111111111111111\"}\n",
    )
    .unwrap();
    let out = piiwall(
        dir.path(),
        &["sanitize", "--schema", &event, "--input", input.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let record: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert!(record["email"].as_str().unwrap().starts_with("pwt1."), "{record}");
    assert_eq!(record["card_number"], "************1111");
    assert_eq!(record["ts"], 5);
}

/// `piiwall config check FILE` with `env` set (and no other PIIWALL_* variable): (exit code, stdout, stderr).
fn config_check(file: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_piiwall"));
    command.args(["config", "check", file.to_str().unwrap()]);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("PIIWALL_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn config_check_accepts_the_shipped_configs_and_masks_secrets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek.key");
    std::fs::write(&kek, "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n").unwrap();
    let kek_source = format!("file:{}", kek.display());
    let (code, stdout, stderr) = config_check(&root.join("config/piiwall.toml"), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kafka.delivery = at-least-once"), "{stdout}");

    // As docker/compose.yaml runs it: the store, the KEK and the instance's ids from the environment.
    let compose = std::fs::read_to_string(root.join("docker/compose.yaml")).unwrap();
    assert!(compose.contains("PIIWALL_KEYS__STORE") && compose.contains("PIIWALL_KAFKA__TRANSACTIONAL_ID"));
    let (code, stdout, stderr) = config_check(
        &root.join("docker/piiwall.toml"),
        &[
            (
                "PIIWALL_KEYS__STORE",
                "postgres://piiwall:s3cret-pw@postgres:5432/piiwall?sslmode=disable",
            ),
            ("PIIWALL_KEYS__KEK", &kek_source),
            ("PIIWALL_KAFKA__TRANSACTIONAL_ID", "piiwall-1"),
            ("PIIWALL_AUDIT__INSTANCE", "piiwall-1"),
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("kafka.delivery = exactly-once") && stdout.contains("kafka.transactional_id = piiwall-1"));
    assert!(stdout.contains("postgres://piiwall:***@postgres"), "{stdout}");
    assert!(
        !stdout.contains("s3cret-pw") && !stderr.contains("s3cret-pw"),
        "the password is masked"
    );

    // Every TOML example of the README (the sample role config among them).
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty());
    for (index, block) in blocks.iter().enumerate() {
        let file = dir.path().join(format!("readme-{index}.toml"));
        std::fs::write(&file, block).unwrap();
        // The HSM example names its PIN's variable (SoftHSM2's module is there: scripts/test-services installs it).
        let (code, _, stderr) = config_check(&file, &[("PIIWALL_HSM_PIN", "0000")]);
        assert_eq!(code, Some(0), "README toml block {index}: {stderr}");
    }
}

#[test]
fn config_check_rejects_bad_configs_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[kafka]\nbrokerz = \"k:9092\"\n", "unknown field `brokerz`"),
        (
            "[schemas]\nregistry = \"schema-registry:8081\"\n",
            "schemas.registry must be an http:// or https:// URL",
        ),
        (
            "[keys]\nkek = \"file:/nonexistent/kek.key\"\n",
            "the key file /nonexistent/kek.key does not exist",
        ),
        (
            "[keys]\nkek = \"env:PIIWALL_TEST_NO_SUCH_KEK\"\n",
            "PIIWALL_TEST_NO_SUCH_KEK is not set",
        ),
        (
            "[pipeline]\ndrain_timeout_secs = 50\n[kafka.properties]\n\"session.timeout.ms\" = 45000\n",
            "exceeds the consumer session timeout",
        ),
        (
            "[keys]\nstore = \"postgres://u:hunter2@host:notaport/db\"\n",
            "keys.store",
        ),
    ];
    for (index, (text, message)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{index}.toml"));
        std::fs::write(&file, text).unwrap();
        let (code, stdout, stderr) = config_check(&file, &[]);
        assert_eq!(code, Some(2), "{text}: {stdout}{stderr}");
        assert!(stderr.contains(message), "{text}: {stderr}");
        assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"));
    }
}

#[test]
fn local_commands_are_audited_when_brokers_are_configured_and_refused_when_unaudited() {
    use common::kafka::{broker, consume, create_topic, unique};
    use rdkafka::Message;
    let dir = tempfile::tempdir().unwrap();
    let sanitized = sanitize_sample(dir.path(), "customer_profile");
    let email = sanitized[0]["email"].as_str().unwrap();
    let audit_topic = unique("cli-audit");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(create_topic(&audit_topic, 1));
    let brokers = broker();
    let env = [
        ("PIIWALL_KAFKA__BROKERS", brokers.as_str()),
        ("PIIWALL_AUDIT__TOPIC", audit_topic.as_str()),
        ("PIIWALL_AUDIT__INSTANCE", "ops-box"),
        ("USER", "dana"),
    ];
    let run = |args: &[&str], stdin: Option<&str>| piiwall_env(dir.path(), args, stdin, &env);
    let ok = |out: &Output| assert!(out.status.success(), "{}", text(&out.stderr));

    let reveal = run(&["reveal", "--field", "email", "--purpose", "case 7", email], None);
    ok(&reveal);
    assert_eq!(text(&reveal.stdout).trim(), "\"ada.lovelace@example.com\"");
    assert!(!text(&reveal.stderr).contains("not audited"));
    let schema = repo("schemas/customer_profile.avsc");
    let args = [
        "tokenize",
        "--schema",
        schema.to_str().unwrap(),
        "--field",
        "email",
        "--subject",
        "cus_0001",
    ];
    let tokenize = run(&[&args[..], &["ada.lovelace@example.com"]].concat(), None);
    ok(&tokenize);
    assert_eq!(text(&tokenize.stdout).trim(), email);
    ok(&run(&["keys", "rotate", "--subject", "-"], Some("cus_0002\n")));
    ok(&run(
        &["forget", "--purpose", "erasure request", "-"],
        Some("cus_0001\n"),
    ));

    let events = consume(&audit_topic, 6, std::time::Duration::from_secs(30));
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&piiwall::audit::AUDIT_SCHEMA)
        .build()
        .unwrap();
    let decoded: Vec<Json> = events
        .iter()
        .map(|m| {
            piiwall::codec::json::JsonCodec::new(&piiwall::audit::AUDIT_SCHEMA)
                .to_json(&reader.read_value(&mut m.payload().unwrap()).unwrap())
        })
        .collect();
    let kinds: Vec<&str> = decoded.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "REVEAL",
            "TOKENIZE",
            "KEY_ROTATED",
            "FORGET",
            "KEY_SHREDDED",
            "ERASURE_RECEIPT"
        ]
    );
    for event in &decoded[..4] {
        assert_eq!(event["principal"], "cli:dana");
        assert_eq!(event["outcome"], "ALLOWED");
        assert_eq!(event["instance"], "ops-box/cli");
    }
    assert_eq!(decoded[0]["purpose"], "case 7");
    assert_eq!(decoded[0]["field_paths"], serde_json::json!(["email"]));
    assert_eq!(decoded[3]["purpose"], "erasure request");
    assert_eq!(decoded[4]["counts"][0]["count"], 1);
    let pseudonym = |e: &Json| e["subject_token"].as_str().unwrap().to_owned();
    assert_eq!(
        pseudonym(&decoded[1]),
        pseudonym(&decoded[3]),
        "one subject, one pseudonym"
    );
    assert_ne!(pseudonym(&decoded[1]), pseudonym(&decoded[2]));
    assert_eq!(
        pseudonym(&decoded[5]),
        pseudonym(&decoded[3]),
        "the receipt's event names the subject as the forget's does"
    );
    assert_eq!(
        decoded[5]["config_digest"].as_str().map(str::len),
        Some(64),
        "the receipt's SHA-256"
    );
    let raw: Vec<u8> = events.iter().flat_map(|m| m.payload().unwrap().to_vec()).collect();
    let raw = String::from_utf8_lossy(&raw);
    for secret in ["cus_0001", "cus_0002", "ada.lovelace@example.com", email] {
        assert!(
            !raw.contains(secret),
            "an audit event carries a subject id, value or token"
        );
    }
    let verify = run(&["audit", "verify"], None);
    ok(&verify);
    says(&verify.stdout, "6 events from 1 instance(s) in 4 run(s)");
    // The records of processing from the same trail: each call by kind, purpose and principal; no subject.
    let report = run(&["report", "processing", "--since", "2000-01-01", "--json"], None);
    ok(&report);
    let document: Json = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(document["chain_verified"], true);
    let calls = document["calls"].as_array().unwrap();
    let call = |kind: &str, purpose: &str| {
        calls
            .iter()
            .find(|c| c["kind"] == kind && c["purpose"] == purpose && c["principal"] == "cli:dana")
            .map(|c| c["calls"].clone())
    };
    assert_eq!(call("REVEAL", "case 7"), Some(Json::from(1)), "{document}");
    assert_eq!(call("FORGET", "erasure request"), Some(Json::from(1)));
    assert_eq!(document["keys"]["KEY_SHREDDED"], 1);
    for secret in ["cus_0001", "cus_0002", "ada.lovelace@example.com", email] {
        assert!(!text(&report.stdout).contains(secret));
    }
    let text_report = run(&["report", "processing", "--since", "2000-01-01"], None);
    ok(&text_report);
    says(&text_report.stdout, "REVEAL  \"case 7\"  \"cli:dana\"  ALLOWED  1");
    says(&text_report.stdout, "every chain verifies");
    let bad_date = run(&["report", "processing", "--since", "last week"], None);
    assert_eq!(bad_date.status.code(), Some(2));
    says(&bad_date.stderr, "YYYY-MM-DD");

    // Brokers configured but not answering: nothing is revealed.
    let unreachable = [("PIIWALL_KAFKA__BROKERS", "127.0.0.1:9"), env[1], env[2]];
    let other = sanitized[1]["email"].as_str().unwrap();
    let refused = piiwall_env(dir.path(), &["reveal", "--field", "email", other], None, &unreachable);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert_eq!(text(&refused.stdout), "", "no value without its audit event");
    says(&refused.stderr, "reveal refused");
    says(&refused.stderr, &audit_topic);
    // No brokers in the config: offline use, said so.
    let offline = piiwall(dir.path(), &["reveal", "--field", "email", other], None);
    assert!(offline.status.success());
    says(&offline.stderr, "not audited");
}

#[test]
fn a_key_store_restored_from_a_backup_forgets_again() {
    use common::kafka::{broker, create_topic, unique};
    let dir = tempfile::tempdir().unwrap();
    let (control, audit) = (unique("cli-control"), unique("cli-audit"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The control topic is left to the command line, which makes it append-only before its first announcement.
    runtime.block_on(create_topic(&audit, 1));
    let brokers = broker();
    let env = [
        ("PIIWALL_KAFKA__BROKERS", brokers.as_str()),
        ("PIIWALL_KEYS__CONTROL_TOPIC", control.as_str()),
        ("PIIWALL_AUDIT__TOPIC", audit.as_str()),
    ];
    let run = |args: &[&str], stdin: Option<&str>| piiwall_env(dir.path(), args, stdin, &env);
    let email = sanitize_sample(dir.path(), "customer_profile")[0]["email"]
        .as_str()
        .unwrap()
        .to_owned();
    let reveal = || run(&["reveal", "--field", "email", &email], None);
    let store = dir.path().join(".piiwall");
    let backup = dir.path().join("backup");
    // The SQLite key store: its database file and any journal beside it.
    let store_files = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with("keys.db"))
            .collect()
    };
    let copy_store = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for path in store_files(from) {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    };
    copy_store(&store, &backup);

    let forget = run(&["forget", "-"], Some("cus_0001\n"));
    assert!(forget.status.success(), "{}", text(&forget.stderr));
    assert!(
        !text(&forget.stderr).contains("not announced"),
        "{}",
        text(&forget.stderr)
    );
    assert!(text(&reveal().stderr).contains("subject forgotten"));

    // The store comes back from the backup: the forgotten subject's key with it.
    for path in store_files(&store) {
        std::fs::remove_file(path).unwrap();
    }
    copy_store(&backup, &store);
    assert_eq!(
        text(&reveal().stdout).trim(),
        "\"ada.lovelace@example.com\"",
        "the restore undid the forget"
    );

    // Anyone with write access to the control topic could forge the ledger: unsigned or badly signed forgets (of
    // the domain key, of another subject) change nothing.
    let other_scope = {
        let kek = std::fs::read_to_string(store.join("kek.key")).unwrap();
        common::keyring_at_with(&store, &kek).subject_scope("cus_0002")
    };
    let other_email = sanitize_sample(dir.path(), "customer_profile")[1]["email"]
        .as_str()
        .unwrap()
        .to_owned();
    let forged: Vec<common::kafka::Outgoing> = [
        (b"d:default".to_vec(), b"forget".to_vec()),
        (other_scope.clone().into_bytes(), b"forget".to_vec()),
        (
            other_scope.into_bytes(),
            b"forget AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_vec(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (0, Some(key), value, rdkafka::message::OwnedHeaders::new()))
    .collect();
    runtime.block_on(common::kafka::produce(&control, forged));

    let reapply = run(&["keys", "reapply-forgets"], None);
    assert!(reapply.status.success(), "{}", text(&reapply.stderr));
    says(&reapply.stdout, "1 forgotten subject(s)");
    says(&reapply.stdout, "1 key version(s) destroyed again");
    says(&reapply.stderr, "3 message(s)");
    let still = run(&["reveal", "--field", "email", &other_email], None);
    assert!(
        still.status.success(),
        "a forged forget destroyed a key: {}",
        text(&still.stderr)
    );
    let refused = reveal();
    assert_eq!(text(&refused.stdout), "");
    says(&refused.stderr, "subject forgotten");
    let again = run(&["keys", "reapply-forgets"], None);
    says(&again.stdout, "0 key version(s) destroyed again");
    assert!(!text(&again.stdout).contains("cus_0001"));

    // A forget the ledger does not have signed (made before messages were signed, whose announcement is now
    // ignored, or made while the brokers were unreachable) would be undone by the next restore: `publish-forgets`
    // signs onto the ledger every forget the store records and the ledger lacks.
    copy_store(&store, &backup);
    let kek = std::fs::read_to_string(store.join("kek.key")).unwrap();
    assert_eq!(
        common::keyring_at_with(&store, &kek)
            .forget_subject("cus_0002")
            .unwrap(),
        1,
        "forgotten without an announcement"
    );
    let publish = run(&["keys", "publish-forgets"], None);
    assert!(publish.status.success(), "{}", text(&publish.stderr));
    says(&publish.stdout, "1 forget(s) published");
    says(&publish.stdout, "1 already on");
    let republish = run(&["keys", "publish-forgets"], None);
    says(&republish.stdout, "0 forget(s) published");
    for path in store_files(&store) {
        std::fs::remove_file(path).unwrap();
    }
    copy_store(&backup, &store);
    let restored = run(&["reveal", "--field", "email", &other_email], None);
    assert!(restored.status.success(), "the restore undid the second forget");
    let reapplied = run(&["keys", "reapply-forgets"], None);
    says(&reapplied.stdout, "2 forgotten subject(s)");
    says(&reapplied.stdout, "1 key version(s) destroyed again");
    says(
        &run(&["reveal", "--field", "email", &other_email], None).stderr,
        "subject forgotten",
    );
}

/// A leak of sanitized records assessed as GDPR Art. 33(3) asks: each field's protection, records and data subjects
/// (by subject key), the domain keys to rotate; no value, token or key id in the report.
#[test]
fn breach_assess_classifies_every_field_and_counts_subjects_without_quoting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let sanitized = sanitize_sample(dir.path(), "customer_profile");
    let leak = dir.path().join("leak.jsonl");
    let mut lines: Vec<String> = sanitized.iter().map(Json::to_string).collect();
    lines.push(lines[0].clone());
    lines.push("{not json: a line of the leak that does not parse".into());
    std::fs::write(&leak, lines.join("\n")).unwrap();
    let schema = repo("schemas/customer_profile.avsc");
    let args = [
        "breach",
        "assess",
        "--file",
        leak.to_str().unwrap(),
        "--schema",
        schema.to_str().unwrap(),
    ];
    let out = piiwall(dir.path(), &[&args[..], &["--json"]].concat(), None);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a line not assessed: incomplete, said by the exit code; {}",
        text(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 5);
    assert_eq!(report["unreadable_records"], 1);
    let fields = report["a_categories_and_numbers"]["fields"].as_array().unwrap();
    let field = |path: &str| fields.iter().find(|f| f["field"] == path).unwrap().clone();
    assert_eq!(field("email")["protection"], "tokenized");
    assert_eq!(field("email")["records"], 4);
    assert_eq!(field("email")["distinct_keys"], 3, "three customers, one key each");
    assert_eq!(field("email")["keys_by_owner"]["subject keys"], 3);
    assert_eq!(field("full_name")["protection"], "encrypted");
    assert_eq!(field("address.postcode")["protection"], "masked");
    assert_eq!(field("notes")["protection"], "redacted");
    assert_eq!(field("address.city")["protection"], "in clear");
    assert_eq!(report["a_categories_and_numbers"]["data_subjects_by_subject_key"], 3);
    let measures = report["d_measures"].to_string();
    assert!(measures.contains("address.city"), "{measures}");

    let readable = piiwall(dir.path(), &args, None);
    assert_eq!(readable.status.code(), Some(1));
    says(&readable.stdout, "(a) Categories of personal data");
    says(&readable.stdout, "email  tokenized  4  3 subject keys");
    for record in &sanitized {
        for value in ["customer_id", "email", "full_name"] {
            let token = record[value].as_str().unwrap();
            assert!(!text(&out.stdout).contains(token) && !text(&readable.stdout).contains(token));
            assert!(
                !text(&readable.stdout).contains(&token[5..21]),
                "no key id in the report"
            );
        }
    }
    for value in ["London", "4JH", "not json"] {
        assert!(
            !text(&out.stdout).contains(value) && !text(&readable.stdout).contains(value),
            "{value}"
        );
    }
}

/// An export reads topics and is audited before it reveals anything: without brokers in the config it is refused,
/// and a topic that is not one of the pipeline's sanitized topics is refused by name.
#[test]
fn subject_export_needs_brokers_and_the_pipelines_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), "[kafka]\ninputs = [\"orders\"]\n").unwrap();
    let export = |topic: &str| {
        let args = ["--config", "p.toml", "subject", "export", "-", "--topics", topic];
        piiwall(dir.path(), &args, Some("cus_0001\n"))
    };
    let refused = export("orders.sanitized");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    says(&refused.stderr, "the config must name kafka.brokers");
    let foreign = export("payments.sanitized");
    says(
        &foreign.stderr,
        "payments.sanitized is not a sanitized topic of this pipeline",
    );
    for output in [&refused, &foreign] {
        assert!(
            !text(&output.stderr).contains("cus_0001"),
            "the subject id is not echoed"
        );
    }
}

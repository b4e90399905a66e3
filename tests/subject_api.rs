//! The subject-rights API of `piiwall run`, on the real broker (Tansu) with the shared PostgreSQL key store: the
//! role matrix, every call audited, two instances sharing keys, forget reaching every instance, and nothing in
//! clear in the audit events or the servers' logs.

mod common;

use common::kafka::{consume, create_topic, customer, framed, pii_of, produce, unique};
use common::services::{free_port, fresh_database, http, spawn_run, stop};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use piiwall::audit::AUDIT_SCHEMA;
use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use piiwall::stream;
use rdkafka::Message;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use serde_json::{Value as Json, json};

const SCHEMA_ID: u32 = 3;
const SANITIZED_ID: u32 = 1003;

/// The roles of the README's sample: analysts reveal and tokenize contact fields for fraud work; support reveals
/// names and addresses on a customer's request; the privacy officer forgets, answers access requests and rotates.
const ROLES: &str = r#"
[api.roles.analyst]
operations = ["reveal", "tokenize"]
fields = ["email", "phone"]
purposes = ["fraud-investigation"]

[api.roles.support]
operations = ["reveal", "status"]
fields = ["full_name", "address.*"]
purposes = ["customer-request"]

[api.roles.privacy-officer]
operations = ["forget", "status", "rotate"]
purposes = ["gdpr-erasure", "gdpr-access", "key-hygiene"]
"#;

/// Bearer tokens of one test run (random, so a leak is attributable).
struct Tokens {
    alice: String,
    sam: String,
    olga: String,
    expired: String,
}

impl Tokens {
    fn new() -> Self {
        let token = |who: &str| format!("{who}-{:032x}", rand::random::<u128>());
        Self {
            alice: token("alice"),
            sam: token("sam"),
            olga: token("olga"),
            expired: token("old"),
        }
    }

    fn all(&self) -> [&str; 4] {
        [&self.alice, &self.sam, &self.olga, &self.expired]
    }

    fn principals(&self) -> String {
        let principal = |name: &str, token: &str, role: &str, extra: &str| {
            format!(
                "[[api.principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nroles = [\"{role}\"]\n{extra}\n",
                piiwall::api::token_digest_hex(token)
            )
        };
        [
            principal("alice", &self.alice, "analyst", ""),
            principal("sam", &self.sam, "support", ""),
            principal("olga", &self.olga, "privacy-officer", ""),
            principal("old-analyst", &self.expired, "analyst", "expires = \"2020-01-01\""),
        ]
        .concat()
    }
}

/// A deployment of one or more instances: their shared key store and KEK, topics and group.
struct Deployment {
    dir: tempfile::TempDir,
    store: String,
    input: String,
    group: String,
    tokens: Tokens,
    schema: CompiledSchema,
}

impl Deployment {
    async fn new(name: &str, partitions: i32) -> Self {
        let input = unique(name);
        create_topic(&input, partitions).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kek.key"),
            "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
        )
        .unwrap();
        Self {
            dir,
            store: tokio::task::spawn_blocking(fresh_database).await.unwrap(),
            input,
            group: unique("piiwall"),
            tokens: Tokens::new(),
            schema: compile(&common::example("customer_profile.avsc"), &PolicySettings::default()).unwrap(),
        }
    }

    /// Writes the config of instance `name`, serving on `port`; returns its path.
    fn config(&self, name: &str, port: u16) -> PathBuf {
        let text = format!(
            r#"
[keys]
store = "{store}"
kek = "file:{dir}/kek.key"
control_topic = "{input}.control"

[kafka]
brokers = "{broker}"
group_id = "{group}"
inputs = ["{input}"]
quarantine_topic = "{input}.quarantine"

[[schemas.local]]
topic = "{input}"
schema = "{schema}"
id = {SCHEMA_ID}
sanitized_id = {SANITIZED_ID}

[pipeline]
batch_size = 20
commit_interval_ms = 100

[audit]
topic = "{input}.audit"
instance = "{name}"

[http]
listen = "127.0.0.1:{port}"
{ROLES}
{principals}"#,
            store = self.store,
            dir = self.dir.path().display(),
            input = self.input,
            broker = common::kafka::broker(),
            group = self.group,
            schema = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas/customer_profile.avsc")
                .display(),
            principals = self.tokens.principals(),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Customer `i` on `partition`.
    fn record(&self, partition: i32, i: usize) -> common::kafka::Outgoing {
        (
            partition,
            None,
            framed(&self.schema, SCHEMA_ID, &customer(i)),
            OwnedHeaders::new(),
        )
    }

    /// The sanitized record as field name -> value.
    fn decode(&self, message: &OwnedMessage) -> Vec<(String, Value)> {
        let (_, payload) = stream::parse_frame(message.payload().unwrap()).unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema.sanitized)
            .build()
            .unwrap()
            .read_value(&mut &payload[..])
            .unwrap();
        match value {
            Value::Record(fields) => fields,
            other => panic!("not a record: {other:?}"),
        }
    }
}

fn text(fields: &[(String, Value)], path: &str) -> String {
    let mut segments = path.split('.');
    let first = segments.next().unwrap();
    let mut value = &fields.iter().find(|(n, _)| n == first).unwrap().1;
    for segment in segments {
        let Value::Record(inner) = value else { panic!("{path}") };
        value = &inner.iter().find(|(n, _)| n == segment).unwrap().1;
    }
    match value {
        Value::String(s) => s.clone(),
        Value::Union(_, inner) => match &**inner {
            Value::String(s) => s.clone(),
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

/// Every audit event on the topic, as (kind, principal, outcome, whole event as text).
fn audit_events(topic: &str, at_least: usize) -> Vec<(String, Option<String>, Option<String>, String)> {
    consume(topic, at_least, Duration::from_secs(30))
        .iter()
        .map(|m| {
            let value = apache_avro::reader::datum::GenericDatumReader::builder(&AUDIT_SCHEMA)
                .build()
                .unwrap()
                .read_value(&mut m.payload().unwrap())
                .unwrap();
            let Value::Record(fields) = &value else { panic!() };
            let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap();
            let kind = match get("kind") {
                Value::Enum(_, symbol) => symbol,
                other => panic!("{other:?}"),
            };
            let optional = |v: Value| match v {
                Value::Union(_, inner) => match *inner {
                    Value::String(s) | Value::Enum(_, s) => Some(s),
                    _ => None,
                },
                _ => None,
            };
            (
                kind,
                optional(get("principal")),
                optional(get("outcome")),
                format!("{value:?}"),
            )
        })
        .collect()
}

fn post(port: u16, path: &str, token: Option<&str>, body: Json) -> (u16, Json) {
    http(port, "POST", path, token, &body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_allowed_and_denied_exactly_as_configured_and_every_call_is_audited() {
    let deployment = Deployment::new("api-roles", 1).await;
    produce(
        &deployment.input,
        vec![deployment.record(0, 1), deployment.record(0, 2)],
    )
    .await;
    let port = free_port();
    let config = deployment.config("roles", port);
    let child = spawn_run(&config, &deployment.log("roles"), port);
    let output = format!("{}.sanitized", deployment.input);
    let out = tokio::task::spawn_blocking(move || consume(&output, 2, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    let first = deployment.decode(&out[0]);
    let (email, name, street) = (
        text(&first, "email"),
        text(&first, "full_name"),
        text(&first, "address.street"),
    );
    let t = &deployment.tokens;

    let reveal = |token: &str, field: &str, value: &str, purpose: &str| {
        post(
            port,
            "/v1/reveal",
            Some(token),
            json!({"purpose": purpose, "field": field, "tokens": [value]}),
        )
    };
    let subject = |path: &str, token: &str, purpose: &str, who: &str| {
        post(port, path, Some(token), json!({"purpose": purpose, "subject": who}))
    };
    let tokenize = |token: &str, purpose: &str| {
        post(
            port,
            "/v1/tokenize",
            Some(token),
            json!({"purpose": purpose, "topic": deployment.input, "field": "email", "subject": "cus_00001",
                   "value": "person1@example.com"}),
        )
    };
    let rotate = |token: &str, purpose: &str| {
        post(
            port,
            "/v1/keys/rotate",
            Some(token),
            json!({"purpose": purpose, "domain": "default"}),
        )
    };

    // (call, expected status) for every role and endpoint; and what an allowed call answers.
    let (status, answer) = reveal(&t.alice, "email", &email, "fraud-investigation");
    assert_eq!(
        (status, &answer["values"][0]["value"]),
        (200, &json!("person1@example.com"))
    );
    let (status, answer) = tokenize(&t.alice, "fraud-investigation");
    assert_eq!(
        (status, answer["token"].as_str()),
        (200, Some(email.as_str())),
        "the token analysts filter by"
    );
    let (status, answer) = reveal(&t.sam, "full_name", &name, "customer-request");
    assert_eq!((status, &answer["values"][0]["value"]), (200, &json!("Person Number1")));
    let (status, answer) = reveal(&t.sam, "address.street", &street, "customer-request");
    assert_eq!((status, &answer["values"][0]["value"]), (200, &json!("1 Secret Lane")));
    let (status, answer) = subject("/v1/subjects/status", &t.sam, "customer-request", "cus_00001");
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"known": true, "forgotten": false, "key_versions": 1}));
    let (status, answer) = subject("/v1/subjects/status", &t.olga, "gdpr-access", "cus_99999");
    assert_eq!(
        (status, answer),
        (200, json!({"known": false, "forgotten": false, "key_versions": 0}))
    );
    // No record used the default domain's key yet: the first rotation makes version 1.
    let (status, answer) = rotate(&t.olga, "key-hygiene");
    assert_eq!((status, answer["version"].as_u64()), (200, Some(1)));
    let (status, answer) = subject("/v1/subjects/forget", &t.olga, "gdpr-erasure", "cus_00002");
    assert_eq!((status, answer["key_versions_destroyed"].as_u64()), (200, Some(1)));
    let allowed = 8;

    let denied: Vec<(u16, u16)> = vec![
        (reveal(&t.alice, "full_name", &name, "fraud-investigation").0, 403),
        (reveal(&t.alice, "email", &email, "curiosity").0, 403),
        (
            subject("/v1/subjects/forget", &t.alice, "fraud-investigation", "cus_00001").0,
            403,
        ),
        (
            subject("/v1/subjects/status", &t.alice, "fraud-investigation", "cus_00001").0,
            403,
        ),
        (rotate(&t.alice, "fraud-investigation").0, 403),
        (reveal(&t.sam, "email", &email, "customer-request").0, 403),
        (tokenize(&t.sam, "customer-request").0, 403),
        (
            subject("/v1/subjects/forget", &t.sam, "customer-request", "cus_00001").0,
            403,
        ),
        (rotate(&t.sam, "customer-request").0, 403),
        (reveal(&t.olga, "email", &email, "gdpr-access").0, 403),
        (tokenize(&t.olga, "gdpr-access").0, 403),
        (subject("/v1/subjects/forget", &t.olga, "curiosity", "cus_00001").0, 403),
        (reveal(&t.expired, "email", &email, "fraud-investigation").0, 401),
        (
            post(
                port,
                "/v1/reveal",
                None,
                json!({"purpose": "x", "field": "email", "tokens": [email]}),
            )
            .0,
            401,
        ),
        (post(port, "/v1/reveal", Some("not-a-token"), json!({})).0, 401),
    ];
    for (index, (got, want)) in denied.iter().enumerate() {
        assert_eq!(got, want, "denied call {index}");
    }
    let malformed: Vec<(u16, u16)> = vec![
        (http(port, "POST", "/v1/reveal", Some(&t.alice), "{not json").0, 400),
        (
            post(
                port,
                "/v1/reveal",
                Some(&t.alice),
                json!({"purpose": "fraud-investigation", "field": "email",
                "tokens": [email], "subject": "person1@example.com"}),
            )
            .0,
            400,
        ),
        (
            post(
                port,
                "/v1/subjects/status",
                Some(&t.olga),
                json!({"subject": "cus_00001"}),
            )
            .0,
            400,
        ),
        (
            http(port, "POST", "/v1/reveal", Some(&t.alice), &"x".repeat(70_000)).0,
            413,
        ),
    ];
    for (index, (got, want)) in malformed.iter().enumerate() {
        assert_eq!(got, want, "malformed call {index}");
    }
    // A malformed token is reported per token, without echoing it.
    let (status, answer) = reveal(
        &t.alice,
        "email",
        "pwt1.nonsense-person1@example.com",
        "fraud-investigation",
    );
    assert_eq!(status, 200);
    assert!(!answer.to_string().contains("person1@example.com"), "{answer}");

    // CLI parity: the operator verbs talk to the running instance with --server and --token-file.
    let token_file = |name: &str, token: &str| {
        let path = deployment.dir.path().join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        path
    };
    let (alice_file, olga_file) = (token_file("alice.token", &t.alice), token_file("olga.token", &t.olga));
    let cli = |file: &Path, purpose: &str, args: &[&str]| {
        let server = format!("http://127.0.0.1:{port}");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"));
        command.args(args).args([
            "--server",
            &server,
            "--token-file",
            file.to_str().unwrap(),
            "--purpose",
            purpose,
        ]);
        command.output().unwrap()
    };
    let revealed = cli(
        &alice_file,
        "fraud-investigation",
        &["reveal", "--field", "email", &email],
    );
    assert!(
        revealed.status.success(),
        "{}",
        String::from_utf8_lossy(&revealed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&revealed.stdout).trim(),
        "\"person1@example.com\""
    );
    let topic_arg = deployment.input.clone();
    let tokenized = cli(
        &alice_file,
        "fraud-investigation",
        &[
            "tokenize",
            "--topic",
            &topic_arg,
            "--field",
            "email",
            "--subject",
            "cus_00001",
            "person1@example.com",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&tokenized.stdout).trim(),
        email,
        "the CLI's token is the pipeline's"
    );
    let rotated = cli(&olga_file, "key-hygiene", &["keys", "rotate", "--subject", "cus_00001"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    assert!(String::from_utf8_lossy(&rotated.stdout).contains("version 2"));
    let refused = cli(&alice_file, "fraud-investigation", &["forget", "cus_00001"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let (cli_allowed, cli_denied) = (3, 1);

    stop(child);
    let calls = allowed + denied.len() + malformed.len() + 1 + cli_allowed + cli_denied;
    let audit = format!("{}.audit", deployment.input);
    let events = tokio::task::spawn_blocking(move || audit_events(&audit, calls + 10))
        .await
        .unwrap();
    let api_events: Vec<_> = events.iter().filter(|(_, _, outcome, _)| outcome.is_some()).collect();
    assert_eq!(api_events.len(), calls, "every call is audited once");
    let count = |outcome: &str| api_events.iter().filter(|e| e.2.as_deref() == Some(outcome)).count();
    assert_eq!(count("ALLOWED"), allowed + 1 + cli_allowed);
    assert_eq!(count("DENIED"), denied.len() + cli_denied);
    assert_eq!(count("ERROR"), malformed.len());
    assert!(
        events.iter().any(|(kind, _, _, _)| kind == "KEY_SHREDDED"),
        "forget shreds keys, audited"
    );
    assert!(
        events
            .iter()
            .any(|e| e.0 == "KEY_ROTATED" && e.2.as_deref() == Some("ALLOWED"))
    );
    assert!(
        api_events
            .iter()
            .filter(|e| e.2.as_deref() == Some("DENIED"))
            .any(|e| e.1.as_deref() == Some("alice")),
        "denied calls name their principal"
    );

    // Nothing in clear: no PII value and no bearer token in any audit event or in the server's log.
    let log = std::fs::read_to_string(deployment.log("roles")).unwrap();
    assert!(log.contains("api call"), "the log covers the API calls");
    let mut secrets: Vec<String> = [pii_of(1), pii_of(2)].concat();
    secrets.extend(["cus_00001", "cus_00002", "cus_99999"].map(String::from));
    secrets.extend(t.all().map(String::from));
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "the server log shows a secret");
        for (_, _, _, event) in &events {
            assert!(
                !event.contains(secret.as_str()),
                "an audit event shows a secret: {event}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_keys_and_a_forget_on_one_reaches_the_other() {
    let deployment = Deployment::new("api-shared", 2).await;
    let (port_a, port_b) = (free_port(), free_port());
    let a = spawn_run(
        &deployment.config("instance-a", port_a),
        &deployment.log("instance-a"),
        port_a,
    );
    let b = spawn_run(
        &deployment.config("instance-b", port_b),
        &deployment.log("instance-b"),
        port_b,
    );
    // Customer 42 on both partitions, a pair at a time, until each instance has sanitized some (the group has
    // then spread its two partitions over both instances).
    let sanitized_by = |port: u16| -> f64 {
        let metrics = http(port, "GET", "/metrics", None, "").1;
        metrics
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("piiwall_records_total") && l.contains("outcome=\"sanitized\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let started = Instant::now();
    let mut pairs = 0;
    while sanitized_by(port_a) == 0.0 || sanitized_by(port_b) == 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the two instances never both sanitized records"
        );
        produce(
            &deployment.input,
            vec![deployment.record(0, 42), deployment.record(1, 42)],
        )
        .await;
        pairs += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let output = format!("{}.sanitized", deployment.input);
    let out = {
        let output = output.clone();
        tokio::task::spawn_blocking(move || consume(&output, 2 * pairs, Duration::from_secs(60)))
            .await
            .unwrap()
    };
    assert_eq!(out.len(), 2 * pairs);
    let emails: std::collections::BTreeSet<String> = out.iter().map(|m| text(&deployment.decode(m), "email")).collect();
    assert_eq!(
        emails.len(),
        1,
        "one subject, one token, through both instances: {emails:?}"
    );
    let email_42 = emails.into_iter().next().unwrap();
    let t = &deployment.tokens;
    let reveal_on = |port: u16| {
        post(
            port,
            "/v1/reveal",
            Some(&t.alice),
            json!({"purpose": "fraud-investigation", "field": "email", "tokens": [email_42]}),
        )
    };
    assert_eq!(
        reveal_on(port_b).1["values"][0]["value"],
        json!("person42@example.com"),
        "B reveals (and caches)"
    );

    // Forget on A; B must refuse the old token within the stated bound, measured while A's call waits for the
    // instances' acknowledgements; A's answer carries a receipt both instances acknowledged.
    let forgotten_at = Instant::now();
    let bound = Duration::from_secs(2);
    let ((status, answer), refused_after) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            loop {
                let answer = reveal_on(port_b).1;
                if answer["values"][0].get("value").is_none() {
                    assert!(
                        answer["values"][0]["error"].as_str().unwrap().contains("forgotten"),
                        "{answer}"
                    );
                    break forgotten_at.elapsed();
                }
                assert!(
                    forgotten_at.elapsed() < bound,
                    "instance B still reveals after {bound:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let answer = post(
            port_a,
            "/v1/subjects/forget",
            Some(&t.olga),
            json!({"purpose": "gdpr-erasure", "subject": "cus_00042"}),
        );
        (answer, watcher.join().unwrap())
    });
    assert_eq!(status, 200, "{answer}");
    let receipt: piiwall::receipt::ErasureReceipt = serde_json::from_value(answer["receipt"].clone()).unwrap();
    assert_eq!(
        receipt.acknowledged_by,
        vec!["instance-a".to_owned(), "instance-b".to_owned()],
        "both running instances acknowledged dropping the subject's keys"
    );
    assert_eq!(receipt.forgotten_by, "instance-a");
    assert!(receipt.announced);
    assert!(receipt.key_versions_destroyed >= 1);
    assert!(
        !answer.to_string().contains("cus_00042"),
        "the receipt names the subject by pseudonym only"
    );
    // The store's public key, as an operator prints it for whoever checks receipts; the CLI checks the receipt too.
    let config_a = deployment.config("instance-a", port_a);
    let piiwall = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"))
            .arg("--config")
            .arg(&config_a)
            .args(args)
            .output()
            .unwrap()
    };
    let public_key = String::from_utf8(piiwall(&["audit", "pubkey"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let file = deployment.dir.path().join("receipt.json");
    std::fs::write(&file, answer["receipt"].to_string()).unwrap();
    let checked = piiwall(&[
        "audit",
        "verify-receipt",
        file.to_str().unwrap(),
        "--pubkey",
        &public_key,
    ]);
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let mut altered = answer["receipt"].clone();
    altered["key_versions_destroyed"] = json!(0);
    std::fs::write(&file, altered.to_string()).unwrap();
    let refused = piiwall(&[
        "audit",
        "verify-receipt",
        file.to_str().unwrap(),
        "--pubkey",
        &public_key,
    ]);
    assert_eq!(refused.status.code(), Some(1), "an altered receipt does not verify");
    receipt.verify(Some(&public_key)).unwrap();
    println!(
        "forget on A -> B refuses the old token after {} ms",
        refused_after.as_millis()
    );

    // New records of the subject, through both instances, come out redacted.
    produce(
        &deployment.input,
        vec![deployment.record(0, 42), deployment.record(1, 42)],
    )
    .await;
    let out = tokio::task::spawn_blocking(move || consume(&output, 2 * pairs + 2, Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out.len(), 2 * pairs + 2);
    let later: Vec<_> = out
        .iter()
        .filter(|m| m.offset() >= pairs as i64)
        .map(|m| deployment.decode(m))
        .collect();
    assert_eq!(later.len(), 2);
    for fields in &later {
        assert_eq!(
            text(fields, "email"),
            "",
            "a forgotten subject's new records are redacted"
        );
    }

    // Forgotten means gone: the subject's key rows are absent from the shared store, no path reveals its tokens.
    let store = deployment.store.clone();
    let (forgotten, shredded, remaining) = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&store, postgres::NoTls).unwrap();
            let mut count = |sql: &str| -> i64 { client.query_one(sql, &[]).unwrap().get(0) };
            (
                count("SELECT COUNT(*) FROM piiwall_forgotten_scopes"),
                count("SELECT COUNT(*) FROM piiwall_shredded_keys"),
                count("SELECT COUNT(*) FROM piiwall_deks d JOIN piiwall_shredded_keys s ON d.key_id = s.key_id"),
            )
        })
        .join()
        .unwrap()
    })
    .await
    .unwrap();
    assert_eq!((forgotten, shredded, remaining), (1, 1, 0));
    assert!(reveal_on(port_a).1["values"][0].get("value").is_none());
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args([
            "--config",
            deployment.config("cli", 0).to_str().unwrap(),
            "reveal",
            "--field",
            "email",
            &email_42,
        ])
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("forgotten"));
    stop(a);
    stop(b);
    // Neither instance's log shows the subject, its values or a bearer token.
    for name in ["instance-a", "instance-b"] {
        let log = std::fs::read_to_string(deployment.log(name)).unwrap();
        let mut secrets = pii_of(42);
        secrets.push("cus_00042".into());
        secrets.extend(t.all().map(String::from));
        for secret in &secrets {
            assert!(!log.contains(secret.as_str()), "{name}'s log shows a secret");
        }
    }
}

#[test]
fn parallel_first_uses_of_one_subject_on_two_instances_create_one_key() {
    use piiwall::crypto::LocalKek;
    use piiwall::keys::{KeyCacheSettings, Keyring, PostgresStore, RecordKey};
    use std::sync::Arc;

    let url = fresh_database();
    let instance = || {
        let store = Arc::new(PostgresStore::open(&url).unwrap());
        let kek = Arc::new(LocalKek::from_bytes(&common::KEK).unwrap());
        Arc::new(Keyring::open(store, kek, KeyCacheSettings::default()).unwrap())
    };
    let (a, b) = (instance(), instance());
    for round in 0..5 {
        let subject = format!("new-subject-{round}");
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let keyring = if i % 2 == 0 { a.clone() } else { b.clone() };
                let subject = subject.clone();
                std::thread::spawn(move || {
                    let key = if i % 4 < 2 {
                        keyring.subject_key(&subject).unwrap()
                    } else {
                        keyring
                            .prefetch_subjects([subject.as_str()])
                            .unwrap()
                            .get(&subject)
                            .unwrap()
                            .clone()
                    };
                    match key {
                        RecordKey::Active(dek) => dek.key_id,
                        RecordKey::Forgotten => panic!("not forgotten"),
                    }
                })
            })
            .collect();
        let ids: std::collections::BTreeSet<_> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
        assert_eq!(ids.len(), 1, "round {round}: one key for one subject");
    }
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows: i64 = client
        .query_one("SELECT COUNT(*) FROM piiwall_deks WHERE scope LIKE 's:%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 5, "exactly one key row per subject");
    // What `keys publish-forgets` reads: the forgotten subjects' scopes, never a domain's.
    a.forget_subject("new-subject-3").unwrap();
    a.forget_scope(&Keyring::domain_scope("default")).unwrap();
    assert_eq!(
        a.forgotten_subject_scopes().unwrap(),
        [b.subject_scope("new-subject-3")]
    );
    // Quarantine keys expire by the database server's clock, one clock for every instance.
    let server_day: f64 = client
        .query_one("SELECT extract(epoch FROM now())::float8 / 86400", &[])
        .unwrap()
        .get(0);
    assert_eq!(a.store_today().unwrap(), server_day.floor() as u64);
}

#[test]
fn encryption_counts_add_up_across_instances_and_a_store_from_before_them_is_migrated() {
    use piiwall::crypto::LocalKek;
    use piiwall::keys::{BatchKeys, KeyCacheSettings, Keyring, PostgresStore, Retired};
    use std::sync::Arc;

    let url = fresh_database();
    PostgresStore::open(&url).unwrap();
    // As a store made before the usage table existed: schema version 1.
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute("DROP TABLE piiwall_key_usage; DELETE FROM piiwall_schema_version WHERE version > 1")
        .unwrap();
    let instance = || {
        let store = Arc::new(PostgresStore::open(&url).unwrap());
        let kek = Arc::new(LocalKek::from_bytes(&common::KEK).unwrap());
        Keyring::open(store, kek, KeyCacheSettings::default()).unwrap()
    };
    let (a, b) = (instance(), instance());
    let (held_by_a, held_by_b) = (a.domain_key("sales").unwrap(), b.domain_key("sales").unwrap());
    assert_eq!(held_by_a.key_id, held_by_b.key_id);
    let none = BatchKeys::default();
    for _ in 0..6 {
        held_by_a.encrypt("note", b"value");
    }
    assert_eq!(a.retire_worn(&none, 10).unwrap(), [], "6 of 10");
    for _ in 0..4 {
        held_by_b.encrypt("note", b"value");
    }
    assert_eq!(
        b.retire_worn(&none, 10).unwrap(),
        [Retired {
            scope: Keyring::domain_scope("sales"),
            version: 2
        }],
        "both instances' encryptions count"
    );
    held_by_a.encrypt("note", b"value");
    assert_eq!(a.retire_worn(&none, 10).unwrap(), [], "rotated once, by b");
    assert_eq!(a.domain_key("sales").unwrap().version, 2);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM piiwall_deks WHERE scope = 'd:sales' ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
}

//! Subject access export (GDPR Art. 15 and 20) on the real broker (Tansu) with the PostgreSQL key store: a
//! subject's records found across three sanitized topics (two Avro, one plain JSON) with the original values and
//! types of every field the caller may see, none of another subject's, a forgotten subject's records counted as
//! erased; the API's role, field and purpose checks, every call audited, and an export resumed where it stopped.

mod common;

use common::kafka::{consume, create_topic, customer, produce, unique};
use common::services::{free_port, fresh_database, http, spawn_run, stop};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use piiwall::policy::{CompiledSchema, PolicySettings, compile};
use rdkafka::message::OwnedHeaders;
use serde_json::{Value as Json, json};

const PROFILE_ID: u32 = 3;
const PAYMENT_ID: u32 = 4;

/// Customer `i`'s payment and order (its profile is `common::kafka::customer`), with the values an export must give
/// back.
fn payment(i: usize) -> Json {
    json!({
        "payment_id": format!("7f1c2a9e-3b4d-4e5f-8a6b-1c2d3e4f5a{i:02}"),
        "customer_id": format!("cus_{i:05}"),
        "customer_email": format!("person{i}@example.com"),
        "card_number": "4111111111111111",
        "card_holder": format!("Holder Number{i}"),
        "amount": "12.50",
        "currency": "GBP",
        "merchant": "Babbage Books",
        "method": "CARD",
        "created_at": 1_764_150_200_000i64 + i as i64
    })
}

fn order(i: usize) -> Json {
    json!({
        "order_id": format!("ord_{i}"),
        "customer_id": format!("cus_{i:05}"),
        "email": format!("person{i}@example.com"),
        "phone": format!("+44 7700 8{i:05}"),
        "shipping": {"recipient": format!("Recipient Number{i}"), "street": format!("{i} Order Street"), "city": "York",
                     "postcode": "YO1 7HH", "country": "GB"},
        "lines": [{"sku": "ENG-1", "quantity": 2, "unit_price": 18.5, "gift_message": format!("gift {i}")}],
        "attributes": {"referrer": "newsletter"},
        "status": "PAID",
        "placed_at": 1_764_150_000_000i64 + i as i64
    })
}

/// Roles of this test: the privacy officer exports everything; a helpdesk role exports contact fields only; the
/// analyst may not export at all.
const ROLES: &str = r#"
[api.roles.privacy-officer]
operations = ["export", "forget"]
fields = ["**"]
purposes = ["gdpr-access", "gdpr-erasure"]

[api.roles.helpdesk]
operations = ["export"]
fields = ["email", "customer_email"]
purposes = ["gdpr-access"]

[api.roles.analyst]
operations = ["reveal"]
fields = ["email"]
purposes = ["fraud-investigation"]
"#;

struct Deployment {
    dir: tempfile::TempDir,
    store: String,
    prefix: String,
    olga: String,
    helen: String,
    alice: String,
}

impl Deployment {
    async fn new() -> Self {
        let prefix = unique("export");
        for topic in ["profiles", "payments", "orders"] {
            create_topic(&format!("{prefix}.{topic}"), 2).await;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kek.key"),
            "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
        )
        .unwrap();
        let token = |who: &str| format!("{who}-{:032x}", rand::random::<u128>());
        Self {
            dir,
            store: tokio::task::spawn_blocking(fresh_database).await.unwrap(),
            prefix,
            olga: token("olga"),
            helen: token("helen"),
            alice: token("alice"),
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    fn sanitized(&self) -> Vec<String> {
        ["profiles", "payments", "orders"]
            .iter()
            .map(|t| format!("{}.sanitized", self.topic(t)))
            .collect()
    }

    fn config(&self, port: u16) -> PathBuf {
        let schema = |name: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name);
        let principal = |name: &str, token: &str, role: &str| {
            format!(
                "[[api.principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nroles = [\"{role}\"]\n",
                piiwall::api::token_digest_hex(token)
            )
        };
        let text = format!(
            r#"
[keys]
store = "{store}"
kek = "file:{dir}/kek.key"
control_topic = "{prefix}.control"
forget_ack_wait_ms = 0

[kafka]
brokers = "{broker}"
group_id = "{prefix}-group"
inputs = ["{profiles}", "{payments}", "{orders}"]
quarantine_topic = "{prefix}.quarantine"

[[schemas.local]]
topic = "{profiles}"
schema = "{profile_schema}"
id = {PROFILE_ID}

[[schemas.local]]
topic = "{payments}"
schema = "{payment_schema}"
id = {PAYMENT_ID}

[[schemas.local]]
topic = "{orders}"
schema = "{order_schema}"
format = "json"

[pipeline]
batch_size = 20
commit_interval_ms = 100

[audit]
topic = "{prefix}.audit"
instance = "export-test"

[http]
listen = "127.0.0.1:{port}"
{ROLES}
{olga}{helen}{alice}"#,
            store = self.store,
            dir = self.dir.path().display(),
            prefix = self.prefix,
            broker = common::kafka::broker(),
            profiles = self.topic("profiles"),
            payments = self.topic("payments"),
            orders = self.topic("orders"),
            profile_schema = schema("customer_profile.avsc").display(),
            payment_schema = schema("payment.avsc").display(),
            order_schema = schema("order.schema.json").display(),
            olga = principal("olga", &self.olga, "privacy-officer"),
            helen = principal("helen", &self.helen, "helpdesk"),
            alice = principal("alice", &self.alice, "analyst"),
        );
        let path = self.dir.path().join("piiwall.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `piiwall subject export` against the local key store; returns (exit code, document, stderr).
    fn export_locally(&self, config: &Path, subject: &str, extra: &[&str]) -> (i32, Json, String) {
        let output = self.dir.path().join(format!("export-{:x}.json", rand::random::<u32>()));
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "subject",
            "export",
            subject,
            "--topics",
        ];
        let topics = self.sanitized();
        args.extend(topics.iter().map(String::as_str));
        args.extend(["--output", output.to_str().unwrap(), "--purpose", "gdpr-access"]);
        args.extend(extra);
        let run = Command::new(env!("CARGO_BIN_EXE_piiwall"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        let text = std::fs::read_to_string(&output).unwrap_or_else(|_| panic!("no document; stderr: {stderr}"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&output).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the export file is readable by others");
        let document = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        (run.status.code().unwrap_or(-1), document, stderr)
    }
}

fn compiled(name: &str) -> CompiledSchema {
    compile(&common::example(name), &PolicySettings::default()).unwrap()
}

fn avro_record(schema: &CompiledSchema, id: u32, partition: i32, record: &Json) -> common::kafka::Outgoing {
    (
        partition,
        None,
        common::kafka::framed(schema, id, record),
        OwnedHeaders::new(),
    )
}

fn post(port: u16, token: Option<&str>, body: Json) -> (u16, Json) {
    http(port, "POST", "/v1/subjects/export", token, &body.to_string())
}

/// The records of one topic in a document.
fn records_of<'a>(document: &'a Json, topic: &str) -> Vec<&'a Json> {
    document["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["topic"] == topic)
        .collect()
}

fn topic_counts<'a>(document: &'a Json, topic: &str) -> &'a Json {
    document["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == topic)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_records_are_exported_from_three_topics_with_originals_and_forgotten_ones_as_erased() {
    let deployment = Deployment::new().await;
    let (profiles, payments) = (compiled("customer_profile.avsc"), compiled("payment.avsc"));
    // Customer 1 has two profiles; customers 1, 2 and 3 one payment and one order each, over two partitions.
    let mut profile_records = vec![avro_record(&profiles, PROFILE_ID, 0, &customer(1))];
    for i in 1..=3 {
        profile_records.push(avro_record(&profiles, PROFILE_ID, (i % 2) as i32, &customer(i)));
    }
    produce(&deployment.topic("profiles"), profile_records).await;
    produce(
        &deployment.topic("payments"),
        (1..=3)
            .map(|i| avro_record(&payments, PAYMENT_ID, (i % 2) as i32, &payment(i)))
            .collect(),
    )
    .await;
    produce(
        &deployment.topic("orders"),
        (1..=3)
            .map(|i| {
                (
                    (i % 2) as i32,
                    None,
                    order(i).to_string().into_bytes(),
                    OwnedHeaders::new(),
                )
            })
            .collect(),
    )
    .await;
    let port = free_port();
    let config = deployment.config(port);
    let log = deployment.dir.path().join("run.log");
    let child = spawn_run(&config, &log, port);
    let sanitized = deployment.sanitized();
    let wanted = [4usize, 3, 3];
    for (topic, count) in sanitized.iter().zip(wanted) {
        let topic = topic.clone();
        let out = tokio::task::spawn_blocking(move || consume(&topic, count, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(out.len(), count, "sanitized records");
    }

    // Customer 2 is forgotten before the exports.
    let forget = json!({"purpose": "gdpr-erasure", "subject": "cus_00002"});
    let (status, forgotten) = http(
        port,
        "POST",
        "/v1/subjects/forget",
        Some(&deployment.olga),
        &forget.to_string(),
    );
    assert_eq!(status, 200, "{forgotten}");

    // Locally (the operator's command): every record of customer 1, and only those.
    let (code, document, stderr) = deployment.export_locally(&config, "cus_00001", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(document["format"], "piiwall.subject-export/1");
    assert_eq!(document["status"], "known");
    assert_eq!(document["complete"], true);
    let found_profiles = records_of(&document, &sanitized[0]);
    let found_payments = records_of(&document, &sanitized[1]);
    let found_orders = records_of(&document, &sanitized[2]);
    assert_eq!(
        (found_profiles.len(), found_payments.len(), found_orders.len()),
        (2, 1, 1),
        "{document:#}"
    );
    let text = document.to_string();
    for other in [2, 3] {
        for value in [
            format!("cus_{other:05}"),
            format!("person{other}@example.com"),
            format!("Person Number{other}"),
        ] {
            assert!(!text.contains(&value), "another subject's {value} in the export");
        }
    }
    // Original values with their original types; masked and redacted fields say so.
    let value = &found_profiles[0]["value"];
    assert_eq!(value["customer_id"], "cus_00001");
    assert_eq!(value["email"], "person1@example.com");
    assert_eq!(value["full_name"], "Person Number1");
    assert_eq!(value["date_of_birth"], 7001, "an int stays an int");
    assert_eq!(value["address"]["street"], "1 Secret Lane");
    assert_eq!(value["address"]["city"], "Leeds");
    assert_eq!(value["phones"][0]["number"], "+44 7700 900001");
    assert_eq!(found_profiles[0]["not_reversible_fields"]["notes"], "redact");
    assert_eq!(found_profiles[0]["not_reversible_fields"]["address.postcode"], "mask");
    assert_eq!(found_profiles[0]["source"]["topic"], deployment.topic("profiles"));
    assert!(found_profiles[0]["time"].as_str().unwrap().ends_with('Z'));
    let payment = &found_payments[0]["value"];
    assert_eq!(
        (&payment["customer_email"], &payment["card_holder"], &payment["amount"]),
        (&json!("person1@example.com"), &json!("Holder Number1"), &json!("12.50"))
    );
    let order = &found_orders[0]["value"];
    assert_eq!(order["shipping"]["street"], "1 Order Street");
    assert_eq!(order["phone"], "+44 7700 800001");
    assert_eq!(order["lines"][0]["quantity"], 2);
    // Customer 2's records are counted as erased, on every topic; customer 3's are neither found nor erased.
    for (topic, erased) in sanitized.iter().zip([1, 1, 1]) {
        assert_eq!(topic_counts(&document, topic)["erased_records"], erased, "{topic}");
    }

    // The forgotten subject: erased, nothing attributable, the erased records listed by count.
    let (code, erased, stderr) = deployment.export_locally(&config, "cus_00002", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(erased["status"], "erased");
    assert_eq!(erased["records"], json!([]));
    assert_eq!(topic_counts(&erased, &sanitized[0])["erased_records"], 1, "{erased:#}");
    assert!(!erased.to_string().contains("person2@example.com"));

    // Through the API: the privacy officer gets the same records; the helpdesk sees contact fields only.
    let body = |purpose: &str| json!({"purpose": purpose, "subject": "cus_00001", "topics": sanitized});
    let (status, by_api) = post(port, Some(&deployment.olga), body("gdpr-access"));
    assert_eq!(status, 200, "{by_api}");
    assert_eq!(by_api["records"].as_array().unwrap().len(), 4);
    assert_eq!(
        records_of(&by_api, &sanitized[0])[0]["value"]["full_name"],
        "Person Number1"
    );
    let (status, limited) = post(port, Some(&deployment.helen), body("gdpr-access"));
    assert_eq!(status, 200, "{limited}");
    let first = records_of(&limited, &sanitized[0])[0];
    assert_eq!(first["value"]["email"], "person1@example.com");
    assert_eq!(first["value"]["full_name"], Json::Null);
    assert!(
        first["withheld_fields"]
            .as_array()
            .unwrap()
            .contains(&json!("full_name"))
    );
    assert!(
        !limited.to_string().contains("Person Number1"),
        "a withheld field in the answer"
    );

    // The command line through the API: the same records, in one document, the file readable by its owner only.
    let token_file = deployment.dir.path().join("olga.token");
    std::fs::write(&token_file, &deployment.olga).unwrap();
    let server = format!("http://127.0.0.1:{port}");
    let (code, remote, stderr) = deployment.export_locally(
        &config,
        "cus_00001",
        &["--server", &server, "--token-file", token_file.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(coordinates(&remote), coordinates(&by_api));
    assert_eq!(remote["complete"], true);

    // Refused: no role with export, a purpose the role does not allow, an empty purpose, no token, a foreign topic.
    assert_eq!(post(port, Some(&deployment.alice), body("fraud-investigation")).0, 403);
    assert_eq!(post(port, Some(&deployment.helen), body("marketing")).0, 403);
    assert_eq!(post(port, Some(&deployment.olga), body(" ")).0, 400);
    assert_eq!(post(port, None, body("gdpr-access")).0, 401);
    let (status, foreign) = post(
        port,
        Some(&deployment.olga),
        json!({"purpose": "gdpr-access", "subject": "cus_00001", "topics": [format!("{}.audit", deployment.prefix)]}),
    );
    assert_eq!(status, 400);
    assert!(
        !foreign.to_string().contains(&deployment.prefix),
        "the topic echoed: {foreign}"
    );

    // Resumed: one record per call, each call continuing from the last one's resume point, adds up to the whole.
    let mut resume = Json::Null;
    let mut pieces = Vec::new();
    for _ in 0..10 {
        let mut request =
            json!({"purpose": "gdpr-access", "subject": "cus_00001", "topics": sanitized, "max_records": 1});
        if !resume.is_null() {
            request["resume"] = resume.clone();
        }
        let (status, part) = post(port, Some(&deployment.olga), request);
        assert_eq!(status, 200, "{part}");
        pieces.extend(
            part["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["topic"].clone(), r["offset"].clone())),
        );
        if part["complete"] == true {
            resume = Json::Null;
            break;
        }
        resume = part["resume"].clone();
    }
    assert!(resume.is_null(), "the export did not complete in 10 calls");
    let mut whole: Vec<_> = by_api["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["topic"].clone(), r["offset"].clone()))
        .collect();
    pieces.sort_by_key(|p| p.0.to_string() + &p.1.to_string());
    whole.sort_by_key(|p| p.0.to_string() + &p.1.to_string());
    assert_eq!(pieces, whole);

    // Every call audited, allowed or not, with no subject id and no value (each event was acknowledged before its
    // call answered: five seconds read them all).
    let audit = format!("{}.audit", deployment.prefix);
    let events = tokio::task::spawn_blocking(move || consume(&audit, 1_000, Duration::from_secs(5)))
        .await
        .unwrap();
    let events = common::kafka::audit_events(&events);
    let exports: Vec<&Json> = events.iter().filter(|e| e["kind"] == "SUBJECT_EXPORT").collect();
    let outcomes = |outcome: &str| exports.iter().filter(|e| e["outcome"] == outcome).count();
    assert!(outcomes("ALLOWED") >= 4, "{exports:#?}");
    assert_eq!(outcomes("DENIED"), 3, "{exports:#?}");
    // A call refused for its role or purpose names the topics it asked for (one without a token is refused before
    // its body is read).
    let refused: Vec<_> = exports
        .iter()
        .filter(|e| e["outcome"] == "DENIED" && !e["principal"].is_null())
        .collect();
    assert_eq!(refused.len(), 2);
    for denied in refused {
        assert_eq!(
            denied["field_paths"],
            json!(sanitized),
            "a denied export names the topics asked for"
        );
    }
    assert!(outcomes("ERROR") >= 2, "{exports:#?}");
    let audited = serde_json::to_string(&exports).unwrap();
    for value in ["cus_00001", "person1@example.com", "Person Number1", &deployment.olga] {
        assert!(!audited.contains(value), "{value} in an audit event");
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    for value in ["cus_00001", "person1@example.com", "Person Number1"] {
        assert!(!log_text.contains(value), "{value} in the log");
    }
    stop(child);
}

/// The (topic, partition, offset) of every record of a document, sorted: partitions are read in no set order.
fn coordinates(document: &Json) -> Vec<(String, i64, i64)> {
    let mut found: Vec<_> = document["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["topic"].as_str().unwrap().to_owned(),
                r["partition"].as_i64().unwrap(),
                r["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

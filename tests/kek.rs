//! The KEK in an HSM, through PKCS#11, on a real one: SoftHSM2, whose token scripts/test-services initialises
//! (`PIIWALL_TEST_PKCS11_MODULE`, `SOFTHSM2_CONF`). Each test makes its own non-extractable AES key in the token.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use piiwall::crypto::{KekProvider, KekSet, LocalKek, Pkcs11Kek, Pkcs11Location, SecretSource};
use piiwall::keys::{KeyCacheSettings, KeyStore, Keyring, RecordKey, SqliteStore};

use common::keks::{PIN, TOKEN, module, new_hsm_key};

/// A file holding `pin`, as an operator's secret mount would (the tests never set environment variables: SoftHSM2
/// reads the environment from C on other test threads).
fn pin_file(pin: &str) -> PathBuf {
    let path = std::env::temp_dir().join(common::kafka::unique("piiwall-test-pin"));
    std::fs::write(&path, format!("{pin}\n")).unwrap();
    path
}

fn good_pin() -> &'static Path {
    static PIN_FILE: OnceLock<PathBuf> = OnceLock::new();
    PIN_FILE.get_or_init(|| pin_file(PIN))
}

fn location(key_label: &str, pin: SecretSource) -> Pkcs11Location {
    Pkcs11Location {
        module: module(),
        token: TOKEN.into(),
        key_label: key_label.into(),
        pin,
    }
}

fn hsm(label: &str) -> Box<dyn KekProvider> {
    Box::new(Pkcs11Kek::open(&location(label, SecretSource::File(good_pin().to_owned()))).unwrap())
}

fn local(byte: u8) -> Box<dyn KekProvider> {
    Box::new(LocalKek::from_bytes(&[byte; 32]).unwrap())
}

fn keyring(store: &Arc<SqliteStore>, current: Box<dyn KekProvider>, previous: Vec<Box<dyn KekProvider>>) -> Keyring {
    Keyring::open(
        store.clone(),
        Arc::new(KekSet::new(current, previous).unwrap()),
        KeyCacheSettings::default(),
    )
    .unwrap()
}

fn key_ids(ring: &Keyring, subjects: &[String]) -> Vec<[u8; 12]> {
    subjects
        .iter()
        .map(|s| match ring.subject_key(s).unwrap() {
            RecordKey::Active(dek) => dek.key_id.0,
            RecordKey::Forgotten => panic!("not forgotten"),
        })
        .collect()
}

#[test]
fn keys_wrapped_in_the_hsm_survive_a_restart_and_name_their_kek() {
    let label = new_hsm_key();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let subjects: Vec<String> = (0..50).map(|i| format!("customer-{i}")).collect();
    let made = key_ids(&keyring(&store, hsm(&label), vec![]), &subjects);
    let stored = store.keys_after(None, 100).unwrap();
    assert_eq!(stored.len(), 50);
    let id = format!("pkcs11:{TOKEN}/{label}");
    assert!(
        stored
            .iter()
            .all(|key| KekSet::wrapped_by(&key.wrapped) == Some(id.as_str()))
    );
    // A restart: a new session, the same keys.
    let again = keyring(&store, hsm(&label), vec![]);
    assert_eq!(key_ids(&again, &subjects), made);
    for key in &stored {
        assert!(again.key_by_id(key.key_id).is_ok());
    }
    // Another KEK does not open the store.
    let other = new_hsm_key();
    let refused = Keyring::open(
        store.clone(),
        Arc::new(KekSet::new(hsm(&other), vec![]).unwrap()),
        KeyCacheSettings::default(),
    );
    let refused = refused.err().expect("another KEK is refused").to_string();
    assert!(
        refused.contains(&id) && refused.contains("keys.kek_previous"),
        "{refused}"
    );
}

#[test]
fn a_store_moves_from_a_key_file_to_the_hsm_and_back_and_every_key_still_opens() {
    let label = new_hsm_key();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
    let subjects: Vec<String> = (0..20).map(|i| format!("customer-{i}")).collect();
    let made = key_ids(&keyring(&store, local(7), vec![]), &subjects);
    keyring(&store, local(7), vec![]).forget_subject("customer-3").unwrap();

    // To the HSM: both KEKs configured, rewrap, then the HSM alone.
    let moving = keyring(&store, hsm(&label), vec![local(7)]);
    let done = moving.rewrap(7, |_| {}).unwrap();
    assert_eq!(
        (done.rewrapped, done.gone),
        (19, 0),
        "every live key, not the forgotten one's"
    );
    let in_hsm = keyring(&store, hsm(&label), vec![]);
    let again: Vec<_> = subjects.iter().filter(|s| *s != "customer-3").cloned().collect();
    let expected: Vec<_> = made
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(key_ids(&in_hsm, &again), expected);
    assert!(
        matches!(in_hsm.subject_key("customer-3").unwrap(), RecordKey::Forgotten),
        "forgotten stays forgotten"
    );

    // And back, by the command line.
    let key_file = dir.path().join("kek.key");
    std::fs::write(&key_file, base64_of(&[9; 32])).unwrap();
    let config = write_config(
        dir.path(),
        &format!("file:{}", key_file.display()),
        &[&format!("pkcs11:{label}")],
    );
    let stdout = rewrap(&config, 5);
    assert!(stdout.contains("rewrapped 19 key(s)"), "{stdout}");
    let back = keyring(&store, local(9), vec![]);
    assert_eq!(key_ids(&back, &again), expected);
}

#[test]
fn a_wrong_pin_or_an_unknown_key_label_is_named_and_the_pin_never_shown() {
    let label = new_hsm_key();
    // In a process of its own: PKCS#11 login belongs to the whole process, and this test process may be logged in.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("pkcs11:{label}"), &[])
        .to_str()
        .unwrap()
        .to_owned();
    let text = std::fs::read_to_string(&config).unwrap();
    let wrong = pin_file("987654");
    std::fs::write(
        &config,
        text.replace(&good_pin().display().to_string(), &wrong.display().to_string()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args(["--config", &config, "keys", "rewrap"])
        .output()
        .unwrap();
    let wrong_pin = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{wrong_pin}");
    assert!(
        wrong_pin.contains("is the PIN right?")
            && wrong_pin.contains("keys.pkcs11")
            && wrong_pin.contains("PIN is incorrect"),
        "{wrong_pin}"
    );
    assert!(!wrong_pin.contains("987654"), "{wrong_pin}");
    let unknown = Pkcs11Kek::open(&location("no-such-key", SecretSource::File(good_pin().to_owned())))
        .err()
        .unwrap()
        .to_string();
    assert!(unknown.contains("no secret key labelled no-such-key"), "{unknown}");
    let no_pin = Pkcs11Kek::open(&location(&label, SecretSource::Env("PIIWALL_TEST_UNSET_PIN".into())))
        .err()
        .unwrap()
        .to_string();
    assert!(
        no_pin.contains("keys.pkcs11.pin") && no_pin.contains("PIIWALL_TEST_UNSET_PIN"),
        "{no_pin}"
    );
}

/// `piiwall keys rewrap` with `config`, `batch` keys per page; its standard output, once it succeeded.
fn rewrap(config: &Path, batch: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "keys",
            "rewrap",
            "--batch",
            &batch.to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn write_config(dir: &Path, kek: &str, previous: &[&str]) -> PathBuf {
    let previous: Vec<String> = previous.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        "[keys]\nstore = {store:?}\nkek = {kek:?}\nkek_previous = [{previous}]\n\n[keys.pkcs11]\nmodule = {module:?}\n\
         token = {TOKEN:?}\npin = {pin:?}\n\n[keys.aws_kms]\nregion = \"us-east-1\"\nendpoint = {aws:?}\n",
        store = format!("sqlite:{}", dir.join("keys.db").display()),
        previous = previous.join(", "),
        module = module().display().to_string(),
        pin = format!("file:{}", good_pin().display()),
        aws = std::env::var("PIIWALL_TEST_AWS").unwrap_or_default(),
    );
    let path = dir.join("piiwall.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// AWS KMS as the KEK, on moto's KMS (`PIIWALL_TEST_AWS`; scripts/test sets moto's dummy credentials and region).
#[cfg(feature = "aws-kms")]
mod aws {
    use std::io::ErrorKind as IoErrorKind;
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use piiwall::crypto::{AwsKmsKek, AwsKmsLocation};
    use piiwall::error::{ErrorKind, KeyError};

    use super::*;

    use common::keks::{endpoint, kms_admin, new_kms_key};

    fn kms_at(key: &str, endpoint: String) -> AwsKmsLocation {
        AwsKmsLocation {
            key: key.into(),
            region: Some("us-east-1".into()),
            endpoint: Some(endpoint),
        }
    }

    fn kms(key: &str) -> Box<dyn KekProvider> {
        Box::new(AwsKmsKek::open(&kms_at(key, endpoint()), true).unwrap())
    }

    #[test]
    fn keys_wrapped_in_aws_kms_survive_a_restart_and_a_row_moved_onto_another_does_not_open() {
        let key = new_kms_key();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let subjects: Vec<String> = (0..200).map(|i| format!("customer-{i}")).collect();
        // One batch's new subjects: their wraps go to KMS together.
        let batch = keyring(&store, kms(&key), vec![])
            .prefetch_subjects(subjects.iter().map(String::as_str))
            .unwrap();
        assert_eq!(batch.created, 200);
        let stored = store.keys_after(None, 1000).unwrap();
        assert_eq!(stored.len(), 200);
        let id = format!("aws-kms:{key}");
        assert!(
            stored
                .iter()
                .all(|k| KekSet::wrapped_by(&k.wrapped) == Some(id.as_str()))
        );
        // Named through an alias, the KEK is still the key's ARN: pointing the alias elsewhere later does not
        // change what opens these keys.
        let alias = format!("alias/{}", common::kafka::unique("piiwall"));
        kms_admin(async |kms| {
            kms.create_alias()
                .alias_name(&alias)
                .target_key_id(&key)
                .send()
                .await
                .unwrap()
        });
        assert_eq!(AwsKmsKek::open(&kms_at(&alias, endpoint()), true).unwrap().id(), id);
        let made = key_ids(&keyring(&store, kms(&key), vec![]), &subjects);
        let again = keyring(&store, kms(&key), vec![]);
        assert_eq!(key_ids(&again, &subjects), made, "a restart reads the same keys");
        // The encryption context binds each wrapped key to its row: one row's bytes on another do not decrypt.
        let (a, b) = (&stored[0], &stored[1]);
        assert!(store.replace_wrapped(&b.key_id, &b.wrapped, &a.wrapped).unwrap());
        let moved = keyring(&store, kms(&key), vec![])
            .key_by_id(b.key_id)
            .err()
            .unwrap()
            .to_string();
        assert!(moved.contains("fails authentication"), "{moved}");
        assert!(keyring(&store, kms(&key), vec![]).key_by_id(a.key_id).is_ok());
    }

    #[test]
    fn a_store_moves_from_a_key_file_to_the_hsm_to_aws_kms_and_back_and_forgotten_stays_forgotten() {
        let (label, key) = (new_hsm_key(), new_kms_key());
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let subjects: Vec<String> = (0..30).map(|i| format!("customer-{i}")).collect();
        let made = key_ids(&keyring(&store, local(7), vec![]), &subjects);
        keyring(&store, hsm(&label), vec![local(7)]).rewrap(8, |_| {}).unwrap();
        // Forgotten while the store is under the HSM, then on to KMS by the command line.
        keyring(&store, hsm(&label), vec![])
            .forget_subject("customer-5")
            .unwrap();
        let config = write_config(dir.path(), &format!("aws-kms:{key}"), &[&format!("pkcs11:{label}")]);
        let stdout = rewrap(&config, 7);
        assert!(stdout.contains("rewrapped 29 key(s)"), "{stdout}");
        // Under the store's wrapping key, which KMS wraps (the default with AWS KMS).
        let under = format!("aws-kms:{key}+wk:");
        assert!(
            store
                .keys_after(None, 1000)
                .unwrap()
                .iter()
                .all(|k| KekSet::wrapped_by(&k.wrapped).is_some_and(|id| id.starts_with(&under)))
        );
        // And back to a key file, with KMS as the previous KEK.
        let key_file = dir.path().join("new.key");
        std::fs::write(&key_file, base64_of(&[9; 32])).unwrap();
        let kek = format!("file:{}", key_file.display());
        let back = Keyring::from_config(&keys_config(dir.path(), &kek, &[&format!("aws-kms:{key}")], None)).unwrap();
        assert_eq!(back.rewrap(10, |_| {}).unwrap().rewrapped, 29);
        let back = keyring(&store, local(9), vec![]);
        let live: Vec<String> = subjects.iter().filter(|s| *s != "customer-5").cloned().collect();
        let expected: Vec<_> = made
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 5)
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(key_ids(&back, &live), expected);
        assert!(matches!(back.subject_key("customer-5").unwrap(), RecordKey::Forgotten));
    }

    #[test]
    fn an_unknown_kms_key_is_fatal_and_named_and_an_unreachable_kms_is_waited_for() {
        let unknown = AwsKmsKek::open(&kms_at("alias/no-such-key", endpoint()), true)
            .err()
            .unwrap();
        let said = unknown.to_string();
        assert_eq!(unknown.kind(), ErrorKind::Fatal, "{said}");
        assert!(
            said.contains("aws-kms:alias/no-such-key") && said.contains("NotFoundException"),
            "{said}"
        );
        assert!(said.contains("keys.kek"), "{said}");

        // A disabled, pending-deletion or denied key: moto does not enforce key states or IAM on Encrypt; the
        // classification of those codes is a unit test of src/crypto/aws_kms.rs.
        let key = new_kms_key();
        // No credentials anywhere in the AWS chain: a refusal, named, not an outage to wait for.
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &format!("aws-kms:{key}"), &[]);
        let out = Command::new(env!("CARGO_BIN_EXE_piiwall"))
            .args(["--config", config.to_str().unwrap(), "keys", "rewrap"])
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{said}");
        assert!(
            said.contains("refused") && said.contains("no providers in chain provided credentials"),
            "{said}"
        );

        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let unreachable = AwsKmsKek::open(&kms_at(&key, format!("http://{closed}")), true)
            .err()
            .unwrap();
        assert!(matches!(unreachable, KeyError::StoreUnavailable(_)), "{unreachable}");
        assert_eq!(unreachable.kind(), ErrorKind::Retriable);
    }

    /// A TCP relay to moto that can be cut (every connection closed, new ones refused) and restored: KMS going away
    /// and coming back, in front of the real server.
    struct Relay {
        address: std::net::SocketAddr,
        down: Arc<AtomicBool>,
        open: Arc<Mutex<Vec<TcpStream>>>,
    }

    impl Relay {
        fn start(target: &str) -> Relay {
            let target = target.trim_start_matches("http://").to_owned();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let relay = Relay {
                address: listener.local_addr().unwrap(),
                down: Arc::default(),
                open: Arc::default(),
            };
            let (down, open) = (relay.down.clone(), relay.open.clone());
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    if down.load(Ordering::SeqCst) {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let mut open = open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Write);
                        });
                    }
                }
            });
            relay
        }

        fn cut(&self) {
            self.down.store(true, Ordering::SeqCst);
            for stream in self.open.lock().unwrap().drain(..) {
                match stream.shutdown(Shutdown::Both) {
                    Ok(()) => {}
                    Err(e) if e.kind() == IoErrorKind::NotConnected => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }

        fn restore(&self) {
            self.down.store(false, Ordering::SeqCst);
        }
    }

    #[test]
    fn while_kms_is_down_known_subjects_go_on_and_new_ones_wait_until_it_is_back() {
        let key = new_kms_key();
        let relay = Relay::start(&endpoint());
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let kek = Box::new(AwsKmsKek::open(&kms_at(&key, format!("http://{}", relay.address)), true).unwrap());
        let ring = keyring(&store, kek, vec![]);
        let known: Vec<String> = (0..20).map(|i| format!("known-{i}")).collect();
        let made = key_ids(&ring, &known);

        relay.cut();
        assert_eq!(key_ids(&ring, &known), made, "known subjects are served from the cache");
        let started = Instant::now();
        let waiting = ring
            .prefetch_subjects(["new-1", "new-2"])
            .err()
            .expect("a new subject needs KMS");
        assert!(matches!(waiting, KeyError::StoreUnavailable(_)), "{waiting}");
        assert_eq!(
            waiting.kind(),
            ErrorKind::Retriable,
            "the batch waits and retries: nothing is quarantined"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a KMS call gives up in bounded time"
        );
        assert!(
            store.keys_after(None, 100).unwrap().len() == 20,
            "no key stored without its wrap"
        );

        relay.restore();
        let batch = ring.prefetch_subjects(["new-1", "new-2"]).unwrap();
        assert_eq!(batch.created, 2);
    }

    /// A pipeline's config with the KEK in KMS (and `previous` KEKs), as TOML.
    fn kms_pipeline_toml(dir: &Path, input: &str, kms_endpoint: &str, key: &str, previous: &str, port: u16) -> String {
        format!(
            r#"
[keys]
store = "sqlite:{dir}/keys.db"
kek = "aws-kms:{key}"
kek_previous = [{previous}]
# The wrapping key is read again from KMS every second, so a KMS cut mid-stream is felt at once.
cache_ttl_secs = 1
control_topic = "{input}.control"

[keys.aws_kms]
region = "us-east-1"
endpoint = "{kms_endpoint}"

[kafka]
brokers = "{brokers}"
group_id = "{group}"
inputs = ["{input}"]
quarantine_topic = "{input}.quarantine"

[[schemas.local]]
topic = "{input}"
schema = "{manifest}/schemas/customer_profile.avsc"
id = 1

[pipeline]
batch_size = 10
commit_interval_ms = 100
drain_timeout_secs = 5

[audit]
topic = "{input}.audit"

[http]
listen = "127.0.0.1:{port}"
"#,
            dir = dir.display(),
            brokers = common::kafka::broker(),
            group = common::kafka::unique("piiwall"),
            manifest = env!("CARGO_MANIFEST_DIR"),
        )
    }

    fn kms_pipeline_config(
        dir: &Path,
        input: &str,
        kms_endpoint: &str,
        key: &str,
        port: u16,
    ) -> piiwall::config::Config {
        let text = kms_pipeline_toml(dir, input, kms_endpoint, key, "", port);
        piiwall::config::Config::parse(&text, std::iter::empty(), "KMS test config").unwrap()
    }

    fn customers(range: std::ops::Range<usize>) -> Vec<common::kafka::Outgoing> {
        let schema = common::compiled(&common::example("customer_profile.avsc"));
        range
            .map(|i| {
                (
                    0,
                    None,
                    common::kafka::framed(&schema, 1, &common::kafka::customer(i)),
                    Default::default(),
                )
            })
            .collect()
    }

    fn source_offsets(messages: &[rdkafka::message::OwnedMessage]) -> std::collections::BTreeSet<i64> {
        messages
            .iter()
            .map(|m| {
                let offset = common::kafka::header(m, piiwall::stream::SOURCE_OFFSET).expect("source offset");
                std::str::from_utf8(offset).unwrap().parse().unwrap()
            })
            .collect()
    }

    /// Start-up with KMS unreachable waits (and `/readyz` says for what) instead of failing; then, KMS cut while
    /// records of new subjects arrive, their batches wait and nothing is quarantined; every record arrives once KMS
    /// is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kms_outage_at_start_up_or_mid_stream_is_waited_out_and_loses_nothing() {
        let key = tokio::task::spawn_blocking(new_kms_key).await.unwrap();
        let relay = Relay::start(&endpoint());
        relay.cut();
        let dir = tempfile::tempdir().unwrap();
        let input = common::kafka::unique("kms-outage");
        common::kafka::create_topic(&input, 1).await;
        let port = common::services::free_port();
        let config = kms_pipeline_config(dir.path(), &input, &format!("http://{}", relay.address), &key, port);
        let shutdown = piiwall::stream::Shutdown::new();
        let task = tokio::spawn(piiwall::server::run(config, shutdown.clone()));

        let readyz = move || common::services::http(port, "GET", "/readyz", None, "");
        let started = Instant::now();
        loop {
            let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            let (status, body) = match listening {
                true => tokio::task::spawn_blocking(readyz).await.unwrap(),
                false => (0, serde_json::Value::Null),
            };
            if status == 503
                && body
                    .as_str()
                    .is_some_and(|b| b.contains("waiting for the key store or the KEK"))
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "/readyz said {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!task.is_finished(), "start-up waits for KMS");

        common::kafka::produce(&input, customers(0..20)).await;
        relay.restore();
        let output = format!("{input}.sanitized");
        let reader = output.clone();
        let first = tokio::task::spawn_blocking(move || common::kafka::consume(&reader, 20, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(source_offsets(&first), (0..20).collect());
        let (status, _) = tokio::task::spawn_blocking(readyz).await.unwrap();
        assert_eq!(status, 200);

        // KMS cut mid-stream, past the wrapping key's TTL (1 s): the batches wait (nothing is quarantined, nothing
        // passes), then every record arrives.
        relay.cut();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut mixed = customers(20..40);
        mixed.extend(customers(0..10));
        common::kafka::produce(&input, mixed).await;
        let reader = output.clone();
        let during = tokio::task::spawn_blocking(move || common::kafka::consume(&reader, 21, Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(during.len(), 20, "while KMS is cut, no batch passes");
        relay.restore();
        let reader = output.clone();
        let all = tokio::task::spawn_blocking(move || common::kafka::consume(&reader, 50, Duration::from_secs(90)))
            .await
            .unwrap();
        assert_eq!(source_offsets(&all), (0..50).collect());
        let quarantine = format!("{input}.quarantine");
        let quarantined = tokio::task::spawn_blocking(move || {
            common::kafka::consume_from(common::kafka::reader(&quarantine), 1, Duration::from_secs(3))
        })
        .await
        .unwrap();
        assert!(quarantined.is_empty(), "an outage quarantines nothing");
        shutdown.trigger();
        task.await.unwrap().expect("a clean stop");
    }

    /// KEK rotation while `run` works: an instance configured with KMS as its KEK and the old key file as previous
    /// sanitizes a stream of known and new subjects while `piiwall keys rewrap` moves the store to KMS. Every record
    /// arrives, and afterwards KMS alone opens every key (so every token issued before, during and after reveals).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rewrap_to_kms_while_run_streams_loses_nothing_and_every_key_opens_under_kms_alone() {
        let key = tokio::task::spawn_blocking(new_kms_key).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("old.key");
        std::fs::write(&key_file, base64_of(&[7; 32])).unwrap();
        // The store as it was under the key file: keys of 30 subjects, customers 0..30.
        let store = Arc::new(SqliteStore::open(&dir.path().join("keys.db")).unwrap());
        let before = keyring(&store, local(7), vec![]);
        let known: Vec<String> = (0..30)
            .map(|i| common::kafka::customer(i)["customer_id"].as_str().unwrap().to_owned())
            .collect();
        key_ids(&before, &known);
        drop(before);

        let input = common::kafka::unique("kms-rewrap");
        common::kafka::create_topic(&input, 1).await;
        let previous = format!("{:?}", format!("file:{}", key_file.display()));
        let text = kms_pipeline_toml(
            dir.path(),
            &input,
            &endpoint(),
            &key,
            &previous,
            common::services::free_port(),
        );
        let config_path = dir.path().join("piiwall.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = piiwall::config::Config::parse(&text, std::iter::empty(), "KMS rewrap config").unwrap();
        let shutdown = piiwall::stream::Shutdown::new();
        let task = tokio::spawn(piiwall::server::run(config, shutdown.clone()));

        // Known and new subjects interleaved, in three waves, the rewrap running meanwhile: it starts once `run` has
        // sanitized the first wave, and rewraps one key per page.
        common::kafka::produce(&input, customers(0..20)).await;
        let output = format!("{input}.sanitized");
        let reader = output.clone();
        let first = tokio::task::spawn_blocking(move || common::kafka::consume(&reader, 20, Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(first.len(), 20);
        let rewrap = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_piiwall"))
                .args([
                    "--config",
                    config_path.to_str().unwrap(),
                    "keys",
                    "rewrap",
                    "--batch",
                    "1",
                ])
                .output()
                .unwrap()
        });
        common::kafka::produce(&input, customers(20..45)).await;
        let out = rewrap.await.unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
        common::kafka::produce(&input, customers(45..60)).await;

        let all = tokio::task::spawn_blocking(move || common::kafka::consume(&output, 60, Duration::from_secs(90)))
            .await
            .unwrap();
        assert_eq!(source_offsets(&all), (0..60).collect());
        shutdown.trigger();
        task.await.unwrap().expect("a clean stop");

        // Every key in the store (the 30 rewrapped, the 30 `run` created under KMS) opens with KMS alone.
        let (store, key) = (store.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let dir = dir;
            let kms_alone = keys_config(dir.path(), &format!("aws-kms:{key}"), &[], None);
            let after = Keyring::from_config(&kms_alone).unwrap();
            let rows = store.keys_after(None, 1000).unwrap();
            let subject_keys = rows.iter().filter(|row| row.scope.starts_with("s:")).count();
            assert_eq!(subject_keys, 60, "one key per subject (and the domain keys)");
            for row in &rows {
                assert!(after.key_by_id(row.key_id).is_ok(), "a key KMS alone does not open");
            }
            let subjects: Vec<String> = (0..60)
                .map(|i| common::kafka::customer(i)["customer_id"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(key_ids(&after, &subjects).len(), 60);
        })
        .await
        .unwrap();
    }

    fn keys_config(
        dir: &Path,
        kek: &str,
        previous: &[&str],
        wrapping_key: Option<bool>,
    ) -> piiwall::config::KeysConfig {
        let previous: Vec<String> = previous.iter().map(|p| format!("{p:?}")).collect();
        let wrapping = wrapping_key
            .map(|on| format!("wrapping_key = {on}\n"))
            .unwrap_or_default();
        let text = format!(
            "[keys]\nstore = {store:?}\nkek = {kek:?}\nkek_previous = [{previous}]\n{wrapping}\n[keys.aws_kms]\n\
             region = \"us-east-1\"\nendpoint = {endpoint:?}\n",
            store = format!("sqlite:{}", dir.join("keys.db").display()),
            previous = previous.join(", "),
            endpoint = endpoint(),
        );
        piiwall::config::Config::parse(&text, std::iter::empty(), "KMS keys config")
            .unwrap()
            .keys
    }

    /// With AWS KMS (by default) data keys are wrapped under the store's wrapping key, which KMS wraps: creating
    /// keys for many new subjects costs no KMS call. Keys KMS wrapped directly (wrapping_key = false, or an earlier
    /// version) still open, and `keys rewrap` moves them under the wrapping key.
    #[test]
    fn with_aws_kms_new_keys_go_under_the_stores_wrapping_key_and_direct_wraps_still_open() {
        let key = new_kms_key();
        let dir = tempfile::tempdir().unwrap();
        let kms_id = format!("aws-kms:{key}");
        let direct = Keyring::from_config(&keys_config(dir.path(), &kms_id, &[], Some(false))).unwrap();
        let early: Vec<String> = (0..20).map(|i| format!("early-{i}")).collect();
        let early_ids = key_ids(&direct, &early);
        drop(direct);

        let ring = Keyring::from_config(&keys_config(dir.path(), &kms_id, &[], None)).unwrap();
        let later: Vec<String> = (0..300).map(|i| format!("later-{i}")).collect();
        assert_eq!(
            ring.prefetch_subjects(later.iter().map(String::as_str))
                .unwrap()
                .created,
            300
        );
        assert_eq!(
            key_ids(&ring, &early),
            early_ids,
            "keys KMS wrapped directly still open"
        );
        let store = SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        let by = |prefix: &str| {
            store
                .keys_after(None, 1000)
                .unwrap()
                .iter()
                .filter(|k| KekSet::wrapped_by(&k.wrapped).is_some_and(|id| id.starts_with(prefix)))
                .count()
        };
        let under_wrapping_key = format!("{kms_id}+wk:");
        assert_eq!(by(&under_wrapping_key), 300, "the new subjects' keys");
        let later_ids = key_ids(&ring, &later);
        drop(ring);

        // A restart reads the same keys; a rewrap moves the direct ones under the wrapping key.
        let config = keys_config(dir.path(), &kms_id, &[], None);
        let again = Keyring::from_config(&config).unwrap();
        assert_eq!(key_ids(&again, &later), later_ids);
        let moved = again.rewrap(50, |_| {}).unwrap();
        assert_eq!(moved.rewrapped, 20, "{moved:?}");
        let all = store.keys_after(None, 1000).unwrap().len();
        assert_eq!(by(&under_wrapping_key), all, "every key under the wrapping key");
        assert_eq!(key_ids(&Keyring::from_config(&config).unwrap(), &early), early_ids);
    }
}

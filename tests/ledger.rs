//! The forget ledger's topic as start-up finds it: a compacted control topic (made by an earlier version, or by
//! hand) is named in a warning, since a later message for a scope could compact a forget away.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kafka::{broker, create_topic, unique};
use piiwall::config::Config;
use piiwall::stream::{self, Shutdown};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

/// Log output, collected for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_control_topic_is_named_at_start_up() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("piiwall=info")
        .with_writer(move || writer.clone())
        .init();
    let dir = tempfile::tempdir().unwrap();
    let input = unique("ledger");
    create_topic(&input, 1).await;
    let control = format!("{input}.control");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker()).create().unwrap();
    let compacted = NewTopic::new(&control, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    for result in admin.create_topics([&compacted], &AdminOptions::new()).await.unwrap() {
        result.unwrap();
    }
    std::fs::write(
        dir.path().join("kek.key"),
        "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=\n",
    )
    .unwrap();
    let text = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\ncontrol_topic = \"{control}\"\n\
         [kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ninputs = [\"{input}\"]\n\
         quarantine_topic = \"{input}.quarantine\"\n[audit]\ntopic = \"{input}.audit\"\n[http]\nlisten = \"off\"\n",
        dir = dir.path().display(),
        brokers = broker(),
        group = unique("piiwall"),
    );
    let config = Config::parse(&text, std::iter::empty(), "ledger test config").unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(stream::run(config, shutdown.clone()));
    let warning = "the control topic (keys.control_topic) is compacted";
    let started = Instant::now();
    let log = loop {
        let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        if log.contains(warning) || log.contains("piiwall running") || started.elapsed() > Duration::from_secs(30) {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shutdown.trigger();
    task.await.unwrap().unwrap();
    assert!(
        log.contains(warning),
        "start-up names the compacted ledger; log:\n{log}"
    );
    assert!(log.contains(&control), "and the topic");
}

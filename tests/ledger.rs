//! The forget ledger's topic: one that is compacted or whose records expire (made by an earlier version, by hand,
//! or by a broker's auto-creation) is refused at start-up, since a forget could leave it; the command line makes it
//! append-only before its first announcement.

mod common;

use std::time::Duration;

use common::kafka::{broker, create_topic, unique};
use piiwall::config::Config;
use piiwall::server;
use piiwall::stream::{self, Shutdown};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_control_topic_is_refused_at_start_up() {
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
    let refused = tokio::time::timeout(Duration::from_secs(60), server::run(config, Shutdown::new()))
        .await
        .expect("start-up decides")
        .expect_err("a compacted ledger is refused");
    let message = refused.to_string();
    assert!(message.contains(&control), "{message}");
    assert!(message.contains("cleanup.policy is compact"), "{message}");
    assert!(message.contains("retention.ms is"), "{message}");
    assert!(message.contains("retention.ms=-1"), "says what to set: {message}");
}

/// The command line may announce a forget before any `run` made the control topic: it makes it append-only first,
/// where a broker's auto-creation would give it a retention of days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_announced_first_makes_the_ledger_append_only() {
    let dir = tempfile::tempdir().unwrap();
    let control = unique("ledger-first.control");
    let text = format!(
        "[keys]\nstore = \"sqlite:{dir}/keys.db\"\nkek = \"file:{dir}/kek.key\"\ncontrol_topic = \"{control}\"\n\
         [kafka]\nbrokers = \"{brokers}\"\n",
        dir = dir.path().display(),
        brokers = broker(),
    );
    let config = Config::parse(&text, std::iter::empty(), "ledger test config").unwrap();
    let client = {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", broker());
        client
    };
    stream::ensure_ledger(&client, &config).await.unwrap();
    stream::ensure_ledger(&client, &config)
        .await
        .expect("an append-only ledger is accepted");
    let admin: AdminClient<DefaultClientContext> = client.create().unwrap();
    let described = admin
        .describe_configs(
            [&rdkafka::admin::ResourceSpecifier::Topic(&control)],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let value = |name: &str| described.get(name).and_then(|e| e.value.clone());
    assert_eq!(value("cleanup.policy").as_deref(), Some("delete"));
    assert_eq!(value("retention.ms").as_deref(), Some("-1"));
    assert_eq!(value("retention.bytes").as_deref(), Some("-1"));
}

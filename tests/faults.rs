//! The fault suite: what piiwall does when what it depends on fails, on real services (Tansu brokers of the tests'
//! own, the test PostgreSQL, rivven-schema behind an error-injecting proxy in `tests/registry_faults.rs`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::kafka::{consume_from, create_topic_on, reader_on, unique};
use common::services::free_port;
use piiwall::audit::{AuditEvent, AuditKind, Auditor, OnFailure};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Message};

/// The audit writer keeps an event it cannot write and tries again: it never stops on its own, says it is failing
/// meanwhile (the pipeline waits on that, and `/readyz` reports it), and acknowledges the event once it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rides_through_a_broker_that_is_down_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = common::keyring_at(dir.path());
    let mut broker = Broker::on(free_port());
    let topic = unique("faults-audit");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "1000")
        .set("reconnect.backoff.max.ms", "200")
        .create()
        .unwrap();
    let (auditor, writer) = Auditor::start(
        producer,
        topic.clone(),
        "fault-test".into(),
        keyring.clone(),
        OnFailure::Retry,
    );
    let acks = auditor
        .emit_acked(vec![
            AuditEvent::new(AuditKind::Start),
            AuditEvent::new(AuditKind::Quarantine),
        ])
        .await;
    let started = Instant::now();
    while !auditor.is_failing() {
        assert!(started.elapsed() < Duration::from_secs(20), "a failing writer says so");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!writer.is_finished(), "the writer never stops on its own");

    broker.start();
    create_topic_on(&broker.bootstrap(), &topic, 1).await;
    tokio::time::timeout(Duration::from_secs(60), acks.written())
        .await
        .expect("written once the broker is back")
        .unwrap();
    assert!(!auditor.is_failing());
    auditor.emit(AuditEvent::new(AuditKind::Stop)).await;
    drop(auditor);
    writer.await.unwrap().unwrap();

    let bootstrap = broker.bootstrap();
    let events = tokio::task::spawn_blocking(move || {
        consume_from(
            reader_on(&bootstrap, &topic, "read_committed"),
            3,
            Duration::from_secs(30),
        )
    })
    .await
    .unwrap();
    assert!(events.len() >= 3, "every event is on the topic (duplicates allowed)");
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker.bootstrap());
    let topic = events[0].topic().to_owned();
    let report = tokio::task::spawn_blocking({
        let keyring: Arc<_> = keyring.clone();
        move || piiwall::audit::verify(&client, &topic, &keyring).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        report.first_break, None,
        "the chain verifies, retried duplicates included"
    );
}

//! Audit events of the local command line: `reveal`, `tokenize`, `forget` and `keys rotate` acting on the key
//! store with the KEK holder's authority. When the config names brokers, each command writes its events to the
//! audit topic as a run of its own chain, `<audit.instance>/cli`, before it prints anything it revealed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::{AuditEvent, Auditor};
use crate::config::Config;
use crate::error::Error;
use crate::keys::Keyring;

/// How long a local command waits for its audit events to be acknowledged.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a local command's audit events went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAudit {
    /// Acknowledged by the brokers, on this topic.
    Written(String),
    /// The config names no brokers: offline use, nothing to write to.
    Offline,
}

/// The principal of a local command: the operating-system user who ran it.
pub fn local_principal() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// Writes `events` to the audit topic and waits for their acknowledgement; an error when they were not written.
pub fn write_local(config: &Config, keyring: &Arc<Keyring>, events: Vec<AuditEvent>) -> Result<LocalAudit, Error> {
    if !config.kafka.brokers_configured {
        return Ok(LocalAudit::Offline);
    }
    let topic = config.audit.topic.clone();
    let fail = |e: &dyn std::fmt::Display| {
        Error::Kafka(format!(
            "the audit event could not be written to {topic} on {}: {e}",
            config.kafka.brokers
        ))
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string());
    for (name, value) in &config.kafka.properties {
        client.set(name, value);
    }
    let producer = crate::producer::Producer::create(client).map_err(|e| fail(&e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&e))?;
    let instance = format!("{}/cli", config.audit.instance);
    runtime.block_on(async {
        let (auditor, writer) = Auditor::start(
            producer,
            topic.clone(),
            instance,
            keyring.clone(),
            super::OnFailure::Stop,
            Default::default(),
        );
        for event in events {
            auditor.emit(event).await;
        }
        drop(auditor);
        writer.await.map_err(|e| fail(&e))?.map_err(|e| fail(&e))
    })?;
    Ok(LocalAudit::Written(topic))
}

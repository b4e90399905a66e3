//! `audit verify`, and the audit trail of the other local commands.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use piiwall::audit::{AuditEvent, AuditKind, LocalAudit};
use piiwall::config::Config;
use piiwall::control::{Control, ControlOp};
use piiwall::keys::Keyring;
use piiwall::producer::Producer;

use super::{kafka_client, keyring};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Check every instance's chain in an audit topic: no event removed, reordered or altered.
    Verify {
        /// The audit topic (default: audit.topic of the config).
        #[arg(long)]
        topic: Option<String>,
    },
    /// Print the public key that checks this key store's erasure receipts (base64 Ed25519): publish it, or give
    /// it to whoever must check receipts.
    Pubkey,
    /// Check an erasure receipt (the JSON `forget --receipt` wrote, or the API's `receipt`): exit 0 when its
    /// signature holds under the public key, 1 when not.
    VerifyReceipt {
        /// The receipt file.
        file: std::path::PathBuf,
        /// The public key to check it with (`audit pubkey`); without it, this key store's (which needs the config
        /// and the KEK).
        #[arg(long)]
        pubkey: Option<String>,
        /// Also check that the receipt is about this data subject (its pseudonym needs the config and the KEK);
        /// - reads the id from standard input.
        #[arg(long)]
        subject: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ReportCommand {
    /// Records of processing (GDPR Art. 30) from the audit topic: per topic the fields, actions and record counts,
    /// quarantined records, subject-rights calls by purpose and principal, keys made, rotated and destroyed; and
    /// whether the audit chain verifies. No value and no subject appears in it.
    Processing {
        /// Count events from this day on (YYYY-MM-DD, midnight UTC).
        #[arg(long)]
        since: String,
        /// The audit topic (default: audit.topic of the config).
        #[arg(long)]
        topic: Option<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn report(config: &Config, command: ReportCommand) -> anyhow::Result<ExitCode> {
    let ReportCommand::Processing { since, topic, json } = command;
    let since_ms = piiwall::audit::date_ms(&since).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let topic = topic.unwrap_or_else(|| config.audit.topic.clone());
    let client = kafka_client(config);
    let chain = piiwall::audit::verify(&client, &topic, &*keyring(config)?)?;
    let report = piiwall::audit::processing_report(&client, &topic, since_ms)?;
    if json {
        let mut document = report.to_json();
        document["topic"] = topic.into();
        document["chain_verified"] = chain.first_break.is_none().into();
        document["chain_break"] = chain.first_break.clone().into();
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{topic}: {}", report.render());
        match &chain.first_break {
            None => println!("\nAudit chain: every chain verifies ({} events).", chain.events),
            Some(problem) => println!("\nAudit chain: BROKEN at {problem}: this report cannot be relied on."),
        }
    }
    // A broken chain fails the command, as `audit verify` does: the report is printed, but not to be relied on.
    Ok(if chain.first_break.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn exec(config: &Config, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify { topic } => verify(config, topic),
        AuditCommand::Pubkey => {
            println!("{}", receipt_public_key(config)?);
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::VerifyReceipt { file, pubkey, subject } => verify_receipt(config, &file, pubkey, subject),
    }
}

fn receipt_public_key(config: &Config) -> anyhow::Result<String> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::STANDARD.encode(keyring(config)?.receipt_public_key().as_bytes()))
}

fn verify_receipt(
    config: &Config,
    file: &std::path::Path,
    pubkey: Option<String>,
    subject: Option<String>,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let receipt: piiwall::receipt::ErasureReceipt = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an erasure receipt (line {}, column {})",
            file.display(),
            e.line(),
            e.column()
        )
    })?;
    let key = match pubkey {
        Some(key) => key,
        None => receipt_public_key(config)?,
    };
    if let Some(subject) = subject {
        let subject = super::from_arg_or_stdin(subject)?;
        if piiwall::audit::subject_pseudonym(&*keyring(config)?, &subject)? != receipt.subject {
            eprintln!("piiwall: the receipt is about another data subject");
            return Ok(ExitCode::from(1));
        }
    }
    match receipt.verify(Some(&key)) {
        Ok(()) => {
            println!(
                "receipt verifies: {} key version(s) of subject {} destroyed at {} by {}, {}acknowledged by {}\n\
                 digest (its ERASURE_RECEIPT audit event's): {}",
                receipt.key_versions_destroyed,
                receipt.subject,
                receipt.forgotten_at,
                receipt.forgotten_by,
                if receipt.announced {
                    ""
                } else {
                    "NOT announced on the control topic, "
                },
                if receipt.acknowledged_by.is_empty() {
                    "no instance".to_owned()
                } else {
                    receipt.acknowledged_by.join(", ")
                },
                piiwall::receipt::digest(&receipt)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(problem) => {
            eprintln!("piiwall: the receipt does not verify: {problem}");
            Ok(ExitCode::from(1))
        }
    }
}

fn verify(config: &Config, topic: Option<String>) -> anyhow::Result<ExitCode> {
    let topic = topic.unwrap_or_else(|| config.audit.topic.clone());
    let report = piiwall::audit::verify(&kafka_client(config), &topic, &*keyring(config)?)?;
    match report.first_break {
        None => {
            println!(
                "{}: {} events from {} instance(s) in {} run(s): every chain verifies",
                topic, report.events, report.instances, report.runs
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(problem) => {
            println!("{topic}: chain broken at {problem}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The audit event of a local command, by the operating-system user, for the purpose given (if any).
pub(crate) fn local_event(kind: AuditKind, purpose: Option<&str>) -> AuditEvent {
    let mut event = AuditEvent::new(kind);
    event.principal = Some(piiwall::audit::local_principal());
    event.purpose = purpose.map(str::to_owned);
    event
}

/// Writes a local command's audit events to the audit topic, waiting for the brokers' acknowledgement. Without
/// configured brokers (offline use) there is nowhere to write them, and stderr says so.
pub(crate) fn audit_locally(config: &Config, keyring: &Arc<Keyring>, events: Vec<AuditEvent>) -> anyhow::Result<()> {
    if piiwall::audit::write_local(config, keyring, events)? == LocalAudit::Offline {
        eprintln!("piiwall: not audited: the config names no kafka.brokers (offline use)");
    }
    Ok(())
}

/// The exit of a command that acted before writing its audit events (forget, rotate: the act stands): 1 when
/// they were not written.
pub(crate) fn audited_after(audit: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    match audit {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("piiwall: done, but not audited: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

/// The control topic's announcer for a command that forgets, with the ledger made sure of; `None` when no brokers
/// are configured (or no producer can be made, said on standard error): the forget still happens, and running
/// instances drop cached keys within `keys.cache_ttl_secs`. Unreachable brokers show when the announcement fails.
pub(crate) fn control_locally(config: &Config, runtime: &tokio::runtime::Runtime) -> Option<Control> {
    if !config.kafka.brokers_configured {
        return None;
    }
    let client = kafka_client(config);
    if let Err(e) = runtime.block_on(piiwall::stream::ensure_ledger(&client, config)) {
        eprintln!("piiwall: warning: {e}");
    }
    match Producer::create(client) {
        Ok(producer) => Some(Control::new(producer, config.keys.control_topic.clone())),
        Err(e) => {
            eprintln!(
                "piiwall: warning: no control topic producer ({e}): running instances drop cached keys within {} s",
                config.keys.cache.ttl.as_secs()
            );
            None
        }
    }
}

/// After a local rotate, when the config names brokers: tells the running instances through the control topic,
/// which is also the ledger `keys reapply-forgets` reads. Best effort: without it they drop cached keys within
/// keys.cache_ttl_secs.
pub(crate) fn announce_locally(config: &Config, keyring: &Keyring, op: ControlOp, scope: &str) {
    if !config.kafka.brokers_configured {
        return;
    }
    let announced = (|| -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = kafka_client(config);
        // A ledger that can lose forgets is said, and the announcement still goes out: running instances drop
        // their cached keys at once either way.
        if let Err(e) = runtime.block_on(piiwall::stream::ensure_ledger(&client, config)) {
            eprintln!("piiwall: warning: {e}");
        }
        let control = Control::new(Producer::create(client.clone())?, config.keys.control_topic.clone());
        runtime.block_on(control.announce(keyring, op, scope))?;
        Ok(())
    })();
    if let Err(e) = announced {
        eprintln!(
            "piiwall: warning: not announced on {} ({e:#}): running instances drop cached keys within {} s, and \
             `keys reapply-forgets` will not know of it",
            config.keys.control_topic,
            config.keys.cache.ttl.as_secs()
        );
    }
}

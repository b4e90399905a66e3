//! `keys rotate`, `keys rewrap`, `keys reapply-forgets`, `keys publish-forgets`: key management.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use piiwall::audit::{AuditEvent, AuditKind, AuditOutcome};
use piiwall::config::Config;
use piiwall::control::{Control, ControlOp};
use piiwall::keys::Keyring;
use piiwall::producer::Producer;

use super::api::{Remote, remote_call};
use super::audit::{announce_locally, audit_locally, audited_after, local_event};
use super::{from_arg_or_stdin, kafka_client, keyring};

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Add a key version for a domain (default: the configured default domain) or a subject.
    Rotate {
        #[arg(long, conflicts_with = "subject")]
        domain: Option<String>,
        /// The subject id; - reads it from standard input.
        #[arg(long)]
        subject: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Forget again every subject the control topic records as forgotten: after restoring the key store from a
    /// backup taken before some forgets, run this before anything else uses the store.
    ReapplyForgets,
    /// Announce on the control topic, signed, every forget the key store records and the topic lacks (forgets made
    /// before messages were signed, or while the brokers could not be reached), so that a later restore and
    /// `reapply-forgets` cannot undo them.
    PublishForgets,
    /// Rewrap every stored key under keys.kek (a KEK rotation), reading each with the KEK that wrapped it (keys.kek
    /// or one of keys.kek_previous). Running instances go on meanwhile (give them both KEKs first); resumable and
    /// idempotent: run it again after an interruption. Audited (KEK_REWRAPPED, counts only).
    Rewrap {
        /// Keys per page (one listing, then one write per key).
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

pub(crate) fn exec(config: &Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Rotate {
            domain,
            subject,
            remote,
        } => rotate(config, domain, subject, &remote),
        KeysCommand::Rewrap { batch } => rewrap(config, batch),
        KeysCommand::ReapplyForgets => reapply_forgets(config),
        KeysCommand::PublishForgets => publish_forgets(config),
    }
}

fn rotate(
    config: &Config,
    domain: Option<String>,
    subject: Option<String>,
    remote: &Remote,
) -> anyhow::Result<ExitCode> {
    let subject = subject.map(from_arg_or_stdin).transpose()?;
    let domain = domain.unwrap_or_else(|| config.keys.default_domain.clone());
    if subject.is_none() && !piiwall::policy::valid_domain(&domain) {
        bail!("--domain must be {}", piiwall::policy::DOMAIN_RULE);
    }
    let version = match remote.client()? {
        Some((client, purpose)) => {
            let body = match &subject {
                Some(subject) => serde_json::json!({"purpose": purpose, "subject": subject}),
                None => serde_json::json!({"purpose": purpose, "domain": domain}),
            };
            remote_call(&client, "/v1/keys/rotate", body)?["version"]
                .as_u64()
                .unwrap_or(0) as u32
        }
        None => {
            let keyring = keyring(config)?;
            let mut event = local_event(AuditKind::KeyRotated, remote.purpose.as_deref());
            let scope = match &subject {
                Some(subject) => {
                    event.subject_token = Some(piiwall::audit::subject_pseudonym(&keyring, subject)?);
                    keyring.subject_scope(subject)
                }
                None => Keyring::domain_scope(&domain),
            };
            let version = keyring.rotate(&scope)?;
            announce_locally(config, &keyring, ControlOp::Rotate, &scope);
            event.outcome = Some(AuditOutcome::Allowed);
            println!("rotated: new data uses key version {version}; older versions still reveal");
            return audited_after(audit_locally(config, &keyring, vec![event]));
        }
    };
    println!("rotated: new data uses key version {version}; older versions still reveal");
    Ok(ExitCode::SUCCESS)
}

fn rewrap(config: &Config, batch: usize) -> anyhow::Result<ExitCode> {
    let keyring = keyring(config)?;
    let started = std::time::Instant::now();
    let mut last = piiwall::keys::Rewrapped::default();
    let result = keyring.rewrap(batch, |done| {
        last = *done;
        eprint!(
            "\rpiiwall: {} rewrapped, {} already under keys.kek, {} gone meanwhile, {} unreadable ({} s)",
            done.rewrapped,
            done.already,
            done.gone,
            done.unreadable,
            started.elapsed().as_secs()
        );
    });
    eprintln!();
    // Audited however it ended: keys rewritten before a failure are part of the trail too.
    let done = *result.as_ref().unwrap_or(&last);
    let mut event = local_event(AuditKind::KekRewrapped, None);
    event.counts = [
        ("rewrapped", done.rewrapped),
        ("already", done.already),
        ("gone", done.gone),
        ("unreadable", done.unreadable),
    ]
    .into_iter()
    .map(|(action, count)| piiwall::audit::FieldCount {
        field_path: "keys".into(),
        action: action.into(),
        count: count as i64,
    })
    .collect();
    event.outcome = Some(if result.is_ok() {
        AuditOutcome::Allowed
    } else {
        AuditOutcome::Error
    });
    let audited = audit_locally(config, &keyring, vec![event]);
    let done = result?;
    println!(
        "rewrapped {} key(s) under keys.kek ({} already were, {} forgotten or rewritten meanwhile)",
        done.rewrapped, done.already, done.gone
    );
    if done.unreadable > 0 {
        eprintln!(
            "piiwall: {} key(s) open with no configured KEK (corrupted, or wrapped by a KEK neither keys.kek \
             nor keys.kek_previous names) and were left as they are",
            done.unreadable
        );
        audited?;
        return Ok(ExitCode::from(1));
    }
    println!(
        "keys.kek_previous can go once no instance still has the old KEK as its keys.kek and a run of this \
         command rewraps nothing more"
    );
    audited_after(audited)
}

fn reapply_forgets(config: &Config) -> anyhow::Result<ExitCode> {
    if !config.kafka.brokers_configured {
        bail!("keys reapply-forgets reads keys.control_topic: the config names no kafka.brokers");
    }
    let keyring = keyring(config)?;
    let ledger = piiwall::control::forgotten_scopes(&kafka_client(config), &config.keys.control_topic, &keyring)?;
    if ledger.ignored > 0 {
        eprintln!(
            "piiwall: {} message(s) on {} ignored: unsigned (written before messages were signed), forged, \
             or not a subject's forget",
            ledger.ignored, config.keys.control_topic
        );
    }
    let scopes = ledger.scopes;
    let mut destroyed = 0;
    for scope in &scopes {
        destroyed += keyring.forget_scope(scope)?;
    }
    let mut event = AuditEvent::key_shredded(destroyed as i64);
    event.principal = Some(piiwall::audit::local_principal());
    event.reason = Some(format!("{} forgets re-applied from the control topic", scopes.len()));
    println!(
        "{} forgotten subject(s) on {}; {destroyed} key version(s) destroyed again{}",
        scopes.len(),
        config.keys.control_topic,
        if destroyed > 0 {
            " (the store had them back)"
        } else {
            ""
        }
    );
    audited_after(audit_locally(config, &keyring, vec![event]))
}

fn publish_forgets(config: &Config) -> anyhow::Result<ExitCode> {
    if !config.kafka.brokers_configured {
        bail!("keys publish-forgets writes keys.control_topic: the config names no kafka.brokers");
    }
    let keyring = keyring(config)?;
    let client = kafka_client(config);
    let ledger = piiwall::control::forgotten_scopes(&client, &config.keys.control_topic, &keyring)?;
    let on_ledger: std::collections::HashSet<&String> = ledger.scopes.iter().collect();
    let missing: Vec<String> = keyring
        .forgotten_subject_scopes()?
        .into_iter()
        .filter(|scope| !on_ledger.contains(scope))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(piiwall::stream::ensure_ledger(&client, config))?;
    let control = Control::new(Producer::create(client.clone())?, config.keys.control_topic.clone());
    for scope in &missing {
        runtime.block_on(control.announce(&keyring, ControlOp::Forget, scope))?;
    }
    println!(
        "{} forget(s) published on {} ({} already on it)",
        missing.len(),
        config.keys.control_topic,
        ledger.scopes.len()
    );
    Ok(ExitCode::SUCCESS)
}

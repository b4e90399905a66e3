//! `forget`: a data subject's erasure, offline or through a running instance's API.

use std::process::ExitCode;

use std::path::Path;

use anyhow::Context;
use piiwall::audit::{AuditEvent, AuditKind, AuditOutcome};
use piiwall::config::Config;
use piiwall::receipt::{Erasure, ErasureReceipt};

use super::api::{Remote, remote_call};
use super::audit::{audit_locally, audited_after, control_locally, local_event};
use super::{from_arg_or_stdin, kafka_client, keyring};

pub(crate) fn forget(
    config: &Config,
    subject: String,
    receipt_file: Option<&Path>,
    remote: &Remote,
) -> anyhow::Result<ExitCode> {
    let subject = from_arg_or_stdin(subject)?;
    let receipt: ErasureReceipt = match remote.client()? {
        Some((client, purpose)) => serde_json::from_value(
            remote_call(
                &client,
                "/v1/subjects/forget",
                serde_json::json!({"purpose": purpose, "subject": subject}),
            )?["receipt"]
                .clone(),
        )
        .context("the API's answer carries no erasure receipt")?,
        None => {
            let keyring = keyring(config)?;
            let mut event = local_event(AuditKind::Forget, remote.purpose.as_deref());
            event.subject_token = Some(piiwall::audit::subject_pseudonym(&keyring, &subject)?);
            // A worker thread drives the producer's timers while this one waits on it.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let control = control_locally(config, &runtime);
            let erasure = Erasure::for_command(config, kafka_client(config));
            let (receipt, unannounced) = erasure.forget(&keyring, control.as_ref(), runtime.handle(), &subject)?;
            if let Some(e) = unannounced {
                eprintln!(
                    "piiwall: warning: not announced on {} ({e}): running instances drop cached keys within {} s, \
                     and `keys reapply-forgets` will not know of it",
                    config.keys.control_topic,
                    config.keys.cache.ttl.as_secs()
                );
            }
            event.outcome = Some(AuditOutcome::Allowed);
            let shredded = AuditEvent::key_shredded(receipt.key_versions_destroyed as i64);
            let recorded = receipt.audit_event();
            // Audited before anything else can fail: the keys are gone whatever happens to the receipt file.
            let audited = audit_locally(config, &keyring, vec![event, shredded, recorded]);
            finish(&receipt, receipt_file)?;
            return audited_after(audited);
        }
    };
    finish(&receipt, receipt_file)?;
    Ok(ExitCode::SUCCESS)
}

/// Says what a forget did, and writes its receipt when asked.
fn finish(receipt: &ErasureReceipt, file: Option<&Path>) -> anyhow::Result<()> {
    print_forgotten(receipt.key_versions_destroyed as usize);
    if let Some(file) = file {
        let text = serde_json::to_string_pretty(receipt)? + "\n";
        if let Err(e) = std::fs::write(file, &text) {
            // Not lost: the receipt goes to standard error instead (it holds no subject id, only its pseudonym).
            eprintln!(
                "piiwall: cannot write the receipt to {} ({e}); here it is:\n{text}",
                file.display()
            );
            anyhow::bail!("the receipt was not written to {}", file.display());
        }
        println!(
            "receipt: {} (check it with `piiwall audit verify-receipt`)",
            file.display()
        );
    }
    Ok(())
}

/// What a forget did, and a note when it destroyed no key (an id in another form than the records carry).
fn print_forgotten(destroyed: usize) {
    println!("forgotten: {destroyed} key version(s) destroyed; later records of this subject are redacted");
    if destroyed == 0 {
        eprintln!(
            "piiwall: note: no key existed under this id. Ids are matched exactly (case, spaces and leading zeros \
             count; uuids in any form): if records carry the id in another form, forget that form too"
        );
    }
}

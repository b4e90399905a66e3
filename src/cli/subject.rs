//! `forget`: a data subject's erasure, offline or through a running instance's API.

use std::process::ExitCode;

use piiwall::audit::{AuditEvent, AuditKind, AuditOutcome};
use piiwall::config::Config;
use piiwall::stream::ControlOp;

use super::api::{Remote, remote_call};
use super::audit::{announce_locally, audit_locally, audited_after, local_event};
use super::{from_arg_or_stdin, keyring};

pub(crate) fn forget(config: &Config, subject: String, remote: &Remote) -> anyhow::Result<ExitCode> {
    let subject = from_arg_or_stdin(subject)?;
    let destroyed = match remote.client()? {
        Some((client, purpose)) => remote_call(
            &client,
            "/v1/subjects/forget",
            serde_json::json!({"purpose": purpose, "subject": subject}),
        )?["key_versions_destroyed"]
            .as_u64()
            .unwrap_or(0) as usize,
        None => {
            let keyring = keyring(config)?;
            let mut event = local_event(AuditKind::Forget, remote.purpose.as_deref());
            event.subject_token = Some(piiwall::audit::subject_pseudonym(&keyring, &subject)?);
            let destroyed = keyring.forget_subject(&subject)?;
            for scope in keyring.subject_scopes(&subject) {
                announce_locally(config, &keyring, ControlOp::Forget, &scope);
            }
            event.outcome = Some(AuditOutcome::Allowed);
            let shredded = AuditEvent::key_shredded(destroyed as i64);
            print_forgotten(destroyed);
            return audited_after(audit_locally(config, &keyring, vec![event, shredded]));
        }
    };
    print_forgotten(destroyed);
    Ok(ExitCode::SUCCESS)
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

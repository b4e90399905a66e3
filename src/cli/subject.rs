//! `forget` and `subject export`: a data subject's erasure and access, offline or through a running instance's API.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use piiwall::audit::{AuditEvent, AuditKind, AuditOutcome};
use piiwall::config::Config;
use piiwall::export::{ExportRequest, ExportSummary, Exporter, ResumePoint};
use piiwall::receipt::{Erasure, ErasureReceipt};
use serde_json::Value as Json;

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

#[derive(clap::Subcommand)]
pub(crate) enum SubjectCommand {
    /// Export a data subject's records from sanitized topics, with the protected fields revealed, as one JSON
    /// document (GDPR Art. 15 and 20). Records under destroyed keys are counted as erased.
    Export {
        /// The subject id; - reads it from standard input (keeps it out of shell history).
        subject: String,
        /// The sanitized topics to search (`<input><kafka.output_suffix>`).
        #[arg(long, required = true, num_args = 1..)]
        topics: Vec<String>,
        /// Write the document to this file (it holds the subject's data in clear) instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Continue an export that stopped (interrupted, or an API call's limit): the earlier document, whose
        /// `resume` member says where. The new document holds the records after that point.
        #[arg(long)]
        resume_from: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
}

pub(crate) fn exec(config: &Config, command: SubjectCommand) -> anyhow::Result<ExitCode> {
    match command {
        SubjectCommand::Export {
            subject,
            topics,
            output,
            resume_from,
            remote,
        } => export(
            config,
            subject,
            &topics,
            output.as_deref(),
            resume_from.as_deref(),
            &remote,
        ),
    }
}

fn export(
    config: &Config,
    subject: String,
    topics: &[String],
    output: Option<&Path>,
    resume_from: Option<&Path>,
    remote: &Remote,
) -> anyhow::Result<ExitCode> {
    let subject = from_arg_or_stdin(subject)?;
    let resume = match resume_from {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let document: Json = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not an export document (line {})", file.display(), e.line()))?;
            piiwall::export::resume_point(&document).with_context(|| file.display().to_string())?
        }
        None => ResumePoint::new(),
    };
    let summary = match remote.client()? {
        Some((client, purpose)) => export_remote(&client, &purpose, &subject, topics, resume, output)?,
        None => export_locally(config, &subject, topics, &resume, remote.purpose.as_deref(), output)?,
    };
    eprintln!(
        "subject export: {} record(s) of the subject ({} scanned), {} erased record(s), {} unreadable; subject {}",
        summary.records, summary.scanned, summary.erased, summary.unreadable, summary.status
    );
    if summary.complete {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("subject export: stopped before the end: continue with --resume-from on this document");
        Ok(ExitCode::from(1))
    }
}

/// The document's destination: the file (created readable by its owner only: it holds the subject's data in
/// clear), or standard output.
fn open_output(output: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match output {
        Some(file) => {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let created = options
                .open(file)
                .with_context(|| format!("cannot create {}", file.display()))?;
            // An existing file keeps its mode when truncated: narrowed too.
            #[cfg(unix)]
            created
                .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("cannot make {} readable by its owner only", file.display()))?;
            Box::new(std::io::BufWriter::new(created))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// Every sanitized topic named must be one of this pipeline's.
fn check_topics(config: &Config, topics: &[String]) -> anyhow::Result<()> {
    let ours = config.kafka.sanitized_topics();
    for topic in topics {
        if !ours.contains(topic) {
            anyhow::bail!(
                "{topic} is not a sanitized topic of this pipeline: name <input><kafka.output_suffix> for an input of \
                 kafka.inputs"
            );
        }
    }
    Ok(())
}

/// The local export: audited before the first record is revealed (refused when that event cannot be written, as
/// `reveal` is), and again with its outcome and counts.
fn export_locally(
    config: &Config,
    subject: &str,
    topics: &[String],
    resume: &ResumePoint,
    purpose: Option<&str>,
    output: Option<&Path>,
) -> anyhow::Result<ExportSummary> {
    check_topics(config, topics)?;
    // The export reads topics, and is audited before it reveals anything: both need the brokers.
    if !config.kafka.brokers_configured {
        anyhow::bail!("subject export reads the sanitized topics: the config must name kafka.brokers");
    }
    let sanitizer = super::sanitizer(config)?;
    let routes = piiwall::stream::Routes::compile(config)?;
    // Created before anything is revealed (an empty file if the export is refused next).
    let mut out = open_output(output)?;
    let client = kafka_client(config);
    let pseudonym = piiwall::audit::subject_pseudonym(sanitizer.keyring(), subject)?;
    let event = |outcome: AuditOutcome| {
        let mut event = local_event(AuditKind::SubjectExport, purpose);
        event.subject_token = Some(pseudonym.clone());
        event.field_paths = topics.to_vec();
        event.outcome = Some(outcome);
        event
    };
    let mut started = event(AuditOutcome::Allowed);
    started.reason = Some("export started".into());
    audit_locally(config, sanitizer.keyring(), vec![started])
        .context("export refused: its audit event could not be written")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // An interrupt stops the scan where it is: the document ends with a resume point.
    let cancel = Arc::new(AtomicBool::new(false));
    let interrupted = cancel.clone();
    runtime.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupted.store(true, Ordering::Relaxed);
        }
    });
    let request = ExportRequest {
        subject,
        topics,
        resume,
        may_see: &|_| true,
        deadline: None,
        max_records: None,
        max_bytes: None,
        cancel: Some(&cancel),
    };
    let exporter = Exporter {
        sanitizer: &sanitizer,
        routes: &routes,
        client: &client,
        runtime: runtime.handle(),
    };
    let terminal = std::io::stderr().is_terminal();
    let mut progress = |done: u64, total: u64| {
        if terminal {
            let percent = if total == 0 { 100 } else { done * 100 / total.max(done) };
            eprint!("\rsubject export: {done} of {total} records scanned ({percent}%)  ");
        }
    };
    let result = exporter.export(&request, &mut out, &mut progress);
    drop(out);
    if terminal {
        eprintln!();
    }
    let finished = match &result {
        Ok(summary) => {
            let mut finished = event(AuditOutcome::Allowed);
            finished.counts = vec![
                piiwall::audit::FieldCount {
                    field_path: "records".into(),
                    action: "exported".into(),
                    count: summary.records as i64,
                },
                piiwall::audit::FieldCount {
                    field_path: "records".into(),
                    action: "erased".into(),
                    count: summary.erased as i64,
                },
            ];
            finished
        }
        Err(e) => {
            let mut failed = event(AuditOutcome::Error);
            failed.reason = Some(e.to_string());
            failed
        }
    };
    let audited = audit_locally(config, sanitizer.keyring(), vec![finished]);
    let summary = result?;
    audited.context("the export's outcome was not audited")?;
    Ok(summary)
}

/// Exports through a running instance's API, call after call (each answers at most its limit of records, with a
/// resume point), merged into one document. An error ends the document with the last resume point.
fn export_remote(
    client: &piiwall::api::client::Client,
    purpose: &str,
    subject: &str,
    topics: &[String],
    mut resume: ResumePoint,
    output: Option<&Path>,
) -> anyhow::Result<ExportSummary> {
    let mut summary = ExportSummary {
        complete: false,
        ..Default::default()
    };
    let mut counts: Vec<Json> = Vec::new();
    let mut out: Option<Box<dyn Write>> = None;
    let failure = loop {
        let mut body = serde_json::json!({"purpose": purpose, "subject": subject, "topics": topics});
        if !resume.is_empty() {
            body["resume"] = serde_json::to_value(&resume)?;
        }
        let answer = match remote_call(client, "/v1/subjects/export", body) {
            Ok(answer) => answer,
            Err(e) => break Some(e),
        };
        let out = match &mut out {
            Some(out) => out,
            None => {
                let mut opened = open_output(output)?;
                write!(
                    opened,
                    "{{\"format\":{},\"generated_at\":{},\"subject\":{},\"status\":{},\"records\":[",
                    answer["format"], answer["generated_at"], answer["subject"], answer["status"]
                )?;
                summary.status = match answer["status"].as_str() {
                    Some("erased") => "erased",
                    Some("known") => "known",
                    _ => "unknown",
                };
                out.insert(opened)
            }
        };
        for record in answer["records"].as_array().into_iter().flatten() {
            if summary.records > 0 {
                out.write_all(b",")?;
            }
            serde_json::to_writer(&mut *out, record)?;
            summary.records += 1;
        }
        for topic in answer["topics"].as_array().into_iter().flatten() {
            match counts.iter_mut().find(|c| c["topic"] == topic["topic"]) {
                Some(total) => {
                    for member in ["scanned", "records", "erased_records", "unreadable"] {
                        let sum = total[member].as_u64().unwrap_or(0) + topic[member].as_u64().unwrap_or(0);
                        total[member] = Json::from(sum);
                    }
                }
                None => counts.push(topic.clone()),
            }
        }
        if answer["complete"] == true {
            summary.complete = true;
            break None;
        }
        let next = match piiwall::export::resume_point(&answer) {
            Ok(next) => next,
            Err(e) => break Some(anyhow::anyhow!("the API's answer: {e}")),
        };
        if next == resume {
            break Some(anyhow::anyhow!("the API made no progress from the resume point"));
        }
        resume = next;
    };
    for total in &counts {
        summary.scanned += total["scanned"].as_u64().unwrap_or(0);
        summary.erased += total["erased_records"].as_u64().unwrap_or(0);
        summary.unreadable += total["unreadable"].as_u64().unwrap_or(0);
    }
    let Some(out) = &mut out else {
        // Not one answer: nothing was written.
        return Err(failure.unwrap_or_else(|| anyhow::anyhow!("the API gave no answer")));
    };
    let mut tail = serde_json::json!({"topics": counts, "complete": summary.complete});
    if !summary.complete {
        tail["resume"] = serde_json::to_value(&resume)?;
        tail["error"] = Json::from("a call to the API failed; continue from the resume point");
        summary.resume = resume;
    }
    let tail = tail.to_string();
    write!(out, "],{}", &tail[1..])?;
    out.flush()?;
    if let Some(e) = failure {
        eprintln!("piiwall: subject export: {e:#}");
    }
    Ok(summary)
}

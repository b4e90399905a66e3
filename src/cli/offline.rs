//! `sanitize`, `reveal` and `tokenize`: records and tokens on the command line, offline or through a running
//! instance's API (`--server`).

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use piiwall::audit::{AuditKind, AuditOutcome};
use piiwall::codec::json::JsonCodec;
use piiwall::config::Config;
use piiwall::control::ControlOp;

use super::api::{Remote, remote_call};
use super::audit::{announce_locally, audit_locally, local_event};
use super::{from_arg_or_stdin, keyring, load_schema, read_stdin, sanitizer};

pub(crate) fn sanitize(config: &Config, schema: &Path, input: &str, output: &str) -> anyhow::Result<ExitCode> {
    let compiled = load_schema(schema, config)?;
    let sanitizer = sanitizer(config)?;
    let input: Box<dyn BufRead> = match input {
        "-" => Box::new(io::stdin().lock()),
        path => Box::new(BufReader::new(
            File::open(path).with_context(|| format!("cannot open input {path}"))?,
        )),
    };
    let output: Box<dyn Write> = match output {
        "-" => Box::new(BufWriter::new(io::stdout().lock())),
        path => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create output {path}"))?,
        )),
    };
    let summary = piiwall::offline::sanitize_lines(
        &compiled,
        &sanitizer,
        config.keys.max_encryptions,
        config.policy.undeclared,
        input,
        output,
        |line, e| eprintln!("line {line}: {e}"),
    )?;
    for key in &summary.retired {
        eprintln!(
            "piiwall: a key reached keys.max_encryptions_per_key: new data uses its version {}",
            key.version
        );
        announce_locally(config, sanitizer.keyring(), ControlOp::Rotate, &key.scope);
    }
    for (detection, count) in &summary.detections {
        eprintln!(
            "piiwall: {count} {} found in {}, which no annotation protects ({})",
            detection.kind.name(),
            detection.path,
            match detection.mode {
                piiwall::detect::DetectMode::Redact => "redacted",
                piiwall::detect::DetectMode::Quarantine => "its records failed",
                _ => "reported: annotate the field, or set policy.detect",
            }
        );
    }
    if summary.dropped > 0 {
        eprintln!(
            "piiwall: {} properties the schema does not declare were dropped (policy.undeclared = \"drop\")",
            summary.dropped
        );
    }
    if summary.failed > 0 {
        eprintln!(
            "piiwall: {} records sanitized, {} failed",
            summary.sanitized, summary.failed
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn reveal(config: &Config, field: &str, tokens: Vec<String>, remote: &Remote) -> anyhow::Result<ExitCode> {
    let tokens = if tokens == ["-"] {
        read_stdin()?
            .lines()
            .map(str::to_owned)
            .filter(|t| !t.is_empty())
            .collect()
    } else {
        tokens
    };
    let mut failed = 0;
    if let Some((client, purpose)) = remote.client()? {
        let answer = remote_call(
            &client,
            "/v1/reveal",
            serde_json::json!({"purpose": purpose, "field": field, "tokens": tokens}),
        )?;
        let values = answer["values"].as_array().cloned().unwrap_or_default();
        for (index, item) in values.iter().enumerate() {
            match item.get("value") {
                Some(value) => println!("{value}"),
                None => {
                    failed += 1;
                    eprintln!(
                        "token {}: {}",
                        index + 1,
                        item["error"].as_str().unwrap_or("not revealed")
                    );
                }
            }
        }
    } else {
        let keyring = keyring(config)?;
        let results: Vec<_> = tokens
            .iter()
            .map(|token| piiwall::sanitize::reveal(&keyring, field, token))
            .collect();
        let not_revealed = results.iter().filter(|r| r.is_err()).count();
        let mut event = local_event(AuditKind::Reveal, remote.purpose.as_deref());
        event.field_paths = vec![field.to_owned()];
        event.outcome = Some(if not_revealed < results.len() {
            AuditOutcome::Allowed
        } else {
            AuditOutcome::Error
        });
        if not_revealed > 0 {
            event.reason = Some(format!("{not_revealed} of {} tokens not revealed", results.len()));
        }
        audit_locally(config, &keyring, vec![event]).context("reveal refused")?;
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(value) => println!("{value}"),
                Err(e) => {
                    failed += 1;
                    eprintln!("token {}: {e}", index + 1);
                }
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// What `tokenize` is asked.
#[derive(clap::Args)]
pub(crate) struct TokenizeArgs {
    /// The annotated schema (local); with --server, give --topic instead.
    #[arg(long, required_unless_present = "server")]
    pub(crate) schema: Option<PathBuf>,
    /// With --server: the topic whose schema to use.
    #[arg(long, requires = "server")]
    pub(crate) topic: Option<String>,
    /// With --server: the writer schema id, for a topic whose schemas come from the registry.
    #[arg(long, requires = "server")]
    pub(crate) schema_id: Option<u32>,
    /// Dotted field path, as in the schema.
    #[arg(long)]
    pub(crate) field: String,
    /// The data subject id, when the schema names one; - reads it from standard input.
    #[arg(long)]
    pub(crate) subject: Option<String>,
    /// The value (a JSON number for numeric fields); - reads it from standard input.
    pub(crate) value: String,
}

pub(crate) fn tokenize(config: &Config, args: TokenizeArgs, remote: &Remote) -> anyhow::Result<ExitCode> {
    let TokenizeArgs {
        schema,
        topic,
        schema_id,
        field,
        subject,
        value,
    } = args;
    if let Some((client, purpose)) = remote.client()? {
        let topic = topic.ok_or_else(|| anyhow::anyhow!("tokenize --server needs --topic"))?;
        let subject = subject.map(from_arg_or_stdin).transpose()?;
        let value = from_arg_or_stdin(value)?;
        let answer = remote_call(
            &client,
            "/v1/tokenize",
            serde_json::json!({"purpose": purpose, "topic": topic, "schema_id": schema_id, "field": field,
                "subject": subject, "value": value}),
        )?;
        println!("{}", answer["token"].as_str().unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let schema = schema.ok_or_else(|| anyhow::anyhow!("tokenize needs --schema (or --server and --topic)"))?;
    let compiled = load_schema(&schema, config)?;
    let sanitizer = sanitizer(config)?;
    let subject = subject.map(from_arg_or_stdin).transpose()?;
    let value = from_arg_or_stdin(value)?;
    let codec = JsonCodec::new(&compiled.writer);
    // A string field takes the text as it is; other types take it as JSON (numbers, booleans).
    let as_string = codec.field_value(&field, &serde_json::Value::String(value.clone()));
    let parsed = match as_string {
        Ok(parsed) => parsed,
        Err(_) => {
            let json = serde_json::from_str(&value).map_err(|_| {
                anyhow::anyhow!("field `{field}`: the value is neither text for a string field nor JSON")
            })?;
            codec.field_value(&field, &json)?
        }
    };
    let token = sanitizer.token_for(&compiled, &field, subject.as_deref(), &parsed)?;
    let mut event = local_event(AuditKind::Tokenize, remote.purpose.as_deref());
    event.field_paths = vec![field.clone()];
    event.subject_token = subject
        .as_deref()
        .map(|s| piiwall::audit::subject_pseudonym(sanitizer.keyring(), s))
        .transpose()?;
    event.outcome = Some(AuditOutcome::Allowed);
    audit_locally(config, sanitizer.keyring(), vec![event]).context("tokenize refused")?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

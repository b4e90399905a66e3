//! The `piiwall` command: parses arguments and calls the library. Exit codes: 0 success, 1 some records or
//! tokens failed (each reported on stderr), 2 the command could not run (bad config, schema, KEK or key store).

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use piiwall::audit::{AuditEvent, AuditKind, AuditOutcome, LocalAudit};
use piiwall::codec::json::JsonCodec;
use piiwall::config::Config;
use piiwall::keys::Keyring;
use piiwall::lint::{self, Severity};
use piiwall::offline;
use piiwall::policy::{CompiledSchema, compile};
use piiwall::producer::Producer;
use piiwall::sanitize::Sanitizer;
use piiwall::stream::{Control, ControlOp};

#[derive(Parser)]
#[command(name = "piiwall", version, about = "A PII firewall for event streams")]
struct Cli {
    /// Config file (TOML); without it, the embedded defaults. PIIWALL_SECTION__KEY variables override either.
    #[arg(long, global = true, env = "PIIWALL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole pipeline on an in-process Kafka mock cluster with the example schemas; prints what it did.
    Demo,
    /// Run the stream processor: raw topics in, sanitized topics out (needs --config with a [kafka] section).
    Run,
    /// Sanitize plain-JSON records (one per line) with an annotated schema.
    Sanitize {
        #[arg(long)]
        schema: PathBuf,
        /// Input file, or - for standard input.
        #[arg(long, default_value = "-")]
        input: String,
        /// Output file, or - for standard output.
        #[arg(long, default_value = "-")]
        output: String,
    },
    /// Reveal tokens or ciphertexts found in one field; prints one JSON value per line.
    Reveal {
        /// The field the tokens were found in: its path, or the `kind` its annotation names.
        #[arg(long)]
        field: String,
        /// Tokens (pwt1.… / pwe2.…); - reads them from standard input, one per line.
        #[arg(required = true)]
        tokens: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the token a field's value gets, to filter sanitized data by it.
    Tokenize {
        /// The annotated schema (local); with --server, give --topic instead.
        #[arg(long, required_unless_present = "server")]
        schema: Option<PathBuf>,
        /// With --server: the topic whose schema to use.
        #[arg(long, requires = "server")]
        topic: Option<String>,
        /// With --server: the writer schema id, for a topic whose schemas come from the registry.
        #[arg(long, requires = "server")]
        schema_id: Option<u32>,
        /// Dotted field path, as in the schema.
        #[arg(long)]
        field: String,
        /// The data subject id, when the schema names one; - reads it from standard input.
        #[arg(long)]
        subject: Option<String>,
        /// The value (a JSON number for numeric fields); - reads it from standard input.
        value: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Forget a data subject: destroy all its keys (crypto-shredding).
    Forget {
        /// The subject id; - reads it from standard input (keeps it out of shell history).
        subject: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Register the example schemas with a Schema Registry and send their sample events (the compose stack's
    /// sample producer).
    Samples {
        /// Kafka bootstrap servers.
        #[arg(long)]
        brokers: String,
        /// The Confluent-compatible Schema Registry URL.
        #[arg(long)]
        registry: String,
    },
    /// Subject-rights API tools.
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Quarantine tools.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Schema tools.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
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

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file with the PIIWALL_* environment overrides applied, without connecting anywhere;
    /// print the effective configuration with secrets masked. Exit 2 when it is not valid.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Print the SHA-256 digest of a bearer token read from standard input: what api.principals.token_sha256 holds.
    Digest,
}

/// Where an operator command acts: the local key store, or a running instance's API.
#[derive(clap::Args)]
struct Remote {
    /// Send the request to a running instance (its http.listen URL) instead of acting on the local key store.
    #[arg(long, requires = "token_file")]
    server: Option<String>,
    /// The file holding the bearer token for --server.
    #[arg(long, requires = "server")]
    token_file: Option<PathBuf>,
    /// Why the call is made: recorded in the audit event; with --server, required and checked against the caller's
    /// role.
    #[arg(long)]
    purpose: Option<String>,
}

impl Remote {
    /// The API client and the stated purpose, when --server is given.
    fn client(&self) -> anyhow::Result<Option<(piiwall::api::client::Client, String)>> {
        let (Some(server), Some(token_file)) = (&self.server, &self.token_file) else {
            return Ok(None);
        };
        let purpose = self
            .purpose
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--server needs --purpose: say why the call is made"))?;
        Ok(Some((piiwall::api::client::Client::new(server, token_file)?, purpose)))
    }
}

/// Runs one API call on a fresh runtime.
fn remote_call(
    client: &piiwall::api::client::Client,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(runtime.block_on(client.call(path, &body))?)
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Re-run quarantined records through the firewall once their cause is fixed; exit 1 if some still fail.
    Replay,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check every instance's chain in an audit topic: no event removed, reordered or altered.
    Verify {
        /// The audit topic (default: audit.topic of the config).
        #[arg(long)]
        topic: Option<String>,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Print the sanitized schema derived from an annotated schema.
    Sanitized { file: PathBuf },
    /// Lint annotated schemas: annotation errors, and unannotated fields that look like PII.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Sample records of the (one) schema, JSON one per line: names the unannotated fields whose values the
        /// PII detectors recognise.
        #[arg(long)]
        sample: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the pipeline's routine log lines would only crowd it.
    let default_level = if matches!(cli.command, Command::Demo) {
        "piiwall=warn"
    } else {
        "piiwall=info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("piiwall: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Config {
        command: ConfigCommand::Check { file },
    } = &cli.command
    {
        let config = Config::load(Some(file))?;
        let problems = config.check_offline();
        println!("{}", config.describe());
        if !problems.is_empty() {
            for problem in &problems {
                eprintln!("piiwall: config: {problem}");
            }
            return Ok(ExitCode::from(2));
        }
        eprintln!("{}: valid", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(piiwall::demo::run(&mut io::stdout().lock()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            if cli.config.is_none() {
                bail!("run needs --config FILE (see config/piiwall.toml)");
            }
            run_stream(config)
        }
        Command::Sanitize { schema, input, output } => {
            let compiled = load_schema(&schema, &config)?;
            let sanitizer = sanitizer(&config)?;
            let input: Box<dyn BufRead> = match input.as_str() {
                "-" => Box::new(io::stdin().lock()),
                path => Box::new(BufReader::new(
                    File::open(path).with_context(|| format!("cannot open input {path}"))?,
                )),
            };
            let output: Box<dyn Write> = match output.as_str() {
                "-" => Box::new(BufWriter::new(io::stdout().lock())),
                path => Box::new(BufWriter::new(
                    File::create(path).with_context(|| format!("cannot create output {path}"))?,
                )),
            };
            let summary = offline::sanitize_lines(
                &compiled,
                &sanitizer,
                config.keys.max_encryptions,
                input,
                output,
                |line, e| eprintln!("line {line}: {e}"),
            )?;
            for key in &summary.retired {
                eprintln!(
                    "piiwall: a key reached keys.max_encryptions_per_key: new data uses its version {}",
                    key.version
                );
                announce_locally(&config, sanitizer.keyring(), ControlOp::Rotate, &key.scope);
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
            if summary.failed > 0 {
                eprintln!(
                    "piiwall: {} records sanitized, {} failed",
                    summary.sanitized, summary.failed
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reveal { field, tokens, remote } => {
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
                let keyring = keyring(&config)?;
                let results: Vec<_> = tokens
                    .iter()
                    .map(|token| piiwall::sanitize::reveal(&keyring, &field, token))
                    .collect();
                let not_revealed = results.iter().filter(|r| r.is_err()).count();
                let mut event = local_event(AuditKind::Reveal, remote.purpose.as_deref());
                event.field_paths = vec![field.clone()];
                event.outcome = Some(if not_revealed < results.len() {
                    AuditOutcome::Allowed
                } else {
                    AuditOutcome::Error
                });
                if not_revealed > 0 {
                    event.reason = Some(format!("{not_revealed} of {} tokens not revealed", results.len()));
                }
                audit_locally(&config, &keyring, vec![event]).context("reveal refused")?;
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
        Command::Tokenize {
            schema,
            topic,
            schema_id,
            field,
            subject,
            value,
            remote,
        } => {
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
            let compiled = load_schema(&schema, &config)?;
            let sanitizer = sanitizer(&config)?;
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
            audit_locally(&config, sanitizer.keyring(), vec![event]).context("tokenize refused")?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget { subject, remote } => {
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
                    let keyring = keyring(&config)?;
                    let mut event = local_event(AuditKind::Forget, remote.purpose.as_deref());
                    event.subject_token = Some(piiwall::audit::subject_pseudonym(&keyring, &subject)?);
                    let destroyed = keyring.forget_subject(&subject)?;
                    for scope in keyring.subject_scopes(&subject) {
                        announce_locally(&config, &keyring, ControlOp::Forget, &scope);
                    }
                    event.outcome = Some(AuditOutcome::Allowed);
                    let shredded = AuditEvent::key_shredded(destroyed as i64);
                    print_forgotten(destroyed);
                    return audited_after(audit_locally(&config, &keyring, vec![event, shredded]));
                }
            };
            print_forgotten(destroyed);
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command:
                KeysCommand::Rotate {
                    domain,
                    subject,
                    remote,
                },
        } => {
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
                    let keyring = keyring(&config)?;
                    let mut event = local_event(AuditKind::KeyRotated, remote.purpose.as_deref());
                    let scope = match &subject {
                        Some(subject) => {
                            event.subject_token = Some(piiwall::audit::subject_pseudonym(&keyring, subject)?);
                            keyring.subject_scope(subject)
                        }
                        None => Keyring::domain_scope(&domain),
                    };
                    let version = keyring.rotate(&scope)?;
                    announce_locally(&config, &keyring, ControlOp::Rotate, &scope);
                    event.outcome = Some(AuditOutcome::Allowed);
                    println!("rotated: new data uses key version {version}; older versions still reveal");
                    return audited_after(audit_locally(&config, &keyring, vec![event]));
                }
            };
            println!("rotated: new data uses key version {version}; older versions still reveal");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Rewrap { batch },
        } => {
            let keyring = keyring(&config)?;
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
            let audited = audit_locally(&config, &keyring, vec![event]);
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
        Command::Keys {
            command: KeysCommand::ReapplyForgets,
        } => {
            if !config.kafka.brokers_configured {
                bail!("keys reapply-forgets reads keys.control_topic: the config names no kafka.brokers");
            }
            let keyring = keyring(&config)?;
            let ledger =
                piiwall::stream::forgotten_scopes(&kafka_client(&config), &config.keys.control_topic, &keyring)?;
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
            audited_after(audit_locally(&config, &keyring, vec![event]))
        }
        Command::Keys {
            command: KeysCommand::PublishForgets,
        } => {
            if !config.kafka.brokers_configured {
                bail!("keys publish-forgets writes keys.control_topic: the config names no kafka.brokers");
            }
            let keyring = keyring(&config)?;
            let client = kafka_client(&config);
            let ledger = piiwall::stream::forgotten_scopes(&client, &config.keys.control_topic, &keyring)?;
            let on_ledger: std::collections::HashSet<&String> = ledger.scopes.iter().collect();
            let missing: Vec<String> = keyring
                .forgotten_subject_scopes()?
                .into_iter()
                .filter(|scope| !on_ledger.contains(scope))
                .collect();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(piiwall::stream::ensure_ledger(&client, &config))?;
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
        Command::Config { .. } => unreachable!("handled before the config is loaded"),
        Command::Samples { brokers, registry } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let sent = runtime.block_on(piiwall::demo::produce_samples(&brokers, &registry))?;
            println!("registered the example schemas and sent {sent} sample events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Api {
            command: ApiCommand::Digest,
        } => {
            let token = read_stdin()?;
            let token = token.trim();
            if token.is_empty() {
                bail!("api digest reads the bearer token from standard input, and it was empty");
            }
            println!("{}", piiwall::api::token_digest_hex(token));
            Ok(ExitCode::SUCCESS)
        }
        Command::Quarantine {
            command: QuarantineCommand::Replay,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let summary = runtime.block_on(piiwall::stream::replay(config))?;
            println!(
                "replayed {} record(s); {} still failing; {} gone for good",
                summary.replayed,
                summary.still_failing.len(),
                summary.dropped.len()
            );
            for reason in &summary.still_failing {
                println!("  {reason}");
            }
            for reason in &summary.dropped {
                println!("  gone: {reason}");
            }
            Ok(if summary.still_failing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Audit {
            command: AuditCommand::Verify { topic },
        } => {
            let topic = topic.unwrap_or_else(|| config.audit.topic.clone());
            let report = piiwall::audit::verify(&kafka_client(&config), &topic, &*keyring(&config)?)?;
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
        Command::Schema {
            command: SchemaCommand::Sanitized { file },
        } => {
            let compiled = load_schema(&file, &config)?;
            let pretty: serde_json::Value = serde_json::from_str(&compiled.sanitized_json)?;
            println!("{}", serde_json::to_string_pretty(&pretty)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema {
            command: SchemaCommand::Check { files, sample },
        } => {
            if sample.is_some() && files.len() != 1 {
                bail!("--sample checks the records of one schema: name one schema file");
            }
            let mut errors = 0;
            let mut warnings = 0;
            for file in &files {
                let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
                let mut findings = lint::check(&text, &config.policy);
                if let Some(sample) = &sample {
                    let records = File::open(sample).with_context(|| format!("cannot read {}", sample.display()))?;
                    if findings.iter().all(|f| f.severity != Severity::Error) {
                        findings.extend(lint::check_samples(&text, &config.policy, BufReader::new(records))?);
                    }
                }
                for finding in findings {
                    let (label, counter) = match finding.severity {
                        Severity::Error => ("error", &mut errors),
                        Severity::Warning => ("warning", &mut warnings),
                    };
                    *counter += 1;
                    let at = if finding.path.is_empty() {
                        String::new()
                    } else {
                        format!(" field `{}`:", finding.path)
                    };
                    println!("{}: {label}:{at} {}", file.display(), finding.message);
                }
            }
            println!(
                "{} file(s) checked: {errors} error(s), {warnings} warning(s)",
                files.len()
            );
            Ok(if errors + warnings > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// The audit event of a local command, by the operating-system user, for the purpose given (if any).
fn local_event(kind: AuditKind, purpose: Option<&str>) -> AuditEvent {
    let mut event = AuditEvent::new(kind);
    event.principal = Some(piiwall::audit::local_principal());
    event.purpose = purpose.map(str::to_owned);
    event
}

/// Writes a local command's audit events to the audit topic, waiting for the brokers' acknowledgement. Without
/// configured brokers (offline use) there is nowhere to write them, and stderr says so.
fn audit_locally(config: &Config, keyring: &Arc<Keyring>, events: Vec<AuditEvent>) -> anyhow::Result<()> {
    if piiwall::audit::write_local(config, keyring, events)? == LocalAudit::Offline {
        eprintln!("piiwall: not audited: the config names no kafka.brokers (offline use)");
    }
    Ok(())
}

/// The exit of a command that acted before writing its audit events (forget, rotate: the act stands): 1 when
/// they were not written.
fn audited_after(audit: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    match audit {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("piiwall: done, but not audited: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

/// After a local forget or rotate, when the config names brokers: tells the running instances through the control
/// topic, which is also the ledger `keys reapply-forgets` reads. Best effort: without it they drop cached keys
/// within keys.cache_ttl_secs.
fn print_forgotten(destroyed: usize) {
    println!("forgotten: {destroyed} key version(s) destroyed; later records of this subject are redacted");
    if destroyed == 0 {
        eprintln!(
            "piiwall: note: no key existed under this id. Ids are matched exactly (case, spaces and leading zeros \
             count; uuids in any form): if records carry the id in another form, forget that form too"
        );
    }
}

fn announce_locally(config: &Config, keyring: &Keyring, op: ControlOp, scope: &str) {
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

/// A Kafka client for the configured brokers, with the configured properties.
fn kafka_client(config: &Config) -> rdkafka::ClientConfig {
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (name, value) in &config.kafka.properties {
        client.set(name, value);
    }
    client
}

/// Runs the pipeline on a tokio runtime. The first SIGTERM or SIGINT drains and commits; a second exits at once.
fn run_stream(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let shutdown = piiwall::stream::Shutdown::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("signal received: draining (a second signal exits at once)");
            trigger.trigger();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("piiwall: second signal: exiting without draining");
            std::process::exit(130);
        });
        let summary = piiwall::stream::run(config, shutdown).await?;
        eprintln!(
            "piiwall: stopped: {} records sanitized, {} quarantined",
            summary.sanitized, summary.quarantined
        );
        Ok(ExitCode::SUCCESS)
    });
    // `run` has stopped: a task or blocking call still waiting on brokers that are gone must not keep the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn load_schema(path: &Path, config: &Config) -> anyhow::Result<CompiledSchema> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read schema {}", path.display()))?;
    compile(&text, &config.policy).with_context(|| format!("schema {}", path.display()))
}

fn keyring(config: &Config) -> anyhow::Result<Arc<Keyring>> {
    Ok(Arc::new(Keyring::from_config(&config.keys)?))
}

fn sanitizer(config: &Config) -> anyhow::Result<Sanitizer> {
    Ok(Sanitizer::new(keyring(config)?, config.keys.default_domain.clone()))
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .context("cannot read standard input")?;
    Ok(text)
}

fn from_arg_or_stdin(arg: String) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg);
    }
    let text = read_stdin()?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        bail!("standard input was empty");
    }
    Ok(text.to_owned())
}

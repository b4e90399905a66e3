//! The command line: one module per verb group; `main.rs` only parses and dispatches through [`run`].
//!
//! Exit codes: 0 success; 1 the command ran but found or left problems (records or tokens that failed, schema
//! findings, a broken audit chain, quarantined records still failing, unreadable keys) or its act was done but
//! not audited; 2 the command could not run (bad config, schema, KEK or key store).

mod api;
mod audit;
mod breach;
mod config;
mod keys;
mod offline;
mod schema;
mod stream;
mod subject;

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use piiwall::config::Config;
use piiwall::keys::Keyring;
use piiwall::policy::{CompiledSchema, compile_any};
use piiwall::sanitize::Sanitizer;

use api::Remote;

#[derive(Parser)]
#[command(name = "piiwall", version, about = "A PII firewall for event streams")]
pub(crate) struct Cli {
    /// Config file (TOML); without it, the embedded defaults. PIIWALL_SECTION__KEY variables override either.
    #[arg(long, global = true, env = "PIIWALL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        #[command(flatten)]
        args: offline::TokenizeArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Forget a data subject: destroy all its keys (crypto-shredding).
    Forget {
        /// The subject id; - reads it from standard input (keeps it out of shell history).
        subject: String,
        /// Write the signed erasure receipt (JSON) to this file (`audit verify-receipt` checks it).
        #[arg(long)]
        receipt: Option<std::path::PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// A data subject's rights: access and portability (export).
    Subject {
        #[command(subcommand)]
        command: subject::SubjectCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
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
        command: api::ApiCommand,
    },
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Quarantine tools.
    Quarantine {
        #[command(subcommand)]
        command: stream::QuarantineCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Breach tools.
    Breach {
        #[command(subcommand)]
        command: breach::BreachCommand,
    },
    /// Reports from the audit trail.
    Report {
        #[command(subcommand)]
        command: audit::ReportCommand,
    },
    /// Schema tools.
    Schema {
        #[command(subcommand)]
        command: schema::SchemaCommand,
    },
}

/// Runs a parsed command line.
pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Config check reads the file it is given, not --config.
    if let Command::Config { command } = &cli.command {
        return config::exec(command);
    }
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo => stream::demo(),
        Command::Run => {
            if cli.config.is_none() {
                bail!("run needs --config FILE (see config/piiwall.toml)");
            }
            stream::run(config)
        }
        Command::Samples { brokers, registry } => stream::samples(&brokers, &registry),
        Command::Quarantine { command } => stream::exec(config, command),
        Command::Sanitize { schema, input, output } => offline::sanitize(&config, &schema, &input, &output),
        Command::Reveal { field, tokens, remote } => offline::reveal(&config, &field, tokens, &remote),
        Command::Tokenize { args, remote } => offline::tokenize(&config, args, &remote),
        Command::Forget {
            subject,
            receipt,
            remote,
        } => subject::forget(&config, subject, receipt.as_deref(), &remote),
        Command::Subject { command } => subject::exec(&config, command),
        Command::Keys { command } => keys::exec(&config, command),
        Command::Api { command } => api::exec(command),
        Command::Audit { command } => audit::exec(&config, command),
        Command::Report { command } => audit::report(&config, command),
        Command::Breach { command } => {
            // A key store to look key ids up in, where one exists (never made empty here for nothing).
            let with_keys = match &config.keys.store {
                piiwall::config::StoreLocation::Sqlite(path) => path.exists(),
                _ => true,
            };
            breach::exec(&config, command, with_keys)
        }
        Command::Schema { command } => schema::exec(&config, command),
        Command::Config { .. } => unreachable!("handled before the config is loaded"),
    }
}

pub(crate) fn load_schema(path: &Path, config: &Config) -> anyhow::Result<CompiledSchema> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read schema {}", path.display()))?;
    compile_any(&text, &config.policy).with_context(|| format!("schema {}", path.display()))
}

pub(crate) fn keyring(config: &Config) -> anyhow::Result<Arc<Keyring>> {
    Ok(Arc::new(Keyring::from_config(&config.keys)?))
}

pub(crate) fn sanitizer(config: &Config) -> anyhow::Result<Sanitizer> {
    Ok(Sanitizer::new(keyring(config)?, config.keys.default_domain.clone()))
}

pub(crate) fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .context("cannot read standard input")?;
    Ok(text)
}

pub(crate) fn from_arg_or_stdin(arg: String) -> anyhow::Result<String> {
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

/// A Kafka client for the configured brokers, with the configured properties.
pub(crate) fn kafka_client(config: &Config) -> rdkafka::ClientConfig {
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka.brokers);
    for (name, value) in &config.kafka.properties {
        client.set(name, value);
    }
    client
}

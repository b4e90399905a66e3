//! `schema sanitized` and `schema check`: annotated schemas, offline.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use piiwall::config::Config;
use piiwall::lint::{self, Severity};

use super::load_schema;

#[derive(Subcommand)]
pub(crate) enum SchemaCommand {
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

pub(crate) fn exec(config: &Config, command: SchemaCommand) -> anyhow::Result<ExitCode> {
    match command {
        SchemaCommand::Sanitized { file } => sanitized(config, &file),
        SchemaCommand::Check { files, sample } => check(config, &files, sample.as_deref()),
    }
}

fn sanitized(config: &Config, file: &Path) -> anyhow::Result<ExitCode> {
    let compiled = load_schema(file, config)?;
    if compiled.protobuf().is_some() {
        print!("{}", compiled.published_schema().0);
        return Ok(ExitCode::SUCCESS);
    }
    let pretty: serde_json::Value = serde_json::from_str(compiled.published_schema().0)?;
    println!("{}", serde_json::to_string_pretty(&pretty)?);
    Ok(ExitCode::SUCCESS)
}

fn check(config: &Config, files: &[PathBuf], sample: Option<&Path>) -> anyhow::Result<ExitCode> {
    if sample.is_some() && files.len() != 1 {
        bail!("--sample checks the records of one schema: name one schema file");
    }
    let mut errors = 0;
    let mut warnings = 0;
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
        let mut findings = lint::check(&text, &config.policy);
        if let Some(sample) = sample {
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

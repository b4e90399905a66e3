//! `breach assess`: what a leak of sanitized records exposes (GDPR Art. 33(3)).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use piiwall::breach::{BreachReport, SanitizedSchema, assess_topic};
use piiwall::config::Config;

use super::{kafka_client, keyring, load_schema};

#[derive(Subcommand)]
pub(crate) enum BreachCommand {
    /// What a leak of sanitized records exposes, with the headings of GDPR Art. 33(3): per field whether it is in
    /// clear, tokenized, encrypted, hashed, masked or redacted, the records and the distinct keys (data subjects)
    /// exposed, the consequences and the keys to rotate. Never a value, token, key id or subject in the report.
    Assess {
        /// A sanitized topic (Confluent-framed Avro; schemas from the registry or the local bindings).
        #[arg(long, required_unless_present = "file", conflicts_with_all = ["file", "schema"])]
        topic: Option<String>,
        /// Leaked records as JSON lines, as `sanitize` writes them; needs --schema.
        #[arg(long, requires = "schema")]
        file: Option<PathBuf>,
        /// The schema of --file's records: the annotated schema, or its sanitized form.
        #[arg(long)]
        schema: Option<PathBuf>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `with_keys`: there is a key store to tell subject keys from domain keys and count the data subjects.
pub(crate) fn exec(config: &Config, command: BreachCommand, with_keys: bool) -> anyhow::Result<ExitCode> {
    let BreachCommand::Assess {
        topic,
        file,
        schema,
        json,
    } = command;
    let (source, mut report) = match (topic, file, schema) {
        (Some(topic), _, _) => (topic.clone(), from_topic(config, &topic)?),
        (None, Some(file), Some(schema)) => (file.display().to_string(), from_file(config, &file, &schema)?),
        _ => anyhow::bail!("breach assess needs --topic, or --file with --schema"),
    };
    if with_keys {
        // Without the key store the report still stands, with keys counted but not told apart.
        let identified = keyring(config).and_then(|keyring| Ok(report.identify_keys(&keyring)?));
        if let Err(e) = identified {
            eprintln!("piiwall: the key store could not be read ({e}): keys are counted, not told apart");
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(&source))?);
    } else {
        print!("{}", report.render(&source));
    }
    // Records that could not be assessed make the assessment incomplete: said by the exit code too.
    Ok(if report.unreadable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Breach assessment reads Avro records; JSON Schema and Protobuf topics are counted unreadable, and said so.
const JSON_NOT_YET: &str =
    "not an Avro schema: breach assess reads Avro records only (its records are counted as unreadable)";

fn from_file(config: &Config, file: &std::path::Path, schema: &std::path::Path) -> anyhow::Result<BreachReport> {
    let text = std::fs::read_to_string(schema).with_context(|| format!("cannot read schema {}", schema.display()))?;
    let sanitized = if SanitizedSchema::is_sanitized(&text) {
        text
    } else {
        let compiled = load_schema(schema, config)?;
        if compiled.is_json() || compiled.protobuf().is_some() {
            anyhow::bail!("{}: {JSON_NOT_YET}", schema.display());
        }
        compiled.sanitized_json
    };
    let sanitized =
        SanitizedSchema::parse(&sanitized).map_err(|e| anyhow::anyhow!("schema {}: {e}", schema.display()))?;
    let input = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut report = BreachReport::default();
    let mut reader = std::io::BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {}", file.display()))?
            == 0
        {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // A line that is not UTF-8 JSON is counted, never quoted: a leaked line is someone's data.
        match serde_json::from_slice(&line) {
            Ok(record) => report.add(&sanitized, &record),
            Err(_) => {
                report.records += 1;
                report.unreadable += 1;
            }
        }
    }
    Ok(report)
}

fn from_topic(config: &Config, topic: &str) -> anyhow::Result<BreachReport> {
    // Local bindings of the topic's input (this topic is its output): the sanitized schema of each sanitized id.
    // Ids are per topic, so only this topic's bindings count.
    let mut local: HashMap<u32, PathBuf> = HashMap::new();
    for binding in &config.bindings {
        if format!("{}{}", binding.topic, config.kafka.output_suffix) == topic {
            local.insert(binding.sanitized_id, binding.schema.clone());
        }
    }
    let registry = config
        .registry
        .as_deref()
        .map(piiwall::stream::registry::RegistryClient::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Schema ids and their failures are named (they are not data); the records are counted as unreadable.
    let schema_of = |id: u32| -> Option<String> {
        if let Some(path) = local.get(&id) {
            return match load_schema(path, config) {
                Ok(compiled) if compiled.is_json() || compiled.protobuf().is_some() => {
                    eprintln!("piiwall: schema id {id} ({}): {JSON_NOT_YET}", path.display());
                    None
                }
                Ok(compiled) => Some(compiled.sanitized_json),
                Err(e) => {
                    eprintln!("piiwall: schema id {id} ({}): {e:#}", path.display());
                    None
                }
            };
        }
        let Some(registry) = registry.as_ref() else {
            eprintln!("piiwall: schema id {id} is in no [[schemas.local]] binding of {topic} and no registry is set");
            return None;
        };
        match runtime.block_on(registry.schema(id)) {
            Ok(writer) if writer.kind == piiwall::stream::registry::WriterKind::Avro => Some(writer.text),
            Ok(_) => {
                eprintln!("piiwall: schema id {id}: {JSON_NOT_YET}");
                None
            }
            Err(e) => {
                eprintln!("piiwall: schema id {id}: {e}");
                None
            }
        }
    };
    Ok(assess_topic(&kafka_client(config), topic, schema_of)?)
}

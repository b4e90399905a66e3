//! Configuration in two steps: a serde struct read from TOML with `PIIWALL_SECTION__KEY` environment overrides
//! applied, then a validated [`Config`]. Unknown keys are errors; every default is a named constant below, and
//! `config/piiwall.toml` documents each key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::crypto::KekSource;
use crate::error::ConfigError;
use crate::keys::{DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL, KeyCacheSettings};
use crate::policy::{Action, PolicySettings, Untagged, valid_domain};

/// Where keys live unless `keys.store` says otherwise: a SQLite file under the working directory.
pub const DEFAULT_KEY_STORE: &str = "sqlite:.piiwall/keys.db";
/// The KEK unless `keys.kek` says otherwise: a key file, created on first use (the embedded default).
pub const DEFAULT_KEK: &str = "file:.piiwall/kek.key";
/// The key domain of records that name no data subject, unless `keys.default_domain` or the schema's `pii.domain`
/// says otherwise.
pub const DEFAULT_DOMAIN: &str = "default";
/// `policy.untagged` unless set: refuse schemas without annotations.
pub const DEFAULT_UNTAGGED: &str = "block";
/// Prefix of environment overrides: `PIIWALL_KEYS__STORE` overrides `keys.store`.
pub const ENV_PREFIX: &str = "PIIWALL_";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    keys: RawKeys,
    policy: RawPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKeys {
    store: Option<String>,
    kek: Option<String>,
    cache_capacity: Option<u64>,
    cache_ttl_secs: Option<u64>,
    default_domain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    untagged: Option<String>,
    tags: Option<BTreeMap<String, String>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub keys: KeysConfig,
    pub policy: PolicySettings,
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub store: StoreLocation,
    pub kek: KekSource,
    pub cache: KeyCacheSettings,
    pub default_domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
}

impl Config {
    /// Reads the config file (or the defaults when `path` is `None`) with the process's environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?,
            None => String::new(),
        };
        let origin = path.map_or_else(|| "the defaults".to_owned(), |p| p.display().to_string());
        Self::parse(&text, std::env::vars(), &origin)
    }

    /// Parses TOML text, applies `PIIWALL_*` overrides from `env`, and validates.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e| ConfigError(format!("{origin}: {e}")))?;
        let overridden = apply_env(&mut table, env)?;
        let raw: RawConfig = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let note = if overridden {
                " (after PIIWALL_* environment overrides)"
            } else {
                ""
            };
            ConfigError(format!("{origin}{note}: {}", e.message()))
        })?;
        raw.validate()
    }
}

/// Applies `PIIWALL_SECTION__KEY=value` variables; returns whether any applied. Variables without `__`
/// (such as a KEK held in `PIIWALL_KEK`) are not overrides.
fn apply_env(table: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) -> Result<bool, ConfigError> {
    let mut applied = false;
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        // Sections and keys are lowercase; deeper segments (tag names) keep their case.
        let segments: Vec<String> = rest
            .split("__")
            .enumerate()
            .map(|(i, s)| if i < 2 { s.to_ascii_lowercase() } else { s.to_owned() })
            .collect();
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError(format!(
                "{name}: empty segment in an override name (write PIIWALL_SECTION__KEY)"
            )));
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"));
        let value = parsed.unwrap_or(toml::Value::String(value));
        let (last, parents) = segments.split_last().expect("at least two segments");
        let mut node = &mut *table;
        for segment in parents {
            let entry = node
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError(format!("{name}: `{segment}` is not a section")))?;
        }
        node.insert(last.clone(), value);
        applied = true;
    }
    Ok(applied)
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let store = parse_store(self.keys.store.as_deref().unwrap_or(DEFAULT_KEY_STORE))?;
        let kek = match self.keys.kek.as_deref() {
            None => parse_kek(DEFAULT_KEK, true)?,
            Some(text) => parse_kek(text, false)?,
        };
        let capacity = self.keys.cache_capacity.unwrap_or(DEFAULT_CACHE_CAPACITY);
        if capacity == 0 {
            return Err(ConfigError("keys.cache_capacity must be at least 1".into()));
        }
        let ttl = self.keys.cache_ttl_secs.map_or(DEFAULT_CACHE_TTL, Duration::from_secs);
        if ttl.is_zero() {
            return Err(ConfigError("keys.cache_ttl_secs must be at least 1".into()));
        }
        let default_domain = self.keys.default_domain.unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
        if !valid_domain(&default_domain) {
            return Err(ConfigError(
                "keys.default_domain must be 1-64 characters of a-z, 0-9, '.', '_' or '-'".into(),
            ));
        }

        let untagged = match self.policy.untagged.as_deref().unwrap_or(DEFAULT_UNTAGGED) {
            "block" => Untagged::Block,
            "pass" => Untagged::Pass,
            other => {
                return Err(ConfigError(format!(
                    "policy.untagged must be \"block\" or \"pass\", not \"{other}\""
                )));
            }
        };
        let mut policy = PolicySettings {
            untagged,
            ..PolicySettings::default()
        };
        if let Some(tags) = self.policy.tags {
            policy.tag_actions.clear();
            for (tag, action) in tags {
                let parsed = Action::from_name(&action)
                    .filter(|a| *a != Action::Subject)
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "policy.tags.{tag}: \"{action}\" is not an action (tokenize, encrypt, hash, mask, redact)"
                        ))
                    })?;
                policy.tag_actions.insert(tag, parsed);
            }
        }
        Ok(Config {
            keys: KeysConfig {
                store,
                kek,
                cache: KeyCacheSettings { capacity, ttl },
                default_domain,
            },
            policy,
        })
    }
}

fn parse_store(text: &str) -> Result<StoreLocation, ConfigError> {
    match text.split_once(':') {
        Some(("sqlite", path)) if !path.is_empty() => Ok(StoreLocation::Sqlite(PathBuf::from(path))),
        _ => Err(ConfigError(format!(
            "keys.store: \"{text}\" is not a key store location (expected sqlite:PATH)"
        ))),
    }
}

fn parse_kek(text: &str, is_default: bool) -> Result<KekSource, ConfigError> {
    match text.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(KekSource::File {
            path: PathBuf::from(path),
            create: is_default,
        }),
        Some(("env", var)) if !var.is_empty() => Ok(KekSource::Env(var.to_owned())),
        _ => Err(ConfigError("keys.kek must be file:PATH or env:VARIABLE".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            "test.toml",
        )
    }

    #[test]
    fn defaults_are_the_embedded_ones() {
        let config = parse("", &[]).unwrap();
        assert_eq!(config.keys.store, StoreLocation::Sqlite(".piiwall/keys.db".into()));
        assert_eq!(
            config.keys.kek,
            KekSource::File {
                path: ".piiwall/kek.key".into(),
                create: true
            }
        );
        assert_eq!(config.keys.default_domain, "default");
        assert_eq!(config.policy.untagged, Untagged::Block);
        assert_eq!(config.policy.tag_actions.get("PII"), Some(&Action::Encrypt));
    }

    #[test]
    fn environment_overrides_win_and_keep_types() {
        let config = parse(
            "[keys]\ncache_ttl_secs = 5\n",
            &[
                ("PIIWALL_KEYS__CACHE_TTL_SECS", "60"),
                ("PIIWALL_POLICY__TAGS__SENSITIVE", "hash"),
                ("PIIWALL_KEK", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(config.keys.cache.ttl, Duration::from_secs(60));
        assert_eq!(config.policy.tag_actions.get("SENSITIVE"), Some(&Action::Hash));
        let explicit = parse("", &[("PIIWALL_KEYS__KEK", "file:/tmp/k")]).unwrap();
        assert_eq!(
            explicit.keys.kek,
            KekSource::File {
                path: "/tmp/k".into(),
                create: false
            }
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("[keys]\nstroe = \"x\"\n", "stroe"),
            ("[kafka]\n", "kafka"),
            ("[keys]\nstore = \"mysql://x\"\n", "keys.store"),
            ("[keys]\nkek = \"vault:x\"\n", "keys.kek"),
            ("[keys]\ncache_capacity = 0\n", "keys.cache_capacity"),
            ("[keys]\ndefault_domain = \"Bad Domain\"\n", "keys.default_domain"),
            ("[policy]\nuntagged = \"maybe\"\n", "policy.untagged"),
            ("[policy.tags]\nPII = \"scramble\"\n", "policy.tags.PII"),
            ("not toml", "test.toml"),
        ];
        for (text, named) in cases {
            let err = parse(text, &[]).unwrap_err().to_string();
            assert!(err.contains(named), "{text:?} gave {err}");
        }
        let err = parse("", &[("PIIWALL_KEYS__NOPE", "1")]).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("environment"), "{err}");
    }
}

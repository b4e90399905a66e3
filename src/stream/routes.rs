//! What to do with a record's value (or Avro key) of (topic, schema id): its compiled schema, or why it has none.
//!
//! Local bindings (`[[schemas.local]]`) are compiled at start-up. With a Schema Registry (`schemas.registry`),
//! other topics' schemas are fetched by id the first time a lane meets them: the writer schema is compiled, its
//! sanitized schema registered under `<output topic>-value` (`-key` for Avro keys), and the pair cached. A registry that
//! does not answer usefully (see [`super::registry`]) is not the record's fault: [`Routes::resolve`] says so and the
//! lane waits. A schema id the registry does not know is asked again for `schemas.not_found_grace_secs` before its
//! records go to quarantine; a schema that cannot be used is fetched again after `schemas.retry_broken_secs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::framing;
use super::registry::{RegistryClient, RegistryError, WriterKind, WriterSchema};

use crate::codec::Records;
use crate::codec::protobuf::ProtoRecords;
use crate::config::{Config, KeyAction, RecordFraming};
use crate::error::{Error, ValueError};
use crate::policy::{CompiledSchema, PolicySettings, compile, compile_any, compile_json_schema, compile_protobuf};
use crate::transcode::Transcoder;

/// A compiled schema, or why there is none (its records are quarantined with that reason).
#[derive(Clone)]
pub enum Route {
    Ready(Arc<ReadyRoute>),
    Broken(String),
}

pub struct ReadyRoute {
    pub schema_id: u32,
    pub sanitized_id: u32,
    pub schema: CompiledSchema,
    pub transcoder: Transcoder,
    /// How its records are read and written: JSON converted to and from Avro binary, protobuf transcoded directly
    /// (`None`: they are Avro binary).
    pub records: Option<Records>,
    /// Whether sanitized records are written in the Confluent wire format (not for plain-JSON topics).
    pub framed: bool,
}

impl ReadyRoute {
    /// The protobuf records of a `.proto` binding, which are transcoded directly.
    pub fn protobuf(&self) -> Option<&ProtoRecords> {
        match &self.records {
            Some(Records::Protobuf(proto)) => Some(proto),
            _ => None,
        }
    }
}

/// Which part of a record a schema describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Value,
    Key,
}

impl Part {
    /// The Schema Registry subject suffix (TopicNameStrategy).
    fn subject_suffix(self) -> &'static str {
        match self {
            Part::Value => "-value",
            Part::Key => "-key",
        }
    }
}

pub struct Routes {
    /// Local bindings' routes: every bound topic's value, and the keys of those bound with `key = "avro"`.
    local: HashMap<(String, Part), Route>,
    /// How the keys of each locally bound topic are protected.
    local_keys: HashMap<String, KeyAction>,
    /// Locally bound topics of plain JSON, and the schema id their records are routed by.
    plain: HashMap<String, u32>,
    /// The pipeline's input topics: the only ones `tokenize` answers for.
    inputs: std::collections::HashSet<String>,
    registry: Option<Registry>,
}

/// A route's topic, part and schema id.
type RouteKey = (String, Part, u32);

struct Registry {
    client: RegistryClient,
    policy: PolicySettings,
    output_suffix: String,
    key: KeyAction,
    /// Routes and when they were decided: a broken one is fetched again after `retry_broken`.
    resolved: Mutex<HashMap<RouteKey, (Route, Instant)>>,
    /// When the registry first answered "not found" for a schema id, while its grace runs.
    not_found_since: Mutex<HashMap<u32, Instant>>,
    not_found_grace: Duration,
    retry_broken: Duration,
}

impl Routes {
    /// Compiles every local binding. A binding whose schema cannot be read or compiled becomes a broken route: the
    /// pipeline still starts, and that topic's records go to quarantine with the reason.
    pub fn compile(config: &Config) -> Result<Self, Error> {
        let mut local = HashMap::new();
        let mut local_keys = HashMap::new();
        let mut plain = HashMap::new();
        for binding in &config.bindings {
            let framed = binding.format == RecordFraming::Confluent;
            if !framed {
                plain.insert(binding.topic.clone(), binding.id);
            }
            let mut schemas = vec![(Part::Value, &binding.schema, binding.id, binding.sanitized_id)];
            if let Some(key) = &binding.key_schema {
                schemas.push((Part::Key, &key.schema, key.id, key.sanitized_id));
            }
            for (part, path, id, sanitized_id) in schemas {
                let route = match std::fs::read_to_string(path) {
                    Err(e) => Route::Broken(format!("schema file {} cannot be read: {e}", path.display())),
                    Ok(text) => match ready_local(
                        &text,
                        path,
                        binding.message.as_deref(),
                        &config.policy,
                        part,
                        id,
                        sanitized_id,
                        framed,
                    ) {
                        Ok(route) => route,
                        Err(reason) => Route::Broken(format!("schema {}: {reason}", path.display())),
                    },
                };
                if let Route::Broken(reason) = &route {
                    tracing::error!(topic = %binding.topic, ?part, %reason, "schema binding unusable: its records will be quarantined");
                }
                local.insert((binding.topic.clone(), part), route);
            }
            local_keys.insert(binding.topic.clone(), binding.key);
        }
        let registry = match &config.registry {
            None => None,
            Some(url) => Some(Registry {
                client: RegistryClient::new(url)
                    .map_err(|e| Error::Config(crate::error::ConfigError(format!("schemas.registry: {e}"))))?,
                policy: config.policy.clone(),
                output_suffix: config.kafka.output_suffix.clone(),
                key: config.registry_key,
                resolved: Mutex::new(HashMap::new()),
                not_found_since: Mutex::new(HashMap::new()),
                not_found_grace: config.registry_not_found_grace,
                retry_broken: config.registry_retry_broken,
            }),
        };
        Ok(Self {
            local,
            local_keys,
            plain,
            inputs: config.kafka.inputs.iter().cloned().collect(),
            registry,
        })
    }

    /// Splits a record's value into (schema id, payload): the Confluent wire format, or for a plain-JSON topic the
    /// whole value under its binding's id.
    pub fn split<'a>(&self, topic: &str, value: &'a [u8]) -> Result<(u32, &'a [u8]), &'static str> {
        match self.plain.get(topic) {
            Some(id) => Ok((*id, value)),
            None => framing::parse(value),
        }
    }

    /// The route of a record's value. Registry routes must have been [`resolve`](Self::resolve)d first.
    pub fn get(&self, topic: &str, schema_id: u32) -> Route {
        self.get_part(topic, Part::Value, schema_id)
    }

    /// The route of a record's value or Avro key.
    pub fn get_part(&self, topic: &str, part: Part, schema_id: u32) -> Route {
        if self.local_keys.contains_key(topic) {
            return match self.local.get(&(topic.to_owned(), part)) {
                Some(Route::Ready(ready)) if ready.schema_id != schema_id => {
                    Route::Broken(format!("unknown schema id {schema_id} for this topic"))
                }
                Some(route) => route.clone(),
                None => Route::Broken("no key schema bound for this topic".to_owned()),
            };
        }
        match &self.registry {
            Some(registry) => registry
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(topic.to_owned(), part, schema_id))
                .map(|(route, _)| route.clone())
                .unwrap_or_else(|| Route::Broken(format!("schema id {schema_id} was not resolved"))),
            None => Route::Broken("no schema binding for this topic".to_owned()),
        }
    }

    /// The key domain of a locally bound topic's values (its schema's `pii.domain`); `None` for the default domain
    /// or a registry topic.
    pub fn value_domain(&self, topic: &str) -> Option<String> {
        match self.local.get(&(topic.to_owned(), Part::Value)) {
            Some(Route::Ready(route)) => route.schema.plan.domain.clone(),
            _ => None,
        }
    }

    /// How a topic's keys are protected; `None` for a topic nothing binds.
    pub fn key_action(&self, topic: &str) -> Option<KeyAction> {
        match self.local_keys.get(topic) {
            Some(action) => Some(*action),
            None => self.registry.as_ref().map(|r| r.key),
        }
    }

    /// The writer schema of a topic's values, for `tokenize`: the local binding's, or the registry's schema
    /// `schema_id`.
    pub async fn schema_for(&self, topic: &str, schema_id: Option<u32>) -> Result<Arc<ReadyRoute>, Error> {
        // A caller's topic would otherwise make piiwall fetch, compile, cache and register a route for any name.
        if !self.inputs.contains(topic) {
            return Err(ValueError::new("topic", "not an input topic of this pipeline (kafka.inputs)").into());
        }
        let id = match (schema_id, self.local.get(&(topic.to_owned(), Part::Value))) {
            (Some(id), _) => id,
            (None, Some(Route::Ready(route))) => route.schema_id,
            (None, _) => {
                return Err(ValueError::new(
                    "schema_id",
                    "this topic has no usable local schema binding: give the schema id",
                )
                .into());
            }
        };
        self.resolve(&[(topic.to_owned(), Part::Value, id)]).await?;
        match self.get(topic, id) {
            Route::Ready(route) => Ok(route),
            Route::Broken(reason) => Err(ValueError::new("topic", reason).into()),
        }
    }

    /// Fetches, compiles and registers what the registry routes of `wanted` need. `Err` (retriable) when the
    /// registry does not answer: nothing is decided, the caller waits and asks again.
    pub async fn resolve(&self, wanted: &[(String, Part, u32)]) -> Result<(), Error> {
        let Some(registry) = &self.registry else { return Ok(()) };
        for (topic, part, id) in wanted {
            if self.local_keys.contains_key(topic) {
                continue;
            }
            let key = (topic.clone(), *part, *id);
            let decided = registry
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .map(|(route, at)| matches!(route, Route::Ready(_)) || at.elapsed() < registry.retry_broken);
            if decided == Some(true) {
                continue;
            }
            let route = registry.fetch(topic, *part, *id).await?;
            if let Route::Broken(reason) = &route {
                tracing::warn!(%topic, schema_id = id, %reason, "schema unusable: its records will be quarantined");
            }
            registry
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, (route, Instant::now()));
        }
        Ok(())
    }
}

impl Registry {
    /// The route of a schema id: `Err` (retriable) when the registry gave no usable answer, or says "not found"
    /// while the id's grace runs.
    async fn fetch(&self, topic: &str, part: Part, id: u32) -> Result<Route, Error> {
        let writer = match self.client.schema(id).await {
            Ok(writer) => {
                self.not_found_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                writer
            }
            Err(RegistryError::Unavailable(why)) => return Err(Error::Unavailable(why)),
            Err(RegistryError::NotFound(why)) => {
                let first = *self
                    .not_found_since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(id)
                    .or_insert_with(Instant::now);
                if first.elapsed() < self.not_found_grace {
                    return Err(Error::Unavailable(format!(
                        "{why}: asked again until schemas.not_found_grace_secs pass"
                    )));
                }
                return Ok(Route::Broken(format!("the schema registry has no schema id {id}")));
            }
            Err(RegistryError::Refused(why)) => return Ok(Route::Broken(why)),
        };
        let mut route = match ready(&writer.text, Some(&writer), None, &self.policy, part, id, 0, true) {
            Ok(route) => route,
            Err(reason) => return Ok(Route::Broken(format!("schema id {id}: {reason}"))),
        };
        let Route::Ready(ready_route) = &mut route else {
            return Ok(route);
        };
        let subject = format!("{topic}{}{}", self.output_suffix, part.subject_suffix());
        let (sanitized, schema_type) = ready_route.schema.published_schema();
        let registered = match self.client.register(&subject, sanitized, schema_type).await {
            Ok(registered) => registered,
            Err(RegistryError::Unavailable(why) | RegistryError::NotFound(why)) => {
                return Err(Error::Unavailable(why));
            }
            Err(RegistryError::Refused(why)) => {
                return Ok(Route::Broken(format!(
                    "the registry refused the sanitized schema of id {id} ({why})"
                )));
            }
        };
        Arc::get_mut(ready_route).expect("not shared yet").sanitized_id = registered;
        Ok(route)
    }
}

/// Compiles a local schema file into a route: a `.proto` file with the files it imports from beside it (and
/// `message`, the record's message), else Avro or JSON Schema told from the text.
#[allow(clippy::too_many_arguments)]
fn ready_local(
    text: &str,
    path: &std::path::Path,
    message: Option<&str>,
    policy: &PolicySettings,
    part: Part,
    id: u32,
    sanitized_id: u32,
    framed: bool,
) -> Result<Route, String> {
    if !crate::policy::protobuf::is_proto(text) {
        return ready(text, None, None, policy, part, id, sanitized_id, framed);
    }
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let writer = WriterSchema {
        text: text.to_owned(),
        kind: WriterKind::Protobuf,
        references: crate::policy::protobuf::local_imports(text, dir).map_err(|e| e.to_string())?,
    };
    ready(text, Some(&writer), message, policy, part, id, sanitized_id, framed)
}

/// Compiles a writer schema into a route. `registered`: what the registry says the schema is, with its references;
/// `None` (a local file): told from the text. `message`: a `.proto` schema's record message (`None`: its first).
#[allow(clippy::too_many_arguments)]
fn ready(
    schema_text: &str,
    registered: Option<&WriterSchema>,
    message: Option<&str>,
    policy: &PolicySettings,
    part: Part,
    id: u32,
    sanitized_id: u32,
    framed: bool,
) -> Result<Route, String> {
    // A record key's text is never rewritten by detection: two keys would become one (see `DetectPolicy::for_keys`).
    let keys;
    let policy = match part {
        Part::Value => policy,
        Part::Key => {
            keys = PolicySettings {
                detect: policy.detect.for_keys(),
                ..policy.clone()
            };
            &keys
        }
    };
    let schema = match registered.map(|r| (r.kind, &r.references)) {
        None => compile_any(schema_text, policy),
        Some((WriterKind::Avro, _)) => compile(schema_text, policy),
        Some((WriterKind::JsonSchema, _)) => compile_json_schema(schema_text, policy),
        Some((WriterKind::Protobuf, references)) => compile_protobuf(schema_text, references, message, policy),
    }
    .map_err(|e| e.to_string())?;
    if part == Part::Key && (schema.is_json() || schema.protobuf().is_some()) {
        return Err("a key schema must be Avro (key = \"avro\" reads Confluent-framed Avro keys)".to_owned());
    }
    let transcoder = Transcoder::new(&schema).map_err(|e| e.to_string())?;
    let records = Records::for_schema(&schema, &transcoder, policy.undeclared, framed).map_err(|e| e.to_string())?;
    Ok(Route::Ready(Arc::new(ReadyRoute {
        schema_id: id,
        sanitized_id,
        schema,
        transcoder,
        records,
        framed,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local `.proto` binding: its imports are read from beside it, and `message` picks the record's message.
    #[tokio::test]
    async fn a_local_proto_binding_reads_its_imports_and_picks_its_message() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("common")).unwrap();
        std::fs::write(
            dir.path().join("common/address.proto"),
            "syntax = \"proto3\"; package common; import \"piiwall/pii.proto\";\n\
             message Address { string street = 1 [(piiwall.pii).action = \"tokenize\"]; }\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("shop.proto"),
            "syntax = \"proto3\"; package shop;\nimport \"common/address.proto\";\n\
             message Helper { string a = 1; }\nmessage Customer { common.Address home = 1; }\n",
        )
        .unwrap();
        let config = Config::parse(
            &format!(
                "[kafka]\ninputs = [\"t\"]\n[[schemas.local]]\ntopic = \"t\"\nschema = \"{}/shop.proto\"\nid = 7\n\
                 message = \"Customer\"\n",
                dir.path().display()
            ),
            [],
            "test.toml",
        )
        .unwrap();
        let routes = Routes::compile(&config).unwrap();
        let Route::Ready(route) = routes.get("t", 7) else {
            panic!("the binding compiles")
        };
        assert_eq!(route.schema.plan.rules[0].path, "home.street");
        assert_eq!(route.schema.protobuf().unwrap().indexes, vec![1]);
        let wrong = Config::parse(
            "[kafka]\ninputs = [\"t\"]\n[[schemas.local]]\ntopic = \"t\"\nschema = \"a.avsc\"\nmessage = \"M\"\n",
            [],
            "test.toml",
        );
        assert!(wrong.err().unwrap().to_string().contains("not a .proto file"));
    }

    /// `tokenize` names a topic: only the pipeline's inputs are answered for, so a caller cannot make piiwall
    /// resolve, cache and register routes for names of its choosing.
    #[tokio::test]
    async fn only_input_topics_have_a_schema_for_tokenize() {
        let root = env!("CARGO_MANIFEST_DIR");
        let config = Config::parse(
            &format!(
                "[kafka]\ninputs = [\"t\"]\n[[schemas.local]]\ntopic = \"t\"\nschema = \"{root}/schemas/customer_profile.avsc\"\n\
                 [[schemas.local]]\ntopic = \"u\"\nschema = \"{root}/schemas/payment.avsc\"\n"
            ),
            [],
            "test.toml",
        )
        .unwrap();
        let routes = Routes::compile(&config).unwrap();
        assert!(routes.schema_for("t", None).await.is_ok());
        let refused = routes.schema_for("u", None).await.err().unwrap().to_string();
        assert!(refused.contains("not an input topic"), "{refused}");
    }
}

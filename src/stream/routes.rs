//! What to do with a record's value (or Avro key) of (topic, schema id): its compiled schema, or why it has none.
//!
//! Local bindings (`[[schemas.local]]`) are compiled at start-up. With a Schema Registry (`schemas.registry`),
//! other topics' schemas are fetched by id the first time a lane meets them: the writer schema is compiled, its
//! sanitized schema registered under `<output topic>-value` (`-key` for Avro keys), and the pair cached. A registry that does not answer
//! is not the record's fault: [`Routes::resolve`] says so and the lane waits; a registry that answers "unknown"
//! makes the records of that id poison (quarantine).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schema_registry_converter::async_impl::schema_registry::{SrSettings, get_schema_by_id, post_schema};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::config::{Config, KeyAction};
use crate::error::{Error, ValueError};
use crate::policy::{CompiledSchema, PolicySettings, compile};
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
    registry: Option<Registry>,
}

struct Registry {
    settings: SrSettings,
    policy: PolicySettings,
    output_suffix: String,
    key: KeyAction,
    resolved: Mutex<HashMap<(String, Part, u32), Route>>,
}

impl Routes {
    /// Compiles every local binding. A binding whose schema cannot be read or compiled becomes a broken route: the
    /// pipeline still starts, and that topic's records go to quarantine with the reason.
    pub fn compile(config: &Config) -> Result<Self, Error> {
        let mut local = HashMap::new();
        let mut local_keys = HashMap::new();
        for binding in &config.bindings {
            let mut schemas = vec![(Part::Value, &binding.schema, binding.id, binding.sanitized_id)];
            if let Some(key) = &binding.key_schema {
                schemas.push((Part::Key, &key.schema, key.id, key.sanitized_id));
            }
            for (part, path, id, sanitized_id) in schemas {
                let route = match std::fs::read_to_string(path) {
                    Err(e) => Route::Broken(format!("schema file {} cannot be read: {e}", path.display())),
                    Ok(text) => match ready(&text, &config.policy, id, sanitized_id) {
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
                settings: SrSettings::new_builder(url.clone())
                    .set_timeout(std::time::Duration::from_secs(10))
                    .build()
                    .map_err(|e| Error::Config(crate::error::ConfigError(format!("schemas.registry: {}", e.error))))?,
                policy: config.policy.clone(),
                output_suffix: config.kafka.output_suffix.clone(),
                key: config.registry_key,
                resolved: Mutex::new(HashMap::new()),
            }),
        };
        Ok(Self {
            local,
            local_keys,
            registry,
        })
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
                .cloned()
                .unwrap_or_else(|| Route::Broken(format!("schema id {schema_id} was not resolved"))),
            None => Route::Broken("no schema binding for this topic".to_owned()),
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
            if registry
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&key)
            {
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
                .insert(key, route);
        }
        Ok(())
    }
}

impl Registry {
    async fn fetch(&self, topic: &str, part: Part, id: u32) -> Result<Route, Error> {
        let unavailable = |what: &str, e: &schema_registry_converter::error::SRCError| {
            Error::Unavailable(format!("schema registry: {what}: {}", e.error))
        };
        let writer = match get_schema_by_id(id, &self.settings).await {
            Ok(writer) => writer,
            Err(e) if e.retriable => return Err(unavailable("fetching a schema", &e)),
            Err(e) => {
                return Ok(Route::Broken(format!(
                    "the schema registry has no schema id {id} ({})",
                    e.error
                )));
            }
        };
        let mut route = match ready(&writer.schema, &self.policy, id, 0) {
            Ok(route) => route,
            Err(reason) => return Ok(Route::Broken(format!("schema id {id}: {reason}"))),
        };
        let Route::Ready(ready_route) = &mut route else {
            return Ok(route);
        };
        let subject = format!("{topic}{}{}", self.output_suffix, part.subject_suffix());
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, ready_route.schema.sanitized_json.clone());
        let registered = match post_schema(&self.settings, subject, supplied).await {
            Ok(registered) => registered,
            Err(e) if e.retriable => return Err(unavailable("registering a sanitized schema", &e)),
            Err(e) => {
                return Ok(Route::Broken(format!(
                    "the registry refused the sanitized schema of id {id} ({})",
                    e.error
                )));
            }
        };
        Arc::get_mut(ready_route).expect("not shared yet").sanitized_id = registered.id;
        Ok(route)
    }
}

fn ready(schema_json: &str, policy: &PolicySettings, id: u32, sanitized_id: u32) -> Result<Route, String> {
    let schema = compile(schema_json, policy).map_err(|e| e.to_string())?;
    let transcoder = Transcoder::new(&schema).map_err(|e| e.to_string())?;
    Ok(Route::Ready(Arc::new(ReadyRoute {
        schema_id: id,
        sanitized_id,
        schema,
        transcoder,
    })))
}

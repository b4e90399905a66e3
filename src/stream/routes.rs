//! What to do with each input topic: its schema binding compiled once at start-up.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, KeyAction};
use crate::policy::{CompiledSchema, compile};
use crate::transcode::Transcoder;

/// A topic's compiled schema, or why it has none (its records are quarantined with that reason).
pub enum Route {
    Ready(Arc<ReadyRoute>),
    Broken(String),
}

pub struct ReadyRoute {
    pub schema_id: u32,
    pub sanitized_id: u32,
    pub schema: CompiledSchema,
    pub transcoder: Transcoder,
    pub key: KeyAction,
}

/// Routes by input topic.
pub struct Routes {
    by_topic: HashMap<String, Route>,
}

impl Routes {
    /// Compiles every binding. A binding whose schema cannot be read or compiled becomes a broken route: the
    /// pipeline still starts, and that topic's records go to quarantine with the reason.
    pub fn compile(config: &Config) -> Self {
        let mut by_topic = HashMap::new();
        for binding in &config.bindings {
            let route = match std::fs::read_to_string(&binding.schema) {
                Err(e) => Route::Broken(format!("schema file {} cannot be read: {e}", binding.schema.display())),
                Ok(text) => match compile(&text, &config.policy) {
                    Err(e) => Route::Broken(format!("schema {}: {e}", binding.schema.display())),
                    Ok(schema) => match Transcoder::new(&schema) {
                        Err(e) => Route::Broken(format!("schema {}: {e}", binding.schema.display())),
                        Ok(transcoder) => Route::Ready(Arc::new(ReadyRoute {
                            schema_id: binding.id,
                            sanitized_id: binding.sanitized_id,
                            schema,
                            transcoder,
                            key: binding.key,
                        })),
                    },
                },
            };
            if let Route::Broken(reason) = &route {
                tracing::error!(topic = %binding.topic, %reason, "schema binding unusable: its records will be quarantined");
            }
            by_topic.insert(binding.topic.clone(), route);
        }
        Self { by_topic }
    }

    pub fn get(&self, topic: &str) -> Option<&Route> {
        self.by_topic.get(topic)
    }
}

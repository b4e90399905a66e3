//! `piiwall run` assembled from its parts: the HTTP server (`/metrics`, `/healthz`, `/readyz`, and the
//! subject-rights API when principals are configured) around the stream processor. The one place that knows both:
//! [`crate::stream`] serves nothing, [`crate::http`] and [`crate::api`] run no pipeline.

use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::error::Error;
use crate::stream::{Shutdown, Started, Status, Summary};

/// Runs `piiwall run` until `shutdown` fires or a fatal error occurs. The HTTP listener (`http.listen`) is served
/// from the start, so `/readyz` tells what start-up waits for; the API answers once the pipeline's parts are built.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<Summary, Error> {
    if config.kafka.inputs.is_empty() {
        return Err(crate::error::ConfigError("kafka.inputs lists no topic to read".into()).into());
    }
    // Metrics are recorded with the listener off too: an embedding application renders them itself.
    crate::http::prometheus();
    let status = Status::default();
    let api_slot = (!config.api.access.principals.is_empty()).then(|| Arc::new(OnceLock::new()));
    if let Some(listen) = config.http_listen {
        let readiness = crate::http::Readiness {
            consuming: status.consuming.clone(),
            audit_failing: status.audit_failing.clone(),
            waiting_for_brokers: status.waiting_for_brokers.clone(),
            waiting_for_keys: status.waiting_for_keys.clone(),
        };
        crate::http::serve(
            listen,
            readiness,
            shutdown.listen(),
            api_slot.clone(),
            config.http_tls.as_ref(),
        )
        .await?;
    }
    crate::stream::run(config, shutdown, status, |started: Started<'_>| {
        if let Some(slot) = &api_slot {
            let api = Arc::new(crate::api::Api {
                config: started.config.api.clone(),
                sanitizer: started.sanitizer.clone(),
                routes: started.routes.clone(),
                auditor: started.auditor.for_calls(),
                control: started.control.clone(),
                erasure: crate::receipt::Erasure::from_config(started.config, started.client.clone()),
                kafka: started.client.clone(),
                sanitized_topics: started.config.kafka.sanitized_topics(),
            });
            let _ = slot.set(crate::api::router(api));
        }
    })
    .await
}

//! The HTTP server of `piiwall run`: `GET /metrics` (Prometheus text), `GET /healthz` (the process answers),
//! `GET /readyz` (the pipeline subscribed and is consuming; 503 before and while draining), and the subject-rights
//! API ([`crate::api`]) when principals are configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;

/// The process-wide Prometheus recorder: `metrics` has one global recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application's): then ours only renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[derive(Clone)]
struct Ops {
    ready: Arc<AtomicBool>,
}

/// Serves the endpoints on `listen` until `stop` turns true. Returns the bound address (port 0 picks one).
pub async fn serve(
    listen: SocketAddr,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
    api: Option<Arc<crate::api::Api>>,
) -> Result<SocketAddr, Error> {
    prometheus();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("http.listen {listen}"), e))?;
    let bound = listener.local_addr().map_err(|e| Error::io("http.listen", e))?;
    let app = Router::new()
        .route("/metrics", get(|| async { prometheus().render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ops { ready });
    let serves_api = api.is_some();
    let app = match api {
        Some(api) => app.merge(crate::api::router(api)),
        None => app,
    };
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    tracing::info!(address = %bound, api = serves_api, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

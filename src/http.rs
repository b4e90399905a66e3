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
use axum::routing::{any, get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

use crate::error::Error;

/// The process-wide Prometheus recorder: `metrics` has one global recorder, installed on first use, with every
/// metric of [`STATES`] and [`TOTALS`] exported from the start at 0 (a dashboard or an alert on a state that never
/// happened finds a series, not a gap).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application's): then ours only renders nothing.
        let _ = metrics::set_global_recorder(recorder);
        for (name, help) in STATES {
            metrics::describe_gauge!(*name, *help);
            metrics::gauge!(*name).set(0.0);
        }
        for (name, help) in TOTALS {
            metrics::describe_counter!(*name, *help);
            metrics::counter!(*name).absolute(0);
        }
        handle
    })
}

/// The gauges without labels: waiting and paused states (1 while in it), exported at 0 from the start.
pub const STATES: &[(&str, &str)] = &[
    (
        "piiwall_waiting_for_keys",
        "1 while start-up waits for the key store or the KEK provider",
    ),
    ("piiwall_waiting_for_brokers", "1 while the brokers do not answer"),
    (
        "piiwall_partitions_paused",
        "input partitions paused because their lane is full",
    ),
    (
        "piiwall_audit_failing",
        "1 while audit events cannot be written (the pipeline waits)",
    ),
    (
        "piiwall_control_topic_not_append_only",
        "1 when the control topic can be compacted or deleted",
    ),
];

/// The counters without labels, exported at 0 from the start.
pub const TOTALS: &[(&str, &str)] = &[
    (
        "piiwall_keys_created_total",
        "data keys created by this process (new subjects, domains, rotations)",
    ),
    (
        "piiwall_key_store_calls_total",
        "key-store calls for cache misses and new keys",
    ),
    (
        "piiwall_key_store_microseconds_total",
        "time spent in those key-store calls",
    ),
    ("piiwall_audit_failures_total", "failed attempts to write audit events"),
];

/// What `/readyz` reports.
#[derive(Clone)]
pub struct Readiness {
    /// The pipeline subscribed and is consuming (false while starting and draining).
    pub consuming: Arc<AtomicBool>,
    /// The audit writer cannot write: the pipeline waits (fail closed).
    pub audit_failing: Arc<AtomicBool>,
    /// Start-up waits for the Kafka brokers to answer.
    pub waiting_for_brokers: Arc<AtomicBool>,
    /// Start-up waits for the key store or the KEK provider (an HSM, a KMS) to answer.
    pub waiting_for_keys: Arc<AtomicBool>,
}

impl Readiness {
    /// Ready as `consuming` says, with an audit writer that is not failing.
    pub fn new(consuming: Arc<AtomicBool>) -> Self {
        Self {
            consuming,
            audit_failing: Arc::default(),
            waiting_for_brokers: Arc::default(),
            waiting_for_keys: Arc::default(),
        }
    }
}

#[derive(Clone)]
struct Ops {
    ready: Readiness,
}

/// The subject-rights API's routes, set once its parts are built; until then its paths answer 503.
pub type ApiSlot = Arc<OnceLock<Router>>;

/// Serves the endpoints on `listen` until `stop` turns true. Returns the bound address (port 0 picks one).
pub async fn serve(
    listen: SocketAddr,
    ready: Readiness,
    mut stop: watch::Receiver<bool>,
    api: Option<ApiSlot>,
    tls: Option<&crate::config::HttpTls>,
) -> Result<SocketAddr, Error> {
    prometheus();
    let acceptor = tls.map(tls_acceptor).transpose()?;
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
        Some(slot) => app.route("/v1/{*path}", any(api_when_built).with_state(slot)),
        None => app,
    };
    let uses_tls = acceptor.is_some();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        let served = match acceptor {
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
            Some(acceptor) => {
                axum::serve(TlsListener::new(listener, acceptor), app)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    tracing::info!(address = %bound, api = serves_api, tls = uses_tls, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}

/// The API's answer once it is built; 503 while start-up still waits for what it needs (the key store, the KEK).
async fn api_when_built(State(slot): State<ApiSlot>, request: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    use tower::ServiceExt;
    match slot.get() {
        Some(api) => match api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API is starting: it answers once the key store and the KEK provider do (see /readyz)\n",
        )
            .into_response(),
    }
}

async fn readyz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.ready.audit_failing.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: audit events cannot be written; the pipeline waits\n",
        )
    } else if ops.ready.waiting_for_keys.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the key store or the KEK provider (HSM, KMS) to answer\n",
        )
    } else if ops.ready.waiting_for_brokers.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the Kafka brokers to answer\n",
        )
    } else if ops.ready.consuming.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// How long a client may take over its TLS handshake before the listener drops it.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many TLS handshakes may be in progress at once. Beyond it the listener stops accepting: further connections
/// wait in the kernel's accept backlog (they are not refused) until a handshake completes or times out. Waiting keeps
/// a burst of real clients served; the bound keeps clients that connect and never speak from holding unbounded
/// memory and tasks, and [`HANDSHAKE_TIMEOUT`] frees each of their slots after 5 s.
const MAX_HANDSHAKES: usize = 64;

/// The rustls acceptor of `http.tls_cert` (PEM chain) and `http.tls_key` (PEM private key).
fn tls_acceptor(tls: &crate::config::HttpTls) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let config_error = |what: String| Error::Config(crate::error::ConfigError(what));
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| config_error(format!("http.tls_cert {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(config_error(format!(
            "http.tls_cert {}: no certificate in it",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| config_error(format!("http.tls_key {}: {e}", tls.key.display())))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| {
            config_error(format!(
                "http.tls_cert and http.tls_key do not make a TLS identity: {e}"
            ))
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A TCP listener whose connections complete a TLS handshake before axum sees them. Each handshake runs in its own
/// task, bounded by [`HANDSHAKE_TIMEOUT`], at most [`MAX_HANDSHAKES`] at a time, so a client that connects and sends
/// nothing delays no one: accepting never waits on a handshake.
struct TlsListener {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The handshakes in progress; dropping the listener (at shutdown) aborts them.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self {
            listener,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // Cancel-safe, as axum's graceful shutdown needs: `TcpListener::accept` and `JoinSet::join_next` are, and a
    // handshake in progress lives in `self.handshakes`, not in this future.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                // Finished handshakes first: those clients are waiting for an answer.
                biased;
                Some(done) = self.handshakes.join_next() => match done {
                    Ok(Some(connection)) => return connection,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "tls handshake task failed"),
                },
                accepted = self.listener.accept(), if self.handshakes.len() < MAX_HANDSHAKES => match accepted {
                    Ok((stream, peer)) => {
                        let handshake = self.acceptor.accept(stream);
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "tls handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!("tls handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While start-up waits for the key store, `/readyz` says so and the API answers 503; once its routes are set,
    /// requests reach them.
    #[tokio::test]
    async fn the_api_answers_once_built_and_readyz_says_what_start_up_waits_for() {
        let ready = Readiness::new(Arc::default());
        ready.waiting_for_keys.store(true, Ordering::Relaxed);
        let slot: ApiSlot = Arc::default();
        let (_stop, stopped) = watch::channel(false);
        let bound = serve("127.0.0.1:0".parse().unwrap(), ready, stopped, Some(slot.clone()), None)
            .await
            .unwrap();
        let client = reqwest::Client::new();
        let fetch = |path: &str| client.get(format!("http://{bound}{path}")).send();
        let readyz = fetch("/readyz").await.unwrap();
        assert_eq!(readyz.status(), 503);
        assert!(
            readyz
                .text()
                .await
                .unwrap()
                .contains("waiting for the key store or the KEK provider")
        );
        let starting = fetch("/v1/reveal").await.unwrap();
        assert_eq!(starting.status(), 503);
        assert!(starting.text().await.unwrap().contains("the API is starting"));

        let _ = slot.set(Router::new().route("/v1/reveal", get(|| async { "revealed" })));
        let served = fetch("/v1/reveal").await.unwrap();
        assert_eq!(served.status(), 200);
        assert_eq!(served.text().await.unwrap(), "revealed");
        assert_eq!(fetch("/v1/no-such-path").await.unwrap().status(), 404);
    }
}

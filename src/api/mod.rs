//! The subject-rights API, served by `piiwall run` next to `/metrics` (JSON over HTTP, bearer tokens):
//!
//! | endpoint | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/reveal` | `purpose`, `field`, `tokens` | `values`: per token `{"value": …}` or `{"error": …}` |
//! | `POST /v1/tokenize` | `purpose`, `topic`, `field`, `value`, `subject`?, `schema_id`? | `token` |
//! | `POST /v1/subjects/forget` | `purpose`, `subject` | `key_versions_destroyed` |
//! | `POST /v1/subjects/status` | `purpose`, `subject` | `known`, `forgotten`, `key_versions` |
//! | `POST /v1/keys/rotate` | `purpose`, `subject` or `domain` | `version` |
//! | `GET /v1/openapi.json` | | this table as an OpenAPI 3 document (`docs/openapi.json`, `docs/api.yaml`) |
//!
//! Subject ids travel in bodies, never in URLs. Every call is authenticated ([`crate::access`]), authorized by operation,
//! field path and purpose, and audited — denied and failed ones too — with the principal's configured name, the
//! purpose, the fields, the subject as a keyed pseudonym, and the outcome; never a value or a bearer token.
//! Errors are JSON `{"error": …}` and never echo what was sent.

pub mod client;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};

pub use crate::access::{AccessPolicy, Denial, Operation, Principal, Role, parse_utc, path_matches, token_digest_hex};

use crate::audit::{AuditEvent, AuditKind, AuditOutcome, CallAuditor};
use crate::codec::json::JsonCodec;
use crate::config::ApiConfig;
use crate::control::{Control, ControlOp};
use crate::error::{Error, ErrorKind, KeyError, RevealError, ValueError};
use crate::keys::Keyring;
use crate::sanitize::Sanitizer;
use crate::stream::Routes;

/// The API's OpenAPI document (`docs/openapi.json`; `docs/api.yaml` is the same in YAML), served at
/// `GET /v1/openapi.json` without authentication: it describes the surface, it grants nothing.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// The most tokens one reveal request may carry.
pub const MAX_REVEAL_TOKENS: usize = 1_000;

/// What the handlers share.
pub struct Api {
    pub config: ApiConfig,
    pub sanitizer: Arc<Sanitizer>,
    /// The schemas of the pipeline's topics, for tokenize.
    pub routes: Arc<Routes>,
    /// Does not keep the audit writer running: it ends with the pipeline
    /// ([`Auditor::for_calls`](crate::audit::Auditor::for_calls)).
    pub auditor: CallAuditor,
    /// Where forget and rotate are announced to the other instances.
    pub control: Control,
    /// What a forget needs to collect acknowledgements and write its receipt.
    pub erasure: crate::receipt::Erasure,
    /// Brokers and the `[kafka.properties]` passthrough, for exports' reads.
    pub kafka: rdkafka::ClientConfig,
    /// The sanitized topics of the pipeline (`<input><kafka.output_suffix>`): the topics an export may read.
    pub sanitized_topics: Vec<String>,
}

/// How long one export call scans before it answers with what it found and a resume point.
pub const EXPORT_CALL_SECS: u64 = 20;
/// The most records one export call returns (`max_records` may ask for fewer).
pub const MAX_EXPORT_RECORDS: u64 = 10_000;
/// The most topics one export call names.
pub const MAX_EXPORT_TOPICS: usize = 64;
/// The most bytes of records one export call returns: the answer is built in memory.
pub const MAX_EXPORT_BYTES: u64 = 16 << 20;
/// Exports running at once (each holds a thread, a consumer and up to `MAX_EXPORT_BYTES`); others get 503.
pub const MAX_CONCURRENT_EXPORTS: usize = 2;

/// Exports running now.
static EXPORTS_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Every path the API serves, with its handlers: what `router` mounts and `docs/openapi.json` documents.
fn routes() -> Vec<(&'static str, MethodRouter<Arc<Api>>)> {
    vec![
        ("/v1/reveal", post(reveal)),
        ("/v1/tokenize", post(tokenize)),
        ("/v1/subjects/forget", post(forget)),
        ("/v1/subjects/status", post(status)),
        ("/v1/keys/rotate", post(rotate)),
        ("/v1/subjects/export", post(export)),
        ("/v1/openapi.json", get(openapi)),
    ]
}

/// The API's routes, to be merged into the operations server.
pub fn router(api: Arc<Api>) -> Router {
    let limit = api.config.max_body_bytes;
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, handler)| router.route(path, handler))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(api)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevealRequest {
    purpose: String,
    field: String,
    tokens: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    purpose: String,
    topic: String,
    #[serde(default)]
    schema_id: Option<u32>,
    field: String,
    #[serde(default)]
    subject: Option<String>,
    value: Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectRequest {
    purpose: String,
    subject: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRequest {
    purpose: String,
    subject: String,
    topics: Vec<String>,
    #[serde(default)]
    resume: Option<crate::export::ResumePoint>,
    #[serde(default)]
    max_records: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    purpose: String,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    domain: Option<String>,
}

/// A refused or failed call: its status, its message (never a value), and how the audit records it.
struct Failure {
    status: StatusCode,
    message: String,
    outcome: AuditOutcome,
}

impl Failure {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            outcome: AuditOutcome::Error,
        }
    }

    fn from_denial(denial: Denial) -> Self {
        let (status, message) = match denial {
            Denial::Unauthenticated(why) => (StatusCode::UNAUTHORIZED, why.to_owned()),
            Denial::Forbidden(why) => (StatusCode::FORBIDDEN, why),
        };
        Self {
            status,
            message,
            outcome: AuditOutcome::Denied,
        }
    }

    fn from_error(e: &Error) -> Self {
        let status = match e {
            Error::Reveal(RevealError::SubjectForgotten) => StatusCode::GONE,
            Error::Reveal(_) | Error::Value(_) | Error::Policy(_) => StatusCode::BAD_REQUEST,
            Error::Key(KeyError::Forgotten) => StatusCode::GONE,
            _ if e.kind() == ErrorKind::Retriable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // A dependency's own words (a KMS's message, key ARNs, account ids, request ids) stay in the log.
        let message = match (e, status) {
            (Error::Key(KeyError::Forgotten), _) => e.to_string(),
            (_, StatusCode::SERVICE_UNAVAILABLE) => {
                tracing::warn!(error = %e, "API request failed: a dependency is unavailable");
                "a dependency (the key store, the KEK provider, the brokers or the schema registry) is unavailable; \
                 retry later"
                    .to_owned()
            }
            (Error::Key(_), _) => {
                tracing::error!(error = %e, "API request failed: the key store or the KEK provider");
                "the key store or the KEK provider failed; the piiwall log says why".to_owned()
            }
            _ => e.to_string(),
        };
        Self {
            status,
            message,
            outcome: AuditOutcome::Error,
        }
    }

    fn response(&self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

/// What a handler knows of its authorized caller.
struct Caller {
    /// The field patterns whose originals the caller may see (for this operation and purpose).
    visible_fields: Vec<String>,
}

/// What the access check and the audit event need to know of a request.
struct Described<'a> {
    purpose: &'a str,
    /// The field paths the role must allow (and the audit event records).
    fields: Vec<String>,
    subject: Option<&'a str>,
    /// What else the audit event records in `field_paths` (an export's topics).
    also_audited: Vec<String>,
}

trait ApiRequest: DeserializeOwned + Send + 'static {
    fn describe(&self) -> Described<'_>;
}

impl ApiRequest for RevealRequest {
    fn describe(&self) -> Described<'_> {
        Described {
            purpose: &self.purpose,
            fields: vec![self.field.clone()],
            subject: None,
            also_audited: Vec::new(),
        }
    }
}

impl ApiRequest for TokenizeRequest {
    fn describe(&self) -> Described<'_> {
        Described {
            purpose: &self.purpose,
            fields: vec![self.field.clone()],
            subject: self.subject.as_deref(),
            also_audited: Vec::new(),
        }
    }
}

impl ApiRequest for SubjectRequest {
    fn describe(&self) -> Described<'_> {
        Described {
            purpose: &self.purpose,
            fields: Vec::new(),
            subject: Some(&self.subject),
            also_audited: Vec::new(),
        }
    }
}

impl ApiRequest for ExportRequest {
    fn describe(&self) -> Described<'_> {
        Described {
            purpose: &self.purpose,
            fields: Vec::new(),
            subject: Some(&self.subject),
            // The topics asked for (at most the first MAX_EXPORT_TOPICS: the call refuses more).
            also_audited: self.topics.iter().take(MAX_EXPORT_TOPICS).cloned().collect(),
        }
    }
}

impl ApiRequest for RotateRequest {
    fn describe(&self) -> Described<'_> {
        Described {
            purpose: &self.purpose,
            fields: Vec::new(),
            subject: self.subject.as_deref(),
            also_audited: Vec::new(),
        }
    }
}

/// Parses a request body as the handler of `operation` does, and returns the purpose and field paths its audit
/// event records; a refused body gives the message the caller would get (a position, never the body's text). For
/// tools that check requests ahead of a call, and for the fuzz target of the parser.
pub fn parse_request(operation: Operation, body: &[u8]) -> Result<(String, Vec<String>), String> {
    fn summary<R: ApiRequest>(body: &[u8]) -> Result<(String, Vec<String>), String> {
        let request: R = parse(body).map_err(|failure| failure.message)?;
        let described = request.describe();
        Ok((described.purpose.to_owned(), described.fields))
    }
    match operation {
        Operation::Reveal => summary::<RevealRequest>(body),
        Operation::Tokenize => summary::<TokenizeRequest>(body),
        Operation::Forget | Operation::Status => summary::<SubjectRequest>(body),
        Operation::Rotate => summary::<RotateRequest>(body),
        Operation::Export => summary::<ExportRequest>(body),
    }
}

/// The audit event of a call of `operation`, filled in as the call proceeds.
fn audit_event(operation: Operation) -> AuditEvent {
    AuditEvent::new(match operation {
        Operation::Reveal => AuditKind::Reveal,
        Operation::Tokenize => AuditKind::Tokenize,
        Operation::Forget => AuditKind::Forget,
        Operation::Status => AuditKind::SubjectStatus,
        Operation::Rotate => AuditKind::KeyRotated,
        Operation::Export => AuditKind::SubjectExport,
    })
}

/// Authenticates, parses, authorizes, performs and audits one call; `perform` runs off the reactor (key store work
/// is blocking).
async fn handle<R: ApiRequest>(
    api: Arc<Api>,
    operation: Operation,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    perform: fn(&Api, &Caller, R) -> Result<Json, Error>,
) -> Response {
    // Refused before it acts while its audit event could not be written. A call that destroys or makes keys (forget,
    // rotate) keeps the writer running until its events are queued: its effect stands whatever its answer, so its
    // events must not be lost to a shutdown (which waits for it at most `pipeline.drain_timeout_secs`). A reading
    // call holds no handle while it runs: unaudited, its answer is only withheld.
    let held = match api.auditor.upgrade() {
        Some(auditor) if !auditor.is_behind() => {
            matches!(operation, Operation::Forget | Operation::Rotate).then_some(auditor)
        }
        Some(_) => {
            return refused_unaudited(
                operation,
                "audit events cannot be written at the moment: call again once they can",
            );
        }
        None => return refused_unaudited(operation, "piiwall is stopping: call again once it runs"),
    };
    let mut event = audit_event(operation);
    let result = async {
        let token = bearer(&headers);
        let principal = api
            .config
            .access
            .authenticate(token, crate::audit::now_ms() / 1000)
            .map_err(Failure::from_denial)?;
        event.principal = Some(principal.name.clone());
        let body = body.map_err(|e| Failure {
            status: e.status(),
            message: format!(
                "the request body could not be read ({} bytes at most)",
                api.config.max_body_bytes
            ),
            outcome: AuditOutcome::Error,
        })?;
        let request: R = parse(&body)?;
        let Described {
            purpose,
            fields,
            subject,
            also_audited,
        } = request.describe();
        event.purpose = Some(purpose.to_owned());
        // Only the pipeline's own topic names are recorded: a caller's string is not (it could hold anything).
        let also_audited = also_audited.into_iter().map(|topic| {
            if api.sanitized_topics.contains(&topic) {
                topic
            } else {
                "(not a sanitized topic)".to_owned()
            }
        });
        event.field_paths = fields.iter().cloned().chain(also_audited).collect();
        if let Some(subject) = subject {
            let (keyring, subject) = (api.sanitizer.keyring().clone(), subject.to_owned());
            let token = tokio::task::spawn_blocking(move || crate::audit::subject_pseudonym(&keyring, &subject))
                .await
                .map_err(|_| Failure::from_error(&Error::Kafka("the audit pseudonym task panicked".into())))?;
            event.subject_token = Some(token.map_err(|e| Failure::from_error(&e))?);
        }
        if purpose.trim().is_empty() {
            return Err(Failure::bad_request("purpose must state why the call is made"));
        }
        let field_refs: Vec<&str> = fields.iter().map(String::as_str).collect();
        api.config
            .access
            .authorize(principal, operation, purpose, &field_refs)
            .map_err(Failure::from_denial)?;
        let worker = api.clone();
        let caller = Caller {
            visible_fields: api.config.access.visible_fields(principal, operation, purpose),
        };
        tokio::task::spawn_blocking(move || perform(&worker, &caller, request))
            .await
            .map_err(|_| Failure::from_error(&Error::Kafka("the request handler panicked".into())))?
            .map_err(|e| Failure::from_error(&e))
    }
    .await;
    let response = match &result {
        Ok(answer) => {
            event.outcome = Some(AuditOutcome::Allowed);
            if operation == Operation::Export {
                event.counts = export_counts(answer);
            }
            // Serialized in place (an export's answer can be large: no copy of the tree).
            match serde_json::to_vec(answer) {
                Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
                Err(_) => Failure::from_error(&Error::Kafka("the answer could not be serialized".into())).response(),
            }
        }
        Err(failure) => {
            event.outcome = Some(failure.outcome);
            event.reason = Some(failure.message.clone());
            failure.response()
        }
    };
    // The call's events, a forget's follow-ups with it (the keys it shredded, its receipt), are acknowledged by the
    // audit topic before the answer goes out: fail closed, no answer (a revealed value) that is not audited.
    let principal = event.principal.clone();
    let mut events = vec![event];
    if let (Operation::Forget, Ok(answer)) = (operation, &result) {
        let destroyed = answer["key_versions_destroyed"].as_i64().unwrap_or(0);
        events.push(AuditEvent::key_shredded(destroyed));
        match serde_json::from_value::<crate::receipt::ErasureReceipt>(answer["receipt"].clone()) {
            Ok(receipt) => events.push(receipt.audit_event()),
            // serde's message could quote the receipt's text: only that it failed is logged.
            Err(_) => tracing::error!("a forget's receipt could not be read back for its audit event"),
        }
    }
    // Every event queued (never a part of them), then their acknowledgement awaited for a bounded time.
    let acks = match held.or_else(|| api.auditor.upgrade()) {
        Some(auditor) => Some(auditor.emit_acked(events).await),
        None => None,
    };
    let written = async { acks?.written().await.ok() };
    let response = match tokio::time::timeout(AUDIT_ACK_WAIT, written).await {
        Ok(Some(())) => response,
        // Still queued: written when the audit topic takes it, or lost if piiwall stops first (or stopped already).
        _ => not_audited(
            "the call's audit event was not acknowledged in time, so its answer is withheld; the call may have \
             taken effect (a forget has): call again",
        ),
    };
    tracing::info!(
        operation = operation.name(),
        principal = principal.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        "api call"
    );
    metrics::counter!("piiwall_api_calls_total", "operation" => operation.name(), "status" => response.status().as_str().to_owned())
        .increment(1);
    response
}

/// How long a call waits for its audit events' acknowledgement before its answer is withheld.
const AUDIT_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The answer to a call that is not (or cannot be shown to be) audited: 503, the reason given.
fn not_audited(reason: &str) -> Response {
    Failure {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: reason.to_owned(),
        outcome: AuditOutcome::Error,
    }
    .response()
}

/// A call refused before anything is done, because its audit event could not be written.
fn refused_unaudited(operation: Operation, reason: &str) -> Response {
    tracing::warn!(
        operation = operation.name(),
        reason,
        "api call refused: it could not be audited"
    );
    metrics::counter!("piiwall_api_calls_total", "operation" => operation.name(), "status" => "503").increment(1);
    not_audited(reason)
}

/// What an export found, per topic, for its audit event: records exported and records erased (counts only).
fn export_counts(document: &Json) -> Vec<crate::audit::FieldCount> {
    let mut counts = Vec::new();
    for topic in document["topics"].as_array().into_iter().flatten() {
        let name = topic["topic"].as_str().unwrap_or("?");
        for (action, member) in [("records exported", "records"), ("records erased", "erased_records")] {
            counts.push(crate::audit::FieldCount {
                field_path: name.to_owned(),
                action: action.to_owned(),
                count: topic[member].as_i64().unwrap_or(0),
            });
        }
    }
    counts
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Parses a JSON body. The message names where the problem is, never what was sent (serde's own messages quote
/// the offending value).
fn parse<R: DeserializeOwned>(body: &[u8]) -> Result<R, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "malformed JSON",
            serde_json::error::Category::Data => "a missing, unknown or mistyped field",
            serde_json::error::Category::Io => "an unreadable body",
        };
        Failure::bad_request(format!(
            "request body: {what} at line {} column {} (see the API reference in the README)",
            e.line(),
            e.column()
        ))
    })
}

async fn reveal(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<RevealRequest>(api, Operation::Reveal, headers, body, |api, _, r| {
        if r.tokens.is_empty() || r.tokens.len() > MAX_REVEAL_TOKENS {
            return Err(
                crate::error::ValueError::new("tokens", format!("give 1 to {MAX_REVEAL_TOKENS} tokens")).into(),
            );
        }
        let values: Vec<Json> = r
            .tokens
            .iter()
            .map(|token| match api.sanitizer.reveal(&r.field, token) {
                Ok(value) => json!({ "value": value }),
                Err(e) => json!({ "error": e.to_string() }),
            })
            .collect();
        Ok(json!({ "values": values }))
    })
    .await
}

async fn tokenize(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<TokenizeRequest>(api, Operation::Tokenize, headers, body, |api, _, r| {
        let route = tokio::runtime::Handle::current().block_on(api.routes.schema_for(&r.topic, r.schema_id))?;
        let codec = JsonCodec::new(&route.schema.writer);
        // A number or boolean may arrive as text (as the CLI sends it): read it as JSON when text does not fit.
        let value = match (codec.field_value(&r.field, &r.value), &r.value) {
            (Ok(value), _) => value,
            (Err(e), Json::String(text)) => match serde_json::from_str::<Json>(text) {
                Ok(parsed) => codec
                    .field_value(&r.field, &parsed)
                    .map_err(|e| about_field(e.into(), &r.field))?,
                Err(_) => return Err(about_field(e.into(), &r.field)),
            },
            (Err(e), _) => return Err(about_field(e.into(), &r.field)),
        };
        let token = api
            .sanitizer
            .token_for(&route.schema, &r.field, r.subject.as_deref(), &value)
            .map_err(|e| about_field(e, &r.field))?;
        Ok(json!({ "token": token }))
    })
    .await
}

/// The caller's field path is input (it could hold anything): an error about it names the request's `field`
/// property, not the path that was sent.
fn about_field(e: Error, field: &str) -> Error {
    match e {
        Error::Value(value) => match value.path().strip_prefix(field) {
            Some(rest) => {
                let path = format!("(the request's field){rest}");
                Error::Value(value.at(path))
            }
            None => Error::Value(value),
        },
        other => other,
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn forget(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<SubjectRequest>(api, Operation::Forget, headers, body, |api, _, r| {
        let (receipt, unannounced) = api.erasure.forget(
            api.sanitizer.keyring(),
            Some(&api.control),
            &tokio::runtime::Handle::current(),
            &r.subject,
        )?;
        // Not announced: the keys are destroyed all the same, and the receipt says so (`announced: false`): other
        // instances keep cached keys until their TTL, and `keys publish-forgets` puts it on the ledger later.
        if let Some(e) = unannounced {
            tracing::error!(error = %e, "a forget was not announced on the control topic: run `piiwall keys publish-forgets`");
        }
        Ok(json!({
            "forgotten": true,
            "key_versions_destroyed": receipt.key_versions_destroyed,
            "receipt": receipt,
        }))
    })
    .await
}

async fn status(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<SubjectRequest>(api, Operation::Status, headers, body, |api, _, r| {
        let status = api.sanitizer.keyring().subject_status(&r.subject)?;
        Ok(json!({
            "known": status.known,
            "forgotten": status.forgotten,
            "key_versions": status.key_versions,
        }))
    })
    .await
}

async fn rotate(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<RotateRequest>(api, Operation::Rotate, headers, body, |api, _, r| {
        let keyring = api.sanitizer.keyring();
        let scope = match (&r.subject, &r.domain) {
            (Some(subject), None) => keyring.subject_scope(subject),
            (None, Some(domain)) if crate::policy::valid_domain(domain) => Keyring::domain_scope(domain),
            _ => {
                return Err(crate::error::ValueError::new(
                    "subject",
                    format!("give either subject or domain ({})", crate::policy::DOMAIN_RULE),
                )
                .into());
            }
        };
        let version = keyring.rotate(&scope)?;
        announce(api, ControlOp::Rotate, &scope)?;
        Ok(json!({ "version": version }))
    })
    .await
}

/// One of the [`MAX_CONCURRENT_EXPORTS`] slots, given back on drop.
struct ExportSlot;

impl ExportSlot {
    fn take() -> Result<Self, Error> {
        use std::sync::atomic::Ordering;
        let taken = EXPORTS_RUNNING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONCURRENT_EXPORTS).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(Self),
            Err(_) => Err(Error::Unavailable(format!(
                "{MAX_CONCURRENT_EXPORTS} exports are running; retry later"
            ))),
        }
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        EXPORTS_RUNNING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn export(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle::<ExportRequest>(api, Operation::Export, headers, body, |api, caller, r| {
        if r.topics.is_empty() || r.topics.len() > MAX_EXPORT_TOPICS {
            return Err(ValueError::new("topics", format!("name 1 to {MAX_EXPORT_TOPICS} sanitized topics")).into());
        }
        if let Some(index) = r.topics.iter().position(|t| !api.sanitized_topics.contains(t)) {
            return Err(ValueError::new(
                &format!("topics[{index}]"),
                "not a sanitized topic of this pipeline (an input of kafka.inputs with kafka.output_suffix)",
            )
            .into());
        }
        let max_records = r.max_records.unwrap_or(MAX_EXPORT_RECORDS).clamp(1, MAX_EXPORT_RECORDS);
        let resume = r.resume.unwrap_or_default();
        // As `/v1/reveal` decides: by the context a token is bound to (the field path, or its annotation's kind).
        let may_see = |context: &str| {
            caller
                .visible_fields
                .iter()
                .any(|p| crate::access::path_matches(p, context))
        };
        let _running = ExportSlot::take()?;
        let request = crate::export::ExportRequest {
            subject: &r.subject,
            topics: &r.topics,
            resume: &resume,
            may_see: &may_see,
            deadline: Some(std::time::Instant::now() + std::time::Duration::from_secs(EXPORT_CALL_SECS)),
            max_records: Some(max_records),
            max_bytes: Some(MAX_EXPORT_BYTES),
            cancel: None,
        };
        let exporter = crate::export::Exporter {
            sanitizer: &api.sanitizer,
            routes: &api.routes,
            client: &api.kafka,
            runtime: &tokio::runtime::Handle::current(),
        };
        let mut document = Vec::new();
        // The brokers' failure to serve the reads is theirs, not the caller's: 503 (the log says what failed).
        exporter
            .export(&request, &mut document, &mut |_, _| {})
            .map_err(|e| match e {
                Error::Kafka(why) => Error::Unavailable(why),
                other => other,
            })?;
        serde_json::from_slice(&document).map_err(|_| Error::Kafka("the export document does not parse back".into()))
    })
    .await
}

/// Announces on the control topic from the blocking pool, waiting for the acknowledgement.
fn announce(api: &Api, op: ControlOp, scope: &str) -> Result<(), Error> {
    tokio::runtime::Handle::current()
        .block_on(api.control.announce(api.sanitizer.keyring(), op, scope))
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's field path is input: a path that matches a role's pattern (`address.*`) can carry anything.
    #[test]
    fn errors_about_the_requested_field_do_not_repeat_it() {
        let sent = "address.ada.lovelace@example.com";
        let error = about_field(
            crate::error::ValueError::new(sent, "no such field in the schema").into(),
            sent,
        );
        let message = error.to_string();
        assert!(!message.contains("ada.lovelace"), "{message}");
        assert!(message.contains("no such field"), "{message}");
    }

    #[test]
    fn the_openapi_document_names_every_route_the_router_serves() {
        let document: Json = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<String> = document["paths"].as_object().unwrap().keys().cloned().collect();
        documented.sort();
        let mut served: Vec<String> = routes().into_iter().map(|(path, _)| path.to_owned()).collect();
        served.sort();
        assert_eq!(documented, served, "docs/openapi.json and the router differ");
    }
}

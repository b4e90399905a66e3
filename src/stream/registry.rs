//! A client of a Confluent-compatible Schema Registry: a writer schema by id, and the registration of a sanitized
//! schema. Small and explicit because what matters is how each answer is classified, by its HTTP status, never by
//! its text:
//! - **unavailable** (retry with backoff; nothing is decided): no answer, a timeout, 5xx (registries answer 500
//!   during leader election), 408, 429, 401 and 403 (credentials being rotated are not the record's fault), and a
//!   2xx whose body is truncated or not the expected JSON;
//! - **not found** (404): the caller retries it for a bounded time, since a follower may not yet have seen a schema
//!   registered a moment ago on the leader;
//! - **refused** (any other 4xx, e.g. 409 incompatible, 422 invalid): final for that schema.
//!
//! Credentials in the URL (`https://user:password@host`) are sent as HTTP basic authentication; errors never
//! repeat the URL.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

/// How long one request may take before it counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// What a registry call can come to besides success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// Retry later: the registry did not give a usable answer.
    Unavailable(String),
    /// The registry says it has no such schema.
    NotFound(String),
    /// The registry refused the request for good.
    Refused(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Unavailable(why) | RegistryError::NotFound(why) | RegistryError::Refused(why) => {
                f.write_str(why)
            }
        }
    }
}

pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
}

/// What a writer schema from the registry is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterKind {
    Avro,
    JsonSchema,
    Protobuf,
}

/// A writer schema from the registry: its text, what it is written in, and (Protobuf) the texts of the files it
/// imports, by import path.
#[derive(Debug, Clone)]
pub struct WriterSchema {
    pub text: String,
    pub kind: WriterKind,
    pub references: HashMap<String, String>,
}

/// Files one Protobuf schema may import through references, all levels together: a registry's answer is input.
const MAX_REFERENCES: usize = 64;

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

impl RegistryClient {
    pub fn new(url: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot set up the registry client: {e}"))?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// The schema registered under `id`, with the files a Protobuf schema imports.
    pub async fn schema(&self, id: u32) -> Result<WriterSchema, RegistryError> {
        let answer: SchemaAnswer = self
            .get(&format!("schemas/ids/{id}"), &format!("fetching schema id {id}"))
            .await?;
        let kind = match answer.schema_type.as_deref() {
            None | Some("AVRO") => WriterKind::Avro,
            Some("JSON") => WriterKind::JsonSchema,
            Some("PROTOBUF") => WriterKind::Protobuf,
            Some(other) => {
                return Err(RegistryError::Refused(format!(
                    "schema id {id} is a {other} schema: piiwall reads Avro, JSON Schema and Protobuf"
                )));
            }
        };
        let mut references = HashMap::new();
        if kind == WriterKind::Protobuf {
            // Each reference names a file the schema imports, registered under a subject and version; those may
            // import more. Fetched breadth first (the schema's own references before theirs); one import path named
            // at two different versions is refused: the producer and piiwall could otherwise compile different files.
            let mut versions: HashMap<String, (String, i64)> = HashMap::new();
            let mut pending: std::collections::VecDeque<Reference> = answer.references.into();
            while let Some(reference) = pending.pop_front() {
                let wanted = (reference.subject.clone(), reference.version);
                match versions.get(&reference.name) {
                    Some(seen) if *seen == wanted => continue,
                    Some(_) => {
                        return Err(RegistryError::Refused(format!(
                            "schema id {id} imports {} at two different versions through its references",
                            reference.name
                        )));
                    }
                    None => {}
                }
                if versions.len() >= MAX_REFERENCES {
                    return Err(RegistryError::Refused(format!(
                        "schema id {id} imports more than {MAX_REFERENCES} files through references"
                    )));
                }
                let what = format!("fetching a file schema id {id} imports ({})", reference.name);
                let subject = utf8_percent(&reference.subject);
                let path = format!("subjects/{subject}/versions/{}", reference.version);
                let imported: SchemaAnswer = self.get(&path, &what).await?;
                pending.extend(imported.references);
                versions.insert(reference.name.clone(), wanted);
                references.insert(reference.name, imported.schema);
            }
        } else if !answer.references.is_empty() {
            return Err(RegistryError::Refused(format!(
                "schema id {id} has references: piiwall resolves them for Protobuf schemas only (inline them)"
            )));
        }
        Ok(WriterSchema {
            text: answer.schema,
            kind,
            references,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str, what: &str) -> Result<T, RegistryError> {
        let started = std::time::Instant::now();
        let response = self.http.get(format!("{}/{path}", self.base)).send().await;
        let answer: Result<T, _> = read(response, what).await;
        observe("fetch", started, &answer);
        answer
    }

    /// Registers a schema of type `schema_type` (`AVRO`, `JSON`) under `subject` (or finds it registered); returns
    /// its id.
    pub async fn register(&self, subject: &str, schema: &str, schema_type: &str) -> Result<u32, RegistryError> {
        let what = format!("registering a schema under {subject}");
        let body = match schema_type {
            "AVRO" => serde_json::json!({ "schema": schema }),
            other => serde_json::json!({ "schema": schema, "schemaType": other }),
        }
        .to_string();
        let started = std::time::Instant::now();
        let response = self
            .http
            .post(format!("{}/subjects/{subject}/versions", self.base))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body)
            .send()
            .await;
        let answer: Result<IdAnswer, _> = read(response, &what).await;
        observe("register", started, &answer);
        Ok(answer?.id)
    }
}

/// A subject name as one path segment (subjects may hold `/` and other reserved characters).
fn utf8_percent(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Records a registry call's latency by operation and outcome (`piiwall_registry_seconds`).
fn observe<T>(operation: &'static str, started: std::time::Instant, answer: &Result<T, RegistryError>) {
    let outcome = if answer.is_ok() { "ok" } else { "error" };
    metrics::histogram!("piiwall_registry_seconds", "operation" => operation, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Classifies an answer by its status; reads a 2xx body as `T`.
async fn read<T: serde::de::DeserializeOwned>(
    response: Result<reqwest::Response, reqwest::Error>,
    what: &str,
) -> Result<T, RegistryError> {
    // reqwest's error text names the URL, which may hold credentials: only its kind is kept.
    let response = response.map_err(|e| {
        let kind = if e.is_timeout() { "timed out" } else { "no answer" };
        RegistryError::Unavailable(format!("schema registry: {what}: {kind}"))
    })?;
    let status = response.status();
    if status.is_success() {
        let body = response
            .bytes()
            .await
            .map_err(|_| RegistryError::Unavailable(format!("schema registry: {what}: the answer was cut off")))?;
        return serde_json::from_slice(&body).map_err(|_| {
            RegistryError::Unavailable(format!("schema registry: {what}: the answer is not the expected JSON"))
        });
    }
    let message = format!("schema registry: {what}: HTTP {}", status.as_u16());
    Err(match status.as_u16() {
        404 => RegistryError::NotFound(message),
        408 | 429 | 401 | 403 => RegistryError::Unavailable(message),
        code if code >= 500 => RegistryError::Unavailable(message),
        _ => RegistryError::Refused(message),
    })
}

//! The CLI's side of the API: `reveal`, `tokenize`, `forget` and `keys rotate` with `--server URL --token-file F`
//! send their request to a running instance instead of acting on a local key store.

use std::path::Path;
use std::time::Duration;

use serde_json::Value as Json;

use crate::error::{ConfigError, Error};

/// Longer than any call takes on the server: a forget waits up to 60 s for acknowledgements, an export scans 20 s.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A running instance and the bearer token to call it with.
pub struct Client {
    server: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// `token_file` holds the bearer token (surrounding whitespace ignored); it is read, never printed.
    pub fn new(server: &str, token_file: &Path) -> Result<Self, Error> {
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            return Err(ConfigError(format!("--server: \"{server}\" is not an http:// or https:// URL")).into());
        }
        let token = std::fs::read_to_string(token_file)
            .map_err(|e| Error::io(format!("--token-file {}", token_file.display()), e))?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(ConfigError(format!("--token-file {} is empty", token_file.display())).into());
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            server: server.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// POSTs `body` to `path`; the answer's JSON, or an error with the server's status and message.
    pub async fn call(&self, path: &str, body: &Json) -> Result<Json, Error> {
        let response = self
            .http
            .post(format!("{}{path}", self.server))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("cannot reach {}: {e}", self.server)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Error::Unavailable(format!("reading the answer of {}: {e}", self.server)))?;
        let answer: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
        if status.is_success() {
            return Ok(answer);
        }
        let message = answer["error"].as_str().unwrap_or("no message");
        Err(Error::Remote(format!("{status}: {message}")))
    }
}

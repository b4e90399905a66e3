//! Error types of the library.
//!
//! Every error says which part of the input is wrong (a field path, a line number, a config key) and never
//! the value found there: messages end up in logs and audit events, values are PII. Every error also has an
//! [`ErrorKind`] so callers decide what to do by kind, never by message text.

use std::fmt;

/// What a caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A dependency (key store, registry) did not answer; the same input may succeed later. Never quarantine.
    Retriable,
    /// This input can never be processed as it is (bad bytes, bad annotation, value not matching its schema):
    /// quarantine it and go on with the next one.
    Poison,
    /// The process cannot go on as configured (wrong KEK, bad config): stop and tell the operator.
    Fatal,
}

/// A problem with a schema's annotations or structure, located by field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", location(path))]
pub struct PolicyError {
    /// Dotted field path from the root record (empty for the schema as a whole).
    pub path: String,
    pub problem: String,
}

impl PolicyError {
    pub(crate) fn new(path: &str, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

/// A record whose value does not fit its schema, located by field path. Never carries the value.
///
/// Boxed: the transcoders return `Result<_, ValueError>` from every field they read, and a one-pointer error keeps
/// those results in registers (two strings inline made each a 48-byte value written and read back through memory).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", location(&self.0.path), self.0.problem)]
pub struct ValueError(Box<ValueErrorParts>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ValueErrorParts {
    path: String,
    problem: String,
}

impl ValueError {
    pub(crate) fn new(path: &str, problem: impl Into<String>) -> Self {
        Self(Box::new(ValueErrorParts {
            path: path.to_owned(),
            problem: problem.into(),
        }))
    }

    /// The field path the problem is at (empty: the record itself).
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// What is wrong, without the value.
    pub fn problem(&self) -> &str {
        &self.0.problem
    }

    /// The same problem located at `path`.
    pub(crate) fn at(mut self, path: String) -> Self {
        self.0.path = path;
        self
    }
}

fn location(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("field `{path}`: ")
    }
}

/// Failures of keys and of the key store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("no key-encryption key: {0}")]
    KekMissing(String),
    #[error("the key-encryption key is malformed: {0}")]
    KekMalformed(String),
    #[error(
        "the key-encryption key does not open this key store: it was created with another KEK (check keys.kek and \
         keys.store)"
    )]
    KekMismatch,
    #[error("the key-encryption key's provider refused: {0}")]
    KekRefused(String),
    #[error("key store row fails authentication: the row is corrupted or was written under another KEK")]
    CorruptRow,
    #[error("key store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("key store: {0}")]
    Store(String),
    #[error("the data subject was forgotten: its keys are destroyed and none are made for it again")]
    Forgotten,
}

impl KeyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            KeyError::StoreUnavailable(_) => ErrorKind::Retriable,
            _ => ErrorKind::Fatal,
        }
    }
}

/// Why a token or ciphertext could not be revealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevealError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("subject forgotten: the keys of this token's data subject were destroyed")]
    SubjectForgotten,
    #[error("unknown key id: no key in this key store issued this token")]
    UnknownKey,
    #[error(
        "token does not authenticate: it was altered, forged, or is being revealed for another field than the one it \
         was issued for"
    )]
    Forged,
    #[error("this action is not reversible: {0} values cannot be revealed")]
    NotReversible(&'static str),
}

/// Configuration problems, named by key.
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct ConfigError(pub String);

/// The library's error: one of the above, each with its [`ErrorKind`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("schema: {0}")]
    Policy(#[from] PolicyError),
    #[error("record: {0}")]
    Value(#[from] ValueError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Reveal(#[from] RevealError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The broker refused or failed an operation piiwall cannot do without.
    #[error("kafka: {0}")]
    Kafka(String),
    /// A dependency (schema registry) did not answer; the same work may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// A piiwall server refused or failed an API call (`--server`): its HTTP status and message.
    #[error("server answered {0}")]
    Remote(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Policy(_) | Error::Value(_) | Error::Reveal(_) => ErrorKind::Poison,
            Error::Key(e) => e.kind(),
            Error::Config(_) | Error::Io { .. } | Error::Kafka(_) | Error::Remote(_) => ErrorKind::Fatal,
            Error::Unavailable(_) => ErrorKind::Retriable,
        }
    }

    pub(crate) fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

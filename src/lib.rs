//! # piiwall — a PII firewall for event streams
//!
//! Producers tag the PII fields of their Avro schemas; piiwall sits between raw and sanitized topics:
//!
//! ```text
//!  raw topic ──► decode (Confluent wire format + writer schema)
//!            ──► plan: per-field protection compiled once per schema from its annotations   [policy]
//!            ──► tokenize / encrypt / hash / mask / redact with per-subject keys            [sanitize, keys, crypto]
//!            ──► encode with the sanitized schema ──► <topic>.sanitized   (+ audit events)
//! ```
//!
//! The guarantees, in order:
//! 1. **Fail closed.** A record is written out only when every protected field was protected. A record that
//!    cannot be sanitized (bad bytes, unknown schema, invalid annotation, value not matching its schema) is never
//!    forwarded; a schema with no annotation at all is refused unless `policy.untagged = "pass"`.
//! 2. **Nothing in clear where it does not belong.** No value, token, key or subject id appears in a log line,
//!    a metric label or an error message; errors name the field path, the line, or the config key instead.
//!    Types holding plaintext or key material have no derived `Debug`, and keys are zeroized on drop.
//! 3. **Reversible only with the key.** Tokens and ciphertexts carry their key id and are bound to their field
//!    context; forgetting a data subject destroys its keys (crypto-shredding), after which none of its tokens
//!    anywhere can be revealed and its later records are redacted.
//!
//! The core is pure: [`sanitize::apply`] is a function of (compiled plan, record, keys) with no I/O, unit-tested
//! and benchmarked without Kafka. Modules, in the order a record meets them:
//! [`codec`] (wire forms to values), [`policy`] (annotations to plans and sanitized schemas), [`keys`] and
//! [`crypto`] (data keys and tokens), [`sanitize`] (the core), [`offline`] (the file-to-file command),
//! [`lint`] (schema checks), [`config`]; [`stream`] runs it all on Kafka and serves [`http`] and the
//! subject-rights [`api`].

pub mod api;
pub mod audit;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod detect;
pub mod error;
pub mod http;
pub mod keys;
pub mod lint;
pub mod offline;
pub mod policy;
pub mod producer;
pub mod sanitize;
pub mod stream;
pub mod transcode;

pub use error::{Error, ErrorKind, Result};

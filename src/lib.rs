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
//! Two cores, both pure (no I/O): [`transcode`] sanitizes Avro binary records byte to byte, copying what does not
//! change; it is what `run` and `sanitize` use. [`sanitize::apply`] does the same on a decoded value tree: the
//! reference the transcoder is tested against byte for byte ([`sanitize`] also holds reveal and token lookup).
//! Modules, in the order a record meets them: [`codec`] (wire forms to values), [`policy`] (annotations to plans
//! and sanitized schemas), [`transcode`] and [`sanitize`] (the cores), [`detect`] (PII in untagged text),
//! [`keys`] and [`crypto`] (data keys, KEKs and tokens), [`offline`] (the file-to-file command), [`lint`] (schema
//! checks), [`config`]; [`stream`] runs it all on Kafka (with [`producer`], [`audit`] and the [`control`] topic),
//! and [`server`] is `piiwall run`: the pipeline with [`http`] and the subject-rights [`api`] around it, whose
//! [`access`] policy the config holds.

pub mod access;
pub mod api;
pub mod audit;
pub mod breach;
pub mod codec;
pub mod config;
pub mod control;
pub mod crypto;
pub mod demo;
pub mod detect;
pub mod error;
pub mod export;
pub mod http;
pub mod keys;
pub mod lint;
pub mod offline;
pub mod policy;
pub mod producer;
pub mod receipt;
pub mod sanitize;
pub mod server;
pub mod stream;
pub mod topic_reader;
pub mod transcode;

pub use error::{Error, ErrorKind, Result};

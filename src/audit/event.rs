//! Audit events (`schemas/audit.avsc`) and their chain: each event carries its instance's sequence number, the
//! MAC of the event before it, and its own MAC over everything before the MAC field.

use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::crypto::{Dek, KeyId};

/// The audit events' schema, as shipped in `schemas/audit.avsc`.
pub const AUDIT_SCHEMA_JSON: &str = include_str!("../../schemas/audit.avsc");

pub static AUDIT_SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(AUDIT_SCHEMA_JSON).expect("schemas/audit.avsc is a valid schema"));

/// The key domain whose key makes the chain's MACs.
pub const AUDIT_DOMAIN: &str = "piiwall.audit";
/// The MAC context of the chain.
pub(crate) const MAC_CONTEXT: &str = crate::policy::contexts::AUDIT_CHAIN;
/// An encoded event ends with its MAC: a 32-byte Avro `bytes` (length varint 0x40, then the MAC).
pub(crate) const MAC_TAIL: usize = 33;

/// What happened. The order is the schema's symbol order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    Start,
    Stop,
    ProcessingSummary,
    Quarantine,
    Reveal,
    Tokenize,
    Forget,
    KeyCreated,
    KeyRotated,
    KeyShredded,
    SubjectStatus,
    /// `piiwall keys rewrap` moved stored keys to the current KEK (counts only).
    KekRewrapped,
    /// A forget's signed receipt (`receipt.rs`): its digest in `config_digest`.
    ErasureReceipt,
    /// A subject access export (`subject export`, `POST /v1/subjects/export`): records found, per field revealed.
    SubjectExport,
}

const KIND_SYMBOLS: [&str; 14] = [
    "START",
    "STOP",
    "PROCESSING_SUMMARY",
    "QUARANTINE",
    "REVEAL",
    "TOKENIZE",
    "FORGET",
    "KEY_CREATED",
    "KEY_ROTATED",
    "KEY_SHREDDED",
    "SUBJECT_STATUS",
    "KEK_REWRAPPED",
    "ERASURE_RECEIPT",
    "SUBJECT_EXPORT",
];

/// How an API call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Allowed,
    Denied,
    Error,
}

impl AuditOutcome {
    fn symbol(self) -> &'static str {
        match self {
            AuditOutcome::Allowed => "ALLOWED",
            AuditOutcome::Denied => "DENIED",
            AuditOutcome::Error => "ERROR",
        }
    }
}

impl AuditKind {
    pub fn symbol(self) -> &'static str {
        KIND_SYMBOLS[self as usize]
    }
}

/// How many times a rule was applied in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCount {
    pub field_path: String,
    pub action: String,
    pub count: i64,
}

/// An audit event before it is chained. It holds coordinates, field paths, reasons and tokens: never a value.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: AuditKind,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub schema_id: Option<i32>,
    pub reason: Option<String>,
    pub counts: Vec<FieldCount>,
    pub window: Option<(i64, i64)>,
    pub config_digest: Option<String>,
    /// API calls: who (the configured principal name), why, how it ended, which fields, which subject (a token).
    pub principal: Option<String>,
    pub purpose: Option<String>,
    pub outcome: Option<AuditOutcome>,
    pub field_paths: Vec<String>,
    pub subject_token: Option<String>,
}

impl AuditEvent {
    pub fn new(kind: AuditKind) -> Self {
        Self {
            kind,
            topic: None,
            partition: None,
            offset: None,
            schema_id: None,
            reason: None,
            counts: Vec::new(),
            window: None,
            config_digest: None,
            principal: None,
            purpose: None,
            outcome: None,
            field_paths: Vec::new(),
            subject_token: None,
        }
    }
}

impl AuditEvent {
    /// KEY_SHREDDED: how many key versions of a subject a forget destroyed.
    pub fn key_shredded(destroyed: i64) -> Self {
        let mut event = Self::new(AuditKind::KeyShredded);
        event.counts = vec![FieldCount {
            field_path: "subject".into(),
            action: "key versions destroyed".into(),
            count: destroyed,
        }];
        event
    }
}

/// The position of an instance in its chain.
pub(crate) struct Chain {
    pub(crate) instance: String,
    pub(crate) seq: i64,
    pub(crate) prev_mac: Vec<u8>,
}

impl Chain {
    /// Encodes the next event of the chain, MAC last, and advances the chain.
    pub(crate) fn seal(&mut self, event: &AuditEvent, key: &Dek, now_ms: i64) -> Vec<u8> {
        let nullable = |v: Option<Value>| match v {
            Some(v) => Value::Union(1, Box::new(v)),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let text = |s: &Option<String>| nullable(s.clone().map(Value::String));
        let record = Value::Record(vec![
            (
                "event_id".into(),
                Value::Uuid(apache_avro::Uuid::from_bytes(rand::random())),
            ),
            ("ts".into(), Value::TimestampMillis(now_ms)),
            ("instance".into(), Value::String(self.instance.clone())),
            ("seq".into(), Value::Long(self.seq)),
            (
                "kind".into(),
                Value::Enum(event.kind as u32, event.kind.symbol().into()),
            ),
            ("principal".into(), text(&event.principal)),
            ("purpose".into(), text(&event.purpose)),
            (
                "outcome".into(),
                nullable(event.outcome.map(|o| Value::Enum(o as u32, o.symbol().into()))),
            ),
            ("topic".into(), text(&event.topic)),
            ("partition".into(), nullable(event.partition.map(Value::Int))),
            ("offset".into(), nullable(event.offset.map(Value::Long))),
            ("schema_id".into(), nullable(event.schema_id.map(Value::Int))),
            ("reason".into(), text(&event.reason)),
            (
                "field_paths".into(),
                Value::Array(event.field_paths.iter().cloned().map(Value::String).collect()),
            ),
            ("subject_token".into(), text(&event.subject_token)),
            (
                "counts".into(),
                Value::Array(
                    event
                        .counts
                        .iter()
                        .map(|c| {
                            Value::Record(vec![
                                ("field_path".into(), Value::String(c.field_path.clone())),
                                ("action".into(), Value::String(c.action.clone())),
                                ("count".into(), Value::Long(c.count)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "window_start".into(),
                nullable(event.window.map(|w| Value::TimestampMillis(w.0))),
            ),
            (
                "window_end".into(),
                nullable(event.window.map(|w| Value::TimestampMillis(w.1))),
            ),
            ("config_digest".into(), text(&event.config_digest)),
            ("mac_key_id".into(), Value::String(key.key_id.to_text())),
            ("prev_mac".into(), Value::Bytes(self.prev_mac.clone())),
            ("mac".into(), Value::Bytes(vec![0; 32])),
        ]);
        let mut bytes = Vec::with_capacity(256);
        GenericDatumWriter::builder(&AUDIT_SCHEMA)
            .build()
            .expect("the audit schema resolves")
            .write_value_ref(&mut bytes, &record)
            .expect("an audit event fits its schema");
        let body = bytes.len() - 32;
        let mac = key.mac(MAC_CONTEXT, &bytes[..body - 1]);
        bytes[body..].copy_from_slice(&mac);
        self.seq += 1;
        self.prev_mac = mac.to_vec();
        bytes
    }
}

/// The key id an encoded event names for its MAC, read back by the verifier.
pub(crate) fn mac_key_id(value: &Value) -> Option<KeyId> {
    match value {
        Value::Record(fields) => fields
            .iter()
            .find(|(name, _)| name == "mac_key_id")
            .and_then(|(_, v)| match v {
                Value::String(text) => KeyId::from_text(text),
                _ => None,
            }),
        _ => None,
    }
}

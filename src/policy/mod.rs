//! Policies: what the producer's annotations ask for, compiled once per schema into a [`Plan`].
//!
//! A schema is compiled by [`compile`] into a [`CompiledSchema`]: the writer schema, the plan (which field paths
//! carry which protection, and which field names the data subject) and the *sanitized schema* that the
//! protected records are written with. The plan mirrors the schema's tree but keeps only the branches that lead
//! to a protected field, so untouched parts of a record cost nothing to walk.

mod compile;
pub mod json_schema;
pub mod protobuf;
mod recursion;
mod tags;

pub(crate) use recursion::check_walkable;

use apache_avro::types::Value;

pub(crate) use compile::SUBJECT_TYPES;
pub use compile::{
    CompiledSchema, DOMAIN_RULE, PolicySettings, Protobuf, SANITIZED_MARK, SchemaFormat, Undeclared, Untagged, compile,
    compile_any, compile_json_schema, compile_protobuf, valid_domain,
};
pub use tags::TagPattern;

/// The protection applied to one field (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deterministic, reversible token: same (subject, context, value) gives the same token.
    Tokenize,
    /// AES-256-GCM with a random nonce: reversible, never the same ciphertext twice.
    Encrypt,
    /// Keyed HMAC-SHA256 pseudonym: deterministic, not reversible.
    Hash,
    /// All but the last `keep_last` characters replaced by `*`.
    Mask { keep_last: usize },
    /// Null where the type allows it, else the type's empty value.
    Redact,
    /// The data-subject id: tokenized with the subject's own key, and the key scope of the whole record.
    Subject,
}

/// `keep_last` of `mask` when the annotation does not say.
pub const DEFAULT_MASK_KEEP_LAST: usize = 4;

impl Action {
    /// The name used in annotations, in `pii.applied` and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Action::Tokenize => "tokenize",
            Action::Encrypt => "encrypt",
            Action::Hash => "hash",
            Action::Mask { .. } => "mask",
            Action::Redact => "redact",
            Action::Subject => "subject",
        }
    }

    /// Parses an action name; `mask` gets the default `keep_last`.
    pub fn from_name(name: &str) -> Option<Action> {
        Some(match name {
            "tokenize" => Action::Tokenize,
            "encrypt" => Action::Encrypt,
            "hash" => Action::Hash,
            "mask" => Action::Mask {
                keep_last: DEFAULT_MASK_KEEP_LAST,
            },
            "redact" => Action::Redact,
            "subject" => Action::Subject,
            _ => return None,
        })
    }

    /// Whether `reveal` can give the original value back.
    pub fn is_reversible(self) -> bool {
        matches!(self, Action::Tokenize | Action::Encrypt | Action::Subject)
    }

    /// What protects the keys of a map the action applies to: deterministic, so two keys never become one.
    /// `tokenize` and `encrypt` tokenize them (reversible, as their values are); `hash` and `mask` hash them
    /// (irreversible, as their values are); `redact` empties the map.
    pub fn for_map_keys(self) -> Action {
        match self {
            Action::Tokenize | Action::Encrypt | Action::Subject => Action::Tokenize,
            Action::Hash | Action::Mask { .. } | Action::Redact => Action::Hash,
        }
    }

    /// Whether the action needs a data key.
    pub fn needs_key(self) -> bool {
        matches!(
            self,
            Action::Tokenize | Action::Encrypt | Action::Hash | Action::Subject
        )
    }
}

/// The contexts of piiwall's own pseudonyms and MACs. No schema may name one (as a `kind` or a field path), or the
/// pipeline and `/v1/tokenize` would compute them for anyone who can register a schema.
pub(crate) mod contexts {
    /// The audit trail's subject pseudonyms (under the audit domain's key).
    pub(crate) const AUDIT_SUBJECT: &str = "audit.subject";
    /// The audit chain's MACs.
    pub(crate) const AUDIT_CHAIN: &str = "audit.chain";
    /// Hashed record keys.
    pub(crate) const KAFKA_KEY: &str = "kafka.key";
    /// Quarantined copies of a record's value and key (under the subject's key when it is known).
    pub(crate) const QUARANTINE_VALUE: &str = "quarantine.value";
    pub(crate) const QUARANTINE_KEY: &str = "quarantine.key";
    /// The value of a quarantined deletion (a tombstone): sealed under its own context, so that replay writes a
    /// deletion again and nobody without the key can turn a copy into one.
    pub(crate) const QUARANTINE_TOMBSTONE: &str = "quarantine.tombstone";
    /// Every context starting so is piiwall's: quarantined copies are sealed under `quarantine.value@<source
    /// coordinates>` and the like.
    pub(crate) const QUARANTINE_PREFIX: &str = "quarantine.";

    /// The context of one part of a quarantined copy, bound to the record's source coordinates: a copy relabelled
    /// with other coordinates (say, a topic whose record keys are kept) no longer opens.
    pub(crate) fn quarantine(part: &str, topic: &str, partition: i32, offset: i64) -> String {
        format!("{part}@{topic}/{partition}/{offset}")
    }

    pub(crate) const ALL: [&str; 6] = [
        AUDIT_SUBJECT,
        AUDIT_CHAIN,
        KAFKA_KEY,
        QUARANTINE_VALUE,
        QUARANTINE_KEY,
        QUARANTINE_TOMBSTONE,
    ];
}

/// Key domains piiwall keeps for itself (`piiwall.audit`, `piiwall.quarantine`, ...): no schema, config or request
/// may name one.
pub const RESERVED_DOMAIN_PREFIX: &str = "piiwall";

/// The action names an annotation may use, for error messages.
pub const ACTION_NAMES: &str = "tokenize, encrypt, hash, mask, redact, subject, none";

/// One protected field of a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Dotted path of field names from the root record; arrays, maps and unions are transparent.
    pub path: String,
    pub action: Action,
    /// What a token or ciphertext is bound to (its associated data): the annotation's `kind` when given, so
    /// that fields of one kind in different schemas share tokens; otherwise the field path. `reveal` must be
    /// told the same context.
    pub context: String,
    /// How the keys of the maps inside the field are protected (`None` when it holds no map): keys are data too,
    /// and must stay unique, so they take a deterministic action (see [`Action::for_map_keys`]).
    pub map_keys: Option<Action>,
    /// The context of map keys' tokens and hashes: `<context>#key`.
    pub key_context: String,
}

/// The compiled policy of one schema.
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) root: Vec<(usize, Node)>,
    pub rules: Vec<Rule>,
    pub(crate) subject: Option<SubjectRef>,
    /// The key domain named by the schema's `pii.domain`; `None` uses the configured default.
    pub domain: Option<String>,
    /// What is looked for in the text of fields no annotation protects (`policy.detect`).
    pub detect: crate::detect::DetectPolicy,
}

impl Plan {
    /// The rule of the subject field, if the schema names one.
    pub fn subject_rule(&self) -> Option<&Rule> {
        self.subject.as_ref().map(|s| &self.rules[s.rule])
    }

    /// Whether any field needs a data key (else records are sanitized without touching the key store).
    pub fn needs_keys(&self) -> bool {
        self.rules.iter().any(|r| r.action.needs_key())
    }

    /// Whether a record takes its domain's key: to hash (whatever its subject), or to tokenize and encrypt for want
    /// of a subject of its own.
    pub fn needs_domain_key(&self, has_subject: bool) -> bool {
        self.rules
            .iter()
            .any(|r| r.action == Action::Hash || r.map_keys == Some(Action::Hash))
            || (!has_subject && self.needs_keys())
    }
}

/// Where the subject id sits: field indices from the root, unions unwrapped on the way.
#[derive(Debug, Clone)]
pub(crate) struct SubjectRef {
    pub(crate) rule: usize,
    pub(crate) steps: Vec<usize>,
    /// A long holding an unsigned 64-bit id (a protobuf `uint64` or `fixed64`): named by its unsigned value, the
    /// one a forget request names.
    pub(crate) unsigned: bool,
}

/// The attribute of a long type that holds an unsigned 64-bit value (in the Avro translation of a protobuf schema).
pub(crate) const UNSIGNED: &str = "piiwall.unsigned";

/// A node of the plan tree, matching the shape of an apache-avro [`Value`].
#[derive(Debug, Clone)]
pub(crate) enum Node {
    /// A protected field.
    Protect(Protect),
    /// A record some of whose fields need work: (field index, node).
    Record(Vec<(usize, Node)>),
    Array(Box<Node>),
    Map(Box<Node>),
    /// A union some of whose branches need work, by branch index.
    Union(Vec<Option<Node>>),
}

#[derive(Debug, Clone)]
pub(crate) struct Protect {
    pub(crate) rule: usize,
    pub(crate) shape: Shape,
    /// The output when the value is redacted (action `redact`, or a forgotten subject): null where the
    /// sanitized type allows it, else its empty value.
    pub(crate) redacted: Value,
    /// The scale of a decimal field (0 otherwise): tokens of decimals carry it so `reveal` can print them.
    pub(crate) scale: u32,
}

/// How a protected value is laid out down to its scalars.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    Scalar,
    /// A union of null and scalars; per input branch, the output branch (`None`: the output is not a union).
    Union(Vec<Branch>),
    Array(Box<Shape>),
    Map(Box<Shape>),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Branch {
    pub(crate) is_null: bool,
    pub(crate) out: Option<u32>,
}

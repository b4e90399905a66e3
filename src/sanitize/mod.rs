//! The sanitize core: a plain function of (compiled plan, record, keys).
//!
//! [`apply`] walks the plan over an apache-avro [`Value`] of the writer schema and leaves in its place a value of
//! the sanitized schema. It touches no store, no network and no clock: [`Sanitizer`] resolves the keys a record
//! needs (its subject's key or its domain's key) and then calls it.

mod mask;

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value;
use serde_json::Value as Json;

use crate::crypto::{Dek, Token, TokenKind, plain};
use crate::error::{Error, RevealError, ValueError};
use crate::keys::{BatchKeys, Keyring, RecordKey};
use crate::policy::{Action, CompiledSchema, Node, Plan, Protect, Rule, Shape};
use crate::transcode::{TranscodeScratch, Transcoder};

pub use mask::mask;
pub(crate) use mask::mask_split;

/// The keys one record is sanitized with.
pub struct RecordKeys {
    /// The key of `tokenize`, `encrypt` and `subject`: the subject's, or the domain's when the record names no
    /// subject. `None` when no field needs it.
    pub record: Option<Arc<Dek>>,
    /// The domain's key, for `hash`; `None` when no field needs it.
    pub domain: Option<Arc<Dek>>,
    /// The record's subject was forgotten: every protected field is redacted.
    pub forgotten: bool,
}

/// Sanitizes records, resolving their keys through a [`Keyring`].
pub struct Sanitizer {
    keyring: Arc<Keyring>,
    default_domain: String,
}

impl Sanitizer {
    pub fn new(keyring: Arc<Keyring>, default_domain: impl Into<String>) -> Self {
        Self {
            keyring,
            default_domain: default_domain.into(),
        }
    }

    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Replaces a record of the writer schema by its sanitized form.
    pub fn sanitize(&self, schema: &CompiledSchema, record: &mut Value) -> Result<(), Error> {
        let keys = self.keys_for(&schema.plan, record)?;
        apply(&schema.plan, record, &keys)?;
        Ok(())
    }

    /// Replaces a binary record of the writer schema by its sanitized encoding, appended to `out`, through the
    /// transcoder (no `Value` tree). On error `out` is left as it was.
    pub fn sanitize_binary(
        &self,
        schema: &CompiledSchema,
        transcoder: &Transcoder,
        record: &[u8],
        scratch: &mut TranscodeScratch,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        self.sanitize_binary_in(schema, transcoder, record, None, scratch, out)
    }

    /// As [`sanitize_binary`](Self::sanitize_binary), taking the record's keys from `batch` when they are there
    /// (see [`Keyring::prefetch`]).
    pub fn sanitize_binary_in(
        &self,
        schema: &CompiledSchema,
        transcoder: &Transcoder,
        record: &[u8],
        batch: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let subject = transcoder.subject(record)?;
        self.sanitize_binary_as(schema, transcoder, record, subject.as_deref(), batch, scratch, out)
    }

    /// As [`sanitize_binary_in`](Self::sanitize_binary_in), with the keys of `subject` (`None`: the domain's) instead
    /// of the record's own: a record key is protected with the keys of the value's subject, so that forgetting the
    /// subject covers it too.
    #[allow(clippy::too_many_arguments)]
    pub fn sanitize_binary_as(
        &self,
        schema: &CompiledSchema,
        transcoder: &Transcoder,
        record: &[u8],
        subject: Option<&str>,
        batch: Option<&BatchKeys>,
        scratch: &mut TranscodeScratch,
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let keys = self.keys_in(&schema.plan, subject, batch)?;
        transcoder.transcode(schema, record, &keys, scratch, out)?;
        Ok(())
    }

    /// Whether a data subject is forgotten, from `batch` when it has the subject's key, else through the keyring.
    pub fn is_forgotten(&self, subject: &str, batch: Option<&BatchKeys>) -> Result<bool, Error> {
        let key = match batch.and_then(|b| b.get(subject)) {
            Some(key) => key.clone(),
            None => self.keyring.subject_key(subject)?,
        };
        Ok(matches!(key, RecordKey::Forgotten))
    }

    /// Resolves the keys a record needs: its subject's, else its domain's.
    pub fn keys_for(&self, plan: &Plan, record: &Value) -> Result<RecordKeys, Error> {
        self.keys_for_subject(plan, subject_id(plan, record)?.as_deref())
    }

    /// Resolves the keys of a record whose subject id (if any) is known.
    pub fn keys_for_subject(&self, plan: &Plan, subject: Option<&str>) -> Result<RecordKeys, Error> {
        self.keys_in(plan, subject, None)
    }

    /// The domain a plan's keys belong to.
    pub fn domain_of<'a>(&'a self, plan: &'a Plan) -> &'a str {
        plan.domain.as_deref().unwrap_or(&self.default_domain)
    }

    /// Resolves a record's keys, from `batch` where it has them, else through the keyring.
    pub fn keys_in(&self, plan: &Plan, subject: Option<&str>, batch: Option<&BatchKeys>) -> Result<RecordKeys, Error> {
        let subject_key = match subject {
            Some(subject) => Some(match batch.and_then(|b| b.get(subject)) {
                Some(key) => key.clone(),
                None => self.keyring.subject_key(subject)?,
            }),
            None => None,
        };
        if matches!(subject_key, Some(RecordKey::Forgotten)) {
            return Ok(RecordKeys {
                record: None,
                domain: None,
                forgotten: true,
            });
        }
        let domain = if plan.needs_domain_key(subject.is_some()) {
            let name = self.domain_of(plan);
            Some(match batch.and_then(|b| b.domain(name)) {
                Some(dek) => dek.clone(),
                None => self.keyring.domain_key(name)?,
            })
        } else {
            None
        };
        Ok(match subject_key {
            Some(RecordKey::Active(dek)) => RecordKeys {
                record: Some(dek),
                domain,
                forgotten: false,
            },
            _ => RecordKeys {
                record: domain.clone(),
                domain,
                forgotten: false,
            },
        })
    }

    /// The token an analyst filters by: what `tokenize` (or `hash`) would write for `value` at `path`.
    pub fn token_for(
        &self,
        schema: &CompiledSchema,
        path: &str,
        subject: Option<&str>,
        value: &Value,
    ) -> Result<String, Error> {
        let plan = &schema.plan;
        let (index, rule) = plan
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.path == path)
            .ok_or_else(|| ValueError::new(path, "the schema does not protect this field"))?;
        // A forgotten subject gets no pseudonym of any kind: not even a domain-keyed hash, which would let a caller
        // find the subject's earlier records.
        if plan.subject_rule().is_some() {
            let subject =
                subject.ok_or_else(|| ValueError::new(path, "the schema names a data subject: give --subject"))?;
            // In any form of the id a forget reaches (a uuid's upper case, say): a form forgotten is the subject.
            if self.keyring.subject_status(subject)?.forgotten {
                return Err(RevealError::SubjectForgotten.into());
            }
        }
        let key = match (rule.action, plan.subject_rule(), subject) {
            (Action::Tokenize | Action::Subject, Some(_), Some(subject)) => self.keyring.subject_key(subject)?,
            (Action::Tokenize | Action::Subject, Some(_), None) => {
                return Err(ValueError::new(path, "the schema names a data subject: give --subject").into());
            }
            (Action::Tokenize, None, _) | (Action::Hash, _, _) => RecordKey::Active(
                self.keyring
                    .domain_key(plan.domain.as_deref().unwrap_or(&self.default_domain))?,
            ),
            (action, _, _) => {
                return Err(ValueError::new(
                    path,
                    format!(
                        "{} is not deterministic: there is no single token to filter by",
                        action.name()
                    ),
                )
                .into());
            }
        };
        let dek = match key {
            RecordKey::Active(dek) => dek,
            RecordKey::Forgotten => return Err(RevealError::SubjectForgotten.into()),
        };
        let keys = RecordKeys {
            record: Some(dek.clone()),
            domain: Some(dek),
            forgotten: false,
        };
        let scale = find_protect(&plan.root, index).map_or(0, |p| p.scale);
        match protect_scalar(rule, scale, value, &keys)? {
            Value::String(token) => Ok(token),
            _ => Err(ValueError::new(path, "this field's protection does not produce a text token").into()),
        }
    }

    /// Reveals a token or ciphertext issued for `context` (the field path, or the annotation's kind).
    pub fn reveal(&self, context: &str, token: &str) -> Result<Json, Error> {
        reveal(&self.keyring, context, token)
    }
}

/// Reveals a token or ciphertext issued for `context`.
pub fn reveal(keyring: &Keyring, context: &str, token: &str) -> Result<Json, Error> {
    let token = Token::parse(token)?;
    if token.kind == TokenKind::Hash {
        return Err(RevealError::NotReversible("hash").into());
    }
    let dek = keyring.key_by_id(token.key_id)?;
    let plaintext = dek.open(&token, context)?;
    Ok(plain::to_json(&plaintext).ok_or(RevealError::Forged)?)
}

/// The subject id of a record, if its schema names one and the record has a (non-empty) value there.
pub fn subject_id(plan: &Plan, record: &Value) -> Result<Option<String>, ValueError> {
    let Some(subject) = &plan.subject else {
        return Ok(None);
    };
    let mut value = record;
    for &step in &subject.steps {
        value = unwrap_union(value);
        match value {
            Value::Record(fields) => match fields.get(step) {
                Some((_, field)) => value = field,
                None => {
                    return Err(ValueError::new(
                        &plan.rules[subject.rule].path,
                        "record does not match its schema",
                    ));
                }
            },
            Value::Null => return Ok(None),
            _ => {
                return Err(ValueError::new(
                    &plan.rules[subject.rule].path,
                    "record does not match its schema",
                ));
            }
        }
    }
    Ok(match unwrap_union(value) {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Long(n) if subject.unsigned => Some((*n as u64).to_string()),
        Value::Long(n) => Some(n.to_string()),
        Value::Int(n) => Some(n.to_string()),
        Value::Uuid(u) => Some(u.to_string()),
        _ => None,
    })
}

fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// Applies a plan to a record of its writer schema, in place.
pub fn apply(plan: &Plan, record: &mut Value, keys: &RecordKeys) -> Result<(), ValueError> {
    let Value::Record(fields) = record else {
        return Err(ValueError::new("", "a record was expected"));
    };
    apply_fields(plan, &plan.root, fields, keys)
}

/// Applies the nodes of a record's fields, by field index.
fn apply_fields(
    plan: &Plan,
    nodes: &[(usize, Node)],
    fields: &mut [(String, Value)],
    keys: &RecordKeys,
) -> Result<(), ValueError> {
    for (index, node) in nodes {
        let field = &mut fields
            .get_mut(*index)
            .ok_or_else(|| ValueError::new("", "record does not match its schema"))?
            .1;
        apply_node(plan, node, field, keys)?;
    }
    Ok(())
}

fn apply_node(plan: &Plan, node: &Node, value: &mut Value, keys: &RecordKeys) -> Result<(), ValueError> {
    match (node, value) {
        (Node::Protect(protect), value) => apply_protect(plan, protect, value, keys),
        (Node::Record(nodes), Value::Record(fields)) => apply_fields(plan, nodes, fields, keys),
        (Node::Array(node), Value::Array(items)) => {
            items.iter_mut().try_for_each(|item| apply_node(plan, node, item, keys))
        }
        (Node::Map(node), Value::Map(entries)) => entries
            .values_mut()
            .try_for_each(|item| apply_node(plan, node, item, keys)),
        (Node::Union(branches), Value::Union(index, inner)) => match branches.get(*index as usize) {
            Some(Some(node)) => apply_node(plan, node, inner, keys),
            Some(None) => Ok(()),
            None => Err(ValueError::new("", "union branch out of range")),
        },
        _ => Err(ValueError::new("", "record does not match its schema")),
    }
}

fn apply_protect(plan: &Plan, protect: &Protect, value: &mut Value, keys: &RecordKeys) -> Result<(), ValueError> {
    let rule = &plan.rules[protect.rule];
    if rule.action == Action::Redact || keys.forgotten {
        *value = protect.redacted.clone();
        return Ok(());
    }
    apply_shape(&protect.shape, rule, protect.scale, value, keys)
}

fn apply_shape(shape: &Shape, rule: &Rule, scale: u32, value: &mut Value, keys: &RecordKeys) -> Result<(), ValueError> {
    match (shape, value) {
        (Shape::Scalar, value) => {
            *value = protect_scalar(rule, scale, value, keys)?;
            Ok(())
        }
        (Shape::Union(branches), value @ Value::Union(..)) => {
            let Value::Union(index, inner) = value else {
                unreachable!()
            };
            let branch = branches
                .get(*index as usize)
                .ok_or_else(|| ValueError::new(&rule.path, "union branch out of range"))?;
            let out = if branch.is_null {
                Value::Null
            } else {
                protect_scalar(rule, scale, inner, keys)?
            };
            *value = match branch.out {
                Some(out_index) => Value::Union(out_index, Box::new(out)),
                None => out,
            };
            Ok(())
        }
        (Shape::Array(shape), Value::Array(items)) => items
            .iter_mut()
            .try_for_each(|item| apply_shape(shape, rule, scale, item, keys)),
        (Shape::Map(shape), Value::Map(entries)) => {
            let mut protected = HashMap::with_capacity(entries.len());
            for (key, mut item) in std::mem::take(entries) {
                apply_shape(shape, rule, scale, &mut item, keys)?;
                protected.insert(protect_map_key(rule, &key, keys)?, item);
            }
            *entries = protected;
            Ok(())
        }
        _ => Err(ValueError::new(&rule.path, "value does not match its schema")),
    }
}

/// The protected form of a protected map's key (see [`Action::for_map_keys`]).
fn protect_map_key(rule: &Rule, key: &str, keys: &RecordKeys) -> Result<String, ValueError> {
    let no_key = || ValueError::new(&rule.path, "no key for this field");
    let mut plaintext = Vec::with_capacity(1 + key.len());
    plaintext.push(plain::STRING);
    plaintext.extend_from_slice(key.as_bytes());
    Ok(match rule.map_keys {
        Some(Action::Tokenize) => keys
            .record
            .as_ref()
            .ok_or_else(no_key)?
            .tokenize(&rule.key_context, &plaintext),
        Some(Action::Hash) => keys
            .domain
            .as_ref()
            .ok_or_else(no_key)?
            .hash(&rule.key_context, &plaintext),
        _ => {
            return Err(ValueError::new(
                &rule.path,
                "a map whose keys the plan does not protect",
            ));
        }
    })
}

/// Protects one scalar value under a rule.
fn protect_scalar(rule: &Rule, scale: u32, value: &Value, keys: &RecordKeys) -> Result<Value, ValueError> {
    let key = |dek: Option<&Arc<Dek>>| {
        dek.cloned()
            .ok_or_else(|| ValueError::new(&rule.path, "no key for this field"))
    };
    let plaintext = || {
        let mut buf = Vec::with_capacity(32);
        plain::encode_into(value, scale, &mut buf)
            .ok_or_else(|| ValueError::new(&rule.path, "expected a scalar value"))?;
        Ok::<_, ValueError>(buf)
    };
    let record_key = keys.record.as_ref();
    Ok(match rule.action {
        Action::Mask { keep_last } => match value {
            Value::String(s) => Value::String(mask(s, keep_last)),
            Value::Uuid(u) => Value::String(mask(&u.to_string(), keep_last)),
            _ => return Err(ValueError::new(&rule.path, "mask expects a string value")),
        },
        Action::Tokenize | Action::Subject => Value::String(key(record_key)?.tokenize(&rule.context, &plaintext()?)),
        Action::Encrypt => {
            let token = key(record_key)?.encrypt(&rule.context, &plaintext()?);
            match value {
                Value::Bytes(_) | Value::Fixed(..) => Value::Bytes(token.into_bytes()),
                _ => Value::String(token),
            }
        }
        Action::Hash => Value::String(key(keys.domain.as_ref())?.hash(&rule.context, &plaintext()?)),
        Action::Redact => unreachable!("redact is applied before the shape walk"),
    })
}

fn find_protect(nodes: &[(usize, Node)], rule: usize) -> Option<&Protect> {
    nodes.iter().find_map(|(_, node)| find_in_node(node, rule))
}

fn find_in_node(node: &Node, rule: usize) -> Option<&Protect> {
    match node {
        Node::Protect(p) if p.rule == rule => Some(p),
        Node::Protect(_) => None,
        Node::Record(nodes) => find_protect(nodes, rule),
        Node::Array(node) | Node::Map(node) => find_in_node(node, rule),
        Node::Union(branches) => branches.iter().flatten().find_map(|n| find_in_node(n, rule)),
    }
}

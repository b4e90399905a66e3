//! The policy compiler: one walk over the writer schema's JSON yields both the [`Plan`] and the sanitized schema.
//!
//! The walk reads the JSON, not apache-avro's parsed form, because apache-avro drops attributes it does not know
//! in some places (inside type objects) and its canonical form drops them all. A `pii` attribute anywhere but on
//! a field is an error that names where it was found: silently ignoring an annotation would let PII through.

use std::collections::{BTreeMap, HashMap};

use apache_avro::Schema;
use apache_avro::types::Value;
use serde_json::{Map, Value as Json};

use super::tags::TagPattern;
use super::{ACTION_NAMES, Action, Branch, Node, Plan, Protect, Rule, Shape, SubjectRef};
use crate::error::PolicyError;

/// What to do with a schema that carries no annotation at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untagged {
    /// Refuse it: records of that schema are quarantined (fail closed).
    Block,
    /// Let its records through unchanged.
    Pass,
}

/// What becomes of the properties of a JSON record that its JSON Schema does not declare: data a producer may have
/// added without review, so never passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undeclared {
    /// Left out of the sanitized record (and counted: `piiwall_undeclared_dropped_total`).
    Drop,
    /// The record goes to quarantine.
    Quarantine,
}

/// The validated policy settings the compiler needs.
#[derive(Debug, Clone)]
pub struct PolicySettings {
    pub untagged: Untagged,
    /// Confluent-style tag name -> action.
    pub tag_actions: BTreeMap<String, Action>,
    /// What is looked for in the text of fields no annotation protects.
    pub detect: crate::detect::DetectPolicy,
    /// JSON records' undeclared properties.
    pub undeclared: Undeclared,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            untagged: Untagged::Block,
            tag_actions: BTreeMap::from([("PII".to_owned(), Action::Encrypt)]),
            detect: crate::detect::DetectPolicy::default(),
            undeclared: Undeclared::Drop,
        }
    }
}

/// A writer schema with its plan and its sanitized counterpart.
#[derive(Debug, Clone)]
pub struct CompiledSchema {
    pub writer: Schema,
    pub sanitized: Schema,
    /// The sanitized schema as JSON text: the writer's JSON with annotations replaced by what was applied.
    pub sanitized_json: String,
    pub plan: Plan,
    /// The form its records take and the sanitized schema registered for them.
    pub format: SchemaFormat,
}

/// What kind of schema a compiled schema was written as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaFormat {
    /// Avro: records are Avro binary; the sanitized schema is `sanitized_json`.
    Avro,
    /// JSON Schema, translated to Avro (see [`super::json_schema`]): records are JSON; `sanitized` is the JSON
    /// Schema of the output records.
    JsonSchema { sanitized: String },
    /// Protobuf, translated to Avro (see [`super::protobuf`]): records are protobuf bytes of `Protobuf::writer`.
    Protobuf(std::sync::Arc<Protobuf>),
}

/// A Protobuf schema's messages as the codec walks them, and its sanitized `.proto`.
#[derive(Debug, PartialEq, Eq)]
pub struct Protobuf {
    pub writer: std::sync::Arc<super::protobuf::Message>,
    pub sanitized_message: std::sync::Arc<super::protobuf::Message>,
    /// The `.proto` text of the output records.
    pub sanitized: String,
    /// The message index path of the record's message in the writer schema.
    pub indexes: Vec<i32>,
}

impl CompiledSchema {
    /// The sanitized schema's text and its Schema Registry type (`AVRO`, `JSON`).
    pub fn published_schema(&self) -> (&str, &'static str) {
        match &self.format {
            SchemaFormat::Avro => (&self.sanitized_json, "AVRO"),
            SchemaFormat::JsonSchema { sanitized } => (sanitized, "JSON"),
            SchemaFormat::Protobuf(protobuf) => (&protobuf.sanitized, "PROTOBUF"),
        }
    }

    /// Whether its records are JSON (else Avro binary).
    pub fn is_json(&self) -> bool {
        matches!(self.format, SchemaFormat::JsonSchema { .. })
    }

    /// The Protobuf side of a Protobuf schema.
    pub fn protobuf(&self) -> Option<&Protobuf> {
        match &self.format {
            SchemaFormat::Protobuf(protobuf) => Some(protobuf),
            _ => None,
        }
    }
}

/// Compiles a JSON Schema (text): translated to Avro, compiled, and given its sanitized JSON Schema.
pub fn compile_json_schema(schema: &str, settings: &PolicySettings) -> Result<CompiledSchema, PolicyError> {
    let avro = super::json_schema::to_avro(schema)?;
    let mut compiled = compile(&avro, settings)?;
    compiled.format = SchemaFormat::JsonSchema {
        sanitized: super::json_schema::sanitized_schema(&compiled.sanitized, schema),
    };
    Ok(compiled)
}

/// Compiles a Protobuf schema: `.proto` text, the texts of the files it imports by import path, and the record's
/// message (`None`: the file's first).
pub fn compile_protobuf(
    schema: &str,
    references: &std::collections::HashMap<String, String>,
    message: Option<&str>,
    settings: &PolicySettings,
) -> Result<CompiledSchema, PolicyError> {
    let writer = super::protobuf::compile_writer(schema, references, message)?;
    let mut compiled = compile(&writer.avro, settings)?;
    super::protobuf::check_redacted_messages(&writer.message, &compiled.plan)?;
    let sanitized_message = super::protobuf::sanitized_message(&writer.message, &compiled.sanitized, &compiled.plan);
    let sanitized = super::protobuf::sanitized_proto(&sanitized_message, &writer, &compiled.plan);
    compiled.format = SchemaFormat::Protobuf(std::sync::Arc::new(Protobuf {
        writer: writer.message,
        sanitized_message,
        sanitized,
        indexes: writer.indexes,
    }));
    Ok(compiled)
}

/// Compiles a schema file's text: `.proto` text (the first message is the record's), Avro or JSON Schema (told
/// apart by [`super::json_schema::is_json_schema`]).
pub fn compile_any(schema: &str, settings: &PolicySettings) -> Result<CompiledSchema, PolicyError> {
    if super::protobuf::is_proto(schema) {
        compile_protobuf(schema, &Default::default(), None, settings)
    } else if super::json_schema::is_json_schema(schema) {
        compile_json_schema(schema, settings)
    } else {
        compile(schema, settings)
    }
}

/// The largest fixed taken: a redacted fixed is that many zero bytes, allocated when the schema compiles (a size
/// of 2^62 aborted the process), and written for every record.
const MAX_FIXED_SIZE: u64 = 1 << 20;

/// The most bytes of field paths a schema may walk, each use of a named record counted (the plan keeps a path per
/// protected use, three times): 16 MiB, hundreds of times a large real schema's.
const MAX_PATH_BYTES: usize = 16 << 20;

/// Root attribute marking a schema that piiwall derived; such a schema is never sanitized again.
pub const SANITIZED_MARK: &str = "pii.sanitized";

/// The attributes that name or hold schemas, which Avro's canonical form (computed by registries and consumers to
/// compare schemas) walks into. Avro's parser takes some shapes of them that the specification does not (a decimal
/// whose precision is text loses its logical type; any attribute on a field is kept as metadata), on which the
/// canonical form then panics: refuse them here, naming the field that carries them.
const SCHEMA_ATTRIBUTES: [&str; 7] = ["name", "type", "fields", "symbols", "items", "values", "order"];
const NUMBER_ATTRIBUTES: [&str; 3] = ["size", "precision", "scale"];

fn check_attribute_shapes(json: &Json, path: &str) -> Result<(), PolicyError> {
    match json {
        Json::Object(object) => {
            for (key, value) in object {
                if NUMBER_ATTRIBUTES.contains(&key.as_str()) && value.as_u64().is_none() {
                    return Err(PolicyError::new(path, format!("`{key}` must be a whole number")));
                }
                let fixed = object.get("type").and_then(Json::as_str) == Some("fixed");
                if fixed && key == "size" && value.as_u64().is_some_and(|size| size > MAX_FIXED_SIZE) {
                    return Err(PolicyError::new(
                        path,
                        format!("a fixed's `size` must be at most {MAX_FIXED_SIZE} bytes (1 MiB)"),
                    ));
                }
                if !SCHEMA_ATTRIBUTES.contains(&key.as_str()) {
                    continue;
                }
                if !matches!(value, Json::String(_) | Json::Object(_) | Json::Array(_)) {
                    return Err(PolicyError::new(
                        path,
                        format!("`{key}` must be a string, an object or an array"),
                    ));
                }
                if key == "fields" {
                    if value
                        .as_array()
                        .is_some_and(|fields| fields.iter().any(|field| !field.is_object()))
                    {
                        return Err(PolicyError::new(path, "`fields` lists objects, one per field"));
                    }
                    for field in value.as_array().into_iter().flatten() {
                        let name = field.get("name").and_then(Json::as_str).unwrap_or("?");
                        let inner = if path.is_empty() {
                            name.to_owned()
                        } else {
                            format!("{path}.{name}")
                        };
                        check_attribute_shapes(field, &inner)?;
                    }
                } else {
                    check_attribute_shapes(value, path)?;
                }
            }
            Ok(())
        }
        Json::Array(items) => items.iter().try_for_each(|item| match item {
            Json::String(_) | Json::Object(_) | Json::Array(_) => check_attribute_shapes(item, path),
            _ => Err(PolicyError::new(
                path,
                "a list in a schema holds strings, objects or lists",
            )),
        }),
        _ => Ok(()),
    }
}

/// Compiles a writer schema (JSON text) into its plan and sanitized schema.
pub fn compile(schema_json: &str, settings: &PolicySettings) -> Result<CompiledSchema, PolicyError> {
    let json: Json = serde_json::from_str(schema_json)
        .map_err(|e| PolicyError::new("", format!("schema is not valid JSON: {e}")))?;
    // Before Avro's parser: it computes canonical forms of parts of the schema (to resolve a field's default),
    // which panic on the shapes this refuses.
    check_attribute_shapes(&json, "")?;
    let writer = Schema::parse(&json).map_err(|e| PolicyError::new("", format!("not a valid Avro schema: {e}")))?;
    super::recursion::check_walkable(&writer)?;
    let root = json
        .as_object()
        .filter(|o| o.get("type").and_then(Json::as_str) == Some("record"))
        .ok_or_else(|| PolicyError::new("", "the schema's root must be a record"))?;
    if root.contains_key(SANITIZED_MARK) {
        return Err(PolicyError::new(
            "",
            "this schema is already sanitized (it carries pii.sanitized)",
        ));
    }

    let mut walker = Walker::new(settings, root)?;
    walker.define_all(&json, "", "")?;
    let (root_node, sanitized_root) = walker.walk_record(root, "", "", true, false)?;
    let mut sanitized_json = sanitized_root;
    walker.finish(&mut sanitized_json)?;

    let root_fields = match root_node {
        Some(Node::Record(fields)) => fields,
        _ => Vec::new(),
    };
    if !walker.annotated && settings.untagged == Untagged::Block {
        return Err(PolicyError::new(
            "",
            "the schema has no pii annotations and policy.untagged is \"block\": annotate its PII fields (or mark \
             fields \"pii\": \"none\"), or set policy.untagged = \"pass\"",
        ));
    }
    let sanitized_text = serde_json::to_string(&sanitized_json).expect("a JSON value always serializes");
    let sanitized = Schema::parse(&sanitized_json)
        .map_err(|e| PolicyError::new("", format!("the derived sanitized schema is invalid: {e}")))?;
    let domain = walker.domain.clone();
    let compiled = CompiledSchema {
        writer,
        sanitized,
        sanitized_json: sanitized_text,
        plan: Plan {
            root: root_fields,
            rules: walker.rules,
            subject: walker.subject,
            domain,
            detect: settings.detect.clone(),
        },
        format: SchemaFormat::Avro,
    };
    // What compiles must run: a schema the binary transcoder cannot walk (a subject whose declared type it cannot
    // read, say) is refused here, by `schema check` and at registration, not found broken record by record.
    crate::transcode::Transcoder::new(&compiled)?;
    Ok(compiled)
}

/// A named type defined somewhere in the schema.
struct Definition<'j> {
    json: &'j Map<String, Json>,
    namespace: String,
}

struct Walker<'j, 's> {
    settings: &'s PolicySettings,
    root_name: String,
    definitions: HashMap<String, Definition<'j>>,
    /// Named types whose inline definition an action replaced, by the path that replaced them.
    replaced: HashMap<String, String>,
    /// Records being walked, to refuse recursive types.
    stack: Vec<String>,
    rules: Vec<Rule>,
    subject: Option<SubjectRef>,
    /// The field path named by the root's `pii.subject`, and whether it was found.
    subject_path: Option<(String, bool)>,
    schema_tags: Vec<(TagPattern, Vec<String>)>,
    domain: Option<String>,
    annotated: bool,
    /// Field indices from the root to the field being walked.
    steps: Vec<usize>,
    /// How many unions of several non-null branches enclose the field being walked (the subject's steps, which
    /// do not name a branch, must find it whichever branch a record takes).
    choices: usize,
    /// The scale of the last decimal type classified (a token of a decimal carries its scale).
    decimal_scale: Option<u32>,
    /// Whether the protected value being compiled holds a map (its keys need protecting too).
    holds_map: bool,
    /// Fields walked so far, each use of a named record counting all it holds, and the bytes of their paths
    /// (the plan keeps a path per protected use): bounded, whatever the schema.
    fields_walked: u64,
    path_bytes: usize,
    /// Records the redacted value being built is inside.
    empty_depth: usize,
}

/// What a field's annotations ask for.
enum Wanted {
    Nothing,
    None,
    Act { action: Action, kind: Option<String> },
}

impl<'j, 's> Walker<'j, 's> {
    fn new(settings: &'s PolicySettings, root: &'j Map<String, Json>) -> Result<Self, PolicyError> {
        let namespace = root.get("namespace").and_then(Json::as_str).unwrap_or("");
        let name = root.get("name").and_then(Json::as_str).unwrap_or("");
        let root_name = full_name(name, namespace);

        let subject_path = match root.get("pii.subject") {
            None => None,
            Some(Json::String(p)) if !p.is_empty() => Some((p.clone(), false)),
            Some(_) => {
                return Err(PolicyError::new("", "pii.subject must be a dotted field path string"));
            }
        };
        let domain = match root.get("pii.domain") {
            None => None,
            Some(Json::String(d)) if valid_domain(d) => Some(d.clone()),
            Some(_) => {
                return Err(PolicyError::new("", format!("pii.domain must be {DOMAIN_RULE}")));
            }
        };
        let mut schema_tags = Vec::new();
        if let Some(metadata) = root.get("metadata") {
            let tags = metadata.get("tags").and_then(Json::as_object).ok_or_else(|| {
                PolicyError::new(
                    "",
                    "metadata must be an object with a \"tags\" object of pattern -> [tag, ...]",
                )
            })?;
            for (pattern, names) in tags {
                schema_tags.push((TagPattern::parse(pattern)?, tag_list(names, "", "metadata.tags")?));
            }
        }
        Ok(Self {
            settings,
            root_name,
            definitions: HashMap::new(),
            replaced: HashMap::new(),
            stack: Vec::new(),
            rules: Vec::new(),
            subject: None,
            annotated: subject_path.is_some() || !schema_tags.is_empty(),
            subject_path,
            schema_tags,
            domain,
            steps: Vec::new(),
            choices: 0,
            decimal_scale: None,
            holds_map: false,
            fields_walked: 0,
            path_bytes: 0,
            empty_depth: 0,
        })
    }

    /// Final checks, and the root attributes of the sanitized schema.
    fn finish(&mut self, sanitized: &mut Json) -> Result<(), PolicyError> {
        if let Some((path, false)) = &self.subject_path {
            return Err(PolicyError::new(
                "",
                format!("pii.subject names `{path}`, which is not a field of the schema"),
            ));
        }
        let root = sanitized.as_object_mut().expect("the root was checked to be a record");
        root.shift_remove("pii.subject");
        root.insert(SANITIZED_MARK.to_owned(), Json::Bool(true));
        Ok(())
    }

    /// Walks a record definition: `(plan node if any field needs work, sanitized JSON)`.
    fn walk_record(
        &mut self,
        record: &'j Map<String, Json>,
        namespace: &str,
        path: &str,
        emit: bool,
        in_collection: bool,
    ) -> Result<(Option<Node>, Json), PolicyError> {
        let name = record.get("name").and_then(Json::as_str).unwrap_or("");
        let record_ns = definition_namespace(record, namespace);
        let full = full_name(name, &record_ns);
        if self.stack.contains(&full) {
            return Err(PolicyError::new(
                path,
                format!("record `{full}` contains itself: recursive schemas are not supported"),
            ));
        }
        if self.stack.len() >= super::recursion::MAX_RECORD_DEPTH {
            return Err(super::recursion::too_deep(path));
        }
        if emit {
            self.define(full.clone(), record, &record_ns);
        }
        check_no_annotation(record, path, &["pii", "confluent:tags"], "a record type")?;
        if !path.is_empty() {
            check_no_annotation(
                record,
                path,
                &["pii.subject", "pii.domain"],
                "a nested record (only the root may)",
            )?;
        }

        self.stack.push(full);
        let fields = record
            .get("fields")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut nodes = Vec::new();
        let mut sanitized_fields = Vec::with_capacity(fields.len());
        for (index, field) in fields.iter().enumerate() {
            let field = field
                .as_object()
                .ok_or_else(|| PolicyError::new(path, "a record field must be an object"))?;
            self.steps.push(index);
            let walked = self.walk_field(field, &record_ns, path, emit, in_collection);
            self.steps.pop();
            let (node, sanitized) = walked?;
            if let Some(node) = node {
                nodes.push((index, node));
            }
            sanitized_fields.push(sanitized);
        }
        self.stack.pop();
        let node = (!nodes.is_empty()).then_some(Node::Record(nodes));
        if !emit {
            // A use of a record defined elsewhere: the sanitized schema keeps the reference, so nothing is copied
            // (a copy per use cost the record's whole text, `doc` and all, at every one).
            return Ok((node, Json::Null));
        }

        let mut sanitized = record.clone();
        sanitized.insert("fields".to_owned(), Json::Array(sanitized_fields));
        Ok((node, Json::Object(sanitized)))
    }

    fn walk_field(
        &mut self,
        field: &'j Map<String, Json>,
        namespace: &str,
        parent: &str,
        emit: bool,
        in_collection: bool,
    ) -> Result<(Option<Node>, Json), PolicyError> {
        let name = field.get("name").and_then(Json::as_str).unwrap_or("");
        let path = if parent.is_empty() {
            name.to_owned()
        } else {
            format!("{parent}.{name}")
        };
        self.charge(&path)?;
        let ty = field
            .get("type")
            .ok_or_else(|| PolicyError::new(&path, "field has no type"))?;

        match self.wanted(field, &path)? {
            Wanted::Act { action, kind } => {
                self.annotated = true;
                let (protect, out_type) = self.protect(action, kind, ty, namespace, &path, in_collection)?;
                if !emit {
                    return Ok((Some(Node::Protect(protect)), Json::Null));
                }
                let out_type = if action == Action::Redact { ty.clone() } else { out_type };
                let mut sanitized = field.clone();
                let type_changed = &out_type != ty;
                if type_changed {
                    adjust_default(&mut sanitized, &out_type);
                }
                let mut out_type = out_type;
                // A default is a value in clear, and its protected form needs a key: the sanitized schema that
                // consumers and the registry see keeps no default but null or empty, here or in a type inside.
                drop_value_defaults(&mut sanitized);
                drop_nested_defaults(&mut out_type);
                sanitized.insert("type".to_owned(), out_type);
                sanitized.shift_remove("pii");
                self.strip_mapped_tags(&mut sanitized);
                sanitized.insert("pii.applied".to_owned(), Json::String(action.name().to_owned()));
                Ok((Some(Node::Protect(protect)), Json::Object(sanitized)))
            }
            wanted => {
                if matches!(wanted, Wanted::None) {
                    self.annotated = true;
                }
                let (node, out_type) = self.walk_type(ty, namespace, &path, emit, in_collection)?;
                if !emit {
                    return Ok((node, Json::Null));
                }
                let mut sanitized = field.clone();
                sanitized.insert("type".to_owned(), out_type);
                Ok((node, Json::Object(sanitized)))
            }
        }
    }

    /// Reads the field's `pii` attribute, its `confluent:tags` and the schema-level tags that match its path.
    fn wanted(&mut self, field: &Map<String, Json>, path: &str) -> Result<Wanted, PolicyError> {
        let named_subject = match &mut self.subject_path {
            Some((subject, found)) if subject == path => {
                *found = true;
                true
            }
            _ => false,
        };
        let explicit = match field.get("pii") {
            None => None,
            Some(annotation) => Some(parse_annotation(annotation, path)?),
        };
        if named_subject {
            // A subject is tokenized (with its own key): `tokenize` on the field says the same, and producers write
            // both. Any other action contradicts it.
            return match explicit {
                None => Ok(Wanted::Act {
                    action: Action::Subject,
                    kind: None,
                }),
                Some(Wanted::Act {
                    action: Action::Subject | Action::Tokenize,
                    kind,
                }) => Ok(Wanted::Act {
                    action: Action::Subject,
                    kind,
                }),
                Some(_) => Err(PolicyError::new(
                    path,
                    "named by the root's pii.subject, which tokenizes it with the subject's own key, but annotated \
                     with another action: write \"pii\": \"subject\" (or \"tokenize\") on it, or leave its pii out, \
                     or name another field in pii.subject",
                )),
            };
        }
        if let Some(explicit) = explicit {
            return Ok(explicit);
        }

        let mut tags = match field.get("confluent:tags") {
            Some(names) => tag_list(names, path, "confluent:tags")?,
            None => Vec::new(),
        };
        for (pattern, names) in &self.schema_tags {
            if pattern.matches(&self.root_name, path) {
                tags.extend(names.iter().cloned());
            }
        }
        let mut actions: Vec<Action> = Vec::new();
        for action in tags.iter().filter_map(|t| self.settings.tag_actions.get(t).copied()) {
            if !actions.contains(&action) {
                actions.push(action);
            }
        }
        match actions.as_slice() {
            [] => Ok(Wanted::Nothing),
            [action] => Ok(Wanted::Act {
                action: *action,
                kind: None,
            }),
            _ => Err(PolicyError::new(
                path,
                "its tags map to different actions: give the field an explicit \"pii\" annotation",
            )),
        }
    }

    fn strip_mapped_tags(&self, field: &mut Map<String, Json>) {
        if let Some(Json::Array(tags)) = field.get_mut("confluent:tags") {
            tags.retain(|t| t.as_str().is_none_or(|t| !self.settings.tag_actions.contains_key(t)));
            if tags.is_empty() {
                field.shift_remove("confluent:tags");
            }
        }
    }

    /// Compiles the protection of one field: its shape, its redacted value and its sanitized type.
    fn protect(
        &mut self,
        action: Action,
        kind: Option<String>,
        ty: &'j Json,
        namespace: &str,
        path: &str,
        in_collection: bool,
    ) -> Result<(Protect, Json), PolicyError> {
        if action == Action::Subject {
            self.check_subject(ty, namespace, path, in_collection)?;
        }
        self.decimal_scale = None;
        self.holds_map = false;
        let (shape, out_type) = if action == Action::Redact {
            // The type stays (the caller copies it where the sanitized schema needs it); nested annotations under
            // a redacted field are moot.
            (Shape::Scalar, Json::Null)
        } else {
            self.shape(action, ty, namespace, path)?
        };
        let redacted = if action == Action::Redact {
            self.empty_value(ty, namespace, path)?
        } else {
            empty_output(&out_type)
        };
        let rule = self.rules.len();
        let context = kind.unwrap_or_else(|| path.to_owned());
        if super::contexts::ALL.contains(&context.as_str())
            || context.starts_with(super::contexts::QUARANTINE_PREFIX)
            || context.contains('#')
        {
            return Err(PolicyError::new(
                path,
                format!(
                    "the context `{context}` is reserved (piiwall's own pseudonyms use it, and `#` marks map keys): \
                     give the field another \"kind\""
                ),
            ));
        }
        self.rules.push(Rule {
            path: path.to_owned(),
            action,
            map_keys: (self.holds_map && action != Action::Redact).then(|| action.for_map_keys()),
            key_context: format!("{context}#key"),
            context,
        });
        if action == Action::Subject {
            self.subject = Some(SubjectRef {
                rule,
                steps: self.steps.clone(),
                unsigned: non_null(ty).is_some_and(|ty| ty.get(super::UNSIGNED) == Some(&Json::Bool(true))),
            });
        }
        Ok((
            Protect {
                rule,
                shape,
                redacted,
                scale: self.decimal_scale.unwrap_or(0),
            },
            out_type,
        ))
    }

    fn check_subject(
        &mut self,
        ty: &'j Json,
        namespace: &str,
        path: &str,
        in_collection: bool,
    ) -> Result<(), PolicyError> {
        if let Some(subject) = &self.subject {
            let first = &self.rules[subject.rule].path;
            return Err(PolicyError::new(
                path,
                format!("a second subject field (the first is `{first}`): a record has one data subject"),
            ));
        }
        if in_collection {
            return Err(PolicyError::new(
                path,
                "the subject field must not be inside an array or map",
            ));
        }
        if self.choices > 0 {
            return Err(PolicyError::new(
                path,
                "the subject field must not be inside a union of several records (a record taking another branch \
                 would have no subject, or another field read as one): put the subject where every record has it",
            ));
        }
        let scalar = non_null(ty).ok_or_else(|| PolicyError::new(path, SUBJECT_TYPES))?;
        match self.classify(scalar, namespace, path)? {
            Kind::Scalar(s) if matches!(s.name, "string" | "int" | "long" | "uuid") => Ok(()),
            _ => Err(PolicyError::new(path, SUBJECT_TYPES)),
        }
    }

    /// The shape of a protected value and the type the action turns it into.
    fn shape(
        &mut self,
        action: Action,
        ty: &'j Json,
        namespace: &str,
        path: &str,
    ) -> Result<(Shape, Json), PolicyError> {
        match self.classify(ty, namespace, path)? {
            Kind::Scalar(scalar) => {
                if let Some(name) = &scalar.defines {
                    self.replaced.insert(name.clone(), path.to_owned());
                }
                Ok((
                    Shape::Scalar,
                    Json::String(scalar_output(action, &scalar, path)?.to_owned()),
                ))
            }
            Kind::Union(branches) => {
                let mut out_types: Vec<Json> = Vec::new();
                let mut plan = Vec::with_capacity(branches.len());
                for branch in branches {
                    let out = match self.classify(branch, namespace, path)? {
                        Kind::Null => Json::String("null".to_owned()),
                        Kind::Scalar(scalar) => {
                            if let Some(name) = &scalar.defines {
                                self.replaced.insert(name.clone(), path.to_owned());
                            }
                            Json::String(scalar_output(action, &scalar, path)?.to_owned())
                        }
                        _ => {
                            return Err(PolicyError::new(
                                path,
                                format!(
                                    "{} applies to scalar values; this union has a complex branch (annotate the fields inside it instead)",
                                    action.name()
                                ),
                            ));
                        }
                    };
                    let index = match out_types.iter().position(|t| t == &out) {
                        Some(i) => i,
                        None => {
                            out_types.push(out.clone());
                            out_types.len() - 1
                        }
                    };
                    plan.push(Branch {
                        is_null: out == "null",
                        out: Some(index as u32),
                    });
                }
                if out_types.len() == 1 {
                    plan.iter_mut().for_each(|b| b.out = None);
                    Ok((Shape::Union(plan), out_types.pop().expect("one output type")))
                } else {
                    Ok((Shape::Union(plan), Json::Array(out_types)))
                }
            }
            Kind::Array(items) if action != Action::Subject => {
                let (shape, out) = self.shape(action, items, namespace, path)?;
                Ok((
                    Shape::Array(Box::new(shape)),
                    serde_json::json!({"type": "array", "items": out}),
                ))
            }
            Kind::Map(values) if action != Action::Subject => {
                self.holds_map = true;
                let (shape, out) = self.shape(action, values, namespace, path)?;
                Ok((
                    Shape::Map(Box::new(shape)),
                    serde_json::json!({"type": "map", "values": out, "pii.keys": action.for_map_keys().name()}),
                ))
            }
            Kind::Null => Err(PolicyError::new(
                path,
                format!("{} cannot apply to a null field", action.name()),
            )),
            _ => Err(PolicyError::new(
                path,
                format!(
                    "{} applies to scalar values (or arrays and maps of them); annotate the fields inside this record instead, or use redact",
                    action.name()
                ),
            )),
        }
    }

    /// Walks an unannotated type, looking for annotated fields below it.
    fn walk_type(
        &mut self,
        ty: &'j Json,
        namespace: &str,
        path: &str,
        emit: bool,
        in_collection: bool,
    ) -> Result<(Option<Node>, Json), PolicyError> {
        if let Json::String(name) = ty {
            if !is_primitive(name) {
                let full = full_name(name, namespace);
                if emit && let Some(replaced_at) = self.replaced.get(&full) {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "refers to `{full}`, whose definition at `{replaced_at}` an action replaced; define the type outside the protected field, or protect this field too"
                        ),
                    ));
                }
                let Some(def) = self.definitions.get(&full) else {
                    return Err(PolicyError::new(path, format!("unknown type `{name}`")));
                };
                let (json, def_ns) = (def.json, def.namespace.clone());
                if json.get("type").and_then(Json::as_str) == Some("record") {
                    // The plan must be compiled at this path; the sanitized schema keeps the reference.
                    let (node, _) = self.walk_record(json, &def_ns, path, false, in_collection)?;
                    return Ok((node, ty.clone()));
                }
            }
            return Ok((None, ty.clone()));
        }
        match ty {
            Json::Array(branches) => {
                let choice = branches.iter().filter(|b| b.as_str() != Some("null")).count() > 1;
                self.choices += usize::from(choice);
                let mut nodes = Vec::with_capacity(branches.len());
                let mut out = Vec::with_capacity(branches.len());
                for branch in branches {
                    let walked = self.walk_type(branch, namespace, path, emit, in_collection);
                    let (node, sanitized) = walked.inspect_err(|_| self.choices -= usize::from(choice))?;
                    nodes.push(node);
                    out.push(sanitized);
                }
                self.choices -= usize::from(choice);
                let node = nodes.iter().any(Option::is_some).then_some(Node::Union(nodes));
                Ok((node, Json::Array(out)))
            }
            Json::Object(object) => {
                if let Some(reference) = reference_form(object) {
                    check_no_annotation(object, path, &["pii", "confluent:tags"], "a type object")?;
                    return self.walk_type(reference, namespace, path, emit, in_collection);
                }
                if let Some(problem) = read_otherwise(object) {
                    return Err(PolicyError::new(path, problem));
                }
                if let Some(problem) = unapplied_logical_type(object) {
                    return Err(PolicyError::new(path, problem));
                }
                let kind = object.get("type");
                match kind.and_then(Json::as_str) {
                    Some("record") => self.walk_record(object, namespace, path, emit, in_collection),
                    Some(t @ ("array" | "map")) => {
                        check_no_annotation(object, path, &["pii", "confluent:tags"], "an array or map type")?;
                        let key = if t == "array" { "items" } else { "values" };
                        let inner = object
                            .get(key)
                            .ok_or_else(|| PolicyError::new(path, format!("{t} has no {key}")))?;
                        let (node, sanitized) = self.walk_type(inner, namespace, path, emit, true)?;
                        let node = node.map(|n| {
                            if t == "array" {
                                Node::Array(Box::new(n))
                            } else {
                                Node::Map(Box::new(n))
                            }
                        });
                        if !emit {
                            return Ok((node, Json::Null));
                        }
                        let mut out = object.clone();
                        out.insert(key.to_owned(), sanitized);
                        Ok((node, Json::Object(out)))
                    }
                    Some(t @ ("enum" | "fixed")) => {
                        check_no_annotation(object, path, &["pii", "confluent:tags"], &format!("an {t} type"))?;
                        if emit {
                            let name = object.get("name").and_then(Json::as_str).unwrap_or("");
                            let ns = definition_namespace(object, namespace);
                            self.define(full_name(name, &ns), object, &ns);
                        }
                        Ok((None, if emit { ty.clone() } else { Json::Null }))
                    }
                    Some(_) => {
                        check_no_annotation(object, path, &["pii", "confluent:tags"], "a type object")?;
                        Ok((None, if emit { ty.clone() } else { Json::Null }))
                    }
                    None => match kind {
                        Some(inner) => {
                            check_no_annotation(object, path, &["pii", "confluent:tags"], "a type object")?;
                            self.walk_type(inner, namespace, path, emit, in_collection)
                        }
                        None => Err(PolicyError::new(path, "type object has no \"type\"")),
                    },
                }
            }
            _ => Err(PolicyError::new(
                path,
                "a type must be a name, an object or a union array",
            )),
        }
    }

    fn note_decimal_scale(&mut self, object: &Map<String, Json>) {
        if object.get("logicalType").and_then(Json::as_str) == Some("decimal") {
            self.decimal_scale = Some(object.get("scale").and_then(Json::as_u64).unwrap_or(0) as u32);
        }
    }

    /// Defines every named type of the schema before the walk, as Avro's parser knows them: the walk does not
    /// enter redacted fields, and a name must mean the type it means to Avro wherever it is used (a type the walk
    /// had not met made a name resolve elsewhere, and a record hold itself unseen).
    ///
    /// It also refuses, wherever they are, the type objects Avro's parser reads otherwise than the compiler would
    /// (a definition used only where the compiler does not look, such as a union's branch under a redacted field,
    /// can be named elsewhere).
    fn define_all(&mut self, ty: &'j Json, namespace: &str, path: &str) -> Result<(), PolicyError> {
        if let Json::Object(object) = ty
            && let Some(problem) = read_otherwise(object)
                .map(str::to_owned)
                .or_else(|| unapplied_logical_type(object))
        {
            return Err(PolicyError::new(path, problem));
        }
        match ty {
            Json::Array(branches) => {
                for branch in branches {
                    self.define_all(branch, namespace, path)?;
                }
            }
            Json::Object(object) => match object.get("type") {
                Some(Json::String(t)) if matches!(t.as_str(), "record" | "enum" | "fixed") => {
                    let name = object.get("name").and_then(Json::as_str).unwrap_or("");
                    let ns = definition_namespace(object, namespace);
                    self.define(full_name(name, &ns), object, &ns);
                    // Only a record's fields are types to Avro: on an enum or a fixed, `fields` is an attribute.
                    let fields = object.get("fields").and_then(Json::as_array).filter(|_| t == "record");
                    for field in fields.into_iter().flatten() {
                        if let Some(field_type) = field.get("type") {
                            let name = field.get("name").and_then(Json::as_str).unwrap_or("");
                            let inner = if path.is_empty() {
                                name.to_owned()
                            } else {
                                format!("{path}.{name}")
                            };
                            self.define_all(field_type, &ns, &inner)?;
                        }
                    }
                }
                Some(Json::String(t)) if t == "array" => {
                    if let Some(items) = object.get("items") {
                        self.define_all(items, namespace, path)?;
                    }
                }
                Some(Json::String(t)) if t == "map" => {
                    if let Some(values) = object.get("values") {
                        self.define_all(values, namespace, path)?;
                    }
                }
                Some(inner @ (Json::Object(_) | Json::Array(_))) => self.define_all(inner, namespace, path)?,
                _ => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// Counts one more field walked at `path`, refusing a schema past the bounds.
    fn charge(&mut self, path: &str) -> Result<(), PolicyError> {
        self.fields_walked += 1;
        self.path_bytes += path.len();
        if self.fields_walked > super::recursion::MAX_EXPANDED_TYPES {
            return Err(super::recursion::too_many_types());
        }
        if self.path_bytes > MAX_PATH_BYTES {
            return Err(PolicyError::new(
                "",
                format!(
                    "the schema's field paths come to more than {} MiB once each use of a named record is \
                     counted: shorten the field names, or use each record in fewer places",
                    MAX_PATH_BYTES >> 20
                ),
            ));
        }
        Ok(())
    }

    fn define(&mut self, full: String, json: &'j Map<String, Json>, namespace: &str) {
        self.definitions.entry(full).or_insert(Definition {
            json,
            namespace: namespace.to_owned(),
        });
    }

    /// Classifies a type for the action checks, defining inline named types on the way.
    fn classify(&mut self, ty: &'j Json, namespace: &str, path: &str) -> Result<Kind<'j>, PolicyError> {
        match ty {
            Json::String(name) if name == "null" => Ok(Kind::Null),
            Json::String(name) if is_primitive(name) => Ok(Kind::Scalar(Scalar::plain(primitive_name(name)))),
            Json::String(name) => {
                let def = self.definitions.get(&full_name(name, namespace));
                let Some(def) = def else {
                    return Err(PolicyError::new(path, format!("unknown type `{name}`")));
                };
                let (json, def_ns) = (def.json, def.namespace.clone());
                match json.get("type").and_then(Json::as_str) {
                    Some("enum") => Ok(Kind::Scalar(Scalar::plain("enum"))),
                    Some("fixed") => {
                        self.note_decimal_scale(json);
                        Ok(Kind::Scalar(Scalar {
                            name: fixed_name(json),
                            defines: None,
                        }))
                    }
                    _ => Ok(Kind::Record(json, def_ns)),
                }
            }
            Json::Array(branches) => Ok(Kind::Union(branches)),
            Json::Object(object) => {
                check_no_annotation(object, path, &["pii", "confluent:tags"], "a type object")?;
                if let Some(reference) = reference_form(object) {
                    return self.classify(reference, namespace, path);
                }
                if let Some(problem) = read_otherwise(object) {
                    return Err(PolicyError::new(path, problem));
                }
                if let Some(problem) = unapplied_logical_type(object) {
                    return Err(PolicyError::new(path, problem));
                }
                let logical = object.get("logicalType").and_then(Json::as_str);
                self.note_decimal_scale(object);
                match object.get("type") {
                    Some(Json::String(t)) => match t.as_str() {
                        "record" => {
                            let name = object.get("name").and_then(Json::as_str).unwrap_or("");
                            let ns = definition_namespace(object, namespace);
                            self.define(full_name(name, &ns), object, &ns);
                            Ok(Kind::Record(object, ns))
                        }
                        "enum" | "fixed" => {
                            let name = object.get("name").and_then(Json::as_str).unwrap_or("");
                            let ns = definition_namespace(object, namespace);
                            let full = full_name(name, &ns);
                            self.define(full.clone(), object, &ns);
                            let name = if t == "enum" { "enum" } else { fixed_name(object) };
                            Ok(Kind::Scalar(Scalar {
                                name,
                                defines: Some(full),
                            }))
                        }
                        "array" => Ok(Kind::Array(
                            object
                                .get("items")
                                .ok_or_else(|| PolicyError::new(path, "array has no items"))?,
                        )),
                        "map" => Ok(Kind::Map(
                            object
                                .get("values")
                                .ok_or_else(|| PolicyError::new(path, "map has no values"))?,
                        )),
                        "null" => Ok(Kind::Null),
                        primitive => Ok(Kind::Scalar(Scalar::plain(
                            logical
                                .filter(|logical| LOGICAL_TYPES.contains(logical))
                                .map_or_else(|| primitive_name(primitive), logical_name),
                        ))),
                    },
                    Some(inner) => self.classify(inner, namespace, path),
                    None => Err(PolicyError::new(path, "type object has no \"type\"")),
                }
            }
            _ => Err(PolicyError::new(
                path,
                "a type must be a name, an object or a union array",
            )),
        }
    }

    /// The value a redacted field takes: null where the type allows it, else the type's empty value.
    fn empty_value(&mut self, ty: &'j Json, namespace: &str, path: &str) -> Result<Value, PolicyError> {
        Ok(match self.classify(ty, namespace, path)? {
            Kind::Null => Value::Null,
            Kind::Scalar(scalar) => {
                let ty = match ty {
                    Json::Object(object) => reference_form(object).unwrap_or(ty),
                    _ => ty,
                };
                empty_scalar(&scalar, ty, &self.definitions, namespace)
            }
            Kind::Record(record, ns) => {
                if self.empty_depth >= super::recursion::MAX_RECORD_DEPTH {
                    return Err(super::recursion::too_deep(path));
                }
                let fields = record
                    .get("fields")
                    .and_then(Json::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let mut values = Vec::with_capacity(fields.len());
                self.empty_depth += 1;
                for field in fields {
                    let name = field.get("name").and_then(Json::as_str).unwrap_or("").to_owned();
                    let value = match field.get("type") {
                        Some(field_ty) => self.charge(path).and_then(|()| self.empty_value(field_ty, &ns, path)),
                        None => Err(PolicyError::new(path, "field has no type")),
                    };
                    match value {
                        Ok(value) => values.push((name, value)),
                        Err(e) => {
                            self.empty_depth -= 1;
                            return Err(e);
                        }
                    }
                }
                self.empty_depth -= 1;
                Value::Record(values)
            }
            Kind::Array(_) => Value::Array(Vec::new()),
            Kind::Map(_) => Value::Map(HashMap::new()),
            Kind::Union(branches) => match branches.iter().position(|b| b.as_str() == Some("null")) {
                Some(i) => Value::Union(i as u32, Box::new(Value::Null)),
                None => {
                    let first = branches.first().ok_or_else(|| PolicyError::new(path, "empty union"))?;
                    Value::Union(0, Box::new(self.empty_value(first, namespace, path)?))
                }
            },
        })
    }
}

/// The empty value of a type an action produced: string, bytes, null, unions, arrays and maps of them.
fn empty_output(ty: &Json) -> Value {
    match ty {
        Json::Array(branches) => match branches.iter().position(|b| b.as_str() == Some("null")) {
            Some(i) => Value::Union(i as u32, Box::new(Value::Null)),
            None => Value::Union(0, Box::new(branches.first().map_or(Value::Null, empty_output))),
        },
        Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("map") => Value::Map(HashMap::new()),
        Json::Object(_) => Value::Array(Vec::new()),
        Json::String(t) if t == "bytes" => Value::Bytes(Vec::new()),
        Json::String(t) if t == "null" => Value::Null,
        _ => Value::String(String::new()),
    }
}

enum Kind<'j> {
    Null,
    Scalar(Scalar),
    Record(&'j Map<String, Json>, String),
    Array(&'j Json),
    Map(&'j Json),
    Union(&'j [Json]),
}

/// A scalar type by the name used in messages and checks (logical types by their logical name).
struct Scalar {
    name: &'static str,
    /// The full name of an inline named type this use defines (an action would replace the definition).
    defines: Option<String>,
}

impl Scalar {
    fn plain(name: &'static str) -> Self {
        Self { name, defines: None }
    }
}

/// The sanitized type of a scalar under an action.
fn scalar_output(action: Action, scalar: &Scalar, path: &str) -> Result<&'static str, PolicyError> {
    match action {
        Action::Tokenize | Action::Hash | Action::Subject => Ok("string"),
        Action::Encrypt => Ok(if matches!(scalar.name, "bytes" | "fixed") {
            "bytes"
        } else {
            "string"
        }),
        Action::Mask { .. } => match scalar.name {
            "string" | "uuid" => Ok("string"),
            other => Err(PolicyError::new(
                path,
                format!("mask applies to strings; this field is {other} (use tokenize, encrypt or hash)"),
            )),
        },
        Action::Redact => unreachable!("redact keeps the type"),
    }
}

fn empty_scalar(scalar: &Scalar, ty: &Json, definitions: &HashMap<String, Definition<'_>>, namespace: &str) -> Value {
    let definition = |ty: &Json| -> Option<Map<String, Json>> {
        match ty {
            Json::Object(o) => Some(o.clone()),
            Json::String(name) => definitions.get(&full_name(name, namespace)).map(|d| d.json.clone()),
            _ => None,
        }
    };
    // A fixed is `size` bytes whatever its logical type, but the value carries the logical type, so that JSON
    // renders a decimal as 0 and a uuid as the nil uuid (not as NUL characters).
    if let Some(def) = definition(ty).filter(|d| d.get("type").and_then(Json::as_str) == Some("fixed")) {
        let size = def.get("size").and_then(Json::as_u64).unwrap_or(0) as usize;
        return match scalar.name {
            "decimal" => Value::Decimal(apache_avro::Decimal::from(vec![0u8; size])),
            "uuid" => Value::Uuid(apache_avro::Uuid::nil()),
            _ => Value::Fixed(size, vec![0; size]),
        };
    }
    // Logical types get their own value: apache-avro validates some of them (the nanosecond timestamps) only so.
    match scalar.name {
        "boolean" => Value::Boolean(false),
        "int" => Value::Int(0),
        "date" => Value::Date(0),
        "time-millis" => Value::TimeMillis(0),
        "long" => Value::Long(0),
        "time-micros" => Value::TimeMicros(0),
        "timestamp-millis" => Value::TimestampMillis(0),
        "timestamp-micros" => Value::TimestampMicros(0),
        "timestamp-nanos" => Value::TimestampNanos(0),
        "local-timestamp-millis" => Value::LocalTimestampMillis(0),
        "local-timestamp-micros" => Value::LocalTimestampMicros(0),
        "local-timestamp-nanos" => Value::LocalTimestampNanos(0),
        "float" => Value::Float(0.0),
        "double" => Value::Double(0.0),
        "decimal" => Value::Decimal(apache_avro::Decimal::from([0u8])),
        "big-decimal" => Value::BigDecimal(apache_avro::BigDecimal::from(0)),
        "bytes" => Value::Bytes(Vec::new()),
        "uuid" => Value::Uuid(apache_avro::Uuid::nil()),
        "enum" => {
            let def = definition(ty).unwrap_or_default();
            let symbol = def
                .get("default")
                .and_then(Json::as_str)
                .map(str::to_owned)
                .or_else(|| {
                    def.get("symbols")
                        .and_then(Json::as_array)
                        .and_then(|s| s.first())
                        .and_then(Json::as_str)
                        .map(str::to_owned)
                });
            let symbols = def.get("symbols").and_then(Json::as_array).cloned().unwrap_or_default();
            let symbol = symbol.unwrap_or_default();
            let index = symbols.iter().position(|s| s.as_str() == Some(&symbol)).unwrap_or(0);
            Value::Enum(index as u32, symbol)
        }
        // string and uuid (and anything string-like)
        _ => Value::String(String::new()),
    }
}

fn parse_annotation(annotation: &Json, path: &str) -> Result<Wanted, PolicyError> {
    let unknown = |name: &str| {
        PolicyError::new(
            path,
            format!("unknown pii action \"{name}\" (expected one of {ACTION_NAMES})"),
        )
    };
    match annotation {
        Json::String(name) if name == "none" => Ok(Wanted::None),
        Json::String(name) => Action::from_name(name)
            .map(|action| Wanted::Act { action, kind: None })
            .ok_or_else(|| unknown(name)),
        Json::Object(object) => {
            let name = object
                .get("action")
                .and_then(Json::as_str)
                .ok_or_else(|| PolicyError::new(path, "a pii object needs an \"action\" string"))?;
            if name == "none" {
                return Ok(Wanted::None);
            }
            let mut action = Action::from_name(name).ok_or_else(|| unknown(name))?;
            let mut kind = None;
            for (key, value) in object {
                match (key.as_str(), &mut action) {
                    ("action", _) => {}
                    ("keep_last", Action::Mask { keep_last }) => {
                        *keep_last = value.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                            PolicyError::new(path, "keep_last must be a whole number of characters >= 0")
                        })?;
                    }
                    ("kind", Action::Tokenize | Action::Encrypt | Action::Hash | Action::Subject) => {
                        kind = Some(
                            value
                                .as_str()
                                .filter(|k| !k.is_empty())
                                .ok_or_else(|| PolicyError::new(path, "kind must be a non-empty string"))?
                                .to_owned(),
                        );
                    }
                    (key, action) => {
                        return Err(PolicyError::new(
                            path,
                            format!("pii option \"{key}\" does not apply to {}", action.name()),
                        ));
                    }
                }
            }
            Ok(Wanted::Act { action, kind })
        }
        _ => Err(PolicyError::new(
            path,
            "pii must be an action name or an object with \"action\"",
        )),
    }
}

fn tag_list(names: &Json, path: &str, what: &str) -> Result<Vec<String>, PolicyError> {
    names
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| PolicyError::new(path, format!("{what} must be a list of tag names")))
}

/// An annotation anywhere but on a field would be dropped by Avro libraries: refuse it, naming where it is.
fn check_no_annotation(object: &Map<String, Json>, path: &str, keys: &[&str], what: &str) -> Result<(), PolicyError> {
    match keys.iter().find(|k| object.contains_key(**k)) {
        Some(key) => Err(PolicyError::new(
            path,
            format!("\"{key}\" is written inside {what}, where Avro tools drop it; move it onto the field itself"),
        )),
        None => Ok(()),
    }
}

/// Removes a field's default unless it holds nothing (null, or an empty string, array or map): an empty default
/// is what lets a registry accept a field added later.
fn drop_value_defaults(field: &mut Map<String, Json>) {
    let holds_nothing = |d: &Json| match d {
        Json::Null => true,
        Json::String(text) => text.is_empty(),
        Json::Array(items) => items.is_empty(),
        Json::Object(entries) => entries.is_empty(),
        _ => false,
    };
    if field.get("default").is_some_and(|d| !holds_nothing(d)) {
        field.shift_remove("default");
    }
}

/// Removes every default but null or empty from the fields (and the enum default) of the types defined inside `ty`.
fn drop_nested_defaults(ty: &mut Json) {
    match ty {
        Json::Object(object) => {
            drop_value_defaults(object);
            for value in object.values_mut() {
                drop_nested_defaults(value);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(drop_nested_defaults),
        _ => {}
    }
}

/// After an action changed a field's type, keep its default only where it is still valid.
fn adjust_default(field: &mut Map<String, Json>, out_type: &Json) {
    let Some(default) = field.get("default") else {
        return;
    };
    let first = match out_type {
        Json::Array(branches) => branches.first(),
        other => Some(other),
    };
    let valid = matches!(
        (default, first.and_then(Json::as_str)),
        (Json::Null, Some("null")) | (Json::String(_), Some("string" | "bytes"))
    );
    if !valid {
        field.shift_remove("default");
    }
}

/// Avro's logical types (apache-avro's parser knows these; others it ignores, as the specification says).
const LOGICAL_TYPES: [&str; 13] = [
    "decimal",
    "big-decimal",
    "uuid",
    "date",
    "time-millis",
    "time-micros",
    "timestamp-millis",
    "timestamp-micros",
    "timestamp-nanos",
    "local-timestamp-millis",
    "local-timestamp-micros",
    "local-timestamp-nanos",
    "duration",
];

/// The name a type object refers to, where Avro's parser reads the object as a reference: `{"type": "Person"}` is
/// the named type `Person` (attributes beside it are dropped).
fn reference_form(object: &Map<String, Json>) -> Option<&Json> {
    let ty = object.get("type")?;
    let name = ty.as_str()?;
    (!is_primitive(name) && !matches!(name, "record" | "error" | "enum" | "fixed" | "array" | "map")).then_some(ty)
}

/// Why a type object that looks like a definition is not one to Avro's parser, which reads it as a reference to
/// a type named after its `type` (and never reads what it holds).
fn read_otherwise(object: &Map<String, Json>) -> Option<&'static str> {
    match object.get("type").and_then(Json::as_str) {
        Some("error") => Some(
            "an `error` type belongs to Avro protocols (Avro's parser reads it as a reference to a type named \
             error): declare a record",
        ),
        Some("record" | "enum" | "array" | "map")
            if object
                .get("logicalType")
                .and_then(Json::as_str)
                .is_some_and(|logical| LOGICAL_TYPES.contains(&logical)) =>
        {
            Some(
                "a logicalType on a record, enum, array or map (Avro's parser reads the type as a reference to a \
                 type named record, enum, array or map, and never reads what it holds): remove the logicalType",
            )
        }
        _ => None,
    }
}

/// A logical type Avro's parser does not apply to the type it is on (it ignores it there, as the specification
/// says), which the compiler would have applied: refused, so that both read the type alike (a redacted value of a
/// `uuid` on a long was written as text where a long belongs).
fn unapplied_logical_type(object: &Map<String, Json>) -> Option<String> {
    let logical = object.get("logicalType")?.as_str()?;
    if !LOGICAL_TYPES.contains(&logical) {
        return None;
    }
    let size = object.get("size").and_then(Json::as_u64);
    let applies = match object.get("type") {
        Some(Json::String(ty)) => match (logical, ty.as_str()) {
            ("decimal", "bytes" | "fixed") => {
                let precision = object.get("precision").and_then(Json::as_u64);
                let scale = object.get("scale").map_or(Some(0), Json::as_u64);
                matches!((precision, scale), (Some(p), Some(s)) if p >= 1 && s <= p)
            }
            ("big-decimal" | "uuid", "bytes") | ("uuid", "string") | ("date" | "time-millis", "int") => true,
            ("uuid", "fixed") => size == Some(16),
            ("duration", "fixed") => size == Some(12),
            (
                "time-micros"
                | "timestamp-millis"
                | "timestamp-micros"
                | "timestamp-nanos"
                | "local-timestamp-millis"
                | "local-timestamp-micros"
                | "local-timestamp-nanos",
                "long",
            ) => true,
            _ => false,
        },
        // Beside a type object it wraps: Avro applies it to that type, which the compiler does not look for.
        _ => false,
    };
    (!applies).then(|| {
        format!(
            "the logicalType `{logical}` does not apply here (Avro's parser ignores it on this type, or applies it to \
             the type object inside): put it on a type it applies to, with valid attributes, or remove it"
        )
    })
}

fn is_primitive(name: &str) -> bool {
    matches!(
        name,
        "null" | "boolean" | "int" | "long" | "float" | "double" | "bytes" | "string"
    )
}

fn primitive_name(name: &str) -> &'static str {
    match name {
        "boolean" => "boolean",
        "int" => "int",
        "long" => "long",
        "float" => "float",
        "double" => "double",
        "bytes" => "bytes",
        "null" => "null",
        _ => "string",
    }
}

fn logical_name(name: &str) -> &'static str {
    match name {
        "decimal" => "decimal",
        "big-decimal" => "big-decimal",
        "uuid" => "uuid",
        "date" => "date",
        "time-millis" => "time-millis",
        "time-micros" => "time-micros",
        "timestamp-millis" => "timestamp-millis",
        "timestamp-micros" => "timestamp-micros",
        "timestamp-nanos" => "timestamp-nanos",
        "local-timestamp-millis" => "local-timestamp-millis",
        "local-timestamp-micros" => "local-timestamp-micros",
        "local-timestamp-nanos" => "local-timestamp-nanos",
        "duration" => "duration",
        _ => "unknown logical type",
    }
}

/// The one type of a type or of a nullable union (`None`: a union of several).
fn non_null(ty: &Json) -> Option<&Json> {
    match ty {
        Json::Array(branches) => match branches
            .iter()
            .filter(|b| b.as_str() != Some("null"))
            .collect::<Vec<_>>()[..]
        {
            [one] => Some(one),
            _ => None,
        },
        other => Some(other),
    }
}

pub(crate) const SUBJECT_TYPES: &str = "the subject field must be a string, int, long or uuid (a uuid on string, bytes or a 16-byte fixed), optionally nullable";

fn fixed_name(object: &Map<String, Json>) -> &'static str {
    // A logical type Avro would not apply is refused before (`unapplied_logical_type`); one it does not know, it
    // ignores: so does the compiler.
    match object.get("logicalType").and_then(Json::as_str) {
        Some(logical) if LOGICAL_TYPES.contains(&logical) => logical_name(logical),
        _ => "fixed",
    }
}

fn full_name(name: &str, namespace: &str) -> String {
    if let Some(unqualified) = name.strip_prefix('.') {
        // A leading dot names the null namespace (Avro's parser reads it so).
        unqualified.to_owned()
    } else if name.contains('.') || namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The namespace a definition's names live in, as Avro's parser reads it: the one its dotted name carries, else
/// its `namespace` attribute, else the enclosing one.
fn definition_namespace(definition: &Map<String, Json>, enclosing: &str) -> String {
    let name = definition.get("name").and_then(Json::as_str).unwrap_or("");
    match name.rsplit_once('.') {
        Some((ns, _)) => ns.to_owned(),
        None => definition
            .get("namespace")
            .and_then(Json::as_str)
            .unwrap_or(enclosing)
            .to_owned(),
    }
}

/// What a valid domain name is, for error messages.
pub const DOMAIN_RULE: &str =
    "1-64 characters of a-z, 0-9, '.', '_' or '-', not starting with \"piiwall\" (piiwall's own domains)";

/// Whether a name may be a key domain: see [`DOMAIN_RULE`].
pub fn valid_domain(domain: &str) -> bool {
    !domain.starts_with(super::RESERVED_DOMAIN_PREFIX)
        && (1..=64).contains(&domain.len())
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

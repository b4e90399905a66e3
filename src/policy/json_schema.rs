//! JSON Schema topics: a JSON Schema is translated into the Avro schema piiwall compiles, so that every action,
//! key, subject, quarantine reason and audit summary works as it does for Avro; records are read as JSON, carried
//! through the Avro transcoder, and written back as JSON (see [`crate::codec::json`]).
//!
//! What a JSON Schema may say, and what it becomes:
//! - `"type": "object"` with `properties` → a record; properties not in `required` may be absent (and are left
//!   absent in the output), except a protected array or map, which is protected item by item: absent, it is
//!   written empty. An object with only an `additionalProperties` schema → a map (its keys protected with
//!   its values, as for Avro maps).
//! - `string`, `integer` (64-bit), `number` (double), `boolean`, `null`; a list of types, `oneOf` and `anyOf` →
//!   a union; `array` with `items` → an array; `enum` and `const` → the type of their values.
//! - `$ref` to `#/$defs/...`, `#/definitions/...` or any local JSON pointer (references to other documents are
//!   refused: inline them).
//! - Annotations: `"pii"` (piiwall's, as on an Avro field) and `"confluent:tags"` on a property, on the definition
//!   it refers to, or on its `items` / `additionalProperties` (they protect the property as a whole); the root's
//!   `"pii.subject"` and `"pii.domain"`. An annotation anywhere else (the root, a `oneOf` branch) is refused:
//!   ignoring it would let PII through.
//!
//! Refused with a message that names the place: `allOf`, `not`, `if`/`then`, `patternProperties`, tuples, schemas
//! with no type, recursion, and property names that are not Avro names (`[A-Za-z_][A-Za-z0-9_]*`).
//!
//! The sanitized JSON Schema is derived from the sanitized Avro schema: what the output records hold, with
//! `additionalProperties: false` (undeclared properties never pass) and `"pii.applied"` on each protected property.

use std::collections::HashSet;

use apache_avro::Schema;
use apache_avro::schema::RecordSchema;
use serde_json::{Map, Value as Json, json};

use super::SANITIZED_MARK;
use crate::error::PolicyError;

/// The JSON Schema dialect the sanitized schemas declare.
const DIALECT: &str = "http://json-schema.org/draft-07/schema#";

/// Keywords piiwall cannot honour: a schema that uses them is refused rather than half understood.
const UNSUPPORTED: [&str; 14] = [
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "prefixItems",
    "additionalItems",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
];

/// What may stand next to a `$ref`: annotations and documentation. Anything else (`properties`, `type`, …) would
/// change what the reference means, which piiwall does not merge.
const REF_SIBLINGS: [&str; 11] = [
    "$ref",
    "pii",
    "confluent:tags",
    "title",
    "description",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// What may not stand next to `oneOf` / `anyOf`: the alternatives must say everything themselves.
/// (`required` beside them is harmless: ignoring it only leaves more properties optional; `additionalProperties`
/// conflicts only as a schema, not as `true`/`false`.)
const CHOICE_CONFLICTS: [&str; 6] = ["properties", "items", "additionalProperties", "enum", "const", "$ref"];

/// What `oneOf` / `anyOf` alternatives may say when they only constrain the schema beside them (`"oneOf":
/// [{"required": ["email"]}, {"required": ["phone"]}]`): such alternatives change nothing piiwall protects, and
/// are ignored.
const CONSTRAINTS: [&str; 20] = [
    "required",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "title",
    "description",
    "$comment",
    "not",
    "contains",
];

/// Keywords whose values are data (not schemas): never searched for annotations.
const DATA_KEYWORDS: [&str; 5] = ["enum", "const", "default", "examples", "metadata"];

/// Keywords whose values map names to schemas.
const NAMED_SCHEMAS: [&str; 5] = [
    "properties",
    "$defs",
    "definitions",
    "patternProperties",
    "dependentSchemas",
];

/// How deeply schemas may nest, and how many types one translation may produce: a schema from a registry is input,
/// and inlining `$ref`s could otherwise blow up (each definition used twice, twenty-five levels deep).
const MAX_DEPTH: usize = 64;
const MAX_TYPES: usize = 10_000;

/// Whether a schema text is a JSON Schema rather than an Avro schema: an Avro schema piiwall reads is a record
/// (`"type": "record"`); anything else is taken for a JSON Schema.
pub fn is_json_schema(schema: &str) -> bool {
    match serde_json::from_str::<Json>(schema) {
        Ok(Json::Object(root)) => root.get("type").and_then(Json::as_str) != Some("record"),
        _ => false,
    }
}

/// Translates a JSON Schema into the Avro schema (JSON text) the policy compiler reads.
pub fn to_avro(schema: &str) -> Result<String, PolicyError> {
    let document: Json = serde_json::from_str(schema)
        .map_err(|e| PolicyError::new("", format!("the JSON Schema is not valid JSON: {e}")))?;
    let root = document
        .as_object()
        .ok_or_else(|| PolicyError::new("", "a JSON Schema's root must be an object schema"))?;
    if root.contains_key(SANITIZED_MARK) {
        return Err(PolicyError::new(
            "",
            "this schema is already sanitized (it carries pii.sanitized)",
        ));
    }
    for keyword in ["pii", "confluent:tags"] {
        if root.contains_key(keyword) {
            return Err(PolicyError::new(
                "",
                format!("`{keyword}` on the root: put it on the properties it protects"),
            ));
        }
    }
    if root.contains_key("$ref") {
        return Err(PolicyError::new(
            "",
            "the root must declare its properties itself (a root $ref is not supported)",
        ));
    }
    for keyword in ["oneOf", "anyOf"] {
        if root.get(keyword).is_some_and(|branches| !only_constraints(branches)) {
            return Err(PolicyError::new(
                "",
                format!("`{keyword}` at the root is not supported: the root must be one object with properties"),
            ));
        }
    }
    if root.get("type").is_some_and(|t| t != "object") || !root.contains_key("properties") {
        return Err(PolicyError::new(
            "",
            "a JSON Schema's root must be an object (\"type\": \"object\" with properties)",
        ));
    }
    let mut translator = Translator {
        document: &document,
        names: HashSet::new(),
        refs: Vec::new(),
        referenced: HashSet::new(),
        consumed: HashSet::new(),
        depth: 0,
        types: 0,
        unapplied: 0,
    };
    let name = root
        .get("title")
        .and_then(Json::as_str)
        .map(avro_name)
        .unwrap_or_else(|| "Record".to_owned());
    let mut avro = match translator.object(root, "", &name)? {
        record @ Json::Object(_) if record["type"] == "record" => record,
        _ => {
            return Err(PolicyError::new(
                "",
                "a JSON Schema's root must be an object with properties (not a map)",
            ));
        }
    };
    translator.check_all_annotations_applied()?;
    let avro_root = avro.as_object_mut().expect("a record is an object");
    for keyword in ["pii.subject", "pii.domain", "metadata"] {
        if let Some(value) = root.get(keyword) {
            avro_root.insert(keyword.to_owned(), value.clone());
        }
    }
    Ok(avro.to_string())
}

/// The JSON Schema of the records sanitized with `sanitized` (the compiled sanitized Avro schema).
pub fn sanitized_schema(sanitized: &Schema, writer_json_schema: &str) -> String {
    let title = serde_json::from_str::<Json>(writer_json_schema)
        .ok()
        .and_then(|j| j.get("title").cloned());
    let mut root = match sanitized {
        Schema::Record(record) => record_schema(record),
        _ => json!({}),
    };
    let object = root.as_object_mut().expect("a record's JSON Schema is an object");
    object.insert("$schema".to_owned(), Json::String(DIALECT.to_owned()));
    if let Some(title) = title {
        object.insert("title".to_owned(), title);
    }
    object.insert(SANITIZED_MARK.to_owned(), Json::Bool(true));
    root.to_string()
}

struct Translator<'j> {
    document: &'j Json,
    /// Record names given so far (each must be unique in the Avro schema).
    names: HashSet<String>,
    /// `$ref`s being followed, to refuse recursion.
    refs: Vec<String>,
    /// Every JSON pointer a `$ref` named.
    referenced: HashSet<String>,
    /// The schema objects whose annotations were applied (by address in `document`).
    consumed: HashSet<*const Map<String, Json>>,
    /// How deeply the type being translated nests, and how many types were produced so far.
    depth: usize,
    types: usize,
    /// Above 0 while translating the alternatives of a `oneOf`/`anyOf`, where an annotation would not be applied
    /// (reset for the properties of a record inside them, whose own annotations are).
    unapplied: usize,
}

impl<'j> Translator<'j> {
    /// `schema` and every schema its `$ref`s lead to, in order (at most [`MAX_DEPTH`] references).
    fn ref_chain(
        &mut self,
        schema: &'j Map<String, Json>,
        path: &str,
    ) -> Result<Vec<&'j Map<String, Json>>, PolicyError> {
        let mut chain = vec![schema];
        let mut seen = HashSet::new();
        let mut current = schema;
        while let Some(reference) = current.get("$ref") {
            if !seen.insert(reference) {
                return Err(PolicyError::new(path, "a `$ref` chain refers to itself"));
            }
            if chain.len() > MAX_DEPTH {
                return Err(PolicyError::new(
                    path,
                    format!("more than {MAX_DEPTH} `$ref`s in a row"),
                ));
            }
            current = self.ref_target(current, path)?;
            chain.push(current);
        }
        Ok(chain)
    }

    /// The schema a schema's `$ref` names (one step), its siblings checked.
    fn ref_target(&mut self, schema: &'j Map<String, Json>, path: &str) -> Result<&'j Map<String, Json>, PolicyError> {
        let reference = schema
            .get("$ref")
            .and_then(Json::as_str)
            .ok_or_else(|| PolicyError::new(path, "`$ref` must be a string"))?;
        if let Some(other) = schema.keys().find(|k| !REF_SIBLINGS.contains(&k.as_str())) {
            return Err(PolicyError::new(
                path,
                format!(
                    "`{other}` next to `$ref` is not supported: piiwall does not merge a reference with what stands \
                     beside it; move it into the definition"
                ),
            ));
        }
        let pointer = reference.strip_prefix('#').ok_or_else(|| {
            PolicyError::new(
                path,
                format!(
                    "`$ref` {reference} points into another document: only local references (#/$defs/...) are \
                     supported; inline the definition"
                ),
            )
        })?;
        let target = self
            .document
            .pointer(pointer)
            .and_then(Json::as_object)
            .ok_or_else(|| PolicyError::new(path, format!("`$ref` {reference} names no schema")))?;
        self.referenced.insert(pointer.to_owned());
        Ok(target)
    }

    /// A property's annotations: on its schema, on any schema its `$ref`s lead to, or on its `items` /
    /// `additionalProperties` (all of which protect the property as a whole). Two different ones are refused.
    fn annotations(
        &mut self,
        schema: &'j Map<String, Json>,
        path: &str,
    ) -> Result<Vec<(&'static str, &'j Json)>, PolicyError> {
        let mut found: Vec<(&'static str, &'j Json)> = Vec::new();
        let mut pending = vec![schema];
        let mut visited = 0;
        while let Some(start) = pending.pop() {
            visited += 1;
            if visited > MAX_TYPES {
                return Err(PolicyError::new(path, "the schema nests too deeply"));
            }
            let chain = self.ref_chain(start, path)?;
            for schema in &chain {
                for keyword in ["pii", "confluent:tags"] {
                    let Some(value) = schema.get(keyword) else { continue };
                    self.consumed.insert(*schema as *const _);
                    match found.iter().find(|(k, _)| *k == keyword) {
                        Some((_, existing)) if *existing != value => {
                            return Err(PolicyError::new(
                                path,
                                format!(
                                    "two different `{keyword}` annotations apply (on the property, its $ref or its \
                                     items): keep one"
                                ),
                            ));
                        }
                        Some(_) => {}
                        None => found.push((keyword, value)),
                    }
                }
            }
            let last = chain.last().expect("a chain holds its start");
            for keyword in ["items", "additionalProperties"] {
                if let Some(Json::Object(inner)) = last.get(keyword) {
                    pending.push(inner);
                }
            }
        }
        Ok(found)
    }

    /// Refuses an annotation the translation did not apply (it sits where piiwall does not read it: inside a `oneOf`
    /// branch's items, next to a keyword that was refused, …), unless it is in a definition nothing refers to.
    fn check_all_annotations_applied(&self) -> Result<(), PolicyError> {
        let mut stray = Vec::new();
        find_annotations(self.document, String::new(), &mut |schema, pointer| {
            if !self.consumed.contains(&(schema as *const _)) {
                stray.push(pointer);
            }
        });
        for pointer in stray {
            let definition: String = pointer.split('/').take(3).collect::<Vec<_>>().join("/");
            let unused_definition = (pointer.starts_with("/$defs/") || pointer.starts_with("/definitions/"))
                && !self
                    .referenced
                    .iter()
                    .any(|r| *r == definition || r.starts_with(&format!("{definition}/")));
            if !unused_definition {
                return Err(PolicyError::new(
                    "",
                    format!(
                        "the annotation at {pointer} is not applied: put pii / confluent:tags on a property (or its \
                         $ref, items or additionalProperties), never inside a oneOf or anyOf branch's parts"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An object schema as an Avro record named `name`.
    fn record(&mut self, object: &'j Map<String, Json>, path: &str, name: &str) -> Result<Json, PolicyError> {
        check_supported(object, path)?;
        let name = self.unique_name(name);
        let properties = match object.get("properties") {
            None => None,
            Some(Json::Object(properties)) => Some(properties),
            Some(_) => return Err(PolicyError::new(path, "`properties` must be an object")),
        };
        let required: Vec<&str> = match object.get("required") {
            None => Vec::new(),
            Some(Json::Array(names)) => names.iter().filter_map(Json::as_str).collect(),
            Some(_) => return Err(PolicyError::new(path, "`required` must be a list of property names")),
        };
        let mut fields = Vec::new();
        for (property, schema) in properties.into_iter().flatten() {
            let field_path = join(path, property);
            if !is_avro_name(property) {
                return Err(PolicyError::new(
                    path,
                    format!(
                        "property name {property:?} is not supported: piiwall needs names of letters, digits and \
                         _ that do not start with a digit"
                    ),
                ));
            }
            let schema = schema
                .as_object()
                .ok_or_else(|| PolicyError::new(&field_path, "a property's schema must be an object"))?;
            let mut field = Map::new();
            field.insert("name".to_owned(), Json::String(property.clone()));
            // A property's own annotations apply, even inside an alternative.
            let unapplied = std::mem::take(&mut self.unapplied);
            let avro = self.type_of(schema, &field_path, &format!("{name}_{property}"));
            self.unapplied = unapplied;
            let avro = avro?;
            let annotations = self.annotations(schema, &field_path)?;
            let collection = match branch_kind(&avro) {
                "array" => Some(json!([])),
                "map" => Some(json!({})),
                _ => None,
            };
            match (required.contains(&property.as_str()), collection) {
                (true, _) => {
                    field.insert("type".to_owned(), avro);
                }
                // A protected array or map is protected item by item, which a union with null would not allow: an
                // absent one reads as empty.
                (false, Some(empty)) if !annotations.is_empty() => {
                    field.insert("type".to_owned(), avro);
                    field.insert("default".to_owned(), empty);
                }
                (false, _) => {
                    field.insert("type".to_owned(), nullable(avro));
                    field.insert("default".to_owned(), Json::Null);
                }
            }
            for (keyword, value) in annotations {
                field.insert(keyword.to_owned(), value.clone());
            }
            fields.push(Json::Object(field));
        }
        Ok(json!({"type": "record", "name": name, "fields": fields}))
    }

    /// The Avro type of a (non-root) schema.
    fn type_of(&mut self, schema: &'j Map<String, Json>, path: &str, name: &str) -> Result<Json, PolicyError> {
        self.types += 1;
        if self.types > MAX_TYPES || self.depth >= MAX_DEPTH {
            return Err(PolicyError::new(
                path,
                format!("the schema is too large or nests too deeply (at most {MAX_DEPTH} levels, {MAX_TYPES} types)"),
            ));
        }
        if self.unapplied > 0
            && let Some(annotation) = ["pii", "confluent:tags"].into_iter().find(|k| schema.contains_key(*k))
        {
            return Err(PolicyError::new(
                path,
                format!(
                    "`{annotation}` inside a `oneOf`/`anyOf` alternative (or what it refers to) is not applied: put \
                     it on the property, which protects whichever alternative a record takes"
                ),
            ));
        }
        self.depth += 1;
        let avro = self.type_of_inner(schema, path, name);
        self.depth -= 1;
        avro
    }

    fn type_of_inner(&mut self, schema: &'j Map<String, Json>, path: &str, name: &str) -> Result<Json, PolicyError> {
        if let Some(Json::String(reference)) = schema.get("$ref") {
            if self.refs.contains(reference) {
                return Err(PolicyError::new(
                    path,
                    format!("`$ref` {reference} contains itself: recursive schemas are not supported"),
                ));
            }
            // Only the next step: a chain of references is followed one `type_of` at a time.
            let target = self.ref_target(schema, path)?;
            self.refs.push(reference.clone());
            let avro = self.type_of(target, path, name);
            self.refs.pop();
            return avro;
        }
        check_supported(schema, path)?;
        if schema.contains_key("oneOf") && schema.contains_key("anyOf") {
            return Err(PolicyError::new(
                path,
                "`oneOf` and `anyOf` together are not supported: keep one",
            ));
        }
        for keyword in ["oneOf", "anyOf"] {
            if let Some(branches) = schema.get(keyword) {
                if only_constraints(branches) {
                    continue;
                }
                if let Some(other) = CHOICE_CONFLICTS.iter().find(|k| {
                    schema
                        .get(**k)
                        .is_some_and(|v| !(**k == "additionalProperties" && v.is_boolean()))
                }) {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "`{other}` next to `{keyword}` is not supported: piiwall does not merge them; give each \
                             alternative everything it holds"
                        ),
                    ));
                }
                let branches = branches
                    .as_array()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| PolicyError::new(path, format!("`{keyword}` must be a non-empty list")))?;
                let mut union = Vec::new();
                for (index, branch) in branches.iter().enumerate() {
                    let branch = branch
                        .as_object()
                        .ok_or_else(|| PolicyError::new(path, format!("a `{keyword}` branch must be a schema")))?;
                    self.unapplied += 1;
                    let avro = self.type_of(branch, path, &format!("{name}_{index}"));
                    self.unapplied -= 1;
                    add_branch(&mut union, avro?, path)?;
                }
                check_alternatives(&union, path)?;
                return Ok(single(union));
            }
        }
        if let Some(values) = schema.get("enum").and_then(Json::as_array) {
            return Ok(single(self.types_of_values(values, path)?));
        }
        if let Some(value) = schema.get("const") {
            return Ok(single(self.types_of_values(std::slice::from_ref(value), path)?));
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(list)) => list
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| PolicyError::new(path, "`type` lists type names"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(PolicyError::new(path, "`type` must be a type name or a list of them")),
            None if schema.contains_key("properties") || schema.contains_key("additionalProperties") => {
                vec!["object"]
            }
            None if schema.contains_key("items") => vec!["array"],
            None => {
                return Err(PolicyError::new(
                    path,
                    "the schema says nothing of what the value is (no type, properties, items, enum or $ref): \
                     piiwall cannot tell what to protect; give it a type",
                ));
            }
        };
        let mut union = Vec::new();
        for kind in types {
            let avro = match kind {
                "string" => json!("string"),
                "integer" => json!("long"),
                "number" => json!("double"),
                "boolean" => json!("boolean"),
                "null" => json!("null"),
                "array" => {
                    let items = match schema.get("items") {
                        Some(Json::Object(items)) => items,
                        Some(_) => {
                            return Err(PolicyError::new(
                                path,
                                "tuple `items` (a list of schemas) is not supported: give one schema for every item",
                            ));
                        }
                        None => {
                            return Err(PolicyError::new(
                                path,
                                "an array needs `items`: piiwall cannot tell what to protect in items of any type",
                            ));
                        }
                    };
                    json!({"type": "array", "items": self.type_of(items, path, &format!("{name}_item"))?})
                }
                "object" => self.object(schema, path, name)?,
                other => {
                    return Err(PolicyError::new(
                        path,
                        format!("`type` {other:?} is not a JSON Schema type"),
                    ));
                }
            };
            add_branch(&mut union, avro, path)?;
        }
        check_alternatives(&union, path)?;
        Ok(single(union))
    }

    /// An object schema: a record when it declares properties, a map when it only gives `additionalProperties`.
    fn object(&mut self, schema: &'j Map<String, Json>, path: &str, name: &str) -> Result<Json, PolicyError> {
        let has_properties = schema
            .get("properties")
            .and_then(Json::as_object)
            .is_some_and(|p| !p.is_empty());
        match schema.get("additionalProperties") {
            Some(Json::Object(_)) if has_properties => Err(PolicyError::new(
                path,
                "an object with both `properties` and an `additionalProperties` schema is not supported: \
                     declare every property, or make it a map (only additionalProperties)",
            )),
            Some(Json::Object(values)) => {
                Ok(json!({"type": "map", "values": self.type_of(values, path, &format!("{name}_value"))?}))
            }
            _ => self.record(schema, path, name),
        }
    }

    /// The types of `enum` / `const` values.
    fn types_of_values(&mut self, values: &[Json], path: &str) -> Result<Vec<Json>, PolicyError> {
        let mut union = Vec::new();
        for value in values {
            let avro = match value {
                Json::Null => json!("null"),
                Json::Bool(_) => json!("boolean"),
                Json::String(_) => json!("string"),
                Json::Number(n) if n.is_i64() || n.is_u64() => json!("long"),
                Json::Number(_) => json!("double"),
                _ => {
                    return Err(PolicyError::new(
                        path,
                        "`enum` / `const` of objects or arrays is not supported: give the type instead",
                    ));
                }
            };
            if !union.contains(&avro) {
                union.push(avro);
            }
        }
        if union.contains(&json!("long")) && union.contains(&json!("double")) {
            union.retain(|t| t != &json!("long"));
        }
        if union.is_empty() {
            return Err(PolicyError::new(path, "`enum` must list at least one value"));
        }
        Ok(union)
    }

    fn unique_name(&mut self, wanted: &str) -> String {
        let base = avro_name(wanted);
        let mut name = base.clone();
        let mut n = 1;
        while !self.names.insert(name.clone()) {
            n += 1;
            name = format!("{base}_{n}");
        }
        name
    }
}

fn check_supported(schema: &Map<String, Json>, path: &str) -> Result<(), PolicyError> {
    if let Some(keyword) = UNSUPPORTED.iter().find(|k| schema.contains_key(**k)) {
        return Err(PolicyError::new(
            path,
            format!("`{keyword}` is not supported: piiwall must know exactly which properties a record holds"),
        ));
    }
    if schema.contains_key("pii.subject") || schema.contains_key("pii.domain") {
        // The root's are read by `to_avro`; elsewhere they would be ignored.
        if !path.is_empty() {
            return Err(PolicyError::new(
                path,
                "pii.subject and pii.domain belong on the root schema only",
            ));
        }
    }
    Ok(())
}

/// Adds a branch to a union being built, flattening nested unions and refusing repeated types.
fn add_branch(union: &mut Vec<Json>, avro: Json, path: &str) -> Result<(), PolicyError> {
    let branches = match avro {
        Json::Array(inner) => inner,
        other => vec![other],
    };
    for branch in branches {
        let kind = branch_kind(&branch);
        if union.iter().any(|b| branch_kind(b) == kind && kind != "record") {
            if union.contains(&branch) {
                continue;
            }
            return Err(PolicyError::new(
                path,
                format!("two alternatives of the same kind ({kind}) cannot be told apart: merge them"),
            ));
        }
        union.push(branch);
    }
    Ok(())
}

/// Whether `oneOf`/`anyOf` alternatives only constrain the schema beside them (see [`CONSTRAINTS`]).
fn only_constraints(branches: &Json) -> bool {
    branches.as_array().is_some_and(|branches| {
        !branches.is_empty()
            && branches.iter().all(|branch| {
                branch
                    .as_object()
                    .is_some_and(|b| b.keys().all(|k| CONSTRAINTS.contains(&k.as_str())))
            })
    })
}

/// Refuses alternatives a record could be read into the wrong one of, unprotected: a record and a map (a record with
/// one undeclared property would be read as the map, whole), or records that declare the same property with
/// different protection (the first that accepts a record wins, and `enum` / `const` values are not checked).
fn check_alternatives(union: &[Json], path: &str) -> Result<(), PolicyError> {
    let records: Vec<&Json> = union.iter().filter(|b| branch_kind(b) == "record").collect();
    if !records.is_empty() && union.iter().any(|b| branch_kind(b) == "map") {
        return Err(PolicyError::new(
            path,
            "an object with properties and a map (an object of additionalProperties) as alternatives cannot be told \
             apart safely: keep one",
        ));
    }
    let mut seen: Vec<(&str, Json)> = Vec::new();
    for record in records {
        for field in record["fields"].as_array().into_iter().flatten() {
            let name = field["name"].as_str().unwrap_or_default();
            let shape = unnamed(field);
            match seen.iter().find(|(n, _)| *n == name) {
                Some((_, other)) if *other != shape => {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "alternatives declare `{name}` differently (type or protection): a record matching more \
                             than one is read as the first; declare and protect it alike in each"
                        ),
                    ));
                }
                Some(_) => {}
                None => seen.push((name, shape)),
            }
        }
    }
    Ok(())
}

/// A field or type without the names given to its records (which differ by position) and without its default.
fn unnamed(json: &Json) -> Json {
    match json {
        Json::Object(object) => {
            let record = object.get("type").and_then(Json::as_str) == Some("record");
            Json::Object(
                object
                    .iter()
                    .filter(|(k, _)| !(record && k.as_str() == "name") && k.as_str() != "default")
                    .map(|(k, v)| (k.clone(), unnamed(v)))
                    .collect(),
            )
        }
        Json::Array(items) => Json::Array(items.iter().map(unnamed).collect()),
        other => other.clone(),
    }
}

/// Calls `found` with every schema object of `json` that carries `pii` or `confluent:tags`, and its JSON pointer.
fn find_annotations<'j>(json: &'j Json, pointer: String, found: &mut impl FnMut(&'j Map<String, Json>, String)) {
    let escape = |key: &str| key.replace('~', "~0").replace('/', "~1");
    match json {
        Json::Object(schema) => {
            if schema.contains_key("pii") || schema.contains_key("confluent:tags") {
                found(schema, pointer.clone());
            }
            for (key, value) in schema {
                if DATA_KEYWORDS.contains(&key.as_str()) {
                    continue;
                }
                let at = format!("{pointer}/{}", escape(key));
                match (NAMED_SCHEMAS.contains(&key.as_str()), value) {
                    (true, Json::Object(named)) => {
                        for (name, sub) in named {
                            find_annotations(sub, format!("{at}/{}", escape(name)), found);
                        }
                    }
                    _ => find_annotations(value, at, found),
                }
            }
        }
        Json::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                find_annotations(item, format!("{pointer}/{index}"), found);
            }
        }
        _ => {}
    }
}

fn branch_kind(avro: &Json) -> &str {
    match avro {
        Json::String(name) => name,
        Json::Object(o) => o.get("type").and_then(Json::as_str).unwrap_or("?"),
        _ => "?",
    }
}

/// A union of one type is that type.
fn single(mut union: Vec<Json>) -> Json {
    if union.len() == 1 {
        union.pop().expect("one branch")
    } else {
        if let Some(null) = union.iter().position(|b| b == "null") {
            let null = union.remove(null);
            union.insert(0, null);
        }
        Json::Array(union)
    }
}

/// The type with null as its first branch (the branch of the `null` default an absent property takes).
fn nullable(avro: Json) -> Json {
    let mut union = match avro {
        Json::Array(inner) => inner,
        other => vec![other],
    };
    union.retain(|b| b != "null");
    union.insert(0, json!("null"));
    Json::Array(union)
}

fn is_avro_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A name made valid for Avro: other characters become `_`.
fn avro_name(text: &str) -> String {
    let mut name: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        name.insert(0, '_');
    }
    name
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn record_schema(record: &RecordSchema) -> Json {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for field in &record.fields {
        let mut property = type_schema(&field.schema);
        if let Some(applied) = field.custom_attributes.get("pii.applied")
            && let Some(object) = property.as_object_mut()
        {
            object.insert("pii.applied".to_owned(), applied.clone());
        }
        if field.default.is_none() {
            required.push(Json::String(field.name.clone()));
        }
        properties.insert(field.name.clone(), property);
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

fn type_schema(schema: &Schema) -> Json {
    match schema {
        Schema::Null => json!({"type": "null"}),
        Schema::Boolean => json!({"type": "boolean"}),
        Schema::Int | Schema::Long => json!({"type": "integer"}),
        Schema::Float | Schema::Double => json!({"type": "number"}),
        Schema::String | Schema::Bytes | Schema::Enum(_) | Schema::Uuid(_) => json!({"type": "string"}),
        Schema::Array(array) => json!({"type": "array", "items": type_schema(&array.items)}),
        Schema::Map(map) => json!({"type": "object", "additionalProperties": type_schema(&map.types)}),
        Schema::Union(union) => json!({"anyOf": union.variants().iter().map(type_schema).collect::<Vec<_>>()}),
        Schema::Record(record) => record_schema(record),
        // The translation produces none of the other Avro types.
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avro(schema: Json) -> Json {
        serde_json::from_str(&to_avro(&schema.to_string()).unwrap()).unwrap()
    }

    fn refused(schema: Json) -> String {
        to_avro(&schema.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn objects_become_records_and_optional_properties_nullable() {
        let out = avro(json!({
            "title": "customer event",
            "type": "object",
            "pii.subject": "id",
            "required": ["id", "email"],
            "properties": {
                "id": {"type": "string"},
                "email": {"type": "string", "pii": "encrypt"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string", "confluent:tags": ["PII"]}},
                "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                "score": {"type": ["number", "null"]},
            }
        }));
        assert_eq!(out["name"], "customer_event");
        assert_eq!(out["pii.subject"], "id");
        let fields = out["fields"].as_array().unwrap();
        assert_eq!(fields[0], json!({"name": "id", "type": "string"}));
        assert_eq!(fields[1], json!({"name": "email", "type": "string", "pii": "encrypt"}));
        assert_eq!(
            fields[2],
            json!({"name": "age", "type": ["null", "long"], "default": null})
        );
        assert_eq!(
            fields[3],
            json!({"name": "tags", "type": {"type": "array", "items": "string"}, "default": [],
                   "confluent:tags": ["PII"]}),
            "a protected optional array is not nullable: it defaults to empty"
        );
        assert_eq!(fields[4]["type"][1], json!({"type": "map", "values": "string"}));
        assert_eq!(fields[5]["type"], json!(["null", "double"]));
        Schema::parse_str(&out.to_string()).unwrap();
    }

    #[test]
    fn refs_one_of_and_definitions_carry_their_annotations() {
        let out = avro(json!({
            "type": "object",
            "$defs": {
                "Email": {"type": "string", "pii": "tokenize"},
                "Address": {"type": "object", "required": ["street"],
                            "properties": {"street": {"type": "string", "pii": "mask"}}},
            },
            "required": ["email", "home", "contact"],
            "properties": {
                "email": {"$ref": "#/$defs/Email"},
                "home": {"$ref": "#/$defs/Address"},
                "contact": {"oneOf": [
                    {"type": "object", "required": ["phone"], "properties": {"phone": {"type": "string"}}},
                    {"$ref": "#/$defs/Address"},
                ]},
            }
        }));
        let fields = out["fields"].as_array().unwrap();
        assert_eq!(fields[0], json!({"name": "email", "type": "string", "pii": "tokenize"}));
        assert_eq!(fields[1]["type"]["fields"][0]["pii"], "mask");
        let branches = fields[2]["type"].as_array().unwrap();
        assert_eq!(branches.len(), 2);
        assert_ne!(branches[0]["name"], branches[1]["name"], "record names are unique");
        Schema::parse_str(&out.to_string()).unwrap();
    }

    #[test]
    fn what_cannot_be_protected_safely_is_refused_with_the_place() {
        let cases = [
            (
                json!({"type": "object", "properties": {"a": {}}}),
                "field `a`: the schema says nothing",
            ),
            (
                json!({"type": "object", "properties": {"a": {"allOf": []}}}),
                "field `a`: `allOf` is not supported",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "array"}}}),
                "field `a`: an array needs `items`",
            ),
            (
                json!({"type": "object", "properties": {"first-name": {"type": "string"}}}),
                "property name \"first-name\"",
            ),
            (
                json!({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}),
                "points into another document",
            ),
            (
                json!({"type": "object", "$defs": {"N": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}}},
                       "properties": {"a": {"$ref": "#/$defs/N"}}}),
                "recursive",
            ),
            (
                json!({"type": "object", "properties": {"a": {"oneOf": [{"type": "string", "pii": "hash"}, {"type": "null"}]}}}),
                "is not applied",
            ),
            (
                json!({"type": "object", "pii": "encrypt", "properties": {}}),
                "`pii` on the root",
            ),
            (json!({"type": "object", "pii.sanitized": true}), "already sanitized"),
            (
                json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                       "additionalProperties": {"type": "string"}}}}),
                "both `properties` and an `additionalProperties` schema",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": ["string", {"x": 1}]}}}),
                "field `a`: `type` lists",
            ),
        ];
        for (schema, expected) in cases {
            let message = refused(schema.clone());
            assert!(message.contains(expected), "{schema}: {message}");
        }
    }

    /// The review's findings: each schema below compiled before, leaving a tagged value unprotected (or, the last,
    /// took minutes and gigabytes); each is now refused, or (the first) protected.
    #[test]
    fn annotations_are_never_dropped_and_hostile_schemas_are_bounded() {
        // An annotation on a definition that is itself a reference applies.
        let alias = avro(json!({"type": "object", "required": ["email"],
            "$defs": {"Email": {"$ref": "#/$defs/Str", "pii": "encrypt"}, "Str": {"type": "string"}},
            "properties": {"email": {"$ref": "#/$defs/Email"}}}));
        assert_eq!(alias["fields"][0]["pii"], "encrypt");
        let defs: Map<String, Json> = (0..25)
            .map(|i| {
                let next = format!("#/$defs/L{}", i + 1);
                (
                    format!("L{i}"),
                    json!({"type": "object", "properties": {"a": {"$ref": next}, "b": {"$ref": next}}}),
                )
            })
            .chain([("L25".to_owned(), json!({"type": "string", "pii": "hash"}))])
            .collect();
        let cases = [
            (
                json!({"type": "object", "properties": {"a": {"oneOf": [
                    {"type": "array", "items": {"type": "string", "pii": "hash"}}, {"type": "null"}]}}}),
                "is not applied",
            ),
            (
                json!({"type": "object", "$defs": {"Base": {"type": "object", "properties": {"ssn": {"type": "string"}}}},
                       "properties": {"p": {"$ref": "#/$defs/Base",
                                            "properties": {"ssn": {"type": "string", "pii": "encrypt"}}}}}),
                "`properties` next to `$ref` is not supported",
            ),
            (
                json!({"type": "object", "properties": {"party": {"oneOf": [
                    {"type": "object", "properties": {"kind": {"const": "company"}, "name": {"type": "string"}}},
                    {"type": "object", "properties": {"kind": {"const": "person"},
                                                      "name": {"type": "string", "pii": "encrypt"}}}]}}}),
                "alternatives declare `name` differently",
            ),
            (
                json!({"type": "object", "properties": {"p": {"anyOf": [
                    {"type": "object", "properties": {"ssn": {"type": "string", "pii": "encrypt"}}},
                    {"type": "object", "additionalProperties": {"type": "string"}}]}}}),
                "a map (an object of additionalProperties) as alternatives",
            ),
            (
                json!({"type": "object", "properties": {"p": {"type": "object", "oneOf": [{"type": "object"}],
                       "properties": {"ssn": {"type": "string", "pii": "encrypt"}}}}}),
                "`properties` next to `oneOf`",
            ),
            (
                json!({"type": "object", "properties": {"id": {"type": "string"}},
                       "oneOf": [{"type": "object", "properties": {"ssn": {"type": "string", "pii": "encrypt"}}}]}),
                "`oneOf` at the root",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "object",
                       "dependencies": {"b": {"properties": {"b": {"type": "string", "pii": "hash"}}}}}}}),
                "`dependencies` is not supported",
            ),
            (
                json!({"type": "object", "$defs": defs, "properties": {"x": {"$ref": "#/$defs/L0"}}}),
                "too large",
            ),
        ];
        for (schema, expected) in cases {
            let message = refused(schema.clone());
            assert!(message.contains(expected), "{schema}: {message}");
        }
        // A definition annotated and applied in one place is still refused where an alternative uses it (the
        // second review: the check is at each use, not once per definition).
        for schema in [
            json!({"type": "object", "$defs": {"SSN": {"type": "string", "pii": "encrypt"}},
                   "properties": {"a": {"$ref": "#/$defs/SSN"},
                                  "b": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/SSN"}}, {"type": "null"}]}}}),
            json!({"type": "object", "$defs": {"A": {"$ref": "#/$defs/Str", "pii": "hash"}, "Str": {"type": "string"}},
                   "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"oneOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}}),
            json!({"type": "object", "$defs": {"X": {"type": "string", "examples": [{"type": "string", "pii": "hash"}]}},
                   "properties": {"a": {"type": "string", "pii": "hash"},
                                  "b": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/X/examples/0"}},
                                                  {"type": "null"}]}}}),
        ] {
            let message = refused(schema.clone());
            assert!(message.contains("is not applied"), "{schema}: {message}");
        }
        // Alternatives that only constrain (one of email or phone required), and `required` beside them, are read.
        let constrained = avro(json!({"type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"}, "email": {"type": "string", "pii": "hash"},
                           "phone": {"type": "string", "pii": "hash"}},
            "oneOf": [{"required": ["email"]}, {"required": ["phone"]}]}));
        assert_eq!(constrained["fields"].as_array().unwrap().len(), 3);
        avro(
            json!({"type": "object", "properties": {"p": {"required": ["a"], "oneOf": [
            {"type": "object", "properties": {"a": {"type": "string", "pii": "hash"}}},
            {"type": "null"}]}}}),
        );
        // An annotated definition nothing refers to is not an error.
        avro(
            json!({"type": "object", "$defs": {"Unused": {"type": "string", "pii": "hash"}},
                    "properties": {"a": {"type": "string", "pii": "none"}}}),
        );
    }

    #[test]
    fn json_schemas_are_told_from_avro_schemas() {
        assert!(is_json_schema(r#"{"type": "object", "properties": {}}"#));
        assert!(is_json_schema(r#"{"$schema": "x", "properties": {}}"#));
        assert!(!is_json_schema(r#"{"type": "record", "name": "R", "fields": []}"#));
        assert!(!is_json_schema("not json"));
    }
}

//! Protobuf topics: a `.proto` schema (text, with the files it imports) is compiled into descriptors, and the
//! message its records are written with is translated into the Avro schema piiwall compiles, so that every
//! action, key, subject, quarantine reason and audit summary works as it does for Avro. Records are read from
//! protobuf bytes into that Avro form, carried through the Avro transcoder, and written back as protobuf bytes of
//! the sanitized message (see [`crate::codec::protobuf`]).
//!
//! What a message becomes:
//! - a message → a record (its fields in declaration order); a message used twice is defined once;
//! - a proto3 field without presence → its type, with the proto default as Avro default (absent reads as it);
//!   a field with presence (`optional`, a oneof member, a message field, proto2 `optional`) → `["null", T]`;
//!   proto2 `required` → `T`, absent refused; `repeated` → array; `map<K, V>` → map (integer and bool keys read
//!   as their decimal text);
//! - `bool` → boolean; `int32`, `sint32`, `sfixed32` and enums (by number: an enum is open) → int; `int64`,
//!   `sint64`, `sfixed64`, `uint32`, `fixed32`, `uint64`, `fixed64` → long (the 64-bit unsigned ones by their
//!   bits); `float`, `double`, `string`, `bytes` → themselves.
//!
//! Annotations: piiwall's field option `(piiwall.pii)` (a `Pii` message: `action`, `kind`, `keep_last`, as the
//! Avro `pii` object) and Confluent's `(confluent.field_meta).tags`, mapped through `[policy.tags]`; the record
//! message's options `(piiwall.subject)` and `(piiwall.domain)`. Both files ship with piiwall
//! (`schemas/proto/`): a schema imports them without registering them.
//!
//! Refused with a message that names the place: groups, `google.protobuf.Any` / `Struct` / `Value` /
//! `ListValue` (schemaless: nothing says where PII is), recursion, piiwall's message options on any message but
//! the record's, and Confluent tags on a message or a file (they would protect nothing in particular).
//!
//! The sanitized schema is a `.proto` file derived from the sanitized Avro schema: the record's message first (so
//! the message index `[0]` names it), every message it uses after it, flattened to the top level, field numbers
//! kept, each protected field's type what its action produces (`string`, or `bytes` for encrypted bytes).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use apache_avro::Schema;
use prost_reflect::{
    Cardinality, DescriptorPool, DynamicMessage, FileDescriptor, Kind, MessageDescriptor, Syntax, Value,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use serde_json::{Map, Value as Json, json};

use super::Plan;
use crate::error::PolicyError;

/// piiwall's annotations (`import "piiwall/pii.proto";`).
pub const PII_PROTO: &str = include_str!("../../schemas/proto/piiwall/pii.proto");
/// Confluent's metadata options (`import "confluent/meta.proto";`).
pub const META_PROTO: &str = include_str!("../../schemas/proto/confluent/meta.proto");

/// The name the schema's own text is compiled under (the registry names only its references).
const ROOT: &str = "__piiwall_schema__.proto";

/// Every record of a translation is named under this namespace, and referred to by its full dotted name (a message
/// of a file without a package would otherwise be resolved against the namespace it is used in).
const AVRO_NAMESPACE: &str = "piiwall_pb";

/// How deeply messages may nest, and how many fields one translation may produce (a schema is input).
const MAX_DEPTH: usize = 32;
const MAX_FIELDS: usize = 10_000;
/// Fields a record's message may hold at every path, messages used at several paths counted at each: the policy
/// compiler walks every path.
const MAX_EXPANDED_FIELDS: usize = 100_000;

/// Messages a record may not hold: their content is schemaless, so nothing says where PII is in it.
const SCHEMALESS: [&str; 4] = [
    "google.protobuf.Any",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
];

/// A protobuf scalar type, as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    Double,
    Float,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Bool,
    String,
    Bytes,
    /// An enum, by number (`int32` on the wire).
    Enum,
}

impl Scalar {
    /// The `.proto` name of the type (enums are printed by their own name).
    pub fn proto_name(self) -> &'static str {
        match self {
            Scalar::Double => "double",
            Scalar::Float => "float",
            Scalar::Int32 | Scalar::Enum => "int32",
            Scalar::Int64 => "int64",
            Scalar::Uint32 => "uint32",
            Scalar::Uint64 => "uint64",
            Scalar::Sint32 => "sint32",
            Scalar::Sint64 => "sint64",
            Scalar::Fixed32 => "fixed32",
            Scalar::Fixed64 => "fixed64",
            Scalar::Sfixed32 => "sfixed32",
            Scalar::Sfixed64 => "sfixed64",
            Scalar::Bool => "bool",
            Scalar::String => "string",
            Scalar::Bytes => "bytes",
        }
    }

    /// The Avro type it reads as.
    fn avro(self) -> &'static str {
        match self {
            Scalar::Double => "double",
            Scalar::Float => "float",
            Scalar::Int32 | Scalar::Sint32 | Scalar::Sfixed32 | Scalar::Enum => "int",
            Scalar::Int64
            | Scalar::Sint64
            | Scalar::Sfixed64
            | Scalar::Uint32
            | Scalar::Fixed32
            | Scalar::Uint64
            | Scalar::Fixed64 => "long",
            Scalar::Bool => "boolean",
            Scalar::String => "string",
            Scalar::Bytes => "bytes",
        }
    }

    /// The Avro default of a proto3 field without presence: the type's zero.
    fn avro_default(self) -> Json {
        match self {
            Scalar::Double | Scalar::Float => json!(0.0),
            Scalar::Bool => json!(false),
            Scalar::String | Scalar::Bytes => json!(""),
            _ => json!(0),
        }
    }

    /// Whether repeated values of it may be packed (numbers, bools, enums).
    pub fn packable(self) -> bool {
        !matches!(self, Scalar::String | Scalar::Bytes)
    }

    fn of(kind: &Kind) -> Option<Scalar> {
        Some(match kind {
            Kind::Double => Scalar::Double,
            Kind::Float => Scalar::Float,
            Kind::Int32 => Scalar::Int32,
            Kind::Int64 => Scalar::Int64,
            Kind::Uint32 => Scalar::Uint32,
            Kind::Uint64 => Scalar::Uint64,
            Kind::Sint32 => Scalar::Sint32,
            Kind::Sint64 => Scalar::Sint64,
            Kind::Fixed32 => Scalar::Fixed32,
            Kind::Fixed64 => Scalar::Fixed64,
            Kind::Sfixed32 => Scalar::Sfixed32,
            Kind::Sfixed64 => Scalar::Sfixed64,
            Kind::Bool => Scalar::Bool,
            Kind::String => Scalar::String,
            Kind::Bytes => Scalar::Bytes,
            Kind::Enum(_) => Scalar::Enum,
            Kind::Message(_) => return None,
        })
    }
}

/// A message as the codec walks it: its fields in the order of the Avro record it reads as.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    /// The name it is printed under in the sanitized `.proto`.
    pub name: String,
    pub fields: Vec<Field>,
    /// Field number → index in `fields`.
    pub by_number: HashMap<u32, usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub number: u32,
    pub label: Label,
    pub ty: Type,
    /// A proto2 `[default = …]`, as `.proto` text: printed again on the field when it stays unprotected.
    pub default: Option<String>,
    /// The oneof it is a member of (not a proto3 `optional`'s synthetic one): of its members, the last on the wire
    /// wins, as protobuf reads them.
    pub oneof: Option<String>,
}

/// How often a field occurs, and what its Avro form is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// proto3 without presence: absent reads as the type's zero, which is not written back.
    Implicit,
    /// Has presence: `["null", T]`.
    Optional,
    /// proto2 `required`: must be present.
    Required,
    /// `repeated`: an array.
    Repeated,
    /// `map<K, V>`: a map whose keys are read as text; `K` is the key's type.
    Map(Scalar),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    Scalar(Scalar),
    /// An enum: its number on the wire; the definition is kept for the sanitized `.proto`.
    Enum(Arc<EnumDef>),
    Message(Arc<Message>),
}

impl Type {
    pub fn scalar(&self) -> Option<Scalar> {
        match self {
            Type::Scalar(s) => Some(*s),
            Type::Enum(_) => Some(Scalar::Enum),
            Type::Message(_) => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct EnumDef {
    pub name: String,
    pub values: Vec<(String, i32)>,
}

/// A Protobuf writer schema, compiled: the record's message as the codec reads it and its Avro translation.
#[derive(Debug, Clone)]
pub struct ProtoWriter {
    /// The Avro schema (JSON text, with piiwall's annotations) the record's message translates to.
    pub avro: String,
    pub message: Arc<Message>,
    /// The message index path of the record's message (Confluent's wire format names it in every record).
    pub indexes: Vec<i32>,
    pub syntax: Syntax,
    pub package: String,
}

/// Compiles `.proto` text, with the texts of the files it imports (by import path), and picks the record's
/// message: `message` by name (relative to the package, or fully qualified), else the file's first message.
pub fn compile_writer(
    text: &str,
    references: &HashMap<String, String>,
    message: Option<&str>,
) -> Result<ProtoWriter, PolicyError> {
    for source in std::iter::once(text).chain(references.values().map(String::as_str)) {
        check_nesting(source)?;
    }
    // The schema is input (from a registry): a panic in the compiler or in reading options is a refused schema.
    std::panic::catch_unwind(|| compile_writer_unchecked(text, references, message)).unwrap_or_else(|_| {
        Err(PolicyError::new(
            "",
            "the .proto schema could not be compiled (the compiler failed on it)",
        ))
    })
}

/// Refuses text whose braces or brackets nest deeper than any schema needs (option values are parsed recursively).
fn check_nesting(text: &str) -> Result<(), PolicyError> {
    let mut depth = 0usize;
    for byte in text.bytes() {
        match byte {
            b'{' | b'<' | b'[' | b'(' => depth += 1,
            b'}' | b'>' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > 2 * MAX_DEPTH {
            return Err(PolicyError::new(
                "",
                format!("the .proto text nests deeper than {} levels", 2 * MAX_DEPTH),
            ));
        }
    }
    Ok(())
}

fn compile_writer_unchecked(
    text: &str,
    references: &HashMap<String, String>,
    message: Option<&str>,
) -> Result<ProtoWriter, PolicyError> {
    let pool = compile_pool(text, references)?;
    let file = pool
        .get_file_by_name(ROOT)
        .ok_or_else(|| PolicyError::new("", "the schema compiled to no file"))?;
    let (descriptor, indexes) = pick_message(&file, message)?;
    let translated = Translator::new(&pool).translate(&descriptor)?;
    Ok(ProtoWriter {
        avro: translated.0,
        message: translated.1,
        indexes,
        syntax: file.syntax(),
        package: file.package_name().to_owned(),
    })
}

/// Whether a schema text is `.proto` text rather than JSON (an Avro schema or a JSON Schema, which start with `{`,
/// `[` or `"`).
pub fn is_proto(text: &str) -> bool {
    !matches!(text.trim_start().chars().next(), None | Some('{' | '[' | '"'))
}

/// The files a local `.proto` schema imports from the directory it is in (and what those import), by import path;
/// piiwall's, Confluent's and Google's own files are left to the compiler.
pub fn local_imports(text: &str, dir: &std::path::Path) -> Result<HashMap<String, String>, PolicyError> {
    let mut found = HashMap::new();
    let mut pending = imports(text);
    while let Some(name) = pending.pop() {
        let builtin = name == "piiwall/pii.proto" || name == "confluent/meta.proto" || name.starts_with("google/");
        if builtin || found.contains_key(&name) {
            continue;
        }
        if found.len() >= 64 {
            return Err(PolicyError::new("", "the schema imports more than 64 files"));
        }
        let Ok(imported) = std::fs::read_to_string(dir.join(&name)) else {
            continue; // Left to the compiler, which names the missing import.
        };
        pending.extend(imports(&imported));
        found.insert(name, imported);
    }
    Ok(found)
}

/// The paths a `.proto` text imports (`import "a/b.proto";`, `import public "…";`).
fn imports(text: &str) -> Vec<String> {
    text.split(['\n', ';'])
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("import")?;
            let start = rest.find('"')? + 1;
            let end = start + rest[start..].find('"')?;
            let name = &rest[start..end];
            (!name.contains("..") && !name.starts_with('/')).then(|| name.to_owned())
        })
        .collect()
}

/// Compiles the schema text into a descriptor pool. `references`: the imported files' texts by import path;
/// piiwall's and Confluent's option files and Google's well-known types need none.
fn compile_pool(text: &str, references: &HashMap<String, String>) -> Result<DescriptorPool, PolicyError> {
    let mut chain = ChainFileResolver::new();
    chain.add(Sources {
        root: text.to_owned(),
        references: references.clone(),
    });
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler
        .include_imports(true)
        .open_file(ROOT)
        .map_err(|e| PolicyError::new("", format!("not a valid .proto schema: {}", describe(&e))))?;
    Ok(compiler.descriptor_pool())
}

/// A compile error without the schema's internal file name.
fn describe(e: &protox::Error) -> String {
    e.to_string().replace(ROOT, "the schema")
}

struct Sources {
    root: String,
    references: HashMap<String, String>,
}

impl FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        let text = match name {
            ROOT => self.root.as_str(),
            "piiwall/pii.proto" => PII_PROTO,
            "confluent/meta.proto" => META_PROTO,
            // Google's files are served by protox's own resolver, never by a reference that could redefine them.
            google if google.starts_with("google/protobuf/") => return Err(protox::Error::file_not_found(name)),
            _ => match self.references.get(name) {
                Some(text) => text.as_str(),
                None => return Err(protox::Error::file_not_found(name)),
            },
        };
        match encoded_descriptor(text) {
            Some(encoded) => file_from_descriptor(name, encoded),
            None => File::from_source(name, text),
        }
    }
}

/// The bytes of a schema registered as a base64 `FileDescriptorProto` (some clients register that form instead of
/// `.proto` text): `None` for text.
fn encoded_descriptor(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = text.trim();
    let alphabet = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    if text.is_empty() || !text.bytes().all(alphabet) {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// A file compiled from its encoded descriptor (its options' extensions, piiwall's and Confluent's annotations,
/// are kept), under the name it is imported by: a second `name` field is appended, and protobuf's last occurrence
/// wins.
fn file_from_descriptor(name: &str, mut encoded: Vec<u8>) -> Result<File, protox::Error> {
    encoded.push(0x0a);
    let mut len = name.len();
    while len >= 0x80 {
        encoded.push((len as u8) | 0x80);
        len >>= 7;
    }
    encoded.push(len as u8);
    encoded.extend_from_slice(name.as_bytes());
    File::decode_file_descriptor_proto(&encoded[..]).map_err(|_| {
        protox::Error::new(format!(
            "{name} is neither .proto text nor an encoded FileDescriptorProto (it reads as base64)"
        ))
    })
}

/// The message named `name` (else the first) and its message index path.
fn pick_message(file: &FileDescriptor, name: Option<&str>) -> Result<(MessageDescriptor, Vec<i32>), PolicyError> {
    let Some(name) = name else {
        let first = file
            .messages()
            .next()
            .ok_or_else(|| PolicyError::new("", "the schema defines no message"))?;
        return Ok((first, vec![0]));
    };
    let package = file.package_name();
    let full = match name.strip_prefix('.') {
        Some(full) => full.to_owned(),
        None if package.is_empty() || name.starts_with(&format!("{package}.")) => name.to_owned(),
        None => format!("{package}.{name}"),
    };
    let message = file
        .parent_pool()
        .get_message_by_name(&full)
        .filter(|m| m.parent_file().name() == file.name())
        .ok_or_else(|| PolicyError::new("", format!("the schema defines no message `{name}`")))?;
    let indexes = message_indexes(&message);
    Ok((message, indexes))
}

/// The message index path of a message: its position among the declared messages at each nesting level.
fn message_indexes(message: &MessageDescriptor) -> Vec<i32> {
    let mut path = Vec::new();
    let mut current = message.clone();
    loop {
        let siblings: Vec<MessageDescriptor> = match current.parent_message() {
            Some(parent) => parent.child_messages().filter(|m| !m.is_map_entry()).collect(),
            None => current.parent_file().messages().collect(),
        };
        let at = siblings
            .iter()
            .position(|m| m.full_name() == current.full_name())
            .unwrap_or(0);
        path.push(at as i32);
        match current.parent_message() {
            Some(parent) => current = parent,
            None => break,
        }
    }
    path.reverse();
    path
}

/// The walk from descriptors to the Avro schema and the codec's [`Message`] tree.
struct Translator<'p> {
    pii: Option<prost_reflect::ExtensionDescriptor>,
    subject: Option<prost_reflect::ExtensionDescriptor>,
    domain: Option<prost_reflect::ExtensionDescriptor>,
    field_meta: Option<prost_reflect::ExtensionDescriptor>,
    message_meta: Option<prost_reflect::ExtensionDescriptor>,
    file_meta: Option<prost_reflect::ExtensionDescriptor>,
    enum_meta: Option<prost_reflect::ExtensionDescriptor>,
    enum_value_meta: Option<prost_reflect::ExtensionDescriptor>,
    /// Messages translated so far (an Avro named type is defined once, then named).
    done: HashMap<String, Arc<Message>>,
    enums: HashMap<String, Arc<EnumDef>>,
    /// Messages being translated (a message that holds itself is refused).
    open: HashSet<String>,
    fields: usize,
    /// Each translated message's field count over every path inside it.
    expanded: HashMap<String, usize>,
    /// How many fields hold each message.
    uses: HashMap<String, usize>,
    /// Flattened names given so far, with the full name each stands for.
    flat_names: HashMap<String, String>,
    /// The record's package: messages of other packages keep theirs in their flattened names.
    package: String,
    _pool: &'p DescriptorPool,
}

impl<'p> Translator<'p> {
    fn new(pool: &'p DescriptorPool) -> Self {
        Self {
            pii: pool.get_extension_by_name("piiwall.pii"),
            subject: pool.get_extension_by_name("piiwall.subject"),
            domain: pool.get_extension_by_name("piiwall.domain"),
            field_meta: pool.get_extension_by_name("confluent.field_meta"),
            message_meta: pool.get_extension_by_name("confluent.message_meta"),
            file_meta: pool.get_extension_by_name("confluent.file_meta"),
            enum_meta: pool.get_extension_by_name("confluent.enum_meta"),
            enum_value_meta: pool.get_extension_by_name("confluent.enum_value_meta"),
            done: HashMap::new(),
            enums: HashMap::new(),
            open: HashSet::new(),
            fields: 0,
            expanded: HashMap::new(),
            uses: HashMap::new(),
            flat_names: HashMap::new(),
            package: String::new(),
            _pool: pool,
        }
    }

    fn translate(mut self, root: &MessageDescriptor) -> Result<(String, Arc<Message>), PolicyError> {
        self.package = root.package_name().to_owned();
        let (mut avro, message) = self.message(root, "", 0)?;
        let options = root.options();
        if let Some(ext) = &self.subject
            && options.has_extension(ext)
        {
            let value = options.get_extension(ext);
            self.check_subject_path(root, value.as_str().unwrap_or_default())?;
        }
        let object = avro.as_object_mut().expect("a record is an object");
        for (ext, attribute) in [(&self.subject, "pii.subject"), (&self.domain, "pii.domain")] {
            if let Some(ext) = ext
                && options.has_extension(ext)
            {
                let value = options.get_extension(ext);
                let text = value.as_str().unwrap_or_default().to_owned();
                object.insert(attribute.to_owned(), Json::String(text));
            }
        }
        Ok((avro.to_string(), message))
    }

    /// A message as an Avro record (its definition, or its name when defined already).
    fn message(
        &mut self,
        descriptor: &MessageDescriptor,
        path: &str,
        depth: usize,
    ) -> Result<(Json, Arc<Message>), PolicyError> {
        let full_name = descriptor.full_name();
        if SCHEMALESS.contains(&full_name) {
            return Err(PolicyError::new(
                path,
                format!(
                    "{full_name} holds data no schema describes, so nothing says where PII is in it: use a message"
                ),
            ));
        }
        *self.uses.entry(full_name.to_owned()).or_default() += 1;
        if let Some(done) = self.done.get(full_name) {
            // Always the full, dotted name: an undotted one would be resolved in the enclosing namespace.
            return Ok((Json::String(format!("{AVRO_NAMESPACE}.{full_name}")), done.clone()));
        }
        if !self.open.insert(full_name.to_owned()) {
            return Err(PolicyError::new(
                path,
                format!("{full_name} holds itself: recursive messages are not supported"),
            ));
        }
        if depth > MAX_DEPTH {
            return Err(PolicyError::new(
                path,
                format!("messages nest deeper than {MAX_DEPTH} levels"),
            ));
        }
        if let Some(meta) = &self.file_meta
            && descriptor.parent_file().options().has_extension(meta)
        {
            return Err(PolicyError::new(
                path,
                format!(
                    "(confluent.file_meta) on {}: tags on a file would protect nothing in particular; tag the fields \
                     with (confluent.field_meta).tags",
                    descriptor.parent_file().name().replace(ROOT, "the schema")
                ),
            ));
        }
        if let Some(extension) = descriptor.extensions().next() {
            return Err(PolicyError::new(
                path,
                format!(
                    "{full_name} is extended ({}): extension fields are not supported; declare the field in the message",
                    extension.full_name()
                ),
            ));
        }
        let options = descriptor.options();
        if depth > 0 {
            for ext in [&self.subject, &self.domain].into_iter().flatten() {
                if options.has_extension(ext) {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "({}) on {full_name}, which is not the record's message: put it on the record's message",
                            ext.full_name()
                        ),
                    ));
                }
            }
        }
        if let Some(meta) = &self.message_meta
            && options.has_extension(meta)
        {
            return Err(PolicyError::new(
                path,
                format!(
                    "(confluent.message_meta) on {full_name}: tags on a message would protect nothing in particular; \
                     tag its fields with (confluent.field_meta).tags"
                ),
            ));
        }
        let mut fields = Vec::new();
        let mut avro_fields = Vec::new();
        for field in descriptor.fields() {
            self.fields += 1;
            if self.fields > MAX_FIELDS {
                return Err(PolicyError::new(path, format!("more than {MAX_FIELDS} fields in all")));
            }
            let field_path = if path.is_empty() {
                field.name().to_owned()
            } else {
                format!("{path}.{}", field.name())
            };
            if field.is_group() {
                return Err(PolicyError::new(
                    &field_path,
                    "a group: groups are not supported (use a message)",
                ));
            }
            let (label, ty, avro_type) = if field.is_map() {
                let Kind::Message(entry) = field.kind() else {
                    unreachable!("a map is a message")
                };
                self.check_map_entry(&entry, &field_path)?;
                let key = Scalar::of(&entry.map_entry_key_field().kind())
                    .filter(|k| !matches!(k, Scalar::Double | Scalar::Float | Scalar::Bytes | Scalar::Enum))
                    .ok_or_else(|| PolicyError::new(&field_path, "a map key must be an integer, bool or string"))?;
                let (value_ty, value_avro) =
                    self.value_type(&entry.map_entry_value_field().kind(), &field_path, depth)?;
                (Label::Map(key), value_ty, json!({"type": "map", "values": value_avro}))
            } else {
                let (ty, avro) = self.value_type(&field.kind(), &field_path, depth)?;
                match field.cardinality() {
                    Cardinality::Repeated => (Label::Repeated, ty, json!({"type": "array", "items": avro})),
                    Cardinality::Required => (Label::Required, ty, avro),
                    Cardinality::Optional if field.supports_presence() => (Label::Optional, ty, json!(["null", avro])),
                    Cardinality::Optional => (Label::Implicit, ty, avro),
                }
            };
            let mut avro_field = Map::new();
            avro_field.insert("name".to_owned(), Json::String(field.name().to_owned()));
            avro_field.insert("type".to_owned(), avro_type);
            match label {
                Label::Implicit => {
                    let scalar = ty.scalar().expect("only scalars lack presence");
                    avro_field.insert("default".to_owned(), scalar.avro_default());
                }
                Label::Optional => {
                    avro_field.insert("default".to_owned(), Json::Null);
                }
                Label::Repeated => {
                    avro_field.insert("default".to_owned(), json!([]));
                }
                Label::Map(_) => {
                    avro_field.insert("default".to_owned(), json!({}));
                }
                Label::Required => {}
            }
            self.annotations(&field, &field_path, &mut avro_field)?;
            avro_fields.push(Json::Object(avro_field));
            let default = explicit_default(&field);
            let oneof = field
                .containing_oneof()
                .filter(|o| !o.is_synthetic())
                .map(|o| o.name().to_owned());
            fields.push(Field {
                name: field.name().to_owned(),
                number: field.number(),
                label,
                ty,
                default,
                oneof,
            });
        }
        let expanded: usize = descriptor
            .fields()
            .map(|f| {
                // A map's values count as the map's: its entry message is never translated itself.
                let kind = match f.kind() {
                    Kind::Message(entry) if f.is_map() => entry.map_entry_value_field().kind(),
                    other => other,
                };
                let inner = match kind {
                    Kind::Message(m) => self.expanded.get(m.full_name()).copied().unwrap_or(0),
                    _ => 0,
                };
                1 + inner
            })
            .sum();
        if expanded > MAX_EXPANDED_FIELDS {
            return Err(PolicyError::new(
                path,
                format!("{full_name} holds more than {MAX_EXPANDED_FIELDS} fields over all its paths"),
            ));
        }
        self.expanded.insert(full_name.to_owned(), expanded);
        let by_number = fields.iter().enumerate().map(|(i, f)| (f.number, i)).collect();
        let flat = flat_name(descriptor.full_name(), descriptor.package_name(), &self.package);
        if let Some(other) = self.flat_names.insert(flat.clone(), full_name.to_owned())
            && other != full_name
        {
            return Err(PolicyError::new(
                path,
                format!(
                    "{other} and {full_name} would both be named {flat} in the sanitized .proto (nested messages are \
                     flattened with `_`): rename one"
                ),
            ));
        }
        let message = Arc::new(Message {
            name: flat,
            fields,
            by_number,
        });
        self.open.remove(full_name);
        self.done.insert(full_name.to_owned(), message.clone());
        let (namespace, name) = match full_name.rsplit_once('.') {
            Some((namespace, name)) => (format!("{AVRO_NAMESPACE}.{namespace}"), name),
            None => (AVRO_NAMESPACE.to_owned(), full_name),
        };
        let record = json!({"type": "record", "name": name, "namespace": namespace, "fields": avro_fields});
        Ok((record, message))
    }

    /// The subject field's path may not pass through a message that other fields hold too: the subject field is
    /// tokenized where it is the subject, and the sanitized message has one type for it.
    fn check_subject_path(&self, root: &MessageDescriptor, path: &str) -> Result<(), PolicyError> {
        let mut message = root.clone();
        let mut steps = path.split('.').peekable();
        while let Some(name) = steps.next() {
            let Some(field) = message.get_field_by_name(name) else {
                return Ok(()); // The policy compiler names the missing field.
            };
            match (field.kind(), steps.peek()) {
                (Kind::Message(inner), Some(_)) => {
                    if self.uses.get(inner.full_name()).copied().unwrap_or(0) > 1 {
                        return Err(PolicyError::new(
                            path,
                            format!(
                                "(piiwall.subject) passes through {}, which other fields hold too: name a field of a \
                                 message used once",
                                inner.full_name()
                            ),
                        ));
                    }
                    message = inner;
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// A map's entry must be the one a `map<K, V>` declares: fields 1 and 2, singular, without options (a hand-written
    /// `option map_entry = true` message could hide annotations piiwall would not read).
    fn check_map_entry(&self, entry: &MessageDescriptor, path: &str) -> Result<(), PolicyError> {
        let fields: Vec<_> = entry.fields().collect();
        let shape_ok = fields.len() == 2
            && fields.iter().any(|f| f.number() == 1)
            && fields.iter().any(|f| f.number() == 2)
            && fields.iter().all(|f| f.cardinality() != Cardinality::Repeated);
        let annotated = fields.iter().any(|f| {
            let options = f.options();
            [&self.pii, &self.field_meta]
                .into_iter()
                .flatten()
                .any(|ext| options.has_extension(ext))
        });
        if !shape_ok || annotated {
            return Err(PolicyError::new(
                path,
                "a map whose entry message is written by hand (option map_entry): declare it as map<K, V> and annotate \
                 the map field",
            ));
        }
        Ok(())
    }

    /// The type of a field's values (of a map's values), and its Avro form.
    fn value_type(&mut self, kind: &Kind, path: &str, depth: usize) -> Result<(Type, Json), PolicyError> {
        match kind {
            Kind::Message(message) => {
                let (avro, message) = self.message(message, path, depth + 1)?;
                Ok((Type::Message(message), avro))
            }
            Kind::Enum(e) => {
                let tagged = |options: DynamicMessage| {
                    [&self.enum_meta, &self.enum_value_meta]
                        .into_iter()
                        .flatten()
                        .any(|m| options.has_extension(m))
                };
                if tagged(e.options()) || e.values().any(|v| tagged(v.options())) {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "(confluent.enum_meta) or (confluent.enum_value_meta) on {}: tags there would protect \
                             nothing in particular; tag the fields with (confluent.field_meta).tags",
                            e.full_name()
                        ),
                    ));
                }
                let def = self
                    .enums
                    .entry(e.full_name().to_owned())
                    .or_insert_with(|| {
                        Arc::new(EnumDef {
                            name: flat_name(e.full_name(), e.package_name(), &self.package),
                            values: e.values().map(|v| (v.name().to_owned(), v.number())).collect(),
                        })
                    })
                    .clone();
                Ok((Type::Enum(def), json!("int")))
            }
            other => {
                let scalar = Scalar::of(other).expect("not a message or an enum");
                let avro = match scalar {
                    // Read by their bits as a long; marked, so a subject id is named by its unsigned value.
                    Scalar::Uint64 | Scalar::Fixed64 => json!({"type": "long", super::UNSIGNED: true}),
                    _ => json!(scalar.avro()),
                };
                Ok((Type::Scalar(scalar), avro))
            }
        }
    }

    /// Copies a field's `(piiwall.pii)` and `(confluent.field_meta).tags` into its Avro form.
    fn annotations(
        &self,
        field: &prost_reflect::FieldDescriptor,
        path: &str,
        avro: &mut Map<String, Json>,
    ) -> Result<(), PolicyError> {
        let options = field.options();
        if let Some(ext) = &self.pii
            && options.has_extension(ext)
        {
            let value = options.get_extension(ext);
            let Value::Message(pii) = value.as_ref() else {
                return Err(PolicyError::new(path, "(piiwall.pii) is not a piiwall.Pii"));
            };
            let mut annotation = Map::new();
            let action = pii
                .get_field_by_name("action")
                .and_then(|v| v.as_str().map(str::to_owned));
            annotation.insert("action".to_owned(), Json::String(action.unwrap_or_default()));
            if pii.has_field_by_name("kind") {
                let kind = pii
                    .get_field_by_name("kind")
                    .and_then(|v| v.as_str().map(str::to_owned));
                annotation.insert("kind".to_owned(), Json::String(kind.unwrap_or_default()));
            }
            if pii.has_field_by_name("keep_last") {
                let keep = pii
                    .get_field_by_name("keep_last")
                    .and_then(|v| v.as_u32())
                    .unwrap_or_default();
                annotation.insert("keep_last".to_owned(), json!(keep));
            }
            avro.insert("pii".to_owned(), Json::Object(annotation));
        }
        if let Some(ext) = &self.field_meta
            && options.has_extension(ext)
        {
            let value = options.get_extension(ext);
            let tags: Vec<Json> = match value.as_ref() {
                Value::Message(meta) => match meta.get_field_by_name("tags").as_deref() {
                    Some(Value::List(tags)) => tags.iter().filter_map(|t| t.as_str()).map(|t| json!(t)).collect(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            if !tags.is_empty() {
                avro.insert("confluent:tags".to_owned(), Json::Array(tags));
            }
        }
        Ok(())
    }
}

/// A proto2 field's explicit `[default = …]` as `.proto` text (an enum's by number: enums are printed as int32).
fn explicit_default(field: &prost_reflect::FieldDescriptor) -> Option<String> {
    let text = field.field_descriptor_proto().default_value.as_deref()?;
    Some(match field.kind() {
        Kind::String => format!(
            "\"{}\"",
            text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
        ),
        // Stored C-escaped already.
        Kind::Bytes => format!("\"{text}\""),
        Kind::Enum(e) => e.get_value_by_name(text)?.number().to_string(),
        _ => text.to_owned(),
    })
}

/// A message's or enum's name in the sanitized `.proto`, where every one is at the top level: its name within the
/// record's package, nesting written with `_`; one of another package keeps that package in its name.
fn flat_name(full_name: &str, package: &str, root_package: &str) -> String {
    let within = match full_name.strip_prefix(package) {
        Some(name) if package == root_package => name.trim_start_matches('.'),
        _ => full_name,
    };
    within.replace('.', "_")
}

/// The sanitized message tree: the writer's, with each field's type what the sanitized Avro schema says it holds
/// now (a protected scalar becomes `string` or `bytes`), and map keys `string` where the plan protects them.
pub fn sanitized_message(writer: &Arc<Message>, sanitized: &Schema, plan: &Plan) -> Arc<Message> {
    let names = crate::codec::schema_names(sanitized);
    let mut done = HashMap::new();
    sanitized_walk(writer, sanitized, plan, "", &names, &mut done)
}

fn sanitized_walk(
    writer: &Arc<Message>,
    sanitized: &Schema,
    plan: &Plan,
    path: &str,
    names: &HashMap<&apache_avro::schema::Name, &Schema>,
    done: &mut HashMap<String, Arc<Message>>,
) -> Arc<Message> {
    let resolve = |s: &Schema| -> Schema {
        match s {
            Schema::Ref { name } => names.get(name).map(|s| (*s).clone()).unwrap_or_else(|| s.clone()),
            other => other.clone(),
        }
    };
    let Schema::Record(record) = resolve(sanitized) else {
        return writer.clone();
    };
    // A message used at several paths is protected alike everywhere: its annotations are on its fields, and the
    // sanitized Avro schema defines it once. One sanitized message per writer message, under the writer's name.
    let key = writer.name.clone();
    if let Some(done) = done.get(&key) {
        return done.clone();
    }
    let mut fields = Vec::with_capacity(writer.fields.len());
    for (field, avro) in writer.fields.iter().zip(&record.fields) {
        let field_path = if path.is_empty() {
            field.name.clone()
        } else {
            format!("{path}.{}", field.name)
        };
        // The type the values have now: through the field's union, array or map.
        let mut inner = resolve(&avro.schema);
        if let Schema::Union(union) = &inner
            && let Some(value) = union.variants().iter().find(|v| !matches!(v, Schema::Null))
        {
            inner = resolve(value);
        }
        inner = match inner {
            Schema::Array(array) => resolve(&array.items),
            Schema::Map(map) => resolve(&map.types),
            other => other,
        };
        if let Schema::Union(union) = &inner
            && let Some(value) = union.variants().iter().find(|v| !matches!(v, Schema::Null))
        {
            inner = resolve(value);
        }
        let ty = match (&field.ty, &inner) {
            (Type::Message(message), Schema::Record(_)) => {
                Type::Message(sanitized_walk(message, &inner, plan, &field_path, names, done))
            }
            (_, Schema::String) => Type::Scalar(Scalar::String),
            (_, Schema::Bytes) if field.ty.scalar() != Some(Scalar::Bytes) => Type::Scalar(Scalar::Bytes),
            (ty, _) => ty.clone(),
        };
        let ty = match (&field.ty, ty) {
            // A field the plan leaves alone keeps its exact type (an `int32` stays `int32`, not `string`).
            (Type::Scalar(Scalar::String), Type::Scalar(Scalar::String)) => Type::Scalar(Scalar::String),
            (_, ty) => ty,
        };
        let label = match field.label {
            Label::Map(key) if key != Scalar::String && keys_protected(plan, &field_path) => Label::Map(Scalar::String),
            label => label,
        };
        // A default is a value: kept only where the field stays as it was.
        let protected = plan.rules.iter().any(|r| r.path == field_path);
        let default = (!protected && ty == field.ty).then(|| field.default.clone()).flatten();
        fields.push(Field {
            name: field.name.clone(),
            number: field.number,
            label,
            ty,
            default,
            oneof: field.oneof.clone(),
        });
    }
    let by_number = fields.iter().enumerate().map(|(i, f)| (f.number, i)).collect();
    let message = Arc::new(Message {
        name: writer.name.clone(),
        fields,
        by_number,
    });
    done.insert(key, message.clone());
    message
}

/// `redact` on a message-typed field whose message other fields hold too is refused: the sanitized schema defines a
/// message once, and the redacted copy would keep the writer's types where the other uses are protected.
pub fn check_redacted_messages(writer: &Arc<Message>, plan: &Plan) -> Result<(), PolicyError> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    let mut seen = HashSet::new();
    let mut pending = vec![writer.as_ref()];
    while let Some(message) = pending.pop() {
        if !seen.insert(message.name.as_str()) {
            continue;
        }
        for field in &message.fields {
            if let Type::Message(inner) = &field.ty {
                *uses.entry(inner.name.as_str()).or_default() += 1;
                pending.push(inner);
            }
        }
    }
    for rule in plan.rules.iter().filter(|r| r.action == super::Action::Redact) {
        let mut message = writer.as_ref();
        let mut target = None;
        for step in rule.path.split('.') {
            let Some(field) = message.fields.iter().find(|f| f.name == step) else {
                break;
            };
            target = Some(field);
            if let Type::Message(inner) = &field.ty {
                message = inner;
            }
        }
        if let Some(Field {
            ty: Type::Message(inner),
            ..
        }) = target
            && uses.get(inner.name.as_str()).copied().unwrap_or(0) > 1
        {
            return Err(PolicyError::new(
                &rule.path,
                format!(
                    "redact on a field of message {}, which other fields hold too: redact its fields instead, or give \
                     this field a message of its own",
                    inner.name
                ),
            ));
        }
    }
    Ok(())
}

/// Whether the plan protects the keys of the map at `path`.
fn keys_protected(plan: &Plan, path: &str) -> bool {
    plan.rules.iter().any(|r| r.map_keys.is_some() && r.path == path)
}

/// The sanitized `.proto` text: the record's message first, then every message and enum it uses, at the top
/// level; `pii.applied` comments on the protected fields.
pub fn sanitized_proto(message: &Arc<Message>, writer: &ProtoWriter, plan: &Plan) -> String {
    let mut out = String::new();
    let syntax = match writer.syntax {
        Syntax::Proto2 => "proto2",
        Syntax::Proto3 => "proto3",
    };
    let _ = writeln!(
        out,
        "// Sanitized by piiwall (pii.sanitized): protected fields hold what their action produced."
    );
    let _ = writeln!(out, "syntax = \"{syntax}\";");
    if !writer.package.is_empty() {
        let _ = writeln!(out, "package {};", writer.package);
    }
    let applied: HashMap<&str, &str> = plan.rules.iter().map(|r| (r.path.as_str(), r.action.name())).collect();
    let mut queue = vec![(message.clone(), String::new())];
    let mut printed = HashSet::new();
    while let Some((message, path)) = queue.pop() {
        if !printed.insert(message.name.clone()) {
            continue;
        }
        let _ = writeln!(out, "\nmessage {} {{", message.name);
        let mut open_oneof: Option<&str> = None;
        for field in &message.fields {
            // Members of a oneof are declared together (protox and protoc keep them so): one block each.
            if open_oneof.is_some() && open_oneof != field.oneof.as_deref() {
                let _ = writeln!(out, "  }}");
                open_oneof = None;
            }
            if let (None, Some(name)) = (open_oneof, field.oneof.as_deref()) {
                let _ = writeln!(out, "  oneof {name} {{");
                open_oneof = Some(name);
            }
            let indent = if open_oneof.is_some() { "  " } else { "" };
            let field_path = if path.is_empty() {
                field.name.clone()
            } else {
                format!("{path}.{}", field.name)
            };
            let type_name = match &field.ty {
                Type::Scalar(s) => s.proto_name().to_owned(),
                // By number: flattened to the top level, the values of enums nested in different messages could
                // collide (enum values are scoped like their enum's siblings).
                Type::Enum(_) => "int32".to_owned(),
                Type::Message(m) => {
                    queue.insert(0, (m.clone(), field_path.clone()));
                    m.name.clone()
                }
            };
            let proto3 = writer.syntax == Syntax::Proto3;
            let message_typed = matches!(field.ty, Type::Message(_));
            // Labels follow the printed file's syntax, whatever the file each message came from: proto2 needs a
            // label on every field, proto3 has no `required` (the writer always writes such a field anyway).
            let declared = match field.label {
                Label::Implicit if proto3 => type_name,
                Label::Implicit => format!("optional {type_name}"),
                Label::Optional | Label::Required if proto3 && message_typed => type_name,
                Label::Optional => format!("optional {type_name}"),
                Label::Required if proto3 => format!("optional {type_name}"),
                Label::Required => format!("required {type_name}"),
                Label::Repeated => format!("repeated {type_name}"),
                Label::Map(key) => format!("map<{}, {type_name}>", key.proto_name()),
            };
            let default = match (&field.default, proto3) {
                (Some(default), false) => format!(" [default = {default}]"),
                _ => String::new(),
            };
            let comment = match applied.get(field_path.as_str()) {
                Some(action) => format!(" // pii.applied: {action}"),
                None => String::new(),
            };
            // A oneof member has no label.
            let declared = if open_oneof.is_some() {
                declared.trim_start_matches("optional ").to_owned()
            } else {
                declared
            };
            let _ = writeln!(
                out,
                "  {indent}{declared} {} = {}{default};{comment}",
                field.name, field.number
            );
        }
        if open_oneof.is_some() {
            let _ = writeln!(out, "  }}");
        }
        let _ = writeln!(out, "}}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(text: &str) -> Result<ProtoWriter, PolicyError> {
        compile_writer(text, &HashMap::new(), None)
    }

    /// Some clients register a schema as a base64 `FileDescriptorProto` instead of `.proto` text: read either way,
    /// for the schema and for its references, with the same annotations.
    #[test]
    fn a_schema_registered_as_an_encoded_descriptor_reads_as_its_text() {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let text = r#"syntax = "proto3"; package shop; import "piiwall/pii.proto"; import "common/address.proto";
            message Customer { string email = 1 [(piiwall.pii).action = "tokenize"]; common.Address home = 2; }"#;
        let address = r#"syntax = "proto3"; package common; import "confluent/meta.proto";
            message Address { string street = 1 [(confluent.field_meta).tags = "PII"]; string city = 2; }"#;
        let references = HashMap::from([("common/address.proto".to_owned(), address.to_owned())]);
        let pool = compile_pool(text, &references).unwrap();
        // The root as a client registers it: under its own file name.
        let mut root = pool.get_file_by_name(ROOT).unwrap().encode_to_vec();
        root.extend_from_slice(&[0x0a, 14]);
        root.extend_from_slice(b"customer.proto");
        let encoded_address = pool.get_file_by_name("common/address.proto").unwrap().encode_to_vec();
        let encoded_references = HashMap::from([("common/address.proto".to_owned(), b64(&encoded_address))]);
        let expected = compile_writer(text, &references, None).unwrap().avro;
        assert!(
            expected.contains("tokenize") && expected.contains("\"PII\""),
            "{expected}"
        );
        for (root, references) in [
            (b64(&root), &references),
            (text.to_owned(), &encoded_references),
            (b64(&root), &encoded_references),
        ] {
            assert_eq!(compile_writer(&root, references, None).unwrap().avro, expected);
        }
        let refused = writer("AAAA").err().unwrap().to_string();
        assert!(refused.contains("FileDescriptorProto"), "{refused}");
    }

    const CUSTOMER: &str = r#"
        syntax = "proto3";
        package shop;
        import "piiwall/pii.proto";
        import "confluent/meta.proto";
        message Customer {
          option (piiwall.subject) = "customer_id";
          string customer_id = 1;
          string email = 2 [(piiwall.pii).action = "tokenize", (piiwall.pii).kind = "email"];
          string phone = 3 [(piiwall.pii) = { action: "mask", keep_last: 4 }];
          optional string name = 4 [(confluent.field_meta).tags = "PII"];
          Address address = 5;
          repeated string aliases = 6 [(confluent.field_meta) = { tags: ["PII"] }];
          map<string, string> notes = 7 [(piiwall.pii).action = "encrypt"];
          int64 visits = 8;
          Tier tier = 9;
          message Address { string street = 1 [(piiwall.pii).action = "tokenize"]; string city = 2; }
          enum Tier { FREE = 0; GOLD = 1; }
        }
    "#;

    #[test]
    fn a_message_translates_to_an_annotated_avro_record() {
        let writer = writer(CUSTOMER).unwrap();
        assert_eq!(writer.indexes, vec![0]);
        let avro: Json = serde_json::from_str(&writer.avro).unwrap();
        assert_eq!(avro["name"], "Customer");
        assert_eq!(avro["namespace"], "piiwall_pb.shop");
        assert_eq!(avro["pii.subject"], "customer_id");
        let fields = avro["fields"].as_array().unwrap();
        assert_eq!(fields[1]["pii"], json!({"action": "tokenize", "kind": "email"}));
        assert_eq!(fields[2]["pii"], json!({"action": "mask", "keep_last": 4}));
        assert_eq!(fields[3]["type"], json!(["null", "string"]));
        assert_eq!(fields[3]["confluent:tags"], json!(["PII"]));
        assert_eq!(fields[4]["type"][1]["fields"][0]["pii"], json!({"action": "tokenize"}));
        assert_eq!(fields[5]["type"], json!({"type": "array", "items": "string"}));
        assert_eq!(fields[5]["confluent:tags"], json!(["PII"]));
        assert_eq!(fields[6]["type"], json!({"type": "map", "values": "string"}));
        assert_eq!(fields[7]["type"], "long");
        assert_eq!(fields[8]["type"], "int");
        // The translation is an Avro schema piiwall compiles.
        let compiled = super::super::compile(&writer.avro, &Default::default()).unwrap();
        assert_eq!(compiled.plan.rules.len(), 7, "{:?}", compiled.plan.rules);
    }

    #[test]
    fn schemas_that_cannot_be_protected_are_refused_with_the_place() {
        let refused = |text: &str| writer(text).unwrap_err().to_string();
        let any = refused(
            "syntax = \"proto3\"; import \"google/protobuf/any.proto\"; message M { google.protobuf.Any x = 1; }",
        );
        assert!(any.contains("x") && any.contains("google.protobuf.Any"), "{any}");
        let recursive = refused("syntax = \"proto3\"; message M { M child = 1; }");
        assert!(recursive.contains("recursive"), "{recursive}");
        let misplaced = refused(
            "syntax = \"proto3\"; import \"piiwall/pii.proto\"; message M { N n = 1; } \
             message N { option (piiwall.subject) = \"a\"; string a = 1; }",
        );
        assert!(misplaced.contains("not the record's message"), "{misplaced}");
        let message_tags = refused(
            "syntax = \"proto3\"; import \"confluent/meta.proto\"; \
             message M { option (confluent.message_meta).tags = \"PII\"; string a = 1; }",
        );
        assert!(message_tags.contains("message_meta"), "{message_tags}");
        let syntax = refused("syntax = \"proto3\"; message M { string a = 1 }");
        assert!(syntax.contains("not a valid .proto schema"), "{syntax}");
        let missing = refused("syntax = \"proto3\"; import \"other.proto\"; message M { string a = 1; }");
        assert!(missing.contains("other.proto"), "{missing}");
        assert!(refused("syntax = \"proto3\";").contains("no message"));
    }

    /// A message of a file without a package, used again inside a message that has a nested type of the same
    /// short name: the policy must check the message the bytes are read as (it once resolved to the nested one, and
    /// `inner.person.email` went out in clear).
    #[test]
    fn messages_without_a_package_are_not_confused_with_nested_namesakes() {
        let text = r#"syntax = "proto3"; import "piiwall/pii.proto";
            message Order { .Contact buyer = 1; Contact team = 2; Inner inner = 3;
              message Contact { string note = 1; }
              message Inner { .Contact person = 1; } }
            message Contact { string email = 1 [(piiwall.pii).action = "tokenize"]; }"#;
        let writer = writer(text).unwrap();
        let compiled = super::super::compile(&writer.avro, &Default::default()).unwrap();
        let paths: Vec<&str> = compiled.plan.rules.iter().map(|r| r.path.as_str()).collect();
        assert!(paths.contains(&"inner.person.email"), "{paths:?}");
        assert!(paths.contains(&"buyer.email"), "{paths:?}");
    }

    /// A hand-written map entry could carry annotations piiwall would not read: refused, as malformed ones.
    #[test]
    fn hand_written_map_entries_and_shadowed_google_files_are_refused() {
        let entry = writer(
            r#"syntax = "proto3"; import "piiwall/pii.proto";
            message M { repeated E m = 1;
              message E { option map_entry = true; string key = 1; string value = 2 [(piiwall.pii).action = "tokenize"]; } }"#,
        );
        let refused = entry.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("map_entry"), "{refused}");
        let broken = writer(
            r#"syntax = "proto3"; message M { repeated E m = 1; message E { option map_entry = true; string key = 1; } }"#,
        );
        assert!(broken.is_err());
        // A reference may not stand in for Google's own files.
        let references = HashMap::from([(
            "google/protobuf/timestamp.proto".to_owned(),
            "syntax = \"proto3\"; package google.protobuf; message Timestamp { string secret = 1; }".to_owned(),
        )]);
        let text = "syntax = \"proto3\"; import \"google/protobuf/timestamp.proto\"; message M { google.protobuf.Timestamp at = 1; }";
        let compiled = compile_writer(text, &references, None).unwrap();
        let at = &compiled.message.fields[0];
        let Type::Message(timestamp) = &at.ty else {
            panic!("a message")
        };
        assert_eq!(
            timestamp.fields[0].name, "seconds",
            "Google's Timestamp, not the reference's"
        );
        assert!(
            writer(&format!(
                "syntax = \"proto3\"; message M {{ string a = 1 [{}]; }}",
                "[".repeat(200)
            ))
            .is_err()
        );
    }

    /// Annotations piiwall would not apply, and shapes it cannot protect alike everywhere, are refused.
    #[test]
    fn tags_on_enums_extensions_and_shared_subject_paths_are_refused() {
        let refused = |text: &str| writer(text).unwrap_err().to_string();
        let enum_tags = refused(
            "syntax = \"proto3\"; import \"confluent/meta.proto\"; message M { E e = 1; } \
             enum E { option (confluent.enum_meta).tags = \"PII\"; A = 0; }",
        );
        assert!(enum_tags.contains("enum_meta"), "{enum_tags}");
        let extended = refused(
            "syntax = \"proto2\"; import \"piiwall/pii.proto\"; message M { optional string a = 1; extensions 10 to 20; } \
             extend M { optional string email = 10 [(piiwall.pii).action = \"tokenize\"]; }",
        );
        assert!(extended.contains("extension fields are not supported"), "{extended}");
        let shared = refused(
            "syntax = \"proto3\"; import \"piiwall/pii.proto\"; \
             message M { option (piiwall.subject) = \"buyer.id\"; P buyer = 1; P seller = 2; } message P { int64 id = 1; }",
        );
        assert!(shared.contains("other fields hold too"), "{shared}");
        let references = HashMap::from([(
            "other.proto".to_owned(),
            "syntax = \"proto3\"; import \"confluent/meta.proto\"; option (confluent.file_meta).tags = \"PII\"; \
             message O { string a = 1; }"
                .to_owned(),
        )]);
        let file_tags = compile_writer(
            "syntax = \"proto3\"; import \"other.proto\"; message M { O o = 1; }",
            &references,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(file_tags.contains("file_meta"), "{file_tags}");
    }

    fn sanitized_text(text: &str) -> Result<String, PolicyError> {
        let settings = super::super::PolicySettings {
            untagged: super::super::Untagged::Pass,
            ..Default::default()
        };
        let compiled = super::super::compile_protobuf(text, &HashMap::new(), None, &settings)?;
        Ok(compiled.published_schema().0.to_owned())
    }

    /// The sanitized `.proto` is one valid file whatever the writer mixes: one sanitized message per writer message
    /// (a per-path copy once took the name of a real message), labels in the printed file's syntax, proto2
    /// defaults kept on fields left alone and dropped from protected ones.
    #[test]
    fn the_sanitized_proto_is_valid_and_says_what_the_output_holds() {
        let shared = sanitized_text(
            r#"syntax = "proto3"; package s; import "piiwall/pii.proto";
            message Order { P a = 1; P b = 2; P_1 c = 3; }
            message P { string email = 1 [(piiwall.pii).action = "tokenize"]; }
            message P_1 { int64 note = 1; }"#,
        )
        .unwrap();
        let reread = compile_writer(&shared, &HashMap::new(), None).expect("the sanitized .proto compiles");
        let Type::Message(c) = &reread.message.fields[2].ty else {
            panic!("a message")
        };
        assert_eq!(c.fields[0].name, "note", "{shared}");
        assert_eq!(shared.matches("message P {").count(), 1, "{shared}");

        let proto2 = sanitized_text(
            r#"syntax = "proto2"; import "piiwall/pii.proto"; import "google/protobuf/timestamp.proto";
            message M { optional int32 retries = 1 [default = 5];
                        optional string code = 2 [default = "xy", (piiwall.pii).action = "tokenize"];
                        optional string label = 5 [default = "a\"b"];
                        optional google.protobuf.Timestamp at = 3; required E e = 4 [default = B]; }
            enum E { A = 1; B = 2; }"#,
        )
        .unwrap();
        compile_writer(&proto2, &HashMap::new(), None).expect("the sanitized .proto compiles");
        assert!(proto2.contains("optional int32 retries = 1 [default = 5];"), "{proto2}");
        assert!(
            proto2.contains("optional string code = 2; // pii.applied: tokenize"),
            "{proto2}"
        );
        assert!(proto2.contains("required int32 e = 4 [default = 2];"), "{proto2}");
        assert!(
            proto2.contains(r#"optional string label = 5 [default = "a\"b"];"#),
            "{proto2}"
        );
        assert!(
            proto2.contains("optional int64 seconds = 1;"),
            "proto3 fields labelled in proto2: {proto2}"
        );

        let references = HashMap::from([(
            "legacy.proto".to_owned(),
            "syntax = \"proto2\"; message L { required string id = 1; }".to_owned(),
        )]);
        let settings = super::super::PolicySettings {
            untagged: super::super::Untagged::Pass,
            ..Default::default()
        };
        let compiled = super::super::compile_protobuf(
            "syntax = \"proto3\"; import \"legacy.proto\"; message M { L l = 1; }",
            &references,
            None,
            &settings,
        )
        .unwrap();
        let text = compiled.published_schema().0;
        compile_writer(text, &HashMap::new(), None).expect("no `required` in proto3");

        let clash = writer(
            r#"syntax = "proto3"; message M { A.B x = 1; A_B y = 2; } message A { message B { string s = 1; } } message A_B { string t = 1; }"#,
        );
        assert!(clash.unwrap_err().to_string().contains("rename one"));
    }

    /// `redact` on a message other fields hold too is refused (the sanitized schema defines a message once).
    #[test]
    fn redact_on_a_shared_message_is_refused() {
        let refused = sanitized_text(
            r#"syntax = "proto2"; import "piiwall/pii.proto";
            message C { required Address home = 1 [(piiwall.pii).action = "redact"]; optional Address billing = 2; }
            message Address { optional int32 zip = 1 [(piiwall.pii).action = "tokenize"]; optional string city = 2; }"#,
        )
        .unwrap_err()
        .to_string();
        assert!(refused.contains("other fields hold too"), "{refused}");
    }

    /// A message used at exponentially many paths is refused before the policy compiler walks them all.
    #[test]
    fn messages_reused_at_exponentially_many_paths_are_refused() {
        let mut text = String::from("syntax = \"proto3\";\n");
        for level in 0..30 {
            text.push_str(&format!(
                "message L{level} {{ L{next} a = 1; L{next} b = 2; }}\n",
                next = level + 1
            ));
        }
        text.push_str("message L30 { string s = 1; }\n");
        let refused = writer(&text).unwrap_err().to_string();
        assert!(refused.contains("over all its paths"), "{refused}");
    }

    #[test]
    fn references_resolve_and_messages_are_picked_by_name_and_index() {
        let references = HashMap::from([(
            "common/address.proto".to_owned(),
            "syntax = \"proto3\"; package common; message Address { string city = 1; }".to_owned(),
        )]);
        let text = "syntax = \"proto3\"; package shop; import \"common/address.proto\"; \
                    message A { string a = 1; } message B { common.Address at = 1; message C { string c = 1; } }";
        let picked = compile_writer(text, &references, Some("B.C")).unwrap();
        assert_eq!(picked.indexes, vec![1, 0]);
        let b = compile_writer(text, &references, Some("shop.B")).unwrap();
        assert_eq!(b.indexes, vec![1]);
        assert!(compile_writer(text, &references, Some("Nope")).is_err());
    }
}

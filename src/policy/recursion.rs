//! Bounds on how far a schema's types can be walked, checked on Avro's parsed schema before anything walks it.
//!
//! Every walk of a type (the compiler's, the transcoder's skip of a redacted value, a redacted record's empty value)
//! follows a recursive type for ever and overflows the stack, which ends the process; each walks a named record
//! again at every use, so a few kilobytes of records that each use the next one twice would take hours and
//! gigabytes; and a chain of thousands of records, each holding the one before, is deeper than a stack. A schema
//! anyone can register must do none of that: it is refused, with the field where it happens.

use std::collections::{HashMap, HashSet};

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};

use crate::codec::schema_names;
use crate::error::PolicyError;

/// The most types a schema may expand to (every use of a named record counted with all it holds): far above any
/// real record's, and compiled in well under a second.
pub(super) const MAX_EXPANDED_TYPES: u64 = 100_000;

/// The most records nested in one another, through references too (JSON Schema's translation stops at 64 levels).
pub(super) const MAX_RECORD_DEPTH: usize = 64;

/// The most types (records, arrays, maps, unions) nested in one another, through references too: what one JSON
/// document can nest inline (serde_json stops at 128 levels), which every walk takes on a 2 MiB stack. References
/// could chain such nestings far deeper.
pub(super) const MAX_NESTING: usize = 128;

/// The most values that take no bytes (fields of type null, fixed of size 0, and records holding only such values,
/// each record counted) one record may hold, those of the records in it counted (not those inside its arrays, maps
/// or unions, which take a byte each): every other value a walk visits takes bytes, so a record's work stays in
/// proportion to its bytes.
pub(super) const MAX_ZERO_SIZE_VALUES: u64 = 64;

fn too_many_zero_size(path: &str, record: &Name) -> PolicyError {
    PolicyError::new(
        path,
        format!(
            "record `{}` holds more than {MAX_ZERO_SIZE_VALUES} values that take no bytes (fields of type null, fixed \
             of size 0, records holding only such values, with those of the records in it): a few bytes of such \
             records would take millions of steps to read",
            record.fullname(None)
        ),
    )
}

pub(super) fn too_many_types() -> PolicyError {
    PolicyError::new(
        "",
        format!(
            "the schema expands to more than {MAX_EXPANDED_TYPES} types once each use of a named record is counted \
             with all it holds: use each record in fewer places, or split the schema"
        ),
    )
}

pub(super) fn too_deep(path: &str) -> PolicyError {
    PolicyError::new(
        path,
        format!("records nest more than {MAX_RECORD_DEPTH} deep here (through references too)"),
    )
}

fn nested_too_deep(path: &str) -> PolicyError {
    PolicyError::new(
        path,
        format!(
            "types (records, arrays, maps, unions) nest more than {MAX_NESTING} deep here (through references too)"
        ),
    )
}

/// Refuses a named type defined twice, the first record found to hold itself (named with the field where it
/// does), types nested more than [`MAX_NESTING`] deep, a record holding more than [`MAX_ZERO_SIZE_VALUES`] values
/// that take no bytes, and a schema that expands to more than [`MAX_EXPANDED_TYPES`].
pub(crate) fn check_walkable(schema: &Schema) -> Result<(), PolicyError> {
    check_defined_once(schema, &mut HashSet::new())?;
    let mut walk = Walk {
        names: schema_names(schema),
        marks: HashMap::new(),
        types: 0,
        deepest: 0,
    };
    walk.visit(schema, "", 0)
}

/// Avro's parser takes a second definition of a name; which one a reference means then depends on the reader.
fn check_defined_once<'s>(schema: &'s Schema, seen: &mut HashSet<&'s Name>) -> Result<(), PolicyError> {
    let name = match schema {
        Schema::Record(record) => Some(&record.name),
        Schema::Enum(e) => Some(&e.name),
        Schema::Fixed(f) | Schema::Uuid(UuidSchema::Fixed(f)) | Schema::Duration(f) => Some(&f.name),
        Schema::Decimal(d) => match &d.inner {
            InnerDecimalSchema::Fixed(f) => Some(&f.name),
            InnerDecimalSchema::Bytes => None,
        },
        _ => None,
    };
    if let Some(name) = name
        && !seen.insert(name)
    {
        return Err(PolicyError::new(
            "",
            format!("the type `{}` is defined twice", name.fullname(None)),
        ));
    }
    match schema {
        Schema::Record(record) => record
            .fields
            .iter()
            .try_for_each(|field| check_defined_once(&field.schema, seen)),
        Schema::Array(array) => check_defined_once(&array.items, seen),
        Schema::Map(map) => check_defined_once(&map.types, seen),
        Schema::Union(union) => union
            .variants()
            .iter()
            .try_for_each(|variant| check_defined_once(variant, seen)),
        _ => Ok(()),
    }
}

/// A record's state in the depth-first walk: on the walk's path, or walked to the end with the types it expands to
/// and how deep its types nest, itself included (whatever holds it again is then not a cycle: a cycle through it
/// would have been found while it was open).
enum Mark {
    Open,
    Done {
        types: u64,
        depth: usize,
        zero_size: u64,
        reads_nothing: bool,
    },
}

struct Walk<'s> {
    names: HashMap<&'s Name, &'s Schema>,
    marks: HashMap<&'s Name, Mark>,
    /// Types counted so far, each use of a record with all it holds: the walk stops once past the bound.
    types: u64,
    /// The deepest nesting of types the walk has met below the record it is in (reset as each record starts).
    deepest: usize,
}

impl<'s> Walk<'s> {
    /// Walks `schema` at `path`, inside `depth` types, adding the types it expands to and noting in `deepest` how
    /// deep its types nest.
    fn visit(&mut self, schema: &'s Schema, path: &str, depth: usize) -> Result<(), PolicyError> {
        self.add(1)?;
        let nests = matches!(
            schema,
            Schema::Record(_) | Schema::Array(_) | Schema::Map(_) | Schema::Union(_)
        );
        if nests && depth >= MAX_NESTING {
            return Err(nested_too_deep(path));
        }
        match schema {
            Schema::Ref { name } => match self.names.get(name) {
                Some(definition) => self.visit(definition, path, depth),
                None => Ok(()),
            },
            Schema::Record(record) => {
                match self.marks.get(&record.name) {
                    Some(Mark::Open) => {
                        return Err(PolicyError::new(
                            path,
                            format!(
                                "record `{}` contains itself: recursive schemas are not supported",
                                record.name.fullname(None)
                            ),
                        ));
                    }
                    // Itself counted once above; what it holds, once per use.
                    Some(&Mark::Done {
                        types, depth: nested, ..
                    }) => {
                        if depth + nested > MAX_NESTING {
                            return Err(nested_too_deep(path));
                        }
                        self.deepest = self.deepest.max(nested);
                        return self.add(types.saturating_sub(1));
                    }
                    None => {}
                }
                self.marks.insert(&record.name, Mark::Open);
                let (before, outer) = (self.types - 1, std::mem::take(&mut self.deepest));
                let (mut zero_size, mut reads_nothing) = (0u64, true);
                for field in &record.fields {
                    let inner = if path.is_empty() {
                        field.name.clone()
                    } else {
                        format!("{path}.{}", field.name)
                    };
                    self.visit(&field.schema, &inner, depth + 1)?;
                    let (field_zero_size, field_reads_nothing) = self.zero_size(&field.schema);
                    zero_size = zero_size.saturating_add(field_zero_size);
                    reads_nothing &= field_reads_nothing;
                    if zero_size > MAX_ZERO_SIZE_VALUES {
                        return Err(too_many_zero_size(&inner, &record.name));
                    }
                }
                // A record that reads no byte is a step of its own taking none.
                zero_size += u64::from(reads_nothing);
                if zero_size > MAX_ZERO_SIZE_VALUES {
                    return Err(too_many_zero_size(path, &record.name));
                }
                let nested = self.deepest + 1;
                self.marks.insert(
                    &record.name,
                    Mark::Done {
                        types: self.types - before,
                        depth: nested,
                        zero_size,
                        reads_nothing,
                    },
                );
                self.deepest = outer.max(nested);
                Ok(())
            }
            Schema::Array(array) => self.nested(&array.items, path, depth),
            Schema::Map(map) => self.nested(&map.types, path, depth),
            Schema::Union(union) => union
                .variants()
                .iter()
                .try_for_each(|variant| self.nested(variant, path, depth)),
            _ => Ok(()),
        }
    }

    /// The values that take no bytes in a value of `schema`, a type walked already, and whether it reads no byte at
    /// all: a null or a fixed of size 0 is one; a record, those it holds (itself too when it reads no byte);
    /// anything else takes a byte (a length, a count, an index).
    fn zero_size(&self, schema: &'s Schema) -> (u64, bool) {
        let schema = match schema {
            Schema::Ref { name } => self.names.get(name).copied().unwrap_or(schema),
            other => other,
        };
        match schema {
            Schema::Null => (1, true),
            Schema::Fixed(fixed) if fixed.size == 0 => (1, true),
            Schema::Decimal(decimal) if matches!(&decimal.inner, InnerDecimalSchema::Fixed(f) if f.size == 0) => {
                (1, true)
            }
            Schema::Record(record) => match self.marks.get(&record.name) {
                Some(&Mark::Done {
                    zero_size,
                    reads_nothing,
                    ..
                }) => (zero_size, reads_nothing),
                _ => (0, false),
            },
            _ => (0, false),
        }
    }

    /// Walks the type inside an array, map or union at `depth`, counting the level it adds in `deepest`.
    fn nested(&mut self, schema: &'s Schema, path: &str, depth: usize) -> Result<(), PolicyError> {
        let outer = std::mem::take(&mut self.deepest);
        self.visit(schema, path, depth + 1)?;
        self.deepest = outer.max(self.deepest + 1);
        Ok(())
    }

    fn add(&mut self, types: u64) -> Result<(), PolicyError> {
        self.types = self.types.saturating_add(types);
        if self.types > MAX_EXPANDED_TYPES {
            return Err(too_many_types());
        }
        Ok(())
    }
}

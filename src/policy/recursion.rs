//! Refuses Avro schemas in which a record holds itself, or that grow past a bound once each use of a named type is
//! expanded. Every walk of a type (the compiler's, the transcoder's skip of a redacted value, a redacted record's
//! empty value) follows a recursive type for ever and overflows the stack, which ends the process; and each walks a
//! named type again at every use, so a few kilobytes of records that each use the next one twice would take hours
//! and gigabytes to compile. A schema anyone can register must do neither.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::Name;

use crate::codec::schema_names;
use crate::error::PolicyError;

/// The most types a schema may expand to (every use of a named record counted with all it holds): far above any
/// real record's, and compiled in well under a second.
pub(super) const MAX_EXPANDED_TYPES: u64 = 100_000;

/// Refuses the first record found to hold itself, named with the field where it does, and a schema that expands to
/// more than [`MAX_EXPANDED_TYPES`].
pub(super) fn check_walkable(schema: &Schema) -> Result<(), PolicyError> {
    let names = schema_names(schema);
    let types = visit(schema, &names, &mut HashMap::new(), "")?;
    if types > MAX_EXPANDED_TYPES {
        return Err(PolicyError::new(
            "",
            format!(
                "the schema expands to more than {MAX_EXPANDED_TYPES} types once each use of a named record is \
                 counted with all it holds: use each record in fewer places, or split the schema"
            ),
        ));
    }
    Ok(())
}

/// A record's state in the depth-first walk: on the walk's path, or walked to the end with the types it expands to
/// (whatever holds it again is then not a cycle: a cycle through it would have been found while it was open).
enum Mark {
    Open,
    Done(u64),
}

/// The types `schema` expands to (itself included), saturating.
fn visit<'s>(
    schema: &'s Schema,
    names: &HashMap<&'s Name, &'s Schema>,
    marks: &mut HashMap<&'s Name, Mark>,
    path: &str,
) -> Result<u64, PolicyError> {
    match schema {
        Schema::Ref { name } => match names.get(name) {
            Some(definition) => visit(definition, names, marks, path),
            None => Ok(1),
        },
        Schema::Record(record) => {
            match marks.get(&record.name) {
                Some(Mark::Open) => {
                    return Err(PolicyError::new(
                        path,
                        format!(
                            "record `{}` contains itself: recursive schemas are not supported",
                            record.name.fullname(None)
                        ),
                    ));
                }
                Some(Mark::Done(types)) => return Ok(*types),
                None => {}
            }
            marks.insert(&record.name, Mark::Open);
            let mut types = 1u64;
            for field in &record.fields {
                let inner = if path.is_empty() {
                    field.name.clone()
                } else {
                    format!("{path}.{}", field.name)
                };
                types = types.saturating_add(visit(&field.schema, names, marks, &inner)?);
            }
            marks.insert(&record.name, Mark::Done(types));
            Ok(types)
        }
        Schema::Array(array) => Ok(visit(&array.items, names, marks, path)?.saturating_add(1)),
        Schema::Map(map) => Ok(visit(&map.types, names, marks, path)?.saturating_add(1)),
        Schema::Union(union) => union.variants().iter().try_fold(1u64, |types, variant| {
            Ok(types.saturating_add(visit(variant, names, marks, path)?))
        }),
        _ => Ok(1),
    }
}

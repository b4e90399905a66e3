//! The transcoder's program: the writer schema and the plan, compiled into a tree of steps over Avro binary.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;
use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};
use apache_avro::types::Value;

use crate::codec::schema_names;
use crate::crypto::plain;
use crate::detect::{DetectPolicy, FieldDetectors};
use crate::error::PolicyError;
use crate::policy::{Branch, Node, Plan, Shape};

/// How to pass over a value that is not changed (it is copied as bytes), checking it on the way.
#[derive(Debug, Clone)]
pub(crate) enum Skip {
    Null,
    Boolean,
    /// A varint within 32 bits.
    Int,
    /// A varint.
    Long,
    Float,
    Double,
    Bytes,
    String,
    UuidString,
    /// Bytes that must be 16 long.
    UuidBytes,
    Fixed(usize),
    Enum(usize),
    Array(Box<Skip>),
    Map(Box<Skip>),
    Union(Vec<Skip>),
    /// The fields, and the fewest bytes the record takes (summed once: it bounds the count of every block of
    /// such records, and a record can hold tens of thousands of types).
    Record {
        fields: Vec<Skip>,
        min_size: usize,
    },
}

impl Skip {
    /// The fewest bytes one value can take: bounds block counts, so a hostile count cannot loop for long.
    pub(crate) fn min_size(&self) -> usize {
        match self {
            Skip::Null => 0,
            Skip::Float => 4,
            Skip::Double => 8,
            Skip::Fixed(n) => *n,
            Skip::Record { min_size, .. } => *min_size,
            _ => 1,
        }
    }
}

/// A scalar as written, and the plaintext tag it becomes.
#[derive(Debug, Clone)]
pub(crate) enum Scalar {
    String,
    UuidString,
    Bytes,
    UuidBytes,
    Fixed { size: usize, tag: u8 },
    Decimal { fixed: Option<usize> },
    Int { tag: u8 },
    Long { tag: u8 },
    Float,
    Double,
    Boolean,
    Enum(Arc<[String]>),
}

impl Scalar {
    /// The fewest bytes one value takes (a `fixed` of size 0 takes none).
    pub(crate) fn min_size(&self) -> usize {
        match self {
            Scalar::Fixed { size, .. } | Scalar::Decimal { fixed: Some(size) } => *size,
            Scalar::Float => 4,
            Scalar::Double => 8,
            _ => 1,
        }
    }
}

impl ShapeStep {
    /// The fewest bytes one value of this shape takes.
    pub(crate) fn min_size(&self) -> usize {
        match self {
            ShapeStep::Scalar(scalar) => scalar.min_size(),
            ShapeStep::Union(_) | ShapeStep::Array(_) | ShapeStep::Map(_) => 1,
        }
    }
}

impl Step {
    /// The fewest bytes one value of this step takes: bounds block counts (zero-size items draw on the record's
    /// budget instead).
    pub(crate) fn min_size(&self) -> usize {
        match self {
            Step::Skip(skip) => skip.min_size(),
            Step::Record(steps) => steps.iter().map(Step::min_size).sum(),
            Step::Array(_) | Step::Map(_) | Step::Union(_) | Step::Inspect(_) => 1,
            Step::Protect(protect) => protect.skip.min_size(),
        }
    }
}

/// Whether a step looks at any text.
fn inspects(step: &Step) -> bool {
    match step {
        Step::Inspect(_) => true,
        Step::Skip(_) | Step::Protect(_) => false,
        Step::Record(steps) | Step::Union(steps) => steps.iter().any(inspects),
        Step::Array(items) | Step::Map(items) => items.keys.is_some() || inspects(&items.item),
    }
}

/// Whether a step can write other bytes than it reads.
fn changes(step: &Step) -> bool {
    match step {
        Step::Skip(_) => false,
        Step::Protect(_) => true,
        Step::Inspect(inspect) => inspect.redacts(),
        Step::Record(steps) | Step::Union(steps) => steps.iter().any(changes),
        Step::Array(items) | Step::Map(items) => items.changes,
    }
}

/// The items of an array, or the values and keys of a map.
#[derive(Debug, Clone)]
pub(crate) struct Items {
    pub(crate) item: Step,
    /// The fewest bytes an item takes (a map's key aside), computed once: it bounds every block's count.
    pub(crate) min_size: usize,
    /// A map's keys, when detection looks at them.
    pub(crate) keys: Option<Inspect>,
    /// Whether an item's bytes can change: then a block that declares its byte size gets a header without it.
    pub(crate) changes: bool,
}

impl Items {
    pub(crate) fn new(item: Step, keys: Option<Inspect>) -> Box<Self> {
        let changes = changes(&item) || keys.as_ref().is_some_and(Inspect::redacts);
        let min_size = item.min_size();
        Box::new(Self {
            item,
            min_size,
            keys,
            changes,
        })
    }
}

/// A step of the program.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Skip(Skip),
    Record(Vec<Step>),
    Array(Box<Items>),
    Map(Box<Items>),
    Union(Vec<Step>),
    Protect(Box<ProtectStep>),
    /// A string no annotation protects, which the detectors look at.
    Inspect(Box<Inspect>),
}

/// The detectors of one unprotected string field.
#[derive(Debug, Clone)]
pub(crate) struct Inspect {
    pub(crate) path: Arc<str>,
    pub(crate) detectors: FieldDetectors,
}

impl Inspect {
    /// Whether a detection can rewrite the text.
    pub(crate) fn redacts(&self) -> bool {
        !self.detectors.redact.is_empty()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ProtectStep {
    pub(crate) rule: usize,
    pub(crate) shape: ShapeStep,
    /// To pass over the whole value when it is redacted.
    pub(crate) skip: Skip,
    /// The redacted value, encoded with the sanitized schema.
    pub(crate) redacted: Vec<u8>,
    pub(crate) scale: u32,
}

#[derive(Debug, Clone)]
pub(crate) enum ShapeStep {
    Scalar(Scalar),
    /// Per input branch: its scalar (`None` for null) and its output branch (`None`: output is not a union).
    Union(Vec<(Option<Scalar>, Option<u32>)>),
    Array(Box<ShapeStep>),
    Map(Box<ShapeStep>),
}

/// Where the subject id is: the fields to pass over at each level, unions on the way.
#[derive(Debug, Clone)]
pub(crate) enum Locate {
    Record {
        before: Vec<Skip>,
        then: Box<Locate>,
    },
    /// Per branch: how to go on, `None` for null.
    Union(Vec<Option<Locate>>),
    Scalar(Scalar),
}

pub(crate) struct Builder<'s> {
    names: HashMap<&'s Name, &'s Schema>,
    /// `None` when detection is off everywhere: unprotected values are then passed over whole.
    detect: Option<&'s DetectPolicy>,
}

/// How deep detection follows nested types (a recursive schema stops being looked into there).
const MAX_INSPECT_DEPTH: usize = 32;

fn unsupported(what: &str) -> PolicyError {
    PolicyError::new("", format!("the binary transcoder does not support {what}"))
}

impl<'s> Builder<'s> {
    pub(crate) fn new(schema: &'s Schema, detect: &'s DetectPolicy) -> Self {
        Self {
            names: schema_names(schema),
            detect: (!detect.is_off()).then_some(detect),
        }
    }

    fn resolve(&self, schema: &'s Schema) -> &'s Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).copied().unwrap_or(schema),
            other => other,
        }
    }

    pub(crate) fn root(&self, writer: &'s Schema, plan: &Plan) -> Result<Step, PolicyError> {
        let Schema::Record(record) = self.resolve(writer) else {
            return Err(unsupported("a root that is not a record"));
        };
        let mut steps = Vec::with_capacity(record.fields.len());
        for (index, field) in record.fields.iter().enumerate() {
            let node = plan.root.iter().find(|(i, _)| *i == index).map(|(_, n)| n);
            steps.push(self.step(&field.schema, node, plan, &field.name)?);
        }
        Ok(Step::Record(steps))
    }

    fn step(&self, schema: &'s Schema, node: Option<&Node>, plan: &Plan, path: &str) -> Result<Step, PolicyError> {
        let schema = self.resolve(schema);
        let Some(node) = node else {
            return self.unprotected(schema, path, 0);
        };
        Ok(match (node, schema) {
            (Node::Protect(p), schema) => Step::Protect(Box::new(ProtectStep {
                rule: p.rule,
                shape: if plan.rules[p.rule].action == crate::policy::Action::Redact {
                    ShapeStep::Scalar(Scalar::Boolean) // never run: redact skips the value
                } else {
                    self.shape(schema, &p.shape)?
                },
                skip: self.skip(schema)?,
                redacted: self.encode_simple(&p.redacted, schema)?,
                scale: p.scale,
            })),
            (Node::Record(nodes), Schema::Record(record)) => {
                let mut steps = Vec::with_capacity(record.fields.len());
                for (index, field) in record.fields.iter().enumerate() {
                    let node = nodes.iter().find(|(i, _)| *i == index).map(|(_, n)| n);
                    steps.push(self.step(&field.schema, node, plan, &format!("{path}.{}", field.name))?);
                }
                Step::Record(steps)
            }
            (Node::Array(node), Schema::Array(array)) => {
                Step::Array(Items::new(self.step(&array.items, Some(node), plan, path)?, None))
            }
            (Node::Map(node), Schema::Map(map)) => Step::Map(Items::new(
                self.step(&map.types, Some(node), plan, path)?,
                self.inspect_keys(path),
            )),
            (Node::Union(branches), Schema::Union(union)) => Step::Union(
                union
                    .variants()
                    .iter()
                    .zip(branches)
                    .map(|(variant, node)| self.step(variant, node.as_ref(), plan, path))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err(unsupported("a plan that does not match its schema")),
        })
    }

    /// The detectors of a map's keys at `path`: never rewritten (see [`DetectPolicy::for_keys`]).
    fn inspect_keys(&self, path: &str) -> Option<Inspect> {
        self.inspect(path).map(|inspect| Inspect {
            detectors: inspect.detectors.for_keys(),
            ..inspect
        })
    }

    /// The detectors of the unprotected text at `path`, unless none applies there.
    fn inspect(&self, path: &str) -> Option<Inspect> {
        let detectors = self.detect?.for_field(path);
        (!detectors.all().is_empty()).then(|| Inspect {
            path: path.into(),
            detectors,
        })
    }

    /// A value no annotation protects: passed over whole, unless detection looks at the text inside it.
    fn unprotected(&self, schema: &'s Schema, path: &str, depth: usize) -> Result<Step, PolicyError> {
        let schema = self.resolve(schema);
        let whole = || Ok(Step::Skip(self.skip(schema)?));
        if self.detect.is_none() || depth > MAX_INSPECT_DEPTH {
            return whole();
        }
        let inner = |schema, path: &str| self.unprotected(schema, path, depth + 1);
        let step = match schema {
            Schema::String => match self.inspect(path) {
                Some(inspect) => Step::Inspect(Box::new(inspect)),
                None => return whole(),
            },
            Schema::Record(record) => Step::Record(
                record
                    .fields
                    .iter()
                    .map(|f| inner(&f.schema, &format!("{path}.{}", f.name)))
                    .collect::<Result<_, _>>()?,
            ),
            Schema::Array(array) => Step::Array(Items::new(inner(&array.items, path)?, None)),
            Schema::Map(map) => Step::Map(Items::new(inner(&map.types, path)?, self.inspect_keys(path))),
            Schema::Union(union) => Step::Union(
                union
                    .variants()
                    .iter()
                    .map(|v| inner(v, path))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return whole(),
        };
        // Nothing inside is looked at: pass over it whole, as without detection.
        Ok(if inspects(&step) {
            step
        } else {
            Step::Skip(self.skip(schema)?)
        })
    }

    fn shape(&self, schema: &'s Schema, shape: &Shape) -> Result<ShapeStep, PolicyError> {
        let schema = self.resolve(schema);
        Ok(match (shape, schema) {
            (Shape::Scalar, schema) => ShapeStep::Scalar(self.scalar(schema)?),
            (Shape::Union(branches), Schema::Union(union)) => ShapeStep::Union(
                union
                    .variants()
                    .iter()
                    .zip(branches)
                    .map(|(variant, Branch { is_null, out })| {
                        Ok((
                            if *is_null {
                                None
                            } else {
                                Some(self.scalar(self.resolve(variant))?)
                            },
                            *out,
                        ))
                    })
                    .collect::<Result<_, PolicyError>>()?,
            ),
            (Shape::Array(inner), Schema::Array(array)) => ShapeStep::Array(Box::new(self.shape(&array.items, inner)?)),
            (Shape::Map(inner), Schema::Map(map)) => ShapeStep::Map(Box::new(self.shape(&map.types, inner)?)),
            _ => return Err(unsupported("a protected shape that does not match its schema")),
        })
    }

    pub(crate) fn scalar(&self, schema: &'s Schema) -> Result<Scalar, PolicyError> {
        Ok(match self.resolve(schema) {
            Schema::String => Scalar::String,
            Schema::Bytes => Scalar::Bytes,
            Schema::Int => Scalar::Int { tag: plain::INT },
            Schema::Long => Scalar::Long { tag: plain::LONG },
            Schema::Float => Scalar::Float,
            Schema::Double => Scalar::Double,
            Schema::Boolean => Scalar::Boolean,
            Schema::Enum(e) => Scalar::Enum(e.symbols.clone().into()),
            Schema::Fixed(f) => Scalar::Fixed {
                size: f.size,
                tag: plain::FIXED,
            },
            Schema::Duration(_) => Scalar::Fixed {
                size: 12,
                tag: plain::DURATION,
            },
            Schema::Uuid(UuidSchema::String) => Scalar::UuidString,
            Schema::Uuid(UuidSchema::Bytes) => Scalar::UuidBytes,
            Schema::Uuid(UuidSchema::Fixed(_)) => Scalar::Fixed {
                size: 16,
                tag: plain::UUID,
            },
            Schema::Decimal(d) => Scalar::Decimal {
                fixed: match &d.inner {
                    InnerDecimalSchema::Bytes => None,
                    InnerDecimalSchema::Fixed(f) => Some(f.size),
                },
            },
            Schema::Date => Scalar::Int { tag: plain::DATE },
            Schema::TimeMillis => Scalar::Int {
                tag: plain::TIME_MILLIS,
            },
            Schema::TimeMicros => Scalar::Long {
                tag: plain::TIME_MICROS,
            },
            Schema::TimestampMillis => Scalar::Long {
                tag: plain::TIMESTAMP_MILLIS,
            },
            Schema::TimestampMicros => Scalar::Long {
                tag: plain::TIMESTAMP_MICROS,
            },
            Schema::TimestampNanos => Scalar::Long {
                tag: plain::TIMESTAMP_NANOS,
            },
            Schema::LocalTimestampMillis => Scalar::Long {
                tag: plain::LOCAL_TIMESTAMP_MILLIS,
            },
            Schema::LocalTimestampMicros => Scalar::Long {
                tag: plain::LOCAL_TIMESTAMP_MICROS,
            },
            Schema::LocalTimestampNanos => Scalar::Long {
                tag: plain::LOCAL_TIMESTAMP_NANOS,
            },
            Schema::BigDecimal => return Err(unsupported("protecting big-decimal values (redact them instead)")),
            _ => return Err(unsupported("protecting a value that is not a scalar")),
        })
    }

    pub(crate) fn skip(&self, schema: &'s Schema) -> Result<Skip, PolicyError> {
        Ok(match self.resolve(schema) {
            Schema::Null => Skip::Null,
            Schema::Boolean => Skip::Boolean,
            Schema::Int | Schema::Date | Schema::TimeMillis => Skip::Int,
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Skip::Long,
            Schema::Float => Skip::Float,
            Schema::Double => Skip::Double,
            Schema::Bytes | Schema::BigDecimal => Skip::Bytes,
            Schema::Uuid(UuidSchema::Bytes) => Skip::UuidBytes,
            Schema::String => Skip::String,
            Schema::Uuid(UuidSchema::String) => Skip::UuidString,
            Schema::Uuid(UuidSchema::Fixed(_)) => Skip::Fixed(16),
            Schema::Fixed(f) => Skip::Fixed(f.size),
            Schema::Duration(_) => Skip::Fixed(12),
            Schema::Decimal(d) => match &d.inner {
                InnerDecimalSchema::Bytes => Skip::Bytes,
                InnerDecimalSchema::Fixed(f) => Skip::Fixed(f.size),
            },
            Schema::Enum(e) => Skip::Enum(e.symbols.len()),
            Schema::Array(a) => Skip::Array(Box::new(self.skip(&a.items)?)),
            Schema::Map(m) => Skip::Map(Box::new(self.skip(&m.types)?)),
            Schema::Union(u) => Skip::Union(u.variants().iter().map(|v| self.skip(v)).collect::<Result<_, _>>()?),
            Schema::Record(r) => {
                let fields: Vec<Skip> = r
                    .fields
                    .iter()
                    .map(|f| self.skip(&f.schema))
                    .collect::<Result<_, _>>()?;
                let min_size = fields.iter().map(Skip::min_size).sum();
                Skip::Record { fields, min_size }
            }
            Schema::Ref { .. } => return Err(unsupported("a reference to an undefined type")),
        })
    }

    /// How to find the subject id: the field indices of the plan's subject, through records and unions.
    pub(crate) fn locate(&self, schema: &'s Schema, steps: &[usize]) -> Result<Locate, PolicyError> {
        let schema = self.resolve(schema);
        match (steps.split_first(), schema) {
            (_, Schema::Union(union)) => Ok(Locate::Union(
                union
                    .variants()
                    .iter()
                    .map(|v| match self.resolve(v) {
                        Schema::Null => Ok(None),
                        other => self.locate(other, steps).map(Some),
                    })
                    .collect::<Result<_, _>>()?,
            )),
            (None, scalar) => match self.scalar(scalar)? {
                scalar @ (Scalar::String
                | Scalar::UuidString
                | Scalar::UuidBytes
                | Scalar::Int { tag: plain::INT }
                | Scalar::Long { tag: plain::LONG }
                | Scalar::Fixed {
                    size: 16,
                    tag: plain::UUID,
                }) => Ok(Locate::Scalar(scalar)),
                // A record whose subject could not be read would fall back to the domain key, which no forget
                // destroys: such a schema is refused, never run.
                _ => Err(PolicyError::new("", crate::policy::SUBJECT_TYPES)),
            },
            (Some((&index, rest)), Schema::Record(record)) => {
                let before = record.fields[..index]
                    .iter()
                    .map(|f| self.skip(&f.schema))
                    .collect::<Result<_, _>>()?;
                let field = record
                    .fields
                    .get(index)
                    .ok_or_else(|| unsupported("a subject outside its record"))?;
                Ok(Locate::Record {
                    before,
                    then: Box::new(self.locate(&field.schema, rest)?),
                })
            }
            _ => Err(unsupported("a subject path that does not match its schema")),
        }
    }
}

impl<'s> Builder<'s> {
    /// Encodes the simple values redaction produces (null, empty and zero values, unions, records of them) with the
    /// schema they are written with.
    fn encode_simple(&self, value: &Value, schema: &'s Schema) -> Result<Vec<u8>, PolicyError> {
        let mut out = Vec::new();
        self.encode_into(value, schema, &mut out)?;
        Ok(out)
    }

    fn encode_into(&self, value: &Value, schema: &'s Schema, out: &mut Vec<u8>) -> Result<(), PolicyError> {
        use super::wire::write_long;
        let schema = self.resolve(schema);
        match (value, schema) {
            (Value::Null, _) => {}
            (Value::Boolean(b), _) => out.push(u8::from(*b)),
            (Value::Int(n) | Value::Date(n) | Value::TimeMillis(n), _) => write_long(out, i64::from(*n)),
            (
                Value::Long(n)
                | Value::TimeMicros(n)
                | Value::TimestampMillis(n)
                | Value::TimestampMicros(n)
                | Value::TimestampNanos(n)
                | Value::LocalTimestampMillis(n)
                | Value::LocalTimestampMicros(n)
                | Value::LocalTimestampNanos(n),
                _,
            ) => write_long(out, *n),
            (Value::Float(n), _) => out.extend_from_slice(&n.to_le_bytes()),
            (Value::Double(n), _) => out.extend_from_slice(&n.to_le_bytes()),
            (Value::String(s), _) => {
                write_long(out, s.len() as i64);
                out.extend_from_slice(s.as_bytes());
            }
            (Value::Bytes(b), _) => {
                write_long(out, b.len() as i64);
                out.extend_from_slice(b);
            }
            (Value::Fixed(_, b), _) => out.extend_from_slice(b),
            // A uuid is written as its schema says: text, 16 bytes with a length, or a 16-byte fixed.
            (Value::Uuid(u), Schema::Uuid(UuidSchema::Bytes)) => {
                write_long(out, 16);
                out.extend_from_slice(u.as_bytes());
            }
            (Value::Uuid(u), Schema::Uuid(UuidSchema::Fixed(_)) | Schema::Fixed(_)) => {
                out.extend_from_slice(u.as_bytes())
            }
            (Value::Uuid(u), _) => {
                let text = u.to_string();
                write_long(out, text.len() as i64);
                out.extend_from_slice(text.as_bytes());
            }
            (Value::Decimal(d), _) => {
                let bytes = Vec::<u8>::try_from(d).map_err(|_| unsupported("this redacted decimal"))?;
                match schema {
                    Schema::Decimal(decimal) if matches!(decimal.inner, InnerDecimalSchema::Fixed(_)) => {
                        let InnerDecimalSchema::Fixed(fixed) = &decimal.inner else {
                            unreachable!()
                        };
                        let mut padded = vec![0u8; fixed.size.saturating_sub(bytes.len())];
                        padded.extend_from_slice(&bytes);
                        out.extend_from_slice(&padded);
                    }
                    _ => {
                        write_long(out, bytes.len() as i64);
                        out.extend_from_slice(&bytes);
                    }
                }
            }
            (Value::Enum(i, _), _) => write_long(out, i64::from(*i)),
            (Value::Union(i, inner), Schema::Union(union)) => {
                write_long(out, i64::from(*i));
                let variant = union
                    .variants()
                    .get(*i as usize)
                    .ok_or_else(|| unsupported("a redacted union branch out of range"))?;
                self.encode_into(inner, variant, out)?;
            }
            (Value::Array(items), _) if items.is_empty() => out.push(0),
            (Value::Map(entries), _) if entries.is_empty() => out.push(0),
            (Value::Record(fields), Schema::Record(record)) => {
                for ((_, field), schema) in fields.iter().zip(&record.fields) {
                    self.encode_into(field, &schema.schema, out)?;
                }
            }
            _ => return Err(unsupported("this redacted value")),
        }
        Ok(())
    }
}

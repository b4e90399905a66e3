//! The plaintext that tokens and ciphertexts carry: one tag byte naming the Avro type, then the value's bytes.
//!
//! The tag lets `reveal` give back a value of the original type (a long stays a number, a decimal keeps its
//! scale) with nothing but the token in hand.

use apache_avro::types::Value;
use serde_json::Value as Json;

use crate::codec::json::{bytes_to_json, decimal_to_string};

pub(crate) const STRING: u8 = 0;
pub(crate) const BYTES: u8 = 1;
pub(crate) const INT: u8 = 2;
pub(crate) const LONG: u8 = 3;
pub(crate) const FLOAT: u8 = 4;
pub(crate) const DOUBLE: u8 = 5;
pub(crate) const BOOLEAN: u8 = 6;
pub(crate) const ENUM: u8 = 7;
pub(crate) const FIXED: u8 = 8;
pub(crate) const UUID: u8 = 9;
pub(crate) const DATE: u8 = 10;
pub(crate) const TIME_MILLIS: u8 = 11;
pub(crate) const TIME_MICROS: u8 = 12;
pub(crate) const TIMESTAMP_MILLIS: u8 = 13;
pub(crate) const TIMESTAMP_MICROS: u8 = 14;
pub(crate) const TIMESTAMP_NANOS: u8 = 15;
pub(crate) const LOCAL_TIMESTAMP_MILLIS: u8 = 16;
pub(crate) const LOCAL_TIMESTAMP_MICROS: u8 = 17;
pub(crate) const LOCAL_TIMESTAMP_NANOS: u8 = 18;
/// Followed by the scale (4 bytes, big-endian), then the unscaled two's-complement big-endian bytes.
pub(crate) const DECIMAL: u8 = 19;
pub(crate) const DURATION: u8 = 20;
pub(crate) const BIG_DECIMAL: u8 = 21;

/// Appends the plaintext form of a scalar value; `None` for a value that is not a scalar.
pub(crate) fn encode_into(value: &Value, decimal_scale: u32, out: &mut Vec<u8>) -> Option<()> {
    match value {
        Value::String(s) => tagged(out, STRING, s.as_bytes()),
        Value::Bytes(b) => tagged(out, BYTES, b),
        Value::Int(n) => tagged(out, INT, &n.to_be_bytes()),
        Value::Long(n) => tagged(out, LONG, &n.to_be_bytes()),
        Value::Float(n) => tagged(out, FLOAT, &n.to_be_bytes()),
        Value::Double(n) => tagged(out, DOUBLE, &n.to_be_bytes()),
        Value::Boolean(b) => tagged(out, BOOLEAN, &[u8::from(*b)]),
        Value::Enum(_, symbol) => tagged(out, ENUM, symbol.as_bytes()),
        Value::Fixed(_, b) => tagged(out, FIXED, b),
        Value::Uuid(u) => tagged(out, UUID, u.as_bytes()),
        Value::Date(n) => tagged(out, DATE, &n.to_be_bytes()),
        Value::TimeMillis(n) => tagged(out, TIME_MILLIS, &n.to_be_bytes()),
        Value::TimeMicros(n) => tagged(out, TIME_MICROS, &n.to_be_bytes()),
        Value::TimestampMillis(n) => tagged(out, TIMESTAMP_MILLIS, &n.to_be_bytes()),
        Value::TimestampMicros(n) => tagged(out, TIMESTAMP_MICROS, &n.to_be_bytes()),
        Value::TimestampNanos(n) => tagged(out, TIMESTAMP_NANOS, &n.to_be_bytes()),
        Value::LocalTimestampMillis(n) => tagged(out, LOCAL_TIMESTAMP_MILLIS, &n.to_be_bytes()),
        Value::LocalTimestampMicros(n) => tagged(out, LOCAL_TIMESTAMP_MICROS, &n.to_be_bytes()),
        Value::LocalTimestampNanos(n) => tagged(out, LOCAL_TIMESTAMP_NANOS, &n.to_be_bytes()),
        Value::Decimal(d) => {
            let unscaled = Vec::<u8>::try_from(d).ok()?;
            out.push(DECIMAL);
            out.extend_from_slice(&decimal_scale.to_be_bytes());
            out.extend_from_slice(&unscaled);
        }
        Value::Duration(d) => tagged(out, DURATION, &<[u8; 12]>::from(*d)),
        Value::BigDecimal(d) => tagged(out, BIG_DECIMAL, d.to_string().as_bytes()),
        Value::Null | Value::Union(..) | Value::Array(_) | Value::Map(_) | Value::Record(_) => {
            return None;
        }
    }
    Some(())
}

/// The plaintext as a plain-JSON value, the form `sanitize` reads and `reveal` prints.
pub(crate) fn to_json(plain: &[u8]) -> Option<Json> {
    let (&tag, body) = plain.split_first()?;
    let text = || std::str::from_utf8(body).ok().map(|s| Json::String(s.to_owned()));
    let i32_of = || Some(i32::from_be_bytes(body.try_into().ok()?));
    let i64_of = || Some(i64::from_be_bytes(body.try_into().ok()?));
    Some(match tag {
        STRING | ENUM | BIG_DECIMAL => text()?,
        BYTES | FIXED | DURATION => bytes_to_json(body),
        INT | DATE | TIME_MILLIS => Json::from(i32_of()?),
        LONG
        | TIME_MICROS
        | TIMESTAMP_MILLIS
        | TIMESTAMP_MICROS
        | TIMESTAMP_NANOS
        | LOCAL_TIMESTAMP_MILLIS
        | LOCAL_TIMESTAMP_MICROS
        | LOCAL_TIMESTAMP_NANOS => Json::from(i64_of()?),
        FLOAT => Json::from(f32::from_be_bytes(body.try_into().ok()?)),
        DOUBLE => Json::from(f64::from_be_bytes(body.try_into().ok()?)),
        BOOLEAN => Json::Bool(*body.first()? != 0),
        UUID => Json::String(apache_avro::Uuid::from_slice(body).ok()?.to_string()),
        DECIMAL => {
            let (scale, unscaled) = body.split_at_checked(4)?;
            let scale = u32::from_be_bytes(scale.try_into().ok()?);
            Json::String(decimal_to_string(unscaled, scale)?)
        }
        _ => return None,
    })
}

fn tagged(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: Value, scale: u32) -> Json {
        let mut buf = Vec::new();
        encode_into(&value, scale, &mut buf).unwrap();
        to_json(&buf).unwrap()
    }

    #[test]
    fn scalars_come_back_with_their_type() {
        assert_eq!(round_trip(Value::String("ada".into()), 0), Json::from("ada"));
        assert_eq!(round_trip(Value::Long(-42), 0), Json::from(-42));
        assert_eq!(round_trip(Value::Int(7), 0), Json::from(7));
        assert_eq!(round_trip(Value::Double(1.5), 0), Json::from(1.5));
        assert_eq!(round_trip(Value::Boolean(true), 0), Json::Bool(true));
        assert_eq!(round_trip(Value::Bytes(vec![0, 255]), 0), Json::from("\u{0}\u{ff}"));
        assert_eq!(
            round_trip(Value::TimestampMillis(1_700_000_000_000), 0),
            Json::from(1_700_000_000_000i64)
        );
        assert_eq!(
            round_trip(Value::Decimal(apache_avro::Decimal::from(vec![0x04, 0xd2])), 2),
            Json::from("12.34")
        );
        assert_eq!(
            round_trip(Value::Decimal(apache_avro::Decimal::from(vec![0xfb, 0x2e])), 2),
            Json::from("-12.34")
        );
    }

    #[test]
    fn containers_are_not_scalars() {
        assert!(encode_into(&Value::Array(vec![]), 0, &mut Vec::new()).is_none());
        assert!(to_json(&[]).is_none());
        assert!(to_json(&[LONG, 1, 2]).is_none());
    }
}

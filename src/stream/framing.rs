//! The Confluent wire format: magic byte 0, the schema id (4 bytes, big-endian), then the Avro binary.

pub const MAGIC: u8 = 0;

/// Splits a framed value into (schema id, Avro payload).
pub fn parse(value: &[u8]) -> Result<(u32, &[u8]), &'static str> {
    match value {
        [MAGIC, a, b, c, d, payload @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), payload)),
        [_, _, _, _, _, ..] => Err("not Confluent wire format: the first byte is not the magic byte 0"),
        _ => Err("not Confluent wire format: shorter than its 5-byte header"),
    }
}

/// Encodes a record of a compiled schema's writer schema in the Confluent wire format, as producers write it.
pub fn encode_framed(
    schema: &crate::policy::CompiledSchema,
    schema_id: u32,
    record: &apache_avro::types::Value,
) -> Result<Vec<u8>, crate::error::ValueError> {
    let mut out = Vec::with_capacity(256);
    write_header(schema_id, &mut out);
    crate::codec::avro::ValueCodec::for_writer(schema).encode(record, &mut out)?;
    Ok(out)
}

/// Appends the 5-byte header of `schema_id`.
pub fn write_header(schema_id: u32, out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_frames_are_named() {
        let mut framed = Vec::new();
        write_header(258, &mut framed);
        framed.extend_from_slice(b"avro");
        assert_eq!(parse(&framed).unwrap(), (258, &b"avro"[..]));
        assert!(parse(&[0, 0, 0]).unwrap_err().contains("shorter"));
        assert!(parse(&[1, 0, 0, 0, 1, 9]).unwrap_err().contains("magic"));
    }
}

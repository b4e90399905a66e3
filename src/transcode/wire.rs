//! Avro binary primitives: zig-zag varints and length-prefixed runs, read with bounds checks that never panic.

use crate::error::ValueError;

/// A varint longer than this many bytes is not a 64-bit Avro long.
const MAX_VARINT_BYTES: usize = 10;

/// A cursor over one encoded record. Every read checks the remaining length first.
pub(crate) struct Input<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
    /// Items of zero size (nulls, empty records) the rest of the record may still declare: they take no bytes, so
    /// the input's length cannot bound them, and this budget does, for the whole record.
    pub(crate) empty_items_left: usize,
}

/// Items of zero size one record may hold in all: bounds the work a few bytes of block headers can ask for.
pub(crate) const MAX_EMPTY_ITEMS: usize = 1 << 16;

pub(crate) fn malformed(problem: &str) -> ValueError {
    ValueError::new("", format!("malformed Avro: {problem}"))
}

impl<'a> Input<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            empty_items_left: MAX_EMPTY_ITEMS,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn read_long(&mut self) -> Result<i64, ValueError> {
        let mut value: u64 = 0;
        for i in 0..MAX_VARINT_BYTES {
            let byte = *self.bytes.get(self.pos).ok_or_else(|| malformed("truncated varint"))?;
            self.pos += 1;
            if i == MAX_VARINT_BYTES - 1 && byte > 1 {
                return Err(malformed("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    pub(crate) fn read_int(&mut self) -> Result<i32, ValueError> {
        i32::try_from(self.read_long()?).map_err(|_| malformed("int out of 32-bit range"))
    }

    /// A length or size: non-negative and no larger than what is left.
    pub(crate) fn read_len(&mut self) -> Result<usize, ValueError> {
        let len = self.read_long()?;
        let len = usize::try_from(len).map_err(|_| malformed("negative length"))?;
        if len > self.remaining() {
            return Err(malformed("length runs past the end of the record"));
        }
        Ok(len)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ValueError> {
        if n > self.remaining() {
            return Err(malformed("truncated value"));
        }
        let run = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(run)
    }

    pub(crate) fn read_bytes(&mut self) -> Result<&'a [u8], ValueError> {
        let len = self.read_len()?;
        self.take(len)
    }

    pub(crate) fn read_str(&mut self) -> Result<&'a str, ValueError> {
        std::str::from_utf8(self.read_bytes()?).map_err(|_| malformed("string is not UTF-8"))
    }

    /// An array or map block header: the item count (0 ends the value). A negative count is followed by the
    /// block's byte size, which is checked and returned.
    pub(crate) fn read_block(&mut self) -> Result<(usize, Option<usize>), ValueError> {
        let count = self.read_long()?;
        if count >= 0 {
            return Ok((count as usize, None));
        }
        let count = count
            .checked_neg()
            .ok_or_else(|| malformed("block count out of range"))? as usize;
        let size = self.read_len()?;
        Ok((count, Some(size)))
    }
}

pub(crate) fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for value in [0i64, -1, 1, 63, -64, 64, 300, i32::MAX as i64, i64::MAX, i64::MIN] {
            let mut buf = Vec::new();
            write_long(&mut buf, value);
            let mut input = Input::new(&buf);
            assert_eq!(input.read_long().unwrap(), value);
            assert_eq!(input.remaining(), 0);
        }
    }

    #[test]
    fn malformed_varints_and_lengths_are_errors() {
        assert!(Input::new(&[0x80]).read_long().is_err(), "truncated");
        assert!(Input::new(&[0xff; 11]).read_long().is_err(), "overlong");
        assert!(
            Input::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
                .read_long()
                .is_err()
        );
        assert!(Input::new(&[0x01]).read_len().is_err(), "negative length");
        assert!(Input::new(&[0x08, b'a']).read_bytes().is_err(), "length past the end");
        let mut min = Vec::new();
        write_long(&mut min, i64::MIN);
        assert!(Input::new(&min).read_block().is_err(), "i64::MIN block count");
        assert!(Input::new(&[0x02, 0xff, 0xfe]).read_str().is_err(), "invalid UTF-8");
    }
}

//! IBANs: a country code, two check digits and the country's number of characters (ISO 13616's registry), written
//! whole or in groups of four, valid by mod-97.

use super::{Kind, is_word};

/// Length of each country's IBAN (the SWIFT IBAN registry).
#[rustfmt::skip]
const LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24), (b"AE", 23), (b"AL", 28), (b"AT", 20), (b"AZ", 28), (b"BA", 20), (b"BE", 16), (b"BG", 22),
    (b"BH", 22), (b"BI", 27), (b"BR", 29), (b"BY", 28), (b"CH", 21), (b"CR", 22), (b"CY", 28), (b"CZ", 24),
    (b"DE", 22), (b"DJ", 27), (b"DK", 18), (b"DO", 28), (b"EE", 20), (b"EG", 29), (b"ES", 24), (b"FI", 18),
    (b"FK", 18), (b"FO", 18), (b"FR", 27), (b"GB", 22), (b"GE", 22), (b"GI", 23), (b"GL", 18), (b"GR", 27),
    (b"GT", 28), (b"HR", 21), (b"HU", 28), (b"IE", 22), (b"IL", 23), (b"IQ", 23), (b"IS", 26), (b"IT", 27),
    (b"JO", 30), (b"KW", 30), (b"KZ", 20), (b"LB", 28), (b"LC", 32), (b"LI", 21), (b"LT", 20), (b"LU", 20),
    (b"LV", 21), (b"LY", 25), (b"MC", 27), (b"MD", 24), (b"ME", 22), (b"MK", 19), (b"MN", 20), (b"MR", 27),
    (b"MT", 31), (b"MU", 30), (b"NI", 28), (b"NL", 18), (b"NO", 15), (b"OM", 23), (b"PK", 24), (b"PL", 28),
    (b"PS", 29), (b"PT", 25), (b"QA", 29), (b"RO", 24), (b"RS", 22), (b"RU", 33), (b"SA", 24), (b"SC", 31),
    (b"SD", 18), (b"SE", 24), (b"SI", 19), (b"SK", 24), (b"SM", 27), (b"SO", 23), (b"ST", 25), (b"SV", 28),
    (b"TL", 23), (b"TN", 24), (b"TR", 26), (b"UA", 29), (b"VA", 22), (b"VG", 24), (b"XK", 20), (b"YE", 30),
];

/// The IBAN starting at `i`, if one does: where it ends.
pub(super) fn at(bytes: &[u8], i: usize) -> Option<(usize, Kind)> {
    let head = bytes.get(i..i + 4)?;
    if !(head[0].is_ascii_uppercase() && head[1].is_ascii_uppercase() && head[2..].iter().all(u8::is_ascii_digit)) {
        return None;
    }
    let length = LENGTHS.iter().find(|(code, _)| code[..] == head[..2])?.1;
    let mut chars = [0u8; 34];
    let (mut count, mut p) = (0, i);
    while count < length && p < bytes.len() {
        let b = bytes[p];
        if b.is_ascii_uppercase() || b.is_ascii_digit() {
            chars[count] = b;
            count += 1;
        } else if !(b == b' ' && count % 4 == 0 && bytes.get(p + 1).is_some_and(u8::is_ascii_alphanumeric)) {
            break;
        }
        p += 1;
    }
    if count < length || (p < bytes.len() && is_word(bytes[p])) {
        return None;
    }
    mod97(&chars[..length]).then_some((p, Kind::Iban))
}

/// ISO 7064 mod 97-10: the first four characters moved to the end, letters as 10..35, the number mod 97 is 1.
fn mod97(chars: &[u8]) -> bool {
    let mut rest = 0u32;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        rest = if c.is_ascii_digit() {
            (rest * 10 + u32::from(c - b'0')) % 97
        } else {
            (rest * 100 + u32::from(c - b'A') + 10) % 97
        };
    }
    rest == 1
}

#[cfg(test)]
mod tests {
    use super::super::tests::found;
    use super::*;

    #[test]
    fn ibans_whole_and_in_groups() {
        for iban in [
            "GB82WEST12345698765432",
            "GB82 WEST 1234 5698 7654 32",
            "DE89 3704 0044 0532 0130 00",
            "FR1420041010050500013M02606",
            "NO9386011117947",
        ] {
            assert_eq!(found(&format!("pay to {iban}.")), vec![(iban, Kind::Iban)], "{iban}");
        }
        for text in [
            "GB82WEST12345698765433",
            "GB82 WEST 1234 5698 7654",
            "ZZ82WEST12345698765432",
            "GB82WEST123456987654321",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }
}

//! Numbers written in groups — cards, SSNs, phone numbers, IPv4 addresses — and IPv6 addresses.
//!
//! A run is digit groups joined by single separators (a space, `-`, `.`, and the parentheses of a phone's area
//! code), optionally after `+` or `(`. Each window of consecutive groups is then checked against each kind's exact
//! rules, longest first, so a card after an order number ("order 12 4111 1111 1111 1111") is still found. A window
//! starts at the run's start or after a space, and ends at the run's end or before a space: numbers joined by `-` or
//! `.` to more digits are one identifier, not PII inside one.

use super::{Kind, is_word};

const CLOSE: u8 = 1;
const SPACE: u8 = 2;
const DASH: u8 = 4;
const DOT: u8 = 8;
const OPEN: u8 = 16;

/// Groups of a run looked at; a run of more groups (rare outside tables of numbers) is judged on its first ones.
const MAX_GROUPS: usize = 32;
/// The most groups one number takes (a phone number written digit pair by digit pair).
const MAX_WINDOW: usize = 7;

#[derive(Clone, Copy, Default)]
struct Group {
    start: usize,
    end: usize,
    /// The separator before the group (0 for the first).
    sep: u8,
}

impl Group {
    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// Checks the run starting at `i` (a word start: a digit, `+` or `(`), reporting each number found to `found`;
/// returns where the run ends.
pub(super) fn run_at(bytes: &[u8], i: usize, mut found: impl FnMut(usize, usize, Kind)) -> usize {
    let prefix = bytes[i];
    let mut p = i + usize::from(matches!(prefix, b'+' | b'('));
    if p >= bytes.len() || !bytes[p].is_ascii_digit() {
        return i + 1;
    }
    let mut groups = [Group::default(); MAX_GROUPS];
    let mut count = 0;
    let mut sep = 0;
    loop {
        let start = p;
        while p < bytes.len() && bytes[p].is_ascii_digit() {
            p += 1;
        }
        if count < MAX_GROUPS {
            groups[count] = Group { start, end: p, sep };
            count += 1;
        }
        let (next, flags) = separator(bytes, p);
        if flags == 0 || next >= bytes.len() || !bytes[next].is_ascii_digit() {
            break;
        }
        sep = flags;
        p = next;
    }
    if p < bytes.len() && is_word(bytes[p]) {
        return p; // digits running into a word: an identifier
    }
    let run = Run {
        bytes,
        prefix: if i == groups[0].start { 0 } else { prefix },
        groups: &groups[..count],
    };
    let mut a = 0;
    while a < count {
        a = match run.longest_from(a) {
            Some((b, kind, with_prefix)) => {
                let start = if with_prefix { i } else { groups[a].start };
                found(start, groups[b].end, kind);
                b + 1
            }
            None => a + 1,
        };
    }
    p
}

/// The separator at `p`: an optional `)`, then an optional space, `-` or `.`, then an optional `(`.
fn separator(bytes: &[u8], mut p: usize) -> (usize, u8) {
    let mut flags = 0;
    if bytes.get(p) == Some(&b')') {
        flags |= CLOSE;
        p += 1;
    }
    match bytes.get(p) {
        Some(b' ') => flags |= SPACE,
        Some(b'-') => flags |= DASH,
        Some(b'.') => flags |= DOT,
        _ => {}
    }
    if flags & (SPACE | DASH | DOT) != 0 {
        p += 1;
    }
    if bytes.get(p) == Some(&b'(') {
        flags |= OPEN;
        p += 1;
    }
    (p, flags)
}

struct Run<'a> {
    bytes: &'a [u8],
    /// `+` or `(` before the first group, or 0.
    prefix: u8,
    groups: &'a [Group],
}

impl Run<'_> {
    /// The longest number starting at group `a`: its last group, its kind, and whether the run's prefix (`+`, or
    /// the `(` of an area code) is part of it.
    fn longest_from(&self, a: usize) -> Option<(usize, Kind, bool)> {
        if a > 0 && self.groups[a].sep != SPACE {
            return None;
        }
        let last = (a + MAX_WINDOW).min(self.groups.len()) - 1;
        (a..=last).rev().find_map(|b| {
            let ends_well = b + 1 == self.groups.len() || self.groups[b + 1].sep == SPACE;
            if !ends_well {
                return None;
            }
            self.kind_of(a, b).map(|(kind, with_prefix)| (b, kind, with_prefix))
        })
    }

    fn kind_of(&self, a: usize, b: usize) -> Option<(Kind, bool)> {
        let window = &self.groups[a..=b];
        let prefix = if a == 0 { self.prefix } else { 0 };
        let seps = || window[1..].iter().map(|g| g.sep);
        let same_sep = |allowed: &[u8]| {
            let first = window.get(1).map_or(0, |g| g.sep);
            (window.len() == 1 || allowed.contains(&first)) && seps().all(|s| s == first)
        };
        let digits = || window.iter().flat_map(|g| &self.bytes[g.start..g.end]).copied();
        let count: usize = window.iter().map(Group::len).sum();
        let first = self.bytes[window[0].start];
        let lens = || window.iter().map(Group::len);
        // An opening parenthesis closed after the first group is a phone's area code; otherwise it is punctuation
        // around the number, not part of it.
        let area_code = prefix == b'(' && window.len() > 1 && window[1].sep & CLOSE != 0;
        if prefix == b'+' {
            return ((8..=15).contains(&count) && first != b'0').then_some((Kind::Phone, true));
        }

        if !area_code && window.len() == 4 && same_sep(&[DOT]) {
            return window
                .iter()
                .all(|g| octet(&self.bytes[g.start..g.end]))
                .then_some((Kind::Ip, false));
        }
        if !area_code && lens().eq([3, 2, 4]) && same_sep(&[DASH, SPACE]) && ssn(self.bytes, window) {
            return Some((Kind::Ssn, false));
        }
        if !area_code && (13..=19).contains(&count) && same_sep(&[SPACE, DASH]) && card(digits(), count) {
            return Some((Kind::Card, false));
        }
        let exchange = |g: &Group| (b'2'..=b'9').contains(&self.bytes[g.start]);
        let nanp = lens().eq([3, 3, 4])
            && exchange(&window[0])
            && exchange(&window[1])
            && if area_code {
                window[1].sep & OPEN == 0 && window[2].sep & (CLOSE | OPEN) == 0
            } else {
                same_sep(&[DASH, DOT, SPACE])
            };
        // Leading-0 national numbers: 07700 900123, 020 7946 0958, 06 12 34 56 78, 06-12345678.
        let national = !area_code
            && first == b'0'
            && (10..=11).contains(&count)
            && (2..=5).contains(&window.len())
            && lens().all(|l| l >= 2)
            && same_sep(&[SPACE, DASH]);
        (nanp || national).then_some((Kind::Phone, area_code))
    }
}

/// 0 to 255, without leading zeros.
fn octet(digits: &[u8]) -> bool {
    match digits {
        [_] => true,
        [b'0', ..] => false,
        [_, _] => true,
        [a, b, c] => (u32::from(a - b'0') * 100 + u32::from(b - b'0') * 10 + u32::from(c - b'0')) <= 255,
        _ => false,
    }
}

/// A US SSN (AAA-GG-SSSS) outside the ranges never issued: area 000, 666 or 900-999, group 00, serial 0000.
fn ssn(bytes: &[u8], window: &[Group]) -> bool {
    let part = |g: &Group| &bytes[g.start..g.end];
    let (area, group, serial) = (part(&window[0]), part(&window[1]), part(&window[2]));
    area != b"000" && area != b"666" && area[0] != b'9' && group != b"00" && serial != b"0000"
}

/// A payment card number: the Luhn check, and an issuer's number range and length.
fn card(digits: impl Iterator<Item = u8> + Clone, count: usize) -> bool {
    let mut prefix = 0u32;
    for d in digits.clone().take(6) {
        prefix = prefix * 10 + u32::from(d - b'0');
    }
    let starts = |from: u32, to: u32, width: u32| {
        let p = prefix / 10u32.pow(6 - width);
        (from..=to).contains(&p)
    };
    let issued = match count {
        13 => starts(4, 4, 1),
        15 => starts(34, 34, 2) || starts(37, 37, 2),
        16 => {
            starts(4, 4, 1)
                || starts(51, 55, 2)
                || starts(2221, 2720, 4)
                || starts(2200, 2204, 4)
                || starts(6011, 6011, 4)
                || starts(644, 649, 3)
                || starts(65, 65, 2)
                || starts(62, 62, 2)
                || starts(3528, 3589, 4)
                || starts(300, 305, 3)
                || starts(36, 36, 2)
                || starts(38, 39, 2)
                || starts(50, 50, 2)
                || starts(56, 58, 2)
                || starts(63, 63, 2)
                || starts(67, 67, 2)
        }
        14 => starts(300, 305, 3) || starts(36, 36, 2) || starts(38, 39, 2) || starts(50, 50, 2) || starts(56, 58, 2),
        17..=19 => {
            starts(4, 4, 1) && count == 19
                || starts(6011, 6011, 4)
                || starts(644, 649, 3)
                || starts(65, 65, 2)
                || starts(62, 62, 2)
                || starts(3528, 3589, 4)
                || starts(2200, 2204, 4)
                || starts(36, 36, 2)
                || starts(50, 50, 2)
                || starts(56, 58, 2)
                || starts(63, 63, 2)
                || starts(67, 67, 2)
        }
        _ => false,
    };
    issued && luhn(digits, count)
}

fn luhn(digits: impl Iterator<Item = u8>, count: usize) -> bool {
    let sum: u32 = digits
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if (count - i).is_multiple_of(2) {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// An IPv6 address starting at `i`: hex digits, colons and dots (an embedded IPv4), at least two colons and one
/// digit, valid by the address grammar, not running into a word.
pub(super) fn ipv6_at(bytes: &[u8], i: usize) -> Option<(usize, Kind)> {
    const LONGEST: usize = 45;
    let mut end = i;
    let (mut colons, mut digit) = (0, false);
    while end < bytes.len() && end - i < LONGEST {
        match bytes[end] {
            b':' => colons += 1,
            b'0'..=b'9' => digit = true,
            b'a'..=b'f' | b'A'..=b'F' | b'.' => {}
            _ => break,
        }
        end += 1;
    }
    if colons < 2 || !digit {
        return None;
    }
    while bytes[end - 1] == b'.' {
        end -= 1;
    }
    if end < bytes.len() && (is_word(bytes[end]) || bytes[end] == b':') {
        return None;
    }
    let text = std::str::from_utf8(&bytes[i..end]).ok()?;
    text.parse::<std::net::Ipv6Addr>().ok().map(|_| (end, Kind::Ip))
}

#[cfg(test)]
mod tests {
    use super::super::tests::found;
    use super::*;

    #[test]
    fn cards_of_every_issuer_and_layout() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5555 5555 5555 4444",
            "2223 0031 2200 3222",
            "3782 822463 10005",
            "6011 1111 1111 1117",
            "3530 1113 3330 0000",
            "3056 9309 0259 04",
            "6200 0000 0000 0005",
            "4222222222222",
        ] {
            assert_eq!(found(card), vec![(card, Kind::Card)], "{card}");
            let text = format!("paid with {card}, thanks");
            assert_eq!(found(&text), vec![(card, Kind::Card)], "{text}");
        }
        assert_eq!(
            found("order 12 4111 1111 1111 1111"),
            vec![("4111 1111 1111 1111", Kind::Card)],
            "a number before a card is not part of it"
        );
    }

    #[test]
    fn numbers_that_are_not_cards() {
        for text in [
            "4111111111111112",      // Luhn fails
            "9111111111111111",      // no issuer
            "4111 1111-1111 1111",   // mixed separators
            "4111.1111.1111.1111",   // dots
            "ID-4111111111111111-7", // part of an identifier
            "x4111111111111111",
            "1234567890123456789012",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    #[test]
    fn ssns_outside_the_never_issued_ranges() {
        assert_eq!(found("SSN 123-45-6789."), vec![("123-45-6789", Kind::Ssn)]);
        assert_eq!(found("123 45 6789"), vec![("123 45 6789", Kind::Ssn)]);
        for text in [
            "000-12-3456",
            "666-12-3456",
            "912-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123-45-67890",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    #[test]
    fn phones_in_e164_and_national_layouts() {
        for phone in [
            "+447700900123",
            "+44 7700 900123",
            "+1 (555) 234-5678",
            "+33 6 12 34 56 78",
            "(555) 234-5678",
            "555-234-5678",
            "555.234.5678",
            "07700 900123",
            "020 7946 0958",
            "06 12 34 56 78",
            "06-12345678",
        ] {
            assert_eq!(
                found(&format!("call {phone} now")),
                vec![(phone, Kind::Phone)],
                "{phone}"
            );
        }
        for text in ["+12 345", "+0 7700 900123", "155-234-5678", "2024-05-06", "10.20.30"] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    #[test]
    fn ip_addresses() {
        for ip in [
            "192.168.1.20",
            "8.8.8.8",
            "2001:db8::1",
            "::1",
            "fe80::1:2",
            "::ffff:192.0.2.1",
        ] {
            assert_eq!(found(&format!("from {ip}.")), vec![(ip, Kind::Ip)], "{ip}");
        }
        assert_eq!(
            found("10.0.0.1 10.0.0.2 port 443"),
            vec![("10.0.0.1", Kind::Ip), ("10.0.0.2", Kind::Ip)],
            "addresses side by side, and a port after one"
        );
        for text in [
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3.4.5",
            "12:34:56",
            "abc::def",
            "v1.2.3.4",
            "00:1a:2b:3c:4d:5e",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }
}

//! E-mail addresses, found from their `@`: a local part of the characters addresses use in practice, and a domain
//! of at least two labels whose last is alphabetic.

use super::{Found, Kind};

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// Appends every address in `bytes`. Linear: neither side of an `@` reaches past a neighbouring `@`.
pub(super) fn find(bytes: &[u8], out: &mut Vec<Found>) {
    let mut taken = 0;
    for at in memchr::memchr_iter(b'@', bytes) {
        if at < taken {
            continue;
        }
        let mut start = at;
        while start > taken && is_local(bytes[start - 1]) {
            start -= 1;
        }
        while start < at && bytes[start] == b'.' {
            start += 1;
        }
        let local = &bytes[start..at];
        if local.is_empty() || local.len() > 64 || local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
            continue;
        }
        let mut end = at + 1;
        while end < bytes.len() && is_domain(bytes[end]) {
            end += 1;
        }
        while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
            end -= 1;
        }
        if domain(&bytes[at + 1..end]) {
            out.push(Found {
                start,
                end,
                kind: Kind::Email,
            });
            taken = end;
        }
    }
}

fn domain(name: &[u8]) -> bool {
    if name.len() > 253 {
        return false;
    }
    let mut labels = name.split(|&b| b == b'.');
    let mut count = 0;
    let mut last: &[u8] = &[];
    for label in labels.by_ref() {
        if label.is_empty() || label.len() > 63 || label[0] == b'-' || label[label.len() - 1] == b'-' {
            return false;
        }
        count += 1;
        last = label;
    }
    count >= 2 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)
}

#[cfg(test)]
mod tests {
    use super::super::tests::found;
    use super::*;

    #[test]
    fn addresses_in_text() {
        for address in [
            "a@b.co",
            "ann.lee+news@mail.example.org",
            "o'neil@example.com",
            "first_last-1%x@sub-domain.example.co.uk",
        ] {
            let text = format!("write to <{address}>.");
            let expected = address.rsplit('\'').next().unwrap();
            assert_eq!(found(&text), vec![(expected, Kind::Email)], "{text}");
        }
    }

    #[test]
    fn what_is_not_an_address() {
        for text in [
            "@example.com",
            "user@localhost",
            "user@example.c",
            "user@example.123",
            "user.@example.com",
            "us..er@example.com",
            "user@-example.com",
            "price 3@5.00",
            "@@@@",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }
}

//! Detectors of PII nobody tagged: e-mail addresses, payment card numbers, IBANs, phone numbers, US SSNs, IP
//! addresses and secrets (PEM private keys, JWTs, common API-key shapes), found in the text of fields that no
//! annotation protects.
//!
//! No regular expression and no backtracking: one pass over the text finds where a word starts and asks the
//! detectors that can start there (each looks at a bounded stretch, so a text costs time linear in its length),
//! and `memchr` finds each `@` for the e-mail detector. Every candidate is then validated exactly: Luhn and the
//! issuers' number ranges for cards, the country length table and mod-97 for IBANs, the invalid ranges for SSNs,
//! the address grammar for IPs. Spans never overlap; the earlier (then the longer) wins.

mod digits;
mod email;
mod iban;
mod policy;
mod secret;

pub use policy::{DetectMode, DetectPolicy, FieldDetectors};

/// What a detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Email,
    Card,
    Iban,
    Phone,
    Ssn,
    Ip,
    Secret,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Email,
        Kind::Card,
        Kind::Iban,
        Kind::Phone,
        Kind::Ssn,
        Kind::Ip,
        Kind::Secret,
    ];

    /// The detector's name in the config, metrics and audit events.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Card => "card",
            Kind::Iban => "iban",
            Kind::Phone => "phone",
            Kind::Ssn => "ssn",
            Kind::Ip => "ip",
            Kind::Secret => "secret",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What replaces a detected span when detections are redacted.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Email => "[email]",
            Kind::Card => "[card]",
            Kind::Iban => "[iban]",
            Kind::Phone => "[phone]",
            Kind::Ssn => "[ssn]",
            Kind::Ip => "[ip]",
            Kind::Secret => "[secret]",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// One detection: the byte range of the text it covers (on character boundaries: every span starts and ends at
/// an ASCII character or at an end of the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub start: usize,
    pub end: usize,
    pub kind: Kind,
}

/// A set of detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detectors(pub(crate) u8);

impl Detectors {
    pub const NONE: Detectors = Detectors(0);

    pub fn all() -> Self {
        Kind::ALL.into_iter().fold(Self::NONE, Self::with)
    }

    pub fn with(self, kind: Kind) -> Self {
        Self(self.0 | kind.bit())
    }

    pub fn contains(self, kind: Kind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Appends what the detectors of this set find in `text` to `out` (cleared first), in order, without overlaps.
    pub fn find(self, text: &str, out: &mut Vec<Found>) {
        out.clear();
        if self.is_empty() {
            return;
        }
        let bytes = text.as_bytes();
        if self.contains(Kind::Email) {
            email::find(bytes, out);
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if !starts_candidate(b) || (i > 0 && is_word(bytes[i - 1])) {
                i += 1;
                continue;
            }
            i = self.at_word_start(bytes, i, out).max(i + 1);
        }
        if out.len() > 1 {
            out.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
            let mut end = 0;
            out.retain(|f| {
                let keep = f.start >= end;
                if keep {
                    end = f.end;
                }
                keep
            });
        }
    }

    /// Asks the detectors that can start at `i` (a word start); returns where to look next.
    fn at_word_start(self, bytes: &[u8], i: usize, out: &mut Vec<Found>) -> usize {
        let mut push = |found: Option<(usize, Kind)>| match found {
            Some((end, kind)) if self.contains(kind) => {
                out.push(Found { start: i, end, kind });
                Some(end)
            }
            _ => None,
        };
        if let Some(end) = push(secret::at(bytes, i)) {
            return end;
        }
        if bytes[i..].starts_with(b"eyJ") {
            // Not a token: a later start inside the same base64url run would end at the same place and fail the
            // same way, so the run is passed over whole (else `eyJ-` repeated would rescan it from every `e`).
            return secret::base64url_end(bytes, i);
        }
        if let Some(end) = push(iban::at(bytes, i)) {
            return end;
        }
        if self.contains(Kind::Ip)
            && let Some(end) = push(digits::ipv6_at(bytes, i))
        {
            return end;
        }
        match bytes[i] {
            b'0'..=b'9' | b'+' | b'(' => digits::run_at(bytes, i, |start, end, kind| {
                if self.contains(kind) {
                    out.push(Found { start, end, kind });
                }
            }),
            _ => i + 1,
        }
    }
}

/// `text` with every found span replaced by its kind's label, appended to `out`.
pub fn redact_into(text: &str, found: &[Found], out: &mut String) {
    let mut from = 0;
    for f in found {
        out.push_str(&text[from..f.start]);
        out.push_str(f.kind.label());
        from = f.end;
    }
    out.push_str(&text[from..]);
}

/// Letters, digits and `_`: a detection never starts or ends inside a word.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Bytes a detection can start with (besides e-mail addresses, found from their `@`).
fn starts_candidate(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'(' | b'-' | b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn found(text: &str) -> Vec<(&str, Kind)> {
        let mut out = Vec::new();
        Detectors::all().find(text, &mut out);
        out.iter().map(|f| (&text[f.start..f.end], f.kind)).collect()
    }

    #[test]
    fn mixed_text_is_redacted_span_by_span() {
        let text = "Mail ann.lee+x@mail.example.org or call +44 7700 900123; card 4111 1111 1111 1111, \
                    IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789, from 192.168.1.20.";
        let mut out = Vec::new();
        Detectors::all().find(text, &mut out);
        let mut redacted = String::new();
        redact_into(text, &out, &mut redacted);
        assert_eq!(
            redacted,
            "Mail [email] or call [phone]; card [card], IBAN [iban], SSN [ssn], from [ip]."
        );
    }

    #[test]
    fn a_set_without_a_detector_does_not_report_it() {
        let mut out = Vec::new();
        Detectors::NONE
            .with(Kind::Card)
            .find("a@b.example and 4111111111111111", &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, Kind::Card);
    }

    #[test]
    fn ordinary_text_has_nothing() {
        for text in [
            "",
            "Order ORD-2024-000123 shipped on 2024-05-06T12:34:56Z for $1,234.56",
            "version 1.2.3-beta, build 2.0.0-rc.1, see https://docs.example.com/a/b?c=d",
            "id 550e8400-e29b-41d4-a716-446655440000 at 12:34:56",
            "deadbeef cafe 4111111111111112 (((( ++++ ----- ::::",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }

    /// Repetitive input is where a backtracking matcher blows up; here each is one pass, and none is PII.
    #[test]
    fn long_repetitive_inputs_find_nothing() {
        for unit in [
            "1 ",
            "@a",
            "a@",
            "+1",
            "(1",
            "1.",
            "1-",
            "::",
            "eyJ.",
            "eyJ-",
            "-----BEGIN ",
            "GB82 ",
            "1:",
        ] {
            let text = unit.repeat(50_000);
            assert_eq!(found(&text), vec![], "{unit:?}");
        }
    }
}

//! Secrets that should never be in an event: PEM private keys, JSON Web Tokens, and API keys of well-known shapes
//! (AWS access key ids, GitHub, Stripe live, Slack and Google API keys).

use super::{Kind, is_word};

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Where the run of base64url characters starting at `i` ends.
pub(super) fn base64url_end(bytes: &[u8], i: usize) -> usize {
    i + bytes[i..].iter().take_while(|&&b| is_base64url(b)).count()
}

/// How many bytes from `from` satisfy `accept`, looking at no more than `limit`.
fn span(bytes: &[u8], from: usize, limit: usize, accept: impl Fn(u8) -> bool) -> usize {
    bytes[from.min(bytes.len())..]
        .iter()
        .take(limit)
        .take_while(|&&b| accept(b))
        .count()
}

/// A key of the shape `prefix` + at least `min` characters of `accept`, not running into a word.
fn key(bytes: &[u8], i: usize, prefix: &[u8], min: usize, accept: impl Fn(u8) -> bool) -> Option<usize> {
    if !bytes[i..].starts_with(prefix) {
        return None;
    }
    let body = i + prefix.len();
    let length = span(bytes, body, 256, accept);
    let end = body + length;
    (length >= min && !(end < bytes.len() && is_word(bytes[end]))).then_some(end)
}

/// The secret starting at `i`, if one does: where it ends.
pub(super) fn at(bytes: &[u8], i: usize) -> Option<(usize, Kind)> {
    let upper_digit = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit();
    let end = match bytes[i] {
        b'-' => pem(bytes, i),
        b'e' => jwt(bytes, i),
        b'A' => key(bytes, i, b"AKIA", 16, upper_digit)
            .or_else(|| key(bytes, i, b"ASIA", 16, upper_digit))
            .or_else(|| key(bytes, i, b"AIza", 35, is_base64url)),
        b'g' => [&b"ghp_"[..], b"gho_", b"ghu_", b"ghs_", b"ghr_"]
            .iter()
            .find_map(|p| key(bytes, i, p, 36, |b| b.is_ascii_alphanumeric()))
            .or_else(|| key(bytes, i, b"github_pat_", 22, |b| b.is_ascii_alphanumeric() || b == b'_')),
        b's' | b'r' => [&b"sk_live_"[..], b"rk_live_"]
            .iter()
            .find_map(|p| key(bytes, i, p, 24, |b| b.is_ascii_alphanumeric())),
        b'x' => [&b"xoxb-"[..], b"xoxp-", b"xoxa-", b"xoxr-", b"xoxs-"]
            .iter()
            .find_map(|p| key(bytes, i, p, 10, |b| b.is_ascii_alphanumeric() || b == b'-')),
        _ => None,
    }?;
    Some((end, Kind::Secret))
}

/// `-----BEGIN ... PRIVATE KEY-----` through its END line; with no END line, the rest of the text (a key cut off
/// is still a key).
fn pem(bytes: &[u8], i: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const KEY: &[u8] = b"PRIVATE KEY-----";
    if !bytes[i..].starts_with(BEGIN) {
        return None;
    }
    let header = &bytes[i + BEGIN.len()..(i + BEGIN.len() + 40).min(bytes.len())];
    let key_at = memchr::memmem::find(header, KEY)?;
    if !header[..key_at].iter().all(|&b| b.is_ascii_uppercase() || b == b' ') {
        return None;
    }
    let body = i + BEGIN.len() + key_at + KEY.len();
    Some(match memchr::memmem::find(&bytes[body..], b"-----END ") {
        Some(end) => {
            let footer = body + end;
            memchr::memmem::find(&bytes[footer..], KEY).map_or(bytes.len(), |k| footer + k + KEY.len())
        }
        None => bytes.len(),
    })
}

/// A JSON Web Token: `eyJ` (base64url of `{"`), then payload and signature, base64url, joined by dots.
fn jwt(bytes: &[u8], i: usize) -> Option<usize> {
    if !bytes[i..].starts_with(b"eyJ") {
        return None;
    }
    let header = span(bytes, i, 4096, is_base64url);
    let payload_at = i + header + 1;
    if header < 10 || bytes.get(payload_at - 1) != Some(&b'.') || !bytes[payload_at..].starts_with(b"eyJ") {
        return None;
    }
    let payload = span(bytes, payload_at, 1 << 16, is_base64url);
    let signature_at = payload_at + payload + 1;
    if payload < 10 || bytes.get(signature_at - 1) != Some(&b'.') {
        return None;
    }
    let signature = span(bytes, signature_at, 1024, is_base64url);
    let end = signature_at + signature;
    (signature >= 16 && !(end < bytes.len() && is_word(bytes[end]))).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::super::tests::found;
    use super::*;

    #[test]
    fn secrets_of_every_shape() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n\
                   -----END RSA PRIVATE KEY-----";
        for secret in [
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "xoxb-1234567890-abcdefghij",
            "AIzaSyA-1234567890abcdefghijklmnopqrstu",
            jwt,
            pem,
        ] {
            assert_eq!(
                found(&format!("token {secret} here")),
                vec![(secret, Kind::Secret)],
                "{secret}"
            );
        }
        let cut = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC";
        assert_eq!(
            found(&format!("key: {cut}")),
            vec![(cut, Kind::Secret)],
            "a key cut off is a key"
        );
    }

    #[test]
    fn look_alikes_are_not_secrets() {
        for text in [
            "AKIA123",
            "ghp_short",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
            "eyJhbGciOiJIUzI1NiJ9",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "-----BEGIN PUBLIC KEY-----",
        ] {
            assert_eq!(found(text), vec![], "{text}");
        }
    }
}

//! The text form of tokens, ciphertexts and hashes: `<prefix>.<key id>.<payload>`.
//!
//! `pwt1` is a deterministic token, `pwe2` a randomized ciphertext of a padded plaintext (`pwe1`, unpadded, is still
//! revealed but no longer written), `pwh1` a keyed hash; the digit is the format version. docs/token-format.md
//! describes every byte. The key id (16 URL-safe characters) names the data key, so `reveal` needs nothing but the token and
//! the field context it was found in. The payload is URL-safe base64 without padding.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::dek::KeyId;
use crate::error::RevealError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Token,
    /// A randomized ciphertext of a plaintext padded to a multiple of 16 bytes (`pwe2`).
    Ciphertext,
    /// A randomized ciphertext of an unpadded plaintext (`pwe1`, written before padding): revealed, never written.
    CiphertextV1,
    Hash,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Token => "pwt1",
            TokenKind::Ciphertext => "pwe2",
            TokenKind::CiphertextV1 => "pwe1",
            TokenKind::Hash => "pwh1",
        }
    }
}

/// A parsed token. Its payload is ciphertext, never plaintext, but it still has no `Debug`: tokens are
/// pseudonyms and stay out of logs.
pub struct Token {
    pub kind: TokenKind,
    pub key_id: KeyId,
    pub payload: Vec<u8>,
}

const KEY_ID_TEXT_LEN: usize = 16;

/// The length of a token's head, `<prefix>.<key id>.`.
pub const HEAD_LEN: usize = 4 + 1 + KEY_ID_TEXT_LEN + 1;

/// Unpadded base64 length of `n` bytes.
const fn base64_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Longest token `parse` accepts: bounds the work a hostile request can cause.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

impl Token {
    pub fn render(kind: TokenKind, key_id: KeyId, payload: &[u8]) -> String {
        let mut out = Vec::with_capacity(Self::text_len(payload.len()));
        Self::render_into(kind, key_id, payload, &mut out);
        String::from_utf8(out).expect("tokens are ASCII")
    }

    /// Appends the text form to `out`: exactly [`Token::text_len`] bytes of ASCII.
    pub fn render_into(kind: TokenKind, key_id: KeyId, payload: &[u8], out: &mut Vec<u8>) {
        Self::render_with_head(&Self::head(kind, key_id), payload, out);
    }

    /// The part of a token before its payload, `<prefix>.<key id>.`: the same for every token of one key and kind,
    /// so a data key renders it once.
    pub fn head(kind: TokenKind, key_id: KeyId) -> [u8; HEAD_LEN] {
        let mut head = Vec::with_capacity(HEAD_LEN);
        head.extend_from_slice(kind.prefix().as_bytes());
        head.push(b'.');
        push_base64url(&key_id.0, &mut head);
        head.push(b'.');
        head.try_into().expect("prefix, key id and two dots")
    }

    /// Appends `head` and the text form of `payload` to `out`.
    pub fn render_with_head(head: &[u8; HEAD_LEN], payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(HEAD_LEN + base64_len(payload.len()));
        out.extend_from_slice(head);
        push_base64url(payload, out);
    }

    /// The length of the text of a token whose payload is `payload_len` bytes.
    pub const fn text_len(payload_len: usize) -> usize {
        HEAD_LEN + base64_len(payload_len)
    }

    pub fn parse(text: &str) -> Result<Token, RevealError> {
        if text.len() > MAX_TOKEN_LEN {
            return Err(RevealError::Malformed("longer than any token piiwall issues"));
        }
        let mut parts = text.trim().split('.');
        let (Some(prefix), Some(key_id), Some(payload), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RevealError::Malformed(
                "expected three dot-separated parts: prefix.key-id.payload",
            ));
        };
        let kind = match prefix {
            "pwt1" => TokenKind::Token,
            "pwe2" => TokenKind::Ciphertext,
            "pwe1" => TokenKind::CiphertextV1,
            "pwh1" => TokenKind::Hash,
            _ => {
                return Err(RevealError::Malformed(
                    "unknown prefix (expected pwt1, pwe2, pwe1 or pwh1)",
                ));
            }
        };
        let key_id =
            KeyId::from_text(key_id).ok_or(RevealError::Malformed("the key id is not 16 URL-safe characters"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| RevealError::Malformed("the payload is not URL-safe base64"))?;
        Ok(Token { kind, key_id, payload })
    }
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Appends `bytes` as URL-safe base64 without padding. The `base64` crate's encoder costs more than the AES work
/// on payloads this short, so tokens are written by this one; `parse` decodes with the crate.
fn push_base64url(bytes: &[u8], out: &mut Vec<u8>) {
    let char_at = |bits: u32| BASE64URL[(bits & 63) as usize];
    out.reserve(base64_len(bytes.len()));
    let mut groups = bytes.chunks_exact(3);
    for group in &mut groups {
        let bits = u32::from(group[0]) << 16 | u32::from(group[1]) << 8 | u32::from(group[2]);
        out.extend_from_slice(&[
            char_at(bits >> 18),
            char_at(bits >> 12),
            char_at(bits >> 6),
            char_at(bits),
        ]);
    }
    match *groups.remainder() {
        [a] => {
            let bits = u32::from(a) << 16;
            out.extend_from_slice(&[char_at(bits >> 18), char_at(bits >> 12)]);
        }
        [a, b] => {
            let bits = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[char_at(bits >> 18), char_at(bits >> 12), char_at(bits >> 6)]);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip() {
        let text = Token::render(TokenKind::Ciphertext, KeyId([3; 12]), b"payload bytes");
        assert!(text.starts_with("pwe2."));
        let token = Token::parse(&text).unwrap();
        assert_eq!(token.kind, TokenKind::Ciphertext);
        assert_eq!(token.key_id, KeyId([3; 12]));
        assert_eq!(token.payload, b"payload bytes");
    }

    #[test]
    fn base64url_matches_the_base64_crate() {
        let bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255).collect();
        for len in 0..bytes.len() {
            for start in [0, 1, 2] {
                let input = &bytes[start..start + len.min(bytes.len() - start)];
                let mut out = b"x".to_vec();
                push_base64url(input, &mut out);
                assert_eq!(
                    &out[1..],
                    URL_SAFE_NO_PAD.encode(input).as_bytes(),
                    "{len} bytes from {start}"
                );
            }
        }
    }

    #[test]
    fn malformed_tokens_are_named() {
        for bad in [
            "",
            "pwt1",
            "pwt1.abc",
            "xxx1.AAAAAAAAAAAAAAAA.AA",
            "pwt1.short.AA",
            "pwt1.AAAAAAAAAAAAAAAA.!!",
            "a.b.c.d",
        ] {
            assert!(matches!(Token::parse(bad), Err(RevealError::Malformed(_))), "{bad}");
        }
    }
}

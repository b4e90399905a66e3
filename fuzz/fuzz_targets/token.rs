//! Token text as analysts paste it into reveal requests: the token parser, then a reveal through a real keyring.
//!
//! Properties: a token that parses renders back to the same text; parse and reveal errors never echo the token.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::crypto::Token;
use piiwall_fuzz::{assert_no_echo, sanitizer};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Token::parse(text) {
        Ok(token) => {
            let rendered = Token::render(token.kind, token.key_id, &token.payload);
            assert_eq!(rendered, text.trim(), "a parsed token does not render back to its text");
        }
        Err(e) => assert_no_echo("the token parser", &e.to_string()),
    }
    if let Err(e) = sanitizer().reveal("email", text) {
        assert_no_echo("reveal", &e.to_string());
    }
});

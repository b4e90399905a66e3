//! Request bodies of the subject-rights API, through the parser every handler uses (the first input byte picks
//! the operation).
//!
//! Properties: nothing panics; a refused body's error names a position, never the body's text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::api::{Operation, parse_request};
use piiwall_fuzz::assert_no_echo;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let operation = Operation::ALL[usize::from(selector) % Operation::ALL.len()];
    if let Err(message) = parse_request(operation, body) {
        assert_no_echo("the API request parser", &message);
    }
});

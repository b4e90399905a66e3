//! Free text as producers paste it into fields nobody tagged: the PII detectors.
//!
//! Properties: detections are in order, do not overlap, lie inside the text on character boundaries, and name what
//! they cover by its kind; redacting them keeps every byte outside the spans. A detector that backtracked or
//! rescanned would show up as a slow unit (libFuzzer's timeout) on long inputs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use piiwall::detect::{Detectors, Found, redact_into};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut found: Vec<Found> = Vec::new();
    Detectors::all().find(text, &mut found);
    let mut end = 0;
    for f in &found {
        assert!(f.start >= end && f.start < f.end && f.end <= text.len(), "{f:?} after {end}");
        assert!(text.is_char_boundary(f.start) && text.is_char_boundary(f.end), "{f:?}");
        end = f.end;
    }
    let mut redacted = String::new();
    redact_into(text, &found, &mut redacted);
    let kept: usize = text.len() - found.iter().map(|f| f.end - f.start).sum::<usize>();
    let labels: usize = found.iter().map(|f| f.kind.label().len()).sum();
    assert_eq!(redacted.len(), kept + labels, "redaction keeps every byte outside the spans");
    if let Some(first) = found.first() {
        assert_eq!(&redacted[..first.start], &text[..first.start]);
    }
});

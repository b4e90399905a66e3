//! `piiwall demo`: the README's first command, run as a user runs it.

use std::process::Command;

#[test]
fn demo_shows_every_record_sanitized_a_quarantine_a_reveal_and_a_forget() {
    let output = Command::new(env!("CARGO_BIN_EXE_piiwall"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Three Avro topics, one of JSON Schema records, one of plain JSON, one of Protobuf.
    assert!(stdout.contains("15 records sanitized, 1 quarantined"), "{stdout}");
    assert_eq!(stdout.matches("  sanitized ").count(), 15);
    for form in ["[Avro;", "[JSON Schema;", "[plain JSON;", "[Protobuf;"] {
        assert!(stdout.contains(form), "the demo shows a topic of each format: {form}");
    }
    for line in stdout.lines().filter(|l| l.starts_with("  sanitized ")) {
        for pii in [
            "ada.lovelace@example.com",
            "Ada Lovelace",
            "4111111111111111",
            "203.0.113.42",
            "DE89370400440532013000",
            "grace.hopper@example.com",
            "12 St James's Square",
            "+44 7700 900123",
        ] {
            assert!(!line.contains(pii), "a sanitized record shows PII: {line}");
        }
    }
    assert!(stdout.contains("quarantined: not Confluent wire format"));
    assert!(
        stdout.contains("checkout?email=[email]&step=2"),
        "an address in a field nobody tagged is redacted, the rest of the URL kept"
    );
    assert!(
        stdout.contains("-> \"ada.lovelace@example.com\""),
        "the reveal gives the email back"
    );
    assert!(
        stdout.contains("-> subject forgotten"),
        "after forget the same token no longer reveals"
    );
}

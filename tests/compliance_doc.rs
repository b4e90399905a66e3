//! docs/compliance.md names, for each requirement, the tests that prove what piiwall does: every test it names
//! must exist, and every requirement the compliance map promises must have its section.

use std::path::Path;

fn document() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/compliance.md")).unwrap()
}

/// Every `` `tests/FILE.rs::NAME` `` or `` `src/FILE.rs::NAME` `` in the text, as (file, name).
fn named_tests(text: &str) -> Vec<(String, String)> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|quoted| {
            let (file, name) = quoted.split_once("::")?;
            let named = (file.starts_with("tests/") || file.starts_with("src/")) && file.ends_with(".rs");
            named.then(|| (file.to_owned(), name.to_owned()))
        })
        .collect()
}

/// Whether `source` defines `fn name(` as a test: a `#[test]` or `#[tokio::test]` among the attributes above it.
fn is_test_fn(source: &str, name: &str) -> bool {
    let Some(at) = source.find(&format!("fn {name}(")) else {
        return false;
    };
    // The lines above `fn` (after an `async ` on its line): attributes and doc comments, one of them the test's.
    source[..at]
        .trim_end()
        .trim_end_matches("async")
        .trim_end()
        .lines()
        .rev()
        .take_while(|line| {
            let line = line.trim();
            line.starts_with("#[") || line.starts_with("///")
        })
        .any(|line| line.trim().starts_with("#[test]") || line.trim().starts_with("#[tokio::test"))
}

#[test]
fn every_test_the_compliance_map_names_exists() {
    let named = named_tests(&document());
    assert!(named.len() >= 30, "the map names its tests: found {}", named.len());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let missing: Vec<String> = named
        .iter()
        .filter(|(file, name)| !is_test_fn(&std::fs::read_to_string(root.join(file)).unwrap_or_default(), name))
        .map(|(file, name)| format!("{file}::{name}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/compliance.md names tests that do not exist: {missing:?}"
    );
}

#[test]
fn every_promised_requirement_has_its_section() {
    let text = document();
    let requirements = [
        "Art. 5(1)(c)",
        "Art. 15",
        "Art. 16",
        "Art. 17",
        "Art. 20",
        "Art. 25",
        "Art. 30",
        "Art. 32",
        "Art. 33",
        "1798.100",
        "1798.105",
        "### 3.3",
        "### 3.4",
        "### 3.5",
        "### 3.6",
        "### 3.7",
        "### 10",
        "164.312(a)(2)(iv)",
        "164.312(b)",
        "164.312(e)(2)(ii)",
        "CC6.1",
        "CC7.2",
        "A.8.24",
        "A.8.15",
    ];
    let headings: Vec<&str> = text.lines().filter(|line| line.starts_with("### ")).collect();
    for requirement in requirements {
        assert!(
            headings.iter().any(|heading| heading.contains(requirement)),
            "docs/compliance.md has no section for {requirement}"
        );
    }
    // Each section says what piiwall does about it: meets, partly, or not.
    for section in text.split("\n### ").skip(1) {
        let verdict = ["**Meets", "**Partly", "**Not"].iter().any(|v| section.contains(v));
        assert!(
            verdict,
            "a section without a verdict: {}",
            section.lines().next().unwrap_or_default()
        );
    }
}

#[test]
fn a_test_name_that_does_not_exist_is_caught() {
    let named = named_tests("see `tests/stream.rs::no_such_test` and `src/http.rs::x` but not `keys.kek`");
    assert_eq!(
        named,
        [
            ("tests/stream.rs".to_owned(), "no_such_test".to_owned()),
            ("src/http.rs".to_owned(), "x".to_owned())
        ]
    );
    let source = "/// Helper.\nfn helper() {}\n\n#[test]\n#[ignore = \"slow\"]\nfn a_test() {}\n\n#[tokio::test]\nasync fn later() {}\n";
    assert!(is_test_fn(source, "a_test") && is_test_fn(source, "later"));
    assert!(!is_test_fn(source, "helper") && !is_test_fn(source, "no_such_test"));
}

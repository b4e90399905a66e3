//! Field-path patterns of schema-level `metadata.tags` (Confluent style).
//!
//! A pattern is a dotted path whose segments may be `*` (exactly one segment), `**` (any number of segments,
//! none included) or contain `*` as a wildcard inside one segment (`e*l`). Patterns are matched against the
//! field path (`address.street`) and against the same path behind the root record's full name
//! (`com.acme.Customer.address.street`), so both Confluent's qualified form and the short form work.

use crate::error::PolicyError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPattern {
    segments: Vec<String>,
}

impl TagPattern {
    pub fn parse(pattern: &str) -> Result<Self, PolicyError> {
        let segments: Vec<String> = pattern.split('.').map(str::to_owned).collect();
        if pattern.is_empty() || segments.iter().any(String::is_empty) {
            return Err(PolicyError::new(
                "",
                format!("metadata.tags: pattern `{pattern}` has an empty segment (write a.b, a.*, **.b)"),
            ));
        }
        Ok(Self { segments })
    }

    /// Whether the pattern matches `path` alone or `root_name` followed by `path`.
    pub fn matches(&self, root_name: &str, path: &str) -> bool {
        let path: Vec<&str> = path.split('.').collect();
        let qualified: Vec<&str> = root_name.split('.').chain(path.iter().copied()).collect();
        match_segments(&self.segments, &path) || match_segments(&self.segments, &qualified)
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => glob(first, segment) && match_segments(rest, path_rest),
            None => false,
        },
    }
}

/// `*` inside one segment matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((prefix, rest)) => {
            let Some(text) = text.strip_prefix(prefix) else {
                return false;
            };
            (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .any(|i| glob(rest, &text[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        TagPattern::parse(pattern).unwrap().matches("com.acme.Customer", path)
    }

    #[test]
    fn exact_and_wildcards() {
        assert!(m("email", "email"));
        assert!(!m("email", "address.email"));
        assert!(m("**.email", "address.email"));
        assert!(m("**.email", "email"));
        assert!(m("address.*", "address.street"));
        assert!(!m("address.*", "address.geo.lat"));
        assert!(m("address.**", "address.geo.lat"));
        assert!(m("com.acme.Customer.email", "email"));
        assert!(m("*.*.Customer.email", "email"));
        assert!(m("e*l", "email"));
        assert!(!m("e*x", "email"));
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert!(TagPattern::parse("a..b").is_err());
        assert!(TagPattern::parse("").is_err());
    }
}

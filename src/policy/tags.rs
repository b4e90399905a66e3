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

/// Whether `pattern` matches all of `path`: dynamic programming over (pattern segment, path segment), so many `**`
/// cost a product of the lengths, never an exponential.
fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    // rest[j]: the pattern from the current segment on matches path[j..]. Built from the last segment back.
    let mut rest: Vec<bool> = (0..=path.len()).map(|j| j == path.len()).collect();
    for segment in pattern.iter().rev() {
        let mut here = vec![false; path.len() + 1];
        for j in (0..=path.len()).rev() {
            here[j] = if segment == "**" {
                // None of path[j..] taken, or one more segment taken.
                rest[j] || (j < path.len() && here[j + 1])
            } else {
                j < path.len() && rest[j + 1] && glob(segment, path[j])
            };
        }
        rest = here;
    }
    rest[0]
}

/// `*` inside one segment matches any run of characters. Greedy with one backtrack point (the last `*`): time
/// proportional to the pattern's length times the text's at worst, however many `*` it holds.
fn glob(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    // After the last `*` seen: where the pattern resumes, and the next text position that star may take up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == '*' {
            star = Some((p + 1, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((resume, taken)) = star {
            // The last star takes one more character; the pattern resumes after it.
            star = Some((resume, taken + 1));
            p = resume;
            t = taken + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
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

    /// Found by an hour-long schema fuzz run: a tag pattern of many `*` (or many `**` segments) took exponential
    /// time to match, so one registered schema could stall its topic's lane. Matching is now polynomial.
    #[test]
    fn patterns_of_many_wildcards_match_in_polynomial_time() {
        let stars = format!("**.us{}]]]]]]{}er_agent", "*".repeat(60), "*".repeat(40));
        assert!(!m(&stars, "user_agent_"));
        assert!(m(&stars, "a.b.us_x]]]]]]yer_agent"));
        let globstars = vec!["**"; 40].join(".") + ".x";
        assert!(!m(&globstars, &vec!["a"; 60].join(".")));
        assert!(m(&globstars, &(vec!["a"; 60].join(".") + ".x")));
        assert!(m("*a*b*c*", "xaybzc") && !m("*a*b*c*", "xaybz"));
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert!(TagPattern::parse("a..b").is_err());
        assert!(TagPattern::parse("").is_err());
    }
}

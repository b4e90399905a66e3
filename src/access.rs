//! Who may do what in the subject-rights API: bearer tokens → principals → roles → (operations, field paths,
//! purposes). Deny by default. A module of its own, depending on neither: `config` parses into these types and
//! `api` checks requests against them.
//!
//! Config holds SHA-256 digests of tokens, never tokens. A presented token is digested and compared with every
//! principal's digest in constant time (no early exit), so timing tells nothing about which digest was close.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// An operation of the subject-rights API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Reveal,
    Tokenize,
    Forget,
    Status,
    Rotate,
    Export,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Operation::Reveal,
        Operation::Tokenize,
        Operation::Forget,
        Operation::Status,
        Operation::Rotate,
        Operation::Export,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Reveal => "reveal",
            Operation::Tokenize => "tokenize",
            Operation::Forget => "forget",
            Operation::Status => "status",
            Operation::Rotate => "rotate",
            Operation::Export => "export",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether requests of this operation name field paths (checked against the role's `fields`).
    pub fn has_fields(self) -> bool {
        matches!(self, Operation::Reveal | Operation::Tokenize)
    }
}

/// A caller, as configured.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    /// SHA-256 of the bearer token.
    pub token_digest: [u8; 32],
    pub roles: Vec<String>,
    /// Unix seconds after which the token is refused.
    pub expires: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub operations: BTreeSet<Operation>,
    /// Field paths (or annotation kinds) with `*` for one path segment and `**` for any number of them.
    pub fields: Vec<String>,
    /// Purposes a caller in this role may state; `*` allows any.
    pub purposes: Vec<String>,
}

/// The access policy of the API.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    pub principals: Vec<Principal>,
    pub roles: BTreeMap<String, Role>,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 401: no bearer token, or one no principal holds, or an expired one.
    Unauthenticated(&'static str),
    /// 403: the principal's roles do not allow this.
    Forbidden(String),
}

impl AccessPolicy {
    /// The principal holding `token`, compared in constant time against every configured digest.
    pub fn authenticate(&self, token: Option<&str>, now_secs: i64) -> Result<&Principal, Denial> {
        let token = token.ok_or(Denial::Unauthenticated("no bearer token"))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for principal in &self.principals {
            if bool::from(principal.token_digest.ct_eq(&digest)) {
                found = Some(principal);
            }
        }
        let principal = found.ok_or(Denial::Unauthenticated("unknown bearer token"))?;
        if principal.expires.is_some_and(|at| now_secs >= at) {
            return Err(Denial::Unauthenticated("expired bearer token"));
        }
        Ok(principal)
    }

    /// The field patterns whose originals the principal may see in an `operation` for `purpose`: the fields of
    /// every role that allows the operation for that purpose.
    pub fn visible_fields(&self, principal: &Principal, operation: Operation, purpose: &str) -> Vec<String> {
        principal
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .filter(|role| {
                role.operations.contains(&operation) && role.purposes.iter().any(|p| p == "*" || p == purpose)
            })
            .flat_map(|role| role.fields.iter().cloned())
            .collect()
    }

    /// Allows `operation` for `purpose` on every one of `fields` when one of the principal's roles allows all of it.
    pub fn authorize(
        &self,
        principal: &Principal,
        operation: Operation,
        purpose: &str,
        fields: &[&str],
    ) -> Result<(), Denial> {
        let allowed = principal.roles.iter().filter_map(|r| self.roles.get(r)).any(|role| {
            role.operations.contains(&operation)
                && role.purposes.iter().any(|p| p == "*" || p == purpose)
                && fields
                    .iter()
                    .all(|field| role.fields.iter().any(|pattern| path_matches(pattern, field)))
        });
        if allowed {
            Ok(())
        } else {
            Err(Denial::Forbidden(format!(
                "principal {} may not {} {}for this purpose",
                principal.name,
                operation.name(),
                if operation.has_fields() { "these fields " } else { "" }
            )))
        }
    }
}

/// Whether a dotted field path matches a pattern: `*` matches one segment, `**` any number (including none).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    fn go(pattern: &[&str], path: &[&str]) -> bool {
        match pattern.split_first() {
            None => path.is_empty(),
            Some((&"**", rest)) => (0..=path.len()).any(|skip| go(rest, &path[skip..])),
            Some((head, rest)) => path
                .split_first()
                .is_some_and(|(segment, tail)| (*head == "*" || head == segment) && go(rest, tail)),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let path: Vec<&str> = path.split('.').collect();
    go(&pattern, &path)
}

/// The SHA-256 digest of a token as lowercase hex: what config holds (`piiwall api digest` prints it).
pub fn token_digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC) into Unix seconds.
pub fn parse_utc(text: &str) -> Option<i64> {
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time.strip_suffix('Z')?)),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (parts.next()??, parts.next()??, parts.next()??);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let seconds = match time {
        None => 0,
        Some(time) => {
            let mut parts = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
            let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
            if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&s) {
                return None;
            }
            h * 3600 + m * 60 + s
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400 + seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_segments() {
        assert!(path_matches("email", "email"));
        assert!(!path_matches("email", "emails"));
        assert!(path_matches("address.*", "address.street"));
        assert!(!path_matches("address.*", "address.geo.lat"));
        assert!(path_matches("address.**", "address.geo.lat"));
        assert!(path_matches("**", "anything.at.all"));
        assert!(path_matches("**.iban", "payment.card.iban"));
        assert!(!path_matches("*", "a.b"));
    }

    #[test]
    fn dates_parse_to_unix_seconds() {
        assert_eq!(parse_utc("1970-01-01"), Some(0));
        assert_eq!(parse_utc("2026-11-26T12:00:00Z"), Some(1_795_694_400));
        assert_eq!(parse_utc("2026-13-01"), None);
        assert_eq!(parse_utc("2026-11-26T12:00:00"), None);
    }

    #[test]
    fn tokens_authenticate_by_digest_and_expire() {
        let principal = |name: &str, token: &str, expires| Principal {
            name: name.into(),
            token_digest: Sha256::digest(token.as_bytes()).into(),
            roles: vec![],
            expires,
        };
        let policy = AccessPolicy {
            principals: vec![principal("a", "token-a", None), principal("b", "token-b", Some(100))],
            roles: BTreeMap::new(),
        };
        assert_eq!(policy.authenticate(Some("token-a"), 0).unwrap().name, "a");
        assert_eq!(policy.authenticate(Some("token-b"), 99).unwrap().name, "b");
        assert!(matches!(
            policy.authenticate(Some("token-b"), 100),
            Err(Denial::Unauthenticated(_))
        ));
        assert!(matches!(
            policy.authenticate(Some("token-c"), 0),
            Err(Denial::Unauthenticated(_))
        ));
        assert!(matches!(policy.authenticate(None, 0), Err(Denial::Unauthenticated(_))));
    }
}

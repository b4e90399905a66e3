//! What to do with detections: `policy.detect`, per detector and per field.

use std::collections::BTreeMap;

use super::{Detectors, Kind};

/// What a detection in an unannotated field does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DetectMode {
    /// Nothing is looked for.
    Off,
    /// Counted (metrics and processing-summary audit events, never the value); the record goes out as it is.
    Report,
    /// The detected span is replaced by `[email]`, `[card]` ...; the rest of the text is kept.
    Redact,
    /// The record goes to quarantine, with the field path and the detector as its reason.
    Quarantine,
}

impl DetectMode {
    pub const NAMES: &str = "off, report, redact or quarantine";

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "off" => DetectMode::Off,
            "report" => DetectMode::Report,
            "redact" => DetectMode::Redact,
            "quarantine" => DetectMode::Quarantine,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DetectMode::Off => "off",
            DetectMode::Report => "report",
            DetectMode::Redact => "redact",
            DetectMode::Quarantine => "quarantine",
        }
    }
}

/// `[policy.detect]`: a mode, overridden per detector, overridden in turn per field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectPolicy {
    pub mode: DetectMode,
    pub detectors: BTreeMap<Kind, DetectMode>,
    /// By field path as rules name them (`address.street`); the items of an array and the keys and values of a
    /// map share their field's path.
    pub fields: BTreeMap<String, DetectMode>,
}

impl Default for DetectPolicy {
    fn default() -> Self {
        Self {
            mode: DetectMode::Report,
            detectors: BTreeMap::new(),
            fields: BTreeMap::new(),
        }
    }
}

/// The detectors a field runs, grouped by what their detections do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDetectors {
    pub report: Detectors,
    pub redact: Detectors,
    pub quarantine: Detectors,
}

impl FieldDetectors {
    /// The same detectors for a map's keys: what would be redacted quarantines (see [`DetectPolicy::for_keys`]).
    pub fn for_keys(self) -> Self {
        Self {
            report: self.report,
            redact: Detectors::NONE,
            quarantine: Detectors(self.quarantine.0 | self.redact.0),
        }
    }

    pub fn all(&self) -> Detectors {
        Detectors(self.report.0 | self.redact.0 | self.quarantine.0)
    }

    pub fn mode_of(&self, kind: Kind) -> DetectMode {
        if self.quarantine.contains(kind) {
            DetectMode::Quarantine
        } else if self.redact.contains(kind) {
            DetectMode::Redact
        } else if self.report.contains(kind) {
            DetectMode::Report
        } else {
            DetectMode::Off
        }
    }
}

impl DetectPolicy {
    /// The policy for keys — a map's keys, a record key's fields: a key is never rewritten, since two keys would
    /// become one (a map loses an entry, compaction deletes another entity's record). What the policy would redact
    /// sends the record to quarantine instead; fail closed, never released in clear.
    pub fn for_keys(&self) -> Self {
        self.map_modes(|mode| match mode {
            DetectMode::Redact => DetectMode::Quarantine,
            other => other,
        })
    }

    /// Every detector that is not off only reports (for `schema check --sample`, which names fields to annotate
    /// and changes nothing), keeping what the policy silences silent.
    pub fn reporting(&self) -> Self {
        self.map_modes(|mode| match mode {
            DetectMode::Off => DetectMode::Off,
            _ => DetectMode::Report,
        })
    }

    /// The same policy with every mode (default, per detector, per field) passed through `f`.
    fn map_modes(&self, f: impl Fn(DetectMode) -> DetectMode) -> Self {
        Self {
            mode: f(self.mode),
            detectors: self.detectors.iter().map(|(k, m)| (*k, f(*m))).collect(),
            fields: self.fields.iter().map(|(p, m)| (p.clone(), f(*m))).collect(),
        }
    }

    /// Nothing anywhere is looked for.
    pub fn is_off(&self) -> bool {
        self.mode == DetectMode::Off
            && self.detectors.values().all(|m| *m == DetectMode::Off)
            && self.fields.values().all(|m| *m == DetectMode::Off)
    }

    /// The detectors of the field at `path`: the field's mode when it has one, else each detector's.
    pub fn for_field(&self, path: &str) -> FieldDetectors {
        let mut field = FieldDetectors {
            report: Detectors::NONE,
            redact: Detectors::NONE,
            quarantine: Detectors::NONE,
        };
        for kind in Kind::ALL {
            let mode = self
                .fields
                .get(path)
                .or_else(|| self.detectors.get(&kind))
                .copied()
                .unwrap_or(self.mode);
            match mode {
                DetectMode::Off => {}
                DetectMode::Report => field.report = field.report.with(kind),
                DetectMode::Redact => field.redact = field.redact.with(kind),
                DetectMode::Quarantine => field.quarantine = field.quarantine.with(kind),
            }
        }
        field
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fields_mode_overrides_a_detectors_which_overrides_the_default() {
        let policy = DetectPolicy {
            mode: DetectMode::Redact,
            detectors: BTreeMap::from([(Kind::Ip, DetectMode::Off), (Kind::Card, DetectMode::Quarantine)]),
            fields: BTreeMap::from([("order.reference".to_owned(), DetectMode::Off)]),
        };
        let notes = policy.for_field("notes");
        assert_eq!(notes.mode_of(Kind::Email), DetectMode::Redact);
        assert_eq!(notes.mode_of(Kind::Ip), DetectMode::Off);
        assert_eq!(notes.mode_of(Kind::Card), DetectMode::Quarantine);
        assert!(policy.for_field("order.reference").all().is_empty());
        assert!(!policy.is_off());
        assert!(
            DetectPolicy {
                mode: DetectMode::Off,
                ..DetectPolicy::default()
            }
            .is_off()
        );
    }

    /// Keys are never rewritten: redact becomes quarantine there. A sample check only reports, and keeps silent
    /// what the policy silences (its advice to silence a field must work).
    #[test]
    fn keys_never_redact_and_sample_checks_only_report() {
        let policy = DetectPolicy {
            mode: DetectMode::Redact,
            detectors: BTreeMap::from([(Kind::Ip, DetectMode::Off)]),
            fields: BTreeMap::from([("order.reference".to_owned(), DetectMode::Off)]),
        };
        let keys = policy.for_keys().for_field("labels");
        assert_eq!(keys.mode_of(Kind::Email), DetectMode::Quarantine);
        assert!(keys.redact.is_empty());
        let sample = policy.reporting();
        assert_eq!(sample.for_field("notes").mode_of(Kind::Email), DetectMode::Report);
        assert!(sample.for_field("order.reference").all().is_empty());
        assert_eq!(sample.for_field("notes").mode_of(Kind::Ip), DetectMode::Off);
    }
}

//! `piiwall report processing`: an audit topic's events since a date, summed into the view of GDPR Art. 30 (records
//! of processing activities): per topic, the fields and what was done to them with counts; the records quarantined;
//! the subject-rights calls (reveal, tokenize, forget, status) by kind, purpose, principal and outcome; the keys
//! made, rotated and destroyed. Events carry no values, so neither does the report; subjects appear nowhere (not even
//! as their audit pseudonyms).

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::reader::datum::GenericDatumReader;
use rdkafka::{ClientConfig, Message};
use serde_json::{Value as Json, json};

use super::event::AUDIT_SCHEMA;
use crate::codec::json::JsonCodec;
use crate::error::Error;

/// How long reading an audit topic to its end may take.
const READ_DEADLINE: Duration = Duration::from_secs(300);

/// The audit trail of a period, summed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessingReport {
    /// Events at or after this time (ms since 1970-01-01 UTC) were counted.
    pub since_ms: i64,
    /// Events read, and of those counted.
    pub read: usize,
    pub counted: usize,
    /// The first and last counted event's time.
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    /// (topic, field path, action) -> records, from the processing summaries.
    pub processing: BTreeMap<(String, String, String), i64>,
    /// Topic -> records quarantined.
    pub quarantined: BTreeMap<String, i64>,
    /// (kind, purpose, principal, outcome) -> calls of the subject-rights API and the local commands.
    pub calls: BTreeMap<(String, String, String, String), i64>,
    /// Key event kind -> keys (the event's counts where it has them, else one per event).
    pub keys: BTreeMap<String, i64>,
    /// Events that do not decode as audit events (their position), never counted.
    pub undecodable: Vec<String>,
    /// Events read twice (an at-least-once writer may write one again): counted once.
    pub duplicates: usize,
    seen: std::collections::HashSet<String>,
}

const CALLS: [&str; 4] = ["REVEAL", "TOKENIZE", "FORGET", "SUBJECT_STATUS"];
const KEYS: [&str; 4] = ["KEY_CREATED", "KEY_ROTATED", "KEY_SHREDDED", "KEK_REWRAPPED"];

/// Reads `topic` from its start to its end and sums the events at or after `since_ms`.
pub fn processing_report(client: &ClientConfig, topic: &str, since_ms: i64) -> Result<ProcessingReport, Error> {
    let reader = GenericDatumReader::builder(&AUDIT_SCHEMA)
        .build()
        .expect("the audit schema resolves");
    let json = JsonCodec::new(&AUDIT_SCHEMA);
    let mut report = ProcessingReport {
        since_ms,
        ..ProcessingReport::default()
    };
    crate::topic_reader::read_topic(client, topic, "audit topic", READ_DEADLINE, |message| {
        report.read += 1;
        let mut payload = message.payload().unwrap_or_default();
        match reader.read_value(&mut payload) {
            Ok(value) => report.add(&json.to_json(&value)),
            Err(_) => report.undecodable.push(format!(
                "partition {}, offset {}",
                message.partition(),
                message.offset()
            )),
        }
        Ok(())
    })?;
    Ok(report)
}

impl ProcessingReport {
    fn add(&mut self, event: &Json) {
        let ts = event["ts"].as_i64().unwrap_or(i64::MIN);
        if ts < self.since_ms {
            return;
        }
        if let Some(id) = event["event_id"].as_str()
            && !self.seen.insert(id.to_owned())
        {
            self.duplicates += 1;
            return;
        }
        self.counted += 1;
        self.first_ms = Some(self.first_ms.map_or(ts, |first| first.min(ts)));
        self.last_ms = Some(self.last_ms.map_or(ts, |last| last.max(ts)));
        let text = |name: &str| event[name].as_str().unwrap_or("-").to_owned();
        let kind = text("kind");
        let counts = event["counts"].as_array().map(Vec::as_slice).unwrap_or_default();
        match kind.as_str() {
            "PROCESSING_SUMMARY" => {
                for count in counts {
                    let key = (text("topic"), str_of(&count["field_path"]), str_of(&count["action"]));
                    *self.processing.entry(key).or_default() += count["count"].as_i64().unwrap_or(0);
                }
            }
            "QUARANTINE" => *self.quarantined.entry(text("topic")).or_default() += 1,
            _ => {
                let outcome = event["outcome"].as_str();
                // An API or command-line call (it has an outcome): counted as a call, whatever its kind.
                if CALLS.contains(&kind.as_str()) || outcome.is_some() {
                    *self
                        .calls
                        .entry((kind.clone(), text("purpose"), text("principal"), text("outcome")))
                        .or_default() += 1;
                }
                // Keys, only for what happened: a denied or failed rotation rotated nothing.
                if KEYS.contains(&kind.as_str()) && matches!(outcome, None | Some("ALLOWED")) {
                    let keys: i64 = counts
                        .iter()
                        .filter(|c| kind != "KEK_REWRAPPED" || c["action"] == "rewrapped")
                        .filter_map(|c| c["count"].as_i64())
                        .sum();
                    *self.keys.entry(kind.clone()).or_default() += if counts.is_empty() { 1 } else { keys };
                }
            }
        }
    }

    /// The report as one JSON document (`--json`).
    pub fn to_json(&self) -> Json {
        json!({
            "since_ms": self.since_ms,
            "events_read": self.read,
            "events_counted": self.counted,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
            "processing": self.processing.iter().map(|((topic, field, action), records)| json!({
                "topic": topic, "field": field, "action": action, "records": records
            })).collect::<Vec<_>>(),
            "quarantined": self.quarantined.iter().map(|(topic, records)| json!({
                "topic": topic, "records": records
            })).collect::<Vec<_>>(),
            "calls": self.calls.iter().map(|((kind, purpose, principal, outcome), calls)| json!({
                "kind": kind, "purpose": purpose, "principal": principal, "outcome": outcome, "calls": calls
            })).collect::<Vec<_>>(),
            "keys": self.keys,
            "duplicates": self.duplicates,
            "undecodable": self.undecodable,
        })
    }

    /// The report as text for a reader.
    pub fn render(&self) -> String {
        let mut out = format!(
            "Records of processing (GDPR Art. 30) from the audit trail: {} of {} events since {} ms\n",
            self.counted, self.read, self.since_ms
        );
        let mut section = |title: &str, rows: Vec<String>| {
            out.push_str(&format!("\n{title}\n"));
            if rows.is_empty() {
                out.push_str("  (none)\n");
            }
            for row in rows {
                out.push_str(&format!("  {row}\n"));
            }
        };
        section(
            "Processing: topic, field, action, records",
            self.processing
                .iter()
                .map(|((topic, field, action), n)| format!("{topic}  {field}  {action}  {n}"))
                .collect(),
        );
        section(
            "Quarantined: topic, records",
            self.quarantined
                .iter()
                .map(|(topic, n)| format!("{topic}  {n}"))
                .collect(),
        );
        section(
            "Subject-rights calls: kind, purpose, principal, outcome, calls",
            self.calls
                .iter()
                // Purposes and principal names are free text a caller chose: quoted, so none can forge a row.
                .map(|((kind, purpose, principal, outcome), n)| {
                    format!("{kind}  {purpose:?}  {principal:?}  {outcome}  {n}")
                })
                .collect(),
        );
        section(
            "Keys: event, keys",
            self.keys.iter().map(|(kind, n)| format!("{kind}  {n}")).collect(),
        );
        if !self.undecodable.is_empty() {
            section("Not audit events (not counted)", self.undecodable.clone());
        }
        out
    }
}

fn str_of(value: &Json) -> String {
    value.as_str().unwrap_or("-").to_owned()
}

/// Midnight UTC at the start of `date` (`YYYY-MM-DD`), in ms since 1970-01-01.
pub fn date_ms(date: &str) -> Result<i64, String> {
    let invalid = || format!("{date:?} is not a date: write YYYY-MM-DD (UTC)");
    let digits = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_digit());
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    if !(digits(y, 4) && digits(m, 2) && digits(d, 2)) {
        return Err(invalid());
    }
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = |y: i64, m: i64| match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let (y, m, d): (i64, i64, i64) = match (y.parse::<i64>(), m.parse::<i64>(), d.parse::<i64>()) {
        (Ok(y), Ok(m), Ok(d))
            if (1000..=9999).contains(&y) && (1..=12).contains(&m) && d >= 1 && d <= days_in(y, m) =>
        {
            (y, m, d)
        }
        _ => return Err(invalid()),
    };
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(date_ms("1970-01-01"), Ok(0));
        assert_eq!(date_ms("2000-03-01"), Ok(951_868_800_000));
        assert_eq!(date_ms("2026-12-06"), Ok(1_796_515_200_000));
        assert_eq!(date_ms("2024-02-29"), Ok(1_709_164_800_000));
        for bad in [
            "2026-13-01",
            "26-01-01",
            "2026/01/01",
            "yesterday",
            "2026-01",
            "2026-02-31",
            "2025-02-29",
            "2026-1-1",
            "+2026-01-01",
            "2026-01-01-01",
        ] {
            assert!(date_ms(bad).unwrap_err().contains("YYYY-MM-DD"), "{bad}");
        }
    }

    #[test]
    fn events_are_summed_by_topic_field_action_and_by_call_and_earlier_ones_left_out() {
        let mut report = ProcessingReport {
            since_ms: 1_000,
            ..ProcessingReport::default()
        };
        let summary = |ts: i64, n: i64| {
            json!({"ts": ts, "kind": "PROCESSING_SUMMARY", "topic": "orders",
                   "counts": [{"field_path": "email", "action": "tokenize", "count": n}]})
        };
        report.add(&summary(999, 5));
        report.add(&summary(1_000, 7));
        report.add(&summary(2_000, 3));
        report.add(
            &json!({"ts": 1_500, "kind": "REVEAL", "purpose": "fraud review", "principal": "ana",
                           "outcome": "ALLOWED", "counts": []}),
        );
        report.add(
            &json!({"ts": 1_600, "kind": "KEY_CREATED", "counts": [{"field_path": "subject",
                           "action": "key created", "count": 4}]}),
        );
        report.add(&json!({"ts": 1_700, "kind": "QUARANTINE", "topic": "orders", "counts": []}));
        // Written twice by an at-least-once writer: once.
        let twice = json!({"ts": 1_800, "event_id": "e-1", "kind": "FORGET", "purpose": "erasure", "principal": "ana",
                           "outcome": "ALLOWED", "counts": []});
        report.add(&twice);
        report.add(&twice);
        // A denied rotation: a call, no key rotated.
        report.add(
            &json!({"ts": 1_900, "kind": "KEY_ROTATED", "purpose": "p", "principal": "eve",
                           "outcome": "DENIED", "counts": []}),
        );
        assert_eq!((report.counted, report.duplicates), (7, 1));
        assert_eq!(
            report.calls[&("FORGET".into(), "erasure".into(), "ana".into(), "ALLOWED".into())],
            1
        );
        assert_eq!(
            report.calls[&("KEY_ROTATED".into(), "p".into(), "eve".into(), "DENIED".into())],
            1
        );
        assert!(
            !report.keys.contains_key("KEY_ROTATED"),
            "a denied rotation rotated nothing"
        );
        assert_eq!((report.first_ms, report.last_ms), (Some(1_000), Some(2_000)));
        assert_eq!(
            report.processing[&("orders".into(), "email".into(), "tokenize".into())],
            10,
            "the summary before `since` is left out"
        );
        assert_eq!(
            report.calls[&("REVEAL".into(), "fraud review".into(), "ana".into(), "ALLOWED".into())],
            1
        );
        assert_eq!(report.keys["KEY_CREATED"], 4);
        assert_eq!(report.quarantined["orders"], 1);
        let text = report.render();
        assert!(text.contains("orders  email  tokenize  10"), "{text}");
        assert!(text.contains("REVEAL  \"fraud review\"  \"ana\"  ALLOWED  1"), "{text}");
    }
}

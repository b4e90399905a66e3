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
    crate::stream::read_topic(client, topic, "audit topic", READ_DEADLINE, |message| {
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
            call if CALLS.contains(&call) => {
                *self
                    .calls
                    .entry((kind.clone(), text("purpose"), text("principal"), text("outcome")))
                    .or_default() += 1;
            }
            key if KEYS.contains(&key) => {
                let keys: i64 = counts.iter().filter_map(|c| c["count"].as_i64()).sum();
                *self.keys.entry(kind.clone()).or_default() += if counts.is_empty() { 1 } else { keys };
            }
            _ => {}
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
                .map(|((kind, purpose, principal, outcome), n)| {
                    format!("{kind}  {purpose}  {principal}  {outcome}  {n}")
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
    let mut parts = date.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let (y, m, d): (i64, i64, i64) = match (y.parse::<i64>(), m.parse::<i64>(), d.parse::<i64>()) {
        (Ok(y), Ok(m), Ok(d)) if (1000..=9999).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d) => {
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
        for bad in ["2026-13-01", "26-01-01", "2026/01/01", "yesterday", "2026-01"] {
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
        assert_eq!(report.counted, 5);
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
        assert!(text.contains("orders  email  tokenize  10") && text.contains("REVEAL  fraud review  ana  ALLOWED  1"));
    }
}

//! Subject access export (GDPR Art. 15 and 20): one data subject's records in sanitized topics, with the protected
//! fields the caller may see revealed, as one machine-readable JSON document.
//!
//! Finding the records reveals nothing else: every token and ciphertext names the data key that made it
//! (`<prefix>.<key id>.<payload>`, `docs/token-format.md`), and a subject's records are sanitized under its own keys.
//! So a record is a candidate when its bytes hold a token of one of the subject's key ids (a byte search, no
//! parsing), and it is the subject's when its subject field (`pii.subject`) holds such a token. Only those records
//! are decoded and revealed. A record whose tokens name keys a forget destroyed belongs to a forgotten subject: it
//! is counted as erased (it can no longer be attributed to anyone, so it is not listed by coordinates).
//!
//! A sanitized record is read by its writer schema's plan (which field has which action and reveal context): its
//! `piiwall.source.topic` and `piiwall.schema.id` headers name the input topic and the writer schema id. Records
//! written before piiwall wrote the schema id header are read by their topic's local binding when it has one, else
//! counted as unreadable.
//!
//! The document is written as the scan goes (memory stays bounded whatever the topic's size): records first, then
//! per-topic counts, then whether the scan is complete and, when a deadline or a record limit stopped it, the resume
//! point (the next offset of every partition) to continue from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use serde_json::{Value as Json, json};

use crate::codec::json::JsonCodec;
use crate::crypto::KeyId;
use crate::error::{Error, KeyError, RevealError, ValueError};
use crate::keys::{KeyLookup, Keyring};
use crate::policy::{Action, Rule};
use crate::sanitize::Sanitizer;
use crate::stream::{Routes, SCHEMA_ID, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, header_text};

/// The document's format name.
pub const FORMAT: &str = "piiwall.subject-export/1";

/// How long the reads may stay silent, with partitions short of their end, before the export stops incomplete (a
/// stalled read: a leader failover, a slow cold read).
const QUIET_END: Duration = Duration::from_secs(3);
/// The longest a topic read to its end is drained of records already fetched.
const DRAIN: Duration = Duration::from_millis(500);
/// Key ids whose fate (destroyed or not) is remembered during one export; the memo is emptied when full.
const MAX_REMEMBERED_KEYS: usize = 1_000_000;
/// Distinct key ids looked at in one record (so at most this many key-store lookups per record, each remembered).
/// A record with more (real ones carry one or two: the subject's, a domain's)
/// holds text made to look like tokens: it is decoded and its subject field decides, as for a candidate, instead of
/// costing a key-store lookup per fake id.
const MAX_KEY_IDS_PER_RECORD: usize = 4;

/// Where to continue an export: per topic, per partition, the next offset to read.
pub type ResumePoint = BTreeMap<String, BTreeMap<i32, i64>>;

/// What a caller asks for.
pub struct ExportRequest<'a> {
    pub subject: &'a str,
    /// Sanitized topics to search.
    pub topics: &'a [String],
    /// Continue where an earlier export of the same subject and topics stopped.
    pub resume: &'a ResumePoint,
    /// Whether the caller may see the original of a protected value, by the context it is bound to (as `reveal`
    /// is asked: the field path or the annotation's kind; `<context>#key` for a map's keys).
    pub may_see: &'a (dyn Fn(&str) -> bool + Sync),
    /// Stop (incomplete, with a resume point) at this instant.
    pub deadline: Option<Instant>,
    /// Stop (incomplete, with a resume point) after this many of the subject's records.
    pub max_records: Option<u64>,
    /// Stop (incomplete, with a resume point) once the records written reach this many bytes.
    pub max_bytes: Option<u64>,
    /// Stop (incomplete, with a resume point) once this is set (an interrupt).
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

/// What an export found, for its caller's summary and audit event (no value, no subject id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub status: &'static str,
    pub complete: bool,
    pub scanned: u64,
    pub records: u64,
    pub erased: u64,
    pub unreadable: u64,
    pub resume: ResumePoint,
}

/// Progress of a scan: records read so far and the number to read in all (from the watermarks, approximate).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// The parts an export reads with.
pub struct Exporter<'a> {
    pub sanitizer: &'a Sanitizer,
    /// The pipeline's routes: the writer schemas (and plans) of its input topics.
    pub routes: &'a Routes,
    /// Brokers and the `[kafka.properties]` passthrough.
    pub client: &'a ClientConfig,
    /// For registry lookups of writer schemas.
    pub runtime: &'a tokio::runtime::Handle,
}

/// Per-topic counts.
#[derive(Default)]
struct TopicCounts {
    scanned: u64,
    records: u64,
    erased: u64,
    unreadable: u64,
}

impl Exporter<'_> {
    /// Writes the export document of `request` to `out`. Errors (brokers, key store) are returned as they come;
    /// what was written before stays a prefix of a document that a retry with the resume point completes.
    pub fn export(
        &self,
        request: &ExportRequest<'_>,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<ExportSummary, Error> {
        let keyring = self.sanitizer.keyring();
        let status = keyring.subject_status_as_exported(request.subject)?;
        let ours: HashSet<KeyId> = keyring.subject_key_ids(request.subject)?.into_iter().collect();
        let status_name = if status.forgotten {
            "erased"
        } else if ours.is_empty() {
            "unknown"
        } else {
            "known"
        };
        let io = |e: std::io::Error| Error::io("writing the export", e);
        write!(
            out,
            "{{\"format\":{},\"generated_at\":{},\"subject\":{},\"status\":{},\"records\":[",
            json!(FORMAT),
            json!(crate::receipt::utc_timestamp(crate::audit::now_ms() / 1000)),
            json!(request.subject),
            json!(status_name),
        )
        .map_err(io)?;
        let mut scan = Scan {
            exporter: self,
            request,
            classifier: Classifier::new(keyring, ours),
            first: true,
            found: 0,
            written: 0,
        };
        let mut summary = ExportSummary {
            status: status_name,
            complete: true,
            ..Default::default()
        };
        let mut counts = Vec::new();
        let mut stopped = false;
        let mut failure = None;
        for topic in request.topics {
            let mut topic_counts = TopicCounts::default();
            let mut next = request.resume.get(topic).cloned().unwrap_or_default();
            // A subject with no keys and no forget has no record anywhere: nothing to read.
            let finished = if status_name == "unknown" {
                true
            } else if stopped || scan.must_stop() {
                false
            } else {
                match scan.topic(topic, &mut next, &mut topic_counts, out, progress) {
                    Ok(finished) => finished,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            };
            if !finished {
                stopped = true;
                summary.complete = false;
            }
            // Every topic's position, those read to their end too: a resumed export starts each where it was.
            summary.resume.insert(topic.clone(), next);
            summary.scanned += topic_counts.scanned;
            summary.records += topic_counts.records;
            summary.erased += topic_counts.erased;
            summary.unreadable += topic_counts.unreadable;
            counts.push(json!({
                "topic": topic,
                "scanned": topic_counts.scanned,
                "records": topic_counts.records,
                "erased_records": topic_counts.erased,
                "unreadable": topic_counts.unreadable,
            }));
        }
        let mut tail = json!({
            "topics": counts,
            "erased_records_mean": "records sanitized under keys that a forget destroyed: they belonged to forgotten \
                data subjects and can no longer be read or attributed to anyone",
            "complete": summary.complete,
        });
        if summary.complete {
            summary.resume.clear();
        } else {
            tail["resume"] = serde_json::to_value(&summary.resume).unwrap_or(Json::Null);
        }
        if let Some(e) = &failure {
            // The document goes to the data subject: a fixed sentence, the error itself to the log.
            tracing::warn!(error = %e, "a subject export stopped on an error");
            tail["error"] = json!(match e.kind() {
                crate::error::ErrorKind::Retriable => {
                    "a dependency (the key store, the KEK provider or the schema registry) did not answer; \
                     continue from the resume point later"
                }
                _ if matches!(e, Error::Kafka(_)) => {
                    "the brokers failed a read; continue from the resume point later"
                }
                _ => "the export failed; the piiwall log says why",
            });
        }
        // The tail's members follow the records array.
        let tail = tail.to_string();
        write!(out, "],{}", &tail[1..]).map_err(io)?;
        out.flush().map_err(io)?;
        match failure {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// What a record's bytes say about it, before any decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// It holds a token of one of the subject's keys: it may be the subject's (its subject field decides).
    Candidate,
    /// It holds a token of a key a forget destroyed: a forgotten subject's record.
    Erased,
    /// Anything else: another subject's record, or one with no token.
    Other,
}

/// Sorts records by their bytes alone: the tokens' key ids against the subject's, and against the keys destroyed
/// (looked up once each in the key store, then remembered).
pub struct Classifier<'k> {
    keyring: &'k Keyring,
    /// The subject's key ids.
    ours: HashSet<KeyId>,
    /// Key ids looked up so far: whether a forget destroyed each.
    destroyed: HashMap<KeyId, bool>,
}

impl<'k> Classifier<'k> {
    pub fn new(keyring: &'k Keyring, ours: HashSet<KeyId>) -> Self {
        Self {
            keyring,
            ours,
            destroyed: HashMap::new(),
        }
    }

    /// Whether a token of this key id is the subject's.
    pub fn is_ours(&self, id: &KeyId) -> bool {
        self.ours.contains(id)
    }

    pub fn classify(&mut self, bytes: &[u8]) -> Result<Class, Error> {
        let ids = key_ids_in(bytes, MAX_KEY_IDS_PER_RECORD + 1);
        if ids.len() > MAX_KEY_IDS_PER_RECORD || ids.iter().any(|id| self.ours.contains(id)) {
            return Ok(Class::Candidate);
        }
        for id in ids {
            if self.is_destroyed(id)? {
                return Ok(Class::Erased);
            }
        }
        Ok(Class::Other)
    }

    /// Whether a forget destroyed the key `id` (remembered for the rest of the export).
    fn is_destroyed(&mut self, id: KeyId) -> Result<bool, Error> {
        if let Some(&known) = self.destroyed.get(&id) {
            return Ok(known);
        }
        let destroyed = matches!(self.keyring.lookup_key(id)?, KeyLookup::Shredded);
        if self.destroyed.len() >= MAX_REMEMBERED_KEYS {
            self.destroyed.clear();
        }
        self.destroyed.insert(id, destroyed);
        Ok(destroyed)
    }
}

/// One export's state across topics.
struct Scan<'a, 'r> {
    exporter: &'a Exporter<'a>,
    request: &'a ExportRequest<'r>,
    classifier: Classifier<'a>,
    /// No record written yet (no comma before the next).
    first: bool,
    /// The subject's records found so far, in all topics.
    found: u64,
    /// The bytes of the records written so far.
    written: u64,
}

impl Scan<'_, '_> {
    /// The deadline, the record or byte limit, or a cancel says to stop here.
    fn must_stop(&self) -> bool {
        let request = self.request;
        request.deadline.is_some_and(|at| Instant::now() >= at)
            || request.max_records.is_some_and(|max| self.found >= max)
            || request.max_bytes.is_some_and(|max| self.written >= max)
            || request
                .cancel
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Reads `topic` from `next` (the next offset of each partition; the beginning where it has none) to its end,
    /// or until the deadline, the record limit or a cancel, keeping `next` up to date. Returns whether the topic was
    /// read to its end.
    fn topic(
        &mut self,
        topic: &str,
        next: &mut BTreeMap<i32, i64>,
        counts: &mut TopicCounts,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<bool, Error> {
        let kafka = |e: rdkafka::error::KafkaError| Error::Kafka(format!("reading topic {topic}: {e}"));
        let consumer: BaseConsumer = self
            .exporter
            .client
            .clone()
            .set("group.id", "piiwall.export.unused")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // A scan to a known end: the broker should answer a fetch with what it has, not wait for more (Tansu
            // waits the whole 500 ms default on every fetch). `[kafka.properties]` may say otherwise.
            .set(
                "fetch.wait.max.ms",
                self.exporter.client.get("fetch.wait.max.ms").unwrap_or("10"),
            )
            // Offsets out of range (retention moved the start since the watermarks were read): from the start, never
            // from the end.
            .set("auto.offset.reset", "earliest")
            // A bounded prefetch: the export's memory does not grow with the topic.
            .set(
                "queued.max.messages.kbytes",
                self.exporter
                    .client
                    .get("queued.max.messages.kbytes")
                    .unwrap_or("16384"),
            )
            .create()
            .map_err(kafka)?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(kafka)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err(Error::Kafka(format!("topic {topic} does not exist")));
        }
        let mut end = BTreeMap::new();
        let mut assignment = rdkafka::TopicPartitionList::new();
        let (mut done, mut total) = (0u64, 0u64);
        for &partition in &partitions {
            if self.must_stop() {
                return Ok(false);
            }
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .map_err(kafka)?;
            let from = next.get(&partition).copied().unwrap_or(low).max(low);
            total = total.saturating_add(high.saturating_sub(low).max(0) as u64);
            done = done.saturating_add(from.saturating_sub(low).max(0) as u64);
            next.insert(partition, from);
            if from < high {
                end.insert(partition, high);
                assignment
                    .add_partition_offset(topic, partition, rdkafka::Offset::Offset(from))
                    .map_err(kafka)?;
            }
        }
        if end.is_empty() {
            return Ok(true);
        }
        consumer.assign(&assignment).map_err(kafka)?;
        let mut last_record = Instant::now();
        let mut last_progress = Instant::now();
        progress(done, total);
        // Once every partition is at its end, what the consumer already fetched is drained: a broker may report a
        // high watermark below the records of its last batch (Tansu counts a multi-record batch as one offset), and
        // those records are in the batch already fetched.
        let mut draining_until = None;
        loop {
            if end.is_empty() && draining_until.is_none() {
                draining_until = Some(Instant::now() + DRAIN);
            }
            let draining = draining_until.is_some();
            if draining_until.is_some_and(|until| Instant::now() >= until)
                || (!draining && last_record.elapsed() >= QUIET_END)
            {
                break;
            }
            if self.must_stop() {
                return Ok(false);
            }
            let wait = if draining {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(200)
            };
            match consumer.poll(wait) {
                None if draining => break,
                None => {}
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                    end.remove(&partition);
                }
                Some(Err(e)) => return Err(kafka(e)),
                Some(Ok(message)) => {
                    last_record = Instant::now();
                    let (partition, offset) = (message.partition(), message.offset());
                    if !self.record(topic, &message, counts, out)? {
                        return Ok(false);
                    }
                    next.insert(partition, offset + 1);
                    done += 1;
                    if end.get(&partition).is_some_and(|&high| offset + 1 >= high) {
                        end.remove(&partition);
                    }
                    if last_progress.elapsed() > Duration::from_millis(200) {
                        progress(done, total);
                        last_progress = Instant::now();
                    }
                }
            }
        }
        // Silent for QUIET_END with partitions short of the end read at the start: reads that stalled (a leader
        // failover, a slow cold read). Never taken as read to the end: the export is incomplete, resumable from each
        // partition's true position.
        if !end.is_empty() {
            tracing::warn!(%topic, partitions = end.len(), "a subject export's reads stalled before the end of the topic");
            return Ok(false);
        }
        progress(total.max(done), total.max(done));
        // Read to its end: a resumed export starts at the consumer's position (past the records read and the
        // transaction markers skipped). Never at the start's high watermark as such: records of a transaction still
        // open (below it, above the last stable offset) are read by the resumed export once committed.
        let positions = consumer.position().map_err(kafka)?;
        for &partition in &partitions {
            let position = positions
                .find_partition(topic, partition)
                .and_then(|p| p.offset().to_raw())
                .filter(|&o| o >= 0);
            if let (Some(position), Some(at)) = (position, next.get_mut(&partition)) {
                *at = (*at).max(position);
            }
        }
        Ok(true)
    }

    /// Looks at one record: the subject's (decoded, revealed, written), a forgotten subject's (counted), or another's.
    /// `false` when the subject's record would take the document past its byte limit: it is not taken (nor
    /// counted), and the scan stops before it.
    fn record(
        &mut self,
        topic: &str,
        message: &BorrowedMessage<'_>,
        counts: &mut TopicCounts,
        out: &mut dyn Write,
    ) -> Result<bool, Error> {
        let Some(payload) = message.payload() else {
            counts.scanned += 1;
            return Ok(true);
        };
        match self.classifier.classify(payload)? {
            Class::Candidate => {}
            Class::Erased => {
                counts.scanned += 1;
                counts.erased += 1;
                return Ok(true);
            }
            Class::Other => {
                counts.scanned += 1;
                return Ok(true);
            }
        }
        // Only candidates are copied out of the consumer's buffer.
        let message = message.detach();
        let Some(document) = self.decode_and_reveal(topic, &message)? else {
            counts.scanned += 1;
            counts.unreadable += 1;
            return Ok(true);
        };
        let Some(document) = document else {
            counts.scanned += 1;
            return Ok(true);
        };
        let bytes = serde_json::to_vec(&document).map_err(|e| Error::io("writing the export", e.into()))?;
        // The first record of a call is always taken, so that every call makes progress.
        if self.found > 0
            && self
                .request
                .max_bytes
                .is_some_and(|max| self.written + bytes.len() as u64 > max)
        {
            return Ok(false);
        }
        let io = |e: std::io::Error| Error::io("writing the export", e);
        if !self.first {
            out.write_all(b",").map_err(io)?;
        }
        self.first = false;
        out.write_all(&bytes).map_err(io)?;
        self.written += bytes.len() as u64;
        counts.scanned += 1;
        counts.records += 1;
        self.found += 1;
        Ok(true)
    }

    /// The export entry of a candidate record: `None` when it cannot be read (no writer schema, does not decode),
    /// `Some(None)` when its subject field is not the subject's.
    fn decode_and_reveal(&self, topic: &str, message: &OwnedMessage) -> Result<Option<Option<Json>>, Error> {
        let Some(source) = header_text(message, SOURCE_TOPIC) else {
            return Ok(None);
        };
        let schema_id = header_text(message, SCHEMA_ID).and_then(|id| id.parse::<u32>().ok());
        let route = match self
            .exporter
            .runtime
            .block_on(self.exporter.routes.schema_for(&source, schema_id))
        {
            Ok(route) => route,
            // A registry that does not answer is the export's failure, not the record's.
            Err(e) if e.kind() == crate::error::ErrorKind::Retriable => return Err(e),
            Err(_) => return Ok(None),
        };
        let Some(payload) = message.payload() else {
            return Ok(None);
        };
        let schema = &route.schema;
        let value = if schema.is_json() || !route.framed {
            let body = if route.framed {
                match crate::stream::parse_frame(payload) {
                    Ok((_, body)) => body,
                    Err(_) => return Ok(None),
                }
            } else {
                payload
            };
            let Ok(json) = serde_json::from_slice::<Json>(body) else {
                return Ok(None);
            };
            match JsonCodec::new(&schema.sanitized).to_value(&json) {
                Ok(value) => value,
                Err(_) => return Ok(None),
            }
        } else {
            let Ok((_, mut body)) = crate::stream::parse_frame(payload) else {
                return Ok(None);
            };
            // Protobuf output: read into the Avro binary of the sanitized schema first.
            let avro;
            if let Some(proto) = schema.protobuf() {
                match crate::codec::protobuf::ProtoRecords::of_message(&proto.sanitized_message).read(body) {
                    Ok(converted) => avro = converted.avro,
                    Err(_) => return Ok(None),
                }
                body = &avro[..];
            }
            let read = apache_avro::reader::datum::GenericDatumReader::builder(&schema.sanitized)
                .build()
                .and_then(|reader| reader.read_value(&mut body));
            match read {
                Ok(value) => value,
                Err(_) => return Ok(None),
            }
        };
        // The subject field decides: a token of one of the subject's keys.
        let plan = &schema.plan;
        let subject_token = crate::sanitize::subject_id(plan, &value).ok().flatten();
        let is_ours = subject_token
            .as_deref()
            .and_then(|text| crate::crypto::Token::parse(text).ok())
            .is_some_and(|token| self.classifier.is_ours(&token.key_id));
        if !is_ours {
            return Ok(Some(None));
        }
        let (mut erased, mut withheld, mut not_reversible) = (Vec::new(), Vec::new(), BTreeMap::new());
        let mut found = Vec::new();
        for rule in &plan.rules {
            // Masked, hashed and redacted fields keep no original: the record says which, and how.
            if !matches!(rule.action, Action::Tokenize | Action::Subject | Action::Encrypt) {
                not_reversible.insert(rule.path.clone(), rule.action.name());
                continue;
            }
            let steps: Vec<&str> = rule.path.split('.').collect();
            collect(&value, &steps, String::new(), rule, &mut found);
        }
        let mut record = JsonCodec::new(&schema.sanitized).to_json(&value);
        // Values first, then map keys from the deepest map up: renaming a key changes the pointers below it.
        found.sort_by_key(|p| (p.is_key, std::cmp::Reverse(p.pointer.len())));
        for protected in found {
            let rule = protected.rule;
            let context = if protected.is_key {
                &rule.key_context
            } else {
                &rule.context
            };
            if !(self.request.may_see)(context) {
                set(&mut record, &protected, Json::Null);
                push_once(&mut withheld, &rule.path);
                continue;
            }
            match self.exporter.sanitizer.reveal(context, &protected.token) {
                Ok(original) => set(&mut record, &protected, original),
                Err(Error::Reveal(RevealError::SubjectForgotten | RevealError::UnknownKey))
                | Err(Error::Key(KeyError::Forgotten)) => {
                    set(&mut record, &protected, Json::Null);
                    push_once(&mut erased, &rule.path);
                }
                Err(e) if e.kind() == crate::error::ErrorKind::Retriable => return Err(e),
                Err(Error::Reveal(_)) => {
                    set(&mut record, &protected, Json::Null);
                    push_once(&mut erased, &rule.path);
                }
                Err(e) => return Err(e),
            }
        }
        let source_partition = header_text(message, SOURCE_PARTITION).and_then(|p| p.parse::<i32>().ok());
        let source_offset = header_text(message, SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok());
        let mut entry = json!({
            "topic": topic,
            "partition": message.partition(),
            "offset": message.offset(),
            "time": message.timestamp().to_millis().map(|ms| crate::receipt::utc_timestamp(ms.div_euclid(1000))),
            "source": {"topic": source, "partition": source_partition, "offset": source_offset},
            "value": record,
        });
        if !erased.is_empty() {
            entry["erased_fields"] = json!(erased);
        }
        if !withheld.is_empty() {
            entry["withheld_fields"] = json!(withheld);
        }
        if !not_reversible.is_empty() {
            entry["not_reversible_fields"] = json!(not_reversible);
        }
        Ok(Some(Some(entry)))
    }
}

fn push_once(list: &mut Vec<String>, path: &str) {
    if !list.iter().any(|p| p == path) {
        list.push(path.to_owned());
    }
}

/// A protected value found in a decoded sanitized record: where it is in the record's JSON form.
struct Protected<'a> {
    rule: &'a Rule,
    /// JSON pointer of the value (or, for a map key, of the map).
    pointer: String,
    /// The map key this is, when it is one.
    is_key: bool,
    token: String,
}

/// The protected values of `rule` in `value`, reached by its path's `steps` (arrays, maps and unions are
/// transparent); everything inside the protected field is protected, map keys included.
fn collect<'a>(value: &Value, steps: &[&str], pointer: String, rule: &'a Rule, out: &mut Vec<Protected<'a>>) {
    match value {
        Value::Union(_, inner) => collect(inner, steps, pointer, rule, out),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                collect(item, steps, format!("{pointer}/{index}"), rule, out);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries {
                collect(item, steps, format!("{pointer}/{}", escape(key)), rule, out);
                if steps.is_empty() && rule.map_keys.is_some() {
                    out.push(Protected {
                        rule,
                        pointer: format!("{pointer}/{}", escape(key)),
                        is_key: true,
                        token: key.clone(),
                    });
                }
            }
        }
        Value::Record(fields) => match steps.split_first() {
            Some((step, rest)) => {
                if let Some((name, field)) = fields.iter().find(|(name, _)| name == step) {
                    collect(field, rest, format!("{pointer}/{}", escape(name)), rule, out);
                }
            }
            None => {
                for (name, field) in fields {
                    collect(field, steps, format!("{pointer}/{}", escape(name)), rule, out);
                }
            }
        },
        Value::String(text) if steps.is_empty() => out.push(Protected {
            rule,
            pointer,
            is_key: false,
            token: text.clone(),
        }),
        Value::Bytes(bytes) if steps.is_empty() => {
            if let Ok(text) = std::str::from_utf8(bytes) {
                out.push(Protected {
                    rule,
                    pointer,
                    is_key: false,
                    token: text.to_owned(),
                });
            }
        }
        _ => {}
    }
}

/// A JSON pointer's escaping of one reference token (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Puts `original` where `protected` was: the value at its pointer, or, for a map key, the key's name.
fn set(record: &mut Json, protected: &Protected<'_>, original: Json) {
    if !protected.is_key {
        if let Some(slot) = record.pointer_mut(&protected.pointer) {
            *slot = original;
        }
        return;
    }
    let Some((map_pointer, _)) = protected.pointer.rsplit_once('/') else {
        return;
    };
    let Some(Json::Object(map)) = record.pointer_mut(map_pointer) else {
        return;
    };
    let Some(item) = map.remove(&protected.token) else {
        return;
    };
    let name = match original {
        Json::String(text) => text,
        // A withheld or erased key gets a placeholder name (the key's own token would say nothing), one not taken.
        Json::Null => (1..)
            .map(|n| format!("(withheld key {n})"))
            .find(|name| !map.contains_key(name))
            .unwrap_or_default(),
        other => other.to_string(),
    };
    map.insert(name, item);
}

/// The distinct key ids of the tokens and ciphertexts in a record's bytes (`pwt1.`, `pwe2.`, `pwe1.` followed by a
/// 16-character key id and a dot), in the order found, at most `limit`; hashes (`pwh1`) are under domain keys and
/// are skipped.
pub fn key_ids_in(bytes: &[u8], limit: usize) -> Vec<KeyId> {
    let mut ids: Vec<KeyId> = Vec::new();
    for at in memchr::memmem::find_iter(bytes, b"pw") {
        if ids.len() >= limit {
            break;
        }
        let Some(head) = bytes.get(at..at + crate::crypto::TOKEN_HEAD_LEN) else {
            break;
        };
        if !matches!(&head[2..5], b"t1." | b"e2." | b"e1.") || head[21] != b'.' {
            continue;
        }
        let Ok(text) = std::str::from_utf8(&head[5..21]) else {
            continue;
        };
        if let Some(id) = KeyId::from_text(text)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// The resume point of an earlier document (its `resume` member), or an error naming what is wrong with it.
pub fn resume_point(document: &Json) -> Result<ResumePoint, ValueError> {
    match document.get("resume") {
        None | Some(Json::Null) => Err(ValueError::new(
            "resume",
            "the document has no resume point: that export was complete",
        )),
        Some(point) => serde_json::from_value(point.clone())
            .map_err(|_| ValueError::new("resume", "expected {\"<topic>\": {\"<partition>\": <next offset>}}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Token, TokenKind};

    #[test]
    fn key_ids_are_found_in_avro_and_json_bytes_and_hashes_and_lookalikes_are_not() {
        let (a, b, c) = (KeyId([1; 12]), KeyId([2; 12]), KeyId([3; 12]));
        let tokenized = Token::render(TokenKind::Token, a, &[7; 30]);
        let encrypted = Token::render(TokenKind::Ciphertext, b, &[8; 40]);
        let hashed = Token::render(TokenKind::Hash, c, &[9; 32]);
        let mut avro = vec![0x20];
        for text in [&tokenized, &hashed, &encrypted, &tokenized] {
            avro.push((text.len() * 2) as u8);
            avro.extend_from_slice(text.as_bytes());
        }
        assert_eq!(key_ids_in(&avro, 16), vec![a, b]);
        assert_eq!(key_ids_in(&avro, 1), vec![a]);
        let json = format!("{{\"email\":\"{tokenized}\",\"pw\":\"pwt1.short.x\",\"end\":\"pw");
        assert_eq!(key_ids_in(json.as_bytes(), 16), vec![a]);
        assert!(
            key_ids_in(b"pwt1.AAAAAAAAAAAAAAA!.x", 16).is_empty(),
            "not base64: no key id"
        );
    }

    fn keyring(dir: &std::path::Path) -> Keyring {
        let store = std::sync::Arc::new(crate::keys::SqliteStore::open(&dir.join("keys.db")).unwrap());
        Keyring::open(
            store,
            std::sync::Arc::new(crate::crypto::LocalKek::from_bytes(&[5; 32]).unwrap()),
            crate::keys::KeyCacheSettings::default(),
        )
        .unwrap()
    }

    #[test]
    fn records_are_told_apart_by_their_key_ids_and_fake_tokens_cost_no_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = keyring(dir.path());
        let ours: HashSet<KeyId> = ["ada", "bob"]
            .iter()
            .map(|s| {
                keyring.prefetch_subjects([*s]).unwrap();
                keyring.subject_key_ids(s).unwrap()[0]
            })
            .collect();
        let ada = keyring.subject_key_ids("ada").unwrap()[0];
        keyring.prefetch_subjects(["carol", "dan"]).unwrap();
        let (carol, dan) = (
            keyring.subject_key_ids("carol").unwrap()[0],
            keyring.subject_key_ids("dan").unwrap()[0],
        );
        keyring.forget_subject("dan").unwrap();
        let ours: HashSet<KeyId> = ours.into_iter().filter(|id| *id == ada).collect();
        let token = |id| Token::render(TokenKind::Token, id, &[1; 30]);
        let mut classifier = Classifier::new(&keyring, ours);
        assert_eq!(classifier.classify(token(ada).as_bytes()).unwrap(), Class::Candidate);
        assert_eq!(classifier.classify(token(carol).as_bytes()).unwrap(), Class::Other);
        assert_eq!(classifier.classify(token(dan).as_bytes()).unwrap(), Class::Erased);
        assert_eq!(classifier.classify(b"no token here").unwrap(), Class::Other);
        // Text made of many fake tokens is decoded (the subject field decides), not looked up id by id.
        let calls = keyring.stats().store_calls.load(std::sync::atomic::Ordering::Relaxed);
        let stuffed: String = (0..40u8).map(|n| token(KeyId([n; 12])) + " ").collect();
        assert_eq!(classifier.classify(stuffed.as_bytes()).unwrap(), Class::Candidate);
        assert_eq!(
            keyring.stats().store_calls.load(std::sync::atomic::Ordering::Relaxed),
            calls
        );
    }

    /// A tokenized map field whose keys are tokenized too.
    fn tokenized_map() -> Rule {
        Rule {
            path: "tags".into(),
            action: Action::Tokenize,
            context: "tags".into(),
            map_keys: Some(Action::Tokenize),
            key_context: "tags#key".into(),
        }
    }

    #[test]
    fn withheld_map_keys_get_distinct_placeholders() {
        let rule = tokenized_map();
        let mut record = json!({"tags": {"k1": "a", "k2": "b"}});
        for key in ["k1", "k2"] {
            let protected = Protected {
                rule: &rule,
                pointer: format!("/tags/{key}"),
                is_key: true,
                token: key.into(),
            };
            set(&mut record, &protected, Json::Null);
        }
        assert_eq!(record["tags"].as_object().unwrap().len(), 2, "{record}");
    }

    #[test]
    fn a_resume_point_is_read_back_and_a_complete_document_has_none() {
        let point = resume_point(&json!({"resume": {"orders.sanitized": {"0": 12, "3": 40}}})).unwrap();
        assert_eq!(point["orders.sanitized"][&3], 40);
        assert!(resume_point(&json!({"complete": true})).is_err());
        let refused = resume_point(&json!({"resume": {"t": {"zero": 1}}})).unwrap_err();
        assert!(!refused.to_string().contains("zero"), "{refused}");
    }

    #[test]
    fn map_keys_and_values_are_replaced_at_their_pointers() {
        let rule = tokenized_map();
        let mut record = json!({"tags": {"tok-k": "tok-v"}, "a/b": [1]});
        let value = Protected {
            rule: &rule,
            pointer: "/tags/tok-k".into(),
            is_key: false,
            token: "tok-v".into(),
        };
        set(&mut record, &value, json!("value"));
        let key = Protected {
            rule: &rule,
            pointer: "/tags/tok-k".into(),
            is_key: true,
            token: "tok-k".into(),
        };
        set(&mut record, &key, json!("key"));
        assert_eq!(record["tags"], json!({"key": "value"}));
        assert_eq!(escape("a/b~c"), "a~1b~0c");
    }
}

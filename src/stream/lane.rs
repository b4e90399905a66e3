//! One ordered lane per input partition: take a batch, sanitize it off the reactor, produce every record to the
//! same partition number of its output topic (or to quarantine), wait for every acknowledgement, and only then
//! store the batch's last offset. A record is never committed before its output is durably written.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use tokio::sync::mpsc;

use super::process::{Outcome, Processor, QuarantineClass};
use super::transaction;
use crate::audit::{AuditEvent, AuditKind, Auditor, FieldCount};
use crate::control::{Control, ControlOp};
use crate::error::{Error, ErrorKind};
use crate::keys::Retired;
use crate::keys::forgets::{self, Since};
use crate::transcode::TranscodeScratch;

/// Header names of a record's source coordinates, on every output and quarantine record.
pub const SOURCE_TOPIC: &str = "piiwall.source.topic";
pub const SOURCE_PARTITION: &str = "piiwall.source.partition";
pub const SOURCE_OFFSET: &str = "piiwall.source.offset";
/// Header name of quarantine records: why.
pub const REASON: &str = "piiwall.reason";
/// Header name of output and quarantine records: the writer schema id (registry id, or a local binding's).
pub const SCHEMA_ID: &str = "piiwall.schema.id";

const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What every lane shares.
pub struct LaneContext {
    pub processor: Processor,
    pub consumer: Arc<super::PipelineConsumer>,
    pub producer: crate::producer::Producer,
    /// Exactly-once: the transactional producer the lanes write through instead of `producer`.
    pub transactions: Option<super::transaction::Transactions>,
    pub output_suffix: String,
    pub quarantine_topic: String,
    pub headers_allow: Vec<String>,
    pub batch_size: usize,
    pub sanitized: AtomicU64,
    pub quarantined: AtomicU64,
    pub auditor: Auditor,
    /// Where the rotations of keys that reached `max_encryptions` are announced.
    pub control: Control,
    pub max_encryptions: u64,
    /// The largest record the brokers take (librdkafka's `message.max.bytes`): larger outputs go to quarantine.
    pub max_record_bytes: usize,
    /// Records sanitized per (input topic, writer schema id) since the last processing summary.
    pub window: std::sync::Mutex<std::collections::HashMap<(String, u32), u64>>,
    /// Detections in unannotated fields per input topic since the last processing summary.
    pub detected: std::sync::Mutex<std::collections::HashMap<String, crate::transcode::Detections>>,
}

/// How a lane ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LaneEnd {
    /// Its channel closed (shutdown or revocation) and everything it held is written.
    Drained,
    /// Exactly-once: a batch's transaction was aborted; the partition must be read again from this offset.
    Rewind(i64),
}

/// A record as the consumer loop hands it to a lane.
pub struct Read {
    pub message: OwnedMessage,
    /// Exactly-once: the consumer group's metadata (generation) when the record was read. A batch's offsets are
    /// committed with its first record's, so a batch read before a rebalance is fenced by the group coordinator
    /// instead of committing over the partition's new owner.
    pub group: Option<Arc<ConsumerGroupMetadata>>,
}

/// Pause before a lane gives up an aborted batch, so a failing broker is not hammered.
const REWIND_PAUSE: Duration = Duration::from_secs(1);

/// Runs the lane of one partition until its channel closes (shutdown or revocation) and is drained.
pub async fn run(
    topic: String,
    partition: i32,
    mut input: mpsc::Receiver<Read>,
    ctx: Arc<LaneContext>,
) -> Result<LaneEnd, Error> {
    let output_topic = format!("{topic}{}", ctx.output_suffix);
    let mut scratch = TranscodeScratch::default();
    tracing::debug!(%topic, partition, "lane started");
    while let Some(first) = input.recv().await {
        let started = std::time::Instant::now();
        let mut batch = Vec::with_capacity(ctx.batch_size);
        let group = first.group;
        batch.push(first.message);
        while batch.len() < ctx.batch_size {
            match input.try_recv() {
                Ok(read) => batch.push(read.message),
                Err(_) => break,
            }
        }
        let ready = prepare(batch, scratch, &ctx, &topic, partition).await?;
        let first_offset = ready.batch.first().expect("a batch has at least one record").offset();
        let last_offset = ready.batch.last().expect("a batch has at least one record").offset();
        let (written, done) = match &ctx.transactions {
            None => {
                let (written, ready) = write_until_done(&ctx, &topic, partition, &output_topic, ready).await?;
                if let Err(e) = ctx.consumer.store_offset(&topic, partition, last_offset) {
                    // The partition was revoked meanwhile: its new owner processes these records again.
                    tracing::info!(%topic, partition, error = %e, "offset not stored: partition no longer assigned");
                }
                (written, ready)
            }
            Some(transactions) => {
                let group = group.ok_or_else(|| Error::Kafka("a record read without its group metadata".into()))?;
                let (turn, ready) = begin_current(transactions, &ctx, ready).await?;
                let committed = match write(
                    &Through::transaction(turn.producer()),
                    &ctx,
                    partition,
                    &output_topic,
                    &ready,
                )
                .await
                {
                    // A forget since the last check may have destroyed a key of the batch: nothing of it is made
                    // visible, and it is read again.
                    Ok(_) if !ready.untouched(&ctx) => {
                        Err(turn.abort("a forget came while the batch was written", false).await)
                    }
                    Ok(written) => turn
                        .commit(&topic, partition, last_offset + 1, &group)
                        .await
                        .map(|()| written),
                    Err(e) => Err(turn.abort(&e.to_string(), false).await),
                };
                match committed {
                    Ok(written) => (written, ready),
                    Err(transaction::Outcome::Fatal(e)) => return Err(e),
                    Err(transaction::Outcome::Rewind) => {
                        tokio::time::sleep(REWIND_PAUSE).await;
                        return Ok(LaneEnd::Rewind(first_offset));
                    }
                }
            }
        };
        scratch = done.scratch;
        let mut totals = ctx.window.lock().unwrap_or_else(|p| p.into_inner());
        for (id, count) in written.per_schema {
            *totals.entry((topic.clone(), id)).or_default() += count;
        }
        drop(totals);
        count_detections(&ctx, &topic, scratch.take_detections());
        ctx.sanitized.fetch_add(written.sanitized, Ordering::Relaxed);
        ctx.quarantined.fetch_add(written.quarantined, Ordering::Relaxed);
        metrics::histogram!("piiwall_batch_seconds", "topic" => topic.clone()).record(started.elapsed().as_secs_f64());
        metrics::counter!("piiwall_records_total", "topic" => topic.clone(), "outcome" => "sanitized")
            .increment(written.sanitized);
        metrics::counter!("piiwall_records_total", "topic" => topic.clone(), "outcome" => "quarantined")
            .increment(written.quarantined);
        for (class, count) in written.quarantined_by_class {
            metrics::counter!("piiwall_quarantined_total", "topic" => topic.clone(), "reason" => class.name())
                .increment(count);
        }
    }
    tracing::debug!(%topic, partition, "lane drained");
    Ok(LaneEnd::Drained)
}

/// Adds a written batch's detections to the metrics and to the next processing summary (never a value).
fn count_detections(ctx: &LaneContext, topic: &str, detections: crate::transcode::Detections) {
    if detections.is_empty() {
        return;
    }
    let mut counts = ctx.detected.lock().unwrap_or_else(|p| p.into_inner());
    let counts = counts.entry(topic.to_owned()).or_default();
    for (detection, count) in detections {
        metrics::counter!("piiwall_detections_total", "topic" => topic.to_owned(), "field" => detection.path.to_string(),
            "detector" => detection.kind.name(), "action" => detection.mode.name())
        .increment(count);
        *counts.entry(detection).or_default() += count;
    }
}

/// Writes a batch (at-least-once) until every record is acknowledged: a broker that is down longer than
/// `message.timeout.ms`, a topic the producer may not write (authorization), a quarantine topic that refuses writes —
/// none is the records' fault, so the whole batch is written again with backoff, the records still in hand, and the
/// lane waits meanwhile (`piiwall_lane_retries_total`). Only a fatal producer error ends the lane. Writing the whole
/// batch again keeps its order; the duplicates it may leave carry their source coordinates. Before each attempt, a
/// batch sanitized before a forget is sanitized again ([`Ready::current`]): however long the writing waits, what it
/// writes never holds a key destroyed before the attempt began.
async fn write_until_done(
    ctx: &Arc<LaneContext>,
    topic: &str,
    partition: i32,
    output_topic: &str,
    mut ready: Ready,
) -> Result<(Written, Ready), Error> {
    let mut wait = RETRY_START;
    loop {
        ready = ready.current(ctx).await?;
        let lease = ctx.producer.lease();
        let through = Through::shared(&ctx.producer, &lease);
        match write(&through, ctx, partition, output_topic, &ready).await {
            // Stopped by a forget, not by the brokers: sanitized again at once.
            Err(e) if e.kind() == ErrorKind::Retriable && !ready.untouched(ctx) => {}
            Err(e) if e.kind() == ErrorKind::Retriable => {
                metrics::counter!("piiwall_lane_retries_total", "topic" => topic.to_owned()).increment(1);
                tracing::warn!(%topic, partition, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "batch not written: writing it again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_MAX);
            }
            written => return written.map(|written| (written, ready)),
        }
    }
}

/// Exactly-once: waits for the lane's turn and begins its transaction, with a batch sanitized after the last forget
/// this process saw ([`Ready::current`]; the turn may have been long in coming).
async fn begin_current<'a>(
    transactions: &'a transaction::Transactions,
    ctx: &Arc<LaneContext>,
    mut ready: Ready,
) -> Result<(transaction::Turn<'a>, Ready), Error> {
    loop {
        let waited = transactions.wait_turn().await;
        if ready.untouched(ctx) {
            return Ok((waited.begin()?, ready));
        }
        // Not sanitized while holding the turn: the key store may keep it waiting.
        drop(waited);
        ready = ready.current(ctx).await?;
    }
}

/// Outputs too large for the brokers (`message.max.bytes`; tokens are ~4/3 of their input) can never be written:
/// each becomes a quarantine copy of its record instead. A copy too large as well (a malformed record's copy is
/// ~4/3 of its input) becomes a reference — its coordinates and the reason, with no content (replay it from the
/// input topic while that retains it).
fn fit_outcomes(ctx: &LaneContext, batch: &[OwnedMessage], outcomes: Vec<Outcome>) -> Result<Vec<Outcome>, Error> {
    let fits = |bytes: usize| bytes + RECORD_OVERHEAD <= ctx.max_record_bytes;
    batch
        .iter()
        .zip(outcomes)
        .map(|(message, outcome)| {
            let outcome = match outcome {
                // An output carries the input's allowlisted headers, which the brokers count too; a quarantine
                // copy carries none of them.
                Outcome::Output { key, value, schema_id }
                    if !fits(record_bytes(&key, &value) + allowed_header_bytes(message, &ctx.headers_allow)) =>
                {
                    let bytes = record_bytes(&key, &value) + allowed_header_bytes(message, &ctx.headers_allow);
                    let reason = format!(
                        "the sanitized record takes {bytes} bytes with its allowlisted headers, more than the brokers \
                         accept (message.max.bytes {})",
                        ctx.max_record_bytes
                    );
                    let class = QuarantineClass::TooLarge;
                    match ctx.processor.quarantine(message, reason.clone(), class, schema_id)? {
                        Outcome::Quarantine { key, value, .. } => Outcome::Quarantine {
                            key,
                            value,
                            reason,
                            class,
                            schema_id,
                        },
                        other => other,
                    }
                }
                outcome => outcome,
            };
            Ok(match outcome {
                Outcome::Quarantine {
                    key,
                    value,
                    reason,
                    class,
                    schema_id,
                } if !fits(record_bytes(&key, &Some(value.as_slice()))) => Outcome::Quarantine {
                    key: None,
                    value: Vec::new(),
                    reason: format!(
                        "{reason}; its copy is too large to keep (message.max.bytes {}): replay it from the input \
                         topic",
                        ctx.max_record_bytes
                    ),
                    class,
                    schema_id,
                },
                outcome => outcome,
            })
        })
        .collect()
}

/// A record's key and value bytes.
fn record_bytes(key: &Option<impl AsRef<[u8]>>, value: &Option<impl AsRef<[u8]>>) -> usize {
    key.as_ref().map_or(0, |k| k.as_ref().len()) + value.as_ref().map_or(0, |v| v.as_ref().len())
}

/// Room left in a record for piiwall's own headers and Kafka's framing.
const RECORD_OVERHEAD: usize = 1024;

/// Bytes a record batch spends on one header besides its key and value (their lengths, as varints).
const HEADER_FRAMING: usize = 10;

/// The bytes of a record's input headers that `kafka.headers_allow` passes on to its output, with their framing.
fn allowed_header_bytes(message: &OwnedMessage, allow: &[String]) -> usize {
    message.headers().map_or(0, |headers| {
        headers
            .iter()
            .filter(|h| allow.iter().any(|a| a == h.key))
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + HEADER_FRAMING)
            .sum()
    })
}

/// What a batch wrote, for the processing summary and the metrics.
struct Written {
    sanitized: u64,
    quarantined: u64,
    /// Quarantined records per kind of fault.
    quarantined_by_class: Vec<(QuarantineClass, u64)>,
    /// Sanitized records per writer schema id.
    per_schema: std::collections::HashMap<u32, u64>,
}

/// Produces a batch's outputs and quarantine copies and waits until every one is acknowledged.
async fn write(
    through: &Through<'_>,
    ctx: &LaneContext,
    partition: i32,
    output_topic: &str,
    ready: &Ready,
) -> Result<Written, Error> {
    let mut written = Written {
        sanitized: 0,
        quarantined: 0,
        quarantined_by_class: Vec::new(),
        per_schema: std::collections::HashMap::new(),
    };
    let mut deliveries = Vec::with_capacity(ready.batch.len());
    let mut failure = None;
    for (message, outcome) in ready.batch.iter().zip(&ready.outcomes) {
        // Queuing can wait (a full queue while the brokers are away): a forget meanwhile stops the attempt, and the
        // batch is sanitized again before the next.
        if !ready.untouched(ctx) {
            failure = Some(Error::Unavailable(
                "a forget came while the batch was being written: it is sanitized again".into(),
            ));
            break;
        }
        let queued = match outcome {
            Outcome::Output { key, value, schema_id } => {
                written.sanitized += 1;
                if let Some(id) = schema_id {
                    *written.per_schema.entry(*id).or_default() += 1;
                }
                let headers = output_headers(message, &ctx.headers_allow, *schema_id);
                let mut record = FutureRecord::to(output_topic).partition(partition).headers(headers);
                // Event time survives sanitization.
                if let Some(timestamp) = message.timestamp().to_millis() {
                    record = record.timestamp(timestamp);
                }
                record = with_payload(record, key.as_deref(), value.as_deref());
                send(through, record).await
            }
            Outcome::Quarantine {
                key,
                value,
                reason,
                class,
                schema_id,
            } => {
                written.quarantined += 1;
                match written.quarantined_by_class.iter_mut().find(|(c, _)| c == class) {
                    Some((_, count)) => *count += 1,
                    None => written.quarantined_by_class.push((*class, 1)),
                }
                let mut headers = headers(message, &[]).insert(Header {
                    key: REASON,
                    value: Some(reason.as_bytes()),
                });
                if let Some(id) = schema_id {
                    headers = headers.insert(Header {
                        key: SCHEMA_ID,
                        value: Some(id.to_string().as_bytes()),
                    });
                }
                let record = FutureRecord::to(&ctx.quarantine_topic).headers(headers);
                send(through, with_payload(record, key.as_deref(), Some(value))).await
            }
        };
        match queued {
            Ok(delivery) => deliveries.push(delivery),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // Every record of this attempt is settled (delivered, refused, timed out or purged) before the batch is written
    // again, so no record of an earlier attempt lands after a later attempt's copy of it.
    for delivery in deliveries {
        let settled = match delivery.await {
            Ok(Ok(_)) => None,
            Ok(Err((e, _))) => Some(through.failed(&e)),
            Err(_) => Some(Error::Unavailable("the producer went away before delivering".into())),
        };
        if failure.is_none() {
            failure = settled;
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    through.delivered();
    Ok(written)
}

/// A batch after sanitizing: its records, what became of each, how many subject keys it created, the keys
/// rotated after it for having reached their encryption limit, and the keys it resolved.
struct Sanitized {
    batch: Vec<OwnedMessage>,
    scratch: TranscodeScratch,
    outcomes: Vec<Outcome>,
    keys_created: usize,
    retired: Vec<Retired>,
    resolved: Resolved,
}

/// The keys a batch was sanitized with: the scopes' tags, and the count of forgets seen before they were resolved
/// ([`forgets`]).
struct Resolved {
    /// Moved on by each check that finds only forgets of other scopes, so the next check starts from there.
    seen: AtomicU64,
    tags: Vec<u64>,
}

impl Resolved {
    /// No forget of a scope whose key the batch resolved came since they were resolved.
    fn untouched(&self, ctx: &LaneContext) -> bool {
        let keyring = ctx.processor.sanitizer.keyring();
        match keyring.forgets_since(self.seen.load(Ordering::Relaxed), &self.tags) {
            Since::Untouched(seen) => {
                self.seen.store(seen, Ordering::Relaxed);
                true
            }
            Since::Touched => false,
        }
    }
}

/// A batch sanitized and its audit events acknowledged ([`prepare`]), to be written.
struct Ready {
    batch: Vec<OwnedMessage>,
    scratch: TranscodeScratch,
    outcomes: Vec<Outcome>,
    resolved: Resolved,
    topic: String,
    partition: i32,
}

impl Ready {
    /// No forget of a scope whose key the batch resolved came since they were resolved.
    fn untouched(&self, ctx: &LaneContext) -> bool {
        self.resolved.untouched(ctx)
    }

    /// The batch, sanitized again if a forget of one of its keys' scopes came since they were resolved: what it
    /// holds may be under a key destroyed since (its subject's records are then redacted, as any record read after
    /// the forget).
    async fn current(self, ctx: &Arc<LaneContext>) -> Result<Self, Error> {
        if self.untouched(ctx) {
            return Ok(self);
        }
        tracing::info!(topic = %self.topic, partition = self.partition,
            "a forget came after this batch was sanitized: sanitizing it again before it is written");
        metrics::counter!("piiwall_batches_resanitized_total", "topic" => self.topic.clone()).increment(1);
        Box::pin(prepare(self.batch, self.scratch, ctx, &self.topic, self.partition)).await
    }
}

/// Sanitizes a batch ([`sanitize_batch`]) and writes the audit events of what it did — the keys it made and
/// rotated, the records it quarantined — and waits for their acknowledgement, and waits while the audit writer
/// fails even when the batch has none: no record is written, and no input offset stored (or committed in a
/// transaction), before its audit trail is. Audit is fail-closed. The events come before the writing, so that a
/// transaction never waits on the audit topic (an audit outage longer than `transaction.timeout.ms` would fence
/// the producer); a batch sanitized or read again repeats its QUARANTINE events (audit is at-least-once).
async fn prepare(
    batch: Vec<OwnedMessage>,
    scratch: TranscodeScratch,
    ctx: &Arc<LaneContext>,
    topic: &str,
    partition: i32,
) -> Result<Ready, Error> {
    let Sanitized {
        batch,
        scratch,
        outcomes,
        keys_created,
        retired,
        resolved,
    } = sanitize_batch(batch, scratch, ctx).await?;
    let mut events = Vec::new();
    for key in retired {
        events.push(announce_retired(ctx, key).await);
    }
    if keys_created > 0 {
        let mut event = AuditEvent::new(AuditKind::KeyCreated);
        event.topic = Some(topic.to_owned());
        event.partition = Some(partition);
        event.counts = vec![FieldCount {
            field_path: "subject".into(),
            action: "key created".into(),
            count: keys_created as i64,
        }];
        events.push(event);
    }
    for (message, outcome) in batch.iter().zip(&outcomes) {
        if let Outcome::Quarantine { reason, schema_id, .. } = outcome {
            tracing::warn!(%topic, partition, offset = message.offset(), %reason, "record quarantined");
            let mut event = AuditEvent::new(AuditKind::Quarantine);
            event.topic = Some(topic.to_owned());
            event.partition = Some(partition);
            event.offset = Some(message.offset());
            event.schema_id = schema_id.map(|id| id as i32);
            event.reason = Some(reason.clone());
            events.push(event);
        }
    }
    ctx.auditor.emit_acked(events).await.written().await?;
    ctx.auditor.wait_writing().await;
    Ok(Ready {
        batch,
        scratch,
        outcomes,
        resolved,
        topic: topic.to_owned(),
        partition,
    })
}

/// Tells the other instances (control topic) that a worn key was rotated, and returns the audit event that says so.
/// Not announcing only delays the others until their key cache expires, so a failure is logged, not fatal.
async fn announce_retired(ctx: &LaneContext, key: Retired) -> AuditEvent {
    let whose = match key.domain() {
        Some(domain) => format!("the key of domain {domain}"),
        None => "a subject's key".to_owned(),
    };
    tracing::info!(key = %whose, version = key.version, "key reached keys.max_encryptions_per_key: rotated");
    if let Err(e) = ctx
        .control
        .announce(ctx.processor.sanitizer.keyring(), ControlOp::Rotate, &key.scope)
        .await
    {
        tracing::warn!(error = %e, "rotation not announced: other instances see it when their key cache expires");
    }
    let mut event = AuditEvent::new(AuditKind::KeyRotated);
    event.principal = Some("piiwall".into());
    event.reason = Some(format!(
        "{whose} reached keys.max_encryptions_per_key ({})",
        ctx.max_encryptions
    ));
    event
}

/// Sanitizes a batch on the blocking pool, its registry schemas resolved and its new subjects' keys created first,
/// and makes the outputs too large for the brokers quarantine copies ([`fit_outcomes`]).
/// A dependency that does not answer (registry, key store) is retried with backoff, the batch kept: nothing is
/// quarantined or skipped for it.
async fn sanitize_batch(
    batch: Vec<OwnedMessage>,
    scratch: TranscodeScratch,
    ctx: &Arc<LaneContext>,
) -> Result<Sanitized, Error> {
    let wanted = ctx.processor.schemas_wanted(&batch);
    let mut held = (batch, scratch);
    let mut wait = RETRY_START;
    // Keys made by an attempt that then failed exist all the same; the next attempt finds them made.
    let mut keys_created = 0;
    loop {
        let failure = match ctx.processor.routes.resolve(&wanted).await {
            Err(e) => e,
            Ok(()) => {
                let lane = ctx.clone();
                let (batch, mut scratch) = held;
                let (batch, scratch, created, result) = tokio::task::spawn_blocking(move || {
                    // Detections count once per written batch, however often it is sanitized.
                    scratch.clear_detections();
                    let seen = lane.processor.sanitizer.keyring().forgets_seen();
                    let mut created = 0;
                    let (result, tags) = forgets::recording(|| {
                        lane.processor.prefetch_keys(&batch).and_then(|keys| {
                            created = keys.created;
                            let outcomes = batch
                                .iter()
                                .map(|message| lane.processor.process(message, Some(&keys), &mut scratch))
                                .collect::<Result<Vec<_>, _>>()?;
                            // Here, not on the runtime: a quarantine copy may read its key from the store.
                            let outcomes = fit_outcomes(&lane, &batch, outcomes)?;
                            let keyring = lane.processor.sanitizer.keyring();
                            let retired = keyring.retire_worn(&keys, lane.max_encryptions).unwrap_or_else(|e| {
                                tracing::warn!(error = %e, "key usage not recorded: retried after the next batch");
                                Vec::new()
                            });
                            Ok((outcomes, retired))
                        })
                    });
                    let result = result.map(|(outcomes, retired)| {
                        (
                            outcomes,
                            retired,
                            Resolved {
                                seen: AtomicU64::new(seen),
                                tags,
                            },
                        )
                    });
                    (batch, scratch, created, result)
                })
                .await
                .map_err(|_| Error::Kafka("a sanitizing task panicked".into()))?;
                keys_created += created;
                match result {
                    Ok((outcomes, retired, resolved)) => {
                        return Ok(Sanitized {
                            batch,
                            scratch,
                            outcomes,
                            keys_created,
                            retired,
                            resolved,
                        });
                    }
                    Err(e) => {
                        held = (batch, scratch);
                        e
                    }
                }
            }
        };
        if failure.kind() != ErrorKind::Retriable {
            return Err(failure);
        }
        tracing::warn!(error = %failure, retry_in_ms = wait.as_millis() as u64, "dependency unavailable: batch waits");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

pub(super) fn with_payload<'a>(
    record: FutureRecord<'a, [u8], [u8]>,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
) -> FutureRecord<'a, [u8], [u8]> {
    let record = match key {
        Some(key) => record.key(key),
        None => record,
    };
    match value {
        Some(value) => record.payload(value),
        None => record,
    }
}

/// An output record's headers: [`headers`], then the writer schema id (what `subject export` reads a sanitized
/// record's plan by). `kafka.headers_allow` cannot name `piiwall.*` headers, so none of these comes from upstream.
pub(super) fn output_headers(message: &OwnedMessage, allow: &[String], schema_id: Option<u32>) -> OwnedHeaders {
    let headers = headers(message, allow);
    match schema_id {
        Some(id) => headers.insert(Header {
            key: SCHEMA_ID,
            value: Some(id.to_string().as_bytes()),
        }),
        None => headers,
    }
}

/// Source coordinates, and the allowlisted input headers (every other header may carry PII and is dropped).
pub(super) fn headers(message: &OwnedMessage, allow: &[String]) -> OwnedHeaders {
    let (mut partition, mut offset) = (itoa::Buffer::new(), itoa::Buffer::new());
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: SOURCE_TOPIC,
            value: Some(message.topic().as_bytes()),
        })
        .insert(Header {
            key: SOURCE_PARTITION,
            value: Some(partition.format(message.partition()).as_bytes()),
        })
        .insert(Header {
            key: SOURCE_OFFSET,
            value: Some(offset.format(message.offset()).as_bytes()),
        });
    if let Some(input) = message.headers() {
        for header in input.iter().filter(|h| allow.iter().any(|a| a == h.key)) {
            headers = headers.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
    }
    headers
}

/// A header's value as text.
pub fn header_text(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The producer a batch or a replayed record is written with: a lease of the run's shared producer, whose failures
/// are reported to it (it replaces itself when the brokers keep refusing it), or an exactly-once transaction's.
pub(super) struct Through<'a> {
    producer: &'a FutureProducer,
    shared: Option<(&'a crate::producer::Producer, &'a crate::producer::Lease)>,
}

impl<'a> Through<'a> {
    pub(super) fn shared(shared: &'a crate::producer::Producer, lease: &'a crate::producer::Lease) -> Self {
        Self {
            producer: lease.producer(),
            shared: Some((shared, lease)),
        }
    }

    pub(super) fn transaction(producer: &'a FutureProducer) -> Self {
        Self { producer, shared: None }
    }

    /// A record the brokers did not take. Retried, the records still in hand: timeouts, brokers down,
    /// authorization, a full disk, and a shared producer that failed fatally (a new one replaces it). Fatal only
    /// when a transaction's producer can go on no more (an idempotence or transaction error librdkafka calls fatal).
    fn failed(&self, e: &KafkaError) -> Error {
        self.not_written(e, true)
    }

    /// As [`failed`](Self::failed), for a record the producer would not even queue: not reported as a refusal of
    /// the brokers (librdkafka answers some locally with a broker's code, a record too large for one).
    fn not_queued(&self, e: &KafkaError) -> Error {
        self.not_written(e, false)
    }

    fn not_written(&self, e: &KafkaError, by_brokers: bool) -> Error {
        let message = format!("a record was not delivered: {e}");
        match self.shared {
            Some((shared, lease)) => {
                if by_brokers || lease.producer().client().fatal_error().is_some() {
                    shared.failed(lease, e);
                }
                Error::Unavailable(message)
            }
            None if e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => Error::Kafka(message),
            None => Error::Unavailable(message),
        }
    }

    fn delivered(&self) {
        if let Some((shared, lease)) = self.shared {
            shared.delivered(lease);
        }
    }
}

/// Enqueues a record, waiting while the producer's queue is full.
pub(super) async fn send<'a>(
    through: &Through<'_>,
    mut record: FutureRecord<'a, [u8], [u8]>,
) -> Result<DeliveryFuture, Error> {
    loop {
        match through.producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(through.not_queued(&e)),
        }
    }
}

//! `piiwall run`: the stream processor.
//!
//! ```text
//!  consumer (group) ──► lane per partition (bounded) ──► sanitize batch (blocking pool)
//!        ▲                                                  │
//!        └── offsets stored after every ack ◄── produce to <topic>.sanitized, same partition (or quarantine)
//! ```
//!
//! Delivery is at-least-once by default: a record's offset is stored only once its output (or its quarantine copy) is
//! acknowledged, and stored offsets are committed every `pipeline.commit_interval_ms` and at shutdown. Every output
//! record carries its source topic, partition and offset in headers, so a consumer can drop the duplicates a crash
//! or a rebalance can cause. With `kafka.delivery = "exactly-once"` a batch's outputs and its input offset commit
//! in one Kafka transaction instead (see `transaction`). Schemas come from local bindings (`[[schemas.local]]`) or
//! a Schema Registry.

mod context;
mod framing;
mod lane;
mod lanes;
mod process;
pub mod registry;
mod replay;
mod routes;
mod transaction;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerGroupMetadata, StreamConsumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use framing::{encode_framed, parse as parse_frame, write_header as write_frame_header};
pub use lane::{REASON, SCHEMA_ID, SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC, header_text};
pub use replay::{ReplaySummary, replay};
pub use routes::{Part, Route, Routes};

use crate::audit::{AuditEvent, AuditKind, Auditor, FieldCount};
use crate::config::{Config, Delivery};
use crate::control::Control;
use crate::error::{Error, ErrorKind};
use crate::keys::Keyring;
use crate::sanitize::Sanitizer;
use lane::{LaneContext, LaneEnd};
use lanes::{Lanes, Offered, PartitionKey};
use process::Processor;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often ended lanes are looked for (a lane that aborted a transaction waits for its partition to be rewound).
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// librdkafka's setting of how often a client reports its statistics; set on the consumer only.
const STATISTICS_INTERVAL: &str = "statistics.interval.ms";

/// librdkafka's default `message.max.bytes`: the largest record piiwall writes unless the properties say otherwise.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// How often counters kept outside the hot path (key cache) are published.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// The pipeline's consumer: librdkafka's statistics feed the lane-lag gauges.
pub(crate) type PipelineConsumer = StreamConsumer<context::PipelineContext>;

/// How often records held for a full lane are offered again.
const RELEASE_INTERVAL: Duration = Duration::from_millis(20);

/// Tells a running pipeline to stop: it stops consuming, drains what it holds, commits, and returns.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// A receiver whose `changed()` fires at once when the shutdown was already triggered: a signal that arrives
    /// during start-up is not lost.
    pub(crate) fn listen(&self) -> watch::Receiver<bool> {
        let mut receiver = self.0.subscribe();
        if *receiver.borrow() {
            receiver.mark_changed();
        }
        receiver
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

/// What `run` and `quarantine replay` build from the config alike.
pub(crate) struct Parts {
    pub(crate) sanitizer: Arc<Sanitizer>,
    pub(crate) routes: Arc<Routes>,
    /// Brokers and the `[kafka.properties]` passthrough, for every client.
    pub(crate) client: ClientConfig,
    /// Idempotent, acks=all; replaced when the brokers keep refusing it.
    pub(crate) producer: crate::producer::Producer,
}

/// Opens the key store and the KEK(s) off the runtime's threads (an HSM or KMS call, a database connection).
async fn open_keyring(keys: &crate::config::KeysConfig) -> Result<Keyring, Error> {
    let keys = keys.clone();
    Ok(tokio::task::spawn_blocking(move || Keyring::from_config(&keys))
        .await
        .map_err(|_| Error::Kafka("opening the key store panicked".into()))??)
}

/// Opens the key store and the KEK(s), waiting with backoff while either does not answer (a KMS or HSM unreachable,
/// a database not up yet): `waiting` is raised meanwhile, for `/readyz`. A refusal (a wrong PIN, an unknown or
/// disabled key, denied credentials) is an error at once. `None` when `stop` fires first.
async fn open_keyring_waiting(
    keys: &crate::config::KeysConfig,
    waiting: &std::sync::atomic::AtomicBool,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<Keyring>, Error> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let error = tokio::select! {
            opened = open_keyring(keys) => match opened {
                Ok(keyring) => {
                    if waiting.swap(false, Ordering::Relaxed) {
                        metrics::gauge!("piiwall_waiting_for_keys").set(0.0);
                        tracing::info!("the key store and the KEK provider answer");
                    }
                    return Ok(Some(keyring));
                }
                Err(e) if e.kind() == ErrorKind::Retriable => e,
                Err(e) => return Err(e),
            },
            _ = stop.changed() => return Ok(None),
        };
        if !waiting.swap(true, Ordering::Relaxed) {
            metrics::gauge!("piiwall_waiting_for_keys").set(1.0);
        }
        tracing::warn!(error = %error, retry_in_secs = backoff.as_secs(),
            "the key store or the KEK provider does not answer; waiting");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return Ok(None),
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

impl Parts {
    pub(crate) async fn build(config: &Config, keyring: Keyring) -> Result<Self, Error> {
        let sanitizer = Arc::new(Sanitizer::new(Arc::new(keyring), config.keys.default_domain.clone()));
        let routes = Arc::new(Routes::compile(config)?);
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.kafka.brokers);
        for (name, value) in &config.kafka.properties {
            // Statistics are the consumer's (lag per partition): other clients would only parse and log them.
            if name != STATISTICS_INTERVAL {
                client.set(name, value);
            }
        }
        let producer = crate::producer::Producer::create(
            client
                .clone()
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5")
                .clone(),
        )?;
        Ok(Self {
            sanitizer,
            routes,
            client,
            producer,
        })
    }
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub sanitized: u64,
    pub quarantined: u64,
}

/// What a running pipeline reports while it runs, for `/readyz` (see `crate::server`).
#[derive(Clone, Default)]
pub struct Status {
    /// Subscribed and consuming (false while starting and draining).
    pub consuming: Arc<AtomicBool>,
    /// The audit writer cannot write: the pipeline waits (fail closed).
    pub audit_failing: Arc<AtomicBool>,
    /// Start-up waits for the Kafka brokers to answer.
    pub waiting_for_brokers: Arc<AtomicBool>,
    /// Start-up waits for the key store or the KEK provider to answer.
    pub waiting_for_keys: Arc<AtomicBool>,
}

/// The parts of a pipeline that serve beside it (the subject-rights API), handed out once they are built.
pub struct Started<'a> {
    pub config: &'a Config,
    pub sanitizer: &'a Arc<Sanitizer>,
    pub routes: &'a Arc<Routes>,
    pub auditor: &'a Auditor,
    pub control: &'a Control,
    /// Brokers and the `[kafka.properties]` passthrough.
    pub client: &'a ClientConfig,
}

/// Runs the stream processor until `shutdown` fires or a fatal error occurs, reporting its state in `status` and
/// handing its parts to `on_start` once they are built. It serves nothing itself: `crate::server::run` is
/// `piiwall run` (HTTP and the API around this).
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    status: Status,
    on_start: impl FnOnce(Started<'_>),
) -> Result<Summary, Error> {
    if config.kafka.inputs.is_empty() {
        return Err(crate::error::ConfigError("kafka.inputs lists no topic to read".into()).into());
    }
    let Status {
        consuming: ready,
        audit_failing,
        waiting_for_brokers,
        waiting_for_keys,
    } = status;
    let Some(keyring) = open_keyring_waiting(&config.keys, &waiting_for_keys, shutdown.listen()).await? else {
        tracing::info!("stopped while waiting for the key store");
        return Ok(Summary::default());
    };
    let Parts {
        sanitizer,
        routes,
        client,
        producer,
    } = Parts::build(&config, keyring).await?;
    let keyring = sanitizer.keyring().clone();
    let mut consumer_config = client.clone();
    // The next-generation group protocol (KIP-848, `group.protocol = "consumer"`) assigns on the brokers and
    // refuses an assignor setting.
    let broker_assigns = consumer_config.get("group.protocol") == Some("consumer");
    if consumer_config.get("partition.assignment.strategy").is_none() && !broker_assigns {
        // Incremental rebalances: a joining or leaving instance moves only the partitions that change owner, and
        // the others' lanes go on.
        consumer_config.set("partition.assignment.strategy", "cooperative-sticky");
    }
    // Lag per partition (`piiwall_lane_lag`) every 5 s, unless `[kafka.properties]` asks otherwise.
    let statistics = config
        .kafka
        .properties
        .get(STATISTICS_INTERVAL)
        .map_or("5000", String::as_str);
    consumer_config.set(STATISTICS_INTERVAL, statistics);
    let consumer: Arc<PipelineConsumer> = Arc::new(
        consumer_config
            .set("group.id", &config.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Inputs written in transactions are read once committed (the default, stated).
            .set("isolation.level", "read_committed")
            .create_with_context(context::PipelineContext::default())
            .map_err(|e| Error::Kafka(format!("cannot create the consumer: {e}")))?,
    );
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create the admin client: {e}")))?;
    let (auditor, audit_writer) = Auditor::start(
        producer.clone(),
        config.audit.topic.clone(),
        config.audit.instance.clone(),
        keyring.clone(),
        crate::audit::OnFailure::Retry,
        audit_failing,
    );
    let control = Control::new(producer.clone(), config.keys.control_topic.clone());
    // Brokers that do not answer yet (a cluster starting with piiwall, a network not up) are waited for.
    if !wait_for_brokers(&consumer, &waiting_for_brokers, shutdown.listen()).await {
        tracing::info!("stopped while waiting for the brokers");
        return Ok(Summary::default());
    }
    ensure_topics(&admin, &consumer, &config).await?;
    let transactions = match &config.kafka.delivery {
        Delivery::AtLeastOnce => None,
        Delivery::ExactlyOnce { transactional_id } => Some(
            transaction::Transactions::start(&client, transactional_id, consumer.clone(), &config.kafka.inputs[0])
                .await?,
        ),
    };
    let at_least_once = transactions.is_none();
    let Some(control_listener) = crate::control::listen(
        &client,
        &config.keys.control_topic,
        keyring.clone(),
        Some((control.clone(), config.audit.instance.clone())),
        shutdown.listen(),
    )
    .await?
    else {
        tracing::info!("stopped while waiting for the control topic");
        return Ok(Summary::default());
    };
    // The API caches keys (reveal, tokenize): it answers once the control topic is read, so that no forget another
    // instance announces goes unseen by what it caches.
    on_start(Started {
        config: &config,
        sanitizer: &sanitizer,
        routes: &routes,
        auditor: &auditor,
        control: &control,
        client: &client,
    });
    let mut start = AuditEvent::new(AuditKind::Start);
    start.config_digest = Some(config.digest());
    auditor.emit(start).await;

    let inputs: Vec<&str> = config.kafka.inputs.iter().map(String::as_str).collect();
    consumer
        .subscribe(&inputs)
        .map_err(|e| Error::Kafka(format!("cannot subscribe to kafka.inputs: {e}")))?;
    tracing::info!(inputs = ?config.kafka.inputs, group = %config.kafka.group_id, "piiwall running");
    ready.store(true, Ordering::Relaxed);

    let ctx = Arc::new(LaneContext {
        processor: Processor {
            routes,
            sanitizer,
            default_domain: config.keys.default_domain.clone(),
        },
        consumer: consumer.clone(),
        producer,
        transactions,
        output_suffix: config.kafka.output_suffix.clone(),
        quarantine_topic: config.kafka.quarantine_topic.clone(),
        headers_allow: config.kafka.headers_allow.clone(),
        batch_size: config.pipeline.batch_size,
        sanitized: AtomicU64::new(0),
        quarantined: AtomicU64::new(0),
        auditor: auditor.clone(),
        control: control.clone(),
        max_encryptions: config.keys.max_encryptions,
        max_record_bytes: config
            .kafka
            .properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES),
        window: std::sync::Mutex::new(HashMap::new()),
        detected: std::sync::Mutex::new(HashMap::new()),
    });
    let mut metrics_tick = tokio::time::interval(METRICS_INTERVAL);
    let mut reap = tokio::time::interval(REAP_INTERVAL);
    let mut window = tokio::time::interval(config.audit.window);
    window.tick().await;
    let mut window_start = crate::audit::now_ms();
    let mut lanes = Lanes::new(consumer.clone(), config.pipeline.lane_capacity);
    let mut generation: Option<(u64, Arc<ConsumerGroupMetadata>)> = None;
    let mut release = tokio::time::interval(RELEASE_INTERVAL);
    // Ticks missed while nothing was held are not made up in a burst.
    release.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = shutdown.listen();
    let mut commit = tokio::time::interval(config.pipeline.commit_interval);
    let mut expire = tokio::time::interval(QUARANTINE_EXPIRY_INTERVAL);
    let mut failure = None;

    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = commit.tick(), if at_least_once => commit_stored(&consumer, CommitMode::Async),
            _ = window.tick() => window_start = summarize(&ctx, window_start).await,
            _ = metrics_tick.tick() => publish_key_cache(&ctx),
            _ = expire.tick() => expire_quarantine_keys(&ctx, config.kafka.quarantine_retention_days).await,
            _ = release.tick(), if lanes.any_held() => {
                for lane_key in lanes.release_held() {
                    if let Err(e) = close_lane(&consumer, &mut lanes, &lane_key).await {
                        failure = Some(e);
                        break;
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
            _ = reap.tick() => {
                retire_revoked(&consumer, &mut lanes);
                for result in lanes.reap_retired().await {
                    // A rewind is not needed: the partition is read again from its committed offset wherever it
                    // is assigned now.
                    if let Err(e) = result {
                        failure = Some(e);
                    }
                }
                for lane_key in lanes.finished() {
                    if let Err(e) = close_lane(&consumer, &mut lanes, &lane_key).await {
                        failure = Some(e);
                        break;
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
            received = consumer.recv() => {
                let message = match received {
                    Ok(message) => message.detach(),
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        continue;
                    }
                };
                retire_revoked(&consumer, &mut lanes);
                let group = match &ctx.transactions {
                    None => None,
                    Some(_) => match read_generation(&consumer, &mut generation) {
                        Some(group) => Some(group),
                        None => {
                            // Going on would commit past this record: stop, and the restart reads it again.
                            failure = Some(Error::Kafka(
                                "exactly-once: the consumer has no group metadata to commit with".into(),
                            ));
                            break;
                        }
                    },
                };
                let lane_key = (message.topic().to_owned(), message.partition());
                if lanes.is_finished(&lane_key) {
                    match end_lane(&consumer, &lane_key, lanes.close(&lane_key).expect("present")).await {
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                        // This record is read again from the rewound position.
                        Ok(LaneEnd::Rewind(_)) => continue,
                        Ok(LaneEnd::Drained) => {
                            failure = Some(Error::Kafka("a lane stopped while its partition was read".into()));
                            break;
                        }
                    }
                }
                // Never waits: a full lane holds the record and pauses only its own partition (see `lanes`).
                if let Offered::Closed = lanes.offer(lane_key.clone(), lane::Read { message, group }, &ctx)
                    && let Err(e) = close_lane(&consumer, &mut lanes, &lane_key).await
                {
                    failure = Some(e);
                    break;
                }
            }
        }
    }

    // Drain: close every lane, let each finish what it holds, then commit what they stored.
    ready.store(false, Ordering::Relaxed);
    tracing::info!(lanes = lanes.len(), "draining");
    let tasks = lanes.drain();
    let aborts: Vec<tokio::task::AbortHandle> = tasks.iter().map(JoinHandle::abort_handle).collect();
    let drain = async {
        let mut first_error = None;
        for task in tasks {
            // A lane that rewinds now leaves its batch uncommitted: it is read again after the restart.
            if let Err(e) = task
                .await
                .unwrap_or_else(|_| Err(Error::Kafka("a lane panicked".into())))
            {
                first_error.get_or_insert(e);
            }
        }
        first_error
    };
    match tokio::time::timeout(config.pipeline.drain_timeout, drain).await {
        Ok(Some(e)) => {
            failure.get_or_insert(e);
        }
        Ok(None) => {}
        Err(_) => {
            // Not a clean stop: an orchestrator must not take it for one.
            tracing::error!("drain timed out: records in flight will be processed again after restart");
            // Their records were not stored; stopping them lets the consumer be closed below.
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            if let Some(transactions) = &ctx.transactions {
                // A stopped lane may have left its transaction open: readers of the outputs would wait for it.
                let producer = transactions.producer().clone();
                let bound = config.pipeline.drain_timeout;
                bounded_blocking(bound, move || {
                    if let Err(e) = rdkafka::producer::Producer::abort_transaction(&producer, bound) {
                        tracing::debug!(error = %e, "no open transaction aborted at stop");
                    }
                })
                .await;
            }
            failure.get_or_insert(Error::Unavailable(
                "the drain timed out (pipeline.drain_timeout_secs): records in flight are processed again after \
                 the restart"
                    .into(),
            ));
        }
    }
    if at_least_once {
        // Bounded: with the brokers gone a synchronous commit waits for them; what it does not commit is read again
        // after the restart.
        let committing = consumer.clone();
        let committed = bounded_blocking(config.pipeline.drain_timeout, move || {
            commit_stored(&committing, CommitMode::Sync)
        })
        .await;
        if !committed {
            tracing::warn!("final commit not acknowledged within the drain timeout: those records are read again");
        }
    }
    // The encryption counts below a recording step, which a restart would lose. After a drain that timed out an
    // aborted lane's blocking work may still count (its counts are lost as in a crash); bounded by the drain timeout,
    // and before the STOP event, which a slow store must not hold up for long: at most 5 s.
    let counting = keyring.clone();
    let recorded = bounded_blocking(config.pipeline.drain_timeout.min(Duration::from_secs(5)), move || {
        if let Err(e) = counting.record_all_counts() {
            tracing::warn!(error = %e, "the encryption counts of this run's keys were not recorded at stop");
        }
    })
    .await;
    if !recorded {
        tracing::warn!("recording the encryption counts did not finish within the drain timeout");
    }
    summarize(&ctx, window_start).await;
    let mut stop_event = AuditEvent::new(AuditKind::Stop);
    stop_event.config_digest = Some(config.digest());
    auditor.emit(stop_event).await;
    let summary = Summary {
        sanitized: ctx.sanitized.load(Ordering::Relaxed),
        quarantined: ctx.quarantined.load(Ordering::Relaxed),
    };
    tracing::info!(
        sanitized = summary.sanitized,
        quarantined = summary.quarantined,
        "stopped"
    );
    // The audit writer ends once every sender is gone, after writing what it holds.
    drop(ctx);
    drop(auditor);
    if tokio::time::timeout(config.pipeline.drain_timeout, control_listener)
        .await
        .is_err()
    {
        tracing::warn!("the control topic's reader did not stop within the drain timeout");
    }
    // Leaving the group: librdkafka's close waits for the group coordinator, which may be gone.
    drop(lanes);
    if Arc::strong_count(&consumer) > 1 {
        tracing::warn!(
            "a lane that did not stop still holds the consumer: the group drops this member after its session timeout"
        );
    }
    if !bounded_blocking(config.pipeline.drain_timeout, move || drop(consumer)).await {
        tracing::warn!(
            "leaving the consumer group did not finish within the drain timeout: the group drops this member after \
             its session timeout"
        );
    }
    match tokio::time::timeout(config.pipeline.drain_timeout, audit_writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            failure.get_or_insert(e);
        }
        _ => {
            failure.get_or_insert(Error::Kafka("the audit writer did not finish".into()));
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Runs a blocking librdkafka call that may wait on brokers that are gone (a synchronous commit, closing the
/// consumer) on a thread of its own, and waits for it at most `bound`; past that it is abandoned, so neither the
/// pipeline's stop nor the runtime's shutdown waits on it (the thread ends when librdkafka gives up, or with the
/// process). True when it finished in time.
async fn bounded_blocking(bound: Duration, call: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        call();
        let _ = done.send(());
    });
    tokio::time::timeout(bound, finished).await.is_ok()
}

/// Closes the lanes of the partitions revoked since the last look.
fn retire_revoked(consumer: &PipelineConsumer, lanes: &mut Lanes) {
    for lane_key in consumer.context().take_revoked() {
        lanes.revoke(&lane_key);
    }
}

/// The group metadata records read now belong to, refreshed after each rebalance.
fn read_generation(
    consumer: &PipelineConsumer,
    cached: &mut Option<(u64, Arc<ConsumerGroupMetadata>)>,
) -> Option<Arc<ConsumerGroupMetadata>> {
    let rebalances = consumer.context().rebalances();
    match cached {
        Some((seen, group)) if *seen == rebalances => Some(group.clone()),
        _ => {
            let group = Arc::new(consumer.group_metadata()?);
            *cached = Some((rebalances, group.clone()));
            Some(group)
        }
    }
}

/// Waits until the brokers answer a metadata request, asking again with backoff (1 s doubling to 30 s) and saying
/// so on `/readyz` and in `piiwall_waiting_for_brokers`. False when a shutdown came first.
async fn wait_for_brokers(
    consumer: &Arc<PipelineConsumer>,
    waiting: &Arc<std::sync::atomic::AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_secs(1);
    loop {
        let asking = consumer.clone();
        let answer = tokio::task::spawn_blocking(move || asking.fetch_metadata(None, METADATA_TIMEOUT).map(|_| ()));
        let error = tokio::select! {
            answer = answer => match answer {
                Ok(Ok(())) => break,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the metadata request panicked".to_owned(),
            },
            _ = stop.changed() => return false,
        };
        if !waiting.swap(true, Ordering::Relaxed) {
            metrics::gauge!("piiwall_waiting_for_brokers").set(1.0);
        }
        tracing::warn!(error = %error, retry_in_secs = backoff.as_secs(), "the Kafka brokers do not answer; waiting");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    if waiting.swap(false, Ordering::Relaxed) {
        metrics::gauge!("piiwall_waiting_for_brokers").set(0.0);
        tracing::info!("the Kafka brokers answer");
    }
    true
}

/// Ends a lane that stopped while its partition was still read: a rewind is expected (its transaction aborted),
/// anything else stops the pipeline.
async fn close_lane(consumer: &PipelineConsumer, lanes: &mut Lanes, lane_key: &PartitionKey) -> Result<(), Error> {
    let task = lanes.close(lane_key).expect("present");
    match end_lane(consumer, lane_key, task).await? {
        LaneEnd::Rewind(_) => Ok(()),
        LaneEnd::Drained => Err(Error::Kafka("a lane stopped while its partition was read".into())),
    }
}

/// Awaits a lane that ended. A lane whose transaction was aborted asks for its partition to be read again from its
/// batch's first offset; a partition no longer assigned here is read by its new owner from the committed offset.
async fn end_lane(
    consumer: &PipelineConsumer,
    (topic, partition): &PartitionKey,
    task: JoinHandle<Result<LaneEnd, Error>>,
) -> Result<LaneEnd, Error> {
    let end = task
        .await
        .unwrap_or_else(|_| Err(Error::Kafka("a lane panicked".into())))?;
    if let LaneEnd::Rewind(offset) = end {
        match consumer.seek(topic, *partition, rdkafka::Offset::Offset(offset), METADATA_TIMEOUT) {
            Ok(()) => tracing::info!(%topic, partition, offset, "partition rewound to an aborted batch"),
            Err(e) => {
                let still_ours = consumer
                    .assignment()
                    .map(|a| a.find_partition(topic, *partition).is_some())
                    .unwrap_or(true);
                if still_ours {
                    // Going on would skip the aborted batch: stop, and the restart reads from the committed offset.
                    return Err(Error::Kafka(format!(
                        "cannot rewind {topic}/{partition} to an aborted batch: {e}"
                    )));
                }
                tracing::info!(%topic, partition, error = %e, "aborted batch left to the partition's new owner");
            }
        }
    }
    Ok(end)
}

/// Emits one processing summary per input topic for the window that ends now; returns the next window's start.
async fn summarize(ctx: &LaneContext, window_start: i64) -> i64 {
    let now = crate::audit::now_ms();
    let counts: Vec<((String, u32), u64)> = ctx.window.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    let mut detected = std::mem::take(&mut *ctx.detected.lock().unwrap_or_else(|p| p.into_inner()));
    for ((topic, schema_id), records) in counts.into_iter().filter(|(_, n)| *n > 0) {
        let mut event = AuditEvent::new(AuditKind::ProcessingSummary);
        event.schema_id = Some(schema_id as i32);
        if let routes::Route::Ready(route) = ctx.processor.routes.get(&topic, schema_id) {
            // Each rule is applied once per sanitized record (per item for arrays and maps).
            event.counts = route
                .schema
                .plan
                .rules
                .iter()
                .map(|rule| FieldCount {
                    field_path: rule.path.clone(),
                    action: rule.action.name().to_owned(),
                    count: records as i64,
                })
                .collect();
        }
        // Detections in unannotated fields ride on the topic's first summary of the window.
        event
            .counts
            .extend(detection_counts(detected.remove(&topic).unwrap_or_default()));
        event.topic = Some(topic);
        event.window = Some((window_start, now));
        ctx.auditor.emit(event).await;
    }
    // A topic whose every record went to quarantine (policy.detect = "quarantine") has no summary above: its
    // detections get one of their own.
    for (topic, detections) in detected {
        let mut event = AuditEvent::new(AuditKind::ProcessingSummary);
        event.counts = detection_counts(detections);
        event.topic = Some(topic);
        event.window = Some((window_start, now));
        ctx.auditor.emit(event).await;
    }
    now
}

/// Detections as audit counts: per field path, `detected <detector> (<action>)`.
fn detection_counts(detections: crate::transcode::Detections) -> Vec<FieldCount> {
    detections
        .into_iter()
        .map(|(detection, count)| FieldCount {
            field_path: detection.path.to_string(),
            action: format!("detected {} ({})", detection.kind.name(), detection.mode.name()),
            count: count as i64,
        })
        .collect()
}

/// Publishes the keyring's totals (counted with atomics on the hot path): cache hits and misses, keys created, and
/// the key store's calls and time (their ratio is the store's mean latency).
fn publish_key_cache(ctx: &LaneContext) {
    let stats = ctx.processor.sanitizer.keyring().stats();
    let total = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    metrics::counter!("piiwall_key_cache_total", "outcome" => "hit").absolute(total(&stats.hits));
    metrics::counter!("piiwall_key_cache_total", "outcome" => "miss").absolute(total(&stats.misses));
    metrics::counter!("piiwall_keys_created_total").absolute(total(&stats.created));
    metrics::counter!("piiwall_key_store_calls_total").absolute(total(&stats.store_calls));
    metrics::counter!("piiwall_key_store_microseconds_total").absolute(total(&stats.store_nanos) / 1_000);
}

/// Warns about each of piiwall's topics with fewer than 3 replicas on a cluster of 3 brokers or more: with
/// `acks=all`, a topic of one replica loses acknowledged records (and the forget ledger) with its broker.
fn warn_under_replicated(consumer: &PipelineConsumer, topics: &[(String, i32)]) {
    let Ok(metadata) = consumer.fetch_metadata(None, METADATA_TIMEOUT) else {
        return;
    };
    let replicas: Vec<(String, usize)> = topics
        .iter()
        .filter_map(|(name, _)| {
            let topic = metadata.topics().iter().find(|t| t.name() == name)?;
            let fewest = topic.partitions().iter().map(|p| p.replicas().len()).min()?;
            Some((name.clone(), fewest))
        })
        .collect();
    for warning in under_replicated(metadata.brokers().len(), &replicas) {
        tracing::warn!("{warning}");
    }
}

/// The topics (name, fewest replicas of a partition) that have fewer than 3 replicas where `brokers` could hold 3.
fn under_replicated(brokers: usize, topics: &[(String, usize)]) -> Vec<String> {
    if brokers < 3 {
        return Vec::new();
    }
    topics
        .iter()
        .filter(|(_, replicas)| *replicas < 3)
        .map(|(name, replicas)| {
            format!(
                "topic {name} has {replicas} replica(s) on a cluster of {brokers} brokers: a broker's loss can lose \
                 acknowledged records (set kafka.topic_replication, or the brokers' default.replication.factor)"
            )
        })
        .collect()
}

/// How often the daily quarantine keys past their retention are looked for (and at start-up).
const QUARANTINE_EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);

/// Destroys the daily quarantine keys past `kafka.quarantine_retention_days`. A failure is retried at the next tick.
async fn expire_quarantine_keys(ctx: &Arc<LaneContext>, retention_days: u64) {
    let keyring = ctx.processor.sanitizer.keyring().clone();
    let expired = tokio::task::spawn_blocking(move || {
        let today = keyring.store_today()?;
        let here = crate::keys::today();
        if today.abs_diff(here) > 1 {
            tracing::warn!(
                store_day = today,
                host_day = here,
                "this host's clock and the key store's disagree by more than a day: quarantine keys expire by the \
                 store's clock; set the host's clock right"
            );
        }
        keyring.expire_quarantine_keys(retention_days, today)
    })
    .await;
    match expired {
        Ok(Ok(0)) => {}
        Ok(Ok(destroyed)) => tracing::info!(destroyed, "quarantine keys past their retention destroyed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "quarantine keys not expired: retried within the hour"),
        Err(_) => tracing::warn!("quarantine key expiry panicked: retried within the hour"),
    }
}

fn commit_stored(consumer: &PipelineConsumer, mode: CommitMode) {
    if let Err(e) = consumer.commit_consumer_state(mode) {
        // Nothing stored since the last commit is the common case, not a problem.
        tracing::debug!(error = %e, "commit skipped");
    }
}

/// Creates missing output topics with their input's partition count, and the quarantine topic.
async fn ensure_topics(
    admin: &AdminClient<DefaultClientContext>,
    consumer: &PipelineConsumer,
    config: &Config,
) -> Result<(), Error> {
    let mut wanted: Vec<(String, i32)> = Vec::new();
    for input in &config.kafka.inputs {
        let metadata = consumer
            .fetch_metadata(Some(input), METADATA_TIMEOUT)
            .map_err(|e| Error::Kafka(format!("cannot read the metadata of input topic {input}: {e}")))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(Error::Kafka(format!(
                "input topic {input} does not exist (kafka.inputs)"
            )));
        }
        wanted.push((format!("{input}{}", config.kafka.output_suffix), partitions as i32));
    }
    wanted.push((config.kafka.quarantine_topic.clone(), 1));
    wanted.push((config.audit.topic.clone(), 1));
    wanted.push((config.keys.control_topic.clone(), 1));
    let min_insync = config.kafka.min_insync_replicas.map(|n| n.to_string());
    let mut missing = Vec::new();
    for (topic, partitions) in &wanted {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(|e| Error::Kafka(format!("cannot read the metadata of topic {topic}: {e}")))?;
        if metadata.topics().first().is_none_or(|t| t.partitions().is_empty()) {
            let mut new = NewTopic::new(
                topic,
                *partitions,
                TopicReplication::Fixed(config.kafka.topic_replication),
            );
            if let Some(min) = &min_insync {
                new = new.set("min.insync.replicas", min);
            }
            if *topic == config.keys.control_topic {
                new = append_only(new);
            }
            missing.push(new);
        }
    }
    if !missing.iter().any(|topic| topic.name == config.keys.control_topic) {
        check_ledger(admin, &config.keys.control_topic).await?;
    }
    if missing.is_empty() {
        warn_under_replicated(consumer, &wanted);
        return Ok(());
    }
    let results = admin
        .create_topics(&missing, &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)))
        .await
        .map_err(|e| Error::Kafka(format!("cannot create topics: {e}")))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, "topic created"),
            Err((topic, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(%topic, "topic exists")
            }
            Err((topic, code)) => return Err(Error::Kafka(format!("cannot create topic {topic}: {code}"))),
        }
    }
    warn_under_replicated(consumer, &wanted);
    Ok(())
}

/// The forget ledger's settings: append-only and kept forever. Compaction would let a later message for a scope (a
/// rotation, or anyone's tombstone) erase its forget; retention would drop it after a while. Either way, a key
/// store restored from a backup would not forget that subject again (`keys reapply-forgets`).
fn append_only(topic: NewTopic<'_>) -> NewTopic<'_> {
    topic
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1")
}

/// Creates the control topic append-only unless it exists, and refuses one that exists and is not: for the command
/// line, which may announce a forget before any `run` created the topic (a broker's auto-creation would give it a
/// retention of days). An existing topic is only described, never created again, so a principal allowed to write
/// and describe it but not to create topics announces as before.
pub async fn ensure_ledger(client: &ClientConfig, config: &Config) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create a Kafka admin client: {e}")))?;
    let topic = config.keys.control_topic.clone();
    let probe: rdkafka::consumer::BaseConsumer = client
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create a Kafka client: {e}")))?;
    let named = topic.clone();
    let exists = tokio::task::spawn_blocking(move || {
        probe
            .fetch_metadata(Some(&named), METADATA_TIMEOUT)
            .map(|metadata| metadata.topics().first().is_some_and(|t| !t.partitions().is_empty()))
    })
    .await
    .map_err(|_| Error::Kafka("reading the control topic's metadata panicked".into()))?
    .map_err(|e| Error::Kafka(format!("cannot read the metadata of the control topic {topic}: {e}")))?;
    if !exists {
        let mut new = append_only(NewTopic::new(
            &topic,
            1,
            TopicReplication::Fixed(config.kafka.topic_replication),
        ));
        let min_insync = config.kafka.min_insync_replicas.map(|n| n.to_string());
        if let Some(min) = &min_insync {
            new = new.set("min.insync.replicas", min);
        }
        let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        let results = admin
            .create_topics([&new], &options)
            .await
            .map_err(|e| Error::Kafka(format!("cannot create the control topic {topic}: {e}")))?;
        for result in results {
            match result {
                Ok(_) => return Ok(()),
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::Kafka(format!("cannot create the control topic {topic}: {code}")));
                }
            }
        }
    }
    check_ledger(&admin, &topic).await
}

/// Refuses a control topic (the forget ledger) that is compacted or whose records expire: a forget could leave it,
/// and `keys reapply-forgets` after a backup restore would then miss it. Created so by an earlier version, by hand, or
/// by a broker's auto-creation; piiwall creates it append-only. A broker that cannot describe topic configurations
/// is not asked again (start-up goes on).
async fn check_ledger(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<(), Error> {
    use rdkafka::admin::ResourceSpecifier;
    let specifier = ResourceSpecifier::Topic(topic);
    let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
    let resource = match admin.describe_configs([&specifier], &options).await {
        Ok(results) => results.into_iter().find_map(|r| r.ok()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot describe the control topic's configuration");
            None
        }
    };
    let Some(resource) = resource else {
        return Ok(());
    };
    let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
    let problems = ledger_problems(
        value("cleanup.policy").as_deref(),
        value("retention.ms").as_deref(),
        value("retention.bytes").as_deref(),
    );
    metrics::gauge!("piiwall_control_topic_not_append_only").set(if problems.is_empty() { 0.0 } else { 1.0 });
    if problems.is_empty() {
        return Ok(());
    }
    Err(crate::error::ConfigError(format!(
        "the control topic {topic} (keys.control_topic, the forget ledger) is not append-only ({}): a forget could \
         leave it, and a key store restored from a backup would not forget that subject again. Set \
         cleanup.policy=delete, retention.ms=-1 and retention.bytes=-1 on it (kafka-configs --alter --entity-type \
         topics --entity-name {topic} --add-config cleanup.policy=delete,retention.ms=-1,retention.bytes=-1), then \
         start again",
        problems.join(", ")
    ))
    .into())
}

/// What keeps a topic from being an append-only ledger; `None` is a setting the topic does not have (a broker's
/// default: 7 days of retention on Kafka, no byte limit).
fn ledger_problems(cleanup: Option<&str>, retention_ms: Option<&str>, retention_bytes: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(policy) = cleanup.filter(|p| p.contains("compact")) {
        problems.push(format!("cleanup.policy is {policy}"));
    }
    if retention_ms != Some("-1") {
        problems.push(format!(
            "retention.ms is {}",
            retention_ms.unwrap_or("the brokers' default")
        ));
    }
    if let Some(bytes) = retention_bytes.filter(|b| *b != "-1") {
        problems.push(format!("retention.bytes is {bytes}"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_is_append_only_and_kept_forever() {
        assert!(ledger_problems(Some("delete"), Some("-1"), Some("-1")).is_empty());
        assert!(
            ledger_problems(None, Some("-1"), None).is_empty(),
            "no byte limit by default"
        );
        assert_eq!(
            ledger_problems(Some("compact,delete"), None, Some("1000")),
            [
                "cleanup.policy is compact,delete",
                "retention.ms is the brokers' default",
                "retention.bytes is 1000"
            ]
        );
        assert_eq!(
            ledger_problems(None, Some("604800000"), None),
            ["retention.ms is 604800000"]
        );
    }

    #[test]
    fn topics_with_fewer_than_three_replicas_are_named_on_clusters_of_three() {
        let topics = [("out".to_owned(), 1), ("audit".to_owned(), 3)];
        assert!(under_replicated(1, &topics).is_empty(), "one broker holds one replica");
        let warnings = under_replicated(3, &topics);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("topic out has 1 replica(s) on a cluster of 3 brokers"),
            "{}",
            warnings[0]
        );
    }
}

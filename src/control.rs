//! The control topic (`keys.control_topic`, compacted): how a forget or a rotation done by one instance reaches the
//! key cache of every other instance sharing the key store.
//!
//! A record's key is the affected key scope (a domain name, or a subject's keyed hash: never a subject id); its
//! value names the operation. Every instance reads the topic from its end while it runs, polling every
//! [`POLL`], and drops the scope from its caches. The bound on "every instance stops using a forgotten key" is
//! therefore the producer's acknowledgement plus one poll and fetch round (measured in `tests/subject_api.rs`);
//! the cache TTL (`keys.cache_ttl_secs`) bounds it too should the control topic be unreachable. A restarted
//! instance starts with empty caches and reads the store, which already records the forget, so it needs no history.
//!
//! The topic is also the ledger of forgets outside the key store: [`forgotten_scopes`] reads them all back so that a
//! key store restored from a backup can be made to forget again (`piiwall keys reapply-forgets`).
//!
//! Anyone with write access to the topic could otherwise forge that ledger, so:
//! - every message is signed: its value is `<op> <MAC>`, an HMAC-SHA256 (URL-safe base64) over the operation and
//!   the scope under a key derived from the key store's own subject-index key ([`Keyring::control_mac`]), which only
//!   holders of the KEK can unwrap, and which a restored backup of the store still has. Unsigned or badly signed
//!   messages are ignored (and counted): they neither drop cache entries nor enter the ledger;
//! - the ledger only forgets subject scopes (`s:`): a domain key is never destroyed from the topic;
//! - the topic is created append-only (`cleanup.policy=delete`, infinite retention), so no later message — a
//!   rotation, or a tombstone for the scope — can erase a forget by compaction.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;

use crate::producer::Producer;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::keys::Keyring;

/// How long one poll of the control topic waits.
pub const POLL: Duration = Duration::from_millis(50);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading the whole control topic back may take.
const READ_DEADLINE: Duration = Duration::from_secs(300);

/// What happened to a key scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOp {
    Forget,
    Rotate,
}

impl ControlOp {
    fn name(self) -> &'static str {
        match self {
            ControlOp::Forget => "forget",
            ControlOp::Rotate => "rotate",
        }
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"forget" => Some(ControlOp::Forget),
            b"rotate" => Some(ControlOp::Rotate),
            _ => None,
        }
    }
}

/// What a MAC of a control message covers: the operation and the scope, unambiguously.
fn signed_bytes(op: ControlOp, scope: &str) -> Vec<u8> {
    [op.name().as_bytes(), b"\0", scope.as_bytes()].concat()
}

/// The value of a control message: `<op> <MAC>`.
pub fn sign(keyring: &Keyring, op: ControlOp, scope: &str) -> Vec<u8> {
    let mac = keyring.control_mac(&signed_bytes(op, scope));
    format!("{} {}", op.name(), URL_SAFE_NO_PAD.encode(mac)).into_bytes()
}

/// The operation a control message announces, when its signature holds; `None` for an unsigned, forged or
/// malformed message, or one signed by instances of another key store.
pub fn verify(keyring: &Keyring, scope: &str, value: &[u8]) -> Option<ControlOp> {
    let space = value.iter().position(|&b| b == b' ')?;
    let op = ControlOp::from_name(&value[..space])?;
    let mac = URL_SAFE_NO_PAD.decode(&value[space + 1..]).ok()?;
    let expected = keyring.control_mac(&signed_bytes(op, scope));
    bool::from(expected.ct_eq(mac.as_slice())).then_some(op)
}

/// What an acknowledgement's MAC covers: the scope, the instance and the position of the forget it answers, each
/// length-prefixed, under a label no other control message uses.
fn ack_bytes(scope: &str, instance: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut bytes = b"ack\0".to_vec();
    for field in [scope.as_bytes(), instance.as_bytes()] {
        bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
        bytes.extend_from_slice(field);
    }
    bytes.extend_from_slice(&partition.to_be_bytes());
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes
}

/// The value of an acknowledgement of the forget at (`partition`, `offset`): `ack <MAC> <partition> <offset>
/// <instance>`. Bound to that message, an old acknowledgement is never counted for a later forget of the scope.
pub fn sign_ack(keyring: &Keyring, scope: &str, instance: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mac = keyring.control_mac(&ack_bytes(scope, instance, partition, offset));
    format!("ack {} {partition} {offset} {instance}", URL_SAFE_NO_PAD.encode(mac)).into_bytes()
}

/// (instance, partition, offset of the forget it answers) of an acknowledgement of `scope`, when its signature
/// holds.
pub fn verify_ack(keyring: &Keyring, scope: &str, value: &[u8]) -> Option<(String, i32, i64)> {
    let text = std::str::from_utf8(value.strip_prefix(b"ack ")?).ok()?;
    let mut parts = text.splitn(4, ' ');
    let mac = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
    let partition: i32 = parts.next()?.parse().ok()?;
    let offset: i64 = parts.next()?.parse().ok()?;
    let instance = parts.next()?;
    let expected = keyring.control_mac(&ack_bytes(scope, instance, partition, offset));
    bool::from(expected.ct_eq(mac.as_slice())).then(|| (instance.to_owned(), partition, offset))
}

/// A reader of the control topic: no group (every reader reads every message), nothing committed, short fetch
/// waits.
fn control_consumer(client: &ClientConfig) -> Result<BaseConsumer, Error> {
    client
        .clone()
        .set("group.id", "piiwall.control.unused")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create the control topic consumer: {e}")))
}

/// The instances that acknowledged a forget of every one of `scopes`, reading the control topic from `from` (where
/// the announcements landed) for `wait`. Acknowledgements come from each running instance's listener once it has
/// dropped the scope from its caches; one that does not answer within `wait` is not listed.
pub fn acknowledgements(
    client: &ClientConfig,
    topic: &str,
    keyring: &Keyring,
    scopes: &[String],
    from: &[(i32, i64)],
    wait: Duration,
) -> Result<Vec<String>, Error> {
    if from.iter().any(|&(_, offset)| offset < 0) {
        // No position (a producer without acknowledgements): nothing can be bound to this forget.
        return Ok(Vec::new());
    }
    let consumer = control_consumer(client)?;
    let mut assignment = TopicPartitionList::new();
    let mut starts: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for &(partition, offset) in from {
        let start = starts.entry(partition).or_insert(offset);
        *start = (*start).min(offset);
    }
    for (partition, offset) in starts {
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(|e| Error::Kafka(format!("control topic assignment: {e}")))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| Error::Kafka(format!("cannot read the control topic {topic}: {e}")))?;
    let mut acked: std::collections::BTreeMap<String, std::collections::BTreeSet<&str>> = Default::default();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(POLL) else {
            continue;
        };
        let Some(scope) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        let Some(scope) = scopes.iter().find(|s| *s == scope) else {
            continue;
        };
        if let Some((instance, partition, offset)) = message.payload().and_then(|v| verify_ack(keyring, scope, v))
            && from.contains(&(partition, offset))
        {
            acked.entry(instance).or_default().insert(scope.as_str());
        }
    }
    Ok(acked
        .into_iter()
        .filter(|(_, acked)| acked.len() == scopes.len())
        .map(|(instance, _)| instance)
        .collect())
}

/// Announces forgets and rotations on the control topic.
#[derive(Clone)]
pub struct Control {
    producer: Producer,
    topic: String,
}

impl Control {
    pub fn new(producer: Producer, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Publishes `op` on `scope`, signed, and waits for the broker's acknowledgement; returns where it landed
    /// (partition, offset), from which [`acknowledgements`] reads the instances' answers.
    pub async fn announce(&self, keyring: &Keyring, op: ControlOp, scope: &str) -> Result<(i32, i64), Error> {
        self.publish(scope, sign(keyring, op, scope), None).await
    }

    /// Publishes this instance's acknowledgement of the forget of `scope` at (`partition`, `offset`), on the same
    /// partition (see [`acknowledgements`]).
    pub async fn acknowledge(
        &self,
        keyring: &Keyring,
        scope: &str,
        instance: &str,
        (partition, offset): (i32, i64),
    ) -> Result<(i32, i64), Error> {
        self.publish(
            scope,
            sign_ack(keyring, scope, instance, partition, offset),
            Some(partition),
        )
        .await
    }

    async fn publish(&self, scope: &str, value: Vec<u8>, partition: Option<i32>) -> Result<(i32, i64), Error> {
        let lease = self.producer.lease();
        let sent = lease
            .producer()
            .send(
                {
                    let record = FutureRecord::to(&self.topic).key(scope.as_bytes()).payload(&value);
                    match partition {
                        Some(partition) => record.partition(partition),
                        None => record,
                    }
                },
                SEND_TIMEOUT,
            )
            .await;
        match sent {
            Ok(delivery) => {
                self.producer.delivered(&lease);
                Ok((delivery.partition, delivery.offset))
            }
            Err((e, _)) => {
                self.producer.failed(&lease, &e);
                Err(Error::Kafka(format!(
                    "cannot announce on the control topic {}: {e}",
                    self.topic
                )))
            }
        }
    }
}

/// The forgets of the control topic's ledger.
pub struct Ledger {
    /// Every subject scope announced as forgotten by a signed message.
    pub scopes: Vec<String>,
    /// Messages that were not taken: unsigned (written before messages were signed), forged, or a forget of
    /// something other than a subject.
    pub ignored: usize,
}

/// Every subject scope ever announced as forgotten on the control topic, read from its start to its end; only
/// signed announcements count (see the module's documentation).
pub fn forgotten_scopes(client: &ClientConfig, topic: &str, keyring: &Keyring) -> Result<Ledger, Error> {
    let mut scopes = std::collections::BTreeSet::new();
    let mut ignored = 0;
    crate::topic_reader::read_topic(client, topic, "control topic", READ_DEADLINE, |message| {
        let scope = message.key().and_then(|k| std::str::from_utf8(k).ok());
        match (scope, message.payload()) {
            (Some(scope), Some(value)) if verify_ack(keyring, scope, value).is_some() => {}
            (Some(scope), Some(value)) => match verify(keyring, scope, value) {
                Some(ControlOp::Forget) if scope.starts_with("s:") => {
                    scopes.insert(scope.to_owned());
                }
                Some(ControlOp::Rotate) => {}
                _ => ignored += 1,
            },
            _ => ignored += 1,
        }
        Ok(())
    })?;
    Ok(Ledger {
        scopes: scopes.into_iter().collect(),
        ignored,
    })
}

/// Reads the control topic from its current end until `stop`, dropping each announced scope from `keyring`'s
/// caches. Returns once the consumer is assigned, so announcements made after it returns are seen; `None` when
/// `stop` came first.
pub async fn listen(
    client: &ClientConfig,
    topic: &str,
    keyring: Arc<Keyring>,
    acknowledge: Option<(Control, String)>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
    let consumer = control_consumer(client)?;
    let topic = topic.to_owned();
    let starting = stop.clone();
    let consumer = tokio::task::spawn_blocking(move || -> Result<Option<BaseConsumer>, Error> {
        let metadata = consumer
            .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
            .map_err(|e| Error::Kafka(format!("cannot read the metadata of the control topic {topic}: {e}")))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(Error::Kafka(format!("the control topic {topic} does not exist")));
        }
        // From each partition's end as the brokers answer it now, not `Offset::End`, which the consumer resolves
        // some time after `assign` returns: an announcement made in between would be skipped.
        // A partition without a leader for a while (a broker restarting) is waited for, with backoff, not an error.
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            let mut wait = Duration::from_millis(500);
            let end = loop {
                match consumer.fetch_watermarks(&topic, partition, METADATA_TIMEOUT) {
                    Ok((_, end)) => break end,
                    Err(_) if *starting.borrow() => return Ok(None),
                    Err(e) => {
                        tracing::warn!(%topic, partition, error = %e, retry_in_ms = wait.as_millis() as u64,
                            "cannot read where the control topic ends: asking again");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            };
            assignment
                .add_partition_offset(&topic, partition, Offset::Offset(end))
                .map_err(|e| Error::Kafka(format!("control topic assignment: {e}")))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| Error::Kafka(format!("cannot read the control topic {topic}: {e}")))?;
        Ok(Some(consumer))
    })
    .await
    .map_err(|_| Error::Kafka("the control topic consumer panicked".into()))??;
    let Some(consumer) = consumer else {
        return Ok(None);
    };
    let runtime = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        let mut unsigned_log = Throttle::new(UNSIGNED_LOG_PERIOD);
        while !*stop.borrow_and_update() {
            match consumer.poll(POLL) {
                None => {}
                Some(Err(e)) => tracing::warn!(error = %e, "control topic read failed"),
                Some(Ok(message)) => {
                    let scope = message.key().and_then(|k| std::str::from_utf8(k).ok());
                    let op = scope.zip(message.payload()).and_then(|(scope, value)| {
                        if verify_ack(&keyring, scope, value).is_some() {
                            return Some("ack");
                        }
                        let op = verify(&keyring, scope, value)?;
                        match op {
                            ControlOp::Forget => keyring.invalidate_forgotten(scope),
                            ControlOp::Rotate => keyring.invalidate_scope(scope),
                        }
                        // Said once the caches no longer hold the scope: what an erasure receipt lists.
                        if let (ControlOp::Forget, Some((control, instance))) = (op, &acknowledge) {
                            let (control, instance, keyring) = (control.clone(), instance.clone(), keyring.clone());
                            let (scope, at) = (scope.to_owned(), (message.partition(), message.offset()));
                            runtime.spawn(async move {
                                if let Err(e) = control.acknowledge(&keyring, &scope, &instance, at).await {
                                    tracing::warn!(error = %e, "a forget could not be acknowledged on the control topic");
                                }
                            });
                        }
                        Some(op.name())
                    });
                    let op = op.unwrap_or("unsigned");
                    metrics::counter!("piiwall_control_messages_total", "op" => op).increment(1);
                    if op == "unsigned" {
                        // Anyone who may write the topic could flood it: one line a minute, with the count.
                        if let Some(ignored) = unsigned_log.event(std::time::Instant::now()) {
                            tracing::warn!(ignored, "control messages without a valid signature ignored");
                        }
                    } else {
                        tracing::debug!(op, "key cache entry dropped on announcement");
                    }
                }
            }
        }
    });
    Ok(Some(task))
}

/// How often ignored (unsigned or forged) control messages are logged at most.
const UNSIGNED_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Lets one log line through per period, counting the events in between.
struct Throttle {
    period: Duration,
    last: Option<std::time::Instant>,
    pending: u64,
}

impl Throttle {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            pending: 0,
        }
    }

    /// Records an event at `now`; returns how many events to report (this one included) when a line is due.
    fn event(&mut self, now: std::time::Instant) -> Option<u64> {
        self.pending += 1;
        if self.last.is_some_and(|last| now.duration_since(last) < self.period) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::LocalKek;
    use crate::keys::{KeyCacheSettings, SqliteStore};

    fn keyring(dir: &std::path::Path) -> Keyring {
        let store = Arc::new(SqliteStore::open(&dir.join("keys.db")).unwrap());
        Keyring::open(
            store,
            Arc::new(LocalKek::from_bytes(&[3; 32]).unwrap()),
            KeyCacheSettings::default(),
        )
        .unwrap()
    }

    #[test]
    fn ignored_messages_are_logged_once_a_period_with_their_count() {
        let start = std::time::Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(60));
        assert_eq!(throttle.event(start), Some(1), "the first is logged");
        for i in 1..=1000 {
            assert_eq!(throttle.event(start + Duration::from_millis(i)), None, "a flood is not");
        }
        assert_eq!(
            throttle.event(start + Duration::from_secs(61)),
            Some(1001),
            "the next line counts them all"
        );
    }

    #[test]
    fn only_messages_signed_for_this_key_store_are_taken() {
        let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ring, other) = (keyring(dir.path()), keyring(other_dir.path()));
        let signed = sign(&ring, ControlOp::Forget, "s:abc");
        assert_eq!(verify(&ring, "s:abc", &signed), Some(ControlOp::Forget));
        assert_eq!(
            verify(&keyring(dir.path()), "s:abc", &signed),
            Some(ControlOp::Forget),
            "another instance of the same store (or a restored backup) checks it"
        );
        assert_eq!(verify(&ring, "s:abd", &signed), None, "moved to another scope");
        assert_eq!(verify(&other, "s:abc", &signed), None, "another store's key");
        let as_rotate = [b"rotate".as_slice(), &signed[6..]].concat();
        assert_eq!(verify(&ring, "s:abc", &as_rotate), None, "relabelled operation");
        for forged in [&b"forget"[..], b"forget ", b"forget AAAA", b"", b"delete x"] {
            assert_eq!(verify(&ring, "s:abc", forged), None);
        }
        let rotate = sign(&ring, ControlOp::Rotate, "d:sales");
        assert_eq!(verify(&ring, "d:sales", &rotate), Some(ControlOp::Rotate));
    }

    /// An acknowledgement answers one forget message: moved to another position (an old one replayed for a later
    /// forget of the scope), another scope or another instance name, or read as a forget, it is not taken.
    #[test]
    fn acknowledgements_are_bound_to_the_forget_they_answer() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(dir.path());
        let ack = sign_ack(&ring, "s:abc", "piiwall 1", 0, 41);
        assert_eq!(verify_ack(&ring, "s:abc", &ack), Some(("piiwall 1".to_owned(), 0, 41)));
        let replayed = String::from_utf8(ack.clone()).unwrap().replace(" 0 41 ", " 0 57 ");
        assert_eq!(
            verify_ack(&ring, "s:abc", replayed.as_bytes()),
            None,
            "another forget's position"
        );
        let renamed = String::from_utf8(ack.clone())
            .unwrap()
            .replace("piiwall 1", "piiwall 2");
        assert_eq!(verify_ack(&ring, "s:abc", renamed.as_bytes()), None, "another instance");
        assert_eq!(verify_ack(&ring, "s:abd", &ack), None, "another scope");
        assert_eq!(verify(&ring, "s:abc", &ack), None, "an acknowledgement is no forget");
        let forget = sign(&ring, ControlOp::Forget, "s:abc");
        assert_eq!(
            verify_ack(&ring, "s:abc", &forget),
            None,
            "a forget is no acknowledgement"
        );
    }
}

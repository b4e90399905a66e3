//! The producer a run's writers share (lanes, audit writer, control announcements), which replaces itself when it
//! can no longer deliver.
//!
//! An idempotent producer carries state the brokers must remember (its producer id and sequence numbers). A
//! producer that librdkafka calls fatally failed, or whose deliveries the brokers keep refusing, is of no further
//! use (librdkafka's documented remedy is a new instance): a broker that lost that state in a restart, for one,
//! answers every later write of the old producer with an error. Writers report each failed delivery here; after
//! [`RENEW_AFTER`] refusals in a row from the brokers (not timeouts or lost connections: a new producer would meet
//! the same outage), or one fatal error, the next lease is a new producer (the first at once, later ones
//! [`RENEW_INTERVAL`] apart). Reports about a producer already replaced are ignored; a replaced producer is dropped
//! on a thread of its own once its last writer lets go of it. The records of the failed writes are
//! still in their writers' hands and are written again (at-least-once: duplicates carry their source coordinates).
//! Exactly-once writes go through the transactional producer instead, which is never replaced behind a
//! transaction's back.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer as _};

use crate::error::Error;

/// Refusals in a row from the brokers after which the producer is replaced.
pub const RENEW_AFTER: u32 = 3;
/// The least age of a producer before it is replaced (the first producer excepted), fatal error or not: a cause a
/// new producer cannot cure (an authorization error, a fencing at start) makes a new one every 30 s at most, while
/// the writers wait and retry, never a tight loop of new clients.
const RENEW_INTERVAL: Duration = Duration::from_secs(30);

/// A shared, self-renewing producer; clones share it.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    current: RwLock<Lease>,
    /// The current producer's generation, read without the lock: reports about older ones are ignored.
    generation: AtomicU64,
    /// Refusals in a row from the brokers, of the current producer.
    refusals: AtomicU32,
    /// When the current producer was made.
    made: Mutex<Instant>,
}

/// The producer to write one batch or event with; failures are reported with it, so a failure of a producer already
/// replaced does not count against its successor.
#[derive(Clone)]
pub struct Lease {
    producer: Arc<FutureProducer>,
    generation: u64,
}

impl Lease {
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

impl Producer {
    /// Creates the first producer from `config` (the whole client config: brokers, idempotence, acks...).
    pub fn create(config: ClientConfig) -> Result<Self, Error> {
        let producer = make(&config)?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                current: RwLock::new(Lease {
                    producer: Arc::new(producer),
                    generation: 0,
                }),
                generation: AtomicU64::new(0),
                refusals: AtomicU32::new(0),
                made: Mutex::new(Instant::now()),
            }),
        })
    }

    /// The producer to write with now.
    pub fn lease(&self) -> Lease {
        self.shared.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A delivery through `lease` succeeded: the refusals so far were not the producer's.
    pub fn delivered(&self, lease: &Lease) {
        if self.is_current(lease) && self.shared.refusals.load(Ordering::Relaxed) != 0 {
            self.shared.refusals.store(0, Ordering::Relaxed);
        }
    }

    /// A delivery through `lease` failed with `error` (as the brokers answered it, not a local refusal to enqueue):
    /// counts it, and replaces the producer when it is of no further use (see the module's documentation).
    pub fn failed(&self, lease: &Lease, error: &KafkaError) {
        if !self.is_current(lease) {
            return; // a late failure of a producer already replaced
        }
        let fatal = lease.producer.client().fatal_error();
        if fatal.is_none() && !refused_by_brokers(error.rdkafka_error_code()) {
            return;
        }
        let refusals = self.shared.refusals.fetch_add(1, Ordering::Relaxed) + 1;
        if fatal.is_some() || refusals >= RENEW_AFTER {
            let reason = match &fatal {
                Some((code, reason)) => format!("fatal error {code:?}: {reason}"),
                None => format!("{refusals} refusals in a row, the last: {error}"),
            };
            self.renew(lease, &reason);
        }
    }

    fn is_current(&self, lease: &Lease) -> bool {
        lease.generation == self.shared.generation.load(Ordering::Relaxed)
    }

    fn renew(&self, lease: &Lease, reason: &str) {
        {
            let made = self.shared.made.lock().unwrap_or_else(|p| p.into_inner());
            if lease.generation > 0 && made.elapsed() < RENEW_INTERVAL {
                return;
            }
        }
        // Made outside the lock: writers taking a lease meanwhile are not held up.
        let producer = match make(&self.shared.config) {
            Ok(producer) => Arc::new(producer),
            Err(e) => {
                tracing::error!(error = %e, "the producer could not be replaced; the old one goes on");
                return;
            }
        };
        let mut current = self.shared.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != lease.generation {
            drop(current);
            retire(producer); // another writer replaced it first
            return;
        }
        let old = std::mem::replace(
            &mut *current,
            Lease {
                producer,
                generation: lease.generation + 1,
            },
        );
        self.shared.generation.store(lease.generation + 1, Ordering::Relaxed);
        self.shared.refusals.store(0, Ordering::Relaxed);
        *self.shared.made.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        drop(current);
        tracing::warn!(%reason, "producer replaced: it could write no more; the writes in hand go through a new one");
        metrics::counter!("piiwall_producer_renewals_total").increment(1);
        retire(old.producer);
    }
}

/// Drops a replaced producer on a thread of its own once no writer holds it: dropping one purges its queue and
/// waits for librdkafka's threads (up to half a second and more), which must not happen on a runtime worker. The
/// writers still holding it see their deliveries fail (purged) and write them again through the new one.
fn retire(producer: Arc<FutureProducer>) {
    let spawned = std::thread::Builder::new()
        .name("piiwall-producer-retire".into())
        .spawn(move || {
            while Arc::strong_count(&producer) > 1 {
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(producer);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to retire a replaced producer on; it is dropped where it is released");
    }
}

/// Whether an error is an answer from the brokers (their error codes are 0 and up, and -1 for "unknown"), not one
/// of librdkafka's local errors (timeouts, lost connections, a full queue: -200 to -100).
fn refused_by_brokers(code: Option<RDKafkaErrorCode>) -> bool {
    code.is_some_and(|code| code as i32 > RDKafkaErrorCode::End as i32)
}

fn make(config: &ClientConfig) -> Result<FutureProducer, Error> {
    config
        .create()
        .map_err(|e| Error::Kafka(format!("cannot create the producer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer() -> Producer {
        let mut config = ClientConfig::new();
        // Nothing listens there; nothing is sent either.
        config.set("bootstrap.servers", "127.0.0.1:9");
        Producer::create(config).unwrap()
    }

    fn refusal() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::Unknown)
    }

    #[test]
    fn refusals_in_a_row_from_the_brokers_replace_the_producer() {
        let producer = producer();
        let first = producer.lease();
        for _ in 1..RENEW_AFTER {
            producer.failed(&first, &refusal());
            assert_eq!(producer.lease().generation, 0);
        }
        producer.failed(&first, &refusal());
        let second = producer.lease();
        assert_eq!(second.generation, 1, "replaced after {RENEW_AFTER} refusals");
        // Failures of the replaced producer, reported late, do not count against its successor, and its late
        // deliveries do not clear its successor's count.
        producer.failed(&second, &refusal());
        for _ in 0..RENEW_AFTER * 2 {
            producer.failed(&first, &refusal());
            producer.delivered(&first);
        }
        assert_eq!(producer.shared.refusals.load(Ordering::Relaxed), 1);
        assert_eq!(producer.lease().generation, 1);
    }

    #[test]
    fn timeouts_and_lost_connections_are_not_the_producers_fault() {
        let producer = producer();
        let lease = producer.lease();
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::QueueFull,
        ] {
            for _ in 0..RENEW_AFTER {
                producer.failed(&lease, &KafkaError::MessageProduction(code));
            }
        }
        assert_eq!(producer.lease().generation, 0);
    }

    #[test]
    fn a_delivery_between_refusals_resets_the_count() {
        let producer = producer();
        let lease = producer.lease();
        for _ in 0..RENEW_AFTER * 3 {
            producer.failed(&lease, &refusal());
            producer.delivered(&lease);
        }
        assert_eq!(producer.lease().generation, 0);
    }

    #[test]
    fn a_replaced_producer_is_not_replaced_again_within_the_interval() {
        let producer = producer();
        for _ in 0..RENEW_AFTER {
            producer.failed(&producer.lease(), &refusal());
        }
        assert_eq!(producer.lease().generation, 1);
        let lease = producer.lease();
        for _ in 0..RENEW_AFTER * 5 {
            producer.failed(&lease, &refusal());
        }
        assert_eq!(
            producer.lease().generation,
            1,
            "not replaced again within {RENEW_INTERVAL:?}"
        );
    }
}

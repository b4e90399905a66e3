//! The producer a run's writers share (lanes, audit writer, control announcements), which replaces itself when it
//! can no longer deliver.
//!
//! An idempotent producer carries state the brokers must remember (its producer id and sequence numbers). A
//! producer that librdkafka calls fatally failed, or whose deliveries the brokers keep refusing, is of no further
//! use (librdkafka's documented remedy is a new instance): a broker that lost that state in a restart, for one,
//! answers every later write of the old producer with an error. Writers report each failed delivery here; after
//! [`RENEW_AFTER`] refusals in a row from the brokers (not timeouts or lost connections: a new producer would meet
//! the same outage), or one fatal error, the next lease is a new producer. The records of the failed writes are
//! still in their writers' hands and are written again (at-least-once: duplicates carry their source coordinates).
//! Exactly-once writes go through the transactional producer instead, which is never replaced behind a
//! transaction's back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

use crate::error::Error;

/// Refusals in a row from the brokers after which the producer is replaced.
pub const RENEW_AFTER: u32 = 3;
/// The least time between two replacements for refusals, so a refusal a new producer cannot cure (an
/// authorization error) does not rebuild one every few seconds.
const RENEW_INTERVAL: Duration = Duration::from_secs(30);

/// A shared, self-renewing producer; clones share it.
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    current: RwLock<Lease>,
    /// Refusals in a row from the brokers, of the current producer.
    refusals: AtomicU32,
    /// When the current producer was made.
    made: Mutex<Instant>,
}

/// The producer to write one batch or event with; failures are reported with it, so a failure of a producer already
/// replaced does not count against its successor.
#[derive(Clone)]
pub struct Lease {
    producer: FutureProducer,
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
                    producer,
                    generation: 0,
                }),
                refusals: AtomicU32::new(0),
                made: Mutex::new(Instant::now()),
            }),
        })
    }

    /// The producer to write with now.
    pub fn lease(&self) -> Lease {
        self.shared.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A delivery succeeded: the refusals so far were not the producer's.
    pub fn delivered(&self) {
        if self.shared.refusals.load(Ordering::Relaxed) != 0 {
            self.shared.refusals.store(0, Ordering::Relaxed);
        }
    }

    /// A delivery through `lease` failed with `error`: counts it, and replaces the producer when it is of no further
    /// use (see the module's documentation).
    pub fn failed(&self, lease: &Lease, error: &KafkaError) {
        let code = error.rdkafka_error_code();
        let fatal = code == Some(RDKafkaErrorCode::Fatal);
        if !fatal && !refused_by_brokers(code) {
            return;
        }
        let refusals = self.shared.refusals.fetch_add(1, Ordering::Relaxed) + 1;
        if fatal || refusals >= RENEW_AFTER {
            self.renew(lease, fatal, refusals, error);
        }
    }

    fn renew(&self, lease: &Lease, fatal: bool, refusals: u32, error: &KafkaError) {
        let mut current = self.shared.current.write().unwrap_or_else(|p| p.into_inner());
        if current.generation != lease.generation {
            return; // another writer renewed it already
        }
        let mut made = self.shared.made.lock().unwrap_or_else(|p| p.into_inner());
        if !fatal && made.elapsed() < RENEW_INTERVAL && current.generation > 0 {
            return;
        }
        match make(&self.shared.config) {
            Ok(producer) => {
                tracing::warn!(refusals, fatal, error = %error,
                    "producer replaced: the brokers refuse its writes; its records are written again by a new one");
                metrics::counter!("piiwall_producer_renewals_total").increment(1);
                // The old producer is dropped with its last lease: librdkafka purges what it still holds, and the
                // writers holding those records write them again.
                *current = Lease {
                    producer,
                    generation: current.generation + 1,
                };
                *made = Instant::now();
                self.shared.refusals.store(0, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "the producer could not be replaced; the old one goes on"),
        }
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
        // Failures of the replaced producer, reported late, do not count against its successor.
        for _ in 0..RENEW_AFTER * 2 {
            producer.failed(&first, &refusal());
        }
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
            producer.delivered();
        }
        assert_eq!(producer.lease().generation, 0);
    }

    #[test]
    fn a_fatal_error_replaces_it_at_once_and_later_refusals_wait_their_interval() {
        let producer = producer();
        producer.failed(
            &producer.lease(),
            &KafkaError::MessageProduction(RDKafkaErrorCode::Fatal),
        );
        assert_eq!(producer.lease().generation, 1);
        let lease = producer.lease();
        for _ in 0..RENEW_AFTER * 2 {
            producer.failed(&lease, &refusal());
        }
        assert_eq!(
            producer.lease().generation,
            1,
            "not replaced again within {RENEW_INTERVAL:?}"
        );
    }
}

//! The consumer's librdkafka context: turns the periodic statistics into per-partition lag gauges, and notes
//! rebalances for the consumer loop (which closes the lanes of revoked partitions and, under exactly-once, tags
//! each record with the group generation it was read in).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;

use super::lanes::PartitionKey;

#[derive(Default)]
pub struct PipelineContext {
    /// Rebalances seen so far: a change tells the consumer loop that the group generation changed.
    rebalances: AtomicU64,
    /// Partitions revoked since the consumer loop last asked.
    revoked: Mutex<Vec<PartitionKey>>,
}

impl PipelineContext {
    pub fn rebalances(&self) -> u64 {
        self.rebalances.load(Ordering::Acquire)
    }

    /// The partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<PartitionKey> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for PipelineContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // librdkafka reports -1 for partitions it does not consume, and its internal partition as -1.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("piiwall_lane_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for PipelineContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let revoked: Vec<PartitionKey> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = revoked.len(), "partitions revoked");
                metrics::counter!("piiwall_rebalances_total", "kind" => "revoke").increment(1);
                self.revoked.lock().unwrap_or_else(|p| p.into_inner()).extend(revoked);
            }
            Rebalance::Assign(list) => {
                // A partition paused here before it was revoked keeps librdkafka's application pause: every
                // partition assigned starts fetching.
                if let Err(e) = consumer.resume(list) {
                    tracing::warn!(error = %e, "cannot resume assigned partitions");
                }
                tracing::info!(partitions = list.count(), "partitions assigned");
                metrics::counter!("piiwall_rebalances_total", "kind" => "assign").increment(1);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        self.rebalances.fetch_add(1, Ordering::AcqRel);
    }
}

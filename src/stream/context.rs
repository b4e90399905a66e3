//! The consumer's librdkafka context: turns the periodic statistics into per-partition lag gauges.

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::Statistics;

pub struct PipelineContext;

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

impl ConsumerContext for PipelineContext {}

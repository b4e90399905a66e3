//! The consumer's lanes, one per input partition, and backpressure by partition.
//!
//! The consumer loop never waits on a lane. When a lane's channel is full (its batch waits for the registry or the
//! key store, or its writes wait for the brokers) the record in hand is held here and only that partition is paused
//! (librdkafka's pause: it stops fetching that partition and drops what it had prefetched of it, and resumes after
//! the last record handed out). Other partitions go on, the commit timer keeps ticking, the consumer keeps polling
//! (so the group does not evict it), and a shutdown is seen at once. Held records go to the lane, in order, as it
//! makes room; then the partition is resumed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

use super::PipelineConsumer;
use super::lane::{self, LaneContext, LaneEnd, Read};
use crate::error::Error;

/// An input partition.
pub(super) type PartitionKey = (String, i32);

/// A running lane.
pub(super) struct Lane {
    sender: mpsc::Sender<Read>,
    pub(super) task: JoinHandle<Result<LaneEnd, Error>>,
    /// Records read while the lane was full, oldest first; the partition is paused while any wait.
    held: VecDeque<Read>,
}

/// What became of a record offered to its lane.
pub(super) enum Offered {
    /// The lane has it.
    Taken,
    /// Held until the lane makes room; its partition is paused.
    Held,
    /// The lane has stopped (see [`Lanes::close`]); the record was dropped and is read again from the partition's
    /// stored or rewound offset.
    Closed,
}

/// Every lane of the running pipeline.
pub(super) struct Lanes {
    lanes: HashMap<PartitionKey, Lane>,
    /// Lanes of revoked partitions, finishing what they hold; their partitions are read by their new owners (or
    /// again here) from the committed offsets, so nothing they do is rewound.
    retiring: Vec<JoinHandle<Result<LaneEnd, Error>>>,
    capacity: usize,
    consumer: Arc<PipelineConsumer>,
}

impl Lanes {
    pub(super) fn new(consumer: Arc<PipelineConsumer>, capacity: usize) -> Self {
        Self {
            lanes: HashMap::new(),
            retiring: Vec::new(),
            capacity,
            consumer,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Whether any partition is paused with records held.
    pub(super) fn any_held(&self) -> bool {
        self.lanes.values().any(|lane| !lane.held.is_empty())
    }

    /// The partitions whose lane task has ended.
    pub(super) fn finished(&self) -> Vec<PartitionKey> {
        let ended = self.lanes.iter().filter(|(_, lane)| lane.task.is_finished());
        ended.map(|(key, _)| key.clone()).collect()
    }

    pub(super) fn is_finished(&self, key: &PartitionKey) -> bool {
        self.lanes.get(key).is_some_and(|lane| lane.task.is_finished())
    }

    /// Gives a record to its partition's lane (started on first use), or holds it and pauses the partition.
    pub(super) fn offer(&mut self, key: PartitionKey, message: Read, ctx: &Arc<LaneContext>) -> Offered {
        let capacity = self.capacity;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(capacity);
            let task = tokio::spawn(lane::run(key.0.clone(), key.1, receiver, ctx.clone()));
            Lane {
                sender,
                task,
                held: VecDeque::new(),
            }
        });
        if !lane.held.is_empty() {
            // Already paused; librdkafka may still hand out a record it fetched before the pause.
            lane.held.push_back(message);
            return Offered::Held;
        }
        match lane.sender.try_send(message) {
            Ok(()) => Offered::Taken,
            Err(TrySendError::Full(message)) => {
                lane.held.push_back(message);
                pause(&self.consumer, &key, true);
                metrics::gauge!("piiwall_partitions_paused").increment(1.0);
                Offered::Held
            }
            Err(TrySendError::Closed(_)) => Offered::Closed,
        }
    }

    /// Hands held records to lanes that made room, resuming each partition whose records are all taken. Returns
    /// the partitions whose lane stopped meanwhile (to [`close`](Self::close)).
    pub(super) fn release_held(&mut self) -> Vec<PartitionKey> {
        let mut stopped = Vec::new();
        for (key, lane) in self.lanes.iter_mut().filter(|(_, lane)| !lane.held.is_empty()) {
            while let Some(message) = lane.held.pop_front() {
                match lane.sender.try_send(message) {
                    Ok(()) => {}
                    Err(TrySendError::Full(message)) => {
                        lane.held.push_front(message);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => {
                        stopped.push(key.clone());
                        break;
                    }
                }
            }
            if lane.held.is_empty() {
                pause(&self.consumer, key, false);
                metrics::gauge!("piiwall_partitions_paused").decrement(1.0);
            }
        }
        stopped
    }

    /// Removes a lane, resuming its partition if it was paused (held records are dropped: they are read again from
    /// the stored or rewound offset), and returns its task.
    pub(super) fn close(&mut self, key: &PartitionKey) -> Option<JoinHandle<Result<LaneEnd, Error>>> {
        let lane = self.lanes.remove(key)?;
        if !lane.held.is_empty() {
            pause(&self.consumer, key, false);
            metrics::gauge!("piiwall_partitions_paused").decrement(1.0);
        }
        Some(lane.task)
    }

    /// Closes the lane of a partition revoked from this instance: it finishes what it holds (its writes are
    /// duplicates its source coordinates identify; under exactly-once its commit is fenced by the generation it
    /// read in). Held records are dropped.
    pub(super) fn revoke(&mut self, key: &PartitionKey) {
        if let Some(lane) = self.lanes.remove(key) {
            if !lane.held.is_empty() {
                // librdkafka keeps an application's pause across unassign and assign: resume, or a partition that
                // comes back here would never be fetched again.
                pause(&self.consumer, key, false);
                metrics::gauge!("piiwall_partitions_paused").decrement(1.0);
            }
            self.retiring.push(lane.task);
        }
    }

    /// The results of retired lanes that finished.
    pub(super) async fn reap_retired(&mut self) -> Vec<Result<LaneEnd, Error>> {
        let (done, running): (Vec<_>, Vec<_>) = self.retiring.drain(..).partition(|task| task.is_finished());
        self.retiring = running;
        let mut results = Vec::with_capacity(done.len());
        for task in done {
            results.push(
                task.await
                    .unwrap_or_else(|_| Err(Error::Kafka("a lane panicked".into()))),
            );
        }
        results
    }

    /// Every lane's task, their channels closed: each finishes what it holds. Held records are dropped (they were
    /// not stored, so they are read again after the restart).
    pub(super) fn drain(&mut self) -> Vec<JoinHandle<Result<LaneEnd, Error>>> {
        let paused = self.lanes.values().filter(|lane| !lane.held.is_empty()).count();
        metrics::gauge!("piiwall_partitions_paused").decrement(paused as f64);
        let mut tasks: Vec<_> = self.lanes.drain().map(|(_, lane)| lane.task).collect();
        tasks.append(&mut self.retiring);
        tasks
    }
}

/// Pauses or resumes one partition. A failure is logged: the partition was revoked, and its lane ends with it.
fn pause(consumer: &PipelineConsumer, (topic, partition): &PartitionKey, paused: bool) {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, *partition);
    let result = if paused {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    match result {
        Ok(()) if paused => tracing::debug!(%topic, partition, "lane full: partition paused"),
        Ok(()) => tracing::debug!(%topic, partition, "partition resumed"),
        Err(e) => tracing::warn!(%topic, partition, error = %e, paused, "cannot pause or resume a partition"),
    }
}

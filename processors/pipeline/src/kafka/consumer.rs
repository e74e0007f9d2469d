//! The consumer's context: lag metrics from librdkafka's statistics, and rebalances.
//!
//! Rebalance callbacks run inside the consumer's poll, on the run loop's own task. They do only
//! what must happen before the partitions move and needs none of the loop's state: commit the
//! stored offsets (at-least-once) and flush the producer, so outputs already handed to it reach
//! the broker before the partition's next owner produces newer ones. Everything else (cancelling
//! the revoked partitions' in-flight records, forgetting their watermarks, pausing newly
//! assigned partitions under backpressure) is the loop's, which receives a [`RebalanceEvent`]
//! over a channel and handles it before it admits the next record.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::telemetry::metrics;

/// How long a revoke waits for outputs already handed to the producer.
pub(crate) const REVOKE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A rebalance, as the run loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RebalanceEvent {
    /// These partitions of the input topic are no longer ours.
    Revoked(Vec<i32>),
    /// These partitions are ours now.
    Assigned(Vec<i32>),
}

/// The consumer's context.
pub(crate) struct Ctx {
    pub name: &'static str,
    /// At-least-once commits the stored offsets of revoked partitions; exactly-once commits
    /// only through transactions.
    pub commit_on_revoke: bool,
    /// Flushed on revoke.
    pub producer: FutureProducer,
    /// To the run loop.
    pub events: mpsc::UnboundedSender<RebalanceEvent>,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        let lag = &metrics().lag;
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    lag.with_label_values(&[self.name, topic, &p.to_string()]).set(part.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is stored before the partitions move, so the next owner starts there.
            if self.commit_on_revoke {
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    debug!(processor = self.name, error = %e, "commit on revoke (nothing stored is fine)");
                }
            }
            if let Err(e) = self.producer.flush(REVOKE_FLUSH_TIMEOUT) {
                warn!(processor = self.name, error = %e, "flush on revoke");
            }
            info!(processor = self.name, partitions = ?names(tpl), "partitions revoked");
            let _ = self.events.send(RebalanceEvent::Revoked(ids(tpl)));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(processor = self.name, partitions = ?names(tpl), "partitions assigned");
                let _ = self.events.send(RebalanceEvent::Assigned(ids(tpl)));
            }
            // An idle member of the group is consuming too.
            _ => {
                let _ = self.events.send(RebalanceEvent::Assigned(Vec::new()));
            }
        }
    }
}

fn ids(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

fn names(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect()
}

//! How progress becomes durable: the [`Commit`] strategy of a delivery guarantee.
//!
//! - [`AtLeastOnce`]: a partition's watermark is *stored* on the consumer as it advances and
//!   auto-committed; the stored offsets are committed once more on revoke and at shutdown.
//! - [`ExactlyOnce`]: periods of `commit_interval` are Kafka transactions: the watermarks go to
//!   the transaction with the consumer group metadata (KIP-447 fencing) and commit with the
//!   outputs, or abort and rewind the partitions to their committed offsets.
//!
//! The strategies talk to the consumer and producer through two small traits,
//! [`OffsetStore`] and [`Transactions`], so they are tested with fakes, without a broker.

pub(crate) mod at_least_once;
mod exactly_once;

use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

pub(crate) use at_least_once::AtLeastOnce;
pub(crate) use exactly_once::ExactlyOnce;

/// The end of a commit period failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    /// The period's work is undone (transaction aborted) and read again.
    #[error("{0:#}")]
    Abortable(anyhow::Error),
    /// The processor must stop (e.g. fenced by a newer instance).
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

/// Where the loop is to read again after an abort: `(partition, committed offset)`, `None` when
/// the group has no committed offset (read from the beginning).
pub(crate) type Rewind = Vec<(i32, Option<i64>)>;

/// A delivery guarantee's way of making progress durable.
pub(crate) trait Commit: Send {
    /// Before the first record (exactly-once: register the transactional id).
    fn init(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Open a commit period; returns how long it lasts (`None`: until shutdown).
    fn begin(&mut self) -> impl Future<Output = anyhow::Result<Option<Duration>>> + Send;

    /// How long the end of a period may wait for in-flight records (`None`: as long as it takes,
    /// since the period cannot commit without them).
    fn drain_limit(&self) -> Option<Duration>;

    /// The contiguous watermark of `partition` advanced: `next` is the next offset to consume.
    fn advanced(&mut self, topic: &str, partition: i32, next: i64) -> anyhow::Result<()>;

    /// Partitions were revoked during the open period.
    fn revoked(&mut self);

    /// Every record of the period is accounted for: make its progress durable.
    fn commit(&mut self) -> impl Future<Output = Result<(), CommitError>> + Send;

    /// Give up the open period after a failure. Returns where to read again, if anything must
    /// be read again (at-least-once: nothing; what was stored stays stored).
    fn abort(&mut self) -> impl Future<Output = anyhow::Result<Option<Rewind>>> + Send;

    /// Transactions committed and aborted so far.
    fn counts(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// The consumer's side of committing.
pub(crate) trait OffsetStore: Send + Sync + 'static {
    /// Store `next` as the offset to commit for `topic`/`partition`.
    fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError>;
    /// Commit the stored offsets now.
    fn commit_stored(&self) -> Result<(), KafkaError>;
    /// The group metadata for `send_offsets_to_transaction` (fencing of zombies).
    fn group_metadata(&self) -> Option<ConsumerGroupMetadata>;
    /// Committed offsets of the current assignment, `None` where the group has none.
    fn committed(&self, topic: &str) -> Result<Rewind, KafkaError>;
}

impl<C: ConsumerContext + 'static> OffsetStore for rdkafka::consumer::StreamConsumer<C> {
    fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
        self.store_offsets(&tpl)
    }

    fn commit_stored(&self) -> Result<(), KafkaError> {
        self.commit_consumer_state(CommitMode::Sync)
    }

    fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        Consumer::group_metadata(self)
    }

    fn committed(&self, topic: &str) -> Result<Rewind, KafkaError> {
        let assignment = self.assignment()?;
        let committed = self.committed_offsets(assignment, TRANSACTION_TIMEOUT)?;
        Ok(committed
            .elements()
            .iter()
            .filter(|e| e.topic() == topic)
            .map(|e| {
                (
                    e.partition(),
                    match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                )
            })
            .collect())
    }
}

/// The transactional producer's calls (blocking; run off the async runtime).
pub(crate) trait Transactions: Clone + Send + Sync + 'static {
    /// Register the transactional id, fencing a predecessor with the same id.
    fn init(&self) -> Result<(), KafkaError>;
    /// Open a transaction.
    fn begin(&self) -> Result<(), KafkaError>;
    /// Add the consumed offsets to the open transaction.
    fn send_offsets(&self, offsets: &TopicPartitionList, cgm: &ConsumerGroupMetadata) -> Result<(), KafkaError>;
    /// Commit the open transaction.
    fn commit(&self) -> Result<(), KafkaError>;
    /// Abort the open transaction.
    fn abort(&self) -> Result<(), KafkaError>;
}

/// How long a transactional call may block.
pub(crate) const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

impl Transactions for FutureProducer {
    fn init(&self) -> Result<(), KafkaError> {
        self.init_transactions(TRANSACTION_TIMEOUT)
    }
    fn begin(&self) -> Result<(), KafkaError> {
        self.begin_transaction()
    }
    fn send_offsets(&self, offsets: &TopicPartitionList, cgm: &ConsumerGroupMetadata) -> Result<(), KafkaError> {
        self.send_offsets_to_transaction(offsets, cgm, TRANSACTION_TIMEOUT)
    }
    fn commit(&self) -> Result<(), KafkaError> {
        self.commit_transaction(TRANSACTION_TIMEOUT * 2)
    }
    fn abort(&self) -> Result<(), KafkaError> {
        self.abort_transaction(TRANSACTION_TIMEOUT * 2)
    }
}

/// Run a blocking client call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f).await.unwrap_or(Err(KafkaError::Canceled))
}

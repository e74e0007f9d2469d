//! Exactly-once: consume-transform-produce in Kafka transactions of at most `commit_interval`.
//! The watermarks reached in a period are sent to its transaction with the consumer group
//! metadata (KIP-447: a zombie of an older group generation is fenced) and commit atomically
//! with the period's outputs and dead letters. A revoke during the period, or an abortable
//! error, aborts it; the loop then rewinds to the committed offsets and reads the records again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::{blocking, Commit, CommitError, OffsetStore, Rewind, Transactions};

/// The exactly-once strategy over a consumer and a transactional producer.
pub(crate) struct ExactlyOnce<S, T> {
    store: Arc<S>,
    producer: T,
    topic: String,
    interval: Duration,
    /// The next offset to consume per partition, for the open transaction.
    offsets: BTreeMap<i32, i64>,
    revoked: bool,
    transactions: u64,
    aborts: u64,
}

impl<S: OffsetStore, T: Transactions> ExactlyOnce<S, T> {
    /// Transactions of at most `interval` on `producer`, for the input `topic` of `store`.
    pub fn new(store: Arc<S>, producer: T, topic: impl Into<String>, interval: Duration) -> Self {
        ExactlyOnce { store, producer, topic: topic.into(), interval, offsets: BTreeMap::new(), revoked: false, transactions: 0, aborts: 0 }
    }
}

/// Transaction errors: fatal (fenced) stops the processor; the rest abort the transaction.
pub(crate) fn txn_error(e: KafkaError) -> CommitError {
    let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
    classify_txn_error(e, fatal)
}

/// [`txn_error`] once librdkafka said whether the error is fatal.
fn classify_txn_error(e: KafkaError, fatal: bool) -> CommitError {
    if fatal {
        CommitError::Fatal(anyhow::anyhow!("transaction: {e} (another instance with this transactional id or a newer group generation fenced this one)"))
    } else {
        CommitError::Abortable(e.into())
    }
}

impl<S: OffsetStore, T: Transactions> Commit for ExactlyOnce<S, T> {
    async fn init(&mut self) -> anyhow::Result<()> {
        let p = self.producer.clone();
        blocking(move || p.init()).await.map_err(|e| anyhow::anyhow!("init_transactions: {e}"))
    }

    async fn begin(&mut self) -> anyhow::Result<Option<Duration>> {
        let p = self.producer.clone();
        blocking(move || p.begin()).await.map_err(|e| anyhow::anyhow!("begin_transaction: {e}"))?;
        self.revoked = false;
        Ok(Some(self.interval))
    }

    fn drain_limit(&self) -> Option<Duration> {
        None
    }

    fn advanced(&mut self, _topic: &str, partition: i32, next: i64) -> anyhow::Result<()> {
        self.offsets.insert(partition, next);
        Ok(())
    }

    fn revoked(&mut self) {
        self.revoked = true;
    }

    async fn commit(&mut self) -> Result<(), CommitError> {
        if self.revoked {
            return Err(CommitError::Abortable(anyhow::anyhow!("partitions were revoked during the transaction")));
        }
        if !self.offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &self.offsets {
                tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)).map_err(|e| CommitError::Fatal(e.into()))?;
            }
            let cgm = self.store.group_metadata().ok_or_else(|| CommitError::Fatal(anyhow::anyhow!("no consumer group metadata")))?;
            let p = self.producer.clone();
            blocking(move || p.send_offsets(&tpl, &cgm)).await.map_err(txn_error)?;
        }
        let p = self.producer.clone();
        blocking(move || p.commit()).await.map_err(txn_error)?;
        self.offsets.clear();
        self.transactions += 1;
        Ok(())
    }

    async fn abort(&mut self) -> anyhow::Result<Option<Rewind>> {
        self.aborts += 1;
        self.offsets.clear();
        let p = self.producer.clone();
        blocking(move || p.abort()).await.map_err(|e| anyhow::anyhow!("abort_transaction: {e}"))?;
        let store = self.store.clone();
        let topic = self.topic.clone();
        let rewind = blocking(move || store.committed(&topic)).await?;
        Ok(Some(rewind))
    }

    fn counts(&self) -> (u64, u64) {
        (self.transactions, self.aborts)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rdkafka::consumer::ConsumerGroupMetadata;
    use rdkafka::error::RDKafkaErrorCode;

    use super::super::at_least_once::tests::FakeConsumer;
    use super::*;

    /// A transactional producer that records its calls; `fail_commit` makes the next commit fail.
    #[derive(Clone, Default)]
    struct FakeProducer {
        calls: Arc<Mutex<Vec<String>>>,
        fail_commit: Arc<Mutex<Option<KafkaError>>>,
    }

    impl Transactions for FakeProducer {
        fn init(&self) -> Result<(), KafkaError> {
            self.calls.lock().unwrap().push("init".into());
            Ok(())
        }
        fn begin(&self) -> Result<(), KafkaError> {
            self.calls.lock().unwrap().push("begin".into());
            Ok(())
        }
        fn send_offsets(&self, offsets: &TopicPartitionList, _cgm: &ConsumerGroupMetadata) -> Result<(), KafkaError> {
            let o: Vec<String> = offsets.elements().iter().map(|e| format!("{}:{:?}", e.partition(), e.offset())).collect();
            self.calls.lock().unwrap().push(format!("offsets {}", o.join(",")));
            Ok(())
        }
        fn commit(&self) -> Result<(), KafkaError> {
            if let Some(e) = self.fail_commit.lock().unwrap().take() {
                return Err(e);
            }
            self.calls.lock().unwrap().push("commit".into());
            Ok(())
        }
        fn abort(&self) -> Result<(), KafkaError> {
            self.calls.lock().unwrap().push("abort".into());
            Ok(())
        }
    }

    /// A consumer with group metadata (the fake one has none).
    struct GroupConsumer(FakeConsumer, rdkafka::consumer::BaseConsumer);

    impl OffsetStore for GroupConsumer {
        fn store(&self, t: &str, p: i32, n: i64) -> Result<(), KafkaError> {
            self.0.store(t, p, n)
        }
        fn commit_stored(&self) -> Result<(), KafkaError> {
            self.0.commit_stored()
        }
        fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
            rdkafka::consumer::Consumer::group_metadata(&self.1)
        }
        fn committed(&self, t: &str) -> Result<Rewind, KafkaError> {
            self.0.committed(t)
        }
    }

    fn consumer() -> Arc<GroupConsumer> {
        // Group metadata needs a real (unconnected) consumer handle.
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new().set("group.id", "g").set("bootstrap.servers", "127.0.0.1:1").create().unwrap();
        Arc::new(GroupConsumer(FakeConsumer::default(), c))
    }

    #[tokio::test]
    async fn a_period_sends_its_watermarks_with_the_transaction() {
        let p = FakeProducer::default();
        let mut k = ExactlyOnce::new(consumer(), p.clone(), "in", Duration::from_millis(500));
        k.init().await.unwrap();
        assert_eq!(k.begin().await.unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(k.drain_limit(), None, "a transaction cannot commit without its records");
        k.advanced("in", 0, 10).unwrap();
        k.advanced("in", 0, 12).unwrap();
        k.advanced("in", 2, 3).unwrap();
        k.commit().await.unwrap();
        k.begin().await.unwrap();
        k.commit().await.unwrap();
        assert_eq!(*p.calls.lock().unwrap(), ["init", "begin", "offsets 0:Offset(12),2:Offset(3)", "commit", "begin", "commit"]);
        assert_eq!(k.counts(), (2, 0));
    }

    #[tokio::test]
    async fn a_revoke_aborts_and_rewinds_to_the_committed_offsets() {
        let p = FakeProducer::default();
        let c = consumer();
        *c.0.committed.lock().unwrap() = vec![(0, Some(7)), (1, None)];
        let mut k = ExactlyOnce::new(c, p.clone(), "in", Duration::from_secs(1));
        k.begin().await.unwrap();
        k.advanced("in", 0, 9).unwrap();
        k.revoked();
        assert!(matches!(k.commit().await, Err(CommitError::Abortable(_))));
        assert_eq!(k.abort().await.unwrap(), Some(vec![(0, Some(7)), (1, None)]));
        k.begin().await.unwrap();
        k.commit().await.expect("a new period starts clean: the aborted offsets are gone, the revoke forgotten");
        assert_eq!(*p.calls.lock().unwrap(), ["begin", "abort", "begin", "commit"]);
        assert_eq!(k.counts(), (1, 1));
    }

    #[tokio::test]
    async fn fatal_transaction_errors_stop_and_the_rest_abort() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert!(matches!(classify_txn_error(fenced, true), CommitError::Fatal(e) if e.to_string().contains("fenced this one")));
        assert!(matches!(txn_error(KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut)), CommitError::Abortable(_)));
        assert!(matches!(txn_error(KafkaError::Canceled), CommitError::Abortable(_)));

        // A failed commit keeps the period's offsets for nothing: abort clears them.
        let p = FakeProducer::default();
        *p.fail_commit.lock().unwrap() = Some(KafkaError::Canceled);
        let mut k = ExactlyOnce::new(consumer(), p.clone(), "in", Duration::from_secs(1));
        k.begin().await.unwrap();
        k.advanced("in", 0, 4).unwrap();
        assert!(matches!(k.commit().await, Err(CommitError::Abortable(_))));
        k.abort().await.unwrap();
        k.begin().await.unwrap();
        k.commit().await.unwrap();
        assert_eq!(*p.calls.lock().unwrap(), ["begin", "offsets 0:Offset(4)", "abort", "begin", "commit"]);
    }
}

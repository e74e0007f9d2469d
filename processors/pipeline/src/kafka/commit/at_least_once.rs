//! At-least-once: store each partition's watermark on the consumer as it advances; librdkafka
//! auto-commits what is stored, and the loop commits it once more at shutdown. After a crash,
//! records after the last commit are processed again (outputs are keyed, writes idempotent).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::{Commit, CommitError, OffsetStore, Rewind};

/// The at-least-once strategy over a consumer.
pub(crate) struct AtLeastOnce<S> {
    store: Arc<S>,
    drain_timeout: Duration,
}

impl<S: OffsetStore> AtLeastOnce<S> {
    /// Store on `store`; at shutdown, wait up to `drain_timeout` for in-flight records.
    pub fn new(store: Arc<S>, drain_timeout: Duration) -> Self {
        AtLeastOnce { store, drain_timeout }
    }
}

impl<S: OffsetStore> Commit for AtLeastOnce<S> {
    async fn init(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn begin(&mut self) -> anyhow::Result<Option<Duration>> {
        Ok(None)
    }

    fn drain_limit(&self) -> Option<Duration> {
        Some(self.drain_timeout)
    }

    fn advanced(&mut self, topic: &str, partition: i32, next: i64) -> anyhow::Result<()> {
        if let Err(e) = self.store.store(topic, partition, next) {
            // The partition was revoked meanwhile: its new owner replays from the last commit.
            debug!(%topic, partition, error = %e, "offset not stored");
        }
        Ok(())
    }

    fn revoked(&mut self) {}

    async fn commit(&mut self) -> Result<(), CommitError> {
        if let Err(e) = self.store.commit_stored() {
            debug!(error = %e, "final commit (nothing stored is fine)");
        }
        Ok(())
    }

    async fn abort(&mut self) -> anyhow::Result<Option<Rewind>> {
        // What was stored was handled: commit it, read nothing again.
        let _ = self.commit().await;
        Ok(None)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use rdkafka::consumer::ConsumerGroupMetadata;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::*;

    /// A consumer that records what was stored and committed.
    #[derive(Default)]
    pub(crate) struct FakeConsumer {
        pub stored: Mutex<Vec<(String, i32, i64)>>,
        pub commits: Mutex<u32>,
        /// Partitions whose store fails (revoked).
        pub gone: Mutex<Vec<i32>>,
        pub committed: Mutex<Rewind>,
    }

    impl OffsetStore for FakeConsumer {
        fn store(&self, topic: &str, partition: i32, next: i64) -> Result<(), KafkaError> {
            if self.gone.lock().unwrap().contains(&partition) {
                return Err(KafkaError::StoreOffset(RDKafkaErrorCode::State));
            }
            self.stored.lock().unwrap().push((topic.into(), partition, next));
            Ok(())
        }
        fn commit_stored(&self) -> Result<(), KafkaError> {
            *self.commits.lock().unwrap() += 1;
            Ok(())
        }
        fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
            None
        }
        fn committed(&self, _topic: &str) -> Result<Rewind, KafkaError> {
            Ok(self.committed.lock().unwrap().clone())
        }
    }

    #[tokio::test]
    async fn watermarks_are_stored_as_they_advance_and_committed_at_the_end() {
        let c = Arc::new(FakeConsumer::default());
        let mut k = AtLeastOnce::new(c.clone(), Duration::from_secs(7));
        k.init().await.unwrap();
        assert_eq!(k.begin().await.unwrap(), None, "one period until shutdown");
        assert_eq!(k.drain_limit(), Some(Duration::from_secs(7)));
        k.advanced("in", 0, 5).unwrap();
        k.advanced("in", 1, 3).unwrap();
        *c.gone.lock().unwrap() = vec![1];
        k.advanced("in", 1, 4).expect("a revoked partition is not an error");
        assert_eq!(*c.stored.lock().unwrap(), vec![("in".into(), 0, 5), ("in".into(), 1, 3)]);
        k.commit().await.unwrap();
        assert_eq!(*c.commits.lock().unwrap(), 1);
        assert_eq!(k.abort().await.unwrap(), None, "nothing is read again");
        assert_eq!(*c.commits.lock().unwrap(), 2, "abort commits what was stored");
        assert_eq!(k.counts(), (0, 0));
    }
}

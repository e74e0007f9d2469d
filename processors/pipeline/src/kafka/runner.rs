//! The loop itself: read records, admit them behind their key, account for the finished ones,
//! pause partitions above `max_in_flight`, handle rebalances, and end each commit period as the
//! [`Commit`] strategy says.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn};

use super::commit::{Commit, CommitError};
use super::consumer::{Ctx, RebalanceEvent};
use super::order::{KeyId, KeyOrder};
use super::record::{handle, Done, Shared};
use super::RunSummary;
use crate::offsets::OffsetTracker;
use crate::processor::{ProcessError, Processor};
use crate::telemetry::{metrics, Health};
use crate::topology::ProcessorSpec;

/// An authorisation or authentication error from the consumer becomes fatal once it has
/// persisted this long (a short grace: ACLs being applied, a credential rotating).
pub(crate) const FATAL_CONSUMER_ERROR_GRACE: Duration = Duration::from_secs(10);

/// After a consumer error, the loop reads again after this pause (completions and shutdown
/// are still handled meanwhile).
pub(crate) const CONSUMER_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// A finished record, handed from its task back to the loop.
pub(crate) struct Completion {
    partition: i32,
    offset: i64,
    /// The record's key and its place in the key's queue.
    key: Option<(KeyId, u64)>,
    started: Instant,
    retries: u64,
    outcome: Result<Done, ProcessError>,
}

/// Backpressure: pause every partition at `max_in_flight` records in flight, resume at half.
#[derive(Debug)]
pub(crate) struct Backpressure {
    max_in_flight: usize,
    paused: bool,
}

impl Backpressure {
    pub fn new(max_in_flight: usize) -> Self {
        Backpressure { max_in_flight, paused: false }
    }

    /// A record was admitted: true when the partitions must pause now.
    pub fn admitted(&mut self, in_flight: usize) -> bool {
        let pause = !self.paused && in_flight >= self.max_in_flight;
        self.paused |= pause;
        pause
    }

    /// A record finished: true when the partitions may resume now.
    pub fn finished(&mut self, in_flight: usize) -> bool {
        let resume = self.paused && in_flight <= (self.max_in_flight / 2).max(1);
        self.paused &= !resume;
        resume
    }

    /// Forget the pause (after the in-flight records were dropped): true if it was paused.
    pub fn reset(&mut self) -> bool {
        std::mem::take(&mut self.paused)
    }

    pub fn paused(&self) -> bool {
        self.paused
    }
}

/// The offsets side of the loop: per-partition watermarks, reported to the commit strategy
/// when they advance, forgotten on revoke.
pub(crate) struct Progress<K> {
    topic: String,
    tracker: OffsetTracker,
    pub commit: K,
}

impl<K: Commit> Progress<K> {
    pub fn new(topic: impl Into<String>, commit: K) -> Self {
        Progress { topic: topic.into(), tracker: OffsetTracker::default(), commit }
    }

    /// A record was read.
    pub fn begin(&mut self, partition: i32, offset: i64) {
        self.tracker.begin(&self.topic, partition, offset);
    }

    /// A record was fully handled: tell the strategy if its partition's watermark advanced.
    pub fn handled(&mut self, partition: i32, offset: i64) -> anyhow::Result<()> {
        if let Some(next) = self.tracker.complete(&self.topic, partition, offset) {
            self.commit.advanced(&self.topic, partition, next)?;
        }
        Ok(())
    }

    /// Partitions moved away (or are to be read again): their records still in flight must not
    /// move a watermark.
    pub fn forget(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.tracker.revoke(&self.topic, *p);
        }
    }

    /// Records in flight, as the tracker sees them.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }
}

/// The loop's state.
pub(crate) struct Runner<P: Processor, K> {
    pub name: &'static str,
    pub spec: ProcessorSpec,
    pub consumer: Arc<StreamConsumer<Ctx>>,
    pub events: mpsc::UnboundedReceiver<RebalanceEvent>,
    pub shared: Arc<Shared<P>>,
    pub health: Arc<Health>,
    pub progress: Progress<K>,
    pub backpressure: Backpressure,
    /// Per assigned partition: cancelled on revoke, so its in-flight records stop before
    /// producing anything more (the new owner processes them again).
    pub partition_tokens: HashMap<i32, CancellationToken>,
    pub keys: KeyOrder,
    pub in_flight: FuturesUnordered<BoxFuture<'static, Completion>>,
    pub summary: RunSummary,
    /// After a consumer error: when to read again.
    pub read_again_at: Option<tokio::time::Instant>,
    /// Exactly-once: why the open transaction failed (a send in it did); the period ends at once
    /// and is aborted.
    pub txn_failed: Option<String>,
}

impl<P: Processor, K: Commit> Runner<P, K> {
    /// Run commit periods until shutdown (then drain, commit, return) or a fatal error.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
        let mut result = self.progress.commit.init().await;
        while result.is_ok() {
            let period = match self.progress.commit.begin().await {
                Ok(p) => p,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let until = period.map(|d| tokio::time::Instant::now() + d);
            result = self.consume_until(&shutdown, until).await;
            if result.is_err() {
                break;
            }
            // Stop admitting; finish the period's records.
            if self.txn_failed.is_none() {
                result = self.drain(self.progress.commit.drain_limit()).await;
                if result.is_err() {
                    break;
                }
            }
            self.take_rebalance_events();
            let committed = match self.txn_failed.take() {
                Some(why) => Err(CommitError::Abortable(anyhow::anyhow!("a send in it failed ({why})"))),
                None => self.progress.commit.commit().await,
            };
            match committed {
                Ok(()) => {}
                Err(CommitError::Abortable(e)) => {
                    warn!(processor = self.name, error = %e, "transaction aborted: rewinding to the last committed offsets");
                    result = self.abort_and_rewind().await;
                }
                Err(CommitError::Fatal(e)) => result = Err(e),
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        self.health.set_consuming(false);
        if result.is_err() {
            // Records that can still finish do (within the drain limit, where there is one),
            // then the open period is given up.
            if let Some(limit) = self.progress.commit.drain_limit() {
                let _ = self.drain(Some(limit)).await;
            }
            self.in_flight = FuturesUnordered::new();
            if let Err(e) = self.progress.commit.abort().await {
                warn!(processor = self.name, error = %e, "giving up the open commit period");
            }
        }
        self.shared.stop.cancel();
        self.consumer.unsubscribe();
        (self.summary.transactions, self.summary.aborts) = self.progress.commit.counts();
        info!(
            processor = self.name,
            processed = self.summary.processed,
            dead_lettered = self.summary.dead_lettered,
            transactions = self.summary.transactions,
            aborts = self.summary.aborts,
            "stopped"
        );
        result.map(|()| self.summary.clone())
    }

    /// Read, admit and account records until shutdown, a fatal error, or the period's end.
    async fn consume_until(&mut self, shutdown: &CancellationToken, until: Option<tokio::time::Instant>) -> anyhow::Result<()> {
        let m = metrics();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let deadline = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let read_again_at = self.read_again_at;
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => self.on_rebalance(ev),
                Some(c) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.account(c)?;
                    if self.txn_failed.is_some() {
                        return Ok(());
                    }
                }
                _ = shutdown.cancelled() => {
                    info!(processor = self.name, in_flight = self.in_flight.len(), "shutdown requested: draining");
                    return Ok(());
                }
                _ = &mut deadline => return Ok(()),
                _ = tick.tick() => {
                    self.health.set_in_flight(self.in_flight.len());
                    self.check_consumer_errors()?;
                }
                _ = tokio::time::sleep_until(read_again_at.unwrap_or_else(tokio::time::Instant::now)), if read_again_at.is_some() => {
                    self.read_again_at = None;
                }
                msg = self.consumer.recv(), if read_again_at.is_none() => match msg {
                    Ok(msg) => {
                        self.health.consumer_error(false);
                        let msg = msg.detach();
                        // A rebalance seen in this very poll comes first: the record may
                        // belong to a partition just assigned again.
                        self.take_rebalance_events();
                        self.admit(msg);
                    }
                    Err(e) => {
                        self.health.consumer_error(true);
                        m.consumer_errors.with_label_values(&[self.name]).inc();
                        warn!(processor = self.name, error = %e, failing_for_s = self.health.consumer_failing_for().as_secs(), "consumer error");
                        if let Some(fatal) = fatal_consumer_error(&e, &self.spec) {
                            if self.health.consumer_failing_for() >= FATAL_CONSUMER_ERROR_GRACE {
                                anyhow::bail!(fatal);
                            }
                        }
                        self.check_consumer_errors()?;
                        self.read_again_at = Some(tokio::time::Instant::now() + CONSUMER_ERROR_PAUSE);
                    }
                }
            }
        }
    }

    fn take_rebalance_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.on_rebalance(ev);
        }
    }

    fn on_rebalance(&mut self, ev: RebalanceEvent) {
        match ev {
            RebalanceEvent::Revoked(parts) => {
                self.progress.commit.revoked();
                for p in &parts {
                    if let Some(t) = self.partition_tokens.remove(p) {
                        t.cancel();
                    }
                    let _ = metrics().lag.remove_label_values(&[self.name, &self.spec.input, &p.to_string()]);
                }
                self.progress.forget(&parts);
            }
            RebalanceEvent::Assigned(parts) => {
                // Set the new partitions' pause state explicitly, both ways. librdkafka keeps an
                // application's pause on a partition across its revoke and a later assign: a
                // partition paused for backpressure, revoked (a session timeout while the broker
                // was away), its in-flight records abandoned (the resume then went to an empty
                // assignment) and assigned again stayed paused for good, and the processor read
                // nothing until its stall watchdog stopped it.
                if !parts.is_empty() {
                    let mut tpl = TopicPartitionList::new();
                    for p in &parts {
                        tpl.add_partition(&self.spec.input, *p);
                    }
                    let pause = self.backpressure.paused();
                    let r = if pause { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
                    if let Err(e) = r {
                        warn!(processor = self.name, error = %e, pause, "setting the pause state of newly assigned partitions");
                    }
                }
                // Assigned partitions, or an idle member of the group: either way, consuming.
                self.health.set_consuming(true);
            }
        }
    }

    /// Consumer errors that persist past `consumer_error_timeout` are fatal (after liveness has
    /// already failed for them).
    fn check_consumer_errors(&self) -> anyhow::Result<()> {
        let failing = self.health.consumer_failing_for();
        if failing > self.spec.consumer_error_timeout.saturating_mul(2) {
            anyhow::bail!(
                "the Kafka consumer has reported only errors for {}s: check KAFKA_BOOTSTRAP, credentials and ACLs (READ on {} and group {})",
                failing.as_secs(),
                self.spec.input,
                self.spec.group
            );
        }
        Ok(())
    }

    /// Start handling a record: track its offset, queue it behind its key, apply backpressure.
    fn admit(&mut self, msg: OwnedMessage) {
        let (partition, offset) = (msg.partition(), msg.offset());
        if let Some(ts) = msg.timestamp().to_millis() {
            let fetch = (crate::events::now_millis() - ts).max(0) as f64 / 1000.0;
            metrics().stage_latency.with_label_values(&[self.name, "fetch"]).observe(fetch);
        }
        self.progress.begin(partition, offset);
        let (key, after, done) = match msg.key() {
            Some(k) => {
                let id = (partition, k.to_vec());
                let t = self.keys.enter(id.clone());
                (Some((id, t.seq)), t.after, Some(t.done))
            }
            None => (None, None, None),
        };
        let shared = self.shared.clone();
        let revoked = self.partition_tokens.entry(partition).or_default().clone();
        let span = info_span!("record", processor = self.name, topic = %msg.topic(), partition, offset);
        crate::telemetry::set_parent_from_headers(&span, msg.headers());
        self.in_flight.push(
            async move {
                let started = Instant::now();
                let work = async {
                    if let Some(w) = after {
                        let _ = w.await;
                        metrics().stage_latency.with_label_values(&[shared.name, "key_wait"]).observe(started.elapsed().as_secs_f64());
                    }
                    tracing::Instrument::instrument(handle(&shared, msg), span).await
                };
                let (outcome, retries) = tokio::select! {
                    biased;
                    _ = revoked.cancelled() => (Ok(Done::Abandoned), 0),
                    r = work => r,
                };
                drop(done);
                Completion { partition, offset, key, started, retries, outcome }
            }
            .boxed(),
        );
        let n = self.in_flight.len();
        metrics().in_flight.with_label_values(&[self.name]).set(n as i64);
        self.health.set_in_flight(n);
        self.summary.peak_in_flight = self.summary.peak_in_flight.max(n);
        if self.backpressure.admitted(n) {
            self.summary.pauses += 1;
            self.set_paused(true);
        }
    }

    /// Account for a finished record (in the loop and in the drain alike): metrics, key order,
    /// offsets, backpressure. A fatal outcome stops the loop.
    fn account(&mut self, c: Completion) -> anyhow::Result<()> {
        let m = metrics();
        let name = self.name;
        if let Some((id, seq)) = &c.key {
            self.keys.leave(id, *seq);
        }
        self.summary.retries += c.retries;
        let outcome = match c.outcome {
            Ok(Done::Abandoned) => {
                // Not handled: its offset must not move the watermark (the partition may even be
                // ours again, with the same offset read anew).
                self.summary.abandoned += 1;
                m.records.with_label_values(&[name, "abandoned"]).inc();
                None
            }
            Ok(Done::TransactionFailed(why)) => {
                // Not handled either: the aborted transaction's records are read again.
                self.summary.abandoned += 1;
                m.records.with_label_values(&[name, "abandoned"]).inc();
                self.txn_failed.get_or_insert(why);
                None
            }
            Ok(Done::Handled) => {
                self.summary.processed += 1;
                Some("ok")
            }
            Ok(Done::DeadLettered) => {
                self.summary.dead_lettered += 1;
                Some("dlq")
            }
            Err(e) => {
                error!(processor = name, topic = %self.spec.input, partition = c.partition, offset = c.offset, error = %e, "fatal error, stopping");
                anyhow::bail!("{}/{}@{}: {e}", self.spec.input, c.partition, c.offset);
            }
        };
        if let Some(outcome) = outcome {
            m.latency.with_label_values(&[name]).observe(c.started.elapsed().as_secs_f64());
            m.records.with_label_values(&[name, outcome]).inc();
            self.health.progress();
            self.progress.handled(c.partition, c.offset)?;
        }
        let n = self.in_flight.len();
        m.in_flight.with_label_values(&[name]).set(n as i64);
        self.health.set_in_flight(n);
        if self.backpressure.finished(n) {
            self.set_paused(false);
        }
        Ok(())
    }

    /// Pause (or resume) every assigned partition.
    fn set_paused(&self, pause: bool) {
        if let Ok(a) = self.consumer.assignment() {
            let r = if pause { self.consumer.pause(&a) } else { self.consumer.resume(&a) };
            if let Err(e) = r {
                warn!(processor = self.name, error = %e, pause, "pause/resume failed");
            }
        }
        metrics().paused.with_label_values(&[self.name]).set(pause as i64);
        debug!(processor = self.name, in_flight = self.in_flight.len(), pause, "backpressure");
    }

    /// No more reads: finish what is in flight, within `limit` if there is one. Without a
    /// limit the first fatal outcome ends the drain; with one, the drain goes on and returns it.
    async fn drain(&mut self, limit: Option<Duration>) -> anyhow::Result<()> {
        let deadline = limit.map(|l| tokio::time::Instant::now() + l);
        let mut fatal = Ok(());
        while !self.in_flight.is_empty() {
            let next = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.in_flight.next()).await,
                None => Ok(self.in_flight.next().await),
            };
            match next {
                Ok(Some(c)) => {
                    if let Err(e) = self.account(c) {
                        if deadline.is_none() {
                            return Err(e);
                        }
                        if fatal.is_ok() {
                            fatal = Err(e);
                        }
                    }
                    if self.txn_failed.is_some() {
                        // The transaction is lost anyway: abort it now, not after the rest.
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.summary.abandoned += self.in_flight.len();
                    warn!(processor = self.name, abandoned = self.summary.abandoned, "drain timeout: abandoning in-flight records (they will be redelivered)");
                    self.shared.stop.cancel();
                    self.in_flight = FuturesUnordered::new();
                    break;
                }
            }
        }
        fatal
    }

    /// Give up the open period and seek every assigned partition back to its committed offset.
    async fn abort_and_rewind(&mut self) -> anyhow::Result<()> {
        // Dropping the in-flight futures abandons their records: they are read again.
        self.in_flight = FuturesUnordered::new();
        self.partition_tokens.clear();
        self.keys = KeyOrder::default();
        if self.backpressure.reset() {
            self.set_paused(false);
        }
        let Some(rewind) = self.progress.commit.abort().await? else { return Ok(()) };
        let parts: Vec<i32> = rewind.iter().map(|(p, _)| *p).collect();
        self.progress.forget(&parts);
        for (p, committed) in rewind {
            let to = committed.map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = self.consumer.seek(&self.spec.input, p, to, Duration::from_secs(10)) {
                warn!(processor = self.name, partition = p, error = %e, "seek after abort failed");
            }
        }
        // Records already fetched past the committed offsets are read again after the seek.
        Ok(())
    }
}

/// Consumer errors that no retry can fix (authorisation); they become fatal after a short grace.
pub(crate) fn fatal_consumer_error(e: &KafkaError, spec: &ProcessorSpec) -> Option<String> {
    match e.rdkafka_error_code()? {
        RDKafkaErrorCode::TopicAuthorizationFailed => Some(format!("not authorised to read {}: grant READ on the topic to this principal", spec.input)),
        RDKafkaErrorCode::GroupAuthorizationFailed => Some(format!("not authorised to use consumer group {}: grant READ on the group to this principal", spec.group)),
        RDKafkaErrorCode::SaslAuthenticationFailed => Some("Kafka authentication failed: check the SASL username and password".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::commit::AtLeastOnce;
    use super::*;
    use crate::kafka::commit::at_least_once::tests::FakeConsumer;

    #[test]
    fn backpressure_pauses_at_the_limit_and_resumes_at_half() {
        let mut b = Backpressure::new(8);
        assert!(!b.admitted(7));
        assert!(b.admitted(8), "pause at max_in_flight");
        assert!(!b.admitted(9), "already paused");
        assert!(!b.finished(5));
        assert!(b.finished(4), "resume at half");
        assert!(!b.paused());
        assert!(!b.finished(3), "already running");
        // A limit of 1 resumes at 1, never waiting for 0.
        let mut one = Backpressure::new(1);
        assert!(one.admitted(1));
        assert!(one.finished(1));
        assert!(one.admitted(1));
        assert!(one.reset());
        assert!(!one.reset());
    }

    #[test]
    fn watermarks_move_only_over_contiguous_handled_offsets_and_forget_revoked_partitions() {
        let c = Arc::new(FakeConsumer::default());
        let mut p = Progress::new("in", AtLeastOnce::new(c.clone(), Duration::from_secs(1)));
        for o in 10..14 {
            p.begin(0, o);
        }
        p.begin(1, 100);
        p.handled(0, 11).unwrap();
        assert!(c.stored.lock().unwrap().is_empty(), "10 still in flight");
        p.handled(0, 10).unwrap();
        p.handled(1, 100).unwrap();
        assert_eq!(*c.stored.lock().unwrap(), vec![("in".into(), 0, 12), ("in".into(), 1, 101)]);
        // Partition 0 is revoked with 12 and 13 in flight: their completions move nothing.
        p.forget(&[0]);
        p.handled(0, 13).unwrap();
        p.handled(0, 12).unwrap();
        assert_eq!(c.stored.lock().unwrap().len(), 2);
        assert_eq!(p.in_flight(), 0);
        // Assigned again, read from the committed 12: the watermark moves from there.
        p.begin(0, 12);
        p.begin(0, 13);
        p.handled(0, 13).unwrap();
        p.handled(0, 12).unwrap();
        assert_eq!(c.stored.lock().unwrap().last(), Some(&("in".into(), 0, 14)));
    }

    #[test]
    fn authorisation_errors_are_fatal_after_the_grace_and_others_are_not() {
        let spec: ProcessorSpec = serde_yaml::from_str("{input: media.ingested, dlq: d, group: g1}").unwrap();
        let e = |c| KafkaError::MessageConsumption(c);
        assert!(fatal_consumer_error(&e(RDKafkaErrorCode::TopicAuthorizationFailed), &spec).unwrap().contains("READ on the topic"));
        assert!(fatal_consumer_error(&e(RDKafkaErrorCode::GroupAuthorizationFailed), &spec).unwrap().contains("group g1"));
        assert!(fatal_consumer_error(&e(RDKafkaErrorCode::SaslAuthenticationFailed), &spec).unwrap().contains("SASL"));
        assert!(fatal_consumer_error(&e(RDKafkaErrorCode::AllBrokersDown), &spec).is_none());
        assert!(fatal_consumer_error(&e(RDKafkaErrorCode::BrokerTransportFailure), &spec).is_none());
    }
}

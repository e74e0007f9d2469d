//! The Kafka run loop shared by every processor.
//!
//! Guarantee (default, `delivery: at_least_once`): auto-commit is on and auto-store off; an
//! input offset is stored only when every earlier record of its partition is fully handled — its
//! outputs acknowledged by Kafka (`acks=all`, idempotent producer), or the record acknowledged on
//! the dead-letter topic. After a crash, records after the last commit are processed again;
//! outputs are keyed and sinks upsert with input-derived versions, so replays are harmless.
//! Limit: a replay re-emits tagged events.
//!
//! `delivery: exactly_once` (processors with an output): consume-transform-produce in Kafka
//! transactions. Records are admitted while a transaction is open; every `commit_interval` the
//! loop stops admitting, lets in-flight records finish, sends the consumed offsets with the
//! consumer group metadata (KIP-447 fencing) and commits. Outputs and dead letters are part of
//! the transaction. An abortable error aborts and rewinds to the last committed offsets; a fatal
//! one (fenced) stops the process. Subscribers read with `isolation.level=read_committed`.
//!
//! Order: records with the same key complete in partition order (a record waits for the
//! previous in-flight record of its key); records of different keys run concurrently.
//!
//! Errors follow [`crate::error`]: poison → DLQ, transient → retry with backoff until the
//! processor's `transient_budget`, fatal → liveness fails and `run` returns the error.
//!
//! Memory is bounded: at most `max_in_flight` records are in flight (partitions are paused
//! above it and resumed at half), librdkafka's prefetch is capped, and no stage buffers
//! without a bound. On shutdown the loop stops reading, drains in-flight work up to
//! `drain_timeout`, commits and returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

pub use crate::client::{client_config, producer, wait_for_broker};
use crate::codec::{Codec, CodecError};
use crate::error::ErrorKind;
use crate::events::Event;
use crate::offsets::OffsetTracker;
use crate::processor::{ProcessError, Processor, RecordMeta};
use crate::telemetry::{metrics, Health};
use crate::topology::{Delivery, ProcessorSpec};

/// Everything the run loop needs; built from `topology.yaml` and the environment.
/// (`Debug`, with secrets masked, is in [`crate::client`].)
#[derive(Clone)]
pub struct RunnerConfig {
    /// Bootstrap servers (`KAFKA_BOOTSTRAP`).
    pub brokers: String,
    /// Topics, group and limits of this processor.
    pub spec: ProcessorSpec,
    /// Extra librdkafka properties: topology `kafka.client` with the environment's security
    /// settings on top ([`crate::client::properties`]).
    pub client: BTreeMap<String, String>,
    /// Liveness and readiness, shared with the HTTP server and the processor's components.
    pub health: Arc<Health>,
}

impl RunnerConfig {
    /// A config with a fresh [`Health`] already marked loaded (the caller loaded what it needs).
    pub fn new(brokers: impl Into<String>, spec: ProcessorSpec, client: BTreeMap<String, String>) -> Self {
        let health = Health::new();
        health.set_loaded(true);
        RunnerConfig { brokers: brokers.into(), spec, client, health }
    }

    /// The same config reporting to `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = health;
        self
    }
}

/// What a run did, for logs and tests.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    /// Records handled with outputs (or none) acknowledged.
    pub processed: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Records still in flight when the drain timeout expired (will be redelivered).
    pub abandoned: usize,
    /// Transient failures retried.
    pub retries: u64,
    /// Times the input partitions were paused for backpressure.
    pub pauses: u64,
    /// Most records in flight at once.
    pub peak_in_flight: usize,
    /// Exactly-once: transactions committed.
    pub transactions: u64,
    /// Exactly-once: transactions aborted (their records were rewound and processed again).
    pub aborts: u64,
}

struct Ctx {
    name: &'static str,
    tracker: Arc<Mutex<OffsetTracker>>,
    paused: Arc<AtomicBool>,
    health: Arc<Health>,
    /// At-least-once commits stored offsets of revoked partitions; exactly-once commits only
    /// through transactions.
    commit_on_revoke: bool,
    /// Set when partitions were revoked: exactly-once aborts the open transaction.
    revoked: Arc<AtomicBool>,
    /// Per assigned partition: cancelled on revoke, so its in-flight records stop before
    /// producing anything more (the new owner processes them again).
    partition_tokens: Arc<Mutex<HashMap<i32, CancellationToken>>>,
    /// Flushed on revoke: outputs already handed to the producer reach the broker before the
    /// partition's new owner can produce newer ones.
    producer: FutureProducer,
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
            self.revoked.store(true, Ordering::SeqCst);
            {
                let mut tokens = self.partition_tokens.lock().unwrap();
                for el in tpl.elements() {
                    if let Some(t) = tokens.remove(&el.partition()) {
                        t.cancel();
                    }
                }
            }
            if let Err(e) = self.producer.flush(Duration::from_secs(10)) {
                warn!(processor = self.name, error = %e, "flush on revoke");
            }
            let mut tracker = self.tracker.lock().unwrap();
            for el in tpl.elements() {
                tracker.revoke(el.topic(), el.partition());
                let _ = metrics().lag.remove_label_values(&[self.name, el.topic(), &el.partition().to_string()]);
            }
            info!(processor = self.name, partitions = ?partitions(tpl), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            info!(processor = self.name, partitions = ?partitions(tpl), "partitions assigned");
            if self.paused.load(Ordering::SeqCst) {
                let _ = consumer.pause(tpl);
            }
        }
        // Assigned partitions, or an idle member of the group: either way, consuming.
        self.health.set_consuming(true);
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}/{}", e.topic(), e.partition())).collect()
}

/// Retry delays: 100 ms doubling to 10 s, with jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    Duration::from_millis(base / 2 + rand::random_range(0..=base / 2))
}

/// How a record ended.
enum Done {
    Handled,
    DeadLettered,
    /// Its partition was revoked while it was in flight: the new owner handles it.
    Abandoned,
}

/// A finished record, handed from its task back to the loop.
struct Completion {
    partition: i32,
    offset: i64,
    /// The record's key and its place in the key's queue (see [`KeyOrder`]).
    key: Option<(KeyId, u64)>,
    started: Instant,
    retries: u64,
    outcome: Result<Done, ProcessError>,
}

type KeyId = (i32, Vec<u8>);

/// Per-key order: a record waits for the previous in-flight record with the same key (and
/// partition) to finish before it starts, so outputs and rows follow partition order per key.
#[derive(Default)]
struct KeyOrder {
    /// Per key: the sequence number of the last admitted record and a receiver that resolves
    /// when it finished.
    tails: HashMap<KeyId, (u64, futures::future::Shared<oneshot::Receiver<()>>)>,
    next: u64,
}

impl KeyOrder {
    /// Admit a record: returns its sequence number, what to wait for, and its own done signal.
    fn enter(&mut self, id: KeyId) -> (u64, Option<futures::future::Shared<oneshot::Receiver<()>>>, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        let seq = self.next;
        self.next += 1;
        let prev = self.tails.insert(id, (seq, rx.shared())).map(|(_, r)| r);
        (seq, prev, tx)
    }

    /// A record finished: forget its key unless a later record of the key is queued behind it.
    fn leave(&mut self, id: &KeyId, seq: u64) {
        if self.tails.get(id).is_some_and(|(s, _)| *s == seq) {
            self.tails.remove(id);
        }
    }
}

struct Shared<P> {
    name: &'static str,
    spec: ProcessorSpec,
    codec: Arc<Codec>,
    processor: Arc<P>,
    producer: FutureProducer,
    stop: CancellationToken,
    /// Largest output the producer accepts (`message.max.bytes`).
    max_output_bytes: usize,
    health: Arc<Health>,
}

/// The loop's state: consumer, in-flight records, offsets, key order, backpressure.
struct Runner<P: Processor> {
    name: &'static str,
    spec: ProcessorSpec,
    consumer: StreamConsumer<Ctx>,
    shared: Arc<Shared<P>>,
    tracker: Arc<Mutex<OffsetTracker>>,
    paused: Arc<AtomicBool>,
    revoked: Arc<AtomicBool>,
    partition_tokens: Arc<Mutex<HashMap<i32, CancellationToken>>>,
    health: Arc<Health>,
    keys: KeyOrder,
    in_flight: FuturesUnordered<BoxFuture<'static, Completion>>,
    summary: RunSummary,
    /// Exactly-once: the next offset to consume per partition, for the open transaction.
    txn_offsets: BTreeMap<i32, i64>,
}

/// Run a processor until `shutdown` is cancelled (then drain, commit, return) or a fatal error.
pub async fn run<P: Processor>(cfg: RunnerConfig, codec: Arc<Codec>, processor: Arc<P>, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let health = cfg.health.clone();
    let name = processor.name();
    if !wait_for_registry(name, &codec, &health, &shutdown).await {
        return Ok(RunSummary::default());
    }
    let result = match Runner::new(cfg, codec, processor) {
        Ok(mut r) => match r.spec.delivery {
            Delivery::AtLeastOnce => r.run_at_least_once(shutdown).await,
            Delivery::ExactlyOnce => r.run_exactly_once(shutdown).await,
        },
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        metrics().fatal.with_label_values(&[name]).inc();
        health.set_fatal(format!("{e:#}"));
    }
    result
}

impl<P: Processor> Runner<P> {
    fn new(cfg: RunnerConfig, codec: Arc<Codec>, processor: Arc<P>) -> anyhow::Result<Self> {
        let name = processor.name();
        let spec = cfg.spec.clone();
        let exactly_once = spec.delivery == Delivery::ExactlyOnce;
        anyhow::ensure!(!exactly_once || spec.output.is_some(), "processors.{name}.delivery: exactly_once needs an output topic");
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let paused = Arc::new(AtomicBool::new(false));
        let revoked = Arc::new(AtomicBool::new(false));
        let partition_tokens = Arc::new(Mutex::new(HashMap::new()));
        cfg.health.set_thresholds(spec.stall_timeout, spec.consumer_error_timeout);
        let producer = if exactly_once {
            transactional_producer(&cfg.brokers, &cfg.client, &spec)?
        } else {
            producer(&cfg.brokers, &cfg.client)?
        };
        let ctx = Ctx {
            name,
            tracker: tracker.clone(),
            paused: paused.clone(),
            health: cfg.health.clone(),
            commit_on_revoke: !exactly_once,
            revoked: revoked.clone(),
            partition_tokens: partition_tokens.clone(),
            producer: producer.clone(),
        };
        // Tunables first (user properties may override them), then the properties the guarantee
        // depends on (they always win; `kafka.client` may not set them at all).
        let user_max = cfg.client.get("message.max.bytes").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let mut cc = rdkafka::config::ClientConfig::new();
        cc.set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .set("max.poll.interval.ms", "300000")
            .set("queued.max.messages.kbytes", spec.max_prefetch_kbytes.to_string())
            .set("fetch.max.bytes", 8_388_608u64.max(user_max).to_string())
            .set("statistics.interval.ms", "5000");
        // The raw properties, not `ClientConfig::config_map` (which masks passwords).
        cc.set("bootstrap.servers", &cfg.brokers).set("client.id", "streamoasis");
        for (k, v) in &cfg.client {
            cc.set(k, v);
        }
        cc.set("group.id", &spec.group)
            .set("enable.auto.commit", if exactly_once { "false" } else { "true" })
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("isolation.level", "read_committed");
        let consumer: StreamConsumer<Ctx> = cc.create_with_context(ctx)?;
        consumer.subscribe(&[spec.input.as_str()])?;
        let max_output_bytes = cfg.client.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
        let shared = Arc::new(Shared { name, spec: spec.clone(), codec, processor, producer, stop: CancellationToken::new(), max_output_bytes, health: cfg.health.clone() });
        info!(processor = name, input = %spec.input, group = %spec.group, delivery = ?spec.delivery, "started");
        Ok(Runner {
            name,
            spec,
            consumer,
            shared,
            tracker,
            paused,
            revoked,
            partition_tokens,
            health: cfg.health,
            keys: KeyOrder::default(),
            in_flight: FuturesUnordered::new(),
            summary: RunSummary::default(),
            txn_offsets: BTreeMap::new(),
        })
    }

    async fn run_at_least_once(&mut self, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
        let result = self.consume_until(&shutdown, None).await;
        self.health.set_consuming(false);
        let drained = self.drain().await;
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(processor = self.name, error = %e, "final commit (nothing stored is fine)");
        }
        self.consumer.unsubscribe();
        info!(processor = self.name, processed = self.summary.processed, dead_lettered = self.summary.dead_lettered, "stopped");
        result.and(drained).map(|()| self.summary.clone())
    }

    /// Read, admit and account records until shutdown, a fatal error, or (exactly-once) the
    /// commit deadline.
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
            tokio::select! {
                biased;
                Some(c) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.account(c)?;
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
                msg = self.consumer.recv() => match msg {
                    Ok(msg) => {
                        self.health.consumer_error(false);
                        let msg = msg.detach();
                        self.admit(msg);
                    }
                    Err(e) => {
                        self.health.consumer_error(true);
                        m.consumer_errors.with_label_values(&[self.name]).inc();
                        warn!(processor = self.name, error = %e, failing_for_s = self.health.consumer_failing_for().as_secs(), "consumer error");
                        if let Some(fatal) = fatal_consumer_error(&e, &self.spec) {
                            if self.health.consumer_failing_for() >= Duration::from_secs(10) {
                                anyhow::bail!(fatal);
                            }
                        }
                        self.check_consumer_errors()?;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
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
        let (topic, partition, offset) = (msg.topic().to_string(), msg.partition(), msg.offset());
        self.tracker.lock().unwrap().begin(&topic, partition, offset);
        let (key, wait, done) = match msg.key() {
            Some(k) => {
                let id = (partition, k.to_vec());
                let (seq, wait, done) = self.keys.enter(id.clone());
                (Some((id, seq)), wait, Some(done))
            }
            None => (None, None, None),
        };
        let shared = self.shared.clone();
        let revoked = self.partition_tokens.lock().unwrap().entry(partition).or_default().clone();
        let span = info_span!("record", processor = self.name, topic = %topic, partition, offset);
        crate::telemetry::set_parent_from_headers(&span, msg.headers());
        self.in_flight.push(
            async move {
                let started = Instant::now();
                let work = async {
                    if let Some(w) = wait {
                        let _ = w.await;
                    }
                    handle(&shared, msg).instrument(span).await
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
        if n >= self.spec.max_in_flight && !self.paused.load(Ordering::SeqCst) {
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
            self.mark_handled(c.partition, c.offset)?;
        }
        let n = self.in_flight.len();
        m.in_flight.with_label_values(&[name]).set(n as i64);
        self.health.set_in_flight(n);
        if self.paused.load(Ordering::SeqCst) && n <= (self.spec.max_in_flight / 2).max(1) {
            self.set_paused(false);
        }
        Ok(())
    }

    /// Backpressure: pause (or resume) every assigned partition.
    fn set_paused(&self, pause: bool) {
        if let Ok(a) = self.consumer.assignment() {
            let r = if pause { self.consumer.pause(&a) } else { self.consumer.resume(&a) };
            if let Err(e) = r {
                warn!(processor = self.name, error = %e, pause, "pause/resume failed");
            }
        }
        self.paused.store(pause, Ordering::SeqCst);
        metrics().paused.with_label_values(&[self.name]).set(pause as i64);
        debug!(processor = self.name, in_flight = self.in_flight.len(), pause, "backpressure");
    }

    /// A record is fully handled: store its partition's new watermark, if it advanced.
    fn mark_handled(&mut self, partition: i32, offset: i64) -> anyhow::Result<()> {
        let topic = self.spec.input.clone();
        let next = self.tracker.lock().unwrap().complete(&topic, partition, offset);
        if let Some(next) = next {
            if self.spec.delivery == Delivery::ExactlyOnce {
                self.txn_offsets.insert(partition, next);
                return Ok(());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, partition, Offset::Offset(next))?;
            if let Err(e) = self.consumer.store_offsets(&tpl) {
                // The partition was revoked meanwhile: its new owner replays from the last commit.
                debug!(%topic, partition, error = %e, "offset not stored");
            }
        }
        Ok(())
    }

    /// No more reads: finish what is in flight, up to the drain timeout.
    async fn drain(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.spec.drain_timeout;
        let mut fatal = Ok(());
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.in_flight.next()).await {
                Ok(Some(c)) => {
                    if let Err(e) = self.account(c) {
                        if fatal.is_ok() {
                            fatal = Err(e);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    self.summary.abandoned += self.in_flight.len();
                    warn!(processor = self.name, abandoned = self.summary.abandoned, "drain timeout: abandoning in-flight records (they will be redelivered)");
                    break;
                }
            }
        }
        self.shared.stop.cancel();
        self.in_flight = FuturesUnordered::new();
        fatal
    }

    /// Exactly-once: transactions of at most `commit_interval` each.
    async fn run_exactly_once(&mut self, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
        let producer = self.shared.producer.clone();
        blocking(move || producer.init_transactions(Duration::from_secs(30))).await.map_err(|e| anyhow::anyhow!("init_transactions: {e}"))?;
        let mut result = Ok(());
        while result.is_ok() && !shutdown.is_cancelled() {
            let producer = self.shared.producer.clone();
            blocking(move || producer.begin_transaction()).await?;
            self.revoked.store(false, Ordering::SeqCst);
            let until = tokio::time::Instant::now() + self.spec.commit_interval;
            result = self.consume_until(&shutdown, Some(until)).await;
            // Stop admitting; finish the transaction's records.
            if result.is_ok() {
                result = self.drain_for_commit().await;
            }
            if result.is_err() {
                break;
            }
            match self.commit_transaction().await {
                Ok(()) => self.summary.transactions += 1,
                Err(TxnError::Abortable(e)) => {
                    warn!(processor = self.name, error = %e, "transaction aborted: rewinding to the last committed offsets");
                    self.abort_and_rewind().await?;
                }
                Err(TxnError::Fatal(e)) => result = Err(e),
            }
        }
        self.health.set_consuming(false);
        if result.is_err() {
            let _ = self.abort_and_rewind().await;
        }
        self.shared.stop.cancel();
        self.consumer.unsubscribe();
        info!(processor = self.name, processed = self.summary.processed, dead_lettered = self.summary.dead_lettered, transactions = self.summary.transactions, aborts = self.summary.aborts, "stopped");
        result.map(|()| self.summary.clone())
    }

    /// Wait for every in-flight record of the open transaction (no timeout: the transaction
    /// cannot commit without them; stalls show in liveness).
    async fn drain_for_commit(&mut self) -> anyhow::Result<()> {
        while let Some(c) = self.in_flight.next().await {
            self.account(c)?;
        }
        Ok(())
    }

    async fn commit_transaction(&mut self) -> Result<(), TxnError> {
        let producer = self.shared.producer.clone();
        if self.revoked.load(Ordering::SeqCst) {
            return Err(TxnError::Abortable(anyhow::anyhow!("partitions were revoked during the transaction")));
        }
        if !self.txn_offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &self.txn_offsets {
                tpl.add_partition_offset(&self.spec.input, *p, Offset::Offset(*o)).map_err(|e| TxnError::Fatal(e.into()))?;
            }
            let cgm = self.consumer.group_metadata().ok_or_else(|| TxnError::Fatal(anyhow::anyhow!("no consumer group metadata")))?;
            let p = producer.clone();
            blocking(move || p.send_offsets_to_transaction(&tpl, &cgm, Duration::from_secs(30))).await.map_err(txn_error)?;
        }
        blocking(move || producer.commit_transaction(Duration::from_secs(60))).await.map_err(txn_error)?;
        self.txn_offsets.clear();
        Ok(())
    }

    /// Abort the open transaction and seek every assigned partition back to its committed offset.
    async fn abort_and_rewind(&mut self) -> anyhow::Result<()> {
        self.summary.aborts += 1;
        // Dropping the in-flight futures abandons their records: they are read again.
        self.in_flight = FuturesUnordered::new();
        self.partition_tokens.lock().unwrap().clear();
        self.keys = KeyOrder::default();
        let producer = self.shared.producer.clone();
        blocking(move || producer.abort_transaction(Duration::from_secs(60))).await.map_err(|e| anyhow::anyhow!("abort_transaction: {e}"))?;
        self.txn_offsets.clear();
        let assignment = self.consumer.assignment()?;
        let committed = self.consumer.committed_offsets(assignment, Duration::from_secs(30))?;
        let mut tracker = self.tracker.lock().unwrap();
        for el in committed.elements() {
            tracker.revoke(el.topic(), el.partition());
            let to = match el.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(e) = self.consumer.seek(el.topic(), el.partition(), to, Duration::from_secs(10)) {
                warn!(processor = self.name, partition = el.partition(), error = %e, "seek after abort failed");
            }
        }
        drop(tracker);
        // Records already fetched past the committed offsets are read again after the seek.
        Ok(())
    }
}

enum TxnError {
    Abortable(anyhow::Error),
    Fatal(anyhow::Error),
}

fn txn_error(e: KafkaError) -> TxnError {
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => TxnError::Fatal(anyhow::anyhow!("transaction: {e} (another instance with this transactional id or a newer group generation fenced this one)")),
        KafkaError::Transaction(t) if t.txn_requires_abort() || t.is_retriable() => TxnError::Abortable(e.into()),
        _ => TxnError::Abortable(e.into()),
    }
}

/// Run a blocking client call off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f).await.unwrap_or(Err(KafkaError::Canceled))
}

/// A transactional producer for exactly-once delivery. Zombies are fenced by the consumer group
/// metadata sent with the offsets (KIP-447); the transactional id is stable per instance
/// (`STREAMOASIS_TRANSACTIONAL_ID`, else `<group>-<hostname>`: the pod name in Kubernetes), so a
/// restarted instance aborts the transaction its predecessor left open at once instead of
/// leaving `read_committed` readers waiting for `transaction.timeout.ms`. Replicas must not
/// share an id: on one host, give each its own `STREAMOASIS_TRANSACTIONAL_ID`.
fn transactional_producer(brokers: &str, extra: &BTreeMap<String, String>, spec: &ProcessorSpec) -> Result<FutureProducer, KafkaError> {
    let id = std::env::var("STREAMOASIS_TRANSACTIONAL_ID").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "local".into());
        format!("{}-{host}", spec.group)
    });
    let mut c = client_config(brokers, extra);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "30000");
    c.create()
}

/// Consumer errors that no retry can fix (authorisation); they become fatal after a short grace.
fn fatal_consumer_error(e: &KafkaError, spec: &ProcessorSpec) -> Option<String> {
    match e.rdkafka_error_code()? {
        RDKafkaErrorCode::TopicAuthorizationFailed => Some(format!("not authorised to read {}: grant READ on the topic to this principal", spec.input)),
        RDKafkaErrorCode::GroupAuthorizationFailed => Some(format!("not authorised to use consumer group {}: grant READ on the group to this principal", spec.group)),
        RDKafkaErrorCode::SaslAuthenticationFailed => Some("Kafka authentication failed: check the SASL username and password".into()),
        _ => None,
    }
}

/// Wait until the schema registry answers, readiness failing meanwhile with the reason (the
/// process stays alive: restarting would not bring the registry back). False on shutdown.
async fn wait_for_registry(name: &'static str, codec: &Codec, health: &Health, shutdown: &CancellationToken) -> bool {
    let mut attempt = 0u32;
    loop {
        match codec.probe().await {
            Ok(()) => {
                health.set_degraded("schema registry", None);
                if attempt > 0 {
                    info!(processor = name, attempts = attempt + 1, "schema registry reachable");
                }
                return true;
            }
            Err(e) => {
                health.set_degraded("schema registry", Some(e.to_string()));
                if attempt.is_multiple_of(10) {
                    warn!(processor = name, error = %e, "schema registry unreachable at start; not ready, retrying with backoff");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = shutdown.cancelled() => return false,
        }
        attempt += 1;
    }
}

/// The dependency a retrying stage waits on (readiness names it).
fn stage_dependency(stage: &str) -> &'static str {
    match stage {
        "decode" | "encode" => "schema registry",
        "produce" | "dead_letter" => "kafka",
        _ => "processing",
    }
}

/// Handle one record end to end: decode, process, produce outputs, or dead-letter. Transient
/// failures retry with backoff until the transient budget is spent.
async fn handle<P: Processor>(s: &Shared<P>, msg: OwnedMessage) -> (Result<Done, ProcessError>, u64) {
    let mut attempt = 0u32;
    let first_failure = Instant::now();
    loop {
        let outcome = try_handle(s, &msg).await;
        match outcome {
            Ok(done) => {
                s.health.clear_degraded();
                return (Ok(done), attempt as u64);
            }
            Err(Attempt::Poison { kind, message, schema_id }) => {
                return (dead_letter(s, &msg, kind, &message, schema_id).await.map(|()| Done::DeadLettered), attempt as u64);
            }
            Err(Attempt::Retry { stage, message }) => {
                metrics().retries.with_label_values(&[s.name, stage]).inc();
                s.health.set_degraded(stage_dependency(stage), Some(message.clone()));
                if first_failure.elapsed() > s.spec.transient_budget {
                    let e = ProcessError::Fatal(format!(
                        "{stage} kept failing for {} (processors.{}.transient_budget): {message}",
                        humantime::format_duration(s.spec.transient_budget),
                        s.name
                    ));
                    return (Err(e), attempt as u64);
                }
                if attempt.is_multiple_of(10) {
                    warn!(processor = s.name, stage, attempt, error = %message, "transient failure, retrying with backoff");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = s.stop.cancelled() => return (Err(ProcessError::Transient(format!("abandoned on shutdown: {message}"))), attempt as u64),
                }
                attempt += 1;
            }
            Err(Attempt::Fatal(e)) => return (Err(e), attempt as u64),
        }
    }
}

enum Attempt {
    Poison { kind: ErrorKind, message: String, schema_id: Option<u32> },
    Retry { stage: &'static str, message: String },
    Fatal(ProcessError),
}

async fn try_handle<P: Processor>(s: &Shared<P>, msg: &OwnedMessage) -> Result<Done, Attempt> {
    let size = msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len);
    if size > s.spec.max_record_bytes {
        return Err(Attempt::Poison {
            kind: ErrorKind::RecordTooLarge,
            message: format!("record of {size} bytes is over processors.{}.max_record_bytes ({})", s.name, s.spec.max_record_bytes),
            schema_id: None,
        });
    }
    let decoded = s.codec.decode::<P::Input>(msg.payload()).instrument(info_span!("decode")).await;
    let decoded = match decoded {
        Ok(d) => d,
        Err(CodecError::Poison { kind, message, schema_id }) => return Err(Attempt::Poison { kind, message, schema_id }),
        Err(CodecError::Unavailable(m)) => return Err(Attempt::Retry { stage: "decode", message: m }),
        Err(e @ CodecError::Incompatible(_)) => return Err(Attempt::Fatal(ProcessError::Fatal(e.to_string()))),
    };
    let meta = RecordMeta {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        schema_id: decoded.schema_id,
        timestamp_ms: msg.timestamp().to_millis(),
    };
    let ingested_at = decoded.event.ingested_at_ms();
    let observe_e2e = || {
        if let Some(t) = ingested_at {
            let secs = (crate::events::now_millis() - t).max(0) as f64 / 1000.0;
            metrics().e2e_latency.with_label_values(&[s.name]).observe(secs);
        }
    };
    let outputs = match s.processor.process(decoded.event, meta).await {
        Ok(o) => o,
        Err(ProcessError::Poison { kind, message }) => return Err(Attempt::Poison { kind, message, schema_id: Some(decoded.schema_id) }),
        Err(ProcessError::Transient(m)) => return Err(Attempt::Retry { stage: "process", message: m }),
        Err(e @ ProcessError::Fatal(_)) => return Err(Attempt::Fatal(e)),
    };
    if outputs.is_empty() {
        observe_e2e();
        return Ok(Done::Handled);
    }
    let Some(topic) = s.spec.output.as_deref() else {
        return Err(Attempt::Fatal(ProcessError::Fatal(format!("processor {} produced output but has no output topic", s.name))));
    };
    // Encode all first (a too-large output dead-letters the input before anything is sent),
    // then produce all and wait for every acknowledgement.
    let mut payloads = Vec::with_capacity(outputs.len());
    for out in &outputs {
        match s.codec.encode(topic, out).await {
            Ok(p) if p.len() + out.key().len() + 512 > s.max_output_bytes => {
                return Err(Attempt::Poison {
                    kind: ErrorKind::OutputTooLarge,
                    message: format!("output of {} bytes is over the producer's message.max.bytes ({})", p.len() + out.key().len(), s.max_output_bytes),
                    schema_id: None,
                })
            }
            Ok(p) => payloads.push(p),
            Err(CodecError::Unavailable(m)) => return Err(Attempt::Retry { stage: "encode", message: m }),
            Err(e) => return Err(Attempt::Fatal(ProcessError::Fatal(e.to_string()))),
        }
    }
    let sends = outputs.iter().zip(&payloads).map(|(out, payload)| {
        let headers = crate::telemetry::trace_headers(msg);
        s.producer.send(FutureRecord::to(topic).key(out.key()).payload(payload).headers(headers), Duration::from_secs(0))
    });
    let results = futures::future::join_all(sends).instrument(info_span!("produce", topic)).await;
    for res in results {
        if let Err((e, _)) = res {
            return Err(classify_produce_error(&e, topic));
        }
    }
    observe_e2e();
    Ok(Done::Handled)
}

/// Produce errors: too large → poison; not authorised / unknown topic / fenced → fatal;
/// anything else (timeouts, leader changes, broker down) → retry.
fn classify_produce_error(e: &KafkaError, topic: &str) -> Attempt {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => Attempt::Poison {
            kind: ErrorKind::OutputTooLarge,
            message: format!("{topic} refused the output: {e} (raise the topic's max.message.bytes if such outputs are expected)"),
            schema_id: None,
        },
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::TransactionalIdAuthorizationFailed) => {
            Attempt::Fatal(ProcessError::Fatal(format!("not authorised to write to {topic}: {e} (grant WRITE on {topic} to this principal)")))
        }
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => {
            Attempt::Fatal(ProcessError::Fatal(format!("topic {topic} does not exist: {e} (run `streamoasis topology apply`)")))
        }
        Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch) => Attempt::Fatal(ProcessError::Fatal(format!("producer fenced: {e}"))),
        _ => Attempt::Retry { stage: "produce", message: e.to_string() },
    }
}

/// Send the original bytes to the dead-letter topic with headers saying why; waits for the ack.
/// Transient failures retry within the transient budget; a refusal (too large, not authorised)
/// is fatal, since the record could otherwise only be dropped.
async fn dead_letter<P: Processor>(s: &Shared<P>, msg: &OwnedMessage, kind: ErrorKind, message: &str, schema_id: Option<u32>) -> Result<(), ProcessError> {
    metrics().dead_letters.with_label_values(&[s.name, kind.as_str()]).inc();
    // Error messages can quote the record: keep the header small.
    let message: String = message.chars().take(1000).collect();
    warn!(processor = s.name, kind = kind.as_str(), error = %message, "poison record → {}", s.spec.dlq);
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let schema = schema_id.map(|i| i.to_string()).unwrap_or_default();
    let mut headers = OwnedHeaders::new();
    if let Some(orig) = msg.headers() {
        for hdr in orig.iter() {
            headers = headers.insert(Header { key: hdr.key, value: hdr.value });
        }
    }
    let headers = headers
        .insert(Header { key: "error.kind", value: Some(kind.as_str()) })
        .insert(Header { key: "error.message", value: Some(message.as_str()) })
        .insert(Header { key: "error.processor", value: Some(s.name) })
        .insert(Header { key: "source.topic", value: Some(msg.topic()) })
        .insert(Header { key: "source.partition", value: Some(partition.as_str()) })
        .insert(Header { key: "source.offset", value: Some(offset.as_str()) })
        .insert(Header { key: "schema.id", value: Some(schema.as_str()) });
    let mut attempt = 0;
    let started = Instant::now();
    let mut omit_payload = false;
    let size = msg.payload().map_or(0, <[u8]>::len).to_string();
    loop {
        let mut rec = FutureRecord::to(&s.spec.dlq).headers(headers.clone());
        if omit_payload {
            rec = rec.headers(headers.clone().insert(Header { key: "error.payload_omitted_bytes", value: Some(size.as_str()) }));
        } else if let Some(p) = msg.payload() {
            rec = rec.payload(p);
        }
        if let Some(k) = msg.key() {
            rec = rec.key(k);
        }
        match s.producer.send(rec, Duration::from_secs(0)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => {
                match classify_produce_error(&e, &s.spec.dlq) {
                    Attempt::Fatal(f) => return Err(f),
                    Attempt::Poison { message, .. } if msg.payload().is_some() && !omit_payload => {
                        // Too large for the dead-letter topic: dead-letter the headers alone (the
                        // original stays in the source topic at source.partition/source.offset).
                        warn!(processor = s.name, error = %message, "dead letter too large: sending it without its payload");
                        omit_payload = true;
                        continue;
                    }
                    Attempt::Poison { message, .. } => {
                        return Err(ProcessError::Fatal(format!("the dead-letter topic {} refused a poison record: {message}", s.spec.dlq)));
                    }
                    Attempt::Retry { .. } => {}
                }
                if started.elapsed() > s.spec.transient_budget {
                    return Err(ProcessError::Fatal(format!("dead-letter topic {} kept failing: {e}", s.spec.dlq)));
                }
                warn!(processor = s.name, error = %e, "dead-letter produce failed, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = s.stop.cancelled() => return Err(ProcessError::Transient(format!("dead letter abandoned on shutdown: {e}"))),
                }
                attempt += 1;
            }
        }
    }
}

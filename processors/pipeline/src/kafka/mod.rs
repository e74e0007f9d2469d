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
//!
//! ## Layout
//! - [`mod@self`]: [`run`], its config and summary, the wait for the schema registry.
//! - `runner`: the loop (admit, account, backpressure, rebalances, drain, commit periods).
//! - `record`: one record end to end (decode → process → encode → produce), retries, and the
//!   classification of produce errors.
//! - `order`: per-key order.
//! - `dlq`: writing dead letters (the header contract is [`crate::dlq`]).
//! - `consumer`: the consumer context (lag metrics; rebalances sent to the loop over a channel).
//! - `commit`: the `Commit` strategy of each delivery guarantee, over small
//!   consumer and producer traits so it is tested without a broker.

mod commit;
mod consumer;
mod dlq;
mod order;
mod record;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::stream::FuturesUnordered;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::client::{self, DEFAULT_MESSAGE_MAX_BYTES};
/// The client constructors, where callers of the run loop have always found them.
pub use crate::client::{client_config, producer, wait_for_broker};
use crate::codec::Codec;
use crate::processor::Processor;
use crate::secret::redacted;
use crate::telemetry::{metrics, Health};
use crate::topology::{Delivery, ProcessorSpec};
use commit::{AtLeastOnce, Commit, ExactlyOnce};
use consumer::Ctx;
use order::KeyOrder;
use record::{backoff, Shared};
use runner::{Backpressure, Progress, Runner};

/// Everything the run loop needs; built from `topology.yaml` and the environment.
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

impl std::fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerConfig").field("brokers", &self.brokers).field("spec", &self.spec).field("client", &redacted(&self.client)).finish()
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

/// Run a processor until `shutdown` is cancelled (then drain, commit, return) or a fatal error.
pub async fn run<P: Processor>(cfg: RunnerConfig, codec: Arc<Codec>, processor: Arc<P>, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let health = cfg.health.clone();
    let name = processor.name();
    if !wait_for_registry(name, &codec, &health, &shutdown).await {
        return Ok(RunSummary::default());
    }
    let result = start(cfg, codec, processor, shutdown).await;
    if let Err(e) = &result {
        metrics().fatal.with_label_values(&[name]).inc();
        health.set_fatal(format!("{e:#}"));
    }
    result
}

/// Build the clients and the delivery guarantee's commit strategy, then run the loop.
async fn start<P: Processor>(cfg: RunnerConfig, codec: Arc<Codec>, processor: Arc<P>, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let name = processor.name();
    let spec = cfg.spec.clone();
    let exactly_once = spec.delivery == Delivery::ExactlyOnce;
    anyhow::ensure!(!exactly_once || spec.output.is_some(), "processors.{name}.delivery: exactly_once needs an output topic");
    cfg.health.set_thresholds(spec.stall_timeout, spec.consumer_error_timeout);
    let producer = if exactly_once { client::transactional_producer(&cfg.brokers, &cfg.client, &spec.group)? } else { client::producer(&cfg.brokers, &cfg.client)? };
    let (events_tx, events) = mpsc::unbounded_channel();
    let ctx = Ctx { name, commit_on_revoke: !exactly_once, producer: producer.clone(), events: events_tx };
    let consumer: StreamConsumer<Ctx> = client::consumer_config(&cfg.brokers, &cfg.client, &spec, exactly_once).create_with_context(ctx)?;
    consumer.subscribe(&[spec.input.as_str()])?;
    let consumer = Arc::new(consumer);
    let max_output_bytes = cfg.client.get("message.max.bytes").and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
    let shared = Arc::new(Shared {
        name,
        spec: spec.clone(),
        codec,
        processor,
        producer: producer.clone(),
        stop: CancellationToken::new(),
        max_output_bytes,
        health: cfg.health.clone(),
        dlq_solo: Default::default(),
    });
    info!(processor = name, input = %spec.input, group = %spec.group, delivery = ?spec.delivery, "started");
    let parts = Parts { name, spec: spec.clone(), consumer: consumer.clone(), events, shared, health: cfg.health.clone() };
    let last = consumer.clone();
    let result = match spec.delivery {
        Delivery::AtLeastOnce => parts.runner(AtLeastOnce::new(consumer, spec.drain_timeout)).run(shutdown).await,
        Delivery::ExactlyOnce => parts.runner(ExactlyOnce::new(consumer, producer, spec.input.clone(), spec.commit_interval)).run(shutdown).await,
    };
    close_within(name, last, CONSUMER_CLOSE_TIMEOUT).await;
    result
}

/// How long the consumer's close (leave the group, final commit) may take at the end of a run.
const CONSUMER_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Drop the last reference to the consumer (librdkafka's close) on a thread of its own, waiting at
/// most `limit`: with the broker gone the close can block for minutes, and a processor that has
/// decided to stop (a fatal consumer error, most of all) must stop.
async fn close_within(name: &'static str, consumer: Arc<StreamConsumer<Ctx>>, limit: std::time::Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("streamoasis-consumer-close".into()).spawn(move || {
        drop(consumer);
        let _ = tx.send(());
    });
    if spawned.is_ok() && tokio::time::timeout(limit, rx).await.is_err() {
        warn!(processor = name, limit_s = limit.as_secs(), "the Kafka consumer did not close in time (broker unreachable?): stopping without it");
    }
}

/// The loop's parts that do not depend on the delivery guarantee.
struct Parts<P: Processor> {
    name: &'static str,
    spec: ProcessorSpec,
    consumer: Arc<StreamConsumer<Ctx>>,
    events: mpsc::UnboundedReceiver<consumer::RebalanceEvent>,
    shared: Arc<Shared<P>>,
    health: Arc<Health>,
}

impl<P: Processor> Parts<P> {
    fn runner<K: Commit>(self, commit: K) -> Runner<P, K> {
        Runner {
            name: self.name,
            progress: Progress::new(self.spec.input.clone(), commit),
            backpressure: Backpressure::new(self.spec.max_in_flight),
            spec: self.spec,
            consumer: self.consumer,
            events: self.events,
            shared: self.shared,
            health: self.health,
            partition_tokens: HashMap::new(),
            keys: KeyOrder::default(),
            in_flight: FuturesUnordered::new(),
            summary: RunSummary::default(),
            read_again_at: None,
            txn_failed: None,
        }
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

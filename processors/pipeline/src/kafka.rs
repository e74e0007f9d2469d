//! The Kafka run loop shared by every processor.
//!
//! Guarantee: **at-least-once**. Auto-commit is on and auto-store off; an input offset is
//! stored only when every earlier record of its partition is fully handled — its outputs
//! acknowledged by Kafka (`acks=all`, idempotent producer), or the record acknowledged on the
//! dead-letter topic. After a crash, records after the last commit are processed again; outputs
//! are keyed and sinks upsert, so replays are harmless. Limit: a replay re-emits tagged events.
//!
//! Memory is bounded: at most `max_in_flight` records are in flight (partitions are paused
//! above it and resumed at half), librdkafka's prefetch is capped, and no stage buffers
//! without a bound. On shutdown the loop stops reading, drains in-flight work up to
//! `drain_timeout`, commits the stored offsets synchronously and returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

pub use crate::client::{client_config, producer, wait_for_broker};
use crate::codec::{Codec, CodecError};
use crate::events::Event;
use crate::offsets::OffsetTracker;
use crate::processor::{ProcessError, Processor, RecordMeta};
use crate::telemetry::metrics;
use crate::topology::ProcessorSpec;

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
}

struct Ctx {
    name: &'static str,
    tracker: Arc<Mutex<OffsetTracker>>,
    paused: Arc<AtomicBool>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Commit what is stored before the partitions move, so the next owner starts there.
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                debug!(processor = self.name, error = %e, "commit on revoke (nothing stored is fine)");
            }
            let mut tracker = self.tracker.lock().unwrap();
            for el in tpl.elements() {
                tracker.revoke(el.topic(), el.partition());
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

enum Done {
    Handled,
    DeadLettered,
}

struct Shared<P> {
    name: &'static str,
    spec: ProcessorSpec,
    codec: Arc<Codec>,
    processor: Arc<P>,
    producer: FutureProducer,
    stop: CancellationToken,
}

/// Run a processor until `shutdown` is cancelled (then drain, commit, return) or a fatal error.
pub async fn run<P: Processor>(cfg: RunnerConfig, codec: Arc<Codec>, processor: Arc<P>, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let name = processor.name();
    let spec = cfg.spec.clone();
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let paused = Arc::new(AtomicBool::new(false));
    let ctx = Ctx { name, tracker: tracker.clone(), paused: paused.clone() };
    let mut cc = client_config(&cfg.brokers, &cfg.client);
    cc.set("group.id", &spec.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "45000")
        .set("max.poll.interval.ms", "300000")
        .set("queued.max.messages.kbytes", spec.max_prefetch_kbytes.to_string())
        .set("fetch.max.bytes", "8388608")
        .set("isolation.level", "read_committed");
    for (k, v) in &cfg.client {
        cc.set(k, v);
    }
    let consumer: StreamConsumer<Ctx> = cc.create_with_context(ctx)?;
    consumer.subscribe(&[spec.input.as_str()])?;
    let shared = Arc::new(Shared {
        name,
        spec: spec.clone(),
        codec,
        processor,
        producer: producer(&cfg.brokers, &cfg.client)?,
        stop: CancellationToken::new(),
    });
    info!(processor = name, input = %spec.input, group = %spec.group, "started");
    crate::telemetry::set_ready(true);

    let m = metrics();
    let mut summary = RunSummary::default();
    let mut in_flight = FuturesUnordered::new();
    let resume_at = (spec.max_in_flight / 2).max(1);
    let mut fatal: Option<anyhow::Error> = None;

    loop {
        tokio::select! {
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (topic, partition, offset, started, res): (String, i32, i64, Instant, Result<Done, ProcessError>) = done;
                match res {
                    Ok(d) => {
                        m.latency.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
                        match d {
                            Done::Handled => { summary.processed += 1; m.records.with_label_values(&[name, "ok"]).inc(); }
                            Done::DeadLettered => { summary.dead_lettered += 1; m.records.with_label_values(&[name, "dlq"]).inc(); }
                        }
                        mark_handled(&consumer, &tracker, &topic, partition, offset)?;
                    }
                    Err(e) => {
                        error!(processor = name, %topic, partition, offset, error = %e, "fatal error, stopping");
                        fatal = Some(anyhow::anyhow!("{topic}/{partition}@{offset}: {e}"));
                        break;
                    }
                }
                m.in_flight.with_label_values(&[name]).set(in_flight.len() as i64);
                if paused.load(Ordering::SeqCst) && in_flight.len() <= resume_at {
                    if let Ok(a) = consumer.assignment() {
                        consumer.resume(&a)?;
                    }
                    paused.store(false, Ordering::SeqCst);
                    m.paused.with_label_values(&[name]).set(0);
                    debug!(processor = name, in_flight = in_flight.len(), "resumed");
                }
            }
            _ = shutdown.cancelled() => {
                info!(processor = name, in_flight = in_flight.len(), "shutdown requested: draining");
                break;
            }
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(msg) => msg.detach(),
                    Err(e) => {
                        warn!(processor = name, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                tracker.lock().unwrap().begin(msg.topic(), msg.partition(), msg.offset());
                let (topic, partition, offset) = (msg.topic().to_string(), msg.partition(), msg.offset());
                let shared = shared.clone();
                let span = info_span!("record", processor = name, topic = %topic, partition, offset);
                in_flight.push(async move {
                    let started = Instant::now();
                    let res = handle(&shared, msg).instrument(span).await;
                    (topic, partition, offset, started, res)
                });
                m.in_flight.with_label_values(&[name]).set(in_flight.len() as i64);
                if in_flight.len() >= spec.max_in_flight && !paused.load(Ordering::SeqCst) {
                    paused.store(true, Ordering::SeqCst);
                    if let Ok(a) = consumer.assignment() {
                        consumer.pause(&a)?;
                    }
                    m.paused.with_label_values(&[name]).set(1);
                    debug!(processor = name, in_flight = in_flight.len(), "paused: in-flight limit reached");
                }
            }
        }
    }

    crate::telemetry::set_ready(false);
    // Drain: no more reads; finish what is in flight, up to the drain timeout.
    let deadline = tokio::time::Instant::now() + spec.drain_timeout;
    while !in_flight.is_empty() {
        match tokio::time::timeout_at(deadline, in_flight.next()).await {
            Ok(Some((topic, partition, offset, _, Ok(d)))) => {
                match d {
                    Done::Handled => summary.processed += 1,
                    Done::DeadLettered => summary.dead_lettered += 1,
                }
                mark_handled(&consumer, &tracker, &topic, partition, offset)?;
            }
            Ok(Some((_, _, _, _, Err(e)))) => {
                fatal.get_or_insert(anyhow::anyhow!("{e}"));
            }
            Ok(None) => break,
            Err(_) => {
                summary.abandoned = in_flight.len();
                warn!(processor = name, abandoned = summary.abandoned, "drain timeout: abandoning in-flight records (they will be redelivered)");
                shared.stop.cancel();
                break;
            }
        }
    }
    drop(in_flight);
    shared.stop.cancel();
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        debug!(processor = name, error = %e, "final commit (nothing stored is fine)");
    }
    consumer.unsubscribe();
    info!(processor = name, processed = summary.processed, dead_lettered = summary.dead_lettered, "stopped");
    match fatal {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// A record is fully handled: store its partition's new watermark, if it advanced.
fn mark_handled(consumer: &StreamConsumer<Ctx>, tracker: &Mutex<OffsetTracker>, topic: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    let next = tracker.lock().unwrap().complete(topic, partition, offset);
    if let Some(next) = next {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next))?;
        if let Err(e) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: its new owner replays from the last commit.
            debug!(%topic, partition, error = %e, "offset not stored");
        }
    }
    Ok(())
}

/// Handle one record end to end: decode, process, produce outputs, or dead-letter.
async fn handle<P: Processor>(s: &Shared<P>, msg: OwnedMessage) -> Result<Done, ProcessError> {
    let mut attempt = 0u32;
    loop {
        let outcome = try_handle(s, &msg).await;
        match outcome {
            Ok(done) => return Ok(done),
            Err(Attempt::Poison { kind, message, schema_id }) => {
                dead_letter(s, &msg, kind, &message, schema_id).await?;
                return Ok(Done::DeadLettered);
            }
            Err(Attempt::Retry { stage, message }) => {
                metrics().retries.with_label_values(&[s.name, stage]).inc();
                if attempt % 10 == 0 {
                    warn!(processor = s.name, stage, attempt, error = %message, "transient failure, retrying with backoff");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = s.stop.cancelled() => return Err(ProcessError::Transient(format!("abandoned on shutdown: {message}"))),
                }
                attempt += 1;
            }
            Err(Attempt::Fatal(e)) => return Err(e),
        }
    }
}

enum Attempt {
    Poison { kind: &'static str, message: String, schema_id: Option<u32> },
    Retry { stage: &'static str, message: String },
    Fatal(ProcessError),
}

async fn try_handle<P: Processor>(s: &Shared<P>, msg: &OwnedMessage) -> Result<Done, Attempt> {
    let decoded = match s.codec.decode::<P::Input>(msg.payload()).await {
        Ok(d) => d,
        Err(CodecError::Poison { kind, message, schema_id }) => return Err(Attempt::Poison { kind: kind.as_str(), message, schema_id }),
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
    let outputs = match s.processor.process(decoded.event, meta).await {
        Ok(o) => o,
        Err(ProcessError::Poison { kind, message }) => return Err(Attempt::Poison { kind, message, schema_id: Some(decoded.schema_id) }),
        Err(ProcessError::Transient(m)) => return Err(Attempt::Retry { stage: "process", message: m }),
        Err(e @ ProcessError::Fatal(_)) => return Err(Attempt::Fatal(e)),
    };
    if outputs.is_empty() {
        return Ok(Done::Handled);
    }
    let Some(topic) = s.spec.output.as_deref() else {
        return Err(Attempt::Fatal(ProcessError::Fatal(format!("processor {} produced output but has no output topic", s.name))));
    };
    // Encode all first, then produce all and wait for every acknowledgement.
    let mut payloads = Vec::with_capacity(outputs.len());
    for out in &outputs {
        match s.codec.encode(topic, out).await {
            Ok(p) => payloads.push(p),
            Err(CodecError::Unavailable(m)) => return Err(Attempt::Retry { stage: "encode", message: m }),
            Err(e) => return Err(Attempt::Fatal(ProcessError::Fatal(e.to_string()))),
        }
    }
    let sends = outputs.iter().zip(&payloads).map(|(out, payload)| {
        let headers = copy_trace_headers(msg);
        s.producer.send(FutureRecord::to(topic).key(out.key()).payload(payload).headers(headers), Duration::from_secs(0))
    });
    for res in futures::future::join_all(sends).await {
        if let Err((e, _)) = res {
            return Err(Attempt::Retry { stage: "produce", message: e.to_string() });
        }
    }
    Ok(Done::Handled)
}

/// W3C trace context travels from input to output.
fn copy_trace_headers(msg: &OwnedMessage) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(headers) = msg.headers() {
        for hdr in headers.iter() {
            if hdr.key == "traceparent" || hdr.key == "tracestate" {
                h = h.insert(Header { key: hdr.key, value: hdr.value });
            }
        }
    }
    h
}

/// Send the original bytes to the dead-letter topic with headers saying why; waits for the ack.
async fn dead_letter<P: Processor>(s: &Shared<P>, msg: &OwnedMessage, kind: &'static str, message: &str, schema_id: Option<u32>) -> Result<(), ProcessError> {
    metrics().dead_letters.with_label_values(&[s.name, kind]).inc();
    warn!(processor = s.name, kind, error = %message, "poison record → {}", s.spec.dlq);
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
        .insert(Header { key: "error.kind", value: Some(kind) })
        .insert(Header { key: "error.message", value: Some(message) })
        .insert(Header { key: "error.processor", value: Some(s.name) })
        .insert(Header { key: "source.topic", value: Some(msg.topic()) })
        .insert(Header { key: "source.partition", value: Some(partition.as_str()) })
        .insert(Header { key: "source.offset", value: Some(offset.as_str()) })
        .insert(Header { key: "schema.id", value: Some(schema.as_str()) });
    let mut attempt = 0;
    loop {
        let mut rec = FutureRecord::to(&s.spec.dlq).headers(headers.clone());
        if let Some(p) = msg.payload() {
            rec = rec.payload(p);
        }
        if let Some(k) = msg.key() {
            rec = rec.key(k);
        }
        match s.producer.send(rec, Duration::from_secs(0)).await {
            Ok(_) => return Ok(()),
            Err((e, _)) => {
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

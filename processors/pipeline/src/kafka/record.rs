//! One record, end to end: decode, process, encode, produce and wait for the acknowledgements,
//! or dead-letter it. Transient failures retry with backoff until the processor's
//! `transient_budget` is spent; the error's class decides (see [`crate::error`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::dlq::dead_letter;
use crate::codec::{Codec, CodecError};
use crate::error::ErrorKind;
use crate::events::Event;
use crate::processor::{ProcessError, Processor, RecordMeta};
use crate::telemetry::{metrics, Health};
use crate::topology::{Delivery, ProcessorSpec};

/// Bytes a produced record carries beyond its key and value (headers, framing), counted when an
/// output is checked against the producer's `message.max.bytes`.
pub(crate) const OUTPUT_OVERHEAD_BYTES: usize = 512;

/// What the processors' records need, shared by every record task.
pub(crate) struct Shared<P> {
    pub name: &'static str,
    pub spec: ProcessorSpec,
    pub codec: Arc<Codec>,
    pub processor: Arc<P>,
    pub producer: FutureProducer,
    /// Cancelled when the loop stops: records retrying give up.
    pub stop: CancellationToken,
    /// Largest output the producer accepts (`message.max.bytes`).
    pub max_output_bytes: usize,
    pub health: Arc<Health>,
    /// Dead letters are sent under its read lock; a letter the broker called too large is sent
    /// again under its write lock, alone in its batch (see [`super::dlq::dead_letter`]).
    pub dlq_solo: tokio::sync::RwLock<()>,
}

/// How a record ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Done {
    Handled,
    DeadLettered,
    /// Its partition was revoked while it was in flight: the new owner handles it.
    Abandoned,
    /// Exactly-once: a produce into the open transaction failed. The transaction can only be
    /// aborted now (every later send in it fails too), so the record is not retried: the loop
    /// aborts the period and reads its records again.
    TransactionFailed(String),
}

/// One try at a record failed.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The record itself is bad: dead-letter it.
    Poison { kind: ErrorKind, message: String, schema_id: Option<u32> },
    /// A dependency failed: try again after a backoff.
    Retry { stage: &'static str, message: String },
    /// Stop the processor.
    Fatal(ProcessError),
}

/// Retry delays: 100 ms doubling to 10 s, with jitter (between half and the whole delay).
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(7)).min(10_000);
    Duration::from_millis(base / 2 + rand::random_range(0..=base / 2))
}

/// Whether a transient failure at `stage` ends the open transaction instead of being retried:
/// under exactly-once a failed send (an output or a dead letter) leaves the transaction
/// abortable only (librdkafka fails every later send in it, e.g. messages timed out while the
/// process was paused), so retrying the record inside it would fail until the budget is spent.
pub(crate) fn fails_transaction(stage: &str, delivery: Delivery) -> bool {
    delivery == Delivery::ExactlyOnce && matches!(stage, "produce" | "dead_letter")
}

/// The dependency a retrying stage waits on (readiness names it).
pub(crate) fn stage_dependency(stage: &str) -> &'static str {
    match stage {
        "decode" | "encode" => "schema registry",
        "produce" | "dead_letter" => "kafka",
        _ => "processing",
    }
}

/// An encoded output must fit the producer's `message.max.bytes`; a larger one dead-letters
/// its input before anything is sent.
pub(crate) fn check_output_size(payload: usize, key: usize, max_output_bytes: usize) -> Result<(), Attempt> {
    if payload + key + OUTPUT_OVERHEAD_BYTES > max_output_bytes {
        return Err(Attempt::Poison {
            kind: ErrorKind::OutputTooLarge,
            message: format!("output of {} bytes is over the producer's message.max.bytes ({max_output_bytes})", payload + key),
            schema_id: None,
        });
    }
    Ok(())
}

/// Produce errors: too large → poison; not authorised / unknown topic / fenced → fatal;
/// anything else (timeouts, leader changes, broker down) → retry.
pub(crate) fn classify_produce_error(e: &KafkaError, topic: &str) -> Attempt {
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
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => Attempt::Fatal(ProcessError::Fatal(format!("topic {topic} does not exist: {e} (run `streamoasis topology apply`)"))),
        Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch) => Attempt::Fatal(ProcessError::Fatal(format!("producer fenced: {e}"))),
        _ => Attempt::Retry { stage: "produce", message: e.to_string() },
    }
}

/// Handle one record end to end: decode, process, produce outputs, or dead-letter. Transient
/// failures retry with backoff until the transient budget is spent. Returns the outcome and the
/// number of retries.
pub(crate) async fn handle<P: Processor>(s: &Shared<P>, msg: OwnedMessage) -> (Result<Done, ProcessError>, u64) {
    let mut attempt = 0u32;
    // When the record's first transient failure happened: the budget counts from there.
    let mut failing_since: Option<Instant> = None;
    loop {
        match try_handle(s, &msg).await {
            Ok(done) => {
                s.health.clear_degraded();
                return (Ok(done), attempt as u64);
            }
            Err(Attempt::Poison { kind, message, schema_id }) => {
                return (dead_letter(s, &msg, kind, &message, schema_id).await, attempt as u64);
            }
            Err(Attempt::Retry { stage, message }) if fails_transaction(stage, s.spec.delivery) => {
                return (Ok(Done::TransactionFailed(format!("{stage}: {message}"))), attempt as u64);
            }
            Err(Attempt::Retry { stage, message }) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                metrics().retries.with_label_values(&[s.name, stage]).inc();
                s.health.set_degraded(stage_dependency(stage), Some(message.clone()));
                if since.elapsed() > s.spec.transient_budget {
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

async fn try_handle<P: Processor>(s: &Shared<P>, msg: &OwnedMessage) -> Result<Done, Attempt> {
    let size = msg.payload().map_or(0, <[u8]>::len) + msg.key().map_or(0, <[u8]>::len);
    if size > s.spec.max_record_bytes {
        return Err(Attempt::Poison {
            kind: ErrorKind::RecordTooLarge,
            message: format!("record of {size} bytes is over processors.{}.max_record_bytes ({})", s.name, s.spec.max_record_bytes),
            schema_id: None,
        });
    }
    let stage = |name: &str, since: Instant| metrics().stage_latency.with_label_values(&[s.name, name]).observe(since.elapsed().as_secs_f64());
    let t = Instant::now();
    let decoded = s.codec.decode::<P::Input>(msg.payload()).instrument(info_span!("decode")).await;
    stage("decode", t);
    let decoded = match decoded {
        Ok(d) => d,
        Err(CodecError::Poison { kind, message, schema_id }) => return Err(Attempt::Poison { kind, message, schema_id }),
        Err(CodecError::Unavailable(m)) => return Err(Attempt::Retry { stage: "decode", message: m }),
        Err(e @ CodecError::Incompatible(_)) => return Err(Attempt::Fatal(ProcessError::Fatal(e.to_string()))),
    };
    let meta =
        RecordMeta { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset(), schema_id: decoded.schema_id, timestamp_ms: msg.timestamp().to_millis() };
    let ingested_at = decoded.event.ingested_at_ms();
    let observe_e2e = || {
        if let Some(t) = ingested_at {
            let secs = (crate::events::now_millis() - t).max(0) as f64 / 1000.0;
            metrics().e2e_latency.with_label_values(&[s.name]).observe(secs);
        }
    };
    let t = Instant::now();
    let processed = s.processor.process(decoded.event, meta).await;
    stage("process", t);
    let outputs = match processed {
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
    let t = Instant::now();
    let mut payloads = Vec::with_capacity(outputs.len());
    for out in &outputs {
        match s.codec.encode(topic, out).await {
            Ok(p) => {
                check_output_size(p.len(), out.key().len(), s.max_output_bytes)?;
                payloads.push(p);
            }
            Err(CodecError::Unavailable(m)) => return Err(Attempt::Retry { stage: "encode", message: m }),
            Err(e) => return Err(Attempt::Fatal(ProcessError::Fatal(e.to_string()))),
        }
    }
    stage("encode", t);
    let t = Instant::now();
    let sends = outputs.iter().zip(&payloads).map(|(out, payload)| {
        let headers = crate::telemetry::trace_headers(msg);
        s.producer.send(FutureRecord::to(topic).key(out.key()).payload(payload).headers(headers), Duration::from_secs(0))
    });
    let results = futures::future::join_all(sends).instrument(info_span!("produce", topic)).await;
    stage("produce", t);
    for res in results {
        if let Err((e, _)) = res {
            return Err(classify_produce_error(&e, topic));
        }
    }
    observe_e2e();
    Ok(Done::Handled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::RDKafkaErrorCode as C;

    fn produce_error(code: C) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn produce_errors_are_classified_by_code() {
        assert!(matches!(classify_produce_error(&produce_error(C::MessageSizeTooLarge), "t"), Attempt::Poison { kind: ErrorKind::OutputTooLarge, .. }));
        assert!(matches!(classify_produce_error(&produce_error(C::InvalidMessageSize), "t"), Attempt::Poison { kind: ErrorKind::OutputTooLarge, .. }));
        for code in [C::TopicAuthorizationFailed, C::ClusterAuthorizationFailed, C::TransactionalIdAuthorizationFailed] {
            match classify_produce_error(&produce_error(code), "media.tagged") {
                Attempt::Fatal(ProcessError::Fatal(m)) => assert!(m.contains("grant WRITE on media.tagged"), "{m}"),
                other => panic!("{code:?}: {other:?}"),
            }
        }
        match classify_produce_error(&produce_error(C::UnknownTopicOrPartition), "t") {
            Attempt::Fatal(ProcessError::Fatal(m)) => assert!(m.contains("topology apply"), "{m}"),
            other => panic!("{other:?}"),
        }
        for code in [C::Fenced, C::ProducerFenced, C::InvalidProducerEpoch] {
            assert!(matches!(classify_produce_error(&produce_error(code), "t"), Attempt::Fatal(_)), "{code:?}");
        }
        for code in [C::MessageTimedOut, C::NotLeaderForPartition, C::AllBrokersDown, C::RequestTimedOut, C::NotEnoughReplicas] {
            assert!(matches!(classify_produce_error(&produce_error(code), "t"), Attempt::Retry { stage: "produce", .. }), "{code:?}");
        }
        // An error without a code (e.g. the producer is gone) retries too.
        assert!(matches!(classify_produce_error(&KafkaError::Canceled, "t"), Attempt::Retry { .. }));
    }

    #[test]
    fn under_exactly_once_a_failed_send_ends_the_transaction_instead_of_retrying() {
        for stage in ["produce", "dead_letter"] {
            assert!(fails_transaction(stage, Delivery::ExactlyOnce), "{stage}");
            assert!(!fails_transaction(stage, Delivery::AtLeastOnce), "{stage}: at-least-once retries the record");
        }
        // Failures before anything is sent (registry, model) retry in either mode.
        for stage in ["decode", "encode", "process"] {
            assert!(!fails_transaction(stage, Delivery::ExactlyOnce), "{stage}");
        }
    }

    #[test]
    fn backoff_doubles_from_100ms_to_10s_with_jitter() {
        for _ in 0..200 {
            let d0 = backoff(0).as_millis();
            assert!((50..=100).contains(&d0), "{d0}");
            let d3 = backoff(3).as_millis();
            assert!((400..=800).contains(&d3), "{d3}");
            for a in [7, 8, 30, u32::MAX] {
                let d = backoff(a).as_millis();
                assert!((5_000..=10_000).contains(&d), "attempt {a}: {d}");
            }
        }
    }

    #[test]
    fn output_size_check_counts_key_and_overhead() {
        let max = 10_000;
        check_output_size(max - OUTPUT_OVERHEAD_BYTES - 10, 10, max).unwrap();
        match check_output_size(max - OUTPUT_OVERHEAD_BYTES - 10, 11, max) {
            Err(Attempt::Poison { kind: ErrorKind::OutputTooLarge, message, .. }) => assert!(message.contains("message.max.bytes (10000)"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stages_name_their_dependency() {
        assert_eq!(stage_dependency("decode"), "schema registry");
        assert_eq!(stage_dependency("encode"), "schema registry");
        assert_eq!(stage_dependency("produce"), "kafka");
        assert_eq!(stage_dependency("dead_letter"), "kafka");
        assert_eq!(stage_dependency("process"), "processing");
    }
}

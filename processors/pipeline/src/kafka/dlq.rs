//! Writing dead letters: the original record with the headers of [`crate::dlq`], acknowledged
//! by Kafka before the record counts as handled.

use std::time::{Duration, Instant};

use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use tracing::warn;

use super::record::{backoff, classify_produce_error, fails_transaction, Attempt, Done, Shared};
use crate::dlq::DeadLetter;
use crate::error::ErrorKind;
use crate::processor::ProcessError;
use crate::telemetry::metrics;

/// Send the original bytes to the dead-letter topic with headers saying why; waits for the ack.
/// Transient failures retry within the transient budget; a refusal (not authorised) is fatal,
/// since the record could otherwise only be dropped. A letter too large for the dead-letter
/// topic goes without its value (`error.payload_omitted_bytes`): the original stays in the
/// source topic at `source.partition`/`source.offset`. Under exactly-once a failed send ends the
/// transaction instead of retrying ([`Done::TransactionFailed`]).
///
/// The broker refuses a whole batch when the batch is over the topic's `max.message.bytes`, so a
/// small letter batched with a large one gets the same "too large" answer. Such a letter is sent
/// once more alone (every other dead letter of this processor waits), and only a letter refused
/// on its own loses its payload.
pub(crate) async fn dead_letter<P>(s: &Shared<P>, msg: &OwnedMessage, kind: ErrorKind, message: &str, schema_id: Option<u32>) -> Result<Done, ProcessError> {
    metrics().dead_letters.with_label_values(&[s.name, kind.as_str()]).inc();
    let mut letter = DeadLetter::new(kind, message, s.name, msg.topic(), msg.partition(), msg.offset(), schema_id);
    warn!(processor = s.name, kind = kind.as_str(), error = %letter.message, "poison record → {}", s.spec.dlq);
    let mut attempt = 0;
    let mut solo = false;
    let started = Instant::now();
    loop {
        let headers = letter.headers(msg.headers());
        let mut rec = FutureRecord::to(&s.spec.dlq).headers(headers);
        if letter.payload_omitted_bytes.is_none() {
            if let Some(p) = msg.payload() {
                rec = rec.payload(p);
            }
        }
        if let Some(k) = msg.key() {
            rec = rec.key(k);
        }
        let sent = if solo {
            let _alone = s.dlq_solo.write().await;
            s.producer.send(rec, Duration::from_secs(0)).await
        } else {
            let _shared = s.dlq_solo.read().await;
            s.producer.send(rec, Duration::from_secs(0)).await
        };
        let Err((e, _)) = sent else { return Ok(Done::DeadLettered) };
        match classify_produce_error(&e, &s.spec.dlq) {
            Attempt::Fatal(f) => return Err(f),
            Attempt::Poison { .. } if msg.payload().is_some() && letter.payload_omitted_bytes.is_none() && !solo => {
                // Perhaps refused for its batch's size, not its own: once more, alone.
                solo = true;
                continue;
            }
            Attempt::Poison { message, .. } if msg.payload().is_some() && letter.payload_omitted_bytes.is_none() => {
                warn!(processor = s.name, error = %message, "dead letter too large: sending it without its payload");
                letter.payload_omitted_bytes = Some(msg.payload().map_or(0, <[u8]>::len) as u64);
                continue;
            }
            Attempt::Poison { message, .. } => {
                return Err(ProcessError::Fatal(format!("the dead-letter topic {} refused a poison record: {message}", s.spec.dlq)));
            }
            Attempt::Retry { .. } if fails_transaction("dead_letter", s.spec.delivery) => {
                return Ok(Done::TransactionFailed(format!("dead_letter: {e}")));
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

//! The processor contract: one required method; the run loop owns the Kafka plumbing.

use std::future::Future;

use crate::error::ErrorKind;
use crate::events::Event;

/// Where an input record came from.
#[derive(Debug, Clone)]
pub struct RecordMeta {
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// Writer schema id of the record.
    pub schema_id: u32,
    /// Broker timestamp of the record (ms since the epoch), if any.
    pub timestamp_ms: Option<i64>,
}

/// A processing failure, typed by what the run loop must do (see [`crate::error`]).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The record cannot be processed, ever: send it to the dead-letter topic and go on.
    #[error("{kind}: {message}")]
    Poison {
        /// Stable, low-cardinality reason (DLQ header `error.kind`, metric label).
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
    /// A dependency is unavailable (database down, timeout, overloaded): retry the record with
    /// backoff; escalates to fatal after the processor's `transient_budget`.
    #[error("transient: {0}")]
    Transient(String),
    /// The processor cannot go on (bad deployment, lost model): stop, exit non-zero.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl ProcessError {
    /// A poison error of `kind`.
    pub fn poison(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProcessError::Poison { kind, message: message.into() }
    }
}

/// A stateless stream processor: decoded input in, output events out.
///
/// The run loop decodes input, calls [`Processor::process`] concurrently for many records
/// (bounded by `max_in_flight`), encodes and produces the outputs keyed by [`Event::key`],
/// waits for Kafka's acknowledgement and only then marks the input offset handled.
pub trait Processor: Send + Sync + 'static {
    /// Input event type (decoded from the input topic).
    type Input: Event;
    /// Output event type (produced to the output topic, if any). Processors without output
    /// (such as the sink) return empty vectors.
    type Output: Event;

    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Handle one record. Must be cancel-safe: dropping the future abandons the record (it is
    /// then redelivered, as its offset was never stored).
    fn process(&self, input: Self::Input, meta: RecordMeta) -> impl Future<Output = Result<Vec<Self::Output>, ProcessError>> + Send;
}

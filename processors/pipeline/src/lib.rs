//! # streamoasis-pipeline
//!
//! Everything a streamoasis processor needs around Kafka, and nothing about models or databases.
//!
//! ## Layout
//! - [`events`]: the Rust mirrors of `schemas/*.avsc` (`MediaIngested`, `MediaTagged`).
//! - [`codec`]: Avro in the Confluent framing through a schema registry; poison vs retry.
//! - [`topology`]: `topology.yaml` parsed and validated into typed config.
//! - [`processor`]: the [`Processor`](processor::Processor) trait every processor implements.
//! - [`error`]: the error taxonomy (poison / transient / fatal) and the input limits.
//! - [`kafka`]: the run loop (consume → process → produce → store offsets), DLQ, backpressure,
//!   rebalances, commit strategies (at-least-once, exactly-once) and shutdown, one module per
//!   part; [`offsets`] holds the per-partition watermark it relies on.
//! - [`dlq`]: the dead-letter contract (header names and the parsed [`dlq::DeadLetter`]), used by
//!   the run loop that writes dead letters and by the tools that read them.
//! - [`ops`]: `retag` and `dlq replay`, which feed records back into the flow.
//! - [`client`]: the librdkafka properties of every Kafka client (topology `kafka.client` +
//!   security from the environment), the processors' consumer, producer and transactional
//!   producer, the broker wait.
//! - [`secret`]: secrets from env or files; redaction of passwords and URL credentials.
//! - [`admin`]: `topology apply` for topics and schemas.
//! - [`telemetry`]: logs, OTLP traces, Prometheus metrics.
//!
//! ## Invariants
//! - An input offset is stored only after every earlier offset of its partition was handled.
//! - Every queue is bounded; a full one pauses partitions, never drops.
//! - This crate does not depend on tch or scylla.

pub mod admin;
pub mod client;
pub mod codec;
pub mod dlq;
pub mod error;
pub mod events;
pub mod kafka;
pub mod offsets;
pub mod ops;
pub mod processor;
pub mod secret;
pub mod telemetry;
pub mod topology;

pub use tokio_util::sync::CancellationToken;

/// Environment variables every tool reads (written by `scripts/stack up` to `.cache/stack/env`).
pub mod env {
    /// Kafka bootstrap servers.
    pub const KAFKA_BOOTSTRAP: &str = "KAFKA_BOOTSTRAP";
    /// Confluent-compatible schema registry base URL.
    pub const SCHEMA_REGISTRY_URL: &str = "SCHEMA_REGISTRY_URL";
    /// ScyllaDB (or Cassandra) contact point, host:port.
    pub const SCYLLA_URI: &str = "SCYLLA_URI";
    /// Default bootstrap servers.
    pub const DEFAULT_KAFKA: &str = "127.0.0.1:9092";
    /// Default registry URL.
    pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:8081/apis/ccompat/v7";
    /// Default CQL contact point.
    pub const DEFAULT_SCYLLA: &str = "127.0.0.1:9042";

    /// The variable's value or its default.
    pub fn get(var: &str, default: &str) -> String {
        std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
    }
}

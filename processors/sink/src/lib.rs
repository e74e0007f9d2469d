//! # streamoasis-sink
//!
//! Writes `media.tagged` events into ScyllaDB (any CQL database: tests run on Cassandra 5).
//!
//! ## Layout
//! - [`config`]: [`SinkConfig`], the `scylla:` section of topology.yaml, validated.
//! - [`security`]: [`CqlSecurity`], credentials and TLS of the CQL session (topology +
//!   environment / files), and [`connect`].
//! - [`schema`]: keyspace and tables (`media_tags`, `media_by_tag`), created idempotently.
//! - [`writer`]: [`TagWriter`], prepared statements (prepared once), bounded concurrency,
//!   idempotent upserts; [`WriteError`] classifies the driver's errors.
//! - [`processor`]: [`SinkProcessor`], the pipeline processor around the writer, and [`serve`],
//!   which runs it on the Kafka run loop.
//! - [`read`]: the read path the API and `streamoasis db` serve (one item's tags; items by tag,
//!   best first, paged; row counts).
//!
//! What other crates use is re-exported here.
//!
//! ## `media_by_tag`: bounded partitions
//! `PRIMARY KEY ((tag, bucket), score, media_id)`, clustered best first. `bucket` is a stable
//! hash of the media id modulo [`BY_TAG_BUCKETS`], so a popular tag spreads over that many
//! partitions instead of one that grows without bound, and a page is a merge of the heads of
//! every bucket (see [`read`]). `topology apply` migrates the earlier one-partition-per-tag
//! layout: it drops that table, creates this one and rebuilds it from `media_tags`.
//!
//! ## Idempotence and ordering: the newest input wins
//! The version of a write comes from the input record, never from a processor's clock:
//! `(ingested_at, source partition, source offset)` of the `media.ingested` record the tags were
//! computed from (carried in the tagged event's `ingested_at` and `lineage`). Every write carries
//! `USING TIMESTAMP ingested_at × 1000 + source offset mod 1000` (µs), so the newest version wins
//! whatever the order of arrival; an event whose version is older than the stored row's is skipped
//! (a replay, or a late older event), so its tags never reappear in `media_by_tag`. Tags an item
//! no longer carries are deleted from `media_by_tag` with the same timestamp. The run loop
//! completes records with the same key in partition order, so one item's events are never
//! written concurrently by one sink.
//!
//! ## Errors
//! A write the database rejects as invalid (e.g. a key over 64 KiB) is poison (`db_rejected`,
//! to the DLQ); not authorised is fatal; unavailable, timeouts and overload are transient.
//!
//! ## ScyllaDB notes
//! The driver is shard-aware against ScyllaDB automatically (token- and shard-aware routing, no
//! configuration). Nothing here is Scylla-only. For production use `NetworkTopologyStrategy`
//! with replication 3 and `LOCAL_QUORUM` (set under `scylla:` in topology.yaml).

pub mod config;
pub mod processor;
pub mod read;
pub mod schema;
pub mod security;
pub mod writer;

pub use config::{CqlTlsConfig, SinkConfig};
pub use processor::{serve, SinkProcessor};
pub use read::count_rows;
pub use schema::{bucket_of, BY_TAG_BUCKETS};
pub use security::{connect, connect_with, env, CqlSecurity};
pub use writer::{classify, version_of, write_timestamp, TagWriter, WriteError};

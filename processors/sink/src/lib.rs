//! # streamoasis-sink
//!
//! Writes `media.tagged` events into ScyllaDB (any CQL database: tests run on Cassandra 5).
//!
//! ## Layout
//! - [`SinkConfig`]: the `scylla:` section of topology.yaml.
//! - [`schema`]: keyspace and tables (`media_tags`, `media_by_tag`), created idempotently.
//! - [`TagWriter`]: prepared statements (prepared once), bounded concurrency, idempotent upserts.
//! - [`SinkProcessor`]: the pipeline processor around the writer.
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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;
use serde::Deserialize;
use streamoasis_pipeline::error::{limits, ErrorKind};
use streamoasis_pipeline::events::MediaTagged;
use streamoasis_pipeline::processor::{ProcessError, Processor, RecordMeta};
use streamoasis_pipeline::topology::{ConfigError, Topology};
use tokio::sync::Semaphore;

/// The `scylla:` section of topology.yaml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Keyspace holding the tables.
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// Replication map for `CREATE KEYSPACE`, e.g. `{class: SimpleStrategy, replication_factor: 1}`.
    #[serde(default = "default_replication")]
    pub replication: HashMap<String, serde_yaml::Value>,
    /// Most concurrent write requests per sink replica.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout; timed-out writes are retried with backoff.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Write consistency: `ONE`, `LOCAL_QUORUM`, `QUORUM`, ...
    #[serde(default = "default_consistency")]
    pub consistency: String,
}

fn default_keyspace() -> String {
    "streamoasis".into()
}
fn default_replication() -> HashMap<String, serde_yaml::Value> {
    HashMap::from([("class".into(), "SimpleStrategy".into()), ("replication_factor".into(), 1.into())])
}
fn default_concurrency() -> usize {
    64
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_consistency() -> String {
    "LOCAL_QUORUM".into()
}

fn consistency(s: &str) -> Option<Consistency> {
    Some(match s.to_ascii_uppercase().as_str() {
        "ANY" => Consistency::Any,
        "ONE" => Consistency::One,
        "TWO" => Consistency::Two,
        "THREE" => Consistency::Three,
        "QUORUM" => Consistency::Quorum,
        "ALL" => Consistency::All,
        "LOCAL_QUORUM" => Consistency::LocalQuorum,
        "EACH_QUORUM" => Consistency::EachQuorum,
        "LOCAL_ONE" => Consistency::LocalOne,
        _ => return None,
    })
}

impl SinkConfig {
    /// Parse and validate the `scylla:` section.
    pub fn from_topology(t: &Topology) -> Result<Self, ConfigError> {
        let c: SinkConfig = t.section("scylla", &t.file.scylla)?;
        let origin = t.path.display().to_string();
        let err = |k: &str, m: String| Err(ConfigError::new(format!("{origin}: scylla.{k}"), m));
        if c.keyspace.is_empty() || !c.keyspace.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            return err("keyspace", format!("'{}' must be letters, digits and underscores", c.keyspace));
        }
        if c.concurrency == 0 {
            return err("concurrency", "must be >= 1".into());
        }
        if consistency(&c.consistency).is_none() {
            return err("consistency", format!("'{}' is not a CQL consistency (ONE, LOCAL_QUORUM, QUORUM, ...)", c.consistency));
        }
        if !c.replication.contains_key("class") {
            return err("replication", "needs a class (SimpleStrategy or NetworkTopologyStrategy)".into());
        }
        Ok(c)
    }
}

/// Keyspace and tables.
pub mod schema {
    use super::*;

    /// CQL statements creating the keyspace and tables (idempotent).
    pub fn statements(c: &SinkConfig) -> Vec<String> {
        let mut repl: Vec<String> = c
            .replication
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_yaml::Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap_or_default().trim().to_string(),
                };
                format!("'{k}': '{v}'")
            })
            .collect();
        repl.sort();
        let ks = &c.keyspace;
        vec![
            format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{{}}}", repl.join(", ")),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.media_tags (\
                 media_id text PRIMARY KEY, \
                 tags map<text, float>, \
                 top_tag text, \
                 kind text, \
                 strategy text, \
                 model text, \
                 ingested_at timestamp, \
                 tagged_at timestamp, \
                 source_topic text, source_partition int, source_offset bigint)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.media_by_tag (\
                 tag text, media_id text, score float, tagged_at timestamp, \
                 PRIMARY KEY ((tag), media_id))"
            ),
        ]
    }

    /// Create the keyspace and tables.
    pub async fn apply(session: &Session, c: &SinkConfig) -> Result<(), scylla::errors::ExecutionError> {
        for s in statements(c) {
            session.query_unpaged(s, ()).await?;
        }
        Ok(())
    }
}

/// Connect to the cluster at `uri` (host:port[,host:port...]).
pub async fn connect(uri: &str, c: &SinkConfig) -> anyhow::Result<Session> {
    let profile = ExecutionProfile::builder()
        .consistency(consistency(&c.consistency).unwrap_or(Consistency::LocalQuorum))
        .request_timeout(Some(c.request_timeout))
        .build();
    let nodes: Vec<&str> = uri.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    SessionBuilder::new()
        .known_nodes(&nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_secs(10))
        .build()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the CQL database at {uri} ({e}); start it with `scripts/stack up` or set SCYLLA_URI"))
}

/// Writes tagged events with prepared statements and bounded concurrency.
pub struct TagWriter {
    session: Arc<Session>,
    upsert: PreparedStatement,
    read_tags: PreparedStatement,
    by_tag: PreparedStatement,
    unlink: PreparedStatement,
    permits: Semaphore,
}

impl std::fmt::Debug for TagWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagWriter").finish_non_exhaustive()
    }
}

/// Why a write failed, classified for the run loop.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The database refuses this data (invalid request, value too large): retrying cannot help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The database is unavailable, overloaded or timed out: retry with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Not authorised, or our statements are wrong: a deployment problem.
    #[error("{0}")]
    Fatal(String),
}

/// Classify a driver error (see the module docs).
pub fn classify(what: &str, e: &scylla::errors::ExecutionError) -> WriteError {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    let msg = format!("{what}: {e}");
    match e {
        ExecutionError::BadQuery(_) => WriteError::Rejected(msg),
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => match db {
            DbError::Invalid | DbError::FunctionFailure { .. } => WriteError::Rejected(msg),
            DbError::Unauthorized | DbError::AuthenticationError => {
                WriteError::Fatal(format!("{msg} (grant MODIFY and SELECT on the keyspace to the sink's role)"))
            }
            DbError::SyntaxError | DbError::ConfigError => WriteError::Fatal(format!("{msg} (did `streamoasis topology apply` run?)")),
            _ => WriteError::Unavailable(msg),
        },
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => WriteError::Rejected(msg),
        _ => WriteError::Unavailable(msg),
    }
}

/// The version of an event: from the input record, never from a clock. Ordered tuples compare
/// as the rule in the module docs says.
pub fn version_of(e: &MediaTagged) -> (i64, i32, i64) {
    (e.ingested_at, e.lineage.partition, e.lineage.offset)
}

/// The CQL write timestamp (µs) of an event's version.
pub fn write_timestamp(e: &MediaTagged) -> i64 {
    e.ingested_at.saturating_mul(1000).saturating_add(e.lineage.offset.rem_euclid(1000))
}

struct DbMetrics {
    write: prometheus::Histogram,
    errors: prometheus::IntCounterVec,
    skipped: prometheus::IntCounter,
}

fn db_metrics() -> &'static DbMetrics {
    static M: std::sync::OnceLock<DbMetrics> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let r = streamoasis_pipeline::telemetry::registry();
        let m = DbMetrics {
            write: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new("streamoasis_db_write_seconds", "Time to write one tagged event (all its rows)")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .unwrap(),
            errors: prometheus::IntCounterVec::new(prometheus::Opts::new("streamoasis_db_errors_total", "Failed database writes, by class"), &["class"]).unwrap(),
            skipped: prometheus::IntCounter::new("streamoasis_db_stale_skipped_total", "Events skipped because the stored row is newer").unwrap(),
        };
        let _ = r.register(Box::new(m.write.clone()));
        let _ = r.register(Box::new(m.errors.clone()));
        let _ = r.register(Box::new(m.skipped.clone()));
        m
    })
}

impl TagWriter {
    /// Prepare the statements (once).
    pub async fn new(session: Arc<Session>, c: &SinkConfig) -> anyhow::Result<Self> {
        let ks = &c.keyspace;
        let prep = |q: String| {
            let session = session.clone();
            async move { session.prepare(q.clone()).await.map_err(|e| anyhow::anyhow!("preparing `{q}`: {e} (did `streamoasis topology apply` run?)")) }
        };
        Ok(TagWriter {
            upsert: prep(format!(
                "INSERT INTO {ks}.media_tags (media_id, tags, top_tag, kind, strategy, model, ingested_at, tagged_at, source_topic, source_partition, source_offset) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            read_tags: prep(format!("SELECT tags, ingested_at, source_partition, source_offset FROM {ks}.media_tags WHERE media_id = ?")).await?,
            by_tag: prep(format!("INSERT INTO {ks}.media_by_tag (tag, media_id, score, tagged_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            unlink: prep(format!("DELETE FROM {ks}.media_by_tag USING TIMESTAMP ? WHERE tag = ? AND media_id = ?")).await?,
            permits: Semaphore::new(c.concurrency),
            session,
        })
    }

    /// Upsert one event: the item row, one row per tag, and deletes for tags it no longer has.
    /// Returns `false` when the stored row is newer and the event was skipped.
    pub async fn write(&self, e: &MediaTagged) -> Result<bool, WriteError> {
        let started = std::time::Instant::now();
        let r = tracing::Instrument::instrument(self.write_inner(e), tracing::info_span!("db_write")).await;
        let m = db_metrics();
        m.write.observe(started.elapsed().as_secs_f64());
        match &r {
            Ok(false) => m.skipped.inc(),
            Ok(true) => {}
            Err(WriteError::Rejected(_)) => m.errors.with_label_values(&["rejected"]).inc(),
            Err(WriteError::Unavailable(_)) => m.errors.with_label_values(&["unavailable"]).inc(),
            Err(WriteError::Fatal(_)) => m.errors.with_label_values(&["fatal"]).inc(),
        }
        r
    }

    async fn write_inner(&self, e: &MediaTagged) -> Result<bool, WriteError> {
        let _permit = self.permits.acquire().await.map_err(|e| WriteError::Fatal(e.to_string()))?;
        let ts_us = write_timestamp(e);
        let read = |x: &dyn std::fmt::Display| WriteError::Unavailable(format!("read previous tags: {x}"));
        type Stored = (Option<HashMap<String, f32>>, Option<CqlTimestamp>, Option<i32>, Option<i64>);
        let stored = self
            .session
            .execute_unpaged(&self.read_tags, (&e.media_id,))
            .await
            .map_err(|x| classify("read previous tags", &x))?
            .into_rows_result()
            .map_err(|x| read(&x))?
            .maybe_first_row::<Stored>()
            .map_err(|x| read(&x))?;
        if let Some((_, Some(CqlTimestamp(at)), part, off)) = &stored {
            if (*at, part.unwrap_or(-1), off.unwrap_or(-1)) > version_of(e) {
                // A replay or a late, older event: the stored tags are newer and stay.
                return Ok(false);
            }
        }
        let previous: HashSet<String> = stored.and_then(|(m, ..)| m).map(|m| m.into_keys().collect()).unwrap_or_default();
        let tags: HashMap<String, f32> = e.tags.iter().map(|t| (t.label.clone(), t.score)).collect();
        let tagged_at = CqlTimestamp(e.tagged_at);
        let top = e.tags.first().map(|t| t.label.clone());
        let kind = format!("{:?}", e.kind).to_uppercase();
        let strategy = format!("{:?}", e.strategy).to_uppercase();
        let model = format!("{}@{}", e.model.name, e.model.version);
        let main = self.session.execute_unpaged(
            &self.upsert,
            (
                &e.media_id,
                &tags,
                &top,
                &kind,
                &strategy,
                &model,
                CqlTimestamp(e.ingested_at),
                tagged_at,
                &e.lineage.topic,
                e.lineage.partition,
                e.lineage.offset,
                ts_us,
            ),
        );
        let links = e.tags.iter().map(|t| self.session.execute_unpaged(&self.by_tag, (&t.label, &e.media_id, t.score, tagged_at, ts_us)));
        let unlinks = previous.iter().filter(|p| !tags.contains_key(*p)).map(|p| self.session.execute_unpaged(&self.unlink, (ts_us, p, &e.media_id)));
        let (main, links, unlinks) = tokio::join!(main, futures::future::join_all(links), futures::future::join_all(unlinks));
        main.map_err(|x| classify("write media_tags", &x))?;
        for r in links.into_iter().chain(unlinks) {
            r.map_err(|x| classify("write media_by_tag", &x))?;
        }
        Ok(true)
    }
}

/// The sink processor: `media.tagged` → ScyllaDB. Emits nothing.
#[derive(Debug, Clone)]
pub struct SinkProcessor {
    writer: Arc<TagWriter>,
}

impl SinkProcessor {
    /// Wrap a writer.
    pub fn new(writer: Arc<TagWriter>) -> Self {
        SinkProcessor { writer }
    }
}

impl Processor for SinkProcessor {
    type Input = MediaTagged;
    type Output = MediaTagged;

    fn name(&self) -> &'static str {
        "sink"
    }

    async fn process(&self, e: MediaTagged, _meta: RecordMeta) -> Result<Vec<MediaTagged>, ProcessError> {
        if e.media_id.trim().is_empty() {
            return Err(ProcessError::poison(ErrorKind::InvalidField, "media_id is empty"));
        }
        if e.media_id.len() > limits::MAX_MEDIA_ID_BYTES {
            return Err(ProcessError::poison(ErrorKind::MediaIdTooLong, format!("media_id is {} bytes, over {}", e.media_id.len(), limits::MAX_MEDIA_ID_BYTES)));
        }
        if let Some(t) = e.tags.iter().find(|t| !t.score.is_finite() || t.label.is_empty()) {
            return Err(ProcessError::poison(ErrorKind::InvalidField, format!("tag '{}' has score {}", t.label, t.score)));
        }
        // Unavailable: the run loop retries with backoff while the in-flight limit pauses the
        // partitions, so nothing is dropped and memory stays bounded.
        match self.writer.write(&e).await {
            Ok(_) => Ok(Vec::new()),
            Err(WriteError::Rejected(m)) => Err(ProcessError::poison(ErrorKind::DbRejected, m)),
            Err(WriteError::Unavailable(m)) => Err(ProcessError::Transient(m)),
            Err(WriteError::Fatal(m)) => Err(ProcessError::Fatal(m)),
        }
    }
}

/// Read helpers for operators and tests.
pub async fn count_rows(session: &Session, query: &str) -> anyhow::Result<i64> {
    let r = session.query_unpaged(query, ()).await?.into_rows_result()?;
    Ok(r.maybe_first_row::<(i64,)>()?.map_or(0, |(n,)| n))
}

/// Tags of one item, highest score first; `None` when the item has no row.
pub async fn get_tags(session: &Session, keyspace: &str, media_id: &str) -> anyhow::Result<Option<Vec<(String, f32)>>> {
    let q = format!("SELECT tags FROM {keyspace}.media_tags WHERE media_id = ?");
    let r = session.query_unpaged(q, (media_id,)).await?.into_rows_result()?;
    Ok(r.maybe_first_row::<(Option<HashMap<String, f32>>,)>()?.map(|(m,)| {
        let mut v: Vec<(String, f32)> = m.unwrap_or_default().into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }))
}

/// Items carrying `tag`, highest score first.
pub async fn by_tag(session: &Session, keyspace: &str, tag: &str, limit: usize) -> anyhow::Result<Vec<(String, f32)>> {
    let q = format!("SELECT media_id, score FROM {keyspace}.media_by_tag WHERE tag = ?");
    let r = session.query_unpaged(q, (tag,)).await?.into_rows_result()?;
    let mut v: Vec<(String, f32)> = r.rows::<(String, f32)>()?.collect::<Result<_, _>>()?;
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(limit);
    Ok(v)
}

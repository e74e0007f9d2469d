//! [`TagWriter`]: the idempotent writer of tagged events.
//!
//! Statements are prepared once; writes in flight are bounded by `scylla.concurrency`. Every
//! write carries the event's version as its CQL timestamp ([`write_timestamp`]) and an event
//! older than the stored row is skipped ([`version_of`]); see the crate docs for the rule.
//! Driver errors are classified for the run loop by [`classify`].

use std::collections::HashMap;
use std::sync::Arc;

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use streamoasis_pipeline::events::MediaTagged;
use tokio::sync::Semaphore;

use crate::config::SinkConfig;
use crate::schema::bucket_of;

/// Writes tagged events with prepared statements and bounded concurrency.
pub struct TagWriter {
    session: Arc<Session>,
    upsert: PreparedStatement,
    read_tags: PreparedStatement,
    by_tag: PreparedStatement,
    unlink: PreparedStatement,
    carry: PreparedStatement,
    embed: PreparedStatement,
    /// `media_embeddings.pooled` and its size, where the column exists ([`crate::schema`]).
    pooled: Option<(PreparedStatement, usize)>,
    /// Whether a vector of another size than the column was seen (warned once).
    pooled_mismatch: std::sync::atomic::AtomicBool,
    permits: Semaphore,
}

/// The values of one `media_embeddings` insert, in the statement's order.
#[derive(scylla::SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct EmbeddingRow<'a> {
    media_id: &'a str,
    embedding_version: &'a str,
    model: &'a str,
    text_hash: &'a str,
    dim: i32,
    lead: Option<&'a [u8]>,
    windows: Option<&'a [u8]>,
    lead_evidence: Option<i32>,
    has_body: bool,
    candidate_labels: Option<&'a [String]>,
    kind: &'a str,
    title: Option<&'a str>,
    source: Option<&'a str>,
    language: Option<&'a str>,
    attributes: &'a HashMap<String, String>,
    ingested_at: CqlTimestamp,
    tagged_at: CqlTimestamp,
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    ts_us: i64,
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

/// Classify a driver error (see "Errors" in the crate docs).
pub fn classify(what: &str, e: &scylla::errors::ExecutionError) -> WriteError {
    use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
    let msg = format!("{what}: {e}");
    match e {
        ExecutionError::BadQuery(_) => WriteError::Rejected(msg),
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => match db {
            DbError::Invalid | DbError::FunctionFailure { .. } => WriteError::Rejected(msg),
            DbError::Unauthorized | DbError::AuthenticationError => WriteError::Fatal(format!("{msg} (grant MODIFY and SELECT on the keyspace to the sink's role)")),
            DbError::SyntaxError | DbError::ConfigError => WriteError::Fatal(format!("{msg} (did `streamoasis topology apply` run?)")),
            _ => WriteError::Unavailable(msg),
        },
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => WriteError::Rejected(msg),
        _ => WriteError::Unavailable(msg),
    }
}

/// The version of an event: from the input record, never from a clock. Ordered tuples compare
/// as the rule in the crate docs says.
pub fn version_of(e: &MediaTagged) -> (i64, i32, i64) {
    (e.ingested_at, e.lineage.partition, e.lineage.offset)
}

/// The CQL timestamp an event that must replace the stored row writes with: its version's own
/// ([`write_timestamp`]), unless that would not come after the row's last write. Two cases need
/// that: the same input tagged again (`retag --from-embeddings` emits the stored item's version
/// with a newer `tagged_at`, so the timestamps tie), and a newer input whose timestamp is lower
/// (a retag's re-sent record: same `ingested_at`, a later offset whose last three digits are
/// smaller). Writes of one key are serial in the sink (key order), so "after the row's last
/// write" is well defined.
pub fn winning_timestamp(own_us: i64, replaces: bool, stored_written_us: Option<i64>) -> i64 {
    match stored_written_us {
        Some(w) if replaces && own_us <= w => w.saturating_add(1),
        _ => own_us,
    }
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
            read_tags: prep(format!("SELECT tags, ingested_at, source_partition, source_offset, tagged_at, WRITETIME(kind) FROM {ks}.media_tags WHERE media_id = ?")).await?,
            by_tag: prep(format!("INSERT INTO {ks}.media_by_tag (tag, bucket, score, media_id, tagged_at) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            unlink: prep(format!("DELETE FROM {ks}.media_by_tag USING TIMESTAMP ? WHERE tag = ? AND bucket = ? AND score = ? AND media_id = ?")).await?,
            carry: prep(format!("UPDATE {ks}.media_tags USING TIMESTAMP ? SET title = ?, source = ?, language = ?, attributes = ?, taxonomy_version = ? WHERE media_id = ?"))
                .await?,
            embed: prep(format!(
                "INSERT INTO {ks}.media_embeddings (media_id, embedding_version, model, text_hash, dim, lead, windows, lead_evidence, has_body, candidate_labels, \
                 kind, title, source, language, attributes, ingested_at, tagged_at, source_topic, source_partition, source_offset) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            pooled: match crate::schema::pooled_dim(&session, ks).await? {
                Some(dim) => Some((prep(format!("UPDATE {ks}.media_embeddings USING TIMESTAMP ? SET pooled = ? WHERE media_id = ?")).await?, dim)),
                None => None,
            },
            pooled_mismatch: std::sync::atomic::AtomicBool::new(false),
            permits: Semaphore::new(c.concurrency),
            session,
        })
    }

    /// Upsert one event: one row per tag and deletes for tags it no longer has, then the item row
    /// (so an event the database refuses leaves no item row).
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
        let mut ts_us = write_timestamp(e);
        let read = |x: &dyn std::fmt::Display| WriteError::Unavailable(format!("read previous tags: {x}"));
        type Stored = (Option<HashMap<String, f32>>, Option<CqlTimestamp>, Option<i32>, Option<i64>, Option<CqlTimestamp>, Option<i64>);
        let stored = self
            .session
            .execute_unpaged(&self.read_tags, (&e.media_id,))
            .await
            .map_err(|x| classify("read previous tags", &x))?
            .into_rows_result()
            .map_err(|x| read(&x))?
            .maybe_first_row::<Stored>()
            .map_err(|x| read(&x))?;
        if let Some((_, Some(CqlTimestamp(at)), part, off, tagged, written)) = &stored {
            let version = (*at, part.unwrap_or(-1), off.unwrap_or(-1));
            if version > version_of(e) {
                // A replay or a late, older event: the stored tags are newer and stay.
                return Ok(false);
            }
            let retagged = version == version_of(e) && tagged.is_some_and(|t| e.tagged_at > t.0);
            ts_us = winning_timestamp(ts_us, version < version_of(e) || retagged, *written);
        }
        let previous: HashMap<String, f32> = stored.and_then(|(m, ..)| m).unwrap_or_default();
        let tags: HashMap<String, f32> = e.tags.iter().map(|t| (t.label.clone(), t.score)).collect();
        let tagged_at = CqlTimestamp(e.tagged_at);
        let top = e.tags.first().map(|t| t.label.clone());
        let kind = e.kind.as_str();
        let strategy = e.strategy.as_str();
        let model = format!("{}@{}", e.model.name, e.model.version);
        // media_by_tag rows are keyed by (tag, bucket, score, media_id): a tag whose score
        // changed moves to a new row, so the old row is deleted like a dropped tag. They go first:
        // their keys hold the labels, so they are where the database refuses an event (a key over
        // 64 KiB), and a refused event must leave no item row behind for readers to see.
        let bucket = bucket_of(&e.media_id);
        let links = e.tags.iter().map(|t| self.session.execute_unpaged(&self.by_tag, (&t.label, bucket, t.score, &e.media_id, tagged_at, ts_us)));
        let unlinks = previous
            .iter()
            .filter(|(l, s)| tags.get(*l).is_none_or(|n| n.to_bits() != s.to_bits()))
            .map(|(l, s)| self.session.execute_unpaged(&self.unlink, (ts_us, l, bucket, *s, &e.media_id)));
        let (links, unlinks) = tokio::join!(futures::future::join_all(links), futures::future::join_all(unlinks));
        for r in links.into_iter().chain(unlinks) {
            r.map_err(|x| classify("write media_by_tag", &x))?;
        }
        let main = self.session.execute_unpaged(
            &self.upsert,
            (&e.media_id, &tags, &top, &kind, &strategy, &model, CqlTimestamp(e.ingested_at), tagged_at, &e.lineage.topic, e.lineage.partition, e.lineage.offset, ts_us),
        );
        // Fields carried from the input (title, source, language, attributes) for the read path,
        // and the taxonomy version (which rows a taxonomy change made stale).
        let carry = self.session.execute_unpaged(&self.carry, (ts_us, &e.title, &e.source, &e.language, &e.attributes, &e.taxonomy_version, &e.media_id));
        // What the model read (tagging.store_embeddings), for retag --from-embeddings. Events
        // without it (the option off, a retag from embeddings) leave a stored row as it is.
        let embed = async {
            let Some(m) = &e.embedding else { return Ok(()) };
            let row = EmbeddingRow {
                media_id: &e.media_id,
                embedding_version: &m.embedding_version,
                model: &model,
                text_hash: &m.text_hash,
                dim: m.dim,
                lead: m.lead.as_deref(),
                windows: m.windows.as_deref(),
                lead_evidence: m.lead_evidence,
                has_body: m.has_body,
                candidate_labels: m.candidate_labels.as_deref(),
                kind,
                title: e.title.as_deref(),
                source: e.source.as_deref(),
                language: e.language.as_deref(),
                attributes: &e.attributes,
                ingested_at: CqlTimestamp(e.ingested_at),
                tagged_at,
                source_topic: &e.lineage.topic,
                source_partition: e.lineage.partition,
                source_offset: e.lineage.offset,
                ts_us,
            };
            let pooled = self.pooled_vector(&e.media_id, m);
            let vector = async {
                match (&self.pooled, pooled) {
                    (Some((q, _)), Some(v)) => self.session.execute_unpaged(q, (ts_us, v, &e.media_id)).await.map(|_| ()),
                    _ => Ok(()),
                }
            };
            let (row, vector) = tokio::join!(self.session.execute_unpaged(&self.embed, row), vector);
            row.and(vector).map(|_| ())
        };
        let (main, carry, embed) = tokio::join!(main, carry, embed);
        main.map_err(|x| classify("write media_tags", &x))?;
        carry.map_err(|x| classify("write media_tags", &x))?;
        embed.map_err(|x| classify("write media_embeddings", &x))?;
        Ok(true)
    }
}

impl TagWriter {
    /// The item's pooled vector for the `pooled` column, when there is one and it fits it.
    fn pooled_vector(&self, media_id: &str, m: &streamoasis_pipeline::events::ItemEmbedding) -> Option<Vec<f32>> {
        let (_, dim) = self.pooled.as_ref()?;
        match m.pooled() {
            Ok(Some(v)) if v.len() == *dim => Some(v),
            Ok(Some(v)) => {
                if !self.pooled_mismatch.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(media_id, vector = v.len(), column = *dim,
                        "the model's vectors do not fit media_embeddings.pooled: set scylla.vector_dim to {} and follow `streamoasis topology apply`'s advice; similar media skips these items", v.len());
                }
                None
            }
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(media_id, %why, "embedding rows unreadable: no pooled vector stored");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::winning_timestamp;

    #[test]
    fn an_event_that_replaces_the_row_writes_after_it_and_others_keep_their_timestamp() {
        assert_eq!(winning_timestamp(5_000, true, Some(5_000)), 5_001, "a re-score of the same input goes after the row");
        assert_eq!(winning_timestamp(4_900, true, Some(5_000)), 5_001, "a newer input with a lower timestamp (offset digits wrapped)");
        assert_eq!(winning_timestamp(6_000, true, Some(5_000)), 6_000, "a newer input keeps its own, later timestamp");
        assert_eq!(winning_timestamp(5_000, false, Some(5_000)), 5_000, "a replay of the same event keeps its version's timestamp");
        assert_eq!(winning_timestamp(5_000, true, None), 5_000, "no row yet");
    }
}

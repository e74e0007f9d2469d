//! The read path: what the API serves from the tables the sink writes.
//!
//! - [`Reader::media`]: one item's row of `media_tags` (tags best first, carried fields).
//! - [`Reader::by_tag`]: items carrying a tag, best first, one page at a time. A page reads the
//!   head of every `(tag, bucket)` partition after the cursor (at most `limit + 1` rows each,
//!   clustered best first, so no partition is read whole), merges them and keeps `limit`. The
//!   page token is opaque to callers: it encodes the last `(score, media_id)` returned, and
//!   the next page starts strictly after it, so pages never repeat or skip an item that stays
//!   put while paging.
//! - [`count_rows`], [`count_by_tag`]: row counts for operators (`streamoasis db stats`) and tests.
//! - [`rebuild_by_tag`]: the `media_by_tag` migration [`crate::schema::apply`] runs.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;

use crate::schema::{bucket_of, BY_TAG_BUCKETS};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The page token was not one this service issued (caller error).
    #[error("page: not a page token issued by this service ({0})")]
    BadPageToken(String),
    /// The database failed (retry later).
    #[error("database: {0}")]
    Db(String),
    /// The database cannot answer this kind of read (no vector column or ANN index).
    #[error("{0}")]
    Unsupported(String),
}

fn db(e: impl std::fmt::Display) -> ReadError {
    ReadError::Db(e.to_string())
}

/// One item's stored tags and the fields carried from its input.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRecord {
    /// The item.
    pub media_id: String,
    /// Tags, highest score first.
    pub tags: Vec<(String, f32)>,
    /// Media kind (`VIDEO`, ...).
    pub kind: Option<String>,
    /// `EMBEDDING` or `NLI`.
    pub strategy: Option<String>,
    /// `name@version` of the model.
    pub model: Option<String>,
    /// Title carried from the input.
    pub title: Option<String>,
    /// Source carried from the input.
    pub source: Option<String>,
    /// Language carried from the input.
    pub language: Option<String>,
    /// Attributes carried from the input.
    pub attributes: HashMap<String, String>,
    /// The taxonomy version the tags were made with (None for rows written before it was kept).
    pub taxonomy_version: Option<String>,
    /// When the item was ingested (ms since the epoch).
    pub ingested_at: Option<i64>,
    /// When it was tagged (ms since the epoch).
    pub tagged_at: Option<i64>,
}

/// One item of a by-tag page.
#[derive(Debug, Clone, PartialEq)]
pub struct TaggedItem {
    /// The item.
    pub media_id: String,
    /// Its score for the tag.
    pub score: f32,
    /// When it was tagged (ms since the epoch).
    pub tagged_at: Option<i64>,
}

/// A page of items carrying a tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Best first.
    pub items: Vec<TaggedItem>,
    /// Token of the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Encode a cursor: `(score, media_id)` of the last item returned.
fn encode_token(score: f32, media_id: &str) -> String {
    let hex: String = media_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("p1{:08x}{hex}", score.to_bits())
}

/// Decode a cursor made by [`encode_token`].
fn decode_token(t: &str) -> Result<(f32, String), ReadError> {
    let bad = |why: &str| ReadError::BadPageToken(why.to_string());
    let rest = t.strip_prefix("p1").ok_or_else(|| bad("unknown version"))?;
    if rest.len() < 8 || rest.len() % 2 != 0 || !rest.is_ascii() {
        return Err(bad("malformed"));
    }
    let bits = u32::from_str_radix(&rest[..8], 16).map_err(|_| bad("malformed score"))?;
    let bytes: Result<Vec<u8>, _> = (8..rest.len()).step_by(2).map(|i| u8::from_str_radix(&rest[i..i + 2], 16)).collect();
    let id = String::from_utf8(bytes.map_err(|_| bad("malformed id"))?).map_err(|_| bad("malformed id"))?;
    let score = f32::from_bits(bits);
    if !score.is_finite() {
        return Err(bad("malformed score"));
    }
    Ok((score, id))
}

/// One answer of a similarity read: an item and its cosine similarity to the query vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// The item.
    pub media_id: String,
    /// Its media kind.
    pub kind: Option<String>,
    /// Its title, as carried from the input.
    pub title: Option<String>,
    /// Cosine similarity of its pooled vector to the query's (1 = same direction).
    pub similarity: f32,
}

/// Prepared read statements (prepare once per process).
pub struct Reader {
    session: Arc<Session>,
    keyspace: String,
    media: PreparedStatement,
    head: PreparedStatement,
    after: PreparedStatement,
    stored: PreparedStatement,
    /// The similarity statements, prepared on first use (the ANN index may come after start).
    ann: tokio::sync::OnceCell<Ann>,
}

/// Prepared similarity reads.
struct Ann {
    vector: PreparedStatement,
    any: PreparedStatement,
    of_kind: PreparedStatement,
}

/// Most neighbours one similarity read returns.
pub const MAX_NEIGHBOURS: usize = 100;

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

type MediaRow = (
    String,
    Option<HashMap<String, f32>>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<HashMap<String, String>>,
    Option<CqlTimestamp>,
    Option<CqlTimestamp>,
    Option<String>,
);

impl Reader {
    /// Prepare the statements against `keyspace`.
    pub async fn new(session: Arc<Session>, keyspace: &str) -> anyhow::Result<Self> {
        let ks = keyspace;
        let prep = |q: String| {
            let session = session.clone();
            async move { session.prepare(q.clone()).await.map_err(|e| anyhow::anyhow!("preparing `{q}`: {e} (did `streamoasis topology apply` run?)")) }
        };
        Ok(Reader {
            media: prep(format!(
                "SELECT media_id, tags, kind, strategy, model, title, source, language, attributes, ingested_at, tagged_at, taxonomy_version \
                 FROM {ks}.media_tags WHERE media_id = ?"
            ))
            .await?,
            head: prep(format!("SELECT score, media_id, tagged_at FROM {ks}.media_by_tag WHERE tag = ? AND bucket = ? LIMIT ?")).await?,
            after: prep(format!("SELECT score, media_id, tagged_at FROM {ks}.media_by_tag WHERE tag = ? AND bucket = ? AND (score, media_id) < (?, ?) LIMIT ?")).await?,
            stored: prep(format!("SELECT {EMBEDDING_COLUMNS} FROM {ks}.media_embeddings WHERE media_id = ?")).await?,
            keyspace: ks.to_string(),
            ann: tokio::sync::OnceCell::new(),
            session,
        })
    }

    /// The similarity statements, prepared once they can be: the server must have the
    /// `media_embeddings.pooled` vector column and its ANN index (`topology apply` creates them
    /// where the server supports them).
    async fn ann(&self) -> Result<&Ann, ReadError> {
        let ks = &self.keyspace;
        self.ann
            .get_or_try_init(|| async {
                let unsupported = |e: &dyn std::fmt::Display| {
                    ReadError::Unsupported(format!(
                        "similar media needs the database's vector search: a `pooled` vector column on {ks}.media_embeddings with an ANN index \
                         (Cassandra 5 storage-attached index, ScyllaDB vector search), created by `streamoasis topology apply` where the server has them; \
                         this one refused the query: {e}"
                    ))
                };
                let select = "SELECT media_id, kind, title, pooled";
                let vector = self.session.prepare(format!("SELECT pooled FROM {ks}.media_embeddings WHERE media_id = ?")).await.map_err(|e| unsupported(&e))?;
                let any = self.session.prepare(format!("{select} FROM {ks}.media_embeddings ORDER BY pooled ANN OF ? LIMIT ?")).await.map_err(|e| unsupported(&e))?;
                let of_kind =
                    self.session.prepare(format!("{select} FROM {ks}.media_embeddings WHERE kind = ? ORDER BY pooled ANN OF ? LIMIT ?")).await.map_err(|e| unsupported(&e))?;
                Ok(Ann { vector, any, of_kind })
            })
            .await
    }

    /// One item's stored embedding as the tagged event it was stored from (no tags), for a
    /// retag from its rows; `None` when none is stored.
    pub async fn stored_item(&self, media_id: &str) -> Result<Option<streamoasis_pipeline::events::MediaTagged>, ReadError> {
        let r = self.session.execute_unpaged(&self.stored, (media_id,)).await.map_err(db)?.into_rows_result().map_err(db)?;
        Ok(r.maybe_first_row::<EmbeddingRow>().map_err(db)?.map(event_of))
    }

    /// The stored pooled vector of one item: `Ok(None)` when no embedding is stored for it.
    pub async fn item_vector(&self, media_id: &str) -> Result<Option<Vec<f32>>, ReadError> {
        let ann = self.ann().await?;
        let r = self.session.execute_unpaged(&ann.vector, (media_id,)).await.map_err(db)?.into_rows_result().map_err(db)?;
        Ok(r.maybe_first_row::<(Option<Vec<f32>>,)>().map_err(db)?.and_then(|(v,)| v))
    }

    /// The `k` items nearest `vector` by the database's ANN index (cosine), optionally of one
    /// kind, most similar first, leaving out `exclude`. The similarity is computed here from
    /// the vectors returned, so it is exact for the items the index found.
    pub async fn nearest(&self, vector: &[f32], k: usize, kind: Option<&str>, exclude: Option<&str>) -> Result<Vec<Neighbour>, ReadError> {
        let ann = self.ann().await?;
        let limit = i32::try_from(k.min(MAX_NEIGHBOURS) + usize::from(exclude.is_some())).unwrap_or(i32::MAX);
        let r = match kind {
            Some(kind) => self.session.execute_unpaged(&ann.of_kind, (kind, vector, limit)).await,
            None => self.session.execute_unpaged(&ann.any, (vector, limit)).await,
        };
        let r = r.map_err(|e| match e.to_string() {
            m if m.contains("ANN") || m.contains("index") || m.contains("vector") => ReadError::Unsupported(format!("the database refused the similarity read: {m}")),
            m => ReadError::Db(m),
        })?;
        let rows = r.into_rows_result().map_err(db)?;
        let mut out = Vec::new();
        for row in rows.rows::<(String, Option<String>, Option<String>, Option<Vec<f32>>)>().map_err(db)? {
            let (media_id, kind, title, pooled) = row.map_err(db)?;
            if Some(media_id.as_str()) == exclude {
                continue;
            }
            let Some(pooled) = pooled else { continue };
            out.push(Neighbour { media_id, kind, title, similarity: cosine(vector, &pooled) });
        }
        out.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then_with(|| a.media_id.cmp(&b.media_id)));
        out.truncate(k);
        Ok(out)
    }

    /// One item's row; `None` when the sink has not stored it.
    pub async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>, ReadError> {
        let r = self.session.execute_unpaged(&self.media, (media_id,)).await.map_err(db)?.into_rows_result().map_err(db)?;
        let Some(row) = r.maybe_first_row::<MediaRow>().map_err(db)? else {
            return Ok(None);
        };
        let (media_id, tags, kind, strategy, model, title, source, language, attributes, ingested_at, tagged_at, taxonomy_version) = row;
        let mut tags: Vec<(String, f32)> = tags.unwrap_or_default().into_iter().collect();
        tags.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(Some(MediaRecord {
            media_id,
            tags,
            kind,
            strategy,
            model,
            title,
            source,
            language,
            attributes: attributes.unwrap_or_default(),
            ingested_at: ingested_at.map(|t| t.0),
            tagged_at: tagged_at.map(|t| t.0),
            taxonomy_version,
        }))
    }

    /// One page of the items carrying `tag`, best first (score, then media id, descending).
    pub async fn by_tag(&self, tag: &str, limit: usize, page: Option<&str>) -> Result<Page, ReadError> {
        let cursor = page.map(decode_token).transpose()?;
        let per = i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX);
        let reads = (0..BY_TAG_BUCKETS).map(|b| {
            let cursor = cursor.clone();
            async move {
                let r = match &cursor {
                    None => self.session.execute_unpaged(&self.head, (tag, b, per)).await,
                    Some((s, id)) => self.session.execute_unpaged(&self.after, (tag, b, *s, id, per)).await,
                };
                let rows = r.map_err(db)?.into_rows_result().map_err(db)?;
                let v: Vec<(f32, String, Option<CqlTimestamp>)> = rows.rows().map_err(db)?.collect::<Result<_, _>>().map_err(db)?;
                Ok::<_, ReadError>(v)
            }
        });
        let mut all: Vec<TaggedItem> = Vec::new();
        for r in futures::future::join_all(reads).await {
            all.extend(r?.into_iter().map(|(score, media_id, t)| TaggedItem { media_id, score, tagged_at: t.map(|t| t.0) }));
        }
        all.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| b.media_id.cmp(&a.media_id)));
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more { all.last().map(|l| encode_token(l.score, &l.media_id)) } else { None };
        Ok(Page { items: all, next })
    }
}

/// The count a `SELECT COUNT(*) ...` query returns (operators' commands and tests).
pub async fn count_rows(session: &Session, query: &str) -> anyhow::Result<i64> {
    let r = session.query_unpaged(query, ()).await?.into_rows_result()?;
    Ok(r.maybe_first_row::<(i64,)>()?.map_or(0, |(n,)| n))
}

/// Rows of `media_tags` per (`model`, `taxonomy_version`), by a full scan (paged): which rows a
/// model or taxonomy change left stale. `None` = rows written before the column was kept.
pub async fn count_by_version(session: &Session, keyspace: &str) -> anyhow::Result<std::collections::BTreeMap<(Option<String>, Option<String>), u64>> {
    let mut rows = session.query_iter(format!("SELECT model, taxonomy_version FROM {keyspace}.media_tags"), ()).await?.rows_stream::<(Option<String>, Option<String>)>()?;
    let mut out = std::collections::BTreeMap::new();
    while let Some(row) = rows.next().await {
        *out.entry(row?).or_insert(0u64) += 1;
    }
    Ok(out)
}

/// Every item's stored tags (a paged full scan of `media_tags`): media id → (tags, title).
pub async fn all_tags(session: &Session, keyspace: &str) -> anyhow::Result<HashMap<String, (HashMap<String, f32>, Option<String>)>> {
    let mut rows = session
        .query_iter(format!("SELECT media_id, tags, title FROM {keyspace}.media_tags"), ())
        .await?
        .rows_stream::<(String, Option<HashMap<String, f32>>, Option<String>)>()?;
    let mut out = HashMap::new();
    while let Some(row) = rows.next().await {
        let (id, tags, title) = row?;
        out.insert(id, (tags.unwrap_or_default(), title));
    }
    Ok(out)
}

/// Rows of `media_by_tag` for `tag` (every bucket).
pub async fn count_by_tag(session: &Session, keyspace: &str, tag: &str) -> anyhow::Result<i64> {
    let mut n = 0;
    for b in 0..BY_TAG_BUCKETS {
        let q = format!("SELECT COUNT(*) FROM {keyspace}.media_by_tag WHERE tag = ? AND bucket = ?");
        let r = session.query_unpaged(q, (tag, b)).await?.into_rows_result()?;
        n += r.maybe_first_row::<(i64,)>()?.map_or(0, |(c,)| c);
    }
    Ok(n)
}

/// Rebuild `media_by_tag` from `media_tags` (the migration `topology apply` runs): one row per
/// stored tag, written with the item row's own write time so later sink writes still win.
pub async fn rebuild_by_tag(session: &Session, keyspace: &str) -> anyhow::Result<u64> {
    let insert = session.prepare(format!("INSERT INTO {keyspace}.media_by_tag (tag, bucket, score, media_id, tagged_at) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?")).await?;
    let mut rows = session.query_iter(format!("SELECT media_id, tags, tagged_at, WRITETIME(top_tag) FROM {keyspace}.media_tags"), ()).await?.rows_stream::<(
        String,
        Option<HashMap<String, f32>>,
        Option<CqlTimestamp>,
        Option<i64>,
    )>()?;
    let mut n = 0u64;
    while let Some(row) = rows.next().await {
        let (media_id, tags, tagged_at, written) = row?;
        let tagged_at = tagged_at.unwrap_or(CqlTimestamp(0));
        let ts = written.unwrap_or(tagged_at.0.saturating_mul(1000));
        for (tag, score) in tags.unwrap_or_default() {
            session.execute_unpaged(&insert, (&tag, bucket_of(&media_id), score, &media_id, tagged_at, ts)).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for (s, id) in [(0.5f32, "m-1"), (0.0, ""), (1.0, "ünï/code id")] {
            let t = encode_token(s, id);
            assert_eq!(decode_token(&t).unwrap(), (s, id.to_string()));
        }
        for bad in ["", "p1", "p1zz", "x13f000000", "p13f00000", "p17fc00000"] {
            assert!(decode_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_are_stable_and_in_range() {
        assert_eq!(bucket_of("m-1"), bucket_of("m-1"));
        let used: std::collections::HashSet<i32> = (0..1000).map(|i| bucket_of(&format!("item-{i}"))).collect();
        assert_eq!(used.len(), BY_TAG_BUCKETS as usize);
        assert!(used.iter().all(|b| (0..BY_TAG_BUCKETS).contains(b)));
    }
}

/// One `media_embeddings` row, in the statement's column order.
#[derive(scylla::DeserializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct EmbeddingRow {
    media_id: String,
    embedding_version: Option<String>,
    model: Option<String>,
    text_hash: Option<String>,
    dim: Option<i32>,
    lead: Option<Vec<u8>>,
    windows: Option<Vec<u8>>,
    lead_evidence: Option<i32>,
    has_body: Option<bool>,
    candidate_labels: Option<Vec<String>>,
    kind: Option<String>,
    title: Option<String>,
    source: Option<String>,
    language: Option<String>,
    attributes: Option<HashMap<String, String>>,
    ingested_at: Option<CqlTimestamp>,
    tagged_at: Option<CqlTimestamp>,
    source_topic: Option<String>,
    source_partition: Option<i32>,
    source_offset: Option<i64>,
}

/// The columns [`EmbeddingRow`] reads, in its order.
const EMBEDDING_COLUMNS: &str = "media_id, embedding_version, model, text_hash, dim, lead, windows, lead_evidence, has_body, candidate_labels, \
     kind, title, source, language, attributes, ingested_at, tagged_at, source_topic, source_partition, source_offset";

/// A `media_embeddings` row as the tagged event it was stored from: the carried fields and
/// `embedding`, with no tags (a retag computes them). The model is the stored `name@version`.
fn event_of(r: EmbeddingRow) -> streamoasis_pipeline::events::MediaTagged {
    use streamoasis_pipeline::events::{ItemEmbedding, Lineage, MediaKind, MediaTagged, ModelRef, Strategy};
    let model = r.model.unwrap_or_default();
    let (name, version) = model.rsplit_once('@').unwrap_or((model.as_str(), ""));
    let kind: MediaKind = r.kind.and_then(|k| k.parse().ok()).unwrap_or_default();
    MediaTagged {
        media_id: r.media_id,
        kind,
        tags: vec![],
        no_tags_reason: None,
        strategy: Strategy::Embedding,
        model: ModelRef { name: name.to_string(), version: version.to_string() },
        ingested_at: r.ingested_at.map_or(0, |t| t.0),
        tagged_at: r.tagged_at.map_or(0, |t| t.0),
        lineage: Lineage { topic: r.source_topic.unwrap_or_default(), partition: r.source_partition.unwrap_or(-1), offset: r.source_offset.unwrap_or(-1) },
        title: r.title,
        source: r.source,
        language: r.language,
        attributes: r.attributes.unwrap_or_default(),
        taxonomy_version: None,
        embedding: Some(ItemEmbedding {
            embedding_version: r.embedding_version.unwrap_or_default(),
            text_hash: r.text_hash.unwrap_or_default(),
            dim: r.dim.unwrap_or(0),
            lead: r.lead,
            windows: r.windows,
            lead_evidence: r.lead_evidence,
            has_body: r.has_body.unwrap_or(false),
            candidate_labels: r.candidate_labels,
        }),
    }
}

/// Every row of `media_embeddings` (a paged full scan) as the tagged event it was stored from
/// (no tags; the model is the stored `name@version`).
pub async fn stored_embeddings(
    session: &Session,
    keyspace: &str,
) -> anyhow::Result<impl futures::Stream<Item = anyhow::Result<streamoasis_pipeline::events::MediaTagged>> + use<>> {
    let q = format!("SELECT {EMBEDDING_COLUMNS} FROM {keyspace}.media_embeddings");
    let rows = session.query_iter(q, ()).await?.rows_stream::<EmbeddingRow>()?;
    Ok(rows.map(|r| Ok(event_of(r?))))
}

/// The tagger's view of `media_embeddings` ([`streamoasis_pipeline::events::EmbeddingStore`]): one prepared single-partition
/// read per lookup, bounded by a short timeout, so a slow or absent database costs the item a
/// model pass rather than stalling the stream.
pub struct StoredEmbeddings {
    session: Arc<Session>,
    select: PreparedStatement,
}

impl std::fmt::Debug for StoredEmbeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredEmbeddings").finish_non_exhaustive()
    }
}

impl StoredEmbeddings {
    /// Prepare the lookup against `keyspace`; the database gives up on a read after `timeout`.
    pub async fn new(session: Arc<Session>, keyspace: &str, timeout: std::time::Duration) -> anyhow::Result<Self> {
        let q = format!("SELECT embedding_version, text_hash, dim, lead, windows, lead_evidence, has_body, candidate_labels FROM {keyspace}.media_embeddings WHERE media_id = ?");
        let mut select = session.prepare(q.clone()).await.map_err(|e| anyhow::anyhow!("preparing `{q}`: {e} (did `streamoasis topology apply` run?)"))?;
        select.set_request_timeout(Some(timeout));
        Ok(StoredEmbeddings { session, select })
    }

    /// Connect and prepare in a background task that retries until the database answers;
    /// until then every lookup is an error (the tagger runs the model). A tagger does not need
    /// the database to start.
    pub fn connect_in_background(uri: String, cfg: crate::SinkConfig, timeout: std::time::Duration) -> Arc<LazyStoredEmbeddings> {
        let lazy = Arc::new(LazyStoredEmbeddings { inner: tokio::sync::OnceCell::new() });
        let target = lazy.clone();
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_secs(1);
            loop {
                let attempt = async { StoredEmbeddings::new(Arc::new(crate::connect(&uri, &cfg).await?), &cfg.keyspace, timeout).await };
                match attempt.await {
                    Ok(s) => {
                        tracing::info!(keyspace = %cfg.keyspace, "stored embeddings reachable: items ingested again with unchanged text skip the model");
                        let _ = target.inner.set(s);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "stored embeddings not reachable yet (tagging.reuse_embeddings): every item goes through the model until they are");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
        lazy
    }

    async fn lookup(&self, media_id: &str) -> Result<Option<streamoasis_pipeline::events::ItemEmbedding>, String> {
        type Row = (Option<String>, Option<String>, Option<i32>, Option<Vec<u8>>, Option<Vec<u8>>, Option<i32>, Option<bool>, Option<Vec<String>>);
        let r = self.session.execute_unpaged(&self.select, (media_id,)).await.map_err(|e| e.to_string())?.into_rows_result().map_err(|e| e.to_string())?;
        let Some((version, hash, dim, lead, windows, lead_evidence, has_body, candidate_labels)) = r.maybe_first_row::<Row>().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let (Some(embedding_version), Some(text_hash), Some(dim)) = (version, hash, dim) else { return Ok(None) };
        Ok(Some(streamoasis_pipeline::events::ItemEmbedding {
            embedding_version,
            text_hash,
            dim,
            lead,
            windows,
            lead_evidence,
            has_body: has_body.unwrap_or(false),
            candidate_labels,
        }))
    }
}

impl streamoasis_pipeline::events::EmbeddingStore for StoredEmbeddings {
    fn stored<'a>(&'a self, media_id: &'a str) -> streamoasis_pipeline::events::StoredEmbedding<'a> {
        Box::pin(self.lookup(media_id))
    }
}

/// [`StoredEmbeddings`] once a background task has connected ([`StoredEmbeddings::connect_in_background`]).
#[derive(Debug)]
pub struct LazyStoredEmbeddings {
    inner: tokio::sync::OnceCell<StoredEmbeddings>,
}

impl LazyStoredEmbeddings {
    /// Whether the database has been reached.
    pub fn is_connected(&self) -> bool {
        self.inner.initialized()
    }
}

impl streamoasis_pipeline::events::EmbeddingStore for LazyStoredEmbeddings {
    fn stored<'a>(&'a self, media_id: &'a str) -> streamoasis_pipeline::events::StoredEmbedding<'a> {
        Box::pin(async move {
            match self.inner.get() {
                Some(s) => s.lookup(media_id).await,
                None => Err("the database is not reachable yet".into()),
            }
        })
    }
}

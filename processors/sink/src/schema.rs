//! Keyspace and tables: `media_tags` (one row per item) and `media_by_tag` (items by tag, in
//! [`BY_TAG_BUCKETS`] partitions per tag; see the crate docs), created idempotently by
//! [`apply`], which also adds columns introduced after the first release and migrates the
//! earlier one-partition-per-tag layout.

use std::collections::HashSet;

use scylla::client::session::Session;

use crate::config::SinkConfig;

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
        by_tag_table(ks),
        embeddings_table(ks),
    ]
}

/// What the model read of each item (`tagging.store_embeddings`), with the fields a tagged event
/// carries, so `retag --from-embeddings` can emit events from this table alone.
/// `candidate_labels` is a frozen list: one cell, so an event written again with the same
/// timestamp (at-least-once delivery) leaves one copy (a plain list would keep both writes' elements).
pub fn embeddings_table(ks: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.media_embeddings (\
         media_id text PRIMARY KEY, \
         embedding_version text, model text, text_hash text, dim int, lead blob, windows blob, \
         lead_evidence int, has_body boolean, candidate_labels frozen<list<text>>, \
         kind text, title text, source text, language text, attributes map<text, text>, \
         ingested_at timestamp, tagged_at timestamp, \
         source_topic text, source_partition int, source_offset bigint)"
    )
}

/// The bucketed by-tag table (see the crate docs).
pub fn by_tag_table(ks: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {ks}.media_by_tag (\
         tag text, bucket int, score float, media_id text, tagged_at timestamp, \
         PRIMARY KEY ((tag, bucket), score, media_id)) \
         WITH CLUSTERING ORDER BY (score DESC, media_id DESC)"
    )
}

/// Columns added to `media_tags` after its first release: `ALTER TABLE ... ADD` when absent.
pub const CARRIED_COLUMNS: [(&str, &str); 5] = [("title", "text"), ("source", "text"), ("language", "text"), ("attributes", "map<text, text>"), ("taxonomy_version", "text")];

async fn columns(session: &Session, ks: &str, table: &str) -> anyhow::Result<HashSet<String>> {
    let r = session.query_unpaged("SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?", (ks, table)).await?.into_rows_result()?;
    Ok(r.rows::<(String,)>()?.collect::<Result<Vec<_>, _>>()?.into_iter().map(|(c,)| c).collect())
}

/// Create the keyspace and tables, add missing columns and migrate an unbucketed
/// `media_by_tag` (rebuilt from `media_tags`). Idempotent; returns what it changed.
pub async fn apply(session: &Session, c: &SinkConfig) -> anyhow::Result<Vec<String>> {
    let ks = &c.keyspace;
    let mut changes = Vec::new();
    let stmts = statements(c);
    session.query_unpaged(stmts[0].clone(), ()).await?;
    session.query_unpaged(stmts[1].clone(), ()).await?;
    let have = columns(session, ks, "media_tags").await?;
    for (name, ty) in CARRIED_COLUMNS {
        if !have.contains(name) {
            session.query_unpaged(format!("ALTER TABLE {ks}.media_tags ADD {name} {ty}"), ()).await?;
            changes.push(format!("added     column media_tags.{name}"));
        }
    }
    let by_tag = columns(session, ks, "media_by_tag").await?;
    let migrate = !by_tag.is_empty() && !by_tag.contains("bucket");
    if migrate {
        session.query_unpaged(format!("DROP TABLE {ks}.media_by_tag"), ()).await?;
    }
    session.query_unpaged(by_tag_table(ks), ()).await?;
    session.query_unpaged(embeddings_table(ks), ()).await?;
    if c.vector_dim > 0 {
        changes.extend(apply_vectors(session, ks, c.vector_dim).await?);
    }
    if migrate {
        let n = crate::read::rebuild_by_tag(session, ks).await?;
        changes.push(format!("migrated  {ks}.media_by_tag to (tag, bucket) partitions: {n} rows rebuilt from media_tags"));
    }
    Ok(changes)
}

/// Name of the ANN index on `media_embeddings.pooled`.
pub const ANN_INDEX: &str = "media_embeddings_pooled_ann";

/// The similar-media column of `media_embeddings` ([`vector_type`]), its ANN index (cosine) and
/// an index on `kind` to filter ANN answers by kind, in Cassandra 5's storage-attached index
/// syntax. The reads (`ORDER BY pooled ANN OF ? LIMIT k`) are the CQL ScyllaDB's vector search
/// answers too; its index is created with its own syntax.
pub fn vector_statements(ks: &str, dim: usize) -> [String; 3] {
    [
        format!("ALTER TABLE {ks}.media_embeddings ADD pooled {}", vector_type(dim)),
        format!("CREATE CUSTOM INDEX IF NOT EXISTS {ANN_INDEX} ON {ks}.media_embeddings (pooled) USING 'StorageAttachedIndex' WITH OPTIONS = {{'similarity_function': 'cosine'}}"),
        format!("CREATE CUSTOM INDEX IF NOT EXISTS media_embeddings_kind ON {ks}.media_embeddings (kind) USING 'StorageAttachedIndex'"),
    ]
}

/// The CQL type of the pooled vector column.
pub fn vector_type(dim: usize) -> String {
    format!("vector<float, {dim}>")
}

/// The size of `media_embeddings.pooled`, when the column exists.
pub async fn pooled_dim(session: &Session, ks: &str) -> anyhow::Result<Option<usize>> {
    let r = session
        .query_unpaged("SELECT type FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = 'pooled'", (ks, "media_embeddings"))
        .await?
        .into_rows_result()?;
    let Some((t,)) = r.maybe_first_row::<(String,)>()? else { return Ok(None) };
    let dim = t.rsplit(',').next().and_then(|d| d.trim().trim_end_matches('>').trim().parse().ok());
    Ok(Some(dim.ok_or_else(|| anyhow::anyhow!("media_embeddings.pooled has type {t}, not a vector<float, N>"))?))
}

/// Add the vector column and its indexes where the server has them. A server without vector
/// columns or without the index is not an error: the tagging tables work, the similar-media
/// routes answer 501, and the change list says why and what to do.
async fn apply_vectors(session: &Session, ks: &str, dim: usize) -> anyhow::Result<Vec<String>> {
    let mut changes = Vec::new();
    let [add, ann, kind] = vector_statements(ks, dim);
    match pooled_dim(session, ks).await? {
        Some(have) if have != dim => {
            changes.push(format!(
                "kept      column media_embeddings.pooled as {}, not {} (scylla.vector_dim): vectors of another size are not written; \
                 to change it: ALTER TABLE {ks}.media_embeddings DROP pooled, apply again and `retag` to fill it",
                vector_type(have),
                vector_type(dim)
            ));
            return Ok(changes);
        }
        Some(_) => {}
        None => match session.query_unpaged(add, ()).await {
            Ok(_) => changes.push(format!("added     column media_embeddings.pooled {}", vector_type(dim))),
            Err(e) => {
                changes.push(format!("no vector column: this server refused `{}` ({e}); similar media and search answer 501", vector_type(dim)));
                return Ok(changes);
            }
        },
    }
    for (what, q) in [("ANN index", ann), ("kind index", kind)] {
        if let Err(e) = session.query_unpaged(q, ()).await {
            changes.push(format!("no {what} on media_embeddings: this server refused it ({e}); similar media and search answer 501 until one exists"));
            break;
        }
    }
    Ok(changes)
}

/// Partitions per tag in `media_by_tag` (a hash of the media id picks one). Changing it needs a
/// rebuild of the table: drop it and run `topology apply`.
pub const BY_TAG_BUCKETS: i32 = 16;

/// The `media_by_tag` bucket of a media id: FNV-1a of its bytes, stable across releases.
pub fn bucket_of(media_id: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in media_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % BY_TAG_BUCKETS as u32) as i32
}

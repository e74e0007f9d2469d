//! The sink against a real CQL database (Cassandra 5 locally, ScyllaDB in production).
//! Reads SCYLLA_URI (default 127.0.0.1:9042); each test uses its own keyspace.

use std::collections::HashMap;
use std::sync::Arc;

use streamoasis_pipeline::env;
use streamoasis_pipeline::events::{Lineage, MediaKind, MediaTagged, ModelRef, Strategy, Tag};
use streamoasis_sink::read::Reader;
use streamoasis_sink::{connect, count_rows, schema, SinkConfig, TagWriter};

fn config() -> SinkConfig {
    let ks = format!("t_{}", uuid::Uuid::new_v4().simple());
    serde_yaml::from_str(&format!("keyspace: {ks}\nconsistency: ONE")).unwrap()
}

async fn setup() -> (Arc<scylla::client::session::Session>, SinkConfig) {
    let c = config();
    let uri = env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA);
    let s = connect(&uri, &c).await.expect("CQL database answers (is `scripts/stack up` running?)");
    schema::apply(&s, &c).await.unwrap();
    (Arc::new(s), c)
}

fn event(id: &str, tagged_at: i64, tags: &[(&str, f32)]) -> MediaTagged {
    MediaTagged {
        media_id: id.into(),
        kind: MediaKind::Episode,
        tags: tags.iter().map(|(l, s)| Tag { label: l.to_string(), score: *s }).collect(),
        no_tags_reason: None,
        strategy: Strategy::Embedding,
        model: ModelRef { name: "m".into(), version: "1".into() },
        ingested_at: tagged_at - 10,
        tagged_at,
        lineage: Lineage { topic: "media.ingested".into(), partition: 0, offset: 1 },
        title: None,
        source: None,
        language: None,
        attributes: HashMap::new(),
        taxonomy_version: None,
        embedding: None,
    }
}

#[tokio::test]
async fn keyspace_table_and_row_round_trip() {
    streamoasis_testkit::require_stack!();
    let (s, c) = setup().await;
    let ks = &c.keyspace;
    s.query_unpaged(format!("CREATE TABLE IF NOT EXISTS {ks}.probe (k text PRIMARY KEY, v map<text, float>)"), ()).await.unwrap();
    let v: HashMap<String, f32> = HashMap::from([("a".into(), 0.5)]);
    s.query_unpaged(format!("INSERT INTO {ks}.probe (k, v) VALUES (?, ?)"), ("x", &v)).await.unwrap();
    let r = s.query_unpaged(format!("SELECT v FROM {ks}.probe WHERE k = ?"), ("x",)).await.unwrap().into_rows_result().unwrap();
    let (back,): (HashMap<String, f32>,) = r.single_row().unwrap();
    assert_eq!(back, v);
    // Applying the schema twice is harmless.
    schema::apply(&s, &c).await.unwrap();
}

#[tokio::test]
async fn writes_are_idempotent_and_newest_wins() {
    streamoasis_testkit::require_stack!();
    let (s, c) = setup().await;
    let w = TagWriter::new(s.clone(), &c).await.unwrap();
    let newer = event("m1", 2_000_000, &[("sport", 0.9), ("politics", 0.1)]);
    let older = event("m1", 1_000_000, &[("business", 0.8)]);
    w.write(&newer).await.unwrap();
    w.write(&newer).await.unwrap(); // replay: no change
    w.write(&older).await.unwrap(); // late, older event: must not win
    let r = Reader::new(s.clone(), &c.keyspace).await.unwrap();
    let tags = r.media("m1").await.unwrap().unwrap().tags;
    assert_eq!(tags, vec![("sport".to_string(), 0.9), ("politics".to_string(), 0.1)]);
    assert_eq!(by_tag(&r, "sport", 10).await.unwrap(), vec![("m1".to_string(), 0.9)]);
    assert!(by_tag(&r, "business", 10).await.unwrap().is_empty(), "older event's tag row shadowed");
    assert_eq!(count_rows(&s, &format!("SELECT COUNT(*) FROM {}.media_tags", c.keyspace)).await.unwrap(), 1);
}

#[tokio::test]
async fn retagging_moves_the_item_between_tags() {
    streamoasis_testkit::require_stack!();
    let (s, c) = setup().await;
    let w = TagWriter::new(s.clone(), &c).await.unwrap();
    w.write(&event("m2", 1_000, &[("tech", 0.7), ("business", 0.3)])).await.unwrap();
    w.write(&event("m2", 2_000, &[("tech", 0.6), ("sport", 0.4)])).await.unwrap();
    let r = Reader::new(s.clone(), &c.keyspace).await.unwrap();
    assert!(by_tag(&r, "business", 10).await.unwrap().is_empty(), "dropped tag unlinked");
    assert_eq!(by_tag(&r, "sport", 10).await.unwrap(), vec![("m2".to_string(), 0.4)]);
    assert_eq!(by_tag(&r, "tech", 10).await.unwrap(), vec![("m2".to_string(), 0.6)]);
}

/// The first page of items carrying `tag`, as (media id, score).
async fn by_tag(r: &Reader, tag: &str, limit: usize) -> Result<Vec<(String, f32)>, streamoasis_sink::read::ReadError> {
    Ok(r.by_tag(tag, limit, None).await?.items.into_iter().map(|i| (i.media_id, i.score)).collect())
}

/// Each row keeps the taxonomy version of its newest event; `count_by_version` counts rows per
/// (model, taxonomy version), so the rows a taxonomy change left stale are visible.
#[tokio::test]
async fn taxonomy_versions_are_stored_and_counted() {
    streamoasis_testkit::require_stack!();
    let (s, c) = setup().await;
    let w = TagWriter::new(s.clone(), &c).await.unwrap();
    let with = |id: &str, at: i64, v: Option<&str>| MediaTagged { taxonomy_version: v.map(String::from), ..event(id, at, &[("sport", 0.9)]) };
    assert!(w.write(&with("v1", 1_000, Some("tx-aaaa"))).await.unwrap());
    assert!(w.write(&with("v2", 1_000, Some("tx-aaaa"))).await.unwrap());
    assert!(w.write(&with("v3", 1_000, None)).await.unwrap());
    // v1 retagged under a new taxonomy; an older replay of v2 under the new one is skipped.
    assert!(w.write(&with("v1", 2_000, Some("tx-bbbb"))).await.unwrap());
    assert!(!w.write(&with("v2", 500, Some("tx-bbbb"))).await.unwrap());
    let r = Reader::new(s.clone(), &c.keyspace).await.unwrap();
    assert_eq!(r.media("v1").await.unwrap().unwrap().taxonomy_version.as_deref(), Some("tx-bbbb"));
    assert_eq!(r.media("v2").await.unwrap().unwrap().taxonomy_version.as_deref(), Some("tx-aaaa"));
    assert_eq!(r.media("v3").await.unwrap().unwrap().taxonomy_version, None);
    let counts = streamoasis_sink::read::count_by_version(&s, &c.keyspace).await.unwrap();
    let m = Some("m@1".to_string());
    let want = std::collections::BTreeMap::from([((m.clone(), None), 1u64), ((m.clone(), Some("tx-aaaa".to_string())), 1), ((m.clone(), Some("tx-bbbb".to_string())), 1)]);
    assert_eq!(counts, want);
}

#[tokio::test]
async fn a_replayed_event_leaves_its_embedding_row_as_written_once() {
    streamoasis_testkit::require_stack!();
    let (s, c) = setup().await;
    let w = TagWriter::new(s.clone(), &c).await.unwrap();
    let rows = vec![vec![0.6f32; 384], vec![0.8f32; 384]];
    let e = MediaTagged {
        embedding: Some(streamoasis_pipeline::events::ItemEmbedding {
            embedding_version: "ev-1".into(),
            text_hash: "th-1".into(),
            dim: 384,
            lead: None,
            windows: Some(streamoasis_pipeline::events::rows_to_bytes(&rows)),
            lead_evidence: None,
            has_body: false,
            candidate_labels: Some(vec!["money".into(), "games".into()]),
        }),
        ..event("e1", 1_000_000, &[("money", 0.7)])
    };
    // At-least-once delivery writes an event again with the same timestamp: a non-frozen list
    // would keep both writes' elements (["money", "games", "money", "games"]).
    assert!(w.write(&e).await.unwrap());
    assert!(w.write(&e).await.unwrap());
    let back: Vec<MediaTagged> =
        futures::StreamExt::collect::<Vec<_>>(streamoasis_sink::read::stored_embeddings(&s, &c.keyspace).await.unwrap()).await.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].embedding, e.embedding, "the row is the event's, once");
    let ks = &c.keyspace;
    let r = s.query_unpaged(format!("SELECT pooled FROM {ks}.media_embeddings WHERE media_id = 'e1'"), ()).await.unwrap().into_rows_result().unwrap();
    let (pooled,): (Vec<f32>,) = r.single_row().unwrap();
    let want = 0.7 / (384f32 * 0.49).sqrt();
    assert!(pooled.len() == 384 && pooled.iter().all(|x| (x - want).abs() < 1e-6), "the mean of the rows, normalised: {}", pooled[0]);
}

//! Embeddings kept (`tagging.store_embeddings`), on the real local stack: the tagger carries what
//! the model read in each tagged event, the sink stores it in `media_embeddings`, and after a
//! taxonomy change `streamoasis retag --from-embeddings` emits the tags the model would give under
//! the new taxonomy, without running the model over the text.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind, MediaTagged};
use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::processor::request_of;
use streamoasis_tagger::{text_hash, ItemEmbedding, Tagger, TaggerConfig};

const SUBJECTS: [&str; 5] = [
    "The company reported record quarterly profits and its shares rose on the stock market",
    "The striker scored twice as the team won the championship final in extra time",
    "The prime minister faced questions in parliament over the election campaign",
    "The new smartphone software update improves battery life and internet browsing",
    "The actor won an award for the film at the festival, and the album topped the charts",
];

/// Four shapes of item: a title alone; a described item with a transcript (adaptive compute reads
/// its lead first); a generic title with a transcript (no evidence: the whole text is read); and
/// items with their own candidate labels.
fn item(i: usize) -> MediaIngested {
    let text = SUBJECTS[i % SUBJECTS.len()];
    let (title, description, transcript) = match i % 4 {
        0 => (format!("{text} ({i})"), None, None),
        1 => (format!("{text} ({i})"), Some(format!("{text}, as our reporters describe in detail.")), Some(format!("Good evening and welcome. {text}. {text}."))),
        2 => (format!("Episode {i}"), None, Some(format!("Welcome back to the show. Before we start, thanks for listening. {text}."))),
        _ => (format!("{text} ({i})"), None, None),
    };
    MediaIngested {
        media_id: format!("emb-{i:04}"),
        kind: if i.is_multiple_of(2) { MediaKind::Podcast } else { MediaKind::Article },
        title,
        description,
        transcript,
        language: Some("en".into()),
        source: "embeddings-test".into(),
        ingested_at: now_millis(),
        attributes: HashMap::from([("n".into(), i.to_string())]),
        candidate_labels: (i % 10 == 3).then(|| vec!["money".into(), "games".into(), "movies".into()]),
    }
}

/// The new taxonomy: five labels, none of them in the shipped one.
const NEW_LABELS: &str = "[{name: finance, descriptions: [money, markets and companies]}, {name: football, descriptions: [a football match]}, \
                          {name: government, descriptions: [politics and elections]}, {name: gadgets, descriptions: [phones and computers]}, \
                          {name: cinema, descriptions: [films and actors]}]";

async fn stored(session: &scylla::client::session::Session, ks: &str) -> i64 {
    streamoasis_sink::count_rows(session, &format!("SELECT COUNT(*) FROM {ks}.media_embeddings")).await.unwrap_or(-1)
}

/// Rows of `media_tags` of taxonomy version `v`.
async fn of_version(session: &scylla::client::session::Session, ks: &str, v: &str) -> u64 {
    let counts = streamoasis_sink::read::count_by_version(session, ks).await.unwrap();
    counts.iter().filter(|((_, t), _)| t.as_deref() == Some(v)).map(|(_, c)| *c).sum()
}

/// A test environment whose topology file stores embeddings (its YAML returned for later
/// edits), the database read at consistency ONE.
async fn store_env() -> (common::Env, serde_yaml::Value) {
    let mut env = common::env(2, "at_least_once").await;
    let mut y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&env.path).unwrap()).unwrap();
    y["tagging"]["store_embeddings"] = true.into();
    std::fs::write(&env.path, serde_yaml::to_string(&y).unwrap()).unwrap();
    env.topo = Topology::load(&env.path).unwrap();
    if let serde_yaml::Value::Mapping(m) = &mut env.topo.file.scylla {
        m.insert("consistency".into(), "ONE".into());
    }
    (env, y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_are_stored_and_retag_from_them_gives_the_models_tags_under_a_new_taxonomy() {
    streamoasis_testkit::require_stack!();
    let (env, mut y) = store_env().await;
    let n = 120;
    let items: Vec<MediaIngested> = (0..n).map(item).collect();

    // 1. Tagged with the shipped taxonomy: every event carries the embedding, the sink stores it.
    let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&env.topo).unwrap()).await.unwrap());
    let (stop_t, tagger_task) = env.start_tagger(tagger.clone());
    let (stop_s, sink_task) = env.start_sink().await;
    let p = streamoasis_pipeline::kafka::producer(&env.kafka, &Default::default()).unwrap();
    for it in &items {
        env.send(&p, it).await;
    }
    let out = env.consumer(env.output(), false);
    let first = env.read_tagged(&out, n, Duration::from_secs(240), Duration::from_secs(3)).await;
    assert_eq!(first.len(), n, "one tagged event per item");
    let by_id: HashMap<&str, &MediaIngested> = items.iter().map(|i| (i.media_id.as_str(), i)).collect();
    let mut lead_read = 0;
    for e in &first {
        let it = by_id[e.media_id.as_str()];
        let emb = e.embedding.as_ref().unwrap_or_else(|| panic!("{}: no embedding with store_embeddings on", e.media_id));
        assert_eq!(emb.text_hash, text_hash(&request_of(it)), "{}", e.media_id);
        assert_eq!(emb.has_body, it.transcript.is_some(), "{}", e.media_id);
        assert_eq!(emb.candidate_labels, it.candidate_labels, "{}", e.media_id);
        assert_eq!(emb.embedding_version, tagger.embedding_version());
        assert_eq!(emb.dim, 384);
        let rows = ItemEmbedding::from_event(emb).unwrap();
        assert!(rows.windows.is_some() || rows.lead.is_some(), "{}: rows of what was read", e.media_id);
        lead_read += usize::from(rows.lead.is_some());
    }
    // Adaptive compute read the lead first exactly for the described items with a transcript.
    assert_eq!(lead_read, items.iter().filter(|i| i.description.is_some() && i.transcript.is_some()).count());

    let ks = streamoasis_sink::SinkConfig::from_topology(&env.topo).unwrap().keyspace;
    let session = common::cql().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&session, &ks).await < n as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(stored(&session, &ks).await, n as i64, "a media_embeddings row per item");
    // Read back: the stored rows are the events' embeddings and carried fields.
    let rows: Vec<MediaTagged> = streamoasis_sink::read::stored_embeddings(&session, &ks).await.unwrap().map(|r| r.unwrap()).collect().await;
    assert_eq!(rows.len(), n);
    let events: HashMap<&str, &MediaTagged> = first.iter().map(|e| (e.media_id.as_str(), e)).collect();
    for r in &rows {
        let e = events[r.media_id.as_str()];
        assert_eq!(r.embedding, e.embedding, "{}: stored embedding", r.media_id);
        assert_eq!((r.kind, &r.title, &r.attributes, r.ingested_at, &r.lineage), (e.kind, &e.title, &e.attributes, e.ingested_at, &e.lineage), "{}", r.media_id);
    }
    // The stream tagger stops: nothing but the retag below writes to the tags topic now.
    stop_t.cancel();
    let t = tagger_task.await.unwrap().unwrap();
    assert_eq!(t.processed, n as u64);

    // 2. A new taxonomy in the topology file.
    y["tagging"]["labels"] = serde_yaml::from_str(NEW_LABELS).unwrap();
    std::fs::write(&env.path, serde_yaml::to_string(&y).unwrap()).unwrap();
    let new = Tagger::load(TaggerConfig::from_topology(&Topology::load(&env.path).unwrap()).unwrap()).await.unwrap();
    assert_ne!(new.taxonomy_version(), tagger.taxonomy_version());
    // Which items the stored rows can answer under the new taxonomy, and the model's tags for all.
    let mut answerable = HashMap::new();
    for r in &rows {
        let emb = ItemEmbedding::from_event(r.embedding.as_ref().unwrap()).unwrap();
        let cand = r.embedding.as_ref().unwrap().candidate_labels.as_deref();
        if let Some(x) = new.tag_from_embedding(r.kind, cand, &emb).await.unwrap() {
            answerable.insert(r.media_id.clone(), x);
        }
    }
    // Rows holding the whole text's windows answer under any taxonomy; only a lead read alone
    // may not (the new labels' margin on the lead may be too narrow to skip the body now).
    let with_windows = rows.iter().filter(|r| r.embedding.as_ref().unwrap().windows.is_some()).count();
    assert!(answerable.len() >= with_windows, "{} answerable < {with_windows} rows with windows", answerable.len());

    // 3. `streamoasis retag --from-embeddings`.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_streamoasis"))
        .args(["retag", "--from-embeddings", "--quiet"])
        .env("STREAMOASIS_TOPOLOGY", &env.path)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "retag --from-embeddings: {err}");
    let need = n - answerable.len();
    assert!(err.contains(&format!("read {n} stored items, produced {} to {}", answerable.len(), env.output())), "{err}");
    assert!(err.contains(&format!("; {need} need the model")), "{err}");

    let retagged = env.read_tagged(&out, answerable.len(), Duration::from_secs(60), Duration::from_secs(3)).await;
    assert_eq!(retagged.len(), answerable.len(), "one event per answerable item, nothing more");
    let mut worst = 0f32;
    for e in &retagged {
        let it = by_id[e.media_id.as_str()];
        let model = new.tag(&request_of(it)).await.unwrap();
        let labels = |tags: &[streamoasis_pipeline::events::Tag]| tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>();
        assert_eq!(labels(&e.tags), labels(&model.tags), "{}: the model's tags under the new taxonomy", e.media_id);
        for (g, w) in e.tags.iter().zip(&model.tags) {
            worst = worst.max((g.score - w.score).abs());
        }
        assert_eq!(e.taxonomy_version.as_deref(), Some(model.taxonomy_version.as_str()), "{}", e.media_id);
        assert!(e.embedding.is_none(), "a retag from embeddings does not re-send them");
        assert_eq!((&e.lineage, &e.title, e.ingested_at), (&events[e.media_id.as_str()].lineage, &it.title.clone().into(), it.ingested_at));
    }
    // The stored rows came from batches in the stream, the model's answer here from one item
    // alone: only the accumulation order differs.
    assert!(worst <= 1e-5, "largest score difference to the model {worst}");

    // 4. The sink updated the rows: each retagged item's row carries the new taxonomy version,
    // and its stored embedding is untouched.
    let version = new.taxonomy_version();
    let deadline = Instant::now() + Duration::from_secs(60);
    let plain = answerable.values().filter(|r| r.taxonomy_version == version).count() as u64;
    while of_version(&session, &ks, &version).await < plain && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(of_version(&session, &ks, &version).await, plain, "rows now of the new taxonomy");
    assert_eq!(stored(&session, &ks).await, n as i64);
    let again: Vec<MediaTagged> = streamoasis_sink::read::stored_embeddings(&session, &ks).await.unwrap().map(|r| r.unwrap()).collect().await;
    for r in &again {
        assert_eq!(r.embedding, events[r.media_id.as_str()].embedding, "{}: embedding kept", r.media_id);
    }
    stop_s.cancel();
    sink_task.await.unwrap().unwrap();
    eprintln!("retag from embeddings: {} of {n} answered from stored rows, {need} need the model; largest score difference {worst:e}", answerable.len());
}

/// Re-ingest without inference: with the sink's table as the tagger's store, items ingested
/// again with unchanged text are scored from their stored rows (the same tags, the same rows
/// carried on, the new carried fields stored), items with changed text go through the model and
/// their rows are replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_ingested_again_unchanged_are_scored_from_the_stored_rows() {
    streamoasis_testkit::require_stack!();
    let (env, _) = store_env().await;
    let n = 60;
    let items: Vec<MediaIngested> = (0..n).map(item).collect();
    let ks = streamoasis_sink::SinkConfig::from_topology(&env.topo).unwrap().keyspace;
    let (stop_s, sink_task) = env.start_sink().await;
    let session = common::cql().await;
    // A generous lookup timeout: a test run's freshly started database can be slow, and a
    // lookup that times out (counted `unavailable`, the model reads the item) would blur the
    // counts asserted here.
    let mut tc = TaggerConfig::from_topology(&env.topo).unwrap();
    tc.reuse_timeout = Duration::from_secs(20);
    let store = streamoasis_sink::read::StoredEmbeddings::new(Arc::new(common::cql().await), &ks, tc.reuse_timeout).await.unwrap();
    let tagger = Arc::new(Tagger::load(tc).await.unwrap());
    let processor = Arc::new(streamoasis_tagger::TaggerProcessor::new(tagger.clone()).with_store(Arc::new(store)));
    let counts = processor.reuse_counts();
    let stop_t = streamoasis_pipeline::CancellationToken::new();
    let runner = streamoasis_pipeline::kafka::RunnerConfig::new(env.kafka.clone(), env.topo.file.processors.tagger.clone(), Default::default());
    let tagger_task = tokio::spawn(streamoasis_pipeline::kafka::run(runner, env.codec.clone(), processor.clone(), stop_t.clone()));
    let p = streamoasis_pipeline::kafka::producer(&env.kafka, &Default::default()).unwrap();
    let out = env.consumer(env.output(), false);

    // 1. The first pass: nothing stored, the model reads every item; the sink stores the rows.
    for it in &items {
        env.send(&p, it).await;
    }
    let first: HashMap<String, MediaTagged> =
        env.read_tagged(&out, n, Duration::from_secs(240), Duration::from_secs(2)).await.into_iter().map(|e| (e.media_id.clone(), e)).collect();
    assert_eq!(first.len(), n);
    assert_eq!(counts.snapshot(), (0, n as u64, 0, 0, 0), "(reused, missing, changed, needs_model, unavailable)");
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored(&session, &ks).await < n as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(stored(&session, &ks).await, n as i64);

    // 2. Every item again, with new attributes; every fifth with a new title (changed text).
    let second: Vec<MediaIngested> = items
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let mut it = it.clone();
            it.attributes.insert("pass".into(), "2".into());
            it.ingested_at = now_millis();
            if i % 5 == 0 {
                it.title = format!("{} (updated)", it.title);
            }
            it
        })
        .collect();
    let changed = second.iter().filter(|it| it.title.ends_with("(updated)")).count();
    for it in &second {
        env.send(&p, it).await;
    }
    let again = env.read_tagged(&out, n, Duration::from_secs(240), Duration::from_secs(2)).await;
    assert_eq!(again.len(), n, "one event per item ingested again");
    assert_eq!(counts.snapshot(), ((n - changed) as u64, n as u64, changed as u64, 0, 0), "(reused, missing, changed, needs_model, unavailable)");
    let by_id: HashMap<&str, &MediaIngested> = second.iter().map(|i| (i.media_id.as_str(), i)).collect();
    for e in &again {
        let it = by_id[e.media_id.as_str()];
        let f = &first[&e.media_id];
        let emb = e.embedding.as_ref().unwrap();
        assert_eq!(emb.text_hash, text_hash(&request_of(it)), "{}", e.media_id);
        if it.title.ends_with("(updated)") {
            assert_ne!(emb.text_hash, f.embedding.as_ref().unwrap().text_hash, "{}", e.media_id);
        } else {
            let tags = |x: &MediaTagged| x.tags.iter().map(|t| (t.label.clone(), t.score)).collect::<Vec<_>>();
            assert_eq!(tags(e), tags(f), "{}: the stored rows give the first pass's tags", e.media_id);
            assert_eq!(e.embedding, f.embedding, "{}: the stored rows carried on", e.media_id);
        }
        assert_eq!(e.attributes.get("pass").map(String::as_str), Some("2"));
    }

    // 3. Read back: every row has the second pass's carried fields and its text's hash.
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let rows: Vec<MediaTagged> = streamoasis_sink::read::stored_embeddings(&session, &ks).await.unwrap().map(|r| r.unwrap()).collect().await;
        let done = rows.iter().filter(|r| r.attributes.get("pass").map(String::as_str) == Some("2")).count();
        if done == n || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(rows.len(), n);
    for r in &rows {
        let it = by_id[r.media_id.as_str()];
        assert_eq!(r.attributes.get("pass").map(String::as_str), Some("2"), "{}", r.media_id);
        assert_eq!(r.embedding.as_ref().unwrap().text_hash, text_hash(&request_of(it)), "{}", r.media_id);
    }
    stop_t.cancel();
    let t = tagger_task.await.unwrap().unwrap();
    assert_eq!(t.processed, 2 * n as u64);
    stop_s.cancel();
    sink_task.await.unwrap().unwrap();
    eprintln!("re-ingest: {} of {n} items scored from stored rows, {changed} changed went through the model", n - changed);
}

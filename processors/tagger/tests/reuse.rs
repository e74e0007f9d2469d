//! Re-ingest without inference on the exported model: the tagger processor looks an item up in a
//! store of embeddings (here an in-memory one; the sink's table in processors/cli/tests/embeddings.rs)
//! and scores it from the stored rows when its text, model and windowing are unchanged; every
//! other outcome (nothing stored, other text, another version, a row that cannot answer, a
//! failing or hanging store) runs the model and is counted as such.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streamoasis_pipeline::events::{EmbeddingStore, ItemEmbedding, MediaIngested, MediaKind, MediaTagged, StoredEmbedding};
use streamoasis_pipeline::processor::{Processor, RecordMeta};
use streamoasis_tagger::{Tagger, TaggerConfig, TaggerProcessor};

fn parse(yaml: &str) -> TaggerConfig {
    let dir = streamoasis_testkit::models().join("all-MiniLM-L6-v2");
    let text = format!("model: {{path: {}, threads: 2}}\n{yaml}", dir.display());
    let cfg: TaggerConfig = serde_yaml::from_str(&text).unwrap();
    cfg.validate("test").unwrap();
    cfg
}

const NEWS: &str = "store_embeddings: true\ntext: {adaptive_margin: 0.05}\nlabels: [{name: business}, {name: sport}, {name: politics}, {name: technology}]";

/// A store in memory, or one that fails or never answers.
#[derive(Default)]
struct Store {
    rows: Mutex<HashMap<String, ItemEmbedding>>,
    mode: Mode,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum Mode {
    #[default]
    Answer,
    Fail,
    Hang,
}

impl EmbeddingStore for Store {
    fn stored<'a>(&'a self, media_id: &'a str) -> StoredEmbedding<'a> {
        Box::pin(async move {
            match self.mode {
                Mode::Answer => Ok(self.rows.lock().unwrap().get(media_id).cloned()),
                Mode::Fail => Err("connection refused".into()),
                Mode::Hang => std::future::pending().await,
            }
        })
    }
}

fn item(id: &str, title: &str, description: Option<&str>, transcript: Option<&str>) -> MediaIngested {
    MediaIngested {
        media_id: id.into(),
        kind: MediaKind::Article,
        title: title.into(),
        description: description.map(Into::into),
        transcript: transcript.map(Into::into),
        language: Some("en".into()),
        source: "reuse-test".into(),
        ingested_at: 1,
        attributes: HashMap::new(),
        candidate_labels: None,
    }
}

fn meta() -> RecordMeta {
    RecordMeta { topic: "in".into(), partition: 0, offset: 0, schema_id: 1, timestamp_ms: None }
}

async fn one(p: &TaggerProcessor, it: &MediaIngested) -> MediaTagged {
    let mut out = p.process(it.clone(), meta()).await.unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn labels(e: &MediaTagged) -> Vec<(String, f32)> {
    e.tags.iter().map(|t| (t.label.clone(), t.score)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_items_are_scored_from_their_stored_rows_and_everything_else_runs_the_model() {
    let tagger = Arc::new(Tagger::load(parse(NEWS)).await.unwrap());
    let store = Arc::new(Store::default());
    let p = TaggerProcessor::new(tagger.clone()).with_store(store.clone());
    let counts = p.reuse_counts();
    let items = [
        item("a", "Shares fell sharply as the bank reported a quarterly loss", None, None),
        item("b", "Episode 12", None, Some("Welcome back. Today: the striker scored twice and the team won the cup final.")),
        item("c", "Election results", Some("The prime minister lost her majority in parliament."), Some("Polls closed at ten; the count went on overnight.")),
    ];

    // Nothing stored: every item through the model; its rows go to the store as the sink keeps them.
    let mut first = HashMap::new();
    for it in &items {
        let e = one(&p, it).await;
        store.rows.lock().unwrap().insert(e.media_id.clone(), e.embedding.clone().expect("store_embeddings on"));
        first.insert(e.media_id.clone(), e);
    }
    assert_eq!(counts.snapshot(), (0, 3, 0, 0, 0));

    // Ingested again unchanged (other attributes): scored from the rows, same tags and scores,
    // the same rows carried on.
    for it in &items {
        let mut again = it.clone();
        again.attributes.insert("pass".into(), "2".into());
        let e = one(&p, &again).await;
        let f = &first[&it.media_id];
        assert_eq!(labels(&e), labels(f), "{}", it.media_id);
        assert_eq!(e.embedding, f.embedding, "{}", it.media_id);
        assert_eq!(e.taxonomy_version, f.taxonomy_version);
        assert_eq!(e.attributes["pass"], "2");
    }
    assert_eq!(counts.snapshot(), (3, 3, 0, 0, 0));

    // The same text in a language the tagger does not read: not looked up, refused as the model
    // path refuses it.
    let mut french = items[0].clone();
    french.language = Some("fr".into());
    let e = one(&p, &french).await;
    assert_eq!((e.tags.len(), e.no_tags_reason.as_deref()), (0, Some("unsupported_language")));
    assert_eq!(counts.snapshot(), (3, 3, 0, 0, 0));

    // Changed text: the model reads it, and the new rows carry the new text's hash.
    let changed = item("a", "Shares fell sharply as the bank reported a quarterly loss, its first in a decade", None, None);
    let e = one(&p, &changed).await;
    assert_ne!(e.embedding.as_ref().unwrap().text_hash, first["a"].embedding.as_ref().unwrap().text_hash);
    assert_eq!(counts.snapshot(), (3, 3, 1, 0, 0));

    // Rows of another model or windowing are not reused.
    let mut other = first["b"].embedding.clone().unwrap();
    other.embedding_version = "ev-0000000000000000".into();
    store.rows.lock().unwrap().insert("b".into(), other);
    let e = one(&p, &items[1]).await;
    assert_eq!(labels(&e), labels(&first["b"]));
    assert_eq!(counts.snapshot(), (3, 3, 2, 0, 0));

    // A row without the part the current settings need (here: no rows at all) cannot answer.
    let mut empty = first["c"].embedding.clone().unwrap();
    (empty.lead, empty.windows) = (None, None);
    store.rows.lock().unwrap().insert("c".into(), empty);
    let e = one(&p, &items[2]).await;
    assert_eq!(labels(&e), labels(&first["c"]));
    assert_eq!(counts.snapshot(), (3, 3, 2, 1, 0));

    // A failing store and a store that never answers: the model, after a bounded wait.
    for mode in [Mode::Fail, Mode::Hang] {
        let bad = Arc::new(Store { mode, ..Store::default() });
        let p = TaggerProcessor::new(tagger.clone()).with_store(bad);
        let started = Instant::now();
        let e = one(&p, &items[0]).await;
        assert_eq!(labels(&e), labels(&first["a"]));
        assert!(started.elapsed() < Duration::from_secs(5), "a hanging store is given up on");
        assert_eq!(p.reuse_counts().snapshot(), (0, 0, 0, 0, 1));
    }

    // reuse_embeddings: false (or store_embeddings off): the store is never asked.
    let off = Arc::new(Tagger::load(parse(&format!("reuse_embeddings: false\n{NEWS}"))).await.unwrap());
    let hang = Arc::new(Store { mode: Mode::Hang, ..Store::default() });
    let p = TaggerProcessor::new(off).with_store(hang);
    one(&p, &items[0]).await;
    assert_eq!(p.reuse_counts().snapshot(), (0, 0, 0, 0, 0));
}

//! The exported TorchScript models, run through the real tokenizer, backend and batcher, agree
//! with the Python references written by `scripts/python/export_model.py`.

use std::time::Duration;

use serde::Deserialize;
use streamoasis_tagger::batcher::{Batcher, BatcherConfig};
use streamoasis_tagger::model::{read_manifest, TextEncoder, TorchBackend};
use streamoasis_tagger::tagger::nli_pipeline_scores;
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

use streamoasis_testkit::models;

fn batcher_cfg() -> BatcherConfig {
    BatcherConfig { max_batch_size: 8, max_batch_tokens: 4096, max_wait: Duration::from_millis(2), queue_capacity: 64 }
}

#[derive(Deserialize)]
struct EmbeddingRef {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    d / (na * nb)
}

fn config(yaml: &str) -> TaggerConfig {
    let text = format!("model: {{path: {}, threads: 2}}\n{yaml}", models().join("all-MiniLM-L6-v2").display());
    let cfg: TaggerConfig = serde_yaml::from_str(&text).unwrap();
    cfg.validate("test").unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_the_python_reference() {
    let dir = models().join("all-MiniLM-L6-v2");
    let r: EmbeddingRef = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("models/ exported (scripts/setup)")).unwrap();
    assert!(r.texts.len() >= 20, "reference has {} texts", r.texts.len());
    let tagger = Tagger::load(config("labels: [{name: a}]")).await.unwrap();
    // All texts at once: they are batched together, padded to the longest, so this also checks
    // that padding does not change any embedding.
    let got = tagger.embed_texts(&r.texts).await.unwrap();
    for ((text, want), got) in r.texts.iter().zip(&r.embeddings).zip(&got) {
        let c = cosine(want, got);
        assert!(c >= 0.9999, "cosine {c} for {text:?}");
    }
}

#[derive(Deserialize)]
struct NliRef {
    cases: Vec<NliCase>,
}

#[derive(Deserialize)]
struct NliCase {
    text: String,
    labels: Vec<String>,
    hypothesis_template: String,
    multi_label: bool,
    scores: std::collections::HashMap<String, f32>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nli_scores_match_the_transformers_pipeline() {
    let dir = models().join("nli-tiny");
    let r: NliRef = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    assert!(r.cases.len() >= 8);
    let m = read_manifest(&dir).unwrap();
    let enc = TextEncoder::load(&dir, m.max_seq_len).unwrap();
    let batcher = Batcher::spawn(TorchBackend::load(&dir, tch::Device::Cpu, true, 2).unwrap(), batcher_cfg());
    let ent = m.entailment_index.unwrap();
    for case in &r.cases {
        let premise = enc.content_ids(&case.text, 100_000);
        let seqs = case.labels.iter().map(|l| enc.pair(&premise, &case.hypothesis_template.replace("{}", l))).collect();
        let logits = batcher.infer(seqs).await.unwrap();
        let scores = nli_pipeline_scores(&logits, ent, 0, case.multi_label);
        for (label, got) in case.labels.iter().zip(scores) {
            let want = case.scores[label];
            assert!((got - want).abs() <= 1e-4, "{label}: got {got}, want {want} (multi_label {}, text {:?})", case.multi_label, case.text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nli_strategy_runs_through_the_tagger() {
    let nli = models().join("nli-tiny");
    let cfg = config(&format!("strategy: nli\nnli: {{model: {}, multi_label: true}}\ntop_k: 5\nlabels: [{{name: sport}}, {{name: politics}}]", nli.display()));
    let tagger = Tagger::load(cfg).await.unwrap();
    let r = tagger.tag(&TagRequest { title: "The match ended in a draw".into(), ..Default::default() }).await.unwrap();
    assert_eq!(r.tags.len(), 2);
    assert!(r.tags[0].score >= r.tags[1].score);
    assert!(r.tags.iter().all(|t| (0.0..=1.0).contains(&t.score)));
}

const NEWS: &str = "labels: [{name: business, description: companies markets economy}, {name: sport, description: football tennis matches}, {name: tech, description: computers software internet}]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_ranked_and_sensible() {
    let tagger = Tagger::load(config(NEWS)).await.unwrap();
    let r = tagger.tag(&TagRequest { title: "Striker scores twice as United win the cup final".into(), ..Default::default() }).await.unwrap();
    assert_eq!(r.tags[0].label, "sport", "{r:?}");
    assert!(r.tags.windows(2).all(|w| w[0].score >= w[1].score));
    let sum: f32 = r.tags.iter().map(|t| t.score).sum();
    assert!((sum - 1.0).abs() < 1e-3, "softmax over 3 labels with top_k 3 sums to 1: {sum}");
    let r = tagger.tag(&TagRequest { title: "Shares fall as the central bank raises interest rates".into(), ..Default::default() }).await.unwrap();
    assert_eq!(r.tags[0].label, "business", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_handled() {
    let tagger = Tagger::load(config(NEWS)).await.unwrap();
    // Empty and whitespace-only text: no tags, a reason, no error.
    for t in ["", "   \n\t "] {
        let r = tagger.tag(&TagRequest { title: t.into(), ..Default::default() }).await.unwrap();
        assert!(r.tags.is_empty());
        assert_eq!(r.no_tags_reason.as_deref(), Some("empty_text"));
    }
    // Control characters are tolerated.
    let r = tagger.tag(&TagRequest { title: "goal\u{0}\u{7}\u{1b}[31m in the final\u{202e}".into(), ..Default::default() }).await.unwrap();
    assert!(!r.tags.is_empty());
    // A 10 MB transcript: windowed under the cap, bounded time.
    let huge = "The quarterly results beat expectations and the shares rose. ".repeat(10 * 1024 * 1024 / 62);
    let started = std::time::Instant::now();
    let r = tagger.tag(&TagRequest { title: "Results".into(), transcript: Some(huge), ..Default::default() }).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "10 MB took {:?}", started.elapsed());
    assert_eq!(r.tags[0].label, "business");
    // Per-item labels: empty or too many are rejected with a reason; a valid set is used.
    let err = tagger.tag(&TagRequest { title: "x".into(), candidate_labels: Some(vec![]), ..Default::default() }).await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let many: Vec<String> = (0..100).map(|i| format!("l{i}")).collect();
    let err = tagger.tag(&TagRequest { title: "x".into(), candidate_labels: Some(many), ..Default::default() }).await.unwrap_err();
    assert!(err.to_string().contains("max_labels"), "{err}");
    let r = tagger
        .tag(&TagRequest { title: "A rocket launch to the moon".into(), candidate_labels: Some(vec!["cooking".into(), "space".into(), "space".into()]), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(r.tags.len(), 2, "duplicates removed: {r:?}");
    assert_eq!(r.tags[0].label, "space");
}

#[test]
fn config_errors_name_the_key() {
    let bad = |yaml: &str| {
        let text = format!("model: {{path: /x}}\n{yaml}");
        match serde_yaml::from_str::<TaggerConfig>(&text) {
            Err(e) => e.to_string(),
            Ok(c) => c.validate("topology.yaml").unwrap_err().to_string(),
        }
    };
    assert!(bad("labels: []").contains("tagging.labels"));
    assert!(bad("max_labels: 1\nlabels: [{name: a}, {name: b}]").contains("max_labels"));
    assert!(bad("labels: [{name: a}, {name: a}]").contains("twice"));
    assert!(bad("strategy: nli\nlabels: [{name: a}]").contains("tagging.nli"));
    assert!(bad("labels: [{name: a}]\nbatching: {max_batch_size: 64, queue_capacity: 8}").contains("queue_capacity"));
    assert!(bad("labels: [{name: a}]\nbatchin: {}").contains("batchin"));
}

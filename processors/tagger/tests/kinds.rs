//! int8 precision, per-kind templates and calibrated multi-label scores, language flags and
//! windows over the whole text, on the exported model (scripts/setup writes models/).

use std::path::PathBuf;

use streamoasis_pipeline::events::MediaKind;
use streamoasis_tagger::model::TextEncoder;
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

fn model_dir() -> PathBuf {
    streamoasis_testkit::models().join("all-MiniLM-L6-v2")
}

fn parse(yaml: &str, precision: &str) -> Result<TaggerConfig, String> {
    let text = format!("model: {{path: {}, threads: 2, precision: {precision}}}\n{yaml}", model_dir().display());
    let cfg: TaggerConfig = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    cfg.validate("test").map_err(|e| e.to_string())?;
    Ok(cfg)
}

const NEWS: &str = "labels: [{name: business}, {name: sport}, {name: politics}, {name: technology}]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn int8_agrees_with_fp32() {
    let fp32 = Tagger::load(parse(NEWS, "fp32").unwrap()).await.unwrap();
    let int8 = Tagger::load(parse(NEWS, "int8").unwrap()).await.unwrap();
    let texts: Vec<String> = [
        "Striker scores twice as United win the cup final",
        "Shares fall as the central bank raises interest rates",
        "The prime minister faces a vote in parliament over the new tax plan",
        "A new smartphone with a faster chip and a better camera goes on sale",
    ]
    .map(String::from)
    .to_vec();
    let (a, b) = (fp32.embed_texts(&texts).await.unwrap(), int8.embed_texts(&texts).await.unwrap());
    for ((x, y), t) in a.iter().zip(&b).zip(&texts) {
        let c: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!(c > 0.97, "int8 vs fp32 cosine {c} for {t:?}");
    }
    for (t, want) in texts.iter().zip(["sport", "business", "politics", "technology"]) {
        let r = int8.tag(&TagRequest { title: t.clone(), ..Default::default() }).await.unwrap();
        assert_eq!(r.tags[0].label, want, "{t:?}: {:?}", r.tags);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn movies_get_film_templates_and_calibrated_scores_for_every_candidate() {
    let yaml = r#"
embedding:
  templates: ["A news story about {label}."]
  kinds:
    MOVIE:
      templates: ["A film about {label}.", "A {label} film."]
      multi_label: true
      calibration: {slope: 15.0, bias: -2.0, labels: {drama: [15.0, 0.0]}}
      min_score: 0.3
top_k: 0
labels: [{name: horror}, {name: comedy}, {name: western}, {name: drama}]
"#;
    let tagger = Tagger::load(parse(yaml, "fp32").unwrap()).await.unwrap();
    let film = TagRequest {
        title: "The Haunting of Blackwood Manor".into(),
        description: Some("A family moves into an old house where a ghost and a demon terrorise them at night.".into()),
        kind: MediaKind::Movie,
        ..Default::default()
    };
    let r = tagger.tag(&film).await.unwrap();
    assert_eq!(r.scores.len(), 4, "every candidate is scored: {:?}", r.scores);
    assert_eq!(r.scores[0].label, "horror", "{:?}", r.scores);
    assert!(r.scores.iter().all(|t| t.score > 0.0 && t.score < 1.0));
    assert!(r.scores.windows(2).all(|w| w[0].score >= w[1].score));
    // top_k 0: every tag at or above the kind's min_score, nothing below it.
    assert!(r.tags.iter().all(|t| t.score >= 0.3), "{:?}", r.tags);
    assert_eq!(r.tags.len(), r.scores.iter().filter(|t| t.score >= 0.3).count());
    // Single-label softmax for other kinds: the scores sum to 1.
    let article = TagRequest { kind: MediaKind::Article, ..film.clone() };
    let a = tagger.tag(&article).await.unwrap();
    assert!((a.scores.iter().map(|t| t.score).sum::<f32>() - 1.0).abs() < 1e-4, "{:?}", a.scores);
    // Candidate labels of a movie go through the film templates and the per-label pairs:
    // drama's own bias (0) lifts it above a label with the default bias (-2) at equal cosine.
    let cands = TagRequest { candidate_labels: Some(vec!["drama".into(), "horror".into(), "sport".into()]), ..film };
    let c = tagger.tag(&cands).await.unwrap();
    assert_eq!(c.scores.len(), 3);
    assert_eq!(c.scores[0].label, "horror", "{:?}", c.scores);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_english_items_are_flagged_not_tagged() {
    let tagger = Tagger::load(parse(NEWS, "fp32").unwrap()).await.unwrap();
    let ja = TagRequest { title: "東京で新しいスマートフォンが発売された".into(), ..Default::default() };
    let r = tagger.tag(&ja).await.unwrap();
    assert!(r.tags.is_empty());
    assert_eq!(r.no_tags_reason.as_deref(), Some("unsupported_language"));
    let fr = TagRequest { title: "Le gouvernement présente son budget".into(), language: Some("fr".into()), ..Default::default() };
    assert_eq!(tagger.tag(&fr).await.unwrap().no_tags_reason.as_deref(), Some("unsupported_language"));
    let en = TagRequest { title: "Striker scores twice as United win the cup final".into(), language: Some("en-GB".into()), ..Default::default() };
    let r = tagger.tag(&en).await.unwrap();
    assert_eq!(r.tags[0].label, "sport");
    assert_eq!(r.no_tags_reason, None);
    // languages: [] tags everything.
    let all = Tagger::load(parse(&format!("languages: []\n{NEWS}"), "fp32").unwrap()).await.unwrap();
    assert_eq!(all.tag(&fr).await.unwrap().tags.len(), 3);
}

#[test]
fn spread_windows_reach_the_end_of_long_text() {
    let enc = TextEncoder::load(&model_dir(), 34).unwrap();
    // 40 distinct words, one token each: 32-token bodies, stride 0.
    let words: Vec<String> = (0..400).map(|i| ["alpha", "bravo", "charlie", "delta", "echo"][i % 5].to_string() + " ").collect();
    let text: String = words.concat() + "zebra";
    let head = enc.windows(&text, 3, 0);
    let spread = enc.windows_spread(&text, 3, 0);
    assert_eq!((head.len(), spread.len()), (3, 3));
    let last = enc.content_ids("zebra", 100);
    let tail = &spread[2].ids[spread[2].ids.len() - 1 - last.len()..spread[2].ids.len() - 1];
    assert_eq!(tail, last.as_slice(), "the last spread window ends with the text's last token");
    assert!(head.iter().all(|w| !w.ids.ends_with(&[last[0], 102])));
    assert_eq!(spread[0].ids, head[0].ids, "the first window is the text's start either way");
    // Short text: one window, identical.
    assert_eq!(enc.windows_spread("short text", 3, 0)[0].ids, enc.windows("short text", 3, 0)[0].ids);
}

#[test]
fn head_windows_count_stride_and_cap() {
    // max_tokens 34: 32 content tokens per window between [CLS] and [SEP].
    let enc = TextEncoder::load(&model_dir(), 34).unwrap();
    let text: String = (0..100).map(|i| ["alpha ", "bravo ", "charlie ", "delta ", "echo "][i % 5]).collect();
    let ids = enc.content_ids(&text, 10_000);
    assert_eq!(ids.len(), 100, "one token per word");
    let body = |w: &streamoasis_tagger::batcher::Seq| w.ids[1..w.ids.len() - 1].to_vec();
    for (stride, max) in [(0usize, 10usize), (8, 10), (16, 10), (8, 2), (0, 1)] {
        let step = 32 - stride;
        let uncapped = (100 - 32usize).div_ceil(step) + 1;
        let w = enc.windows(&text, max, stride);
        assert_eq!(w.len(), uncapped.min(max), "stride {stride}, cap {max}");
        for (k, win) in w.iter().enumerate() {
            assert!(win.ids.len() <= 34, "a window holds at most max_tokens");
            assert_eq!((win.ids[0], *win.ids.last().unwrap()), (101, 102), "[CLS] ... [SEP]");
            assert_eq!(body(win), ids[k * step..(k * step + 32).min(100)].to_vec(), "window {k} starts at k * (body - stride)");
        }
        if w.len() > 1 {
            // Consecutive windows share exactly `stride` tokens.
            assert_eq!(body(&w[0])[32 - stride..], body(&w[1])[..stride]);
        }
        if uncapped <= max {
            assert_eq!(body(w.last().unwrap()).last(), ids.last(), "uncapped windows reach the end");
        }
    }
    assert!(enc.windows("", 4, 0).is_empty() && enc.windows("   ", 4, 0).is_empty(), "no text, no windows");
    assert_eq!(enc.windows("short", 4, 0).len(), 1);
}

#[test]
fn config_errors_name_the_key() {
    let e = parse("embedding: {kinds: {FILM: {templates: ['A {label} film.']}}}\nlabels: [{name: a}]", "fp32").unwrap_err();
    assert!(e.contains("FILM") && e.contains("MOVIE"), "{e}");
    let e = parse("embedding: {kinds: {MOVIE: {templates: ['no placeholder']}}}\nlabels: [{name: a}]", "fp32").unwrap_err();
    assert!(e.contains("tagging.embedding.kinds.MOVIE.templates"), "{e}");
    let e = parse("labels: [{name: a}]", "fp8").unwrap_err();
    assert!(e.contains("fp8") && e.contains("int8_static") && e.contains("bf16"), "{e}");
    let mut gpu = parse(NEWS, "int8").unwrap();
    gpu.model.device = "cuda:0".into();
    let e = gpu.validate("test").unwrap_err().to_string();
    assert!(e.contains("tagging.model.precision") && e.contains("fp32"), "{e}");
    let e = parse("text: {adaptive_margin: 2}\nlabels: [{name: a}]", "fp32").unwrap_err();
    assert!(e.contains("tagging.text.adaptive_margin"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nli_strategy_loads_no_embedding_model() {
    let nli = model_dir().parent().unwrap().join("nli-tiny");
    let yaml = format!("model: {{path: /nonexistent/embedding-model}}\nstrategy: nli\nnli: {{model: {}}}\nlabels: [{{name: sport}}, {{name: politics}}]", nli.display());
    let cfg: TaggerConfig = serde_yaml::from_str(&yaml).unwrap();
    cfg.validate("test").unwrap();
    let tagger = Tagger::load(cfg).await.expect("loads without the embedding model's folder");
    assert_eq!(tagger.strategy(), streamoasis_pipeline::events::Strategy::Nli);
    assert_eq!(tagger.manifest().kind, "nli");
    let r = tagger.tag(&TagRequest { title: "The match ended in a draw".into(), ..Default::default() }).await.unwrap();
    assert_eq!(r.scores.len(), 2);
    assert!(tagger.embed_texts(&["x".to_string()]).await.is_err());
}

/// The shipped `tagging:` of topology.yaml on the exported model, with the film calibration's
/// `transfer` replaced by `transfer` (YAML).
fn shipped_with_transfer(transfer: &str) -> TaggerConfig {
    shipped_with(|film| film["transfer"] = serde_yaml::from_str(transfer).unwrap())
}

/// The shipped `tagging:` of topology.yaml on the exported model, the film calibration edited.
fn shipped_with(edit: impl FnOnce(&mut serde_yaml::Value)) -> TaggerConfig {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../topology.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut tagging = std::mem::take(&mut doc["tagging"]);
    tagging["model"]["path"] = model_dir().display().to_string().into();
    tagging["model"]["threads"] = 2.into();
    streamoasis_testkit::absolute_directions(&mut tagging);
    edit(&mut tagging["embedding"]["kinds"]["MOVIE"]["calibration"]);
    let cfg: TaggerConfig = serde_yaml::from_value(tagging).unwrap();
    cfg.validate("test").unwrap();
    cfg
}

/// Each candidate's score, by label.
async fn scores(tagger: &Tagger, labels: &[&str]) -> std::collections::BTreeMap<String, f32> {
    let req = TagRequest {
        title: "Stagecoach".into(),
        description: Some("Strangers ride a stagecoach through dangerous territory while an outlaw seeks revenge on the men who killed his family.".into()),
        kind: MediaKind::Movie,
        candidate_labels: Some(labels.iter().map(|l| l.to_string()).collect()),
        ..Default::default()
    };
    tagger.tag(&req).await.unwrap().scores.into_iter().map(|t| (t.label, t.score)).collect()
}

fn largest_change(a: &std::collections::BTreeMap<String, f32>, b: &std::collections::BTreeMap<String, f32>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().map(|(l, s)| (s - b[l]).abs()).fold(0.0, f32::max)
}

/// The shipped film calibration carries its fitted genre pairs to a set of genres under other
/// names, and not to a set of other labels (news sections asked of a film), whose scores stay
/// exactly those of the global pair (and their vectors are not anchored); `min_specific: 0`
/// (similarity alone) would carry them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_calibration_carries_pairs_to_renamed_genres_only() {
    let on = Tagger::load(shipped_with_transfer("{}")).await.unwrap();
    let off = Tagger::load(shipped_with_transfer("{enabled: false}")).await.unwrap();
    let always = Tagger::load(shipped_with_transfer("{min_specific: 0}")).await.unwrap();
    let renamed = ["sci-fi", "scary movie", "love story", "cowboys", "funny movie", "cartoon"];
    let sections = ["business", "entertainment", "politics", "sport", "tech"];
    let d = largest_change(&scores(&on, &renamed).await, &scores(&off, &renamed).await);
    assert!(d > 0.01, "renamed genres take the fitted pairs: largest change {d}");
    // ... and are anchored towards the genres they rename: anchor 0 scores them otherwise.
    let unanchored = Tagger::load(shipped_with_transfer("{anchor: 0}")).await.unwrap();
    let d = largest_change(&scores(&on, &renamed).await, &scores(&unanchored, &renamed).await);
    assert!(d > 0.01, "anchoring moves the renamed genres' scores: largest change {d}");
    let d = largest_change(&scores(&on, &sections).await, &scores(&off, &sections).await);
    assert!(d < 1e-6, "news sections keep the global pair: largest change {d}");
    let d = largest_change(&scores(&always, &sections).await, &scores(&off, &sections).await);
    assert!(d > 0.01, "carried by similarity alone, the sections would borrow genre priors: largest change {d}");
}

/// The shipped film calibration's fitted directions move the fitted genres' vectors (their
/// scores change, the taxonomy version too) and leave labels without a pair alone; a
/// directions file fitted for other weights is refused at load, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_directions_move_fitted_genres_and_belong_to_one_model() {
    let with = Tagger::load(shipped_with(|_| {})).await.unwrap();
    let without = Tagger::load(shipped_with(|c| {
        c.as_mapping_mut().unwrap().remove("directions");
    }))
    .await
    .unwrap();
    let genres = ["western", "drama", "action", "thriller", "comedy"];
    let (a, b) = (scores(&with, &genres).await, scores(&without, &genres).await);
    let d = largest_change(&a, &b);
    assert!(d > 0.01, "fitted genres score with their moved vectors: largest change {d}");
    let top = a.iter().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0.clone();
    assert_eq!(top, "western", "{a:?}");
    let sections = ["business", "entertainment", "politics", "sport", "tech"];
    let d = largest_change(&scores(&with, &sections).await, &scores(&without, &sections).await);
    assert!(d < 1e-6, "labels without a pair have no direction: largest change {d}");
    assert_ne!(with.taxonomy_version(), without.taxonomy_version());

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../../calibration/tmdb-genres.all-MiniLM-L6-v2.json");
    let mut other: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    other["weights_sha256"] = "0123456789abcdef".into();
    let path = std::env::temp_dir().join(format!("streamoasis-directions-other-{}.json", std::process::id()));
    std::fs::write(&path, other.to_string()).unwrap();
    let Err(e) = Tagger::load(shipped_with(|c| c["directions"] = path.display().to_string().into())).await else {
        panic!("directions fitted for other weights must be refused");
    };
    let e = e.to_string();
    assert!(e.contains("tagging.embedding.kinds.MOVIE.calibration.directions") && e.contains("weights 0123456789ab") && e.contains("--directions-out"), "{e}");
}

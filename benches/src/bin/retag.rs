//! Retag without the model (`./benches/run retag`): BBC News items tagged once with
//! `tagging.store_embeddings` on (what the model read kept, as the sink stores it), then a new
//! taxonomy applied two ways in the same run:
//!
//! - **model**: every item through the model again under the new taxonomy (today's retag,
//!   without Kafka: the model is its cost);
//! - **from embeddings**: [`Tagger::tag_from_embedding`] over `--stored` stored items (the
//!   computed embeddings repeated under new ids), no model over the text.
//!
//! Reports items/s of both and their ratio, how many items the stored rows could not answer
//! (adaptive compute read only their lead and the new labels need the body), whether the tags
//! are identical and the largest score difference, and the tagged event's Avro size with and
//! without the embedding. Results: `benches/results/retag.{json,md}`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use streamoasis_pipeline::events::{avro, Lineage, MediaKind, MediaTagged, Strategy};
use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::{ItemEmbedding, TagRequest, Tagger, TaggerConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    /// BBC JSONL (scripts/python/prepare_bbc.py).
    #[arg(long)]
    data: PathBuf,
    /// Items tagged through the model (every k-th article).
    #[arg(long, default_value_t = 1000)]
    items: usize,
    /// Stored items re-scored from their embeddings.
    #[arg(long, default_value_t = 100_000)]
    stored: usize,
    /// Items in flight (the model batches them).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

#[derive(Deserialize, Clone)]
struct Article {
    id: String,
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// The new taxonomy: the five sections under names the shipped labels do not use.
const NEW_LABELS: &str = "[{name: money and markets}, {name: games and athletes}, {name: government and elections}, \
                          {name: gadgets and software}, {name: 'films, music and celebrities'}]";

fn tagger_config(topo: &Topology, labels: Option<&str>) -> anyhow::Result<TaggerConfig> {
    let mut t = topo.clone();
    if let serde_yaml::Value::Mapping(m) = &mut t.file.tagging {
        m.insert("store_embeddings".into(), true.into());
        if let Some(l) = labels {
            m.insert("labels".into(), serde_yaml::from_str(l)?);
        }
    }
    Ok(TaggerConfig::from_topology(&t)?)
}

fn pct(mut v: Vec<usize>, p: f64) -> usize {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let topo = Topology::load(&a.topology)?;
    let all: Vec<Article> = std::fs::read_to_string(&a.data)?.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let step = (all.len() / a.items.max(1)).max(1);
    let articles: Vec<Article> = all.iter().step_by(step).take(a.items).cloned().collect();
    let reqs: Vec<TagRequest> = articles
        .iter()
        .map(|x| TagRequest { title: x.title.clone(), description: x.description.clone(), transcript: x.text.clone(), kind: MediaKind::Article, ..Default::default() })
        .collect();
    let n = reqs.len();

    // 1. The first pass: tagged under the shipped taxonomy, embeddings kept.
    let old = Arc::new(Tagger::load(tagger_config(&topo, None)?).await?);
    let t0 = Instant::now();
    let first: Vec<_> = futures::stream::iter(reqs.iter().map(|r| old.tag(r))).buffered(a.concurrency).collect().await;
    let first_s = t0.elapsed().as_secs_f64();
    let stored: Vec<ItemEmbedding> = first.into_iter().map(|r| r.map(|r| r.embedding.expect("store_embeddings is on"))).collect::<Result<_, _>>()?;
    eprintln!("first pass: {n} items in {first_s:.1}s ({:.1} items/s)", n as f64 / first_s);

    // 2. The new taxonomy through the model (today's retag).
    let new = Arc::new(Tagger::load(tagger_config(&topo, Some(NEW_LABELS))?).await?);
    let t0 = Instant::now();
    let model: Vec<_> = futures::stream::iter(reqs.iter().map(|r| new.tag(r))).buffered(a.concurrency).collect().await;
    let model_s = t0.elapsed().as_secs_f64();
    let model: Vec<_> = model.into_iter().collect::<Result<_, _>>()?;
    let model_rate = n as f64 / model_s;
    eprintln!("model retag: {n} items in {model_s:.1}s ({model_rate:.1} items/s)");

    // 3. The new taxonomy from the stored embeddings: exactness on the real items, then speed
    // over `stored` items (the same rows under other ids: the cost per row is the same).
    let (mut same, mut need_model, mut worst) = (0usize, 0usize, 0f32);
    let mut answerable: Vec<&ItemEmbedding> = Vec::new();
    for (e, m) in stored.iter().zip(&model) {
        match new.tag_from_embedding(MediaKind::Article, None, e).await? {
            None => need_model += 1,
            Some(r) => {
                answerable.push(e);
                let labels = |t: &[streamoasis_pipeline::events::Tag]| t.iter().map(|x| x.label.clone()).collect::<Vec<_>>();
                if labels(&r.tags) == labels(&m.tags) && r.taxonomy_version == m.taxonomy_version {
                    same += 1;
                }
                for (x, y) in r.scores.iter().zip(&m.scores) {
                    if x.label == y.label {
                        worst = worst.max((x.score - y.score).abs());
                    }
                }
            }
        }
    }
    // Speed over the rows that answer (the others cost nothing here: they go to the model).
    let t0 = Instant::now();
    let mut tags = 0usize;
    for i in 0..a.stored {
        let e = answerable[i % answerable.len()];
        let r = new.tag_from_embedding(MediaKind::Article, None, e).await?.expect("answered above");
        tags += r.tags.len();
    }
    let emb_s = t0.elapsed().as_secs_f64();
    let emb_rate = a.stored as f64 / emb_s;
    eprintln!("from embeddings: {} stored items in {emb_s:.2}s ({emb_rate:.0} items/s, {tags} tags)", a.stored);

    // 4. Event size with and without the embedding.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for ((x, e), m) in articles.iter().zip(&stored).zip(&model) {
        let mut ev = MediaTagged {
            media_id: x.id.clone(),
            kind: MediaKind::Article,
            tags: m.tags.clone(),
            no_tags_reason: m.no_tags_reason.clone(),
            strategy: Strategy::Embedding,
            model: new.model_ref().clone(),
            ingested_at: 1,
            tagged_at: 2,
            lineage: Lineage { topic: "media.ingested".into(), partition: 0, offset: 0 },
            title: Some(x.title.clone()),
            source: Some("bbc".into()),
            language: Some("en".into()),
            attributes: Default::default(),
            taxonomy_version: Some(m.taxonomy_version.clone()),
            embedding: None,
        };
        without.push(avro::to_datum(&ev)?.len());
        ev.embedding = Some(e.to_event(None));
        with.push(avro::to_datum(&ev)?.len());
    }
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let windows: Vec<usize> = stored.iter().map(|e| e.windows.as_ref().map_or(0, Vec::len) + e.lead.as_ref().map_or(0, Vec::len)).collect();

    let r = json!({
        "items": n,
        "stored": a.stored,
        "threads": std::env::var("BENCH_THREADS").ok(),
        "first_pass_items_per_s": n as f64 / first_s,
        "model_retag_items_per_s": model_rate,
        "from_embeddings_items_per_s": emb_rate,
        "speedup": emb_rate / model_rate,
        "need_model": need_model,
        "answered": n - need_model,
        "identical_tags": same,
        "max_score_difference": worst,
        "rows_per_item_mean": mean(&windows),
        "event_bytes": {"without_mean": mean(&without), "with_mean": mean(&with), "without_p95": pct(without.clone(), 0.95), "with_p95": pct(with.clone(), 0.95),
                         "ratio_mean": mean(&with) / mean(&without)},
    });
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("retag.json"), serde_json::to_string_pretty(&r)? + "\n")?;
    let md = format!(
        "| | items/s | |\n|---|---:|---|\n| model retag (today) | {model_rate:.1} | {n} BBC items, new taxonomy |\n| from stored embeddings | {emb_rate:.0} | {} stored items |\n| **ratio** | **{:.0}x** | same run |\n\n\
         Of {n} items, {} answered from their stored rows with tags identical to the model's in {same}, largest score difference {worst:.1e}; {need_model} need the model \
         (adaptive compute read only their title and description, and the new labels' margin there is too narrow to skip the body).\n\n\
         Tagged event (Avro): {:.0} bytes without the embedding, {:.0} with ({:.1}x; p95 {} vs {}); {:.1} rows of 384 floats per item on average.\n",
        a.stored,
        emb_rate / model_rate,
        n - need_model,
        mean(&without),
        mean(&with),
        mean(&with) / mean(&without),
        pct(without, 0.95),
        pct(with, 0.95),
        mean(&windows)
    );
    std::fs::write(a.out.join("retag.md"), &md)?;
    println!("{md}");
    Ok(())
}

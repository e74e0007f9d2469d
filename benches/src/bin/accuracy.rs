//! Zero-shot accuracy on BBC News (2225 articles, 5 sections) with the tagger as configured.
//!
//! `cargo run --release -p streamoasis-benches --bin accuracy -- --data ~/.cache/streamoasis/data/bbc-news.jsonl`
//! Runs the `tagging:` section of topology.yaml (or `--topology`), on full text and on titles
//! only, plus any `--variant name=<yaml overriding tagging keys>`; appends to
//! `benches/results/accuracy.md` and writes `accuracy.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Only the first N articles.
    #[arg(long)]
    limit: Option<usize>,
    /// Extra configurations: `name=<yaml mapping merged over tagging:>`.
    #[arg(long)]
    variant: Vec<String>,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

#[derive(Deserialize)]
struct Article {
    id: String,
    label: String,
    title: String,
    description: Option<String>,
    text: Option<String>,
}

fn merge(base: &mut serde_yaml::Value, over: &serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_mapping() && v.is_mapping() => merge(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

async fn evaluate(tagger: Arc<Tagger>, articles: &[Article], titles_only: bool) -> (f64, f64) {
    let start = Instant::now();
    let tasks: Vec<_> = articles
        .iter()
        .map(|a| {
            let t = tagger.clone();
            let req = if titles_only {
                TagRequest { title: a.title.clone(), ..Default::default() }
            } else {
                TagRequest { title: a.title.clone(), description: a.description.clone(), transcript: a.text.clone(), candidate_labels: None }
            };
            let label = a.label.clone();
            tokio::spawn(async move { t.tag(&req).await.map(|r| r.tags.first().map(|t| t.label == label).unwrap_or(false)) })
        })
        .collect();
    let mut correct = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            correct += 1;
        }
    }
    (100.0 * correct as f64 / articles.len() as f64, articles.len() as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let topo = Topology::load(&a.topology)?;
    let articles: Vec<Article> = std::fs::read_to_string(&a.data)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let articles: Vec<Article> = articles.into_iter().take(a.limit.unwrap_or(usize::MAX)).collect();
    let _ = articles.iter().map(|x| &x.id).count();
    let mut variants = vec![("default (topology.yaml)".to_string(), serde_yaml::Value::Null)];
    for v in &a.variant {
        let (name, yaml) = v.split_once('=').ok_or_else(|| anyhow::anyhow!("--variant name=<yaml>"))?;
        variants.push((name.to_string(), serde_yaml::from_str(yaml)?));
    }
    let mut rows = Vec::new();
    let mut md = format!("\n## BBC News zero-shot accuracy ({} articles)\n\n| configuration | full text | items/s | titles only | items/s |\n|---|---:|---:|---:|---:|\n", articles.len());
    for (name, over) in variants {
        let mut t = topo.clone();
        if !over.is_null() {
            merge(&mut t.file.tagging, &over);
        }
        let cfg = TaggerConfig::from_topology(&t)?;
        let tagger = Arc::new(Tagger::load(cfg).await?);
        let (full, full_ips) = evaluate(tagger.clone(), &articles, false).await;
        let (titles, titles_ips) = evaluate(tagger, &articles, true).await;
        eprintln!("{name}: full {full:.1}% ({full_ips:.1}/s), titles {titles:.1}% ({titles_ips:.1}/s)");
        md += &format!("| {name} | {full:.1}% | {full_ips:.1} | {titles:.1}% | {titles_ips:.1} |\n");
        rows.push(json!({"configuration": name, "override": serde_json::to_value(&over)?, "full_text": full, "full_items_per_s": full_ips, "titles_only": titles, "titles_items_per_s": titles_ips}));
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("accuracy.json"), serde_json::to_string_pretty(&json!({"articles": articles.len(), "results": rows}))?)?;
    std::fs::write(a.out.join("accuracy.md"), &md)?;
    println!("{md}");
    Ok(())
}

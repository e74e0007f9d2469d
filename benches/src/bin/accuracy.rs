//! Zero-shot accuracy on BBC News (2225 articles, 5 sections) with the tagger as configured,
//! and (`--films`) film-genre ranking on TMDB 5000's test split (multi-label: LRAP, P@1,
//! micro-F1 of the emitted tags, i.e. at the configured threshold), films sent as `kind: MOVIE`
//! with the 20 genres as candidate labels.
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
use streamoasis_pipeline::events::MediaKind;
use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    #[arg(long)]
    data: PathBuf,
    /// Only N BBC articles (every k-th, so all sections are represented).
    #[arg(long)]
    limit: Option<usize>,
    /// Extra configurations: `name=<yaml mapping merged over tagging:>`.
    #[arg(long)]
    variant: Vec<String>,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// TMDB films JSONL (scripts/python/prepare_tmdb.py); adds the film benchmark.
    #[arg(long)]
    films: Option<PathBuf>,
    /// Only N TMDB test films (every k-th); default all.
    #[arg(long)]
    films_limit: Option<usize>,
    /// Skip the titles-only pass.
    #[arg(long)]
    no_titles: bool,
    /// Output file stem under --out.
    #[arg(long, default_value = "accuracy")]
    name: String,
}

#[derive(Deserialize)]
struct Film {
    title: String,
    overview: String,
    genres: Vec<String>,
    split: String,
}

/// LRAP, P@1 and micro-F1 of the emitted tags over films (scores of every genre ranked).
async fn evaluate_films(tagger: Arc<Tagger>, films: &[Film], genres: &[String]) -> anyhow::Result<(f64, f64, f64, f64)> {
    let start = Instant::now();
    let tasks: Vec<_> = films
        .iter()
        .map(|f| {
            let t = tagger.clone();
            let req =
                TagRequest { title: f.title.clone(), description: Some(f.overview.clone()), candidate_labels: Some(genres.to_vec()), kind: MediaKind::Movie, ..Default::default() };
            tokio::spawn(async move { t.tag(&req).await })
        })
        .collect();
    let (mut lrap, mut p1, mut tp, mut fp, mut fn_) = (0f64, 0f64, 0usize, 0usize, 0usize);
    for (task, f) in tasks.into_iter().zip(films) {
        let r = task.await??;
        let gold: Vec<String> = f.genres.iter().map(|g| g.to_lowercase()).collect();
        let ranked: Vec<&str> = r.scores.iter().map(|t| t.label.as_str()).collect();
        let ranks: Vec<usize> = gold.iter().filter_map(|g| ranked.iter().position(|l| l == g).map(|p| p + 1)).collect();
        lrap += ranks.iter().map(|&r| ranks.iter().filter(|&&x| x <= r).count() as f64 / r as f64).sum::<f64>() / gold.len() as f64;
        if ranked.first().is_some_and(|l| gold.iter().any(|g| g == l)) {
            p1 += 1.0;
        }
        let emitted: Vec<&str> = r.tags.iter().map(|t| t.label.as_str()).collect();
        let hit = emitted.iter().filter(|l| gold.iter().any(|g| g == *l)).count();
        tp += hit;
        fp += emitted.len() - hit;
        fn_ += gold.len() - hit;
    }
    let n = films.len() as f64;
    let f1 = 2.0 * tp as f64 / (2 * tp + fp + fn_).max(1) as f64;
    Ok((lrap / n, p1 / n, f1, n / start.elapsed().as_secs_f64()))
}

#[derive(Deserialize)]
struct Article {
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
    if articles.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let start = Instant::now();
    let tasks: Vec<_> = articles
        .iter()
        .map(|a| {
            let t = tagger.clone();
            let req = if titles_only {
                TagRequest { title: a.title.clone(), ..Default::default() }
            } else {
                TagRequest { title: a.title.clone(), description: a.description.clone(), transcript: a.text.clone(), ..Default::default() }
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
    let articles: Vec<Article> = std::fs::read_to_string(&a.data)?.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let step = a.limit.map_or(1, |n| (articles.len() / n.max(1)).max(1));
    let articles: Vec<Article> = articles.into_iter().step_by(step).take(a.limit.unwrap_or(usize::MAX)).collect();
    let mut variants = vec![("default (topology.yaml)".to_string(), serde_yaml::Value::Null)];
    for v in &a.variant {
        let (name, yaml) = v.split_once('=').ok_or_else(|| anyhow::anyhow!("--variant name=<yaml>"))?;
        variants.push((name.to_string(), serde_yaml::from_str(yaml)?));
    }
    let films: Vec<Film> = match &a.films {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str::<Film>)
            .filter(|f| f.as_ref().map_or(true, |f| f.split == "test"))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let film_step = a.films_limit.map_or(1, |n| (films.len() / n.max(1)).max(1));
    let films: Vec<Film> = films.into_iter().step_by(film_step).take(a.films_limit.unwrap_or(usize::MAX)).collect();
    let mut genres: Vec<String> = films.iter().flat_map(|f| f.genres.iter().map(|g| g.to_lowercase())).collect();
    genres.sort();
    genres.dedup();
    let mut rows = Vec::new();
    let mut md = format!(
        "\n## Zero-shot accuracy ({} BBC articles{})\n\n| configuration | BBC full text | items/s | BBC titles | items/s | TMDB LRAP | P@1 | micro-F1 | items/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        articles.len(),
        if films.is_empty() { String::new() } else { format!(", {} TMDB test films, {} genres", films.len(), genres.len()) }
    );
    for (name, over) in variants {
        let mut t = topo.clone();
        if !over.is_null() {
            merge(&mut t.file.tagging, &over);
        }
        let cfg = TaggerConfig::from_topology(&t)?;
        let tagger = Arc::new(Tagger::load(cfg).await?);
        let (full, full_ips) = evaluate(tagger.clone(), &articles, false).await;
        let (titles, titles_ips) = if a.no_titles { (f64::NAN, f64::NAN) } else { evaluate(tagger.clone(), &articles, true).await };
        let (lrap, p1, f1, film_ips) = if films.is_empty() { (f64::NAN, f64::NAN, f64::NAN, f64::NAN) } else { evaluate_films(tagger, &films, &genres).await? };
        eprintln!("{name}: full {full:.1}% ({full_ips:.1}/s), titles {titles:.1}% ({titles_ips:.1}/s), films LRAP {lrap:.4} P@1 {p1:.4} F1 {f1:.4} ({film_ips:.1}/s)");
        let pct = |x: f64| if x.is_nan() { "–".to_string() } else { format!("{x:.1}%") };
        let num = |x: f64, d: usize| if x.is_nan() { "–".to_string() } else { format!("{x:.d$}") };
        md += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            pct(full),
            num(full_ips, 1),
            pct(titles),
            num(titles_ips, 1),
            num(lrap, 3),
            num(p1, 3),
            num(f1, 3),
            num(film_ips, 1)
        );
        let j = |x: f64| if x.is_nan() { serde_json::Value::Null } else { json!(x) };
        rows.push(json!({"configuration": name, "override": serde_json::to_value(&over)?, "full_text": j(full), "full_items_per_s": j(full_ips), "titles_only": j(titles), "titles_items_per_s": j(titles_ips),
            "tmdb_lrap": j(lrap), "tmdb_p_at_1": j(p1), "tmdb_micro_f1": j(f1), "tmdb_items_per_s": j(film_ips)}));
    }
    std::fs::create_dir_all(&a.out)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    std::fs::write(
        a.out.join(format!("{}.json", a.name)),
        serde_json::to_string_pretty(&json!({"articles": articles.len(), "films": films.len(), "load_avg_at_end": load.trim(), "results": rows}))?,
    )?;
    std::fs::write(a.out.join(format!("{}.md", a.name)), &md)?;
    println!("{md}");
    Ok(())
}

//! Tagging quality beyond the benchmarks' own vocabularies and lengths (`./benches/run quality`):
//!
//! - **BBC** full text (5 sections): top-1, LRAP, and the section-frequency prior;
//! - **TMDB** test films (kind `MOVIE`) with the 20 genre names the calibration was fitted on
//!   (*seen*) and with paraphrased names it never saw (*unseen*: "sci-fi", "scary movie",
//!   "love story", …): LRAP, P@1, micro-F1 of the emitted tags, and the genre-frequency prior;
//! - **cross-dataset**: BBC articles scored multi-label with the film calibration (fitted on
//!   TMDB) under the five section names: LRAP and P@1 against the prior;
//! - **long media** (`scripts/python/prepare_long_media.py`): BBC articles inside neutral
//!   chatter under a generic title, by total length and position of the article, against the
//!   same article alone; items/s per length (an hour of transcript vs the article alone, same run).
//!
//! Each configuration is `topology.yaml`'s `tagging:` section with a `--variant` override
//! merged over it; results go to `benches/results/<name>.{json,md}`.

use std::collections::BTreeMap;
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
    /// BBC JSONL (scripts/python/prepare_bbc.py).
    #[arg(long)]
    bbc: Option<PathBuf>,
    /// BBC articles to use (every k-th, all sections).
    #[arg(long, default_value_t = 2225)]
    bbc_limit: usize,
    /// TMDB JSONL (scripts/python/prepare_tmdb.py); test split only.
    #[arg(long)]
    films: Option<PathBuf>,
    /// Test films to use (every k-th).
    #[arg(long, default_value_t = 100_000)]
    film_limit: usize,
    /// Long-media JSONL (scripts/python/prepare_long_media.py).
    #[arg(long)]
    long: Option<PathBuf>,
    /// Extra configurations: `name=<yaml mapping merged over tagging:>`.
    #[arg(long)]
    variant: Vec<String>,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    #[arg(long, default_value = "quality")]
    name: String,
}

/// Paraphrases of TMDB's genre names that no calibration was fitted on (the gold genre maps to
/// its paraphrase; the films and their genres are unchanged).
const PARAPHRASES: &[(&str, &str)] = &[
    ("action", "action-packed"),
    ("adventure", "epic journey"),
    ("animation", "cartoon"),
    ("comedy", "funny movie"),
    ("crime", "gangsters and heists"),
    ("documentary", "non-fiction"),
    ("drama", "emotional story"),
    ("family", "kids and parents"),
    ("fantasy", "magic and mythical creatures"),
    ("foreign", "international cinema"),
    ("history", "historical period piece"),
    ("horror", "scary movie"),
    ("music", "musicians and songs"),
    ("mystery", "whodunit"),
    ("romance", "love story"),
    ("science fiction", "sci-fi"),
    ("thriller", "thriller and suspense"),
    ("tv movie", "made for television"),
    ("war", "soldiers in battle"),
    ("western", "cowboys"),
];

/// A second set of paraphrases, written before any result of the first was looked at and never
/// used to choose a method or a setting: the held-out check of how calibration transfers.
const PARAPHRASES_HELD_OUT: &[(&str, &str)] = &[
    ("action", "fights and explosions"),
    ("adventure", "quest and exploration"),
    ("animation", "animated"),
    ("comedy", "humour"),
    ("crime", "criminals and police"),
    ("documentary", "real events and interviews"),
    ("drama", "serious and dramatic"),
    ("family", "for the whole family"),
    ("fantasy", "wizards and dragons"),
    ("foreign", "foreign-language"),
    ("history", "based on history"),
    ("horror", "frightening monsters"),
    ("music", "musical"),
    ("mystery", "detective puzzle"),
    ("romance", "romantic"),
    ("science fiction", "space and the future"),
    ("thriller", "suspenseful"),
    ("tv movie", "television film"),
    ("war", "wartime"),
    ("western", "wild west"),
];

#[derive(Deserialize, Clone)]
struct Film {
    title: String,
    overview: String,
    genres: Vec<String>,
    split: String,
}

#[derive(Deserialize, Clone)]
struct Article {
    label: String,
    title: String,
    description: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize, Clone)]
struct LongItem {
    label: String,
    title: String,
    transcript: String,
    position: serde_json::Value,
    #[serde(default)]
    length: Option<usize>,
    tokens: usize,
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

fn read_jsonl<T: for<'de> Deserialize<'de>>(p: &PathBuf) -> anyhow::Result<Vec<T>> {
    Ok(std::fs::read_to_string(p)?.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?)
}

fn every_kth<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    let step = (v.len() / n.max(1)).max(1);
    v.iter().step_by(step).take(n).cloned().collect()
}

/// Ranking metrics of one item: (LRAP, P@1) of `ranked` labels against the gold set.
fn lrap_p1(ranked: &[&str], gold: &[String]) -> (f64, f64) {
    let ranks: Vec<usize> = gold.iter().filter_map(|g| ranked.iter().position(|l| l == g).map(|p| p + 1)).collect();
    let lrap = ranks.iter().map(|&r| ranks.iter().filter(|&&x| x <= r).count() as f64 / r as f64).sum::<f64>() / gold.len().max(1) as f64;
    let p1 = if ranked.first().is_some_and(|l| gold.iter().any(|g| g == l)) { 1.0 } else { 0.0 };
    (lrap, p1)
}

/// The frequency prior: every item ranks labels by their frequency in `fit` (ties by name).
fn prior(fit: &[Vec<String>], eval: &[Vec<String>], labels: &[String]) -> (f64, f64) {
    let mut count: BTreeMap<&str, usize> = labels.iter().map(|l| (l.as_str(), 0)).collect();
    for g in fit.iter().flatten() {
        if let Some(c) = count.get_mut(g.as_str()) {
            *c += 1;
        }
    }
    let mut ranked: Vec<&str> = labels.iter().map(String::as_str).collect();
    ranked.sort_by(|a, b| count[b].cmp(&count[a]).then(a.cmp(b)));
    let (mut l, mut p) = (0.0, 0.0);
    for g in eval {
        let (a, b) = lrap_p1(&ranked, g);
        l += a;
        p += b;
    }
    (l / eval.len().max(1) as f64, p / eval.len().max(1) as f64)
}

#[derive(Default, Clone, Copy)]
struct Ranking {
    lrap: f64,
    p1: f64,
    f1: f64,
    items_per_s: f64,
}

/// Tag every request concurrently; rank metrics against `gold` (the labels as they appear in
/// the candidates) and micro-F1 of the emitted tags.
async fn rank_eval(tagger: &Arc<Tagger>, reqs: Vec<TagRequest>, gold: &[Vec<String>]) -> anyhow::Result<Ranking> {
    let start = Instant::now();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let t = tagger.clone();
            tokio::spawn(async move { t.tag(&r).await })
        })
        .collect();
    let (mut lrap, mut p1, mut tp, mut fp, mut fn_) = (0f64, 0f64, 0usize, 0usize, 0usize);
    for (task, g) in tasks.into_iter().zip(gold) {
        let r = task.await??;
        let ranked: Vec<&str> = r.scores.iter().map(|t| t.label.as_str()).collect();
        let (a, b) = lrap_p1(&ranked, g);
        lrap += a;
        p1 += b;
        let hit = r.tags.iter().filter(|t| g.contains(&t.label)).count();
        tp += hit;
        fp += r.tags.len() - hit;
        fn_ += g.len() - hit;
    }
    let n = gold.len().max(1) as f64;
    Ok(Ranking { lrap: lrap / n, p1: p1 / n, f1: 2.0 * tp as f64 / (2 * tp + fp + fn_).max(1) as f64, items_per_s: n / start.elapsed().as_secs_f64() })
}

fn write(a: &Args, articles: &[Article], test: &[Film], long: &[LongItem], bbc_prior: (f64, f64), film_prior: (f64, f64), rows: &[serde_json::Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let result = json!({
        "articles": articles.len(), "films": test.len(), "long_items": long.len(),
        "bbc_prior": {"lrap": bbc_prior.0, "p_at_1": bbc_prior.1},
        "tmdb_prior": {"lrap": film_prior.0, "p_at_1": film_prior.1},
        "paraphrases": PARAPHRASES.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        "paraphrases_held_out": PARAPHRASES_HELD_OUT.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        "load_avg_at_end": load.trim(), "results": rows,
    });
    std::fs::write(a.out.join(format!("{}.json", a.name)), serde_json::to_string_pretty(&result)?)?;
    Ok(())
}

fn article_request(a: &Article) -> TagRequest {
    TagRequest { title: a.title.clone(), description: a.description.clone(), transcript: a.text.clone(), ..Default::default() }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let topo = Topology::load(&a.topology)?;
    let articles: Vec<Article> = match &a.bbc {
        Some(p) => every_kth(&read_jsonl::<Article>(p)?, a.bbc_limit),
        None => vec![],
    };
    let all_films: Vec<Film> = match &a.films {
        Some(p) => read_jsonl(p)?,
        None => vec![],
    };
    let test: Vec<Film> = every_kth(&all_films.iter().filter(|f| f.split == "test").cloned().collect::<Vec<_>>(), a.film_limit);
    let fit_gold: Vec<Vec<String>> = all_films.iter().filter(|f| f.split != "test").map(|f| f.genres.iter().map(|g| g.to_lowercase()).collect()).collect();
    let mut genres: Vec<String> = all_films.iter().flat_map(|f| f.genres.iter().map(|g| g.to_lowercase())).collect();
    genres.sort();
    genres.dedup();
    let para = |set: &[(&str, &str)], g: &str| set.iter().find(|(s, _)| *s == g).map_or(g.to_string(), |(_, p)| p.to_string());
    let unseen: Vec<String> = genres.iter().map(|g| para(PARAPHRASES, g)).collect();
    let held_out: Vec<String> = genres.iter().map(|g| para(PARAPHRASES_HELD_OUT, g)).collect();
    let seen_gold: Vec<Vec<String>> = test.iter().map(|f| f.genres.iter().map(|g| g.to_lowercase()).collect()).collect();
    let unseen_gold: Vec<Vec<String>> = seen_gold.iter().map(|g| g.iter().map(|x| para(PARAPHRASES, x)).collect()).collect();
    let held_out_gold: Vec<Vec<String>> = seen_gold.iter().map(|g| g.iter().map(|x| para(PARAPHRASES_HELD_OUT, x)).collect()).collect();
    let film_prior = prior(&fit_gold, &seen_gold, &genres);
    let sections: Vec<String> = {
        let mut s: Vec<String> = articles.iter().map(|a| a.label.clone()).collect();
        s.sort();
        s.dedup();
        s
    };
    let bbc_gold: Vec<Vec<String>> = articles.iter().map(|a| vec![a.label.clone()]).collect();
    let bbc_prior = prior(&bbc_gold, &bbc_gold, &sections);
    let long: Vec<LongItem> = match &a.long {
        Some(p) => read_jsonl(p)?,
        None => vec![],
    };

    let mut variants = vec![("default (topology.yaml)".to_string(), serde_yaml::Value::Null)];
    for v in &a.variant {
        let (name, yaml) = v.split_once('=').ok_or_else(|| anyhow::anyhow!("--variant name=<yaml>"))?;
        variants.push((name.to_string(), serde_yaml::from_str(yaml)?));
    }
    let mut rows = Vec::new();
    for (name, over) in &variants {
        let mut t = topo.clone();
        if !over.is_null() {
            merge(&mut t.file.tagging, over);
        }
        let cfg = TaggerConfig::from_topology(&t)?;
        // Cross-dataset: the film calibration (fitted on TMDB: global pair, genre pairs and
        // their transfer to other names) applied to news under the section names.
        let film_cal = cfg.for_kind(MediaKind::Movie).calibration.cloned();
        let tagger = Arc::new(Tagger::load(cfg.clone()).await?);
        let mut row = json!({"configuration": name, "override": serde_json::to_value(over)?, "windows_per_item": tagger.window_count()?});
        if !test.is_empty() {
            for (key, labels, gold) in [("tmdb_seen", &genres, &seen_gold), ("tmdb_unseen", &unseen, &unseen_gold), ("tmdb_held_out", &held_out, &held_out_gold)] {
                let reqs: Vec<TagRequest> = test
                    .iter()
                    .map(|f| TagRequest {
                        title: f.title.clone(),
                        description: Some(f.overview.clone()),
                        candidate_labels: Some(labels.clone()),
                        kind: MediaKind::Movie,
                        ..Default::default()
                    })
                    .collect();
                let r = rank_eval(&tagger, reqs, gold).await?;
                eprintln!("{name}: {key} LRAP {:.3} P@1 {:.3} F1 {:.3} ({:.1}/s)", r.lrap, r.p1, r.f1, r.items_per_s);
                row[key] = json!({"lrap": r.lrap, "p_at_1": r.p1, "micro_f1": r.f1, "items_per_s": r.items_per_s});
            }
        }
        if !long.is_empty() {
            // Groups: (length, position) → items; tagged group by group so items/s is per group.
            let mut groups: BTreeMap<(usize, String), Vec<&LongItem>> = BTreeMap::new();
            for it in &long {
                let pos = match &it.position {
                    serde_json::Value::String(s) => s.clone(),
                    v => format!("{:.2}", v.as_f64().unwrap_or(0.0)),
                };
                groups.entry((it.length.unwrap_or(0), pos)).or_default().push(it);
            }
            let mut out = Vec::new();
            for ((length, pos), items) in groups {
                let reqs: Vec<TagRequest> = items.iter().map(|i| TagRequest { title: i.title.clone(), transcript: Some(i.transcript.clone()), ..Default::default() }).collect();
                let gold: Vec<Vec<String>> = items.iter().map(|i| vec![i.label.clone()]).collect();
                let r = rank_eval(&tagger, reqs, &gold).await?;
                let tokens = items.iter().map(|i| i.tokens).sum::<usize>() as f64 / items.len() as f64;
                eprintln!("{name}: long {length} @ {pos}: top-1 {:.1}% ({:.2}/s, {tokens:.0} tokens)", 100.0 * r.p1, r.items_per_s);
                out.push(json!({"length": length, "position": pos, "items": items.len(), "mean_tokens": tokens, "top1": r.p1, "items_per_s": r.items_per_s}));
            }
            row["long"] = json!(out);
        }
        if !articles.is_empty() {
            let reqs: Vec<TagRequest> = articles.iter().map(article_request).collect();
            let r = rank_eval(&tagger, reqs, &bbc_gold).await?;
            eprintln!("{name}: BBC top-1 {:.1}% ({:.1}/s)", 100.0 * r.p1, r.items_per_s);
            row["bbc"] = json!({"top1": r.p1, "lrap": r.lrap, "items_per_s": r.items_per_s});
            if let Some(c) = &film_cal {
                let mut ct = topo.clone();
                if !over.is_null() {
                    merge(&mut ct.file.tagging, over);
                }
                let c = serde_yaml::to_value(c)?;
                let mut cross: serde_yaml::Value = serde_yaml::from_str("{embedding: {multi_label: true}}")?;
                cross["embedding"]["calibration"] = c;
                merge(&mut ct.file.tagging, &cross);
                let ccfg = TaggerConfig::from_topology(&ct)?;
                let ctag = Arc::new(Tagger::load(ccfg).await?);
                let reqs: Vec<TagRequest> = articles.iter().map(article_request).collect();
                let r = rank_eval(&ctag, reqs, &bbc_gold).await?;
                eprintln!("{name}: cross-dataset BBC LRAP {:.3} P@1 {:.3}", r.lrap, r.p1);
                row["cross_bbc"] = json!({"lrap": r.lrap, "p_at_1": r.p1});
            }
        }
        rows.push(row);
        // Written after every configuration, so a long run interrupted keeps what it measured.
        write(&a, &articles, &test, &long, bbc_prior, film_prior, &rows)?;
    }
    Ok(())
}

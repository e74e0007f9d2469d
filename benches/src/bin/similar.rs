//! Similar media from the database's ANN index (`./benches/run similar`, needs `scripts/stack
//! up`): up to `--items` real items (TMDB films and BBC News articles, title + description, and
//! the first three ~1,200-character stretches of each article's body as clips of their own)
//! embedded by the model and stored as the sink stores them (`media_embeddings.pooled`, the
//! index `topology apply` creates), then `--queries` items asked for their `k` nearest two ways
//! in the same run:
//!
//! - **ANN**: [`Reader::nearest`], the read `GET /v1/media/{id}/similar` makes
//!   (`ORDER BY pooled ANN OF ? LIMIT k`);
//! - **exact**: cosine against every stored vector, in process (the ground truth).
//!
//! Reports recall@k of the ANN answers against the exact ones, and the latency of each read
//! (p50, p99). Results: `benches/results/similar.{json,md}`. The bench keyspace is dropped after.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use streamoasis_pipeline::env;
use streamoasis_pipeline::topology::Topology;
use streamoasis_sink::read::{cosine, Reader};
use streamoasis_sink::{schema, SinkConfig};
use streamoasis_tagger::{Tagger, TaggerConfig};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    corpus: streamoasis_benches::CorpusArgs,
    /// Items asked for their neighbours (spread over the stored ones).
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let topo = Topology::load(&a.corpus.topology)?;
    let items = streamoasis_benches::corpus(&a.corpus.films, &a.corpus.bbc, a.corpus.items)?;
    let n = items.len();
    anyhow::ensure!(n > a.k, "only {n} items in the data");

    // 1. Embed every item's title + description (one window) with the shipped model.
    let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&topo)?).await?);
    let t = Instant::now();
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(n);
    for chunk in items.chunks(256) {
        let texts: Vec<String> = chunk.iter().map(|(t, _)| t.clone()).collect();
        vectors.extend(tagger.embed_texts(&texts).await?);
        eprint!("\rembedded {}/{n}", vectors.len());
    }
    eprintln!(" in {:.1}s", t.elapsed().as_secs_f64());

    // 2. Store them as the sink does, in a bench keyspace with the schema `topology apply` makes.
    let mut cfg = SinkConfig::from_topology(&topo)?;
    cfg.keyspace = format!("bench_similar_{}", std::process::id());
    anyhow::ensure!(vectors[0].len() == cfg.vector_dim, "the model's vectors have {} floats, scylla.vector_dim is {}", vectors[0].len(), cfg.vector_dim);
    let session = Arc::new(streamoasis_sink::connect(&env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA), &cfg).await?);
    for change in schema::apply(&session, &cfg).await? {
        eprintln!("schema: {change}");
    }
    let ks = cfg.keyspace.clone();
    let insert = session.prepare(format!("INSERT INTO {ks}.media_embeddings (media_id, kind, title, pooled) VALUES (?, ?, ?, ?)")).await?;
    let t = Instant::now();
    let writes = futures::stream::iter(items.iter().zip(&vectors).enumerate())
        .map(|(i, ((title, kind), v))| {
            let (session, insert) = (session.clone(), insert.clone());
            async move { session.execute_unpaged(&insert, (format!("item-{i:05}"), kind, title, v)).await.map(|_| ()) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    writes.into_iter().collect::<Result<Vec<_>, _>>()?;
    let store_s = t.elapsed().as_secs_f64();
    eprintln!("stored {n} vectors in {store_s:.1}s");

    // 3. Each query: the ANN read (as the API makes it) and the exact scan, same run.
    let reader = Reader::new(session.clone(), &ks).await?;
    let q = a.queries.min(n);
    let (mut ann_ms, mut exact_ms, mut recalls) = (vec![], vec![], vec![]);
    for j in 0..q {
        let i = j * n / q;
        let id = format!("item-{i:05}");
        let t = Instant::now();
        let got = reader.nearest(&vectors[i], a.k, None, Some(&id)).await?;
        ann_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let mut exact: Vec<(usize, f32)> = vectors.iter().enumerate().filter(|(x, _)| *x != i).map(|(x, v)| (x, cosine(&vectors[i], v))).collect();
        exact.sort_by(|x, y| y.1.total_cmp(&x.1));
        exact.truncate(a.k);
        exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let want: HashSet<String> = exact.iter().map(|(x, _)| format!("item-{x:05}")).collect();
        recalls.push(got.iter().filter(|g| want.contains(&g.media_id)).count() as f64 / a.k as f64);
    }
    session.query_unpaged(format!("DROP KEYSPACE {ks}"), ()).await?;
    let recall = recalls.iter().sum::<f64>() / recalls.len() as f64;
    let perfect = recalls.iter().filter(|r| **r >= 1.0).count();
    let r = json!({
        "items": n,
        "queries": q,
        "k": a.k,
        "recall_at_k": recall,
        "queries_with_full_recall": perfect,
        "ann_ms": {"p50": pct(&ann_ms, 0.5), "p99": pct(&ann_ms, 0.99)},
        "exact_scan_ms": {"p50": pct(&exact_ms, 0.5), "p99": pct(&exact_ms, 0.99)},
        "store_items_per_s": n as f64 / store_s,
        "database": "Cassandra 5.0 (storage-attached ANN index, cosine)",
    });
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("similar.json"), serde_json::to_string_pretty(&r)? + "\n")?;
    let md = format!(
        "| {n} items, {q} queries, k = {k} | recall@{k} | p50 | p99 |\n|---|---:|---:|---:|\n\
         | ANN index (`ORDER BY pooled ANN OF ?`, as the API reads) | **{recall:.3}** | {:.1} ms | {:.1} ms |\n\
         | exact cosine scan, in process (ground truth) | 1 | {:.1} ms | {:.1} ms |\n\n\
         {perfect} of {q} queries found all {k} exact neighbours. Items: TMDB films and BBC News articles (title + description) \
         and stretches of the articles' bodies, one window each, the shipped model; Cassandra 5.0 on loopback, one node.\n",
        pct(&ann_ms, 0.5),
        pct(&ann_ms, 0.99),
        pct(&exact_ms, 0.5),
        pct(&exact_ms, 0.99),
        k = a.k,
    );
    std::fs::write(a.out.join("similar.md"), &md)?;
    println!("{md}");
    Ok(())
}

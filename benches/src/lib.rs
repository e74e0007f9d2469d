//! Shared helpers for the benchmark binaries (`src/bin/*`) and criterion benches (`benches/`).
//!
//! - `throughput`: batched inference items/s at 64 and 128 tokens over batch sizes, as a
//!   fraction of the fp32 matmul peak measured in the same run, side by side with the Python
//!   TorchScript peer (`python/torchscript_peer.py`) run in the same process tree.
//! - `accuracy`: zero-shot accuracy on BBC News (full text and titles only) per configuration.
//! - `benches/batcher.rs` (criterion): batcher overhead with a fake model.

use std::time::Instant;

use streamoasis_tagger::batcher::{Batch, Seq};

/// A padded batch of `batch` synthetic sequences of `seq_len` tokens (`[CLS]`, pseudo-random
/// word-piece ids from `seed`, `[SEP]`): the same input on every side of a timing comparison.
pub fn synthetic(seq_len: usize, batch: usize, seed: u64) -> Batch {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let seqs: Vec<Seq> = (0..batch)
        .map(|_| {
            let mut ids = vec![101i64];
            for _ in 0..seq_len.saturating_sub(2) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ids.push(1996 + ((x >> 33) % 28000) as i64);
            }
            ids.push(102);
            Seq::new(ids)
        })
        .collect();
    Batch::pad(&seqs.iter().collect::<Vec<_>>())
}

/// Analytic FLOPs of one BERT encoder pass over `seq_len` tokens: per layer
/// `2L(4h² + 2hi)` for the linears plus `4L²h` for the attention matmuls (embeddings,
/// norms, softmax, GELU and pooling ignored). Same formula as the Python peer.
pub fn bert_flop_per_item(seq_len: usize, h: usize, i: usize, layers: usize) -> f64 {
    let l = seq_len as f64;
    let (h, i) = (h as f64, i as f64);
    layers as f64 * (2.0 * l * (4.0 * h * h + 2.0 * h * i) + 4.0 * l * l * h)
}

/// fp32 GFLOP/s of repeated 2048² matmuls through libtorch (best of rounds within `seconds`).
pub fn matmul_peak_gflops(seconds: f64) -> f64 {
    let n = 2048i64;
    let a = tch::Tensor::randn([n, n], (tch::Kind::Float, tch::Device::Cpu));
    let b = tch::Tensor::randn([n, n], (tch::Kind::Float, tch::Device::Cpu));
    for _ in 0..2 {
        let _ = a.mm(&b);
    }
    let flop = 2.0 * (n as f64).powi(3);
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut best = 0f64;
    while Instant::now() < deadline {
        let t = Instant::now();
        let _ = a.mm(&b);
        best = best.max(flop / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[derive(serde::Deserialize)]
struct Item {
    title: String,
    #[serde(default, alias = "overview")]
    description: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// Characters of an article body per extra item (about one window of the model).
const BODY_PART: usize = 1200;

/// Items of one file: each line's title + description; with `body_parts`, also the first
/// `body_parts` stretches of its body text as items of their own (clips of the article).
fn read_items(path: &std::path::Path, kind: &str, body_parts: usize) -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e} (./benches/run prepares it)", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let i: Item = serde_json::from_str(line)?;
        let lead = match i.description.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
            Some(d) => format!("{}\n{d}", i.title.trim()),
            None => i.title.trim().to_string(),
        };
        out.push((lead, kind.to_string()));
        let body: Vec<char> = i.text.as_deref().unwrap_or_default().chars().collect();
        for part in body.chunks(BODY_PART).take(body_parts).filter(|c| c.len() >= BODY_PART / 2) {
            out.push((part.iter().collect::<String>().trim().to_string(), "CLIP".to_string()));
        }
    }
    Ok(out)
}

/// Up to `n` distinct items (text, kind) of real media: TMDB films (title + overview), then BBC
/// News articles (title + description) and the first three stretches of each article's body as
/// clips of their own: about one model window each.
pub fn corpus(films: &std::path::Path, bbc: &std::path::Path, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut items = read_items(films, "MOVIE", 0)?;
    items.extend(read_items(bbc, "ARTICLE", 3)?);
    let mut seen = std::collections::HashSet::new();
    items.retain(|(t, _)| seen.insert(t.clone()));
    items.truncate(n);
    Ok(items)
}

// The flags of the benches that read `corpus`: the topology and the two data files (a plain
// comment: a doc comment would become the about text of every bench using it).
#[derive(clap::Args)]
pub struct CorpusArgs {
    /// The topology whose tagging and scylla sections are used.
    #[arg(long, default_value = "topology.yaml")]
    pub topology: std::path::PathBuf,
    /// BBC JSONL (scripts/python/prepare_bbc.py).
    #[arg(long)]
    pub bbc: std::path::PathBuf,
    /// TMDB JSONL (scripts/python/prepare_tmdb.py).
    #[arg(long)]
    pub films: std::path::PathBuf,
    /// Items (all the data has when fewer).
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
}

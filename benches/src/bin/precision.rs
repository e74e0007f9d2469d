//! fp32 vs int8 items/s of the embedding model, interleaved in one run (A B A B …, medians),
//! at 64 and 256 tokens over batch sizes, with the fp32 matmul peak measured in the same run.
//!
//! `cargo run --release -p streamoasis-benches --bin precision -- --threads 2`
//! Writes `benches/results/precision.{json,md}`. `--smoke` runs every path for a fraction of a
//! second (what `scripts/test` calls so the binary cannot rot) and writes nothing.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;
use streamoasis_benches::{bert_flop_per_item, matmul_peak_gflops, synthetic};
use streamoasis_tagger::batcher::{Backend, Batch};
use streamoasis_tagger::config::Precision;
use streamoasis_tagger::model::{read_manifest, set_threads, TorchBackend};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    seq_lens: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch_sizes: Vec<usize>,
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// A seconds-long check of every path; writes nothing.
    #[arg(long)]
    smoke: bool,
}

fn items_per_s(b: &mut TorchBackend, input: &Batch, seconds: f64) -> f64 {
    b.forward(input).expect("forward");
    let start = Instant::now();
    let mut items = 0usize;
    while start.elapsed().as_secs_f64() < seconds || items == 0 {
        b.forward(input).expect("forward");
        items += input.rows;
    }
    items as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    if a.smoke {
        (a.seconds, a.rounds, a.seq_lens, a.batch_sizes) = (0.05, 1, vec![16], vec![2]);
    }
    set_threads(a.threads);
    let _guard = tch::no_grad_guard();
    let manifest = read_manifest(&a.model)?;
    let mut fp32 = TorchBackend::load_file(&a.model, &manifest.module_file(&a.model, Precision::Fp32)?, tch::Device::Cpu, false, a.threads)?;
    let mut int8 = TorchBackend::load_file(&a.model, &manifest.module_file(&a.model, Precision::Int8)?, tch::Device::Cpu, false, a.threads)?;
    // Same inputs give nearly the same embeddings.
    let probe = synthetic(32, 4, 7);
    let (x, y) = (fp32.forward(&probe).map_err(anyhow::Error::msg)?, int8.forward(&probe).map_err(anyhow::Error::msg)?);
    let cos: f64 = x.iter().zip(&y).map(|(p, q)| p.iter().zip(q).map(|(u, v)| (u * v) as f64).sum::<f64>()).sum::<f64>() / x.len() as f64;
    anyhow::ensure!(cos > 0.95, "int8 embeddings drifted from fp32: mean cosine {cos:.4}");
    let peak = matmul_peak_gflops(if a.smoke { 0.05 } else { 1.5 });
    let mut rows = Vec::new();
    let mut md = format!(
        "\n## fp32 vs int8 (`{}`), {} threads, interleaved {} rounds of {} s, medians\n\nfp32 matmul peak in this run: {peak:.0} GFLOP/s; int8 vs fp32 mean cosine on random input: {cos:.4}\n\n| tokens | batch | fp32 items/s | fp32 % of peak | int8 items/s | int8 / fp32 |\n|---:|---:|---:|---:|---:|---:|\n",
        a.model.display(), a.threads, a.rounds, a.seconds
    );
    for &len in &a.seq_lens {
        for &bs in &a.batch_sizes {
            let input = synthetic(len, bs, 7);
            let (mut f, mut q) = (Vec::new(), Vec::new());
            for _ in 0..a.rounds {
                f.push(items_per_s(&mut fp32, &input, a.seconds));
                q.push(items_per_s(&mut int8, &input, a.seconds));
            }
            let (f, q) = (median(f), median(q));
            let share = f * bert_flop_per_item(len, 384, 1536, 6) / 1e9 / peak;
            eprintln!("{len} tokens, batch {bs}: fp32 {f:.1}/s ({:.0}% of peak), int8 {q:.1}/s = {:.2}x", share * 100.0, q / f);
            md += &format!("| {len} | {bs} | {f:.1} | {:.0}% | {q:.1} | {:.2}x |\n", share * 100.0, q / f);
            rows.push(json!({"tokens": len, "batch": bs, "fp32_items_per_s": f, "fp32_share_of_peak": share, "int8_items_per_s": q, "int8_over_fp32": q / f}));
        }
    }
    if a.smoke {
        println!("precision smoke ok ({} points, cosine {cos:.4})", rows.len());
        return Ok(());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md += &format!("\nload average at the end: {}\n", load.trim());
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("precision.json"), serde_json::to_string_pretty(&json!({"threads": a.threads, "matmul_peak_gflops": peak, "cosine": cos, "load_avg_at_end": load.trim(), "rows": rows}))?)?;
    std::fs::write(a.out.join("precision.md"), &md)?;
    println!("{md}");
    Ok(())
}

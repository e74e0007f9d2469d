//! Batched-inference throughput of the tagger's model, vs the Python TorchScript peer.
//!
//! `cargo run --release -p streamoasis-benches --bin throughput -- --threads 2`
//! Writes `benches/results/throughput.json` and `.md`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use streamoasis_benches::{bert_flop_per_item, matmul_peak_gflops};
use streamoasis_tagger::batcher::{Backend, Batch, Batcher, BatcherConfig, Seq};
use streamoasis_tagger::model::{set_threads, TorchBackend};

#[derive(Parser)]
struct Args {
    /// Model folder.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model: PathBuf,
    /// Intra-op threads (both sides).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    seq_lens: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64")]
    batch_sizes: Vec<usize>,
    /// Seconds per point.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Python interpreter for the peer (the setup venv).
    #[arg(long, env = "SO_PY", default_value = "python3")]
    python: String,
    /// Skip the Python peer.
    #[arg(long)]
    no_peer: bool,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

fn synthetic(seq_len: usize, batch: usize, seed: u64) -> Batch {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let seqs: Vec<Seq> = (0..batch)
        .map(|_| {
            let mut ids = vec![101i64];
            for _ in 0..seq_len - 2 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ids.push(1996 + ((x >> 33) % 28000) as i64);
            }
            ids.push(102);
            Seq::new(ids)
        })
        .collect();
    Batch::pad(&seqs.iter().collect::<Vec<_>>())
}

fn time_backend(b: &mut TorchBackend, seq_len: usize, batch: usize, seconds: f64) -> f64 {
    let input = synthetic(seq_len, batch, 7);
    for _ in 0..3 {
        b.forward(&input).unwrap();
    }
    let start = Instant::now();
    let mut items = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        b.forward(&input).unwrap();
        items += batch;
    }
    items as f64 / start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    set_threads(a.threads);
    let peak = matmul_peak_gflops(3.0);
    eprintln!("fp32 matmul peak (libtorch, {} threads): {peak:.1} GFLOP/s", a.threads);

    // Direct backend on this thread (threads set above on this thread).
    let mut backend = TorchBackend::load(&a.model, tch::Device::Cpu, false, a.threads)?;
    let mut points = Vec::new();
    for &l in &a.seq_lens {
        for &bs in &a.batch_sizes {
            let ips = time_backend(&mut backend, l, bs, a.seconds);
            let gflop = bert_flop_per_item(l, 384, 1536, 6) / 1e9;
            eprintln!("rust  L={l:<4} B={bs:<3} {ips:>8.1} items/s  {:>5.1}% of peak", 100.0 * ips * gflop / peak);
            points.push(json!({"seq_len": l, "batch": bs, "items_per_s": ips, "model_gflop_per_item": gflop, "pct_of_peak": 100.0 * ips * gflop / peak}));
        }
    }
    drop(backend);

    // Through the dynamic batcher (many concurrent callers, one item each): the product path.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut via_batcher = Vec::new();
    for &l in &a.seq_lens {
        let ips = rt.block_on(async {
            let backend = TorchBackend::load(&a.model, tch::Device::Cpu, false, a.threads).unwrap();
            let b = Batcher::spawn(backend, BatcherConfig { max_batch_size: 32, max_batch_tokens: 32 * 256, max_wait: Duration::from_millis(10), queue_capacity: 1024 });
            let one = synthetic(l, 1, 9);
            let seq = Seq::new(one.input_ids.clone());
            // warm-up
            b.infer(vec![seq.clone(); 64]).await.unwrap();
            let n = ((a.seconds * 250.0) as usize).max(256);
            let start = Instant::now();
            let tasks: Vec<_> = (0..n).map(|_| {
                let b = b.clone();
                let s = seq.clone();
                tokio::spawn(async move { b.infer(vec![s]).await.unwrap() })
            }).collect();
            for t in tasks {
                t.await.unwrap();
            }
            n as f64 / start.elapsed().as_secs_f64()
        });
        let gflop = bert_flop_per_item(l, 384, 1536, 6) / 1e9;
        eprintln!("rust  L={l:<4} via batcher (32)  {ips:>8.1} items/s  {:>5.1}% of peak", 100.0 * ips * gflop / peak);
        via_batcher.push(json!({"seq_len": l, "items_per_s": ips, "pct_of_peak": 100.0 * ips * gflop / peak}));
    }

    let peer = if a.no_peer {
        serde_json::Value::Null
    } else {
        let out = a.out.join("throughput-python.json");
        let status = Command::new(&a.python)
            .args(["benches/python/torchscript_peer.py", "--model"])
            .arg(&a.model)
            .args(["--threads", &a.threads.to_string(), "--seconds", &a.seconds.to_string()])
            .args(["--seq-lens", &a.seq_lens.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")])
            .args(["--batch-sizes", &a.batch_sizes.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")])
            .arg("--out")
            .arg(&out)
            .status()?;
        anyhow::ensure!(status.success(), "python peer failed");
        serde_json::from_str(&std::fs::read_to_string(&out)?)?
    };

    let mut md = String::from("# Tagger throughput (all-MiniLM-L6-v2, fp32, CPU)\n\n");
    md += &format!("fp32 matmul peak measured in this run (libtorch from Rust): **{peak:.0} GFLOP/s**, {} threads.\n\n", a.threads);
    md += "| tokens | batch | Rust items/s | % of peak | Python items/s | Rust / Python |\n|---:|---:|---:|---:|---:|---:|\n";
    for p in &points {
        let (l, b, r) = (p["seq_len"].as_u64().unwrap(), p["batch"].as_u64().unwrap(), p["items_per_s"].as_f64().unwrap());
        let py = peer["points"].as_array().and_then(|ps| ps.iter().find(|q| q["seq_len"].as_u64() == Some(l) && q["batch"].as_u64() == Some(b))).and_then(|q| q["items_per_s"].as_f64());
        md += &format!(
            "| {l} | {b} | {r:.1} | {:.1}% | {} | {} |\n",
            p["pct_of_peak"].as_f64().unwrap(),
            py.map_or("-".into(), |v| format!("{v:.1}")),
            py.map_or("-".into(), |v| format!("{:.2}x", r / v))
        );
    }
    md += "\nThrough the dynamic batcher (concurrent single-item callers, max_batch_size 32):\n\n| tokens | items/s | % of peak |\n|---:|---:|---:|\n";
    for v in &via_batcher {
        md += &format!("| {} | {:.1} | {:.1}% |\n", v["seq_len"], v["items_per_s"].as_f64().unwrap(), v["pct_of_peak"].as_f64().unwrap());
    }
    if let Some(pp) = peer["peak_gflops"].as_f64() {
        md += &format!("\nPython peer's own matmul peak in the same run: {pp:.0} GFLOP/s (torch {}).\n", peer["torch_version"].as_str().unwrap_or("?"));
    }
    md += "\nReproduce: `./benches/run throughput` (writes this file).\n";
    let result = json!({"peak_gflops": peak, "threads": a.threads, "rust": points, "rust_via_batcher": via_batcher, "python": peer});
    std::fs::write(a.out.join("throughput.json"), serde_json::to_string_pretty(&result)?)?;
    std::fs::write(a.out.join("throughput.md"), &md)?;
    println!("{md}");
    Ok(())
}

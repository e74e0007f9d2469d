//! Batched-inference throughput of the tagger's model, vs the Python TorchScript peer.
//!
//! `cargo run --release -p streamoasis-benches --bin throughput -- --threads 2`
//! Writes `benches/results/throughput.json` and `.md`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use streamoasis_benches::{bert_flop_per_item, matmul_peak_gflops, synthetic};
use streamoasis_tagger::batcher::{Backend, Batcher, BatcherConfig, Seq};
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
    /// Interleaved rounds per point (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// `cpu` or `cuda:N` (a GPU run skips the Python peer; scripts/gpu-bench).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output file stem under --out.
    #[arg(long, default_value = "throughput")]
    name: String,
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

struct Peer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    info: serde_json::Value,
}

impl Peer {
    fn start(a: &Args) -> anyhow::Result<Peer> {
        use std::io::BufRead;
        let mut child = Command::new(&a.python)
            .args(["benches/python/torchscript_peer.py", "--serve", "--threads", &a.threads.to_string(), "--model"])
            .arg(&a.model)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let info = serde_json::from_str(&line)?;
        Ok(Peer { child, stdin, stdout, info })
    }
    fn ask(&mut self, req: &str) -> anyhow::Result<serde_json::Value> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{req}")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    set_threads(a.threads);
    let mut peer = if a.no_peer { None } else { Some(Peer::start(&a)?) };
    // Interleave every measurement with the peer's (A B A B A B) and keep medians: the machine
    // is shared, so only same-moment comparisons are meaningful.
    let rounds = a.rounds;
    let mut peaks = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        peaks.0.push(matmul_peak_gflops(1.0));
        if let Some(p) = peer.as_mut() {
            peaks.1.push(p.ask("peak 1.0")?["peak_gflops"].as_f64().unwrap());
        }
    }
    let peak = median(peaks.0.clone());
    let py_peak = if peaks.1.is_empty() { None } else { Some(median(peaks.1.clone())) };
    eprintln!("fp32 matmul peak ({} threads): libtorch from Rust {peak:.1} GFLOP/s, from Python {py_peak:?}", a.threads);

    let device = streamoasis_tagger::model::parse_device(&a.device)?;
    let mut backend = TorchBackend::load(&a.model, device, false, a.threads)?;
    let mut points = Vec::new();
    for &l in &a.seq_lens {
        for &bs in &a.batch_sizes {
            let (mut rs, mut ps) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                rs.push(time_backend(&mut backend, l, bs, a.seconds));
                if let Some(p) = peer.as_mut() {
                    ps.push(p.ask(&format!("{l} {bs} {}", a.seconds))?["items_per_s"].as_f64().unwrap());
                }
            }
            let ips = median(rs.clone());
            let py = if ps.is_empty() { None } else { Some(median(ps.clone())) };
            let gflop = bert_flop_per_item(l, 384, 1536, 6) / 1e9;
            eprintln!(
                "L={l:<4} B={bs:<3} rust {ips:>7.1}/s ({:>5.1}% of peak)  python {:>7.1}/s  ratio {:.2}x   rust {rs:.0?} python {ps:.0?}",
                100.0 * ips * gflop / peak,
                py.unwrap_or(f64::NAN),
                ips / py.unwrap_or(f64::NAN)
            );
            points.push(json!({"seq_len": l, "batch": bs, "items_per_s": ips, "python_items_per_s": py, "ratio": py.map(|p| ips / p),
                "rust_rounds": rs, "python_rounds": ps, "model_gflop_per_item": gflop, "pct_of_peak": 100.0 * ips * gflop / peak}));
        }
    }
    drop(backend);
    let peer_info = peer.as_ref().map(|p| p.info.clone());
    if let Some(mut p) = peer.take() {
        drop(p.stdin);
        let _ = p.child.wait();
    }

    // Through the dynamic batcher (many concurrent callers, one item each): the product path.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut via_batcher = Vec::new();
    for &l in &a.seq_lens {
        let ips = rt.block_on(async {
            let backend = TorchBackend::load(&a.model, device, false, a.threads).unwrap();
            let b = Batcher::spawn(backend, BatcherConfig { max_batch_size: 32, max_batch_tokens: 32 * 256, max_wait: Duration::from_millis(10), queue_capacity: 1024 });
            let one = synthetic(l, 1, 9);
            let seq = Seq::new(one.input_ids.clone());
            b.infer(vec![seq.clone(); 64]).await.unwrap();
            let n = ((a.seconds * 2.0 * 100.0) as usize).max(256);
            let start = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let b = b.clone();
                    let s = seq.clone();
                    tokio::spawn(async move { b.infer(vec![s]).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            n as f64 / start.elapsed().as_secs_f64()
        });
        let gflop = bert_flop_per_item(l, 384, 1536, 6) / 1e9;
        eprintln!("L={l:<4} via batcher (32)  {ips:>8.1} items/s  {:>5.1}% of peak", 100.0 * ips * gflop / peak);
        via_batcher.push(json!({"seq_len": l, "items_per_s": ips, "pct_of_peak": 100.0 * ips * gflop / peak}));
    }

    let mut md = String::from("# Tagger throughput (all-MiniLM-L6-v2, fp32, CPU)\n\n");
    md += &format!(
        "{} threads. Each point: {rounds} rounds of {}s, Rust and the Python TorchScript peer interleaved (same moments), medians. \
         fp32 matmul peak in this run: {peak:.0} GFLOP/s from Rust, {} from Python.\n\n",
        a.threads,
        a.seconds,
        py_peak.map_or("-".into(), |p| format!("{p:.0} GFLOP/s"))
    );
    md += "| tokens | batch | Rust items/s | % of peak | Python items/s | Rust / Python |\n|---:|---:|---:|---:|---:|---:|\n";
    for p in &points {
        let py = p["python_items_per_s"].as_f64();
        md += &format!(
            "| {} | {} | {:.1} | {:.1}% | {} | {} |\n",
            p["seq_len"],
            p["batch"],
            p["items_per_s"].as_f64().unwrap(),
            p["pct_of_peak"].as_f64().unwrap(),
            py.map_or("-".into(), |v| format!("{v:.1}")),
            p["ratio"].as_f64().map_or("-".into(), |v| format!("{v:.2}x"))
        );
    }
    md += "\nThrough the dynamic batcher (concurrent single-item callers, max_batch_size 32):\n\n| tokens | items/s | % of peak |\n|---:|---:|---:|\n";
    for v in &via_batcher {
        md += &format!("| {} | {:.1} | {:.1}% |\n", v["seq_len"], v["items_per_s"].as_f64().unwrap(), v["pct_of_peak"].as_f64().unwrap());
    }
    md += "\nReproduce: `./benches/run throughput`.\n";
    let result = json!({"device": a.device, "peak_gflops": peak, "python_peak_gflops": py_peak, "threads": a.threads, "rounds": rounds, "points": points, "rust_via_batcher": via_batcher, "python": peer_info});
    std::fs::write(a.out.join(format!("{}.json", a.name)), serde_json::to_string_pretty(&result)?)?;
    std::fs::write(a.out.join(format!("{}.md", a.name)), &md)?;
    println!("{md}");
    Ok(())
}

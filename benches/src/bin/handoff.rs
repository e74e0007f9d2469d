//! When the batcher forms a batch: once the model is free (`Handoff::WhenFree`, the default) or
//! ahead, while the model runs the current one (`Handoff::Ahead`, the previous behaviour).
//! Same run, alternating rounds (A B A B …), with the real model: single-window items of
//! 40–100 tokens arriving as a Poisson stream at a share of the measured capacity; latency from
//! `infer` called to result, per item.
//!
//! `cargo run --release -p streamoasis-benches --bin handoff -- --loads 10,50 --seconds 20 --rounds 2`
//! Writes `benches/results/handoff.json`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use streamoasis_tagger::batcher::{Batcher, BatcherConfig, Handoff, Seq};
use streamoasis_tagger::model::TorchBackend;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model: PathBuf,
    #[arg(long, default_value = "model.pt")]
    file: String,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Percent of the measured capacity.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    loads: Vec<f64>,
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Items/s at 100% (0 = measure with a burst).
    #[arg(long, default_value_t = 0.0)]
    capacity: f64,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

fn cfg() -> BatcherConfig {
    BatcherConfig { max_batch_size: 32, max_batch_tokens: 2048, max_wait: Duration::ZERO, queue_capacity: 1024 }
}

/// A deterministic pseudo-random stream (xorshift), so both modes see the same items and gaps.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn item(r: &mut Rng) -> Seq {
    let len = 40 + (r.next() * 60.0) as usize;
    Seq::new(
        (0..len)
            .map(|i| {
                if i == 0 {
                    101
                } else if i + 1 == len {
                    102
                } else {
                    1000 + (r.next() * 20000.0) as i64
                }
            })
            .collect(),
    )
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((q / 100.0) * (v.len() - 1) as f64).round() as usize]
}

async fn burst(b: &Batcher, n: usize) -> f64 {
    let mut r = Rng(7);
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (b, s) = (b.clone(), item(&mut r));
            tokio::spawn(async move { b.infer(vec![s]).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

async fn stream(b: &Batcher, rate: f64, seconds: f64, seed: u64) -> Vec<f64> {
    let mut r = Rng(seed);
    let lat = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut due = 0.0;
    let mut tasks = Vec::new();
    while due < seconds {
        due += -(1.0 - r.next()).ln() / rate;
        tokio::time::sleep_until((start + Duration::from_secs_f64(due)).into()).await;
        let (b, s, lat) = (b.clone(), item(&mut r), lat.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            b.infer(vec![s]).await.unwrap();
            lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1e3);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = lat.lock().unwrap().clone();
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let load = || TorchBackend::load_file(&a.model, &a.file, tch::Device::Cpu, false, a.threads);
    let modes = [("when_free", Handoff::WhenFree), ("ahead", Handoff::Ahead)];
    let batchers: Vec<Batcher> = modes.iter().map(|&(_, h)| Ok::<_, anyhow::Error>(Batcher::spawn_with(load()?, cfg(), h))).collect::<Result<_, _>>()?;
    // Warm both, then capacity from the first.
    for b in &batchers {
        burst(b, 256).await;
    }
    let cap = if a.capacity > 0.0 { a.capacity } else { burst(&batchers[0], 1000).await };
    eprintln!("capacity {cap:.1} items/s");
    let mut rows = Vec::new();
    for &load in &a.loads {
        let mut all: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
        for round in 0..a.rounds {
            for (i, b) in batchers.iter().enumerate() {
                let mut l = stream(b, cap * load / 100.0, a.seconds, 1 + round as u64).await;
                eprintln!("{load}% round {round} {}: p50 {:.1} p99 {:.1} ms ({} items)", modes[i].0, pct(&mut l, 50.0), pct(&mut l, 99.0), l.len());
                all[i].extend(l);
            }
        }
        for (i, l) in all.iter_mut().enumerate() {
            rows.push(json!({"load_pct": load, "handoff": modes[i].0, "items": l.len(), "p50_ms": pct(l, 50.0), "p95_ms": pct(l, 95.0), "p99_ms": pct(l, 99.0), "mean_ms": l.iter().sum::<f64>() / l.len() as f64}));
        }
    }
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let out =
        json!({"capacity_per_s": cap, "threads": a.threads, "seconds": a.seconds, "rounds": a.rounds, "model_file": a.file, "load_avg_at_end": load_avg.trim(), "rows": rows});
    println!("{}", serde_json::to_string_pretty(&out)?);
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("handoff.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}

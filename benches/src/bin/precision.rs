//! Precision candidates side by side in one run: items/s at 64 and 256 tokens over batch sizes
//! (interleaved round by round: A B C … A B C …, medians), with the fp32 matmul peak measured
//! in the same run; the batch-company drift of each through the tagger (the path users run);
//! load time and memory of each (a fresh child process per candidate).
//!
//! `cargo run --release -p streamoasis-benches --bin precision -- --threads 2 --data ~/.cache/streamoasis/data/bbc-news.jsonl`
//!
//! Candidates: every precision the export's manifest offers (`fp32`, `int8`, `int8_static`,
//! `bf16`), plus the bench-only modules of `--extra DIR` (a folder written by
//! `scripts/python/quantize.py candidates`, its `manifest.json` mapping names to files).
//!
//! Drift (`--data`, BBC JSONL): `--drift-items` articles (every k-th) are tagged as
//! `title + description` items of kind `ARTICLE` with topology.yaml's tagging section (one
//! window, adaptive compute off), first each alone (a batch of one), then the same items in
//! random groups of 8 and of 32 submitted together (the batcher closes a batch when it is full
//! or after `--drift-wait`, so each group is one forward pass). An item's drift is the largest
//! change of any label score between alone and in company; the label vectors are the same
//! in all three passes (one tagger).
//!
//! Writes `benches/results/<name>.{json,md}` (default `precision-candidates`). `--smoke` runs every path for
//! a fraction of a second (what `scripts/test` calls so the binary cannot rot) and writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use streamoasis_benches::{bert_flop_per_item, matmul_peak_gflops, synthetic};
use streamoasis_pipeline::events::MediaKind;
use streamoasis_pipeline::topology::Topology;
use streamoasis_tagger::batcher::{Backend, Batch};
use streamoasis_tagger::config::Precision;
use streamoasis_tagger::model::{parse_device, read_manifest, set_threads, TorchBackend};
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model: PathBuf,
    /// Folder of bench-only candidates (`quantize.py candidates --out DIR`); skipped when absent.
    #[arg(long)]
    extra: Option<PathBuf>,
    /// Only these candidates (names), in this order.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Also measure these candidates unbatched, as `<name>_unbatched`: the tagger with
    /// `max_batch_size: 1`, so every sequence runs alone (no batch company: dynamic int8's
    /// per-batch activation scale then depends on the item only). Their speed at every point
    /// is their batch-1 rate, timed in the same rounds.
    #[arg(long, value_delimiter = ',', default_value = "int8")]
    unbatched: Vec<String>,
    /// Also measure the fp32 module cast to half precision on the device (GPU runs).
    #[arg(long)]
    fp16_cast: bool,
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
    /// BBC JSONL for the drift measurement (none: no drift).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    #[arg(long, default_value_t = 500)]
    drift_items: usize,
    /// How long the batcher waits for a group to arrive before closing the batch.
    #[arg(long, default_value_t = 50)]
    drift_wait_ms: u64,
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Output file stem under --out.
    #[arg(long, default_value = "precision-candidates")]
    name: String,
    /// A seconds-long check of every path; writes nothing.
    #[arg(long)]
    smoke: bool,
    /// Internal: load one module in this (fresh) process and print load time and memory as JSON.
    #[arg(long, hide = true)]
    probe_load: Option<PathBuf>,
}

/// One module file measured under a name.
#[derive(Debug, Clone)]
struct Candidate {
    name: String,
    file: PathBuf,
    /// Cast to half on the device after loading (GPU fp16).
    half: bool,
    /// The tagger's `max_batch_size` for this candidate (None: batches as the bench forms them).
    max_batch: Option<usize>,
}

#[derive(Deserialize)]
struct ExtraManifest {
    candidates: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Article {
    title: String,
    #[serde(default)]
    description: Option<String>,
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

/// Quantile `q` (0..1) of values (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

fn vm_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Child mode: RSS before, load the module, one forward of 8 × 64 tokens, RSS after.
fn probe_load(a: &Args, file: &Path) -> anyhow::Result<()> {
    set_threads(a.threads);
    let device = parse_device(&a.device)?;
    let _guard = tch::no_grad_guard();
    // libtorch is linked and initialised before the baseline (a tensor op), so the delta is the model.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)).sum(tch::Kind::Float);
    let before = vm_kib("VmRSS:").unwrap_or(0);
    let start = Instant::now();
    let dir = file.parent().unwrap_or(Path::new("."));
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut backend = TorchBackend::load_file(dir, name, device, false, a.threads)?;
    let load_s = start.elapsed().as_secs_f64();
    let first = Instant::now();
    backend.forward(&synthetic(64, 8, 3)).map_err(anyhow::Error::msg)?;
    let first_s = first.elapsed().as_secs_f64();
    let after = vm_kib("VmRSS:").unwrap_or(0);
    let hwm = vm_kib("VmHWM:").unwrap_or(0);
    let size = std::fs::metadata(file)?.len();
    println!(
        "{}",
        json!({"load_s": load_s, "first_forward_s": first_s, "rss_before_mib": before as f64 / 1024.0, "rss_after_mib": after as f64 / 1024.0,
               "rss_delta_mib": (after as f64 - before as f64) / 1024.0, "rss_peak_mib": hwm as f64 / 1024.0, "file_mib": size as f64 / 1048576.0})
    );
    Ok(())
}

fn candidates(a: &Args) -> anyhow::Result<Vec<Candidate>> {
    let manifest = read_manifest(&a.model)?;
    let mut out = Vec::new();
    for p in Precision::ALL {
        if p != Precision::Fp32 && !manifest.precisions.contains_key(p.key()) {
            continue;
        }
        if p.cpu_only() && a.device != "cpu" {
            continue;
        }
        let file = a.model.join(manifest.module_file(&a.model, p)?);
        out.push(Candidate { name: p.key().into(), file, half: false, max_batch: None });
    }
    if let Some(dir) = a.extra.as_ref().filter(|d| d.join("manifest.json").is_file()) {
        let m: ExtraManifest = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
        for (name, file) in m.candidates {
            out.push(Candidate { name, file: dir.join(file), half: false, max_batch: None });
        }
    }
    if a.fp16_cast {
        out.push(Candidate { name: "fp16".into(), file: a.model.join("model.pt"), half: true, max_batch: None });
    }
    let unbatched: Vec<Candidate> = a
        .unbatched
        .iter()
        .filter_map(|n| out.iter().find(|c| &c.name == n))
        .map(|c| Candidate { name: format!("{}_unbatched", c.name), max_batch: Some(1), ..c.clone() })
        .collect();
    out.extend(unbatched);
    if !a.only.is_empty() {
        let pick: Vec<Candidate> = a.only.iter().filter_map(|n| out.iter().find(|c| &c.name == n).cloned()).collect();
        anyhow::ensure!(pick.len() == a.only.len(), "--only {:?}: offered are {:?}", a.only, out.iter().map(|c| &c.name).collect::<Vec<_>>());
        out = pick;
    }
    Ok(out)
}

fn load(c: &Candidate, a: &Args) -> anyhow::Result<TorchBackend> {
    let device = parse_device(&a.device)?;
    let dir = c.file.parent().unwrap_or(Path::new("."));
    let name = c.file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut b = TorchBackend::load_file(dir, name, device, false, a.threads)?;
    if c.half {
        b.cast(device, tch::Kind::Half);
    }
    Ok(b)
}

/// A model folder whose fp32 module is the candidate's file (links to the tokenizer), so the
/// tagger loads exactly that module through its own path.
fn candidate_folder(a: &Args, c: &Candidate, root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join(&c.name);
    std::fs::create_dir_all(&dir)?;
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.model.join("manifest.json"))?)?;
    let abs = std::fs::canonicalize(&c.file)?;
    m["precisions"] = json!({"fp32": abs});
    std::fs::write(dir.join("manifest.json"), serde_json::to_string(&m)?)?;
    let tok = std::fs::canonicalize(a.model.join("tokenizer.json"))?;
    let link = dir.join("tokenizer.json");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(tok, link)?;
    Ok(dir)
}

/// Per item: max over labels of |score alone - score in company|, for groups of 8 and of 32.
async fn drift(a: &Args, c: &Candidate, items: &[TagRequest], tmp: &Path) -> anyhow::Result<serde_json::Value> {
    let mut topo = Topology::load(&a.topology)?;
    let dir = candidate_folder(a, c, tmp)?;
    let over: serde_yaml::Value = serde_yaml::from_str(&format!(
        "{{model: {{path: '{}', precision: fp32, threads: {}, device: '{}'}}, text: {{max_tokens_per_item: 254, adaptive_margin: 0}}, batching: {{max_batch_size: {}, max_batch_tokens: 16384, max_wait: {}ms, queue_capacity: 1024}}}}",
        dir.display(),
        a.threads,
        a.device,
        c.max_batch.unwrap_or(32),
        a.drift_wait_ms
    ))?;
    merge(&mut topo.file.tagging, &over);
    let cfg = TaggerConfig::from_topology(&topo)?;
    let tagger = Arc::new(Tagger::load(cfg).await?);
    let scores = |r: streamoasis_tagger::TagResult| -> HashMap<String, f32> { r.scores.into_iter().map(|t| (t.label, t.score)).collect() };
    let start = Instant::now();
    let mut alone = Vec::with_capacity(items.len());
    for it in items {
        alone.push(scores(tagger.tag(it).await?));
    }
    let alone_s = start.elapsed().as_secs_f64();
    let mut per_size = serde_json::Map::new();
    let mut worst_all = vec![0f64; items.len()];
    for (size, seed) in [(8usize, 8u64), (32, 32)] {
        // A fixed pseudo-random permutation, cut into groups of `size`.
        let mut order: Vec<usize> = (0..items.len()).collect();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for i in (1..order.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut worst = vec![0f64; items.len()];
        for group in order.chunks(size) {
            if group.len() < size {
                // The tail would be a smaller batch: fill it with items from the start.
                let mut g: Vec<usize> = group.to_vec();
                g.extend(order.iter().take(size - group.len()));
                run_group(&tagger, items, &g, &alone, &mut worst, &scores).await?;
            } else {
                run_group(&tagger, items, group, &alone, &mut worst, &scores).await?;
            }
        }
        for (w, x) in worst_all.iter_mut().zip(&worst) {
            *w = w.max(*x);
        }
        per_size.insert(
            format!("batch_{size}"),
            json!({"max": quantile(&worst, 1.0), "p99": quantile(&worst, 0.99), "median": quantile(&worst, 0.5), "mean": worst.iter().sum::<f64>() / worst.len() as f64}),
        );
    }
    Ok(json!({"items": items.len(), "max": quantile(&worst_all, 1.0), "p99": quantile(&worst_all, 0.99), "median": quantile(&worst_all, 0.5),
              "items_over_0_002": worst_all.iter().filter(|&&w| w > 0.002).count(), "by_batch": per_size, "alone_pass_s": alone_s}))
}

async fn run_group(
    tagger: &Arc<Tagger>,
    items: &[TagRequest],
    group: &[usize],
    alone: &[HashMap<String, f32>],
    worst: &mut [f64],
    scores: &impl Fn(streamoasis_tagger::TagResult) -> HashMap<String, f32>,
) -> anyhow::Result<()> {
    let results = futures::future::join_all(group.iter().map(|&i| {
        let t = tagger.clone();
        let req = items[i].clone();
        tokio::spawn(async move { t.tag(&req).await })
    }))
    .await;
    for (&i, r) in group.iter().zip(results) {
        let got = scores(r??);
        let d = alone[i].iter().map(|(l, s)| (got.get(l).copied().unwrap_or(f32::NAN) - s).abs() as f64).fold(0.0, f64::max);
        worst[i] = worst[i].max(d);
    }
    Ok(())
}

fn merge(base: &mut serde_yaml::Value, over: &serde_yaml::Value) {
    if let (Some(b), Some(o)) = (base.as_mapping_mut(), over.as_mapping()) {
        for (k, v) in o {
            match b.get_mut(k) {
                Some(bv) if bv.is_mapping() && v.is_mapping() => merge(bv, v),
                _ => {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

fn probe_in_child(a: &Args, c: &Candidate) -> serde_json::Value {
    if c.half {
        return json!(null);
    }
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe).args(["--probe-load", &c.file.display().to_string(), "--threads", &a.threads.to_string(), "--device", &a.device]).output();
    match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or(json!(null)),
        Ok(o) => json!({"error": String::from_utf8_lossy(&o.stderr).trim().to_string()}),
        Err(e) => json!({"error": e.to_string()}),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut a = Args::parse();
    if let Some(file) = a.probe_load.clone() {
        return probe_load(&a, &file);
    }
    if a.smoke {
        (a.seconds, a.rounds, a.seq_lens, a.batch_sizes, a.drift_items) = (0.05, 1, vec![16], vec![2], 40);
    }
    set_threads(a.threads);
    let _guard = tch::no_grad_guard();
    let cands = candidates(&a)?;
    anyhow::ensure!(!cands.is_empty() && cands[0].name == "fp32", "fp32 must be the first candidate (the reference)");
    eprintln!("candidates: {:?}", cands.iter().map(|c| (&c.name, &c.file)).collect::<Vec<_>>());

    // Load time and memory: one fresh process per candidate.
    let mut loads = serde_json::Map::new();
    for c in &cands {
        let v = probe_in_child(&a, c);
        eprintln!("{}: load {v}", c.name);
        loads.insert(c.name.clone(), v);
    }

    // Same inputs give nearly the same embeddings.
    let mut backends: Vec<TorchBackend> = cands.iter().map(|c| load(c, &a)).collect::<anyhow::Result<_>>()?;
    let probe = synthetic(32, 4, 7);
    let reference = backends[0].forward(&probe).map_err(anyhow::Error::msg)?;
    let mut cosines = serde_json::Map::new();
    for (c, b) in cands.iter().zip(backends.iter_mut()) {
        let y = b.forward(&probe).map_err(anyhow::Error::msg)?;
        let cos: f64 = reference.iter().zip(&y).map(|(p, q)| p.iter().zip(q).map(|(u, v)| (u * v) as f64).sum::<f64>()).sum::<f64>() / y.len() as f64;
        eprintln!("{}: mean cosine to fp32 on random input {cos:.4}", c.name);
        cosines.insert(c.name.clone(), json!(cos));
    }
    let peak = if a.device == "cpu" { matmul_peak_gflops(if a.smoke { 0.05 } else { 1.5 }) } else { f64::NAN };

    // Speed, interleaved round by round.
    let mut speed = Vec::new();
    for &len in &a.seq_lens {
        for &bs in &a.batch_sizes {
            let input = synthetic(len, bs, 7);
            let single = synthetic(len, 1, 7);
            let mut rates = vec![Vec::new(); cands.len()];
            for _ in 0..a.rounds {
                for (k, b) in backends.iter_mut().enumerate() {
                    // An unbatched candidate runs the same items one sequence at a time.
                    let x = if cands[k].max_batch == Some(1) { &single } else { &input };
                    rates[k].push(items_per_s(b, x, a.seconds));
                }
            }
            let meds: Vec<f64> = rates.into_iter().map(median).collect();
            let line: Vec<String> = cands.iter().zip(&meds).map(|(c, m)| format!("{} {m:.1}", c.name)).collect();
            eprintln!("{len} tokens, batch {bs}: {}", line.join(", "));
            let per: serde_json::Map<String, serde_json::Value> = cands.iter().zip(&meds).map(|(c, m)| (c.name.clone(), json!(m))).collect();
            let share = meds[0] * bert_flop_per_item(len, 384, 1536, 6) / 1e9 / peak;
            speed.push(json!({"tokens": len, "batch": bs, "items_per_s": per, "fp32_share_of_peak": if share.is_finite() { json!(share) } else { json!(null) }}));
        }
    }
    drop(backends);

    // Batch-company drift through the tagger.
    let mut drifts = serde_json::Map::new();
    if let Some(data) = &a.data {
        let text = std::fs::read_to_string(data)?;
        let all: Vec<Article> = text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
        let step = (all.len() / a.drift_items.max(1)).max(1);
        let items: Vec<TagRequest> = all
            .iter()
            .step_by(step)
            .take(a.drift_items)
            .map(|r| TagRequest { title: r.title.clone(), description: r.description.clone(), kind: MediaKind::Article, ..Default::default() })
            .collect();
        let tmp = std::env::temp_dir().join(format!("precision-drift-{}", std::process::id()));
        for c in cands.iter().filter(|c| !c.half) {
            let d = drift(&a, c, &items, &tmp).await?;
            eprintln!("{}: drift {d}", c.name);
            drifts.insert(c.name.clone(), d);
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    if a.smoke {
        println!("precision smoke ok ({} candidates, {} speed points, {} drift sets)", cands.len(), speed.len(), drifts.len());
        return Ok(());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let names: Vec<&str> = cands.iter().map(|c| c.name.as_str()).collect();
    let mut md = format!(
        "\n## Precision candidates (`{}`, {}), {} threads, interleaved {} rounds of {} s, medians\n\nfp32 matmul peak in this run: {peak:.0} GFLOP/s\n\n| tokens | batch | {} |\n|---:|---:|{}\n",
        a.model.display(),
        a.device,
        a.threads,
        a.rounds,
        a.seconds,
        names.iter().map(|n| format!("{n} items/s")).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(names.len())
    );
    for row in &speed {
        let cells: Vec<String> = names.iter().map(|n| format!("{:.1}", row["items_per_s"][*n].as_f64().unwrap_or(f64::NAN))).collect();
        md += &format!("| {} | {} | {} |\n", row["tokens"], row["batch"], cells.join(" | "));
    }
    md += "\n| candidate | cosine to fp32 | drift max | drift p99 | items > 0.002 | load s | RSS delta MiB | file MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for n in &names {
        let d = drifts.get(*n).cloned().unwrap_or(json!({}));
        let l = loads.get(*n).cloned().unwrap_or(json!({}));
        let f = |v: &serde_json::Value, p: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.p$}"));
        md += &format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} |\n",
            f(&cosines[*n], 4),
            f(&d["max"], 5),
            f(&d["p99"], 5),
            d["items_over_0_002"].as_u64().map_or("–".into(), |x| x.to_string()),
            f(&l["load_s"], 2),
            f(&l["rss_delta_mib"], 0),
            f(&l["file_mib"], 0)
        );
    }
    md += &format!("\nload average at the end: {}\n", load.trim());
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join(format!("{}.json", a.name)),
        serde_json::to_string_pretty(&json!({"device": a.device, "threads": a.threads, "matmul_peak_gflops": if peak.is_finite() { json!(peak) } else { json!(null) },
            "rounds": a.rounds, "seconds": a.seconds, "candidates": cands.iter().map(|c| json!({"name": c.name, "file": c.file, "half": c.half, "max_batch_size": c.max_batch})).collect::<Vec<_>>(),
            "cosine_to_fp32": cosines, "speed": speed, "drift": drifts, "load": loads, "drift_wait_ms": a.drift_wait_ms, "load_avg_at_end": load.trim()}))?,
    )?;
    std::fs::write(a.out.join(format!("{}.md", a.name)), &md)?;
    println!("{md}");
    Ok(())
}

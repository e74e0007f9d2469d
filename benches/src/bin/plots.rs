//! PNG plots of the benchmark results (`benches/results/*.json` → `benches/results/plots/*.png`),
//! embedded in BENCHMARKS.md by `./benches/run report`. A plot whose results file is missing is
//! skipped with a line saying so.
//!
//!   plots [--results benches/results] [--font /path/to/font.ttf]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Results directory (the plots go to its `plots/` folder).
    #[arg(long, default_value = "benches/results")]
    results: PathBuf,
    /// A TrueType font for the labels (default: DejaVu Sans or Liberation Sans from the system).
    #[arg(long, env = "PLOT_FONT")]
    font: Option<PathBuf>,
}

const FONTS: &[&str] =
    &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"];

const SIZE: (u32, u32) = (900, 560);
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(227, 119, 194),
];

fn main() -> Result<()> {
    let args = Args::parse();
    let font = match &args.font {
        Some(f) => f.clone(),
        None => FONTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no TrueType font found: install fonts-dejavu-core (apt-get install fonts-dejavu-core) or pass --font FILE.ttf")?,
    };
    let bytes: &'static [u8] = Box::leak(std::fs::read(&font).with_context(|| format!("reading {}", font.display()))?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", font.display()))?;
    let out = args.results.join("plots");
    std::fs::create_dir_all(&out)?;
    type Plot = fn(&Value, &Path) -> Result<()>;
    let plots: [(&str, Plot); 11] = [
        ("precision", precision),
        ("retag", retag),
        ("precision-candidates", candidates),
        ("throughput", throughput),
        ("windows", windows),
        ("e2e-sweep", sweep),
        ("e2e-sweep-int8", sweep),
        ("e2e-sweep-fp32", sweep),
        ("e2e-sweep-accounting", sweep),
        ("e2e-sweep-pinned", sweep),
        ("e2e-sweep-int8-unbatched", sweep),
    ];
    for (name, plot) in plots {
        let file = args.results.join(format!("{name}.json"));
        let Ok(text) = std::fs::read_to_string(&file) else {
            println!("skip {name}: no {}", file.display());
            continue;
        };
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let png = out.join(format!("{name}.png"));
        plot(&v, &png).with_context(|| format!("plotting {}", png.display()))?;
        println!("wrote {}", png.display());
    }
    Ok(())
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

type Series = (String, Vec<(f64, f64)>);

/// Each series as a line with dots, and the legend in the upper left.
fn draw_lines<'a, X, Y>(chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>, series: &[Series]) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 15)).position(SeriesLabelPosition::UpperLeft).draw()?;
    Ok(())
}

/// Lines on a log2 x axis (batch size) against a linear y axis.
fn lines_log_x(png: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let x_max = xs.fold(1.0f64, f64::max) * 1.5;
    let y_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(0.0f64, f64::max) * 1.15;
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((0.8f64..x_max).log_scale().base(2.0), 0.0..y_max.max(1e-9))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).x_label_formatter(&|x| format!("{x:.0}")).label_style(("sans-serif", 15)).draw()?;
    draw_lines(&mut chart, series)?;
    root.present()?;
    Ok(())
}

/// fp32 and int8 items/s against batch size, per sequence length (`./benches/run precision`).
fn precision(v: &Value, png: &Path) -> Result<()> {
    let rows = v["rows"].as_array().context("precision.json has no rows")?;
    let mut series: Vec<Series> = Vec::new();
    let mut lens: Vec<i64> = rows.iter().filter_map(|r| r["tokens"].as_i64()).collect();
    lens.sort_unstable();
    lens.dedup();
    for len in lens {
        for (prec, key) in [("fp32", "fp32_items_per_s"), ("int8", "int8_items_per_s")] {
            let pts = rows.iter().filter(|r| r["tokens"].as_i64() == Some(len)).filter_map(|r| Some((f(r, "batch")?, f(r, key)?))).collect();
            series.push((format!("{prec}, {len} tokens"), pts));
        }
    }
    lines_log_x(png, "Tagger backend: items/s vs batch size, fp32 and int8", "batch size", "items/s", &series)
}

/// Speed against batch-company drift, one point per precision candidate and batch size at 64
/// tokens (`./benches/run precision`, `precision-candidates.json`). Drift 0 is drawn at 1e-7.
fn candidates(v: &Value, png: &Path) -> Result<()> {
    let speed = v["speed"].as_array().context("precision-candidates.json has no speed rows")?;
    let names: Vec<String> = v["candidates"].as_array().context("no candidates")?.iter().filter_map(|c| c["name"].as_str().map(str::to_string)).collect();
    let fp32 =
        |tokens: i64, batch: i64| speed.iter().find(|r| r["tokens"].as_i64() == Some(tokens) && r["batch"].as_i64() == Some(batch)).and_then(|r| r["items_per_s"]["fp32"].as_f64());
    // Items/s through the tagger on the accuracy sets (`precision-accuracy.json` beside it, same
    // session), as a ratio to fp32: drawn as a hollow marker beside the kernel-only one.
    let acc: Option<Value> =
        png.parent().and_then(Path::parent).and_then(|d| std::fs::read_to_string(d.join("precision-accuracy.json")).ok()).and_then(|t| serde_json::from_str(&t).ok());
    let tagger_ratio = |name: &str| -> Option<f64> {
        let rows = acc.as_ref()?["results"].as_array()?;
        let row = |n: &str| rows.iter().find(|r| r["configuration"].as_str().is_some_and(|c| if n == "fp32" { c.starts_with("default") } else { c == n }));
        let (a, b) = (row(name)?, row("fp32")?);
        let rs: Vec<f64> = ["full_items_per_s", "titles_items_per_s", "tmdb_items_per_s"].iter().filter_map(|k| Some(a[*k].as_f64()? / b[*k].as_f64()?)).collect();
        (!rs.is_empty()).then(|| (rs.iter().map(|r| r.ln()).sum::<f64>() / rs.len() as f64).exp())
    };
    let mut pts: Vec<(String, f64, f64)> = Vec::new();
    for n in &names {
        let Some(d) = v["drift"][n.as_str()]["max"].as_f64() else { continue };
        // Geometric mean of the speed-ups over every (tokens, batch) point of the run.
        let ratios: Vec<f64> = speed.iter().filter_map(|r| Some(r["items_per_s"][n.as_str()].as_f64()? / fp32(r["tokens"].as_i64()?, r["batch"].as_i64()?)?)).collect();
        if ratios.is_empty() {
            continue;
        }
        let g = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        pts.push((n.clone(), d.max(1e-7), g));
    }
    anyhow::ensure!(!pts.is_empty(), "no candidate has both drift and speed");
    let y_max = pts.iter().map(|p| p.2.max(tagger_ratio(&p.0).unwrap_or(0.0))).fold(1.0f64, f64::max) * 1.2;
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Precision candidates: speed-up over fp32 vs batch-company drift", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((1e-7f64..1.0).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("largest score change with batch company (BBC items, log; 0 drawn at 1e-7)")
        .y_desc("items/s / fp32 (geometric mean; filled: kernels, ring: through the tagger)")
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .draw_series(LineSeries::new([(0.002, 0.0), (0.002, y_max)], BLACK.mix(0.5)))?
        .label("drift bound 0.002")
        .legend(|(px, py)| PathElement::new([(px, py), (px + 16, py)], BLACK.mix(0.5)));
    for (i, (name, x, y)) in pts.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart.draw_series(std::iter::once(Circle::new((*x, *y), 7, c.filled())))?.label(name.as_str()).legend(move |(px, py)| Circle::new((px + 8, py), 5, c.filled()));
        if let Some(t) = tagger_ratio(name) {
            chart.draw_series(std::iter::once(Circle::new((*x, t), 9, c.stroke_width(2))))?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 13)).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present()?;
    Ok(())
}

/// Rust vs the Python TorchScript peer, items/s against batch size (`./benches/run throughput`).
fn throughput(v: &Value, png: &Path) -> Result<()> {
    let pts = v["points"].as_array().context("throughput.json has no points")?;
    let mut lens: Vec<i64> = pts.iter().filter_map(|r| r["seq_len"].as_i64()).collect();
    lens.sort_unstable();
    lens.dedup();
    let mut series: Vec<Series> = Vec::new();
    for len in lens {
        let of = |key: &str| pts.iter().filter(|r| r["seq_len"].as_i64() == Some(len)).filter_map(|r| Some((f(r, "batch")?, f(r, key)?))).collect::<Vec<_>>();
        series.push((format!("Rust (tch), {len} tokens"), of("items_per_s")));
        let py = of("python_items_per_s");
        if !py.is_empty() {
            series.push((format!("Python TorchScript, {len} tokens"), py));
        }
    }
    lines_log_x(png, "fp32 items/s vs batch size: Rust vs the Python peer", "batch size", "items/s", &series)
}

/// Accuracy against items/s, one point per windowing configuration (`./benches/run windows`).
fn windows(v: &Value, png: &Path) -> Result<()> {
    let rows = v["results"].as_array().context("windows.json has no results")?;
    let pts: Vec<(String, f64, f64)> = rows.iter().filter_map(|r| Some((r["configuration"].as_str()?.to_string(), f(r, "full_items_per_s")?, f(r, "full_text")?))).collect();
    anyhow::ensure!(!pts.is_empty(), "no configuration has full-text results");
    let x_max = pts.iter().map(|p| p.1).fold(0.0, f64::max) * 1.25;
    let (y_lo, y_hi) = pts.iter().fold((100.0f64, 0.0f64), |(lo, hi), p| (lo.min(p.2), hi.max(p.2)));
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("BBC full text: accuracy vs items/s per windowing choice", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (y_lo - 1.5).max(0.0)..(y_hi + 1.0).min(100.5))?;
    chart.configure_mesh().x_desc("items/s (same run)").y_desc("top-1 accuracy, %").label_style(("sans-serif", 15)).draw()?;
    for (i, (name, x, y)) in pts.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart.draw_series(std::iter::once(Circle::new((*x, *y), 6, c.filled())))?.label(name.as_str()).legend(move |(px, py)| Circle::new((px + 8, py), 5, c.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).label_font(("sans-serif", 13)).position(SeriesLabelPosition::LowerRight).draw()?;
    root.present()?;
    Ok(())
}

/// Items/s of each way to tag stored items again, log scale (`./benches/run retag`): a taxonomy
/// change through the model vs from stored embeddings (retag.json), and a cold pass vs a
/// re-ingest of unchanged items (reingest.json beside it, when present).
fn retag(v: &Value, png: &Path) -> Result<()> {
    let mut bars: Vec<(String, f64)> = vec![
        ("retag: model".into(), f(v, "model_retag_items_per_s").context("retag.json: no model_retag_items_per_s")?),
        ("retag: stored embeddings".into(), f(v, "from_embeddings_items_per_s").context("retag.json: no from_embeddings_items_per_s")?),
    ];
    let sibling = png.parent().and_then(Path::parent).map(|d| d.join("reingest.json"));
    if let Some(r) = sibling.and_then(|p| std::fs::read_to_string(p).ok()).and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
        if let (Some(cold), Some(again)) = (f(&r, "cold_items_per_s"), f(&r, "reingest_items_per_s")) {
            bars.push(("ingest: cold pass".into(), cold));
            bars.push(("ingest: again, unchanged".into(), again));
        }
    }
    let y_max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 3.0;
    let y_min = bars.iter().map(|b| b.1).fold(f64::MAX, f64::min).max(0.1) / 3.0;
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption("Tagging stored items again: items/s (log scale, same run per pair)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..(bars.len() as f64 - 0.5), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| names.get(x.round() as usize).filter(|_| (x - x.round()).abs() < 0.01).cloned().unwrap_or_default())
        .y_desc("items/s")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (_, rate)) in bars.iter().enumerate() {
        let c = COLORS[(i / 2) % COLORS.len()];
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(x - 0.3, y_min), (x + 0.3, *rate)], c.mix(if i % 2 == 0 { 0.45 } else { 0.9 }).filled())))?;
        chart.draw_series(std::iter::once(Text::new(format!("{rate:.0}"), (x - 0.1, rate * 1.25), ("sans-serif", 16))))?;
    }
    root.present()?;
    Ok(())
}

/// Latency percentiles against achieved throughput, one point per offered load (`./benches/run sweep`).
fn sweep(v: &Value, png: &Path) -> Result<()> {
    let steps: Vec<&Value> = v["steps"].as_array().context("e2e-sweep.json has no steps")?.iter().filter(|s| s["load"].as_str().is_some_and(|l| l.ends_with('%'))).collect();
    anyhow::ensure!(!steps.is_empty(), "no load steps");
    let mut series: Vec<Series> = Vec::new();
    for (name, key) in [("p50", "tags_p50_ms"), ("p95", "tags_p95_ms"), ("p99", "tags_p99_ms")] {
        series.push((format!("{name}, ingest to tags topic"), steps.iter().filter_map(|s| Some((f(s, "achieved_per_s")?, f(s, key)?))).collect()));
    }
    series.push(("p99, ingest to row (histogram)".into(), steps.iter().filter_map(|s| Some((f(s, "achieved_per_s")?, f(s, "row_p99_ms")?))).collect()));
    let x_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).fold(0.0f64, f64::max) * 1.1;
    let y_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 2.0;
    let root = BitMapBackend::new(png, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("End to end: latency vs throughput (10/50/90/120% of capacity)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max.max(1.0), (5.0f64..y_max).log_scale())?;
    chart.configure_mesh().x_desc("achieved items/s").y_desc("latency, ms (log)").label_style(("sans-serif", 15)).draw()?;
    draw_lines(&mut chart, &series)?;
    root.present()?;
    Ok(())
}

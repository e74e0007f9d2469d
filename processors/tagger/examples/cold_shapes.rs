//! What is cold in a fresh model: the first and second forward pass of each batch shape, in a
//! fresh process. `cargo run --release -p streamoasis-tagger --example cold_shapes -- [MODEL_DIR] [fp32|int8]`
use std::time::Instant;

use streamoasis_tagger::batcher::{Backend, Batch, Seq};
use streamoasis_tagger::model::TorchBackend;

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/all-MiniLM-L6-v2").into());
    let file = match std::env::args().nth(2).as_deref() {
        Some("int8") => "model.int8.pt",
        _ => "model.pt",
    };
    let t = Instant::now();
    let mut b = TorchBackend::load_file(std::path::Path::new(&dir), file, tch::Device::Cpu, false, 2).unwrap();
    b.on_start();
    println!("load {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let shapes: Vec<(usize, usize)> = std::env::var("SHAPES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|p| {
                    let (r, c) = p.split_once('x').unwrap();
                    (r.parse().unwrap(), c.parse().unwrap())
                })
                .collect()
        })
        .unwrap_or_else(|| {
            vec![(1, 12), (1, 12), (3, 14), (1, 60), (1, 61), (2, 60), (1, 90), (4, 70), (8, 64), (1, 64), (16, 64), (32, 64), (1, 128), (8, 128), (16, 128), (2, 65)]
        });
    for (rows, cols) in shapes {
        let seqs: Vec<Seq> = (0..rows).map(|_| Seq::new((0..cols).map(|i| 1000 + (i as i64 % 500)).collect())).collect();
        let refs: Vec<&Seq> = seqs.iter().collect();
        let batch = Batch::pad(&refs);
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            b.forward(&batch).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("{rows:>3} x {cols:>4}: {:>8.1} {:>8.1} {:>8.1} ms", times[0], times[1], times[2]);
    }
}

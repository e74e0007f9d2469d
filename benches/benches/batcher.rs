//! Batcher overhead with a no-op model: the cost the batcher itself adds per item.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use streamoasis_tagger::batcher::{Backend, Batch, Batcher, BatcherConfig, Seq};

struct Noop;
impl Backend for Noop {
    fn forward(&mut self, b: &Batch) -> Result<Vec<Vec<f32>>, streamoasis_tagger::batcher::ForwardError> {
        Ok(vec![vec![0.0; 4]; b.rows])
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let b = rt.block_on(async { Batcher::spawn(Noop, BatcherConfig { max_batch_size: 32, max_batch_tokens: 8192, max_wait: Duration::from_micros(200), queue_capacity: 1024 }) });
    let mut g = c.benchmark_group("batcher");
    g.throughput(Throughput::Elements(256));
    g.bench_function("256 concurrent single-item callers", |bench| {
        bench.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..256)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(async move { b.infer(vec![Seq::new(vec![101, 2000 + i % 50, 102])]).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
    g.bench_function("pad 32 x 128", |bench| {
        let seqs: Vec<Seq> = (0..32).map(|i| Seq::new(vec![7; 64 + i * 2])).collect();
        let refs: Vec<&Seq> = seqs.iter().collect();
        bench.iter(|| Batch::pad(&refs))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

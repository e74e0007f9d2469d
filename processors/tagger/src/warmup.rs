//! Start-up warm-up: before a tagger reports ready, run its model over the batch shapes the
//! batcher will form, and fill the codec's schema caches.
//!
//! A fresh libtorch process is slow on the first passes of each new input shape (the
//! TorchScript executor profiles and optimises the graph on its first runs; buffers of a larger
//! shape are allocated and faulted in for the first time). Without a warm-up the first records
//! of a new replica, the ones a scaler added it for, pay that. The warm-up runs a grid of
//! `rows × tokens` shapes covering what `tagging.batching` allows (batch sizes up to
//! `max_batch_size`, lengths up to the window size, within `max_batch_tokens`), each twice,
//! straight on the model thread, for at most `tagging.batching.warmup` (0 = off). The readiness
//! flag turns true after it, so `/readyz` keeps traffic away until then.

use std::time::{Duration, Instant};

use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{Lineage, MediaIngested, MediaKind, MediaTagged, ModelRef, Strategy};

use crate::batcher::{BatchError, Batcher, Seq};
use crate::config::TaggerConfig;
use crate::model::TextEncoder;

/// Batch shapes (`rows`, `tokens`) to warm for these batching limits and window size, in the
/// order they run: the shapes of light load first (one item at each length), then growing
/// batches at each length. Rows are 1, 2, 4, … up to `max_batch_size` (and it); lengths 16, 32,
/// 64, … up to `max_tokens` (and it); a shape over `max_batch_tokens` is left out, except
/// single rows (a long window runs alone).
pub fn shapes(max_batch_size: usize, max_batch_tokens: usize, max_tokens: usize) -> Vec<(usize, usize)> {
    let max_tokens = max_tokens.max(3);
    let mut lens: Vec<usize> = std::iter::successors(Some(16usize), |l| Some(l * 2)).take_while(|&l| l < max_tokens).collect();
    lens.push(max_tokens);
    let mut rows: Vec<usize> = std::iter::successors(Some(1usize), |r| Some(r * 2)).take_while(|&r| r < max_batch_size.max(1)).collect();
    rows.push(max_batch_size.max(1));
    let mut out: Vec<(usize, usize)> = lens.iter().map(|&l| (1, l)).collect();
    for &r in rows.iter().skip(1) {
        for &l in &lens {
            if r * l <= max_batch_tokens {
                out.push((r, l));
            }
        }
    }
    out
}

/// What a warm-up did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Shapes run (twice each).
    pub shapes: usize,
    /// Shapes left out because the time budget ran out.
    pub skipped: usize,
    /// Time spent.
    pub elapsed: Duration,
    /// The slowest first pass and its shape (`rows`, `tokens`, milliseconds).
    pub slowest: Option<(usize, usize, f64)>,
}

/// Run `shapes` (each twice) straight on `batcher`'s model thread, with sequences cut from
/// `sample` (token ids including the specials at both ends), until `budget` is spent. A shape
/// that fails stops the warm-up with the error.
pub async fn run(batcher: &Batcher, sample: &[i64], shapes: &[(usize, usize)], budget: Duration) -> Result<Report, BatchError> {
    let started = Instant::now();
    let mut report = Report::default();
    for (i, &(rows, tokens)) in shapes.iter().enumerate() {
        if started.elapsed() >= budget {
            report.skipped = shapes.len() - i;
            break;
        }
        let seq = sequence(sample, tokens);
        for pass in 0..2 {
            let t = Instant::now();
            batcher.run_batch(vec![seq.clone(); rows]).await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if pass == 0 && report.slowest.is_none_or(|(_, _, s)| ms > s) {
                report.slowest = Some((rows, tokens, ms));
            }
        }
        report.shapes += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Warm the model behind `batcher` for `cfg`'s batching limits and `encoder`'s window size,
/// within `budget` (0 = nothing to do); logs what it did.
pub async fn warm_model(encoder: &TextEncoder, batcher: &Batcher, cfg: &TaggerConfig, budget: Duration) -> Result<Report, BatchError> {
    if budget.is_zero() {
        return Ok(Report::default());
    }
    let sample = encoder.windows(SAMPLE_TEXT, 1, 0).into_iter().next().map(|s| s.ids).unwrap_or_default();
    let b = &cfg.batching;
    let grid = shapes(b.max_batch_size, b.max_batch_tokens, encoder.max_tokens);
    let r = run(batcher, &sample, &grid, budget).await?;
    let (rows, tokens, ms) = r.slowest.unwrap_or_default();
    tracing::info!(
        shapes = r.shapes,
        skipped = r.skipped,
        elapsed_ms = r.elapsed.as_millis() as u64,
        slowest_first_pass = %format!("{rows}x{tokens} {ms:.0} ms"),
        budget = ?budget,
        "model warmed over the batch shapes"
    );
    if r.skipped > 0 {
        tracing::info!(skipped = r.skipped, "warm-up budget (tagging.batching.warmup) spent before every shape ran: the rest warm on first use");
    }
    Ok(r)
}

/// Fill the codec's schema caches before the first record: the latest schema of the input
/// subject (a record framed with it, decoded again) and of the output subject. A registry that
/// does not answer is logged and left to the run loop, which retries per record.
pub async fn warm_codec(codec: &Codec, input: &str, output: Option<&str>) {
    let started = Instant::now();
    let item = MediaIngested {
        media_id: "warmup".into(),
        kind: MediaKind::Other,
        title: "warm-up".into(),
        description: None,
        transcript: None,
        language: None,
        source: "warmup".into(),
        ingested_at: 0,
        attributes: Default::default(),
        candidate_labels: None,
    };
    let result = async {
        let framed = codec.encode(input, &item).await?;
        codec.decode::<MediaIngested>(Some(&framed)).await?;
        if let Some(out) = output {
            let tagged = MediaTagged {
                media_id: item.media_id.clone(),
                kind: item.kind,
                tags: vec![],
                no_tags_reason: Some("warmup".into()),
                strategy: Strategy::Embedding,
                model: ModelRef { name: "warmup".into(), version: "0".into() },
                ingested_at: 0,
                tagged_at: 0,
                lineage: Lineage { topic: input.into(), partition: 0, offset: 0 },
                title: None,
                source: None,
                language: None,
                attributes: Default::default(),
                taxonomy_version: None,
                embedding: None,
            };
            codec.encode(out, &tagged).await?;
        }
        Ok::<(), streamoasis_pipeline::codec::CodecError>(())
    }
    .await;
    match result {
        Ok(()) => tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "schema caches filled"),
        Err(e) => tracing::warn!(error = %e, "schema caches not filled at start-up (the first records will look the schemas up)"),
    }
}

/// A sequence of exactly `tokens` ids (at least 2): `sample`'s first id, its content repeated,
/// its last id.
pub fn sequence(sample: &[i64], tokens: usize) -> Seq {
    let tokens = tokens.max(2);
    let (first, last) = (sample.first().copied().unwrap_or(101), sample.last().copied().unwrap_or(102));
    let content: &[i64] = if sample.len() > 2 { &sample[1..sample.len() - 1] } else { &[1000] };
    let mut ids = Vec::with_capacity(tokens);
    ids.push(first);
    ids.extend(content.iter().copied().cycle().take(tokens - 2));
    ids.push(last);
    Seq::new(ids)
}

/// Text for the warm-up sequences: ordinary words, long enough for any window.
pub const SAMPLE_TEXT: &str = "The film festival opened with a documentary about rivers, markets and the people who \
    work along them; critics praised its music, its patient camera and the interviews with farmers, teachers and \
    engineers who describe how the seasons shape their towns, their trade and their stories.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{Backend, Batch, BatcherConfig, ForwardError};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<(usize, usize)>>>,
        delay: Duration,
    }

    impl Backend for Fake {
        fn forward(&mut self, b: &Batch) -> Result<Vec<Vec<f32>>, ForwardError> {
            self.seen.lock().unwrap().push((b.rows, b.cols));
            std::thread::sleep(self.delay);
            Ok((0..b.rows).map(|r| vec![b.input_ids[r * b.cols] as f32]).collect())
        }
    }

    fn cfg() -> BatcherConfig {
        BatcherConfig { max_batch_size: 32, max_batch_tokens: 2048, max_wait: Duration::ZERO, queue_capacity: 64 }
    }

    #[test]
    fn the_grid_covers_the_batchers_limits() {
        let s = shapes(32, 2048, 256);
        // One item at every length first (light load), the window size included.
        assert_eq!(&s[..5], &[(1, 16), (1, 32), (1, 64), (1, 128), (1, 256)]);
        assert!(s.contains(&(32, 64)) && s.contains(&(8, 256)) && s.contains(&(16, 128)));
        assert!(s.iter().all(|&(r, l)| r == 1 || r * l <= 2048), "{s:?}");
        assert!(!s.contains(&(32, 128)), "over the token budget");
        // Odd limits are included themselves.
        let s = shapes(12, 10_000, 100);
        assert!(s.contains(&(12, 100)) && s.contains(&(1, 100)) && s.contains(&(8, 64)), "{s:?}");
        assert_eq!(shapes(1, 16, 8), vec![(1, 8)]);
    }

    #[test]
    fn sequences_have_the_exact_length_and_the_sample_specials() {
        let s = sequence(&[101, 7, 8, 9, 102], 8);
        assert_eq!(s.ids, vec![101, 7, 8, 9, 7, 8, 9, 102]);
        assert_eq!(sequence(&[101, 7, 102], 2).ids, vec![101, 102]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_shape_runs_twice_on_the_model_thread_exactly_as_asked() {
        let fake = Fake::default();
        let b = Batcher::spawn(fake.clone(), cfg());
        let grid = shapes(32, 2048, 128);
        let r = run(&b, &[101, 5, 6, 102], &grid, Duration::from_secs(60)).await.unwrap();
        assert_eq!((r.shapes, r.skipped), (grid.len(), 0));
        let seen = fake.seen.lock().unwrap().clone();
        let twice: Vec<(usize, usize)> = grid.iter().flat_map(|&s| [s, s]).collect();
        assert_eq!(seen, twice, "shapes not split or merged by the batcher");
        assert!(r.slowest.is_some());
        // The batcher serves normally afterwards.
        assert_eq!(b.infer(vec![Seq::new(vec![9, 9, 9])]).await.unwrap()[0][0], 9.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_budget_bounds_the_warm_up() {
        let fake = Fake { delay: Duration::from_millis(20), ..Default::default() };
        let b = Batcher::spawn(fake.clone(), cfg());
        let grid = shapes(32, 2048, 256);
        let t = Instant::now();
        let r = run(&b, &[101, 5, 102], &grid, Duration::from_millis(100)).await.unwrap();
        // The shape under way finishes: about one pair of passes beyond the budget (slack for a
        // busy machine), far from the whole grid's 2 x 20 ms x shapes.
        assert!(t.elapsed() < Duration::from_millis(100 + 2 * 20 + 400), "took {:?}", t.elapsed());
        assert!(grid.len() * 2 * 20 > 100 + 2 * 20 + 400);
        assert!(r.shapes >= 1 && r.skipped > 0 && r.shapes + r.skipped == grid.len(), "{r:?}");
        assert_eq!(fake.seen.lock().unwrap().len(), 2 * r.shapes);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_wait_for_the_warm_up_pass_and_are_not_lost() {
        let fake = Fake { delay: Duration::from_millis(10), ..Default::default() };
        let b = Batcher::spawn(fake.clone(), cfg());
        let warm = {
            let b = b.clone();
            tokio::spawn(async move { run(&b, &[101, 5, 102], &shapes(4, 2048, 32), Duration::from_secs(60)).await })
        };
        let mut callers = Vec::new();
        for i in 0..20i64 {
            let b = b.clone();
            callers.push(tokio::spawn(async move { b.infer(vec![Seq::new(vec![i, 1, 2])]).await.unwrap()[0][0] }));
        }
        warm.await.unwrap().unwrap();
        for (i, c) in callers.into_iter().enumerate() {
            assert_eq!(c.await.unwrap(), i as f32);
        }
    }
}

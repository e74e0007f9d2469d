//! # streamoasis-tagger
//!
//! Zero-shot tagging of media text with a TorchScript model (libtorch via `tch`), behind a
//! dynamic batcher. Independent of Kafka except for the [`processor`] adapter.
//!
//! ## Layout
//! - [`config`]: the `tagging:` section of topology.yaml (model, strategy, labels, batching).
//! - [`model`]: manifest, tokenizer windows/pairs, the TorchScript backend (its own thread).
//! - [`batcher`]: the dynamic batcher (bounded queue, size/token/deadline closing, grouping
//!   by length, cancellation, backpressure) over a small synchronous `Backend` trait.
//! - [`tagger`]: strategies (embedding similarity, NLI) and label-embedding caches.
//! - [`scoring`]: the token budget → windows, relevance pooling of windows, calibration that
//!   carries over to label names never fitted, and the evidence rule of adaptive compute.
//! - [`processor`]: the `media.ingested` → `media.tagged` processor; with stored embeddings
//!   (`store_embeddings`, `reuse_embeddings`) an item ingested again with unchanged text is
//!   scored from its stored rows, without the model.
//! - [`warmup`]: start-up warm-up of the model's batch shapes and the codec's schema caches.
//!
//! ## Batching knobs and their trade-offs
//! - `max_batch_size` (32): more sequences per pass amortise per-call overhead; on 2 CPU cores
//!   throughput peaks at 16–32 and falls beyond (caches), while latency grows linearly.
//! - `max_batch_tokens` (2048): bounds padded cost (longest × count) — memory and the duration
//!   of one pass — so a batch of long windows does not stall short items for long. 2048 was the
//!   fastest per item at 64–256 tokens on 2 cores (caches; BENCHMARKS.md).
//! - `max_wait` (0): the most an item waits for company once the model is free. A batch is only
//!   formed when the model thread can take it, so items arriving during a forward pass queue up
//!   and go together into the next one: batches grow with load by themselves. 0 gives single-item
//!   latency at light load (10 ms of waiting measured +13 ms p50 at 10% load and no gain).
//! - `queue_capacity` (1024): sequences waiting for the model; beyond it callers wait, which
//!   pauses Kafka partitions upstream.
//!
//! ## Long media, unseen labels, adaptive compute (`tagging.text`, calibration; docs/quality.md)
//! - `max_tokens_per_item` (12000, an hour of speech): text up to the budget is read whole in
//!   overlapping windows of `max_tokens`; longer text gets as many windows as the budget pays
//!   for ([`scoring::windows_for_budget`]), spread over all of it. Cost is linear in the windows
//!   read. It replaces `max_windows`, which is refused with a message naming the new key.
//! - `pooling` (`relevance`): windows are weighted by their evidence for the item's candidate
//!   labels, contrasted with the item's typical window ([`scoring::pool`]), so an hour of
//!   chatter does not outvote the minutes about the subject; `mean` weighs all alike.
//! - calibration `transfer` (on): labels without a fitted (slope, bias) take the pairs of the
//!   fitted labels nearest in embedding space, gated towards the global pair when none is near
//!   ([`scoring::label_pair`]), when the label set looks like the fitted categories renamed:
//!   at least `min_specific` (half) of its unfitted labels are each nearer to one fitted label
//!   than the fitted labels are to each other ([`scoring::set_takes_transfer`]); those specific
//!   labels also move their vectors `anchor` (0.75) of the way towards the fitted labels they
//!   rename ([`scoring::calibrate_set`]).
//! - calibration `directions` (films: `calibration/tmdb-genres.all-MiniLM-L6-v2.json`): per
//!   fitted label, where its calibration items sit among all of them in the model's space; a
//!   fitted label scores with `unit(v + weight × direction)` ([`scoring::along_direction`]) and
//!   renamed labels anchor towards that. Fitted with the pairs for one model
//!   ([`config::Directions`]: the tagger refuses another model's file).
//! - `adaptive_margin` with `min_evidence_tokens` (8): the body is skipped only when the item
//!   has a description, title + description have enough informative tokens
//!   ([`scoring::informative_tokens`]: not "Episode 12") and the lead's top-2 margin on the
//!   item's scores is at least the margin.

pub mod batcher;
pub mod config;
pub mod model;
pub mod processor;
pub mod scoring;
pub mod tagger;
pub mod warmup;

pub use config::TaggerConfig;

use std::sync::Arc;

use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::kafka::{run, RunSummary, RunnerConfig};
use streamoasis_pipeline::topology::{ConfigError, Topology};
use streamoasis_pipeline::CancellationToken;

/// Run the tagger processor as `streamoasis tagger` does (the one wiring path: the command,
/// the API's `tagger --api-addr` mode and the tests all call this): `processors.tagger` and
/// `kafka.client` from the topology, until `shutdown`.
pub async fn serve(
    topo: &Topology,
    brokers: &str,
    codec: Arc<Codec>,
    tagger: Arc<Tagger>,
    health: Option<Arc<streamoasis_pipeline::telemetry::Health>>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    serve_processor(topo, brokers, codec, Arc::new(TaggerProcessor::new(tagger)), health, shutdown).await
}

/// [`serve`] with a processor built by the caller (a store of embeddings to reuse:
/// [`TaggerProcessor::with_store`]).
pub async fn serve_processor(
    topo: &Topology,
    brokers: &str,
    codec: Arc<Codec>,
    processor: Arc<TaggerProcessor>,
    health: Option<Arc<streamoasis_pipeline::telemetry::Health>>,
    shutdown: CancellationToken,
) -> anyhow::Result<RunSummary> {
    let mut runner = RunnerConfig::new(brokers, topo.file.processors.tagger.clone(), topo.file.kafka.client.clone());
    if let Some(h) = health {
        runner = runner.with_health(h);
    }
    run(runner, codec, processor, shutdown).await
}

/// Re-read `tagging.labels` from the topology file at `path`, validate the whole `tagging`
/// section, and swap the tagger's taxonomy (SIGHUP). On any error the current labels stay.
/// Returns the new label count.
pub async fn reload_labels(path: &std::path::Path, tagger: &Tagger) -> anyhow::Result<usize> {
    let topo = Topology::load(path)?;
    let cfg = TaggerConfig::from_topology(&topo).map_err(|e: ConfigError| anyhow::anyhow!("{e}"))?;
    tagger.reload_labels(&cfg.labels).await.map_err(|e| anyhow::anyhow!("embedding the new labels: {e}"))?;
    Ok(cfg.labels.len())
}
pub use processor::TaggerProcessor;
pub use tagger::{text_hash, ItemEmbedding, TagRequest, TagResult, Tagger};

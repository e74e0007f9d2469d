//! `streamoasis tagger` and `streamoasis sink`: the two stream processors, each on the Kafka run
//! loop until `shutdown`. The tagger can also serve the API on the same batcher (`--api-addr`).
//!
//! Start-up order: configuration (and the API's keys and sockets) first, so a bad setting fails
//! at once; then the metrics endpoint, the broker wait and the connections; the model last.

use std::sync::Arc;
use std::time::Instant;

use streamoasis_api::{Limits, Listeners};
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::telemetry::{self, Health};
use streamoasis_pipeline::CancellationToken;
use streamoasis_sink::{SinkConfig, TagWriter};
use streamoasis_tagger::{Tagger, TaggerConfig};

use super::api::{api_auth, connections};
use super::{load_for_kafka, reload_on_sighup, wait_for_broker};
use crate::cli::{Common, RunArgs, TaggerArgs};

fn start_metrics(a: &RunArgs, health: &Arc<Health>) {
    if let Some(addr) = a.metrics_addr {
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve_metrics(addr, health).await {
                tracing::error!(%addr, error = %e, "metrics server failed");
            }
        });
    }
}

pub(super) async fn tagger(c: &Common, a: TaggerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-tagger");
    let topo = load_for_kafka(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    // Check the API settings before the (slow) model load: a bad key fails at once.
    let api = match &a.api_addr {
        Some(addr) => Some((api_auth(a.insecure_no_auth)?, Listeners::bind(addr, &a.grpc_addr).await?)),
        None => None,
    };
    let health = Health::new();
    start_metrics(&a.run, &health);
    wait_for_broker(c, &topo).await?;
    let codec = Arc::new(Codec::new(&c.registry)?);
    let started = Instant::now();
    let tagger = tokio::select! {
        t = Tagger::load(cfg) => Arc::new(t?),
        _ = shutdown.cancelled() => return Ok(()),
    };
    let tc = tagger.config();
    tracing::info!(
        model = %tagger.model_ref().name,
        strategy = ?tagger.strategy(),
        device = %tc.model.device,
        precision = ?tc.model.precision,
        cuda_linked = cfg!(feature = "cuda"),
        cuda_devices = streamoasis_tagger::model::cuda_devices(),
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    if !cfg!(feature = "cuda") {
        tracing::info!("this build runs on the CPU only (built without the cuda feature: libtorch_cuda is not linked)");
    }
    // Warm the model's batch shapes and the schema caches before reporting ready, so the first
    // records (of a replica a scaler just added) see warm latency.
    let spec = &topo.file.processors.tagger;
    tokio::select! {
        r = tagger.warm_up(tc.batching.warmup) => if let Err(e) = r { tracing::error!(error = %e, "model warm-up failed") },
        _ = shutdown.cancelled() => return Ok(()),
    }
    streamoasis_tagger::warmup::warm_codec(&codec, &spec.input, spec.output.as_deref()).await;
    let alive = tagger.clone();
    health.add_check("model thread", move || alive.is_alive());
    health.set_loaded(true);
    reload_on_sighup(c.topology.clone(), tagger.clone());
    let mut api_task = None;
    if let Some((auth, listeners)) = api {
        // One process, one batcher: API calls and stream events share batches.
        let state = Arc::new(streamoasis_api::state(&connections(c, true), &topo, tagger.clone(), auth, Limits::default()).await?);
        api_task = Some(tokio::spawn(streamoasis_api::serve(listeners, state, shutdown.clone())));
    }
    let mut processor = streamoasis_tagger::TaggerProcessor::new(tagger.clone());
    if tc.store_embeddings && tc.reuse_embeddings {
        // Items ingested again with unchanged text are scored from their stored rows; the
        // database is reached in the background (until then the model reads every item).
        let sink = streamoasis_sink::SinkConfig::from_topology(&topo)?;
        processor = processor.with_store(streamoasis_sink::read::StoredEmbeddings::connect_in_background(c.scylla.clone(), sink, tc.reuse_timeout));
    }
    let r = streamoasis_tagger::serve_processor(&topo, &c.kafka, codec, Arc::new(processor), Some(health), shutdown.clone()).await;
    shutdown.cancel();
    if let Some(t) = api_task {
        t.await??;
    }
    r?;
    Ok(())
}

pub(super) async fn sink(c: &Common, a: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-sink");
    let topo = load_for_kafka(c)?;
    let cfg = SinkConfig::from_topology(&topo)?;
    let health = Health::new();
    start_metrics(&a, &health);
    wait_for_broker(c, &topo).await?;
    let codec = Arc::new(Codec::new(&c.registry)?);
    let session = Arc::new(streamoasis_sink::connect(&c.scylla, &cfg).await?);
    let writer = Arc::new(TagWriter::new(session, &cfg).await?);
    health.set_loaded(true);
    streamoasis_sink::serve(&topo, &c.kafka, codec, writer, Some(health), shutdown).await?;
    Ok(())
}

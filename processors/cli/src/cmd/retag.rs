//! `streamoasis retag`: re-send archived ingest records to the ingest topic (after a taxonomy or
//! model change), from a time, partition offsets or the beginning, optionally only some media ids;
//! or, with `--from-embeddings`, recompute the tags from the stored embeddings without the model.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::FutureRecord;
use streamoasis_pipeline::client::producer;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::ops;
use streamoasis_sink::SinkConfig;
use streamoasis_tagger::{Tagger, TaggerConfig};

use super::{load, load_for_kafka, parse_time, wait_for_broker};
use crate::cli::{Common, RetagArgs};

pub(super) async fn run(c: &Common, a: RetagArgs) -> anyhow::Result<()> {
    if a.from_embeddings {
        return from_embeddings(c, a).await;
    }
    let topo = load(c)?;
    let start = match (&a.since, &a.offsets, a.from_beginning) {
        (Some(s), _, _) => ops::Start::Timestamp(parse_time("--since", s)?),
        (None, Some(o), _) => ops::Start::Offsets(
            o.iter()
                .map(|po| {
                    let (p, off) = po.split_once(':').ok_or_else(|| anyhow::anyhow!("--offsets '{po}': use partition:offset"))?;
                    Ok((p.trim().parse()?, off.trim().parse()?))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
        (None, None, true) => ops::Start::Beginning,
        (None, None, false) if a.ids.is_some() => ops::Start::Beginning,
        _ => anyhow::bail!("say where to start: --since, --offsets, --from-beginning (or --ids, which reads from the beginning)"),
    };
    let ids = media_ids(&a)?;
    let o = ops::RetagOptions { topic: topo.file.processors.tagger.input.clone(), start, media_ids: ids, rate: a.rate, progress: !a.quiet };
    let s = ops::retag(&c.kafka, &topo.file.kafka.client, &o).await?;
    eprintln!("retag: read {}, re-sent {}, skipped {} (topic {})", s.read, s.sent, s.skipped, o.topic);
    Ok(())
}

/// `--ids`: a comma-separated list or @file (one id per line).
fn media_ids(a: &RetagArgs) -> anyhow::Result<Option<HashSet<String>>> {
    Ok(match &a.ids {
        None => None,
        Some(f) if f.starts_with('@') => Some(
            std::fs::read_to_string(&f[1..]).with_context(|| format!("--ids: cannot read {}", &f[1..]))?.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        ),
        Some(l) => Some(l.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
    })
}

/// Sends in flight at most.
const IN_FLIGHT: usize = 2000;

/// `retag --from-embeddings`: every stored item scored again under the current taxonomy from
/// `media_embeddings`, produced to the tags topic as the tagger would (the sink updates the rows);
/// the items the rows cannot answer go through the model by a normal retag of their ids.
async fn from_embeddings(c: &Common, a: RetagArgs) -> anyhow::Result<()> {
    let topo = load_for_kafka(c)?;
    let tc = TaggerConfig::from_topology(&topo)?;
    let sink = SinkConfig::from_topology(&topo)?;
    let tagger_spec = &topo.file.processors.tagger;
    let output = tagger_spec.output.clone().ok_or_else(|| anyhow::anyhow!("processors.tagger.output: the tagger has no output topic to retag into"))?;
    let only = media_ids(&a)?;
    wait_for_broker(c, &topo).await?;
    let started = Instant::now();
    let tagger = Tagger::load(tc).await?;
    let load_s = started.elapsed().as_secs_f64();
    let session = Arc::new(streamoasis_sink::connect(&c.scylla, &sink).await?);
    let codec = Codec::new(&c.registry)?;
    let producer = producer(&c.kafka, &topo.file.kafka.client)?;
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    bar.set_style(indicatif::ProgressStyle::with_template("retag from embeddings {pos} items {per_sec} {elapsed}").unwrap());
    let scan = Instant::now();
    let mut rows = streamoasis_sink::read::stored_embeddings(&session, &sink.keyspace).await?;
    let (mut read, mut sent) = (0u64, 0u64);
    let mut need_model: Vec<String> = Vec::new();
    let mut pending = FuturesUnordered::new();
    while let Some(stored) = rows.next().await {
        let e = stored?;
        if only.as_ref().is_some_and(|o| !o.contains(&e.media_id)) {
            continue;
        }
        read += 1;
        let id = e.media_id.clone();
        let e = match tagger.retag_stored(e).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                need_model.push(id);
                continue;
            }
            Err(err) => anyhow::bail!("{id}: {err}"),
        };
        let bytes = codec.encode(&output, &e).await?;
        let (producer, topic) = (producer.clone(), output.clone());
        pending.push(tokio::spawn(async move {
            producer.send(FutureRecord::to(&topic).key(&e.media_id).payload(&bytes), Duration::from_secs(30)).await.map(|_| ()).map_err(|(err, _)| err)
        }));
        sent += 1;
        while pending.len() >= IN_FLIGHT {
            if let Some(r) = pending.next().await {
                r??;
                bar.inc(1);
            }
        }
    }
    while let Some(r) = pending.next().await {
        r??;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = scan.elapsed().as_secs_f64();
    eprintln!(
        "retag --from-embeddings: read {read} stored items, produced {sent} to {output} without the model in {secs:.1}s ({:.0} items/s; model load {load_s:.1}s); {} need the model",
        sent as f64 / secs.max(1e-9),
        need_model.len()
    );
    if !need_model.is_empty() {
        let o = ops::RetagOptions {
            topic: tagger_spec.input.clone(),
            start: ops::Start::Beginning,
            media_ids: Some(need_model.iter().cloned().collect()),
            rate: 0.0,
            progress: !a.quiet,
        };
        let s = ops::retag(&c.kafka, &topo.file.kafka.client, &o).await?;
        eprintln!("retag: their ingest records re-sent to {} for the model: {} (read {})", o.topic, s.sent, s.read);
    }
    Ok(())
}

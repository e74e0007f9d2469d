//! `streamoasis produce`: media items from a JSON-lines file (or stdin) to the ingest topic,
//! optionally paced (`--rate`), with at most 1000 sends in flight. Each item starts a trace.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::FutureRecord;
use serde::Deserialize;
use streamoasis_pipeline::client::producer;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind};
use streamoasis_pipeline::telemetry;
use tracing::Instrument;

use super::{load_for_kafka, open_lines, wait_for_broker};
use crate::cli::{Common, ProduceArgs};

/// A line of input for `produce`: a MediaIngested in JSON, or a sample record.
#[derive(Debug, Deserialize)]
struct InputLine {
    #[serde(alias = "id")]
    media_id: String,
    #[serde(default)]
    kind: Option<MediaKind>,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, alias = "text")]
    transcript: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    ingested_at: Option<i64>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    #[serde(default)]
    candidate_labels: Option<Vec<String>>,
    #[serde(default)]
    label: Option<String>,
}

impl InputLine {
    fn into_event(self, source: &str) -> MediaIngested {
        let mut attributes = self.attributes;
        if let Some(l) = self.label {
            attributes.insert("label".into(), l);
        }
        MediaIngested {
            media_id: self.media_id,
            kind: self.kind.unwrap_or(MediaKind::Article),
            title: self.title,
            description: self.description,
            transcript: self.transcript,
            language: self.language,
            source: self.source.unwrap_or_else(|| source.to_string()),
            ingested_at: self.ingested_at.unwrap_or_else(now_millis),
            attributes,
            candidate_labels: self.candidate_labels,
        }
    }
}

pub(super) async fn run(c: &Common, a: ProduceArgs) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-produce");
    let topo = load_for_kafka(c)?;
    let topic = a.topic.clone().unwrap_or_else(|| topo.file.processors.tagger.input.clone());
    wait_for_broker(c, &topo).await?;
    let codec = Codec::new(&c.registry)?;
    let producer = producer(&c.kafka, &topo.file.kafka.client)?;
    let lines: Vec<String> = open_lines(&a.file)?.lines().take(a.limit.unwrap_or(usize::MAX)).collect::<Result<_, _>>()?;
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(lines.len() as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("produce {bar:30} {pos}/{len} {per_sec} eta {eta}").unwrap());
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0usize;
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: InputLine = serde_json::from_str(line).with_context(|| format!("{} line {}: not a media item", a.file.display(), n + 1))?;
        if a.rate > 0.0 {
            // Pace: wait for this record's slot, completing earlier sends meanwhile.
            let due = tokio::time::Instant::from(started + Duration::from_secs_f64(sent as f64 / a.rate));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        r??;
                        bar.inc(1);
                    }
                }
            }
        }
        // Stamped when it is sent, not when the file was read.
        let event = item.into_event(&a.source);
        let payload = codec.encode(&topic, &event).await?;
        let key = event.media_id.clone();
        let producer = producer.clone();
        let topic_name = topic.clone();
        // Each item starts a trace; the tagger and the sink continue it from the record's headers.
        let span = tracing::info_span!("produce", topic = %topic);
        let headers = telemetry::context_headers(&span);
        // Spawned so librdkafka gets the record now: a send future does nothing until polled.
        pending.push(tokio::spawn(
            async move { producer.send(FutureRecord::to(&topic_name).key(&key).payload(&payload).headers(headers), Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e) }
                .instrument(span),
        ));
        sent += 1;
        while pending.len() >= 1000 {
            if let Some(r) = pending.next().await {
                r??;
            }
            bar.inc(1);
        }
    }
    while let Some(r) = pending.next().await {
        r??;
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("produced {sent} items to {topic} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

//! `streamoasis tail`: print the records of a topic as they arrive (tagged events, ingested events
//! or dead letters), optionally judged against known labels (`--truth`) and summed up at the end
//! (`--summary`). Stops on the shutdown token, after `--count` records or `--idle-timeout`.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use streamoasis_pipeline::client::client_config;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaTagged};
use streamoasis_pipeline::CancellationToken;

use super::{load_for_kafka, open_lines};
use crate::cli::{Common, TailArgs};

/// How long a record waits for an unavailable schema registry before `tail` gives up.
const REGISTRY_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct Truth {
    #[serde(alias = "media_id")]
    id: String,
    label: String,
}

pub(super) async fn run(c: &Common, a: TailArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topo = load_for_kafka(c)?;
    let t = &topo.file.processors;
    let topic = a.topic.clone().unwrap_or_else(|| t.tagger.output.clone().unwrap_or_default());
    let truth: HashMap<String, String> = match &a.truth {
        Some(p) => open_lines(p)?.lines().map_while(Result::ok).filter_map(|l| serde_json::from_str::<Truth>(&l).ok()).map(|t| (t.id, t.label)).collect(),
        None => HashMap::new(),
    };
    let codec = Codec::new(&c.registry)?;
    let mut cc = client_config(&c.kafka, &topo.file.kafka.client);
    cc.set("group.id", format!("streamoasis-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", if a.from_beginning { "earliest" } else { "latest" });
    let consumer: StreamConsumer = cc.create()?;
    // Assign every partition explicitly, at the beginning or at "now": records produced after
    // this point are never missed, however long a group join would have taken.
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).with_context(|| format!("Kafka at {} did not answer; is the stack up?", c.kafka))?;
    let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    anyhow::ensure!(!parts.is_empty(), "topic {topic} does not exist (run `streamoasis topology apply`)");
    let mut tpl = TopicPartitionList::new();
    let now = now_millis();
    for p in &parts {
        tpl.add_partition_offset(&topic, *p, if a.from_beginning { Offset::Beginning } else { Offset::Offset(now) })?;
    }
    let tpl = if a.from_beginning { tpl } else { consumer.offsets_for_times(tpl, Duration::from_secs(10))? };
    consumer.assign(&tpl)?;
    let is_dlq = topic == t.tagger.dlq || topic == t.sink.dlq;
    let is_ingest = topic == t.tagger.input;
    let mut stats = Summary::default();
    let started = Instant::now();
    loop {
        if a.count.is_some_and(|n| stats.items >= n) {
            break;
        }
        let idle = a.idle_timeout.unwrap_or(Duration::from_secs(86_400 * 365));
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, consumer.recv()) => match r {
                Err(_) => { eprintln!("no record for {}; stopping", humantime::format_duration(idle)); break; }
                Ok(m) => m?,
            },
        };
        stats.items += 1;
        if is_dlq {
            let mut headers = serde_json::Map::new();
            if let Some(h) = msg.headers() {
                for hd in h.iter() {
                    headers.insert(hd.key.to_string(), serde_json::Value::String(String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned()));
                }
            }
            println!("{}", serde_json::json!({"offset": msg.offset(), "partition": msg.partition(), "bytes": msg.payload().map_or(0, |p| p.len()), "headers": headers}));
            continue;
        }
        if is_ingest {
            let d = codec.decode_patiently::<MediaIngested>(msg.payload(), REGISTRY_PATIENCE).await?;
            if !a.quiet {
                println!("{}", serde_json::to_string(&d.event)?);
            }
            continue;
        }
        let e = codec.decode_patiently::<MediaTagged>(msg.payload(), REGISTRY_PATIENCE).await?.event;
        stats.observe(&e, truth.get(&e.media_id));
        if a.quiet {
            continue;
        }
        if a.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let tags: Vec<String> = e.tags.iter().map(|t| format!("{} {:.2}", t.label, t.score)).collect();
            let mark = match truth.get(&e.media_id) {
                Some(l) if e.tags.first().is_some_and(|t| &t.label == l) => " ✓",
                Some(_) => " ✗",
                None => "",
            };
            println!("{:<28} {}{}", e.media_id, if tags.is_empty() { e.no_tags_reason.clone().unwrap_or_default() } else { tags.join(", ") }, mark);
        }
    }
    if a.summary {
        stats.print(started.elapsed());
    }
    Ok(())
}

#[derive(Default)]
struct Summary {
    items: usize,
    tags: usize,
    judged: usize,
    correct: usize,
    latency: Option<hdrhistogram::Histogram<u64>>,
    first_ingest: Option<i64>,
    last_seen: i64,
}

impl Summary {
    fn observe(&mut self, e: &MediaTagged, truth: Option<&String>) {
        self.tags += e.tags.len();
        if let Some(l) = truth {
            self.judged += 1;
            if e.tags.first().is_some_and(|t| &t.label == l) {
                self.correct += 1;
            }
        }
        let now = now_millis();
        let h = self.latency.get_or_insert_with(|| hdrhistogram::Histogram::new(3).unwrap());
        let _ = h.record((now - e.ingested_at).max(0) as u64);
        self.first_ingest = Some(self.first_ingest.map_or(e.ingested_at, |f| f.min(e.ingested_at)));
        self.last_seen = now;
    }

    fn print(&self, elapsed: Duration) {
        println!("──── summary ────");
        println!("items            {}", self.items);
        if self.items > 0 {
            println!("tags per item    {:.2}", self.tags as f64 / self.items as f64);
        }
        if self.judged > 0 {
            println!("top-1 accuracy   {:.1}% ({} / {} with known labels)", 100.0 * self.correct as f64 / self.judged as f64, self.correct, self.judged);
        }
        if let (Some(h), Some(first)) = (&self.latency, self.first_ingest) {
            let span = (self.last_seen - first).max(1) as f64 / 1000.0;
            println!("throughput       {:.1} items/s (first ingest → last tagged event, {:.1}s)", self.items as f64 / span, span);
            println!("e2e latency      p50 {} ms, p99 {} ms, max {} ms (ingested_at → received here)", h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
        }
        println!("tail ran         {:.1}s", elapsed.as_secs_f64());
    }
}

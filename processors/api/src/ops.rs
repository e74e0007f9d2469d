//! Operations that feed records back into the normal flow: re-tagging after a taxonomy or
//! model change (`streamoasis retag`) and re-sending dead letters after a fix
//! (`streamoasis dlq replay`).
//!
//! Both read a topic up to the end offsets it had when they started, so they always finish,
//! never read what they themselves wrote, and send each record they read at most once per run.
//! They send the original bytes and key: the tagger decodes and tags them as any new record
//! (with the taxonomy and model it has now), and the sink's idempotent upserts let the newer
//! tagging win.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use streamoasis_pipeline::kafka::{client_config, producer};

/// Where `retag` starts reading.
#[derive(Debug, Clone)]
pub enum Start {
    /// Every retained record.
    Beginning,
    /// Records with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
    /// Explicit `(partition, offset)` starts; partitions not listed are not read.
    Offsets(Vec<(i32, i64)>),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Records read.
    pub read: u64,
    /// Records sent back.
    pub sent: u64,
    /// Records read but filtered out.
    pub skipped: u64,
}

/// Options of [`retag`].
#[derive(Debug, Clone)]
pub struct RetagOptions {
    /// The ingest topic (read and written).
    pub topic: String,
    /// Where to start.
    pub start: Start,
    /// Only these media ids (record keys); all when `None`.
    pub media_ids: Option<HashSet<String>>,
    /// Records per second (0: as fast as the broker takes them).
    pub rate: f64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Options of [`dlq_replay`].
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The dead-letter topic to read.
    pub dlq: String,
    /// Only dead letters whose `error.kind` header is one of these; all when empty.
    pub kinds: Vec<String>,
    /// Only dead letters written at or after this (ms since the epoch).
    pub since: Option<i64>,
    /// Only dead letters written before this (ms since the epoch).
    pub until: Option<i64>,
    /// Count what would be sent, send nothing.
    pub dry_run: bool,
    /// Records per second (0: as fast as the broker takes them).
    pub rate: f64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Headers the run loop adds to a dead letter; not copied back to the source topic.
const DLQ_HEADERS: [&str; 7] = ["error.kind", "error.message", "error.processor", "source.topic", "source.partition", "source.offset", "schema.id"];

fn header<'a>(m: &'a impl Message, key: &str) -> Option<&'a str> {
    m.headers()?.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// Per partition: `[start, end)` to read, `end` being the high watermark now.
fn ranges(brokers: &str, client: &BTreeMap<String, String>, topic: &str, start: &Start) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let c: BaseConsumer = client_config(brokers, client).create()?;
    let t = Duration::from_secs(10);
    let md = c.fetch_metadata(Some(topic), t).map_err(|e| anyhow::anyhow!("Kafka at {brokers} did not answer ({e}); is the stack up?"))?;
    let parts: Vec<i32> = md.topics().iter().flat_map(|x| x.partitions().iter().map(|p| p.id())).collect();
    anyhow::ensure!(!parts.is_empty(), "topic {topic} does not exist (run `streamoasis topology apply`)");
    let mut out = Vec::new();
    let starts: Vec<(i32, Option<i64>)> = match start {
        Start::Beginning => parts.iter().map(|p| (*p, None)).collect(),
        Start::Offsets(o) => {
            for (p, _) in o {
                anyhow::ensure!(parts.contains(p), "--offsets: {topic} has no partition {p} (it has 0..{})", parts.len());
            }
            o.iter().map(|(p, off)| (*p, Some(*off))).collect()
        }
        Start::Timestamp(ts) => {
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*ts))?;
            }
            let found = c.offsets_for_times(tpl, t)?;
            found
                .elements()
                .iter()
                .map(|e| (e.partition(), match e.offset() { Offset::Offset(o) => Some(o), _ => Some(i64::MAX) }))
                .collect()
        }
    };
    for (p, s) in starts {
        let (low, high) = c.fetch_watermarks(topic, p, t)?;
        let s = s.unwrap_or(low).max(low);
        if s < high {
            out.push((p, s, high));
        }
    }
    Ok(out)
}

fn bar(total: u64, show: bool, what: &str) -> indicatif::ProgressBar {
    let b = if show { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
    b.set_style(indicatif::ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}")).expect("template"));
    b
}

/// Read `topic` over `ranges`, calling `route` for each record: `Some((target, headers))` sends
/// its bytes and key there. Bounded: at most 1000 sends in flight.
async fn copy(
    brokers: &str,
    client: &BTreeMap<String, String>,
    topic: &str,
    ranges: Vec<(i32, i64, i64)>,
    rate: f64,
    progress: bool,
    what: &str,
    mut route: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<(String, OwnedHeaders)>,
) -> anyhow::Result<Summary> {
    let mut sum = Summary::default();
    if ranges.is_empty() {
        return Ok(sum);
    }
    let total: i64 = ranges.iter().map(|(_, s, e)| e - s).sum();
    let bar = bar(total as u64, progress, what);
    let mut cc = client_config(brokers, client);
    cc.set("group.id", format!("streamoasis-{what}-{}", std::process::id())).set("enable.auto.commit", "false").set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cc.create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, s, _) in &ranges {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*s))?;
    }
    consumer.assign(&tpl)?;
    let end: BTreeMap<i32, i64> = ranges.iter().map(|(p, _, e)| (*p, *e)).collect();
    let mut done: HashSet<i32> = HashSet::new();
    let mut seen: HashSet<(i32, i64)> = HashSet::new();
    let prod = producer(brokers, client)?;
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut idle = Duration::ZERO;
    while done.len() < end.len() {
        let m = match tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
            Ok(m) => {
                idle = Duration::ZERO;
                m?
            }
            Err(_) => {
                // Offsets held by transaction markers never arrive as records: a partition is
                // done when the consumer's position has reached its end offset.
                for (tp, pos) in consumer.position()?.elements().iter().map(|e| (e.partition(), e.offset())) {
                    if let (Offset::Offset(pos), Some(&e)) = (pos, end.get(&tp)) {
                        if pos >= e {
                            done.insert(tp);
                        }
                    }
                }
                idle += Duration::from_secs(2);
                anyhow::ensure!(idle < Duration::from_secs(30), "no record from {topic} for 30 s before reaching its end offsets");
                continue;
            }
        };
        let (p, o) = (m.partition(), m.offset());
        let Some(&e) = end.get(&p) else { continue };
        if o >= e {
            done.insert(p);
            continue;
        }
        if o + 1 >= e {
            done.insert(p);
        }
        if !seen.insert((p, o)) {
            continue;
        }
        sum.read += 1;
        bar.inc(1);
        let Some((target, headers)) = route(&m) else {
            sum.skipped += 1;
            continue;
        };
        if rate > 0.0 {
            tokio::time::sleep_until((started + Duration::from_secs_f64(sum.sent as f64 / rate)).into()).await;
        }
        let key = m.key().map(<[u8]>::to_vec);
        let payload = m.payload().map(<[u8]>::to_vec);
        let prod = &prod;
        pending.push(async move {
            let mut rec = FutureRecord::<Vec<u8>, Vec<u8>>::to(&target).headers(headers);
            if let Some(k) = &key {
                rec = rec.key(k);
            }
            if let Some(p) = &payload {
                rec = rec.payload(p);
            }
            prod.send(rec, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| anyhow::anyhow!("sending to {target}: {e}"))
        });
        sum.sent += 1;
        while pending.len() >= 1000 {
            pending.next().await.transpose()?;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    bar.finish_and_clear();
    Ok(sum)
}

/// Re-send ingest records (from a time, offsets or the beginning; optionally only some media
/// ids) to the ingest topic, so the tagger tags them again with its current taxonomy and model.
pub async fn retag(brokers: &str, client: &BTreeMap<String, String>, o: &RetagOptions) -> anyhow::Result<Summary> {
    let r = ranges(brokers, client, &o.topic, &o.start)?;
    let topic = o.topic.clone();
    copy(brokers, client, &o.topic, r, o.rate, o.progress, "retag", |m| {
        if let Some(ids) = &o.media_ids {
            let key = m.key().and_then(|k| std::str::from_utf8(k).ok())?;
            if !ids.contains(key) {
                return None;
            }
        }
        let mut h = OwnedHeaders::new();
        if let Some(orig) = m.headers() {
            for x in orig.iter() {
                h = h.insert(Header { key: x.key, value: x.value });
            }
        }
        Some((topic.clone(), h.insert(Header { key: "streamoasis.retag", value: Some("1") })))
    })
    .await
}

/// Re-send dead letters to the topic they came from (`source.topic` header), filtered by
/// `error.kind` and by the time they were dead-lettered. Each is sent at most once per run.
pub async fn dlq_replay(brokers: &str, client: &BTreeMap<String, String>, o: &ReplayOptions) -> anyhow::Result<Summary> {
    let start = match o.since {
        Some(ts) => Start::Timestamp(ts),
        None => Start::Beginning,
    };
    let r = ranges(brokers, client, &o.dlq, &start)?;
    let kinds: HashSet<&str> = o.kinds.iter().map(String::as_str).collect();
    let mut would = 0u64;
    let s = copy(brokers, client, &o.dlq, r, o.rate, o.progress, "dlq-replay", |m| {
        let ts = m.timestamp().to_millis().unwrap_or(0);
        if o.since.is_some_and(|s| ts < s) || o.until.is_some_and(|u| ts >= u) {
            return None;
        }
        if !kinds.is_empty() && !header(m, "error.kind").is_some_and(|k| kinds.contains(k)) {
            return None;
        }
        let target = header(m, "source.topic")?.to_string();
        if o.dry_run {
            would += 1;
            return None;
        }
        let mut h = OwnedHeaders::new();
        if let Some(orig) = m.headers() {
            for x in orig.iter().filter(|x| !DLQ_HEADERS.contains(&x.key)) {
                h = h.insert(Header { key: x.key, value: x.value });
            }
        }
        let from = format!("{}:{}:{}", m.topic(), m.partition(), m.offset());
        Some((target, h.insert(Header { key: "streamoasis.replayed_from", value: Some(from.as_str()) })))
    })
    .await?;
    if o.dry_run {
        return Ok(Summary { read: s.read, sent: 0, skipped: s.read - would });
    }
    Ok(s)
}

//! Operations that feed records back into the normal flow: re-tagging after a taxonomy or
//! model change (`streamoasis retag`) and re-sending dead letters after a fix
//! (`streamoasis dlq replay`).
//!
//! Both read a topic up to the end offsets it had when they started, so they always finish,
//! never read what they themselves wrote, and send each record they read at most once per run.
//! They send the original bytes and key: the tagger decodes and tags them as any new record
//! (with the taxonomy and model it has now), and the sink's idempotent upserts let the newer
//! tagging win. A dead letter sent without its value (too large for the dead-letter topic,
//! header `error.payload_omitted_bytes`) is replayed from the original record in its source
//! topic while that is retained; the summary counts those that are not.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{client_config, producer};
use crate::dlq::DeadLetter;

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
    /// Dead letters without a value whose original is no longer in its source topic
    /// (retention): not sent.
    pub unavailable: u64,
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

/// Where a routed record goes and what it carries.
struct Route {
    target: String,
    headers: OwnedHeaders,
    /// Send this value instead of the record's own: `Some((partition, offset))` of the original
    /// in `target` (a dead letter sent without its value).
    from_source: Option<(i32, i64)>,
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
                .map(|e| {
                    (
                        e.partition(),
                        match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => Some(i64::MAX),
                        },
                    )
                })
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
#[allow(clippy::too_many_arguments)] // the two callers pass their own options through
async fn copy(
    brokers: &str,
    client: &BTreeMap<String, String>,
    topic: &str,
    ranges: Vec<(i32, i64, i64)>,
    rate: f64,
    progress: bool,
    what: &str,
    mut route: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Option<Route>,
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
        let Some(Route { target, headers, from_source }) = route(&m) else {
            sum.skipped += 1;
            continue;
        };
        let (key, payload) = match from_source {
            None => (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)),
            Some((p, o)) => match original(brokers, client, &target, p, o).await? {
                Some(kv) => kv,
                None => {
                    sum.unavailable += 1;
                    continue;
                }
            },
        };
        if rate > 0.0 {
            tokio::time::sleep_until((started + Duration::from_secs_f64(sum.sent as f64 / rate)).into()).await;
        }
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
        Some(Route { target: topic.clone(), headers: h.insert(Header { key: "streamoasis.retag", value: Some("1") }), from_source: None })
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
        let letter = match DeadLetter::parse(m.headers()) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "skipping a record that is not a dead letter");
                return None;
            }
        };
        if !kinds.is_empty() && !kinds.contains(letter.kind.as_str()) {
            return None;
        }
        if o.dry_run {
            would += 1;
            return None;
        }
        let from = format!("{}:{}:{}", m.topic(), m.partition(), m.offset());
        let headers = DeadLetter::strip(m.headers()).insert(Header { key: "streamoasis.replayed_from", value: Some(from.as_str()) });
        let from_source = letter.payload_omitted_bytes.map(|_| (letter.source_partition, letter.source_offset));
        Some(Route { target: letter.source_topic, headers, from_source })
    })
    .await?;
    if o.dry_run {
        return Ok(Summary { read: s.read, sent: 0, skipped: s.read - would, unavailable: 0 });
    }
    Ok(s)
}

/// The key and value of the record at `topic`/`partition`/`offset`, or `None` when it is no
/// longer retained (below the partition's low watermark).
async fn original(brokers: &str, client: &BTreeMap<String, String>, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Option<(Option<Vec<u8>>, Option<Vec<u8>>)>> {
    let mut cc = client_config(brokers, client);
    cc.set("group.id", format!("streamoasis-dlq-original-{}", std::process::id())).set("enable.auto.commit", "false");
    let c: BaseConsumer = cc.create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let t = Duration::from_secs(10);
        let (low, high) = c.fetch_watermarks(&topic, partition, t)?;
        if offset < low || offset >= high {
            tracing::warn!(%topic, partition, offset, low, high, "the original of a dead letter without its value is no longer retained: it cannot be replayed");
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
        c.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) if m.offset() == offset => return Ok(Some((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)))),
                // A transaction marker or an aborted record sits at the offset: nothing to send.
                Some(Ok(m)) if m.offset() > offset => return Ok(None),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow::anyhow!("reading the original at {topic}/{partition}@{offset}: {e}")),
                None => {}
            }
        }
        anyhow::bail!("the original at {topic}/{partition}@{offset} did not arrive within 30 s")
    })
    .await?
}

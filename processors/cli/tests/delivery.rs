//! Delivery guarantees on the real local stack: per-key order with input-derived versions (one
//! tagger, and two taggers across a forced rebalance), and exactly-once through a `kill -9` of
//! the shipped binary. Every test uses its own topics, groups, subjects and keyspace.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cql, env, spawn, Env};
use rdkafka::message::{Headers, Message};
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind, MediaTagged};
use streamoasis_pipeline::kafka::producer;
use streamoasis_sink::SinkConfig;
use streamoasis_tagger::{Tagger, TaggerConfig};

/// v1: a long transcript (several windows, slow); v2: title only (fast), ingested later.
fn versions(key: usize) -> (MediaIngested, MediaIngested) {
    let base = now_millis();
    let words = "The striker scored twice as the team won the championship final in extra time after a long season of matches. ";
    let v1 = MediaIngested {
        media_id: format!("ordered-{key:03}"),
        kind: MediaKind::Episode,
        title: format!("Episode {key}, first cut"),
        description: Some("A long match report.".into()),
        transcript: Some(words.repeat(60)),
        language: Some("en".into()),
        source: "delivery-test".into(),
        ingested_at: base,
        attributes: HashMap::from([("version".to_string(), "1".to_string())]),
        candidate_labels: None,
    };
    let v2 = MediaIngested {
        title: "The company reported record quarterly profits and its shares rose".into(),
        description: None,
        transcript: None,
        ingested_at: base + 1000,
        attributes: HashMap::from([("version".to_string(), "2".to_string())]),
        ..v1.clone()
    };
    (v1, v2)
}

/// For each key: the last tagged event on the output (partition order) and the stored row hold v2.
async fn assert_newest_wins(env: &Env, v2s: &HashMap<String, MediaIngested>, events: &[MediaTagged]) {
    let mut last: HashMap<&str, &MediaTagged> = HashMap::new();
    for e in events {
        last.insert(&e.media_id, e);
    }
    assert_eq!(last.len(), v2s.len(), "every key tagged");
    for (id, v2) in v2s {
        assert_eq!(last[id.as_str()].ingested_at, v2.ingested_at, "{id}: the last tagged event is v2");
    }
    let ks = SinkConfig::from_topology(&env.topo).unwrap().keyspace;
    let session = cql().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = session.query_unpaged(format!("SELECT media_id, ingested_at, top_tag FROM {ks}.media_tags"), ()).await.unwrap().into_rows_result().unwrap();
        let rows: Vec<(String, scylla::value::CqlTimestamp, Option<String>)> = rows.rows().unwrap().collect::<Result<_, _>>().unwrap();
        let newest = rows.iter().filter(|(id, at, _)| v2s.get(id).is_some_and(|v| v.ingested_at == at.0)).count();
        if newest == v2s.len() && rows.len() == v2s.len() {
            // The row's top tag is the one of the last tagged event.
            for (id, _, top) in &rows {
                assert_eq!(top.as_deref(), last[id.as_str()].tags.first().map(|t| t.label.as_str()), "{id}: row matches its newest event");
            }
            break;
        }
        assert!(Instant::now() < deadline, "rows hold v2 for {newest} of {} keys ({} rows)", v2s.len(), rows.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newest_version_wins_per_key_with_one_tagger() {
    streamoasis_testkit::require_stack!();
    let env = env(3, "at_least_once").await;
    let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&env.topo).unwrap()).await.unwrap());
    let (stop_t, task_t) = env.start_tagger(tagger);
    let (stop_s, task_s) = env.start_sink().await;
    let p = producer(&env.kafka, &BTreeMap::new()).unwrap();
    let mut v2s = HashMap::new();
    for k in 0..50 {
        let (v1, v2) = versions(k);
        env.send(&p, &v1).await;
        env.send(&p, &v2).await;
        v2s.insert(v2.media_id.clone(), v2);
    }
    let out = env.consumer(env.output(), false);
    let events = env.read_tagged(&out, 100, Duration::from_secs(240), Duration::from_secs(2)).await;
    assert_eq!(events.len(), 100, "two events per key, no duplicates");
    assert_newest_wins(&env, &v2s, &events).await;
    stop_t.cancel();
    stop_s.cancel();
    let t = task_t.await.unwrap().unwrap();
    let s = task_s.await.unwrap().unwrap();
    assert_eq!((t.processed, t.dead_lettered), (100, 0));
    assert_eq!((s.processed, s.dead_lettered), (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn newest_version_wins_per_key_with_two_taggers_and_a_rebalance() {
    streamoasis_testkit::require_stack!();
    let env = env(4, "at_least_once").await;
    let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&env.topo).unwrap()).await.unwrap());
    let (stop_a, task_a) = env.start_tagger(tagger.clone());
    let (stop_s, task_s) = env.start_sink().await;
    let p = producer(&env.kafka, &BTreeMap::new()).unwrap();
    let mut v2s = HashMap::new();
    let mut task_b = None;
    for k in 0..50 {
        let (v1, v2) = versions(k);
        env.send(&p, &v1).await;
        if k == 20 {
            // A second tagger joins while v1s are in flight: the group rebalances.
            task_b = Some(env.start_tagger(tagger.clone()));
        }
        env.send(&p, &v2).await;
        v2s.insert(v2.media_id.clone(), v2);
    }
    let out = env.consumer(env.output(), false);
    let mut events = env.read_tagged(&out, 100, Duration::from_secs(300), Duration::from_secs(5)).await;
    let versions: std::collections::HashSet<(String, i64)> = events.iter().map(|e| (e.media_id.clone(), e.ingested_at)).collect();
    assert_eq!(versions.len(), 100, "every version tagged ({} events)", events.len());
    assert_newest_wins(&env, &v2s, &events).await;
    let (stop_b, task_b) = task_b.unwrap();
    stop_a.cancel();
    stop_b.cancel();
    stop_s.cancel();
    let a = task_a.await.unwrap().unwrap();
    let b = task_b.await.unwrap().unwrap();
    task_s.await.unwrap().unwrap();
    // Replays (records in flight on a revoked partition) may come late: read to the end.
    events.extend(env.read_tagged(&out, 0, Duration::from_secs(10), Duration::from_secs(3)).await);
    assert_eq!(events.len() as u64, a.processed + b.processed, "one tagged event per record handled, nothing else: a {a:?} b {b:?}");
    assert!(b.processed > 0, "the second tagger got partitions: {b:?}");
}

/// Records of the output topic a reader with this isolation level sees, from the beginning to the
/// end (read_committed: to the last stable offset).
async fn count(env: &Env, read_committed: bool) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::{Offset, TopicPartitionList};
    let (topic, kafka) = (env.output().to_string(), env.kafka.clone());
    tokio::task::spawn_blocking(move || {
        let mut cc = streamoasis_pipeline::kafka::client_config(&kafka, &BTreeMap::new());
        cc.set("group.id", format!("count-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" });
        let c: BaseConsumer = cc.create().unwrap();
        let md = c.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(&topic, p.id(), Offset::Beginning).unwrap();
        }
        let mut left = tpl.count();
        c.assign(&tpl).unwrap();
        let (mut n, deadline) = (0, Instant::now() + Duration::from_secs(30));
        while left > 0 && Instant::now() < deadline {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => n += 1,
                Some(Err(KafkaError::PartitionEOF(_))) => left -= 1,
                _ => {}
            }
        }
        assert_eq!(left, 0, "{topic} read to its end within 30 s");
        n
    })
    .await
    .unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success(), "kill {sig}");
}

/// `streamoasis tagger` as a child process on this test's topology.
fn spawn_tagger(env: &Env, log: &Path) -> Child {
    spawn(env, &["tagger"], &[], log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_survives_kill_9_without_duplicates() {
    streamoasis_testkit::require_stack!();
    let env = env(3, "exactly_once").await;
    let p = producer(&env.kafka, &BTreeMap::new()).unwrap();
    let n = 600;
    let mut poison_offsets = Vec::new();
    for i in 0..n {
        let item = MediaIngested {
            media_id: format!("eos-{i:04}"),
            kind: MediaKind::Clip,
            title: format!("The team won the championship final, report number {i}"),
            description: None,
            transcript: None,
            language: Some("en".into()),
            source: "eos-test".into(),
            ingested_at: now_millis(),
            attributes: Default::default(),
            candidate_labels: None,
        };
        env.send(&p, &item).await;
        if i % 100 == 7 {
            poison_offsets.push(env.send_raw(&p, &format!("poison-{i}"), Some(b"not avro")).await);
        }
    }
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("eos-{}.log", env.id));
    let mut child = spawn_tagger(&env, &log);
    // Kill it mid-stream: after some transactions committed, before all.
    let out = env.consumer(env.output(), true);
    let first = env.read_tagged(&out, 100, Duration::from_secs(180), Duration::ZERO).await;
    assert!(first.len() >= 100, "the tagger committed transactions before the kill ({} events)", first.len());
    // Freeze it at a moment its open transaction holds records (a read_uncommitted reader sees
    // more than a read_committed one), then kill it there: that transaction must be aborted.
    let mut at_kill = None;
    for _ in 0..40 {
        signal(&child, "-STOP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (u, c) = (count(&env, false).await, count(&env, true).await);
        if u > c {
            at_kill = Some((u, c));
            break;
        }
        signal(&child, "-CONT");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (u, c) = at_kill.expect("the tagger was caught with an open transaction holding records");
    assert!(c < n, "killed before it had committed all {n} ({c} committed, {u} written)");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut child = spawn_tagger(&env, &log);
    let rest = env.read_tagged(&out, n - first.len(), Duration::from_secs(300), Duration::from_secs(10)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    let mut counts: HashMap<String, usize> = HashMap::new();
    for e in first.iter().chain(&rest) {
        *counts.entry(e.media_id.clone()).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert_eq!(counts.len(), n, "every item tagged once the tagger came back (log: {})", log.display());
    assert!(dups.is_empty(), "a read_committed reader saw duplicates: {dups:?}");
    // The killed transaction's records are still in the log, marked aborted.
    let (u, c) = (count(&env, false).await, count(&env, true).await);
    assert_eq!(c, n, "read_committed: exactly one event per item");
    assert!(u > c, "a transaction was aborted: read_uncommitted sees {u} records, read_committed {c}");

    let dlq = env.consumer(&env.topo.file.processors.tagger.dlq, true);
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline && dead.len() <= poison_offsets.len() {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), dlq.recv()).await {
            let header = |k: &str| m.headers().unwrap().iter().find(|h| h.key == k).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap();
            assert_eq!(m.payload(), Some(&b"not avro"[..]), "original bytes");
            assert_eq!(header("error.kind"), "bad_framing");
            dead.push((header("source.partition").parse::<i32>().unwrap(), header("source.offset").parse::<i64>().unwrap()));
        } else if dead.len() == poison_offsets.len() {
            break;
        }
    }
    dead.sort_unstable();
    poison_offsets.sort_unstable();
    assert_eq!(dead, poison_offsets, "each poison record dead-lettered exactly once");
}

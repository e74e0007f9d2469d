//! `streamoasis produce --rate` paces records over time (the built binary, as a process,
//! against the real local stack: `scripts/stack up`, then `. .cache/stack/env`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::MediaIngested;
use streamoasis_pipeline::kafka::client_config;
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::{admin, env};

use streamoasis_testkit::root;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_20_for_10_seconds_spreads_records_over_10_seconds() {
    streamoasis_testkit::require_stack!();
    // A topology whose tagger input is a fresh topic (one partition) with its own subject.
    let mut topo = Topology::load(root().join("topology.yaml")).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let input = topo.file.processors.tagger.input.clone();
    let topic = format!("{input}-produce-{id}");
    topo.file.topics.retain(|t| t.name == input);
    topo.file.topics[0].name = topic.clone();
    topo.file.topics[0].partitions = 1;
    topo.file.schemas.retain(|s| s.subject == format!("{input}-value"));
    topo.file.schemas[0].subject = format!("{topic}-value");
    let kafka = env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA);
    let registry = env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY);
    let codec = Codec::new(&registry).unwrap();
    admin::apply_topics(&kafka, &topo).await.expect("topics (is `scripts/stack up` running?)");
    admin::apply_schemas(&codec, &topo).await.expect("schemas");

    let dir = std::env::temp_dir().join(format!("streamoasis-produce-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("items.jsonl");
    let lines: String = (0..200).map(|i| format!("{{\"id\": \"pace-{i}\", \"title\": \"Item {i}\"}}\n")).collect();
    std::fs::write(&file, lines).unwrap();

    let (k, r, t, f) = (kafka.clone(), registry.clone(), topic.clone(), file.clone());
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_streamoasis"))
            .current_dir(root())
            .args(["produce", "--rate", "20", "--quiet", "--topic", &t])
            .arg(&f)
            .env("KAFKA_BOOTSTRAP", &k)
            .env("SCHEMA_REGISTRY_URL", &r)
            .status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "produce exited with {status}");

    let mut cc = client_config(&kafka, &BTreeMap::new());
    cc.set("group.id", format!("test-produce-{id}")).set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cc.create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut stamps: HashMap<String, (i64, i64)> = HashMap::new();
    let mut records = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Until 200 distinct items, then 2 s more: a duplicate sent late must be seen too.
    while tokio::time::Instant::now() < deadline {
        let wait = if stamps.len() < 200 { Duration::from_secs(5) } else { Duration::from_secs(2) };
        let Ok(Ok(m)) = tokio::time::timeout(wait, consumer.recv()).await else {
            if stamps.len() >= 200 {
                break;
            }
            continue;
        };
        records += 1;
        let kafka_ts = m.timestamp().to_millis().unwrap();
        let item: MediaIngested = codec.decode(m.payload()).await.unwrap().event;
        stamps.insert(item.media_id.clone(), (kafka_ts, item.ingested_at));
    }
    assert_eq!(stamps.len(), 200, "every produced item is read back");
    assert_eq!(records, 200, "each exactly once: no duplicate records on the topic");
    let ts: Vec<i64> = stamps.values().map(|(k, _)| *k).collect();
    let spread = (ts.iter().max().unwrap() - ts.iter().min().unwrap()) as f64 / 1000.0;
    // 200 records at 20/s: the first at 0 s, the last at 9.95 s.
    assert!((9.0..=11.5).contains(&spread), "records spread over {spread:.2} s, expected ~10 s");
    // No burst: no second holds more than 1.5x its share.
    let t0 = *ts.iter().min().unwrap();
    let mut per_second = [0usize; 12];
    for t in &ts {
        per_second[(((t - t0) / 1000) as usize).min(11)] += 1;
    }
    assert!(per_second.iter().all(|&n| n <= 30), "records per second: {per_second:?}");
    // ingested_at is stamped when the record is sent.
    let worst = stamps.values().map(|(k, i)| (k - i).abs()).max().unwrap();
    assert!(worst < 1000, "ingested_at differs from the Kafka timestamp by up to {worst} ms");
    std::fs::remove_dir_all(&dir).ok();
}

//! The sink's dead-letter topic on the real local stack: a poison tagged event (not Avro), a
//! tagged event the database rejects (a tag over Cassandra's 64 KiB key limit in `media_by_tag`),
//! and a poison too large for the dead-letter topic each land in `media.tagged.dlq` once, with
//! their kind; the first two byte for byte, the third as headers with
//! `error.payload_omitted_bytes`. Good events before and after them are written: the stream goes on.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{cql, env};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureRecord;
use streamoasis_pipeline::events::{now_millis, Lineage, MediaKind, MediaTagged, ModelRef, Strategy, Tag};
use streamoasis_pipeline::kafka::{client_config, producer};
use streamoasis_sink::SinkConfig;

fn tagged(id: &str, label: &str) -> MediaTagged {
    MediaTagged {
        media_id: id.into(),
        kind: MediaKind::Article,
        tags: vec![Tag { label: label.into(), score: 0.9 }],
        no_tags_reason: None,
        strategy: Strategy::Embedding,
        model: ModelRef { name: "test".into(), version: "1".into() },
        ingested_at: now_millis(),
        tagged_at: now_millis(),
        lineage: Lineage { topic: "media.ingested".into(), partition: 0, offset: 0 },
        title: Some("A title".into()),
        source: Some("sink-dlq-test".into()),
        language: None,
        attributes: HashMap::new(),
        taxonomy_version: None,
        embedding: None,
    }
}

/// A dead letter: key, payload, headers.
type Letter = (Option<Vec<u8>>, Option<Vec<u8>>, HashMap<String, String>);

/// Every record of `topic` from the beginning to its end.
fn read_all(kafka: &str, topic: &str) -> Vec<Letter> {
    common::read_topic(kafka, topic).into_iter().map(|r| (r.key, r.payload, r.headers.into_iter().collect())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_dead_letters_poison_and_rejected_writes_byte_for_byte_and_goes_on() {
    streamoasis_testkit::require_stack!();
    let env = env(1, "at_least_once").await;
    let tags = env.output().to_string();
    let dlq = env.topo.file.processors.sink.dlq.clone();
    // The sink's dead-letter topic takes at most 64 KiB per record here, so a larger poison can
    // only be dead-lettered without its payload.
    let admin: AdminClient<DefaultClientContext> = client_config(&env.kafka, &BTreeMap::new()).create().unwrap();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&dlq)).set("max.message.bytes", "65536");
    for r in admin.alter_configs([&alter], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }

    let p = producer(&env.kafka, &BTreeMap::new()).unwrap();
    let send = |key: String, value: Vec<u8>| {
        let p = p.clone();
        let tags = tags.clone();
        async move {
            let d = p.send(FutureRecord::to(&tags).key(&key).payload(&value), Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
            (d.partition, d.offset)
        }
    };
    let good_1 = env.codec.encode(&tags, &tagged("sink-good-1", "sport")).await.unwrap();
    let not_avro = b"\x07 this is not a tagged event".to_vec();
    // A label of 70,000 bytes: media_by_tag's partition key is over Cassandra's 65,535-byte limit.
    let rejected = env.codec.encode(&tags, &tagged("sink-rejected", &"x".repeat(70_000))).await.unwrap();
    // 200 KB that no compression shrinks below the limit (a fixed pseudo-random sequence).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut too_big: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    too_big[0] = b'z'; // not the Confluent framing
    let good_2 = env.codec.encode(&tags, &tagged("sink-good-2", "business")).await.unwrap();
    send("sink-good-1".into(), good_1).await;
    let at_poison = send("sink-poison".into(), not_avro.clone()).await;
    let at_rejected = send("sink-rejected".into(), rejected.clone()).await;
    let at_big = send("sink-too-big".into(), too_big.clone()).await;
    send("sink-good-2".into(), good_2).await;

    let (stop, task) = env.start_sink().await;
    let ks = SinkConfig::from_topology(&env.topo).unwrap().keyspace;
    let session = cql().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ids: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        if let Ok(r) = session.query_unpaged(format!("SELECT media_id FROM {ks}.media_tags"), ()).await {
            ids = r.into_rows_result().unwrap().rows::<(String,)>().unwrap().map(|r| r.unwrap().0).collect();
            ids.sort();
            if ids.len() >= 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ids, ["sink-good-1", "sink-good-2"], "the good events around the poison are written, and nothing else");
    stop.cancel();
    let s = task.await.unwrap().unwrap();
    assert_eq!((s.processed, s.dead_lettered), (2, 3), "sink summary {s:?}");

    let letters = read_all(&env.kafka, &dlq);
    assert_eq!(letters.len(), 3, "three dead letters: {:?}", letters.iter().map(|l| &l.2).collect::<Vec<_>>());
    let by_key: HashMap<Vec<u8>, &Letter> = letters.iter().map(|l| (l.0.clone().unwrap(), l)).collect();
    let check = |key: &str, kind: &str, at: (i32, i64)| {
        let l = by_key.get(key.as_bytes()).unwrap_or_else(|| panic!("{key} dead-lettered"));
        assert_eq!(l.2.get("error.kind").map(String::as_str), Some(kind), "{key}: error.kind; headers {:?}", l.2);
        assert_eq!(l.2.get("error.processor").map(String::as_str), Some("sink"), "{key}: error.processor");
        assert_eq!(l.2.get("source.topic"), Some(&tags), "{key}: source.topic");
        assert_eq!(l.2.get("source.partition"), Some(&at.0.to_string()), "{key}: source.partition");
        assert_eq!(l.2.get("source.offset"), Some(&at.1.to_string()), "{key}: source.offset");
        *l
    };
    let l = check("sink-poison", "bad_framing", at_poison);
    assert_eq!(l.1.as_deref(), Some(&not_avro[..]), "poison dead-lettered byte for byte");
    assert!(!l.2.contains_key("error.payload_omitted_bytes"));
    let l = check("sink-rejected", "db_rejected", at_rejected);
    assert_eq!(l.1.as_deref(), Some(&rejected[..]), "rejected write dead-lettered byte for byte");
    assert!(!l.2.contains_key("error.payload_omitted_bytes"));
    let l = check("sink-too-big", "bad_framing", at_big);
    assert_eq!(l.1, None, "a poison over the dead-letter topic's limit goes without its payload");
    assert_eq!(l.2.get("error.payload_omitted_bytes"), Some(&too_big.len().to_string()), "and says how large it was");
}

//! The local stack is real: a Kafka broker and a schema registry, started by `scripts/stack up`.
//! Reads KAFKA_BOOTSTRAP and SCHEMA_REGISTRY_URL (defaults: the stack's loopback ports).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, SrSettings};
use streamoasis_pipeline::client::{client_config, producer};
use streamoasis_pipeline::codec::{Codec, CodecError};
use streamoasis_pipeline::env;
use streamoasis_pipeline::error::ErrorKind;
use streamoasis_pipeline::events::{MediaIngested, MediaKind, MEDIA_INGESTED_AVSC};

fn kafka() -> String {
    env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA)
}
fn registry() -> String {
    env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY)
}
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config(&kafka(), &BTreeMap::new()).create().unwrap();
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let r = admin.create_topics([&t], &AdminOptions::new()).await.expect("Kafka admin request (is `scripts/stack up` running?)");
    r[0].as_ref().expect("topic created");
}

#[tokio::test]
async fn kafka_produce_and_consume_round_trip() {
    streamoasis_testkit::require_stack!();
    let topic = unique("stack-roundtrip");
    create_topic(&topic, 2).await;
    let p = producer(&kafka(), &BTreeMap::new()).unwrap();
    for i in 0..20 {
        let key = format!("k{i}");
        let payload = format!("value {i}");
        p.send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("acked");
    }
    let mut cc = client_config(&kafka(), &BTreeMap::new());
    cc.set("group.id", unique("g")).set("auto.offset.reset", "earliest");
    let c: StreamConsumer = cc.create().unwrap();
    c.subscribe(&[&topic]).unwrap();
    let mut got = Vec::new();
    while got.len() < 20 {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv()).await.expect("records arrive").unwrap();
        got.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
    }
    got.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("value {i}")).collect();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn registry_registers_a_schema_and_serves_it_by_id() {
    streamoasis_testkit::require_stack!();
    let codec = Codec::new(&registry()).unwrap();
    let subject = format!("{}-value", unique("stack-subject"));
    let id = codec.register(&subject, MEDIA_INGESTED_AVSC, "BACKWARD").await.expect("registry answers (is `scripts/stack up` running?)");
    // Registering the same schema again is idempotent.
    assert_eq!(codec.register(&subject, MEDIA_INGESTED_AVSC, "BACKWARD").await.unwrap(), id);
    let settings = SrSettings::new(registry());
    let back = get_schema_by_id(id, &settings).await.expect("schema by id");
    let a = apache_avro::Schema::parse_str(&back.schema).unwrap();
    let b = apache_avro::Schema::parse_str(MEDIA_INGESTED_AVSC).unwrap();
    assert_eq!(a.canonical_form(), b.canonical_form());
}

#[tokio::test]
async fn codec_round_trips_through_the_registry_and_flags_poison() {
    streamoasis_testkit::require_stack!();
    let codec = Codec::new(&registry()).unwrap();
    let topic = unique("stack-codec");
    codec.register(&format!("{topic}-value"), MEDIA_INGESTED_AVSC, "BACKWARD").await.unwrap();
    let item = MediaIngested {
        media_id: "m-42".into(),
        kind: MediaKind::Podcast,
        title: "Ep. 42".into(),
        description: None,
        transcript: Some("hello".into()),
        language: None,
        source: "test".into(),
        ingested_at: 1_700_000_000_000,
        attributes: Default::default(),
        candidate_labels: None,
    };
    let bytes = codec.encode(&topic, &item).await.unwrap();
    assert_eq!(bytes[0], 0, "Confluent magic byte");
    let back = codec.decode::<MediaIngested>(Some(&bytes)).await.unwrap();
    assert_eq!(back.event, item);

    let kind = |r: Result<_, CodecError>| match r {
        Err(CodecError::Poison { kind, .. }) => kind,
        other => panic!("expected poison, got {other:?}"),
    };
    assert_eq!(kind(codec.decode::<MediaIngested>(None).await.map(|_| ())), ErrorKind::EmptyPayload);
    assert_eq!(kind(codec.decode::<MediaIngested>(Some(b"{\"json\":1}")).await.map(|_| ())), ErrorKind::BadFraming);
    assert_eq!(kind(codec.decode::<MediaIngested>(Some(&[0, 0x7f, 0xff, 0xff, 0x01, 2, 3])).await.map(|_| ())), ErrorKind::UnknownSchemaId);
    let mut truncated = bytes.clone();
    truncated.truncate(8);
    assert_eq!(kind(codec.decode::<MediaIngested>(Some(&truncated)).await.map(|_| ())), ErrorKind::Undecodable);
}

#[tokio::test]
async fn an_unreachable_registry_is_transient_not_poison() {
    let codec = Codec::new("http://127.0.0.1:9/apis/ccompat/v7").unwrap();
    match codec.decode::<MediaIngested>(Some(&[0, 0, 0, 0, 1, 2])).await {
        Err(CodecError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

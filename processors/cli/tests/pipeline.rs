//! End to end on the real local stack (Kafka, schema registry, CQL database): the tagger and
//! sink processors run in-process exactly as `streamoasis tagger|sink` runs them. Every test
//! uses its own topics, consumer groups, subjects and keyspace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{MediaIngested, MediaKind, MediaTagged};
use streamoasis_pipeline::kafka::{client_config, producer, RunSummary};
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::{admin, env, CancellationToken};
use streamoasis_sink::{schema, SinkConfig, TagWriter};
use streamoasis_tagger::processor::request_of;
use streamoasis_tagger::{Tagger, TaggerConfig};
use tokio::task::JoinHandle;

struct Env {
    topo: Topology,
    codec: Arc<Codec>,
    kafka: String,
    input: String,
    output: String,
    dlq: String,
}

use streamoasis_testkit::root;

/// The project topology with unique topic, group and keyspace names.
async fn env(partitions: i32) -> Env {
    let mut topo = Topology::load(root().join("topology.yaml")).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    topo.isolate(&id).unwrap();
    for t in &mut topo.file.topics {
        t.partitions = partitions;
    }
    let p = &mut topo.file.processors;
    for spec in [&mut p.tagger, &mut p.sink] {
        spec.drain_timeout = Duration::from_secs(20);
    }
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.scylla {
        m.insert("consistency".into(), "ONE".into());
    }
    let model = root().join("models/all-MiniLM-L6-v2");
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.tagging {
        if let Some(serde_yaml::Value::Mapping(model_map)) = m.get_mut("model") {
            model_map.insert("path".into(), model.display().to_string().into());
        }
    }
    let kafka = env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA);
    let codec = Arc::new(Codec::new(&env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY)).unwrap());
    admin::apply_topics(&kafka, &topo).await.expect("topics (is `scripts/stack up` running?)");
    admin::apply_schemas(&codec, &topo).await.expect("schemas");
    let p = &topo.file.processors.tagger;
    Env { input: p.input.clone(), output: p.output.clone().unwrap(), dlq: p.dlq.clone(), topo, codec, kafka }
}

impl Env {
    async fn tagger(&self) -> Arc<Tagger> {
        let cfg = TaggerConfig::from_topology(&self.topo).unwrap();
        Arc::new(Tagger::load(cfg).await.unwrap())
    }

    fn start_tagger(&self, tagger: Arc<Tagger>) -> (CancellationToken, JoinHandle<anyhow::Result<RunSummary>>) {
        let stop = CancellationToken::new();
        // The same wiring as `streamoasis tagger`.
        let (topo, kafka, codec, s) = (self.topo.clone(), self.kafka.clone(), self.codec.clone(), stop.clone());
        let h = tokio::spawn(async move { streamoasis_tagger::serve(&topo, &kafka, codec, tagger, None, s).await });
        (stop, h)
    }

    fn sink_config(&self) -> SinkConfig {
        SinkConfig::from_topology(&self.topo).unwrap()
    }

    async fn start_sink(&self, session: scylla::client::session::Session) -> (CancellationToken, JoinHandle<anyhow::Result<RunSummary>>) {
        let cfg = self.sink_config();
        schema::apply(&session, &cfg).await.unwrap();
        let writer = Arc::new(TagWriter::new(Arc::new(session), &cfg).await.unwrap());
        let stop = CancellationToken::new();
        // The same wiring as `streamoasis sink`.
        let (topo, kafka, codec, s) = (self.topo.clone(), self.kafka.clone(), self.codec.clone(), stop.clone());
        let h = tokio::spawn(async move { streamoasis_sink::serve(&topo, &kafka, codec, writer, None, s).await });
        (stop, h)
    }

    fn producer(&self) -> FutureProducer {
        producer(&self.kafka, &BTreeMap::new()).unwrap()
    }

    async fn send_raw(&self, p: &FutureProducer, key: &str, payload: Option<&[u8]>) {
        let mut rec = FutureRecord::to(&self.input).key(key);
        if let Some(b) = payload {
            rec = rec.payload(b);
        }
        p.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    async fn send(&self, p: &FutureProducer, item: &MediaIngested) {
        let bytes = self.codec.encode(&self.input, item).await.unwrap();
        self.send_raw(p, &item.media_id, Some(&bytes)).await;
    }

    fn consumer(&self, topic: &str) -> StreamConsumer {
        let mut cc = client_config(&self.kafka, &BTreeMap::new());
        cc.set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4().simple())).set("auto.offset.reset", "earliest");
        let c: StreamConsumer = cc.create().unwrap();
        c.subscribe(&[topic]).unwrap();
        c
    }

    /// Read tagged events until `want` distinct media ids were seen (or the timeout).
    async fn collect_tagged(&self, c: &StreamConsumer, want: usize, timeout: Duration) -> (HashMap<String, MediaTagged>, usize) {
        let mut seen = HashMap::new();
        let total = self.collect_more(c, &mut seen, want, timeout).await;
        (seen, total)
    }

    /// Add tagged events to `seen` until it holds `want` distinct media ids; returns how many
    /// events were read (duplicates included).
    async fn collect_more(&self, c: &StreamConsumer, seen: &mut HashMap<String, MediaTagged>, want: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut total = 0;
        while seen.len() < want && Instant::now() < deadline {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await {
                let e = self.codec.decode::<MediaTagged>(m.payload()).await.unwrap().event;
                assert_eq!(m.key(), Some(e.media_id.as_bytes()), "output keyed by media_id");
                total += 1;
                seen.insert(e.media_id.clone(), e);
            }
        }
        total
    }
}

const SUBJECTS: [(&str, &str); 5] = [
    ("business", "The company reported record quarterly profits and its shares rose on the stock market"),
    ("sport", "The striker scored twice as the team won the championship final in extra time"),
    ("politics", "The prime minister faced questions in parliament over the election campaign"),
    ("tech", "The new smartphone software update improves battery life and internet browsing"),
    ("entertainment", "The actor won an award for the film at the festival, and the album topped the charts"),
];

fn item(i: usize) -> MediaIngested {
    let (_, text) = SUBJECTS[i % SUBJECTS.len()];
    MediaIngested {
        media_id: format!("item-{i:05}"),
        kind: MediaKind::Clip,
        title: format!("{text} (part {i})"),
        description: i.is_multiple_of(3).then(|| format!("Episode {i} of the series.")),
        transcript: None,
        language: Some("en".into()),
        source: "e2e-test".into(),
        ingested_at: streamoasis_pipeline::events::now_millis(),
        attributes: Default::default(),
        candidate_labels: None,
    }
}

async fn cql() -> scylla::client::session::Session {
    let uri = env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA);
    scylla::client::session_builder::SessionBuilder::new().known_node(&uri).build().await.expect("CQL database (is `scripts/stack up` running?)")
}

async fn count(session: &scylla::client::session::Session, ks: &str) -> i64 {
    streamoasis_sink::count_rows(session, &format!("SELECT COUNT(*) FROM {ks}.media_tags")).await.unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_items_in_a_thousand_tagged_events_and_rows_out() {
    streamoasis_testkit::require_stack!();
    let env = env(3).await;
    let tagger = env.tagger().await;
    let (stop_t, tagger_task) = env.start_tagger(tagger.clone());
    let (stop_s, sink_task) = env.start_sink(cql().await).await;
    let items: Vec<MediaIngested> = (0..1000).map(item).collect();
    let p = env.producer();
    futures::future::join_all(items.iter().map(|i| env.send(&p, i))).await;

    let out = env.consumer(&env.output);
    let (seen, total) = env.collect_tagged(&out, 1000, Duration::from_secs(240)).await;
    assert_eq!(seen.len(), 1000, "every item tagged");
    // Nothing more arrives: exactly one event per item in steady state.
    let extra = env.collect_more(&out, &mut seen.clone(), 1001, Duration::from_secs(3)).await;
    assert_eq!(total + extra, 1000, "one tagged event per item, no duplicates");

    // Tags match the tagger core's output for the same texts (batching may change the last
    // float bits through padding, hence the tolerance).
    for it in items.iter().step_by(7) {
        let want = tagger.tag(&request_of(it)).await.unwrap();
        let got = &seen[&it.media_id];
        assert_eq!(got.tags.len(), want.tags.len());
        assert_eq!(got.tags[0].label, want.tags[0].label, "{}", it.media_id);
        for (g, w) in got.tags.iter().zip(&want.tags) {
            let ws = want.tags.iter().find(|t| t.label == g.label).map(|t| t.score).unwrap_or(w.score);
            assert!((g.score - ws).abs() < 1e-3, "{}: {} {} vs {}", it.media_id, g.label, g.score, ws);
        }
        assert_eq!(got.lineage.topic, env.input);
        assert_eq!(got.taxonomy_version.as_deref(), Some(want.taxonomy_version.as_str()), "{}: taxonomy version", it.media_id);
    }
    // One taxonomy version for the whole run: the topology's labels and settings.
    let tc = TaggerConfig::from_topology(&env.topo).unwrap();
    let version = tc.taxonomy_version(&tc.labels);
    assert_eq!(tagger.taxonomy_version(), version);
    assert!(seen.values().all(|e| e.taxonomy_version.as_deref() == Some(version.as_str())), "every event carries {version}");

    let ks = env.sink_config().keyspace;
    let session = cql().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&session, &ks).await < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&session, &ks).await, 1000, "a row per item in media_tags");
    // Rows read back and compared with the tagged events: tags, top tag, version, by-tag rows.
    let rows = session
        .query_unpaged(format!("SELECT media_id, tags, top_tag, ingested_at, source_partition, source_offset, taxonomy_version FROM {ks}.media_tags"), ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    type Row = (String, HashMap<String, f32>, Option<String>, scylla::value::CqlTimestamp, i32, i64, Option<String>);
    let rows: Vec<Row> = rows.rows().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(rows.len(), 1000);
    let mut by_tag: HashMap<String, usize> = HashMap::new();
    for (id, tags, top, at, part, off, taxonomy) in &rows {
        let e = &seen[id];
        let want: HashMap<String, f32> = e.tags.iter().map(|t| (t.label.clone(), t.score)).collect();
        assert_eq!(tags, &want, "{id}: stored tags");
        assert_eq!(top.as_deref(), e.tags.first().map(|t| t.label.as_str()), "{id}: top tag");
        assert_eq!((at.0, *part, *off), (e.ingested_at, e.lineage.partition, e.lineage.offset), "{id}: version from the input");
        assert_eq!(taxonomy.as_deref(), Some(version.as_str()), "{id}: stored taxonomy version");
        for t in &e.tags {
            *by_tag.entry(t.label.clone()).or_default() += 1;
        }
    }
    for (tag, n) in &by_tag {
        let stored = streamoasis_sink::read::count_by_tag(&session, &ks, tag).await.unwrap();
        assert_eq!(stored as usize, *n, "media_by_tag rows for {tag}");
    }
    stop_t.cancel();
    stop_s.cancel();
    let t = tagger_task.await.unwrap().unwrap();
    let s = sink_task.await.unwrap().unwrap();
    assert_eq!((t.processed, t.dead_lettered), (1000, 0), "tagger {t:?}");
    assert_eq!((s.processed, s.dead_lettered), (1000, 0), "sink {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_go_to_the_dlq_with_headers_and_the_partition_goes_on() {
    streamoasis_testkit::require_stack!();
    let env = env(1).await;
    let (stop, task) = env.start_tagger(env.tagger().await);
    let p = env.producer();

    // A schema the registry knows, but not a MediaIngested.
    let other_subject = format!("{}-other-value", env.input);
    let other_id = env.codec.register(&other_subject, r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"int"}]}"#, "BACKWARD").await.unwrap();
    let mut truncated = env.codec.encode(&env.input, &item(0)).await.unwrap();
    truncated.truncate(9);
    let mut wrong_schema = vec![0u8];
    wrong_schema.extend_from_slice(&other_id.to_be_bytes());
    wrong_schema.extend_from_slice(&[0x54]); // x = 42 as Avro zigzag varint
    let poisons: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("empty_payload", None),
        ("bad_framing", Some(br#"{"media_id":"json-not-avro"}"#.to_vec())),
        ("unknown_schema_id", Some(vec![0, 0x7f, 0xff, 0xff, 0x00, 1, 2, 3])),
        ("undecodable", Some(truncated)),
        ("undecodable", Some(wrong_schema)),
    ];
    let mut expected: Vec<(String, i64)> = Vec::new(); // (kind, input offset)
    let mut sent: HashMap<i64, (String, Option<Vec<u8>>)> = HashMap::new(); // offset → (key, payload)
    let mut good_ids = HashSet::new();
    let mut offset = 0i64;
    for round in 0..3 {
        for (kind, payload) in &poisons {
            env.send_raw(&p, &format!("poison-{round}-{kind}"), payload.as_deref()).await;
            sent.insert(offset, (format!("poison-{round}-{kind}"), payload.clone()));
            expected.push((kind.to_string(), offset));
            offset += 1;
            let it = item(round * 100 + offset as usize);
            env.send(&p, &it).await;
            good_ids.insert(it.media_id);
            offset += 1;
        }
        let mut empty_id = item(9000 + round);
        empty_id.media_id = String::new();
        env.send(&p, &empty_id).await;
        expected.push(("invalid_field".into(), offset));
        offset += 1;
        let mut no_labels = item(9100 + round);
        no_labels.candidate_labels = Some(vec![]);
        env.send(&p, &no_labels).await;
        expected.push(("invalid_labels".into(), offset));
        offset += 1;
        let mut too_many = item(9200 + round);
        too_many.candidate_labels = Some((0..500).map(|i| format!("label {i}")).collect());
        env.send(&p, &too_many).await;
        expected.push(("invalid_labels".into(), offset));
        offset += 1;
        let it = item(round * 100 + 50);
        env.send(&p, &it).await;
        good_ids.insert(it.media_id);
        offset += 1;
    }

    let dlq = env.consumer(&env.dlq);
    let mut got: Vec<(String, i64, HashMap<String, String>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < expected.len() && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), dlq.recv()).await {
            let mut h = HashMap::new();
            for hd in m.headers().unwrap().iter() {
                h.insert(hd.key.to_string(), String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned());
            }
            let off: i64 = h["source.offset"].parse().unwrap();
            // Key and payload are the original bytes.
            if let Some((key, payload)) = sent.get(&off) {
                assert_eq!(m.key(), Some(key.as_bytes()), "DLQ key of offset {off}");
                assert_eq!(m.payload(), payload.as_deref().filter(|p| !p.is_empty()), "DLQ payload of offset {off}");
            }
            got.push((h["error.kind"].clone(), off, h));
        }
    }
    got.sort_by_key(|g| g.1);
    let kinds: Vec<(String, i64)> = got.iter().map(|(k, o, _)| (k.clone(), *o)).collect();
    assert_eq!(kinds, expected, "each poison record in the DLQ with its kind and source offset");
    for (_, _, h) in &got {
        assert_eq!(h["source.topic"], env.input);
        assert_eq!(h["source.partition"], "0");
        assert!(!h["error.message"].is_empty());
        assert_eq!(h["error.processor"], "tagger");
    }
    assert!(got.iter().any(|(k, _, h)| k == "undecodable" && h["schema.id"] == other_id.to_string()), "schema id header set");

    let out = env.consumer(&env.output);
    let (seen, _) = env.collect_tagged(&out, good_ids.len(), Duration::from_secs(60)).await;
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), good_ids, "every good record processed");
    stop.cancel();
    let s = task.await.unwrap().unwrap();
    assert_eq!(s.dead_lettered as usize, expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_mid_stream_loses_nothing() {
    streamoasis_testkit::require_stack!();
    let env = env(2).await;
    let tagger = env.tagger().await;
    let p = env.producer();
    let items: Vec<MediaIngested> = (0..600).map(item).collect();
    futures::future::join_all(items.iter().map(|i| env.send(&p, i))).await;

    let out = env.consumer(&env.output);
    let (stop, task) = env.start_tagger(tagger.clone());
    // Let it work on part of the input, then stop it (SIGTERM path: drain, commit, exit).
    let mut seen = HashMap::new();
    env.collect_more(&out, &mut seen, 150, Duration::from_secs(120)).await;
    assert!(seen.len() >= 150);
    stop.cancel();
    let s1 = task.await.unwrap().unwrap();
    assert!(s1.processed < 600, "stopped mid-stream ({} processed)", s1.processed);

    // The drain committed exactly what it processed.
    assert_eq!(committed(&env, &env.topo.file.processors.tagger.group, &env.input).await, s1.processed as i64, "committed offsets after the drain");

    let (stop, task) = env.start_tagger(tagger);
    let total = env.collect_more(&out, &mut seen, 600, Duration::from_secs(180)).await;
    let all: HashSet<String> = seen.keys().cloned().collect();
    stop.cancel();
    let s2 = task.await.unwrap().unwrap();
    assert_eq!(all.len(), 600, "no item lost across the restart");
    // A graceful stop (drain, then commit) replays nothing.
    assert_eq!(s1.processed + s2.processed, 600, "first run {s1:?}, second {s2:?}");
    assert_eq!(committed(&env, &env.topo.file.processors.tagger.group, &env.input).await, 600);
    let _ = total;
}

/// Sum of the group's committed offsets over the topic's partitions.
async fn committed(env: &Env, group: &str, topic: &str) -> i64 {
    let mut cc = client_config(&env.kafka, &BTreeMap::new());
    cc.set("group.id", group).set("enable.auto.commit", "false");
    let c: StreamConsumer = cc.create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements().iter().map(|e| if let rdkafka::Offset::Offset(o) = e.offset() { o } else { 0 }).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_tagger_joining_mid_stream_shares_the_partitions() {
    streamoasis_testkit::require_stack!();
    let env = env(4).await;
    let tagger = env.tagger().await;
    let p = env.producer();
    let items: Vec<MediaIngested> = (0..800).map(item).collect();
    let out = env.consumer(&env.output);
    let (stop_a, task_a) = env.start_tagger(tagger.clone());
    futures::future::join_all(items[..200].iter().map(|i| env.send(&p, i))).await;
    let mut seen = HashMap::new();
    let mut events = env.collect_more(&out, &mut seen, 50, Duration::from_secs(60)).await;
    assert!(seen.len() >= 50);
    let (stop_b, task_b) = env.start_tagger(tagger.clone());
    // Keep producing while the group rebalances.
    for chunk in items[200..].chunks(50) {
        futures::future::join_all(chunk.iter().map(|i| env.send(&p, i))).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    events += env.collect_more(&out, &mut seen, 800, Duration::from_secs(240)).await;
    let all: HashSet<String> = seen.keys().cloned().collect();
    stop_a.cancel();
    stop_b.cancel();
    let a = task_a.await.unwrap().unwrap();
    let b = task_b.await.unwrap().unwrap();
    // Whatever replays came after the 800th distinct key: read to the end (nothing more is produced).
    events += env.collect_more(&out, &mut seen, usize::MAX, Duration::from_secs(5)).await;
    assert_eq!(all.len(), 800, "no loss across the rebalance");
    assert!(a.processed > 0 && b.processed > 0, "both taggers got partitions: a {a:?}, b {b:?}");
    // Offsets were committed on revoke and on the final drain: the group is at the end.
    assert_eq!(committed(&env, &env.topo.file.processors.tagger.group, &env.input).await, 800, "committed offsets after the revoke and drains");
    // Replays happen only for records in flight on a revoked partition, each at most once.
    // Every processed record produced exactly one tagged event; a record abandoned on revoke may
    // already have had its output produced (then it is replayed: an at-least-once duplicate), or
    // not. The output holds nothing else.
    let processed = a.processed + b.processed;
    let abandoned = (a.abandoned + b.abandoned) as u64;
    assert!(
        (processed..=processed + abandoned).contains(&(events as u64)),
        "tagged events on the topic ({events}) between the records processed and those plus the abandoned (a {a:?}, b {b:?})"
    );
    assert!(a.processed + b.processed <= 800 + env.topo.file.processors.tagger.max_in_flight as u64, "replays bounded by max_in_flight");
}

/// A TCP proxy in front of the CQL database that the test can take down and bring back.
struct Outage {
    addr: SocketAddr,
    target: String,
    task: Option<JoinHandle<()>>,
}

impl Outage {
    async fn start(target: String) -> Outage {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut o = Outage { addr, target, task: None };
        o.serve(l);
        o
    }
    fn serve(&mut self, l: tokio::net::TcpListener) {
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut a, _)) = l.accept().await else { break };
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        }));
    }
    /// The database "stops": the listener closes and every open connection is cut.
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
    async fn up(&mut self) {
        let l = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_survives_a_database_outage_without_loss() {
    streamoasis_testkit::require_stack!();
    let mut env = env(2).await;
    env.topo.file.processors.sink.max_in_flight = 16;
    let real = env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA);
    let real_addr: SocketAddr = tokio::net::lookup_host(&real).await.unwrap().next().unwrap();
    let mut proxy = Outage::start(real.clone()).await;
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node_addr(proxy.addr)
        .address_translator(Arc::new(HashMap::from([(real_addr, proxy.addr), (proxy.addr, proxy.addr)])))
        .build()
        .await
        .unwrap();
    let (stop_t, task_t) = env.start_tagger(env.tagger().await);
    let (stop_s, task_s) = env.start_sink(session).await;
    let p = env.producer();
    let ks = env.sink_config().keyspace;
    let direct = cql().await;

    let items: Vec<MediaIngested> = (0..400).map(item).collect();
    futures::future::join_all(items[..100].iter().map(|i| env.send(&p, i))).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&direct, &ks).await < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(count(&direct, &ks).await, 100);

    proxy.down();
    futures::future::join_all(items[100..].iter().map(|i| env.send(&p, i))).await;
    // While the database is away: no rows land, the sink does not spin, in-flight stays bounded.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = count(&direct, &ks).await;
    assert!(during <= 100 + 16, "rows landed through a closed proxy: {during}");

    proxy.up().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&direct, &ks).await < 400 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count(&direct, &ks).await, 400, "every item written after the outage");
    stop_t.cancel();
    stop_s.cancel();
    task_t.await.unwrap().unwrap();
    let s = task_s.await.unwrap().unwrap();
    assert_eq!(s.dead_lettered, 0, "an outage is not poison");
    assert_eq!(s.processed, 400);
    assert!(s.pauses >= 1, "partitions paused while the database was away: {s:?}");
    assert_eq!(s.peak_in_flight, 16, "in flight held at max_in_flight: {s:?}");
    // Backoff (100 ms doubling to 10 s) bounds the retries: at most ~10 per record in flight
    // during an 8-20 s outage.
    assert!(s.retries > 0 && s.retries <= 16 * 12, "retries {}", s.retries);
}

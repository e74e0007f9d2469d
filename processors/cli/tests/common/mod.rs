//! Shared by the integration tests that run processors against the real local stack: a unique
//! copy of the project's topology per test, and helpers to produce and read.
#![allow(dead_code)]

pub mod proc;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use scylla::client::session::Session;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{MediaIngested, MediaTagged};
use streamoasis_pipeline::kafka::{client_config, run, RunSummary, RunnerConfig};
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::{admin, env, CancellationToken};
use streamoasis_sink::{schema, SinkConfig, SinkProcessor, TagWriter};
use streamoasis_tagger::{Tagger, TaggerProcessor};
use tokio::task::JoinHandle;

pub use streamoasis_testkit::root;

/// The project's topology text with every topic, subject, group and the keyspace made unique,
/// and the model path made absolute.
pub fn topology_text(id: &str, partitions: i32, delivery: &str) -> String {
    let text = std::fs::read_to_string(root().join("topology.yaml")).unwrap();
    let model = root().join("models/all-MiniLM-L6-v2").canonicalize().unwrap();
    let schemas = root().join("schemas").canonicalize().unwrap();
    text.replace("media.ingested", &format!("media.ingested-{id}"))
        .replace("media.tagged", &format!("media.tagged-{id}"))
        .replace("group: streamoasis-tagger", &format!("group: streamoasis-tagger-{id}"))
        .replace("delivery: at_least_once", &format!("delivery: {delivery}"))
        .replace("group: streamoasis-sink", &format!("group: streamoasis-sink-{id}"))
        .replace("partitions: 6", &format!("partitions: {partitions}"))
        .replace("path: models/all-MiniLM-L6-v2", &format!("path: {}", model.display()))
        .replace("file: schemas/", &format!("file: {}/", schemas.display()))
        .replace("directions: calibration/", &format!("directions: {}/", root().join("calibration").canonicalize().unwrap().display()))
        .replace("keyspace: streamoasis", &format!("keyspace: delivery_{id}"))
}

pub struct Env {
    pub id: String,
    pub topo: Topology,
    /// The topology file (for child processes).
    pub path: PathBuf,
    pub codec: Arc<Codec>,
    pub kafka: String,
}

pub async fn env(partitions: i32, delivery: &str) -> Env {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("topology-{id}.yaml"));
    let text = topology_text(&id, partitions, delivery);
    assert!(text.contains(&format!("delivery: {delivery}")), "topology.yaml sets processors.tagger.delivery");
    std::fs::write(&path, text).unwrap();
    let mut topo = Topology::load(&path).unwrap();
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.scylla {
        m.insert("keyspace".into(), format!("delivery_{id}").into());
        m.insert("consistency".into(), "ONE".into());
    }
    let kafka = env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA);
    let codec = Arc::new(Codec::new(&env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY)).unwrap());
    admin::apply_topics(&kafka, &topo).await.expect("topics (is `scripts/stack up` running?)");
    admin::apply_schemas(&codec, &topo).await.expect("schemas");
    Env { id, topo, path, codec, kafka }
}

impl Env {
    pub fn input(&self) -> &str {
        &self.topo.file.processors.tagger.input
    }
    pub fn output(&self) -> &str {
        self.topo.file.processors.tagger.output.as_deref().unwrap()
    }

    pub fn start_tagger(&self, tagger: Arc<Tagger>) -> (CancellationToken, JoinHandle<anyhow::Result<RunSummary>>) {
        let stop = CancellationToken::new();
        let runner = RunnerConfig::new(self.kafka.clone(), self.topo.file.processors.tagger.clone(), BTreeMap::new());
        let h = tokio::spawn(run(runner, self.codec.clone(), Arc::new(TaggerProcessor::new(tagger)), stop.clone()));
        (stop, h)
    }

    pub async fn start_sink(&self) -> (CancellationToken, JoinHandle<anyhow::Result<RunSummary>>) {
        let cfg = SinkConfig::from_topology(&self.topo).unwrap();
        let session = cql().await;
        schema::apply(&session, &cfg).await.unwrap();
        let writer = Arc::new(TagWriter::new(Arc::new(session), &cfg).await.unwrap());
        let stop = CancellationToken::new();
        let runner = RunnerConfig::new(self.kafka.clone(), self.topo.file.processors.sink.clone(), BTreeMap::new());
        let h = tokio::spawn(run(runner, self.codec.clone(), Arc::new(SinkProcessor::new(writer)), stop.clone()));
        (stop, h)
    }

    pub async fn send(&self, p: &FutureProducer, item: &MediaIngested) -> (i32, i64) {
        let bytes = self.codec.encode(self.input(), item).await.unwrap();
        self.send_raw(p, &item.media_id, Some(&bytes)).await
    }

    pub async fn send_raw(&self, p: &FutureProducer, key: &str, payload: Option<&[u8]>) -> (i32, i64) {
        let mut rec = FutureRecord::to(self.input()).key(key);
        if let Some(b) = payload {
            rec = rec.payload(b);
        }
        let d = p.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        (d.partition, d.offset)
    }

    pub fn consumer(&self, topic: &str, read_committed: bool) -> StreamConsumer {
        let mut cc = client_config(&self.kafka, &BTreeMap::new());
        cc.set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" });
        let c: StreamConsumer = cc.create().unwrap();
        c.subscribe(&[topic]).unwrap();
        c
    }

    /// Every tagged event in arrival order per partition, until `want` events or `quiet` without one.
    pub async fn read_tagged(&self, c: &StreamConsumer, want: usize, timeout: Duration, quiet: Duration) -> Vec<MediaTagged> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut last = Instant::now();
        while Instant::now() < deadline && (out.len() < want || last.elapsed() < quiet) {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
                let e = self.codec.decode::<MediaTagged>(m.payload()).await.unwrap().event;
                out.push(e);
                last = Instant::now();
            } else if out.len() >= want {
                break;
            }
        }
        out
    }
}

pub async fn cql() -> Session {
    let uri = env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA);
    scylla::client::session_builder::SessionBuilder::new().known_node(&uri).build().await.expect("CQL database (is `scripts/stack up` running?)")
}

/// `streamoasis <args>` as a child process on this test's topology, logging to `log`.
pub fn spawn(env: &Env, args: &[&str], extra_env: &[(&str, String)], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamoasis"));
    cmd.args(args).env("STREAMOASIS_TOPOLOGY", &env.path).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Send SIGTERM and wait for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    child.wait().unwrap()
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// Every record of `topic`, from the beginning to its end as it is now (30 s at most), read by
/// a consumer of its own that commits nothing.
pub fn read_topic(kafka: &str, topic: &str) -> Vec<Record> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::error::KafkaError;
    use rdkafka::message::Headers;
    use rdkafka::{Offset, TopicPartitionList};
    let mut cc = client_config(kafka, &BTreeMap::new());
    cc.set("group.id", format!("test-reader-{}", uuid::Uuid::new_v4().simple())).set("enable.auto.commit", "false").set("enable.partition.eof", "true");
    let c: BaseConsumer = cc.create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    let mut left = tpl.count();
    c.assign(&tpl).unwrap();
    let (mut out, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(30));
    while left > 0 && Instant::now() < deadline {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let headers =
                    m.headers().map(|h| h.iter().map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())).collect()).unwrap_or_default();
                out.push(Record { partition: m.partition(), offset: m.offset(), key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec), headers });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => left -= 1,
            _ => {}
        }
    }
    assert_eq!(left, 0, "{topic}: not read to its end within 30 s");
    out
}

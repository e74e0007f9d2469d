//! The shipped binary as a child process on a unique copy of the topology: start it, produce to
//! it, scrape its health and metrics, signal it, read its outputs and committed offsets.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use streamoasis_pipeline::env;
use streamoasis_pipeline::kafka::client_config;

pub const BIN: &str = env!("CARGO_BIN_EXE_streamoasis");

pub fn root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).canonicalize().unwrap()
}

pub fn kafka() -> String {
    env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA)
}

pub fn registry() -> String {
    env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY)
}

pub fn scylla() -> String {
    env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA)
}

/// A copy of topology.yaml with unique names, written to a temp folder.
pub struct Topo {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub input: String,
    pub output: String,
    pub group: String,
}

pub fn topology(test: &str) -> Topo {
    topology_with(test, |_| {})
}

/// As [`topology`], then `edit` changes the YAML (e.g. a processor's timeouts) before it is written.
pub fn topology_with(test: &str, edit: impl FnOnce(&mut serde_yaml::Value)) -> Topo {
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let root = root();
    let mut t: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(root.join("topology.yaml")).unwrap()).unwrap();
    let mut rename = HashMap::new();
    for topic in t["topics"].as_sequence_mut().unwrap() {
        let name = topic["name"].as_str().unwrap().to_string();
        let new = format!("{name}.{test}-{id}");
        topic["name"] = new.clone().into();
        topic["partitions"] = 2.into();
        rename.insert(name, new);
    }
    for s in t["schemas"].as_sequence_mut().unwrap() {
        let subject = s["subject"].as_str().unwrap().trim_end_matches("-value").to_string();
        s["subject"] = format!("{}-value", rename[&subject]).into();
        let file = root.join(s["file"].as_str().unwrap());
        s["file"] = file.display().to_string().into();
    }
    for p in ["tagger", "sink"] {
        let spec = &mut t["processors"][p];
        for k in ["input", "output", "dlq"] {
            if let Some(v) = spec[k].as_str().map(str::to_string) {
                spec[k] = rename[&v].clone().into();
            }
        }
        spec["group"] = format!("{}-{test}-{id}", spec["group"].as_str().unwrap()).into();
        spec["drain_timeout"] = "20s".into();
    }
    let model = root.join(t["tagging"]["model"]["path"].as_str().unwrap());
    t["tagging"]["model"]["path"] = model.display().to_string().into();
    streamoasis_testkit::absolute_directions(&mut t["tagging"]);
    edit(&mut t);
    let dir = std::env::temp_dir().join(format!("streamoasis-process-{test}-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("topology.yaml");
    std::fs::write(&path, serde_yaml::to_string(&t).unwrap()).unwrap();
    let tagger = &t["processors"]["tagger"];
    Topo { input: tagger["input"].as_str().unwrap().into(), output: tagger["output"].as_str().unwrap().into(), group: tagger["group"].as_str().unwrap().into(), dir, path }
}

impl Topo {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("STREAMOASIS_TOPOLOGY", &self.path).env("RUST_LOG", "info,rdkafka=warn,scylla=warn").stdin(Stdio::null());
        c
    }

    /// `streamoasis topology apply --no-db` (topics and schemas).
    pub fn apply(&self) {
        let out = self.cmd().args(["topology", "apply", "--no-db"]).output().unwrap();
        assert!(out.status.success(), "topology apply (is `scripts/stack up` running?): {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `streamoasis produce` of `n` items numbered from `from`.
    pub fn produce(&self, from: usize, n: usize) -> Vec<String> {
        let ids: Vec<String> = (from..from + n).map(|i| format!("proc-{i:05}")).collect();
        let lines: String = ids
            .iter()
            .enumerate()
            .map(|(i, id)| format!("{}\n", serde_json::json!({"media_id": id, "title": format!("The team won the cup final ({i})"), "label": "sport"})))
            .collect();
        let file = self.dir.join(format!("items-{from}.jsonl"));
        std::fs::write(&file, lines).unwrap();
        let out = self.cmd().arg("produce").arg(&file).arg("--quiet").output().unwrap();
        assert!(out.status.success(), "produce: {}", String::from_utf8_lossy(&out.stderr));
        ids
    }

    /// Start `streamoasis tagger --metrics-addr ...`, its log in the temp folder.
    pub fn spawn_tagger(&self, metrics: SocketAddr) -> Proc {
        self.spawn_tagger_env(metrics, &[])
    }

    /// As [`Topo::spawn_tagger`], with extra environment variables.
    pub fn spawn_tagger_env(&self, metrics: SocketAddr, vars: &[(&str, &str)]) -> Proc {
        let log = self.dir.join("tagger.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = self.cmd();
        cmd.args(["tagger", "--metrics-addr", &metrics.to_string()]);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Proc { child, log, metrics }
    }

    /// `streamoasis produce` of the JSON items `item(i)` for i in from..from+n; their media ids, sorted.
    pub fn produce_items(&self, from: usize, n: usize, item: impl Fn(usize) -> serde_json::Value) -> Vec<String> {
        let items: Vec<serde_json::Value> = (from..from + n).map(item).collect();
        let lines: String = items.iter().map(|v| format!("{v}\n")).collect();
        let file = self.dir.join(format!("items-{from}.jsonl"));
        std::fs::write(&file, lines).unwrap();
        let out = self.cmd().arg("produce").arg(&file).arg("--quiet").output().unwrap();
        assert!(out.status.success(), "produce: {}", String::from_utf8_lossy(&out.stderr));
        let mut ids: Vec<String> = items.iter().map(|v| v["media_id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    }
}

/// A child process killed on drop, whatever the test did.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics, path)
    }

    /// Sum of a metric's samples whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (code, body) = self.get("/metrics")?;
        assert_eq!(code, 200, "/metrics answers 200");
        let mut sum = 0.0;
        for line in body.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')) {
            let (head, val) = line.rsplit_once(' ')?;
            let metric_name = head.split('{').next().unwrap_or(head);
            if metric_name == name && labels.iter().all(|(k, v)| head.contains(&format!("{k}=\"{v}\""))) {
                sum += val.parse::<f64>().ok()?;
            }
        }
        Some(sum)
    }
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A minimal HTTP/1.0 GET: status code and body, or None when nothing listens (yet).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Committed offsets of `group` on `topic`, summed over partitions (unset counts as 0).
pub fn committed(group: &str, topic: &str) -> i64 {
    let mut cc = client_config(&kafka(), &BTreeMap::new());
    cc.set("group.id", group).set("enable.auto.commit", "false");
    let c: BaseConsumer = cc.create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { 0 }).sum()
}

/// Keys of every record of `topic`, from the beginning to its current end.
pub fn keys(topic: &str) -> Vec<String> {
    let mut cc = client_config(&kafka(), &BTreeMap::new());
    cc.set("group.id", format!("process-test-reader-{}", uuid::Uuid::new_v4().simple())).set("enable.auto.commit", "false");
    let c: BaseConsumer = cc.create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (lo, hi) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap();
        if hi > lo {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
            ends.insert(p.id(), hi);
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            out.push(String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned());
            if ends.get(&m.partition()).is_some_and(|e| m.offset() + 1 >= *e) {
                ends.remove(&m.partition());
            }
        }
    }
    assert!(ends.is_empty(), "read {topic} to its end within 60 s");
    out
}

/// Produce one record (raw value bytes) to `topic` and wait for its acknowledgement.
pub fn produce_raw(topic: &str, key: &str, value: &[u8]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = streamoasis_pipeline::kafka::producer(&kafka(), &BTreeMap::new()).unwrap();
    rt.block_on(p.send(rdkafka::producer::FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))).map_err(|(e, _)| e).unwrap();
}

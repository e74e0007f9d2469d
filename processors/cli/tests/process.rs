//! The shipped binary as a process, against the real local stack: what an operator and
//! Kubernetes see. SIGTERM drains, commits and exits 0 (also while the model is still loading); a
//! fatal error exits non-zero naming what to fix; `/healthz`, `/readyz` and `/metrics` are scraped
//! over HTTP while it runs. Each test uses its own topology copy (topics, subjects, group).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::env;
use streamoasis_pipeline::kafka::client_config;

const BIN: &str = env!("CARGO_BIN_EXE_streamoasis");

fn root() -> PathBuf {
    streamoasis_testkit::root().canonicalize().unwrap()
}

fn kafka() -> String {
    env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA)
}

fn registry() -> String {
    env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY)
}

/// A copy of topology.yaml with unique names, written to a temp folder.
struct Topo {
    dir: PathBuf,
    path: PathBuf,
    input: String,
    output: String,
    group: String,
}

fn topology(test: &str) -> Topo {
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
    let dir = std::env::temp_dir().join(format!("streamoasis-process-{test}-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("topology.yaml");
    std::fs::write(&path, serde_yaml::to_string(&t).unwrap()).unwrap();
    let tagger = &t["processors"]["tagger"];
    Topo {
        input: tagger["input"].as_str().unwrap().into(),
        output: tagger["output"].as_str().unwrap().into(),
        group: tagger["group"].as_str().unwrap().into(),
        dir,
        path,
    }
}

impl Topo {
    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("STREAMOASIS_TOPOLOGY", &self.path).env("RUST_LOG", "info,rdkafka=warn,scylla=warn").stdin(Stdio::null());
        c
    }

    /// `streamoasis topology apply --no-db` (topics and schemas).
    fn apply(&self) {
        let out = self.cmd().args(["topology", "apply", "--no-db"]).output().unwrap();
        assert!(out.status.success(), "topology apply (is `scripts/stack up` running?): {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `streamoasis produce` of `n` items numbered from `from`.
    fn produce(&self, from: usize, n: usize) -> Vec<String> {
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
    fn spawn_tagger(&self, metrics: SocketAddr) -> Proc {
        let log = self.dir.join("tagger.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = self.cmd().args(["tagger", "--metrics-addr", &metrics.to_string()]).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Proc { child, log, metrics }
    }
}

/// A child process killed on drop, whatever the test did.
struct Proc {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics, path)
    }

    /// Sum of a metric's samples whose labels include all of `labels`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A minimal HTTP/1.0 GET: status code and body, or None when nothing listens (yet).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
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
fn committed(group: &str, topic: &str) -> i64 {
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
fn keys(topic: &str) -> Vec<String> {
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

#[test]
fn tagger_process_serves_health_and_metrics_then_drains_on_sigterm_and_exits_zero() {
    streamoasis_testkit::require_stack!();
    let t = topology("sigterm");
    t.apply();
    let first = t.produce(0, 40);
    let mut p = t.spawn_tagger(free_addr());

    // /readyz: 503 while the model loads and before partitions are assigned, then 200.
    let mut seen = Vec::new();
    let ready = wait_until(Duration::from_secs(180), || match p.get("/readyz") {
        Some((code, _)) => {
            if seen.last() != Some(&code) {
                seen.push(code);
            }
            code == 200
        }
        None => false,
    });
    assert!(ready, "/readyz never 200 (seen {seen:?}); log:\n{}", p.log());
    assert_eq!(seen.first(), Some(&503), "/readyz answered 503 before it was ready (seen {seen:?})");
    assert_eq!(p.get("/healthz").map(|r| r.0), Some(200), "/healthz 200 while running");

    // Metrics move with the work: 40 records handled, then 50 after 10 more.
    let ok = |p: &Proc| p.metric("streamoasis_records_total", &[("processor", "tagger"), ("outcome", "ok")]).unwrap_or(-1.0);
    assert!(wait_until(Duration::from_secs(180), || ok(&p) >= 40.0), "40 records handled (metric {}); log:\n{}", ok(&p), p.log());
    let second = t.produce(40, 10);
    assert!(wait_until(Duration::from_secs(120), || ok(&p) >= 50.0), "50 records handled (metric {})", ok(&p));
    assert_eq!(ok(&p), 50.0, "records_total{{outcome=ok}} counts each record once");
    assert!(p.metric("streamoasis_batches_total", &[]).unwrap_or(0.0) >= 1.0, "batches_total moved");
    assert_eq!(p.metric("streamoasis_in_flight", &[("processor", "tagger")]), Some(0.0), "nothing in flight once done");

    // SIGTERM: drain, commit, exit 0.
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(60)).expect("exited within 60 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM ({status}); log:\n{}", p.log());
    assert_eq!(committed(&t.group, &t.input), 50, "offsets of all 50 records committed on the way out");
    let mut got = keys(&t.output);
    got.sort();
    let mut want: Vec<String> = first.into_iter().chain(second).collect();
    want.sort();
    assert_eq!(got, want, "exactly one tagged event per item, keyed by media_id");
}

#[test]
fn tagger_process_exits_zero_on_sigterm_while_the_model_loads() {
    streamoasis_testkit::require_stack!();
    let t = topology("early-term");
    t.apply();
    let mut p = t.spawn_tagger(free_addr());
    // In main and not ready yet: the metrics endpoint answers 503 while the model loads.
    let mut code = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            code = p.get("/readyz").map(|r| r.0);
            code.is_some()
        }),
        "/readyz never answered; log:\n{}",
        p.log()
    );
    assert_eq!(code, Some(503), "not ready while starting");
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(60)).expect("exited within 60 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "SIGTERM during start-up must exit 0 ({status}); log:\n{}", p.log());
}

#[test]
fn tagger_process_exits_non_zero_when_the_registered_output_schema_is_incompatible() {
    streamoasis_testkit::require_stack!();
    let t = topology("fatal");
    t.apply();
    // A newer output schema the tagger cannot write: a required field it does not have.
    let subject = format!("{}-value", t.output);
    let bad = r#"{"type": "record", "name": "MediaTagged", "namespace": "io.streamoasis.media",
        "fields": [{"name": "media_id", "type": "string"}, {"name": "required_elsewhere", "type": "string"}]}"#;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(Codec::new(&registry()).unwrap().register(&subject, bad, "NONE")).expect("register the incompatible schema");
    t.produce(0, 3);
    let mut p = t.spawn_tagger(free_addr());
    let status = p.wait_exit(Duration::from_secs(180)).unwrap_or_else(|| panic!("still running 180 s after an unwritable output; log:\n{}", p.log()));
    let log = p.log();
    assert!(!status.success(), "a fatal error exits non-zero ({status}); log:\n{log}");
    assert!(log.contains(&subject), "the error names the subject to fix ({subject}); log:\n{log}");
    assert_eq!(committed(&t.group, &t.input), 0, "nothing committed for records that were not written");
}

//! The secured local stack (`scripts/stack up --secure`): Kafka SASL_SSL with SCRAM users and
//! ACLs, Cassandra with roles and required TLS, the registry over https with basic auth.
//!
//! Gate: these tests run when the environment is the secure stack's env file
//! (`KAFKA_SECURITY_PROTOCOL=SASL_SSL` and the per-processor users of `.cache/stack/env`). Against
//! the plaintext stack they print a skip line, unless `STREAMOASIS_REQUIRE_SECURE=1` (set by
//! `scripts/test`'s secure pass), which turns a plaintext environment into a failure.
//!
//! The tagger and sink run in-process as in `pipeline.rs`, each with its own Kafka principal and
//! (the sink) its own CQL role; topics and groups are named under the prefixes the stack's ACLs
//! grant (`deploy/local/secure/kafka.acls`). The log test runs the real binary.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use streamoasis_pipeline::client::{self, client_config, producer, wait_for_broker};
use streamoasis_pipeline::codec::{Codec, CodecError, RegistryAuth};
use streamoasis_pipeline::events::{MediaIngested, MediaKind, MediaTagged};
use streamoasis_pipeline::kafka::{run, RunSummary, RunnerConfig};
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::{admin, env, CancellationToken};
use streamoasis_sink::read::Reader;
use streamoasis_sink::{connect_with, schema, CqlSecurity, SinkConfig, SinkProcessor, TagWriter};
use streamoasis_tagger::{Tagger, TaggerConfig, TaggerProcessor};
use tokio::task::JoinHandle;

use streamoasis_testkit::root;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source the secure stack's .cache/stack/env"))
}

/// Whether the environment is the secure stack's. Prints a skip line when not, or fails when
/// `STREAMOASIS_REQUIRE_SECURE=1`.
fn secure_stack(test: &str) -> bool {
    let secure = std::env::var("KAFKA_SECURITY_PROTOCOL").is_ok_and(|p| p == "SASL_SSL") && std::env::var("KAFKA_TAGGER_USERNAME").is_ok();
    if secure {
        return true;
    }
    if std::env::var("STREAMOASIS_REQUIRE_SECURE").is_ok_and(|v| v == "1") {
        panic!("{test}: STREAMOASIS_REQUIRE_SECURE=1 but the environment is not the secured stack's: run `scripts/stack up --secure` and source .cache/stack/env");
    }
    // Straight to the process's stderr: the test harness would hide an eprintln! of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "skip {test}: not the secured stack (scripts/stack up --secure, then source .cache/stack/env; STREAMOASIS_REQUIRE_SECURE=1 makes this a failure)"
    );
    false
}

/// Connection settings per role, from the secure env file.
struct Roles {
    kafka: String,
    admin: BTreeMap<String, String>,
    tagger: BTreeMap<String, String>,
    sink: BTreeMap<String, String>,
    cql_uri: String,
    registry: String,
}

impl Roles {
    fn load() -> Roles {
        let admin = client::properties(&BTreeMap::new()).expect("Kafka security settings from the environment");
        let as_user = |user: &str, pass: &str| {
            let mut m = admin.clone();
            m.insert("sasl.username".into(), var(user));
            m.insert("sasl.password".into(), var(pass));
            m
        };
        Roles {
            kafka: env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA),
            tagger: as_user("KAFKA_TAGGER_USERNAME", "KAFKA_TAGGER_PASSWORD"),
            sink: as_user("KAFKA_SINK_USERNAME", "KAFKA_SINK_PASSWORD"),
            admin,
            cql_uri: env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA),
            registry: var("SCHEMA_REGISTRY_URL"),
        }
    }

    /// Every password of the stack (the strings no log may contain).
    fn passwords() -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            ["KAFKA_SASL_PASSWORD", "KAFKA_TAGGER_PASSWORD", "KAFKA_SINK_PASSWORD", "SCYLLA_PASSWORD", "SCYLLA_SINK_PASSWORD"].iter().map(|n| (n.to_string(), var(n))).collect();
        let info = var("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO");
        v.push(("registry password".into(), info.split_once(':').map(|(_, p)| p.to_string()).unwrap_or(info)));
        for (name, p) in &v {
            assert!(p.len() >= 16, "{name} looks too short to grep for");
        }
        v
    }
}

fn cql_admin(c: &SinkConfig) -> CqlSecurity {
    let s = CqlSecurity::resolve(c).expect("CQL settings from the environment");
    assert!(s.tls.is_some() && s.username.is_some(), "the secure env sets SCYLLA_CA and SCYLLA_USERNAME");
    s
}

fn cql_sink(c: &SinkConfig) -> CqlSecurity {
    let mut s = cql_admin(c);
    s.username = Some(var("SCYLLA_SINK_USERNAME"));
    s.password = Some(streamoasis_pipeline::secret::Secret::new(var("SCYLLA_SINK_PASSWORD")));
    s
}

struct Setup {
    roles: Roles,
    topo: Topology,
    codec: Arc<Codec>,
    input: String,
    output: String,
}

/// The project topology with topics and groups under the ACL prefixes for tests, a fresh
/// keyspace the sink role is granted, topics created and schemas registered by the admin.
async fn setup(partitions: i32) -> Setup {
    let roles = Roles::load();
    let mut topo = Topology::load(root().join("topology.yaml")).unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let rename: HashMap<&str, String> = HashMap::from([
        ("media.ingested", format!("secure-in.{id}")),
        ("media.tagged", format!("secure-out.{id}")),
        ("media.ingested.dlq", format!("secure-in-dlq.{id}")),
        ("media.tagged.dlq", format!("secure-out-dlq.{id}")),
    ]);
    for t in &mut topo.file.topics {
        t.name = rename[t.name.as_str()].clone();
        t.partitions = partitions;
    }
    for s in &mut topo.file.schemas {
        s.subject = format!("{}-value", rename[s.subject.trim_end_matches("-value")]);
    }
    let p = &mut topo.file.processors;
    for spec in [&mut p.tagger, &mut p.sink] {
        spec.input = rename[spec.input.as_str()].clone();
        spec.output = spec.output.as_ref().map(|o| rename[o.as_str()].clone());
        spec.dlq = rename[spec.dlq.as_str()].clone();
        spec.drain_timeout = Duration::from_secs(20);
    }
    p.tagger.group = format!("secure-tagger.{id}");
    p.sink.group = format!("secure-sink.{id}");
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.scylla {
        m.insert("keyspace".into(), format!("sec_{id}").into());
        m.insert("consistency".into(), "ONE".into());
    }
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.tagging {
        if let Some(serde_yaml::Value::Mapping(model)) = m.get_mut("model") {
            model.insert("path".into(), root().join("models/all-MiniLM-L6-v2").display().to_string().into());
        }
    }
    topo.file.kafka.client = roles.admin.clone();
    admin::apply_topics(&roles.kafka, &topo).await.expect("topics, as admin");
    let codec = Arc::new(Codec::new(&roles.registry).expect("registry settings from the environment"));
    admin::apply_schemas(&codec, &topo).await.expect("schemas, over https with basic auth");
    let cfg = SinkConfig::from_topology(&topo).unwrap();
    let session = connect_with(&roles.cql_uri, &cfg, &cql_admin(&cfg)).await.expect("CQL as admin over TLS");
    schema::apply(&session, &cfg).await.unwrap();
    for perm in ["SELECT", "MODIFY"] {
        session.query_unpaged(format!("GRANT {perm} ON KEYSPACE {} TO {}", cfg.keyspace, var("SCYLLA_SINK_USERNAME")), ()).await.unwrap();
    }
    let t = &topo.file.processors.tagger;
    Setup { input: t.input.clone(), output: t.output.clone().unwrap(), roles, topo, codec }
}

impl Setup {
    fn runner(&self, sink: bool) -> RunnerConfig {
        let (spec, client) = if sink { (&self.topo.file.processors.sink, &self.roles.sink) } else { (&self.topo.file.processors.tagger, &self.roles.tagger) };
        RunnerConfig::new(self.roles.kafka.clone(), spec.clone(), client.clone())
    }

    fn sink_config(&self) -> SinkConfig {
        SinkConfig::from_topology(&self.topo).unwrap()
    }

    async fn start(&self) -> (CancellationToken, JoinHandle<anyhow::Result<RunSummary>>, JoinHandle<anyhow::Result<RunSummary>>) {
        let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&self.topo).unwrap()).await.unwrap());
        let cfg = self.sink_config();
        let session = connect_with(&self.roles.cql_uri, &cfg, &cql_sink(&cfg)).await.expect("CQL as the sink role");
        let writer = Arc::new(TagWriter::new(Arc::new(session), &cfg).await.expect("the sink role prepares its statements"));
        let stop = CancellationToken::new();
        let t = tokio::spawn(run(self.runner(false), self.codec.clone(), Arc::new(TaggerProcessor::new(tagger)), stop.clone()));
        let s = tokio::spawn(run(self.runner(true), self.codec.clone(), Arc::new(SinkProcessor::new(writer)), stop.clone()));
        (stop, t, s)
    }

    fn admin_producer(&self) -> FutureProducer {
        producer(&self.roles.kafka, &self.roles.admin).unwrap()
    }

    async fn send(&self, p: &FutureProducer, item: &MediaIngested) {
        // The registry's TLS front can answer 502 for a moment right after `stack up --secure`:
        // a transient error, retried as the processors retry it (30 s at most).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let bytes = loop {
            match self.codec.encode(&self.input, item).await {
                Ok(b) => break b,
                Err(CodecError::Unavailable(e)) if std::time::Instant::now() < deadline => {
                    eprintln!("registry unavailable, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("encoding {}: {e}", item.media_id),
            }
        };
        p.send(FutureRecord::to(&self.input).key(&item.media_id).payload(&bytes), Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
    }

    fn admin_consumer(&self, topic: &str) -> StreamConsumer {
        let mut cc = client_config(&self.roles.kafka, &self.roles.admin);
        cc.set("group.id", format!("secure-reader-{}", uuid::Uuid::new_v4().simple())).set("auto.offset.reset", "earliest");
        let c: StreamConsumer = cc.create().unwrap();
        c.subscribe(&[topic]).unwrap();
        c
    }

    async fn count_rows(&self, session: &scylla::client::session::Session) -> i64 {
        let ks = self.sink_config().keyspace;
        streamoasis_sink::count_rows(session, &format!("SELECT COUNT(*) FROM {ks}.media_tags")).await.unwrap_or(-1)
    }
}

fn item(i: usize, prefix: &str) -> MediaIngested {
    const TEXTS: [&str; 4] = [
        "The company reported record quarterly profits and its shares rose",
        "The striker scored twice as the team won the championship final",
        "The prime minister faced questions in parliament over the election",
        "The new smartphone software update improves battery life",
    ];
    MediaIngested {
        media_id: format!("{prefix}-{i:05}"),
        kind: MediaKind::Clip,
        title: format!("{} (part {i})", TEXTS[i % TEXTS.len()]),
        description: None,
        transcript: None,
        language: Some("en".into()),
        source: "secure-test".into(),
        ingested_at: streamoasis_pipeline::events::now_millis(),
        attributes: Default::default(),
        candidate_labels: None,
    }
}

/// A refusal must say why: its message holds one of `any` (case-insensitive).
fn assert_reason(msg: &str, any: &[&str], what: &str) {
    let m = msg.to_lowercase();
    assert!(any.iter().any(|w| m.contains(w)), "{what}: refused, but not for the expected reason (one of {any:?}): {msg}");
}

/// ... and not by giving up waiting.
fn assert_no_reason(msg: &str, none: &[&str], what: &str) {
    let m = msg.to_lowercase();
    assert!(!none.iter().any(|w| m.contains(w)), "{what}: refused only by a timeout: {msg}");
}

/// Each refusal the secured stack must make; run while the pipeline is working.
async fn assert_refusals(s: &Setup) {
    let kafka = &s.roles.kafka;
    // 1. A plaintext Kafka client gets nothing from the SASL_SSL listener.
    let plain = BTreeMap::new();
    let e = wait_for_broker(kafka, &plain, Duration::from_secs(5)).expect_err("a plaintext Kafka client must be refused");
    eprintln!("refused (plaintext Kafka client): {e}");
    // The TLS listener drops a plaintext client's first bytes: librdkafka reports the transport
    // failing (or, in its logs, the ApiVersion request disconnected), never a plain timeout, and
    // the message must point at the setting to fix.
    let msg = e.to_string();
    assert_reason(&msg, &["broker transport failure", "disconnected while requesting apiversion", "handshake", "ssl"], "plaintext Kafka client");
    assert_no_reason(&msg, &["timed out", "timeout"], "plaintext Kafka client");
    assert_reason(&msg, &["kafka_security_protocol"], "plaintext Kafka client (the fix named)");

    // 2. A wrong SCRAM password.
    let mut wrong = s.roles.tagger.clone();
    wrong.insert("sasl.password".into(), format!("wrong-{}", uuid::Uuid::new_v4().simple()));
    let e = wait_for_broker(kafka, &wrong, Duration::from_secs(5)).expect_err("a wrong SCRAM password must be refused");
    assert_reason(&e.to_string(), &["sasl authentication failed", "authentication failed", "authentication failure"], "wrong SCRAM password");
    eprintln!("refused (wrong SCRAM password): {e}");
    // ... while the right one works, with the same client code.
    wait_for_broker(kafka, &s.roles.tagger, Duration::from_secs(10)).expect("the tagger's own credentials work");

    // 3. The sink principal writing to the tags topic (its ACLs: read it, write its DLQ only).
    let mut sink_props = s.roles.sink.clone();
    sink_props.insert("message.timeout.ms".into(), "15000".into());
    let rogue = producer(kafka, &sink_props).unwrap();
    let sent =
        tokio::time::timeout(Duration::from_secs(30), rogue.send(FutureRecord::to(&s.output).key("rogue").payload(b"not from the tagger".as_slice()), Duration::from_secs(5)))
            .await;
    match sent {
        Ok(Ok(d)) => panic!("the sink principal wrote to {} ({d:?}): ACLs not enforced", s.output),
        Ok(Err((e, _))) => {
            eprintln!("refused (sink principal writing to {}): {e}", s.output);
            assert_eq!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::TopicAuthorizationFailed), "refused for lack of WRITE on the topic: {e}");
        }
        Err(_) => panic!("the sink principal's write to {} got no answer within 30 s: a refusal must say why", s.output),
    }
    // ... and the tagger principal reading the sink's input with a group it has no right to.
    let mut cc = client_config(kafka, &s.roles.tagger);
    cc.set("group.id", format!("not-granted-{}", uuid::Uuid::new_v4().simple())).set("auto.offset.reset", "earliest");
    let c: StreamConsumer = cc.create().unwrap();
    c.subscribe(&[s.output.as_str()]).unwrap();
    // Whether or not the topic holds records yet, the refusal must come as an error saying why.
    match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
        Ok(Ok(m)) => panic!("the tagger principal read {} at offset {}: ACLs not enforced", s.output, m.offset()),
        Ok(Err(e)) => {
            eprintln!("refused (tagger principal reading {} with an ungranted group): {e}", s.output);
            assert!(
                matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::GroupAuthorizationFailed | RDKafkaErrorCode::TopicAuthorizationFailed)),
                "refused for lack of READ on the group or topic: {e}"
            );
        }
        Err(_) => panic!("the tagger principal reading {} with an ungranted group got no error within 30 s: a refusal must say why", s.output),
    }

    // 4. CQL without credentials (TLS on) and without TLS (credentials on).
    let cfg = s.sink_config();
    let admin = cql_admin(&cfg);
    let anonymous = CqlSecurity { username: None, password: None, tls: admin.tls.clone() };
    let e = connect_with(&s.roles.cql_uri, &cfg, &anonymous).await.expect_err("a CQL client without credentials must be refused");
    eprintln!("refused (CQL without credentials): {e}");
    assert_reason(&format!("{e:#}"), &["authenticat", "credentials"], "CQL without credentials");
    let no_tls = CqlSecurity { tls: None, ..admin.clone() };
    let e = connect_with(&s.roles.cql_uri, &cfg, &no_tls).await.expect_err("a CQL client without TLS must be refused");
    eprintln!("refused (CQL without TLS): {e}");
    assert_reason(&format!("{e:#}"), &["connection", "broken", "reset", "closed", "tls", "ssl", "frame"], "CQL without TLS");
    assert_no_reason(&format!("{e:#}"), &["timed out", "timeout"], "CQL without TLS");
    // ... and the sink role cannot change the schema (it holds SELECT and MODIFY only).
    let sink_session = connect_with(&s.roles.cql_uri, &cfg, &cql_sink(&cfg)).await.unwrap();
    let e = sink_session.query_unpaged(format!("DROP TABLE {}.media_tags", cfg.keyspace), ()).await.expect_err("the sink role must not drop tables");
    eprintln!("refused (sink role dropping a table): {e}");
    assert_reason(&e.to_string(), &["unauthorized", "permission"], "sink role dropping a table");

    // 5. A registry call without credentials (same TLS), and one over plain http.
    let tls_only = RegistryAuth { basic: None, ..RegistryAuth::from_env().unwrap() };
    let anonymous = Codec::with_auth(&s.roles.registry, tls_only).unwrap();
    let e = anonymous.register(&format!("{}-value", s.input), "\"string\"", "BACKWARD").await.expect_err("a registry call without credentials must be refused");
    assert!(e.to_string().contains("401"), "401 Unauthorized expected: {e}");
    eprintln!("refused (registry without credentials): {e}");
    let http = s.roles.registry.replacen("https://", "http://", 1);
    let e = Codec::new(&http).unwrap().register(&format!("{}-value", s.input), "\"string\"", "BACKWARD").await.expect_err("plain http to the registry must be refused");
    eprintln!("refused (registry over plain http): {e}");
    assert_reason(&e.to_string(), &["400", "https"], "registry over plain http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secured_pipeline_a_thousand_items_in_out_and_rows_while_intruders_are_refused() {
    if !secure_stack("secured_pipeline") {
        return;
    }
    let s = setup(3).await;
    let (stop, tagger_task, sink_task) = s.start().await;
    let out = s.admin_consumer(&s.output);
    let p = s.admin_producer();
    let items: Vec<MediaIngested> = (0..1000).map(|i| item(i, "sec")).collect();
    // One item first: the codec caches the subject's schema, so the rest do not all ask the
    // registry at once (a hundred TLS handshakes at once time out on a loaded 2-core machine).
    s.send(&p, &items[0]).await;
    let produce = async {
        for chunk in items[1..].chunks(100) {
            futures::future::join_all(chunk.iter().map(|i| s.send(&p, i))).await;
        }
    };
    // The refusals run while the pipeline works: none of them may disturb it.
    tokio::join!(produce, assert_refusals(&s));

    let mut seen: HashMap<String, MediaTagged> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < 1000 && Instant::now() < deadline {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), out.recv()).await {
            let e = s.codec.decode::<MediaTagged>(m.payload()).await.expect("only tagged events on the output topic").event;
            seen.insert(e.media_id.clone(), e);
        }
    }
    assert_eq!(seen.len(), 1000, "every item tagged over SASL_SSL");
    assert!(items.iter().all(|i| seen.contains_key(&i.media_id)));

    let cfg = s.sink_config();
    let session = Arc::new(connect_with(&s.roles.cql_uri, &cfg, &cql_admin(&cfg)).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.count_rows(&session).await < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(s.count_rows(&session).await, 1000, "a row per item, written by the sink role over TLS");
    let probe = &items[421];
    let reader = Reader::new(session.clone(), &cfg.keyspace).await.unwrap();
    let tags = reader.media(&probe.media_id).await.unwrap().expect("row read back").tags;
    assert_eq!(tags.first().map(|t| t.0.as_str()), seen[&probe.media_id].tags.first().map(|t| t.label.as_str()));

    stop.cancel();
    let t = tagger_task.await.unwrap().unwrap();
    let k = sink_task.await.unwrap().unwrap();
    assert_eq!(t.dead_lettered, 0, "tagger {t:?}");
    assert_eq!(k.dead_lettered, 0, "nothing but tagged events reached the sink: {k:?}");
    // One tagger, one sink, no fault: each record handled exactly once.
    assert_eq!((t.processed, k.processed), (1000, 1000), "tagger {t:?} sink {k:?}");
}

/// A child process whose output goes to a file.
fn spawn(args: &[&str], envs: &[(&str, String)], log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamoasis"));
    cmd.current_dir(root()).args(args).env("RUST_LOG", "debug").env("NO_COLOR", "1").stdin(Stdio::null()).stdout(f.try_clone().unwrap()).stderr(f);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn run_to_end(args: &[&str], envs: &[(&str, String)], log: &Path) -> bool {
    spawn(args, envs, log).wait().unwrap().success()
}

fn sigterm(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_of_the_binary_at_debug_level_logs_no_password() {
    if !secure_stack("no_password_in_logs") {
        return;
    }
    let roles = Roles::load();
    let passwords = Roles::passwords();
    let dir: PathBuf = std::env::temp_dir().join(format!("streamoasis-secure-logs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let logs: Vec<PathBuf> = ["apply", "tagger", "sink", "produce", "tail", "db", "bad-password", "url-credentials"].iter().map(|n| dir.join(format!("{n}.log"))).collect();

    // The project topology as it is: topology apply as admin, the tagger and the sink as their own
    // principals and roles, produce and tail as admin.
    assert!(run_to_end(&["topology", "apply"], &[], &logs[0]), "topology apply over the secured stack: {}", std::fs::read_to_string(&logs[0]).unwrap());
    let topo = Topology::load(root().join("topology.yaml")).unwrap();
    let cfg = SinkConfig::from_topology(&topo).unwrap();
    let session = Arc::new(connect_with(&roles.cql_uri, &cfg, &cql_admin(&cfg)).await.unwrap());
    for perm in ["SELECT", "MODIFY"] {
        session.query_unpaged(format!("GRANT {perm} ON KEYSPACE {} TO {}", cfg.keyspace, var("SCYLLA_SINK_USERNAME")), ()).await.unwrap();
    }
    let mut tagger = spawn(&["tagger"], &[("KAFKA_SASL_USERNAME", var("KAFKA_TAGGER_USERNAME")), ("KAFKA_SASL_PASSWORD", var("KAFKA_TAGGER_PASSWORD"))], &logs[1]);
    let mut sink = spawn(
        &["sink"],
        &[
            ("KAFKA_SASL_USERNAME", var("KAFKA_SINK_USERNAME")),
            ("KAFKA_SASL_PASSWORD", var("KAFKA_SINK_PASSWORD")),
            ("SCYLLA_USERNAME", var("SCYLLA_SINK_USERNAME")),
            ("SCYLLA_PASSWORD", var("SCYLLA_SINK_PASSWORD")),
        ],
        &logs[2],
    );
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let input = dir.join("items.jsonl");
    let lines: Vec<String> = (0..20).map(|i| serde_json::json!({"media_id": format!("log-{run_id}-{i}"), "title": item(i, "x").title}).to_string()).collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    assert!(run_to_end(&["produce", input.to_str().unwrap(), "--quiet"], &[], &logs[3]), "produce: {}", std::fs::read_to_string(&logs[3]).unwrap());

    // Every item lands in the database through the sink role.
    let reader = Reader::new(session.clone(), &cfg.keyspace).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut found = 0;
    while Instant::now() < deadline {
        found = 0;
        for i in 0..20 {
            if reader.media(&format!("log-{run_id}-{i}")).await.unwrap().is_some() {
                found += 1;
            }
        }
        if found == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(run_to_end(&["tail", "--from-beginning", "--count", "5", "--quiet", "--idle-timeout", "60s"], &[], &logs[4]), "tail: {}", std::fs::read_to_string(&logs[4]).unwrap());
    assert!(run_to_end(&["db", "get", &format!("log-{run_id}-0")], &[], &logs[5]), "db get: {}", std::fs::read_to_string(&logs[5]).unwrap());
    // Failures print errors: a wrong password, and credentials inside the registry URL.
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    assert!(!run_to_end(&["produce", input.to_str().unwrap(), "--quiet"], &[("KAFKA_SASL_PASSWORD", wrong.clone())], &logs[6]), "a wrong password must fail");
    let url_pw = format!("urlpw-{}", uuid::Uuid::new_v4().simple());
    let url = roles.registry.replacen("https://", &format!("https://streamoasis:{url_pw}@"), 1);
    assert!(
        !run_to_end(&["topology", "apply", "--no-db"], &[("SCHEMA_REGISTRY_URL", url), ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", String::new())], &logs[7]),
        "wrong credentials in the registry URL must fail"
    );
    sigterm(&mut tagger);
    sigterm(&mut sink);
    assert_eq!(found, 20, "every item written by the binary's sink as its own role; sink log:\n{}", std::fs::read_to_string(&logs[2]).unwrap());

    let mut all = String::new();
    for l in &logs {
        all.push_str(&std::fs::read_to_string(l).unwrap());
    }
    assert!(all.contains("DEBUG"), "the run logged at debug level");
    assert!(all.contains("SASL_SSL"), "the logs say which security protocol was used");
    let tagger_log = std::fs::read_to_string(&logs[1]).unwrap();
    let settings = tagger_log.lines().find(|l| l.contains("connection settings")).unwrap_or_default();
    assert!(settings.contains("SASL_SSL") && settings.contains(&var("KAFKA_TAGGER_USERNAME")), "the tagger ran as its own principal: {settings}");
    let bad_pw = std::fs::read_to_string(&logs[6]).unwrap();
    assert!(bad_pw.to_lowercase().contains("authentication"), "the wrong-password run says why: {bad_pw}");
    let mut leaks = Vec::new();
    for (name, pw) in passwords.iter().chain([("wrong password".to_string(), wrong), ("URL password".to_string(), url_pw)].iter()) {
        for (l, path) in logs.iter().enumerate() {
            if std::fs::read_to_string(path).unwrap().contains(pw.as_str()) {
                leaks.push(format!("{name} in {}", logs[l].display()));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets printed: {leaks:?}");
    eprintln!("{} bytes of debug logs from 8 runs of the binary, no password in them", all.len());
    std::fs::remove_dir_all(&dir).ok();
}

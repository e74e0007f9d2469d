//! Liveness and escalation of the shipped binary, against the real local stack: a dead model
//! thread fails `/healthz` and ends the process non-zero; a registry that keeps failing past
//! `transient_budget` ends it non-zero naming the registry; a drain that overruns `drain_timeout`
//! stops at the timeout with its message, and the abandoned records are redelivered. (The broker
//! going away past `consumer_error_timeout` is in `broker_away.rs`: it stops the stack's broker,
//! so it has a test binary of its own.)

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proc::*;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind};

/// Test hook of the tagger (read once by the model thread, see `streamoasis_tagger::batcher`):
/// once a file exists at this path, the model thread ends at its next batch, as if it had died.
const MODEL_EXIT_HOOK: &str = "STREAMOASIS_TEST_MODEL_EXIT_FILE";

#[test]
fn a_dead_model_thread_fails_healthz_and_the_tagger_exits_non_zero() {
    streamoasis_testkit::require_stack!();
    let t = topology("model-dead");
    t.apply();
    let trigger = t.dir.join("model-exit");
    let mut p = t.spawn_tagger_env(free_addr(), &[(MODEL_EXIT_HOOK, trigger.to_str().unwrap())]);
    assert!(wait_until(Duration::from_secs(180), || p.get("/readyz").map(|r| r.0) == Some(200)), "never ready; log:\n{}", p.log());
    assert_eq!(p.get("/healthz").map(|r| r.0), Some(200), "/healthz 200 while the model thread runs");
    std::fs::write(&trigger, b"").unwrap();
    t.produce(0, 3);
    // The next batch ends the model thread: liveness must say so, or the process stop.
    let mut last = None;
    let dead = wait_until(Duration::from_secs(120), || {
        last = p.get("/healthz");
        last.as_ref().is_some_and(|r| r.0 == 503) || p.child.try_wait().ok().flatten().is_some()
    });
    assert!(dead, "/healthz still {last:?} 120 s after the model thread's exit; log:\n{}", p.log());
    if let Some((code, body)) = &last {
        assert_eq!(*code, 503, "/healthz once the model thread is gone");
        assert!(body.contains("model thread"), "/healthz says why: {body}");
    }
    // Records that need the model now: the process must stop, non-zero, naming the model thread.
    t.produce(3, 2);
    let status = p.wait_exit(Duration::from_secs(120)).unwrap_or_else(|| panic!("still running 120 s after its model thread died; log:\n{}", p.log()));
    let log = p.log();
    assert!(!status.success(), "a dead model thread exits non-zero ({status}); log:\n{log}");
    assert!(log.contains("model thread"), "the exit names the model thread; log:\n{log}");
}

/// A TCP front for the schema registry: forwards while up; while failing, cuts every forwarded
/// connection and answers each request 503.
struct FlakyRegistry {
    url: String,
    failing: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl FlakyRegistry {
    fn start(upstream_url: &str) -> FlakyRegistry {
        let rest = upstream_url.strip_prefix("http://").expect("the plain stack's registry URL is http://");
        let (upstream, path) = rest.split_once('/').map(|(h, p)| (h.to_string(), format!("/{p}"))).unwrap_or((rest.to_string(), String::new()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}{path}", listener.local_addr().unwrap());
        let failing = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (f, c) = (failing.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if f.load(Ordering::SeqCst) {
                    std::thread::spawn(move || answer_503(client));
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                c.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let (mut c1, mut s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut c2, mut s2) = (client, server);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c1, &mut s1);
                    let _ = s1.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
            }
        });
        FlakyRegistry { url, failing, conns }
    }

    fn fail(&self) {
        self.failing.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn answer_503(mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 16384];
    let _ = c.read(&mut buf);
    let _ = c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

#[test]
fn a_registry_failing_past_transient_budget_ends_the_tagger_non_zero_naming_it() {
    streamoasis_testkit::require_stack!();
    let t = topology_with("registry-budget", |y| y["processors"]["tagger"]["transient_budget"] = "5s".into());
    t.apply();
    let flaky = FlakyRegistry::start(&registry());
    let mut p = t.spawn_tagger_env(free_addr(), &[("SCHEMA_REGISTRY_URL", flaky.url.as_str())]);
    assert!(wait_until(Duration::from_secs(180), || p.get("/readyz").map(|r| r.0) == Some(200)), "never ready; log:\n{}", p.log());
    // Everything the tagger needs is cached once it has tagged a record...
    t.produce(0, 3);
    assert!(wait_until(Duration::from_secs(120), || keys(&t.output).len() == 3), "3 tagged events with the registry up; log:\n{}", p.log());
    // ...except a writer schema it has never seen: a new version of the input subject, registered
    // behind the tagger's back, then the registry fails for good.
    let subject = format!("{}-value", t.input);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let codec = Codec::new(&registry()).unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("schemas/media_ingested.avsc")).unwrap()).unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!({"name": "liveness_extra", "type": ["null", "string"], "default": null}));
    let id = rt.block_on(codec.register(&subject, &schema.to_string(), "BACKWARD")).expect("register v2 of the input schema");
    flaky.fail();
    let item = MediaIngested {
        media_id: "budget-1".into(),
        kind: MediaKind::Article,
        title: "The team won the cup final".into(),
        description: None,
        transcript: None,
        language: None,
        source: "liveness".into(),
        ingested_at: now_millis(),
        attributes: Default::default(),
        candidate_labels: None,
    };
    // v2's encoding: v1's fields, then the new optional field's null branch (union index 0).
    let mut bytes = Codec::frame(id, &item).unwrap();
    bytes.push(0);
    produce_raw(&t.input, "budget-1", &bytes);
    let started = Instant::now();
    let status = p.wait_exit(Duration::from_secs(120)).unwrap_or_else(|| panic!("still running 120 s into a registry failing with a 5 s budget; log:\n{}", p.log()));
    let log = p.log();
    assert!(!status.success(), "past transient_budget the tagger exits non-zero ({status}); log:\n{log}");
    assert!(started.elapsed() >= Duration::from_secs(5), "not before the budget ({:?})", started.elapsed());
    assert!(log.contains("transient_budget") && log.contains(&flaky.url), "the exit names the budget and the registry ({}); log:\n{log}", flaky.url);
    assert_eq!(committed(&t.group, &t.input), 3, "the record that never decoded is not committed");
}

#[test]
fn a_drain_overrunning_drain_timeout_stops_at_the_timeout_and_the_rest_is_redelivered() {
    streamoasis_testkit::require_stack!();
    let t = topology_with("drain-timeout", |y| y["processors"]["tagger"]["drain_timeout"] = "1s".into());
    t.apply();
    // Slow items: a long transcript each (several model windows).
    let words = "The striker scored twice as the team won the championship final in extra time after a long season. ";
    let ids = t.produce_items(0, 60, |i| serde_json::json!({"media_id": format!("drain-{i:03}"), "title": format!("Match report {i}"), "transcript": words.repeat(40)}));
    let mut p = t.spawn_tagger(free_addr());
    let ok = |p: &Proc| p.metric("streamoasis_records_total", &[("processor", "tagger"), ("outcome", "ok")]).unwrap_or(-1.0);
    assert!(wait_until(Duration::from_secs(240), || ok(&p) >= 1.0), "no record tagged; log:\n{}", p.log());
    let done_before = ok(&p);
    assert!(done_before < 50.0, "SIGTERM must land while records are in flight ({done_before} done already)");
    p.signal("-TERM");
    let sent = Instant::now();
    let status = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("still running 30 s after SIGTERM with a 1 s drain_timeout; log:\n{}", p.log()));
    let took = sent.elapsed();
    let log = p.log();
    assert!(log.contains("drain timeout: abandoning in-flight records"), "the drain timeout's message; log:\n{log}");
    assert_eq!(status.code(), Some(0), "a drain timeout is a clean stop ({status}); log:\n{log}");
    assert!(took < Duration::from_secs(15), "stopped near the 1 s drain timeout, took {took:?}");
    let committed_at_exit = committed(&t.group, &t.input);
    assert!(committed_at_exit < 60, "abandoned records are not committed ({committed_at_exit} of 60)");
    // A new tagger picks up the abandoned records: every item tagged.
    let p2 = t.spawn_tagger(free_addr());
    assert!(
        wait_until(Duration::from_secs(300), || committed(&t.group, &t.input) == 60),
        "the restarted tagger committed all 60 (at {}); log:\n{}",
        committed(&t.group, &t.input),
        p2.log()
    );
    let mut got = keys(&t.output);
    got.sort();
    got.dedup();
    assert_eq!(got, ids, "every item tagged after the redelivery");
}

/// A minimal HTTP/1.0 POST of a JSON body: the status code.
fn http_post_json(addr: std::net::SocketAddr, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(s, "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn the_api_healthz_fails_when_its_model_thread_dies() {
    streamoasis_testkit::require_stack!();
    let t = topology("api-model-dead");
    // The API reads from the database too: topics, schemas and the keyspace.
    let out = t.cmd().args(["topology", "apply"]).output().unwrap();
    assert!(out.status.success(), "topology apply: {}", String::from_utf8_lossy(&out.stderr));
    let (http, grpc) = (free_addr(), free_addr());
    let log = t.dir.join("api.log");
    let trigger = t.dir.join("model-exit");
    let f = std::fs::File::create(&log).unwrap();
    let child = t
        .cmd()
        .args(["api", "--addr", &http.to_string(), "--grpc-addr", &grpc.to_string(), "--insecure-no-auth"])
        .env(MODEL_EXIT_HOOK, &trigger)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let p = Proc { child, log, metrics: http };
    assert!(wait_until(Duration::from_secs(180), || p.get("/readyz").map(|r| r.0) == Some(200)), "/readyz never 200; log:\n{}", p.log());
    assert_eq!(http_post_json(http, "/v1/tag", r#"{"title": "The cup final went to penalties"}"#), Some(200), "tags while the model thread runs; log:\n{}", p.log());
    assert_eq!(p.get("/healthz").map(|r| r.0), Some(200), "/healthz 200 while the model thread runs");
    std::fs::write(&trigger, b"").unwrap();
    // The next request's batch ends the model thread: it cannot be answered with tags.
    assert_ne!(http_post_json(http, "/v1/tag", r#"{"title": "Parliament passed the budget"}"#), Some(200), "no tags without a model; log:\n{}", p.log());
    let mut last = None;
    let failed = wait_until(Duration::from_secs(60), || {
        last = p.get("/healthz");
        last.as_ref().is_some_and(|r| r.0 == 503)
    });
    assert!(failed, "the API's /healthz still {last:?} 60 s after its model thread exited; log:\n{}", p.log());
    assert!(last.unwrap().1.contains("model thread"), "/healthz says why");
    assert_ne!(p.get("/readyz").map(|r| r.0), Some(200), "not ready without a model");
}

//! The shipped binary as processes on the real local stack: `/metrics` scraped during a run (each
//! metric that matters moves), `/healthz` and `/readyz`, SIGTERM → drain → exit 0, and connected
//! traces: an in-process OTLP/HTTP receiver collects the spans of `produce`, `tagger` and `sink`,
//! and every item's spans from the three processes share one trace id.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env, free_port, spawn, terminate};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

/// (service name, trace id, span name) of every span received.
type Spans = Arc<Mutex<Vec<(String, Vec<u8>, String)>>>;

/// An OTLP/HTTP (protobuf) trace receiver on a loopback port.
async fn otlp_receiver() -> (String, Spans) {
    use axum::{body::Bytes, routing::post, Router};
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push((service.clone(), s.trace_id, s.name));
                        }
                    }
                }
                ""
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

/// Sum of the samples of `name` whose labels contain every `labels` fragment.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let base = series.split('{').next().unwrap_or(series);
        if base == name && labels.iter().all(|l| series.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

async fn wait_for(url: &str, status: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while get(url).await.0 != status {
        assert!(Instant::now() < deadline, "{url} did not answer {status} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_health_answers_and_traces_connect_across_processes() {
    streamoasis_testkit::require_stack!();
    let env = env(2, "at_least_once").await;
    let (otlp, spans) = otlp_receiver().await;
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let log = tmp.join(format!("observability-{}.log", env.id));
    let otel = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()), ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string())];

    let mut apply = spawn(&env, &["topology", "apply"], &[], &log);
    assert!(apply.wait().unwrap().success(), "topology apply (log: {})", log.display());
    let (pt, ps) = (free_port(), free_port());
    let mut tagger = spawn(&env, &["tagger", "--metrics-addr", &format!("127.0.0.1:{pt}")], &otel, &log);
    let mut sink = spawn(&env, &["sink", "--metrics-addr", &format!("127.0.0.1:{ps}")], &otel, &log);
    let (t, s) = (format!("http://127.0.0.1:{pt}"), format!("http://127.0.0.1:{ps}"));
    wait_for(&format!("{t}/healthz"), 200, Duration::from_secs(120)).await;
    wait_for(&format!("{t}/readyz"), 200, Duration::from_secs(120)).await;
    wait_for(&format!("{s}/readyz"), 200, Duration::from_secs(120)).await;
    assert_eq!(get(&format!("{s}/healthz")).await.0, 200);

    // 20 items through `streamoasis produce`, which starts one trace per item.
    let n = 20;
    let items = tmp.join(format!("items-{}.jsonl", env.id));
    let lines: Vec<String> =
        (0..n).map(|i| serde_json::json!({"media_id": format!("obs-{i:02}"), "title": format!("The team won the final, match report {i}"), "kind": "CLIP"}).to_string()).collect();
    std::fs::write(&items, lines.join("\n")).unwrap();
    let mut produce = spawn(&env, &["produce", items.to_str().unwrap(), "--quiet"], &otel, &log);
    assert!(produce.wait().unwrap().success(), "produce (log: {})", log.display());

    // Scrape while the run goes on, until the sink has written every item.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (tm, sm) = loop {
        let (tm, sm) = (get(&format!("{t}/metrics")).await.1, get(&format!("{s}/metrics")).await.1);
        let done = metric(&sm, "streamoasis_records_total", &["processor=\"sink\"", "outcome=\"ok\""]) == Some(n as f64);
        let lag = metric(&tm, "streamoasis_consumer_lag", &[]).is_some() && metric(&sm, "streamoasis_consumer_lag", &[]).is_some();
        if done && lag {
            break (tm, sm);
        }
        assert!(Instant::now() < deadline, "sink wrote {:?} of {n}; lag seen: {lag} (log: {})", metric(&sm, "streamoasis_records_total", &[]), log.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let count = |text: &str, name: &str, labels: &[&str]| metric(text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing"));
    assert_eq!(count(&tm, "streamoasis_records_total", &["processor=\"tagger\"", "outcome=\"ok\""]), n as f64);
    assert_eq!(count(&tm, "streamoasis_e2e_latency_seconds_count", &["processor=\"tagger\""]), n as f64);
    assert_eq!(count(&sm, "streamoasis_e2e_latency_seconds_count", &["processor=\"sink\""]), n as f64);
    assert!(count(&tm, "streamoasis_batch_queue_wait_seconds_count", &[]) >= n as f64, "every sequence waited in the queue once");
    assert!(count(&tm, "streamoasis_inference_seconds_count", &[]) >= 1.0);
    assert!(count(&tm, "streamoasis_batch_size_count", &[]) >= 1.0);
    assert!(count(&sm, "streamoasis_db_write_seconds_count", &[]) >= n as f64);
    assert_eq!(metric(&sm, "streamoasis_db_errors_total", &[]).unwrap_or(0.0), 0.0);
    assert_eq!(count(&tm, "streamoasis_in_flight", &["processor=\"tagger\""]), 0.0);
    assert!(count(&tm, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(!tm.contains("obs-0"), "no per-media label");

    // SIGTERM: drain, commit, exit 0.
    assert_eq!(terminate(&mut tagger).code(), Some(0), "tagger exit (log: {})", log.display());
    assert_eq!(terminate(&mut sink).code(), Some(0), "sink exit (log: {})", log.display());

    // Every item: one trace with spans from produce, tagger and sink.
    let spans = spans.lock().unwrap().clone();
    let mut services: HashMap<Vec<u8>, HashSet<String>> = HashMap::new();
    for (service, trace, _) in &spans {
        services.entry(trace.clone()).or_default().insert(service.clone());
    }
    let want: HashSet<String> = ["streamoasis-produce", "streamoasis-tagger", "streamoasis-sink"].map(String::from).into();
    let connected = services.values().filter(|s| **s == want).count();
    assert_eq!(connected, n, "traces spanning produce → tagger → sink ({} spans in {} traces)", spans.len(), services.len());
    let names: HashSet<&str> = spans.iter().map(|(_, _, n)| n.as_str()).collect();
    for name in ["produce", "record", "decode", "inference", "db_write"] {
        assert!(names.contains(name), "span {name} exported: {names:?}");
    }
}

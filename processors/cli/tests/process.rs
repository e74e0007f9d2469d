//! The shipped binary as a process, against the real local stack: what an operator and
//! Kubernetes see. SIGTERM drains, commits and exits 0 (also while the model is still loading); a
//! fatal error exits non-zero naming what to fix; `/healthz`, `/readyz` and `/metrics` are scraped
//! over HTTP while it runs. Each test uses its own topology copy (topics, subjects, group).

mod common;

use std::time::Duration;

use common::proc::*;
use streamoasis_pipeline::codec::Codec;

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

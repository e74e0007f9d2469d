//! The broker going away for longer than `consumer_error_timeout`: liveness fails, then the
//! tagger exits non-zero saying what the consumer saw. This test stops the local stack's broker
//! (and starts it again with `scripts/stack up`, also when it fails), so it is alone in its test
//! binary: test binaries run one after another.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::proc::*;

/// Starts the stack again (the broker) however the test ends.
struct BrokerBack;

impl Drop for BrokerBack {
    fn drop(&mut self) {
        let out = Command::new(root().join("scripts/stack")).arg("up").output().expect("scripts/stack up");
        assert!(out.status.success() || std::thread::panicking(), "scripts/stack up: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn broker_pid() -> i32 {
    let file = root().join(".cache/stack/kafka.pid");
    let pid = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e} (is this repository's `scripts/stack up` running?)", file.display()));
    pid.trim().parse().unwrap()
}

#[test]
fn the_broker_away_past_consumer_error_timeout_ends_the_tagger_non_zero() {
    streamoasis_testkit::require_stack!();
    let t = topology_with("broker-away", |y| y["processors"]["tagger"]["consumer_error_timeout"] = "5s".into());
    t.apply();
    t.produce(0, 3);
    let mut p = t.spawn_tagger(free_addr());
    assert!(wait_until(Duration::from_secs(180), || keys(&t.output).len() == 3), "3 tagged events before the fault; log:\n{}", p.log());
    assert_eq!(p.get("/healthz").map(|r| r.0), Some(200), "/healthz 200 with the broker up");

    let pid = broker_pid();
    let _back = BrokerBack;
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success(), "stop the broker");
    assert!(wait_until(Duration::from_secs(60), || !std::path::Path::new(&format!("/proc/{pid}")).exists()), "the broker stopped within 60 s");
    let gone = Instant::now();

    // Liveness fails first (after consumer_error_timeout), then the process gives up.
    let mut seen = Vec::new();
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        if let Some((code, body)) = p.get("/healthz") {
            if seen.last().map(|(c, _)| *c) != Some(code) {
                seen.push((code, body));
            }
        }
        assert!(gone.elapsed() < Duration::from_secs(120), "still running 120 s after the broker left (consumer_error_timeout 5 s; /healthz seen {seen:?}); log:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = p.log();
    assert!(!status.success(), "exit non-zero ({status}); log:\n{log}");
    assert!(seen.iter().any(|(c, b)| *c == 503 && b.contains("consumer")), "/healthz 503 naming the consumer before the exit (seen {seen:?})");
    assert!(log.contains("the Kafka consumer has reported only errors"), "the exit says what the consumer saw; log:\n{log}");
    assert!(gone.elapsed() >= Duration::from_secs(5), "not before consumer_error_timeout ({:?})", gone.elapsed());
}

//! What an operator runs, as commands against the real local stack: SIGHUP reloads the labels of
//! a running tagger, `retag` and `dlq replay` with their flags and time parsing, and `api`
//! refusing to start without a key.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Output;
use std::time::{Duration, Instant};

use common::proc::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::MediaTagged;

/// A record read back: partition, offset, key, payload, headers.
type Rec = (i32, i64, String, Option<Vec<u8>>, Vec<(String, String)>);

/// Every record of `topic`, from the beginning to its end.
fn records(topic: &str) -> Vec<Rec> {
    common::read_topic(&kafka(), topic)
        .into_iter()
        .map(|r| (r.partition, r.offset, String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned(), r.payload, r.headers))
        .collect()
}

/// `streamoasis <args>` on the topology, to completion.
fn run(t: &Topo, args: &[&str]) -> Output {
    t.cmd().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tagger_dlq(t: &Topo) -> String {
    let y: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&t.path).unwrap()).unwrap();
    y["processors"]["tagger"]["dlq"].as_str().unwrap().to_string()
}

#[test]
fn sighup_reloads_the_labels_of_a_running_tagger_and_keeps_them_on_a_bad_file() {
    streamoasis_testkit::require_stack!();
    let t = topology("sighup");
    t.apply();
    let mut p = t.spawn_tagger(free_addr());
    assert!(wait_until(Duration::from_secs(180), || p.get("/readyz").map(|r| r.0) == Some(200)), "never ready; log:\n{}", p.log());
    let title = |i: usize| serde_json::json!({"media_id": format!("hup-{i}"), "title": "The striker scored twice as the team won the cup final"});
    t.produce_items(0, 1, title);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let codec = Codec::new(&registry()).unwrap();
    let tags_of = |id: &str| -> Option<Vec<String>> {
        let rec = records(&t.output).into_iter().find(|r| r.2 == id)?;
        let e: MediaTagged = rt.block_on(codec.decode::<MediaTagged>(rec.3.as_deref())).unwrap().event;
        Some(e.tags.into_iter().map(|t| t.label).collect())
    };
    let mut before = None;
    assert!(wait_until(Duration::from_secs(120), || {
        before = tags_of("hup-0");
        before.is_some()
    }));
    let before = before.unwrap();
    assert!(before.iter().any(|l| l == "sport"), "the shipped taxonomy tags a match report 'sport' ({before:?})");

    // New taxonomy: two labels, neither in the old one.
    let original = std::fs::read_to_string(&t.path).unwrap();
    let mut y: serde_yaml::Value = serde_yaml::from_str(&original).unwrap();
    y["tagging"]["labels"] = serde_yaml::from_str("[{name: football, descriptions: [football, a football match]}, {name: finance, descriptions: [money and markets]}]").unwrap();
    std::fs::write(&t.path, serde_yaml::to_string(&y).unwrap()).unwrap();
    p.signal("-HUP");
    assert!(wait_until(Duration::from_secs(60), || p.log().contains("SIGHUP: taxonomy reloaded")), "no reload logged; log:\n{}", p.log());
    assert!(plain(&p.log()).contains("SIGHUP: taxonomy reloaded labels=2"), "the reload counts the new labels; log:\n{}", p.log());
    t.produce_items(1, 1, title);
    let mut after = None;
    assert!(wait_until(Duration::from_secs(120), || {
        after = tags_of("hup-1");
        after.is_some()
    }));
    let after = after.unwrap();
    assert!(after.iter().all(|l| l == "football" || l == "finance"), "tags after the reload come from the new labels only ({after:?})");

    // A broken file: the labels stay, the process keeps running.
    std::fs::write(&t.path, original.replace("labels:", "labels: [this is: not valid")).unwrap();
    p.signal("-HUP");
    assert!(wait_until(Duration::from_secs(60), || p.log().contains("SIGHUP: taxonomy not reloaded")), "no refusal logged; log:\n{}", p.log());
    assert!(p.child.try_wait().unwrap().is_none(), "still running after a bad reload");
    // The file is made whole again for `streamoasis produce` (which reads it too); the running
    // tagger only reads it on the next SIGHUP, so it keeps the labels it has.
    std::fs::write(&t.path, serde_yaml::to_string(&y).unwrap()).unwrap();
    t.produce_items(2, 1, title);
    let mut kept = None;
    assert!(wait_until(Duration::from_secs(120), || {
        kept = tags_of("hup-2");
        kept.is_some()
    }));
    assert!(kept.unwrap().iter().all(|l| l == "football" || l == "finance"), "the current labels stay after a bad file");
    p.signal("-TERM");
    assert_eq!(p.wait_exit(Duration::from_secs(60)).and_then(|s| s.code()), Some(0));
}

#[test]
fn retag_as_a_command_by_ids_and_by_time_and_refuses_a_bad_time() {
    streamoasis_testkit::require_stack!();
    let t = topology("retag");
    t.apply();
    let ids = t.produce(0, 5);
    let o = run(&t, &["retag", "--ids", &format!("{},{}", ids[1], ids[3]), "--quiet"]);
    assert!(o.status.success(), "retag --ids: {}", stderr(&o));
    assert!(stderr(&o).contains("re-sent 2,"), "{}", stderr(&o));
    let mut keys_now: Vec<String> = records(&t.input).into_iter().map(|r| r.2).collect();
    keys_now.sort();
    let mut want: Vec<String> = ids.iter().chain([&ids[1], &ids[3]]).cloned().collect();
    want.sort();
    assert_eq!(keys_now, want, "exactly the two ids re-sent");

    // --since: an age covers all 7; a time in the future none.
    let o = run(&t, &["retag", "--since", "2h", "--quiet"]);
    assert!(o.status.success() && stderr(&o).contains("re-sent 7,"), "retag --since 2h: {}", stderr(&o));
    let o = run(&t, &["retag", "--since", "2999-01-01T00:00:00Z", "--quiet"]);
    assert!(o.status.success() && stderr(&o).contains("re-sent 0,"), "retag --since <future>: {}", stderr(&o));
    assert_eq!(records(&t.input).len(), 14);
    // A time it cannot read: refused, naming the flag, nothing sent.
    let o = run(&t, &["retag", "--since", "last tuesday", "--quiet"]);
    assert!(!o.status.success(), "a bad --since must fail");
    assert!(stderr(&o).contains("--since"), "names the flag: {}", stderr(&o));
    let o = run(&t, &["retag", "--quiet"]);
    assert!(!o.status.success() && stderr(&o).contains("say where to start"), "no start given: {}", stderr(&o));
    assert_eq!(records(&t.input).len(), 14, "refused runs send nothing");
}

#[test]
fn dlq_replay_as_a_command_filters_by_kind_and_time_and_restores_payload_less_letters_from_the_source() {
    streamoasis_testkit::require_stack!();
    let t = topology("replay");
    t.apply();
    let dlq = tagger_dlq(&t);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = streamoasis_pipeline::kafka::producer(&kafka(), &BTreeMap::new()).unwrap();
    let send = |topic: &str, key: &str, payload: Option<&[u8]>, headers: &[(&str, String)]| {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_str()) });
        }
        let mut r = FutureRecord::to(topic).key(key).headers(h);
        if let Some(b) = payload {
            r = r.payload(b);
        }
        let d = rt.block_on(p.send(r, Duration::from_secs(10))).map_err(|(e, _)| e).unwrap();
        (d.partition, d.offset)
    };
    // An original still in the source topic (its dead letter carries no payload).
    let big = vec![b'q'; 3000];
    let (bp, bo) = send(&t.input, "replay-big", Some(&big[..]), &[]);
    let letter = |kind: &str, part: i32, off: i64| {
        vec![
            ("trace".to_string(), "kept".to_string()),
            ("error.kind".into(), kind.to_string()),
            ("error.message".into(), "test".into()),
            ("error.processor".into(), "tagger".into()),
            ("source.topic".into(), t.input.clone()),
            ("source.partition".into(), part.to_string()),
            ("source.offset".into(), off.to_string()),
            ("schema.id".into(), String::new()),
        ]
    };
    fn as_ref(v: &[(String, String)]) -> Vec<(&str, String)> {
        v.iter().map(|(k, x)| (k.as_str(), x.clone())).collect()
    }
    send(&dlq, "replay-a", Some(&b"bytes of a"[..]), &as_ref(&letter("bad_framing", 0, 1000)));
    send(&dlq, "replay-b", Some(&b"bytes of b"[..]), &as_ref(&letter("undecodable", 1, 1001)));
    let mut omitted = letter("record_too_large", bp, bo);
    omitted.push(("error.payload_omitted_bytes".into(), big.len().to_string()));
    send(&dlq, "replay-big", None, &as_ref(&omitted));
    let before = records(&t.input).len();

    let o = run(&t, &["dlq", "replay", "--kind", "bad_framing", "--dry-run", "--quiet"]);
    assert!(o.status.success() && stderr(&o).contains("would re-send 1,"), "dry run by kind: {}", stderr(&o));
    let o = run(&t, &["dlq", "replay", "--until", "2h", "--quiet"]);
    assert!(o.status.success() && stderr(&o).contains("re-sent 0,"), "--until 2h ago: none: {}", stderr(&o));
    let o = run(&t, &["dlq", "replay", "--since", "not-a-time", "--quiet"]);
    assert!(!o.status.success() && stderr(&o).contains("--since"), "a bad --since is refused naming it: {}", stderr(&o));
    assert_eq!(records(&t.input).len(), before, "dry run, empty window and refusal send nothing");

    let o = run(&t, &["dlq", "replay", "--since", "1h", "--quiet"]);
    assert!(o.status.success() && stderr(&o).contains("re-sent 3,"), "replay: {}", stderr(&o));
    let resent: HashMap<String, Rec> = records(&t.input).into_iter().filter(|r| !(r.0 == bp && r.1 == bo)).map(|r| (r.2.clone(), r)).collect();
    for (key, bytes) in [("replay-a", b"bytes of a".to_vec()), ("replay-b", b"bytes of b".to_vec()), ("replay-big", big.clone())] {
        let r = resent.get(key).unwrap_or_else(|| panic!("{key} re-sent to {}", t.input));
        assert_eq!(r.3.as_deref(), Some(&bytes[..]), "{key}: the original bytes (a payload-less letter's from source.partition/offset)");
        let names: Vec<&str> = r.4.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.iter().all(|k| !k.starts_with("error.") && !k.starts_with("source.") && *k != "schema.id"), "{key}: dead-letter headers dropped, got {names:?}");
        assert!(r.4.iter().any(|(k, v)| k == "trace" && v == "kept"), "{key}: the record's own headers kept ({names:?})");
    }
}

#[test]
fn api_refuses_to_start_without_a_key_and_with_both_a_key_and_insecure() {
    streamoasis_testkit::require_stack!();
    let t = topology("api-keys");
    let api = |extra: &[&str], vars: &[(&str, &str)]| {
        let mut c = t.cmd();
        c.args(["api", "--addr", &free_addr().to_string(), "--grpc-addr", &free_addr().to_string()]).args(extra);
        for k in ["STREAMOASIS_JWT_HS256_SECRET", "STREAMOASIS_JWT_HS256_SECRET_FILE", "STREAMOASIS_JWT_JWKS_FILE"] {
            c.env_remove(k);
        }
        for (k, v) in vars {
            c.env(k, v);
        }
        let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`streamoasis api {extra:?}` still running after 60 s: it must refuse at start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    };
    let o = api(&[], &[]);
    assert!(!o.status.success(), "no key: refused");
    assert!(stderr(&o).contains("no JWT key configured") && stderr(&o).contains("--insecure-no-auth"), "says what to set: {}", stderr(&o));
    let o = api(&["--insecure-no-auth"], &[("STREAMOASIS_JWT_HS256_SECRET", "0123456789abcdef0123456789abcdef")]);
    assert!(!o.status.success() && stderr(&o).contains("drop one of them"), "key and --insecure-no-auth: refused: {}", stderr(&o));
}

/// `log` without ANSI colour sequences (`ESC [ ... m`).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A tagged event with the given tags, as the sink receives one.
fn tagged_event(id: &str, tags: &[(&str, f32)], offset: i64) -> MediaTagged {
    use streamoasis_pipeline::events::{Lineage, MediaKind, ModelRef, Strategy, Tag};
    MediaTagged {
        media_id: id.into(),
        kind: MediaKind::Episode,
        tags: tags.iter().map(|(l, s)| Tag { label: l.to_string(), score: *s }).collect(),
        no_tags_reason: None,
        strategy: Strategy::Embedding,
        model: ModelRef { name: "m".into(), version: "1".into() },
        ingested_at: 1_700_000_000_000,
        tagged_at: 1_700_000_001_000 + offset,
        lineage: Lineage { topic: "t".into(), partition: 0, offset },
        title: Some(format!("Title of {id}")),
        source: None,
        language: None,
        attributes: HashMap::new(),
        taxonomy_version: None,
        embedding: None,
    }
}

#[test]
fn compare_reports_a_shadow_keyspaces_agreement_with_the_live_one() {
    streamoasis_testkit::require_stack!();
    let keyspace = |name: String| move |t: &mut serde_yaml::Value| t["scylla"]["keyspace"] = name.into();
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let live = topology_with("compare", keyspace(format!("live_{id}")));
    let shadow = topology_with("compare-shadow", keyspace(format!("shadow_{id}")));
    // 30 items in both: the shadow moves every third item's best tag from sport to business and
    // adds tech to every fifth; two items only live, one only in the shadow.
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (t, shadow_side) in [(&live, false), (&shadow, true)] {
        let out = run(t, &["topology", "apply"]);
        assert!(out.status.success(), "{}", stderr(&out));
        rt.block_on(async {
            let topo = streamoasis_pipeline::topology::Topology::load(&t.path).unwrap();
            let cfg = streamoasis_sink::SinkConfig::from_topology(&topo).unwrap();
            let session = std::sync::Arc::new(streamoasis_sink::connect(&common::proc::scylla(), &cfg).await.unwrap());
            let w = streamoasis_sink::TagWriter::new(session, &cfg).await.unwrap();
            for i in 0..30 {
                let mut tags = vec![("sport", 0.9), ("business", 0.4)];
                if shadow_side && i % 3 == 0 {
                    tags = vec![("business", 0.8), ("sport", 0.3)];
                }
                if shadow_side && i % 5 == 0 {
                    tags.push(("tech", 0.2));
                }
                assert!(w.write(&tagged_event(&format!("cmp-{i:02}"), &tags, i)).await.unwrap());
            }
            let extra: &[&str] = if shadow_side { &["cmp-shadow-only"] } else { &["cmp-live-only-1", "cmp-live-only-2"] };
            for (j, x) in extra.iter().enumerate() {
                assert!(w.write(&tagged_event(x, &[("sport", 0.5)], 100 + j as i64)).await.unwrap());
            }
        });
    }
    let out = run(&live, &["compare", "--shadow", shadow.path.to_str().unwrap(), "--json", "--examples", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["both"].as_u64(), r["live_only"].as_u64(), r["shadow_only"].as_u64()), (Some(30), Some(2), Some(1)), "{r}");
    assert_eq!(r["top1_agree"], 20, "10 of 30 best tags moved");
    assert!((r["top1_agreement"].as_f64().unwrap() - 20.0 / 30.0).abs() < 1e-9);
    let l = &r["labels"];
    assert_eq!((l["sport"]["live"].as_u64(), l["sport"]["shadow"].as_u64(), l["sport"]["both"].as_u64()), (Some(30), Some(30), Some(30)));
    assert_eq!((l["tech"]["live"].as_u64(), l["tech"]["shadow"].as_u64(), l["tech"]["precision"].as_f64(), l["tech"]["recall"].is_null()), (Some(0), Some(6), Some(0.0), true));
    let d = r["disagreements"].as_array().unwrap();
    assert_eq!(d.len(), 4);
    // The largest: a moved best tag plus tech (items 0, 15: i % 15 == 0), then moved-only ones.
    let ids: Vec<&str> = d.iter().map(|x| x["media_id"].as_str().unwrap()).collect();
    assert_eq!(&ids[..2], ["cmp-00", "cmp-15"], "{r}");
    assert_eq!(d[0]["title"], "Title of cmp-00");
    // The same live keyspace as the shadow is refused, naming the fix.
    let out = run(&live, &["compare", "--shadow", live.path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("give the shadow its own scylla.keyspace"), "{}", stderr(&out));
    // The text report names the agreement.
    let out = run(&live, &["compare", "--shadow", shadow.path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("top-1 agreement 66.7% (20 of 30)"), "{text}");
}

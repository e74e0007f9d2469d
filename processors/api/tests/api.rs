//! The serving API end to end on the real local stack (Kafka, schema registry, CQL database):
//! the API, tagger and sink run in-process through the same `serve` functions as
//! `streamoasis api`, `streamoasis tagger --api-addr` and `streamoasis sink`. Every test uses its
//! own topics, consumer groups, subjects and keyspace.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use reqwest::StatusCode;
use serde_json::{json, Value};
use streamoasis_api::auth::{mint_hs256, now_secs, Auth};
use streamoasis_api::proto::tagger_client::TaggerClient;
use streamoasis_api::{Connections, Limits, Listeners};
use streamoasis_pipeline::client::{client_config, producer};
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{Lineage, MediaIngested, MediaKind, MediaTagged, ModelRef, Strategy, Tag};
use streamoasis_pipeline::ops;
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::{admin, env, CancellationToken};
use streamoasis_sink::{schema, SinkConfig, TagWriter};
use streamoasis_tagger::{Tagger, TaggerConfig};

const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
const ISSUER: &str = "streamoasis-tests";
const AUDIENCE: &str = "streamoasis-api";

use streamoasis_testkit::root;

/// The project topology with unique names, `edit` applied to its `tagging` section and
/// `scylla_edit` to its `scylla` section.
fn topology_with(id: &str, edit: impl FnOnce(&mut serde_yaml::Mapping), scylla_edit: impl FnOnce(&mut serde_yaml::Mapping)) -> Topology {
    let mut topo = Topology::load(root().join("topology.yaml")).unwrap();
    topo.isolate(id).unwrap();
    for t in &mut topo.file.topics {
        t.partitions = 2;
    }
    let p = &mut topo.file.processors;
    for spec in [&mut p.tagger, &mut p.sink] {
        spec.drain_timeout = Duration::from_secs(10);
    }
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.scylla {
        m.insert("consistency".into(), "ONE".into());
        scylla_edit(m);
    }
    if let serde_yaml::Value::Mapping(m) = &mut topo.file.tagging {
        if let Some(serde_yaml::Value::Mapping(model)) = m.get_mut("model") {
            model.insert("path".into(), root().join("models/all-MiniLM-L6-v2").display().to_string().into());
        }
        edit(m);
    }
    topo
}

fn set(m: &mut serde_yaml::Mapping, path: &[&str], v: serde_yaml::Value) {
    let mut cur = m;
    for k in &path[..path.len() - 1] {
        cur = cur.entry((*k).into()).or_insert_with(|| serde_yaml::Value::Mapping(Default::default())).as_mapping_mut().unwrap();
    }
    cur.insert(path[path.len() - 1].into(), v);
}

fn labels(names: &[&str]) -> serde_yaml::Value {
    serde_yaml::Value::Sequence(names.iter().map(|n| serde_yaml::to_value(json!({"name": n})).unwrap()).collect())
}

struct Fx {
    topo: Topology,
    conn: Connections,
    codec: Arc<Codec>,
    tagger: Arc<Tagger>,
    http: String,
    grpc: String,
    stop: CancellationToken,
    client: reqwest::Client,
    stopped: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Topics, schemas and tables applied; the tagger loaded; the API started (HS256 + the given
/// JWKS, issuer and audience required) on ephemeral ports.
async fn fixture(edit: impl FnOnce(&mut serde_yaml::Mapping), jwks: Option<&str>) -> Fx {
    fixture_with(edit, |_| {}, jwks).await
}

/// [`fixture`], with `scylla_edit` applied to the topology's `scylla` section.
async fn fixture_with(edit: impl FnOnce(&mut serde_yaml::Mapping), scylla_edit: impl FnOnce(&mut serde_yaml::Mapping), jwks: Option<&str>) -> Fx {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let topo = topology_with(&id, edit, scylla_edit);
    let conn = Connections {
        kafka: env::get(env::KAFKA_BOOTSTRAP, env::DEFAULT_KAFKA),
        registry: env::get(env::SCHEMA_REGISTRY_URL, env::DEFAULT_REGISTRY),
        scylla: Some(env::get(env::SCYLLA_URI, env::DEFAULT_SCYLLA)),
    };
    let codec = Arc::new(Codec::new(&conn.registry).unwrap());
    admin::apply_topics(&conn.kafka, &topo).await.expect("topics (is `scripts/stack up` running?)");
    admin::apply_schemas(&codec, &topo).await.expect("schemas");
    let sink_cfg = SinkConfig::from_topology(&topo).unwrap();
    let session = streamoasis_sink::connect(conn.scylla.as_ref().unwrap(), &sink_cfg).await.unwrap();
    schema::apply(&session, &sink_cfg).await.unwrap();
    let tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&topo).unwrap()).await.unwrap());
    let auth = Auth::new(Some(SECRET), jwks, Some(ISSUER.into()), Some(AUDIENCE.into())).unwrap();
    let mut fx = Fx { topo, conn, codec, tagger, http: String::new(), grpc: String::new(), stop: CancellationToken::new(), client: reqwest::Client::new(), stopped: vec![] };
    let limits = Limits { max_body_bytes: 256 * 1024, max_text_bytes: 16 * 1024, ..Limits::default() };
    let state = Arc::new(streamoasis_api::state(&fx.conn, &fx.topo, fx.tagger.clone(), auth, limits).await.unwrap());
    let l = Listeners::bind("127.0.0.1:0", "127.0.0.1:0").await.unwrap();
    fx.http = format!("http://{}", l.http.local_addr().unwrap());
    fx.grpc = format!("http://{}", l.grpc.local_addr().unwrap());
    fx.stopped.push(tokio::spawn(streamoasis_api::serve(l, state, fx.stop.clone())));
    fx
}

impl Fx {
    fn token(&self) -> String {
        mint_hs256(SECRET, "tests", Duration::from_secs(300), Some(ISSUER), Some(AUDIENCE)).unwrap()
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.client.post(format!("{}{path}", self.http)).bearer_auth(self.token()).json(body).send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.get(format!("{}{path}", self.http)).bearer_auth(self.token()).send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Start the tagger and the sink through their `serve` functions (as the commands do).
    async fn start_pipeline(&mut self) {
        let sink_cfg = SinkConfig::from_topology(&self.topo).unwrap();
        let session = Arc::new(streamoasis_sink::connect(self.conn.scylla.as_ref().unwrap(), &sink_cfg).await.unwrap());
        let writer = Arc::new(TagWriter::new(session, &sink_cfg).await.unwrap());
        let (topo, kafka, codec, stop) = (self.topo.clone(), self.conn.kafka.clone(), self.codec.clone(), self.stop.clone());
        self.stopped.push(tokio::spawn(async move { streamoasis_sink::serve(&topo, &kafka, codec, writer, None, stop).await.map(|_| ()) }));
        let (topo, kafka, codec, stop, tagger) = (self.topo.clone(), self.conn.kafka.clone(), self.codec.clone(), self.stop.clone(), self.tagger.clone());
        self.stopped.push(tokio::spawn(async move { streamoasis_tagger::serve(&topo, &kafka, codec, tagger, None, stop).await.map(|_| ()) }));
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for h in self.stopped {
            h.await.unwrap().unwrap();
        }
    }

    fn end_offsets(&self, topic: &str) -> i64 {
        let c: BaseConsumer = client_config(&self.conn.kafka, &Default::default()).create().unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        md.topics()[0].partitions().iter().map(|p| c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)).unwrap().1).sum()
    }
}

/// Poll until the condition holds (or fail after `secs`).
macro_rules! eventually {
    ($secs:expr, $what:expr, $cond:expr) => {{
        let t = Instant::now();
        while !$cond {
            assert!(t.elapsed() < Duration::from_secs($secs), "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }};
}

fn error_field(v: &Value) -> &str {
    v["error"]["field"].as_str().unwrap_or("")
}

// ───────────────────────────── auth ─────────────────────────────

struct Rsa {
    pem: Vec<u8>,
    n: String,
}

fn rsa_key(dir: &Path, name: &str) -> Rsa {
    let path = dir.join(format!("{name}.pem"));
    let ok = std::process::Command::new("openssl").args(["genrsa", "-out"]).arg(&path).arg("2048").output().unwrap();
    assert!(ok.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&ok.stderr));
    let m = std::process::Command::new("openssl").args(["rsa", "-noout", "-modulus", "-in"]).arg(&path).output().unwrap();
    let hex = String::from_utf8(m.stdout).unwrap().trim().trim_start_matches("Modulus=").to_string();
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    Rsa { pem: std::fs::read(&path).unwrap(), n: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes) }
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_failures_are_401_with_json_and_open_routes_stay_open() {
    streamoasis_testkit::require_stack!();
    let dir = std::env::temp_dir().join(format!("so-jwks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (rsa_key(&dir, "a"), rsa_key(&dir, "b"));
    // Two keys: the token's kid picks the one that must verify it.
    let jwks = json!({"keys": [
        {"kty": "RSA", "kid": "key-a", "alg": "RS256", "use": "sig", "n": a.n, "e": "AQAB"},
        {"kty": "RSA", "kid": "key-b", "alg": "RS256", "use": "sig", "n": b.n, "e": "AQAB"},
    ]})
    .to_string();
    let fx = fixture(|_| {}, Some(&jwks)).await;
    let url = format!("{}/v1/tag", fx.http);
    let body = json!({"title": "The cup final went to penalties"});
    let claims = |exp: u64, aud: &str| json!({"sub": "t", "exp": exp, "iss": ISSUER, "aud": aud});
    let hs = EncodingKey::from_secret(SECRET);
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(claims(now_secs() + 300, AUDIENCE)));
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("not bearer", Some("Basic dXNlcjpwYXNz".into())),
        ("expired", Some(format!("Bearer {}", sign(Algorithm::HS256, &hs, None, claims(now_secs() - 3600, AUDIENCE))))),
        ("wrong audience", Some(format!("Bearer {}", sign(Algorithm::HS256, &hs, None, claims(now_secs() + 300, "someone-else"))))),
        ("wrong issuer", Some(format!("Bearer {}", sign(Algorithm::HS256, &hs, None, json!({"exp": now_secs() + 300, "iss": "x", "aud": AUDIENCE}))))),
        (
            "wrong HS256 key",
            Some(format!("Bearer {}", sign(Algorithm::HS256, &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!"), None, claims(now_secs() + 300, AUDIENCE)))),
        ),
        ("wrong RS256 key", Some(format!("Bearer {}", sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&b.pem).unwrap(), Some("key-a"), claims(now_secs() + 300, AUDIENCE))))),
        ("unknown kid", Some(format!("Bearer {}", sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&a.pem).unwrap(), Some("key-z"), claims(now_secs() + 300, AUDIENCE))))),
        ("garbage", Some("Bearer not.a.jwt".into())),
        ("alg none, unsigned", Some(format!("Bearer {alg_none}"))),
        ("no exp", Some(format!("Bearer {}", sign(Algorithm::HS256, &hs, None, json!({"sub": "t", "iss": ISSUER, "aud": AUDIENCE}))))),
        (
            "key a under kid key-b",
            Some(format!("Bearer {}", sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&a.pem).unwrap(), Some("key-b"), claims(now_secs() + 300, AUDIENCE)))),
        ),
        ("RS256 without kid", Some(format!("Bearer {}", sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&a.pem).unwrap(), None, claims(now_secs() + 300, AUDIENCE))))),
    ];
    for (what, h) in &cases {
        let mut r = fx.client.post(&url).json(&body);
        if let Some(h) = h {
            r = r.header("authorization", h);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized", "{what}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    // The same routes with good tokens: HS256 and RS256 (key a and key b, each by its kid).
    let rs_a = sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&a.pem).unwrap(), Some("key-a"), claims(now_secs() + 300, AUDIENCE));
    let rs_b = sign(Algorithm::RS256, &EncodingKey::from_rsa_pem(&b.pem).unwrap(), Some("key-b"), claims(now_secs() + 300, AUDIENCE));
    for (what, t) in [("HS256", fx.token()), ("RS256 key-a", rs_a), ("RS256 key-b", rs_b)] {
        let r = fx.client.post(&url).bearer_auth(t).json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{what}");
    }
    for path in ["/v1/media/x/tags", "/v1/tags/sport/media", "/generate-metadata/x"] {
        let r = fx.client.get(format!("{}{path}", fx.http)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let r = fx.client.post(format!("{}/v1/media", fx.http)).json(&json!({"items": []})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Open routes.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = fx.client.get(format!("{}{path}", fx.http)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    for (path, answer) in [("/healthz", "ok"), ("/readyz", "ready")] {
        assert_eq!(fx.client.get(format!("{}{path}", fx.http)).send().await.unwrap().text().await.unwrap(), answer, "{path}");
    }
    let doc: Value = fx.client.get(format!("{}/openapi.json", fx.http)).send().await.unwrap().json().await.unwrap();
    for p in [
        "/v1/tag",
        "/v1/media/{media_id}/tags",
        "/v1/tags/{tag}/media",
        "/v1/media",
        "/v1/media/{media_id}/similar",
        "/v1/search",
        "/v1/media/{media_id}/retag",
        "/generate-metadata/{video_id}",
    ] {
        assert!(doc["paths"][p].is_object(), "openapi lacks {p}");
    }
    let metrics = fx.client.get(format!("{}/metrics", fx.http)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("streamoasis_api_requests_total{route=\"/v1/tag\",status=\"401\"} 13"), "{metrics}");
    // gRPC: no token and a wrong one are UNAUTHENTICATED.
    let mut c = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    let e = c.tag(streamoasis_api::proto::TagRequest { title: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(streamoasis_api::proto::TagRequest { title: "x".into(), ..Default::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {}", cases[3].1.as_ref().unwrap().trim_start_matches("Bearer ")).parse().unwrap());
    assert_eq!(c.tag(req).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    fx.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_key_means_no_auth_config() {
    assert!(Auth::from_env(|_| None).unwrap().is_none());
}

// ───────────────────────────── tagging ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_tag_answers_and_rejects_bad_input_naming_the_field() {
    streamoasis_testkit::require_stack!();
    let fx = fixture(|_| {}, None).await;
    let (s, v) = fx.post("/v1/tag", &json!({"title": "Striker scores twice as the league leaders win the derby", "kind": "clip"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tags = v["tags"].as_array().unwrap();
    assert!(!tags.is_empty() && tags.len() <= 3);
    assert_eq!(tags[0]["label"], "sport", "{v}");
    let scores: Vec<f64> = tags.iter().map(|t| t["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
    assert_eq!(v["kind"], "CLIP");
    assert_eq!(v["strategy"], "EMBEDDING");
    assert_eq!(v["taxonomy_version"], json!(fx.tagger.taxonomy_version()), "{v}");
    let (s, v) = fx.post("/v1/tag", &json!({"title": "Cheese, wine and a long lunch", "candidate_labels": ["food", "finance"]})).await;
    assert_eq!(s, StatusCode::OK);
    let got: HashSet<&str> = v["tags"].as_array().unwrap().iter().map(|t| t["label"].as_str().unwrap()).collect();
    assert!(got.is_subset(&HashSet::from(["food", "finance"])) && !got.is_empty(), "{v}");

    let big = "word ".repeat(4000); // 20 000 bytes > max_text_bytes (16 KiB), < body limit
    let many: Vec<String> = (0..65).map(|i| format!("l{i}")).collect();
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        ("unknown field", json!({"title": "x", "colour": "red"}), StatusCode::UNPROCESSABLE_ENTITY, "colour"),
        ("wrong type", json!({"title": 5}), StatusCode::UNPROCESSABLE_ENTITY, "title"),
        ("empty text", json!({"title": "  ", "description": ""}), StatusCode::UNPROCESSABLE_ENTITY, "title"),
        ("oversized title", json!({"title": big}), StatusCode::UNPROCESSABLE_ENTITY, "title"),
        ("oversized transcript", json!({"title": "x", "transcript": big}), StatusCode::UNPROCESSABLE_ENTITY, "transcript"),
        ("empty labels", json!({"title": "x", "candidate_labels": []}), StatusCode::UNPROCESSABLE_ENTITY, "candidate_labels"),
        ("too many labels", json!({"title": "x", "candidate_labels": many}), StatusCode::UNPROCESSABLE_ENTITY, "candidate_labels"),
        ("blank label", json!({"title": "x", "candidate_labels": ["a", " "]}), StatusCode::UNPROCESSABLE_ENTITY, "candidate_labels"),
        ("unknown kind", json!({"title": "x", "kind": "HOLOGRAM"}), StatusCode::UNPROCESSABLE_ENTITY, "kind"),
        ("not an object", json!(["title"]), StatusCode::UNPROCESSABLE_ENTITY, "body"),
    ];
    for (what, body, status, field) in cases {
        let (s, v) = fx.post("/v1/tag", &body).await;
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(error_field(&v), field, "{what}: {v}");
    }
    let url = format!("{}/v1/tag", fx.http);
    let r = fx.client.post(&url).bearer_auth(fx.token()).header("content-type", "application/json").body("{\"title\": ").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "malformed_json");
    let huge = json!({"title": "x".repeat(300 * 1024)}); // > max_body_bytes (256 KiB)
    let r = fx.client.post(&url).bearer_auth(fx.token()).json(&huge).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "body_too_large");
    let r = fx.client.get(format!("{}/no/such/route", fx.http)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "not_found");
    fx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_429_with_retry_after_and_resource_exhausted() {
    streamoasis_testkit::require_stack!();
    let fx = fixture(
        |m| {
            set(m, &["batching", "queue_capacity"], 4.into());
            set(m, &["batching", "max_batch_size"], 4.into());
        },
        None,
    )
    .await;
    let url = format!("{}/v1/tag", fx.http);
    let token = fx.token();
    let calls = (0..200).map(|i| {
        let (c, url, token) = (fx.client.clone(), url.clone(), token.clone());
        async move {
            let r = c.post(url).bearer_auth(token).json(&json!({"title": format!("Item {i}: the market rallied after the central bank held rates")})).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status(), retry, r.json::<Value>().await.unwrap())
        }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(ok + busy.len(), 200, "only 200 or 429: {:?}", results.iter().map(|r| r.0).collect::<HashSet<_>>());
    assert!(!busy.is_empty(), "a queue of 4 under 200 concurrent calls must push back");
    assert!(ok > 0);
    for (_, retry, v) in &busy {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(v["error"]["code"], "busy");
    }
    // gRPC Tag under the same load: RESOURCE_EXHAUSTED for the ones that did not fit.
    let client = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    let calls = (0..200).map(|i| {
        let mut c = client.clone();
        let token = token.clone();
        async move {
            let mut req = tonic::Request::new(streamoasis_api::proto::TagRequest { title: format!("Item {i}: storms close the coast road"), ..Default::default() });
            req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.tag(req).await.map(|_| ()).map_err(|s| s.code())
        }
    });
    let results = futures::future::join_all(calls).await;
    let exhausted = results.iter().filter(|r| **r == Err(tonic::Code::ResourceExhausted)).count();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count() + exhausted, 200);
    assert!(exhausted > 0);
    fx.shutdown().await;
}

fn grpc_req<T>(fx: &Fx, m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {}", fx.token()).parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_tag_stream_and_reflection() {
    streamoasis_testkit::require_stack!();
    use streamoasis_api::proto::TagRequest as R;
    let fx = fixture(|_| {}, None).await;
    let mut c = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    let r = c.tag(grpc_req(&fx, R { title: "Quarterly profits beat forecasts as shares jump".into(), request_id: "q1".into(), ..Default::default() })).await.unwrap().into_inner();
    assert_eq!(r.tags[0].label, "business", "{r:?}");
    assert_eq!(r.request_id, "q1");
    for (what, req, field) in [
        ("unknown kind", R { title: "x".into(), kind: Some("HOLOGRAM".into()), ..Default::default() }, "kind"),
        ("empty text", R::default(), "title"),
        ("too many labels", R { title: "x".into(), candidate_labels: (0..65).map(|i| format!("l{i}")).collect(), ..Default::default() }, "candidate_labels"),
        ("oversized", R { title: "x".repeat(70 * 1024), ..Default::default() }, "title"),
    ] {
        let e = c.tag(grpc_req(&fx, req)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(e.message().starts_with(&format!("{field}:")), "{what}: {}", e.message());
    }
    // TagStream: 30 requests, one invalid; 30 answers in order, the invalid one with its error.
    let reqs: Vec<R> = (0..30)
        .map(|i| R {
            title: if i % 2 == 0 { format!("Match {i}: the goalkeeper saved a penalty") } else { format!("Report {i}: the company cut its profit forecast") },
            kind: (i == 7).then(|| "HOLOGRAM".to_string()),
            request_id: format!("r{i}"),
            ..Default::default()
        })
        .collect();
    let mut out = c.tag_stream(grpc_req(&fx, futures::stream::iter(reqs))).await.unwrap().into_inner();
    let mut got = vec![];
    while let Some(m) = out.next().await {
        got.push(m.unwrap());
    }
    assert_eq!(got.len(), 30);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.request_id, format!("r{i}"));
        if i == 7 {
            assert!(r.error.as_deref().unwrap().starts_with("kind:"), "{r:?}");
            assert!(r.tags.is_empty());
        } else {
            assert!(r.error.is_none());
            assert_eq!(r.tags[0].label, if i % 2 == 0 { "sport" } else { "business" }, "{r:?}");
        }
    }
    // Reflection lists the service.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(fx.grpc.clone()).unwrap().connect().await.unwrap();
    let mut rc = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut resp = rc.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(l)) = resp.next().await.unwrap().unwrap().message_response else { panic!("list services") };
    let names: HashSet<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("streamoasis.v1.Tagger"), "{names:?}");
    fx.shutdown().await;
}

// ───────────────────────────── read path ─────────────────────────────

fn tagged(id: &str, tags: &[(&str, f32)], offset: i64) -> MediaTagged {
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
        source: Some("archive".into()),
        language: Some("en".into()),
        attributes: HashMap::from([("season".into(), "2".into())]),
        taxonomy_version: None,
        embedding: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_routes_paginate_best_first_and_serve_the_compatibility_route() {
    streamoasis_testkit::require_stack!();
    let fx = fixture(|_| {}, None).await;
    let cfg = SinkConfig::from_topology(&fx.topo).unwrap();
    let session = Arc::new(streamoasis_sink::connect(fx.conn.scylla.as_ref().unwrap(), &cfg).await.unwrap());
    let w = TagWriter::new(session, &cfg).await.unwrap();
    // 53 items carrying "sport"; scores repeat (ties are broken by media id), spread over buckets.
    let mut want: Vec<(f32, String)> = vec![];
    for i in 0..53 {
        let id = format!("item-{i:03}");
        let score = ((i * 7) % 20) as f32 / 20.0 + 0.01;
        w.write(&tagged(&id, &[("sport", score), ("tech", 0.005)], i)).await.unwrap();
        want.push((score, id));
    }
    want.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let mut got: Vec<(f32, String)> = vec![];
    let mut page: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &page {
            Some(p) => format!("/v1/tags/sport/media?limit=10&page={p}"),
            None => "/v1/tags/sport/media?limit=10".into(),
        };
        let (s, v) = fx.get(&q).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let items = v["items"].as_array().unwrap();
        pages += 1;
        got.extend(items.iter().map(|i| (i["score"].as_f64().unwrap() as f32, i["media_id"].as_str().unwrap().to_string())));
        match v["next_page"].as_str() {
            Some(p) => {
                assert_eq!(items.len(), 10);
                page = Some(p.to_string());
            }
            None => break,
        }
    }
    assert_eq!(pages, 6);
    assert_eq!(got, want, "exact items, best first, no duplicates");
    let unique: HashSet<&String> = got.iter().map(|g| &g.1).collect();
    assert_eq!(unique.len(), 53);
    // One item; the carried fields are served.
    let (s, v) = fx.get("/v1/media/item-003/tags").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tags"][0]["label"], "sport");
    assert_eq!(v["tags"].as_array().unwrap().len(), 2);
    assert_eq!(v["title"], "Title of item-003");
    assert_eq!(v["source"], "archive");
    assert_eq!(v["language"], "en");
    assert_eq!(v["attributes"]["season"], "2");
    assert_eq!(v["kind"], "EPISODE");
    // The compatibility route (documented shape).
    let (s, v) = fx.get("/generate-metadata/item-003").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["video_id"], "item-003");
    assert_eq!(v["metadata"]["tags"], json!(["sport", "tech"]));
    assert!((v["metadata"]["scores"]["sport"].as_f64().unwrap() - (((3 * 7) % 20) as f64 / 20.0 + 0.01)).abs() < 1e-6);
    assert_eq!(v["metadata"]["title"], "Title of item-003");
    assert_eq!(v["metadata"]["model"], "m@1");
    for path in ["/v1/media/nope/tags", "/generate-metadata/nope"] {
        let (s, v) = fx.get(path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(v["error"]["code"], "not_found");
    }
    for (q, field) in [("limit=0", "limit"), ("limit=5000", "limit"), ("limit=abc", "limit"), ("page=zzz", "page")] {
        let (s, v) = fx.get(&format!("/v1/tags/sport/media?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(error_field(&v), field, "{q}");
    }
    let (s, v) = fx.get("/v1/tags/none-such/media").await;
    assert_eq!((s, v["items"].as_array().unwrap().len(), v["next_page"].is_null()), (StatusCode::OK, 0, true));
    fx.shutdown().await;
}

// ───────────────────────────── similar media and search ─────────────────────────────

/// Titles over several subjects, each subject in several phrasings, so neighbours are real.
fn similar_corpus() -> Vec<(String, MediaKind)> {
    let subjects = [
        "the striker scored twice in the cup final",
        "the central bank raised interest rates again",
        "a new smartphone chip doubles battery life",
        "the orchestra premiered a symphony in Vienna",
        "heavy snow closed mountain roads overnight",
        "the election campaign entered its final week",
        "researchers found water ice on a distant moon",
        "the chef opened a seafood restaurant by the harbour",
    ];
    let frames = ["Breaking: {s}", "Analysis: why {s}", "Explained: {s}", "Interview after {s}", "Live coverage as {s}"];
    let mut out = vec![];
    for (i, s) in subjects.iter().enumerate() {
        for (j, f) in frames.iter().enumerate() {
            let kind = if (i + j) % 2 == 0 { MediaKind::Episode } else { MediaKind::Podcast };
            out.push((f.replace("{s}", s), kind));
        }
    }
    out
}

/// Exact cosine top-k over the stored vectors (the ground truth for the ANN answers).
fn exact_top(vectors: &HashMap<String, (Vec<f32>, String)>, q: &[f32], k: usize, kind: Option<&str>, exclude: Option<&str>) -> Vec<(String, f32)> {
    let mut all: Vec<(String, f32)> = vectors
        .iter()
        .filter(|(id, (_, kd))| Some(id.as_str()) != exclude && kind.is_none_or(|k| k == kd))
        .map(|(id, (v, _))| (id.clone(), streamoasis_sink::read::cosine(q, v)))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn similar_and_search_answer_from_the_databases_ann_index_over_stored_embeddings() {
    streamoasis_testkit::require_stack!();
    let fx = fixture(|m| set(m, &["store_embeddings"], true.into()), None).await;
    let cfg = SinkConfig::from_topology(&fx.topo).unwrap();
    assert_eq!(cfg.vector_dim, 384, "the default model's size is the default");
    let session = Arc::new(streamoasis_sink::connect(fx.conn.scylla.as_ref().unwrap(), &cfg).await.unwrap());
    let w = TagWriter::new(session.clone(), &cfg).await.unwrap();
    // Tag every item with the real model and write its event as the sink does.
    let corpus = similar_corpus();
    for (i, (title, kind)) in corpus.iter().enumerate() {
        let r = fx.tagger.tag(&streamoasis_tagger::TagRequest { title: title.clone(), kind: *kind, ..Default::default() }).await.unwrap();
        let mut e = tagged(&format!("sim-{i:02}"), &[], i as i64);
        e.kind = *kind;
        e.title = Some(title.clone());
        e.embedding = Some(r.embedding.expect("store_embeddings on: the result carries the rows").to_event(None));
        assert!(w.write(&e).await.unwrap());
    }
    // Read every pooled vector back: one per item, of the model's size, unit length.
    let ks = &cfg.keyspace;
    let rows = session.query_unpaged(format!("SELECT media_id, pooled, kind FROM {ks}.media_embeddings"), ()).await.unwrap().into_rows_result().unwrap();
    let vectors: HashMap<String, (Vec<f32>, String)> =
        rows.rows::<(String, Option<Vec<f32>>, String)>().unwrap().map(|r| r.unwrap()).map(|(id, v, k)| (id, (v.expect("a pooled vector per item"), k))).collect();
    assert_eq!(vectors.len(), corpus.len());
    for (id, (v, _)) in &vectors {
        assert_eq!(v.len(), 384, "{id}");
        assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4, "{id}: unit length");
    }
    // /similar: k items, itself left out, most similar first, each similarity the exact cosine,
    // and the same items as an exact scan (recall over 10 queries).
    let (mut hits, mut wanted) = (0usize, 0usize);
    for i in (0..corpus.len()).step_by(4) {
        let id = format!("sim-{i:02}");
        let (s, v) = fx.get(&format!("/v1/media/{id}/similar?k=5")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["media_id"], id.as_str());
        let items = v["items"].as_array().unwrap();
        assert_eq!(items.len(), 5, "{v}");
        let got: Vec<(String, f32)> = items.iter().map(|x| (x["media_id"].as_str().unwrap().to_string(), x["similarity"].as_f64().unwrap() as f32)).collect();
        assert!(got.iter().all(|(g, _)| *g != id), "itself is left out: {got:?}");
        assert!(got.windows(2).all(|p| p[0].1 >= p[1].1), "most similar first: {got:?}");
        for (g, sim) in &got {
            assert!((sim - streamoasis_sink::read::cosine(&vectors[&id].0, &vectors[g].0)).abs() < 1e-5, "{g}: exact cosine");
        }
        let want: HashSet<String> = exact_top(&vectors, &vectors[&id].0, 5, None, Some(&id)).into_iter().map(|x| x.0).collect();
        hits += got.iter().filter(|(g, _)| want.contains(g)).count();
        wanted += want.len();
        // Items of one subject share a row of the corpus: the nearest is of the same subject.
        let subject = |m: &str| m[4..].parse::<usize>().unwrap() / 5;
        assert_eq!(subject(&got[0].0), subject(&id), "{id}: nearest {got:?}");
    }
    assert_eq!(wanted, 50);
    assert!(hits * 100 >= wanted * 95, "recall@5 against the exact scan: {hits}/{wanted}");
    // The kind filter: only that kind, k of them.
    let (s, v) = fx.get("/v1/media/sim-00/similar?k=7&kind=podcast").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 7);
    assert!(items.iter().all(|x| x["kind"] == "PODCAST"), "{v}");
    // /search: an item's own text finds it first at similarity ~1; the rest by exact cosine.
    let (s, v) = fx.post("/v1/search", &json!({"text": corpus[17].0, "k": 3})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["media_id"], "sim-17", "{v}");
    assert!(items[0]["similarity"].as_f64().unwrap() > 0.9999, "{v}");
    assert_eq!(items[0]["title"], corpus[17].0.as_str());
    assert!(v.get("media_id").is_none());
    let q = fx.tagger.embed_document("snowstorm blocks highways").await.unwrap().unwrap();
    let want = exact_top(&vectors, &q, 4, Some("EPISODE"), None);
    let (s, v) = fx.post("/v1/search", &json!({"text": "snowstorm blocks highways", "k": 4, "kind": "EPISODE"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got: Vec<String> = v["items"].as_array().unwrap().iter().map(|x| x["media_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, want.iter().map(|x| x.0.clone()).collect::<Vec<_>>(), "a query text: the exact scan's order");
    // Errors name the parameter; an item without an embedding is 404.
    let (s, v) = fx.get("/v1/media/none-such/similar").await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    for q in ["k=0", "k=101", "k=x", "kind=HOLOGRAM"] {
        let (s, v) = fx.get(&format!("/v1/media/sim-00/similar?{q}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(error_field(&v), q.split('=').next().unwrap(), "{q}");
    }
    for (body, field) in [(json!({"text": ""}), "text"), (json!({"text": "x", "k": 0}), "k"), (json!({"text": "x", "kind": "HOLOGRAM"}), "kind")] {
        let (s, v) = fx.post("/v1/search", &body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(error_field(&v), field, "{body}");
    }
    // gRPC answers the same.
    let mut c = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    use streamoasis_api::proto::{SearchRequest, SimilarRequest};
    let g = c.similar(grpc_req(&fx, SimilarRequest { media_id: "sim-00".into(), k: 7, kind: Some("PODCAST".into()) })).await.unwrap().into_inner();
    let rest: Vec<String> = items_of(&fx.get("/v1/media/sim-00/similar?k=7&kind=PODCAST").await.1);
    assert_eq!(g.items.iter().map(|n| n.media_id.clone()).collect::<Vec<_>>(), rest);
    let g = c.search(grpc_req(&fx, SearchRequest { text: corpus[17].0.clone(), k: 0, kind: None })).await.unwrap().into_inner();
    assert_eq!(g.items.len(), 10, "k 0 is the default 10");
    assert_eq!(g.items[0].media_id, "sim-17");
    let e = c.similar(grpc_req(&fx, SimilarRequest { media_id: "none-such".into(), k: 3, kind: None })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    fx.shutdown().await;
}

/// `POST /v1/media/{id}/retag` (and gRPC `Retag`): a stored item tagged again from its stored
/// embedding gets the model's tags, and the event reaches the tags topic; an item whose rows
/// cannot answer is refused with `needs_model` naming the fix; none stored is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retag_from_a_stored_embedding_answers_the_models_tags_and_produces_them() {
    streamoasis_testkit::require_stack!();
    let fx = fixture(|m| set(m, &["store_embeddings"], true.into()), None).await;
    let cfg = SinkConfig::from_topology(&fx.topo).unwrap();
    let session = Arc::new(streamoasis_sink::connect(fx.conn.scylla.as_ref().unwrap(), &cfg).await.unwrap());
    let w = TagWriter::new(session.clone(), &cfg).await.unwrap();
    let texts = [
        ("rt-0", "Shares fell sharply as the bank reported a quarterly loss"),
        ("rt-1", "The striker scored twice as the team won the cup final"),
        ("rt-2", "Parliament votes on the budget after a long debate"),
    ];
    let mut model = HashMap::new();
    for (i, (id, title)) in texts.iter().enumerate() {
        let req = streamoasis_tagger::TagRequest { title: title.to_string(), kind: MediaKind::Episode, ..Default::default() };
        let r = fx.tagger.tag(&req).await.unwrap();
        let mut e = tagged(id, &[("stale", 0.1)], i as i64);
        e.title = Some(title.to_string());
        let mut emb = r.embedding.clone().unwrap().to_event(None);
        if *id == "rt-2" {
            emb.embedding_version = "ev-another-model".into();
        }
        e.embedding = Some(emb);
        assert!(w.write(&e).await.unwrap());
        model.insert(id.to_string(), r);
    }
    let output = fx.topo.file.processors.tagger.output.clone().unwrap();
    for id in ["rt-0", "rt-1"] {
        let (s, v) = fx.post(&format!("/v1/media/{id}/retag"), &json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let m = &model[id];
        let got: Vec<(String, f32)> = v["tags"].as_array().unwrap().iter().map(|t| (t["label"].as_str().unwrap().to_string(), t["score"].as_f64().unwrap() as f32)).collect();
        assert_eq!(got.iter().map(|t| t.0.clone()).collect::<Vec<_>>(), m.tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>(), "{id}: the model's tags");
        for (g, t) in got.iter().zip(&m.tags) {
            assert!((g.1 - t.score).abs() <= 1e-5, "{id}: {} vs {}", g.1, t.score);
        }
        assert_eq!(v["taxonomy_version"], m.taxonomy_version.as_str());
        assert_eq!(v["topic"], output.as_str());
        assert_eq!(v["model"], format!("{}@{}", fx.tagger.model_ref().name, fx.tagger.model_ref().version).as_str());
    }
    // The rows cannot answer (another model's embedding): refused, naming the fix; none stored: 404.
    let (s, v) = fx.post("/v1/media/rt-2/retag", &json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("needs_model")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("retag --ids rt-2"), "{v}");
    let (s, v) = fx.post("/v1/media/none-such/retag", &json!({})).await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    // gRPC answers the same.
    let mut c = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    use streamoasis_api::proto::RetagRequest;
    let g = c.retag(grpc_req(&fx, RetagRequest { media_id: "rt-1".into() })).await.unwrap().into_inner();
    assert_eq!(g.tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>(), model["rt-1"].tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>());
    assert_eq!(g.topic, output);
    assert_eq!(c.retag(grpc_req(&fx, RetagRequest { media_id: "rt-2".into() })).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(c.retag(grpc_req(&fx, RetagRequest { media_id: "none-such".into() })).await.unwrap_err().code(), tonic::Code::NotFound);
    // The tags topic holds exactly the three answered retags (rt-0, rt-1 over REST, rt-1 over gRPC),
    // with the carried fields of the stored rows and the answered tags.
    let mut cc = client_config(&fx.conn.kafka, &Default::default());
    cc.set("group.id", format!("t-{}", uuid::Uuid::new_v4().simple())).set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cc.create().unwrap();
    consumer.subscribe(&[output.as_str()]).unwrap();
    let mut seen = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(if seen.len() < 3 { 60 } else { 5 }), consumer.recv()).await {
        let e: MediaTagged = fx.codec.decode(m.payload()).await.unwrap().event;
        assert_eq!(e.tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>(), model[&e.media_id].tags.iter().map(|t| t.label.clone()).collect::<Vec<_>>());
        assert_eq!((e.title.as_deref(), e.attributes.get("season").map(String::as_str)), (texts.iter().find(|t| t.0 == e.media_id).map(|t| t.1), Some("2")));
        assert!(e.embedding.is_none(), "the rows are not sent again");
        seen.push(e.media_id);
    }
    seen.sort();
    assert_eq!(seen, ["rt-0", "rt-1", "rt-1"]);
    fx.shutdown().await;
}

fn items_of(v: &Value) -> Vec<String> {
    v["items"].as_array().unwrap().iter().map(|x| x["media_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn similar_answers_501_naming_the_capability_without_a_vector_column() {
    streamoasis_testkit::require_stack!();
    let fx = fixture_with(
        |m| set(m, &["store_embeddings"], true.into()),
        |s| {
            s.insert("vector_dim".into(), 0.into());
        },
        None,
    )
    .await;
    let (s, v) = fx.get("/v1/media/any/similar").await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{v}");
    assert_eq!(v["error"]["code"], "not_implemented");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("vector search") && m.contains("topology apply"), "names the capability and the fix: {m}");
    let (s, _) = fx.post("/v1/search", &json!({"text": "anything"})).await;
    assert_eq!(s, StatusCode::NOT_IMPLEMENTED);
    let mut c = TaggerClient::connect(fx.grpc.clone()).await.unwrap();
    let e = c.similar(grpc_req(&fx, streamoasis_api::proto::SimilarRequest { media_id: "any".into(), k: 1, kind: None })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    fx.shutdown().await;
}

// ───────────────────────────── through the pipeline ─────────────────────────────

async fn stored_tags(fx: &Fx, id: &str) -> Option<Value> {
    let (s, v) = fx.get(&format!("/v1/media/{id}/tags")).await;
    (s == StatusCode::OK).then_some(v)
}

async fn by_tag_ids(fx: &Fx, tag: &str) -> HashSet<String> {
    let (_, v) = fx.get(&format!("/v1/tags/{tag}/media?limit=1000")).await;
    v["items"].as_array().map(|a| a.iter().map(|i| i["media_id"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// The ids of the test's `s0`..`s2` batch among `ids`.
fn batch_ids(ids: HashSet<String>) -> HashSet<String> {
    ids.into_iter().filter(|id| id.len() == 2 && id.starts_with('s')).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_media_flows_through_tagger_and_sink_then_retag_moves_items_between_tags() {
    streamoasis_testkit::require_stack!();
    let mut fx = fixture(|m| set(m, &["labels"], labels(&["sport", "business", "politics", "technology", "entertainment"])), None).await;
    fx.start_pipeline().await;
    let input = fx.topo.file.processors.tagger.input.clone();
    // A bad batch is rejected whole: nothing reaches Kafka.
    let before = fx.end_offsets(&input);
    let (s, v) = fx.post("/v1/media", &json!({"items": [{"media_id": "ok-1", "title": "fine"}, {"media_id": " ", "title": "no id"}]})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_field(&v), "items[1].media_id");
    let (s, v) = fx.post("/v1/media", &json!({"items": [{"media_id": "a", "title": "x", "kind": "HOLOGRAM"}]})).await;
    assert_eq!((s, error_field(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "items[0].kind"));
    let (s, v) = fx.post("/v1/media", &json!({"items": [{"media_id": "b"}]})).await;
    assert_eq!((s, error_field(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "items[0].title"), "{v}");
    // One item on its own: its fields are named as in the item.
    let (s, v) = fx.post("/v1/media", &json!({"media_id": "a", "title": "x", "kind": "HOLOGRAM"})).await;
    assert_eq!((s, error_field(&v)), (StatusCode::UNPROCESSABLE_ENTITY, "kind"), "{v}");
    let (s, v) = fx.post("/v1/media", &json!({"title": "no id"})).await;
    assert_eq!((s, error_field(&v), &v["error"]["message"]), (StatusCode::UNPROCESSABLE_ENTITY, "media_id", &json!("missing: every item needs a stable identifier")));
    assert_eq!(fx.end_offsets(&input), before);
    let one = "Quarterly profits beat forecasts as shares jump";
    let (s, v) = fx.post("/v1/media", &json!({"media_id": "one-1", "title": one, "kind": "ARTICLE"})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v, json!({"media_ids": ["one-1"], "topic": input}));
    assert_eq!(fx.end_offsets(&input), before + 1);

    let sports = ["The striker scored a hat-trick in the cup final", "The tennis champion won in straight sets", "The marathon runner broke the course record"];
    let items: Vec<Value> = sports
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"media_id": format!("s{i}"), "title": t, "kind": "CLIP", "language": "en", "source": "tests", "attributes": {"n": i.to_string()}}))
        .collect();
    let (s, v) = fx.post("/v1/media", &json!({"items": items})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["media_ids"], json!(["s0", "s1", "s2"]));
    assert_eq!(fx.end_offsets(&input), before + 4);
    let want: HashSet<String> = (0..3).map(|i| format!("s{i}")).collect();
    // (The single item above is about business; with multi-label scores it may carry a weak
    // second tag too, so the sport checks look at the s* batch only.)
    eventually!(120, "3 items stored under sport", batch_ids(by_tag_ids(&fx, "sport").await) == want);
    let v = stored_tags(&fx, "s1").await.unwrap();
    assert_eq!(v["title"], sports[1]);
    assert_eq!(v["source"], "tests");
    assert_eq!(v["language"], "en");
    assert_eq!(v["attributes"]["n"], "1");
    assert_eq!(v["kind"], "CLIP");
    eventually!(120, "the single item stored", stored_tags(&fx, "one-1").await.is_some());
    let v = stored_tags(&fx, "one-1").await.unwrap();
    assert_eq!((&v["title"], &v["kind"], &v["source"], &v["tags"][0]["label"]), (&json!(one), &json!("ARTICLE"), &json!("streamoasis-api"), &json!("business")), "{v}");

    // Taxonomy change: "sport" becomes "athletics" (SIGHUP's reload), then retag.
    let file = std::env::temp_dir().join(format!("so-topology-{}.yaml", uuid::Uuid::new_v4().simple()));
    write_topology(&file, &["athletics", "business", "politics", "technology", "entertainment"]);
    let before = fx.tagger.taxonomy_version();
    assert_eq!(streamoasis_tagger::reload_labels(&file, &fx.tagger).await.unwrap(), 5);
    let after = fx.tagger.taxonomy_version();
    assert_ne!(after, before, "a new taxonomy, a new version");
    // An invalid taxonomy is refused and the current one stays.
    write_topology(&file, &[]);
    assert!(streamoasis_tagger::reload_labels(&file, &fx.tagger).await.is_err());
    assert!(fx.tagger.label_names().contains(&"athletics".to_string()));
    assert_eq!(fx.tagger.taxonomy_version(), after);
    let (_, v) = fx.post("/v1/tag", &json!({"title": sports[0]})).await;
    assert_eq!(v["tags"][0]["label"], "athletics", "the API shares the reloaded taxonomy: {v}");
    assert_eq!(v["taxonomy_version"], json!(after), "{v}");

    let o = ops::RetagOptions { topic: input.clone(), start: ops::Start::Beginning, media_ids: Some(HashSet::from(["s0".into(), "s2".into()])), rate: 50.0, progress: false };
    let s = ops::retag(&fx.conn.kafka, &Default::default(), &o).await.unwrap();
    assert_eq!(s, ops::Summary { read: 4, sent: 2, skipped: 2, unavailable: 0 });
    let moved: HashSet<String> = ["s0".to_string(), "s2".to_string()].into();
    eventually!(
        120,
        "s0, s2 moved to athletics",
        batch_ids(by_tag_ids(&fx, "athletics").await) == moved && batch_ids(by_tag_ids(&fx, "sport").await) == HashSet::from(["s1".to_string()])
    );
    assert_eq!(stored_tags(&fx, "s0").await.unwrap()["tags"][0]["label"], "athletics");
    assert_eq!(stored_tags(&fx, "s1").await.unwrap()["tags"][0]["label"], "sport");
    // The retagged rows carry the new taxonomy version; the one not retagged keeps the old: stale.
    assert_eq!(stored_tags(&fx, "s0").await.unwrap()["taxonomy_version"], json!(after));
    assert_eq!(stored_tags(&fx, "s1").await.unwrap()["taxonomy_version"], json!(before));
    let _ = std::fs::remove_file(file);
    fx.shutdown().await;
}

/// The project topology with these taxonomy labels, paths made absolute, written to `path`.
fn write_topology(path: &PathBuf, names: &[&str]) {
    let text = std::fs::read_to_string(root().join("topology.yaml")).unwrap();
    let mut v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for e in v["schemas"].as_sequence_mut().unwrap() {
        let f = e["file"].as_str().unwrap().to_string();
        e["file"] = root().join(f).display().to_string().into();
    }
    let t = v["tagging"].as_mapping_mut().unwrap();
    set(t, &["model", "path"], root().join("models/all-MiniLM-L6-v2").display().to_string().into());
    set(t, &["labels"], labels(names));
    streamoasis_testkit::absolute_directions(&mut v["tagging"]);
    std::fs::write(path, serde_yaml::to_string(&v).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dlq_replay_after_a_fix_resends_each_dead_letter_once() {
    streamoasis_testkit::require_stack!();
    // Before the fix: at most 3 candidate labels per item.
    let mut fx = fixture(|m| set(m, &["max_labels"], 12.into()), None).await;
    let topo_fixed = fx.topo.clone();
    if let serde_yaml::Value::Mapping(m) = &mut fx.topo.file.tagging {
        set(m, &["max_labels"], 3.into());
        set(m, &["labels"], labels(&["sport", "business", "politics"]));
    }
    fx.tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&fx.topo).unwrap()).await.unwrap());
    fx.start_pipeline().await;
    let (input, dlq, output) = (fx.topo.file.processors.tagger.input.clone(), fx.topo.file.processors.tagger.dlq.clone(), fx.topo.file.processors.tagger.output.clone().unwrap());
    let p = producer(&fx.conn.kafka, &Default::default()).unwrap();
    let item = MediaIngested {
        media_id: "five-labels".into(),
        kind: MediaKind::Article,
        title: "Chips, chess and cheese".into(),
        description: None,
        transcript: None,
        language: None,
        source: "tests".into(),
        ingested_at: streamoasis_pipeline::events::now_millis(),
        attributes: HashMap::new(),
        candidate_labels: Some(vec!["food".into(), "games".into(), "tech".into(), "travel".into(), "music".into()]),
    };
    let bytes = fx.codec.encode(&input, &item).await.unwrap();
    p.send(FutureRecord::to(&input).key("five-labels").payload(&bytes), Duration::from_secs(10)).await.unwrap();
    p.send(FutureRecord::to(&input).key("garbage").payload(b"not avro at all"), Duration::from_secs(10)).await.unwrap();
    eventually!(60, "2 dead letters", fx.end_offsets(&dlq) == 2);
    // The fix: a tagger that allows 12 labels (a redeploy).
    fx.stop.cancel();
    for h in fx.stopped.drain(..) {
        h.await.unwrap().unwrap();
    }
    let mut fx2 = Fx { topo: topo_fixed.clone(), stop: CancellationToken::new(), stopped: vec![], ..fx };
    fx2.tagger = Arc::new(Tagger::load(TaggerConfig::from_topology(&fx2.topo).unwrap()).await.unwrap());
    fx2.start_pipeline().await;
    let fx = fx2;
    let base = ops::ReplayOptions { dlq: dlq.clone(), kinds: vec!["invalid_labels".into()], since: None, until: None, dry_run: false, rate: 0.0, progress: false };
    // A window that ends before the dead letters were written selects none.
    let none = ops::dlq_replay(&fx.conn.kafka, &Default::default(), &ops::ReplayOptions { until: Some(item.ingested_at - 60_000), ..base.clone() }).await.unwrap();
    assert_eq!(none, ops::Summary { read: 2, sent: 0, skipped: 2, unavailable: 0 });
    let dry = ops::dlq_replay(&fx.conn.kafka, &Default::default(), &ops::ReplayOptions { dry_run: true, ..base.clone() }).await.unwrap();
    assert_eq!(dry, ops::Summary { read: 2, sent: 0, skipped: 1, unavailable: 0 });
    assert_eq!(fx.end_offsets(&input), 2);
    let s = ops::dlq_replay(&fx.conn.kafka, &Default::default(), &base).await.unwrap();
    assert_eq!(s, ops::Summary { read: 2, sent: 1, skipped: 1, unavailable: 0 }, "only the invalid_labels letter, once");
    assert_eq!(fx.end_offsets(&input), 3);
    // Tagged exactly once, with the item's own labels; nothing new dead-lettered.
    let mut cc = client_config(&fx.conn.kafka, &Default::default());
    cc.set("group.id", format!("t-{}", uuid::Uuid::new_v4().simple())).set("auto.offset.reset", "earliest");
    let c: StreamConsumer = cc.create().unwrap();
    c.subscribe(&[output.as_str()]).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(60), c.recv()).await.expect("tagged output").unwrap();
    let e: MediaTagged = fx.codec.decode(m.payload()).await.unwrap().event;
    assert_eq!(e.media_id, "five-labels");
    assert!(e.tags.iter().all(|t| ["food", "games", "tech", "travel", "music"].contains(&t.label.as_str())));
    assert!(tokio::time::timeout(Duration::from_secs(5), c.recv()).await.is_err(), "exactly one tagged event");
    assert_eq!(fx.end_offsets(&dlq), 2);
    fx.shutdown().await;
}

#[test]
fn schema_evolution_is_backward_compatible_in_the_registry_shape() {
    // The new MediaTagged fields all have defaults (what BACKWARD needs); the registry check
    // itself runs in `topology apply` (the e2e fixtures above register the current schema).
    let v: Value = serde_json::from_str(streamoasis_pipeline::events::MEDIA_TAGGED_AVSC).unwrap();
    for f in ["title", "source", "language", "attributes"] {
        let field = v["fields"].as_array().unwrap().iter().find(|x| x["name"] == f).unwrap();
        assert!(field.get("default").is_some(), "{f} needs a default");
    }
}

//! Subcommand implementations: thin glue over the libraries.

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::Instrument;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind, MediaTagged};
use streamoasis_api::{auth, ops, Auth, Limits, Listeners};
use streamoasis_pipeline::client::{self, client_config, producer, wait_for_broker};
use streamoasis_pipeline::secret::redact_url;
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::telemetry::Health;
use streamoasis_pipeline::{admin, telemetry, CancellationToken};
use streamoasis_sink::{SinkConfig, TagWriter};
use streamoasis_tagger::{TagRequest, Tagger, TaggerConfig};

use crate::cli::{ApiAction, ApiArgs, Cli, Command, Common, DbAction, DlqAction, DlqReplayArgs, ProduceArgs, RetagArgs, RunArgs, TagArgs, TaggerArgs, TailArgs, TopologyAction};

/// Dispatch a parsed command line; `shutdown` is cancelled on SIGTERM / Ctrl-C.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let c = &cli.common;
    match cli.command {
        Command::Tagger(a) => tagger(c, a, shutdown).await,
        Command::Sink(a) => sink(c, a, shutdown).await,
        Command::Topology { action: TopologyAction::Apply { no_db } } => apply(c, no_db).await,
        Command::Topology { action: TopologyAction::Check } => check(c),
        Command::Produce(a) => produce(c, a).await,
        Command::Tail(a) => tail(c, a).await,
        Command::Tag(a) => tag(c, a).await,
        Command::Db { action } => db(c, action).await,
        Command::Api(a) => api(c, a, shutdown).await,
        Command::Retag(a) => retag(c, a).await,
        Command::Dlq { action: DlqAction::Replay(a) } => dlq_replay(c, a).await,
    }
}

fn load(c: &Common) -> anyhow::Result<Topology> {
    Ok(Topology::load(&c.topology)?)
}

/// The topology, with the environment's Kafka security settings laid over `kafka.client`, so
/// every Kafka client of the command (broker wait, consumer, producer, admin) speaks alike.
fn load_for_kafka(c: &Common) -> anyhow::Result<Topology> {
    let mut topo = load(c)?;
    topo.file.kafka.client = client::properties(&topo.file.kafka.client)?;
    let k = &topo.file.kafka.client;
    tracing::info!(
        brokers = %c.kafka,
        security_protocol = k.get("security.protocol").map(String::as_str).unwrap_or("PLAINTEXT"),
        sasl_mechanism = k.get("sasl.mechanism").map(String::as_str).unwrap_or("-"),
        sasl_user = k.get("sasl.username").map(String::as_str).unwrap_or("-"),
        registry = %redact_url(&c.registry),
        "connection settings"
    );
    Ok(topo)
}

/// Cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received: stopping");
        t.cancel();
    });
    token
}

fn start_metrics(a: &RunArgs, health: &Arc<Health>) {
    if let Some(addr) = a.metrics_addr {
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve_metrics(addr, health).await {
                tracing::error!(%addr, error = %e, "metrics server failed");
            }
        });
    }
}

async fn tagger(c: &Common, a: TaggerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-tagger");
    let topo = load_for_kafka(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    // Check the API settings before the (slow) model load: a bad key fails at once.
    let api = match &a.api_addr {
        Some(addr) => Some((api_auth(a.insecure_no_auth)?, Listeners::bind(addr, &a.grpc_addr).await?)),
        None => None,
    };
    let health = Health::new();
    start_metrics(&a.run, &health);
    wait_for_broker(&c.kafka, &topo.file.kafka.client, Duration::from_secs(10))?;
    let codec = Arc::new(Codec::new(&c.registry)?);
    let started = Instant::now();
    let tagger = tokio::select! {
        t = Tagger::load(cfg) => Arc::new(t?),
        _ = shutdown.cancelled() => return Ok(()),
    };
    let tc = tagger.config();
    tracing::info!(
        model = %tagger.model_ref().name,
        strategy = ?tagger.strategy(),
        device = %tc.model.device,
        precision = ?tc.model.precision,
        cuda_linked = cfg!(feature = "cuda"),
        cuda_devices = streamoasis_tagger::model::cuda_devices(),
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    if !cfg!(feature = "cuda") {
        tracing::info!("this build runs on the CPU only (built without the cuda feature: libtorch_cuda is not linked)");
    }
    let alive = tagger.clone();
    health.add_check("model thread", move || alive.is_alive());
    health.set_loaded(true);
    reload_on_sighup(c.topology.clone(), tagger.clone());
    let mut api_task = None;
    if let Some((auth, listeners)) = api {
        // One process, one batcher: API calls and stream events share batches.
        let state = Arc::new(streamoasis_api::state(&connections(c, true), &topo, tagger.clone(), auth, Limits::default()).await?);
        api_task = Some(tokio::spawn(streamoasis_api::serve(listeners, state, shutdown.clone())));
    }
    let r = streamoasis_tagger::serve(&topo, &c.kafka, codec, tagger, Some(health), shutdown.clone()).await;
    shutdown.cancel();
    if let Some(t) = api_task {
        t.await??;
    }
    r?;
    Ok(())
}

/// SIGHUP: reload `tagging.labels` from the topology file (validated before the swap; on any
/// error the current labels stay and the error is logged).
fn reload_on_sighup(path: std::path::PathBuf, tagger: Arc<Tagger>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("no SIGHUP handler: label reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match streamoasis_tagger::reload_labels(&path, &tagger).await {
                Ok(n) => tracing::info!(labels = n, file = %path.display(), "SIGHUP: taxonomy reloaded"),
                Err(e) => tracing::error!(file = %path.display(), error = %format!("{e:#}"), "SIGHUP: taxonomy not reloaded; keeping the current labels"),
            }
        }
    });
}

async fn sink(c: &Common, a: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-sink");
    let topo = load_for_kafka(c)?;
    let cfg = SinkConfig::from_topology(&topo)?;
    let health = Health::new();
    start_metrics(&a, &health);
    wait_for_broker(&c.kafka, &topo.file.kafka.client, Duration::from_secs(10))?;
    let codec = Arc::new(Codec::new(&c.registry)?);
    let session = Arc::new(streamoasis_sink::connect(&c.scylla, &cfg).await?);
    let writer = Arc::new(TagWriter::new(session, &cfg).await?);
    health.set_loaded(true);
    streamoasis_sink::serve(&topo, &c.kafka, codec, writer, Some(health), shutdown).await?;
    Ok(())
}

fn connections(c: &Common, db: bool) -> streamoasis_api::Connections {
    streamoasis_api::Connections { kafka: c.kafka.clone(), registry: c.registry.clone(), scylla: db.then(|| c.scylla.clone()) }
}

/// The API's token verifier from the environment; refuses to run without keys unless told.
fn api_auth(insecure: bool) -> anyhow::Result<Auth> {
    match Auth::from_env(|k| std::env::var(k).ok())? {
        Some(_) if insecure => anyhow::bail!("--insecure-no-auth given but JWT keys are configured: drop one of them"),
        Some(a) => Ok(a),
        None if insecure => {
            tracing::warn!("serving WITHOUT authentication (--insecure-no-auth)");
            Ok(Auth::disabled())
        }
        None => anyhow::bail!(
            "no JWT key configured: set {} (or {}) or {}, or pass --insecure-no-auth for a local experiment",
            auth::ENV_HS256_SECRET,
            auth::ENV_HS256_SECRET_FILE,
            auth::ENV_JWKS_FILE
        ),
    }
}

async fn api(c: &Common, a: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    match a.action {
        Some(ApiAction::Token { sub, ttl }) => return token(&sub, ttl),
        Some(ApiAction::Call { text, labels, grpc_addr, token }) => return call(&text, labels, &grpc_addr, token).await,
        None => {}
    }
    let _guard = telemetry::init("streamoasis-api");
    let topo = load(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    let auth = api_auth(a.insecure_no_auth)?;
    let listeners = Listeners::bind(&a.addr, &a.grpc_addr).await?;
    let tagger = Arc::new(Tagger::load(cfg).await?);
    reload_on_sighup(c.topology.clone(), tagger.clone());
    let state = streamoasis_api::state(&connections(c, !a.no_db), &topo, tagger, auth, Limits::default()).await?;
    streamoasis_api::serve(listeners, Arc::new(state), shutdown).await
}

fn hs256_secret() -> anyhow::Result<Vec<u8>> {
    if let Some(s) = std::env::var(auth::ENV_HS256_SECRET).ok().filter(|s| !s.is_empty()) {
        return Ok(s.into_bytes());
    }
    if let Some(f) = std::env::var(auth::ENV_HS256_SECRET_FILE).ok().filter(|s| !s.is_empty()) {
        let s = std::fs::read_to_string(&f).with_context(|| format!("{}: cannot read {f}", auth::ENV_HS256_SECRET_FILE))?;
        return Ok(s.strip_suffix('\n').unwrap_or(&s).as_bytes().to_vec());
    }
    anyhow::bail!("set {} (or {}) to the API's HS256 secret", auth::ENV_HS256_SECRET, auth::ENV_HS256_SECRET_FILE)
}

fn token(sub: &str, ttl: Duration) -> anyhow::Result<()> {
    let iss = std::env::var(auth::ENV_ISSUER).ok().filter(|s| !s.is_empty());
    let aud = std::env::var(auth::ENV_AUDIENCE).ok().filter(|s| !s.is_empty());
    println!("{}", auth::mint_hs256(&hs256_secret()?, sub, ttl, iss.as_deref(), aud.as_deref())?);
    Ok(())
}

async fn call(text: &str, labels: Option<Vec<String>>, addr: &str, token: Option<String>) -> anyhow::Result<()> {
    use streamoasis_api::proto::tagger_client::TaggerClient;
    let token = match token {
        Some(t) => Some(t),
        None => hs256_secret().ok().map(|s| auth::mint_hs256(&s, "cli", Duration::from_secs(300), None, None)).transpose()?,
    };
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let mut client = TaggerClient::connect(url.clone()).await.with_context(|| format!("cannot reach the gRPC API at {url}"))?;
    let mut req = tonic::Request::new(streamoasis_api::proto::TagRequest { title: text.to_string(), candidate_labels: labels.unwrap_or_default(), ..Default::default() });
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse()?);
    }
    let r = client.tag(req).await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?.into_inner();
    let tags: Vec<serde_json::Value> = r.tags.iter().map(|t| serde_json::json!({"label": t.label, "score": t.score})).collect();
    println!("{}", serde_json::json!({"tags": tags, "no_tags_reason": r.no_tags_reason, "strategy": r.strategy, "model": r.model}));
    Ok(())
}

/// A point in time: RFC 3339, ms since the epoch, or an age such as `2h` (that long ago).
fn parse_time(flag: &str, s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_millis() - d.as_millis() as i64);
    }
    anyhow::bail!("{flag} '{s}': use RFC 3339 (2026-01-31T00:00:00Z), ms since the epoch, or an age (2h)")
}

async fn retag(c: &Common, a: RetagArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let start = match (&a.since, &a.offsets, a.from_beginning) {
        (Some(s), _, _) => ops::Start::Timestamp(parse_time("--since", s)?),
        (None, Some(o), _) => ops::Start::Offsets(
            o.iter()
                .map(|po| {
                    let (p, off) = po.split_once(':').ok_or_else(|| anyhow::anyhow!("--offsets '{po}': use partition:offset"))?;
                    Ok((p.trim().parse()?, off.trim().parse()?))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
        (None, None, true) => ops::Start::Beginning,
        (None, None, false) if a.ids.is_some() => ops::Start::Beginning,
        _ => anyhow::bail!("say where to start: --since, --offsets, --from-beginning (or --ids, which reads from the beginning)"),
    };
    let ids = match &a.ids {
        None => None,
        Some(f) if f.starts_with('@') => Some(std::fs::read_to_string(&f[1..]).with_context(|| format!("--ids: cannot read {}", &f[1..]))?.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()),
        Some(l) => Some(l.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()),
    };
    let o = ops::RetagOptions { topic: topo.file.processors.tagger.input.clone(), start, media_ids: ids, rate: a.rate, progress: !a.quiet };
    let s = ops::retag(&c.kafka, &topo.file.kafka.client, &o).await?;
    eprintln!("retag: read {}, re-sent {}, skipped {} (topic {})", s.read, s.sent, s.skipped, o.topic);
    Ok(())
}

async fn dlq_replay(c: &Common, a: DlqReplayArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let o = ops::ReplayOptions {
        dlq: a.topic.clone().unwrap_or_else(|| topo.file.processors.tagger.dlq.clone()),
        kinds: a.kind.clone(),
        since: a.since.as_deref().map(|s| parse_time("--since", s)).transpose()?,
        until: a.until.as_deref().map(|s| parse_time("--until", s)).transpose()?,
        dry_run: a.dry_run,
        rate: a.rate,
        progress: !a.quiet,
    };
    let s = ops::dlq_replay(&c.kafka, &topo.file.kafka.client, &o).await?;
    let verb = if a.dry_run { "would re-send" } else { "re-sent" };
    let n = if a.dry_run { s.read - s.skipped } else { s.sent };
    eprintln!("dlq replay: read {}, {verb} {n}, skipped {} (from {})", s.read, s.skipped, o.dlq);
    Ok(())
}

fn check(c: &Common) -> anyhow::Result<()> {
    let topo = load(c)?;
    TaggerConfig::from_topology(&topo)?;
    SinkConfig::from_topology(&topo)?;
    println!("{}: ok ({} topics, {} schemas)", c.topology.display(), topo.file.topics.len(), topo.file.schemas.len());
    Ok(())
}

async fn apply(c: &Common, no_db: bool) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis");
    let topo = load_for_kafka(c)?;
    let sink_cfg = SinkConfig::from_topology(&topo)?;
    TaggerConfig::from_topology(&topo)?;
    for ch in admin::apply_topics(&c.kafka, &topo).await? {
        println!("{ch}");
    }
    let codec = Codec::new(&c.registry)?;
    for ch in admin::apply_schemas(&codec, &topo).await.with_context(|| format!("registering schemas at {}", redact_url(&c.registry)))? {
        println!("{ch}");
    }
    if !no_db {
        let session = streamoasis_sink::connect(&c.scylla, &sink_cfg).await?;
        for ch in streamoasis_sink::schema::apply(&session, &sink_cfg).await.context("creating keyspace and tables")? {
            println!("{ch}");
        }
        println!("ensured   keyspace {} (tables media_tags, media_by_tag)", sink_cfg.keyspace);
    }
    Ok(())
}

/// A line of input for `produce`: a MediaIngested in JSON, or a sample record.
#[derive(Debug, Deserialize)]
struct InputLine {
    #[serde(alias = "id")]
    media_id: String,
    #[serde(default)]
    kind: Option<MediaKind>,
    #[serde(default)]
    title: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, alias = "text")]
    transcript: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    ingested_at: Option<i64>,
    #[serde(default)]
    attributes: HashMap<String, String>,
    #[serde(default)]
    candidate_labels: Option<Vec<String>>,
    #[serde(default)]
    label: Option<String>,
}

impl InputLine {
    fn into_event(self, source: &str) -> MediaIngested {
        let mut attributes = self.attributes;
        if let Some(l) = self.label {
            attributes.insert("label".into(), l);
        }
        MediaIngested {
            media_id: self.media_id,
            kind: self.kind.unwrap_or(MediaKind::Article),
            title: self.title,
            description: self.description,
            transcript: self.transcript,
            language: self.language,
            source: self.source.unwrap_or_else(|| source.to_string()),
            ingested_at: self.ingested_at.unwrap_or_else(now_millis),
            attributes,
            candidate_labels: self.candidate_labels,
        }
    }
}

fn open_lines(path: &std::path::Path) -> anyhow::Result<Box<dyn BufRead>> {
    if path.as_os_str() == "-" {
        Ok(Box::new(std::io::BufReader::new(std::io::stdin())))
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {} (the demo data is written by scripts/setup)", path.display()))?;
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}

async fn produce(c: &Common, a: ProduceArgs) -> anyhow::Result<()> {
    let _guard = telemetry::init("streamoasis-produce");
    let topo = load_for_kafka(c)?;
    let topic = a.topic.clone().unwrap_or_else(|| topo.file.processors.tagger.input.clone());
    wait_for_broker(&c.kafka, &topo.file.kafka.client, Duration::from_secs(10))?;
    let codec = Codec::new(&c.registry)?;
    let producer = producer(&c.kafka, &topo.file.kafka.client)?;
    let lines: Vec<String> = open_lines(&a.file)?.lines().take(a.limit.unwrap_or(usize::MAX)).collect::<Result<_, _>>()?;
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(lines.len() as u64) };
    bar.set_style(indicatif::ProgressStyle::with_template("produce {bar:30} {pos}/{len} {per_sec} eta {eta}").unwrap());
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0usize;
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: InputLine = serde_json::from_str(line).with_context(|| format!("{} line {}: not a media item", a.file.display(), n + 1))?;
        if a.rate > 0.0 {
            // Pace: wait for this record's slot, completing earlier sends meanwhile.
            let due = tokio::time::Instant::from(started + Duration::from_secs_f64(sent as f64 / a.rate));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        r??;
                        bar.inc(1);
                    }
                }
            }
        }
        // Stamped when it is sent, not when the file was read.
        let event = item.into_event(&a.source);
        let payload = codec.encode(&topic, &event).await?;
        let key = event.media_id.clone();
        let producer = producer.clone();
        let topic_name = topic.clone();
        // Each item starts a trace; the tagger and the sink continue it from the record's headers.
        let span = tracing::info_span!("produce", topic = %topic);
        let headers = telemetry::context_headers(&span);
        // Spawned so librdkafka gets the record now: a send future does nothing until polled.
        pending.push(tokio::spawn(
            async move {
                producer
                    .send(FutureRecord::to(&topic_name).key(&key).payload(&payload).headers(headers), Duration::from_secs(30))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
            .instrument(span),
        ));
        sent += 1;
        while pending.len() >= 1000 {
            if let Some(r) = pending.next().await {
                r??;
            }
            bar.inc(1);
        }
    }
    while let Some(r) = pending.next().await {
        r??;
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("produced {sent} items to {topic} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Truth {
    #[serde(alias = "media_id")]
    id: String,
    label: String,
}

async fn tail(c: &Common, a: TailArgs) -> anyhow::Result<()> {
    let topo = load_for_kafka(c)?;
    let t = &topo.file.processors;
    let topic = a.topic.clone().unwrap_or_else(|| t.tagger.output.clone().unwrap_or_default());
    let truth: HashMap<String, String> = match &a.truth {
        Some(p) => open_lines(p)?
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Truth>(&l).ok())
            .map(|t| (t.id, t.label))
            .collect(),
        None => HashMap::new(),
    };
    let codec = Codec::new(&c.registry)?;
    let mut cc = client_config(&c.kafka, &topo.file.kafka.client);
    cc.set("group.id", format!("streamoasis-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", if a.from_beginning { "earliest" } else { "latest" });
    let consumer: StreamConsumer = cc.create()?;
    // Assign every partition explicitly, at the beginning or at "now": records produced after
    // this point are never missed, however long a group join would have taken.
    let md = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .with_context(|| format!("Kafka at {} did not answer; is the stack up?", c.kafka))?;
    let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    anyhow::ensure!(!parts.is_empty(), "topic {topic} does not exist (run `streamoasis topology apply`)");
    let mut tpl = TopicPartitionList::new();
    let now = now_millis();
    for p in &parts {
        tpl.add_partition_offset(&topic, *p, if a.from_beginning { Offset::Beginning } else { Offset::Offset(now) })?;
    }
    let tpl = if a.from_beginning { tpl } else { consumer.offsets_for_times(tpl, Duration::from_secs(10))? };
    consumer.assign(&tpl)?;
    let stop = shutdown_on_signal();
    let is_dlq = topic == t.tagger.dlq || topic == t.sink.dlq;
    let is_ingest = topic == t.tagger.input;
    let mut stats = Summary::default();
    let started = Instant::now();
    loop {
        if a.count.is_some_and(|n| stats.items >= n) {
            break;
        }
        let idle = a.idle_timeout.unwrap_or(Duration::from_secs(86_400 * 365));
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(idle, consumer.recv()) => match r {
                Err(_) => { eprintln!("no record for {}; stopping", humantime::format_duration(idle)); break; }
                Ok(m) => m?,
            },
        };
        stats.items += 1;
        if is_dlq {
            let mut headers = serde_json::Map::new();
            if let Some(h) = msg.headers() {
                for hd in h.iter() {
                    headers.insert(hd.key.to_string(), serde_json::Value::String(String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned()));
                }
            }
            println!("{}", serde_json::json!({"offset": msg.offset(), "partition": msg.partition(), "bytes": msg.payload().map_or(0, |p| p.len()), "headers": headers}));
            continue;
        }
        if is_ingest {
            let d = codec.decode::<MediaIngested>(msg.payload()).await?;
            if !a.quiet {
                println!("{}", serde_json::to_string(&d.event)?);
            }
            continue;
        }
        let e = codec.decode::<MediaTagged>(msg.payload()).await?.event;
        stats.observe(&e, truth.get(&e.media_id));
        if a.quiet {
            continue;
        }
        if a.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let tags: Vec<String> = e.tags.iter().map(|t| format!("{} {:.2}", t.label, t.score)).collect();
            let mark = match truth.get(&e.media_id) {
                Some(l) if e.tags.first().is_some_and(|t| &t.label == l) => " ✓",
                Some(_) => " ✗",
                None => "",
            };
            println!("{:<28} {}{}", e.media_id, if tags.is_empty() { e.no_tags_reason.clone().unwrap_or_default() } else { tags.join(", ") }, mark);
        }
    }
    if a.summary {
        stats.print(started.elapsed());
    }
    Ok(())
}

#[derive(Default)]
struct Summary {
    items: usize,
    tags: usize,
    judged: usize,
    correct: usize,
    latency: Option<hdrhistogram::Histogram<u64>>,
    first_ingest: Option<i64>,
    last_seen: i64,
}

impl Summary {
    fn observe(&mut self, e: &MediaTagged, truth: Option<&String>) {
        self.tags += e.tags.len();
        if let Some(l) = truth {
            self.judged += 1;
            if e.tags.first().is_some_and(|t| &t.label == l) {
                self.correct += 1;
            }
        }
        let now = now_millis();
        let h = self.latency.get_or_insert_with(|| hdrhistogram::Histogram::new(3).unwrap());
        let _ = h.record((now - e.ingested_at).max(0) as u64);
        self.first_ingest = Some(self.first_ingest.map_or(e.ingested_at, |f| f.min(e.ingested_at)));
        self.last_seen = now;
    }

    fn print(&self, elapsed: Duration) {
        println!("──── summary ────");
        println!("items            {}", self.items);
        if self.items > 0 {
            println!("tags per item    {:.2}", self.tags as f64 / self.items as f64);
        }
        if self.judged > 0 {
            println!("top-1 accuracy   {:.1}% ({} / {} with known labels)", 100.0 * self.correct as f64 / self.judged as f64, self.correct, self.judged);
        }
        if let (Some(h), Some(first)) = (&self.latency, self.first_ingest) {
            let span = (self.last_seen - first).max(1) as f64 / 1000.0;
            println!("throughput       {:.1} items/s (first ingest → last tagged event, {:.1}s)", self.items as f64 / span, span);
            println!("e2e latency      p50 {} ms, p99 {} ms, max {} ms (ingested_at → received here)", h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max());
        }
        println!("tail ran         {:.1}s", elapsed.as_secs_f64());
    }
}

async fn tag(c: &Common, a: TagArgs) -> anyhow::Result<()> {
    let topo = load(c)?;
    let cfg = TaggerConfig::from_topology(&topo)?;
    let tagger = Tagger::load(cfg).await?;
    let texts: Vec<String> = match (&a.text, a.lines) {
        (Some(t), _) => vec![t.clone()],
        (None, true) => std::io::stdin().lock().lines().collect::<Result<_, _>>()?,
        (None, false) => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            vec![s]
        }
    };
    let tagger = &tagger;
    let labels = &a.labels;
    let results = futures::future::join_all(texts.iter().map(|t| async move {
        let req = TagRequest { title: t.clone(), candidate_labels: labels.clone(), ..Default::default() };
        tagger.tag(&req).await
    }))
    .await;
    for (t, r) in texts.iter().zip(results) {
        let r = r?;
        let preview: String = t.chars().take(60).collect();
        let tags: Vec<String> = r.tags.iter().map(|t| format!("{} {:.3}", t.label, t.score)).collect();
        println!("{preview:<60}  {}", if tags.is_empty() { r.no_tags_reason.unwrap_or_default() } else { tags.join(", ") });
    }
    Ok(())
}

async fn db(c: &Common, action: DbAction) -> anyhow::Result<()> {
    let topo = load(c)?;
    let cfg = SinkConfig::from_topology(&topo)?;
    let session = streamoasis_sink::connect(&c.scylla, &cfg).await?;
    let ks = &cfg.keyspace;
    match action {
        DbAction::Stats => {
            let n = streamoasis_sink::count_rows(&session, &format!("SELECT COUNT(*) FROM {ks}.media_tags")).await?;
            println!("media_tags       {n} rows");
            if let Ok(tc) = TaggerConfig::from_topology(&topo) {
                for l in &tc.labels {
                    println!("media_by_tag     {:<14} {} rows", l.name, streamoasis_sink::read::count_by_tag(&session, ks, &l.name).await?);
                }
            }
        }
        DbAction::Get { media_id } => match streamoasis_sink::get_tags(&session, ks, &media_id).await? {
            Some(tags) => println!("{media_id}: {}", tags.iter().map(|(l, s)| format!("{l} {s:.3}")).collect::<Vec<_>>().join(", ")),
            None => println!("{media_id}: not found"),
        },
        DbAction::ByTag { tag, limit } => {
            for (id, score) in streamoasis_sink::by_tag(&session, ks, &tag, limit).await? {
                println!("{score:.3}  {id}");
            }
        }
    }
    Ok(())
}

//! Subcommand implementations, one file per command: thin glue over the libraries.
//!
//! - [`serve`]: `tagger` and `sink`, the stream processors.
//! - [`topology`]: `topology check` and `topology apply`.
//! - [`produce`]: `produce`, media items from a JSON-lines file to the ingest topic.
//! - [`tail`]: `tail`, the records of a topic as they arrive.
//! - [`tag`]: `tag`, text tagged locally with the model.
//! - [`db`]: `db stats|get|by-tag`, what the sink stored.
//! - [`api`]: `api` (the REST and gRPC server), `api token`, `api call`.
//! - [`retag`]: `retag`, archived ingest records re-sent.
//! - [`dlq`]: `dlq replay`, dead letters re-sent.
//! - [`compare`]: `compare`, a shadow configuration's stored tags against the live ones.
//!
//! This file dispatches and holds what several commands share: loading the topology, the broker
//! wait, the signal handlers, time and input parsing.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use streamoasis_pipeline::client;
use streamoasis_pipeline::events::now_millis;
use streamoasis_pipeline::secret::redact_url;
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::CancellationToken;
use streamoasis_tagger::Tagger;

use crate::cli::{Cli, Command, Common, DlqAction, TopologyAction};

mod api;
mod compare;
mod db;
mod dlq;
mod produce;
mod retag;
mod serve;
mod tag;
mod tail;
mod topology;

/// Dispatch a parsed command line; `shutdown` is cancelled on SIGTERM / Ctrl-C.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let c = &cli.common;
    let r = command(c, cli.command, shutdown).await;
    // No model thread may be inside libtorch when the process exits and its static destructors
    // run (a drain timeout abandons records whose batch may still be in the model): a crash
    // (SIGSEGV) at exit instead of a clean stop.
    if !streamoasis_tagger::batcher::quiesce(std::time::Duration::from_secs(10)).await {
        tracing::warn!("a model thread was still running a batch 10 s after the stop; exiting anyway");
    }
    r
}

async fn command(c: &Common, command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Tagger(a) => serve::tagger(c, a, shutdown).await,
        Command::Sink(a) => serve::sink(c, a, shutdown).await,
        Command::Topology { action: TopologyAction::Apply { no_db } } => topology::apply(c, no_db).await,
        Command::Topology { action: TopologyAction::Check } => topology::check(c),
        Command::Produce(a) => produce::run(c, a).await,
        Command::Tail(a) => tail::run(c, a, shutdown).await,
        Command::Tag(a) => tag::run(c, a).await,
        Command::Db { action } => db::run(c, action).await,
        Command::Api(a) => api::run(c, a, shutdown).await,
        Command::Retag(a) => retag::run(c, a).await,
        Command::Compare(a) => compare::run(c, a).await,
        Command::Dlq { action: DlqAction::Replay(a) } => dlq::replay(c, a).await,
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

/// How long a command waits for Kafka to answer at start-up.
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// Wait until Kafka answers ([`client::wait_for_broker`] with the topology's client properties).
/// That is a blocking librdkafka metadata call of up to [`BROKER_WAIT`]: it runs on the blocking
/// pool, so no runtime thread (signal handling, the metrics endpoint) stalls meanwhile.
async fn wait_for_broker(c: &Common, topo: &Topology) -> anyhow::Result<()> {
    let (brokers, properties) = (c.kafka.clone(), topo.file.kafka.client.clone());
    tokio::task::spawn_blocking(move || client::wait_for_broker(&brokers, &properties, BROKER_WAIT)).await?
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

fn open_lines(path: &std::path::Path) -> anyhow::Result<Box<dyn BufRead>> {
    if path.as_os_str() == "-" {
        Ok(Box::new(std::io::BufReader::new(std::io::stdin())))
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("cannot open {} (the demo data is written by scripts/setup)", path.display()))?;
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}

//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with `RUST_LOG` (default `info`), text or JSON (`STREAMOASIS_LOG_FORMAT=json`).
//! - Traces: OTLP/HTTP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (standard OTel variables).
//! - Metrics: Prometheus text at `GET /metrics` on the processor's metrics address. Metric names
//!   are constants below; labels are low-cardinality (processor, outcome, kind) — never per media.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Process-wide metrics registry; other crates register their metrics here too.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let r = Registry::new();
        // process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        #[cfg(target_os = "linux")]
        let _ = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        r
    })
}

/// The run loop's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Input records fully handled, by outcome (`ok`, `dlq`).
    pub records: IntCounterVec,
    /// Records sent to a dead-letter topic, by error kind.
    pub dead_letters: IntCounterVec,
    /// Retries of transient failures, by stage.
    pub retries: IntCounterVec,
    /// Records read and not yet handled.
    pub in_flight: IntGaugeVec,
    /// 1 while the input partitions are paused for backpressure.
    pub paused: IntGaugeVec,
    /// Time from read to handled (output acknowledged / rows written / DLQ acknowledged).
    pub latency: HistogramVec,
    /// Time from the item's `ingested_at` to handled here (tagger: tagged event acknowledged;
    /// sink: rows written).
    pub e2e_latency: HistogramVec,
    /// Time per step of a record in the run loop, by `stage`: `fetch` (record timestamp to read
    /// by the loop: broker, fetch, prefetch queue), `key_wait` (behind an earlier record of its
    /// key), `decode` (incl. the registry lookup), `process` (the processor: the tagger's batch
    /// queue and model, the sink's write), `encode`, `produce` (send to acknowledgement).
    pub stage_latency: HistogramVec,
    /// Consumer lag per assigned partition (from librdkafka statistics, every 5 s).
    pub lag: IntGaugeVec,
    /// Errors reported by the Kafka consumer.
    pub consumer_errors: IntCounterVec,
    /// Fatal errors (the process is about to exit non-zero).
    pub fatal: IntCounterVec,
}

/// The run loop's metrics, registered once.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = registry();
        let m = Metrics {
            records: IntCounterVec::new(Opts::new("streamoasis_records_total", "Input records fully handled"), &["processor", "outcome"]).unwrap(),
            dead_letters: IntCounterVec::new(Opts::new("streamoasis_dead_letters_total", "Records sent to a dead-letter topic"), &["processor", "kind"]).unwrap(),
            retries: IntCounterVec::new(Opts::new("streamoasis_retries_total", "Retries of transient failures"), &["processor", "stage"]).unwrap(),
            in_flight: IntGaugeVec::new(Opts::new("streamoasis_in_flight", "Records read and not yet handled"), &["processor"]).unwrap(),
            paused: IntGaugeVec::new(Opts::new("streamoasis_paused", "1 while input partitions are paused for backpressure"), &["processor"]).unwrap(),
            latency: HistogramVec::new(
                HistogramOpts::new("streamoasis_record_latency_seconds", "Read-to-handled time per record")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["processor"],
            )
            .unwrap(),
            e2e_latency: HistogramVec::new(
                HistogramOpts::new("streamoasis_e2e_latency_seconds", "Time from ingested_at to handled by this processor")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]),
                &["processor"],
            )
            .unwrap(),
            stage_latency: HistogramVec::new(
                HistogramOpts::new("streamoasis_stage_seconds", "Time per step of a record in the run loop")
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0]),
                &["processor", "stage"],
            )
            .unwrap(),
            lag: IntGaugeVec::new(Opts::new("streamoasis_consumer_lag", "Records behind the partition's end, per assigned partition"), &["processor", "topic", "partition"])
                .unwrap(),
            consumer_errors: IntCounterVec::new(Opts::new("streamoasis_consumer_errors_total", "Errors reported by the Kafka consumer"), &["processor"]).unwrap(),
            fatal: IntCounterVec::new(Opts::new("streamoasis_fatal_errors_total", "Fatal errors (the process exits non-zero)"), &["processor"]).unwrap(),
        };
        for c in [&m.records, &m.dead_letters, &m.retries, &m.consumer_errors, &m.fatal] {
            let _ = r.register(Box::new(c.clone()));
        }
        let _ = r.register(Box::new(m.in_flight.clone()));
        let _ = r.register(Box::new(m.paused.clone()));
        let _ = r.register(Box::new(m.latency.clone()));
        let _ = r.register(Box::new(m.e2e_latency.clone()));
        let _ = r.register(Box::new(m.stage_latency.clone()));
        let _ = r.register(Box::new(m.lag.clone()));
        m
    })
}

/// Render the registry in the Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry().gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// What `/healthz` (liveness) and `/readyz` (readiness) answer, shared by the run loop, the
/// model and the HTTP server. Passed in, never process-global, so tests run several processors in
/// one process.
///
/// - Ready: the model (or other start-up work) is loaded, partitions are assigned or the group
///   is idle (nothing to assign), and no dependency is degraded (the schema registry unreachable
///   at start, or a stage retrying a transient failure right now).
/// - Alive: no fatal error; no registered component reports itself dead (the model thread); the
///   run loop is not stalled (records in flight and none completed for `stall_timeout`); the
///   consumer has not reported only errors for `consumer_error_timeout`.
pub struct Health {
    loaded: AtomicBool,
    consuming: AtomicBool,
    fatal: std::sync::Mutex<Option<String>>,
    in_flight: AtomicU64,
    last_progress_ms: AtomicU64,
    error_since_ms: AtomicU64,
    stall_timeout_ms: AtomicU64,
    error_timeout_ms: AtomicU64,
    #[allow(clippy::type_complexity)]
    checks: std::sync::Mutex<Vec<(&'static str, Box<dyn Fn() -> bool + Send + Sync>)>>,
    /// Dependencies failing now, with the last error (readiness fails while any is listed).
    degraded: std::sync::Mutex<std::collections::BTreeMap<&'static str, String>>,
    any_degraded: AtomicBool,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("ready", &self.ready()).field("alive", &self.alive()).finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Default for Health {
    fn default() -> Self {
        Health {
            loaded: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            fatal: std::sync::Mutex::new(None),
            in_flight: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(now_ms()),
            error_since_ms: AtomicU64::new(0),
            // The topology's defaults until the run loop sets the processor's own.
            stall_timeout_ms: AtomicU64::new(crate::topology::default_stall_timeout().as_millis() as u64),
            error_timeout_ms: AtomicU64::new(crate::topology::default_consumer_error_timeout().as_millis() as u64),
            checks: std::sync::Mutex::new(Vec::new()),
            degraded: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            any_degraded: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// A fresh state: not ready, alive.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Health::default())
    }
    /// Start-up work (model load, database connection) is done.
    pub fn set_loaded(&self, v: bool) {
        self.loaded.store(v, Ordering::SeqCst);
    }
    /// The run loop is consuming (assigned or idle in its group), or not (starting, draining).
    pub fn set_consuming(&self, v: bool) {
        self.consuming.store(v, Ordering::SeqCst);
    }
    /// Thresholds for liveness (from the processor's topology section).
    pub fn set_thresholds(&self, stall: Duration, consumer_errors: Duration) {
        self.stall_timeout_ms.store(stall.as_millis() as u64, Ordering::SeqCst);
        self.error_timeout_ms.store(consumer_errors.as_millis() as u64, Ordering::SeqCst);
    }
    /// A component reports whether it is alive (e.g. the model thread); checked on every probe.
    pub fn add_check(&self, name: &'static str, alive: impl Fn() -> bool + Send + Sync + 'static) {
        self.checks.lock().unwrap().push((name, Box::new(alive)));
    }
    /// A fatal error: liveness fails from now on.
    pub fn set_fatal(&self, why: impl Into<String>) {
        self.fatal.lock().unwrap().get_or_insert(why.into());
    }
    /// A dependency is failing (`Some(error)`) or works again (`None`); readiness fails while
    /// any is failing, so a load balancer or rollout waits, while liveness stays up (a restart
    /// would not bring the dependency back).
    pub fn set_degraded(&self, dependency: &'static str, error: Option<String>) {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => {
                d.insert(dependency, e);
            }
            None => {
                d.remove(dependency);
            }
        }
        self.any_degraded.store(!d.is_empty(), Ordering::SeqCst);
    }
    /// Every dependency works again (a record went through end to end). Cheap when none failed.
    pub fn clear_degraded(&self) {
        if self.any_degraded.swap(false, Ordering::SeqCst) {
            self.degraded.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
    /// Records in flight now.
    pub fn set_in_flight(&self, n: usize) {
        if n == 0 {
            self.last_progress_ms.store(now_ms(), Ordering::SeqCst);
        }
        self.in_flight.store(n as u64, Ordering::SeqCst);
    }
    /// A record completed.
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::SeqCst);
    }
    /// The consumer reported an error (`true`) or delivered a record (`false`).
    pub fn consumer_error(&self, failing: bool) {
        if failing {
            let _ = self.error_since_ms.compare_exchange(0, now_ms(), Ordering::SeqCst, Ordering::SeqCst);
        } else {
            self.error_since_ms.store(0, Ordering::SeqCst);
        }
    }
    /// How long the consumer has reported only errors.
    pub fn consumer_failing_for(&self) -> Duration {
        match self.error_since_ms.load(Ordering::SeqCst) {
            0 => Duration::ZERO,
            t => Duration::from_millis(now_ms().saturating_sub(t)),
        }
    }
    /// `Ok` when ready to take traffic, else why not.
    pub fn ready(&self) -> Result<(), String> {
        if !self.loaded.load(Ordering::SeqCst) {
            return Err("starting: model or database not loaded yet".into());
        }
        if self.any_degraded.load(Ordering::SeqCst) {
            let d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((dep, e)) = d.iter().next() {
                return Err(format!("{dep} unavailable: {e}"));
            }
        }
        if !self.consuming.load(Ordering::SeqCst) {
            return Err("not consuming (starting or draining)".into());
        }
        Ok(())
    }
    /// `Ok` while alive, else why not (liveness fails: the orchestrator restarts the process).
    pub fn alive(&self) -> Result<(), String> {
        if let Some(f) = self.fatal.lock().unwrap().as_ref() {
            return Err(format!("fatal: {f}"));
        }
        for (name, check) in self.checks.lock().unwrap().iter() {
            if !check() {
                return Err(format!("{name} is not running"));
            }
        }
        let now = now_ms();
        let stall = self.stall_timeout_ms.load(Ordering::SeqCst);
        let since = now.saturating_sub(self.last_progress_ms.load(Ordering::SeqCst));
        if self.in_flight.load(Ordering::SeqCst) > 0 && since > stall {
            return Err(format!("no record completed for {}s with {} in flight", since / 1000, self.in_flight.load(Ordering::SeqCst)));
        }
        let failing = self.consumer_failing_for();
        if failing.as_millis() as u64 > self.error_timeout_ms.load(Ordering::SeqCst) {
            return Err(format!("the Kafka consumer has reported only errors for {}s", failing.as_secs()));
        }
        Ok(())
    }
}

/// The health and metrics routes (`/metrics`, `/healthz`, `/readyz`), for any axum server.
pub fn health_routes(health: Arc<Health>) -> axum::Router {
    use axum::{http::StatusCode, routing::get, Router};
    let live = health.clone();
    Router::new()
        .route("/metrics", get(|| async { render() }))
        .route(
            "/healthz",
            get(move || {
                let h = live.clone();
                async move {
                    match h.alive() {
                        Ok(()) => (StatusCode::OK, "ok".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let h = health.clone();
                async move {
                    match h.ready() {
                        Ok(()) => (StatusCode::OK, "ready".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}

/// Serve `/metrics`, `/healthz` (liveness) and `/readyz` (readiness) until the runtime stops.
pub async fn serve_metrics(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    axum::serve(listener, health_routes(health)).await
}

/// W3C trace context in Kafka headers (`traceparent`, `tracestate`).
struct HeaderExtractor<'a>(Vec<(&'a str, &'a str)>);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| *v)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}

fn text_headers<H: rdkafka::message::Headers>(headers: Option<&H>) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    if let Some(h) = headers {
        for hdr in h.iter() {
            if let Some(v) = hdr.value.and_then(|v| std::str::from_utf8(v).ok()) {
                out.push((hdr.key, v));
            }
        }
    }
    out
}

/// Make the W3C trace context carried in a record's headers the parent of `span`, so one
/// item's spans across processes share a trace id.
pub fn set_parent_from_headers<H: rdkafka::message::Headers>(span: &tracing::Span, headers: Option<&H>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let pairs = text_headers(headers);
    if pairs.iter().any(|(k, _)| *k == "traceparent") {
        let extractor = HeaderExtractor(pairs);
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&extractor));
        let _ = span.set_parent(cx);
    }
}

/// Headers carrying the current span's trace context to an output record. Without a tracer
/// installed, the input's own `traceparent`/`tracestate` are passed through unchanged.
pub fn trace_headers(msg: &rdkafka::message::OwnedMessage) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, Headers as _, Message};
    let mut h = context_headers(&tracing::Span::current());
    if h.count() > 0 {
        return h;
    }
    for (k, v) in text_headers(msg.headers()) {
        if k == "traceparent" || k == "tracestate" {
            h = h.insert(Header { key: k, value: Some(v) });
        }
    }
    h
}

/// Headers carrying `span`'s W3C trace context (none when no tracer is installed).
pub fn context_headers(span: &tracing::Span) -> rdkafka::message::OwnedHeaders {
    use opentelemetry::trace::TraceContextExt;
    use rdkafka::message::{Header, OwnedHeaders};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut h = OwnedHeaders::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        let mut map = std::collections::HashMap::new();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
        for (k, v) in &map {
            h = h.insert(Header { key: k.as_str(), value: Some(v.as_str()) });
        }
    }
    h
}

/// Guard that flushes traces on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Install the global subscriber: logs to stderr, plus OTLP traces when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,scylla=warn"));
    let json = std::env::var("STREAMOASIS_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };

    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let mut provider = None;
    let otel = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        use opentelemetry::trace::TracerProvider as _;
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => {
                let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build())
                    .build();
                let tracer = p.tracer("streamoasis");
                provider = Some(p);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                eprintln!("warning: OTLP exporter not started: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    TelemetryGuard { provider }
}

use tracing_subscriber::Layer as _;

//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with `RUST_LOG` (default `info`), text or JSON (`STREAMOASIS_LOG_FORMAT=json`).
//! - Traces: OTLP/HTTP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (standard OTel variables).
//! - Metrics: Prometheus text at `GET /metrics` on the processor's metrics address. Metric names
//!   are constants below; labels are low-cardinality (processor, outcome, kind) — never per media.

use std::net::SocketAddr;
use std::sync::OnceLock;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

/// Process-wide metrics registry; other crates register their metrics here too.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
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
        };
        for c in [&m.records, &m.dead_letters, &m.retries] {
            let _ = r.register(Box::new(c.clone()));
        }
        let _ = r.register(Box::new(m.in_flight.clone()));
        let _ = r.register(Box::new(m.paused.clone()));
        let _ = r.register(Box::new(m.latency.clone()));
        m
    })
}

/// Render the registry in the Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry().gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Mark the process ready (consuming) or not (starting, draining): `GET /readyz` follows it.
pub fn set_ready(ready: bool) {
    READY.store(ready, std::sync::atomic::Ordering::SeqCst);
}

/// Serve `/metrics`, `/healthz` (alive) and `/readyz` (model loaded and consuming) until the
/// runtime stops.
pub async fn serve_metrics(addr: SocketAddr) -> std::io::Result<()> {
    use axum::{http::StatusCode, routing::get, Router};
    let app = Router::new()
        .route("/metrics", get(|| async { render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                if READY.load(std::sync::atomic::Ordering::SeqCst) {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    axum::serve(listener, app).await
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

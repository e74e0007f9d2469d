//! REST: the axum router, JSON error bodies and the OpenAPI document (generated from the
//! handlers' annotations below, served at `/openapi.json`).
//!
//! Every error is `{"error": {"code": "...", "message": "...", "field": "..."}}` with `field`
//! naming the offending request field when there is one.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use rdkafka::producer::FutureRecord;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use streamoasis_sink::read::ReadError;
use streamoasis_tagger::batcher::BatchError;
use streamoasis_tagger::tagger::TagError;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::validate::{self, FieldError, MediaItem, TagInput};
use crate::ApiState;

// ───────────────────────────── errors ─────────────────────────────

/// The JSON error body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: `unauthorized`, `malformed_json`, `invalid_field`, `body_too_large`,
    /// `busy`, `timeout`, `not_found`, `unavailable`, `internal`.
    pub code: String,
    /// Human-readable detail with the fix.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), field: None, retry_after: None }
    }
    fn field(e: FieldError) -> Self {
        ApiError { field: Some(e.field), ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", e.message) }
    }
    fn unavailable(what: &str) -> Self {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("{what} is not configured in this process"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message, field: self.field } };
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn tag_error(e: TagError) -> ApiError {
    match e {
        TagError::InvalidLabels(m) => ApiError::field(FieldError::new("candidate_labels", m)),
        TagError::Model(BatchError::QueueFull) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "busy", "the tagging queue is full: retry after the delay in Retry-After")
        },
        TagError::Model(BatchError::Overloaded(m)) => ApiError {
            retry_after: Some(5),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the model is out of memory ({m}): retry later"))
        },
        TagError::Model(BatchError::Stopped) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the model is shutting down"),
        TagError::Model(BatchError::Model(m)) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("model error: {m}")),
    }
}

fn read_error(e: ReadError) -> ApiError {
    match e {
        ReadError::BadPageToken(_) => ApiError { field: Some("page".into()), ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string()) },
        ReadError::Db(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("database: {m}")),
    }
}

/// Parse a JSON body strictly: 413 over the limit, 400 for malformed JSON, 422 naming the field
/// for unknown, missing or mistyped fields.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body exceeds the limit: send fewer or shorter items")
        } else {
            ApiError::new(r.status(), "bad_body", r.body_text())
        }
    })?;
    // Request bodies are JSON objects: serde would otherwise accept a struct written as an array.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'[')) {
        return Err(ApiError::field(FieldError { field: "body".into(), message: "the body must be a JSON object, not an array".into() }));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(de);
    let e = match parsed {
        Ok(v) => {
            return Ok(v);
        }
        Err(e) => e,
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    if matches!(inner.classify(), serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON: {msg}")));
    }
    // "unknown field `x`" / "missing field `x`": name that field under the path.
    let named = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
    let base = if path == "." { String::new() } else { path };
    let field = match named {
        Some(n) if base.is_empty() || base == n || base.ends_with(&format!(".{n}")) => if base.is_empty() { n.to_string() } else { base },
        Some(n) => format!("{base}.{n}"),
        None if base.is_empty() => "body".into(),
        None => base,
    };
    let fix = if msg.starts_with("unknown field") { " (remove it)" } else { "" };
    Err(ApiError { field: Some(field), ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", format!("{msg}{fix}")) })
}

// ───────────────────────────── types ─────────────────────────────

/// `POST /v1/tag` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagBody {
    /// Title (required unless description or transcript has text).
    #[serde(default)]
    pub title: String,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Transcript or body text.
    #[serde(default)]
    pub transcript: Option<String>,
    /// Labels replacing the taxonomy (1..=tagging.max_labels).
    #[serde(default)]
    pub candidate_labels: Option<Vec<String>>,
    /// VIDEO, EPISODE, MOVIE, CLIP, TRAILER, LIVE, PODCAST, ARTICLE, ATTRACTION or OTHER
    /// (chooses the prompt templates and score calibration).
    #[serde(default)]
    pub kind: Option<String>,
    /// BCP 47 language tag; items in a language outside `tagging.languages` are not tagged
    /// (`no_tags_reason: unsupported_language`).
    #[serde(default)]
    pub language: Option<String>,
}

/// One label and its score in [0, 1].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TagOut {
    /// Label.
    pub label: String,
    /// Score.
    pub score: f32,
}

/// `POST /v1/tag` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TagResponse {
    /// Tags, best first.
    pub tags: Vec<TagOut>,
    /// Why `tags` is empty, if it is.
    pub no_tags_reason: Option<String>,
    /// EMBEDDING or NLI.
    pub strategy: String,
    /// `name@version`.
    pub model: String,
    /// The request's kind, normalised (null when not given).
    pub kind: Option<String>,
}

/// `GET /v1/media/{media_id}/tags` answer: what the sink stored.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MediaTagsResponse {
    /// The item.
    pub media_id: String,
    /// Tags, best first.
    pub tags: Vec<TagOut>,
    /// Media kind.
    pub kind: Option<String>,
    /// Title carried from the input.
    pub title: Option<String>,
    /// Source carried from the input.
    pub source: Option<String>,
    /// Language carried from the input.
    pub language: Option<String>,
    /// Attributes carried from the input.
    pub attributes: HashMap<String, String>,
    /// EMBEDDING or NLI.
    pub strategy: Option<String>,
    /// `name@version`.
    pub model: Option<String>,
    /// Ingest time, ms since the epoch.
    pub ingested_at: Option<i64>,
    /// Tagging time, ms since the epoch.
    pub tagged_at: Option<i64>,
}

/// Query of `GET /v1/tags/{tag}/media`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ByTagQuery {
    /// Items per page, 1..=1000 (default 20).
    pub limit: Option<usize>,
    /// The `next_page` token of the previous page.
    pub page: Option<String>,
}

/// One item carrying the tag.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ByTagItem {
    /// The item.
    pub media_id: String,
    /// Its score for the tag.
    pub score: f32,
    /// Tagging time, ms since the epoch.
    pub tagged_at: Option<i64>,
}

/// A page of items carrying a tag, best first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ByTagResponse {
    /// The tag.
    pub tag: String,
    /// Best first.
    pub items: Vec<ByTagItem>,
    /// Opaque token of the next page (pass as `page`); null on the last page.
    pub next_page: Option<String>,
}

/// `POST /v1/media` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaBatch {
    /// 1..=1000 items; all are checked before any is sent.
    pub items: Vec<MediaItem>,
}

/// `POST /v1/media` answer (202: on the ingest topic, acknowledged by Kafka).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The ids enqueued, in request order.
    pub media_ids: Vec<String>,
    /// The topic they went to.
    pub topic: String,
}

/// `GET /generate-metadata/{video_id}` answer (the original service's route, kept for its
/// callers): the stored tags of the item.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GenerateMetadataResponse {
    /// The item asked for.
    pub video_id: String,
    /// Its metadata.
    pub metadata: Metadata,
}

/// The metadata of one item.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Metadata {
    /// Tag labels, best first.
    pub tags: Vec<String>,
    /// Score per label.
    pub scores: HashMap<String, f32>,
    /// Title, when the input carried one.
    pub title: Option<String>,
    /// Language, when the input carried one.
    pub language: Option<String>,
    /// `name@version` of the model.
    pub model: Option<String>,
    /// Tagging time, ms since the epoch.
    pub generated_at: Option<i64>,
}

// ───────────────────────────── handlers ─────────────────────────────

/// Tag one item now, through the shared batcher.
#[utoipa::path(post, path = "/v1/tag", request_body = TagBody,
    responses(
        (status = 200, description = "Tags, best first", body = TagResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Tagging queue full; retry after `Retry-After` seconds", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn tag(State(st): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<TagResponse>, ApiError> {
    let b: TagBody = parse_json(body)?;
    let input = TagInput { title: b.title, description: b.description, transcript: b.transcript, candidate_labels: b.candidate_labels, kind: b.kind, language: b.language };
    let (req, kind) = validate::tag_request(input, &st.tagger, &st.limits).map_err(ApiError::field)?;
    let r = tokio::time::timeout(st.limits.request_timeout, st.tagger.try_tag(&req))
        .await
        .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "tagging took longer than the request deadline"))?
        .map_err(tag_error)?;
    let m = st.tagger.model_ref();
    Ok(Json(TagResponse {
        tags: r.tags.into_iter().map(|t| TagOut { label: t.label, score: t.score }).collect(),
        no_tags_reason: r.no_tags_reason,
        strategy: format!("{:?}", st.tagger.strategy()).to_uppercase(),
        model: format!("{}@{}", m.name, m.version),
        kind: kind.map(|k| serde_json::to_value(k).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()),
    }))
}

/// What the sink stored for one item.
#[utoipa::path(get, path = "/v1/media/{media_id}/tags",
    params(("media_id" = String, Path, description = "The item's id")),
    responses(
        (status = 200, description = "Stored tags", body = MediaTagsResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "Not tagged (yet)", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn media_tags(State(st): State<Arc<ApiState>>, Path(media_id): Path<String>) -> Result<Json<MediaTagsResponse>, ApiError> {
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::unavailable("the database"))?;
    let rec = reader.media(&media_id).await.map_err(read_error)?.ok_or_else(|| not_found(&media_id))?;
    Ok(Json(MediaTagsResponse {
        media_id: rec.media_id,
        tags: rec.tags.into_iter().map(|(label, score)| TagOut { label, score }).collect(),
        kind: rec.kind,
        title: rec.title,
        source: rec.source,
        language: rec.language,
        attributes: rec.attributes,
        strategy: rec.strategy,
        model: rec.model,
        ingested_at: rec.ingested_at,
        tagged_at: rec.tagged_at,
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no tags stored for '{id}' (not ingested, or not tagged yet)"))
}

/// Items carrying a tag, best first, one page at a time.
#[utoipa::path(get, path = "/v1/tags/{tag}/media",
    params(("tag" = String, Path, description = "The tag"), ByTagQuery),
    responses(
        (status = 200, description = "One page", body = ByTagResponse),
        (status = 400, description = "Bad limit or page token", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn by_tag(State(st): State<Arc<ApiState>>, Path(tag): Path<String>, q: Result<Query<ByTagQuery>, QueryRejection>) -> Result<Json<ByTagResponse>, ApiError> {
    let Query(q) = q.map_err(|e| {
        let text = e.body_text();
        let field = if text.contains("limit") { "limit" } else if text.contains("page") { "page" } else { "query" };
        ApiError { field: Some(field.into()), ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", text) }
    })?;
    let limit = q.limit.unwrap_or(20);
    if limit == 0 || limit > st.limits.max_page {
        return Err(ApiError {
            field: Some("limit".into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", format!("{limit} is out of range: use 1..={}", st.limits.max_page))
        });
    }
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::unavailable("the database"))?;
    let page = reader.by_tag(&tag, limit, q.page.as_deref().filter(|p| !p.is_empty())).await.map_err(read_error)?;
    Ok(Json(ByTagResponse {
        tag,
        items: page.items.into_iter().map(|i| ByTagItem { media_id: i.media_id, score: i.score, tagged_at: i.tagged_at }).collect(),
        next_page: page.next,
    }))
}

/// Enqueue items to the ingest topic (answered once Kafka acknowledged every one).
#[utoipa::path(post, path = "/v1/media", request_body = MediaBatch,
    responses(
        (status = 202, description = "Enqueued", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`); nothing was sent", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn post_media(State(st): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let b: MediaBatch = parse_json(body)?;
    let ingest = st.ingest.as_ref().ok_or_else(|| ApiError::unavailable("the ingest producer"))?;
    let events = validate::media_items(b.items, &st.tagger, &st.limits).map_err(ApiError::field)?;
    // Encode all first: a registry failure sends nothing.
    let mut payloads = Vec::with_capacity(events.len());
    for e in &events {
        let p = ingest.codec.encode(&ingest.topic, e).await.map_err(|x| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("schema registry: {x}")))?;
        payloads.push(p);
    }
    let sends = events.iter().zip(&payloads).map(|(e, p)| {
        ingest.producer.send(FutureRecord::to(&ingest.topic).key(&e.media_id).payload(p), st.limits.request_timeout)
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(x, _)| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("kafka: {x}")))?;
    }
    Ok((StatusCode::ACCEPTED, Json(Accepted { media_ids: events.into_iter().map(|e| e.media_id).collect(), topic: ingest.topic.clone() })))
}

/// The original service's route: the stored metadata of one item.
///
/// Shape: `{"video_id": "...", "metadata": {"tags": ["label", ...], "scores": {"label": 0.91},
/// "title": "...", "language": "en", "model": "name@version", "generated_at": 1700000000000}}`.
#[utoipa::path(get, path = "/generate-metadata/{video_id}",
    params(("video_id" = String, Path, description = "The item's media id")),
    responses(
        (status = 200, description = "Stored metadata", body = GenerateMetadataResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "Not tagged (yet)", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn generate_metadata(State(st): State<Arc<ApiState>>, Path(video_id): Path<String>) -> Result<Json<GenerateMetadataResponse>, ApiError> {
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::unavailable("the database"))?;
    let rec = reader.media(&video_id).await.map_err(read_error)?.ok_or_else(|| not_found(&video_id))?;
    Ok(Json(GenerateMetadataResponse {
        video_id,
        metadata: Metadata {
            tags: rec.tags.iter().map(|(l, _)| l.clone()).collect(),
            scores: rec.tags.into_iter().collect(),
            title: rec.title,
            language: rec.language,
            model: rec.model,
            generated_at: rec.tagged_at,
        },
    }))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Alive")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the model is loaded (the process cannot serve before).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Ready")))]
async fn readyz() -> &'static str {
    "ready\n"
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], streamoasis_pipeline::telemetry::render())
}

async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi().to_pretty_json().unwrap_or_default())
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route: see /openapi.json")
}

// ───────────────────────────── plumbing ─────────────────────────────

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme("bearer_jwt", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "streamoasis", description = "Zero-shot media tagging: synchronous tagging on the stream's batcher, the stored tags, enqueueing."),
    paths(tag, media_tags, by_tag, post_media, generate_metadata, healthz, readyz, metrics),
    components(schemas(ErrorBody, ErrorDetail, TagBody, TagOut, TagResponse, MediaTagsResponse, ByTagItem, ByTagResponse, MediaBatch, MediaItem, Accepted, GenerateMetadataResponse, Metadata)),
    modifiers(&Security)
)]
struct ApiDoc;

/// The OpenAPI document (generated from the handlers).
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

fn http_metrics() -> &'static HttpMetrics {
    static M: OnceLock<HttpMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = streamoasis_pipeline::telemetry::registry();
        let m = HttpMetrics {
            requests: IntCounterVec::new(Opts::new("streamoasis_api_requests_total", "API requests by route and status"), &["route", "status"]).unwrap(),
            latency: HistogramVec::new(HistogramOpts::new("streamoasis_api_request_seconds", "API request latency by route"), &["route"]).unwrap(),
        };
        let _ = r.register(Box::new(m.requests.clone()));
        let _ = r.register(Box::new(m.latency.clone()));
        m
    })
}

async fn observe(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let started = Instant::now();
    let r = next.run(req).await;
    let m = http_metrics();
    m.requests.with_label_values(&[&route, r.status().as_str()]).inc();
    m.latency.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    r
}

async fn require_auth(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let h = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match st.auth.check_header(h) {
        Ok(_) => next.run(req).await,
        Err(e) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()).into_response(),
    }
}

/// The router: health, metrics and the OpenAPI document open; everything else behind the JWT.
pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/v1/tag", post(tag))
        .route("/v1/media/{media_id}/tags", get(media_tags))
        .route("/v1/tags/{tag}/media", get(by_tag))
        .route("/v1/media", post(post_media))
        .route("/generate-metadata/{video_id}", get(generate_metadata))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

//! REST: the axum router, its handlers, the health probes and the OpenAPI document (generated
//! from the handlers' annotations below, served at `/openapi.json`). The request and answer
//! types live in [`crate::types`].
//!
//! Every error is an [`ApiError`], answered as
//! `{"error": {"code": "...", "message": "...", "field": "..."}}` with `field` naming the
//! offending request field when there is one (serde's path to the bad value for bodies and
//! query strings, e.g. `items[3].kind`).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use rdkafka::producer::FutureRecord;
use serde::de::DeserializeOwned;
use serde_json::Value;
use streamoasis_pipeline::telemetry::Health;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::types::{
    Accepted, ByTagItem, ByTagQuery, ByTagResponse, ErrorBody, ErrorDetail, GenerateMetadataResponse, MediaBatch, MediaBody, MediaItem, MediaTagsResponse, Metadata, Neighbour,
    NeighboursResponse, RetagResponse, SearchBody, SimilarQuery, TagBody, TagOut, TagResponse, MEDIA_BODY_SHAPE,
};
use crate::validate::{self, FieldError, TagInput};
use crate::ApiState;

// ───────────────────────────── parsing ─────────────────────────────

/// The body's bytes: 413 over the limit.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| if r.status() == StatusCode::PAYLOAD_TOO_LARGE { ApiError::BodyTooLarge } else { ApiError::BadBody(r.body_text()) })
}

/// A failed deserialisation: 400 for malformed JSON, else 422 naming the field at serde's path
/// to the bad value (`body` when the body as a whole has the wrong shape).
fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof | serde_json::error::Category::Io => ApiError::MalformedJson(inner.to_string()),
        serde_json::error::Category::Data => ApiError::InvalidField(FieldError::new(if path == "." { "body".to_string() } else { path }, inner.to_string())),
    }
}

/// Parse a JSON body strictly: 400 for malformed JSON, 422 naming the field for unknown or
/// mistyped fields (required fields are checked by [`validate`], which names them too).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Request bodies are JSON objects: serde would otherwise accept a struct written as an array.
    if matches!(bytes.iter().find(|b| !b.is_ascii_whitespace()), Some(b'[')) {
        return Err(FieldError::new("body", "the body must be a JSON object, not an array").into());
    }
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes)).map_err(json_error)
}

/// The `POST /v1/media` body: a batch when it has an `items` key, else one item. A rejected
/// top-level field is answered with the shape the body takes.
fn parse_media(bytes: &[u8]) -> Result<MediaBody, ApiError> {
    let with_shape = |e: ApiError| match e {
        ApiError::InvalidField(f) if !f.field.contains(['.', '[']) => ApiError::InvalidField(FieldError::new(f.field, format!("{}: {MEDIA_BODY_SHAPE}", f.message))),
        other => other,
    };
    let object: serde_json::Map<String, Value> = parse_json(bytes).map_err(with_shape)?;
    let batch = object.contains_key("items");
    let value = Value::Object(object);
    let body = if batch { serde_path_to_error::deserialize(value).map(MediaBody::Batch) } else { serde_path_to_error::deserialize(value).map(MediaBody::One) };
    body.map_err(|e| with_shape(json_error(e)))
}

/// A query string axum could not deserialise: 400 naming the parameter at serde's path (axum
/// keeps the `serde_path_to_error` error as the rejection's source).
fn query_error(r: QueryRejection) -> ApiError {
    let mut source = std::error::Error::source(&r);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<serde_path_to_error::Error<serde::de::value::Error>>() {
            let path = e.path().to_string();
            let field = if path == "." { "query".to_string() } else { path };
            return ApiError::InvalidQuery(FieldError::new(field, e.inner().to_string()));
        }
        source = e.source();
    }
    ApiError::InvalidQuery(FieldError::new("query", r.body_text()))
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
        (status = 503, description = "The model cannot serve now (out of memory: retry after `Retry-After` seconds; shutting down)", body = ErrorBody),
        (status = 504, description = "Deadline exceeded", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn tag(State(st): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<TagResponse>, ApiError> {
    let b: TagBody = parse_json(&read_body(body)?)?;
    let input = TagInput { title: b.title, description: b.description, transcript: b.transcript, candidate_labels: b.candidate_labels, kind: b.kind, language: b.language };
    Ok(Json(st.tag(input, false).await?))
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
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::not_configured("the database"))?;
    let rec = reader.media(&media_id).await?.ok_or_else(|| not_found(&media_id))?;
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
        taxonomy_version: rec.taxonomy_version,
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no tags stored for '{id}' (not ingested, or not tagged yet)"))
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
    let Query(q) = q.map_err(query_error)?;
    let limit = q.limit.unwrap_or(20);
    if limit == 0 || limit > st.limits.max_page {
        return Err(ApiError::InvalidQuery(FieldError::new("limit", format!("{limit} is out of range: use 1..={}", st.limits.max_page))));
    }
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::not_configured("the database"))?;
    let page = reader.by_tag(&tag, limit, q.page.as_deref().filter(|p| !p.is_empty())).await?;
    Ok(Json(ByTagResponse {
        tag,
        items: page.items.into_iter().map(|i| ByTagItem { media_id: i.media_id, score: i.score, tagged_at: i.tagged_at }).collect(),
        next_page: page.next,
    }))
}

/// Items most like a stored one, by the database's ANN index over the stored embeddings
/// (`tagging.store_embeddings`), itself left out.
#[utoipa::path(get, path = "/v1/media/{media_id}/similar",
    params(("media_id" = String, Path, description = "The item's id"), SimilarQuery),
    responses(
        (status = 200, description = "Most similar first", body = NeighboursResponse),
        (status = 400, description = "Bad k or kind", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No embedding stored for the item", body = ErrorBody),
        (status = 501, description = "The database has no vector search (ANN index); the message names it", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn similar(State(st): State<Arc<ApiState>>, Path(media_id): Path<String>, q: Result<Query<SimilarQuery>, QueryRejection>) -> Result<Json<NeighboursResponse>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let items = st.similar(&media_id, q.k, q.kind.as_deref(), true).await?;
    Ok(Json(NeighboursResponse::new(Some(media_id), items)))
}

/// Items nearest a free text: the text embedded by the tagger's model, then the database's
/// ANN index.
#[utoipa::path(post, path = "/v1/search", request_body = SearchBody,
    responses(
        (status = 200, description = "Most similar first", body = NeighboursResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 501, description = "No vector search in the database, or a tagger without an embedding model", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn search(State(st): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<NeighboursResponse>, ApiError> {
    let b: SearchBody = parse_json(&read_body(body)?)?;
    let items = st.search(&b.text, b.k, b.kind.as_deref()).await?;
    Ok(Json(NeighboursResponse::new(None, items)))
}

/// Tag one stored item again from its stored embedding under the current taxonomy, without the
/// model, and produce the tagged event to the tags topic (the sink updates the row).
#[utoipa::path(post, path = "/v1/media/{media_id}/retag",
    params(("media_id" = String, Path, description = "The item's media id")),
    responses(
        (status = 200, description = "Tagged again and produced", body = RetagResponse),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No embedding stored for the item", body = ErrorBody),
        (status = 409, description = "The stored rows cannot answer: the item needs the model (`needs_model`, the message says how)", body = ErrorBody),
        (status = 503, description = "Database, registry or Kafka unavailable", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn retag(State(st): State<Arc<ApiState>>, Path(media_id): Path<String>) -> Result<Json<RetagResponse>, ApiError> {
    Ok(Json(st.retag(&media_id).await?))
}

/// Enqueue items to the ingest topic (answered once Kafka acknowledged every one). The body is
/// a batch `{"items": [item, ...]}` or one item on its own.
#[utoipa::path(post, path = "/v1/media", request_body = MediaBody,
    responses(
        (status = 202, description = "Enqueued", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`: `items[i].<field>` in a batch, `<field>` for one item); nothing was sent", body = ErrorBody)),
    security(("bearer_jwt" = [])))]
async fn post_media(State(st): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let body = parse_media(&read_body(body)?)?;
    let ingest = &st.ingest;
    let events = match body {
        MediaBody::Batch(b) => validate::media_items(b.items, &st.tagger, &st.limits)?,
        MediaBody::One(item) => vec![validate::media_item(item, &st.tagger, &st.limits)?],
    };
    // Encode all first: a registry failure sends nothing.
    let mut payloads = Vec::with_capacity(events.len());
    for e in &events {
        let p = ingest.codec.encode(&ingest.topic, e).await.map_err(|x| ApiError::unavailable(format!("schema registry: {x}")))?;
        payloads.push(p);
    }
    let sends = events.iter().zip(&payloads).map(|(e, p)| ingest.producer.send(FutureRecord::to(&ingest.topic).key(&e.media_id).payload(p), st.limits.request_timeout));
    for r in futures::future::join_all(sends).await {
        r.map_err(|(x, _)| ApiError::unavailable(format!("kafka: {x}")))?;
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
    let reader = st.reader.as_ref().ok_or_else(|| ApiError::not_configured("the database"))?;
    let rec = reader.media(&video_id).await?.ok_or_else(|| not_found(&video_id))?;
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

/// Liveness from the shared [`Health`]: 503 naming what failed (e.g. the model thread).
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Alive: `ok`"), (status = 503, description = "Not alive: the reason, e.g. `model thread is not running`")))]
async fn healthz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.alive() {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Readiness from the shared [`Health`]: a process that is not alive is not ready either, so a
/// dead model thread takes it out of the load balancer at once.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Ready: `ready`"), (status = 503, description = "Not ready: the reason, e.g. `model thread is not running`")))]
async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.alive().and_then(|()| health.ready()) {
        Ok(()) => (StatusCode::OK, "ready".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// `/healthz` and `/readyz` on `health` (open routes), for a router of any state.
pub fn health_router<S: Clone + Send + Sync + 'static>(health: Arc<Health>) -> Router<S> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(health)
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
    ApiError::NotFound("no such route: see /openapi.json".into())
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
    paths(tag, media_tags, by_tag, similar, search, retag, post_media, generate_metadata, healthz, readyz, metrics),
    components(schemas(ErrorBody, ErrorDetail, TagBody, TagOut, TagResponse, MediaTagsResponse, ByTagItem, ByTagResponse, SearchBody, Neighbour, NeighboursResponse, RetagResponse, MediaBody, MediaBatch, MediaItem, Accepted, GenerateMetadataResponse, Metadata)),
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
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The router: health, metrics and the OpenAPI document open; everything else behind the JWT.
pub fn router(state: Arc<ApiState>) -> Router {
    let protected = Router::new()
        .route("/v1/tag", post(tag))
        .route("/v1/media/{media_id}/tags", get(media_tags))
        .route("/v1/tags/{tag}/media", get(by_tag))
        .route("/v1/media/{media_id}/similar", get(similar))
        .route("/v1/search", post(search))
        .route("/v1/media/{media_id}/retag", post(retag))
        .route("/v1/media", post(post_media))
        .route("/generate-metadata/{video_id}", get(generate_metadata))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .merge(health_router(state.health.clone()))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use streamoasis_tagger::batcher::{Backend, Batch, Batcher, BatcherConfig};

    use super::*;

    /// The kind's code and field, and the message, of a rejected body.
    fn rejected<T: std::fmt::Debug>(r: Result<T, ApiError>) -> (&'static str, Option<String>, String) {
        let e = r.unwrap_err();
        (e.code(), e.field().map(String::from), e.message())
    }

    #[test]
    fn body_errors_name_the_field_at_serdes_path() {
        let tag = |b: &str| rejected(parse_json::<TagBody>(b.as_bytes()));
        assert_eq!(tag(r#"{"title": "x", "colour": "red"}"#).1.as_deref(), Some("colour"));
        assert_eq!(tag(r#"{"title": 5}"#).1.as_deref(), Some("title"));
        assert_eq!(tag(r#"{"title": "x", "candidate_labels": ["a", 7]}"#).1.as_deref(), Some("candidate_labels[1]"));
        assert_eq!(tag(r#"["title"]"#), ("invalid_field", Some("body".into()), "the body must be a JSON object, not an array".into()));
        assert_eq!(tag(r#""title""#).1.as_deref(), Some("body"));
        let (code, field, _) = tag(r#"{"title": "#);
        assert_eq!((code, field), ("malformed_json", None));

        let media = |b: &str| rejected(parse_media(b.as_bytes()));
        assert_eq!(media(r#"{"items": [{"media_id": "a", "title": "x"}, {"media_id": "b", "title": "y", "colour": 1}]}"#).1.as_deref(), Some("items[1].colour"));
        assert_eq!(media(r#"{"items": [{"media_id": "a", "title": 5}]}"#).1.as_deref(), Some("items[0].title"));
        assert_eq!(media(r#"{"items": {"media_id": "a"}}"#).1.as_deref(), Some("items"));
        // A top-level field that fits neither shape: the answer says what shape the body takes.
        let (code, field, message) = media(r#"{"media_id": "a", "title": "x", "colour": "red"}"#);
        assert_eq!((code, field.as_deref()), ("invalid_field", Some("colour")));
        assert!(message.starts_with("unknown field `colour`, expected one of `media_id`, `title`") && message.ends_with(&format!(": {MEDIA_BODY_SHAPE}")), "{message}");
        let (_, field, message) = media(r#"{"items": [], "media_id": "a"}"#);
        assert_eq!(field.as_deref(), Some("media_id"));
        assert_eq!(message, format!("unknown field `media_id`, expected `items`: {MEDIA_BODY_SHAPE}"));
        assert_eq!(media(r#"[{"media_id": "a"}]"#).1.as_deref(), Some("body"));
        assert_eq!(media(r#"{"media_id": "#).0, "malformed_json");
    }

    #[test]
    fn media_body_is_one_item_or_a_batch() {
        match parse_media(br#"{"media_id": "m1", "title": "One", "kind": "CLIP"}"#).unwrap() {
            MediaBody::One(i) => assert_eq!((i.media_id.as_deref(), i.title.as_deref(), i.kind.as_deref()), (Some("m1"), Some("One"), Some("CLIP"))),
            other => panic!("{other:?}"),
        }
        match parse_media(br#"{"items": [{"media_id": "m1", "title": "One"}, {"media_id": "m2", "title": "Two"}]}"#).unwrap() {
            MediaBody::Batch(b) => assert_eq!(b.items.iter().map(|i| i.media_id.as_deref().unwrap()).collect::<Vec<_>>(), ["m1", "m2"]),
            other => panic!("{other:?}"),
        }
        // Required fields are left to the checks, which name them.
        match parse_media(br#"{"title": "no id"}"#).unwrap() {
            MediaBody::One(i) => assert_eq!((i.media_id, i.title.as_deref()), (None, Some("no id"))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_errors_name_the_parameter_at_serdes_path() {
        let q = |s: &str| Query::<ByTagQuery>::try_from_uri(&format!("/v1/tags/sport/media?{s}").parse::<axum::http::Uri>().unwrap()).map(|Query(q)| q);
        for (query, field) in [("limit=abc", "limit"), ("limit=-1", "limit"), ("page=x&limit=1.5", "limit")] {
            let e = query_error(q(query).unwrap_err());
            assert_eq!((e.status(), e.code(), e.field()), (StatusCode::BAD_REQUEST, "invalid_field", Some(field)), "{query}: {e:?}");
        }
        let ok = q("limit=5&page=abc").unwrap();
        assert_eq!((ok.limit, ok.page.as_deref()), (Some(5), Some("abc")));
    }

    /// A model backend whose thread dies as it starts.
    struct DiesOnStart;
    impl Backend for DiesOnStart {
        fn on_start(&mut self) {
            panic!("model thread dies (test)");
        }
        fn forward(&mut self, _: &Batch) -> Result<Vec<Vec<f32>>, streamoasis_tagger::batcher::ForwardError> {
            unreachable!("never started")
        }
    }

    async fn probe(base: &str, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// `/healthz` and `/readyz` answer from the shared `Health` with the model thread's
    /// liveness: 200 while it runs, 503 naming it once it is gone (a real batcher whose model
    /// thread died, no broker needed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_answers_503_naming_a_dead_model_thread() {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let app: Router = health_router(crate::health(move || flag.load(Ordering::SeqCst)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(probe(&base, "/healthz").await, (200, "ok".into()));
        assert_eq!(probe(&base, "/readyz").await, (200, "ready".into()));
        running.store(false, Ordering::SeqCst);
        assert_eq!(probe(&base, "/healthz").await, (503, "model thread is not running".into()));
        assert_eq!(probe(&base, "/readyz").await, (503, "model thread is not running".into()));
        server.abort();

        // The same with a real batcher whose model thread died.
        let batcher = Batcher::spawn(DiesOnStart, BatcherConfig { max_batch_size: 4, max_batch_tokens: 1024, max_wait: Duration::ZERO, queue_capacity: 4 });
        let b = batcher.clone();
        let app: Router = health_router(crate::health(move || b.is_alive()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while batcher.is_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(probe(&base, "/healthz").await, (503, "model thread is not running".into()));
        assert_eq!(probe(&base, "/readyz").await, (503, "model thread is not running".into()));
        server.abort();
    }

    #[test]
    fn openapi_documents_both_media_body_shapes_and_the_health_503() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let body = &doc["paths"]["/v1/media"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/MediaBody", "{body}");
        let shapes = &doc["components"]["schemas"]["MediaBody"]["oneOf"];
        let refs: Vec<&serde_json::Value> = shapes.as_array().map(|a| a.iter().map(|x| &x["$ref"]).collect()).unwrap_or_default();
        assert_eq!(
            refs,
            [&serde_json::json!("#/components/schemas/MediaBatch"), &serde_json::json!("#/components/schemas/MediaItem")],
            "{}",
            doc["components"]["schemas"]["MediaBody"]
        );
        let item = &doc["components"]["schemas"]["MediaItem"];
        assert_eq!(item["required"], serde_json::json!(["media_id", "title"]), "{item}");
        assert_eq!(item["properties"]["media_id"]["type"], "string", "{item}");
        for p in ["/healthz", "/readyz"] {
            assert!(doc["paths"][p]["get"]["responses"]["503"].is_object(), "{p}");
        }
    }
}

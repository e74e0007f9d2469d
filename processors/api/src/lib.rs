//! # streamoasis-api
//!
//! Serving beside the stream: synchronous tagging over REST and gRPC through the same dynamic
//! batcher as the Kafka tagger, the read path over what the sink stored, and enqueueing to the
//! ingest topic. Started by `streamoasis api` (its own model) or `streamoasis tagger
//! --api-addr` (one process, one batcher: API calls and stream events share batches).
//!
//! ## Layout
//! - [`auth`]: bearer JWT (HS256 secret or RS256 JWKS; `exp`, `iss`, `aud`), shared by both.
//! - [`error`]: [`ApiError`], the one error kind; it answers as an HTTP status + JSON body or
//!   as a gRPC `Status`.
//! - [`types`]: the REST request and answer types (and the JSON error body) in one place.
//! - [`rest`]: the axum router, its handlers, health probes and the OpenAPI document it serves.
//! - [`grpc`]: `streamoasis.v1.Tagger` (`Tag`, bidi `TagStream`) and server reflection.
//! - [`validate`]: the checks a tagging request passes before it reaches the batcher, shared
//!   by REST and gRPC so both reject the same input with the same field names.
//! - [`serve`]: binds nothing itself; runs both servers on given listeners until shutdown.
//!
//! ## Limits (every queue bounded)
//! Request bodies are capped ([`Limits::max_body_bytes`], 413 beyond); a tagging request that
//! finds the batcher queue full is answered at once with 429 + `Retry-After` (gRPC:
//! `RESOURCE_EXHAUSTED`) instead of waiting; each tagging call has a deadline
//! ([`Limits::request_timeout`], 504 / `DEADLINE_EXCEEDED`); `TagStream` keeps at most
//! [`Limits::stream_concurrency`] items of one stream in flight (HTTP/2 flow control pushes
//! back on the caller beyond).
//!
//! ## Health
//! `/healthz` and `/readyz` answer from the shared [`Health`] with the model thread registered
//! as a check ([`health`]): once it is gone both answer 503 naming it.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use streamoasis_pipeline::codec::Codec;
use streamoasis_pipeline::telemetry::Health;
use streamoasis_pipeline::topology::Topology;
use streamoasis_pipeline::CancellationToken;
use streamoasis_sink::read::Reader;
use streamoasis_sink::SinkConfig;
use streamoasis_tagger::Tagger;
use tokio::net::TcpListener;

pub mod auth;
pub mod error;
pub mod grpc;
pub mod rest;
pub mod types;
pub mod validate;

/// Generated from `proto/streamoasis/v1/tagger.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("streamoasis.v1");
    /// The encoded descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/streamoasis_descriptor.bin"));
}

pub use auth::Auth;
pub use error::ApiError;

/// Default REST address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// Default gRPC address.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Longest title / description / transcript, in bytes each.
    pub max_text_bytes: usize,
    /// Most items in one `POST /v1/media`.
    pub max_media_items: usize,
    /// Most items one page of `GET /v1/tags/{tag}/media` returns.
    pub max_page: usize,
    /// Deadline of one tagging call (504 / DEADLINE_EXCEEDED beyond).
    pub request_timeout: Duration,
    /// Items of one `TagStream` in flight at once.
    pub stream_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 1 << 20, max_text_bytes: 64 * 1024, max_media_items: 1000, max_page: 1000, request_timeout: Duration::from_secs(30), stream_concurrency: 64 }
    }
}

/// Where `POST /v1/media` sends items.
pub struct Ingest {
    /// The producer (acks awaited before answering 202).
    pub producer: FutureProducer,
    /// Registry-backed Avro codec.
    pub codec: Arc<Codec>,
    /// The ingest topic (the tagger's input).
    pub topic: String,
    /// The tags topic (the tagger's output), where a retag from stored embeddings goes.
    pub tags_topic: Option<String>,
}

/// Everything the handlers share.
pub struct ApiState {
    /// The loaded tagger (its batcher is shared with the stream when run in the tagger).
    pub tagger: Arc<Tagger>,
    /// The read path; `None` answers 503 on the read routes.
    pub reader: Option<Arc<Reader>>,
    /// The ingest producer (`POST /v1/media`).
    pub ingest: Ingest,
    /// Token verification.
    pub auth: Auth,
    /// Request limits.
    pub limits: Limits,
    /// What `/healthz` and `/readyz` answer ([`health`]).
    pub health: Arc<Health>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("auth", &self.auth).field("limits", &self.limits).field("health", &self.health).finish_non_exhaustive()
    }
}

/// Name of the model-thread check in [`Health`] (the 503 answers name it).
pub const MODEL_THREAD: &str = "model thread";

/// The API's [`Health`]: loaded (the state is built after the model), taking requests from the
/// start (the API runs no consumer loop), and alive while `model_alive` says so
/// ([`Tagger::is_alive`] in [`state`]). With the model thread gone, `/healthz` and `/readyz`
/// both answer 503 naming it.
pub fn health(model_alive: impl Fn() -> bool + Send + Sync + 'static) -> Arc<Health> {
    let h = Health::new();
    h.add_check(MODEL_THREAD, model_alive);
    h.set_loaded(true);
    h.set_consuming(true);
    h
}

impl ApiState {
    /// One tagging call as both protocols make it: checked ([`validate::tag_request`]), through
    /// the batcher (`wait` for queue room, or fail at once with [`ApiError::Busy`]) within the
    /// request deadline, answered with the strategy and model that scored it.
    pub async fn tag(&self, input: validate::TagInput, wait: bool) -> Result<types::TagResponse, ApiError> {
        let (req, kind) = validate::tag_request(input, &self.tagger, &self.limits)?;
        let call = async {
            if wait {
                self.tagger.tag(&req).await
            } else {
                self.tagger.try_tag(&req).await
            }
        };
        let r = tokio::time::timeout(self.limits.request_timeout, call).await.map_err(|_| ApiError::Timeout)??;
        let m = self.tagger.model_ref();
        Ok(types::TagResponse {
            tags: r.tags.into_iter().map(|t| types::TagOut { label: t.label, score: t.score }).collect(),
            no_tags_reason: r.no_tags_reason,
            strategy: types::wire_name(&self.tagger.strategy()),
            model: format!("{}@{}", m.name, m.version),
            kind: kind.map(|k| types::wire_name(&k)),
            taxonomy_version: r.taxonomy_version,
        })
    }
}

/// Default neighbours of a similarity answer.
pub const DEFAULT_NEIGHBOURS: usize = 10;

impl ApiState {
    fn reader(&self) -> Result<&Reader, ApiError> {
        self.reader.as_deref().ok_or_else(|| ApiError::not_configured("the database"))
    }

    /// `k` (1..=[`streamoasis_sink::read::MAX_NEIGHBOURS`], default [`DEFAULT_NEIGHBOURS`]) and
    /// the kind filter of a similarity request, checked as both protocols name them.
    fn neighbours_args(k: Option<usize>, kind: Option<&str>, in_query: bool) -> Result<(usize, Option<String>), ApiError> {
        let bad = |e: validate::FieldError| if in_query { ApiError::InvalidQuery(e) } else { ApiError::InvalidField(e) };
        let max = streamoasis_sink::read::MAX_NEIGHBOURS;
        let k = k.unwrap_or(DEFAULT_NEIGHBOURS);
        if k == 0 || k > max {
            return Err(bad(validate::FieldError::new("k", format!("{k} is out of range: use 1..={max}"))));
        }
        let kind = kind.filter(|k| !k.is_empty()).map(|k| validate::kind("kind", k)).transpose().map_err(bad)?;
        Ok((k, kind.map(|k| types::wire_name(&k))))
    }

    /// Items most like a stored one: its pooled embedding's nearest neighbours by the
    /// database's ANN index, itself left out. 404 when no embedding is stored for it; 501 when
    /// the database has no vector search.
    pub async fn similar(&self, media_id: &str, k: Option<usize>, kind: Option<&str>, in_query: bool) -> Result<Vec<streamoasis_sink::read::Neighbour>, ApiError> {
        let (k, kind) = Self::neighbours_args(k, kind, in_query)?;
        let reader = self.reader()?;
        let v = reader.item_vector(media_id).await?.ok_or_else(|| {
            ApiError::NotFound(format!("no embedding stored for '{media_id}': not tagged yet, or tagged while tagging.store_embeddings was off (turn it on and retag)"))
        })?;
        Ok(reader.nearest(&v, k, kind.as_deref(), Some(media_id)).await?)
    }

    /// Items nearest a free text: the text embedded as the tagger embeds an item (its windows,
    /// mean-pooled) through the shared batcher, then the database's ANN index.
    pub async fn search(&self, text: &str, k: Option<usize>, kind: Option<&str>) -> Result<Vec<streamoasis_sink::read::Neighbour>, ApiError> {
        let (k, kind) = Self::neighbours_args(k, kind, false)?;
        if text.trim().is_empty() {
            return Err(ApiError::InvalidField(validate::FieldError::new("text", "is empty: send the words to search for")));
        }
        if text.len() > self.limits.max_text_bytes {
            return Err(ApiError::InvalidField(validate::FieldError::new("text", format!("is {} bytes, over the {} limit", text.len(), self.limits.max_text_bytes))));
        }
        if self.tagger.strategy() != streamoasis_pipeline::events::Strategy::Embedding {
            return Err(ApiError::NotImplemented("search embeds the text with the tagger's model: it needs tagging.strategy: embedding".into()));
        }
        let reader = self.reader()?;
        let embed = self.tagger.embed_document(text);
        let v = tokio::time::timeout(self.limits.request_timeout, embed)
            .await
            .map_err(|_| ApiError::Timeout)?
            .map_err(|e| ApiError::from(streamoasis_tagger::tagger::TagError::Model(e)))?
            .ok_or_else(|| ApiError::InvalidField(validate::FieldError::new("text", "has no words the model reads")))?;
        Ok(reader.nearest(&v, k, kind.as_deref(), None).await?)
    }
}

impl ApiState {
    /// Tag one stored item again from its stored embedding under the current taxonomy (no model
    /// pass over its text) and produce the tagged event to the tags topic, as `streamoasis retag
    /// --from-embeddings` does for every item; the sink updates its row. 404 when no embedding is
    /// stored for it; 409 `needs_model` when the rows cannot answer (another model or windowing,
    /// or only its title and description were read and the taxonomy now needs the body).
    pub async fn retag(&self, media_id: &str) -> Result<types::RetagResponse, ApiError> {
        let reader = self.reader()?;
        let topic = self.ingest.tags_topic.as_deref().ok_or_else(|| ApiError::not_configured("the tags topic (processors.tagger.output)"))?;
        let stored = reader.stored_item(media_id).await?.ok_or_else(|| {
            ApiError::NotFound(format!("no embedding stored for '{media_id}': not tagged yet, or tagged while tagging.store_embeddings was off (turn it on and retag)"))
        })?;
        let e = self.tagger.retag_stored(stored).await?.ok_or_else(|| {
            ApiError::NeedsModel(format!(
                "the stored rows of '{media_id}' cannot answer under the current settings (another model or windowing, or only its title and description \
                 were read and the taxonomy now needs the body): send the item again (POST /v1/media) or run `streamoasis retag --ids {media_id}`"
            ))
        })?;
        let bytes = self.ingest.codec.encode(topic, &e).await.map_err(|x| ApiError::unavailable(format!("schema registry: {x}")))?;
        let record = rdkafka::producer::FutureRecord::to(topic).key(&e.media_id).payload(&bytes);
        self.ingest.producer.send(record, self.limits.request_timeout).await.map_err(|(x, _)| ApiError::unavailable(format!("kafka: {x}")))?;
        Ok(types::RetagResponse {
            media_id: e.media_id,
            tags: e.tags.into_iter().map(|t| types::TagOut { label: t.label, score: t.score }).collect(),
            no_tags_reason: e.no_tags_reason,
            model: format!("{}@{}", e.model.name, e.model.version),
            taxonomy_version: e.taxonomy_version.unwrap_or_default(),
            topic: topic.to_string(),
        })
    }
}

/// Where the services are (every command and test fills this the same way; defaults in
/// `streamoasis_pipeline::env`).
#[derive(Debug, Clone)]
pub struct Connections {
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// Schema registry base URL.
    pub registry: String,
    /// CQL contact points; `None`: no read path (those routes answer 503).
    pub scylla: Option<String>,
}

/// Build the handlers' state from the topology: the read path on the sink's keyspace, the
/// producer to the tagger's input topic, the given tagger, auth and limits.
pub async fn state(conn: &Connections, topo: &Topology, tagger: Arc<Tagger>, auth: Auth, limits: Limits) -> anyhow::Result<ApiState> {
    let reader = match &conn.scylla {
        Some(uri) => {
            let cfg = SinkConfig::from_topology(topo)?;
            let session = Arc::new(streamoasis_sink::connect(uri, &cfg).await?);
            Some(Arc::new(Reader::new(session, &cfg.keyspace).await?))
        }
        None => None,
    };
    let ingest = Ingest {
        producer: streamoasis_pipeline::kafka::producer(&conn.kafka, &topo.file.kafka.client)?,
        codec: Arc::new(Codec::new(&conn.registry)?),
        topic: topo.file.processors.tagger.input.clone(),
        tags_topic: topo.file.processors.tagger.output.clone(),
    };
    let alive = tagger.clone();
    let health = health(move || alive.is_alive());
    Ok(ApiState { tagger, reader, ingest, auth, limits, health })
}

/// The two listeners (bind with port 0 in tests and read `local_addr`).
#[derive(Debug)]
pub struct Listeners {
    /// REST.
    pub http: TcpListener,
    /// gRPC.
    pub grpc: TcpListener,
}

impl Listeners {
    /// Bind both addresses; the error names the address that is taken.
    pub async fn bind(http: &str, grpc: &str) -> anyhow::Result<Listeners> {
        let h = TcpListener::bind(http).await.map_err(|e| anyhow::anyhow!("cannot listen on --addr {http}: {e}"))?;
        let g = TcpListener::bind(grpc).await.map_err(|e| anyhow::anyhow!("cannot listen on --grpc-addr {grpc}: {e}"))?;
        Ok(Listeners { http: h, grpc: g })
    }
}

/// Run the REST and gRPC servers until `shutdown`, then finish in-flight requests.
pub async fn serve(listeners: Listeners, state: Arc<ApiState>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    tracing::info!(%http_addr, %grpc_addr, auth = state.auth.enabled(), "api serving");
    let app = rest::router(state.clone());
    let s1 = shutdown.clone();
    let http = async move { axum::serve(listeners.http, app).with_graceful_shutdown(async move { s1.cancelled().await }).await.map_err(anyhow::Error::from) };
    let s2 = shutdown.clone();
    let grpc = grpc::serve(listeners.grpc, state, async move { s2.cancelled().await });
    let (a, b) = tokio::join!(http, grpc);
    a?;
    b?;
    Ok(())
}

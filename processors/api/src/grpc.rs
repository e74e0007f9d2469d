//! gRPC: `streamoasis.v1.Tagger` (`Tag`, bidirectional `TagStream`) on the shared batcher,
//! `Similar` and `Search` on the read path, `Retag` from a stored embedding,
//! the same JWT in the `authorization` metadata, and server reflection (v1) so `grpcurl`
//! and similar tools discover the service.
//!
//! Status codes come from [`ApiError`] (its table): `UNAUTHENTICATED` (token),
//! `INVALID_ARGUMENT` ("field: reason"), `RESOURCE_EXHAUSTED` (queue full on `Tag`; retry),
//! `DEADLINE_EXCEEDED`, `UNAVAILABLE`, `INTERNAL`.
//! `TagStream` waits for queue room instead (flow control pushes back on the caller), answers
//! every request in order, and reports a rejected item in that response's `error` without
//! ending the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ApiError;
use crate::proto::tagger_server::{Tagger as TaggerRpc, TaggerServer};
use crate::proto::{Neighbour, NeighboursResponse, RetagRequest, RetagResponse, SearchRequest, SimilarRequest, Tag, TagRequest, TagResponse};
use crate::validate::TagInput;
use crate::ApiState;

/// The service implementation.
#[derive(Debug, Clone)]
pub struct TaggerService {
    state: Arc<ApiState>,
}

impl TaggerService {
    /// Serve `state`.
    pub fn new(state: Arc<ApiState>) -> Self {
        TaggerService { state }
    }
}

/// Validate and tag (failing fast on a full queue unless `wait`), through the same call as
/// REST ([`ApiState::tag`]); errors are [`ApiError`]s, answered as `Status` by the caller.
async fn tag_one(state: &ApiState, r: TagRequest, wait: bool) -> Result<TagResponse, ApiError> {
    let input = TagInput {
        title: r.title,
        description: r.description,
        transcript: r.transcript,
        candidate_labels: if r.candidate_labels.is_empty() { None } else { Some(r.candidate_labels) },
        kind: r.kind,
        language: r.language,
    };
    let res = state.tag(input, wait).await?;
    Ok(TagResponse {
        tags: res.tags.into_iter().map(|t| Tag { label: t.label, score: t.score }).collect(),
        no_tags_reason: res.no_tags_reason,
        strategy: res.strategy,
        model: res.model,
        request_id: r.request_id,
        error: None,
    })
}

type TagStreamOut = Pin<Box<dyn Stream<Item = Result<TagResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TaggerRpc for TaggerService {
    async fn tag(&self, request: Request<TagRequest>) -> Result<Response<TagResponse>, Status> {
        tag_one(&self.state, request.into_inner(), false).await.map(Response::new).map_err(Status::from)
    }

    type TagStreamStream = TagStreamOut;

    async fn tag_stream(&self, request: Request<Streaming<TagRequest>>) -> Result<Response<Self::TagStreamStream>, Status> {
        let state = self.state.clone();
        let inbound = request.into_inner();
        let out = inbound
            .map(move |item| {
                let state = state.clone();
                async move {
                    let r = item?;
                    let id = r.request_id.clone();
                    match tag_one(&state, r, true).await {
                        Ok(resp) => Ok(resp),
                        // A rejected item is answered in its response; the stream goes on.
                        Err(e @ ApiError::InvalidField(_)) => {
                            Ok(TagResponse { tags: vec![], no_tags_reason: None, strategy: String::new(), model: String::new(), request_id: id, error: Some(e.to_string()) })
                        }
                        Err(e) => Err(Status::from(e)),
                    }
                }
            })
            .buffered(self.state.limits.stream_concurrency.max(1));
        Ok(Response::new(Box::pin(out)))
    }

    async fn similar(&self, request: Request<SimilarRequest>) -> Result<Response<NeighboursResponse>, Status> {
        let r = request.into_inner();
        let items = self.state.similar(&r.media_id, nonzero(r.k), r.kind.as_deref(), false).await?;
        Ok(Response::new(neighbours(items)))
    }

    async fn search(&self, request: Request<SearchRequest>) -> Result<Response<NeighboursResponse>, Status> {
        let r = request.into_inner();
        let items = self.state.search(&r.text, nonzero(r.k), r.kind.as_deref()).await?;
        Ok(Response::new(neighbours(items)))
    }

    async fn retag(&self, request: Request<RetagRequest>) -> Result<Response<RetagResponse>, Status> {
        let r = self.state.retag(&request.into_inner().media_id).await?;
        Ok(Response::new(RetagResponse {
            media_id: r.media_id,
            tags: r.tags.into_iter().map(|t| Tag { label: t.label, score: t.score }).collect(),
            no_tags_reason: r.no_tags_reason,
            model: r.model,
            taxonomy_version: r.taxonomy_version,
            topic: r.topic,
        }))
    }
}

/// proto3's 0 means "not set" (the default).
fn nonzero(k: u32) -> Option<usize> {
    (k != 0).then_some(k as usize)
}

fn neighbours(items: Vec<streamoasis_sink::read::Neighbour>) -> NeighboursResponse {
    NeighboursResponse { items: items.into_iter().map(|n| Neighbour { media_id: n.media_id, kind: n.kind, title: n.title, similarity: n.similarity }).collect() }
}

/// Check the bearer token in the call metadata.
#[allow(clippy::result_large_err)]
fn check(state: &ApiState, req: Request<()>) -> Result<Request<()>, Status> {
    let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    state.auth.check_header(h).map_err(|e| Status::from(ApiError::from(e)))?;
    Ok(req)
}

/// Serve the service and reflection on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, state: Arc<ApiState>, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET).build_v1()?;
    let auth_state = state.clone();
    let server = TaggerServer::new(TaggerService::new(state.clone())).max_decoding_message_size(state.limits.max_body_bytes);
    let svc = tonic::service::interceptor::InterceptedService::new(server, move |req| check(&auth_state, req));
    tonic::transport::Server::builder()
        .add_service(svc)
        .add_service(reflection)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

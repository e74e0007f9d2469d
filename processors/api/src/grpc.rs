//! gRPC: `streamoasis.v1.Tagger` (`Tag`, bidirectional `TagStream`) on the shared batcher,
//! the same JWT in the `authorization` metadata, and server reflection (v1) so `grpcurl`
//! and similar tools discover the service.
//!
//! Status codes: `UNAUTHENTICATED` (token), `INVALID_ARGUMENT` ("field: reason"),
//! `RESOURCE_EXHAUSTED` (queue full on `Tag`; retry), `DEADLINE_EXCEEDED`, `UNAVAILABLE`.
//! `TagStream` waits for queue room instead (flow control pushes back on the caller), answers
//! every request in order, and reports a rejected item in that response's `error` without
//! ending the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use streamoasis_tagger::batcher::BatchError;
use streamoasis_tagger::tagger::TagError;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::tagger_server::{Tagger as TaggerRpc, TaggerServer};
use crate::proto::{Tag, TagRequest, TagResponse};
use crate::validate::{self, TagInput};
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

fn tag_status(e: TagError) -> Status {
    match e {
        TagError::InvalidLabels(m) => Status::invalid_argument(format!("candidate_labels: {m}")),
        TagError::Model(BatchError::QueueFull) => Status::resource_exhausted("the tagging queue is full: retry with backoff"),
        TagError::Model(BatchError::Overloaded(m)) => Status::unavailable(format!("the model is out of memory ({m}): retry later")),
        TagError::Model(BatchError::Stopped) => Status::unavailable("the model is shutting down"),
        TagError::Model(BatchError::Model(m)) => Status::internal(format!("model error: {m}")),
    }
}

/// Validate, tag (failing fast on a full queue when `fail_fast`), answer.
async fn tag_one(state: &ApiState, r: TagRequest, fail_fast: bool) -> Result<TagResponse, Status> {
    let input = TagInput {
        title: r.title,
        description: r.description,
        transcript: r.transcript,
        candidate_labels: if r.candidate_labels.is_empty() { None } else { Some(r.candidate_labels) },
        kind: r.kind,
        language: r.language,
    };
    let (req, _kind) = validate::tag_request(input, &state.tagger, &state.limits).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let fut = async {
        if fail_fast {
            state.tagger.try_tag(&req).await
        } else {
            state.tagger.tag(&req).await
        }
    };
    let res = tokio::time::timeout(state.limits.request_timeout, fut)
        .await
        .map_err(|_| Status::deadline_exceeded("tagging took longer than the request deadline"))?
        .map_err(tag_status)?;
    let m = state.tagger.model_ref();
    Ok(TagResponse {
        tags: res.tags.into_iter().map(|t| Tag { label: t.label, score: t.score }).collect(),
        no_tags_reason: res.no_tags_reason,
        strategy: format!("{:?}", state.tagger.strategy()).to_uppercase(),
        model: format!("{}@{}", m.name, m.version),
        request_id: r.request_id,
        error: None,
    })
}

type TagStreamOut = Pin<Box<dyn Stream<Item = Result<TagResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl TaggerRpc for TaggerService {
    async fn tag(&self, request: Request<TagRequest>) -> Result<Response<TagResponse>, Status> {
        tag_one(&self.state, request.into_inner(), true).await.map(Response::new)
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
                    match tag_one(&state, r, false).await {
                        Ok(resp) => Ok(resp),
                        Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(TagResponse {
                            tags: vec![],
                            no_tags_reason: None,
                            strategy: String::new(),
                            model: String::new(),
                            request_id: id,
                            error: Some(s.message().to_string()),
                        }),
                        Err(s) => Err(s),
                    }
                }
            })
            .buffered(self.state.limits.stream_concurrency.max(1));
        Ok(Response::new(Box::pin(out)))
    }
}

/// Check the bearer token in the call metadata.
#[allow(clippy::result_large_err)]
fn check(state: &ApiState, req: Request<()>) -> Result<Request<()>, Status> {
    let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    state.auth.check_header(h).map_err(|e| Status::unauthenticated(e.to_string()))?;
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

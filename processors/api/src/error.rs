//! One error kind for both protocols. Every failure a handler answers is an [`ApiError`]; it
//! becomes an HTTP answer ([`IntoResponse`]: status, the JSON [`ErrorBody`], `Retry-After`,
//! `WWW-Authenticate`) or a gRPC [`Status`] (`From<ApiError>`), so REST and gRPC map the same
//! failure to the same meaning.
//!
//! | kind | `code` | HTTP | gRPC |
//! |---|---|---|---|
//! | [`ApiError::Unauthorized`] | `unauthorized` | 401 + `WWW-Authenticate: Bearer` | `UNAUTHENTICATED` |
//! | [`ApiError::MalformedJson`] | `malformed_json` | 400 | `INVALID_ARGUMENT` |
//! | [`ApiError::BadBody`] | `bad_body` | 400 | `INVALID_ARGUMENT` |
//! | [`ApiError::InvalidField`] | `invalid_field` | 422 | `INVALID_ARGUMENT` ("field: reason") |
//! | [`ApiError::InvalidQuery`] | `invalid_field` | 400 | `INVALID_ARGUMENT` ("field: reason") |
//! | [`ApiError::BodyTooLarge`] | `body_too_large` | 413 | `RESOURCE_EXHAUSTED` |
//! | [`ApiError::Busy`] | `busy` | 429 + `Retry-After` | `RESOURCE_EXHAUSTED` |
//! | [`ApiError::Timeout`] | `timeout` | 504 | `DEADLINE_EXCEEDED` |
//! | [`ApiError::NotFound`] | `not_found` | 404 | `NOT_FOUND` |
//! | [`ApiError::Unavailable`] | `unavailable` | 503 (+ `Retry-After` when known) | `UNAVAILABLE` |
//! | [`ApiError::NeedsModel`] | `needs_model` | 409 | `FAILED_PRECONDITION` |
//! | [`ApiError::NotImplemented`] | `not_implemented` | 501 | `UNIMPLEMENTED` |
//! | [`ApiError::Internal`] | `internal` | 500 | `INTERNAL` |

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use streamoasis_sink::read::ReadError;
use streamoasis_tagger::batcher::BatchError;
use streamoasis_tagger::tagger::TagError;
use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::types::{ErrorBody, ErrorDetail};
use crate::validate::FieldError;

/// Seconds a caller waits before retrying a full tagging queue.
pub const BUSY_RETRY_AFTER_S: u64 = 1;
/// Seconds a caller waits before retrying after the model ran out of memory.
pub const OVERLOADED_RETRY_AFTER_S: u64 = 5;

/// Why a request failed, as both protocols answer it (see the module table).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The bearer token is missing or does not verify.
    #[error("{0}")]
    Unauthorized(String),
    /// The body is not JSON (syntax error or cut short).
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body could not be read.
    #[error("{0}")]
    BadBody(String),
    /// A body or message field is invalid: it is named, with the fix.
    #[error(transparent)]
    InvalidField(FieldError),
    /// A query parameter is invalid: it is named, with the fix.
    #[error(transparent)]
    InvalidQuery(FieldError),
    /// The body is over the size limit.
    #[error("request body exceeds the limit: send fewer or shorter items")]
    BodyTooLarge,
    /// The tagging queue is full: retry after `retry_after` seconds.
    #[error("the tagging queue is full: retry in {retry_after} s")]
    Busy {
        /// Seconds to wait (`Retry-After`).
        retry_after: u64,
    },
    /// The request deadline passed.
    #[error("tagging took longer than the request deadline")]
    Timeout,
    /// No such item or route.
    #[error("{0}")]
    NotFound(String),
    /// A dependency (model, database, registry, Kafka) cannot serve now.
    #[error("{message}")]
    Unavailable {
        /// What is unavailable and why.
        message: String,
        /// Seconds to wait, when known (`Retry-After`).
        retry_after: Option<u64>,
    },
    /// A retag from stored embeddings the rows cannot answer: the item must go through the
    /// model (the message says how).
    #[error("{0}")]
    NeedsModel(String),
    /// A capability the deployment lacks (named, with what provides it).
    #[error("{0}")]
    NotImplemented(String),
    /// A failure of this service.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A dependency this process runs without (`what` is not configured).
    pub fn not_configured(what: &str) -> Self {
        ApiError::Unavailable { message: format!("{what} is not configured in this process"), retry_after: None }
    }

    /// A dependency that failed now, with no known retry delay.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::Unavailable { message: message.into(), retry_after: None }
    }

    /// The stable `code` of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadBody(_) => "bad_body",
            ApiError::InvalidField(_) | ApiError::InvalidQuery(_) => "invalid_field",
            ApiError::BodyTooLarge => "body_too_large",
            ApiError::Busy { .. } => "busy",
            ApiError::Timeout => "timeout",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::NeedsModel(_) => "needs_model",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::MalformedJson(_) | ApiError::BadBody(_) | ApiError::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NeedsModel(_) => StatusCode::CONFLICT,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(&self) -> Code {
        match self {
            ApiError::Unauthorized(_) => Code::Unauthenticated,
            ApiError::MalformedJson(_) | ApiError::BadBody(_) | ApiError::InvalidField(_) | ApiError::InvalidQuery(_) => Code::InvalidArgument,
            ApiError::BodyTooLarge | ApiError::Busy { .. } => Code::ResourceExhausted,
            ApiError::Timeout => Code::DeadlineExceeded,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::NeedsModel(_) => Code::FailedPrecondition,
            ApiError::NotImplemented(_) => Code::Unimplemented,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The request field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidField(f) | ApiError::InvalidQuery(f) => Some(&f.field),
            _ => None,
        }
    }

    /// The message of the JSON body (the field is given apart, in `field`).
    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidField(f) | ApiError::InvalidQuery(f) => f.message.clone(),
            other => other.to_string(),
        }
    }

    /// Seconds the caller should wait before retrying, when known.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Busy { retry_after } => Some(*retry_after),
            ApiError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.message(), field: self.field().map(String::from) } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), Json(self.body())).into_response();
        if let Some(s) = self.retry_after() {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let ApiError::Unauthorized(_) = self {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The gRPC answer: the code from the table, the message with the field in front
/// (`"field: reason"`) when there is one.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        Status::new(e.grpc_code(), e.to_string())
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::InvalidField(e)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(e.to_string())
    }
}

impl From<TagError> for ApiError {
    fn from(e: TagError) -> Self {
        match e {
            TagError::InvalidLabels(m) => ApiError::InvalidField(FieldError::new("candidate_labels", m)),
            TagError::Model(BatchError::QueueFull) => ApiError::Busy { retry_after: BUSY_RETRY_AFTER_S },
            TagError::Model(BatchError::Overloaded(m)) => {
                ApiError::Unavailable { message: format!("the model is out of memory ({m}): retry later"), retry_after: Some(OVERLOADED_RETRY_AFTER_S) }
            }
            TagError::Model(BatchError::Stopped) => ApiError::unavailable("the model is shutting down"),
            TagError::Model(BatchError::Model(m)) => ApiError::Internal(format!("model error: {m}")),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::BadPageToken(why) => {
                ApiError::InvalidQuery(FieldError::new("page", format!("not a page token issued by this service ({why}): pass the previous page's `next_page`")))
            }
            ReadError::Db(m) => ApiError::unavailable(format!("database: {m}")),
            ReadError::Unsupported(m) => ApiError::NotImplemented(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status, headers and JSON body of the HTTP answer.
    fn http(e: ApiError) -> (StatusCode, Option<String>, Option<String>, serde_json::Value) {
        let r = e.into_response();
        let get = |name: header::HeaderName| r.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let (retry, www) = (get(header::RETRY_AFTER), get(header::WWW_AUTHENTICATE));
        let status = r.status();
        let bytes = futures::executor::block_on(axum::body::to_bytes(r.into_body(), 1 << 16)).unwrap();
        (status, retry, www, serde_json::from_slice(&bytes).unwrap())
    }

    fn body(code: &str, message: &str, field: Option<&str>) -> serde_json::Value {
        match field {
            Some(f) => serde_json::json!({"error": {"code": code, "message": message, "field": f}}),
            None => serde_json::json!({"error": {"code": code, "message": message}}),
        }
    }

    /// Every kind: its HTTP answer (status, `Retry-After`, `WWW-Authenticate`, body) and its
    /// gRPC status (code, message).
    #[test]
    fn every_kind_maps_to_http_and_grpc() {
        let field = |f: &str, m: &str| FieldError::new(f, m);
        /// The error, its HTTP status, Retry-After, WWW-Authenticate, JSON body, gRPC code and message.
        type Case<'a> = (ApiError, StatusCode, Option<&'a str>, Option<&'a str>, serde_json::Value, Code, &'a str);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (ApiError::Unauthorized("missing bearer token".into()), StatusCode::UNAUTHORIZED, None, Some("Bearer"),
                body("unauthorized", "missing bearer token", None), Code::Unauthenticated, "missing bearer token"),
            (ApiError::MalformedJson("EOF while parsing".into()), StatusCode::BAD_REQUEST, None, None,
                body("malformed_json", "the body is not valid JSON: EOF while parsing", None), Code::InvalidArgument, "the body is not valid JSON: EOF while parsing"),
            (ApiError::BadBody("cannot read the body".into()), StatusCode::BAD_REQUEST, None, None,
                body("bad_body", "cannot read the body", None), Code::InvalidArgument, "cannot read the body"),
            (ApiError::InvalidField(field("items[2].kind", "unknown kind 'X'")), StatusCode::UNPROCESSABLE_ENTITY, None, None,
                body("invalid_field", "unknown kind 'X'", Some("items[2].kind")), Code::InvalidArgument, "items[2].kind: unknown kind 'X'"),
            (ApiError::InvalidQuery(field("limit", "0 is out of range")), StatusCode::BAD_REQUEST, None, None,
                body("invalid_field", "0 is out of range", Some("limit")), Code::InvalidArgument, "limit: 0 is out of range"),
            (ApiError::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE, None, None,
                body("body_too_large", "request body exceeds the limit: send fewer or shorter items", None), Code::ResourceExhausted, "request body exceeds the limit: send fewer or shorter items"),
            (ApiError::Busy { retry_after: 1 }, StatusCode::TOO_MANY_REQUESTS, Some("1"), None,
                body("busy", "the tagging queue is full: retry in 1 s", None), Code::ResourceExhausted, "the tagging queue is full: retry in 1 s"),
            (ApiError::Timeout, StatusCode::GATEWAY_TIMEOUT, None, None,
                body("timeout", "tagging took longer than the request deadline", None), Code::DeadlineExceeded, "tagging took longer than the request deadline"),
            (ApiError::NotFound("no tags stored for 'x'".into()), StatusCode::NOT_FOUND, None, None,
                body("not_found", "no tags stored for 'x'", None), Code::NotFound, "no tags stored for 'x'"),
            (ApiError::Unavailable { message: "out of memory".into(), retry_after: Some(5) }, StatusCode::SERVICE_UNAVAILABLE, Some("5"), None,
                body("unavailable", "out of memory", None), Code::Unavailable, "out of memory"),
            (ApiError::not_configured("the database"), StatusCode::SERVICE_UNAVAILABLE, None, None,
                body("unavailable", "the database is not configured in this process", None), Code::Unavailable, "the database is not configured in this process"),
            (ApiError::Internal("model error: nan".into()), StatusCode::INTERNAL_SERVER_ERROR, None, None,
                body("internal", "model error: nan", None), Code::Internal, "model error: nan"),
        ];
        for (e, status, retry, www, json, code, message) in cases {
            let what = format!("{e:?}");
            let s = Status::from(e.clone());
            assert_eq!((s.code(), s.message()), (code, message), "gRPC {what}");
            assert_eq!(http(e), (status, retry.map(String::from), www.map(String::from), json), "HTTP {what}");
        }
    }

    /// The library errors land on the kinds the table promises.
    #[test]
    fn tagger_read_and_auth_errors_map_to_their_kinds() {
        let cases: Vec<(ApiError, StatusCode, Code, &str, Option<&str>)> = vec![
            (
                TagError::InvalidLabels("blank label".into()).into(),
                StatusCode::UNPROCESSABLE_ENTITY,
                Code::InvalidArgument,
                "candidate_labels: blank label",
                Some("candidate_labels"),
            ),
            (TagError::Model(BatchError::QueueFull).into(), StatusCode::TOO_MANY_REQUESTS, Code::ResourceExhausted, "the tagging queue is full: retry in 1 s", None),
            (
                TagError::Model(BatchError::Overloaded("CUDA".into())).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "the model is out of memory (CUDA): retry later",
                None,
            ),
            (TagError::Model(BatchError::Stopped).into(), StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "the model is shutting down", None),
            (TagError::Model(BatchError::Model("shape".into())).into(), StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, "model error: shape", None),
            (
                ReadError::BadPageToken("zzz".into()).into(),
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "page: not a page token issued by this service (zzz): pass the previous page's `next_page`",
                Some("page"),
            ),
            (ReadError::Db("timeout".into()).into(), StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, "database: timeout", None),
            (AuthError::Missing.into(), StatusCode::UNAUTHORIZED, Code::Unauthenticated, "missing bearer token: send `Authorization: Bearer <JWT>`", None),
        ];
        for (e, status, code, grpc_message, field) in cases {
            assert_eq!((e.status(), e.grpc_code(), e.to_string().as_str(), e.field()), (status, code, grpc_message, field), "{e:?}");
        }
        let busy: ApiError = TagError::Model(BatchError::QueueFull).into();
        assert_eq!(busy.retry_after(), Some(BUSY_RETRY_AFTER_S));
        let oom: ApiError = TagError::Model(BatchError::Overloaded("x".into())).into();
        assert_eq!(oom.retry_after(), Some(OVERLOADED_RETRY_AFTER_S));
    }
}

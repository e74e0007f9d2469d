//! Avro in the Confluent framing (magic byte 0, big-endian 4-byte schema id, Avro binary),
//! through a Confluent-compatible schema registry.
//!
//! Decoding resolves the writer schema (fetched by id, cached) against the reader schema in
//! `schemas/` — real Avro schema resolution, so producers may evolve compatibly. Encoding uses
//! the latest schema registered under the topic's subject (TopicNameStrategy, `<topic>-value`).
//! Errors say whether the record is poison (→ DLQ) or the registry is unavailable (→ retry).

use std::time::Duration;

use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};

use crate::events::{avro, Event};

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonKind {
    /// The record has no value.
    EmptyPayload,
    /// Not in the Confluent framing (magic byte 0 + schema id).
    BadFraming,
    /// The registry does not know the schema id.
    UnknownSchemaId,
    /// The bytes do not decode with the writer schema, or the writer schema cannot be resolved
    /// against our reader schema.
    Undecodable,
    /// Decoded, but a field is missing or has an invalid value.
    InvalidField,
}

impl PoisonKind {
    /// Stable name used in DLQ headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonKind::EmptyPayload => "empty_payload",
            PoisonKind::BadFraming => "bad_framing",
            PoisonKind::UnknownSchemaId => "unknown_schema_id",
            PoisonKind::Undecodable => "undecodable",
            PoisonKind::InvalidField => "invalid_field",
        }
    }
}

/// A codec failure, typed by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record itself is bad: send it to the dead-letter topic.
    #[error("{}: {message}", kind.as_str())]
    Poison { kind: PoisonKind, message: String, schema_id: Option<u32> },
    /// The registry could not be reached or answered 5xx: retry with backoff.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// Our own data does not fit the registered schema (a deployment error): stop.
    #[error("cannot encode with the registered schema: {0}")]
    Incompatible(String),
}

/// A decoded event and the writer schema id it came with.
#[derive(Debug)]
pub struct Decoded<E> {
    pub event: E,
    pub schema_id: u32,
}

/// Registry-backed Avro codec. Cheap to share behind an `Arc`; schemas are cached by id and
/// by subject.
pub struct Codec {
    url: String,
    settings: SrSettings,
    decoder: AvroDecoder,
    encoder: AvroEncoder,
    http: reqwest::Client,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("url", &self.url).finish()
    }
}

/// Environment variable with registry credentials, `user:password` (Confluent's
/// `basic.auth.user.info`; for Confluent Cloud: API key and secret).
pub const REGISTRY_AUTH_ENV: &str = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO";

fn credentials() -> Option<(String, Option<String>)> {
    let v = std::env::var(REGISTRY_AUTH_ENV).ok().filter(|v| !v.is_empty())?;
    Some(match v.split_once(':') {
        Some((u, p)) => (u.to_string(), Some(p.to_string())),
        None => (v, None),
    })
}

fn settings(url: &str) -> Result<SrSettings, CodecError> {
    let mut b = SrSettings::new_builder(url.trim_end_matches('/').to_string());
    b.set_timeout(Duration::from_secs(10));
    if let Some((user, pass)) = credentials() {
        b.set_basic_authorization(&user, pass.as_deref());
    }
    b.build().map_err(|e| CodecError::Incompatible(format!("bad SCHEMA_REGISTRY_URL '{url}': {e}")))
}

impl Codec {
    /// A codec for the registry at `url` (Confluent API base, e.g.
    /// `http://127.0.0.1:8081/apis/ccompat/v7`).
    pub fn new(url: &str) -> Result<Self, CodecError> {
        Ok(Codec {
            url: url.trim_end_matches('/').to_string(),
            settings: settings(url)?,
            decoder: AvroDecoder::new(settings(url)?),
            encoder: AvroEncoder::new(settings(url)?),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| CodecError::Unavailable(e.to_string()))?,
        })
    }

    /// The registry base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Decode a framed record into `E`, resolving the writer schema against `E`'s schema.
    pub async fn decode<E: Event>(&self, payload: Option<&[u8]>) -> Result<Decoded<E>, CodecError> {
        let poison = |kind, message: String, schema_id| CodecError::Poison { kind, message, schema_id };
        let bytes = match payload {
            None | Some([]) => return Err(poison(PoisonKind::EmptyPayload, "record has no value".into(), None)),
            Some(b) => b,
        };
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(poison(
                PoisonKind::BadFraming,
                format!(
                    "expected the Confluent framing (magic byte 0 then a 4-byte schema id); got {} bytes starting {:02x?}",
                    bytes.len(),
                    &bytes[..bytes.len().min(5)]
                ),
                None,
            ));
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let writer = match self.decoder.get_schema(id).await {
            Ok(s) => s,
            Err(e) if e.retriable => {
                self.decoder.remove_errors_from_cache();
                return Err(CodecError::Unavailable(e.to_string()));
            }
            Err(e) => {
                self.decoder.remove_errors_from_cache();
                return Err(poison(PoisonKind::UnknownSchemaId, format!("schema id {id}: {}", e.error), Some(id)));
            }
        };
        let mut body = &bytes[5..];
        // The one-call form resolves writer against reader schema; its builder replacement adds nothing here.
        #[allow(deprecated)]
        let value = apache_avro::from_avro_datum(&writer.parsed, &mut body, Some(E::schema()))
            .map_err(|e| poison(PoisonKind::Undecodable, e.to_string(), Some(id)))?;
        let event = avro::from_value::<E>(value).map_err(|e| poison(PoisonKind::InvalidField, e.to_string(), Some(id)))?;
        Ok(Decoded { event, schema_id: id })
    }

    /// Encode `event` with the latest schema registered under `<topic>-value`.
    pub async fn encode<E: Event>(&self, topic: &str, event: &E) -> Result<Vec<u8>, CodecError> {
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
        self.encoder.encode_struct(event, &strategy).await.map_err(|e| {
            if e.retriable {
                self.encoder.remove_errors_from_cache();
                CodecError::Unavailable(e.to_string())
            } else {
                self.encoder.remove_errors_from_cache();
                CodecError::Incompatible(format!("subject {topic}-value: {e}"))
            }
        })
    }

    /// Set the subject's compatibility level (e.g. `BACKWARD`) and register `avsc` under it.
    /// Idempotent: registering an identical schema returns the existing id.
    pub async fn register(&self, subject: &str, avsc: &str, compatibility: &str) -> Result<u32, CodecError> {
        let url = format!("{}/config/{}", self.url, subject);
        let mut req = self.http.put(&url).json(&serde_json::json!({ "compatibility": compatibility }));
        if let Some((user, pass)) = credentials() {
            req = req.basic_auth(user, pass);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CodecError::Unavailable(format!("PUT {url}: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(CodecError::Unavailable(format!("PUT {url}: {status} {body}")));
        }
        let schema = SuppliedSchema::new(None, SchemaType::Avro, avsc.to_string());
        post_schema(&self.settings, subject.to_string(), schema)
            .await
            .map(|r| r.id)
            .map_err(|e: SRCError| {
                if e.retriable {
                    CodecError::Unavailable(e.to_string())
                } else {
                    CodecError::Incompatible(format!("registering {subject}: {e}"))
                }
            })
    }

    /// Frame an Avro datum of `E` with a given schema id (tools and tests).
    pub fn frame<E: Event>(schema_id: u32, event: &E) -> Result<Vec<u8>, apache_avro::Error> {
        let mut out = vec![0u8];
        out.extend_from_slice(&schema_id.to_be_bytes());
        out.extend(avro::to_datum(event)?);
        Ok(out)
    }
}

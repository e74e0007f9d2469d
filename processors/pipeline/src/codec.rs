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

use crate::error::{limits, ErrorKind};
use crate::events::{avro, Event};
use crate::secret::{self, Secret};
use crate::topology::ConfigError;

/// A codec failure, typed by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The record itself is bad: send it to the dead-letter topic.
    #[error("{kind}: {message}")]
    Poison { kind: ErrorKind, message: String, schema_id: Option<u32> },
    /// The registry could not be reached, timed out, or answered 5xx, 429, 401 or 403: retry
    /// with backoff (a registry hiccup never dead-letters a valid record).
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
    auth: RegistryAuth,
    settings: SrSettings,
    decoder: AvroDecoder,
    encoder: AvroEncoder,
    http: reqwest::Client,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("url", &self.url).field("auth", &self.auth).finish_non_exhaustive()
    }
}

/// Environment variable with registry credentials, `user:password` (Confluent's
/// `basic.auth.user.info`; for Confluent Cloud: API key and secret). `..._FILE` names a file
/// holding the same.
pub const REGISTRY_AUTH_ENV: &str = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO";
/// PEM file of the CA(s) that signed the registry's certificate (default: the system's roots).
pub const REGISTRY_CA_ENV: &str = "SCHEMA_REGISTRY_CA";
/// Client certificate (PEM) for registries that require one; with [`REGISTRY_CLIENT_KEY_ENV`].
pub const REGISTRY_CLIENT_CERT_ENV: &str = "SCHEMA_REGISTRY_CLIENT_CERT";
/// The client certificate's private key (PKCS#8 PEM).
pub const REGISTRY_CLIENT_KEY_ENV: &str = "SCHEMA_REGISTRY_CLIENT_KEY";

/// How the codec authenticates to the registry: basic auth and TLS material. `Debug` hides the
/// password.
#[derive(Clone, Debug, Default)]
pub struct RegistryAuth {
    /// Basic auth user and password.
    pub basic: Option<(String, Option<Secret>)>,
    /// TLS: CA bundle and client identity (PEM bytes, already read).
    pub tls: Option<RegistryTls>,
}

/// TLS material for the registry client.
#[derive(Clone, Default)]
pub struct RegistryTls {
    /// PEM CA bundle to trust instead of the system roots' absence (added to them).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and PKCS#8 key, PEM.
    pub identity: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for RegistryTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTls").field("ca", &self.ca_pem.is_some()).field("client_cert", &self.identity.is_some()).finish()
    }
}

impl RegistryAuth {
    /// From the environment: [`REGISTRY_AUTH_ENV`] (or `_FILE`), [`REGISTRY_CA_ENV`],
    /// [`REGISTRY_CLIENT_CERT_ENV`] + [`REGISTRY_CLIENT_KEY_ENV`].
    pub fn from_env() -> Result<Self, ConfigError> {
        let basic = secret::from_env(REGISTRY_AUTH_ENV)?.map(|v| match v.expose().split_once(':') {
            Some((u, p)) => (u.to_string(), Some(Secret::new(p))),
            None => (v.expose().to_string(), None),
        });
        let read = |var: &str| -> Result<Option<Vec<u8>>, ConfigError> {
            match secret::var(var) {
                None => Ok(None),
                Some(p) => std::fs::read(&p).map(Some).map_err(|e| ConfigError::new(var, format!("cannot read '{p}': {e}"))),
            }
        };
        let ca_pem = read(REGISTRY_CA_ENV)?;
        let identity = match (read(REGISTRY_CLIENT_CERT_ENV)?, secret::var(REGISTRY_CLIENT_KEY_ENV)) {
            (Some(cert), Some(key)) => Some((cert, secret::read_file(std::path::Path::new(&key), REGISTRY_CLIENT_KEY_ENV)?)),
            (None, None) => None,
            _ => return Err(ConfigError::new(REGISTRY_CLIENT_CERT_ENV, format!("set both {REGISTRY_CLIENT_CERT_ENV} and {REGISTRY_CLIENT_KEY_ENV}, or neither"))),
        };
        let tls = (ca_pem.is_some() || identity.is_some()).then_some(RegistryTls { ca_pem, identity });
        Ok(RegistryAuth { basic, tls })
    }

    /// An HTTP client builder with this TLS material.
    fn http(&self) -> Result<reqwest::ClientBuilder, CodecError> {
        let bad = |var: &str, e: reqwest::Error| CodecError::Incompatible(format!("{var}: {e}"));
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(tls) = &self.tls {
            if let Some(ca) = &tls.ca_pem {
                for cert in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| bad(REGISTRY_CA_ENV, e))? {
                    b = b.add_root_certificate(cert);
                }
            }
            if let Some((cert, key)) = &tls.identity {
                b = b.identity(reqwest::Identity::from_pkcs8_pem(cert, key.expose().as_bytes()).map_err(|e| bad(REGISTRY_CLIENT_CERT_ENV, e))?);
            }
        }
        Ok(b)
    }

    fn settings(&self, url: &str) -> Result<SrSettings, CodecError> {
        let mut b = SrSettings::new_builder(url.to_string());
        b.set_timeout(Duration::from_secs(10));
        if let Some((user, pass)) = &self.basic {
            b.set_basic_authorization(user, pass.as_ref().map(Secret::expose));
        }
        b.build_with(self.http()?).map_err(|e| CodecError::Incompatible(format!("bad SCHEMA_REGISTRY_URL '{}': {e}", secret::redact_url(url))))
    }
}

impl Codec {
    /// A codec for the registry at `url` (Confluent API base, e.g.
    /// `http://127.0.0.1:8081/apis/ccompat/v7`), with credentials and TLS material from the
    /// environment ([`RegistryAuth::from_env`]).
    pub fn new(url: &str) -> Result<Self, CodecError> {
        let auth = RegistryAuth::from_env().map_err(|e| CodecError::Incompatible(e.to_string()))?;
        Self::with_auth(url, auth)
    }

    /// A codec with explicit credentials. A `user:password@` in `url` is taken out of it (it
    /// would otherwise show in every error message) and used when `auth` has no basic auth.
    pub fn with_auth(url: &str, mut auth: RegistryAuth) -> Result<Self, CodecError> {
        let (clean, from_url) = secret::split_url_credentials(url.trim_end_matches('/'));
        if auth.basic.is_none() {
            auth.basic = from_url;
        }
        Ok(Codec {
            settings: auth.settings(&clean)?,
            decoder: AvroDecoder::new(auth.settings(&clean)?),
            encoder: AvroEncoder::new(auth.settings(&clean)?),
            http: auth.http()?.build().map_err(|e| CodecError::Unavailable(e.to_string()))?,
            url: clean,
            auth,
        })
    }

    /// Decode a framed record into `E`, resolving the writer schema against `E`'s schema.
    pub async fn decode<E: Event>(&self, payload: Option<&[u8]>) -> Result<Decoded<E>, CodecError> {
        let poison = |kind, message: String, schema_id| CodecError::Poison { kind, message, schema_id };
        let bytes = match payload {
            None | Some([]) => return Err(poison(ErrorKind::EmptyPayload, "record has no value".into(), None)),
            Some(b) => b,
        };
        let id = frame_id(bytes)?;
        let writer = match self.decoder.get_schema(id).await {
            Ok(s) => s,
            Err(e) => {
                self.decoder.remove_errors_from_cache();
                return Err(classify_registry_error(id, &e));
            }
        };
        decode_body::<E>(&writer.parsed, id, &bytes[5..])
    }

    /// [`Self::decode`] for one-shot readers (command-line tools) that have no retry loop of
    /// their own: a registry hiccup ([`CodecError::Unavailable`]: a restart, a proxy's 502)
    /// is retried with backoff (100 ms doubling to 5 s) for up to `budget`, with a warning each
    /// time; poison and everything else return at once.
    pub async fn decode_patiently<E: Event>(&self, payload: Option<&[u8]>, budget: Duration) -> Result<Decoded<E>, CodecError> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.decode::<E>(payload).await {
                Err(CodecError::Unavailable(m)) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::warn!(error = %m, retry_in = ?delay, "schema registry unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
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

    /// Check that the registry answers and accepts our credentials (`GET /subjects`): start-up
    /// readiness. Every failure is `Unavailable` and names what to check.
    pub async fn probe(&self) -> Result<(), CodecError> {
        let url = format!("{}/subjects", self.url);
        let mut req = self.http.get(&url).timeout(std::time::Duration::from_secs(5));
        if let Some((user, pass)) = &self.auth.basic {
            req = req.basic_auth(user, pass.as_ref().map(Secret::expose));
        }
        let resp = req.send().await.map_err(|e| CodecError::Unavailable(format!("GET {url}: {e} (is SCHEMA_REGISTRY_URL right and the registry up?)")))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s @ (reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN) => Err(CodecError::Unavailable(format!("GET {url}: {s} (check {REGISTRY_AUTH_ENV})"))),
            s => Err(CodecError::Unavailable(format!("GET {url}: {s}"))),
        }
    }

    /// Set the subject's compatibility level (e.g. `BACKWARD`) and register `avsc` under it.
    /// Idempotent: registering an identical schema returns the existing id.
    pub async fn register(&self, subject: &str, avsc: &str, compatibility: &str) -> Result<u32, CodecError> {
        let url = format!("{}/config/{}", self.url, subject);
        let mut req = self.http.put(&url).json(&serde_json::json!({ "compatibility": compatibility }));
        if let Some((user, pass)) = &self.auth.basic {
            req = req.basic_auth(user, pass.as_ref().map(Secret::expose));
        }
        let resp = req.send().await.map_err(|e| CodecError::Unavailable(format!("PUT {url}: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(CodecError::Unavailable(format!("PUT {url}: {status} {body}")));
        }
        let schema = SuppliedSchema::new(None, SchemaType::Avro, avsc.to_string());
        post_schema(&self.settings, subject.to_string(), schema).await.map(|r| r.id).map_err(|e: SRCError| {
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

/// The writer schema id of a framed record, or why the framing is wrong.
pub fn frame_id(bytes: &[u8]) -> Result<u32, CodecError> {
    if bytes.len() < 5 || bytes[0] != 0 {
        return Err(CodecError::Poison {
            kind: ErrorKind::BadFraming,
            message: format!("expected the Confluent framing (magic byte 0 then a 4-byte schema id); got {} bytes starting {:02x?}", bytes.len(), &bytes[..bytes.len().min(5)]),
            schema_id: None,
        });
    }
    Ok(u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]))
}

/// Decode an Avro body written with `writer` into `E`, resolving against `E`'s schema. Pure: the
/// registry lookup is done by the caller. Writer schemas that are recursive or nested deeper than
/// [`limits::MAX_SCHEMA_DEPTH`] are refused before any byte is read (the Avro decoder recurses
/// once per nesting level, so such a schema with a deep datum would overflow the stack).
pub fn decode_body<E: Event>(writer: &apache_avro::Schema, schema_id: u32, body: &[u8]) -> Result<Decoded<E>, CodecError> {
    let poison = |kind, message: String| CodecError::Poison { kind, message, schema_id: Some(schema_id) };
    if let Err(m) = check_schema_depth(writer, limits::MAX_SCHEMA_DEPTH) {
        return Err(poison(ErrorKind::SchemaTooDeep, format!("writer schema {schema_id}: {m}")));
    }
    let mut body = body;
    // The one-call form resolves writer against reader schema; its builder replacement adds nothing here.
    #[allow(deprecated)]
    let value = apache_avro::from_avro_datum(writer, &mut body, Some(E::schema())).map_err(|e| poison(ErrorKind::Undecodable, e.to_string()))?;
    let event = avro::from_value::<E>(value).map_err(|e| poison(ErrorKind::InvalidField, e.to_string()))?;
    Ok(Decoded { event, schema_id })
}

/// Refuse recursive schemas (a named type that contains itself) and schemas nested deeper than
/// `max` levels of records, arrays, maps and unions.
pub fn check_schema_depth(schema: &apache_avro::Schema, max: usize) -> Result<(), String> {
    use apache_avro::Schema;
    fn walk<'a>(s: &'a Schema, depth: usize, max: usize, stack: &mut Vec<&'a apache_avro::schema::Name>) -> Result<(), String> {
        if depth > max {
            return Err(format!("nested deeper than {max} levels"));
        }
        match s {
            Schema::Record(r) => {
                if stack.contains(&&r.name) {
                    return Err(format!("type '{}' is recursive", r.name));
                }
                stack.push(&r.name);
                for f in &r.fields {
                    walk(&f.schema, depth + 1, max, stack)?;
                }
                stack.pop();
                Ok(())
            }
            Schema::Ref { name } => {
                if stack.contains(&name) {
                    Err(format!("type '{name}' is recursive"))
                } else {
                    // A reference to a type defined elsewhere in the schema, already walked there.
                    Ok(())
                }
            }
            Schema::Array(a) => walk(&a.items, depth + 1, max, stack),
            Schema::Map(m) => walk(&m.types, depth + 1, max, stack),
            Schema::Union(u) => u.variants().iter().try_for_each(|v| walk(v, depth + 1, max, stack)),
            _ => Ok(()),
        }
    }
    walk(schema, 0, max, &mut Vec::new())
}

/// A registry failure on a schema id: only "not found" is the record's fault (poison); every
/// other failure (unreachable, timeout, 5xx, 429, 401, 403) is the registry's and is retried.
fn classify_registry_error(id: u32, e: &SRCError) -> CodecError {
    let text = e.to_string();
    let not_found = text.contains("status 404") || text.contains("40403");
    let http_status = text.contains("failed with status");
    if e.retriable || (http_status && !not_found) {
        CodecError::Unavailable(format!("schema id {id}: {text}"))
    } else if not_found {
        CodecError::Poison { kind: ErrorKind::UnknownSchemaId, message: format!("schema id {id}: {}", e.error), schema_id: Some(id) }
    } else {
        // The registry answered, but with a schema that does not parse.
        CodecError::Poison { kind: ErrorKind::Undecodable, message: format!("schema id {id}: {text}"), schema_id: Some(id) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::MediaIngested;

    #[tokio::test]
    async fn decode_patiently_retries_an_unreachable_registry_until_its_budget() {
        // Nothing listens on port 1: every schema lookup fails as unavailable.
        let codec = Codec::with_auth("http://127.0.0.1:1/apis/ccompat/v7", RegistryAuth::default()).unwrap();
        let framed = [0u8, 0, 0, 0, 3, 0];
        let started = std::time::Instant::now();
        match codec.decode_patiently::<MediaIngested>(Some(&framed), Duration::from_millis(800)).await {
            Err(CodecError::Unavailable(_)) => {}
            other => panic!("expected unavailable, got {other:?}"),
        }
        // 100 + 200 + 400 ms of backoff fit in the budget: it retried instead of failing at once.
        assert!(started.elapsed() >= Duration::from_millis(700), "{:?}", started.elapsed());
        // Poison is not retried.
        let started = std::time::Instant::now();
        match codec.decode_patiently::<MediaIngested>(Some(&[1u8, 2]), Duration::from_secs(30)).await {
            Err(CodecError::Poison { .. }) => {}
            other => panic!("expected poison, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn recursive_and_deep_writer_schemas_are_refused() {
        let recursive = apache_avro::Schema::parse_str(r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"],"default":null}]}"#).unwrap();
        let e = check_schema_depth(&recursive, limits::MAX_SCHEMA_DEPTH).unwrap_err();
        assert!(e.contains("recursive"), "{e}");
        let mut deep = String::from(r#""string""#);
        for _ in 0..40 {
            deep = format!(r#"{{"type":"array","items":{deep}}}"#);
        }
        let deep = apache_avro::Schema::parse_str(&deep).unwrap();
        assert!(check_schema_depth(&deep, limits::MAX_SCHEMA_DEPTH).unwrap_err().contains("deeper"));
        check_schema_depth(MediaIngested::schema(), limits::MAX_SCHEMA_DEPTH).unwrap();
    }

    #[test]
    fn a_recursive_writer_with_a_deep_datum_is_poison_not_a_crash() {
        let writer = apache_avro::Schema::parse_str(r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"],"default":null}]}"#).unwrap();
        // 200,000 levels of "next is a Node": union index 1 (zig-zag 2) repeated, then null.
        let mut body = vec![2u8; 200_000];
        body.push(0);
        match decode_body::<MediaIngested>(&writer, 7, &body) {
            Err(CodecError::Poison { kind: ErrorKind::SchemaTooDeep, schema_id: Some(7), .. }) => {}
            other => panic!("expected schema_too_deep, got {other:?}"),
        }
    }

    #[test]
    fn framing_errors_are_poison() {
        assert!(matches!(frame_id(&[1, 0, 0, 0, 1, 9]), Err(CodecError::Poison { kind: ErrorKind::BadFraming, .. })));
        assert!(matches!(frame_id(&[0, 0, 0]), Err(CodecError::Poison { kind: ErrorKind::BadFraming, .. })));
        assert_eq!(frame_id(&[0, 0, 0, 1, 2, 9]).unwrap(), 258);
    }

    #[test]
    fn registry_errors_are_classified_by_status() {
        let not_found = SRCError::new("HTTP request to schema registry failed with status 404 Not Found", Some("40403 schema not found".into()), false);
        assert!(matches!(classify_registry_error(3, &not_found), CodecError::Poison { kind: ErrorKind::UnknownSchemaId, .. }));
        for status in ["500 Internal Server Error", "504 Gateway Timeout", "429 Too Many Requests", "401 Unauthorized", "403 Forbidden"] {
            let e = SRCError::new(&format!("HTTP request to schema registry failed with status {status}"), None, false);
            assert!(matches!(classify_registry_error(3, &e), CodecError::Unavailable(_)), "{status}");
        }
        let down = SRCError::new("http call to schema registry failed", Some("connection refused".into()), true);
        assert!(matches!(classify_registry_error(3, &down), CodecError::Unavailable(_)));
    }
}

//! The dead-letter contract, defined once: the headers a dead letter carries and their parsed
//! form. The run loop writes dead letters with [`DeadLetter::headers`]; `streamoasis dlq replay`
//! and `streamoasis tail` read them with [`DeadLetter::parse`].
//!
//! A dead letter is the original record (same key, same value bytes) on the processor's
//! dead-letter topic, with the original headers followed by:
//!
//! | header | value |
//! |---|---|
//! | `error.kind` | [`ErrorKind::as_str`], e.g. `undecodable` |
//! | `error.message` | what went wrong, at most [`MAX_MESSAGE_CHARS`] characters |
//! | `error.processor` | `tagger` or `sink` |
//! | `source.topic`, `source.partition`, `source.offset` | where the original record is |
//! | `schema.id` | the writer schema id, empty when unknown |
//! | `error.payload_omitted_bytes` | only when the value was too large for the dead-letter topic: the value's size; the value is then empty and the original stays at `source.*` |

use rdkafka::message::{Header, Headers, OwnedHeaders};

use crate::error::ErrorKind;

/// `error.kind`: why the record was dead-lettered.
pub const KIND: &str = "error.kind";
/// `error.message`: a human-readable reason.
pub const MESSAGE: &str = "error.message";
/// `error.processor`: the processor that dead-lettered it.
pub const PROCESSOR: &str = "error.processor";
/// `source.topic`: the topic of the original record.
pub const SOURCE_TOPIC: &str = "source.topic";
/// `source.partition`: the partition of the original record.
pub const SOURCE_PARTITION: &str = "source.partition";
/// `source.offset`: the offset of the original record.
pub const SOURCE_OFFSET: &str = "source.offset";
/// `schema.id`: the writer schema id of the original value (empty when unknown).
pub const SCHEMA_ID: &str = "schema.id";
/// `error.payload_omitted_bytes`: set when the value was left out (too large); its size.
pub const PAYLOAD_OMITTED_BYTES: &str = "error.payload_omitted_bytes";

/// Every header the contract adds: what replay strips before sending a record back.
pub const HEADERS: [&str; 8] = [KIND, MESSAGE, PROCESSOR, SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, SCHEMA_ID, PAYLOAD_OMITTED_BYTES];

/// Longest `error.message`, in characters (messages can quote the record).
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// A dead letter's headers, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `error.kind` as written (a known [`ErrorKind`] name for letters of this version).
    pub kind: String,
    /// `error.message`.
    pub message: String,
    /// `error.processor`.
    pub processor: String,
    /// `source.topic`.
    pub source_topic: String,
    /// `source.partition`.
    pub source_partition: i32,
    /// `source.offset`.
    pub source_offset: i64,
    /// `schema.id`, when known.
    pub schema_id: Option<u32>,
    /// `error.payload_omitted_bytes`: the value was left out; the original is at `source.*`.
    pub payload_omitted_bytes: Option<u64>,
}

/// A record on a dead-letter topic whose headers do not follow the contract.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A required header is absent.
    #[error("not a dead letter: header {0} is missing")]
    Missing(&'static str),
    /// A header's value is not what the contract says.
    #[error("dead-letter header {header} has an invalid value '{value}'")]
    Invalid {
        /// The header.
        header: &'static str,
        /// Its value, lossily decoded.
        value: String,
    },
}

fn value<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a [u8]> {
    // The last occurrence wins: a replayed record that was dead-lettered again carries the
    // newest reason last.
    headers.iter().filter(|h| h.key == key).last().and_then(|h| h.value)
}

fn text<H: Headers>(headers: &H, key: &'static str) -> Result<String, ParseError> {
    let v = value(headers, key).ok_or(ParseError::Missing(key))?;
    std::str::from_utf8(v).map(str::to_string).map_err(|_| ParseError::Invalid { header: key, value: String::from_utf8_lossy(v).into_owned() })
}

fn number<T: std::str::FromStr, H: Headers>(headers: &H, key: &'static str) -> Result<T, ParseError> {
    let s = text(headers, key)?;
    s.parse().map_err(|_| ParseError::Invalid { header: key, value: s })
}

impl DeadLetter {
    /// The dead letter of the record at `topic`/`partition`/`offset`.
    pub fn new(kind: ErrorKind, message: &str, processor: &str, topic: &str, partition: i32, offset: i64, schema_id: Option<u32>) -> Self {
        DeadLetter {
            kind: kind.as_str().to_string(),
            message: message.chars().take(MAX_MESSAGE_CHARS).collect(),
            processor: processor.to_string(),
            source_topic: topic.to_string(),
            source_partition: partition,
            source_offset: offset,
            schema_id,
            payload_omitted_bytes: None,
        }
    }

    /// Parse a dead letter's headers.
    pub fn parse<H: Headers>(headers: Option<&H>) -> Result<Self, ParseError> {
        let Some(h) = headers else { return Err(ParseError::Missing(KIND)) };
        let schema = text(h, SCHEMA_ID).unwrap_or_default();
        let schema_id = if schema.is_empty() { None } else { Some(schema.parse().map_err(|_| ParseError::Invalid { header: SCHEMA_ID, value: schema })?) };
        let payload_omitted_bytes = match value(h, PAYLOAD_OMITTED_BYTES) {
            Some(_) => Some(number(h, PAYLOAD_OMITTED_BYTES)?),
            None => None,
        };
        Ok(DeadLetter {
            kind: text(h, KIND)?,
            message: text(h, MESSAGE).unwrap_or_default(),
            processor: text(h, PROCESSOR).unwrap_or_default(),
            source_topic: text(h, SOURCE_TOPIC)?,
            source_partition: number(h, SOURCE_PARTITION)?,
            source_offset: number(h, SOURCE_OFFSET)?,
            schema_id,
            payload_omitted_bytes,
        })
    }

    /// `original` (the record's own headers, kept first) followed by this letter's headers.
    pub fn headers<H: Headers>(&self, original: Option<&H>) -> OwnedHeaders {
        let mut out = OwnedHeaders::new();
        if let Some(orig) = original {
            for h in orig.iter() {
                out = out.insert(Header { key: h.key, value: h.value });
            }
        }
        let partition = self.source_partition.to_string();
        let offset = self.source_offset.to_string();
        let schema = self.schema_id.map(|i| i.to_string()).unwrap_or_default();
        out = out
            .insert(Header { key: KIND, value: Some(self.kind.as_str()) })
            .insert(Header { key: MESSAGE, value: Some(self.message.as_str()) })
            .insert(Header { key: PROCESSOR, value: Some(self.processor.as_str()) })
            .insert(Header { key: SOURCE_TOPIC, value: Some(self.source_topic.as_str()) })
            .insert(Header { key: SOURCE_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: SOURCE_OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: SCHEMA_ID, value: Some(schema.as_str()) });
        if let Some(n) = self.payload_omitted_bytes {
            let n = n.to_string();
            out = out.insert(Header { key: PAYLOAD_OMITTED_BYTES, value: Some(n.as_str()) });
        }
        out
    }

    /// `headers` without the contract's own: what a replayed record carries back to its source.
    pub fn strip<H: Headers>(headers: Option<&H>) -> OwnedHeaders {
        let mut out = OwnedHeaders::new();
        if let Some(h) = headers {
            for x in h.iter().filter(|x| !HEADERS.contains(&x.key)) {
                out = out.insert(Header { key: x.key, value: x.value });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_keep_the_originals_first() {
        let orig = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some("00-abc") });
        let mut dl = DeadLetter::new(ErrorKind::Undecodable, "bad bytes", "tagger", "media.ingested", 3, 42, Some(7));
        let h = dl.headers(Some(&orig));
        assert_eq!(h.get(0).key, "traceparent");
        assert_eq!(DeadLetter::parse(Some(&h)).unwrap(), dl);
        dl.payload_omitted_bytes = Some(5_000_000);
        dl.schema_id = None;
        let h = dl.headers(None::<&OwnedHeaders>);
        let back = DeadLetter::parse(Some(&h)).unwrap();
        assert_eq!(back, dl);
        assert_eq!(h.iter().find(|x| x.key == SCHEMA_ID).unwrap().value, Some(&b""[..]), "unknown schema id is an empty header");
    }

    #[test]
    fn strip_removes_every_contract_header_and_nothing_else() {
        let orig = OwnedHeaders::new().insert(Header { key: "traceparent", value: Some("00-abc") });
        let mut dl = DeadLetter::new(ErrorKind::RecordTooLarge, "big", "tagger", "t", 0, 1, None);
        dl.payload_omitted_bytes = Some(10);
        let h = dl.headers(Some(&orig));
        assert_eq!(h.count(), 1 + HEADERS.len());
        let s = DeadLetter::strip(Some(&h));
        assert_eq!(s.count(), 1);
        assert_eq!(s.get(0).key, "traceparent");
    }

    #[test]
    fn message_is_capped_and_bad_headers_are_named() {
        let dl = DeadLetter::new(ErrorKind::InvalidField, &"x".repeat(5000), "sink", "t", 0, 1, None);
        assert_eq!(dl.message.chars().count(), MAX_MESSAGE_CHARS);
        assert_eq!(DeadLetter::parse(None::<&OwnedHeaders>), Err(ParseError::Missing(KIND)));
        let h = OwnedHeaders::new()
            .insert(Header { key: KIND, value: Some("undecodable") })
            .insert(Header { key: SOURCE_TOPIC, value: Some("t") })
            .insert(Header { key: SOURCE_PARTITION, value: Some("zero") })
            .insert(Header { key: SOURCE_OFFSET, value: Some("1") });
        assert_eq!(DeadLetter::parse(Some(&h)), Err(ParseError::Invalid { header: SOURCE_PARTITION, value: "zero".into() }));
    }
}

//! One error taxonomy for every processor.
//!
//! Every failure the run loop sees falls in exactly one class, and the class alone decides what
//! happens next:
//!
//! | class | caused by | the run loop |
//! |---|---|---|
//! | **poison** ([`ErrorKind`]) | the record itself (bad bytes, over a limit, rejected by the database as invalid) | dead-letters the original bytes with `error.kind` = [`ErrorKind::as_str`]; the partition goes on |
//! | **transient** | a dependency (broker, registry, database, model out of memory) | retries the record with capped exponential backoff and jitter, counted in `streamoasis_retries_total`; past `transient_budget` the error escalates to fatal |
//! | **fatal** | the deployment (not authorised, unknown topic, incompatible schema, model thread gone) | liveness fails, the process exits non-zero with a message naming the fix |

use std::fmt;

/// Why a record was dead-lettered: a stable, low-cardinality name (DLQ header `error.kind`,
/// metric label `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The record has no value.
    EmptyPayload,
    /// Not in the Confluent framing (magic byte 0 + 4-byte schema id).
    BadFraming,
    /// The registry does not know the writer schema id.
    UnknownSchemaId,
    /// The writer schema is recursive or nested deeper than the decoder allows.
    SchemaTooDeep,
    /// The bytes do not decode with the writer schema, or it does not resolve against ours.
    Undecodable,
    /// Decoded, but a field is missing or has an invalid value.
    InvalidField,
    /// The record is larger than `max_record_bytes`.
    RecordTooLarge,
    /// `media_id` is longer than [`limits::MAX_MEDIA_ID_BYTES`].
    MediaIdTooLong,
    /// More attributes than [`limits::MAX_ATTRIBUTES`], or larger than
    /// [`limits::MAX_ATTRIBUTES_BYTES`] in all.
    AttributesTooLarge,
    /// Per-item candidate labels are empty, duplicated, too many or too long.
    InvalidLabels,
    /// The model failed on this item alone (isolated by splitting its batch).
    ModelError,
    /// The output record would be larger than the producer or topic accepts.
    OutputTooLarge,
    /// The database rejected the write as invalid (e.g. a partition key over 64 KiB).
    DbRejected,
}

impl ErrorKind {
    /// Every kind, for docs and tests.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::EmptyPayload,
        ErrorKind::BadFraming,
        ErrorKind::UnknownSchemaId,
        ErrorKind::SchemaTooDeep,
        ErrorKind::Undecodable,
        ErrorKind::InvalidField,
        ErrorKind::RecordTooLarge,
        ErrorKind::MediaIdTooLong,
        ErrorKind::AttributesTooLarge,
        ErrorKind::InvalidLabels,
        ErrorKind::ModelError,
        ErrorKind::OutputTooLarge,
        ErrorKind::DbRejected,
    ];

    /// Stable name used in DLQ headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::EmptyPayload => "empty_payload",
            ErrorKind::BadFraming => "bad_framing",
            ErrorKind::UnknownSchemaId => "unknown_schema_id",
            ErrorKind::SchemaTooDeep => "schema_too_deep",
            ErrorKind::Undecodable => "undecodable",
            ErrorKind::InvalidField => "invalid_field",
            ErrorKind::RecordTooLarge => "record_too_large",
            ErrorKind::MediaIdTooLong => "media_id_too_long",
            ErrorKind::AttributesTooLarge => "attributes_too_large",
            ErrorKind::InvalidLabels => "invalid_labels",
            ErrorKind::ModelError => "model_error",
            ErrorKind::OutputTooLarge => "output_too_large",
            ErrorKind::DbRejected => "db_rejected",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits checked before any work is spent on a record.
pub mod limits {
    /// Longest `media_id`, in bytes (it is a Kafka key and a CQL partition key).
    pub const MAX_MEDIA_ID_BYTES: usize = 512;
    /// Most entries in `attributes`.
    pub const MAX_ATTRIBUTES: usize = 256;
    /// Most bytes in `attributes`, keys and values together.
    pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;
    /// Deepest nesting of named types, arrays, maps and unions a writer schema may have.
    pub const MAX_SCHEMA_DEPTH: usize = 32;
    /// Default `max_record_bytes` of a processor.
    pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
}

//! The wire types of the REST API in one place: request bodies, answers and the error body.
//! The gRPC messages are generated from `proto/` ([`crate::proto`]); both are filled from the
//! same values (see [`crate::ApiState::tag`]), so the two protocols answer alike.
//!
//! Names that are enum values on the wire (`strategy`, `kind`) come from the enums' serde
//! representation ([`wire_name`]), the same names the Avro events carry.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The serde name of a unit enum value, as the events carry it (`Strategy::Embedding` →
/// `EMBEDDING`, `MediaKind::Clip` → `CLIP`); empty for a value that does not serialise to a string.
pub fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

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
    /// `busy`, `timeout`, `not_found`, `unavailable`, `not_implemented`, `internal`.
    pub code: String,
    /// Human-readable detail with the fix.
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

// ───────────────────────────── bodies and answers ─────────────────────────────

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
    /// The taxonomy the tags were made with (labels or the request's candidate_labels,
    /// templates, calibration, thresholds), as in tagged events.
    pub taxonomy_version: String,
}

/// `POST /v1/media/{media_id}/retag` answer: the item's tags under the current taxonomy,
/// computed from its stored embedding (no model pass) and produced to the tags topic.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RetagResponse {
    /// The item.
    pub media_id: String,
    /// Tags, best first.
    pub tags: Vec<TagOut>,
    /// Why `tags` is empty, if it is.
    pub no_tags_reason: Option<String>,
    /// `name@version` of the model whose embedding the tags were scored from.
    pub model: String,
    /// The taxonomy the tags were made with.
    pub taxonomy_version: String,
    /// Where the tagged event went (the sink updates the row from it).
    pub topic: String,
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
    /// The taxonomy version the stored tags were made with (null for rows written before it
    /// was kept); compare with `streamoasis db stats` to see stale rows.
    pub taxonomy_version: Option<String>,
}

/// Query of `GET /v1/media/{media_id}/similar`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SimilarQuery {
    /// Neighbours to return, 1..=100 (default 10).
    pub k: Option<usize>,
    /// Only items of this kind (`VIDEO`, `EPISODE`, ...).
    pub kind: Option<String>,
}

/// Body of `POST /v1/search`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchBody {
    /// Free text, embedded by the tagger's model as an item's text is.
    pub text: String,
    /// Items to return, 1..=100 (default 10).
    #[serde(default)]
    pub k: Option<usize>,
    /// Only items of this kind.
    #[serde(default)]
    pub kind: Option<String>,
}

/// One item of a similarity answer.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Neighbour {
    /// The item.
    pub media_id: String,
    /// Its media kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Its title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Cosine similarity of its embedding to the query's, most similar first.
    pub similarity: f32,
}

/// Items most like an item or a text, most similar first.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NeighboursResponse {
    /// The item asked about (`/similar`), absent for a text search.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_id: Option<String>,
    /// At most `k` items.
    pub items: Vec<Neighbour>,
}

impl NeighboursResponse {
    /// From the read path's answer.
    pub fn new(media_id: Option<String>, items: Vec<streamoasis_sink::read::Neighbour>) -> Self {
        NeighboursResponse { media_id, items: items.into_iter().map(|n| Neighbour { media_id: n.media_id, kind: n.kind, title: n.title, similarity: n.similarity }).collect() }
    }
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

/// One item of `POST /v1/media`, as received.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaItem {
    /// Stable identifier (the record key). Required: `None` (absent or null) is rejected by
    /// [`crate::validate`], naming the field.
    #[serde(default)]
    #[schema(required = true, value_type = String)]
    pub media_id: Option<String>,
    /// Display title (may be empty when description or transcript has text). Required like
    /// `media_id`.
    #[serde(default)]
    #[schema(required = true, value_type = String)]
    pub title: Option<String>,
    /// VIDEO, EPISODE, MOVIE, CLIP, TRAILER, LIVE, PODCAST, ARTICLE, ATTRACTION or OTHER (default OTHER).
    #[serde(default)]
    pub kind: Option<String>,
    /// Synopsis.
    #[serde(default)]
    pub description: Option<String>,
    /// Transcript or body.
    #[serde(default)]
    pub transcript: Option<String>,
    /// BCP 47 language tag.
    #[serde(default)]
    pub language: Option<String>,
    /// Producing system (default `streamoasis-api`).
    #[serde(default)]
    pub source: Option<String>,
    /// Free-form attributes, carried through untouched.
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    /// Labels replacing the taxonomy for this item.
    #[serde(default)]
    pub candidate_labels: Option<Vec<String>>,
}

/// `POST /v1/media` body: `{"items": [item, ...]}`, or one item on its own
/// (`{"media_id": "...", "title": "..."}`, the same as a batch of one). A body with an `items`
/// key is a batch; any other object is one item.
#[derive(Debug, ToSchema)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // one request body, parsed and dropped at once
pub enum MediaBody {
    /// 1..=1000 items.
    Batch(MediaBatch),
    /// One item.
    One(MediaItem),
}

/// What `POST /v1/media` takes, said in its error messages.
pub const MEDIA_BODY_SHAPE: &str = "the body is one item {\"media_id\": ..., \"title\": ...} or a batch {\"items\": [item, ...]}";

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

#[cfg(test)]
mod tests {
    use streamoasis_pipeline::events::{MediaKind, Strategy};

    use super::*;

    #[test]
    fn wire_names_are_the_serde_names() {
        assert_eq!(wire_name(&Strategy::Embedding), "EMBEDDING");
        assert_eq!(wire_name(&Strategy::Nli), "NLI");
        assert_eq!(wire_name(&MediaKind::Attraction), "ATTRACTION");
        assert_eq!(wire_name(&MediaKind::Clip), "CLIP");
        assert_eq!(wire_name(&5), "");
    }
}

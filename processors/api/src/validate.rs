//! Checks shared by REST and gRPC: a request either passes whole or is rejected naming the
//! field and the fix, before anything reaches the batcher or Kafka.

use std::collections::HashMap;

use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind};
use streamoasis_tagger::tagger::TagError;
use streamoasis_tagger::{TagRequest, Tagger};

use crate::Limits;

/// A rejected field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path / proto field of the bad value (e.g. `candidate_labels`, `items[3].media_id`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl FieldError {
    /// A rejection of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }

    fn prefixed(self, prefix: &str) -> Self {
        FieldError { field: format!("{prefix}{}", self.field), message: self.message }
    }
}

/// The text fields of a tagging request, as received.
#[derive(Debug, Clone, Default)]
pub struct TagInput {
    /// Title.
    pub title: String,
    /// Description.
    pub description: Option<String>,
    /// Transcript.
    pub transcript: Option<String>,
    /// Labels replacing the taxonomy.
    pub candidate_labels: Option<Vec<String>>,
    /// Media kind name.
    pub kind: Option<String>,
    /// BCP 47 language tag.
    pub language: Option<String>,
}

/// Parse a media kind name (`VIDEO`, `episode`, ...): unknown names are rejected.
pub fn kind(field: &str, k: &str) -> Result<MediaKind, FieldError> {
    const NAMES: &str = "VIDEO, EPISODE, MOVIE, CLIP, TRAILER, LIVE, PODCAST, ARTICLE, ATTRACTION, OTHER";
    serde_json::from_value(serde_json::Value::String(k.trim().to_ascii_uppercase()))
        .map_err(|_| FieldError::new(field, format!("unknown kind '{k}': use one of {NAMES}")))
}

fn text(field: &str, v: &str, limits: &Limits) -> Result<(), FieldError> {
    if v.len() > limits.max_text_bytes {
        return Err(FieldError::new(field, format!("{} bytes exceed the limit of {} bytes: shorten it", v.len(), limits.max_text_bytes)));
    }
    Ok(())
}

/// Check a tagging request and build what the tagger takes.
pub fn tag_request(input: TagInput, tagger: &Tagger, limits: &Limits) -> Result<(TagRequest, Option<MediaKind>), FieldError> {
    text("title", &input.title, limits)?;
    if let Some(d) = &input.description {
        text("description", d, limits)?;
    }
    if let Some(t) = &input.transcript {
        text("transcript", t, limits)?;
    }
    let blank = |o: &Option<String>| o.as_deref().is_none_or(|s| s.trim().is_empty());
    if input.title.trim().is_empty() && blank(&input.description) && blank(&input.transcript) {
        return Err(FieldError::new("title", "empty: give a title, a description or a transcript with some text"));
    }
    let kind = input.kind.as_deref().map(|k| kind("kind", k)).transpose()?;
    let labels = match input.candidate_labels {
        None => None,
        Some(l) => Some(tagger.check_candidates(&l).map_err(|e| match e {
            TagError::InvalidLabels(m) => FieldError::new("candidate_labels", m),
            other => FieldError::new("candidate_labels", other.to_string()),
        })?),
    };
    let req = TagRequest {
        title: input.title,
        description: input.description,
        transcript: input.transcript,
        candidate_labels: labels,
        kind: kind.unwrap_or_default(),
        language: input.language,
    };
    Ok((req, kind))
}

/// One item of `POST /v1/media`, as received.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaItem {
    /// Stable identifier (the record key).
    pub media_id: String,
    /// Display title.
    pub title: String,
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

/// Check every item (all or nothing) and build the events.
pub fn media_items(items: Vec<MediaItem>, tagger: &Tagger, limits: &Limits) -> Result<Vec<MediaIngested>, FieldError> {
    if items.is_empty() {
        return Err(FieldError::new("items", "empty: send at least one item"));
    }
    if items.len() > limits.max_media_items {
        return Err(FieldError::new("items", format!("{} items exceed the limit of {} per request: split the batch", items.len(), limits.max_media_items)));
    }
    let now = now_millis();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, it) in items.into_iter().enumerate() {
        let p = format!("items[{i}].");
        let id = it.media_id.trim();
        if id.is_empty() {
            return Err(FieldError::new(format!("{p}media_id"), "empty: every item needs a stable identifier"));
        }
        if id.len() > 512 {
            return Err(FieldError::new(format!("{p}media_id"), "longer than 512 bytes"));
        }
        if !seen.insert(id.to_string()) {
            return Err(FieldError::new(format!("{p}media_id"), format!("'{id}' appears twice in this request")));
        }
        let input = TagInput {
            title: it.title.clone(),
            description: it.description.clone(),
            transcript: it.transcript.clone(),
            candidate_labels: it.candidate_labels.clone(),
            kind: it.kind.clone(),
            language: it.language.clone(),
        };
        let (req, kind) = tag_request(input, tagger, limits).map_err(|e| e.prefixed(&p))?;
        out.push(MediaIngested {
            media_id: id.to_string(),
            kind: kind.unwrap_or_default(),
            title: req.title,
            description: req.description,
            transcript: req.transcript,
            language: it.language,
            source: it.source.unwrap_or_else(|| "streamoasis-api".into()),
            ingested_at: now,
            attributes: it.attributes,
            candidate_labels: req.candidate_labels,
        });
    }
    Ok(out)
}

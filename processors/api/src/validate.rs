//! Checks shared by REST and gRPC: a request either passes whole or is rejected naming the
//! field and the fix, before anything reaches the batcher or Kafka.

use streamoasis_pipeline::events::{now_millis, MediaIngested, MediaKind};
use streamoasis_tagger::tagger::TagError;
use streamoasis_tagger::{TagRequest, Tagger};

pub use crate::types::MediaItem;
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
    serde_json::from_value(serde_json::Value::String(k.trim().to_ascii_uppercase())).map_err(|_| FieldError::new(field, format!("unknown kind '{k}': use one of {NAMES}")))
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

/// Check every item of a batch (all or nothing) and build the events; fields are named
/// `items[i].<field>`.
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
        let e = media_event(it, now, tagger, limits).map_err(|e| e.prefixed(&p))?;
        if !seen.insert(e.media_id.clone()) {
            return Err(FieldError::new(format!("{p}media_id"), format!("'{}' appears twice in this request", e.media_id)));
        }
        out.push(e);
    }
    Ok(out)
}

/// Check one item sent on its own (the body is the item) and build its event; fields are named
/// as in the item (`media_id`, `kind`, ...).
pub fn media_item(item: MediaItem, tagger: &Tagger, limits: &Limits) -> Result<MediaIngested, FieldError> {
    media_event(item, now_millis(), tagger, limits)
}

fn media_event(it: MediaItem, now: i64, tagger: &Tagger, limits: &Limits) -> Result<MediaIngested, FieldError> {
    let id = it.media_id.as_deref().ok_or_else(|| FieldError::new("media_id", "missing: every item needs a stable identifier"))?.trim();
    if id.is_empty() {
        return Err(FieldError::new("media_id", "empty: every item needs a stable identifier"));
    }
    if id.len() > 512 {
        return Err(FieldError::new("media_id", "longer than 512 bytes"));
    }
    let title = it.title.ok_or_else(|| FieldError::new("title", "missing: every item needs a title (it may be empty when description or transcript has text)"))?;
    let input = TagInput { title, description: it.description, transcript: it.transcript, candidate_labels: it.candidate_labels, kind: it.kind, language: it.language.clone() };
    let (req, kind) = tag_request(input, tagger, limits)?;
    Ok(MediaIngested {
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
    })
}

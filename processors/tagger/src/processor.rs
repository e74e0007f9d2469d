//! The tagger processor: `media.ingested` → tags → `media.tagged`.

use std::sync::Arc;

use streamoasis_pipeline::error::{limits, ErrorKind};
use streamoasis_pipeline::events::{now_millis, Lineage, MediaIngested, MediaTagged};
use streamoasis_pipeline::processor::{ProcessError, Processor, RecordMeta};

use crate::batcher::BatchError;
use crate::tagger::{TagError, TagRequest, Tagger};

/// Tags each ingested item and emits a `MediaTagged` keyed by its media id.
#[derive(Debug, Clone)]
pub struct TaggerProcessor {
    tagger: Arc<Tagger>,
}

impl TaggerProcessor {
    /// Wrap a loaded tagger.
    pub fn new(tagger: Arc<Tagger>) -> Self {
        TaggerProcessor { tagger }
    }
}

/// Build the request for an ingested item.
pub fn request_of(item: &MediaIngested) -> TagRequest {
    TagRequest {
        title: item.title.clone(),
        description: item.description.clone(),
        transcript: item.transcript.clone(),
        candidate_labels: item.candidate_labels.clone(),
        kind: item.kind,
        language: item.language.clone(),
    }
}

impl Processor for TaggerProcessor {
    type Input = MediaIngested;
    type Output = MediaTagged;

    fn name(&self) -> &'static str {
        "tagger"
    }

    async fn process(&self, item: MediaIngested, meta: RecordMeta) -> Result<Vec<MediaTagged>, ProcessError> {
        check_limits(&item)?;
        let result = match self.tagger.tag(&request_of(&item)).await {
            Ok(r) => r,
            Err(TagError::InvalidLabels(m)) => return Err(ProcessError::poison(ErrorKind::InvalidLabels, m)),
            Err(TagError::Model(BatchError::Model(m))) => return Err(ProcessError::poison(ErrorKind::ModelError, m)),
            Err(TagError::Model(BatchError::Overloaded(m))) => return Err(ProcessError::Transient(m)),
            Err(TagError::Model(BatchError::Stopped)) => return Err(ProcessError::Fatal("the model thread stopped".into())),
            Err(TagError::Model(BatchError::QueueFull)) => return Err(ProcessError::Transient("batcher queue full".into())),
        };
        Ok(vec![MediaTagged {
            media_id: item.media_id,
            kind: item.kind,
            tags: result.tags,
            no_tags_reason: result.no_tags_reason,
            strategy: self.tagger.strategy(),
            model: self.tagger.model_ref().clone(),
            ingested_at: item.ingested_at,
            tagged_at: now_millis(),
            lineage: Lineage { topic: meta.topic, partition: meta.partition, offset: meta.offset },
            title: Some(item.title),
            source: Some(item.source),
            language: item.language,
            attributes: item.attributes,
            taxonomy_version: Some(result.taxonomy_version),
            embedding: result.embedding.map(|e| e.to_event(item.candidate_labels)),
        }])
    }
}

/// Limits checked before the model sees an item (each has its own `error.kind` in the DLQ).
/// Text and label caps are applied by the tagger itself (`tagging.text`, `tagging.max_labels`).
pub fn check_limits(item: &MediaIngested) -> Result<(), ProcessError> {
    if item.media_id.trim().is_empty() {
        return Err(ProcessError::poison(ErrorKind::InvalidField, "media_id is empty"));
    }
    if item.media_id.len() > limits::MAX_MEDIA_ID_BYTES {
        return Err(ProcessError::poison(ErrorKind::MediaIdTooLong, format!("media_id is {} bytes, over the limit of {}", item.media_id.len(), limits::MAX_MEDIA_ID_BYTES)));
    }
    if item.media_id.chars().any(char::is_control) {
        return Err(ProcessError::poison(ErrorKind::InvalidField, "media_id contains control characters"));
    }
    if item.attributes.len() > limits::MAX_ATTRIBUTES {
        return Err(ProcessError::poison(ErrorKind::AttributesTooLarge, format!("{} attributes, over the limit of {}", item.attributes.len(), limits::MAX_ATTRIBUTES)));
    }
    let bytes: usize = item.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits::MAX_ATTRIBUTES_BYTES {
        return Err(ProcessError::poison(ErrorKind::AttributesTooLarge, format!("attributes hold {bytes} bytes, over the limit of {}", limits::MAX_ATTRIBUTES_BYTES)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamoasis_pipeline::events::MediaKind;

    fn item(id: &str) -> MediaIngested {
        MediaIngested {
            media_id: id.into(),
            kind: MediaKind::Video,
            title: "t".into(),
            description: None,
            transcript: None,
            language: None,
            source: "s".into(),
            ingested_at: 1,
            attributes: Default::default(),
            candidate_labels: None,
        }
    }

    fn kind(r: Result<(), ProcessError>) -> ErrorKind {
        match r {
            Err(ProcessError::Poison { kind, .. }) => kind,
            other => panic!("expected poison, got {other:?}"),
        }
    }

    #[test]
    fn limits_name_their_kind() {
        check_limits(&item("ok-1")).unwrap();
        assert_eq!(kind(check_limits(&item(" "))), ErrorKind::InvalidField);
        assert_eq!(kind(check_limits(&item(&"x".repeat(600_000)))), ErrorKind::MediaIdTooLong);
        check_limits(&item(&"x".repeat(512))).unwrap();
        assert_eq!(kind(check_limits(&item("a\u{7}b"))), ErrorKind::InvalidField);
        let mut many = item("m");
        many.attributes = (0..100_000).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(kind(check_limits(&many)), ErrorKind::AttributesTooLarge);
        let mut big = item("b");
        big.attributes.insert("k".into(), "v".repeat(70_000));
        assert_eq!(kind(check_limits(&big)), ErrorKind::AttributesTooLarge);
    }
}

//! The tagger processor: `media.ingested` → tags → `media.tagged`.

use std::sync::Arc;

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
    }
}

impl Processor for TaggerProcessor {
    type Input = MediaIngested;
    type Output = MediaTagged;

    fn name(&self) -> &'static str {
        "tagger"
    }

    async fn process(&self, item: MediaIngested, meta: RecordMeta) -> Result<Vec<MediaTagged>, ProcessError> {
        if item.media_id.trim().is_empty() {
            return Err(ProcessError::Poison { kind: "invalid_field", message: "media_id is empty".into() });
        }
        let result = match self.tagger.tag(&request_of(&item)).await {
            Ok(r) => r,
            Err(TagError::InvalidLabels(m)) => return Err(ProcessError::Poison { kind: "invalid_labels", message: m }),
            Err(TagError::Model(BatchError::Model(m))) => return Err(ProcessError::Poison { kind: "model_error", message: m }),
            Err(TagError::Model(BatchError::Stopped)) => return Err(ProcessError::Fatal("model thread stopped".into())),
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
        }])
    }
}

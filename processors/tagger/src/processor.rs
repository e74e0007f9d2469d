//! The tagger processor: `media.ingested` → tags → `media.tagged`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::IntCounterVec;
use streamoasis_pipeline::error::{limits, ErrorKind};
use streamoasis_pipeline::events::{now_millis, EmbeddingStore, Lineage, MediaIngested, MediaTagged};
use streamoasis_pipeline::processor::{ProcessError, Processor, RecordMeta};

use crate::batcher::BatchError;
use crate::tagger::{text_hash, ItemEmbedding, TagError, TagRequest, TagResult, Tagger};

/// Tags each ingested item and emits a `MediaTagged` keyed by its media id. With a store of
/// embeddings ([`TaggerProcessor::with_store`]) an item whose text is unchanged since it was
/// last tagged is scored from its stored rows instead of the model.
#[derive(Clone)]
pub struct TaggerProcessor {
    tagger: Arc<Tagger>,
    store: Option<Arc<dyn EmbeddingStore>>,
    /// [`Tagger::embedding_version`], computed once.
    embedding_version: String,
    reuse: Arc<ReuseCounts>,
}

impl std::fmt::Debug for TaggerProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaggerProcessor").field("reuse", &self.store.is_some()).finish_non_exhaustive()
    }
}

/// What the stored-embedding lookups of one processor came to (also exported as
/// `streamoasis_tagger_embedding_reuse_total{outcome}`).
#[derive(Debug, Default)]
pub struct ReuseCounts {
    /// Scored from the stored rows, without the model.
    pub reused: AtomicU64,
    /// No stored row for the media id.
    pub missing: AtomicU64,
    /// A stored row of other text or another model or windowing.
    pub changed: AtomicU64,
    /// A stored row that cannot answer under the current settings (only the lead was read
    /// then and the body is needed now).
    pub needs_model: AtomicU64,
    /// The lookup failed or timed out (the database unreachable or slow).
    pub unavailable: AtomicU64,
}

impl ReuseCounts {
    /// `(reused, missing, changed, needs_model, unavailable)` now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64, u64) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (g(&self.reused), g(&self.missing), g(&self.changed), g(&self.needs_model), g(&self.unavailable))
    }

    fn count(&self, outcome: &'static str) {
        let a = match outcome {
            "reused" => &self.reused,
            "missing" => &self.missing,
            "changed" => &self.changed,
            "needs_model" => &self.needs_model,
            _ => &self.unavailable,
        };
        a.fetch_add(1, Ordering::Relaxed);
        reuse_metric().with_label_values(&[outcome]).inc();
    }
}

fn reuse_metric() -> &'static IntCounterVec {
    static M: OnceLock<IntCounterVec> = OnceLock::new();
    M.get_or_init(|| {
        let m = IntCounterVec::new(
            prometheus::Opts::new(
                "streamoasis_tagger_embedding_reuse_total",
                "Stored-embedding lookups before the model by outcome: reused (no model pass), missing, changed (other text or model), needs_model, unavailable",
            ),
            &["outcome"],
        )
        .unwrap();
        let _ = streamoasis_pipeline::telemetry::registry().register(Box::new(m.clone()));
        m
    })
}

impl TaggerProcessor {
    /// Wrap a loaded tagger.
    pub fn new(tagger: Arc<Tagger>) -> Self {
        let embedding_version = tagger.embedding_version();
        TaggerProcessor { tagger, store: None, embedding_version, reuse: Arc::default() }
    }

    /// Look items up in `store` before running the model (only while the tagger stores
    /// embeddings: `tagging.store_embeddings` and `tagging.reuse_embeddings` on).
    pub fn with_store(mut self, store: Arc<dyn EmbeddingStore>) -> Self {
        let c = self.tagger.config();
        if c.store_embeddings && c.reuse_embeddings {
            self.store = Some(store);
        }
        self
    }

    /// The lookups' outcomes so far.
    pub fn reuse_counts(&self) -> Arc<ReuseCounts> {
        self.reuse.clone()
    }

    /// The item's tags from its stored embedding, when one is stored for the same text, model
    /// and windowing and it answers under the current settings; `None`: run the model.
    async fn reuse(&self, store: &dyn EmbeddingStore, item: &MediaIngested, req: &TagRequest) -> Option<TagResult> {
        // What the model path refuses before reading (another language) is not looked up: the
        // stored rows do not know the item's language.
        if self.tagger.unsupported_language(req, &req.text()).is_some() {
            return None;
        }
        let looked = tokio::time::timeout(self.tagger.config().reuse_timeout, store.stored(&item.media_id)).await;
        let row = match looked {
            Ok(Ok(Some(row))) => row,
            Ok(Ok(None)) => return self.miss("missing"),
            Ok(Err(e)) => {
                tracing::debug!(media_id = %item.media_id, error = %e, "stored embedding lookup failed: the model reads the item");
                return self.miss("unavailable");
            }
            Err(_) => {
                tracing::debug!(media_id = %item.media_id, timeout = ?self.tagger.config().reuse_timeout, "stored embedding lookup timed out: the model reads the item");
                return self.miss("unavailable");
            }
        };
        if row.embedding_version != self.embedding_version || row.text_hash != text_hash(req) {
            return self.miss("changed");
        }
        let Ok(rows) = ItemEmbedding::from_event(&row) else { return self.miss("changed") };
        match self.tagger.tag_from_embedding(item.kind, item.candidate_labels.as_deref(), &rows).await {
            Ok(Some(mut r)) => {
                self.reuse.count("reused");
                r.embedding = Some(rows);
                Some(r)
            }
            // Not answerable, or an error the model path reports as it always does.
            _ => self.miss("needs_model"),
        }
    }

    fn miss(&self, outcome: &'static str) -> Option<TagResult> {
        self.reuse.count(outcome);
        None
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
        let req = request_of(&item);
        let reused = match &self.store {
            Some(store) => self.reuse(store.as_ref(), &item, &req).await,
            None => None,
        };
        let result = match reused {
            Some(r) => Ok(r),
            None => self.tagger.tag(&req).await,
        };
        let result = match result {
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

//! Zero-shot tagging: text in, ranked tags out, through the batcher.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use streamoasis_pipeline::events::{ModelRef, Strategy, Tag};

use crate::batcher::{BatchError, Batcher, BatcherConfig, Seq};
use crate::config::{StrategyKind, TaggerConfig};
use crate::model::{parse_device, read_manifest, LoadError, Manifest, TextEncoder, TorchBackend};

/// The text of one item.
#[derive(Debug, Clone, Default)]
pub struct TagRequest {
    /// Title.
    pub title: String,
    /// Description, if any.
    pub description: Option<String>,
    /// Transcript / body, if any.
    pub transcript: Option<String>,
    /// Per-item labels replacing the taxonomy.
    pub candidate_labels: Option<Vec<String>>,
}

impl TagRequest {
    /// Title, description and transcript joined, in that order (windows cover them first).
    pub fn text(&self) -> String {
        let mut parts: Vec<&str> = vec![self.title.trim()];
        for p in [&self.description, &self.transcript].into_iter().flatten() {
            parts.push(p.trim());
        }
        parts.retain(|p| !p.is_empty());
        parts.join("\n")
    }
}

/// The tags of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct TagResult {
    /// Sorted by score, highest first.
    pub tags: Vec<Tag>,
    /// Why there are no tags, if there are none.
    pub no_tags_reason: Option<String>,
}

/// Why an item could not be tagged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TagError {
    /// The item's candidate_labels are unusable (→ DLQ with this reason).
    #[error("invalid candidate_labels: {0}")]
    InvalidLabels(String),
    /// The model failed on the batch holding this item.
    #[error(transparent)]
    Model(#[from] BatchError),
}

struct Labels {
    names: Vec<String>,
    /// One normalised embedding per label (embedding strategy).
    vectors: Vec<Arc<Vec<f32>>>,
}

struct Nli {
    encoder: TextEncoder,
    batcher: Batcher,
    entailment: usize,
    contradiction: usize,
    template: String,
    multi_label: bool,
    model: ModelRef,
}

/// A loaded tagger: model(s), batcher(s), cached label embeddings.
pub struct Tagger {
    cfg: TaggerConfig,
    encoder: TextEncoder,
    batcher: Batcher,
    taxonomy: Labels,
    cache: Mutex<LruCache<String, Arc<Vec<f32>>>>,
    nli: Option<Nli>,
    model: ModelRef,
    manifest: Manifest,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tagger").field("model", &self.model).field("strategy", &self.cfg.strategy).finish_non_exhaustive()
    }
}

fn batcher_config(cfg: &TaggerConfig) -> BatcherConfig {
    BatcherConfig {
        max_batch_size: cfg.batching.max_batch_size,
        max_batch_tokens: cfg.batching.max_batch_tokens,
        max_wait: cfg.batching.max_wait,
        queue_capacity: cfg.batching.queue_capacity,
    }
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean of vectors, L2-normalised.
fn mean_pool(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut acc = vec![0f32; rows.first().map_or(0, |r| r.len())];
    for r in rows {
        acc.iter_mut().zip(r).for_each(|(a, x)| *a += x);
    }
    normalise(&mut acc);
    acc
}

fn softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = xs.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Tagger {
    /// Load the model(s) and start the batcher(s); embeds the taxonomy once. Needs a tokio runtime.
    pub async fn load(cfg: TaggerConfig) -> Result<Tagger, LoadError> {
        let manifest = read_manifest(&cfg.model.path)?;
        let max_tokens = if cfg.text.max_tokens == 0 { manifest.max_seq_len } else { cfg.text.max_tokens.min(manifest.max_seq_len) };
        let encoder = TextEncoder::load(&cfg.model.path, max_tokens)?;
        let device = parse_device(&cfg.model.device)?;
        let backend = TorchBackend::load(&cfg.model.path, device, false, cfg.model.threads)?;
        let batcher = Batcher::spawn(backend, batcher_config(&cfg));
        let model = ModelRef { name: manifest.name.clone(), version: manifest.version.clone() };

        let nli = match (&cfg.strategy, &cfg.nli) {
            (StrategyKind::Nli, Some(n)) => {
                let m = read_manifest(&n.model)?;
                let entailment = m
                    .entailment_index
                    .or_else(|| m.labels.iter().position(|l| l.to_lowercase().starts_with("entail")))
                    .ok_or_else(|| LoadError::Torch(format!("{}: manifest names no entailment label", n.model.display())))?;
                // The transformers pipeline's choice: contradiction is the first logit, or the
                // last when entailment is the first.
                let contradiction = if entailment == 0 { m.labels.len().max(1) - 1 } else { 0 };
                let enc = TextEncoder::load(&n.model, m.max_seq_len)?;
                let backend = TorchBackend::load(&n.model, device, true, cfg.model.threads)?;
                Some(Nli {
                    encoder: enc,
                    batcher: Batcher::spawn(backend, batcher_config(&cfg)),
                    entailment,
                    contradiction,
                    template: n.hypothesis_template.clone(),
                    multi_label: n.multi_label,
                    model: ModelRef { name: m.name.clone(), version: m.version.clone() },
                })
            }
            _ => None,
        };

        let mut tagger = Tagger {
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cfg.label_cache.max(1)).unwrap())),
            taxonomy: Labels { names: vec![], vectors: vec![] },
            encoder,
            batcher,
            nli,
            model,
            manifest,
            cfg,
        };
        if tagger.nli.is_none() {
            let names: Vec<String> = tagger.cfg.labels.iter().map(|l| l.name.clone()).collect();
            let descriptions: Vec<Vec<String>> = tagger.cfg.labels.iter().map(|l| l.all_descriptions()).collect();
            let vectors = tagger.embed_labels(&names, &descriptions).await.map_err(|e| LoadError::Torch(format!("embedding the taxonomy: {e}")))?;
            tagger.taxonomy = Labels { names, vectors };
        } else {
            tagger.taxonomy = Labels { names: tagger.cfg.labels.iter().map(|l| l.name.clone()).collect(), vectors: vec![] };
        }
        Ok(tagger)
    }

    /// The model whose scores are emitted.
    pub fn model_ref(&self) -> &ModelRef {
        match &self.nli {
            Some(n) => &n.model,
            None => &self.model,
        }
    }

    /// False once a model thread has died (liveness).
    pub fn is_alive(&self) -> bool {
        self.batcher.is_alive() && self.nli.as_ref().is_none_or(|n| n.batcher.is_alive())
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        if self.nli.is_some() {
            Strategy::Nli
        } else {
            Strategy::Embedding
        }
    }

    /// The embedding model's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The configuration in use.
    pub fn config(&self) -> &TaggerConfig {
        &self.cfg
    }

    /// Embed texts (each truncated to one window) — for label prompts, tests and benches.
    pub async fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, BatchError> {
        let seqs: Vec<Seq> = texts.iter().map(|t| self.encoder.windows(t, 1, 0).into_iter().next().unwrap_or_else(|| Seq::new(vec![]))).collect();
        self.batcher.infer(seqs).await
    }

    /// Embed a whole text: windows, pooled (mean, renormalised). `None` for empty text.
    pub async fn embed_document(&self, text: &str) -> Result<Option<Vec<f32>>, BatchError> {
        let windows = self.encoder.windows(text, self.cfg.text.max_windows, self.cfg.text.stride);
        if windows.is_empty() {
            return Ok(None);
        }
        let rows = self.batcher.infer(windows).await?;
        Ok(Some(mean_pool(&rows)))
    }

    /// The prompts of one label: each template, once per description where it has
    /// `{description}` (the label's name standing in when it has none).
    pub fn label_prompts(&self, name: &str, descriptions: &[String]) -> Vec<String> {
        let fallback = [name.to_string()];
        let descs: &[String] = if descriptions.is_empty() { &fallback } else { descriptions };
        let mut out = Vec::new();
        for t in &self.cfg.embedding.templates {
            if t.contains("{description}") {
                out.extend(descs.iter().map(|d| t.replace("{label}", name).replace("{description}", d)));
            } else {
                out.push(t.replace("{label}", name));
            }
        }
        out
    }

    async fn embed_labels(&self, names: &[String], descriptions: &[Vec<String>]) -> Result<Vec<Arc<Vec<f32>>>, BatchError> {
        let per_label: Vec<Vec<String>> = names.iter().zip(descriptions).map(|(n, d)| self.label_prompts(n, d)).collect();
        let flat: Vec<String> = per_label.iter().flatten().cloned().collect();
        let mut rows = self.embed_texts(&flat).await?.into_iter();
        Ok(per_label.iter().map(|p| Arc::new(mean_pool(&rows.by_ref().take(p.len()).collect::<Vec<_>>()))).collect())
    }

    /// Label embeddings for an item's own candidate labels, through the LRU cache.
    async fn candidate_vectors(&self, labels: &[String]) -> Result<Vec<Arc<Vec<f32>>>, BatchError> {
        let mut out: Vec<Option<Arc<Vec<f32>>>> = {
            let mut cache = self.cache.lock().unwrap();
            labels.iter().map(|l| cache.get(l).cloned()).collect()
        };
        let missing: Vec<String> = labels.iter().zip(&out).filter(|(_, v)| v.is_none()).map(|(l, _)| l.clone()).collect();
        if !missing.is_empty() {
            let descs = vec![Vec::new(); missing.len()];
            let vecs = self.embed_labels(&missing, &descs).await?;
            let mut cache = self.cache.lock().unwrap();
            let mut it = missing.iter().zip(vecs);
            for slot in out.iter_mut().filter(|s| s.is_none()) {
                let (name, v) = it.next().expect("one vector per missing label");
                cache.put(name.clone(), v.clone());
                *slot = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.expect("filled")).collect())
    }

    /// Check an item's candidate labels: non-empty, within max_labels, no blank names.
    /// Duplicates are removed, order kept.
    pub fn check_candidates(&self, labels: &[String]) -> Result<Vec<String>, TagError> {
        if labels.is_empty() {
            return Err(TagError::InvalidLabels("empty list (omit the field to use the taxonomy)".into()));
        }
        if labels.len() > self.cfg.max_labels {
            return Err(TagError::InvalidLabels(format!("{} labels exceed the maximum of {} (tagging.max_labels)", labels.len(), self.cfg.max_labels)));
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for l in labels {
            let l = l.trim();
            if l.is_empty() {
                return Err(TagError::InvalidLabels("a label is empty or whitespace".into()));
            }
            if l.chars().count() > 200 {
                return Err(TagError::InvalidLabels(format!("label '{}…' is longer than 200 characters", l.chars().take(20).collect::<String>())));
            }
            if seen.insert(l.to_string()) {
                out.push(l.to_string());
            }
        }
        Ok(out)
    }

    /// Tag one item.
    pub async fn tag(&self, req: &TagRequest) -> Result<TagResult, TagError> {
        let labels = match &req.candidate_labels {
            Some(c) => Some(self.check_candidates(c)?),
            None => None,
        };
        let text = req.text();
        if text.trim().is_empty() {
            return Ok(TagResult { tags: vec![], no_tags_reason: Some("empty_text".into()) });
        }
        let names: Vec<String> = labels.clone().unwrap_or_else(|| self.taxonomy.names.clone());
        let scores = match &self.nli {
            Some(nli) => self.nli_scores(nli, &text, &names).await?,
            None => {
                let Some(doc) = self.embed_document(&text).await? else {
                    return Ok(TagResult { tags: vec![], no_tags_reason: Some("empty_text".into()) });
                };
                let vectors = match &labels {
                    Some(l) => self.candidate_vectors(l).await?,
                    None => self.taxonomy.vectors.clone(),
                };
                let cos: Vec<f32> = vectors.iter().map(|v| dot(&doc, v)).collect();
                let e = &self.cfg.embedding;
                if e.multi_label {
                    cos.iter().map(|c| sigmoid((c - e.center) / e.scale)).collect()
                } else {
                    softmax(&cos.iter().map(|c| c / e.temperature).collect::<Vec<_>>())
                }
            }
        };
        Ok(self.rank(&names, &scores))
    }

    fn rank(&self, names: &[String], scores: &[f32]) -> TagResult {
        let mut tags: Vec<Tag> = names.iter().zip(scores).map(|(l, &s)| Tag { label: l.clone(), score: s }).collect();
        tags.sort_by(|a, b| b.score.total_cmp(&a.score));
        tags.retain(|t| t.score >= self.cfg.min_score);
        tags.truncate(self.cfg.top_k);
        let reason = tags.is_empty().then(|| "below_min_score".to_string());
        TagResult { tags, no_tags_reason: reason }
    }

    /// Scores with the semantics of the transformers zero-shot-classification pipeline.
    async fn nli_scores(&self, nli: &Nli, text: &str, labels: &[String]) -> Result<Vec<f32>, TagError> {
        let premise = nli.encoder.content_ids(text, nli.encoder.max_tokens * 8);
        if premise.is_empty() {
            return Ok(vec![0.0; labels.len()]);
        }
        let seqs: Vec<Seq> = labels.iter().map(|l| nli.encoder.pair(&premise, &nli.template.replace("{}", l))).collect();
        let logits = nli.batcher.infer(seqs).await?;
        Ok(nli_pipeline_scores(&logits, nli.entailment, nli.contradiction, nli.multi_label))
    }
}

/// `logits[label][class]` → one score per label, as the transformers pipeline computes them:
/// multi-label (or a single label): softmax over (contradiction, entailment) per label, keep
/// entailment; otherwise softmax of the entailment logits across labels.
pub fn nli_pipeline_scores(logits: &[Vec<f32>], entailment: usize, contradiction: usize, multi_label: bool) -> Vec<f32> {
    if multi_label || logits.len() == 1 {
        logits.iter().map(|l| softmax(&[l[contradiction], l[entailment]])[1]).collect()
    } else {
        softmax(&logits.iter().map(|l| l[entailment]).collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_joins_present_parts_in_order() {
        let r = TagRequest { title: " T ".into(), description: Some("".into()), transcript: Some("body".into()), candidate_labels: None };
        assert_eq!(r.text(), "T\nbody");
        assert_eq!(TagRequest::default().text(), "");
    }

    #[test]
    fn softmax_and_pool_are_normalised() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
        let v = mean_pool(&[vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn nli_scores_follow_the_pipeline() {
        let logits = vec![vec![0.0, 0.0, 2.0], vec![1.0, 0.0, 0.0]];
        let single = nli_pipeline_scores(&logits, 2, 0, false);
        assert!((single.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(single[0] > single[1]);
        let multi = nli_pipeline_scores(&logits, 2, 0, true);
        assert!((multi[0] - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
        assert!((multi[1] - 1.0 / (1.0 + 1.0f32.exp())).abs() < 1e-6);
    }
}

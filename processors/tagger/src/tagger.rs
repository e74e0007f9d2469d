//! Zero-shot tagging: text in, ranked tags out, through the batcher.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use streamoasis_pipeline::events::{MediaKind, ModelRef, Strategy, Tag};

use crate::batcher::{BatchError, Batcher, BatcherConfig, Seq};
use crate::config::{kind_symbol, Calibration, KindSettings, Placement, Precision, StrategyKind, TaggerConfig};
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
    /// Kind of media (chooses the prompt templates and scoring of `tagging.embedding.kinds`).
    pub kind: MediaKind,
    /// BCP 47 language tag, if known (see `tagging.languages`).
    pub language: Option<String>,
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

    /// Title and description only (the cheap first look of adaptive compute).
    pub fn lead(&self) -> String {
        let mut parts: Vec<&str> = vec![self.title.trim()];
        if let Some(d) = &self.description {
            parts.push(d.trim());
        }
        parts.retain(|p| !p.is_empty());
        parts.join("\n")
    }
}

/// Whether most letters of `text` are in a script other than Latin (a cheap guard for items
/// without a `language` field; Greek/Cyrillic/CJK/Arabic/… text is not English).
pub fn mostly_non_latin(text: &str) -> bool {
    let (mut latin, mut other) = (0usize, 0usize);
    for c in text.chars().take(2000).filter(|c| c.is_alphabetic()) {
        if (c as u32) < 0x250 || ('\u{1E00}'..='\u{1EFF}').contains(&c) {
            latin += 1;
        } else {
            other += 1;
        }
    }
    other > latin
}

/// The tags of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct TagResult {
    /// Sorted by score, highest first: at most `top_k`, at least `min_score`.
    pub tags: Vec<Tag>,
    /// Every candidate label's score, highest first (for ranking; not cut by top_k/min_score).
    pub scores: Vec<Tag>,
    /// Why there are no tags, if there are none.
    pub no_tags_reason: Option<String>,
    /// The taxonomy the tags were made with ([`TaggerConfig::taxonomy_version`]): the loaded
    /// taxonomy's, or that of the item's own candidate labels.
    pub taxonomy_version: String,
    /// What the model read of the item, when `tagging.store_embeddings` is on (embedding
    /// strategy only): enough to score it again under another taxonomy without the model.
    pub embedding: Option<ItemEmbedding>,
}

/// What the embedding strategy read of one item: the window embeddings its scores were computed
/// from and the facts adaptive compute decided on. With it, [`Tagger::tag_from_embedding`]
/// scores the item under the current taxonomy exactly as [`Tagger::tag`] would, without the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemEmbedding {
    /// [`Tagger::embedding_version`] of the tagger that computed the rows.
    pub embedding_version: String,
    /// [`text_hash`] of the title + description and the whole text.
    pub text_hash: String,
    /// Window embeddings of the lead (title + description), when adaptive compute read it.
    pub lead: Option<Vec<Vec<f32>>>,
    /// Window embeddings of the whole text, when it was read (not when the lead decided).
    pub windows: Option<Vec<Vec<f32>>>,
    /// Informative tokens of title + description (None: the item has no description).
    pub lead_evidence: Option<usize>,
    /// Whether the item has a transcript (adaptive compute reads the lead first only then).
    pub has_body: bool,
}

impl ItemEmbedding {
    /// As carried in a tagged event, with the item's own candidate labels.
    pub fn to_event(&self, candidate_labels: Option<Vec<String>>) -> streamoasis_pipeline::events::ItemEmbedding {
        use streamoasis_pipeline::events::rows_to_bytes;
        let dim = self.lead.iter().chain(&self.windows).flatten().next().map_or(0, Vec::len);
        streamoasis_pipeline::events::ItemEmbedding {
            embedding_version: self.embedding_version.clone(),
            text_hash: self.text_hash.clone(),
            dim: dim as i32,
            lead: self.lead.as_deref().map(rows_to_bytes),
            windows: self.windows.as_deref().map(rows_to_bytes),
            lead_evidence: self.lead_evidence.map(|n| n.min(i32::MAX as usize) as i32),
            has_body: self.has_body,
            candidate_labels,
        }
    }

    /// From a tagged event's (or a stored row's) form.
    pub fn from_event(e: &streamoasis_pipeline::events::ItemEmbedding) -> Result<Self, String> {
        use streamoasis_pipeline::events::rows_from_bytes;
        let dim = usize::try_from(e.dim).map_err(|_| format!("dim {} is negative", e.dim))?;
        Ok(ItemEmbedding {
            embedding_version: e.embedding_version.clone(),
            text_hash: e.text_hash.clone(),
            lead: e.lead.as_deref().map(|b| rows_from_bytes(b, dim)).transpose()?,
            windows: e.windows.as_deref().map(|b| rows_from_bytes(b, dim)).transpose()?,
            lead_evidence: e.lead_evidence.and_then(|n| usize::try_from(n).ok()),
            has_body: e.has_body,
        })
    }
}

/// A stable hash of the text an item is read from: its lead and its whole text
/// (`th-` and 32 hex digits of SHA-256). Equal hashes, equal text.
pub fn text_hash(req: &TagRequest) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(req.lead().as_bytes());
    h.update([0u8]);
    h.update(req.text().as_bytes());
    let hex: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("th-{hex}")
}

/// Which rows the scoring decision needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Lead,
    Text,
}

/// The rows read so far for one item.
#[derive(Default)]
struct Read {
    lead: Option<Vec<Vec<f32>>>,
    windows: Option<Vec<Vec<f32>>>,
}

/// One step of the embedding strategy's decision over the rows read so far.
enum Step {
    Need(Part),
    /// The scores (None: the text had no windows).
    Done(Option<Vec<f32>>),
}

/// What the embedding decision looks at besides the rows.
struct ScoreCtx<'a> {
    lead_evidence: Option<usize>,
    has_body: bool,
    vectors: &'a [Arc<Vec<f32>>],
    names: &'a [String],
    kind: MediaKind,
    ks: KindSettings<'a>,
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

/// How a request enters a full batcher queue: wait for room (stream) or fail at once (API).
#[derive(Debug, Clone, Copy)]
enum Admit {
    Wait,
    FailFast,
}

impl Admit {
    async fn infer(self, b: &Batcher, seqs: Vec<Seq>) -> Result<Vec<Vec<f32>>, BatchError> {
        match self {
            Admit::Wait => b.infer(seqs).await,
            Admit::FailFast => b.try_infer(seqs).await,
        }
    }
}

struct Labels {
    names: Vec<String>,
    /// One normalised embedding per label (embedding strategy).
    vectors: Vec<Arc<Vec<f32>>>,
    /// The same labels embedded with the templates of kinds that have their own.
    kind_vectors: HashMap<MediaKind, Vec<Arc<Vec<f32>>>>,
    /// [`TaggerConfig::taxonomy_version`] of these labels.
    version: String,
}

struct Nli {
    encoder: TextEncoder,
    batcher: Batcher,
    entailment: usize,
    contradiction: usize,
    template: String,
    multi_label: bool,
}

/// The bi-encoder: its tokenizer and batcher (over the embedding model).
struct EmbeddingScorer {
    encoder: TextEncoder,
    batcher: Batcher,
}

/// The scoring strategy, each owning its model, encoder and batcher: the NLI strategy loads no
/// embedding model and the embedding strategy no NLI model.
enum Scorer {
    Embedding(EmbeddingScorer),
    Nli(Nli),
}

/// A loaded tagger: one scorer, cached label embeddings.
pub struct Tagger {
    cfg: TaggerConfig,
    scorer: Scorer,
    /// The taxonomy in use; swapped whole by [`Tagger::reload_labels`].
    taxonomy: std::sync::RwLock<Arc<Labels>>,
    cache: Mutex<LruCache<String, Arc<Vec<f32>>>>,
    /// Held while missing candidate labels are embedded, so a burst of items with the same new
    /// labels embeds them once instead of once per item.
    label_fill: tokio::sync::Mutex<()>,
    model: ModelRef,
    manifest: Manifest,
    /// Embeddings of each calibration's fitted labels (None: `embedding.calibration`; a kind:
    /// that kind's calibration under its templates), for carrying pairs to unseen names.
    fitted: HashMap<Option<MediaKind>, crate::scoring::FittedLabels>,
    /// [`Tagger::embedding_version`], fixed at load (it depends on the model and the windowing,
    /// neither of which a reload changes).
    embedding_version: String,
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
    pub async fn load(mut cfg: TaggerConfig) -> Result<Tagger, LoadError> {
        // A config not made by `from_topology` reads its directions files relative to the
        // working directory (a no-op for those already read).
        cfg.load_directions("tagging", |p| p.to_path_buf()).map_err(|e| LoadError::Config(e.to_string()))?;
        let device = parse_device(&cfg.model.device)?;
        if cfg.model.precision == Precision::Int8 && cfg.batching.max_batch_size > 1 {
            tracing::warn!(
                max_batch_size = cfg.batching.max_batch_size,
                "tagging.model.precision int8 with tagging.batching.max_batch_size > 1: dynamic int8 scales activations per batch, so an item's scores move with the other items in its batch (by up to ~0.1, BENCHMARKS.md \"Precision candidates\"); max_batch_size: 1 keeps them independent, at a lower peak rate"
            );
        }
        let (scorer, manifest) = match (&cfg.strategy, &cfg.nli) {
            (StrategyKind::Nli, Some(n)) => {
                let m = read_manifest(&n.model)?;
                let entailment = m.entailment_index.or_else(|| m.labels.iter().position(|l| l.to_lowercase().starts_with("entail"))).ok_or_else(|| {
                    LoadError::Config(format!("{}: the manifest names no entailment label (an NLI model's labels must include one starting with 'entail')", n.model.display()))
                })?;
                // The transformers pipeline's choice: contradiction is the first logit, or the
                // last when entailment is the first.
                let contradiction = if entailment == 0 { m.labels.len().max(1) - 1 } else { 0 };
                let enc = TextEncoder::load(&n.model, m.max_seq_len)?;
                let backend = TorchBackend::load(&n.model, device, true, cfg.model.threads)?;
                let nli = Nli {
                    encoder: enc,
                    batcher: Batcher::spawn(backend, batcher_config(&cfg)),
                    entailment,
                    contradiction,
                    template: n.hypothesis_template.clone(),
                    multi_label: n.multi_label,
                };
                (Scorer::Nli(nli), m)
            }
            (StrategyKind::Nli, None) => return Err(LoadError::Config("tagging.strategy is nli but tagging.nli is missing: add tagging.nli.model".into())),
            (StrategyKind::Embedding, _) => {
                let manifest = read_manifest(&cfg.model.path)?;
                let max_tokens = if cfg.text.max_tokens == 0 { manifest.max_seq_len } else { cfg.text.max_tokens.min(manifest.max_seq_len) };
                let encoder = TextEncoder::load(&cfg.model.path, max_tokens)?;
                let file = manifest.module_file(&cfg.model.path, cfg.model.precision)?;
                let backend = TorchBackend::load_file(&cfg.model.path, &file, device, false, cfg.model.threads)?;
                let batcher = Batcher::spawn(backend, batcher_config(&cfg));
                (Scorer::Embedding(EmbeddingScorer { encoder, batcher }), manifest)
            }
        };
        if !matches!(scorer, Scorer::Nli(_)) {
            for (key, c) in cfg.calibrations() {
                if let (Some(d), Some(path)) = (&c.loaded_directions, &c.directions) {
                    if let Some(why) = d.mismatch(&manifest) {
                        return Err(LoadError::Config(format!(
                            "tagging.{key}.directions ({}): {why}. Directions and pairs are fitted for one model: refit both for this one \
                             (benches/python/film_accuracy.py --model <dir> --directions-out <file>) or remove the key",
                            path.display()
                        )));
                    }
                }
            }
        }
        let model = ModelRef { name: manifest.name.clone(), version: manifest.version.clone() };

        let mut tagger = Tagger {
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cfg.label_cache.max(1)).unwrap())),
            taxonomy: std::sync::RwLock::new(Arc::new(Labels { names: vec![], vectors: vec![], kind_vectors: HashMap::new(), version: String::new() })),
            label_fill: tokio::sync::Mutex::new(()),
            scorer,
            model,
            manifest,
            cfg,
            fitted: HashMap::new(),
            embedding_version: String::new(),
        };
        tagger.embedding_version = tagger.compute_embedding_version();
        let labels = tagger.cfg.labels.clone();
        let taxonomy = tagger.embed_taxonomy(&labels).await.map_err(|source| LoadError::Embedding { what: "the taxonomy", source })?;
        tagger.taxonomy = std::sync::RwLock::new(Arc::new(taxonomy));
        tagger.fitted = tagger.embed_fitted().await.map_err(|source| LoadError::Embedding { what: "the calibrations' labels", source })?;
        Ok(tagger)
    }

    async fn embed_taxonomy(&self, labels: &[crate::config::LabelSpec]) -> Result<Labels, BatchError> {
        let names: Vec<String> = labels.iter().map(|l| l.name.clone()).collect();
        let version = self.cfg.taxonomy_version(labels);
        if matches!(self.scorer, Scorer::Nli(_)) {
            return Ok(Labels { names, vectors: vec![], kind_vectors: HashMap::new(), version });
        }
        let descriptions: Vec<Vec<String>> = labels.iter().map(|l| l.all_descriptions()).collect();
        let vectors = self.embed_labels(&self.cfg.embedding.templates, &names, &descriptions).await?;
        let mut kind_vectors = HashMap::new();
        for (kind, s) in &self.cfg.embedding.kinds {
            if let Some(templates) = &s.templates {
                kind_vectors.insert(*kind, self.embed_labels(templates, &names, &descriptions).await?);
            }
        }
        Ok(Labels { names, vectors, kind_vectors, version })
    }

    /// The fitted labels of every calibration in use, embedded with their kind's templates.
    async fn embed_fitted(&self) -> Result<HashMap<Option<MediaKind>, crate::scoring::FittedLabels>, BatchError> {
        let mut out = HashMap::new();
        if matches!(self.scorer, Scorer::Nli(_)) {
            return Ok(out);
        }
        let mut todo: Vec<(Option<MediaKind>, &[String], &Calibration)> = Vec::new();
        if let Some(c) = &self.cfg.embedding.calibration {
            todo.push((None, self.cfg.embedding.templates.as_slice(), c));
        }
        for kind in self.cfg.embedding.kinds.keys() {
            let ks = self.cfg.for_kind(*kind);
            if let Some(c) = ks.calibration {
                todo.push((Some(*kind), ks.templates, c));
            }
        }
        for (key, templates, c) in todo {
            if !c.transfer.enabled || c.labels.is_empty() {
                continue;
            }
            let names: Vec<String> = c.labels.keys().cloned().collect();
            let vecs = self.embed_labels(templates, &names, &vec![Vec::new(); names.len()]).await?;
            out.insert(key, names.into_iter().zip(vecs).collect());
        }
        Ok(out)
    }

    /// Replace the taxonomy without a restart (SIGHUP): the new labels are embedded first and
    /// swapped in whole, so every item is tagged with either the old or the new taxonomy.
    /// Validate the labels (`TaggerConfig::validate`) before calling this.
    pub async fn reload_labels(&self, labels: &[crate::config::LabelSpec]) -> Result<(), BatchError> {
        let next = self.embed_taxonomy(labels).await?;
        *self.taxonomy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// The taxonomy version of the labels in use ([`TaggerConfig::taxonomy_version`]).
    pub fn taxonomy_version(&self) -> String {
        self.taxonomy.read().unwrap_or_else(|e| e.into_inner()).version.clone()
    }

    /// Names of the taxonomy labels in use.
    pub fn label_names(&self) -> Vec<String> {
        self.taxonomy.read().unwrap_or_else(|e| e.into_inner()).names.clone()
    }

    /// The model whose scores are emitted.
    pub fn model_ref(&self) -> &ModelRef {
        &self.model
    }

    /// Run the model over the batch shapes it will see, for at most `budget` (start-up, before
    /// reporting ready: see [`crate::warmup`]).
    pub async fn warm_up(&self, budget: std::time::Duration) -> Result<crate::warmup::Report, BatchError> {
        let (encoder, batcher) = match &self.scorer {
            Scorer::Embedding(e) => (&e.encoder, &e.batcher),
            Scorer::Nli(n) => (&n.encoder, &n.batcher),
        };
        crate::warmup::warm_model(encoder, batcher, &self.cfg, budget).await
    }

    /// False once a model thread has died (liveness).
    pub fn is_alive(&self) -> bool {
        match &self.scorer {
            Scorer::Embedding(e) => e.batcher.is_alive(),
            Scorer::Nli(n) => n.batcher.is_alive(),
        }
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        match self.scorer {
            Scorer::Nli(_) => Strategy::Nli,
            Scorer::Embedding(_) => Strategy::Embedding,
        }
    }

    fn embedder(&self) -> Result<&EmbeddingScorer, BatchError> {
        match &self.scorer {
            Scorer::Embedding(e) => Ok(e),
            Scorer::Nli(_) => Err(BatchError::Model("the nli strategy loads no embedding model".into())),
        }
    }

    /// The scoring model's manifest (the embedding model's, or the NLI model's).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The configuration in use.
    pub fn config(&self) -> &TaggerConfig {
        &self.cfg
    }

    /// Embed texts (each truncated to one window) — for label prompts, tests and benches.
    pub async fn embed_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, BatchError> {
        let e = self.embedder()?;
        let seqs: Vec<Seq> = texts.iter().map(|t| e.encoder.windows(t, 1, 0).into_iter().next().unwrap_or_else(|| Seq::new(vec![]))).collect();
        e.batcher.infer(seqs).await
    }

    /// Embed a whole text: its windows within `text.max_tokens_per_item`, mean-pooled and
    /// renormalised (a label-independent embedding). `None` for empty text.
    pub async fn embed_document(&self, text: &str) -> Result<Option<Vec<f32>>, BatchError> {
        let rows = self.embed_windows(text, Admit::Wait).await?;
        Ok((!rows.is_empty()).then(|| mean_pool(&rows)))
    }

    /// The windows an item's text is read in: whole up to the token budget; beyond it, as many
    /// windows as the budget pays for, spread over the text (or from its head).
    pub fn window_count(&self) -> Result<usize, BatchError> {
        let e = self.embedder()?;
        let t = &self.cfg.text;
        Ok(crate::scoring::windows_for_budget(t.max_tokens_per_item, e.encoder.max_tokens, t.stride))
    }

    /// One embedding per window of `text` (empty for empty text).
    async fn embed_windows(&self, text: &str, admit: Admit) -> Result<Vec<Vec<f32>>, BatchError> {
        let e = self.embedder()?;
        let t = &self.cfg.text;
        let n = self.window_count()?;
        let started = std::time::Instant::now();
        let windows = match t.placement {
            Placement::Spread => e.encoder.windows_spread(text, n, t.stride),
            Placement::Head => e.encoder.windows(text, n, t.stride),
        };
        crate::batcher::observe_step("tokenize", started);
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        admit.infer(&e.batcher, windows).await
    }

    async fn embed_labels(&self, templates: &[String], names: &[String], descriptions: &[Vec<String>]) -> Result<Vec<Arc<Vec<f32>>>, BatchError> {
        let per_label: Vec<Vec<String>> = names.iter().zip(descriptions).map(|(n, d)| label_prompts_with(templates, n, d)).collect();
        let flat: Vec<String> = per_label.iter().flatten().cloned().collect();
        let mut rows = self.embed_texts(&flat).await?.into_iter();
        Ok(per_label.iter().map(|p| Arc::new(mean_pool(&rows.by_ref().take(p.len()).collect::<Vec<_>>()))).collect())
    }

    /// Label embeddings for an item's own candidate labels, through the LRU cache (keyed by
    /// the kind when the kind has its own templates).
    async fn candidate_vectors(&self, kind: MediaKind, labels: &[String]) -> Result<Vec<Arc<Vec<f32>>>, BatchError> {
        let ks = self.cfg.for_kind(kind);
        let prefix = if ks.own_templates { kind_symbol(kind) } else { String::new() };
        let key = |l: &str| format!("{prefix}\u{1f}{l}");
        let mut out: Vec<Option<Arc<Vec<f32>>>> = {
            let mut cache = self.cache.lock().unwrap();
            labels.iter().map(|l| cache.get(&key(l)).cloned()).collect()
        };
        // Misses wait for any fill in progress, then look again (it may have embedded theirs);
        // the lock is kept until this fill is cached.
        let _fill = if out.iter().any(Option::is_none) {
            let guard = self.label_fill.lock().await;
            let mut cache = self.cache.lock().unwrap();
            for (slot, l) in out.iter_mut().zip(labels) {
                if slot.is_none() {
                    *slot = cache.get(&key(l)).cloned();
                }
            }
            Some(guard)
        } else {
            None
        };
        let missing: Vec<String> = labels.iter().zip(&out).filter(|(_, v)| v.is_none()).map(|(l, _)| l.clone()).collect();
        if !missing.is_empty() {
            let descs = vec![Vec::new(); missing.len()];
            let vecs = self.embed_labels(ks.templates, &missing, &descs).await?;
            let mut cache = self.cache.lock().unwrap();
            let mut it = missing.iter().zip(vecs);
            for slot in out.iter_mut().filter(|s| s.is_none()) {
                let (name, v) = it.next().expect("one vector per missing label");
                cache.put(key(name), v.clone());
                *slot = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.expect("filled")).collect())
    }
}

/// The prompts of one label for a template set: each template, once per description where it has
/// `{description}` (the label's name standing in when it has none).
pub fn label_prompts_with(templates: &[String], name: &str, descriptions: &[String]) -> Vec<String> {
    {
        let fallback = [name.to_string()];
        let descs: &[String] = if descriptions.is_empty() { &fallback } else { descriptions };
        let mut out = Vec::new();
        for t in templates {
            if t.contains("{description}") {
                out.extend(descs.iter().map(|d| t.replace("{label}", name).replace("{description}", d)));
            } else {
                out.push(t.replace("{label}", name));
            }
        }
        out
    }
}

impl Tagger {
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

    /// Whether an item is in a language the model does not read (`tagging.languages`).
    pub fn unsupported_language(&self, req: &TagRequest, text: &str) -> Option<String> {
        if self.cfg.languages.is_empty() {
            return None;
        }
        match req.language.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
            Some(lang) => {
                let primary = lang.split(['-', '_']).next().unwrap_or(lang).to_lowercase();
                (!self.cfg.languages.iter().any(|l| l.eq_ignore_ascii_case(&primary))).then_some(primary)
            }
            None => mostly_non_latin(text).then(|| "non-latin script".to_string()),
        }
    }

    /// Tag one item; waits while the batcher queue is full (the stream's backpressure).
    pub async fn tag(&self, req: &TagRequest) -> Result<TagResult, TagError> {
        self.tag_with(req, Admit::Wait).await
    }

    /// Tag one item, failing at once with `BatchError::QueueFull` when the batcher queue has no
    /// room for its sequences (synchronous API callers: "busy, retry later").
    pub async fn try_tag(&self, req: &TagRequest) -> Result<TagResult, TagError> {
        self.tag_with(req, Admit::FailFast).await
    }

    async fn tag_with(&self, req: &TagRequest, admit: Admit) -> Result<TagResult, TagError> {
        let labels = match &req.candidate_labels {
            Some(c) => Some(self.check_candidates(c)?),
            None => None,
        };
        let taxonomy = self.taxonomy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let version = match &labels {
            Some(l) => {
                let specs: Vec<crate::config::LabelSpec> = l.iter().map(|n| crate::config::LabelSpec { name: n.clone(), description: None, descriptions: vec![] }).collect();
                self.cfg.taxonomy_version(&specs)
            }
            None => taxonomy.version.clone(),
        };
        let untagged = |reason: &str| TagResult { tags: vec![], scores: vec![], no_tags_reason: Some(reason.into()), taxonomy_version: version.clone(), embedding: None };
        let text = req.text();
        if text.trim().is_empty() {
            return Ok(untagged("empty_text"));
        }
        if let Some(lang) = self.unsupported_language(req, &text) {
            tracing::debug!(language = %lang, "item not tagged: unsupported language");
            return Ok(untagged("unsupported_language"));
        }
        let names: Vec<String> = labels.clone().unwrap_or_else(|| taxonomy.names.clone());
        let ks = self.cfg.for_kind(req.kind);
        let (scores, embedding) = match &self.scorer {
            Scorer::Nli(nli) => (self.nli_scores(nli, &text, &names, admit).await?, None),
            Scorer::Embedding(_) => {
                let vectors = self.label_vectors(&taxonomy, req.kind, labels.as_deref()).await?;
                let ctx = ScoreCtx {
                    lead_evidence: crate::scoring::lead_evidence(&req.title, req.description.as_deref()),
                    has_body: req.transcript.as_deref().is_some_and(|t| !t.trim().is_empty()),
                    vectors: &vectors,
                    names: &names,
                    kind: req.kind,
                    ks,
                };
                let lead = req.lead();
                let mut read = Read::default();
                let scores = loop {
                    match self.step(&ctx, &read) {
                        Step::Need(Part::Lead) => read.lead = Some(self.embed_windows(&lead, admit).await?),
                        Step::Need(Part::Text) => read.windows = Some(self.embed_windows(&text, admit).await?),
                        Step::Done(s) => break s,
                    }
                };
                let Some(scores) = scores else {
                    return Ok(untagged("empty_text"));
                };
                let embedding = self.cfg.store_embeddings.then(|| ItemEmbedding {
                    embedding_version: self.embedding_version(),
                    text_hash: text_hash(req),
                    lead: read.lead,
                    windows: read.windows,
                    lead_evidence: ctx.lead_evidence,
                    has_body: ctx.has_body,
                });
                (scores, embedding)
            }
        };
        let mut result = self.rank(&names, &scores, ks.min_score, version);
        result.embedding = embedding;
        Ok(result)
    }

    /// Tag an item again from what the model read of it before ([`ItemEmbedding`]), under the
    /// current taxonomy (or `candidate_labels`), scoring, pooling and adaptive-compute settings:
    /// the same tags and scores [`Tagger::tag`] gives, without running the model over the text
    /// (label prompts not yet embedded still are). `Ok(None)` when the rows cannot answer: another
    /// model or windowing ([`Tagger::embedding_version`]), the NLI strategy, or a part the
    /// current settings need that was not read then (the item must go through the model).
    pub async fn tag_from_embedding(&self, kind: MediaKind, candidate_labels: Option<&[String]>, e: &ItemEmbedding) -> Result<Option<TagResult>, TagError> {
        if !matches!(self.scorer, Scorer::Embedding(_)) || e.embedding_version != self.embedding_version {
            return Ok(None);
        }
        let labels = match candidate_labels {
            Some(c) => Some(self.check_candidates(c)?),
            None => None,
        };
        let taxonomy = self.taxonomy.read().unwrap_or_else(|e| e.into_inner()).clone();
        let version = match &labels {
            Some(l) => self.cfg.taxonomy_version(&l.iter().map(|n| crate::config::LabelSpec { name: n.clone(), description: None, descriptions: vec![] }).collect::<Vec<_>>()),
            None => taxonomy.version.clone(),
        };
        let names: Vec<String> = labels.clone().unwrap_or_else(|| taxonomy.names.clone());
        let ks = self.cfg.for_kind(kind);
        let vectors = self.label_vectors(&taxonomy, kind, labels.as_deref()).await?;
        let ctx = ScoreCtx { lead_evidence: e.lead_evidence, has_body: e.has_body, vectors: &vectors, names: &names, kind, ks };
        let mut read = Read::default();
        let scores = loop {
            match self.step(&ctx, &read) {
                Step::Need(Part::Lead) => match &e.lead {
                    Some(rows) => read.lead = Some(rows.clone()),
                    None => return Ok(None),
                },
                Step::Need(Part::Text) => match &e.windows {
                    Some(rows) => read.windows = Some(rows.clone()),
                    None => return Ok(None),
                },
                Step::Done(s) => break s,
            }
        };
        let mut result = match scores {
            Some(s) => self.rank(&names, &s, ks.min_score, version),
            None => TagResult { tags: vec![], scores: vec![], no_tags_reason: Some("empty_text".into()), taxonomy_version: version, embedding: None },
        };
        result.embedding = None;
        Ok(Some(result))
    }

    /// A stored item (a `media_embeddings` row as its tagged event, `embedding` set) tagged
    /// again from its rows under the current taxonomy: the event a retag emits (the rows are not
    /// sent again), or `None` when the rows cannot answer ([`Tagger::tag_from_embedding`]; also
    /// rows that do not decode, which the model rewrites).
    pub async fn retag_stored(&self, mut e: streamoasis_pipeline::events::MediaTagged) -> Result<Option<streamoasis_pipeline::events::MediaTagged>, TagError> {
        let Some(payload) = e.embedding.take() else { return Ok(None) };
        let emb = match ItemEmbedding::from_event(&payload) {
            Ok(emb) => emb,
            Err(m) => {
                tracing::warn!(media_id = %e.media_id, error = %m, "stored embedding rows do not decode: the item needs the model");
                return Ok(None);
            }
        };
        let Some(r) = self.tag_from_embedding(e.kind, payload.candidate_labels.as_deref(), &emb).await? else { return Ok(None) };
        e.tags = r.tags;
        e.no_tags_reason = r.no_tags_reason;
        e.taxonomy_version = Some(r.taxonomy_version);
        e.model = self.model_ref().clone();
        e.strategy = self.strategy();
        e.tagged_at = streamoasis_pipeline::events::now_millis();
        Ok(Some(e))
    }

    /// Identifies what window embeddings depend on besides the text: the model (name and
    /// version) and the windowing (window length, stride, placement, token budget). Stored rows
    /// of another embedding version cannot be reused.
    pub fn embedding_version(&self) -> String {
        self.embedding_version.clone()
    }

    fn compute_embedding_version(&self) -> String {
        use sha2::Digest;
        let t = &self.cfg.text;
        let max_tokens = match &self.scorer {
            Scorer::Embedding(e) => e.encoder.max_tokens,
            Scorer::Nli(n) => n.encoder.max_tokens,
        };
        let canonical = serde_json::json!({
            "model": [&self.model.name, &self.model.version],
            "precision": format!("{:?}", self.cfg.model.precision),
            "window_tokens": max_tokens,
            "stride": t.stride,
            "placement": format!("{:?}", t.placement),
            "max_tokens_per_item": t.max_tokens_per_item,
        });
        let d = sha2::Sha256::digest(canonical.to_string().as_bytes());
        let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("ev-{hex}")
    }

    /// Label vectors for an item: its candidate labels', or the taxonomy's (under its kind's
    /// templates where the kind has its own).
    async fn label_vectors(&self, taxonomy: &Labels, kind: MediaKind, candidates: Option<&[String]>) -> Result<Vec<Arc<Vec<f32>>>, BatchError> {
        Ok(match candidates {
            Some(l) => self.candidate_vectors(kind, l).await?,
            None => match taxonomy.kind_vectors.get(&kind) {
                Some(v) => v.clone(),
                None => taxonomy.vectors.clone(),
            },
        })
    }

    /// The embedding strategy's decision over the rows read so far. Adaptive compute: with a
    /// body, evidence in the lead ("Episode 12" has none) and `text.adaptive_margin` > 0, the
    /// lead is read first and decides alone when its calibrated top-2 margin is wide enough;
    /// otherwise the whole text is read and decides.
    fn step(&self, c: &ScoreCtx<'_>, read: &Read) -> Step {
        let t = &self.cfg.text;
        let adaptive = t.adaptive_margin > 0.0 && c.has_body && crate::scoring::evidence_suffices(c.lead_evidence, t.min_evidence_tokens);
        if adaptive {
            match &read.lead {
                None => return Step::Need(Part::Lead),
                Some(rows) if !rows.is_empty() => {
                    let doc = crate::scoring::pool(rows, c.vectors, t.pooling);
                    let s = self.score(&doc, c.vectors, c.names, c.kind, c.ks);
                    if top2_margin(&s) >= t.adaptive_margin {
                        return Step::Done(Some(s));
                    }
                }
                Some(_) => {}
            }
        }
        match &read.windows {
            None => Step::Need(Part::Text),
            Some(rows) if rows.is_empty() => Step::Done(None),
            Some(rows) => {
                let doc = crate::scoring::pool(rows, c.vectors, t.pooling);
                Step::Done(Some(self.score(&doc, c.vectors, c.names, c.kind, c.ks)))
            }
        }
    }

    fn score(&self, doc: &[f32], vectors: &[Arc<Vec<f32>>], names: &[String], kind: MediaKind, ks: KindSettings<'_>) -> Vec<f32> {
        let started = std::time::Instant::now();
        let scores = self.score_cosines(doc, vectors, names, kind, ks);
        crate::batcher::observe_step("score", started);
        scores
    }

    fn score_cosines(&self, doc: &[f32], vectors: &[Arc<Vec<f32>>], names: &[String], kind: MediaKind, ks: KindSettings<'_>) -> Vec<f32> {
        let cos: Vec<f32> = vectors.iter().map(|v| dot(doc, v)).collect();
        let e = &self.cfg.embedding;
        if ks.multi_label {
            match ks.calibration {
                Some(c) => {
                    let fitted = self.fitted.get(&Some(kind)).or_else(|| self.fitted.get(&None)).map_or(&[][..], |f| f.as_slice());
                    let set = crate::scoring::calibrate_set(c, names, vectors, fitted);
                    let cos = match &set.anchored {
                        Some(anchored) => anchored.iter().map(|v| dot(doc, v)).collect(),
                        None => cos,
                    };
                    crate::scoring::calibrated_scores(&cos, &set.pairs)
                }
                None => cos.iter().map(|c| sigmoid((c - e.center) / e.scale)).collect(),
            }
        } else {
            softmax(&cos.iter().map(|c| c / e.temperature).collect::<Vec<_>>())
        }
    }

    fn rank(&self, names: &[String], scores: &[f32], min_score: f32, taxonomy_version: String) -> TagResult {
        let mut all: Vec<Tag> = names.iter().zip(scores).map(|(l, &s)| Tag { label: l.clone(), score: s }).collect();
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut tags = all.clone();
        tags.retain(|t| t.score >= min_score);
        if self.cfg.top_k > 0 {
            tags.truncate(self.cfg.top_k);
        }
        let reason = tags.is_empty().then(|| "below_min_score".to_string());
        TagResult { tags, scores: all, no_tags_reason: reason, taxonomy_version, embedding: None }
    }

    /// Scores with the semantics of the transformers zero-shot-classification pipeline.
    async fn nli_scores(&self, nli: &Nli, text: &str, labels: &[String], admit: Admit) -> Result<Vec<f32>, TagError> {
        let premise = nli.encoder.content_ids(text, nli.encoder.max_tokens * 8);
        if premise.is_empty() {
            return Ok(vec![0.0; labels.len()]);
        }
        let seqs: Vec<Seq> = labels.iter().map(|l| nli.encoder.pair(&premise, &nli.template.replace("{}", l))).collect();
        let logits = admit.infer(&nli.batcher, seqs).await?;
        Ok(nli_pipeline_scores(&logits, nli.entailment, nli.contradiction, nli.multi_label))
    }
}

/// Difference between the two highest scores (1 when there is one label).
fn top2_margin(scores: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &s in scores {
        if s > a {
            b = a;
            a = s;
        } else if s > b {
            b = s;
        }
    }
    if b.is_finite() {
        a - b
    } else {
        1.0
    }
}

/// Calibrated multi-label scores by label name alone (fitted pair, else the global pair):
/// `sigmoid(slope_l * (cos_l - mean cos) + bias_l)` per label.
pub fn calibrated(cos: &[f32], names: &[String], c: &Calibration) -> Vec<f32> {
    let mean = cos.iter().sum::<f32>() / cos.len().max(1) as f32;
    cos.iter()
        .zip(names)
        .map(|(x, n)| {
            let (a, b) = c.pair(n);
            sigmoid(a * (x - mean) + b)
        })
        .collect()
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
        let r = TagRequest { title: " T ".into(), description: Some("".into()), transcript: Some("body".into()), ..Default::default() };
        assert_eq!(r.text(), "T\nbody");
        assert_eq!(TagRequest::default().text(), "");
    }

    #[test]
    fn script_heuristic_flags_non_latin_text() {
        assert!(mostly_non_latin("東京で新しいスマートフォンが発売された"));
        assert!(mostly_non_latin("Новый смартфон поступил в продажу"));
        assert!(!mostly_non_latin("Café owners in Zürich complain about rent"));
        assert!(!mostly_non_latin("12345 !!"));
    }

    #[test]
    fn calibration_uses_per_label_pairs_and_the_item_mean() {
        let c = Calibration { slope: 10.0, bias: -1.0, labels: [("drama".to_string(), (10.0, 1.0))].into_iter().collect(), ..Default::default() };
        let s = calibrated(&[0.5, 0.5], &["Drama".into(), "western".into()], &c);
        assert!((s[0] - sigmoid(1.0)).abs() < 1e-6, "{s:?}");
        assert!((s[1] - sigmoid(-1.0)).abs() < 1e-6, "{s:?}");
        assert!((top2_margin(&[0.1, 0.7, 0.4]) - 0.3).abs() < 1e-6);
        assert_eq!(top2_margin(&[0.2]), 1.0);
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

//! The `tagging:` section of topology.yaml, validated into [`TaggerConfig`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use streamoasis_pipeline::events::MediaKind;
use streamoasis_pipeline::topology::{ConfigError, Topology};

/// Which zero-shot strategy scores labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    /// Bi-encoder: cosine between the item and label-prompt embeddings. One forward pass per
    /// item window; label embeddings cached. Fast.
    #[default]
    Embedding,
    /// Cross-encoder NLI (entailment of a hypothesis per label). items × labels forward passes.
    Nli,
}

/// Model location and runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Folder with `model.pt`, `tokenizer.json`, `manifest.json` (written by scripts/setup).
    pub path: PathBuf,
    /// `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Intra-op threads for the model; 0 = the cores available to the process.
    #[serde(default)]
    pub threads: usize,
    /// `fp32` (`model.pt`), `int8` (`model.int8.pt`: dynamic int8 linears; fastest on the CPU,
    /// but an item's scores move with its batch company), `int8_static` (`model.int8s.pt`:
    /// activation scales fixed at export) or `bf16` (`model.bf16.pt`: bf16 matmuls, fp32
    /// LayerNorm and softmax; fast only where the CPU or GPU has bf16 kernels). The measured
    /// trade-offs are in BENCHMARKS.md ("Precision candidates").
    #[serde(default)]
    pub precision: Precision,
}

/// Numeric precision of the embedding model. Each is one module file of the export, listed
/// under `precisions` in its `manifest.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Float32 weights and activations (`model.pt`).
    #[default]
    Fp32,
    /// Dynamic int8 linear layers (`model.int8.pt`), CPU only: activations are quantised with
    /// a scale taken from each batch, so an item's scores depend on its batch company.
    Int8,
    /// Static int8 linear layers (`model.int8s.pt`), CPU only: int8 weights (per channel) and
    /// activation scales fixed at export from a calibration set, so the integer matmuls do not
    /// depend on the batch.
    Int8Static,
    /// bf16 weights and matmuls with fp32 embeddings, LayerNorm, softmax and pooling
    /// (`model.bf16.pt`). CPU or GPU.
    Bf16,
}

impl Precision {
    /// Every precision, in the order benchmarks list them.
    pub const ALL: [Precision; 4] = [Precision::Fp32, Precision::Int8, Precision::Int8Static, Precision::Bf16];

    /// The value as written in topology.yaml and in the manifest's `precisions` keys.
    pub fn key(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Int8Static => "int8_static",
            Precision::Bf16 => "bf16",
        }
    }

    /// The manifest's default file name for this precision.
    pub fn default_file(self) -> &'static str {
        match self {
            Precision::Fp32 => "model.pt",
            Precision::Int8 => "model.int8.pt",
            Precision::Int8Static => "model.int8s.pt",
            Precision::Bf16 => "model.bf16.pt",
        }
    }

    /// Whether the module runs on the CPU only (quantised kernels have no CUDA implementation).
    pub fn cpu_only(self) -> bool {
        matches!(self, Precision::Int8 | Precision::Int8Static)
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL.into_iter().find(|p| p.key() == s).ok_or_else(|| format!("'{s}' is not a precision (fp32 | int8 | int8_static | bf16)"))
    }
}

fn default_device() -> String {
    "cpu".into()
}

/// Embedding-strategy settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// Prompt templates; `{label}` is the label's name; a template with `{description}` yields
    /// one prompt per description (the name when there is none). All prompts are averaged.
    #[serde(default = "default_templates")]
    pub templates: Vec<String>,
    /// Softmax temperature over cosines (single-label). Lower = peakier scores.
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Independent per-label scores (sigmoid) instead of a softmax over labels.
    #[serde(default)]
    pub multi_label: bool,
    /// Multi-label calibration: score = sigmoid((cos - center) / scale).
    #[serde(default = "default_center")]
    pub center: f32,
    /// Multi-label calibration scale.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Fitted multi-label calibration (replaces center/scale when present); see [`Calibration`].
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Per media kind (`MOVIE`, `EPISODE`, `ARTICLE`, … as in the `kind` field): templates and
    /// scoring for items of that kind. Kinds not listed use the settings above.
    #[serde(default)]
    pub kinds: std::collections::HashMap<MediaKind, KindSpec>,
}

/// Multi-label calibration fitted on a labelled calibration split
/// (`benches/python/film_accuracy.py` prints one): the score of label `l` for an item is
/// `sigmoid(slope_l * (cos_l - mean cos over the item's labels) + bias_l)`, an estimate of the
/// probability that `l` applies, so a threshold (`min_score`) has the same meaning for every
/// label. Subtracting the item's mean over its candidates normalises each item across its own
/// label set. Labels without their own pair get one carried over from the fitted labels whose
/// embeddings are nearest to theirs ([`Transfer`]; "sci-fi" takes most of "science fiction"'s
/// pair), or `slope`/`bias` when none is near (docs/quality.md).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Slope for labels without their own pair.
    pub slope: f32,
    /// Bias for labels without their own pair.
    pub bias: f32,
    /// `label: [slope, bias]` (the bias carries the label's prior).
    #[serde(default)]
    pub labels: BTreeMap<String, (f32, f32)>,
    /// How pairs carry over to labels that were never fitted.
    #[serde(default)]
    pub transfer: Transfer,
    /// A file of fitted label *directions* (JSON written by `benches/python/film_accuracy.py
    /// --directions-out`; relative to the topology's folder): for each fitted label, where its
    /// items sit in the model's space relative to all items of the calibration split. A label
    /// with a pair and a direction scores with `unit(its prompts' vector + weight × direction)`,
    /// and renamed labels anchor towards that moved vector ([`Transfer::anchor`]). Fitted
    /// together with the pairs and for one model: the tagger refuses it for another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directions: Option<PathBuf>,
    /// The directions file, read at load ([`TaggingSpec::load_directions`]).
    #[serde(skip)]
    pub loaded_directions: Option<Arc<Directions>>,
}

/// A calibration's fitted label directions ([`Calibration::directions`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Directions {
    /// The model the directions were fitted with (its manifest's `name`).
    pub model: String,
    /// SHA-256 of that model's weights (its manifest's `source_sha256["model.safetensors"]`).
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// Length of every vector: the model's embedding size.
    pub dims: usize,
    /// How far a fitted label's vector moves along its direction.
    pub weight: f32,
    /// Label name → unit direction.
    pub labels: BTreeMap<String, Vec<f32>>,
    /// SHA-256 of the file (part of the taxonomy version).
    #[serde(skip)]
    pub sha256: String,
}

impl Directions {
    /// Read and check a directions file.
    pub fn read(path: &Path) -> Result<Self, String> {
        use sha2::Digest;
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut d: Directions = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a directions file ({e}); write one with benches/python/film_accuracy.py --directions-out", path.display()))?;
        if d.dims == 0 {
            return Err(format!("{}: dims is 0", path.display()));
        }
        if !d.weight.is_finite() || d.weight < 0.0 {
            return Err(format!("{}: weight {} must be a number >= 0", path.display(), d.weight));
        }
        for (name, v) in &d.labels {
            if v.len() != d.dims {
                return Err(format!("{}: label '{name}' has {} numbers, dims says {}", path.display(), v.len(), d.dims));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("{}: label '{name}' has a number that is not finite", path.display()));
            }
        }
        d.sha256 = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        Ok(d)
    }

    /// Why these directions do not fit a model (its manifest), if they do not.
    pub fn mismatch(&self, manifest: &crate::model::Manifest) -> Option<String> {
        let weights = manifest.source_sha256.get("model.safetensors").and_then(|v| v.as_str());
        if self.model != manifest.name {
            return Some(format!("they were fitted for the model {} but tagging.model.path holds {}", self.model, manifest.name));
        }
        if let (Some(want), Some(have)) = (self.weights_sha256.as_deref(), weights) {
            if want != have {
                return Some(format!("they were fitted for {} weights {} but the model's are {}", self.model, short(want), short(have)));
            }
        }
        match manifest.dims {
            Some(d) if d != self.dims => Some(format!("they have {} dimensions but the model embeds into {d}", self.dims)),
            _ => None,
        }
    }
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Carrying fitted per-label pairs to other label names by the similarity of their prompt
/// embeddings (same templates as the item's kind): a softmax over the fitted labels of
/// `similarity / temperature` weighs their pairs, and a gate
/// `sigmoid((best similarity - min_similarity) / width)` blends that with the global pair, so
/// a label far from every fitted one is scored with `slope`/`bias` alone.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Off: labels without their own pair use `slope`/`bias` (the behaviour before).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Softmax temperature over cosine similarities to the fitted labels.
    #[serde(default = "default_transfer_temperature")]
    pub temperature: f32,
    /// Similarity at which the carried pair and the global pair weigh the same.
    #[serde(default = "default_min_similarity")]
    pub min_similarity: f32,
    /// Width of the gate around `min_similarity`.
    #[serde(default = "default_transfer_width")]
    pub width: f32,
    /// The share of a label set's unfitted labels that must each be *specific* to a fitted
    /// label (nearer to it than any other fitted label is) for the set to take carried pairs;
    /// otherwise every unfitted label of the set keeps the global pair. Carrying assumes the
    /// labels are the fitted categories under other names ("sci-fi", "scary movie"); a set of
    /// other things (themes, news sections on films) would borrow arbitrary priors. 0 = always
    /// carry.
    #[serde(default = "default_min_specific")]
    pub min_specific: f32,
    /// In a set that takes carried pairs, how far each specific label's vector moves towards
    /// the fitted labels it renames (0 = not at all, 1 = all the way): a paraphrase's own
    /// prompt ranks items less well than the fitted name it stands for.
    #[serde(default = "default_anchor")]
    pub anchor: f32,
}

fn default_true() -> bool {
    true
}
fn default_transfer_temperature() -> f32 {
    0.01
}
fn default_min_similarity() -> f32 {
    0.6
}
fn default_transfer_width() -> f32 {
    0.03
}
fn default_min_specific() -> f32 {
    0.5
}
fn default_anchor() -> f32 {
    0.75
}

impl Default for Transfer {
    fn default() -> Self {
        Transfer {
            enabled: true,
            temperature: default_transfer_temperature(),
            min_similarity: default_min_similarity(),
            width: default_transfer_width(),
            min_specific: default_min_specific(),
            anchor: default_anchor(),
        }
    }
}

impl Calibration {
    /// (slope, bias) fitted for a label (exact name, then lower case), if any.
    pub fn own_pair(&self, label: &str) -> Option<(f32, f32)> {
        self.labels.get(label).or_else(|| self.labels.get(&label.to_lowercase())).copied()
    }

    /// A fitted label's direction and its weight (exact name, then lower case), if the
    /// calibration has directions and the label has a pair and a direction.
    pub fn direction(&self, label: &str) -> Option<(&[f32], f32)> {
        let d = self.loaded_directions.as_ref()?;
        self.own_pair(label)?;
        let v = d.labels.get(label).or_else(|| d.labels.get(&label.to_lowercase()))?;
        Some((v.as_slice(), d.weight))
    }

    /// Read the `directions` file (resolved with `resolve`) unless already read, and check it
    /// against the pairs (`key` names the calibration in errors).
    pub fn load_directions(&mut self, key: &str, resolve: impl Fn(&Path) -> PathBuf) -> Result<(), (String, String)> {
        let Some(p) = &self.directions else { return Ok(()) };
        if self.loaded_directions.is_some() {
            return Ok(());
        }
        let path = resolve(p);
        let err = |m: String| (format!("{key}.directions"), m);
        let hint = if p.is_relative() && !path.exists() {
            format!(" (a relative path resolves against the topology's folder: put {} beside the topology or give an absolute path)", p.display())
        } else {
            String::new()
        };
        let d = Directions::read(&path).map_err(|m| err(m + &hint))?;
        if let Some(n) = d.labels.keys().find(|n| self.own_pair(n).is_none()) {
            return Err(err(format!(
                "{} has a direction for '{n}', which has no pair in {key}.labels: the pairs and the directions are fitted together \
                 (benches/python/film_accuracy.py --directions-out prints the pairs that go with the file)",
                path.display()
            )));
        }
        self.directions = Some(path);
        self.loaded_directions = Some(Arc::new(d));
        Ok(())
    }

    /// (slope, bias) for a label by name alone: its own pair, else the global one.
    pub fn pair(&self, label: &str) -> (f32, f32) {
        self.own_pair(label).unwrap_or((self.slope, self.bias))
    }

    /// Check the numbers (`key` names the calibration in errors).
    pub fn check(&self, key: &str) -> Result<(), (String, String)> {
        let t = &self.transfer;
        // NaN is refused too: only a positive number passes.
        if t.temperature.is_nan() || t.temperature <= 0.0 {
            return Err((format!("{key}.transfer.temperature"), format!("{} must be > 0", t.temperature)));
        }
        if t.width.is_nan() || t.width <= 0.0 {
            return Err((format!("{key}.transfer.width"), format!("{} must be > 0", t.width)));
        }
        if !(0.0..=1.0).contains(&t.anchor) {
            return Err((format!("{key}.transfer.anchor"), format!("{} must be a share within 0..1", t.anchor)));
        }
        if !(0.0..=1.0).contains(&t.min_specific) {
            return Err((format!("{key}.transfer.min_specific"), format!("{} must be a share within 0..1", t.min_specific)));
        }
        if !(-1.0..=1.0).contains(&t.min_similarity) {
            return Err((format!("{key}.transfer.min_similarity"), format!("{} must be a cosine within -1..1", t.min_similarity)));
        }
        if !self.slope.is_finite() || !self.bias.is_finite() || self.labels.values().any(|(a, b)| !a.is_finite() || !b.is_finite()) {
            return Err((key.to_string(), "slope and bias must be finite numbers".into()));
        }
        Ok(())
    }
}

/// Settings for the items of one media kind.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    /// Prompt templates (as `embedding.templates`), e.g. `"A film about {label}."`.
    #[serde(default)]
    pub templates: Option<Vec<String>>,
    /// Independent per-label scores for this kind.
    #[serde(default)]
    pub multi_label: Option<bool>,
    /// Fitted multi-label calibration for this kind.
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Drop tags below this score for this kind (with a calibration: the fitted threshold).
    #[serde(default)]
    pub min_score: Option<f32>,
}

fn default_templates() -> Vec<String> {
    vec!["This is about {label}.".into()]
}
fn default_temperature() -> f32 {
    0.05
}
fn default_center() -> f32 {
    0.3
}
fn default_scale() -> f32 {
    0.05
}

impl Default for EmbeddingSpec {
    fn default() -> Self {
        EmbeddingSpec {
            templates: default_templates(),
            temperature: default_temperature(),
            multi_label: false,
            center: default_center(),
            scale: default_scale(),
            calibration: None,
            kinds: std::collections::HashMap::new(),
        }
    }
}

/// NLI-strategy settings (semantics of the transformers zero-shot-classification pipeline).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NliSpec {
    /// Folder of an exported sequence-classification NLI model (manifest kind `nli`).
    pub model: PathBuf,
    /// Hypothesis; `{}` is replaced by the label.
    #[serde(default = "default_hypothesis")]
    pub hypothesis_template: String,
    /// Independent entailment-vs-contradiction per label instead of a softmax across labels.
    #[serde(default)]
    pub multi_label: bool,
}

fn default_hypothesis() -> String {
    "This example is {}.".into()
}

/// Dynamic batching knobs. See the crate docs for the trade-offs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSpec {
    /// Most sequences per forward pass. Larger amortises overhead but past ~32 on CPU the
    /// throughput falls (cache) and latency grows.
    #[serde(default = "default_batch")]
    pub max_batch_size: usize,
    /// Most padded tokens (longest × count) per forward pass: bounds memory and the time of
    /// one pass, so long windows do not hold short items hostage.
    #[serde(default = "default_tokens")]
    pub max_batch_tokens: usize,
    /// Longest an item waits for a batch to fill. Higher = fuller batches under light load,
    /// at the cost of that much added latency.
    #[serde(default = "default_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Sequences waiting for the model; callers wait (backpressure) when it is full.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Most time spent at start-up running the model over the batch shapes it will see,
    /// before the tagger reports ready (0 = no warm-up; see the `warmup` module).
    #[serde(default = "default_warmup", with = "humantime_serde")]
    pub warmup: Duration,
}

fn default_batch() -> usize {
    32
}
fn default_tokens() -> usize {
    2048
}
fn default_wait() -> Duration {
    Duration::ZERO
}
fn default_queue() -> usize {
    1024
}
/// Off: on CPU only a process's first two passes are slow (the `cold_shapes` example on an idle
/// 2-core machine: 93 and 48 ms, then 12 ms for 1 x 12 tokens; a new shape's first pass later is
/// no slower than its second), and the cold-start sweep saw no gain after ready (p50 52 ms with
/// and without a 1 s warm-up) for a later ready. A GPU's per-shape kernel selection may want it.
fn default_warmup() -> Duration {
    Duration::ZERO
}

impl Default for BatchingSpec {
    fn default() -> Self {
        BatchingSpec { max_batch_size: default_batch(), max_batch_tokens: default_tokens(), max_wait: default_wait(), queue_capacity: default_queue(), warmup: default_warmup() }
    }
}

/// How an item's text becomes model input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// Tokens per window including special tokens; 0 = the model's max_seq_len.
    #[serde(default)]
    pub max_tokens: usize,
    /// Token budget per item (title + description + transcript): text up to this length is read
    /// whole, in overlapping windows; longer text gets as many windows as the budget pays for,
    /// spread from its beginning to its end (`placement: spread`). The default, 12,000 tokens,
    /// reads an hour of speech (~150 words a minute, ~1.3 tokens a word). Cost is linear in it.
    #[serde(default = "default_tokens_per_item")]
    pub max_tokens_per_item: usize,
    /// Replaced by `max_tokens_per_item`; refused with a message saying so (kept only to name it).
    #[serde(default)]
    pub max_windows: Option<serde_json::Value>,
    /// Tokens shared by consecutive windows.
    #[serde(default = "default_stride")]
    pub stride: usize,
    /// Where the windows go when the text is longer than the budget: `spread` (evenly from
    /// the beginning to the end of the text) or `head` (the first ones only).
    #[serde(default)]
    pub placement: Placement,
    /// How the windows of one item become one embedding: `relevance` (default: windows weighted
    /// by how strongly they match any candidate label, so chatter does not outvote the part
    /// about the subject) or `mean` (every window alike, the behaviour before).
    #[serde(default)]
    pub pooling: Pooling,
    /// Adaptive compute: when > 0, an item with a transcript is first scored on its title and
    /// description alone; the transcript is skipped only when that lead carries evidence
    /// (`min_evidence_tokens` informative tokens, a description present) and the margin between
    /// its two best labels, on calibrated scores, is at least this. 0 = always read the text.
    #[serde(default)]
    pub adaptive_margin: f32,
    /// Informative tokens (words of 3+ letters that are neither stop words nor generic media
    /// words such as "episode" or "part") the title + description need before adaptive compute
    /// may skip the body.
    #[serde(default = "default_evidence_tokens")]
    pub min_evidence_tokens: usize,
}

/// How an item's windows are pooled into one embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Weighted by each window's evidence for the candidate labels (see `scoring::pool`).
    #[default]
    Relevance,
    /// The plain mean of the windows.
    Mean,
}

/// Window placement over long text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Spread over the whole text.
    #[default]
    Spread,
    /// Consecutive windows from the start.
    Head,
}

fn default_tokens_per_item() -> usize {
    12_000
}
fn default_stride() -> usize {
    32
}
fn default_evidence_tokens() -> usize {
    8
}

impl Default for TextSpec {
    fn default() -> Self {
        TextSpec {
            max_tokens: 0,
            max_tokens_per_item: default_tokens_per_item(),
            max_windows: None,
            stride: default_stride(),
            placement: Placement::default(),
            pooling: Pooling::default(),
            adaptive_margin: 0.0,
            min_evidence_tokens: default_evidence_tokens(),
        }
    }
}

/// One label of the taxonomy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    /// Label name as emitted in tags.
    pub name: String,
    /// Words describing it, used by prompt templates with `{description}`.
    #[serde(default)]
    pub description: Option<String>,
    /// Several descriptions: a `{description}` template yields one prompt per description,
    /// and the label's embedding is the mean of all its prompts (more phrasings, better recall).
    #[serde(default)]
    pub descriptions: Vec<String>,
}

impl LabelSpec {
    /// `description` and `descriptions` together.
    pub fn all_descriptions(&self) -> Vec<String> {
        self.description.iter().chain(&self.descriptions).cloned().collect()
    }
}

/// The `tagging:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaggingSpec {
    /// The embedding model (always needed: the embedding strategy and label prompts).
    pub model: ModelSpec,
    /// `embedding` (default) or `nli`.
    #[serde(default)]
    pub strategy: StrategyKind,
    /// Embedding-strategy settings.
    #[serde(default)]
    pub embedding: EmbeddingSpec,
    /// NLI-strategy settings (required when strategy is nli).
    #[serde(default)]
    pub nli: Option<NliSpec>,
    /// How many tags to emit per item (highest scores); 0 = every label above `min_score`.
    /// Every candidate's score is in `TagResult::scores` regardless.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Multi-label: drop tags below this score.
    #[serde(default)]
    pub min_score: f32,
    /// Most labels in the taxonomy or in an item's candidate_labels.
    #[serde(default = "default_max_labels")]
    pub max_labels: usize,
    /// Label-embedding cache size for per-item candidate_labels.
    #[serde(default = "default_cache")]
    pub label_cache: usize,
    /// Windowing of long text.
    #[serde(default)]
    pub text: TextSpec,
    /// Languages the model reads (BCP 47 primary subtags). Items whose `language` is another,
    /// or whose text is mostly in a non-Latin script, get no tags and
    /// `no_tags_reason: unsupported_language` instead of a silent guess. Empty = tag everything.
    #[serde(default = "default_languages")]
    pub languages: Vec<String>,
    /// Dynamic batching.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// Carry what the model read of each item (its window embeddings) in the tagged event, so
    /// the sink stores it in `media_embeddings` and `streamoasis retag --from-embeddings` can
    /// re-score items after a taxonomy change without the model. Embedding strategy only. Off
    /// by default: it makes a tagged event several times larger (see docs/embeddings.md).
    #[serde(default)]
    pub store_embeddings: bool,
    /// With `store_embeddings` on: before running the model on an item, look up its stored
    /// embedding (one read of `media_embeddings` by media id) and, when the text hash and the
    /// embedding version match, score it from the stored rows instead. An item ingested again
    /// unchanged then costs a database read, not a model pass. On by default; it needs the
    /// database reachable from the tagger (SCYLLA_URI and, when secured, a role that may read
    /// `media_embeddings`); until it is, every item goes through the model.
    #[serde(default = "default_true")]
    pub reuse_embeddings: bool,
    /// The longest an item waits for its stored embedding before the model reads it instead
    /// (a slow or unreachable database costs a model pass, never a stall).
    #[serde(default = "default_reuse_timeout", with = "humantime_serde")]
    pub reuse_timeout: std::time::Duration,
    /// The label taxonomy.
    pub labels: Vec<LabelSpec>,
}

fn default_reuse_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(250)
}
fn default_languages() -> Vec<String> {
    vec!["en".into()]
}
fn default_top_k() -> usize {
    3
}
fn default_max_labels() -> usize {
    64
}
fn default_cache() -> usize {
    1024
}

/// Validated tagger configuration (paths resolved).
pub type TaggerConfig = TaggingSpec;

impl TaggingSpec {
    /// The taxonomy version of tags made with `labels` under these settings: a stable hash of
    /// everything that decides an item's tags besides the model and the text: the labels (names
    /// and descriptions), the strategy, the prompt templates (per kind too), the calibration,
    /// the scoring knobs (temperature, centre, scale, multi-label) and the thresholds (`top_k`,
    /// `min_score`). `tx-` and 16 hex digits of SHA-256 over canonical JSON (object keys
    /// sorted), so the same taxonomy gives the same version on every replica and release, and
    /// reordering the topology's keys changes nothing. Label order counts: it breaks ties.
    pub fn taxonomy_version(&self, labels: &[LabelSpec]) -> String {
        use sha2::Digest;
        let mut canonical = serde_json::json!({
            "labels": labels,
            "strategy": self.strategy,
            "embedding": self.embedding,
            "nli": self.nli.as_ref().map(|n| serde_json::json!({"template": n.hypothesis_template, "multi_label": n.multi_label})),
            "top_k": self.top_k,
            "min_score": self.min_score,
        });
        // The directions files' contents, not their paths (absent without any: versions of
        // taxonomies without directions are what they were before the key existed).
        let directions: Vec<&str> = self.calibrations().filter_map(|(_, c)| c.loaded_directions.as_ref().map(|d| d.sha256.as_str())).collect();
        if let Some(e) = canonical["embedding"].as_object_mut() {
            strip_directions_paths(e);
        }
        if !directions.is_empty() {
            canonical["directions"] = serde_json::json!(directions);
        }
        let digest = sha2::Sha256::digest(canonical.to_string().as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("tx-{hex}")
    }

    /// Parse the `tagging:` section of a topology and validate it.
    pub fn from_topology(t: &Topology) -> Result<Self, ConfigError> {
        let mut spec: TaggingSpec = t.section("tagging", &t.file.tagging)?;
        spec.model.path = t.resolve(&spec.model.path);
        if let Some(nli) = spec.nli.as_mut() {
            nli.model = t.resolve(&nli.model);
        }
        spec.load_directions(&t.path.display().to_string(), |p| t.resolve(p))?;
        spec.validate(&t.path.display().to_string())?;
        Ok(spec)
    }

    /// Every calibration with its key (`embedding.calibration`, `embedding.kinds.MOVIE.calibration`).
    pub fn calibrations(&self) -> impl Iterator<Item = (String, &Calibration)> {
        self.embedding
            .calibration
            .iter()
            .map(|c| ("embedding.calibration".to_string(), c))
            .chain(self.embedding.kinds.iter().filter_map(|(k, s)| s.calibration.as_ref().map(|c| (format!("embedding.kinds.{}.calibration", kind_symbol(*k)), c))))
    }

    /// Read every calibration's `directions` file not read yet, paths resolved with `resolve`
    /// (a topology's folder; [`Self::from_topology`] does this).
    pub fn load_directions(&mut self, origin: &str, resolve: impl Fn(&Path) -> PathBuf) -> Result<(), ConfigError> {
        let err = |(key, msg): (String, String)| ConfigError::new(format!("{origin}: tagging.{key}"), msg);
        if let Some(c) = self.embedding.calibration.as_mut() {
            c.load_directions("embedding.calibration", &resolve).map_err(err)?;
        }
        for (k, s) in self.embedding.kinds.iter_mut() {
            if let Some(c) = s.calibration.as_mut() {
                c.load_directions(&format!("embedding.kinds.{}.calibration", kind_symbol(*k)), &resolve).map_err(err)?;
            }
        }
        Ok(())
    }

    /// The effective settings for items of a kind.
    pub fn for_kind(&self, kind: MediaKind) -> KindSettings<'_> {
        let k = self.embedding.kinds.get(&kind);
        KindSettings {
            templates: k.and_then(|k| k.templates.as_deref()).unwrap_or(&self.embedding.templates),
            multi_label: k.and_then(|k| k.multi_label).unwrap_or(self.embedding.multi_label),
            calibration: k.and_then(|k| k.calibration.as_ref()).or(self.embedding.calibration.as_ref()),
            min_score: k.and_then(|k| k.min_score).unwrap_or(self.min_score),
            own_templates: k.is_some_and(|k| k.templates.is_some()),
        }
    }

    /// Pure cross-field checks.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError::new(format!("{origin}: tagging.{key}"), msg));
        if self.labels.is_empty() {
            return err("labels", "the taxonomy is empty: list at least one label (name + optional description)".into());
        }
        if self.reuse_timeout.is_zero() {
            return err("reuse_timeout", "must be more than 0 (e.g. 250ms): it bounds the wait for a stored embedding; turn reuse_embeddings off to skip the lookup".into());
        }
        if self.store_embeddings && self.strategy == StrategyKind::Nli {
            return err("store_embeddings", "the nli strategy computes no item embeddings: turn store_embeddings off or use strategy: embedding".into());
        }
        if self.labels.len() > self.max_labels {
            return err("labels", format!("{} labels exceed tagging.max_labels ({}); raise max_labels or trim the taxonomy", self.labels.len(), self.max_labels));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, l) in self.labels.iter().enumerate() {
            if l.name.trim().is_empty() {
                return err(&format!("labels[{i}].name"), "must not be empty".into());
            }
            if !seen.insert(l.name.as_str()) {
                return err(&format!("labels[{i}].name"), format!("label '{}' is listed twice", l.name));
            }
        }
        let bad_templates = |ts: &[String]| ts.is_empty() || ts.iter().any(|t| !t.contains("{label}") && !t.contains("{description}"));
        if bad_templates(&self.embedding.templates) {
            return err("embedding.templates", "need at least one template, each containing {label} or {description}".into());
        }
        for (kind, k) in &self.embedding.kinds {
            let key = format!("embedding.kinds.{}", kind_symbol(*kind));
            if k.templates.as_deref().is_some_and(bad_templates) {
                return err(&format!("{key}.templates"), "need at least one template, each containing {label} or {description}".into());
            }
            if k.min_score.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
                return err(&format!("{key}.min_score"), "must be within 0..1".into());
            }
        }
        for (key, c) in self.calibrations() {
            if let Err((k, m)) = c.check(&key) {
                return err(&k, m);
            }
        }
        if self.embedding.temperature <= 0.0 || self.embedding.scale <= 0.0 {
            return err("embedding.temperature", "temperature and scale must be > 0".into());
        }
        if self.strategy == StrategyKind::Nli {
            match &self.nli {
                None => return err("nli", "strategy is nli but the tagging.nli section (model, hypothesis_template) is missing".into()),
                Some(n) if !n.hypothesis_template.contains("{}") => {
                    return err("nli.hypothesis_template", format!("'{}' must contain {{}} where the label goes", n.hypothesis_template));
                }
                _ => {}
            }
        }
        let b = &self.batching;
        if b.max_batch_size == 0 || b.queue_capacity == 0 {
            return err("batching", "max_batch_size and queue_capacity must be >= 1".into());
        }
        if b.queue_capacity < b.max_batch_size {
            return err("batching.queue_capacity", format!("({}) must be >= tagging.batching.max_batch_size ({})", b.queue_capacity, b.max_batch_size));
        }
        if !(0.0..=1.0).contains(&self.text.adaptive_margin) {
            return err("text.adaptive_margin", format!("{} must be within 0..1 (0 = off)", self.text.adaptive_margin));
        }
        if let Some(w) = &self.text.max_windows {
            let hint = match w.as_u64() {
                Some(n) => {
                    let body = if self.text.max_tokens == 0 { 254 } else { self.text.max_tokens.saturating_sub(2) } as u64;
                    let cover = body + n.saturating_sub(1) * body.saturating_sub(self.text.stride as u64);
                    format!(" (max_windows: {n} read at most {n} windows; the same cover is max_tokens_per_item: {cover})")
                }
                None => String::new(),
            };
            return err(
                "text.max_windows",
                format!("was replaced by tagging.text.max_tokens_per_item, a token budget per item (default 12000, an hour of speech){hint}: remove max_windows and set max_tokens_per_item if the default does not suit"),
            );
        }
        if self.text.max_tokens_per_item < 16 {
            return err("text.max_tokens_per_item", format!("{} is too small (>= 16 tokens; 12000 reads an hour of speech)", self.text.max_tokens_per_item));
        }
        if self.text.max_tokens_per_item > 1_000_000 {
            return err("text.max_tokens_per_item", format!("{} is too large (at most 1000000 tokens per item)", self.text.max_tokens_per_item));
        }
        if self.text.max_tokens != 0 && self.text.max_tokens < 16 {
            return err("text.max_tokens", format!("{} is too small (>= 16, or 0 for the model's maximum)", self.text.max_tokens));
        }
        if self.text.max_tokens != 0 && self.text.stride * 2 >= self.text.max_tokens {
            return err("text.stride", format!("({}) must be less than half of tagging.text.max_tokens ({})", self.text.stride, self.text.max_tokens));
        }
        if self.text.max_tokens != 0 && b.max_batch_tokens < self.text.max_tokens {
            return err("batching.max_batch_tokens", format!("({}) must be >= tagging.text.max_tokens ({}) or a full window never fits", b.max_batch_tokens, self.text.max_tokens));
        }
        if !(self.model.device == "cpu" || self.model.device.starts_with("cuda")) {
            return err("model.device", format!("'{}' is not cpu or cuda:N", self.model.device));
        }
        if self.model.precision.cpu_only() && self.model.device != "cpu" {
            let what = if self.model.precision == Precision::Int8 { "dynamic quantisation" } else { "static quantisation" };
            return err(
                "model.precision",
                format!("{} ({what}) runs on the CPU only, and tagging.model.device is '{}': set precision: fp32 or bf16 for a GPU", self.model.precision, self.model.device),
            );
        }
        Ok(())
    }
}

/// `MOVIE`, `EPISODE`, … (the Avro symbol of a kind).
pub fn kind_symbol(kind: MediaKind) -> String {
    serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| format!("{kind:?}"))
}

/// What [`TaggingSpec::for_kind`] resolves for one kind.
#[derive(Debug, Clone, Copy)]
pub struct KindSettings<'a> {
    /// Prompt templates.
    pub templates: &'a [String],
    /// Independent per-label scores.
    pub multi_label: bool,
    /// Fitted calibration, if any.
    pub calibration: Option<&'a Calibration>,
    /// Threshold.
    pub min_score: f32,
    /// Whether the kind has templates of its own (else the label vectors are shared).
    pub own_templates: bool,
}

/// Drop `directions` (a path, which differs between a checkout and an image) from every
/// calibration of a serialised `embedding` section.
fn strip_directions_paths(e: &mut serde_json::Map<String, serde_json::Value>) {
    if let Some(c) = e.get_mut("calibration").and_then(|c| c.as_object_mut()) {
        c.remove("directions");
    }
    if let Some(kinds) = e.get_mut("kinds").and_then(|k| k.as_object_mut()) {
        for k in kinds.values_mut() {
            if let Some(c) = k.get_mut("calibration").and_then(|c| c.as_object_mut()) {
                c.remove("directions");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(precision: &str, device: &str) -> Result<TaggingSpec, String> {
        let yaml = format!("model: {{path: /m, device: '{device}', precision: {precision}}}\nlabels: [{{name: a}}]");
        let s: TaggingSpec = serde_yaml::from_str(&yaml).map_err(|e| e.to_string())?;
        s.validate("topology.yaml").map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// A directions file in a fresh temp folder; returns its path.
    fn directions_file(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("streamoasis-directions-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.json");
        std::fs::write(&p, body).unwrap();
        p
    }

    const DIRECTIONS: &str = r#"{"model": "m", "weights_sha256": "abc", "dims": 3, "weight": 1.0, "about": "extra keys are fine",
        "labels": {"drama": [0.0, 1.0, 0.0]}}"#;

    fn with_directions(path: &Path, labels: &str) -> Result<TaggingSpec, String> {
        let yaml = format!(
            "model: {{path: /m}}\nlabels: [{{name: a}}]\nembedding: {{kinds: {{MOVIE: {{multi_label: true, calibration: {{slope: 10, bias: -2, labels: {labels}, directions: {}}}}}}}}}",
            path.display()
        );
        let mut s: TaggingSpec = serde_yaml::from_str(&yaml).map_err(|e| e.to_string())?;
        s.load_directions("t.yaml", |p| p.to_path_buf()).map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn directions_files_are_read_checked_and_versioned_by_content() {
        let good = directions_file("good", DIRECTIONS);
        let s = with_directions(&good, "{drama: [8, 0]}").unwrap();
        let c = s.for_kind(MediaKind::Movie).calibration.unwrap();
        let (d, w) = c.direction("Drama").expect("a fitted label with a direction");
        assert_eq!((d, w), (&[0.0, 1.0, 0.0][..], 1.0));
        assert_eq!(c.direction("sci-fi"), None, "no pair, no direction");
        // The version follows the file's content, not where it lies.
        let v = s.taxonomy_version(&s.labels);
        let elsewhere = directions_file("copy", DIRECTIONS);
        assert_eq!(with_directions(&elsewhere, "{drama: [8, 0]}").unwrap().taxonomy_version(&s.labels), v);
        let refit = directions_file("refit", &DIRECTIONS.replace("[0.0, 1.0, 0.0]", "[0.0, 0.8, 0.6]"));
        assert_ne!(with_directions(&refit, "{drama: [8, 0]}").unwrap().taxonomy_version(&s.labels), v);
        let mut without: TaggingSpec = s.clone();
        without.embedding.kinds.get_mut(&MediaKind::Movie).unwrap().calibration.as_mut().unwrap().loaded_directions = None;
        assert_ne!(without.taxonomy_version(&s.labels), v);
        // Refusals name the key and say what to do.
        let e = with_directions(&good, "{war: [8, 0]}").unwrap_err();
        assert!(e.contains("tagging.embedding.kinds.MOVIE.calibration.directions") && e.contains("'drama', which has no pair"), "{e}");
        let e = with_directions(Path::new("/nonexistent/d.json"), "{drama: [8, 0]}").unwrap_err();
        assert!(e.contains("directions") && e.contains("cannot read /nonexistent/d.json"), "{e}");
        let short = directions_file("short", &DIRECTIONS.replace("[0.0, 1.0, 0.0]", "[0.0, 1.0]"));
        let e = with_directions(&short, "{drama: [8, 0]}").unwrap_err();
        assert!(e.contains("label 'drama' has 2 numbers, dims says 3"), "{e}");
        let junk = directions_file("junk", "{\"labels\": 3}");
        let e = with_directions(&junk, "{drama: [8, 0]}").unwrap_err();
        assert!(e.contains("is not a directions file") && e.contains("--directions-out"), "{e}");
        // Fitted for one model: another one, other weights or another size are refused.
        let d = Directions::read(&good).unwrap();
        let manifest = |name: &str, weights: &str, dims: usize| -> crate::model::Manifest {
            serde_json::from_value(serde_json::json!({"name": name, "version": "1", "kind": "embedding", "max_seq_len": 256, "dims": dims,
                "source_sha256": {"model.safetensors": weights, "torch": "2"}}))
            .unwrap()
        };
        assert_eq!(d.mismatch(&manifest("m", "abc", 3)), None);
        assert!(d.mismatch(&manifest("other", "abc", 3)).unwrap().contains("fitted for the model m but tagging.model.path holds other"));
        assert!(d.mismatch(&manifest("m", "def", 3)).unwrap().contains("weights abc but the model's are def"));
        assert!(d.mismatch(&manifest("m", "abc", 384)).unwrap().contains("3 dimensions but the model embeds into 384"));
    }

    fn version_of(yaml: &str) -> String {
        let s: TaggingSpec = serde_yaml::from_str(yaml).unwrap();
        s.taxonomy_version(&s.labels)
    }

    #[test]
    fn the_taxonomy_version_is_stable_and_follows_what_decides_tags() {
        let base =
            "model: {path: /m, threads: 1}\nlabels: [{name: a, description: x}, {name: b}]\nembedding: {kinds: {MOVIE: {multi_label: true}, VIDEO: {templates: ['{label}']}}}";
        let v = version_of(base);
        assert!(v.starts_with("tx-") && v.len() == 19 && v[3..].chars().all(|c| c.is_ascii_hexdigit()), "{v}");
        // The same taxonomy written with its keys in another order, or with settings outside the
        // taxonomy changed (model threads, batching, text), keeps its version: replicas agree.
        assert_eq!(
            version_of(
                "labels: [{description: x, name: a}, {name: b}]\nembedding: {kinds: {VIDEO: {templates: ['{label}']}, MOVIE: {multi_label: true}}}\nmodel: {path: /m, threads: 1}"
            ),
            v
        );
        assert_eq!(version_of(&base.replace("threads: 1", "threads: 4")), v);
        assert_eq!(version_of(&format!("{base}\nbatching: {{max_batch_size: 8}}\ntext: {{stride: 16}}")), v);
        // Each part of the taxonomy moves it.
        let changed = [
            base.replace("name: b", "name: c"),
            base.replace("description: x", "description: y"),
            base.replace("[{name: a, description: x}, {name: b}]", "[{name: b}, {name: a, description: x}]"),
            format!("{base}\nmin_score: 0.3"),
            format!("{base}\ntop_k: 5"),
            base.replace("multi_label: true", "multi_label: false"),
            base.replace("templates: ['{label}']", "templates: ['about {label}']"),
            base.replace("embedding: {", "embedding: {temperature: 0.1, "),
            base.replace("embedding: {", "embedding: {calibration: {slope: 10.0, bias: -2.0}, "),
        ];
        for c in &changed {
            assert_ne!(version_of(c), v, "{c}");
        }
        // Known value: a change of the hashing would make every stored row look stale.
        assert_eq!(version_of("model: {path: /m}\nlabels: [{name: sport}]"), version_of("labels: [{name: sport}]\nmodel: {path: /other}"));
    }

    #[test]
    fn precisions_parse_from_their_config_values() {
        for (text, p) in [("fp32", Precision::Fp32), ("int8", Precision::Int8), ("int8_static", Precision::Int8Static), ("bf16", Precision::Bf16)] {
            assert_eq!(spec(text, "cpu").unwrap().model.precision, p);
            assert_eq!(p.key(), text);
            assert_eq!(text.parse::<Precision>().unwrap(), p);
        }
        let e = spec("fp16", "cpu").unwrap_err();
        assert!(e.contains("fp16") && e.contains("int8_static") && e.contains("bf16"), "{e}");
        assert!("fp16".parse::<Precision>().unwrap_err().contains("int8_static"));
    }

    #[test]
    fn quantised_precisions_are_refused_on_a_gpu_naming_the_key() {
        for p in ["int8", "int8_static"] {
            let e = spec(p, "cuda:0").unwrap_err();
            assert!(e.contains("tagging.model.precision") && e.contains(p) && e.contains("cuda:0") && e.contains("fp32 or bf16"), "{e}");
        }
        assert!(spec("bf16", "cuda:0").is_ok());
        assert!(spec("fp32", "cuda").is_ok());
    }
}

//! The model: manifest, tokenizer and TorchScript module.
//!
//! `model.pt` is a traced module: embedding models take `(input_ids, attention_mask)` and
//! return L2-normalised mean-pooled embeddings `[B, dims]`; NLI models take
//! `(input_ids, attention_mask, token_type_ids)` and return logits `[B, labels]`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{CModule, Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::batcher::{Backend, Batch, ForwardError, Seq};

/// `manifest.json`, written by `scripts/python/export_model.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// Package version or hash.
    pub version: String,
    /// `embedding` or `nli`.
    pub kind: String,
    /// Longest sequence in tokens, special tokens included.
    pub max_seq_len: usize,
    /// Embedding size (embedding models).
    #[serde(default)]
    pub dims: Option<usize>,
    /// Output labels (NLI models).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Index of the entailment logit (NLI models).
    #[serde(default)]
    pub entailment_index: Option<usize>,
    /// Module file per precision (`fp32`, `int8`, `int8_static`, `bf16`); absent = `model.pt` only.
    #[serde(default)]
    pub precisions: std::collections::BTreeMap<String, String>,
    /// SHA-256 of each source file the export read (`model.safetensors`: the weights), and the
    /// versions of the exporting packages.
    #[serde(default)]
    pub source_sha256: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Manifest {
    /// The module file for a precision, or why there is none.
    pub fn module_file(&self, dir: &Path, p: crate::config::Precision) -> Result<String, LoadError> {
        let key = p.key();
        match self.precisions.get(key) {
            Some(f) => Ok(f.clone()),
            None if p == crate::config::Precision::Fp32 => Ok(p.default_file().into()),
            None => Err(LoadError::Missing {
                path: dir.join("manifest.json"),
                message: format!(
                    "tagging.model.precision is {key} but this export has no {key} module (it offers {}; re-export with scripts/setup, which writes {}, or set precision: fp32)",
                    self.offered(),
                    p.default_file()
                ),
            }),
        }
    }

    /// The precisions this export offers, as `fp32, int8, …` (fp32 always).
    pub fn offered(&self) -> String {
        let mut keys: Vec<&str> = vec!["fp32"];
        keys.extend(self.precisions.keys().map(String::as_str).filter(|k| *k != "fp32"));
        keys.join(", ")
    }
}

/// Why a model could not be loaded; messages say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file is missing or unreadable.
    #[error("{path}: {message} (run scripts/setup to export the model)")]
    Missing { path: PathBuf, message: String },
    /// The manifest is not valid JSON of the expected shape.
    #[error("{path}: invalid manifest (run scripts/setup to export the model again)")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The tokenizer file cannot be read or used.
    #[error("{path}: tokenizer")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// The tagging configuration asks for something the model or machine cannot give.
    #[error("{0}")]
    Config(String),
    /// libtorch refused the module.
    #[error("{path}: libtorch could not load it")]
    Torch {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    /// The model loaded but failed on the taxonomy's or calibration's label prompts.
    #[error("embedding {what}")]
    Embedding {
        what: &'static str,
        #[source]
        source: crate::batcher::BatchError,
    },
}

/// Read a model folder's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, LoadError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LoadError::Missing { path: path.clone(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Manifest { path, source })
}

/// Turns text into model sequences: windows of one text, or a (premise, hypothesis) pair.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    cls: i64,
    sep: i64,
    /// Tokens per sequence including specials.
    pub max_tokens: usize,
}

impl TextEncoder {
    /// Load `tokenizer.json`, dropping its built-in padding and truncation (we pad per batch
    /// and window long text ourselves).
    pub fn load(dir: &Path, max_tokens: usize) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(LoadError::Missing { path, message: "not found".into() });
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|source| LoadError::Tokenizer { path: path.clone(), source })?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|source| LoadError::Tokenizer { path: path.clone(), source })?;
        let id = |t: &str| tokenizer.token_to_id(t).map(i64::from).ok_or_else(|| LoadError::Missing { path: path.clone(), message: format!("no {t} token") });
        // The opening and closing specials are what the tokenizer's own post-processor puts
        // around a text ([CLS]/[SEP] for BERT, <s>/</s> for MPNet and RoBERTa-style models);
        // a tokenizer without a post-processor falls back to BERT's names.
        let framed: Vec<u32> = tokenizer.encode("", true).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        let (cls, sep) = match framed.as_slice() {
            [first, .., last] => (i64::from(*first), i64::from(*last)),
            _ => (id("[CLS]")?, id("[SEP]")?),
        };
        Ok(TextEncoder { cls, sep, tokenizer, max_tokens })
    }

    /// Content token ids (no specials) of at most `max_chars` characters of `text`.
    pub fn content_ids(&self, text: &str, max_chars: usize) -> Vec<i64> {
        let text = match text.char_indices().nth(max_chars) {
            Some((i, _)) => &text[..i],
            None => text,
        };
        match self.tokenizer.encode(text, false) {
            Ok(enc) => enc.get_ids().iter().map(|&i| i64::from(i)).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Windows over the whole text: when it needs more than `max_windows` windows, the
    /// `max_windows` windows are spread evenly from its beginning to its end (first and last
    /// included) instead of covering only the head. Otherwise as [`TextEncoder::windows`].
    pub fn windows_spread(&self, text: &str, max_windows: usize, stride: usize) -> Vec<Seq> {
        let body = self.max_tokens.saturating_sub(2).max(1);
        let step = body.saturating_sub(stride).max(1);
        // Read up to ~64k tokens of text (a two-hour transcript); beyond, the tail is ignored.
        let ids = self.content_ids(text, 64 * 1024 * 8);
        let needed = if ids.len() <= body { 1 } else { (ids.len() - body).div_ceil(step) + 1 };
        if needed <= max_windows || max_windows == 1 {
            return self.windows_of(&ids, body, step, max_windows);
        }
        let last = ids.len() - body;
        (0..max_windows)
            .map(|k| {
                let start = last * k / (max_windows - 1);
                self.wrap(&ids[start..start + body])
            })
            .collect()
    }

    fn wrap(&self, content: &[i64]) -> Seq {
        let mut seq = Vec::with_capacity(content.len() + 2);
        seq.push(self.cls);
        seq.extend_from_slice(content);
        seq.push(self.sep);
        Seq::new(seq)
    }

    fn windows_of(&self, ids: &[i64], body: usize, step: usize, max_windows: usize) -> Vec<Seq> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < ids.len() && out.len() < max_windows {
            let end = (start + body).min(ids.len());
            out.push(self.wrap(&ids[start..end]));
            if end == ids.len() {
                break;
            }
            start += step;
        }
        out
    }

    /// Split text into at most `max_windows` windows of `max_tokens` (specials included),
    /// consecutive windows sharing `stride` tokens. Empty text gives no windows.
    pub fn windows(&self, text: &str, max_windows: usize, stride: usize) -> Vec<Seq> {
        let body = self.max_tokens.saturating_sub(2).max(1);
        let step = body.saturating_sub(stride).max(1);
        // Bound tokenisation work on huge inputs: ~8 chars per token is generous for BERT
        // wordpieces, so this never cuts text that the windows would have covered.
        let max_chars = (body + step * max_windows.saturating_sub(1)) * 8;
        let ids = self.content_ids(text, max_chars);
        self.windows_of(&ids, body, step, max_windows)
    }

    /// `[CLS] premise [SEP] hypothesis [SEP]` with segment ids, truncating only the premise.
    pub fn pair(&self, premise_ids: &[i64], hypothesis: &str) -> Seq {
        let hyp = self.content_ids(hypothesis, 4096);
        let room = self.max_tokens.saturating_sub(hyp.len() + 3);
        let p = &premise_ids[..premise_ids.len().min(room)];
        let mut ids = Vec::with_capacity(p.len() + hyp.len() + 3);
        ids.push(self.cls);
        ids.extend_from_slice(p);
        ids.push(self.sep);
        let first = ids.len();
        ids.extend_from_slice(&hyp);
        ids.push(self.sep);
        let mut types = vec![0i64; first];
        types.resize(ids.len(), 1);
        Seq { ids, type_ids: Some(types) }
    }
}

/// CUDA devices libtorch sees (0 when the build does not link libtorch_cuda or there is no GPU).
pub fn cuda_devices() -> i64 {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count()
    } else {
        0
    }
}

/// Parse `cpu` / `cuda` / `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, LoadError> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => {
                if !tch::Cuda::is_available() {
                    return Err(LoadError::Config(format!("tagging.model.device is '{s}' but libtorch sees no CUDA device; use cpu")));
                }
                Ok(Device::Cuda(n))
            }
            None => Err(LoadError::Config(format!("tagging.model.device: '{s}' is not cpu or cuda:N"))),
        },
    }
}

/// Set libtorch's intra-op threads (0 = the cores available to this process).
pub fn set_threads(n: usize) -> usize {
    let n = if n == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { n };
    tch::set_num_threads(n as i32);
    n
}

/// A TorchScript module as a batcher backend. Lives on the model thread.
#[derive(Debug)]
pub struct TorchBackend {
    module: CModule,
    device: Device,
    with_types: bool,
    threads: usize,
}

impl TorchBackend {
    /// Load `model.pt` on a device, in eval mode.
    /// `threads` = intra-op threads, set on the model thread (0 = available cores).
    pub fn load(dir: &Path, device: Device, with_types: bool, threads: usize) -> Result<Self, LoadError> {
        Self::load_file(dir, "model.pt", device, with_types, threads)
    }

    /// Load a given module file of a model folder (e.g. `model.int8.pt`).
    pub fn load_file(dir: &Path, file: &str, device: Device, with_types: bool, threads: usize) -> Result<Self, LoadError> {
        let path = dir.join(file);
        if !path.exists() {
            return Err(LoadError::Missing { path, message: "not found".into() });
        }
        let mut module = CModule::load_on_device(&path, device).map_err(|source| LoadError::Torch { path: path.clone(), source })?;
        module.set_eval();
        Ok(TorchBackend { module, device, with_types, threads })
    }

    /// Cast the module's floating-point parameters to `kind` on `device` (e.g. half precision
    /// on a GPU, for a benchmark of the fp32 export in fp16).
    pub fn cast(&mut self, device: Device, kind: Kind) {
        self.module.to(device, kind, false);
        self.device = device;
    }

    fn run(&self, b: &Batch) -> Result<Vec<Vec<f32>>, tch::TchError> {
        let _guard = tch::no_grad_guard();
        let shape = [b.rows as i64, b.cols as i64];
        let ids = Tensor::from_slice(&b.input_ids).view(shape).to_device(self.device);
        let mask = Tensor::from_slice(&b.attention_mask).view(shape).to_device(self.device);
        let out = if self.with_types {
            let zeros;
            let types = match &b.token_type_ids {
                Some(t) => Tensor::from_slice(t).view(shape).to_device(self.device),
                None => {
                    zeros = ids.zeros_like();
                    zeros
                }
            };
            self.module.forward_ts(&[ids, mask, types])?
        } else {
            self.module.forward_ts(&[ids, mask])?
        };
        let out = out.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let dims = out.size()[1] as usize;
        let flat: Vec<f32> = Vec::<f32>::try_from(out.view([-1]))?;
        Ok(flat.chunks(dims).map(|c| c.to_vec()).collect())
    }
}

impl Backend for TorchBackend {
    fn on_start(&mut self) {
        // OpenMP thread counts are per calling thread: set them on the thread that runs the model.
        let n = set_threads(self.threads);
        tracing::debug!(threads = n, "model thread started");
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, ForwardError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        self.run(batch).map_err(forward_error)
    }
}

/// libtorch reports an allocation failure as a `c10::Error` (tch: `TchError::Torch`) whose message
/// starts with the allocator's own words; anything else is a plain failure.
fn forward_error(e: tch::TchError) -> ForwardError {
    let message = e.to_string();
    let out_of_memory = matches!(&e, tch::TchError::Torch(m) if m.contains("CUDA out of memory") || m.contains("DefaultCPUAllocator: not enough memory") || m.contains("DefaultCPUAllocator: can't allocate memory"));
    if out_of_memory {
        ForwardError::OutOfMemory(message)
    } else {
        ForwardError::Failed(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allocator_s_failures_are_out_of_memory() {
        let oom =
            forward_error(tch::TchError::Torch("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes.".into()));
        assert!(matches!(oom, ForwardError::OutOfMemory(_)), "{oom:?}");
        let cuda = forward_error(tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()));
        assert!(matches!(cuda, ForwardError::OutOfMemory(_)), "{cuda:?}");
        for m in ["index out of range in self (room 12)", "zoom level", "shape mismatch: boom"] {
            assert!(matches!(forward_error(tch::TchError::Torch(m.into())), ForwardError::Failed(_)), "{m}");
        }
    }
    use crate::config::Precision;

    fn manifest(precisions: &[(&str, &str)]) -> Manifest {
        Manifest {
            name: "m".into(),
            version: "1".into(),
            kind: "embedding".into(),
            max_seq_len: 256,
            dims: Some(384),
            labels: vec![],
            entailment_index: None,
            precisions: precisions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            source_sha256: Default::default(),
        }
    }

    #[test]
    fn each_precision_maps_to_its_manifest_file() {
        let m = manifest(&[("fp32", "model.pt"), ("int8", "model.int8.pt"), ("int8_static", "model.int8s.pt"), ("bf16", "model.bf16.pt")]);
        for p in Precision::ALL {
            assert_eq!(m.module_file(Path::new("/m"), p).unwrap(), p.default_file(), "{p}");
        }
    }

    #[test]
    fn a_missing_precision_names_the_key_and_what_the_export_offers() {
        let m = manifest(&[("fp32", "model.pt"), ("int8", "model.int8.pt")]);
        let e = m.module_file(Path::new("/m"), Precision::Bf16).unwrap_err().to_string();
        assert!(e.contains("tagging.model.precision is bf16") && e.contains("fp32, int8") && e.contains("model.bf16.pt"), "{e}");
        let e = m.module_file(Path::new("/m"), Precision::Int8Static).unwrap_err().to_string();
        assert!(e.contains("int8_static") && e.contains("model.int8s.pt"), "{e}");
        // An old export without a precisions map still serves fp32.
        assert_eq!(manifest(&[]).module_file(Path::new("/m"), Precision::Fp32).unwrap(), "model.pt");
    }
}

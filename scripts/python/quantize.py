#!/usr/bin/env python3
"""int8 variants of an exported embedding model, and the experiment that chose one.

Dynamic quantisation of the encoder's Linear layers (weights int8 ahead of time, activations
quantised per batch at run time), in four flavours:

``dyn-tensor-rr``   torch's ``quantize_dynamic`` defaults: one scale per weight tensor, and
                    activations quantised to 7 bits (``reduce_range=True``, hard-coded in
                    ``torch.ao.nn.quantized.dynamic.Linear``) -- the "-6 points" baseline.
``dyn-channel-rr``  one scale per output channel, activations still 7 bits.
``dyn-channel``     per-channel weights and full 8-bit activations (no ``reduce_range``: VNNI's
                    ``vpdpbusd`` accumulates in 32 bits, so the AVX2 saturation that 7 bits
                    guards against does not happen on these machines).
``dyn-channel-keep`` as ``dyn-channel`` but the layers measured most sensitive stay fp32
                    (``--keep`` patterns, default: every layer's FFN output projection).

``python scripts/python/quantize.py explore`` prints accuracy (BBC titles and articles) and
speed of each flavour against fp32 in the same run; ``export_model.py`` calls
:func:`quantize` with the chosen flavour to write ``model.int8.pt``.

Precisions whose scores do not depend on batch company (``export_model.py`` writes them too):

``int8_static``     :func:`static_int8`: the same per-channel int8 weights, but each Linear's
                    input is quantised with a scale and zero point fixed at export, calibrated on
                    the TMDB calibration split (:func:`calibration_texts`; never an evaluation
                    item). The integer matmul of an item does not depend on the batch.
``bf16``            :func:`bf16_linears`: bf16 weights and matmuls; embeddings, LayerNorm,
                    softmax, GELU and pooling stay fp32 (each Linear casts its input to bf16 and
                    its output back).

``python scripts/python/quantize.py candidates --out DIR`` writes the candidates that are measured
but not offered as config values (``bf16_autocast``: the module traced under CPU autocast;
``fp32_frozen``: ``torch.jit.freeze`` of the fp32 trace), for ``benches/run precision``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CHOSEN = "dyn-channel"


def _linear_no_reduce_range():
    import torch  # noqa: PLC0415
    from torch.ao.nn.quantized.dynamic import Linear  # noqa: PLC0415

    class Linear8(Linear):
        """Dynamic int8 Linear with full-range (8-bit) activation quantisation."""

        def forward(self, x):
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            return y.to(x.dtype)

    return Linear8


def quantize(model, flavour: str = CHOSEN, keep: list[str] | None = None):
    """A dynamically quantised copy of `model` (an nn.Module holding BERT Linear layers)."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch.ao.quantization import (  # noqa: PLC0415
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    torch.backends.quantized.engine = "x86"
    if flavour == "fp32":
        return model
    per_channel = "channel" in flavour
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if flavour.endswith("-keep"):
        keep = keep or [".output.dense"]
        names = [n for n in names if not any(k in n and "attention" not in n for k in keep)]
    spec = {n: qconfig for n in names}
    q = quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
    if not flavour.endswith("-rr"):
        cls = _linear_no_reduce_range()
        for m in q.modules():
            if type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):
                m.__class__ = cls
    return q


# ----------------------------------------------------------------------------------------------
# Batch-independent precisions
# ----------------------------------------------------------------------------------------------

CALIBRATION_FILMS = 256       # single films (title + overview), ~60 tokens each
CALIBRATION_LONG = 48         # texts of 5 films joined, reaching the 256-token windows
CALIBRATION_PERCENTILE = 1e-4  # clip each input range at its 0.01% / 99.99% quantiles
ACTIVATION_LEVELS = 127       # static activations use 7 bits (see StaticLinear)


def calibration_texts() -> tuple[list[str], str]:
    """Calibration texts for static int8 and their sha256: the first films of the TMDB
    calibration split (``scripts/python/prepare_tmdb.py``, which this runs when the data file is
    missing). The evaluation items (all BBC articles, the TMDB test split) are never among them."""
    import hashlib  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    cache = Path(os.environ.get("STREAMOASIS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamoasis")
    data = Path(os.environ.get("SO_DATA") or cache / "data") / "tmdb-films.jsonl"
    if not data.is_file():
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "prepare_tmdb.py"), "--out", str(data)],
                       check=True)
    films = [json.loads(l) for l in data.read_text(encoding="utf-8").splitlines() if l.strip()]
    films = [f for f in films if f.get("split") == "calibration" and f.get("overview")]
    films.sort(key=lambda f: str(f["id"]))
    single = [f"{f['title']}. {f['overview']}" for f in films[:CALIBRATION_FILMS]]
    rest = [f"{f['title']}. {f['overview']}" for f in films[CALIBRATION_FILMS:CALIBRATION_FILMS + 5 * CALIBRATION_LONG]]
    joined = [" ".join(rest[i * 5:(i + 1) * 5]) for i in range(CALIBRATION_LONG)]
    texts = single + joined
    return texts, hashlib.sha256("\n".join(texts).encode()).hexdigest()


def _replace_linears(model, make):
    """A deep copy of `model` whose nn.Linear children are replaced by make(name, linear)."""
    import copy  # noqa: PLC0415

    import torch  # noqa: PLC0415

    q = copy.deepcopy(model)
    for parent_name, parent in list(q.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, make(full, child))
    return q


def input_ranges(model, batches) -> dict[str, tuple[float, float]]:
    """Per Linear: the (low, high) range of its input over the calibration batches, clipped at
    the CALIBRATION_PERCENTILE quantiles of the non-padding tokens (estimated on an evenly
    spaced sample of at most 2^18 values per batch, so it is deterministic)."""
    import torch  # noqa: PLC0415

    seen: dict[str, list[tuple[float, float]]] = {}
    mask_box = {}

    def hook(name):
        def h(_mod, inp):
            x = inp[0].detach()
            keep = mask_box["m"].reshape(-1).bool()
            x = x.reshape(-1, x.shape[-1])[keep].reshape(-1).float()
            if x.numel() > (1 << 18):
                x = x[torch.linspace(0, x.numel() - 1, 1 << 18).long()]
            k = max(1, int(CALIBRATION_PERCENTILE * x.numel()))
            lo = float(torch.kthvalue(x, k).values)
            hi = float(torch.kthvalue(x, x.numel() - k + 1).values)
            seen.setdefault(name, []).append((lo, hi))
        return h

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            for ids, mask in batches:
                mask_box["m"] = mask
                model(ids, mask)
    finally:
        for h in handles:
            h.remove()
    # The median over batches of each quantile: robust to one odd batch.
    out = {}
    for name, v in seen.items():
        los, his = sorted(a for a, _ in v), sorted(b for _, b in v)
        out[name] = (min(los[len(los) // 2], 0.0), max(his[len(his) // 2], 0.0))
    return out


def static_int8(model, batches):
    """int8_static: per-channel int8 weights, each Linear input quantised to uint8 with a scale
    and zero point fixed from the calibration `batches` ((input_ids, attention_mask) pairs);
    output fp32. fbgemm's fused ``linear_with_input_q_dq_qweight_dq_output_fp32``."""
    import torch  # noqa: PLC0415

    torch.backends.quantized.engine = "x86"
    ranges = input_ranges(model, batches)

    class StaticLinear(torch.nn.Module):
        def __init__(self, lin, lo: float, hi: float):
            super().__init__()
            w = lin.weight.detach().float()
            scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
            qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            bias = lin.bias.detach().float() if lin.bias is not None else None
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)
            # 7-bit activations (0..127): on CPUs without VNNI (AVX2: vpmaddubsw adds pairs of
            # u8*s8 products into saturating int16) full 8-bit inputs overflow in some kernels.
            self.scale = max((hi - lo) / ACTIVATION_LEVELS, 1e-8)
            self.zero_point = int(min(ACTIVATION_LEVELS, max(0, round(-lo / self.scale))))

        def forward(self, x):
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                x, self.scale, self.zero_point, self.packed)

    return _replace_linears(model, lambda name, lin: StaticLinear(lin, *ranges[name])), ranges


def bf16_linears(model):
    """bf16: every Linear holds bf16 weights and runs its matmul in bf16 (input cast to bf16,
    output back to fp32); everything else stays fp32."""
    import torch  # noqa: PLC0415

    class Bf16Linear(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.weight = torch.nn.Parameter(lin.weight.detach().to(torch.bfloat16), requires_grad=False)
            b = lin.bias.detach().to(torch.bfloat16) if lin.bias is not None else None
            self.bias = torch.nn.Parameter(b, requires_grad=False) if b is not None else None

        def forward(self, x):
            return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(torch.float32)

    return _replace_linears(model, lambda _name, lin: Bf16Linear(lin))


def calibration_batches(tok, texts: list[str], max_len: int, size: int = 16):
    """(input_ids, attention_mask) batches of the calibration texts, sorted by length."""
    enc = [tok(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
    enc.sort(key=len)
    import torch  # noqa: PLC0415

    out = []
    for s in range(0, len(enc), size):
        rows = enc[s:s + size]
        w = max(len(r) for r in rows)
        ids = torch.full((len(rows), w), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), w, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        out.append((ids, mask))
    return out


def candidates(args) -> None:
    """Write the bench-only candidates (bf16_autocast, fp32_frozen) into args.out, with a
    manifest; skipped when the manifest records the same model.pt."""
    import hashlib  # noqa: PLC0415

    import torch  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_model as ex  # noqa: PLC0415
    from transformers import BertModel  # noqa: PLC0415

    model_dir = args.model_dir
    base = json.loads((model_dir / "manifest.json").read_text())
    key = {"model.pt": base["files"]["model.pt"],
           "quantize.py": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    out = args.out
    mf = out / "manifest.json"
    if mf.is_file() and json.loads(mf.read_text()).get("source") == key:
        print(f"[candidates] {out}: up to date", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    src = ex.minilm_dir()
    bert = BertModel.from_pretrained(str(src), dtype=torch.float32, add_pooling_layer=False).eval()
    model = ex.pooled(bert).eval()
    tok = ex.load_tokenizer(src)
    ex_in = ex.batch(tok, ["A short title", "A somewhat longer sentence about markets, films and football."])
    inputs = (ex_in["input_ids"], ex_in["attention_mask"])
    files = {}
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            traced = torch.jit.trace(model, inputs, check_trace=False)
        traced.save(str(out / "model.bf16-autocast.pt"))
        files["bf16_autocast"] = "model.bf16-autocast.pt"
        frozen = torch.jit.freeze(torch.jit.trace(model, inputs, check_trace=False).eval())
        frozen.save(str(out / "model.fp32-frozen.pt"))
        files["fp32_frozen"] = "model.fp32-frozen.pt"
    mf.write_text(json.dumps({"source": key, "candidates": files}, indent=1) + "\n")
    print(f"[candidates] wrote {sorted(files)} into {out}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Experiment
# ----------------------------------------------------------------------------------------------

def _records(path: Path, limit: int):
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    # Every 4th article when limited, so all five sections are represented.
    if limit and limit < len(rows):
        step = max(1, len(rows) // limit)
        rows = rows[::step][:limit]
    return rows


def explore(args) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches" / "python"))
    import export_model as ex  # noqa: PLC0415
    from bbc_accuracy import BUILTIN_SETS, LABELS, expand  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415
    from transformers import BertModel  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    src = ex.minilm_dir()
    bert = BertModel.from_pretrained(str(src), dtype=torch.float32, add_pooling_layer=False).eval()

    fp32 = ex.pooled(bert).eval()
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    sep = tok.token_to_id("[SEP]")
    recs = _records(args.data, args.limit)
    gold = np.array([LABELS.index(r["label"]) for r in recs])
    prompts = expand(BUILTIN_SETS["story-rich-desc"])

    def cut(s, n):
        return s if len(s) <= n else s[: n - 1] + [sep]

    views = {
        "title": [cut(e.ids, 256) for e in tok.encode_batch([r["title"] for r in recs])],
        "full256": [cut(e.ids, 256) for e in tok.encode_batch(
            ["\n".join(p for p in (r["title"], r.get("description") or "", r.get("text") or "") if p) for r in recs])],
    }
    prompt_ids = {lab: [cut(e.ids, 256) for e in tok.encode_batch(prompts[lab])] for lab in LABELS}

    def embed(model, seqs, bs=16):
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        out = np.zeros((len(seqs), 384), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                w = max(len(seqs[k]) for k in idx)
                ids = torch.zeros(len(idx), w, dtype=torch.long)
                mask = torch.zeros(len(idx), w, dtype=torch.long)
                for r, k in enumerate(idx):
                    ids[r, :len(seqs[k])] = torch.tensor(seqs[k])
                    mask[r, :len(seqs[k])] = 1
                out[idx] = model(ids, mask).numpy()
        return out

    flavours = args.flavours.split(",")
    models = {}
    ex_ids = torch.randint(1000, 30000, (2, 16))
    ex_mask = torch.ones(2, 16, dtype=torch.long)
    for f in flavours:
        m = quantize(fp32, f).eval()
        with torch.inference_mode():
            models[f] = torch.jit.trace(m, (ex_ids, ex_mask), check_trace=False)
    ref = {}
    results = {f: {} for f in flavours}
    for f in flavours:
        m = models[f]
        lab = np.stack([(lambda e: e / np.linalg.norm(e))(embed(m, prompt_ids[l]).mean(0)) for l in LABELS])
        for v, seqs in views.items():
            e = embed(m, seqs)
            if f == flavours[0]:
                ref[v] = e
            acc = float(((e @ lab.T).argmax(1) == gold).mean())
            results[f][v] = round(100 * acc, 2)
            results[f][v + "_cos_vs_" + flavours[0]] = round(float((e * ref[v]).sum(1).mean()), 4)
        print(f"[quantize] {f}: {results[f]}", file=sys.stderr, flush=True)

    # Speed: interleaved rounds, batch 32, 64 and 256 tokens.
    gen = torch.Generator().manual_seed(0)
    for L in (64, 256):
        ids = torch.randint(1000, 30000, (args.batch, L), generator=gen)
        mask = torch.ones(args.batch, L, dtype=torch.long)
        rates = {f: [] for f in flavours}
        with torch.inference_mode():
            for f in flavours:
                models[f](ids, mask)
            for _ in range(args.rounds):
                for f in flavours:
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < args.seconds:
                        models[f](ids, mask)
                        n += args.batch
                    rates[f].append(n / (time.perf_counter() - t0))
        for f in flavours:
            results[f][f"items_s_{L}"] = round(float(np.median(rates[f])), 1)
            results[f][f"speedup_{L}"] = round(float(np.median(rates[f]) / np.median(rates[flavours[0]])), 2)
    print(json.dumps({"articles": len(recs), "threads": args.threads, "batch": args.batch,
                      "load_avg": os.getloadavg(), "results": results}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explore", help="accuracy and speed of each flavour vs fp32, same run")
    cache = Path(os.environ.get("STREAMOASIS_CACHE") or Path.home() / ".cache" / "streamoasis")
    e.add_argument("--data", type=Path, default=cache / "data" / "bbc-news.jsonl")
    e.add_argument("--limit", type=int, default=400)
    e.add_argument("--flavours", default="fp32,dyn-tensor-rr,dyn-channel-rr,dyn-channel,dyn-channel-keep")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--seconds", type=float, default=2.0)
    c = sub.add_parser("candidates", help="bench-only precision candidates (bf16_autocast, fp32_frozen)")
    c.add_argument("--model-dir", type=Path, default=Path(__file__).resolve().parents[2] / "models" / "all-MiniLM-L6-v2")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "candidates":
        candidates(args)
    else:
        explore(args)


if __name__ == "__main__":
    main()

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
    args = ap.parse_args()
    explore(args)


if __name__ == "__main__":
    main()

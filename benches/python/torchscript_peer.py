#!/usr/bin/env python3
"""Python peer of the Rust embedding benchmark: the same TorchScript model, run from Python.

For every (sequence length L, batch size B) it feeds synthetic inputs of exactly L tokens
(random ids in the vocabulary's word range, [CLS] first, [SEP] last, full attention mask)
to ``torch.jit.load(<model>/model.pt)`` under ``torch.inference_mode()``, warms up, then
runs a timed loop for about ``--seconds`` and reports items/s (with ``--rounds N`` the
whole sweep runs N times and each point reports its best round, which filters out other
load on a shared machine).

In the same run it measures the fp32 matmul peak (``torch.mm`` of 2048x2048 matrices,
repeated, 2*n^3 FLOP each) and computes the model's FLOPs per item analytically for a
BERT encoder (linear layers and attention matmuls only; embeddings, layer norms,
softmax, GELU and pooling are ignored):

    per layer: 2*L*(4*h*h + 2*h*i)  [Q, K, V, output projections + FFN up/down]
             + 2*2*L*L*h            [Q.K^T scores and scores.V]
    per item : layers * per layer

with h = hidden size, i = intermediate size (read from the model folder's config when
present, else MiniLM-L6: h=384, i=1536, 6 layers), so ``pct_of_peak`` =
items/s * GFLOP/item / peak GFLOP/s.

Output JSON::

    {"peak_gflops": ..., "points": [{"seq_len": 64, "batch": 32, "items_per_s": ...,
      "model_gflop_per_item": ..., "pct_of_peak": ...}, ...],
     "torch_version": ..., "threads": ..., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

FORMULA = ("flop_per_item = layers * (2*L*(4*h*h + 2*h*i) + 2*2*L*L*h); "
           "linears (QKV, attention output, FFN up/down) + attention matmuls (QK^T, AV); "
           "embeddings/layernorm/softmax/GELU/pooling ignored")


def bert_flop_per_item(seq_len: int, h: int = 384, i: int = 1536, layers: int = 6) -> float:
    """Analytic FLOPs of one BERT encoder pass over seq_len tokens (see FORMULA)."""
    per_layer = 2 * seq_len * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * seq_len * h
    return float(layers * per_layer)


def matmul_peak_gflops(seconds: float, n: int = 2048) -> float:
    """fp32 GFLOP/s of repeated torch.mm(n x n, n x n): the best of several timed rounds."""
    import torch  # noqa: PLC0415

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        dt = time.perf_counter() - t0
        best = max(best, reps * 2.0 * n ** 3 / dt / 1e9)
        if time.perf_counter() >= deadline:
            return best


def model_dims(model_dir: Path) -> tuple[int, int, int, int]:
    """(hidden, intermediate, layers, vocab) from manifest/config when known, else MiniLM-L6."""
    h, i, layers, vocab = 384, 1536, 6, 30522
    cfg = model_dir / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        h = c.get("hidden_size", h)
        i = c.get("intermediate_size", i)
        layers = c.get("num_hidden_layers", layers)
        vocab = c.get("vocab_size", vocab)
    return h, i, layers, vocab


def cpu_name() -> str:
    """CPU model name from /proc/cpuinfo (Linux) or platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    """Parse arguments, run the benchmark points and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                    help="model folder with model.pt (default: models/all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--seq-lens", default="64,128", help="comma-separated token counts")
    ap.add_argument("--batch-sizes", default="1,8,16,32,64", help="comma-separated batch sizes")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up batches per point")
    ap.add_argument("--rounds", type=int, default=1,
                    help="sweep all points this many times, report the best round per point "
                         "(robust to other load on a shared machine)")
    ap.add_argument("--peak-seconds", type=float, default=3.0, help="seconds for the matmul peak")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic token ids")
    ap.add_argument("--out", type=Path, help="write the JSON report here (also printed)")
    ap.add_argument("--serve", action="store_true",
                    help="read 'L B SECONDS' lines on stdin, answer one JSON line each "
                         "(lets the Rust benchmark interleave its points with ours)")
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
    batches = [int(x) for x in args.batch_sizes.split(",") if x]
    h, inter, layers, vocab = model_dims(args.model)

    load_before = list(os.getloadavg())
    print(f"[peer] torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {cpu_name()}, "
          f"loadavg {load_before[0]:.2f}", flush=True)
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print("[peer] warning: the machine is busy; numbers will be low", flush=True)
    peak = matmul_peak_gflops(args.peak_seconds)
    print(f"[peer] fp32 matmul peak (torch.mm 2048x2048): {peak:.1f} GFLOP/s", flush=True)

    model = torch.jit.load(str(args.model / "model.pt"), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {}
    for length in seq_lens:
        for b in batches:
            ids = torch.randint(1000, vocab, (b, length), generator=gen, dtype=torch.long)
            ids[:, 0] = 101   # [CLS]
            ids[:, -1] = 102  # [SEP]
            inputs[(length, b)] = (ids, torch.ones(b, length, dtype=torch.long))
    runs: dict[tuple[int, int], list[tuple[float, float, int]]] = {k: [] for k in inputs}
    with torch.inference_mode():
        for rnd in range(args.rounds):
            for (length, b), (ids, mask) in inputs.items():
                for _ in range(args.warmup):
                    model(ids, mask)
                n_batches = 0
                t0 = time.perf_counter()
                while True:
                    out = model(ids, mask)
                    n_batches += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= args.seconds:
                        break
                assert out.shape[0] == b
                ips = n_batches * b / elapsed
                runs[(length, b)].append((ips, elapsed / n_batches, n_batches))
                gflop = bert_flop_per_item(length, h, inter, layers) / 1e9
                print(f"[peer] round {rnd + 1}/{args.rounds} L={length:4d} B={b:3d}: {ips:8.1f} items/s "
                      f"({1000 * elapsed / n_batches:8.1f} ms/batch, {100 * ips * gflop / peak:5.1f}% "
                      "of peak)", flush=True)
    if args.rounds > 1:
        peak = max(peak, matmul_peak_gflops(args.peak_seconds))
        print(f"[peer] fp32 matmul peak, best of two measurements: {peak:.1f} GFLOP/s", flush=True)
    points = []
    for (length, b), rs in runs.items():
        gflop = bert_flop_per_item(length, h, inter, layers) / 1e9
        best = max(rs)
        points.append({
            "seq_len": length, "batch": b, "items_per_s": round(best[0], 2),
            "ms_per_batch": round(1000.0 * best[1], 3),
            "items_per_s_rounds": [round(r[0], 2) for r in rs],
            "model_gflop_per_item": round(gflop, 4),
            "pct_of_peak": round(100.0 * best[0] * gflop / peak, 1),
        })

    report = {
        "peak_gflops": round(peak, 1),
        "peak_method": "torch.mm fp32 2048x2048, best of repeated rounds",
        "points": points,
        "flop_formula": FORMULA,
        "model_dims": {"hidden": h, "intermediate": inter, "layers": layers},
        "model": str(args.model),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds_per_point": args.seconds,
        "rounds": args.rounds,
        "items_per_s_is": "best of rounds",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"[peer] wrote {args.out}")
    else:
        print(text)


def serve(args: argparse.Namespace) -> None:
    """Answer timing requests from the Rust benchmark, one per stdin line: 'L B SECONDS'.

    Replies {"items_per_s": ...} per line. 'peak SECONDS' replies {"peak_gflops": ...}."""
    import sys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    _, _, _, vocab = model_dims(args.model)
    model = torch.jit.load(str(args.model / "model.pt"), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(args.seed)
    print(json.dumps({"ready": True, "torch_version": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "peak":
            print(json.dumps({"peak_gflops": matmul_peak_gflops(float(parts[1]))}), flush=True)
            continue
        length, b, seconds = int(parts[0]), int(parts[1]), float(parts[2])
        ids = torch.randint(1000, vocab, (b, length), generator=gen, dtype=torch.long)
        ids[:, 0] = 101
        ids[:, -1] = 102
        mask = torch.ones(b, length, dtype=torch.long)
        with torch.inference_mode():
            for _ in range(args.warmup):
                model(ids, mask)
            n = 0
            t0 = time.perf_counter()
            while True:
                model(ids, mask)
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
        print(json.dumps({"items_per_s": n * b / elapsed}), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Film-genre zero-shot ranking on TMDB 5000 (multi-label): the prompt explorer for films.

Films are embedded once (title + overview, what the tagger sees for a MOVIE item without a
transcript) with the exported TorchScript model and cached; each prompt set then costs only its
prompt embeddings. Metrics on the ``test`` split (prepare_tmdb.py): LRAP (label ranking average
precision), P@1, and micro-F1 at a threshold fitted on the ``calibration`` split. Prompt sets
use only templates around the label name -- nothing written for these 20 genres -- so what
wins here should carry over to other film taxonomies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETS = {
    "news (today's default)": ["A news story about {label}."],
    "label only": ["{label}"],
    "film": ["A {label} film."],
    "film+movie": ["A {label} film.", "A {label} movie."],
    "film-genre": ["A {label} film.", "A {label} movie.", "This film is a {label}.", "The genre of this film is {label}."],
    "film-about": ["A film about {label}.", "A {label} film."],
    "film-story": ["A {label} film.", "A {label} movie.", "A {label} story."],
}


def label_matrix(emb, names, templates):
    """One row per label: the mean of its prompts' embeddings, L2-normalised."""
    rows = []
    for n in names:
        e = emb.embed_texts([t.replace("{label}", n) for t in templates], 256).mean(0)
        rows.append(e / np.linalg.norm(e))
    return np.stack(rows)


def lrap(scores, y):
    out = []
    for s, t in zip(scores, y):
        rel = np.flatnonzero(t)
        if len(rel) == 0:
            continue
        rank = (-s).argsort().argsort() + 1
        r = rank[rel]
        out.append(np.mean([(r <= x).sum() / x for x in r]))
    return float(np.mean(out))


def p_at_1(scores, y):
    return float(np.mean(y[np.arange(len(y)), scores.argmax(1)]))


def micro_f1(pred, y):
    tp = (pred & (y == 1)).sum()
    fp = (pred & (y == 0)).sum()
    fn = (~pred & (y == 1)).sum()
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def fit_platt(x, t, iters=300, lr=0.5):
    """Logistic regression of relevance on one feature: P(relevant) = sigmoid(a x + b)."""
    a, b = 1.0, 0.0
    mu, sd = x.mean(), x.std() + 1e-9
    z = (x - mu) / sd
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a * z + b)))
        ga, gb = np.mean((p - t) * z), np.mean(p - t)
        a -= lr * ga * 4
        b -= lr * gb * 4
    return a / sd, b - a * mu / sd


def main() -> None:
    cache = Path(os.environ.get("STREAMOASIS_CACHE") or Path.home() / ".cache" / "streamoasis")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "all-MiniLM-L6-v2")
    ap.add_argument("--file", default="model.pt")
    ap.add_argument("--data", type=Path, default=cache / "data" / "tmdb-films.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--chosen", default="film-about", help="template set to calibrate")
    ap.add_argument("--directions-out", type=Path,
                    help="also fit each genre's direction (the mean of its calibration films minus the mean of all, "
                         "unit length) and write them here: the file a topology's calibration.directions names")
    ap.add_argument("--direction-weight", type=float, default=1.0,
                    help="a fitted label scores with unit(text vector + weight x direction); the pairs are fitted so")
    ap.add_argument("--direction-min-films", type=int, default=10,
                    help="fit no direction for a genre with fewer calibration films (it would be those few films)")
    args = ap.parse_args()
    from bbc_accuracy import Embedder  # noqa: PLC0415

    emb = Embedder(args.model, args.threads, 32)
    if args.file != "model.pt":
        emb.model = emb.torch.jit.load(str(args.model / args.file), map_location="cpu").eval()
    films = [json.loads(l) for l in args.data.read_text(encoding="utf-8").splitlines() if l.strip()]
    genres = sorted({g for f in films for g in f["genres"]})
    y = np.array([[g in f["genres"] for g in genres] for f in films], dtype=int)
    test = np.array([f["split"] == "test" for f in films])
    key = hashlib.sha256(args.data.read_bytes() + (args.model / args.file).read_bytes()[:1 << 20]).hexdigest()[:12]
    cf = cache / "data" / "emb-cache" / f"tmdb-{key}.npy"
    cf.parent.mkdir(parents=True, exist_ok=True)
    if cf.is_file():
        doc = np.load(cf)
    else:
        doc = emb.embed_texts([f["title"] + "\n" + f["overview"] for f in films], 256)
        np.save(cf, doc)
    names = [g.lower() for g in genres]
    rows = []
    for name, templates in SETS.items():
        cos = doc @ label_matrix(emb, names, templates).T
        # Calibration on the calibration split: P(relevant | cosine - item's mean cosine).
        feat = cos - cos.mean(1, keepdims=True)
        a, b = fit_platt(feat[~test].ravel(), y[~test].ravel())
        prob = 1 / (1 + np.exp(-(a * feat + b)))
        ths = np.linspace(0.05, 0.95, 91)
        best = max(ths, key=lambda th: micro_f1(prob[~test] >= th, y[~test]))
        r = {"set": name, "templates": templates,
             "lrap": round(lrap(cos[test], y[test]), 4), "p_at_1": round(p_at_1(cos[test], y[test]), 4),
             "micro_f1": round(micro_f1(prob[test] >= best, y[test]), 4),
             "platt_a": round(float(a), 3), "platt_b": round(float(b), 3), "threshold": round(float(best), 2)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    # The shipped calibration: the chosen templates, one (slope, bias) per label fitted on the
    # calibration split (a label prior and a sharpness), the global fit for unseen labels, and
    # the micro-F1-optimal threshold on the calibration split.
    templates = SETS[args.chosen]
    text = label_matrix(emb, names, templates)
    cos = doc @ text.T
    feat = cos - cos.mean(1, keepdims=True)
    # The global pair (labels that have no pair of their own) is fitted on the label names' own
    # vectors: such labels have no direction.
    ga, gb = fit_platt(feat[~test].ravel(), y[~test].ravel())
    directions = None
    if args.directions_out:
        # Each genre's direction in the model's space: where its films sit relative to all films
        # of the calibration split. A fitted label then scores with its name's vector moved along it.
        mean_all = doc[~test].mean(0)
        directions = np.stack([doc[~test & (y[:, j] == 1)].mean(0) - mean_all for j in range(len(names))])
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        enough = y[~test].sum(0) >= args.direction_min_films
        directions[~enough] = 0.0
        moved = text + args.direction_weight * directions
        moved /= np.linalg.norm(moved, axis=1, keepdims=True)
        cos = doc @ moved.T
        feat = cos - cos.mean(1, keepdims=True)
    per = {n: fit_platt(feat[~test][:, j], y[~test][:, j]) for j, n in enumerate(names)}
    prob = np.stack([1 / (1 + np.exp(-(per[n][0] * feat[:, j] + per[n][1]))) for j, n in enumerate(names)], 1)
    ths = np.linspace(0.05, 0.95, 91)
    best = float(max(ths, key=lambda th: micro_f1(prob[~test] >= th, y[~test])))
    cal = {"templates": templates, "slope": round(float(ga), 3), "bias": round(float(gb), 3),
           "threshold": round(best, 2),
           "labels": {n: [round(float(a), 3), round(float(b), 3)] for n, (a, b) in per.items()},
           "test": {"lrap": round(lrap(prob[test], y[test]), 4), "p_at_1": round(p_at_1(prob[test], y[test]), 4),
                    "micro_f1": round(micro_f1(prob[test] >= best, y[test]), 4)}}
    print(json.dumps({"calibrated": cal}), flush=True)
    if directions is not None:
        manifest = json.loads((args.model / "manifest.json").read_text())
        counts = y[~test].sum(0)
        doc_out = {
            "about": "Per-label directions for streamoasis calibration.directions: a fitted label scores with "
                     "unit(its prompts' vector + weight x direction). Fitted by benches/python/film_accuracy.py "
                     "--directions-out on the calibration split of TMDB 5000; valid for this model only.",
            "model": manifest["name"], "weights_sha256": manifest["source_sha256"]["model.safetensors"],
            "dims": int(directions.shape[1]),
            "weight": args.direction_weight, "templates": templates,
            "fitted_on": {"films": int((~test).sum()), "per_label": {n: int(c) for n, c in zip(names, counts)}},
            "min_films": args.direction_min_films,
            "labels": {n: [round(float(x), 5) for x in d] for n, d, ok in zip(names, directions, enough) if ok},
        }
        # One label per line: a refit shows as a diff of the labels that moved.
        head = json.dumps({k: v for k, v in doc_out.items() if k != "labels"}, indent=1)[:-2]
        lines = ",\n".join(f"  {json.dumps(n)}: {json.dumps(v)}" for n, v in doc_out["labels"].items())
        args.directions_out.write_text(head + ',\n "labels": {\n' + lines + "\n }\n}\n")
        json.loads(args.directions_out.read_text())
        print(f"wrote {args.directions_out}; calibration for the topology:")
        print(f"          slope: {cal['slope']}\n          bias: {cal['bias']}\n          labels: {{")
        items = [f'"{n}": [{a}, {b}]' for n, (a, b) in cal["labels"].items()]
        print("            " + ", ".join(items) + "\n          }\n        min_score: " + str(cal["threshold"]))
    freq = y[~test].mean(0)
    prior = np.tile(freq, (int(test.sum()), 1))
    print(json.dumps({"set": "genre frequency (no model)", "lrap": round(lrap(prior, y[test]), 4),
                      "p_at_1": round(p_at_1(prior, y[test]), 4)}))
    if args.out:
        args.out.write_text(json.dumps({"films_test": int(test.sum()), "genres": genres, "rows": rows, "calibrated": cal}, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compare exported embedding models on the same data, prompts and machine, in one run.

For every model folder (``export_model.py`` layout: model.pt, tokenizer.json, manifest.json):

* BBC News zero-shot accuracy, single-label (argmax of the cosine to each label's vector; the
  tagger's softmax over cosine/temperature has the same argmax), on two views: ``full`` = title,
  description and text joined by newlines, cut at 256 tokens (special tokens included, the
  closing special token kept), and ``title``. Label vectors: topology.yaml's
  ``tagging.embedding.templates`` and ``tagging.labels`` expanded as the Rust tagger does
  (``{label}`` -> the name, one prompt per description for ``{description}``), the L2-normalised
  mean of the prompts' embeddings.
* TMDB 5000 film genres on the ``test`` split: LRAP and P@1 of the raw cosine ranking (no
  calibration), label vectors from the MOVIE kind's templates in topology.yaml around the
  lower-cased genre names; film text = title + newline + overview, cut at 256 tokens.
* Speed: items/s of ``model.pt`` on synthetic batches (``--batch`` items of exactly L tokens,
  full attention mask) for each ``--seq-lens``, torch.set_num_threads(``--threads``); the models
  take turns within every round (interleaved, so they see the same machine load) and the median
  round is reported.
* A small probe of non-English sentences (which label wins, with the cosine margins), to show
  what an English-only model does with them.

Subsets (for time): every k-th BBC article up to ``--bbc-limit`` (all five sections stay
represented) and every k-th test film up to ``--film-limit``; the counts are in the output.

Writes ``--out-json`` and ``--out-md`` (default benches/results/models.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from film_accuracy import lrap, p_at_1  # noqa: E402  (the film explorer's ranking metrics)

BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]

PROBES = [
    # (text, language, expected label among PROBE_LABELS)
    ("東京で新しいスマートフォンが発売された", "ja", "technology"),
    ("日本代表がワールドカップで勝利した", "ja", "sport"),
    ("首相が国会で新しい予算案を発表した", "ja", "politics"),
    ("Die Regierung hat im Bundestag ein neues Gesetz beschlossen.", "de", "politics"),
    ("El Real Madrid ganó la final de la Liga de Campeones.", "es", "sport"),
    ("Apple a présenté un nouvel ordinateur portable avec une puce plus rapide.", "fr", "technology"),
    ("A new smartphone went on sale in Tokyo.", "en", "technology"),
]
PROBE_LABELS = ["technology", "sport", "politics"]


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMOASIS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamoasis")


def ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def kth(n: int, limit: int) -> int:
    return max(1, n // limit) if limit and limit < n else 1


def every_kth(rows: list, limit: int) -> list:
    if not limit or limit >= len(rows):
        return rows
    step = max(1, len(rows) // limit)
    return rows[::step][:limit]


def topology_prompts(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """({label: [prompt, ...]} for the news templates, MOVIE templates) from topology.yaml."""
    import yaml  # noqa: PLC0415

    topo = yaml.safe_load(path.read_text())
    t = topo["tagging"]
    templates = t["embedding"]["templates"]
    prompts = {}
    for lab in t["labels"]:
        name, descs = lab["name"], lab.get("descriptions") or []
        out = []
        for tpl in templates:
            if "{description}" in tpl:
                for d in (descs or [name]):
                    out.append(tpl.replace("{label}", name).replace("{description}", d))
            else:
                out.append(tpl.replace("{label}", name))
        prompts[name] = out
    movie = t["embedding"]["kinds"]["MOVIE"]["templates"]
    return prompts, movie


class Model:
    """An exported model folder: TorchScript fp32 module + tokenizer.json."""

    def __init__(self, d: Path, bert_specials: bool = False):
        import torch  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        self.dir = d
        self.torch = torch
        self.manifest = json.loads((d / "manifest.json").read_text())
        self.name = self.manifest["name"]
        self.max_len = int(self.manifest.get("max_seq_len", 256))
        self.module = torch.jit.load(str(d / "model.pt"), map_location="cpu").eval()
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.pad = int(self.manifest.get("special_tokens", {}).get("pad_id") or 0)
        self.vocab = self.tok.get_vocab_size()
        self.size_mb = round((d / "model.pt").stat().st_size / 1e6, 1)
        # bert_specials: wrap content in the ids of "[CLS]"/"[SEP]" whatever the tokenizer's own
        # special tokens are -- what the Rust TextEncoder does today (model.rs looks them up by name).
        self.wrap = None
        if bert_specials:
            self.wrap = (self.tok.token_to_id("[CLS]"), self.tok.token_to_id("[SEP]"))
            self.name += " (Rust today: [CLS]/[SEP] ids)"

    def ids(self, texts: list[str], max_len: int) -> list[list[int]]:
        """Token ids with the special tokens, cut at max_len keeping the closing special token."""
        out = []
        if self.wrap:
            for e in self.tok.encode_batch(texts, add_special_tokens=False):
                out.append([self.wrap[0]] + e.ids[: max_len - 2] + [self.wrap[1]])
            return out
        for e in self.tok.encode_batch(texts):
            s = e.ids
            out.append(s if len(s) <= max_len else s[: max_len - 1] + [s[-1]])
        return out

    def embed(self, texts: list[str], max_len: int = 256, bs: int = 32) -> np.ndarray:
        torch = self.torch
        seqs = self.ids(texts, max_len)
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        out = None
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                w = max(len(seqs[k]) for k in idx)
                ids = torch.full((len(idx), w), self.pad, dtype=torch.long)
                mask = torch.zeros(len(idx), w, dtype=torch.long)
                for r, k in enumerate(idx):
                    ids[r, :len(seqs[k])] = torch.tensor(seqs[k])
                    mask[r, :len(seqs[k])] = 1
                e = self.module(ids, mask).numpy()
                if out is None:
                    out = np.zeros((len(seqs), e.shape[1]), dtype=np.float32)
                out[idx] = e
        return out

    def label_matrix(self, prompts: dict[str, list[str]], order: list[str]) -> np.ndarray:
        rows = []
        for lab in order:
            e = self.embed(prompts[lab]).mean(0)
            rows.append(e / np.linalg.norm(e))
        return np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="models/all-MiniLM-L6-v2,models/all-mpnet-base-v2",
                    help="comma list of exported model folders; the first is the baseline")
    ap.add_argument("--bbc", type=Path, default=cache_dir() / "data" / "bbc-news.jsonl")
    ap.add_argument("--films", type=Path, default=cache_dir() / "data" / "tmdb-films.jsonl")
    ap.add_argument("--topology", type=Path, default=REPO / "topology.yaml")
    ap.add_argument("--bbc-limit", type=int, default=300)
    ap.add_argument("--film-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-lens", default="64,256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--bert-specials", action="store_true",
                    help="also score (accuracy only) each model whose special tokens are not [CLS]/[SEP] "
                         "the way the Rust tagger wraps windows today ([CLS]/[SEP] looked up by name)")
    ap.add_argument("--out-json", type=Path, default=REPO / "benches" / "results" / "models.json")
    ap.add_argument("--out-md", type=Path, default=REPO / "benches" / "results" / "models.md")
    args = ap.parse_args()

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    t0 = time.time()
    dirs = [REPO / m if not Path(m).is_absolute() else Path(m) for m in args.models.split(",") if m]
    models = [Model(d) for d in dirs]
    extra = []
    if args.bert_specials:
        for d, m in zip(dirs, models):
            own = m.tok.encode("").ids
            if own[:1] != [m.tok.token_to_id("[CLS]")] and m.tok.token_to_id("[CLS]") is not None:
                extra.append(Model(d, bert_specials=True))
    news_prompts, movie_templates = topology_prompts(args.topology)

    bbc = [json.loads(l) for l in args.bbc.read_text(encoding="utf-8").splitlines() if l.strip()]
    n_bbc = len(bbc)
    bbc = every_kth(bbc, args.bbc_limit)
    gold = np.array([BBC_LABELS.index(r["label"]) for r in bbc])
    full = ["\n".join(x.strip() for x in (r["title"], r.get("description") or "", r.get("text") or "")
                      if x.strip()) for r in bbc]
    titles = [r["title"] for r in bbc]

    films_all = [json.loads(l) for l in args.films.read_text(encoding="utf-8").splitlines() if l.strip()]
    genres = sorted({g for f in films_all for g in f["genres"]})
    test_all = [f for f in films_all if f["split"] == "test"]
    n_test = len(test_all)
    films = every_kth(test_all, args.film_limit)
    y = np.array([[g in f["genres"] for g in genres] for f in films], dtype=int)
    film_text = [f["title"] + "\n" + f["overview"] for f in films]
    film_prompts = {g: [t.replace("{label}", g.lower()) for t in movie_templates] for g in genres}
    probe_prompts = {lab: [f"A news story about {lab}."] for lab in PROBE_LABELS}

    results = {}
    for m in models + extra:
        r = {"dir": str(m.dir.relative_to(REPO)) if m.dir.is_relative_to(REPO) else str(m.dir),
             "name": m.name, "version": m.manifest.get("version"), "dims": m.manifest.get("dims"),
             "params_m": m.manifest.get("architecture", {}).get("params_m"),
             "model_pt_mb": m.size_mb, "pooling": m.manifest.get("pooling")}
        ts = time.time()
        lab = m.label_matrix(news_prompts, BBC_LABELS)
        for view, texts in (("full", full), ("title", titles)):
            t1 = time.time()
            e = m.embed(texts, 256)
            r[f"bbc_{view}_embed_s"] = round(time.time() - t1, 1)
            r[f"bbc_{view}"] = round(100 * float(((e @ lab.T).argmax(1) == gold).mean()), 2)
        flab = m.label_matrix(film_prompts, genres)
        t1 = time.time()
        fe = m.embed(film_text, 256)
        r["films_embed_s"] = round(time.time() - t1, 1)
        cos = fe @ flab.T
        r["tmdb_lrap"] = round(lrap(cos, y), 4)
        r["tmdb_p_at_1"] = round(p_at_1(cos, y), 4)
        plab = m.label_matrix(probe_prompts, PROBE_LABELS)
        pe = m.embed([p[0] for p in PROBES], 256)
        pc = pe @ plab.T
        r["probe"] = [{"text": t, "lang": lang, "expected": exp, "got": PROBE_LABELS[int(c.argmax())],
                       "cos": {lab_: round(float(v), 3) for lab_, v in zip(PROBE_LABELS, c)}}
                      for (t, lang, exp), c in zip(PROBES, pc)]
        r["probe_correct"] = sum(p["got"] == p["expected"] for p in r["probe"])
        r["accuracy_wall_s"] = round(time.time() - ts, 1)
        results[m.name] = r
        print(f"[models] {m.name}: BBC full {r['bbc_full']} title {r['bbc_title']} "
              f"TMDB LRAP {r['tmdb_lrap']} P@1 {r['tmdb_p_at_1']} probe {r['probe_correct']}/{len(PROBES)} "
              f"({r['accuracy_wall_s']}s)", file=sys.stderr, flush=True)

    # Speed: interleaved rounds.
    gen = torch.Generator().manual_seed(0)
    for L in [int(x) for x in args.seq_lens.split(",")]:
        rates = {m.name: [] for m in models}
        inputs = {}
        for m in models:
            ids = torch.randint(1000, m.vocab, (args.batch, L), generator=gen)
            # the tokenizer's own special ids at both ends: encode "" gives them
            special = m.tok.encode("").ids
            if len(special) >= 2:
                ids[:, 0], ids[:, -1] = special[0], special[-1]
            inputs[m.name] = (ids, torch.ones(args.batch, L, dtype=torch.long))
        with torch.inference_mode():
            for m in models:
                m.module(*inputs[m.name])
            for _ in range(args.rounds):
                for m in models:
                    n, ts = 0, time.perf_counter()
                    while time.perf_counter() - ts < args.seconds:
                        m.module(*inputs[m.name])
                        n += args.batch
                    rates[m.name].append(n / (time.perf_counter() - ts))
        base = float(np.median(rates[models[0].name]))
        for m in models:
            med = float(np.median(rates[m.name]))
            results[m.name][f"items_s_{L}"] = round(med, 1)
            results[m.name][f"speed_vs_base_{L}"] = round(med / base, 2)
        print(f"[models] speed L={L}: " + ", ".join(f"{k} {np.median(v):.1f}/s" for k, v in rates.items()),
              file=sys.stderr, flush=True)

    meta = {"bbc_articles": len(bbc), "bbc_total": n_bbc, "bbc_every_kth": kth(n_bbc, args.bbc_limit),
            "tmdb_test_films": len(films), "tmdb_test_total": n_test, "tmdb_every_kth": kth(n_test, args.film_limit), "tmdb_genres": len(genres), "threads": args.threads,
            "batch": args.batch, "rounds": args.rounds, "seconds_per_round": args.seconds,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "wall_s": round(time.time() - t0, 1),
            "news_prompts": news_prompts, "movie_templates": movie_templates}
    args.out_json.write_text(json.dumps({"meta": meta, "models": list(results.values())}, indent=1,
                                        ensure_ascii=False) + "\n")
    write_md(args, meta, results, models, extra)
    print(f"[models] wrote {args.out_json} and {args.out_md} ({meta['wall_s']}s)", file=sys.stderr)


def write_md(args, meta, results, models, extra) -> None:
    lens = [int(x) for x in args.seq_lens.split(",")]
    head = ("| model | params | dims | BBC full text | BBC titles | TMDB LRAP | TMDB P@1 | "
            + " | ".join(f"items/s @{L} tok" for L in lens) + " | non-English probe |")
    sep = "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(lens) + "---:|"
    rows = []
    for m in models:
        r = results[m.name]
        speed = " | ".join(f"{r[f'items_s_{L}']} ({r[f'speed_vs_base_{L}']:.2f}x)" for L in lens)
        params = f"{r['params_m']}M" if r.get("params_m") else "22.7M"
        rows.append(f"| {m.name} | {params} | {r['dims']} | {r['bbc_full']:.2f}% | {r['bbc_title']:.2f}% | "
                    f"{r['tmdb_lrap']:.4f} | {r['tmdb_p_at_1']:.4f} | {speed} | "
                    f"{r['probe_correct']}/{len(PROBES)} |")
    for m in extra:
        r = results[m.name]
        rows.append(f"| {m.name} | | | {r['bbc_full']:.2f}% | {r['bbc_title']:.2f}% | "
                    f"{r['tmdb_lrap']:.4f} | {r['tmdb_p_at_1']:.4f} | " + " | ".join("" for _ in lens)
                    + f" | {r['probe_correct']}/{len(PROBES)} |")
    cmd = ("~/.cache/streamoasis/venv-torch-2.13.0/bin/python benches/python/compare_models.py "
           f"--models {args.models} --bbc-limit {args.bbc_limit} --film-limit {args.film_limit} "
           f"--threads {args.threads} --batch {args.batch} --seq-lens {args.seq_lens} --rounds {args.rounds}"
           + (" --bert-specials" if args.bert_specials else ""))
    md = f"""# Embedding model comparison

{meta['bbc_articles']} BBC News articles (every {ordinal(meta['bbc_every_kth'])} of {meta['bbc_total']}), {meta['tmdb_test_films']} TMDB films
(every {ordinal(meta['tmdb_every_kth'])} of the {meta['tmdb_test_total']} in the test split), {meta['tmdb_genres']} genres; all models in the same run, on the
same machine.

{head}
{sep}
{chr(10).join(rows)}

Method: `benches/python/compare_models.py`. BBC: single-label, argmax cosine to each label's vector
(topology.yaml `tagging.embedding.templates` x `tagging.labels`, prompts averaged), views: title +
description + text cut at 256 tokens, and the title alone. TMDB: raw cosine ranking of the 20 genres
(MOVIE templates `{' / '.join(meta['movie_templates'])}`), LRAP and P@1, no calibration. Speed:
`model.pt` (fp32) on synthetic batches of {meta['batch']} items of exactly L tokens,
torch.set_num_threads({meta['threads']}), {meta['rounds']} rounds of {meta['seconds_per_round']}s with the models taking turns within
each round, median (in brackets: relative to the first model). Non-English probe: {len(PROBES)} short sentences
(Japanese, German, Spanish, French, one English control) against the labels technology / sport / politics
("A news story about {{label}}."), correct / total. torch {meta['torch']}; load average at the end
{meta['load_avg_at_end']} (the machine was shared with a build: absolute items/s are low, compare ratios).

Command: `{cmd}`
"""
    args.out_md.write_text(md)


if __name__ == "__main__":
    main()

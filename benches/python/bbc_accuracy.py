#!/usr/bin/env python3
"""Reference zero-shot accuracy of the embedding model on BBC News, in Python.

Embedding zero-shot: every label gets one or more prompt texts; the label vector is the
L2-normalised mean of its prompts' embeddings; an article goes to the label with the
highest cosine similarity (vectors are unit length, so a dot product).

Article views (``--views``):

``title``   the title only.
``full``    title + description + text joined by newlines, truncated at ``--max-len``
            tokens (special tokens included) -- what a single model call sees.
``window``  the article (same joined text) cut into windows like the Rust tagger does
            (processors/tagger/src/model.rs ``windows``): each ``[CLS] <max-len - 2
            tokens> [SEP]``, consecutive windows sharing ``--stride`` tokens, at most
            ``--max-windows`` (0 = no limit); the article vector is the L2-normalised
            mean of the window embeddings (``--window-pool uniform``, as in Rust, or
            ``tokens`` = weighted by each window's token count).
``lead``    title + description only (a cheap view).

The model is the exported TorchScript ``model.pt`` (what the Rust side loads) and the
tokenizer its ``tokenizer.json`` (Python ``tokenizers``), so the numbers are comparable with
the Rust ones.  Article embeddings are cached under ``--cache-dir`` (keyed by the data file,
model and view), so trying prompt sets costs only the prompt embeddings.

Prompt sets are JSON, in one of three forms:

* ``{"templates": ["This is a news story about {label}.", "{description}"],
  "taxonomy": {"business": "business, companies, markets", ...}}`` -- exactly the
  topology.yaml ``tagging.embedding.templates`` + ``labels`` semantics of the Rust tagger:
  ``{label}`` -> the label name, ``{description}`` -> its description (or the name).
* ``{"templates": ["A news story about {}.", ...], "labels": {"business": ["business",
  "companies, markets, economy"], ...}}`` -- every template formatted with every phrase.
* ``{"prompts": {"business": ["literal prompt", ...], ...}}`` -- literal prompts.

``--prompts`` takes a file or the name of a built-in set (``--list-sets``); ``--explore``
runs every built-in set on every view and prints a table.  The default set
(``story-rich-desc``) was the best cheap one: see the table in the project docs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def default_data() -> Path:
    """$SO_CACHE/data/bbc-news.jsonl (see scripts/lib/common.sh)."""
    cache = os.environ.get("STREAMOASIS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "streamoasis")
    return Path(cache) / "data" / "bbc-news.jsonl"


# ----------------------------------------------------------------------------------------------
# Built-in prompt sets
# ----------------------------------------------------------------------------------------------

T_STORY = ["A news story about {}."]
T_MULTI = [
    "A news story about {}.",
    "This article is about {}.",
    "{}",
    "News about {}.",
    "A BBC News article on {}.",
]
NAMES = {k: [k] for k in LABELS}
NAMES_EXPANDED = {
    "business": ["business"], "entertainment": ["entertainment"], "politics": ["politics"],
    "sport": ["sports"], "tech": ["technology"],
}
DESC_BRIEF = {  # the example the project gave, one description per label
    "business": ["business: companies, markets, economy, trade, banking"],
    "entertainment": ["entertainment: films, music, television, celebrities, awards"],
    "politics": ["politics: government, elections, parliament, parties, ministers"],
    "sport": ["sport: football, tennis, athletics, rugby, cricket, matches"],
    "tech": ["technology: computers, internet, software, mobile phones, video games"],
}
DESC_RICH = {  # several phrases per label, averaged
    "business": [
        "business",
        "the economy, companies, profits and markets",
        "shares, stock markets, interest rates, inflation and the dollar",
        "banks, firms, sales, oil prices, trade and economic growth",
    ],
    "entertainment": [
        "entertainment",
        "films, movies, actors, the box office and the Oscars",
        "music, singers, bands, albums and the charts",
        "television shows, celebrities, theatre and awards",
    ],
    "politics": [
        "politics",
        "the government, parliament, MPs and ministers",
        "elections, political parties, Labour, the Conservatives and the Liberal Democrats",
        "the prime minister, policy, law and the opposition",
    ],
    "sport": [
        "sport",
        "football, matches, goals, players, coaches and clubs",
        "tennis, rugby, cricket, athletics and the Olympics",
        "championships, tournaments, teams, wins and injuries",
    ],
    "tech": [
        "technology",
        "computers, software, the internet and the web",
        "mobile phones, gadgets, broadband and digital devices",
        "video games, security, viruses, spam and online services",
    ],
}

DESC_GENERIC = {  # several phrases per label, no country-specific names
    "business": [
        "business",
        "the economy, companies, profits and markets",
        "shares, interest rates, inflation, currencies and banks",
        "trade, jobs, sales, prices and economic growth",
    ],
    "entertainment": [
        "entertainment",
        "films, movies, actors and the box office",
        "music, singers, bands and albums",
        "television, celebrities, theatre and awards",
    ],
    "politics": [
        "politics",
        "the government, parliament and ministers",
        "elections, political parties and voters",
        "policy, laws, the opposition and political leaders",
    ],
    "sport": [
        "sport",
        "football, matches, goals, players and clubs",
        "tennis, rugby, cricket, athletics and the Olympics",
        "championships, tournaments, teams and coaches",
    ],
    "tech": [
        "technology",
        "computers, software and the internet",
        "mobile phones, gadgets and digital devices",
        "video games, online services and cyber security",
    ],
}

TOPOLOGY_DESC = {  # topology.yaml's one-string descriptions (Rust schema: one per label)
    "business": "business, companies, markets, the economy, trade, finance and banking",
    "entertainment": "entertainment, film, music, television, celebrities and the arts",
    "politics": "politics, government, elections, parliament, political parties and ministers",
    "sport": "sport, football, tennis, athletics, rugby, cricket, matches and players",
    "tech": "technology, computers, the internet, software, mobile phones and video games",
}
SENTENCE_DESC = {  # one-string descriptions without the label name
    "business": "the economy, companies, profits, shares, markets, banks and interest rates",
    "entertainment": "films, movies, actors, music, singers, albums, television shows and awards",
    "politics": "the government, parliament, MPs, ministers, elections and political parties",
    "sport": "football, matches, players, clubs, tennis, rugby, cricket and athletics",
    "tech": "technology, computers, software, the internet, mobile phones, gadgets and video games",
}


def kw(d: dict) -> dict:
    """Join each label's phrases into one description line."""
    return {k: [", ".join(v)] for k, v in d.items()}


# Measured on all 2225 articles (MiniLM-L6, max_len 256; window = Rust defaults: stride 32,
# at most 4 windows, uniform mean), accuracy in %:
#   set                  title   lead   full  window
#   story-names          69.39  78.43  85.08  86.47
#   story-expanded       69.21  78.65  86.43  87.24
#   multi-expanded       68.18  77.30  85.39  86.65
#   brief-desc           67.73  78.79  87.33  88.76
#   story-brief-desc     72.22  82.79  89.84  91.28
#   rich-desc            77.21  87.19  93.30  94.11
#   story-rich-desc      78.56  88.72  93.84  94.43   <- default: best cost/accuracy
#   multi-rich-desc      78.88  89.48  94.56  94.83   (5x the prompts)
#   story-rich-joined    74.20  84.36  89.30  90.92   (the 4 phrases in one string)
#   story-rich-nolabel   78.07  88.36  93.08  93.80
#   two-rich-desc        77.93  88.40  94.02  94.38
#   story-generic-desc   78.70  87.91  92.72  93.44   (no UK-specific names)
#   multi-generic-desc   79.06  88.85  93.39  93.89
#   topo-label-only      70.52  78.83  85.26  86.38
#   topo-current         73.35  84.27  90.88  91.19
#   topo-story-desc      75.73  86.02  91.15  91.87
#   topo-sentence-desc   75.42  87.37  91.51  92.36   (best with one description per label)
BUILTIN_SETS: dict[str, dict] = {
    "story-names": {"templates": T_STORY, "labels": NAMES},
    "story-expanded": {"templates": T_STORY, "labels": NAMES_EXPANDED},
    "multi-expanded": {"templates": T_MULTI, "labels": NAMES_EXPANDED},
    "brief-desc": {"templates": ["{}"], "labels": DESC_BRIEF},
    "story-brief-desc": {"templates": T_STORY, "labels": DESC_BRIEF},
    "rich-desc": {"templates": ["{}"], "labels": DESC_RICH},
    "story-rich-desc": {"templates": T_STORY, "labels": DESC_RICH},
    "multi-rich-desc": {"templates": T_MULTI, "labels": DESC_RICH},
    "story-rich-joined": {"templates": T_STORY, "labels": kw(DESC_RICH)},
    "story-rich-nolabel": {"templates": T_STORY, "labels": {k: v[1:] for k, v in DESC_RICH.items()}},
    "two-rich-desc": {"templates": ["A news story about {}.", "{}"], "labels": DESC_RICH},
    "story-generic-desc": {"templates": T_STORY, "labels": DESC_GENERIC},
    "multi-generic-desc": {"templates": T_MULTI, "labels": DESC_GENERIC},
    # Rust topology schema (templates with {label}/{description}, one description per label):
    "topo-label-only": {"templates": ["This is a news story about {label}."],
                        "taxonomy": {k: None for k in LABELS}},
    "topo-current": {"templates": ["This is a news story about {label}.", "{description}"],
                     "taxonomy": TOPOLOGY_DESC},
    "topo-story-desc": {"templates": ["This is a news story about {label}.",
                                      "This is a news story about {description}."],
                        "taxonomy": TOPOLOGY_DESC},
    "topo-sentence-desc": {"templates": ["A news story about {label}.",
                                         "A news story about {description}.",
                                         "This article is about {description}."],
                           "taxonomy": SENTENCE_DESC},
}


def expand(prompt_set: dict) -> dict[str, list[str]]:
    """Prompt set -> {label: [prompt text, ...]}."""
    if "prompts" in prompt_set:
        return {k: list(v) for k, v in prompt_set["prompts"].items()}
    if "taxonomy" in prompt_set:
        return {name: [t.replace("{label}", name).replace("{description}", desc or name)
                       for t in prompt_set["templates"]]
                for name, desc in prompt_set["taxonomy"].items()}
    out = {}
    for label, phrases in prompt_set["labels"].items():
        out[label] = [t.format(p) for t in prompt_set["templates"] for p in phrases]
    return out


# ----------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------

class Embedder:
    """TorchScript model + tokenizer.json, batched by length."""

    def __init__(self, model_dir: Path, threads: int, batch_size: int):
        import torch  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = torch.jit.load(str(model_dir / "model.pt"), map_location="cpu").eval()
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.batch_size = batch_size
        self.cls = self.tok.token_to_id("[CLS]")
        self.sep = self.tok.token_to_id("[SEP]")

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text with [CLS]/[SEP], untruncated."""
        return [e.ids for e in self.tok.encode_batch(texts)]

    def embed_ids(self, seqs: list[list[int]], progress: str = "") -> "np.ndarray":
        """Embed token-id sequences (any lengths), sorted by length into padded batches."""
        import numpy as np  # noqa: PLC0415

        torch = self.torch
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        out = None  # [n, dims], dims from the model's first output (384 for MiniLM)
        t0 = time.time()
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                width = max(len(seqs[k]) for k in idx)
                ids = torch.zeros(len(idx), width, dtype=torch.long)
                mask = torch.zeros(len(idx), width, dtype=torch.long)
                for r, k in enumerate(idx):
                    ids[r, :len(seqs[k])] = torch.tensor(seqs[k])
                    mask[r, :len(seqs[k])] = 1
                e = self.model(ids, mask).numpy()
                if out is None:
                    out = np.zeros((len(seqs), e.shape[1]), dtype=np.float32)
                out[idx] = e
                if progress and (s // self.batch_size) % 20 == 0:
                    print(f"  {progress}: {s + len(idx)}/{len(seqs)} ({time.time() - t0:.0f}s)",
                          file=sys.stderr, flush=True)
        return out

    def embed_texts(self, texts: list[str], max_len: int) -> "np.ndarray":
        """Embed texts truncated at max_len tokens (keeping [SEP] last)."""
        # keep the tokenizer's own closing special token ([SEP] for BERT, </s> for MPNet)
        seqs = [s if len(s) <= max_len else s[:max_len - 1] + [s[-1]] for s in self.ids(texts)]
        return self.embed_ids(seqs)


def joined(r: dict) -> str:
    """Title, description and text joined by newlines (as TagRequest::text in Rust)."""
    return "\n".join(x.strip() for x in (r["title"], r["description"], r["text"]) if x.strip())


def make_windows(seqs, emb: Embedder, max_len: int, stride: int, max_windows: int):
    """Rust-style windows: ([ids], owner index, content token count) lists."""
    body = max(max_len - 2, 1)
    step = max(body - stride, 1)
    windows, owner, weight = [], [], []
    for i, s in enumerate(seqs):
        inner = s[1:-1]
        start, n = 0, 0
        while start < len(inner) and (max_windows <= 0 or n < max_windows):
            end = min(start + body, len(inner))
            windows.append([emb.cls] + inner[start:end] + [emb.sep])
            owner.append(i)
            weight.append(end - start)
            n += 1
            if end == len(inner):
                break
            start += step
    return windows, owner, weight


def pool_windows(e, owner, weight, n: int, how: str):
    """L2-normalised mean of window embeddings per article (uniform or token-weighted)."""
    import numpy as np  # noqa: PLC0415

    w = np.asarray(weight, dtype=np.float32) if how == "tokens" else np.ones(len(owner), np.float32)
    out = np.zeros((n, e.shape[1]), dtype=np.float32)
    np.add.at(out, np.asarray(owner), e * w[:, None])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def cached_views(records, emb, views, args):
    """Article embeddings per view, cached as .npy/.npz keyed by data/model/view/settings."""
    import numpy as np  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(args.data.read_bytes())
    h.update((args.model / "model.pt").read_bytes()[:1 << 20])
    h.update(str((args.model / "model.pt").stat().st_size).encode())
    h.update(str(len(records)).encode())
    key = h.hexdigest()[:16]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for view in views:
        t0 = time.time()
        if view == "window":
            f = args.cache_dir / (f"bbc-{key}-window-{args.max_len}-s{args.stride}"
                                  f"-w{args.max_windows}.npz")
            if f.is_file():
                z = np.load(f)
                e, owner, weight = z["e"], z["owner"], z["weight"]
            else:
                seqs = emb.ids([joined(r) for r in records])
                wins, owner, weight = make_windows(seqs, emb, args.max_len, args.stride,
                                                   args.max_windows)
                e = emb.embed_ids(wins, progress=f"window ({len(wins)} windows)")
                np.savez(f, e=e, owner=np.asarray(owner), weight=np.asarray(weight))
                print(f"[bbc] embedded view 'window' ({len(wins)} windows) in "
                      f"{time.time() - t0:.1f}s -> {f}", file=sys.stderr)
            out[view] = pool_windows(e, owner, weight, len(records), args.window_pool)
            continue
        f = args.cache_dir / f"bbc-{key}-{view}-{args.max_len if view != 'title' else 0}.npy"
        if f.is_file():
            out[view] = np.load(f)
            continue
        if view == "title":
            texts = [r["title"] for r in records]
        elif view == "lead":
            texts = [r["title"] + "\n" + r["description"] for r in records]
        elif view == "full":
            texts = [joined(r) for r in records]
        else:
            sys.exit(f"error: unknown view {view!r}")
        seqs = [s if len(s) <= args.max_len else s[:args.max_len - 1] + [s[-1]]
                for s in emb.ids(texts)]
        out[view] = emb.embed_ids(seqs, progress=view)
        np.save(f, out[view])
        print(f"[bbc] embedded view {view!r} in {time.time() - t0:.1f}s -> {f}", file=sys.stderr)
    return out


def label_matrix(emb: Embedder, prompts: dict[str, list[str]]):
    """[n_labels, dims] normalised mean prompt embedding per label (LABELS order)."""
    import numpy as np  # noqa: PLC0415

    rows = []
    for label in LABELS:
        e = emb.embed_texts(prompts[label], 256).mean(axis=0)
        rows.append(e / np.linalg.norm(e))
    return np.stack(rows)


def accuracy(doc, lab, gold) -> tuple[float, "np.ndarray"]:
    """Accuracy of argmax cosine and the confusion matrix."""
    import numpy as np  # noqa: PLC0415

    pred = (doc @ lab.T).argmax(axis=1)
    conf = np.zeros((len(LABELS), len(LABELS)), dtype=int)
    np.add.at(conf, (gold, pred), 1)
    return float((pred == gold).mean()), conf


def main() -> None:
    """Parse arguments, embed articles and prompts, print accuracies."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "all-MiniLM-L6-v2")
    ap.add_argument("--data", type=Path, default=default_data(), help="BBC JSONL (prepare_bbc.py)")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per model call")
    ap.add_argument("--views", default="full,title", help="comma list of title,full,window,lead")
    ap.add_argument("--prompts", default="story-rich-desc",
                    help="built-in set name or JSON file (see --list-sets)")
    ap.add_argument("--explore", action="store_true", help="run every built-in set on every view")
    ap.add_argument("--list-sets", action="store_true", help="print the built-in sets and exit")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N articles")
    ap.add_argument("--stride", type=int, default=32, help="window view: tokens shared by windows")
    ap.add_argument("--max-windows", type=int, default=4, help="window view: most windows (0 = all)")
    ap.add_argument("--window-pool", choices=["uniform", "tokens"], default="uniform",
                    help="window view: mean of windows, uniform (as Rust) or token-weighted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache-dir", type=Path, default=default_data().parent / "emb-cache")
    ap.add_argument("--confusion", action="store_true", help="print confusion matrices")
    ap.add_argument("--out", type=Path, help="write results as JSON")
    args = ap.parse_args()

    if args.list_sets:
        print(json.dumps({k: expand(v) for k, v in BUILTIN_SETS.items()}, indent=1))
        return
    import numpy as np  # noqa: PLC0415

    if not args.data.is_file():
        sys.exit(f"error: {args.data} missing: run scripts/python/prepare_bbc.py first")
    records = [json.loads(line) for line in args.data.open(encoding="utf-8")]
    if args.limit:
        records = records[:args.limit]
    gold = np.asarray([LABELS.index(r["label"]) for r in records])
    views = [v for v in args.views.split(",") if v]
    emb = Embedder(args.model, args.threads, args.batch_size)
    docs = cached_views(records, emb, views, args)

    if args.explore:
        sets = dict(BUILTIN_SETS)
    elif args.prompts in BUILTIN_SETS:
        sets = {args.prompts: BUILTIN_SETS[args.prompts]}
    else:
        sets = {Path(args.prompts).stem: json.loads(Path(args.prompts).read_text())}

    results = []
    print(f"{'prompt set':24} " + " ".join(f"{v:>8}" for v in views))
    for name, pset in sets.items():
        lab = label_matrix(emb, expand(pset))
        row = {"set": name}
        for v in views:
            acc, conf = accuracy(docs[v], lab, gold)
            row[v] = round(100 * acc, 2)
            if args.confusion:
                print(f"  {name} / {v}: rows=gold cols=pred {LABELS}\n{conf}")
        results.append(row)
        print(f"{name:24} " + " ".join(f"{row[v]:8.2f}" for v in views), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"n": len(records), "max_len": args.max_len,
                                        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

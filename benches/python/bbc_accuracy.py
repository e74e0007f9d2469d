#!/usr/bin/env python3
"""Reference zero-shot accuracy of the embedding model on BBC News, in Python.

Embedding zero-shot: every label gets one or more prompt texts; the label vector is the
L2-normalised mean of its prompts' embeddings; an article goes to the label with the
highest cosine similarity (vectors are unit length, so a dot product).

Article views (``--views``):

``title``   the title only.
``full``    title + description + text joined by newlines, truncated at ``--max-len``
            tokens (special tokens included) -- what a single model call sees.
``window``  the whole article split into consecutive windows of ``--max-len`` tokens
            (each ``[CLS] <max-len - 2 tokens> [SEP]``); the article vector is the
            L2-normalised mean of the window embeddings weighted by their token counts.
``lead``    title + description only (a cheap view).

The model is the exported TorchScript ``model.pt`` (what the Rust side loads) and the
tokenizer its ``tokenizer.json`` (Python ``tokenizers``), so the numbers are comparable with
the Rust ones.  Article embeddings are cached under ``--cache-dir`` (keyed by the data file,
model and view), so trying prompt sets costs only the prompt embeddings.

Prompt sets are JSON: ``{"templates": ["A news story about {}.", ...],
"labels": {"business": ["business", "companies, markets, economy"], ...}}`` -- every
template is formatted with every phrase of a label (``{}``), or ``{"prompts":
{"business": ["literal prompt", ...], ...}}`` for literal prompts.  ``--prompts`` takes a
file or the name of a built-in set (``--list-sets``); ``--explore`` runs every built-in set
on every view and prints a table.
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


def kw(d: dict) -> dict:
    """Join each label's phrases into one description line."""
    return {k: [", ".join(v)] for k, v in d.items()}


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
}


def expand(prompt_set: dict) -> dict[str, list[str]]:
    """Prompt set -> {label: [prompt text, ...]}."""
    if "prompts" in prompt_set:
        return {k: list(v) for k, v in prompt_set["prompts"].items()}
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
        out = np.zeros((len(seqs), 384), dtype=np.float32)
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
                out[idx] = self.model(ids, mask).numpy()
                if progress and (s // self.batch_size) % 20 == 0:
                    print(f"  {progress}: {s + len(idx)}/{len(seqs)} ({time.time() - t0:.0f}s)",
                          file=sys.stderr, flush=True)
        return out

    def embed_texts(self, texts: list[str], max_len: int) -> "np.ndarray":
        """Embed texts truncated at max_len tokens (keeping [SEP] last)."""
        seqs = [s if len(s) <= max_len else s[:max_len - 1] + [self.sep] for s in self.ids(texts)]
        return self.embed_ids(seqs)


def article_views(records: list[dict], emb: Embedder, view: str, max_len: int):
    """Embeddings of every article for one view (numpy [N, 384])."""
    import numpy as np  # noqa: PLC0415

    if view == "title":
        texts = [r["title"] for r in records]
    elif view == "lead":
        texts = [r["title"] + "\n" + r["description"] for r in records]
    else:
        texts = ["\n".join(x for x in (r["title"], r["description"], r["text"]) if x) for r in records]
    seqs = emb.ids(texts)
    if view != "window":
        seqs = [s if len(s) <= max_len else s[:max_len - 1] + [emb.sep] for s in seqs]
        return emb.embed_ids(seqs, progress=view)
    body = max_len - 2
    windows, owner, weight = [], [], []
    for i, s in enumerate(seqs):
        inner = s[1:-1]
        for w in range(0, max(len(inner), 1), body):
            chunk = inner[w:w + body]
            windows.append([emb.cls] + chunk + [emb.sep])
            owner.append(i)
            weight.append(len(chunk))
    e = emb.embed_ids(windows, progress=f"window ({len(windows)} windows)")
    out = np.zeros((len(records), e.shape[1]), dtype=np.float32)
    np.add.at(out, np.asarray(owner), e * np.asarray(weight, dtype=np.float32)[:, None])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def cached_views(records, emb, views, max_len, data_path: Path, model_dir: Path, cache_dir: Path):
    """Article embeddings per view, cached as .npy keyed by data/model/view/max_len."""
    import numpy as np  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(data_path.read_bytes())
    h.update((model_dir / "model.pt").read_bytes()[:1 << 20])
    h.update(str((model_dir / "model.pt").stat().st_size).encode())
    h.update(str(len(records)).encode())
    key = h.hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for view in views:
        f = cache_dir / f"bbc-{key}-{view}-{max_len if view != 'title' else 0}.npy"
        if f.is_file():
            out[view] = np.load(f)
            continue
        t0 = time.time()
        out[view] = article_views(records, emb, view, max_len)
        np.save(f, out[view])
        print(f"[bbc] embedded view {view!r} in {time.time() - t0:.1f}s -> {f}", file=sys.stderr)
    return out


def label_matrix(emb: Embedder, prompts: dict[str, list[str]]):
    """[n_labels, 384] normalised mean prompt embedding per label (LABELS order)."""
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
    docs = cached_views(records, emb, views, args.max_len, args.data, args.model, args.cache_dir)

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

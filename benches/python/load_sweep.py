#!/usr/bin/env python3
"""End-to-end offered-load sweep: the release binary's tagger and sink as real processes on the
local stack, title-and-description items sent at a steady rate, latency per item.

Run through `./benches/run sweep` (it sets up the harness venv, the stack and the binary).

1. Capacity: a burst of `--burst` items; capacity = items / (last tagged - first sent).
2. For each load (default 10%, 50%, 90%, 120% of capacity): `--seconds` of items at that rate
   from one paced producer (bounded: stops by itself), then wait for every item's row.
   - latency to the tags topic, per item: the tagged event's Kafka timestamp (set by the tagger's
     producer) minus the item's `ingested_at` (stamped when it is sent): p50/p95/p99, exact.
   - latency to the row: the sink's `streamoasis_e2e_latency_seconds` histogram (ingested_at ->
     row written), quantiles interpolated within its buckets (so approximate), and its mean.
   - where the time goes, as means per item from the processes' own histograms over the step:
     batch wait (queue -> batch closed), model forward (per batch), the tagger's read-to-produced
     time, the database write, and the Kafka hops (what is left of the end-to-end time).
   - achieved throughput: rows per second over the step.
Writes benches/results/e2e-sweep.json and .md. Numbers are reported, never asserted.
"""
import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "scripts/faults.d"))

import faults  # noqa: E402  (the fault suite's harness: isolated topology, processes, codec)
from confluent_kafka import Consumer, TopicPartition  # noqa: E402


def items_from(data, n_needed):
    """Title + description items from the BBC file (description = the article's lead)."""
    out = []
    with open(data) as f:
        for line in f:
            r = json.loads(line)
            desc = (r.get("description") or r.get("text", "")[:300]).strip()
            out.append((r["title"], desc))
    if not out:
        raise SystemExit(f"no items in {data}")
    return [out[i % len(out)] for i in range(n_needed)]


def item(mid, title, desc):
    return {
        "media_id": mid, "kind": "ARTICLE", "title": title, "description": desc, "transcript": None, "language": "en",
        "source": "load-sweep", "ingested_at": int(time.time() * 1000), "attributes": {}, "candidate_labels": None,
    }


def send(s, prefix, texts, rate):
    """Send len(texts) items at `rate`/s (0 = as fast as possible); returns {media_id: sent_ms}."""
    p = faults.producer()
    sent = {}
    t0 = time.time()
    for i, (title, desc) in enumerate(texts):
        if rate > 0:
            wait = t0 + i / rate - time.time()  # one clock read (two raced: a negative sleep)
            if wait > 0:
                time.sleep(wait)
        mid = f"{prefix}-{i:07d}"
        it = item(mid, title, desc)
        faults.produce(p, s.input, mid.encode(), s.codec.frame(it))
        sent[mid] = it["ingested_at"]
    faults.flush(p, prefix)
    return sent, time.time() - t0


def tagged_times(topic, prefix, want, timeout):
    """{media_id: Kafka timestamp of its (first) tagged event} for ids starting with prefix."""
    c = Consumer({"bootstrap.servers": faults.KAFKA, "group.id": f"sweep-read-{uuid.uuid4()}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    out = {}
    try:
        md = c.list_topics(topic, timeout=10)
        c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
        deadline = time.time() + timeout
        while len(out) < want and time.time() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error() or not m.key():
                    continue
                k = m.key().decode()
                if k.startswith(prefix + "-") and k not in out:
                    out[k] = m.timestamp()[1]
    finally:
        c.close()
    return out


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def histogram(text, name, **labels):
    """(buckets [(le, cumulative count)], sum, count) of a Prometheus histogram in a /metrics
    text, summed over the series carrying `labels`."""
    if text is None:
        return None
    buckets, total, count = {}, 0.0, 0.0
    for line in text.splitlines():
        if not line.startswith(name) or not all(f'{k}="{v}"' in line for k, v in labels.items()):
            continue
        head, _, val = line.rpartition(" ")
        if head.startswith(name + "_bucket"):
            le = head.split('le="')[1].split('"')[0]
            le = float("inf") if le == "+Inf" else float(le)
            buckets[le] = buckets.get(le, 0.0) + float(val)
        elif head.startswith(name + "_sum"):
            total += float(val)
        elif head.startswith(name + "_count"):
            count += float(val)
    return sorted(buckets.items()), total, count


def delta(a, b):
    if a is None or b is None:
        return None
    ba = dict(a[0])
    return [(le, c - ba.get(le, 0.0)) for le, c in b[0]], b[1] - a[1], b[2] - a[2]


def h_mean(d):
    return d[1] / d[2] if d and d[2] > 0 else None


def h_quantile(d, q):
    """Quantile by linear interpolation inside the bucket (Prometheus' histogram_quantile)."""
    if not d or d[2] <= 0:
        return None
    rank = q / 100 * d[2]
    prev_le, prev_c = 0.0, 0.0
    for le, c in d[0]:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return prev_le


# The tagger's steps, per record: the run loop's stages (`streamoasis_stage_seconds`) and, inside
# `process`, the tagger's own (`streamoasis_tagger_step_seconds`).
LOOP_STAGES = ["key_wait", "decode", "process", "encode", "produce"]
TAGGER_STEPS = ["tokenize", "queue", "slot", "model", "reply", "score"]

HISTS = {
    **{f"stage_{st}": ("tagger", "streamoasis_stage_seconds", {"processor": "tagger", "stage": st}) for st in ["fetch"] + LOOP_STAGES},
    **{f"step_{st}": ("tagger", "streamoasis_tagger_step_seconds", {"step": st}) for st in TAGGER_STEPS},
    "batch_wait": ("tagger", "streamoasis_batch_queue_wait_seconds", {}),
    "model": ("tagger", "streamoasis_inference_seconds", {}),
    "batch_size": ("tagger", "streamoasis_batch_size", {}),
    "padding": ("tagger", "streamoasis_batch_padding_ratio", {}),
    "tagger_handle": ("tagger", "streamoasis_record_latency_seconds", {"processor": "tagger"}),
    "tagger_e2e": ("tagger", "streamoasis_e2e_latency_seconds", {"processor": "tagger"}),
    "db_write": ("sink", "streamoasis_db_write_seconds", {}),
    "sink_handle": ("sink", "streamoasis_record_latency_seconds", {"processor": "sink"}),
    "sink_e2e": ("sink", "streamoasis_e2e_latency_seconds", {"processor": "sink"}),
}


def snapshot(s):
    texts = {}
    for role, p in s.procs.items():
        code, text = faults.get_code(p.url("/metrics"))
        texts[role] = text if code == 200 else None
    return {k: histogram(texts[role], name, **labels) for k, (role, name, labels) in HISTS.items()}


def per_record(d, n):
    """A step's time per tagger record (its sum over the records handled), in seconds."""
    return d[1] / n if d and n else None


def accounting(d):
    """Where "tagger read -> produced" goes, per record (ms): the run loop's stages, the tagger's
    steps inside `process`, and what no histogram covers."""
    n = d["tagger_handle"][2] if d.get("tagger_handle") else 0
    if not n:
        return None
    a = {"records": int(n), "read_to_produced": _ms(per_record(d["tagger_handle"], n)), "fetch": _ms(h_mean(d["stage_fetch"]))}
    for st in LOOP_STAGES:
        a[st] = _ms(per_record(d[f"stage_{st}"], n))
    for st in TAGGER_STEPS:
        a[f"process.{st}"] = _ms(per_record(d[f"step_{st}"], n))
    if a["process"] is not None:
        inside = sum(a[f"process.{st}"] or 0 for st in TAGGER_STEPS)
        a["process.other"] = round(a["process"] - inside, 2)
    loop = [a[st] for st in LOOP_STAGES if a[st] is not None]
    if loop and a["read_to_produced"]:
        a["unaccounted"] = round(a["read_to_produced"] - sum(loop), 2)
        covered = sum(loop) - max(a.get("process.other") or 0, 0)
        a["accounted_pct"] = round(100 * covered / a["read_to_produced"], 1)
    return a


def tails(d, q=99):
    """Each step's own q-th percentile (ms, interpolated within its histogram's buckets): which
    step has the tail. The steps' percentiles do not add up; the end-to-end one is measured."""
    t = {"fetch": _ms(h_quantile(d["stage_fetch"], q))}
    for st in LOOP_STAGES:
        t[st] = _ms(h_quantile(d[f"stage_{st}"], q))
    for st in TAGGER_STEPS:
        t[f"process.{st}"] = _ms(h_quantile(d[f"step_{st}"], q))
    t["read_to_produced"] = _ms(h_quantile(d["tagger_handle"], q))
    t["ingest_to_tagger_done"] = _ms(h_quantile(d["tagger_e2e"], q))
    return t


def cpu_seconds(pid):
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return None


def step(s, name, texts, rate, wait_timeout):
    before = snapshot(s)
    cpu0 = {r: cpu_seconds(p.pid) for r, p in s.procs.items()}
    rows0 = s.db.count(s.ks) or 0
    t0 = time.time()
    sent, send_s = send(s, name, texts, rate)
    ok = s.wait_for(lambda: (s.db.count(s.ks) or 0) - rows0 >= len(sent), wait_timeout, step=0.5)
    t_all = time.time() - t0
    tagged = tagged_times(s.tags, name, len(sent), 60)
    after = snapshot(s)
    cpu1 = {r: cpu_seconds(p.pid) for r, p in s.procs.items()}
    lat = [(tagged[k] - sent[k]) / 1000 for k in sent if k in tagged]
    d = {k: delta(before[k], after[k]) for k in HISTS}
    r = {
        "step": name, "offered_per_s": round(rate, 2) if rate else None, "items": len(sent), "send_s": round(send_s, 1),
        "complete": ok, "tagged": len(tagged), "rows": (s.db.count(s.ks) or 0) - rows0,
        "achieved_per_s": round(len(sent) / t_all, 2),
        "tags_p50_ms": round(pct(lat, 50) * 1000) if lat else None,
        "tags_p95_ms": round(pct(lat, 95) * 1000) if lat else None,
        "tags_p99_ms": round(pct(lat, 99) * 1000) if lat else None,
        "tags_max_ms": round(max(lat) * 1000) if lat else None,
        "row_p50_ms": _ms(h_quantile(d["sink_e2e"], 50)), "row_p95_ms": _ms(h_quantile(d["sink_e2e"], 95)),
        "row_p99_ms": _ms(h_quantile(d["sink_e2e"], 99)), "row_mean_ms": _ms(h_mean(d["sink_e2e"])),
        "mean_batch_size": round(h_mean(d["batch_size"]), 1) if h_mean(d["batch_size"]) else None,
        "mean_padding_ratio": round(h_mean(d["padding"]), 3) if h_mean(d["padding"]) is not None else None,
        "where_ms": {
            "batch_wait": _ms(h_mean(d["batch_wait"])),
            "model_per_batch": _ms(h_mean(d["model"])),
            "tagger_read_to_produced": _ms(h_mean(d["tagger_handle"])),
            "ingest_to_tagger_done": _ms(h_mean(d["tagger_e2e"])),
            "db_write": _ms(h_mean(d["db_write"])),
            "sink_read_to_written": _ms(h_mean(d["sink_handle"])),
            "ingest_to_row": _ms(h_mean(d["sink_e2e"])),
        },
        "cpu_cores": {r: round((cpu1[r] - cpu0[r]) / t_all, 2) for r in cpu0 if cpu0[r] is not None and cpu1[r] is not None},
        "accounting_ms": accounting(d),
        "p99_by_step_ms": tails(d),
        "load_avg": round(os.getloadavg()[0], 2),
    }
    w = r["where_ms"]
    if None not in (w["ingest_to_tagger_done"], w["tagger_read_to_produced"], w["ingest_to_row"], w["sink_read_to_written"]):
        # ingest -> tagger read (hop 1, incl. waiting in the input topic) and tagger produced -> sink read (hop 2).
        w["kafka_hop_1"] = round(w["ingest_to_tagger_done"] - w["tagger_read_to_produced"], 1)
        w["kafka_hop_2"] = round(w["ingest_to_row"] - w["ingest_to_tagger_done"] - w["sink_read_to_written"], 1)
    return r


def _ms(x):
    return round(x * 1000, 2) if x is not None else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="BBC JSON lines (title, description, text)")
    ap.add_argument("--loads", default="10,50,90,120", help="percent of the measured capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds per load step")
    ap.add_argument("--burst", type=int, default=3000, help="items in the capacity burst")
    ap.add_argument("--capacity", type=float, default=0.0, help="skip the burst and use this capacity (items/s)")
    ap.add_argument("--delivery-rounds", type=int, default=0, help="only capacity bursts: at-least-once vs exactly-once, alternating, this many rounds (writes e2e-delivery.json)")
    ap.add_argument("--exactly-once", action="store_true", help="also measure the capacity burst with the tagger in exactly-once mode")
    ap.add_argument("--batch1", action="store_true", help="also run the lowest load with max_batch_size 1 (does batching cost latency at low load?)")
    ap.add_argument("--pin", action="store_true", help="the tagger on CPU 1, everything else (Kafka, Cassandra, the registry, the sink, this load generator) on CPU 0; writes e2e-sweep-pinned.json")
    ap.add_argument("--cold", type=float, default=0.0, help="also measure cold start: items at --cold-rate from the moment the processes start, for this many seconds (then as long again, warm); with and without the model warm-up")
    ap.add_argument("--cold-rate", type=float, default=20.0, help="items/s of the cold-start rows")
    ap.add_argument("--tagging", default="{}", help="JSON merged into the topology's `tagging` for every process of this run (the configuration under test), e.g. '{\"model\": {\"precision\": \"int8\"}}'")
    ap.add_argument("--baseline", default=None, help="JSON merged into the shipped `tagging` (use '{}' for the shipped default): its capacity burst is measured first, in the same run, and reported beside this run's capacity")
    ap.add_argument("--name", default="", help="results file name (default e2e-sweep, or e2e-sweep-pinned with --pin)")
    ap.add_argument("--out", default=str(ROOT / "benches/results"))
    args = ap.parse_args()
    if not faults.BIN.exists():
        raise SystemExit(f"{faults.BIN} not found: cargo build --release -p streamoasis")
    pins = pin_everything(run_dir_for_pins()) if args.pin else None
    run_dir = ROOT / ".cache/sweep" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    db = faults.Db()
    args.tagging = json.loads(args.tagging)
    results = {"machine": machine(), "seconds_per_step": args.seconds, "steps": [], "tagging": tagging_summary(args.tagging)}
    if pins:
        results["pinned"] = pins
    name = args.name or ("e2e-sweep-pinned" if args.pin else "e2e-sweep")
    try:
        run_all(args, run_dir, db, results, name)
    finally:
        if pins:
            unpin(pins)


def run_all(args, run_dir, db, results, name):
    loads = [float(x) for x in args.loads.split(",") if x]
    if args.delivery_rounds:
        # Capacity bursts only, at-least-once and exactly-once alternating (A B A B ...), so
        # warm-up and drift fall on both sides alike.
        for r in range(args.delivery_rounds):
            for delivery in ("at_least_once", "exactly_once"):
                faults.log(f"round {r + 1}: {delivery} capacity burst")
                sweep(args, run_dir, db, f"sweep-{delivery.replace('_', '')}-{r}", [], 0, None, results, delivery=delivery)
        (Path(args.out) / "e2e-delivery.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
    if args.baseline is not None:
        # The reference configuration's capacity, measured first in this run (same machine state).
        base = json.loads(args.baseline)
        faults.log(f"baseline capacity burst: {tagging_summary(base)}")
        b = {"steps": []}
        cap_b = sweep(args, run_dir, db, "sweep-baseline", [], 0, None, b, tagging=base)
        results["baseline"] = {"tagging": tagging_summary(base), "capacity_per_s": cap_b, "burst": b["steps"][0]}
    cap = sweep(args, run_dir, db, "sweep", loads, args.capacity, None, results)
    if args.exactly_once:
        # Capacity of the tagger in exactly-once mode, right after the at-least-once burst above.
        faults.log("exactly-once capacity burst")
        sweep(args, run_dir, db, "sweep-eos", [], 0, None, results, delivery="exactly_once")
    if args.batch1:
        faults.log("batch-1 baseline at the lowest load")
        sweep(args, run_dir, db, "sweep-batch1", loads[:1], cap, 1, results)
    if args.cold:
        # Without the warm-up first, then with it (the default), each from a fresh process.
        for budget in ("0s", None):
            faults.log(f"cold start, warm-up {budget or 'default'}: {args.cold_rate}/s from process start")
            results.setdefault("cold", []).append(cold(args, run_dir, db, budget))
    out = Path(args.out)
    results["load_at_end"] = os.getloadavg()[0]
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def merge(dst, src):
    """`src` merged into `dst` (nested maps merged, everything else replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def configure(s, tagging, max_batch=None, delivery=None, warmup=None):
    """Write the scenario's topology copy: `tagging` merged in, then the step's own settings."""
    import yaml
    t = yaml.safe_load(s.topo.read_text())
    merge(t["tagging"], tagging)
    if max_batch:
        t["tagging"]["batching"]["max_batch_size"] = max_batch
    if warmup is not None:
        t["tagging"]["batching"]["warmup"] = warmup
    if delivery:
        t["processors"]["tagger"]["delivery"] = delivery
    s.topo.write_text(yaml.safe_dump(t, sort_keys=False))


def sweep(args, run_dir, db, name, loads, cap, max_batch, results, delivery=None, tagging=None):
    """One set of processes: warm-up, capacity burst unless `cap` is given, then each load."""
    s = faults.Scenario(name, run_dir, db)
    configure(s, args.tagging if tagging is None else tagging, max_batch, delivery)
    tag = (f", max_batch_size {max_batch}" if max_batch else "") + (f", {delivery}" if delivery else "")
    try:
        s.start("tagger", "sink")
        if not s.wait_ready(["tagger", "sink"], 240):
            raise SystemExit("processors not ready: see " + str(s.dir))
        faults.log("warm-up: 200 items")
        step(s, "warmup", items_from(args.data, 200), 0, 300)
        if cap <= 0:
            faults.log(f"capacity: a burst of {args.burst} items")
            r = step(s, "burst", items_from(args.data, args.burst), 0, 900)
            results["steps"].append(dict(r, load="burst" + tag))
            cap = r["achieved_per_s"]
            faults.log(f"capacity {cap:.1f} items/s")
        results["capacity_per_s"] = cap
        for pct_load in loads:
            rate = cap * pct_load / 100
            n = max(1, int(rate * args.seconds))
            faults.log(f"load {pct_load:.0f}%: {rate:.1f} items/s for {args.seconds:.0f}s ({n} items)")
            r = step(s, f"load{int(pct_load)}", items_from(args.data, n), rate, args.seconds + 600)
            r["load"] = f"{pct_load:.0f}%{tag}"
            results["steps"].append(r)
            faults.log(json.dumps(r))
    finally:
        s.close()
    return cap


def cold(args, run_dir, db, warmup):
    """Items at a fixed low rate from the moment the tagger and sink processes start (for
    `--cold` seconds), then as long again at the same rate (warm), latency to the tags topic per
    item. Items sent before the tagger is ready wait in the topic: they are reported apart."""
    import threading
    name = "cold-nowarmup" if warmup == "0s" else "cold"
    s = faults.Scenario(name, run_dir, db)
    configure(s, args.tagging, warmup=warmup)
    n = max(1, int(args.cold_rate * args.cold))
    texts = items_from(args.data, 2 * n)
    out = {"warmup": warmup or "default", "rate_per_s": args.cold_rate, "seconds": args.cold}
    ready_at = {}

    def watch_ready():
        while "tagger" not in ready_at and time.time() - t0 < 600:
            if s.procs["tagger"].ready():
                ready_at["tagger"] = time.time()
            time.sleep(0.05)

    try:
        t0 = time.time()
        s.start("tagger", "sink")
        w = threading.Thread(target=watch_ready, daemon=True)
        w.start()
        sent, _ = send(s, "cold", texts[:n], args.cold_rate)
        w.join(600)
        warm_sent, _ = send(s, "warm", texts[n:], args.cold_rate)
        tagged = tagged_times(s.tags, "cold", len(sent), 600)
        tagged.update(tagged_times(s.tags, "warm", len(warm_sent), 600))
        ready = ready_at.get("tagger")
        out["ready_after_s"] = round(ready - t0, 2) if ready else None

        def row(label, ids, src):
            lat = [(tagged[k] - src[k]) / 1000 for k in ids if k in tagged]
            return {"rows": label, "items": len(ids), "tagged": len(lat), "p50_ms": round(pct(lat, 50) * 1000) if lat else None,
                    "p99_ms": round(pct(lat, 99) * 1000) if lat else None, "max_ms": round(max(lat) * 1000) if lat else None}
        before = [k for k in sent if ready and sent[k] / 1000 < ready]
        after = [k for k in sent if not ready or sent[k] / 1000 >= ready]
        first10 = [k for k in after if ready and sent[k] / 1000 < ready + 10]
        out["rows"] = [
            row(f"first {args.cold:.0f} s from process start, all", list(sent), sent),
            row("sent before the tagger was ready", before, sent),
            row("sent after ready", after, sent),
            row("first 10 s after ready", first10, sent),
            row(f"next {args.cold:.0f} s (warm)", list(warm_sent), warm_sent),
        ]
        faults.log(json.dumps(out))
    finally:
        s.close()
    return out


def run_dir_for_pins():
    return ROOT / ".cache/sweep"


def pin_everything(_):
    """Pin the stack's JVMs and this process to CPU 0, and make the processes started from now
    on run through `taskset` (tagger on CPU 1, sink on CPU 0). Returns what to undo."""
    import shutil
    import subprocess
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        raise SystemExit("--pin needs taskset and at least 2 CPUs")
    pids = []
    for svc in ("kafka", "cassandra", "registry"):
        pid = faults.service_pid(svc)
        if pid:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(pid)], check=True, stdout=subprocess.DEVNULL)
            pids.append(pid)
    os.sched_setaffinity(0, {0})
    wrapper = ROOT / ".cache/sweep/pinned-streamoasis"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in tagger) cpu=1 ;; *) cpu=0 ;; esac\nexec taskset -c "$cpu" "{faults.BIN}" "$@"\n')
    wrapper.chmod(0o755)
    real = faults.BIN
    faults.BIN = wrapper
    return {"services_cpu": 0, "tagger_cpu": 1, "sink_cpu": 0, "load_generator_cpu": 0, "service_pids": pids, "bin": str(real)}


def unpin(pins):
    import subprocess
    every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))))
    for pid in pins["service_pids"]:
        subprocess.run(["taskset", "-a", "-p", "-c", every, str(pid)], stdout=subprocess.DEVNULL)
    faults.BIN = Path(pins["bin"])


def tagging_summary(overrides=None):
    import yaml
    t = merge(yaml.safe_load((ROOT / "topology.yaml").read_text())["tagging"], overrides or {})
    b, m = t.get("batching", {}), t.get("model", {})
    return (f"precision {m.get('precision', 'fp32')}, max_batch_size {b.get('max_batch_size')}, "
            f"max_batch_tokens {b.get('max_batch_tokens')}, max_wait {b.get('max_wait')}")


def machine():
    import platform
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "load_at_start": load}


if __name__ == "__main__":
    main()

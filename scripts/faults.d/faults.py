#!/usr/bin/env python3
"""streamoasis fault suite: real processes on the real local stack, one fault per scenario.

Run through `scripts/faults` (it sets up the venv, the stack and the release binary). Each scenario
gets its own copy of topology.yaml with unique topic, subject, group and keyspace names, so every
count is exact. The tagger and the sink run as `target/release/streamoasis tagger|sink
--metrics-addr ...` processes; the harness injects the fault (kill -9, SIGSTOP of the CQL database,
broker restart, registry down), then reads back every tagged event, every dead letter and every row.

    lost        items with no tagged event, or no row (good items), or not dead-lettered (poison)
    duplicated  tagged events beyond the first per media_id (at-least-once replays)
    recovery    fault end (process restarted, service back) -> the affected stage makes progress again
    peak RSS    /proc/<pid>/status VmRSS of the tagger and the sink, sampled every second

A scenario FAILS when: anything is lost; duplicates exceed its bound (0 for graceful faults; for
kill -9 of an at-least-once tagger, the records whose outputs existed but whose offsets were not
committed at the kill, read from the group's committed offsets and the tags topic once the process
is dead; 0 to a read_committed reader under exactly-once); a processor exits unexpectedly (it is
still restarted, as Kubernetes would, up to 3 times, so the rest can be measured); a processor does
not exit 0 on SIGTERM at the end; committed offsets run ahead of outputs after a kill; a poison
record is dead-lettered with another error.kind than its case's, not byte for byte, or is tagged.
Exit status 1 when any scenario failed.
"""
import argparse
import json
import logging
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import fastavro
import yaml
from cassandra.cluster import Cluster
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

logging.getLogger("cassandra").setLevel(logging.CRITICAL)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("STREAMOASIS_BIN", ROOT / "target/release/streamoasis"))
KAFKA = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REGISTRY = os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7").rstrip("/")
SCYLLA = os.environ.get("SCYLLA_URI", "127.0.0.1:9042")
STACK = ROOT / ".cache/stack"
BIG = 16 * 1024 * 1024  # max.message.bytes of the ingest topic and its DLQ in the poison scenario
CLIENT_MAX = 8 * 1024 * 1024  # message.max.bytes of the processors' clients in the poison scenario

TITLES = [
    "Football club wins the cup final after extra time",
    "Shares fall as interest rates rise again",
    "New smartphone launched with a faster chip",
    "Minister resigns after election defeat",
    "Film festival opens with a comedy premiere",
    "Tennis star reaches the semi-final",
    "Broadband prices cut by the regulator",
    "Band announces a world tour and new album",
]


def log(msg):
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- registry -------------------------------------------------------------------------------------

def http(method, url, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def registry_latest(subject):
    _, b = http("GET", f"{REGISTRY}/subjects/{subject}/versions/latest")
    j = json.loads(b)
    return j["id"], json.loads(j["schema"])


def registry_register(subject, schema):
    http("PUT", f"{REGISTRY}/config/{subject}", {"compatibility": "NONE"})
    _, b = http("POST", f"{REGISTRY}/subjects/{subject}/versions", {"schema": json.dumps(schema)})
    return json.loads(b)["id"]


def get_code(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception:
        return None, ""


# ---- stack services -------------------------------------------------------------------------------

def service_pid(name):
    try:
        pid = int((STACK / f"{name}.pid").read_text().strip())
        os.kill(pid, 0)
        return pid
    except Exception:
        return None


def stack_up():
    t0 = time.time()
    r = subprocess.run([str(ROOT / "scripts/stack"), "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/stack up failed:\n{r.stdout[-3000:]}")
    return time.time() - t0


def stop_service(name, sig=signal.SIGTERM, timeout=60):
    pid = service_pid(name)
    if pid is None:
        raise RuntimeError(f"{name} is not running (no pid in {STACK}/{name}.pid)")
    os.kill(pid, sig)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)


# ---- processes --------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except Exception:
        pass
    return None


class Proc:
    """One `streamoasis tagger|sink` process, restartable, with its log and metrics address."""

    def __init__(self, role, topo, logdir):
        self.role, self.topo, self.logdir = role, topo, logdir
        self.port = free_port()
        self.p = None
        self.starts = 0
        self.crashes = []  # exit statuses of unexpected exits
        self.expected_exit = False
        self.extra_env = {}

    @property
    def log(self):
        return self.logdir / f"{self.role}.log"

    def start(self):
        env = dict(os.environ, STREAMOASIS_TOPOLOGY=str(self.topo), RUST_LOG=os.environ.get("RUST_LOG", "info,rdkafka=warn,scylla=warn"), **self.extra_env)
        f = open(self.log, "ab")
        f.write(f"\n===== start #{self.starts + 1} at {time.strftime('%H:%M:%S')} =====\n".encode())
        f.flush()
        self.p = subprocess.Popen([str(BIN), self.role, "--metrics-addr", f"127.0.0.1:{self.port}"], env=env, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.starts += 1
        self.expected_exit = False

    @property
    def pid(self):
        return self.p.pid if self.p and self.p.poll() is None else None

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def kill9(self):
        self.expected_exit = True
        if self.alive():
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def term(self, timeout=40):
        self.expected_exit = True
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                return self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
                return "killed after drain timeout"
        return self.p.returncode if self.p else None

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def ready(self):
        return get_code(self.url("/readyz"))[0] == 200

    def metric(self, name, **labels):
        code, text = get_code(self.url("/metrics"))
        if code != 200:
            return None
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, val = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(val)
        return total

    def log_tail(self, n=15):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except Exception:
            return ""


# ---- data -------------------------------------------------------------------------------------------

def good_item(mid, i, title=None):
    return {
        "media_id": mid, "kind": "ARTICLE", "title": title or f"{TITLES[i % len(TITLES)]} ({i})", "description": None,
        "transcript": None, "language": "en", "source": "faults", "ingested_at": int(time.time() * 1000),
        "attributes": {"n": str(i)}, "candidate_labels": None,
    }


class Codec:
    """Local Avro encoder for MediaIngested with the id the registry gave the ingest subject."""

    def __init__(self, subject):
        self.id, schema = registry_latest(subject)
        self.parsed = fastavro.parse_schema(schema)

    def frame(self, item, schema_id=None, parsed=None):
        import io
        buf = io.BytesIO()
        buf.write(b"\x00" + struct.pack(">I", self.id if schema_id is None else schema_id))
        fastavro.schemaless_writer(buf, parsed or self.parsed, item)
        return buf.getvalue()


def producer(big=False):
    conf = {"bootstrap.servers": KAFKA, "acks": "all", "enable.idempotence": True, "linger.ms": 5, "message.timeout.ms": 600000,
            "queue.buffering.max.messages": 200000}
    if big:
        conf["message.max.bytes"] = BIG
    return Producer(conf)


def produce(p, topic, key, value, headers=None):
    while True:
        try:
            p.produce(topic, key=key, value=value, headers=headers)
            p.poll(0)
            return
        except BufferError:
            p.poll(0.1)


def flush(p, what):
    left = p.flush(600)
    if left:
        raise RuntimeError(f"{left} {what} records not acknowledged by Kafka")


# ---- reading back -----------------------------------------------------------------------------------

def read_records(topic, committed=False, timeout=60):
    """Every record of `topic` from the beginning to the current end: [(partition, offset, key, value, headers)].
    committed=True reads with isolation.level=read_committed (records of aborted or open transactions
    are skipped)."""
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": f"faults-read-{uuid.uuid4()}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "enable.partition.eof": True, "fetch.max.bytes": 64 * 1024 * 1024,
                  "receive.message.max.bytes": 100 * 1024 * 1024,
                  "isolation.level": "read_committed" if committed else "read_uncommitted"})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions.keys())
        ends = {}
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        c.assign([TopicPartition(topic, p, 0) for p in ends])
        out, done = [], set()
        deadline = time.time() + timeout
        while len(done) < len(ends) and time.time() < deadline:
            m = c.poll(1.0)
            if m is None:
                continue
            if m.error():
                if m.error().code() == -191:  # _PARTITION_EOF
                    done.add(m.partition())
                continue
            out.append((m.partition(), m.offset(), m.key(), m.value(), m.headers() or []))
            if m.offset() + 1 >= ends[m.partition()]:
                done.add(m.partition())
        if len(done) < len(ends):
            raise RuntimeError(f"reading {topic}: {len(ends) - len(done)} partitions not read to their end within {timeout}s")
        return out
    finally:
        c.close()


def read_topic(topic, timeout=60, committed=False):
    """Every record of `topic` from the beginning to the current end: [(key, headers)]."""
    return [(k, h) for _, _, k, _, h in read_records(topic, committed, timeout)]


def committed_offsets(group, topic):
    """The group's committed offset per partition of `topic` (0 where none)."""
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10)
        tps = [TopicPartition(topic, p) for p in md.topics[topic].partitions]
        return {tp.partition: max(tp.offset, 0) for tp in c.committed(tps, timeout=10)}
    finally:
        c.close()


def topic_end(topic):
    c = Consumer({"bootstrap.servers": KAFKA, "group.id": "faults-watermarks"})
    try:
        md = c.list_topics(topic, timeout=5)
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in md.topics[topic].partitions)
    finally:
        c.close()


class Db:
    def __init__(self):
        host, _, port = SCYLLA.split(",")[0].rpartition(":")
        self.cluster = Cluster([host or "127.0.0.1"], port=int(port), connect_timeout=5)
        self.session = self.cluster.connect()
        self.session.default_timeout = 5

    def count(self, ks):
        try:
            return self.session.execute(f"SELECT COUNT(*) FROM {ks}.media_tags", timeout=5).one()[0]
        except Exception:
            return None

    def ids(self, ks):
        for _ in range(30):
            try:
                return {r.media_id for r in self.session.execute(f"SELECT media_id FROM {ks}.media_tags", timeout=30)}
            except Exception as e:
                log(f"db read failed ({type(e).__name__}), retrying")
                time.sleep(2)
        raise RuntimeError("cannot read media_tags")

    def drop(self, ks):
        try:
            self.session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=60)
        except Exception:
            pass


# ---- one scenario -----------------------------------------------------------------------------------

class Scenario:
    """A topology copy with unique names, the processes of one scenario, their RSS samples and progress."""

    def __init__(self, name, run_dir, db, big=False, delivery="at_least_once"):
        self.name = name
        self.delivery = delivery
        self.sid = uuid.uuid4().hex[:10]
        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = db
        t = yaml.safe_load((ROOT / "topology.yaml").read_text())
        rename = {x["name"]: f"{x['name']}.faults-{self.sid}" for x in t["topics"]}
        for x in t["topics"]:
            x["name"] = rename[x["name"]]
        for s in t["schemas"]:
            s["subject"] = f"{rename[s['subject'][:-len('-value')]]}-value"
            s["file"] = str(ROOT / s["file"])
        for spec in t["processors"].values():
            spec["input"], spec["dlq"] = rename[spec["input"]], rename[spec["dlq"]]
            if spec.get("output"):
                spec["output"] = rename[spec["output"]]
            spec["group"] = f"{spec['group']}-faults-{self.sid}"
            spec["drain_timeout"] = "20s"
        self.ks = f"faults_{self.sid}"
        t["scylla"]["keyspace"] = self.ks
        t["scylla"]["consistency"] = "ONE"
        t["tagging"]["model"]["path"] = str(ROOT / t["tagging"]["model"]["path"])
        emb = t["tagging"].get("embedding") or {}
        for cal in [emb.get("calibration")] + [k.get("calibration") for k in (emb.get("kinds") or {}).values()]:
            if cal and cal.get("directions"):  # relative to the topology's folder: this copy lives elsewhere
                cal["directions"] = str(ROOT / cal["directions"])
        tg = t["processors"]["tagger"]
        tg["delivery"] = delivery
        self.groups = {r: t["processors"][r]["group"] for r in ("tagger", "sink")}
        self.max_in_flight = {r: int(t["processors"][r].get("max_in_flight", 512)) for r in ("tagger", "sink")}
        self.input, self.tags, self.dlq, self.sink_dlq = tg["input"], tg["output"], tg["dlq"], t["processors"]["sink"]["dlq"]
        if big:
            # The poison corpus holds a 10 MB record: the ingest topic and its DLQ accept up to 16 MiB
            # and so do our clients; the tags topic keeps the broker default (1 MiB).
            for x in t["topics"]:
                if x["name"] in (self.input, self.dlq):
                    x.setdefault("config", {})["max.message.bytes"] = str(BIG)
            t.setdefault("kafka", {}).setdefault("client", {})
            # Clients: 8 MiB, the run loop's own fetch.max.bytes (librdkafka refuses a consumer whose
            # fetch.max.bytes is below message.max.bytes, and the run loop sets its own after ours).
            t["kafka"]["client"] = dict(t["kafka"]["client"] or {}, **{"message.max.bytes": str(CLIENT_MAX)})
        if os.environ.get("FAULTS_KAFKA_DEBUG"):
            # librdkafka debug contexts for the processors (e.g. "eos,msg,broker"), to diagnose a scenario;
            # they reach the log with RUST_LOG=...,librdkafka=debug
            t.setdefault("kafka", {})
            t["kafka"]["client"] = dict(t["kafka"].get("client") or {}, debug=os.environ["FAULTS_KAFKA_DEBUG"])
        self.topo = self.dir / "topology.yaml"
        self.topo.write_text(yaml.safe_dump(t, sort_keys=False))
        env = dict(os.environ, STREAMOASIS_TOPOLOGY=str(self.topo))
        r = subprocess.run([str(BIN), "topology", "apply"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (self.dir / "apply.log").write_text(r.stdout)
        if r.returncode != 0:
            raise RuntimeError(f"topology apply failed:\n{r.stdout[-2000:]}")
        self.codec = Codec(f"{self.input}-value")
        self.procs = {"tagger": Proc("tagger", self.topo, self.dir), "sink": Proc("sink", self.topo, self.dir)}
        self.restarts = {"tagger": 0, "sink": 0}
        self.rss = []  # (t, role, kb)
        self.progress = []  # (t, tags_end, rows)
        self.stop = threading.Event()
        self.t0 = time.time()
        self.notes = []
        self.checks = []  # (ok, text)
        self.supervise = True
        self.threads = [threading.Thread(target=self._sample, daemon=True), threading.Thread(target=self._watch, daemon=True)]
        for th in self.threads:
            th.start()

    def _sample(self):
        while not self.stop.is_set():
            now = time.time() - self.t0
            for role, p in self.procs.items():
                pid = p.pid
                if pid:
                    kb = rss_kb(pid)
                    if kb:
                        self.rss.append((now, role, kb))
                elif p.p is not None and not p.expected_exit and self.supervise and p.p.poll() is not None:
                    status = p.p.returncode
                    p.crashes.append(status)
                    self.notes.append(f"{role} exited unexpectedly (status {status}) at {now:.0f}s: {p.log_tail(3)!r}"[:600])
                    log(f"{self.name}: {role} exited with status {status}")
                    if self.restarts[role] < 3:
                        self.restarts[role] += 1
                        time.sleep(1)
                        p.start()
                    else:
                        p.expected_exit = True
            self.stop.wait(1.0)

    def _watch(self):
        while not self.stop.is_set():
            try:
                te = topic_end(self.tags)
            except Exception:
                te = None
            self.progress.append((time.time(), te, self.db.count(self.ks)))
            self.stop.wait(1.0)

    def start(self, *roles):
        for r in roles:
            self.procs[r].start()

    def dead(self):
        """A processor that exited and will not be restarted again (crash loop)."""
        return any(not p.alive() and p.p is not None and self.restarts[r] >= 3 for r, p in self.procs.items())

    def wait_ready(self, roles, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline and not self.dead():
            if all(self.procs[r].ready() for r in roles):
                return True
            time.sleep(0.3)
        self.check(False, f"{'+'.join(roles)} not ready within {timeout}s")
        return False

    def wait_for(self, cond, timeout, step=1.0):
        deadline = time.time() + timeout
        while time.time() < deadline and not self.dead():
            if cond():
                return True
            time.sleep(step)
        return False

    def last(self, field):
        for p in reversed(self.progress):
            v = p[1 if field == "tags" else 2]
            if v is not None:
                return v
        return 0

    def check(self, ok, text):
        self.checks.append((bool(ok), text))
        if not ok:
            log(f"{self.name}: FAILED {text}")

    def recovery(self, fault_end, field):
        """Seconds from fault_end until `field` (tags | rows) advances past its value then."""
        base = None
        for t, te, rows in self.progress:
            v = te if field == "tags" else rows
            if v is None:
                continue
            if t <= fault_end:
                base = v
                continue
            if base is None:
                base = v
                continue
            if v > base:
                return t - fault_end
        return None

    def produce_goods(self, n, rate=0.0, prefix=None, start=0, p=None):
        p = p or producer()
        prefix = prefix or self.name
        ids = []
        t0 = time.time()
        for i in range(start, start + n):
            mid = f"{prefix}-{i:07d}"
            produce(p, self.input, mid.encode(), self.codec.frame(good_item(mid, i)))
            ids.append(mid)
            if rate > 0:
                # One clock read: checking `due > time.time()` and then sleeping
                # `due - time.time()` raced (a negative sleep, seen once in 5 runs under load).
                wait = t0 + (i - start + 1) / rate - time.time()
                if wait > 0:
                    time.sleep(wait)
        flush(p, "good")
        return ids

    def produce_async(self, n, rate, **kw):
        res = {}

        def go():
            try:
                res["ids"] = self.produce_goods(n, rate, **kw)
            except Exception as e:
                res["error"] = e

        th = threading.Thread(target=go, daemon=True)
        th.start()
        return th, res

    def verify(self, good_ids, field_timeout=0):
        """Read back tags topic and rows: (tagged_unique, rows, lost, duplicated, per-id tag counts).
        Under exactly-once the tags topic is read as a subscriber must read it (read_committed)."""
        counts = {}
        for key, _ in read_topic(self.tags, committed=self.delivery == "exactly_once"):
            k = key.decode(errors="replace") if key else ""
            counts[k] = counts.get(k, 0) + 1
        rows = self.db.ids(self.ks)
        good = set(good_ids)
        tagged = {k for k in counts if k in good}
        lost_tags = good - tagged
        lost_rows = good - rows
        dup = sum(c - 1 for k, c in counts.items() if k in good and c > 1)
        return {"tagged": len(tagged), "rows": len(good & rows), "lost": len(lost_tags | lost_rows), "lost_tags": len(lost_tags), "lost_rows": len(lost_rows),
                "duplicated": dup, "tag_events": sum(counts.values()), "counts": counts, "missing_sample": sorted(lost_tags | lost_rows)[:5]}

    def wait_complete(self, good_ids, timeout):
        n = len(good_ids)
        ok = self.wait_for(lambda: self.last("rows") >= n and self.last("tags") >= n, timeout)
        time.sleep(2)
        return ok

    def close(self, keep=False):
        self.stop.set()
        for p in self.procs.values():
            if p.alive():
                code = p.term(30)
                if code not in (0, None):
                    self.notes.append(f"{p.role} exit status on SIGTERM: {code}")
        for th in self.threads:
            th.join(5)
        if not keep:
            self.db.drop(self.ks)
            try:
                topics = [self.input, self.tags, self.dlq, self.sink_dlq]
                admin = AdminClient({"bootstrap.servers": KAFKA})
                for f in admin.delete_topics(topics, operation_timeout=30).values():
                    f.result(60)
            except Exception as e:
                log(f"{self.name}: deleting topics failed: {e}")

    def peak(self, role):
        v = [kb for _, r, kb in self.rss if r == role]
        return max(v) / 1024 if v else None

    def stop_procs(self):
        """SIGTERM every running processor: a graceful drain must exit 0 within the drain timeout."""
        for name, p in self.procs.items():
            if p.alive():
                code = p.term(40)
                self.check(code == 0, f"{name} exits 0 on SIGTERM (got {code})")

    def result(self, sent, v, recovery=None, extra=None, dup_bound=0, dup_why="graceful: no replay allowed"):
        """The scenario's verdict: nothing lost, duplicates within `dup_bound`, no processor exited
        unexpectedly, every processor drained and exited 0 on SIGTERM, every check passed."""
        self.stop_procs()
        for role, p in self.procs.items():
            self.check(not p.crashes, f"{role} never exited unexpectedly (unexpected exits: {len(p.crashes)}, statuses {p.crashes})")
        if v:
            self.check(v["duplicated"] <= dup_bound, f"duplicates {v['duplicated']} <= bound {dup_bound} ({dup_why})")
        lost = v["lost"] if v else None
        ok = (lost == 0) and all(c for c, _ in self.checks)
        r = {"scenario": self.name, "sent": sent, "received": v["tagged"] if v else None, "rows": v["rows"] if v else None,
             "lost": lost, "duplicated": v["duplicated"] if v else None, "recovery_s": None if recovery is None else round(recovery, 1),
             "rss_tagger_mb": self.peak("tagger"), "rss_sink_mb": self.peak("sink"), "restarts": dict(self.restarts),
             "dup_bound": dup_bound, "checks": [(c, t) for c, t in self.checks], "notes": self.notes, "ok": ok, "elapsed_s": round(time.time() - self.t0, 1)}
        if v and v["missing_sample"]:
            r["missing_sample"] = v["missing_sample"]
        if extra:
            r.update(extra)
        return r


# ---- scenarios ----------------------------------------------------------------------------------------

def tagged_keys(topic, committed=False):
    return [k.decode(errors="replace") if k else "" for _, _, k, _, _ in read_records(topic, committed)]


def uncommitted_outputs(s, role):
    """At a moment the processor cannot move (killed or stopped): check that its committed offsets
    are never ahead of its outputs, and count the records whose outputs exist but whose offsets are
    not committed: exactly those are replayed (at-least-once) after a restart.
    Returns (replayable, text)."""
    src = s.input if role == "tagger" else s.tags
    offs = committed_offsets(s.groups[role], src)
    recs = read_records(src)
    below = [r for r in recs if r[1] < offs.get(r[0], 0)]
    above = [r for r in recs if r[1] >= offs.get(r[0], 0)]
    key = lambda r: r[2].decode(errors="replace") if r[2] else ""
    if role == "tagger":
        done = set(tagged_keys(s.tags, committed=s.delivery == "exactly_once"))
    else:
        done = s.db.ids(s.ks)
    ahead = [key(r) for r in below if key(r) not in done]
    s.check(not ahead, f"{role}: committed offsets {sum(offs.values())} never ahead of its outputs ({len(ahead)} committed records without output, e.g. {ahead[:3]})")
    replayable = sum(1 for r in above if key(r) in done)
    return replayable, f"{role} committed {sum(offs.values())} of {len(recs)} input records; {replayable} output but uncommitted at the fault"


def freeze_mid_transaction(s, role, tries=40):
    """SIGSTOP the processor at a moment its transaction holds records (read_uncommitted sees more
    than read_committed). Returns (uncommitted, committed) counts, or None after `tries`."""
    p = s.procs[role]
    for _ in range(tries):
        p.p.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # produce requests already on the wire land
        u, c = len(read_records(s.tags)), len(read_records(s.tags, committed=True))
        if u > c:
            return u, c
        p.p.send_signal(signal.SIGCONT)
        time.sleep(0.3)
    return None


def scen_kill(run_dir, db, role, n, rate, delivery="at_least_once"):
    eos = delivery == "exactly_once"
    s = Scenario(f"kill9-{role}" + ("-eos" if eos else ""), run_dir, db, delivery=delivery)
    try:
        s.start("tagger", "sink")
        s.wait_ready(["tagger", "sink"])
        th, res = s.produce_async(n, rate)
        field = "tags" if role == "tagger" else "rows"
        s.wait_for(lambda: s.last(field) >= n // 4, 180, 0.2)
        extra = {}
        if eos:
            # Kill inside an open transaction that holds records: they must be aborted.
            frozen = freeze_mid_transaction(s, role)
            s.check(frozen is not None, "the tagger was caught with an open transaction holding records")
            extra["at_kill_uncommitted_committed"] = frozen
        log(f"{s.name}: kill -9 the {role} at {s.last(field)}/{n} {field}")
        s.procs[role].kill9()
        time.sleep(1)  # produce requests already on the wire land before outputs are counted
        replayable, why = uncommitted_outputs(s, role)
        log(f"{s.name}: {why}")
        s.procs[role].start()
        fault_end = time.time()
        th.join()
        if "error" in res:
            raise res["error"]
        s.check(s.wait_complete(res["ids"], 300), "all items tagged and written within 300 s")
        v = s.verify(res["ids"])
        if eos:
            # The killed transaction's records stay in the log, marked aborted: read_uncommitted
            # sees them, read_committed does not.
            u, c = len(read_records(s.tags)), len(read_records(s.tags, committed=True))
            s.check(c == n, f"read_committed sees exactly {n} tagged events (got {c})")
            s.check(u > c, f"a transaction was aborted: read_uncommitted {u} > read_committed {c} records")
            extra["tags_uncommitted_committed"] = (u, c)
            bound, why = 0, "exactly-once: 0 to read_committed"
        elif role == "tagger":
            bound = replayable
            why = f"records output but uncommitted at the kill ({why})"
        else:
            bound, why = 0, "the tagger was not touched"
        return s.result(n, v, s.recovery(fault_end, field), extra, dup_bound=bound, dup_why=why)
    finally:
        s.close(KEEP)


def scen_cql_stop(run_dir, db, n, rate, secs=20):
    s = Scenario("cql-stopped", run_dir, db)
    pid = service_pid("cassandra")
    try:
        s.start("tagger", "sink")
        s.wait_ready(["tagger", "sink"])
        th, res = s.produce_async(n, rate)
        s.wait_for(lambda: s.last("rows") >= n // 5, 180, 0.2)
        log(f"{s.name}: SIGSTOP cassandra (pid {pid}) for {secs}s at {s.last('rows')}/{n} rows")
        os.kill(pid, signal.SIGSTOP)
        CLEANUP["cassandra"] = pid
        time.sleep(secs)
        alive = s.procs["sink"].alive() and s.procs["sink"].starts == 1
        os.kill(pid, signal.SIGCONT)
        CLEANUP.pop("cassandra", None)
        fault_end = time.time()
        s.check(alive, "sink kept running through the outage (no restart)")
        th.join()
        if "error" in res:
            raise res["error"]
        s.check(s.wait_complete(res["ids"], 300), "all items written within 300 s of the database's return")
        v = s.verify(res["ids"])
        retries = s.procs["sink"].metric("streamoasis_retries_total")
        return s.result(n, v, s.recovery(fault_end, "rows"), {"sink_retries": retries})
    finally:
        if "cassandra" in CLEANUP:
            os.kill(CLEANUP.pop("cassandra"), signal.SIGCONT)
        s.close(KEEP)


def scen_kafka_restart(run_dir, db, n, rate, delivery="at_least_once"):
    eos = delivery == "exactly_once"
    s = Scenario("kafka-restart" + ("-eos" if eos else ""), run_dir, db, delivery=delivery)
    try:
        s.start("tagger", "sink")
        s.wait_ready(["tagger", "sink"])
        th, res = s.produce_async(n, rate)
        s.wait_for(lambda: s.last("rows") >= n // 5, 180, 0.2)
        # What may be replayed: outputs of records not committed when the broker goes away, plus the
        # records the tagger admits until the broker is gone (each can be output before the broker
        # stops and replayed after it returns), plus one max_in_flight window around the rejoin.
        replayable, why = (0, "") if eos else uncommitted_outputs(s, "tagger")
        in_before = topic_end(s.input)
        log(f"{s.name}: stopping the broker at {s.last('rows')}/{n} rows")
        t_stop = time.time()
        stop_service("kafka")
        admitted = max(0, round((time.time() - t_stop) * rate) + 1) if th.is_alive() else 0
        time.sleep(3)
        up = stack_up()
        fault_end = time.time()
        log(f"{s.name}: broker back after {fault_end - t_stop:.1f}s (stack up {up:.1f}s)")
        th.join()
        if "error" in res:
            raise res["error"]
        s.check(s.wait_complete(res["ids"], 300), "all items tagged and written within 300 s of the broker's return")
        s.check(s.procs["tagger"].starts == 1 and s.procs["sink"].starts == 1, "processors recovered without a restart")
        rec = s.recovery(fault_end, "rows")
        s.check(rec is not None and rec <= 60, f"rows advance again within 60 s of the broker's return (took {rec})")
        v = s.verify(res["ids"])
        if eos:
            bound, why = 0, "exactly-once: 0 to read_committed"
        else:
            bound = replayable + admitted + s.max_in_flight["tagger"]
            why = f"{why}; +{admitted} produced to the input while the broker stopped; +max_in_flight {s.max_in_flight['tagger']}"
        return s.result(n, v, rec, {"outage_s": round(fault_end - t_stop, 1), "input_at_stop": in_before}, dup_bound=bound, dup_why=why)
    finally:
        s.close(KEEP)


def scen_eos_zombie(run_dir, db, n, rate, pause=20):
    """Exactly-once with two taggers: the first is SIGSTOPped inside an open transaction, the second
    takes its partitions, then the first is resumed. The zombie must be fenced (its transaction
    aborted, nothing of it visible to read_committed) and every item tagged exactly once."""
    s = Scenario("eos-zombie", run_dir, db, delivery="exactly_once")
    (s.dir / "b").mkdir(exist_ok=True)
    a, b = s.procs["tagger"], Proc("tagger", s.topo, s.dir / "b")
    # Two replicas on one host: distinct transactional ids, as two pods would have.
    a.extra_env["STREAMOASIS_TRANSACTIONAL_ID"] = f"zombie-a-{s.sid}"
    b.extra_env["STREAMOASIS_TRANSACTIONAL_ID"] = f"zombie-b-{s.sid}"
    del s.procs["sink"]
    s.procs["tagger-b"] = b
    s.restarts["tagger-b"] = 0
    try:
        a.start()
        s.wait_ready(["tagger"])
        # Paced to last ~30 s: the zombie is resumed while records still flow (at the full rate a
        # short run is tagged before the freeze and the second tagger has nothing to take over).
        th, res = s.produce_async(n, min(rate, n / 30))
        s.wait_for(lambda: s.last("tags") >= n // 4, 180, 0.2)
        frozen = freeze_mid_transaction(s, "tagger")
        frozen_at = time.time()
        s.check(frozen is not None, "the first tagger was stopped inside an open transaction holding records")
        log(f"{s.name}: first tagger SIGSTOPped mid-transaction ({frozen}); starting the second")
        b.start()
        before = len(read_records(s.tags, committed=True))
        took_over = s.wait_for(lambda: len(read_records(s.tags, committed=True)) > before + 50, 120)
        s.check(took_over, "the second tagger took the partitions and committed transactions")
        # Resumed past transaction.timeout.ms (30 s): the broker has aborted the zombie's
        # transaction and its pending sends time out, the hardest case for the zombie's loop.
        time.sleep(max(0, pause - 10, frozen_at + 40 - time.time()))
        log(f"{s.name}: SIGCONT the first tagger after {time.time() - frozen_at:.0f} s stopped")
        a.expected_exit = True  # a fenced zombie may stop (fatal) or rejoin: both are fine, data decides
        a.p.send_signal(signal.SIGCONT)
        th.join()
        if "error" in res:
            raise res["error"]
        s.check(s.wait_for(lambda: len(read_records(s.tags, committed=True)) >= n, 300), f"{n} tagged events visible to read_committed")
        def fenced():
            text = a.log.read_text(errors="replace").lower()
            return "transaction aborted" in text or "fenced" in text
        s.check(s.wait_for(fenced, 60, 0.5), "the resumed first tagger was fenced within 60 s (its log: transaction aborted / fenced)")
        u, c = len(read_records(s.tags)), len(read_records(s.tags, committed=True))
        s.check(u > c, f"the zombie's records are in the log but aborted: read_uncommitted {u} > read_committed {c}")
        counts = {}
        for k in tagged_keys(s.tags, committed=True):
            counts[k] = counts.get(k, 0) + 1
        good = set(res["ids"])
        v = {"tagged": len(good & set(counts)), "rows": None, "lost": len(good - set(counts)), "duplicated": sum(c - 1 for k, c in counts.items() if k in good),
             "missing_sample": sorted(good - set(counts))[:5], "counts": counts}
        text = a.log.read_text(errors="replace")
        how = [w for w, m in (("send failed", "a send in it failed"), ("revoked", "partitions were revoked"), ("fenced", "fenced")) if m in text]
        return s.result(n, v, None, {"zombie_exit": a.p.returncode, "zombie_saw": how, "tags_uncommitted_committed": (u, c)}, dup_bound=0, dup_why="exactly-once: 0 to read_committed")
    finally:
        s.close(KEEP)


def scen_registry_at_start(run_dir, db, n, secs=20):
    s = Scenario("registry-down-at-start", run_dir, db)
    try:
        ids = s.produce_goods(n)
        log(f"{s.name}: stopping the registry, then starting the processors")
        stop_service("registry")
        CLEANUP["registry"] = True
        s.start("tagger", "sink")
        codes = {"tagger": set(), "sink": set()}
        t_end = time.time() + secs
        while time.time() < t_end:
            for r in codes:
                codes[r].add(get_code(s.procs[r].url("/readyz"))[0])
            time.sleep(0.5)
        for r in codes:
            s.check(s.procs[r].alive() and s.procs[r].starts == 1, f"{r} stays up while the registry is down (backoff, no crash)")
            s.check(200 not in codes[r], f"{r} /readyz not 200 while the registry is down (seen: {sorted(c for c in codes[r] if c)})")
        text = s.procs["tagger"].log.read_text(errors="replace")
        s.check("registry" in text.lower(), "tagger log names the registry")
        stack_up()
        CLEANUP.pop("registry", None)
        fault_end = time.time()
        s.check(s.wait_complete(ids, 300), "all items tagged and written within 300 s of the registry's return")
        v = s.verify(ids)
        return s.result(n, v, s.recovery(fault_end, "tags"), {"readyz_during_outage": {r: sorted(c for c in codes[r] if c) for r in codes}})
    finally:
        if CLEANUP.pop("registry", None):
            stack_up()
        s.close(KEEP)


def scen_registry_mid_run(run_dir, db, n, secs=240):
    s = Scenario("registry-down-mid-run", run_dir, db)
    try:
        s.start("tagger", "sink")
        s.wait_ready(["tagger", "sink"])
        first = s.produce_goods(n // 2, prefix=f"{s.name}-a")
        s.check(s.wait_complete(first, 180), "first half done with the registry up")
        log(f"{s.name}: stopping the registry; producing the second half with the cached schema id")
        stop_service("registry")
        CLEANUP["registry"] = True
        second = s.produce_goods(n - n // 2, prefix=f"{s.name}-b")
        done = s.wait_complete(first + second, secs)
        during = {r: s.procs[r].metric("streamoasis_retries_total") for r in ("tagger", "sink")}
        s.check(done, f"second half tagged and written while the registry is down (cached schemas), within {secs}s")
        s.check(all(v == 0 for v in during.values()), f"no retries while the registry is down (retries_total {during})")
        stack_up()
        CLEANUP.pop("registry", None)
        s.check(s.wait_complete(first + second, 180), "everything done after the registry's return")
        v = s.verify(first + second)
        return s.result(n, v, 0.0 if done else None)
    finally:
        if CLEANUP.pop("registry", None):
            stack_up()
        s.close(KEEP)


# Random letters and digits: lz4 cannot shrink it, so a tagged event carrying it (key + value,
# 1.2 MB) is over the tags topic's 1 MiB limit whatever the producer's compression.
_rng = random.Random(600_000)
LONG_ID = "".join(_rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") for _ in range(600_000))
# A 1.2 MB title: the input (under max_record_bytes) decodes and is tagged, but the tagged event
# carries the title and is over the tags topic's 1 MiB limit: output_too_large.
BIG_TITLE = "".join(_rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(1_200_000))


def poison_corpus(s, kinds=None):
    """[(kind, key, value bytes)]: at least 12 kinds of bad input."""
    c = s.codec
    good = lambda mid, **kw: dict(good_item(mid, 0), **kw)
    valid = c.frame(good("poison-truncated"))
    other = {"type": "record", "name": "Other", "namespace": "faults", "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": "string"}]}
    other_id = registry_register(f"faults-other-{s.sid}-value", other)
    oth = fastavro.parse_schema(other)
    # A writer schema named like ours, with one more field: a recursive union nested 200,000 deep.
    ing = registry_latest(f"{s.input}-value")[1]
    deep = dict(ing)
    deep["fields"] = list(ing["fields"]) + [{"name": "nest", "type": ["null", {"type": "record", "name": "Nest", "fields": [{"name": "next", "type": ["null", "Nest"]}]}], "default": None}]
    deep_id = registry_register(f"faults-deep-{s.sid}-value", deep)
    deep_body = c.frame(good("poison-deep"))[5:] + b"\x02" * 200_000 + b"\x00"
    out = [
        ("random_bytes", b"poison-random", b"\x42" + random.Random(7).randbytes(300)),
        ("wrong_magic", b"poison-magic", b"\x01" + valid[1:]),
        ("unknown_schema_id", b"poison-unknown-id", b"\x00" + struct.pack(">I", 987_654_321) + valid[5:]),
        ("truncated_avro", b"poison-truncated", valid[: len(valid) // 2]),
        ("other_schema", b"poison-other", c.frame({"a": 7, "b": "not a media item"}, other_id, oth)),
        ("deep_recursion", b"poison-deep", b"\x00" + struct.pack(">I", deep_id) + deep_body),
        ("huge_transcript_10mb", b"poison-huge", c.frame(good("poison-huge", transcript="word " * 2_000_000))),
        ("media_id_600k", b"poison-long-id", c.frame(good(LONG_ID))),
        ("title_1_2mb", b"poison-big-title", c.frame(good("poison-big-title", title=BIG_TITLE))),
        ("empty_strings", b"poison-empty", c.frame(good("", title="", source="", language=""))),
        ("control_chars", b"poison-ctl", c.frame(good("poison-ctl\x00\x01\x1b[2J", title="\x00\x07\x08\x1b[31mred\x7f", description="\x00" * 100))),
        ("labels_10000", b"poison-labels", c.frame(good("poison-labels", candidate_labels=[f"label-{i}" for i in range(10_000)]))),
        ("attributes_100000", b"poison-attrs", c.frame(good("poison-attrs", attributes={f"k{i}": f"v{i}" for i in range(100_000)}))),
        ("empty_payload", b"poison-null", None),
        ("framing_only", b"poison-framing", valid[:5]),
    ]
    if kinds:
        out = [x for x in out if x[0] in kinds]
    # media ids a poison would carry into the tags topic, were it tagged instead of dead-lettered
    tagged_keys = {"poison-truncated": None, "poison-huge": "huge_transcript_10mb", LONG_ID: "media_id_600k", "": "empty_strings",
                   "poison-ctl\x00\x01\x1b[2J": "control_chars", "poison-labels": "labels_10000", "poison-attrs": "attributes_100000", "poison-deep": "deep_recursion",
                   "poison-big-title": "title_1_2mb"}
    return out, tagged_keys


# The exact `error.kind` each poison case must be dead-lettered with.
POISON_KIND = {
    "random_bytes": "bad_framing",
    "wrong_magic": "bad_framing",
    "unknown_schema_id": "unknown_schema_id",
    "truncated_avro": "undecodable",
    "other_schema": "undecodable",
    "deep_recursion": "schema_too_deep",
    "huge_transcript_10mb": "record_too_large",
    "media_id_600k": "media_id_too_long",
    "title_1_2mb": "output_too_large",
    "empty_strings": "invalid_field",
    "control_chars": "invalid_field",
    "labels_10000": "invalid_labels",
    "attributes_100000": "attributes_too_large",
    "empty_payload": "empty_payload",
    "framing_only": "undecodable",
}
# Cases larger than the processors' client message.max.bytes (8 MiB): dead-lettered without payload.
POISON_PAYLOAD_OMITTED = {"huge_transcript_10mb"}


def scen_poison(run_dir, db, goods, timeout, kinds=None):
    s = Scenario("poison-corpus", run_dir, db, big=True)
    try:
        corpus, tagged_keys = poison_corpus(s, kinds)
        s.start("tagger", "sink")
        s.wait_ready(["tagger", "sink"])
        p = producer(big=True)
        ids = []
        every = max(1, goods // (len(corpus) + 1))
        k = 0
        for i in range(goods):
            mid = f"{s.name}-{i:07d}"
            produce(p, s.input, mid.encode(), s.codec.frame(good_item(mid, i)))
            ids.append(mid)
            if (i + 1) % every == 0 and k < len(corpus):
                kind, key, val = corpus[k]
                produce(p, s.input, key, val, headers=[("faults.case", kind.encode())])
                k += 1
        for kind, key, val in corpus[k:]:
            produce(p, s.input, key, val, headers=[("faults.case", kind.encode())])
        flush(p, "poison corpus")
        log(f"{s.name}: {goods} good + {len(corpus)} poison records produced")

        def dlq_count():
            try:
                return topic_end(s.dlq)
            except Exception:
                return 0

        s.wait_for(lambda: s.last("rows") >= goods and dlq_count() >= len(corpus), timeout)
        time.sleep(2)
        v = s.verify(ids)
        dl = {}
        for _, _, key, value, headers in read_records(s.dlq):
            h = {k: (val or b"").decode(errors="replace") for k, val in headers}
            dl.setdefault(h.get("faults.case", "?"), []).append((key, value, h))
        per = {}
        original = {kind: (key, val) for kind, key, val in corpus}
        for kind, _, _ in corpus:
            letters = dl.get(kind, [])
            n = len(letters)
            want = POISON_KIND[kind]
            got = letters[0][2].get("error.kind") if letters else None
            key, value, h = letters[0] if letters else (None, None, {})
            # Tagged too? Any tag event whose key is the poison's media id or record key.
            wrongly_tagged = sum(c for k, c in v["counts"].items() if tagged_keys.get(k) == kind or k.encode() == original[kind][0])
            omitted = h.get("error.payload_omitted_bytes")
            per[kind] = {"dlq": n, "error_kind": got, "tagged": wrongly_tagged, "payload_omitted_bytes": omitted}
            s.check(n == 1, f"{kind}: in the DLQ exactly once (got {n}x)")
            s.check(got == want, f"{kind}: error.kind {want} (got {got})")
            s.check(wrongly_tagged == 0, f"{kind}: never tagged (tagged {wrongly_tagged}x)")
            if letters:
                s.check(key == original[kind][0], f"{kind}: dead letter keeps the original key")
                orig = original[kind][1]
                if kind in POISON_PAYLOAD_OMITTED:
                    # Too large for the client: the dead letter carries the headers alone, and says how large
                    # the original is (it stays at source.partition/source.offset).
                    s.check(value is None and omitted == str(len(orig)), f"{kind}: payload omitted, error.payload_omitted_bytes = {len(orig)} (got payload {None if value is None else len(value)} bytes, header {omitted})")
                else:
                    s.check(value == orig and omitted is None, f"{kind}: dead letter holds the original bytes ({None if orig is None else len(orig)}) (got {None if value is None else len(value)}; omitted header {omitted})")
                s.check(h.get("source.topic") == s.input and h.get("error.processor") == "tagger", f"{kind}: source.topic/error.processor headers ({h.get('source.topic')}, {h.get('error.processor')})")
        stray = sorted(k for k in dl if k not in original)
        s.check(not stray, f"no unexpected dead letters (got cases {stray})")
        lost_poison = sum(1 for kind, _, _ in corpus if not dl.get(kind))
        r = s.result(goods + len(corpus), v, None, {"poison": per, "lost_poison": lost_poison})
        r["lost"] = (v["lost"] or 0) + lost_poison
        r["ok"] = r["ok"] and lost_poison == 0
        for role in ("tagger", "sink"):
            if s.procs[role].crashes:
                r["notes"].append(f"{role} log tail: {s.procs[role].log_tail(5)}"[:1500])
        return r
    finally:
        s.close(KEEP)


def scen_backlog(run_dir, db, n, timeout):
    s = Scenario("backlog", run_dir, db)
    try:
        log(f"{s.name}: producing a backlog of {n} items")
        p = producer()
        ids = []
        for i in range(n):
            mid = f"b-{i:07d}"
            produce(p, s.input, mid.encode(), s.codec.frame(good_item(mid, i, title=TITLES[i % len(TITLES)])))
            ids.append(mid)
        flush(p, "backlog")
        t_start = time.time()
        s.start("tagger", "sink")
        s.check(s.wait_complete(ids, timeout), f"backlog of {n} drained within {timeout}s")
        took = time.time() - t_start
        v = s.verify(ids)
        curve = {}
        for role in ("tagger", "sink"):
            pts = [(t, kb / 1024) for t, r, kb in s.rss if r == role]
            (s.dir / f"rss-{role}.csv").write_text("seconds,rss_mb\n" + "".join(f"{t:.0f},{mb:.1f}\n" for t, mb in pts))
            if len(pts) >= 10:
                tenth = len(pts) // 10
                deciles = [round(max(mb for _, mb in pts[i * tenth:(i + 1) * tenth])) for i in range(10)]
                first_half = max(mb for _, mb in pts[: len(pts) // 2])
                second_half = max(mb for _, mb in pts[len(pts) // 2:])
                flat = second_half <= first_half * 1.10 + 32
                s.check(flat, f"{role} RSS flat: peak of 2nd half {second_half:.0f} MB vs 1st half {first_half:.0f} MB (deciles {deciles})")
                curve[role] = deciles
        return s.result(n, v, None, {"rss_deciles_mb": curve, "drain_s": round(took, 1), "items_per_s": round(n / took, 1)})
    finally:
        s.close(KEEP)


# ---- main ---------------------------------------------------------------------------------------------

CLEANUP = {}
KEEP = False


def cleanup_services():
    pid = CLEANUP.pop("cassandra", None)
    if pid:
        try:
            os.kill(pid, signal.SIGCONT)
        except Exception:
            pass
    if CLEANUP.pop("registry", None) or service_pid("registry") is None or service_pid("kafka") is None:
        try:
            stack_up()
        except Exception as e:
            log(f"restarting the stack failed: {e}")


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}{unit}" if unit == " MB" else f"{v:.1f}{unit}"
    return f"{v}{unit}"


def table(results):
    cols = ["scenario", "sent", "received", "rows", "lost", "dup", "recovery", "RSS tagger", "RSS sink", "restarts", "result"]
    rows = []
    for r in results:
        rs = r.get("restarts", {})
        rows.append([r["scenario"], fmt(r.get("sent")), fmt(r.get("received")), fmt(r.get("rows")), fmt(r.get("lost")), fmt(r.get("duplicated")),
                     fmt(r.get("recovery_s"), " s"), fmt(r.get("rss_tagger_mb"), " MB"), fmt(r.get("rss_sink_mb"), " MB"),
                     f"{rs.get('tagger', 0)}/{rs.get('sink', 0)}", "pass" if r.get("ok") else "FAIL"])
    w = [max(len(str(x)) for x in [c] + [row[i] for row in rows]) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(xs)) + " |"
    out = [line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short scenarios only (kill -9 tagger/sink, registry mid-run, poison corpus)")
    ap.add_argument("--only", default="", help="comma-separated scenario names to run")
    ap.add_argument("--rotate", action="store_true", help="with --quick: also one long scenario (not the backlog), chosen by the day of the year "
                    "(FAULTS_ROTATE_DAY=N to pick another day), so every long scenario runs within a few days")
    ap.add_argument("--items", type=int, default=0, help="items per short scenario (default 800 quick, 3000 full)")
    ap.add_argument("--backlog", type=int, default=100_000, help="items in the backlog scenario (full run)")
    ap.add_argument("--poison", default="", help="comma-separated poison kinds to send (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep each scenario's topics and keyspace (for inspection)")
    args = ap.parse_args()
    global KEEP
    KEEP = args.keep
    if not BIN.exists():
        sys.exit(f"error: {BIN} not found: build it with `cargo build --release -p streamoasis`")
    n = args.items or (800 if args.quick else 3000)
    rate = 200.0
    run_dir = ROOT / ".cache/faults" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    db = Db()
    plan = [
        ("kill9-tagger", True, lambda: scen_kill(run_dir, db, "tagger", n, rate)),
        ("kill9-tagger-eos", True, lambda: scen_kill(run_dir, db, "tagger", n, rate, "exactly_once")),
        ("eos-zombie", True, lambda: scen_eos_zombie(run_dir, db, n, rate)),
        ("kill9-sink", True, lambda: scen_kill(run_dir, db, "sink", n, rate)),
        ("poison-corpus", True, lambda: scen_poison(run_dir, db, 300 if args.quick else 1000, 120 if args.quick else 300, {k for k in args.poison.split(",") if k})),
        ("registry-down-mid-run", True, lambda: scen_registry_mid_run(run_dir, db, n // 2)),
        ("cql-stopped", False, lambda: scen_cql_stop(run_dir, db, n, rate)),
        ("kafka-restart", False, lambda: scen_kafka_restart(run_dir, db, n, rate)),
        ("kafka-restart-eos", False, lambda: scen_kafka_restart(run_dir, db, n, rate, "exactly_once")),
        ("registry-down-at-start", False, lambda: scen_registry_at_start(run_dir, db, n // 2)),
        ("backlog", False, lambda: scen_backlog(run_dir, db, args.backlog, 3000)),
    ]
    only = {x for x in args.only.split(",") if x}
    known = {name for name, _, _ in plan}
    if only - known:
        sys.exit(f"error: unknown scenario(s) {sorted(only - known)}; known: {sorted(known)}")
    if args.rotate:
        if not args.quick or only:
            sys.exit("error: --rotate goes with --quick (and without --only)")
        long = [name for name, quick, _ in plan if not quick and name != "backlog"]
        day = int(os.environ.get("FAULTS_ROTATE_DAY") or time.strftime("%j"))
        pick = long[day % len(long)]
        log(f"--rotate: day {day} -> long scenario {pick} (rotation: {', '.join(long)})")
        only = {name for name, quick, _ in plan if quick} | {pick}
    results = []
    t0 = time.time()
    interrupted = False

    def on_signal(sig, _):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name, quick, fn in plan:
            if (only and name not in only) or (not only and args.quick and not quick):
                continue
            log(f"--- {name}")
            try:
                r = fn()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                import traceback
                traceback.print_exc()
                r = {"scenario": name, "ok": False, "lost": None, "notes": [f"harness error: {e}"], "checks": []}
            results.append(r)
            log(f"{name}: {'pass' if r['ok'] else 'FAIL'} lost={r.get('lost')} dup={r.get('duplicated')} in {r.get('elapsed_s')}s")
    except KeyboardInterrupt:
        log("interrupted")
        interrupted = True
    finally:
        cleanup_services()
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(results))
    print()
    for r in results:
        bad = [t for ok, t in r.get("checks", []) if not ok]
        for t in bad:
            print(f"  {r['scenario']}: FAILED {t}")
        for t in r.get("notes", []):
            print(f"  {r['scenario']}: note: {t}")
        if r.get("missing_sample"):
            print(f"  {r['scenario']}: missing e.g. {r['missing_sample']}")
        for k in ("poison", "rss_deciles_mb", "drain_s", "items_per_s", "sink_retries", "outage_s", "readyz_during_outage"):
            if k in r:
                print(f"  {r['scenario']}: {k} = {json.dumps(r[k])}")
    print(f"\nfault suite: {len(results)} scenarios in {time.time() - t0:.0f}s; details in {run_dir}")
    if interrupted:
        return 130
    failed = [r["scenario"] for r in results if not r.get("ok")]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

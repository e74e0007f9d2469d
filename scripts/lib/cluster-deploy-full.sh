# shellcheck shell=bash
# The long checks of `scripts/deploy-test --full`, sourced by scripts/deploy-test after the quick
# path (release $REL installed in $NS, items and pod kill checked). Each check is exact and fails
# with the cluster's own lines (fail -> diagnose).

NODE=$(k get nodes -o jsonpath='{.items[0].metadata.name}')
TAGGER_DEPLOY="$REL-streamoasis-tagger"
OLD_LABELS=$("$SO_PY" -c 'import sys,yaml; print(",".join(l["name"] for l in yaml.safe_load(open(sys.argv[1]))["tagging"]["labels"]))' "$work/topology.yaml")

# upgrade ARGS...: helm upgrade of the release with the base values, the run's topology (never the
# chart's default one: its topic and group names are the shared stack's) plus ARGS, waiting for it.
upgrade() {
  helm upgrade "$REL" "$CHART" -n "$NS" "${HELM_VALUES[@]}" --set-file topology.content="$work/topology.yaml" \
    "${extra_helm_args[@]}" "$@" \
    --wait --wait-for-jobs --timeout 6m >"$work/helm-upgrade.log" 2>&1 \
    || { cat "$work/helm-upgrade.log" >&2; fail "helm upgrade $* failed"; }
}

# labels_check FILE PREFIX N ALLOWED: the N items PREFIX-* are all tagged, only with ALLOWED labels.
labels_check() {
  "$SO_PY" - "$1" "$2" "$3" "$4" <<'PY' || fail "label check of $2 failed"
import json, sys
path, prefix, n, allowed = sys.argv[1], sys.argv[2], int(sys.argv[3]), set(sys.argv[4].split(","))
recs = [json.loads(l) for l in open(path) if l.strip()]
recs = [r for r in recs if r["media_id"].startswith(prefix + "-")]
ids = {r["media_id"] for r in recs}
assert len(ids) == n, f"{prefix}: {len(ids)} of {n} items tagged"
bad = [(r["media_id"], t["label"]) for r in recs for t in r["tags"] if t["label"] not in allowed]
assert not bad, f"{prefix}: labels outside the expected taxonomy: {bad[:5]}"
assert all(r["tags"] for r in recs), f"{prefix}: an event without tags"
print(f"{prefix}: {len(ids)}/{n} tagged, every label in the expected taxonomy ({len(recs)} events)")
PY
}

# wait_all PREFIX N: every item PREFIX-* tagged (up to 300 s); leaves the read in $work/all.jsonl.
wait_all() {
  local events distinct deadline=$(( SECONDS + 300 ))
  while :; do
    read_tagged "$work/all.jsonl"
    read -r events distinct < <(count_ids "$work/all.jsonl" "$1")
    [ "$distinct" -ge "$2" ] && break
    [ $SECONDS -lt $deadline ] || fail "$1: $distinct of $2 items tagged after 300 s"
    sleep 2
  done
}

# --- rolling upgrade of the taxonomy while items flow, then rollback ------------------------------
phase "rolling upgrade: new taxonomy (every label renamed *-v2) while items flow"
topo "$work/topology-v2.yaml" at_least_once -v2
NEW_LABELS=$("$SO_PY" -c 'import sys,yaml; print(",".join(l["name"] for l in yaml.safe_load(open(sys.argv[1]))["tagging"]["labels"]))' "$work/topology-v2.yaml")
for p in $(kn get pods -l app.kubernetes.io/component=tagger -o name); do
  kn logs -f "$p" >"$work/old-$(basename "$p").log" 2>&1 &
  BG_PIDS+=($!)
done
old_pods=$(kn get pods -l app.kubernetes.io/component=tagger -o jsonpath='{.items[*].metadata.name}')
items "$work/flow.jsonl" "$RUN_ID-u" 600
"$BIN" produce "$work/flow.jsonl" --limit 600 --rate 15 --quiet --source deploy-test &
flow_pid=$!; BG_PIDS+=("$flow_pid")
sleep 5
t0=$SECONDS
upgrade --set-file topology.content="$work/topology-v2.yaml"
t_upgrade=$(( SECONDS - t0 ))
wait "$flow_pid" || fail "producing during the upgrade failed"
for p in $old_pods; do
  deadline=$(( SECONDS + 90 ))
  while kn get pod "$p" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "old pod $p still there 90 s after the upgrade"
    sleep 1
  done
  grep -q 'shutdown requested: draining' "$work/old-$p.log" || { tail -n 20 "$work/old-$p.log" >&2; fail "old pod $p: no drain on SIGTERM in its log"; }
  ! grep -q 'drain timeout' "$work/old-$p.log" || fail "old pod $p: drain timed out (records abandoned)"
done
wait_all "$RUN_ID-u" 600
items "$work/after.jsonl" "$RUN_ID-v" 100
"$BIN" produce "$work/after.jsonl" --limit 100 --quiet --source deploy-test
wait_all "$RUN_ID-v" 100
labels_check "$work/all.jsonl" "$RUN_ID-v" 100 "$NEW_LABELS"
read -r ev di < <(count_ids "$work/all.jsonl" "$RUN_ID-u")
figure "rolling upgrade: helm upgrade ${t_upgrade}s; old pod(s) $old_pods drained on SIGTERM (no drain timeout); 600/600 items produced across it tagged ($(( ev - di )) duplicates); 100/100 after it carry only the new labels"

phase "helm rollback to revision 1"
t0=$SECONDS
helm rollback "$REL" 1 -n "$NS" --wait --timeout 6m >"$work/rollback.log" 2>&1 || { cat "$work/rollback.log" >&2; fail "helm rollback failed"; }
items "$work/rb.jsonl" "$RUN_ID-r" 100
"$BIN" produce "$work/rb.jsonl" --limit 100 --quiet --source deploy-test
wait_all "$RUN_ID-r" 100
labels_check "$work/all.jsonl" "$RUN_ID-r" 100 "$OLD_LABELS"
figure "helm rollback: ${t_upgrade:+}$(( SECONDS - t0 ))s to 100/100 items tagged with the original labels again"

# --- scaling ---------------------------------------------------------------------------------------
# record_replicas CSV: every 2 s, seconds, spec and ready replicas of the tagger and the HPA's
# current metric, until killed.
record_replicas() {
  local t0=$SECONDS
  echo "seconds,replicas,ready,metric" >"$1"
  while :; do
    local r
    r=$(kn get deploy "$TAGGER_DEPLOY" -o jsonpath='{.spec.replicas},{.status.readyReplicas}' 2>/dev/null || echo ",")
    local m
    m=$(kn get hpa -o jsonpath='{.items[0].status.currentMetrics[0]}' 2>/dev/null | "$SO_PY" -c '
import json, sys
try:
    d = json.loads(sys.stdin.read() or "{}")
    v = (d.get("external") or {}).get("current", {}) or (d.get("resource") or {}).get("current", {})
    print(v.get("averageValue") or v.get("averageUtilization") or v.get("value") or "")
except Exception:
    print("")')
    echo "$(( SECONDS - t0 )),${r%%,*},${r#*,},$m" >>"$1"
    sleep 2
  done
}

# scale_test NAME CSV MAX ITEMS: a backlog of ITEMS; the tagger must go from 1 to MAX replicas and
# back to 1 once the backlog is gone. Writes CSV (and a PNG next to it when matplotlib is there).
scale_test() {
  local name=$1 csv=$2 max=$3 n=$4 rec deadline t0 peak
  deadline=$(( SECONDS + 120 ))
  until [ "$(kn get deploy "$TAGGER_DEPLOY" -o jsonpath='{.spec.replicas}')" = 1 ]; do
    [ $SECONDS -lt $deadline ] || fail "$name: the tagger is not at 1 replica before the backlog"
    sleep 2
  done
  record_replicas "$csv" & rec=$!; BG_PIDS+=("$rec")
  t0=$SECONDS
  items "$work/backlog-$name.jsonl" "$RUN_ID-$name" "$n"
  "$BIN" produce "$work/backlog-$name.jsonl" --limit "$n" --quiet --source deploy-test
  deadline=$(( SECONDS + 300 ))
  until [ "$(kn get deploy "$TAGGER_DEPLOY" -o jsonpath='{.spec.replicas}')" -ge "$max" ]; do
    [ $SECONDS -lt $deadline ] || { kill "$rec"; cat "$csv" >&2; fail "$name: the tagger did not reach $max replicas in 300 s"; }
    sleep 2
  done
  local t_up=$(( SECONDS - t0 ))
  wait_all "$RUN_ID-$name" "$n"
  local t_drained=$(( SECONDS - t0 ))
  deadline=$(( SECONDS + 420 ))
  until [ "$(kn get deploy "$TAGGER_DEPLOY" -o jsonpath='{.spec.replicas}')" = 1 ]; do
    [ $SECONDS -lt $deadline ] || { kill "$rec"; cat "$csv" >&2; fail "$name: the tagger did not return to 1 replica in 420 s"; }
    sleep 2
  done
  local t_down=$(( SECONDS - t0 ))
  sleep 4; kill "$rec" 2>/dev/null; wait "$rec" 2>/dev/null || true
  peak=$(awk -F, 'NR > 1 && $2 > m {m = $2} END {print m + 0}' "$csv")
  "$SO_PY" - "$csv" "$name" <<'PY' || warn "no plot for $csv (matplotlib)"
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
t = [int(r["seconds"]) for r in rows]
fig, ax = plt.subplots(figsize=(7, 3))
ax.step(t, [int(r["replicas"] or 0) for r in rows], where="post", label="replicas (desired)")
ax.step(t, [int(r["ready"] or 0) for r in rows], where="post", label="ready", linestyle="--")
ax.set_xlabel("seconds after the backlog was produced"); ax.set_ylabel("tagger replicas")
ax.set_title(f"tagger replicas over time: {sys.argv[2]}"); ax.legend(); ax.grid(alpha=0.3)
fig.tight_layout(); fig.savefig(sys.argv[1].rsplit(".", 1)[0] + ".png", dpi=100)
PY
  figure "$name: backlog $n items -> $max replicas after ${t_up}s (peak $peak), backlog tagged after ${t_drained}s, back to 1 after ${t_down}s; record $csv"
}

# --- drain against the PodDisruptionBudget ---------------------------------------------------------
phase "kubectl drain with 2 tagger replicas and maxUnavailable 1"
upgrade --set tagger.autoscaling.enabled=false --set tagger.replicas=2
t0=$SECONDS
set +e
k drain "$NODE" --pod-selector "app.kubernetes.io/instance=$REL" --ignore-daemonsets --delete-emptydir-data \
  --timeout 40s >"$work/drain.log" 2>&1
drain_rc=$?
set -e
running=$(kn get pods -l app.kubernetes.io/component=tagger --field-selector status.phase=Running -o name | wc -l)
k uncordon "$NODE" >/dev/null
[ "$drain_rc" != 0 ] || { cat "$work/drain.log" >&2; fail "drain: evicted both taggers (the PDB was not respected)"; }
grep -q "disruption budget" "$work/drain.log" || { cat "$work/drain.log" >&2; fail "drain: failed, but not on the disruption budget"; }
[ "$running" -ge 1 ] || fail "drain: no tagger left running"
kn rollout status deploy "$TAGGER_DEPLOY" --timeout 3m >/dev/null || fail "tagger not available again after uncordon"
figure "drain: one tagger evicted, the second refused by the PDB (\"$(grep -m1 -o 'would violate[^"]*budget' "$work/drain.log")\") until the 40 s timeout; $running tagger(s) kept running; recovered after uncordon in $(( SECONDS - t0 ))s"
upgrade --set tagger.replicas=1

# --- exactly-once: pod kill with a read_committed reader -------------------------------------------
phase "exactly-once: the tagger pod killed with grace 0, read_committed reader"
topo "$work/topology-eos.yaml" exactly_once
upgrade --set-file topology.content="$work/topology-eos.yaml"
# The reader is `streamoasis tail`: its consumer keeps librdkafka's default isolation.level,
# read_committed (kafka.client may not set it: a reserved key), so aborted writes are not counted.
kill_test "$RUN_ID-x" "$KILL_ITEMS" 0
figure "exactly-once pod kill: read_committed reader saw $KILL_DUPS duplicates"

# --- scaling (last: it needs the KEDA and metrics-server builds, the largest of the cluster) -------
mkdir -p "$RESULTS_DIR"
SCALE_MAX="${DEPLOY_TEST_SCALE_MAX:-3}"
if [ -x "$KEDA_DIR/bin/keda-operator" ] && k get crd scaledobjects.keda.sh >/dev/null 2>&1 \
   && k get --raw /apis/external.metrics.k8s.io/v1beta1 >/dev/null 2>&1; then
  phase "KEDA: lag scaling 1 -> $SCALE_MAX -> 1 on a backlog (topic of $PARTITIONS partitions)"
  upgrade --set tagger.keda.enabled=true --set tagger.keda.minReplicas=1 --set tagger.keda.maxReplicas="$SCALE_MAX" \
    --set tagger.keda.lagThreshold=50 --set tagger.keda.pollingInterval=5 --set tagger.keda.cooldownPeriod=30 \
    --set tagger.keda.behavior.scaleDown.stabilizationWindowSeconds=30
  deadline=$(( SECONDS + 120 ))
  until [ "$(kn get scaledobject -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]; do
    [ $SECONDS -lt $deadline ] || { kn describe scaledobject >&2; fail "KEDA: the ScaledObject is not Ready"; }
    sleep 2
  done
  scale_test keda "$RESULTS_DIR/k8s-keda-lag-scaling.csv" "$SCALE_MAX" 3000
  upgrade --set tagger.keda.enabled=false
else
  NOT_RUN+=("KEDA lag scaling (KEDA is not built or not running: scripts/cluster build, then scripts/cluster up)")
fi

if [ -x "$METRICS_SERVER_DIR/bin/metrics-server" ] && k get --raw /apis/metrics.k8s.io/v1beta1/nodes >/dev/null 2>&1; then
  phase "CPU HPA on metrics-server: 1 -> $SCALE_MAX -> 1"
  upgrade --set tagger.autoscaling.enabled=true --set tagger.autoscaling.minReplicas=1 --set tagger.autoscaling.maxReplicas="$SCALE_MAX" \
    --set tagger.autoscaling.targetCPUUtilizationPercentage=50 --set tagger.autoscaling.behavior.scaleDown.stabilizationWindowSeconds=30
  scale_test cpu-hpa "$RESULTS_DIR/k8s-cpu-hpa-scaling.csv" "$SCALE_MAX" 4000
  upgrade --set tagger.autoscaling.enabled=false
else
  NOT_RUN+=("CPU HPA scaling (metrics-server is not built or not running: scripts/cluster build, then scripts/cluster up)")
fi

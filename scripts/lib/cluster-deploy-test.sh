#!/usr/bin/env bash
# The deployment, run for real: the Helm chart installed into the one-node Kubernetes of
# scripts/cluster, against the local stack.
#
#   scripts/deploy-test            install, N items end to end, a tagger pod killed, helm test, uninstall
#   scripts/deploy-test --full     the same, then: rolling upgrade of the taxonomy while items flow and
#                                  helm rollback; KEDA lag scaling 1 -> P -> 1 (replica count over time
#                                  written to benches/results/); the CPU HPA on metrics-server;
#                                  kubectl drain against the PodDisruptionBudget; exactly-once pod kill
#   scripts/deploy-test --secure   against the secured stack (scripts/stack up --secure): the chart's
#                                  Secret wiring (SCRAM user per processor, the CAs, CQL roles, the
#                                  registry's basic auth) installed with deploy/cluster/values-local-secure.yaml,
#                                  N items end to end, no password in any object of the release,
#                                  helm test, uninstall
#
# Steps:
#   1. tools (cached): podman, buildah, debootstrap (apt), helm (go install), a local Debian base
#      image (debootstrap + podman import); the cluster (scripts/cluster up when it is not running:
#      then it is stopped again at the end) and the stack (the same);
#   2. the CPU image: deploy/docker/stage-prebuilt from the release binary of this clone, `podman
#      build` of deploy/docker/Dockerfile, `podman save` | `ctr images import` into the cluster's
#      containerd (tagged by image id: a second run imports nothing);
#   3. `helm install` with deploy/cluster/values-local.yaml, the stack's endpoints and a topology
#      with random topic, group and keyspace names (so it shares the stack with other tests), into
#      a namespace of its own: the topology-apply hook Job must complete and the pods pass kubelet's
#      readiness probes (--wait --wait-for-jobs);
#   4. $DEPLOY_TEST_ITEMS items (default 200) produced with the host binary; read back: exactly that
#      many tagged events with distinct media ids, exactly that many rows in media_tags, spot rows
#      with tags, both DLQs empty;
#   5. pod kill: $DEPLOY_TEST_KILL_ITEMS more items (default 600); once some are tagged the tagger pod
#      is deleted with --grace-period=0 --force; its replacement must become Ready; every item is
#      tagged (none lost), duplicates stay within the at-least-once bound (max_in_flight + one
#      auto-commit interval at the peak rate), rows = all items, DLQs empty;
#   6. `helm test` (the chart's test hook: one probe item through the pipeline);
#   7. `helm uninstall`: no pod, no Job left in the namespace; the namespace is deleted.
# Any failure prints the objects, their events and the pods' and cluster components' own log lines.
#
# Environment: DEPLOY_TEST_ITEMS, DEPLOY_TEST_KILL_ITEMS, DEPLOY_TEST_HELM_ARGS (extra helm install
# arguments, word-split), DEPLOY_TEST_KEEP=1 (keep the release and the work folder),
# DEPLOY_TEST_PREBUILT=1 (use target/release/streamoasis as it is, no cargo build, when it exists).
# Exit status 0 = pass.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(cd "$(dirname "$0")" && pwd | sed "s#/lib\$##")/lib/common.sh"
# shellcheck source=lib/cluster-build.sh
. "$SO_ROOT/scripts/lib/cluster-build.sh"

FULL=0
SECURE=0
for a in "$@"; do
  case $a in
    --full) FULL=1 ;;
    --secure) SECURE=1 ;;
    *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
[ "$FULL" = 1 ] && [ "$SECURE" = 1 ] && die "--full and --secure are separate runs: run scripts/deploy-test --full, then scripts/deploy-test --secure"
MODE_NAME=""
[ "$FULL" = 1 ] && MODE_NAME=" --full"
[ "$SECURE" = 1 ] && MODE_NAME=" --secure"

HELM_VERSION="v3.22.0"
HELM_BIN="$SO_CACHE/bin/helm"
BASE_IMAGE="localhost/streamoasis-base:bookworm-1"
BASE_TAR="$SO_CACHE/images/debian-bookworm-minbase-1.tar"
IMAGE_REPO="localhost/streamoasis"
CHART="$SO_ROOT/deploy/helm/streamoasis"
LOCAL_VALUES="$SO_ROOT/deploy/cluster/values-local.yaml"
SECURE_VALUES="$SO_ROOT/deploy/cluster/values-local-secure.yaml"
ITEMS="${DEPLOY_TEST_ITEMS:-200}"
KILL_ITEMS="${DEPLOY_TEST_KILL_ITEMS:-600}"
KILL_RATE="${DEPLOY_TEST_KILL_RATE:-40}"
RUN_ID="dt$(date +%s)$RANDOM"
NS="so-$RUN_ID"
REL="so"
CLUSTER_STATE="${CLUSTER_STATE:-$SO_LOCAL/cluster}"
KCFG="$CLUSTER_STATE/kubeconfig"
PODMAN=(podman --runtime runc)
RESULTS_DIR="$SO_ROOT/benches/results"

t_start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/streamoasis-deploy-test.XXXXXX")
started_stack=0
started_cluster=0
declare -a FIGURES=()
declare -a BG_PIDS=()
declare -a NOT_RUN=()
phase() { log "[$(( SECONDS - t_start ))s] $*"; }
figure() { FIGURES+=("$*"); log "figure: $*"; }
k() { "$KUBE_DIR/bin/kubectl" --kubeconfig "$KCFG" "$@"; }
kn() { k -n "$NS" "$@"; }
helm() { "$HELM_BIN" --kubeconfig "$KCFG" "$@"; }

# Everything the cluster says about the namespace, then the components' own last lines.
diagnose() {
  set +e
  printf '\033[1;31m--- namespace %s ---\033[0m\n' "$NS" >&2
  kn get all,jobs,pdb,hpa,events -o wide >&2 2>&1
  local p
  for p in $(kn get pods -o name 2>/dev/null); do
    printf '\033[1;31m--- %s: describe (tail) and logs ---\033[0m\n' "$p" >&2
    kn describe "$p" 2>&1 | tail -n 25 >&2
    kn logs "$p" --all-containers --tail 40 >&2 2>&1
    kn logs "$p" --all-containers --previous --tail 20 >&2 2>/dev/null
  done
  for p in kubelet containerd kube-controller-manager kube-scheduler kube-apiserver keda-operator; do
    if [ -s "$CLUSTER_STATE/logs/$p.log" ]; then
      printf '\033[1;31m--- %s (last lines) ---\033[0m\n' "$p" >&2
      grep -E '^[EW][0-9]{4}|level=(error|warning)|"level":"error"|ERROR' "$CLUSTER_STATE/logs/$p.log" | tail -n 12 >&2
    fi
  done
  set -e
}
fail() { diagnose; die "$*"; }

cleanup() {
  local rc=$?
  set +e
  local p
  for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ "${DEPLOY_TEST_KEEP:-0}" != 1 ]; then
    if [ -f "$KCFG" ] && k get ns "$NS" >/dev/null 2>&1; then
      helm uninstall "$REL" -n "$NS" --wait --timeout 2m >/dev/null 2>&1
      k delete ns "$NS" --wait=false >/dev/null 2>&1
    fi
    rm -rf "$work"
  else
    warn "DEPLOY_TEST_KEEP=1: release $REL in namespace $NS and $work kept"
  fi
  [ "$started_cluster" = 1 ] && [ "${DEPLOY_TEST_KEEP:-0}" != 1 ] && "$SO_ROOT/scripts/cluster" down
  [ "$started_stack" = 1 ] && "$SO_ROOT/scripts/stack" down
  if [ ${#FIGURES[@]} -gt 0 ]; then
    printf '%s\n' "--- deploy-test figures ---" "${FIGURES[@]}"
  fi
  if [ "$rc" = 0 ]; then
    printf '\033[1;32mdeploy-test%s: PASS\033[0m (%ss)\n' "$MODE_NAME" "$(( SECONDS - t_start ))"
  else
    printf '\033[1;31mdeploy-test%s: FAIL\033[0m (%ss)\n' "$MODE_NAME" "$(( SECONDS - t_start ))"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. tools -------------------------------------------------------------------------------------
install_podman() {
  local missing=() c
  for c in podman buildah debootstrap runc; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  if [ ${#missing[@]} -gt 0 ]; then
    need apt-get "podman, buildah, debootstrap and runc (Debian: apt-get install podman buildah debootstrap runc)"
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah debootstrap runc uidmap >/dev/null
  fi
  # podman run fails with "setrlimit RLIMIT_NOFILE: Operation not permitted" on these machines
  # unless the default ulimits are cleared; runc is the runtime that works here.
  local conf=/etc/containers/containers.conf
  if ! grep -qs '^default_ulimits = \[\]' "$conf"; then
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '\n[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
    log "containers.conf: default_ulimits = [] ($conf)"
  fi
}

install_helm() {
  # A go-installed helm reports only "v3.22": the stamp file records the exact version installed.
  if [ -x "$HELM_BIN" ] && [ "$(cat "$HELM_BIN.version" 2>/dev/null)" = "$HELM_VERSION" ]; then
    return 0
  fi
  need go "Go 1.24+ (to build helm $HELM_VERSION)"
  log "helm $HELM_VERSION: go install into $SO_CACHE/bin (a few minutes, once)"
  mkdir -p "$SO_CACHE/bin"
  GOBIN="$SO_CACHE/bin" GOFLAGS="${GOFLAGS:-} -buildvcs=false" nice -n 10 go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    && echo "$HELM_VERSION" >"$HELM_BIN.version"
}

# The Debian mirror apt already uses (no registry reachable for base images here).
apt_mirror() {
  local m
  m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1 == "deb" && $3 !~ /security|updates/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$m" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}: needed by debootstrap for the base image"
  echo "$m"
}

base_image() {
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then return 0; fi
  if [ ! -s "$BASE_TAR" ]; then
    local root="$work/rootfs"
    log "base image: debootstrap --variant=minbase bookworm (once, ~1 min; cached as $BASE_TAR)"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$(apt_mirror)" >"$work/debootstrap.log" 2>&1 \
      || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
    mkdir -p "$(dirname "$BASE_TAR")"
    tar -C "$root" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$root"
  fi
  log "base image: podman import $BASE_TAR as $BASE_IMAGE"
  "${PODMAN[@]}" import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

phase "tools"
install_podman
install_helm
base_image

# The quick path needs neither metrics-server nor KEDA (--core). --full uses them when their cached
# builds are complete (`scripts/cluster build` makes them: the longest builds of the cluster); without
# them it runs everything else and then fails, naming the scaling checks that did not run.
up_args=(--core)
if [ "$FULL" = 1 ] && [ -f "$METRICS_SERVER_DIR/.complete" ] && [ -f "$KEDA_DIR/.complete" ]; then up_args=(); fi
if ! "$SO_ROOT/scripts/cluster" status >/dev/null 2>&1; then
  phase "cluster: scripts/cluster up ${up_args[*]} (not running; stopped again at the end)"
  started_cluster=1
  "$SO_ROOT/scripts/cluster" up "${up_args[@]}"
elif [ "$FULL" = 1 ] && [ ${#up_args[@]} = 0 ]; then
  "$SO_ROOT/scripts/cluster" up  # idempotent: starts metrics-server and KEDA when only the core runs
fi
k get --raw /readyz >/dev/null || die "the cluster's API server does not answer (scripts/cluster status)"

# --- stack and binary -----------------------------------------------------------------------------
want_mode=plain; up_flag=()
[ "$SECURE" = 1 ] && { want_mode=secure; up_flag=(--secure); }
if ! "$SO_ROOT/scripts/stack" status >/dev/null 2>&1; then
  started_stack=1
  "$SO_ROOT/scripts/stack" up "${up_flag[@]}"
fi
load_stack_env
[ "${STREAMOASIS_STACK_MODE:-plain}" = "$want_mode" ] \
  || die "the running stack is ${STREAMOASIS_STACK_MODE:-plain}, this run needs it $want_mode: scripts/stack down, then run scripts/deploy-test$MODE_NAME again (it starts the stack it needs)"
BIN="$SO_ROOT/target/release/streamoasis"
if [ "${DEPLOY_TEST_PREBUILT:-0}" = 1 ] && [ -x "$BIN" ]; then
  log "DEPLOY_TEST_PREBUILT=1: using $BIN as it is (no cargo build)"
elif [ ! -x "$BIN" ] || [ -n "$(find "$SO_ROOT/processors" "$SO_ROOT/Cargo.lock" -newer "$BIN" -type f -print -quit)" ]; then
  phase "cargo build --release -p streamoasis"
  (cd "$SO_ROOT" && cargo_env && cargo build --release -p streamoasis)
fi
[ -f "$SO_MODELS/all-MiniLM-L6-v2/model.pt" ] || die "no exported model in $SO_MODELS: run scripts/setup"

# --- 2. image -------------------------------------------------------------------------------------
phase "image: stage the CPU tree, podman build, import into the cluster's containerd"
# Each run builds a new image; the previous run's layers are garbage once containerd holds the new
# one (the image tag moves on and leaves them untagged). Free them first, then make sure the disk
# holds a build: the staged tree, the image, its archive and containerd's copy (about 3.5 GB).
"${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true
need_disk 5 "$("${PODMAN[@]}" info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)" "$work" /var/tmp
"$SO_ROOT/deploy/docker/stage-prebuilt" --flavour cpu --binary "$BIN" --models "$SO_MODELS" --out "$work/ctx"
"${PODMAN[@]}" build --quiet -f "$SO_ROOT/deploy/docker/Dockerfile" \
  --build-arg FILES=from-host --build-arg RUNTIME_BASE="$BASE_IMAGE" --build-arg RUNTIME_APT_PACKAGES= \
  -t "$IMAGE_REPO:deploy-test" "$work/ctx" >"$work/build.log" 2>&1 \
  || { tail -n 40 "$work/build.log" >&2; die "podman build failed (log above)"; }
rm -rf "$work/ctx"
# The image's own USER (kubelet runs the chart's pods as the pod's runAsUser; a plain `podman run`
# or an orchestrator without one uses the image's): it must be the unprivileged 10001.
img_uid=$("${PODMAN[@]}" run --rm --network none --entrypoint id "$IMAGE_REPO:deploy-test" -u 2>&1) \
  || die "running the image without --user failed: $img_uid"
[ "$img_uid" = 10001 ] || die "the image runs as uid $img_uid without --user; deploy/docker/Dockerfile must end with USER 10001:10001"
figure "image USER: uid $img_uid when run without --user (not root)"
image_id=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE_REPO:deploy-test" | cut -c1-12)
IMAGE_TAG="dt-$image_id"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE_REPO:deploy-test")
CTR=("$CONTAINERD_DIR/bin/ctr" --address "$CLUSTER_STATE/run/containerd.sock" -n k8s.io)
if ! "${CTR[@]}" images ls -q | grep -qx "$IMAGE_REPO:$IMAGE_TAG"; then
  "${PODMAN[@]}" tag "$IMAGE_REPO:deploy-test" "$IMAGE_REPO:$IMAGE_TAG"
  "${PODMAN[@]}" save --format docker-archive -o "$work/image.tar" "$IMAGE_REPO:$IMAGE_TAG" >/dev/null
  "${CTR[@]}" images import "$work/image.tar" >"$work/import.log" 2>&1 || { cat "$work/import.log" >&2; die "ctr images import failed"; }
  rm -f "$work/image.tar"
  "${PODMAN[@]}" rmi "$IMAGE_REPO:$IMAGE_TAG" >/dev/null 2>&1 || true
fi
"${CTR[@]}" images ls -q | grep -qx "$IMAGE_REPO:$IMAGE_TAG" || die "$IMAGE_REPO:$IMAGE_TAG is not in containerd after the import"
# Earlier runs' images in this cluster (another build of the binary): only the new one is used.
for old_image in $("${CTR[@]}" images ls -q | grep "^$IMAGE_REPO:dt-" | grep -vx "$IMAGE_REPO:$IMAGE_TAG"); do
  "${CTR[@]}" images rm "$old_image" >/dev/null 2>&1 || true
done
"${PODMAN[@]}" image prune -f >/dev/null 2>&1 || true
log "image $IMAGE_REPO:$IMAGE_TAG: $(( size / 1000000 )) MB, in containerd"

# --- 3. helm install ------------------------------------------------------------------------------
# A topology of our own: random topic, group, subject and keyspace names, so the checks count only
# what this run produced. topo FILE [delivery] [labels-suffix] writes a variant.
topo() {
  "$SO_PY" - "$SO_ROOT/topology.yaml" "$1" "$RUN_ID" "${2:-at_least_once}" "${3:-}" "$SECURE" <<'PY'
import sys, yaml
src, dst, rid, delivery, suffix, secure = sys.argv[1:7]
t = yaml.safe_load(open(src))
names = {x["name"]: f'{x["name"]}.{rid}' for x in t["topics"]}
if secure == "1":  # the secured stack's ACLs grant the processors these prefixes (deploy/local/secure/kafka.acls)
    names = {"media.ingested": f"secure-in.{rid}", "media.tagged": f"secure-out.{rid}",
             "media.ingested.dlq": f"secure-in-dlq.{rid}", "media.tagged.dlq": f"secure-out-dlq.{rid}"}
for x in t["topics"]:
    x["name"] = names[x["name"]]
for s in t["schemas"]:
    topic = s["subject"].rsplit("-", 1)[0]
    s["subject"] = f"{names[topic]}-value"
for p in t["processors"].values():
    for k in ("input", "output", "dlq"):
        if k in p:
            p[k] = names[p[k]]
    p["group"] = f'{p["group"]}-{rid}'
if secure == "1":
    for role in ("tagger", "sink"):
        t["processors"][role]["group"] = f"secure-{role}.{rid}"
t["processors"]["tagger"]["delivery"] = delivery
t["scylla"]["keyspace"] = f"so_{rid}"
if suffix:  # a new taxonomy: every label renamed
    for l in t["tagging"]["labels"]:
        l["name"] = f'{l["name"]}{suffix}'
yaml.safe_dump(t, open(dst, "w"), sort_keys=False)
PY
}
topo "$work/topology.yaml"
# The host binary reads the same topology (schemas/, models/ and calibration/ resolve next to it).
ln -s "$SO_ROOT/schemas" "$work/schemas"
ln -s "$SO_MODELS" "$work/models"
ln -s "$SO_ROOT/calibration" "$work/calibration"
export STREAMOASIS_TOPOLOGY="$work/topology.yaml"
yq() { "$SO_PY" -c 'import sys,yaml; t=yaml.safe_load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$STREAMOASIS_TOPOLOGY" "$1"; }
TAGGED=$(yq 't["processors"]["tagger"]["output"]')
DLQS=$(yq '" ".join([t["processors"]["tagger"]["dlq"], t["processors"]["sink"]["dlq"]])')
MAX_IN_FLIGHT=$(yq 't["processors"]["tagger"]["max_in_flight"]')
PARTITIONS=$(yq '[x["partitions"] for x in t["topics"] if x["name"] == t["processors"]["tagger"]["input"]][0]')

read -r -a extra_helm_args <<<"${DEPLOY_TEST_HELM_ARGS:-}"
HELM_VALUES=(-f "$LOCAL_VALUES" --set image.tag="$IMAGE_TAG"
  --set kafka.bootstrap="$KAFKA_BOOTSTRAP" --set schemaRegistry.url="$SCHEMA_REGISTRY_URL" --set scylla.uri="$SCYLLA_URI")
if [ "$SECURE" = 1 ]; then
  # shellcheck source=lib/cluster-deploy-secure.sh
  . "$SO_ROOT/scripts/lib/cluster-deploy-secure.sh"
  secure_prepare
  HELM_VALUES+=(-f "$SECURE_VALUES")
fi
phase "helm install $REL into namespace $NS (run $RUN_ID)"
t0=$SECONDS
helm install "$REL" "$CHART" -n "$NS" --create-namespace "${HELM_VALUES[@]}" \
  --set-file topology.content="$work/topology.yaml" "${extra_helm_args[@]}" \
  --wait --wait-for-jobs --timeout 6m >"$work/helm-install.log" 2>&1 \
  || { cat "$work/helm-install.log" >&2; fail "helm install failed"; }
figure "helm install (hook Job + pods Ready): $(( SECONDS - t0 ))s"
kn get deploy,pods -o wide

# --- 4. items -------------------------------------------------------------------------------------
# items FILE PREFIX N: N MediaIngested JSON lines with ids PREFIX-00000...
items() {
  "$SO_PY" - "$1" "$2" "$3" <<'PY'
import json, sys
out, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
subjects = ["The striker scored twice in the cup final", "Shares fell as the central bank raised interest rates",
            "The prime minister faced questions in parliament", "A new smartphone with a faster chip and better camera",
            "The film won three awards at the festival"]
with open(out, "w") as f:
    for i in range(n):
        f.write(json.dumps({"media_id": f"{prefix}-{i:05d}", "title": subjects[i % len(subjects)],
                            "description": f"Item {i} of the deployment test."}) + "\n")
PY
}

# read_tagged OUT: every tagged event of the run so far (reads until idle for 5 s).
read_tagged() {
  "$BIN" tail "$TAGGED" --from-beginning --idle-timeout 5s --json >"$1" 2>"$work/tail.err" \
    || { cat "$work/tail.err" >&2; fail "reading $TAGGED failed"; }
}

# count_ids FILE PREFIX: "events distinct" of the ids starting with PREFIX-.
count_ids() {
  "$SO_PY" - "$1" "$2" <<'PY'
import json, sys
ids = [json.loads(l)["media_id"] for l in open(sys.argv[1]) if l.strip()]
ids = [i for i in ids if i.startswith(sys.argv[2] + "-")]
print(len(ids), len(set(ids)))
PY
}

db_rows() {
  "$BIN" db stats 2>"$work/db.err" | awk '/media_tags/ {for (i=1;i<=NF;i++) if ($i ~ /^[0-9]+$/) {print $i; exit}}'
}

# wait_rows N: media_tags holds exactly N rows (waits up to 120 s for the sink).
wait_rows() {
  local want=$1 rows deadline=$(( SECONDS + 120 ))
  while :; do
    rows=$(db_rows)
    [ "${rows:-0}" -ge "$want" ] && break
    [ $SECONDS -lt $deadline ] || { cat "$work/db.err" >&2; fail "media_tags has ${rows:-0} rows, expected $want"; }
    sleep 2
  done
  [ "$rows" -eq "$want" ] || fail "media_tags has $rows rows, expected exactly $want"
}

dlqs_empty() {
  local dlq
  for dlq in $DLQS; do
    "$BIN" tail "$dlq" --from-beginning --idle-timeout 3s --json >"$work/dlq.jsonl" 2>"$work/dlq.err" \
      || { cat "$work/dlq.err" >&2; fail "reading $dlq failed"; }
    [ ! -s "$work/dlq.jsonl" ] || fail "$dlq holds $(wc -l <"$work/dlq.jsonl") records"
  done
}

phase "produce $ITEMS items, check tagged events and rows"
items "$work/items.jsonl" "$RUN_ID-a" "$ITEMS"
t0=$SECONDS
"$BIN" tail "$TAGGED" --from-beginning --count "$ITEMS" --idle-timeout 180s --json >"$work/tagged.jsonl" 2>"$work/tail.err" &
tail_pid=$!
"$BIN" produce "$work/items.jsonl" --limit "$ITEMS" --quiet --source deploy-test
wait "$tail_pid" || { cat "$work/tail.err" >&2; fail "reading the tagged topic failed"; }
"$SO_PY" - "$work/tagged.jsonl" "$ITEMS" "$RUN_ID-a" <<'PY' || fail "tagged events check failed"
import json, sys
path, n, rid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
recs = [json.loads(l) for l in open(path) if l.strip()]
ids = [r.get("media_id") for r in recs]
want = {f"{rid}-{i:05d}" for i in range(n)}
assert len(recs) == n, f"expected {n} tagged events, read {len(recs)}"
assert set(ids) == want, f"tagged media ids differ: missing {sorted(want - set(ids))[:5]}, extra {sorted(set(ids) - want)[:5]}"
assert all(r.get("tags") for r in recs), "a tagged event without tags"
top = {}
for r in recs:
    t = r["tags"][0]["label"] if isinstance(r["tags"][0], dict) else r["tags"][0]
    top[t] = top.get(t, 0) + 1
print(f"tagged events: {len(recs)} distinct ids, top labels {top}")
PY
wait_rows "$ITEMS"
for i in 0 $(( ITEMS / 2 )) $(( ITEMS - 1 )); do
  id=$(printf '%s-a-%05d' "$RUN_ID" "$i")
  out=$("$BIN" db get "$id")
  grep -Eq "^$id: [a-z]+ [0-9.]+" <<<"$out" || fail "db get $id: no row with tags ($out)"
done
dlqs_empty
figure "end to end: $ITEMS produced, $ITEMS tagged events (distinct ids), $ITEMS rows, 0 dead letters, in $(( SECONDS - t0 ))s; image $(( size / 1000000 )) MB"

[ "$SECURE" = 1 ] && secure_checks

# --- 5. pod kill ----------------------------------------------------------------------------------
# kill_test PREFIX N DUP_BOUND: N items produced at $KILL_RATE items/s (so they still flow during
# the kill and the replacement's start); once 10% are tagged, the tagger pod is deleted with grace 0;
# every item must be tagged, duplicates <= DUP_BOUND. Sets KILL_DUPS.
ready_taggers() { kn get pods -l app.kubernetes.io/component=tagger -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{" "}{.metadata.deletionTimestamp}{"\n"}{end}' | awk '$2 == "True" && $3 == "" {print $1}'; }
kill_test() {
  local prefix=$1 n=$2 bound=$3 victim t0 t_kill events distinct replacement deadline prod_pid progress_pid
  items "$work/kill.jsonl" "$prefix" "$n"
  victim=$(ready_taggers | head -n1)
  [ -n "$victim" ] || fail "no Ready tagger pod to kill"
  # One reader follows the tagged topic while the items flow (a reader with an idle timeout would
  # not stop before the flow does).
  "$BIN" tail "$TAGGED" --from-beginning --idle-timeout 300s --json >"$work/kill-progress.jsonl" 2>/dev/null &
  progress_pid=$!
  BG_PIDS+=("$progress_pid")
  t0=$SECONDS
  "$BIN" produce "$work/kill.jsonl" --limit "$n" --rate "$KILL_RATE" --quiet --source deploy-test \
    >"$work/kill-produce.log" 2>&1 &
  prod_pid=$!
  BG_PIDS+=("$prod_pid")
  deadline=$(( SECONDS + 120 ))
  while :; do
    read -r events distinct < <(count_ids "$work/kill-progress.jsonl" "$prefix")
    [ "$distinct" -ge $(( n / 10 )) ] && break
    [ $SECONDS -lt $deadline ] || fail "pod kill: only $distinct of $n items tagged after 120 s (before the kill)"
    sleep 0.2
  done
  kill "$progress_pid" 2>/dev/null || true
  [ "$distinct" -lt "$n" ] || fail "pod kill: all $n items were tagged before the kill could happen; raise DEPLOY_TEST_KILL_ITEMS"
  t_kill=$SECONDS
  local killed_at=$distinct
  kn delete pod "$victim" --grace-period=0 --force >/dev/null 2>&1
  log "pod kill: deleted $victim (grace 0) with $distinct of $n items tagged"
  deadline=$(( SECONDS + 240 ))
  until replacement=$(ready_taggers | grep -vx "$victim" | head -n1) && [ -n "$replacement" ]; do
    [ $SECONDS -lt $deadline ] || fail "pod kill: no Ready replacement for $victim after 240 s"
    sleep 1
  done
  local t_ready=$(( SECONDS - t_kill ))
  wait "$prod_pid" || { cat "$work/kill-produce.log" >&2; fail "pod kill: producing the items failed"; }
  deadline=$(( SECONDS + 240 ))
  while :; do
    read_tagged "$work/kill-tagged.jsonl"
    read -r events distinct < <(count_ids "$work/kill-tagged.jsonl" "$prefix")
    [ "$distinct" -ge "$n" ] && break
    [ $SECONDS -lt $deadline ] || fail "pod kill: $distinct of $n items tagged 240 s after the kill: lost $(( n - distinct ))"
    sleep 2
  done
  KILL_DUPS=$(( events - distinct ))
  [ "$KILL_DUPS" -le "$bound" ] || fail "pod kill: $KILL_DUPS duplicates, above the bound $bound"
  figure "pod kill (tagger $victim, grace 0, $n items at $KILL_RATE/s, killed at $killed_at tagged): replacement $replacement Ready $(( t_ready ))s after the kill; $n/$n items tagged (0 lost) in $(( SECONDS - t0 ))s; $KILL_DUPS duplicates (bound $bound)"
}
if [ "$SECURE" = 1 ]; then
  log "pod kill: not part of --secure (the same processors, security does not change it; the default run does it)"
else
  phase "pod kill: $KILL_ITEMS items, the tagger pod deleted with --grace-period=0 while they flow"
  # At-least-once bound for one killed replica: its records in flight (max_in_flight) plus what it
  # completed within one auto-commit interval (1 s) at the peak rate measured here (<= 150 items/s).
  DUP_BOUND=$(( MAX_IN_FLIGHT + 150 ))
  kill_test "$RUN_ID-k" "$KILL_ITEMS" "$DUP_BOUND"
  wait_rows $(( ITEMS + KILL_ITEMS ))
  dlqs_empty
  log "pod kill: rows $(( ITEMS + KILL_ITEMS )), DLQs empty"
fi

# --- 6. helm test ---------------------------------------------------------------------------------
phase "helm test (the chart's test hook)"
t0=$SECONDS
# The test pod is deleted once it succeeds (hook-delete-policy hook-succeeded, so that uninstall
# leaves no pod): helm's own verdict is read, and the pod's log only when it failed (then it is kept).
helm test "$REL" -n "$NS" --timeout 4m >"$work/helm-test.log" 2>&1 \
  || { cat "$work/helm-test.log" >&2; kn logs "$REL-streamoasis-test" --tail 40 >&2 2>&1; fail "helm test failed"; }
grep -Eq '^Phase: +Succeeded' "$work/helm-test.log" || { cat "$work/helm-test.log" >&2; fail "helm test: the test pod did not succeed"; }
figure "helm test: the chart's test pod (one probe item: tagged event with tags, then its row) Succeeded in $(( SECONDS - t0 ))s"

# --- --full ---------------------------------------------------------------------------------------
if [ "$FULL" = 1 ]; then
  # shellcheck source=lib/cluster-deploy-full.sh
  . "$SO_ROOT/scripts/lib/cluster-deploy-full.sh"
fi

# --- 7. helm uninstall ----------------------------------------------------------------------------
phase "helm uninstall: nothing left"
t0=$SECONDS
helm uninstall "$REL" -n "$NS" --wait --timeout 3m >"$work/uninstall.log" 2>&1 || { cat "$work/uninstall.log" >&2; fail "helm uninstall failed"; }
deadline=$(( SECONDS + 90 ))
while left=$(kn get pods,jobs -o name 2>/dev/null) && [ -n "$left" ]; do
  [ $SECONDS -lt $deadline ] || fail "helm uninstall left: $left"
  sleep 1
done
figure "helm uninstall: no pod or Job left after $(( SECONDS - t0 ))s"
k delete ns "$NS" --wait=false >/dev/null
if [ "$FULL" = 1 ] && [ ${#NOT_RUN[@]} -gt 0 ]; then
  printf 'not run: %s\n' "${NOT_RUN[@]}" >&2
  die "--full: ${#NOT_RUN[@]} check(s) did not run (above); everything else passed"
fi

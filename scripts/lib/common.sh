# shellcheck shell=bash
# Shared paths and helpers for the scripts in scripts/. Source it; do not run it.
#
# Two caches:
#   $SO_CACHE  large downloads shared by every clone on this machine (venv, service jars,
#              registry tarball, sample data), keyed by version so a second run downloads nothing.
#              Override with STREAMOASIS_CACHE.
#   $SO_LOCAL  per-clone state under the git-ignored .cache/ (stack data, logs, pid files, env file).

SO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SO_CACHE="${STREAMOASIS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamoasis}"
SO_LOCAL="$SO_ROOT/.cache"
SO_STACK="$SO_LOCAL/stack"
SO_ENV_FILE="$SO_STACK/env"

# Versions: change here, every cache key follows.
TORCH_VERSION="2.13.0"
KAFKA_VERSION="4.1.1"
CASSANDRA_VERSION="5.0.6"
APICURIO_VERSION="3.3.3"

SO_VENV="$SO_CACHE/venv-torch-$TORCH_VERSION"
SO_PY="$SO_VENV/bin/python"
SO_MODELS="$SO_ROOT/models"
SO_DATA="$SO_CACHE/data"

mkdir -p "$SO_CACHE" "$SO_LOCAL"

log()  { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33mwarning:\033[0m %s\n' "$*" >&2; }
die()  { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# need CMD "what to install" — a one-line message naming the missing prerequisite.
need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install $2 and run again."
}

# need_disk GB PATH... — fail early, naming the place and the size, when a filesystem holding one of
# PATHs has less than GB GiB free (a build that runs out of space half-way leaves a confusing error).
need_disk() {
  local gb=$1 p avail; shift
  for p in "$@"; do
    [ -e "$p" ] || continue
    avail=$(df -Pk "$p" | awk 'NR == 2 {print int($4 / 1048576)}')
    [ "${avail:-0}" -ge "$gb" ] \
      || die "only ${avail} GiB free on the filesystem of $p, this step needs ${gb} GiB: free some space (old clones' target/ folders, 'podman image prune -a') and run again."
  done
}

# Java 17+ is required by Kafka 4, Cassandra 5 and Apicurio 3.
need_java() {
  need java "a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
  local v
  v=$(java -version 2>&1 | awk -F'"' '/version/ {print $2}' | cut -d. -f1)
  [ "${v:-0}" -ge 17 ] || die "Java 17+ required, found '$v': install openjdk-17 and put it first on PATH (or set JAVA_HOME)."
}

# Environment for cargo: link against the venv's libtorch (tch) without LD_LIBRARY_PATH at run time.
cargo_env() {
  export VIRTUAL_ENV="$SO_VENV"
  export PATH="$SO_VENV/bin:$PATH"
  export LIBTORCH_USE_PYTORCH=1
}

# Load the stack's env file (KAFKA_BOOTSTRAP, SCHEMA_REGISTRY_URL, SCYLLA_URI) if it exists.
load_stack_env() {
  # shellcheck disable=SC1090
  [ -f "$SO_ENV_FILE" ] && . "$SO_ENV_FILE"
  export KAFKA_BOOTSTRAP="${KAFKA_BOOTSTRAP:-127.0.0.1:9092}"
  export SCHEMA_REGISTRY_URL="${SCHEMA_REGISTRY_URL:-http://127.0.0.1:8081/apis/ccompat/v7}"
  export SCYLLA_URI="${SCYLLA_URI:-127.0.0.1:9042}"
}

# The harness venv of the fault suite and the load sweep (Kafka, CQL and Avro clients), created
# once per requirements file under ~/.cache/streamoasis; prints its path.
faults_venv() {
  local req="$SO_ROOT/scripts/faults.d/requirements.txt" venv
  venv="$SO_CACHE/venv-faults-$(sha256sum "$req" | cut -c1-12)"
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    log "harness venv $venv" >&2
    need python3 "Python 3 (apt-get install python3 python3-venv)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    touch "$venv/.complete"
  fi
  echo "$venv"
}

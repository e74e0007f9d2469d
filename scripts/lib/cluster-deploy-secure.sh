# shellcheck shell=bash
# scripts/deploy-test --secure: the parts of the deploy test that only the secured stack has.
# Sourced by scripts/lib/cluster-deploy-test.sh (its variables and helpers: k, kn, fail, figure,
# phase, $BIN, $NS, $RUN_ID, $work, $STREAMOASIS_TOPOLOGY, the secure stack's env file loaded).
#
# secure_prepare  what a platform team does before `helm install` on a secured cluster:
#                 - the Secrets the chart references (deploy/cluster/values-local-secure.yaml), made
#                   from the secured stack's generated passwords and CA (.cache/stack/secure/);
#                 - the keyspace and the sink role's grants (a DBA's step: `topology apply` as the
#                   admin from this host, then GRANT SELECT, MODIFY to the sink role). The chart's
#                   hook Job applies the topology again, as the admin role, through the Secrets.
# secure_checks   after items flowed: no password appears in any object of the release (ConfigMaps,
#                 pod specs, env values), and each processor connected as its own principal
#                 (KAFKA_SASL_USERNAME from its own Secret; its log's connection line says SASL_SSL
#                 and that user).

SECURE_STATE="$SO_STACK/secure"

# secret_file NAME: the path of a generated password (fails naming the fix when absent).
secret_file() {
  local f="$SECURE_STATE/secrets/$1"
  [ -s "$f" ] || fail "no $f: the secured stack's passwords are made by scripts/stack up --secure"
  echo "$f"
}

# kube_secret NAME USERNAME PASSWORD_FILE: a Secret with username and password (from the file, its
# trailing newline dropped; nothing secret on a command line).
kube_secret() {
  local name=$1 user=$2 pwfile=$3 tmp
  tmp=$(mktemp "$work/pw.XXXXXX")
  tr -d '\n' <"$pwfile" >"$tmp"
  kn create secret generic "$name" --from-literal=username="$user" --from-file=password="$tmp" >/dev/null \
    || fail "creating Secret $name failed"
  rm -f "$tmp"
}

secure_prepare() {
  local ca="$SECURE_STATE/tls/ca.pem" ks tmp q
  [ -s "$ca" ] || fail "no $ca: the secured stack's CA is made by scripts/stack up --secure"
  phase "secure: Secrets for the chart, the keyspace and the sink role's grants"
  k create namespace "$NS" >/dev/null || fail "creating namespace $NS failed"
  kube_secret streamoasis-kafka-tagger tagger "$(secret_file kafka-tagger)"
  kube_secret streamoasis-kafka-sink sink "$(secret_file kafka-sink)"
  kube_secret streamoasis-kafka-admin admin "$(secret_file kafka-admin)"
  kube_secret streamoasis-cql-sink sink "$(secret_file cql-sink)"
  kube_secret streamoasis-cql-admin admin "$(secret_file cql-admin)"
  tmp=$(mktemp "$work/ui.XXXXXX")
  printf 'streamoasis:%s' "$(tr -d '\n' <"$(secret_file registry)")" >"$tmp"
  kn create secret generic streamoasis-registry --from-file=userInfo="$tmp" >/dev/null || fail "creating Secret streamoasis-registry failed"
  rm -f "$tmp"
  kn create secret generic streamoasis-stack-ca --from-file=ca.crt="$ca" >/dev/null || fail "creating Secret streamoasis-stack-ca failed"

  "$BIN" topology apply >"$work/apply.log" 2>&1 || { cat "$work/apply.log" >&2; fail "topology apply as the admin (host) failed"; }
  ks=$(yq 't["scylla"]["keyspace"]')
  q="$work/grants.cql"
  printf '%s\n' "GRANT SELECT ON KEYSPACE $ks TO sink" "GRANT MODIFY ON KEYSPACE $ks TO sink" >"$q"
  python3 "$SO_ROOT/deploy/local/probe.py" --timeout 15 --cafile "$ca" --user admin --password-file "$(secret_file cql-admin)" \
    cql "$SCYLLA_URI" "@$q" >"$work/grants.log" 2>&1 || { cat "$work/grants.log" >&2; fail "granting the sink role on $ks failed"; }
  log "secure: 7 Secrets in $NS; keyspace $ks with SELECT, MODIFY granted to the sink role"
}

secure_checks() {
  local f name leaks=0 objects user
  objects="$work/release-objects.yaml"
  { helm get manifest "$REL" -n "$NS"; helm get hooks "$REL" -n "$NS"; kn get pods,configmaps -o yaml; } >"$objects" 2>&1
  for f in kafka-tagger kafka-sink kafka-admin cql-sink cql-admin registry; do
    if grep -qF -- "$(tr -d '\n' <"$(secret_file "$f")")" "$objects"; then
      warn "the password of $f appears in an object of the release"
      leaks=$(( leaks + 1 ))
    fi
  done
  [ "$leaks" = 0 ] || fail "$leaks password(s) rendered into the release's objects (they must come from Secret volumes only)"
  for name in tagger sink; do
    user=$(kn get deploy -l app.kubernetes.io/component="$name" \
      -o jsonpath='{.items[0].spec.template.spec.containers[0].env[?(@.name=="KAFKA_SASL_USERNAME")].valueFrom.secretKeyRef.name}')
    [ "$user" = "streamoasis-kafka-$name" ] || fail "the $name's KAFKA_SASL_USERNAME comes from '$user', not its own Secret streamoasis-kafka-$name"
    # Its start-up line names the settings it connected with (never the password).
    kn logs "deploy/$REL-streamoasis-$name" >"$work/$name.log" 2>&1 || true
    grep -Eq "security_protocol.{0,24}SASL_SSL.*sasl_user.{0,24}\"$name\"" "$work/$name.log" \
      || { tail -n 20 "$work/$name.log" >&2; fail "the $name pod's log does not show SASL_SSL as user $name"; }
  done
  figure "secured: SASL_SSL + SCRAM-SHA-512 (principals tagger, sink, admin for the hook), registry over https with basic auth, CQL over TLS as role sink; no password in the release's manifests, hooks, pods or ConfigMaps"
}

{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "streamoasis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamoasis.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", within 63 characters. Call with (list $ "suffix"). */}}
{{- define "streamoasis.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "streamoasis.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamoasis.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamoasis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamoasis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamoasis.labels" -}}
helm.sh/chart: {{ include "streamoasis.chart" . }}
{{ include "streamoasis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamoasis
{{- end }}

{{- define "streamoasis.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamoasis.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "streamoasis.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Topology ---------------------------------------------------------------------------------- */}}

{{/* The topology text: values.topology.content, else files/topology.yaml; then the replication
     knob (replication.topics / replication.keyspace), embeddings.store / reuse and topologyOverrides
     applied over it. With
     none of them set the text is mounted verbatim (comments kept). */}}
{{- define "streamoasis.topology" -}}
{{- $text := .Values.topology.content | default (.Files.Get "files/topology.yaml") -}}
{{- if not (trim $text) -}}
{{- fail "topology.content is empty and the chart has no files/topology.yaml" -}}
{{- end -}}
{{- $repl := .Values.replication | default dict -}}
{{- $store := (.Values.embeddings | default dict).store -}}
{{- $reuse := (.Values.embeddings | default dict).reuse -}}
{{- if or .Values.topologyOverrides $repl.topics $repl.keyspace (not (kindIs "invalid" $store)) (not (kindIs "invalid" $reuse)) -}}
{{- $m := fromYaml $text -}}
{{- if hasKey $m "Error" -}}
{{- fail (printf "topology.content is not valid YAML: %v" $m.Error) -}}
{{- end -}}
{{- if $repl.topics -}}
{{- range $t := ($m.topics | default list) -}}
{{- $_ := set $t "replication_factor" (int64 $repl.topics) -}}
{{- end -}}
{{- end -}}
{{- if $repl.keyspace -}}
{{- $ks := $repl.keyspace -}}
{{- $map := dict "class" $ks.class -}}
{{- if eq $ks.class "SimpleStrategy" -}}
{{- $_ := set $map "replication_factor" (int64 (required "replication.keyspace.replicationFactor is required with class SimpleStrategy" $ks.replicationFactor)) -}}
{{- else -}}
{{- if not $ks.datacenters -}}
{{- fail "replication.keyspace.datacenters must name at least one datacenter with class NetworkTopologyStrategy" -}}
{{- end -}}
{{- range $dc := $ks.datacenters -}}
{{- $_ := set $map (toString $dc.name) (int64 $dc.replicas) -}}
{{- end -}}
{{- end -}}
{{- $scylla := $m.scylla | default dict -}}
{{- $_ := set $scylla "replication" $map -}}
{{- $_ := set $m "scylla" $scylla -}}
{{- end -}}
{{- if not (kindIs "invalid" $store) -}}
{{- $tagging := $m.tagging | default dict -}}
{{- $_ := set $tagging "store_embeddings" $store -}}
{{- $_ := set $m "tagging" $tagging -}}
{{- end -}}
{{- if not (kindIs "invalid" $reuse) -}}
{{- $tagging := $m.tagging | default dict -}}
{{- $_ := set $tagging "reuse_embeddings" $reuse -}}
{{- $_ := set $m "tagging" $tagging -}}
{{- end -}}
{{- toYaml (mergeOverwrite $m (deepCopy (.Values.topologyOverrides | default dict))) -}}
{{- else -}}
{{- $text -}}
{{- end -}}
{{- end }}

{{/* The parsed topology as JSON (fromJson it), failing on invalid YAML. */}}
{{- define "streamoasis.topologyJson" -}}
{{- $m := fromYaml (include "streamoasis.topology" .) -}}
{{- if hasKey $m "Error" -}}
{{- fail (printf "the topology is not valid YAML: %v" $m.Error) -}}
{{- end -}}
{{- toJson $m -}}
{{- end }}

{{/* Partitions of a processor's input topic, or "" when the topology does not say.
     Call with (dict "root" $ "component" "tagger"). */}}
{{- define "streamoasis.inputPartitions" -}}
{{- $topo := include "streamoasis.topologyJson" .root | fromJson -}}
{{- $procs := $topo.processors | default dict -}}
{{- $proc := get $procs .component | default dict -}}
{{- $input := $proc.input | default "" | toString -}}
{{- range $t := ($topo.topics | default list) -}}
{{- if and $input (eq (toString $t.name) $input) $t.partitions -}}
{{- int64 $t.partitions -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* A processor's drain_timeout in whole seconds (rounded up), or "" when not a simple duration. */}}
{{- define "streamoasis.drainSeconds" -}}
{{- $topo := include "streamoasis.topologyJson" .root | fromJson -}}
{{- $procs := $topo.processors | default dict -}}
{{- $proc := get $procs .component | default dict -}}
{{- $s := $proc.drain_timeout | default "30s" | toString | trim -}}
{{- $n := regexFind "^[0-9]+" $s | default "0" | int64 -}}
{{- if regexMatch "^[0-9]+ms$" $s -}}
{{- div (add $n 999) 1000 -}}
{{- else if regexMatch "^[0-9]+ ?(s|sec|secs|seconds?)$" $s -}}
{{- $n -}}
{{- else if regexMatch "^[0-9]+ ?(m|min|mins|minutes?)$" $s -}}
{{- mul $n 60 -}}
{{- else if regexMatch "^[0-9]+ ?(h|hr|hrs|hours?)$" $s -}}
{{- mul $n 3600 -}}
{{- end -}}
{{- end }}

{{/* Perl program of the render-topology init container: expands ${VAR} from the environment,
     YAML-safely: a placeholder that is a whole value ("${VAR}", '${VAR}' or a bare ${VAR}) becomes a
     quoted string whatever characters the value holds; inside a longer scalar it is inserted as is.
     An unset variable is an error. */}}
{{- define "streamoasis.envsubstScript" -}}
use strict; use warnings;
my ($src, $dst) = @ARGV;
my %missing;
sub val { my $n = shift; return $ENV{$n} if defined $ENV{$n}; $missing{$n} = 1; return ''; }
sub dq {
  my $v = shift;
  $v =~ s/\\/\\\\/g; $v =~ s/"/\\"/g;
  $v =~ s/([\x00-\x1f\x7f])/sprintf('\\x%02x', ord($1))/ge;
  return '"' . $v . '"';
}
sub sq { my $v = shift; $v =~ s/'/''/g; return "'" . $v . "'"; }
open(my $in, '<', $src) or die "render-topology: cannot read $src: $!\n";
my $text = do { local $/; <$in> };
my $name = qr/([A-Za-z_][A-Za-z0-9_]*)/;
$text =~ s/"\$\{$name\}"/dq(val($1))/ge;
$text =~ s/'\$\{$name\}'/sq(val($1))/ge;
$text =~ s/(?<=[:-] )\$\{$name\}(?=[ \t]*(?:[,}\]]|#|$))/dq(val($1))/gme;
$text =~ s/\$\{$name\}/val($1)/ge;
die "render-topology: unset variables: " . join(', ', sort keys %missing) . " (set them with env or envFrom)\n" if %missing;
open(my $out, '>', $dst) or die "render-topology: cannot write $dst: $!\n";
print $out $text;
close($out) or die "render-topology: cannot write $dst: $!\n";
print "render-topology: wrote $dst\n";
{{- end }}

{{/* Containers --------------------------------------------------------------------------------- */}}

{{/* Environment of every streamoasis container. */}}
{{- define "streamoasis.env" -}}
- name: KAFKA_BOOTSTRAP
  value: {{ required "kafka.bootstrap is required" .Values.kafka.bootstrap | quote }}
- name: SCHEMA_REGISTRY_URL
  value: {{ required "schemaRegistry.url is required" .Values.schemaRegistry.url | quote }}
- name: SCYLLA_URI
  value: {{ required "scylla.uri is required" .Values.scylla.uri | quote }}
- name: STREAMOASIS_TOPOLOGY
  value: /etc/streamoasis/topology.yaml
- name: RUST_LOG
  value: {{ .Values.log.level | quote }}
{{- /* Always set: the image defaults to json, so text must be asked for explicitly. */}}
- name: STREAMOASIS_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- with .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: HOME
  value: /tmp
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The ConfigMap volume (and, with envSubst, the rendered copy). Call with (list $ "configmap-name"). */}}
{{- define "streamoasis.topologyVolumes" -}}
{{- $root := index . 0 -}}
- name: topology
  configMap:
    name: {{ index . 1 }}
    items:
      - key: topology.yaml
        path: topology.yaml
{{- if $root.Values.topology.envSubst }}
- name: topology-rendered
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $root.Values.tmpDir.sizeLimit }}
{{- with $root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The topology file at /etc/streamoasis/topology.yaml (a single-file mount: the image's
     /etc/streamoasis/schemas and /etc/streamoasis/models stay visible), /tmp, extra mounts. */}}
{{- define "streamoasis.topologyMounts" -}}
- name: {{ ternary "topology-rendered" "topology" .Values.topology.envSubst }}
  mountPath: /etc/streamoasis/topology.yaml
  subPath: topology.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Init container that expands ${VAR} in the topology (topology.envSubst). */}}
{{- define "streamoasis.renderTopologyInit" -}}
- name: render-topology
  image: {{ include "streamoasis.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - perl
    - -e
    - |
      {{- include "streamoasis.envsubstScript" . | nindent 6 }}
    - /etc/streamoasis-template/topology.yaml
    - /rendered/topology.yaml
  env:
    {{- include "streamoasis.env" . | nindent 4 }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: topology
      mountPath: /etc/streamoasis-template
      readOnly: true
    - name: topology-rendered
      mountPath: /rendered
{{- end }}

{{/* Security: Secret references -------------------------------------------------------------------
     Every credential comes from an existing Secret; nothing secret is rendered into a ConfigMap or
     an env value. Usernames are env from secretKeyRef; passwords and CA bundles are files from
     Secret volumes under /etc/streamoasis/secrets/<name>/ (the processors read *_FILE variables),
     so a rotated Secret reaches the file without re-rendering the pod spec.
     Roles: "tagger", "sink", "topologyApply" (each its own Kafka principal; the tagger needs no
     CQL credentials). Call each with (list $ role). */}}

{{/* The Secret-backed volumes a role needs: a list of (name, secretName, key, file, envVar). */}}
{{- define "streamoasis.secretFiles" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $files := list -}}
{{- $kc := get ($root.Values.kafka.credentials | default dict) $role | default dict -}}
{{- if $kc.secretName -}}
{{- $files = append $files (dict "name" "kafka-credentials" "secretName" $kc.secretName "key" ($kc.passwordKey | default "password") "file" "password" "env" "KAFKA_SASL_PASSWORD_FILE") -}}
{{- end -}}
{{- with ($root.Values.kafka.ca | default dict) -}}
{{- if .secretName -}}
{{- $files = append $files (dict "name" "kafka-ca" "secretName" .secretName "key" (.key | default "ca.crt") "file" "ca.crt" "env" "KAFKA_SSL_CA_LOCATION") -}}
{{- end -}}
{{- end -}}
{{- if or (ne $role "tagger") ($root.Values.embeddings | default dict).store -}}
{{- $sc := get ($root.Values.scylla.credentials | default dict) $role | default dict -}}
{{- if $sc.secretName -}}
{{- $files = append $files (dict "name" "scylla-credentials" "secretName" $sc.secretName "key" ($sc.passwordKey | default "password") "file" "password" "env" "SCYLLA_PASSWORD_FILE") -}}
{{- end -}}
{{- with ($root.Values.scylla.ca | default dict) -}}
{{- if .secretName -}}
{{- $files = append $files (dict "name" "scylla-ca" "secretName" .secretName "key" (.key | default "ca.crt") "file" "ca.crt" "env" "SCYLLA_CA") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with ($root.Values.schemaRegistry.ca | default dict) -}}
{{- if .secretName -}}
{{- $files = append $files (dict "name" "registry-ca" "secretName" .secretName "key" (.key | default "ca.crt") "file" "ca.crt" "env" "SCHEMA_REGISTRY_CA") -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "files" $files) -}}
{{- end }}

{{/* Environment for a role's security settings (plain values, secretKeyRef usernames, *_FILE paths). */}}
{{- define "streamoasis.securityEnv" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- with $root.Values.kafka.securityProtocol }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.kafka.saslMechanism }}
- name: KAFKA_SASL_MECHANISM
  value: {{ . | quote }}
{{- end }}
{{- $kc := get ($root.Values.kafka.credentials | default dict) $role | default dict }}
{{- if $kc.secretName }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $kc.secretName }}
      key: {{ $kc.usernameKey | default "username" }}
{{- end }}
{{- if or (ne $role "tagger") ($root.Values.embeddings | default dict).store }}
{{- $sc := get ($root.Values.scylla.credentials | default dict) $role | default dict }}
{{- if $sc.secretName }}
- name: SCYLLA_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $sc.secretName }}
      key: {{ $sc.usernameKey | default "username" }}
{{- end }}
{{- end }}
{{- with ($root.Values.schemaRegistry.credentials | default dict) }}
{{- if .secretName }}
- name: SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key | default "userInfo" }}
{{- end }}
{{- end }}
{{- range $f := (include "streamoasis.secretFiles" . | fromJson).files }}
- name: {{ $f.env }}
  value: {{ printf "/etc/streamoasis/secrets/%s/%s" $f.name $f.file | quote }}
{{- end }}
{{- end }}

{{/* Secret volumes of a role. */}}
{{- define "streamoasis.securityVolumes" -}}
{{- range $f := (include "streamoasis.secretFiles" . | fromJson).files }}
- name: {{ $f.name }}
  secret:
    secretName: {{ $f.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $f.key }}
        path: {{ $f.file }}
{{- end }}
{{- end }}

{{/* Secret volume mounts of a role. */}}
{{- define "streamoasis.securityMounts" -}}
{{- range $f := (include "streamoasis.secretFiles" . | fromJson).files }}
- name: {{ $f.name }}
  mountPath: /etc/streamoasis/secrets/{{ $f.name }}
  readOnly: true
{{- end }}
{{- end }}

# shellcheck shell=bash
# Pinned, cached builds of the one-node Kubernetes that scripts/cluster runs. Sourced by
# scripts/cluster (after lib/common.sh). Everything is built from the Go module registry's sources
# with the local Go toolchain; each component lands in
#   $SO_CACHE/cluster/<component>-<version>/bin/
# and is marked complete by a stamp file, so a second run builds nothing. Bump a version below and
# only that component rebuilds. Builds run at nice 19 with CLUSTER_BUILD_JOBS (default 2) parallel
# compiles; a link of the Kubernetes binary needs about 2 GB of memory.
#
# Components (and why they are built this way):
#   kube             k8s.io/kubernetes has `replace` directives, so `go install pkg@version` refuses
#                    it: a wrapper module requires it and pins each staging module (k8s.io/api, ...)
#                    to the matching v0.x. One multi-call binary (dispatch on argv[0]) holds
#                    kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl:
#                    one link instead of five. The wrapper module also builds etcd (the version
#                    Kubernetes itself requires), sharing the compiled packages.
#   metrics-server   from the module's own go.mod (see build_metrics_server).
#   containerd       containerd, containerd-shim-runc-v2 and ctr from the module's own go.mod.
#   cni              bridge, host-local, loopback, portmap from containernetworking/plugins.
#   keda             KEDA's operator and metrics API server from the module's own go.mod (it pins
#                    its own k8s.io versions with replace directives, so it cannot share the wrapper).
# runc comes from apt (scripts/cluster installs it).

K8S_VERSION="v1.34.4"
K8S_STAGING_VERSION="v0.34.4"
ETCD_VERSION="v3.6.4"            # what k8s.io/kubernetes v1.34.4 requires
METRICS_SERVER_VERSION="v0.8.0"
CONTAINERD_VERSION="v2.4.2"
CNI_PLUGINS_VERSION="v1.10.0"
KEDA_VERSION="v2.20.2"           # pins k8s.io v0.35; talks to a 1.34 API server

CLUSTER_CACHE="$SO_CACHE/cluster"
KUBE_DIR="$CLUSTER_CACHE/kube-$K8S_VERSION-etcd-$ETCD_VERSION"
METRICS_SERVER_DIR="$CLUSTER_CACHE/metrics-server-$METRICS_SERVER_VERSION"
CONTAINERD_DIR="$CLUSTER_CACHE/containerd-$CONTAINERD_VERSION"
CNI_DIR="$CLUSTER_CACHE/cni-plugins-$CNI_PLUGINS_VERSION"
KEDA_DIR="$CLUSTER_CACHE/keda-$KEDA_VERSION"

K8S_STAGING_MODULES=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
  endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler
  kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver sample-cli-plugin
  sample-controller)

_gobuild() { # _gobuild ARGS... : go build at low priority, static
  CGO_ENABLED="${CGO_ENABLED:-0}" GOFLAGS="-buildvcs=false -p=${CLUSTER_BUILD_JOBS:-2}" \
    nice -n 19 go build -trimpath "$@"
}

# Copy a module's source out of the read-only module cache into a writable build folder.
_module_src() { # _module_src MODULE VERSION DEST
  local dir
  dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] && [ -d "$dir" ] || die "go mod download $1@$2 failed"
  rm -rf "$3"; mkdir -p "$(dirname "$3")"
  cp -r "$dir" "$3"; chmod -R u+w "$3"
}

# One build of a component at a time (scripts/cluster up may run beside a warm-up build).
_locked() {
  mkdir -p "$CLUSTER_CACHE"
  ( flock 9; "$@" ) 9>"$CLUSTER_CACHE/.build.$1.lock"
}
_done() { [ -f "$1/.complete" ]; }
_finish() { # _finish DIR SECONDS_START
  echo "built $(date -u +%FT%TZ) in $(( SECONDS - $2 ))s" >"$1/.complete"
  log "built $(basename "$1") in $(( SECONDS - $2 ))s"
}

build_kube() { _locked _build_kube; }
_build_kube() {
  _done "$KUBE_DIR" && return 0
  need go "Go (the toolchain that builds the cluster)"
  local t0=$SECONDS src="$CLUSTER_CACHE/src/kube-$K8S_VERSION" m
  log "building Kubernetes $K8S_VERSION and etcd $ETCD_VERSION (cold: tens of minutes)"
  rm -rf "$src"; mkdir -p "$src/cmd/kube" "$src/cmd/etcd"
  {
    echo "module streamoasis.local/cluster"
    echo
    echo "go 1.24.0"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo ")"
    echo
    echo "replace ("
    for m in "${K8S_STAGING_MODULES[@]}"; do echo "	k8s.io/$m => k8s.io/$m $K8S_STAGING_VERSION"; done
    echo ")"
  } >"$src/go.mod"
  cat >"$src/cmd/kube/main.go" <<'EOF'
// Command kube is kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl in
// one binary; it runs the one its name (argv[0], a symlink) says.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata"

	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	switch name := filepath.Base(os.Args[0]); name {
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "kubectl":
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) // nolint:errcheck
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "kube: run me as kube-apiserver, kube-controller-manager, kube-scheduler, kubelet or kubectl (not %q)\n", name)
		os.Exit(2)
	}
}
EOF
  cat >"$src/cmd/etcd/main.go" <<'EOF'
// Command etcd is etcd's server at the version Kubernetes requires.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "$src" && GOFLAGS=-mod=mod nice -n 19 go mod tidy) || die "go mod tidy (kube wrapper) failed"
  local vpkg ld="-s -w" d major minor
  d=$(date -u +%FT%TZ)
  major=$(echo "${K8S_VERSION#v}" | cut -d. -f1); minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor"
    ld+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$d"
  done
  local out="$KUBE_DIR.partial"
  rm -rf "$out"; mkdir -p "$out/bin"
  (cd "$src" && _gobuild -o "$out/bin/etcd" ./cmd/etcd) || die "etcd build failed"
  log "etcd built ($(( SECONDS - t0 ))s)"
  (cd "$src" && _gobuild -ldflags "$ld" -o "$out/bin/kube" ./cmd/kube) || die "Kubernetes build failed"
  log "kube built ($(( SECONDS - t0 ))s)"
  for m in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do ln -sf kube "$out/bin/$m"; done
  rm -rf "$KUBE_DIR"; mv "$out" "$KUBE_DIR"
  _finish "$KUBE_DIR" "$t0"
}

build_containerd() { _locked _build_containerd; }
_build_containerd() {
  _done "$CONTAINERD_DIR" && return 0
  need go "Go (the toolchain that builds the cluster)"
  local t0=$SECONDS src="$CLUSTER_CACHE/src/containerd-$CONTAINERD_VERSION" out="$CONTAINERD_DIR.partial" c
  log "building containerd $CONTAINERD_VERSION"
  _module_src github.com/containerd/containerd/v2 "$CONTAINERD_VERSION" "$src"
  rm -rf "$out"; mkdir -p "$out/bin"
  for c in containerd containerd-shim-runc-v2 ctr; do
    (cd "$src" && _gobuild -mod=mod -tags "no_btrfs no_devmapper no_zfs" \
      -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
      -o "$out/bin/$c" "./cmd/$c") || die "containerd build ($c) failed"
  done
  rm -rf "$CONTAINERD_DIR"; mv "$out" "$CONTAINERD_DIR"
  _finish "$CONTAINERD_DIR" "$t0"
}

build_cni() { _locked _build_cni; }
_build_cni() {
  _done "$CNI_DIR" && return 0
  need go "Go (the toolchain that builds the cluster)"
  local t0=$SECONDS src="$CLUSTER_CACHE/src/cni-plugins-$CNI_PLUGINS_VERSION" out="$CNI_DIR.partial" p
  log "building CNI plugins $CNI_PLUGINS_VERSION"
  _module_src github.com/containernetworking/plugins "$CNI_PLUGINS_VERSION" "$src"
  rm -rf "$out"; mkdir -p "$out/bin"
  for p in main/bridge main/loopback ipam/host-local meta/portmap; do
    (cd "$src" && _gobuild -mod=mod -ldflags "-s -w" -o "$out/bin/$(basename "$p")" "./plugins/$p") \
      || die "CNI plugin build ($p) failed"
  done
  rm -rf "$CNI_DIR"; mv "$out" "$CNI_DIR"
  _finish "$CNI_DIR" "$t0"
}

# metrics-server pins k8s.io v0.33 and, in the wrapper module, makes an ambiguous import of
# cloud.google.com/go/compute/metadata: it builds from its own go.mod.
build_metrics_server() { _locked _build_metrics_server; }
_build_metrics_server() {
  _done "$METRICS_SERVER_DIR" && return 0
  need go "Go (the toolchain that builds the cluster)"
  local t0=$SECONDS src="$CLUSTER_CACHE/src/metrics-server-$METRICS_SERVER_VERSION" out="$METRICS_SERVER_DIR.partial"
  log "building metrics-server $METRICS_SERVER_VERSION"
  _module_src sigs.k8s.io/metrics-server "$METRICS_SERVER_VERSION" "$src"
  rm -rf "$out"; mkdir -p "$out/bin"
  (cd "$src" && _gobuild -mod=mod -ldflags "-s -w" -o "$out/bin/metrics-server" ./cmd/metrics-server) \
    || die "metrics-server build failed"
  rm -rf "$METRICS_SERVER_DIR"; mv "$out" "$METRICS_SERVER_DIR"
  _finish "$METRICS_SERVER_DIR" "$t0"
}

build_keda() { _locked _build_keda; }
_build_keda() {
  _done "$KEDA_DIR" && return 0
  need go "Go (the toolchain that builds the cluster)"
  local t0=$SECONDS src="$CLUSTER_CACHE/src/keda-$KEDA_VERSION" out="$KEDA_DIR.partial" c
  log "building KEDA $KEDA_VERSION (cold: the largest build here)"
  _module_src github.com/kedacore/keda/v2 "$KEDA_VERSION" "$src"
  rm -rf "$out"; mkdir -p "$out/bin" "$out/crds"
  for c in operator adapter; do
    (cd "$src" && _gobuild -mod=mod \
      -ldflags "-s -w -X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}" \
      -o "$out/bin/keda-$c" "./cmd/$c") || die "KEDA build ($c) failed"
  done
  cp "$src"/config/crd/bases/*.yaml "$out/crds/"
  rm -rf "$KEDA_DIR"; mv "$out" "$KEDA_DIR"
  _finish "$KEDA_DIR" "$t0"
}

build_cluster() { # build_cluster [--no-keda|--core]: --core is what `scripts/cluster up --core` runs
  case "${1:-}" in ""|--no-keda|--core) ;; *) die "unknown option $1 (build [--no-keda|--core])" ;; esac
  build_cni
  build_containerd
  build_kube
  [ "${1:-}" = --core ] || build_metrics_server
  [ "${1:-}" = --core ] || [ "${1:-}" = --no-keda ] || build_keda
}

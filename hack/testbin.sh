#!/usr/bin/env bash
# Provides the real control-plane binaries the tests and the local mode run against:
# kube-apiserver, kubectl, etcd and kwok. Honours KUBEBUILDER_ASSETS (kube-apiserver, etcd,
# kubectl found there are used as they are); anything missing is built once from the Go module
# proxy into a cache outside the repo and reused. Prints the directory holding all four binaries.
#
# Deployment and observability tooling is built only on request, by name:
# `bash hack/testbin.sh helm promtool jaeger` builds (or reuses) just those and prints the same
# directory as its last line.
set -euo pipefail

K8S_VERSION=${JOBTREE_K8S_VERSION:-v1.34.4}
ETCD_VERSION=${JOBTREE_ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${JOBTREE_KWOK_VERSION:-v0.7.0}
HELM_VERSION=${JOBTREE_HELM_VERSION:-v3.22.0}
# Prometheus publishes its Go module as v0.<major><minor>.<patch>: v0.316.0 is Prometheus 3.16.0.
PROMETHEUS_MODULE_VERSION=${JOBTREE_PROMETHEUS_MODULE_VERSION:-v0.316.0}
# Jaeger's Go module keeps v1 tags; v1.76.0 is the Jaeger v2 binary (OTel collector based).
JAEGER_VERSION=${JOBTREE_JAEGER_VERSION:-v1.76.0}
CACHE=${JOBTREE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobtree}
BIN="$CACHE/bin"
mkdir -p "$BIN"

say() { echo "testbin: $*" >&2; }

staging_replaces() {
  # k8s.io/kubernetes points its staging modules at ./staging; a consumer must pin them itself.
  local minor="v0.${K8S_VERSION#v1.}"
  local mod
  for mod in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go \
    cloud-provider cluster-bootstrap code-generator component-base component-helpers \
    controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation \
    endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy \
    kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission \
    sample-apiserver sample-cli-plugin sample-controller; do
    echo "replace k8s.io/$mod => k8s.io/$mod $minor"
  done
}

# build NAME VERSION MODULE@VERSION PACKAGE [LDFLAGS] [EXTRA_GO_MOD_LINES] [BUILD_TAGS]
build() {
  local name=$1 version=$2 modver=$3 pkg=$4 ldflags=${5:-} extra=${6:-} tags=${7:-}
  local out="$BIN/$name-$version"
  if [[ -x "$out" ]]; then
    ln -sf "$out" "$BIN/$name"
    return
  fi
  local src="$CACHE/src/$name-$version"
  rm -rf "$src" && mkdir -p "$src"
  say "building $name $version from the Go module proxy into $out (first time only)"
  local start=$SECONDS
  (
    cd "$src"
    printf 'module jobtree.local/testbin/%s\n\ngo 1.24\n\n%s\n' "$name" "$extra" > go.mod
    GOFLAGS=-mod=mod go get "$modver" >&2
    # flags that depend on the resolved module graph (e.g. helm's Kubernetes version)
    if declare -F "resolved_ldflags_$name" >/dev/null; then
      ldflags="$ldflags $("resolved_ldflags_$name")"
    fi
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "-s -w $ldflags" \
      -o "$out.tmp" "$pkg" >&2
  )
  mv "$out.tmp" "$out"
  ln -sf "$out" "$BIN/$name"
  say "built $name $version in $((SECONDS - start))s"
}

link_asset() {
  local name=$1
  if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$name" ]]; then
    ln -sf "$KUBEBUILDER_ASSETS/$name" "$BIN/$name"
    say "using $name from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    return 0
  fi
  return 1
}

k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f
  for f in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s ' "$f" "$K8S_VERSION" "$f" "$f" "$minor"
  done
}

resolved_ldflags_helm() {
  # helm's default .Capabilities.KubeVersion (helm template, helm lint) follows the client-go it
  # is built with, as its own Makefile does; without this it claims Kubernetes v1.20.
  local client_go major minor
  client_go=$(GOFLAGS=-mod=mod go list -m -f '{{.Version}}' k8s.io/client-go)
  client_go=${client_go#v}
  major=$((${client_go%%.*} + 1))
  minor=${client_go#*.}; minor=${minor%%.*}
  local p
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    printf -- '-X %s.k8sVersionMajor=%s -X %s.k8sVersionMinor=%s ' "$p" "$major" "$p" "$minor"
  done
}

prometheus_version() {
  # v0.316.0 -> 3.16.0
  local rest=${PROMETHEUS_MODULE_VERSION#v0.}
  local mm=${rest%%.*} patch=${rest#*.}
  echo "$((mm / 100)).$((mm % 100)).$patch"
}

build_helm() {
  link_asset helm || build helm "$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
}

build_promtool() {
  local version
  version=$(prometheus_version)
  link_asset promtool || build promtool "v$version" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" \
    github.com/prometheus/prometheus/cmd/promtool \
    "-X github.com/prometheus/common/version.Version=$version -X github.com/prometheus/common/version.Branch=release" \
    "" remove_all_sd  # no service-discovery plugins: `check rules|metrics` need none, builds faster
}

build_jaeger() {
  # all-in-one: OTLP receivers, in-memory storage, query API/UI. Jaeger's own go.mod pins sarama
  # with a replace, which a consumer must repeat. No `ui` tag: the query API needs no UI assets.
  link_asset jaeger || build jaeger "$JAEGER_VERSION" \
    "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION" \
    github.com/jaegertracing/jaeger/cmd/jaeger \
    "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" \
    "replace github.com/Shopify/sarama => github.com/Shopify/sarama v1.33.0"
}

if [[ $# -gt 0 ]]; then
  for tool in "$@"; do
    case "$tool" in
      helm) build_helm ;;
      promtool) build_promtool ;;
      jaeger) build_jaeger ;;
      *) echo "testbin: unknown tool '$tool' (on request: helm, promtool, jaeger)" >&2; exit 2 ;;
    esac
  done
  say "versions: helm $HELM_VERSION, promtool $(prometheus_version), jaeger $JAEGER_VERSION; cache $BIN"
  echo "$BIN"
  exit 0
fi

link_asset kube-apiserver || build kube-apiserver "$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
  k8s.io/kubernetes/cmd/kube-apiserver "$(k8s_ldflags)" "$(staging_replaces)"
link_asset kubectl || build kubectl "$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" \
  k8s.io/kubernetes/cmd/kubectl "$(k8s_ldflags)" "$(staging_replaces)"
link_asset etcd || build etcd "$ETCD_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
build kwok "$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok

say "versions: kube-apiserver/kubectl $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION; cache $BIN"
echo "$BIN"

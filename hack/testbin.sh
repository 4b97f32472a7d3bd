#!/usr/bin/env bash
# Provides the real control-plane binaries the tests and the local mode run against:
# kube-apiserver, kubectl, etcd and kwok. Honours KUBEBUILDER_ASSETS (kube-apiserver, etcd,
# kubectl found there are used as they are); anything missing is built once from the Go module
# proxy into a cache outside the repo and reused. Prints the directory holding all four binaries.
set -euo pipefail

K8S_VERSION=${JOBTREE_K8S_VERSION:-v1.34.4}
ETCD_VERSION=${JOBTREE_ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${JOBTREE_KWOK_VERSION:-v0.7.0}
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

# build NAME VERSION MODULE@VERSION PACKAGE [LDFLAGS] [EXTRA_GO_MOD_LINES]
build() {
  local name=$1 version=$2 modver=$3 pkg=$4 ldflags=${5:-} extra=${6:-}
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
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg" >&2
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

link_asset kube-apiserver || build kube-apiserver "$K8S_VERSION" "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
  k8s.io/kubernetes/cmd/kube-apiserver "$(k8s_ldflags)" "$(staging_replaces)"
link_asset kubectl || build kubectl "$K8S_VERSION" "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" \
  k8s.io/kubernetes/cmd/kubectl "$(k8s_ldflags)" "$(staging_replaces)"
link_asset etcd || build etcd "$ETCD_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
build kwok "$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok

say "versions: kube-apiserver/kubectl $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION; cache $BIN"
echo "$BIN"

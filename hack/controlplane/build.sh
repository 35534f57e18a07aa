#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kubectl) and helm from
# Go modules with the machine's Go toolchain, at the versions pinned in
# hack/controlplane/go.mod and below. Binaries are cached outside the checkout,
# keyed by version, so only the first build on a machine is slow:
#   ~/.cache/vmstream/bin-<kubernetes version>/{etcd,kube-apiserver,kubectl}
#   ~/.cache/vmstream/helm-<helm version>/helm
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
k8s_version="$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' "$here/go.mod")"
helm_version="${HELM_VERSION:-v3.22.0}"
cache="${VMSTREAM_CACHE:-$HOME/.cache/vmstream}"
bin="$cache/bin-$k8s_version"
mkdir -p "$bin"
export GOFLAGS="${GOFLAGS:--buildvcs=false} -mod=mod"

minor="${k8s_version#v1.}"; minor="${minor%%.*}"
vpkg=k8s.io/component-base/version
ldflags="-s -X $vpkg.gitVersion=$k8s_version -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

build() { # name package
    if [[ -x "$bin/$1" ]]; then return; fi
    echo "building $1 $k8s_version from Go modules (first time only; several minutes)" >&2
    (cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$bin/$1.tmp" "$2")
    mv "$bin/$1.tmp" "$bin/$1"
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kubectl k8s.io/kubernetes/cmd/kubectl

helm_dir="$cache/helm-$helm_version"
if [[ ! -x "$helm_dir/helm" ]]; then
    echo "building helm $helm_version from Go modules (first time only)" >&2
    mkdir -p "$helm_dir"
    GOBIN="$helm_dir" go install -trimpath -ldflags=-s "helm.sh/helm/v3/cmd/helm@$helm_version"
fi
echo "$bin"

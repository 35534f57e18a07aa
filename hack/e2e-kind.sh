#!/usr/bin/env bash
# `make e2e-kind`: the cluster-level end-to-end suite against vmstream
# installed by its Helm chart in a kind cluster on this machine.
#
#   1. checks the tools (docker, kind, kubectl, helm, cargo) and the host
#      devices (/dev/kvm, /dev/userfaultfd), failing with what is missing;
#   2. creates (or reuses) kind cluster $VMSTREAM_KIND_CLUSTER (default vmstream-e2e): one
#      control-plane and $VMSTREAM_KIND_WORKERS workers (default 2), each node
#      getting /dev/kvm and /dev/userfaultfd through extraMounts;
#   3. builds the image (hack/image/Dockerfile) as $VMSTREAM_IMAGE (default
#      vmstream/vmstream:kind-e2e) and loads it into the kind nodes;
#   4. installs charts/vmstream with that image and waits for the operator and
#      the node daemons;
#   5. runs `cargo test -p vmstream-e2e --test any_cluster_e2e` with
#      VMSTREAM_E2E_KUBECONFIG pointing at the kind cluster.
# The cluster is deleted at the end unless VMSTREAM_KIND_KEEP=1.
#
# `hack/e2e-kind.sh --template` only renders the chart with the values used
# here (needs helm, nothing else), to check them without Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${VMSTREAM_KIND_CLUSTER:-vmstream-e2e}"
workers="${VMSTREAM_KIND_WORKERS:-2}"
image="${VMSTREAM_IMAGE:-vmstream/vmstream:kind-e2e}"
namespace="${VMSTREAM_KIND_NAMESPACE:-vmstream-system}"
# helm: $VMSTREAM_HELM (set by make), the cached build of `make deps`, or PATH.
helm="${VMSTREAM_HELM:-${VMSTREAM_CACHE:-$HOME/.cache/vmstream}/helm-${HELM_VERSION:-v3.22.0}/helm}"
[[ -x "$helm" ]] || helm="$(command -v helm || true)"

die() { echo "e2e-kind: $*" >&2; exit 1; }

# The chart values for kind: the image just built and loaded (never pulled),
# quick heartbeats so a lost node shows within seconds, no reserved memory
# beyond 256 MiB (kind nodes share the host's memory).
helm_values() {
    local repo="${image%:*}" tag="${image##*:}"
    printf '%s\n' \
        --set "image.repository=$repo" \
        --set "image.tag=$tag" \
        --set image.pullPolicy=Never \
        --set operator.replicas=1 \
        --set operator.heartbeatTimeoutSeconds=10 \
        --set operator.autoscaleIntervalSeconds=2 \
        --set node.heartbeatIntervalSeconds=2 \
        --set node.reservedMemoryMiB=256
}

kind_config() {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    echo "nodes:"
    echo "  - role: control-plane"
    for _ in $(seq "$workers"); do
        cat <<'EOF'
  - role: worker
    extraMounts:
      - { hostPath: /dev/kvm, containerPath: /dev/kvm }
      - { hostPath: /dev/userfaultfd, containerPath: /dev/userfaultfd }
EOF
    done
}

if [[ "${1:-}" == "--template" ]]; then
    [[ -n "$helm" ]] || die "helm not found (set VMSTREAM_HELM or put helm on PATH)"
    mapfile -t values < <(helm_values)
    exec "$helm" template vmstream charts/vmstream -n "$namespace" \
        --kube-version "${VMSTREAM_TEMPLATE_KUBE_VERSION:-v1.36.0}" "${values[@]}"
fi
if [[ "${1:-}" == "--kind-config" ]]; then
    kind_config
    exit 0
fi

# 1. Tools and devices.
missing=()
for tool in docker kind kubectl cargo; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ -n "$helm" ]] || missing+=("helm")
if ((${#missing[@]})); then
    die "missing: ${missing[*]}. kind mode needs Docker (https://docs.docker.com/engine/install/), kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation), kubectl and helm; without them run the local suite: make e2e"
fi
docker info >/dev/null 2>&1 || die "docker is installed but the daemon does not answer (is it running, may this user use it?)"
for dev in /dev/kvm /dev/userfaultfd; do
    [[ -c "$dev" ]] || die "$dev is missing on this host: VMs need KVM and userfaultfd (Linux >= 6.1); kind nodes get them from the host"
done

# 2. The kind cluster.
kubeconfig="$(mktemp /tmp/vmstream-kind-kubeconfig.XXXXXX)"
cleanup() {
    if [[ "${VMSTREAM_KIND_KEEP:-0}" != 1 ]]; then
        kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
        rm -f "$kubeconfig"
    else
        echo "e2e-kind: kept cluster $cluster (kubeconfig $kubeconfig); delete with: kind delete cluster --name $cluster"
    fi
}
trap cleanup EXIT
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    # The chart needs Kubernetes >= 1.33: kind >= v0.29 defaults to such a
    # node image; VMSTREAM_KIND_NODE_IMAGE picks another (kindest/node:vX.Y.Z).
    node_image=()
    [[ -z "${VMSTREAM_KIND_NODE_IMAGE:-}" ]] || node_image=(--image "$VMSTREAM_KIND_NODE_IMAGE")
    kind_config | kind create cluster --name "$cluster" --config - --wait 120s "${node_image[@]}"
fi
kind get kubeconfig --name "$cluster" > "$kubeconfig"
export KUBECONFIG="$kubeconfig"

# 3. The image, loaded into the nodes.
DOCKER_BUILDKIT=1 docker build -f hack/image/Dockerfile -t "$image" .
kind load docker-image "$image" --name "$cluster"

# 4. The chart.
mapfile -t values < <(helm_values)
"$helm" upgrade --install vmstream charts/vmstream -n "$namespace" --create-namespace \
    "${values[@]}" --wait --timeout 5m
kubectl -n "$namespace" rollout status deployment -l app.kubernetes.io/component=operator --timeout=120s
kubectl -n "$namespace" rollout status daemonset -l app.kubernetes.io/component=node --timeout=180s
kubectl get vmnodes

# 5. The suite in existing-cluster mode.
export VMSTREAM_E2E_KUBECONFIG="$kubeconfig"
export VMSTREAM_E2E_SYSTEM_NAMESPACE="$namespace"
cargo test -p vmstream-e2e --test any_cluster_e2e -- --nocapture

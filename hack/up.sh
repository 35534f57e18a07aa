#!/usr/bin/env bash
# `make up`: a local vmstream on this machine — a real etcd + kube-apiserver on
# loopback, the CRDs, the operator, one node daemon (this host, real KVM), and
# examples/ applied in namespace vmstream-demo. Ends with `kubectl get` of the
# resources. `make down` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
state="$root/.vmstream"
logs="$state/logs"
mkdir -p "$logs"
bin_dir="$(hack/controlplane/build.sh)"
kubectl="$bin_dir/kubectl"
export KUBECONFIG="$state/controlplane/kubeconfig"
target="${CARGO_TARGET_DIR:-$root/target}/debug"

alive() { [[ -f "$state/$1.pid" ]] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
start() { # name command...
    local name=$1; shift
    if alive "$name"; then echo "$name already running (pid $(cat "$state/$name.pid"))"; return; fi
    setsid nohup "$@" >"$logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$state/$name.pid"
    echo "started $name (pid $!, log $logs/$name.log)"
}

start controlplane "$target/vmstream-controlplane" --dir "$state/controlplane"
for _ in $(seq 1 240); do
    [[ -f "$KUBECONFIG" ]] && "$kubectl" get --raw /readyz >/dev/null 2>&1 && break
    alive controlplane || { echo "control plane exited; see $logs/controlplane.log" >&2; exit 1; }
    sleep 0.5
done
"$kubectl" get --raw /readyz >/dev/null

"$kubectl" apply --server-side --force-conflicts -f crds/ >/dev/null
"$kubectl" wait --for=condition=Established --timeout=60s -f crds/ >/dev/null
for ns in vmstream-system vmstream-demo; do
    "$kubectl" create namespace "$ns" --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
done

node="$(hostname -s 2>/dev/null || echo node-1)"
start operator "$target/vmstream-operator" --namespace vmstream-system \
    --metrics-addr 127.0.0.1:18080 --lease-duration 15 --heartbeat-timeout 20 \
    --autoscale-interval 5 --overcommit-ratio 1.5
start node "$target/vmstream-node" --node-name "$node" --namespace vmstream-system \
    --state-dir "$state/node" --stream-addr 127.0.0.1:17480 \
    --metrics-addr 127.0.0.1:17481 --heartbeat-interval 2

"$kubectl" -n vmstream-demo apply --server-side -f examples/ >/dev/null
echo "applied examples/ in namespace vmstream-demo; waiting for the LiveImage to become Ready..."
for _ in $(seq 1 120); do
    phase="$("$kubectl" -n vmstream-demo get liveimages -o jsonpath='{.items[*].status.phase}' 2>/dev/null || true)"
    [[ "$phase" == *Ready* || "$phase" == *Failed* ]] && break
    sleep 0.5
done
sleep 2
echo
echo "export KUBECONFIG=$KUBECONFIG"
echo
"$kubectl" get vmnodes
echo
"$kubectl" -n vmstream-demo get liveimages,vmclones,clonepools,vmautoscalers,vmmigrations

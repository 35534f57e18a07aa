#!/usr/bin/env bash
# `make up`: a local vmstream on this machine, telling the whole story:
#   - a real etcd + kube-apiserver, listening on a Linux bridge (10.214.0.1),
#   - the CRDs and the operator,
#   - two node daemons with real KVM: node-1 in the root network namespace and
#     node-2 in its own network namespace behind a veth on the bridge,
#   - examples/ applied in namespace vmstream-demo: a LiveImage captured from
#     the request guest, a ClonePool of 3 clones with a VMAutoscaler, and a
#     VMMigration that moves one clone to the other node.
# Ends with `kubectl get` of the resources. `make load` drives requests at the
# pool (the autoscaler grows it, then shrinks it after); `make down` stops all.
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
bridge=vmstup0 host_ip=10.214.0.1 netns=vmstup-node2 node2_ip=10.214.0.2

alive() { [[ -f "$state/$1.pid" ]] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
start() { # name command...
    local name=$1; shift
    if alive "$name"; then echo "$name already running (pid $(cat "$state/$name.pid"))"; return; fi
    setsid nohup "$@" >"$logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$state/$name.pid"
    echo "started $name (pid $!, log $logs/$name.log)"
}

# The node network: a bridge in the root namespace, node-2 in a namespace.
if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$host_ip/24" dev "$bridge"
    ip link set "$bridge" up
fi
if ! ip netns list | grep -qw "$netns"; then
    ip netns add "$netns"
    ip link add vmstup-h2 type veth peer name eth0 netns "$netns"
    ip link set vmstup-h2 master "$bridge" up
    ip -n "$netns" addr add "$node2_ip/24" dev eth0
    ip -n "$netns" link set eth0 up
    ip -n "$netns" link set lo up
fi

start controlplane "$target/vmstream-controlplane" --dir "$state/controlplane" --bind "$host_ip"
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

start operator "$target/vmstream-operator" --namespace vmstream-system \
    --metrics-addr 127.0.0.1:18080 --lease-duration 15 --heartbeat-timeout 20 \
    --autoscale-interval 5 --overcommit-ratio 1.5
start node-1 "$target/vmstream-node" --node-name node-1 --namespace vmstream-system \
    --state-dir "$state/node-1" --stream-addr "$host_ip:17480" \
    --metrics-addr 127.0.0.1:17481 --relay-addr 127.0.0.1:17482 --heartbeat-interval 2
start node-2 ip netns exec "$netns" "$target/vmstream-node" --node-name node-2 \
    --namespace vmstream-system --state-dir "$state/node-2" --stream-addr "$node2_ip:7480" \
    --metrics-addr "$node2_ip:7481" --heartbeat-interval 2

"$kubectl" -n vmstream-demo apply --server-side -f examples/ >/dev/null
echo "applied examples/ in namespace vmstream-demo; waiting for the LiveImage, the clones and the migration..."
for _ in $(seq 1 240); do
    phase="$("$kubectl" -n vmstream-demo get vmmigrations -o jsonpath='{.items[*].status.phase}' 2>/dev/null || true)"
    [[ "$phase" == *Succeeded* || "$phase" == *Failed* ]] && break
    sleep 0.5
done
sleep 1
echo
echo "export KUBECONFIG=$KUBECONFIG"
echo
"$kubectl" get vmnodes
echo
"$kubectl" -n vmstream-demo get liveimages,vmclones,clonepools,vmautoscalers,vmmigrations

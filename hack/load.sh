#!/usr/bin/env bash
# `make load`: drives requests at every Running clone of the demo ClonePool
# for DURATION seconds (default 60) through the node daemons' supervisor
# sockets, so the pool's requestRate metric rises and the VMAutoscaler grows
# the pool; when the load stops, the autoscaler shrinks it again after its
# scale-down stabilization window. Watch: kubectl -n vmstream-demo get cp,vmas -w
set -uo pipefail
cd "$(dirname "$0")/.."
state="$PWD/.vmstream"
duration="${DURATION:-60}"
target="${CARGO_TARGET_DIR:-$PWD/target}/debug"
end=$((SECONDS + duration))
echo "driving requests at the pool's clones for ${duration}s"
n=0
while ((SECONDS < end)); do
    for dir in "$state"/node-*/; do
        for vm in "$dir"vms/vmc.vmstream-demo.request-pool-*; do
            [[ -d "$vm" ]] || continue
            n=$((n + 1))
            "$target/vmstream-node" ctl --state-dir "$dir" request "$(basename "$vm")" "$n" >/dev/null 2>&1 &
        done
    done
    wait
done
echo "sent $n requests"

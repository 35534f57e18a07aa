#!/usr/bin/env bash
# `make down`: stops what `make up` started (node daemons and their VM
# processes, operator, control plane), removes the node network (namespace,
# veth, bridge) and the local state in .vmstream/.
set -uo pipefail
cd "$(dirname "$0")/.."
state="$PWD/.vmstream"
for name in node-2 node-1 node operator controlplane load; do
    if [[ -f "$state/$name.pid" ]]; then
        pid="$(cat "$state/$name.pid")"
        kill "$pid" 2>/dev/null && echo "stopped $name (pid $pid)"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        rm -f "$state/$name.pid"
    fi
done
# VM processes outlive their daemon by design; stop the ones of this state directory.
for vm in "$state"/node*/vms/*/vm.json; do
    [[ -f "$vm" ]] || continue
    pid="$(sed -nE 's/.*"pid": *([0-9]+).*/\1/p' "$vm")"
    [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null && echo "stopped VM process $pid"
done
# Their (now empty) cgroups.
sleep 0.2
for cg in /sys/fs/cgroup/unified/vmstream/vm-*.vmstream-demo.* /sys/fs/cgroup/vmstream/vm-*.vmstream-demo.*; do
    [[ -d "$cg" ]] && rmdir "$cg" 2>/dev/null
done
ip netns del vmstup-node2 2>/dev/null && echo "removed network namespace vmstup-node2"
ip link del vmstup0 2>/dev/null && echo "removed bridge vmstup0"
rm -rf "$state"

#!/usr/bin/env bash
# `make down`: stops what `make up` started (node daemon and its VM processes,
# operator, control plane) and removes the local state in .vmstream/.
set -uo pipefail
cd "$(dirname "$0")/.."
state="$PWD/.vmstream"
for name in node operator controlplane; do
    if [[ -f "$state/$name.pid" ]]; then
        pid="$(cat "$state/$name.pid")"
        kill "$pid" 2>/dev/null && echo "stopped $name (pid $pid)"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        rm -f "$state/$name.pid"
    fi
done
# VM processes outlive the daemon by design; stop the ones of this state directory.
for vm in "$state"/node/vms/*/vm.json; do
    [[ -f "$vm" ]] || continue
    pid="$(sed -nE 's/.*"pid": *([0-9]+).*/\1/p' "$vm")"
    [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null && echo "stopped VM process $pid"
done
rm -rf "$state"

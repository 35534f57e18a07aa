#!/usr/bin/env bash
# `make bench`: builds release binaries, runs every benchmark (each prints one
# flat JSON object), merges the figures into docs/bench/results.json (keeping
# keys other runs wrote), and rewrites the table in docs/BENCHMARKS.md with the
# machine and date. Variants that are compared are measured in the same run.
# BENCH_ONLY="membench vmmbench" limits the run to some benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
target="${CARGO_TARGET_DIR:-$PWD/target}/release"
out="$(mktemp -d /tmp/vmstream-bench.XXXXXX)"
trap 'rm -rf "$out"' EXIT
only="${BENCH_ONLY:-}"

run() { # name command...
    local name=$1; shift
    if [[ -n "$only" && " $only " != *" $name "* ]]; then return; fi
    if [[ ! -x "$1" ]]; then echo "bench: $name not built ($1), skipped" >&2; return; fi
    echo "bench: $name: $*" >&2
    if "$@" > "$out/$name.json" 2> "$out/$name.log"; then
        echo "$*" > "$out/$name.cmd"
    else
        echo "bench: $name failed; last lines of its log:" >&2
        tail -20 "$out/$name.log" >&2
        rm -f "$out/$name.json"
    fi
}

run membench "$target/vmstream-membench"
run vmmbench "$target/vmstream-vmmbench"
run streambench "$target/vmstream-streambench"
run migratebench "$target/vmstream-migratebench"
run sharebench "$target/vmstream-sharebench"

# The Linux-guest figures boot the project kernel: exactly the one
# hack/linux-guest/build.sh builds (cached), as `make test` does.
if [[ -z "$only" || " $only " == *" linuxbench "* ]]; then
    if linux="$(hack/linux-guest/build.sh)"; then
        VMSTREAM_LINUX_DIR="$linux" run linuxbench "$target/vmstream-linuxbench"
    else
        echo "bench: linuxbench: the Linux guest could not be built, skipped" >&2
    fi
fi

# scale_3_to_30_s is measured by the end-to-end suite (operator + three node
# daemons in network namespaces + real VMs), built in release like the rest.
if [[ -z "$only" || " $only " == *" e2e "* ]]; then
    cmd=(cargo test --release -p vmstream-e2e --test cluster_e2e)
    echo "bench: e2e: ${cmd[*]}" >&2
    if VMSTREAM_E2E_FIGURES="$out/e2e.json" "${cmd[@]}" > "$out/e2e.log" 2>&1; then
        echo "${cmd[*]}" > "$out/e2e.cmd"
    else
        echo "bench: e2e failed; last lines of its log:" >&2
        tail -20 "$out/e2e.log" >&2
        rm -f "$out/e2e.json"
    fi
fi

python3 hack/bench_report.py "$out" docs/bench/results.json docs/BENCHMARKS.md

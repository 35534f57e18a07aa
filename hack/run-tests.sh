#!/usr/bin/env bash
# Runs the whole test suite (unit, real-KVM, real-userfaultfd, real
# kube-apiserver, network-namespace tests) and prints how many tests ran,
# failed and were skipped because this host lacks something (each skip names
# what is missing).
set -uo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d /tmp/vmstream-tests.XXXXXX)"
trap 'rm -rf "$out"' EXIT
export VMSTREAM_SKIP_LOG="$out/skips"
: > "$VMSTREAM_SKIP_LOG"
cargo test --workspace --no-fail-fast ${CARGO_TEST_ARGS:-} 2>&1 | tee "$out/log"
status=${PIPESTATUS[0]}
sum() { grep -E '^test result:' "$out/log" | sed -E "s/.* ([0-9]+) $1.*/\\1/" | awk '{s+=$1} END {print s+0}'; }
passed=$(sum passed)
failed=$(sum failed)
skipped=$(wc -l < "$VMSTREAM_SKIP_LOG")
passed=${passed:-0}; failed=${failed:-0}
ran=$((passed - skipped))
echo
if ((skipped)); then
    echo "skipped tests (this host lacks what they need):"
    sed 's/^/  /' "$VMSTREAM_SKIP_LOG"
fi
echo "vmstream: $ran passed, $failed failed, $skipped skipped"
if ((status != 0 || failed != 0)); then
    exit 1
fi

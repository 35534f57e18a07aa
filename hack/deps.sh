#!/usr/bin/env bash
# Installs what a fresh machine lacks for building and testing vmstream:
# libclang (bindgen for userfaultfd-sys), binutils (micro guests), iproute2
# (network-namespace tests), openssl (the local API server's keys), and the
# rustfmt/clippy components. Safe to run repeatedly; does nothing when all is there.
set -euo pipefail
need=()
[[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null | head -1)" ]] || need+=(libclang-dev)
command -v as >/dev/null && command -v objcopy >/dev/null || need+=(binutils)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
command -v go >/dev/null || need+=(golang-go)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
        exit 1
    fi
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if command -v rustup >/dev/null; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
    done
fi

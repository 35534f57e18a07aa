#!/usr/bin/env bash
# Installs what a fresh machine lacks for building and testing vmstream, and
# the rustfmt/clippy components. Safe to run repeatedly; does nothing when all
# is there.
#
# Every probe asks dpkg for the package that provides what the build uses, not
# for a file pattern: a file pattern once matched libclang-cpp (shipped with
# llvm) where bindgen loads libclang, and `make up` failed on a fresh machine.
#
#   hack/deps.sh            install what is missing (as root)
#   hack/deps.sh --missing  only print the missing packages, one per line
#
# DPKG_ADMINDIR points the probes at another dpkg database (the probe test
# uses a fake one); default /var/lib/dpkg.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
admindir="${DPKG_ADMINDIR:-/var/lib/dpkg}"

# package: what needs it
packages=(
    "libclang-dev: bindgen (userfaultfd-sys) loads libclang.so and clang's headers"
    "binutils: as, ld and objcopy assemble the micro guests"
    "iproute2: ip, for network-namespace nodes and taps"
    "openssl: the local API server's keys"
    "curl: tests that read the daemon's metrics endpoint"
    "procps: kill and ps in test harnesses"
    "python3: docs/BENCHMARKS.md is written by hack/bench_report.py"
    "ca-certificates: Go modules and crates over https"
    "linux-source-6.1: the Linux guest's kernel source (hack/linux-guest/build.sh)"
    "gcc: compiles the Linux guest's kernel"
    "make: the Makefile, and Kbuild for the Linux guest's kernel"
    "flex: Kbuild's Kconfig parser (Linux guest)"
    "bison: Kbuild's Kconfig parser (Linux guest)"
    "bc: Kbuild's generated time constants (Linux guest)"
    "libelf-dev: objtool, built with the Linux guest's kernel"
    "xz-utils: unpacks the Linux guest's kernel source"
    "patch: applies hack/linux-guest/patches"
    "e2fsprogs: mke2fs and debugfs make the Linux guest's root disk"
)

installed() { # package
    [[ "$(dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]
}

missing=()
for entry in "${packages[@]}"; do
    pkg="${entry%%:*}"
    installed "$pkg" || missing+=("$pkg")
done

if [[ "${1:-}" == "--missing" ]]; then
    ((${#missing[@]})) && printf '%s\n' "${missing[@]}"
    exit 0
fi

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go is not a Debian package here: the control plane needs the Go release its
# go.mod names, newer than bookworm's golang-go. Machines of this kind ship it
# in /usr/local/go; say so plainly where it is missing or too old.
want_go="$(awk '$1=="go" {print $2; exit}' "$here/controlplane/go.mod")"
if ! command -v go >/dev/null; then
    echo "go $want_go or newer is needed to build the control plane (https://go.dev/dl; Debian's golang-go is too old)" >&2
    exit 1
fi
have_go="$(go env GOVERSION)"; have_go="${have_go#go}"
if [[ "$(printf '%s\n%s\n' "$want_go" "$have_go" | sort -V | head -1)" != "$want_go" ]]; then
    echo "go $have_go is older than the $want_go that hack/controlplane/go.mod needs" >&2
    exit 1
fi

if command -v rustup >/dev/null; then
    for c in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >&2
    done
fi

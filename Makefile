# vmstream — the two commands a user needs are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export VMSTREAM_CACHE ?= $(HOME)/.cache/vmstream
K8S_VERSION := $(shell awk '$$1=="k8s.io/kubernetes" && $$2 ~ /^v/ {print $$2}' hack/controlplane/go.mod)
HELM_VERSION ?= v3.22.0
export VMSTREAM_BIN_DIR ?= $(VMSTREAM_CACHE)/bin-$(K8S_VERSION)
export VMSTREAM_HELM ?= $(VMSTREAM_CACHE)/helm-$(HELM_VERSION)/helm
export HELM_VERSION
STATE := .vmstream

.PHONY: all deps controlplane linux-guest build crds crds-check fmt-check lint structure test e2e e2e-kind bench up down load help

all: build

help:
	@echo "make up     start a local control plane, operator and node daemon, and apply examples/"
	@echo "make down   stop what make up started"
	@echo "make test   everything CI checks (installs what a fresh machine lacks)"
	@echo "make bench  run benchmarks; writes docs/bench/results.json and docs/BENCHMARKS.md"

## deps: system packages, Rust components, and the cached control-plane + helm build
deps:
	@hack/deps.sh
	@hack/controlplane/build.sh >/dev/null

controlplane:
	@hack/controlplane/build.sh

## linux-guest: the small Linux kernel and root disk the tests boot, built once and cached; prints their directory (docs/LINUX-GUEST.md)
linux-guest:
	@hack/linux-guest/build.sh

build:
	$(CARGO) build --workspace --bins

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p vmstream-api --bin crdgen -- crds
	rm -f charts/vmstream/crds/*.yaml && cp crds/*.yaml charts/vmstream/crds/

## crds-check: fail when crds/*.yaml or the chart's copy is stale
crds-check:
	$(CARGO) run -q -p vmstream-api --bin crdgen -- --check crds
	@diff -r --exclude='*.rs' <(cd crds && ls *.yaml | xargs cat) <(cd charts/vmstream/crds && ls *.yaml | xargs cat) >/dev/null \
	  || { echo "charts/vmstream/crds is stale: run 'make crds'" >&2; exit 1; }

fmt-check:
	$(CARGO) fmt --all -- --check

lint: fmt-check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## structure: no import cycle between the files of a crate, no node-daemon source file over 900 lines
structure:
	@python3 hack/module-cycles.py
	@long=$$(find node-daemon -path '*/target' -prune -o -name '*.rs' -print | xargs wc -l | awk '$$2 != "total" && $$1 > 900'); \
	  if [[ -n "$$long" ]]; then echo "node-daemon files over 900 lines (split them along their jobs):"; echo "$$long"; exit 1; fi

## test: everything CI checks
test: deps crds-check lint structure
	@linux=$$(hack/linux-guest/build.sh) && VMSTREAM_LINUX_DIR="$$linux" hack/run-tests.sh

## e2e: only the end-to-end suite (operator + 3 node daemons in network namespaces + real VMs)
e2e: deps
	$(CARGO) build --workspace --bins
	$(CARGO) test -p vmstream-e2e -- --nocapture

## e2e-kind: the cluster-level suite against the Helm chart in a kind cluster (needs Docker and kind; docs/E2E.md)
e2e-kind:
	@hack/e2e-kind.sh

bench: deps
	@hack/bench.sh

up: deps build
	@hack/up.sh

down:
	@hack/down.sh

## load: drive requests at the demo pool (after `make up`); the autoscaler reacts
load:
	@hack/load.sh

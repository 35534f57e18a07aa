# vmstream — the two commands a user needs are `make up` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export VMSTREAM_CACHE ?= $(HOME)/.cache/vmstream
K8S_VERSION := $(shell awk '$$1=="require" && $$2=="k8s.io/kubernetes" {print $$3}' hack/controlplane/go.mod)
HELM_VERSION ?= v3.22.0
export VMSTREAM_BIN_DIR ?= $(VMSTREAM_CACHE)/bin-$(K8S_VERSION)
export VMSTREAM_HELM ?= $(VMSTREAM_CACHE)/helm-$(HELM_VERSION)/helm
export HELM_VERSION
STATE := .vmstream

.PHONY: all deps controlplane build crds crds-check fmt-check lint test test-unit bench up down clean-state help

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

build:
	$(CARGO) build --workspace --bins

## crds: regenerate crds/*.yaml from the Rust types
crds:
	$(CARGO) run -q -p vmstream-api --bin crdgen -- crds

crds-check:
	$(CARGO) run -q -p vmstream-api --bin crdgen -- --check crds

fmt-check:
	$(CARGO) fmt --all -- --check

lint: fmt-check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: everything CI checks
test: deps crds-check lint
	@hack/run-tests.sh

bench: deps
	@hack/bench.sh

up: deps build
	@hack/up.sh

down:
	@hack/down.sh

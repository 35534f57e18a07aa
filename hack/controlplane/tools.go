//go:build tools

// Package tools pins the Kubernetes control-plane binaries that vmstream's
// integration tests and `make up` run locally: kube-apiserver, etcd and
// kubectl, all built from Go modules with the machine's Go toolchain.
package tools

import (
	_ "go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubectl/pkg/cmd"
)

#!/usr/bin/env bash
# Build kube-apiserver and kube-controller-manager from Go modules and cache them by version.
# No registry ships these as binaries; the Go module proxy has their source. k8s.io/kubernetes
# replaces its staging modules in its own go.mod, so we build from a throwaway module that
# requires k8s.io/kubernetes and maps each staging module to its published v0.X.Y twin.
set -euo pipefail
exec >&2  # progress only: stdout stays clean for `eval "$(make -s cluster)"`
K8S_VERSION="${K8S_VERSION:-v1.36.3}"
CACHE="${FTJ_CACHE:-$HOME/.cache/finetune-operator}"
OUT="$CACHE/k8s-$K8S_VERSION"
# A build without version ldflags reports v0.0.0-master on /version (helm's kubeVersion checks fail).
if [[ -x "$OUT/kube-apiserver" && -x "$OUT/kube-controller-manager" ]] \
  && "$OUT/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $K8S_VERSION"; then
  echo "control plane binaries cached in $OUT"; exit 0
fi
if ! go version | grep -q 'go1\.26'; then
  echo "error: Go 1.26 is required (1.27 breaks the apiserver's /openapi/v2); found: $(go version)" >&2
  exit 1
fi
staging_version="v0.${K8S_VERSION#v1.}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
go mod init ftj-k8s-build >/dev/null 2>&1
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller
  streaming)
go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
for m in "${staging[@]}"; do go mod edit -replace "k8s.io/$m=k8s.io/$m@$staging_version"; done
cat > tools.go <<GO
//go:build tools
package tools
import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
echo "resolving k8s.io/kubernetes $K8S_VERSION modules..."
GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go get "k8s.io/kubernetes@$K8S_VERSION"
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
for cmd in kube-apiserver kube-controller-manager; do
  echo "building $cmd (cold build takes about 10 minutes on 2 cores)..."
  CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$OUT.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
echo "built into $OUT"

#!/usr/bin/env bash
# Install (or reuse) the pinned helm binary in a cache folder keyed by its version, and print its path.
# Built from the Go module proxy (helm.sh/helm/v3 has no replace directives), like the control plane,
# with the ldflags of helm's own Makefile: without them `helm version` is empty and `helm template`
# assumes Kubernetes v1.20 (and refuses the chart's kubeVersion).
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
K8S_MINOR="${HELM_K8S_MINOR:-37}"  # helm v3.22.0 builds against k8s.io/client-go v0.37
CACHE="${FTJ_CACHE:-$HOME/.cache/finetune-operator}"
bin="$CACHE/helm-$HELM_VERSION/helm"
if [[ ! -x "$bin" ]]; then
  echo "building helm $HELM_VERSION into $(dirname "$bin") (first time: a few minutes)..." >&2
  mkdir -p "$(dirname "$bin")"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$K8S_MINOR"
  done
  CGO_ENABLED=0 GOBIN="$(dirname "$bin")" go install -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
fi
echo "$bin"

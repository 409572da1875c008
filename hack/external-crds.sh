#!/usr/bin/env bash
# Fetch (or reuse) the CRDs of the integrations the chart and the docs write objects for, and print
# the folder holding them: the Prometheus Operator's ServiceMonitor, Kueue's ResourceFlavor,
# ClusterQueue and LocalQueue, Argo CD's Application. The tests install them into the local
# control plane, so those objects meet the real schemas instead of being skipped.
# No registry ships these YAMLs on their own, but each project's Go module carries them; the Go
# module proxy serves the module at a pinned version (checksummed by sum.golang.org), and only the
# CRD files are kept, in a cache folder keyed by the three versions.
set -euo pipefail
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
KUEUE_VERSION="${KUEUE_VERSION:-v0.10.0}"  # serves kueue.x-k8s.io/v1beta1, the version the docs use
ARGOCD_VERSION="${ARGOCD_VERSION:-v3.5.7}"  # 3.6 needs Go 1.27 (the control plane needs 1.26)
CACHE="${FTJ_CACHE:-$HOME/.cache/finetune-operator}"
out="$CACHE/external-crds-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION-kueue-$KUEUE_VERSION-argocd-$ARGOCD_VERSION"
if [[ -f "$out/.complete" ]]; then
  echo "$out"; exit 0
fi

# module@version -> its extracted folder in the module cache (downloaded once, verified by go.sum's db)
module_dir() {
  local json
  json="$(cd "$work" && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$1")"
  if grep -q '"Error"' <<<"$json"; then
    echo "error: go mod download $1: $json" >&2; exit 1
  fi
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$json"
}

echo "fetching CRDs: prometheus-operator $PROMETHEUS_OPERATOR_VERSION, kueue $KUEUE_VERSION," \
  "argo-cd $ARGOCD_VERSION (Go module proxy)..." >&2
work="$(mktemp -d)"; trap 'rm -rf "$work" "$out.partial"' EXIT
rm -rf "$out.partial"; mkdir -p "$out.partial"
prom="$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")"
kueue="$(module_dir "sigs.k8s.io/kueue@$KUEUE_VERSION")"
argocd="$(module_dir "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION")"
files=(
  "$prom/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
  "$kueue/config/components/crd/bases/kueue.x-k8s.io_resourceflavors.yaml"
  "$kueue/config/components/crd/bases/kueue.x-k8s.io_clusterqueues.yaml"
  "$kueue/config/components/crd/bases/kueue.x-k8s.io_localqueues.yaml"
  "$argocd/manifests/crds/application-crd.yaml"
)
for f in "${files[@]}"; do
  install -m 0644 "$f" "$out.partial/"  # the module cache is read-only; the copies need not be
done
touch "$out.partial/.complete"
rm -rf "$out"; mv "$out.partial" "$out"
echo "$out"

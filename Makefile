# Entry points. `make demo` and `make test` are the two commands in README.md; .ci/run calls `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# The venv lives in a cache folder keyed by the pinned dependency set (hack/venv.sh creates or reuses it).
VENV = $$(bash hack/venv.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help venv k8s cluster cluster-down s3 s3-down crds lint test test-unit test-quick demo clean
.PHONY: demo-down node-agent node-agent-down
.PHONY: helm docs
.PHONY: external-crds
.PHONY: soak
.PHONY: bench

help:
	@echo "make demo        set up everything and train a tiny FineTuneJob end to end"
	@echo "make test        set up everything and run every test tier (what CI runs)"
	@echo "make test-quick  unit + integration, skipping tests marked slow"
	@echo "make soak        the reliability suites' long form (docs/reliability.md; about 40 minutes)"
	@echo "make bench       CPU benchmarks, then docs/benchmarks.md (15-25 min; knobs in that page)"
	@echo "make cluster     start the local control plane (prints how to point kubectl at it)"
	@echo "make demo-down   stop what make demo started"
	@echo "make cluster-down / s3 / s3-down / node-agent / node-agent-down / crds / lint / helm / docs"
	@echo "make external-crds  fetch the Prometheus Operator, Kueue and Argo CD CRDs the tests install"

venv:
	@bash hack/venv.sh >/dev/null

k8s:
	@bash hack/build-k8s.sh

cluster: venv k8s
	@$(PY) -m finetune_devenv.cluster up

cluster-down: venv
	@$(PY) -m finetune_devenv.cluster down

s3: venv
	@$(PY) -m finetune_devenv.s3server up

s3-down: venv
	@$(PY) -m finetune_devenv.s3server down

crds: venv
	@$(PY) -m finetune_operator.crdgen --write

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy operator/finetune_operator trainer_image/finetune_trainer devenv/finetune_devenv bench
	@$(VENV)/bin/lint-imports --no-cache  # layers in .importlinter

test: venv k8s helm external-crds lint
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	@$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-quick: venv k8s helm external-crds
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The reliability suites (tests/reliability) in their long form; `make test` runs their short form.
soak: venv k8s helm
	@FTJ_SOAK=1 $(PY) -m pytest tests/reliability -m reliability $(PYTEST_ARGS)

demo: venv k8s
	@$(PY) -m finetune_devenv.demo up

demo-down: venv
	@$(PY) -m finetune_devenv.demo down

# The node agent runs pods of `make cluster` as local processes; the trainer runs offline in them.
node-agent: venv
	@HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(PY) -m finetune_devenv.nodeagent up \
		--pass-env HF_HUB_OFFLINE --pass-env OMP_NUM_THREADS --pass-env TOKENIZERS_PARALLELISM

node-agent-down: venv
	@$(PY) -m finetune_devenv.nodeagent down

# helm, built from the Go module proxy into ~/.cache/finetune-operator/helm-<version>/ (the chart tests use it).
helm:
	@bash hack/helm.sh >/dev/null

# CRDs of Prometheus Operator, Kueue, Argo CD at pinned versions, from the Go module proxy into
# ~/.cache/finetune-operator/external-crds-*/ (the chart and docs tests install them).
external-crds:
	@bash hack/external-crds.sh >/dev/null

# The docs site (mkdocs.yml, docs/ -> site/); warnings fail the build.
docs: venv
	@NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# CPU benchmarks (issue 8) at CI-sized defaults, one after another, then docs/benchmarks.md and its plots.
# Bigger sizes: FTJ_BENCH_CKPT_GB=2.7 FTJ_BENCH_OPERATOR_N=100,500,1000 make bench (see docs/benchmarks.md).
bench: venv k8s
	@$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install -q -e ".[cli]"  # plots
	@$(PY) -m bench

clean:
	rm -rf .local build dist site .pytest_cache .ruff_cache .mypy_cache

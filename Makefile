# Entry points. `make demo` and `make test` are the two commands in README.md; .ci/run calls `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# The venv lives in a cache folder keyed by the pinned dependency set (hack/venv.sh creates or reuses it).
VENV = $$(bash hack/venv.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help venv k8s cluster cluster-down s3 s3-down crds lint test test-unit test-quick demo clean

help:
	@echo "make demo        set up everything and train a tiny FineTuneJob end to end"
	@echo "make test        set up everything and run every test tier (what CI runs)"
	@echo "make test-quick  unit + integration, skipping tests marked slow"
	@echo "make cluster     start the local control plane (prints how to point kubectl at it)"
	@echo "make cluster-down / s3 / s3-down / crds / lint"

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
	@$(VENV)/bin/lint-imports --no-cache  # layers in .importlinter

test: venv k8s lint
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	@$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-quick: venv k8s
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .local build dist site .pytest_cache .ruff_cache .mypy_cache

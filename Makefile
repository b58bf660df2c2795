# `make serve` and `make test` each install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ridgeline-installed

.PHONY: install system-deps serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU machine takes the torch 2.13.0 CPU build first, so nothing pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# servers the test suite starts on 127.0.0.1 (real components, not mocks): etcd for the registry,
# Prometheus (and promtool) for the metrics, rules and dashboards
system-deps:
	@command -v etcd >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server prometheus; }

# frontend + 1 prefill + 1 decode replica of the default model on 127.0.0.1:8000 (Ctrl-C stops it)
serve: install
	$(VENV)/bin/ridgeline serve --host 127.0.0.1 --port 8000

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# static helm + kubectl for the chart's tests (not in Debian; see helm/fetch_helm.py)
$(VENV)/bin/helm: helm/fetch_helm.py | $(STAMP)
	$(PY) helm/fetch_helm.py $(VENV)/bin

test: install system-deps $(VENV)/bin/helm lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=20

bench: install
	$(PY) -m benchmarks.engine_offline

clean:
	rm -rf $(VENV) build *.egg-info

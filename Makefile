# Quick start: `make serve` and `make test`. Both create .venv with pip and install the project.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision pins served from local disk on the dev machines; override on other hosts,
# e.g. `make serve TORCH_SPEC="torch torchvision"` (pyproject only asks for torch>=2.3).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
HOST ?= $(or $(SALIENCY_HOST),127.0.0.1)
PORT ?= $(or $(SALIENCY_PORT),8000)

.PHONY: serve test install install-dev lint typecheck unit openapi bench soak soak-short clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/saliency serve --host $(HOST) --port $(PORT)

lint: install-dev
	$(VENV)/bin/ruff check service client tests benchmarks
	$(VENV)/bin/ruff format --check service client tests benchmarks

typecheck: install-dev
	$(VENV)/bin/mypy

test: install-dev lint typecheck
	$(VENV)/bin/python -m pytest

openapi: install
	$(VENV)/bin/saliency openapi > openapi/openapi.json

bench: install-dev
	$(PY) benchmarks/methods.py

# valid and hostile traffic against a real server on 127.0.0.1 (see benchmarks/soak.py)
soak: install-dev
	$(PY) benchmarks/soak.py --duration 120

soak-short: install-dev
	$(PY) benchmarks/soak.py --duration 30

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

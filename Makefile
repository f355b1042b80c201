# Two commands do everything on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where a GPU is present pip's default torch build (CUDA) is used; otherwise the CPU build.
TORCH_SPEC ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)

# make bench MODEL=mistralai/Mistral-7B-v0.1 BUDGET_GB=16 EXPERIMENTS="qlora lora"
MODEL ?=
BUDGET_GB ?=
EXPERIMENTS ?=
BENCH_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(BUDGET_GB),--budget-gb $(BUDGET_GB)) $(if $(EXPERIMENTS),--experiments $(EXPERIMENTS))

.PHONY: install bench test validate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(PY) -m harness bench $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

validate: $(STAMP)
	$(PY) -m harness validate

clean:
	rm -rf $(VENV) .pytest_cache

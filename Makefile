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

.PHONY: install bench base report report-check test chromium microbench validate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The matrix (pretraining the lab's base model first if a run needs it), the probes, the claims'
# memory predictions (skipped where saved), then the report.
# A failed run is a result too: the report is rendered anyway, and the exit status says it failed.
bench: $(STAMP)
	@status=0; $(PY) -m harness bench $(BENCH_ARGS) || status=$$?; \
	$(PY) -m harness probes && $(PY) -m harness predict --claims && $(PY) -m harness report || status=1; \
	exit $$status

# Pretrain the base model the loss comparison fine-tunes (cached; `--force` through the CLI retrains)
base: $(STAMP)
	$(PY) -m harness base

# reports/index.md and reports/index.html (figures in reports/figures/), from results/ alone
report: $(STAMP)
	$(PY) -m harness report

# Open reports/index.html in headless Chromium: every image decodes, no console errors
report-check: $(STAMP)
	$(PY) -m harness.report.browser reports/index.html

test: $(STAMP) chromium
	$(PY) -m pytest -q

# The report's browser test needs Chromium: installed where possible (root with apt-get), else skipped.
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the report's browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the report's browser test will be skipped"; \
	else echo "chromium not found (installing it needs root and apt-get): the report's browser test will be skipped"; fi

# Kernel micro-benchmarks at the sizes of this device: results/microbench/<device>.json
microbench: $(STAMP)
	$(PY) -m harness.microbench

validate: $(STAMP)
	$(PY) -m harness validate

clean:
	rm -rf $(VENV) .pytest_cache

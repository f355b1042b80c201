# Two commands do everything on a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
# The interpreter every target runs. By default the project's own .venv, created and installed
# on first use; PY=python3 (any interpreter that already has the packages, such as a GPU
# machine's own) installs nothing.
PY ?= $(VENV)/bin/python
SETUP := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
# Where a GPU is present pip's default torch build (CUDA) is used; otherwise the CPU build.
TORCH_SPEC ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
# The optional extras: the techniques beyond the documents, the other training loops and the cluster
# launcher everywhere, GPU-only kernels where a GPU is.
EXTRAS ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo dev,techniques,engines,cluster,gpu; else echo dev,techniques,engines,cluster; fi)

# make bench MODEL=mistralai/Mistral-7B-v0.1 BUDGET_GB=16 EXPERIMENTS="qlora lora"
MODEL ?=
BUDGET_GB ?=
EXPERIMENTS ?=
BENCH_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(BUDGET_GB),--budget-gb $(BUDGET_GB)) $(if $(EXPERIMENTS),--experiments $(EXPERIMENTS))

.PHONY: install bench bench-full gpu-evidence base report report-check test test-fast chromium microbench validate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The matrix (pretraining the lab's base model first if a run needs it), the probes, the claims'
# memory predictions (skipped where saved), then the report.
# A failed run is a result too: the report is rendered anyway, and the exit status says it failed.
bench: $(SETUP)
	@status=0; $(PY) -m harness bench $(BENCH_ARGS) || status=$$?; \
	$(PY) -m harness probes && $(PY) -m harness predict --claims && $(PY) -m harness report || status=1; \
	exit $$status

# What needs many steps on a CPU (the loss comparisons of the techniques beyond the documents:
# minutes each), as the `cpu-full` plan of experiments/matrix.yaml, then the report.
bench-full: $(SETUP)
	@status=0; $(PY) -m harness bench --plan cpu-full || status=$$?; \
	$(PY) -m harness report || status=1; \
	exit $$status

# The GPU evidence pass: the `boundary` plan of experiments/matrix.yaml (the fit table's answers
# measured on emulated cards), then the `evidence` plan, most valuable cell first, each cell in its own
# process, none started past TIME_BUDGET; then the CUDA micro-benchmarks (MICROBENCH= leaves them out)
# and the report, all in one archive to bring back. Running it again resumes with the cells still missing.
#   make gpu-evidence PY=python3 TIME_BUDGET=8m ARCHIVE=/somewhere/evidence.tar.gz
#   make gpu-evidence DRY_RUN=1 CARD_GB=141     # the plan with estimated times, on any machine
TIME_BUDGET ?= 11m
CARD_GB ?= 80
MICROBENCH ?= 1
ARCHIVE ?= gpu-evidence.tar.gz
EVIDENCE := $(PY) -m harness bench --plan boundary,evidence --time-budget $(TIME_BUDGET)
gpu-evidence: $(SETUP)
ifdef DRY_RUN
	$(EVIDENCE) --device cuda --device-gb $(CARD_GB) --dry-run
else
	@# --allow-shared-gpu: a lease is too short to lose to a stray process; a record taken
	@# beside one says so (shared_gpu), and the report shows it.
	@status=0; $(EVIDENCE) --device cuda --allow-shared-gpu || status=$$?; \
	if [ -n "$(MICROBENCH)" ]; then $(PY) -m harness.lab.microbench --benchmark-max-time=0.2 || status=1; fi; \
	$(PY) -m harness report || status=1; \
	tar czf $(ARCHIVE) results reports && echo "records and report: $(ARCHIVE)"; \
	exit $$status
endif

# Pretrain the base model the loss comparison fine-tunes (cached; `--force` through the CLI retrains)
base: $(SETUP)
	$(PY) -m harness base

# reports/index.md and reports/index.html (figures in reports/figures/), from results/ alone
report: $(SETUP)
	$(PY) -m harness report

# Open reports/index.html in headless Chromium: every image decodes, no console errors
report-check: $(SETUP)
	$(PY) -m harness.report.browser reports/index.html

# One worker per core (at most 4), each taking whole test files so that a file's fixtures are made once, in
# the order tests/conftest.py gives them (the longest first); serial where pytest-xdist is missing
# (PY=python3 without it).
PARALLEL = $$($(PY) -c "import xdist" 2>/dev/null && echo "-n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder")
test: $(SETUP) chromium
	$(PY) -m pytest -q $(PARALLEL)

# The tests not marked slow (no real training step in a subprocess), one worker per core: about two minutes
test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not slow" $(PARALLEL)

# The report's browser test needs Chromium: installed where possible (root with apt-get), else skipped.
chromium:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for the report's browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "chromium could not be installed: the report's browser test will be skipped"; \
	else echo "chromium not found (installing it needs root and apt-get): the report's browser test will be skipped"; fi

# Kernel micro-benchmarks at the sizes of this device: results/microbench/<device>.json
microbench: $(SETUP)
	$(PY) -m harness.lab.microbench

validate: $(SETUP)
	$(PY) -m harness validate

clean:
	rm -rf $(VENV) .pytest_cache

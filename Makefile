# The two commands: `make demo` (whole pipeline on the embedded default) and `make test` (the test suite);
# `make evaluate` runs the paper's experiments on the embedded default (grid, consistency, similarity, counterfactual).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed-$(TORCH_VERSION)
# The instance: dagster_home/ (sqlite), or dagster_home/postgres/ with TDA_INSTANCE=postgres; a set DAGSTER_HOME wins.
DAGSTER_HOME ?= $(CURDIR)/dagster_home$(if $(filter postgres,$(TDA_INSTANCE)),/postgres)
export DAGSTER_HOME

.PHONY: install demo test ui evaluate bench clean-storage

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, so nothing pulls a multi-GB CUDA build onto a CPU machine. GPU nodes (nvidia-smi present): CUDA build
	@# from PyPI. CPU: a local CPU wheel if pip's find-links has one (installed without deps, which then come from PyPI),
	@# else the CPU build from PyTorch's index (its `+cpu` local version ranks above PyPI's CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	elif $(BIN)/pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)" --extra-index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	@# tinysoundfont renders the embedded corpus; its pyaudio dependency is only for playback and does not build here.
	$(BIN)/pip install -q --no-deps "tinysoundfont>=0.3.7"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/tda demo

# Reuses the demo's training side and queries when present. Budget knobs (defaults fit 30 min on 2 cores):
# TDA_GRID_QUERIES (grid on the first N built-in queries, 0 = all 8), TDA_CF_QUERIES, TDA_CF_TRAIN_STEPS.
evaluate: install
	$(BIN)/tda evaluate

test: install
	$(BIN)/python -m pytest -q

ui: install
	$(BIN)/dagster dev -w workspace.yaml

clean-storage:
	rm -rf dagster_home/storage

# bench_demo_agreement needs the demo's storage root (make demo or make evaluate first); it is skipped without one.
bench: install
	$(BIN)/python tests/benchmarks/bench_engine.py
	$(BIN)/python tests/benchmarks/bench_scale.py
	$(BIN)/python -m tests.benchmarks.bench_norms_read
	if [ -f dagster_home/storage/checkpoint/current.json ]; then \
	  $(BIN)/python tests/benchmarks/bench_demo_agreement.py --root dagster_home/storage; \
	else echo "bench_demo_agreement skipped: no demo root under dagster_home/storage (make demo first)"; fi

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

.PHONY: install demo test test-fast ui evaluate bench bench-10k bench-catalogue bench-gpu bench-real-size clean-storage

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

# Reuses the demo's training side and queries when present. ~90 min on 2 cores at the goals' samples (docs/experiments.md);
# knobs: TDA_GRID_QUERIES (0 = all 8), TDA_SI_TARGETS, TDA_REP_SOURCES, TDA_CF_QUERIES, TDA_CF_TRAIN_STEPS.
evaluate: install
	$(BIN)/tda evaluate

# Two pytest-xdist workers (one torch thread each on 2 cores); a module runs whole on one worker, the modules on the
# session model on one, the trained roots are built once for both (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

test: install
	$(BIN)/python -m pytest -q $(XDIST)

# The tests that need no trained model, Runner root or server (the `slow` marker: tests/conftest.py, SLOW_FIXTURES).
test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"

ui: install
	$(BIN)/dagster dev -w workspace.yaml

clean-storage:
	rm -rf dagster_home/storage

# Every benchmark runs as a module (`-m`, so `tests.` imports resolve). bench_scale runs last: its JSON line is the last
# line of `make bench`; it measures agreement on the demo's queries (bench_demo_agreement) when the demo's storage root
# exists (make demo or make evaluate first), else on a tiny model.
bench: install
	$(BIN)/python -m tests.benchmarks.bench_engine
	$(BIN)/python -m tests.benchmarks.bench_norms_read
	$(BIN)/python -m tests.benchmarks.bench_scale --root $(DAGSTER_HOME)/storage

# Opt-in: 10,000 embedded items, 4 queries scored exactly vs two-stage and linearized (K=8); ~40 min on 2 idle cores.
bench-10k: install
	$(BIN)/python -m tests.benchmarks.bench_10k

# The data plane at catalogue counts (opt-in; ~7 min and 5 GB under /tmp on 2 cores): a synthetic root of 115,000 items
# and 1,000 queries' attribution rows written through the product's writers; smaller with --items/--queries/--inbox.
bench-catalogue: install
	$(BIN)/python -m tests.benchmarks.bench_catalogue

# Stable Audio Open's shapes on one GPU (opt-in; <= 8 min on an H100; one JSON line last). `--tiny` runs it on CPU.
bench-gpu: install
	$(BIN)/python -m tests.benchmarks.bench_gpu

# Stable Audio Open's architecture (random weights) through `tda prepare` and `tda attribute` on this CPU (opt-in;
# ~20 GB free memory, ~6 GB disk under /tmp/tda-real-size, 30-60 min on 2 cores; one JSON line last).
bench-real-size: install
	nice -n 10 $(BIN)/python -m tests.benchmarks.bench_real_size

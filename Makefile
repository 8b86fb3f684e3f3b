# make bench | make test: each sets up .venv (pinned), builds pyattn._C in place, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pinned-$(shell cksum < requirements.txt | cut -d' ' -f1)
RESULTS ?=
STAGE ?=
PYTEST_ARGS ?=

.PHONY: install build test test-quick bench gpu-check gpu-profile sdist-check test-aarch64 clean

install: $(STAMP) build

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.pinned-* && touch $@

# editable install: imports resolve to this tree; ninja rebuilds only what changed
build: $(STAMP)
	PYATTN_SKIP_CUDA_BUILD=1 MAX_JOBS=2 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the inner loop: the CPU grid on the best capability only, without the Triton interpreter, subprocesses or kernel
# compiles (markers in pyproject.toml); `make test` stays the full suite
test-quick: install
	PYATTN_TEST_ONE_CPU_CAPABILITY=1 $(PY) -m pytest -q -m "not subprocess and not triton_interpreter and not compiles" \
		$(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks $(if $(RESULTS),--out $(RESULTS),)

# On a GPU machine, offline, with its system python3 (torch, triton, nvcc, pytest, pybind11 preinstalled).
# Stages build, tests, bench, sanitizer, sweep under one time budget (benchmarks/gpu_check.py, BUDGET seconds,
# default 540); STAGE=name[,name...] runs those alone, sharing the budget.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(if $(RESULTS),--out $(RESULTS),) $(if $(STAGE),--stage $(STAGE),) \
		$(if $(BUDGET),--budget $(BUDGET),)

# On a GPU machine, as gpu-check: issue 31 item 7's profile (benchmarks/gpu_profile.py) into OUT (required; the device
# tool's $OUT), one archive per step and profile-index.json, under BUDGET seconds (default 540); STEPS=a,b runs those
# alone; DRY_RUN=1 plans it without a GPU. docs/gpu-check.md says how to read it.
OUT ?=
STEPS ?=
gpu-profile:
	$(if $(OUT),,$(error make gpu-profile needs OUT=DIR))
	PYTHONUNBUFFERED=1 $(PYTHON) -m benchmarks.gpu_profile --out $(OUT) $(if $(STEPS),--steps $(STEPS),) \
		$(if $(BUDGET),--budget $(BUDGET),) $(if $(DRY_RUN),--dry-run,)

# python -m build --sdist, then pip install of that sdist into a fresh venv (torch from pip's local index) and a
# smoke test from outside the tree: minutes (it compiles every CPU module). SDIST_DIR keeps the work folder.
SDIST_DIR ?=
sdist-check: $(STAMP)
	PYTHON=$(PY) tools/sdist_check.sh $(SDIST_DIR)

# Linux aarch64 under qemu-user, as root on an x86-64 Debian 12 host: sets up an arm64 root once (~25 min, cached in
# /var/tmp), cross-compiles pyattn._C into it, runs the CPU tests on an emulated NEON CPU and on an SVE one (~15 min).
test-aarch64:
	tools/aarch64.sh setup build test

clean:
	rm -rf build pyattn/_C*.so pyattn/_cpu_*.so *.egg-info

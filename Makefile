# steplaw — every command a fresh machine needs: `make demo`, `make test`.
# Everything installs into .venv, which this Makefile creates.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA 13 build of torch (on these machines' local disk) so that the CUDA
# kernels compile in every build, GPU or not. Override: make TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch==2.14.1
TEST_DEPS := numpy scipy pytest hypothesis matplotlib tokenizers ray ninja setuptools wheel
PYTEST_ARGS ?=
RESULTS_DIR ?= bench/results
# Parallel compile jobs for the extension (nvcc is memory hungry; 2 fits 24 GB).
export MAX_JOBS ?= 2

.PHONY: venv build test test-fast demo bench gpu-check clean

$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TEST_DEPS)
	touch $@

venv: $(VENV)/.deps-stamp

# Serialised with flock: several shells building the same tree must not interleave.
build: venv
	flock /tmp/steplaw-build.lock $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m steplaw doctor

# pytest exits 5 when it collects no test; that is not a failure of the build.
test: build
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: build
	$(VENV)/bin/steplaw demo

bench: build
	$(PY) bench/adamw.py
	$(PY) bench/moe.py
	$(PY) bench/fit.py

# On a GPU machine (no venv: the lent machines have torch preinstalled and are offline):
# build with CUDA, run the tests marked gpu, run the benchmarks, write one JSON file.
gpu-check:
	$(PY_SYS) bench/gpu_check.py --out "$(RESULTS_DIR)"

clean:
	rm -rf build steplaw/_C*.so *.egg-info

# steplaw — every command a fresh machine needs: `make demo`, `make test`.
# Everything installs into .venv, which this Makefile creates.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA 13 build of torch (on these machines' local disk) so that the CUDA
# kernels compile in every build, GPU or not. Override: make TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch==2.14.1
# Extras of pyproject.toml to install (`test` names everything the tests and the linter need).
EXTRAS ?= test
PYTEST_ARGS ?=
# The test suite runs one pytest-xdist worker per core (the Ray tests in one group, one
# after another); PYTEST_XDIST= runs it in one process.
PYTEST_XDIST ?= -n $(shell nproc) --dist loadgroup
RESULTS_DIR ?= bench/results
# Parallel compile jobs for the extension (nvcc is memory hungry; 2 fits 24 GB).
export MAX_JOBS ?= 2

# Where `make gpu-check` writes its JSON: the caller's $(OUT) when set (the lent GPU
# machines' result folder), else bench/results.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),$(RESULTS_DIR))

.PHONY: venv build lint test test-fast test-cuda-emu demo bench gpu-check clean

# The requirements come from pyproject.toml, the one list of them: the build system's,
# the package's and those of the extras in EXTRAS (following `steplaw[...]` inside an
# extra). They are installed before the package itself because its build imports torch
# and runs without build isolation.
define READ_REQUIREMENTS
import re, sys, tomllib
pyproject = tomllib.load(open("pyproject.toml", "rb"))
extras = pyproject["project"]["optional-dependencies"]
requirements = pyproject["build-system"]["requires"] + pyproject["project"]["dependencies"]
todo, seen = list(sys.argv[1:]), set()
while todo:
    extra = todo.pop()
    if extra not in seen:
        seen.add(extra)
        for requirement in extras[extra]:
            inner = re.fullmatch(r"steplaw\[(.*)\]", requirement.strip())
            if inner:
                todo += inner.group(1).split(",")
            else:
                requirements.append(requirement)
print("\n".join(dict.fromkeys(requirements)))
endef
export READ_REQUIREMENTS

$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "$$READ_REQUIREMENTS" $(EXTRAS) > $(VENV)/requirements.txt
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r $(VENV)/requirements.txt
	touch $@

venv: $(VENV)/.deps-stamp

# Serialised with flock: several shells building the same tree must not interleave.
build: venv
	flock /tmp/steplaw-build.lock $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m steplaw doctor

lint: venv
	$(PY) -m ruff check .

# The linter and every test not marked gpu: the slow ones too (the demo, the benchmarks'
# smoke runs, a wheel built from the sdist). Both run even when the other fails.
# pytest exits 5 when it collects no test; that is not a failure of the build.
test: build
	$(PY) -m ruff check .; lint=$$?; \
	$(MAKE) --no-print-directory test-cuda-emu VENV=$(VENV); emu=$$?; \
	$(PY) -m pytest -m "not gpu and not cuda_emu" $(PYTEST_XDIST) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; \
	if [ $$lint -ne 0 ]; then echo "ruff found problems (listed above)"; fi; \
	if [ $$emu -ne 0 ]; then echo "make test-cuda-emu failed (above)"; fi; \
	exit $$(( rc || lint || emu ))

# The same without the tests marked slow: the loop to run while editing.
test-fast: build
	$(PY) -m pytest -m "not gpu and not slow and not cuda_emu" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The CUDA kernels and their launch code run on the CPU through the test-only emulation of
# tests/cuda_emu: builds it from the working tree into build/cuda_emu (ninja: only what
# changed), never into the package, and runs the tests marked cuda_emu. SANITIZE=1: the
# AddressSanitizer + UBSan build (build/cuda_emu_asan), with libasan preloaded into Python
# (and libstdc++ after it: ASan finds the real __cxa_throw only in a library loaded at its
# start). A sanitizer's report goes to build/cuda_emu_asan/report.* (pytest's capture would
# swallow the stderr of a process the report ends) and is printed when the run fails.
SANITIZE ?=
ASAN_LIB = $(shell $${CXX:-c++} -print-file-name=libasan.so)
STDCXX_LIB = $(shell $${CXX:-c++} -print-file-name=libstdc++.so)
EMU_REPORT = build/cuda_emu_asan/report
EMU_ENV = $(if $(SANITIZE),LD_PRELOAD="$(ASAN_LIB) $(STDCXX_LIB)" SANITIZE=1 \
	ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:log_path=$(EMU_REPORT) \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(EMU_REPORT))
test-cuda-emu: venv
	$(EMU_ENV) $(PY) tests/cuda_emu/build.py $(if $(SANITIZE),--sanitize)
	@rm -f $(EMU_REPORT).*
	$(EMU_ENV) $(PY) -m pytest -m cuda_emu tests/cuda_emu $(PYTEST_ARGS) || \
	  { rc=$$?; for f in $(EMU_REPORT).*; do [ -f "$$f" ] && grep -v "doesn't fully support makecontext" "$$f" | head -40; done; exit $$rc; }

demo: build
	$(VENV)/bin/steplaw demo

bench: build
	$(PY) bench/adamw.py
	$(PY) bench/moe.py
	$(PY) bench/fit.py

# On a GPU machine (no venv: the lent machines have torch preinstalled and are offline):
# build with CUDA, smoke-run each CUDA op against its reference, run the tests marked gpu,
# run the benchmarks, all within GPU_CHECK_BUDGET_S; the JSON is rewritten after each step.
GPU_CHECK_BUDGET_S ?= 480
gpu-check:
	$(PY_SYS) bench/gpu_check.py --out "$(GPU_CHECK_OUT)" --budget-s $(GPU_CHECK_BUDGET_S)

clean:
	rm -rf build steplaw/_C*.so *.egg-info

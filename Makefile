# Two commands set everything up on a fresh machine and then do the work:
#   make train   - venv + install (editable) + build, then `python -m fastclr.train`
#   make test    - the same set-up, then the whole test suite (and the benchmarks' smoke test)
#   make fuzz    - the property-based tests at length (random inputs, FUZZ_EXAMPLES per property)
# The CUDA kernels executed on the CPU (tests/cuda_on_cpu/; no GPU, no nvcc build needed):
#   make test-cuda-on-cpu  - builds the CPU harness from kernels/ as on disk (only what changed)
#                            and runs every check of the "cuda_on_cpu" backend rows
#   make sanitize          - the same kernels under AddressSanitizer + UBSan, then ThreadSanitizer
#                            (sanitize-address, sanitize-thread one at a time)
# On a machine already set up they start their real work at once: the install is redone only
# when pyproject.toml or setup.py change, the extension only when its sources change (ninja).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from this project's machines' local package store (a CUDA build that runs on CPU).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= train,test,bench,dali
PYTEST_ARGS ?=
export MAX_JOBS ?= 2

INSTALL_STAMP := $(VENV)/.fastclr-installed
EXT_STAMP := build/.fastclr-ext
EXT_SOURCES := setup.py csrc/build.txt csrc/build_definition.py $(wildcard csrc/*.cpp csrc/*.h kernels/*.cu kernels/*.cuh)

.PHONY: train test fuzz test-cuda-on-cpu sanitize sanitize-address sanitize-thread build bench install clean

train: $(EXT_STAMP)
	$(PY) -m fastclr.train

# the tests, and every bench_* entry point once (a smoke test, not a timing)
test: $(EXT_STAMP)
	$(PY) -m pytest tests benchmarks/test_benchmarks.py --benchmark-disable $(PYTEST_ARGS)

# The property-based tests (tests/test_properties.py) at length: freshly random inputs, many
# examples per property (make test runs a bounded, derandomized set). FUZZ_EXAMPLES=N to change.
FUZZ_EXAMPLES ?= 500
fuzz: $(EXT_STAMP)
	FASTCLR_FUZZ=1 FASTCLR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_properties.py -p no:cacheprovider --hypothesis-show-statistics $(PYTEST_ARGS)

# Needs the installed package only: a kernel edit rebuilds the harness, not the nvcc extension.
test-cuda-on-cpu: $(INSTALL_STAMP)
	$(PY) -m pytest tests -m cuda_on_cpu $(PYTEST_ARGS)

# The sanitizers' share of those checks: every kernel, mode and dtype, at the smaller shapes.
SANITIZE_SELECT ?= -m cuda_on_cpu -k "not saturated and not 300-128 and not 150-130 and not 70x300"
sanitize: sanitize-address sanitize-thread

# tests/cuda_on_cpu/__init__.py as a script: pytest with the sanitizer's runtime preloaded and options set
sanitize-address: $(INSTALL_STAMP)
	$(PY) tests/cuda_on_cpu/__init__.py address tests $(SANITIZE_SELECT) $(PYTEST_ARGS)

sanitize-thread: $(INSTALL_STAMP)
	$(PY) tests/cuda_on_cpu/__init__.py thread tests $(SANITIZE_SELECT) $(PYTEST_ARGS)

build: $(EXT_STAMP)

install: $(INSTALL_STAMP)

bench: $(EXT_STAMP)
	$(PY) -m benchmarks

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALL_STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PY) -m pip install --no-build-isolation -e ".[$(EXTRAS)]"
	@mkdir -p build && touch $@ $(EXT_STAMP)

$(EXT_STAMP): $(EXT_SOURCES) | $(INSTALL_STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	@mkdir -p build && touch $@

clean:
	rm -rf build fastclr/_C*.so *.egg-info

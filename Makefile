# Two commands matter: `make demo` (the main job) and `make test` (the test suite). Both work on
# a fresh clone: they create .venv, install torch and the pinned requirements, and build the
# extension in place the first time (and rebuild it when csrc/ or setup.py change).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip prints one warning per missing local index folder on this machine; keep logs readable.
QUIET := 2>&1 | (grep -v 'is ignored: it is neither a file nor a directory' || true)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1

# The nvcc on PATH may be a wrapper outside the toolkit; point torch at the toolkit root.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),$(realpath /usr/local/cuda),)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a
export CUDA_HOME TORCH_CUDA_ARCH_LIST

DEPS := $(VENV)/.deps-stamp
BUILT := $(VENV)/.build-stamp
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: install demo toy test host-test sass-check pytest torch-compat bench gpu-check info clean

install: $(BUILT)

$(DEPS): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(QUIET)
	$(PY) -m pip install -q -r requirements.txt $(QUIET)
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt $(QUIET)
	@# the web demo's browser test drives Debian's chromium (Playwright's own download is not used)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { echo "installing chromium (apt) for the web demo's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
	    || echo "warning: could not install chromium; tests/test_serve.py's browser test needs it (apt-get install chromium)"; }
	@# easy-vqa's wheel also drops a stray top-level test/ package into site-packages
	rm -rf "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/test"
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e . $(QUIET)
	touch $@

demo: $(BUILT)
	$(PY) -m training.demo

toy: $(BUILT)
	$(PY) examples/toy_multidomain.py

test: host-test sass-check pytest torch-compat

# Machine code of the built library, no GPU needed (bench/sass_check.py): the grouped LoRA's
# tensor-core kernels store 16-byte vectors, load operands with LDSM, use no local memory and fit
# their intended occupancy. Fails if the library has no CUDA code (skips only for MOLE_EXT_SKIP_CUDA).
sass-check: $(BUILT)
	$(PY) bench/sass_check.py

# Every C++/CUDA source also compiles against the PyTorch of the GPU machine (headers only, see
# tests/compile_other_torch.py); about 4 minutes on 2 cores plus a one-time 0.5 GB download.
TORCH_COMPAT ?= 2.11.0
torch-compat: $(DEPS)
	$(PY) tests/compile_other_torch.py --torch $(TORCH_COMPAT)

host-test:
	cmake -S . -B build/cmake -DMOLE_EXT_BUILD_EXTENSION=OFF -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

pytest: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(PY) bench/mole_ffn.py

gpu-check:
	bash bench/gpu_check.sh

info: $(BUILT)
	$(PY) -m mole_ext.info

clean:
	rm -rf build python/mole_ext/_C*.so python/mole_ext/_build_info.json $(BUILT)

# cifops developer entry points. `make test` is what CI runs (.ci/run).
#
#   make test    create .venv if absent, install torch and cifops with its test extras,
#                build, run the native sanitizer tests, pytest tests, and the benchmarks
#                once each (--benchmark-disable) so that their code cannot rot
#   make bench   run the benchmarks for real and print the ratios (benchmarks/RESULTS.md)
#   make clean   remove build outputs (keeps .venv)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.cifops-installed

.PHONY: test build native-test pytest bench-smoke bench clean

test: build native-test pytest bench-smoke

$(PY):
	$(PYTHON) -m venv $(VENV)

# Dependencies and the editable install, redone when the packaging files change.
# torch is the default PyPI build (CUDA-enabled on Linux), so the CUDA kernels compile
# wherever nvcc is found. FunASR is a test oracle only: installed without its (heavy)
# dependencies, which its CIF functions do not need.
$(INSTALLED): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch ninja numpy
	$(PY) -m pip install --no-deps funasr==1.4.16
	$(PY) -m pip install --no-build-isolation -e '.[test,train]'
	touch $@

# Incremental rebuild of cifops/_C (ninja reuses build/ between runs).
build: $(INSTALLED)
	$(PY) setup.py -q build_ext --inplace

native-test:
	cmake -S . -B build-native -DCIFOPS_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	cmake --build build-native -j 2
	ctest --test-dir build-native --output-on-failure

pytest: build
	$(PY) -m pytest tests -q

bench-smoke: build
	$(PY) -m pytest benchmarks --benchmark-disable -q

bench: build
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/last-run.json
	$(PY) benchmarks/summarize.py benchmarks/last-run.json

clean:
	rm -rf build build-native cifops/_C*.so

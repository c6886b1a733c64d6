# cnnserve: `make run` serves the committed default model, `make test` runs the suite.
# Both set up everything they need: a venv in .venv and the Debian packages the tests use.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := dataset-fashion-mnist prometheus chromium
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONDONTWRITEBYTECODE := 1

# The exact command that trained model_repository/fashion_mnist/1 (also in its model card).
TRAIN_ARGS := --dataset fashion_mnist --arch efficient_cnn --se --epochs 36 --batch-size 128 \
	--optimizer adamw --lr 0.002 --weight-decay 0.02 --schedule cosine \
	--rotation 0 --zoom 0 --shift 0.1 --seed 0

.PHONY: install system-deps run test test-e2e test-load test-reliability fuzz wrk bench bench-overload \
	loadtest lint format proto proto-check train clean lock

install: $(STAMP)

# The versions installed are constraints.txt's (the set the suite last passed with);
# pyproject.toml holds the ranges. `make lock` resolves the ranges anew into it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,loadtest]'
	@touch $(STAMP)

# constraints.txt anew: a fresh environment installs pyproject.toml's ranges unconstrained
# (the newest releases they allow) and its versions are written down, under the file's
# own header. Run .ci/run before committing the result.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev,loadtest]'
	{ sed -n '/^#/p' constraints.txt; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -iv '^pip==' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf $(LOCK_VENV)

# Debian packages the tests use (Fashion-MNIST's IDX files; prometheus and promtool for the
# monitoring tests; chromium for the browser tests); installed only when missing.
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The probe port as in the image (docker/Dockerfile): docker/prometheus scrapes it there.
run: install
	$(VENV)/bin/cnnserve serve --probe-port $${CNNSERVE_PROBE_PORT:-8002}

# Everything but tests/reliability and tests/load (make test-reliability, make test-load;
# .ci/run runs all three), on TEST_WORKERS processes, a file to each at a time (its
# module fixtures train a model or start a server once). One by one it left much of a
# second core idle: on CI's 2 cores, 10 minutes one by one, under 6 with two (1.66
# cores busy). The reliability and load suites run one test at a time: they measure how a
# worker holds its CPU, which another test beside them would take.
TEST_WORKERS ?= 2
test: install system-deps proto-check
	$(PY) -m pytest -m 'not load and not reliability' -n $(TEST_WORKERS) --dist loadfile

# Overload, hostile input, auth/TLS, broken versions, shutdown, short fuzzing: real
# servers driven hard (a few minutes on 2 cores).
test-reliability: install system-deps
	$(PY) -m pytest -m reliability tests/reliability

# Longer fuzzing: hypothesis's `fuzz` profile (2,000 examples per property), then
# atheris (libFuzzer) on image decoding for FUZZ_SECONDS, when atheris installs, from a
# seed corpus of small valid images (kept and grown in reports/fuzz/corpus).
FUZZ_SECONDS ?= 120
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -m reliability tests/reliability/test_fuzz.py
	@if $(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris; then \
		mkdir -p reports/fuzz && cd reports/fuzz && \
		$(abspath $(PY)) $(abspath tests/reliability/fuzz_decode.py) corpus -max_total_time=$(FUZZ_SECONDS); \
	else echo "atheris does not install here; hypothesis fuzzing only"; fi

# Only the browser tests (also part of `make test`); screenshots land in reports/e2e/.
test-e2e: install system-deps
	$(PY) -m pytest -m e2e tests/e2e

# tests/load: locust headless against real servers and a tiny `cnnserve bench` sweep
# (about 90 s together, so apart from `make test`; .ci/run runs both).
test-load: install system-deps wrk
	$(PY) -m pytest -m load tests/load

wrk:
	@command -v wrk >/dev/null || $(MAKE) --no-print-directory system-deps APT_PACKAGES=wrk

# Sweep of the gateway with wrk beside its physical limit and the two reference servers
# (tutorial-style, batching TF); JSON + PNG in reports/. More options: BENCH_ARGS='--workers
# 1,2 ...'; the issue's measurement: docs/performance.md, "Reproducing the issue's measurement".
bench: install wrk
	$(VENV)/bin/cnnserve bench $(BENCH_ARGS)

# The overload check (docs/failure-modes.md): wrk alone at 32 connections (capacity), then
# 4x and 16x with a polite probe, a client retrying at once, readiness polls and memory;
# then the same over gRPC (32, 128 and 512 Classify calls in flight, 16 a connection).
bench-overload: install wrk
	$(VENV)/bin/cnnserve bench --overload 32,128,512 --open-loop 4 $(BENCH_ARGS)
	$(VENV)/bin/cnnserve bench --overload 32,128,512 --protocol grpc $(BENCH_ARGS)

# Locust, headless, with pass/fail thresholds (docs/performance.md). Reads HOST,
# GRPC_HOST, PROTOCOL (rest|grpc|mixed), USERS, SPAWN_RATE, DURATION, TARGET_RPS,
# MAX_P99_MS, MAX_FAIL_RATIO, PROCESSES, IMAGE_MIX, ENCODING_MIX, MODEL,
# MODEL_REPOSITORY, API_KEY, GRPC_TLS, GRPC_CA, REQUEST_TIMEOUT (defaults in
# loadtests/run.py). With no HOST it starts a local server and stops it after; exits
# non-zero with a one-line reason when a threshold is broken. Reports: loadtests/reports/.
loadtest: install system-deps
	$(PY) loadtests/run.py

lint: install proto-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Generated protobuf code is committed; proto-check fails when it drifts from its sources.
# proto/ is mapped onto service/proto_gen so generated imports read
# `from service.proto_gen import x_pb2` (protoc's flat `import x_pb2` would not resolve).
# gRPC stubs (*_pb2_grpc.py) only for the files that define a service.
# service/proto_gen/{tensorflow,tensorflow_serving,xla}: TF Serving's API protos as modules
# that do not import TensorFlow, regenerated from the installed (pinned) tensorflow and
# tensorflow-serving-api by proto/vendor_tf.py (its docstring says why).
PROTO_FILES := $(wildcard proto/*.proto)
GRPC_PROTO_FILES := $(shell grep -l '^service ' $(PROTO_FILES))
PROTOC := $(PY) -m grpc_tools.protoc -Iservice/proto_gen=proto
define protoc
	$(PROTOC) --python_out=$(1) --pyi_out=$(1) $(PROTO_FILES) && \
	$(PROTOC) --grpc_python_out=$(1) $(GRPC_PROTO_FILES) && \
	$(PY) proto/vendor_tf.py $(1)
endef

proto: install
	rm -rf service/proto_gen/tensorflow service/proto_gen/tensorflow_serving service/proto_gen/xla
	$(call protoc,.)

proto-check: install
	@tmp=$$(mktemp -d); \
	$(call protoc,$$tmp) && \
	cp service/proto_gen/__init__.py $$tmp/service/proto_gen/ && \
	if ! diff -r -q -x __pycache__ $$tmp/service/proto_gen service/proto_gen; then \
		echo "service/proto_gen is stale or has files without a source: run 'make proto'"; \
		rm -rf $$tmp; exit 1; \
	fi; rm -rf $$tmp

# Retrain the default model: publishes the next version of model_repository/fashion_mnist.
# Resumable: rerun the same command after an interruption.
train: install system-deps
	$(VENV)/bin/cnnserve train $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) .train .pytest_cache .mypy_cache .ruff_cache loadtests/reports

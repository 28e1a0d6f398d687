# fleetscope: `make run` and `make test` work on a fresh Debian machine, as root.
# Each step is idempotent; stamps under .cache/ keep repeat runs fast.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := clang llvm libbpf-dev bpftool libelf-dev maven python3-bpfcc
DATA_DIR ?= ./data
PYTEST_ARGS ?=

PROTO_SRC := $(wildcard schemas/fleetscope/v1/*.proto)
PROTO_OUT := $(patsubst schemas/%.proto,%_pb2.py,$(PROTO_SRC))

.PHONY: all deps system-packages venv proto bpf kafka go-client run test lint clean

all: deps

deps: system-packages venv proto bpf

# Debian packages: the BPF toolchain, bcc (the fallback loader; its pure-Python package is
# imported from Debian's path by node_agent.bcc_loader), Maven (fetches the test broker), a Java runtime.
system-packages: .cache/system-packages.stamp
.cache/system-packages.stamp: Makefile
	@mkdir -p .cache
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

proto: $(PROTO_OUT)
fleetscope/v1/%_pb2.py: schemas/fleetscope/v1/%.proto $(VENV)/.installed
	@$(PY) -m grpc_tools.protoc -I schemas --python_out=. --pyi_out=. $<
	@touch fleetscope/v1/__init__.py

bpf: system-packages
	@$(MAKE) -s -C bpf

kafka: system-packages
	@tools/kafka/fetch.sh

# clickhouse-go (Grafana's client family) for the SQL interface test: modules from the Go
# module proxy, compiled once so the test's own build is quick.
go-client:
	@if command -v go >/dev/null 2>&1; then \
		cd tests/go/chquery && go mod download && go build -o /dev/null . ; \
	else echo "go is not installed: the clickhouse-go test will skip (and fail in CI)"; fi

run: deps
	$(VENV)/bin/fleetscope run --data-dir $(DATA_DIR)

test: deps kafka go-client
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy fleetscope node_agent ingester

clean:
	$(MAKE) -s -C bpf clean
	rm -rf fleetscope/v1 .cache/system-packages.stamp

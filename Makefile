# vcluster: `make demo` runs the local GPU-less sandbox end to end; `make test` runs every test.
# Both install what they need (Debian packages, a virtualenv in .venv) on a fresh Debian 12.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := openssh-server openssh-client iproute2 docker.io debootstrap procps curl
# commands whose absence means a package above is missing
SYSTEM_COMMANDS := /usr/sbin/sshd ssh ssh-keygen ip dockerd debootstrap pgrep curl

.PHONY: help demo test test-fast unit integration e2e lint bench images system-deps venv clean

help:
	@echo "make demo   - bring up the local sandbox cluster (no GPU needed) and serve a model"
	@echo "make test   - install what is needed and run lint, unit, integration and e2e tests"
	@echo "make test-fast - lint and every test not marked slow (no e2e): the inner loop"
	@echo "make bench  - run the benchmarks in bench/ and print their ratios (about 45 minutes)"

system-deps:
	@missing=0; for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "installing Debian packages: $(SYSTEM_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi

$(BIN)/vcluster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/vcluster

demo: system-deps venv
	$(BIN)/vcluster sandbox demo

lint: venv
	$(BIN)/ruff check cluster tests bench images
	$(BIN)/ruff format --check cluster tests bench images
	$(BIN)/mypy cluster

unit: venv
	$(BIN)/pytest -q tests/unit

integration: system-deps venv images
	$(BIN)/pytest -q tests/integration

e2e: system-deps venv images
	$(BIN)/pytest -q tests/e2e

# The sandbox images (about 5 minutes on a cold machine, cached afterwards under
# /var/lib/vcluster) are built before the tests, so no test's time limit includes them.
images: system-deps venv
	$(BIN)/vcluster sandbox build

test: system-deps venv lint images
	$(BIN)/pytest -q -rs tests

# The inner loop: lint, then every test but those marked `slow` (docs/testing.md). The images
# are a prerequisite still (a few fast integration tests run the workload image); cached, they
# cost nothing.
test-fast: system-deps venv lint images
	$(BIN)/pytest -q -rs -m "not slow" tests

bench: system-deps venv
	$(BIN)/python bench/fanout
	$(BIN)/python bench/up
	$(BIN)/python bench/sandbox
	$(BIN)/python bench/heal

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache *.egg-info

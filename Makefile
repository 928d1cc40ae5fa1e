# Every target does its own set-up on a fresh machine: a venv with the CPU build of torch pinned first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# -qq: pip's errors only. Its warnings here are about the machine's pip config (e.g. "Location ... is ignored"
# for a local index that lacks a package), not about this project.
PIP := $(PY) -m pip install -qq --disable-pip-version-check

.PHONY: demo test ui bench browser clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $(STAMP)
	@echo "set up $(VENV): the lorafleet command is $(VENV)/bin/lorafleet (or: source $(VENV)/bin/activate)"

# Debian's Chromium for the browser test (Playwright drives it; nothing is downloaded by Playwright). apt-get
# needs root, or sudo without a password; with neither, say so: the browser checks are then skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "Chromium is missing, and installing it needs root or sudo: the browser checks will be skipped" \
	         "(install Debian's chromium, or any Chromium at /usr/bin/chromium, to run them)"; exit 0; fi; \
	  log=$$(mktemp) && $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    chromium >/dev/null 2>$$log || { cat $$log; exit 1; }; }

# The demo's nights are materialized by Dagster into .dagster_home, the instance `make ui` opens.
demo: $(STAMP)
	$(PY) -m dagster_project.demo --root demo_data

test: $(STAMP) browser
	$(PY) -m pytest -q

# Dagster UI on the demo's data (LORAFLEET_ROOT=... for other data); ARGS="-p 3001 -h 0.0.0.0"
ui: $(STAMP)
	test -d demo_data || $(MAKE) demo
	$(PY) -m dagster_project.ui $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.bench_e2e

clean:
	rm -rf $(VENV) demo_data test-artifacts .dagster_home

# Every target does its own set-up on a fresh machine: a venv with the CPU build of torch pinned first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test ui bench browser clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian's Chromium for the browser test (Playwright drives it; nothing is downloaded by Playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: $(STAMP)
	$(PY) -m pipeline.demo --root demo_data

test: $(STAMP) browser
	$(PY) -m pytest -q

# Dagster UI on the demo's data (LORAFLEET_ROOT=... for other data); ARGS="-p 3001 -h 0.0.0.0"
ui: $(STAMP)
	test -d demo_data || $(MAKE) demo
	$(PY) -m dagster_project.ui $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.bench_e2e

clean:
	rm -rf $(VENV) demo_data test-artifacts

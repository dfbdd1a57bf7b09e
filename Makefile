PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Label Studio for the end-to-end tests (tests/e2e), in a virtualenv of its own: it pins Django,
# label-studio-sdk and more, which must not mix with the project's dependencies.
LS_VERSION := 1.23.2
LS_VENV := .venv-ls
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)

.PHONY: install install-ls browser test lint run demo screenshots bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PY) -m venv $(LS_VENV) || python3 -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q label-studio==$(LS_VERSION)
	touch $(LS_STAMP)

install: $(STAMP)

# Debian's chromium for the screenshot script and its smoke test (Playwright drives the system browser;
# `playwright install` is never run). Needs root + apt; without them the smoke test skips with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium could not be installed: the screenshot smoke test will be skipped"; }

install-ls: $(LS_STAMP)

test: $(STAMP) $(LS_STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

run: $(STAMP)
	$(BIN)/osprey run

demo: $(STAMP) $(LS_STAMP)
	$(BIN)/osprey demo

screenshots: $(STAMP) $(LS_STAMP) browser
	$(BIN)/osprey demo --screenshots docs/images

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py
	$(BIN)/python bench/backend_latency.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache *.egg-info

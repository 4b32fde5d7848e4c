# The two commands that matter: `make demo` (chat UI on the default model) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

LLAMACPP_STAMP := $(VENV)/.llamacpp-stamp

.PHONY: setup browser llamacpp demo test test-fast lint clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv with everything (torch CPU wheel first)

$(STAMP): pyproject.toml requirements-offline.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: any unpinned torch requirement could pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-offline.txt
	touch $(STAMP)

demo: setup  ## chat in the browser with the default model (http://127.0.0.1:7860)
	$(VENV)/bin/llava-lite serve

# The browser test drives Debian's chromium through Playwright (no browser download).
browser:  ## install Debian's chromium for the browser test, if missing
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

llamacpp: $(LLAMACPP_STAMP)  ## build llama-cpp-python (~6 min once) for the export-gguf tests

$(LLAMACPP_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[llamacpp]"
	touch $(LLAMACPP_STAMP)

test: setup browser llamacpp  ## ruff, then the whole test suite, slow end-to-end tests included
	$(VENV)/bin/ruff check llava_lite train serve data tests
	$(PY) -m pytest -q -ra

test-fast: setup  ## skip the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff
	$(VENV)/bin/ruff check llava_lite train serve data tests

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

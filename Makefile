# embtab: `make demo` and `make test` each set the environment up first on a fresh machine.
#
# EMBTAB_DEVICE=cpu (default) installs fbgemm's CPU build; EMBTAB_DEVICE=cuda installs the CUDA build
# of fbgemm-gpu next to PyPI's CUDA torch (for GPU machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EMBTAB_DEVICE ?= cpu
STAMP := $(VENV)/.installed-$(EMBTAB_DEVICE)
OUT ?= results
# Recipes run under bash with pipefail, so a filtered pip command still fails when pip fails.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip reports torchrec's declared CUDA fbgemm-gpu, deliberately not installed (the CPU or CUDA build
# is installed explicitly), as a dependency conflict: expected and harmless, so only those lines go.
EXPECTED_PIP_NOISE := 2>&1 | sed -u -e '/dependency resolver does not currently take into account/d' \
	-e '/This behaviour is the source of the following dependency conflicts/d' -e '/requires fbgemm-gpu==/d'
# torch's and fbgemm's OpenMP threads must not spin against each other (see embtab/_threads.py).
export OMP_WAIT_POLICY ?= PASSIVE

ifeq ($(EMBTAB_DEVICE),cuda)
FBGEMM := fbgemm-gpu==1.8.0
else ifeq ($(EMBTAB_DEVICE),cpu)
FBGEMM := fbgemm-gpu-cpu==1.8.0
else
$(error EMBTAB_DEVICE must be cpu or cuda, got $(EMBTAB_DEVICE))
endif

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(FBGEMM)
	# torchrec declares the CUDA fbgemm-gpu as a dependency: install it alone, its real deps below.
	$(PY) -m pip install --quiet --no-deps torchrec==1.8.0 $(EXPECTED_PIP_NOISE)
	$(PY) -m pip install --quiet -e '.[dev]' $(EXPECTED_PIP_NOISE)
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: every method (sized per table, hot-id variants, learned sizes) at two byte budgets
# on real MovieLens-100K with DIN, up to 2 epochs with early stopping (3.5 minutes on 2 cores).
demo: setup
	$(PY) -m experiments.sweep --config experiments/configs/din_movielens.toml --epochs 2 \
		--budgets 1/4 1/16 --seeds 1 --min-fill 0.75 --set search.train.epochs=3 \
		--set search.train.patience=3 --out $(OUT)/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m experiments.bench_methods --out $(OUT)/bench_methods.json

clean:
	rm -rf $(VENV) $(OUT)

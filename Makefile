# Two commands on a fresh clone: `make demo` and `make test`. Both install into .venv first (once).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all mutation bench lint typecheck check format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# PGD-AT and standard training of PreActResNet-18 (width 0.125) on the embedded MNIST images, offline,
# then both results side by side.
demo: $(STAMP)
	rm -rf outputs/demo
	$(VENV)/bin/robust-train -m experiment=demo defense=pgd_at,standard hydra.sweep.dir=outputs/demo
	$(PY) scripts/compare_runs.py outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# Mutation testing of attacks/, defenses/ and addons/ against their fast tests ([tool.mutmut] in
# pyproject.toml; writes mutants/). All 6,000+ mutants take hours on 2 cores: pass mutant names or globs in
# MUTANTS to run a subset, e.g. MUTANTS='robust_train.attacks.losses*'.
MUTANTS ?=
mutation: $(STAMP)
	$(PY) -m pip install --quiet mutmut==3.8.1
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

# Training-step throughput, ours beside a reference loop written like the papers' code, on synthetic
# CIFAR-shaped data: PreActResNet-18 with 16 base channels (width 0.25), batch 128, PGD-AT and TRADES.
# More options: `make bench BENCH_ARGS="--mode step epoch autoattack --json bench.json"`.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) scripts/bench.py --model preact_resnet18 --width 0.25 --batch 128 --defense pgd_at trades $(BENCH_ARGS)

LINT_PATHS := robust_train hydra_plugins tests scripts examples

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

# mypy over the package; its settings are in pyproject.toml ([tool.mypy]).
typecheck: $(STAMP)
	$(PY) -m mypy

# What CI checks besides the tests: lint, format and types.
check: lint typecheck

format: $(STAMP)
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) outputs .pytest_cache

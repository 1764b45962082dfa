# eqkit — run `make` (or `make help`) for the list of targets.

PYTHON ?= python3
VENV = .venv
PY = $(VENV)/bin/python
PYTEST_ARGS ?= -q
SPEC ?= sweeps/quick.yaml
JOBS ?= 1
STAMP = $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test reproduce sweep benchmark lab clean distclean

help:
	@echo "eqkit targets:"
	@echo "  make reproduce   install (if needed), execute every notebook into runs/ and write figures/,"
	@echo "                   then the quick sweep (sweeps/quick.yaml) and its report (runs/quick/report.md)"
	@echo "  make sweep       run a sweep spec and its report (SPEC=$(SPEC) JOBS=$(JOBS))"
	@echo "  make benchmark   the CPU-budget benchmark: cnn-mnist vs p4-mnist on rebuilt MNIST-rot, 2 seeds (~25 min)"
	@echo "  make test        install (if needed), run the test suite (PYTEST_ARGS='$(PYTEST_ARGS)')"
	@echo "  make install     create $(VENV) and install eqkit (editable) with test extras"
	@echo "  make lab         install (if needed), start JupyterLab on notebooks/"
	@echo "  make clean       remove runs/ and caches (keeps $(VENV))"
	@echo "  make distclean   clean, and also remove $(VENV)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">>> installing eqkit and its dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -e ".[test]"
	@touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce: install
	$(PY) -m kit reproduce

sweep: install
	$(PY) -m kit sweep $(SPEC) --jobs $(JOBS) --report

benchmark: install
	$(PY) -m kit sweep sweeps/cpu-benchmark.yaml --report

lab: install
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf runs/ .pytest_cache/ .kit_cache/ build/ dist/ *.egg-info
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

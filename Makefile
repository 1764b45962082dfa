# eqkit — run `make` (or `make help`) for the list of targets.

PYTHON ?= python3
VENV = .venv
PY = $(VENV)/bin/python
PYTEST_ARGS ?= -q
SPEC ?= sweeps/quick.yaml
JOBS ?= 1
STAMP = $(VENV)/.installed

.DEFAULT_GOAL := help
COMPARE = $(VENV)/.compare
.PHONY: help install compare gfortran test reproduce sweep benchmark bench zoo lab clean distclean

help:
	@echo "eqkit targets:"
	@echo "  make reproduce   install (if needed), execute every notebook into runs/ and write figures/,"
	@echo "                   then the quick sweep (sweeps/quick.yaml) and its report (runs/quick/report.md)"
	@echo "  make sweep       run a sweep spec and its report (SPEC=$(SPEC) JOBS=$(JOBS))"
	@echo "  make benchmark   the CPU-budget benchmark: cnn-mnist vs p4-mnist on rebuilt MNIST-rot, 2 seeds (~25 min)"
	@echo "  make zoo         retrain the zoo (sweeps/zoo.yaml, resumable, ~2 h on 2 cores), export its weights"
	@echo "                   to kit/weights/ and write its table (figures/zoo.md)"
	@echo "  make bench       python -m kit bench: every family beside escnn, CPU (<10 min) -> figures/bench/"
	@echo "  make compare     add the optional 'compare' extra (escnn) to $(VENV); installs gfortran if missing"
	@echo "  make test        install (if needed), run the test suite (PYTEST_ARGS='$(PYTEST_ARGS)')"
	@echo "  make install     create $(VENV) and install eqkit (editable) with test extras"
	@echo "  make lab         install (if needed), start JupyterLab on notebooks/"
	@echo "  make clean       remove runs/ and caches (keeps $(VENV))"
	@echo "  make distclean   clean, and also remove $(VENV)"

# torch's CPU wheels where that index is reachable (otherwise PyPI's, or a local wheel pip is configured with)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">>> installing eqkit with every extra into $(VENV), versions pinned by constraints.txt (first time: a few minutes)"
	@idx=""; if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)', timeout=5)" >/dev/null 2>&1; then \
		idx="--extra-index-url $(TORCH_INDEX)"; echo ">>> CPU builds of torch from $(TORCH_INDEX)"; \
	else echo ">>> $(TORCH_INDEX) is not reachable: torch from PyPI or the wheels pip is configured with"; fi; \
	echo "$(PY) -m pip install -c constraints.txt $$idx -e .[all,test]"; \
	$(PY) -m pip install -c constraints.txt $$idx -e ".[all,test]"
	@echo ">>> building the fused C++ kernels (E4 aggregation and fused E4 operator, Neural-ePDO filter, isotypic basis changes, batch norm -> ReLU, dropout; once, a few minutes)"
	$(PY) -c "from kit.kernels import aggregate, pdo_filter, isotypic, bn_relu, dropout; print('fused kernels:', ', '.join(n + (' built' if f() else ' unavailable (plain-PyTorch path)') for n, f in (('aggregation', aggregate.fused_extension), ('E4', aggregate.e4_extension), ('PDO filter', pdo_filter.fused_pdo_extension), ('isotypic', isotypic.fused_isotypic_extension), ('bn_relu', bn_relu.bn_relu_extension), ('dropout', dropout.dropout_extension))))"
	@touch $@

install: $(STAMP)

# escnn's dependency py3nj is Fortran: build it with gfortran (installed here with apt when missing)
gfortran:
	@command -v gfortran >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo ">>> installing gfortran (py3nj, a dependency of escnn, is built with it)"; \
		(apt-get install -y --no-install-recommends gfortran || (apt-get update && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gfortran)); \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
		sudo apt-get install -y --no-install-recommends gfortran; \
	else \
		echo "make compare: escnn's dependency py3nj needs a Fortran compiler; install gfortran" \
		     "(Debian/Ubuntu: apt-get install gfortran; conda: conda install gfortran) and re-run" >&2; exit 1; \
	fi

$(COMPARE): $(STAMP)
	@$(MAKE) --no-print-directory gfortran
	$(PY) -m pip install -c constraints.txt -e ".[all,test,compare]"
	@touch $@

compare: $(COMPARE)

bench: install
	$(PY) -m kit bench

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce: install
	$(PY) -m kit reproduce

sweep: install
	$(PY) -m kit sweep $(SPEC) --jobs $(JOBS) --report

zoo: install
	$(PY) -m kit sweep sweeps/zoo.yaml
	$(PY) -m kit zoo export
	$(PY) -m kit report zoo

benchmark: install
	$(PY) -m kit sweep sweeps/cpu-benchmark.yaml --report

lab: install
	$(PY) -m jupyter lab notebooks/

clean:
	rm -rf runs/ .pytest_cache/ .kit_cache/ build/ dist/ *.egg-info
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -print -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# The commands a reader types. `make test` and `make book` set everything up on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MATHJAX := build/static/mathjax/tex-chtml.js
BOOK_HTML := build/_build/html

# Reproducible runs: the same hash seed for every Python process, no progress bars under CI.
export PYTHONHASHSEED := 0
ifdef CI
export TQDM_DISABLE := 1
endif

.PHONY: help install check export execute test test-fast grade lab book clean

help:
	@echo "make test     set up (first time), then run every check: sync, export, unit tests,"
	@echo "              notebooks (nbval), exercise integrity, book build, browser check"
	@echo "make book     set up (first time), then build the HTML book; prints the page to open"
	@echo "make lab      JupyterLab on the chapters in book/"
	@echo "make grade    score your exercises (python -m looplm.grade [chNN] works too)"
	@echo "make export   regenerate looplm/, kernels/ and tests/ from the chapters"
	@echo "make execute  re-execute chapters and store their outputs (CHAPTER=01 for one;"
	@echo "              LOOPLM_FRESH_TIMINGS=1 also replaces stored timings)"
	@echo "make check    fast: chapters and notebooks in sync, generated files up to date"

$(STAMP): pyproject.toml tools/install.sh
	bash tools/install.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

install: $(STAMP)

check: $(STAMP)
	$(PY) tools/sync.py
	$(PY) tools/export.py --check

export: $(STAMP)
	$(PY) tools/export.py

execute: $(STAMP)
	$(PY) tools/export.py
	$(PY) tools/execute.py $(CHAPTER)

$(MATHJAX):
	bash tools/mathjax.sh build/static/mathjax

test: $(STAMP) $(MATHJAX)
	$(PY) tools/sync.py
	$(PY) tools/export.py --check
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/ -q -n 2 --dist loadfile
	OMP_NUM_THREADS=1 $(PY) -m pytest --nbval-lax --nbval-sanitize-with tools/nbval_sanitize.cfg -q -n 2 --dist loadfile book/

grade: $(STAMP)
	$(PY) -m looplm.grade $(CHAPTER)

# JupyterLab refuses to start as root (the usual user in a container) without --allow-root.
LAB_UID ?= $(shell id -u)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(LAB_UID)),--allow-root )--notebook-dir=. book/00_tasks_and_tokens.ipynb

book: $(STAMP) $(MATHJAX)
	$(VENV)/bin/jupyter-book build book --path-output build -q -W --keep-going
	@echo
	@echo "The book is built. Open this page in a browser:"
	@echo "  file://$(CURDIR)/$(BOOK_HTML)/index.html"

clean:
	rm -rf build book/_build .pytest_cache

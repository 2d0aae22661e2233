# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: setup test bench experiment docs clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The optional peers of the benchmark (Moreau): a failed install only drops their rows.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]' || echo "note: optional benchmark peers not installed; their rows are skipped"
	$(VENV)/bin/convexddn bench

experiment: $(STAMP)
	$(VENV)/bin/convexddn experiment pointcloud
	$(VENV)/bin/convexddn experiment projection

# The site's tools (MkDocs Material, mkdocstrings) are the [docs] extra, installed only here.
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# Strict: a broken link or cross-reference, or a docstring that does not parse, fails.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) results build *.egg-info

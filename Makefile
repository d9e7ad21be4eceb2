# Coffer: the two commands of the Quick start are `make demo` and `make test`.
# Both install what they need first (a .venv with the pinned Python packages; Debian packages when
# running as root, otherwise the exact apt-get command is printed).

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml scripts/bootstrap.sh | cksum | cut -d' ' -f1)
PYTEST_WORKERS ?= auto

.PHONY: demo demo-evidence test lint typecheck unit bench install native clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@PYTHON=$(PYTHON) VENV=$(VENV) sh scripts/bootstrap.sh
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP) native

# The policy engine's request views compiled with mypyc (optional: a note, and the Python views, when
# there is no C compiler).
native: $(STAMP)
	@$(PY) scripts/build_native.py

demo: $(STAMP) native
	@$(VENV)/bin/coffer quickstart

demo-evidence: $(STAMP)
	@$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP) native
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -q

test: lint typecheck unit

bench: $(STAMP) native
	$(PY) bench/evidence.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -f src/coffer/policy/_views_native* src/coffer/policy/._views_native*

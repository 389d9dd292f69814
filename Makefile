# The two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pantau-installed

.PHONY: demo test lint bench bundle clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Pantau needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pantau-collector demo

test: $(STAMP)
	bash tests/services/install.sh
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/footprint.py
	$(PY) bench/ingest.py --runs 3 --config "sqlite,postgresql,postgresql*2"

# The agent's installer bundle (wheels of the agent and its dependencies) the collector serves to room PCs.
bundle: $(STAMP)
	$(VENV)/bin/pantau-collector bundle --out $(or $(BUNDLE_DIR),var/bundle)

clean:
	rm -rf var .pytest_cache

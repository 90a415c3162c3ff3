# `make demo`, `make test` and `make bench` each build .venv first when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.witclip-installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "witclip needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	# img2dataset drags in the `dataclasses` 0.6 backport, which shadows the standard library and kills
	# Prefect's server subprocess; remove it (tests/test_environment.py fails if it ever comes back).
	$(BIN)/pip uninstall -y dataclasses
	$(BIN)/python -c 'import importlib.util as u; s = u.find_spec("dataclasses"); assert "site-packages" not in s.origin, s.origin'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/witclip run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	@set -e; found=0; for script in bench/*.py; do [ -f "$$script" ] || continue; found=1; \
		echo "== $$script"; $(BIN)/python "$$script"; done; \
		[ $$found = 1 ] || echo "no benchmark scripts in bench/ yet"

clean:
	rm -rf runs mlruns mlflow.db

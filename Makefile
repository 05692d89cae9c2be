# emo: two commands matter. `make demo` renders the demo; `make test` runs the test suite.
# Both create .venv on first use (Python 3.11; pinned dependencies, see pyproject.toml).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: the sample portrait and vocal track through the real render flow (embedded
# defaults: SQLite, a local store and an ephemeral Prefect server under EMO_HOME).
demo: $(STAMP)
	$(BIN)/emo demo -o out/demo.mp4

# PostgreSQL is a machine service here; start it if it has stopped (no-op elsewhere).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || \
	  { command -v pg_ctlcluster >/dev/null && \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; } || true

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) services lint
	$(BIN)/python -m pytest

bench: $(STAMP) services
	$(BIN)/python bench/assembly.py
	$(BIN)/python bench/claims.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(VENV) .pytest_cache
